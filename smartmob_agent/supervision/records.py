"""The processes' rows of the state database, kept up to date as they live.

A write the API waits for (a create, a control, a delete) fails the request, so that the
client learns of it. A write made as a process lives (each new child with its restart
count, the mark of its output lines) never changes what runs. Either way a failed write
is said in the agent's log and, for a process that exists, in its ``error``; no failure
leaves a child without its watcher, or a process with two children.
"""

from __future__ import annotations

import logging

from smartmob_agent.model import ProcessState
from smartmob_agent.processes.stop import start_time
from smartmob_agent.representations import request_document
from smartmob_agent.store import Record, Store, StoreError
from smartmob_agent.supervision.watcher import Watcher

log = logging.getLogger("smartmob_agent.agent")  # stable name: its messages were the agent's


class Records:
    """The rows of the processes of ``store``; after :meth:`close`, writes are skipped."""

    def __init__(self, store: Store) -> None:
        self._store: Store | None = store

    def close(self) -> None:
        """Skip every write from now on (the database is being closed)."""
        self._store = None

    def add(self, watcher: Watcher) -> None:
        """Record a new process, before the API answers.

        Raises:
            StoreError: it is not recorded (it must not be created).
        """
        spec = watcher.spec
        desired = "running" if spec.options.autostart else "stopped"
        try:
            if self._store is not None:
                self._store.add(Record(spec.slug, request_document(spec), desired,
                                       watcher.process_id, watcher.port))
        except StoreError as error:
            log.error("%s: not created: %s", spec.slug, error)
            raise

    def remove(self, watcher: Watcher) -> None:
        """Forget a process for good, first thing in its deletion.

        Raises:
            StoreError: it is not forgotten (it must not be deleted).
        """
        try:
            if self._store is not None:
                self._store.remove(watcher.spec.slug)
        except StoreError as error:
            failed(watcher, error, "it is not deleted")
            raise

    def set_desired(self, watcher: Watcher, desired: str) -> None:
        """Record that a control wants the process ``running`` or ``stopped``.

        Raises:
            StoreError: a new agent would not keep it so (the control was applied).
        """
        try:
            if self._store is not None:
                self._store.set_desired(watcher.spec.slug, desired)
        except StoreError as error:
            failed(watcher, error, f"a new agent would not keep it {desired}")
            raise

    def remember_child(self, watcher: Watcher, old: ProcessState, new: ProcessState) -> None:
        """Write each new child's pid and start time, so a later agent can tell it apart
        (a watcher's listener; it never raises: a later agent still finds the child by
        the agent's id)."""
        pid, store = watcher.pid, self._store
        try:
            if store is not None and new is ProcessState.RUNNING and pid is not None:
                store.set_child(watcher.spec.slug, pid, start_time(pid), watcher.restarts)
            elif store is not None and new is ProcessState.BACKOFF:  # restart counted first
                store.set_child(watcher.spec.slug, None, None, watcher.restarts)
        except StoreError as error:
            failed(watcher, error, "its current child is not recorded")

    def reserve_seq(self, slug: str, mark: int) -> None:
        """Record the mark below which the output lines of ``slug`` may be numbered."""
        if self._store is None:
            return
        try:
            self._store.set_seq_reserved(slug, mark)
        except StoreError as error:
            log.warning("%s: %s (output line numbers may repeat after a crash)", slug, error)


def failed(watcher: Watcher, error: StoreError, consequence: str) -> None:
    """Say in the agent's log and in the process's ``error`` that a write of the state
    database failed, and what follows from it."""
    watcher.error = f"{error} ({consequence})"
    log.error("%s: %s", watcher.spec.slug, watcher.error)
