"""Reaping children (the adapter of the kernel's exit notices): a pidfd per watched child,
and, for the agent as a subreaper, the orphans it adopts.

A child's exit is learnt from its pidfd the moment the kernel records it, whatever
happened to its pipes (a grandchild may hold them open for ever).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
from collections.abc import Callable

log = logging.getLogger("smartmob_agent.child")  # stable name: internals.rst

_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Make this process adopt its orphaned descendants (Linux ``PR_SET_CHILD_SUBREAPER``).

    A grandchild whose parent dies is then re-parented to the agent instead of init, so
    the agent can reap it (see :meth:`Reaper.reap_orphans`). Returns whether it worked.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return False

class Reaper:
    """Reaps children the moment they exit and reports their wait status.

    Each watched pid has a pidfd registered with the event loop: readable means exited.
    When the agent is a subreaper, :meth:`reap_orphans` (called on ``SIGCHLD``) also
    reaps adopted orphans, which are nobody's :class:`Child`; it delivers the status of
    watched pids too, so whichever path reaps first reports the exit.
    """

    def __init__(self) -> None:
        self._watched: dict[int, tuple[int, Callable[[int], None]]] = {}
        self.orphans_reaped = 0

    def watch(self, pid: int, on_exit: Callable[[int], None]) -> None:
        """Call ``on_exit(wait_status)`` once child ``pid`` has exited and been reaped."""
        fd = os.pidfd_open(pid)
        self._watched[pid] = (fd, on_exit)
        asyncio.get_running_loop().add_reader(fd, self._reap, pid)

    def redirect(self, pid: int, on_exit: Callable[[int], None]) -> None:
        """Report the exit of an already watched ``pid`` to ``on_exit`` instead."""
        fd, _ = self._watched[pid]
        self._watched[pid] = (fd, on_exit)

    def _reap(self, pid: int) -> None:
        try:
            reaped, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            if pid in self._watched:  # reaped by someone else: its status is lost
                log.warning("process %d was reaped elsewhere; its exit status is lost", pid)
                self._deliver(pid, 255 << 8)
            return  # else already reaped and delivered by reap_orphans
        if reaped:
            self._deliver(pid, status)

    def _deliver(self, pid: int, status: int) -> None:
        entry = self._watched.pop(pid, None)
        if entry is None:
            return
        fd, on_exit = entry
        asyncio.get_running_loop().remove_reader(fd)
        os.close(fd)
        on_exit(status)

    def reap_orphans(self) -> None:
        """Reap every exited child, watched or not (the ``SIGCHLD`` handler)."""
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None:
                return
            pid = info.si_pid
            try:
                _, status = os.waitpid(pid, 0)
            except ChildProcessError:  # pragma: no cover - reaped meanwhile
                continue
            if pid in self._watched:
                self._deliver(pid, status)
            else:
                self.orphans_reaped += 1
                log.debug("reaped orphaned process %d", pid)

    def close(self) -> None:
        """Stop watching every pid (their exits will no longer be reported)."""
        loop = asyncio.get_running_loop()
        for fd, _ in self._watched.values():
            loop.remove_reader(fd)
            os.close(fd)
        self._watched.clear()
