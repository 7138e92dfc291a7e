"""The lossless tail: an attached client that reads more slowly than the process writes is
served from the log, and loses only what rotation removed before it read it.

A real agent, real children (puppets the test drives), real sockets: a client that
"stops reading" is a socket that is not read (or an aiohttp client whose ``receive`` is
not called); waits are on the agent's state and on frames, with deadlines.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from smartmob_agent.config import Settings
from smartmob_agent.model import ProcessState as S
from smartmob_agent.output.follow import Follower
from smartmob_agent.supervision.agent import Agent
from smartmob_agent.web.lossless import LosslessSubscriber
from smartmob_agent.web.server import make_app
from smartmob_agent.web.subscriber import MAX_BUFFER
from tests.conftest import ArchiveServer
from tests.helpers import eventually, wait_for_state
from tests.puppet import Puppet, PuppetServer
from tests.test_attach_options import parse_frames
from tests.test_ws_functional import open_stuck_client, socket_subscribers, start_puppet

Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[Client]]
Frame = dict[str, Any]

#: Lines a test writes while its client does not read: ~6 MB of text frames (twice as
#: much in JSON), well past what the agent queues for one client (1 MiB) and what the
#: sockets hold (the kernel may take 4 MB for the agent's side alone).
FLOOD = 60_000
#: How far past MAX_BUFFER a client's queue may go: one live batch or one piece read
#: back from the log (256 KiB of records, about twice that as JSON frames).
SLACK = 768 * 1024


def flood(count: int = FLOOD, tag: str = "n") -> str:
    """A puppet statement printing ``count`` numbered lines of ~100 bytes."""
    return f"[print(f'{tag} {{i:06d}} ' + 'y' * 90) for i in range({count})]"


async def behind(agent: Agent, slug: str) -> LosslessSubscriber:
    """The one attached client of ``slug``, once it is served from the log; its queue
    stays bounded meanwhile."""
    hub = agent.get(slug).hub
    await eventually(lambda: hub.subscriber_count == 1, what="the client attached")
    [subscriber] = socket_subscribers(hub)
    assert isinstance(subscriber, LosslessSubscriber)
    await eventually(lambda: subscriber.behind, what="the client to fall behind")
    assert subscriber._transport.get_write_buffer_size() <= MAX_BUFFER + SLACK
    return subscriber


async def read_json(
    sock: socket.socket, received: list[Frame], done: Callable[[list[Frame]], bool],
    timeout: float = 30.0,
) -> None:
    """Read JSON frames from ``sock`` into ``received`` until ``done`` holds (or the
    socket ends)."""
    loop = asyncio.get_running_loop()
    data = bytearray()
    async with asyncio.timeout(timeout):
        while not done(received):
            chunk = await loop.sock_recv(sock, 1 << 20)
            if not chunk:
                return
            data.extend(chunk)
            received.extend(json.loads(payload) for payload in parse_frames(data))


def small_receive_buffer(address: Any) -> socket.socket:
    """A client socket with a 4 KiB receive buffer (for ``TCPConnector.socket_factory``)."""
    family, kind, proto = address[0], address[1], address[2]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock


def has_line(text: str) -> Callable[[list[Frame]], bool]:
    return lambda frames: any(f.get("line") == text for f in frames[-5:])


def live_after(text: str) -> Callable[[list[Frame]], bool]:
    """Whether the line ``text`` came, and the client is live (a replay that took it
    over has ended): it may fall behind more than once while the child writes."""
    def done(frames: list[Frame]) -> bool:
        if not any(f.get("line") == text for f in frames[-1000:]):
            return False
        events = [f["event"] for f in frames if f.get("event") in ("replaying", "live")]
        return bool(events) and events[-1] == "live"
    return done


def lines_of(frames: list[Frame]) -> list[Frame]:
    return [f for f in frames if "seq" in f]


def check_replays(frames: list[Frame], ended: bool = True) -> int:
    """Check every ``replaying`` frame names the line after it and every ``live`` frame
    counts the lines since (and, if ``ended``, that the last replay ended); return how
    many times the client fell behind."""
    episodes = 0
    start: int | None = None
    for i, frame in enumerate(frames):
        if frame.get("event") == "replaying":
            assert start is None, "replaying twice without live between"
            after = frames[i:]
            following = next(f for f in after if "seq" in f)
            lost = sum(f["count"] for f in after[:after.index(following)]
                       if f.get("event") == "dropped")
            assert frame["from"] + lost == following["seq"]
            start, episodes = i, episodes + 1
        elif frame.get("event") == "live":
            assert start is not None, "live without replaying"
            assert frame["replayed"] == len(lines_of(frames[start:i]))
            start = None
    assert start is None or not ended, "the last replay did not end"
    return episodes


def check_in_order(lines: list[Frame], tag: str = "n") -> None:
    """Numbers follow on one by one, and so do the lines' own counters."""
    first = lines[0]["seq"]
    assert [f["seq"] for f in lines] == list(range(first, first + len(lines)))
    counters = [int(f["line"].split()[1]) for f in lines]
    assert counters == list(range(counters[0], counters[0] + len(lines)))
    assert all(f["line"].startswith(tag + " ") for f in lines)


async def test_a_client_that_stops_reading_gets_every_line_then_live(
    client: Client, agent: Agent, archive_server: ArchiveServer, puppets: PuppetServer
) -> None:
    """A JSON client that reads nothing while the child writes ~3 MB falls behind (its
    queue bounded), then, once it reads, gets every line in order with its number, a
    ``replaying`` frame where the log took over and a ``live`` frame where it ends."""
    process, puppet = await start_puppet(client, agent, archive_server, puppets)
    server = client.server
    sock = await open_stuck_client(str(server.host), int(server.port or 0),
                                   f"/attach-console/{process['slug']}?format=json")
    await eventually(lambda: agent.get(process["slug"]).hub.subscriber_count == 1,
                     what="the client attached")
    await puppet.run(flood())  # the child is never held back by the client
    subscriber = await behind(agent, process["slug"])
    await puppet.run("print('done')")
    received: list[Frame] = []
    await read_json(sock, received, live_after("done"))
    sock.close()
    lines = lines_of(received)
    assert [f["line"] for f in lines] == [
        f"n {i:06d} " + "y" * 90 for i in range(FLOOD)] + ["done"]
    assert [f["seq"] for f in lines] == list(range(lines[0]["seq"], lines[0]["seq"] + FLOOD + 1))
    assert check_replays(received) >= 1
    assert not [f for f in received if f.get("event") == "dropped"]
    assert subscriber.dropped == 0


@pytest.mark.timeout(300)  # its reads have their own deadline on progress
async def test_a_plain_aiohttp_client_gets_every_line(
    client: Client, agent: Agent, archive_server: ArchiveServer, puppets: PuppetServer
) -> None:
    """A bare text client (``async for msg in ws``) that starts reading late gets every
    line, in order, between a notice where the replay starts and one where it ends."""
    process, puppet = await start_puppet(client, agent, archive_server, puppets)
    # a small receive buffer: the kernel would otherwise take megabytes for the client
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(socket_factory=small_receive_buffer)
    ) as session:
        ws = await session.ws_connect(process["attach"])
        await eventually(lambda: agent.get(process["slug"]).hub.subscriber_count == 1,
                         what="the client attached")
        await puppet.run(flood())
        await behind(agent, process["slug"])
        await puppet.run("print('done')")
        texts: list[str] = []
        replays = 0  # open replays: it may fall behind more than once while the child writes
        done = False
        while not done or replays:
            # a deadline on progress, not on the whole: 60,000 frames through a 4 KiB
            # buffer take a loaded machine well over 30 s, a stuck stream never ends
            async with asyncio.timeout(10):
                message = await ws.receive()
            assert message.type is aiohttp.WSMsgType.TEXT, message
            texts.append(message.data)
            done = done or message.data == "done"
            replays += texts[-1].startswith("[smartmob-agent] replaying")
            replays -= texts[-1].startswith("[smartmob-agent] live again")
        await ws.close()
    lines = [t for t in texts if not t.startswith("[smartmob-agent] ")]
    assert lines == [f"n {i:06d} " + "y" * 90 for i in range(FLOOD)] + ["done"]
    notices = [(i, t) for i, t in enumerate(texts) if t.startswith("[smartmob-agent] ")]
    assert notices
    assert len(notices) % 2 == 0, notices
    for (start, replaying), (end, live) in zip(notices[::2], notices[1::2], strict=True):
        assert replaying.startswith("[smartmob-agent] replaying from the log from line ")
        assert live == (f"[smartmob-agent] live again: {end - start - 1} line(s) replayed "
                        "from the log")


@pytest.fixture
async def rotating(
    settings: Settings, aiohttp_client: MakeClient, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[Agent, Client]]:
    """An agent whose logs rotate every ``max_bytes`` and keep ``files`` rotated files
    (the test's parameter: a dict)."""
    small = dataclasses.replace(settings, log_lines=100, **request.param,
                                state_dir=settings.state_dir.with_name("rotating"))
    async with Agent(small) as agent:
        yield agent, await aiohttp_client(make_app(small, agent))


@pytest.mark.parametrize("rotating", [{"log_max_bytes": 400_000, "log_files": 40}],
                         indirect=True)
async def test_the_replay_follows_the_files_across_rotations(
    rotating: tuple[Agent, Client], archive_server: ArchiveServer, puppets: PuppetServer
) -> None:
    """While the client is behind, the log rotates several times; as long as the files
    keep the lines, it gets every one, in order, read across the rotated files."""
    agent, client = rotating
    process, puppet = await start_puppet(client, agent, archive_server, puppets)
    server = client.server
    sock = await open_stuck_client(str(server.host), int(server.port or 0),
                                   f"/attach-console/{process['slug']}?format=json")
    await eventually(lambda: agent.get(process["slug"]).hub.subscriber_count == 1,
                     what="the client attached")
    await puppet.run(flood())
    await behind(agent, process["slug"])
    await puppet.run("print('done')")
    assert agent.get(process["slug"]).output_log.rotations >= 4
    received: list[Frame] = []
    await read_json(sock, received, live_after("done"))
    sock.close()
    lines = lines_of(received)
    assert [f["line"] for f in lines][-1] == "done"
    check_in_order(lines[:-1])
    assert len(lines) == FLOOD + 1
    assert check_replays(received) >= 1
    assert not [f for f in received if f.get("event") == "dropped"]


@pytest.mark.parametrize("rotating", [{"log_max_bytes": 100_000, "log_files": 1}],
                         indirect=True)
async def test_lines_rotated_away_before_the_client_read_them_are_counted(
    rotating: tuple[Agent, Client], archive_server: ArchiveServer, puppets: PuppetServer
) -> None:
    """Lines the log no longer keeps when the client gets to them are the only ones it
    loses: a ``dropped`` frame counts exactly the numbers missing, and the lines after
    it follow on in order."""
    agent, client = rotating
    process, puppet = await start_puppet(client, agent, archive_server, puppets)
    server = client.server
    sock = await open_stuck_client(str(server.host), int(server.port or 0),
                                   f"/attach-console/{process['slug']}?format=json")
    await eventually(lambda: agent.get(process["slug"]).hub.subscriber_count == 1,
                     what="the client attached")
    await puppet.run(flood())
    subscriber = await behind(agent, process["slug"])
    await puppet.run("print('done')")
    received: list[Frame] = []
    await read_json(sock, received, live_after("done"))
    sock.close()
    dropped = [f["count"] for f in received if f.get("event") == "dropped"]
    assert dropped
    assert sum(dropped) == subscriber.dropped, [f for f in received if "seq" not in f]
    previous, pending = None, 0
    for frame in received:  # each gap in the numbers is what a dropped frame says
        if frame.get("event") == "dropped":
            pending += frame["count"]
        elif "seq" in frame:
            if previous is not None:
                assert frame["seq"] - previous - 1 == pending
            previous, pending = frame["seq"], 0
    lines = lines_of(received)
    assert lines[-1]["line"] == "done"
    assert lines[-2]["line"].startswith(f"n {FLOOD - 1:06d} ")
    assert len(lines) + sum(dropped) == FLOOD + 1
    assert check_replays(received) >= 1


async def test_markers_keep_their_place_while_the_client_is_behind(
    client: Client, agent: Agent, archive_server: ArchiveServer, puppets: PuppetServer
) -> None:
    """The child exits and is started again while the client is behind: ``exited``
    (``backoff``) and ``spawned`` come, once it reads, right after the first child's
    last line and before the second child's first."""
    process, puppet = await start_puppet(client, agent, archive_server, puppets)
    server = client.server
    sock = await open_stuck_client(str(server.host), int(server.port or 0),
                                   f"/attach-console/{process['slug']}?format=json")
    await eventually(lambda: agent.get(process["slug"]).hub.subscriber_count == 1,
                     what="the client attached")
    await puppet.run(flood())
    await behind(agent, process["slug"])
    puppet.writer.write(b"sys.stdout.flush(); os._exit(3)\n")
    second: Puppet = await puppets.next()
    await second.run("print('second')")
    received: list[Frame] = []
    await read_json(sock, received, has_line("second"))
    sock.close()
    last = next(i for i, f in enumerate(received) if f.get("line", "").startswith(
        f"n {FLOOD - 1:06d} "))
    events = [f.get("event", f.get("line")) for f in received[last + 1:]]
    # (a backoff comes between them if the policy waits before the restart)
    assert [e for e in events if e not in ("replaying", "live", "backoff")] == [
        "exited", "spawned", "second"]
    if "backoff" in events:
        assert events.index("exited") < events.index("backoff") < events.index("spawned")
    exited = received[last + 1 + events.index("exited")]
    assert (exited["code"], exited["pid"]) == (3, received[last]["pid"])
    check_in_order(lines_of(received[:last + 1]))


async def test_a_behind_client_does_not_hang_delete(
    client: Client, agent: Agent, archive_server: ArchiveServer, puppets: PuppetServer
) -> None:
    """Deleting a process whose client stopped reading (and is served from the log) ends
    promptly, cutting the client off."""
    process, puppet = await start_puppet(client, agent, archive_server, puppets)
    server = client.server
    sock = await open_stuck_client(str(server.host), int(server.port or 0),
                                   f"/attach-console/{process['slug']}")
    await eventually(lambda: agent.get(process["slug"]).hub.subscriber_count == 1,
                     what="the client attached")
    await puppet.run(flood())
    subscriber = await behind(agent, process["slug"])
    async with asyncio.timeout(10):
        response = await client.session.post(process["delete"])
        assert response.status == 200
        await subscriber.wait_closed()
    assert subscriber._transport.is_closing()
    sock.close()


async def test_after_resumes_with_every_line_the_log_keeps(
    client: Client, agent: Agent, archive_server: ArchiveServer, puppets: PuppetServer
) -> None:
    """``?after`` alone resumes with every line after it that the log keeps, past the
    10000 a ``tail`` may ask for; with ``live=1`` it sends the last 10000, as before."""
    process, puppet = await start_puppet(client, agent, archive_server, puppets)
    await puppet.run("print('seen')")
    response = await client.get(f"/process-logs/{process['slug']}?tail=1")
    [seen] = await response.json()
    await puppet.run(flood(15_000))
    await puppet.run("print('done')")
    ws = await client.session.ws_connect(process["attach"] + f"?format=json&after={seen['seq']}")
    frames: list[Frame] = []
    async with asyncio.timeout(30):
        while not frames or frames[-1].get("line") != "done":
            frames.append(json.loads((await ws.receive()).data))
    await ws.close()
    assert frames[0]["seq"] == seen["seq"] + 1
    check_in_order(frames[:-1])
    assert len(frames) == 15_001
    ws = await client.session.ws_connect(
        process["attach"] + f"?format=json&after={seen['seq']}&live=1")
    first = json.loads((await ws.receive()).data)
    assert first == {"event": "dropped", "count": 15_001 - 10_000}
    await ws.close()


async def test_across_an_agent_restart(
    settings: Settings, aiohttp_client: MakeClient, archive_server: ArchiveServer,
    puppets: PuppetServer,
) -> None:
    """A client behind when the agent stops gets what reached it; resuming with
    ``after`` on the next agent (same state folder), it gets every later line of the
    first child and then those of the next one, in order; falling behind again, it is
    told where the replay starts and ends."""
    async with Agent(settings) as agent:
        client = await aiohttp_client(make_app(settings, agent))
        process, puppet = await start_puppet(client, agent, archive_server, puppets)
        server = client.server
        sock = await open_stuck_client(str(server.host), int(server.port or 0),
                                       f"/attach-console/{process['slug']}?format=json")
        await eventually(lambda: agent.get(process["slug"]).hub.subscriber_count == 1,
                         what="the client attached")
        await puppet.run(flood())
        await behind(agent, process["slug"])
        await client.close()  # the agent's web server stops: the client is cut off
    received: list[Frame] = []
    await read_json(sock, received, lambda _: False)  # what reached it, until closed
    sock.close()
    check_replays(received, ended=False)  # (the agent's own queue for it went with it)
    before = lines_of(received)
    check_in_order(before)
    async with Agent(settings) as agent:
        client = await aiohttp_client(make_app(settings, agent))
        await wait_for_state(agent.get(process["slug"]), S.RUNNING)
        puppet = await puppets.next()
        await puppet.run("print('next agent')")
        ws = await client.ws_connect(  # this agent's address
            f"/attach-console/{process['slug']}?format=json&after={before[-1]['seq']}")
        after: list[Frame] = []
        async with asyncio.timeout(30):
            while not after or after[-1].get("line") != "next agent":
                after.append(json.loads((await ws.receive()).data))
        # the first child's lines go on where the client was cut off, to the last one
        old = lines_of(after)[:-1]
        check_in_order(before + old)
        assert old[-1]["line"].startswith(f"n {FLOOD - 1:06d} ")
        assert after[-1]["seq"] > old[-1]["seq"]
        # it falls behind again under this agent: replaying, then live, every line
        await puppet.run(flood(tag="m"))
        await behind(agent, process["slug"])
        await puppet.run("print('done')")
        until_live = live_after("done")
        async with asyncio.timeout(30):
            while not until_live(after):
                after.append(json.loads((await ws.receive()).data))
        await ws.close()
    assert check_replays(after) >= 1
    newest = [f for f in lines_of(after) if f["line"].startswith("m ")]
    check_in_order(newest, tag="m")
    assert len(newest) == FLOOD


async def test_a_log_that_cannot_be_read_back_closes_the_socket_with_a_reason(
    client: Client, agent: Agent, archive_server: ArchiveServer, puppets: PuppetServer,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """When reading the log back fails (an I/O error of the disk), the client is told with
    a 1011 close and a reason, and the agent logs it, instead of a socket that stays open
    and silent for ever; the process and the agent go on."""
    process, puppet = await start_puppet(client, agent, archive_server, puppets)
    await puppet.run("print('seen')")

    async def broken(self: Follower) -> Any:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(Follower, "read", broken)
    ws = await client.session.ws_connect(process["attach"] + "?format=json&after=0")
    async with asyncio.timeout(10):
        message = await ws.receive()
    assert message.type is aiohttp.WSMsgType.CLOSE
    assert ws.close_code == 1011
    assert message.extra == "the agent could not read the process's log"
    assert any("reading the log back" in r.getMessage() for r in caplog.records)
    monkeypatch.undo()
    await puppet.run("print('still here')")
    response = await client.get(f"/process-logs/{process['slug']}?tail=1")
    assert [line["line"] for line in await response.json()] == ["still here"]
