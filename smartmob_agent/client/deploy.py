"""``smartmob deploy`` and ``smartmob scale``: an app's formation, reached and checked.

``deploy DIR --app A --process web=2`` packs the folder (by its ignore files), uploads
it to each agent with its checksum, then follows :func:`~.formation.plan_deploy` on each
agent: new nodes are created at once; nodes that run another source are updated in
place (:mod:`~.rolling`: agent by agent, one or ``--parallel N`` at a time, and at the
first failure the nodes already updated are rolled back, unless ``--no-rollback``), or,
on an agent without the ``update`` link, deleted and created one at a time; nodes beyond
the formation are deleted last. It ends when every node of the formation runs (and
passes its health check), or says which node failed and why.
``scale APP web=3`` creates or deletes nodes to reach the counts.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from smartmob_agent.client import pack
from smartmob_agent.client.agent import AgentClient
from smartmob_agent.client.commands import parse_options, parse_pairs, prefix
from smartmob_agent.client.errors import (
    ClientError,
    ProcessFailed,
    WaitTimeout,
    missing_link_message,
)
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
from smartmob_agent.client.rolling import NodeUpdate, RollingFailed, roll
from smartmob_agent.client.targets import UsageError
from smartmob_agent.client.terminal import FAILED, OK, Terminal, exit_status, worst

#: An error, given back with more said.
E = TypeVar("E", bound=BaseException)
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
        self.steps: list[Step] = []
        self.links: dict[str | None, Mapping[str, str]] = {}
        self.upload: Upload | None = None
        #: The first failure of this agent's part, if any.
        self.error: ClientError | None = None
        #: The app's processes at the end of a deploy that got there.
        self.processes: list[Process] | None = None

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

    async def explained(self, error: E) -> E:
        """The error, with the failed node's last lines of log as its output tail."""
        if not isinstance(error, (ProcessFailed, WaitTimeout, RollingFailed)):
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

    async def prepare(self, formation: dict[str, int], source: Upload) -> None:
        """The first part of a deploy: create the missing nodes, wait for them and the
        kept ones; the nodes to replace are left in :attr:`replace`."""
        existing = await self.existing()
        self.steps = plan_deploy(formation, [_node(p) for p in existing], source.checksum)
        self.links = {p.node: p.links for p in existing}
        for step in (s for s in self.steps if s.action == "keep"):
            self.done(step, "kept (it runs this source)")
        creates = [s for s in self.steps if s.action == "create"]
        await asyncio.gather(*(self.create(step, source, self.options) for step in creates))
        for step in creates:
            self.done(step, "created")
        await self.wait([s.node for s in self.steps if s.action in {"create", "keep"}])

    @property
    def replace(self) -> list[Step]:
        """The nodes that run another source."""
        return [s for s in self.steps if s.action == "replace"]

    def updatable(self) -> bool:
        """Whether every node to replace can be updated in place (its process has an
        ``update`` link); else they are deleted and created, one at a time."""
        return all("update" in self.links.get(s.node, {}) for s in self.replace)

    async def recreate(self, source: Upload) -> None:
        """Replace the nodes by deleting and creating them, one at a time (an agent
        without updates in place)."""
        for step in self.replace:
            await self.agent.delete(f"{self.app}.{step.node}")
            await self.create(step, source, self.options)
            self.done(step, "replaced")
            await self.wait([step.node])

    def node_updates(self, source: Upload) -> list[NodeUpdate]:
        """The nodes to replace, as updates in place."""
        return [NodeUpdate(self.agent, f"{self.app}.{step.node}", source.source_url,
                           source.checksum or None, self.env or None, self.options or None,
                           owner=(self, step)) for step in self.replace]

    async def finish(self) -> list[Process]:
        """The last part of a deploy: delete the nodes beyond the formation."""
        for step in (s for s in self.steps if s.action == "delete"):
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
    rollouts = [Rollout(agent, fleet, term, args) for agent in fleet.agents]
    try:
        total, digest = await asyncio.to_thread(pack.measure, packed)
        if not term.json:
            term.note(f"packed {folder} into {size(total)}, sha256:{digest}")
        show = len(fleet.agents) == 1 and not term.json
        await asyncio.gather(*(_prepare(r, formation, packed, show) for r in rollouts))
    finally:
        packed.unlink(missing_ok=True)
    if all(r.error is None for r in rollouts):
        await _replace(rollouts, args)
    if all(r.error is None for r in rollouts):
        await asyncio.gather(*(_finish(r, formation) for r in rollouts))
    entries = [_entry(r, term) for r in rollouts]
    if term.json:
        term.document({"agents": [entry for _, entry in entries]})
    return worst(status for status, _ in entries)


async def _prepare(rollout: Rollout, formation: dict[str, int], packed: Path, show: bool
                   ) -> None:
    """Upload to the rollout's agent, create the missing nodes, wait for them."""
    term = rollout.term
    try:
        rollout.upload = await rollout.agent.upload(packed, progress=(
            (lambda done, total: term.status(progress_bar(done, total))) if show else None))
        if show:
            term.end_status()
        rollout.say(f"uploaded {rollout.upload.source_url}")
        await rollout.prepare(formation, rollout.upload)
    except ClientError as error:
        rollout.error = error


async def _replace(rollouts: list[Rollout], args: argparse.Namespace) -> None:
    """Replace the nodes that run another source: updated in place, agent by agent, and
    rolled back at the first failure; on an agent without updates in place, deleted and
    created one at a time (as before updates existed), which it says."""
    groups = []
    for rollout in rollouts:
        assert rollout.upload is not None
        if rollout.updatable():
            groups.append(rollout.node_updates(rollout.upload))
            continue
        rollout.term.note(f"{rollout.who}{missing_link_message('update')}: replacing "
                          "each node by deleting and creating it")
        try:
            await rollout.recreate(rollout.upload)
        except ClientError as error:
            rollout.error = error
            return

    def report(node: NodeUpdate, what: str, process: Process | None) -> None:
        rollout, step = node.owner
        rollout.done(step, what)
        if process is not None and what == "updated":
            rollout.say(f"{process.slug}: running (pid {process.pid})")

    try:
        await roll(groups, report, parallel=args.parallel, timeout=args.wait_timeout,
                   rollback=not args.no_rollback)
    except RollingFailed as failure:
        rollout = failure.node.owner[0]
        rollout.error = await rollout.explained(failure)


async def _finish(rollout: Rollout, formation: dict[str, int]) -> None:
    try:
        rollout.processes = await rollout.finish()
    except ClientError as error:
        rollout.error = error
        return
    rollout.say(f"deployed {rollout.app}: {describe(formation)}")


def _entry(rollout: Rollout, term: Terminal) -> tuple[int, dict[str, Any]]:
    """The rollout's exit status and its part of the --json document."""
    agent = rollout.agent
    base: dict[str, Any] = {"agent": agent.name, "url": agent.url.rstrip("/")}
    if rollout.error is not None:
        return _failed(term, rollout.error, {**base, "actions": rollout.actions})
    if rollout.processes is None:  # another agent failed first: this one stopped
        done = {action["action"] for action in rollout.actions}
        rollout.say("rolled back: the deploy failed on another agent" if "rolled back" in done
                    else "stopped: the deploy failed on another agent" + (
                        " (the updates here are kept: --no-rollback)"
                        if "updated" in done else ""))
        return FAILED, {**base, "actions": rollout.actions, "error": None}
    assert rollout.upload is not None
    return OK, {**base, "upload": rollout.upload.to_dict(), "actions": rollout.actions,
                "processes": [p.to_dict() for p in rollout.processes]}


def _failed(term: Terminal, error: ClientError, entry: dict[str, Any]
            ) -> tuple[int, dict[str, Any]]:
    """Say why a rollout failed: the node, its error, the reason's name a script can
    switch on, its last exit, its log."""
    if not term.json:
        term.error(str(error))
        process = getattr(error, "process", None)
        if isinstance(process, Process):
            if process.reason:
                term.note(f"  reason: {process.reason}")
            if process.last_exit is not None:
                why = process.last_exit.reason or "it ended by itself"
                term.note(f"  last exit: {process.last_exit.describe()}; {why}")
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
