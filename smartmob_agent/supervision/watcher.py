"""The life of one process over time: the state machine, and the loop that runs it.

A :class:`Watcher` owns one process resource: it has its source provisioned (see
:mod:`~smartmob_agent.supervision.provision`), then spawns
:class:`~smartmob_agent.processes.spawn.Child` after child, each in a
:class:`~smartmob_agent.supervision.run.Run` of its own, restarting as
:func:`~smartmob_agent.supervision.restart.decide` says, until it is stopped. Every change
of state goes through ``Watcher._enter``, which checks the transition table, tells the
listeners and publishes a ``process:state`` event; each is driven by a real event: a
step finishing, a child spawned, a child's exit, a control. A process that fails has an
``error`` for people and a ``reason`` for programs (see
:mod:`~smartmob_agent.supervision.failures`).

The controls (:meth:`Watcher.request_start`, :meth:`~Watcher.request_stop`,
:meth:`~Watcher.request_restart`, :meth:`~Watcher.request_signal`) run one at a time
under a lock, so two clients clicking "restart" at once get two restarts in a row, never
two children.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import logging
import shutil
import signal
import socket
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, Concatenate, ParamSpec

from smartmob_agent.errors import AgentError, Conflict, SpawnError
from smartmob_agent.events.bus import EventKind
from smartmob_agent.model import (
    RESTING_STATES,
    TRANSITIONS,
    Exit,
    ExitRecord,
    FailureReason,
    ProcessInfo,
    ProcessState,
    Releases,
    Resumed,
    SourceRef,
    Spec,
    check_transition,
)
from smartmob_agent.output.throttle import RepeatLimit
from smartmob_agent.processes.spawn import Child
from smartmob_agent.supervision.failures import failure_reason
from smartmob_agent.supervision.health import HealthCheck
from smartmob_agent.supervision.provision import (
    PROCESS_ID_VARIABLE,
    Command,
    Provisioner,
    Version,
)
from smartmob_agent.supervision.restart import Action, Restarts, failure
from smartmob_agent.supervision.run import (
    Output,
    Run,
    cancel_and_wait,
    health_probe,
    sleep_unless,
)
from smartmob_agent.supervision.runtime import Listener, Runtime

log = logging.getLogger("smartmob_agent.watcher")  # stable name: internals.rst

S = ProcessState
#: Exits kept for the status document.
EXIT_HISTORY = 10
#: Output lines shown with a crash (``output_tail``).
OUTPUT_TAIL = 10


_P = ParamSpec("_P")


def _control(
    method: Callable[Concatenate[Watcher, _P], Coroutine[Any, Any, None]],
) -> Callable[Concatenate[Watcher, _P], Coroutine[Any, Any, None]]:
    """Make ``method`` a control: controls run one at a time, under the watcher's lock, and
    are refused once the process is being deleted (:class:`.Conflict`)."""

    @functools.wraps(method)
    async def control(watcher: Watcher, /, *args: _P.args, **kwargs: _P.kwargs) -> None:
        async with watcher._lock:
            if watcher._deleted:
                raise Conflict(f"process {watcher.spec.slug!r} is being deleted")
            await method(watcher, *args, **kwargs)

    return control


class Watcher:
    """Supervises one process resource.

    Args:
        spec: what was asked for.
        workdir: a folder of its own (created here, removed by :meth:`remove_files`).
        runtime: shared collaborators and policy.
        request_id: the id of the create request, sent along with the download.
        port: the ``PORT`` of its children, kept across restarts; set in their
            environment unless the request's ``env`` sets ``PORT`` itself.
        resumed: what an earlier agent left of it, when the agent brings it back; it then
            uses the source that agent unpacked in ``workdir``, if it finished unpacking
            it, instead of downloading it again.
    """

    def __init__(
        self,
        spec: Spec,
        workdir: Path,
        runtime: Runtime,
        request_id: str | None = None,
        port: int | None = None,
        *,
        resumed: Resumed | None = None,
        listener: socket.socket | None = None,
    ) -> None:
        self.spec = spec
        self.workdir = workdir
        self.port = port
        #: the listening socket each child gets as fd 3 (``socket``), kept open for good
        self.listener = listener
        # the records about this process in the agent's log, which a crash loop would flood
        self._log = RepeatLimit(log, spec.slug)
        self._output = Output.open(spec.slug, runtime, resumed.seq_start if resumed else 0)
        #: its output: its children's lines, and those of the builds of its sources
        self.output = self._output
        self.hub = self._output.hub
        #: every output line, with its stream and time (refilled from its files)
        self.output_log = self._output.log
        #: the value of :data:`PROCESS_ID_VARIABLE` for its children, for its whole life
        self.process_id = resumed.process_id if resumed else uuid.uuid4().hex
        self._marker = f"{PROCESS_ID_VARIABLE}={self.process_id}"
        self._runtime = runtime
        #: what its updates left (see :mod:`~smartmob_agent.supervision.update`)
        self.releases = (resumed.releases if resumed and resumed.releases
                         else Releases(since=runtime.wall_clock()))
        self.updating: asyncio.Task[None] | None = None  #: the update in progress, if any
        self._source = Provisioner(
            spec, workdir / self.releases.folder, runtime, self._enter, self._output.write,
            process_id=self.process_id, port=port, request_id=request_id,
            reuse_source=resumed is not None,
        )
        options = spec.options
        self._stop_timeout = (
            runtime.stop_timeout if options.stop_timeout is None else options.stop_timeout
        )
        self._health = None if options.health is None else HealthCheck.from_json(options.health)
        # created stopped: nothing is downloaded until a start control
        stopped = resumed.stopped if resumed else not options.autostart
        self.state = S.STOPPED if stopped else S.PENDING
        #: why it failed, or what went wrong last (``error`` in the status document)
        self.error: str | None = None
        #: why it failed, as a name, while it is failed (``reason``); else ``None``
        self.reason: FailureReason | None = None
        self.exits: deque[ExitRecord] = deque(resumed.exits if resumed else (),
                                              maxlen=EXIT_HISTORY)
        self.next_start_at: float | None = None
        self._restarts = Restarts(count=resumed.restarts if resumed else 0)
        self._current: Run | None = None  # the last child's run, until it is stopped
        self._command: Command | None = None
        self._listeners: list[Listener] = []
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._deleted = False

    @property
    def build_key(self) -> str | None:
        """The key of the build of its source (see :mod:`~smartmob_agent.sources.builds`), once
        known; the agent keeps it from being collected."""
        return self._source.build_key

    # -- observation -----------------------------------------------------------------------

    @property
    def restarts(self) -> int:
        """How many times a child was started again after an exit."""
        return self._restarts.count

    @property
    def pid(self) -> int | None:
        """The pid of the current child while it lives, else ``None``."""
        return None if self._current is None else self._current.pid

    @property
    def healthy(self) -> bool | None:
        """The verdict of the current child's last health check (``None``: none yet)."""
        return None if self._current is None else self._current.healthy

    @property
    def last_exit(self) -> Exit | None:
        """How the last child ended, if one did."""
        return self.exits[-1].exit if self.exits else None

    def info(self) -> ProcessInfo:
        """Return a snapshot of the process for the API."""
        return _snapshot(self)

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(watcher, old, new)`` after each state change (what it raises is
        logged, and changes nothing)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        """Stop calling ``listener`` (no error if it was not added)."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _emit(self, kind: EventKind, **fields: Any) -> None:
        if self._runtime.emit is not None:
            reason = None if self.reason is None else self.reason.value
            self._runtime.emit(self, kind, {**fields, "reason": reason})

    # -- the state machine ---------------------------------------------------------------------

    def _enter(self, new: ProcessState, *, forced: bool = False) -> None:
        """Move to ``new``, tell the listeners and publish the change.

        Raises:
            InvalidTransition: the table has no edge to ``new`` (a bug of the agent), unless
                ``forced`` (only to leave a state that such a bug made untrue).
        """
        old = self.state
        if not forced:
            check_transition(old, new)
        self.state = new
        if new is not S.FAILED:  # a reason is that of the failure the process is in
            self.reason = None
        self._log.debug("%s: %s -> %s", self.spec.slug, old, new)
        for listener in list(self._listeners):
            try:  # the transition happened: a listener's failure must not undo half of it
                listener(self, old, new)
            except Exception:
                log.exception("%s: a listener failed on %s -> %s", self.spec.slug, old, new)
        self._emit("process:state", previous=old.value)
        if new is S.RUNNING:
            self._emit("process:online")

    def _fail(self, error: str, reason: FailureReason) -> None:
        self.error = error
        self.reason = reason
        self._log.warning("%s failed (%s): %s", self.spec.slug, reason, error)
        legal = S.FAILED in TRANSITIONS[self.state]
        if not legal:  # only after a bug (see _main): failed it is, all the same
            log.error("%s: forced from %s to failed", self.spec.slug, self.state)
        self._enter(S.FAILED, forced=not legal)
        self._emit("process:exception", error=error)

    # -- the run loop ----------------------------------------------------------------------------

    def start(self) -> None:
        """Begin provisioning and supervising, unless created with ``autostart: false``."""
        if self.state is S.PENDING:
            self._launch()

    def _launch(self, adopted: Run | None = None) -> None:
        assert self._task is None or self._task.done(), "one run task at a time"
        self._wake.clear()
        self._task = asyncio.get_running_loop().create_task(
            self._main(adopted), name=f"watcher {self.spec.slug}"
        )

    async def _main(self, adopted: Run | None = None) -> None:
        """The run task: provision once, then supervise (``adopted`` first, a child an
        update started); what ends it ends in ``failed``."""
        try:
            if self._command is None:
                self._command = await self._source.provision()
            await self._supervise(self._command, adopted)
        except AgentError as error:
            self._fail(str(error), failure_reason(error))
        except asyncio.CancelledError:
            raise
        except Exception as error:  # a bug (an illegal transition, say): the agent carries on
            log.exception("%s: unexpected error", self.spec.slug)
            try:  # a failed process has no child: a later start must not make it two
                await self._end_run("failed")
            except Exception:
                log.exception("%s: its child could not be stopped", self.spec.slug)
            self._current = None
            self._fail(f"internal error of the agent: {type(error).__name__}: {error}",
                       FailureReason.INTERNAL_ERROR)

    async def _supervise(self, command: Command, adopted: Run | None = None) -> None:
        """Run the command (first, supervise ``adopted`` if given, already running), and
        again each time it exits, until the policy says no or a stop cancels this task."""
        runtime, options = self._runtime, self.spec.options
        while True:
            # a start control may have entered it; an adopted child runs already
            if self.state is not S.STARTING and not (adopted and self.state is S.RUNNING):
                self._enter(S.STARTING)  # PENDING/UNPACKING/BUILDING/RUNNING/BACKOFF -> STARTING
            try:
                run, adopted = adopted or Run.start(
                    command, self.spec, self.restarts, runtime, output=self._output,
                    agent_log=self._log, listener=self.listener), None
            except SpawnError as error:
                if not error.transient:
                    raise
                # out of fds, memory or processes: that may pass, so try again later
                self.error = str(error)
                self._log.warning("%s: %s; trying again", self.spec.slug, error)
                await self._back_off(self._restarts.after_spawn_failure(options.backoff))
                continue
            self._current = run
            self.error = None
            if self.state is not S.RUNNING:  # an adopted child may replace a running one
                self._enter(S.RUNNING)  # STARTING -> RUNNING
            if self._health is not None:
                probe = health_probe(self._health, command, runtime,
                                     run.probe_port or self.port, self.spec.options)
                run.watch_health(self._health, probe, functools.partial(self._unhealthy, run))
            exit = await run.wait()
            if not await self._after_exit(run, exit, runtime.clock() - run.started):
                return

    async def _after_exit(self, run: Run, exit: Exit, ran_for: float) -> bool:
        """Record an exit and act on the policy's decision; ``True`` to run again."""
        self._record_exit(run, exit, run.restart_reason, ran_for)
        decision = self._restarts.after_exit(
            self.spec.options, exit, ran_for, self._runtime.jitter(),
            on_purpose=run.restart_reason is not None,
        )
        if decision.action is Action.FAIL:
            # what escaped the run's group goes too: a later start must not find it
            await run.finish(exit, self._marker)
            last = "".join(self._output.tail(1))
            raise failure(decision, exit, self.spec.process_type, last)
        await run.finish(exit, self._marker)
        if decision.action is Action.EXIT:
            self._enter(S.EXITED)  # RUNNING -> EXITED
            return False
        if decision.delay > 0:
            await self._back_off(decision.wait)  # RUNNING -> BACKOFF
        return True

    def _record_exit(
        self, run: Run, exit: Exit, reason: str | None, ran_for: float | None = None
    ) -> None:
        """Keep the exit of ``run`` in :attr:`exits` and publish it (see :meth:`.Run.record`)."""
        record = run.record(exit, reason, self._runtime.wall_clock(), ran_for)
        self.exits.append(record)
        self._emit("process:exit", pid=run.child.pid, code=exit.code, signal=exit.signal,
                   ran_for=round(record.ran_for, 3))

    async def _back_off(self, wait: float) -> None:
        """Wait in ``backoff`` for ``wait`` seconds, or until a start control cuts it short."""
        self.next_start_at = self._runtime.wall_clock() + wait
        self._enter(S.BACKOFF)
        self._output.announce("backoff", delay=round(wait, 3))
        self._wake.clear()
        try:
            await sleep_unless(self._wake, self._runtime.sleep(wait))
        finally:
            self.next_start_at = None

    async def _unhealthy(self, run: Run, reason: str) -> None:
        """Restart ``run``'s child after failed health checks (in a task of its own)."""
        async with self._lock:
            # the run it judged, not whatever runs now (a restart may have replaced it)
            if self._current is not run or self.state is not S.RUNNING or run.child.exited:
                return  # it exited or was stopped meanwhile: nothing to restart
            # the run loop sees the exit and restarts it at once, as after a long run
            run.restart_reason = f"unhealthy: {reason}"
            await run.child.stop(self.spec.options.signal_number, self._stop_timeout)

    # -- controls ------------------------------------------------------------------------------

    @_control
    async def request_start(self) -> None:
        """Start a resting process again, or cut a backoff short; backoff and the count of
        failed starts begin afresh.

        Raises:
            Conflict: the process is already starting or running, or is being stopped.
        """
        self._start_now()

    def _start_now(self) -> None:
        state = self.state
        if state is not S.BACKOFF and state not in RESTING_STATES:
            raise Conflict(
                self._exiting() or f"process {self.spec.slug!r} is {state}: start applies to "
                "a stopped, exited, failed or backoff process"
            )
        self._restarts.reset()
        if state is S.BACKOFF:
            self._enter(S.STARTING)  # the run loop, woken, spawns at once
            self._wake.set()
            return
        self.error = None
        self._enter(S.STARTING if self._command is not None else S.PENDING)
        self._launch()

    @_control
    async def request_stop(self) -> None:
        """Stop the process and keep it (state ``stopped``, no restarts).

        Raises:
            Conflict: it is already stopped or stopping.
        """
        if self.state in (S.STOPPED, S.STOPPING):
            raise Conflict(f"process {self.spec.slug!r} is already {self.state}")
        await self._halt()

    @_control
    async def request_restart(self) -> None:
        """Stop the process (waiting until its old child and descendants are gone), then
        start it again.

        Raises:
            Conflict: it is being stopped.
        """
        if self.state is S.STOPPING:
            raise Conflict(f"process {self.spec.slug!r} is stopping")
        if self.state is not S.STOPPED:
            await self._halt("restarted")
        self._start_now()

    @_control
    async def request_signal(self, name: str) -> None:
        """Send ``SIG<name>`` to the child's process group and descendants; the restart
        policy applies as usual to what follows.

        Raises:
            Conflict: no child is running.
        """
        child = self._live_child()
        if self.state is not S.RUNNING or child is None:
            raise Conflict(
                self._exiting() or f"process {self.spec.slug!r} is {self.state}: only a "
                "running process can be signalled"
            )
        child.send_signal(signal.Signals[f"SIG{name}"])

    def send_input(self, text: str) -> bool:
        """Write ``text`` and a newline to the running child's stdin.

        Returns:
            ``False`` if no child is running or it is not reading its input.
        """
        child = self._live_child()
        return child is not None and child.write_input(text.encode() + b"\n")

    def _exiting(self) -> str | None:
        """Why a control cannot act now on a ``running`` process whose child has exited
        (the moment the agent takes to record the exit and apply the policy), or ``None``."""
        if self.state is not S.RUNNING or self.pid is not None:
            return None
        return (f"process {self.spec.slug!r} is running but its child has just exited: the "
                "agent is handling the exit; try again in a moment")

    def _live_child(self) -> Child | None:
        run = self._current
        return None if run is None or run.child.exited else run.child

    async def stop(self, *, final: bool = False) -> None:
        """Bring the process to ``stopped`` whatever it is doing, and wait until its child
        and descendants are gone; used by delete (``final``: no control may start it
        again) and shutdown.

        Safe to call many times and concurrently: the later callers find it stopped.
        """
        update, self.updating = self.updating, None
        await cancel_and_wait(update, self.spec.slug)  # it stops the child it started, if any
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
        try:  # whatever happens below, the process must not stay in STOPPING
            task, self._task = self._task, None
            await cancel_and_wait(task, self.spec.slug)
            await self._end_run(reason)
        except TimeoutError:
            # SIGKILL cannot be ignored: only a process stuck in the kernel gets here
            assert self._current is not None
            self.error = f"process {self._current.child.pid} did not exit even after SIGKILL"
            log.error("%s: %s", self.spec.slug, self.error)
        finally:
            self._current = None
            self._enter(S.STOPPED)  # STOPPING -> STOPPED

    async def _end_run(self, reason: str) -> None:
        """Stop the current run's child if it lives, and what it left behind; its exit is
        recorded once, with ``reason``."""
        run = self._current
        if run is None:
            return
        await run.stop(self.spec.options.signal_number, self._stop_timeout, self._marker,
                       lambda exit: self._record_exit(run, exit, reason))

    # -- updates (see smartmob_agent.supervision.update) -----------------------------------

    @contextlib.asynccontextmanager
    async def controlled(self) -> AsyncIterator[None]:
        """Hold the controls' lock: no control runs meanwhile (an update's switch).

        Raises:
            Conflict: the process is being deleted.
        """
        async with self._lock:
            if self._deleted:
                raise Conflict(f"process {self.spec.slug!r} is being deleted")
            yield

    def spawn(self, version: Version) -> Run:
        """Start a child of ``version`` beside the current one (see :meth:`adopt`)."""
        return Run.start(version.command, version.spec, self.restarts, self._runtime,
                         output=self._output, agent_log=self._log, listener=self.listener)

    async def adopt(self, version: Version, run: Run | None) -> None:
        """Make ``version`` the process's, under :meth:`controlled`: with ``run`` (its
        child, started by the update) the run loop supervises it at once, and the old
        child is stopped with its own stop signal and timeout; without, a process that
        is not ``stopped`` starts ``version`` now."""
        await cancel_and_wait(self._task, self.spec.slug)  # the old child lives on
        old, self._task, self._current = self._current, None, None
        old_stop = (self.spec.options.signal_number, self._stop_timeout, self._marker)
        self.spec, self._source, self._command = version.spec, version.source, version.command
        self.process_id, self.port = version.process_id, version.port
        self._marker = f"{PROCESS_ID_VARIABLE}={self.process_id}"
        options = version.spec.options
        self._stop_timeout = (
            self._runtime.stop_timeout if options.stop_timeout is None else options.stop_timeout
        )
        self._health = None if options.health is None else HealthCheck.from_json(options.health)
        self._restarts.reset()  # a new version: its failed starts count afresh
        if run is not None or self.state is not S.STOPPED:
            self.error = None
            self._launch(run)
        if old is not None:
            await old.stop(*old_stop, lambda exit: self._record_exit(old, exit, "updated"))

    def close(self) -> None:
        """End the output stream: attached clients are told the process is gone; say in
        the agent's log what records about it were held back."""
        self.hub.close()
        self._log.flush()
        if self.listener is not None:  # no child left to pass it to
            self.listener.close()

    async def remove_files(self) -> None:
        """Delete the process's work folder and output logs (after :meth:`stop`)."""
        await self.output_log.remove()
        await asyncio.to_thread(shutil.rmtree, self.workdir, True)


def _snapshot(watcher: Watcher) -> ProcessInfo:
    """What :meth:`Watcher.info` returns: outside the class, which is the lifecycle only."""
    pid, state, runtime = watcher.pid, watcher.state, watcher._runtime
    usage = None if pid is None or runtime.monitor is None else runtime.monitor.usage(pid)
    current = watcher._current
    started_at = None if pid is None or current is None else current.started_at
    crashed = state in (S.BACKOFF, S.FAILED, S.EXITED)
    return ProcessInfo(
        spec=watcher.spec, state=state, pid=pid, error=watcher.error,
        restarts=watcher.restarts, last_exit=watcher.exits[-1] if watcher.exits else None,
        exits=tuple(watcher.exits), started_at=started_at, port=watcher.port,
        healthy=watcher.healthy,
        uptime=None if started_at is None else max(0.0, runtime.wall_clock() - started_at),
        cpu_percent=None if usage is None else usage.cpu_percent,
        memory_rss=None if usage is None else usage.memory_rss,
        backoff_delay=watcher._restarts.delay if state is S.BACKOFF else None,
        next_start_at=watcher.next_start_at if state is S.BACKOFF else None,
        output_tail=watcher._output.tail(OUTPUT_TAIL) if crashed else (),
        stop_timeout=watcher._stop_timeout,
        download=watcher._source.download if state is S.DOWNLOADING else None,
        reason=watcher.reason,
        source=SourceRef(watcher.spec.source_url, watcher.spec.sha256,
                         watcher.releases.since),
        releases=copy.copy(watcher.releases),
    )
