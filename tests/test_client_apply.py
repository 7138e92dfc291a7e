"""``smartmob plan`` and ``smartmob apply`` against two real agents: a smartmob.toml
spread over both, applied, changed, applied again (updates), and pruned."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from smartmob_agent.client import AgentClient
from smartmob_agent.client.results import Process
from tests.agent_process import AgentProcess
from tests.client_apps import cli_env, running_agent, smartmob, write_echo_app

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def agents(tmp_path: Path) -> AsyncIterator[tuple[AgentProcess, AgentProcess]]:
    async with running_agent(tmp_path / "a") as a, running_agent(tmp_path / "b") as b:
        yield a, b


def manifest(a: AgentProcess, b: AgentProcess, web: int, options: str = "") -> str:
    return f"""
[apps.shop]
source = "shop"
agents = ["{a.url}", "{b.url}"]
env = {{ GREETING = "hi" }}
options = {{ start_seconds = 0.2{options} }}

[apps.shop.formation]
web = {web}
worker = 1
"""


async def listing(agent: AgentProcess) -> list[Process]:
    async with AgentClient(agent.url) as client:
        return await client.list()


def table(out: str) -> list[list[str]]:
    """The plan's rows, split on runs of spaces (the WHY column kept whole)."""
    rows = []
    for line in out.splitlines()[1:]:
        if not line.startswith(("create", "update", "delete", "unchanged", "replace")):
            break
        kind, slug, agent, *why = line.split(maxsplit=3)
        rows.append([kind, slug, agent, *why])
    return rows


async def test_plan_apply_update_prune(
    tmp_path: Path, agents: tuple[AgentProcess, AgentProcess],
) -> None:
    """plan changes nothing; apply spreads web=2 worker=1 over two agents and waits for
    them; a second apply has nothing to do; a changed option updates the nodes (in
    place where the agent can); a smaller formation deletes only with --prune."""
    a, b = agents
    write_echo_app(tmp_path / "shop")
    file = tmp_path / "smartmob.toml"
    file.write_text(manifest(a, b, web=2))
    env = cli_env(tmp_path / "home")
    ran = await smartmob("plan", "--file", str(file), env=env)
    assert ran.code == 0, ran.err
    assert table(ran.out) == [["create", "shop.web.0", a.url], ["create", "shop.web.1", b.url],
                              ["create", "shop.worker.0", a.url]]
    assert ran.out.splitlines()[-1] == "3 create, 0 update, 0 unchanged"
    assert await listing(a) == []
    assert await listing(b) == []

    ran = await smartmob("apply", "--file", str(file), env=env)
    assert ran.code == 0, ran.err
    assert f"{b.url}: shop.web.1: created" in ran.out
    assert ran.out.splitlines()[-1] == f"applied {file}"
    on_a, on_b = await listing(a), await listing(b)
    # created at once: the agent lists them in the order their requests came
    assert sorted((p.slug, p.state) for p in on_a) == [("shop.web.0", "running"),
                                                       ("shop.worker.0", "running")]
    assert [(p.slug, p.state) for p in on_b] == [("shop.web.1", "running")]
    assert len({p.checksum for p in on_a + on_b}) == 1

    ran = await smartmob("apply", "--file", str(file), "--json", env=env)
    assert ran.code == 0, ran.err
    assert [step["action"] for step in ran.json()["plan"]] == ["unchanged"] * 3
    assert ran.json()["done"] == []
    assert {p.slug: p.pid for p in await listing(a)} == {p.slug: p.pid for p in on_a}

    file.write_text(manifest(a, b, web=1, options=", stop_timeout = 3"))
    ran = await smartmob("apply", "--file", str(file), env=env)
    assert ran.code == 0, ran.err
    assert table(ran.out) == [
        ["update", "shop.web.0", a.url, "options: stop_timeout"],
        ["update", "shop.worker.0", a.url, "options: stop_timeout"],
        ["delete", "shop.web.1", b.url, "not in the file; only with --prune"]]
    assert ran.out.splitlines()[4] == "0 create, 2 update, 0 unchanged, 1 delete (with --prune)"
    assert {p.options["stop_timeout"] for p in await listing(a) if p.options} == {3.0}
    assert [p.slug for p in await listing(b)] == ["shop.web.1"]

    ran = await smartmob("apply", "--file", str(file), "--prune", env=env)
    assert ran.code == 0, ran.err
    assert f"{b.url}: shop.web.1: deleted" in ran.out
    assert await listing(b) == []
    assert sorted(p.slug for p in await listing(a)) == ["shop.web.0", "shop.worker.0"]


async def test_a_wrong_file_changes_nothing(
    tmp_path: Path, agents: tuple[AgentProcess, AgentProcess],
) -> None:
    """A missing file, a wrong one, or a folder that is not there: a usage error (2) that
    says what and where, before any agent is touched."""
    a, _ = agents
    env = cli_env(tmp_path / "home", SMARTMOB_URL=a.url)
    ran = await smartmob("plan", env=env)
    assert (ran.code, ran.err) == (2, "smartmob: there is no smartmob.toml: write one (see "
                                   "'smartmob apply --help'), or give --file FILE\n")
    file = tmp_path / "smartmob.toml"
    file.write_text('[apps.shop]\nsource = "nowhere"\nformation = { web = 1 }\n')
    ran = await smartmob("apply", "--file", str(file), env=env)
    assert (ran.code, ran.err) == (2, f"smartmob: {file}: app 'shop': its source nowhere "
                                   "is not a folder (nor a URL)\n")
    file.write_text('[apps.shop]\nformation = { web = "1" }\n')
    ran = await smartmob("apply", "--file", str(file), env=env)
    assert ran.code == 2
    assert "formation.web must be a count" in ran.err
    assert await listing(a) == []
