"""The life of one process over time: provision once, then run and restart until stopped.

A :class:`Watcher` owns one process resource: it downloads and unpacks the source,
reads the Procfile, then spawns :class:`~smartmob_agent.child.Child` after child,
restarting with backoff, until :meth:`Watcher.stop`. Every change of state goes through
:meth:`Watcher._enter`, which checks the transition table and tells the listeners, and
is driven by a real event: a step finishing, a child spawned, a child's exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import aiohttp

from smartmob_agent import archive, procfile
from smartmob_agent.child import Child, Reaper, stop_marked
from smartmob_agent.errors import AgentError, ProcfileError, SpawnError
from smartmob_agent.hub import Hub
from smartmob_agent.model import (
    Exit,
    ProcessInfo,
    ProcessState,
    Spec,
    check_transition,
)
from smartmob_agent.policy import BackoffPolicy, cannot_run, next_delay

log = logging.getLogger(__name__)

S = ProcessState
#: Set in the environment of every child of a process, with a value of its own: the
#: descendants that escape its process group are found by it (see :func:`stop_marked`).
PROCESS_ID_VARIABLE = "SMARTMOB_PROCESS_ID"
#: How long the pipes of a run that ended may stay open before its leftovers are killed.
_LEFTOVER_GRACE = 0.05

#: Called as ``listener(watcher, old_state, new_state)`` after every transition.
Listener = Callable[["Watcher", ProcessState, ProcessState], None]


@dataclass(frozen=True)
class Runtime:
    """What every watcher shares, owned by the agent."""

    session: aiohttp.ClientSession
    reaper: Reaper
    base_env: Mapping[str, str]
    #: set after every other layer: what the agent relies on cannot be overridden
    forced_env: Mapping[str, str] = field(default_factory=dict)
    limits: archive.DownloadLimits = archive.DownloadLimits()  # noqa: RUF009 (frozen)
    policy: BackoffPolicy = BackoffPolicy()  # noqa: RUF009 (frozen)
    stop_timeout: float = 10.0
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep


def child_environment(
    base: Mapping[str, str],
    procfile_env: Mapping[str, str],
    request_env: Mapping[str, str],
    forced: Mapping[str, str] = MappingProxyType({}),
) -> dict[str, str]:
    """Merge the environments of a child: the agent's, the Procfile line's, the request's,
    then the variables the agent relies on (its id, which the guardian looks for)."""
    return {**base, **procfile_env, **request_env, **forced}


class Watcher:
    """Supervises one process resource.

    Args:
        spec: what was asked for.
        workdir: a folder of its own (created here, removed by :meth:`remove_files`).
        runtime: shared collaborators and policy.
        request_id: the id of the create request, sent along with the download.
    """

    def __init__(
        self, spec: Spec, workdir: Path, runtime: Runtime, request_id: str | None = None
    ) -> None:
        self.spec = spec
        self.workdir = workdir
        self.hub = Hub()
        self._marker = f"{PROCESS_ID_VARIABLE}={uuid.uuid4().hex}"
        self._runtime = runtime
        self._request_id = request_id
        self.state = S.PENDING
        self.error: str | None = None
        self.restarts = 0
        self.last_exit: Exit | None = None
        self.backoff_delay = 0.0
        self._child: Child | None = None
        self._listeners: list[Listener] = []
        self._task: asyncio.Task[None] | None = None
        self._stopping: asyncio.Task[None] | None = None

    # -- observation -----------------------------------------------------------------------

    def info(self) -> ProcessInfo:
        """Return a snapshot of the process for the API."""
        child = self._child
        pid = child.pid if child is not None and not child.exited else None
        return ProcessInfo(
            spec=self.spec,
            state=self.state,
            pid=pid,
            error=self.error,
            restarts=self.restarts,
            last_exit=self.last_exit,
        )

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(watcher, old, new)`` after each state change."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        """Stop calling ``listener`` (no error if it was not added)."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _enter(self, new: ProcessState) -> None:
        old = self.state
        check_transition(old, new)
        self.state = new
        log.debug("%s: %s -> %s", self.spec.slug, old, new)
        for listener in self._listeners:
            listener(self, old, new)

    def _fail(self, reason: str) -> None:
        self.error = reason
        log.warning("%s failed: %s", self.spec.slug, reason)
        self._enter(S.FAILED)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Begin provisioning and supervising in a task this watcher owns."""
        assert self._task is None, "a watcher starts once"
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"watcher {self.spec.slug}"
        )

    async def _run(self) -> None:
        try:
            root = await self._provision()
            entry = procfile.select(await asyncio.to_thread(_read_procfile, root),
                                    self.spec.process_type)
            runtime = self._runtime
            forced = dict(runtime.forced_env)
            forced[PROCESS_ID_VARIABLE] = self._marker.partition("=")[2]
            env = child_environment(runtime.base_env, entry.env, self.spec.env, forced)
            await self._supervise(entry.command, root, env)
        except AgentError as error:
            self._fail(str(error))
        except asyncio.CancelledError:
            raise
        except Exception as error:  # a bug: the process fails, the agent carries on
            log.exception("%s: unexpected error", self.spec.slug)
            self._fail(f"internal error of the agent: {type(error).__name__}: {error}")

    async def _provision(self) -> Path:
        """Download and unpack the source; return its root folder."""
        if self.workdir.exists():  # left by an earlier agent on this state folder
            await asyncio.to_thread(shutil.rmtree, self.workdir, True)
        self.workdir.mkdir(parents=True, exist_ok=True)
        part = self.workdir / "source.part"
        headers = {"X-Request-Id": self._request_id} if self._request_id else None
        self._enter(S.DOWNLOADING)  # PENDING -> DOWNLOADING
        try:
            await archive.download(
                self._runtime.session, self.spec.source_url, part,
                limits=self._runtime.limits, headers=headers,
            )
            self._enter(S.UNPACKING)  # DOWNLOADING -> UNPACKING
            cancel = threading.Event()
            unpacking = asyncio.ensure_future(asyncio.to_thread(
                archive.unpack, part, self.workdir / "source", cancel=cancel
            ))
            try:
                return await asyncio.shield(unpacking)
            except asyncio.CancelledError:
                # a thread cannot be interrupted: ask it to stop between two members, and
                # let it finish before stop() returns, or it would write again into a
                # work folder being removed
                cancel.set()
                with contextlib.suppress(Exception):
                    await unpacking
                raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(part.unlink)

    async def _supervise(self, command: str, cwd: Path, env: Mapping[str, str]) -> None:
        """Run the command, and again each time it exits, until cancelled by stop()."""
        runtime = self._runtime
        while True:
            self._enter(S.STARTING)  # UNPACKING/RUNNING/BACKOFF -> STARTING
            try:
                child = Child.spawn(
                    command, cwd=cwd, env=env, sink=self.hub.publish, reaper=runtime.reaper
                )
            except SpawnError as error:
                if not error.transient:
                    raise
                # out of fds, memory or processes: that may pass, so try again later
                self.error = str(error)
                log.warning("%s: %s; trying again", self.spec.slug, error)
                self.backoff_delay = next_delay(runtime.policy, self.backoff_delay, 0.0)
                self._enter(S.BACKOFF)  # STARTING -> BACKOFF
                await runtime.sleep(self.backoff_delay)
                continue
            self._child = child
            self.error = None
            started = runtime.clock()
            self._enter(S.RUNNING)  # STARTING -> RUNNING
            exit = await child.wait()
            ran_for = runtime.clock() - started
            self.last_exit = exit
            log.info("%s: process %d %s after %.3f s", self.spec.slug, child.pid,
                     exit.describe(), ran_for)
            if cannot_run(exit, ran_for, runtime.policy):
                await _settle(child)
                tail = self.hub.recent[-1].decode(errors="replace") if self.hub.recent else ""
                raise AgentError(
                    f"the command of process type {self.spec.process_type!r} cannot run: "
                    f"/bin/sh {exit.describe()}" + (f" ({tail})" if tail else "")
                )
            await self._clear_leftovers(child)
            self.restarts += 1
            self.backoff_delay = next_delay(runtime.policy, self.backoff_delay, ran_for)
            if self.backoff_delay > 0:
                self._enter(S.BACKOFF)  # RUNNING -> BACKOFF
                await runtime.sleep(self.backoff_delay)

    async def stop(self) -> None:
        """Stop the process (whatever it is doing) and wait until it is gone.

        Safe to call many times and concurrently: every caller waits for the same stop.
        """
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(
                self._stop(), name=f"stop {self.spec.slug}"
            )
        await asyncio.shield(self._stopping)

    async def _stop(self) -> None:
        self._enter(S.STOPPING)  # any live state -> STOPPING
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        child = self._child
        try:
            if child is not None:
                if child.exited and self.state is not S.FAILED:
                    # it exited while the supervision task was being cancelled
                    self.last_exit = await child.wait()
                if not child.exited:
                    exit = await child.stop(signal.SIGTERM, self._runtime.stop_timeout)
                    self.last_exit = exit
                    log.info("%s: process %d %s on stop", self.spec.slug, child.pid,
                             exit.describe())
                # descendants that left the group and lost their parent, if any
                await stop_marked(self._marker, self._runtime.stop_timeout)
                await _settle(child)
        except TimeoutError:
            # SIGKILL cannot be ignored: only a process stuck in the kernel gets here
            assert child is not None
            self.error = f"process {child.pid} did not exit even after SIGKILL"
            log.error("%s: %s", self.spec.slug, self.error)
        finally:
            self._enter(S.STOPPED)  # STOPPING -> STOPPED
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
        """Delete the process's work folder (after :meth:`stop`)."""
        await asyncio.to_thread(shutil.rmtree, self.workdir, True)


async def _settle(child: Child, timeout: float = 1.0) -> None:
    """Give the pipes a moment to deliver the last lines, then stop reading them.

    A descendant that left the process group may hold them open for ever.
    """
    try:
        async with asyncio.timeout(timeout):
            await child.output_closed()
    except TimeoutError:
        child.close_output()


def _read_procfile(root: Path) -> dict[str, procfile.ProcfileEntry]:
    path = root / "Procfile"
    try:
        with open(path, "rb") as file:
            data = file.read(procfile.MAX_PROCFILE_BYTES + 1)
    except FileNotFoundError:
        raise ProcfileError("the source has no Procfile at its root") from None
    except (IsADirectoryError, PermissionError) as error:
        raise ProcfileError(f"the Procfile cannot be read: {error.strerror}") from None
    return procfile.parse_procfile(procfile.decode_procfile(data))

