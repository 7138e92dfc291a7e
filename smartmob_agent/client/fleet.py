"""Several agents at once: :class:`Fleet` runs the same call on each, concurrently.

One agent that is down, slow or refusing never hides the others: every call returns one
:class:`Result` per agent, in the fleet's order, holding either what the agent answered
or the error it caused.
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, TypeVar

import aiohttp

from smartmob_agent.client.agent import AgentClient
from smartmob_agent.client.errors import ClientError
from smartmob_agent.client.results import LogLine, Outcome, Process, Token, Upload

#: The type of what each agent answers to a fleet call.
T = TypeVar("T")


@dataclass(frozen=True)
class Result(Generic[T]):
    """What one agent answered to a fleet call: a value, or an error."""

    #: The agent's client (its ``name`` says which agent).
    agent: AgentClient
    value: T | None = None
    error: ClientError | None = None

    @property
    def ok(self) -> bool:
        """Whether the agent answered without an error."""
        return self.error is None


class Results(Sequence[Result[T]]):
    """The results of one fleet call, one per agent, in the fleet's order."""

    def __init__(self, results: Iterable[Result[T]]) -> None:
        self._results = list(results)

    def __getitem__(self, index: Any) -> Any:
        return self._results[index]

    def __len__(self) -> int:
        return len(self._results)

    def __iter__(self) -> Iterator[Result[T]]:
        return iter(self._results)

    @property
    def errors(self) -> builtins.list[Result[T]]:
        """The results that are errors."""
        return [result for result in self._results if not result.ok]

    @property
    def values(self) -> builtins.list[T]:
        """The values of the agents that answered."""
        return [result.value for result in self._results if result.value is not None]


class Fleet:
    """The same calls on several agents, concurrently, over one aiohttp session.

    Args:
        agents: the agents' clients; or URLs, each made into an :class:`AgentClient`
            with ``options``.
        options: passed to each :class:`AgentClient` made from a URL (``token=``, ...).

    Example::

        async with Fleet(["http://10.0.0.1:8080", "http://10.0.0.2:8080"]) as fleet:
            for result in await fleet.list():
                print(result.agent.name, result.value if result.ok else result.error)
    """

    def __init__(self, agents: Iterable[AgentClient | str], **options: Any) -> None:
        self._session: aiohttp.ClientSession | None = None
        self.agents: builtins.list[AgentClient] = [
            agent if isinstance(agent, AgentClient) else AgentClient(agent, **options)
            for agent in agents
        ]

    async def __aenter__(self) -> Fleet:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=10))
        for agent in self.agents:
            agent.use_session(self._session)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every agent's client and the shared session."""
        await asyncio.gather(*(agent.close() for agent in self.agents))
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def each(self, call: Callable[[AgentClient], Awaitable[T]]) -> Results[T]:
        """Run ``call(agent)`` on every agent at once; gather values and errors.

        Only :class:`~.errors.ClientError` is caught (and kept in its agent's result):
        anything else is a bug, and is raised.
        """
        async def one(agent: AgentClient) -> Result[T]:
            try:
                return Result(agent, value=await call(agent))
            except ClientError as error:
                return Result(agent, error=error)

        return Results(await asyncio.gather(*(one(agent) for agent in self.agents)))

    async def list(self) -> Results[builtins.list[Process]]:
        """Every agent's processes."""
        return await self.each(lambda agent: agent.list())

    async def status(self, slug: str) -> Results[Process]:
        """The process ``slug`` on each agent (a :class:`~.errors.NotFoundError` where it is
        not)."""
        return await self.each(lambda agent: agent.status(slug))

    async def start(self, slug: str) -> Results[Process]:
        """Start ``slug`` on each agent."""
        return await self.each(lambda agent: agent.start(slug))

    async def stop(self, slug: str) -> Results[Process]:
        """Stop ``slug`` on each agent."""
        return await self.each(lambda agent: agent.stop(slug))

    async def restart(self, slug: str) -> Results[Process]:
        """Restart ``slug`` on each agent."""
        return await self.each(lambda agent: agent.restart(slug))

    async def delete(self, slug: str) -> Results[None]:
        """Delete ``slug`` on each agent."""
        return await self.each(lambda agent: agent.delete(slug))

    async def signal(self, slug: str, signal: str | int) -> Results[Process]:
        """Send a signal to ``slug`` on each agent."""
        return await self.each(lambda agent: agent.signal(slug, signal))

    async def bulk(self, action: str, *, app: str | None = None, every: bool = False
                   ) -> Results[builtins.list[Outcome]]:
        """A bulk control (``start``, ``stop``, ``restart``, ``delete``) on each agent."""
        return await self.each(lambda agent: agent.bulk(action, app=app, every=every))

    async def version(self) -> Results[str]:
        """Each agent's version."""
        return await self.each(lambda agent: agent.version())

    async def create(self, app: str, node: str, source_url: str,
                     process_type: str | None = None, **options: Any) -> Results[Process]:
        """Create the same process on each agent (see :meth:`AgentClient.create`)."""
        return await self.each(
            lambda agent: agent.create(app, node, source_url, process_type, **options))

    async def update(self, slug: str, source_url: str, **options: Any) -> Results[Process]:
        """Update ``slug`` in place on each agent (see :meth:`AgentClient.update`)."""
        return await self.each(lambda agent: agent.update(slug, source_url, **options))

    async def rollback(self, slug: str) -> Results[Process]:
        """Roll ``slug`` back on each agent."""
        return await self.each(lambda agent: agent.rollback(slug))

    async def logs(self, slug: str, *, tail: int | None = None,
                   since: str | float | None = None) -> Results[builtins.list[LogLine]]:
        """The last lines of ``slug`` on each agent."""
        return await self.each(lambda agent: agent.logs(slug, tail=tail, since=since))

    async def upload(self, path: str | Path, *, ignore: bool = True) -> Results[Upload]:
        """Upload the same archive or folder to each agent (each packs a folder itself,
        so the checksums are those of identical archives)."""
        return await self.each(lambda agent: agent.upload(path, ignore=ignore))

    async def wait_for(self, slug: str, states: str | Iterable[str] = "running",
                       timeout: float = 60.0, *, healthy: bool = True) -> Results[Process]:
        """Wait on each agent until ``slug`` is in one of ``states`` (see
        :meth:`AgentClient.wait_for`)."""
        return await self.each(
            lambda agent: agent.wait_for(slug, states, timeout, healthy=healthy))

    async def tokens(self) -> Results[builtins.list[Token]]:
        """The keys each agent has minted."""
        return await self.each(lambda agent: agent.tokens())
