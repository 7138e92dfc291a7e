"""Links behind a reverse proxy: the scheme and host a trusted proxy says the client
used (``--trusted-proxy``), and the request's own for anyone else."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from smartmob_agent.web.links import forwarded_origin, is_trusted
from tests.agent_process import AgentProcess

PROXY_HEADERS = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "agent.example.com"}

Starter = Callable[..., Awaitable[AgentProcess]]


@pytest.fixture
async def start_agent(tmp_path: Path) -> AsyncIterator[Starter]:
    started: list[AgentProcess] = []

    async def start(*args: str) -> AgentProcess:
        agent = AgentProcess(tmp_path / f"state{len(started)}", args)
        started.append(agent)
        return await agent.start()

    yield start
    for agent in started:
        await agent.kill()


async def index(agent: AgentProcess, headers: dict[str, str]) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.get(
        agent.url + "/", headers=headers
    ) as response:
        return response.status, await response.json()


@pytest.mark.parametrize("trusted", ["127.0.0.1", "127.0.0.0/8"])
async def test_a_trusted_proxy_gets_https_links(start_agent: Starter, trusted: str) -> None:
    """From an address of --trusted-proxy (or in its network), X-Forwarded-Proto and
    X-Forwarded-Host make the links https:// and wss:// on the proxy's host."""
    agent = await start_agent("--trusted-proxy", trusted)
    status, links = await index(agent, PROXY_HEADERS)
    assert status == 200
    assert links["list"] == "https://agent.example.com/list-processes"
    assert links["events"] == "wss://agent.example.com/events"


async def test_without_trusted_proxy_the_headers_are_ignored(start_agent: Starter) -> None:
    """Anyone could send those headers: without --trusted-proxy the links keep the
    request's own scheme and host."""
    agent = await start_agent()
    status, links = await index(agent, PROXY_HEADERS)
    assert status == 200
    assert links["list"] == agent.url + "/list-processes"
    assert links["list"].startswith("http://127.0.0.1:")
    assert links["events"].startswith("ws://127.0.0.1:")


async def test_a_proxy_elsewhere_is_not_trusted(start_agent: Starter) -> None:
    """--trusted-proxy naming another address leaves a request from 127.0.0.1 alone."""
    agent = await start_agent("--trusted-proxy", "10.0.0.0/8")
    _, links = await index(agent, PROXY_HEADERS)
    assert links["list"].startswith("http://127.0.0.1:")


async def test_forwarded_wins_and_a_bad_value_is_a_clear_400(start_agent: Starter) -> None:
    """The standard Forwarded header is read too, before X-Forwarded-*; a scheme that is
    not http or https from the proxy is refused with a JSON 400 naming the header."""
    agent = await start_agent("--trusted-proxy", "127.0.0.1")
    _, links = await index(agent, {
        "Forwarded": 'for=203.0.113.7;proto=https;host="fw.example:8443"', **PROXY_HEADERS,
    })
    assert links["create"] == "https://fw.example:8443/create-process"
    status, body = await index(agent, {"X-Forwarded-Proto": "gopher"})
    assert status == 400
    assert "X-Forwarded-Proto" in body["error"]
    status, body = await index(agent, {"X-Forwarded-Host": "a b"})
    assert status == 400
    assert "X-Forwarded-Host" in body["error"]


def test_the_element_of_the_first_trusted_proxy_is_the_one_believed() -> None:
    """What a client writes in Forwarded itself comes before the proxies' elements: only
    those added by trusted proxies, read from the last back, count."""
    proxies = [ipaddress.ip_network("10.0.0.0/8")]

    def trusted(address: str | None) -> bool:
        return is_trusted(address, proxies)

    spoofed = {"for": "198.51.100.1", "proto": "http", "host": "evil.example"}
    edge = {"for": "203.0.113.7", "proto": "https", "host": "good.example"}
    inner = {"for": "10.0.0.2", "proto": "http", "host": "inner.internal"}
    assert forwarded_origin([spoofed, edge], None, None, trusted) == ("https", "good.example")
    # an inner proxy's element, received from the trusted edge proxy, is passed over
    assert forwarded_origin([spoofed, edge, inner], None, None, trusted) == (
        "https", "good.example")
    assert forwarded_origin([], "http, https", None, trusted) == ("https", None)
    assert forwarded_origin([], None, None, trusted) == (None, None)


@pytest.mark.parametrize(("address", "expected"), [
    ("10.1.2.3", True), ("10.1.2.3:443", True), ("[fd00::1]", False), ("::1", True),
    ("[::1]:80", True), ("unknown", False), ("_hidden", False), (None, False), ("", False),
])
def test_is_trusted(address: str | None, expected: bool) -> None:
    proxies = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128")]
    assert is_trusted(address, proxies) is expected
