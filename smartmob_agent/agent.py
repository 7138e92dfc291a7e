"""The registry of every process on this machine: the only object the web layer uses.

:class:`Agent` creates, lists, finds, controls and deletes
:class:`~smartmob_agent.watcher.Watcher` objects, owns what they share (the HTTP client
session, the reaper, the state folder, the ports, the tree monitor, the event bus and
the webhooks) and stops them all on shutdown.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import os
import shutil
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Set
from pathlib import Path
from typing import Any

import aiohttp

from smartmob_agent import archive
from smartmob_agent.child import Reaper, start_time, stop_marked, stop_survivor
from smartmob_agent.config import Settings
from smartmob_agent.errors import AgentError, Conflict, NotFound
from smartmob_agent.events import EventBus, make_event
from smartmob_agent.model import ProcessInfo, ProcessState, Spec
from smartmob_agent.monitor import Monitor
from smartmob_agent.ports import PortAllocator
from smartmob_agent.representations import request_document
from smartmob_agent.schemas import create_request, spec_from_request
from smartmob_agent.sources import SourceCache, cache_key
from smartmob_agent.store import Record, Store, StoreError
from smartmob_agent.watcher import Runtime, Watcher
from smartmob_agent.webhooks import Webhooks

log = logging.getLogger(__name__)

#: Set in every child's environment; the guardian finds the agent's descendants by it.
AGENT_ID_VARIABLE = "SMARTMOB_AGENT_ID"
#: The agent's own secrets (webhook URLs often carry tokens): never passed on to children.
SECRET_VARIABLES = frozenset({"SMARTMOB_WEBHOOK_SECRET", "SMARTMOB_WEBHOOK"})
#: How long a shutdown gives the webhooks to deliver the last events.
WEBHOOK_GRACE = 2.0
#: The bulk actions, by the name the API uses.
BULK_ACTIONS = ("start", "stop", "restart", "delete")


class Agent:
    """All processes of this agent.

    Use as ``async with Agent(settings) as agent:``, or call :meth:`start` and
    :meth:`close`.

    Args:
        settings: configuration (state folder, stop timeout, download limits).
        reaper: reaps children; the CLI passes one that also reaps orphans.
        base_env: the environment children start from (default: the agent's own).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        reaper: Reaper | None = None,
        base_env: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.id = uuid.uuid4().hex
        self.reaper = reaper or Reaper()
        environ = os.environ if base_env is None else base_env
        self._base_env = {k: v for k, v in environ.items() if k not in SECRET_VARIABLES}
        self._watchers: dict[str, Watcher] = {}
        self._deletions: dict[Watcher, asyncio.Task[None]] = {}
        self.store: Store | None = None
        self._session: aiohttp.ClientSession | None = None
        self._webhook_session: aiohttp.ClientSession | None = None
        self._runtime: Runtime | None = None
        #: the downloaded source archives, shared by every process (see :mod:`.sources`)
        self.sources: SourceCache | None = None
        self.ports = PortAllocator()
        self.monitor = Monitor(settings.monitor_interval)
        #: every lifecycle event of every process (see :mod:`smartmob_agent.events`)
        self.events = EventBus()
        self.webhooks: Webhooks | None = None

    @property
    def processes_dir(self) -> Path:
        """Folder holding one work folder per process."""
        return self.settings.state_dir / "processes"

    @property
    def logs_dir(self) -> Path:
        """Folder holding one folder of output log files per process."""
        return self.settings.state_dir / "logs"

    @property
    def cache_dir(self) -> Path:
        """Folder holding the downloaded source archives."""
        return self.settings.state_dir / "cache"

    async def start(self) -> None:
        """Prepare the state folder and the HTTP clients, and bring back every process the
        state database holds.

        Raises:
            StoreError: the state database cannot be used (the message says what to do).
            OSError: the state folder cannot be created.
        """
        self.processes_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store.open(self.settings.state_dir)
        self._session = aiohttp.ClientSession(auto_decompress=True)
        limits = archive.DownloadLimits(
            max_bytes=self.settings.max_download,
            stall=self.settings.download_stall,
            total=self.settings.download_timeout,
        )
        self.sources = SourceCache(self.cache_dir, self._session, limits)
        self._runtime = Runtime(
            session=self._session,
            reaper=self.reaper,
            base_env=self._base_env,
            forced_env={AGENT_ID_VARIABLE: self.id},
            limits=limits,
            stop_timeout=self.settings.stop_timeout,
            monitor=self.monitor,
            emit=self._emit,
            sources=self.sources,
            logs_dir=self.logs_dir if self.settings.log_max_bytes > 0 else None,
            log_lines=self.settings.log_lines,
            log_max_bytes=self.settings.log_max_bytes,
            log_files=self.settings.log_files,
        )
        self.monitor.start()
        secret = self.settings.webhook_secret
        # a session of their own: hanging receivers must not take the connections that
        # downloads and health probes need
        self._webhook_session = aiohttp.ClientSession()
        self.webhooks = Webhooks(
            self._webhook_session, self.settings.webhook,
            secret=None if secret is None else secret.encode(),
        )
        self.events.add_listener(self._notify)
        try:
            await self._restore()
        except BaseException:
            await self.close()
            raise

    async def _restore(self) -> None:
        """Bring every process of the state database back to its desired state, after
        stopping whatever an earlier agent left running (never two copies)."""
        store = self.store
        assert store is not None, "the store is opened first"
        assert self._runtime is not None, "the runtime is built first"
        records = store.load()
        previous = store.get_value("agent_id")
        store.set_value("agent_id", self.id)
        timeout = self.settings.stop_timeout
        if previous is not None:
            # everything the earlier agent started carries its id, wherever it went
            left = await stop_marked(f"{AGENT_ID_VARIABLE}={previous}", timeout)
            if left:
                log.warning("stopped %d process(es) left running by the previous agent", left)
        survivors = await asyncio.gather(*(
            stop_survivor(r.pid, r.pid_started, timeout)
            for r in records if r.pid is not None and r.pid_started is not None
        ))
        if any(survivors):
            log.warning("stopped %d child(ren) of the previous agent found by pid and "
                        "start time", sum(survivors))
        # a delete cut short by a crash (its row goes first) leaves the process's folders,
        # which no later agent would know of: remove them, now that nothing runs there
        known = {record.slug for record in records}
        try:
            removed = await asyncio.to_thread(
                _remove_unknown, (self.processes_dir, self.logs_dir), known)
        except OSError as error:
            log.warning("could not clean the folders of deleted processes: %s", error)
        else:
            if removed:
                log.info("removed the folders of %d deleted process(es)", removed)
        for record in records:
            try:
                spec = spec_from_request(create_request.validate(record.request))
            except AgentError as error:
                raise StoreError(
                    f"the state database {store.path} holds a request for "
                    f"{record.slug!r} this agent cannot read ({error}): start the agent "
                    "that wrote it, or move the database aside"
                ) from None
            if record.port is not None:
                self.ports.reserve(spec.slug, record.port)
            watcher = Watcher(
                spec, self.processes_dir / spec.slug, self._runtime, None, record.port,
                process_id=record.process_id, stopped=record.desired == "stopped",
                reuse_source=True, restarts=record.restarts,
            )
            self._register(watcher)
        if records:
            log.info("brought back %d process(es) from %s", len(records), store.path)
        self._collect_sources()

    def _register(self, watcher: Watcher) -> None:
        self._watchers[watcher.spec.slug] = watcher
        watcher.add_listener(self._remember_child)
        watcher.start()

    def _remember_child(self, watcher: Watcher, old: ProcessState, new: ProcessState) -> None:
        """Write each new child's pid and start time, so a later agent can tell it apart."""
        pid = watcher.pid
        if self.store is None:
            return
        if new is ProcessState.RUNNING and pid is not None:
            self.store.set_child(watcher.spec.slug, pid, start_time(pid), watcher.restarts)
        elif new is ProcessState.BACKOFF:  # the restart was counted before the wait
            self.store.set_child(watcher.spec.slug, None, None, watcher.restarts)

    async def close(self) -> None:
        """Stop every process (each with the full stop sequence), then release resources."""
        await self.stop_all()
        for watcher in self._watchers.values():  # the last lines reach the files
            watcher.output_log.close()
        if self.store is not None:
            self.store.close()
            self.store = None
        self.events.close()
        await self.monitor.close()
        if self.webhooks is not None:
            await self.webhooks.close(WEBHOOK_GRACE)
        if self._webhook_session is not None:
            await self._webhook_session.close()
        if self._session is not None:
            await self._session.close()
        self.reaper.close()

    def _emit(self, watcher: Watcher, kind: str, fields: Mapping[str, Any]) -> None:
        spec = watcher.spec
        extra = dict(fields)
        pid = extra.pop("pid", watcher.pid)  # an exit names the child that ended
        self.events.publish(make_event(
            kind, slug=spec.slug, app=spec.app, node=spec.node,
            process_type=spec.process_type, pid=pid, state=watcher.state.value, **extra,
        ))

    def _notify(self, event: Mapping[str, Any]) -> None:
        """Hand an event to the webhooks: the agent's own and the process's ``notify``."""
        if self.webhooks is None:
            return
        watcher = self._watchers.get(event.get("slug", ""))
        extra = watcher.spec.options.notify if watcher is not None else ()
        self.webhooks.submit(event, extra)

    async def __aenter__(self) -> Agent:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- the API's verbs ---------------------------------------------------------------------

    def create(self, spec: Spec, request_id: str | None = None) -> Watcher:
        """Register a process and start provisioning it in the background.

        Raises:
            Conflict: a process with the same slug exists (or is being deleted).
        """
        assert self._runtime is not None, "Agent.start() first"
        slug = spec.slug
        if slug in self._watchers:
            raise Conflict(f"a process named {slug!r} already exists; delete it first")
        assert self.store is not None
        port = self._port_for(spec)
        # a new process starts with no output, whatever a crashed deletion left behind
        shutil.rmtree(self.logs_dir / slug, ignore_errors=True)
        watcher = Watcher(spec, self.processes_dir / slug, self._runtime, request_id, port)
        try:  # on disk before the API answers
            self.store.add(Record(
                slug, request_document(spec),
                "running" if spec.options.autostart else "stopped", watcher.process_id, port,
            ))
        except StoreError:
            self.ports.release(slug)
            raise
        self._register(watcher)
        log.info("%s: created (process type %r)", slug, spec.process_type)
        return watcher

    def _port_for(self, spec: Spec) -> int | None:
        """A free port for ``PORT``, or the one the request's ``env`` sets (if a port)."""
        given = spec.env.get("PORT")
        if given is None:
            return self.ports.allocate(spec.slug)
        # only plain digits: int() would also take " 80", "8_0" and non-ASCII digits
        if not (given.isascii() and given.isdigit()):
            return None  # not a port number: the program's business, not ours
        try:
            self.ports.reserve(spec.slug, int(given))
        except ValueError:  # 0 or above 65535
            return None
        return int(given)

    def get(self, slug: str) -> Watcher:
        """Return the watcher of ``slug``.

        Raises:
            NotFound: no such process.
        """
        try:
            return self._watchers[slug]
        except KeyError:
            raise NotFound(f"there is no process named {slug!r}") from None

    def list(self) -> list[ProcessInfo]:
        """Snapshots of every process, in creation order."""
        return [watcher.info() for watcher in self._watchers.values()]

    def watchers(self) -> builtins.list[Watcher]:
        """Every watcher, in creation order."""
        return list(self._watchers.values())

    async def delete(self, slug: str) -> None:
        """Stop the process, wait until it is gone, remove its files and forget it.

        Raises:
            NotFound: no such process.
        """
        await self._delete(self.get(slug))

    async def _delete(self, watcher: Watcher) -> None:
        """Delete ``watcher``; concurrent deletes of it all wait for the one deletion."""
        deletion = self._deletions.get(watcher)
        if deletion is None:
            deletion = asyncio.get_running_loop().create_task(
                self._forget(watcher), name=f"delete {watcher.spec.slug}"
            )
            self._deletions[watcher] = deletion
            deletion.add_done_callback(lambda _: self._deletions.pop(watcher, None))
        # shielded: a client that goes away must not leave the slug half-deleted
        await asyncio.shield(deletion)

    async def _forget(self, watcher: Watcher) -> None:
        slug = watcher.spec.slug
        try:
            if self.store is not None:  # first: a deleted process never comes back
                self.store.remove(slug)
            await watcher.stop(final=True)
            watcher.close()
            # files go before the name is freed, so a new process of that name starts clean
            await watcher.remove_files()
        finally:  # even if it failed: a slug must never be stuck half-deleted
            if self._watchers.get(slug) is watcher:
                del self._watchers[slug]
                self.ports.release(slug)
                log.info("%s: deleted", slug)
            self._collect_sources()

    def _collect_sources(self) -> None:
        """Remove the cached archives no process uses, but for the last few (rollbacks)."""
        if self.sources is None:
            return
        in_use = {cache_key(w.spec.source_url, w.spec.sha256) for w in self._watchers.values()}
        try:
            self.sources.collect(in_use)
        except OSError as error:  # a full or read-only disk must not fail a delete
            log.warning("could not clean the source cache %s: %s", self.cache_dir, error)

    async def control(self, watcher: Watcher, action: str) -> None:
        """Apply a ``start``, ``stop`` or ``restart`` control and record the process's
        desired state (``stop`` keeps it stopped across agent restarts).

        Raises:
            Conflict: the control makes no sense in the process's state.
        """
        if action == "start":
            await watcher.request_start()
        elif action == "stop":
            await watcher.request_stop()
        elif action == "restart":
            await watcher.request_restart()
        else:
            raise ValueError(f"unknown control {action!r}")
        if self.store is not None and self._watchers.get(watcher.spec.slug) is watcher:
            desired = "stopped" if action == "stop" else "running"
            self.store.set_desired(watcher.spec.slug, desired)

    def select(self, app: str | None) -> builtins.list[Watcher]:
        """Every watcher of ``app`` (of every app for ``None``), in creation order."""
        return [w for w in self._watchers.values() if app is None or w.spec.app == app]

    async def bulk(self, action: str, app: str | None) -> builtins.list[dict[str, Any]]:
        """Apply a control (or delete) to every process of ``app`` (every process for
        ``None``) at once; one process's conflict does not stop the others.

        Returns:
            One outcome per process, in creation order: ``{"slug", "ok"}`` and, when it
            did not apply, ``"error"``.
        """
        watchers = self.select(app)
        actions: dict[str, Callable[[Watcher], Awaitable[None]]] = {
            "start": lambda w: self.control(w, "start"),
            "stop": lambda w: self.control(w, "stop"),
            "restart": lambda w: self.control(w, "restart"),
            "delete": self._delete,
        }
        act = actions[action]
        results = await asyncio.gather(*(act(w) for w in watchers), return_exceptions=True)
        outcomes: builtins.list[dict[str, Any]] = []
        for watcher, result in zip(watchers, results, strict=True):
            outcome: dict[str, Any] = {"slug": watcher.spec.slug, "ok": result is None}
            if isinstance(result, AgentError):
                outcome["error"] = str(result)
            elif isinstance(result, BaseException):
                log.error("%s: %s failed: %r", watcher.spec.slug, action, result)
                outcome["error"] = "internal error of the agent; see its log"
            outcomes.append(outcome)
        return outcomes

    async def stop_all(self) -> None:
        """Stop every process at once and wait until all are gone."""
        watchers = list(self._watchers.values())
        if watchers:
            log.info("stopping %d process(es)", len(watchers))
        results = await asyncio.gather(*(w.stop() for w in watchers), return_exceptions=True)
        for watcher, result in zip(watchers, results, strict=True):
            if isinstance(result, BaseException):
                log.error("%s: stop failed: %r", watcher.spec.slug, result)


def _remove_unknown(parents: Iterable[Path], known: Set[str]) -> int:
    """Remove every folder in ``parents`` not named after a ``known`` slug; return how
    many slugs had one."""
    removed: set[str] = set()
    for parent in parents:
        if not parent.is_dir():
            continue
        for entry in parent.iterdir():
            if entry.name not in known and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
                removed.add(entry.name)
    return len(removed)
