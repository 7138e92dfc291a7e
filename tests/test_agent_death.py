"""Children die with a SIGKILLed agent: the parent-death signal, and a guardian that is
replaced when it dies.

* A child gets SIGKILL when its parent dies, with no guardian at all (``setpriv
  --pdeathsig``, or ``prctl`` between fork and exec where setpriv is missing).
* A SIGKILLed guardian is replaced at once; the new one kills the grandchildren when the
  agent is SIGKILLed in turn (they were left under PID 1 before).
* A guardian that dies again and again is replaced at most ``limit`` times a window.

(The child caught between fork and exec is ``tests/test_kill9.py``'s last test.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import aiohttp
import pytest

from smartmob_agent.processes.keeper import Keeper, restart_delay
from smartmob_agent.processes.reaper import Reaper
from tests.agent_process import AgentProcess
from tests.conftest import ArchiveServer
from tests.helpers import app_archive, eventually
from tests.test_durable import all_running
from tests.test_kill9 import (
    CLEANUP_TIMEOUT,
    TOKEN_VARIABLE,
    guardian_of,
    our_processes,
    wait_gone,
    wait_processes_gone,
)

#: A parent that is not the agent: spawns ``exec sleep 1002`` the agent's way, prints its
#: pid, and waits to be killed. With the argument ``prctl``, as if setpriv were missing.
PARENT = """
import asyncio, os, subprocess, sys
from pathlib import Path
from smartmob_agent.processes import spawn
from smartmob_agent.processes.reaper import Reaper

if sys.argv[1] == "prctl":
    spawn.death_signal_wrapper = lambda: ()

async def main():
    popen = spawn.spawn_shell(
        "exec sleep 1002", cwd=Path("."), env=dict(os.environ), reaper=Reaper(),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    print(popen.pid, flush=True)
    await asyncio.sleep(1000)

asyncio.run(main())
"""


def command_name(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm") as file:
            return file.read().strip()
    except OSError:
        return None


def sleepers(marker: str) -> list[int]:
    """The live processes carrying ``marker`` that run ``sleep``."""
    return [pid for pid in our_processes([marker]) if command_name(pid) == "sleep"]


@pytest.mark.parametrize("how", ["setpriv", "prctl"])
async def test_a_child_dies_with_its_sigkilled_parent_without_a_guardian(
    tmp_path: Path, how: str
) -> None:
    """SIGKILL of the process that spawned a child (here no guardian runs at all): the
    child, already running its command, gets SIGKILL from the kernel."""
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PARENT, how, cwd=tmp_path, stdout=asyncio.subprocess.PIPE,
    )
    child_fd: int | None = None
    try:
        assert parent.stdout is not None
        async with asyncio.timeout(10):
            pid = int(await parent.stdout.readline())
        child_fd = os.pidfd_open(pid)
        # running sleep: past setpriv and the shell, whichever set the signal
        await eventually(lambda: command_name(pid) == "sleep", what="the child to run sleep")
        parent.kill()
        await parent.wait()
        await wait_gone([child_fd], 5.0, "the child of the SIGKILLed parent")
    finally:
        if parent.returncode is None:
            parent.kill()
            await parent.wait()
        if child_fd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(child_fd, signal.SIGKILL)
            os.close(child_fd)


@pytest.mark.timeout(60)
async def test_a_sigkilled_guardian_is_replaced_and_the_new_one_guards(
    tmp_path: Path, archive_server: ArchiveServer, http: aiohttp.ClientSession,
) -> None:
    """SIGKILL the guardian: the agent starts a new one (and says so); SIGKILL the agent
    then: no child or grandchild survives."""
    token = uuid.uuid4().hex
    token_marker = f"{TOKEN_VARIABLE}={token}"
    url = archive_server.add("guarded.tgz", app_archive(
        "web: exec sleep 1003\ntree: sleep 1003 & sleep 1003 & wait\n"))
    agent = AgentProcess(tmp_path / "state")
    markers = [token_marker]
    try:
        await agent.start()
        first, agent_markers = await guardian_of(agent)
        markers.extend(agent_markers)
        for kind in ("web", "tree"):
            body = {"app": "guarded", "node": f"{kind}.0", "process_type": kind,
                    "source_url": url, "env": {TOKEN_VARIABLE: token}}
            async with http.post(agent.url + "/create-process", json=body) as response:
                assert response.status == 201, await response.text()
        await all_running(http, agent.url)
        await eventually(lambda: len(sleepers(token_marker)) == 3,
                         what="the 3 sleep commands to run")

        first_fd = os.pidfd_open(first)
        try:
            os.kill(first, signal.SIGKILL)
            await wait_gone([first_fd], CLEANUP_TIMEOUT, "the first guardian")
        finally:
            os.close(first_fd)
        async with asyncio.timeout(10):
            while True:
                second, second_markers = await guardian_of(agent)
                if second != first:
                    break
                await asyncio.sleep(0.01)
        assert second_markers == agent_markers
        await eventually(lambda: "starting a new one" in agent.stderr,
                         what="the agent to say it replaced the guardian")
        assert len(sleepers(token_marker)) == 3  # the old one killed nobody

        await agent.kill()
        await wait_processes_gone(markers, CLEANUP_TIMEOUT, "the children of the agent")
    finally:
        await agent.kill()
        for pid in our_processes(markers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def test_a_guardian_that_keeps_dying_is_replaced_at_a_bounded_rate() -> None:
    """A "guardian" that exits as soon as it starts: replaced at once ``limit`` times,
    then the next start waits for the window; after release, none is due."""
    reaper = Reaper()

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(["/bin/true"], stdin=subprocess.PIPE)

    keeper = Keeper(start, reaper, limit=3, window=60.0)
    try:
        keeper.start()
        await eventually(lambda: keeper.starts == 4 and keeper.pid is None
                         and keeper.next_restart is not None, timeout=10.0,
                         what="the first guardian and 3 replacements to end")
        delay = keeper.next_restart
        assert delay is not None
        assert delay > 30.0
        assert keeper.starts == 4
    finally:
        keeper.release()
        reaper.close()
    assert keeper.next_restart is None


@pytest.mark.parametrize(("restarts", "now", "delay"), [
    ([], 0.0, 0.0),
    ([1.0, 2.0], 3.0, 0.0),
    ([1.0, 2.0, 3.0], 4.0, 57.0),
    ([1.0, 2.0, 3.0], 61.5, 0.0),
    ([0.0, 50.0, 51.0, 52.0], 55.0, 55.0),
])
def test_restart_delay_allows_limit_restarts_per_window(
    restarts: list[float], now: float, delay: float
) -> None:
    """At most 3 restarts in any 60 s: the next waits until the oldest of the last 3
    is 60 s old."""
    assert restart_delay(restarts, now, limit=3, window=60.0) == delay
