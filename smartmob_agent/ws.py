"""The ``attach`` WebSocket: each output line of a process as one text frame.

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

from aiohttp import WSCloseCode, web

from smartmob_agent.api import AGENT_KEY, routes
from smartmob_agent.frames import encode_text_frames

log = logging.getLogger(__name__)

#: Bytes queued for one client (beyond the kernel's socket buffer) before lines drop.
MAX_BUFFER = 1024 * 1024

SOCKETS_KEY = web.AppKey("websockets", weakref.WeakSet[web.WebSocketResponse])


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

    def send_lines(self, stream: str, lines: list[bytes]) -> None:
        """Write the lines as frames now, or count them as dropped if the client lags."""
        transport = self._transport
        if self._ws.closed or transport.is_closing():
            return
        if transport.get_write_buffer_size() > self._max_buffer:
            self.pending_drops += len(lines)
            self.dropped += len(lines)
            return
        data = encode_text_frames(lines)
        if self.pending_drops:
            data = encode_text_frames([dropped_notice(self.pending_drops)]) + data
            self.pending_drops = 0
        transport.write(data)

    def close(self) -> None:
        """The process is gone: close the WebSocket normally."""
        if self._close_task is None and not self._ws.closed:
            self._close_task = asyncio.get_running_loop().create_task(
                self._ws.close(code=WSCloseCode.OK, message=b"process deleted")
            )

    async def wait_closed(self) -> None:
        """Wait for a close started by :meth:`close` to finish."""
        if self._close_task is not None:
            await self._close_task


@routes.get("/attach-console/{slug}", name="attach")
async def attach_console(request: web.Request) -> web.WebSocketResponse:
    """Stream the process's output, one line per text frame, from now until it is deleted."""
    watcher = request.app[AGENT_KEY].get(request.match_info["slug"])
    # no compression: frames are written pre-encoded, which an extension would break
    ws = web.WebSocketResponse(compress=False, max_msg_size=64 * 1024)
    await ws.prepare(request)
    request.app[SOCKETS_KEY].add(ws)
    subscriber = WebSocketSubscriber(ws, request)
    watcher.hub.subscribe(subscriber)
    try:
        async for _message in ws:
            pass  # client frames carry nothing yet
    finally:
        watcher.hub.unsubscribe(subscriber)
        await subscriber.wait_closed()
        if subscriber.dropped:
            log.info("%s: an attached client missed %d line(s)", watcher.spec.slug,
                     subscriber.dropped)
    return ws


async def close_all(app: web.Application) -> None:
    """``on_shutdown``: tell every attached client the agent is going away."""
    for ws in list(app[SOCKETS_KEY]):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"agent shutting down")
