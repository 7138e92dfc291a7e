"""Idle CPU: what the agent (and its guardian) use over 10 s with N idle children.

For each N (default 100 and 300) on a fresh agent: N processes (``idle: exec sleep
3600``) are created and waited for until all run; then, with nothing asking the agent
anything, the CPU (user+sys, psutil) of the agent and of its guardian over ``--window``
seconds (10). Then the same window while a client asks for the listing every 2 s (someone
looking at the figures), for reference.

CPU is read from ``/proc/PID/task/*/schedstat`` (nanoseconds), not psutil's CPU times
(10 ms ticks). Floor, in the same run: a bare asyncio program (``create_subprocess_exec``
of N ``sleep 3600``, then ``await proc.wait()`` on each) over the same window: what
holding N children costs at the least.

Target (issue 15): <= 5 ms of agent CPU per 10 s with 100 idle children (it was 64 ms;
127 ms with 300).

Run: ``python benchmarks/idle_cpu.py [--children 100 300] [--window 10] [--runs K]``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import benchlib as b
import psutil

TARGET_MS = 5.0

FLOOR_PY = r'''
import asyncio, sys
async def main(n):
    procs = [await asyncio.create_subprocess_exec("sleep", "3600") for _ in range(n)]
    print("ready", flush=True)
    await asyncio.gather(*(p.wait() for p in procs))
asyncio.run(main(int(sys.argv[1])))
'''


async def floor(children: int, window: float) -> float:
    """CPU seconds of a bare asyncio program holding ``children`` sleeping children over
    ``window`` seconds."""
    proc = await asyncio.create_subprocess_exec(
        b.PYTHON, "-c", FLOOR_PY, str(children), stdout=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(60):
            await proc.stdout.readline()
        await asyncio.sleep(1.0)  # start-up work done
        cpu0 = b.precise_cpu(proc.pid)
        await asyncio.sleep(window)
        return b.precise_cpu(proc.pid) - cpu0
    finally:
        for child in psutil.Process(proc.pid).children():
            child.kill()
        proc.kill()
        await proc.wait()


async def create_idle(api: b.Api, url: str, count: int) -> None:
    """Create ``count`` idle processes, 50 requests at a time, and wait until all run."""
    nodes = [f"idle.{i}" for i in range(count)]
    for start in range(0, count, 50):
        await asyncio.gather(*(api.create("bench", node, "idle", url)
                               for node in nodes[start:start + 50]))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        states = [d["state"] for d in await api.list()]
        if states.count("running") >= count:
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"not all of {count} processes run after 120 s")


async def measure(agent: b.AgentRunner, window: float, api: b.Api | None = None,
                  every: float = 2.0) -> tuple[float, float]:
    """Agent and guardian CPU seconds over ``window`` (listing every ``every`` s if
    ``api`` is given)."""
    guardian = agent.guardian()
    guardian_pid = guardian.pid if guardian is not None else 0
    cpu0, guard0 = b.precise_cpu(agent.pid), b.precise_cpu(guardian_pid)
    end = time.monotonic() + window
    while (left := end - time.monotonic()) > 0:
        if api is not None:
            await api.list()
        await asyncio.sleep(min(left, every))
    return b.precise_cpu(agent.pid) - cpu0, b.precise_cpu(guardian_pid) - guard0


async def one(children: int, window: float, settle: float,
              agent_args: list[str]) -> dict[str, float]:
    result: dict[str, float] = {}
    result["floor"] = await floor(children, window)
    async with b.bench_env(args=agent_args) as (_tmpdir, server, agent, api):
        await create_idle(api, server.url("app.tar.gz"), children)
        await asyncio.sleep(settle)  # the creates' after-work (keep-alive expiry, ...)
        result["agent"], result["guardian"] = await measure(agent, window)
        result["looked_at"], _ = await measure(agent, window, api)
    return result


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--children", type=int, nargs="+", default=[100, 300])
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument("--settle", type=float, default=20.0,
                        help="seconds after the creates before measuring (aiohttp's "
                        "download connections expire after 15 s)")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--agent-arg", action="append", default=[],
                        help="an argument for the agent (repeat), e.g. "
                        "--agent-arg=--monitor-interval=9")
    args = parser.parse_args()
    b.header("idle CPU with N sleeping children")
    rows: dict[int, list[dict[str, float]]] = {n: [] for n in args.children}
    for run in range(args.runs):
        for children in args.children:
            r = await one(children, args.window, args.settle, args.agent_arg)
            rows[children].append(r)
            print(f"   run {run + 1}, {children} children, {args.window:g} s window: agent "
                  f"{1000 * r['agent']:.1f} ms, guardian {1000 * r['guardian']:.1f} ms; "
                  f"while listed every 2 s: agent {1000 * r['looked_at']:.1f} ms; floor "
                  f"(bare asyncio holding them) {1000 * r['floor']:.1f} ms")
    print(f"\n-- summary (medians; load average now {b.load()}) --")
    for children, results in rows.items():
        agent = 1000 * b.median([r["agent"] for r in results]) * 10 / args.window
        guardian = 1000 * b.median([r["guardian"] for r in results]) * 10 / args.window
        looked = 1000 * b.median([r["looked_at"] for r in results]) * 10 / args.window
        base = 1000 * b.median([r["floor"] for r in results]) * 10 / args.window
        print(f"   {children} idle children: agent {agent:.1f} ms per 10 s (guardian "
              f"{guardian:.1f} ms), {looked:.1f} ms while listed every 2 s; floor "
              f"{base:.1f} ms [agent <= {TARGET_MS:g} ms: {b.verdict(agent <= TARGET_MS)}]")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
