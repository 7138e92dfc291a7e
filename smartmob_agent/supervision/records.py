"""The processes' rows of the state database, kept up to date as they live.

A write the API waits for (a create, a delete, a control that changes whether the
process should run) comes first: if it fails, the request is refused (``503``) and
*nothing is done*, so that the client may try again and no agent restart ever undoes
what the API said. A write made as a process lives (each new child with its restart
count, its last exits, the mark of its output lines) never changes what runs: if it
fails, it is kept and made again once the database can be written (tried every
:data:`RETRY_INTERVAL` seconds), so the record catches up.

A failed write is said in the process's ``error`` (until the database can be written
again) and in the agent's log, but only once per change: the first failure is an error,
the later ones are not logged until a write succeeds again, which is said once too. A
full disk thus costs two lines, not one per child and per exit of every process. No
failure leaves a child without its watcher, or a process with two children.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable

from smartmob_agent.model import ProcessState, Releases
from smartmob_agent.processes.stop import start_time
from smartmob_agent.representations import request_document
from smartmob_agent.store import Record, Store, StoreError
from smartmob_agent.supervision.provision import Version
from smartmob_agent.supervision.update import releases_json
from smartmob_agent.supervision.watcher import Watcher

log = logging.getLogger("smartmob_agent.agent")  # stable name: its messages were the agent's

#: Seconds between two attempts at the writes left behind while the database could not
#: be written.
RETRY_INTERVAL = 1.0

#: What a write is of: its kind (``child``, ``exits``...) and the slug (or name) it is for.
Key = tuple[str, str]
Write = Callable[[Store], None]


class Records:
    """The rows of the processes of ``store``; after :meth:`close`, writes are skipped."""

    def __init__(self, store: Store) -> None:
        self._store: Store | None = store
        #: whether the last write failed (the next success is said, once)
        self._failing = False
        #: the writes made as processes live that failed, to make again, by what they write
        self._behind: dict[Key, Write] = {}
        #: the ``error`` each process got from a failed write, with what that write was
        #: of (``None``: a refused request); cleared once it is made, or for a refused
        #: request once the database can be written again
        self._said: dict[Watcher, tuple[str, Key | None]] = {}
        #: whether each process's row says it should run (``running``) or stay ``stopped``
        self._desired: dict[str, str] = {}
        self._retry: asyncio.TimerHandle | None = None

    def close(self) -> None:
        """Make the writes left behind if the database can now take them, then skip
        every write from now on (the database is being closed)."""
        store = self._store
        if store is not None and self._behind:
            self._catch_up(store)
            if self._behind:
                log.warning(
                    "the state database %s is not up to date: a new agent may not know "
                    "the last children, exits or output line numbers of some processes",
                    store.path)
        self._store = None
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None

    # -- what the API waits for: refused (and not done) when it cannot be written --------

    def add(self, watcher: Watcher) -> None:
        """Record a new process, before the API answers.

        Raises:
            StoreError: it is not recorded (it must not be created).
        """
        spec = watcher.spec
        desired = "running" if spec.options.autostart else "stopped"
        record = Record(spec.slug, request_document(spec), desired, watcher.process_id,
                        watcher.port, releases=releases_json(watcher.releases))
        self._write(("row", spec.slug), lambda store: store.add(record), None, "not created")
        self._desired[spec.slug] = desired

    def known(self, record: Record) -> None:
        """Take note of a process the database held at start (see :meth:`intend`)."""
        self._desired[record.slug] = record.desired

    def remove(self, watcher: Watcher) -> None:
        """Forget a process for good, first thing in its deletion.

        Raises:
            StoreError: it is not forgotten (it must not be deleted).
        """
        slug = watcher.spec.slug
        self._write(("row", slug), lambda store: store.remove(slug), watcher, "it is not deleted")
        self._desired.pop(slug, None)
        self._said.pop(watcher, None)
        for key in [key for key in self._behind if key[1] == slug]:
            del self._behind[key]

    def intend(self, watcher: Watcher, desired: str) -> Callable[[], None] | None:
        """Record that a control wants the process ``running`` or ``stopped``, before the
        control is applied, unless its row says so already (nothing is written then).

        Returns:
            What records the row's former value again, for a control that turns out not
            to apply (a conflict); ``None`` if nothing was written.

        Raises:
            StoreError: it is not recorded (the control must not be applied).
        """
        slug = watcher.spec.slug
        before = self._desired.get(slug)
        if before is None or before == desired:
            return None
        self._write(("desired", slug), lambda store: store.set_desired(slug, desired),
                    watcher, "it is not stopped" if desired == "stopped" else "it is not started")
        self._desired[slug] = desired
        return functools.partial(self._undo, watcher, before)

    def switch(
        self, watcher: Watcher, version: Version, pid: int | None, releases: Releases
    ) -> None:
        """Make ``version`` the current one of the process (an update, once its new child
        ``pid`` is ready, before the old one is stopped): a later agent runs it.

        Raises:
            StoreError: it is not recorded (the update must not be made).
        """
        slug = watcher.spec.slug
        record = Record(
            slug, request_document(version.spec), self._desired.get(slug, "running"),
            version.process_id, version.port, pid=pid,
            pid_started=None if pid is None else start_time(pid),
            releases=releases_json(releases),
        )
        self._write(("row", slug), lambda store: store.switch(record), None,
                    "the update is not made")

    def _undo(self, watcher: Watcher, desired: str) -> None:
        """Record ``desired`` again (see :meth:`intend`); made again later if it cannot be
        written now."""
        slug = watcher.spec.slug
        if slug not in self._desired:  # deleted meanwhile: no row to put back
            return
        self._desired[slug] = desired
        self._write(("desired", slug), lambda store: store.set_desired(slug, desired),
                    watcher, f"a new agent may not keep it {desired}", later=True)

    # -- what happens as processes live: made again later when it cannot be written ------

    def remember_child(self, watcher: Watcher, old: ProcessState, new: ProcessState) -> None:
        """Write each new child's pid and start time, so a later agent can tell it apart
        (a watcher's listener; it never raises: a later agent still finds the child by
        the agent's id)."""
        slug, pid, restarts = watcher.spec.slug, watcher.pid, watcher.restarts
        if new is ProcessState.RUNNING and pid is not None:
            started = start_time(pid)
        elif new is ProcessState.BACKOFF:  # restart counted first
            pid = started = None
        else:
            return
        self._write(("child", slug), lambda store: store.set_child(slug, pid, started, restarts),
                    watcher, "its current child is not recorded", later=True)

    def record_exits(self, watcher: Watcher) -> None:
        """Write the last exits of the process (after each one), for a later agent's
        status document."""
        slug, exits = watcher.spec.slug, tuple(watcher.exits)
        self._write(("exits", slug), lambda store: store.set_exits(slug, exits),
                    watcher, "its last exit is not recorded", later=True)

    def releases(self, watcher: Watcher) -> None:
        """Write what the updates of the process left (a pending update, the last
        error), for a later agent."""
        slug, data = watcher.spec.slug, releases_json(watcher.releases)
        self._write(("releases", slug), lambda store: store.set_releases(slug, data),
                    watcher, "its update is not recorded", later=True)

    def reserve_seq(self, slug: str, mark: int) -> None:
        """Record the mark below which the output lines of ``slug`` may be numbered."""
        self._write(("seq", slug), lambda store: store.set_seq_reserved(slug, mark), None,
                    "output line numbers may repeat after a crash", later=True)

    def set_value(self, key: str, value: str) -> None:
        """Keep ``value`` under ``key`` (see :meth:`.Store.set_value`), for the agent
        itself (the mark of its own log's line numbers)."""
        self._write(("value", key), lambda store: store.set_value(key, value), None,
                    f"its {key} is not recorded", later=True)

    # -- the writes --------------------------------------------------------------------------

    def _write(
        self, key: Key, write: Write, watcher: Watcher | None, consequence: str, *,
        later: bool = False,
    ) -> None:
        """Make ``write``; if it fails, say so (with ``consequence``) and raise, or, if
        ``later``, keep it to make again once the database can be written."""
        store = self._store
        if store is None or (later and key[0] != "value" and key[1] not in self._desired):
            return  # closed, or a write about a deleted process (its row is gone)
        try:
            write(store)
        except StoreError as error:
            self._failed(key[1], error, watcher, consequence, key if later else None)
            if not later:
                raise
            self._behind[key] = write
            self._retry_later()
            return
        self._behind.pop(key, None)  # superseded, if it was behind
        self._made(key)
        self._succeeded(store)

    def _failed(
        self, subject: str, error: StoreError, watcher: Watcher | None, consequence: str,
        key: Key | None = None,
    ) -> None:
        """Say a failed write (of ``key``, or a refused request): in the process's
        ``error``, and in the log if the database could be written until now."""
        text = f"{error} ({consequence})"
        if self._failing:
            log.debug("%s: %s", subject, text)
        else:
            self._failing = True  # first: a write the log line makes is not said again
            log.error("%s: %s; later failures are not logged until the database can be "
                      "written again", subject, text)
        if watcher is not None:  # after the log line: a write it makes cannot clear it
            watcher.error = text
            self._said[watcher] = (text, key)

    def _succeeded(self, store: Store) -> None:
        """After a write that succeeded: if writes were failing, say once that they no
        longer do, clear the errors they gave, and make the writes left behind."""
        if self._failing:
            self._failing = False
            log.warning("the state database %s can be written again", store.path)
            self._made(None)
        if self._behind:
            self._catch_up(store)

    def _made(self, key: Key | None) -> None:
        """Clear the ``error`` of the processes whose failed write of ``key`` is now made
        (``None``: whose request was refused, now that the database can be written)."""
        for watcher, (text, failed) in list(self._said.items()):
            if failed == key:
                if watcher.error == text:
                    watcher.error = None
                del self._said[watcher]

    def _catch_up(self, store: Store) -> None:
        """Make the writes left behind, oldest first, until one fails again."""
        for key, write in list(self._behind.items()):
            try:
                write(store)
            except StoreError as error:
                self._failed(key[1], error, None, "made again later")
                self._retry_later()
                return
            if self._behind.get(key) is write:
                del self._behind[key]
            self._made(key)

    def _retry_later(self) -> None:
        if self._retry is not None or self._store is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a test's direct call): the next write catches up
            return
        self._retry = loop.call_later(RETRY_INTERVAL, self._retry_now)

    def _retry_now(self) -> None:
        """Make the oldest write left behind; if it succeeds, the others follow."""
        self._retry = None
        store = self._store
        if store is None or not self._behind:
            return
        key, write = next(iter(self._behind.items()))
        try:
            write(store)
        except StoreError as error:
            self._failed(key[1], error, None, "made again later")
            self._retry_later()
            return
        if self._behind.get(key) is write:
            del self._behind[key]
        self._made(key)
        self._succeeded(store)
