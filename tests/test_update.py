"""Update in place and rollback, on a real agent with real children and archives.

Each app version is a tiny Python program that says its version and pid, and serves
``GET /`` on its ``PORT`` with its version (for the HTTP health gate). Waits are on the
``process:update`` events (through the agent's event bus) or on conditions with deadlines.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from yarl import URL

from smartmob_agent.events.bus import EventQueue, UpdateEvent
from smartmob_agent.model import ProcessState as S
from smartmob_agent.model import Spec
from smartmob_agent.schemas import create_request, spec_from_request
from smartmob_agent.supervision.agent import Agent
from smartmob_agent.supervision.watcher import Watcher
from tests.conftest import ArchiveServer
from tests.helpers import app_archive, eventually, pid_alive, wait_for_state

#: Serves its version on ``PORT`` (``VERSION`` is replaced), after ``DELAY`` seconds;
#: exits at once on SIGTERM.
SERVER = """
import http.server, os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
time.sleep(float(os.environ.get("DELAY", "0")))
print("VERSION", os.getpid(), flush=True)
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"VERSION"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler)
server.serve_forever()
"""
#: A version that cannot start.
CRASH = "import sys\nprint('broken', flush=True)\nsys.exit(3)\n"


def version(archives: ArchiveServer, name: str, script: str | None = None) -> str:
    """Serve an app whose ``web`` process runs ``script`` (the server saying ``name``)."""
    code = (script or SERVER).replace("VERSION", name)
    return archives.add(f"{name}.tar.gz", app_archive(
        "web: {PYTHON} -u app.py\n", {"app.py": code}))


def path(url: str) -> str:
    """The path of an absolute link (the test client takes paths)."""
    return URL(url).path


def make_spec(url: str, **options: Any) -> Spec:
    """The spec of ``shop.web.0`` from ``url``, with supervision ``options``."""
    return spec_from_request(create_request.validate({
        "app": "shop", "node": "web.0", "process_type": "web", "source_url": url,
        **options}))


@pytest.fixture
async def updates(agent: Agent) -> AsyncIterator[EventQueue]:
    """The agent's ``process:update`` events, from now on."""
    queue = agent.events.subscribe()
    yield queue
    queue.close()


async def outcome(queue: EventQueue, timeout: float = 15.0) -> UpdateEvent:
    """The next ``process:update`` event that ends an update."""
    async with asyncio.timeout(timeout):
        while True:
            event = await queue.get()
            if event["event"] == "process:update" and event["outcome"] != "started":
                return event


async def running(agent: Agent, url: str, **options: Any) -> Watcher:
    """Create ``shop.web.0`` from ``url`` and wait until it runs and said its version."""
    watcher = agent.create(make_spec(url, **options))
    await wait_for_state(watcher, S.RUNNING)
    await eventually(lambda: bool(watcher.hub.recent), what="its first line")
    return watcher


async def test_update_starts_the_new_version_then_stops_the_old_one(
    agent: Agent, archive_server: ArchiveServer, updates: EventQueue
) -> None:
    """An update runs the new version under the same slug, with a new pid and PORT, and
    the old child is gone; the status shows the sources, the event says it succeeded."""
    v1, v2 = version(archive_server, "v1"), version(archive_server, "v2")
    watcher = await running(agent, v1)
    old_pid, old_port = watcher.pid, watcher.port
    assert old_pid is not None
    agent.update(watcher, make_spec(v2))
    info = watcher.info()
    assert info.releases is not None
    assert info.releases.pending is not None
    assert info.releases.pending.url == v2
    event = await outcome(updates)
    assert (event["outcome"], event["error"], event["source_url"]) == ("succeeded", None, v2)
    assert watcher.state is S.RUNNING
    assert watcher.spec.source_url == v2
    assert watcher.pid not in (None, old_pid)
    assert watcher.port != old_port
    assert not pid_alive(old_pid)
    releases = watcher.info().releases
    assert releases is not None
    assert releases.pending is None
    assert releases.error is None
    assert releases.previous is not None
    assert releases.previous[0].source_url == v1
    assert watcher.exits[-1].reason == "updated"
    assert agent.ports.port_of("shop.web.0") == watcher.port


async def test_a_new_version_that_crashes_leaves_the_old_child_untouched(
    agent: Agent, archive_server: ArchiveServer, updates: EventQueue
) -> None:
    """The new child exits before its start_seconds: the old one runs on, same pid and
    source, and update_error and update_reason say why."""
    v1, bad = version(archive_server, "v1"), version(archive_server, "bad", CRASH)
    watcher = await running(agent, v1, start_seconds=0.5)
    old_pid = watcher.pid
    agent.update(watcher, make_spec(bad, start_seconds=0.5))
    event = await outcome(updates)
    assert event["outcome"] == "failed"
    assert "exited with code 3" in str(event["error"])
    assert (watcher.state, watcher.pid, watcher.spec.source_url) == (S.RUNNING, old_pid, v1)
    releases = watcher.releases
    assert releases.reason == "start failure"
    assert releases.pending is None
    assert releases.error is not None
    assert bad in releases.error
    assert not (watcher.workdir / "releases").exists() or not any(
        (watcher.workdir / "releases").iterdir())


async def test_a_new_version_that_never_turns_healthy_is_not_switched_to(
    agent: Agent, archive_server: ArchiveServer, updates: EventQueue
) -> None:
    """With a health check, the new child must pass a probe of its own PORT: one that
    never listens fails the update, and the old child serves on."""
    health = {"http": "/", "interval": 0.2, "timeout": 0.3, "failures": 2}
    v1 = version(archive_server, "v1")
    mute = version(archive_server, "mute", "import time\nprint('mute', flush=True)\n"
                   "time.sleep(600)\n")
    watcher = await running(agent, v1, start_seconds=0.1, health=health)
    old_pid = watcher.pid
    agent.update(watcher, make_spec(mute, start_seconds=0.1, health=health))
    event = await outcome(updates)
    assert event["outcome"] == "failed"
    assert watcher.releases.reason == "unhealthy"
    assert (watcher.pid, watcher.spec.source_url) == (old_pid, v1)


async def test_a_healthy_new_version_is_switched_to(
    agent: Agent, archive_server: ArchiveServer, updates: EventQueue
) -> None:
    """A new child that answers its health probe (after a moment) is switched to."""
    health = {"http": "/", "interval": 0.5, "timeout": 0.5, "failures": 4}
    v1, v2 = version(archive_server, "v1"), version(archive_server, "v2")
    watcher = await running(agent, v1, start_seconds=0.1, health=health)
    agent.update(watcher, make_spec(v2, start_seconds=0.1, health=health, env={"DELAY": "0.5"}))
    event = await outcome(updates)
    assert event["outcome"] == "succeeded", event
    assert watcher.spec.env["DELAY"] == "0.5"


async def test_rollback_brings_the_previous_version_back(
    agent: Agent, archive_server: ArchiveServer, updates: EventQueue
) -> None:
    """A rollback is an update to the previous version; twice, it goes back and forth."""
    v1, v2 = version(archive_server, "v1"), version(archive_server, "v2")
    watcher = await running(agent, v1)
    agent.update(watcher, make_spec(v2))
    assert (await outcome(updates))["outcome"] == "succeeded"
    agent.update(watcher)
    event = await outcome(updates)
    assert (event["outcome"], event["source_url"]) == ("rolled back", v1)
    assert watcher.spec.source_url == v1
    assert watcher.releases.previous is not None
    assert watcher.releases.previous[0].source_url == v2


async def test_a_stopped_process_gets_the_new_version_and_stays_stopped(
    agent: Agent, archive_server: ArchiveServer, updates: EventQueue
) -> None:
    """Without a live child there is nothing to keep serving: the new version is
    installed, and a stopped process stays stopped until started."""
    v1, v2 = version(archive_server, "v1"), version(archive_server, "v2")
    watcher = await running(agent, v1)
    await agent.control(watcher, "stop")
    agent.update(watcher, make_spec(v2))
    assert (await outcome(updates))["outcome"] == "succeeded"
    assert (watcher.state, watcher.spec.source_url) == (S.STOPPED, v2)
    await agent.control(watcher, "start")
    await wait_for_state(watcher, S.RUNNING)
    await eventually(lambda: any(line.startswith(b"v2 ") for line in watcher.hub.recent),
                     what="v2 to start")


async def test_deleting_during_an_update_leaves_no_child(
    agent: Agent, archive_server: ArchiveServer
) -> None:
    """A delete cancels the update in progress: neither child is left."""
    v1 = version(archive_server, "v1")
    slow = version(archive_server, "slow", "import time\nprint('slow', flush=True)\n"
                   "time.sleep(600)\n")
    watcher = await running(agent, v1)
    old_pid = watcher.pid
    assert old_pid is not None
    agent.update(watcher, make_spec(slow, start_seconds=30))
    await eventually(lambda: any(line.startswith(b"slow") for line in watcher.hub.recent),
                     what="the new child to start")
    new_pids = await _pids_saying(watcher, "slow")
    assert new_pids
    assert old_pid not in new_pids
    await agent.delete("shop.web.0")
    assert not pid_alive(old_pid)
    assert not any(pid_alive(pid) for pid in new_pids)


async def _pids_saying(watcher: Watcher, text: str) -> list[int]:
    """The pids of the children whose output lines start with ``text``."""
    return [entry.pid for entry in await watcher.output_log.read(100)
            if entry.pid is not None and entry.line.startswith(text)]


async def test_the_api_answers_202_and_shows_the_sources(
    agent: Agent, client: TestClient[Any, Any], archive_server: ArchiveServer,
    updates: EventQueue,
) -> None:
    """POST update answers 202 with the status document; rollback without a previous
    version is a 409; a bad option is named; the status document has the new fields."""
    v1, v2 = version(archive_server, "v1"), version(archive_server, "v2")
    await running(agent, v1)
    status = await (await client.get("/process-status/shop.web.0")).json()
    assert status["source"]["url"] == v1
    assert status["pending_source"] is None
    assert status["previous_source"] is None
    assert status["update_error"] is None
    answer = await client.post(path(status["rollback"]), json={})
    assert answer.status == 409
    assert "no previous version" in (await answer.json())["error"]
    answer = await client.post(path(status["update"]), json={"source_url": v2,
                                                       "options": {"restart": "sometimes"}})
    assert answer.status == 400
    assert "options.restart" in (await answer.json())["fields"]
    answer = await client.post(path(status["update"]), json={"source_url": v2})
    assert answer.status == 202
    document = await answer.json()
    assert document["pending_source"]["url"] == v2
    again = await client.post(path(status["update"]), json={"source_url": v2})
    assert again.status == 409
    await outcome(updates)
    status = await (await client.get(path(status["details"]))).json()
    assert status["source"]["url"] == v2
    assert status["previous_source"]["url"] == v1
    assert status["pending_source"] is None
