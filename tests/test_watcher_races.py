"""Regression tests of three races of the watcher, found in review (commit a6f9df8).

A. A stop that arrives in the very loop turn the child's own exit is delivered, on a
   process with a health check, used to wedge it in ``stopping``: the run task, waiting
   for its cancelled health task, swallowed its own cancellation and went on restarting.
B. A health restart decided for the old child used to stop whatever child ran when it
   got the lock, so after a user restart that got the lock first it killed the fresh one.
C. A health restart used to let the old run's descendants only 50 ms (the leftover
   grace) before SIGKILL, instead of their stop timeout as a stop or restart gives them.

Each test runs real processes on a real agent. The race is set up at the exact loop turn
it needs, through a private seam only where no public one exists (each says why), and
every wait is on an event or a condition with a deadline, never a sleep that hopes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from smartmob_agent.errors import Conflict
from smartmob_agent.events.bus import ExitEvent, ProcessEvent
from smartmob_agent.model import Options, Spec
from smartmob_agent.model import ProcessState as S
from smartmob_agent.supervision import run as run_module
from smartmob_agent.supervision.agent import Agent
from smartmob_agent.supervision.health import HealthMonitor
from smartmob_agent.supervision.watcher import Watcher
from tests.conftest import ArchiveServer
from tests.helpers import app_archive, eventually, pid_alive, record_states, wait_for_state

#: Deadline of every wait: far above what each step takes, so only a bug reaches it.
DEADLINE = 5.0

#: Exits 0 on SIGTERM; creates ``$TEST_DIR/ready-<pid>`` once its handler is set.
WAIT_TERM = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
open(os.path.join(os.environ["TEST_DIR"], "ready-%d" % os.getpid()), "w").close()
while True:
    time.sleep(60)
"""

#: Starts ``slow.py``, which stays in its process group, then exits 0 at once on SIGTERM.
PARENT = """
import signal, subprocess, sys
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
subprocess.Popen([sys.executable, "-u", "slow.py"])
while True:
    signal.pause()
"""

#: A grandchild that needs 0.4 s to exit after SIGTERM, and then creates
#: ``$TEST_DIR/clean-exit-<pid>``; ``$TEST_DIR/grandchild-<pid>`` appears (whole, by a
#: rename) once its handler is set.
SLOW = """
import os, signal, sys, time
folder = os.environ["TEST_DIR"]
def on_term(*_):
    time.sleep(0.4)
    open(os.path.join(folder, "clean-exit-%d" % os.getpid()), "w").close()
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
name = os.path.join(folder, "grandchild-%d" % os.getpid())
open(name + ".part", "w").close()
os.rename(name + ".part", name)
while True:
    time.sleep(60)
"""

Report = Callable[[str], None]


@pytest.fixture
def test_dir(tmp_path: Path) -> Path:
    """A folder the children write their marks in (``$TEST_DIR``), apart from the state."""
    folder = tmp_path / "marks"
    folder.mkdir()
    return folder


def intercept_unhealthy(
    monkeypatch: pytest.MonkeyPatch, around: Callable[[Report, str], None]
) -> None:
    """Make the health monitors of the watchers call ``around(report, reason)`` where
    they would call the watcher's ``report(reason)`` (its ``on_unhealthy``).

    The monitors stay real (real probes of real commands); only the moment they give up
    becomes visible. Each run gives the callback to :class:`HealthMonitor` and nothing
    public tells when it is called, so the monitor class the run module uses is
    replaced by a subclass that wraps it. This keeps to the monitor's documented
    interface, where calling the watcher's private restart directly would depend on its
    private signature (which the fix changed).
    """

    class InterceptedMonitor(HealthMonitor):
        def __init__(
            self, check: Any, probe: Any, on_change: Any, on_unhealthy: Report, **kwargs: Any
        ) -> None:
            super().__init__(
                check, probe, on_change, lambda reason: around(on_unhealthy, reason), **kwargs
            )

    monkeypatch.setattr(run_module, "HealthMonitor", InterceptedMonitor)


def record_spawns(watcher: Watcher) -> list[int]:
    """Return a list that fills with the pid of every child the watcher runs from now on."""
    pids: list[int] = []

    def listener(w: Watcher, old: S, new: S) -> None:
        if new is S.RUNNING and w.pid is not None:
            pids.append(w.pid)

    watcher.add_listener(listener)
    return pids


async def mark_of(folder: Path, prefix: str) -> int:
    """Wait for a file ``<prefix>-<pid>`` in ``folder``; return the pid."""
    found: list[Path] = []

    def appeared() -> bool:
        found[:] = [p for p in folder.glob(f"{prefix}-*") if not p.name.endswith(".part")]
        return bool(found)

    await eventually(appeared, timeout=DEADLINE, what=f"a {prefix}-<pid> file")
    assert len(found) == 1, found
    return int(found[0].name.rpartition("-")[2])


async def test_stop_in_the_turn_of_the_childs_own_exit_ends_stopped(
    agent: Agent,
    archive_server: ArchiveServer,
    test_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A stop requested in the very loop turn the child's own exit is delivered, while
    the run task waits for its cancelled health task, stops the process: the request
    succeeds, the process goes ``running -> stopping -> stopped`` and nothing after, no
    child is started again, the exit is recorded once (in ``exits`` and as one
    ``process:exit`` event), and the run task ends by its cancellation: nothing fails,
    nothing is logged as a warning or an error.

    Before the fix the run task swallowed its cancellation there and went on to restart,
    which raised InvalidTransition out of the stop and left the process in ``stopping``.
    """
    url = archive_server.add(
        "a.tgz", app_archive("web: exec {PYTHON} -u app.py\n", {"app.py": WAIT_TERM})
    )
    # a health check whose first probe is a minute away: its task just has to exist
    options = Options(health={"command": "true", "interval": 60})
    watcher = agent.create(
        Spec("races", "a", "web", url, env={"TEST_DIR": str(test_dir)}, options=options)
    )
    await wait_for_state(watcher, S.RUNNING, timeout=DEADLINE)
    pid = await mark_of(test_dir, "ready")
    assert watcher.info().pid == pid
    exit_events: list[ExitEvent] = []

    def on_event(event: ProcessEvent) -> None:
        if event["event"] == "process:exit" and event["slug"] == watcher.spec.slug:
            exit_events.append(event)

    agent.events.add_listener(on_event)
    states = record_states(watcher)
    spawns = record_spawns(watcher)
    loop = asyncio.get_running_loop()
    stop_requested: asyncio.Future[asyncio.Task[None]] = loop.create_future()

    def stop_now(_: object) -> None:
        stop_requested.set_result(loop.create_task(watcher.request_stop()))

    # Private seam: the race needs the stop request in the exact loop turn the exit is
    # delivered, and only a callback on the child's exit future runs then (it was
    # registered after the run task's own wait, so the run task resumes first).
    run = watcher._current
    assert run is not None
    child = run.child
    child._exit.add_done_callback(stop_now)
    os.kill(pid, signal.SIGTERM)  # it exits on its own account, not by the agent's doing

    async with asyncio.timeout(DEADLINE):
        stop = await stop_requested  # the child's exit was delivered
        await stop  # before the fix: InvalidTransition, or a stop that never ends

    assert watcher.state is S.STOPPED, watcher.error
    assert states == [S.STOPPING, S.STOPPED]
    assert spawns == []
    assert watcher.pid is None
    assert [record.exit.code for record in watcher.exits] == [0]
    assert [(event["pid"], event["code"]) for event in exit_events] == [(pid, 0)]
    assert [
        record.getMessage() for record in caplog.records
        if record.name.startswith("smartmob_agent") and record.levelno >= logging.WARNING
    ] == []


async def test_health_restart_of_the_old_child_spares_the_fresh_one(
    agent: Agent,
    archive_server: ArchiveServer,
    test_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A health restart decided for a child, which finds the lock taken by a user
    restart requested in the same loop turn, leaves alone the fresh child that restart
    started: it stays the running child, alive, and the only exit recorded is the old
    child's, for the user restart.

    Before the fix the health restart stopped whatever child ran once it got the lock,
    so it killed the fresh child for the old one's health.
    """
    url = archive_server.add(
        "b.tgz", app_archive("web: exec {PYTHON} -u app.py\n", {"app.py": WAIT_TERM})
    )
    # the first probe fails (and the monitor gives up at once); every later one passes
    health = 'test -e "$TEST_DIR/failed-once" || { touch "$TEST_DIR/failed-once"; exit 1; }'
    options = Options(health={"command": health, "interval": 0.1, "failures": 1})
    watcher: Watcher | None = None
    restarts: list[asyncio.Task[None]] = []
    health_restarts: list[asyncio.Task[Any]] = []
    gave_up = asyncio.Event()

    def around(report: Report, reason: str) -> None:
        assert watcher is not None
        if gave_up.is_set():  # only the first verdict races with a user restart
            report(reason)
            return
        # a user restart arrives in the same loop turn, just ahead: it gets the lock first
        restarts.append(asyncio.get_running_loop().create_task(watcher.request_restart()))
        before = asyncio.all_tasks()
        report(reason)
        # the task the watcher started to restart the old child, to know when it has
        # decided (no public event marks that it did nothing)
        health_restarts.extend(asyncio.all_tasks() - before)
        gave_up.set()

    intercept_unhealthy(monkeypatch, around)
    watcher = agent.create(
        Spec("races", "b", "web", url, env={"TEST_DIR": str(test_dir)}, options=options)
    )
    spawns = record_spawns(watcher)
    await wait_for_state(watcher, S.RUNNING, timeout=DEADLINE)

    async with asyncio.timeout(DEADLINE):
        await gave_up.wait()
        await restarts[0]
    assert len(health_restarts) == 1, health_restarts
    await wait_for_state(watcher, S.RUNNING, timeout=DEADLINE)
    async with asyncio.timeout(DEADLINE):
        await health_restarts[0]  # it has had the lock and done what it was going to do

    old, fresh = spawns[:2]
    killed = "the health restart judged for the old child killed the fresh one"
    assert pid_alive(fresh), killed
    assert watcher.pid == fresh, killed
    assert watcher.state is S.RUNNING
    assert spawns == [old, fresh]
    assert not pid_alive(old)
    assert [record.reason for record in watcher.exits] == ["restarted"]


async def test_health_restart_gives_the_old_descendants_their_stop_timeout(
    agent: Agent,
    archive_server: ArchiveServer,
    test_dir: Path,
) -> None:
    """A health restart stops the old run as a stop or a user restart does: a grandchild
    that needs 0.4 s to exit after SIGTERM gets that time and exits cleanly, although its
    parent (the child) exits at once; the process then runs a new child, started only
    once that grandchild is gone.

    Before the fix the run task saw the child's exit and, 50 ms later, SIGKILLed what
    still held its pipes: the grandchild, in the middle of its clean exit.
    """
    url = archive_server.add("c.tgz", app_archive(
        "web: exec {PYTHON} -u parent.py\n", {"parent.py": PARENT, "slow.py": SLOW}
    ))
    # passes until the test creates `make-unhealthy`; fails once then (taking it away)
    health = (
        '! test -e "$TEST_DIR/make-unhealthy" || { rm "$TEST_DIR/make-unhealthy"; exit 1; }'
    )
    options = Options(
        health={"command": health, "interval": 0.05, "failures": 1}, stop_timeout=DEADLINE
    )
    watcher = agent.create(
        Spec("races", "c", "web", url, env={"TEST_DIR": str(test_dir)}, options=options)
    )
    await wait_for_state(watcher, S.RUNNING, timeout=DEADLINE)
    old = watcher.pid
    grandchild = await mark_of(test_dir, "grandchild")  # its SIGTERM handler is set
    grandchild_alive_at_spawn: list[bool] = []

    def on_state(_: Watcher, previous: S, new: S) -> None:
        if new is S.RUNNING:
            grandchild_alive_at_spawn.append(pid_alive(grandchild))

    watcher.add_listener(on_state)

    (test_dir / "make-unhealthy").touch()
    # while the grandchild takes its time, the process is running with no child: a
    # control then is refused with a sentence that says why
    await eventually(lambda: watcher.state is S.RUNNING and watcher.pid is None,
                     timeout=DEADLINE, what="the old child's exit")
    with pytest.raises(Conflict, match="its child has just exited: the agent is handling"):
        await watcher.request_signal("HUP")
    await eventually(lambda: not pid_alive(grandchild), timeout=DEADLINE,
                     what=f"the exit of the old grandchild {grandchild}")

    assert (test_dir / f"clean-exit-{grandchild}").exists(), (
        f"the old grandchild {grandchild} was killed during its SIGTERM grace"
    )
    await eventually(lambda: bool(grandchild_alive_at_spawn), timeout=DEADLINE,
                     what="the new child")
    assert grandchild_alive_at_spawn == [False]
    assert watcher.pid not in (None, old)
    assert len(watcher.exits) == 1
    assert (watcher.exits[0].reason or "").startswith("unhealthy: health check failed once")
