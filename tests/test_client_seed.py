"""The library against an agent that speaks only the original API (the seed's six
routes): what exists works, what does not says so in one sentence; and the retries."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import WSCloseCode, web
from aiohttp.test_utils import TestServer
from aiohttp.typedefs import Handler

from smartmob_agent.client import (
    AgentClient,
    ConflictError,
    MissingLink,
    NotFoundError,
    Unreachable,
)
from smartmob_agent.client.errors import ClientError
from smartmob_agent.client.results import LogLine


@dataclass
class SeedAgent:
    """An agent of 2016: index, listing, create, status, delete and attach, nothing more.

    Its documents are those of the seed's walkthrough (``app``, ``slug`` and three links,
    plus the reference table's ``node`` and ``status``), with one field no client knows.
    Its errors are plain text, as nothing in the seed says they are JSON.
    """

    server: TestServer | None = None
    processes: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: path -> how many more requests to that path get their connection dropped
    drop: dict[str, int] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=dict)
    sockets: list[web.WebSocketResponse] = field(default_factory=list)

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("/"))

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._count_and_drop])
        app.router.add_get("/", self.index)
        app.router.add_get("/list-processes", self.listing, name="list")
        app.router.add_post("/create-process", self.create, name="create")
        app.router.add_get("/process-status/{slug}", self.status, name="details")
        app.router.add_post("/delete-process/{slug}", self.delete, name="delete")
        app.router.add_get("/attach-console/{slug}", self.attach, name="attach")
        return app

    @web.middleware
    async def _count_and_drop(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.hits[request.path] = self.hits.get(request.path, 0) + 1
        if self.drop.get(request.path, 0) > 0:
            self.drop[request.path] -= 1
            assert request.transport is not None
            request.transport.close()  # the client sees the connection break mid-request
            raise web.HTTPInternalServerError()
        return await handler(request)

    def _link(self, request: web.Request, name: str, websocket: bool = False,
              **parts: str) -> str:
        url = request.url.origin().join(request.app.router[name].url_for(**parts))
        return str(url.with_scheme("ws")) if websocket else str(url)

    def _document(self, request: web.Request, slug: str) -> dict[str, Any]:
        created = self.processes[slug]
        return {
            "app": created["app"], "node": created["node"], "slug": slug,
            "attach": self._link(request, "attach", True, slug=slug),
            "details": self._link(request, "details", slug=slug),
            "status": self._link(request, "details", slug=slug),
            "delete": self._link(request, "delete", slug=slug),
            "colour": "blue",
        }

    async def index(self, request: web.Request) -> web.Response:
        return web.json_response({"list": self._link(request, "list"),
                                  "create": self._link(request, "create")})

    async def listing(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"processes": [self._document(request, slug) for slug in self.processes]})

    async def create(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        slug = f"{body['app']}.{body['node']}"
        if slug in self.processes:
            return web.Response(status=409, text="exists")
        self.processes[slug] = body
        return web.json_response(self._document(request, slug), status=201)

    async def status(self, request: web.Request) -> web.Response:
        slug = request.match_info["slug"]
        if slug not in self.processes:
            return web.Response(status=404, text="no such process")
        return web.json_response(self._document(request, slug))

    async def delete(self, request: web.Request) -> web.Response:
        self.processes.pop(request.match_info["slug"], None)
        for ws in self.sockets:
            await ws.close(code=WSCloseCode.OK)
        return web.json_response({})

    async def attach(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.sockets.append(ws)
        await ws.send_str("hello")
        await ws.send_str('{"seq": 1, "line": "a line that looks like JSON"}')
        async for _ in ws:  # the seed's console is output only
            pass
        return ws


@pytest.fixture
async def seed(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> SeedAgent:
    agent = SeedAgent()
    agent.server = await aiohttp_server(agent.app(), host="127.0.0.1")
    return agent


@pytest.fixture
async def client(seed: SeedAgent) -> AsyncIterator[AgentClient]:
    async with AgentClient(seed.url, retry_delay=0.01) as client:
        yield client


async def create(client: AgentClient, node: str = "web.0") -> Any:
    return await client.create("myapp", node, "http://example.com/app.tgz")


async def test_lists_creates_and_reads_a_process(client: AgentClient) -> None:
    """List, create and status work on the seed's documents; the fields the client does
    not know are kept, and those the seed does not send are None."""
    assert await client.list() == []
    created = await create(client)
    assert created.slug == "myapp.web.0"
    assert (created.app, created.node, created.state, created.pid) == (
        "myapp", "web.0", None, None)
    assert created.extra == {"colour": "blue"}
    assert created.to_dict()["colour"] == "blue"
    assert set(created.links) == {"attach", "details", "status", "delete"}
    status = await client.status("myapp.web.0")
    assert status == created
    assert [p.slug for p in await client.list()] == ["myapp.web.0"]


async def test_a_new_client_finds_a_process_by_its_slug(seed: SeedAgent,
                                                        client: AgentClient) -> None:
    """A client that never saw a process finds its links in the listing, never by
    building a path: the listing is read once, then the process's own link."""
    await create(client)
    async with AgentClient(seed.url) as fresh:
        before = dict(seed.hits)
        assert (await fresh.status("myapp.web.0")).slug == "myapp.web.0"
        assert (await fresh.status("myapp.web.0")).slug == "myapp.web.0"
    assert seed.hits["/list-processes"] - before.get("/list-processes", 0) == 1
    assert seed.hits["/process-status/myapp.web.0"] - before.get(
        "/process-status/myapp.web.0", 0) == 2


async def test_delete_then_not_found(client: AgentClient) -> None:
    """A deleted process is gone: its status is a NotFoundError naming the agent and status."""
    created = await create(client)
    await client.delete("myapp.web.0")
    with pytest.raises(NotFoundError) as caught:
        await client.status(created)
    assert caught.value.status == 404
    assert str(caught.value) == (
        f"agent {client.name}: GET {created.links['details']} answered 404 without saying why")
    with pytest.raises(NotFoundError, match=r"there is no process named 'myapp\.web\.0'"):
        await client.status("myapp.web.0")


async def test_an_error_without_json_is_still_a_sentence(client: AgentClient) -> None:
    """A 409 with a plain-text body is a ConflictError whose message says what was asked."""
    await create(client)
    with pytest.raises(ConflictError) as caught:
        await create(client)
    assert caught.value.error is None
    assert "answered 409 without saying why" in str(caught.value)


async def test_attach_reads_bare_text_frames(seed: SeedAgent, client: AgentClient) -> None:
    """The seed's console sends bare lines; each is a LogLine without seq, even one that
    looks like JSON; the deletion of the process ends the stream with 1000."""
    await create(client)
    async with client.attach("myapp.web.0") as console:
        received = [await console.__anext__(), await console.__anext__()]
        lines = [line for line in received if isinstance(line, LogLine)]
        assert lines == received  # no marker: the seed has none
        assert [line.line for line in lines] == [
            "hello", '{"seq": 1, "line": "a line that looks like JSON"}']
        assert lines[0].seq is None
        assert console.last_seq is None
        await client.delete("myapp.web.0")
        assert [line async for line in console] == []
        assert console.close_code == 1000
        assert console.close_reason == "the process was deleted"


@pytest.mark.parametrize(("call", "relation", "feature"), [
    (lambda c: c.start("myapp.web.0"), "start", "process controls"),
    (lambda c: c.stop("myapp.web.0"), "stop", "process controls"),
    (lambda c: c.restart("myapp.web.0"), "restart", "process controls"),
    (lambda c: c.signal("myapp.web.0", "HUP"), "signal", "signals"),
    (lambda c: c.logs("myapp.web.0"), "logs", "the logs link"),
    (lambda c: c.events().connect(), "events", "the events WebSocket"),
    (lambda c: c.upload(__file__), "upload", "uploads"),
    (lambda c: c.tokens(), "tokens", "access keys"),
    (lambda c: c.version(), "openapi", "the OpenAPI document"),
    (lambda c: c.bulk("stop", every=True), "bulk_stop", "bulk controls"),
    (lambda c: c.attach("myapp.web.0", after=3).connect(), "logs", "the logs link"),
    (lambda c: c.wait_for("myapp.web.0", timeout=1), "events", "the events WebSocket"),
    (lambda c: c.update("myapp.web.0", "http://h/a.tgz"), "update", "updates in place"),
    (lambda c: c.rollback("myapp.web.0"), "rollback", "updates in place"),
])
async def test_a_missing_link_says_what_the_agent_lacks(
    client: AgentClient, call: Callable[[AgentClient], Awaitable[Any]], relation: str,
    feature: str,
) -> None:
    """Each call beyond the seed's API fails with MissingLink, one sentence naming the
    link and the feature the agent is older than."""
    await create(client)
    with pytest.raises(MissingLink) as caught:
        await call(client)
    assert caught.value.relation == relation
    assert str(caught.value) == (
        f"this agent has no '{relation}' link: it is older than {feature} (it may speak "
        "only the original API of 2016)")


async def test_a_get_is_sent_again_when_the_connection_breaks(
    seed: SeedAgent, client: AgentClient
) -> None:
    """A GET whose connection broke is retried (it changes nothing), and succeeds."""
    await client.index()
    seed.drop["/list-processes"] = 2
    assert await client.list() == []
    assert seed.hits["/list-processes"] == 3


async def test_a_post_is_not_sent_again_when_the_connection_breaks(
    seed: SeedAgent, client: AgentClient
) -> None:
    """A create whose connection broke may have reached the agent: it is not repeated,
    and the caller learns the agent could not be reached."""
    await client.index()
    seed.drop["/create-process"] = 1
    with pytest.raises(Unreachable, match=f"cannot reach agent {client.name}"):
        await create(client)
    assert seed.hits["/create-process"] == 1


async def test_retries_give_up_with_one_sentence(seed: SeedAgent) -> None:
    """After its retries, a GET that keeps breaking is Unreachable: sent 3 times (1 + 2
    retries), each at most twice, since aiohttp itself sends an idempotent request again
    once when a connection breaks)."""
    seed.drop["/"] = 100
    async with AgentClient(seed.url, retries=2, retry_delay=0.01) as client:
        with pytest.raises(Unreachable):
            await client.list()
    assert 3 <= seed.hits["/"] <= 6


async def test_an_agent_that_is_not_there_is_unreachable() -> None:
    """Connection refused on every attempt: Unreachable, naming the agent, once."""
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with AgentClient(f"http://127.0.0.1:{port}", retries=2, retry_delay=0.01) as client:
        with pytest.raises(Unreachable) as caught:
            await client.list()
    message = str(caught.value)
    assert message.startswith(f"cannot reach agent http://127.0.0.1:{port}: ")
    assert "\n" not in message
    assert caught.value.kind == "unreachable"
    assert message.endswith(": connection refused")


async def test_a_server_that_is_not_an_agent(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> None:
    """An index without a 'list' link is not an agent's: the error says so."""
    async def page(request: web.Request) -> web.Response:
        return web.Response(text="<html>hi</html>")

    app = web.Application()
    app.router.add_get("/", page)
    server = await aiohttp_server(app, host="127.0.0.1")
    async with AgentClient(str(server.make_url("/"))) as client:
        with pytest.raises(ClientError, match="is this a smartmob agent"):
            await client.list()
