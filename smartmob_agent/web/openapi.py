"""The OpenAPI 3.1 description of the agent's API, built from what the code uses: pure.

Request bodies are the very schema dicts :mod:`smartmob_agent.schemas` compiles to
validate requests (not copies), and the paths come from the router of the running
application (:func:`openapi_document` takes them as ``(route name, method, path)``), so the
description cannot drift from what the agent serves. Each route name has one entry of
:data:`OPERATIONS`; a route without one is an error, and ``tests/test_openapi.py`` checks
both ways. The response schemas below are the one description of the documents
:mod:`smartmob_agent.representations` builds.

The WebSockets (``attach``, ``events``) are described as the ``GET`` of their handshake:
``101`` when it upgrades, a JSON error otherwise (a plain ``GET`` without the upgrade is
``400``). The frames that follow are outside what OpenAPI describes (see the docs).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from smartmob_agent import __version__
from smartmob_agent.model import SIGNAL_NAMES, FailureReason, ProcessState, RestartPolicy
from smartmob_agent.queries import MAX_SEQ, MAX_TAIL
from smartmob_agent.representations import INDEX_RELATIONS, PROCESS_RELATIONS
from smartmob_agent.schemas import (
    BULK_REQUEST,
    CREATE_REQUEST,
    NAME_PATTERN,
    SIGNAL_REQUEST,
    UPDATE_REQUEST,
)

OPENAPI_VERSION = "3.1.0"

_REF = "#/components/schemas/"
_NULLABLE_STRING: dict[str, Any] = {"type": ["string", "null"]}
_NULLABLE_NUMBER: dict[str, Any] = {"type": ["number", "null"]}
_NULLABLE_INTEGER: dict[str, Any] = {"type": ["integer", "null"]}
_TIME: dict[str, Any] = {"type": "string", "description": "ISO 8601 UTC, ending in Z"}
_URL: dict[str, Any] = {"type": "string", "description": "an absolute URL"}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": _REF + name}


def _object(properties: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """An object with these properties, all required; extensions may add more."""
    return {"type": "object", "required": list(properties), "properties": dict(properties),
            **extra}


_EXIT = _object({
    "code": {"type": "integer", "description": "exit status, or minus the signal number"},
    "signal": {**_NULLABLE_STRING, "description": "the signal that killed the child"},
    "at": _TIME,
    "ran_for": {"type": "number"},
    "reason": {**_NULLABLE_STRING, "description": "why the agent ended it, if it did"},
})

_OPTIONS = _object({
    "restart": {"type": "string", "enum": [policy.value for policy in RestartPolicy]},
    "exit_codes": {"type": "array", "items": {"type": "integer"}},
    "max_restarts": _NULLABLE_INTEGER,
    "start_seconds": {"type": "number"},
    "backoff": _object({"initial": {"type": "number"}, "max": {"type": "number"}}),
    "stop_signal": {"type": "string", "enum": list(SIGNAL_NAMES)},
    "stop_timeout": _NULLABLE_NUMBER,
    "working_dir": _NULLABLE_STRING,
    "umask": _NULLABLE_STRING,
    "autostart": {"type": "boolean"},
    "health": {"type": ["object", "null"]},
    "notify": {"type": "array", "items": {"type": "string"}},
})
_OPTIONS["properties"]["rlimits"] = {"type": ["object", "null"]}
_OPTIONS["properties"]["socket"] = {"type": ["object", "null"]}

#: Response documents, by component name (see :mod:`smartmob_agent.representations`).
RESPONSE_SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {"type": "string", "description": "one sentence a person understands"},
            "fields": {
                "type": "object",
                "additionalProperties": {"type": "string"},
                "description": "what is wrong with each bad field (a 400 of a body or query)",
            },
        },
    },
    "Index": _object(
        {relation: _URL for relation in INDEX_RELATIONS},
        additionalProperties=_URL,
        description="links to every collection-level action; later versions add more",
    ),
    "Exit": _EXIT,
    "Options": _OPTIONS,
    "Source": {
        **_object({"url": {"type": "string"},
                   "checksum": {"type": ["string", "null"], "pattern": "^sha256:[0-9a-f]{64}$"},
                   "since": _TIME}),
        "properties": {"url": {"type": "string"},
                       "checksum": {"type": ["string", "null"]}, "since": _TIME,
                       "step": {"type": "string",
                                "description": "a pending source: the update's step"}},
    },
    "Status": _object(
        {
            "app": {"type": "string"},
            "node": {"type": "string"},
            "process_type": {"type": "string"},
            "slug": {"type": "string"},
            "checksum": {"type": ["string", "null"], "pattern": "^sha256:[0-9a-f]{64}$"},
            "state": {"type": "string", "enum": [state.value for state in ProcessState]},
            "pid": _NULLABLE_INTEGER,
            "error": _NULLABLE_STRING,
            "reason": {
                "type": ["string", "null"],
                "enum": [*(reason.value for reason in FailureReason), None],
                "description": "while failed: why, as a name a client can switch on",
            },
            "port": _NULLABLE_INTEGER,
            "started_at": _NULLABLE_STRING,
            "uptime": _NULLABLE_NUMBER,
            "restarts": {"type": "integer", "minimum": 0},
            "last_exit": {"oneOf": [{"type": "null"}, _ref("Exit")]},
            "exits": {"type": "array", "items": _ref("Exit")},
            "cpu_percent": _NULLABLE_NUMBER,
            "memory_rss": _NULLABLE_INTEGER,
            "healthy": {"type": ["boolean", "null"]},
            "backoff_delay": _NULLABLE_NUMBER,
            "next_start_at": _NULLABLE_STRING,
            "output_tail": {"type": "array", "items": {"type": "string"}},
            "download": {"oneOf": [
                {"type": "null"},
                _object({"bytes": {"type": "integer"}, "total": _NULLABLE_INTEGER}),
            ]},
            "options": _ref("Options"),
            "source": {"oneOf": [{"type": "null"}, _ref("Source")],
                       "description": "the current source"},
            "pending_source": {"oneOf": [{"type": "null"}, _ref("Source")],
                               "description": "while an update runs: its source"},
            "previous_source": {"oneOf": [{"type": "null"}, _ref("Source")],
                                "description": "the version a rollback brings back"},
            "update_error": {**_NULLABLE_STRING,
                             "description": "why the last update failed (null after a success)"},
            "update_reason": {**_NULLABLE_STRING,
                              "description": "the same as a name a client can switch on"},
            "socket": {"oneOf": [{"type": "null"}, _object({
                "address": {"type": "string"}, "host": {"type": "string"},
                "port": {"type": "integer"}, "backlog": {"type": "integer"},
                "fd": {"const": 3}, "inherited_by": _NULLABLE_INTEGER,
            })], "description": "the listening socket each child gets as fd 3"},
            **{relation: _URL for relation in PROCESS_RELATIONS},
        },
        description="the process status document; extensions add fields and links",
    ),
    "Created": {
        "allOf": [_ref("Status")],
        "properties": {"token": _object(
            {"id": {"type": "string"}, "app": {"type": "string"}, "key": {"type": "string"}},
            description="with issue_token: the minted key, shown this once",
        )},
    },
    "Listing": _object({"processes": {"type": "array", "items": _ref("Status")}}),
    "LogLines": {"type": "array", "items": _object({
        "seq": {"type": "integer", "minimum": 0},
        "at": _TIME,
        "stream": {"type": "string"},
        "line": {"type": "string"},
        "pid": _NULLABLE_INTEGER,
        "restarts": _NULLABLE_INTEGER,
    })},
    "Upload": _object({
        "source_url": _URL,
        "checksum": {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$"},
        "size": {"type": "integer", "minimum": 0},
    }),
    "BulkOutcomes": _object({"processes": {"type": "array", "items": {
        **_object({"slug": {"type": "string"}, "ok": {"type": "boolean"}}),
        "properties": {"slug": {"type": "string"}, "ok": {"type": "boolean"},
                       "error": {"type": "string"}},
    }}}),
    "Tokens": _object({"tokens": {"type": "array", "items": _object({
        "id": {"type": "string"}, "app": {"type": "string"}, "created_at": _TIME,
        "revoke": _URL,
    })}}),
    "Empty": {"type": "object", "maxProperties": 0},
    "Health": _object({"status": {"const": "ok"}}),
    "OpenAPI": {"type": "object", "required": ["openapi", "info", "paths"]},
}

#: Request bodies, by component name: the dicts the agent validates requests with.
REQUEST_SCHEMAS: dict[str, dict[str, Any]] = {
    "CreateRequest": CREATE_REQUEST,
    "SignalRequest": SIGNAL_REQUEST,
    "UpdateRequest": UPDATE_REQUEST,
    "BulkRequest": BULK_REQUEST,
}

_JSON = "application/json"
_ERRORS = {
    400: "invalid request: bad JSON, fields or query (each bad field named under fields)",
    401: "no key, or a key the agent does not know (only when access control is on)",
    403: "the key is scoped to one app, and the request reaches beyond it",
    404: "no such process, upload or key (or one of an app the key cannot see)",
    409: "the request clashes with the process's state",
    413: "the request body is over the agent's limit",
    429: "too many wrong keys from this address: wait Retry-After seconds",
    507: "the state folder cannot take the upload (disk full)",
}
#: Statuses every keyed route may answer: unusable Host header, missing key, throttled.
_COMMON = (400, 401, 429)


def _json(schema: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": _ref(schema)}}}


def _error(status: int) -> dict[str, Any]:
    return _json("Error", _ERRORS[status])


_SERVER_ERROR = _json(
    "Error", "a bug of the agent (500), or the machine out of ports or disk (503)"
)
_LOG_QUERY = [
    {"name": "tail", "in": "query", "required": False,
     "description": "how many of the last lines (default 100)",
     "schema": {"type": "integer", "minimum": 0, "maximum": MAX_TAIL}},
    {"name": "since", "in": "query", "required": False,
     "description": "only lines from this time on: ISO 8601 with a time zone, or seconds "
                    "since the epoch",
     "schema": {"type": "string"}},
]
_LOG_RESPONSE = {
    "description": "the lines, oldest first: JSON, or text (at stream line) when Accept "
                   "prefers text/plain",
    "content": {_JSON: {"schema": _ref("LogLines")},
                "text/plain": {"schema": {"type": "string"}}},
}
_UPGRADE = {"description": "the WebSocket handshake succeeded: frames follow (see the docs)"}
_WS_TOKEN = {"name": "token", "in": "query", "required": False,
             "description": "the key, for clients that cannot set headers (browsers)",
             "schema": {"type": "string"}}
_NO_BODY = {"required": False, "content": {_JSON: {"schema": _ref("Empty")}}}


def _op(
    summary: str,
    ok: tuple[int, dict[str, Any]],
    errors: Iterable[int] = (),
    body: dict[str, Any] | None = None,
    parameters: Iterable[dict[str, Any]] = (),
    **extra: Any,
) -> dict[str, Any]:
    """One operation: its success answer, the errors it may answer, its body."""
    status, answer = ok
    responses: dict[str, Any] = {str(status): answer}
    for code in sorted({*_COMMON, *errors}):
        responses[str(code)] = _error(code)
    responses["5XX"] = _SERVER_ERROR
    operation: dict[str, Any] = {"summary": summary, "responses": responses, **extra}
    if parameters:
        operation["parameters"] = list(parameters)
    if body is not None:
        operation["requestBody"] = body
    return operation


def _body(schema: str) -> dict[str, Any]:
    return {"required": True, "content": {_JSON: {"schema": _ref(schema)}}}


#: One operation per route name (``parameters`` of the path are added from its template).
OPERATIONS: dict[str, dict[str, Any]] = {
    "index": _op("The index: links to every collection-level action",
                 (200, _json("Index", "the index"))),
    "openapi": _op("This OpenAPI document", (200, _json("OpenAPI", "the document"))),
    "list": _op("Every process, in creation order", (200, _json("Listing", "the listing"))),
    "create": _op(
        "Create a process", (201, {
            **_json("Created", "created; the status document of the new process"),
            "headers": {"Location": {"description": "the process's details URL",
                                     "schema": {"type": "string"}}},
        }),
        (403, 409, 413), _body("CreateRequest"),
    ),
    "upload": _op(
        "Keep a source archive (the raw body) for create requests",
        (201, _json("Upload", "kept: the source_url and checksum a create request gives")),
        (413, 507),
        {"required": True, "content": {"application/octet-stream": {"schema": {}}}},
    ),
    "source": _op("An uploaded archive, as it was sent", (200, {
        "description": "the archive",
        "content": {"application/octet-stream": {"schema": {}}},
    }), (404,)),
    "details": _op("The status document of a process", (200, _json("Status", "its status")),
                   (404,)),
    "logs": _op("The last output lines of a process", (200, _LOG_RESPONSE), (404,),
                parameters=_LOG_QUERY),
    "agent_log": _op("The last lines of the agent's own log (admin key)",
                     (200, _LOG_RESPONSE), (403,), parameters=_LOG_QUERY),
    "attach": _op(
        "WebSocket: follow a process's output and write to its stdin", (101, _UPGRADE),
        (404,), parameters=[
            {"name": "tail", "in": "query", "required": False,
             "description": "replay this many lines before following",
             "schema": {"type": "integer", "minimum": 0, "maximum": MAX_TAIL}},
            {"name": "after", "in": "query", "required": False,
             "description": "replay the lines numbered above this seq",
             "schema": {"type": "integer", "minimum": 0, "maximum": MAX_SEQ}},
            {"name": "format", "in": "query", "required": False,
             "description": "text (bare lines, the default) or json frames",
             "schema": {"type": "string", "enum": ["text", "json"]}},
            {"name": "live", "in": "query", "required": False,
             "description": "1: drop what a slow client lags by, instead of sending it "
                            "from the log (0, the default)",
             "schema": {"type": "string", "enum": ["0", "1"]}},
            _WS_TOKEN,
        ],
        security=[{"bearer": []}, {"queryToken": []}],
    ),
    "events": _op(
        "WebSocket: follow the events of every process", (101, _UPGRADE), (403,),
        parameters=[
            {"name": "app", "in": "query", "required": False,
             "description": "only the events of this app",
             "schema": {"type": "string", "maxLength": 100, "pattern": NAME_PATTERN}},
            {"name": "slug", "in": "query", "required": False,
             "description": "only the events of this process",
             "schema": {"type": "string", "maxLength": 201,
                        "pattern": r"^[A-Za-z0-9_.-]+$"}},
            _WS_TOKEN,
        ],
        security=[{"bearer": []}, {"queryToken": []}],
    ),
    "delete": _op("Stop a process, wait until it is gone, forget it",
                  (200, _json("Empty", "deleted")), (404, 409, 413), _NO_BODY),
    "start": _op("Start a process, or end its backoff now",
                 (200, _json("Status", "its status")), (404, 409, 413), _NO_BODY),
    "stop": _op("Stop a process and keep it",
                (200, _json("Status", "its status")), (404, 409, 413), _NO_BODY),
    "restart": _op("Stop a process and start it again",
                   (200, _json("Status", "its status")), (404, 409, 413), _NO_BODY),
    "signal": _op("Send a signal to a running process's group",
                  (200, _json("Status", "its status")), (404, 409, 413),
                  _body("SignalRequest")),
    "update": _op("Update a process in place to a new source (in the background)",
                  (202, _json("Status", "the update began; its status")),
                  (403, 404, 409, 413), _body("UpdateRequest")),
    "rollback": _op("Update a process back to its previous version (in the background)",
                    (202, _json("Status", "the rollback began; its status")),
                    (404, 409, 413), _NO_BODY),
    **{
        f"bulk_{action}": _op(
            f"{action.capitalize()} every process of an app, or every one",
            (200, _json("BulkOutcomes", "one outcome per process")), (403, 413),
            _body("BulkRequest"),
        )
        for action in ("start", "stop", "restart", "delete")
    },
    "tokens": _op("The minted app keys (admin key)", (200, _json("Tokens", "the keys")),
                  (403,)),
    "revoke_token": _op("Revoke a minted key for good (admin key)",
                        (200, _json("Empty", "revoked")), (403, 404)),
    "health": {
        "summary": "Whether the agent answers (open: no key needed)",
        "security": [],
        "responses": {"200": _json("Health", "the agent serves"), "5XX": _SERVER_ERROR},
    },
}

#: The pattern of each path parameter (by its name in the route's template).
PATH_PARAMETERS: dict[str, dict[str, Any]] = {
    "slug": {"type": "string", "minLength": 1, "maxLength": 201,
             "description": "the process's slug, <app>.<node>"},
    "sha256": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$",
               "description": "the SHA-256 of the uploaded archive"},
    "key_id": {"type": "string", "pattern": "^[0-9a-f]{16}$",
               "description": "the id of a minted key (16 hexadecimal digits)"},
}


def openapi_document(
    server: str, routes: Iterable[tuple[str, str, str]], version: str = __version__
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the routes ``(name, method, path template)`` served
    at ``server`` (an absolute URL without the trailing ``/``).

    >>> from smartmob_agent.web.openapi import openapi_document
    >>> document = openapi_document("http://127.0.0.1:8080", [("health", "GET", "/healthz")])
    >>> document["openapi"], document["servers"], list(document["paths"])
    ('3.1.0', [{'url': 'http://127.0.0.1:8080'}], ['/healthz'])

    Raises:
        KeyError: a route has no entry in :data:`OPERATIONS` (describe it there).
    """
    paths: dict[str, dict[str, Any]] = {}
    for name, method, path in routes:
        if name not in OPERATIONS:
            raise KeyError(f"route {name!r} ({method} {path}) has no OpenAPI operation")
        operation = {"operationId": name, **OPERATIONS[name]}
        names = [part[1:-1] for part in path.split("/") if part.startswith("{")]
        if names:
            given = operation.get("parameters", [])
            operation["parameters"] = [
                {"name": n, "in": "path", "required": True, "schema": PATH_PARAMETERS[n]}
                for n in names
            ] + given
        paths.setdefault(path, {})[method.lower()] = operation
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "smartmob-agent",
            "version": version,
            "description": (
                "Runs Procfile apps on one machine. Start at / and follow the links; "
                "every GET also answers HEAD."
            ),
        },
        "servers": [{"url": server}],
        "security": [{"bearer": []}],
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": {**REQUEST_SCHEMAS, **RESPONSE_SCHEMAS},
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "an admin or app key (when the agent has keys)"},
                "queryToken": {"type": "apiKey", "in": "query", "name": "token",
                               "description": "the key, on WebSocket handshakes only"},
            },
        },
    }
