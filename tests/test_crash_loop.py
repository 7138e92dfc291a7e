"""A crash loop with the shortest backoff a request can ask, on the real
``smartmob-agent`` command (issue 13, item 8): the restart rate has a floor whatever the
request says, and the agent's log does not fill with the same lines.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from smartmob_agent.model import MIN_RESTART_DELAY
from smartmob_agent.output.throttle import BURST, WINDOW
from tests.agent_process import AgentProcess
from tests.conftest import ArchiveServer
from tests.helpers import app_archive

#: What the issue's report asked for: the shortest backoff there is, every run a failure.
STORM = {"start_seconds": 0, "backoff": {"initial": 0.001, "max": 0.001}}
#: How long the rate is measured over.
MEASURE = 2.0


async def status(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(url) as response:
        assert response.status == 200, await response.text()
        document: dict[str, Any] = await response.json()
        return document


@pytest.mark.timeout(60)
async def test_a_command_that_fails_at_once_restarts_at_most_ten_times_a_second(
    tmp_path: Path, archive_server: ArchiveServer, http: aiohttp.ClientSession,
) -> None:
    """``backoff {initial: 0.001, max: 0.001}`` with ``start_seconds: 0`` on a command that
    exits at once: the backoff in force is 0.1 s, the process restarts at most some ten
    times a second (it was some 200 to 400), and the agent's log says little about it:
    at most :data:`BURST` lines of its exits within a window, whichever way the agent log
    is read (stderr, the ``agent-log`` link)."""
    url = archive_server.add("app.tgz", app_archive("web: exit 1\n"))
    agent = await AgentProcess(tmp_path / "state").start()
    loop = asyncio.get_running_loop()
    try:
        async with http.get(agent.url + "/") as response:
            index = await response.json()
        body = {"app": "storm", "node": "web.0", "process_type": "web", "source_url": url,
                **STORM}
        async with http.ws_connect(index["events"], params={"slug": "storm.web.0"}) as events:
            created_at = loop.time()
            async with http.post(index["create"], json=body) as response:
                assert response.status == 201, await response.text()
                created = await response.json()
            assert created["options"]["backoff"] == {"initial": 0.1, "max": 0.1}
            assert created["options"]["start_seconds"] == 0
            spawned = 0
            async with asyncio.timeout(20):  # the crash loop begins: a few children
                while spawned < 3:
                    spawned += json.loads((await events.receive()).data)["event"] == (
                        "process:online")
        first, began = (await status(http, created["details"]))["restarts"], loop.time()
        await asyncio.sleep(MEASURE)  # the measure itself: a rate over a fixed time
        last, ended = (await status(http, created["details"]))["restarts"], loop.time()
        rate = (last - first) / (ended - began)
        assert 0 < rate <= 1 / MIN_RESTART_DELAY + 1, rate
        assert last > BURST + 2, "too few exits to bound anything: the machine is too slow"

        # the lines of its exits: BURST per window at most, not one per exit
        windows = 1 + int((loop.time() - created_at) // WINDOW)
        lines = agent.stderr.splitlines()
        exits = [line for line in lines if re.search(r"storm\.web\.0: process \d+ exited", line)]
        assert BURST <= len(exits) <= BURST * windows, exits
        about_it = [line for line in lines if "storm.web.0" in line]
        assert len(about_it) <= len(exits) + 2 * windows + 2, about_it
        async with http.get(index["agent-log"], params={"tail": "1000"}) as response:
            logged = [entry["line"] for entry in await response.json()]
        assert BURST <= sum("storm.web.0: process" in line for line in logged) <= BURST * windows
    finally:
        assert agent.proc is not None
        agent.proc.terminate()
        await agent.wait()
