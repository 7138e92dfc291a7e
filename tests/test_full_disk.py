"""A full state disk, for real: the ``smartmob-agent`` command on a small tmpfs.

Each test mounts a 20 MiB tmpfs (which needs root: elsewhere they are skipped, saying
why), runs the real agent with its state folder there, fills the file system with a big
file, and follows what the API answers, what the agent logs and what a new agent on the
same folder brings back. The rule under test (see ``docs/operations.rst``): what the agent
could not record is not done, so the client may try again, and no agent restart ever
brings back what the API said was gone.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp
import pytest

from tests.agent_process import AgentProcess
from tests.conftest import ArchiveServer
from tests.helpers import app_archive, eventually

#: The size of the file system the state folder is on.
DISK_SIZE = "20m"
#: ``sleep`` ends on the stop signal at once; ``crash`` exits at once, restarted every
#: 50 ms, so that it writes to the database (its child, its exits) all along; ``talk``
#: writes lines all along (its output log soon cannot be written either).
PROCFILE = (
    "web: exec sleep 1000\ncrash: exit 3\ntalk: while :; do seq 1 100; sleep 0.05; done\n"
)
DEADLINE = 20.0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of :data:`DISK_SIZE` mounted for the test, unmounted after it."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE},mode=0755", "tmpfs", str(folder)],
        capture_output=True, text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.fixture
async def agents() -> AsyncIterator[list[AgentProcess]]:
    """The agents a test starts, killed at the end if they still run."""
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        await agent.kill()


def fill(disk: Path) -> Path:
    """Fill the file system of ``disk`` with one file; return it."""
    path = disk / "filler"
    with open(path, "wb", buffering=0) as file:
        for size in (1 << 20, 4096, 1):
            while _wrote(file, size):
                pass
    return path


def _wrote(file: BinaryIO, size: int) -> bool:
    """Write ``size`` bytes; ``False`` once the disk is full."""
    try:
        file.write(b"\0" * size)
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        return False
    return True


async def call(
    http: aiohttp.ClientSession, method: str, url: str, body: Any = None
) -> tuple[int, Any]:
    """The status and JSON body of a request (a POST sends ``body``, ``{}`` by default)."""
    data = None if method == "GET" else json.dumps({} if body is None else body)
    async with http.request(method, url, data=data) as response:
        return response.status, await response.json()


async def create(
    http: aiohttp.ClientSession, agent: AgentProcess, source_url: str, node: str,
    status: int = 201, **fields: Any,
) -> dict[str, Any]:
    """Create ``shop.<node>`` (a ``web`` process unless ``fields`` say otherwise)."""
    _, links = await call(http, "GET", agent.url + "/")
    body = {"app": "shop", "node": node, "process_type": "web", "source_url": source_url,
            **fields}
    got, document = await call(http, "POST", links["create"], body)
    assert got == status, document
    return dict(document)


async def status_of(http: aiohttp.ClientSession, agent: AgentProcess, slug: str) -> Any:
    got, document = await call(http, "GET", f"{agent.url}/process-status/{slug}")
    assert got == 200, document
    return document


async def wait_for(
    http: aiohttp.ClientSession, agent: AgentProcess, slug: str,
    test: Callable[[dict[str, Any]], bool], what: str,
) -> dict[str, Any]:
    """Follow the status of ``slug`` until ``test`` holds of it."""
    document: dict[str, Any] = {}
    try:
        async with asyncio.timeout(DEADLINE):
            while True:
                document = await status_of(http, agent, slug)
                if test(document):
                    return document
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"{slug} did not get {what}: {document}") from None


async def wait_until(
    http: aiohttp.ClientSession, agent: AgentProcess, slug: str, state: str,
    **fields: Any,
) -> dict[str, Any]:
    """Follow the status of ``slug`` until it is in ``state`` (with ``fields``)."""
    return await wait_for(http, agent, slug, lambda document: document["state"] == state and all(
        document[name] == value for name, value in fields.items()
    ), f"{state} {fields}")


async def stopped(agent: AgentProcess) -> None:
    """Stop the agent as systemd does (SIGINT here), and check it exits 0."""
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGINT)
    assert await agent.wait() == 0, agent.stderr


def logged(agent: AgentProcess, since: int, *parts: str) -> list[str]:
    """The lines the agent logged after its ``since`` first lines that hold one of
    ``parts``."""
    lines = b"".join(agent.stderr_lines[since:]).decode(errors="replace").splitlines()
    return [line for line in lines if any(part in line for part in parts)]


async def until_logged(agent: AgentProcess, since: int, part: str) -> None:
    await eventually(lambda: bool(logged(agent, since, part)), timeout=DEADLINE,
                     what=f"the agent to log {part!r}")


@pytest.mark.timeout(300)
async def test_what_a_full_disk_cannot_record_is_not_done_and_nothing_comes_back(
    small_disk: Path, archive_server: ArchiveServer, agents: list[AgentProcess],
) -> None:
    """On a full disk, a stop, a delete, a create and a start of a stopped process are
    answered 503 ("no space left on device") and not done: the process runs on with the
    same child, a deleted one is still there (a retry is 503, not 404) with its files;
    a restart of a running process, which changes nothing recorded, is done. A crash loop
    that writes at every restart costs one log line, not one per write. Once space is
    freed, that is said once, the writes left behind are made (the process's ``error``
    clears), the same requests succeed, and a new agent brings back exactly what the API
    said: the deleted process does not come back, the stopped one stays stopped, and the
    exit of the restart made while the disk was full is there."""
    url = archive_server.add("app.tgz", app_archive(PROCFILE))
    state_dir = small_disk / "state"
    agent = await AgentProcess(state_dir).start()
    agents.append(agent)
    async with aiohttp.ClientSession() as http:
        docs = {node: await create(http, agent, url, node) for node in ("keep.0", "stop.0")}
        docs["doomed.0"] = await create(http, agent, url, "doomed.0", process_type="talk")
        docs["resting.0"] = await create(http, agent, url, "resting.0", autostart=False)
        await create(http, agent, url, "crash.0", process_type="crash",
                     backoff={"initial": 0.05, "max": 0.05})
        pids = {node: (await wait_until(http, agent, f"shop.{node}", "running"))["pid"]
                for node in ("keep.0", "stop.0", "doomed.0")}
        filler = fill(small_disk)
        mark = len(agent.stderr_lines)
        crashes = (await status_of(http, agent, "shop.crash.0"))["restarts"]

        for link, node in (("stop", "stop.0"), ("delete", "doomed.0"), ("delete", "doomed.0"),
                           ("start", "resting.0")):
            got, answer = await call(http, "POST", docs[node][link])
            assert got == 503, answer
            assert "no space left on device" in answer["error"], answer
            assert "aside" not in answer["error"], answer
        refused = await create(http, agent, url, "new.0", status=503)
        assert "no space left on device" in refused["error"]
        for node in ("stop.0", "doomed.0"):
            await wait_until(http, agent, f"shop.{node}", "running", pid=pids[node])
        doomed = await status_of(http, agent, "shop.doomed.0")
        assert "no space left on device" in doomed["error"]
        assert "(it is not deleted)" in doomed["error"]
        assert (state_dir / "processes" / "shop.doomed.0").is_dir()
        await wait_until(http, agent, "shop.resting.0", "stopped")
        got, _ = await call(http, "GET", f"{agent.url}/process-status/shop.new.0")
        assert got == 404
        got, _ = await call(http, "POST", docs["keep.0"]["restart"])
        assert got == 200
        kept = await status_of(http, agent, "shop.keep.0")
        assert kept["pid"] != pids["keep.0"]
        assert "its current child is not recorded" in kept["error"]
        # the crash loop keeps writing (its child, its exits) all along, and the output
        # of the talker (with that of the agent's own log) cannot be written either
        await wait_for(http, agent, "shop.crash.0", lambda d: d["restarts"] >= crashes + 20,
                       "20 more restarts")
        await until_logged(agent, mark, "logs/shop.doomed.0/output.log")
        said = logged(agent, mark, "state database")
        assert len(said) == 1, said
        assert "ERROR" in said[0], said
        assert "no space left on device" in said[0], said
        # said once each: the database, the talker's log file, maybe the agent's own
        warned = logged(agent, mark, " WARNING ", " ERROR ")
        assert len(warned) <= 3, warned

        filler.unlink()
        await wait_until(http, agent, "shop.keep.0", "running", error=None)
        for link, node, status in (("stop", "stop.0", 200), ("delete", "doomed.0", 200),
                                   ("start", "resting.0", 200)):
            got, answer = await call(http, "POST", docs[node][link])
            assert got == status, answer
        got, _ = await call(http, "GET", f"{agent.url}/process-status/shop.doomed.0")
        assert got == 404
        assert not (state_dir / "processes" / "shop.doomed.0").exists()
        assert not (state_dir / "logs" / "shop.doomed.0").exists()
        await create(http, agent, url, "new.0")
        await wait_until(http, agent, "shop.stop.0", "stopped")
        await wait_until(http, agent, "shop.new.0", "running")
        said = logged(agent, mark, "state database")
        assert len(said) == 2, said
        assert "can be written again" in said[1], said
        await stopped(agent)

        again = await AgentProcess(state_dir).start()
        agents.append(again)
        _, listing = await call(http, "GET", again.url + "/list-processes")
        assert [p["slug"] for p in listing["processes"]] == [
            "shop.keep.0", "shop.stop.0", "shop.resting.0", "shop.crash.0", "shop.new.0"]
        assert (await status_of(http, again, "shop.stop.0"))["state"] == "stopped"
        for node in ("keep.0", "resting.0", "new.0"):
            await wait_until(http, again, f"shop.{node}", "running")
        kept = await status_of(http, again, "shop.keep.0")
        assert [(e["signal"], e["reason"]) for e in kept["exits"]] == [
            ("SIGTERM", "restarted"), ("SIGTERM", "stopped")]
        assert not (state_dir / "processes" / "shop.doomed.0").exists()
        await stopped(again)


def start_agent(state_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "smartmob_agent", "--port", "0", "--state-dir", str(state_dir)],
        capture_output=True, text=True, timeout=60,
    )


def refusal(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a start refused for want of space says."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("smartmob-agent:")]
    assert len(lines) == 1, result.stderr
    assert "no space left on device" in lines[0], lines[0]
    assert "aside" not in result.stderr, result.stderr
    return lines[0]


@pytest.mark.timeout(120)
async def test_a_start_on_a_full_disk_says_so_and_keeps_every_process(
    small_disk: Path, archive_server: ArchiveServer, agents: list[AgentProcess],
) -> None:
    """An agent started on a full disk exits 1 with one line that names the database,
    says "no space left on device" and does not advise moving the database aside (that
    would lose every process); the database is left as it was, and once space is freed
    the next agent brings its process back. A state folder made on a full disk gets the
    same message."""
    url = archive_server.add("app.tgz", app_archive(PROCFILE))
    state_dir = small_disk / "state"
    first = await AgentProcess(state_dir).start()
    agents.append(first)
    async with aiohttp.ClientSession() as http:
        await create(http, first, url, "web.0")
        await wait_until(http, first, "shop.web.0", "running")
        await stopped(first)
        database = (state_dir / "agent.db").read_bytes()
        filler = fill(small_disk)
        line = refusal(await asyncio.to_thread(start_agent, state_dir))
        assert str(state_dir / "agent.db") in line
        assert (state_dir / "agent.db").read_bytes() == database
        refusal(await asyncio.to_thread(start_agent, small_disk / "fresh"))
        filler.unlink()
        second = await AgentProcess(state_dir).start()
        agents.append(second)
        await wait_until(http, second, "shop.web.0", "running")
        await stopped(second)
