"""Memory with a stuck client: the agent's RSS while a child floods a client that never reads.

A child writes N lines (default 1,000,000 of 100 bytes) as fast as it can while one
WebSocket client is attached and reads nothing:

* ``raw``: a plain socket (receive buffer shrunk to 4 KiB) that does the WebSocket
  handshake and never calls ``recv`` again;
* ``aiohttp``: ``session.ws_connect()`` and never ``receive()`` (aiohttp stops reading
  the socket once ~128 KiB of messages are queued, so it does not drain it either).

each attached in the default lossless mode (it falls behind, and would be served from
the log files once it reads) and with ``?live=1`` (what it lags by is dropped).

Printed for each: the agent's RSS before, at its peak (sampled every 10 ms) and after the
flood, how long the child took to write everything (a stuck client must not slow it),
``GET /`` latency sampled every 10 ms during the flood (is the agent responsive?), and
how many lines the agent says it dropped for that client (none in lossless mode: the
log keeps them).

Target (from the issue): RSS growth < 50 MB.

Run: ``python benchmarks/memory_slow_client.py [--lines N] [--runs K] [--client both]
[--mode both]``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import socket
import sys
import time
from pathlib import Path

import aiohttp
import benchlib as b

TARGET_GROWTH = 50 * b.MB


def raw_stuck_client(url: str) -> socket.socket:
    """Connect, shake hands, and return the socket (which nobody will read)."""
    rest = url.removeprefix("ws://127.0.0.1:")
    port, _, path = rest.partition("/")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", int(port)))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /{path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head and len(head) < 65536:
        # one byte at a time: not one byte of the stream after the handshake is consumed
        byte = sock.recv(1)
        if not byte:
            raise ConnectionError("closed during the handshake")
        head += byte
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(head.decode(errors="replace"))
    return sock


async def sample_latency(api: b.Api, stop: asyncio.Event,
                         out: list[tuple[float, float]]) -> None:
    """``GET /`` every 10 ms until ``stop`` (at most 60 s): (start time, latency) pairs."""
    deadline = time.monotonic() + 60
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            start = time.monotonic()
            out.append((start, await api.index_latency()))
        except aiohttp.ClientError as error:
            print(f"   ! GET / failed during the flood: {error!r}")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.01):
                await stop.wait()


async def settle_cpu(agent: b.AgentRunner, quiet: float = 0.3, timeout: float = 15) -> None:
    """Wait until the agent has used no CPU for ``quiet`` seconds (bounded)."""
    deadline = time.monotonic() + timeout
    last = agent.cpu()
    while time.monotonic() < deadline:
        await asyncio.sleep(quiet)
        now = agent.cpu()
        if now - last < 0.005:
            return
        last = now


async def one_flood(tmpdir: Path, server: b.ArchiveServer, agent: b.AgentRunner,
                    api: b.Api, lines: int, width: int, client: str, run: int,
                    mode: str = "lossless") -> dict:
    node = f"flood.stuck.{client}.{mode.replace('=', '')}.{run}"
    slug = f"bench.{node}"
    go = tmpdir / f"go-{node}"
    done_file = Path(f"{go}.done")
    await api.create("bench", node, "flood", server.url("app.tar.gz"),
                     b.flood_env(lines, width, go))
    document = await api.wait_state(slug, ["running"])
    attach = document["attach"] + ("?live=1" if mode == "live=1" else "")
    await b.wait_file(Path(f"{go}.ready"))
    session = None
    ws = None
    sock = None
    missed = agent.expect_log(rf"{slug}: an attached client missed (\d+) line")
    try:
        if client == "raw":
            sock = await asyncio.to_thread(raw_stuck_client, attach)
        else:
            session = aiohttp.ClientSession()
            ws = await session.ws_connect(attach)  # and never receive()
        await asyncio.sleep(0.05)  # let the attach reach the hub
        await settle_cpu(agent)
        before = agent.rss()
        peak = before
        latencies: list[tuple[float, float]] = []
        stop = asyncio.Event()
        sampler = asyncio.get_running_loop().create_task(sample_latency(api, stop, latencies))
        cpu0 = agent.cpu()
        wall0 = time.time()
        go.touch()
        deadline = time.monotonic() + 120
        while not b.exists(done_file) and time.monotonic() < deadline:
            peak = max(peak, agent.rss())
            await asyncio.sleep(0.01)
        child_seconds = (b.mtime(done_file) - wall0) if b.exists(done_file) else float("nan")
        flood_end = time.monotonic()
        # the child may be done while the agent still reads its last 64 KiB: sample a
        # little longer, then let the agent go idle (without our requests) and measure
        while time.monotonic() < flood_end + 0.25:
            peak = max(peak, agent.rss())
            await asyncio.sleep(0.01)
        stop.set()
        await sampler
        drained = time.monotonic()
        await settle_cpu(agent)
        peak = max(peak, agent.rss())
        cpu = agent.cpu() - cpu0
        after = agent.rss()
    finally:
        if sock is not None:
            sock.close()
        if ws is not None:  # close() reads what is queued until the close frame
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await ws.close()
        if session is not None:
            await session.close()
    dropped = 0  # the agent logs nothing when the client missed nothing
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(5 if mode == "live=1" else 0.5):
            text = await missed
            dropped = int(text.rsplit("missed ", 1)[1].split()[0])
    await api.delete(slug)
    return {"before": before, "peak": peak, "after": after, "child_seconds": child_seconds,
            "during": [lat for start, lat in latencies if start < flood_end],
            "draining": [lat for start, lat in latencies if flood_end <= start < drained],
            "cpu": cpu, "dropped": dropped,
            "after_delete": agent.rss()}


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--width", type=int, default=100)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--client", choices=("raw", "aiohttp", "both"), default="both")
    parser.add_argument("--mode", choices=("lossless", "live=1", "both"), default="both")
    args = parser.parse_args()
    b.header("memory with a client that never reads")
    print(f"   {args.lines:,} lines of {args.width} bytes per flood")
    clients = ("raw", "aiohttp") if args.client == "both" else (args.client,)
    modes = ("lossless", "live=1") if args.mode == "both" else (args.mode,)
    worst = 0
    async with b.bench_env() as (tmpdir, server, agent, api):
        await api.index_latency()
        idle = agent.rss()
        print(f"   agent pid {agent.pid}, idle RSS {b.fmt_mb(idle)}")
        for run in range(args.runs):
            for client, mode in ((c, m) for c in clients for m in modes):
                r = await one_flood(tmpdir, server, agent, api, args.lines, args.width,
                                    client, run, mode)
                growth = r["after"] - r["before"]
                worst = max(worst, growth, r["peak"] - r["before"])
                print(f"   run {run + 1} {client:7} stuck client, {mode}: RSS before "
                      f"{b.fmt_mb(r['before'])}, peak {b.fmt_mb(r['peak'])}, after "
                      f"{b.fmt_mb(r['after'])} (growth {b.fmt_mb(growth)}, peak growth "
                      f"{b.fmt_mb(r['peak'] - r['before'])}), after delete "
                      f"{b.fmt_mb(r['after_delete'])}")
                print(f"       child wrote {args.lines:,} lines in {r['child_seconds']:.3f} s; "
                      f"agent CPU {r['cpu']:.3f} s; agent reports {r['dropped']} line(s) "
                      f"dropped for that client")
                for when in ("during", "draining"):
                    lat = r[when]
                    label = ("during the flood" if when == "during" else
                             "in the 0.25 s after it")
                    if lat:
                        print(f"       GET / {label}: {len(lat)} requests, median "
                              f"{1000 * b.median(lat):.1f} ms, max {1000 * max(lat):.1f} ms")
                    else:
                        print(f"       GET / {label}: no sample")
        print(f"   RSS from idle to the end: {b.fmt_mb(idle)} -> {b.fmt_mb(agent.rss())}")
    print(f"\n-- summary: worst RSS growth {b.fmt_mb(worst)} (target < "
          f"{b.fmt_mb(TARGET_GROWTH)}: {b.verdict(worst < TARGET_GROWTH)})")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
