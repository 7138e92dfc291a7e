"""The last exits of each process survive an agent restart, clean (``SIGINT``) or not
(``SIGKILL``): the real ``smartmob-agent`` command, real children, a real SQLite file.

The status document of a process shows ``last_exit`` and ``exits`` (its last ten exits);
each exit is written to the state database as it happens, so a new agent on the same
folder shows the same ones.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.agent_process import AgentProcess
from tests.conftest import ArchiveServer
from tests.helpers import app_archive

#: Exits with code 3 on its first two starts (counted in a file of its source folder,
#: which a new agent reuses), then runs until SIGTERM, on which it exits 0.
TWICE_THEN_RUN = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
count = int(open("starts").read()) if os.path.exists("starts") else 0
open("starts", "w").write(str(count + 1))
if count < 2:
    sys.exit(3)
print("ready", flush=True)
while True:
    time.sleep(60)
"""
DEADLINE = 20.0


@pytest.fixture
async def agents() -> AsyncIterator[list[AgentProcess]]:
    """The agents a test starts, killed at the end if they still run."""
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        await agent.kill()


async def status(http: aiohttp.ClientSession, agent: AgentProcess, slug: str) -> Any:
    async with http.get(f"{agent.url}/process-status/{slug}") as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def until(
    http: aiohttp.ClientSession, agent: AgentProcess, slug: str, state: str,
    restarts: int | None = None,
) -> Any:
    """Follow the status of ``slug`` until it is in ``state`` (after ``restarts``)."""
    document: Any = None
    try:
        async with asyncio.timeout(DEADLINE):
            while True:
                document = await status(http, agent, slug)
                if document["state"] == state and restarts in (None, document["restarts"]):
                    return document
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"{slug} is not {state}: {document}") from None


def history(document: Any) -> tuple[Any, Any]:
    return document["last_exit"], document["exits"]


@pytest.mark.timeout(120)
async def test_last_exits_survive_sigkill_and_sigint_of_the_agent(
    tmp_path: Path, archive_server: ArchiveServer, agents: list[AgentProcess],
) -> None:
    """Two processes that crashed twice (code 3) before running, one of them stopped
    since (its third exit, reason ``stopped``): after a ``SIGKILL`` of the agent, the new
    agent's status documents show the same ``last_exit`` and ``exits`` (the child the
    guardian killed was never seen to exit: none is added), also once the running one
    runs again; after a ``SIGINT``, the stopped one's are the same again, and the running
    one's are the same plus the exit of the stop the shutdown made."""
    url = archive_server.add("app.tgz", app_archive("web: exec {PYTHON} -u app.py\n",
                                                    {"app.py": TWICE_THEN_RUN}))
    state_dir = tmp_path / "state"
    agent = await AgentProcess(state_dir).start()
    agents.append(agent)
    async with aiohttp.ClientSession() as http:
        async with http.get(agent.url + "/") as response:
            links = await response.json()
        documents = {}
        for node in ("runs.0", "halted.0"):
            body = {"app": "shop", "node": node, "process_type": "web", "source_url": url,
                    "backoff": {"initial": 0.05, "max": 0.05}}
            async with http.post(links["create"], data=json.dumps(body)) as response:
                assert response.status == 201, await response.text()
                documents[node] = await response.json()
            await until(http, agent, f"shop.{node}", "running", restarts=2)
        async with http.post(documents["halted.0"]["stop"], data="{}") as response:
            assert response.status == 200, await response.text()
        before = {slug: history(await status(http, agent, slug))
                  for slug in ("shop.runs.0", "shop.halted.0")}
        assert [e["code"] for e in before["shop.runs.0"][1]] == [3, 3]
        assert [(e["code"], e["reason"]) for e in before["shop.halted.0"][1][:2]] == [
            (3, None), (3, None)]
        assert before["shop.halted.0"][1][2]["reason"] == "stopped"
        assert before["shop.halted.0"][0] == before["shop.halted.0"][1][-1]

        assert agent.proc is not None
        agent.proc.kill()
        await agent.wait()
        killed = await AgentProcess(state_dir).start()
        agents.append(killed)
        for slug, past in before.items():
            assert history(await status(http, killed, slug)) == past
        await until(http, killed, "shop.runs.0", "running")
        assert history(await status(http, killed, "shop.runs.0")) == before["shop.runs.0"]

        assert killed.proc is not None
        killed.proc.send_signal(signal.SIGINT)
        assert await killed.wait() == 0, killed.stderr
        stopped = await AgentProcess(state_dir).start()
        agents.append(stopped)
        halted = await status(http, stopped, "shop.halted.0")
        assert history(halted) == before["shop.halted.0"]
        last, exits = history(await status(http, stopped, "shop.runs.0"))
        assert exits[:-1] == before["shop.runs.0"][1]
        assert exits[-1]["reason"] == "stopped"
        assert last == exits[-1]
