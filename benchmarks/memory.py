"""Memory: RSS and PSS of the agent and of its guardian with N idle children.

For each N (default 100 and 300), on a fresh agent: N processes (``idle: exec sleep
3600``) are created and waited for until all run (a listing every 0.2 s), then, after
``--settle`` seconds (aiohttp's download connections expire after 15 s), the resident
set (RSS) and proportional set (PSS: shared pages divided among the processes that map
them, from ``/proc/PID/smaps_rollup``) of the agent and of its guardian. Also the idle
agent's, before any process.

Floors, in the same run: a bare asyncio program holding N ``sleep 3600`` children, and a
bare aiohttp server (``web.Application`` with one route, on 127.0.0.1) with nothing to do.

Target (issue 15): agent + guardian RSS <= 40 MB with 100 and with 300 children (it was
59 and 62 MB; supervisord 26.5-28.7, Circus 31.1-31.5, PM2 72-98).

Run: ``python benchmarks/memory.py [--children 100 300] [--settle 16] [--runs K]
[--agent-env KEY=VALUE ...]``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import benchlib as b
import psutil
from idle_cpu import FLOOR_PY, create_idle

TARGET = 40 * b.MB

AIOHTTP_PY = r'''
from aiohttp import web
async def hello(request):
    return web.Response(text="hi")
app = web.Application()
app.router.add_get("/", hello)
print("ready", flush=True)
web.run_app(app, host="127.0.0.1", port=0, print=None)
'''


def pss(pid: int) -> int:
    """The proportional set size of ``pid`` in bytes (0 if unreadable)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as file:
            for line in file:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rss(pid: int) -> int:
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0


async def floor(code: str, *argv: str, settle: float = 1.0) -> tuple[int, int]:
    """RSS and PSS of a bare Python program (``code``) once it printed its ready line."""
    proc = await asyncio.create_subprocess_exec(
        b.PYTHON, "-c", code, *argv, stdout=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(60):
            await proc.stdout.readline()
        await asyncio.sleep(settle)
        return rss(proc.pid), pss(proc.pid)
    finally:
        for child in psutil.Process(proc.pid).children():
            child.kill()
        proc.kill()
        await proc.wait()


def mb(value: float) -> str:
    return f"{value / b.MB:.1f}"


async def one(children: int, settle: float, env: dict[str, str]) -> dict[str, float]:
    result: dict[str, float] = {}
    result["floor_rss"], result["floor_pss"] = await floor(FLOOR_PY, str(children))
    async with b.bench_env(env=env) as (_tmpdir, server, agent, api):
        await api.index_latency()
        await asyncio.sleep(0.5)
        guardian = agent.guardian()
        gpid = guardian.pid if guardian is not None else 0
        result["idle_agent"], result["idle_guardian"] = rss(agent.pid), rss(gpid)
        await create_idle(api, server.url("app.tar.gz"), children)
        await asyncio.sleep(settle)
        result["agent_rss"], result["agent_pss"] = rss(agent.pid), pss(agent.pid)
        result["guardian_rss"], result["guardian_pss"] = rss(gpid), pss(gpid)
    return result


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--children", type=int, nargs="+", default=[100, 300])
    parser.add_argument("--settle", type=float, default=16.0)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--agent-env", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    b.header("memory of the agent and its guardian with N idle children")
    env = b.parse_env(args.agent_env)
    aiohttp_rss, aiohttp_pss = await floor(AIOHTTP_PY)
    print(f"   floor: a bare aiohttp server, RSS {mb(aiohttp_rss)} MB, PSS {mb(aiohttp_pss)} MB")
    rows: dict[int, list[dict[str, float]]] = {n: [] for n in args.children}
    for run in range(args.runs):
        for children in args.children:
            r = await one(children, args.settle, env)
            rows[children].append(r)
            print(f"   run {run + 1}, {children} children: agent RSS {mb(r['agent_rss'])} MB "
                  f"(PSS {mb(r['agent_pss'])}), guardian RSS {mb(r['guardian_rss'])} MB (PSS "
                  f"{mb(r['guardian_pss'])}); idle before: agent {mb(r['idle_agent'])}, "
                  f"guardian {mb(r['idle_guardian'])}; floor (bare asyncio holding them) RSS "
                  f"{mb(r['floor_rss'])} MB (PSS {mb(r['floor_pss'])})")
    print(f"\n-- summary (medians; load average now {b.load()}) --")
    for children, results in rows.items():
        def med(key: str, results: list[dict[str, float]] = results) -> float:
            return b.median([r[key] for r in results])
        total = med("agent_rss") + med("guardian_rss")
        print(f"   {children} children: agent + guardian RSS {mb(total)} MB (agent "
              f"{mb(med('agent_rss'))}, guardian {mb(med('guardian_rss'))}), PSS "
              f"{mb(med('agent_pss') + med('guardian_pss'))} MB; floors: bare asyncio "
              f"{mb(med('floor_rss'))} MB, bare aiohttp {mb(aiohttp_rss)} MB "
              f"[<= {mb(TARGET)} MB: {b.verdict(total <= TARGET)}]")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
