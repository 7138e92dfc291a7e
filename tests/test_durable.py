"""Processes survive an agent restart: the state database on real processes.

In process, one :class:`Agent` is closed and a new one started on the same state folder;
end to end, the real ``smartmob-agent`` command is SIGKILLed (with or without its
guardian) and started again. Each test checks what comes back (the same slugs, in the
same order, in their desired state, with their port, restart count and process id), that
nothing runs twice, and that no source is downloaded again. Waits are on state-change
events or polled with deadlines, never on a guessed sleep.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from smartmob_agent.config import Settings
from smartmob_agent.model import ProcessState as S
from smartmob_agent.model import Spec
from smartmob_agent.processes.proctable import marked_processes
from smartmob_agent.schemas import create_request, spec_from_request
from smartmob_agent.store import DATABASE_NAME, Record, Store
from smartmob_agent.supervision.agent import AGENT_ID_VARIABLE, Agent
from smartmob_agent.supervision.provision import PROCESS_ID_VARIABLE
from smartmob_agent.supervision.watcher import Watcher
from tests.agent_process import AgentProcess
from tests.conftest import ArchiveServer
from tests.helpers import app_archive, eventually, pid_alive, wait_for_state

#: Fails its first start (leaving a file in its source folder), then runs until SIGTERM.
#: Run again from the same unpacked source, it does not fail: a second failure would
#: mean the source was downloaded and unpacked afresh.
CRASH_ONCE = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
if not os.path.exists("crashed-once"):
    open("crashed-once", "w").close()
    sys.exit(3)
print("ready", os.getpid(), flush=True)
while True:
    time.sleep(60)
"""


def read_environ(pid: int) -> dict[str, str]:
    """The environment of a live process, as /proc shows it now."""
    with open(f"/proc/{pid}/environ", "rb") as file:
        entries = file.read().split(b"\0")
    return dict(e.decode().split("=", 1) for e in entries if b"=" in e)


async def environ_of(pid: int) -> dict[str, str]:
    """The environment of a live process once it has one.

    While a process is inside ``execve`` (``sh`` running ``exec sleep``), the kernel shows
    an empty environment for a moment: a busy machine makes that moment visible.
    """
    found: dict[str, str] = {}

    def has_environment() -> bool:
        found.update(read_environ(pid))
        return bool(found)

    await eventually(has_environment, what=f"process {pid} to show its environment")
    return found


def live_marked(name: str, value: str) -> list[int]:
    """Live (not zombie) processes whose environment holds ``name=value``."""
    return [p for p in marked_processes(f"{name}={value}".encode()) if pid_alive(p)]


def ran_after_one_crash(watcher: Watcher) -> bool:
    return watcher.state is S.RUNNING and watcher.restarts == 1


def make_spec(url: str, node: str, **options: Any) -> Spec:
    """The spec of a create request for a ``web`` process, as the API builds it."""
    body = {"app": "shop", "node": node, "process_type": "web", "source_url": url, **options}
    return spec_from_request(create_request.validate(body))


# -- in process ---------------------------------------------------------------------------


async def test_a_new_agent_brings_back_every_process_in_its_desired_state(
    settings: Settings, archive_server: ArchiveServer
) -> None:
    """A process that ran, one stopped by a ``stop`` control and one created with
    ``autostart: false`` come back in a new agent on the same state folder: the same
    slugs in the same order, the first running again (new child, same port, restart
    count and process id), the others still stopped; a deleted one never comes back;
    nothing is downloaded again, even when the stopped one is started later."""
    url = archive_server.add("app.tgz", app_archive(
        "web: exec {PYTHON} -u app.py\n", {"app.py": CRASH_ONCE}))
    quick = {"backoff": {"initial": 0.01, "max": 0.01}}
    first = Agent(settings)
    await first.start()
    try:
        running = first.create(make_spec(url, "running.0", **quick))
        stopped = first.create(make_spec(url, "stopped.0", **quick))
        never = first.create(make_spec(url, "never.0", autostart=False, **quick))
        deleted = first.create(make_spec(url, "deleted.0", **quick))
        for watcher in (running, stopped):  # each crashes once, then runs
            await eventually(partial(ran_after_one_crash, watcher),
                             what=f"{watcher.spec.slug} to run after one crash")
        await wait_for_state(deleted, S.RUNNING)
        await first.control(stopped, "stop")
        await first.delete(deleted.spec.slug)
        old_pid = running.pid
        assert old_pid is not None
        before = {w.spec.slug: (w.port, w.restarts, w.process_id)
                  for w in (running, stopped, never)}
        assert (await environ_of(old_pid))[PROCESS_ID_VARIABLE] == running.process_id
        # created at once, they shared one download (see test_sources.py)
        assert archive_server.hits("app.tgz") == 1
    finally:
        await first.close()
    assert not pid_alive(old_pid)

    second = Agent(settings)
    await second.start()
    try:
        slugs = [w.spec.slug for w in second.watchers()]
        assert slugs == ["shop.running.0", "shop.stopped.0", "shop.never.0"]
        back = {w.spec.slug: w for w in second.watchers()}
        again = back["shop.running.0"]
        await wait_for_state(again, S.RUNNING)
        assert again.pid is not None
        assert again.pid != old_pid
        after = {slug: (w.port, w.restarts, w.process_id) for slug, w in back.items()}
        assert after == before
        child_env = await environ_of(again.pid)
        assert child_env[PROCESS_ID_VARIABLE] == before["shop.running.0"][2]
        assert child_env["PORT"] == str(before["shop.running.0"][0])
        assert child_env[AGENT_ID_VARIABLE] == second.id
        assert back["shop.stopped.0"].state is S.STOPPED
        assert back["shop.never.0"].state is S.STOPPED
        assert archive_server.hits("app.tgz") == 1
        assert not (second.processes_dir / "shop.deleted.0").exists()
        # a new process gets none of the ports the restored ones hold
        fresh = second.create(make_spec(url, "fresh.0", autostart=False))
        assert fresh.port not in {port for port, _, _ in before.values()}

        # the stopped one starts from the source it unpacked before: no download
        await second.control(back["shop.stopped.0"], "start")
        await wait_for_state(back["shop.stopped.0"], S.RUNNING)
        assert back["shop.stopped.0"].restarts == before["shop.stopped.0"][1]
        assert archive_server.hits("app.tgz") == 1
        # the one never started has nothing to reuse: its first start downloads (the
        # server sends no ETag nor Last-Modified, so the cached archive cannot be reused)
        await second.control(back["shop.never.0"], "start")
        await wait_for_state(back["shop.never.0"], S.RUNNING)
        assert archive_server.hits("app.tgz") == 2
        assert second.store is not None
        desired = {r.slug: r.desired for r in second.store.load()}
        assert desired == {"shop.running.0": "running", "shop.stopped.0": "running",
                           "shop.never.0": "running", "shop.fresh.0": "stopped"}
    finally:
        await second.close()


async def test_stop_and_delete_are_recorded_before_they_answer(
    settings: Settings, archive_server: ArchiveServer
) -> None:
    """Once ``control("stop")`` and ``delete`` return, the database says so (a crash
    right after cannot bring back a stopped process running, nor a deleted one); a
    ``restart`` of a stopped process records it running again."""
    url = archive_server.add("app.tgz", app_archive("web: exec sleep 1000\n"))
    async with Agent(settings) as agent:
        store = agent.store
        assert store is not None
        one = agent.create(make_spec(url, "one.0"))
        two = agent.create(make_spec(url, "two.0"))
        assert [(r.slug, r.desired) for r in store.load()] == [
            ("shop.one.0", "running"), ("shop.two.0", "running")]
        await wait_for_state(one, S.RUNNING)
        await wait_for_state(two, S.RUNNING)
        record = store.load()[0]
        assert (record.pid, record.process_id, record.port) == (
            one.pid, one.process_id, one.port)
        assert record.pid_started == psutil.Process(one.pid).create_time()
        await agent.control(one, "stop")
        assert store.load()[0].desired == "stopped"
        await agent.control(one, "restart")
        assert store.load()[0].desired == "running"
        await agent.bulk("stop", "shop")
        assert {r.desired for r in store.load()} == {"stopped"}
        await agent.delete(two.spec.slug)
        assert [r.slug for r in store.load()] == ["shop.one.0"]


async def test_every_option_of_the_request_comes_back(
    settings: Settings, archive_server: ArchiveServer
) -> None:
    """A process created with every option of a create request (env, checksum and
    supervision options; ``autostart: false``, so nothing runs) comes back in a new agent
    with the same spec and port."""
    url = archive_server.url("never-fetched.tgz")
    options: dict[str, Any] = {
        "restart": "on-failure", "exit_codes": [3, 0], "max_restarts": None,
        "start_seconds": 2.5, "backoff": {"initial": 0.5, "max": 8}, "stop_signal": "INT",
        "stop_timeout": 3, "working_dir": "sub/dir", "umask": "027", "autostart": False,
        "health": {"command": "true", "interval": 2},
        "notify": ["http://127.0.0.1:9/hook"],
        "env": {"A": "1", "SECRET": "s3cr3t", "PORT": "18123"},
        "checksum": "sha256:" + "Ab" * 32,
    }
    async with Agent(settings) as first:
        created = first.create(make_spec(url, "all.0", **options))
        plain = first.create(make_spec(url, "plain.0", autostart=False))
        before = [(w.spec, w.port) for w in (created, plain)]
    async with Agent(settings) as second:
        assert [(w.spec, w.port) for w in second.watchers()] == before
        assert before[0][1] == 18123
        assert all(w.state is S.STOPPED for w in second.watchers())
    assert archive_server.hits("never-fetched.tgz") == 0


async def test_restart_count_of_a_process_in_backoff_survives(
    settings: Settings, archive_server: ArchiveServer
) -> None:
    """A process waiting in ``backoff`` after a crash has counted that restart; closed
    then, it comes back in a new agent with the same count."""
    url = archive_server.add("crash.tgz", app_archive("web: exit 3\n"))
    async with Agent(settings) as first:
        crashing = first.create(make_spec(url, "crash.0", backoff={"initial": 30, "max": 30}))
        await wait_for_state(crashing, S.BACKOFF)
        counted = crashing.restarts
        assert counted == 1
    async with Agent(settings) as second:
        (again,) = second.watchers()
        assert again.restarts == counted


# -- end to end ---------------------------------------------------------------------------


@pytest.fixture
def leftovers() -> Iterator[list[psutil.Process]]:
    """Processes a test expects to be stopped; any still alive at the end is killed (so
    a failing test leaves no ``sleep 1000`` behind)."""
    watched: list[psutil.Process] = []
    yield watched
    for process in watched:
        try:
            if process.is_running():  # same pid and start time: not a reused pid
                process.kill()
        except psutil.Error:
            pass


async def create_all(
    http: aiohttp.ClientSession, base: str, bodies: list[dict[str, Any]]
) -> list[str]:
    """Create each process (in this order); their slugs."""
    async with http.get(base + "/") as response:
        links = await response.json()
    slugs = []
    for body in bodies:
        async with http.post(links["create"], data=json.dumps(body)) as response:
            assert response.status == 201, await response.text()
            slugs.append((await response.json())["slug"])
    return slugs


async def all_running(
    http: aiohttp.ClientSession, base: str, timeout: float = 10.0
) -> list[dict[str, Any]]:
    """Poll the listing until every process runs; the listing's processes."""
    async with asyncio.timeout(timeout):
        while True:
            async with http.get(base + "/list-processes") as response:
                processes: list[dict[str, Any]] = (await response.json())["processes"]
            assert all(p["state"] not in ("failed", "exited") for p in processes), processes
            if all(p["state"] == "running" for p in processes):
                return processes
            await asyncio.sleep(0.02)


def running(process: psutil.Process) -> bool:
    """Whether ``process`` (that very one, not a reuse of its pid) runs, not a zombie."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def guardian_of(agent: AgentProcess) -> psutil.Process:
    """The agent's guardian process (a child of the agent)."""
    found = [child for child in psutil.Process(agent.pid).children()
             if "smartmob_agent.processes.guardian" in " ".join(child.cmdline())]
    assert len(found) == 1, found
    return found[0]


async def restart_check(
    http: aiohttp.ClientSession, state_dir: Path, archive_server: ArchiveServer,
    name: str, slugs: list[str], before: dict[str, dict[str, Any]],
    process_ids: dict[str, str], leftovers: list[psutil.Process],
) -> AgentProcess:
    """Start a new agent on ``state_dir``; check that every process runs again, once,
    as a new child with its old port, restart count and process id, and that no source
    was downloaded again. Returns the new agent (for the caller to stop); its children
    join ``leftovers``."""
    hits = archive_server.hits(name)
    agent = AgentProcess(state_dir)
    await agent.start()
    try:
        await _check_restarted(http, agent, archive_server, name, slugs, before,
                               process_ids, leftovers, hits)
    except BaseException:
        await agent.kill()  # the caller never gets it: do not leave it running
        raise
    return agent


async def _check_restarted(
    http: aiohttp.ClientSession, agent: AgentProcess, archive_server: ArchiveServer,
    name: str, slugs: list[str], before: dict[str, dict[str, Any]],
    process_ids: dict[str, str], leftovers: list[psutil.Process], hits: int,
) -> None:
    processes = await all_running(http, agent.url)
    leftovers.extend(psutil.Process(p["pid"]) for p in processes)
    assert [p["slug"] for p in processes] == slugs
    for process in processes:
        old = before[process["slug"]]
        assert process["pid"] != old["pid"]
        assert (process["port"], process["restarts"]) == (old["port"], old["restarts"])
        process_id = process_ids[process["slug"]]
        assert (await environ_of(process["pid"]))[PROCESS_ID_VARIABLE] == process_id
        # exactly one live process carries it: the new child
        assert live_marked(PROCESS_ID_VARIABLE, process_id) == [process["pid"]]
    assert not any(pid_alive(old["pid"]) for old in before.values())
    assert archive_server.hits(name) == hits


async def test_sigkilled_agent_twenty_processes_come_back_once_each(
    tmp_path: Path, http: aiohttp.ClientSession, archive_server: ArchiveServer,
    leftovers: list[psutil.Process],
) -> None:
    """SIGKILL of the real agent with 20 running processes, then a new agent on the same
    state folder: the same 20 slugs run again in creation order, each exactly once (one
    live process carries its process id), none of the old children is left, and nothing
    is downloaded again; each first run's output, on disk when the agent died, is still
    readable from the new agent's logs link."""
    # $$ is the shell's pid, which exec hands to sleep: the line names the first run
    url = archive_server.add("sleep.tgz", app_archive("web: echo first run $$; exec sleep 1000\n"))
    state_dir = tmp_path / "state"
    first = AgentProcess(state_dir)
    second: AgentProcess | None = None
    try:
        await first.start()
        bodies = [{"app": "fleet", "node": f"web.{i}", "process_type": "web",
                   "source_url": url} for i in range(20)]
        slugs = await create_all(http, first.url, bodies)
        processes = await all_running(http, first.url)
        assert [p["slug"] for p in processes] == slugs
        before = {p["slug"]: p for p in processes}
        leftovers.extend(psutil.Process(p["pid"]) for p in processes)
        process_ids = {p["slug"]: (await environ_of(p["pid"]))[PROCESS_ID_VARIABLE]
                       for p in processes}
        assert len(set(process_ids.values())) == 20
        # concurrent creates share a download; later ones download again (no validators)
        assert 1 <= archive_server.hits("sleep.tgz") <= 20

        # the first run's line reaches the log file (flushed within 0.2 s) before the kill
        for slug in slugs:
            log_file = state_dir / "logs" / slug / "output.log"
            line = f"first run {before[slug]['pid']}"

            def on_disk(log_file: Path = log_file, line: str = line) -> bool:
                return log_file.exists() and line in log_file.read_text(errors="replace")

            await eventually(on_disk, what=f"{slug}'s first line on disk")
        await first.kill()
        second = await restart_check(http, state_dir, archive_server, "sleep.tgz", slugs,
                                     before, process_ids, leftovers)
        for slug in slugs:
            async with http.get(f"{second.url}/process-logs/{slug}?tail=100") as response:
                assert response.status == 200
                lines = [entry["line"] for entry in await response.json()]
            assert f"first run {before[slug]['pid']}" in lines, (slug, lines)
    finally:
        await first.kill()
        if second is not None:
            await second.kill()


async def test_children_that_outlived_their_agent_are_stopped_not_doubled(
    tmp_path: Path, http: aiohttp.ClientSession, archive_server: ArchiveServer,
    leftovers: list[psutil.Process],
) -> None:
    """With its guardian out of the way too (frozen, then SIGKILLed once the agent is:
    a frozen guardian is not replaced, and a dead one does not sweep) and children that
    cleared their parent-death signal, a SIGKILLed agent leaves its children running: a
    new agent on the same folder stops them before starting each process again, both
    the child that still carries the old agent's id and one that removed it from its
    environment (found by its recorded pid and start time)."""
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv to clear the children's parent-death signal")
    keep = "setpriv --pdeathsig clear --"
    url = archive_server.add("pair.tgz", app_archive(
        f"web: exec {keep} sleep 1000\n"
        f"hidden: exec {keep} env -u {AGENT_ID_VARIABLE} sleep 1000\n"))
    state_dir = tmp_path / "state"
    first = AgentProcess(state_dir)
    second: AgentProcess | None = None
    try:
        await first.start()
        bodies = [{"app": "pair", "node": f"{kind}.0", "process_type": kind,
                   "source_url": url} for kind in ("web", "hidden")]
        slugs = await create_all(http, first.url, bodies)
        processes = await all_running(http, first.url)
        before = {p["slug"]: p for p in processes}
        olds = [psutil.Process(p["pid"]) for p in processes]
        leftovers.extend(olds)
        process_ids = {p["slug"]: (await environ_of(p["pid"]))[PROCESS_ID_VARIABLE]
                       for p in processes}
        hidden = psutil.Process(before["pair.hidden.0"]["pid"])
        await eventually(lambda: hidden.name() == "sleep", what="env to exec sleep")
        assert AGENT_ID_VARIABLE not in await environ_of(hidden.pid)

        guardian = guardian_of(first)
        guardian.suspend()
        # the frozen guardian holds the agent's stderr: wait for the agent's death by its
        # pidfd, then kill the guardian (a live agent would replace it), then reap
        assert first.proc is not None
        agent_fd = os.pidfd_open(first.pid)
        try:
            first.proc.kill()
            await eventually(lambda: bool(select.select([agent_fd], [], [], 0)[0]),
                             what="the agent to die")
        finally:
            os.close(agent_fd)
        guardian.kill()
        guardian.wait(timeout=5)
        await first.kill()
        # survivors, really: nothing is left to stop them but the next agent
        assert all(map(running, olds))

        second = await restart_check(http, state_dir, archive_server, "pair.tgz", slugs,
                                     before, process_ids, leftovers)
        assert not any(map(running, olds))
        # each found the way it had to be: by the old agent's id, by pid and start time
        # (the count of the latter may include the first one's zombie, not yet reaped)
        assert "stopped 1 process(es) left running by the previous agent" in second.stderr
        assert "of the previous agent found by pid and start time" in second.stderr
    finally:
        await first.kill()
        if second is not None:
            await second.kill()


def run_agent(state_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "smartmob_agent", "--port", "0", "--state-dir", str(state_dir)],
        capture_output=True, text=True, timeout=30,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *parts: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("smartmob-agent:")]
    assert len(lines) == 1, result.stderr
    for part in parts:
        assert part in lines[0], lines[0]


async def test_a_corrupt_database_stops_the_command_with_advice(tmp_path: Path) -> None:
    """A state folder whose ``agent.db`` is not a database: the command exits 1 with one
    line naming the file and saying to move it aside, and no traceback; the file is
    left as it was."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    database = state_dir / DATABASE_NAME
    database.write_bytes(b"\x00garbage, not SQLite\n" * 200)
    result = await asyncio.to_thread(run_agent, state_dir)
    assert_one_line_error(result, str(database), f"move {database} aside", "--state-dir")
    assert database.read_bytes() == b"\x00garbage, not SQLite\n" * 200


async def test_a_second_agent_on_the_same_folder_is_refused(tmp_path: Path) -> None:
    """While an agent runs on a state folder, a second one on it exits 1 with one line
    saying the database is in use by another agent, and the first keeps serving."""
    state_dir = tmp_path / "state"
    first = AgentProcess(state_dir)
    try:
        await first.start()
        result = await asyncio.to_thread(run_agent, state_dir)
        assert_one_line_error(result, str(state_dir / DATABASE_NAME),
                              "in use by another smartmob-agent", "--state-dir")
        async with aiohttp.ClientSession() as http, \
                http.get(first.url + "/list-processes") as response:
            assert response.status == 200
    finally:
        await first.kill()


async def test_an_unreadable_row_stops_the_command_with_one_line(tmp_path: Path) -> None:
    """A database that opens but holds a request that is not JSON: the command exits 1
    with one line naming the file and the process, and nothing else on stderr."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    store = Store.open(state_dir)
    store.add(Record("shop.web.0", {"app": "shop"}, "running", "id"))
    store.close()
    connection = sqlite3.connect(state_dir / DATABASE_NAME, isolation_level=None)
    connection.execute("UPDATE processes SET request = '{not json'")
    connection.close()
    result = await asyncio.to_thread(run_agent, state_dir)
    assert_one_line_error(result, str(state_dir / DATABASE_NAME), "'shop.web.0'",
                          "aside")
    assert "ERROR" not in result.stderr, result.stderr
