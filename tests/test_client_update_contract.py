"""The client's rolling updates against agents that serve the update contract of issue 17
and nothing else (``update`` and ``rollback`` links, ``pending_source``,
``previous_source``, ``update_error``), over real HTTP: the order of the updates, the
stop at the first failure, the rollback of what was updated, ``parallel`` and no
rollback. The real agent runs the same through the command in test_client_rolling.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from smartmob_agent.client import AgentClient, ConflictError
from smartmob_agent.client.results import Process
from smartmob_agent.client.rolling import NodeUpdate, RollingFailed, roll

#: How long each update takes on the contract agent (it ends in the background).
TAKES = 0.05


@dataclass
class ContractAgent:
    """An agent that updates in place by the contract: a source whose URL has ``bad``
    in it never starts (the old one keeps running, ``update_error`` says why)."""

    server: TestServer | None = None
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    previous: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    pending: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    errors: dict[str, str | None] = field(default_factory=dict)
    #: (slug, "update" or "rollback", source URL), in the order asked
    asked: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("/"))

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self.index)
        app.router.add_get("/list", self.listing, name="list")
        app.router.add_get("/p/{slug}", self.status, name="details")
        app.router.add_post("/p/{slug}/update", self.update, name="update")
        app.router.add_post("/p/{slug}/rollback", self.rollback, name="rollback")
        return app

    def add(self, slug: str, url: str) -> None:
        self.sources[slug] = {"url": url, "checksum": None, "since": "then"}
        self.previous[slug] = self.pending[slug] = self.errors[slug] = None

    def _link(self, request: web.Request, name: str, slug: str) -> str:
        return str(request.url.origin().join(request.app.router[name].url_for(slug=slug)))

    def _document(self, request: web.Request, slug: str) -> dict[str, Any]:
        app, node = slug.split(".", 1)
        return {
            "app": app, "node": node, "slug": slug, "process_type": "web",
            "state": "running", "pid": 1, "uptime": 100.0, "options": {"start_seconds": 1},
            "source": self.sources[slug], "pending_source": self.pending[slug],
            "previous_source": self.previous[slug], "update_error": self.errors[slug],
            **{rel: self._link(request, rel, slug) for rel in ("details", "update",
                                                                 "rollback")},
        }

    async def index(self, request: web.Request) -> web.Response:
        return web.json_response({"list": str(request.url.origin().join(
            request.app.router["list"].url_for()))})

    async def listing(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"processes": [self._document(request, slug) for slug in self.sources]})

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(self._document(request, request.match_info["slug"]))

    def _start(self, slug: str, source: dict[str, Any]) -> None:
        self.pending[slug] = source

        async def end() -> None:
            await asyncio.sleep(TAKES)
            self.pending[slug] = None
            if "bad" in source["url"]:
                self.errors[slug] = "the new child exited with code 3"
                return
            self.previous[slug], self.sources[slug] = self.sources[slug], source
            self.errors[slug] = None

        asyncio.get_running_loop().create_task(end())

    async def update(self, request: web.Request) -> web.Response:
        slug = request.match_info["slug"]
        body = json.loads(await request.read())
        self.asked.append((slug, "update", body["source_url"]))
        self._start(slug, {"url": body["source_url"], "checksum": None, "since": "now"})
        return web.json_response(self._document(request, slug), status=202)

    async def rollback(self, request: web.Request) -> web.Response:
        slug = request.match_info["slug"]
        back = self.previous[slug]
        if back is None:
            return web.json_response({"error": f"{slug} has nothing to roll back to"},
                                     status=409)
        self.asked.append((slug, "rollback", back["url"]))
        self._start(slug, back)
        return web.json_response(self._document(request, slug), status=202)


@pytest.fixture
async def agents(aiohttp_server: Callable[..., Awaitable[TestServer]]
                 ) -> AsyncIterator[list[tuple[ContractAgent, AgentClient]]]:
    pairs = []
    for _ in range(2):
        agent = ContractAgent()
        agent.server = await aiohttp_server(agent.app(), host="127.0.0.1")
        for node in ("web.0", "web.1"):
            agent.add(f"shop.{node}", "http://h/v1.tgz")
        pairs.append((agent, AgentClient(agent.url)))
    yield pairs
    for _, client in pairs:
        await client.close()


def groups(agents: list[tuple[ContractAgent, AgentClient]], urls: list[str]
           ) -> list[list[NodeUpdate]]:
    """Each agent's two nodes, updated to that agent's URL."""
    return [[NodeUpdate(client, f"shop.{node}", url) for node in ("web.0", "web.1")]
            for (_, client), url in zip(agents, urls, strict=True)]


def reporter(said: list[str]) -> Callable[[NodeUpdate, str, Process | None], None]:
    def report(node: NodeUpdate, what: str, process: Process | None) -> None:
        said.append(f"{node.agent.name[-6:-1]} {node.slug}: {what}")
    return report


async def test_every_node_updated_agent_by_agent(
    agents: list[tuple[ContractAgent, AgentClient]],
) -> None:
    (a, client_a), (b, _) = agents
    said: list[str] = []
    done = await roll(groups(agents, ["http://h/v2.tgz"] * 2), reporter(said), timeout=5)
    assert len(done) == 4
    assert [slug for slug, _, _ in a.asked + b.asked] == ["shop.web.0", "shop.web.1"] * 2
    assert {s["url"] for s in [*a.sources.values(), *b.sources.values()]} == {
        "http://h/v2.tgz"}
    assert (await client_a.status("shop.web.0")).previous_source == {
        "url": "http://h/v1.tgz", "checksum": None, "since": "then"}


async def test_the_first_failure_stops_and_rolls_back(
    agents: list[tuple[ContractAgent, AgentClient]],
) -> None:
    """b's web.0 fails: a's two nodes were updated, and go back (the last first); b's
    web.1 is never asked; the failure names the node and the agent's reason."""
    (a, _), (b, _) = agents
    said: list[str] = []
    with pytest.raises(RollingFailed) as failed:
        await roll(groups(agents, ["http://h/v2.tgz", "http://h/bad.tgz"]), reporter(said),
                   timeout=5)
    assert failed.value.node.slug == "shop.web.0"
    assert str(failed.value).endswith(": shop.web.0: the update failed, the old version "
                                      "still runs: the new child exited with code 3")
    assert [n.slug for n in failed.value.rolled_back] == ["shop.web.1", "shop.web.0"]
    assert [line.split(" ", 1)[1] for line in said] == [
        "shop.web.0: updated", "shop.web.1: updated", "shop.web.1: rolled back",
        "shop.web.0: rolled back"]
    assert b.asked == [("shop.web.0", "update", "http://h/bad.tgz")]
    assert {s["url"] for s in [*a.sources.values(), *b.sources.values()]} == {
        "http://h/v1.tgz"}


async def test_parallel_and_no_rollback(
    agents: list[tuple[ContractAgent, AgentClient]],
) -> None:
    """Two at a time: both of a's nodes at once; both of b's fail at once; nothing goes
    back."""
    (a, client_a), (b, client_b) = agents
    with pytest.raises(RollingFailed) as failed:
        await roll(groups(agents, ["http://h/v2.tgz", "http://h/bad.tgz"]), reporter([]),
                   parallel=2, rollback=False, timeout=5)
    assert failed.value.rolled_back == []
    assert {s["url"] for s in a.sources.values()} == {"http://h/v2.tgz"}
    assert [kind for _, kind, _ in b.asked] == ["update", "update"]
    assert {s["url"] for s in b.sources.values()} == {"http://h/v1.tgz"}
    with pytest.raises(ConflictError, match="has nothing to roll back to"):
        await client_b.rollback("shop.web.0")
    assert (await client_a.status("shop.web.1")).update_error is None
