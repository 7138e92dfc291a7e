"""Restart speed and crash-loop cost.

* restart: a long-running child (``web: exec sleep 1000``) is killed with SIGKILL, then
  ``GET /process-status`` is polled back to back (each poll bounded, at most 2 s per
  iteration) until a new pid is reported in state ``running``. Before each kill the child
  has run longer than the backoff policy's reset time (1 s), so the restart is immediate
  by policy. Reported: median, p90, min and max over the iterations (default 20), and how
  many polls that took; the poll round trip (~0.5 ms) bounds the resolution.
* crash loop: a process whose command exits at once (``crash: exit 1``); the agent's CPU
  (user+sys) over 10 s while it keeps retrying with backoff, nothing polling it during
  the window, and how many restarts happened; plus the idle agent's CPU over the same
  length of time for reference.

Floor of the restart, in the same run: a bare aiohttp server whose task restarts its
``sleep 1000`` child at once when it exits and answers its pid; the same kill -9 and
polling.

Targets (from the issue): median kill -> replacement running <= 10 ms; agent CPU <= 0.05 s
over 10 s of crash loop.

Run: ``python benchmarks/restart.py [--iterations 20] [--window 10] [--runs K]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time

import aiohttp
import benchlib as b
import psutil

TARGET_RESTART = 0.010
TARGET_CRASH_CPU = 0.05
#: The backoff policy restarts at once only after a run at least this long.
RESET_AFTER = 1.0


async def restarts(agent: b.AgentRunner, api: b.Api, url: str, iterations: int,
                   run: int) -> list[float]:
    slug = f"bench.web.r{run}"
    await api.create("bench", f"web.r{run}", "web", url)
    document = await api.wait_state(slug, ["running"])
    times: list[float] = []
    polls_used: list[int] = []
    failures = 0
    for _ in range(iterations):
        pid = document["pid"]
        # long enough that the policy restarts at once instead of backing off
        await asyncio.sleep(RESET_AFTER + 0.15)
        polls = 0
        start = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        deadline = start + 2.0
        while time.perf_counter() < deadline:
            document = await api.status(slug)
            polls += 1
            if document["state"] == "running" and document["pid"] not in (None, pid):
                times.append(time.perf_counter() - start)
                polls_used.append(polls)
                break
        else:
            failures += 1
            document = await api.wait_state(slug, ["running"])
    end = await api.status(slug)
    await api.delete(slug)
    print(f"   run {run + 1} restart after kill -9: {len(times)} of {iterations} measured"
          f"{f' ({failures} not within 2 s)' if failures else ''}: median "
          f"{1000 * b.median(times):.2f} ms, p90 {1000 * b.percentile(times, 90):.2f} ms, "
          f"min {1000 * min(times):.2f} ms, max {1000 * max(times):.2f} ms; polls per "
          f"restart median {b.median(polls_used):.0f}; restarts counted by the agent "
          f"{end['restarts']}")
    return times


FLOOR_PY = r'''
import asyncio
from aiohttp import web
current = {"pid": None}
async def supervise(started):
    while True:  # restart at once, as the agent's policy does after a long enough run
        proc = await asyncio.create_subprocess_exec("sleep", "1000")
        current["pid"] = proc.pid
        started.set()
        await proc.wait()
async def pid(request):
    return web.json_response(current)
async def main():
    app = web.Application()
    app.router.add_get("/", pid)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    started = asyncio.Event()
    task = asyncio.ensure_future(supervise(started))
    await started.wait()
    print(site._server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
'''


async def floor_restarts(iterations: int) -> list[float]:
    """The same measurement on a bare aiohttp server whose task restarts its ``sleep``
    child at once when it exits, and answers the child's pid: kill -9, then GET until
    a new pid shows."""
    proc = await asyncio.create_subprocess_exec(
        b.PYTHON, "-c", FLOOR_PY, stdout=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL)
    times: list[float] = []
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            port = int(await proc.stdout.readline())
        url = f"http://127.0.0.1:{port}/"
        async with aiohttp.ClientSession() as session:
            async def current() -> int | None:
                async with session.get(url) as response:
                    return (await response.json())["pid"]  # type: ignore[no-any-return]
            pid = await current()
            for _ in range(iterations):
                await asyncio.sleep(0.2)
                start = time.perf_counter()
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
                deadline = start + 2.0
                while time.perf_counter() < deadline:
                    found = await current()
                    if found is not None and found != pid:
                        times.append(time.perf_counter() - start)
                        pid = found
                        break
    finally:
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(proc.pid).children():
                child.kill()
        proc.kill()
        await proc.wait()
    print(f"   floor (bare aiohttp + asyncio restarting its child) restart after kill -9: "
          f"median {1000 * b.median(times):.2f} ms, min {1000 * min(times):.2f} ms, "
          f"max {1000 * max(times):.2f} ms over {len(times)}")
    return times


async def crash_loop(agent: b.AgentRunner, api: b.Api, url: str, window: float,
                     run: int) -> dict[str, float]:
    cpu0 = agent.cpu()
    await asyncio.sleep(window)
    idle = agent.cpu() - cpu0
    slug = f"bench.crash.{run}"
    lines0 = agent.stderr_lines
    await api.create("bench", f"crash.{run}", "crash", url)
    # provisioned once it has left pending/downloading/unpacking
    document = await api.wait_state(slug, ["starting", "running", "backoff"], period=0.002)
    restarts0 = document["restarts"]
    cpu0 = agent.cpu()
    await asyncio.sleep(window)  # nothing polls the agent meanwhile
    cpu = agent.cpu() - cpu0
    document = await api.status(slug)
    restarts = document["restarts"] - restarts0
    # a second window: the backoff has grown, this is the steady state of a crash loop
    cpu1 = agent.cpu()
    restarts1 = document["restarts"]
    await asyncio.sleep(window)
    cpu_later = agent.cpu() - cpu1
    document = await api.status(slug)
    restarts_later = document["restarts"] - restarts1
    await api.delete(slug)
    print(f"   run {run + 1} idle agent CPU over {window:g} s: {idle:.3f} s")
    print(f"   run {run + 1} crash loop, first {window:g} s: agent CPU {cpu:.3f} s, "
          f"{restarts} restarts; next {window:g} s: {cpu_later:.3f} s, {restarts_later} "
          f"restarts; state now {document['state']!r}, last exit {document['last_exit']}, "
          f"{agent.stderr_lines - lines0} agent log lines")
    return {"idle": idle, "cpu": cpu, "restarts": restarts, "cpu_later": cpu_later}


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--window", type=float, default=10.0, help="crash-loop seconds")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--skip-crash", action="store_true")
    args = parser.parse_args()
    b.header("restart after kill -9, and the cost of a crash loop")
    all_times: list[float] = []
    loops: list[dict[str, float]] = []
    async with b.bench_env() as (_tmpdir, server, agent, api):
        url = server.url("app.tar.gz")
        print(f"   agent pid {agent.pid}")
        for run in range(args.runs):
            all_times += await restarts(agent, api, url, args.iterations, run)
            if not args.skip_crash:
                loops.append(await crash_loop(agent, api, url, args.window, run))
    floor = b.median(await floor_restarts(args.iterations))
    median = b.median(all_times)
    print("\n-- summary --")
    print(f"   kill -9 -> replacement running: median {1000 * median:.2f} ms over "
          f"{len(all_times)} restarts (target <= {1000 * TARGET_RESTART:g} ms: "
          f"{b.verdict(median <= TARGET_RESTART)}); floor {1000 * floor:.2f} ms")
    if loops:
        worst = max(loop["cpu"] for loop in loops)
        print(f"   crash loop: agent CPU over the first {args.window:g} s at most {worst:.3f} s "
              f"with {min(loop['restarts'] for loop in loops):.0f}-"
              f"{max(loop['restarts'] for loop in loops):.0f} restarts (target <= "
              f"{TARGET_CRASH_CPU} s: {b.verdict(worst <= TARGET_CRASH_CPU)}); idle agent "
              f"{max(loop['idle'] for loop in loops):.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
