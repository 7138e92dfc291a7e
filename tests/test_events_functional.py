"""Process events end to end: the real agent, real children, the events WebSocket,
real webhook receivers, and health checks against real programs.

Every test follows the links of the index, waits on events (or on a condition, with a
deadline) and never sleeps hoping something has happened.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from smartmob_agent.config import Settings
from smartmob_agent.supervision.agent import Agent
from smartmob_agent.web.server import make_app
from tests.conftest import ArchiveServer
from tests.helpers import app_archive, eventually

Client = TestClient[Any, Any]
Event = dict[str, Any]

SECRET = "s"

#: Waits for SIGTERM (exits 0 on it), prints ready.
WAIT_TERM = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("ready", flush=True)
while True:
    time.sleep(60)
"""

#: Creates ``ok`` (what its health command tests), deletes it on SIGUSR1, exits 0 on SIGTERM.
OK_FILE = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
signal.signal(signal.SIGUSR1, lambda *_: os.remove("ok"))
open("ok", "w").close()
print("ready", flush=True)
while True:
    time.sleep(60)
"""

#: A quick backoff that does not grow: restarts keep one pace.
FAST_BACKOFF = {"initial": 0.05, "max": 0.05}

#: What every event carries.
COMMON_FIELDS = {"event", "slug", "app", "node", "process_type", "pid", "state", "reason", "at"}


# --- helpers ------------------------------------------------------------------------------


async def get_json(client: Client, url: str, status: int = 200) -> Any:
    response = await client.session.get(url)
    assert response.status == status, await response.text()
    return await response.json()


async def post_json(client: Client, url: str, body: Any = None, status: int = 200) -> Any:
    response = await client.session.post(url, data=json.dumps({} if body is None else body))
    assert response.status == status, await response.text()
    return await response.json()


async def index(client: Client) -> dict[str, str]:
    document: dict[str, str] = await get_json(client, str(client.make_url("/")))
    return document


async def create(client: Client, source_url: str, **fields: Any) -> dict[str, Any]:
    """Create a process (``myapp``/``web.0``/``web`` unless ``fields`` say otherwise)."""
    body = {"app": "myapp", "node": "web.0", "process_type": "web", "source_url": source_url}
    body.update(fields)
    links = await index(client)
    document: dict[str, Any] = await post_json(client, links["create"], body, status=201)
    return document


async def wait_ready(agent: Agent, slug: str, times: int = 1) -> None:
    """Wait until the process's children printed ``ready`` ``times`` times in all: the
    last one has its SIGTERM handler in place, so a stop ends it with code 0."""
    await eventually(
        lambda: list(agent.get(slug).hub.recent).count(b"ready") >= times,
        what=f"{slug} ready {times} time(s)",
    )


def brief(event: Event) -> str:
    """An event in a few characters: ``state:running->stopping``, ``exit@running``."""
    if event["event"] == "process:state":
        return f"state:{event['previous']}->{event['state']}"
    return f"{event['event'].removeprefix('process:')}@{event['state']}"


def parse_at(event: Event) -> float:
    """The ``at`` of an event as epoch seconds (it must be ISO 8601 UTC with ``Z``)."""
    text = event["at"]
    assert text.endswith("Z"), text
    return datetime.fromisoformat(text.removesuffix("Z") + "+00:00").timestamp()


class EventStream:
    """A client of the events WebSocket: reads one JSON event per frame, with deadlines."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        #: every event received so far, in order
        self.seen: list[Event] = []

    async def next(self, timeout: float = 10.0) -> Event:
        """The next event (a failure if none comes within ``timeout`` seconds)."""
        try:
            async with asyncio.timeout(timeout):
                message = await self.ws.receive()
        except TimeoutError:
            raise AssertionError(
                f"no event within {timeout} s; last ones: {[brief(e) for e in self.seen[-5:]]}"
            ) from None
        assert message.type == aiohttp.WSMsgType.TEXT, message
        event: Event = message.json()
        self.seen.append(event)
        return event

    async def until(self, predicate: Callable[[Event], bool], timeout: float = 10.0) -> list[Event]:
        """The events up to and including the first that matches ``predicate``."""
        deadline = asyncio.get_running_loop().time() + timeout
        events = []
        while True:
            event = await self.next(max(0.0, deadline - asyncio.get_running_loop().time()))
            events.append(event)
            if predicate(event):
                return events

    async def take(self, count: int, timeout: float = 10.0) -> list[Event]:
        """The next ``count`` events."""
        deadline = asyncio.get_running_loop().time() + timeout
        return [
            await self.next(max(0.0, deadline - asyncio.get_running_loop().time()))
            for _ in range(count)
        ]

    async def nothing_within(self, seconds: float) -> None:
        """Prove that no event arrives for ``seconds`` (a short, bounded check)."""
        try:
            async with asyncio.timeout(seconds):
                message = await self.ws.receive()
        except TimeoutError:
            return
        raise AssertionError(f"unexpected frame {message!r}")


async def connect_events(client: Client, **filters: str) -> EventStream:
    """Connect to the index's ``events`` link, with ``app``/``slug`` filters if given."""
    links = await index(client)
    assert links["events"].startswith("ws://")
    ws = await client.session.ws_connect(links["events"], params=filters)
    return EventStream(ws)


def is_(kind: str, slug: str | None = None, state: str | None = None) -> Callable[[Event], bool]:
    """A predicate on events: this kind (``online``, ``exit``...), slug and state."""
    def match(event: Event) -> bool:
        return (
            event["event"] == f"process:{kind}"
            and (slug is None or event["slug"] == slug)
            and (state is None or event["state"] == state)
        )
    return match


def check_fields(events: Iterable[Event], slug: str, app: str = "myapp") -> None:
    """Every event names the process fully and carries the fields its kind has."""
    node = slug.removeprefix(f"{app}.")
    for event in events:
        assert event.keys() >= COMMON_FIELDS, event
        assert (event["slug"], event["app"], event["node"], event["process_type"]) == (
            slug, app, node, "web"
        ), event
        parse_at(event)
        if event["event"] == "process:state":
            assert isinstance(event["previous"], str), event
        if event["event"] == "process:exit":
            assert {"code", "signal", "ran_for"} <= event.keys(), event
            assert isinstance(event["pid"], int), event
        if event["event"] == "process:exception":
            assert isinstance(event["error"], str), event


async def status_field(
    client: Client, process: dict[str, Any], name: str, test: Callable[[Any], bool]
) -> bool:
    """Whether ``test`` holds of the field ``name`` of the process's status now."""
    return test((await get_json(client, process["details"]))[name])


async def healthy_is(client: Client, process: dict[str, Any], value: bool) -> bool:
    """Whether the status of ``process`` says ``healthy`` is ``value`` now."""
    return await status_field(client, process, "healthy", lambda v: v is value)


async def listening(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:``port`` now."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


async def until_true(
    check: Callable[[], Awaitable[bool]], *, timeout: float = 10.0, what: str = "condition"
) -> None:
    """Wait for an async ``check()`` to hold, asking every 10 ms; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        await asyncio.sleep(0.01)


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def web_app(archive_server: ArchiveServer) -> str:
    """URL of an app whose ``web`` process prints ready and exits 0 on SIGTERM."""
    return archive_server.add(
        "app.tgz", app_archive("web: exec {PYTHON} -u app.py\n", {"app.py": WAIT_TERM})
    )


@pytest.fixture
def http_app(archive_server: ArchiveServer) -> str:
    """URL of an app whose ``web`` process serves its folder over HTTP on ``$PORT``."""
    return archive_server.add("http.tgz", app_archive(
        "web: exec {PYTHON} -m http.server $PORT --bind 127.0.0.1\n"))


@pytest.fixture
def ok_app(archive_server: ArchiveServer) -> str:
    """URL of an app that keeps a file ``ok`` until SIGUSR1 and exits 0 on SIGTERM."""
    return archive_server.add(
        "ok.tgz", app_archive("web: exec {PYTHON} -u app.py\n", {"app.py": OK_FILE})
    )


@pytest.fixture
def crash_app(archive_server: ArchiveServer) -> str:
    """URL of an app whose ``web`` process exits with code 3 as soon as it starts."""
    return archive_server.add("crash.tgz", app_archive("web: exit 3\n"))


@dataclass
class Hit:
    """One request a receiver got."""

    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def event(self) -> Event:
        event: Event = json.loads(self.body)
        return event


@dataclass
class Receiver:
    """A webhook endpoint on 127.0.0.1: ``/hang`` never answers, every other path 204."""

    server: TestServer
    hits: list[Hit] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    def at(self, path: str) -> list[Hit]:
        """The requests received at ``path``, in order."""
        return [hit for hit in self.hits if hit.path == path]

    async def wait_until(
        self, path: str, predicate: Callable[[list[Hit]], bool], timeout: float = 10.0
    ) -> list[Hit]:
        """Wait until the requests at ``path`` satisfy ``predicate``; return them."""
        try:
            async with asyncio.timeout(timeout), self.changed:
                await self.changed.wait_for(lambda: predicate(self.at(path)))
        except TimeoutError:
            got = [brief(hit.event) for hit in self.at(path)]
            raise AssertionError(f"{path} did not get what was awaited; it got {got}") from None
        return self.at(path)


@pytest.fixture
async def receiver(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> AsyncIterator[Receiver]:
    """A running webhook receiver; its hanging requests are let go at the end."""
    state: dict[str, Receiver] = {}

    async def receive(request: web.Request) -> web.Response:
        served = state["receiver"]
        hit = Hit(request.path, dict(request.headers), await request.read())
        async with served.changed:
            served.hits.append(hit)
            served.changed.notify_all()
        if request.path.startswith("/hang"):
            await served.release.wait()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/{name:.+}", receive)
    state["receiver"] = Receiver(await aiohttp_server(app, host="127.0.0.1"))
    yield state["receiver"]
    state["receiver"].release.set()


@pytest.fixture
def dead_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (a port bound, then let go)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/dead"


AgentFactory = Callable[..., Awaitable[tuple[Agent, Client]]]


@pytest.fixture
async def make_agent(
    tmp_path: Path, aiohttp_client: Callable[..., Awaitable[Client]]
) -> AsyncIterator[AgentFactory]:
    """Start an agent with settings of the test's choosing (webhooks); return it and a
    client of its web app. Each is closed (every child stopped) after the test."""
    agents: list[Agent] = []

    async def make(**overrides: Any) -> tuple[Agent, Client]:
        settings = Settings(
            host="127.0.0.1", port=0, state_dir=tmp_path / f"state{len(agents)}",
            stop_timeout=5.0, download_stall=2.0, **overrides,
        )
        agent = Agent(settings)
        await agent.start()
        agents.append(agent)
        return agent, await aiohttp_client(make_app(settings, agent))

    yield make
    for agent in agents:
        if not agent.events.closed:  # a test may have closed it already
            await agent.close()


# --- lifecycle sequences on the events socket --------------------------------------------


async def test_start_sequence_from_create_to_online(client: Client, web_app: str) -> None:
    """A client connected before the create sees the create (in state pending), then
    downloading, unpacking, starting, running, then online: each state event names the
    state it left, the running one and the online one carry the child's pid, and the
    status without a health check says healthy null (with a port given to the process)."""
    events = await connect_events(client)
    process = await create(client, web_app)
    assert process["state"] == "pending"
    seen = await events.until(is_("online"))
    assert [brief(e) for e in seen] == [
        "create@pending",
        "state:pending->downloading", "state:downloading->unpacking",
        "state:unpacking->starting", "state:starting->running", "online@running",
    ]
    check_fields(seen, "myapp.web.0")
    status = await get_json(client, process["details"])
    assert [e["pid"] for e in seen] == [None, None, None, None, status["pid"], status["pid"]]
    times = [parse_at(e) for e in seen]
    assert times == sorted(times)
    assert status["healthy"] is None
    assert isinstance(status["port"], int)
    await events.ws.close()


async def test_every_crash_is_exit_backoff_starting_running_online(
    client: Client, crash_app: str
) -> None:
    """A process that exits with code 3 at once, crash after crash: each time the socket
    shows process:exit (the pid of the child that ended, its code, no signal, how long it
    ran, the state still running), then backoff, starting, running and online with a new
    pid."""
    events = await connect_events(client, slug="myapp.web.0")
    await create(client, crash_app, backoff=FAST_BACKOFF)
    first = await events.until(is_("online"))
    pid = first[-1]["pid"]
    pids = {pid}
    for _ in range(4):
        cycle = await events.take(5)
        assert [brief(e) for e in cycle] == [
            "exit@running", "state:running->backoff", "state:backoff->starting",
            "state:starting->running", "online@running",
        ]
        check_fields(cycle, "myapp.web.0")
        exit = cycle[0]
        assert exit["pid"] == pid
        assert (exit["code"], exit["signal"]) == (3, None)
        assert 0 <= exit["ran_for"] < 1
        assert [e["pid"] for e in cycle[1:3]] == [None, None]
        pid = cycle[3]["pid"]
        assert isinstance(pid, int)
        assert cycle[4]["pid"] == pid
        assert pid not in pids
        pids.add(pid)
    await events.ws.close()


async def test_death_by_a_signal_names_the_signal(
    client: Client, archive_server: ArchiveServer
) -> None:
    """A child killed by SIGKILL ends in a process:exit with code -9 and signal SIGKILL."""
    url = archive_server.add("kill.tgz", app_archive("web: kill -KILL $$\n"))
    events = await connect_events(client)
    await create(client, url, backoff=FAST_BACKOFF)
    await events.until(is_("online"))
    exit = (await events.take(1))[0]
    assert brief(exit) == "exit@running"
    assert (exit["code"], exit["signal"]) == (-9, "SIGKILL")
    await events.ws.close()


async def test_stop_start_restart_and_delete_sequences(
    client: Client, agent: Agent, web_app: str
) -> None:
    """The controls, each as the socket tells it: stop is stopping, the exit of the child
    (pid, code 0 on SIGTERM), stopped; start is starting, running, online; restart is a
    stop then a start; delete is stopping, exit, stopped, the delete (no pid), and nothing
    after."""
    events = await connect_events(client)
    process = await create(client, web_app)
    pid = (await events.until(is_("online")))[-1]["pid"]
    await wait_ready(agent, "myapp.web.0", 1)

    await post_json(client, process["stop"])  # answers once the child is gone
    stop = await events.take(3)
    assert [brief(e) for e in stop] == ["state:running->stopping", "exit@stopping",
                                        "state:stopping->stopped"]
    assert [e["pid"] for e in stop] == [pid, pid, None]
    assert (stop[1]["code"], stop[1]["signal"]) == (0, None)
    assert stop[1]["ran_for"] >= 0

    await post_json(client, process["start"])
    start = await events.until(is_("online"))
    assert [brief(e) for e in start] == ["state:stopped->starting", "state:starting->running",
                                         "online@running"]
    pid = start[-1]["pid"]
    await wait_ready(agent, "myapp.web.0", 2)

    await post_json(client, process["restart"])
    restart = await events.until(is_("online"))
    assert [brief(e) for e in restart] == [
        "state:running->stopping", "exit@stopping", "state:stopping->stopped",
        "state:stopped->starting", "state:starting->running", "online@running",
    ]
    assert restart[1]["pid"] == pid
    assert restart[-1]["pid"] not in (pid, None)
    assert (restart[1]["code"], restart[1]["signal"]) == (0, None)
    pid = restart[-1]["pid"]
    await wait_ready(agent, "myapp.web.0", 3)

    await post_json(client, process["delete"])
    delete = await events.take(4)
    assert [brief(e) for e in delete] == ["state:running->stopping", "exit@stopping",
                                          "state:stopping->stopped", "delete@stopped"]
    assert delete[1]["pid"] == pid
    assert delete[3]["pid"] is None
    assert (delete[1]["code"], delete[1]["signal"]) == (0, None)
    check_fields(events.seen, "myapp.web.0")
    await events.nothing_within(0.2)
    await events.ws.close()


async def test_stop_during_backoff_has_no_exit_event(client: Client, crash_app: str) -> None:
    """A stop that finds the process waiting in backoff has no child to end: stopping
    then stopped, with no process:exit between them."""
    events = await connect_events(client)
    process = await create(client, crash_app, backoff={"initial": 30, "max": 30})
    await events.until(is_("state", state="backoff"))
    await post_json(client, process["stop"])
    stop = await events.take(2)
    assert [brief(e) for e in stop] == ["state:backoff->stopping", "state:stopping->stopped"]
    await events.nothing_within(0.1)
    await events.ws.close()


async def test_a_404_source_ends_in_an_exception_event(
    client: Client, archive_server: ArchiveServer
) -> None:
    """A source that answers 404: downloading, failed, then process:exception whose error
    is the one the status shows, naming the 404."""
    events = await connect_events(client)
    process = await create(client, archive_server.url("missing.tgz"))
    seen = await events.until(is_("exception"))
    assert [brief(e) for e in seen] == [
        "create@pending", "state:pending->downloading", "state:downloading->failed",
        "exception@failed",
    ]
    check_fields(seen, "myapp.web.0")
    status = await get_json(client, process["details"])
    assert status["state"] == "failed"
    assert "404" in seen[-1]["error"]
    assert seen[-1]["error"] == status["error"]
    assert seen[-1]["pid"] is None
    await events.nothing_within(0.1)
    await events.ws.close()


async def test_filters_by_app_and_by_slug(client: Client, web_app: str) -> None:
    """With three processes of two apps, ?app= gets exactly its app's events and ?slug=
    exactly its process's, in the order an unfiltered client sees them; none of the other
    app's events slips in later either."""
    everything = await connect_events(client)
    by_app = await connect_events(client, app="one")
    by_slug = await connect_events(client, slug="one.web.1")
    made = {}
    for app, node in (("one", "web.0"), ("two", "web.0"), ("one", "web.1")):
        made[f"{app}.{node}"] = await create(client, web_app, app=app, node=node)
    online: set[str] = set()

    def all_online(event: Event) -> bool:
        if event["event"] == "process:online":
            online.add(event["slug"])
        return len(online) == 3

    seen = await everything.until(all_online)
    of_app = [e for e in seen if e["app"] == "one"]
    of_slug = [e for e in seen if e["slug"] == "one.web.1"]
    assert len(of_app) == 12
    assert len(of_slug) == 6
    assert await by_app.take(len(of_app)) == of_app
    assert await by_slug.take(len(of_slug)) == of_slug

    # events of the other app, then of the filtered process: the first thing each
    # filtered client gets next is the latter
    await post_json(client, made["two.web.0"]["stop"])
    await post_json(client, made["one.web.1"]["stop"])
    for stream in (by_app, by_slug):
        nxt = await stream.next()
        assert (nxt["slug"], brief(nxt)) == ("one.web.1", "state:running->stopping")
    for stream in (everything, by_app, by_slug):
        await stream.ws.close()


async def shut_down_with_a_client(
    make_agent: AgentFactory, web_app: str
) -> tuple[EventStream, aiohttp.WSMessage]:
    """Run a process, close the agent while a client is connected; return the client and
    the first frame after the last three events (checked: stopping, exit, stopped)."""
    agent, client = await make_agent()
    events = await connect_events(client)
    await create(client, web_app)
    await events.until(is_("online"))
    await wait_ready(agent, "myapp.web.0")
    await agent.close()
    last = await events.take(3)
    assert [brief(e) for e in last] == ["state:running->stopping", "exit@stopping",
                                        "state:stopping->stopped"]
    async with asyncio.timeout(10):
        return events, await events.ws.receive()


async def test_shutdown_tells_the_last_exits_then_closes_with_1001(
    make_agent: AgentFactory, web_app: str
) -> None:
    """Closing the agent stops every process: a connected client gets stopping, the exit
    and stopped of each, then a close frame with 1001 (going away)."""
    _, message = await shut_down_with_a_client(make_agent, web_app)
    assert message.type == aiohttp.WSMsgType.CLOSE, message
    assert message.data == aiohttp.WSCloseCode.GOING_AWAY


async def test_shutdown_completes_the_closing_handshake(
    make_agent: AgentFactory, web_app: str
) -> None:
    """A client busy when the agent shuts down still completes the closing handshake
    when it reads the close frame: its close code is 1001 and it saw no error."""
    events, message = await shut_down_with_a_client(make_agent, web_app)
    assert message.type == aiohttp.WSMsgType.CLOSE, message
    assert events.ws.exception() is None, events.ws.exception()
    assert events.ws.close_code == aiohttp.WSCloseCode.GOING_AWAY


# --- webhooks -----------------------------------------------------------------------------


def check_signed(hit: Hit) -> None:
    """The request is a signed JSON event: the HMAC-SHA256 of the exact body under the
    secret, its kind in X-Smartmob-Event, a delivery id."""
    expected = hmac.new(SECRET.encode(), hit.body, hashlib.sha256).hexdigest()
    assert hit.headers["X-Smartmob-Signature"] == f"sha256={expected}"
    assert hit.headers["Content-Type"] == "application/json"
    assert hit.headers["X-Smartmob-Event"] == hit.event["event"]
    assert hit.headers["X-Smartmob-Delivery"]


def has(kind: str, slug: str, state: str | None = None) -> Callable[[list[Hit]], bool]:
    """A predicate on a receiver's hits: one of them is this event."""
    match = is_(kind, slug, state)
    return lambda hits: any(match(hit.event) for hit in hits)


async def test_webhooks_global_signed_and_notify_unsigned_in_order(
    receiver: Receiver, make_agent: AgentFactory, archive_server: ArchiveServer, web_app: str
) -> None:
    """With --webhook and a secret, every event of every process reaches the global URL
    as a signed JSON POST; a process's ``notify`` URL gets that process's events, the same
    bytes with the same delivery ids, in the order of the events socket, through its
    delete, unsigned (whoever chose that URL could replay signed bodies to the global
    one); a process whose notify repeats the global URL gets each event there once."""
    agent, client = await make_agent(webhook=(receiver.url("/global"),), webhook_secret=SECRET)
    events = await connect_events(client)
    one = await create(client, web_app, notify=[receiver.url("/notify")])
    await create(client, web_app, app="other", notify=[receiver.url("/global")])
    online: set[str] = set()

    def both_online(event: Event) -> bool:
        if event["event"] == "process:online":
            online.add(event["slug"])
        return len(online) == 2

    await events.until(both_online)
    await post_json(client, one["delete"])
    await events.until(is_("state", "myapp.web.0", "stopped"))

    notified = await receiver.wait_until("/notify", has("state", "myapp.web.0", "stopped"))
    hits = await receiver.wait_until(
        "/global",
        lambda hits: has("state", "myapp.web.0", "stopped")(hits)
        and has("online", "other.web.0")(hits),
    )
    for hit in hits:
        check_signed(hit)
    assert not any("X-Smartmob-Signature" in hit.headers for hit in notified)

    mine = [e for e in events.seen if e["slug"] == "myapp.web.0"]
    theirs = [e for e in events.seen if e["slug"] == "other.web.0"]
    assert [hit.event for hit in notified] == mine
    assert [hit.event for hit in hits if hit.event["slug"] == "myapp.web.0"] == mine
    # the notify URL got exactly what the global one got of that process, byte for byte
    global_mine = [hit for hit in hits if hit.event["slug"] == "myapp.web.0"]
    assert [(h.body, h.headers["X-Smartmob-Delivery"]) for h in notified] == [
        (h.body, h.headers["X-Smartmob-Delivery"]) for h in global_mine
    ]
    # the other process's events: at the global URL once each, never at /notify
    global_theirs = [hit for hit in hits if hit.event["slug"] == "other.web.0"]
    assert [hit.event for hit in global_theirs] == theirs
    deliveries = [hit.headers["X-Smartmob-Delivery"] for hit in hits]
    assert len(deliveries) == len(set(deliveries))
    assert stats_ok(agent)
    await events.ws.close()


def stats_ok(agent: Agent) -> bool:
    """No webhook URL of the agent failed or dropped an event."""
    assert agent.webhooks is not None
    return all(s["failed"] == 0 and s["dropped"] == 0 for s in agent.webhooks.stats().values())


async def test_notify_without_a_global_webhook_is_unsigned(
    receiver: Receiver, client: Client, web_app: str
) -> None:
    """Without --webhook nor a secret, a process's ``notify`` URL still receives its
    events, without a signature header."""
    await create(client, web_app, notify=[receiver.url("/notify")])
    hits = await receiver.wait_until("/notify", has("online", "myapp.web.0"))
    assert [brief(hit.event) for hit in hits] == [
        "create@pending", "state:pending->downloading", "state:downloading->unpacking",
        "state:unpacking->starting", "state:starting->running", "online@running",
    ]
    assert all("X-Smartmob-Signature" not in hit.headers for hit in hits)


async def test_create_and_delete_are_told_to_the_socket_and_the_webhooks(
    receiver: Receiver, make_agent: AgentFactory, web_app: str
) -> None:
    """A create is told first (``process:create``, in the state it was created in: here
    ``stopped``, with ``autostart: false``), a delete last (``process:delete`` after the
    stop's events), each with the fields of every event and no pid, on the events socket,
    at the global webhook and at the process's ``notify`` URL (which still gets the
    delete); a create that is refused (a conflict) tells nothing."""
    _, client = await make_agent(webhook=(receiver.url("/global"),))
    events = await connect_events(client)
    quiet = await create(client, web_app, node="quiet.0", autostart=False,
                         notify=[receiver.url("/notify")])
    created = await events.next()
    assert (brief(created), created["slug"], created["pid"]) == (
        "create@stopped", "myapp.quiet.0", None)
    assert created.keys() == COMMON_FIELDS
    busy = await create(client, web_app)
    assert brief(await events.next()) == "create@pending"
    await events.until(is_("online", "myapp.web.0"))
    await post_json(client, (await index(client))["create"], {
        "app": "myapp", "node": "web.0", "process_type": "web", "source_url": web_app,
    }, status=409)
    await post_json(client, quiet["delete"])
    deleted = await events.next()
    assert (brief(deleted), deleted["slug"], deleted["pid"]) == (
        "delete@stopped", "myapp.quiet.0", None)
    assert deleted.keys() == COMMON_FIELDS
    await post_json(client, busy["delete"])
    last = await events.until(is_("delete"))
    assert [brief(e) for e in last] == [
        "state:running->stopping", "exit@stopping", "state:stopping->stopped", "delete@stopped"]
    check_fields([created, deleted], "myapp.quiet.0")
    await events.nothing_within(0.2)
    notified = await receiver.wait_until("/notify", has("delete", "myapp.quiet.0"))
    assert [hit.event for hit in notified] == [created, deleted]
    assert [hit.headers["X-Smartmob-Event"] for hit in notified] == [
        "process:create", "process:delete"]
    everything = await receiver.wait_until("/global", has("delete", "myapp.web.0"))
    told = [(hit.event["event"], hit.event["slug"]) for hit in everything
            if hit.event["event"] in ("process:create", "process:delete")]
    assert told == [("process:create", "myapp.quiet.0"), ("process:create", "myapp.web.0"),
                    ("process:delete", "myapp.quiet.0"), ("process:delete", "myapp.web.0")]
    await events.ws.close()


async def test_dead_webhooks_slow_neither_supervision_nor_the_api(
    receiver: Receiver, make_agent: AgentFactory, crash_app: str, dead_url: str
) -> None:
    """A global webhook where nothing listens and a notify URL that never answers: the
    crash loop keeps its pace (restarts about every 50 ms) and GET / answers at once,
    while both URLs have events waiting that are not delivered."""
    agent, client = await make_agent(webhook=(dead_url,), webhook_secret=SECRET)
    hang = receiver.url("/hang")
    events = await connect_events(client, slug="myapp.web.0")
    await create(client, crash_app, backoff=FAST_BACKOFF, notify=[hang])
    await events.until(is_("online"))
    onlines: list[float] = []
    latencies: list[float] = []
    began = time.monotonic()
    for _ in range(10):
        cycle = await events.until(is_("online"))
        onlines.append(parse_at(cycle[-1]))
        started = time.monotonic()
        await index(client)
        latencies.append(time.monotonic() - started)
    elapsed = time.monotonic() - began
    gaps = [b - a for a, b in itertools.pairwise(onlines)]
    # a delivery that held supervision up would cost 10 s (the hang) or 0.5 s and more
    # (the dead port's retries) per event
    assert max(gaps) < 1.0, gaps
    assert elapsed < 5.0, elapsed
    assert max(latencies) < 0.5, latencies
    assert receiver.at("/hang"), "the hanging endpoint was never tried"
    assert agent.webhooks is not None
    stats = agent.webhooks.stats()
    for url in (dead_url, hang):
        assert stats[url]["delivered"] == 0, stats
        assert stats[url]["queued"] > 0, stats
    await events.ws.close()


# --- health ---------------------------------------------------------------------------------


async def test_http_health_check_turns_healthy(client: Client, http_app: str) -> None:
    """A Procfile serving HTTP on $PORT with a check of ``/``: healthy is null until the
    first probe, then true (a probe may fail while the server starts: failures is high);
    the status's port is the free port the program got and listens on."""
    events = await connect_events(client)
    health = {"http": "/", "interval": 0.05, "timeout": 2, "failures": 100}
    process = await create(client, http_app, health=health)
    assert process["healthy"] is None
    assert process["options"]["health"] == health
    await events.until(is_("online"))
    await until_true(lambda: healthy_is(client, process, True), what="healthy true")
    status = await get_json(client, process["details"])
    assert status["restarts"] == 0
    async with client.session.get(f"http://127.0.0.1:{status['port']}/") as response:
        assert response.status == 200
        assert "Procfile" in await response.text()  # it serves the app's folder
    await events.ws.close()


async def test_http_health_check_probes_the_port_the_request_sets(
    client: Client, http_app: str
) -> None:
    """A request whose env sets PORT: the status shows that port, the program listens on
    it, and the HTTP check probes it (healthy true)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = await create(client, http_app, env={"PORT": str(port)},
                           health={"http": "/", "interval": 0.05, "timeout": 2,
                                   "failures": 100})
    assert process["port"] == port
    await until_true(lambda: healthy_is(client, process, True), what="healthy true")
    async with client.session.get(f"http://127.0.0.1:{port}/") as response:
        assert response.status == 200


async def test_failing_health_command_restarts_with_an_unhealthy_reason(
    client: Client, ok_app: str
) -> None:
    """``test -f ok`` passes while the app keeps its file: healthy true. Once the app
    deletes it (on SIGUSR1), healthy turns false and, after ``failures`` probes in a row,
    the process is stopped and restarted at once (exit, starting, running, online), with
    ``unhealthy: ...`` as its last exit's reason; the new run is healthy again."""
    events = await connect_events(client)
    process = await create(client, ok_app, health={
        "command": "test -f ok", "interval": 0.1, "timeout": 2, "failures": 4})
    pid = (await events.until(is_("online")))[-1]["pid"]

    await until_true(lambda: healthy_is(client, process, True), what="healthy true")
    await post_json(client, process["signal"], {"signal": "USR1"})
    await until_true(lambda: healthy_is(client, process, False), what="healthy false")

    restart = await events.until(is_("online"))
    assert [brief(e) for e in restart] == [
        "exit@running", "state:running->starting", "state:starting->running", "online@running",
    ]
    assert restart[0]["pid"] == pid
    assert (restart[0]["code"], restart[0]["signal"]) == (0, None)  # it ended on SIGTERM
    status = await get_json(client, process["details"])
    assert status["restarts"] == 1
    reason = status["last_exit"]["reason"]
    assert reason.startswith("unhealthy: health check failed 4 times in a row: command "
                             "exited with code 1"), reason
    assert status["exits"][-1] == status["last_exit"]
    await until_true(lambda: healthy_is(client, process, True),
                     what="healthy true after the restart")
    await events.ws.close()


async def test_healthy_is_null_once_the_child_has_exited(
    client: Client, ok_app: str
) -> None:
    """A healthy process whose child then exits by itself (restart never) is ``exited``
    with no child: there is nothing to be healthy, so healthy is null, as after a stop."""
    events = await connect_events(client)
    process = await create(client, ok_app, restart="never", health={
        "command": "test -f ok", "interval": 0.05, "timeout": 2})

    await until_true(lambda: healthy_is(client, process, True), what="healthy true")
    await post_json(client, process["signal"], {"signal": "TERM"})
    await events.until(is_("state", state="exited"))
    status = await get_json(client, process["details"])
    assert (status["state"], status["pid"]) == ("exited", None)
    assert status["healthy"] is None
    await events.ws.close()


async def test_hanging_webhooks_do_not_starve_health_probes(
    receiver: Receiver, client: Client, archive_server: ArchiveServer, http_app: str
) -> None:
    """Ten processes each notifying ten URLs of an endpoint that hangs hold a hundred
    requests open; a process with an HTTP health check must still be probed, and found
    healthy, at its first probe."""
    missing = archive_server.url("missing.tgz")
    for n in range(10):
        await create(client, missing, node=f"hook.{n}",
                     notify=[receiver.url(f"/hang/{n}/{i}") for i in range(10)])
    await receiver.wait_until("/", lambda _: len(receiver.hits) >= 100)
    process = await create(client, http_app, health={
        "http": "/", "interval": 0.05, "timeout": 0.5, "failures": 1000})
    try:
        await until_true(lambda: listening(process["port"]), what="the server to listen")
        # once it listens, the next probe (50 ms later) finds it; a starved probe times out
        await until_true(lambda: healthy_is(client, process, True), timeout=2.0,
                         what="healthy true")
    finally:
        receiver.release.set()  # the agent's shutdown need not wait for them
