"""The aiohttp application: routes, the error and request-id middlewares, the lifecycle.

:func:`make_app` is the factory used by the CLI and the tests. Errors are mapped to HTTP
here and only here (:data:`ERROR_STATUS`), always as a JSON body.
"""

from __future__ import annotations

import logging
import re
import uuid
import weakref
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Handler

from smartmob_agent import errors
from smartmob_agent.config import Settings
from smartmob_agent.keys import ADMIN
from smartmob_agent.output import logrecords
from smartmob_agent.output.redact import redact
from smartmob_agent.processes.ports import PortsExhausted
from smartmob_agent.representations import error_document
from smartmob_agent.store import StoreError
from smartmob_agent.supervision.agent import Agent
from smartmob_agent.web import api, attach, cors, dashboard, hoststats, metrics
from smartmob_agent.web import events as eventsocket
from smartmob_agent.web.access import FailureLimiter, bearer_key, browser_problem, query_key
from smartmob_agent.web.api import AGENT_KEY, KEY_SOCKETS_KEY, PRINCIPAL_KEY, REQUEST_ID_KEY
from smartmob_agent.web.attach import SOCKETS_KEY, close_all
from smartmob_agent.web.guard import SlowRequest, connection_middleware
from smartmob_agent.web.links import TRUSTED_PROXIES_KEY

log = logging.getLogger("smartmob_agent.server")  # stable name: internals.rst

#: HTTP status of each error class (most specific first); any other AgentError is 400.
#: Any other exception (InvalidTransition among them) is a bug of the agent: a 500,
#: logged with its traceback by :func:`error_middleware`.
ERROR_STATUS: tuple[tuple[type[errors.AgentError], int], ...] = (
    (errors.InvalidRequest, 400),
    (errors.Unauthorized, 401),
    (errors.Forbidden, 403),
    (errors.NotFound, 404),
    (SlowRequest, 408),  # a body that came too slowly (--body-timeout)
    (errors.TooManyFailures, 429),
    (errors.Conflict, 409),
    (errors.TooLarge, 413),  # an uploaded archive over the limit
    (errors.StorageError, 507),  # the state folder cannot take the upload (disk full)
    (PortsExhausted, 503),  # the machine is out of ports; try again later
    (StoreError, 503),  # the state database cannot be written (disk full, ...)
)

#: A client's request id is echoed as sent if it is 1 to 200 printable ASCII characters
#: (spaces included): clients such as gitmesh-deploy send ``?`` or a sentence and check
#: the echo. Control and non-ASCII characters are what would let an id forge a header or
#: a log line, so an id holding one is replaced.
_REQUEST_ID = re.compile(r"[\x20-\x7e]{1,200}")


def status_of(error: errors.AgentError) -> int:
    """Return the HTTP status for an :class:`~smartmob_agent.errors.AgentError`."""
    for cls, status in ERROR_STATUS:
        if isinstance(error, cls):
            return status
    return 400


def _body(error: errors.AgentError) -> dict[str, object]:
    extra = {"fields": error.fields} if isinstance(error, errors.InvalidRequest) else {}
    return error_document(str(error), **extra)


def _http_error_message(error: web.HTTPException, request: web.Request) -> str:
    if isinstance(error, web.HTTPNotFound):
        return f"there is nothing at {request.path}; start at / and follow the links"
    if isinstance(error, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(error.allowed_methods))
        return f"{request.method} is not allowed on {request.path} (use {allowed})"
    if isinstance(error, web.HTTPRequestEntityTooLarge):
        return (
            f"the request body is too large (the limit is "
            f"{request.app[SETTINGS_KEY].max_body} bytes)"
        )
    return error.reason


SETTINGS_KEY = web.AppKey("settings", Settings)


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Echo the client's ``X-Request-Id`` (or assign one) on every response."""
    given = request.headers.get("X-Request-Id", "")
    request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
    request[REQUEST_ID_KEY] = request_id
    try:
        with logrecords.request_scope(request_id):  # every record logged meanwhile has it
            response = await handler(request)
    except web.HTTPException as error:
        error.headers["X-Request-Id"] = request_id
        raise
    if not response.prepared:
        response.headers["X-Request-Id"] = request_id
    return response


class AccessRecords(AbstractAccessLogger):
    """aiohttp's access logger: one ``http.access`` record per answered request, once
    it is answered (a WebSocket once it is closed): ``method``, ``path`` (with its
    query, every credential-like value hidden), ``outcome`` (the status), ``duration``
    (seconds), ``remote`` (the client's address) and ``request`` (the request id; ``None``
    for a request refused before it got one, e.g. an unreadable one)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        path = redact(request.raw_path)
        logrecords.event(
            self.logger, "http.access", method=request.method, path=path,
            outcome=response.status, duration=round(time, 6), remote=request.remote,
            request=request.get(REQUEST_ID_KEY),
            text=f'{request.remote} "{request.method} {path}" {response.status} {time:.6f}s',
        )

    @property
    def enabled(self) -> bool:
        """Whether the records would be written (aiohttp skips the call if not)."""
        return self.logger.isEnabledFor(logging.INFO)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every error into a JSON response with the right status."""
    try:
        return await handler(request)
    except errors.AgentError as error:
        return web.json_response(
            _body(error), status=status_of(error), headers=error.headers
        )
    except web.HTTPException as error:
        if error.status < 400:
            raise
        return web.json_response(
            error_document(_http_error_message(error, request)),
            status=error.status,
            headers={k: v for k, v in error.headers.items() if k == "Allow"},
        )
    except Exception:
        log.exception("unexpected error answering %s %s", request.method, request.path)
        return web.json_response(
            error_document("internal error of the agent; see its log"), status=500
        )


#: Routes open without a key: a load balancer's health check carries none; the
#: dashboard's files hold no secret (the page asks the user for each agent's key).
OPEN_ROUTES = frozenset({"health", "dashboard", "dashboard_file"})
#: Routes only an admin key opens: they concern every app, or the agent itself.
ADMIN_ROUTES = frozenset({"tokens", "revoke_token", "agent_log"})
LIMITER_KEY = web.AppKey("failure_limiter", FailureLimiter)


#: The WebSocket routes, where a key may come in the query (browsers cannot set headers
#: on a WebSocket).
SOCKET_ROUTES = frozenset({"attach", "events", "host_stats"})


def _presented_key(request: web.Request) -> str | None:
    key = bearer_key(request.headers.get("Authorization"))
    if (
        key is None
        and request.match_info.route.name in SOCKET_ROUTES
        and request.headers.get("Upgrade", "").lower() == "websocket"
    ):
        key = query_key(request.rel_url.raw_query_string)
    return key


@web.middleware
async def access_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Let in only requests with a key the agent knows, and note whom each comes from.

    Every request to an agent without keys comes from the admin. On an agent with keys,
    a route of :data:`OPEN_ROUTES` is let in without a key and names nobody: a handler
    there that asks :func:`~smartmob_agent.web.api.principal` is refused.
    Wrong keys from one address are counted; past a few, that address is refused (429)
    without its key being checked, for a while (:class:`~smartmob_agent.web.access.FailureLimiter`).
    An agent without keys refuses what looks like a web page's request instead
    (:func:`~smartmob_agent.web.access.browser_problem`).
    """
    keyring = request.app[AGENT_KEY].keyring
    route = request.match_info.route.name
    if route in OPEN_ROUTES and keyring.enabled:
        # no key is checked, so nobody is named: a handler asking who it is gets a 403
        # (api.principal), never the admin
        return await handler(request)
    if not keyring.enabled:
        problem = None if route in OPEN_ROUTES else browser_problem(
            request.headers.get("Host"), request.headers.get("Origin"),
            request.app[SETTINGS_KEY].host, request.app[SETTINGS_KEY].allow_host,
        )
        if problem is not None:
            raise errors.Forbidden(problem)
        request[PRINCIPAL_KEY] = ADMIN  # an agent without keys: everyone is the admin
        return await handler(request)
    limiter = request.app[LIMITER_KEY]
    address = request.remote or ""
    wait = limiter.retry_after(address)
    if wait > 0:
        raise errors.TooManyFailures(wait)
    key = _presented_key(request)
    principal = None if key is None else keyring.identify(key)
    if principal is None:
        if key is not None:
            limiter.failed(address)
        # the same answer for a missing and a wrong key: nothing about which part failed
        raise errors.Unauthorized(
            "this agent needs a key: send 'Authorization: Bearer <key>' (WebSockets may "
            "pass ?token=<key> instead)"
        )
    if route in ADMIN_ROUTES and not principal.is_admin:
        raise errors.Forbidden("only an admin key may use this")
    request[PRINCIPAL_KEY] = principal
    return await handler(request)


def make_app(settings: Settings, agent: Agent | None = None) -> web.Application:
    """Build the web application.

    Args:
        settings: configuration.
        agent: an agent to serve; by default the app makes one and owns it (starts it
            on startup, stops every process on cleanup).
    """
    app = web.Application(
        client_max_size=settings.max_body,
        middlewares=[
            connection_middleware, request_id_middleware, metrics.metrics_middleware,
            cors.cors_middleware, error_middleware, access_middleware,
        ],
    )
    owned = agent is None
    app[AGENT_KEY] = agent if agent is not None else Agent(settings)
    app[SETTINGS_KEY] = settings
    app[TRUSTED_PROXIES_KEY] = settings.trusted_proxy
    app[LIMITER_KEY] = FailureLimiter()
    app[SOCKETS_KEY] = weakref.WeakSet()
    app[KEY_SOCKETS_KEY] = {}
    app[eventsocket.EVENT_BUS_KEY] = app[AGENT_KEY].events
    app.add_routes(api.routes)
    app.add_routes(attach.routes)
    app[dashboard.FILES_KEY] = dashboard.served_files()
    app.add_routes(dashboard.routes)
    eventsocket.add_routes(app)
    hoststats.add_routes(app)
    metrics.add_routes(app)
    cors.install(app, settings.allow_origin)
    app.on_shutdown.append(close_all)
    if owned:
        app.cleanup_ctx.append(_agent_lifecycle)
    return app


async def _agent_lifecycle(app: web.Application) -> AsyncIterator[None]:
    agent = app[AGENT_KEY]
    await agent.start()
    yield
    await agent.close()
