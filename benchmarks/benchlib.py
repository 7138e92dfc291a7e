"""Shared parts of the benchmarks: the real agent in a subprocess, an archive server,
the REST calls, WebSocket clients and psutil measurements.

Not a test helper: the benchmarks print figures and never assert. Every wait here has a
deadline, every loop a bound, and the only network peer is 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import hashlib
import io
import os
import pstats
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from aiohttp import web

PYTHON = sys.executable
#: Where the agent's bytecode is cached between runs (outside the repository).
PYCACHE = os.path.join(tempfile.gettempdir(), "smartmob-bench-pycache")
_warmed: list[bool] = []  # whether the bytecode cache was filled by this benchmark
_READY = re.compile(rb"listening on http://127\.0\.0\.1:(\d+)/ \(pid (\d+)\)")
MB = 1024 * 1024

# -- the child program used by the log benchmarks ---------------------------------------------

#: Creates GO.ready, writes N lines of WIDTH bytes (newline included) to stdout once GO
#: exists (at RATE lines/s if given, else as fast as it can), then creates GO.done and
#: sleeps (so the agent does not restart it while we measure).
FLOOD_PY = r'''
import os, sys, time
n, width, go = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rate = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0  # lines/s; 0: as fast as possible
open(go + ".ready", "w").close()
deadline = time.monotonic() + 120
while not os.path.exists(go):
    if time.monotonic() > deadline:
        sys.exit(0)
    time.sleep(0.0005)
try:
    os.unlink(go)  # one flood per go file, even if the agent restarts us
except FileNotFoundError:
    pass
# a block of 1000 numbered lines, written again and again
block = b"".join(
    (b"line %07d " % i).ljust(width - 1, b"x") + b"\n" for i in range(1000)
)
out = sys.stdout.buffer
full, rest = divmod(n, 1000)
if rate > 0:  # paced: block i is written no earlier than t0 + i * 1000 / rate
    t0 = time.perf_counter()
    step = 1000 / rate
    for i in range(full):
        ahead = t0 + i * step - time.perf_counter()
        if ahead > 0:
            time.sleep(ahead)
        out.write(block)
else:
    for _ in range(full):
        out.write(block)
if rest:
    out.write(block[: rest * width])
out.flush()
open(go + ".done", "w").close()
time.sleep(300)
'''


def flood_command(lines: int, width: int, go: Path, rate: float = 0) -> list[str]:
    """The argv of the flood program run directly (the bare-reader baseline)."""
    return [PYTHON, "-c", FLOOD_PY, str(lines), str(width), str(go), str(rate)]


# -- archives and the server that serves them ---------------------------------------------------


def make_tar_gz(files: Mapping[str, str]) -> bytes:
    """A tar.gz of ``files`` (name -> text)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


#: The one app every benchmark deploys; process types pick the behaviour.
APP_FILES = {
    "Procfile": (
        'flood: exec "$BENCH_PYTHON" flood.py'
        ' "$FLOOD_LINES" "$FLOOD_WIDTH" "$FLOOD_GO" "$FLOOD_RATE"\n'
        "web: exec sleep 1000\n"
        "idle: exec sleep 3600\n"
        "crash: exit 1\n"
    ),
    "flood.py": FLOOD_PY,
}


class ArchiveServer:
    """Serves in-memory files on 127.0.0.1 with aiohttp."""

    def __init__(self, files: Mapping[str, bytes]) -> None:
        self.files = dict(files)
        self.hits = 0
        self._runner: web.AppRunner | None = None
        self.base = ""

    async def _serve(self, request: web.Request) -> web.Response:
        self.hits += 1
        data = self.files.get(request.match_info["name"])
        if data is None:
            raise web.HTTPNotFound()
        return web.Response(body=data, content_type="application/gzip")

    async def __aenter__(self) -> ArchiveServer:
        app = web.Application()
        app.router.add_get("/{name}", self._serve)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.base = f"http://{host}:{port}"
        return self

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


# -- the agent --------------------------------------------------------------------------------


class AgentRunner:
    """The real ``smartmob-agent`` (``python -m smartmob_agent``) in a subprocess.

    Args:
        state_dir: its ``--state-dir``.
        wrapper: argv put before ``-m smartmob_agent ...`` instead of the bare interpreter,
            e.g. ``[python, "-m", "cProfile", "-o", "out.prof"]`` or ``["py-spy", "record",
            ..., "--", python]``. The agent's own pid comes from its ready line.
    """

    def __init__(self, state_dir: Path, wrapper: Sequence[str] | None = None,
                 args: Sequence[str] = (), env: Mapping[str, str] | None = None) -> None:
        self.state_dir = state_dir
        self.wrapper = list(wrapper) if wrapper else [PYTHON]
        self.args = list(args)
        self.env = {**os.environ, **(env or {})}
        # bytecode cached, as an installed package has it: with PYTHONDONTWRITEBYTECODE
        # (set in some environments) the agent would compile its sources at every start,
        # which costs time and ~1.5 MB of resident memory that no installed agent pays
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)
        self.env.setdefault("PYTHONPYCACHEPREFIX", PYCACHE)
        snapshot = os.environ.get("BENCH_AGENT_PYTHONPATH")
        if snapshot:
            self.env["PYTHONPATH"] = os.pathsep.join(
                filter(None, [snapshot, self.env.get("PYTHONPATH", "")]))
        self.proc: asyncio.subprocess.Process | None = None
        self.pid = 0
        self.url = ""
        self.ps: psutil.Process | None = None
        self.stderr_tail: deque[str] = deque(maxlen=200)
        self.stderr_lines = 0
        self._pump: asyncio.Task[None] | None = None
        self._watch: list[tuple[re.Pattern[str], asyncio.Future[str]]] = []

    async def start(self, timeout: float = 20.0) -> AgentRunner:
        if not _warmed:  # the first agent would pay for writing the bytecode cache
            _warmed.append(True)
            warm = await asyncio.create_subprocess_exec(
                PYTHON, "-c", "import smartmob_agent.cli", env=self.env,
                cwd=self.state_dir.parent)
            await warm.wait()
        cmd = [*self.wrapper, "-m", "smartmob_agent", "--port", "0",
               "--state-dir", str(self.state_dir), *self.args]
        self.proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, env=self.env,
            # not the repository: ``-m`` would import the package from the cwd first
            cwd=self.state_dir.parent,
        )
        assert self.proc.stderr is not None
        async with asyncio.timeout(timeout):
            while True:
                line = await self.proc.stderr.readline()
                if not line:
                    raise RuntimeError("the agent exited before listening:\n"
                                       + "\n".join(self.stderr_tail))
                self.stderr_tail.append(line.decode(errors="replace").rstrip())
                match = _READY.search(line)
                if match:
                    self.url = f"http://127.0.0.1:{int(match.group(1))}"
                    self.pid = int(match.group(2))
                    break
        self.ps = psutil.Process(self.pid)
        # the agent logs to stderr: keep reading it, or a full pipe would block it
        self._pump = asyncio.get_running_loop().create_task(self._read_stderr())
        return self

    async def _read_stderr(self) -> None:
        assert self.proc is not None
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            text = line.decode(errors="replace").rstrip()
            self.stderr_lines += 1
            self.stderr_tail.append(text)
            for pattern, future in self._watch:
                if not future.done() and pattern.search(text):
                    future.set_result(text)

    def expect_log(self, pattern: str) -> asyncio.Future[str]:
        """A future resolved with the next stderr line matching ``pattern``."""
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._watch.append((re.compile(pattern), future))
        return future

    # -- measurements ---------------------------------------------------------------------

    def cpu(self) -> float:
        """User + system CPU seconds of the agent process itself (not its children)."""
        assert self.ps is not None
        times = self.ps.cpu_times()
        return times.user + times.system

    def rss(self) -> int:
        assert self.ps is not None
        return self.ps.memory_info().rss

    def uss(self) -> int:
        assert self.ps is not None
        return self.ps.memory_full_info().uss

    def guardian(self) -> psutil.Process | None:
        assert self.ps is not None
        for child in self.ps.children():
            with contextlib.suppress(psutil.Error):
                if "guardian" in " ".join(child.cmdline()):
                    return child
        return None

    def descendants(self) -> list[psutil.Process]:
        if self.ps is None:  # never started
            return []
        with contextlib.suppress(psutil.Error):
            return self.ps.children(recursive=True)
        return []

    # -- stop -------------------------------------------------------------------------------

    async def stop(self, timeout: float = 60.0) -> None:
        """SIGINT the agent, wait for it, and make sure none of its descendants is left."""
        if self.proc is None:
            return
        left_before = self.descendants()
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                # the agent's own pid (from its ready line), else whatever we started
                os.kill(self.pid or self.proc.pid, signal.SIGINT)
            try:
                async with asyncio.timeout(timeout):
                    code = await self.proc.wait()
                if code != 0:
                    print(f"  ! the agent exited with status {code}")
            except TimeoutError:
                print(f"  ! the agent did not stop within {timeout:g} s of SIGINT: killing it")
                if self.pid:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.pid, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        if self._pump is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                async with asyncio.timeout(5):
                    await self._pump
        # the guardian sweeps after the agent; give everyone a moment, then insist
        _, alive = await asyncio.to_thread(psutil.wait_procs, left_before, 5.0)
        for process in alive:
            with contextlib.suppress(psutil.Error):
                print(f"  ! left running after the agent stopped: {process.pid} "
                      f"{process.cmdline()}; killing it")
                process.kill()
        self.proc = None


# -- the REST API -----------------------------------------------------------------------------


class Api:
    """Calls on the agent's REST API over one keep-alive session."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=50), timeout=aiohttp.ClientTimeout(total=60)
        )

    async def close(self) -> None:
        await self.session.close()

    async def create(self, app: str, node: str, process_type: str, source_url: str,
                     env: Mapping[str, str] | None = None) -> dict[str, Any]:
        body = {"app": app, "node": node, "process_type": process_type,
                "source_url": source_url, "env": dict(env or {})}
        async with self.session.post(f"{self.base}/create-process", json=body) as response:
            document = await response.json()
            if response.status != 201:
                raise RuntimeError(f"create {app}.{node}: {response.status} {document}")
            return document

    async def status(self, slug: str) -> dict[str, Any]:
        async with self.session.get(f"{self.base}/process-status/{slug}") as response:
            return await response.json()

    async def list(self) -> list[dict[str, Any]]:
        async with self.session.get(f"{self.base}/list-processes") as response:
            return (await response.json())["processes"]

    async def delete(self, slug: str) -> None:
        async with self.session.post(f"{self.base}/delete-process/{slug}", json={}) as response:
            await response.read()

    async def index_latency(self) -> float:
        """Seconds taken by one ``GET /``."""
        start = time.perf_counter()
        async with self.session.get(f"{self.base}/") as response:
            await response.read()
        return time.perf_counter() - start

    async def wait_state(self, slug: str, states: Sequence[str], timeout: float = 30.0,
                         period: float = 0.01) -> dict[str, Any]:
        """Poll the status document until ``state`` is one of ``states``."""
        deadline = time.monotonic() + timeout
        while True:
            document = await self.status(slug)
            if document.get("state") in states:
                return document
            if document.get("state") == "failed" or time.monotonic() > deadline:
                raise RuntimeError(f"{slug} did not reach {states}: {document}")
            await asyncio.sleep(period)


# -- WebSocket clients --------------------------------------------------------------------------

NOTICE_PREFIX = b"[smartmob-agent] "
_DROPPED = re.compile(rb"\[smartmob-agent\] (\d+) line\(s\) dropped")


@dataclass
class FrameCount:
    """What a WebSocket client saw."""

    lines: int = 0
    notices: int = 0
    reported_dropped: int = 0
    first: float = 0.0
    last: float = 0.0
    closed: bool = False


class RawWebSocket(asyncio.Protocol):
    """A minimal WebSocket client that counts text frames without decoding them.

    Handshake, then a tight parse of frame headers over each chunk; payloads are never
    copied or decoded. This is the cheapest possible reader, to tell the agent's limit
    from the client's.
    """

    def __init__(self, target: int) -> None:
        self.count = FrameCount()
        self.target = target
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.handshaken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._buf = b""
        self._headers = b""
        self.transport: asyncio.Transport | None = None

    @classmethod
    async def connect(cls, url: str, target: int) -> RawWebSocket:
        match = re.fullmatch(r"ws://127\.0\.0\.1:(\d+)(/.*)", url)
        assert match, url
        port, path = int(match.group(1)), match.group(2)
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(lambda: cls(target), "127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        assert protocol.transport is not None
        protocol.transport.write(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        async with asyncio.timeout(10):
            await protocol.handshaken
        return protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self.handshaken.done():
            self._headers += data
            end = self._headers.find(b"\r\n\r\n")
            if end < 0:
                return
            if not self._headers.startswith(b"HTTP/1.1 101"):
                self.handshaken.set_exception(RuntimeError(self._headers[:200].decode()))
                return
            data = self._headers[end + 4:]
            self.handshaken.set_result(None)
            if not data:
                return
        buf = self._buf + data if self._buf else data
        count = self.count
        if not count.first:
            count.first = time.perf_counter()
        n = len(buf)
        pos = 0
        lines = 0
        while pos + 2 <= n:
            length = buf[pos + 1] & 0x7F
            head = 2
            if length == 126:
                if pos + 4 > n:
                    break
                length = int.from_bytes(buf[pos + 2:pos + 4], "big")
                head = 4
            elif length == 127:
                if pos + 10 > n:
                    break
                length = int.from_bytes(buf[pos + 2:pos + 10], "big")
                head = 10
            end = pos + head + length
            if end > n:
                break
            opcode = buf[pos] & 0x0F
            if opcode == 1:
                if buf[pos + head] == 0x5B and buf.startswith(NOTICE_PREFIX, pos + head):
                    count.notices += 1
                    match = _DROPPED.match(buf, pos + head)
                    if match:
                        count.reported_dropped += int(match.group(1))
                else:
                    lines += 1
            elif opcode == 8:
                count.closed = True
            pos = end
        self._buf = buf[pos:]
        if lines:
            count.lines += lines
            count.last = time.perf_counter()
            if count.lines >= self.target and not self.done.done():
                self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.count.closed = True
        if not self.handshaken.done():
            self.handshaken.set_exception(ConnectionError("closed during the handshake"))
        if not self.done.done():
            self.done.set_result(None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def aiohttp_ws_reader(ws: aiohttp.ClientWebSocketResponse, count: FrameCount,
                            target: int, done: asyncio.Future[None]) -> None:
    """Count the text frames of an aiohttp client WebSocket until ``target`` lines."""
    TEXT, BINARY = aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY
    receive = ws.receive
    lines = 0
    try:
        while True:
            msg = await receive()
            if msg.type is TEXT:
                data = msg.data
                if data.startswith("[smartmob-agent] "):
                    count.notices += 1
                    match = _DROPPED.match(data.encode())
                    if match:
                        count.reported_dropped += int(match.group(1))
                    continue
                lines += 1
                if lines == 1:
                    count.first = time.perf_counter()
                if lines >= target:
                    break
                if not lines & 0x3FF:  # publish progress now and then, cheaply
                    count.lines = lines
                    count.last = time.perf_counter()
            elif msg.type is BINARY:
                continue
            else:
                count.closed = True
                break
    finally:
        count.lines = lines
        count.last = time.perf_counter()
        if not done.done():
            done.set_result(None)


async def plain_ws_reader(ws: aiohttp.ClientWebSocketResponse, count: FrameCount,
                          target: int, done: asyncio.Future[None]) -> None:
    """Count lines as the plainest aiohttp client does: ``async for msg in ws`` (the
    issue's follower), notices (``[smartmob-agent] ...``) apart, until ``target`` lines."""
    lines = 0
    try:
        async for msg in ws:
            data = msg.data
            if data.startswith("[smartmob-agent] "):
                count.notices += 1
                match = _DROPPED.match(data.encode())
                if match:
                    count.reported_dropped += int(match.group(1))
                continue
            lines += 1
            if lines == 1:
                count.first = time.perf_counter()
            if lines >= target:
                break
            if not lines & 0x3FF:  # publish progress now and then, cheaply
                count.lines = lines
                count.last = time.perf_counter()
        else:
            count.closed = True
    finally:
        count.lines = lines
        count.last = time.perf_counter()
        if not done.done():
            done.set_result(None)


async def wait_lines(count: FrameCount, done: asyncio.Future[None], done_file: Path,
                     target: int, timeout: float = 120.0, idle: float = 2.0) -> str:
    """Wait until the client has ``target`` lines, or the flood ended and nothing came
    for ``idle`` seconds (lines were dropped), or ``timeout``. Returns why it ended."""
    deadline = time.monotonic() + timeout
    seen, seen_at = -1, time.monotonic()
    while time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.1):
                await asyncio.shield(done)
        if done.done():
            return "complete" if count.lines >= target else "closed"
        if count.lines != seen:
            seen, seen_at = count.lines, time.monotonic()
        elif exists(done_file) and time.monotonic() - seen_at > idle:
            return "stalled (lines missing)"
    return "timeout"


# -- small things ------------------------------------------------------------------------------


def fmt_mb(n: float) -> str:
    return f"{n / MB:.1f} MB"


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


@contextlib.asynccontextmanager
async def bench_env(wrapper: Sequence[str] | None = None, args: Sequence[str] = (),
                    env: Mapping[str, str] | None = None):
    """A temporary folder, the archive server and a started agent, all cleaned up."""
    with tempfile.TemporaryDirectory(prefix="smartmob-bench-") as tmp:
        tmpdir = Path(tmp)
        agent = AgentRunner(tmpdir / "state", wrapper=wrapper, args=args, env=env)
        async with ArchiveServer({"app.tar.gz": make_tar_gz(APP_FILES)}) as server:
            api: Api | None = None
            try:
                await agent.start()
                api = Api(agent.url)
                yield tmpdir, server, agent, api
            finally:
                if api is not None:
                    await api.close()
                await agent.stop()


def load() -> str:
    """The load average (1, 5, 15 minutes), as printed."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def header(title: str) -> None:
    print(f"== {title}")
    print(f"   python {sys.version.split()[0]}, aiohttp {aiohttp.__version__}, "
          f"{os.cpu_count()} CPU(s), load average {load()}")
    print(f"   $ python {' '.join(map(shlex.quote, sys.argv))}")
    print(f"   code: {code_version()}")


def agent_code_dir() -> Path:
    """The folder whose ``smartmob_agent`` package the agent runs: the repository's, or
    ``$BENCH_AGENT_PYTHONPATH`` (a snapshot, e.g. ``git archive HEAD smartmob_agent | tar
    -x -C DIR``, so that concurrent edits of the package do not change what is measured)."""
    snapshot = os.environ.get("BENCH_AGENT_PYTHONPATH")
    return Path(snapshot) if snapshot else Path(__file__).resolve().parent.parent


def code_version() -> str:
    """The repository's commit, and a digest of the package's sources the agent runs."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head = "unknown"
    digest = hashlib.sha1()
    package = agent_code_dir() / "smartmob_agent"
    for path in sorted(package.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    where = ("the repository" if "BENCH_AGENT_PYTHONPATH" not in os.environ
             else f"snapshot {agent_code_dir()}")
    return f"HEAD {head}; agent runs {where}, sources sha1 {digest.hexdigest()[:10]}"


def parse_env(pairs: Sequence[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings (``--agent-env``) as a dict."""
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--agent-env wants KEY=VALUE, not {pair!r}")
        env[key] = value
    return env


def exists(path: Path) -> bool:
    """Whether ``path`` exists: one stat() of a local file, fine inside the event loop."""
    return path.exists()


def mtime(path: Path) -> float:
    """When ``path`` was last modified (epoch seconds)."""
    return path.stat().st_mtime


async def wait_file(path: Path, timeout: float = 30.0, period: float = 0.002) -> None:
    """Wait until ``path`` exists (bounded)."""
    deadline = time.monotonic() + timeout
    while not exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout:g} s")
        await asyncio.sleep(period)


def precise_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` with nanosecond resolution: the sum of its threads'
    ``/proc/PID/task/TID/schedstat`` (time on a CPU). psutil's CPU times tick every 10 ms,
    too coarse for an idle process; this misses only threads that already exited."""
    total = 0
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with (contextlib.suppress(OSError, ValueError, IndexError),
                  open(f"/proc/{pid}/task/{tid}/schedstat") as file):
                total += int(file.read().split()[0])
    return total / 1e9


def own_cpu() -> float:
    """User + system CPU seconds of this (the benchmark's) process."""
    times = psutil.Process().cpu_times()
    return times.user + times.system


def flood_env(lines: int, width: int, go: Path, rate: float = 0) -> dict[str, str]:
    """The create request's ``env`` for the ``flood`` process type."""
    return {"BENCH_PYTHON": PYTHON, "FLOOD_LINES": str(lines), "FLOOD_WIDTH": str(width),
            "FLOOD_GO": str(go), "FLOOD_RATE": str(rate)}


# -- profiling the agent -------------------------------------------------------------------------


class Profiler:
    """Runs the agent under cProfile or py-spy (``kind``), then summarises the profile."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.wrapper: list[str] | None = None
        self.dir = Path(tempfile.mkdtemp(prefix="smartmob-bench-profile-"))
        if kind == "cprofile":
            self.path = self.dir / "agent.prof"
            self.wrapper = [PYTHON, "-m", "cProfile", "-o", str(self.path)]
        elif kind == "py-spy":
            spy = shutil.which("py-spy") or str(Path(PYTHON).with_name("py-spy"))
            self.path = self.dir / "agent.folded"
            self.wrapper = [spy, "record", "--nonblocking", "--rate", "500", "--format",
                            "raw", "--output", str(self.path), "--", PYTHON]

    def report(self, top: int = 25) -> None:
        try:
            if self.kind == "none":
                return
            if not self.path.exists():
                print(f"   ! {self.kind} wrote no profile (py-spy needs ptrace)")
            elif self.kind == "cprofile":
                print_cprofile(self.path, top)
            else:
                print_pyspy(self.path, top)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def print_cprofile(path: Path, top: int) -> None:
    out = io.StringIO()
    stats = pstats.Stats(str(path), stream=out)
    stats.sort_stats("tottime").print_stats(top)
    print("\n-- cProfile of the agent (whole run), top by own time --")
    text = out.getvalue()
    start = text.find("   ncalls")
    print(text[start:] if start >= 0 else text)
    out = io.StringIO()
    stats.stream = out
    stats.sort_stats("cumulative").print_stats(top)
    print("-- top by cumulative time --")
    text = out.getvalue()
    start = text.find("   ncalls")
    print(text[start:] if start >= 0 else text)


def print_pyspy(path: Path, top: int) -> None:
    """Summarise py-spy's collapsed stacks: own samples per function, and per stack."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        samples = int(n)
        # one entry per function, whatever the line: "name (file:line)" -> "name (file)"
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
        total += samples
        own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    print(f"\n-- py-spy of the agent: {total} samples (idle excluded) --")
    print("own%   function (file)")
    for frame, n in own.most_common(top):
        print(f"{100 * n / total:5.1f}  {frame}")
    print("incl%  function")
    for frame, n in inclusive.most_common(top):
        print(f"{100 * n / total:5.1f}  {frame}")


