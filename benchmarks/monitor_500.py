"""The cost of sampling CPU and memory of 500 process trees (``smartmob_agent.processes.monitor``).

Spawns 500 trees shaped like the agent's children (``/bin/sh -c 'sleep 1000; true'``, in
their own session: the shell stays, so 1000 processes; ``--bare`` runs ``sleep 1000``
alone, 500 processes), in batches of 50, then measures one sample of all 500 trees:

* ``sample_trees``: what the monitor runs, each tree walked from its root through the
  kernel's lists of children (``/proc/[pid]/task/[tid]/children``), ``stat`` and
  ``statm`` (exact RSS) of each member; with ``exact_rss=False`` (the RSS of ``stat``,
  no second read); and with ``walk=False``: one pass over ``/proc/[pid]/stat`` of the
  whole machine (what kernels without those lists get), then ``statm`` of each member;
* psutil one pass: the same algorithm on ``psutil.process_iter(["ppid", "cpu_times",
  "memory_info"])``, to show what reading ``/proc`` directly saves;
* naive: per root, ``psutil.Process(pid).children(recursive=True)`` plus ``cpu_times()``
  and ``memory_info()`` of each member (each ``children()`` call scans the whole table);
  fewer samples, bounded in time;
* ``Monitor.refresh()`` with the 500 roots tracked, on an event loop, and how late a
  1 ms ticker on that loop runs meanwhile (the thread holds the GIL while it parses);
* ``Monitor.usage()`` of the 500 roots, which is what ``GET /list-processes`` pays.

Wall time (``perf_counter``) and CPU time (``process_time``: this process, one busy
thread) per sample: median and p95 over ``--samples`` (default 20). Every child is killed
at the end, even on error or Ctrl-C, and checked to be gone. No network.

Target (from the issue): one sample of 500 trees costs a few tens of ms of CPU at most
(at the default 2 s interval, ~1 % of a core).

Run: ``python benchmarks/monitor_500.py [--count 500] [--samples 20] [--bare]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Collection

import benchlib as b
import psutil

sys.path.insert(0, str(b.agent_code_dir()))  # the snapshot, if the header names one

from smartmob_agent.processes.monitor import Monitor, sample_trees

TARGET_CPU = 0.050
BATCH = 50
#: Longest wait for the children to start, and then to be gone after SIGKILL.
SPAWN_TIMEOUT = 30.0
KILL_TIMEOUT = 10.0

Sample = Callable[[Collection[int]], dict[int, tuple[float, int]]]


def psutil_one_pass(roots: Collection[int]) -> dict[int, tuple[float, int]]:
    """``sample_trees`` written with ``psutil.process_iter``."""
    children: dict[int, list[int]] = {}
    own: dict[int, tuple[float, int]] = {}
    for process in psutil.process_iter(["ppid", "cpu_times", "memory_info"]):
        info = process.info
        times, memory = info["cpu_times"], info["memory_info"]
        if times is None or memory is None:  # vanished or denied
            continue
        own[process.pid] = (times.user + times.system + times.children_user
                            + times.children_system, memory.rss)
        children.setdefault(info["ppid"], []).append(process.pid)
    result: dict[int, tuple[float, int]] = {}
    for root in roots:
        if root not in own:
            continue
        cpu, rss, pending = 0.0, 0, [root]
        while pending:
            pid = pending.pop()
            pid_cpu, pid_rss = own.get(pid, (0.0, 0))
            cpu += pid_cpu
            rss += pid_rss
            pending.extend(children.get(pid, ()))
        result[root] = (cpu, rss)
    return result


def naive(roots: Collection[int]) -> dict[int, tuple[float, int]]:
    """Per root: its descendants by ``children(recursive=True)``, then each one's figures."""
    result: dict[int, tuple[float, int]] = {}
    for root in roots:
        try:
            process = psutil.Process(root)
            members = [process, *process.children(recursive=True)]
        except psutil.Error:
            continue
        cpu, rss = 0.0, 0
        for member in members:
            with contextlib.suppress(psutil.Error):
                times = member.cpu_times()
                cpu += times.user + times.system + times.children_user + times.children_system
                rss += member.memory_info().rss
        result[root] = (cpu, rss)
    return result


def spawn_all(count: int, bare: bool, popens: list[subprocess.Popen[bytes]]) -> None:
    """Start ``count`` trees in batches, appending to ``popens`` as they start (so the
    caller can kill them whatever happens); wait until every ``sleep`` runs."""
    argv = ["sleep", "1000"] if bare else ["/bin/sh", "-c", "sleep 1000; true"]
    expected = count if bare else 2 * count
    for start in range(0, count, BATCH):
        for _ in range(min(BATCH, count - start)):
            popens.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                           start_new_session=True))
        # wait for this batch's sleeps before the next: bounded fork pressure
        wait_members(popens, min(expected, (start + BATCH) * (expected // count)))


def tree_members(popens: list[subprocess.Popen[bytes]]) -> int:
    me = psutil.Process()
    return sum(1 for p in me.children(recursive=True) if safe_name(p) == "sleep") + (
        sum(1 for p in me.children() if safe_name(p) == "sh"))


def safe_name(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.Error:
        return ""


def wait_members(popens: list[subprocess.Popen[bytes]], expected: int) -> None:
    deadline = time.monotonic() + SPAWN_TIMEOUT
    while tree_members(popens) < expected:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{expected} processes did not start within {SPAWN_TIMEOUT} s")
        time.sleep(0.01)


def kill_all(popens: list[subprocess.Popen[bytes]]) -> None:
    """SIGKILL every tree (its session's process group), reap, check none is left."""
    members = psutil.Process().children(recursive=True)
    for popen in popens:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(popen.pid, signal.SIGKILL)
    for popen in popens:
        popen.wait(timeout=KILL_TIMEOUT)
    _, alive = psutil.wait_procs(members, timeout=KILL_TIMEOUT)
    left = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    print(f"   killed {len(popens)} trees ({len(members)} processes); "
          f"left over: {[p.pid for p in left] or 'none'}")
    for process in left:
        with contextlib.suppress(psutil.Error):
            process.kill()


def measure(name: str, sample: Sample, roots: list[int], samples: int,
            budget: float) -> tuple[list[float], list[float]]:
    """Run ``sample`` up to ``samples`` times (fewer if ``budget`` seconds run out)."""
    walls: list[float] = []
    cpus: list[float] = []
    sample(roots)  # warm up: caches, psutil's Process table
    deadline = time.monotonic() + budget
    result: dict[int, tuple[float, int]] = {}
    for _ in range(samples):
        cpu0, wall0 = time.process_time(), time.perf_counter()
        result = sample(roots)
        walls.append(time.perf_counter() - wall0)
        cpus.append(time.process_time() - cpu0)
        if time.monotonic() > deadline:
            break
    rss = sum(r for _, r in result.values())
    print(f"   {name:<24} {len(walls):>3} samples: wall median {1000 * b.median(walls):7.2f} ms,"
          f" p95 {1000 * b.percentile(walls, 95):7.2f} ms; CPU median "
          f"{1000 * b.median(cpus):7.2f} ms, p95 {1000 * b.percentile(cpus, 95):7.2f} ms; "
          f"{len(result)} roots found, {rss / b.MB:.0f} MB RSS in all")
    return walls, cpus


async def monitor_on_loop(roots: list[int], samples: int) -> None:
    """``Monitor.refresh()`` as the agent runs it, the loop's lateness, and usage()."""
    monitor = Monitor()
    for pid in roots:
        monitor.track(pid)
    lateness: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        period = 0.001
        while not stop.is_set():
            due = time.perf_counter() + period
            await asyncio.sleep(period)
            lateness.append(time.perf_counter() - due)

    tick = asyncio.create_task(ticker())
    walls: list[float] = []
    try:
        for _ in range(samples):
            wall0 = time.perf_counter()
            await monitor.refresh()
            walls.append(time.perf_counter() - wall0)
    finally:
        stop.set()
        await tick
    print(f"   Monitor.refresh()        {len(walls):>3} samples: wall median "
          f"{1000 * b.median(walls):7.2f} ms, p95 {1000 * b.percentile(walls, 95):7.2f} ms; "
          f"1 ms ticker meanwhile late by median {1000 * b.median(lateness):.2f} ms, p95 "
          f"{1000 * b.percentile(lateness, 95):.2f} ms, max {1000 * max(lateness):.2f} ms")
    found = sum(1 for pid in roots if monitor.usage(pid) is not None)
    reads = []
    for _ in range(samples):
        wall0 = time.perf_counter()
        for pid in roots:
            monitor.usage(pid)
        reads.append(time.perf_counter() - wall0)
    print(f"   Monitor.usage() x {len(roots)}    {len(reads):>3} rounds: median "
          f"{1e6 * b.median(reads):.1f} us per round; {found} roots have figures")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--bare", action="store_true", help="sleep alone, without the shell")
    parser.add_argument("--naive-samples", type=int, default=3)
    args = parser.parse_args()
    count = min(args.count, 2000)  # bounded, whatever the option says
    samples = min(args.samples, 200)
    b.header(f"sampling CPU and memory of {count} process trees")
    popens: list[subprocess.Popen[bytes]] = []
    try:
        started = time.perf_counter()
        spawn_all(count, args.bare, popens)
        roots = [p.pid for p in popens]
        total = sum(1 for name in os.listdir("/proc") if name.isdigit())
        print(f"   {count} trees ({tree_members(popens)} processes) started in "
              f"{time.perf_counter() - started:.1f} s; {total} processes on the machine")
        _, cpus = measure("sample_trees (walking the trees)", sample_trees, roots,
                          samples, 30.0)
        measure("  exact_rss=False", functools.partial(sample_trees, exact_rss=False),
                roots, samples, 30.0)
        measure("sample_trees, whole table", functools.partial(sample_trees, walk=False),
                roots, samples, 30.0)
        measure("psutil one pass", psutil_one_pass, roots, samples, 30.0)
        measure("naive per root", naive, roots, min(args.naive_samples, 20), 60.0)
        asyncio.run(monitor_on_loop(roots, samples))
    finally:
        kill_all(popens)
    worst = b.percentile(cpus, 95)
    print("\n-- summary --")
    print(f"   sample_trees of {count} trees: CPU p95 {1000 * worst:.1f} ms per sample, "
          f"{100 * b.median(cpus) / 2.0:.2f} % of a core at a 2 s interval (target <= "
          f"{1000 * TARGET_CPU:g} ms: {b.verdict(worst <= TARGET_CPU)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
