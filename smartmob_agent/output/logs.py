"""The output log of one process: a ring buffer in memory and rotated files on disk.

A :class:`ProcessLog` takes each batch of a child's output before the hub does
(:meth:`~ProcessLog.append`): every batch of output lines gets one :class:`Stamp` (the
sequence number of its first line, the others following on; one timestamp; the run it
came from), goes into a ring buffer of the last ``lines`` lines, and is appended to
``output.log`` in the process's log folder, one record per line::

    1796148000.123456 41 o 4242 0 hello from the app
    1796148000.123501 42 e 4242 0 a line of stderr
    1796148000.123501 42 e 4242 0 and the next one, seq 43

(seconds since the epoch; the sequence number of the *batch's first line*, so a line's
own number is that plus the count of the records before it with the same number, which
costs nothing per line to write; ``o`` for stdout or ``e`` for stderr; the pid of the
child and the restart count of its run, ``-`` when there is none; the line as written).
When a batch is cut by a rotation, the part in the new file starts with its own number,
so each file reads alone. Records of the older format, ``<at> <o|e> <line>``, are still
read, as lines of sequence number 0.

Sequence numbers are per process, strictly increasing and never reused, across restarts
of the agent too, even a ``SIGKILL`` that loses the last buffered lines: numbers are
reserved in blocks of :data:`SEQ_BLOCK` through the ``reserve`` callback (the agent
writes the mark to its database) before any of them is used, and a new log starts at the
mark it is given (or after the last number in its files, if that is higher). A clean
close gives back the unused part of the block.

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
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from smartmob_agent.model import LogLine, Stamp
from smartmob_agent.output import logrecords
from smartmob_agent.output.logfiles import NO_RUN, Batch, Raw, Run, open_all, read_files
from smartmob_agent.output.logrecords import RedactKeys

log = logging.getLogger("smartmob_agent.logs")  # stable name: internals.rst

#: Name of the current log file in a process's log folder; rotated ones add ``.1``, ...
LOG_NAME = "output.log"
#: Longest time a written line stays in the agent's buffer before reaching the file.
FLUSH_DELAY = 0.2
#: Size of the write buffer (one write system call per this many bytes, at most).
WRITE_BUFFER = 64 * 1024
#: Sequence numbers reserved at a time: one write of the mark per this many lines.
SEQ_BLOCK = 100_000
_CODE = {"stdout": b"o", "stderr": b"e"}


class ProcessLog:
    """Output lines of one process, kept in memory and, if ``folder`` is given, on disk.

    Args:
        folder: where the log files go (created on the first line); ``None`` keeps the
            lines in memory only.
        lines: size of the ring buffer (the last lines kept in memory).
        max_bytes: size at which the current file is rotated.
        files: how many rotated files are kept besides the current one.
        clock: the wall clock (seconds since the epoch).
        first_seq: the lowest sequence number the log may use (the mark an earlier
            agent reserved up to).
        reserve: called as ``reserve(mark)`` before any number from ``mark`` on is used
            (and on close, with the first unused one): it must keep ``mark`` where the
            next log on this folder gets it as ``first_seq``. ``None``: the numbers go on
            from the files only, which a killed agent may have cut short.

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
        first_seq: int = 0,
        reserve: Callable[[int], None] | None = None,
    ) -> None:
        self.folder = self._home = folder  # _home: what remove() deletes, even after a failure
        self._max_bytes = max_bytes
        self._files = files
        self._clock = clock
        self._size = max(1, lines)
        self._ring: deque[Batch] = deque()
        self._ring_lines = 0  # lines in the ring buffer (at most self._size)
        #: whether the ring buffer holds every line the files hold
        self._complete = True
        self._file: BinaryIO | None = None
        self._written = 0  # bytes in the current file
        #: rotations so far: the current file is generation ``rotations``, and
        #: ``output.log.N`` generation ``rotations - N`` (see :meth:`mark`)
        self.rotations = 0
        self._flush_handle: asyncio.TimerHandle | None = None
        self.closed = False
        self._run: Run = NO_RUN
        #: what follows a record's number, by stream: b" o <pid> <restarts> "
        self._after_seq = {stream: b" %s - - " % code for stream, code in _CODE.items()}
        self._reserve = reserve
        if folder is not None:
            self._refill()
        last = self._ring[-1][0] + len(self._ring[-1][3]) - 1 if self._ring else 0
        #: the sequence number of the next line
        self.next_seq = max(first_seq, last + 1, 1)
        #: numbers below this one may have been used (the reserved mark)
        self._reserved = self.next_seq

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
        assert self.folder is not None
        if not self.folder.is_dir():  # a new process: nothing to read (one stat, not five)
            return
        want = self._size
        raws, _ = read_files(open_all(self._paths()), want + 1)
        if len(raws) > want:
            self._complete = False
            raws = raws[1:]
        self._ring.extend((seq, at, stream, [line], run) for seq, at, stream, line, run in raws)
        self._ring_lines = len(raws)
        with contextlib.suppress(OSError):
            self._written = (self._paths()[0]).stat().st_size

    # -- taking lines --------------------------------------------------------------------

    @property
    def run_pid(self) -> int | None:
        """The pid of the run the lines are stamped with (see :meth:`set_run`)."""
        return self._run[0]

    def set_run(self, pid: int | None, restarts: int | None) -> None:
        """Stamp the lines that follow with this run (``None, None``: no child runs)."""
        self._run = (pid, restarts)
        run = b"%s %s" % (
            b"-" if pid is None else b"%d" % pid,
            b"-" if restarts is None else b"%d" % restarts,
        )
        self._after_seq = {stream: b" %s %s " % (code, run) for stream, code in _CODE.items()}

    def append(self, stream: str, lines: list[bytes]) -> Stamp | None:
        """Keep a batch of lines of ``stream`` (``stdout`` or ``stderr``), all stamped
        now with the next sequence numbers; never waits for the disk beyond a buffered
        write (and, once per :data:`SEQ_BLOCK` lines, the ``reserve`` callback). The
        ring buffer keeps ``lines`` itself: the caller must not change it afterwards.

        Returns:
            The batch's stamp, or ``None`` if the log is closed (the lines are not kept
            nor numbered) or ``lines`` is empty.
        """
        if self.closed or not lines:
            return None
        n = len(lines)
        seq = self.next_seq
        end = self.next_seq = seq + n
        if end > self._reserved and self._reserve is not None:
            self._reserved = end + SEQ_BLOCK
            self._call_reserve(self._reserved)
        at = self._clock()
        run = self._run
        size = self._size
        if n <= size:
            self._ring.append((seq, at, stream, lines, run))
        else:  # the ring never sees the batch's first lines: only the files have them
            self._ring.append((end - size, at, stream, lines[-size:], run))
            self._complete = False
        self._ring_lines += min(n, size)
        if self._ring_lines > size:
            self._trim()
        if self.folder is not None:
            self._write(at, seq, stream, lines)
        return Stamp(seq, at, run[0], run[1])

    def _trim(self) -> None:
        """Drop the oldest lines of the ring buffer beyond its size."""
        self._complete = False
        ring = self._ring
        excess = self._ring_lines - self._size
        while excess > 0:
            seq, at, stream, lines, run = ring[0]
            if len(lines) <= excess:
                ring.popleft()
                excess -= len(lines)
            else:
                ring[0] = (seq + excess, at, stream, lines[excess:], run)
                excess = 0
        self._ring_lines = self._size

    def _memory(self) -> list[Raw]:
        """Every line of the ring buffer, oldest first."""
        return [
            (seq, at, stream, line, run)
            for first, at, stream, lines, run in self._ring
            for seq, line in enumerate(lines, first)
        ]

    def send_lines(self, stream: str, lines: list[bytes]) -> None:
        """:meth:`append`, as a hub subscriber's call."""
        self.append(stream, lines)

    def _call_reserve(self, mark: int) -> None:
        assert self._reserve is not None
        try:
            self._reserve(mark)
        except Exception:  # the callback's own errors are its business; numbers go on
            log.exception("cannot record the reserved sequence numbers of %s", self.path)

    def close(self) -> None:
        """Write what is buffered and close the file; later lines are ignored. Gives
        back the sequence numbers reserved but not used."""
        if not self.closed and self._reserve is not None and self._reserved > self.next_seq:
            self._reserved = self.next_seq
            self._call_reserve(self.next_seq)
        self.closed = True
        self.flush()
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    # -- the files ---------------------------------------------------------------------------

    def _write(self, at: float, seq: int, stream: str, lines: list[bytes]) -> None:
        rest = self._after_seq[stream]
        prefix = b"%.6f %d%s" % (at, seq, rest)
        data = prefix + (b"\n" + prefix).join(lines) + b"\n"
        try:
            if self._written + len(data) <= self._max_bytes:
                self._append(data)
            else:  # line by line, rotating where the next line would not fit
                for i, line in enumerate(lines):
                    record = prefix + line + b"\n"
                    if self._written and self._written + len(record) > self._max_bytes:
                        self._rotate()
                        # the new file's part of the batch carries its own first number
                        prefix = b"%.6f %d%s" % (at, seq + i, rest)
                        record = prefix + line + b"\n"
                    self._append(record)
        except OSError as error:  # a full or broken disk: keep the lines in memory only
            self._give_up(error)
            return
        if self._flush_handle is None:
            with contextlib.suppress(RuntimeError):  # no running loop: flushed on close
                self._flush_handle = asyncio.get_running_loop().call_later(
                    FLUSH_DELAY, self._timed_flush
                )

    def _append(self, data: bytes) -> None:
        if self._file is None:
            assert self.folder is not None
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._file = _open_private(self.folder / LOG_NAME)
            self._written = self._file.tell()
            if self._written and not _ends_with_newline(self.folder / LOG_NAME):
                data = b"\n" + data  # end the line a killed agent cut off
        self._file.write(data)
        self._written += len(data)

    def _rotate(self) -> None:
        """``output.log`` becomes ``output.log.1``, ``.1`` becomes ``.2``, ...; the
        oldest beyond ``files`` goes."""
        self._drop_file()
        self.rotations += 1
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
            except OSError as error:  # as in _write: said once, not at every flush
                self._give_up(error)

    def _give_up(self, error: OSError) -> None:
        """Keep lines in memory only (a full or broken disk); say so once the file is gone."""
        path, self.folder, self._complete = self.path, None, False
        self._drop_file()  # first: the warning goes to the agent's own log, maybe this one
        log.warning("cannot write the output log %s (%s): lines kept in memory only", path, error)

    async def remove(self) -> None:
        """Close the log and delete its files (the process is being deleted)."""
        self.close()
        self._ring.clear()
        self._ring_lines = 0
        if self._home is not None:
            await asyncio.to_thread(shutil.rmtree, self._home, True)

    # -- following (see output.follow) ----------------------------------------------------

    def mark(self) -> tuple[int, int] | None:
        """Where the next line will start in the files: its file's generation (see
        :attr:`rotations`) and offset; ``None`` without files."""
        return None if self.folder is None else (self.rotations, self._written)

    def open_files(self, generation: int | None = None) -> list[tuple[BinaryIO, int]]:
        """Each log file, open to read, newest first, with its generation; or only the
        file of ``generation``, if it is still kept."""
        if self.folder is None:
            return []
        opened = []
        for index, path in enumerate(self._paths()):
            if generation is not None and index != self.rotations - generation:
                continue
            for file, _ in open_all([path]):
                opened.append((file, self.rotations - index))
        return opened

    def ring_from(self, seq: int, limit: int) -> list[Batch]:
        """The batches of the ring buffer from the line numbered ``seq`` on (or from its
        first line, if it begins after it), about ``limit`` bytes of lines (at least one
        batch); ``[]`` if the ring holds nothing from ``seq`` on."""
        found: list[Batch] = []
        size = 0
        for first, at, stream, lines, run in self._ring:
            end = first + len(lines)
            if end <= seq:
                continue
            if first < seq:
                lines, first = lines[seq - first:], seq
            found.append((first, at, stream, lines, run))
            size += sum(map(len, lines))
            if size >= limit:
                break
        return found

    # -- reading -----------------------------------------------------------------------------

    async def read(self, tail: int, since: float | None = None) -> list[LogLine]:
        """The last ``tail`` lines, of those read at or after ``since`` if given, oldest
        first: from the ring buffer when it holds them all, else from the files."""
        return (await self.window(tail, since))[0]

    async def window(
        self, tail: int, since: float | None = None, after: int | None = None,
        before: int | None = None,
    ) -> tuple[list[LogLine], int]:
        """The last ``tail`` lines of those read at or after ``since``, numbered above
        ``after`` and below ``before`` (each if given), oldest first: from the ring
        buffer when it holds them all, else from the files.

        Returns:
            The lines, and (with ``after``) how many more lines matched, older than
            those returned (``0`` without ``after``: not counted).

        When the ring buffer holds them all, nothing is awaited: the answer is the log
        as it is when the call is made.
        """
        if tail <= 0:
            return [], 0
        ring = self._ring
        matching = [
            raw for raw in self._memory()
            if (since is None or raw[1] >= since) and (after is None or raw[0] > after)
            and (before is None or raw[0] < before)
        ]
        covered = (
            (after is None and len(matching) >= tail)
            or self._complete
            or self.folder is None
            or (since is not None and bool(ring) and ring[0][1] < since)
            or (after is not None and bool(ring) and ring[0][0] <= after)
        )
        if covered:
            raws = matching[-tail:]
            more = len(matching) - len(raws) if after is not None else 0
        else:
            self.flush()
            opened = open_all(self._paths())  # now: a rotation must not move them
            raws, more = await asyncio.to_thread(
                read_files, opened, tail, since, after, before
            )
        return [
            LogLine(at, stream, line.decode(errors="replace"), seq, run[0], run[1])
            for seq, at, stream, line, run in raws
        ], more


#: Longest line kept of one record of the agent's own log.
AGENT_LOG_MAX_LINE = 64 * 1024


class LogHandler(logging.Handler):
    """Keeps the records of :mod:`logging` in a :class:`ProcessLog`, as ``stderr`` lines
    (one per line of the formatted record, a traceback included): the agent's own log,
    readable like a process's output.

    Records come from any thread; those from another thread than the event loop's are
    handed to the loop. A record logged while one is being kept (say, about the disk the
    log is on) is not kept, rather than looping.

    Args:
        target: the log to keep records in.
        loop: the event loop the log belongs to (default: the running one).
        formatter: how a record becomes lines: the agent's ``--log-format``, so that the
            ``agent-log`` link serves the records it writes (default: ``text``).
    """

    def __init__(
        self, target: ProcessLog, loop: asyncio.AbstractEventLoop | None = None,
        formatter: logging.Formatter | None = None,
    ) -> None:
        super().__init__()
        self.setFormatter(formatter or logrecords.formatter("text", agent_log=True))
        # whoever reads the agent-log link must not learn a key from a logged URL
        self.addFilter(RedactKeys())
        self.target = target
        self._loop = loop or asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._busy = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:
            self.handleError(record)
            return
        lines = [
            line.encode(errors="replace")[:AGENT_LOG_MAX_LINE] for line in text.splitlines()
        ] or [b""]
        if threading.get_ident() == self._thread:
            self._keep(lines)
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closed: stderr has it
                self._loop.call_soon_threadsafe(self._keep, lines)

    def _keep(self, lines: list[bytes]) -> None:
        if self._busy:
            return
        self._busy = True
        try:
            self.target.append("stderr", lines)
        finally:
            self._busy = False


def _open_private(path: Path) -> BinaryIO:
    """Open ``path`` to append, for the agent's user only (0600, whatever the umask, and
    so made if an older agent left it 0644): it holds what a process printed, or what the
    agent logged, secrets included."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o077:
            with contextlib.suppress(PermissionError):  # not ours: left as it is
                os.fchmod(fd, 0o600)
        return open(fd, "ab", buffering=WRITE_BUFFER)  # closed by _drop_file
    except BaseException:
        os.close(fd)
        raise


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as file:
        file.seek(-1, os.SEEK_END)
        return file.read(1) == b"\n"
