"""Sequence numbers of output lines across restarts of the real agent, clean or SIGKILL.

The real ``smartmob-agent`` command runs in a subprocess; a child writes a numbered line
every 2 ms, and a WebSocket client follows it in JSON. A SIGKILL of the agent loses the
lines still in its write buffer (up to 0.2 s of them) although clients saw them: their
numbers must never be given again. Waits are on frames and states, with deadlines.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import aiohttp

from tests.agent_process import AgentProcess
from tests.conftest import ArchiveServer
from tests.helpers import app_archive

#: A numbered line every 2 ms until SIGTERM.
TICKER = """
import itertools, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
for i in itertools.count():
    print("tick", i, flush=True)
    time.sleep(0.002)
"""
SLUG = "clock.web.0"


async def running(http: aiohttp.ClientSession, agent: AgentProcess) -> dict[str, Any]:
    """The status document of the process once it runs (10 s deadline)."""
    async with asyncio.timeout(10):
        while True:
            async with http.get(f"{agent.url}/process-status/{SLUG}") as response:
                document: dict[str, Any] = await response.json()
            assert document["state"] not in ("failed", "exited"), document
            if document["state"] == "running":
                return document
            await asyncio.sleep(0.02)


async def follow(
    http: aiohttp.ClientSession, document: dict[str, Any], count: int
) -> tuple[aiohttp.ClientWebSocketResponse, list[dict[str, Any]]]:
    """Attach in JSON and receive ``count`` lines; the open socket and the lines."""
    ws = await http.ws_connect(document["attach"] + "?format=json")
    lines: list[dict[str, Any]] = []
    async with asyncio.timeout(10):
        while len(lines) < count:
            message = await ws.receive()
            assert message.type == aiohttp.WSMsgType.TEXT, message
            frame = json.loads(message.data)
            if "seq" in frame:
                lines.append(frame)
    return ws, lines


async def drain(ws: aiohttp.ClientWebSocketResponse, lines: list[dict[str, Any]]) -> None:
    """Receive what the socket still delivers, until it closes."""
    async with asyncio.timeout(10):
        while (message := await ws.receive()).type == aiohttp.WSMsgType.TEXT:
            frame = json.loads(message.data)
            if "seq" in frame:
                lines.append(frame)
    await ws.close()


async def whole_log(http: aiohttp.ClientSession, document: dict[str, Any]) -> list[dict[str, Any]]:
    async with http.get(document["logs"] + "?tail=10000") as response:
        assert response.status == 200
        entries: list[dict[str, Any]] = await response.json()
    return entries


async def start(state_dir: Path, agents: list[AgentProcess]) -> AgentProcess:
    agent = AgentProcess(state_dir)
    agents.append(agent)  # killed at the end whatever happens
    return await agent.start()


async def start_ticking(
    state_dir: Path, agents: list[AgentProcess], http: aiohttp.ClientSession,
    archive_server: ArchiveServer,
) -> AgentProcess:
    """Start an agent and create the ``clock.web.0`` process, which ticks a line at a time."""
    url = archive_server.add("ticker.tgz", app_archive("web: exec {PYTHON} ticker.py\n",
                                                       {"ticker.py": TICKER}))
    agent = await start(state_dir, agents)
    body = {"app": "clock", "node": "web.0", "process_type": "web", "source_url": url}
    async with http.post(f"{agent.url}/create-process", data=json.dumps(body)) as response:
        assert response.status == 201, await response.text()
    return agent


async def test_seq_is_never_reused_after_a_sigkill_of_the_agent(
    tmp_path: Path, http: aiohttp.ClientSession, archive_server: ArchiveServer
) -> None:
    """Three times: a client sees lines up to seq M, the agent is SIGKILLed (its file
    losing the last lines, at least once), a new agent starts on the same folder: every
    new line is numbered above M, and the whole log stays strictly increasing."""
    state_dir = tmp_path / "state"
    agents: list[AgentProcess] = []
    try:
        agent = await start_ticking(state_dir, agents, http, archive_server)
        lost = []
        seen_max = 0
        for _ in range(3):
            document = await running(http, agent)
            ws, lines = await follow(http, document, 50)
            assert lines[0]["seq"] > seen_max  # never a number seen before the kill
            await agent.kill()
            await drain(ws, lines)
            seen = [f["seq"] for f in lines]
            assert seen == list(range(seen[0], seen[0] + len(seen)))  # one run, no gap
            seen_max = seen[-1]
            agent = await start(state_dir, agents)
            document = await running(http, agent)
            entries = await whole_log(http, document)
            seqs = [e["seq"] for e in entries]
            assert seqs == sorted(set(seqs)), "numbers repeat or go backwards"
            before = [s for s in seqs if s <= seen_max]
            lost.append(not before or before[-1] < seen_max)
            assert all(s > seen_max for s in seqs[len(before):])
        # the scenario happened: lines a client saw were lost from the file
        assert any(lost), "no kill landed while lines were buffered"
        ws, lines = await follow(http, document, 10)
        assert lines[0]["seq"] > seen_max
        await ws.close()
    finally:
        for agent in agents:
            await agent.kill()


async def test_seq_goes_on_one_by_one_after_a_clean_restart(
    tmp_path: Path, http: aiohttp.ClientSession, archive_server: ArchiveServer
) -> None:
    """A clean stop gives the unused numbers back: the next agent's first line is
    numbered right after the last line of the previous one; restarts of the process
    (here, by a restart control) go on numbering too."""
    state_dir = tmp_path / "state"
    agents: list[AgentProcess] = []
    try:
        agent = await start_ticking(state_dir, agents, http, archive_server)
        document = await running(http, agent)
        ws, first_run = await follow(http, document, 20)
        async with http.post(document["restart"]) as response:
            assert response.status == 200, await response.text()
        async with asyncio.timeout(10):  # the second run's first line
            while not (first_run[-1]["line"] == "tick 0" and first_run[-1]["pid"] !=
                       first_run[0]["pid"]):
                message = await ws.receive()
                frame = json.loads(message.data)
                if "seq" in frame:
                    first_run.append(frame)
        await ws.close()
        assert first_run[-1]["seq"] > first_run[-2]["seq"]
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGTERM)
        assert await agent.wait() == 0
        agent = await start(state_dir, agents)
        document = await running(http, agent)
        ws, _ = await follow(http, document, 1)
        await ws.close()
        entries = await whole_log(http, document)  # the last 10000 lines at most
        seqs = [e["seq"] for e in entries]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "a gap or a repeat"
        if seqs[0] == 1:
            assert entries[0]["pid"] == first_run[0]["pid"]
        before = {f["pid"] for f in first_run}
        pids = list(dict.fromkeys(e["pid"] for e in entries))
        # the runs under the first agent, then the one after the restart, in one sequence
        assert pids[-1] not in before
        assert pids[-2] == first_run[-1]["pid"]
    finally:
        for agent in agents:
            await agent.kill()
