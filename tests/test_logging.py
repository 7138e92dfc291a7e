"""The agent's log records, in process: endpoints, named events, request ids, formats.

The real command, with each format and endpoint, is tests/test_logging_cli.py.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from smartmob_agent.config import check_settings, settings_from
from smartmob_agent.errors import InvalidRequest
from smartmob_agent.output import logrecords
from smartmob_agent.output.endpoint import Endpoint, parse_endpoint
from smartmob_agent.output.sinks import PrivateFileHandler, open_handlers

KEY = "k3y-" + "0123456789abcdef" * 2


@pytest.mark.parametrize(("url", "expected"), [
    ("file:///dev/stdout", Endpoint("file", path="/dev/stdout")),
    ("file:///dev/stderr", Endpoint("file", path="/dev/stderr")),
    ("file://./relative.log", Endpoint("file", path="./relative.log")),
    ("file:///var/log/agent.log", Endpoint("file", path="/var/log/agent.log")),
    ("fluent://localhost:24225/smartmob", Endpoint("fluent", host="localhost", port=24225,
                                                   tag="smartmob")),
    ("fluent://fluentd/app", Endpoint("fluent", host="fluentd", port=24224, tag="app")),
    ("fluent://[::1]:9/a", Endpoint("fluent", host="::1", port=9, tag="a")),
])
def test_endpoints_are_parsed(url: str, expected: Endpoint) -> None:
    assert parse_endpoint(url) == expected


@pytest.mark.parametrize(("url", "message"), [
    ("syslog://localhost", 'Invalid logging endpoint "syslog://localhost".'),
    ("/var/log/agent.log", 'Invalid logging endpoint "/var/log/agent.log".'),
    ("file://", 'Invalid logging endpoint "file://".'),
    ("fluent:localhost", 'Invalid logging endpoint "fluent:localhost".'),
    ("fluent://localhost:forward/tag", 'Invalid URL: "fluent://localhost:forward/tag".'),
    ("fluent://localhost:99999/tag", 'Invalid URL: "fluent://localhost:99999/tag".'),
    ("fluent://localhost:24224/tag?x=1", 'Invalid URL: "fluent://localhost:24224/tag?x=1".'),
    ("fluent://localhost/tag#x", 'Invalid URL: "fluent://localhost/tag#x".'),
    ("fluent:///tag", 'Invalid URL: "fluent:///tag".'),
])
def test_bad_endpoints_are_refused_with_the_original_messages(url: str, message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("?", r"\?") + "$"):
        parse_endpoint(url)
    settings = settings_from({"logging_endpoint": url}, {})
    with pytest.raises(InvalidRequest) as caught:
        check_settings(settings)
    assert str(caught.value) == message


def test_the_options_read_their_variables() -> None:
    settings = settings_from({}, {
        "SMARTMOB_LOG_FORMAT": "JSON", "SMARTMOB_UTC": "yes",
        "SMARTMOB_LOGGING_ENDPOINT": "fluent://fluentd:24224/agent",
    })
    assert (settings.log_format, settings.utc, settings.logging_endpoint) == (
        "json", True, "fluent://fluentd:24224/agent")
    with pytest.raises(InvalidRequest, match="--log-format: 'xml' is not valid"):
        settings_from({"log_format": "xml"}, {})


# -- records ------------------------------------------------------------------------------


@pytest.fixture
def logger() -> Iterator[tuple[logging.Logger, io.StringIO, list[logging.Handler]]]:
    """A logger of its own whose records go to a string, through the handler(s) a test
    adds to the list."""
    stream = io.StringIO()
    log = logging.getLogger("tests.logging.records")
    log.setLevel(logging.DEBUG)
    log.propagate = False
    handlers: list[logging.Handler] = []
    yield log, stream, handlers
    for handler in handlers:
        log.removeHandler(handler)


def _attach(
    fixture: tuple[logging.Logger, io.StringIO, list[logging.Handler]], log_format: str,
    utc: bool = True,
) -> None:
    log, stream, handlers = fixture
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logrecords.formatter(log_format, utc=utc))
    handler.addFilter(logrecords.RedactKeys())
    log.addHandler(handler)
    handlers.append(handler)


def test_json_records_have_sorted_keys_a_timestamp_and_an_event(
    logger: tuple[logging.Logger, io.StringIO, list[logging.Handler]],
) -> None:
    """A named event has its fields; a sentence is ``event: log`` with its message;
    keys are sorted; ``@timestamp`` is ISO 8601 in UTC (``+00:00``) with ``--utc``."""
    log, stream, _ = logger
    _attach(logger, "json")
    logrecords.event(log, "process.create", "shop.web.0: created", slug="shop.web.0")
    log.warning("cannot do %s", "that")
    named, sentence = (json.loads(line) for line in stream.getvalue().splitlines())
    assert named == {
        "@timestamp": named["@timestamp"], "event": "process.create", "level": "info",
        "logger": "tests.logging.records", "message": "shop.web.0: created",
        "slug": "shop.web.0",
    }
    assert sentence["event"] == "log"
    assert sentence["message"] == "cannot do that"
    assert sentence["level"] == "warning"
    for record in (named, sentence):
        assert list(record) == sorted(record)
        assert record["@timestamp"].endswith("+00:00")
        assert "T" in record["@timestamp"]


def test_kv_records_start_with_the_time_and_the_event_as_the_original(
    logger: tuple[logging.Logger, io.StringIO, list[logging.Handler]],
) -> None:
    log, stream, _ = logger
    _attach(logger, "kv")
    logrecords.event(log, "http.access", method="GET", path="/", outcome=200, duration=0.5)
    line = stream.getvalue().strip()
    keys = [pair.split("=", 1)[0] for pair in line.split(" ")]
    assert keys[:2] == ["@timestamp", "event"]
    assert keys[2:] == sorted(keys[2:])
    assert "event='http.access'" in line
    assert "outcome=200" in line
    assert "path='/'" in line


def test_no_format_shows_a_key_from_a_query_or_a_traceback(
    logger: tuple[logging.Logger, io.StringIO, list[logging.Handler]],
) -> None:
    log, stream, _ = logger
    for log_format in ("text", "kv", "json"):
        _attach(logger, log_format)
    logrecords.event(log, "http.access", path=f"/events?app=a&token={KEY}")
    try:
        raise ValueError(f"cannot fetch https://x.example/a.tgz?X-Amz-Signature={KEY}")
    except ValueError:
        log.exception("failed: %s", f"https://x.example/?api_key={KEY}")
    text = stream.getvalue()
    assert KEY not in text
    assert text.count("token=[hidden]") == 3
    assert text.count("api_key=[hidden]") == 3
    assert "X-Amz-Signature=[hidden]" in text
    exception = json.loads(text.splitlines()[-1])["exception"]
    assert exception.startswith("Traceback")
    assert "ValueError: cannot fetch" in exception


async def test_records_logged_while_a_request_is_answered_carry_its_id(
    logger: tuple[logging.Logger, io.StringIO, list[logging.Handler]],
) -> None:
    """In the scope, in every format; a task started from it is marked while the
    request lasts, not after."""
    log, stream, _ = logger
    _attach(logger, "text")
    _attach(logger, "json")
    release = asyncio.Event()

    async def background() -> None:
        log.info("while")
        await release.wait()
        log.info("after")

    with logrecords.request_scope("My very own request ID!"):
        log.info("inside")
        task = asyncio.get_running_loop().create_task(background())
        await asyncio.sleep(0)
    release.set()
    await task
    log.info("outside")
    lines = stream.getvalue().splitlines()
    text = [line for line in lines if not line.startswith("{")]
    structured = [json.loads(line) for line in lines if line.startswith("{")]
    by_message = {record["message"]: record.get("request") for record in structured}
    assert by_message == {"inside": "My very own request ID!",
                          "while": "My very own request ID!", "after": None, "outside": None}
    assert [line.endswith("[request My very own request ID!]") for line in text] == [
        True, True, False, False]


def test_local_time_has_its_offset_and_utc_is_plus_zero() -> None:
    assert logrecords.timestamp(0.5, utc=True) == "1970-01-01T00:00:00.500000+00:00"
    local = logrecords.timestamp(0.5, utc=False)
    assert local[-6] in "+-"
    assert local[-3] == ":"


def test_a_file_endpoint_appends_and_is_private(tmp_path: Path) -> None:
    path = tmp_path / "agent.log"
    path.write_text("an earlier line\n")
    (handler,) = open_handlers("json", Endpoint("file", path=str(tmp_path / "new.log")))
    try:
        assert isinstance(handler, PrivateFileHandler)
        assert (tmp_path / "new.log").stat().st_mode & 0o777 == 0o600
    finally:
        handler.close()
    (handler,) = open_handlers("text", Endpoint("file", path=str(path)))
    log = logging.getLogger("tests.logging.file")
    log.addHandler(handler)
    try:
        log.warning("a new line")
    finally:
        log.removeHandler(handler)
        handler.close()
    lines = path.read_text().splitlines()
    assert lines[0] == "an earlier line"
    assert lines[1].endswith("WARNING tests.logging.file: a new line")
    with pytest.raises(FileNotFoundError):
        open_handlers("json", Endpoint("file", path=str(tmp_path / "no" / "such.log")))


def test_state_records_of_a_crash_loop_are_limited_per_process_and_change() -> None:
    """``process.state`` records: a failure has its reason and error; a process that
    changes state many times logs each change a few times per window, and says how many
    it held back when it is forgotten; another process is not held back by it."""
    stream = io.StringIO()
    states = logging.getLogger(logrecords.STATES_LOGGER)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logrecords.formatter("json", utc=True))
    states.addHandler(handler)
    states.setLevel(logging.INFO)
    try:
        log_states = logrecords.StateRecords()
        log_states.changed("a.web.0", "downloading", "failed", "download failure", "no route")
        for _ in range(25):
            log_states.changed("a.web.0", "running", "exited")
        log_states.changed("b.web.0", "running", "exited")
        log_states.forget("a.web.0")
    finally:
        states.removeHandler(handler)
        states.setLevel(logging.NOTSET)
    found = [json.loads(line) for line in stream.getvalue().splitlines()]
    failed = found[0]
    assert (failed["event"], failed["slug"], failed["from"], failed["to"]) == (
        "process.state", "a.web.0", "downloading", "failed")
    assert (failed["reason"], failed["error"]) == ("download failure", "no route")
    assert failed["message"] == "a.web.0: downloading -> failed (download failure: no route)"
    exited = [r for r in found if r["event"] == "process.state" and r["to"] == "exited"]
    assert [r["slug"] for r in exited].count("a.web.0") == 10
    assert [r["slug"] for r in exited].count("b.web.0") == 1
    assert exited[-1]["reason"] is None
    assert found[-1]["event"] == "log"
    assert found[-1]["message"].startswith("a.web.0: 15 similar record(s) held back")
