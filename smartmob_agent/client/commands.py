"""The ``smartmob`` commands that ask and answer: ls, status, create, rm, the controls,
signal, upload, tokens and version.

Each takes the parsed arguments, a :class:`~.fleet.Fleet` of the selected agents and the
:class:`~.terminal.Terminal`, runs its calls on every agent at once, writes the outcome
(one JSON document with ``--json``), and returns the exit status. An agent that fails is
one line on standard error; the others' results are shown all the same.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from smartmob_agent import __version__
from smartmob_agent.client.agent import AgentClient
from smartmob_agent.client.errors import ClientError, MissingLink, NotFoundError
from smartmob_agent.client.fleet import Fleet, Result, Results
from smartmob_agent.client.render import (
    dash,
    details,
    duration,
    percent,
    progress_bar,
    size,
    state,
)
from smartmob_agent.client.results import Outcome, Process
from smartmob_agent.client.targets import UsageError
from smartmob_agent.client.terminal import FAILED, OK, Terminal, exit_status, worst

#: What each control did, for the output.
DONE = {"start": "started", "stop": "stopped", "restart": "restarted", "delete": "deleted"}


def entry(result: Result[Any], key: str, value: Any) -> dict[str, Any]:
    """One agent's part of a ``--json`` document: its name and URL, and ``key: value``
    or ``error``."""
    base = {"agent": result.agent.name, "url": result.agent.url.rstrip("/")}
    if result.error is not None:
        return {**base, "error": result.error.to_dict()}
    return {**base, key: value}


def absent_elsewhere(results: Results[Any]) -> list[Result[Any]]:
    """The results worth reporting: with several agents, a process found on some is not
    an error on those where it is not (a slug need not be everywhere)."""
    if len(results) > 1 and any(result.ok for result in results):
        return [r for r in results if not isinstance(r.error, NotFoundError)]
    return list(results)


def report(term: Terminal, results: list[Result[Any]]) -> int:
    """Write each agent's error as one line (unless ``--json``); return the exit status."""
    statuses = []
    for result in results:
        if result.error is not None:
            if not term.json:
                term.error(str(result.error))
                for line in failure_lines(result.error):
                    term.note(line)
            statuses.append(exit_status(result.error))
    return worst(statuses)


def prefix(agent: AgentClient, fleet: Fleet) -> str:
    """``name: `` when the fleet has several agents (rows say whose they are)."""
    return f"{agent.name}: " if len(fleet.agents) > 1 else ""


# -- ls and status -------------------------------------------------------------------------

async def ls(args: argparse.Namespace, fleet: Fleet, term: Terminal) -> int:
    """``smartmob ls``: every process of every selected agent, as a table."""
    results = await fleet.list()

    def wanted(processes: list[Process]) -> list[Process]:
        return [p for p in processes if args.app is None or p.app == args.app]

    if term.json:
        term.document({"agents": [
            entry(r, "processes", [p.to_dict() for p in wanted(r.value or [])])
            for r in results]})
        return report(term, list(results))
    several = len(fleet.agents) > 1
    rows = []
    for result in results:
        for process in wanted(result.value or []):
            rows.append(([result.agent.name] if several else []) + process_row(process, term))
    headers = ["SLUG", "STATE", "PID", "UPTIME", "RESTARTS", "CPU", "MEMORY"]
    if rows:
        offset = 1 if several else 0
        term.table((["AGENT"] if several else []) + headers, rows,
                   right=[offset + i for i in (2, 3, 4, 5, 6)])
    elif not results.errors:
        term.note("no processes")
    return report(term, list(results))


def process_row(process: Process, term: Terminal) -> list[str]:
    """A process's cells in ``ls`` and ``top``."""
    return [process.slug, state(process.state, term.colour), dash(process.pid),
            duration(process.uptime), dash(process.restarts), percent(process.cpu_percent),
            size(process.memory_rss)]


async def status(args: argparse.Namespace, fleet: Fleet, term: Terminal) -> int:
    """``smartmob status SLUG``: the status document of one process."""
    results = await fleet.status(args.slug)
    shown = absent_elsewhere(results)
    if term.json:
        term.document({"agents": [entry(r, "process", r.value.to_dict() if r.value else None)
                                  for r in shown]})
    else:
        for result in shown:
            if result.value is not None:
                if len(fleet.agents) > 1:
                    term.line(f"agent {result.agent.name}")
                term.lines(describe(result.value, term))
    failed = any(r.value is not None and r.value.state == "failed" for r in shown)
    return worst([report(term, shown), FAILED if failed else OK])


def describe(process: Process, term: Terminal) -> list[str]:
    """The lines of ``status``: every field a person reads, then the last output lines."""
    fields = {
        "slug": process.slug, "app": dash(process.app), "node": dash(process.node),
        "type": dash(process.process_type), "state": state(process.state, term.colour),
        "pid": dash(process.pid), "port": dash(process.port),
        "uptime": duration(process.uptime), "restarts": dash(process.restarts),
        "cpu": percent(process.cpu_percent), "memory": size(process.memory_rss),
    }
    if process.healthy is not None:
        fields["healthy"] = "yes" if process.healthy else "no"
    if process.last_exit is not None:
        fields["last exit"] = f"{process.last_exit.describe()} at {process.last_exit.at}"
    if process.error:
        fields["error"] = process.error
    if process.reason:
        fields["reason"] = process.reason
    lines = details(fields)
    if process.output_tail:
        lines.append("last output:")
        lines += [f"  {line}" for line in process.output_tail]
    return lines


# -- create, rm and the controls -----------------------------------------------------------

def parse_pairs(values: list[str] | None, what: str) -> dict[str, str]:
    """``KEY=VALUE`` arguments as a dict.

    >>> parse_pairs(["A=1", "B=x=y"], "--env")
    {'A': '1', 'B': 'x=y'}
    """
    pairs = {}
    for value in values or []:
        key, equals, rest = value.partition("=")
        if not equals or not key:
            raise UsageError(f"{what} takes KEY=VALUE, not {value!r}")
        pairs[key] = rest
    return pairs


def parse_options(values: list[str] | None) -> dict[str, Any]:
    """``--option KEY=JSON`` arguments: a supervision option each, its value in JSON (a
    bare word is a string).

    >>> parse_options(["restart=never", 'health={"http": "/"}', "max_restarts=3"])
    {'restart': 'never', 'health': {'http': '/'}, 'max_restarts': 3}
    """
    import json
    options: dict[str, Any] = {}
    for key, raw in parse_pairs(values, "--option").items():
        try:
            options[key] = json.loads(raw)
        except ValueError:
            options[key] = raw
    return options


async def create(args: argparse.Namespace, fleet: Fleet, term: Terminal) -> int:
    """``smartmob create APP NODE SOURCE``: create a process (and wait for it to run)."""
    env = parse_pairs(args.env, "--env")
    options = parse_options(args.option)

    async def one(agent: AgentClient) -> Process:
        process = await agent.create(args.app, args.node, args.source, args.type, env=env,
                                     checksum=args.checksum, **options)
        if args.wait:
            process = await agent.wait_for(process, "running", args.wait_timeout,
                                           steady=True)
        return process

    results = await fleet.each(one)
    if term.json:
        term.document({"agents": [entry(r, "process", r.value.to_dict() if r.value else None)
                                  for r in results]})
    else:
        for result in results:
            if result.value is not None:
                term.line(f"{prefix(result.agent, fleet)}{result.value.slug}: created, "
                          f"{state(result.value.state, term.colour)}")
    return report(term, list(results))


def _scope(args: argparse.Namespace) -> str:
    """What a control acts on: a slug, an app, or every process (``--all``)."""
    given = [bool(args.slug), args.app is not None]
    if sum(given) > 1:
        raise UsageError("give a SLUG or --app APP, not both")
    if not any(given) and not args.all:
        raise UsageError("give a SLUG, --app APP, or --all for every process")
    return "slug" if args.slug else "app" if args.app is not None else "all"


async def control(args: argparse.Namespace, fleet: Fleet, term: Terminal) -> int:
    """``smartmob start|stop|restart|rm SLUG|--app A|--all``."""
    action = "delete" if args.command == "rm" else args.command
    scope = _scope(args)
    if scope == "slug":
        return await _control_one(action, args.slug, fleet, term)
    results = await fleet.bulk(action, app=args.app, every=scope == "all")
    if term.json:
        term.document({"agents": [entry(r, "outcomes", [o.to_dict() for o in r.value or []])
                                  for r in results]})
    statuses = [report(term, list(results))]
    for result in results:
        # by slug: processes created at once (deploy, apply) are in no set creation order
        statuses += [_outcome(result.agent, fleet, outcome, action, term)
                     for outcome in sorted(result.value or [], key=lambda o: o.slug)]
    return worst(statuses)


def _outcome(agent: AgentClient, fleet: Fleet, outcome: Outcome, action: str,
             term: Terminal) -> int:
    if term.json:
        return OK if outcome.ok else FAILED
    if outcome.ok:
        term.line(f"{prefix(agent, fleet)}{outcome.slug}: {DONE[action]}")
        return OK
    term.error(f"agent {agent.name}: {outcome.error}")
    return FAILED


async def _control_one(action: str, slug: str, fleet: Fleet, term: Terminal) -> int:
    calls: dict[str, Callable[[AgentClient], Awaitable[Process | None]]] = {
        "start": lambda agent: agent.start(slug), "stop": lambda agent: agent.stop(slug),
        "restart": lambda agent: agent.restart(slug),
        "delete": lambda agent: agent.delete(slug),
    }
    results = absent_elsewhere(await fleet.each(calls[action]))
    if term.json:
        term.document({"agents": [
            entry(r, "process", r.value.to_dict() if isinstance(r.value, Process) else None)
            for r in results]})
    else:
        for result in results:
            if result.ok:
                now = (f", now {state(result.value.state, term.colour)}"
                       if isinstance(result.value, Process) else "")
                term.line(f"{prefix(result.agent, fleet)}{slug}: {DONE[action]}{now}")
    return report(term, results)


async def signal(args: argparse.Namespace, fleet: Fleet, term: Terminal) -> int:
    """``smartmob signal SLUG SIGNAL``."""
    results = absent_elsewhere(await fleet.signal(args.slug, args.signal))
    if term.json:
        term.document({"agents": [entry(r, "process", r.value.to_dict() if r.value else None)
                                  for r in results]})
    else:
        for result in results:
            if result.value is not None:
                term.line(f"{prefix(result.agent, fleet)}{args.slug}: sent "
                          f"{args.signal.upper()}, {state(result.value.state, term.colour)}")
    return report(term, results)


# -- upload, tokens, version ---------------------------------------------------------------

async def upload(args: argparse.Namespace, fleet: Fleet, term: Terminal) -> int:
    """``smartmob upload DIR|FILE``: send an archive (a folder packed) to each agent."""
    path = Path(args.path)
    if not await asyncio.to_thread(path.exists):
        raise UsageError(f"there is no file or folder {path}")
    show = len(fleet.agents) == 1 and not term.json

    def progress(done: int, total: int) -> None:
        if show:
            term.status(progress_bar(done, total))

    results = await fleet.each(lambda agent: agent.upload(path, progress=progress,
                                                          ignore=not args.no_ignore))
    if show:
        term.end_status()
    if term.json:
        term.document({"agents": [entry(r, "upload", r.value.to_dict() if r.value else None)
                                  for r in results]})
    else:
        for result in results:
            if result.value is not None:
                term.line(f"{prefix(result.agent, fleet)}{result.value.source_url} "
                          f"{result.value.checksum} {size(result.value.size)}")
    return report(term, list(results))


async def tokens(args: argparse.Namespace, fleet: Fleet, term: Terminal) -> int:
    """``smartmob tokens [--revoke ID]``: the minted app keys of each agent."""
    async def one(agent: AgentClient) -> list[dict[str, Any]]:
        listed = await agent.tokens()
        if args.revoke:
            chosen = [token for token in listed if token.id == args.revoke]
            if not chosen:
                raise NotFoundError(f"agent {agent.name}: no minted key has the id "
                               f"{args.revoke!r}", agent=agent.name, status=404)
            await agent.revoke(chosen[0])
            listed = [token for token in listed if token.id != args.revoke]
        return [token.to_dict() for token in listed]

    results = await fleet.each(one)
    if term.json:
        term.document({"agents": [entry(r, "tokens", r.value) for r in results]})
        return report(term, list(results))
    if args.revoke:
        for result in results:
            if result.ok:
                term.line(f"{prefix(result.agent, fleet)}{args.revoke}: revoked")
        return report(term, list(results))
    several = len(fleet.agents) > 1
    rows = [([r.agent.name] if several else []) + [str(t.get("id")), dash(t.get("app")),
                                                    dash(t.get("created_at"))]
            for r in results for t in r.value or []]
    if rows:
        term.table((["AGENT"] if several else []) + ["ID", "APP", "CREATED"], rows)
    elif not results.errors:
        term.note("no minted keys")
    return report(term, list(results))


async def version(args: argparse.Namespace, fleet: Fleet, term: Terminal) -> int:
    """``smartmob version``: the client's version and each agent's."""
    async def one(agent: AgentClient) -> str | None:
        try:
            return await agent.version()
        except MissingLink:
            return None  # an agent older than its version's link: not an error

    results = await fleet.each(one)
    if term.json:
        term.document({"client": __version__,
                       "agents": [entry(r, "version", r.value) for r in results]})
        return report(term, list(results))
    term.line(f"smartmob {__version__}")
    for result in results:
        if result.ok:
            said = (f"smartmob-agent {result.value}" if result.value
                    else "unknown (it is older than the OpenAPI document)")
            term.line(f"agent {result.agent.name}: {said}")
    return report(term, list(results))


def failure_lines(error: ClientError) -> list[str]:
    """What a person needs when a process failed: its error, the reason's name (when it
    is ``failed``), its last exit, its last lines of output."""
    process = getattr(error, "process", None)
    if not isinstance(process, Process):
        return []
    lines = []
    if process.error:
        lines.append(f"  error: {process.error}")
    if process.reason:
        lines.append(f"  reason: {process.reason}")
    if process.last_exit is not None:
        lines.append(f"  last exit: {process.last_exit.describe()}")
    if process.output_tail:
        lines.append("  last output:")
        lines += [f"    {line}" for line in process.output_tail]
    return lines
