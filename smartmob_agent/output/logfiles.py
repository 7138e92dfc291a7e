"""Reading a process's log files back (their format is described in
:mod:`smartmob_agent.output.logs`): backwards, for the last lines, and forwards, for a
client that follows the log from a line on.

Every record of one batch starts with the same bytes (time, number of the batch's first
line, stream, run), so reading forward groups records by that prefix: a batch's lines
are found with C-level ``bytes`` methods, a handful of Python steps per batch rather than
per line, which is what lets a client that fell behind replay a million lines a second.

Each function here does blocking file I/O: the agent calls them in a thread, on files it
opened in the event loop's thread (where rotations happen, so a rotation cannot move a
file between choosing and opening it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger("smartmob_agent.logs")  # the log's own logger: same messages

#: Bytes read at a time when a file is read from its end.
_READ_BLOCK = 64 * 1024
#: Bytes read at a time when a file is read forward.
FORWARD_BLOCK = 256 * 1024
_STREAM = {b"o": "stdout", b"e": "stderr"}

#: The run a line came from: (pid of the child, restart count), ``None`` when unknown.
Run = tuple[int | None, int | None]
NO_RUN: Run = (None, None)
#: One line read back: (seq, at, stream, line as bytes, run).
Raw = tuple[int, float, str, bytes, Run]
#: Lines of one batch: (seq of its first line, at, stream, lines as bytes, run).
Batch = tuple[int, float, str, list[bytes], Run]
#: An open log file and its size when it was opened.
Opened = tuple[BinaryIO, int]


def open_all(paths: list[Path]) -> list[Opened]:
    """Open the files that exist, newest first, with their size now."""
    opened: list[Opened] = []
    for path in paths:
        try:
            file = open(path, "rb")  # noqa: SIM115 - closed by whoever reads them
        except FileNotFoundError:
            continue
        except OSError as error:
            log.warning("cannot read the output log %s: %s", path, error)
            continue
        opened.append((file, os.fstat(file.fileno()).st_size))
    return opened


# -- backwards: the last lines ---------------------------------------------------------------


def read_files(
    opened: list[Opened], tail: int, since: float | None = None,
    after: int | None = None, before: int | None = None,
) -> tuple[list[Raw], int]:
    """The last ``tail`` lines at or after ``since``, numbered above ``after`` and below
    ``before``, of ``opened`` (newest first), read from their ends; closes the files.
    Oldest first, with (when ``after`` is given) how many older ones also matched."""
    found: list[Raw] = []
    more = 0
    try:
        for raw in _numbered(opened):
            if before is not None and raw[0] >= before:
                continue
            if (since is not None and raw[1] < since) or (after is not None and raw[0] <= after):
                break
            if len(found) < tail:
                found.append(raw)
            elif after is None:
                break
            else:
                more += 1
    except OSError as error:
        log.warning("cannot read the output log: %s", error)
    finally:
        for file, _ in opened:
            file.close()
    return found[::-1], more


def _numbered(opened: list[Opened]) -> Iterator[Raw]:
    """The lines of ``opened`` (newest file first), last first, each with its sequence
    number: a batch's records carry its first number, so a batch is read whole before
    its lines are numbered."""
    batch: list[Raw] = []  # records of one batch, last first, with the batch's number
    for file, size in opened:
        for record in _backwards(file, size):
            raw = parse_record(record)
            if raw is None:
                continue
            if batch and (raw[0] != batch[0][0] or raw[0] == 0):
                yield from _number(batch)
                batch = []
            batch.append(raw)
    yield from _number(batch)


def _number(batch: list[Raw]) -> Iterator[Raw]:
    """The records of one batch (last first, each with the batch's first number), each
    with its own number; lines of the older format (number 0) keep 0."""
    if not batch:
        return
    first = batch[0][0]
    if first == 0:
        yield from batch
        return
    last = first + len(batch) - 1
    for i, (_, at, stream, line, run) in enumerate(batch):
        yield last - i, at, stream, line, run


def _backwards(file: BinaryIO, end: int) -> Iterator[bytes]:
    """The lines of the first ``end`` bytes of ``file``, last first, without newlines."""
    position = end
    rest = b""
    while position > 0:
        size = min(_READ_BLOCK, position)
        position -= size
        file.seek(position)
        parts = (file.read(size) + rest).split(b"\n")
        rest = parts[0]
        for part in reversed(parts[1:]):
            if part:
                yield part
    if rest:
        yield rest


def parse_record(record: bytes) -> Raw | None:
    """``b"<at> <seq> <o|e> <pid> <restarts> <line>"`` as ``(seq, at, stream, line,
    (pid, restarts))``, where ``seq`` is the number of the first line of the record's
    batch; the older ``b"<at> <o|e> <line>"`` with ``seq`` 0 and no run. ``None`` if
    malformed (e.g. the cut-off end of a file an agent was killed while writing)."""
    at, _, rest = record.partition(b" ")
    code, space, rest = rest.partition(b" ")
    if not space:
        return None
    try:
        stream = _STREAM.get(code)
        if stream is not None:  # the older format
            return 0, float(at), stream, rest, NO_RUN
        parts = rest.split(b" ", 3)
        if len(parts) != 4 or not code.isdigit():
            return None
        stream = _STREAM.get(parts[0])
        if stream is None:
            return None
        run = (_number_or_none(parts[1]), _number_or_none(parts[2]))
        return int(code), float(at), stream, parts[3], run
    except ValueError:
        return None


def _number_or_none(field: bytes) -> int | None:
    return None if field == b"-" else int(field)


# -- forwards: from a line on ------------------------------------------------------------------


class Cursor:
    """A place in one log file, to read it forward from: the file (open, so a rotation
    that renames or removes it does not lose the place), the offset of the next record,
    and the file's generation (see :attr:`.ProcessLog.rotations`).

    A read may end inside a batch; the rest of it, in the next read, is numbered on from
    where the first part ended.
    """

    def __init__(self, file: BinaryIO, offset: int, generation: int) -> None:
        self.file = file
        self.offset = offset
        self.generation = generation
        self._prefix = b""  # the record prefix of the last batch read ...
        self._next = 0  # ... and the number of its next line

    def read(self, wanted: int = 0, limit: int = FORWARD_BLOCK) -> list[Batch]:
        """The next batches (about ``limit`` bytes of whole records, or one record if
        longer), oldest first, moving past them; batches entirely numbered below
        ``wanted`` are passed over. ``[]`` at the end of what the file holds."""
        while True:
            records = self._records(limit)
            if records is None:
                return []
            batches = self._batches(records, wanted)
            if batches:
                return batches

    def _records(self, limit: int) -> list[bytes] | None:
        """The whole records from the offset on, moving past them; ``None`` at the end."""
        file = self.file
        file.seek(self.offset)
        data = file.read(limit)
        end = data.rfind(b"\n") + 1
        while end == 0 and data:  # a record longer than limit
            more = file.read(limit)
            if not more:
                return None  # the file ends inside a record: it is not all written yet
            data += more
            end = data.rfind(b"\n") + 1
        if end == 0:
            return None
        self.offset += end
        records = data.split(b"\n")
        records.pop()  # what follows the last newline: nothing, or part of a record
        return records

    def _batches(self, records: list[bytes], wanted: int) -> list[Batch]:
        """Group ``records`` into numbered batches."""
        batches: list[Batch] = []
        i, count = 0, len(records)
        while i < count:
            record = records[i]
            raw = parse_record(record)
            if raw is None:  # a line cut off by a killed agent, or an empty one
                i += 1
                continue
            seq, at, stream, line, run = raw
            if seq == 0:  # the older format: numbered 0, a batch of its own
                if wanted <= 0:
                    batches.append((0, at, stream, [line], run))
                i += 1
                continue
            size = len(record) - len(line)
            prefix = record[:size]
            j = _run_end(records, i, prefix)
            first = self._next if prefix == self._prefix else seq
            self._prefix, self._next = prefix, first + (j - i)
            if self._next > wanted:
                batches.append((first, at, stream, [r[size:] for r in records[i:j]], run))
            i = j
        return batches

    def close(self) -> None:
        """Close the file."""
        self.file.close()


def _run_end(records: list[bytes], start: int, prefix: bytes) -> int:
    """The index after the last record of the batch that ``records[start]`` begins
    (those starting with ``prefix``). A batch's records are contiguous and no other
    record starts with its prefix (it holds the batch's own number), so the test is
    monotonic: gallop, then bisect, O(log n) steps per batch."""
    count = len(records)
    low, step = start, 1  # records[low] is in the batch
    high = start + 1
    while high < count and records[high].startswith(prefix):
        low = high
        step *= 2
        high = min(count, low + step)
    while high - low > 1:  # records[low] is in it; records[high] is not (or the end)
        middle = (low + high) // 2
        if records[middle].startswith(prefix):
            low = middle
        else:
            high = middle
    return high


def first_seq(file: BinaryIO) -> int | None:
    """The number of the first line of a log file (``0`` for the older format),
    ``None`` if it has no whole record."""
    file.seek(0)
    for record in file:
        if not record.endswith(b"\n"):
            return None
        raw = parse_record(record[:-1])
        if raw is not None:
            return raw[0]
    return None


def locate(opened: list[tuple[BinaryIO, int]], seq: int) -> tuple[Cursor | None, int]:
    """A cursor on the file of ``opened`` (``(file, generation)``, newest first) that
    holds the line numbered ``seq``, at its start (reading passes over what comes before
    ``seq``), or on the oldest file if they all begin after it; and how many numbers
    before the first line they hold are missing then (rotated away). Closes the files it
    does not keep; ``None`` if no file has a line."""
    chosen: tuple[BinaryIO, int] | None = None
    missing = 0
    try:
        for file, generation in opened:
            first = first_seq(file)
            if first is None:
                continue
            chosen, missing = (file, generation), max(0, first - seq)
            if first <= seq:
                break
    except OSError as error:
        log.warning("cannot read the output log: %s", error)
        chosen = None
    for file, _ in opened:
        if chosen is None or file is not chosen[0]:
            file.close()
    if chosen is None:
        return None, 0
    return Cursor(chosen[0], 0, chosen[1]), missing
