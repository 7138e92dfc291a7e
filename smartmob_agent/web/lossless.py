"""The default attach client: one that reads more slowly than the process writes loses no
line that the log still keeps.

While the client keeps up, lines go to it live, as for a
:class:`~smartmob_agent.web.subscriber.WebSocketSubscriber`. Once more than
:data:`~smartmob_agent.web.subscriber.MAX_BUFFER` waits for it, it *falls behind*: the
live lines are no longer written for it (they are in the log already), a ``replaying``
frame says so, and a task serves it from the log (:class:`~smartmob_agent.output.follow.Follower`),
a piece at a time, each once the connection has taken the previous one, until it has
every line the log numbered; a ``live`` frame then says it follows live again. So what
the agent holds for it stays bounded (about the buffer plus one piece), the child is
never slowed, and the client loses only the lines that rotation removed from the log
before it read them (said as dropped, like the live-only client's drops). Markers and
notices that come while it is behind are held, in order, at the place they came
(bounded: past :data:`MAX_HELD_MARKERS` they are counted instead).

A requested replay (``?tail``, ``?after``) is served the same way once the subscriber is
subscribed, without the two frames: the client asked for it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Mapping
from typing import Any

from aiohttp import WSCloseCode, web
from aiohttp.abc import AbstractStreamWriter

from smartmob_agent.model import LogLine, Stamp
from smartmob_agent.output.follow import Follower
from smartmob_agent.output.logfiles import Batch
from smartmob_agent.output.logs import ProcessLog
from smartmob_agent.web.frames import encode_text_frames
from smartmob_agent.web.subscriber import (
    MAX_BUFFER,
    WebSocketSubscriber,
    json_frame,
    marker_document,
)

log = logging.getLogger("smartmob_agent.ws")  # stable name: the attach socket's records

#: Markers and notices held, at most, for a client that is behind; later ones are counted.
MAX_HELD_MARKERS = 1000


def replaying_notice(seq: int) -> bytes:
    """The text of the frame that tells a client it falls behind: the lines from ``seq``
    on come from the log."""
    return (
        f"[smartmob-agent] replaying from the log from line {seq}: this client reads more "
        "slowly than the process writes"
    ).encode()


def live_notice(replayed: int) -> bytes:
    """The text of the frame that tells a client it has caught up."""
    return f"[smartmob-agent] live again: {replayed} line(s) replayed from the log".encode()


def rotated_notice(count: int) -> bytes:
    """The text of the frame that tells a client how many lines the log lost before it
    read them."""
    return (
        f"[smartmob-agent] {count} line(s) dropped: the log no longer keeps them (rotated "
        "away before this client read them)"
    ).encode()


class LosslessSubscriber(WebSocketSubscriber):
    """Sends a hub's lines to one WebSocket client, from the log when it falls behind.

    Args:
        ws: the prepared WebSocket.
        request: its request (its transport is written to).
        writer: what ``ws.prepare()`` returned: its ``drain()`` waits until the
            connection has taken what was written.
        log: the process's log, which the client is served from when behind.
    """

    def __init__(
        self, ws: web.WebSocketResponse, request: web.Request, writer: AbstractStreamWriter,
        log: ProcessLog, max_buffer: int = MAX_BUFFER, *, json_frames: bool = False,
    ) -> None:
        super().__init__(ws, request, max_buffer, json_frames=json_frames)
        self._writer = writer
        self._log = log
        #: while behind: where the lines come from, else ``None`` (live)
        self._follower: Follower | None = None
        self._task: asyncio.Task[None] | None = None
        self._announce = False  # this time behind is said (it was not asked for)
        self._replayed = 0  # lines sent from the log this time behind
        #: markers and notices that came while behind, with the number of the line
        #: they come before
        self._markers: deque[tuple[int, Mapping[str, Any]]] = deque()

    # -- live ----------------------------------------------------------------------------

    def send_stamped(self, stream: str, lines: list[bytes], stamp: Stamp | None) -> None:
        """Write the lines as frames now; falls behind if the client lags. Behind, live
        lines are left to the log (except those a closed log did not number: counted)."""
        transport = self._transport
        if self._ws.closed or transport.is_closing():
            return
        if self._follower is not None:
            if stamp is None:
                self.pending_drops += len(lines)
                self.dropped += len(lines)
            return
        transport.write(self._frames(stream, lines, stamp))
        self._check_lag()

    def send_event(self, event: Mapping[str, Any]) -> None:
        """Send a marker (JSON frames only), or hold it while behind."""
        if not self._json or self._ws.closed or self._transport.is_closing():
            return
        if self._follower is not None:
            self._hold_marker(event)
            return
        self._transport.write(json_frame(marker_document(event)))
        self._check_lag()

    def send_notice(self, text: bytes) -> None:
        """Tell this client alone something, in its place among the lines."""
        if self._follower is not None:
            self._hold_marker({"event": "notice", "message": text.decode()})
        else:
            super().send_notice(text)

    def _check_lag(self) -> None:
        if self._transport.get_write_buffer_size() > self._max_buffer and not self._log.closed:
            self._fall_behind()

    def _hold_marker(self, marker: Mapping[str, Any]) -> None:
        if len(self._markers) < MAX_HELD_MARKERS:
            self._markers.append((self._log.next_seq, marker))
        else:
            self.pending_events += 1

    def _fall_behind(self) -> None:
        """The next lines come from the log: say it, and serve them from there."""
        log = self._log
        self._follower = Follower(log, log.next_seq, log.mark())
        self._announce = True
        self._replayed = 0
        if self._json:
            frame = json_frame({"event": "replaying", "from": log.next_seq})
        else:
            frame = encode_text_frames([replaying_notice(log.next_seq)])
        self._transport.write(frame)
        self._start()

    # -- replay --------------------------------------------------------------------------

    def hold(self) -> None:
        """Leave what comes live to the log until :meth:`replay` (subscribe right
        after)."""
        log = self._log
        self._follower = Follower(log, log.next_seq, log.mark())

    def replay(self, entries: list[LogLine], not_replayed: int, tail: int) -> None:
        """Send the lines of the log before the subscription, then those since, from the
        log until caught up, then follow live."""
        if not (self._ws.closed or self._transport.is_closing()):
            self._transport.write(self._replay_frames(entries, not_replayed, tail))
        self._start()

    def resume(self, seq: int) -> None:
        """Send every line from the one numbered ``seq`` on that the log keeps, then
        follow live (subscribe right after)."""
        self._follower = Follower(self._log, seq)
        self._start()

    def _start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._catch_up())

    async def _catch_up(self) -> None:
        """Serve the client from the log, a piece each time the connection has taken the
        previous one, until it has caught up; then it is live again."""
        follower = self._follower
        assert follower is not None
        try:
            while not self._gone():
                await self._writer.drain()
                if self._gone():
                    return
                if follower.caught_up:  # nothing can come between this and live lines
                    self._go_live()
                    return
                batches, missing = await follower.read()
                if not self._gone():
                    self._write_replayed(batches, missing)
        except ConnectionError:  # the client went away
            return
        except Exception:  # the log cannot be read: say so and end, never hang silent
            log.exception("reading the log back for an attached client failed")
            await self._ws.close(code=WSCloseCode.INTERNAL_ERROR,
                                 message=b"the agent could not read the process's log")
        finally:
            follower.close()

    def _gone(self) -> bool:
        return self._ws.closed or self._transport.is_closing()

    def _write_replayed(self, batches: list[Batch], missing: int) -> None:
        """Write lines read from the log, each held marker before the line it preceded."""
        parts = []
        if missing:
            self.dropped += missing
            parts.append(self._missing_frame(missing))
        markers = self._markers
        for first, at, stream, lines, (pid, restarts) in batches:
            end = first + len(lines)
            start = first
            while markers and markers[0][0] < end:
                before, marker = markers.popleft()
                if before > start:
                    parts.append(self._frames(stream, lines[start - first:before - first],
                                              Stamp(start, at, pid, restarts)))
                    start = before
                parts.append(self._marker_frame(marker))
            if start < end:
                parts.append(self._frames(stream, lines[start - first:],
                                          Stamp(start, at, pid, restarts)))
            self._replayed += len(lines)
        self._transport.write(b"".join(parts))

    def _go_live(self) -> None:
        """Write what was held, say so if this time behind was not asked for, and take
        the live lines again."""
        parts = [self._marker_frame(marker) for _, marker in self._markers]
        self._markers.clear()
        if self.pending_drops or self.pending_events:
            parts.append(self._drop_notice())
        if self._announce:
            if self._json:
                parts.append(json_frame({"event": "live", "replayed": self._replayed}))
            else:
                parts.append(encode_text_frames([live_notice(self._replayed)]))
        self._follower = None
        self._announce = False
        self._transport.write(b"".join(parts))

    def _missing_frame(self, count: int) -> bytes:
        if self._json:
            return json_frame({"event": "dropped", "count": count})
        return encode_text_frames([rotated_notice(count)])

    def _marker_frame(self, marker: Mapping[str, Any]) -> bytes:
        """A held marker as this client takes it: JSON, or the text of a notice."""
        if self._json:
            return json_frame(marker_document(marker))
        if marker.get("event") == "notice":
            return encode_text_frames([str(marker["message"]).encode()])
        return b""

    def release(self) -> None:
        """The handler is done with the client: stop serving it from the log."""
        super().release()
        if self._task is not None:
            self._task.cancel()
        if self._follower is not None:
            self._follower.close()

    @property
    def behind(self) -> bool:
        """Whether the client is served from the log (it fell behind, or replays)."""
        return self._follower is not None
