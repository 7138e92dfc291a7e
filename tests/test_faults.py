"""Faults inside the agent: state database writes that fail, listeners that raise, a bug
in the state machine.

Real agents in process on real SQLite files, real children, real archives over HTTP. A
write of the state database is made to fail by wrapping the :class:`Store` method so that
it raises :class:`StoreError` on its n-th call (fault injection: the store is not what
is under test, the agent around it is). Children are counted in ``/proc``: every child
of a process carries the agent's id and the ``FAULT_SLUG`` of its request in its
environment.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from smartmob_agent.config import Settings
from smartmob_agent.errors import AgentError, Conflict, InvalidTransition
from smartmob_agent.model import RESTING_STATES, Spec, check_transition
from smartmob_agent.model import ProcessState as S
from smartmob_agent.processes.proctable import marked_processes
from smartmob_agent.schemas import create_request, spec_from_request
from smartmob_agent.store import Store, StoreError
from smartmob_agent.supervision.agent import AGENT_ID_VARIABLE, Agent
from smartmob_agent.supervision.provision import PROCESS_ID_VARIABLE
from smartmob_agent.supervision.watcher import Watcher
from smartmob_agent.web.server import make_app
from tests.conftest import ArchiveServer
from tests.helpers import app_archive, eventually, pid_alive, wait_for_state

#: Every method of :class:`Store` that writes.
WRITES = (
    "add", "remove", "set_desired", "set_child", "set_exits", "set_seq_reserved",
    "set_value", "add_key", "remove_key",
)
#: The real write methods, wrapped afresh by each :class:`Faults`.
ORIGINAL_WRITES: dict[str, Callable[..., None]] = {name: getattr(Store, name) for name in WRITES}
#: Says it is ready, then runs until SIGTERM.
APP = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("ready", os.getpid(), flush=True)
while True:
    time.sleep(60)
"""
#: The request of the process every scenario runs: a crash is a failed start, so that a
#: crash goes through ``backoff`` (and its write) before the next child.
REQUEST = {"start_seconds": 30, "backoff": {"initial": 0.05, "max": 0.05}}
DEADLINE = 20.0


class Faults:
    """Counts the writes of every :class:`Store` and makes the ``fail_at``-th one raise."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_at: int | None = None) -> None:
        self.count = 0
        self.fail_at = fail_at
        self.failed: str | None = None  # the method whose call failed
        for name, write in ORIGINAL_WRITES.items():
            monkeypatch.setattr(Store, name, self._wrap(name, write))

    def _wrap(self, name: str, write: Callable[..., None]) -> Callable[..., None]:
        def faulty(store: Store, *args: Any, **kwargs: Any) -> None:
            self.count += 1
            if self.count == self.fail_at:
                self.failed = name
                raise StoreError(
                    f"the state database {store.path} cannot be written: injected fault "
                    f"in {name}"
                )
            write(store, *args, **kwargs)

        return faulty


def children(agent: Agent) -> dict[str, list[int]]:
    """The live children of ``agent`` in ``/proc``, by the ``FAULT_SLUG`` of their request."""
    found: dict[str, list[int]] = defaultdict(list)
    for pid in marked_processes(f"{AGENT_ID_VARIABLE}={agent.id}".encode()):
        try:
            with open(f"/proc/{pid}/environ", "rb") as file:
                entries = file.read().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        if f"{AGENT_ID_VARIABLE}={agent.id}".encode() not in entries:
            continue  # exiting: its memory, environment included, is gone already
        slug = next((e[11:].decode() for e in entries if e.startswith(b"FAULT_SLUG=")), "")
        if pid_alive(pid):
            found[slug].append(pid)
    return found


@asynccontextmanager
async def watchdog(agent: Agent) -> AsyncIterator[list[str]]:
    """Sample the agent's children every 20 ms while the block runs; yield the list of
    the moments a slug had two (filled as they are seen)."""
    seen: list[str] = []

    async def sample() -> None:
        while True:
            for slug, pids in children(agent).items():
                if len(pids) > 1:
                    seen.append(f"{slug} had children {pids}")
            await asyncio.sleep(0.02)

    task = asyncio.get_running_loop().create_task(sample())
    try:
        yield seen
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def check(agent: Agent) -> None:
    """No slug has two live children, no child lives on without its watcher (a new
    process of its slug would make it two), and a process whose state says it has no
    child has none (else a start control would make it two)."""
    live = children(agent)
    known = {watcher.spec.slug for watcher in agent.watchers()}
    for slug, pids in live.items():
        assert len(pids) == 1, f"{slug} has children {pids}"
        assert slug in known, f"{slug} has a child {pids} but no watcher"
    for watcher in agent.watchers():
        if watcher.state in RESTING_STATES or watcher.state is S.BACKOFF:
            assert not live.get(watcher.spec.slug), (
                f"{watcher.spec.slug} is {watcher.state} with a child: {live}"
            )


async def tolerate(action: Awaitable[Any], raised: list[str]) -> bool:
    """Await ``action``; a :class:`StoreError` is noted in ``raised`` (the caller was
    told), then ``False``."""
    try:
        await action
    except StoreError as error:
        raised.append(str(error))
        return False
    return True


async def until_running(agent: Agent, watcher: Watcher, other_than: int | None = None) -> int:
    """Wait until the watcher runs a child (other than ``other_than``) that said it is
    ready (its output is numbered, which the state database keeps); return its pid.

    The children are checked all along (:func:`check`), so that a process that failed
    with its child alive fails the test at once, not at the deadline.
    """

    def running() -> bool:
        check(agent)
        return watcher.state is S.RUNNING and watcher.pid not in (None, other_than)

    await eventually(running, timeout=DEADLINE, what=f"{watcher.spec.slug} to run a new child")
    pid = watcher.pid
    assert pid is not None
    await eventually(lambda: f"ready {pid}".encode() in watcher.hub.recent,
                     timeout=DEADLINE, what=f"child {pid} to be ready")
    return pid


async def create(agent: Agent, spec: Spec, raised: list[str]) -> Watcher:
    """Create the process; if its row cannot be written, check it does not exist, then
    create it again (a fault fires once)."""
    try:
        return agent.create(spec)
    except StoreError as error:
        raised.append(str(error))
        assert spec.slug not in [w.spec.slug for w in agent.watchers()]
        check(agent)
        return agent.create(spec)


async def delete(agent: Agent, watcher: Watcher, raised: list[str]) -> None:
    """Delete the process; if its row cannot be removed, check it runs on as it was, then
    delete it again."""
    if not await tolerate(agent.delete(watcher.spec.slug), raised):
        check(agent)
        assert agent.get(watcher.spec.slug) is watcher
        assert watcher.state is S.RUNNING
        assert watcher.pid is not None
        assert "injected fault" in (watcher.error or "")
        check(agent)
        await agent.delete(watcher.spec.slug)
    assert not children(agent).get(watcher.spec.slug)


async def life(agent: Agent, url: str, raised: list[str]) -> None:
    """Create a process, stop, start and restart it, crash its child, delete it and
    create it again, checking the children after each step."""
    body = {"app": "shop", "node": "web.0", "process_type": "web", "source_url": url,
            "env": {"FAULT_SLUG": "shop.web.0"}, **REQUEST}
    spec = spec_from_request(create_request.validate(body))
    watcher = await create(agent, spec, raised)
    pid = await until_running(agent, watcher)
    check(agent)
    for action, state in (("stop", S.STOPPED), ("start", S.RUNNING), ("restart", S.RUNNING)):
        before = (watcher.state, watcher.pid)
        if not await tolerate(agent.control(watcher, action), raised):
            # not recorded, so not applied either (a new agent would undo it): try again
            check(agent)
            assert (watcher.state, watcher.pid) == before
            assert "injected fault" in (watcher.error or ""), raised
            await agent.control(watcher, action)
        if state is S.RUNNING:
            pid = await until_running(agent, watcher, other_than=pid)
        await wait_for_state(watcher, state, timeout=DEADLINE)
        check(agent)
    restarts = watcher.restarts
    os.kill(pid, signal.SIGKILL)  # a crash: restarted after a backoff
    await eventually(lambda: watcher.restarts > restarts, timeout=DEADLINE,
                     what="the crash to be counted")
    await until_running(agent, watcher, other_than=pid)
    check(agent)
    await delete(agent, watcher, raised)
    check(agent)
    again = await create(agent, spec, raised)
    await until_running(agent, again)
    check(agent)


async def lived(
    settings: Settings, url: str, caplog: pytest.LogCaptureFixture, faults: Faults
) -> None:
    """Run :func:`life` on a new agent, and check that it leaves no child behind and
    that the injected fault, if it fired, was said (to the caller, or in the log)."""
    agent = Agent(settings)
    raised: list[str] = []
    if not await tolerate(agent.start(), raised):  # nothing runs: nothing to check
        assert faults.failed is not None
        return
    try:
        async with watchdog(agent) as doubles:
            await life(agent, url, raised)
        assert doubles == []
    finally:
        await agent.close()
    assert children(agent) == {}
    if faults.failed is not None:
        logged = [r.getMessage() for r in caplog.records if "injected fault" in r.getMessage()]
        assert raised or logged, f"the failure of {faults.failed} was not said"


@pytest.mark.timeout(900)
async def test_no_failed_store_write_ever_leaves_a_slug_two_children(
    archive_server: ArchiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each write of the state database, in turn, fails across the life of a process
    (create, stop, start, restart, a crash and its restart, delete, create again): no slug
    ever has two live children (sampled in /proc all along), a process whose state says
    it has no child has none, every step still reaches its state, nothing is left
    running, and each failure is said to the caller or in the agent's log."""
    url = archive_server.add("app.tgz", app_archive("web: exec {PYTHON} -u app.py\n",
                                                    {"app.py": APP}))
    caplog.set_level(logging.WARNING)
    dry_run = Faults(monkeypatch)
    await lived(Settings(state_dir=tmp_path / "dry", stop_timeout=5.0), url, caplog, dry_run)
    writes = dry_run.count
    assert writes >= 8  # start, create, each child, each control, delete
    failed: set[str] = set()
    for fail_at in range(1, writes + 1):
        faults = Faults(monkeypatch, fail_at)
        caplog.clear()
        settings = Settings(state_dir=tmp_path / f"fail-{fail_at}", stop_timeout=5.0)
        await lived(settings, url, caplog, faults)
        if faults.failed is not None:
            failed.add(faults.failed)
    # every kind of write the life of a process makes was made to fail at least once
    assert failed >= {
        "add", "remove", "set_desired", "set_child", "set_exits", "set_seq_reserved",
        "set_value",
    }, failed


async def test_a_failed_write_of_the_child_leaves_it_running_and_says_so(
    agent: Agent, archive_server: ArchiveServer, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """When the pid of a new child cannot be written, the process stays ``running`` with
    that one child (a start is a conflict, not a second child), and the failure is in
    its ``error`` and in the agent's log."""
    def set_child(store: Store, *args: Any) -> None:
        raise StoreError(f"the state database {store.path} cannot be written: disk full")

    monkeypatch.setattr(Store, "set_child", set_child)
    url = archive_server.add("app.tgz", app_archive("web: exec {PYTHON} -u app.py\n",
                                                    {"app.py": APP}))
    body = {"app": "shop", "node": "web.0", "process_type": "web", "source_url": url,
            "env": {"FAULT_SLUG": "shop.web.0"}}
    with caplog.at_level(logging.ERROR, logger="smartmob_agent.agent"):
        watcher = agent.create(spec_from_request(create_request.validate(body)))
        pid = await until_running(agent, watcher)
        await eventually(lambda: children(agent).get("shop.web.0") == [pid], timeout=DEADLINE)
    assert watcher.state is S.RUNNING
    assert watcher.info().error == (
        f"the state database {agent.settings.state_dir / 'agent.db'} cannot be written: "
        "disk full (its current child is not recorded)"
    )
    assert any("disk full (its current child is not recorded)" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(Conflict):
        await agent.control(watcher, "start")
    assert children(agent) == {"shop.web.0": [pid]}


async def test_a_listener_that_raises_does_not_break_a_transition(
    agent: Agent, archive_server: ArchiveServer, caplog: pytest.LogCaptureFixture,
) -> None:
    """A listener's exception is logged with its traceback; the transition happens, the
    other listeners are told, and the process runs its one child."""
    url = archive_server.add("app.tgz", app_archive("web: exec {PYTHON} -u app.py\n",
                                                    {"app.py": APP}))
    watcher = agent.create(Spec("shop", "web.0", "web", url, env={"FAULT_SLUG": "shop.web.0"}))
    told: list[S] = []

    def broken(_: Watcher, old: S, new: S) -> None:
        raise RuntimeError(f"listener bug on {new}")

    watcher.add_listener(broken)
    watcher.add_listener(lambda _, old, new: told.append(new))
    with caplog.at_level(logging.ERROR, logger="smartmob_agent.watcher"):
        pid = await until_running(agent, watcher)
    assert told[-1] is S.RUNNING
    assert watcher.state is S.RUNNING
    assert watcher.error is None
    failures = [r for r in caplog.records if "a listener failed" in r.getMessage()]
    assert failures
    assert all(r.exc_info is not None for r in failures)
    assert str(failures[-1].exc_info[1]) == "listener bug on running"  # type: ignore[index]
    assert children(agent) == {"shop.web.0": [pid]}


async def test_an_illegal_transition_is_logged_with_its_traceback_and_leaves_no_child(
    agent: Agent, archive_server: ArchiveServer, caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug that makes the run task attempt an illegal transition (here, a listener that
    corrupts the state while a child is spawned) is logged with its traceback; the
    process is ``failed`` with an internal error and no child, and starts again cleanly."""
    url = archive_server.add("app.tgz", app_archive("web: exec {PYTHON} -u app.py\n",
                                                    {"app.py": APP}))
    watcher = agent.create(Spec("shop", "web.0", "web", url, env={"FAULT_SLUG": "shop.web.0"}))
    corrupted: list[bool] = []

    def corrupt(w: Watcher, old: S, new: S) -> None:
        if new is S.STARTING and not corrupted:
            corrupted.append(True)
            w.state = S.STOPPED  # the bug: the state says stopped, the loop spawns

    watcher.add_listener(corrupt)
    with caplog.at_level(logging.ERROR, logger="smartmob_agent.watcher"):
        await wait_for_state(watcher, S.FAILED, timeout=DEADLINE)
    bugs = [r for r in caplog.records
            if r.exc_info is not None and isinstance(r.exc_info[1], InvalidTransition)]
    assert len(bugs) == 1
    assert bugs[0].getMessage() == "shop.web.0: unexpected error"
    assert "Traceback" in caplog.text
    assert watcher.error == (
        "internal error of the agent: InvalidTransition: a process cannot go from stopped "
        "to running"
    )
    assert watcher.pid is None
    marker = f"{PROCESS_ID_VARIABLE}={watcher.process_id}".encode()
    assert [p for p in marked_processes(marker) if pid_alive(p)] == []
    await agent.control(watcher, "start")
    pid = await until_running(agent, watcher)
    assert children(agent) == {"shop.web.0": [pid]}


async def test_an_illegal_transition_in_a_request_is_a_500_with_a_traceback(
    agent: Agent, settings: Settings,
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """InvalidTransition is no AgentError: a request that meets one is answered 500 with a
    JSON error, and the traceback goes to the log."""
    app = make_app(settings, agent)

    async def buggy(request: web.Request) -> web.Response:
        check_transition(S.STOPPED, S.RUNNING)
        return web.json_response({})

    app.router.add_get("/buggy", buggy)  # a handler with the bug, in the real app
    client = await aiohttp_client(app)
    with caplog.at_level(logging.ERROR, logger="smartmob_agent.server"):
        response = await client.get("/buggy")
    assert response.status == 500
    assert await response.json() == {"error": "internal error of the agent; see its log"}
    assert not issubclass(InvalidTransition, AgentError)
    assert any(r.exc_info is not None and isinstance(r.exc_info[1], InvalidTransition)
               for r in caplog.records)
