"""Two real agents as a fleet, one of which stops half way: the other's results are
still shown, and the one that went away is one line, not the end of the command."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from smartmob_agent.client import AgentClient, Fleet, Unreachable
from tests.agent_process import AgentProcess
from tests.client_apps import (
    Following,
    cli_env,
    created_and_running,
    echo_archive,
    running_agent,
    smartmob,
    write_echo_app,
)
from tests.conftest import ArchiveServer

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def agents(tmp_path: Path) -> AsyncIterator[list[AgentProcess]]:
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(running_agent(tmp_path / name))
               for name in ("a", "b")]


@pytest.fixture
def env(tmp_path: Path, agents: list[AgentProcess]) -> dict[str, str]:
    """A config file naming both agents, a the default."""
    config = tmp_path / "home" / ".config" / "smartmob"
    config.mkdir(parents=True)
    (config / "agents.toml").write_text(
        'default = "a"\n'
        f'[agents.a]\nurl = "{agents[0].url}"\n'
        f'[agents.b]\nurl = "{agents[1].url}"\n')
    return cli_env(tmp_path / "home")


@pytest.fixture
async def source(archive_server: ArchiveServer, agents: list[AgentProcess]) -> str:
    """The echo app, running as shop.web.0 on both agents."""
    url = archive_server.add("echo.tgz", echo_archive())
    for agent in agents:
        async with AgentClient(agent.url) as client:
            await created_and_running(client, url)
    return url


async def stop(agent: AgentProcess) -> None:
    """Stop an agent as its operator would (SIGTERM), and wait for it to exit."""
    agent.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    assert await agent.wait() == 0


async def test_ls_all_marks_each_row_with_its_agent(
    env: dict[str, str], source: str, agents: list[AgentProcess],
) -> None:
    """ls --all shows both agents' processes, each row with its agent; without --all
    only the default agent's; --agent picks one by name, or several, in their order."""
    ran = await smartmob("ls", "--all", env=env)
    assert ran.code == 0
    header, *rows = ran.out.splitlines()
    assert header.split()[:2] == ["AGENT", "SLUG"]
    assert [row.split()[:3] for row in rows] == [
        ["a", "shop.web.0", "running"], ["b", "shop.web.0", "running"]]
    ran = await smartmob("ls", env=env)
    assert ran.out.splitlines()[0].split()[0] == "SLUG"
    ran = await smartmob("status", "shop.web.0", "--agent", "b", "--json", env=env)
    [entry] = ran.json()["agents"]
    assert (entry["agent"], entry["url"]) == ("b", agents[1].url)
    ran = await smartmob("ls", "--agent", "b", "--agent", "a", env=env)
    assert [row.split()[:2] for row in ran.out.splitlines()[1:]] == [
        ["b", "shop.web.0"], ["a", "shop.web.0"]]


async def test_one_agent_stopped_half_way(
    env: dict[str, str], source: str, agents: list[AgentProcess],
) -> None:
    """With agent b stopped, ls --all still lists a's processes, says in one line that b
    cannot be reached, and exits 3; --json has b's error; a stop of every process
    stops a's and reports b."""
    await stop(agents[1])
    ran = await smartmob("ls", "--all", env=env)
    assert ran.code == 3
    assert [row.split()[:2] for row in ran.out.splitlines()[1:]] == [["a", "shop.web.0"]]
    assert ran.err == "smartmob: cannot reach agent b: connection refused\n"
    ran = await smartmob("ls", "--all", "--json", env=env)
    assert ran.code == 3
    a, b = ran.json()["agents"]
    assert [p["slug"] for p in a["processes"]] == ["shop.web.0"]
    assert b["error"] == {"kind": "unreachable", "status": None, "body": None,
                          "message": "cannot reach agent b: connection refused"}
    ran = await smartmob("stop", "--all", env=env)
    assert ran.code == 3
    assert ran.out == "a: shop.web.0: stopped\n"
    assert ran.err == "smartmob: cannot reach agent b: connection refused\n"


async def test_a_process_found_on_one_agent_only(
    env: dict[str, str], source: str, agents: list[AgentProcess],
) -> None:
    """A slug on one agent of the fleet is no error on the others: status --all shows
    it; a slug on none is not found (5)."""
    async with AgentClient(agents[1].url) as client:
        await client.delete("shop.web.0")
    ran = await smartmob("status", "shop.web.0", "--all", env=env)
    assert ran.code == 0
    assert ran.out.splitlines()[0] == "agent a"
    assert ran.err == ""
    ran = await smartmob("restart", "shop.web.0", "--all", env=env)
    assert (ran.code, ran.out) == (0, "a: shop.web.0: restarted, now starting\n")
    ran = await smartmob("status", "nobody.web.0", "--all", env=env)
    assert ran.code == 5
    assert len(ran.err.splitlines()) == 2


async def test_events_of_the_fleet_go_on_without_the_agent_that_left(
    env: dict[str, str], source: str, agents: list[AgentProcess],
) -> None:
    """events --all follows both agents; when b shuts down, its stops are shown and one
    line says it left; a's events keep coming."""
    follow = await Following.start("events", "--all", env=env)
    for _ in agents:
        await follow.err_line(lambda line: "following the events" in line)
    await stop(agents[1])
    await follow.line(lambda line: line.startswith("b: ") and "stopping -> stopped" in line)
    await follow.err_line(lambda line: line == "smartmob: agent b: the agent is shutting down")
    async with AgentClient(agents[0].url) as client:
        pid = (await client.status("shop.web.0")).pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    line = await follow.line(lambda line: "process:exit" in line)
    assert line.startswith("a: ")
    assert line.endswith(f"killed by SIGKILL (pid {pid})")
    assert (await follow.interrupt()).code == 0


async def test_the_fleet_in_the_library(source: str, agents: list[AgentProcess]) -> None:
    """Fleet.list answers per agent, in order: a's processes, b's Unreachable."""
    await stop(agents[1])
    async with Fleet([agent.url for agent in agents], retries=1, retry_delay=0.01) as fleet:
        results = await fleet.list()
    assert [r.ok for r in results] == [True, False]
    assert [p.slug for p in results[0].value or []] == ["shop.web.0"]
    assert isinstance(results[1].error, Unreachable)
    assert results.errors == [results[1]]
    assert results.values == [results[0].value]


async def test_every_call_of_the_fleet_on_two_agents(
    source: str, agents: list[AgentProcess], tmp_path: Path,
) -> None:
    """The fleet's calls answer per agent, in order: upload and create the same process
    on both, wait for it, read its logs, update it in place and roll it back, list the
    minted keys; then, with b stopped, each call still answers for a and says b is
    unreachable."""
    folder = write_echo_app(tmp_path / "app")
    async with Fleet([agent.url for agent in agents], retries=1, retry_delay=0.01) as fleet:
        uploads = await fleet.upload(folder)
        assert all(r.ok for r in uploads), uploads.errors
        assert len({u.checksum for u in uploads.values}) == 1
        created = await fleet.create("shop", "worker.0", source)
        assert [p.slug for p in created.values] == ["shop.worker.0", "shop.worker.0"]
        running = await fleet.wait_for("shop.worker.0", "running", timeout=20)
        assert {p.state for p in running.values} == {"running"}
        logs = await fleet.logs("shop.web.0", tail=10)
        assert all(any(line.line == "ready" for line in lines) for lines in logs.values)
        # both from a's copy: b checks it against the checksum, as a deploy would
        upload = uploads.values[0]
        updated = await fleet.update("shop.web.0", upload.source_url, checksum=upload.checksum)
        assert all(r.ok for r in updated), updated.errors
        for agent in fleet.agents:
            await wait_updated(agent, "shop.web.0", upload.checksum)
        rolled = await fleet.rollback("shop.web.0")
        assert all(r.ok for r in rolled), rolled.errors
        assert [r.value for r in await fleet.tokens()] == [[], []]

        await stop(agents[1])
        for call in (fleet.logs("shop.web.0"), fleet.tokens(),
                     fleet.wait_for("shop.worker.0", timeout=5)):
            results = await call
            assert results[0].ok, results[0].error
            assert isinstance(results[1].error, Unreachable)


async def wait_updated(agent: AgentClient, slug: str, checksum: str) -> None:
    """Until ``slug`` runs the source ``checksum`` (its update switched), deadline 30 s."""
    async with asyncio.timeout(30):
        while ((process := await agent.status(slug)).source or {}).get("checksum") != checksum:
            assert process.update_error is None, process.update_error
            await asyncio.sleep(0.05)
