"""The HTTP side of the client: one agent's address, key, session, timeouts and retries.

:class:`Transport` sends a request and reads its JSON answer, turning every failure into
one :class:`~.errors.ClientError` subclass; :class:`~.agent.AgentClient` builds the API's
calls on it. Retries: a request the agent never received (the connection could not be
made) is sent again, whatever it is; a request that may have reached the agent (the
connection broke during it) is sent again only if repeating it changes nothing (the
``idempotent`` calls: every ``GET``, and uploads). Each retry waits twice as long as the
one before, from ``retry_delay``.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

import aiohttp

from smartmob_agent.client.errors import (
    UnexpectedAnswer,
    Unreachable,
    error_for_status,
)
from smartmob_agent.client.streams import handshake_error


class Transport:
    """Requests to one agent, over aiohttp (the base of :class:`~.agent.AgentClient`).

    Use it as an async context manager (``async with AgentClient(url) as agent:``), or
    call :meth:`close` when done.

    Args:
        url: the agent's root URL (``http://127.0.0.1:8080``); its index is at ``/``.
        token: a key sent as ``Authorization: Bearer <key>`` on every request.
        name: what messages call the agent (a configured name); the URL by default.
        session: an aiohttp session to share (a :class:`~.fleet.Fleet` shares one); the
            client then does not close it.
        timeout: seconds an HTTP call may take in all (a delete waits for the process's
            stop, up to its ``stop_timeout``).
        connect_timeout: seconds to open a connection.
        retries: how many times a call is sent again after a connection failure.
        retry_delay: seconds before the first retry; doubled at each.
    """

    def __init__(
        self, url: str, *, token: str | None = None, name: str | None = None,
        session: aiohttp.ClientSession | None = None, timeout: float = 60.0,
        connect_timeout: float = 5.0, retries: int = 3, retry_delay: float = 0.1,
    ) -> None:
        self.url = url.rstrip("/") + "/"
        self.name = name or url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.retries = retries
        self.retry_delay = retry_delay
        self._session = session
        self._own_session = session is None

    async def __aenter__(self) -> Transport:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session, if this client made it."""
        if self._own_session and self._session is not None:
            await self._session.close()
        self._session = None

    def use_session(self, session: aiohttp.ClientSession) -> None:
        """Send requests over ``session`` (shared: this client will not close it), unless
        the client already has one."""
        if self._session is None:
            self._session, self._own_session = session, False

    @property
    def session(self) -> aiohttp.ClientSession:
        """The aiohttp session (made on first use)."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
            self._own_session = True
        return self._session

    @property
    def headers(self) -> dict[str, str]:
        """Headers sent with every request: the key, if any."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    # -- HTTP --------------------------------------------------------------------------

    async def request(
        self, method: str, url: str, *, body: Any = None, params: Mapping[str, str] | None = None,
        idempotent: bool | None = None, data: Callable[[], Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """Send one request and return the JSON of its answer.

        Args:
            body: a JSON value to send (as UTF-8 JSON), or ``None``.
            data: instead of ``body``, a callable that makes the request body (called
                again for a retry).
            idempotent: whether a retry after the connection broke is safe (by default,
                only for ``GET``).

        Raises:
            Unreachable: no answer, even after ``retries`` retries.
            ClientError: the agent answered with an error (a subclass by status).
        """
        if idempotent is None:
            idempotent = method == "GET"
        what = f"{method} {url}"
        send_headers = {"Accept": "application/json", **self.headers, **(headers or {})}
        if body is not None:
            send_headers["Content-Type"] = "application/json"
        timeout = aiohttp.ClientTimeout(total=self.timeout, connect=self.connect_timeout)
        failure: aiohttp.ClientError | None = None
        for attempt in range(self.retries + 1):
            payload = data() if data is not None else (
                None if body is None else json.dumps(body).encode())
            try:
                async with self.session.request(
                    method, url, data=payload, params=params, headers=send_headers,
                    timeout=timeout, allow_redirects=False,
                ) as response:
                    return await self._answer(response, what)
            except aiohttp.ClientConnectorError as error:  # never reached the agent
                failure = error
            except TimeoutError:
                raise Unreachable(
                    f"agent {self.name}: no answer to {what} within {self.timeout:g} s",
                    agent=self.name) from None
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as error:
                # every broken connection (a reset kept-alive one is not a ClientOSError)
                if not idempotent:
                    raise self._unreachable(error) from None
                failure = error
            except (aiohttp.InvalidURL, ValueError) as error:
                raise Unreachable(f"agent {self.name}: {url} is not a usable URL ({error})",
                                  agent=self.name) from None
            if attempt < self.retries:
                await asyncio.sleep(self.retry_delay * 2 ** attempt)
        assert failure is not None  # the loop ran at least once
        raise self._unreachable(failure) from None

    def _unreachable(self, error: BaseException) -> Unreachable:
        os_error = getattr(error, "os_error", None)
        number = os_error.errno if isinstance(os_error, OSError) else None
        if number is not None and number > 0:  # "connection refused", not asyncio's words
            why = os.strerror(number)
        elif isinstance(os_error, OSError) and os_error.strerror:
            why = os_error.strerror
        else:
            why = str(error) or type(error).__name__
        return Unreachable(f"cannot reach agent {self.name}: {why.lower()}", agent=self.name)

    async def _answer(self, response: aiohttp.ClientResponse, what: str) -> Any:
        raw = await response.read()
        try:
            document = json.loads(raw) if raw else None
        except ValueError:
            document = None
            if response.status < 400:
                raise UnexpectedAnswer(
                    f"agent {self.name}: {what} answered {response.status} with something "
                    "that is not JSON; is this a smartmob agent?", agent=self.name,
                    status=response.status) from None
        if response.status >= 400:
            raise error_for_status(
                response.status, document if isinstance(document, dict) else None,
                agent=self.name, what=what, retry_after=response.headers.get("Retry-After"))
        if response.status >= 300:
            raise UnexpectedAnswer(
                f"agent {self.name}: {what} answered {response.status} (a redirect to "
                f"{response.headers.get('Location')}), which the API never does",
                agent=self.name, status=response.status)
        return document

    def _websocket(self, what: str) -> Callable[[str], Any]:
        async def connect(url: str) -> aiohttp.ClientWebSocketResponse:
            try:
                return await self.session.ws_connect(
                    url, headers=self.headers, max_msg_size=0,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0))
            except aiohttp.WSServerHandshakeError as error:
                raise handshake_error(error, agent=self.name, what=what, url=url) from None
            except aiohttp.ClientError as error:
                raise self._unreachable(error) from None
        return connect
