"""The life of a process on real archives and children: states, restarts, backoff, stop."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import itertools
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from smartmob_agent.config import Settings
from smartmob_agent.model import Backoff, Exit, Options, Spec
from smartmob_agent.model import ProcessState as S
from smartmob_agent.processes.reaper import Reaper
from smartmob_agent.sources.builds import Builds
from smartmob_agent.sources.cache import SourceCache
from smartmob_agent.supervision.agent import Agent
from smartmob_agent.supervision.restart import JITTER
from smartmob_agent.supervision.runtime import Runtime
from smartmob_agent.supervision.watcher import Watcher
from tests.conftest import ArchiveServer
from tests.helpers import (
    app_archive,
    eventually,
    make_archive,
    pid_alive,
    record_states,
    wait_for_state,
)

#: Prints ready with its pid, then exits with code 0 on SIGTERM.
WAIT_TERM = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("ready", os.getpid(), flush=True)
while True:
    time.sleep(60)
"""

#: Ignores SIGTERM: only SIGKILL ends it.
IGNORE_TERM = """
import os, signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", os.getpid(), flush=True)
while True:
    time.sleep(60)
"""

#: Exits by itself on its first run (leaving a mark), waits for SIGTERM on later runs.
EXIT_ONCE = """
import os, signal, sys, time
if not os.path.exists("ran-once"):
    open("ran-once", "w").close()
    print("exiting", os.getpid(), flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("ready", os.getpid(), flush=True)
while True:
    time.sleep(60)
"""

#: Prints the variables under test, then waits for SIGTERM.
PRINT_ENV = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
for name in ("A", "B", "C", "ONLY_IN_TEST_PROCESS"):
    print(f"{name}={os.environ.get(name, '<unset>')}", flush=True)
print("agent", os.environ.get("SMARTMOB_AGENT_ID", "<unset>"), flush=True)
print("ready", os.getpid(), flush=True)
while True:
    time.sleep(60)
"""


class Lines:
    """A hub subscriber that keeps every line and lets a test await the n-th of a kind."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.closed = False
        self._changed = asyncio.Event()

    def send_lines(self, stream: str, lines: list[bytes]) -> None:
        self.lines.extend(lines)
        self._changed.set()

    def close(self) -> None:
        self.closed = True
        self._changed.set()

    def ended(self) -> bool:
        """Whether the hub closed this subscriber (the same as ``closed``, but a call: mypy
        keeps an attribute narrowed by an assert across the call that changes it)."""
        return self.closed

    def starting(self, prefix: bytes) -> list[bytes]:
        """Every line so far that starts with ``prefix``."""
        return [line for line in self.lines if line.startswith(prefix)]

    async def nth(self, prefix: bytes, n: int = 1) -> bytes:
        """Wait (5 s at most) for the ``n``-th line starting with ``prefix``; return it."""
        async with asyncio.timeout(5):
            while len(self.starting(prefix)) < n:
                assert not self.closed, f"output ended before {n} x {prefix!r}: {self.lines}"
                self._changed.clear()
                await self._changed.wait()
        return self.starting(prefix)[n - 1]


def attach(watcher: Watcher) -> Lines:
    """Subscribe to the watcher's output from now on."""
    lines = Lines()
    watcher.hub.subscribe(lines)
    return lines


def ready_pid(line: bytes) -> int:
    """The pid in a ``ready <pid>`` line."""
    return int(line.split()[1])


async def gone(*pids: int) -> None:
    """Wait (2 s at most) until none of ``pids`` is alive; zombies count as gone."""
    await eventually(lambda: not any(map(pid_alive, pids)), timeout=2.0,
                     what=f"the end of {pids}")


async def until(watcher: Watcher, predicate: Callable[[Watcher], bool]) -> None:
    """Wait (10 s at most) for a state change after which ``predicate(watcher)`` holds."""
    if predicate(watcher):
        return
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def listener(w: Watcher, old: S, new: S) -> None:
        if predicate(w) and not done.done():
            done.set_result(None)

    watcher.add_listener(listener)
    try:
        async with asyncio.timeout(10):
            await done
    finally:
        watcher.remove_listener(listener)


def running_run(number: int) -> Callable[[Watcher], bool]:
    """Whether the watcher runs its ``number``-th restart (0 is the first run)."""
    return lambda w: w.state is S.RUNNING and w.restarts == number


def spec(url: str, node: str = "web.0", **env: str) -> Spec:
    """The spec of a ``web`` process of ``myapp`` from ``url``, with request variables."""
    return Spec(app="myapp", node=node, process_type="web", source_url=url, env=env)


def serve(archive_server: ArchiveServer, procfile: str, **scripts: str) -> str:
    """Serve an app with this Procfile and these scripts (name without ``.py``)."""
    files = {f"{name}.py": text for name, text in scripts.items()}
    return archive_server.add("app.tgz", app_archive(procfile, files))


async def test_normal_life_goes_through_every_state_in_order(
    agent: Agent, archive_server: ArchiveServer
) -> None:
    """A process goes pending, downloading, unpacking, starting, running, stopping, stopped."""
    url = serve(archive_server, "web: {PYTHON} -u app.py\n", app=WAIT_TERM)
    watcher = agent.create(spec(url))
    assert watcher.state is S.PENDING
    seen = record_states(watcher)
    output = attach(watcher)
    pid = ready_pid(await output.nth(b"ready"))

    await watcher.stop()

    assert seen == [S.DOWNLOADING, S.UNPACKING, S.STARTING, S.RUNNING, S.STOPPING, S.STOPPED]
    assert watcher.restarts == 0
    assert watcher.error is None
    assert watcher.info().pid is None
    assert not output.closed  # a stopped process keeps its attached clients
    watcher.close()
    assert output.ended()
    await gone(pid)


async def test_restarts_after_the_child_exits_by_itself(
    agent: Agent, archive_server: ArchiveServer
) -> None:
    """A child that exits on its own is replaced by a new one with a new pid."""
    url = serve(archive_server, "web: {PYTHON} -u app.py\n", app=EXIT_ONCE)
    watcher = agent.create(spec(url))
    pids: list[int | None] = []
    watcher.add_listener(
        lambda w, old, new: pids.append(w.info().pid) if new is S.RUNNING else None
    )
    seen = record_states(watcher)
    output = attach(watcher)

    second = ready_pid(await output.nth(b"ready"))
    await until(watcher, running_run(1))

    first = ready_pid(await output.nth(b"exiting"))
    assert first != second
    assert watcher.restarts == 1
    assert watcher.last_exit == Exit(0)
    assert len(set(pids)) == 2
    assert watcher.info().pid == pids[-1]
    assert seen.count(S.STARTING) == 2
    assert seen[-2:] == [S.STARTING, S.RUNNING]
    assert pid_alive(second)


async def test_restarts_after_the_child_is_killed(
    agent: Agent, archive_server: ArchiveServer
) -> None:
    """A child killed with SIGKILL is replaced by a new one with a new pid."""
    url = serve(archive_server, "web: {PYTHON} -u app.py\n", app=WAIT_TERM)
    watcher = agent.create(spec(url))
    output = attach(watcher)
    first_app = ready_pid(await output.nth(b"ready"))
    first = watcher.info().pid
    assert first is not None

    os.kill(first, signal.SIGKILL)
    second_app = ready_pid(await output.nth(b"ready", 2))

    assert watcher.state is S.RUNNING
    assert watcher.restarts == 1
    assert watcher.last_exit == Exit(-signal.SIGKILL)
    assert watcher.info().pid not in (None, first)
    assert pid_alive(second_app)
    # what the killed shell left behind was killed with it
    await gone(first_app)


async def test_crash_loop_backs_off_exponentially_in_real_time(
    agent: Agent, archive_server: ArchiveServer
) -> None:
    """A command that exits at once is restarted after 0.1, 0.2, then 0.4 s, less up to
    25% of random jitter."""
    url = serve(archive_server, "web: exit 1\n")
    watcher = agent.create(spec(url))
    starts: list[float] = []
    watcher.add_listener(
        lambda w, old, new: starts.append(time.monotonic()) if new is S.STARTING else None
    )
    seen = record_states(watcher)

    await until(watcher, lambda w: len(starts) == 4)
    await watcher.stop()

    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    for gap, delay in zip(gaps, [0.1, 0.2, 0.4], strict=True):
        assert delay * (1 - JITTER) <= gap < delay + 0.5, gaps
    assert seen[2:11] == [S.STARTING, S.RUNNING, S.BACKOFF] * 3


class FakeTime:
    """An injected clock and sleep: runs last as long as a test says, sleeps are recorded.

    The n-th run lasts ``durations[n]`` seconds of this clock (0 once they run out); the
    clock moves forward when a run starts. After ``sleeps`` recorded sleeps, the next sleep
    never returns, which holds the watcher still until it is stopped.
    """

    def __init__(self, durations: list[float], sleeps: int) -> None:
        self.now = 1000.0
        self.delays: list[float] = []
        self._durations = list(durations)
        self._sleeps = sleeps
        self.parked = asyncio.Event()

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.delays.append(delay)
        if len(self.delays) > self._sleeps:
            self.delays.pop()
            self.parked.set()
            await asyncio.Event().wait()

    def listener(self, watcher: Watcher, old: S, new: S) -> None:
        if new is S.RUNNING:
            self.now += self._durations.pop(0) if self._durations else 0.0


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[Callable[..., Runtime]]:
    """Build runtimes on a real HTTP session and reaper, both closed after the test, with a
    source cache and builds of their own in ``tmp_path``."""
    async with aiohttp.ClientSession() as session:
        reaper = Reaper()
        try:
            # no jitter: the tests check the backoff series itself
            yield lambda **kw: Runtime(
                session=session, reaper=reaper, base_env=dict(os.environ),
                sources=SourceCache(tmp_path / "cache", session),
                builds=Builds(tmp_path / "builds", reaper), jitter=lambda: 0.0, **kw,
            )
        finally:
            reaper.close()


async def run_with_fake_time(
    runtime: Callable[..., Runtime], url: str, workdir: Path, fake: FakeTime,
    backoff: Backoff,
) -> list[S]:
    """Run a watcher with the ``backoff`` option under ``fake`` time until it parks in a
    sleep, stop it; return its states."""
    watcher = Watcher(
        dataclasses.replace(spec(url), options=Options(backoff=backoff)), workdir,
        runtime(clock=fake.clock, sleep=fake.sleep),
    )
    watcher.add_listener(fake.listener)
    seen = record_states(watcher)
    watcher.start()
    try:
        async with asyncio.timeout(10):
            await fake.parked.wait()
    finally:
        await watcher.stop()
    return seen


async def test_crash_loop_delays_double_up_to_the_maximum(
    runtime: Callable[..., Runtime], archive_server: ArchiveServer, tmp_path: Path
) -> None:
    """Each quick exit doubles the delay before the next start, up to the policy's maximum."""
    url = serve(archive_server, "web: exit 1\n")
    fake = FakeTime(durations=[], sleeps=6)

    seen = await run_with_fake_time(runtime, url, tmp_path / "w", fake,
                                    Backoff(initial=0.1, maximum=1.0))

    assert fake.delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert seen[2:5] == [S.STARTING, S.RUNNING, S.BACKOFF]
    assert seen.count(S.BACKOFF) == 7  # the seventh is the parked sleep
    assert seen[-2:] == [S.STOPPING, S.STOPPED]


async def test_long_run_resets_the_delay_and_restarts_at_once(
    runtime: Callable[..., Runtime], archive_server: ArchiveServer, tmp_path: Path
) -> None:
    """A run of at least reset_after seconds restarts without backoff and resets the delay."""
    url = serve(archive_server, "web: exit 1\n")
    fake = FakeTime(durations=[0.0, 0.0, 1.0, 0.0], sleeps=3)

    seen = await run_with_fake_time(runtime, url, tmp_path / "w", fake, Backoff())

    assert fake.delays == pytest.approx([0.1, 0.2, 0.1])
    runs = seen[2:seen.index(S.STOPPING)]
    assert runs == [
        S.STARTING, S.RUNNING, S.BACKOFF,  # quick
        S.STARTING, S.RUNNING, S.BACKOFF,  # quick
        S.STARTING, S.RUNNING,  # long: straight back to starting
        S.STARTING, S.RUNNING, S.BACKOFF,  # quick again: the first delay
        S.STARTING, S.RUNNING, S.BACKOFF,  # parked in the fourth sleep
    ]


async def test_command_not_found_fails_with_an_error(
    agent: Agent, archive_server: ArchiveServer
) -> None:
    """A command the shell cannot find makes the process fail instead of restarting."""
    url = serve(archive_server, "web: no-such-command-here --flag\n")
    watcher = agent.create(spec(url))
    seen = record_states(watcher)

    await wait_for_state(watcher, S.FAILED)

    assert watcher.error is not None
    assert "cannot run" in watcher.error
    assert "no-such-command-here" in watcher.error  # the shell's message is quoted
    assert watcher.restarts == 0
    assert watcher.last_exit == Exit(127)
    assert seen == [S.DOWNLOADING, S.UNPACKING, S.STARTING, S.RUNNING, S.FAILED]
    await agent.delete(watcher.spec.slug)
    assert watcher.state is S.STOPPED


@pytest.mark.parametrize("prefix", ["", "exec "], ids=["behind-shell", "exec"])
async def test_delete_sigkills_a_process_ignoring_sigterm_after_the_stop_timeout(
    archive_server: ArchiveServer, tmp_path: Path, prefix: str
) -> None:
    """Deleting a process that ignores SIGTERM ends it with SIGKILL after stop_timeout."""
    url = serve(archive_server, f"web: {prefix}{{PYTHON}} -u app.py\n", app=IGNORE_TERM)
    settings = Settings(stop_timeout=0.5, state_dir=tmp_path / "state")
    async with Agent(settings) as agent:
        watcher = agent.create(spec(url))
        app = ready_pid(await attach(watcher).nth(b"ready"))

        started = time.monotonic()
        await agent.delete(watcher.spec.slug)
        took = time.monotonic() - started

        assert 0.5 <= took < 3.0
        assert watcher.state is S.STOPPED
        assert agent.list() == []
        assert not watcher.workdir.exists()
        if prefix:
            assert watcher.last_exit == Exit(-signal.SIGKILL)
        await gone(app)


async def test_stop_during_download_leaves_nothing_behind(
    agent: Agent, archive_server: ArchiveServer
) -> None:
    """Stopping while the archive is still arriving ends in stopped with an empty work folder
    and no partial file in the source cache."""
    watcher = agent.create(spec(archive_server.url("stall")))
    seen = record_states(watcher)
    def parts() -> list[Path]:
        return list(agent.cache_dir.glob("*.part"))

    await eventually(lambda: bool(parts()), timeout=5.0, what="the partial download")

    await watcher.stop()

    assert seen == [S.DOWNLOADING, S.STOPPING, S.STOPPED]
    assert watcher.error is None
    assert list(watcher.workdir.iterdir()) == []
    assert parts() == []
    await agent.delete(watcher.spec.slug)
    assert not watcher.workdir.exists()


async def test_stop_during_unpacking_waits_for_the_unpacker(
    agent: Agent, archive_server: ArchiveServer
) -> None:
    """A stop while unpacking cancels it and returns once nothing writes to the work folder
    any more."""
    files: dict[str, str | bytes] = {f"dir{i // 50}/file{i}.txt": "x" for i in range(300)}
    files["Procfile"] = "web: exit 1\n"
    url = archive_server.add("big.tar", make_archive(files, "tar"))
    watcher = agent.create(spec(url))
    stopping: list[asyncio.Task[None]] = []

    def stop_on_unpacking(w: Watcher, old: S, new: S) -> None:
        if new is S.UNPACKING:
            stopping.append(asyncio.get_running_loop().create_task(w.stop()))

    watcher.add_listener(stop_on_unpacking)
    seen = record_states(watcher)
    await wait_for_state(watcher, S.STOPPED)
    await stopping[0]

    assert seen == [S.DOWNLOADING, S.UNPACKING, S.STOPPING, S.STOPPED]
    # stop() returned once the unpacker was done: cancelled (and cleaned up) or finished,
    # never half-way
    assert len(list((watcher.workdir / "source").rglob("*.txt"))) in (0, 300)
    await agent.delete(watcher.spec.slug)
    assert not watcher.workdir.exists()
    # once every worker thread is done, nothing has written there again
    await asyncio.get_running_loop().shutdown_default_executor()
    assert not watcher.workdir.exists()


async def test_environment_layers_agent_then_procfile_then_request(
    settings: Settings, archive_server: ArchiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request's variables beat the Procfile's, which beat the agent's; nothing else leaks."""
    monkeypatch.setenv("ONLY_IN_TEST_PROCESS", "leaked")
    base = {"PATH": os.environ["PATH"], "A": "agent", "B": "agent", "C": "agent"}
    url = serve(archive_server, "web: env B=procfile C=procfile {PYTHON} -u app.py\n",
                app=PRINT_ENV)
    async with Agent(settings, base_env=base) as agent:
        watcher = agent.create(spec(url, C="request"))
        output = attach(watcher)
        await output.nth(b"ready")

        assert output.lines[:5] == [
            b"A=agent", b"B=procfile", b"C=request", b"ONLY_IN_TEST_PROCESS=<unset>",
            f"agent {agent.id}".encode(),
        ]


async def test_request_cannot_hide_a_child_from_the_guardian(
    agent: Agent, archive_server: ArchiveServer
) -> None:
    """A request's env cannot override SMARTMOB_AGENT_ID, by which the guardian finds children."""
    url = serve(archive_server, "web: env SMARTMOB_AGENT_ID=procfile {PYTHON} -u app.py\n",
                app=PRINT_ENV)
    watcher = agent.create(spec(url, SMARTMOB_AGENT_ID="request"))
    output = attach(watcher)
    await output.nth(b"ready")
    assert f"agent {agent.id}".encode() in output.lines


async def test_leftover_work_folder_is_replaced(
    agent: Agent, archive_server: ArchiveServer
) -> None:
    """A work folder left by an earlier agent on the same state folder does not block a create."""
    url = serve(archive_server, "web: {PYTHON} -u app.py\n", app=WAIT_TERM)
    leftover = agent.processes_dir / "myapp.web.0" / "source"
    leftover.mkdir(parents=True)
    (leftover / "stale.txt").write_text("from before")
    watcher = agent.create(spec(url))
    await wait_for_state(watcher, S.RUNNING)
    assert not (watcher.workdir / "source" / "stale.txt").exists()


async def test_many_processes_stop_together(agent: Agent, archive_server: ArchiveServer) -> None:
    """Stopping the agent stops every process and every app behind them."""
    url = serve(archive_server, "web: {PYTHON} -u app.py\n", app=WAIT_TERM)
    watchers = [agent.create(spec(url, node=f"web.{i}")) for i in range(4)]
    outputs = [attach(w) for w in watchers]
    apps = [ready_pid(await output.nth(b"ready")) for output in outputs]
    shells = [w.info().pid for w in watchers]
    assert None not in shells

    await agent.stop_all()

    assert [w.state for w in watchers] == [S.STOPPED] * 4
    await gone(*apps, *(pid for pid in shells if pid is not None))


async def test_spawn_out_of_file_descriptors_backs_off_and_recovers(
    agent: Agent, archive_server: ArchiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spawn that fails for want of file descriptors is retried after a backoff, and the
    process runs once they are back, instead of failing for good."""
    url = serve(archive_server, "web: {PYTHON} -u app.py\n", app=WAIT_TERM)
    real_popen = subprocess.Popen
    failures = [OSError(errno.EMFILE, os.strerror(errno.EMFILE))] * 2

    def popen(*args: Any, **kwargs: Any) -> Any:
        if failures:  # the OS boundary: the first two spawns find no free descriptor
            raise failures.pop()
        return real_popen(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", popen)
    watcher = agent.create(spec(url))
    seen = record_states(watcher)
    await wait_for_state(watcher, S.RUNNING)
    assert seen.count(S.BACKOFF) == 2
    assert S.FAILED not in seen
    assert watcher.error is None


async def test_restart_kills_an_escaped_descendant_holding_the_pipes(
    agent: Agent, archive_server: ArchiveServer
) -> None:
    """A setsid descendant of a run that ended is killed before the next run, so its pipes
    (and its output) do not outlive it."""
    # the run ends only once the escapee has left the group (it wrote its pid after setsid)
    escape = (
        "web: rm -f esc.pid; (setsid sh -c 'echo $$ > esc.pid; exec sleep 1001' &);"
        " until [ -s esc.pid ]; do sleep 0.01; done; echo escaped $(cat esc.pid); exit 3\n"
    )
    url = serve(archive_server, escape)
    watcher = agent.create(spec(url))
    output = attach(watcher)
    first = int((await output.nth(b"escaped", 1)).split()[1])
    await output.nth(b"escaped", 2)
    await gone(first)


async def test_giving_up_kills_an_escaped_descendant_holding_the_pipes(
    agent: Agent, archive_server: ArchiveServer
) -> None:
    """A setsid descendant of the run after which the process fails is killed too: a
    later start must not find the old run's processes (and perhaps its port) alive."""
    escape = (
        "web: rm -f esc.pid; (setsid sh -c 'echo $$ > esc.pid; exec sleep 1001' &);"
        " until [ -s esc.pid ]; do sleep 0.01; done; echo escaped $(cat esc.pid); exit 3\n"
    )
    url = serve(archive_server, escape)
    watcher = agent.create(dataclasses.replace(spec(url), options=Options(max_restarts=0)))
    output = attach(watcher)
    escaped = int((await output.nth(b"escaped", 1)).split()[1])
    await wait_for_state(watcher, S.FAILED)
    assert not pid_alive(escaped)
    assert "exited with code 3" in (watcher.error or "")


async def test_delete_kills_daemons_that_left_group_and_parent(
    agent: Agent, archive_server: ArchiveServer
) -> None:
    """Delete stops daemonized descendants (double fork, setsid, pipes closed) of the
    current run and of runs that ended, which neither group nor tree still reaches."""
    daemon = "(setsid sh -c 'echo daemon $$; exec sleep 1002 >/dev/null 2>&1 </dev/null' &)"
    url = serve(archive_server, f"web: {daemon}; sleep 0.3; exit 3\n")
    watcher = agent.create(spec(url))
    output = attach(watcher)
    await output.nth(b"daemon", 2)  # one daemon per run: the first run's is still there
    pids = [int(line.split()[1]) for line in output.starting(b"daemon")]
    assert pid_alive(pids[0])
    await agent.delete(watcher.spec.slug)
    await gone(*pids)
