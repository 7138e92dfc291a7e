"""300 creates until all run: how long from the first create request to the moment every
process runs, next to a bare asyncio floor.

On a fresh agent (the app archive served on 127.0.0.1), a client attached to the
``events`` WebSocket sends N create requests (default 300, ``idle: exec sleep 3600``) at
once over ``--connections`` (20) keep-alive connections, and the clock stops when the
last ``process:state`` event with ``running`` arrives (no polling: a listing every few
ms would cost the agent more than what it measures). Also the agent's CPU over that time.

Floor, in the same run: a bare aiohttp server (~60 lines) that, for each create request,
parses the JSON body, writes one row to SQLite (committed), makes a folder, spawns
``sleep 3600`` with its output on pipes (``subprocess.Popen``, as the agent does; asyncio's
own child watcher of 3.11 starts a thread per child), and answers 201: what one HTTP call, one
database write and one spawn cost at the least, through the same client.

Target (issue 15): <= 1.5 s for 300 (it was 2.3 s; Circus 1.9, PM2 3.3, supervisord 3.3,
a 200-line asyncio floor 0.58).

Run: ``python benchmarks/create_300.py [--count 300] [--runs K] [--profile cprofile]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import aiohttp
import benchlib as b

TARGET = 1.5

FLOOR_PY = r'''
import asyncio, json, os, sqlite3, subprocess, sys
from aiohttp import web
folder = sys.argv[1]
db = sqlite3.connect(os.path.join(folder, "floor.db"), isolation_level=None)
db.execute("create table processes (slug text primary key, spec text)")
children = []
async def create(request):
    spec = await request.json()
    slug = f"{spec['app']}.{spec['node']}"
    db.execute("insert into processes values (?, ?)", (slug, json.dumps(spec)))
    work = os.path.join(folder, slug)
    os.mkdir(work)
    proc = subprocess.Popen(
        ["sleep", "3600"], cwd=work, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    children.append(proc)
    return web.json_response({"slug": slug, "state": "running"}, status=201)
async def cleanup(app):
    for proc in children:
        proc.kill()
        proc.wait()
app = web.Application()
app.router.add_post("/create-process", create)
app.on_cleanup.append(cleanup)
async def main():
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(runner.addresses[0][1], flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
'''


async def send_creates(base: str, url: str, count: int, connections: int,
                       prefix: str) -> float:
    """Send ``count`` create requests at once; return when the first was sent."""
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one(i: int) -> None:
            body = {"app": "bench", "node": f"{prefix}.{i}", "process_type": "idle",
                    "source_url": url}
            async with session.post(f"{base}/create-process", json=body) as response:
                if response.status != 201:
                    raise RuntimeError(f"create: {response.status} {await response.text()}")
                await response.read()

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(count)))
    return started


async def floor(tmpdir: Path, count: int, connections: int) -> float:
    """Seconds for the floor server to answer ``count`` creates (each spawned)."""
    folder = tmpdir / "floor"
    folder.mkdir()
    proc = await asyncio.create_subprocess_exec(
        b.PYTHON, "-c", FLOOR_PY, str(folder), stdout=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            port = int(await proc.stdout.readline())
        started = await send_creates(f"http://127.0.0.1:{port}", "unused", count,
                                     connections, "floor")
        return time.perf_counter() - started
    finally:
        proc.terminate()  # its on_cleanup kills the sleeps
        await proc.wait()


async def through_agent(api: b.Api, agent: b.AgentRunner, url: str, count: int,
                        connections: int, run: int) -> dict[str, float]:
    """Seconds from the first create until every process runs, and the agent's CPU."""
    index = await (await api.session.get(f"{api.base}/")).json()
    prefix = f"c{run}"
    wanted = {f"bench.{prefix}.{i}" for i in range(count)}
    running: set[str] = set()
    done = asyncio.get_running_loop().create_future()
    async with api.session.ws_connect(index["events"]) as ws:
        async def watch() -> None:
            async for message in ws:
                event = json.loads(message.data)
                if event.get("event") == "process:state" and event.get("state") == "running":
                    running.add(event["slug"])
                    if wanted <= running and not done.done():
                        done.set_result(time.perf_counter())
        watcher = asyncio.get_running_loop().create_task(watch())
        cpu0 = agent.cpu()
        started = await send_creates(api.base, url, count, connections, prefix)
        answered = time.perf_counter()
        try:
            async with asyncio.timeout(120):
                finished = await done
        finally:
            watcher.cancel()
        cpu = agent.cpu() - cpu0
    return {"seconds": finished - started, "answered": answered - started, "cpu": cpu}


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--profile", choices=("none", "cprofile", "py-spy"), default="none")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    b.header(f"{args.count} creates until all run")
    profiler = b.Profiler(args.profile)
    rows: list[dict[str, float]] = []
    floors: list[float] = []
    for run in range(args.runs):
        async with b.bench_env(wrapper=profiler.wrapper) as (tmpdir, server, agent, api):
            floors.append(await floor(tmpdir, args.count, args.connections))
            await api.index_latency()
            result = await through_agent(api, agent, server.url("app.tar.gz"), args.count,
                                         args.connections, run)
            rows.append(result)
            print(f"   run {run + 1}: agent: all {args.count} running after "
                  f"{result['seconds']:.3f} s (all answered 201 after {result['answered']:.3f}"
                  f" s), agent CPU {result['cpu']:.2f} s; floor (bare aiohttp + SQLite + "
                  f"spawn) {floors[-1]:.3f} s; {server.hits} download(s)")
    seconds = b.median([r["seconds"] for r in rows])
    print(f"\n-- summary (medians; load average now {b.load()}) --")
    print(f"   {args.count} creates until all run: {seconds:.3f} s (agent CPU "
          f"{b.median([r['cpu'] for r in rows]):.2f} s), floor {b.median(floors):.3f} s "
          f"[<= {TARGET} s: {b.verdict(seconds <= TARGET)}]")
    profiler.report(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
