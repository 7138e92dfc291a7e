"""Agent restart: how long until 200 processes from the state database run again.

On a fresh state folder, 200 processes (``web: exec sleep 1000``) are created and run;
then the agent is stopped, once cleanly (SIGINT: it stops every child first) and once by
SIGKILL (its guardian kills the children), and a new agent is started on the same state
folder. Measured each time:

* from launching the new agent to its ready line, and to all 200 processes ``running``
  again (the listing polled every 20 ms);
* how many archives the new agent downloaded (the archive server counts requests): the
  target is none, since every source was already unpacked;
* that each slug runs exactly once (the processes whose environment carries its
  ``SMARTMOB_PROCESS_ID``) and no child of the old agent survived.

Target (from the issue): report the time; no archive downloaded again.

Run: ``python benchmarks/agent_restart.py [--processes 200]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import tempfile
import time
from pathlib import Path

import benchlib as b
import psutil


async def wait_all_running(api: b.Api, count: int, within: float = 180.0) -> float:
    """Poll until ``count`` processes run; return when that was first seen."""
    deadline = time.monotonic() + within
    while True:
        processes = await api.list()
        if sum(p["state"] == "running" for p in processes) == count:
            return time.perf_counter()
        if time.monotonic() > deadline:
            states = sorted({p["state"] for p in processes})
            raise RuntimeError(f"not all {count} running after {within:g} s: {states}")
        await asyncio.sleep(0.02)


def copies_by_process_id(agent: b.AgentRunner) -> dict[str, int]:
    """How many live descendants of the agent carry each SMARTMOB_PROCESS_ID."""
    counts: dict[str, int] = {}
    for process in agent.descendants():
        with contextlib.suppress(psutil.Error):
            if process.name() != "sleep" or process.status() == psutil.STATUS_ZOMBIE:
                continue
            value = process.environ().get("SMARTMOB_PROCESS_ID")
            if value:
                counts[value] = counts.get(value, 0) + 1
    return counts


async def one_restart(state: Path, server: b.ArchiveServer, count: int, how: str,
                      old_pids: set[int]) -> tuple[b.AgentRunner, set[int]]:
    """Start an agent on ``state``, wait for ``count`` running processes, report; return
    the (running) agent and its children's pids."""
    hits = server.hits
    agent = b.AgentRunner(state)
    launched = time.perf_counter()
    await agent.start()
    ready = time.perf_counter()
    api = b.Api(agent.url)
    try:
        running = await wait_all_running(api, count)
        downloads = server.hits - hits
        copies = copies_by_process_id(agent)
        pids = {p["pid"] for p in await api.list()}
        survivors = [pid for pid in old_pids if psutil.pid_exists(pid)
                     and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        print(f"   after {how}: ready line {1000 * (ready - launched):.0f} ms after launch; "
              f"all {count} running {running - launched:.2f} s after launch; "
              f"{downloads} archive(s) downloaded; {len(copies)} process ids with a live "
              f"child, max copies per process {max(copies.values(), default=0)}; "
              f"{len(survivors)} child(ren) of the old agent alive")
        return agent, pids
    finally:
        await api.close()


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=200)
    args = parser.parse_args()
    b.header(f"agent restart with {args.processes} processes in the state")
    with tempfile.TemporaryDirectory(prefix="smartmob-bench-") as tmp:
        state = Path(tmp) / "state"
        async with b.ArchiveServer({"app.tar.gz": b.make_tar_gz(b.APP_FILES)}) as server:
            first = b.AgentRunner(state)
            await first.start()
            api = b.Api(first.url)
            url = server.url("app.tar.gz")
            nodes = [f"web.{i}" for i in range(args.processes)]
            for start in range(0, len(nodes), 50):
                await asyncio.gather(*(api.create("bench", node, "web", url)
                                       for node in nodes[start:start + 50]))
            await wait_all_running(api, args.processes)
            pids = {p["pid"] for p in await api.list()}
            await api.close()
            print(f"   first agent: {args.processes} running, {server.hits} downloads")
            await first.stop()  # SIGINT: a clean stop

            second, pids = await one_restart(state, server, args.processes, "SIGINT", pids)
            assert second.pid is not None
            assert second.proc is not None
            psutil.Process(second.pid).send_signal(signal.SIGKILL)
            await second.proc.wait()
            second.proc = None

            third, _ = await one_restart(state, server, args.processes, "SIGKILL", pids)
            await third.stop()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
