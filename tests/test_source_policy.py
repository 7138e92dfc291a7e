"""The fetch policy and the unpack limits in a real agent, through its HTTP API.

A source URL that the URL alone condemns (a scheme, an address, a host off the
allow-list) is a 400 at create, naming ``source_url``; one found out only while fetching
(what a name resolves to, a redirect) makes the process ``failed`` with a clear
``error``. Each limit flag reaches the unpack.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from smartmob_agent.config import Settings
from smartmob_agent.model import ProcessState as S
from smartmob_agent.sources import download
from smartmob_agent.sources.cache import cache_key
from smartmob_agent.supervision.agent import Agent
from smartmob_agent.web.server import make_app
from tests.conftest import ArchiveServer
from tests.helpers import make_archive, wait_for_state
from tests.test_fetch_guard import StandInResolver

Client = TestClient[Any, Any]
SLEEPER = {"Procfile": "web: exec sleep 1000\n"}
SLUG = "shop.web.0"


@dataclasses.dataclass
class Running:
    """An agent and a client of its API."""

    agent: Agent
    client: Client

    async def create(self, url: str, status: int = 201, **fields: Any) -> dict[str, Any]:
        index = await (await self.client.get("/")).json()
        body = {"app": "shop", "node": "web.0", "process_type": "web", "source_url": url,
                **fields}
        response = await self.client.session.post(index["create"], json=body)
        assert response.status == status, await response.text()
        document: dict[str, Any] = await response.json()
        return document

    async def outcome(self, *states: S) -> dict[str, Any]:
        """Wait for the process to reach one of ``states``; its status document."""
        await wait_for_state(self.agent.get(SLUG), *states, timeout=20)
        response = await self.client.get(f"/process-status/{SLUG}")
        document: dict[str, Any] = await response.json()
        return document


Start = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start(
    tmp_path: Path, aiohttp_client: Callable[..., Awaitable[Client]]
) -> AsyncIterator[Start]:
    """Start an agent with these settings (on top of test defaults)."""
    agents: list[Agent] = []

    async def starter(**changes: Any) -> Running:
        settings = dataclasses.replace(
            Settings(host="127.0.0.1", port=0, state_dir=tmp_path / "state",
                     stop_timeout=5.0, download_stall=5.0),
            **changes,
        )
        agent = Agent(settings)
        await agent.start()
        agents.append(agent)
        return Running(agent, await aiohttp_client(make_app(settings, agent)))

    yield starter
    for agent in agents:
        await agent.close()


# -- refused at create: 400 --------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        pytest.param("http://169.254.169.254/latest/meta-data/", "is a link-local address",
                     id="metadata"),
        pytest.param("http://[::ffff:169.254.169.254]/x", "(that is 169.254.169.254)",
                     id="ipv4-mapped"),
        pytest.param("http://[fd00:ec2::254]/x", "cloud metadata", id="aws-ipv6"),
        pytest.param("http://[fe80::1]/x", "link-local", id="ipv6-link-local"),
        pytest.param("http://2852039166/x", "not written as an IP address", id="decimal"),
        pytest.param("file:///etc/passwd", "--allow-file-sources", id="file"),
    ],
)
async def test_a_url_refused_by_its_form_is_a_400(start: Start, url: str, reason: str) -> None:
    """No process is created for a URL the policy refuses from the URL alone; the 400
    names source_url and why."""
    running = await start()
    body = await running.create(url, status=400)
    assert reason in body["fields"]["source_url"], body
    assert body["error"].startswith("the source_url is refused: ")
    assert running.agent.list() == []


@pytest.mark.parametrize("hook", [
    "http://169.254.169.254/latest/meta-data/", "http://[::ffff:169.254.169.254]/",
    "http://[fd00:ec2::254]/",
])
async def test_a_notify_url_at_a_metadata_address_is_a_400(
    start: Start, archive_server: ArchiveServer, hook: str
) -> None:
    """A webhook is a request the agent sends where the create request says: the same
    refusal of metadata and link-local addresses applies to notify URLs (the source
    allow-list does not: receivers are other hosts)."""
    running = await start(source_allow=("127.0.0.1",))
    url = archive_server.add("app.tgz", make_archive(SLEEPER))
    body = await running.create(url, status=400, notify=["http://127.0.0.1:9/ok", hook])
    assert body["fields"]["notify"].startswith("the URL at position 1 is refused: "), body
    assert running.agent.list() == []
    await running.create(url, notify=["http://hooks.example.com/deploys"])


async def test_the_allow_list_is_enforced_at_create(
    start: Start, archive_server: ArchiveServer
) -> None:
    """With --source-allow, a host off the list is a 400; one on it is fetched."""
    running = await start(source_allow=("127.0.0.1",))
    url = archive_server.add("app.tgz", make_archive(SLEEPER))
    body = await running.create(url.replace("127.0.0.1", "localhost"), status=400)
    assert "'localhost' is not on the allow-list" in body["fields"]["source_url"]
    await running.create(url)
    assert (await running.outcome(S.RUNNING, S.FAILED))["state"] == "running"


async def test_a_held_archive_needs_no_fetch_so_its_url_is_not_refused(
    start: Start,
) -> None:
    """An archive already in the cache under the request's checksum (an upload) is used
    without a request: its URL, refused or not, is never fetched."""
    running = await start(source_allow=("example.com",))
    data = make_archive(SLEEPER)
    sha256 = hashlib.sha256(data).hexdigest()
    url = "http://127.0.0.1:9/sources/" + sha256
    assert running.agent.sources is not None
    running.agent.sources.path(cache_key(url, sha256)).write_bytes(data)
    await running.create(url, checksum=f"sha256:{sha256}")
    assert (await running.outcome(S.RUNNING, S.FAILED))["state"] == "running"
    # without the archive, the same URL is refused
    body = await running.create(url.replace(sha256, "0" * 64), status=400,
                                node="web.1", checksum="sha256:" + "0" * 64)
    assert "not on the allow-list" in body["fields"]["source_url"]


# -- found out while fetching: failed ----------------------------------------------------


async def test_a_name_resolving_to_the_metadata_address_fails_the_process(
    start: Start, archive_server: ArchiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent's own session checks what names resolve to: a name that passes at
    create but resolves to 169.254.169.254 makes the process failed, saying so."""
    resolver = StandInResolver({"metadata.test": [["169.254.169.254"]]})
    monkeypatch.setattr(download, "DefaultResolver", lambda: resolver)
    running = await start()
    url = archive_server.add("app.tgz", make_archive(SLEEPER))
    await running.create(url.replace("127.0.0.1", "metadata.test"))
    document = await running.outcome(S.FAILED, S.RUNNING)
    assert document["state"] == "failed"
    assert "the host 'metadata.test' resolves to a refused address: 169.254.169.254 is a " \
        "link-local address" in document["error"]
    assert archive_server.requests == []
    assert resolver.asked == ["metadata.test"]


@pytest.fixture
async def redirector(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> TestServer:
    """Redirects ``/to?url=X`` to X."""
    async def redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(request.query["url"])

    app = web.Application()
    app.router.add_get("/to", redirect)
    return await aiohttp_server(app, host="127.0.0.1")


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        pytest.param("http://169.254.169.254/latest/meta-data/iam/", "link-local",
                     id="metadata"),
        pytest.param("file:///etc/passwd", "a redirect to a file:// URL is never followed",
                     id="file"),
    ],
)
async def test_a_redirect_to_a_refused_url_fails_the_process(
    start: Start, redirector: TestServer, target: str, reason: str
) -> None:
    running = await start()
    await running.create(str(redirector.make_url("/to").with_query(url=target)))
    document = await running.outcome(S.FAILED, S.RUNNING)
    assert document["state"] == "failed"
    assert "it redirects to " in document["error"]
    assert reason in document["error"]


async def test_a_redirect_is_followed_when_allowed(
    start: Start, redirector: TestServer, archive_server: ArchiveServer
) -> None:
    running = await start()
    url = archive_server.add("app.tgz", make_archive(SLEEPER))
    await running.create(str(redirector.make_url("/to").with_query(url=url)))
    assert (await running.outcome(S.RUNNING, S.FAILED))["state"] == "running"


# -- file:// sources ---------------------------------------------------------------------


async def test_file_sources_with_the_flag(start: Start, tmp_path: Path) -> None:
    """With --allow-file-sources DIR, a file:// URL under DIR runs; one elsewhere is a
    400; a symbolic link under DIR is not followed (failed)."""
    releases = tmp_path / "releases"
    releases.mkdir()
    (releases / "app.tgz").write_bytes(make_archive(SLEEPER))
    (tmp_path / "elsewhere.tgz").write_bytes(make_archive(SLEEPER))
    os.symlink(tmp_path / "elsewhere.tgz", releases / "link.tgz")
    running = await start(allow_file_sources=releases)
    body = await running.create(f"file://{tmp_path}/elsewhere.tgz", status=400)
    assert f"must name a file under {releases}" in body["fields"]["source_url"]
    await running.create(f"file://{releases}/app.tgz")
    assert (await running.outcome(S.RUNNING, S.FAILED))["state"] == "running"
    await running.create(f"file://{releases}/link.tgz", node="web.1")
    await wait_for_state(running.agent.get("shop.web.1"), S.FAILED, S.RUNNING, timeout=20)
    error = running.agent.get("shop.web.1").error
    assert error is not None
    assert "symbolic link" in error


# -- each limit flag reaches the unpack --------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "files", "fragment"),
    [
        pytest.param({"max_members": 2}, {"a": "1", "b": "2"}, "more than 2 members (the limit)",
                     id="max-members"),
        pytest.param({"max_unpacked": 1000}, {"a": "x" * 600, "b": "y" * 600},
                     "unpacks to more than 1000 bytes (the limit)", id="max-unpacked"),
        pytest.param({"max_member_size": 100}, {"big": "x" * 101},
                     "member larger than 100 bytes (the limit): 'big'", id="max-member-size"),
        pytest.param({"max_path_length": 20}, {"d/" + "n" * 20: "x"},
                     "longer than 20 characters (the limit)", id="max-path-length"),
        pytest.param({"max_download": 100}, {"big": os.urandom(300).hex()},
                     "over the limit of 100", id="max-download"),
    ],
)
async def test_each_limit_flag_is_applied(
    start: Start, archive_server: ArchiveServer, changes: dict[str, Any],
    files: dict[str, str], fragment: str,
) -> None:
    running = await start(**changes)
    url = archive_server.add("app.tgz", make_archive({**SLEEPER, **files}))
    await running.create(url)
    document = await running.outcome(S.FAILED, S.RUNNING)
    assert document["state"] == "failed"
    assert fragment in document["error"], document["error"]
