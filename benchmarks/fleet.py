"""Fleet listing: ``smartmob ls --all`` over 20 agents with 50 processes each.

Starts ``--agents`` real agents (``python -m smartmob_agent``), creates ``--processes``
processes on each (``web: exec sleep 1000``; created with ``"autostart": false`` unless
``--running`` is given, which spawns them all: the listing is the same size either way,
and 1000 children are a lot for a shared machine), names every agent in an
``agents.toml`` of a temporary home, then times:

* the ``smartmob ls --all`` command, start to end (``--runs`` times): what a person
  waits for, interpreter start and imports included;
* the same fan-out in the library, ``Fleet.list()`` over one session, without the
  command's start.

Target (from the issue): ``smartmob ls --all`` over 20 agents of 50 processes each in
< 1 s wall time on this machine.

Run: ``python benchmarks/fleet.py [--agents 20] [--processes 50] [--runs 5] [--running]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib as b

from smartmob_agent.client import AgentClient, Fleet

TARGET = 1.0
SMARTMOB = [sys.executable, "-m", "smartmob_agent.client.cli"]


async def populate(url: str, source: str, count: int, running: bool) -> None:
    """Create ``count`` processes of app ``bench`` on the agent at ``url``."""
    async with AgentClient(url) as client:
        for start in range(0, count, 25):
            await asyncio.gather(*(
                client.create("bench", f"web.{i}", source, "web", autostart=running)
                for i in range(start, min(count, start + 25))))


def time_command(env: dict[str, str], runs: int) -> tuple[list[float], int, int]:
    """Run ``smartmob ls --all`` ``runs`` times; its wall times, rows and exit status."""
    times, rows, code = [], 0, 0
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run([*SMARTMOB, "ls", "--all"], env=env, capture_output=True,
                              text=True, timeout=120, check=False)
        times.append(time.perf_counter() - start)
        rows, code = len(done.stdout.splitlines()) - 1, done.returncode
    return times, rows, code


async def time_library(urls: list[str], runs: int) -> list[float]:
    """Time ``Fleet.list()`` over the agents, ``runs`` times (after one warm-up)."""
    times = []
    async with Fleet(urls) as fleet:
        await fleet.list()
        for _ in range(runs):
            start = time.perf_counter()
            results = await fleet.list()
            times.append(time.perf_counter() - start)
            assert not results.errors, results.errors
    return times


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=20)
    parser.add_argument("--processes", type=int, default=50)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--running", action="store_true",
                        help="start every process (a child each) instead of creating them "
                        "stopped")
    args = parser.parse_args()
    b.header(f"smartmob ls --all over {args.agents} agents of {args.processes} processes")
    with tempfile.TemporaryDirectory(prefix="smartmob-bench-") as tmp:
        folder = Path(tmp)
        agents = [b.AgentRunner(folder / f"agent-{i}" / "state") for i in range(args.agents)]
        for agent in agents:
            agent.state_dir.parent.mkdir(parents=True)
        archive = {"app.tar.gz": b.make_tar_gz({"Procfile": "web: exec sleep 1000\n"})}
        async with b.ArchiveServer(archive) as server:
            try:
                await asyncio.gather(*(agent.start() for agent in agents))
                await asyncio.gather(*(populate(agent.url, server.url("app.tar.gz"),
                                                args.processes, args.running)
                                       for agent in agents))
                print(f"   {args.agents} agents, {args.processes} processes each "
                      f"({'running' if args.running else 'created stopped'})")
                home = folder / "home"
                (home / ".config" / "smartmob").mkdir(parents=True)
                (home / ".config" / "smartmob" / "agents.toml").write_text("".join(
                    f'[agents.agent-{i}]\nurl = "{agent.url}"\n'
                    for i, agent in enumerate(agents)))
                env = {k: v for k, v in os.environ.items() if not k.startswith("SMARTMOB_")}
                env["HOME"] = str(home)
                env.pop("XDG_CONFIG_HOME", None)
                command, rows, code = await asyncio.to_thread(time_command, env, args.runs)
                library = await time_library([agent.url for agent in agents], args.runs)
            finally:
                await asyncio.gather(*(agent.stop() for agent in agents))
    print(f"   smartmob ls --all: {rows} rows, exit status {code}; wall time median "
          f"{1000 * b.median(command):.0f} ms, max {1000 * max(command):.0f} ms "
          f"over {args.runs} runs")
    print(f"   Fleet.list() in the library: median {1000 * b.median(library):.0f} ms, "
          f"max {1000 * max(library):.0f} ms")
    print("\n-- summary --")
    ok = b.median(command) < TARGET and code == 0
    print(f"   smartmob ls --all over {args.agents} agents x {args.processes} processes: "
          f"median {1000 * b.median(command):.0f} ms (target < {1000 * TARGET:.0f} ms: "
          f"{b.verdict(ok)})")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
