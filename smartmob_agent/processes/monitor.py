"""CPU and memory of whole process trees, sampled in the background (like PM2's monitor).

The status document of a process shows ``cpu_percent`` and ``memory_rss`` of its current
child *and all its descendants*: a shell running a server, or a master and its workers,
is one process to the user. Computing that on each request would cost a scan of the
process table per request, so a :class:`Monitor` samples every tracked tree every
``interval`` seconds in a worker thread, and the API reads the cached :class:`Usage`
(a dict lookup). It samples only while someone looks at the figures (reads them, see
:meth:`Monitor.usage`), and for :data:`LINGER` seconds after: an agent nobody asks
anything costs no CPU for its idle children.

One sample walks each tracked tree from its root through the kernel's lists of
children (``/proc/[pid]/task/[tid]/children``), reading ``/proc/[pid]/stat`` (CPU times)
and ``/proc/[pid]/statm`` (resident set) of each member: its cost grows with the agent's
trees, not with the machine's processes (~22 ms of CPU for 500 trees of 2 processes on a
machine running 3800). Where the kernel has no such lists, it is one pass over
``/proc/[pid]/stat`` of every process of the machine instead (~50 ms there), the data
``psutil.process_iter(["ppid", "cpu_times", "memory_info"])`` gathers too, at a quarter
of its cost (see ``benchmarks/monitor_500.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

log = logging.getLogger("smartmob_agent.monitor")  # stable name: internals.rst

#: Takes the root pids to measure; returns ``{root: (cpu_seconds, rss_bytes)}``.
Sampler = Callable[[Collection[int]], dict[int, tuple[float, int]]]

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
# fields of /proc/[pid]/stat after the ")" that ends the command name (proc(5) numbers
# them from 1 with the pid; the state, field 3, is index 0 here)
_STATE, _PPID, _UTIME, _STIME, _CUTIME, _CSTIME, _THREADS, _RSS = 0, 1, 11, 12, 13, 14, 17, 21
_DEAD = (b"Z", b"X")
#: Seconds (at least; 2.5 intervals if longer) the monitor goes on sampling after the
#: figures were last read.
LINGER = 10.0
#: Longest wait of :meth:`Monitor.fresh` for a sample.
FRESH_TIMEOUT = 1.0


@dataclass(frozen=True)
class Usage:
    """What a process tree used, as of one sample.

    Attributes:
        cpu_percent: CPU time of the tree over wall time between this sample and the
            previous one of the same root, in percent of one core (a tree busy on two
            cores shows 200). ``None`` on the first sample of a root: a rate needs two
            samples, and 0 would claim that a busy process is idle.
        memory_rss: resident set size of the tree in bytes: the sum of its processes',
            so pages they share (after a fork, shared libraries) count once per process.
        sampled_at: when the sample was taken, on the monitor's clock (monotonic).
        cpu_seconds: CPU time the tree has used (user + system, reaped children
            included), as of the sample: what the Prometheus metrics count.
    """

    cpu_percent: float | None
    memory_rss: int
    sampled_at: float
    cpu_seconds: float = 0.0


def sample_trees(
    roots: Collection[int], proc: str = "/proc", *, exact_rss: bool = True,
    walk: bool | None = None,
) -> dict[int, tuple[float, int]]:
    """CPU seconds and resident bytes of the process tree of each pid of ``roots``.

    Walks each tree from its root through the kernel's lists of children
    (``/proc/<pid>/task/<tid>/children``), so a sample costs a few reads per member of
    the trees, however many processes the machine runs; where the kernel has no such
    lists, reads the whole process table once instead. The tree of a root is
    the root and all its descendants. Its CPU seconds are user + system time of each of
    them *including the reaped children they waited for* (``cutime``/``cstime``):
    otherwise the work of short-lived commands (a shell script running one tool after
    another) would vanish with each exit and the tree would look idle; this way the
    figure only grows while the tree keeps its members. Its resident bytes are the sum
    of its members' ``VmRSS``, the figure ``ps`` and ``top`` show (see ``exact_rss``).

    A root that is gone (or a zombie) is absent from the result. Processes may exit or
    appear during the scan: those that vanished are left out, those that appeared after
    the table was listed are seen by the next sample.

    Args:
        roots: the pids whose trees to measure.
        proc: where the process table is mounted.
        exact_rss: read each member's ``statm`` for its resident size. ``False`` takes
            the one in ``stat`` instead (what PM2 shows), which saves a read per member,
            about 40 % of the cost of a sample, but is the kernel's quick read of
            per-CPU counters: small processes look up to ~150 KB smaller on 2 CPUs, and
            the gap grows with the number of CPUs.
        walk: walk the trees (``True``) or read the whole table (``False``); by
            default, walk where the kernel lists children.
    """
    if not roots:
        return {}
    result: dict[int, tuple[float, int]] = {}
    if _children_files(proc) if walk is None else walk:  # the trees only, not the table
        for root in roots:
            usage = _walk_usage(root, proc, exact_rss)
            if usage is not None:
                result[root] = usage
        return result
    own, children = _scan(proc)
    for root in roots:
        if root in own:
            result[root] = _tree_usage(root, own, children, proc, exact_rss)
    return result


#: Each live process's own figures: pid -> (CPU ticks, resident pages from ``stat``).
_Own = dict[int, tuple[int, int]]
#: The pids of each parent's children.
_Children = dict[int, list[int]]


def _scan(proc: str) -> tuple[_Own, _Children]:
    """One pass over the ``stat`` of every process of the machine (zombies left out)."""
    children: _Children = {}
    own: _Own = {}
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        data = _read(f"{proc}/{name}/stat")
        try:
            # the command name may hold spaces and parentheses: split after the last ")"
            fields = data[data.rindex(b")") + 2:].split(None, _RSS + 1)
            if fields[_STATE] in _DEAD:
                continue
            pid = int(name)
            ticks = (int(fields[_UTIME]) + int(fields[_STIME]) + int(fields[_CUTIME])
                     + int(fields[_CSTIME]))
            own[pid] = (ticks, int(fields[_RSS]))
            children.setdefault(int(fields[_PPID]), []).append(pid)
        except (ValueError, IndexError):  # gone meanwhile (nothing read), or torn
            continue
    return own, children


def _tree_usage(
    root: int, own: _Own, children: _Children, proc: str, exact_rss: bool
) -> tuple[float, int]:
    """CPU seconds and resident bytes of the tree of ``root``, a pid of ``own``."""
    ticks = pages = 0
    pending = [root]
    # a pid reused during the scan could in theory close a loop of parents
    seen = {root}
    while pending:
        pid = pending.pop()
        pid_ticks, pid_pages = own[pid]
        ticks += pid_ticks
        # statm sums the per-CPU counters (as ps does); a second read, but only for
        # members of the trees. If it is gone meanwhile, what stat said will do.
        statm = _read(f"{proc}/{pid}/statm").split(None, 2) if exact_rss else []
        pages += int(statm[1]) if len(statm) > 1 else pid_pages
        for child in children.get(pid, ()):
            if child not in seen:
                seen.add(child)
                pending.append(child)
    return ticks / _TICKS, pages * _PAGE


_has_children_files: dict[str, bool] = {}


def _children_files(proc: str) -> bool:
    """Whether the kernel lists each thread's children (``CONFIG_PROC_CHILDREN``)."""
    found = _has_children_files.get(proc)
    if found is None:
        me = os.getpid()
        found = _has_children_files[proc] = os.path.exists(f"{proc}/{me}/task/{me}/children")
    return found


def _walk_usage(root: int, proc: str, exact_rss: bool) -> tuple[float, int] | None:
    """CPU seconds and resident bytes of the tree of ``root``, walked through the
    kernel's lists of children; ``None`` if the root is gone (or a zombie). A member
    created or gone during the walk may be missed: the next sample sees it."""
    ticks = pages = 0
    pending = [root]
    seen = {root}  # a pid reused during the walk could in theory close a loop
    while pending:
        pid = pending.pop()
        data = _read(f"{proc}/{pid}/stat")
        try:
            fields = data[data.rindex(b")") + 2:].split(None, _RSS + 1)
            if fields[_STATE] in _DEAD:
                raise ValueError("dead")
            ticks += (int(fields[_UTIME]) + int(fields[_STIME]) + int(fields[_CUTIME])
                      + int(fields[_CSTIME]))
            threads, stat_pages = int(fields[_THREADS]), int(fields[_RSS])
        except (ValueError, IndexError):  # gone, torn, or dead: not a member
            if pid == root:
                return None
            continue
        statm = _read(f"{proc}/{pid}/statm").split(None, 2) if exact_rss else []
        pages += int(statm[1]) if len(statm) > 1 else stat_pages
        tids = [str(pid)] if threads == 1 else _list(f"{proc}/{pid}/task")
        for tid in tids:
            for child in _read(f"{proc}/{pid}/task/{tid}/children").split():
                if int(child) not in seen:
                    seen.add(int(child))
                    pending.append(int(child))
    return ticks / _TICKS, pages * _PAGE


def _list(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _read(path: str) -> bytes:
    """The content of a small file of ``/proc``; empty if it cannot be read (gone)."""
    try:
        # os.open/read rather than open(): no buffered file object, a third cheaper
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return b""
    try:
        return os.read(fd, 4096)
    except OSError:  # ESRCH: the process exited between open and read
        return b""
    finally:
        os.close(fd)


class Monitor:
    """Keeps the :class:`Usage` of tracked process trees fresh, off the event loop, while
    someone looks at them.

    The owner calls :meth:`track` when a child is spawned and :meth:`untrack` when it
    has exited, reads :meth:`usage` whenever it likes (or awaits :meth:`fresh` first, to
    have current figures), and either calls :meth:`start` then ``await`` :meth:`close`,
    or runs :meth:`run` in a task of its own and cancels it.

    Sampling costs CPU in proportion to the trees, however idle they are, so the
    monitor samples only while the figures are read: from a read (:meth:`look`) on,
    every ``interval`` seconds, until nobody has read them for ``linger`` seconds; then
    it waits, at no cost, for the next read.

    Args:
        interval: seconds between the end of a sample and the start of the next.
        clock: monotonic seconds; ``cpu_percent`` divides by its differences.
        sample: the function that measures the trees (a seam for the tests).
        linger: how long sampling goes on after the last read (default :data:`LINGER`,
            or 2.5 intervals if that is longer: a rate needs two samples).
    """

    def __init__(
        self,
        interval: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        sample: Sampler = sample_trees,
        linger: float | None = None,
    ) -> None:
        self.interval = interval
        self.linger = max(LINGER, 2.5 * interval) if linger is None else linger
        self._clock = clock
        self._sample = sample
        # pid -> a token new at each track(): a sample taken before an untrack() and a
        # track() of the same (reused) pid must not be credited to the new process
        self._tracked: dict[int, object] = {}
        self._usage: dict[int, Usage] = {}
        self._previous: dict[int, tuple[float, float]] = {}  # pid -> (CPU s, when)
        self._lock = asyncio.Lock()  # one sample at a time: run() and refresh() may meet
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self._looked_at = -math.inf  # when the figures were last read (clock)
        self._sampled_at = -math.inf  # when the last sample was taken (clock)
        self._wanted = asyncio.Event()  # set while someone looks: run() samples

    def track(self, pid: int) -> None:
        """Measure the tree of ``pid`` from the next sample on."""
        self._tracked[pid] = object()
        self._usage.pop(pid, None)
        self._previous.pop(pid, None)

    def untrack(self, pid: int) -> None:
        """Stop measuring ``pid`` and forget its figures (at once)."""
        self._tracked.pop(pid, None)
        self._usage.pop(pid, None)
        self._previous.pop(pid, None)

    def usage(self, pid: int) -> Usage | None:
        """The latest figures of the tree of ``pid``; ``None`` if not sampled (yet).
        A read: sampling goes on (or starts again) for ``linger`` seconds."""
        self.look()
        return self._usage.get(pid)

    def look(self) -> None:
        """Someone reads the figures: sample while they do (see the class)."""
        self._looked_at = self._clock()
        self._wanted.set()

    async def fresh(self) -> None:
        """Someone is about to read the figures: if no sample was taken for an
        ``interval`` (nobody looked for a while), take one now, waiting for it at most
        :data:`FRESH_TIMEOUT`. ``cpu_percent`` then covers the time since the sample
        before, however long ago."""
        self.look()
        if self._clock() - self._sampled_at <= self.interval:
            return
        with contextlib.suppress(Exception):  # the figures stay; run() logs a failure
            async with asyncio.timeout(FRESH_TIMEOUT), self._lock:
                if self._clock() - self._sampled_at > self.interval:  # not done meanwhile
                    await self._refresh()

    async def refresh(self) -> None:
        """Sample every tracked tree now and update the figures.

        Raises whatever the sample function raised; the figures are then unchanged.
        """
        async with self._lock:
            await self._refresh()

    async def _refresh(self) -> None:
        tracked = dict(self._tracked)
        if not tracked:
            return
        # the scan is blocking file I/O and ~25 ms of CPU for 1000 processes: a thread
        samples, now = await asyncio.to_thread(self._measure, tracked.keys())
        self._sampled_at = now
        for pid, token in tracked.items():
            if self._tracked.get(pid) is not token:
                continue  # untracked (maybe tracked again) while the sample ran
            sample = samples.get(pid)
            if sample is None:  # the root is gone: it has no usage any more
                self._usage.pop(pid, None)
                self._previous.pop(pid, None)
                continue
            cpu, rss = sample
            percent = None
            previous = self._previous.get(pid)
            if previous is not None and now > previous[1]:
                # a member that left the tree (adopted by a subreaper) takes its CPU
                # time away with it: never report a negative rate
                percent = max(0.0, cpu - previous[0]) / (now - previous[1]) * 100
            self._previous[pid] = (cpu, now)
            self._usage[pid] = Usage(percent, rss, now, cpu)

    def _measure(self, roots: Collection[int]) -> tuple[dict[int, tuple[float, int]], float]:
        """Sample, and read the clock at once (in the thread: the event loop, busy,
        could take a while to resume the caller, and the rate would be off by that)."""
        samples = self._sample(roots)
        return samples, self._clock()

    async def run(self) -> None:
        """Refresh every ``interval`` seconds while someone looks at the figures, until
        cancelled; a failed sample is logged and the next one tried as usual."""
        while True:
            await self._wanted.wait()
            if self._clock() - self._sampled_at >= self.interval / 2:  # not just fresh()
                await self._logged_refresh()
            await asyncio.sleep(self.interval)
            if self._clock() - self._looked_at > self.linger:
                self._wanted.clear()  # nobody looks: wait for someone to, at no cost

    async def _logged_refresh(self) -> None:
        try:
            await self.refresh()
        except Exception:
            # a failure that repeats at every sample would flood the log: its
            # traceback once, then one line per failure at debug level
            if self._failing:
                log.debug("sampling process usage failed again", exc_info=True)
            else:
                log.exception("sampling process usage failed; will retry")
                self._failing = True
        else:
            if self._failing:
                log.info("sampling process usage works again")
                self._failing = False

    def start(self) -> None:
        """Run :meth:`run` in a task of the running loop, until :meth:`close`."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run())

    async def close(self) -> None:
        """Stop the task :meth:`start` created, and wait for it to end."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # gather, not suppress(CancelledError): a cancellation of close() itself
            # must still propagate
            await asyncio.gather(task, return_exceptions=True)
