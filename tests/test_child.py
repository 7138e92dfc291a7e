"""The OS adapter on real children: exits, the stop sequence, descendants, output, signals."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import psutil
import pytest

from smartmob_agent.errors import SpawnError
from smartmob_agent.model import Exit
from smartmob_agent.output.lines import DEFAULT_MAX_LINE
from smartmob_agent.processes.reaper import Reaper
from smartmob_agent.processes.spawn import Child
from tests.helpers import PYTHON, eventually, pid_alive

#: Prints ready, then exits with code 42 on SIGTERM.
WAIT_TERM = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(42))
print("ready", flush=True)
while True:
    time.sleep(60)
"""

#: Prints ready (in one write, as several may share a pipe) and ignores SIGTERM: only
#: SIGKILL ends it.
IGNORE_TERM = """
import os, signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
os.write(1, b"ready\\n")
while True:
    time.sleep(60)
"""

#: On SIGTERM, takes a moment to clean up, says so, and exits.
SLOW_CLEANUP = """
import os, signal, sys, time

def cleanup(*_):
    time.sleep(0.3)
    print("cleaned up", flush=True)
    sys.exit(0)

signal.signal(signal.SIGTERM, cleanup)
print("ready", os.getpid(), flush=True)
while True:
    time.sleep(60)
"""

#: Prints ready with its pid, then exits with code 5 when SIGUSR1 arrives.
WAIT_USR1 = """
import os, signal, sys, time
signal.signal(signal.SIGUSR1, lambda *_: sys.exit(5))
print("ready", os.getpid(), flush=True)
while True:
    time.sleep(60)
"""

#: Counts the copies of SIGRTMIN it gets (held pending until SIGRTMIN+1, which real-time
#: ordering delivers after them), says how many, and exits.
COUNT_RTMIN = """
import os, signal
first, last = signal.SIGRTMIN, signal.SIGRTMIN + 1
signal.pthread_sigmask(signal.SIG_BLOCK, {first, last})
signal.signal(first, signal.SIG_DFL)  # ignored when inherited: they would be discarded
signal.signal(last, signal.SIG_DFL)
print("ready", os.getpid(), flush=True)
count = 0
while signal.sigwaitinfo({first, last}).si_signo == first:
    count += 1
print("count", count, flush=True)
"""

#: Writes numbered lines to stdout and stderr, alternating.
INTERLEAVED = """
import sys
for i in range(500):
    print(f"out {i}", file=sys.stdout, flush=True)
    print(f"err {i}", file=sys.stderr, flush=True)
"""

#: A line of about 1 MB whose content tells each position apart, then a short line.
LONG_LINE_BYTES = "".join(f"{i:07d}" for i in range(150_000)).encode()
LONG_LINE = """
import sys
sys.stdout.buffer.write("".join(f"{i:07d}" for i in range(150_000)).encode() + b"\\nend\\n")
"""


class Output:
    """A sink that keeps every line per stream and lets a test await one."""

    def __init__(self) -> None:
        self.lines: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        self._waiters: list[tuple[bytes, asyncio.Future[bytes]]] = []

    def __call__(self, stream: str, lines: list[bytes]) -> None:
        self.lines[stream].extend(lines)
        for line in lines:
            for prefix, future in self._waiters:
                if not future.done() and line.startswith(prefix):
                    future.set_result(line)

    async def line(self, prefix: bytes) -> bytes:
        """Return the first line starting with ``prefix``, waiting for it if need be."""
        for line in self.lines["stdout"] + self.lines["stderr"]:
            if line.startswith(prefix):
                return line
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiters.append((prefix, future))
        async with asyncio.timeout(5):
            return await future


Spawn = Callable[..., Child]


@pytest.fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Spawn]:
    """Spawn children with a fresh reaper; stop whatever still runs after the test."""
    reaper = Reaper()
    children: list[Child] = []

    def start(command: str, sink: Output | None = None) -> Child:
        child = Child.spawn(
            command, cwd=tmp_path, env=dict(os.environ), sink=sink or Output(), reaper=reaper
        )
        children.append(child)
        return child

    try:
        yield start
    finally:
        for child in children:
            if not child.exited:
                await child.stop(signal.SIGKILL, timeout=5.0)
        reaper.close()


def script(tmp_path: Path, name: str, text: str) -> str:
    """Write a Python script into ``tmp_path``; return the command that runs it."""
    (tmp_path / name).write_text(text)
    return f"{PYTHON} -u {name}"


async def gone(*pids: int) -> None:
    """Wait (2 s at most) until none of ``pids`` is alive; zombies count as gone."""
    await eventually(lambda: not any(map(pid_alive, pids)), timeout=2.0,
                     what=f"the end of {pids}")


async def find_sleepers(pid: int, count: int) -> list[psutil.Process]:
    """Wait until ``count`` ``sleep`` processes run below ``pid``; return them."""
    found: list[psutil.Process] = []

    def enough() -> bool:
        found[:] = [p for p in psutil.Process(pid).children(recursive=True)
                    if p.name() == "sleep"]
        return len(found) >= count

    await eventually(enough, timeout=5.0, what=f"{count} sleep processes")
    return found


async def test_stop_sends_sigterm_and_returns_the_exit_code(spawn: Spawn, tmp_path: Path) -> None:
    """Stopping a child that handles SIGTERM returns the exit code its handler chose."""
    output = Output()
    child = spawn("exec " + script(tmp_path, "app.py", WAIT_TERM), output)
    await output.line(b"ready")

    exit = await child.stop(signal.SIGTERM, timeout=5.0)

    assert exit == Exit(42)
    assert exit.signal is None
    assert child.exited
    assert not pid_alive(child.pid)


async def test_stop_gives_the_command_behind_the_shell_its_grace_period(
    spawn: Spawn, tmp_path: Path
) -> None:
    """The command run by the shell may finish its SIGTERM cleanup after the shell exits."""
    output = Output()
    child = spawn(script(tmp_path, "app.py", SLOW_CLEANUP) + "; echo after", output)
    app_pid = int((await output.line(b"ready")).split()[1])
    assert app_pid != child.pid  # /bin/sh stayed the parent: the case under test

    await child.stop(signal.SIGTERM, timeout=5.0)

    async with asyncio.timeout(5):
        await child.output_closed()
    assert b"cleaned up" in output.lines["stdout"]
    await gone(app_pid)


async def test_stop_sigkills_a_child_that_ignores_sigterm_after_the_timeout(
    spawn: Spawn, tmp_path: Path
) -> None:
    """A child that ignores SIGTERM gets SIGKILL once the timeout has passed."""
    output = Output()
    child = spawn("exec " + script(tmp_path, "app.py", IGNORE_TERM), output)
    await output.line(b"ready")

    started = time.monotonic()
    exit = await child.stop(signal.SIGTERM, timeout=0.5)
    took = time.monotonic() - started

    assert exit == Exit(-signal.SIGKILL)
    assert exit.signal == "SIGKILL"
    assert 0.5 <= took < 3.0


async def test_stop_sigkills_a_descendant_that_ignores_sigterm_after_the_timeout(
    spawn: Spawn, tmp_path: Path
) -> None:
    """A descendant that ignores SIGTERM after its shell died is SIGKILLed at the timeout."""
    output = Output()
    child = spawn(script(tmp_path, "app.py", IGNORE_TERM) + "; echo after", output)
    await output.line(b"ready")
    [app] = psutil.Process(child.pid).children()

    started = time.monotonic()
    await child.stop(signal.SIGTERM, timeout=0.5)
    took = time.monotonic() - started

    assert 0.5 <= took < 3.0
    await gone(app.pid)


@pytest.mark.parametrize(
    ("command", "code", "signal_name"),
    [
        ("exit 3", 3, None),
        ("exit 0", 0, None),
        ("kill -KILL $$", -9, "SIGKILL"),
        ("kill -TERM $$", -15, "SIGTERM"),
    ],
)
async def test_exit_is_reported_with_popen_conventions(
    spawn: Spawn, command: str, code: int, signal_name: str | None
) -> None:
    """An exit code is positive and a death by signal is minus the signal number."""
    child = spawn(command)

    async with asyncio.timeout(5):
        exit = await child.wait()

    assert exit == Exit(code)
    assert exit.signal == signal_name
    assert child.exited


async def test_exit_is_seen_at_once_while_a_grandchild_holds_the_pipes(spawn: Spawn) -> None:
    """The shell's exit is reported although a grandchild holds its pipes, which then dies."""
    output = Output()
    child = spawn("sleep 1000 & echo $!; exit 3", output)

    async with asyncio.timeout(5):
        exit = await child.wait()

    assert exit == Exit(3)
    sleeper = int(await output.line(b""))
    async with asyncio.timeout(5):
        await child.output_closed()  # EOF: the sleeper, the last writer, is gone
    await gone(sleeper)


async def test_stop_reaches_grandchildren_in_the_process_group(spawn: Spawn) -> None:
    """Stopping the shell also ends the commands it started in its process group."""
    child = spawn("sleep 1000 & sleep 1000")
    found = await find_sleepers(child.pid, 2)
    assert all(os.getpgid(p.pid) == child.pid for p in found)

    await child.stop(signal.SIGTERM, timeout=5.0)

    await gone(*(p.pid for p in found))


async def test_stop_reaches_descendants_that_left_the_process_group(spawn: Spawn) -> None:
    """Stopping also ends a descendant that moved to its own session with setsid."""
    child = spawn("sleep 1000 & setsid sleep 1001 & wait")
    found = await find_sleepers(child.pid, 2)
    groups = {os.getpgid(p.pid) for p in found}
    assert len(groups) == 2  # one of them did leave the group
    assert child.pid in groups

    await child.stop(signal.SIGTERM, timeout=5.0)

    await gone(*(p.pid for p in found))
    async with asyncio.timeout(5):
        await child.output_closed()  # no writer of the pipes is left


async def test_stop_after_the_child_exited_returns_its_exit(spawn: Spawn) -> None:
    """Stopping a child that has already exited just returns how it ended."""
    child = spawn("exit 4")
    async with asyncio.timeout(5):
        await child.wait()

    assert await child.stop(signal.SIGTERM, timeout=5.0) == Exit(4)


async def test_output_lines_arrive_in_order_per_stream(spawn: Spawn, tmp_path: Path) -> None:
    """Lines of stdout and of stderr each reach the sink in the order they were written."""
    output = Output()
    child = spawn(script(tmp_path, "talk.py", INTERLEAVED), output)

    async with asyncio.timeout(5):
        assert await child.wait() == Exit(0)
        await child.output_closed()

    assert output.lines["stdout"] == [f"out {i}".encode() for i in range(500)]
    assert output.lines["stderr"] == [f"err {i}".encode() for i in range(500)]


async def test_final_line_without_newline_is_delivered_at_end_of_file(spawn: Spawn) -> None:
    """A last line that has no newline reaches the sink once the pipe closes."""
    output = Output()
    child = spawn("printf 'one\\ntwo'; printf 'three' >&2", output)

    async with asyncio.timeout(5):
        await child.wait()
        await child.output_closed()

    assert output.lines == {"stdout": [b"one", b"two"], "stderr": [b"three"]}


async def test_overlong_line_arrives_in_pieces_that_join_back(
    spawn: Spawn, tmp_path: Path
) -> None:
    """A 1 MB line is cut into bounded pieces that join back to the original."""
    output = Output()
    child = spawn(script(tmp_path, "long.py", LONG_LINE), output)

    async with asyncio.timeout(10):
        await child.wait()
        await child.output_closed()

    *pieces, last = output.lines["stdout"]
    assert last == b"end"
    assert len(pieces) >= len(LONG_LINE_BYTES) // DEFAULT_MAX_LINE
    assert all(len(piece) <= DEFAULT_MAX_LINE for piece in pieces)
    assert b"".join(pieces) == LONG_LINE_BYTES


async def test_invalid_utf8_becomes_replacement_characters(spawn: Spawn) -> None:
    """Bytes that are not UTF-8 reach the sink as U+FFFD."""
    output = Output()
    child = spawn("printf 'a\\377b\\376\\n\\342\\202\\254\\n'", output)

    async with asyncio.timeout(5):
        await child.wait()
        await child.output_closed()

    assert output.lines["stdout"] == ["a\ufffdb\ufffd".encode(), "€".encode()]


@pytest.mark.parametrize("prefix", ["", "setsid "], ids=["same-group", "own-session"])
async def test_send_signal_reaches_a_grandchild(spawn: Spawn, tmp_path: Path, prefix: str) -> None:
    """A signal sent to the child reaches a grandchild, in its group or out of it."""
    output = Output()
    command = script(tmp_path, "usr1.py", WAIT_USR1)
    child = spawn(f"trap '' USR1; {prefix}{command} & wait $!", output)
    grandchild = int((await output.line(b"ready")).split()[1])
    assert grandchild in {p.pid for p in psutil.Process(child.pid).children(recursive=True)}

    child.send_signal(signal.SIGUSR1)

    async with asyncio.timeout(5):
        assert await child.wait() == Exit(5)  # the shell's `wait` saw the grandchild's code


@pytest.mark.parametrize("prefix", ["", "setsid "], ids=["same-group", "own-session"])
async def test_send_signal_delivers_once_to_each_descendant(
    spawn: Spawn, tmp_path: Path, prefix: str
) -> None:
    """A descendant in the group gets the signal once, not once per route that reaches it."""
    output = Output()
    command = script(tmp_path, "count.py", COUNT_RTMIN)
    rtmin = int(signal.SIGRTMIN)
    child = spawn(f"trap '' {rtmin} {rtmin + 1}; {prefix}{command} & wait $!", output)
    await output.line(b"ready")

    child.send_signal(signal.SIGRTMIN)
    child.send_signal(signal.SIGRTMIN + 1)

    assert await output.line(b"count") == b"count 1"


async def test_send_signal_leaves_no_descriptor_open(spawn: Spawn) -> None:
    """Signalling a child with descendants opens no file descriptor that stays open."""
    child = spawn("sleep 1000 & sleep 1000 & wait")
    await find_sleepers(child.pid, 2)
    before = len(os.listdir("/proc/self/fd"))

    child.send_signal(signal.SIGCONT)

    assert len(os.listdir("/proc/self/fd")) == before


async def test_stop_past_its_timeout_kills_every_descendant_and_frees_its_descriptors(
    spawn: Spawn, tmp_path: Path
) -> None:
    """A stop that needs SIGKILL for several descendants returns soon and spares the next child."""
    command = script(tmp_path, "app.py", IGNORE_TERM)
    output = Output()
    child = spawn(f"{command} & {command} & {command} & wait", output)
    await eventually(lambda: output.lines["stdout"].count(b"ready") == 3, timeout=5.0,
                     what="3 ready lines")
    apps = psutil.Process(child.pid).children()

    started = time.monotonic()
    await child.stop(signal.SIGTERM, timeout=0.2)
    assert time.monotonic() - started < 3.0
    follower_output = Output()
    follower = spawn("echo hello", follower_output)  # reuses the descriptor numbers just freed

    async with asyncio.timeout(5):
        await follower.wait()
        await follower.output_closed()
    assert follower_output.lines["stdout"] == [b"hello"]
    await gone(*(app.pid for app in apps))


async def test_spawn_in_a_missing_folder_raises_spawn_error(tmp_path: Path) -> None:
    """Spawning in a folder that does not exist raises SpawnError naming the folder."""
    reaper = Reaper()
    try:
        with pytest.raises(SpawnError, match="gone"):
            Child.spawn("true", cwd=tmp_path / "gone", env={}, sink=Output(), reaper=reaper)
    finally:
        reaper.close()


async def test_exit_reaped_by_the_orphan_reaper_still_reaches_its_child(tmp_path: Path) -> None:
    """An exit collected first by reap_orphans is delivered to its child, not counted as orphan."""
    reaper = Reaper()
    try:
        child = Child.spawn("exit 6", cwd=tmp_path, env={}, sink=Output(), reaper=reaper)
        # block until it is a zombie, without reaping it, so reap_orphans comes first
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # noqa: ASYNC222
        reaper.reap_orphans()

        assert child.exited
        assert reaper.orphans_reaped == 0
        async with asyncio.timeout(5):
            assert await child.wait() == Exit(6)
    finally:
        reaper.close()
