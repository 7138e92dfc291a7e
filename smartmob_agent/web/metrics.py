"""The ``metrics`` link: the agent's figures in Prometheus's text format.

``GET /metrics`` answers what a Prometheus server scrapes (the format chosen from the
``Accept`` header by ``prometheus-client``, OpenMetrics when asked for): one series per
process (labels ``app``, ``node``, ``process_type``, ``slug``), the agent's own figures
(HTTP requests, WebSocket clients, lines, downloads) and the machine's
(``smartmob_agent.host``). The scrape is guarded like every route: with an app key,
only that app's processes have series (the agent's and the machine's are the same for
every key).

Each application has a :class:`Metrics` with a registry of its own, never
``prometheus_client``'s global one, so that several agents in one process (the tests) do
not count into each other. What changes on each request (the request counter and
duration histogram) is counted as it happens; the rest is read when scraped.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter as Tally
from collections.abc import Iterable, Iterator
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from smartmob_agent.events.bus import ProcessEvent
from smartmob_agent.host.gather import read_sample
from smartmob_agent.host.shape import HostSample
from smartmob_agent.model import ProcessState
from smartmob_agent.supervision.agent import Agent
from smartmob_agent.web.api import AGENT_KEY, principal
from smartmob_agent.web.attach import DROPPED_KEY, SOCKETS_KEY, Dropped
from smartmob_agent.web.events import EVENT_CLIENTS_KEY
from smartmob_agent.web.hoststats import HOST_STATS_KEY

#: The labels of every per-process series.
PROCESS_LABELS = ("app", "node", "process_type", "slug")
#: The route label of a request that matched no route (a 404 or 405).
UNMATCHED = "(unmatched)"
#: The status counted for a request whose client hung up before it was answered (the
#: code nginx logs for it).
CLIENT_GONE = 499

routes = web.RouteTableDef()


class Metrics:
    """The metrics one application counts as things happen, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "smartmob_http_requests", "HTTP requests answered, by route name, method and "
            "status (a WebSocket counts once it is closed, as 101)",
            ("route", "method", "status"), registry=self.registry)
        self.duration = Histogram(
            "smartmob_http_request_duration_seconds", "Time to answer an HTTP request, "
            "by route name (WebSockets not counted)", ("route",), registry=self.registry)
        #: exits of each process since the agent started (or the process was created),
        #: by exit code or signal name; forgotten when the process is deleted
        self.exits: dict[str, tuple[tuple[str, ...], Tally[str]]] = {}

    def hear(self, event: ProcessEvent) -> None:
        """A listener of the event bus: counts exits, forgets deleted processes."""
        if event["event"] == "process:exit":
            labels = (event["app"], event["node"], event["process_type"], event["slug"])
            code = event["signal"] or str(event["code"])
            self.exits.setdefault(event["slug"], (labels, Tally()))[1][code] += 1
        elif event["event"] == "process:delete":
            self.exits.pop(event["slug"], None)


METRICS_KEY = web.AppKey("metrics", Metrics)


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count each request by route and status, and time it (not WebSockets)."""
    metrics = request.app.get(METRICS_KEY)
    if metrics is None:
        return await handler(request)
    route = request.match_info.route.name or UNMATCHED
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as error:  # below 400 (the error middleware answers the rest)
        status = error.status
        raise
    except asyncio.CancelledError:
        # the client went away: aiohttp cancels the handler of an upgraded WebSocket as
        # its connection ends, and of a request whose client hung up (nginx's 499)
        status = 101 if request.headers.get("Upgrade", "").lower() == "websocket" else CLIENT_GONE
        raise
    finally:
        metrics.requests.labels(route, request.method, str(status)).inc()
        if status != 101:
            metrics.duration.labels(route).observe(time.perf_counter() - started)


class _Families:
    """A collector that yields metric families built beforehand (for one scrape)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Metric]:
        """The families, as given."""
        return iter(self._families)


def process_families(agent: Agent, app: str | None, metrics: Metrics) -> list[Metric]:
    """One series per process of ``app`` (every app for ``None``) in each family."""
    up = GaugeMetricFamily("smartmob_process_up", "1 while the process is running, else 0",
                           labels=PROCESS_LABELS)
    state = GaugeMetricFamily("smartmob_process_state", "1 for the state the process is in",
                              labels=(*PROCESS_LABELS, "state"))
    restarts = CounterMetricFamily("smartmob_process_restarts",
                                   "Restarts of the process", labels=PROCESS_LABELS)
    cpu = CounterMetricFamily(
        "smartmob_process_cpu_seconds", "CPU time of the current child's process tree "
        "(starts again at each child)", labels=PROCESS_LABELS)
    rss = GaugeMetricFamily("smartmob_process_rss_bytes",
                            "Resident memory of the current child's process tree",
                            labels=PROCESS_LABELS)
    lines = CounterMetricFamily("smartmob_process_output_lines",
                                "Output lines the process wrote, streamed by the agent",
                                labels=PROCESS_LABELS)
    exits = CounterMetricFamily("smartmob_process_exits", "Exits of the process's children, "
                                "by exit code or signal name", labels=(*PROCESS_LABELS, "code"))
    monitor = agent.monitor
    for watcher in agent.select(app):
        spec = watcher.spec
        labels = [spec.app, spec.node, spec.process_type, spec.slug]
        up.add_metric(labels, 1.0 if watcher.state is ProcessState.RUNNING else 0.0)
        state.add_metric([*labels, watcher.state.value], 1.0)
        restarts.add_metric(labels, watcher.restarts)
        lines.add_metric(labels, max(0, watcher.output_log.next_seq - 1))
        usage = None if watcher.pid is None else monitor.usage(watcher.pid)
        if usage is not None:
            cpu.add_metric(labels, usage.cpu_seconds)
            rss.add_metric(labels, usage.memory_rss)
        counted = metrics.exits.get(spec.slug)
        for code, count in sorted(counted[1].items()) if counted else ():
            exits.add_metric([*labels, code], count)
    return [up, state, restarts, cpu, rss, lines, exits]


def agent_families(app: web.Application) -> list[Metric]:
    """The agent's WebSocket clients, lines dropped for slow clients, and downloads."""
    clients = GaugeMetricFamily("smartmob_websocket_clients", "WebSocket clients connected, "
                                "by link", labels=("link",))
    sockets = app[SOCKETS_KEY]
    attached = list(sockets)
    clients.add_metric(["attach"], len(attached))
    clients.add_metric(["events"], len(app[EVENT_CLIENTS_KEY]))
    clients.add_metric(["host-stats"], len(app[HOST_STATS_KEY].clients))
    dropped = CounterMetricFamily(
        "smartmob_attach_lines_dropped", "Output lines not sent to attached clients too "
        "slow to take them (each client counts its own)")
    dropped.add_metric([], app[DROPPED_KEY].lines + sum(s.dropped for s in attached))
    sources = app[AGENT_KEY].sources
    downloads = CounterMetricFamily("smartmob_downloads", "Downloads of source archives "
                                    "started (conditional ones included)")
    downloads.add_metric([], 0 if sources is None else sources.downloads)
    received = CounterMetricFamily("smartmob_download_bytes",
                                   "Bytes of source archives downloaded")
    received.add_metric([], 0 if sources is None else sources.downloaded_bytes)
    return [clients, dropped, downloads, received]


def _gauge(name: str, documentation: str, label: str, values: dict[str, float]
           ) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=(label,))
    for key, value in values.items():
        family.add_metric([key], value)
    return family


def host_families(sample: HostSample) -> list[Metric]:
    """The machine's figures, and the agent's own CPU and memory."""
    cpu = CounterMetricFamily("smartmob_host_cpu_seconds", "CPU time of each core since "
                              "boot, busy or idle", labels=("cpu", "mode"))
    for number, (busy, total) in enumerate(sample.cores):
        cpu.add_metric([str(number), "busy"], busy)
        cpu.add_metric([str(number), "idle"], max(0.0, total - busy))
    network = CounterMetricFamily("smartmob_host_network_bytes", "Bytes received (in) and "
                                  "sent (out) by every interface", labels=("direction",))
    network.add_metric(["in"], sample.network["bytes_in"])
    network.add_metric(["out"], sample.network["bytes_out"])
    disk = GaugeMetricFamily("smartmob_host_disk_bytes", "The state folder's filesystem",
                             labels=("path", "kind"))
    for kind in ("total", "used", "free"):
        disk.add_metric([str(sample.disk["path"]), kind], sample.disk[kind])
    agent_cpu = CounterMetricFamily("smartmob_agent_cpu_seconds", "CPU time of the agent")
    agent_cpu.add_metric([], sample.agent_cpu)
    return [
        _gauge("smartmob_host_load_average", "Load average", "period",
               dict(zip(("1m", "5m", "15m"), sample.load, strict=True))),
        cpu,
        _gauge("smartmob_host_memory_bytes", "Memory", "kind", dict(sample.memory)),
        _gauge("smartmob_host_swap_bytes", "Swap", "kind", dict(sample.swap)),
        disk,
        network,
        GaugeMetricFamily("smartmob_host_uptime_seconds", "Seconds since the machine "
                          "booted", value=max(0.0, sample.at - sample.boot_time)),
        GaugeMetricFamily("smartmob_host_users", "User sessions open", value=sample.users),
        GaugeMetricFamily("smartmob_agent_rss_bytes", "Resident memory of the agent",
                          value=sample.agent_rss),
        agent_cpu,
    ]


@routes.get("/metrics", name="metrics")
async def scrape(request: web.Request) -> web.Response:
    """Every metric, in the text format Prometheus asks for (its ``Accept`` header)."""
    app = request.app
    agent = app[AGENT_KEY]
    metrics = app[METRICS_KEY]
    await agent.monitor.fresh()  # the CPU and memory of the trees, sampled if nobody looked
    sample = await asyncio.to_thread(read_sample, Path(agent.settings.state_dir))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([
        *process_families(agent, principal(request).app, metrics),
        *agent_families(app),
        *host_families(sample),
        *metrics.registry.collect(),
    ]))
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = await asyncio.to_thread(encode, registry)
    return web.Response(body=body, headers={"Content-Type": content_type})


def add_routes(app: web.Application) -> None:
    """Add ``GET /metrics`` (named ``metrics``), and count the agent's exits from now on.

    The application must hold the agent under ``web.api.AGENT_KEY``, and the state of
    the attach, events and host-stats routes (registered before).
    """
    metrics = app[METRICS_KEY] = Metrics()
    app[DROPPED_KEY] = Dropped()
    events = app[AGENT_KEY].events
    events.add_listener(metrics.hear)

    async def forget(_: web.Application) -> None:
        events.remove_listener(metrics.hear)

    app.on_cleanup.append(forget)
    app.add_routes(routes)
