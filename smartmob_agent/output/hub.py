"""Fan-out of one process's output to whoever is attached: in memory, bounded.

The hub never waits on a subscriber. Each subscriber takes a batch of lines with a plain,
non-blocking call and is responsible for bounding what it buffers (dropping, counting and
saying what it dropped); so a stuck client can neither slow the child nor grow the agent.

A subscriber that also has ``send_stamped`` and ``send_event`` (a
:class:`StampedSubscriber`, such as an attached WebSocket) gets each batch with its
:class:`~smartmob_agent.model.Stamp` (sequence numbers, time, run) instead, and the
lifecycle markers of the process (``spawned``, ``exited``, ``backoff``) as they happen,
in the same order as the lines.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any, Protocol, TypeGuard

from smartmob_agent.model import Stamp

#: Bytes kept of each recent line (a process may write 64 KiB lines).
RECENT_LINE_BYTES = 1024


class Subscriber(Protocol):
    """Something that receives output lines, e.g. one attached WebSocket."""

    def send_lines(self, stream: str, lines: list[bytes]) -> None:
        """Take a batch of lines (valid UTF-8, no newline); must not block."""

    def close(self) -> None:
        """The process is gone: no more lines will come."""


class StampedSubscriber(Subscriber, Protocol):
    """A subscriber that wants each batch's stamp, and the lifecycle markers."""

    def send_stamped(self, stream: str, lines: list[bytes], stamp: Stamp | None) -> None:
        """Take a batch of lines with its stamp (``None``: the log did not number it,
        being closed); must not block."""

    def send_event(self, event: Mapping[str, Any]) -> None:
        """Take a lifecycle marker (``{"event": "spawned", "at": <epoch seconds>, ...}``);
        must not block."""


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
        # who gets what: lists rebuilt on each change, so sending may iterate them while
        # subscribers come and go
        self._plain: list[Subscriber] = []
        self._stamped: list[StampedSubscriber] = []
        self.closed = False

    def publish(self, stream: str, lines: list[bytes], stamp: Stamp | None = None) -> None:
        """Hand a batch of lines of ``stream`` (``stdout``/``stderr``), stamped with
        ``stamp`` by the log, to every subscriber."""
        self.recent.extend(line[:RECENT_LINE_BYTES] for line in lines[-self._backlog:])
        for subscriber in self._plain:
            subscriber.send_lines(stream, lines)
        for stamped in self._stamped:
            stamped.send_stamped(stream, lines, stamp)

    def announce(self, event: Mapping[str, Any]) -> None:
        """Hand a lifecycle marker to every subscriber that takes them."""
        for stamped in self._stamped:
            stamped.send_event(event)

    def _sort(self) -> None:
        self._plain = [s for s in self._subscribers if not _is_stamped(s)]
        self._stamped = [s for s in self._subscribers if _is_stamped(s)]

    def subscribe(self, subscriber: Subscriber) -> None:
        """Start sending lines to ``subscriber``; closes it at once if the hub is closed."""
        if self.closed:
            subscriber.close()
            return
        # a new list, so publish() may iterate while subscribers come and go
        self._subscribers = [*self._subscribers, subscriber]
        self._sort()

    def unsubscribe(self, subscriber: Subscriber) -> None:
        """Stop sending lines to ``subscriber`` (no error if it was not subscribed)."""
        self._subscribers = [s for s in self._subscribers if s is not subscriber]
        self._sort()

    @property
    def subscriber_count(self) -> int:
        """How many subscribers are attached."""
        return len(self._subscribers)

    def close(self) -> None:
        """Tell every subscriber the stream has ended, and accept no new ones."""
        self.closed = True
        subscribers, self._subscribers = self._subscribers, []
        self._sort()
        for subscriber in subscribers:
            subscriber.close()


def _is_stamped(subscriber: Subscriber) -> TypeGuard[StampedSubscriber]:
    return hasattr(subscriber, "send_stamped")
