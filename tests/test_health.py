"""Health checks: HTTP probes on a real server, command probes on real processes, the monitor."""

from __future__ import annotations

import asyncio
import functools
import os
import resource
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from smartmob_agent.processes.reaper import Reaper
from smartmob_agent.supervision.health import (
    HealthCheck,
    HealthMonitor,
    ProbeResult,
    probe_command,
    probe_http,
    unhealthy_reason,
)
from tests.helpers import eventually, pid_alive

#: Extra time a probe may take beyond its timeout before a test calls it too slow.
MARGIN = 1.0


# -- fixtures --------------------------------------------------------------------------


@dataclass
class App:
    """A real HTTP server on 127.0.0.1 standing in for a process's web interface."""

    server: TestServer
    paths: list[str] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    status: int = 503

    @property
    def port(self) -> int:
        """The port it listens on (the process's ``PORT``)."""
        port = self.server.port
        assert port is not None
        return port


@pytest.fixture
async def app(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> AsyncIterator[App]:
    """Serve ``/ok``, ``/down`` (text 503), ``/page`` (HTML 500), ``/redirect``, ``/hang``,
    ``/stall`` (a 503 whose body never comes) and ``/flip`` (answers :attr:`App.status`)."""
    state: dict[str, App] = {}

    async def handle(request: web.Request) -> web.StreamResponse:
        served = state["app"]
        served.paths.append(request.path)
        match request.path:
            case "/ok":
                return web.Response(text="fine")
            case "/down":
                return web.Response(status=503, text="\n  database is down\nretry later\n")
            case "/page":
                return web.Response(status=500, text="<!DOCTYPE html><p>oops</p>",
                                    content_type="text/html")
            case "/redirect":
                raise web.HTTPFound("/elsewhere")
            case "/hang":
                await served.release.wait()
                return web.Response(text="late")
            case "/stall":
                response = web.StreamResponse(status=503)
                response.content_type = "text/plain"
                await response.prepare(request)
                await served.release.wait()
                return response
            case "/flip":
                return web.Response(status=served.status, text="flip")
        raise web.HTTPNotFound()

    application = web.Application()
    application.router.add_get("/{tail:.*}", handle)
    server = await aiohttp_server(application, host="127.0.0.1")
    state["app"] = App(server)
    yield state["app"]
    state["app"].release.set()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session, closed after the test."""
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
async def reaper() -> AsyncIterator[Reaper]:
    """A reaper for probe commands, closed after the test."""
    reaper = Reaper()
    yield reaper
    reaper.close()


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A port on 127.0.0.1 that is bound but not listening: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


# -- HTTP probes -----------------------------------------------------------------------


async def test_http_200_is_healthy(app: App, session: aiohttp.ClientSession) -> None:
    """A 200 answer is healthy."""
    result = await asyncio.wait_for(probe_http(session, app.port, "/ok", 5.0), 10)

    assert result == ProbeResult(True, f"GET http://127.0.0.1:{app.port}/ok answered 200")


async def test_http_503_is_unhealthy_and_quotes_a_text_body(
    app: App, session: aiohttp.ClientSession
) -> None:
    """A 503 answer is unhealthy; the detail gives the status and the body's first line."""
    result = await asyncio.wait_for(probe_http(session, app.port, "/down", 5.0), 10)

    assert not result.healthy
    assert result.detail == (
        f"GET http://127.0.0.1:{app.port}/down answered 503: database is down"
    )


async def test_http_error_page_in_html_is_not_quoted(
    app: App, session: aiohttp.ClientSession
) -> None:
    """An HTML error page adds nothing a person can read in one line, so only the status shows."""
    result = await asyncio.wait_for(probe_http(session, app.port, "/page", 5.0), 10)

    assert result == ProbeResult(False, f"GET http://127.0.0.1:{app.port}/page answered 500")


async def test_http_redirect_is_healthy_and_not_followed(
    app: App, session: aiohttp.ClientSession
) -> None:
    """A 302 answer is healthy and its target is never requested."""
    result = await asyncio.wait_for(probe_http(session, app.port, "/redirect", 5.0), 10)

    assert result.healthy
    assert "answered 302" in result.detail
    assert app.paths == ["/redirect"]


async def test_http_refused_connection_says_so(
    session: aiohttp.ClientSession, refusing_port: int
) -> None:
    """Nothing listening on the port is unhealthy with "connection refused"."""
    result = await asyncio.wait_for(probe_http(session, refusing_port, "/ok", 5.0), 10)

    assert result == ProbeResult(
        False, f"GET http://127.0.0.1:{refusing_port}/ok: connection refused"
    )


async def test_http_hanging_handler_times_out(app: App, session: aiohttp.ClientSession) -> None:
    """A handler that never answers is unhealthy once the timeout passes, not later."""
    started = time.monotonic()
    result = await asyncio.wait_for(probe_http(session, app.port, "/hang", 0.3), 10)

    assert result == ProbeResult(
        False, f"GET http://127.0.0.1:{app.port}/hang timed out after 0.3 s"
    )
    assert 0.3 <= time.monotonic() - started < 0.3 + MARGIN


async def test_http_status_shows_even_when_the_body_never_comes(
    app: App, session: aiohttp.ClientSession
) -> None:
    """A 503 whose body stalls is reported as a 503 once the timeout passes, not a timeout."""
    started = time.monotonic()
    result = await asyncio.wait_for(probe_http(session, app.port, "/stall", 0.3), 10)

    assert result == ProbeResult(False, f"GET http://127.0.0.1:{app.port}/stall answered 503")
    assert time.monotonic() - started < 0.3 + MARGIN


async def test_http_path_cannot_name_another_host(
    app: App, session: aiohttp.ClientSession
) -> None:
    """A path that looks like ``user@host`` is still requested from 127.0.0.1."""
    result = await asyncio.wait_for(probe_http(session, app.port, "@example.com/ok", 5.0), 10)

    assert "answered 404" in result.detail
    assert app.paths == ["/@example.com/ok"]


# -- command probes --------------------------------------------------------------------


async def run_probe(
    command: str, cwd: Path, reaper: Reaper, timeout: float = 5.0,
    env: dict[str, str] | None = None,
) -> ProbeResult:
    """Run ``probe_command`` with a deadline well past its own timeout."""
    return await asyncio.wait_for(
        probe_command(command, cwd, os.environ if env is None else env, timeout,
                      reaper=reaper),
        timeout + 5,
    )


def pid_in(path: Path) -> int | None:
    """The pid written to ``path``, or ``None`` while the line is not all there."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    return int(text) if text.endswith("\n") else None


async def read_pid(path: Path) -> int:
    """Wait (5 s at most) for a pid to be written to ``path``; return it."""
    await eventually(lambda: pid_in(path) is not None, timeout=5.0, what=f"a pid in {path.name}")
    pid = pid_in(path)
    assert pid is not None
    return pid


def reaped(pid: int) -> bool:
    """Whether ``pid`` is gone from the process table (neither running nor a zombie)."""
    return not Path(f"/proc/{pid}").exists()


async def test_command_exiting_0_is_healthy(tmp_path: Path, reaper: Reaper) -> None:
    """A command that exits 0 is healthy."""
    result = await run_probe("true", tmp_path, reaper)

    assert result == ProbeResult(True, "command exited with code 0")


async def test_command_exit_code_is_in_the_detail(tmp_path: Path, reaper: Reaper) -> None:
    """A command that exits 3 is unhealthy and the detail says 3."""
    result = await run_probe("exit 3", tmp_path, reaper)

    assert result == ProbeResult(False, "command exited with code 3")


async def test_command_output_last_line_is_in_the_detail(
    tmp_path: Path, reaper: Reaper
) -> None:
    """The last line the failing command wrote, on either stream, ends the detail."""
    result = await run_probe("echo starting; echo 'db down' >&2; echo; exit 1", tmp_path, reaper)

    assert result == ProbeResult(False, "command exited with code 1: db down")


async def test_command_long_line_is_truncated(tmp_path: Path, reaper: Reaper) -> None:
    """A line of output longer than 200 characters is cut to 200 in the detail."""
    result = await run_probe("printf 'x%.0s' $(seq 500); exit 1", tmp_path, reaper)

    quoted = result.detail.removeprefix("command exited with code 1: ")
    assert quoted == "x" * 199 + "…"


async def test_command_writing_more_than_a_pipe_holds_finishes(
    tmp_path: Path, reaper: Reaper
) -> None:
    """A command writing megabytes is not blocked by a full pipe, and only its end is kept."""
    result = await run_probe(
        "head -c 2000000 /dev/zero | tr '\\0' x; echo; echo last; exit 2", tmp_path, reaper
    )

    assert result == ProbeResult(False, "command exited with code 2: last")


async def test_command_uses_the_folder_and_exactly_the_environment(
    tmp_path: Path, reaper: Reaper
) -> None:
    """The command runs in the given folder with the given variables and no others."""
    result = await run_probe(
        'echo "$TOKEN ${HOME-unset} $(pwd)"; exit 1', tmp_path, reaper,
        env={"TOKEN": "abc"},
    )

    assert result.detail == f"command exited with code 1: abc unset {tmp_path}"


async def test_command_that_cannot_start_is_unhealthy(tmp_path: Path, reaper: Reaper) -> None:
    """A missing folder is an unhealthy result that says why, not an exception."""
    result = await run_probe("true", tmp_path / "missing", reaper)

    assert result == ProbeResult(False, "could not start the command: No such file or directory")


def own_umask() -> str:
    """This process's umask, as ``umask`` prints it (``0022``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return line.split()[1]
    raise AssertionError("no Umask line in /proc/self/status")


async def test_command_gets_the_umask_and_rlimits_it_is_given(
    tmp_path: Path, reaper: Reaper
) -> None:
    """The command starts as a process's children do: with the process's umask and
    resource limits (soft and hard), not the agent's."""
    assert own_umask() != "0027"
    assert resource.getrlimit(resource.RLIMIT_NOFILE) != (64, 64)
    out = tmp_path / "probe.out"
    result = await asyncio.wait_for(probe_command(
        f"{{ umask; ulimit -Sn; ulimit -Hn; ulimit -t; }} > {out}", tmp_path, {}, 5.0,
        reaper=reaper, umask=0o027, rlimits=(("nofile", 64), ("cpu", 3600)),
    ), 10)

    assert result == ProbeResult(True, "command exited with code 0")
    assert out.read_text() == "0027\n64\n64\n3600\n"
    assert out.stat().st_mode & 0o777 == 0o640


async def test_command_with_a_limit_the_kernel_refuses_is_unhealthy(
    tmp_path: Path, reaper: Reaper
) -> None:
    """A resource limit the kernel will not set (above ``fs.nr_open``, even for root) is
    an unhealthy result that names it, and the command does not run."""
    out = tmp_path / "ran"
    result = await asyncio.wait_for(probe_command(
        f"touch {out}", tmp_path, {}, 5.0, reaper=reaper, rlimits=(("nofile", 2**40),),
    ), 10)

    assert result == ProbeResult(
        False,
        f"could not start the command: the kernel refused its resource limits "
        f"(nofile={2**40})",
    )
    assert not out.exists()


async def test_command_timeout_kills_its_process_group(tmp_path: Path, reaper: Reaper) -> None:
    """A command over its timeout is unhealthy, and it and its group are killed and reaped."""
    started = time.monotonic()
    result = await run_probe(
        "echo $$ > shell.pid; sleep 100 & echo $! > sleep.pid; echo waiting; wait",
        tmp_path, reaper, timeout=0.5,
    )

    assert result == ProbeResult(False, "command timed out after 0.5 s: waiting")
    assert time.monotonic() - started < 0.5 + MARGIN
    shell, sleeper = await read_pid(tmp_path / "shell.pid"), await read_pid(tmp_path / "sleep.pid")
    assert reaped(shell)
    await eventually(lambda: not pid_alive(sleeper), timeout=5.0, what="the end of sleep")


async def test_command_leftovers_are_killed_when_it_exits(
    tmp_path: Path, reaper: Reaper
) -> None:
    """A background process the command leaves in its group is killed, and does not hold
    the probe open through the pipe it inherited."""
    result = await run_probe("sleep 100 & echo $! > sleep.pid", tmp_path, reaper)

    assert result.healthy
    sleeper = await read_pid(tmp_path / "sleep.pid")
    await eventually(lambda: not pid_alive(sleeper), timeout=5.0, what="the end of sleep")


async def test_cancelled_command_probe_kills_and_reaps_the_command(
    tmp_path: Path, reaper: Reaper
) -> None:
    """Cancelling a probe (its child exited) kills the command, which the reaper then reaps."""
    task = asyncio.create_task(
        probe_command("echo $$ > shell.pid; exec sleep 100", tmp_path, os.environ, 60,
                      reaper=reaper)
    )
    shell = await read_pid(tmp_path / "shell.pid")

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)

    await eventually(lambda: reaped(shell), timeout=5.0, what="the reaping of the command")


async def test_command_exit_code_survives_a_reaper_of_orphans(
    tmp_path: Path, reaper: Reaper
) -> None:
    """With the agent's SIGCHLD handler reaping every child, the probe still gets the code."""
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGCHLD, reaper.reap_orphans)
    try:
        for _ in range(5):  # each gives the handler a chance to win the race
            assert await run_probe("exit 3", tmp_path, reaper) == ProbeResult(
                False, "command exited with code 3"
            )
            assert (await run_probe("true", tmp_path, reaper)).healthy
    finally:
        loop.remove_signal_handler(signal.SIGCHLD)
    assert reaper.orphans_reaped == 0


# -- the monitor -----------------------------------------------------------------------


class Script:
    """A fake probe returning scripted results (or raising scripted errors) in order.

    Once the script is used up it sets :attr:`done` and waits for ever, as a probe of a
    process that stopped answering would, until the test cancels the monitor.
    """

    def __init__(self, *steps: ProbeResult | Exception) -> None:
        self._steps = list(steps)
        self.calls = 0
        self.done = asyncio.Event()

    async def __call__(self) -> ProbeResult:
        if not self._steps:
            self.done.set()
            await asyncio.Event().wait()
        self.calls += 1
        step = self._steps.pop(0)
        if isinstance(step, Exception):
            raise step
        return step


OK = ProbeResult(True, "GET http://127.0.0.1:5000/health answered 200")
DOWN = ProbeResult(False, "GET http://127.0.0.1:5000/health answered 503")


@dataclass
class Watched:
    """A monitor under test, with everything it reported."""

    monitor: HealthMonitor
    changes: list[bool | None] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)


def monitor(
    probe: Callable[[], Awaitable[ProbeResult]], *, failures: int = 3, timeout: float = 5.0,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    on_change: Callable[[bool | None], None] | None = None,
) -> Watched:
    """A monitor probing every 10 ms, recording its changes and restart reasons."""
    changes: list[bool | None] = []
    reasons: list[str] = []
    check = HealthCheck(http="/health", interval=0.01, timeout=timeout, failures=failures)
    return Watched(
        HealthMonitor(check, probe, on_change or changes.append, reasons.append, sleep=sleep),
        changes, reasons,
    )


async def run_until_done(watched: Watched, script: Script) -> None:
    """Run the monitor until the script is used up, then cancel it (5 s at most)."""
    task = asyncio.create_task(watched.monitor.run())
    try:
        async with asyncio.timeout(5):
            await asyncio.wait([task, asyncio.create_task(script.done.wait())],
                               return_when=asyncio.FIRST_COMPLETED)
        assert not task.done(), "the monitor returned before the script was used up"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_monitor_restarts_after_failures_in_a_row() -> None:
    """After a healthy probe, three failures in a row ask for a restart once, then it ends."""
    script = Script(OK, DOWN, DOWN, DOWN, OK)
    watched = monitor(script)

    await asyncio.wait_for(watched.monitor.run(), 5)

    assert watched.reasons == [
        "health check failed 3 times in a row: GET http://127.0.0.1:5000/health answered 503"
    ]
    assert watched.changes == [True, False]
    assert watched.monitor.healthy is False
    assert script.calls == 4


async def test_monitor_healthy_probe_resets_the_count() -> None:
    """A healthy probe between failures starts the count again, so no restart comes."""
    script = Script(DOWN, DOWN, OK, DOWN, DOWN, OK, DOWN, DOWN)
    watched = monitor(script)

    await run_until_done(watched, script)

    assert watched.reasons == []
    assert watched.monitor.failures == 2
    assert watched.changes == [False, True, False, True, False]


async def test_monitor_reports_only_changes() -> None:
    """The health is unknown before the first probe and reported once per change."""
    script = Script(OK, OK, OK, DOWN, OK, OK)
    watched = monitor(script)
    before = watched.monitor.healthy

    await run_until_done(watched, script)

    assert (before, watched.monitor.healthy) == (None, True)
    assert watched.changes == [True, False, True]
    assert watched.monitor.last == OK


async def test_monitor_counts_a_raising_probe_as_a_failure() -> None:
    """A probe that raises is a failed probe whose message is the reason; the loop goes on."""
    script = Script(RuntimeError("boom"), OK, RuntimeError("boom"), KeyError("port"),
                    RuntimeError("boom"))
    watched = monitor(script)

    await asyncio.wait_for(watched.monitor.run(), 5)

    assert watched.reasons == ["health check failed 3 times in a row: the probe failed: boom"]
    assert watched.changes == [False, True, False]


async def test_monitor_bounds_a_probe_that_never_returns() -> None:
    """A probe that ignores its timeout fails anyway, shortly after it."""
    script = Script()
    watched = monitor(script, failures=1, timeout=0.05)
    started = time.monotonic()

    await asyncio.wait_for(watched.monitor.run(), 5)

    assert watched.reasons == ["health check failed once: timed out after 0.05 s"]
    assert time.monotonic() - started < 0.05 + MARGIN + 0.5


async def test_monitor_waits_the_interval_before_each_probe() -> None:
    """The monitor sleeps ``interval`` seconds before every probe, the first included."""
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        await asyncio.sleep(0)

    script = Script(OK, DOWN, DOWN, DOWN)
    watched = monitor(script, sleep=sleep)

    await asyncio.wait_for(watched.monitor.run(), 5)

    assert slept == [0.01] * 4


async def test_monitor_on_a_real_server_restarts_when_it_turns_unhealthy(
    app: App, session: aiohttp.ClientSession
) -> None:
    """Probing a real server, the monitor sees it healthy, then asks for a restart after 503s."""
    app.status = 200
    changes: list[bool | None] = []

    def turn_unhealthy(healthy: bool | None) -> None:
        changes.append(healthy)
        app.status = 503  # from now on every probe fails

    watched = monitor(functools.partial(probe_http, session, app.port, "/flip", 5.0),
                      on_change=turn_unhealthy)

    await asyncio.wait_for(watched.monitor.run(), 5)

    assert changes == [True, False]
    assert watched.reasons == [
        f"health check failed 3 times in a row: GET http://127.0.0.1:{app.port}/flip "
        "answered 503: flip"
    ]


# -- the check and its reason ----------------------------------------------------------


def test_check_from_json_fills_in_defaults() -> None:
    """A check with only a path gets interval 10, timeout 5 and 3 failures."""
    check = HealthCheck.from_json({"http": "/health"})

    assert check == HealthCheck(http="/health", command=None, interval=10.0, timeout=5.0,
                                failures=3)
    assert check.to_json() == {"http": "/health", "interval": 10, "timeout": 5, "failures": 3}


def test_check_to_json_echoes_a_command_check() -> None:
    """A command check comes back as it was given, fractions kept."""
    data = {"command": "pg_isready", "interval": 2.5, "timeout": 1, "failures": 5}

    assert HealthCheck.from_json(data).to_json() == data


@pytest.mark.parametrize(
    "fields",
    [
        {"http": "/a", "command": "true"},
        {},
        {"http": "a"},
        {"http": "/a", "interval": 0},
        {"command": "true", "timeout": -1},
        {"command": "true", "failures": 0},
    ],
)
def test_check_refuses_what_the_schema_would(fields: dict[str, Any]) -> None:
    """A check built in code cannot be ambiguous, off-host or never-ending either."""
    with pytest.raises(ValueError, match="health check"):
        HealthCheck(**fields)


@pytest.mark.parametrize(
    ("failures", "reason"),
    [
        (1, "health check failed once: command exited with code 1"),
        (3, "health check failed 3 times in a row: command exited with code 1"),
    ],
)
def test_unhealthy_reason_counts_the_failures(failures: int, reason: str) -> None:
    """The reason says how many probes failed and what the last one said."""
    last = ProbeResult(False, "command exited with code 1")

    assert unhealthy_reason(HealthCheck(command="false"), failures, last) == reason
