"""REST handlers: HTTP in, calls on the :class:`~smartmob_agent.agent.Agent`, JSON out.

No business logic lives here: handlers parse and validate the request, call the agent,
and return a representation. Errors are raised as :mod:`smartmob_agent.errors` classes
and turned into JSON responses by the middleware in :mod:`smartmob_agent.server`.
"""

from __future__ import annotations

import json
from types import MappingProxyType
from typing import Any

from aiohttp import web

from smartmob_agent import representations as docs
from smartmob_agent.agent import Agent
from smartmob_agent.errors import InvalidRequest
from smartmob_agent.links import RequestLinks
from smartmob_agent.model import Spec
from smartmob_agent.schemas import create_request

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
        return json.loads(body)
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
    data = create_request.validate(await read_json(request))
    spec = Spec(
        app=data["app"],
        node=data["node"],
        process_type=data["process_type"],
        source_url=data["source_url"],
        env=MappingProxyType(dict(data.get("env", {}))),
    )
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
