"""One attached client of the ``attach`` WebSocket, as the hub sees it: the lines of a
process written to its connection without ever waiting for it.

Lines travel as pre-encoded frames written straight to the connection's transport, a
whole batch in one write (see :mod:`smartmob_agent.web.frames`), which is what lets one
client follow a process writing hundreds of thousands of lines a second. What a client
has not yet taken is bounded by :data:`MAX_BUFFER`. A :class:`WebSocketSubscriber`, the
live-only client (``?live=1``), drops and counts the lines past it, and a notice frame
tells the client how many once it catches up; the default client, a
:class:`~smartmob_agent.web.lossless.LosslessSubscriber`, gets them from the log instead.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from typing import Any

from aiohttp import WSCloseCode, web

from smartmob_agent.model import LogLine, Stamp
from smartmob_agent.representations import format_time, line_document
from smartmob_agent.web.frames import encode_text_frames, json_line_payloads

#: Bytes queued for one client (beyond the kernel's socket buffer) before lines drop.
MAX_BUFFER = 1024 * 1024
#: Longest wait for a client to take the close frame; a stuck one is then cut off.
CLOSE_TIMEOUT = 2.0
#: First and longest wait before trying again to tell a lagging client what it missed.
NOTICE_RETRY = (0.05, 1.0)


def dropped_notice(count: int) -> bytes:
    """The text of the frame that tells a client how many lines it missed."""
    return (
        f"[smartmob-agent] {count} line(s) dropped: this client reads more slowly than "
        "the process writes"
    ).encode()


def not_replayed_notice(count: int, tail: int) -> bytes:
    """The text of the frame that tells a resuming client how many lines it will not
    get: more followed its ``after`` than a replay sends."""
    return (
        f"[smartmob-agent] {count} line(s) not replayed: a replay sends at most the last "
        f"{tail}"
    ).encode()


def json_frame(document: Mapping[str, Any]) -> bytes:
    """One text frame carrying ``document`` as compact JSON."""
    return encode_text_frames([json.dumps(document, separators=(",", ":")).encode()])


#: A live batch held while a replay is read: (stream, lines, stamp), or a marker.
_Held = tuple[str, list[bytes], Stamp | None] | Mapping[str, Any]


class WebSocketSubscriber:
    """Sends a hub's lines to one WebSocket client without ever waiting for it."""

    def __init__(
        self, ws: web.WebSocketResponse, request: web.Request, max_buffer: int = MAX_BUFFER,
        *, json_frames: bool = False,
    ) -> None:
        self._ws = ws
        transport = request.transport
        assert transport is not None, "the WebSocket must be prepared first"
        self._transport = transport
        self._max_buffer = max_buffer
        self._json = json_frames
        self.pending_drops = 0
        #: lifecycle markers dropped and not yet said (JSON frames only)
        self.pending_events = 0
        self.dropped = 0
        #: set to have the handler close the socket with ``_close_with``; see shutdown
        self.leave = asyncio.Event()
        self._close_with: tuple[int, bytes] = (WSCloseCode.GOING_AWAY, b"agent shutting down")
        self._done = asyncio.Event()
        self._notice: asyncio.TimerHandle | None = None
        #: live batches and markers held while a replay is read, else ``None``
        self._held: list[_Held] | None = None
        self._held_bytes = 0
        self._held_full = False  # past the bound: everything newer is dropped until replay

    def send_lines(self, stream: str, lines: list[bytes]) -> None:
        """Send lines that the log did not number (see :meth:`send_stamped`)."""
        self.send_stamped(stream, lines, None)

    def send_stamped(self, stream: str, lines: list[bytes], stamp: Stamp | None) -> None:
        """Write the lines as frames now, or count them as dropped if the client lags."""
        transport = self._transport
        if self._ws.closed or transport.is_closing():
            return
        if self._held is not None:
            self._hold((stream, lines, stamp), sum(map(len, lines)), len(lines))
            return
        if transport.get_write_buffer_size() > self._max_buffer:
            self._drop(len(lines))
            return
        data = self._frames(stream, lines, stamp)
        if self.pending_drops or self.pending_events:
            data = self._drop_notice() + data
        transport.write(data)

    def _frames(self, stream: str, lines: list[bytes], stamp: Stamp | None) -> bytes:
        """The frames of a batch of lines, as this client takes them."""
        if not self._json:  # the fast path: bare text
            return encode_text_frames(lines)
        return encode_text_frames(self._json_payloads(stream, lines, stamp))

    def _json_payloads(
        self, stream: str, lines: list[bytes], stamp: Stamp | None
    ) -> list[bytes]:
        if stamp is None:
            return json_line_payloads(lines, None, format_time(time.time()), stream, None, None)
        return json_line_payloads(
            lines, stamp.seq, format_time(stamp.at), stream, stamp.pid, stamp.restarts
        )

    def send_event(self, event: Mapping[str, Any]) -> None:
        """Send a lifecycle marker as a JSON frame (bare text clients get none)."""
        if not self._json:
            return
        transport = self._transport
        if self._ws.closed or transport.is_closing():
            return
        if self._held is not None:
            self._hold(event, 100, 0)
            return
        if transport.get_write_buffer_size() > self._max_buffer:
            self._drop(0, events=1)
            return
        data = json_frame(marker_document(event))
        if self.pending_drops or self.pending_events:
            data = self._drop_notice() + data
        transport.write(data)

    def send_notice(self, text: bytes) -> None:
        """Tell this client alone something (input not delivered): a text frame, or
        ``{"event": "notice", "message"}`` in JSON."""
        if self._json:
            self.send_event({"event": "notice", "message": text.decode()})
        else:
            self.send_lines("agent", [text])

    def _drop(self, lines: int, events: int = 0) -> None:
        self.pending_drops += lines
        self.pending_events += events
        self.dropped += lines
        if self._notice is None:  # say it even if the process writes nothing more
            self._schedule_notice(NOTICE_RETRY[0])

    def _drop_notice(self) -> bytes:
        """The frame saying what was dropped (and forgetting it)."""
        lines, events = self.pending_drops, self.pending_events
        self.pending_drops = self.pending_events = 0
        if not self._json:
            return encode_text_frames([dropped_notice(lines)])
        document: dict[str, Any] = {"event": "dropped", "count": lines}
        if events:
            document["events"] = events
        return json_frame(document)

    # -- replay ---------------------------------------------------------------------------

    def hold(self) -> None:
        """Hold what comes live until :meth:`replay` (subscribe right after)."""
        self._held = []

    def _hold(self, item: _Held, size: int, lines: int) -> None:
        assert self._held is not None
        if self._held_full or self._held_bytes + size > self._max_buffer:
            # bounded like a lagging client; and what is dropped is all newer than what
            # is held, so the notice goes after it (see replay)
            self._held_full = True
            self.pending_drops += lines
            self.pending_events += 0 if lines else 1
            self.dropped += lines
            return
        self._held.append(item)
        self._held_bytes += size

    def replay(self, entries: list[LogLine], not_replayed: int, tail: int) -> None:
        """Send the lines of the log (those before the subscription), then what was
        held meanwhile, then follow live."""
        held, self._held = self._held or [], None
        self._held_bytes = 0
        self._held_full = False
        # dropped while held: newer than every held item, so said after them
        drops, events = self.pending_drops, self.pending_events
        self.pending_drops = self.pending_events = 0
        transport = self._transport
        if self._ws.closed or transport.is_closing():
            return
        transport.write(self._replay_frames(entries, not_replayed, tail))
        for item in held:
            if isinstance(item, tuple):
                self.send_stamped(*item)
            else:
                self.send_event(item)
        if drops or events:
            self.pending_drops += drops
            self.pending_events += events
            self.cancel_notice()
            self._send_notice(NOTICE_RETRY[0])  # now, or once the client has caught up

    def _replay_frames(self, entries: list[LogLine], not_replayed: int, tail: int) -> bytes:
        """The frames of a replay: what it leaves out, if anything, then its lines."""
        parts = []
        if not_replayed:
            if self._json:
                parts.append(json_frame({"event": "dropped", "count": not_replayed}))
            else:
                parts.append(encode_text_frames([not_replayed_notice(not_replayed, tail)]))
        if self._json:
            parts.append(encode_text_frames(
                json.dumps(line_document(entry), separators=(",", ":")).encode()
                for entry in entries
            ))
        else:
            parts.append(encode_text_frames(entry.line.encode() for entry in entries))
        return b"".join(parts)

    def _schedule_notice(self, delay: float) -> None:
        self._notice = asyncio.get_running_loop().call_later(delay, self._send_notice, delay)

    def _send_notice(self, delay: float) -> None:
        """Send the pending drop notice once the client has caught up; else retry later."""
        self._notice = None
        transport = self._transport
        if not (self.pending_drops or self.pending_events) or self._ws.closed or (
            transport.is_closing()
        ):
            return
        if transport.get_write_buffer_size() > self._max_buffer:
            self._schedule_notice(min(delay * 2, NOTICE_RETRY[1]))
            return
        transport.write(self._drop_notice())

    def cancel_notice(self) -> None:
        """Forget a pending retry of the drop notice (the client is going away)."""
        if self._notice is not None:
            self._notice.cancel()
            self._notice = None

    def release(self) -> None:
        """The handler is done with the client: stop what still works for it."""
        self.cancel_notice()

    def close(self) -> None:
        """The process is gone: have the WebSocket closed normally (by its handler)."""
        self.cancel_notice()
        self.request_close(WSCloseCode.OK, b"process deleted")

    def request_close(self, code: int, message: bytes) -> None:
        """Have the handler close the WebSocket with ``code`` (the first reason given
        stays), without waiting."""
        if not self.leave.is_set():
            self._close_with = (code, message)
            self.leave.set()

    async def shutdown(self, code: int, message: bytes) -> bool:
        """Have the handler close the WebSocket with ``code``; return once it has.

        Only the handler closes: aiohttp drops the connection without waiting for the
        client's close frame when ``close()`` runs while another task waits in
        ``receive()``, and the client then sees 1006 instead of ``code``.
        """
        self.request_close(code, message)
        await self._done.wait()
        return True

    async def close_socket(self) -> None:
        """Close the WebSocket with the reason asked for (the handler's part), cutting
        off a client that does not take the close frame within :data:`CLOSE_TIMEOUT`: a
        client that stopped reading never lets it drain, which would hang a delete or the
        agent's shutdown."""
        if self._ws.closed:
            return
        code, message = self._close_with
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._ws.close(code=code, message=message)
        except TimeoutError:  # aiohttp has already closed the transport
            self._transport.abort()

    async def wait_closed(self) -> None:
        """Wait until the handler is done with the socket (closed by :meth:`close`, by
        :meth:`shutdown`, or by the client)."""
        await self._done.wait()

    def finished(self) -> None:
        """The handler is done: wake those waiting in :meth:`shutdown`."""
        self._done.set()


def marker_document(event: Mapping[str, Any]) -> dict[str, Any]:
    """A lifecycle marker as a JSON frame carries it (``at`` in ISO 8601)."""
    document = dict(event)
    at = document.get("at")
    if isinstance(at, float):
        document["at"] = format_time(at)
    return document
