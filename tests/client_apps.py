"""What the client's tests run: an app whose processes talk back, and real agents."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smartmob_agent.client.agent import AgentClient
from smartmob_agent.client.results import LogLine, Marker, Process
from smartmob_agent.client.streams import Attachment
from tests.agent_process import AgentProcess
from tests.helpers import PYTHON, app_archive

#: Says ready, says so on SIGHUP, answers each line of its input, and runs until stopped.
ECHO_PY = """\
import signal, sys, time
signal.signal(signal.SIGHUP, lambda *_: print("reloading on SIGHUP", flush=True))
print("ready", flush=True)
for line in sys.stdin:
    print("you said: " + line.rstrip("\\n"), flush=True)
while True:
    time.sleep(3600)
"""
#: web and worker run the echo script; crash exits 3 at once; the Procfile has no "ghost".
PROCFILE = (
    "web: {PYTHON} -u echo.py\n"
    "worker: {PYTHON} -u echo.py\n"
    'crash: echo "about to crash"; exit 3\n'
)


def echo_archive() -> bytes:
    """The test app as a ``.tar.gz``."""
    return app_archive(PROCFILE, {"echo.py": ECHO_PY})


def write_echo_app(folder: Path) -> Path:
    """Write the test app into ``folder`` (for uploads and deploys); return it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Procfile").write_text(PROCFILE.replace("{PYTHON}", PYTHON))
    (folder / "echo.py").write_text(ECHO_PY)
    return folder


@asynccontextmanager
async def running_agent(state_dir: Path, *args: str) -> AsyncIterator[AgentProcess]:
    """A real ``smartmob-agent`` on a free port, killed at the end."""
    agent = await AgentProcess(state_dir, args).start()
    try:
        yield agent
    finally:
        await agent.kill()


async def read_until(
    console: Attachment, predicate: Callable[[LogLine], bool], timeout: float = 10.0
) -> list[LogLine]:
    """The lines read from ``console`` up to the first that ``predicate`` accepts."""
    seen: list[LogLine] = []
    async with asyncio.timeout(timeout):
        async for item in console:
            if isinstance(item, Marker):
                continue
            seen.append(item)
            if predicate(item):
                return seen
    raise AssertionError(f"the console ended before the line; it had {seen}")


async def created_and_running(
    client: AgentClient, url: str, node: str = "web.0", app: str = "shop",
    **options: Any,
) -> Process:
    """Create ``app``'s ``node`` from ``url`` and wait until it runs and, for the echo
    script, has said ready (its SIGHUP handler is then set)."""
    await client.create(app, node, url, **options)
    running = await client.wait_for(f"{app}.{node}", "running", timeout=20)
    if node.split(".")[0] in {"web", "worker"}:
        async with client.attach(running, tail=100) as console:
            await read_until(console, lambda line: line.line == "ready"
                             and line.pid == running.pid)
    return running


#: The ``smartmob`` command, as the tests run it.
SMARTMOB = [sys.executable, "-m", "smartmob_agent.client.cli"]


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    """An environment for ``smartmob`` without the user's agents, keys or colours: a
    home of its own, no ``SMARTMOB_*`` or ``NO_COLOR`` (unless given in ``extra``)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SMARTMOB_") and k not in {"NO_COLOR", "XDG_CONFIG_HOME"}}
    env.update(HOME=str(home), COLUMNS="100", **extra)
    return env


@dataclass
class Ran:
    """What a finished ``smartmob`` command did."""

    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


async def smartmob(*args: str, env: dict[str, str], stdin: bytes | None = None,
                   timeout: float = 60.0) -> Ran:
    """Run ``smartmob ARGS`` to its end (without blocking the event loop, which serves
    the archive server and reads the agents' output meanwhile)."""
    proc = await asyncio.create_subprocess_exec(
        *SMARTMOB, *args, env=env, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate(stdin)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return Ran(proc.returncode, out.decode(), err.decode())


class Following:
    """A ``smartmob`` command that runs until stopped (``logs -f``, ``attach``,
    ``events``), read line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.out: list[str] = []
        self.err: list[str] = []

    @classmethod
    async def start(cls, *args: str, env: dict[str, str]) -> Following:
        proc = await asyncio.create_subprocess_exec(
            *SMARTMOB, *args, env=env, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        return cls(proc)

    async def _until(self, stream: asyncio.StreamReader | None, seen: list[str],
                     predicate: Callable[[str], bool], timeout: float) -> str:
        assert stream is not None
        async with asyncio.timeout(timeout):
            while True:
                raw = await stream.readline()
                if not raw:
                    raise AssertionError(f"the command ended; it wrote {seen}")
                line = raw.decode().rstrip("\n")
                seen.append(line)
                if predicate(line):
                    return line

    async def line(self, predicate: Callable[[str], bool], timeout: float = 20.0) -> str:
        """The next line of standard output that ``predicate`` accepts."""
        return await self._until(self.proc.stdout, self.out, predicate, timeout)

    async def err_line(self, predicate: Callable[[str], bool], timeout: float = 20.0) -> str:
        """The next line of standard error that ``predicate`` accepts."""
        return await self._until(self.proc.stderr, self.err, predicate, timeout)

    async def send(self, text: str) -> None:
        """Write to the command's standard input."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        await self.proc.stdin.drain()

    async def interrupt(self, timeout: float = 20.0) -> Ran:
        """CTRL-C: SIGINT, then wait for the end; what it wrote after what was read."""
        self.proc.send_signal(signal.SIGINT)
        return await self.finish(timeout)

    async def finish(self, timeout: float = 20.0) -> Ran:
        """Wait for the command's end."""
        try:
            async with asyncio.timeout(timeout):
                out, err = await self.proc.communicate()
        finally:
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
        assert self.proc.returncode is not None
        return Ran(self.proc.returncode, out.decode(), err.decode())
