"""The ``attach`` WebSocket: each output line of a process as one text frame, and each
text frame a client sends as one line of the process's stdin.

Each client is a subscriber of the process's hub (see :mod:`smartmob_agent.web.subscriber`):
by default a :class:`~smartmob_agent.web.lossless.LosslessSubscriber`, which a client that
reads more slowly than the process writes does not lose lines with (it is served from
the log until it has caught up); with ``?live=1``, a
:class:`~smartmob_agent.web.subscriber.WebSocketSubscriber`, which drops what the client
is too slow for, and says how many.

Query options (checked before the upgrade, see
:func:`~smartmob_agent.queries.parse_attach_query`): ``?format=json`` sends each line as
a JSON object with its sequence number, time, stream and run, and the lifecycle markers
of the process (``spawned``, ``exited``, ``backoff``) and the notices as JSON frames of
their own; ``?tail=N`` replays the last lines of the log first, and ``?after=SEQ`` those
numbered above ``SEQ``. A replay has no gap and no duplicate with what follows: the client
subscribes first and the replay takes the lines numbered below the subscription's first;
what comes live meanwhile is sent after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from dataclasses import dataclass

from aiohttp import WSCloseCode, WSMsgType, web

from smartmob_agent.errors import InvalidRequest
from smartmob_agent.output import logrecords
from smartmob_agent.queries import AttachQuery, parse_attach_query
from smartmob_agent.supervision.watcher import Watcher
from smartmob_agent.web.api import process_for, watch_key
from smartmob_agent.web.lossless import LosslessSubscriber
from smartmob_agent.web.subscriber import WebSocketSubscriber

log = logging.getLogger("smartmob_agent.ws")  # stable name: internals.rst

#: The attach route; :func:`smartmob_agent.web.server.make_app` registers it.
routes = web.RouteTableDef()

#: Largest frame a client may send (one line of input); a larger one closes the socket
#: (1009, :data:`FRAME_TOO_LARGE`).
MAX_INPUT_FRAME = 64 * 1024
#: The reason of the close (1009) that answers a frame over :data:`MAX_INPUT_FRAME`.
FRAME_TOO_LARGE = f"input frames are at most {MAX_INPUT_FRAME} bytes (one line each)".encode()
#: What a client is told when its input cannot reach the process.
INPUT_NOT_DELIVERED = (
    b"[smartmob-agent] input not delivered: no child is running, it closed its stdin, "
    b"or it has not read the input already sent"
)
INPUT_NOT_TEXT = b"[smartmob-agent] input not delivered: send input as text frames"



class _AttachSocket(web.WebSocketResponse):
    """The attach WebSocket; it says why when it closes on a frame too large (aiohttp's
    own close for it has no reason)."""

    async def close(
        self, *, code: int = WSCloseCode.OK, message: bytes = b"", drain: bool = True
    ) -> bool:
        """Close as aiohttp does, with :data:`FRAME_TOO_LARGE` as the reason of 1009."""
        if code == WSCloseCode.MESSAGE_TOO_BIG and not message:
            message = FRAME_TOO_LARGE
        return await super().close(code=code, message=message, drain=drain)


SOCKETS_KEY = web.AppKey("websockets", weakref.WeakSet[WebSocketSubscriber])


@dataclass
class Dropped:
    """What the attached clients that have left were too slow for, in all (the metrics
    add those of the clients still attached)."""

    lines: int = 0


DROPPED_KEY = web.AppKey("attach_dropped", Dropped)


@routes.get("/attach-console/{slug}", name="attach")
async def attach_console(request: web.Request) -> web.WebSocketResponse:
    """Stream the process's output, one line per text frame (or JSON frame with
    ``?format=json``), from now (or from ``?tail``/``?after`` lines back) until it is
    deleted; write each text frame the client sends, with a newline, to its stdin."""
    watcher = process_for(request)
    query = parse_attach_query(request.query)
    output = watcher.output_log
    if query.after is not None and query.after >= output.next_seq:
        raise InvalidRequest(
            f"invalid query: after {query.after} is not the seq of a line of this process "
            f"(its last line so far is numbered below {output.next_seq}; a process deleted "
            "and created again numbers its lines from 1 again)",
            {"after": f"must be below {output.next_seq}, the seq of the next line"},
        )
    # no compression: frames are written pre-encoded, which an extension would break;
    # aiohttp refuses a frame as long as max_msg_size, so MAX_INPUT_FRAME itself needs +1
    ws = _AttachSocket(compress=False, max_msg_size=MAX_INPUT_FRAME + 1)
    writer = await ws.prepare(request)
    logrecords.event(log, "process.attach", f"{watcher.spec.slug}: a client attached",
                     slug=watcher.spec.slug)
    subscriber = (
        WebSocketSubscriber(ws, request, json_frames=query.json) if query.live
        else LosslessSubscriber(ws, request, writer, output, json_frames=query.json)
    )
    request.app[SOCKETS_KEY].add(subscriber)
    watch_key(request, subscriber)
    try:
        await _start(watcher, subscriber, query)
        await _serve(ws, watcher, subscriber)
    finally:
        watcher.hub.unsubscribe(subscriber)
        subscriber.release()
        subscriber.finished()
        dropped = request.app.get(DROPPED_KEY)
        if dropped is not None:  # counted once: from now on as a client that left
            request.app[SOCKETS_KEY].discard(subscriber)
            dropped.lines += subscriber.dropped
        if subscriber.dropped:
            log.info("%s: an attached client missed %d line(s)", watcher.spec.slug,
                     subscriber.dropped)
    return ws


async def _start(watcher: Watcher, subscriber: WebSocketSubscriber, query: AttachQuery) -> None:
    """Subscribe the client to the process's lines, with the replay it asks for first."""
    output = watcher.output_log
    if query.tail is None:  # every line after `after` that the log keeps (lossless)
        assert isinstance(subscriber, LosslessSubscriber)
        assert query.after is not None
        subscriber.resume(query.after + 1)
        watcher.hub.subscribe(subscriber)
        return
    if query.tail == 0:
        watcher.hub.subscribe(subscriber)
        return
    subscriber.hold()
    # the lines numbered from `first` on come live; those before it, from the log
    first = output.next_seq
    watcher.hub.subscribe(subscriber)
    entries, more = await output.window(query.tail, after=query.after, before=first)
    subscriber.replay(entries, more, query.tail)


async def _serve(
    ws: web.WebSocketResponse, watcher: Watcher, subscriber: WebSocketSubscriber
) -> None:
    """Pass the client's input on until it leaves, or until the agent closes the socket
    (from here, so that aiohttp waits for the client's close frame)."""
    loop = asyncio.get_running_loop()
    reader = loop.create_task(_read_input(ws, watcher, subscriber))
    leaving = loop.create_task(subscriber.leave.wait())
    try:
        await asyncio.wait({reader, leaving}, return_when=asyncio.FIRST_COMPLETED)
        if not reader.done():  # the client is still there: close, as only we may
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            await subscriber.close_socket()
        else:
            reader.result()  # a bug of reading shows, not lost with the task
    finally:
        reader.cancel()
        leaving.cancel()


async def _read_input(
    ws: web.WebSocketResponse, watcher: Watcher, subscriber: WebSocketSubscriber
) -> None:
    """Write each text frame, as a line, to the process's stdin, until the client leaves."""
    async for message in ws:
        if message.type is WSMsgType.TEXT:
            if not watcher.send_input(message.data):
                subscriber.send_notice(INPUT_NOT_DELIVERED)
        elif message.type is WSMsgType.BINARY:
            subscriber.send_notice(INPUT_NOT_TEXT)


async def close_all(app: web.Application) -> None:
    """``on_shutdown``: tell every attached client the agent is going away."""
    subscribers: weakref.WeakSet[WebSocketSubscriber] = app[SOCKETS_KEY]
    await asyncio.gather(*(
        subscriber.shutdown(WSCloseCode.GOING_AWAY, b"agent shutting down")
        for subscriber in list(subscribers)
    ))
