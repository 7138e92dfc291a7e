"""Readiness checks: probe a running process over HTTP or with a command, restart it when
it stays unhealthy.

A process may declare ``health``: ``{"http": "/path"}`` (a GET on its ``PORT`` at
127.0.0.1) or ``{"command": "..."}`` (``/bin/sh -c`` in its folder, with its environment),
probed every ``interval`` seconds, each probe bounded by ``timeout`` seconds. A
:class:`HealthMonitor` watches one run of a child: it records whether the last probe
passed and, after ``failures`` failed probes in a row, asks for a restart once and stops.

The probes never raise for what the probed process does (refuses, hangs, answers 503,
exits 1): each returns a :class:`ProbeResult` whose ``detail`` is a short sentence fit for
the status document and the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from smartmob_agent.model import Exit, RunAs
from smartmob_agent.processes.child import Reaper
from smartmob_agent.processes.privacy import children_umask

log = logging.getLogger("smartmob_agent.health")  # stable name: internals.rst

#: Bytes of a probe command's output kept (its end): enough for the last line.
OUTPUT_TAIL = 4096
#: Bytes of an unhealthy HTTP answer's body read to explain it.
BODY_SNIPPET = 200
#: Characters of output or body quoted in a probe's detail.
QUOTE_LIMIT = 200
#: Longest wait for a probe command to be reaped after SIGKILL (stuck in the kernel).
_KILL_WAIT = 5.0
#: How much longer than its timeout the monitor lets a probe run: the probes enforce the
#: timeout themselves and say more about it; this only stops one that does not.
_PROBE_GRACE = 1.0
_CHUNK = 64 * 1024
#: Body types whose first line may tell a person why the check failed (not HTML).
_QUOTED_TYPES = ("text/plain", "application/json")


@dataclass(frozen=True)
class HealthCheck:
    """How to tell whether a process is ready: exactly one of ``http`` and ``command``.

    Attributes:
        http: the path to GET on ``http://127.0.0.1:$PORT``.
        command: a ``/bin/sh -c`` command run in the process's folder with its environment.
        interval: seconds between the end of a probe and the start of the next (and before
            the first).
        timeout: seconds a probe may take before it counts as failed.
        failures: failed probes in a row that make the process restart.
    """

    http: str | None = None
    command: str | None = None
    interval: float = 10.0
    timeout: float = 5.0
    failures: int = 3

    def __post_init__(self) -> None:
        # the request schema already ensures all this; a check built in code must too
        if (self.http is None) == (self.command is None):
            raise ValueError("a health check has exactly one of 'http' and 'command'")
        if self.http is not None and not self.http.startswith("/"):
            # else "@host" after "127.0.0.1:PORT" would name another host
            raise ValueError("a health check's 'http' path starts with '/'")
        if self.interval <= 0 or self.timeout <= 0 or self.failures < 1:
            raise ValueError("a health check needs interval > 0, timeout > 0, failures >= 1")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> HealthCheck:
        """Build from a create request's ``health`` object (already validated)."""
        return cls(
            http=data.get("http"),
            command=data.get("command"),
            interval=float(data.get("interval", cls.interval)),
            timeout=float(data.get("timeout", cls.timeout)),
            failures=int(data.get("failures", cls.failures)),
        )

    def to_json(self) -> dict[str, Any]:
        """The check as the status document shows it, defaults filled in."""
        document: dict[str, Any] = (
            {"http": self.http} if self.http is not None else {"command": self.command}
        )
        document.update(
            interval=_number(self.interval), timeout=_number(self.timeout),
            failures=self.failures,
        )
        return document


def _number(value: float) -> float | int:
    """``10`` rather than ``10.0``, so the document echoes what the request said."""
    return int(value) if value.is_integer() else value


@dataclass(frozen=True)
class ProbeResult:
    """The outcome of one probe: whether it passed and a short sentence saying what happened."""

    healthy: bool
    detail: str


def unhealthy_reason(check: HealthCheck, failures: int, last: ProbeResult) -> str:
    """The sentence a restart for failed health checks gives: how many, and the last one.

    >>> unhealthy_reason(HealthCheck(http="/"), 3, ProbeResult(False, "connection refused"))
    'health check failed 3 times in a row: connection refused'
    """
    times = "once" if failures == 1 else f"{failures} times in a row"
    return f"health check failed {times}: {last.detail}"


# -- HTTP ------------------------------------------------------------------------------


async def probe_http(
    session: aiohttp.ClientSession, port: int, path: str, timeout: float
) -> ProbeResult:
    """GET ``http://127.0.0.1:port/path``: healthy on a 2xx or 3xx answer.

    Redirects are not followed (a 3xx already proves the process answers, and following
    one could leave 127.0.0.1). The body of a healthy answer is not read; of an unhealthy
    one at most :data:`BODY_SNIPPET` bytes are, to quote its first line.
    """
    if not path.startswith("/"):  # keep the host 127.0.0.1 whatever the path says
        path = "/" + path
    url = f"http://127.0.0.1:{port}{path}"
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        # only up to the headers: a body that never ends must not hide the status
        async with asyncio.timeout_at(deadline):
            response = await session.get(
                url,
                allow_redirects=False,
                # a backstop for aiohttp's own reads; the asyncio deadline governs
                timeout=aiohttp.ClientTimeout(total=timeout + _PROBE_GRACE),
            )
    except TimeoutError:
        return ProbeResult(False, f"GET {url} timed out after {timeout:g} s")
    except aiohttp.ClientConnectorError as error:
        # asyncio's "Connect call failed (...)" hides the reason a person understands
        os_error = error.os_error
        if os_error.errno is not None and os_error.errno > 0:
            reason = os.strerror(os_error.errno)
        else:
            reason = os_error.strerror or str(os_error)
        return ProbeResult(False, f"GET {url}: {reason.lower()}")
    except (aiohttp.ClientError, OSError) as error:
        return ProbeResult(False, f"GET {url} failed: {str(error) or type(error).__name__}")
    # leaving closes the connection if the body was not read to its end: nothing more is
    # read from it
    async with response:
        detail = f"GET {url} answered {response.status}"
        if 200 <= response.status < 400:
            return ProbeResult(True, detail)
        snippet = await _read_snippet(response, deadline)
        return ProbeResult(False, f"{detail}: {snippet}" if snippet else detail)


async def _read_snippet(response: aiohttp.ClientResponse, deadline: float) -> str:
    """The first line of the start of a text body, or ``""`` (HTML, or nothing in time)."""
    if not response.content_type.startswith(_QUOTED_TYPES):
        return ""
    try:
        async with asyncio.timeout_at(deadline):
            head = await response.content.read(BODY_SNIPPET)
    except (TimeoutError, aiohttp.ClientError):  # the status alone explains enough
        return ""
    for line in head.decode(errors="replace").splitlines():
        if line.strip():
            return _quote(line)
    return ""


# -- command ---------------------------------------------------------------------------


async def probe_command(
    command: str, cwd: Path, env: Mapping[str, str], timeout: float, *, reaper: Reaper,
    run_as: RunAs | None = None,
) -> ProbeResult:
    """Run ``/bin/sh -c command`` in ``cwd`` with exactly ``env``: healthy if it exits 0.

    The command leads a new process group. When it exits, whatever it left running in
    that group is killed; when it overruns ``timeout`` (or the caller is cancelled) the
    whole group is killed at once. Output (stdout and stderr together) is read as it comes
    and only its last :data:`OUTPUT_TAIL` bytes are kept, for the detail.

    ``reaper`` must be the agent's: it reaps every child on ``SIGCHLD``, so a probe reaping
    its own child would race it and lose the exit status. ``run_as``: the user it runs as,
    the process's own (see :option:`--user`).
    """
    exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def on_exit(status: int) -> None:
        # may come after the caller gave up (cancelled): the reaper still reaps
        if not exited.done():
            exited.set_result(status)

    started = _spawn(command, cwd, env, reaper, on_exit, run_as)
    if isinstance(started, str):
        return ProbeResult(False, started)
    popen, read_fd = started
    tail = _Tail(read_fd)
    try:
        try:
            async with asyncio.timeout(timeout):
                status = await asyncio.shield(exited)
        except TimeoutError:
            _kill_group(popen.pid)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_KILL_WAIT):
                    await asyncio.shield(exited)
            tail.drain()
            return ProbeResult(False, _with_output(f"command timed out after {timeout:g} s", tail))
        tail.drain()
    finally:
        if not exited.done():  # cancelled: the reaper reaps it once it died
            _kill_group(popen.pid)
        tail.close()
        # the reaper owns the pid: keep Popen's finalizer from ever waiting on it (it might
        # be another child's by then)
        popen.returncode = Exit.from_wait_status(exited.result()).code if exited.done() else -9
    exit = Exit.from_wait_status(status)
    if exit.code == 0:
        return ProbeResult(True, "command exited with code 0")
    return ProbeResult(False, _with_output(f"command {exit.describe()}", tail))


def _spawn(
    command: str, cwd: Path, env: Mapping[str, str], reaper: Reaper,
    on_exit: Callable[[int], None], run_as: RunAs | None = None,
) -> tuple[subprocess.Popen[bytes], int] | str:
    """Start the probe command watched by ``reaper``; return it and its output pipe.

    Once reaped, what is left of its process group is killed, then ``on_exit(status)`` runs.

    Returns a sentence saying why instead when it could not be started or watched.
    """
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    try:
        popen = subprocess.Popen(
            ["/bin/sh", "-c", command],
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=write_fd,
            stderr=write_fd,
            start_new_session=True,
            close_fds=True,
            umask=children_umask(None),  # the one the agent was given, not its 077
            user=None if run_as is None else run_as.uid,
            group=None if run_as is None else run_as.gid,
            extra_groups=None if run_as is None else list(run_as.groups),
        )
    except (OSError, ValueError) as error:  # ValueError: a NUL byte in command or env
        os.close(read_fd)
        reason = error.strerror if isinstance(error, OSError) else str(error)
        return f"could not start the command: {reason}"
    finally:
        os.close(write_fd)  # only the child writes: end of file once it and its group are gone
    def reaped(status: int) -> None:
        # what it left in the background would pile up at each probe; killed right at the
        # reaping, before anything else runs, so the group id cannot belong to anyone else
        _kill_group(popen.pid)
        on_exit(status)

    try:
        reaper.watch(popen.pid, reaped)
    except OSError as error:  # no pidfd to be had: do not leave the child unwatched
        _kill_group(popen.pid)
        popen.wait()
        os.close(read_fd)
        return f"could not watch the command: {error.strerror}"
    return popen, read_fd


def _kill_group(pgid: int) -> None:
    """SIGKILL every member of process group ``pgid`` still there."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _with_output(detail: str, tail: _Tail) -> str:
    """``detail``, then the last line of output if there was any."""
    last = tail.last_line()
    return f"{detail}: {last}" if last else detail


class _Tail:
    """Reads a pipe as data comes, keeping only its last :data:`OUTPUT_TAIL` bytes.

    Reading as it comes matters: a command that writes more than a pipe holds would
    otherwise block, and time out instead of finishing.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._data = bytearray()
        self._open = True
        os.set_blocking(fd, False)
        asyncio.get_running_loop().add_reader(fd, self._on_readable)

    def _on_readable(self) -> None:
        self._read_once()

    def _read_once(self) -> bool:
        """Read one chunk; return whether there may be more right now."""
        if not self._open:
            return False
        try:
            data = os.read(self._fd, _CHUNK)
        except BlockingIOError:
            return False
        except OSError:  # pragma: no cover - the pipe broke
            data = b""
        if not data:
            self.close()
            return False
        self._data += data
        del self._data[:-OUTPUT_TAIL]
        return True

    def drain(self) -> None:
        """Read what is already in the pipe, without waiting for its end.

        Something that left the group may hold the pipe open for ever, so the end of the
        command, not end of file, ends the output.
        """
        while self._read_once():
            pass

    def close(self) -> None:
        """Stop reading and close the pipe."""
        if self._open:
            self._open = False
            asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)

    def last_line(self) -> str:
        """The last non-blank line kept, quoted for a detail; ``""`` if none."""
        for line in reversed(self._data.decode(errors="replace").splitlines()):
            if line.strip():
                return _quote(line)
        return ""


def _quote(text: str) -> str:
    """``text`` made fit for a one-line detail: printable, trimmed, at most 200 characters."""
    text = "".join(c if c.isprintable() else "?" for c in text.strip())
    if len(text) > QUOTE_LIMIT:
        text = text[:QUOTE_LIMIT - 1] + "…"
    return text


# -- monitor ---------------------------------------------------------------------------


class HealthMonitor:
    """Runs one check for one run of a child, until the child needs a restart.

    Args:
        check: what to probe and how often.
        probe: runs one probe (e.g. :func:`probe_http` bound to the child's port).
        on_change: called with the new value of :attr:`healthy` each time it changes.
        on_unhealthy: called once with the reason when ``check.failures`` probes in a row
            failed; :meth:`run` returns right after.
        sleep: waits between probes (tests may speed time up).

    The owner runs :meth:`run` in a task and cancels it when the child exits.
    """

    def __init__(
        self,
        check: HealthCheck,
        probe: Callable[[], Awaitable[ProbeResult]],
        on_change: Callable[[bool | None], None],
        on_unhealthy: Callable[[str], None],
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self.check = check
        self._probe = probe
        self._on_change = on_change
        self._on_unhealthy = on_unhealthy
        self._sleep = sleep
        #: Whether the last probe passed; ``None`` until the first one ends.
        self.healthy: bool | None = None
        #: The last probe's result, ``None`` until the first one ends.
        self.last: ProbeResult | None = None
        #: Failed probes since the last one that passed.
        self.failures = 0

    async def run(self) -> None:
        """Probe every ``interval`` seconds; return after reporting a run of failures."""
        while True:
            await self._sleep(self.check.interval)
            result = await self._probe_once()
            self.last = result
            self.failures = 0 if result.healthy else self.failures + 1
            if result.healthy != self.healthy:
                self.healthy = result.healthy
                self._on_change(result.healthy)
            if self.failures >= self.check.failures:
                self._on_unhealthy(unhealthy_reason(self.check, self.failures, result))
                return

    async def _probe_once(self) -> ProbeResult:
        """One probe, bounded in time; whatever goes wrong is a failed probe, not a crash."""
        try:
            async with asyncio.timeout(self.check.timeout + _PROBE_GRACE):
                return await self._probe()
        except TimeoutError:
            return ProbeResult(False, f"timed out after {self.check.timeout:g} s")
        except Exception as error:  # a bug in a probe must not end the monitoring
            log.warning("health probe raised", exc_info=True)
            return ProbeResult(False, f"the probe failed: {str(error) or type(error).__name__}")
