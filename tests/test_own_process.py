"""The agent's own process, read and tuned without psutil: the process tree and start
times from /proc (processes.proctable), and one malloc arena (processes.heap).

Real processes; psutil, which the agent no longer imports, is the reference here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from pathlib import Path

import psutil

from smartmob_agent.processes import proctable, stop
from tests.helpers import eventually


async def test_descendants_and_start_times_read_as_psutil_reads_them() -> None:
    """A shell with a child (in a session of its own) that has its own child: the
    descendants of the shell are those, whatever their group; start times are psutil's
    ``create_time``; a gone pid has neither."""
    shell = await asyncio.create_subprocess_exec(
        "/bin/sh", "-c", "setsid sh -c 'sleep 1000 & wait' & wait",
        stdin=asyncio.subprocess.DEVNULL)
    try:
        root = psutil.Process(shell.pid)
        await eventually(
            lambda: any(p.name() == "sleep" for p in root.children(recursive=True)),
            what="the setsid shell and its sleep")
        expected = sorted(p.pid for p in root.children(recursive=True))
        assert sorted(proctable.descendants(shell.pid)) == expected
        for pid in [shell.pid, *expected]:
            assert proctable.start_time(pid) == psutil.Process(pid).create_time()
        assert not proctable.is_zombie(shell.pid)
    finally:
        for process in psutil.Process(shell.pid).children(recursive=True):
            process.kill()
        shell.kill()
        await shell.wait()
    assert proctable.start_time(shell.pid) is None
    assert proctable.descendants(shell.pid) == []


def test_a_zombie_is_seen_as_one() -> None:
    """A child that exited and was not reaped is a zombie."""
    child = subprocess.Popen(["true"])
    try:
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
        assert proctable.is_zombie(child.pid)
    finally:
        child.wait()


#: Starts threads that each allocate and free memory, then prints how many ``malloc``
#: arenas of threads exist (each is a 64 MiB reservation in the address space).
ARENAS = r"""
import sys, threading
sys.path.insert(0, sys.argv[2])
if sys.argv[1] == "one":
    from smartmob_agent.processes.heap import one_arena
    assert one_arena()
def work():
    for _ in range(200):
        blocks = [bytearray(200_000) for _ in range(5)]  # malloc'ed, not pymalloc'ed
        del blocks
barrier = threading.Barrier(4)
def run():
    barrier.wait()
    work()
threads = [threading.Thread(target=run) for _ in range(4)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
count = 0
for line in open("/proc/self/maps"):
    start, end = (int(x, 16) for x in line.split()[0].split("-"))
    if end - start == 64 << 20 or (line.split()[1] == "---p" and (end - start) > 60 << 20):
        count += 1
print(count)
"""


def test_one_arena_keeps_threads_off_arenas_of_their_own() -> None:
    """Threads that allocate get arenas of their own (64 MiB reserved each, memory
    freed there stays resident); after ``one_arena()`` they share the main one."""
    package_parent = str(Path(__file__).resolve().parent.parent)

    def arenas(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", ARENAS, mode, package_parent],
                              capture_output=True, text=True, timeout=60, check=True)
        return int(done.stdout)

    assert arenas("default") >= 1
    assert arenas("one") == 0


def test_a_bare_agent_loads_only_what_it_uses() -> None:
    """Importing the command loads neither psutil, package metadata, the OpenAPI
    tables, structlog (and the rich it imports where installed) nor fluent-logger, and
    compiles no request schema: each costs memory an agent that does not use it should
    not hold (they come with the first build, description, kv or json log format,
    FluentD endpoint or request)."""
    code = (
        "import sys; import smartmob_agent.cli; from smartmob_agent import schemas; "
        "print(sorted(m for m in ('psutil', 'importlib.metadata', 'structlog', 'rich', "
        "'fluent', 'smartmob_agent.web.openapi') if m in sys.modules)); "
        "print(schemas.create_request._compiled_whole is None)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.split("\n")[:2] == ["[]", "True"]


async def test_a_survivor_and_its_descendants_are_stopped_by_pid_and_start_time() -> None:
    """stop_survivor (an earlier agent's child, found by its recorded pid and start
    time) stops it and its descendants, wherever their session, all reading one scan
    within one_scan; a start time that does not match leaves the pid alone."""
    shell = subprocess.Popen(  # noqa: ASYNC220 - reaped below, once stopped
        ["/bin/sh", "-c", "setsid sleep 1000 & sleep 1000 & wait"],
        stdin=subprocess.DEVNULL, start_new_session=True)
    root = psutil.Process(shell.pid)
    members = [root]
    try:
        await eventually(lambda: len(root.children(recursive=True)) == 2,
                         what="the shell's two sleeps")
        members += root.children(recursive=True)
        started = proctable.start_time(shell.pid)
        assert started is not None
        assert not await stop.stop_survivor(shell.pid, started - 10, timeout=5)
        assert all(member.is_running() for member in members)
        with stop.one_scan():
            assert await stop.stop_survivor(shell.pid, started, timeout=5)
        shell.wait(timeout=5)
        await eventually(lambda: not any(m.is_running() and m.status() != "zombie"
                                         for m in members[1:]), what="the sleeps to end")
    finally:
        for member in members:
            with contextlib.suppress(psutil.Error):
                member.kill()
        shell.wait()
