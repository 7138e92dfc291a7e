"""Starting commands, and one run of a command: spawn, output, exit (the OS adapter).

:func:`spawn_shell` is the one way the agent starts a command (a process's, a build
step's, a health check's): ``/bin/sh -c COMMAND`` in a new session (so it leads its own
process group), with the process's umask, user and resource limits, watched by the
agent's :class:`~smartmob_agent.processes.reaper.Reaper`. A simple command is run with
``exec`` (see :func:`exec_command`), so that the program replaces the shell and a signal
sent to the child reaches the program, not a shell that would die of it.

A child dies with the agent, even of ``SIGKILL``: it gets ``SIGKILL`` when the thread
that spawned it ends (Linux's parent-death signal, set by ``setpriv --pdeathsig`` before
the shell runs, see :func:`death_signal_wrapper`), and its shell exits at once if the
agent died before that was set (see :func:`shell_script`). So spawn only from a thread
that lives as long as the agent: the event loop's. The guardian
(:mod:`~smartmob_agent.processes.guardian`) ends the grandchildren.

A :class:`Child` is one pid from spawn to reap. It reads stdout and stderr in 64 KiB
chunks straight from the pipes into a :class:`~smartmob_agent.output.lines.LineSplitter`,
and learns of its exit from its pidfd (through the reaper) the moment the kernel records
it, whatever happened to the pipes (a grandchild may hold them open for ever). Stopping
it stops its whole tree: see :mod:`~smartmob_agent.processes.stop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import functools
import logging
import os
import re
import resource
import shlex
import shutil
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

log = logging.getLogger("smartmob_agent.child")  # stable name: internals.rst

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


#: The shell's reserved words and builtins: a command that starts with one is not a
#: program that ``exec`` could run (``exit 1``, ``cd dir``, ``if``...), or one whose
#: program of the same name may behave otherwise (``echo``, ``kill``, ``test``).
_SHELL_WORDS = frozenset({
    "!", "{", "}", "[[", "]]", "case", "do", "done", "elif", "else", "esac", "fi", "for",
    "function", "if", "in", "select", "then", "time", "until", "while",
    ".", ":", "[", "alias", "bg", "bind", "break", "builtin", "caller", "cd", "chdir",
    "command", "compgen", "complete", "continue", "declare", "dirs", "disown", "echo",
    "enable", "eval", "exec", "exit", "export", "false", "fc", "fg", "getopts", "hash",
    "help", "history", "jobs", "kill", "let", "local", "logout", "mapfile", "popd",
    "printf", "pushd", "pwd", "read", "readarray", "readonly", "return", "set", "shift",
    "shopt", "source", "suspend", "test", "times", "trap", "true", "type", "typeset",
    "ulimit", "umask", "unalias", "unset", "wait",
})
#: Characters of the shell's operators: a pipe, a list, a redirection, a subshell, a
#: command substitution (``$(...)``, backquotes), a background job.
_OPERATOR_CHARS = "|&;<>()`"
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")


def exec_command(command: str) -> str:
    """``command`` with ``exec`` in front if it is one simple command, else as it is.

    A simple command is a program and its arguments, with no operator outside quotes
    (``|``, ``&&``, ``;``, ``&``, redirections, ``(``, ``$(...)``, backquotes), no line
    break, and a first word that is neither a shell builtin or reserved word nor a
    variable assignment. With ``exec``, the program replaces ``/bin/sh`` (Debian's
    ``dash`` does not do it by itself), so the child's pid is the program's and a signal
    it handles does not kill a shell in between. The shell still expands the words
    first (``$PORT``, ``~``, globs). Anything else keeps its shell, which the command
    needs. Conservative: a quoted operator character keeps the shell too.

    >>> from smartmob_agent.processes.spawn import exec_command
    >>> exec_command("gunicorn -b :$PORT app:main")
    'exec gunicorn -b :$PORT app:main'
    >>> exec_command("python -c 'import a; a.main()'")
    "exec python -c 'import a; a.main()'"
    >>> exec_command("migrate && serve")
    'migrate && serve'
    >>> exec_command("DEBUG=1 serve")
    'DEBUG=1 serve'
    """
    if "\n" in command:
        return command
    lexer = shlex.shlex(command, posix=True, punctuation_chars=_OPERATOR_CHARS)
    lexer.whitespace_split = True
    lexer.commenters = ""  # "#" starts a comment only at a word's start: the shell decides
    try:
        words = list(lexer)
    except ValueError:  # an unclosed quote: the shell says what is wrong
        return command
    if not words or any(char in _OPERATOR_CHARS for word in words for char in word[:1]):
        return command
    first = words[0]
    if first in _SHELL_WORDS or first.startswith("-") or _ASSIGNMENT.match(first):
        return command
    return f"exec {command}"


#: The first file descriptor of the sockets a child inherits (systemd's
#: ``SD_LISTEN_FDS_START``).
LISTEN_FDS_START = 3


def shell_script(command: str, parent: int, *, listen: bool = False) -> str:
    """What ``/bin/sh -c`` runs for ``command``, spawned by process ``parent``.

    First a guard: the shell exits at once if its parent is no longer ``parent``. A
    child caught between fork and exec when the agent dies carries no marker yet (its
    environment is still the agent's), so the guardian's sweep cannot find it, and the
    parent-death signal, set after the agent died, would never come: this guard ends
    it. Then the command, through :func:`exec_command`. With ``listen`` (the child
    inherits sockets), ``LISTEN_PID`` is set to the shell's pid first: the program's own
    once ``exec`` replaces the shell, the shell's for a compound command.

    >>> from smartmob_agent.processes.spawn import shell_script
    >>> shell_script("serve", 42)
    '[ "$PPID" = 42 ] || exit 1; exec serve'
    >>> shell_script("serve", 42, listen=True)
    '[ "$PPID" = 42 ] || exit 1; LISTEN_PID=$$; export LISTEN_PID; exec serve'
    """
    listen_pid = "LISTEN_PID=$$; export LISTEN_PID; " if listen else ""
    return f'[ "$PPID" = {parent} ] || exit 1; {listen_pid}{exec_command(command)}'


_PR_SET_PDEATHSIG = 1


@functools.cache
def death_signal_wrapper() -> tuple[str, ...]:
    """The start of a child's command line that gives it ``SIGKILL`` when its parent
    thread ends: ``setpriv --pdeathsig KILL --`` (util-linux 2.33 or newer).

    A program run before the shell, since setting it in Python between fork and exec
    (``preexec_fn``) would make :mod:`subprocess` fork instead of vfork: ~1.3 ms more per
    spawn for a 10 MB process, ~2.7 ms for a 50 MB one, more on a busy machine, during
    which the event loop waits (``benchmarks/spawn.py --spawn-cost``); setpriv costs the
    child ~0.9 ms and the agent nothing. Found and tried once; ``()`` when it is missing
    or refuses the option: the child then sets the signal in Python, in a
    ``preexec_fn``.
    """
    setpriv = shutil.which("setpriv", path="/usr/bin:/bin:/usr/sbin:/sbin")
    if setpriv is not None:
        wrapper = (setpriv, "--pdeathsig", "KILL", "--")
        if wrapper_works(wrapper):
            return wrapper
    log.warning(
        "setpriv (util-linux 2.33 or newer) is not available: each child sets its "
        "parent-death signal in Python between fork and exec, which makes spawning slower"
    )
    return ()


def wrapper_works(wrapper: tuple[str, ...]) -> bool:
    """Whether ``wrapper`` runs ``/bin/sh -c :`` and exits 0.

    The trial gets an empty environment, like every process the agent starts gets none
    of its keys: the agent's own environment may hold ``SMARTMOB_TOKEN``, and another
    process of the same user could read it from ``/proc/<pid>/environ`` while it runs.
    """
    try:
        tried = subprocess.run(
            [*wrapper, "/bin/sh", "-c", ":"], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10,
            check=False, env={},
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return tried.returncode == 0


def _prctl() -> Callable[..., int] | None:
    """libc's ``prctl``, or ``None`` where there is none."""
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return None
    return prctl


def _child_setup(
    rlimits: Sequence[tuple[str, int | None]], death_signal: bool,
    listen_fds: Sequence[int] = (),
) -> Callable[[], None] | None:
    """The function the child runs between fork and exec, or ``None`` if there is
    nothing to do there (so that :mod:`subprocess` can vfork, which is faster).

    Sets the parent-death signal if ``death_signal`` (no :func:`death_signal_wrapper`),
    then each limit, soft and hard, from values computed here (nothing to look up or
    allocate there); and puts the sockets ``listen_fds`` at fds 3, 4... (a child that
    inherits sockets is forked, not vforked: :mod:`subprocess` cannot move an fd).
    """
    pairs = tuple(
        (_RLIMITS[name], resource.RLIM_INFINITY if value is None else value)
        for name, value in rlimits
    )
    setrlimit = resource.setrlimit
    prctl = _prctl() if death_signal else None
    if not pairs and prctl is None and not listen_fds:
        return None
    kill = int(signal.SIGKILL)
    sources = tuple(listen_fds)
    dup2, fcntl_, dupfd = os.dup2, fcntl.fcntl, fcntl.F_DUPFD

    def apply() -> None:
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, kill, 0, 0, 0)
        for number, value in pairs:
            setrlimit(number, (value, value))
        # first out of the way of the targets (a socket at fd 4 may go to 3, say); the
        # copies are closed with every fd the child does not keep
        copies = [fcntl_(fd, dupfd, 64) for fd in sources]
        for target, fd in enumerate(copies, LISTEN_FDS_START):
            dup2(fd, target)  # inheritable

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
    listen: Sequence[tuple[int, str]] = (),
) -> subprocess.Popen[bytes]:
    """Start ``/bin/sh -c command`` in ``cwd`` with exactly ``env``, in a new session,
    watched by ``reaper``; a simple command replaces the shell (see :func:`exec_command`),
    and the child dies with this thread (see :func:`death_signal_wrapper`).

    ``umask`` (if given) is set in the child before it runs the shell, as the user, group
    and groups of ``run_as`` are, then the resource limits ``rlimits`` (soft and hard;
    ``None`` is unlimited). The standard streams are as :class:`subprocess.Popen` takes
    them. The sockets of ``listen`` (each an fd and its name) are passed as systemd's
    socket activation does: at fds 3, 4..., with ``LISTEN_FDS``, ``LISTEN_FDNAMES`` and
    ``LISTEN_PID`` (see :func:`shell_script`). The reaper reports the exit to nobody
    until the caller names who gets it with
    :meth:`~smartmob_agent.processes.reaper.Reaper.redirect`, before the event loop runs
    again.

    Raises:
        ShellNotStarted: if the shell could not be started (missing folder, no /bin/sh, a
            limit the kernel refuses) or watched (then it was killed).
        ValueError: a NUL character in ``command`` or ``env``, as :mod:`subprocess` says.
    """
    if listen:
        env = {**env, "LISTEN_FDS": str(len(listen)),
               "LISTEN_FDNAMES": ":".join(name for _, name in listen)}
    popen = _start(command, cwd, env, (stdin, stdout, stderr), umask, run_as, rlimits,
                   tuple(fd for fd, _ in listen))
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
    listen_fds: tuple[int, ...] = (),
) -> subprocess.Popen[bytes]:
    """The :class:`subprocess.Popen` of :func:`spawn_shell`, its failures worded."""
    stdin, stdout, stderr = streams
    wrapper = death_signal_wrapper()
    try:
        return subprocess.Popen(
            [*wrapper, "/bin/sh", "-c",
             shell_script(command, os.getpid(), listen=bool(listen_fds))],
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
            # after the switch of user: lowering a limit needs no privilege, and a
            # change of user would clear the parent-death signal
            preexec_fn=_child_setup(rlimits, death_signal=not wrapper, listen_fds=listen_fds),
            pass_fds=tuple(range(LISTEN_FDS_START, LISTEN_FDS_START + len(listen_fds))),
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
        listen: Sequence[tuple[int, str]] = (),
    ) -> Child:
        """Start ``/bin/sh -c command`` in ``cwd`` with exactly ``env`` (see
        :func:`spawn_shell`, for ``exec``, ``umask``, ``run_as`` and ``rlimits``).

        Its stdin is a pipe the agent keeps open for :meth:`write_input`; its stdout and
        stderr are read into ``sink``, a line at a time.

        Raises:
            SpawnError: if the shell could not be started (missing folder, no /bin/sh, a
                limit the kernel refuses) or watched.
        """
        popen = spawn_shell(
            command, cwd=cwd, env=env, reaper=reaper,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            umask=umask, run_as=run_as, rlimits=rlimits, listen=listen,
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
