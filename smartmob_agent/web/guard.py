"""Connections: how many may be open at once, and how long a client may take.

Anyone who can open a TCP connection to the agent can hold it open without a key: a
connection that sends nothing, headers one byte at a time, or a body one byte every few
seconds ("slowloris"). Each holds a file descriptor, and an agent out of descriptors can
neither answer nor start a child. So every connection the agent serves is a
:class:`GuardedRequestHandler` (made by :class:`GuardedSite`), which enforces:

* ``--header-timeout``: a request's line and headers must be complete within this time
  of their first byte; past it, a JSON ``408`` and the connection is closed;
* ``--body-timeout``: a request's body must arrive within this time of the handler
  starting, plus one second per :data:`MIN_BODY_RATE` bytes received (a steady upload,
  however large, is never cut); past it, the read fails with :class:`SlowRequest`, a
  JSON ``408``, and the connection is closed;
* ``--keepalive-timeout``: a connection waiting for a request (its first, or the next
  one) is closed after this long (aiohttp's own keep-alive timer);
* ``--max-connections``: with that many open, a new connection closes the one idle the
  longest (waiting for a request, nothing left to send); when none is idle, the new one
  gets a JSON ``503`` and is closed at once (:class:`ConnectionGuard`).

A request is *busy* from the moment its handler starts (:func:`connection_middleware`)
until its response is written whole (:meth:`GuardedRequestHandler.finish_response`):
timeouts other than the body's do not apply then, so WebSockets (``attach``,
``events``), which are one long request, are never cut by them.

Errors aiohttp finds before any handler runs (a request line or header over 8190
bytes, bytes that are not HTTP) are answered as JSON too, with one log line and no
traceback (:meth:`GuardedRequestHandler.handle_error`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import resource
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong
from aiohttp.streams import StreamReader
from aiohttp.typedefs import Handler

from smartmob_agent.config import Settings
from smartmob_agent.errors import AgentError
from smartmob_agent.representations import error_document

log = logging.getLogger("smartmob_agent.connections")  # stable name: internals.rst

#: Bytes a second under which a request body is cut at ``--body-timeout``: each
#: ``MIN_BODY_RATE`` bytes received give the body one more second.
MIN_BODY_RATE = 1024
#: Least time between two warnings that the connection limit was reached.
FULL_WARNING_INTERVAL = 60.0
#: The most connections the default limit allows, whatever the open-file limit.
MAX_DEFAULT_CONNECTIONS = 4096


class SlowRequest(AgentError, TimeoutError):
    """The request body did not arrive in time (``408``; the connection is closed).

    A :class:`TimeoutError` too: aiohttp, reading what is left of the body after the
    answer, takes that as the end of the connection and closes it without a traceback.
    """

    headers = {"Connection": "close"}  # noqa: RUF012 - read-only by convention


def connection_limit(given: int | None, open_files: int) -> int:
    """The most connections served at once: ``given``, else half the open-file limit
    (``open_files``, negative when unlimited), at most :data:`MAX_DEFAULT_CONNECTIONS`.

    >>> from smartmob_agent.web.guard import connection_limit
    >>> connection_limit(None, 256), connection_limit(None, 1_048_576), connection_limit(7, 256)
    (128, 4096, 7)
    """
    if given is not None:
        return given
    if open_files < 0:
        return MAX_DEFAULT_CONNECTIONS
    return max(1, min(open_files // 2, MAX_DEFAULT_CONNECTIONS))


def raw_error_response(status: int, reason: str, message: str, **headers: str) -> bytes:
    """A whole HTTP/1.1 response with an ``{"error": message}`` body, that closes the
    connection: for the answers given where no request handler runs."""
    body = json.dumps(error_document(message)).encode()
    lines = [
        f"HTTP/1.1 {status} {reason}",
        "Content-Type: application/json; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{name.replace('_', '-')}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def bad_request_message(error: BaseException | None, line_limit: int) -> str:
    """The sentence a client gets when what it sent is not an HTTP request the agent
    can read (found by aiohttp's parser, before any handler runs)."""
    if isinstance(error, LineTooLong):
        return (
            f"the request line or a header is too long: the agent takes at most "
            f"{line_limit} bytes for each"
        )
    if isinstance(error, HttpProcessingError) and error.message:
        # aiohttp's messages may go on with a quote of the line, marked up: keep the gist
        first = error.message.splitlines()[0].rstrip(":. ")
        return f"the request is not valid HTTP: {first}"
    return "the request is not valid HTTP"


class ConnectionGuard:
    """The connections one listening socket serves, and their limits.

    Args:
        settings: the timeouts and the limit (``None``: see :func:`connection_limit`).
    """

    def __init__(self, settings: Settings) -> None:
        open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if open_files == resource.RLIM_INFINITY:
            open_files = -1
        self.limit = connection_limit(settings.max_connections, open_files)
        self.header_timeout = settings.header_timeout
        self.body_timeout = settings.body_timeout
        self.keepalive_timeout = settings.keepalive_timeout
        #: open connections, oldest first
        self._open: dict[GuardedRequestHandler, None] = {}
        self._warned_at = -math.inf
        #: connections closed to make room, and connections refused, since the start
        self.evicted = 0
        self.refused = 0

    def __len__(self) -> int:
        return len(self._open)

    def admit(self, handler: GuardedRequestHandler) -> bool:
        """Make room for a new connection if need be; whether it may be served."""
        if len(self._open) >= self.limit:
            victim = min(
                (candidate for candidate in self._open if candidate.idle()),
                key=lambda candidate: candidate.last_active, default=None,
            )
            self._warn_full()
            if victim is None:
                self.refused += 1
                return False
            self.evicted += 1
            del self._open[victim]
            victim.force_close()
        self._open[handler] = None
        return True

    def release(self, handler: GuardedRequestHandler) -> None:
        """Forget a connection that is closed."""
        self._open.pop(handler, None)

    def _warn_full(self) -> None:
        now = asyncio.get_running_loop().time()
        if now - self._warned_at < FULL_WARNING_INTERVAL:
            return
        self._warned_at = now
        log.warning(
            "%d connections are open, the most --max-connections allows: closing the "
            "longest idle to make room, refusing new ones (503) while none is idle "
            "(%d closed and %d refused so far)", len(self._open), self.evicted,
            self.refused,
        )


class GuardedRequestHandler(web.RequestHandler):
    """aiohttp's protocol for one connection, held to the :class:`ConnectionGuard`'s
    limits; its errors are answered as JSON."""

    def __init__(self, manager: web.Server, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, keepalive_timeout=guard.keepalive_timeout, **kwargs)
        self._guard = guard
        self._admitted = False
        #: the request being handled and answered, if any
        self._request: web.BaseRequest | None = None
        self.last_active = 0.0
        self._header_timer: asyncio.TimerHandle | None = None
        #: the body of the request being handled, while the clock runs on it
        self._body: StreamReader | None = None
        self._body_deadline = 0.0
        self._body_timer: asyncio.TimerHandle | None = None
        #: the body of an answered request, that aiohttp may still be reading to drop it
        self._leftover: StreamReader | None = None

    # -- the connection -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Serve the connection if the guard lets it in; else answer 503 and close."""
        self.last_active = asyncio.get_running_loop().time()
        if not self._guard.admit(self):
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(raw_error_response(
                503, "Service Unavailable",
                f"the agent is serving as many connections as it takes "
                f"({self._guard.limit}, its --max-connections), all busy: try again "
                "later", Retry_After="5",
            ))
            transport.close()
            return
        self._admitted = True
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        """Forget the connection (a refused one was never served)."""
        self._cancel_timers()
        if self._admitted:
            self._guard.release(self)
            super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Note the time; start the header clock on a request's first byte, or give a
        body that comes more time."""
        if not self._admitted:
            return
        if not data:  # aiohttp's own nudge to parse what it holds: nothing arrived
            super().data_received(data)
            return
        loop = asyncio.get_running_loop()
        self.last_active = loop.time()
        if self._request is not None:
            if self._body is not None:
                self._body_deadline += len(data) / MIN_BODY_RATE
        elif self._header_timer is None and (
            self._leftover is None or self._leftover.is_eof()
        ):
            self._header_timer = loop.call_later(
                self._guard.header_timeout, self._headers_late
            )
        super().data_received(data)

    def idle(self) -> bool:
        """Whether the connection waits for a request with nothing left to send (so it
        may be closed to make room)."""
        transport = self.transport
        return (
            self._request is None and transport is not None and transport.is_reading()
            and transport.get_write_buffer_size() == 0
        )

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self._request is not None or self.transport is None:
            return
        log.debug("a request's headers took over %g s to arrive: connection closed",
                  self._guard.header_timeout)
        self.transport.write(raw_error_response(
            408, "Request Timeout",
            f"the request line and headers did not arrive within "
            f"{self._guard.header_timeout:g} s (--header-timeout)",
        ))
        self.force_close()

    # -- one request ------------------------------------------------------------------

    def begin(self, request: web.BaseRequest) -> None:
        """The handler of ``request`` starts: the header clock stops; the body's starts."""
        self._request = request
        self._leftover = None
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if not request.content.is_eof():
            loop = asyncio.get_running_loop()
            self._body = request.content
            self._body_deadline = loop.time() + self._guard.body_timeout
            self._body_timer = loop.call_at(self._body_deadline, self._body_late)

    def _body_late(self) -> None:
        self._body_timer = None
        body = self._body
        if body is None or body.is_eof():
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self._body_deadline:  # what came meanwhile bought more time
            self._body_timer = loop.call_at(self._body_deadline, self._body_late)
            return
        log.debug("a request body came too slowly: answered 408")
        body.set_exception(SlowRequest(
            f"the request body did not arrive in time: the agent waits "
            f"{self._guard.body_timeout:g} s (--body-timeout) plus one second for each "
            f"{MIN_BODY_RATE} bytes received"
        ))

    def _end(self, request: web.BaseRequest) -> None:
        if self._request is not request:
            return
        self._request = None
        self._body = None
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        # aiohttp may read what is left of the body to drop it: not a new request's head
        self._leftover = None if request.content.is_eof() else request.content
        self.last_active = asyncio.get_running_loop().time()

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        """Write the response (aiohttp's), then count the connection as idle again."""
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            self._end(request)

    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Answer what aiohttp could not hand to the application (a request it cannot
        parse) as JSON, logging one line; a bug (500) is logged with its traceback."""
        if request.writer.output_size > 0:  # as aiohttp: too late for another answer
            raise ConnectionError("the response was already started")
        if status == 500:
            log.error("unexpected error answering a request from %s", request.remote,
                      exc_info=exc)
            text = "internal error of the agent; see its log"
        else:
            text = bad_request_message(exc, self.max_line_size)
            # HTTPS or other bytes sent to the HTTP port: common, and nothing to act on
            level = logging.DEBUG if isinstance(exc, BadHttpMethod) else logging.INFO
            log.log(level, "answered %d to %s: %s", status, request.remote, text)
        response = web.json_response(error_document(text), status=status)
        response.force_close()
        return response


@web.middleware
async def connection_middleware(
    request: web.Request, handler: Handler
) -> web.StreamResponse:
    """Tell the connection that a request's handler runs (see
    :meth:`GuardedRequestHandler.begin`); a no-op on other servers (tests')."""
    protocol = request.protocol
    if isinstance(protocol, GuardedRequestHandler):
        protocol.begin(request)
    return await handler(request)


class GuardedSite(web.BaseSite):
    """A TCP site like :class:`aiohttp.web.TCPSite` whose connections are
    :class:`GuardedRequestHandler` instances.

    Args:
        runner: a runner that is set up.
        settings: the address, the port, and the guard's limits.
        ssl_context: TLS, if any; a TLS handshake must end within ``--header-timeout``.
    """

    def __init__(
        self, runner: web.BaseRunner, settings: Settings,
        ssl_context: Any = None,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self._host = settings.host
        self._port = settings.port
        self.guard = ConnectionGuard(settings)
        self._bound: asyncio.Server | None = None

    @property
    def name(self) -> str:
        """The URL of the site: its first bound address once bound, else as asked for."""
        scheme = "https" if self._ssl_context else "http"
        if self._bound is not None and self._bound.sockets:
            host, port = self._bound.sockets[0].getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            return f"{scheme}://{shown}:{port}"
        return f"{scheme}://{self._host}:{self._port}"

    async def bind(self) -> None:
        """Bind the listening sockets (every address the host resolves to, as
        :class:`aiohttp.web.TCPSite` does) without accepting connections yet, so that a
        taken port can stop the command before it touches anything else.

        Raises:
            OSError: the address cannot be bound.
        """
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None, "set the runner up first"
        guard = self.guard

        # the runner's options for connections (its access logger) hold here too
        options: dict[str, Any] = dict(getattr(server, "_kwargs", {}))

        def protocol() -> GuardedRequestHandler:
            return GuardedRequestHandler(server, guard, loop=loop, **options)

        self._bound = await loop.create_server(
            protocol, self._host, self._port, ssl=self._ssl_context,
            backlog=self._backlog, start_serving=False,
            ssl_handshake_timeout=guard.header_timeout if self._ssl_context else None,
        )

    async def start(self) -> None:
        """Accept connections (binding first if :meth:`bind` was not called)."""
        await super().start()
        if self._bound is None:
            await self.bind()
        assert self._bound is not None
        self._server = self._bound
        await self._bound.start_serving()
        log.debug("serving at most %d connections at once", self.guard.limit)

    def close_unserved(self) -> None:
        """Release the sockets of a site that will never be started (idempotent)."""
        if self._bound is not None:
            self._bound.close()
