"""Events WebSocket throughput: events per second from the bus to one subscriber.

A server subprocess (127.0.0.1) serves ``/events`` with the agent's own code
(``smartmob_agent.web.events`` on an ``EventBus``, as the agent wires it) and, once one
client has subscribed, publishes ``--events`` ``process:state`` events (~210 bytes of
JSON each, made before the clock starts) in chunks of 100, each chunk only once that
client's queue holds at most half of its 1000 events, so none is dropped: the figure is
the rate the socket delivers, not the bus's drop policy. A real agent cannot make events
this fast (they follow what its processes do); bursts (a deploy of many processes, a
shutdown) are what this stands for.

Clients, one per measurement:

* **plain**: the plainest aiohttp follower (``async for msg in ws``, each frame
  ``json.loads``-ed, as a dashboard would);
* **raw**: a minimal client that parses frame headers only (``benchlib.RawWebSocket``),
  to tell the server's limit from the client's.

Servers, in the same run:

* **agent**: the package the benchmark runs (``BENCH_AGENT_PYTHONPATH`` or the
  repository);
* **before** (``--before DIR``): a snapshot of another version of the package (``git
  archive <rev> smartmob_agent | tar -x -C DIR``), e.g. the one before batching;
* **floor**: a bare aiohttp WebSocket handler that ``send_str``\\ s the same pre-encoded
  events, one call each, from a list (no bus): what aiohttp alone does per event.

Printed: events/s (first to last frame at the client), events received and dropped, and
the server's CPU (user+sys) per 100,000 events. First as fast as the client takes them
(the server then outruns the client, and asyncio's transport buffers what the socket
does not take: writes coalesce by themselves), then paced (``--rate``, 20,000 events/s in
bursts of 20, to the raw client: ``--paced-events`` of them), where the client keeps up
and every write reaches the socket: the CPU figure there is what batching saves.

Run: ``python benchmarks/events_throughput.py [--events 200000] [--rate 20000]
[--paced-events 100000] [--runs K] [--before DIR]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import benchlib as b

SERVER_PY = r'''
import asyncio, json, sys
from aiohttp import web

mode, total, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
CHUNK = 100 if rate == 0 else 20

def make(n):
    from smartmob_agent.events.bus import make_event
    return make_event("process:state", slug="bench.web.0", app="bench", node="web.0",
                      process_type="web", pid=n, state="running", previous="starting")

async def floor(request):
    ws = web.WebSocketResponse(compress=False)
    await ws.prepare(request)
    for start in range(0, total, CHUNK):
        for text in TEXTS[start:start + CHUNK]:
            await ws.send_str(text)
        await asyncio.sleep(CHUNK / rate if rate else 0)
    await ws.receive()
    return ws

async def publish(bus, events):
    while bus.subscriber_count < 1:
        await asyncio.sleep(0.01)
    queue = bus._queues[0]
    for start in range(0, total, CHUNK):
        while len(queue) > queue.maxsize // 2:  # the client's pace, without spinning
            await asyncio.sleep(0.001)
        for event in events[start:start + CHUNK]:
            bus.publish(event)
        await asyncio.sleep(CHUNK / rate if rate else 0)
    print("dropped", queue.dropped, flush=True)

async def main():
    app = web.Application()
    if mode == "floor":
        global TEXTS
        TEXTS = [json.dumps(make(n), separators=(",", ":")) for n in range(total)]
        app.router.add_get("/events", floor)
    else:
        from smartmob_agent.events.bus import EventBus
        from smartmob_agent.keys import ADMIN
        from smartmob_agent.web.api import PRINCIPAL_KEY
        from smartmob_agent.web.events import EVENT_BUS_KEY, add_routes

        @web.middleware
        async def as_admin(request, handler):  # an agent without keys names the admin
            request[PRINCIPAL_KEY] = ADMIN
            return await handler(request)

        app.middlewares.append(as_admin)
        app[EVENT_BUS_KEY] = bus = EventBus()
        add_routes(app)
        events = [make(n) for n in range(total)]  # made before the clock starts
        asyncio.get_running_loop().create_task(publish(bus, events))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    print("port", port, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
'''


async def plain_client(url: str, total: int) -> tuple[int, float]:
    """Events received by ``async for msg in ws`` (each parsed), and the seconds from the
    first to the last."""
    received = 0
    first = last = 0.0
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        async for message in ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            json.loads(message.data)
            last = time.perf_counter()
            if not received:
                first = last
            received += 1
            if received >= total:
                break
    return received, last - first


async def raw_client(url: str, total: int) -> tuple[int, float]:
    """Events received by a client that only parses frame headers, and the seconds."""
    client = await b.RawWebSocket.connect(url, total)
    try:
        async with asyncio.timeout(120):
            await client.done
    finally:
        client.close()
    return client.count.lines, client.count.last - client.count.first


async def measure(mode: str, code: Path | None, client: str, total: int, rate: float) -> str:
    """One server, one client: the printed line."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(code or b.agent_code_dir()), env.get("PYTHONPATH")) if p)
    server = await asyncio.create_subprocess_exec(
        # cwd: not the repository, whose package ``python -c`` would find before PYTHONPATH
        b.PYTHON, "-c", SERVER_PY, mode, str(total), str(rate), env=env, cwd=tempfile.gettempdir(),
        stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
    try:
        assert server.stdout is not None
        async with asyncio.timeout(30):
            port = int((await server.stdout.readline()).split()[1])
        cpu0 = b.precise_cpu(server.pid)
        url = f"ws://127.0.0.1:{port}/events"
        async with asyncio.timeout(300):
            received, seconds = await (plain_client if client == "plain" else raw_client)(
                url, total)
        cpu = b.precise_cpu(server.pid) - cpu0
        dropped = "-"
        if mode != "floor":
            async with asyncio.timeout(30):
                dropped = (await server.stdout.readline()).decode().split()[1]
        rate = received / seconds if seconds > 0 else float("nan")
        return (f"   {mode:7} -> {client:5} client: {received:,} of {total:,} events "
                f"(dropped {dropped}) in {seconds:.3f} s = {rate:,.0f} events/s; "
                f"server CPU {cpu / received * 100_000:.3f} s per 100k events")
    finally:
        server.kill()
        await server.wait()


async def run(args: argparse.Namespace) -> None:
    servers: list[tuple[str, Path | None]] = [("floor", None), ("agent", None)]
    if args.before:
        servers.insert(1, ("before", Path(args.before)))
    for run_number in range(1, args.runs + 1):
        print(f"-- run {run_number} (load average {b.load()})")
        print("   as fast as the client takes them:")
        for client in ("plain", "raw"):
            for mode, code in servers:
                print(await measure(mode, code, client, args.events, 0), flush=True)
        if args.rate:
            print(f"   paced: bursts of 20 events, {args.rate:,.0f} events/s at most:")
            for mode, code in servers:
                print(await measure(mode, code, "raw", args.paced_events, args.rate),
                      flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--rate", type=float, default=20_000,
                        help="events/s of the paced measurement (0: skip it)")
    parser.add_argument("--paced-events", type=int, default=100_000)
    parser.add_argument("--before", help="a snapshot folder holding another smartmob_agent")
    args = parser.parse_args()
    b.header("events WebSocket: events per second to one subscriber")
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
