"""Signalling and stopping process trees through pidfds (the adapter of signals).

A child's descendants may have left its process group (``setsid``), so a tree is the
process group *and* every descendant found in the process tree. Each member is signalled
once, then waited for through a pidfd (which names one process for good, whatever
happens to its pid), and SIGKILLed if it outlives the grace period. :func:`stop_marked`
and :func:`stop_survivor` reach processes that are nobody's child any more: the orphans
of a previous run, and the children of a previous agent.

A stop finds descendants and marked processes in a scan of the process table
(:func:`~smartmob_agent.processes.proctable.scan`), run in a thread so that the event
loop goes on serving meanwhile. Within :func:`one_scan`, every stop shares one scan: the
agent's shutdown stops all its processes with one pass over ``/proc``, not one per
process. A pid read from a scan is checked against its start time once its pidfd is
open, so a pid reused since the scan is never signalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import signal
from collections.abc import Iterable, Iterator
from typing import Any

from smartmob_agent.processes import proctable

log = logging.getLogger("smartmob_agent.child")  # stable name: internals.rst

#: Longest wait for processes to vanish after SIGKILL (a process stuck in the kernel).
KILL_WAIT = 5.0
#: How far two readings of one process's start time may differ (clock ticks of 10 ms).
_START_TIME_SLACK = 0.05


def descendants(pid: int) -> list[int]:
    """The pids below ``pid`` in the process tree, wherever their group; ``[]`` if it
    is gone."""
    return proctable.descendants(pid)


def open_pidfds(pids: Iterable[int]) -> dict[int, int]:
    """A pidfd for each of ``pids`` still there."""
    fds: dict[int, int] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            fds[pid] = os.pidfd_open(pid)
    return fds


def open_entries(entries: Iterable[proctable.Entry]) -> dict[int, int]:
    """A pidfd for each process of a scan that is still the one the scan found (not
    gone, not a zombie, its pid not reused since)."""
    fds: dict[int, int] = {}
    for entry in entries:
        try:
            fd = os.pidfd_open(entry.pid)
        except OSError:
            continue
        # read after the pidfd is open: if the start time matches now, the pidfd names
        # the very process the scan found
        if proctable.started(entry.pid) == entry.started:
            fds[entry.pid] = fd
        else:
            os.close(fd)
    return fds


class _SharedScan:
    """The scan of the process table that the stops within one :func:`one_scan` share."""

    def __init__(self) -> None:
        self._table: asyncio.Future[proctable.Table] | None = None

    async def table(self) -> proctable.Table:
        if self._table is None:  # the first stop to ask starts it
            self._table = asyncio.ensure_future(fresh_table())
        # shielded: a stop cancelled while it waits must not cancel the others' scan
        return await asyncio.shield(self._table)


_shared: contextvars.ContextVar[_SharedScan | None] = contextvars.ContextVar(
    "smartmob_agent_shared_scan", default=None)


@contextlib.contextmanager
def one_scan() -> Iterator[None]:
    """Within this block, every stop (of this task and of the tasks it creates) reads
    one scan of the process table, taken when the first of them needs it.

    For stopping many processes at once (the agent's shutdown): one pass over ``/proc``
    instead of two per process. The table is as old as the batch: a process that leaves
    its group *and* loses its parent during the stop itself is not found by it (at
    shutdown, the guardian's sweep ends it). A stop whose grace period runs out reads a
    fresh table all the same, to SIGKILL what appeared meanwhile.
    """
    token = _shared.set(_SharedScan())
    try:
        yield
    finally:
        _shared.reset(token)


async def fresh_table() -> proctable.Table:
    """A scan of the process table taken now, in a thread (the loop serves meanwhile)."""
    return await asyncio.to_thread(proctable.scan)


async def scan_table() -> proctable.Table:
    """The shared scan of :func:`one_scan` if in one, a fresh one otherwise."""
    shared = _shared.get()
    return await (shared.table() if shared is not None else fresh_table())


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
    outlive the child get SIGKILL at the end. The descendants come from
    :func:`scan_table` (the shared scan within :func:`one_scan`).
    """
    fds: dict[int, int] = {}
    try:
        if not reaped.done():
            fds = await _descendants(leader)
        # the leader may have been reaped during the scan: its pid is not its own then
        signal_once(None if reaped.done() else leader, sig, fds)
        try:
            async with asyncio.timeout(timeout):
                await _gone(reaped, fds)
        except TimeoutError:
            if not reaped.done():  # descendants that appeared meanwhile: a fresh table
                table = await fresh_table()
                if not reaped.done():
                    fds.update(open_entries(
                        e for e in table.descendants(leader) if e.pid not in fds))
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


async def _descendants(leader: int) -> dict[int, int]:
    """A pidfd for each descendant of ``leader``, from :func:`scan_table`, or from a
    fresh table if that one does not know this ``leader`` (it was taken before the
    child started: what it shows under the pid is another process's tree)."""
    table = await scan_table()
    entry = table.entries.get(leader)
    if entry is None or proctable.started(leader) != entry.started:
        table = await fresh_table()
    return open_entries(table.descendants(leader))


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
    The processes come from :func:`scan_table` (the shared scan within
    :func:`one_scan`); ``marker`` starts with
    :data:`~smartmob_agent.processes.proctable.MARKER_PREFIX`.
    """
    table = await scan_table()
    fds = open_entries(table.marked(marker.encode()))
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
    return proctable.start_time(pid)


async def stop_survivor(pid: int, started: float, timeout: float) -> bool:
    """Stop a child that outlived an earlier agent, if ``pid`` still names it.

    Sends SIGTERM to its process group and its descendants, waits up to ``timeout``
    seconds, then SIGKILLs what is left. Returns whether it was found.
    """
    own = open_pidfds([pid])  # first: a start time read after names what the pidfd does
    found = start_time(pid)
    if not own or found is None or abs(found - started) > _START_TIME_SLACK \
            or proctable.is_zombie(pid):  # gone, another process now, or already dead
        _close_all(own)
        return False
    try:
        # its descendants from the shared scan of one_scan: an agent taking over many
        # survivors reads /proc once
        fds = await _descendants(pid)
    except BaseException:
        _close_all(own)
        raise
    await _stop_all(own | fds, signal.SIGTERM, timeout, group=pid)
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
