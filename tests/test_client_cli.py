"""The real ``smartmob`` command against real agents: output, ``--json``, exit statuses
and one-sentence errors, keys from the environment and the config file."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from smartmob_agent import __version__
from smartmob_agent.client import AgentClient
from smartmob_agent.client.cli import COMMANDS
from tests.agent_process import AgentProcess
from tests.client_apps import (
    Following,
    cli_env,
    created_and_running,
    echo_archive,
    read_until,
    running_agent,
    smartmob,
    write_echo_app,
)
from tests.conftest import ArchiveServer

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[AgentProcess]:
    async with running_agent(tmp_path / "state") as agent:
        yield agent


@pytest.fixture
def env(tmp_path: Path, agent: AgentProcess) -> dict[str, str]:
    """The command's environment: this agent in SMARTMOB_URL, no config file."""
    return cli_env(tmp_path / "home", SMARTMOB_URL=agent.url)


@pytest.fixture
async def client(agent: AgentProcess) -> AsyncIterator[AgentClient]:
    async with AgentClient(agent.url) as client:
        yield client


@pytest.fixture
def source(archive_server: ArchiveServer) -> str:
    return archive_server.add("echo.tgz", echo_archive())


def one_line(text: str) -> str:
    """The text, checked to be one line without a traceback."""
    assert "Traceback" not in text
    assert text.count("\n") == 1, text
    return text.rstrip("\n")


async def test_ls_of_a_new_agent(env: dict[str, str], agent: AgentProcess) -> None:
    """ls of an agent without processes says so on stderr, and its JSON is one document
    with the agent's empty list."""
    ran = await smartmob("ls", env=env)
    assert (ran.code, ran.out, ran.err) == (0, "", "no processes\n")
    ran = await smartmob("ls", "--json", env=env)
    assert ran.code == 0
    assert ran.json() == {"agents": [{"agent": agent.url, "url": agent.url, "processes": []}]}


async def test_create_ls_status(env: dict[str, str], source: str, client: AgentClient) -> None:
    """create --wait answers once the process runs; ls shows it in an aligned table;
    status --json is the agent's own status document."""
    ran = await smartmob("create", "shop", "web.0", source, "--env", "A=1", "--wait", env=env)
    assert (ran.code, ran.out) == (0, "shop.web.0: created, running\n")
    ran = await smartmob("ls", env=env)
    header, row = ran.out.splitlines()
    assert header.split() == ["SLUG", "STATE", "PID", "UPTIME", "RESTARTS", "CPU", "MEMORY"]
    assert row.split()[:2] == ["shop.web.0", "running"]
    assert header.index("STATE") == row.index("running")
    assert "\x1b[" not in ran.out  # no colour when piped
    ran = await smartmob("status", "shop.web.0", "--json", env=env)
    [entry] = ran.json()["agents"]
    document = (await client.status("shop.web.0")).to_dict()
    assert entry["process"]["slug"] == document["slug"]
    assert entry["process"]["pid"] == document["pid"]
    assert set(entry["process"]) == set(document)
    ran = await smartmob("status", "shop.web.0", env=env)
    assert ran.code == 0
    assert "state:    running" in ran.out.splitlines()


async def test_errors_are_one_sentence_with_their_exit_status(
    env: dict[str, str], agent: AgentProcess, source: str, tmp_path: Path,
) -> None:
    """Not found exits 5, unreachable 3, a refused request 1, a usage error 2: each with
    one line on stderr and no traceback."""
    ran = await smartmob("status", "nobody.web.0", env=env)
    assert ran.code == 5
    assert one_line(ran.err) == (
        f"smartmob: agent {agent.url}: there is no process named 'nobody.web.0'")
    dead = cli_env(tmp_path / "home", SMARTMOB_URL="http://127.0.0.1:9")
    ran = await smartmob("ls", env=dead)
    assert ran.code == 3
    assert one_line(ran.err) == (
        "smartmob: cannot reach agent http://127.0.0.1:9: connection refused")
    await smartmob("create", "shop", "web.0", source, env=env)
    ran = await smartmob("create", "shop", "web.0", source, env=env)
    assert ran.code == 1
    assert one_line(ran.err) == (
        f"smartmob: agent {agent.url}: a process named 'shop.web.0' already exists; "
        "delete it first")
    ran = await smartmob("stop", env=env)
    assert ran.code == 2
    assert one_line(ran.err) == "smartmob: give a SLUG, --app APP, or --all for every process"
    ran = await smartmob("ls", "--agent", "prod", env=env)
    assert ran.code == 2
    assert "no agent is named 'prod'" in one_line(ran.err)
    ran = await smartmob("frobnicate", env=env)
    assert ran.code == 2
    said = one_line(ran.err)
    assert said.startswith("smartmob: argument COMMAND: invalid choice: 'frobnicate'")
    assert said.endswith(" (see smartmob --help)")
    ran = await smartmob("logs", "shop.web.0", "--tail", "many", env=env)
    assert (ran.code, one_line(ran.err)) == (2, "smartmob: argument --tail: not a whole "
                                                "number from 0: 'many' (see smartmob logs --help)")
    ran = await smartmob("create", "shop", "web..1", "ftp://x", "--json", env=env)
    assert ran.code == 1
    [entry] = ran.json()["agents"]
    assert entry["error"]["kind"] == "invalid"
    assert set(entry["error"]["body"]["fields"]) == {"node", "source_url"}


async def test_a_failed_process_says_why(env: dict[str, str], source: str) -> None:
    """create --wait of a process that cannot run exits 1 and says its state, error,
    last exit and last output."""
    ran = await smartmob("create", "shop", "crash.0", source, "-o", "restart=never",
                         "--wait", env=env)
    assert ran.code == 1
    lines = ran.err.splitlines()
    assert lines[0].endswith("shop.crash.0 is exited: exited with code 3")
    assert lines[1:] == ["  last exit: exited with code 3", "  last output:",
                         "    about to crash"]


async def test_controls(env: dict[str, str], source: str, client: AgentClient) -> None:
    """stop, start, restart a slug or an app; a control that makes no sense exits 1 with
    the agent's sentence; signal reaches the process; rm deletes."""
    await created_and_running(client, source)
    await created_and_running(client, source, node="worker.0")
    ran = await smartmob("stop", "shop.web.0", env=env)
    assert (ran.code, ran.out) == (0, "shop.web.0: stopped, now stopped\n")
    ran = await smartmob("stop", "--app", "shop", env=env)
    assert ran.code == 1
    assert ran.out == "shop.worker.0: stopped\n"
    assert ran.err.endswith("process 'shop.web.0' is already stopped\n")
    ran = await smartmob("start", "--app", "shop", "--json", env=env)
    assert ran.code == 0
    assert ran.json()["agents"][0]["outcomes"] == [
        {"slug": "shop.web.0", "ok": True}, {"slug": "shop.worker.0", "ok": True}]
    await client.wait_for("shop.web.0", "running", timeout=20)
    running = await created_and_running(client, source, node="web.1")
    ran = await smartmob("restart", "shop.web.1", env=env)
    assert ran.code == 0
    assert (await client.wait_for("shop.web.1", "running", timeout=20)).pid != running.pid
    await created_and_running(client, source, node="web.2")
    ran = await smartmob("signal", "shop.web.2", "hup", env=env)
    assert (ran.code, ran.out) == (0, "shop.web.2: sent HUP, running\n")
    async with client.attach("shop.web.2", tail=10) as console:
        await read_until(console, lambda line: line.line == "reloading on SIGHUP")
    ran = await smartmob("rm", "shop.web.2", env=env)
    assert (ran.code, ran.out) == (0, "shop.web.2: deleted\n")
    ran = await smartmob("rm", "--all", env=env)
    assert ran.code == 0
    assert sorted(ran.out.splitlines()) == [
        "shop.web.0: deleted", "shop.web.1: deleted", "shop.worker.0: deleted"]
    assert await client.list() == []


async def test_logs_and_logs_follow(env: dict[str, str], source: str,
                                    client: AgentClient) -> None:
    """logs --tail shows the last lines with their time and stream; logs -f replays
    them, then shows new lines as they come, until CTRL-C (status 0)."""
    await created_and_running(client, source)
    ran = await smartmob("logs", "shop.web.0", "--tail", "1", env=env)
    assert ran.code == 0
    at, stream, line = ran.out.rstrip("\n").split(" ", 2)
    assert (stream, line) == ("stdout", "ready")
    assert at.endswith("Z")
    follow = await Following.start("logs", "shop.web.0", "-f", env=env)
    await follow.line(lambda line: line.endswith(" stdout ready"))
    async with client.attach("shop.web.0") as console:
        await console.send("hello")
        await follow.line(lambda line: line.endswith(" stdout you said: hello"))
    ran = await follow.interrupt()
    assert ran.code == 0
    assert "Traceback" not in ran.err


async def test_attach_round_trip(env: dict[str, str], source: str,
                                 client: AgentClient) -> None:
    """attach: a line typed on its input reaches the process, the answer comes out;
    CTRL-C detaches with status 0 and the process goes on running."""
    running = await created_and_running(client, source)
    console = await Following.start("attach", "shop.web.0", env=env)
    await console.err_line(lambda line: "attached to shop.web.0" in line)
    await console.send("hello there\n")
    assert await console.line(lambda line: True) == "you said: hello there"
    ran = await console.interrupt()
    assert ran.code == 0
    assert (await client.status("shop.web.0")).pid == running.pid


async def test_attach_until_the_process_is_deleted(env: dict[str, str], source: str,
                                                   client: AgentClient) -> None:
    """An attach ends by itself, status 0, when its process is deleted, and says so."""
    await created_and_running(client, source)
    console = await Following.start("attach", "shop.web.0", env=env)
    await console.err_line(lambda line: "attached to shop.web.0" in line)
    await client.delete("shop.web.0")
    ran = await console.finish()
    assert ran.code == 0
    assert ran.err.endswith(": the process was deleted\n")


async def test_events_see_a_kill_9(env: dict[str, str], source: str,
                                   client: AgentClient) -> None:
    """events shows a kill -9 of the child as an exit by SIGKILL, then the new child
    online; with --json each event is a JSON document on its own line."""
    running = await created_and_running(client, source)
    assert running.pid is not None
    events = await Following.start("events", "--slug", "shop.web.0", env=env)
    as_json = await Following.start("events", "--json", env=env)
    for follower in (events, as_json):
        await follower.err_line(lambda line: "following the events" in line)
    os.kill(running.pid, signal.SIGKILL)
    exit_line = await events.line(lambda line: "process:exit" in line)
    assert exit_line.endswith(f"shop.web.0  killed by SIGKILL (pid {running.pid})")
    online = await events.line(lambda line: "process:online" in line)
    assert "shop.web.0  pid " in online
    seen = [json.loads(await as_json.line(lambda line: True)) for _ in range(2)]
    while seen[-1]["event"] != "process:online":
        seen.append(json.loads(await as_json.line(lambda line: True)))
    assert seen[0]["event"] == "process:exit"
    assert seen[0]["signal"] == "SIGKILL"
    assert seen[0]["agent"] == env["SMARTMOB_URL"]
    for follower in (events, as_json):
        assert (await follower.interrupt()).code == 0


async def test_events_of_one_app(env: dict[str, str], source: str,
                                 client: AgentClient) -> None:
    """events --app, and the library's events(app=), see that app's processes only: a
    kill -9 in another app, which comes first, reaches neither."""
    other = await created_and_running(client, source, app="other")
    shop = await created_and_running(client, source, app="shop")
    assert other.pid is not None
    assert shop.pid is not None
    follower = await Following.start("events", "--app", "shop", "--json", env=env)
    await follower.err_line(lambda line: "following the events" in line)
    async with client.events(app="shop") as events:
        os.kill(other.pid, signal.SIGKILL)
        async with asyncio.timeout(20):
            restarted = await client.wait_for("other.web.0", "running", timeout=20)
            while restarted.pid in (None, other.pid):  # running again, with a new child
                restarted = await client.wait_for("other.web.0", "running", timeout=20)
            os.kill(shop.pid, signal.SIGKILL)
            first = await anext(aiter(events))
    assert (first.event, first.slug, first.pid) == ("process:exit", "shop.web.0", shop.pid)
    seen = json.loads(await follower.line(lambda line: True))
    assert (seen["event"], seen["slug"]) == ("process:exit", "shop.web.0")
    assert (await follower.interrupt()).code == 0


async def test_upload_version_and_help(env: dict[str, str], agent: AgentProcess,
                                       tmp_path: Path) -> None:
    """upload of a folder (packed) or of an archive file prints the source URL and the
    checksum; version both versions; every command's --help shows an example."""
    folder = write_echo_app(tmp_path / "app")
    ran = await smartmob("upload", str(folder), env=env)
    assert ran.code == 0
    url, checksum, _ = ran.out.split()
    assert url.startswith(agent.url + "/sources/")
    assert checksum.startswith("sha256:")
    archive = tmp_path / "app.tgz"
    archive.write_bytes(echo_archive())
    ran = await smartmob("upload", str(archive), env=env)
    assert ran.code == 0
    url, checksum, _ = ran.out.split()
    assert checksum == "sha256:" + hashlib.sha256(archive.read_bytes()).hexdigest()
    assert url == f"{agent.url}/sources/{checksum.removeprefix('sha256:')}"
    ran = await smartmob("upload", str(tmp_path / "nothing"), env=env)
    assert (ran.code, ran.err) == (2, f"smartmob: there is no file or folder "
                                      f"{tmp_path / 'nothing'}\n")
    ran = await smartmob("version", env=env)
    assert ran.out == f"smartmob {__version__}\nagent {agent.url}: smartmob-agent {__version__}\n"
    for command in COMMANDS:
        ran = await smartmob(command, "--help", env=env)
        assert ran.code == 0
        assert "\nexample" in ran.out
        assert f"smartmob {command}" in ran.out.split("\nexample")[1]


async def test_keys_from_the_environment_and_the_config_file(tmp_path: Path) -> None:
    """Without a key the command exits 4; SMARTMOB_TOKEN, or a token file named in
    agents.toml, is sent as the key."""
    admin = "admin-key-0123456789"
    async with running_agent(tmp_path / "state", "--token", admin) as agent:
        env = cli_env(tmp_path / "home", SMARTMOB_URL=agent.url)
        ran = await smartmob("ls", env=env)
        assert ran.code == 4
        assert one_line(ran.err).startswith(
            f"smartmob: agent {agent.url}: this agent needs a key")
        ran = await smartmob("ls", env={**env, "SMARTMOB_TOKEN": admin})
        assert ran.code == 0
        config = tmp_path / "home" / ".config" / "smartmob"
        config.mkdir(parents=True)
        (config / "prod.key").write_text(admin + "\n")
        (config / "agents.toml").write_text(
            f'[agents.prod]\nurl = "{agent.url}"\ntoken_file = "prod.key"\n')
        env = cli_env(tmp_path / "home")
        ran = await smartmob("ls", "--json", env=env)  # the only agent is the default
        assert ran.code == 0
        assert ran.json()["agents"][0]["agent"] == "prod"
        ran = await smartmob("ls", "--agent", "prod", env=env)
        assert ran.code == 0
        (config / "agents.toml").write_text("[agents.prod\n")
        ran = await smartmob("ls", env=env)
        assert ran.code == 2
        assert "is not valid TOML" in one_line(ran.err)


async def test_logs_since(env: dict[str, str], source: str, client: AgentClient) -> None:
    """logs --since shows the lines from that time on; with -f it then follows."""
    await created_and_running(client, source)
    async with client.attach("shop.web.0") as console:
        await console.send("one")
        [said] = await read_until(console, lambda line: line.line == "you said: one")
    assert said.at is not None
    ran = await smartmob("logs", "shop.web.0", "--since", said.at, env=env)
    assert ran.code == 0
    assert [line.split(" ", 2)[2] for line in ran.out.splitlines()] == ["you said: one"]
    follow = await Following.start("logs", "shop.web.0", "-f", "--since", said.at, env=env)
    await follow.line(lambda line: line.endswith("stdout you said: one"))
    async with client.attach("shop.web.0") as console:
        await console.send("two")
        await follow.line(lambda line: line.endswith("stdout you said: two"))
    ran = await follow.interrupt()
    assert ran.code == 0
    assert not [line for line in follow.out if line.endswith(" ready")]
    ran = await smartmob("logs", "shop.web.0", "--since", "yesterday", env=env)
    assert ran.code == 1
    said_by_agent = one_line(ran.err)  # the agent's own sentence on the bad query
    assert "since" in said_by_agent
    assert "ISO 8601" in said_by_agent


async def test_tokens_list_and_revoke(tmp_path: Path, archive_server: ArchiveServer) -> None:
    """tokens lists the minted keys (id and app); --revoke revokes one, and an unknown id
    is not found (5); an app key may not list them (4)."""
    admin = "admin-key-0123456789"
    async with running_agent(tmp_path / "state", "--token", admin,
                             "--app-token", "shop=shop-key-0123456789") as agent:
        async with AgentClient(agent.url, token=admin) as client:
            created = await client.create("shop", "web.0", archive_server.add(
                "echo.tgz", echo_archive()), issue_token=True)
        minted = created.extra["token"]
        env = cli_env(tmp_path / "home", SMARTMOB_URL=agent.url, SMARTMOB_TOKEN=admin)
        ran = await smartmob("tokens", env=env)
        assert ran.code == 0
        header, row = ran.out.splitlines()
        assert header.split() == ["ID", "APP", "CREATED"]
        assert row.split()[:2] == [minted["id"], "shop"]
        ran = await smartmob("tokens", "--revoke", minted["id"], env=env)
        assert (ran.code, ran.out) == (0, f"{minted['id']}: revoked\n")
        ran = await smartmob("tokens", "--revoke", minted["id"], env=env)
        assert ran.code == 5
        assert one_line(ran.err).endswith(f"no minted key has the id '{minted['id']}'")
        ran = await smartmob("tokens", env={**env, "SMARTMOB_TOKEN": "shop-key-0123456789"})
        assert ran.code == 4
        one_line(ran.err)
