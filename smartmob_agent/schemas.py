"""JSON Schemas of request bodies, and validation that names every bad field.

The schemas are plain JSON Schema (the subset shared by draft-07 and 2020-12), so the
same documents can later be published in an OpenAPI 3.1 description. ``fastjsonschema``
compiles each into Python code once, at import; it is small and fast, but stops at the
first error, so each field is checked with its own compiled validator to report them all.
Each property's ``description`` doubles as the error sentence shown to users.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import fastjsonschema

from smartmob_agent.errors import InvalidRequest
from smartmob_agent.model import (
    HEALTH_DEFAULTS,
    MIN_RESTART_DELAY,
    RLIMIT_NAMES,
    SIGNAL_NAMES,
    Backoff,
    Options,
    RestartPolicy,
    SocketSpec,
    Spec,
)

#: app and node: a path component that cannot be ``.``/``..`` or hide a separator.
NAME_PATTERN = r"^(?!.*\.\.)[A-Za-z0-9_][A-Za-z0-9_.-]*$"
MAX_NAME = 100
MAX_URL = 4096
MAX_ENV_ENTRIES = 1000
MAX_ENV_VALUE = 65536

#: app and node share one rule; each adds its own wording to the description.
_NAME: dict[str, Any] = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_NAME,
    "pattern": NAME_PATTERN,
}
_NAME_RULE = (
    f"must be a string of 1 to {MAX_NAME} letters, digits, '_', '.' or '-', "
    "not starting with '.' or '-' and without '..'"
)
#: app: no '.' at all, since the slug is ``<app>.<node>``: with dots in both, app
#: ``shop`` node ``a.b`` and app ``shop.a`` node ``b`` would be one slug, and one app's
#: key could take (and learn of) the other's names.
APP_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_-]*$"
_APP: dict[str, Any] = {**_NAME, "pattern": APP_PATTERN}
_APP_RULE = (
    f"must be a string of 1 to {MAX_NAME} letters, digits, '_' or '-', not starting "
    "with '-' (no '.': it separates the app from the node in a slug)"
)

MAX_SECONDS = 86400
MAX_NOTIFY = 10
#: The largest value of a resource limit (the kernel's limits are 64-bit).
MAX_RLIMIT = 2**63 - 1

_SECONDS_RULE = f"a number of seconds from 0 to {MAX_SECONDS}"
_URL_PATTERN = r"^[hH][tT][tT][pP][sS]?://[^/?#\s][^\s]*$"
#: A source may also be a file:///path, which the agent reads only when configured to
#: (see smartmob_agent.sources.fetchpolicy: the policy decides, the schema only the form).
_SOURCE_URL_PATTERN = (
    r"^(?:[hH][tT][tT][pP][sS]?://[^/?#\s]|[fF][iI][lL][eE]://(?:[lL][oO][cC][aA][lL]"
    r"[hH][oO][sS][tT])?/)[^\s]*$"
)
_SIGNAL: dict[str, Any] = {"type": "string", "enum": list(SIGNAL_NAMES)}
_SIGNAL_RULE = "must be one of " + ", ".join(SIGNAL_NAMES) + " (a signal name without SIG)"

#: The optional supervision fields of a create request (see :class:`Options`).
OPTION_PROPERTIES: dict[str, Any] = {
    "restart": {
        "type": "string",
        "enum": [policy.value for policy in RestartPolicy],
        "description": "must be one of 'always', 'on-failure' or 'never'",
    },
    "exit_codes": {
        "type": "array",
        "maxItems": 256,
        "items": {"type": "integer", "minimum": 0, "maximum": 255},
        "description": "must be an array of exit codes, integers from 0 to 255",
    },
    "max_restarts": {
        "type": ["integer", "null"],
        "minimum": 0,
        "maximum": 1_000_000,
        "description": "must be null (never give up) or an integer from 0 to 1000000",
    },
    "start_seconds": {
        "type": "number",
        "minimum": 0,
        "maximum": MAX_SECONDS,
        "description": f"must be {_SECONDS_RULE}",
    },
    "backoff": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "initial": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_SECONDS},
            "max": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_SECONDS},
        },
        "description": (
            "must be an object with 'initial' and/or 'max', numbers of seconds above 0 "
            f"and at most {MAX_SECONDS}, initial not above max"
        ),
    },
    "stop_signal": {**_SIGNAL, "description": _SIGNAL_RULE},
    "stop_timeout": {
        "type": "number",
        "minimum": 0,
        "maximum": MAX_SECONDS,
        "description": f"must be {_SECONDS_RULE}",
    },
    "working_dir": {
        "type": "string",
        "minLength": 1,
        "maxLength": 1024,
        "pattern": r"^(?!/)(?!(.*/)?\.\.(/|$))[^\x00\\]*$",
        "description": (
            "must be a relative path inside the source, without '..', a leading '/', "
            "backslashes or NUL (at most 1024 characters)"
        ),
    },
    "umask": {
        "type": "string",
        "pattern": r"^0?[0-7]{1,3}$",
        "description": "must be an octal string such as '022' or '0077'",
    },
    "autostart": {"type": "boolean", "description": "must be true or false"},
    "health": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "http": {"type": "string", "pattern": r"^/[^\s]*$", "maxLength": 1024},
            "command": {"type": "string", "minLength": 1, "maxLength": 4096,
                        "pattern": r"^[^\x00]*$"},
            "interval": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_SECONDS},
            "timeout": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_SECONDS},
            "failures": {"type": "integer", "minimum": 1, "maximum": 1000},
        },
        "oneOf": [{"required": ["http"]}, {"required": ["command"]}],
        "description": (
            "must be an object with exactly one of 'http' (a path starting with '/', "
            "probed on the process's PORT) and 'command' (a shell command), and "
            "optionally 'interval' and 'timeout' (seconds above 0) and 'failures' (an "
            "integer from 1 to 1000)"
        ),
    },
    "notify": {
        "type": "array",
        "maxItems": MAX_NOTIFY,
        "items": {"type": "string", "maxLength": MAX_URL, "pattern": _URL_PATTERN},
        "description": f"must be an array of at most {MAX_NOTIFY} http:// or https:// URLs",
    },
    "socket": {
        "oneOf": [
            {"const": True},
            {
                "type": "object",
                "additionalProperties": False,
                "required": ["port"],
                "properties": {
                    "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                    "host": {"type": "string", "maxLength": 45,
                             "pattern": r"^([0-9.]+|[0-9A-Fa-f:.]+)$"},
                    "backlog": {"type": "integer", "minimum": 1, "maximum": 65535},
                },
            },
        ],
        "description": (
            "must be true (a port the agent picks) or an object with 'port' (1 to 65535) "
            "and optionally 'host' (an IP address, 127.0.0.1 by default) and 'backlog' "
            "(1 to 65535): the socket the agent listens on and passes to each child as "
            "fd 3"
        ),
    },
    "rlimits": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            name: {"anyOf": [
                {"type": "integer", "minimum": 0, "maximum": MAX_RLIMIT},
                {"const": "unlimited"},
            ]}
            for name in RLIMIT_NAMES
        },
        "description": (
            "must be an object whose entries, each optional, are "
            + ", ".join(f"'{name}'" for name in RLIMIT_NAMES)
            + ", each a whole number from 0 or the string 'unlimited'"
        ),
    },
}

CREATE_REQUEST: dict[str, Any] = {
    "title": "Create request",
    "type": "object",
    "required": ["app", "node", "process_type", "source_url"],
    "additionalProperties": False,
    "properties": {
        "app": {**_APP, "description": _APP_RULE},
        "node": {
            **_NAME,
            "description": f"{_NAME_RULE} (by convention '<process_type>.<n>', like 'web.0')",
        },
        "process_type": {
            "type": "string",
            "pattern": r"^[A-Za-z0-9_-]{1,64}$",
            "description": (
                "must be the name of a Procfile entry: 1 to 64 letters, digits, '_' or '-'"
            ),
        },
        "source_url": {
            "type": "string",
            "maxLength": MAX_URL,
            "pattern": _SOURCE_URL_PATTERN,
            "description": (
                f"must be an http:// or https:// URL of a zip or tar archive (or file:///"
                f"path, on an agent that reads local files), at most {MAX_URL} characters, "
                "without spaces"
            ),
        },
        "env": {
            "type": "object",
            "maxProperties": MAX_ENV_ENTRIES,
            "propertyNames": {"pattern": r"^[A-Za-z_][A-Za-z0-9_]{0,255}$"},
            "additionalProperties": {
                "type": "string",
                "maxLength": MAX_ENV_VALUE,
                "pattern": r"^[^\x00]*$",
            },
            "description": (
                "must be an object mapping variable names (letters, digits and '_', not "
                f"starting with a digit) to strings without NUL characters (at most "
                f"{MAX_ENV_ENTRIES} entries, values up to {MAX_ENV_VALUE} characters)"
            ),
        },
        "checksum": {
            "type": "string",
            "pattern": r"^sha256:[0-9a-fA-F]{64}$",
            "description": (
                "must be 'sha256:' followed by the 64 hexadecimal digits of the archive's "
                "SHA-256"
            ),
        },
        "issue_token": {
            "type": "boolean",
            "description": (
                "must be true or false: true mints a key scoped to this app, shown once "
                "in the response under 'token'"
            ),
        },
        **OPTION_PROPERTIES,
    },
}

#: The body of an update (see :mod:`~smartmob_agent.supervision.update`): a new source,
#: and optionally a new ``env`` and new ``options``, each replacing the current one whole.
UPDATE_REQUEST: dict[str, Any] = {
    "title": "Update request",
    "type": "object",
    "required": ["source_url"],
    "additionalProperties": False,
    "properties": {
        name: CREATE_REQUEST["properties"][name] for name in ("source_url", "checksum", "env")
    } | {
        "options": {
            "type": "object",
            "description": (
                "must be an object of the supervision options a create request takes "
                "(restart, health, stop_signal, ...), which replace the current ones"
            ),
        },
    },
}

#: The ``options`` of an update request, checked field by field.
OPTIONS_REQUEST: dict[str, Any] = {
    "title": "Options",
    "type": "object",
    "additionalProperties": False,
    "properties": OPTION_PROPERTIES,
}

SIGNAL_REQUEST: dict[str, Any] = {
    "title": "Signal request",
    "type": "object",
    "required": ["signal"],
    "additionalProperties": False,
    "properties": {"signal": {**_SIGNAL, "description": _SIGNAL_RULE}},
}

BULK_REQUEST: dict[str, Any] = {
    "title": "Bulk request",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "app": {**_APP, "description": f"{_APP_RULE}: the app whose processes to act on"},
        "all": {"const": True, "description": "must be true: act on every process"},
    },
}

Validator = Callable[[Any], Any]


def _compile(schema: Mapping[str, Any]) -> Validator:
    return fastjsonschema.compile(dict(schema))


class RequestSchema:
    """A compiled object schema that reports every bad field at once."""

    def __init__(self, schema: Mapping[str, Any]) -> None:
        self.schema = schema
        self._whole = _compile(schema)
        self._fields = {name: _compile(sub) for name, sub in schema["properties"].items()}
        self._names = {
            name: _compile(sub["propertyNames"])
            for name, sub in schema["properties"].items()
            if "propertyNames" in sub
        }

    def validate(self, data: Any) -> dict[str, Any]:
        """Return ``data`` if it matches the schema.

        Raises:
            InvalidRequest: naming each missing, unknown or invalid field.
        """
        if not isinstance(data, dict):
            raise InvalidRequest(
                f"the request body must be a JSON object, not {_json_type(data)}"
            )
        try:
            self._whole(data)
        except fastjsonschema.JsonSchemaException:
            pass
        else:
            return data
        problems: dict[str, str] = {}
        for name in self.schema.get("required", ()):
            if name not in data:
                problems[name] = "is required"
        properties = self.schema["properties"]
        for name, value in data.items():
            if name not in properties:
                problems[name] = "is not a known field"
                continue
            try:
                self._fields[name](value)
            except fastjsonschema.JsonSchemaValueException as error:
                got = self._what_was_wrong(name, value, error)
                problems[name] = f"{properties[name]['description']} (got {got})"
        names = ", ".join(sorted(problems))
        raise InvalidRequest(f"invalid fields in the request: {names}", problems)


    def _what_was_wrong(
        self, name: str, value: Any, error: fastjsonschema.JsonSchemaValueException
    ) -> str:
        """Describe the part of a field's value that failed, for the error message."""
        if error.rule == "propertyNames" and isinstance(value, dict):
            valid_name = self._names[name]
            for key in value:
                try:
                    valid_name(key)
                except fastjsonschema.JsonSchemaValueException:
                    return f"the name {_json_type(key).removeprefix('the string ')}"
        if error.rule == "maxProperties" and isinstance(value, dict):
            return f"an object with {len(value)} entries"
        path = list(error.path or ())[1:]
        if path and isinstance(value, dict):
            return f"{_json_type(error.value)} for {'.'.join(map(str, path))!r}"
        if path and isinstance(value, list) and str(path[0]).isdigit():
            index = int(path[0])
            if index < len(value):
                return f"{_json_type(value[index])} at position {index}"
        return _json_type(value)


def _json_type(value: Any) -> str:
    """Name a JSON value's type for error messages, showing short strings themselves."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        text = repr(value)
        return f"the number {text}" if len(text) <= 20 else "a number"
    if isinstance(value, str):
        return f"the string {value[:40]!r}" + ("..." if len(value) > 40 else "")
    if isinstance(value, list):
        return "an array"
    return "an object"


def parse_options(data: Mapping[str, Any]) -> Options:
    """Build the :class:`Options` of a create request already checked by its schema.

    A ``backoff`` under :data:`~smartmob_agent.model.MIN_RESTART_DELAY` is raised to it
    (clamped, not refused: a client, or a process an earlier agent kept, that asked for
    less keeps working; the status document shows the delays in force).

    Raises:
        InvalidRequest: for what a schema cannot say (a backoff whose initial delay is
            above its maximum).
    """
    defaults = Options()
    backoff = data.get("backoff", {})
    given_max = backoff.get("max")
    # a default never conflicts with what the request gave
    default_initial = defaults.backoff.initial
    if given_max is not None:
        default_initial = min(default_initial, given_max)
    initial = float(backoff.get("initial", default_initial))
    maximum = float(given_max if given_max is not None
                    else max(defaults.backoff.maximum, initial))
    if initial > maximum:
        problem = {"backoff": (
            f"must have initial not above max (got initial {initial:g} s, "
            f"max {maximum:g} s)"
        )}
        raise InvalidRequest("invalid fields in the request: backoff", problem)
    initial, maximum = max(initial, MIN_RESTART_DELAY), max(maximum, MIN_RESTART_DELAY)
    max_restarts = data.get("max_restarts")
    umask = data.get("umask")
    stop_timeout = data.get("stop_timeout")
    return Options(
        restart=RestartPolicy(data.get("restart", defaults.restart)),
        # JSON's 2.0 passes as an integer: keep ints, so 2.0 never shows as "2.0"
        exit_codes=frozenset(int(code) for code in data.get("exit_codes", defaults.exit_codes)),
        max_restarts=None if max_restarts is None else int(max_restarts),
        start_seconds=float(data.get("start_seconds", defaults.start_seconds)),
        backoff=Backoff(initial=initial, maximum=maximum),
        stop_signal=data.get("stop_signal", defaults.stop_signal),
        stop_timeout=None if stop_timeout is None else float(stop_timeout),
        working_dir=data.get("working_dir"),
        umask=None if umask is None else int(umask, 8),
        autostart=data.get("autostart", defaults.autostart),
        health=None if "health" not in data else {**HEALTH_DEFAULTS, **data["health"]},
        notify=tuple(data.get("notify", ())),
        rlimits=_rlimits(data.get("rlimits", {})),
        socket=_socket(data.get("socket")),
    )


def _socket(given: Any) -> SocketSpec | None:
    """The ``socket`` option of a request: ``true`` for a port the agent picks."""
    if given is None:
        return None
    if given is True:
        return SocketSpec()
    return SocketSpec(int(given["port"]), str(given.get("host", "127.0.0.1")),
                      int(given.get("backlog", SocketSpec.backlog)))


def _rlimits(given: Mapping[str, Any]) -> tuple[tuple[str, int | None], ...]:
    """The ``rlimits`` of a request as ``(name, value)`` pairs, ``None`` for unlimited."""
    return tuple(
        (name, None if given[name] == "unlimited" else int(given[name]))
        for name in RLIMIT_NAMES if name in given
    )


def check_rlimits(options: Options, hard: Mapping[str, int | None]) -> None:
    """Refuse resource limits above the agent's own hard limits (``None``: unlimited),
    which nothing it starts could be given.

    >>> from smartmob_agent.model import Options
    >>> from smartmob_agent.schemas import check_rlimits
    >>> check_rlimits(Options(rlimits=(("nofile", 64),)), {"nofile": 1024})
    >>> check_rlimits(Options(rlimits=(("nofile", None),)), {"nofile": 1024})
    Traceback (most recent call last):
      ...
    smartmob_agent.errors.InvalidRequest: invalid fields in the request: rlimits.nofile

    Raises:
        InvalidRequest: naming each limit as ``rlimits.<name>``, with the agent's limit.
    """
    problems: dict[str, str] = {}
    for name, value in options.rlimits:
        limit = hard.get(name)
        if limit is None or (value is not None and value <= limit):
            continue
        got = "'unlimited'" if value is None else str(value)
        problems[f"rlimits.{name}"] = (
            f"must be at most {limit}, the agent's own hard limit (got {got})"
        )
    if problems:
        names = ", ".join(sorted(problems))
        raise InvalidRequest(f"invalid fields in the request: {names}", problems)


def spec_from_request(data: Mapping[str, Any]) -> Spec:
    """Build the :class:`Spec` of a create request already checked by its schema.

    Raises:
        InvalidRequest: see :func:`parse_options`.
    """
    return Spec(
        app=data["app"],
        node=data["node"],
        process_type=data["process_type"],
        source_url=data["source_url"],
        env=MappingProxyType(dict(data.get("env", {}))),
        options=parse_options(data),
        sha256=data["checksum"].partition(":")[2].lower() if "checksum" in data else None,
    )


def updated_request(current: Mapping[str, Any], data: Any) -> dict[str, Any]:
    """The create request of the version an update request ``data`` asks for, from the
    ``current`` one (as :func:`~smartmob_agent.representations.request_document` spells
    it): the new ``source_url`` and ``checksum``; ``env`` and ``options`` replaced whole
    when given, else kept.

    Raises:
        InvalidRequest: naming each bad field (an option as ``options.<name>``).
    """
    data = update_request.validate(data)
    options = data.get("options")
    if options is not None:
        try:
            options_request.validate(options)
        except InvalidRequest as error:
            fields = {f"options.{name}": text for name, text in error.fields.items()}
            raise InvalidRequest(
                "invalid fields in the request: " + ", ".join(sorted(fields)), fields
            ) from None
    else:
        options = {k: v for k, v in current.items() if k in OPTION_PROPERTIES}
    request = {k: current[k] for k in ("app", "node", "process_type")}
    request.update({k: data[k] for k in ("source_url", "checksum") if k in data})
    request["env"] = data.get("env", current.get("env", {}))
    request.update(options)
    return create_request.validate(request)


def parse_bulk(data: Mapping[str, Any]) -> str | None:
    """Return the app a bulk request names, or ``None`` for ``{"all": true}``.

    Raises:
        InvalidRequest: unless exactly one of ``app`` and ``all`` is given.
    """
    if ("app" in data) == ("all" in data):
        raise InvalidRequest(
            'a bulk request names exactly one of "app" (one app\'s processes) and '
            '"all": true (every process)'
        )
    return data.get("app")


create_request = RequestSchema(CREATE_REQUEST)
signal_request = RequestSchema(SIGNAL_REQUEST)
update_request = RequestSchema(UPDATE_REQUEST)
options_request = RequestSchema(OPTIONS_REQUEST)
bulk_request = RequestSchema(BULK_REQUEST)
