"""``smartmob plan`` and ``smartmob apply``: converge a fleet to a ``smartmob.toml``.

Both read the file (:mod:`~.manifest`), pack each app's folder to know its checksum, list
the processes of every agent concerned, and compute the plan (:mod:`~.plan`), which they
print. ``apply`` then does it: uploads each folder to the agents that need it, creates
the missing nodes and waits for them, replaces the nodes of another type, updates the
changed ones in place (agent by agent, rolled back at the first failure, as ``deploy``
does), and, with ``--prune`` only, deletes the nodes the file no longer names.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smartmob_agent.client import pack
from smartmob_agent.client.agent import AgentClient
from smartmob_agent.client.commands import failure_lines
from smartmob_agent.client.errors import ClientError, missing_link_message
from smartmob_agent.client.fleet import Fleet
from smartmob_agent.client.manifest import AppSpec, Manifest, ManifestError, parse_manifest
from smartmob_agent.client.plan import Action, Desired, Observed, Source, compute, counts, place
from smartmob_agent.client.results import Process, Upload
from smartmob_agent.client.rolling import NodeUpdate, RollingFailed, roll
from smartmob_agent.client.targets import UsageError, config_path, load_config, select
from smartmob_agent.client.terminal import FAILED, OK, Terminal, exit_status

#: The file read when ``--file`` is not given.
DEFAULT_FILE = "smartmob.toml"


@dataclass
class Fleetwide:
    """What a plan is made from: the file, the agents by name, what they have."""

    manifest: Manifest
    agents: dict[str, AgentClient]
    #: Each app's packed folder (deleted at the end), by app name.
    packed: dict[str, Path] = field(default_factory=dict)
    listed: dict[str, list[Process]] = field(default_factory=dict)
    #: (app, agent) -> the upload of the app's source to that agent.
    uploads: dict[tuple[str, str], Upload] = field(default_factory=dict)


def read_manifest(path: Path) -> Manifest:
    """The file at ``path``, parsed (a usage error if it is absent or wrong)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"there is no {path}: write one (see 'smartmob apply --help'), "
                         "or give --file FILE") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read {path}: {error}") from None
    try:
        return parse_manifest(text, str(path))
    except ManifestError as error:
        raise UsageError(str(error)) from None


def _agents_of(app: AppSpec, args: argparse.Namespace, fleet: Fleet,
               known: dict[str, AgentClient]) -> list[str]:
    """The names of the agents that run ``app`` (made into clients in ``known``)."""
    if not app.agents:
        return [agent.name for agent in fleet.agents]
    path = Path(args.config) if args.config else config_path(os.environ)
    targets = select(list(app.agents), False, os.environ, load_config(path))
    names = []
    for target in targets:
        same = next((a for a in [*known.values(), *fleet.agents]
                     if a.url.rstrip("/") == target.url), None)
        if same is None:
            same = AgentClient(target.url, token=target.token, name=target.name,
                               timeout=args.timeout)
        known[same.name] = same
        names.append(same.name)
    return names


async def observe(world: Fleetwide) -> None:
    """List the processes of every agent concerned (an agent that cannot say stops
    the plan: what it runs is unknown)."""
    names = list(world.agents)
    listings = await asyncio.gather(*(world.agents[name].list() for name in names))
    world.listed.update(zip(names, listings, strict=True))


def observed(process: Process) -> Observed:
    """A status document as the plan sees it."""
    source = process.source or {}
    url, checksum = source.get("url"), source.get("checksum") or process.checksum
    return Observed(process.app or "", process.node or "", process.process_type or "",
                    Source(url if isinstance(url, str) else None,
                           checksum if isinstance(checksum, str) else None),
                    process.options)


async def source_of(app: AppSpec, world: Fleetwide, args: argparse.Namespace) -> Source:
    """The app's source: a URL as given, or a folder packed (its checksum computed)."""
    if app.source is None:
        return Source()
    if app.is_url:
        return Source(app.source, app.checksum)
    folder = Path(world.manifest.source).parent / app.source
    if not await asyncio.to_thread(folder.is_dir):
        raise UsageError(f"{world.manifest.source}: app {app.name!r}: its source "
                         f"{app.source} is not a folder (nor a URL)")
    packed = await asyncio.to_thread(pack.pack_folder, folder, ignore=not args.no_ignore)
    world.packed[app.name] = packed
    _, digest = await asyncio.to_thread(pack.measure, packed)
    return Source(checksum=f"sha256:{digest}")


async def make_plan(args: argparse.Namespace, fleet: Fleet, world: Fleetwide
                    ) -> list[Action]:
    """Compute the plan of ``world`` (filling in its agents, folders and listings)."""
    desired: list[Desired] = []
    for app in world.manifest.apps:
        names = _agents_of(app, args, fleet, world.agents)
        desired += place(app, names, await source_of(app, world, args))
    await observe(world)
    seen = {name: [observed(p) for p in listing] for name, listing in world.listed.items()}
    return compute(desired, seen, [app.name for app in world.manifest.apps],
                   update_all=getattr(args, "update_all", False))


def show_plan(actions: Sequence[Action], term: Terminal, prune: bool) -> None:
    """The plan as a table (with the agent of each node when there are several), then
    how many of each."""
    several = len({action.agent for action in actions}) > 1
    rows = []
    for action in actions:
        why = list(action.why)
        if action.kind == "delete" and not prune:
            why.append("only with --prune")
        rows.append([action.kind, action.slug, *([action.agent] if several else []),
                     "; ".join(why)])
    if rows:
        term.table(["ACTION", "SLUG", *(["AGENT"] if several else []), "WHY"], rows)
    found = counts(actions)
    if not prune and found["delete"]:
        found["delete (with --prune)"] = found.pop("delete")
    term.line(", ".join(f"{count} {kind}" for kind, count in found.items()
                        if count or kind in {"create", "update", "unchanged"}))


async def plan(args: argparse.Namespace, fleet: Fleet, term: Terminal) -> int:
    """``smartmob plan [--file F]``: what ``apply`` would do."""
    return await _run(args, fleet, term, execute=False)


async def apply(args: argparse.Namespace, fleet: Fleet, term: Terminal) -> int:
    """``smartmob apply [--file F] [--prune]``: print the plan, then do it."""
    return await _run(args, fleet, term, execute=True)


async def _run(args: argparse.Namespace, fleet: Fleet, term: Terminal, *, execute: bool
               ) -> int:
    manifest = read_manifest(Path(args.file or DEFAULT_FILE))
    # the command's agents are looked at when an app runs on them, or when named
    # (--agent, --all: to find the nodes of an agent an app no longer lists)
    named = bool(args.agent or args.all) or any(not app.agents for app in manifest.apps)
    world = Fleetwide(manifest, {agent.name: agent for agent in fleet.agents} if named
                      else {})
    try:
        actions = await make_plan(args, fleet, world)
        if not term.json:
            show_plan(actions, term, args.prune)
        if not execute:
            if term.json:
                term.document({"plan": [_action_dict(a) for a in actions]})
            return OK
        run = Execution(world, args, term)
        status = await run.execute(actions)
        if term.json:
            term.document({"plan": [_action_dict(a) for a in actions],
                           "done": run.done, **run.failure})
        return status
    except ClientError as error:
        if term.json:
            term.document({"error": error.to_dict()})
        else:
            term.error(str(error))
        return exit_status(error)
    finally:
        for packed in world.packed.values():
            packed.unlink(missing_ok=True)
        for agent in world.agents.values():
            if agent not in fleet.agents:  # made here for an app's agents
                await agent.close()


def _action_dict(action: Action) -> dict[str, Any]:
    return {"action": action.kind, "slug": action.slug, "agent": action.agent,
            "why": list(action.why)}


class Execution:
    """``apply`` doing a plan: uploads, creates, replaces, updates, and deletes."""

    def __init__(self, world: Fleetwide, args: argparse.Namespace, term: Terminal) -> None:
        self.world = world
        self.args = args
        self.term = term
        self.timeout: float = args.wait_timeout
        #: What was done, for --json: {"slug", "agent", "action"}.
        self.done: list[dict[str, str]] = []
        self.failure: dict[str, Any] = {}

    def say(self, agent: str, slug: str, what: str) -> None:
        self.done.append({"slug": slug, "agent": agent, "action": what})
        if not self.term.json:
            who = f"{agent}: " if len(self.world.agents) > 1 else ""
            self.term.line(f"{who}{slug}: {what}")

    async def upload(self, action: Action) -> Upload:
        """The app's source on the action's agent: its URL, or its folder uploaded
        there once."""
        assert action.desired is not None
        source = action.desired.source
        key = (action.app, action.agent)
        if key not in self.world.uploads:
            packed = self.world.packed.get(action.app)
            self.world.uploads[key] = (
                Upload(source.url or "", source.checksum or "", 0) if packed is None
                else await self.world.agents[action.agent].upload(packed))
        return self.world.uploads[key]

    async def execute(self, actions: list[Action]) -> int:
        """Do the plan; the exit status."""
        todo = [a for a in actions if a.kind != "unchanged"
                and (a.kind != "delete" or self.args.prune)]
        if not todo:
            if not self.term.json:
                self.term.line("nothing to do")
            return OK
        try:
            await self.create([a for a in todo if a.kind == "create"])
            await self.replace([a for a in todo if a.kind == "replace"])
            await self.update([a for a in todo if a.kind == "update"])
            for action in (a for a in todo if a.kind == "delete"):
                await self.world.agents[action.agent].delete(action.slug)
                self.say(action.agent, action.slug, "deleted")
        except ClientError as error:
            self.failure = {"error": error.to_dict()}
            if not self.term.json:
                self.term.error(str(error))
                for line in failure_lines(error):
                    self.term.note(line)
            return FAILED if isinstance(error, RollingFailed) else exit_status(error)
        if not self.term.json:
            self.term.line(f"applied {self.world.manifest.source}")
        return OK

    async def _create_one(self, action: Action) -> Process:
        desired = action.desired
        assert desired is not None
        source = await self.upload(action)
        return await self.world.agents[action.agent].create(
            desired.app, desired.node, source.source_url, desired.process_type,
            env=desired.env, checksum=source.checksum or None, **desired.options)

    async def create(self, actions: list[Action]) -> None:
        """Create the missing nodes, all at once, and wait until each runs (said in the
        plan's order)."""
        for action, outcome in zip(actions, await asyncio.gather(
                *(self._create_one(a) for a in actions), return_exceptions=True), strict=True):
            if isinstance(outcome, BaseException):
                raise outcome
            self.say(action.agent, action.slug, "created")
        outcomes = await asyncio.gather(*(
            self.world.agents[a.agent].wait_for(a.slug, "running", self.timeout, steady=True)
            for a in actions), return_exceptions=True)
        for action, outcome in zip(actions, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                raise outcome
            self.say(action.agent, action.slug, f"running (pid {outcome.pid})")

    async def replace(self, actions: list[Action]) -> None:
        """Delete and create each node, one at a time."""
        for action in actions:
            await self.world.agents[action.agent].delete(action.slug)
            self.say(action.agent, action.slug, "deleted (to be created again)")
            await self.create([action])

    async def update(self, actions: list[Action]) -> None:
        """Update the changed nodes in place, agent by agent; a node whose agent cannot
        update in place is replaced instead, which is said."""
        groups: dict[str, list[NodeUpdate]] = {}
        for action in actions:
            listed = self.world.listed.get(action.agent, [])
            process = next((p for p in listed if p.slug == action.slug), None)
            if process is None or "update" not in process.links:
                self.term.note(f"{action.agent}: {action.slug}: "
                               f"{missing_link_message('update')}: replacing it instead")
                await self.replace([action])
                continue
            assert action.desired is not None
            source = await self.upload(action)
            groups.setdefault(action.agent, []).append(NodeUpdate(
                self.world.agents[action.agent], action.slug, source.source_url,
                source.checksum or None, action.desired.env, action.desired.options,
                owner=action))

        def report(node: NodeUpdate, what: str, process: Process | None) -> None:
            self.say(node.owner.agent, node.slug, what)

        await roll(list(groups.values()), report, parallel=self.args.parallel,
                   timeout=self.timeout, rollback=not self.args.no_rollback)
