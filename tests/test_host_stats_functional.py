"""The ``host-stats`` link of a real agent (issue 18): the JSON snapshot against what
psutil reads of this machine, the WebSocket with its interval rules and pause, and keys.

Real children, a real archive server on 127.0.0.1, the agent's web app on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from aiohttp.test_utils import TestClient

from smartmob_agent.config import Settings
from smartmob_agent.model import ProcessState
from smartmob_agent.supervision.agent import Agent
from smartmob_agent.web.server import make_app
from tests.conftest import ArchiveServer
from tests.helpers import app_archive, wait_for_state
from tests.test_host_stats import SECTION_FIELDS, SNAPSHOT_FIELDS

Client = TestClient[Any, Any]

ADMIN = "host-admin-key-0123456789abcdef"
SHOP_KEY = "host-shop-key-0123456789abcdef"
#: Waits on stdin: a process that stays running until stopped.
WAITING = "web: {PYTHON} -c 'input()'\n"


async def run_process(client: Client, agent: Agent, archive_server: ArchiveServer,
                      app: str, headers: dict[str, str] | None = None) -> None:
    """Create ``<app>.web.0`` and wait until it runs."""
    url = archive_server.add(f"{app}.tar.gz", app_archive(WAITING))
    body = {"app": app, "node": "web.0", "process_type": "web", "source_url": url}
    response = await client.post("/create-process", json=body, headers=headers)
    assert response.status == 201, await response.text()
    await wait_for_state(agent.get(f"{app}.web.0"), ProcessState.RUNNING)


async def host_stats_url(client: Client, headers: dict[str, str] | None = None) -> str:
    """The ``host-stats`` link of the index."""
    index = await (await client.get("/", headers=headers)).json()
    url: str = index["host-stats"]
    assert url == str(client.make_url("/host-stats"))
    return url


async def frame(ws: aiohttp.ClientWebSocketResponse, timeout: float = 10.0) -> Any:
    """The next frame, as JSON."""
    message = await ws.receive(timeout=timeout)
    assert message.type is aiohttp.WSMsgType.TEXT, message
    return json.loads(message.data)


async def test_the_snapshot_is_this_machine_and_this_agent(
    client: Client, agent: Agent, archive_server: ArchiveServer, settings: Settings
) -> None:
    """GET ``host-stats`` gives every field, with the figures psutil reads here: the
    hostname, the cores, the memory, the state folder's disk, the agent's own pid, and
    the running process in the counts and the shipped plugin's totals."""
    await run_process(client, agent, archive_server, "shop")
    response = await client.session.get(await host_stats_url(client))
    assert response.status == 200
    document = await response.json()
    assert set(document) == SNAPSHOT_FIELDS
    for section, fields in SECTION_FIELDS.items():
        assert set(document[section]) == fields, section
    assert document["hostname"] == socket.gethostname()
    assert document["time"].endswith("Z")
    assert abs(document["uptime"] - (time.time() - psutil.boot_time())) < 60
    assert document["users"] == len(psutil.users())
    assert len(document["load"]) == 3
    cpu = document["cpu"]
    assert cpu["count"] == psutil.cpu_count() == len(cpu["per_core"])
    assert all(0.0 <= figure <= 100.0 for figure in [cpu["percent"], *cpu["per_core"]])
    assert 0.2 <= cpu["interval"] < 5  # measured over a short window, not since boot
    assert document["memory"]["total"] == psutil.virtual_memory().total
    assert document["swap"]["total"] == psutil.swap_memory().total
    assert document["disk"]["path"] == str(settings.state_dir)
    assert document["disk"]["total"] == psutil.disk_usage(str(settings.state_dir)).total
    assert document["network"]["bytes_in"] > 0
    assert document["agent"]["pid"] == os.getpid()
    assert document["agent"]["rss"] > 1024 * 1024
    assert document["agent"]["processes"] == 1
    assert document["agent"]["states"] == {"running": 1}
    [shop] = document["plugins"]["process_types"]["types"]
    assert (shop["app"], shop["process_type"], shop["running"]) == ("shop", "web", 1)


async def test_a_bad_interval_on_the_handshake_is_a_400(client: Client) -> None:
    """``?interval=0.49`` is refused before any upgrade, with a JSON error naming it."""
    url = await host_stats_url(client)
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await client.session.ws_connect(url + "?interval=0.49")
    assert caught.value.status == 400
    response = await client.session.get(url + "?interval=0.49")
    assert response.status == 400
    assert (await response.json())["fields"] == {
        "interval": "the interval must be from 0.5 to 3600 seconds (0.49 is not)"}


async def test_the_websocket_pushes_snapshots_at_the_interval_the_client_sets(
    client: Client,
) -> None:
    """The socket says its settings, then pushes snapshots whose CPU figures are measured
    over the interval; a message changes the interval at once, 0.49 is refused with an
    error frame that keeps the old one, and 0.5 is accepted."""
    async with client.session.ws_connect(await host_stats_url(client) + "?interval=0.5") as ws:
        assert await frame(ws) == {"type": "settings", "interval": 0.5, "paused": False}
        first = await frame(ws)
        assert first["type"] == "snapshot"
        assert set(first) == SNAPSHOT_FIELDS | {"type"}
        second = await frame(ws)
        assert second["type"] == "snapshot"
        assert 0.45 <= second["cpu"]["interval"] < 2.0  # since the snapshot before
        await ws.send_json({"interval": 0.49})
        refused = await _skip_snapshots(ws)
        assert refused["type"] == "error"
        assert "0.49 is not" in refused["error"]
        assert (refused["interval"], refused["paused"]) == (0.5, False)
        await ws.send_json({"interval": 1})
        assert await _skip_snapshots(ws) == {"type": "settings", "interval": 1.0,
                                             "paused": False}
        pushed = await _skip_snapshots(ws, keep="snapshot")
        assert 0.95 <= pushed["cpu"]["interval"] < 3.0


async def _skip_snapshots(ws: aiohttp.ClientWebSocketResponse, keep: str = "") -> Any:
    """The next frame that is not a snapshot (or the next snapshot, with ``keep``)."""
    while True:
        found = await frame(ws)
        if found["type"] != "snapshot" or keep == "snapshot":
            return found


async def test_stop_pauses_the_pushes_and_start_resumes_them(client: Client) -> None:
    """After ``{"stop": true}`` no snapshot comes for longer than the interval; after
    ``{"start": true}`` they come again."""
    async with client.session.ws_connect(await host_stats_url(client) + "?interval=0.5") as ws:
        await frame(ws)  # settings
        await ws.send_json({"stop": True})
        assert await _skip_snapshots(ws) == {"type": "settings", "interval": 0.5,
                                             "paused": True}
        with pytest.raises(TimeoutError):  # three intervals without a snapshot
            await ws.receive(timeout=1.5)
        await ws.send_json({"start": True})
        assert await frame(ws) == {"type": "settings", "interval": 0.5, "paused": False}
        assert (await frame(ws))["type"] == "snapshot"


async def test_a_message_it_cannot_read_gets_an_error_frame(client: Client) -> None:
    """Text that is not a control message, and binary frames, get an error frame; the
    socket stays open and obeys the next good message."""
    async with client.session.ws_connect(await host_stats_url(client)) as ws:
        await frame(ws)
        await ws.send_str("faster please")
        assert "JSON object" in (await _skip_snapshots(ws))["error"]
        await ws.send_bytes(b'{"stop": true}')
        assert "text frames" in (await _skip_snapshots(ws))["error"]
        await ws.send_json({"stop": True})
        assert (await _skip_snapshots(ws))["paused"] is True


@pytest.fixture
def keyed(tmp_path: Path) -> Settings:
    """An agent with an admin key and a key of app ``shop``."""
    return Settings(host="127.0.0.1", port=0, state_dir=tmp_path / "state",
                    stop_timeout=5.0, token=(ADMIN,), app_token=(("shop", SHOP_KEY),))


async def test_keys_guard_host_stats_and_an_app_key_sees_its_app_only(
    keyed: Settings, archive_server: ArchiveServer,
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> None:
    """Without a key, 401 (GET and handshake); with ``?token=`` the WebSocket opens (a
    browser cannot set headers); an app key's snapshot counts only its app's processes."""
    async with Agent(keyed) as agent:
        client = await aiohttp_client(make_app(keyed, agent))
        admin = {"Authorization": f"Bearer {ADMIN}"}
        await run_process(client, agent, archive_server, "shop", admin)
        await run_process(client, agent, archive_server, "blog", admin)
        url = await host_stats_url(client, admin)
        assert (await client.session.get(url)).status == 401
        with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
            await client.session.ws_connect(url)
        assert caught.value.status == 401
        everything = await (await client.session.get(url, headers=admin)).json()
        assert everything["agent"]["states"] == {"running": 2}
        shop = await (await client.session.get(
            url, headers={"Authorization": f"Bearer {SHOP_KEY}"})).json()
        assert shop["agent"]["states"] == {"running": 1}
        assert [t["app"] for t in shop["plugins"]["process_types"]["types"]] == ["shop"]
        async with client.session.ws_connect(f"{url}?token={SHOP_KEY}") as ws:
            await frame(ws)
            assert (await frame(ws))["agent"]["processes"] == 1
        assert (await client.session.get(f"{url}?token={ADMIN}")).status == 401  # GET: headers only


async def close_code(ws: aiohttp.ClientWebSocketResponse) -> int | None:
    """Read (as a client does, answering the close handshake) until the socket closes."""
    async with asyncio.timeout(10):
        while (await ws.receive()).type is not aiohttp.WSMsgType.CLOSE:
            pass
    return ws.close_code


async def test_the_agent_shutting_down_closes_the_socket_with_1001(client: Client) -> None:
    """On shutdown every host-stats client gets a close frame saying the agent goes away."""
    ws = await client.session.ws_connect(await host_stats_url(client))
    closing = asyncio.ensure_future(close_code(ws))
    await frame(ws)  # connected and served
    await client.app.shutdown()
    assert await closing == aiohttp.WSCloseCode.GOING_AWAY


async def test_revoking_a_minted_key_closes_its_host_stats_socket(
    keyed: Settings, archive_server: ArchiveServer,
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> None:
    """A socket opened with a minted key closes with 1008 when the key is revoked; the
    admin's stays open."""
    async with Agent(keyed) as agent:
        client = await aiohttp_client(make_app(keyed, agent))
        admin = {"Authorization": f"Bearer {ADMIN}"}
        url = archive_server.add("shop.tar.gz", app_archive(WAITING))
        response = await client.post("/create-process", headers=admin, json={
            "app": "shop", "node": "web.0", "process_type": "web", "source_url": url,
            "autostart": False, "issue_token": True})
        assert response.status == 201, await response.text()
        token = (await response.json())["token"]
        stats = await host_stats_url(client, admin)
        minted = await client.session.ws_connect(f"{stats}?token={token['key']}")
        mine = await client.session.ws_connect(stats, headers=admin)
        closing = asyncio.ensure_future(close_code(minted))
        revoked = await client.post(f"/revoke-token/{token['id']}", headers=admin)
        assert revoked.status == 200
        assert await closing == aiohttp.WSCloseCode.POLICY_VIOLATION
        assert (await frame(mine))["type"] == "settings"  # still served
        await mine.close()
