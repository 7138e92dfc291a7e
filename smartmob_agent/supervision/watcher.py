"""The life of one process over time: provision, then run and restart as its options say.

A :class:`Watcher` owns one process resource: it downloads and unpacks the source,
reads the Procfile and ``.env``, then spawns :class:`~smartmob_agent.processes.spawn.Child` after
child, restarting as :func:`~smartmob_agent.supervision.restart.decide` says, until it is stopped.
Every change of state goes through :meth:`Watcher._enter`, which checks the transition
table, tells the listeners and publishes a ``process:state`` event; each is driven by a
real event: a step finishing, a child spawned, a child's exit, a control.

The controls (:meth:`Watcher.request_start`, :meth:`~Watcher.request_stop`,
:meth:`~Watcher.request_restart`, :meth:`~Watcher.request_signal`) run one at a time
under a lock, so two clients clicking "restart" at once get two restarts in a row, never
two children.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import logging
import os
import random
import shutil
import signal
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import aiohttp

from smartmob_agent.errors import (
    AgentError,
    Conflict,
    ProcfileError,
    SpawnError,
)
from smartmob_agent.events.bus import EventKind
from smartmob_agent.model import (
    RESTING_STATES,
    Backoff,
    DownloadProgress,
    Exit,
    ExitRecord,
    Options,
    ProcessInfo,
    ProcessState,
    RestartPolicy,
    RunAs,
    Spec,
    check_transition,
)
from smartmob_agent.output.hub import Hub
from smartmob_agent.output.logs import ProcessLog
from smartmob_agent.processes.monitor import Monitor
from smartmob_agent.processes.reaper import Reaper
from smartmob_agent.processes.spawn import Child
from smartmob_agent.processes.stop import stop_marked
from smartmob_agent.processes.users import give_tree
from smartmob_agent.sources import buildplan as build
from smartmob_agent.sources import dotenv, download, procfile, unpack
from smartmob_agent.sources.builds import Builds
from smartmob_agent.sources.cache import SourceCache
from smartmob_agent.supervision.health import (
    HealthCheck,
    HealthMonitor,
    ProbeResult,
    probe_command,
    probe_http,
)
from smartmob_agent.supervision.restart import (
    Action,
    BackoffPolicy,
    backoff_policy,
    decide,
    next_delay,
)

log = logging.getLogger("smartmob_agent.watcher")  # stable name: internals.rst

S = ProcessState
#: Set in the environment of every child of a process, with a value of its own: the
#: descendants that escape its process group are found by it (see :func:`stop_marked`).
PROCESS_ID_VARIABLE = "SMARTMOB_PROCESS_ID"
#: How long the pipes of a run that ended may stay open before its leftovers are killed.
_LEFTOVER_GRACE = 0.05
#: Exits kept for the status document.
EXIT_HISTORY = 10
#: Output lines shown with a crash (``output_tail``).
OUTPUT_TAIL = 10
#: The most a ``.env`` file may hold.
_DOTENV_LIMIT = dotenv.MAX_DOTENV_BYTES

#: Called as ``listener(watcher, old_state, new_state)`` after every transition.
Listener = Callable[["Watcher", ProcessState, ProcessState], None]
#: Called as ``emit(watcher, kind, fields)`` for each event (see :mod:`.events`).
Emitter = Callable[["Watcher", EventKind, Mapping[str, Any]], None]


@dataclass(frozen=True)
class Runtime:
    """What every watcher shares, owned by the agent."""

    session: aiohttp.ClientSession
    reaper: Reaper
    base_env: Mapping[str, str]
    #: set after every other layer: what the agent relies on cannot be overridden
    forced_env: Mapping[str, str] = field(default_factory=dict)
    limits: download.DownloadLimits = download.DownloadLimits()  # noqa: RUF009 (frozen)
    #: the bounds of each unpack (members, sizes, compression ratio, path length)
    unpack_limits: unpack.UnpackLimits = unpack.UnpackLimits()  # noqa: RUF009 (frozen)
    #: overrides every process's backoff options when set (tests use a fast series)
    policy: BackoffPolicy | None = None
    stop_timeout: float = 10.0
    clock: Callable[[], float] = time.monotonic
    wall_clock: Callable[[], float] = time.time
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    jitter: Callable[[], float] = random.random
    monitor: Monitor | None = None
    emit: Emitter | None = None
    #: the shared cache of source archives; without one (tests), each watcher keeps its
    #: own in its work folder
    sources: SourceCache | None = None
    #: the shared builds of sources (virtual environments, releases); without one
    #: (tests), each watcher keeps its own in its work folder
    builds: Builds | None = None
    #: the folder of the processes' output log files (one folder each); ``None`` keeps
    #: output lines in memory only
    logs_dir: Path | None = None
    #: output lines of each process kept in memory (see
    #: :class:`~smartmob_agent.output.logs.ProcessLog`)
    log_lines: int = 1000
    #: size at which an output log file is rotated
    log_max_bytes: int = 10 * 1024 * 1024
    #: rotated output log files kept per process
    log_files: int = 3
    #: called as ``reserve_seq(slug, mark)`` to keep the mark below which a process's
    #: output lines may be numbered (see :class:`~smartmob_agent.output.logs.ProcessLog`)
    reserve_seq: Callable[[str, int], None] | None = None
    #: the user the children run as (:option:`--user`); ``None``: the agent's own
    run_as: RunAs | None = None


def child_environment(
    base: Mapping[str, str],
    procfile_env: Mapping[str, str],
    request_env: Mapping[str, str],
    forced: Mapping[str, str] = MappingProxyType({}),
    dotenv_env: Mapping[str, str] = MappingProxyType({}),
) -> dict[str, str]:
    """Merge the environments of a child, later layers winning: the agent's own, the
    source's ``.env``, the Procfile line's, the request's ``env``, then the variables the
    agent sets itself (its ids, which the guardian looks for, and ``PORT`` unless the
    request set it)."""
    return {**base, **dotenv_env, **procfile_env, **request_env, **forced}


@dataclass(frozen=True)
class _Command:
    """What a run executes, fixed once the source is provisioned."""

    command: str
    cwd: Path
    env: Mapping[str, str]


class Watcher:
    """Supervises one process resource.

    Args:
        spec: what was asked for.
        workdir: a folder of its own (created here, removed by :meth:`remove_files`).
        runtime: shared collaborators and policy.
        request_id: the id of the create request, sent along with the download.
        port: the ``PORT`` of its children, kept across restarts; set in their
            environment unless the request's ``env`` sets ``PORT`` itself.
        process_id: the value of :data:`PROCESS_ID_VARIABLE` for its children (a new one
            by default; an agent bringing a process back passes the one it had).
        stopped: created ``stopped`` (default: unless ``autostart``).
        reuse_source: use the source a previous agent unpacked in ``workdir``, if it
            finished unpacking it, instead of downloading it again.
        restarts: the restart count to start from.
        seq_start: the lowest sequence number its output lines may get (the mark an
            earlier agent reserved up to).
    """

    def __init__(
        self,
        spec: Spec,
        workdir: Path,
        runtime: Runtime,
        request_id: str | None = None,
        port: int | None = None,
        *,
        process_id: str | None = None,
        stopped: bool | None = None,
        reuse_source: bool = False,
        restarts: int = 0,
        seq_start: int = 0,
    ) -> None:
        self.spec = spec
        self.workdir = workdir
        self.port = port
        self.hub = Hub()
        #: every output line, with its stream and time (refilled from its files)
        self.output_log = ProcessLog(
            None if runtime.logs_dir is None else runtime.logs_dir / spec.slug,
            lines=runtime.log_lines, max_bytes=runtime.log_max_bytes, files=runtime.log_files,
            clock=runtime.wall_clock, first_seq=seq_start,
            reserve=None if runtime.reserve_seq is None
            else functools.partial(runtime.reserve_seq, spec.slug),
        )
        self._exit_announced: Child | None = None
        self._run_restarts = restarts  # the restart count of the current child's run
        self.process_id = process_id or uuid.uuid4().hex
        self._marker = f"{PROCESS_ID_VARIABLE}={self.process_id}"
        self._reuse_source = reuse_source
        self._runtime = runtime
        self._request_id = request_id
        options = spec.options
        self._stop_timeout = (
            runtime.stop_timeout if options.stop_timeout is None else options.stop_timeout
        )
        self._health = None if options.health is None else HealthCheck.from_json(options.health)
        # created stopped: nothing is downloaded until a start control
        if stopped is None:
            stopped = not options.autostart
        self.state = S.STOPPED if stopped else S.PENDING
        self.error: str | None = None
        self.restarts = restarts
        self.exits: deque[ExitRecord] = deque(maxlen=EXIT_HISTORY)
        self.backoff_delay = 0.0
        self.next_start_at: float | None = None
        self.failed_starts = 0
        self.healthy: bool | None = None
        self._child: Child | None = None
        self._started_at: float | None = None  # wall clock, of the current child
        self._command: _Command | None = None
        self._restart_reason: str | None = None
        self._recorded_pid: int | None = None  # the child whose exit is in self.exits
        self._unhealthy_task: asyncio.Task[None] | None = None
        self._listeners: list[Listener] = []
        self._task: asyncio.Task[None] | None = None
        self._health_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._deleted = False
        self._download: DownloadProgress | None = None
        #: the SHA-256 of the archive its source came from, once known (read back from
        #: the work folder when reusing a source, so that the agent knows at once which
        #: build it uses: see :attr:`build_key`)
        self.source_sha256 = _source_digest(workdir) if reuse_source else None

    @property
    def build_key(self) -> str | None:
        """The key of the build of its source (see :mod:`~smartmob_agent.sources.builds`), once
        known; the agent keeps it from being collected."""
        builds = self._runtime.builds
        if builds is None or self.source_sha256 is None:
            return None
        return builds.key(self.source_sha256)

    # -- observation -----------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The pid of the current child while it lives, else ``None``."""
        child = self._child
        return child.pid if child is not None and not child.exited else None

    @property
    def last_exit(self) -> Exit | None:
        """How the last child ended, if one did."""
        return self.exits[-1].exit if self.exits else None

    def info(self) -> ProcessInfo:
        """Return a snapshot of the process for the API."""
        pid = self.pid
        state = self.state
        usage = None
        monitor = self._runtime.monitor
        if pid is not None and monitor is not None:
            usage = monitor.usage(pid)
        started_at = self._started_at if pid is not None else None
        crashed = state in (S.BACKOFF, S.FAILED, S.EXITED)
        return ProcessInfo(
            spec=self.spec,
            state=state,
            pid=pid,
            error=self.error,
            restarts=self.restarts,
            last_exit=self.exits[-1] if self.exits else None,
            exits=tuple(self.exits),
            started_at=started_at,
            uptime=None if started_at is None
            else max(0.0, self._runtime.wall_clock() - started_at),
            port=self.port,
            healthy=self.healthy,
            cpu_percent=None if usage is None else usage.cpu_percent,
            memory_rss=None if usage is None else usage.memory_rss,
            backoff_delay=self.backoff_delay if state is S.BACKOFF else None,
            next_start_at=self.next_start_at if state is S.BACKOFF else None,
            output_tail=self._output_tail() if crashed else (),
            stop_timeout=self._stop_timeout,
            download=self._download if state is S.DOWNLOADING else None,
        )

    def _on_output(self, stream: str, lines: list[bytes]) -> None:
        """A batch of a child's output: to the log, then to the attached clients."""
        self.hub.publish(stream, lines, self.output_log.append(stream, lines))

    # -- lifecycle markers of the output stream (see :meth:`.Hub.announce`) --------------------

    def _announce_spawn(self, child: Child) -> None:
        self._run_restarts = self.restarts
        self.output_log.set_run(child.pid, self.restarts)
        self.hub.announce({"event": "spawned", "at": self._runtime.wall_clock(),
                           "pid": child.pid, "restarts": self.restarts})

    def _announce_exit(self, child: Child, exit: Exit) -> None:
        """Once per child, after its last output line."""
        if self._exit_announced is child:
            return
        self._exit_announced = child
        self.output_log.set_run(None, None)
        self.hub.announce({"event": "exited", "at": self._runtime.wall_clock(),
                           "pid": child.pid, "restarts": self._run_restarts,
                           "code": exit.code, "signal": exit.signal})

    def _output_tail(self) -> tuple[str, ...]:
        recent = list(self.hub.recent)[-OUTPUT_TAIL:]
        return tuple(line.decode(errors="replace") for line in recent)

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(watcher, old, new)`` after each state change."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        """Stop calling ``listener`` (no error if it was not added)."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _emit(self, kind: EventKind, **fields: Any) -> None:
        if self._runtime.emit is not None:
            self._runtime.emit(self, kind, fields)

    def _enter(self, new: ProcessState) -> None:
        old = self.state
        check_transition(old, new)
        self.state = new
        log.debug("%s: %s -> %s", self.spec.slug, old, new)
        for listener in self._listeners:
            listener(self, old, new)
        self._emit("process:state", previous=old.value)
        if new is S.RUNNING:
            self._emit("process:online")

    def _fail(self, reason: str) -> None:
        self.error = reason
        log.warning("%s failed: %s", self.spec.slug, reason)
        self._enter(S.FAILED)
        self._emit("process:exception", error=reason)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Begin provisioning and supervising, unless created with ``autostart: false``."""
        if self.state is S.PENDING:
            self._launch()

    def _launch(self) -> None:
        assert self._task is None or self._task.done(), "one run task at a time"
        self._wake.clear()
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"watcher {self.spec.slug}"
        )

    async def _run(self) -> None:
        try:
            if self._command is None:
                self._command = await self._provision()
            await self._supervise(self._command)
        except AgentError as error:
            self._fail(str(error))
        except asyncio.CancelledError:
            raise
        except Exception as error:  # a bug: the process fails, the agent carries on
            log.exception("%s: unexpected error", self.spec.slug)
            self._fail(f"internal error of the agent: {type(error).__name__}: {error}")

    async def _provision(self) -> _Command:
        """Download and unpack the source, read its Procfile and ``.env``, build it and
        run its release command if it has them (see :ref:`lifecycle-build`)."""
        root = await self._fetch()
        entries, dotenv_env = await asyncio.to_thread(_read_source, root)
        entry = procfile.select(entries, self.spec.process_type)
        build.check_process_type(self.spec.process_type)
        cwd = _working_dir(root, self.spec.options.working_dir)
        runtime = self._runtime
        forced = dict(runtime.forced_env)
        forced[PROCESS_ID_VARIABLE] = self._marker.partition("=")[2]
        if self.port is not None and "PORT" not in self.spec.env:
            forced["PORT"] = str(self.port)
        env = child_environment(
            runtime.base_env, entry.env, self.spec.env, forced, dotenv_env
        )
        # a stat: microseconds, like the source cache's, on the loop
        plan = build.plan((root / build.REQUIREMENTS).is_file(), entries)
        if plan.needed:
            venv = await self._build(plan, root, cwd, forced, dotenv_env)
            if venv is not None:
                env = build.activate(env, str(venv))
        return _Command(entry.command, cwd, MappingProxyType(env))

    async def _build(
        self,
        plan: build.Plan,
        root: Path,
        cwd: Path,
        forced: Mapping[str, str],
        dotenv_env: Mapping[str, str],
    ) -> Path | None:
        """Make the source's virtual environment and run its release command, unless
        done before (by this process or another of the same source); return the
        environment's folder, if it has one.

        ``building`` is entered only when there is something to do or to wait for: a
        source whose build and release are done goes straight to ``starting``.
        """
        runtime = self._runtime
        builds = runtime.builds
        if builds is None:
            builds = Builds(self.workdir / "builds", runtime.reaper,
                            stop_timeout=runtime.stop_timeout, run_as=runtime.run_as)
        assert self.source_sha256 is not None, "known once the source is fetched"
        key = builds.key(self.source_sha256)
        venv: Path | None = None
        if plan.requirements:
            if not builds.is_built(key):
                self._enter_building()
            # pip is configured by the agent's environment (PIP_INDEX_URL, ...), not by a
            # request's env: the build is shared by every process of the source
            build_env = build.activate(
                {**runtime.base_env, **runtime.forced_env, "PYTHONUNBUFFERED": "1"},
                str(builds.venv(key)),
            )
            venv = await builds.build(key, root, build_env, self._on_output)
        release = plan.release
        if release is not None and not builds.is_released(key, self.spec.app):
            self._enter_building()
            # what a process would get, with the release line's own variables
            release_env = child_environment(
                runtime.base_env, release.env, self.spec.env, forced, dotenv_env
            )
            if venv is not None:
                release_env = build.activate(release_env, str(venv))
            await builds.release(
                key, self.spec.app, release.command, cwd, release_env, self._on_output
            )
        return venv

    def _enter_building(self) -> None:
        if self.state is not S.BUILDING:
            self._enter(S.BUILDING)  # PENDING (a source reused) or UNPACKING -> BUILDING

    async def _fetch(self) -> Path:
        """Get the source archive (from the cache, or downloaded into it) and unpack it
        into the work folder; return the source's root folder.

        Each process unpacks a copy of its own, even from a shared archive: see
        :ref:`lifecycle-source-cache`.
        """
        # a source its user could write to is unpacked again, from the cached archive,
        # rather than read by the agent as root (see :ref:`security-children`)
        if self._reuse_source and self._runtime.run_as is None:
            self._reuse_source = False  # once: a later start after a failure fetches again
            root = await asyncio.to_thread(_unpacked_root, self.workdir)
            # without its archive's digest, the source's build cannot be found: fetch
            if root is not None and self.source_sha256 is not None:
                return root
        self.source_sha256 = None
        if self.workdir.exists():  # left by an earlier run or agent on this state folder
            await asyncio.to_thread(shutil.rmtree, self.workdir, True)
        self.workdir.mkdir(parents=True, exist_ok=True)
        runtime = self._runtime
        sources = runtime.sources
        if sources is None:
            sources = SourceCache(self.workdir / "cache", runtime.session, runtime.limits)
        headers = {"X-Request-Id": self._request_id} if self._request_id else None
        self._enter(S.DOWNLOADING)  # PENDING -> DOWNLOADING
        self._download = DownloadProgress(0)
        try:
            path = await sources.get(
                self.spec.source_url, self.spec.sha256, headers=headers,
                progress=self._on_progress,
            )
        finally:
            self._download = None
        self._enter(S.UNPACKING)  # DOWNLOADING -> UNPACKING
        # the identity of the source, for its build: the checksum the cache verified, or
        # the digest of the file (a URL may serve another version tomorrow)
        digest = self.spec.sha256
        if digest is None:
            digest = await asyncio.to_thread(_file_sha256, path)
        self.source_sha256 = digest
        # if cancelled, it stops and finishes before stop() returns, or it would write
        # again into a work folder being removed
        root = await unpack.unpack_in_thread(
            path, self.workdir / "source", limits=runtime.unpack_limits
        )
        if runtime.run_as is not None:  # the children may write in their source
            await asyncio.to_thread(_give_source, self.workdir, runtime.run_as)
        await asyncio.to_thread(_mark_unpacked, self.workdir, root, digest)
        return root

    def _on_progress(self, size: int, total: int | None) -> None:
        if self._download is not None:
            self._download = DownloadProgress(size, total)

    async def _supervise(self, command: _Command) -> None:
        """Run the command, and again each time it exits, until the policy says no or a
        stop cancels this task."""
        runtime = self._runtime
        options = self.spec.options
        policy = runtime.policy or backoff_policy(options)
        while True:
            if self.state is not S.STARTING:  # a start control may have entered it
                self._enter(S.STARTING)  # PENDING/UNPACKING/BUILDING/RUNNING/BACKOFF -> STARTING
            try:
                child = Child.spawn(
                    command.command, cwd=command.cwd, env=command.env,
                    sink=self._on_output, reaper=runtime.reaper, umask=options.umask,
                    run_as=runtime.run_as, rlimits=options.rlimits,
                )
            except SpawnError as error:
                if not error.transient:
                    raise
                # out of fds, memory or processes: that may pass, so try again later
                self.error = str(error)
                log.warning("%s: %s; trying again", self.spec.slug, error)
                self.backoff_delay = next_delay(policy, self.backoff_delay, 0.0)
                await self._back_off(self.backoff_delay)  # STARTING -> BACKOFF
                continue
            self._child = child
            self._announce_spawn(child)
            self.error = None
            self._restart_reason = None
            started = runtime.clock()
            self._started_at = runtime.wall_clock()
            if runtime.monitor is not None:
                runtime.monitor.track(child.pid)
            self._enter(S.RUNNING)  # STARTING -> RUNNING
            self._start_health(command, child)
            try:
                exit = await child.wait()
            finally:
                if runtime.monitor is not None:
                    runtime.monitor.untrack(child.pid)
                await self._stop_health()
            ran_for = runtime.clock() - started
            if not await self._after_exit(child, exit, ran_for, policy):
                return

    async def _after_exit(
        self, child: Child, exit: Exit, ran_for: float, policy: BackoffPolicy
    ) -> bool:
        """Record an exit and act on the policy's decision; ``True`` to run again."""
        runtime = self._runtime
        options = self.spec.options
        record = ExitRecord(exit, runtime.wall_clock(), ran_for, self._restart_reason)
        self.exits.append(record)
        self._recorded_pid = child.pid
        log.info("%s: process %d %s after %.3f s", self.spec.slug, child.pid,
                 exit.describe(), ran_for)
        if runtime.policy is not None:  # a test's series replaces the options' one
            options = _with_policy(options, runtime.policy)
        if self._restart_reason is not None:
            # restarted on purpose: at once, whatever the policy, and not a failed start
            ran_for = max(ran_for, options.start_seconds)
            options = dataclasses.replace(options, restart=RestartPolicy.ALWAYS)
        decision = decide(
            options, exit, ran_for, self.failed_starts, self.backoff_delay, runtime.jitter()
        )
        self.failed_starts = decision.failed_starts
        self._emit("process:exit", pid=child.pid, code=exit.code, signal=exit.signal,
                   ran_for=round(ran_for, 3))
        if decision.action is Action.FAIL:
            await _settle(child)
            self._announce_exit(child, exit)
            if decision.reason == "cannot run":
                tail = self.hub.recent[-1].decode(errors="replace") if self.hub.recent else ""
                raise AgentError(
                    f"the command of process type {self.spec.process_type!r} cannot run: "
                    f"/bin/sh {exit.describe()}" + (f" ({tail})" if tail else "")
                )
            raise AgentError(decision.reason)
        unhealthy = self._unhealthy_task
        if self._restart_reason is not None and unhealthy is not None:
            # the health restart is still giving the old run's descendants their stop
            # timeout (it ends with SIGKILL): do not cut it short, nor start a new child
            await asyncio.wait({unhealthy})
        await self._clear_leftovers(child)
        self._announce_exit(child, exit)
        if decision.action is Action.EXIT:
            self._enter(S.EXITED)  # RUNNING -> EXITED
            return False
        self.restarts += 1
        self.backoff_delay = decision.delay
        if decision.delay > 0:
            await self._back_off(decision.wait)  # RUNNING -> BACKOFF
        return True

    async def _back_off(self, wait: float) -> None:
        """Wait in ``backoff`` for ``wait`` seconds, or until a start control cuts it short."""
        self.next_start_at = self._runtime.wall_clock() + wait
        self._enter(S.BACKOFF)
        self.hub.announce({"event": "backoff", "at": self._runtime.wall_clock(),
                           "delay": round(wait, 3)})
        self._wake.clear()
        sleeping = asyncio.ensure_future(self._runtime.sleep(wait))
        woken = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({sleeping, woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeping.cancel()
            woken.cancel()
            self.next_start_at = None

    # -- health --------------------------------------------------------------------------------

    def _start_health(self, command: _Command, child: Child) -> None:
        check = self._health
        if check is None:
            return
        self.healthy = None
        runtime = self._runtime
        port = self.port

        async def probe() -> ProbeResult:
            if check.http is not None:
                if port is None:
                    return ProbeResult(False, "the process has no usable PORT to probe")
                return await probe_http(runtime.session, port, check.http, check.timeout)
            assert check.command is not None
            return await probe_command(
                check.command, command.cwd, command.env, check.timeout,
                reaper=runtime.reaper, run_as=runtime.run_as, umask=self.spec.options.umask,
                rlimits=self.spec.options.rlimits,
            )

        def on_change(healthy: bool | None) -> None:
            self.healthy = healthy

        monitor = HealthMonitor(
            check, probe, on_change, lambda reason: self._on_unhealthy(child, reason)
        )
        self._health_task = asyncio.get_running_loop().create_task(
            monitor.run(), name=f"health {self.spec.slug}"
        )

    async def _stop_health(self) -> None:
        task, self._health_task = self._health_task, None
        if task is not None:
            task.cancel()
            # not `await task` under suppress(CancelledError): if the caller (the run task)
            # is cancelled meanwhile, Task.cancel() is forwarded to the awaited health task
            # and the caller's own cancellation would be swallowed here
            await asyncio.wait({task})
        self.healthy = None  # no child: nothing to be healthy

    def _on_unhealthy(self, child: Child, reason: str) -> None:
        log.warning("%s: %s; restarting it", self.spec.slug, reason)
        task = asyncio.get_running_loop().create_task(
            self._restart_unhealthy(child, reason), name=f"unhealthy {self.spec.slug}"
        )
        task.add_done_callback(self._log_task_failure)
        self._unhealthy_task = task

    def _log_task_failure(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: %s failed", self.spec.slug, task.get_name(),
                      exc_info=task.exception())

    async def _restart_unhealthy(self, child: Child, reason: str) -> None:
        async with self._lock:
            # the child it judged, not whatever runs now (a restart may have replaced it)
            if self._child is not child or self.state is not S.RUNNING or child.exited:
                return  # it exited or was stopped meanwhile: nothing to restart
            # the run loop sees the exit and restarts it at once, as after a long run
            self._restart_reason = f"unhealthy: {reason}"
            await child.stop(self.spec.options.signal_number, self._stop_timeout)

    # -- controls ------------------------------------------------------------------------------

    async def request_start(self) -> None:
        """Start a resting process again, or cut a backoff short; backoff and the count of
        failed starts begin afresh.

        Raises:
            Conflict: the process is already starting or running, or is being stopped.
        """
        async with self._lock:
            self._start_now()

    def _start_now(self) -> None:
        self._refuse_if_deleted()
        state = self.state
        if state is S.BACKOFF:
            self._reset_backoff()
            self._enter(S.STARTING)  # the run loop, woken, spawns at once
            self._wake.set()
            return
        if state not in RESTING_STATES:
            raise Conflict(
                f"process {self.spec.slug!r} is {state}: start applies to a stopped, "
                "exited, failed or backoff process"
            )
        self._reset_backoff()
        self.error = None
        self._enter(S.STARTING if self._command is not None else S.PENDING)
        self._launch()

    def _reset_backoff(self) -> None:
        self.backoff_delay = 0.0
        self.failed_starts = 0

    async def request_stop(self) -> None:
        """Stop the process and keep it (state ``stopped``, no restarts).

        Raises:
            Conflict: it is already stopped or stopping.
        """
        async with self._lock:
            self._refuse_if_deleted()
            if self.state in (S.STOPPED, S.STOPPING):
                raise Conflict(f"process {self.spec.slug!r} is already {self.state}")
            await self._halt()

    async def request_restart(self) -> None:
        """Stop the process (waiting until its old child and descendants are gone), then
        start it again.

        Raises:
            Conflict: it is being stopped.
        """
        async with self._lock:
            self._refuse_if_deleted()
            if self.state is S.STOPPING:
                raise Conflict(f"process {self.spec.slug!r} is stopping")
            if self.state is not S.STOPPED:
                await self._halt("restarted")
            self._start_now()

    async def request_signal(self, name: str) -> None:
        """Send ``SIG<name>`` to the child's process group and descendants; the restart
        policy applies as usual to what follows.

        Raises:
            Conflict: no child is running.
        """
        async with self._lock:
            self._refuse_if_deleted()
            child = self._child
            if self.state is not S.RUNNING or child is None or child.exited:
                raise Conflict(
                    f"process {self.spec.slug!r} is {self.state}: only a running process "
                    "can be signalled"
                )
            child.send_signal(signal.Signals[f"SIG{name}"])

    def send_input(self, text: str) -> bool:
        """Write ``text`` and a newline to the running child's stdin.

        Returns:
            ``False`` if no child is running or it is not reading its input.
        """
        child = self._child
        if child is None or child.exited:
            return False
        return child.write_input(text.encode() + b"\n")

    def _refuse_if_deleted(self) -> None:
        if self._deleted:
            raise Conflict(f"process {self.spec.slug!r} is being deleted")

    async def stop(self, *, final: bool = False) -> None:
        """Bring the process to ``stopped`` whatever it is doing, and wait until its child
        and descendants are gone; used by delete (``final``: no control may start it
        again) and shutdown.

        Safe to call many times and concurrently: the later callers find it stopped.
        """
        async with self._lock:
            if final:
                self._deleted = True
            if self.state is not S.STOPPED:
                await self._halt()

    async def _halt(self, reason: str = "stopped") -> None:
        """Cancel the run and stop the child with the stop sequence (lock held).

        ``reason`` is recorded with the child's exit.
        """
        self.error = None  # whatever failed before, the process is now just stopped
        self._enter(S.STOPPING)  # any live state -> STOPPING
        child: Child | None = None
        try:  # whatever happens below, the process must not stay in STOPPING
            task, self._task = self._task, None
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                except Exception:  # a bug of the run task: log it, stop all the same
                    log.exception("%s: the run task failed", self.spec.slug)
            await self._stop_health()
            child = self._child
            if child is not None:
                if not child.exited:
                    exit = await child.stop(self.spec.options.signal_number, self._stop_timeout)
                    self._record_stop(child, exit, reason)
                elif self._recorded_pid != child.pid:
                    # it exited while the supervision task was being cancelled
                    self._record_stop(child, await child.wait(), reason)
                # descendants that left the group and lost their parent, if any
                await stop_marked(self._marker, self._stop_timeout)
                await _settle(child)
                if child.exited:
                    self._announce_exit(child, await child.wait())
                if self._runtime.monitor is not None:
                    self._runtime.monitor.untrack(child.pid)
        except TimeoutError:
            # SIGKILL cannot be ignored: only a process stuck in the kernel gets here
            assert child is not None
            self.error = f"process {child.pid} did not exit even after SIGKILL"
            log.error("%s: %s", self.spec.slug, self.error)
        finally:
            self._child = None
            self.healthy = None
            self._enter(S.STOPPED)  # STOPPING -> STOPPED

    def _record_stop(self, child: Child, exit: Exit, reason: str) -> None:
        started = self._started_at or self._runtime.wall_clock()
        now = self._runtime.wall_clock()
        self.exits.append(ExitRecord(exit, now, max(0.0, now - started), reason))
        self._recorded_pid = child.pid
        log.info("%s: process %d %s on stop", self.spec.slug, child.pid, exit.describe())
        self._emit("process:exit", pid=child.pid, code=exit.code, signal=exit.signal,
                   ran_for=round(max(0.0, now - started), 3))

    def close(self) -> None:
        """End the output stream: attached clients are told the process is gone."""
        self.hub.close()

    async def _clear_leftovers(self, child: Child) -> None:
        """After a run ends by itself, kill what escaped its group and holds its pipes.

        The group's leftovers are already gone (see :class:`Child`); a descendant that
        called ``setsid`` would otherwise keep the old pipes, and its output, for ever.
        """
        try:
            async with asyncio.timeout(_LEFTOVER_GRACE):
                await child.output_closed()
            return
        except TimeoutError:
            pass
        killed = await stop_marked(self._marker, 0.0, signal.SIGKILL)
        if killed:
            log.info("%s: killed %d leftover process(es) of the last run", self.spec.slug, killed)
        await _settle(child)

    async def remove_files(self) -> None:
        """Delete the process's work folder and output logs (after :meth:`stop`)."""
        await self.output_log.remove()
        await asyncio.to_thread(shutil.rmtree, self.workdir, True)


def _with_policy(options: Options, policy: BackoffPolicy) -> Options:
    """The options with the backoff series of ``policy`` (a test seam)."""
    return dataclasses.replace(
        options,
        backoff=Backoff(initial=policy.initial, maximum=policy.maximum),
        start_seconds=policy.reset_after,
    )


async def _settle(child: Child, timeout: float = 1.0) -> None:
    """Give the pipes a moment to deliver the last lines, then stop reading them.

    A descendant that left the process group may hold them open for ever.
    """
    try:
        async with asyncio.timeout(timeout):
            await child.output_closed()
    except TimeoutError:
        child.close_output()


#: Written in a work folder once its source is completely unpacked: the source root,
#: relative to ``source/``.
UNPACKED_MARK = "unpacked"
#: Written in a work folder before :data:`UNPACKED_MARK`: the SHA-256 of the archive the
#: source came from, which names its build.
DIGEST_FILE = "source.sha256"


def _give_source(workdir: Path, run_as: RunAs) -> None:
    """Make the unpacked source belong to the children's user; the work folder stays
    the agent's (its marks say what was unpacked), but anyone may pass through it."""
    os.chmod(workdir, 0o755)
    give_tree(workdir / "source", run_as)


def _mark_unpacked(workdir: Path, root: Path, sha256: str) -> None:
    (workdir / DIGEST_FILE).write_text(sha256 + "\n")
    (workdir / UNPACKED_MARK).write_text(str(root.relative_to(workdir / "source")) + "\n")


def _source_digest(workdir: Path) -> str | None:
    """The SHA-256 of the archive unpacked in ``workdir``, if it was recorded."""
    try:
        digest = (workdir / DIGEST_FILE).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    valid = len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)
    return digest if valid else None


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _unpacked_root(workdir: Path) -> Path | None:
    """The source root an earlier agent finished unpacking in ``workdir``, if any."""
    try:
        relative = (workdir / UNPACKED_MARK).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    source = (workdir / "source").resolve()
    root = (source / relative).resolve()
    if not root.is_relative_to(source) or not root.is_dir():
        return None
    return root


def _working_dir(root: Path, relative: str | None) -> Path:
    """The folder a process runs in: ``relative`` inside ``root``, which it may not leave
    (through ``..`` or a symbolic link)."""
    if relative is None:
        return root
    target = (root / relative).resolve()
    if not target.is_relative_to(root.resolve()):
        raise ProcfileError(f"working_dir {relative!r} leads outside the source")
    if not target.is_dir():
        raise ProcfileError(f"working_dir {relative!r} is not a folder of the source")
    return target


def _read_source(root: Path) -> tuple[dict[str, procfile.ProcfileEntry], dict[str, str]]:
    """Read the Procfile and the optional ``.env`` at the root of the source."""
    return _read_procfile(root), _read_dotenv(root)


def _read_procfile(root: Path) -> dict[str, procfile.ProcfileEntry]:
    path = root / "Procfile"
    try:
        with open(path, "rb") as file:
            data = file.read(procfile.MAX_PROCFILE_BYTES + 1)
    except FileNotFoundError:
        raise ProcfileError(
            "the source has no Procfile at its root" + _nested_archive_hint(root)
        ) from None
    except (IsADirectoryError, PermissionError) as error:
        raise ProcfileError(f"the Procfile cannot be read: {error.strerror}") from None
    return procfile.parse_procfile(procfile.decode_procfile(data))


def _nested_archive_hint(root: Path) -> str:
    """A hint for a source whose only file is an archive itself (a zip inside a tar)."""
    try:
        entries = list(root.iterdir())
        if len(entries) != 1 or entries[0].is_symlink() or not entries[0].is_file():
            return ""
        with open(entries[0], "rb") as file:
            kind = unpack.detect_format(file.read(512))
    except (OSError, AgentError):
        return ""
    return (
        f" (it holds only {entries[0].name!r}, a {kind} archive: an archive inside the "
        "archive is not unpacked)"
    )


def _read_dotenv(root: Path) -> dict[str, str]:
    path = root / ".env"
    try:
        with open(path, "rb") as file:
            data = file.read(_DOTENV_LIMIT + 1)
    except FileNotFoundError:
        return {}
    except (IsADirectoryError, PermissionError) as error:
        raise dotenv.DotenvError(f"the .env file cannot be read: {error.strerror}") from None
    return dotenv.parse_dotenv(dotenv.decode_dotenv(data))
