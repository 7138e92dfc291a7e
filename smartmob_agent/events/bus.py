"""The event bus: what happens to processes, told to whoever listens, in order.

An event is a plain, JSON-ready dict, typed by its kind (:class:`StateEvent`,
:class:`ExitEvent`, ...; see :func:`make_event`). :meth:`EventBus.publish`
hands it at once to every subscriber: a bounded :class:`EventQueue` per WebSocket client,
or a plain callback (the webhook dispatcher). Publishing never waits and never fails
because of a subscriber: a queue that is full drops its oldest event, counts it, and
tells its reader with an ``events:dropped`` notice; a callback that raises is logged.

Every subscriber sees the events in exactly the order they were published, even when a
callback publishes another event while it is being told of one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final, Literal, TypedDict, cast, get_args

from smartmob_agent.representations import format_time

log = logging.getLogger("smartmob_agent.events")  # stable name: internals.rst

#: The kind of an event about a process (its ``event`` field).
EventKind = Literal[
    "process:create", "process:state", "process:online", "process:exit", "process:exception",
    "process:delete", "process:update",
]
#: The kinds of event the agent publishes (the ``event`` field).
EVENT_KINDS: frozenset[str] = frozenset(get_args(EventKind))
#: The kind of the notice that tells a queue's reader how many events it missed.
DROPPED: Final = "events:dropped"

#: The events an :class:`EventQueue` holds by default before it drops the oldest.
DEFAULT_MAXSIZE = 1000


class _ProcessFields(TypedDict):
    """The fields every event about a process has (see :doc:`api`, "events")."""

    slug: str
    app: str
    node: str
    process_type: str
    #: the pid of the child: the one that ended for an exit, else the current one
    pid: int | None
    #: the process's state when the event was published
    state: str
    #: while it is ``failed``: why, as a name (``reason`` in the status document)
    reason: str | None
    #: when, in ISO 8601, UTC, with milliseconds
    at: str


class CreateEvent(_ProcessFields):
    """``process:create``: a create request made the process (its first event, before
    any change of state); ``state`` is ``pending``, or ``stopped`` with ``autostart:
    false``."""

    event: Literal["process:create"]


class StateEvent(_ProcessFields):
    """``process:state``: the process changed state; ``state`` is the new one."""

    event: Literal["process:state"]
    #: the state before the change
    previous: str


class OnlineEvent(_ProcessFields):
    """``process:online``: a child was spawned (right after the change to ``running``)."""

    event: Literal["process:online"]


class ExitEvent(_ProcessFields):
    """``process:exit``: a child ended, by itself or stopped by the agent."""

    event: Literal["process:exit"]
    #: its exit status, when it exited rather than being killed by a signal
    code: int | None
    #: the name of the signal that killed it (``SIGKILL``), if one did
    signal: str | None
    #: how long it ran, in seconds
    ran_for: float


class ExceptionEvent(_ProcessFields):
    """``process:exception``: the process went to ``failed`` (right after that change)."""

    event: Literal["process:exception"]
    #: why, as in the status document
    error: str


class DeleteEvent(_ProcessFields):
    """``process:delete``: the process is deleted (its last event, after those of its
    stop): no child left, its files removed, its name free again."""

    event: Literal["process:delete"]


class UpdateEvent(_ProcessFields):
    """``process:update``: an update (or a rollback) of the process began or ended."""

    event: Literal["process:update"]
    #: ``started``, ``succeeded``, ``rolled back`` (a rollback succeeded) or ``failed``
    outcome: str
    #: the source it updates to
    source_url: str
    #: why it failed (``update_error`` in the status document), else ``None``
    error: str | None


#: An event about a process: what :meth:`EventBus.publish` takes and listeners are told.
ProcessEvent = (
    CreateEvent | StateEvent | OnlineEvent | ExitEvent | ExceptionEvent | DeleteEvent
    | UpdateEvent
)


class DroppedNotice(TypedDict):
    """``events:dropped``: a queue's reader missed ``count`` events (never published)."""

    event: Literal["events:dropped"]
    count: int
    #: when the last of them was dropped
    at: str


#: What a reader of an :class:`EventQueue` gets.
Event = ProcessEvent | DroppedNotice
Listener = Callable[[ProcessEvent], None]

_COMMON = _ProcessFields.__required_keys__ | {"event"}
#: The fields of each kind besides the common ones, read from the types above, so that
#: :func:`make_event` builds exactly what they say.
KIND_FIELDS: dict[str, frozenset[str]] = {
    "process:create": CreateEvent.__required_keys__ - _COMMON,
    "process:state": StateEvent.__required_keys__ - _COMMON,
    "process:online": OnlineEvent.__required_keys__ - _COMMON,
    "process:exit": ExitEvent.__required_keys__ - _COMMON,
    "process:exception": ExceptionEvent.__required_keys__ - _COMMON,
    "process:delete": DeleteEvent.__required_keys__ - _COMMON,
    "process:update": UpdateEvent.__required_keys__ - _COMMON,
}


def make_event(
    kind: EventKind,
    *,
    slug: str,
    app: str,
    node: str,
    process_type: str,
    pid: int | None,
    state: str,
    reason: str | None = None,
    clock: Callable[[], float] = time.time,
    **extra: Any,
) -> ProcessEvent:
    """Build an event about one process, stamped with the time now.

    Args:
        kind: one of :data:`EVENT_KINDS`.
        pid: the pid of the process's current child, if it has one.
        state: the process's state when the event is published: after the change for
            ``process:state``, ``process:online`` and ``process:exception``, but still the
            state the child ran in (``running``, ``stopping``) for ``process:exit``, whose
            state change follows.
        reason: the process's failure reason while it is ``failed``, else ``None``.
        clock: the wall clock (a seam for tests); not a field of the event.
        extra: the fields particular to the kind, all of them and no others
            (:data:`KIND_FIELDS`): ``previous`` for ``process:state``; ``code``,
            ``signal`` and ``ran_for`` for ``process:exit``; ``error`` for
            ``process:exception``; ``outcome``, ``source_url`` and ``error`` for
            ``process:update``; none for ``process:create`` and ``process:delete``.

    Raises:
        ValueError: for a kind not in :data:`EVENT_KINDS`, or other fields than the
            kind's (a bug of the caller).
    """
    fields = KIND_FIELDS.get(kind)
    if fields is None:
        raise ValueError(f"unknown event kind {kind!r}")
    if extra.keys() != fields:
        raise ValueError(
            f"a {kind} event has the fields {sorted(fields)}, not {sorted(extra)}"
        )
    # the order of the keys is the order on the wire: keep it
    event = {
        "event": kind, "slug": slug, "app": app, "node": node,
        "process_type": process_type, "pid": pid, "state": state, "reason": reason,
        "at": format_time(clock()), **extra,
    }
    # the kind and the names of its fields were checked just above
    return cast(ProcessEvent, event)


class EventQueueClosed(Exception):
    """The queue was closed (by its reader, or because the bus closed): no more events."""


class EventQueue:
    """The events for one reader, bounded: when full, the oldest event goes.

    Made by :meth:`EventBus.subscribe`. One task reads it, with :meth:`get` or
    ``async for``; the events are shared with other subscribers, so treat them as
    read-only.
    """

    def __init__(
        self,
        bus: EventBus,
        *,
        app: str | None,
        slug: str | None,
        maxsize: int,
        clock: Callable[[], float],
    ) -> None:
        if maxsize < 1:
            raise ValueError("an event queue must hold at least one event")
        self._bus = bus
        self.app = app
        self.slug = slug
        self.maxsize = maxsize
        self._clock = clock
        self._events: deque[ProcessEvent] = deque()
        self._waiters: list[asyncio.Future[None]] = []
        self._pending_drops = 0
        self._last_drop = 0.0
        #: How many events this queue has dropped in all, announced or not.
        self.dropped = 0
        self.closed = False
        self._finished = False

    def wants(self, event: ProcessEvent) -> bool:
        """Whether ``event`` passes this queue's ``app`` and ``slug`` filters."""
        return (self.app is None or event["app"] == self.app) and (
            self.slug is None or event["slug"] == self.slug
        )

    def put(self, event: ProcessEvent) -> None:
        """Queue ``event`` without waiting, dropping the oldest one if the queue is full."""
        if self.closed or self._finished:
            return
        if len(self._events) >= self.maxsize:
            self._events.popleft()
            self.dropped += 1
            self._pending_drops += 1
            self._last_drop = self._clock()
        self._events.append(event)
        self._wake()

    async def get(self) -> Event:
        """Return the next event, waiting for one.

        After a drop, the next call returns first an ``events:dropped`` notice with the
        ``count`` of events lost since the last notice.

        Raises:
            EventQueueClosed: once the queue is closed (what it still held is discarded),
                or once the bus is closed and what the queue held has been read.
        """
        while not (self._events or self._pending_drops or self.closed or self._finished):
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                self._waiters.remove(waiter)
        if self.closed:
            raise EventQueueClosed()
        if self._pending_drops:
            count, self._pending_drops = self._pending_drops, 0
            return {"event": DROPPED, "count": count, "at": format_time(self._last_drop)}
        if not self._events:
            raise EventQueueClosed()  # the bus is closed and everything has been read
        return self._events.popleft()

    def get_nowait(self) -> Event | None:
        """The next event if one is ready (a pending drop notice first), else ``None``:
        for a reader that takes what has gathered in one go after :meth:`get`.

        Raises:
            EventQueueClosed: once the queue is closed.
        """
        if self.closed:
            raise EventQueueClosed()
        if self._pending_drops or not self._events:
            # a drop notice is built by get(), which returns at once when one is pending
            return None
        return self._events.popleft()

    def __aiter__(self) -> EventQueue:
        return self

    async def __anext__(self) -> Event:
        """The next event; iteration ends when the queue is closed."""
        try:
            return await self.get()
        except EventQueueClosed:
            raise StopAsyncIteration from None

    def __len__(self) -> int:
        """How many events wait to be read (not counting a pending drop notice)."""
        return len(self._events)

    def close(self) -> None:
        """Unsubscribe, discard what is queued, and end every :meth:`get` (idempotent)."""
        if self.closed:
            return
        self.closed = True
        self._events.clear()
        self._bus.unsubscribe(self)
        self._wake()

    def finish(self) -> None:
        """No more events will come: :meth:`get` returns what is queued, then raises."""
        self._finished = True
        self._bus.unsubscribe(self)
        self._wake()

    def _wake(self) -> None:
        # wake every waiter: each checks again, so a cancelled one loses no event
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)


class EventBus:
    """Publishes events to queues and callbacks, never waiting on any of them.

    Args:
        clock: the wall clock that stamps drop notices (a seam for tests).
    """

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._queues: list[EventQueue] = []
        self._listeners: list[Listener] = []
        self._backlog: deque[ProcessEvent] = deque()
        self._publishing = False
        self.closed = False

    def publish(self, event: ProcessEvent) -> None:
        """Hand ``event`` to every subscriber now; never blocks, never raises for one."""
        if self.closed:
            return
        # a copy: what the subscribers share cannot change under them if the publisher
        # changes its dict afterwards
        self._backlog.append(event.copy())
        if self._publishing:
            # a callback publishes while being told of an event: deliver this one after
            # the current one has reached every subscriber, so that all see the same order
            return
        self._publishing = True
        try:
            while self._backlog:
                self._deliver(self._backlog.popleft())
        finally:
            self._publishing = False

    def _deliver(self, event: ProcessEvent) -> None:
        for queue in self._queues:
            if queue.wants(event):
                queue.put(event)
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.exception("an event listener failed on %s", event["event"])

    def subscribe(
        self, *, app: str | None = None, slug: str | None = None, maxsize: int = DEFAULT_MAXSIZE
    ) -> EventQueue:
        """Return a new queue of the events published from now on.

        Args:
            app: only events of this app.
            slug: only events of this process.
            maxsize: events held before the oldest is dropped.

        Once the bus is closed, the queue comes back closed.
        """
        queue = EventQueue(self, app=app, slug=slug, maxsize=maxsize, clock=self._clock)
        if self.closed:
            queue.finish()
            return queue
        # a new list, so a delivery in progress may iterate while queues come and go
        self._queues = [*self._queues, queue]
        return queue

    def unsubscribe(self, queue: EventQueue) -> None:
        """Stop sending events to ``queue`` (no error if it was not subscribed)."""
        self._queues = [q for q in self._queues if q is not queue]

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(event)`` for every event; it must not block (errors are logged)."""
        self._listeners = [*self._listeners, listener]

    def remove_listener(self, listener: Listener) -> None:
        """Stop calling ``listener`` (no error if it was not added)."""
        self._listeners = [f for f in self._listeners if f is not listener]

    @property
    def subscriber_count(self) -> int:
        """How many queues are subscribed (callbacks not counted)."""
        return len(self._queues)

    def close(self) -> None:
        """Publish no more: each queue ends once read to the end; callbacks are dropped.

        The readers still get what was published before, such as the last exits of a
        shutdown.
        """
        self.closed = True
        self._backlog.clear()
        queues, self._queues = self._queues, []
        self._listeners = []
        for queue in queues:
            queue.finish()
