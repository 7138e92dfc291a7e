"""Output logs: lines per second to one WebSocket client with disk logging on and off.

A child writes N lines (default 1,000,000) of W bytes (default 100, newline included) as
fast as it can, to one attached raw frame-counting client (see ``log_throughput.py``),
under two agents: one with the default output logs (ring buffer of ``--log-lines`` lines
and files rotated at ``--log-max-bytes``), one with ``--log-max-bytes 0`` (ring buffer
only). Measured, for each: lines/s received, the agent's CPU seconds per million lines,
its RSS before, at peak (sampled every 20 ms) and after each run, and the bytes of log
files written.

Target (from the issue): the agent's RSS stays flat (bounded by the ring buffers) over
runs of a million lines.

Run: ``python benchmarks/log_to_disk.py [--lines N] [--runs K] [--client raw|aiohttp]
[--max-bytes BYTES]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys

import benchlib as b
from log_throughput import through_agent

#: RSS growth over the runs (after the first) still called "flat".
FLAT = 8 * b.MB


async def measure(mode: str, args: list[str], lines: int, width: int, runs: int,
                  client: str) -> list[dict]:
    rows = []
    async with b.bench_env(args=args) as (tmpdir, server, agent, api):
        print(f"   [{mode}] agent pid {agent.pid}, args {' '.join(args) or '(defaults)'}, "
              f"idle RSS {b.fmt_mb(agent.rss())}")
        for run in range(runs):
            before = agent.rss()
            peak = before
            stop = asyncio.Event()

            async def sample(stop: asyncio.Event = stop) -> None:
                nonlocal peak
                while not stop.is_set():
                    peak = max(peak, agent.rss())
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 0.02)

            sampler = asyncio.get_running_loop().create_task(sample())
            try:
                result = await through_agent(tmpdir, server, agent, api, lines, width,
                                             client, 0.0, run)
            finally:
                stop.set()
                await sampler
            result.update(mode=mode, rss_before=before, rss_peak=peak, rss_after=agent.rss())
            rows.append(result)
            print(f"   [{mode}] run {run + 1}: {result['rate']:,.0f} lines/s "
                  f"({result['lines']:,} in {result['seconds']:.3f} s, {result['end']}), "
                  f"agent CPU {result['cpu_per_million']:.3f} s per million lines, RSS "
                  f"{b.fmt_mb(before)} -> peak {b.fmt_mb(peak)} -> "
                  f"{b.fmt_mb(result['rss_after'])}, missing {result['missing']:,}")
    return rows


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--width", type=int, default=100, help="bytes per line, newline included")
    parser.add_argument("--runs", type=int, default=2, help="floods per agent")
    parser.add_argument("--client", choices=("raw", "aiohttp"), default="raw")
    parser.add_argument("--max-bytes", default="10485760",
                        help="--log-max-bytes of the agent with disk logging on")
    args = parser.parse_args()
    b.header("output logs: disk logging on vs off, one child -> one WebSocket client")
    print(f"   {args.lines:,} lines of {args.width} bytes per run, {args.client} client")
    modes = {"disk on": ["--log-max-bytes", args.max_bytes], "disk off": ["--log-max-bytes", "0"]}
    results = {}
    for mode, extra in modes.items():
        results[mode] = await measure(mode, extra, args.lines, args.width, args.runs,
                                      args.client)
    print("\n-- summary (medians over runs) --")
    rates = {}
    for mode, rows in results.items():
        rate = rates[mode] = b.median([r["rate"] for r in rows])
        cpu = b.median([r["cpu_per_million"] for r in rows])
        growth = rows[-1]["rss_after"] - rows[0]["rss_after"]
        peak = max(r["rss_peak"] for r in rows)
        print(f"   {mode:8}: {rate:,.0f} lines/s, agent CPU {cpu:.3f} s per million lines, "
              f"peak RSS {b.fmt_mb(peak)}, RSS growth after run 1 {b.fmt_mb(growth)} "
              f"[flat (< {b.fmt_mb(FLAT)}): {b.verdict(growth < FLAT)}]")
    print(f"   disk on / disk off: {rates['disk on'] / rates['disk off']:.2f}x the lines/s")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
