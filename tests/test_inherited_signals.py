"""Signals the agent was started with ignored (``nohup``, ``&`` in a script) are not
passed on ignored to its children: a ``signal`` control's SIGHUP must reach the app."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp

from tests.agent_process import AgentProcess
from tests.conftest import ArchiveServer
from tests.helpers import app_archive

#: SIGHUP and SIGQUIT in the ``SigIgn`` mask of /proc/<pid>/status (bit n-1 for signal n).
MASK = (1 << (signal.SIGHUP - 1)) | (1 << (signal.SIGQUIT - 1))


def ignored_mask(pid: int) -> int:
    """The ``SigIgn`` mask of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no SigIgn line for pid {pid}")


async def test_children_of_an_agent_started_under_nohup_can_get_sighup(
    tmp_path: Path, http: aiohttp.ClientSession, archive_server: ArchiveServer
) -> None:
    url = archive_server.add("mask.tgz", app_archive(
        "web: grep SigIgn /proc/self/status; exec sleep 1000\n"
    ))
    agent = AgentProcess(tmp_path / "s")
    saved = {number: signal.signal(number, signal.SIG_IGN) for number in (signal.SIGHUP,
                                                                          signal.SIGQUIT)}
    try:  # the agent inherits the ignores, as under nohup
        await agent.start()
    finally:
        for number, handler in saved.items():
            signal.signal(number, handler)
    try:
        agent_ignores = ignored_mask(agent.pid)
        assert agent_ignores & MASK == 0  # handled by the agent, no longer ignored
        body = {"app": "sig", "node": "web.0", "process_type": "web", "source_url": url}
        async with http.post(agent.url + "/create-process", json=body) as response:
            assert response.status == 201, await response.text()
            logs = (await response.json())["logs"]
        lines: list[str] = []
        async with asyncio.timeout(15):
            while not lines:
                async with http.get(logs) as response:
                    lines = [e["line"] for e in await response.json() if "SigIgn" in e["line"]]
                if not lines:
                    await asyncio.sleep(0.05)  # the log has no event to wait on
        child_ignores = int(lines[0].split()[1], 16)
        assert child_ignores & MASK == 0, lines[0]
    finally:
        await agent.kill()
