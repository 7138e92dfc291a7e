"""The ``attach`` WebSocket's options: ``?tail``, ``?after``, ``?format=json``; and the
``agent-log`` link.

Real children (puppets the test drives, or small scripts), a real agent and a real
HTTP/WebSocket client; waits are on frames with deadlines, never on guessed sleeps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from smartmob_agent.config import Settings
from smartmob_agent.model import LogLine, Stamp
from smartmob_agent.model import ProcessState as S
from smartmob_agent.output.logs import LOG_NAME
from smartmob_agent.supervision.agent import Agent
from smartmob_agent.web.server import make_app
from smartmob_agent.web.subscriber import WebSocketSubscriber
from tests.conftest import ArchiveServer
from tests.helpers import app_archive, eventually, wait_for_state
from tests.puppet import PuppetServer
from tests.test_logs import logged
from tests.test_ws_functional import open_stuck_client, socket_subscribers, start_puppet

Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[Client]]

#: Prints three lines and exits with 3: a crash loop, each run numbered in "runs".
CRASH = """
import os, sys
run = 1 + (int(open("runs").read()) if os.path.exists("runs") else 0)
open("runs", "w").write(str(run))
for i in range(3):
    print(f"run {run} line {i}", flush=True)
sys.exit(3)
"""


async def frames(ws: aiohttp.ClientWebSocketResponse, count: int) -> list[str]:
    """The next ``count`` text frames (10 s deadline)."""
    found: list[str] = []
    async with asyncio.timeout(10):
        while len(found) < count:
            message = await ws.receive()
            assert message.type == aiohttp.WSMsgType.TEXT, message
            found.append(message.data)
    return found


async def json_frames(ws: aiohttp.ClientWebSocketResponse, count: int) -> list[dict[str, Any]]:
    return [json.loads(frame) for frame in await frames(ws, count)]


async def until(
    ws: aiohttp.ClientWebSocketResponse, done: Callable[[dict[str, Any]], bool],
    timeout: float = 10.0,
) -> list[dict[str, Any]]:
    """JSON frames up to and including the first for which ``done`` holds."""
    found: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while True:
            message = await ws.receive()
            assert message.type == aiohttp.WSMsgType.TEXT, message
            found.append(json.loads(message.data))
            if done(found[-1]):
                return found


@pytest.fixture
async def small_ring(
    settings: Settings, aiohttp_client: MakeClient
) -> AsyncIterator[tuple[Agent, Client]]:
    """An agent that keeps 3 lines in memory: replays read its files."""
    small = dataclasses.replace(settings, log_lines=3,
                                state_dir=settings.state_dir.with_name("small"))
    async with Agent(small) as agent:
        yield agent, await aiohttp_client(make_app(small, agent))


# -- tail ------------------------------------------------------------------------------------


async def test_tail_replays_the_last_lines_then_follows_live(
    client: Client, agent: Agent, archive_server: ArchiveServer, puppets: PuppetServer
) -> None:
    """``?tail=5`` sends the last 5 lines as bare text frames, then the live ones; no
    ``tail`` replays nothing (the seed's contract)."""
    process, puppet = await start_puppet(client, agent, archive_server, puppets)
    await puppet.run("[print('old', i) for i in range(20)]")
    await logged(agent, process["slug"], "old 19")
    replaying = await client.session.ws_connect(process["attach"] + "?tail=5")
    plain = await client.session.ws_connect(process["attach"])
    assert await frames(replaying, 5) == [f"old {i}" for i in range(15, 20)]
    await puppet.run("[print('new', i) for i in range(3)]")
    assert await frames(replaying, 3) == [f"new {i}" for i in range(3)]
    assert await frames(plain, 3) == [f"new {i}" for i in range(3)]
    await replaying.close()
    await plain.close()


@pytest.mark.parametrize("ring", ["memory", "files"])
async def test_replay_and_live_have_no_gap_and_no_duplicate(
    client: Client, agent: Agent, small_ring: tuple[Agent, Client],
    archive_server: ArchiveServer, puppets: PuppetServer, ring: str,
) -> None:
    """Attached while the child writes without pause, a replay (from memory, or from
    the files while lines keep coming) joins the live lines exactly: the numbers of
    every line received follow on one by one, and so do the lines' own counters."""
    if ring == "files":
        agent, client = small_ring
    process, puppet = await start_puppet(client, agent, archive_server, puppets)
    await puppet.run(
        "import threading, time; threading.Thread(target=lambda: [print('n', i, flush=True)"
        " or time.sleep(0.0002) for i in range(5000)], daemon=True).start()"
    )
    await logged(agent, process["slug"], "n 500")
    ws = await client.session.ws_connect(process["attach"] + "?tail=300&format=json")
    received = await until(ws, lambda frame: frame.get("line") == "n 4999", timeout=30)
    lines = [frame for frame in received if "seq" in frame]
    assert lines == received  # nothing but lines (no drop, no marker)
    assert len(lines) > 300
    first = lines[0]["seq"]
    assert [frame["seq"] for frame in lines] == list(range(first, first + len(lines)))
    counter = int(lines[0]["line"].split()[1])
    assert [frame["line"] for frame in lines] == [
        f"n {i}" for i in range(counter, counter + len(lines))]
    await ws.close()


# -- JSON frames -----------------------------------------------------------------------------


async def test_json_frames_carry_seq_time_stream_and_run(
    client: Client, agent: Agent, archive_server: ArchiveServer, puppets: PuppetServer
) -> None:
    """Each line is ``{"seq", "at", "stream", "line", "pid", "restarts"}``; the text
    mode of another client is untouched; input notices are JSON too."""
    process, puppet = await start_puppet(client, agent, archive_server, puppets)
    ws = await client.session.ws_connect(process["attach"] + "?format=json")
    text = await client.session.ws_connect(process["attach"])
    await puppet.run("print('to out'); print('to err', file=sys.stderr)")
    got = await json_frames(ws, 2)
    assert sorted(frame["stream"] for frame in got) == ["stderr", "stdout"]
    by_stream = {frame["stream"]: frame for frame in got}
    out = by_stream["stdout"]
    assert list(out) == ["seq", "at", "stream", "line", "pid", "restarts"]
    child = agent.get(process["slug"]).pid  # the shell the puppet runs under
    assert (out["line"], out["pid"], out["restarts"]) == ("to out", child, 0)
    assert by_stream["stderr"]["line"] == "to err"
    assert out["at"].endswith("Z")
    assert out["at"].startswith("20")
    assert got[1]["seq"] == got[0]["seq"] + 1
    assert sorted(await frames(text, 2)) == ["to err", "to out"]
    # the lines the logs link shows are the same documents
    response = await client.get(f"/process-logs/{process['slug']}?tail=2")
    assert sorted(await response.json(), key=lambda d: d["seq"]) == got
    await client.session.post(process["stop"])
    await until(ws, lambda frame: frame.get("event") == "exited")
    await ws.send_str("anyone?")
    notice = await json_frames(ws, 1)
    assert notice[0]["event"] == "notice"
    assert "input not delivered" in notice[0]["message"]
    await ws.close()
    await text.close()


async def test_lifecycle_markers_in_order_and_seq_across_restarts(
    client: Client, agent: Agent, archive_server: ArchiveServer
) -> None:
    """A crash loop gives spawned -> its lines -> exited -> backoff -> spawned ..., each
    line with the pid and restart count of its run, numbers increasing across runs."""
    url = archive_server.add("crash.tgz", app_archive("web: {PYTHON} crash.py\n",
                                                      {"crash.py": CRASH}))
    body = {"app": "myapp", "node": "web.0", "process_type": "web", "source_url": url,
            "start_seconds": 30, "backoff": {"initial": 0.2, "max": 0.2}}
    response = await client.post("/create-process", data=json.dumps(body))
    assert response.status == 201
    process = await response.json()
    ws = await client.session.ws_connect(process["attach"] + "?format=json")
    spawns = 0

    def third_spawn(frame: dict[str, Any]) -> bool:
        nonlocal spawns
        spawns += frame.get("event") == "spawned"
        return spawns == 3

    received = await until(ws, third_spawn, timeout=20)
    await ws.close()
    start = next(i for i, f in enumerate(received) if f.get("event") == "spawned")
    cycle, second = received[start:], (0, -1)
    for _run in range(2):
        spawned, *lines, exited, backoff = cycle[:6]
        assert spawned["event"] == "spawned"
        pid, restarts = spawned["pid"], spawned["restarts"]
        assert [(f["line"].split()[2:], f["pid"], f["restarts"]) for f in lines] == [
            (["line", str(i)], pid, restarts) for i in range(3)]
        assert {"event": "exited", "pid": pid, "restarts": restarts, "code": 3,
                "signal": None}.items() <= exited.items()
        assert backoff["event"] == "backoff"
        assert backoff["delay"] > 0
        assert all(f["at"].endswith("Z") for f in (spawned, exited, backoff))
        assert (pid, restarts) != second
        second = (pid, restarts)
        cycle = cycle[6:]
    assert cycle[0]["event"] == "spawned"
    assert cycle[0]["restarts"] == second[1] + 1
    seqs = [f["seq"] for f in received if "seq" in f]
    assert seqs == sorted(set(seqs))
    # markers go to JSON clients only, and are not kept in the log
    entries = await agent.get(process["slug"]).output_log.read(100)
    assert all(e.line.startswith("run ") for e in entries)


# -- after -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ring", ["memory", "files"])
async def test_after_resumes_exactly_where_the_client_left(
    client: Client, agent: Agent, small_ring: tuple[Agent, Client],
    archive_server: ArchiveServer, puppets: PuppetServer, ring: str,
) -> None:
    """A client that reconnects with ``?after=<last seq it saw>`` gets every line written
    meanwhile, once each, then the live ones; with ``tail`` smaller than what it missed,
    the last lines and a ``dropped`` frame counting the others."""
    if ring == "files":
        agent, client = small_ring
    process, puppet = await start_puppet(client, agent, archive_server, puppets)
    ws = await client.session.ws_connect(process["attach"] + "?format=json")
    await puppet.run("[print('seen', i) for i in range(10)]")
    seen = await json_frames(ws, 10)
    await ws.close()
    last = seen[-1]["seq"]
    await puppet.run("[print('missed', i) for i in range(10)]")
    await logged(agent, process["slug"], "missed 9")
    ws = await client.session.ws_connect(process["attach"] + f"?format=json&after={last}")
    resumed = await json_frames(ws, 10)
    assert [f["line"] for f in resumed] == [f"missed {i}" for i in range(10)]
    assert [f["seq"] for f in resumed] == list(range(last + 1, last + 11))
    await puppet.run("print('live')")
    live = await json_frames(ws, 1)
    assert (live[0]["line"], live[0]["seq"]) == ("live", last + 11)
    await ws.close()
    # text mode resumes the same way; a tail too small is said
    ws = await client.session.ws_connect(process["attach"] + f"?after={last}&tail=3")
    assert await frames(ws, 4) == [
        "[smartmob-agent] 8 line(s) not replayed: a replay sends at most the last 3",
        "missed 8", "missed 9", "live"]
    await ws.close()
    ws = await client.session.ws_connect(
        process["attach"] + f"?after={last}&tail=3&format=json")
    got = await json_frames(ws, 4)
    assert got[0] == {"event": "dropped", "count": 8}
    assert [f["seq"] for f in got[1:]] == [last + 9, last + 10, last + 11]
    await ws.close()


# -- dropped ---------------------------------------------------------------------------------


def parse_frames(data: bytearray) -> list[str]:
    """The text payloads of the unmasked server frames in ``data`` (consumed)."""
    payloads = []
    while len(data) >= 2:
        length, header = data[1] & 0x7F, 2
        if length == 126:
            if len(data) < 4:
                break
            length, header = int.from_bytes(data[2:4], "big"), 4
        elif length == 127:
            if len(data) < 10:
                break
            length, header = int.from_bytes(data[2:10], "big"), 10
        if len(data) < header + length:
            break
        opcode = data[0] & 0x0F
        if opcode == 1:
            payloads.append(bytes(data[header:header + length]).decode())
        del data[:header + length]
    return payloads


async def test_a_stuck_json_client_gets_dropped_frames_that_add_up(
    client: Client, agent: Agent, archive_server: ArchiveServer, puppets: PuppetServer
) -> None:
    """A live-only JSON client (``?live=1``) that stops reading loses lines; once it
    reads again, each ``{"event": "dropped", "count"}`` frame accounts for the gap in the
    numbers exactly."""
    process, puppet = await start_puppet(client, agent, archive_server, puppets)
    server = client.server
    stuck = await open_stuck_client(str(server.host), int(server.port or 0),
                                    f"/attach-console/{process['slug']}?format=json&live=1")
    hub = agent.get(process["slug"]).hub
    await eventually(lambda: hub.subscriber_count == 1, what="the client attached")
    [subscriber] = socket_subscribers(hub)
    await puppet.run(f"[print({'z' * 100!r}) for _ in range(50_000)]")
    assert subscriber.dropped > 0
    await puppet.run("print('done')")
    loop = asyncio.get_running_loop()
    data, received = bytearray(), list[dict[str, Any]]()


    def accounted() -> int:  # lines received, and lines said to be dropped
        return sum(f.get("count", 1) for f in received)

    # every line arrives or is counted, although "done" itself may be dropped: the
    # drop notice then comes on its own once the client has caught up
    async with asyncio.timeout(20):
        while accounted() < 50_001:
            data.extend(await loop.sock_recv(stuck, 65536))
            received.extend(json.loads(payload) for payload in parse_frames(data))
    stuck.close()
    assert accounted() == 50_001
    drops = [f["count"] for f in received if f.get("event") == "dropped"]
    assert sum(drops) == subscriber.dropped
    lines = [f for f in received if "seq" in f]
    assert len(lines) + len(drops) == len(received)
    previous, pending = None, 0
    for frame in received:
        if frame.get("event") == "dropped":
            pending += frame["count"]
        elif "seq" in frame:
            if previous is not None:
                assert frame["seq"] - previous - 1 == pending
            previous, pending = frame["seq"], 0


# -- bad queries -----------------------------------------------------------------------------


@pytest.mark.parametrize(("query", "field"), [
    ("tail=-1", "tail"), ("tail=10001", "tail"), ("tail=x", "tail"),
    ("after=", "after"), ("after=-3", "after"), ("after=1e3", "after"),
    ("after=99999999999999999999", "after"), ("after=5000", "after"),
    ("format=xml", "format"), ("format=", "format"),
    ("live=2", "live"), ("live=yes", "live"),
])
async def test_bad_attach_options_are_400_before_the_upgrade(
    client: Client, agent: Agent, archive_server: ArchiveServer, puppets: PuppetServer,
    query: str, field: str,
) -> None:
    """A bad option answers 400 with a JSON error naming it, instead of upgrading; so does
    an ``after`` beyond the last line (a process deleted and created again)."""
    process, _ = await start_puppet(client, agent, archive_server, puppets)
    url = f"{process['attach']}?{query}"
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.session.ws_connect(url)
    assert refused.value.status == 400
    response = await client.session.get(url.replace("ws://", "http://"))
    assert response.status == 400
    body = await response.json()
    assert list(body["fields"]) == [field], body
    assert field in body["error"]


# -- the agent's own log ---------------------------------------------------------------------


async def test_agent_log_is_readable_like_a_process_log(
    settings: Settings, archive_server: ArchiveServer, aiohttp_client: MakeClient
) -> None:
    """The index's ``agent-log`` shows what the agent logs (a failed process, here) as
    numbered stderr lines, in JSON or text, with ``tail`` and ``since``; the handler goes
    away with the agent, and the lines stay on disk for the next one."""
    url = archive_server.add("nope.tgz", app_archive("other: true\n"))
    async with Agent(settings) as agent:
        client = await aiohttp_client(make_app(settings, agent))
        index = await (await client.get("/")).json()
        assert index["agent-log"] == str(client.make_url("/agent-log"))
        body = {"app": "myapp", "node": "web.0", "process_type": "web", "source_url": url}
        response = await client.post("/create-process", data=json.dumps(body))
        assert response.status == 201
        await wait_for_state(agent.get("myapp.web.0"), S.FAILED)
        response = await client.session.get(index["agent-log"] + "?tail=1000")
        assert response.status == 200
        entries = await response.json()
        failed = [e for e in entries if "myapp.web.0 failed" in e["line"]]
        assert len(failed) == 1, entries
        assert failed[0]["line"].startswith("WARNING smartmob_agent.watcher: myapp.web.0 failed")
        assert failed[0]["stream"] == "stderr"
        assert failed[0]["pid"] is None
        seqs = [e["seq"] for e in entries]
        assert seqs == sorted(set(seqs))
        assert seqs[0] >= 1
        response = await client.session.get(index["agent-log"] + "?tail=1",
                                    headers={"Accept": "text/plain"})
        assert response.content_type == "text/plain"
        text = await response.text()
        assert text.endswith(f" stderr {entries[-1]['line']}\n")
        response = await client.session.get(index["agent-log"] + "?since=" + failed[0]["at"])
        assert failed[0] in await response.json()
        response = await client.session.get(index["agent-log"] + "?tail=many")
        assert response.status == 400
        handler = agent._log_handler
        assert handler in logging.getLogger().handlers
    assert handler not in logging.getLogger().handlers
    assert (settings.state_dir / "agent-log" / LOG_NAME).exists()
    async with Agent(settings) as again:
        kept = await again.agent_log.read(1000)
        assert any("myapp.web.0 failed" in e.line for e in kept)
        assert again.agent_log.next_seq > seqs[-1]


class FakeTransport:
    """A transport that keeps what is written (and never lags)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data.extend(data)

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False


async def test_what_comes_live_during_a_replay_is_held_bounded_and_said() -> None:
    """While a replay is read, live batches and markers are held in order, within the
    client's bound; what does not fit is dropped (everything newer than the first drop)
    and said after the held items, so each ``dropped`` frame sits where its gap is."""
    transport = FakeTransport()
    request = SimpleNamespace(transport=transport)
    ws = SimpleNamespace(closed=False)
    # stand-ins for the prepared WebSocket and its request: only .closed and .transport
    # are read, and the test needs a transport whose buffer it controls
    subscriber = WebSocketSubscriber(ws, request, max_buffer=250,  # type: ignore[arg-type]
                                     json_frames=True)
    subscriber.hold()
    subscriber.send_stamped("stdout", [b"a" * 100], Stamp(11, 1.0, 7, 0))
    subscriber.send_event({"event": "exited", "at": 2.0, "pid": 7, "restarts": 0,
                           "code": 1, "signal": None})
    subscriber.send_stamped("stdout", [b"b" * 100, b"c" * 100], Stamp(12, 3.0, None, None))
    subscriber.send_stamped("stdout", [b"d"], Stamp(14, 3.0, None, None))  # would fit
    assert transport.data == b""  # nothing before the replay
    subscriber.replay([LogLine(0.5, "stdout", "old", 10, 7, 0)], 0, 5)
    received = [json.loads(p) for p in parse_frames(transport.data)]
    assert [f.get("seq", f.get("event")) for f in received] == [10, 11, "exited", "dropped"]
    assert received[-1] == {"event": "dropped", "count": 3}
    assert subscriber.dropped == 3
    subscriber.send_stamped("stdout", [b"e"], Stamp(15, 4.0, None, None))
    assert [json.loads(p)["seq"] for p in parse_frames(transport.data)] == [15]
    subscriber.cancel_notice()
