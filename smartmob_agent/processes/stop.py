"""Signalling and stopping process trees through pidfds (the adapter of signals).

A child's descendants may have left its process group (``setsid``), so a tree is the
process group *and* every descendant found in the process tree. Each member is signalled
once, then waited for through a pidfd (which names one process for good, whatever
happens to its pid), and SIGKILLed if it outlives the grace period. :func:`stop_marked`
and :func:`stop_survivor` reach processes that are nobody's child any more: the orphans
of a previous run, and the children of a previous agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Iterable
from typing import Any

import psutil

from smartmob_agent.processes import proctable

log = logging.getLogger("smartmob_agent.child")  # stable name: internals.rst

#: Longest wait for processes to vanish after SIGKILL (a process stuck in the kernel).
KILL_WAIT = 5.0
#: How far two readings of one process's start time may differ (clock ticks of 10 ms).
_START_TIME_SLACK = 0.05


def descendants(pid: int) -> list[int]:
    """The pids below ``pid`` in the process tree, wherever their group; ``[]`` if it
    is gone."""
    try:
        return [process.pid for process in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def open_pidfds(pids: Iterable[int]) -> dict[int, int]:
    """A pidfd for each of ``pids`` still there."""
    fds: dict[int, int] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            fds[pid] = os.pidfd_open(pid)
    return fds


def _close_all(fds: dict[int, int]) -> None:
    for fd in fds.values():
        os.close(fd)


def signal_once(leader: int | None, sig: int, fds: dict[int, int]) -> None:
    """Signal the process group ``leader`` (unless ``None``), then each pidfd of ``fds``
    that the group signal did not reach.

    Each process gets ``sig`` once: a second SIGTERM often means "quit now" to a
    program, and a second SIGHUP or SIGTTIN asks for a second reload or worker.
    """
    group_signalled = False
    if leader is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(leader, sig)
            group_signalled = True
    for pid, fd in fds.items():
        if group_signalled and _process_group(pid) == leader:
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            signal.pidfd_send_signal(fd, sig)


def signal_tree(leader: int, sig: int, *, reaped: bool) -> None:
    """Send ``sig`` to the process group of ``leader`` and to all its descendants, once
    each. Once ``leader`` is ``reaped``, neither its pid nor its group id is its own any
    more: nothing is signalled then (its orphans went to another parent)."""
    if reaped:
        return
    fds = open_pidfds(descendants(leader))
    try:
        signal_once(leader, sig, fds)
    finally:
        _close_all(fds)


async def stop_tree(
    leader: int, sig: int, timeout: float, reaped: asyncio.Future[Any]
) -> None:
    """Stop the child ``leader`` (a process group leader) and its descendants.

    Sends ``sig`` to the process group and to every descendant, waits up to ``timeout``
    seconds for all of them to be gone (``reaped`` done: the caller reaps the leader),
    then SIGKILLs the rest. Members of the group that appeared after the signal and
    outlive the child get SIGKILL at the end.
    """
    fds = open_pidfds([] if reaped.done() else descendants(leader))
    try:
        signal_once(None if reaped.done() else leader, sig, fds)
        try:
            async with asyncio.timeout(timeout):
                await _gone(reaped, fds)
        except TimeoutError:
            if not reaped.done():  # descendants that appeared meanwhile
                fds.update(open_pidfds(p for p in descendants(leader) if p not in fds))
            log.warning(
                "process %d did not stop within %.1f s of %s: sending SIGKILL",
                leader, timeout, signal.Signals(sig).name,
            )
            signal_once(None if reaped.done() else leader, signal.SIGKILL, fds)
            async with asyncio.timeout(KILL_WAIT):
                await _gone(reaped, fds)
    finally:
        _close_all(fds)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(leader, signal.SIGKILL)


async def _gone(reaped: asyncio.Future[Any], fds: dict[int, int]) -> None:
    """Wait for the leader to be reaped and every pidfd to signal exit."""
    await asyncio.gather(asyncio.shield(reaped), wait_pidfds(fds.values()))


async def wait_pidfds(fds: Iterable[int]) -> None:
    """Wait until every pidfd signals that its process has exited."""
    loop = asyncio.get_running_loop()
    fds = list(fds)
    waits: list[asyncio.Future[None]] = []
    for fd in fds:
        gone: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, _resolve, loop, fd, gone)
        waits.append(gone)
    try:
        await asyncio.gather(*waits)
    finally:
        # at once, not in done callbacks: the caller registers these fds again or
        # closes them next, and a late remove_reader would hit the new registration
        for fd in fds:
            loop.remove_reader(fd)
        for gone in waits:
            gone.cancel()


async def stop_marked(marker: str, timeout: float, sig: int = signal.SIGTERM) -> int:
    """Stop every process whose environment carries ``marker`` (``NAME=value``).

    This reaches descendants that left their process group and lost their parent, which
    neither the group nor the process tree can find any more. Sends ``sig``, waits up to
    ``timeout`` seconds, then SIGKILLs what is left. Returns how many were found.
    """
    fds = open_pidfds(proctable.marked_processes(marker.encode()))
    await _stop_all(fds, sig, timeout)
    return len(fds)


async def _stop_all(
    fds: dict[int, int], sig: int, timeout: float, group: int | None = None
) -> None:
    """Send ``sig`` to every pidfd (and to process ``group``, if given), wait up to
    ``timeout`` seconds, SIGKILL what is left and wait for it; close the pidfds."""

    def send(number: int) -> None:
        if group is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, number)
        for fd in fds.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                signal.pidfd_send_signal(fd, number)

    try:
        send(sig)
        if sig != signal.SIGKILL:
            try:
                async with asyncio.timeout(timeout):
                    await wait_pidfds(fds.values())
            except TimeoutError:
                send(signal.SIGKILL)
        async with asyncio.timeout(KILL_WAIT):
            await wait_pidfds(fds.values())
    finally:
        _close_all(fds)


def start_time(pid: int) -> float | None:
    """When ``pid`` started (seconds since the epoch), or ``None`` if it is gone.

    With the pid, it names one process for good: a pid is reused, a (pid, start time)
    pair is not.
    """
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


async def stop_survivor(pid: int, started: float, timeout: float) -> bool:
    """Stop a child that outlived an earlier agent, if ``pid`` still names it.

    Sends SIGTERM to its process group and its descendants, waits up to ``timeout``
    seconds, then SIGKILLs what is left. Returns whether it was found.
    """
    found = start_time(pid)
    if found is None or abs(found - started) > _START_TIME_SLACK:
        return False  # gone, or the pid now names another process
    with contextlib.suppress(psutil.Error):
        if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return False  # already dead, waiting to be reaped
    try:
        members = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return False
    await _stop_all(open_pidfds(p.pid for p in members), signal.SIGTERM, timeout, group=pid)
    return True


def _process_group(pid: int) -> int | None:
    """The process group of ``pid``, or ``None`` if it is gone."""
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def _resolve(loop: asyncio.AbstractEventLoop, fd: int, future: asyncio.Future[None]) -> None:
    """A pidfd became readable: its process is gone (it stays readable, so stop watching)."""
    loop.remove_reader(fd)
    if not future.done():
        future.set_result(None)
