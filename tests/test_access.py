"""Access control (issue 5): admin, app and minted keys, the open health check, the
slowing down of guessers, and secrets kept out of logs and children."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from yarl import URL

from smartmob_agent.agent import Agent
from smartmob_agent.auth import FailureLimiter, Keyring, MintedKey, digest
from smartmob_agent.config import Settings, settings_from
from smartmob_agent.errors import InvalidRequest
from smartmob_agent.server import make_app
from tests.conftest import ArchiveServer
from tests.helpers import app_archive

ADMIN = "admin-key-0123456789abcdef"
WEB_KEY = "web-app-key-0123456789abcdef"
WRONG = "wrong-key-0123456789abcdef"

Client = TestClient[Any, Any]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        host="127.0.0.1", port=0, state_dir=tmp_path / "state", stop_timeout=5.0,
        token=(ADMIN,), app_token=(("web", WEB_KEY),),
    )


@pytest.fixture
async def agent(settings: Settings) -> AsyncIterator[Agent]:
    async with Agent(settings) as agent:
        yield agent


@pytest.fixture
async def client(
    agent: Agent, settings: Settings,
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> Client:
    return await aiohttp_client(make_app(settings, agent))


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


def test_the_keyring_knows_each_kind_of_key() -> None:
    minted = MintedKey("id1", "shop", digest("smk_minted-key-123456789"), 1.0)
    ring = Keyring([ADMIN], {WEB_KEY: "web"}, [minted])
    assert ring.enabled
    assert ring.identify(ADMIN).is_admin  # type: ignore[union-attr]
    assert ring.identify(WEB_KEY).app == "web"  # type: ignore[union-attr]
    assert ring.identify("smk_minted-key-123456789").app == "shop"  # type: ignore[union-attr]
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
    assert ring.identify(ADMIN).is_admin  # type: ignore[union-attr]
    assert ring.identify(WEB_KEY).app == "web"  # type: ignore[union-attr]
    apps_file.write_text("web=short\n")
    with pytest.raises(InvalidRequest) as error:
        Agent(settings)
    assert "line 1" in str(error.value)
    assert "short" not in str(error.value).split(":")[-1]
    bad = dataclasses.replace(settings, app_tokens_file=tmp_path / "missing")
    with pytest.raises(InvalidRequest, match="cannot read the key file"):
        Agent(bad)
