"""The asynchronous client of one agent: :class:`AgentClient`.

It starts at the agent's index (``GET /``) and follows links: it never builds a route
itself, so it drives any agent that serves the documented links, down to an agent that
speaks only the original API of 2016 (``list``, ``create``, and a process's ``details``,
``attach`` and ``delete``). A call that needs a link the agent lacks raises
:class:`~.errors.MissingLink`, which says so.

Requests, timeouts and retries are :class:`~.http.Transport`'s.
"""

from __future__ import annotations

import asyncio
import builtins
import signal as signals
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp

from smartmob_agent.client import pack
from smartmob_agent.client.errors import (
    ClientError,
    MissingLink,
    NotFoundError,
    ProcessFailed,
    UnexpectedAnswer,
    WaitTimeout,
)
from smartmob_agent.client.http import Transport
from smartmob_agent.client.results import (
    SETTLED_STATES,
    LogLine,
    Outcome,
    Process,
    Token,
    Upload,
)
from smartmob_agent.client.streams import Attachment, EventStream

#: Called as an upload goes: (bytes sent, bytes in all).
Progress = Callable[[int, int], None]
#: Bytes read from an archive file at a time when uploading it.
CHUNK = 256 * 1024

class AgentClient(Transport):
    """The client of one agent, over aiohttp.

    Use it as an async context manager (``async with AgentClient(url) as agent:``), or
    call :meth:`~.http.Transport.close` when done. It takes the arguments of
    :class:`~.http.Transport`: ``url``, and ``token``, ``name``, ``session``,
    ``timeout``, ``connect_timeout``, ``retries``, ``retry_delay``.
    """

    def __init__(
        self, url: str, *, token: str | None = None, name: str | None = None,
        session: aiohttp.ClientSession | None = None, timeout: float = 60.0,
        connect_timeout: float = 5.0, retries: int = 3, retry_delay: float = 0.1,
    ) -> None:
        super().__init__(url, token=token, name=name, session=session, timeout=timeout,
                         connect_timeout=connect_timeout, retries=retries,
                         retry_delay=retry_delay)
        self._index: dict[str, str] | None = None
        #: slug -> the process's links, from every status document seen
        self._links: dict[str, Mapping[str, str]] = {}

    async def __aenter__(self) -> AgentClient:
        return self

    # -- links -------------------------------------------------------------------------

    async def index(self, *, refresh: bool = False) -> dict[str, str]:
        """The agent's index: link relation -> URL (read once, then kept)."""
        if self._index is None or refresh:
            document = await self.request("GET", self.url)
            if not isinstance(document, dict) or not isinstance(document.get("list"), str):
                raise UnexpectedAnswer(
                    f"agent {self.name}: {self.url} is not the index of a smartmob agent "
                    "(it has no 'list' link)", agent=self.name)
            self._index = {k: v for k, v in document.items() if isinstance(v, str)}
        return self._index

    async def link(self, relation: str) -> str:
        """The URL of an index relation (``list``, ``events``, ...).

        Raises:
            MissingLink: the agent's index has no such link.
        """
        index = await self.index()
        if relation not in index:
            raise MissingLink(relation, agent=self.name)
        return index[relation]

    async def has(self, relation: str) -> bool:
        """Whether the agent's index has the link ``relation``."""
        return relation in await self.index()

    async def _process_link(self, process: str | Process, relation: str) -> str:
        if isinstance(process, Process):
            links = process.links
        else:
            links = self._links.get(process) or await self._find(process)
        url = links.get(relation)
        if url is None and relation == "details":
            url = links.get("status")
        if url is None:
            raise MissingLink(relation, agent=self.name)
        return url

    async def _find(self, slug: str) -> Mapping[str, str]:
        await self.list()
        if slug not in self._links:
            raise NotFoundError(f"agent {self.name}: there is no process named '{slug}'",
                           agent=self.name, status=404)
        return self._links[slug]

    def _process(self, document: Any) -> Process:
        if not isinstance(document, dict):
            raise UnexpectedAnswer(f"agent {self.name}: expected a process status document",
                                   agent=self.name)
        try:
            process = Process.from_document(document, self.name)
        except ValueError as error:
            raise UnexpectedAnswer(f"agent {self.name}: {error}", agent=self.name) from None
        self._links[process.slug] = process.links
        return process

    @staticmethod
    def _slug(process: str | Process) -> str:
        return process.slug if isinstance(process, Process) else process

    # -- processes ---------------------------------------------------------------------

    async def list(self) -> builtins.list[Process]:
        """Every process of the agent, in creation order."""
        document = await self.request("GET", await self.link("list"))
        entries = document.get("processes") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise UnexpectedAnswer(f"agent {self.name}: the listing has no 'processes' list",
                                   agent=self.name)
        self._links.clear()
        return [self._process(entry) for entry in entries]

    async def create(
        self, app: str, node: str, source_url: str, process_type: str | None = None, *,
        env: Mapping[str, str] | None = None, checksum: str | None = None,
        **options: Any,
    ) -> Process:
        """Create a process (answered at once, in state ``pending``).

        Args:
            process_type: the Procfile entry; by default the part of ``node`` before its
                first ``.`` (``web`` for ``web.0``).
            env: environment variables for the process.
            checksum: the archive's ``sha256:...``, checked before it is unpacked.
            options: supervision options (``restart``, ``health``, ``autostart``, ...)
                and ``issue_token``, as the create request spells them.
        """
        request: dict[str, Any] = {
            "app": app, "node": node, "process_type": process_type or node.split(".")[0],
            "source_url": source_url, **options,
        }
        if env:
            request["env"] = dict(env)
        if checksum:
            request["checksum"] = checksum
        return self._process(await self.request("POST", await self.link("create"),
                                                body=request))

    async def status(self, process: str | Process) -> Process:
        """The process's status document, as it is now."""
        url = await self._process_link(process, "details")
        try:
            return self._process(await self.request("GET", url))
        except NotFoundError:
            self._links.pop(self._slug(process), None)
            raise

    async def delete(self, process: str | Process) -> None:
        """Delete the process: the agent stops it, waits until it is gone, forgets it."""
        url = await self._process_link(process, "delete")
        await self.request("POST", url, body={})
        self._links.pop(self._slug(process), None)

    async def _control(self, process: str | Process, action: str, body: Any = None
                       ) -> Process:
        url = await self._process_link(process, action)
        return self._process(await self.request("POST", url, body={} if body is None
                                                else body))

    async def start(self, process: str | Process) -> Process:
        """Start a stopped, exited or failed process (or end its backoff)."""
        return await self._control(process, "start")

    async def stop(self, process: str | Process) -> Process:
        """Stop the process (answered once its children are gone); it stays listed."""
        return await self._control(process, "stop")

    async def restart(self, process: str | Process) -> Process:
        """Stop the process (unless stopped) and start it again."""
        return await self._control(process, "restart")

    async def signal(self, process: str | Process, signal: str | int) -> Process:
        """Send a signal (``"HUP"``, ``"SIGHUP"`` or ``1``) to the running process."""
        return await self._control(process, "signal", {"signal": signal_name(signal)})

    async def update(
        self, process: str | Process, source_url: str, *, checksum: str | None = None,
        env: Mapping[str, str] | None = None, options: Mapping[str, Any] | None = None,
    ) -> Process:
        """Update the process in place to another source (answered at once; the new
        child replaces the old one once it runs, see ``pending_source``).

        Raises:
            MissingLink: the agent has no ``update`` link (it is older than it).
        """
        body: dict[str, Any] = {"source_url": source_url}
        if checksum:
            body["checksum"] = checksum
        if env is not None:
            body["env"] = dict(env)
        if options:
            body["options"] = dict(options)
        return await self._control(process, "update", body)

    async def rollback(self, process: str | Process) -> Process:
        """Bring back the process's previous source, as an update does.

        Raises:
            ConflictError: there is nothing to roll back to.
        """
        return await self._control(process, "rollback")

    async def bulk(self, action: str, *, app: str | None = None, every: bool = False
                   ) -> builtins.list[Outcome]:
        """Apply ``start``, ``stop``, ``restart`` or ``delete`` to every process of
        ``app``, or to every process (``every=True``), at once.
        """
        if (app is None) == (not every):
            raise ValueError("give exactly one of app= and every=True")
        body: dict[str, Any] = {"app": app} if app is not None else {"all": True}
        document = await self.request("POST", await self.link(f"bulk_{action}"), body=body)
        entries = document.get("processes") if isinstance(document, dict) else None
        outcomes = [Outcome.from_document(e) for e in entries or [] if isinstance(e, dict)]
        if action == "delete":
            for outcome in outcomes:
                self._links.pop(outcome.slug, None)
        return outcomes

    # -- output ------------------------------------------------------------------------

    async def logs(
        self, process: str | Process, *, tail: int | None = None,
        since: str | float | datetime | None = None,
    ) -> builtins.list[LogLine]:
        """The last lines the process wrote (``tail``, 100 by default on the agent), or
        those since a time (ISO 8601, seconds since the epoch, or an aware datetime)."""
        url = await self._process_link(process, "logs")
        return await self._lines(url, tail, since)

    async def agent_log(self, *, tail: int | None = None,
                        since: str | float | datetime | None = None) -> builtins.list[LogLine]:
        """The last lines of the agent's own log (admin keys only)."""
        return await self._lines(await self.link("agent-log"), tail, since)

    async def _lines(self, url: str, tail: int | None,
                     since: str | float | datetime | None) -> builtins.list[LogLine]:
        params = {}
        if tail is not None:
            params["tail"] = str(tail)
        if since is not None:
            params["since"] = since.isoformat() if isinstance(since, datetime) else str(since)
        document = await self.request("GET", url, params=params)
        if not isinstance(document, list):
            raise UnexpectedAnswer(f"agent {self.name}: {url} did not answer a list of lines",
                                   agent=self.name)
        return [LogLine.from_document(entry) for entry in document if isinstance(entry, dict)]

    def attach(
        self, process: str | Process, *, after: int | None = None, tail: int | None = None,
        markers: bool = False,
    ) -> Attachment:
        """The process's console: iterate it for output lines, :meth:`Attachment.send`
        to write to its standard input. Use it as ``async with agent.attach(slug) as
        console:``; it connects on entry (or on the first line read).

        Args:
            after: resume after the line of this ``seq`` (an earlier
                :attr:`Attachment.last_seq`): every later line still kept is replayed.
            tail: replay the last ``tail`` lines first.
            markers: also yield ``spawned``/``exited``/... markers.

        An agent without the ``logs`` link (the original API) sends bare text frames and
        knows no ``after`` or ``tail``; those are then refused with
        :class:`~.errors.MissingLink`.
        """
        async def locate() -> tuple[str, bool]:
            links = (process.links if isinstance(process, Process)
                     else self._links.get(process) or await self._find(process))
            url = links.get("attach")
            if url is None:
                raise MissingLink("attach", agent=self.name)
            # line numbers, replays and JSON frames came with the logs link
            modern = "logs" in links
            if not modern and (after is not None or tail is not None):
                raise MissingLink("logs", agent=self.name)
            query = {"format": "json"} if modern else {}
            if after is not None:
                query["after"] = str(after)
            if tail is not None:
                query["tail"] = str(tail)
            return _with_query(url, query), modern

        return Attachment(locate, self._websocket("a process console"), self.name,
                          markers=markers)

    def events(self, *, app: str | None = None, slug: str | None = None) -> EventStream:
        """The agent's events from the moment it connects (narrowed to one app or one
        process). Use it as ``async with agent.events() as events:``.

        Raises:
            MissingLink: on connecting, if the agent has no ``events`` link.
        """
        async def locate() -> tuple[str, bool]:
            query = {k: v for k, v in (("app", app), ("slug", slug)) if v is not None}
            return _with_query(await self.link("events"), query), True

        return EventStream(locate, self._websocket("the events stream"), self.name)

    # -- sources -----------------------------------------------------------------------

    async def upload(self, path: str | Path, *, progress: Progress | None = None,
                     ignore: bool = True) -> Upload:
        """Upload an archive, or a folder packed as ``.tar.gz`` (honouring its
        ``.gitignore`` and ``.smartmobignore`` files unless ``ignore`` is false).

        The agent's checksum is compared with the one computed here.
        """
        path = Path(path)
        url = await self.link("upload")
        if path.is_dir():
            packed = await asyncio.to_thread(pack.pack_folder, path, ignore=ignore)
            try:
                return await self._upload_file(url, packed, progress)
            finally:
                packed.unlink(missing_ok=True)
        return await self._upload_file(url, path, progress)

    async def _upload_file(self, url: str, path: Path, progress: Progress | None) -> Upload:
        size, digest = await asyncio.to_thread(pack.measure, path)

        async def chunks() -> AsyncIterator[bytes]:
            sent = 0
            with path.open("rb") as file:
                while chunk := await asyncio.to_thread(file.read, CHUNK):
                    sent += len(chunk)
                    yield chunk
                    if progress is not None:
                        progress(sent, size)

        document = await self.request(
            "POST", url, data=chunks, idempotent=True,
            headers={"Content-Type": "application/octet-stream",
                     "Content-Length": str(size)})
        try:
            upload = Upload(str(document["source_url"]), str(document["checksum"]),
                            int(document["size"]))
        except (KeyError, TypeError, ValueError):
            raise UnexpectedAnswer(f"agent {self.name}: the upload answer lacks source_url, "
                                   "checksum or size", agent=self.name) from None
        if upload.checksum.lower() != f"sha256:{digest}":
            raise UnexpectedAnswer(
                f"agent {self.name}: the agent computed {upload.checksum} for the archive "
                f"but it is sha256:{digest}: it was damaged on the way", agent=self.name)
        return upload

    # -- waiting -----------------------------------------------------------------------

    async def wait_for(
        self, process: str | Process, states: str | Iterable[str] = "running",
        timeout: float = 60.0, *, healthy: bool = True, steady: bool = False,
    ) -> Process:
        """Wait until the process is in one of ``states``; return its status then.

        With ``healthy`` (the default), a process with a health check must also have
        passed it. With ``steady``, a ``running`` process must also have run for its
        ``start_seconds`` option (what the agent counts as a successful start): a
        command that exits at once is ``running`` for an instant only. Events wake the
        wait at once when the agent has them; the status is also read again every half
        second at most (health has no event).

        Raises:
            ProcessFailed: the process went to ``failed``, ``exited`` or ``stopped`` (one
                not asked for), or was deleted.
            WaitTimeout: ``timeout`` seconds passed.
        """
        wanted = {states} if isinstance(states, str) else set(states)
        slug = self._slug(process)
        changed = asyncio.Event()
        stream = self.events(slug=slug) if await self.has("events") else None
        watcher = None
        if stream is not None:
            await stream.connect()  # before the first status: no change goes unseen
            watcher = asyncio.get_running_loop().create_task(_signal_each(stream, changed))
        try:
            return await self._wait(slug, wanted, timeout, (healthy, steady), changed)
        finally:
            if watcher is not None:
                watcher.cancel()
            if stream is not None:
                await stream.close()

    async def _wait(self, slug: str, wanted: set[str], timeout: float,
                    checks: tuple[bool, bool], changed: asyncio.Event) -> Process:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.05
        while True:
            changed.clear()  # before reading: a change after the read wakes the wait
            try:
                current = await self.status(slug)
            except NotFoundError:
                raise ProcessFailed(f"agent {self.name}: {slug} was deleted during the wait",
                                    agent=self.name) from None
            if current.state is None:
                raise MissingLink("events", agent=self.name)
            healthy, steady = checks
            if current.state in wanted and (not healthy or is_healthy(current)):
                if not steady or current.state != "running":
                    return current
                short = unsteady_for(current)
                if short <= 0:
                    return current
                delay = max(min(delay, short), 0.01)
            if current.state in SETTLED_STATES - wanted:
                raise ProcessFailed(describe_failure(current), process=current,
                                    agent=self.name)
            left = deadline - loop.time()
            if left <= 0:
                raise WaitTimeout(
                    f"agent {self.name}: {slug} is still {current.state} after {timeout:g} s"
                    f" (waited for {' or '.join(sorted(wanted))})", process=current,
                    agent=self.name)
            try:
                async with asyncio.timeout(min(delay, left)):
                    await changed.wait()
            except TimeoutError:
                delay = min(delay * 2, 0.5)

    # -- keys and versions -------------------------------------------------------------

    async def tokens(self) -> builtins.list[Token]:
        """The minted app keys (ids and apps, never the keys); admin keys only."""
        document = await self.request("GET", await self.link("tokens"))
        entries = document.get("tokens") if isinstance(document, dict) else None
        return [Token.from_document(e) for e in entries or [] if isinstance(e, dict)]

    async def revoke(self, token: Token) -> None:
        """Revoke a minted key: it stops working at once."""
        if token.revoke is None:
            raise MissingLink("revoke", agent=self.name)
        await self.request("POST", token.revoke, body={})

    async def version(self) -> str:
        """The agent's version, from its OpenAPI document.

        Raises:
            MissingLink: the agent has no ``openapi`` link (it is older than it).
        """
        document = await self.request("GET", await self.link("openapi"))
        info = document.get("info") if isinstance(document, dict) else None
        version = info.get("version") if isinstance(info, dict) else None
        if not isinstance(version, str):
            raise UnexpectedAnswer(f"agent {self.name}: its OpenAPI document has no version",
                                   agent=self.name)
        return version


async def _signal_each(stream: EventStream, changed: asyncio.Event) -> None:
    """Set ``changed`` at each event (the wait then reads the status again)."""
    try:
        async for _ in stream:
            changed.set()
    except ClientError:
        pass  # the wait goes on by reading the status
    changed.set()


def is_healthy(process: Process) -> bool:
    """Whether the process passed its health check, or has none.

    >>> from smartmob_agent.client.agent import Process, is_healthy
    >>> is_healthy(Process.from_document({"slug": "a.web.0", "options": {"health": None}}))
    True
    """
    check = process.options.get("health") if process.options else None
    return check is None or process.healthy is True


#: How soon to look again at a ``running`` process whose child exited a moment ago.
EXIT_BEING_RECORDED = 0.05


def unsteady_for(process: Process) -> float:
    """How many more seconds a running process must run to count as started (its
    ``start_seconds`` option, 1 by default, minus its ``uptime``); 0 if it has, or if
    the agent does not say.

    >>> from smartmob_agent.client.agent import Process, unsteady_for
    >>> unsteady_for(Process.from_document({"slug": "a.b", "uptime": 0.25,
    ...                                     "options": {"start_seconds": 1.0}}))
    0.75

    A ``running`` process whose ``uptime`` is ``null`` has a child that just exited, and
    the agent is still recording the exit: it is not steady, look again shortly.

    >>> unsteady_for(Process.from_document({"slug": "a.b", "state": "running",
    ...                                     "pid": None, "uptime": None}))
    0.05
    """
    if process.uptime is None:
        exiting = process.state == "running" and "uptime" in process.document
        return EXIT_BEING_RECORDED if exiting else 0.0
    wanted = process.options.get("start_seconds", 1.0) if process.options else 1.0
    if not isinstance(wanted, (int, float)):
        return 0.0
    return max(0.0, float(wanted) - process.uptime)


def describe_failure(process: Process) -> str:
    """One sentence on why a process is not running: its state, error and last exit."""
    said = f"agent {process.agent}: {process.slug} is {process.state}"
    if process.error:
        said += f": {process.error}"
    elif process.last_exit is not None:
        said += f": {process.last_exit.describe()}"
    return said


def signal_name(signal: str | int) -> str:
    """The agent's spelling of a signal: ``"HUP"`` for ``"HUP"``, ``"sighup"`` or ``1``.

    >>> from smartmob_agent.client.agent import signal_name
    >>> signal_name("sighup"), signal_name(15)
    ('HUP', 'TERM')
    """
    if isinstance(signal, int):
        return signals.Signals(signal).name.removeprefix("SIG")
    return signal.upper().removeprefix("SIG")


def _with_query(url: str, query: Mapping[str, str]) -> str:
    """``url`` with ``query`` added to its query string (values percent-encoded)."""
    if not query:
        return url
    separator = "&" if "?" in url else "?"
    return url + separator + urlencode(query)
