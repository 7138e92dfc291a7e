"""Starting commands, and one run of a command: spawn, output, exit (the OS adapter).

:func:`spawn_shell` is the one way the agent starts a command (a process's, a build
step's, a health check's): ``/bin/sh -c COMMAND`` in a new session (so it leads its own
process group), with the process's umask, user and resource limits, watched by the
agent's :class:`~smartmob_agent.processes.reaper.Reaper`.

A :class:`Child` is one pid from spawn to reap. It reads stdout and stderr in 64 KiB
chunks straight from the pipes into a :class:`~smartmob_agent.output.lines.LineSplitter`,
and learns of its exit from its pidfd (through the reaper) the moment the kernel records
it, whatever happened to the pipes (a grandchild may hold them open for ever). Stopping
it stops its whole tree: see :mod:`~smartmob_agent.processes.stop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import resource
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from smartmob_agent.errors import SpawnError
from smartmob_agent.model import RLIMIT_NAMES, Exit, RunAs
from smartmob_agent.output.lines import DEFAULT_MAX_LINE, LineSplitter
from smartmob_agent.processes.privacy import children_umask
from smartmob_agent.processes.reaper import Reaper
from smartmob_agent.processes.stop import signal_tree, stop_tree

#: Receives batches of output lines: ``sink(stream, lines)``.
Sink = Callable[[str, list[bytes]], None]
#: What :class:`subprocess.Popen` takes for a standard stream: ``PIPE``, ``DEVNULL``, a
#: file descriptor, a file, or ``None`` (the agent's own).
Stream = int | IO[Any] | None

_CHUNK = 64 * 1024
#: errno values of a failed spawn that may go away by themselves (resources exhausted).
TRANSIENT_SPAWN_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM})
#: Input waiting for a child that does not read its stdin; beyond this, input is refused.
MAX_STDIN_BUFFER = 64 * 1024


#: The ``resource`` constant of each name of :data:`~smartmob_agent.model.RLIMIT_NAMES`.
_RLIMITS: Mapping[str, int] = {
    "nofile": resource.RLIMIT_NOFILE, "as": resource.RLIMIT_AS,
    "nproc": resource.RLIMIT_NPROC, "core": resource.RLIMIT_CORE,
    "cpu": resource.RLIMIT_CPU, "fsize": resource.RLIMIT_FSIZE,
}
assert set(_RLIMITS) == set(RLIMIT_NAMES)


def hard_limits() -> dict[str, int | None]:
    """The agent's own hard resource limits, by ``rlimits`` name (``None``: unlimited)."""
    limits: dict[str, int | None] = {}
    for name, number in _RLIMITS.items():
        hard = resource.getrlimit(number)[1]
        limits[name] = None if hard == resource.RLIM_INFINITY else hard
    return limits


def _limiter(rlimits: Sequence[tuple[str, int | None]]) -> Callable[[], None]:
    """The function the child runs between fork and exec: sets each limit, soft and hard,
    from values computed here (nothing to look up or allocate there)."""
    pairs = tuple(
        (_RLIMITS[name], resource.RLIM_INFINITY if value is None else value)
        for name, value in rlimits
    )
    setrlimit = resource.setrlimit

    def apply() -> None:
        for number, value in pairs:
            setrlimit(number, (value, value))

    return apply


class ShellNotStarted(SpawnError):
    """What :func:`spawn_shell` raises: a :class:`~smartmob_agent.errors.SpawnError`
    worded for a process's command, with its cause apart for callers that word their own.

    Attributes:
        reason: why, in a few words (``"No such file or directory"``).
        watching: the shell started but could not be watched (it was killed and reaped).
    """

    def __init__(
        self, message: str, reason: str, *, watching: bool = False, transient: bool = False
    ) -> None:
        super().__init__(message, transient=transient)
        self.reason = reason
        self.watching = watching


def spawn_shell(
    command: str,
    *,
    cwd: Path,
    env: Mapping[str, str],
    reaper: Reaper,
    stdin: Stream,
    stdout: Stream,
    stderr: Stream,
    umask: int | None = None,
    run_as: RunAs | None = None,
    rlimits: Sequence[tuple[str, int | None]] = (),
) -> subprocess.Popen[bytes]:
    """Start ``/bin/sh -c command`` in ``cwd`` with exactly ``env``, in a new session,
    watched by ``reaper``.

    ``umask`` (if given) is set in the child before it runs the shell, as the user, group
    and groups of ``run_as`` are, then the resource limits ``rlimits`` (soft and hard;
    ``None`` is unlimited). The standard streams are as :class:`subprocess.Popen` takes
    them. The reaper reports the exit to nobody until the caller names who gets it with
    :meth:`~smartmob_agent.processes.reaper.Reaper.redirect`, before the event loop runs
    again.

    Raises:
        ShellNotStarted: if the shell could not be started (missing folder, no /bin/sh, a
            limit the kernel refuses) or watched (then it was killed).
        ValueError: a NUL character in ``command`` or ``env``, as :mod:`subprocess` says.
    """
    popen = _start(command, cwd, env, (stdin, stdout, stderr), umask, run_as, rlimits)
    try:
        reaper.watch(popen.pid, lambda status: None)
    except OSError as error:  # no pidfd to be had: do not leave the child unwatched
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGKILL)
        popen.wait()
        for pipe in (popen.stdin, popen.stdout, popen.stderr):
            if pipe is not None:
                pipe.close()
        reason = error.strerror or str(error)
        raise ShellNotStarted(
            f"could not watch the new process: {reason}", reason, watching=True,
            transient=error.errno in TRANSIENT_SPAWN_ERRORS,
        ) from None
    return popen


def _start(
    command: str, cwd: Path, env: Mapping[str, str], streams: tuple[Stream, Stream, Stream],
    umask: int | None, run_as: RunAs | None, rlimits: Sequence[tuple[str, int | None]],
) -> subprocess.Popen[bytes]:
    """The :class:`subprocess.Popen` of :func:`spawn_shell`, its failures worded."""
    stdin, stdout, stderr = streams
    try:
        return subprocess.Popen(
            ["/bin/sh", "-c", command],
            cwd=cwd,
            env=dict(env),
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            bufsize=0,  # read with os.read(): buffered readers would hold unused memory
            start_new_session=True,
            close_fds=True,
            umask=children_umask(umask),  # never the agent's own private one
            user=None if run_as is None else run_as.uid,
            group=None if run_as is None else run_as.gid,
            extra_groups=None if run_as is None else list(run_as.groups),
            # after the switch of user: lowering a limit needs no privilege
            preexec_fn=_limiter(rlimits) if rlimits else None,
        )
    except OSError as error:
        reason = error.strerror or str(error)
        raise ShellNotStarted(
            f"could not start /bin/sh in {cwd.name}: {reason}", reason,
            transient=error.errno in TRANSIENT_SPAWN_ERRORS,
        ) from None
    except subprocess.SubprocessError:  # the limits could not be set
        limits = ", ".join(f"{name}={'unlimited' if value is None else value}"
                           for name, value in rlimits)
        reason = f"the kernel refused its resource limits ({limits})"
        raise ShellNotStarted(
            f"could not start /bin/sh in {cwd.name}: {reason}", reason
        ) from None


class Child:
    """One running command. Create with :meth:`spawn`."""

    def __init__(self, popen: subprocess.Popen[bytes], sink: Sink, max_line: int) -> None:
        self._popen = popen
        self.pid: int = popen.pid
        self._sink = sink
        self._exit: asyncio.Future[Exit] = asyncio.get_running_loop().create_future()
        self._stopping = False
        self._open_streams = 0
        self._streams_closed = asyncio.Event()
        self._stdin = bytearray()
        if popen.stdin is not None:
            os.set_blocking(popen.stdin.fileno(), False)
        for stream, pipe in (("stdout", popen.stdout), ("stderr", popen.stderr)):
            assert pipe is not None
            self._read(stream, pipe.fileno(), LineSplitter(max_line))

    @classmethod
    def spawn(
        cls,
        command: str,
        *,
        cwd: Path,
        env: Mapping[str, str],
        sink: Sink,
        reaper: Reaper,
        max_line: int = DEFAULT_MAX_LINE,
        umask: int | None = None,
        run_as: RunAs | None = None,
        rlimits: Sequence[tuple[str, int | None]] = (),
    ) -> Child:
        """Start ``/bin/sh -c command`` in ``cwd`` with exactly ``env`` (see
        :func:`spawn_shell`, for ``umask``, ``run_as`` and ``rlimits``).

        Its stdin is a pipe the agent keeps open for :meth:`write_input`; its stdout and
        stderr are read into ``sink``, a line at a time.

        Raises:
            SpawnError: if the shell could not be started (missing folder, no /bin/sh, a
                limit the kernel refuses) or watched.
        """
        popen = spawn_shell(
            command, cwd=cwd, env=env, reaper=reaper,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            umask=umask, run_as=run_as, rlimits=rlimits,
        )
        child = cls(popen, sink, max_line)
        reaper.redirect(popen.pid, child._on_exit)
        return child

    # -- input ----------------------------------------------------------------------------

    def write_input(self, data: bytes) -> bool:
        """Queue ``data`` for the child's stdin, never blocking the agent.

        Returns:
            ``False`` (and writes nothing) if the child has exited, closed its stdin, or
            left earlier input unread that would make more than :data:`MAX_STDIN_BUFFER`
            bytes with ``data``. A line alone is always taken (its size is bounded by the
            attach socket's frame limit), so a 64 KiB frame and its newline go through.
        """
        pipe = self._popen.stdin
        if pipe is None or pipe.closed or self.exited:
            return False
        if self._stdin and len(self._stdin) + len(data) > MAX_STDIN_BUFFER:
            return False
        waiting = bool(self._stdin)
        self._stdin += data
        if not waiting:
            self._flush_input()  # closes the pipe if the child closed its end (EPIPE)
        return not pipe.closed

    def _flush_input(self) -> None:
        pipe = self._popen.stdin
        if pipe is None or pipe.closed:
            return
        loop = asyncio.get_running_loop()
        try:
            written = os.write(pipe.fileno(), self._stdin)
        except BlockingIOError:
            written = 0
        except OSError:  # the child closed its stdin (EPIPE): input has nowhere to go
            self._close_input()
            return
        del self._stdin[:written]
        if self._stdin:
            loop.add_writer(pipe.fileno(), self._flush_input)
        else:
            loop.remove_writer(pipe.fileno())

    def close_input(self) -> None:
        """Close the child's stdin: a program that reads it sees end of file at once
        (for commands nobody can type into, such as a build's)."""
        self._close_input()

    def _close_input(self) -> None:
        pipe = self._popen.stdin
        if pipe is not None and not pipe.closed:
            asyncio.get_running_loop().remove_writer(pipe.fileno())
            pipe.close()
        self._stdin.clear()

    # -- output -------------------------------------------------------------------------

    def _read(self, stream: str, fd: int, splitter: LineSplitter) -> None:
        os.set_blocking(fd, False)
        self._open_streams += 1
        asyncio.get_running_loop().add_reader(fd, self._on_readable, stream, fd, splitter)

    def _on_readable(self, stream: str, fd: int, splitter: LineSplitter) -> None:
        try:
            data = os.read(fd, _CHUNK)
        except BlockingIOError:  # pragma: no cover - spurious wake-up
            return
        except OSError:  # pragma: no cover - the pipe broke
            data = b""
        if data:
            lines = splitter.feed(data)
            if lines:
                self._sink(stream, lines)
            return
        lines = splitter.flush()
        if lines:
            self._sink(stream, lines)
        asyncio.get_running_loop().remove_reader(fd)
        pipe = self._popen.stdout if stream == "stdout" else self._popen.stderr
        assert pipe is not None
        pipe.close()
        self._open_streams -= 1
        if self._open_streams == 0:
            self._streams_closed.set()

    async def output_closed(self) -> None:
        """Wait until both pipes reached end of file (every writer of them is gone)."""
        await self._streams_closed.wait()

    def close_output(self) -> None:
        """Stop reading the pipes now, e.g. when a stray grandchild keeps them open."""
        loop = asyncio.get_running_loop()
        for pipe in (self._popen.stdout, self._popen.stderr):
            if pipe is not None and not pipe.closed:
                loop.remove_reader(pipe.fileno())
                pipe.close()
        self._open_streams = 0
        self._streams_closed.set()

    # -- exit ---------------------------------------------------------------------------

    def _on_exit(self, status: int) -> None:
        exit = Exit.from_wait_status(status)
        self._popen.returncode = exit.code
        # whatever is left of its process group would otherwise pile up at each restart;
        # during stop() the rest of the group keeps its grace period (the shell often dies
        # of SIGTERM at once while the command it runs is still cleaning up)
        if not self._stopping:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        self._close_input()
        self._exit.set_result(exit)

    @property
    def exited(self) -> bool:
        """Whether the child has exited and been reaped."""
        return self._exit.done()

    async def wait(self) -> Exit:
        """Wait for the child to exit; returns how it ended."""
        return await asyncio.shield(self._exit)

    # -- signals and stop -----------------------------------------------------------------

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the child's process group and to all its descendants."""
        signal_tree(self.pid, sig, reaped=self.exited)

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> Exit:
        """Stop the child and its descendants; returns the child's exit.

        Sends ``sig`` to the process group and to every descendant, waits up to
        ``timeout`` seconds for all of them to be gone, then SIGKILLs the rest (see
        :func:`~smartmob_agent.processes.stop.stop_tree`).
        """
        self._stopping = True
        await stop_tree(self.pid, sig, timeout, self._exit)
        return await self.wait()
