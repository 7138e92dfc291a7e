"""Log throughput: lines per second from one child to one attached WebSocket client.

A child writes N lines (default 1,000,000) of W bytes (default 100, newline included) as
fast as it can, starting only once the client is attached. Measured, in one run:

* baseline: the same child read by a bare asyncio reader (``create_subprocess_exec``,
  ``stdout=PIPE``, 64 KiB reads, counting ``b"\\n"``): lines/s and reader CPU;
* through the agent, to one aiohttp WebSocket client (``ws.receive()`` per frame): lines/s
  received, the agent's CPU seconds (user+sys) per million lines, the ratio to baseline;
* through the agent, to a raw frame-counting client (no per-frame objects), which tells
  the agent's own limit from the client's.

Targets (from the issue): >= 600,000 lines/s to one client; <= 1.5 s agent CPU per
million lines.

Run: ``python benchmarks/log_throughput.py [--lines N] [--runs K] [--client both]
[--profile none|cprofile|py-spy]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from pathlib import Path

import aiohttp
import benchlib as b

TARGET_RATE = 600_000
TARGET_CPU = 1.5


async def baseline(tmpdir: Path, lines: int, width: int, run: int,
                   rate: float = 0) -> dict[str, float]:
    """The same child (paced at ``rate`` lines/s if not 0) read by a bare asyncio reader."""
    go = tmpdir / f"go-baseline-{int(rate)}-{run}"
    proc = await asyncio.create_subprocess_exec(
        *b.flood_command(lines, width, go, rate), stdout=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    try:
        await b.wait_file(Path(f"{go}.ready"))
        assert proc.stdout is not None
        read = proc.stdout.read
        count = 0
        cpu0 = b.own_cpu()
        t0 = time.perf_counter()
        go.touch()
        async with asyncio.timeout(120):
            while count < lines:
                chunk = await read(65536)
                if not chunk:
                    break
                count += chunk.count(b"\n")
        elapsed = time.perf_counter() - t0
        cpu = b.own_cpu() - cpu0
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
    return {"lines": count, "seconds": elapsed, "rate": count / elapsed,
            "cpu_per_million": cpu / (count / 1e6)}


async def through_agent(tmpdir: Path, server: b.ArchiveServer, agent: b.AgentRunner,
                        api: b.Api, lines: int, width: int, client: str, rate: float,
                        run: int) -> dict[str, float | str]:
    """Flood through the agent to one attached client of kind ``client``.

    ``rate`` paces the child (lines/s; 0 = as fast as it can write).
    """
    node = f"flood.{client}.{int(rate)}.{run}"
    slug = f"bench.{node}"
    go = tmpdir / f"go-{client}-{int(rate)}-{run}"
    await api.create("bench", node, "flood", server.url("app.tar.gz"),
                     b.flood_env(lines, width, go, rate))
    document = await api.wait_state(slug, ["running"])
    await b.wait_file(Path(f"{go}.ready"))
    done: asyncio.Future[None]
    session = None
    raw = None
    reader = None
    try:
        if client == "aiohttp":
            session = aiohttp.ClientSession()
            ws = await session.ws_connect(document["attach"], max_msg_size=0, autoping=True)
            count = b.FrameCount()
            done = asyncio.get_running_loop().create_future()
            reader = asyncio.get_running_loop().create_task(
                b.aiohttp_ws_reader(ws, count, lines, done))
        else:
            raw = await b.RawWebSocket.connect(document["attach"], lines)
            count, done = raw.count, raw.done
        await asyncio.sleep(0.05)  # let the attach reach the hub before the flood starts
        cpu0, me0 = agent.cpu(), b.own_cpu()
        t0 = time.perf_counter()
        go.touch()
        why = await b.wait_lines(count, done, Path(f"{go}.done"), lines)
        cpu = agent.cpu() - cpu0
        client_cpu = b.own_cpu() - me0
        elapsed = (count.last or time.perf_counter()) - t0
    finally:
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        if session is not None:
            await session.close()
        if raw is not None:
            raw.close()
        await api.delete(slug)
    received = count.lines
    return {"lines": received, "seconds": elapsed, "rate": received / elapsed,
            # per million lines the child wrote: the agent splits every line, even those
            # it then drops for a slow client
            "cpu_per_million": cpu / (lines / 1e6),
            "client_cpu": client_cpu, "missing": lines - received,
            "reported_dropped": count.reported_dropped, "end": why}


def describe(result: dict) -> str:
    return (f"{result['rate']:,.0f} lines/s received ({result['lines']:,} lines in "
            f"{result['seconds']:.3f} s, {result['end']}), agent CPU "
            f"{result['cpu_per_million']:.3f} s per million lines written, client CPU "
            f"{result['client_cpu']:.2f} s, missing {result['missing']:,} "
            f"(of which reported as dropped {result['reported_dropped']:,})")


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--width", type=int, default=100, help="bytes per line, newline included")
    parser.add_argument("--runs", type=int, default=1, help="measurements of each kind")
    parser.add_argument("--client", choices=("aiohttp", "raw", "both"), default="both")
    parser.add_argument("--profile", choices=("none", "cprofile", "py-spy"), default="none")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--pace", type=float, nargs="*", default=[TARGET_RATE],
                        metavar="RATE", help="also run children paced at these lines/s "
                        "(aiohttp client); none to skip")
    args = parser.parse_args()
    b.header("log throughput: one child -> one WebSocket client")
    print(f"   {args.lines:,} lines of {args.width} bytes per run")
    clients = ("aiohttp", "raw") if args.client == "both" else (args.client,)

    profiler = b.Profiler(args.profile)
    kinds = [(client, 0.0) for client in clients]
    kinds += [("aiohttp", rate) for rate in args.pace]
    results: dict[tuple[str, float], list[dict]] = {kind: [] for kind in kinds}
    bases: dict[float, list[dict]] = {rate: [] for rate in (0.0, *args.pace)}
    async with b.bench_env(wrapper=profiler.wrapper) as (tmpdir, server, agent, api):
        print(f"   agent pid {agent.pid}, idle RSS {b.fmt_mb(agent.rss())}")
        for run in range(args.runs):
            for rate in bases:
                result = await baseline(tmpdir, args.lines, args.width, run, rate)
                bases[rate].append(result)
                pace = f"child paced at {rate:,.0f} lines/s" if rate else "unpaced child"
                print(f"   run {run + 1} baseline (bare asyncio reader), {pace}: "
                      f"{result['rate']:,.0f} lines/s, {result['seconds']:.3f} s, "
                      f"reader CPU {result['cpu_per_million']:.3f} s per million lines")
            for client, rate in kinds:
                result = await through_agent(tmpdir, server, agent, api, args.lines,
                                             args.width, client, rate, run)
                results[client, rate].append(result)
                pace = f"child paced at {rate:,.0f} lines/s" if rate else "unpaced child"
                print(f"   run {run + 1} agent -> {client} client, {pace}: {describe(result)}")
    print("\n-- summary (medians over runs) --")
    for rate, rows in bases.items():
        what = f"paced {rate:,.0f}/s" if rate else "unpaced"
        print(f"   baseline bare asyncio reader, {what}: "
              f"{b.median([r['rate'] for r in rows]):,.0f} lines/s, "
              f"{b.median([r['cpu_per_million'] for r in rows]):.3f} CPU s per million lines")
    for (client, pace), rows in results.items():
        rate = b.median([r["rate"] for r in rows])
        cpu = b.median([r["cpu_per_million"] for r in rows])
        base_rate = b.median([r["rate"] for r in bases[pace]])
        base_cpu = b.median([r["cpu_per_million"] for r in bases[pace]])
        missing = max(r["missing"] for r in rows)
        what = f"paced {pace:,.0f}/s" if pace else "unpaced"
        line = (f"   agent -> {client:7} client, {what}: {rate:,.0f} lines/s "
                f"({rate / base_rate:.2f}x the bare reader), most missing {missing:,}; agent "
                f"CPU {cpu:.3f} s per million lines ({cpu / base_cpu:.1f}x the bare reader) "
                f"[target <= {TARGET_CPU}: {b.verdict(cpu <= TARGET_CPU)}]")
        if client == "aiohttp":
            if pace:
                ok = missing == 0 and rate >= 0.97 * pace
                line += (f" [sustains {pace:,.0f} lines/s with no loss: {b.verdict(ok)}]")
            else:
                ok = missing == 0 and rate >= TARGET_RATE
                line += (f" [>= {TARGET_RATE:,} lines/s with no loss: {b.verdict(ok)}; "
                         f"goodput >= {TARGET_RATE:,}: {b.verdict(rate >= TARGET_RATE)}]")
        print(line)
    profiler.report(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
