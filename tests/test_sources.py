"""The source cache: one download for many processes, revalidation, checksums, a copy per
process, garbage collection, and download progress in the status document.

Every test runs a real agent with real processes against a real HTTP server on
127.0.0.1, which records each request with the status it answered. Waits are on state
changes, or polled with deadlines; the slow server holds the second half of a body until
the test lets it go, so nothing depends on timing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from smartmob_agent.config import Settings
from smartmob_agent.errors import DownloadError
from smartmob_agent.model import ProcessState as S
from smartmob_agent.model import Spec
from smartmob_agent.schemas import create_request, spec_from_request
from smartmob_agent.sources.cache import KEEP_UNUSED, SourceCache, cache_key
from smartmob_agent.supervision.agent import Agent
from smartmob_agent.supervision.watcher import Watcher
from tests.conftest import ArchiveServer
from tests.helpers import app_archive, eventually, wait_for_state

Client = TestClient[Any, Any]

SLEEPER = "web: exec sleep 1000\n"


@dataclass
class Seen:
    """One request the origin answered."""

    path: str
    status: int
    headers: dict[str, str]


@dataclass
class Origin:
    """An archive server with validators (``ETag``, ``Last-Modified``) and slow bodies."""

    server: TestServer
    bodies: dict[str, bytes] = field(default_factory=dict)
    etags: dict[str, str] = field(default_factory=dict)
    modified: dict[str, str] = field(default_factory=dict)
    #: a body with a gate is sent half, then the rest once the gate is set
    gates: dict[str, asyncio.Event] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)

    def add(self, name: str, data: bytes, *, etag: str | None = None,
            modified: str | None = None, slow: bool = False) -> str:
        """Serve ``data`` at ``/name`` with these validators; return its URL."""
        self.bodies[name] = data
        for table, value in ((self.etags, etag), (self.modified, modified)):
            if value is None:
                table.pop(name, None)
            else:
                table[name] = value
        if slow:
            self.gates[name] = asyncio.Event()
        return str(self.server.make_url(f"/{name}"))

    def statuses(self, name: str) -> list[int]:
        """The status of every answer for ``/name``, in order."""
        return [seen.status for seen in self.seen if seen.path == f"/{name}"]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings fit for tests, with a stall limit well above what a test holds a body."""
    return Settings(host="127.0.0.1", port=0, state_dir=tmp_path / "state",
                    stop_timeout=5.0, download_stall=10.0)


@pytest.fixture
async def origin(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> AsyncIterator[Origin]:
    state: dict[str, Origin] = {}

    async def serve(request: web.Request) -> web.StreamResponse:
        served = state["origin"]
        name = request.match_info["name"]
        headers = dict(request.headers)
        if name not in served.bodies:
            served.seen.append(Seen(request.path, 404, headers))
            raise web.HTTPNotFound()
        body = served.bodies[name]
        etag, modified = served.etags.get(name), served.modified.get(name)
        validators = {k: v for k, v in (("ETag", etag), ("Last-Modified", modified)) if v}
        asked_etag = request.headers.get("If-None-Match")
        asked_since = request.headers.get("If-Modified-Since")
        # RFC 9110: If-None-Match wins over If-Modified-Since when both are sent
        fresh = asked_etag == etag if asked_etag is not None else (
            asked_since is not None and asked_since == modified)
        if fresh:
            served.seen.append(Seen(request.path, 304, headers))
            return web.Response(status=304, headers=validators)
        served.seen.append(Seen(request.path, 200, headers))
        gate = served.gates.get(name)
        if gate is None:
            return web.Response(body=body, headers=validators)
        response = web.StreamResponse(headers=validators)
        response.content_length = len(body)
        await response.prepare(request)
        half = len(body) // 2
        await response.write(body[:half])
        await gate.wait()
        await response.write(body[half:])
        return response

    app = web.Application()
    app.router.add_get("/{name}", serve)
    server = await aiohttp_server(app, host="127.0.0.1")
    state["origin"] = Origin(server)
    yield state["origin"]
    for gate in state["origin"].gates.values():
        gate.set()


def make_spec(url: str, node: str, **fields: Any) -> Spec:
    """The spec of a create request for a ``web`` process of app ``shop``."""
    body = {"app": "shop", "node": node, "process_type": "web", "source_url": url, **fields}
    return spec_from_request(create_request.validate(body))


def checksum(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def all_running(watchers: list[Watcher]) -> None:
    await asyncio.gather(*(wait_for_state(w, S.RUNNING) for w in watchers))


def cached(agent: Agent) -> list[str]:
    """The names of the files in the agent's source cache."""
    return sorted(path.name for path in agent.cache_dir.iterdir())


# -- one download for many processes -----------------------------------------------------


async def test_ten_processes_created_at_once_download_once(
    agent: Agent, archive_server: ArchiveServer
) -> None:
    """Ten nodes of one app from one URL, created at once, make one request between
    them, even from a server that sends no validators; all ten run."""
    url = archive_server.add("app.tgz", app_archive(SLEEPER))
    watchers = [agent.create(make_spec(url, f"web.{i}")) for i in range(10)]

    await all_running(watchers)

    assert archive_server.hits("app.tgz") == 1
    assert cached(agent) == [f"{cache_key(url, None)}.archive"]


async def test_created_one_after_another_the_archive_is_revalidated(
    agent: Agent, origin: Origin
) -> None:
    """Created one at a time, the processes cost one full download; each later one asks
    with ``If-None-Match`` and gets ``304 Not Modified``."""
    url = origin.add("app.tgz", app_archive(SLEEPER), etag='"v1"')
    for i in range(4):
        await wait_for_state(agent.create(make_spec(url, f"web.{i}")), S.RUNNING)

    assert origin.statuses("app.tgz") == [200, 304, 304, 304]
    assert "If-None-Match" not in origin.seen[0].headers
    assert {seen.headers["If-None-Match"] for seen in origin.seen[1:]} == {'"v1"'}


async def test_last_modified_alone_is_used_too(agent: Agent, origin: Origin) -> None:
    """A server that sends only ``Last-Modified`` is asked with ``If-Modified-Since``."""
    date = "Tue, 01 Dec 2026 18:00:00 GMT"
    url = origin.add("app.tgz", app_archive(SLEEPER), modified=date)
    for i in range(2):
        await wait_for_state(agent.create(make_spec(url, f"web.{i}")), S.RUNNING)

    assert origin.statuses("app.tgz") == [200, 304]
    assert origin.seen[1].headers["If-Modified-Since"] == date


async def test_a_changed_archive_is_downloaded_again_and_only_new_processes_get_it(
    agent: Agent, origin: Origin
) -> None:
    """When the URL serves a new version (a new ``ETag``), the next process downloads and
    runs it; a process created before keeps the version it unpacked."""
    url = origin.add("app.tgz", app_archive(SLEEPER, {"version.txt": "1"}), etag='"v1"')
    old = agent.create(make_spec(url, "web.0"))
    await wait_for_state(old, S.RUNNING)
    origin.add("app.tgz", app_archive(SLEEPER, {"version.txt": "2"}), etag='"v2"')

    new = agent.create(make_spec(url, "web.1"))
    await wait_for_state(new, S.RUNNING)

    assert origin.statuses("app.tgz") == [200, 200]
    assert (old.workdir / "source" / "version.txt").read_text() == "1"
    assert (new.workdir / "source" / "version.txt").read_text() == "2"
    meta = json.loads((agent.cache_dir / f"{cache_key(url, None)}.json").read_text())
    assert meta["etag"] == '"v2"'


async def test_without_validators_each_later_create_downloads_again(
    agent: Agent, archive_server: ArchiveServer
) -> None:
    """A server that sends neither ``ETag`` nor ``Last-Modified`` cannot say whether the
    cached archive is current: a process created later downloads it again."""
    url = archive_server.add("app.tgz", app_archive(SLEEPER))
    for i in range(2):
        await wait_for_state(agent.create(make_spec(url, f"web.{i}")), S.RUNNING)

    assert archive_server.hits("app.tgz") == 2


# -- checksums ------------------------------------------------------------------------------


async def test_with_a_checksum_the_next_create_makes_no_request(
    agent: Agent, origin: Origin
) -> None:
    """An archive stored under its checksum serves every later create of that checksum
    without a request, even from another URL (here one that does not exist)."""
    data = app_archive(SLEEPER)
    url = origin.add("app.tgz", data)
    await wait_for_state(agent.create(make_spec(url, "web.0", checksum=checksum(data))),
                         S.RUNNING)
    missing = str(origin.server.make_url("/nowhere.tgz"))

    for node, source in (("web.1", url), ("web.2", missing)):
        await wait_for_state(
            agent.create(make_spec(source, node, checksum=checksum(data))), S.RUNNING)

    assert [seen.path for seen in origin.seen] == ["/app.tgz"]


async def test_a_checksum_mismatch_is_not_cached(agent: Agent, origin: Origin) -> None:
    """An archive that fails its checksum is not kept: the cache stays empty, and a create
    with the right checksum downloads it afresh."""
    data = app_archive(SLEEPER)
    url = origin.add("app.tgz", data)
    wrong = agent.create(make_spec(url, "web.0", checksum="sha256:" + "0" * 64))
    await wait_for_state(wrong, S.FAILED)
    assert "does not match its checksum" in (wrong.error or "")
    assert cached(agent) == []

    right = agent.create(make_spec(url, "web.1", checksum=checksum(data)))
    await wait_for_state(right, S.RUNNING)

    assert origin.statuses("app.tgz") == [200, 200]
    assert cached(agent) == [f"{cache_key(url, hashlib.sha256(data).hexdigest())}.archive"]


async def test_a_failed_shared_download_fails_every_waiter_and_is_tried_again(
    origin: Origin, tmp_path: Path
) -> None:
    """Concurrent gets of a URL that answers 404 make one request and all fail; the
    failure is not remembered: the next get asks again."""
    url = str(origin.server.make_url("/late.tgz"))
    async with aiohttp.ClientSession() as session:
        cache = SourceCache(tmp_path / "cache", session)
        results = await asyncio.gather(*(cache.get(url) for _ in range(3)),
                                       return_exceptions=True)
        assert all(isinstance(r, DownloadError) and "404" in str(r) for r in results)
        assert origin.statuses("late.tgz") == [404]

        origin.add("late.tgz", b"archive bytes")
        path = await cache.get(url)

    assert path.read_bytes() == b"archive bytes"
    assert origin.statuses("late.tgz") == [404, 200]


# -- a copy per process ---------------------------------------------------------------------


async def test_each_process_has_its_own_copy(agent: Agent, origin: Origin) -> None:
    """Two processes from one cached archive: what one writes into its source folder,
    new files and changes of files in place, the other does not see, and the cached
    archive does not change."""
    procfile = ("web: if [ -n \"$WRITER\" ]; then echo changed > data.txt; "
                "echo new > new.txt; fi; exec sleep 1000\n")
    data = app_archive(procfile, {"data.txt": "original\n"})
    url = origin.add("app.tgz", data, etag='"v1"')
    writer = agent.create(make_spec(url, "web.0", env={"WRITER": "1"}))
    reader = agent.create(make_spec(url, "web.1"))
    await all_running([writer, reader])
    written = writer.workdir / "source"
    await eventually((written / "new.txt").exists, what="the writer's new file")

    assert (written / "data.txt").read_text() == "changed\n"
    other = reader.workdir / "source"
    assert (other / "data.txt").read_text() == "original\n"
    assert not (other / "new.txt").exists()
    assert os.stat(written / "data.txt").st_ino != os.stat(other / "data.txt").st_ino
    (archive,) = agent.cache_dir.glob("*.archive")
    assert archive.read_bytes() == data
    assert origin.statuses("app.tgz") == [200]


# -- garbage collection -----------------------------------------------------------------------


async def test_deletes_remove_unused_archives_but_the_last_few(
    agent: Agent, origin: Origin
) -> None:
    """An archive stays while a process uses it (even a stopped one); once unused, only
    the last KEEP_UNUSED used are kept, and a process created again from one of them (a
    rollback) needs no download."""
    assert KEEP_UNUSED == 3
    datas = [app_archive(SLEEPER, {"version.txt": str(i)}) for i in range(6)]
    urls = [origin.add(f"v{i}.tgz", data) for i, data in enumerate(datas)]
    keys = [cache_key(u, hashlib.sha256(d).hexdigest()) for u, d in zip(urls, datas, strict=True)]
    watchers = []
    for i, (url, data) in enumerate(zip(urls, datas, strict=True)):
        watcher = agent.create(make_spec(url, f"web.{i}", checksum=checksum(data)))
        await wait_for_state(watcher, S.RUNNING)
        watchers.append(watcher)
    await agent.control(watchers[5], "stop")
    assert agent.sources is not None

    for watcher in watchers[:3]:
        await agent.delete(watcher.spec.slug)
    assert agent.sources.keys() == set(keys)  # three unused: all kept

    await agent.delete(watchers[3].spec.slug)
    assert agent.sources.keys() == set(keys[1:])  # the least recently used went

    await agent.delete(watchers[4].spec.slug)
    assert agent.sources.keys() == set(keys[2:])
    assert not list(agent.cache_dir.glob(f"{keys[0]}*"))

    # a rollback to v2, unused but kept: no request
    before = len(origin.seen)
    rollback = agent.create(make_spec(urls[2], "web.back", checksum=checksum(datas[2])))
    await wait_for_state(rollback, S.RUNNING)
    assert len(origin.seen) == before
    assert (rollback.workdir / "source" / "version.txt").read_text() == "2"


async def test_a_new_agent_reuses_the_cache_and_drops_partial_files(
    settings: Settings, origin: Origin
) -> None:
    """The cache is in the state folder: a new agent serves a checksum from it without a
    request, and removes a partial file left by a killed download."""
    data = app_archive(SLEEPER)
    url = origin.add("app.tgz", data)
    async with Agent(settings) as first:
        watcher = first.create(make_spec(url, "web.0", checksum=checksum(data)))
        await wait_for_state(watcher, S.RUNNING)
        await first.delete(watcher.spec.slug)
        leftover = first.cache_dir / "url-x.0123.part"
        leftover.write_bytes(b"half an archive")

    async with Agent(settings) as second:
        assert not leftover.exists()
        watcher = second.create(make_spec(url, "web.1", checksum=checksum(data)))
        await wait_for_state(watcher, S.RUNNING)

    assert origin.statuses("app.tgz") == [200]


# -- progress -----------------------------------------------------------------------------------


async def test_download_progress_is_in_the_status_document(
    client: Client, agent: Agent, origin: Origin
) -> None:
    """While ``downloading``, ``download`` holds the bytes received and the total the
    server announced; a second process of the same URL joins the download and shows the
    same progress; once the body is complete both run, on one request, and ``download``
    is ``null``."""
    data = app_archive(SLEEPER, {"padding.bin": os.urandom(64 * 1024)})
    url = origin.add("slow.tgz", data, slow=True)
    half = len(data) // 2
    first = agent.create(make_spec(url, "web.0"))

    def halfway(watcher: Watcher) -> bool:
        progress = watcher.info().download
        return progress is not None and progress.bytes == half

    await eventually(lambda: halfway(first), what="half the body to arrive")
    second = agent.create(make_spec(url, "web.1"))
    await eventually(lambda: halfway(second), what="the second process to join")
    for watcher in (first, second):
        response = await client.get(f"/process-status/{watcher.spec.slug}")
        document = await response.json()
        assert document["state"] == "downloading"
        assert document["download"] == {"bytes": half, "total": len(data)}

    origin.gates["slow.tgz"].set()
    await all_running([first, second])

    assert origin.statuses("slow.tgz") == [200]
    response = await client.get(f"/process-status/{first.spec.slug}")
    assert (await response.json())["download"] is None


async def test_a_stop_leaves_a_shared_download_to_the_others(
    agent: Agent, origin: Origin
) -> None:
    """Stopping one of two processes waiting for a download does not cancel it; stopping
    the last one does, and leaves no partial file."""
    url = origin.add("slow.tgz", app_archive(SLEEPER), slow=True)
    quitter, stayer = (agent.create(make_spec(url, f"web.{i}")) for i in range(2))
    await eventually(lambda: bool(list(agent.cache_dir.glob("*.part"))),
                     what="the download to begin")

    await quitter.stop()
    origin.gates["slow.tgz"].set()
    await wait_for_state(stayer, S.RUNNING)
    assert origin.statuses("slow.tgz") == [200]

    late = origin.add("late.tgz", app_archive(SLEEPER), slow=True)
    alone = agent.create(make_spec(late, "web.2"))
    await eventually(lambda: bool(list(agent.cache_dir.glob("*.part"))),
                     what="the second download to begin")
    await alone.stop()
    assert list(agent.cache_dir.glob("*.part")) == []
    assert alone.state is S.STOPPED
