"""The client's WebSockets: a process's console (``attach``) and the ``events`` stream.

Each is an async context manager and an async iterator: ``async with`` connects and
closes; iterating without ``async with`` connects on the first item and closes when the
stream ends. The agent pings every 30 seconds; aiohttp answers by itself.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Generic, TypeVar

import aiohttp

from smartmob_agent.client.errors import ClientError, Unreachable, error_for_status
from smartmob_agent.client.results import Event, LogLine, Marker

#: What each frame of a stream is read as.
T = TypeVar("T")
#: Close codes the agent uses, and what they mean.
CLOSE_REASONS = {1000: "the process was deleted", 1001: "the agent is shutting down"}
#: Opens the WebSocket at a URL.
Connector = Callable[[str], Awaitable[aiohttp.ClientWebSocketResponse]]
#: Finds the URL to open (following the agent's links) and whether its frames are JSON.
Locator = Callable[[], Awaitable[tuple[str, bool]]]


class WebSocketStream(Generic[T]):
    """A WebSocket whose text frames are read as ``T``: the base of
    :class:`Attachment` and :class:`EventStream`."""

    def __init__(self, locate: Locator, connect: Connector, agent: str) -> None:
        self._locate = locate
        self._connect = connect
        #: The WebSocket's URL, once connected.
        self.url = ""
        #: Whether the agent sends JSON frames (it was asked ``format=json``).
        self.json_frames = True
        self.agent = agent
        self._socket: aiohttp.ClientWebSocketResponse | None = None
        self._ended = False
        #: The close code the agent sent (``1000``, ``1001``), once the stream ended.
        self.close_code: int | None = None

    @property
    def close_reason(self) -> str | None:
        """Why the stream ended, in words (``"the process was deleted"``), or ``None``."""
        if self.close_code is None:
            return None
        return CLOSE_REASONS.get(self.close_code, f"the agent closed it (code {self.close_code})")

    async def connect(self) -> None:
        """Open the WebSocket (once)."""
        if self._socket is None and not self._ended:
            self.url, self.json_frames = await self._locate()
            self._socket = await self._connect(self.url)

    async def close(self) -> None:
        """Close the WebSocket; iterating then ends."""
        self._ended = True
        if self._socket is not None and not self._socket.closed:
            await self._socket.close()

    async def __aenter__(self) -> WebSocketStream[T]:
        await self.connect()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        await self.close()

    def __aiter__(self) -> WebSocketStream[T]:
        return self

    async def __anext__(self) -> T:
        await self.connect()
        while self._socket is not None and not self._ended:
            message = await self._socket.receive()
            if message.type is aiohttp.WSMsgType.TEXT:
                item = self._read(message.data)
                if item is not None:
                    return item
            elif message.type is aiohttp.WSMsgType.ERROR:
                self._ended = True
                raise Unreachable(f"agent {self.agent}: the WebSocket {self.url} failed: "
                                  f"{message.data}", agent=self.agent)
            elif message.type in {aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING,
                                  aiohttp.WSMsgType.CLOSED}:
                self.close_code = self._socket.close_code
                break
        self._ended = True
        if self._socket is not None and not self._socket.closed:
            await self._socket.close()
        raise StopAsyncIteration

    def _read(self, text: str) -> T | None:
        raise NotImplementedError


class Attachment(WebSocketStream[LogLine | Marker]):
    """A process's console: its output lines, and :meth:`send` to its standard input.

    Frames are JSON (``format=json``) when the agent has them; from an agent of the
    original API, each text frame is a bare line.

    Args:
        markers: also yield the :class:`~.results.Marker` frames (``spawned``,
            ``exited``, ...); else only lines.
    """

    def __init__(self, locate: Locator, connect: Connector, agent: str, *,
                 markers: bool = False) -> None:
        super().__init__(locate, connect, agent)
        self.markers = markers
        #: The ``seq`` of the last line read, to resume with ``after=``.
        self.last_seq: int | None = None

    async def __aenter__(self) -> Attachment:
        await self.connect()
        return self

    def __aiter__(self) -> Attachment:
        return self

    async def send(self, line: str) -> None:
        """Write ``line`` (and a newline) to the process's standard input."""
        await self.connect()
        if self._socket is None or self._socket.closed:
            raise ClientError(f"agent {self.agent}: the console of {self.url} is closed",
                              agent=self.agent)
        await self._socket.send_str(line)

    def _read(self, text: str) -> LogLine | Marker | None:
        if not self.json_frames:
            return LogLine(text)
        try:
            document = json.loads(text)
        except ValueError:
            return LogLine(text)
        if not isinstance(document, dict):
            return LogLine(text)
        if "event" in document:
            return Marker(str(document["event"]), document) if self.markers else None
        line = LogLine.from_document(document)
        if line.seq is not None:
            self.last_seq = line.seq
        return line


class EventStream(WebSocketStream[Event]):
    """The agent's events, one :class:`~.results.Event` per frame."""

    async def __aenter__(self) -> EventStream:
        await self.connect()
        return self

    def __aiter__(self) -> EventStream:
        return self

    def _read(self, text: str) -> Event | None:
        try:
            document = json.loads(text)
        except ValueError:
            return None
        if not isinstance(document, dict):
            return None
        return Event.from_document(document, self.agent)


def handshake_error(
    error: aiohttp.WSServerHandshakeError, *, agent: str, what: str, url: str
) -> ClientError:
    """The error for a WebSocket the agent refused to open (``404``, ``401``, ...)."""
    said = {404: f"there is no {what} at {url}", 401: "the agent needs a valid key",
            403: "this key may not open " + what}.get(error.status)
    body: dict[str, Any] = {"error": said} if said else {}
    return error_for_status(error.status, body, agent=agent, what=f"opening {what}")
