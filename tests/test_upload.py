"""The ``upload`` link: an archive sent to the agent, kept in the source cache under its
checksum, served back at the ``source_url`` the answer gives, run by create requests
without any download, and garbage-collected like downloaded archives.

Every test runs a real agent behind a real HTTP server on 127.0.0.1 (the last one the
real ``smartmob-agent`` command) with real processes; each request the agent answers is
recorded, so a download the agent made from itself would show.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from smartmob_agent.config import Settings
from smartmob_agent.model import ProcessState as S
from smartmob_agent.sources.cache import KEEP_UNUSED, cache_key
from smartmob_agent.supervision.agent import Agent
from smartmob_agent.web.server import make_app
from tests.agent_process import AgentProcess
from tests.conftest import ArchiveServer
from tests.helpers import app_archive, eventually, make_archive, wait_for_state

Client = TestClient[Any, Any]

SLEEPER = "web: exec sleep 1000\n"


@dataclass
class Served:
    """A client of the agent's web app, and the path of every request the app answered
    (the test's own and any the agent would make to itself)."""

    client: Client
    agent: Agent
    paths: list[str] = field(default_factory=list)

    async def links(self) -> dict[str, str]:
        response = await self.client.get("/")
        assert response.status == 200
        links: dict[str, str] = await response.json()
        return links

    async def upload(self, body: Any, **kwargs: Any) -> tuple[int, dict[str, Any]]:
        response = await self.client.session.post(
            (await self.links())["upload"], data=body, **kwargs
        )
        return response.status, await response.json()

    async def create(self, **fields: Any) -> tuple[int, dict[str, Any]]:
        body = {"app": "shop", "node": "web.0", "process_type": "web", **fields}
        response = await self.client.session.post(
            (await self.links())["create"], data=json.dumps(body)
        )
        return response.status, await response.json()

    def sources_requested(self) -> list[str]:
        return [path for path in self.paths if path.startswith("/sources/")]


async def _serve(
    settings: Settings, aiohttp_client: Callable[..., Awaitable[Client]]
) -> AsyncIterator[Served]:
    async with Agent(settings) as agent:
        app = make_app(settings, agent)
        paths: list[str] = []

        async def record(request: web.Request, response: web.StreamResponse) -> None:
            paths.append(request.path)

        app.on_response_prepare.append(record)  # before the server freezes the app
        yield Served(await aiohttp_client(app), agent, paths)


@pytest.fixture
async def served(
    settings: Settings, aiohttp_client: Callable[..., Awaitable[Client]]
) -> AsyncIterator[Served]:
    """The agent (default limits) behind a real server on 127.0.0.1."""
    async for value in _serve(settings, aiohttp_client):
        yield value


#: The download limit (hence upload limit) of the ``small`` agent.
SMALL_LIMIT = 100_000


@pytest.fixture
async def small(
    tmp_path: Path, aiohttp_client: Callable[..., Awaitable[Client]]
) -> AsyncIterator[Served]:
    """An agent whose ``--max-download`` is :data:`SMALL_LIMIT` bytes."""
    settings = Settings(host="127.0.0.1", port=0, state_dir=tmp_path / "small",
                        stop_timeout=5.0, max_download=SMALL_LIMIT)
    async for value in _serve(settings, aiohttp_client):
        yield value


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def versioned(version: int) -> bytes:
    """An app whose source says which version it is."""
    return app_archive(SLEEPER, {"version.txt": str(version)})


def cache_files(agent: Agent) -> list[str]:
    return sorted(path.name for path in agent.cache_dir.iterdir())


async def test_the_index_links_to_upload(served: Served) -> None:
    """The index has an absolute ``upload`` link."""
    links = await served.links()
    assert links["upload"] == str(served.client.make_url("/upload-source"))


async def test_an_upload_answers_where_it_is_and_its_checksum(served: Served) -> None:
    """201 with ``source_url`` (also in ``Location``), ``checksum`` and ``size``; the
    archive is in the cache under its checksum; the same bytes again get the same
    answer."""
    data = versioned(1)
    response = await served.client.session.post((await served.links())["upload"], data=data)
    assert response.status == 201
    document = await response.json()
    digest = sha256(data)
    assert document == {
        "source_url": str(served.client.make_url(f"/sources/{digest}")),
        "checksum": f"sha256:{digest}",
        "size": len(data),
    }
    assert response.headers["Location"] == document["source_url"]
    assert served.agent.sources is not None
    assert served.agent.sources.keys() == {cache_key("", digest)}
    assert served.agent.sources.path(cache_key("", digest)).read_bytes() == data

    assert await served.upload(data) == (201, document)
    assert served.agent.sources.keys() == {cache_key("", digest)}
    assert not list(served.agent.cache_dir.glob("*.part"))


@pytest.mark.parametrize("with_checksum", [True, False], ids=["checksum", "source_url-only"])
async def test_upload_then_create_runs_without_any_download(
    served: Served, archive_server: ArchiveServer, with_checksum: bool
) -> None:
    """A create request with the upload's ``source_url`` (with its ``checksum``, or
    alone) runs the archive from the cache: no request reaches any server, the agent's
    own ``/sources/`` route included. The status document shows the checksum."""
    data = versioned(7)
    status, uploaded = await served.upload(data)
    assert status == 201
    fields = dict(uploaded) if with_checksum else {"source_url": uploaded["source_url"]}
    fields.pop("size", None)
    status, process = await served.create(**fields)
    assert status == 201, process
    assert process["checksum"] == uploaded["checksum"]
    watcher = served.agent.get("shop.web.0")
    await wait_for_state(watcher, S.RUNNING)
    assert (watcher.workdir / "source" / "version.txt").read_text() == "7"
    assert served.sources_requested() == []
    assert archive_server.requests == []


async def test_a_large_upload_streams_past_the_json_body_limit(
    served: Served, settings: Settings
) -> None:
    """An archive far over ``--max-body`` (which bounds JSON bodies), sent in chunks
    without a length, is taken whole; a JSON request that large is still refused."""
    payload = os.urandom(3 * settings.max_body)  # random: gzip cannot shrink it
    data = make_archive({"Procfile": SLEEPER, "blob.bin": payload})
    assert len(data) > 2 * settings.max_body

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(data), 50_000):
            yield data[start:start + 50_000]

    status, document = await served.upload(chunks())
    assert status == 201, document
    assert document["size"] == len(data)
    assert document["checksum"] == f"sha256:{sha256(data)}"
    status, _ = await served.create(source_url=document["source_url"])
    assert status == 201
    watcher = served.agent.get("shop.web.0")
    await wait_for_state(watcher, S.RUNNING)
    assert (watcher.workdir / "source" / "blob.bin").read_bytes() == payload

    too_big = io.BytesIO(b" " * (settings.max_body + 1))
    response = await served.client.post("/create-process", data=too_big)
    assert response.status == 413


async def test_the_source_url_serves_the_archive_and_nothing_else(
    served: Served, archive_server: ArchiveServer
) -> None:
    """``GET source_url`` answers the bytes uploaded; an unknown checksum, or something
    that is not one, is a JSON 404; an archive the agent downloaded is not served."""
    data = versioned(1)
    status, uploaded = await served.upload(data)
    response = await served.client.session.get(uploaded["source_url"])
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert await response.read() == data
    upper = uploaded["source_url"].replace(sha256(data), sha256(data).upper())
    response = await served.client.session.get(upper)
    assert response.status == 200

    downloaded = app_archive("web: exec sleep 1001\n")
    url = archive_server.add("app.tgz", downloaded)
    status, _ = await served.create(source_url=url, checksum=f"sha256:{sha256(downloaded)}")
    assert status == 201
    await wait_for_state(served.agent.get("shop.web.0"), S.RUNNING)
    assert served.agent.sources is not None
    assert cache_key("", sha256(downloaded)) in served.agent.sources.keys()  # noqa: SIM118 (a set, not a dict)

    for path in [f"/sources/{sha256(downloaded)}", f"/sources/{'0' * 64}",
                 "/sources/not-a-checksum", f"/sources/{'0' * 65}"]:
        response = await served.client.get(path)
        assert response.status == 404, path
        assert "error" in await response.json()


async def test_over_the_limit_is_a_413_and_leaves_nothing(small: Served) -> None:
    """A body over ``--max-download`` is refused with 413, whether its length is
    announced (nothing read) or found while streaming (the partial file is removed)."""
    body = versioned(1) + os.urandom(SMALL_LIMIT)  # a gzip head, then too much
    status, document = await small.upload(body)
    assert status == 413
    assert f"{SMALL_LIMIT} bytes" in document["error"]
    assert cache_files(small.agent) == []

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 8192):
            yield body[start:start + 8192]

    status, document = await small.upload(chunks())
    assert status == 413
    assert "--max-download" in document["error"]
    assert cache_files(small.agent) == []

    # just at the limit is fine
    exact = body[:SMALL_LIMIT]
    status, document = await small.upload(exact)
    assert status == 201
    assert document["size"] == SMALL_LIMIT


async def test_an_upload_cut_short_leaves_nothing(served: Served) -> None:
    """A client that goes away mid-body leaves no file behind, and the agent goes on."""
    data = versioned(1)
    url = served.client.make_url("/upload-source")
    _, writer = await asyncio.open_connection(url.host, url.port)
    writer.write(
        b"POST /upload-source HTTP/1.1\r\nHost: " + url.authority.encode()
        + b"\r\nContent-Length: 1000000\r\n\r\n" + data
    )
    await writer.drain()
    await eventually(lambda: bool(list(served.agent.cache_dir.glob("*.part"))),
                     what="the upload to start")
    writer.close()
    await writer.wait_closed()
    await eventually(lambda: cache_files(served.agent) == [],
                     what="the partial upload to be removed")
    assert (await served.upload(data))[0] == 201


@pytest.mark.parametrize(
    ("body", "looks"),
    [(b'{"app": "shop"}', "JSON"), (b"<!DOCTYPE html><html></html>", "an HTML page"),
     (b"", "empty"), (b"#!/bin/sh\necho hello\n" * 1000, "something else")],
    ids=["json", "html", "empty", "script"],
)
async def test_a_body_that_is_not_an_archive_is_a_400(
    served: Served, body: bytes, looks: str
) -> None:
    """A body that is not a zip or tar archive by its first bytes is refused with 400
    saying what it looks like; nothing is kept."""
    status, document = await served.upload(body)
    assert status == 400
    assert document["error"].startswith(
        f"the uploaded body is not a zip or tar archive (it is {looks})"
    )
    assert cache_files(served.agent) == []


async def test_every_archive_format_is_taken(served: Served) -> None:
    """zip and tar (plain, gzip, bzip2, xz) uploads are kept and run."""
    for i, kind in enumerate(("zip", "tar", "tar.bz2", "tar.xz")):
        data = app_archive(SLEEPER, {"kind.txt": kind}, kind=kind)
        status, uploaded = await served.upload(data)
        assert status == 201, (kind, uploaded)
        status, _ = await served.create(node=f"web.{i}", source_url=uploaded["source_url"])
        assert status == 201
        watcher = served.agent.get(f"shop.web.{i}")
        await wait_for_state(watcher, S.RUNNING)
        assert (watcher.workdir / "source" / "kind.txt").read_text() == kind


async def test_a_create_from_an_upload_the_agent_lacks_is_a_400(served: Served) -> None:
    """The agent's upload URL of an archive it does not have is refused at once, naming
    ``source_url``; nothing is created."""
    status, document = await served.create(
        source_url=str(served.client.make_url(f"/sources/{'ab' * 32}"))
    )
    assert status == 400
    assert "source_url" in document["fields"]
    assert "upload the archive again" in document["error"]
    assert served.agent.list() == []


async def test_uploads_are_collected_like_downloads(served: Served) -> None:
    """An upload used by a process stays while it runs; once unused, it is kept among the
    KEEP_UNUSED most recently used (an upload counts as a use) and collected when newer
    uploads push it out. One in use is never collected, however old."""
    assert KEEP_UNUSED == 3
    sources = served.agent.sources
    assert sources is not None
    datas = [versioned(i) for i in range(7)]
    keys = [cache_key("", sha256(data)) for data in datas]
    urls = []
    for data in datas[:2]:
        status, uploaded = await served.upload(data)
        assert status == 201
        urls.append(uploaded["source_url"])

    # v0 and v1 run; v0 is then deleted, v1 keeps running
    for i in range(2):
        status, _ = await served.create(node=f"web.{i}", source_url=urls[i])
        assert status == 201
        await wait_for_state(served.agent.get(f"shop.web.{i}"), S.RUNNING)
    await served.agent.delete("shop.web.0")
    assert sources.keys() == set(keys[:2])

    # v2 and v3: with v0, three unused, all kept (v2 and v3 never used but uploaded)
    for data in datas[2:4]:
        assert (await served.upload(data))[0] == 201
    assert sources.keys() == set(keys[:4])

    # v4: v0 is the least recently used of four unused, and goes; v1 is in use
    assert (await served.upload(datas[4]))[0] == 201
    assert sources.keys() == set(keys[1:5])
    assert not list(served.agent.cache_dir.glob(f"{keys[0]}*"))
    response = await served.client.session.get(urls[0])
    assert response.status == 404

    for data in datas[5:]:
        assert (await served.upload(data))[0] == 201
    assert sources.keys() == {keys[1], *keys[4:]}

    # v1, once deleted, is the oldest unused: the next collection removes it
    await served.agent.delete("shop.web.1")
    assert sources.keys() == set(keys[4:])


async def test_the_real_agent_runs_an_upload_without_asking_itself(tmp_path: Path) -> None:
    """The real ``smartmob-agent`` command: an archive over the 1 MiB JSON body limit is
    uploaded, a process created from its ``source_url`` alone runs, and the agent's
    access log (on at ``--log-level debug``) shows no request for the archive until the
    test asks for it."""
    agent = AgentProcess(tmp_path / "state", ["--log-level", "debug"])
    payload = os.urandom(2 * 1024 * 1024)
    data = make_archive({"Procfile": SLEEPER, "blob.bin": payload})
    try:
        await agent.start()
        async with aiohttp.ClientSession() as http:
            async with http.get(agent.url + "/") as response:
                links = await response.json()
            async with http.post(links["upload"], data=io.BytesIO(data)) as response:
                assert response.status == 201, await response.text()
                uploaded = await response.json()
            assert uploaded["source_url"].startswith(agent.url + "/sources/")
            body = {"app": "e2e", "node": "web.0", "process_type": "web",
                    "source_url": uploaded["source_url"]}
            async with http.post(links["create"], data=json.dumps(body)) as response:
                assert response.status == 201, await response.text()
                details = (await response.json())["details"]
            async with asyncio.timeout(10):
                while True:
                    async with http.get(details) as response:
                        status = await response.json()
                    assert status["state"] != "failed", status
                    if status["state"] == "running":
                        break
                    await asyncio.sleep(0.01)
            assert status["checksum"] == uploaded["checksum"]
            assert "GET /sources/" not in agent.stderr

            # the access log would have shown it: a GET of the archive does
            async with http.get(uploaded["source_url"]) as response:
                assert response.status == 200
                assert await response.read() == data
            await eventually(lambda: "GET /sources/" in agent.stderr,
                             what="the access log line of the GET")
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGTERM)
        assert await agent.wait() == 0
        archive = tmp_path / "state" / "cache" / f"{cache_key('', sha256(data))}.archive"
        assert archive.read_bytes() == data
    finally:
        await agent.kill()
