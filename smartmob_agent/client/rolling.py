"""Rolling updates: nodes updated in place a few at a time, rolled back on a failure.

Each node goes through its process's ``update`` link: the agent starts the new source
beside the old one and switches once it runs (and is healthy), or keeps the old one and
says why (``update_error``). :func:`roll` updates the nodes agent by agent, ``parallel``
at a time, waits for each to run the new source steadily, and stops at the first
failure: the nodes it already updated go back (through their ``rollback`` link) unless
told not to, and the failure is raised, with the node that failed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from smartmob_agent.client.agent import AgentClient
from smartmob_agent.client.errors import ClientError, ProcessFailed, WaitTimeout
from smartmob_agent.client.results import Event, Process
from smartmob_agent.client.streams import EventStream


@dataclass(frozen=True)
class NodeUpdate:
    """One node to update, and what to update it to."""

    agent: AgentClient
    slug: str
    source_url: str
    checksum: str | None = None
    env: Mapping[str, str] | None = None
    options: Mapping[str, Any] | None = None
    #: Whatever the caller needs to say who it is (its rollout).
    owner: Any = field(default=None, compare=False)


#: Told each step: the node, what happened (``updated``, ``rolled back``, ``rollback
#: failed: ...``), and the process's status then (if known).
Report = Callable[[NodeUpdate, str, Process | None], None]


class RollingFailed(ClientError):
    """A rolling update stopped at a node: ``node`` failed with ``cause``; ``rolled_back``
    are the nodes brought back to their previous source."""

    kind = "update_failed"

    def __init__(self, node: NodeUpdate, cause: ClientError,
                 rolled_back: Sequence[NodeUpdate]) -> None:
        super().__init__(str(cause), agent=cause.agent, status=cause.status, body=cause.body)
        self.node = node
        self.cause = cause
        self.process = getattr(cause, "process", None)
        self.rolled_back = list(rolled_back)


async def update_node(node: NodeUpdate, timeout: float) -> Process:
    """Update one node and wait until it runs the new source steadily.

    Raises:
        ProcessFailed: the agent kept the old child (``update_error`` says why), or the
            new one did not keep running.
        WaitTimeout: no outcome within ``timeout`` seconds.
    """
    await watched(node.agent, node.slug, lambda: node.agent.update(
        node.slug, node.source_url, checksum=node.checksum, env=node.env,
        options=node.options), timeout)
    return await node.agent.wait_for(node.slug, "running", timeout, steady=True)


async def rollback_node(node: NodeUpdate, timeout: float) -> Process:
    """Bring a node back to its previous source, and wait until it runs it."""
    await watched(node.agent, node.slug, lambda: node.agent.rollback(node.slug), timeout)
    return await node.agent.wait_for(node.slug, "running", timeout, steady=True)


async def watched(agent: AgentClient, slug: str, start: Callable[[], Awaitable[Process]],
                  timeout: float) -> Process:
    """Start an update (or a rollback) with the process's events followed, and wait for
    its end: the ``process:update`` event that says it ended, or its ``pending_source``
    seen set and then cleared, whichever comes first."""
    ended: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
    stream = agent.events(slug=slug) if await agent.has("events") else None
    watcher = None
    if stream is not None:
        await stream.connect()  # before the request: its end cannot go unseen
        watcher = asyncio.get_running_loop().create_task(_end_of_update(stream, ended))
    try:
        return await _wait_end(agent, await start(), ended, timeout)
    finally:
        if watcher is not None:
            watcher.cancel()
        if stream is not None:
            await stream.close()


async def _end_of_update(stream: EventStream, ended: asyncio.Future[Event]) -> None:
    try:
        async for event in stream:
            if (event.event == "process:update"
                    and event.document.get("outcome") not in {None, "started"}):
                ended.set_result(event)
                return
    except ClientError:
        pass  # the wait goes on by reading the status


async def _wait_end(agent: AgentClient, answer: Process, ended: asyncio.Future[Event],
                    timeout: float) -> Process:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    current, delay = answer, 0.05
    seen_pending = answer.pending_source is not None
    while True:
        if ended.done() or (seen_pending and current.pending_source is None):
            if ended.done():
                current = await agent.status(current.slug)
            if current.update_error:
                raise ProcessFailed(
                    f"agent {agent.name}: {current.slug}: the update failed, the old "
                    f"version still runs: {current.update_error}", process=current,
                    agent=agent.name)
            return current
        seen_pending = seen_pending or current.pending_source is not None
        left = deadline - loop.time()
        if left <= 0:
            raise WaitTimeout(f"agent {agent.name}: {current.slug}: the update did not "
                              f"end within {timeout:g} s", process=current,
                              agent=agent.name)
        await asyncio.wait([ended], timeout=min(delay, left))
        delay = min(delay * 2, 0.5)
        current = await agent.status(current.slug)


async def roll(groups: Sequence[Sequence[NodeUpdate]], report: Report, *, parallel: int = 1,
               timeout: float = 120.0, rollback: bool = True) -> list[NodeUpdate]:
    """Update each group's nodes (a group per agent, in order), ``parallel`` at a time;
    return the nodes updated.

    Raises:
        RollingFailed: a node failed; the nodes updated before it were rolled back
            (unless ``rollback`` is false), and no node after it was touched.
    """
    updated: list[NodeUpdate] = []
    for group in groups:
        for start in range(0, len(group), parallel):
            chunk = group[start:start + parallel]
            outcomes = await asyncio.gather(*(update_node(node, timeout) for node in chunk),
                                            return_exceptions=True)
            failure: tuple[NodeUpdate, ClientError] | None = None
            for node, outcome in zip(chunk, outcomes, strict=True):
                if isinstance(outcome, Process):
                    updated.append(node)
                    report(node, "updated", outcome)
                elif isinstance(outcome, ClientError):
                    failure = failure or (node, outcome)
                else:
                    raise outcome
            if failure is not None:
                back = await _roll_back(updated, report, timeout) if rollback else []
                raise RollingFailed(failure[0], failure[1], back)
    return updated


async def _roll_back(updated: list[NodeUpdate], report: Report, timeout: float
                     ) -> list[NodeUpdate]:
    """Roll back the updated nodes, the last updated first; a node that cannot go back
    is said, and the others still go."""
    back = []
    for node in reversed(updated):
        try:
            process = await rollback_node(node, timeout)
        except ClientError as error:
            report(node, f"rollback failed: {error}", None)
            continue
        back.append(node)
        report(node, "rolled back", process)
    return back
