"""The real ``smartmob-agent`` command at its edges: what a start that cannot listen leaves
behind, and what a shutdown says."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp

from tests.agent_process import AgentProcess
from tests.conftest import ArchiveServer
from tests.helpers import app_archive, pid_alive

SLEEPER = "web: exec sleep 1000\nworker: exec sleep 1000\n"


async def run_process(
    http: aiohttp.ClientSession, agent: AgentProcess, url: str, process_type: str
) -> dict[str, object]:
    """Create ``process_type`` of app ``cmd`` from ``url``; return its status once running."""
    body = {"app": "cmd", "node": f"{process_type}.0", "process_type": process_type,
            "source_url": url}
    async with http.post(agent.url + "/create-process", json=body) as response:
        assert response.status == 201, await response.text()
        details = (await response.json())["details"]
    async with asyncio.timeout(15):
        while True:
            async with http.get(details) as response:
                status: dict[str, object] = await response.json()
            if status["state"] == "running":
                return status
            assert status["state"] not in {"failed", "exited"}, status
            await asyncio.sleep(0.02)  # no event to wait on from outside the agent


def second_agent(port: str, state_dir: Path) -> subprocess.CompletedProcess[str]:
    """Run another ``smartmob-agent`` on ``port``, which is taken; return once it exits."""
    return subprocess.run(
        [sys.executable, "-m", "smartmob_agent", "--port", port, "--state-dir",
         str(state_dir)],
        capture_output=True, text=True, timeout=60, check=False,
    )


async def test_shutdown_says_stopping_once(
    tmp_path: Path, http: aiohttp.ClientSession, archive_server: ArchiveServer
) -> None:
    """SIGINT to an agent with two processes logs "stopping 2 process(es)" once, not once
    for the command and once more for the agent's own close."""
    url = archive_server.add("sleepers.tgz", app_archive(SLEEPER))
    agent = await AgentProcess(tmp_path / "state").start()
    try:
        for process_type in ("web", "worker"):
            await run_process(http, agent, url, process_type)
        os.kill(agent.pid, signal.SIGINT)
        assert await agent.wait() == 0, agent.stderr
    finally:
        await agent.kill()
    assert agent.stderr.count("stopping 2 process(es)") == 1, agent.stderr
    assert agent.stderr.count("process(es)") == 1, agent.stderr


async def test_a_taken_port_leaves_no_state_folder(tmp_path: Path) -> None:
    """A second agent whose port is taken exits 1 without creating its state folder."""
    first = await AgentProcess(tmp_path / "first").start()
    try:
        port = first.url.rsplit(":", 1)[1]
        result = await asyncio.to_thread(second_agent, port, tmp_path / "second")
    finally:
        await first.kill()
    assert result.returncode == 1, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert not (tmp_path / "second").exists(), sorted(
        str(p.relative_to(tmp_path)) for p in (tmp_path / "second").rglob("*"))


async def test_a_taken_port_leaves_the_running_agent_alone(
    tmp_path: Path, http: aiohttp.ClientSession, archive_server: ArchiveServer
) -> None:
    """The same command started twice in one folder (same state folder, same port): the
    second exits 1 with one line, and the first agent's process runs on untouched (the
    second neither stops it, as it would a crashed agent's, nor takes the database)."""
    url = archive_server.add("sleepers.tgz", app_archive(SLEEPER))
    first = await AgentProcess(tmp_path / "state").start()
    try:
        before = await run_process(http, first, url, "web")
        port = first.url.rsplit(":", 1)[1]
        result = await asyncio.to_thread(second_agent, port, tmp_path / "state")
        assert result.returncode == 1, result.stderr
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert "previous agent" not in result.stderr, result.stderr
        assert isinstance(before["pid"], int)
        assert pid_alive(before["pid"])
        async with http.get(str(before["details"])) as response:
            after = await response.json()
        assert (after["state"], after["pid"], after["restarts"]) == (
            "running", before["pid"], 0)
        os.kill(first.pid, signal.SIGTERM)
        assert await first.wait() == 0, first.stderr
    finally:
        await first.kill()
    # the first agent's shutdown was its own: nothing said another agent had the database
    assert "Traceback" not in first.stderr, first.stderr
