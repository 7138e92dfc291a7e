"""The ``smartmob`` commands that follow: logs (``-f``), attach and events.

They run until the stream ends (the process is deleted, the agent shuts down) or the
person presses CTRL-C, which ends the command with status 0: following is what they are
for. With several agents, ``logs`` and ``events`` follow each at once, and each line
says whose it is.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
from typing import IO, Any

from smartmob_agent.client.agent import AgentClient
from smartmob_agent.client.commands import absent_elsewhere, prefix, report
from smartmob_agent.client.errors import ClientError
from smartmob_agent.client.fleet import Fleet
from smartmob_agent.client.results import Event, LogLine, Marker
from smartmob_agent.client.streams import Attachment
from smartmob_agent.client.targets import UsageError
from smartmob_agent.client.terminal import OK, UNREACHABLE, Terminal, exit_status, worst


def line_text(line: LogLine) -> str:
    """A line as ``logs`` shows it: ``<at> <stream> <line>`` (bare, from an old agent).

    >>> line_text(LogLine("hello", 3, "2026-12-01T18:00:00.123Z", "stdout"))
    '2026-12-01T18:00:00.123Z stdout hello'
    """
    if line.at is None:
        return line.line
    return f"{line.at} {line.stream} {line.line}"


def show_line(term: Terminal, who: str, line: LogLine, agent: AgentClient) -> None:
    """Write one line of a process's output (a JSON document per line with ``--json``)."""
    if term.json:
        term.document({"agent": agent.name, **line.to_dict()})
    else:
        term.line(who + line_text(line))


async def logs(args: argparse.Namespace, fleet: Fleet, term: Terminal) -> int:
    """``smartmob logs SLUG [-f] [--tail N] [--since T]``."""
    if args.follow:
        statuses = await asyncio.gather(*(_follow(agent, args, fleet, term)
                                          for agent in fleet.agents))
        found = [s for s in statuses if s is not None]
        return worst(found) if found else report(term, [])
    results = absent_elsewhere(await fleet.each(
        lambda agent: agent.logs(args.slug, tail=args.tail, since=args.since)))
    if term.json:
        term.document({"agents": [
            {"agent": r.agent.name, "url": r.agent.url.rstrip("/"),
             **({"lines": [line.to_dict() for line in r.value or []]} if r.ok
                else {"error": r.error.to_dict() if r.error else None})}
            for r in results]})
    else:
        for result in results:
            for line in result.value or []:
                term.line(prefix(result.agent, fleet) + line_text(line))
    return report(term, results)


async def _follow(agent: AgentClient, args: argparse.Namespace, fleet: Fleet,
                  term: Terminal) -> int | None:
    """Follow one agent's process; ``None`` if the process is not on this agent (with
    several agents, that is no error)."""
    who = prefix(agent, fleet)
    try:
        # line numbers and replays came with the logs link; an older agent sends what
        # comes from now on
        modern = "logs" in (await agent.status(args.slug)).links
        after = None
        if args.since is not None and modern:
            earlier = await agent.logs(args.slug, tail=args.tail, since=args.since)
            for line in earlier:
                show_line(term, who, line, agent)
            after = earlier[-1].seq if earlier else None
        # without --since, the replay of the last lines joins the live ones exactly
        tail = None if after is not None or not modern or args.since is not None else (
            100 if args.tail is None else args.tail)
        async with agent.attach(args.slug, after=after, tail=tail) as console:
            async for item in console:
                if isinstance(item, LogLine):
                    show_line(term, who, item, agent)
        return _ended(console, agent, term)
    except ClientError as error:
        if len(fleet.agents) > 1 and exit_status(error) == 5:
            return None
        if not term.json:
            term.error(str(error))
        return exit_status(error)


def _ended(stream: Any, agent: AgentClient, term: Terminal) -> int:
    """Say why a stream ended; the exit status it gives (3 if the agent went away)."""
    reason = stream.close_reason or "the connection was closed"
    if not term.json:
        term.note(f"smartmob: agent {agent.name}: {reason}")
    return OK if stream.close_code == 1000 else UNREACHABLE


# -- attach --------------------------------------------------------------------------------

async def attach(args: argparse.Namespace, fleet: Fleet, term: Terminal) -> int:
    """``smartmob attach SLUG``: the process's output here, typed lines to its stdin."""
    if len(fleet.agents) != 1:
        raise UsageError("attach talks to one agent: give one --agent")
    agent = fleet.agents[0]
    try:
        async with agent.attach(args.slug) as console:
            term.note(f"smartmob: attached to {args.slug} on {agent.name}; "
                      "typed lines go to its input, CTRL-C detaches")
            sender = asyncio.get_running_loop().create_task(_send_input(console, sys.stdin))
            try:
                async for item in console:
                    if isinstance(item, Marker):
                        continue
                    if term.json:
                        term.document({"agent": agent.name, **item.to_dict()})
                    else:
                        term.line(item.line)
            finally:
                sender.cancel()
        return _ended(console, agent, term)
    except ClientError as error:
        if not term.json:
            term.error(str(error))
        return exit_status(error)


async def _send_input(console: Attachment, stream: IO[str]) -> None:
    """Send each line of ``stream`` to the console; at its end, stop sending (the
    output is still followed until CTRL-C)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    def read() -> None:  # a blocking read, in a thread that dies with the command
        for line in stream:
            loop.call_soon_threadsafe(queue.put_nowait, line)
        loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=read, name="smartmob-stdin", daemon=True).start()
    while (line := await queue.get()) is not None:
        await console.send(line.rstrip("\n").removesuffix("\r"))


# -- events --------------------------------------------------------------------------------

def event_text(event: Event) -> str:
    """An event in one line: when, what, which process, and what it says.

    >>> event_text(Event.from_document({"event": "process:exit", "slug": "a.web.0",
    ...     "at": "2026-12-01T18:00:00.123Z", "code": -9, "signal": "SIGKILL", "pid": 7}))
    '2026-12-01T18:00:00.123Z  process:exit       a.web.0  killed by SIGKILL (pid 7)'
    """
    document = event.document
    if event.event == "process:state":
        said = f"{document.get('previous')} -> {event.state}"
    elif event.event == "process:exit":
        said = (f"killed by {document['signal']}" if document.get("signal")
                else f"exited with code {document.get('code')}") + f" (pid {event.pid})"
    elif event.event == "process:online":
        said = f"pid {event.pid}"
    elif event.event == "process:exception":
        said = str(document.get("error"))
    elif event.event == "events:dropped":
        said = f"{document.get('count')} event(s) dropped: this client read too slowly"
    else:
        said = ""
    return f"{event.at or '-'}  {event.event:<17}  {event.slug or '-'}  {said}".rstrip()


async def events(args: argparse.Namespace, fleet: Fleet, term: Terminal) -> int:
    """``smartmob events [--app A] [--slug S]``: what happens, as it happens."""
    async def one(agent: AgentClient) -> int:
        who = prefix(agent, fleet)
        try:
            async with agent.events(app=args.app, slug=args.slug) as stream:
                term.note(f"smartmob: following the events of {agent.name}; CTRL-C stops")
                async for event in stream:
                    if term.json:
                        term.document({"agent": agent.name, **event.to_dict()})
                    else:
                        term.line(who + event_text(event))
            return _ended(stream, agent, term)
        except ClientError as error:
            if not term.json:
                term.error(str(error))
            return exit_status(error)

    return worst(await asyncio.gather(*(one(agent) for agent in fleet.agents)))
