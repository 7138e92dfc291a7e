"""Validation of create requests: every bad field is named, with why."""

from __future__ import annotations

from typing import Any

import pytest

from smartmob_agent.errors import InvalidRequest
from smartmob_agent.schemas import (
    CREATE_REQUEST,
    MAX_ENV_ENTRIES,
    MAX_ENV_VALUE,
    MAX_NAME,
    MAX_URL,
    create_request,
)

VALID: dict[str, Any] = {
    "app": "shop",
    "node": "web.0",
    "process_type": "web",
    "source_url": "http://127.0.0.1:8000/shop.tar.gz",
}


def problems_of(body: Any) -> InvalidRequest:
    """Validate ``body`` and return the InvalidRequest it must raise."""
    with pytest.raises(InvalidRequest) as caught:
        create_request.validate(body)
    return caught.value


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({}, id="minimal"),
        pytest.param({"env": {}}, id="empty-env"),
        pytest.param({"env": {"A": "1", "_B2": "", "PATH": "/bin"}}, id="env"),
        pytest.param({"env": {"MULTI": "line\none", "U": "é€😀"}}, id="env-any-text"),
        pytest.param({"env": {"V": "x" * MAX_ENV_VALUE}}, id="longest-env-value"),
        pytest.param({"env": {f"V{i}": "x" for i in range(MAX_ENV_ENTRIES)}}, id="most-env"),
        pytest.param({"env": {"N" * 256: "x"}}, id="longest-env-name"),
        pytest.param({"app": "a" * MAX_NAME}, id="longest-app"),
        pytest.param({"app": "My_App-2.0"}, id="app-with-dot-dash"),
        pytest.param({"app": "_x"}, id="app-starting-with-underscore"),
        pytest.param({"node": "worker.12"}, id="other-node"),
        pytest.param({"process_type": "w" * 64}, id="longest-process-type"),
        pytest.param({"process_type": "clock-2_b"}, id="process-type-dash"),
        pytest.param({"source_url": "https://example.invalid/a.zip?token=x#frag"},
                     id="https-query-fragment"),
        pytest.param({"source_url": "HTTP://127.0.0.1/a.zip"}, id="uppercase-scheme"),
        pytest.param({"source_url": "http://u:p@127.0.0.1/a.zip"}, id="credentials"),
        pytest.param({"source_url": "http://127.0.0.1/" + "a" * (MAX_URL - 17)}, id="longest-url"),
    ],
)
def test_valid_bodies_pass(changes: dict[str, Any]) -> None:
    """A valid create request is returned as it is."""
    body = {**VALID, **changes}
    assert create_request.validate(body) is body


BAD_FIELDS = [
    # (field, bad value, fragment of the reason)
    ("app", 1, "got a number"),
    ("app", None, "got null"),
    ("app", True, "got a boolean"),
    ("app", ["shop"], "got an array"),
    ("app", {"x": 1}, "got an object"),
    ("app", "", "1 to 100"),
    ("app", "a" * (MAX_NAME + 1), "1 to 100"),
    ("app", "a" * 100_000, "..."),
    ("app", ".", "not starting with '.'"),
    ("app", "..", "without '..'"),
    ("app", "a..b", "'a..b'"),
    ("app", ".hidden", "'.hidden'"),
    ("app", "-rf", "'-rf'"),
    ("app", "a/b", "'a/b'"),
    ("app", "a\\b", "letters"),
    ("app", "a b", "'a b'"),
    ("app", "shop\n", "'shop\\n'"),
    ("app", "sh\x00op", "letters"),
    ("app", "café", "letters"),
    ("node", 0, "got a number"),
    ("node", "", "web.0"),
    ("node", "../../etc", "'../../etc'"),
    ("node", "web..0", "without '..'"),
    ("node", "web/0", "letters"),
    ("node", "n" * (MAX_NAME + 1), "1 to 100"),
    ("process_type", 5, "got a number"),
    ("process_type", "", "1 to 64"),
    ("process_type", "w" * 65, "1 to 64"),
    ("process_type", "web.1", "Procfile entry"),
    ("process_type", "web 1", "Procfile entry"),
    ("process_type", "web\n", "Procfile entry"),
    ("process_type", "../web", "Procfile entry"),
    ("source_url", 42, "got a number"),
    ("source_url", "", "http://"),
    ("source_url", "ftp://127.0.0.1/a.zip", "'ftp://127.0.0.1/a.zip'"),
    ("source_url", "file:///etc/passwd", "http://"),
    ("source_url", "/relative/a.zip", "http://"),
    ("source_url", "http://", "http://"),
    ("source_url", "http:///a.zip", "http://"),
    ("source_url", "http://127.0.0.1/a b.zip", "without spaces"),
    ("source_url", "http://127.0.0.1/a.zip\n", "without spaces"),
    ("source_url", " http://127.0.0.1/a.zip", "http://"),
    ("source_url", "http://127.0.0.1/" + "a" * MAX_URL, f"at most {MAX_URL}"),
    ("env", "A=1", "got the string 'A=1'"),
    ("env", ["A=1"], "got an array"),
    ("env", None, "got null"),
    ("env", {"A": 1}, "got a number for 'A'"),
    ("env", {"A": None}, "got null for 'A'"),
    ("env", {"A": True}, "got a boolean for 'A'"),
    ("env", {"A": ["x"]}, "got an array for 'A'"),
    ("env", {"A": {"B": "c"}}, "got an object for 'A'"),
    ("env", {"A": "x\x00y"}, "without NUL"),
    ("env", {"A": "x" * (MAX_ENV_VALUE + 1)}, f"up to {MAX_ENV_VALUE}"),
    ("env", {"1A": "x"}, "got the name '1A'"),
    ("env", {"": "x"}, "got the name ''"),
    ("env", {"A-B": "x"}, "got the name 'A-B'"),
    ("env", {"A B": "x"}, "got the name 'A B'"),
    ("env", {"A=B": "x"}, "got the name 'A=B'"),
    ("env", {"A\n": "x"}, "got the name 'A\\n'"),
    ("env", {"OK": "1", "É": "x"}, "got the name 'É'"),
    ("env", {"N" * 257: "x"}, "got the name 'NNN"),
    ("env", {f"V{i}": "x" for i in range(MAX_ENV_ENTRIES + 1)},
     f"got an object with {MAX_ENV_ENTRIES + 1} entries"),
]


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    BAD_FIELDS,
    ids=[f"{field}-{index}" for index, (field, _, _) in enumerate(BAD_FIELDS)],
)
def test_each_bad_field_is_named(field: str, value: Any, reason: str) -> None:
    """A bad value makes InvalidRequest name exactly that field, with the rule and what came."""
    error = problems_of({**VALID, field: value})
    assert set(error.fields) == {field}
    assert field in str(error)
    assert error.fields[field].startswith("must be")
    assert reason in error.fields[field]


def test_long_values_are_shortened_in_messages() -> None:
    """A huge bad value is not echoed in full in the error."""
    error = problems_of({**VALID, "app": "x" * 100_000})
    assert len(error.fields["app"]) < 500


@pytest.mark.parametrize("field", CREATE_REQUEST["required"])
def test_each_missing_field_is_named(field: str) -> None:
    """Leaving out a required field names it as required."""
    body = {name: value for name, value in VALID.items() if name != field}
    error = problems_of(body)
    assert error.fields == {field: "is required"}
    assert field in str(error)


@pytest.mark.parametrize("field", ["name", "App", "pid", "", "env "])
def test_unknown_fields_are_named(field: str) -> None:
    """A field the schema does not know is refused by name."""
    error = problems_of({**VALID, field: "x"})
    assert error.fields == {field: "is not a known field"}


def test_every_problem_is_reported_at_once() -> None:
    """Missing, unknown and invalid fields are all named in one error, sorted in the message."""
    error = problems_of({"app": "..", "node": 3, "extra": 1, "env": {"1": "x"}})
    assert set(error.fields) == {"app", "node", "extra", "env", "process_type", "source_url"}
    assert error.fields["extra"] == "is not a known field"
    assert error.fields["process_type"] == "is required"
    assert str(error) == (
        "invalid fields in the request: app, env, extra, node, process_type, source_url"
    )


def test_empty_object_names_every_required_field() -> None:
    """An empty object names each required field and nothing else."""
    error = problems_of({})
    assert error.fields == {name: "is required" for name in CREATE_REQUEST["required"]}


@pytest.mark.parametrize(
    ("body", "described"),
    [
        pytest.param([], "an array", id="array"),
        pytest.param([VALID], "an array", id="array-of-valid"),
        pytest.param("shop", "the string 'shop'", id="string"),
        pytest.param(3, "a number", id="number"),
        pytest.param(1.5, "a number", id="float"),
        pytest.param(None, "null", id="null"),
        pytest.param(True, "a boolean", id="boolean"),
    ],
)
def test_non_object_bodies_are_refused(body: Any, described: str) -> None:
    """A body that is not a JSON object is refused, saying what it is instead."""
    error = problems_of(body)
    assert str(error) == f"the request body must be a JSON object, not {described}"
    assert error.fields == {}


def test_descriptions_exist_for_every_field() -> None:
    """Each property has a description, since it doubles as the error sentence."""
    for name, sub in CREATE_REQUEST["properties"].items():
        assert sub["description"].startswith("must be"), name
