"""JSON Schemas of request bodies, and validation that names every bad field.

The schemas are plain JSON Schema (the subset shared by draft-07 and 2020-12), so the
same documents can later be published in an OpenAPI 3.1 description. ``fastjsonschema``
compiles each into Python code once, at import; it is small and fast, but stops at the
first error, so each field is checked with its own compiled validator to report them all.
Each property's ``description`` doubles as the error sentence shown to users.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import fastjsonschema

from smartmob_agent.errors import InvalidRequest

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

CREATE_REQUEST: dict[str, Any] = {
    "title": "Create request",
    "type": "object",
    "required": ["app", "node", "process_type", "source_url"],
    "additionalProperties": False,
    "properties": {
        "app": {**_NAME, "description": _NAME_RULE},
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
            "pattern": r"^[hH][tT][tT][pP][sS]?://[^/?#\s][^\s]*$",
            "description": (
                f"must be an http:// or https:// URL of a zip or tar archive, at most "
                f"{MAX_URL} characters, without spaces"
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
        return _json_type(value)


def _json_type(value: Any) -> str:
    """Name a JSON value's type for error messages, showing short strings themselves."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return f"the string {value[:40]!r}" + ("..." if len(value) > 40 else "")
    if isinstance(value, list):
        return "an array"
    return "an object"


create_request = RequestSchema(CREATE_REQUEST)
