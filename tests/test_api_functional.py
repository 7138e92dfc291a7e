"""The REST API through a real HTTP client, following links from the index."""

from __future__ import annotations

import asyncio
import io
import json
import socket
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from smartmob_agent.model import ProcessState as S
from smartmob_agent.supervision.agent import Agent
from tests.conftest import ArchiveServer
from tests.helpers import app_archive, wait_for_state

WAIT_TERM = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("ready", flush=True)
while True:
    time.sleep(60)
"""

Client = TestClient[Any, Any]


async def get_json(client: Client, url: str, status: int = 200) -> Any:
    response = await client.session.get(url)
    assert response.status == status, await response.text()
    return await response.json()


async def index(client: Client) -> dict[str, str]:
    document: dict[str, str] = await get_json(client, str(client.make_url("/")))
    return document


async def create(client: Client, body: Any, status: int = 201) -> Any:
    links = await index(client)
    raw = body if isinstance(body, (str, bytes)) else json.dumps(body)
    response = await client.session.post(links["create"], data=raw)
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    return await response.json()


def request(source_url: str, **overrides: Any) -> dict[str, Any]:
    body = {"app": "myapp", "node": "web.0", "process_type": "web", "source_url": source_url}
    body.update(overrides)
    return body


@pytest.fixture
def web_app(archive_server: ArchiveServer) -> str:
    """URL of an app whose ``web`` process prints ready and waits for SIGTERM."""
    return archive_server.add(
        "app.tgz", app_archive("web: {PYTHON} -u app.py\n", {"app.py": WAIT_TERM})
    )


async def test_walkthrough_of_the_seed(client: Client, agent: Agent, web_app: str) -> None:
    """The seed document's walkthrough works as written, with absolute links."""
    base = str(client.make_url("/")).rstrip("/")
    links = await index(client)
    ws_base = base.replace("http://", "ws://")
    assert links == {
        "create": f"{base}/create-process", "list": f"{base}/list-processes",
        "events": f"{ws_base}/events",
        "upload": f"{base}/upload-source", "agent-log": f"{base}/agent-log",
        "tokens": f"{base}/list-tokens", "openapi": f"{base}/openapi.json",
        "host-stats": f"{base}/host-stats", "metrics": f"{base}/metrics",
        "dashboard": f"{base}/ui/",
        "bulk_start": f"{base}/start-processes", "bulk_stop": f"{base}/stop-processes",
        "bulk_restart": f"{base}/restart-processes", "bulk_delete": f"{base}/delete-processes",
    }
    assert await get_json(client, links["list"]) == {"processes": []}

    response = await client.session.post(links["create"], data=json.dumps(request(web_app)))
    assert response.status == 201
    process = await response.json()
    assert response.headers["Location"] == f"{base}/process-status/myapp.web.0"
    assert process["app"] == "myapp"
    assert process["node"] == "web.0"
    assert process["process_type"] == "web"
    assert process["slug"] == "myapp.web.0"
    assert process["attach"] == f"{ws_base}/attach-console/myapp.web.0"
    assert process["details"] == process["status"] == f"{base}/process-status/myapp.web.0"
    assert process["delete"] == f"{base}/delete-process/myapp.web.0"
    assert process["state"] in {s.value for s in S}

    listing = await get_json(client, links["list"])
    assert [p["slug"] for p in listing["processes"]] == ["myapp.web.0"]

    await wait_for_state(agent.get("myapp.web.0"), S.RUNNING)
    status = await get_json(client, process["details"])
    assert status["state"] == "running"
    assert isinstance(status["pid"], int)

    stream = await client.session.ws_connect(process["attach"])
    await stream.close()

    response = await client.session.post(process["delete"], data=json.dumps({}))
    assert response.status == 200
    assert await response.json() == {}
    assert await get_json(client, links["list"]) == {"processes": []}
    await get_json(client, process["details"], status=404)


async def test_delete_accepts_an_empty_body(client: Client, agent: Agent, web_app: str) -> None:
    """A delete request with no body at all is accepted like ``{}``."""
    process = await create(client, request(web_app))
    await wait_for_state(agent.get("myapp.web.0"), S.RUNNING)
    response = await client.session.post(process["delete"])
    assert response.status == 200
    assert await response.json() == {}


async def test_listing_keeps_creation_order(client: Client, web_app: str) -> None:
    """The listing shows processes in the order they were created."""
    nodes = ["web.3", "web.1", "web.2", "web.0"]
    for node in nodes:
        await create(client, request(web_app, node=node))
    listing = await get_json(client, (await index(client))["list"])
    assert [p["node"] for p in listing["processes"]] == nodes


async def test_duplicate_slug_is_a_conflict(client: Client, web_app: str) -> None:
    """Creating a slug that exists answers 409 with a JSON error."""
    await create(client, request(web_app))
    body = await create(client, request(web_app), status=409)
    assert "myapp.web.0" in body["error"]


async def test_unknown_slug_is_not_found(client: Client) -> None:
    """Status and delete of an unknown slug answer 404 with a JSON error."""
    body = await get_json(client, str(client.make_url("/process-status/nope.web.0")), 404)
    assert "nope.web.0" in body["error"]
    response = await client.session.post(client.make_url("/delete-process/nope.web.0"))
    assert response.status == 404
    assert "error" in await response.json()


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ("{not json", "not valid JSON"),
        ("", "empty"),
        ("[1, 2]", "JSON object"),
        (b"\xff\xfe{}", "not"),
        ('{"app": ' + "9" * 5000 + "}", "not usable JSON"),
    ],
)
async def test_unparseable_bodies_are_rejected(client: Client, body: Any, fragment: str) -> None:
    """A body that is not a JSON object gets a 400 that says why."""
    answer = await create(client, body, status=400)
    assert fragment in answer["error"]


@pytest.mark.parametrize(
    ("overrides", "bad"),
    [
        ({"app": 3}, {"app"}),
        ({"node": "a/b", "process_type": None}, {"node", "process_type"}),
        ({"app": "..", "node": "x\x00"}, {"app", "node"}),
        ({"app": "a" * 1000}, {"app"}),
        ({"source_url": "ftp://example/x.tgz"}, {"source_url"}),
        ({"env": {"A": 1}}, {"env"}),
        ({"env": ["A=1"]}, {"env"}),
        ({"env": {"1BAD": "x"}}, {"env"}),
        ({"colour": "blue"}, {"colour"}),
    ],
)
async def test_bad_fields_are_each_named(
    client: Client, agent: Agent, overrides: dict[str, Any], bad: set[str]
) -> None:
    """Every invalid field is named in the 400 answer, and nothing is created."""
    body = {**request("http://127.0.0.1:1/x.tgz"), **overrides}
    answer = await create(client, body, status=400)
    assert set(answer["fields"]) == bad
    for name in bad:
        assert name in answer["error"]
    assert agent.list() == []


async def test_missing_fields_are_each_named(client: Client) -> None:
    """Each missing required field is named."""
    answer = await create(client, {"app": "x"}, status=400)
    assert set(answer["fields"]) == {"node", "process_type", "source_url"}
    assert answer["fields"]["node"] == "is required"


async def test_oversize_body_is_413(client: Client) -> None:
    """A body over the limit answers 413 with a JSON error."""
    huge = json.dumps(request("http://127.0.0.1:1/x.tgz", env={"A": "x" * 2_000_000}))
    links = await index(client)
    response = await client.session.post(links["create"], data=io.BytesIO(huge.encode()))
    assert response.status == 413
    answer = await response.json()
    assert "too large" in answer["error"]


async def test_unknown_route_and_method_are_json(client: Client) -> None:
    """Unknown paths and wrong methods also answer with JSON errors."""
    response = await client.get("/nothing-here")
    assert response.status == 404
    assert "error" in await response.json()
    response = await client.get("/create-process")
    assert response.status == 405
    assert "POST" in (await response.json())["error"]


async def test_request_id_is_echoed_or_assigned(client: Client) -> None:
    """Every response carries X-Request-Id: the client's, or a new one."""
    response = await client.get("/", headers={"X-Request-Id": "abc-123"})
    assert response.headers["X-Request-Id"] == "abc-123"
    response = await client.get("/nothing")
    assert len(response.headers["X-Request-Id"]) >= 16


async def test_request_id_is_sent_with_the_download(
    client: Client, agent: Agent, archive_server: ArchiveServer, web_app: str
) -> None:
    """The create request's X-Request-Id travels with the archive download."""
    links = await index(client)
    response = await client.session.post(
        links["create"], data=json.dumps(request(web_app)), headers={"X-Request-Id": "deploy-7"}
    )
    assert response.status == 201
    await wait_for_state(agent.get("myapp.web.0"), S.RUNNING)
    assert archive_server.requests[-1].headers["X-Request-Id"] == "deploy-7"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("missing.tgz", "404"),
        ("page.html", "HTML"),
        ("stall", "no data"),
        ("refused", "could not connect to 127.0.0.1"),
        ("no-procfile.tgz", "no Procfile"),
        ("app.tgz:worker", 'no process type "worker" (it has: "web")'),
        ("bad-command.tgz", "cannot run"),
        ("garbage.tgz", "corrupt"),
    ],
)
async def test_failures_after_201_are_explained(
    client: Client, agent: Agent, archive_server: ArchiveServer, web_app: str,
    path: str, fragment: str,
) -> None:
    """Each failure after 201 is state failed with an error that says what went wrong,
    and a process that was already running keeps running."""
    await create(client, request(web_app, node="web.9"))
    survivor = agent.get("myapp.web.9")
    await wait_for_state(survivor, S.RUNNING)
    pid = survivor.info().pid

    archive_server.add("no-procfile.tgz", app_archive("", {}).replace(b"", b""))
    archive_server.add("bad-command.tgz", app_archive("web: no-such-command-here\n"))
    archive_server.add("garbage.tgz", b"\x1f\x8b" + b"garbage" * 10)
    process_type = "web"
    if path == "refused":
        url = f"http://127.0.0.1:{_free_port()}/x.tgz"
    elif path.startswith("app.tgz:"):
        url, process_type = web_app, path.split(":")[1]
    else:
        url = archive_server.url(path)
    if path == "no-procfile.tgz":
        from tests.helpers import make_archive
        archive_server.add(path, make_archive({"README": "no procfile"}))
    await create(client, request(url, process_type=process_type))
    watcher = agent.get("myapp.web.0")
    await wait_for_state(watcher, S.FAILED)
    status = await get_json(client, (await create_links(client))["details"])
    assert status["state"] == "failed"
    assert fragment in status["error"], status["error"]
    assert survivor.state == S.RUNNING
    assert survivor.info().pid == pid


async def create_links(client: Client) -> dict[str, str]:
    listing = await get_json(client, (await index(client))["list"])
    return next(p for p in listing["processes"] if p["slug"] == "myapp.web.0")


async def test_request_without_host_is_400(client: Client) -> None:
    """A request with an empty Host header gets a 400 JSON error, since links need a host."""
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: \r\nConnection: close\r\n\r\n")
    async with asyncio.timeout(10):
        answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), head
    assert b"Host" in json.loads(body)["error"].encode()
