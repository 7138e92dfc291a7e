"""The real ``smartmob-agent`` command in a subprocess: start, serve, signals, children."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from smartmob_agent import __version__
from tests.agent_process import AgentProcess
from tests.conftest import ArchiveServer
from tests.helpers import app_archive, eventually

#: Children and grandchildren, one of which leaves the process group.
FAMILY = (
    "web: sleep 1000 & setsid sleep 1001 & echo started; wait\n"
    "pair: sleep 1000 & sleep 1000\n"
)


@pytest.fixture
async def agent_process(tmp_path: Path) -> AsyncIterator[AgentProcess]:
    process = await AgentProcess(tmp_path / "state").start()
    yield process
    await process.kill()


async def create(http: aiohttp.ClientSession, base: str, **fields: Any) -> Any:
    async with http.get(base + "/") as response:
        links = await response.json()
    body = {"app": "e2e", "node": "web.0", "process_type": "web", **fields}
    async with http.post(links["create"], data=json.dumps(body)) as response:
        assert response.status == 201, await response.text()
        return await response.json()


async def wait_running(http: aiohttp.ClientSession, details: str) -> dict[str, Any]:
    """Follow the status document until the process runs (10 s deadline)."""
    async with asyncio.timeout(10):
        while True:
            async with http.get(details) as response:
                status: dict[str, Any] = await response.json()
            if status["state"] == "running":
                return status
            assert status["state"] != "failed", status
            await asyncio.sleep(0.01)


def family_of(pid: int) -> list[int]:
    """The pids of ``pid`` and all its descendants."""
    root = psutil.Process(pid)
    return [pid, *(child.pid for child in root.children(recursive=True))]


def gone(pid: int) -> bool:
    """Whether ``pid`` no longer runs (exited, or a zombie waiting to be reaped)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def start_family(
    http: aiohttp.ClientSession, agent: AgentProcess, archive_server: ArchiveServer
) -> list[int]:
    """Create both family processes; return every pid of theirs (at least 5)."""
    url = archive_server.add("family.tgz", app_archive(FAMILY))
    pids: list[int] = []
    for node, process_type in (("web.0", "web"), ("pair.0", "pair")):
        document = await create(http, agent.url, node=node, process_type=process_type,
                                source_url=url)
        status = await wait_running(http, document["details"])

        def grandchildren_started(pid: int = status["pid"]) -> bool:
            return len(family_of(pid)) >= 3

        await eventually(grandchildren_started, what="the grandchildren to start")
        pids += family_of(status["pid"])
    assert len(pids) >= 6
    return pids


def test_version_and_help() -> None:
    """--version prints the version and --help the usage, both exiting 0."""
    run = [sys.executable, "-m", "smartmob_agent"]
    version = subprocess.run([*run, "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.strip() == f"smartmob-agent {__version__}"
    usage = subprocess.run([*run, "--help"], capture_output=True, text=True, check=True)
    for flag in ("--host", "--port", "--state-dir", "SMARTMOB_PORT", "--version"):
        assert flag in usage.stdout


def test_bad_option_is_a_clear_error(tmp_path: Path) -> None:
    """An invalid option value, from a flag or the environment, exits 2 naming it."""
    run = [sys.executable, "-m", "smartmob_agent", "--state-dir", str(tmp_path)]
    result = subprocess.run([*run, "--port", "99999"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "--port" in result.stderr
    env = {**os.environ, "SMARTMOB_STOP_TIMEOUT": "-1"}
    result = subprocess.run(run, capture_output=True, text=True, env=env)
    assert result.returncode == 2
    assert "SMARTMOB_STOP_TIMEOUT" in result.stderr


def test_unusable_state_folder_is_a_clear_error(tmp_path: Path) -> None:
    """A state folder that cannot be created exits 1 with one line, not a traceback."""
    (tmp_path / "file").write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "smartmob_agent", "--port", "0",
         "--state-dir", str(tmp_path / "file" / "state")],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 1
    assert "cannot use the state folder" in result.stderr
    assert "Traceback" not in result.stderr


async def test_port_in_use_is_a_clear_error(tmp_path: Path, agent_process: AgentProcess) -> None:
    """A second agent on a busy port exits 1 saying it cannot listen."""
    port = agent_process.url.rsplit(":", 1)[1]
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "smartmob_agent", "--port", port, "--state-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


async def test_environment_configures_and_flags_win(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """SMARTMOB_* variables configure the agent, and a flag wins over its variable."""
    env = {**os.environ, "SMARTMOB_LOG_LEVEL": "debug",
           "SMARTMOB_STATE_DIR": str(tmp_path / "from-env")}
    agent = AgentProcess(tmp_path / "from-flag", env=env)
    try:
        await agent.start()
        assert (tmp_path / "from-flag").is_dir()
        assert not (tmp_path / "from-env").exists()
        async with http.get(agent.url + "/list-processes") as response:
            assert await response.json() == {"processes": []}
        await eventually(lambda: "DEBUG" in agent.stderr, what="a debug log line")
    finally:
        await agent.kill()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_signal_stops_every_child_then_exits_0(
    agent_process: AgentProcess, http: aiohttp.ClientSession, archive_server: ArchiveServer,
    sig: signal.Signals,
) -> None:
    """SIGINT or SIGTERM stops every child and grandchild, then the agent exits 0."""
    pids = await start_family(http, agent_process, archive_server)
    os.kill(agent_process.pid, sig)
    assert await agent_process.wait() == 0
    assert all(gone(pid) for pid in pids), [p for p in pids if not gone(p)]
    assert "stopped" in agent_process.stderr


async def test_sigkill_of_the_agent_kills_every_descendant(
    agent_process: AgentProcess, http: aiohttp.ClientSession, archive_server: ArchiveServer,
) -> None:
    """SIGKILL of the agent leaves no child or grandchild alive after 2 s."""
    pids = await start_family(http, agent_process, archive_server)
    os.kill(agent_process.pid, signal.SIGKILL)
    await agent_process.wait()
    await eventually(lambda: all(gone(pid) for pid in pids), timeout=2.0,
                     what="every descendant to die")


async def test_delete_reaches_descendants_that_left_the_group(
    agent_process: AgentProcess, http: aiohttp.ClientSession, archive_server: ArchiveServer,
) -> None:
    """Delete stops a setsid grandchild too, and the agent reaps it (no zombie)."""
    url = archive_server.add("family.tgz", app_archive(FAMILY))
    document = await create(http, agent_process.url, source_url=url)
    status = await wait_running(http, document["details"])
    await eventually(lambda: len(family_of(status["pid"])) >= 3, what="grandchildren")
    pids = family_of(status["pid"])
    async with http.post(document["delete"], data="{}") as response:
        assert response.status == 200
    assert all(gone(pid) for pid in pids)
    await eventually(lambda: not any(psutil.pid_exists(pid) for pid in pids),
                     what="every stopped process to be reaped")


async def test_orphans_are_reaped(
    agent_process: AgentProcess, http: aiohttp.ClientSession, archive_server: ArchiveServer,
) -> None:
    """A grandchild orphaned while the process runs is reaped by the agent when it exits."""
    orphan = (
        "web: mkfifo fifo && (setsid sh -c 'echo $$ > orphan.pid; read line < fifo' &) ;"
        " exec sleep 1000\n"
    )
    url = archive_server.add("orphan.tgz", app_archive(orphan))
    document = await create(http, agent_process.url, source_url=url)
    await wait_running(http, document["details"])
    source = agent_process.state_dir / "processes" / "e2e.web.0" / "source"
    await eventually(lambda: (source / "orphan.pid").exists()
                     and (source / "orphan.pid").read_text().strip() != "",
                     what="the orphan to start")
    pid = int((source / "orphan.pid").read_text())
    assert psutil.Process(pid).ppid() == agent_process.pid  # adopted by the subreaper
    fd = os.open(source / "fifo", os.O_WRONLY)  # let the orphan finish
    os.write(fd, b"bye\n")
    os.close(fd)
    await eventually(lambda: not psutil.pid_exists(pid), what="the orphan to be reaped")
