"""The real ``smartmob-agent`` command in a subprocess, for end-to-end tests."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

_READY = re.compile(rb"listening on (https?://\S+?)/? ")


class AgentProcess:
    """Runs ``python -m smartmob_agent`` and learns its URL from the ready line on stderr."""

    def __init__(
        self, state_dir: Path, args: Sequence[str] = (), env: Mapping[str, str] | None = None,
        wrapper: Sequence[str] = (),
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.state_dir = state_dir
        #: run in the child before the agent starts (e.g. to lower its limits)
        self.preexec_fn = preexec_fn
        self.args = list(args)
        #: a command that runs the agent's command line given after it (``setpriv ...``)
        self.wrapper = list(wrapper)
        self.env = dict(os.environ if env is None else env)
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""
        self.stderr_lines: list[bytes] = []
        self._pump: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, timeout: float = 10.0) -> AgentProcess:
        """Start the agent on a free port; return once it says it is listening."""
        self.proc = await asyncio.create_subprocess_exec(
            *self.wrapper, sys.executable, "-m", "smartmob_agent", "--port", "0",
            "--state-dir", str(self.state_dir), *self.args,
            stderr=asyncio.subprocess.PIPE, env=self.env, preexec_fn=self.preexec_fn,
        )
        assert self.proc.stderr is not None
        async with asyncio.timeout(timeout):
            while True:
                line = await self.proc.stderr.readline()
                if not line:
                    raise AssertionError(
                        f"the agent exited before listening: {b''.join(self.stderr_lines)!r}"
                    )
                self.stderr_lines.append(line)
                match = _READY.search(line)
                if match:
                    self.url = match.group(1).decode()
                    break
        self._pump = asyncio.get_running_loop().create_task(self._read_stderr())
        return self

    async def _read_stderr(self) -> None:
        assert self.proc is not None
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.stderr_lines.append(line)

    async def wait(self, timeout: float = 20.0) -> int:
        """Wait for the agent to exit; return its exit status."""
        assert self.proc is not None
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
            if self._pump is not None:
                await self._pump
        return code

    @property
    def stderr(self) -> str:
        return b"".join(self.stderr_lines).decode(errors="replace")

    async def kill(self) -> None:
        """SIGKILL the agent if it still runs (test teardown)."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._pump is not None:
            self._pump.cancel()
