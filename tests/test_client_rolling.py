"""Rolling deploys against two real agents: ``smartmob deploy`` updates the nodes in
place, agent by agent, stops at the first node that fails, and rolls back the nodes it
already updated (or keeps them, ``--no-rollback``); ``apply`` updates in place too."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from smartmob_agent.client import AgentClient
from smartmob_agent.client.results import Process
from tests.agent_process import AgentProcess
from tests.client_apps import cli_env, running_agent, smartmob, write_echo_app

pytestmark = pytest.mark.timeout(120)

#: Version 2 of the echo app: exits at once on an agent whose state folder holds a file
#: ``fail-updates`` (its sources are unpacked below that folder), else as version 1.
FAILING_HERE = """\
import os, sys
here = os.getcwd()
while os.path.dirname(here) != here:
    if os.path.exists(os.path.join(here, "fail-updates")):
        print("version 2 cannot start here", flush=True)
        sys.exit(3)
    here = os.path.dirname(here)
"""


@pytest.fixture
async def agents(tmp_path: Path) -> AsyncIterator[tuple[AgentProcess, AgentProcess]]:
    async with running_agent(tmp_path / "a") as a, running_agent(tmp_path / "b") as b:
        yield a, b


async def listing(agent: AgentProcess) -> list[Process]:
    async with AgentClient(agent.url) as client:
        return await client.list()


def version_2(folder: Path) -> None:
    script = folder / "echo.py"
    script.write_text(FAILING_HERE + script.read_text())


async def test_a_rolling_deploy_stops_and_rolls_back(
    tmp_path: Path, agents: tuple[AgentProcess, AgentProcess],
) -> None:
    """Version 2 fails on agent b: both nodes of agent a are updated, b's web.0 fails
    (it keeps its old child), a's nodes go back to version 1, b's web.1 is not touched;
    status 1. With --no-rollback --parallel 2, a's nodes keep version 2."""
    a, b = agents
    folder = write_echo_app(tmp_path / "shop")
    env = cli_env(tmp_path / "home")
    deploy = ["deploy", str(folder), "--app", "shop", "-p", "web=2", "--agent", a.url,
              "--agent", b.url, "-o", "start_seconds=0.3"]
    ran = await smartmob(*deploy, env=env)
    assert ran.code == 0, ran.err
    before = {agent.url: await listing(agent) for agent in agents}
    v1 = before[a.url][0].checksum
    (b.state_dir / "fail-updates").write_text("")
    version_2(folder)

    ran = await smartmob(*deploy, env=env)
    assert ran.code == 1, ran.out
    steps = [line for line in ran.out.splitlines()
             if line.endswith(("updated", "rolled back", "update failed"))]
    assert steps == [f"{a.url}: shop.web.0: updated", f"{a.url}: shop.web.1: updated",
                     f"{a.url}: shop.web.1: rolled back", f"{a.url}: shop.web.0: rolled back"]
    assert ran.out.splitlines()[-1] == (
        f"{a.url}: rolled back: the deploy failed on another agent")
    assert "shop.web.0: the update failed, the old version still runs" in ran.err
    assert "version 2 cannot start here" in ran.err  # the last lines of its log
    after = {agent.url: await listing(agent) for agent in agents}
    assert {(p.checksum, p.state) for ps in after.values() for p in ps} == {(v1, "running")}
    assert [p.pid for p in after[b.url]] == [p.pid for p in before[b.url]]

    ran = await smartmob(*deploy, "--no-rollback", "--parallel", "2", env=env)
    assert ran.code == 1
    assert "rolled back" not in ran.out
    assert ran.out.splitlines()[-1] == (f"{a.url}: stopped: the deploy failed on another "
                                        "agent (the updates here are kept: --no-rollback)")
    on_a = await listing(a)
    assert len({p.checksum for p in on_a}) == 1
    assert on_a[0].checksum != v1
    assert {p.checksum for p in await listing(b)} == {v1}


async def test_apply_updates_in_place(
    tmp_path: Path, agents: tuple[AgentProcess, AgentProcess],
) -> None:
    """A changed folder: apply updates each node through its update link (no node is
    deleted), and the nodes run the new source."""
    a, b = agents
    write_echo_app(tmp_path / "shop")
    file = tmp_path / "smartmob.toml"
    file.write_text(f'[apps.shop]\nsource = "shop"\nagents = ["{a.url}", "{b.url}"]\n'
                    'options = { start_seconds = 0.3 }\nformation = { web = 2 }\n')
    env = cli_env(tmp_path / "home")
    ran = await smartmob("apply", "--file", str(file), env=env)
    assert ran.code == 0, ran.err
    first = await listing(a) + await listing(b)
    (tmp_path / "shop" / "echo.py").write_text(
        (tmp_path / "shop" / "echo.py").read_text() + "# v2\n")
    ran = await smartmob("apply", "--file", str(file), env=env)
    assert ran.code == 0, ran.err
    assert f"{a.url}: shop.web.0: updated" in ran.out
    assert f"{b.url}: shop.web.1: updated" in ran.out
    assert "deleted" not in ran.out
    now = await listing(a) + await listing(b)
    assert [p.slug for p in now] == [p.slug for p in first]
    assert len({p.checksum for p in now}) == 1
    assert now[0].checksum != first[0].checksum
