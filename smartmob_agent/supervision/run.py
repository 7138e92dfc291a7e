"""One run of a process: one child, from its spawn to its reaping, and its bookkeeping.

A :class:`~smartmob_agent.supervision.watcher.Watcher` makes a :class:`Run` for each
child it spawns. The run keeps what belongs to that child only: when it started, why
the agent ended it (if it did), whether its exit was recorded and announced, and its
health checks. A new child gets a new run, so nothing of one child's bookkeeping can
leak into the next one's.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from smartmob_agent.errors import SpawnError
from smartmob_agent.model import Exit, ExitRecord, Options, Spec
from smartmob_agent.output.hub import Hub
from smartmob_agent.output.logs import ProcessLog
from smartmob_agent.output.throttle import RepeatLimit
from smartmob_agent.processes.sockets import private_listener
from smartmob_agent.processes.spawn import Child
from smartmob_agent.processes.stop import stop_marked
from smartmob_agent.supervision.health import (
    HealthCheck,
    HealthMonitor,
    ProbeResult,
    probe_command,
    probe_http,
)
from smartmob_agent.supervision.provision import Command
from smartmob_agent.supervision.runtime import Runtime

log = logging.getLogger("smartmob_agent.watcher")  # stable name: its messages were the watcher's

#: How long the pipes of a run that ended may stay open before its leftovers are killed.
LEFTOVER_GRACE = 0.05

#: A health probe of a process: one check, its result.
Probe = Callable[[], Awaitable[ProbeResult]]


class Output:
    """The output of one process: each batch of lines to its log, then to the attached
    clients, and the markers of its runs' lives (see :meth:`.Hub.announce`).

    Args:
        hub: the fan-out of the lines to the attached clients.
        log: every line, with its stream and time.
        wall_clock: the time of the markers, in seconds since the epoch.
    """

    def __init__(self, hub: Hub, log: ProcessLog, wall_clock: Callable[[], float]) -> None:
        self.hub = hub
        self.log = log
        self._wall_clock = wall_clock

    @classmethod
    def open(cls, slug: str, runtime: Runtime, first_seq: int = 0) -> Output:
        """The output of process ``slug``, its log as the runtime's settings say (its files
        read back), its lines numbered from ``first_seq`` on."""
        log = ProcessLog(
            None if runtime.logs_dir is None else runtime.logs_dir / slug,
            lines=runtime.log_lines, max_bytes=runtime.log_max_bytes, files=runtime.log_files,
            clock=runtime.wall_clock, first_seq=first_seq,
            reserve=None if runtime.reserve_seq is None
            else functools.partial(runtime.reserve_seq, slug),
        )
        return cls(Hub(), log, runtime.wall_clock)

    def write(self, stream: str, lines: list[bytes]) -> None:
        """A batch of a child's output (a :data:`~smartmob_agent.processes.spawn.Sink`)."""
        self.hub.publish(stream, lines, self.log.append(stream, lines))

    def announce(self, event: str, **fields: Any) -> None:
        """Tell the attached clients of ``event`` in the life of a run, with the time."""
        self.hub.announce({"event": event, "at": self._wall_clock(), **fields})

    def tail(self, count: int) -> tuple[str, ...]:
        """The last ``count`` lines of output, as text."""
        recent = list(self.hub.recent)[-count:] if count > 0 else []
        return tuple(line.decode(errors="replace") for line in recent)


class Run:
    """One child of a process and what the watcher keeps about it; made by :meth:`start`.

    Args:
        child: the child, just spawned.
        slug: the process's name, for the log.
        restarts: the process's restart count when it was spawned.
        runtime: the clocks (when it started) and the usage monitor (which measures it).
        output: the process's output, told of the spawn and of the exit.
        agent_log: where the run's records go in the agent's log: the process's
            :class:`.RepeatLimit`, which a crash loop's records do not flood.
    """

    def __init__(
        self, child: Child, slug: str, restarts: int, *, runtime: Runtime, output: Output,
        agent_log: RepeatLimit,
    ) -> None:
        self.child = child
        self.slug = slug
        self.agent_log = agent_log
        self.restarts = restarts
        #: when it was spawned, on the monotonic clock (for how long it ran)
        self.started = runtime.clock()
        #: when it was spawned, in seconds since the epoch (for the API)
        self.started_at = runtime.wall_clock()
        #: why the agent ends this child, once it decided to (``"unhealthy: ..."``): it is
        #: then started again at once, whatever the restart policy
        self.restart_reason: str | None = None
        #: its exit is in the process's ``exits`` (and was published) already
        self.exit_recorded = False
        #: the last health check's verdict; ``None`` before the first, or without checks
        self.healthy: bool | None = None
        #: the port of its own health socket (fd 4), if it has one: HTTP probes go there
        self.probe_port: int | None = None
        # the restart asked for by failed health checks, while it runs
        self._unhealthy_task: asyncio.Task[None] | None = None
        self._exit_announced = False
        self._health_task: asyncio.Task[None] | None = None
        self._output = output
        self._monitor = runtime.monitor

    @classmethod
    def start(
        cls, command: Command, spec: Spec, restarts: int, runtime: Runtime, *,
        output: Output, agent_log: RepeatLimit, listener: socket.socket | None = None,
    ) -> Run:
        """Spawn a child of process ``spec`` that runs ``command``, its lines to ``output``
        (and its records to ``agent_log``), ``listener`` its fd 3 if given; announce it
        and have it measured.

        A child that shares ``listener`` and has an HTTP health check also gets a socket
        of its own as fd 4 (named ``health``), which its probes go to: on the shared
        port, a probe could reach another child (see :ref:`deploys-health`).

        Raises:
            SpawnError: it could not be started (see :meth:`.Child.spawn`).
        """
        options = spec.options
        listen = [] if listener is None else [(listener, spec.process_type)]
        probe_port = None
        if listen and options.health is not None and "http" in options.health:
            try:
                listen.append((private_listener(), "health"))
            except OSError as error:  # out of fds, say: that may pass
                raise SpawnError(f"could not open its health socket: {error}",
                                 transient=True) from None
            probe_port = listen[1][0].getsockname()[1]
        try:
            child = Child.spawn(
                command.command, cwd=command.cwd, env=command.env, sink=output.write,
                reaper=runtime.reaper, umask=options.umask, run_as=runtime.run_as,
                rlimits=options.rlimits, listen=[(s.fileno(), name) for s, name in listen],
            )
        finally:  # the child has its own copy; the port lives as long as it does
            for private, _ in listen[1:]:
                private.close()
        run = cls(child, spec.slug, restarts, runtime=runtime, output=output,
                  agent_log=agent_log)
        run.probe_port = probe_port
        run.announce_spawn()
        if run._monitor is not None:
            run._monitor.track(child.pid)
        return run

    @property
    def pid(self) -> int | None:
        """The child's pid while it lives, else ``None``."""
        return None if self.child.exited else self.child.pid

    # -- lifecycle markers of the output stream (see :meth:`.Hub.announce`) --------------------

    def announce_spawn(self) -> None:
        """Mark the start of the run in the output stream and its log."""
        self._output.log.set_run(self.child.pid, self.restarts)
        self._output.announce("spawned", pid=self.child.pid, restarts=self.restarts)

    def announce_exit(self, exit: Exit) -> None:
        """Mark the end of the run, after its last output line; once."""
        if self._exit_announced:
            return
        self._exit_announced = True
        if self._output.log.run_pid == self.child.pid:  # not a newer run's (an update's)
            self._output.log.set_run(None, None)
        self._output.announce("exited", pid=self.child.pid, restarts=self.restarts,
                              code=exit.code, signal=exit.signal)

    # -- health -----------------------------------------------------------------------------

    def watch_health(
        self, check: HealthCheck, probe: Probe,
        restart: Callable[[str], Coroutine[Any, Any, None]],
    ) -> None:
        """Probe the child as ``check`` says, in a task of its own, until
        :meth:`stop_health`; after too many failures, run ``restart(reason)`` in a task
        (which :meth:`finish` waits for)."""
        self.healthy = None

        def on_change(healthy: bool | None) -> None:
            self.healthy = healthy

        slug = self.slug

        def on_unhealthy(reason: str) -> None:
            self.agent_log.warning("%s: %s; restarting it", slug, reason)
            task = asyncio.get_running_loop().create_task(
                restart(reason), name=f"unhealthy {slug}"
            )
            task.add_done_callback(functools.partial(_log_failure, slug))
            self._unhealthy_task = task

        monitor = HealthMonitor(check, probe, on_change, on_unhealthy)
        self._health_task = asyncio.get_running_loop().create_task(
            monitor.run(), name=f"health {slug}"
        )

    async def stop_health(self) -> None:
        """Stop the health checks (the child ended, or is being stopped)."""
        task, self._health_task = self._health_task, None
        if task is not None:
            task.cancel()
            # not `await task` under suppress(CancelledError): if the caller (the run task)
            # is cancelled meanwhile, Task.cancel() is forwarded to the awaited health task
            # and the caller's own cancellation would be swallowed here
            await asyncio.wait({task})
        self.healthy = None  # no child: nothing to be healthy

    # -- the end of the run -----------------------------------------------------------------

    async def wait(self) -> Exit:
        """Wait for the child's exit; its health checks and its measures end with it."""
        try:
            return await self.child.wait()
        finally:
            self._untrack()
            await self.stop_health()

    def record(
        self, exit: Exit, reason: str | None, now: float, ran_for: float | None
    ) -> ExitRecord:
        """Log the exit and return its record, marking it recorded; ``ran_for`` defaults to
        the time since it started, on the wall clock (a stop)."""
        how = "on stop" if ran_for is None else f"after {ran_for:.3f} s"
        if ran_for is None:
            ran_for = max(0.0, now - self.started_at)
        self.exit_recorded = True
        self.agent_log.info(
            "%s: process %d %s %s", self.slug, self.child.pid, exit.describe(), how
        )
        return ExitRecord(exit, now, ran_for, reason)

    def _untrack(self) -> None:
        if self._monitor is not None:
            self._monitor.untrack(self.child.pid)

    async def stop(
        self, sig: int, timeout: float, marker: str, record: Callable[[Exit], None]
    ) -> None:
        """Stop the child with the stop sequence if it lives, then the descendants that
        left its group (found by ``marker``); ``record(exit)`` is called once, at the
        first chance, unless its exit was recorded already.

        Raises:
            TimeoutError: a process did not exit even after ``SIGKILL``.
        """
        await self.stop_health()
        child = self.child
        if not child.exited:
            record(await child.stop(sig, timeout))
        elif not self.exit_recorded:
            # it exited while the supervision task was being cancelled
            record(await child.wait())
        # descendants that left the group and lost their parent, if any
        await stop_marked(marker, timeout)
        await self.settle()
        if child.exited:
            self.announce_exit(await child.wait())
        self._untrack()

    async def finish(self, exit: Exit, marker: str) -> None:
        """End a run whose child exited and is followed by another or none: once the stop
        sequence of a health restart is over, clear the leftovers and announce the exit."""
        if self.restart_reason is not None and self._unhealthy_task is not None:
            # the health restart is still giving the old run's descendants their stop
            # timeout (it ends with SIGKILL): do not cut it short, nor start a new child
            await asyncio.wait({self._unhealthy_task})
        await self.clear_leftovers(marker)
        self.announce_exit(exit)

    async def clear_leftovers(self, marker: str) -> None:
        """After a run ends by itself, kill what escaped its group and holds its pipes.

        The group's leftovers are already gone (see :class:`Child`); a descendant that
        called ``setsid`` would otherwise keep the old pipes, and its output, for ever.
        """
        try:
            async with asyncio.timeout(LEFTOVER_GRACE):
                await self.child.output_closed()
            return
        except TimeoutError:
            pass
        killed = await stop_marked(marker, 0.0, signal.SIGKILL)
        if killed:
            self.agent_log.info(
                "%s: killed %d leftover process(es) of the last run", self.slug, killed
            )
        await self.settle()

    async def settle(self, timeout: float = 1.0) -> None:
        """Give the pipes a moment to deliver the last lines, then stop reading them.

        A descendant that left the process group may hold them open for ever.
        """
        try:
            async with asyncio.timeout(timeout):
                await self.child.output_closed()
        except TimeoutError:
            self.child.close_output()


def _log_failure(slug: str, task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("%s: %s failed", slug, task.get_name(), exc_info=task.exception())


def health_probe(
    check: HealthCheck, command: Command, runtime: Runtime, port: int | None,
    options: Options,
) -> Probe:
    """The probe of ``check`` for a process that runs ``command`` on ``port``: a request to
    its HTTP path, or its probe command run beside it, with the process's ``umask`` and
    ``rlimits`` (``options``), as its children have."""

    async def probe() -> ProbeResult:
        if check.http is not None:
            if port is None:
                return ProbeResult(False, "the process has no usable PORT to probe")
            return await probe_http(runtime.session, port, check.http, check.timeout)
        assert check.command is not None
        return await probe_command(
            check.command, command.cwd, command.env, check.timeout,
            reaper=runtime.reaper, run_as=runtime.run_as, umask=options.umask,
            rlimits=options.rlimits,
        )

    return probe


async def sleep_unless(event: asyncio.Event, sleep: Awaitable[None]) -> None:
    """Wait until ``sleep`` is over or ``event`` is set, whichever comes first."""
    sleeping = asyncio.ensure_future(sleep)
    woken = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({sleeping, woken}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        sleeping.cancel()
        woken.cancel()


async def cancel_and_wait(task: asyncio.Task[None] | None, slug: str) -> None:
    """Cancel the run task ``task`` (if any) and wait for its end."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    except Exception:  # a bug of the run task: log it, stop all the same
        log.exception("%s: the run task failed", slug)
