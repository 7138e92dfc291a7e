"""A bound on the agent's log records about one process that repeat.

A process in a crash loop logs the same records again and again ("process 4242 exited
with code 1 after 0.001 s"): at ten restarts a second, with more processes like it, they
would bury every other record of the agent's log, and cost the agent the time to write
them. A :class:`RepeatLimit` lets through, of each kind of record (one message
template) of its process, the first :data:`BURST` of every :data:`WINDOW` seconds; it
counts the others, and says how many it held back, with the last of them, in one record
when the window ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: Records of one kind a process may log per window.
BURST = 10
#: The window, in seconds.
WINDOW = 10.0


@dataclass
class _Window:
    """The records of one kind in the current window."""

    start: float
    passed: int = 0
    held: int = 0
    level: int = logging.NOTSET
    #: the message and arguments of the last record held back
    last: tuple[str, tuple[Any, ...]] = ("", ())
    timer: asyncio.TimerHandle | None = None


class RepeatLimit:
    """Logs the records of one process to ``logger``, at most ``burst`` of each kind per
    ``window`` seconds; the rest are summed up in one record per window:
    ``<slug>: 90 similar records held back in 10 s; the last: <its message>``.

    The summary comes when the window ends (a timer of the running event loop, if there
    is one), or else with the next record of its kind, or on :meth:`flush`.

    Args:
        logger: where the records go (its name stays theirs).
        slug: the process's name, which starts the summaries.
        burst: records of one kind let through per window.
        window: its length, in seconds.
        clock: the monotonic clock (a seam for tests).
    """

    def __init__(
        self,
        logger: logging.Logger,
        slug: str,
        *,
        burst: int = BURST,
        window: float = WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.slug = slug
        self.burst = burst
        self.window = window
        self._clock = clock
        self._windows: dict[str, _Window] = {}

    def debug(self, msg: str, *args: Any, **kwargs: Any) -> None:
        """:meth:`log` at ``DEBUG``."""
        self.log(logging.DEBUG, msg, *args, **kwargs)

    def info(self, msg: str, *args: Any, **kwargs: Any) -> None:
        """:meth:`log` at ``INFO``."""
        self.log(logging.INFO, msg, *args, **kwargs)

    def warning(self, msg: str, *args: Any, **kwargs: Any) -> None:
        """:meth:`log` at ``WARNING``."""
        self.log(logging.WARNING, msg, *args, **kwargs)

    def log(self, level: int, msg: str, *args: Any, **kwargs: Any) -> None:
        """Log ``msg % args`` as :meth:`logging.Logger.log` does, unless ``burst``
        records of the template ``msg`` were logged in the current window."""
        if not self.logger.isEnabledFor(level):
            return  # costs nothing, and counts for nothing
        now = self._clock()
        window = self._windows.get(msg)
        if window is not None and now - window.start >= self.window:
            self._end(msg)
            window = None
        if window is None:
            window = self._windows[msg] = _Window(now)
        if window.passed < self.burst:
            window.passed += 1
            self.logger.log(level, msg, *args, **kwargs)
            return
        window.held += 1
        window.level = max(window.level, level)
        window.last = (msg, args)
        if window.timer is None:
            window.timer = _call_later(window.start + self.window - now, self._end, msg)

    def flush(self) -> None:
        """Say now what was held back (the process is going away)."""
        for msg in list(self._windows):
            self._end(msg)

    def _end(self, msg: str) -> None:
        """End the window of ``msg``: say how many records it held back, if any."""
        window = self._windows.pop(msg, None)
        if window is None:
            return
        if window.timer is not None:
            window.timer.cancel()
        if window.held:
            template, args = window.last
            self.logger.log(
                window.level, "%s: %d similar record(s) held back in %g s; the last: %s",
                self.slug, window.held, self.window, _format(template, args),
            )


def _call_later(
    delay: float, callback: Callable[[str], None], msg: str
) -> asyncio.TimerHandle | None:
    """Call ``callback(msg)`` in ``delay`` seconds on the running loop; ``None`` without
    one (the summary then waits for the next record, or a flush)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    return loop.call_later(max(0.0, delay), callback, msg)


def _format(template: str, args: tuple[Any, ...]) -> str:
    """``template % args`` as :mod:`logging` would make it, never failing."""
    try:
        return template % args if args else template
    except (TypeError, ValueError):
        return f"{template} {args!r}"
