"""``smartmob top``: a live table of the processes of one agent or a fleet.

The table (state, pid, uptime, restarts, CPU, memory) is drawn again whenever an agent's
events say something changed, at most ten times a second, and every ``--interval``
seconds for the CPU and memory figures, which come with no event. An agent without the
events WebSocket (an older agent) is read at each interval only; an agent that cannot be
reached is one line under the table, and is tried again at each interval.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time

from smartmob_agent.client.agent import AgentClient
from smartmob_agent.client.commands import process_row
from smartmob_agent.client.errors import ClientError
from smartmob_agent.client.fleet import Fleet
from smartmob_agent.client.render import table
from smartmob_agent.client.results import Process
from smartmob_agent.client.terminal import OK, Terminal

#: Clear the screen and go to its top left corner.
CLEAR = "\x1b[H\x1b[2J"
#: The shortest time between two drawings (a burst of events is drawn once).
MIN_REDRAW = 0.1


class Board:
    """What ``top`` shows: each agent's last listing, or why it has none."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.listings: dict[str, list[Process]] = {}
        self.errors: dict[str, ClientError] = {}
        #: Set when an event says something changed (or at each interval).
        self.changed = asyncio.Event()
        self.stale: set[str] = {agent.name for agent in fleet.agents}

    async def refresh(self) -> None:
        """List again the agents that something changed on."""
        stale = [a for a in self.fleet.agents if a.name in self.stale]
        self.stale.clear()
        results = await asyncio.gather(*(self._list(agent) for agent in stale))
        for agent, result in zip(stale, results, strict=True):
            if isinstance(result, ClientError):
                self.errors[agent.name] = result
                self.listings.pop(agent.name, None)
            else:
                self.errors.pop(agent.name, None)
                self.listings[agent.name] = result

    @staticmethod
    async def _list(agent: AgentClient) -> list[Process] | ClientError:
        try:
            return await agent.list()
        except ClientError as error:
            return error

    def lines(self, term: Terminal) -> list[str]:
        """The screen: a title, the table, a line per agent that failed."""
        several = len(self.fleet.agents) > 1
        rows = [([agent.name] if several else []) + process_row(process, term)
                for agent in self.fleet.agents
                for process in self.listings.get(agent.name, [])]
        count = sum(len(listing) for listing in self.listings.values())
        title = (f"smartmob top - {len(self.fleet.agents)} agent(s), {count} process(es), "
                 f"{time.strftime('%H:%M:%S')} - CTRL-C quits")
        headers = (["AGENT"] if several else []) + [
            "SLUG", "STATE", "PID", "UPTIME", "RESTARTS", "CPU", "MEMORY"]
        offset = 1 if several else 0
        lines = [title, "", *table(headers, rows, [offset + i for i in (2, 3, 4, 5, 6)])]
        lines += [f"smartmob: {error}" for error in self.errors.values()]
        return lines

    def document(self) -> dict[str, object]:
        """The screen as JSON: like ``ls --json``."""
        return {"agents": [
            {"agent": a.name, "url": a.url.rstrip("/"),
             **({"error": self.errors[a.name].to_dict()} if a.name in self.errors else
                {"processes": [p.to_dict() for p in self.listings.get(a.name, [])]})}
            for a in self.fleet.agents]}

    async def follow(self, agent: AgentClient) -> None:
        """Mark ``agent`` stale at each of its events (until its stream ends)."""
        try:
            if not await agent.has("events"):
                return
            async with agent.events() as stream:
                async for _ in stream:
                    self.stale.add(agent.name)
                    self.changed.set()
        except ClientError:
            pass  # shown at the next interval, when listing it fails


async def top(args: argparse.Namespace, fleet: Fleet, term: Terminal) -> int:
    """``smartmob top [--interval SECONDS] [--once]``."""
    board = Board(fleet)
    followers = [asyncio.get_running_loop().create_task(board.follow(agent))
                 for agent in fleet.agents]
    try:
        while True:
            await board.refresh()
            draw(board, term)
            if args.once:
                return OK
            await _next_change(board, args.interval, fleet)
    finally:
        for task in followers:
            task.cancel()
        await asyncio.gather(*followers, return_exceptions=True)


async def _next_change(board: Board, interval: float, fleet: Fleet) -> None:
    """Wait for an event (then a moment, to draw a burst once) or the interval."""
    board.changed.clear()
    started = time.monotonic()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(interval):
            await board.changed.wait()
            await asyncio.sleep(max(0.0, MIN_REDRAW - (time.monotonic() - started)))
            return
    board.stale.update(agent.name for agent in fleet.agents)  # CPU and memory move


def draw(board: Board, term: Terminal) -> None:
    """Draw the board: the whole screen on a terminal, else one block (or document)."""
    if term.json:
        term.document(board.document())
        return
    text = "\n".join(board.lines(term))
    term.out.write((CLEAR if term.out.isatty() else "") + text + "\n")
    term.out.flush()
