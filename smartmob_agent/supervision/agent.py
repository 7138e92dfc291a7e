"""The registry of every process on this machine: the only object the web layer uses.

:class:`Agent` creates, lists, finds, controls and deletes
:class:`~smartmob_agent.supervision.watcher.Watcher` objects, owns what they share (the HTTP client
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
from collections.abc import AsyncIterable, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp

from smartmob_agent.config import Settings
from smartmob_agent.errors import AgentError, Conflict, InvalidRequest, NotFound
from smartmob_agent.events.bus import EventBus, EventKind, ProcessEvent, make_event
from smartmob_agent.events.webhooks import Webhooks
from smartmob_agent.keys import Keyring, MintedKey
from smartmob_agent.model import ProcessInfo, ProcessState, Spec
from smartmob_agent.output import logrecords
from smartmob_agent.output.logs import LogHandler, ProcessLog
from smartmob_agent.processes.monitor import Monitor
from smartmob_agent.processes.ports import PortAllocator
from smartmob_agent.processes.reaper import Reaper
from smartmob_agent.processes.sockets import listen_again, listen_for
from smartmob_agent.processes.spawn import hard_limits
from smartmob_agent.processes.stop import one_scan
from smartmob_agent.processes.users import resolve_run_as
from smartmob_agent.schemas import check_rlimits
from smartmob_agent.sources import download
from smartmob_agent.sources.builds import Builds
from smartmob_agent.sources.cache import SourceCache, Stored, cache_key
from smartmob_agent.store import Store, StoreError, prepare_state_dir
from smartmob_agent.supervision import tokens
from smartmob_agent.supervision.limits import (
    NOTIFY_POLICY,
    check_notify,
    download_limits,
    fetch_policy,
    unpack_limits,
)
from smartmob_agent.supervision.records import Records
from smartmob_agent.supervision.runtime import Runtime
from smartmob_agent.supervision.startup import AGENT_ID_VARIABLE as AGENT_ID_VARIABLE
from smartmob_agent.supervision.startup import check_reachable, resumed, take_over

# re-exported: the CLI and the tests name it from here
from smartmob_agent.supervision.update import Updater
from smartmob_agent.supervision.uploads import check_upload_size, collect_unused, find_upload
from smartmob_agent.supervision.watcher import Watcher

log = logging.getLogger("smartmob_agent.agent")  # stable name: internals.rst

#: The agent's own secrets (webhook URLs often carry tokens): never passed on to children.
SECRET_VARIABLES = frozenset({
    "SMARTMOB_WEBHOOK_SECRET", "SMARTMOB_WEBHOOK", "SMARTMOB_TOKEN", "SMARTMOB_APP_TOKEN",
})
#: The key (in the state database) of the mark the agent's own log is numbered up to.
AGENT_LOG_SEQ_KEY = "agent_log_seq_reserved"
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

    Raises:
        InvalidRequest: a key file of the settings cannot be read or holds a bad line;
            :option:`--user` or :option:`--group` cannot be used (see
            :func:`~smartmob_agent.processes.users.resolve_run_as`).
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
        #: the user the children run as (:option:`--user`), ``None``: the agent's own
        self.run_as = resolve_run_as(settings.user, settings.group)
        if self.run_as is not None:  # not root's HOME: a layer above may still set them
            self._base_env.update(self.run_as.environment())
        self._watchers: dict[str, Watcher] = {}
        self._deletions: dict[Watcher, asyncio.Task[None]] = {}
        self.store: Store | None = None
        self._records: Records | None = None
        self._session: aiohttp.ClientSession | None = None
        self._webhook_session: aiohttp.ClientSession | None = None
        self._runtime: Runtime | None = None
        self._updates: Updater | None = None
        #: the downloaded source archives, shared by every process (a
        #: :class:`~smartmob_agent.sources.cache.SourceCache`)
        self.sources: SourceCache | None = None
        #: the builds of sources (virtual environments, releases; a
        #: :class:`~smartmob_agent.sources.builds.Builds`)
        self.builds: Builds | None = None
        self.ports = PortAllocator()
        self.monitor = Monitor(settings.monitor_interval)
        #: every lifecycle event of every process (see :mod:`smartmob_agent.events.bus`)
        self.events = EventBus()
        self.webhooks: Webhooks | None = None
        #: which source URLs may be fetched, and where from (see :mod:`.fetchpolicy`)
        self.fetch_policy = fetch_policy(settings)
        #: the keys that open the API; minted ones are added from the database at start
        self.keyring = Keyring(*tokens.configured_keys(settings))
        #: the agent's own log (what it writes to stderr), kept from start to close
        self.agent_log = ProcessLog(None, lines=settings.log_lines)
        self._log_handler: LogHandler | None = None
        self._state_records = logrecords.StateRecords()

    @property
    def processes_dir(self) -> Path:
        """Folder holding one work folder per process."""
        return self.settings.state_dir / "processes"

    @property
    def logs_dir(self) -> Path:
        """Folder holding one folder of output log files per process."""
        return self.settings.state_dir / "logs"

    @property
    def agent_log_dir(self) -> Path:
        """Folder holding the agent's own log files (beside ``logs``, whose every folder
        is a process's)."""
        return self.settings.state_dir / "agent-log"

    @property
    def cache_dir(self) -> Path:
        """Folder holding the downloaded source archives."""
        return self.settings.state_dir / "cache"

    @property
    def builds_dir(self) -> Path:
        """Folder holding the builds of sources (see :ref:`lifecycle-build`)."""
        return self.settings.state_dir / "builds"

    async def start(self) -> None:
        """Prepare the state folder and the HTTP clients, and bring back every process the
        state database holds.

        Raises:
            StoreError: the state database cannot be used (the message says what to do).
            OSError: the state folder cannot be created.
            AgentError: the children's user (:option:`--user`) cannot reach it.
        """
        # 0700 (0711 for the children's user), however it came to be: it holds secrets
        prepare_state_dir(self.settings.state_dir, shared=self.run_as is not None,
                          private=(self.logs_dir, self.agent_log_dir, self.cache_dir))
        self.processes_dir.mkdir(exist_ok=True)
        if self.run_as is not None:
            self.builds_dir.mkdir(parents=True, exist_ok=True)
            check_reachable((self.processes_dir, self.builds_dir), self.run_as)
        self.store = Store.open(self.settings.state_dir)
        self._records = Records(self.store)
        self._runtime = self._make_runtime()
        self._updates = Updater(self._runtime, self.ports, self._records, self._check_spec)
        self.monitor.start()
        secret = self.settings.webhook_secret
        # a session of their own: hanging receivers must not take the connections that
        # downloads and health probes need; guarded like downloads, since a create
        # request's notify URLs are as much a way to reach metadata services (SSRF)
        self._webhook_session = download.open_session(NOTIFY_POLICY)
        self.webhooks = Webhooks(
            self._webhook_session, self.settings.webhook,
            secret=None if secret is None else secret.encode(),
        )
        self.events.add_listener(self._notify)
        self.events.add_listener(self._log_state)
        for key in self.store.load_keys():
            self.keyring.add_minted(key)
        self._open_agent_log(self.store)
        try:
            await self._restore()
        except BaseException:
            await self.close()
            raise

    def _make_runtime(self) -> Runtime:
        """Open the HTTP session of downloads and probes, the source cache and the builds,
        and gather them with the settings into what every watcher shares."""
        settings = self.settings
        assert self._records is not None, "the store is opened first"
        # connects only to addresses the policy allows, whatever a name resolves to
        self._session = download.open_session(self.fetch_policy)
        self.sources = SourceCache(
            self.cache_dir, self._session, download_limits(settings), policy=self.fetch_policy
        )
        self.builds = Builds(
            self.builds_dir, self.reaper, timeout=settings.build_timeout,
            stop_timeout=settings.stop_timeout, run_as=self.run_as,
        )
        return Runtime(
            session=self._session, reaper=self.reaper, base_env=self._base_env,
            sources=self.sources, builds=self.builds, forced_env={AGENT_ID_VARIABLE: self.id},
            unpack_limits=unpack_limits(settings), stop_timeout=settings.stop_timeout,
            monitor=self.monitor, emit=self._emit,
            logs_dir=self.logs_dir if settings.log_max_bytes > 0 else None,
            log_lines=settings.log_lines, log_max_bytes=settings.log_max_bytes,
            log_files=settings.log_files, reserve_seq=self._records.reserve_seq,
            run_as=self.run_as,
        )

    async def _restore(self) -> None:
        """Bring every process of the state database back to its desired state, after
        stopping whatever an earlier agent left running (never two copies)."""
        store, runtime = self.store, self._runtime
        assert store is not None, "the store is opened first"
        assert runtime is not None, "the runtime is built first"
        records = await take_over(
            store, self.id, self.settings.stop_timeout, (self.processes_dir, self.logs_dir)
        )
        assert self._records is not None
        for record in records:
            spec, past = resumed(record, store.path)
            spec, listener = listen_again(spec)
            if record.port is not None:
                self.ports.reserve(spec.slug, record.port)
            self._records.known(record)
            self._register(Watcher(spec, self.processes_dir / spec.slug, runtime, None,
                                   record.port, resumed=past, listener=listener))
        if records:
            log.info("brought back %d process(es) from %s", len(records), store.path)
        self._collect_sources()

    def _register(self, watcher: Watcher, *, created: bool = False) -> None:
        """Make ``watcher`` one of the agent's and start it; ``created``: by a create
        request, which is published (``process:create``) before its first change."""
        assert self._records is not None, "Agent.start() first"
        self._watchers[watcher.spec.slug] = watcher
        watcher.add_listener(self._records.remember_child)
        if created:  # registered first: its notify URLs get it too
            self._emit(watcher, "process:create", {})
        watcher.start()

    def _open_agent_log(self, store: Store) -> None:
        """Keep what the agent logs, from now to :meth:`close`, in :attr:`agent_log`."""
        settings = self.settings

        def reserve(mark: int) -> None:
            if self._records is not None:
                self._records.set_value(AGENT_LOG_SEQ_KEY, str(mark))

        self.agent_log = ProcessLog(
            self.agent_log_dir if settings.log_max_bytes > 0 else None,
            lines=settings.log_lines, max_bytes=max(1, settings.log_max_bytes),
            files=settings.log_files, first_seq=int(store.get_value(AGENT_LOG_SEQ_KEY) or 0),
            reserve=reserve,
        )
        self._log_handler = LogHandler(self.agent_log, formatter=logrecords.formatter(
            settings.log_format, utc=settings.utc, agent_log=True))
        logging.getLogger().addHandler(self._log_handler)

    def _close_agent_log(self) -> None:
        handler, self._log_handler = self._log_handler, None
        if handler is not None:
            logging.getLogger().removeHandler(handler)
        self.agent_log.close()

    async def close(self) -> None:
        """Stop every process (each with the full stop sequence), then release resources."""
        await self.stop_all()
        for watcher in self._watchers.values():  # the last lines reach the files
            watcher.output_log.close()
            if watcher.listener is not None:  # no child left to pass it to
                watcher.listener.close()
        self._close_agent_log()
        if self._records is not None:
            self._records.close()
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

    def _emit(self, watcher: Watcher, kind: EventKind, fields: Mapping[str, Any]) -> None:
        if kind == "process:exit" and self._records is not None:
            # the exit is in watcher.exits already: a later agent shows it too
            self._records.record_exits(watcher)
        spec = watcher.spec
        extra = dict(fields)
        pid = extra.pop("pid", watcher.pid)  # an exit names the child that ended
        self.events.publish(make_event(
            kind, slug=spec.slug, app=spec.app, node=spec.node,
            process_type=spec.process_type, pid=pid, state=watcher.state.value, **extra,
        ))

    def _log_state(self, event: ProcessEvent) -> None:
        """Log each state change as a ``process.state`` record (with why it failed)."""
        if event["event"] == "process:state":
            watcher = self._watchers.get(event["slug"])
            error = watcher.error if watcher is not None and event["reason"] else None
            self._state_records.changed(
                event["slug"], event["previous"], event["state"], event["reason"], error)

    def _notify(self, event: ProcessEvent) -> None:
        """Hand an event to the webhooks: the agent's own and the process's ``notify``."""
        if self.webhooks is None:
            return
        watcher = self._watchers.get(event["slug"])
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
            InvalidRequest: the fetch policy refuses the source URL (as far as the URL
                alone says), unless the ``checksum`` names an archive the agent already
                holds (an upload): that one is used without a request. A resource limit
                (``rlimits``) is above the agent's own hard limit.
        """
        assert self._runtime is not None, "Agent.start() first"
        slug = spec.slug
        if slug in self._watchers:
            raise Conflict(f"a process named {slug!r} already exists; delete it first")
        self._check_spec(spec)
        assert self._records is not None
        spec, listener = listen_for(spec)  # the port a socket got is the one recorded
        port = self._port_for(spec)
        # a new process starts with no output, whatever a crashed deletion left behind
        shutil.rmtree(self.logs_dir / slug, ignore_errors=True)
        watcher = Watcher(spec, self.processes_dir / slug, self._runtime, request_id, port,
                          listener=listener)
        try:  # on disk before the API answers
            self._records.add(watcher)
        except StoreError:
            self.ports.release(slug)
            watcher.close()
            raise
        self._register(watcher, created=True)
        logrecords.event(log, "process.create", f"{slug}: created (process type "
                      f"{spec.process_type!r})", slug=slug, app=spec.app, node=spec.node,
                      process_type=spec.process_type)
        return watcher

    def update(self, watcher: Watcher, spec: Spec | None = None) -> None:
        """Update ``watcher`` to ``spec`` (``None``: roll back): see :class:`.Updater`."""
        assert self._updates is not None, "Agent.start() first"
        self._updates.begin(watcher, spec)

    def _check_spec(self, spec: Spec) -> None:
        """Refuse what :meth:`create` refuses of a spec (its source, notify, limits)."""
        self._check_source(spec)
        check_notify(spec)
        check_rlimits(spec.options, hard_limits())

    def _check_source(self, spec: Spec) -> None:
        """Refuse a source URL the fetch policy refuses, unless no fetch is needed."""
        assert self.sources is not None, "Agent.start() first"
        problem = self.fetch_policy.check_url(spec.source_url)
        if problem is None:
            return
        if spec.sha256 is not None and self.sources.path(
            cache_key(spec.source_url, spec.sha256)
        ).is_file():
            return
        raise InvalidRequest(
            f"the source_url is refused: {problem}", {"source_url": f"is refused: {problem}"}
        )

    def _port_for(self, spec: Spec) -> int | None:
        """A free port for ``PORT``, or the one the request's ``env`` sets (if a port)."""
        given = spec.env.get("PORT")
        if spec.options.socket is not None and spec.options.socket.port is not None:
            given = str(spec.options.socket.port)  # the socket's port, whatever env says
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

    def mint_key(self, app: str) -> tuple[MintedKey, str]:
        """Make a new key scoped to ``app``; return it with its secret, which is shown
        once and kept nowhere (the database holds its digest)."""
        assert self.store is not None, "the agent is not started"
        return tokens.mint(self.store, self.keyring, app)

    def revoke_key(self, key_id: str) -> None:
        """Stop accepting the minted key ``key_id``, for good.

        Raises:
            NotFound: no minted key has that id.
        """
        assert self.store is not None, "the agent is not started"
        tokens.revoke(self.store, self.keyring, key_id)

    def get(self, slug: str, app: str | None = None) -> Watcher:
        """Return the watcher of ``slug``.

        Args:
            app: find only a process of this app (what a key scoped to one app sees:
                the others do not exist for it, so their names do not leak).

        Raises:
            NotFound: no such process (of ``app``).
        """
        watcher = self._watchers.get(slug)
        if watcher is None or (app is not None and watcher.spec.app != app):
            raise NotFound(f"there is no process named {slug!r}")
        return watcher

    def list(self, app: str | None = None) -> list[ProcessInfo]:
        """Snapshots of every process (of ``app`` if given), in creation order."""
        return [watcher.info() for watcher in self.select(app)]

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
        if self._records is not None:  # first: a deleted process never comes back
            self._records.remove(watcher)  # if it fails, nothing is done: it runs on
        try:
            await watcher.stop(final=True)
            watcher.close()
            # files go before the name is freed, so a new process of that name starts clean
            await watcher.remove_files()
        finally:  # even if it failed: a slug must never be stuck half-deleted
            if self._watchers.get(slug) is watcher:
                self._emit(watcher, "process:delete", {})  # still registered: notify gets it
                del self._watchers[slug]
                self.ports.release(slug)
                logrecords.event(log, "process.delete", f"{slug}: deleted", slug=slug)
                self._state_records.forget(slug)
            self._collect_sources()

    def _collect_sources(self) -> None:
        """Remove the cached archives and builds no process uses (see
        :func:`~smartmob_agent.supervision.uploads.collect_unused`)."""
        if self.sources is not None and self.builds is not None:
            collect_unused(self.sources, self.builds, self._watchers.values())

    async def upload(self, chunks: AsyncIterable[bytes], length: int | None = None) -> Stored:
        """Keep an uploaded source archive in the source cache, under its SHA-256 (see
        :meth:`.SourceCache.put`), then collect the cache as a delete does.

        The limit is ``--max-download``: an upload lands in the same cache and is
        unpacked the same way as a download, so one bound on what a source may weigh
        serves both. ``length`` is the size the client announced, if it did: over the
        limit, nothing is read.

        Raises:
            TooLarge: over the limit.
            ArchiveError: not a zip or tar archive.
            StorageError: the state folder cannot take it.
        """
        assert self.sources is not None, "Agent.start() first"
        check_upload_size(length, self.settings.max_download)
        stored = await self.sources.put(chunks, max_bytes=self.settings.max_download)
        # the new upload is the most recently used entry: it is kept, an older one may go
        self._collect_sources()
        return stored

    def uploaded_source(self, sha256: str) -> Path:
        """The file of the uploaded archive of SHA-256 ``sha256`` (hex, either case).

        Raises:
            NotFound: no upload has it (never uploaded, collected, or not a SHA-256).
        """
        return find_upload(self.sources, sha256)

    async def control(self, watcher: Watcher, action: str) -> None:
        """Record the process's desired state (``stop`` keeps it stopped across agent
        restarts), then apply a ``start``, ``stop`` or ``restart`` control.

        A control that changes whether the process should run is recorded first: if that
        cannot be written, the control is not applied (a new agent would undo it). One
        that changes nothing there (a restart of a running process) writes nothing.

        Raises:
            Conflict: the control makes no sense in the process's state.
            StoreError: it could not be recorded, and is not applied.
        """
        controls = {"start": watcher.request_start, "stop": watcher.request_stop,
                    "restart": watcher.request_restart}
        if action not in controls:
            raise ValueError(f"unknown control {action!r}")
        desired = "stopped" if action == "stop" else "running"
        # raises if it cannot be written: then nothing is done
        undo = None if self._records is None else self._records.intend(watcher, desired)
        try:
            await controls[action]()
        except Conflict:
            if undo is not None and self._watchers.get(watcher.spec.slug) is watcher:
                undo()  # not applied: it stays as it was, and so does its row
            raise

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
            elif isinstance(result, BaseException):  # a bug: its traceback goes to the log
                log.error("%s: %s failed: %r", watcher.spec.slug, action, result,
                          exc_info=result)
                outcome["error"] = "internal error of the agent; see its log"
            outcomes.append(outcome)
        return outcomes

    async def stop_all(self) -> None:
        """Stop every process at once and wait until all are gone."""
        watchers = list(self._watchers.values())
        if any(w.state is not ProcessState.STOPPED for w in watchers):  # once per shutdown
            log.info("stopping %d process(es)", len(watchers))
        with one_scan():  # one pass over /proc for every stop, in a thread
            results = await asyncio.gather(*(w.stop() for w in watchers),
                                           return_exceptions=True)
        for watcher, result in zip(watchers, results, strict=True):
            if isinstance(result, BaseException):
                log.error("%s: stop failed: %r", watcher.spec.slug, result, exc_info=result)

