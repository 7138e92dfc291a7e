"""The event bus, and the events WebSocket end to end with real clients."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.typedefs import Handler

from smartmob_agent.events.bus import (
    DEFAULT_MAXSIZE,
    DROPPED,
    EVENT_KINDS,
    KIND_FIELDS,
    Event,
    EventBus,
    EventQueue,
    EventQueueClosed,
    ProcessEvent,
    make_event,
)
from smartmob_agent.keys import ADMIN
from smartmob_agent.representations import format_time
from smartmob_agent.web import events as events_socket_module
from smartmob_agent.web.api import PRINCIPAL_KEY
from smartmob_agent.web.events import CLOSE_TIMEOUT, EVENT_BUS_KEY, EVENT_CLIENTS_KEY, add_routes
from smartmob_agent.web.server import error_middleware
from tests.helpers import eventually
from tests.test_ws_functional import open_stuck_client

Client = TestClient[Any, Any]

#: 2026-12-01T18:00:00.123Z
NOON = datetime(2026, 12, 1, 18, 0, 0, 123000, tzinfo=UTC).timestamp()


def event(
    n: int, app: str = "myapp", node: str = "web.0", previous: str = "starting"
) -> ProcessEvent:
    """A ``process:state`` event numbered ``n`` (in ``pid``), of ``app.node``."""
    return make_event("process:state", slug=f"{app}.{node}", app=app, node=node,
                      process_type="web", pid=n, state="running", previous=previous,
                      clock=lambda: NOON)


def pid(event: Event) -> int | None:
    """The ``pid`` of an event about a process (a drop notice fails the test)."""
    assert event["event"] != DROPPED, event
    return event["pid"]


async def take(queue: EventQueue, count: int) -> list[Event]:
    """Get ``count`` events from ``queue`` (10 s deadline)."""
    async with asyncio.timeout(10):
        return [await queue.get() for _ in range(count)]


# --- events and the bus ---------------------------------------------------------------


@pytest.mark.parametrize(("moment", "text"), [
    (datetime(2026, 12, 1, 18, 0, 0, 123456, tzinfo=UTC), "2026-12-01T18:00:00.123Z"),
    (datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "2026-01-02T03:04:05.000Z"),
    (datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), "1999-12-31T23:59:59.999Z"),
])
def test_times_are_iso_utc_with_milliseconds(moment: datetime, text: str) -> None:
    """A timestamp reads as ISO 8601 UTC with milliseconds and a ``Z``."""
    assert format_time(moment.timestamp()) == text


def test_make_event_fills_every_field() -> None:
    """An event has the common fields, the time of the clock, and its kind's own fields."""
    exit_event = make_event(
        "process:exit", slug="myapp.web.0", app="myapp", node="web.0", process_type="web",
        pid=42, state="backoff", clock=lambda: NOON, code=None, signal="SIGKILL",
        ran_for=1.5,
    )
    assert exit_event == {
        "event": "process:exit", "slug": "myapp.web.0", "app": "myapp", "node": "web.0",
        "process_type": "web", "pid": 42, "state": "backoff", "reason": None,
        "at": "2026-12-01T18:00:00.123Z", "code": None, "signal": "SIGKILL", "ran_for": 1.5,
    }
    assert sorted(EVENT_KINDS) == [
        "process:create", "process:delete", "process:exception", "process:exit",
        "process:online", "process:state", "process:update",
    ]


def test_an_event_carries_the_failure_reason_after_the_state() -> None:
    """The reason of a failed process is a common field, on the wire right after
    ``state``; events of a process that is not failed have ``null``."""
    failed = make_event(
        "process:exception", slug="myapp.web.0", app="myapp", node="web.0",
        process_type="web", pid=None, state="failed", reason="no procfile", clock=lambda: NOON,
        error="the source has no Procfile at its root",
    )
    assert list(failed) == [
        "event", "slug", "app", "node", "process_type", "pid", "state", "reason", "at", "error",
    ]
    assert failed["reason"] == "no procfile"


def test_make_event_refuses_an_unknown_kind() -> None:
    """Making an event of a kind not in EVENT_KINDS raises ValueError."""
    with pytest.raises(ValueError, match="process:bogus"):
        # the point: a kind the type does not allow, as an unchecked caller could pass
        make_event("process:bogus", slug="a.b", app="a", node="b",  # type: ignore[arg-type]
                   process_type="web", pid=None, state="running")


@pytest.mark.parametrize("fields", [
    pytest.param({}, id="missing"),
    pytest.param({"previous": "starting", "error": "boom"}, id="one-too-many"),
    pytest.param({"error": "boom"}, id="another-kind's"),
])
def test_make_event_refuses_other_fields_than_its_kinds(fields: dict[str, Any]) -> None:
    """An event gets exactly the fields its type names: a missing or a foreign one is a
    ValueError, so what goes on the wire is what StateEvent and the others say."""
    with pytest.raises(ValueError, match=r"process:state event has the fields \['previous'\]"):
        make_event("process:state", slug="a.b", app="a", node="b", process_type="web",
                   pid=None, state="running", **fields)


def test_every_kind_has_its_type_and_fields() -> None:
    """Each kind's own fields are read from its type, as the API document lists them."""
    assert dict(KIND_FIELDS) == {
        "process:create": set(), "process:state": {"previous"}, "process:online": set(),
        "process:exit": {"code", "signal", "ran_for"}, "process:exception": {"error"},
        "process:delete": set(), "process:update": {"outcome", "source_url", "error"},
    }
    assert set(KIND_FIELDS) == EVENT_KINDS


async def test_every_subscriber_sees_the_publish_order() -> None:
    """Two queues and a callback each receive every event in the order published."""
    bus = EventBus()
    first, second = bus.subscribe(), bus.subscribe()
    heard: list[ProcessEvent] = []
    bus.add_listener(heard.append)
    events = [event(n) for n in range(200)]
    for each in events:
        bus.publish(each)
    assert await take(first, 200) == events
    assert await take(second, 200) == events
    assert heard == events


async def test_publishing_from_a_callback_keeps_the_order() -> None:
    """An event published by a callback reaches every subscriber after the one that caused
    it, including callbacks registered after the publishing one."""
    bus = EventBus()
    queue = bus.subscribe()

    def follow_up(told: ProcessEvent) -> None:
        if told["pid"] == 1:
            bus.publish(event(2))

    heard: list[int | None] = []
    bus.add_listener(follow_up)
    bus.add_listener(lambda told: heard.append(told["pid"]))
    bus.publish(event(1))
    bus.publish(event(3))
    assert heard == [1, 2, 3]
    assert [pid(e) for e in await take(queue, 3)] == [1, 2, 3]


async def test_filters_select_by_app_and_by_slug() -> None:
    """A queue filtered by app, by slug, or by both gets only the matching events."""
    bus = EventBus()
    by_app = bus.subscribe(app="one")
    by_slug = bus.subscribe(slug="two.web.1")
    by_both = bus.subscribe(app="one", slug="one.web.1")
    for n, (app, node) in enumerate([("one", "web.0"), ("two", "web.1"), ("one", "web.1"),
                                     ("two", "web.0")]):
        bus.publish(event(n, app, node))
    assert [pid(e) for e in await take(by_app, 2)] == [0, 2]
    assert [pid(e) for e in await take(by_slug, 1)] == [1]
    assert [pid(e) for e in await take(by_both, 1)] == [2]
    assert (len(by_app), len(by_slug), len(by_both)) == (0, 0, 0)


async def test_a_full_queue_drops_the_oldest_and_says_so_first() -> None:
    """Past maxsize the oldest events go, and the next get() returns a notice counting them
    before the events kept."""
    drop_time = NOON + 60
    bus = EventBus(clock=lambda: drop_time)
    queue = bus.subscribe(maxsize=3)
    for n in range(5):
        bus.publish(event(n))
    notice, *kept = await take(queue, 4)
    assert notice == {"event": DROPPED, "count": 2, "at": format_time(drop_time)}
    assert [pid(e) for e in kept] == [2, 3, 4]
    bus.publish(event(5))
    assert [pid(e) for e in await take(queue, 1)] == [5]  # no notice without new drops
    assert queue.dropped == 2


async def test_publish_never_waits_on_a_queue_nobody_reads() -> None:
    """Publishing far more than a queue holds returns at once, and the queue stays at its
    maxsize."""
    bus = EventBus()
    queue = bus.subscribe(maxsize=10)
    for n in range(10_000):
        bus.publish(event(n))
    assert len(queue) == 10
    assert queue.dropped == 9_990


async def test_get_waits_for_the_next_event() -> None:
    """A get() on an empty queue returns the next event published."""
    bus = EventBus()
    queue = bus.subscribe()
    getting = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    assert not getting.done()
    bus.publish(event(7))
    async with asyncio.timeout(10):
        assert pid(await getting) == 7


async def test_closing_a_queue_ends_its_readers_and_unsubscribes_it() -> None:
    """Closing a queue makes a waiting get() raise EventQueueClosed, ends async iteration,
    and removes it from the bus."""
    bus = EventBus()
    queue = bus.subscribe()
    getting = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    assert bus.subscriber_count == 1
    queue.close()
    with pytest.raises(EventQueueClosed):
        async with asyncio.timeout(10):
            await getting
    assert bus.subscriber_count == 0
    bus.publish(event(1))
    assert [e async for e in queue] == []


async def test_closing_the_bus_ends_every_queue_after_what_it_holds() -> None:
    """Once the bus is closed, each queue yields what was published before, then raises
    EventQueueClosed; callbacks hear nothing more and later subscribers get an ended queue."""
    bus = EventBus()
    queues = [bus.subscribe(), bus.subscribe(app="myapp")]
    heard: list[ProcessEvent] = []
    bus.add_listener(heard.append)
    bus.publish(event(1))
    bus.close()
    bus.publish(event(2))
    for queue in queues:
        assert [pid(e) async for e in queue] == [1]
        with pytest.raises(EventQueueClosed):
            await queue.get()
    with pytest.raises(EventQueueClosed):
        await bus.subscribe().get()
    assert [e["pid"] for e in heard] == [1]
    assert bus.subscriber_count == 0


async def test_a_failing_callback_is_logged_and_harms_no_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A callback that raises is logged; publish() does not raise and others still hear."""
    bus = EventBus()

    def broken(told: ProcessEvent) -> None:
        raise RuntimeError("boom")

    heard: list[ProcessEvent] = []
    bus.add_listener(broken)
    bus.add_listener(heard.append)
    queue = bus.subscribe()
    with caplog.at_level(logging.ERROR, logger="smartmob_agent.events"):
        bus.publish(event(1))
    assert heard == [event(1)]
    assert (await take(queue, 1)) == [event(1)]
    assert "boom" in caplog.text
    bus.remove_listener(broken)
    caplog.clear()
    bus.publish(event(2))
    assert caplog.text == ""


# --- the events WebSocket -------------------------------------------------------------


@web.middleware
async def as_admin(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Name the admin as the principal of every request, as the access middleware does on
    an agent without keys (a handler refuses a request nobody was named for)."""
    request[PRINCIPAL_KEY] = ADMIN
    return await handler(request)


@pytest.fixture
def bus() -> EventBus:
    """A fresh event bus."""
    return EventBus()


@pytest.fixture
async def client(
    bus: EventBus, aiohttp_client: Callable[..., Awaitable[Client]]
) -> Client:
    """A client of a tiny app serving ``/events`` from ``bus``, with the agent's errors,
    every request from the admin (as on an agent without keys)."""
    app = web.Application(middlewares=[error_middleware, as_admin])
    app[EVENT_BUS_KEY] = bus
    add_routes(app)
    return await aiohttp_client(app)


async def receive_events(ws: aiohttp.ClientWebSocketResponse, count: int) -> list[Any]:
    """Receive ``count`` JSON text frames (10 s deadline)."""
    events: list[Any] = []
    async with asyncio.timeout(10):
        while len(events) < count:
            message = await ws.receive()
            assert message.type == aiohttp.WSMsgType.TEXT, message
            events.append(message.json())
    return events


async def receive_close(ws: aiohttp.ClientWebSocketResponse) -> int | None:
    """Wait for the server to close ``ws`` (10 s deadline); return the close code."""
    async with asyncio.timeout(10):
        message = await ws.receive()
    assert message.type == aiohttp.WSMsgType.CLOSE, message
    return ws.close_code


async def test_socket_streams_every_event_as_json(client: Client, bus: EventBus) -> None:
    """An unfiltered client receives each event as one JSON text frame, in order, from the
    moment the handshake completes."""
    async with client.ws_connect("/events") as ws:
        events = [event(n, app=f"app{n % 3}") for n in range(50)]
        for each in events:
            bus.publish(each)
        assert await receive_events(ws, 50) == events


async def test_socket_filters_by_app(client: Client, bus: EventBus) -> None:
    """A client with ?app= receives only that app's events."""
    async with client.ws_connect("/events", params={"app": "one"}) as ws:
        bus.publish(event(1, app="two"))
        bus.publish(event(2, app="one"))
        bus.publish(event(3, app="one.more"))
        bus.publish(event(4, app="one", node="worker.0"))
        assert [e["pid"] for e in await receive_events(ws, 2)] == [2, 4]


async def test_socket_filters_by_slug(client: Client, bus: EventBus) -> None:
    """A client with ?slug= receives only that process's events."""
    async with client.ws_connect("/events", params={"slug": "one.web.1"}) as ws:
        bus.publish(event(1, app="one", node="web.0"))
        bus.publish(event(2, app="one", node="web.1"))
        bus.publish(event(3, app="two", node="web.1"))
        bus.publish(event(4, app="one", node="web.1"))
        assert [e["pid"] for e in await receive_events(ws, 2)] == [2, 4]


@pytest.mark.parametrize(("query", "field"), [
    ("app=my%20app", "app"),
    ("app=" + "a" * 101, "app"),
    ("app=", "app"),
    ("app=a&app=b", "app"),
    ("slug=x/y", "slug"),
    ("slug=" + "s" * 202, "slug"),
    ("slug=%C3%A9t%C3%A9", "slug"),
])
async def test_a_bad_filter_is_a_json_400_before_any_upgrade(
    client: Client, bus: EventBus, query: str, field: str
) -> None:
    """A bad app or slug filter answers 400 with a JSON error naming it, and subscribes
    nothing, whether or not the request asks for a WebSocket."""
    response = await client.get(f"/events?{query}")
    assert response.status == 400
    body = await response.json()
    assert f"bad filter on /events: {field}" in body["error"]
    assert set(body["fields"]) == {field}
    with pytest.raises(aiohttp.WSServerHandshakeError) as raised:
        await client.ws_connect(f"/events?{query}")
    assert raised.value.status == 400
    assert bus.subscriber_count == 0


async def test_the_longest_names_are_valid_filters(client: Client, bus: EventBus) -> None:
    """An app of 100 characters and a slug of 201 are accepted."""
    app, node = "a" * 100, "n" * 100
    params = {"app": app, "slug": f"{app}.{node}"}
    async with client.ws_connect("/events", params=params) as ws:
        bus.publish(event(1, app=app, node=node))
        assert [e["pid"] for e in await receive_events(ws, 1)] == [1]


async def test_a_plain_get_is_a_json_400(client: Client) -> None:
    """A GET /events that is not a WebSocket handshake answers 400 saying so."""
    response = await client.get("/events")
    assert response.status == 400
    assert "WebSocket" in (await response.json())["error"]


async def test_several_clients_each_get_every_event(client: Client, bus: EventBus) -> None:
    """Three clients, one filtered, each receive every event meant for them, in order."""
    sockets = [await client.ws_connect("/events") for _ in range(2)]
    sockets.append(await client.ws_connect("/events?app=app1"))
    assert bus.subscriber_count == 3
    events = [event(n, app=f"app{n % 2}") for n in range(100)]
    for each in events:
        bus.publish(each)
    for ws in sockets[:2]:
        assert await receive_events(ws, 100) == events
    assert await receive_events(sockets[2], 50) == events[1::2]
    for ws in sockets:
        await ws.close()


async def test_a_client_that_leaves_is_unsubscribed(client: Client, bus: EventBus) -> None:
    """When a client closes its socket, its queue leaves the bus."""
    ws = await client.ws_connect("/events")
    assert bus.subscriber_count == 1
    await ws.close()
    await eventually(lambda: bus.subscriber_count == 0, what="the queue to leave the bus")


async def test_closing_the_bus_closes_sockets_with_1001(client: Client, bus: EventBus) -> None:
    """Closing the bus closes every events socket with code 1001 (going away), once the
    events published before have been sent."""
    ws = await client.ws_connect("/events")
    bus.publish(event(1))
    bus.close()
    assert await receive_events(ws, 1) == [event(1)]
    assert await receive_close(ws) == 1001


async def test_shutdown_closes_sockets_with_1001(client: Client, bus: EventBus) -> None:
    """Shutting the server down closes every events socket with code 1001 (going away)."""
    sockets = [await client.ws_connect("/events") for _ in range(2)]
    closing = [asyncio.ensure_future(receive_close(ws)) for ws in sockets]
    async with asyncio.timeout(10):
        await client.server.close()
        assert await asyncio.gather(*closing) == [1001, 1001]
    assert bus.subscriber_count == 0


async def test_a_burst_past_the_queue_is_announced_then_the_newest_arrive(
    client: Client, bus: EventBus
) -> None:
    """A burst larger than a client's queue reaches it as one drop notice counting the
    oldest events lost, then the newest events in order."""
    async with client.ws_connect("/events") as ws:
        for n in range(DEFAULT_MAXSIZE + 500):
            bus.publish(event(n))
        notice, *kept = await receive_events(ws, 1 + DEFAULT_MAXSIZE)
        assert notice["event"] == DROPPED
        assert notice["count"] == 500
        assert [pid(e) for e in kept] == list(range(500, DEFAULT_MAXSIZE + 500))


async def test_a_stuck_client_neither_grows_nor_holds_up_others_or_shutdown(
    client: Client, bus: EventBus
) -> None:
    """A client that never reads keeps at most its queue while a reading client gets every
    event, and shutting down cuts it off promptly."""
    server = client.server
    assert isinstance(server, TestServer)
    stuck = await open_stuck_client(str(server.host), int(server.port or 0), "/events")
    reader = await client.ws_connect("/events")
    [stuck_client] = [c for c in server.app[EVENT_CLIENTS_KEY]
                      if c.transport.get_extra_info("peername") == stuck.getsockname()]
    padding = "p" * 10_000
    stuck_queue = bus._queues[0]  # the first subscribed
    sent = 0
    # 10 kB events until the stuck client's socket is full and its sender waits on it
    while not stuck_client.transport.get_write_buffer_size():
        for _ in range(100):
            bus.publish(event(sent, previous=padding))
            sent += 1
        assert [e["pid"] for e in await receive_events(reader, 100)] == list(
            range(sent - 100, sent))
        assert sent < 100_000, "the stuck client's socket never filled"
    # twice its queue more, in batches the reading client takes without dropping any
    for _ in range(4):
        for _ in range(DEFAULT_MAXSIZE // 2):
            bus.publish(event(sent, previous=padding))
            sent += 1
        batch = await receive_events(reader, DEFAULT_MAXSIZE // 2)
        assert batch[-1]["pid"] == sent - 1
    assert len(stuck_queue) == DEFAULT_MAXSIZE
    assert stuck_queue.dropped >= DEFAULT_MAXSIZE
    # the sender waits for the socket to drain: one frame past aiohttp's high-water mark
    assert stuck_client.transport.get_write_buffer_size() < 256 * 1024
    started = time.monotonic()
    async with asyncio.timeout(10):
        await server.close()
    assert time.monotonic() - started < CLOSE_TIMEOUT + 2
    assert bus.subscriber_count == 0
    stuck.close()


# --- batched frames -------------------------------------------------------------------


async def test_get_nowait_takes_what_is_ready_and_leaves_a_drop_notice_to_get() -> None:
    """``get_nowait`` returns the queued events, then ``None``; with a drop pending it
    returns ``None`` so that ``get`` says the drop first; once closed it raises."""
    bus = EventBus()
    queue = bus.subscribe(maxsize=2)
    assert queue.get_nowait() is None
    bus.publish(event(1))
    first = queue.get_nowait()
    assert first is not None
    assert pid(first) == 1
    for n in range(2, 5):
        bus.publish(event(n))
    assert queue.get_nowait() is None  # 2 dropped: the notice comes first, from get
    notice = await queue.get()
    assert notice["event"] == DROPPED
    assert notice["count"] == 1
    assert [pid(e) for e in (queue.get_nowait(), queue.get_nowait()) if e] == [3, 4]
    queue.close()
    with pytest.raises(EventQueueClosed):
        queue.get_nowait()


def test_a_batch_takes_the_ready_events_up_to_its_size() -> None:
    """The sender's batch is the first event and those ready after it, as JSON, and
    stops once it holds BATCH_BYTES: the rest waits for the next write."""
    bus = EventBus()
    queue = bus.subscribe()
    padding = "p" * 10_000
    for n in range(1, 11):
        bus.publish(event(n, previous=padding))
    payloads = events_socket_module._batch(event(0, previous=padding), queue)
    size = len(payloads[0])
    assert len(payloads) == -(-events_socket_module.BATCH_BYTES // size)
    assert [json.loads(p)["pid"] for p in payloads] == list(range(len(payloads)))
    assert len(queue) == 11 - len(payloads)


async def test_a_burst_arrives_intact_and_uncompressed(client: Client, bus: EventBus) -> None:
    """Events of every frame length (short, 16-bit and 64-bit lengths) published in one
    burst arrive whole and in order, as separate text frames; a client that offers
    compression gets none (the frames are written pre-encoded)."""
    async with client.ws_connect("/events", compress=15) as ws:
        assert ws.compress == 0
        sizes = [0, 50, 200, 70_000, 10, 3_000] * 20
        events = [event(n, previous="p" * size) for n, size in enumerate(sizes)]
        for each in events:
            bus.publish(each)
        assert await receive_events(ws, len(events)) == events
