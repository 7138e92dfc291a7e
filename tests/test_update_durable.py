"""An agent SIGKILLed in the middle of an update comes back with exactly one child of one
version: the real ``smartmob-agent`` command, killed at each step of an update (during
the fetch, once the new child started, while the old one stops), then started again on
the same state folder.

Every child carries ``TEST_MARK`` (a value of the test's own) in its environment, so the
test counts the live children of the process wherever they came from.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from smartmob_agent.processes.proctable import marked_processes
from tests.agent_process import AgentProcess
from tests.conftest import ArchiveServer
from tests.helpers import app_archive, eventually, pid_alive

#: Says which version it is in a file named after it (in ``$MARKS``), then runs; on
#: SIGTERM, a version with ``STUBBORN`` set says so in a file and runs on (the agent
#: kills it after its stop timeout).
APP = """
import os, pathlib, signal, sys, time
marks = pathlib.Path(os.environ["MARKS"])
def on_term(*_):
    if os.environ.get("STUBBORN") == "VERSION":
        (marks / "VERSION-stopping").write_text(str(os.getpid()))
    else:
        sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
(marks / "VERSION-started").write_text(str(os.getpid()))
while True:
    time.sleep(60)
"""


def version(archives: ArchiveServer, name: str) -> str:
    """Serve the app saying ``name``; its URL."""
    return archives.add(f"{name}.tar.gz", app_archive(
        "web: {PYTHON} -u app.py\n", {"app.py": APP.replace("VERSION", name)}))


def live_children(mark: str) -> list[int]:
    """The live processes of the test's app (whatever agent started them)."""
    return [p for p in marked_processes(f"TEST_MARK={mark}".encode()) if pid_alive(p)]


async def status(http: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    """The status document of ``shop.web.0``."""
    async with http.get(f"{base}/process-status/shop.web.0") as response:
        document: dict[str, Any] = await response.json()
        return document


@pytest.fixture
async def sandbox(
    tmp_path: Path, http: aiohttp.ClientSession,
) -> AsyncIterator[Callable[[], Awaitable[AgentProcess]]]:
    """Starts real agents on one state folder; kills them, and any child left, at the end."""
    agents: list[AgentProcess] = []

    async def start() -> AgentProcess:
        agent = AgentProcess(tmp_path / "state", ["--stop-timeout", "2"])
        agents.append(agent)
        return await agent.start()

    yield start
    for agent in agents:
        await agent.kill()


async def run_v1(
    http: aiohttp.ClientSession, agent: AgentProcess, archives: ArchiveServer,
    marks: Path, mark: str,
) -> dict[str, Any]:
    """Create ``shop.web.0`` from v1 (stubborn on stop, with a long stop timeout) and
    wait until it runs."""
    await asyncio.to_thread(marks.mkdir)
    body = {"app": "shop", "node": "web.0", "process_type": "web",
            "source_url": version(archives, "v1"), "start_seconds": 0.2, "stop_timeout": 30,
            "env": {"MARKS": str(marks), "TEST_MARK": mark, "STUBBORN": "v1"}}
    async with http.post(f"{agent.url}/create-process", data=json.dumps(body)) as response:
        assert response.status == 201, await response.text()
    await eventually(lambda: (marks / "v1-started").exists(), what="v1 to start")
    return await status(http, agent.url)


async def update(
    http: aiohttp.ClientSession, agent: AgentProcess, url: str, **options: Any
) -> None:
    """POST the update link of ``shop.web.0`` (its env kept)."""
    document = await status(http, agent.url)
    body = {"source_url": url, "options": {"stop_timeout": 30, **options}}
    async with http.post(document["update"], json=body) as response:
        assert response.status == 202, await response.text()


async def comes_back(
    http: aiohttp.ClientSession, start: Callable[[], Awaitable[AgentProcess]],
    first: AgentProcess, mark: str,
) -> dict[str, Any]:
    """SIGKILL ``first``, start a new agent; once the process runs again, its status,
    checked to have exactly one live child."""
    await first.kill()
    second = await start()
    document = await status(http, second.url)
    async with asyncio.timeout(15):
        while document["state"] != "running":  # polled: no event reaches the test
            await asyncio.sleep(0.02)
            document = await status(http, second.url)
    await eventually(lambda: live_children(mark) == [document["pid"]],
                     what="exactly one live child, the status document's")
    return document


async def test_killed_during_the_fetch_comes_back_with_the_old_version(
    tmp_path: Path, http: aiohttp.ClientSession, archive_server: ArchiveServer,
    sandbox: Callable[[], Awaitable[AgentProcess]],
) -> None:
    """Killed while the new source downloads (a stalled download): the old version runs,
    once, and ``update_error`` says the update was cut short."""
    mark, marks = uuid.uuid4().hex, tmp_path / "marks"
    first = await sandbox()
    before = await run_v1(http, first, archive_server, marks, mark)
    await update(http, first, archive_server.url("stall"))
    await eventually(lambda: archive_server.hits("stall") > 0, what="the download to begin")
    after = await comes_back(http, sandbox, first, mark)
    assert after["source"]["url"] == before["source"]["url"]
    assert after["pending_source"] is None
    assert after["update_reason"] == "interrupted"
    assert "cut short" in after["update_error"]


async def test_killed_once_the_new_child_started_comes_back_with_the_old_version(
    tmp_path: Path, http: aiohttp.ClientSession, archive_server: ArchiveServer,
    sandbox: Callable[[], Awaitable[AgentProcess]],
) -> None:
    """Killed while the new child is in its gate (start_seconds 30): the switch was not
    recorded, so the old version comes back, once; the new child is gone."""
    mark, marks = uuid.uuid4().hex, tmp_path / "marks"
    first = await sandbox()
    before = await run_v1(http, first, archive_server, marks, mark)
    await update(http, first, version(archive_server, "v2"), start_seconds=30)
    await eventually(lambda: (marks / "v2-started").exists(), what="v2 to start")
    v2_pid = int((marks / "v2-started").read_text())
    after = await comes_back(http, sandbox, first, mark)
    assert after["source"]["url"] == before["source"]["url"]
    assert after["update_reason"] == "interrupted"
    assert not pid_alive(v2_pid)
    assert "releases" not in os.readlink(f"/proc/{after['pid']}/cwd")


async def test_killed_while_the_old_child_stops_comes_back_with_the_new_version(
    tmp_path: Path, http: aiohttp.ClientSession, archive_server: ArchiveServer,
    sandbox: Callable[[], Awaitable[AgentProcess]],
) -> None:
    """Killed while the old child takes its stop timeout (it ignores SIGTERM): the
    switch was recorded first, so the new version comes back, once."""
    mark, marks = uuid.uuid4().hex, tmp_path / "marks"
    first = await sandbox()
    before = await run_v1(http, first, archive_server, marks, mark)
    v2 = version(archive_server, "v2")
    await update(http, first, v2, start_seconds=0.2)
    await eventually(lambda: (marks / "v1-stopping").exists(), timeout=15,
                     what="v1 to be told to stop")
    after = await comes_back(http, sandbox, first, mark)
    assert after["source"]["url"] == v2
    assert after["previous_source"]["url"] == before["source"]["url"]
    assert after["update_error"] is None
    assert "releases" in os.readlink(f"/proc/{after['pid']}/cwd")
