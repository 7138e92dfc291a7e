"""``smartmob deploy`` and ``smartmob scale``: an app's formation, reached and checked.

``deploy DIR --app A --process web=2`` packs the folder (by its ignore files), uploads
it to each agent with its checksum, then follows :func:`~.formation.plan_deploy`: new
nodes are created at once; nodes that run another source are replaced one at a time
(deleted, created, and waited for before the next, so a bad source stops after its
first node); nodes beyond the formation are deleted last. It ends when every node of
the formation runs (and passes its health check), or says which node failed and why.
``scale APP web=3`` creates or deletes nodes to reach the counts.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from smartmob_agent.client import pack
from smartmob_agent.client.agent import AgentClient
from smartmob_agent.client.commands import parse_options, parse_pairs, prefix
from smartmob_agent.client.errors import ClientError, ProcessFailed, WaitTimeout
from smartmob_agent.client.fleet import Fleet
from smartmob_agent.client.formation import (
    FormationError,
    Node,
    Step,
    describe,
    parse_formation,
    plan_deploy,
    plan_scale,
)
from smartmob_agent.client.render import progress_bar, size
from smartmob_agent.client.results import Process, Upload
from smartmob_agent.client.targets import UsageError
from smartmob_agent.client.terminal import FAILED, OK, Terminal, exit_status, worst

#: Lines of a failed node's log shown with its failure.
LOG_LINES = 10


class Rollout:
    """One agent's part of a deploy or a scale: runs the steps, says what it does."""

    def __init__(self, agent: AgentClient, fleet: Fleet, term: Terminal,
                 args: argparse.Namespace) -> None:
        self.agent = agent
        self.term = term
        self.who = prefix(agent, fleet)
        self.app: str = args.app
        self.env = parse_pairs(args.env, "--env")
        self.options = parse_options(args.option)
        self.timeout: float = args.wait_timeout
        #: What was done, for --json: {"slug", "action"}.
        self.actions: list[dict[str, str]] = []

    def say(self, text: str) -> None:
        if not self.term.json:
            self.term.line(self.who + text)

    def done(self, step: Step, what: str) -> None:
        self.actions.append({"slug": f"{self.app}.{step.node}", "action": what})
        self.say(f"{self.app}.{step.node}: {what}")

    async def existing(self) -> list[Process]:
        return [p for p in await self.agent.list() if p.app == self.app]

    async def create(self, step: Step, source: Upload, options: dict[str, Any]) -> None:
        await self.agent.create(self.app, step.node, source.source_url, step.process_type,
                                env=self.env, checksum=source.checksum or None, **options)

    async def wait(self, nodes: list[str]) -> list[Process]:
        """Wait for every node to run; raise the first failure (with its log)."""
        slugs = [f"{self.app}.{node}" for node in nodes]
        outcomes = await asyncio.gather(
            *(self.agent.wait_for(slug, "running", self.timeout, steady=True)
              for slug in slugs),
            return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise await self.explained(outcome)
        for process in outcomes:
            assert isinstance(process, Process)
            self.say(f"{process.slug}: running (pid {process.pid})")
        return [o for o in outcomes if isinstance(o, Process)]

    async def explained(self, error: BaseException) -> BaseException:
        """The error, with the failed node's last lines of log as its output tail."""
        if not isinstance(error, (ProcessFailed, WaitTimeout)):
            return error
        process = error.process
        if not isinstance(process, Process) or "logs" not in process.links:
            return error
        try:
            lines = await self.agent.logs(process, tail=LOG_LINES)
        except ClientError:
            return error
        document = {**process.to_dict(), "output_tail": [line.line for line in lines]}
        error.process = Process.from_document(document, process.agent)
        return error

    async def run_deploy(self, formation: dict[str, int], source: Upload) -> list[Process]:
        existing = await self.existing()
        steps = plan_deploy(formation, [_node(p) for p in existing], source.checksum)
        for step in (s for s in steps if s.action == "keep"):
            self.done(step, "kept (it runs this source)")
        creates = [s for s in steps if s.action == "create"]
        await asyncio.gather(*(self.create(step, source, self.options) for step in creates))
        for step in creates:
            self.done(step, "created")
        await self.wait([s.node for s in steps if s.action in {"create", "keep"}])
        for step in (s for s in steps if s.action == "replace"):  # one at a time
            await self.agent.delete(f"{self.app}.{step.node}")
            await self.create(step, source, self.options)
            self.done(step, "replaced")
            await self.wait([step.node])
        for step in (s for s in steps if s.action == "delete"):
            await self.agent.delete(f"{self.app}.{step.node}")
            self.done(step, "deleted")
        return await self.existing()


def _node(process: Process) -> Node:
    return Node(process.node or "", process.process_type or "", process.checksum)


def _formation(values: list[str] | None) -> dict[str, int]:
    try:
        formation = parse_formation(values or [])
    except FormationError as error:
        raise UsageError(str(error)) from None
    if not formation:
        raise UsageError("give the formation: --process TYPE=COUNT (such as web=2)")
    return formation


async def _pack(path: Path, ignore: bool, term: Terminal) -> Path:
    def progress(done: int, total: int) -> None:
        term.status(f"packing {done}/{total} files")

    packed = await asyncio.to_thread(pack.pack_folder, path, ignore=ignore, progress=progress)
    term.end_status()
    return packed


async def deploy(args: argparse.Namespace, fleet: Fleet, term: Terminal) -> int:
    """``smartmob deploy DIR --app APP --process TYPE=COUNT ...``."""
    formation = _formation(args.process)
    folder = Path(args.folder)
    if not await asyncio.to_thread(folder.is_dir):
        raise UsageError(f"{folder} is not a folder")
    packed = await _pack(folder, not args.no_ignore, term)
    try:
        total, digest = await asyncio.to_thread(pack.measure, packed)
        if not term.json:
            term.note(f"packed {folder} into {size(total)}, sha256:{digest}")
        statuses = await asyncio.gather(*(
            _deploy_on(agent, fleet, term, args, formation, packed) for agent in fleet.agents))
    finally:
        packed.unlink(missing_ok=True)
    if term.json:
        term.document({"agents": [entry for _, entry in statuses]})
    return worst(status for status, _ in statuses)


async def _deploy_on(agent: AgentClient, fleet: Fleet, term: Terminal,
                     args: argparse.Namespace, formation: dict[str, int], packed: Path
                     ) -> tuple[int, dict[str, Any]]:
    rollout = Rollout(agent, fleet, term, args)
    show = len(fleet.agents) == 1 and not term.json
    base: dict[str, Any] = {"agent": agent.name, "url": agent.url.rstrip("/")}
    try:
        source = await agent.upload(packed, progress=(
            (lambda done, total: term.status(progress_bar(done, total))) if show else None))
        if show:
            term.end_status()
        rollout.say(f"uploaded {source.source_url}")
        processes = await rollout.run_deploy(formation, source)
    except ClientError as error:
        return _failed(term, error, {**base, "actions": rollout.actions})
    rollout.say(f"deployed {rollout.app}: {describe(formation)}")
    return OK, {**base, "upload": source.to_dict(), "actions": rollout.actions,
                "processes": [p.to_dict() for p in processes]}


def _failed(term: Terminal, error: ClientError, entry: dict[str, Any]
            ) -> tuple[int, dict[str, Any]]:
    """Say why a rollout failed: the node, its error, its last exit, its log."""
    if not term.json:
        term.error(str(error))
        process = getattr(error, "process", None)
        if isinstance(process, Process):
            if process.last_exit is not None:
                reason = process.last_exit.reason or "it ended by itself"
                term.note(f"  last exit: {process.last_exit.describe()}; reason: {reason}")
            if process.output_tail:
                term.note("  last lines of its log:")
                for line in process.output_tail:
                    term.note(f"    {line}")
    status = FAILED if isinstance(error, ProcessFailed) else exit_status(error)
    return status, {**entry, "error": error.to_dict()}


async def scale(args: argparse.Namespace, fleet: Fleet, term: Terminal) -> int:
    """``smartmob scale APP TYPE=COUNT ... [--source DIR|FILE|URL]``."""
    formation = _formation(args.formation)
    statuses = await asyncio.gather(*(_scale_on(agent, fleet, term, args, formation)
                                      for agent in fleet.agents))
    if term.json:
        term.document({"agents": [entry for _, entry in statuses]})
    return worst(status for status, _ in statuses)


async def _source(agent: AgentClient, args: argparse.Namespace) -> Upload:
    """The source of new nodes: ``--source`` as a URL, or a folder or file uploaded."""
    given: str | None = args.source
    if given is None:
        raise UsageError("new nodes need a source: give --source DIR, FILE or URL (an agent "
                         "does not tell where a process's source came from)")
    if "://" in given:
        return Upload(given, args.checksum or "", 0)
    if not await asyncio.to_thread(Path(given).exists):
        raise UsageError(f"there is no file or folder {given}")
    return await agent.upload(given, ignore=not args.no_ignore)


async def _scale_on(agent: AgentClient, fleet: Fleet, term: Terminal,
                    args: argparse.Namespace, formation: dict[str, int]
                    ) -> tuple[int, dict[str, Any]]:
    rollout = Rollout(agent, fleet, term, args)
    base: dict[str, Any] = {"agent": agent.name, "url": agent.url.rstrip("/")}
    try:
        existing = await rollout.existing()
        steps = plan_scale(formation, [_node(p) for p in existing])
        creates = [s for s in steps if s.action == "create"]
        if creates:
            source = await _source(agent, args)
            await asyncio.gather(*(rollout.create(step, source, {
                **_options_like(existing, step), **rollout.options}) for step in creates))
            for step in creates:
                rollout.done(step, "created")
        for step in (s for s in steps if s.action == "delete"):
            await agent.delete(f"{rollout.app}.{step.node}")
            rollout.done(step, "deleted")
        await rollout.wait([s.node for s in creates])
    except ClientError as error:
        return _failed(term, error, {**base, "actions": rollout.actions})
    rollout.say(f"scaled {rollout.app}: {describe(formation)}")
    return OK, {**base, "actions": rollout.actions}


def _options_like(existing: list[Process], step: Step) -> dict[str, Any]:
    """The supervision options of a node of the same type, to give a new one: the
    status document spells them as a create request does (unset ones left out)."""
    for process in existing:
        if process.process_type == step.process_type and process.options:
            return {k: v for k, v in process.options.items()
                    if v is not None or k == "max_restarts"}
    return {}
