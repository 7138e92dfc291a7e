"""Following a process's log from one line on, for a client that is not live: the lines
it has not had, a bounded piece at a time, until it has every line the log numbered.

A client falls behind when it reads more slowly than the process writes; it then gets
the lines it missed from the log instead of losing them. The log's files are followed by
*generation* (see :attr:`.ProcessLog.rotations`): the file being read stays open, so a
rotation that renames or removes it does not lose the place, and at its end the next
newer one is opened by name. Lines the log no longer keeps (rotated away before the
client got them) are passed over and counted. A log without files is followed in its ring
buffer, which is all it keeps.

Files are read in a thread, on files opened in the event loop's thread (where rotations
happen), a piece of about :data:`~smartmob_agent.output.logfiles.FORWARD_BLOCK` bytes at
a time: what a follower holds stays bounded whatever it is behind by.
"""

from __future__ import annotations

import asyncio
import threading
from typing import BinaryIO

from smartmob_agent.output.logfiles import FORWARD_BLOCK, Batch, Cursor, locate
from smartmob_agent.output.logs import ProcessLog


class Follower:
    """Reads ``log`` forward from the line numbered ``seq``.

    Args:
        log: the process's log.
        seq: the number of the first line wanted.
        mark: where that line starts in the files (:meth:`.ProcessLog.mark`, taken
            when ``seq`` was the log's next number), which spares looking for it.
    """

    def __init__(self, log: ProcessLog, seq: int, mark: tuple[int, int] | None = None) -> None:
        #: the number of the next line to hand on
        self.seq = seq
        self._log = log
        self._mark = mark
        self._cursor: Cursor | None = None
        self._lock = threading.Lock()  # a read in a thread and close() in the loop's
        self._reading = False
        self._retried = False  # the files had nothing: read them once more before the ring
        self.closed = False

    @property
    def caught_up(self) -> bool:
        """Whether every line the log numbered so far was handed on (checked in the
        event loop's thread, between two batches of output: nothing can come between
        this answer and a live batch)."""
        return self.seq >= self._log.next_seq

    async def read(self, limit: int = FORWARD_BLOCK) -> tuple[list[Batch], int]:
        """The next lines: whole batches of about ``limit`` bytes, oldest first, the
        first numbered :attr:`seq` if the log still keeps it; and how many numbers before
        them were passed over because the log no longer keeps their lines.

        ``([], 0)`` once caught up (or closed); otherwise lines or a count, unless the
        log's writes are still on their way to the file (then call again).
        """
        log = self._log
        if self.closed or self.caught_up:
            return [], 0
        if log.folder is not None:
            batches, missing = await self._from_files(limit)
            if batches or missing or self.closed:
                self._retried = False
                return self._advance(batches), missing
        # no files, or they do not have the lines: those are the newest, in memory (or
        # the files lost them, and so did the ring buffer)
        start = self.seq
        ring = log.ring_from(start, limit)
        if ring and ring[0][0] > start and self._cursor is not None and not self._retried:
            # a rotation during the read may have put them in the file read: again, first
            self._retried = True
            return [], 0
        self._retried = False
        if not ring:  # the log kept nothing (it was removed): nothing more to follow
            self.seq = log.next_seq
            return [], self.seq - start
        kept = self._advance(ring)
        return kept, kept[0][0] - start

    def _advance(self, batches: list[Batch]) -> list[Batch]:
        """``batches`` from :attr:`seq` on, moving :attr:`seq` past them."""
        kept: list[Batch] = []
        for first, at, stream, lines, run in batches:
            if first + len(lines) <= self.seq:
                continue
            if first < self.seq:
                lines, first = lines[self.seq - first:], self.seq
            kept.append((first, at, stream, lines, run))
            self.seq = first + len(lines)
        return kept

    async def _from_files(self, limit: int) -> tuple[list[Batch], int]:
        """The next batches of the files, and the numbers passed over to reach them."""
        log = self._log
        missing = 0
        for _ in range(2 + max(0, log.rotations)):  # at most once through each file
            if self._cursor is None:
                missing += await self._open()
                if self._cursor is None:
                    return [], missing
            cursor = self._cursor
            current = log.rotations
            if cursor.generation >= current:  # what the log buffered must be in the file
                log.flush()
            batches = await self._in_thread(cursor, limit)
            if batches or self.closed or cursor.generation >= current:
                return batches, missing
            # the end of a file rotated before this read: on to the next newer one
            self._cursor = None
            cursor.close()
            self._mark = (cursor.generation + 1, 0)
        return [], missing

    async def _open(self) -> int:
        """Open the file of the mark, else the one where :attr:`seq` is; return how many
        numbers before the first line of the files are missing (rotated away)."""
        log = self._log
        if self._mark is not None:
            generation, offset = self._mark
            self._mark = None
            opened = log.open_files(generation)
            if opened:
                self._cursor = Cursor(opened[0][0], offset, generation)
                return 0
        self._reading = True
        cursor, missing = await asyncio.to_thread(self._locate, log.open_files(), self.seq)
        self._cursor = cursor
        return missing

    def _locate(self, opened: list[tuple[BinaryIO, int]], seq: int) -> tuple[Cursor | None, int]:
        cursor, missing = locate(opened, seq)
        self._done_reading(cursor)
        return cursor, missing

    async def _in_thread(self, cursor: Cursor, limit: int) -> list[Batch]:
        self._reading = True
        return await asyncio.to_thread(self._read, cursor, limit)

    def _read(self, cursor: Cursor, limit: int) -> list[Batch]:
        try:
            return cursor.read(self.seq, limit)
        finally:
            self._done_reading(cursor)

    def _done_reading(self, cursor: Cursor | None) -> None:
        """A read in a thread is over: close its file if :meth:`close` came meanwhile."""
        with self._lock:
            self._reading = False
            if self.closed and cursor is not None:
                cursor.close()

    def close(self) -> None:
        """Close the file being read (at once, or when the read in a thread is over)."""
        with self._lock:
            self.closed = True
            if self._cursor is not None and not self._reading:
                self._cursor.close()
