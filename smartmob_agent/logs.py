"""The output log of one process: a ring buffer in memory and rotated files on disk.

A :class:`ProcessLog` takes each batch of a child's output before the hub does, with the
hub's subscriber call (:meth:`~ProcessLog.send_lines`): every batch of output lines gets
one timestamp, goes into a ring buffer of the last ``lines`` lines, and is appended to
``output.log`` in the process's log folder, one record per line::

    1796148000.123456 o hello from the app
    1796148000.123501 e a line of stderr

(seconds since the epoch, ``o`` for stdout or ``e`` for stderr, the line as written).
Writes are buffered and flushed at most :data:`FLUSH_DELAY` seconds later, so a flood
costs one ``write`` per 64 KiB, not one per line. When the file would grow past
``max_bytes``, it is rotated: ``output.log`` becomes ``output.log.1``, which becomes
``output.log.2``, and so on; ``files`` rotated files are kept. The file is the truth: a
new :class:`ProcessLog` on the same folder (an agent that restarted) refills its ring
buffer from the files, and a request for more than the ring buffer holds reads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator
from itertools import repeat
from pathlib import Path
from typing import BinaryIO

from smartmob_agent.model import LogLine

log = logging.getLogger(__name__)

#: Name of the current log file in a process's log folder; rotated ones add ``.1``, ...
LOG_NAME = "output.log"
#: Longest time a written line stays in the agent's buffer before reaching the file.
FLUSH_DELAY = 0.2
#: Size of the write buffer (one write system call per this many bytes, at most).
WRITE_BUFFER = 64 * 1024
#: Bytes read at a time when a file is read from its end.
_READ_BLOCK = 64 * 1024
_CODE = {"stdout": b"o", "stderr": b"e"}
_STREAM = {b"o": "stdout", b"e": "stderr"}


#: What the ring buffer keeps: (at, stream, line as bytes).
_Raw = tuple[float, str, bytes]


class ProcessLog:
    """Output lines of one process, kept in memory and, if ``folder`` is given, on disk.

    Args:
        folder: where the log files go (created on the first line); ``None`` keeps the
            lines in memory only.
        lines: size of the ring buffer (the last lines kept in memory).
        max_bytes: size at which the current file is rotated.
        files: how many rotated files are kept besides the current one.
        clock: the wall clock (seconds since the epoch).

    The files already in ``folder`` (from an earlier agent) refill the ring buffer.
    """

    def __init__(
        self,
        folder: Path | None,
        *,
        lines: int = 1000,
        max_bytes: int = 10 * 1024 * 1024,
        files: int = 3,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.folder = folder
        self._max_bytes = max_bytes
        self._files = files
        self._clock = clock
        self._size = max(1, lines)
        self._ring: deque[_Raw] = deque(maxlen=self._size)
        #: whether the ring buffer holds every line the files hold
        self._complete = True
        self._file: BinaryIO | None = None
        self._written = 0  # bytes in the current file
        self._flush_handle: asyncio.TimerHandle | None = None
        self.closed = False
        if folder is not None:
            self._refill()

    @property
    def path(self) -> Path | None:
        """The current log file (which may not exist yet), or ``None`` without files."""
        return None if self.folder is None else self.folder / LOG_NAME

    def _paths(self) -> list[Path]:
        """Every log file, newest first."""
        assert self.folder is not None
        return [self.folder / LOG_NAME] + [
            self.folder / f"{LOG_NAME}.{i}" for i in range(1, self._files + 1)
        ]

    def _refill(self) -> None:
        """Fill the ring buffer with the last lines of the files an earlier agent wrote."""
        want = self._size
        raws = _read_files(_open_all(self._paths()), want + 1, None)
        if len(raws) > want:
            self._complete = False
            raws = raws[1:]
        self._ring.extend(raws)
        with contextlib.suppress(OSError):
            self._written = (self._paths()[0]).stat().st_size

    # -- the hub's subscriber ---------------------------------------------------------------

    def send_lines(self, stream: str, lines: list[bytes]) -> None:
        """Keep a batch of lines of ``stream`` (``stdout`` or ``stderr``), all stamped
        now; never waits for the disk beyond a buffered write."""
        if self.closed or not lines:
            return
        at = self._clock()
        ring = self._ring
        size = self._size
        kept = lines if len(lines) <= size else lines[-size:]
        if len(ring) + len(lines) > size:
            self._complete = False
        ring.extend(zip(repeat(at), repeat(stream), kept, strict=False))
        if self.folder is not None:
            prefix = b"%.6f %s " % (at, _CODE[stream])
            self._write(prefix, lines)

    def close(self) -> None:
        """Write what is buffered and close the file; later lines are ignored."""
        self.closed = True
        self.flush()
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    # -- the files ---------------------------------------------------------------------------

    def _write(self, prefix: bytes, lines: list[bytes]) -> None:
        data = prefix + (b"\n" + prefix).join(lines) + b"\n"
        try:
            if self._written + len(data) <= self._max_bytes:
                self._append(data)
            else:  # line by line, rotating where the next line would not fit
                for line in lines:
                    record = prefix + line + b"\n"
                    if self._written and self._written + len(record) > self._max_bytes:
                        self._rotate()
                    self._append(record)
        except OSError as error:  # a full or broken disk: keep the lines in memory only
            log.warning("cannot write the output log %s (%s): keeping lines in memory "
                        "only", self.path, error)
            self._drop_file()
            self.folder = None
            self._complete = False
            return
        if self._flush_handle is None:
            with contextlib.suppress(RuntimeError):  # no running loop: flushed on close
                self._flush_handle = asyncio.get_running_loop().call_later(
                    FLUSH_DELAY, self._timed_flush
                )

    def _append(self, data: bytes) -> None:
        if self._file is None:
            assert self.folder is not None
            self.folder.mkdir(parents=True, exist_ok=True)
            self._file = open(self.folder / LOG_NAME, "ab", buffering=WRITE_BUFFER)  # noqa: SIM115
            self._written = self._file.tell()
            if self._written and not _ends_with_newline(self.folder / LOG_NAME):
                data = b"\n" + data  # end the line a killed agent cut off
        self._file.write(data)
        self._written += len(data)

    def _rotate(self) -> None:
        """``output.log`` becomes ``output.log.1``, ``.1`` becomes ``.2``, ...; the
        oldest beyond ``files`` goes."""
        self._drop_file()
        paths = self._paths()
        if self._files == 0:
            with contextlib.suppress(FileNotFoundError):
                paths[0].unlink()
        for older, newer in zip(reversed(paths[1:]), reversed(paths[:-1]), strict=True):
            with contextlib.suppress(FileNotFoundError):
                os.replace(newer, older)
        self._written = 0

    def _drop_file(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(OSError):
                file.close()  # flushes

    def _timed_flush(self) -> None:
        self._flush_handle = None
        self.flush()

    def flush(self) -> None:
        """Write what is buffered to the file now."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._file is not None:
            try:
                self._file.flush()
            except OSError as error:
                log.warning("cannot write the output log %s: %s", self.path, error)

    async def remove(self) -> None:
        """Close the log and delete its files (the process is being deleted)."""
        self.close()
        self._ring.clear()
        if self.folder is not None:
            await asyncio.to_thread(shutil.rmtree, self.folder, True)

    # -- reading -----------------------------------------------------------------------------

    async def read(self, tail: int, since: float | None = None) -> list[LogLine]:
        """The last ``tail`` lines, of those read at or after ``since`` if given, oldest
        first: from the ring buffer when it holds them all, else from the files."""
        if tail <= 0:
            return []
        ring = self._ring
        matching = list(ring) if since is None else [raw for raw in ring if raw[0] >= since]
        covered = (
            len(matching) >= tail
            or self._complete
            or self.folder is None
            or (since is not None and bool(ring) and ring[0][0] < since)
        )
        if covered:
            raws = matching[-tail:]
        else:
            self.flush()
            opened = _open_all(self._paths())  # now: a rotation must not move them
            raws = await asyncio.to_thread(_read_files, opened, tail, since)
        return [LogLine(at, stream, line.decode(errors="replace")) for at, stream, line in raws]


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as file:
        file.seek(-1, os.SEEK_END)
        return file.read(1) == b"\n"


def _open_all(paths: list[Path]) -> list[tuple[BinaryIO, int]]:
    """Open the files that exist, newest first, with their size now."""
    opened: list[tuple[BinaryIO, int]] = []
    for path in paths:
        try:
            file = open(path, "rb")  # noqa: SIM115 - closed by _read_files
        except FileNotFoundError:
            continue
        except OSError as error:
            log.warning("cannot read the output log %s: %s", path, error)
            continue
        opened.append((file, os.fstat(file.fileno()).st_size))
    return opened


def _read_files(
    opened: list[tuple[BinaryIO, int]], tail: int, since: float | None
) -> list[_Raw]:
    """The last ``tail`` records at or after ``since`` of ``opened`` (newest first), read
    from their ends; closes the files. Oldest first."""
    found: list[_Raw] = []
    try:
        for file, size in opened:
            for record in _backwards(file, size):
                raw = _parse(record)
                if raw is None:
                    continue
                if since is not None and raw[0] < since:
                    return found[::-1]
                found.append(raw)
                if len(found) >= tail:
                    return found[::-1]
    except OSError as error:
        log.warning("cannot read the output log: %s", error)
    finally:
        for file, _ in opened:
            file.close()
    return found[::-1]


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


def _parse(record: bytes) -> _Raw | None:
    """``b"<at> <o|e> <line>"`` as ``(at, stream, line)``; ``None`` if malformed (e.g. the
    cut-off end of a file an agent was killed while writing)."""
    at, _, rest = record.partition(b" ")
    code, space, line = rest.partition(b" ")
    stream = _STREAM.get(code)
    if stream is None or not space:
        return None
    try:
        return float(at), stream, line
    except ValueError:
        return None
