"""What the client's tests run: an app whose processes talk back, and real agents."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
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
