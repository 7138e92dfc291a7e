"""The ``attach`` WebSocket: each output line of a process as one text frame, and each
text frame a client sends as one line of the process's stdin.

Lines travel as pre-encoded frames written straight to the connection's transport, a
whole batch in one write (see :mod:`smartmob_agent.frames`), which is what lets one
client follow a process writing hundreds of thousands of lines a second. What a client
has not yet taken is bounded by :data:`MAX_BUFFER`: past it, lines for that client are
dropped and counted, and a notice frame tells the client how many once it catches up.
"""

from __future__ import annotations

import asyncio
import logging
import weakref

from aiohttp import WSCloseCode, WSMsgType, web

from smartmob_agent.api import AGENT_KEY, routes
from smartmob_agent.frames import encode_text_frames

log = logging.getLogger(__name__)

#: Bytes queued for one client (beyond the kernel's socket buffer) before lines drop.
MAX_BUFFER = 1024 * 1024
#: Longest wait for a client to take the close frame; a stuck one is then cut off.
CLOSE_TIMEOUT = 2.0
#: First and longest wait before trying again to tell a lagging client what it missed.
NOTICE_RETRY = (0.05, 1.0)
#: Largest frame a client may send (one line of input).
MAX_INPUT_FRAME = 64 * 1024
#: What a client is told when its input cannot reach the process.
INPUT_NOT_DELIVERED = (
    b"[smartmob-agent] input not delivered: no child is running, it closed its stdin, "
    b"or it has not read the input already sent"
)
INPUT_NOT_TEXT = b"[smartmob-agent] input not delivered: send input as text frames"


def dropped_notice(count: int) -> bytes:
    """The text of the frame that tells a client how many lines it missed."""
    return (
        f"[smartmob-agent] {count} line(s) dropped: this client reads more slowly than "
        "the process writes"
    ).encode()


class WebSocketSubscriber:
    """Sends a hub's lines to one WebSocket client without ever waiting for it."""

    def __init__(
        self, ws: web.WebSocketResponse, request: web.Request, max_buffer: int = MAX_BUFFER
    ) -> None:
        self._ws = ws
        transport = request.transport
        assert transport is not None, "the WebSocket must be prepared first"
        self._transport = transport
        self._max_buffer = max_buffer
        self.pending_drops = 0
        self.dropped = 0
        self._close_task: asyncio.Task[bool] | None = None
        self._notice: asyncio.TimerHandle | None = None

    def send_lines(self, stream: str, lines: list[bytes]) -> None:
        """Write the lines as frames now, or count them as dropped if the client lags."""
        transport = self._transport
        if self._ws.closed or transport.is_closing():
            return
        if transport.get_write_buffer_size() > self._max_buffer:
            self.pending_drops += len(lines)
            self.dropped += len(lines)
            if self._notice is None:  # say it even if the process writes nothing more
                self._schedule_notice(NOTICE_RETRY[0])
            return
        data = encode_text_frames(lines)
        if self.pending_drops:
            data = encode_text_frames([dropped_notice(self.pending_drops)]) + data
            self.pending_drops = 0
        transport.write(data)

    def _schedule_notice(self, delay: float) -> None:
        self._notice = asyncio.get_running_loop().call_later(delay, self._send_notice, delay)

    def _send_notice(self, delay: float) -> None:
        """Send the pending drop notice once the client has caught up; else retry later."""
        self._notice = None
        transport = self._transport
        if not self.pending_drops or self._ws.closed or transport.is_closing():
            return
        if transport.get_write_buffer_size() > self._max_buffer:
            self._schedule_notice(min(delay * 2, NOTICE_RETRY[1]))
            return
        transport.write(encode_text_frames([dropped_notice(self.pending_drops)]))
        self.pending_drops = 0

    def cancel_notice(self) -> None:
        """Forget a pending retry of the drop notice (the client is going away)."""
        if self._notice is not None:
            self._notice.cancel()
            self._notice = None

    def close(self) -> None:
        """The process is gone: close the WebSocket normally (in the background)."""
        self.cancel_notice()
        if self._close_task is None:
            self._close_task = asyncio.get_running_loop().create_task(
                self.shutdown(WSCloseCode.OK, b"process deleted")
            )

    async def shutdown(self, code: int, message: bytes) -> bool:
        """Close the WebSocket with ``code``, cutting off a client that does not take it.

        A client that stopped reading never lets the close frame drain; waiting for it
        would hang a delete or the agent's shutdown.
        """
        if self._ws.closed:
            return False
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                return await self._ws.close(code=code, message=message)
        except TimeoutError:  # aiohttp has already closed the transport
            self._transport.abort()
            return True

    async def wait_closed(self) -> None:
        """Wait for a close started by :meth:`close` to finish."""
        if self._close_task is not None:
            await self._close_task


SOCKETS_KEY = web.AppKey("websockets", weakref.WeakSet[WebSocketSubscriber])


@routes.get("/attach-console/{slug}", name="attach")
async def attach_console(request: web.Request) -> web.WebSocketResponse:
    """Stream the process's output, one line per text frame, from now until it is deleted;
    write each text frame the client sends, with a newline, to the process's stdin."""
    watcher = request.app[AGENT_KEY].get(request.match_info["slug"])
    # no compression: frames are written pre-encoded, which an extension would break
    ws = web.WebSocketResponse(compress=False, max_msg_size=MAX_INPUT_FRAME)
    await ws.prepare(request)
    subscriber = WebSocketSubscriber(ws, request)
    request.app[SOCKETS_KEY].add(subscriber)
    watcher.hub.subscribe(subscriber)
    try:
        async for message in ws:
            if message.type is WSMsgType.TEXT:
                if not watcher.send_input(message.data):
                    subscriber.send_lines("agent", [INPUT_NOT_DELIVERED])
            elif message.type is WSMsgType.BINARY:
                subscriber.send_lines("agent", [INPUT_NOT_TEXT])
    finally:
        watcher.hub.unsubscribe(subscriber)
        subscriber.cancel_notice()
        await subscriber.wait_closed()
        if subscriber.dropped:
            log.info("%s: an attached client missed %d line(s)", watcher.spec.slug,
                     subscriber.dropped)
    return ws


async def close_all(app: web.Application) -> None:
    """``on_shutdown``: tell every attached client the agent is going away."""
    subscribers: weakref.WeakSet[WebSocketSubscriber] = app[SOCKETS_KEY]
    await asyncio.gather(*(
        subscriber.shutdown(WSCloseCode.GOING_AWAY, b"agent shutting down")
        for subscriber in list(subscribers)
    ))
