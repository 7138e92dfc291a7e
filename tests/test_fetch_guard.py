"""Fetching under the fetch policy, for real: a server on 127.0.0.1, host names resolved
by a stand-in DNS, redirects, encoded bodies, time limits, and file:// sources."""

from __future__ import annotations

import asyncio
import gzip
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestServer

from smartmob_agent.errors import DownloadError
from smartmob_agent.sources.download import DownloadLimits, download, open_session
from smartmob_agent.sources.fetchpolicy import FetchPolicy

BODY = b"the archive " * 1000


class StandInResolver(AbstractResolver):
    """A DNS of a few names: each maps to a series of answers, one per lookup (the last
    one repeats), so a name can change its address between two lookups (rebinding)."""

    def __init__(self, answers: dict[str, list[list[str]]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.asked.append(host)
        series = self.answers.get(host)
        if not series:
            raise OSError(f"no such host {host!r}")
        addresses = series.pop(0) if len(series) > 1 else series[0]
        return [
            {"hostname": host, "host": address, "port": port, "proto": 0, "flags": 0,
             "family": socket.AF_INET6 if ":" in address else socket.AF_INET}
            for address in addresses
        ]

    async def close(self) -> None:
        pass


@dataclass
class Server:
    """The origin: records each request's path and Authorization header."""

    server: TestServer
    seen: list[tuple[str, str | None]] = field(default_factory=list)

    @property
    def port(self) -> int:
        port = self.server.port
        assert port is not None
        return port

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def paths(self) -> list[str]:
        return [path for path, _ in self.seen]


@pytest.fixture
async def origin(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> Server:
    state: dict[str, Server] = {}

    async def archive(request: web.Request) -> web.StreamResponse:
        return web.Response(body=BODY)

    async def redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(request.query["to"])

    async def no_location(request: web.Request) -> web.StreamResponse:
        return web.Response(status=302)

    async def chain(request: web.Request) -> web.StreamResponse:
        left = int(request.match_info["left"])
        if left == 0:
            return web.Response(body=BODY)
        raise web.HTTPTemporaryRedirect(f"/chain/{left - 1}")  # relative: joined

    async def encoded(request: web.Request) -> web.StreamResponse:
        size = int(request.match_info["size"])
        return web.Response(
            body=gzip.compress(b"\0" * size), headers={"Content-Encoding": "gzip"}
        )

    async def trickle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 1000
        await response.prepare(request)
        for _ in range(1000):
            await response.write(b"x")
            await asyncio.sleep(0.05)
        return response

    @web.middleware
    async def record(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        state["server"].seen.append((request.path, request.headers.get("Authorization")))
        return await handler(request)

    app = web.Application(middlewares=[record])
    app.router.add_get("/app.tgz", archive)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/no-location", no_location)
    app.router.add_get("/chain/{left}", chain)
    app.router.add_get("/encoded/{size}", encoded)
    app.router.add_get("/trickle", trickle)
    server = await aiohttp_server(app, host="127.0.0.1")
    state["server"] = Server(server)
    return state["server"]


def guarded(
    answers: dict[str, list[list[str]]] | None = None, policy: FetchPolicy | None = None
) -> tuple[aiohttp.ClientSession, StandInResolver]:
    """A session as the agent makes it, on the stand-in DNS."""
    resolver = StandInResolver(answers or {})
    return open_session(policy or FetchPolicy(), resolver=resolver), resolver


async def refused(
    session: aiohttp.ClientSession, url: str, dest: Path, *fragments: str,
    policy: FetchPolicy | None = None, limits: DownloadLimits | None = None,
) -> str:
    """download() must fail naming ``fragments``, and leave no file."""
    with pytest.raises(DownloadError) as caught:
        await download(
            session, url, dest, policy=policy or FetchPolicy(),
            limits=limits or DownloadLimits(),
        )
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, message
    assert_no_file(dest)
    return message


def assert_no_file(path: Path) -> None:
    """Nothing, not even a dangling link, is at ``path``."""
    assert not os.path.lexists(path)


# -- what a host name resolves to, checked at connect time -------------------------------


async def test_a_name_resolving_to_the_metadata_address_is_refused(
    origin: Server, tmp_path: Path
) -> None:
    """A host name whose address is 169.254.169.254 is refused when connecting: the
    literal host looked harmless, the address is what counts."""
    session, resolver = guarded({"metadata.test": [["169.254.169.254"]]})
    async with session:
        await refused(
            session, origin.url("/app.tgz", "metadata.test"), tmp_path / "part",
            "the host 'metadata.test' resolves to a refused address: 169.254.169.254 is a "
            "link-local address",
        )
    assert resolver.asked == ["metadata.test"]


@pytest.mark.parametrize(
    "addresses",
    [
        pytest.param(["127.0.0.1", "169.254.169.254"], id="one-good-one-bad"),
        pytest.param(["fe80::1"], id="ipv6-link-local"),
        pytest.param(["fd00:ec2::254"], id="aws-ipv6-metadata"),
        pytest.param(["::ffff:169.254.169.254"], id="ipv4-mapped"),
    ],
)
async def test_any_refused_address_among_the_answers_refuses_the_name(
    origin: Server, tmp_path: Path, addresses: list[str]
) -> None:
    """A name with a refused address among its answers is refused whole."""
    session, _ = guarded({"mixed.test": [addresses]})
    async with session:
        await refused(session, origin.url("/app.tgz", "mixed.test"), tmp_path / "part",
                      "resolves to a refused address")
    assert origin.seen == []


async def test_a_name_resolving_to_loopback_is_fetched(origin: Server, tmp_path: Path) -> None:
    """Loopback stays allowed: the agent fetches from its own machine (tests, uploads)."""
    session, _ = guarded({"app.test": [["127.0.0.1"]]})
    async with session:
        size = await download(session, origin.url("/app.tgz", "app.test"), tmp_path / "part")
    assert size == len(BODY)
    assert (tmp_path / "part").read_bytes() == BODY


async def test_rebinding_after_the_check_is_caught_at_connect(
    origin: Server, tmp_path: Path
) -> None:
    """A name that resolved to loopback (when the URL was accepted, and for a first
    download) and then to the metadata address is refused on the next connection: the
    check is the resolution the connection uses, not an earlier one."""
    answers = {"rebind.test": [["127.0.0.1"], ["169.254.169.254"]]}
    url = origin.url("/app.tgz", "rebind.test")
    assert FetchPolicy().check_url(url) is None  # what create checks: the URL alone
    first, resolver = guarded(answers)
    async with first:
        await download(first, url, tmp_path / "first")
    second = open_session(FetchPolicy(), resolver=resolver)
    async with second:
        await refused(second, url, tmp_path / "second", "169.254.169.254 is a link-local")
    assert resolver.asked == ["rebind.test", "rebind.test"]


async def test_a_literal_metadata_address_is_refused_before_any_connection(
    tmp_path: Path,
) -> None:
    """An address in the URL is refused from the URL (no resolver, no connection)."""
    async with aiohttp.ClientSession() as session:
        await refused(session, "http://169.254.169.254/latest/meta-data/", tmp_path / "p",
                      "169.254.169.254 is a link-local address")


# -- redirects ---------------------------------------------------------------------------


async def test_a_chain_of_redirects_is_followed(origin: Server, tmp_path: Path) -> None:
    """Up to ten redirects (relative ones joined to the URL) are followed."""
    session, _ = guarded()
    async with session:
        size = await download(session, origin.url("/chain/10"), tmp_path / "part")
    assert size == len(BODY)
    assert origin.paths() == [f"/chain/{n}" for n in range(10, -1, -1)]


async def test_more_than_ten_redirects_fail(origin: Server, tmp_path: Path) -> None:
    session, _ = guarded()
    async with session:
        await refused(session, origin.url("/chain/11"), tmp_path / "part",
                      "more than 10 redirects (the limit)")
    assert len(origin.seen) == 11


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        pytest.param("http://169.254.169.254/latest/meta-data/",
                     "169.254.169.254 is a link-local address", id="metadata"),
        pytest.param("http://[fd00:ec2::254]/latest/", "cloud metadata", id="aws-ipv6"),
        pytest.param("file:///etc/passwd", "a redirect to a file:// URL is never followed",
                     id="file"),
        pytest.param("gopher://127.0.0.1:6379/_x", "gopher:// is not allowed", id="gopher"),
    ],
)
async def test_a_redirect_is_checked_like_the_url(
    origin: Server, tmp_path: Path, target: str, reason: str
) -> None:
    """A redirect to a refused URL is not followed, and says where it led."""
    session, _ = guarded()
    policy = FetchPolicy(file_root=PurePosixPath("/"))  # even with every file allowed
    async with session:
        url = str(origin.server.make_url("/redirect").with_query(to=target))
        await refused(session, url, tmp_path / "part", "it redirects to ", "which is refused",
                      reason, policy=policy)


async def test_a_redirect_to_a_name_resolving_to_metadata_is_refused(
    origin: Server, tmp_path: Path
) -> None:
    session, _ = guarded({"metadata.test": [["169.254.169.254"]]})
    async with session:
        url = str(origin.server.make_url("/redirect").with_query(
            to=origin.url("/app.tgz", "metadata.test")))
        await refused(session, url, tmp_path / "part", "'metadata.test' resolves to a refused")


async def test_a_redirect_off_the_allow_list_is_refused(origin: Server, tmp_path: Path) -> None:
    """With an allow-list, a redirect must stay on it too."""
    session, _ = guarded({"other.test": [["127.0.0.1"]]})
    policy = FetchPolicy(allow=("127.0.0.1",))
    async with session:
        url = str(origin.server.make_url("/redirect").with_query(
            to=origin.url("/app.tgz", "other.test")))
        await refused(session, url, tmp_path / "part",
                      "the host 'other.test' is not on the allow-list", policy=policy)
    assert origin.paths() == ["/redirect"]


async def test_a_redirect_without_location_fails(origin: Server, tmp_path: Path) -> None:
    session, _ = guarded()
    async with session:
        await refused(session, origin.url("/no-location"), tmp_path / "part",
                      "answered 302 (a redirect) without a Location")


async def test_credentials_go_to_their_own_origin_only(origin: Server, tmp_path: Path) -> None:
    """The user and password of the URL are sent to its origin, also after a redirect
    there, never to another origin a redirect leads to."""
    session, _ = guarded({"other.test": [["127.0.0.1"]]})
    creds = origin.url("/redirect").replace("http://", "http://user:pw@")
    async with session:
        await download(session, f"{creds}?to=/app.tgz", tmp_path / "same")
        elsewhere = origin.url("/app.tgz", "other.test")
        await download(session, f"{creds}?to={elsewhere}", tmp_path / "other")
    auth = [header for _, header in origin.seen]
    assert auth[0] is not None
    assert auth[0].startswith("Basic ")
    assert auth[1] == auth[0]  # same origin
    assert auth[2] == auth[0]
    assert auth[3] is None  # another origin


# -- bodies and time ---------------------------------------------------------------------


async def test_an_encoded_body_is_counted_decoded(origin: Server, tmp_path: Path) -> None:
    """A gzip Content-Encoding of 2 MB of zeros (2 KB on the wire) passes a limit of
    1 MB on the wire, but not once decoded; under the limit the decoded size is written."""
    session, _ = guarded()
    limits = DownloadLimits(max_bytes=1_000_000)
    async with session:
        await refused(session, origin.url("/encoded/2000000"), tmp_path / "part",
                      "over the limit of 1000000 bytes", limits=limits)
        size = await download(session, origin.url("/encoded/900000"), tmp_path / "ok",
                              limits=limits)
    assert size == 900_000
    assert (tmp_path / "ok").read_bytes() == b"\0" * 900_000


async def test_the_total_time_limit_stops_a_trickle(origin: Server, tmp_path: Path) -> None:
    """A body that never stalls but takes too long is stopped at the total limit, and the
    message names that limit (not the stall one)."""
    session, _ = guarded()
    async with session:
        await refused(session, origin.url("/trickle"), tmp_path / "part",
                      "it took more than 0.5 s in all (the time limit)",
                      limits=DownloadLimits(stall=10, total=0.5))


async def test_the_total_time_limit_covers_every_redirect(
    origin: Server, tmp_path: Path
) -> None:
    """One deadline for the whole download: redirects do not restart it."""
    session, _ = guarded()
    async with session:
        url = str(origin.server.make_url("/redirect").with_query(to="/trickle"))
        await refused(session, url, tmp_path / "part", "(the time limit)",
                      limits=DownloadLimits(stall=10, total=0.5))


# -- file:// sources ---------------------------------------------------------------------


@pytest.fixture
def releases(tmp_path: Path) -> Path:
    """A folder of file sources, with a secret beside it."""
    folder = tmp_path / "releases"
    (folder / "shop").mkdir(parents=True)
    (folder / "shop" / "app.tgz").write_bytes(BODY)
    (tmp_path / "secret").write_bytes(b"secret")
    return folder


def files(root: Path) -> FetchPolicy:
    return FetchPolicy(file_root=PurePosixPath(root))


async def test_a_file_source_is_copied(releases: Path, tmp_path: Path) -> None:
    """A file under the folder is copied, with progress reported."""
    seen: list[tuple[int, int | None]] = []
    async with aiohttp.ClientSession() as session:
        size = await download(
            session, f"file://{releases}/shop/app.tgz", tmp_path / "part",
            policy=files(releases), progress=lambda done, total: seen.append((done, total)),
        )
    assert size == len(BODY)
    assert (tmp_path / "part").read_bytes() == BODY
    assert seen[0] == (0, len(BODY))
    assert seen[-1] == (len(BODY), len(BODY))


@pytest.mark.parametrize(
    ("setup", "path", "reason"),
    [
        pytest.param(lambda r: os.symlink(r.parent / "secret", r / "link"), "link",
                     "symbolic link", id="symlink-out"),
        pytest.param(lambda r: os.symlink("shop/app.tgz", r / "inner"), "inner",
                     "symbolic link", id="symlink-even-inside"),
        pytest.param(lambda r: os.symlink(r.parent, r / "up"), "up/secret",
                     "symbolic link", id="symlinked-folder"),
        pytest.param(lambda r: os.mkfifo(r / "pipe"), "pipe", "not a regular file",
                     id="fifo"),
        pytest.param(lambda r: None, "shop", "not a regular file", id="folder"),
        pytest.param(lambda r: None, "missing.tgz", "No such file", id="missing"),
        pytest.param(lambda r: None, "../secret", "without '.', '..'", id="dotdot"),
    ],
)
async def test_file_sources_refuse_links_specials_and_escapes(
    releases: Path, tmp_path: Path, setup: Callable[[Path], object], path: str, reason: str
) -> None:
    """No symbolic link is followed under the folder, nothing but a regular file is read
    (a fifo would block forever), and nothing outside the folder."""
    setup(releases)
    async with aiohttp.ClientSession() as session:
        message = await refused(session, f"file://{releases}/{path}", tmp_path / "part",
                                "reading file://", reason, policy=files(releases))
    assert "secret" not in (tmp_path / "part").name
    assert message.startswith("reading ")


async def test_file_sources_need_the_flag(releases: Path, tmp_path: Path) -> None:
    async with aiohttp.ClientSession() as session:
        await refused(session, f"file://{releases}/shop/app.tgz", tmp_path / "part",
                      "--allow-file-sources")


async def test_a_file_source_over_the_size_limit_is_refused(
    releases: Path, tmp_path: Path
) -> None:
    async with aiohttp.ClientSession() as session:
        await refused(session, f"file://{releases}/shop/app.tgz", tmp_path / "part",
                      f"is {len(BODY)} bytes, over the limit of 100",
                      policy=files(releases), limits=DownloadLimits(max_bytes=100))


async def test_a_file_source_stopped_by_the_time_limit_leaves_nothing(
    releases: Path, tmp_path: Path
) -> None:
    """The copy runs in a thread: the time limit stops it, waits for it, and removes the
    partial file."""
    os.truncate(releases / "shop" / "app.tgz", 200 << 20)  # sparse: quick to make
    async with aiohttp.ClientSession() as session:
        await refused(session, f"file://{releases}/shop/app.tgz", tmp_path / "part",
                      "(the time limit)", policy=files(releases),
                      limits=DownloadLimits(total=0.01, max_bytes=1 << 30))
