"""Fixtures: a real archive server on 127.0.0.1, a real agent on tmp dirs, a client."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from smartmob_agent.config import Settings
from smartmob_agent.supervision.agent import Agent
from smartmob_agent.web.server import make_app
from tests.puppet import PuppetServer


def pytest_configure(config: pytest.Config) -> None:
    """Run the in-process agents' children as ``smartmob-agent`` runs them: if pytest was
    started with SIGHUP or SIGQUIT ignored (under ``nohup``), handle them instead, so
    that children get the default action back at exec (see cli._handle_inherited_ignores).

    Likewise SIGINT, which a shell ignores for a command it starts in the background: the
    tests CTRL-C the ``smartmob`` command they start (``logs -f``, ``attach``, ``top``),
    and a Python program that starts with SIGINT ignored keeps ignoring it."""
    for number in (signal.SIGHUP, signal.SIGQUIT):
        if signal.getsignal(number) == signal.SIG_IGN:
            signal.signal(number, lambda *_: None)
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@dataclass
class ArchiveServer:
    """A real HTTP server on 127.0.0.1 serving archives registered by tests."""

    server: TestServer
    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[web.Request] = field(default_factory=list)
    stall_forever: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, name: str, data: bytes) -> str:
        """Serve ``data`` at ``/name``; return its absolute URL."""
        self.files[name] = data
        return self.url(name)

    def url(self, name: str) -> str:
        """The absolute URL of ``/name``."""
        return str(self.server.make_url(f"/{name}"))

    def hits(self, name: str) -> int:
        """How many requests asked for ``/name``."""
        return sum(1 for request in self.requests if request.path == f"/{name}")


@pytest.fixture
async def archive_server(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> AsyncIterator[ArchiveServer]:
    """Serve archives (``/name``), HTML (``/page.html``) and a stalled body (``/stall``);
    a PUT to ``/name`` stores an archive there."""
    state: dict[str, ArchiveServer] = {}

    async def serve(request: web.Request) -> web.StreamResponse:
        served = state["server"]
        served.requests.append(request)
        name = request.match_info["name"]
        if name == "stall":
            response = web.StreamResponse()
            response.content_length = 10_000
            await response.prepare(request)
            await response.write(b"x" * 10)
            await served.stall_forever.wait()
            return response
        if name == "page.html":
            return web.Response(text="<!DOCTYPE html><html><body>Login</body></html>",
                                content_type="text/html")
        if name not in served.files:
            raise web.HTTPNotFound()
        return web.Response(body=served.files[name], content_type="application/octet-stream")

    async def store(request: web.Request) -> web.Response:
        # a storage service as gitmesh-deploy uploads to: PUT an archive, then GET it
        served = state["server"]
        served.requests.append(request)
        served.files[request.match_info["name"]] = await request.read()
        return web.Response(status=201)

    app = web.Application()
    app.router.add_get("/{name}", serve)
    app.router.add_put("/{name}", store)
    server = await aiohttp_server(app, host="127.0.0.1")
    state["server"] = ArchiveServer(server)
    yield state["server"]
    state["server"].stall_forever.set()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings on a fresh state folder, with short timeouts fit for tests."""
    return Settings(
        host="127.0.0.1", port=0, state_dir=tmp_path / "state", stop_timeout=5.0,
        download_stall=2.0,
    )


@pytest.fixture
async def agent(settings: Settings) -> AsyncIterator[Agent]:
    """A started agent, closed (every child stopped) after the test."""
    async with Agent(settings) as agent:
        yield agent


@pytest.fixture
async def client(
    agent: Agent, settings: Settings, aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]]
) -> TestClient[Any, Any]:
    """An HTTP client of the agent's web app, served on 127.0.0.1."""
    return await aiohttp_client(make_app(settings, agent))


@pytest.fixture
async def puppets() -> AsyncIterator[PuppetServer]:
    """A server that the puppet children of a test connect to (see tests/puppet.py)."""
    server = await PuppetServer().start()
    yield server
    await server.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client session for tests that talk to a real agent process."""
    async with aiohttp.ClientSession() as session:
        yield session
