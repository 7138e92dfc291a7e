"""``smartmob deploy`` and ``smartmob scale`` against a real agent: a real folder with
two process types, redeploys that keep or replace nodes, a failing deploy that says
why, and scaling up and down."""

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
async def agent(tmp_path: Path) -> AsyncIterator[AgentProcess]:
    async with running_agent(tmp_path / "state") as agent:
        yield agent


@pytest.fixture
def env(tmp_path: Path, agent: AgentProcess) -> dict[str, str]:
    return cli_env(tmp_path / "home", SMARTMOB_URL=agent.url)


@pytest.fixture
async def client(agent: AgentProcess) -> AsyncIterator[AgentClient]:
    async with AgentClient(agent.url) as client:
        yield client


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """The echo app (web, worker and crash), with a file its .gitignore leaves out."""
    folder = write_echo_app(tmp_path / "shop")
    (folder / ".gitignore").write_text("*.secret\n")
    (folder / "db.secret").write_text("hunter2")
    return folder


def pids(processes: list[Process]) -> dict[str, int | None]:
    return {p.slug: p.pid for p in processes}


async def test_deploy_a_folder_then_again(env: dict[str, str], folder: Path,
                                          client: AgentClient) -> None:
    """deploy creates web.0, web.1 and worker.0 from the folder and waits until they
    run; deploying the same folder again keeps them; a changed folder updates them in
    place (new children, same nodes), and a smaller formation deletes what is beyond it."""
    deploy = ["deploy", str(folder), "--app", "shop", "--process", "web=2", "-p", "worker=1"]
    ran = await smartmob(*deploy, env=env)
    assert ran.code == 0, ran.err
    lines = ran.out.splitlines()
    assert lines[0].startswith("uploaded ")
    assert sorted(lines[1:4]) == [
        "shop.web.0: created", "shop.web.1: created", "shop.worker.0: created"]
    assert lines[-1] == "deployed shop: web=2 worker=1"
    assert ran.err.startswith(f"packed {folder} into ")
    first = await client.list()
    assert [(p.slug, p.state) for p in first] == [
        ("shop.web.0", "running"), ("shop.web.1", "running"), ("shop.worker.0", "running")]
    checksum = first[0].checksum
    assert checksum is not None
    assert ran.err.rstrip().endswith(checksum)

    ran = await smartmob(*deploy, env=env)
    assert ran.code == 0
    assert ran.out.count("kept (it runs this source)") == 3
    assert pids(await client.list()) == pids(first)

    (folder / "echo.py").write_text((folder / "echo.py").read_text() + "# v2\n")
    ran = await smartmob("deploy", str(folder), "--app", "shop", "-p", "web=1",
                         "-p", "worker=1", "--json", env=env)
    assert ran.code == 0
    [entry] = ran.json()["agents"]
    assert entry["actions"] == [
        {"slug": "shop.web.0", "action": "updated"},
        {"slug": "shop.worker.0", "action": "updated"},
        {"slug": "shop.web.1", "action": "deleted"}]
    now = await client.list()
    assert [p.slug for p in now] == ["shop.web.0", "shop.worker.0"]
    assert {p.checksum for p in now} == {entry["upload"]["checksum"]} != {checksum}
    assert not set(pids(now).values()) & set(pids(first).values())


async def test_a_failing_deploy_says_which_node_and_why(
    env: dict[str, str], folder: Path, client: AgentClient,
) -> None:
    """A node that cannot run fails the deploy (status 1): the message names it, with
    its error, the reason's name, its last exit, and the last lines of its log."""
    ran = await smartmob("deploy", str(folder), "--app", "shop", "-p", "crash=1",
                         "-o", "max_restarts=1", env=env)
    assert ran.code == 1
    err = ran.err.splitlines()
    assert err[1].startswith("smartmob: agent ")
    assert ": shop.crash.0 is failed: gave up after 2 failed start(s)" in err[1]
    assert err[2] == "  reason: max restarts"
    assert err[3] == "  last exit: exited with code 3; it ended by itself"
    assert err[4:] == ["  last lines of its log:", "    about to crash", "    about to crash"]
    assert "deployed" not in ran.out
    ran = await smartmob("status", "shop.crash.0", env=env)
    assert ran.code == 1
    assert "reason:    max restarts" in ran.out.splitlines()


async def test_a_deploy_waits_for_the_health_check(env: dict[str, str], folder: Path,
                                                   client: AgentClient) -> None:
    """With a health check, deploy ends only once the node passes it, well after its
    start_seconds: the app is ready a second after it starts, and the check says so."""
    with (folder / "Procfile").open("a") as procfile:
        procfile.write("slow: sleep 1; touch ready; exec sleep 1000\n")
    ran = await smartmob("deploy", str(folder), "--app", "shop", "-p", "slow=1",
                         "-o", "start_seconds=0.1",
                         "-o", 'health={"command": "test -f ready", "interval": 0.2, '
                         '"failures": 30}', env=env)
    assert ran.code == 0, ran.err
    assert ran.out.splitlines()[-1] == "deployed shop: slow=1"
    status = await client.status("shop.slow.0")
    assert (status.state, status.healthy) == ("running", True)


async def test_scale_up_and_down(env: dict[str, str], folder: Path,
                                 client: AgentClient) -> None:
    """scale creates the missing nodes (from --source) and deletes the extra ones; down
    needs no source; up without one is a usage error that changes nothing."""
    ran = await smartmob("deploy", str(folder), "--app", "shop", "-p", "web=1", "-p",
                         "worker=1", "-o", "stop_timeout=3", env=env)
    assert ran.code == 0
    ran = await smartmob("scale", "shop", "web=3", "worker=0", "--source", str(folder),
                         env=env)
    assert ran.code == 0, ran.err
    assert sorted(ran.out.splitlines()[:3]) == [
        "shop.web.1: created", "shop.web.2: created", "shop.worker.0: deleted"]
    assert ran.out.splitlines()[-1] == "scaled shop: web=3 worker=0"
    listed = await client.list()
    assert sorted((p.slug, p.state) for p in listed) == [
        ("shop.web.0", "running"), ("shop.web.1", "running"), ("shop.web.2", "running")]
    assert {p.options["stop_timeout"] for p in listed if p.options} == {3.0}
    assert len({p.checksum for p in listed}) == 1
    ran = await smartmob("scale", "shop", "web=4", env=env)
    assert ran.code == 2
    assert ran.err == ("smartmob: new nodes need a source: give --source DIR, FILE or URL "
                       "(an agent does not tell where a process's source came from)\n")
    assert len(await client.list()) == 3
    ran = await smartmob("scale", "shop", "web=1", env=env)
    assert ran.code == 0
    assert ran.out.splitlines()[:2] == ["shop.web.2: deleted", "shop.web.1: deleted"]
    assert [p.slug for p in await client.list()] == ["shop.web.0"]
    ran = await smartmob("scale", "shop", "web", env=env)
    assert (ran.code, ran.err) == (2, "smartmob: 'web' is not TYPE=COUNT (such as web=2)\n")
