"""Access control (issue 5): admin, app and minted keys, the open health check, the
slowing down of guessers, and secrets kept out of logs and children."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from yarl import URL

from smartmob_agent.config import Settings, settings_from
from smartmob_agent.errors import InvalidRequest
from smartmob_agent.keys import Keyring, MintedKey, Principal, digest
from smartmob_agent.store import Store, StoreError
from smartmob_agent.supervision.agent import Agent
from smartmob_agent.web import api
from smartmob_agent.web import events as eventsocket
from smartmob_agent.web.access import FailureLimiter
from smartmob_agent.web.api import AGENT_KEY, principal
from smartmob_agent.web.events import EVENT_BUS_KEY
from smartmob_agent.web.server import (
    LIMITER_KEY,
    SETTINGS_KEY,
    access_middleware,
    error_middleware,
    make_app,
)
from tests.conftest import ArchiveServer
from tests.helpers import app_archive

ADMIN = "admin-key-0123456789abcdef"
WEB_KEY = "web-app-key-0123456789abcdef"
WRONG = "wrong-key-0123456789abcdef"

Client = TestClient[Any, Any]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def identified(ring: Keyring, key: str) -> Principal:
    """Whom ``ring`` says ``key`` comes from (a key it does not know fails the test)."""
    who = ring.identify(key)
    assert who is not None, "the keyring does not know the key"
    return who


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Keys configured; conftest's agent and client fixtures use these settings."""
    return Settings(
        host="127.0.0.1", port=0, state_dir=tmp_path / "state", stop_timeout=5.0,
        token=(ADMIN,), app_token=(("web", WEB_KEY),),
    )


def create_body(archive_server: ArchiveServer, app: str, node: str = "web.0",
                **extra: Any) -> dict[str, Any]:
    url = archive_server.add("app.tar.gz", app_archive("web: {PYTHON} -c 'input()'\n"))
    # created stopped: nothing is downloaded or run, which these tests do not need
    return {"app": app, "node": node, "process_type": "web", "source_url": url,
            "autostart": False, **extra}


async def create(client: Client, body: dict[str, Any], key: str = ADMIN) -> Any:
    response = await client.post("/create-process", json=body, headers=bearer(key))
    assert response.status == 201, await response.text()
    return await response.json()


# -- admin key -------------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [
    {}, bearer(WRONG), {"Authorization": f"Basic {ADMIN}"}, {"Authorization": "Bearer"},
])
async def test_a_request_without_a_known_key_is_401_json_and_says_nothing_more(
    client: Client, headers: dict[str, str]
) -> None:
    for path in ("/", "/list-processes", "/process-status/web.web.0", "/no-such-route"):
        response = await client.get(path, headers=headers)
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        body = await response.json()
        assert set(body) == {"error"}
        assert "Authorization: Bearer" in body["error"]


async def test_the_admin_key_opens_everything(client: Client) -> None:
    response = await client.get("/", headers=bearer(ADMIN))
    assert response.status == 200
    assert "tokens" in await response.json()
    response = await client.get("/list-tokens", headers=bearer(ADMIN))
    assert response.status == 200
    assert await response.json() == {"tokens": []}


async def test_the_health_check_needs_no_key(client: Client) -> None:
    response = await client.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}


async def test_a_key_in_the_query_is_accepted_only_on_a_websocket(client: Client) -> None:
    response = await client.get(f"/list-processes?token={ADMIN}")
    assert response.status == 401
    async with client.ws_connect(f"/events?token={ADMIN}") as ws:
        assert not ws.closed
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect(f"/events?token={WRONG}")
    assert refused.value.status == 401
    async with client.ws_connect("/events", headers=bearer(ADMIN)) as ws:
        assert not ws.closed


# -- app keys --------------------------------------------------------------------------------

async def test_an_app_key_sees_only_its_app(
    client: Client, archive_server: ArchiveServer
) -> None:
    await create(client, create_body(archive_server, "web"))
    await create(client, create_body(archive_server, "billing"))
    listing = await (await client.get("/list-processes", headers=bearer(WEB_KEY))).json()
    assert [p["slug"] for p in listing["processes"]] == ["web.web.0"]
    ok = await client.get("/process-status/web.web.0", headers=bearer(WEB_KEY))
    assert ok.status == 200
    # another app's process is "not found", exactly like one that does not exist
    other = await client.get("/process-status/billing.web.0", headers=bearer(WEB_KEY))
    missing = await client.get("/process-status/nobody.web.0", headers=bearer(WEB_KEY))
    assert other.status == missing.status == 404
    assert (await other.json())["error"].replace("billing", "X") == (
        (await missing.json())["error"].replace("nobody", "X")
    )
    for path in ("/delete-process/billing.web.0", "/start-process/billing.web.0"):
        assert (await client.post(path, headers=bearer(WEB_KEY))).status == 404
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect("/attach-console/billing.web.0", headers=bearer(WEB_KEY))
    assert refused.value.status == 404
    # the admin still sees both
    listing = await (await client.get("/list-processes", headers=bearer(ADMIN))).json()
    assert len(listing["processes"]) == 2


async def test_an_app_key_creates_and_acts_on_its_app_only(
    client: Client, archive_server: ArchiveServer
) -> None:
    await create(client, create_body(archive_server, "web"), key=WEB_KEY)
    response = await client.post(
        "/create-process", json=create_body(archive_server, "billing"), headers=bearer(WEB_KEY)
    )
    assert response.status == 403
    assert "'web'" in (await response.json())["error"]
    response = await client.post("/stop-processes", json={"all": True}, headers=bearer(WEB_KEY))
    assert response.status == 403
    response = await client.post(
        "/stop-processes", json={"app": "billing"}, headers=bearer(WEB_KEY)
    )
    assert response.status == 403
    response = await client.post("/stop-processes", json={"app": "web"}, headers=bearer(WEB_KEY))
    assert response.status == 200
    for path in ("/list-tokens",):
        response = await client.get(path, headers=bearer(WEB_KEY))
        assert response.status == 403
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect("/events?app=billing", headers=bearer(WEB_KEY))
    assert refused.value.status == 403
    response = await client.post("/delete-process/web.web.0", headers=bearer(WEB_KEY))
    assert response.status == 200


async def test_an_app_key_hears_the_events_of_its_app_only(
    client: Client, archive_server: ArchiveServer
) -> None:
    async with client.ws_connect("/events", headers=bearer(WEB_KEY)) as ws:
        await create(client, create_body(archive_server, "billing"))
        await create(client, create_body(archive_server, "web"))
        for slug in ("billing.web.0", "web.web.0"):  # a start makes events
            response = await client.post(f"/start-process/{slug}", headers=bearer(ADMIN))
            assert response.status == 200
        event = await ws.receive_json(timeout=10)
        assert event["slug"] == "web.web.0", event


# -- minted keys -----------------------------------------------------------------------------

async def test_a_minted_key_is_shown_once_scoped_to_its_app_and_revocable(
    client: Client, archive_server: ArchiveServer
) -> None:
    created = await create(client, create_body(archive_server, "shop", issue_token=True))
    token = created["token"]
    assert token["app"] == "shop"
    assert token["key"].startswith("smk_")
    key = token["key"]
    status = await client.get("/process-status/shop.web.0", headers=bearer(key))
    assert status.status == 200
    assert "token" not in await status.json()  # shown once, at creation only
    listing = await (await client.get("/list-processes", headers=bearer(key))).json()
    assert [p["slug"] for p in listing["processes"]] == ["shop.web.0"]
    assert (await client.get("/list-tokens", headers=bearer(key))).status == 403
    # the admin lists it, without the key
    tokens = await (await client.get("/list-tokens", headers=bearer(ADMIN))).json()
    [listed] = tokens["tokens"]
    assert listed["id"] == token["id"]
    assert listed["app"] == "shop"
    assert key not in str(tokens)
    revoke = URL(listed["revoke"]).path
    response = await client.post(revoke, headers=bearer(ADMIN))
    assert response.status == 200
    assert (await client.get("/", headers=bearer(key))).status == 401
    response = await client.post(revoke, headers=bearer(ADMIN))
    assert response.status == 404


async def test_a_create_whose_key_cannot_be_written_is_not_done(
    client: Client, archive_server: ArchiveServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A create with ``issue_token`` whose key cannot be recorded is a 503 that leaves no
    process behind, so sending it again works (the create is whole or not done)."""
    original = Store.add_key

    def full_disk(store: Store, *args: Any, **kwargs: Any) -> None:
        raise StoreError(f"the state database {store.path} cannot be written: disk full")

    monkeypatch.setattr(Store, "add_key", full_disk)
    body = create_body(archive_server, "shop", issue_token=True)
    response = await client.post("/create-process", json=body, headers=bearer(ADMIN))
    assert response.status == 503, await response.text()
    assert "disk full" in (await response.json())["error"]
    status = await client.get("/process-status/shop.web.0", headers=bearer(ADMIN))
    assert status.status == 404
    monkeypatch.setattr(Store, "add_key", original)
    created = await create(client, body)
    assert created["token"]["app"] == "shop"


async def test_a_create_that_is_refused_keeps_no_key(
    client: Client, archive_server: ArchiveServer
) -> None:
    """A create with ``issue_token`` that is refused (the slug exists) mints no key that
    would outlive it."""
    await create(client, create_body(archive_server, "shop", issue_token=True))
    body = create_body(archive_server, "shop", issue_token=True)
    response = await client.post("/create-process", json=body, headers=bearer(ADMIN))
    assert response.status == 409
    tokens = await (await client.get("/list-tokens", headers=bearer(ADMIN))).json()
    assert len(tokens["tokens"]) == 1


async def test_minted_keys_survive_an_agent_restart_as_digests_only(
    settings: Settings, archive_server: ArchiveServer,
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> None:
    async with Agent(settings) as first:
        client = await aiohttp_client(make_app(settings, first))
        key = (await create(client, create_body(archive_server, "shop", issue_token=True)))[
            "token"]["key"]
        await client.close()
    database = (settings.state_dir / "agent.db").read_bytes()
    assert key.encode() not in database
    assert digest(key) in database
    async with Agent(settings) as second:
        client = await aiohttp_client(make_app(settings, second))
        response = await client.get("/process-status/shop.web.0", headers=bearer(key))
        assert response.status == 200
        await client.close()


async def test_an_agent_without_keys_is_open(
    tmp_path: Path, aiohttp_client: Callable[..., Awaitable[Client]]
) -> None:
    settings = Settings(host="127.0.0.1", port=0, state_dir=tmp_path / "state")
    async with Agent(settings) as agent:
        client = await aiohttp_client(make_app(settings, agent))
        assert (await client.get("/")).status == 200


# -- guessers --------------------------------------------------------------------------------

async def test_repeated_wrong_keys_are_refused_for_a_while(client: Client) -> None:
    statuses = [(await client.get("/", headers=bearer(WRONG))).status for _ in range(12)]
    assert statuses[:10] == [401] * 10
    assert statuses[10:] == [429, 429]
    # while slowed down, even the right key is not checked
    response = await client.get("/", headers=bearer(ADMIN))
    assert response.status == 429
    assert int(response.headers["Retry-After"]) >= 1
    assert "try again" in (await response.json())["error"]
    # the health check stays open
    assert (await client.get("/healthz")).status == 200


def test_the_failure_limiter_refills_and_stays_bounded() -> None:
    now = [0.0]
    limiter = FailureLimiter(burst=3, refill=10.0, max_addresses=2, clock=lambda: now[0])
    for _ in range(3):
        assert limiter.retry_after("a") == 0
        limiter.failed("a")
    assert limiter.retry_after("a") == pytest.approx(10.0)
    now[0] = 5.0
    assert limiter.retry_after("a") == pytest.approx(5.0)
    now[0] = 10.0
    assert limiter.retry_after("a") == 0
    assert limiter.retry_after("b") == 0  # another address is not affected
    limiter.failed("b")
    limiter.failed("c")  # a third address: the least recent one is forgotten
    assert limiter.retry_after("a") == 0
    assert len(limiter._buckets) == 2


def test_ipv6_addresses_of_one_64_share_a_bucket() -> None:
    limiter = FailureLimiter(burst=2, refill=10.0, clock=lambda: 0.0)
    limiter.failed("2001:db8:0:1::1")
    limiter.failed("2001:db8:0:1::2")  # another address of the same /64
    assert limiter.retry_after("2001:db8:0:1::3") > 0
    assert limiter.retry_after("2001:db8:0:2::1") == 0  # another /64
    assert limiter.retry_after("::ffff:192.0.2.1") == 0  # mapped IPv4 counts alone


def test_the_keyring_knows_each_kind_of_key() -> None:
    minted = MintedKey("id1", "shop", digest("smk_minted-key-123456789"), 1.0)
    ring = Keyring([ADMIN], {WEB_KEY: "web"}, [minted])
    assert ring.enabled
    assert identified(ring, ADMIN).is_admin
    assert identified(ring, WEB_KEY).app == "web"
    assert identified(ring, "smk_minted-key-123456789").app == "shop"
    assert ring.identify(WRONG) is None
    assert ring.identify(ADMIN[:-1]) is None
    assert not Keyring().enabled


# -- configuration ---------------------------------------------------------------------------

def test_keys_never_appear_in_settings_repr_or_errors() -> None:
    settings = settings_from({"token": [ADMIN], "app_token": [f"web={WEB_KEY}"]}, {})
    assert settings.token == (ADMIN,)
    assert ADMIN not in repr(settings)
    assert WEB_KEY not in repr(settings)
    with pytest.raises(InvalidRequest) as error:
        settings_from({"token": ["short secret"]}, {})
    assert "short secret" not in str(error.value)
    with pytest.raises(InvalidRequest) as error:
        settings_from({"app_token": ["no-equals-sign-0123456789"]}, {})
    assert "0123456789" not in str(error.value)


async def test_key_files_are_read_and_a_bad_line_is_named_not_shown(tmp_path: Path) -> None:
    admin_file = tmp_path / "admin.keys"
    admin_file.write_text(f"# the admin key\n\n{ADMIN}\n")
    apps_file = tmp_path / "app.keys"
    apps_file.write_text(f"web={WEB_KEY}\n")
    settings = Settings(state_dir=tmp_path / "s", token_file=admin_file,
                        app_tokens_file=apps_file)
    ring = Agent(settings).keyring
    assert identified(ring, ADMIN).is_admin
    assert identified(ring, WEB_KEY).app == "web"
    apps_file.write_text("web=short\n")
    with pytest.raises(InvalidRequest) as error:
        Agent(settings)
    assert "line 1" in str(error.value)
    assert "short" not in str(error.value).split(":")[-1]
    bad = dataclasses.replace(settings, app_tokens_file=tmp_path / "missing")
    with pytest.raises(InvalidRequest, match="cannot read the key file"):
        Agent(bad)


# -- what the review found ------------------------------------------------------------------

async def test_the_query_key_is_read_only_on_socket_routes_and_plainly_spelled(
    client: Client,
) -> None:
    """An Upgrade header does not make ?token= work on an ordinary route, and an escaped
    parameter name (which the log filter would not see) is not read at all."""
    upgrade = {"Upgrade": "websocket", "Connection": "Upgrade"}
    response = await client.get(f"/list-processes?token={ADMIN}", headers=upgrade)
    assert response.status == 401
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect(URL(f"/events?%74oken={ADMIN}", encoded=True))
    assert refused.value.status == 401


async def test_revoking_a_minted_key_closes_the_sockets_it_opened(
    client: Client, archive_server: ArchiveServer
) -> None:
    created = await create(client, create_body(archive_server, "shop", issue_token=True))
    key, key_id = created["token"]["key"], created["token"]["id"]
    events = await client.ws_connect(f"/events?token={key}")
    attach = await client.ws_connect(f"/attach-console/shop.web.0?token={key}")
    admin_events = await client.ws_connect("/events", headers=bearer(ADMIN))

    async def close_code(ws: aiohttp.ClientWebSocketResponse) -> int | None:
        # reading all along, as a client does, so it answers the close handshake
        async with asyncio.timeout(10):
            while (await ws.receive()).type != aiohttp.WSMsgType.CLOSE:
                pass
        return ws.close_code

    closing = [asyncio.ensure_future(close_code(ws)) for ws in (events, attach)]
    response = await client.post(f"/revoke-token/{key_id}", headers=bearer(ADMIN))
    assert response.status == 200
    assert await asyncio.gather(*closing) == [aiohttp.WSCloseCode.POLICY_VIOLATION] * 2
    assert not admin_events.closed  # the admin's socket stays
    await admin_events.close()


async def test_only_an_admin_key_mints_and_only_on_an_agent_with_keys(
    client: Client, archive_server: ArchiveServer, tmp_path: Path,
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> None:
    """A key that could breed keys would outlive its own revocation."""
    body = create_body(archive_server, "web", issue_token=True)
    response = await client.post("/create-process", json=body, headers=bearer(WEB_KEY))
    assert response.status == 403
    assert "admin" in (await response.json())["error"]
    assert (await client.get("/process-status/web.web.0", headers=bearer(ADMIN))).status == 404
    settings = Settings(host="127.0.0.1", port=0, state_dir=tmp_path / "open")
    async with Agent(settings) as open_agent:
        open_client = await aiohttp_client(make_app(settings, open_agent))
        response = await open_client.post("/create-process", json=body)
        assert response.status == 400
        assert "issue_token" in (await response.json())["fields"]
        assert open_agent.list() == []


@pytest.fixture
async def keyless(
    tmp_path: Path, aiohttp_client: Callable[..., Awaitable[Client]]
) -> AsyncIterator[Client]:
    settings = Settings(host="127.0.0.1", port=0, state_dir=tmp_path / "keyless")
    async with Agent(settings) as agent:
        yield await aiohttp_client(make_app(settings, agent))


@pytest.mark.parametrize("headers", [
    pytest.param({"Origin": "http://evil.example"}, id="cross-origin"),
    pytest.param({"Origin": "null"}, id="sandboxed-page"),
    pytest.param({"Host": "rebind.evil.example:8080"}, id="dns-rebinding"),
])
async def test_an_agent_without_keys_refuses_what_a_web_page_could_send(
    keyless: Client, archive_server: ArchiveServer, headers: dict[str, str]
) -> None:
    """Any page the user visits can POST to 127.0.0.1 (a text/plain "simple" request needs
    no preflight) or reach it under its own name by DNS rebinding: without keys, those
    are refused, and nothing is created."""
    body = json.dumps(create_body(archive_server, "csrf"))
    response = await keyless.post(
        "/create-process", data=body, headers={"Content-Type": "text/plain", **headers}
    )
    assert response.status == 403
    assert "keys" in (await response.json())["error"]
    listing = await (await keyless.get("/list-processes")).json()
    assert listing["processes"] == []
    assert (await keyless.get("/healthz", headers=headers)).status == 200


async def test_an_agent_without_keys_still_answers_plain_clients(keyless: Client) -> None:
    for headers in ({}, {"Host": "localhost:8080"}, {"Host": "[::1]:8080"}):
        assert (await keyless.get("/", headers=headers)).status == 200, headers
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await keyless.ws_connect("/events", origin="http://evil.example")
    assert refused.value.status == 403


# -- fail closed: no principal, no access ----------------------------------------------------

async def say_who(request: web.Request) -> web.Response:
    """Answer who the request comes from, as a handler sees it."""
    who = principal(request)
    return web.json_response({"app": who.app, "admin": who.is_admin})


def app_with_access(settings: Settings, agent: Agent, route_name: str) -> web.Application:
    """An application with the agent's access middleware and one route, ``/who``, named
    ``route_name`` (``health`` makes it a route open to anyone)."""
    app = web.Application(middlewares=[error_middleware, access_middleware])
    app[AGENT_KEY], app[SETTINGS_KEY], app[LIMITER_KEY] = agent, settings, FailureLimiter()
    app.router.add_get("/who", say_who, name=route_name)
    return app


async def test_a_handler_on_an_app_without_the_access_middleware_refuses(
    tmp_path: Path, archive_server: ArchiveServer,
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> None:
    """An application that serves the API without the access middleware (an embedder's
    mistake) refuses every request that needs to know who asks, with a JSON 403, even for
    an agent without keys: a missing principal is never taken for the admin."""
    settings = Settings(host="127.0.0.1", port=0, state_dir=tmp_path / "state")
    async with Agent(settings) as agent:
        app = web.Application(middlewares=[error_middleware])
        app[AGENT_KEY], app[SETTINGS_KEY] = agent, settings
        app[EVENT_BUS_KEY] = agent.events
        app.add_routes(api.routes)
        eventsocket.add_routes(app)
        client = await aiohttp_client(app)
        response = await client.get("/list-processes")
        assert response.status == 403
        assert "no key was checked" in (await response.json())["error"]
        response = await client.post("/create-process", json=create_body(archive_server, "a"))
        assert response.status == 403
        assert agent.list(None) == []
        assert (await client.get("/process-status/a.web.0")).status == 403
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.ws_connect("/events")
        assert refused.value.status == 403
        assert agent.events.subscriber_count == 0
        assert (await client.get("/healthz")).status == 200  # it asks for no one


async def test_an_open_route_names_nobody_on_an_agent_with_keys(
    settings: Settings, agent: Agent, aiohttp_client: Callable[..., Awaitable[Client]]
) -> None:
    """A route open to anyone checks no key, so a handler there that asks who the request
    comes from is refused, whatever key the request carries; a route behind the keys
    gets the principal of the key."""
    open_route = await aiohttp_client(app_with_access(settings, agent, "health"))
    for headers in ({}, bearer(ADMIN), bearer(WEB_KEY)):
        response = await open_route.get("/who", headers=headers)
        assert response.status == 403, headers
    keyed_route = await aiohttp_client(app_with_access(settings, agent, "who"))
    assert (await keyed_route.get("/who")).status == 401
    response = await keyed_route.get("/who", headers=bearer(ADMIN))
    assert await response.json() == {"app": None, "admin": True}
    response = await keyed_route.get("/who", headers=bearer(WEB_KEY))
    assert await response.json() == {"app": "web", "admin": False}


async def test_an_agent_without_keys_names_the_admin_on_every_route(
    tmp_path: Path, aiohttp_client: Callable[..., Awaitable[Client]]
) -> None:
    """Without keys, the access middleware sets the admin explicitly, on the open routes
    too."""
    settings = Settings(host="127.0.0.1", port=0, state_dir=tmp_path / "keyless")
    async with Agent(settings) as agent:
        for route_name in ("health", "who"):
            client = await aiohttp_client(app_with_access(settings, agent, route_name))
            response = await client.get("/who")
            assert await response.json() == {"app": None, "admin": True}, route_name
