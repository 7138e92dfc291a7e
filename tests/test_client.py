"""The library against the real ``smartmob-agent`` command: every call, typed results,
the agent's own error sentences, WebSockets, uploads and the synchronous facade."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from smartmob_agent import __version__
from smartmob_agent.client import (
    Agent,
    AgentClient,
    ConflictError,
    ForbiddenError,
    InvalidRequestError,
    NotFoundError,
    ProcessFailed,
    UnauthorizedError,
)
from smartmob_agent.client.pack import pack_folder, sha256_of
from smartmob_agent.client.results import Exit, LogLine, Process
from tests.agent_process import AgentProcess
from tests.client_apps import (
    created_and_running,
    echo_archive,
    read_until,
    running_agent,
    write_echo_app,
)
from tests.conftest import ArchiveServer

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def agent_process(tmp_path: Path) -> AsyncIterator[AgentProcess]:
    async with running_agent(tmp_path / "state") as agent:
        yield agent


@pytest.fixture
async def client(agent_process: AgentProcess) -> AsyncIterator[AgentClient]:
    async with AgentClient(agent_process.url) as client:
        yield client


@pytest.fixture
def source(archive_server: ArchiveServer) -> str:
    return archive_server.add("echo.tgz", echo_archive())


async def test_create_wait_and_read_a_process(client: AgentClient, source: str) -> None:
    """create answers a typed pending process; wait_for returns it running, with the
    fields of the status document typed; logs has its first line with a seq."""
    created = await client.create("shop", "web.0", source, env={"GREETING": "hi"})
    assert isinstance(created, Process)
    assert (created.slug, created.app, created.node, created.process_type) == (
        "shop.web.0", "shop", "web.0", "web")
    assert created.state == "pending"
    assert created.options is not None
    assert created.options["restart"] == "always"
    assert {"details", "attach", "logs", "start", "stop", "signal"} <= set(created.links)
    # fields the client does not type yet are kept (the agent's update and socket
    # fields among them)
    assert {"backoff_delay": None, "next_start_at": None, "download": None}.items() \
        <= created.extra.items()
    running = await client.wait_for("shop.web.0", "running", timeout=20)
    assert running.state == "running"
    assert isinstance(running.pid, int)
    assert isinstance(running.port, int)
    assert running.restarts == 0
    assert running.agent == client.name
    console = client.attach(running, tail=10)
    async with console:
        await read_until(console, lambda line: line.line == "ready")
    [line] = await client.logs("shop.web.0", tail=1)
    assert line.line == "ready"
    assert line.stream == "stdout"
    assert isinstance(line.seq, int)
    assert line.pid == running.pid
    assert [p.slug for p in await client.list()] == ["shop.web.0"]


async def test_controls_and_delete(client: AgentClient, source: str) -> None:
    """stop, start, restart and signal answer the status document; a deleted process is
    NotFoundError with the agent's own sentence."""
    running = await created_and_running(client, source)
    stopped = await client.stop("shop.web.0")
    assert stopped.state == "stopped"
    assert stopped.pid is None
    assert isinstance(stopped.last_exit, Exit)
    assert stopped.last_exit.reason == "stopped"
    assert stopped.last_exit.describe() == "killed by SIGTERM (stopped)"
    assert (await client.start("shop.web.0")).state == "starting"
    await client.wait_for("shop.web.0", "running", timeout=20)
    assert (await client.restart(stopped)).state in {"starting", "pending"}
    again = await client.wait_for("shop.web.0", "running", timeout=20)
    assert again.pid != running.pid
    console = client.attach("shop.web.0", tail=100)
    async with console:  # the handler is set once the new child says ready
        await read_until(console, lambda line: line.line == "ready" and line.pid == again.pid)
        signalled = await client.signal("shop.web.0", "SIGHUP")
        assert signalled.state == "running"
        await read_until(console, lambda line: line.line == "reloading on SIGHUP")
    await client.delete("shop.web.0")
    with pytest.raises(NotFoundError) as caught:
        await client.status(again)
    assert caught.value.status == 404
    assert caught.value.error == "there is no process named 'shop.web.0'"
    assert str(caught.value) == f"agent {client.name}: there is no process named 'shop.web.0'"


async def test_errors_carry_the_agents_sentence(client: AgentClient, source: str) -> None:
    """A 409 is a ConflictError and a 400 an InvalidRequestError naming each bad field, each
    carrying what the agent said."""
    await created_and_running(client, source)
    with pytest.raises(ConflictError) as conflict:
        await client.create("shop", "web.0", source)
    assert conflict.value.error == "a process named 'shop.web.0' already exists; delete it first"
    with pytest.raises(ConflictError, match="start applies to a stopped"):
        await client.start("shop.web.0")
    with pytest.raises(InvalidRequestError) as invalid:
        await client.create("shop", "web..1", "ftp://example.com/app.zip", restart="sometimes")
    assert invalid.value.status == 400
    assert set(invalid.value.fields) == {"node", "source_url", "restart"}
    assert invalid.value.error == "invalid fields in the request: node, restart, source_url"
    assert invalid.value.to_dict()["kind"] == "invalid"


async def test_wait_for_a_process_that_fails(client: AgentClient, source: str) -> None:
    """Waiting for running on a process that fails raises ProcessFailed with its error;
    a steady wait sees through a command that is running for an instant only."""
    await client.create("shop", "ghost.0", source)
    with pytest.raises(ProcessFailed) as caught:
        await client.wait_for("shop.ghost.0", "running", timeout=20)
    assert caught.value.process.state == "failed"
    assert 'the Procfile has no process type "ghost"' in str(caught.value)
    exited = await client.create("shop", "crash.0", source, restart="never")
    # running for an instant only: steady waits for start_seconds of it, and sees it end
    with pytest.raises(ProcessFailed, match="is exited: exited with code 3"):
        await client.wait_for(exited, "running", timeout=20, steady=True)
    assert (await client.wait_for(exited, ["exited", "failed"], timeout=5)).state == "exited"


async def test_attach_round_trip_and_resume(client: AgentClient, source: str) -> None:
    """A line sent to the console reaches the process's stdin and its answer comes back;
    a console opened with after= the seq of an earlier line replays what followed it."""
    await created_and_running(client, source)
    async with client.attach("shop.web.0", tail=10) as console:
        [*_, ready] = await read_until(console, lambda line: line.line == "ready")
        await console.send("hello")
        [answer] = await read_until(console, lambda line: line.line.startswith("you said"))
        assert answer.line == "you said: hello"
        assert console.last_seq == answer.seq
    assert ready.seq is not None
    async with client.attach("shop.web.0", after=ready.seq) as resumed:
        first = await resumed.__anext__()
    assert first == answer


async def test_events_see_a_kill_9_as_exit_then_online(client: AgentClient,
                                                       source: str) -> None:
    """kill -9 of a process's child shows on the events stream as process:exit (SIGKILL)
    then process:online with a new pid."""
    running = await created_and_running(client, source)
    assert running.pid is not None
    seen = []
    async with client.events(slug="shop.web.0") as events:
        os.kill(running.pid, signal.SIGKILL)
        async with asyncio.timeout(20):
            async for event in events:
                seen.append(event)
                if event.event == "process:online":
                    break
    kinds = [event.event for event in seen]
    exit_event = seen[kinds.index("process:exit")]
    assert exit_event.document["signal"] == "SIGKILL"
    assert exit_event.pid == running.pid
    assert kinds.index("process:exit") < kinds.index("process:online")
    assert seen[-1].pid not in (None, running.pid)
    assert seen[-1].agent == client.name


async def test_upload_a_folder_and_run_it(client: AgentClient, tmp_path: Path) -> None:
    """upload packs a folder without what its .gitignore leaves out, the agent's checksum
    is the packed archive's, and a process created from it runs those files only."""
    folder = write_echo_app(tmp_path / "app")
    (folder / "Procfile").write_text(
        (folder / "Procfile").read_text() + "files: echo files: *; exec sleep 1000\n")
    (folder / ".gitignore").write_text("secret.txt\nbuild/\n")
    (folder / "secret.txt").write_text("do not ship")
    (folder / "build").mkdir()
    (folder / "build" / "out.bin").write_text("junk")
    sent: list[tuple[int, int]] = []
    upload = await client.upload(folder, progress=lambda done, total: sent.append((done, total)))
    packed = pack_folder(folder)
    try:
        assert upload.checksum == "sha256:" + sha256_of(packed)
        assert upload.size == packed.stat().st_size
    finally:
        packed.unlink()
    assert sent[-1] == (upload.size, upload.size)
    assert (await client.upload(folder)) == upload  # the same files, the same archive
    await client.create("shop", "files.0", upload.source_url, checksum=upload.checksum)
    async with client.attach("shop.files.0", tail=10) as console:
        [*_, line] = await read_until(console, lambda line: line.line.startswith("files:"))
    assert line.line == "files: Procfile echo.py"


async def test_bulk_version_and_the_sync_facade(client: AgentClient, source: str,
                                                agent_process: AgentProcess) -> None:
    """Bulk controls answer one outcome per process; version is the agent's; the sync
    facade lists the same processes."""
    await created_and_running(client, source)
    await created_and_running(client, source, node="worker.0")
    outcomes = await client.bulk("stop", app="shop")
    assert [(o.slug, o.ok) for o in outcomes] == [("shop.web.0", True), ("shop.worker.0", True)]
    again = await client.bulk("stop", every=True)
    assert [o.ok for o in again] == [False, False]
    assert again[0].error == "process 'shop.web.0' is already stopped"
    assert await client.version() == __version__

    def in_a_script() -> list[tuple[str, str | None]]:
        with Agent(agent_process.url) as agent:
            lines = agent.logs("shop.web.0", tail=1)
            assert isinstance(lines[0], LogLine)
            return [(p.slug, p.state) for p in agent.list()]

    assert await asyncio.to_thread(in_a_script) == [
        ("shop.web.0", "stopped"), ("shop.worker.0", "stopped")]
    await client.bulk("delete", app="shop")
    assert await client.list() == []


async def test_keys(tmp_path: Path) -> None:
    """Without a key the agent is UnauthorizedError; an app key may not list the keys
    (ForbiddenError); the admin key may."""
    async with running_agent(tmp_path / "state", "--token", "admin-key-0123456789",
                             "--app-token", "shop=shop-key-0123456789") as agent:
        async with AgentClient(agent.url) as stranger:
            with pytest.raises(UnauthorizedError) as caught:
                await stranger.list()
        assert caught.value.status == 401
        assert caught.value.kind == "auth"
        assert caught.value.error is not None
        assert caught.value.error.startswith("this agent needs a key")
        async with AgentClient(agent.url, token="shop-key-0123456789") as shop:
            assert await shop.list() == []
            with pytest.raises(ForbiddenError):
                await shop.tokens()
        async with AgentClient(agent.url, token="admin-key-0123456789") as admin:
            assert await admin.tokens() == []
            async with admin.events() as events:  # the key opens WebSockets too
                assert events.url.startswith("ws://")
