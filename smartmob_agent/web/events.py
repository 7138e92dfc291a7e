"""The ``events`` WebSocket: each event of the bus as one JSON text frame.

``GET /events`` (optionally ``?app=<app>`` and/or ``?slug=<slug>``) upgrades to a
WebSocket that receives every event published from the handshake on, filtered, until the
client leaves or the agent shuts down (close code 1001). What a client has not yet taken
is bounded by its :class:`~smartmob_agent.events.bus.EventQueue`: past it, the oldest events
are dropped and an ``events:dropped`` frame tells the client how many.

The events that gathered while the sender waited go out together: pre-encoded frames
(:mod:`smartmob_agent.web.frames`) written to the connection in one write of up to
:data:`BATCH_BYTES`, as ``attach`` does with lines, rather than one ``send_str`` (one
frame object, one write) each: a burst of events reaches a client several times faster
(``benchmarks/events_throughput.py``). So the socket negotiates no compression.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import weakref
from dataclasses import dataclass, field

from aiohttp import WSCloseCode, web
from aiohttp.abc import AbstractStreamWriter
from multidict import MultiMapping

from smartmob_agent.errors import InvalidRequest
from smartmob_agent.events.bus import Event, EventBus, EventQueue
from smartmob_agent.schemas import MAX_NAME
from smartmob_agent.web.api import principal, require_app, watch_key
from smartmob_agent.web.frames import encode_text_frames

log = logging.getLogger("smartmob_agent.eventsocket")  # stable name: internals.rst

EVENT_BUS_KEY = web.AppKey("event_bus", EventBus)

#: A slug is ``<app>.<node>``, so it may be twice as long as a name, plus the dot.
MAX_SLUG = 2 * MAX_NAME + 1
_FILTERS = {"app": MAX_NAME, "slug": MAX_SLUG}
_FILTER_VALUE = re.compile(r"[A-Za-z0-9_.-]+")
#: Seconds between pings; a client that does not answer one within half of it is gone.
HEARTBEAT = 30.0
#: Longest wait for a client to take the close frame; a stuck one is then cut off.
CLOSE_TIMEOUT = 2.0
#: The events that gathered are written together up to this many bytes of frames; past
#: it, the sender waits for the connection to take them (the client's pace).
BATCH_BYTES = 64 * 1024


@dataclass(eq=False)
class EventClient:
    """One connected ``events`` WebSocket, as the shutdown hook needs to close it.

    Only the handler closes the socket: aiohttp drops the connection without waiting
    for the client's close frame when ``close()`` runs while another task waits in
    ``receive()``. :meth:`shutdown` asks the handler to close, and waits until it did.
    """

    ws: web.WebSocketResponse
    transport: asyncio.Transport
    leave: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    code: int = WSCloseCode.GOING_AWAY
    message: bytes = b"agent shutting down"

    async def shutdown(self, code: int, message: bytes) -> None:
        """Have the handler close the WebSocket with ``code``; return once it has."""
        self.code, self.message = code, message
        self.leave.set()
        await self.done.wait()


EVENT_CLIENTS_KEY = web.AppKey("event_clients", weakref.WeakSet[EventClient])


def read_filters(query: MultiMapping[str]) -> dict[str, str | None]:
    """Return the ``app`` and ``slug`` filters of a query string (``None`` when absent).

    Raises:
        InvalidRequest: when one is given twice, empty, too long, or has a character
            other than letters, digits, ``_``, ``.`` and ``-``.
    """
    filters: dict[str, str | None] = {}
    problems: dict[str, str] = {}
    for name, longest in _FILTERS.items():
        values = query.getall(name, [])
        filters[name] = values[0] if values else None
        if len(values) > 1:
            problems[name] = f"give {name} at most once"
        elif values and not (len(values[0]) <= longest and _FILTER_VALUE.fullmatch(values[0])):
            problems[name] = f"must be 1 to {longest} letters, digits, '_', '.' or '-'"
    if problems:
        detail = "; ".join(f"{name} {problem}" for name, problem in problems.items())
        raise InvalidRequest(f"bad filter on /events: {detail}", problems)
    return filters


async def events_socket(request: web.Request) -> web.WebSocketResponse:
    """Stream the bus's events, one JSON object per text frame, until either side leaves.

    Raises:
        InvalidRequest: for a bad ``app`` or ``slug`` filter, or a request that is not a
            WebSocket handshake (answered before any upgrade, as a JSON 400).
    """
    filters = read_filters(request.query)
    scope = principal(request).app
    if scope is not None:  # a key scoped to one app hears only that app
        require_app(request, filters["app"] or scope)
        filters["app"] = scope
    # no compression: frames are written pre-encoded, which an extension would break
    ws = web.WebSocketResponse(heartbeat=HEARTBEAT, max_msg_size=4096, compress=False)
    if not ws.can_prepare(request).ok:
        raise InvalidRequest(f"{request.path} is a WebSocket: connect with a WebSocket client")
    # subscribe before the handshake, so a client sees every event published after it
    queue = request.app[EVENT_BUS_KEY].subscribe(app=filters["app"], slug=filters["slug"])
    try:
        writer = await ws.prepare(request)
        assert request.transport is not None, "a prepared WebSocket has a transport"
        client = EventClient(ws, request.transport)
        request.app[EVENT_CLIENTS_KEY].add(client)
        watch_key(request, client)
        loop = asyncio.get_running_loop()
        reader = loop.create_task(_discard_frames(ws))
        sender = loop.create_task(_send_events(ws, queue, client.transport, writer))
        leaving = loop.create_task(client.leave.wait())
        try:
            await asyncio.wait({reader, sender, leaving}, return_when=asyncio.FIRST_COMPLETED)
            if sender.done() and not sender.cancelled() and sender.exception() is None:
                client.code, client.message = WSCloseCode.GOING_AWAY, b"event bus closed"
            if not reader.done():  # the client did not leave: close it, as only we may
                await _cancel(reader)
                await _cancel(sender)
                try:
                    async with asyncio.timeout(CLOSE_TIMEOUT):
                        await ws.close(code=client.code, message=client.message)
                except TimeoutError:  # the client stopped reading: the frame cannot drain
                    client.transport.abort()
        finally:
            for task in (reader, sender, leaving):
                task.cancel()
            client.done.set()
            request.app[EVENT_CLIENTS_KEY].discard(client)
    finally:
        queue.close()
        if queue.dropped:
            log.info("an events client missed %d event(s)", queue.dropped)
    return ws


async def _discard_frames(ws: web.WebSocketResponse) -> None:
    """Read until the client leaves; its frames carry nothing."""
    async for _message in ws:
        pass


async def _send_events(
    ws: web.WebSocketResponse, queue: EventQueue, transport: asyncio.Transport,
    writer: AbstractStreamWriter,
) -> None:
    """Send the events of ``queue``, those that gathered in one write; returns when the
    bus closes or the client went away."""
    with contextlib.suppress(ConnectionResetError):  # the client went away mid-send
        async for event in queue:
            if ws.closed or transport.is_closing():
                return
            transport.write(encode_text_frames(_batch(event, queue)))
            # waits while the client lags (the transport paused); meanwhile its queue
            # drops the oldest
            await writer.drain()


def _batch(first: Event, queue: EventQueue) -> list[bytes]:
    """The JSON of ``first`` and of the events ready after it, up to :data:`BATCH_BYTES`."""
    payloads: list[bytes] = []
    size = 0
    event: Event | None = first
    while event is not None:
        text = _encode(event)
        if text is not None:
            payloads.append(text)
            size += len(text)
            if size >= BATCH_BYTES:
                break
        event = queue.get_nowait()
    return payloads


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(BaseException):
        await task


#: One encoder for every event: ``json.dumps`` with options makes one per call, a third
#: of the cost of encoding an event.
_JSON = json.JSONEncoder(separators=(",", ":"))


def _encode(event: Event) -> bytes | None:
    try:  # ASCII (the encoder escapes the rest): valid UTF-8 for a text frame
        return _JSON.encode(event).encode()
    except (TypeError, ValueError):  # a bug of the publisher: drop that event, not the client
        log.exception("the %s event is not JSON; not sent", event["event"])
        return None


async def close_event_sockets(app: web.Application) -> None:
    """``on_shutdown``: tell every events client that the agent is going away (1001)."""
    clients: weakref.WeakSet[EventClient] = app[EVENT_CLIENTS_KEY]
    await asyncio.gather(*(
        client.shutdown(WSCloseCode.GOING_AWAY, b"agent shutting down")
        for client in list(clients)
    ))


def add_routes(app: web.Application) -> None:
    """Add ``GET /events`` (named ``events``) and the shutdown hook that closes its sockets.

    The application must hold the bus under :data:`EVENT_BUS_KEY`.
    """
    app[EVENT_CLIENTS_KEY] = weakref.WeakSet()
    app.router.add_get("/events", events_socket, name="events")
    app.on_shutdown.append(close_event_sockets)
