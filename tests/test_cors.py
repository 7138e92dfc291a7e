"""Cross-origin requests (issue 18): an agent with keys answers CORS, preflights included,
for the pages of ``--allow-origin`` only; an agent without keys keeps refusing every page
of another origin. Real requests carrying ``Origin``, as a browser sends them."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from smartmob_agent.config import Settings, check_settings, settings_from
from smartmob_agent.errors import InvalidRequest
from smartmob_agent.web.access import cors_problem, normal_origin
from smartmob_agent.web.server import make_app
from tests.agent_process import AgentProcess

Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[Client]]

KEY = "cors-admin-key-0123456789abcdef"
DASHBOARD = "http://dash.example:8000"
OTHER = "http://evil.example"


def preflight(origin: str, method: str = "GET") -> dict[str, str]:
    """The headers of a browser's preflight for a request with a key."""
    return {"Origin": origin, "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "authorization,content-type"}


def bearer(origin: str, key: str = KEY) -> dict[str, str]:
    return {"Origin": origin, "Authorization": f"Bearer {key}"}


@pytest.fixture
async def keyed(tmp_path: Path, aiohttp_client: MakeClient) -> Client:
    """An agent with a key and ``--allow-origin`` the dashboard's origin."""
    settings = Settings(host="127.0.0.1", port=0, state_dir=tmp_path / "state",
                        token=(KEY,), allow_origin=(DASHBOARD,))
    return await aiohttp_client(make_app(settings))


async def test_a_preflight_from_an_allowed_origin_is_answered(keyed: Client) -> None:
    """204 naming the origin, the methods of the route, the key's header and a max age."""
    response = await keyed.options("/list-processes", headers=preflight(DASHBOARD))
    assert response.status == 204
    assert response.headers["Access-Control-Allow-Origin"] == DASHBOARD
    assert response.headers["Access-Control-Allow-Methods"] == "GET, HEAD"
    allowed = {h.strip().lower()
               for h in response.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type"} <= allowed
    assert response.headers["Access-Control-Max-Age"] == "600"
    assert "Origin" in response.headers["Vary"]
    post = await keyed.options("/create-process", headers=preflight(DASHBOARD, "POST"))
    assert post.status == 204
    assert post.headers["Access-Control-Allow-Methods"] == "POST"


async def test_a_preflight_from_another_origin_is_refused(keyed: Client) -> None:
    """A JSON 403 that says why, and nothing that lets a browser go on."""
    response = await keyed.options("/list-processes", headers=preflight(OTHER))
    assert response.status == 403
    assert "--allow-origin" in (await response.json())["error"]
    assert "Access-Control-Allow-Origin" not in response.headers


async def test_a_preflight_to_no_route_is_a_404(keyed: Client) -> None:
    """A path the agent does not serve fails at the preflight already."""
    response = await keyed.options("/no-such-thing", headers=preflight(DASHBOARD))
    assert response.status == 404
    assert "nothing at /no-such-thing" in (await response.json())["error"]


async def test_answers_to_an_allowed_origin_may_be_read(keyed: Client) -> None:
    """With the key, the answer names the origin and exposes the request id; without
    it, the 401 does too, so that the page can say the key is wrong."""
    response = await keyed.get("/list-processes", headers=bearer(DASHBOARD))
    assert response.status == 200
    assert response.headers["Access-Control-Allow-Origin"] == DASHBOARD
    assert "X-Request-Id" in response.headers["Access-Control-Expose-Headers"]
    assert response.headers["Vary"] == "Origin"
    refused = await keyed.get("/list-processes", headers={"Origin": DASHBOARD})
    assert refused.status == 401
    assert refused.headers["Access-Control-Allow-Origin"] == DASHBOARD


async def test_answers_to_another_origin_name_no_origin(keyed: Client) -> None:
    """A page of another origin gets no CORS header: its browser does not let it read."""
    response = await keyed.get("/list-processes", headers=bearer(OTHER))
    assert response.status == 200  # the key is good: a key is a key, from any client
    assert "Access-Control-Allow-Origin" not in response.headers
    plain = await keyed.get("/list-processes", headers={"Authorization": f"Bearer {KEY}"})
    assert "Access-Control-Allow-Origin" not in plain.headers


async def test_without_allow_origin_there_is_no_cors(
    tmp_path: Path, aiohttp_client: MakeClient
) -> None:
    """An agent with keys but no --allow-origin answers a preflight as any OPTIONS
    without a key: 401, and no CORS header anywhere."""
    settings = Settings(host="127.0.0.1", port=0, state_dir=tmp_path / "state", token=(KEY,))
    client = await aiohttp_client(make_app(settings))
    response = await client.options("/list-processes", headers=preflight(DASHBOARD))
    assert response.status == 401
    assert "Access-Control-Allow-Origin" not in response.headers
    answer = await client.get("/list-processes", headers=bearer(DASHBOARD))
    assert "Access-Control-Allow-Origin" not in answer.headers


async def test_an_agent_without_keys_keeps_refusing_other_origins(
    tmp_path: Path, aiohttp_client: MakeClient
) -> None:
    """Even with --allow-origin (which its command line refuses), an agent without keys
    refuses the preflight and the request of a page of another origin."""
    settings = Settings(host="127.0.0.1", port=0, state_dir=tmp_path / "state",
                        allow_origin=(DASHBOARD,))
    client = await aiohttp_client(make_app(settings))
    response = await client.options("/list-processes", headers=preflight(DASHBOARD))
    assert response.status == 403
    assert "without keys" in (await response.json())["error"]
    answer = await client.get("/list-processes", headers={"Origin": DASHBOARD})
    assert answer.status == 403
    assert "Access-Control-Allow-Origin" not in answer.headers


def test_allow_origin_without_keys_is_a_configuration_error() -> None:
    """--allow-origin without any key is refused before the agent starts."""
    with pytest.raises(InvalidRequest, match="--allow-origin needs keys"):
        check_settings(settings_from({"allow_origin": [DASHBOARD]}, {}))
    check_settings(settings_from({"allow_origin": [DASHBOARD], "token": [KEY]}, {}))


@pytest.mark.parametrize(("text", "origin"), [
    ("http://dash.example:8000", "http://dash.example:8000"),
    ("HTTPS://Dash.Example:443/", "https://dash.example"),
    ("http://dash.example:80", "http://dash.example"),
    ("http://[::1]:8080", "http://[::1]:8080"),
    ("http://dash.example/ui/", None), ("http://dash.example/?a", None),
    ("http://dash.example/#x", None), ("ftp://dash.example", None),
    ("http://user@dash.example", None), ("http://dash.example:99999", None),
    ("null", None), ("*", None), ("", None),
])
def test_an_origin_is_compared_written_one_way(text: str, origin: str | None) -> None:
    """Scheme and host lowercase, the default port left out; a path, query, fragment or
    user name is no origin."""
    assert normal_origin(text) == origin


def test_only_listed_origins_of_an_agent_with_keys_are_answered() -> None:
    """The rule as a table: listed and keyed, yes; anything else, a reason."""
    listed = ("https://dash.example",)
    assert cors_problem("https://DASH.example:443", listed, True) is None
    assert cors_problem("https://dash.example:8443", listed, True) is not None
    assert cors_problem("null", listed, True) is not None
    assert cors_problem("https://dash.example", listed, False) is not None


@pytest.mark.parametrize("value", ["dash.example", "http://dash.example/ui", "*"])
def test_a_bad_allow_origin_stops_the_agent_at_start(tmp_path: Path, value: str) -> None:
    """A value that is not an origin is a usage error (exit status 2) naming the flag."""
    result = subprocess.run(
        [sys.executable, "-m", "smartmob_agent", "--state-dir", str(tmp_path / "s"),
         "--port", "0", "--token", KEY, "--allow-origin", value],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "--allow-origin" in result.stderr


async def test_the_real_agent_takes_allowed_origins_from_the_environment(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """SMARTMOB_ALLOW_ORIGIN (origins separated by spaces) opens the real command to the
    pages of each, with their keys."""
    env = {**os.environ, "SMARTMOB_ALLOW_ORIGIN": f"{DASHBOARD} https://other.example",
           "SMARTMOB_TOKEN": KEY}
    agent = await AgentProcess(tmp_path / "state", env=env).start()
    try:
        for origin in (DASHBOARD, "https://other.example"):
            async with http.options(agent.url + "/", headers=preflight(origin)) as response:
                assert response.status == 204
                assert response.headers["Access-Control-Allow-Origin"] == origin
        async with http.get(agent.url + "/", headers=bearer(DASHBOARD)) as response:
            assert response.status == 200
            assert response.headers["Access-Control-Allow-Origin"] == DASHBOARD
    finally:
        await agent.kill()
