"""REST handlers: HTTP in, calls on the :class:`~smartmob_agent.agent.Agent`, JSON out.

No business logic lives here: handlers parse and validate the request, call the agent,
and return a representation. Errors are raised as :mod:`smartmob_agent.errors` classes
and turned into JSON responses by the middleware in :mod:`smartmob_agent.server`.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from smartmob_agent import representations as docs
from smartmob_agent.agent import Agent
from smartmob_agent.errors import InvalidRequest
from smartmob_agent.links import RequestLinks
from smartmob_agent.schemas import (
    bulk_request,
    create_request,
    parse_bulk,
    parse_log_query,
    signal_request,
    spec_from_request,
)
from smartmob_agent.watcher import Watcher

routes = web.RouteTableDef()

AGENT_KEY = web.AppKey("agent", Agent)
REQUEST_ID_KEY = web.RequestKey("request_id", str)


def _agent(request: web.Request) -> Agent:
    return request.app[AGENT_KEY]


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
        return json.loads(body, parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise InvalidRequest("the request body is not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise InvalidRequest(
            f"the request body is not valid JSON: {error.msg} at line {error.lineno} "
            f"column {error.colno}"
        ) from None
    except RecursionError:
        raise InvalidRequest("the request body is nested too deeply") from None
    except ValueError as error:  # e.g. an integer of thousands of digits
        raise InvalidRequest(f"the request body is not usable JSON: {error}") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


@routes.get("/", name="index")
async def index(request: web.Request) -> web.Response:
    """The entry point: links to every collection-level action."""
    return web.json_response(docs.index_document(RequestLinks(request)))


@routes.get("/list-processes", name="list")
async def list_processes(request: web.Request) -> web.Response:
    """Every process's status document, in creation order."""
    links = RequestLinks(request)
    return web.json_response(docs.listing_document(_agent(request).list(), links))


@routes.post("/create-process", name="create")
async def create_process(request: web.Request) -> web.Response:
    """Create a process from a create request; 201 with its status document."""
    spec = spec_from_request(create_request.validate(await read_json(request)))
    watcher = _agent(request).create(spec, request_id=request.get(REQUEST_ID_KEY))
    links = RequestLinks(request)
    document = docs.process_document(watcher.info(), links)
    return web.json_response(
        document, status=201, headers={"Location": links.process("details", spec.slug)}
    )


@routes.get("/process-status/{slug}", name="details")
async def process_status(request: web.Request) -> web.Response:
    """The status document of one process."""
    watcher = _agent(request).get(request.match_info["slug"])
    return web.json_response(docs.process_document(watcher.info(), RequestLinks(request)))


@routes.get("/process-logs/{slug}", name="logs")
async def process_logs(request: web.Request) -> web.Response:
    """The last output lines of a process (``?tail=N``, ``?since=TIME``): JSON, or plain
    text when the ``Accept`` header prefers ``text/plain``."""
    watcher = _agent(request).get(request.match_info["slug"])
    tail, since = parse_log_query(request.query)
    entries = await watcher.output_log.read(tail, since)
    if prefers_text(request.headers.get("Accept", "")):
        return web.Response(text=docs.log_text(entries), content_type="text/plain")
    return web.json_response(docs.log_document(entries))


def prefers_text(accept: str) -> bool:
    """Whether an ``Accept`` header prefers ``text/plain`` to JSON (ties go to JSON).

    >>> from smartmob_agent.api import prefers_text
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
    agent.get(slug)  # 404 before reading the body
    body = await read_json(request, allow_empty=True)
    if not isinstance(body, dict):
        raise InvalidRequest("the delete request must be a JSON object (usually {})")
    await agent.delete(slug)
    return web.json_response({})


async def _control_target(request: web.Request) -> Watcher:
    """The watcher a control names (404 first), once its body is known to be an object."""
    watcher = _agent(request).get(request.match_info["slug"])
    body = await read_json(request, allow_empty=True)
    if not isinstance(body, dict) or body:
        raise InvalidRequest("this control takes no fields: send {} or nothing")
    return watcher


def _status(request: web.Request, watcher: Watcher) -> web.Response:
    return web.json_response(docs.process_document(watcher.info(), RequestLinks(request)))


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
    watcher = _agent(request).get(request.match_info["slug"])
    data = signal_request.validate(await read_json(request))
    await watcher.request_signal(data["signal"])
    return _status(request, watcher)


async def _bulk(request: web.Request, action: str) -> web.Response:
    app = parse_bulk(bulk_request.validate(await read_json(request)))
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
