"""Stopping many processes scans the process table once, in a thread.

A stop finds a child's descendants, and the strays that carry its process id, in a scan
of ``/proc``. Each stop did two on the event loop, so the agent's shutdown with many
processes did two per process there, and answered nothing meanwhile. Now
:func:`~smartmob_agent.processes.proctable.scan` runs in a thread, once per
``stop_all`` (:func:`~smartmob_agent.processes.stop.one_scan`); a pid read from it is
checked against its start time before it is signalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from smartmob_agent.model import ProcessState as S
from smartmob_agent.processes import proctable
from smartmob_agent.processes.reaper import Reaper
from smartmob_agent.processes.spawn import Child
from smartmob_agent.processes.stop import one_scan, open_entries, scan_table
from smartmob_agent.supervision.agent import Agent
from tests.conftest import ArchiveServer
from tests.helpers import app_archive, eventually, pid_alive, wait_for_state

Client = TestClient[Any, Any]

#: A shell with two programs in its group; each program ends 0.3 s after SIGTERM.
SLOW_TERM = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: (time.sleep(0.3), sys.exit(0)))
while True:
    time.sleep(60)
"""
CROWD = 1500
PROCFILE = "web: {PYTHON} slow.py & {PYTHON} slow.py & wait\n"


async def _create_many(client: Client, agent: Agent, url: str, count: int) -> list[int]:
    """Create ``count`` processes of ``url`` at once; once all run, every pid of their
    trees."""
    index = await (await client.session.get(client.make_url("/"))).json()

    async def create(node: str) -> str:
        body = {"app": "many", "node": node, "process_type": "web", "source_url": url}
        response = await client.session.post(index["create"], data=json.dumps(body))
        assert response.status == 201, await response.text()
        slug: str = (await response.json())["slug"]
        return slug

    slugs = await asyncio.gather(*(create(f"web.{i}") for i in range(count)))
    shells = []
    for slug in slugs:
        await wait_for_state(agent.get(slug), S.RUNNING, timeout=30.0)
        pid = agent.get(slug).pid
        assert pid is not None
        shells.append(pid)
    trees: list[int] = []

    def started() -> bool:  # the shells start their two programs a moment after running
        table = proctable.scan()
        trees[:] = [p for s in shells for p in [s, *(e.pid for e in table.descendants(s))]]
        return len(trees) == 3 * count

    await eventually(started, timeout=30.0, what=f"the {3 * count} programs to start")
    return trees


@pytest.fixture
def scans(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every call of ``proctable.scan`` from now on, as the id of the thread it ran in."""
    calls: list[int] = []
    scan = proctable.scan

    def counted(proc: str = "/proc") -> proctable.Table:
        calls.append(threading.get_ident())
        return scan(proc)

    monkeypatch.setattr(proctable, "scan", counted)
    return calls


async def test_stopping_many_processes_scans_the_table_once_in_a_thread(
    client: Client, agent: Agent, archive_server: ArchiveServer, scans: list[int],
) -> None:
    """``stop_all`` of 6 processes of 3 processes each: one scan of ``/proc``, not on
    the event loop's thread, and every one of the 18 processes is gone."""
    url = archive_server.add("slow.tgz", app_archive(PROCFILE, {"slow.py": SLOW_TERM}))
    pids = await _create_many(client, agent, url, 6)
    assert len(pids) == 18
    scans.clear()

    await agent.stop_all()

    assert len(scans) == 1, scans
    assert scans[0] != threading.get_ident()
    assert [pid for pid in pids if pid_alive(pid)] == []


@pytest.fixture
def crowd() -> Iterator[None]:
    """300 more processes on the machine, as on a busy host: each scan of ``/proc``
    costs more."""
    sleepers = [subprocess.Popen(["sleep", "1005"]) for _ in range(CROWD)]
    try:
        yield
    finally:
        for sleeper in sleepers:
            sleeper.kill()
        for sleeper in sleepers:
            sleeper.wait()


@pytest.mark.timeout(120)
async def test_the_agent_answers_while_it_stops_many_processes(
    client: Client, agent: Agent, archive_server: ArchiveServer, crowd: None,
) -> None:
    """While ``stop_all`` stops 30 processes (90 programs, 0.3 s each to end) on a host
    with 300 more processes, ``GET /`` is answered again and again, each time within
    0.3 s: the scans do not hold the event loop."""
    url = archive_server.add("slow.tgz", app_archive(PROCFILE, {"slow.py": SLOW_TERM}))
    pids = await _create_many(client, agent, url, 30)
    stopping = asyncio.ensure_future(agent.stop_all())
    latencies = []
    while not stopping.done():
        started = time.monotonic()
        response = await client.session.get(client.make_url("/"))
        assert response.status == 200
        await response.read()
        latencies.append(time.monotonic() - started)
    await stopping
    assert [pid for pid in pids if pid_alive(pid)] == []
    assert len(latencies) >= 3
    assert max(latencies) < 0.4, sorted(latencies)[-5:]


def test_a_pid_reused_since_the_scan_is_not_opened() -> None:
    """A scan's entry whose start time is not the live process's (its pid was reused)
    gets no pidfd, so it is never signalled; the true one does."""
    sleeper = subprocess.Popen(["sleep", "1006"])
    try:
        entry = proctable.scan().entries[sleeper.pid]
        assert entry.parent == os.getpid()
        stale = proctable.Entry(entry.pid, entry.parent, entry.group, entry.started - 1,
                                entry.markers)
        assert open_entries([stale]) == {}
        fds = open_entries([entry])
        assert list(fds) == [sleeper.pid]
        os.close(fds[sleeper.pid])
    finally:
        sleeper.kill()
        sleeper.wait()
    assert open_entries([entry]) == {}  # gone (a zombie, then reaped)


async def test_a_stop_in_a_batch_older_than_its_child_reads_a_fresh_table(
    tmp_path: Path,
) -> None:
    """Within :func:`one_scan`, a child started after the batch's table was taken is
    not in it: its stop reads a fresh table, and so finds (and stops) a descendant that
    left its group."""
    reaper = Reaper()
    escaped: list[int] = []
    with one_scan():
        await scan_table()  # the batch's table, taken before the child starts
        child = Child.spawn("setsid sleep 1007 & wait", cwd=tmp_path, env=dict(os.environ),
                            sink=lambda stream, lines: None, reaper=reaper)
        try:
            def started() -> bool:
                escaped[:] = [e.pid for e in proctable.scan().descendants(child.pid)]
                return bool(escaped) and os.getpgid(escaped[0]) != child.pid

            await eventually(started, what="the sleep to leave the group")
            await child.stop(timeout=5.0)
            assert not pid_alive(escaped[0])
        finally:
            for pid in escaped:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            reaper.close()
