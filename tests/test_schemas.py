"""Validation of create requests: every bad field is named, with why."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from smartmob_agent.errors import InvalidRequest
from smartmob_agent.model import (
    MIN_RESTART_DELAY,
    SIGNAL_NAMES,
    Backoff,
    Options,
    RestartPolicy,
    SocketSpec,
)
from smartmob_agent.schemas import (
    CREATE_REQUEST,
    MAX_ENV_ENTRIES,
    MAX_ENV_VALUE,
    MAX_NAME,
    MAX_URL,
    OPTION_PROPERTIES,
    bulk_request,
    create_request,
    parse_bulk,
    parse_options,
    signal_request,
)
from smartmob_agent.supervision.agent import Agent

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
        pytest.param({"app": "My_App-2"}, id="app-with-dash"),
        pytest.param({"app": "_x"}, id="app-starting-with-underscore"),
        pytest.param({"node": "worker.12"}, id="other-node"),
        pytest.param({"process_type": "w" * 64}, id="longest-process-type"),
        pytest.param({"process_type": "clock-2_b"}, id="process-type-dash"),
        pytest.param({"source_url": "https://example.invalid/a.zip?token=x#frag"},
                     id="https-query-fragment"),
        pytest.param({"source_url": "HTTP://127.0.0.1/a.zip"}, id="uppercase-scheme"),
        pytest.param({"source_url": "http://u:p@127.0.0.1/a.zip"}, id="credentials"),
        # the form only: whether the agent reads it is its fetch policy's call, at create
        pytest.param({"source_url": "file:///srv/apps/a.zip"}, id="file-url"),
        pytest.param({"source_url": "FILE://localhost/srv/a.zip"}, id="file-url-localhost"),
        pytest.param({"source_url": "http://127.0.0.1/" + "a" * (MAX_URL - 17)}, id="longest-url"),
    ],
)
def test_valid_bodies_pass(changes: dict[str, Any]) -> None:
    """A valid create request is returned as it is."""
    body = {**VALID, **changes}
    assert create_request.validate(body) is body


BAD_FIELDS = [
    # (field, bad value, fragment of the reason)
    ("app", 1, "got the number 1"),
    ("app", None, "got null"),
    ("app", True, "got a boolean"),
    ("app", ["shop"], "got an array"),
    ("app", {"x": 1}, "got an object"),
    ("app", "", "1 to 100"),
    ("app", "a" * (MAX_NAME + 1), "1 to 100"),
    ("app", "a" * 100_000, "..."),
    ("app", ".", "no '.'"),
    ("app", "..", "no '.'"),
    ("app", "shop.a", "no '.'"),
    ("app", "a..b", "'a..b'"),
    ("app", ".hidden", "'.hidden'"),
    ("app", "-rf", "'-rf'"),
    ("app", "a/b", "'a/b'"),
    ("app", "a\\b", "letters"),
    ("app", "a b", "'a b'"),
    ("app", "shop\n", "'shop\\n'"),
    ("app", "sh\x00op", "letters"),
    ("app", "café", "letters"),
    ("node", 0, "got the number 0"),
    ("node", "", "web.0"),
    ("node", "../../etc", "'../../etc'"),
    ("node", "web..0", "without '..'"),
    ("node", "web/0", "letters"),
    ("node", "n" * (MAX_NAME + 1), "1 to 100"),
    ("process_type", 5, "got the number 5"),
    ("process_type", "", "1 to 64"),
    ("process_type", "w" * 65, "1 to 64"),
    ("process_type", "web.1", "Procfile entry"),
    ("process_type", "web 1", "Procfile entry"),
    ("process_type", "web\n", "Procfile entry"),
    ("process_type", "../web", "Procfile entry"),
    ("source_url", 42, "got the number 42"),
    ("source_url", "", "http://"),
    ("source_url", "ftp://127.0.0.1/a.zip", "'ftp://127.0.0.1/a.zip'"),
    ("source_url", "file://host/etc/passwd", "file:///"),
    ("source_url", "file:relative/a.zip", "file:///"),
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
    ("env", {"A": 1}, "got the number 1 for 'A'"),
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
        pytest.param(3, "the number 3", id="number"),
        pytest.param(1.5, "the number 1.5", id="float"),
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


# -- options --------------------------------------------------------------------------------

BAD_OPTIONS = [
    # (field, bad value, fragment of the reason)
    ("stop_signal", "SIGTERM", "got the string 'SIGTERM'"),
    ("stop_signal", "term", "without SIG"),
    ("stop_signal", "STOP", "one of TERM, INT"),
    ("stop_signal", 15, "got the number 15"),
    ("stop_timeout", -1, "from 0 to 86400"),
    ("stop_timeout", 86401, "from 0 to 86400"),
    ("stop_timeout", "10", "got the string '10'"),
    ("start_seconds", -0.5, "from 0 to 86400"),
    ("start_seconds", True, "got a boolean"),
    ("working_dir", "../x", "got the string '../x'"),
    ("working_dir", "/etc", "a leading '/'"),
    ("working_dir", "a/../../b", "without '..'"),
    ("working_dir", "a/..", "without '..'"),
    ("working_dir", "..", "without '..'"),
    ("working_dir", "", "relative path"),
    ("working_dir", "a\\b", "backslashes"),
    ("working_dir", "a\x00b", "NUL"),
    ("working_dir", "d" * 1025, "at most 1024"),
    ("umask", "999", "got the string '999'"),
    ("umask", "0o22", "octal string"),
    ("umask", "07777", "octal string"),
    ("umask", "", "octal string"),
    ("umask", 18, "got the number 18"),
    ("rlimits", {"nofile": -1}, "got the number -1 for 'nofile'"),
    ("rlimits", {"nofile": "64"}, "got the string '64' for 'nofile'"),
    ("rlimits", {"nofile": 1.5}, "whole number from 0"),
    ("rlimits", {"as": True}, "got a boolean for 'as'"),
    ("rlimits", {"cpu": 2**63}, "whole number from 0"),
    ("rlimits", {"stack": 1}, "'nofile', 'as', 'nproc', 'core', 'cpu', 'fsize'"),
    ("rlimits", [64], "got an array"),
    ("socket", False, "must be true"),
    ("socket", {"port": 0}, "'port' (1 to 65535)"),
    ("socket", {"port": 8000, "host": "localhost"}, "an IP address"),
    ("socket", {"host": "127.0.0.1"}, "'port'"),
    ("restart", "sometimes", "one of 'always', 'on-failure' or 'never'"),
    ("restart", "Always", "got the string 'Always'"),
    ("restart", None, "got null"),
    ("exit_codes", [256], "integers from 0 to 255"),
    ("exit_codes", [-1], "integers from 0 to 255"),
    ("exit_codes", [True], "integers from 0 to 255"),
    ("exit_codes", ["0"], "integers from 0 to 255"),
    ("exit_codes", 0, "got the number 0"),
    ("exit_codes", [0] * 257, "an array"),
    ("max_restarts", -1, "integer from 0 to 1000000"),
    ("max_restarts", True, "got a boolean"),
    ("max_restarts", 1.5, "got the number 1.5"),
    ("max_restarts", 1_000_001, "integer from 0 to 1000000"),
    ("max_restarts", "3", "got the string '3'"),
    ("backoff", {"initial": 0}, "got the number 0 for 'initial'"),
    ("backoff", {"max": -1}, "got the number -1 for 'max'"),
    ("backoff", {"initial": "1"}, "for 'initial'"),
    ("backoff", {"initial": 1, "factor": 2}, "'initial' and/or 'max'"),
    ("backoff", 1, "got the number 1"),
    ("health", {"http": "/h", "command": "true"}, "exactly one of 'http'"),
    ("health", {}, "exactly one of 'http'"),
    ("health", {"interval": 5}, "exactly one of 'http'"),
    ("health", {"http": "/h", "failures": 0}, "got the number 0 for 'failures'"),
    ("health", {"http": "/h", "failures": True}, "got a boolean for 'failures'"),
    ("health", {"http": "h"}, "got the string 'h' for 'http'"),
    ("health", {"http": "/a b"}, "for 'http'"),
    ("health", {"command": ""}, "for 'command'"),
    ("health", {"command": "true", "interval": 0}, "for 'interval'"),
    ("health", {"command": "true", "timeout": -1}, "for 'timeout'"),
    ("health", {"command": "true", "retries": 3}, "got an object"),
    ("notify", ["ftp://x"], "http:// or https:// URLs"),
    ("notify", "http://x", "got the string 'http://x'"),
    ("notify", ["http://"], "http:// or https:// URLs"),
    ("notify", ["http://x/a b"], "got the string 'http://x/a b' at position 0"),
    ("notify", ["http://x"] * 11, "at most 10"),
    ("autostart", "yes", "got the string 'yes'"),
    ("autostart", 1, "must be true or false"),
    ("autostart", None, "got null"),
]


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    BAD_OPTIONS,
    ids=[f"{field}-{index}" for index, (field, _, _) in enumerate(BAD_OPTIONS)],
)
def test_each_bad_option_is_named(field: str, value: Any, reason: str) -> None:
    """A bad option value makes InvalidRequest (a 400) name exactly that field, with the
    rule and what came."""
    error = problems_of({**VALID, field: value})
    assert error.fields.keys() == {field}
    assert str(error) == f"invalid fields in the request: {field}"
    assert error.fields[field].startswith("must be")
    assert reason in error.fields[field], error.fields[field]


def test_every_option_has_bad_values_tested() -> None:
    """The table of bad values covers each option the schema knows."""
    untested = set(OPTION_PROPERTIES) - {field for field, _, _ in BAD_OPTIONS}
    assert untested == set()


def test_bad_options_are_reported_together() -> None:
    """Several bad options, and bad core fields with them, are all named in one error."""
    error = problems_of({**VALID, "app": "..", "umask": "9", "restart": "x", "autostart": 0})
    assert set(error.fields) == {"app", "umask", "restart", "autostart"}


@pytest.mark.parametrize(
    ("backoff", "message"),
    [
        pytest.param({"initial": 5, "max": 1},
                     "must have initial not above max (got initial 5 s, max 1 s)", id="both"),
        pytest.param({"initial": 0.5, "max": 0.25},
                     "must have initial not above max (got initial 0.5 s, max 0.25 s)",
                     id="fractions"),
    ],
)
def test_backoff_initial_above_max_is_invalid(backoff: dict[str, float], message: str) -> None:
    """What the schema cannot say (initial above max) parse_options refuses, naming backoff."""
    body = create_request.validate({**VALID, "backoff": backoff})
    with pytest.raises(InvalidRequest) as caught:
        parse_options(body)
    assert caught.value.fields == {"backoff": message}
    assert str(caught.value) == "invalid fields in the request: backoff"


GOOD_OPTIONS: list[tuple[dict[str, Any], Options]] = [
    # (request fields, the Options they give)
    ({}, Options()),
    ({"restart": "always"}, Options(restart=RestartPolicy.ALWAYS)),
    ({"restart": "on-failure"}, Options(restart=RestartPolicy.ON_FAILURE)),
    ({"restart": "never"}, Options(restart=RestartPolicy.NEVER)),
    ({"exit_codes": [0, 3, 255, 3]}, Options(exit_codes=frozenset({0, 3, 255}))),
    ({"exit_codes": []}, Options(exit_codes=frozenset())),
    ({"max_restarts": 0}, Options(max_restarts=0)),
    ({"max_restarts": 1_000_000}, Options(max_restarts=1_000_000)),
    ({"max_restarts": None}, Options(max_restarts=None)),
    ({"start_seconds": 0}, Options(start_seconds=0.0)),
    ({"start_seconds": 2.5}, Options(start_seconds=2.5)),
    ({"backoff": {}}, Options()),
    ({"backoff": {"initial": 1, "max": 8}}, Options(backoff=Backoff(1.0, 8.0))),
    ({"backoff": {"initial": 2, "max": 2}}, Options(backoff=Backoff(2.0, 2.0))),
    ({"backoff": {"initial": 0.5}}, Options(backoff=Backoff(0.5, 30.0))),
    ({"backoff": {"initial": 60}}, Options(backoff=Backoff(60.0, 60.0))),
    ({"backoff": {"max": 5}}, Options(backoff=Backoff(0.1, 5.0))),
    ({"stop_signal": "INT"}, Options(stop_signal="INT")),
    ({"stop_signal": "KILL"}, Options(stop_signal="KILL")),
    ({"stop_timeout": 0}, Options(stop_timeout=0.0)),
    ({"stop_timeout": 2.5}, Options(stop_timeout=2.5)),
    ({"working_dir": "sub/dir"}, Options(working_dir="sub/dir")),
    ({"working_dir": "./a/"}, Options(working_dir="./a/")),
    ({"working_dir": "..."}, Options(working_dir="...")),
    ({"working_dir": "a..b/c"}, Options(working_dir="a..b/c")),
    ({"umask": "077"}, Options(umask=0o77)),
    ({"umask": "0022"}, Options(umask=0o22)),
    ({"umask": "0"}, Options(umask=0)),
    ({"umask": "777"}, Options(umask=0o777)),
    ({"autostart": False}, Options(autostart=False)),
    ({"autostart": True}, Options(autostart=True)),
    ({"health": {"http": "/health"}},
     Options(health={"http": "/health", "interval": 10, "timeout": 5, "failures": 3})),
    ({"health": {"command": "true", "interval": 1, "timeout": 0.5, "failures": 1}},
     Options(health={"command": "true", "interval": 1, "timeout": 0.5, "failures": 1})),
    ({"notify": []}, Options(notify=())),
    ({"rlimits": {}}, Options()),
    ({"socket": True}, Options(socket=SocketSpec())),
    ({"socket": {"port": 8000, "host": "::1", "backlog": 5}},
     Options(socket=SocketSpec(8000, "::1", 5))),
    ({"rlimits": {"fsize": 1, "nofile": 64.0, "as": "unlimited"}},
     Options(rlimits=(("nofile", 64), ("as", None), ("fsize", 1)))),
    ({"rlimits": {"nproc": 0, "core": 0, "cpu": 2**63 - 1}},
     Options(rlimits=(("nproc", 0), ("core", 0), ("cpu", 2**63 - 1)))),
    ({"notify": ["http://127.0.0.1/a", "https://h.example/b?x=1"]},
     Options(notify=("http://127.0.0.1/a", "https://h.example/b?x=1"))),
]


@pytest.mark.parametrize(
    ("fields", "expected"),
    GOOD_OPTIONS,
    ids=[",".join(fields) or "none" for fields, _ in GOOD_OPTIONS],
)
def test_good_options_parse(fields: dict[str, Any], expected: Options) -> None:
    """Valid options pass the schema and parse into the Options they mean."""
    body = create_request.validate({**VALID, **fields})
    assert parse_options(body) == expected


def test_every_option_has_good_values_tested() -> None:
    """The table of good values covers each option the schema knows."""
    untested = set(OPTION_PROPERTIES) - {field for fields, _ in GOOD_OPTIONS for field in fields}
    assert untested == set()


def test_all_options_at_once() -> None:
    """Every option given together parses into one Options with each of them."""
    body = create_request.validate({
        **VALID, "restart": "on-failure", "exit_codes": [0, 2], "max_restarts": 3,
        "start_seconds": 5, "backoff": {"initial": 1, "max": 4}, "stop_signal": "QUIT",
        "stop_timeout": 7, "working_dir": "app", "umask": "027", "autostart": False,
        "health": {"command": "ok"}, "notify": ["http://127.0.0.1/hook"],
    })
    assert parse_options(body) == Options(
        restart=RestartPolicy.ON_FAILURE, exit_codes=frozenset({0, 2}), max_restarts=3,
        start_seconds=5.0, backoff=Backoff(1.0, 4.0), stop_signal="QUIT", stop_timeout=7.0,
        working_dir="app", umask=0o27, autostart=False,
        health={"command": "ok", "interval": 10, "timeout": 5, "failures": 3},
        notify=("http://127.0.0.1/hook",),
    )


def test_integral_floats_become_integers() -> None:
    """JSON Schema counts 2.0 as an integer; the parsed options hold ints all the same."""
    options = parse_options(create_request.validate(
        {**VALID, "exit_codes": [0.0, 3.0], "max_restarts": 2.0}))
    assert options.max_restarts == 2
    assert all(type(code) is int for code in options.exit_codes)
    assert type(options.max_restarts) is int


def test_backoff_max_alone_below_the_default_initial() -> None:
    """Giving only a small max works: the default initial yields to it, and both are then
    raised to the floor of 0.1 s."""
    options = parse_options(create_request.validate({**VALID, "backoff": {"max": 0.05}}))
    assert options.backoff == Backoff(MIN_RESTART_DELAY, MIN_RESTART_DELAY) == Backoff(0.1, 0.1)


@pytest.mark.parametrize(("given", "expected"), [
    ({"initial": 0.001, "max": 0.001}, Backoff(0.1, 0.1)),
    ({"initial": 0.001}, Backoff(0.1, 30.0)),
    ({"initial": 0.05, "max": 2}, Backoff(0.1, 2.0)),
    ({"initial": 1e-9, "max": 0.09}, Backoff(0.1, 0.1)),
    ({"initial": 0.1, "max": 0.1}, Backoff(0.1, 0.1)),
    ({"initial": 0.25, "max": 0.5}, Backoff(0.25, 0.5)),
])
def test_a_backoff_under_the_floor_is_raised_to_it(
    given: dict[str, float], expected: Backoff
) -> None:
    """Delays under 0.1 s are clamped to 0.1 s, not refused (old clients keep working);
    delays above the floor are kept as asked."""
    options = parse_options(create_request.validate({**VALID, "backoff": given}))
    assert options.backoff == expected


def test_initial_above_max_is_refused_before_the_floor_is_applied() -> None:
    """The initial-not-above-max rule judges the values as given, even under the floor."""
    with pytest.raises(InvalidRequest) as raised:
        parse_options(create_request.validate(
            {**VALID, "backoff": {"initial": 0.05, "max": 0.01}}))
    assert raised.value.fields == {"backoff": (
        "must have initial not above max (got initial 0.05 s, max 0.01 s)")}


# -- the signal and bulk bodies ---------------------------------------------------------------


@pytest.mark.parametrize("name", SIGNAL_NAMES)
def test_signal_request_accepts_each_name(name: str) -> None:
    """Each signal name a stop_signal may have is a valid signal control body."""
    assert signal_request.validate({"signal": name}) == {"signal": name}


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        pytest.param({}, {"signal": "is required"}, id="missing"),
        pytest.param({"signal": "HUP", "pid": 1}, {"pid": "is not a known field"},
                     id="extra-field"),
        pytest.param({"signal": "SIGHUP"}, {"signal": "got the string 'SIGHUP'"}, id="sig"),
        pytest.param({"signal": "hup"}, {"signal": "without SIG"}, id="lowercase"),
        pytest.param({"signal": "STOP"}, {"signal": "one of TERM"}, id="not-allowed"),
        pytest.param({"signal": 9}, {"signal": "got the number 9"}, id="number"),
        pytest.param({"signal": None}, {"signal": "got null"}, id="null"),
    ],
)
def test_signal_request_names_bad_fields(body: dict[str, Any], fields: dict[str, str]) -> None:
    """A bad signal body is an InvalidRequest naming each bad field, with why."""
    with pytest.raises(InvalidRequest) as caught:
        signal_request.validate(body)
    assert caught.value.fields.keys() == fields.keys()
    for name, fragment in fields.items():
        assert fragment in caught.value.fields[name]


def test_signal_request_must_be_an_object() -> None:
    """A signal body that is not an object is refused as such."""
    with pytest.raises(InvalidRequest, match="must be a JSON object, not the string 'HUP'"):
        signal_request.validate("HUP")


@pytest.mark.parametrize(
    ("body", "app"),
    [
        pytest.param({"app": "shop"}, "shop", id="one-app"),
        pytest.param({"all": True}, None, id="all"),
    ],
)
def test_bulk_request_names_an_app_or_all(body: dict[str, Any], app: str | None) -> None:
    """A bulk body names one app, or every process with all: true."""
    assert parse_bulk(bulk_request.validate(body)) == app


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        pytest.param({"all": False}, {"all": "must be true"}, id="all-false"),
        pytest.param({"all": 1}, {"all": "got the number 1"}, id="all-one"),
        pytest.param({"all": "true"}, {"all": "got the string 'true'"}, id="all-string"),
        pytest.param({"app": ".."}, {"app": "no '.'"}, id="bad-app"),
        pytest.param({"app": "shop.a"}, {"app": "no '.'"}, id="app-with-a-dot"),
        pytest.param({"app": 3}, {"app": "got the number 3"}, id="app-number"),
        pytest.param({"app": "x", "every": True}, {"every": "is not a known field"},
                     id="extra-field"),
    ],
)
def test_bulk_request_names_bad_fields(body: dict[str, Any], fields: dict[str, str]) -> None:
    """A bad bulk body is an InvalidRequest naming each bad field, with why."""
    with pytest.raises(InvalidRequest) as caught:
        bulk_request.validate(body)
    assert caught.value.fields.keys() == fields.keys()
    for name, fragment in fields.items():
        assert fragment in caught.value.fields[name]


@pytest.mark.parametrize(
    "body",
    [pytest.param({}, id="neither"), pytest.param({"app": "x", "all": True}, id="both")],
)
def test_bulk_request_needs_exactly_one_of_app_and_all(body: dict[str, Any]) -> None:
    """Neither or both of app and all: refused with a sentence saying which to send."""
    with pytest.raises(InvalidRequest) as caught:
        parse_bulk(bulk_request.validate(body))
    assert '"app"' in str(caught.value)
    assert '"all": true' in str(caught.value)


# -- the same rules over HTTP -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "fields"),
    [
        pytest.param({"backoff": {"initial": 5, "max": 1}}, {"backoff"}, id="backoff-order"),
        pytest.param({"umask": "999", "restart": "sometimes"}, {"umask", "restart"},
                     id="two-options"),
        pytest.param({"health": {"http": "/", "command": "true"}}, {"health"}, id="health"),
    ],
)
async def test_bad_options_over_http_are_400_with_fields(
    client: TestClient[Any, Any], agent: Agent, raw: dict[str, Any], fields: set[str]
) -> None:
    """The create endpoint answers a bad option with 400 and ``fields``; nothing is created."""
    response = await client.post("/create-process", data=json.dumps({**VALID, **raw}))
    assert response.status == 400
    answer = await response.json()
    assert set(answer["fields"]) == fields
    assert agent.list() == []


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
async def test_non_finite_numbers_are_refused(
    client: TestClient[Any, Any], agent: Agent, constant: str
) -> None:
    """NaN and Infinity, which Python's json reads but JSON has not, are a 400."""
    text = json.dumps(VALID)[:-1] + f', "stop_timeout": {constant}}}'
    response = await client.post("/create-process", data=text)
    assert response.status == 400
    assert f"{constant} is not a JSON number" in (await response.json())["error"]
    assert agent.list() == []


def test_a_bad_array_item_is_pointed_at() -> None:
    """A wrong item of an array is named with its position and value."""
    with pytest.raises(InvalidRequest) as caught:
        create_request.validate({**VALID, "exit_codes": [0, 256]})
    assert "(got the number 256 at position 1)" in caught.value.fields["exit_codes"]


def test_a_huge_number_is_not_quoted_whole() -> None:
    """A number of many digits is described, not echoed."""
    with pytest.raises(InvalidRequest) as caught:
        create_request.validate({**VALID, "stop_timeout": 10**30})
    assert caught.value.fields["stop_timeout"].endswith("(got a number)")
