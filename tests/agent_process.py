"""The real ``smartmob-agent`` command in a subprocess, for end-to-end tests."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

_READY = re.compile(rb"listening on (https?://\S+?)/? ")


def ready_url(line: bytes) -> str | None:
    """The agent's URL if ``line`` is its ready line: the ``text`` format's, or a
    ``json`` ``bind`` record (its ``url``), or a ``kv`` one (found in its message)."""
    if line.startswith(b"{"):
        try:
            record = json.loads(line)
        except ValueError:
            return None
        if isinstance(record, dict) and record.get("event") == "bind":
            return str(record["url"]).rstrip("/")
        return None
    match = _READY.search(line)
    return match.group(1).decode() if match else None


class AgentProcess:
    """Runs ``python -m smartmob_agent`` and learns its URL from its ready line: on
    stderr (the ``text`` format) or stdout (``kv`` and ``json``, a ``bind`` record)."""

    def __init__(
        self, state_dir: Path, args: Sequence[str] = (), env: Mapping[str, str] | None = None,
        wrapper: Sequence[str] = (),
        preexec_fn: Callable[[], None] | None = None, cwd: Path | None = None,
    ) -> None:
        self.state_dir = state_dir
        #: the agent's current folder (default: the tests')
        self.cwd = cwd
        #: run in the child before the agent starts (e.g. to lower its limits)
        self.preexec_fn = preexec_fn
        self.args = list(args)
        #: a command that runs the agent's command line given after it (``setpriv ...``)
        self.wrapper = list(wrapper)
        self.env = dict(os.environ if env is None else env)
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""
        self.stderr_lines: list[bytes] = []
        self.stdout_lines: list[bytes] = []
        self._pumps: list[asyncio.Task[None]] = []
        self._ready: asyncio.Future[str] | None = None
        self._open_streams = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, timeout: float = 10.0, *, ready: bool = True) -> AgentProcess:
        """Start the agent on a free port; return once it says it is listening (or at
        once, without ``ready``: its records go elsewhere, and the test sets :attr:`url`
        from its ``bind`` record)."""
        self.proc = await asyncio.create_subprocess_exec(
            *self.wrapper, sys.executable, "-m", "smartmob_agent", "--port", "0",
            "--state-dir", str(self.state_dir), *self.args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=self.env,
            preexec_fn=self.preexec_fn, cwd=self.cwd,
        )
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._open_streams = 2
        self._pumps = [
            loop.create_task(self._read(self.proc.stderr, self.stderr_lines)),
            loop.create_task(self._read(self.proc.stdout, self.stdout_lines)),
        ]
        if ready:
            async with asyncio.timeout(timeout):
                self.url = await self._ready
        return self

    async def _read(self, stream: asyncio.StreamReader, lines: list[bytes]) -> None:
        while line := await stream.readline():
            lines.append(line)
            if self._ready is not None and not self._ready.done():
                url = ready_url(line)
                if url is not None:
                    self._ready.set_result(url)
        self._open_streams -= 1
        if not self._open_streams and self._ready is not None and not self._ready.done():
            # retrieved by start(), or by nobody (ready=False): no "never retrieved" noise
            self._ready.add_done_callback(lambda future: future.exception())
            self._ready.set_exception(AssertionError(
                f"the agent exited before listening: {b''.join(self.stderr_lines)!r}"
            ))

    async def wait(self, timeout: float = 20.0) -> int:
        """Wait for the agent to exit; return its exit status."""
        assert self.proc is not None
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
            for pump in self._pumps:
                await pump
        return code

    @property
    def stderr(self) -> str:
        return b"".join(self.stderr_lines).decode(errors="replace")

    @property
    def stdout(self) -> str:
        return b"".join(self.stdout_lines).decode(errors="replace")

    async def kill(self) -> None:
        """SIGKILL the agent if it still runs (test teardown)."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        for pump in self._pumps:
            pump.cancel()
