"""The usage monitor on real process trees: CPU, memory, exits, untracking, failures."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from pathlib import Path

import psutil
import pytest

from smartmob_agent.processes.monitor import Monitor, Usage, sample_trees
from tests.helpers import PYTHON, eventually

MB = 1_000_000

#: Prints its pid, then keeps one core busy.
BURN = """
import os
print(os.getpid(), flush=True)
while True:
    pass
"""

#: Fills 64 MiB (every page written), says so with its pid, then sleeps.
ALLOCATE = """
import os, time
data = b"x" * (64 << 20)
print(os.getpid(), flush=True)
time.sleep(60)
"""

#: About 50 ms of CPU, then exit: run in a loop, it makes short-lived busy children.
SHORT_WORK = "for _ in range(2 * 10**6): pass"


class Tree:
    """A command run by ``/bin/sh -c`` in its own session, its root the shell."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.pid = process.pid

    async def line(self) -> bytes:
        """The next line of its stdout (5 s at most)."""
        assert self.process.stdout is not None
        async with asyncio.timeout(5):
            return (await self.process.stdout.readline()).strip()


Spawn = Callable[[str], Awaitable[Tree]]


@pytest.fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Spawn]:
    """Start process trees; SIGKILL and reap every one of them after the test."""
    trees: list[Tree] = []

    async def start(command: str) -> Tree:
        process = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", command, cwd=tmp_path, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, start_new_session=True,
        )
        tree = Tree(process)
        trees.append(tree)
        return tree

    try:
        yield start
    finally:
        for tree in trees:
            # the group holds the whole tree: none of these commands calls setsid
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(tree.pid, signal.SIGKILL)
            async with asyncio.timeout(5):
                await tree.process.wait()


def script(tmp_path: Path, name: str, text: str) -> str:
    """Write a Python script into ``tmp_path``; return the command that runs it."""
    (tmp_path / name).write_text(text)
    return f"{PYTHON} -u {name}"


def cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and of the children it reaped, as psutil reads them."""
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system + times.children_user + times.children_system


async def cpu_grows(pid: int, seconds: float) -> None:
    """Wait (10 s at most) until ``pid`` has used ``seconds`` more of CPU than now."""
    start = cpu_seconds(pid)
    await eventually(lambda: cpu_seconds(pid) >= start + seconds, timeout=10.0,
                     what=f"{seconds} s of CPU by {pid}")


class CpuClock:
    """The CPU use of one process as psutil sees it, read at each monitor refresh: the
    rate the monitor should report, measured independently of it (on a loaded machine a
    busy process gets less than a core, so a fixed bound would be a guess)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.readings: list[tuple[float, float]] = []

    def read(self) -> None:
        """Take a reading; call it right after each :meth:`Monitor.refresh`."""
        self.readings.append((asyncio.get_running_loop().time(), cpu_seconds(self.pid)))

    def percent(self) -> float:
        """CPU percent between the last two readings."""
        (then, used_then), (now, used_now) = self.readings[-2:]
        return 100 * (used_now - used_then) / (now - then)


def current(monitor: Monitor, pid: int) -> Usage:
    """The monitor's figures of ``pid``, which must have some."""
    usage = monitor.usage(pid)
    assert usage is not None, f"no usage for {pid}"
    return usage


def percent(monitor: Monitor, pid: int) -> float:
    """The monitor's ``cpu_percent`` of ``pid``, which must have one."""
    value = current(monitor, pid).cpu_percent
    assert value is not None, f"no cpu_percent for {pid}"
    return value


async def test_a_busy_grandchild_shows_in_cpu_percent_and_an_idle_tree_does_not(
    spawn: Spawn, tmp_path: Path
) -> None:
    """A tree whose grandchild keeps a core busy shows the grandchild's CPU (as psutil
    measures it over the same interval), an idle one under 10 %."""
    busy = await spawn(f"{script(tmp_path, 'burn.py', BURN)} & wait")
    burner = int(await busy.line())
    clock = CpuClock(burner)
    idle = await spawn("sleep 1000")
    monitor = Monitor()
    monitor.track(busy.pid)
    monitor.track(idle.pid)

    await monitor.refresh()
    clock.read()
    assert current(monitor, busy.pid).cpu_percent is None  # a rate needs two samples
    await cpu_grows(burner, 0.5)
    await monitor.refresh()
    clock.read()

    assert clock.percent() > 20  # it did burn: the test means something
    assert percent(monitor, busy.pid) > 0.7 * clock.percent()
    assert percent(monitor, idle.pid) < 10


async def test_cpu_of_short_lived_children_counts(spawn: Spawn) -> None:
    """A shell running one brief busy command after another shows their CPU."""
    tree = await spawn(f"while :; do {PYTHON} -c '{SHORT_WORK}'; done")
    clock = CpuClock(tree.pid)  # the shell's own CPU and what it reaped
    monitor = Monitor()
    monitor.track(tree.pid)

    await monitor.refresh()
    clock.read()
    await cpu_grows(tree.pid, 0.5)  # what the shell reaped, the children's CPU
    await monitor.refresh()
    clock.read()

    assert clock.percent() > 20
    assert percent(monitor, tree.pid) > 0.7 * clock.percent()


async def test_memory_of_a_grandchild_counts_for_the_root(spawn: Spawn, tmp_path: Path) -> None:
    """The 64 MiB a grandchild filled appear in the memory of the root of its tree."""
    # the inner shell runs one more command after Python, so it cannot exec it: Python
    # is the grandchild of the root
    command = script(tmp_path, "allocate.py", ALLOCATE)
    tree = await spawn(f"/bin/sh -c '{command}; true' & wait")
    grandchild = int(await tree.line())
    assert psutil.Process(psutil.Process(grandchild).ppid()).ppid() == tree.pid
    monitor = Monitor()
    monitor.track(tree.pid)

    await monitor.refresh()

    usage = current(monitor, tree.pid)
    assert usage.memory_rss >= 64 << 20
    assert psutil.Process(tree.pid).memory_info().rss < 16 * MB  # the root alone is small


async def test_memory_matches_what_ps_reports(spawn: Spawn) -> None:
    """The memory of a lone process is its VmRSS, the figure psutil and ps read."""
    tree = await spawn("exec sleep 1000")
    await eventually(lambda: psutil.Process(tree.pid).name() == "sleep", timeout=5.0,
                     what="the exec of sleep")

    def sampled_as_ps_reads() -> bool:
        # right after the exec, sleep's pages are still coming in (its RSS grows until
        # it sleeps): compare only a reading taken between two equal ones of psutil
        before = psutil.Process(tree.pid).memory_info().rss
        found = sample_trees([tree.pid])[tree.pid][1]
        if psutil.Process(tree.pid).memory_info().rss != before:
            return False
        assert found == before
        return True

    await eventually(sampled_as_ps_reads, timeout=5.0, what="a steady RSS of sleep")


def fake_process(proc: Path, pid: int, ppid: int, ticks: tuple[int, int, int, int],
                 pages: int, *, comm: str = "app", state: str = "S",
                 statm: bool = True) -> None:
    """Write ``stat`` (and ``statm``, resident pages plus one) of ``pid`` under ``proc``."""
    utime, stime, cutime, cstime = ticks
    fields = [state, ppid, pid, pid, 0, -1, 0, 0, 0, 0, 0, utime, stime, cutime, cstime,
              20, 0, 1, 0, 100, 1 << 20, pages, 0]
    (proc / str(pid)).mkdir()
    (proc / str(pid) / "stat").write_text(f"{pid} ({comm}) {' '.join(map(str, fields))}\n")
    if statm:
        (proc / str(pid) / "statm").write_text(f"{4 * pages} {pages + 1} 0 0 0 0 0\n")


def test_sample_trees_reads_a_table_with_odd_and_vanished_entries(tmp_path: Path) -> None:
    """Odd command names parse, gone or torn entries and zombies are skipped, loops end."""
    tick, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "self").mkdir()  # not a pid
    fake_process(proc, 10, 1, (100, 50, 30, 20), 1000, comm="sh -c x) (y")
    fake_process(proc, 11, 10, (10, 0, 0, 0), 500)
    fake_process(proc, 12, 11, (0, 10, 0, 0), 200, statm=False)  # gone before statm
    (proc / "13").mkdir()  # gone before its stat was read
    fake_process(proc, 14, 11, (999, 0, 0, 0), 999, state="Z")  # a zombie member
    (proc / "15").mkdir()
    (proc / "15" / "stat").write_text("15 (torn")
    fake_process(proc, 20, 21, (tick, 0, 0, 0), 1)  # 20 and 21: a loop of parents
    fake_process(proc, 21, 20, (tick, 0, 0, 0), 1)
    fake_process(proc, 30, 1, (0, 0, 0, 0), 0, state="Z")  # a zombie root

    found = sample_trees([10, 11, 20, 30, 13, 99], proc=str(proc))

    assert found == {
        10: ((100 + 50 + 30 + 20 + 10 + 10) / tick, (1001 + 501 + 200) * page),
        11: (20 / tick, (501 + 200) * page),
        20: (2.0, 4 * page),
    }
    quick = sample_trees([10], proc=str(proc), exact_rss=False)  # the resident size of stat
    assert quick == {10: (found[10][0], (1000 + 500 + 200) * page)}


async def test_a_root_that_exits_disappears_at_the_next_sample(spawn: Spawn) -> None:
    """Once its root has exited and been reaped, a tree has no usage any more."""
    tree = await spawn("sleep 1000")
    monitor = Monitor()
    monitor.track(tree.pid)
    await monitor.refresh()
    assert monitor.usage(tree.pid) is not None

    os.killpg(tree.pid, signal.SIGKILL)
    async with asyncio.timeout(5):
        await tree.process.wait()
    await monitor.refresh()

    assert monitor.usage(tree.pid) is None
    assert sample_trees([tree.pid]) == {}


async def test_untrack_forgets_at_once_and_for_good(spawn: Spawn) -> None:
    """An untracked pid has no usage, and later samples do not measure it again."""
    tree = await spawn("sleep 1000")
    other = await spawn("sleep 1000")
    monitor = Monitor()
    monitor.track(tree.pid)
    monitor.track(other.pid)
    await monitor.refresh()

    monitor.untrack(tree.pid)
    assert monitor.usage(tree.pid) is None
    await monitor.refresh()

    assert monitor.usage(tree.pid) is None
    assert monitor.usage(other.pid) is not None


async def test_a_sample_in_flight_is_not_credited_to_an_untracked_pid() -> None:
    """Figures a sample brings back for a pid untracked while it ran are dropped."""
    started, release = threading.Event(), threading.Event()

    def slow_sample(roots: Collection[int]) -> dict[int, tuple[float, int]]:
        started.set()
        release.wait(5)
        return dict.fromkeys(roots, (1.0, 1000))

    monitor = Monitor(sample=slow_sample)
    monitor.track(4242)
    refresh = asyncio.create_task(monitor.refresh())
    await asyncio.to_thread(started.wait, 5)

    monitor.untrack(4242)
    monitor.track(4242)  # the pid, reused by a new child
    release.set()
    await refresh

    assert monitor.usage(4242) is None  # that sample measured the old process


async def test_cpu_percent_is_cpu_over_wall_time_and_never_negative() -> None:
    """cpu_percent divides the CPU seconds gained by the seconds between two samples;
    cpu_seconds is the tree's CPU time as sampled."""
    figures = {7: (10.0, 5000)}
    now = [100.0]
    monitor = Monitor(clock=lambda: now[0], sample=lambda roots: dict(figures))
    monitor.track(7)
    await monitor.refresh()

    figures[7], now[0] = (13.0, 6000), 102.0
    await monitor.refresh()
    assert monitor.usage(7) == Usage(cpu_percent=150.0, memory_rss=6000, sampled_at=102.0,
                                     cpu_seconds=13.0)

    figures[7], now[0] = (12.0, 6000), 104.0  # a member left the tree with its CPU time
    await monitor.refresh()
    assert percent(monitor, 7) == 0.0


async def test_run_goes_on_after_a_failed_sample(
    spawn: Spawn, caplog: pytest.LogCaptureFixture
) -> None:
    """A sample that raises is logged, and the next ones still run and update usage."""
    calls = [0]

    def failing_once(roots: Collection[int]) -> dict[int, tuple[float, int]]:
        calls[0] += 1
        if calls[0] == 1:
            raise OSError("the process table is unreadable")
        return sample_trees(roots)

    tree = await spawn("sleep 1000")
    monitor = Monitor(interval=0.01, sample=failing_once)
    monitor.track(tree.pid)
    monitor.start()
    try:
        await eventually(lambda: monitor.usage(tree.pid) is not None, timeout=5.0,
                         what="a sample after the failure")
    finally:
        await monitor.close()

    assert calls[0] >= 2
    [record] = [r for r in caplog.records
                if r.name == "smartmob_agent.monitor" and r.levelno >= logging.WARNING]
    assert "sampling process usage failed" in record.getMessage()
    assert record.exc_info is not None


async def test_close_stops_the_sampling() -> None:
    """After close(), no task of the monitor is left and it samples no more."""
    calls = [0]

    def counting(roots: Collection[int]) -> dict[int, tuple[float, int]]:
        calls[0] += 1
        return {}

    monitor = Monitor(interval=0.01, sample=counting)
    monitor.track(1)
    monitor.start()
    monitor.look()  # someone reads the figures: it samples
    await eventually(lambda: calls[0] >= 2, timeout=5.0, what="two samples")

    await monitor.close()

    running = [task for task in asyncio.all_tasks()
               if getattr(task.get_coro(), "__qualname__", None) == "Monitor.run"]
    assert running == []


async def test_it_samples_only_while_someone_looks() -> None:
    """Nobody reads the figures: no sample. A read starts the sampling, which goes on
    every interval until nobody has read them for ``linger`` seconds, then stops."""
    calls = [0]

    def counting(roots: Collection[int]) -> dict[int, tuple[float, int]]:
        calls[0] += 1
        return {root: (0.0, 4096) for root in roots}

    monitor = Monitor(interval=0.01, sample=counting, linger=0.1)
    monitor.track(1)
    monitor.start()
    try:
        # long enough for ten samples of a monitor that sampled regardless
        await asyncio.sleep(0.1)
        assert calls[0] == 0
        assert monitor.usage(1) is None  # a read: sampling starts
        await eventually(lambda: calls[0] >= 3, timeout=5.0, what="samples once read")
        await eventually(lambda: not monitor._wanted.is_set(), timeout=5.0,
                         what="the monitor to stop once nobody reads")
        stopped = calls[0]
        await asyncio.sleep(0.1)  # ten intervals: none sampled
        assert calls[0] == stopped
        assert current(monitor, 1).memory_rss == 4096  # (kept, as of the last sample)
    finally:
        await monitor.close()


async def test_fresh_samples_now_after_a_quiet_time(spawn: Spawn) -> None:
    """After nobody looked for a while, ``fresh()`` takes a sample before the read (once,
    however many readers wait); right after one, it takes none."""
    calls = [0]

    def counting(roots: Collection[int]) -> dict[int, tuple[float, int]]:
        calls[0] += 1
        return sample_trees(roots)

    tree = await spawn("sleep 1000")
    monitor = Monitor(interval=60.0, sample=counting)
    monitor.track(tree.pid)
    await asyncio.gather(*(monitor.fresh() for _ in range(5)))
    assert calls[0] == 1
    assert current(monitor, tree.pid).memory_rss > 0
    await monitor.fresh()
    assert calls[0] == 1


async def test_walking_the_trees_finds_what_reading_the_table_finds(spawn: Spawn) -> None:
    """The kernel's lists of children lead to the same members as the whole table: a
    shell, its background children and a grandchild in a session of its own."""
    tree = await spawn("sleep 1000 & setsid sh -c 'sleep 1000 & wait' & sleep 1000 & wait")
    root = psutil.Process(tree.pid)
    await eventually(lambda: len(root.children(recursive=True)) == 4, what="the tree")
    members = root.children(recursive=True)
    try:
        walked = sample_trees([tree.pid], walk=True)
        read = sample_trees([tree.pid], walk=False)
    finally:  # the session of its own is out of the reach of the fixture's group kill
        for member in members:
            member.kill()
    assert walked == read  # idle sleeps: the same CPU ticks and resident pages
    assert walked[tree.pid][1] > 4 * 100_000
