"""The ``metrics`` link (issue 18): Prometheus text parsed back with
``prometheus_client.parser``, its names and labels checked against real processes, the
agent's own counters, the machine's gauges, keys, and one registry per application."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import prometheus_client
import psutil
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from smartmob_agent.config import Settings
from smartmob_agent.model import ProcessState
from smartmob_agent.supervision.agent import Agent
from smartmob_agent.web.attach import SOCKETS_KEY
from smartmob_agent.web.server import make_app
from tests.conftest import ArchiveServer
from tests.helpers import app_archive, eventually, wait_for_state
from tests.test_ws_functional import open_stuck_client

Client = TestClient[Any, Any]

ADMIN = "metrics-admin-key-0123456789abcdef"
SHOP_KEY = "metrics-shop-key-0123456789abcdef"
PROCFILE = (
    "web: {PYTHON} -u -c 'print(\"hello\"); input()'\n"
    "crash: {PYTHON} -u -c 'print(\"bye\"); raise SystemExit(3)'\n"
    # prints 100,000 lines once told to (a line on its stdin), then waits
    "flood: {PYTHON} -u -c 'input(); [print(\"y\" * 100) for _ in range(100000)]; input()'\n"
)
FAST: dict[str, Any] = {"start_seconds": 0, "backoff": {"initial": 0.05, "max": 0.05}}
PROCESS_FAMILIES = {
    "smartmob_process_up", "smartmob_process_state", "smartmob_process_restarts",
    "smartmob_process_cpu_seconds", "smartmob_process_rss_bytes",
    "smartmob_process_output_lines", "smartmob_process_exits",
}
AGENT_FAMILIES = {
    "smartmob_http_requests", "smartmob_http_request_duration_seconds",
    "smartmob_websocket_clients", "smartmob_attach_lines_dropped", "smartmob_downloads",
    "smartmob_download_bytes",
}
HOST_FAMILIES = {
    "smartmob_host_load_average", "smartmob_host_cpu_seconds", "smartmob_host_memory_bytes",
    "smartmob_host_swap_bytes", "smartmob_host_disk_bytes", "smartmob_host_network_bytes",
    "smartmob_host_uptime_seconds", "smartmob_host_users", "smartmob_agent_rss_bytes",
    "smartmob_agent_cpu_seconds",
}


async def scrape(client: Client, key: str | None = None) -> dict[str, list[Sample]]:
    """GET the index's ``metrics`` link; its samples by family name, parsed back."""
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    index = await (await client.get("/", headers=headers)).json()
    assert index["metrics"] == str(client.make_url("/metrics"))
    response = await client.session.get(index["metrics"], headers=headers)
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return {family.name: family.samples
            for family in text_string_to_metric_families(await response.text())}


def value(samples: list[Sample], name: str | None = None, **labels: str) -> float:
    """The value of the one sample whose labels include ``labels`` (and named ``name``)."""
    found = [s.value for s in samples if labels.items() <= s.labels.items()
             and (name is None or s.name == name)]
    assert len(found) == 1, (labels, samples)
    return found[0]


def process_labels(slug: str) -> dict[str, str]:
    app, node = slug.split(".", 1)
    return {"app": app, "node": node, "process_type": node.split(".")[0], "slug": slug}


async def create(client: Client, archive_server: ArchiveServer, app: str, node: str,
                 key: str | None = None, **options: Any) -> str:
    """Create ``<app>.<node>`` from :data:`PROCFILE`; return its slug."""
    url = archive_server.add(f"{app}.tar.gz", app_archive(PROCFILE))
    body = {"app": app, "node": node, "process_type": node.split(".")[0], "source_url": url,
            **options}
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    response = await client.post("/create-process", data=json.dumps(body), headers=headers)
    assert response.status == 201, await response.text()
    return f"{app}.{node}"


async def test_each_process_has_its_series_with_its_labels(
    client: Client, agent: Agent, archive_server: ArchiveServer
) -> None:
    """A running process is up with CPU, memory and its output lines; a crashing one is
    down between runs, with its restarts and its exits by code; a stopped one shows its
    exit by signal; every series has the labels app, node, process_type and slug."""
    web = await create(client, archive_server, "shop", "web.0")
    crash = await create(client, archive_server, "shop", "crash.0", **FAST)
    await wait_for_state(agent.get(web), ProcessState.RUNNING)
    await eventually(lambda: agent.get(crash).restarts >= 2, what="two restarts")
    await eventually(lambda: agent.get(web).output_log.next_seq > 1, what="hello")
    metrics = await scrape(client)
    assert set(metrics) >= PROCESS_FAMILIES | AGENT_FAMILIES | HOST_FAMILIES
    for name in PROCESS_FAMILIES:
        for sample in metrics[name]:
            assert set(process_labels(sample.labels["slug"])).issubset(sample.labels), name
    web_labels, crash_labels = process_labels(web), process_labels(crash)
    assert value(metrics["smartmob_process_up"], **web_labels) == 1.0
    assert value(metrics["smartmob_process_state"], **web_labels, state="running") == 1.0
    assert value(metrics["smartmob_process_restarts"], **web_labels) == 0.0
    assert value(metrics["smartmob_process_rss_bytes"], **web_labels) > 1024 * 1024
    assert value(metrics["smartmob_process_cpu_seconds"], **web_labels) >= 0.0
    assert value(metrics["smartmob_process_output_lines"], **web_labels) == 1.0
    restarts = value(metrics["smartmob_process_restarts"], **crash_labels)
    assert restarts >= 2
    assert value(metrics["smartmob_process_exits"], **crash_labels, code="3") >= restarts
    assert value(metrics["smartmob_process_output_lines"], **crash_labels) >= restarts

    response = await client.post(f"/stop-process/{web}", data="{}")
    assert response.status == 200
    metrics = await scrape(client)
    assert value(metrics["smartmob_process_up"], **web_labels) == 0.0
    assert value(metrics["smartmob_process_exits"], **web_labels, code="SIGTERM") == 1.0
    assert not [s for s in metrics["smartmob_process_rss_bytes"] if s.labels["slug"] == web]

    response = await client.post(f"/delete-process/{crash}", data="{}")
    assert response.status == 200
    metrics = await scrape(client)  # a deleted process has no series any more
    assert all(s.labels["slug"] != crash for name in PROCESS_FAMILIES for s in metrics[name])


async def test_the_agent_counts_requests_sockets_and_downloads(
    client: Client, agent: Agent, archive_server: ArchiveServer
) -> None:
    """Requests by route, method and status (404s as unmatched) with their durations,
    WebSocket clients by link, and the downloads of sources with their bytes."""
    slug = await create(client, archive_server, "shop", "web.0")
    await wait_for_state(agent.get(slug), ProcessState.RUNNING)
    assert (await client.get("/no-such-page")).status == 404
    before = await scrape(client)
    assert value(before["smartmob_http_requests"], route="create", method="POST",
                 status="201") == 1.0
    assert value(before["smartmob_http_requests"], route="(unmatched)", method="GET",
                 status="404") == 1.0
    assert value(before["smartmob_http_request_duration_seconds"],
                 "smartmob_http_request_duration_seconds_count", route="create") == 1.0
    assert value(before["smartmob_downloads"]) == 1.0
    size = len(app_archive(PROCFILE))
    assert size - 200 < value(before["smartmob_download_bytes"]) < size + 200  # mtimes
    for link in ("attach", "events", "host-stats"):
        assert value(before["smartmob_websocket_clients"], link=link) == 0.0
    async with client.ws_connect(f"/attach-console/{slug}"), client.ws_connect("/events"), \
            client.ws_connect("/host-stats"):
        during = await scrape(client)
        for link in ("attach", "events", "host-stats"):
            assert value(during["smartmob_websocket_clients"], link=link) == 1.0
    after = await scrape(client)
    assert value(after["smartmob_http_requests"], route="metrics", method="GET",
                 status="200") == 2.0  # the two scrapes before this one
    assert value(after["smartmob_http_requests"], route="events", method="GET",
                 status="101") == 1.0  # a WebSocket counts once closed


async def test_the_host_gauges_are_this_machine(client: Client, settings: Settings) -> None:
    """The machine's series are what psutil reads: cores, memory, the state folder's disk."""
    metrics = await scrape(client)
    cores = {s.labels["cpu"] for s in metrics["smartmob_host_cpu_seconds"]}
    assert len(cores) == psutil.cpu_count()
    assert value(metrics["smartmob_host_memory_bytes"], kind="total") == (
        psutil.virtual_memory().total)
    assert value(metrics["smartmob_host_disk_bytes"], kind="total",
                 path=str(settings.state_dir)) == psutil.disk_usage(str(settings.state_dir)).total
    assert {s.labels["period"] for s in metrics["smartmob_host_load_average"]} == {
        "1m", "5m", "15m"}
    assert value(metrics["smartmob_agent_rss_bytes"]) > 1024 * 1024


async def test_openmetrics_is_served_to_who_asks_for_it(client: Client) -> None:
    """A scraper that prefers OpenMetrics gets it (and it parses as such)."""
    response = await client.get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    text = await response.text()
    names = {family.name for family in openmetrics(text)}  # type: ignore[no-untyped-call]
    assert {"smartmob_host_memory_bytes", "smartmob_http_requests"} <= names


async def test_a_slow_client_s_dropped_lines_are_counted_once(
    client: Client, agent: Agent, archive_server: ArchiveServer
) -> None:
    """Lines a stuck live-only client could not take are counted while it is attached,
    and still once after it left."""
    slug = await create(client, archive_server, "shop", "flood.0")
    watcher = agent.get(slug)
    await wait_for_state(watcher, ProcessState.RUNNING)
    server = client.server
    stuck = await open_stuck_client(str(server.host), int(server.port or 0),
                                    f"/attach-console/{slug}?live=1")
    await eventually(lambda: watcher.hub.subscriber_count == 1, what="attached")
    assert watcher.send_input("go")
    await eventually(lambda: watcher.output_log.next_seq > 100_000, what="the lines")
    [subscriber] = client.app[SOCKETS_KEY]
    assert subscriber.dropped > 0
    attached = value((await scrape(client))["smartmob_attach_lines_dropped"])
    assert attached == subscriber.dropped
    stuck.close()
    await eventually(lambda: not client.app[SOCKETS_KEY], what="the client to leave")
    assert value((await scrape(client))["smartmob_attach_lines_dropped"]) == attached


@pytest.fixture
def keyed(tmp_path: Path) -> Settings:
    return Settings(host="127.0.0.1", port=0, state_dir=tmp_path / "state",
                    stop_timeout=5.0, token=(ADMIN,), app_token=(("shop", SHOP_KEY),))


async def test_an_app_key_scrapes_its_app_s_processes_only(
    keyed: Settings, archive_server: ArchiveServer,
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> None:
    """Without a key, 401; with the admin key, every process; with an app key, that
    app's processes only, and the same agent and machine series as the admin."""
    async with Agent(keyed) as agent:
        client = await aiohttp_client(make_app(keyed, agent))
        for app in ("shop", "blog"):
            slug = await create(client, archive_server, app, "web.0", ADMIN)
            await wait_for_state(agent.get(slug), ProcessState.RUNNING)
        assert (await client.get("/metrics")).status == 401
        admin = await scrape(client, ADMIN)
        assert {s.labels["app"] for s in admin["smartmob_process_up"]} == {"shop", "blog"}
        shop = await scrape(client, SHOP_KEY)
        assert {s.labels["app"] for name in PROCESS_FAMILIES for s in shop[name]} == {"shop"}
        assert set(shop) >= AGENT_FAMILIES | HOST_FAMILIES


async def test_each_application_counts_in_a_registry_of_its_own(
    settings: Settings, tmp_path: Path, aiohttp_client: Callable[..., Awaitable[Client]],
) -> None:
    """Two agents in one process do not count each other's requests, and nothing goes
    into prometheus_client's global registry."""
    other = Settings(host="127.0.0.1", port=0, state_dir=tmp_path / "other")
    async with Agent(settings) as first_agent, Agent(other) as second_agent:
        first = await aiohttp_client(make_app(settings, first_agent))
        second = await aiohttp_client(make_app(other, second_agent))
        await asyncio.gather(*(first.get("/healthz") for _ in range(3)))
        assert value((await scrape(first))["smartmob_http_requests"], route="health") == 3.0
        assert not [s for s in (await scrape(second))["smartmob_http_requests"]
                    if s.labels["route"] == "health"]
    global_names = {metric.name for metric in prometheus_client.REGISTRY.collect()}
    assert not {name for name in global_names if name.startswith("smartmob")}


async def test_a_websocket_that_cannot_upgrade_is_counted_with_its_status(
    client: Client,
) -> None:
    """A plain GET of a WebSocket route is a 400, counted under its route."""
    assert (await client.get("/events")).status == 400
    with pytest.raises(aiohttp.WSServerHandshakeError):
        await client.ws_connect("/host-stats?interval=0.1")
    metrics = await scrape(client)
    assert value(metrics["smartmob_http_requests"], route="events", status="400") == 1.0
    assert value(metrics["smartmob_http_requests"], route="host_stats", status="400") == 1.0
