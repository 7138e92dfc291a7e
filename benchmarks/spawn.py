"""Spawn time and memory: create -> running for many processes, and RSS with 300 children.

With the app archive already served on 127.0.0.1, measured on a fresh agent each run:

* idle: the agent's RSS (and USS) before any process, the guardian's RSS;
* serial: 10 processes created one at a time, create -> ``running`` for each
  (uncontended latency), then deleted;
* burst: 100 processes (``web: exec sleep 1000``) created at once; create -> ``running``
  per process (median, p90, max) and in total, the state found by polling
  ``GET /list-processes`` every few milliseconds;
* 300: 200 more created; once all 300 run, the agent's RSS and USS, its open file
  descriptors and threads, and the guardian's RSS;
* shutdown: SIGINT until the agent and its 300 children are gone, next to a floor: a
  bare asyncio program holding as many ``sleep 3600`` children, which on SIGINT
  SIGTERMs them and waits for them.

Targets (from the issue): agent RSS <= 40 MB with 300 running children (supervisord
holds 300 in ~29 MB). The issue gives no figure for spawn time; it is reported.

First, in this process (``--spawn-cost N``, 0 to skip): the cost of the parent-death
signal, N spawns of ``/bin/true`` each way (the ways taking turns), with ``--ballast`` MB
of memory touched (as an agent's): how long each spawn holds the event loop (the
``Popen`` call) and spawn -> exit, for a plain ``/bin/sh -c`` (as before the signal),
``spawn_shell`` (``setpriv --pdeathsig``), and ``spawn_shell`` setting it with ``prctl``
between fork and exec (the fallback where setpriv is missing, and the rejected design).

Run: ``python benchmarks/spawn.py [--burst 100] [--total 300] [--runs K]
[--spawn-cost 300] [--ballast 30]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import benchlib as b
import psutil

sys.path.insert(0, str(b.agent_code_dir()))  # the snapshot, if the header names one

from smartmob_agent.processes import spawn
from smartmob_agent.processes.reaper import Reaper

TARGET_RSS = 40 * b.MB
#: What each way of spawning is called in the output.
SPAWN_WAYS = ("plain /bin/sh -c", "setpriv --pdeathsig", "prctl in preexec_fn")


def _plain(reaper: Reaper) -> subprocess.Popen[bytes]:
    """A spawn as before the parent-death signal: ``/bin/sh -c`` and nothing else."""
    popen = subprocess.Popen(
        ["/bin/sh", "-c", "/bin/true"], cwd=Path.cwd(), env=dict(os.environ),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
        start_new_session=True, close_fds=True,
    )
    reaper.watch(popen.pid, lambda status: None)
    return popen


def _agent_way(reaper: Reaper) -> subprocess.Popen[bytes]:
    """A spawn as the agent does it (``death_signal_wrapper`` decides setpriv or prctl)."""
    return spawn.spawn_shell(
        "/bin/true", cwd=Path.cwd(), env=dict(os.environ), reaper=reaper,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def _prctl_way(reaper: Reaper) -> subprocess.Popen[bytes]:
    """A spawn as the agent does it where setpriv is missing."""
    found = spawn.death_signal_wrapper
    spawn.death_signal_wrapper = lambda: ()  # type: ignore[assignment]
    try:
        return _agent_way(reaper)
    finally:
        spawn.death_signal_wrapper = found


async def _one_spawn(
    start: Callable[[Reaper], subprocess.Popen[bytes]], reaper: Reaper
) -> tuple[float, float]:
    """One spawn: how long the start held the loop, and spawn -> exit reaped."""
    began = time.perf_counter()
    popen = start(reaper)
    held = time.perf_counter() - began
    exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    reaper.redirect(popen.pid, exited.set_result)
    await asyncio.wait_for(exited, 10)
    total = time.perf_counter() - began
    popen.returncode = 0  # reaped by the reaper: Popen must not wait for the pid
    for pipe in (popen.stdin, popen.stdout, popen.stderr):
        assert pipe is not None
        pipe.close()
    return held, total


async def spawn_cost(count: int, ballast_mb: int) -> None:
    """Print the cost of each way of spawning (see the module's docstring); the ways
    take turns, spawn by spawn, so that the machine's load weighs on each alike."""
    ballast = bytearray(ballast_mb * b.MB)
    for offset in range(0, len(ballast), 4096):  # touched: resident, like an agent's heap
        ballast[offset] = 1
    wrapper = spawn.death_signal_wrapper()
    print(f"   spawn cost: {count} spawns of /bin/true each way, in turns; this process's "
          f"RSS {b.fmt_mb(psutil.Process().memory_info().rss)}; setpriv: "
          f"{' '.join(wrapper) if wrapper else 'not available'}")
    ways = (_plain, _agent_way, _prctl_way)
    held: list[list[float]] = [[] for _ in ways]
    total: list[list[float]] = [[] for _ in ways]
    reaper = Reaper()
    for _ in range(count):
        for index, start in enumerate(ways):
            one_held, one_total = await _one_spawn(start, reaper)
            held[index].append(one_held)
            total[index].append(one_total)
    reaper.close()
    for name, times, totals in zip(SPAWN_WAYS, held, total, strict=True):
        print(f"     {name:22s} event loop held: median {1000 * b.median(times):.3f} ms, "
              f"p90 {1000 * b.percentile(times, 90):.3f} ms, total {sum(times):.3f} s; "
              f"spawn -> exit median {1000 * b.median(totals):.3f} ms")
    del ballast


async def create_all(api: b.Api, url: str, nodes: list[str]) -> dict[str, float]:
    """Create every node at once; return when each create request was sent."""
    sent: dict[str, float] = {}

    async def one(node: str) -> None:
        sent[f"bench.{node}"] = time.perf_counter()
        await api.create("bench", node, "web", url)

    await asyncio.gather(*(one(node) for node in nodes))
    return sent


async def wait_running(api: b.Api, slugs: set[str], within: float = 120.0,
                       period: float = 0.005) -> dict[str, float]:
    """Poll the listing until every slug is ``running``; return when each was first seen so."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + within
    while len(seen) < len(slugs):
        processes = await api.list()
        now = time.perf_counter()
        for document in processes:
            slug = document["slug"]
            if slug in slugs and slug not in seen:
                if document["state"] == "running":
                    seen[slug] = now
                elif document["state"] == "failed":
                    raise RuntimeError(f"{slug} failed: {document.get('error')}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(seen)} of {len(slugs)} running after {within:g} s")
        await asyncio.sleep(period)
    return seen


STOP_FLOOR_PY = r'''
import asyncio, signal, sys
async def main(n):
    procs = [await asyncio.create_subprocess_exec("sleep", "3600") for _ in range(n)]
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stop.set)
    print("ready", flush=True)
    await stop.wait()
    for proc in procs:
        proc.terminate()
    await asyncio.gather(*(proc.wait() for proc in procs))
asyncio.run(main(int(sys.argv[1])))
'''


async def stop_floor(children: int) -> float:
    """Seconds from SIGINT to the exit of a bare asyncio program that then SIGTERMs its
    ``children`` sleeping children and waits for them: the least a shutdown costs."""
    proc = await asyncio.create_subprocess_exec(
        b.PYTHON, "-c", STOP_FLOOR_PY, str(children), stdout=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL)
    assert proc.stdout is not None
    async with asyncio.timeout(60):
        await proc.stdout.readline()
    started = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    async with asyncio.timeout(60):
        await proc.wait()
    return time.perf_counter() - started


async def timed_shutdown(agent: b.AgentRunner) -> tuple[float, int]:
    """SIGINT the agent and time it until it exits, which it does once every child is
    gone (it waits for them, and reaps them); also how many of them are still there then.
    Only this is timed: the harness's checks after it (leftovers) are not part of it."""
    assert agent.proc is not None
    assert agent.pid is not None
    children = [p for p in agent.descendants() if p.pid != getattr(agent.guardian(), "pid", 0)]
    started = time.perf_counter()
    os.kill(agent.pid, signal.SIGINT)
    async with asyncio.timeout(120):
        await agent.proc.wait()
    seconds = time.perf_counter() - started
    left = 0
    for child in children:
        with contextlib.suppress(psutil.Error):
            if child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
                left += 1
    return seconds, left


def children_running(agent: b.AgentRunner, name: str) -> int:
    count = 0
    for process in agent.descendants():
        with contextlib.suppress(psutil.Error):
            if process.name() == name and process.status() != psutil.STATUS_ZOMBIE:
                count += 1
    return count


async def one_run(args: argparse.Namespace, run: int) -> dict[str, float]:
    result: dict[str, float] = {}
    profiler = b.Profiler(args.profile)
    env = b.parse_env(args.agent_env)
    async with b.bench_env(env=env, wrapper=profiler.wrapper) as (_tmpdir, server, agent, api):
        url = server.url("app.tar.gz")
        await api.index_latency()
        await asyncio.sleep(0.5)  # let start-up work finish before measuring idle memory
        guardian = agent.guardian()
        result["idle_rss"] = agent.rss()
        result["idle_uss"] = agent.uss()
        result["guardian_rss"] = guardian.memory_info().rss if guardian else float("nan")
        print(f"   run {run + 1}: agent pid {agent.pid}, idle RSS "
              f"{b.fmt_mb(result['idle_rss'])} (USS {b.fmt_mb(result['idle_uss'])}); guardian "
              f"pid {guardian.pid if guardian else '?'} RSS {b.fmt_mb(result['guardian_rss'])}")

        serial = []
        for i in range(args.serial):
            node = f"serial.{i}"
            start = time.perf_counter()
            await api.create("bench", node, "web", url)
            await api.wait_state(f"bench.{node}", ["running"], period=0.001)
            serial.append(time.perf_counter() - start)
        for i in range(args.serial):
            await api.delete(f"bench.serial.{i}")
        if serial:
            result["serial_median"] = b.median(serial)
            print(f"     serial: {args.serial} processes one at a time, create -> running "
                  f"median {1000 * b.median(serial):.1f} ms, min {1000 * min(serial):.1f} ms, "
                  f"max {1000 * max(serial):.1f} ms")

        nodes = [f"web.{i}" for i in range(args.burst)]
        cpu0 = agent.cpu()
        sent = await create_all(api, url, nodes)
        running = await wait_running(api, set(sent))
        cpu = agent.cpu() - cpu0
        latencies = [running[slug] - sent[slug] for slug in sent]
        total = max(running.values()) - min(sent.values())
        result.update(burst_total=total, burst_median=b.median(latencies))
        print(f"     burst: {args.burst} created at once, all running after {total:.3f} s; "
              f"create -> running per process median {1000 * b.median(latencies):.0f} ms, "
              f"p90 {1000 * b.percentile(latencies, 90):.0f} ms, max "
              f"{1000 * max(latencies):.0f} ms; agent CPU {cpu:.2f} s "
              f"({1000 * cpu / args.burst:.1f} ms per process); {server.hits} downloads")

        more = [f"web.{i}" for i in range(args.burst, args.total)]
        if more:
            sent = await create_all(api, url, more)
            await wait_running(api, set(sent), period=0.05)
        await asyncio.sleep(1.0)  # let the last spawns' transient buffers go
        processes = await api.list()
        states = {d["state"] for d in processes}
        sleeping = children_running(agent, "sleep")
        guardian = agent.guardian()
        result.update(
            rss=agent.rss(), uss=agent.uss(),
            guardian_rss_after=guardian.memory_info().rss if guardian else float("nan"),
        )
        assert agent.ps is not None
        print(f"     {len(processes)} processes, states {sorted(states)}, {sleeping} 'sleep' "
              f"children alive: agent RSS {b.fmt_mb(result['rss'])} (USS "
              f"{b.fmt_mb(result['uss'])}, {agent.ps.num_fds()} fds, "
              f"{agent.ps.num_threads()} threads); guardian RSS "
              f"{b.fmt_mb(result['guardian_rss_after'])}; "
              f"{(result['rss'] - result['idle_rss']) / len(processes) / 1024:.0f} KiB "
              "per process above idle")
        if args.keepalive_wait > 0:
            # aiohttp's download session keeps idle connections for 15 s: measure again
            # once they are gone, for the steady state
            await asyncio.sleep(args.keepalive_wait)
            result["rss_steady"] = agent.rss()
            print(f"     {args.keepalive_wait:g} s later (download keep-alive expired): agent "
                  f"RSS {b.fmt_mb(result['rss_steady'])}, USS {b.fmt_mb(agent.uss())}")
        result["stop_seconds"], left = await timed_shutdown(agent)
    if left:
        print(f"  ! {left} of the agent's children outlived it")
    result["stop_floor"] = await stop_floor(args.total)
    print(f"     SIGINT -> agent and {args.total} children gone: {result['stop_seconds']:.2f} s "
          f"(floor: a bare asyncio program terminating as many, {result['stop_floor']:.2f} s)")
    profiler.report(args.top)
    return result


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--serial", type=int, default=10)
    parser.add_argument("--burst", type=int, default=100)
    parser.add_argument("--total", type=int, default=300)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--keepalive-wait", type=float, default=16.0,
                        help="seconds to wait before measuring RSS again (0: skip)")
    parser.add_argument("--agent-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment variable for the agent (experiments, e.g. "
                        "MALLOC_ARENA_MAX=2)")
    parser.add_argument("--spawn-cost", type=int, default=300, metavar="N",
                        help="spawns of /bin/true each way to measure the parent-death "
                        "signal's cost (0: skip)")
    parser.add_argument("--ballast", type=int, default=30, metavar="MB",
                        help="memory this process touches first, as an agent's, for "
                        "--spawn-cost (fork copies its page tables)")
    parser.add_argument("--profile", choices=("none", "cprofile", "py-spy"), default="none")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    b.header("spawn time and memory with many children")
    if args.spawn_cost > 0:
        await spawn_cost(args.spawn_cost, args.ballast)
    results = [await one_run(args, run) for run in range(args.runs)]
    if not results:
        return 0
    rss = b.median([r["rss"] for r in results])
    steady = b.median([r.get("rss_steady", float("nan")) for r in results])
    print("\n-- summary (medians over runs) --")
    print(f"   idle agent RSS {b.fmt_mb(b.median([r['idle_rss'] for r in results]))}, "
          f"guardian RSS {b.fmt_mb(b.median([r['guardian_rss'] for r in results]))}")
    print(f"   {args.burst} at once: all running in "
          f"{b.median([r['burst_total'] for r in results]):.3f} s, per-process median "
          f"{1000 * b.median([r['burst_median'] for r in results]):.0f} ms")
    guardian = b.median([r["guardian_rss_after"] for r in results])
    print(f"   agent RSS with {args.total} running children: {b.fmt_mb(rss)} "
          f"(target <= {b.fmt_mb(TARGET_RSS)}: {b.verdict(rss <= TARGET_RSS)}); "
          f"agent + guardian {b.fmt_mb(rss + guardian)}")
    print(f"   shutdown (SIGINT -> agent and {args.total} children gone): "
          f"{b.median([r['stop_seconds'] for r in results]):.2f} s; floor "
          f"{b.median([r['stop_floor'] for r in results]):.2f} s")
    if args.keepalive_wait > 0:
        print(f"   agent RSS {args.keepalive_wait:g} s later: {b.fmt_mb(steady)} (target <= "
              f"{b.fmt_mb(TARGET_RSS)}: {b.verdict(steady <= TARGET_RSS)})")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
