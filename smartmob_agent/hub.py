"""Fan-out of one process's output to whoever is attached: in memory, bounded.

The hub never waits on a subscriber. Each subscriber takes a batch of lines with a plain,
non-blocking call and is responsible for bounding what it buffers (dropping, counting and
saying what it dropped); so a stuck client can neither slow the child nor grow the agent.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

#: Bytes kept of each recent line (a process may write 64 KiB lines).
RECENT_LINE_BYTES = 1024


class Subscriber(Protocol):
    """Something that receives output lines, e.g. one attached WebSocket."""

    def send_lines(self, stream: str, lines: list[bytes]) -> None:
        """Take a batch of lines (valid UTF-8, no newline); must not block."""

    def close(self) -> None:
        """The process is gone: no more lines will come."""


class Hub:
    """Output of one process: recent lines plus the set of live subscribers.

    Args:
        backlog: how many recent lines to keep, for error reports; each is kept to its
            first :data:`RECENT_LINE_BYTES` bytes so the backlog stays small.
    """

    def __init__(self, backlog: int = 20) -> None:
        self._backlog = backlog
        self.recent: deque[bytes] = deque(maxlen=backlog)
        self._subscribers: list[Subscriber] = []
        self.closed = False

    def publish(self, stream: str, lines: list[bytes]) -> None:
        """Hand a batch of lines of ``stream`` (``stdout``/``stderr``) to every subscriber."""
        self.recent.extend(line[:RECENT_LINE_BYTES] for line in lines[-self._backlog:])
        for subscriber in self._subscribers:
            subscriber.send_lines(stream, lines)

    def subscribe(self, subscriber: Subscriber) -> None:
        """Start sending lines to ``subscriber``; closes it at once if the hub is closed."""
        if self.closed:
            subscriber.close()
            return
        # a new list, so publish() may iterate while subscribers come and go
        self._subscribers = [*self._subscribers, subscriber]

    def unsubscribe(self, subscriber: Subscriber) -> None:
        """Stop sending lines to ``subscriber`` (no error if it was not subscribed)."""
        self._subscribers = [s for s in self._subscribers if s is not subscriber]

    @property
    def subscriber_count(self) -> int:
        """How many subscribers are attached."""
        return len(self._subscribers)

    def close(self) -> None:
        """Tell every subscriber the stream has ended, and accept no new ones."""
        self.closed = True
        subscribers, self._subscribers = self._subscribers, []
        for subscriber in subscribers:
            subscriber.close()
