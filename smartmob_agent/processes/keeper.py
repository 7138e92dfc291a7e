"""Keeping the guardian running: a new one when it dies, at a bounded rate.

The :mod:`guardian <smartmob_agent.processes.guardian>` kills the agent's descendants if
the agent dies. If the guardian itself dies first (``SIGKILL``, the out-of-memory
killer), a later death of the agent would leave the grandchildren running, so a
:class:`Keeper` starts a new one at once, as many times as needed, but at most
:data:`RESTART_LIMIT` times in :data:`RESTART_WINDOW` seconds: a guardian that dies as
soon as it starts must not make the agent spin. The next one then starts when the window
allows (see :func:`restart_delay`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import subprocess
import time
from collections.abc import Callable, Sequence

from smartmob_agent.model import Exit
from smartmob_agent.processes.reaper import Reaper

log = logging.getLogger("smartmob_agent")

#: Restarts of the guardian allowed within :data:`RESTART_WINDOW` seconds.
RESTART_LIMIT = 5
#: The window of :data:`RESTART_LIMIT`, in seconds.
RESTART_WINDOW = 60.0


def restart_delay(
    restarts: Sequence[float], now: float, limit: int = RESTART_LIMIT,
    window: float = RESTART_WINDOW,
) -> float:
    """How long to wait before the next restart, given the times of the earlier ones
    (oldest first): none while fewer than ``limit`` happened in the last ``window``
    seconds, else until the oldest of the last ``limit`` leaves the window.

    >>> from smartmob_agent.processes.keeper import restart_delay
    >>> restart_delay([], 100.0)
    0.0
    >>> restart_delay([10.0, 20.0, 30.0, 40.0, 50.0], 60.0)
    10.0
    >>> restart_delay([0.0, 20.0, 30.0, 40.0, 50.0], 61.0)
    0.0
    """
    recent = [moment for moment in restarts if now - moment < window]
    if len(recent) < limit:
        return 0.0
    return max(0.0, recent[-limit] + window - now)


class Keeper:
    """Runs one guardian at a time, from :meth:`start` to :meth:`release`.

    Args:
        start: starts a guardian (a process whose stdin is a pipe from the agent).
        reaper: learns of the guardian's exit.
        limit, window: at most ``limit`` restarts in ``window`` seconds.
        clock: monotonic seconds (tests may pass their own).
    """

    def __init__(
        self, start: Callable[[], subprocess.Popen[bytes]], reaper: Reaper, *,
        limit: int = RESTART_LIMIT, window: float = RESTART_WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._start = start
        self._reaper = reaper
        self._limit = limit
        self._window = window
        self._clock = clock
        self._restarts: collections.deque[float] = collections.deque(maxlen=limit)
        self._guardian: subprocess.Popen[bytes] | None = None
        self._pending: asyncio.TimerHandle | None = None
        self._released = False
        #: How many guardians were started, the first one included.
        self.starts = 0

    @property
    def pid(self) -> int | None:
        """The pid of the running guardian (``None`` while none runs)."""
        return None if self._guardian is None else self._guardian.pid

    @property
    def next_restart(self) -> float | None:
        """Seconds until a new guardian starts, while one is due (else ``None``)."""
        if self._pending is None:
            return None
        return max(0.0, self._pending.when() - asyncio.get_running_loop().time())

    def start(self) -> None:
        """Start the first guardian.

        Raises:
            OSError: it could not be started (the agent should not run unguarded).
        """
        self._launch()

    def _launch(self) -> None:
        guardian = self._start()
        self.starts += 1
        try:
            self._reaper.watch(guardian.pid, lambda status: self._on_exit(guardian, status))
        except OSError:  # no pidfd to be had: a guardian nobody watches is no use
            guardian.kill()
            guardian.wait()
            _close_input(guardian)
            raise
        self._guardian = guardian

    def _on_exit(self, guardian: subprocess.Popen[bytes], status: int) -> None:
        exit = Exit.from_wait_status(status)
        # the reaper reaped it: Popen must never wait for that pid (it may be another's)
        guardian.returncode = exit.code
        _close_input(guardian)
        if guardian is self._guardian:
            self._guardian = None
        if self._released:
            return
        delay = restart_delay(self._restarts, self._clock(), self._limit, self._window)
        log.warning(
            "the guardian (pid %d) %s: starting a new one%s", guardian.pid, exit.describe(),
            f" in {delay:.0f} s (already {self._limit} new ones in {self._window:g} s)"
            if delay else "",
        )
        self._schedule(delay)

    def _schedule(self, delay: float) -> None:
        self._pending = asyncio.get_running_loop().call_later(delay, self._restart)

    def _restart(self) -> None:
        self._pending = None
        if self._released:
            return
        self._restarts.append(self._clock())
        try:
            self._launch()
        except OSError as error:
            delay = max(1.0, restart_delay(self._restarts, self._clock(), self._limit,
                                           self._window))
            log.error("could not start a new guardian (%s): trying again in %.0f s",
                      error.strerror or error, delay)
            self._schedule(delay)

    def release(self) -> None:
        """Let the guardian go (end of file on its stdin: it sweeps, finds nobody after
        a clean stop, and exits); start no other one. Idempotent."""
        self._released = True
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        if self._guardian is not None:
            _close_input(self._guardian)


    def wait_released(self, timeout: float) -> None:
        """After :meth:`release`, wait up to ``timeout`` seconds for the guardian to exit."""
        if self._guardian is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._guardian.wait(timeout=timeout)


def _close_input(guardian: subprocess.Popen[bytes]) -> None:
    if guardian.stdin is not None and not guardian.stdin.closed:
        guardian.stdin.close()
