"""Update in place: a new version of a process started beside the old one, then the switch.

An update (or a rollback, an update to the previous version) fetches, unpacks, builds
and releases the new source in a folder of its own (``releases/<id>`` in the process's
work folder) while the old child keeps running. Then, under the watcher's control lock:

1. if the process has a live child, a child of the new version is started beside it
   (its own ``PORT``, or the process's socket) and must stay up for its
   ``start_seconds`` and, when it has a health check, pass one probe within
   :func:`gate_deadline`; else the update fails and the old child runs on, untouched;
2. the state database makes the new version the current one (one statement: request,
   process id, port, child), before anything is stopped;
3. the watcher adopts the new child and stops the old one with its stop signal and timeout.

A process with no live child (stopped, exited, failed, in backoff) gets the new version
installed at once and, unless stopped, started. An agent killed during an update comes
back with exactly one version: the old one if it died before step 2, the new one after;
its ``update_error`` then says the update was cut short.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from smartmob_agent.errors import AgentError, Conflict, InvalidRequest
from smartmob_agent.model import ProcessState, Releases, SourceRef, Spec
from smartmob_agent.processes.ports import PortAllocator
from smartmob_agent.representations import request_document
from smartmob_agent.schemas import create_request, spec_from_request
from smartmob_agent.supervision.failures import failure_reason
from smartmob_agent.supervision.health import HealthCheck, ProbeResult
from smartmob_agent.supervision.provision import (
    DIGEST_FILE,
    PROCESS_ID_VARIABLE,
    UNPACKED_MARK,
    Provisioner,
    Version,
)
from smartmob_agent.supervision.run import Probe, Run, health_probe
from smartmob_agent.supervision.runtime import Runtime
from smartmob_agent.supervision.watcher import Watcher

log = logging.getLogger("smartmob_agent.watcher")  # stable name: updates are the watcher's

S = ProcessState
#: Where the sources of updated versions are unpacked, in a process's work folder.
RELEASES_FOLDER = "releases"
#: States an update waits for the end of (a source being fetched, a stop): refused.
BUSY_STATES = frozenset({S.PENDING, S.DOWNLOADING, S.UNPACKING, S.BUILDING, S.STOPPING})
#: The longest pause between two probes of the health gate.
GATE_PROBE_INTERVAL = 0.25
#: Why an update failed, besides the failure reasons of provisioning
#: (:class:`~smartmob_agent.model.FailureReason`).
UNHEALTHY = "unhealthy"
INTERRUPTED = "interrupted"


class UpdateFailed(AgentError):
    """The new version did not become ready: the old one runs on."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class Journal(Protocol):
    """Where an update is recorded (:class:`~smartmob_agent.supervision.records.Records`)."""

    def releases(self, watcher: Watcher) -> None:
        """Record what the updates of ``watcher`` left (written later if it fails)."""

    def switch(
        self, watcher: Watcher, version: Version, pid: int | None, releases: Releases
    ) -> None:
        """Make ``version`` (its child ``pid``) the current one, with ``releases``
        (raises ``StoreError``: then it is not)."""


def gate_deadline(check: HealthCheck) -> float:
    """How long a new child has to pass its first health probe: as long as a running one
    may fail before it is restarted (``failures`` probes, ``interval`` apart).

    >>> from smartmob_agent.supervision.health import HealthCheck
    >>> from smartmob_agent.supervision.update import gate_deadline
    >>> gate_deadline(HealthCheck(http="/", interval=2, timeout=1, failures=3))
    7.0
    """
    return float(check.interval * check.failures + check.timeout)


class Updater:
    """Updates the processes of one agent in place.

    Args:
        runtime: what every watcher shares.
        ports: the agent's ports (a new version's ``PORT`` is its own until the switch).
        journal: records pending, current and previous versions.
        check: refuses a spec the agent would not create (its source URL, its limits).
    """

    def __init__(
        self, runtime: Runtime, ports: PortAllocator, journal: Journal,
        check: Callable[[Spec], None],
    ) -> None:
        self._runtime = runtime
        self._ports = ports
        self._journal = journal
        self._check = check

    def begin(self, watcher: Watcher, spec: Spec | None) -> None:
        """Start updating ``watcher`` to ``spec`` (``None``: roll back to its previous
        version), in a task of its own.

        Raises:
            Conflict: an update runs already, the process is busy (fetching, stopping),
                or (a rollback) it has no previous version.
            InvalidRequest: the agent would not create ``spec``.
        """
        slug = watcher.spec.slug
        rollback = spec is None
        if spec is None:
            if watcher.releases.previous is None:
                raise Conflict(f"process {slug!r} has no previous version to roll back "
                               "to: it was never updated")
            spec = watcher.releases.previous[0]
        if watcher.updating is not None:
            raise Conflict(f"process {slug!r} is being updated already: wait for the end")
        if watcher.state in BUSY_STATES:
            raise Conflict(f"process {slug!r} is {watcher.state}: update it once it is not")
        spec = _same_socket(watcher.spec, spec)
        self._check(spec)
        releases = watcher.releases
        releases.pending = SourceRef(spec.source_url, spec.sha256, self._runtime.wall_clock(),
                                     "pending")
        self._journal.releases(watcher)
        watcher.updating = asyncio.get_running_loop().create_task(
            self._update(watcher, spec, rollback), name=f"update {slug}")
        self._announce(watcher, "started", None)

    async def _update(self, watcher: Watcher, spec: Spec, rollback: bool) -> None:
        """The update task: provision, gate, switch; a failure leaves the old version."""
        process_id = uuid.uuid4().hex
        folder = f"{RELEASES_FOLDER}/{process_id}"
        owner = f"{spec.slug} (update)"
        new: list[Run] = []  # the new child, until the watcher adopts it
        switched = False
        try:
            port = self._port(spec, owner)
            await _remove_stale(watcher.workdir, watcher.releases.folder)
            version = await self._provision(watcher, spec, folder, process_id, port)
            async with watcher.controlled():
                run = await self._start(watcher, version, new)
                old_folder = watcher.releases.folder
                self._switch(watcher, version, folder, run)
                switched = True
                new.clear()
                await watcher.adopt(version, run)
            if port is None:
                self._ports.release(spec.slug)
            else:
                self._ports.reserve(spec.slug, port)
            await _remove_source(watcher.workdir, old_folder)
        except BaseException as error:
            if not switched:
                await _discard(new, process_id, spec, self._runtime)
                await asyncio.to_thread(shutil.rmtree, watcher.workdir / folder, True)
            if isinstance(error, Exception):
                self._failed(watcher, error)
            watcher.releases.pending = None
            self._journal.releases(watcher)
            if not isinstance(error, Exception):
                raise
        else:
            watcher.releases.pending = None
            self._announce(watcher, "rolled back" if rollback else "succeeded", None)
        finally:
            self._ports.release(owner)
            if watcher.updating is asyncio.current_task():
                watcher.updating = None

    def _port(self, spec: Spec, owner: str) -> int | None:
        """The ``PORT`` of the new version: the request's own if it sets one (a number),
        else a free one of its own until the switch."""
        if spec.options.socket is not None:  # the socket's, shared by both children
            return spec.options.socket.port
        given = spec.env.get("PORT")
        if given is None:
            return self._ports.allocate(owner)
        return int(given) if given.isascii() and given.isdigit() and 0 < int(given) < 65536 \
            else None

    async def _provision(
        self, watcher: Watcher, spec: Spec, folder: str, process_id: str, port: int | None
    ) -> Version:
        """Fetch, unpack, build and release the new source in ``folder``."""
        pending = watcher.releases.pending

        def step(state: ProcessState) -> None:
            if pending is not None:
                watcher.releases.pending = SourceRef(pending.url, pending.sha256,
                                                     pending.since, state.value)

        source = Provisioner(spec, watcher.workdir / folder, self._runtime, step,
                             watcher.output.write, process_id=process_id, port=port)
        command = await source.provision()
        return Version(spec, source, command, process_id, port)

    async def _start(self, watcher: Watcher, version: Version, new: list[Run]) -> Run | None:
        """Start a child of ``version`` beside the live one (kept in ``new``) and wait
        until it is ready; ``None`` if the process has no live child to keep serving.

        Raises:
            UpdateFailed: it exited, or did not pass its health check in time.
        """
        if watcher.state is not S.RUNNING or watcher.pid is None:
            return None
        step(watcher, "starting")
        run = watcher.spawn(version)
        new.append(run)
        await _gate(run, version, self._runtime)
        return run

    def _switch(self, watcher: Watcher, version: Version, folder: str, run: Run | None) -> None:
        """Record the new version as the current one, then make it so in memory.

        Raises:
            StoreError: it could not be recorded (the update fails; nothing changed).
        """
        before = watcher.releases
        after = Releases(since=self._runtime.wall_clock(), folder=folder,
                         previous=(watcher.spec, before.since))
        self._journal.switch(watcher, version, None if run is None else run.child.pid, after)
        # pending until the update ends (the old child stopped): the next may begin then
        pending = before.pending
        watcher.releases = dataclasses.replace(after, pending=None if pending is None else
                                               dataclasses.replace(pending, step="stopping"))

    def _announce(self, watcher: Watcher, outcome: str, error: str | None) -> None:
        """Publish a ``process:update`` event."""
        if self._runtime.emit is not None:
            pending = watcher.releases.pending
            url = watcher.spec.source_url if pending is None else pending.url
            self._runtime.emit(watcher, "process:update", {
                "outcome": outcome, "source_url": url, "error": error,
                "reason": None if watcher.reason is None else watcher.reason.value})

    def _failed(self, watcher: Watcher, error: Exception) -> None:
        """Say why the update failed, in the status document, the log and an event."""
        if isinstance(error, UpdateFailed):
            reason = error.reason
        elif isinstance(error, AgentError):
            reason = failure_reason(error).value
        else:  # a bug: the old version runs on all the same
            log.error("%s: the update failed", watcher.spec.slug, exc_info=error)
            reason = "internal error"
        pending = watcher.releases.pending
        target = "" if pending is None else f" to {pending.url}"
        watcher.releases.error = f"the update{target} failed: {error}"
        watcher.releases.reason = reason
        log.warning("%s: %s", watcher.spec.slug, watcher.releases.error)
        self._announce(watcher, "failed", watcher.releases.error)


def _same_socket(current: Spec, new: Spec) -> Spec:
    """``new`` with the socket of ``current``: the socket belongs to the process, and
    stays open from one version to the next (``options.socket`` may repeat it, or be
    left out).

    Raises:
        InvalidRequest: ``options.socket`` asks for another one.
    """
    held, asked = current.options.socket, new.options.socket
    if asked is not None and asked != held and not (
        held is not None and asked.port is None
        and (asked.host, asked.backlog) == (held.host, held.backlog)
    ):
        raise InvalidRequest(
            "an update cannot change the process's socket (it stays open across versions): "
            "leave options.socket out, or delete the process and create it again",
            {"options.socket": "must be left out, or be the process's socket"},
        )
    return dataclasses.replace(new, options=dataclasses.replace(new.options, socket=held))


def step(watcher: Watcher, name: str) -> None:
    """Show the step the pending update is at (``starting``...)."""
    pending = watcher.releases.pending
    if pending is not None:
        watcher.releases.pending = SourceRef(pending.url, pending.sha256, pending.since, name)


async def _gate(run: Run, version: Version, runtime: Runtime) -> None:
    """Wait until the new child has run for its ``start_seconds`` and, when it has a
    health check, passed one probe (of its own ``PORT``, or its command).

    Raises:
        UpdateFailed: it exited first, or no probe passed within :func:`gate_deadline`.
    """
    options = version.spec.options
    exited = asyncio.ensure_future(run.child.wait())
    try:
        done, _ = await asyncio.wait({exited}, timeout=options.start_seconds)
        if not done and options.health is not None:
            check = HealthCheck.from_json(options.health)
            probe = health_probe(check, version.command, runtime,
                                 run.probe_port or version.port, options)
            last = await _probe_until(probe, exited, gate_deadline(check))
            if not last.healthy and not exited.done():
                raise UpdateFailed(
                    f"the new child (pid {run.child.pid}) did not pass its health check "
                    f"within {gate_deadline(check):g} s: {last.detail}", UNHEALTHY)
        if exited.done():
            raise UpdateFailed(
                f"the new child (pid {run.child.pid}) {exited.result().describe()} before "
                f"it was ready (start_seconds {options.start_seconds:g})", "start failure")
    finally:
        exited.cancel()


async def _probe_until(
    probe: Probe, exited: asyncio.Future[Any], deadline: float
) -> ProbeResult:
    """Probe until one probe passes, the child exits or ``deadline`` seconds pass."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    last = ProbeResult(False, "no probe was made")
    while not exited.done() and loop.time() < end:
        try:
            async with asyncio.timeout_at(end):
                last = await probe()
        except TimeoutError:
            break
        if last.healthy:
            return last
        await asyncio.wait({exited}, timeout=min(GATE_PROBE_INTERVAL, end - loop.time()))
    return last


async def _discard(new: list[Run], process_id: str, spec: Spec, runtime: Runtime) -> None:
    """Stop the new child of a failed update, if it started, and whatever it started
    (found by its marker), with its stop signal and timeout."""
    options = spec.options
    timeout = runtime.stop_timeout if options.stop_timeout is None else options.stop_timeout
    for run in new:
        await run.stop(options.signal_number, timeout, f"{PROCESS_ID_VARIABLE}={process_id}",
                       lambda exit: None)


async def _remove_source(workdir: Path, folder: str) -> None:
    """Remove the source of a version that is no longer current."""
    if folder:
        await asyncio.to_thread(shutil.rmtree, workdir / folder, True)
        return

    def remove_base() -> None:  # the first version's, in the work folder itself
        shutil.rmtree(workdir / "source", ignore_errors=True)
        for name in (UNPACKED_MARK, DIGEST_FILE):
            (workdir / name).unlink(missing_ok=True)

    await asyncio.to_thread(remove_base)


async def _remove_stale(workdir: Path, current: str) -> None:
    """Remove the folders of updates an earlier agent did not finish."""

    def remove() -> None:
        folder = workdir / RELEASES_FOLDER
        if folder.is_dir():
            for entry in folder.iterdir():
                if f"{RELEASES_FOLDER}/{entry.name}" != current:
                    shutil.rmtree(entry, ignore_errors=True)

    await asyncio.to_thread(remove)


def releases_json(releases: Releases) -> dict[str, Any]:
    """What the state database keeps of ``releases`` (see :func:`releases_from_json`)."""
    pending, previous = releases.pending, releases.previous
    return {
        "since": releases.since, "folder": releases.folder,
        "pending": None if pending is None else {
            "url": pending.url, "sha256": pending.sha256, "since": pending.since},
        "previous": None if previous is None else {
            "request": request_document(previous[0]), "since": previous[1]},
        "error": releases.error, "reason": releases.reason,
    }


def releases_from_json(data: Mapping[str, Any], now: float) -> Releases:
    """The releases an earlier agent recorded; an update it did not finish is said in
    ``error`` (its folder is removed by the next update). What cannot be read is
    forgotten (said in the log): a history is not worth refusing to start over."""
    releases = Releases(since=float(data.get("since", now)), folder=str(data.get("folder", "")),
                        error=data.get("error"), reason=data.get("reason"))
    previous = data.get("previous")
    if previous:
        try:
            spec = spec_from_request(create_request.validate(previous["request"]))
            releases.previous = (spec, float(previous["since"]))
        except (AgentError, KeyError, TypeError, ValueError) as error:
            log.warning("the previous version of a process cannot be read back (%s): it "
                        "is forgotten", error)
    pending = data.get("pending")
    if pending:
        releases.error = (f"the update to {pending.get('url')} was cut short: the agent "
                          "stopped before it was done, and the version before it runs")
        releases.reason = INTERRUPTED
    return releases
