"""The ``host-stats`` link: a snapshot of the machine as JSON, or the same pushed over a
WebSocket every ``interval`` seconds.

``GET /host-stats`` answers one snapshot (:func:`~smartmob_agent.host.shape.snapshot_document`),
its CPU figures measured over :data:`CPU_WINDOW` seconds. The same URL opened as a
WebSocket (``?interval=`` seconds, :data:`~smartmob_agent.host.control.DEFAULT_INTERVAL`
by default) sends JSON text frames, each with a ``type``:

- ``settings``: ``{"type": "settings", "interval": s, "paused": bool}``, first, and after
  each message of the client that changed something;
- ``snapshot``: the GET's document plus ``"type": "snapshot"``, every ``interval`` seconds
  while not paused, its CPU figures measured since the snapshot before (the first one
  after :data:`CPU_WINDOW` seconds, measured over them);
- ``error``: ``{"type": "error", "error": sentence, "interval": s, "paused": bool}``,
  for a message it could not use (nothing changes).

The client sends ``{"interval": s}``, ``{"stop": true}`` or ``{"start": true}``
(:func:`~smartmob_agent.host.control.parse_control`). Each client has its own interval
and its own CPU window. Closing and key revocation work as for the ``events`` socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import weakref
from pathlib import Path
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from smartmob_agent.host.control import Control, interval_query, parse_control
from smartmob_agent.host.gather import read_sample
from smartmob_agent.host.plugins import Plugins
from smartmob_agent.host.shape import HostContext, HostSample, snapshot_document
from smartmob_agent.web.api import AGENT_KEY, principal, watch_key
from smartmob_agent.web.events import CLOSE_TIMEOUT, HEARTBEAT, EventClient

#: The host-stats route; :func:`smartmob_agent.web.server.make_app` registers it.
routes = web.RouteTableDef()

#: Seconds the CPU figures of a GET (and of the first push of a WebSocket) are measured
#: over: CPU use is a rate, and a rate needs two samples some time apart.
CPU_WINDOW = 0.25


class HostStats:
    """What the host-stats link keeps for the life of the application: the plugins
    (loaded at the first snapshot) and the open WebSockets."""

    def __init__(self, plugins: Plugins | None = None) -> None:
        self._plugins = plugins
        self.clients: weakref.WeakSet[EventClient] = weakref.WeakSet()

    @property
    def plugins(self) -> Plugins:
        """The installed plugins (loaded on first use: scanning entry points takes a while)."""
        if self._plugins is None:
            self._plugins = Plugins.installed()
        return self._plugins


HOST_STATS_KEY = web.AppKey("host_stats", HostStats)


async def take_snapshot(
    request: web.Request, previous: HostSample | None
) -> tuple[HostSample, dict[str, Any]]:
    """A sample of the machine now, and the snapshot document (CPU since ``previous``),
    showing the processes and plugin sections the request's key may see."""
    agent = request.app[AGENT_KEY]
    processes = tuple(agent.list(principal(request).app))
    plugins = request.app[HOST_STATS_KEY].plugins
    context = HostContext(processes, agent.settings.state_dir)

    def gather() -> tuple[HostSample, dict[str, dict[str, Any]]]:
        return read_sample(Path(agent.settings.state_dir)), plugins.run(context)

    sample, sections = await asyncio.to_thread(gather)
    return sample, snapshot_document(sample, previous, processes, sections)


@routes.get("/host-stats", name="host_stats")
async def host_stats(request: web.Request) -> web.StreamResponse:
    """One snapshot of the machine as JSON; as a WebSocket, one every ``interval`` seconds.

    Raises:
        ~smartmob_agent.errors.InvalidRequest: a bad ``interval`` (from 0.5 to 3600 seconds).
    """
    interval = interval_query(request.query.getall("interval", []))
    ws = web.WebSocketResponse(heartbeat=HEARTBEAT, max_msg_size=4096)
    if not ws.can_prepare(request).ok:
        baseline, _ = await take_snapshot(request, None)
        await asyncio.sleep(CPU_WINDOW)  # the window the CPU figures are measured over
        _, document = await take_snapshot(request, baseline)
        return web.json_response(document)
    await ws.prepare(request)
    assert request.transport is not None, "a prepared WebSocket has a transport"
    client = EventClient(ws, request.transport)
    clients = request.app[HOST_STATS_KEY].clients
    clients.add(client)
    watch_key(request, client)
    try:
        await _Pusher(request, ws, client, interval).serve()
    finally:
        client.done.set()
        clients.discard(client)
    return ws


class _Pusher:
    """One client's snapshots: its interval, whether it paused, its CPU window."""

    def __init__(
        self, request: web.Request, ws: web.WebSocketResponse, client: EventClient,
        interval: float,
    ) -> None:
        self.request, self.ws, self.client = request, ws, client
        self.interval = interval
        self.paused = False
        self.previous: HostSample | None = None
        self.due = 0.0  # when the next snapshot is due, on the loop's clock

    def _settings(self, kind: str = "settings", **extra: Any) -> str:
        return json.dumps({"type": kind, **extra, "interval": self.interval,
                           "paused": self.paused})

    async def _restart_window(self) -> None:
        """Take the sample the next snapshot's CPU figures are measured from."""
        self.previous, _ = await take_snapshot(self.request, None)
        self.due = asyncio.get_running_loop().time() + CPU_WINDOW

    async def serve(self) -> None:
        """Push snapshots and obey the client's messages until either side leaves."""
        loop = asyncio.get_running_loop()
        leaving = loop.create_task(self.client.leave.wait())
        receiving = loop.create_task(self.ws.receive())
        try:
            with contextlib.suppress(ConnectionResetError):  # the client went away mid-send
                await self.ws.send_str(self._settings())
                await self._restart_window()
                while not leaving.done():
                    wait = None if self.paused else max(0.0, self.due - loop.time())
                    done, _ = await asyncio.wait(
                        {leaving, receiving}, timeout=wait,
                        return_when=asyncio.FIRST_COMPLETED)
                    if receiving in done:
                        if not await self._obey(receiving.result()):
                            return  # the client closed: aiohttp answered its close
                        receiving = loop.create_task(self.ws.receive())
                    elif not done and not self.paused:
                        await self._push()
            if not receiving.done():  # the client is still there: close, as only we may
                await _cancel(receiving)
                await self._close()
        finally:
            leaving.cancel()
            receiving.cancel()

    async def _push(self) -> None:
        sample, document = await take_snapshot(self.request, self.previous)
        self.previous = sample
        self.due = asyncio.get_running_loop().time() + self.interval
        await self.ws.send_str(json.dumps({"type": "snapshot", **document}))

    async def _obey(self, message: Any) -> bool:
        """Act on one frame of the client; ``False`` once it is gone."""
        if message.type in {WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED,
                            WSMsgType.ERROR}:
            return False
        try:
            if message.type is not WSMsgType.TEXT:
                raise ValueError("send messages as JSON text frames")
            control = parse_control(message.data)
        except ValueError as error:
            await self.ws.send_str(self._settings("error", error=str(error)))
            return True
        await self._apply(control)
        await self.ws.send_str(self._settings())
        return True

    async def _apply(self, control: Control) -> None:
        if control.interval is not None:
            # the next snapshot comes one new interval after the last one
            self.due += control.interval - self.interval
            self.interval = control.interval
        if control.paused is True:
            self.paused = True
        elif control.paused is False and self.paused:
            self.paused = False
            await self._restart_window()  # not CPU use over the whole pause

    async def _close(self) -> None:
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.ws.close(code=self.client.code, message=self.client.message)
        except TimeoutError:  # the client stopped reading: the frame cannot drain
            self.client.transport.abort()


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(BaseException):
        await task


async def close_host_sockets(app: web.Application) -> None:
    """``on_shutdown``: tell every host-stats client that the agent is going away (1001)."""
    await asyncio.gather(*(
        client.shutdown(WSCloseCode.GOING_AWAY, b"agent shutting down")
        for client in list(app[HOST_STATS_KEY].clients)
    ))


def add_routes(app: web.Application, plugins: Plugins | None = None) -> None:
    """Add ``GET /host-stats`` (named ``host_stats``) and the shutdown hook of its sockets.

    Args:
        app: the application, holding the agent under ``web.api.AGENT_KEY``.
        plugins: the plugins to run (default: the installed ones, loaded when first
            needed).
    """
    app[HOST_STATS_KEY] = HostStats(plugins)
    app.add_routes(routes)
    app.on_shutdown.append(close_host_sockets)

