"""REST handlers: HTTP in, calls on the :class:`~smartmob_agent.supervision.agent.Agent`, JSON out.

No business logic lives here: handlers parse and validate the request, call the agent,
and return a representation. Errors are raised as :mod:`smartmob_agent.errors` classes
and turned into JSON responses by the middleware in :mod:`smartmob_agent.web.server`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import weakref
from typing import Any, Protocol

from aiohttp import WSCloseCode, web
from aiohttp.http_exceptions import HttpProcessingError

from smartmob_agent import representations as docs
from smartmob_agent.errors import AgentError, Forbidden, InvalidRequest, NotFound
from smartmob_agent.keys import Principal
from smartmob_agent.model import Spec
from smartmob_agent.queries import parse_log_query
from smartmob_agent.schemas import (
    bulk_request,
    create_request,
    parse_bulk,
    signal_request,
    spec_from_request,
    updated_request,
)
from smartmob_agent.supervision.agent import Agent
from smartmob_agent.supervision.watcher import Watcher
from smartmob_agent.web.links import SOURCE_ROUTE, RequestLinks

routes = web.RouteTableDef()

AGENT_KEY = web.AppKey("agent", Agent)
#: Bytes read from an upload's body at a time.
UPLOAD_CHUNK = 64 * 1024
REQUEST_ID_KEY = web.RequestKey("request_id", str)
#: Who the request comes from; set by the access middleware on every request.
PRINCIPAL_KEY = web.RequestKey("principal", Principal)


def _agent(request: web.Request) -> Agent:
    return request.app[AGENT_KEY]


def principal(request: web.Request) -> Principal:
    """Who the request comes from, as the access middleware named it (the admin on an
    agent without keys).

    Raises:
        Forbidden: no principal was set: the request did not go through the access
            middleware (an application built without it), or went through it on a route
            open to anyone. Access fails closed: a request nobody vouched for may do
            nothing, rather than everything.
    """
    found: Principal | None = request.get(PRINCIPAL_KEY)
    if found is None:
        raise Forbidden(
            "no key was checked for this request, so the agent refuses it (a route open "
            "to anyone, or an application built without the agent's access middleware)"
        )
    return found


class Revocable(Protocol):
    """An open WebSocket, as revoking the key it was opened with closes it."""

    async def shutdown(self, code: int, message: bytes) -> Any:
        """Close it with ``code`` and ``message``."""


#: The WebSockets open with each minted key (by key id): revoking a key must cut off
#: the sockets it opened too, not only the requests that come after.
KEY_SOCKETS_KEY = web.AppKey("key_sockets", dict[str, "weakref.WeakSet[Revocable]"])


def watch_key(request: web.Request, socket: Revocable) -> None:
    """Remember that ``socket`` was opened with the request's minted key, if it was."""
    key_id = principal(request).key_id
    sockets = request.app.get(KEY_SOCKETS_KEY)
    if key_id is not None and sockets is not None:
        sockets.setdefault(key_id, weakref.WeakSet()).add(socket)


def process_for(request: web.Request) -> Watcher:
    """The process the URL's ``{slug}`` names, if the request's key may see it.

    Raises:
        NotFound: no such process, or one of an app the key is not scoped to (the same
            answer: names of other apps do not leak).
    """
    return _agent(request).get(request.match_info["slug"], principal(request).app)


def require_app(request: web.Request, app: str | None) -> None:
    """Check that the request's key may act on ``app`` (``None``: every app).

    Raises:
        Forbidden: the key is scoped to another app.
    """
    scope = principal(request).app
    if scope is not None and app != scope:
        raise Forbidden(f"this key acts only on the processes of app {scope!r}")


async def read_json(request: web.Request, *, allow_empty: bool = False) -> Any:
    """Read the body as JSON whatever its Content-Type (the seed's client sends none).

    Raises:
        InvalidRequest: for an empty body (unless allowed) or text that is not JSON.
    """
    body = await request.read()
    if not body.strip():
        if allow_empty:
            return {}
        raise InvalidRequest("the request body is empty: send a JSON object")
    try:
        return json.loads(body, parse_constant=_no_constant, parse_int=_integer)
    except _NumberTooLarge:
        raise InvalidRequest(
            f"the request body is not usable JSON: a number in it is too large (an "
            f"integer may have at most {MAX_INTEGER_DIGITS} digits)"
        ) from None
    except UnicodeDecodeError:
        raise InvalidRequest("the request body is not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise InvalidRequest(
            f"the request body is not valid JSON: {error.msg} at line {error.lineno} "
            f"column {error.colno}"
        ) from None
    except RecursionError:
        raise InvalidRequest("the request body is nested too deeply") from None
    except ValueError as error:  # NaN or Infinity
        raise InvalidRequest(f"the request body is not usable JSON: {error}") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


#: Most digits of an integer in a JSON body: Python's own default limit on turning text
#: into an integer (which would otherwise answer with advice about its internals),
#: whatever the process's setting, and far more than any field takes.
MAX_INTEGER_DIGITS = 4300


class _NumberTooLarge(ValueError):
    pass


def _integer(text: str) -> int:
    if len(text) - text.startswith("-") > MAX_INTEGER_DIGITS:
        raise _NumberTooLarge
    return int(text)


@routes.get("/", name="index")
async def index(request: web.Request) -> web.Response:
    """The entry point: links to every collection-level action."""
    return web.json_response(docs.index_document(RequestLinks(request)))


@routes.get("/list-processes", name="list")
async def list_processes(request: web.Request) -> web.Response:
    """Every process's status document, in creation order."""
    links = RequestLinks(request)
    agent = _agent(request)
    await agent.monitor.fresh()  # the CPU and memory figures, sampled if nobody looked
    processes = agent.list(principal(request).app)
    return web.json_response(docs.listing_document(processes, links))


@routes.post("/create-process", name="create")
async def create_process(request: web.Request) -> web.Response:
    """Create a process from a create request; 201 with its status document."""
    data = create_request.validate(await read_json(request))
    spec = _from_upload(request, spec_from_request(data))
    require_app(request, spec.app)
    agent = _agent(request)
    minted = None
    if data.get("issue_token"):
        _check_may_mint(request, agent)
        # the key first: a create must be whole or not done, and a key is easier to take
        # back than a process that already runs
        minted = agent.mint_key(spec.app)
    try:
        watcher = agent.create(spec, request_id=request.get(REQUEST_ID_KEY))
    except BaseException:
        if minted is not None:
            with contextlib.suppress(AgentError):  # unusable, since never shown
                agent.revoke_key(minted[0].id)
        raise
    links = RequestLinks(request)
    document = docs.process_document(watcher.info(), links)
    if minted is not None:
        key, secret = minted
        # shown this once: the agent keeps only its digest
        document["token"] = {"id": key.id, "app": key.app, "key": secret}
    return web.json_response(
        document, status=201, headers={"Location": links.process("details", spec.slug)}
    )


def _check_may_mint(request: web.Request, agent: Agent) -> None:
    """Refuse ``issue_token`` from an app key (a key must not breed keys that outlive
    its revocation) and on an agent without keys (the key would open nothing)."""
    if not agent.keyring.enabled:
        raise InvalidRequest(
            "issue_token: this agent has no keys, so a minted key would open nothing "
            "(start it with --token to use keys)",
            {"issue_token": "needs an agent started with keys (--token)"},
        )
    if not principal(request).is_admin:
        raise Forbidden("only an admin key may ask for issue_token")


def _from_upload(request: web.Request, spec: Spec) -> Spec:
    """``spec`` with the checksum its ``source_url`` names, if that is the URL of an
    upload to this agent and the request gave none: the archive is then read from the
    cache, never asked for over HTTP (see :meth:`.RequestLinks.uploaded_sha256`).

    Raises:
        InvalidRequest: the URL names an upload this agent does not have.
    """
    if spec.sha256 is not None:
        return spec
    sha256 = RequestLinks(request).uploaded_sha256(spec.source_url)
    if sha256 is None:
        return spec
    try:
        _agent(request).uploaded_source(sha256)
    except NotFound as error:
        raise InvalidRequest(
            f"source_url is an upload URL of this agent, but {error}: upload the archive "
            "again",
            {"source_url": "names an archive this agent does not have"},
        ) from None
    return dataclasses.replace(spec, sha256=sha256)


@routes.post("/upload-source", name="upload")
async def upload_source(request: web.Request) -> web.Response:
    """Keep the archive the body holds (raw bytes, any ``Content-Type``); 201 with the
    ``source_url`` and ``checksum`` a create request gives to run it."""
    # request.content is read as it arrives: the body may be far over the app's
    # client_max_size, which only bounds request.read()/post() (the JSON bodies)
    try:
        stored = await _agent(request).upload(
            request.content.iter_chunked(UPLOAD_CHUNK), request.content_length
        )
    except (ConnectionError, HttpProcessingError) as error:
        # the client went away, or sent a broken body: its business, not an agent bug
        # (nothing was kept; the answer will likely reach nobody)
        raise InvalidRequest(f"the upload was cut short or malformed: {error}") from None
    source_url = RequestLinks(request).source(stored.sha256)
    return web.json_response(
        docs.upload_document(source_url, stored.sha256, stored.size),
        status=201, headers={"Location": source_url},
    )


@routes.get("/sources/{sha256}", name=SOURCE_ROUTE)
async def uploaded_source(request: web.Request) -> web.StreamResponse:
    """The archive of an upload, as it was sent (404 when there is no such upload)."""
    path = _agent(request).uploaded_source(request.match_info["sha256"])
    return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})


@routes.get("/process-status/{slug}", name="details")
async def process_status(request: web.Request) -> web.Response:
    """The status document of one process."""
    watcher = process_for(request)
    await _agent(request).monitor.fresh()  # its CPU and memory, sampled if nobody looked
    return web.json_response(docs.process_document(watcher.info(), RequestLinks(request)))


@routes.get("/process-logs/{slug}", name="logs")
async def process_logs(request: web.Request) -> web.Response:
    """The last output lines of a process (``?tail=N``, ``?since=TIME``): JSON, or plain
    text when the ``Accept`` header prefers ``text/plain``."""
    watcher = process_for(request)
    tail, since = parse_log_query(request.query)
    entries = await watcher.output_log.read(tail, since)
    if prefers_text(request.headers.get("Accept", "")):
        return web.Response(text=docs.log_text(entries), content_type="text/plain")
    return web.json_response(docs.log_document(entries))


@routes.get("/agent-log", name="agent_log")
async def agent_log(request: web.Request) -> web.Response:
    """The last lines of the agent's own log (what it writes to stderr), like a
    process's ``logs``: ``?tail=N``, ``?since=TIME``, JSON or plain text."""
    tail, since = parse_log_query(request.query)
    entries = await _agent(request).agent_log.read(tail, since)
    if prefers_text(request.headers.get("Accept", "")):
        return web.Response(text=docs.log_text(entries), content_type="text/plain")
    return web.json_response(docs.log_document(entries))


def prefers_text(accept: str) -> bool:
    """Whether an ``Accept`` header prefers ``text/plain`` to JSON (ties go to JSON).

    >>> from smartmob_agent.web.api import prefers_text
    >>> prefers_text("text/plain"), prefers_text("application/json, text/plain;q=0.5")
    (True, False)
    >>> prefers_text(""), prefers_text("*/*"), prefers_text("text/*;q=0.9, */*;q=0.1")
    (False, False, True)
    """
    json_q = text_q = 0.0
    for item in accept.split(","):
        kind, *params = (part.strip() for part in item.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        kind = kind.lower()
        if kind in ("application/json", "application/*", "*/*"):
            json_q = max(json_q, q)
        if kind in ("text/plain", "text/*", "*/*"):
            text_q = max(text_q, q)
    return text_q > json_q


@routes.post("/delete-process/{slug}", name="delete")
async def delete_process(request: web.Request) -> web.Response:
    """Stop a process, wait until it is gone, and forget it; answers ``{}``."""
    slug = request.match_info["slug"]
    agent = _agent(request)
    agent.get(slug, principal(request).app)  # 404 before reading the body
    body = await read_json(request, allow_empty=True)
    if not isinstance(body, dict):
        raise InvalidRequest("the delete request must be a JSON object (usually {})")
    await agent.delete(slug)
    return web.json_response({})


async def _control_target(request: web.Request) -> Watcher:
    """The watcher a control names (404 first), once its body is known to be an object."""
    watcher = process_for(request)
    body = await read_json(request, allow_empty=True)
    if not isinstance(body, dict) or body:
        raise InvalidRequest("this control takes no fields: send {} or nothing")
    return watcher


def _status(request: web.Request, watcher: Watcher, status: int = 200) -> web.Response:
    return web.json_response(
        docs.process_document(watcher.info(), RequestLinks(request)), status=status)


async def _control(request: web.Request, action: str) -> web.Response:
    """Apply a body-less control to the process the URL names; answer its status."""
    watcher = await _control_target(request)
    await _agent(request).control(watcher, action)
    return _status(request, watcher)


@routes.post("/start-process/{slug}", name="start")
async def start_process(request: web.Request) -> web.Response:
    """Start a stopped, exited or failed process, or end a backoff now."""
    return await _control(request, "start")


@routes.post("/stop-process/{slug}", name="stop")
async def stop_process(request: web.Request) -> web.Response:
    """Stop a process and keep it, stopped; answers once its child is gone."""
    return await _control(request, "stop")


@routes.post("/restart-process/{slug}", name="restart")
async def restart_process(request: web.Request) -> web.Response:
    """Stop a process, wait until its child is gone, and start it again."""
    return await _control(request, "restart")


@routes.post("/signal-process/{slug}", name="signal")
async def signal_process(request: web.Request) -> web.Response:
    """Send a signal (``{"signal": "HUP"}``) to a running process's group."""
    watcher = process_for(request)
    data = signal_request.validate(await read_json(request))
    await watcher.request_signal(data["signal"])
    return _status(request, watcher)


@routes.post("/update-process/{slug}", name="update")
async def update_process(request: web.Request) -> web.Response:
    """Update a process in place to a new source (``{"source_url", "checksum"?, "env"?,
    "options"?}``): 202 with its status document; the update goes on in the background."""
    watcher = process_for(request)
    data = updated_request(docs.request_document(watcher.spec), await read_json(request))
    _agent(request).update(watcher, _from_upload(request, spec_from_request(data)))
    return _status(request, watcher, 202)


@routes.post("/rollback-process/{slug}", name="rollback")
async def rollback_process(request: web.Request) -> web.Response:
    """Update a process back to its previous version: 202, or 409 when it has none."""
    watcher = await _control_target(request)
    _agent(request).update(watcher)
    return _status(request, watcher, 202)


async def _bulk(request: web.Request, action: str) -> web.Response:
    app = parse_bulk(bulk_request.validate(await read_json(request)))
    require_app(request, app)
    outcomes = await _agent(request).bulk(action, app)
    return web.json_response({"processes": outcomes})


@routes.post("/start-processes", name="bulk_start")
async def bulk_start(request: web.Request) -> web.Response:
    """Start every process of an app (``{"app": ...}``) or every one (``{"all": true}``)."""
    return await _bulk(request, "start")


@routes.post("/stop-processes", name="bulk_stop")
async def bulk_stop(request: web.Request) -> web.Response:
    """Stop every process of an app, or every one."""
    return await _bulk(request, "stop")


@routes.post("/restart-processes", name="bulk_restart")
async def bulk_restart(request: web.Request) -> web.Response:
    """Restart every process of an app, or every one."""
    return await _bulk(request, "restart")


@routes.post("/delete-processes", name="bulk_delete")
async def bulk_delete(request: web.Request) -> web.Response:
    """Delete every process of an app, or every one."""
    return await _bulk(request, "delete")


@routes.get("/healthz", name="health")
async def health(request: web.Request) -> web.Response:
    """Whether the agent answers: open without a key, for load balancers and systemd."""
    return web.json_response({"status": "ok"})


@routes.get("/openapi.json", name="openapi")
async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 document of every route this agent serves, for this host."""
    # here: an agent nobody asks for its description need not hold the module's tables
    from smartmob_agent.web.openapi import openapi_document

    server = RequestLinks(request).index("index").removesuffix("/")
    served = (
        (route.name, route.method, route.resource.canonical)
        for route in request.app.router.routes()
        if route.method != "HEAD" and route.name is not None and route.resource is not None
    )
    return web.json_response(openapi_document(server, served))


@routes.get("/list-tokens", name="tokens")
async def list_tokens(request: web.Request) -> web.Response:
    """The minted keys (admin only): id, app and creation time, never the keys."""
    links = RequestLinks(request)
    keys = _agent(request).keyring.minted()
    return web.json_response({"tokens": [docs.key_document(key, links) for key in keys]})


@routes.post("/revoke-token/{key_id}", name="revoke_token")
async def revoke_token(request: web.Request) -> web.Response:
    """Stop accepting a minted key, for good (admin only), and close the WebSockets it
    opened (code 1008); answers ``{}``."""
    key_id = request.match_info["key_id"]
    _agent(request).revoke_key(key_id)
    opened = request.app.get(KEY_SOCKETS_KEY, {}).pop(key_id, ())
    await asyncio.gather(*(
        socket.shutdown(WSCloseCode.POLICY_VIOLATION, b"the key was revoked")
        for socket in list(opened)
    ))
    return web.json_response({})
