"""The JSON documents of the API, built from model values (pure)."""

from __future__ import annotations

import dataclasses
import json
import signal
from types import MappingProxyType
from typing import Any

from smartmob_agent.model import (
    Backoff,
    Exit,
    ExitRecord,
    Options,
    ProcessInfo,
    ProcessState,
    RestartPolicy,
    Spec,
)
from smartmob_agent.representations import (
    INDEX_RELATIONS,
    PROCESS_RELATIONS,
    format_time,
    index_document,
    listing_document,
    process_document,
)

#: 2026-12-01T18:00:00Z
NOON = 1796148000.0


class FakeLinks:
    """Links as relation names, so documents can be compared as plain data."""

    def index(self, relation: str) -> str:
        return f"index:{relation}"

    def process(self, relation: str, slug: str) -> str:
        return f"{relation}:{slug}"


    def key(self, relation: str, key_id: str) -> str:
        return f"{relation}:key:{key_id}"


def info(**changes: Any) -> ProcessInfo:
    spec = Spec("shop", "web.0", "web", "http://127.0.0.1/app.tgz",
                MappingProxyType({"SECRET": "hunter2"}))
    snapshot = ProcessInfo(spec=spec, state=ProcessState.RUNNING, pid=42, error=None,
                           restarts=0, last_exit=None)
    return dataclasses.replace(snapshot, **changes)


def test_format_time_is_iso_utc_with_milliseconds() -> None:
    """Timestamps are ISO 8601 in UTC, to the millisecond, ending in Z."""
    assert format_time(NOON + 0.1234) == "2026-12-01T18:00:00.123Z"
    assert format_time(0) == "1970-01-01T00:00:00.000Z"


def test_index_links_every_collection_action() -> None:
    """The index has one link per index relation, nothing else."""
    assert index_document(FakeLinks()) == {r: f"index:{r}" for r in INDEX_RELATIONS}
    assert {"list", "create", "events", "bulk_restart"} <= set(INDEX_RELATIONS)


def test_status_document_of_a_crash_looping_process() -> None:
    """Exits, backoff and output tail show as JSON values a person can read."""
    killed = ExitRecord(Exit(-signal.SIGKILL), NOON, 0.0004, None)
    crashed = ExitRecord(Exit(3), NOON + 1, 0.25, None)
    document = process_document(info(
        state=ProcessState.BACKOFF, pid=None, restarts=2, last_exit=crashed,
        exits=(killed, crashed), backoff_delay=0.4, next_start_at=NOON + 1.4,
        output_tail=("starting", "boom"), port=5000,
    ), FakeLinks())
    assert document["state"] == "backoff"
    assert document["last_exit"] == {
        "code": 3, "signal": None, "at": "2026-12-01T18:00:01.000Z", "ran_for": 0.25,
        "reason": None,
    }
    assert document["exits"][0]["signal"] == "SIGKILL"
    assert document["exits"][0]["ran_for"] == 0.0
    assert document["backoff_delay"] == 0.4
    assert document["next_start_at"] == "2026-12-01T18:00:01.400Z"
    assert document["output_tail"] == ["starting", "boom"]
    assert document["port"] == 5000
    json.dumps(document)  # every value is JSON


def test_options_are_echoed_nested_with_defaults() -> None:
    """Options sit under "options" (``restart`` is also a link) with defaults filled in."""
    document = process_document(info(stop_timeout=10.0), FakeLinks())
    assert document["restart"] == "restart:shop.web.0"
    assert document["options"] == {
        "restart": "always", "exit_codes": [0], "max_restarts": None, "start_seconds": 1.0,
        "backoff": {"initial": 0.1, "max": 30.0}, "stop_signal": "TERM",
        "stop_timeout": 10.0, "working_dir": None, "umask": None, "autostart": True,
        "health": None, "notify": [], "rlimits": None, "socket": None,
    }


def test_options_given_are_echoed_as_a_request_spells_them() -> None:
    """A umask shows as an octal string, exit codes sorted, backoff with 'max'."""
    options = Options(
        restart=RestartPolicy.ON_FAILURE, exit_codes=frozenset({2, 0}), umask=0o77,
        backoff=Backoff(0.5, 5.0), stop_signal="INT", notify=("http://127.0.0.1/hook",),
    )
    spec = Spec("shop", "web.0", "web", "http://127.0.0.1/app.tgz", options=options)
    document = process_document(info(spec=spec, stop_timeout=3.0), FakeLinks())["options"]
    assert document["restart"] == "on-failure"
    assert document["exit_codes"] == [0, 2]
    assert document["umask"] == "0077"
    assert document["backoff"] == {"initial": 0.5, "max": 5.0}
    assert document["stop_signal"] == "INT"
    assert document["stop_timeout"] == 3.0
    assert document["notify"] == ["http://127.0.0.1/hook"]


def test_status_document_links_every_control_and_hides_env() -> None:
    """Each process relation is a link; the request's env (secrets) is never shown."""
    document = process_document(info(), FakeLinks())
    for relation in PROCESS_RELATIONS:
        assert document[relation] == f"{relation}:shop.web.0"
    assert {"start", "stop", "restart", "signal"} <= set(PROCESS_RELATIONS)
    assert "hunter2" not in json.dumps(document)


def test_listing_keeps_the_order_given() -> None:
    """The listing is the status documents in the order of the infos."""
    first = info()
    second = info(spec=Spec("shop", "web.1", "web", "http://127.0.0.1/app.tgz"))
    listing = listing_document([second, first], FakeLinks())
    assert [p["slug"] for p in listing["processes"]] == ["shop.web.1", "shop.web.0"]
