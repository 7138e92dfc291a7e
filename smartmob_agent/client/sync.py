"""A synchronous facade for scripts: ``Agent(url).list()``.

Each :class:`Agent` owns an event loop (an :class:`asyncio.Runner`) and an
:class:`~.agent.AgentClient` that lives in it; every method runs the client's coroutine
to completion. The streams (:meth:`Agent.attach_lines`, :meth:`Agent.events`) are
generators that read one item at a time; they only read (writing to a process's
standard input while reading its output needs two tasks at once: use
:meth:`~.agent.AgentClient.attach` and its ``send``). Not for use inside a running event
loop: use :class:`~.agent.AgentClient` there.
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from smartmob_agent.client.agent import AgentClient, Progress
from smartmob_agent.client.results import Event, LogLine, Marker, Outcome, Process, Token, Upload

T = TypeVar("T")


class Agent:
    """The client of one agent, for code without an event loop.

    Takes the arguments of :class:`~.agent.AgentClient`. Use it as a context manager, or
    call :meth:`close`.

    Example::

        with Agent("http://127.0.0.1:8080") as agent:
            for process in agent.list():
                print(process.slug, process.state)
    """

    def __init__(self, url: str, **options: Any) -> None:
        self._runner = asyncio.Runner()
        self._client = AgentClient(url, **options)

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the client and its event loop."""
        try:
            self._runner.run(self._client.close())
        finally:
            self._runner.close()

    @property
    def client(self) -> AgentClient:
        """The asynchronous client underneath."""
        return self._client

    def _run(self, call: Callable[[], Awaitable[T]]) -> T:
        async def run() -> T:
            return await call()
        return self._runner.run(run())

    def index(self) -> dict[str, str]:
        """See :meth:`AgentClient.index`."""
        return self._run(self._client.index)

    def list(self) -> builtins.list[Process]:
        """See :meth:`AgentClient.list`."""
        return self._run(self._client.list)

    def create(self, app: str, node: str, source_url: str, process_type: str | None = None,
               **options: Any) -> Process:
        """See :meth:`AgentClient.create`."""
        return self._run(lambda: self._client.create(app, node, source_url, process_type,
                                                     **options))

    def status(self, process: str | Process) -> Process:
        """See :meth:`AgentClient.status`."""
        return self._run(lambda: self._client.status(process))

    def delete(self, process: str | Process) -> None:
        """See :meth:`AgentClient.delete`."""
        return self._run(lambda: self._client.delete(process))

    def start(self, process: str | Process) -> Process:
        """See :meth:`AgentClient.start`."""
        return self._run(lambda: self._client.start(process))

    def stop(self, process: str | Process) -> Process:
        """See :meth:`AgentClient.stop`."""
        return self._run(lambda: self._client.stop(process))

    def restart(self, process: str | Process) -> Process:
        """See :meth:`AgentClient.restart`."""
        return self._run(lambda: self._client.restart(process))

    def signal(self, process: str | Process, signal: str | int) -> Process:
        """See :meth:`AgentClient.signal`."""
        return self._run(lambda: self._client.signal(process, signal))

    def update(self, process: str | Process, source_url: str, *,
               checksum: str | None = None, env: Mapping[str, str] | None = None,
               options: Mapping[str, Any] | None = None) -> Process:
        """See :meth:`AgentClient.update`."""
        return self._run(lambda: self._client.update(process, source_url, checksum=checksum,
                                                     env=env, options=options))

    def rollback(self, process: str | Process) -> Process:
        """See :meth:`AgentClient.rollback`."""
        return self._run(lambda: self._client.rollback(process))

    def bulk(self, action: str, *, app: str | None = None, every: bool = False
             ) -> builtins.list[Outcome]:
        """See :meth:`AgentClient.bulk`."""
        return self._run(lambda: self._client.bulk(action, app=app, every=every))

    def logs(self, process: str | Process, *, tail: int | None = None,
             since: str | float | datetime | None = None) -> builtins.list[LogLine]:
        """See :meth:`AgentClient.logs`."""
        return self._run(lambda: self._client.logs(process, tail=tail, since=since))

    def upload(self, path: str | Path, *, progress: Progress | None = None) -> Upload:
        """See :meth:`AgentClient.upload`."""
        return self._run(lambda: self._client.upload(path, progress=progress))

    def wait_for(self, process: str | Process, states: str | Iterable[str] = "running",
                 timeout: float = 60.0, *, healthy: bool = True) -> Process:
        """See :meth:`AgentClient.wait_for`."""
        return self._run(lambda: self._client.wait_for(process, states, timeout,
                                                       healthy=healthy))

    def tokens(self) -> builtins.list[Token]:
        """See :meth:`AgentClient.tokens`."""
        return self._run(self._client.tokens)

    def revoke(self, token: Token) -> None:
        """See :meth:`AgentClient.revoke`."""
        self._run(lambda: self._client.revoke(token))

    def agent_log(self, *, tail: int | None = None,
                  since: str | float | datetime | None = None) -> builtins.list[LogLine]:
        """See :meth:`AgentClient.agent_log`."""
        return self._run(lambda: self._client.agent_log(tail=tail, since=since))

    def version(self) -> str:
        """See :meth:`AgentClient.version`."""
        return self._run(self._client.version)

    def attach_lines(self, process: str | Process, *, after: int | None = None,
                     tail: int | None = None) -> Iterator[LogLine | Marker]:
        """The process's output lines, as :meth:`AgentClient.attach` yields them, until
        the process is deleted or the generator is closed."""
        console = self._client.attach(process, after=after, tail=tail)
        yield from self._iterate(console, console.close)

    def events(self, *, app: str | None = None, slug: str | None = None) -> Iterator[Event]:
        """The agent's events, as :meth:`AgentClient.events` yields them."""
        stream = self._client.events(app=app, slug=slug)
        yield from self._iterate(stream, stream.close)

    def _iterate(self, stream: Any, close: Callable[[], Coroutine[Any, Any, None]]
                 ) -> Iterator[Any]:
        try:
            while True:
                try:
                    yield self._runner.run(stream.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._runner.run(close())
