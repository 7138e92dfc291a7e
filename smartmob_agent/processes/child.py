"""One run of a command: spawn, output, exit, and the stop sequence (the OS adapter).

A :class:`Child` is one pid from spawn to reap. It runs ``/bin/sh -c COMMAND`` in a new
session (so it leads its own process group), reads stdout and stderr in 64 KiB chunks
straight from the pipes into a :class:`~smartmob_agent.output.lines.LineSplitter`, and learns
of its exit from a pidfd the moment the kernel records it, whatever happened to the
pipes (a grandchild may hold them open for ever).

Stopping signals the whole process group *and* every descendant found in the process
tree, since a descendant may have left the group (``setsid``), then waits on all of them
through pidfds, then SIGKILLs whatever is left after the grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import grp
import logging
import os
import pwd
import resource
import signal
import stat
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

from smartmob_agent.errors import InvalidRequest, SpawnError
from smartmob_agent.model import RLIMIT_NAMES, Exit, RunAs
from smartmob_agent.output.lines import DEFAULT_MAX_LINE, LineSplitter
from smartmob_agent.processes import proctable
from smartmob_agent.processes.privacy import children_umask

log = logging.getLogger("smartmob_agent.child")  # stable name: internals.rst

#: Receives batches of output lines: ``sink(stream, lines)``.
Sink = Callable[[str, list[bytes]], None]

_CHUNK = 64 * 1024
#: errno values of a failed spawn that may go away by themselves (resources exhausted).
TRANSIENT_SPAWN_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM})
_PR_SET_CHILD_SUBREAPER = 36
#: Longest wait for processes to vanish after SIGKILL (a process stuck in the kernel).
_KILL_WAIT = 5.0
#: How far two readings of one process's start time may differ (clock ticks of 10 ms).
_START_TIME_SLACK = 0.05
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


def resolve_run_as(user: str | None, group: str | None) -> RunAs | None:
    """The user (and group) the children run as, from :option:`--user` and
    :option:`--group`; ``None`` when they run as the agent does (no ``--user``, or one
    that names the agent's own user and group).

    A name is looked up first, then a number as a uid or gid; the user's groups (its
    supplementary groups, as ``initgroups`` finds them) are read once, here.

    Raises:
        InvalidRequest: an unknown user or group, or a user other than the agent's own
            while the agent does not run as root (only root can switch users).
    """
    if user is None:
        return None
    entry = _lookup(user, pwd.getpwnam, pwd.getpwuid)
    if entry is None:
        raise InvalidRequest(
            f"invalid configuration: --user: there is no user {user!r} on this machine",
            {"--user": "is not a known user"},
        )
    gid = entry.pw_gid
    if group is not None:
        group_entry = _lookup(group, grp.getgrnam, grp.getgrgid)
        if group_entry is None:
            raise InvalidRequest(
                f"invalid configuration: --group: there is no group {group!r} on this "
                "machine", {"--group": "is not a known group"},
            )
        gid = group_entry.gr_gid
    euid = os.geteuid()
    if entry.pw_uid == euid and gid == os.getegid():
        return None  # the agent's own user: nothing to switch
    if euid != 0:
        me = _user_name(euid)
        raise InvalidRequest(
            f"invalid configuration: --user {user}"
            + (f" --group {group}" if group is not None else "")
            + f": only root can run children as another user, and this agent runs as "
            f"{me} (uid {euid}): start it as root, or leave --user out",
            {"--user": "needs root"},
        )
    return RunAs(
        name=entry.pw_name, uid=entry.pw_uid, gid=gid,
        groups=tuple(sorted(set(os.getgrouplist(entry.pw_name, gid)))),
        home=entry.pw_dir,
    )


def _lookup(name: str, by_name: Callable[[str], Any], by_id: Callable[[int], Any]) -> Any:
    """The user or group database entry named ``name``, or numbered so; ``None``."""
    with contextlib.suppress(KeyError):
        return by_name(name)
    if name.isascii() and name.isdigit():
        with contextlib.suppress(KeyError, OverflowError):
            return by_id(int(name))
    return None


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def give_tree(path: Path, run_as: RunAs) -> None:
    """Make ``path`` and everything under it belong to ``run_as`` (its uid and group).

    Never follows a symbolic link (the link itself changes owner), and walks the tree
    through folder descriptors, so a folder swapped for a link meanwhile cannot lead
    the walk elsewhere.
    """
    os.chown(path, run_as.uid, run_as.gid, follow_symlinks=False)
    for _, folders, files, fd in os.fwalk(path, follow_symlinks=False):
        for name in (*folders, *files):
            with contextlib.suppress(FileNotFoundError):
                os.chown(name, run_as.uid, run_as.gid, dir_fd=fd, follow_symlinks=False)


def blocked_folder(path: Path, run_as: RunAs) -> Path | None:
    """The first folder on the way to ``path`` (itself included) that ``run_as`` may not
    pass through (no search permission for it), or ``None``."""
    target = path.resolve()
    for folder in (*reversed(target.parents), target):
        info = os.stat(folder)
        if info.st_uid == run_as.uid:
            bit = stat.S_IXUSR
        elif info.st_gid == run_as.gid or info.st_gid in run_as.groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not info.st_mode & bit:
            return folder
    return None


def become_subreaper() -> bool:
    """Make this process adopt its orphaned descendants (Linux ``PR_SET_CHILD_SUBREAPER``).

    A grandchild whose parent dies is then re-parented to the agent instead of init, so
    the agent can reap it (see :meth:`Reaper.reap_orphans`). Returns whether it worked.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return False


class Reaper:
    """Reaps children the moment they exit and reports their wait status.

    Each watched pid has a pidfd registered with the event loop: readable means exited.
    When the agent is a subreaper, :meth:`reap_orphans` (called on ``SIGCHLD``) also
    reaps adopted orphans, which are nobody's :class:`Child`; it delivers the status of
    watched pids too, so whichever path reaps first reports the exit.
    """

    def __init__(self) -> None:
        self._watched: dict[int, tuple[int, Callable[[int], None]]] = {}
        self.orphans_reaped = 0

    def watch(self, pid: int, on_exit: Callable[[int], None]) -> None:
        """Call ``on_exit(wait_status)`` once child ``pid`` has exited and been reaped."""
        fd = os.pidfd_open(pid)
        self._watched[pid] = (fd, on_exit)
        asyncio.get_running_loop().add_reader(fd, self._reap, pid)

    def redirect(self, pid: int, on_exit: Callable[[int], None]) -> None:
        """Report the exit of an already watched ``pid`` to ``on_exit`` instead."""
        fd, _ = self._watched[pid]
        self._watched[pid] = (fd, on_exit)

    def _reap(self, pid: int) -> None:
        try:
            reaped, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            if pid in self._watched:  # reaped by someone else: its status is lost
                log.warning("process %d was reaped elsewhere; its exit status is lost", pid)
                self._deliver(pid, 255 << 8)
            return  # else already reaped and delivered by reap_orphans
        if reaped:
            self._deliver(pid, status)

    def _deliver(self, pid: int, status: int) -> None:
        entry = self._watched.pop(pid, None)
        if entry is None:
            return
        fd, on_exit = entry
        asyncio.get_running_loop().remove_reader(fd)
        os.close(fd)
        on_exit(status)

    def reap_orphans(self) -> None:
        """Reap every exited child, watched or not (the ``SIGCHLD`` handler)."""
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None:
                return
            pid = info.si_pid
            try:
                _, status = os.waitpid(pid, 0)
            except ChildProcessError:  # pragma: no cover - reaped meanwhile
                continue
            if pid in self._watched:
                self._deliver(pid, status)
            else:
                self.orphans_reaped += 1
                log.debug("reaped orphaned process %d", pid)

    def close(self) -> None:
        """Stop watching every pid (their exits will no longer be reported)."""
        loop = asyncio.get_running_loop()
        for fd, _ in self._watched.values():
            loop.remove_reader(fd)
            os.close(fd)
        self._watched.clear()


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
        """Start ``/bin/sh -c command`` in ``cwd`` with exactly ``env``.

        Its stdin is a pipe the agent keeps open for :meth:`write_input`; ``umask`` (if
        given) is set in the child before it runs the shell, as the user, group and
        groups of ``run_as`` are, then the resource limits ``rlimits`` (soft and hard;
        ``None`` is unlimited).

        Raises:
            SpawnError: if the shell could not be started (missing folder, no /bin/sh, a
                limit the kernel refuses).
        """
        try:
            popen = subprocess.Popen(
                ["/bin/sh", "-c", command],
                cwd=cwd,
                env=dict(env),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
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
            raise SpawnError(
                f"could not start /bin/sh in {cwd.name}: {error.strerror}",
                transient=error.errno in TRANSIENT_SPAWN_ERRORS,
            ) from None
        except subprocess.SubprocessError:  # the limits could not be set
            limits = ", ".join(f"{name}={'unlimited' if value is None else value}"
                               for name, value in rlimits)
            raise SpawnError(
                f"could not start /bin/sh in {cwd.name}: the kernel refused its resource "
                f"limits ({limits})"
            ) from None
        try:
            reaper.watch(popen.pid, lambda status: None)
        except OSError as error:  # no pidfd to be had: do not leave the child unwatched
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGKILL)
            popen.wait()
            for pipe in (popen.stdin, popen.stdout, popen.stderr):
                if pipe is not None:
                    pipe.close()
            raise SpawnError(
                f"could not watch the new process: {error.strerror}",
                transient=error.errno in TRANSIENT_SPAWN_ERRORS,
            ) from None
        child = cls(popen, sink, max_line)
        reaper.redirect(popen.pid, child._on_exit)
        return child

    # -- input ----------------------------------------------------------------------------

    def write_input(self, data: bytes) -> bool:
        """Queue ``data`` for the child's stdin, never blocking the agent.

        Returns:
            ``False`` (and writes nothing) if the child has exited, closed its stdin, or
            left more than :data:`MAX_STDIN_BUFFER` bytes unread.
        """
        pipe = self._popen.stdin
        if pipe is None or pipe.closed or self.exited:
            return False
        if len(self._stdin) + len(data) > MAX_STDIN_BUFFER:
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

    def _descendants(self) -> list[psutil.Process]:
        """The processes below the child in the process tree, wherever their group."""
        if self.exited:  # its orphans went to another parent; its pid may be reused
            return []
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            return []

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the child's process group and to all its descendants."""
        descendants = self._open_pidfds(self._descendants())
        try:
            self._signal(sig, descendants)
        finally:
            for fd in descendants.values():
                os.close(fd)

    def _open_pidfds(self, processes: list[psutil.Process]) -> dict[int, int]:
        fds: dict[int, int] = {}
        for process in processes:
            with contextlib.suppress(OSError):
                fds[process.pid] = os.pidfd_open(process.pid)
        return fds

    def _signal(self, sig: int, descendants: dict[int, int]) -> None:
        """Signal the group, then each descendant the group signal did not reach.

        Each process gets ``sig`` once: a second SIGTERM often means "quit now" to a
        program, and a second SIGHUP or SIGTTIN asks for a second reload or worker.
        """
        group_signalled = False
        if not self.exited:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)
                group_signalled = True
        for pid, fd in descendants.items():
            if group_signalled and _process_group(pid) == self.pid:
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                signal.pidfd_send_signal(fd, sig)

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> Exit:
        """Stop the child and its descendants; returns the child's exit.

        Sends ``sig`` to the process group and to every descendant, waits up to
        ``timeout`` seconds for all of them to be gone, then SIGKILLs the rest. Members of
        the group that appeared after the signal and outlive the child get SIGKILL at the end.
        """
        self._stopping = True
        descendants = self._open_pidfds(self._descendants())
        try:
            self._signal(sig, descendants)
            try:
                async with asyncio.timeout(timeout):
                    await self._wait_gone(descendants)
            except TimeoutError:
                descendants.update(
                    (pid, fd)
                    for pid, fd in self._open_pidfds(self._descendants()).items()
                    if pid not in descendants
                )
                log.warning(
                    "process %d did not stop within %.1f s of %s: sending SIGKILL",
                    self.pid, timeout, signal.Signals(sig).name,
                )
                self._signal(signal.SIGKILL, descendants)
                async with asyncio.timeout(_KILL_WAIT):
                    await self._wait_gone(descendants)
        finally:
            for fd in descendants.values():
                os.close(fd)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        return await self.wait()

    async def _wait_gone(self, descendants: dict[int, int]) -> None:
        """Wait for the child to be reaped and every descendant's pidfd to signal exit."""
        await asyncio.gather(asyncio.shield(self._exit), _wait_pidfds(descendants.values()))


async def _wait_pidfds(fds: Iterable[int]) -> None:
    """Wait until every pidfd signals that its process has exited."""
    loop = asyncio.get_running_loop()
    fds = list(fds)
    waits: list[asyncio.Future[None]] = []
    for fd in fds:
        gone: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, _resolve, loop, fd, gone)
        waits.append(gone)
    try:
        await asyncio.gather(*waits)
    finally:
        # at once, not in done callbacks: the caller registers these fds again or
        # closes them next, and a late remove_reader would hit the new registration
        for fd in fds:
            loop.remove_reader(fd)
        for gone in waits:
            gone.cancel()


async def stop_marked(marker: str, timeout: float, sig: int = signal.SIGTERM) -> int:
    """Stop every process whose environment carries ``marker`` (``NAME=value``).

    This reaches descendants that left their process group and lost their parent, which
    neither the group nor the process tree can find any more. Sends ``sig``, waits up to
    ``timeout`` seconds, then SIGKILLs what is left. Returns how many were found.
    """
    fds = _open_all(proctable.marked_processes(marker.encode()))
    await _stop_all(fds, sig, timeout)
    return len(fds)


def _open_all(pids: Iterable[int]) -> dict[int, int]:
    """A pidfd for each of ``pids`` still there."""
    fds: dict[int, int] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            fds[pid] = os.pidfd_open(pid)
    return fds


async def _stop_all(
    fds: dict[int, int], sig: int, timeout: float, group: int | None = None
) -> None:
    """Send ``sig`` to every pidfd (and to process ``group``, if given), wait up to
    ``timeout`` seconds, SIGKILL what is left and wait for it; close the pidfds."""

    def send(number: int) -> None:
        if group is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, number)
        for fd in fds.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                signal.pidfd_send_signal(fd, number)

    try:
        send(sig)
        if sig != signal.SIGKILL:
            try:
                async with asyncio.timeout(timeout):
                    await _wait_pidfds(fds.values())
            except TimeoutError:
                send(signal.SIGKILL)
        async with asyncio.timeout(_KILL_WAIT):
            await _wait_pidfds(fds.values())
    finally:
        for fd in fds.values():
            os.close(fd)


def start_time(pid: int) -> float | None:
    """When ``pid`` started (seconds since the epoch), or ``None`` if it is gone.

    With the pid, it names one process for good: a pid is reused, a (pid, start time)
    pair is not.
    """
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


async def stop_survivor(pid: int, started: float, timeout: float) -> bool:
    """Stop a child that outlived an earlier agent, if ``pid`` still names it.

    Sends SIGTERM to its process group and its descendants, waits up to ``timeout``
    seconds, then SIGKILLs what is left. Returns whether it was found.
    """
    found = start_time(pid)
    if found is None or abs(found - started) > _START_TIME_SLACK:
        return False  # gone, or the pid now names another process
    with contextlib.suppress(psutil.Error):
        if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return False  # already dead, waiting to be reaped
    try:
        members = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return False
    await _stop_all(_open_all(p.pid for p in members), signal.SIGTERM, timeout, group=pid)
    return True


def _process_group(pid: int) -> int | None:
    """The process group of ``pid``, or ``None`` if it is gone."""
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def _resolve(loop: asyncio.AbstractEventLoop, fd: int, future: asyncio.Future[None]) -> None:
    """A pidfd became readable: its process is gone (it stays readable, so stop watching)."""
    loop.remove_reader(fd)
    if not future.done():
        future.set_result(None)
