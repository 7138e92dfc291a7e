"""Cross-origin requests (CORS) from the web pages of ``--allow-origin``: a dashboard
served by one agent calling another.

A browser asks first (a preflight: ``OPTIONS`` with ``Origin`` and
``Access-Control-Request-Method``) before it sends a request with an ``Authorization``
header to another origin, and lets the page read an answer only if it names the page's
origin. The agent answers preflights from the origins of ``--allow-origin`` only, and
only when it has keys (:func:`~smartmob_agent.web.access.cors_problem`): the preflight
carries no key, but every request that follows must, as from anywhere. An agent without
keys refuses pages of other origins whatever ``--allow-origin`` says
(:func:`~smartmob_agent.web.access.browser_problem`).
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from smartmob_agent.representations import error_document
from smartmob_agent.web.access import cors_problem
from smartmob_agent.web.api import AGENT_KEY

#: The request headers a page may send: the key, a JSON body's type, a request id.
ALLOW_HEADERS = "Authorization, Content-Type, X-Request-Id"
#: The answer headers a page may read besides the simple ones.
EXPOSE_HEADERS = "Location, Retry-After, X-Request-Id"
#: Seconds a browser may keep a preflight's answer.
MAX_AGE = "600"

#: The normal origins of ``--allow-origin``.
ORIGINS_KEY: web.AppKey[tuple[str, ...]] = web.AppKey("allow_origin")


def _allowed(request: web.Request) -> str | None:
    """The request's ``Origin`` if it may have CORS answers, else ``None``."""
    origin = request.headers.get("Origin")
    allowed = request.app.get(ORIGINS_KEY, ())
    if origin is None or not allowed:
        return None
    keys = request.app[AGENT_KEY].keyring.enabled
    return None if cors_problem(origin, allowed, keys) else origin


def _vary(response: web.StreamResponse, *names: str) -> None:
    present = [v.strip() for v in response.headers.get("Vary", "").split(",") if v.strip()]
    response.headers["Vary"] = ", ".join([*present, *(n for n in names if n not in present)])


@web.middleware
async def cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer a preflight: ``204`` with what the page may send, for an allowed origin of
    an agent with keys; a JSON ``403`` saying why for another origin (on an agent with
    ``--allow-origin``); as any ``OPTIONS`` request otherwise (``405``)."""
    origin = request.headers.get("Origin")
    allowed = request.app.get(ORIGINS_KEY, ())
    if (request.method != "OPTIONS" or origin is None or not allowed
            or "Access-Control-Request-Method" not in request.headers):
        return await handler(request)
    problem = cors_problem(origin, allowed, request.app[AGENT_KEY].keyring.enabled)
    if problem is not None:
        return web.json_response(error_document(problem), status=403)
    error = request.match_info.http_exception
    if isinstance(error, web.HTTPMethodNotAllowed):  # the path exists, for these methods
        methods = sorted(error.allowed_methods)
    elif error is None:
        methods = [request.method]
    else:  # no such path: the preflight fails like the request would
        return web.json_response(error_document(
            f"there is nothing at {request.path}; start at / and follow the links"),
            status=error.status)
    response = web.Response(status=204, headers={
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Methods": ", ".join(methods),
        "Access-Control-Allow-Headers": ALLOW_HEADERS,
        "Access-Control-Max-Age": MAX_AGE,
    })
    _vary(response, "Origin", "Access-Control-Request-Method",
          "Access-Control-Request-Headers")
    return response


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: let a page of an allowed origin read the answer (errors
    included, so that it can show why), whatever route made it."""
    origin = _allowed(request)
    if origin is None:
        return
    response.headers["Access-Control-Allow-Origin"] = origin
    response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
    _vary(response, "Origin")


def install(app: web.Application, allowed: tuple[str, ...]) -> None:
    """Answer the preflights of, and mark the answers to, the pages of the ``allowed``
    origins (``--allow-origin``, normal origins).

    The middleware list is the caller's: :func:`cors_middleware` must come before the
    access checks (a preflight carries no key).
    """
    app[ORIGINS_KEY] = allowed
    app.on_response_prepare.append(add_cors_headers)
