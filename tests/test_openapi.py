"""The OpenAPI document: valid OpenAPI 3.1, complete, built from the validating schemas,
and true of a live agent (schemathesis fuzzes a real ``smartmob-agent`` with it)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.definitions import OPENAPI_31

from smartmob_agent import schemas
from smartmob_agent.config import Settings
from smartmob_agent.host.shape import HostSample, snapshot_document
from smartmob_agent.keys import MintedKey
from smartmob_agent.model import (
    DownloadProgress,
    Exit,
    ExitRecord,
    LogLine,
    ProcessInfo,
    ProcessState,
    Spec,
)
from smartmob_agent.representations import (
    index_document,
    key_document,
    listing_document,
    log_document,
    process_document,
    upload_document,
)
from smartmob_agent.web.openapi import OPERATIONS, REQUEST_SCHEMAS, openapi_document
from smartmob_agent.web.server import make_app

SERVER = "http://127.0.0.1:8080"
#: The admin key of the fuzzed agent.
KEY = "openapi-test-admin-key-0123456789abcdef"
#: The only host the fuzzed agent may fetch sources from, and the source every valid
#: create request is given: a closed port of 127.0.0.1, so each download fails at once
#: (the process is created, then ``failed``) and nothing is fetched from anywhere else.
SOURCE_HOST = "127.0.0.1"
SOURCE_URL = "http://127.0.0.1:9/app.tgz"
#: A process that exists when each fuzzed operation starts, so the operations on one
#: process reach it (positive cases name it; negative ones make slugs up).
KNOWN = {"app": "fuzz", "node": "web.0", "process_type": "web", "source_url": SOURCE_URL}
KNOWN_SLUG = "fuzz.web.0"


def served_routes(tmp_path: Path) -> list[tuple[str, str, str]]:
    """``(name, method, path)`` of every route of a real application (HEAD aside)."""
    app = make_app(Settings(host="127.0.0.1", port=0, state_dir=tmp_path / "state"))
    return [
        (route.name or "", route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    ]


@pytest.fixture
def document(tmp_path: Path) -> dict[str, Any]:
    return openapi_document(SERVER, served_routes(tmp_path))


def test_the_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    """The document passes the OpenAPI 3.1 meta-schema, and each of its schemas is a valid
    JSON Schema 2020-12 (OpenAPI 3.1's dialect)."""
    text = json.dumps(document)  # plain JSON all the way down
    jsonschema_rs.validate(OPENAPI_31, json.loads(text))
    for name, schema in document["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(schema), name
    assert document["openapi"].startswith("3.1.")
    schemathesis.openapi.from_dict(json.loads(text)).validate()


def test_every_route_of_the_router_is_in_the_document(
    tmp_path: Path, document: dict[str, Any]
) -> None:
    """Each route the agent serves is an operation of the document, and each operation
    described is a route: the document cannot drift from the router."""
    routes = served_routes(tmp_path)
    served = {(method.lower(), path) for _, method, path in routes}
    described = {
        (method, path) for path, item in document["paths"].items() for method in item
    }
    assert served == described
    assert {name for name, _, _ in routes} == set(OPERATIONS)
    for name, method, path in routes:
        operation = document["paths"][path][method.lower()]
        assert operation["operationId"] == name
        for parameter in re.findall(r"{(\w+)}", path):
            assert {"name": parameter, "in": "path"}.items() <= next(
                p for p in operation["parameters"] if p["name"] == parameter
            ).items()


def test_a_route_without_an_operation_is_an_error() -> None:
    with pytest.raises(KeyError, match="no-such-route"):
        openapi_document(SERVER, [("no-such-route", "GET", "/nowhere")])


def test_request_bodies_are_the_validating_schemas(document: dict[str, Any]) -> None:
    """The request bodies are the very dicts the agent validates requests with."""
    components = document["components"]["schemas"]
    assert components["CreateRequest"] is schemas.CREATE_REQUEST
    assert components["CreateRequest"] is schemas.create_request.schema
    assert components["SignalRequest"] is schemas.signal_request.schema
    assert components["BulkRequest"] is schemas.bulk_request.schema
    bodies = {
        operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        for item in document["paths"].values()
        for operation in item.values()
        if "application/json" in operation.get("requestBody", {}).get("content", {})
    }
    assert {f"#/components/schemas/{name}" for name in REQUEST_SCHEMAS} <= bodies


def test_security_is_bearer_except_the_health_check(document: dict[str, Any]) -> None:
    """Every operation needs a key but the health check and the dashboard's files (the
    page asks the user for keys itself)."""
    assert document["security"] == [{"bearer": []}]
    assert document["paths"]["/healthz"]["get"]["security"] == []
    opened = [
        path for path, item in document["paths"].items()
        for operation in item.values() if operation.get("security") == []
    ]
    assert opened == ["/healthz", "/ui/", "/ui/{name}"]


class _Links:
    def index(self, relation: str) -> str:
        return f"{SERVER}/{relation}"

    def process(self, relation: str, slug: str) -> str:
        return f"{SERVER}/{relation}/{slug}"

    def key(self, relation: str, key_id: str) -> str:
        return f"{SERVER}/{relation}/{key_id}"


def _validator(document: dict[str, Any], name: str) -> Any:
    root = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    return jsonschema_rs.validator_for(json.loads(json.dumps(root)))


def test_the_representations_match_their_response_schemas(document: dict[str, Any]) -> None:
    """Documents built by representations (with every optional part filled) conform."""
    spec = Spec("shop", "web.0", "web", "http://example.test/a.tgz", sha256="ab" * 32)
    record = ExitRecord(Exit(-9), 1796148000.0, 2.5, "stopped")
    info = ProcessInfo(
        spec, ProcessState.BACKOFF, None, "exited with code 3", 2, record, (record,),
        started_at=1796148000.0, uptime=1.0, port=8000, healthy=False, cpu_percent=1.5,
        memory_rss=1024, backoff_delay=1.0, next_start_at=1796148001.0,
        output_tail=("oops",), stop_timeout=5.0, download=DownloadProgress(10, None),
    )
    status = process_document(info, _Links())
    lines = log_document([LogLine(1796148000.0, "stdout", "hi", 1, 42, 0)])
    key = key_document(MintedKey("k1", "shop", b"digest", 1796148000.0), _Links())
    for name, value in [
        ("Index", index_document(_Links())),
        ("Status", status),
        ("Created", {**status, "token": {"id": "k1", "app": "shop", "key": "secret"}}),
        ("Listing", listing_document([info], _Links())),
        ("LogLines", lines),
        ("Upload", upload_document(f"{SERVER}/sources/{'ab' * 32}", "ab" * 32, 9)),
        ("Tokens", {"tokens": [key]}),
        ("Error", {"error": "invalid fields", "fields": {"app": "is required"}}),
        ("BulkOutcomes", {"processes": [{"slug": "a.b", "ok": False, "error": "no"}]}),
        ("Empty", {}),
        ("HostStats", _host_snapshot(info)),
    ]:
        _validator(document, name).validate(json.loads(json.dumps(value)))
    with pytest.raises(jsonschema_rs.ValidationError):
        _validator(document, "Status").validate({**status, "state": "dancing"})


def _host_snapshot(info: ProcessInfo) -> dict[str, Any]:
    """A host statistics snapshot with every part filled (two samples, one plugin)."""
    def sample(at: float) -> HostSample:
        return HostSample(
            hostname="h", at=1796148000.0 + at, monotonic=at, boot_time=1796140000.0,
            users=1, load=(0.1, 0.2, 0.3), cores=((at, 2 * at),),
            memory={"total": 4, "used": 1, "available": 3, "cached": 1},
            swap={"total": 0, "used": 0, "free": 0},
            disk={"path": "/s", "total": 4, "used": 1, "free": 3},
            network={"bytes_in": 1, "bytes_out": 2}, agent_pid=1, agent_rss=9, agent_cpu=at,
        )
    return snapshot_document(sample(2.0), sample(1.0), [info], {"p": {"error": "why"}})


# --- schemathesis against a live agent -------------------------------------------------

_READY = re.compile(r"listening on (http://127\.0\.0\.1:\d+)/? ")


@pytest.fixture(scope="module")
def live_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real ``smartmob-agent`` command on 127.0.0.1, with an admin key, fetching
    sources from nowhere; yields its URL, and checks it stops cleanly."""
    state = tmp_path_factory.mktemp("openapi") / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMARTMOB_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "smartmob_agent", "--host", "127.0.0.1", "--port", "0",
         "--state-dir", str(state), "--token", KEY, "--source-allow", SOURCE_HOST],
        stderr=subprocess.PIPE, text=True, errors="replace", env=env,
    )
    assert proc.stderr is not None
    log: list[str] = []
    ready = threading.Event()
    found: list[str] = []

    def pump() -> None:  # read stderr to its end, so the agent never blocks writing it
        assert proc.stderr is not None
        for line in proc.stderr:
            log.append(line)
            match = _READY.search(line)
            if match and not ready.is_set():
                found.append(match.group(1))
                ready.set()
        ready.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        assert ready.wait(30), "the agent did not say it listens"
        assert found, "".join(log)
        yield found[0]
    finally:
        proc.terminate()
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        reader.join(10)
        proc.stderr.close()
    text = "".join(log)
    assert code == 0, text
    assert "unexpected error" not in text, text
    assert "Traceback" not in text, text


def test_the_live_agent_serves_the_document(live_agent: str) -> None:
    """The index links to the document, which describes this agent at this address, and
    needs a key like any route but the health check."""
    def get(url: str, key: str | None = KEY) -> tuple[int, str, Any]:
        headers = {} if key is None else {"Authorization": f"Bearer {key}"}
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers)) as r:
                return r.status, r.headers["Content-Type"], json.load(r)
        except urllib.error.HTTPError as error:
            with error:
                return error.code, error.headers["Content-Type"], json.load(error)

    status, kind, index = get(f"{live_agent}/")
    assert index["openapi"] == f"{live_agent}/openapi.json"
    status, kind, document = get(index["openapi"])
    assert (status, kind) == (200, "application/json; charset=utf-8")
    assert document["servers"] == [{"url": live_agent}]
    assert document["openapi"] == "3.1.0"
    assert get(index["openapi"], key=None)[0] == 401


@pytest.fixture(scope="module")
def api_schema(live_agent: str) -> Any:
    """The document the live agent serves, as schemathesis loads it."""
    schema = schemathesis.openapi.from_url(
        f"{live_agent}/openapi.json", headers={"Authorization": f"Bearer {KEY}"}, timeout=10
    )
    schema.config.update(headers={"Authorization": f"Bearer {KEY}"}, request_timeout=20)
    return schema


#: Operations whose body may be any bytes (an upload is kept whatever it holds; it is
#: checked when a create request unpacks it): there is no invalid body to send.
ANY_BODY = frozenset({"upload"})
#: Examples per operation and mode; fewer for an operation whose every answer takes a
#: fixed time: a host-stats GET measures CPU over 0.25 s (25 of them were 6.5 s of the
#: suite), and its two inputs, ``interval`` and ``token``, are few.
EXAMPLES = 25
SLOW_EXAMPLES = {"host_stats": 6}
CHECKS = [
    not_a_server_error, status_code_conformance, content_type_conformance,
    response_schema_conformance,
]


def _tame(case: Any, mode: GenerationMode) -> None:
    """Aim a create request's webhooks, and a valid one's source, at a closed port of
    127.0.0.1, not at whatever host the fuzzer made up (a negative case keeps its
    source, which is then refused or, if on 127.0.0.1, fails to download)."""
    body = case.body
    if case.operation.label != "POST /create-process" or not isinstance(body, dict):
        return
    if isinstance(body.get("notify"), list):
        body["notify"] = [
            f"http://127.0.0.1:9/hook{index}" if isinstance(url, str) else url
            for index, url in enumerate(body["notify"])
        ]
    if mode is GenerationMode.POSITIVE and "source_url" in body:
        body["source_url"] = SOURCE_URL


@pytest.fixture
def known_process(live_agent: str) -> str:
    """Create the process :data:`KNOWN` unless it exists; return its slug."""
    request = urllib.request.Request(
        f"{live_agent}/create-process", data=json.dumps(KNOWN).encode(), method="POST",
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request) as response:
            status = response.status
    except urllib.error.HTTPError as error:
        with error:
            status = error.code
    assert status in (201, 409)  # made now, or still there
    return KNOWN_SLUG


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize("operation_id", sorted(OPERATIONS))
def test_the_live_agent_keeps_to_its_document(
    api_schema: Any, known_process: str, operation_id: str, mode: GenerationMode
) -> None:
    """Fuzzed requests of each operation, valid (positive) and not (negative): no 5xx,
    and every answer has a documented status, content type and body. A bounded,
    derandomized number of examples, so the run is the same each time."""
    operation = api_schema.find_operation_by_id(operation_id)
    if mode is GenerationMode.NEGATIVE and not (
        operation.path_parameters or operation.query
        or (operation.body and operation_id not in ANY_BODY)
    ):
        pytest.skip("nothing to make invalid: the operation takes no input, or any")

    known = (
        {"slug": known_process}
        if mode is GenerationMode.POSITIVE and "{slug}" in operation.path else None
    )

    @given(case=operation.as_strategy(generation_mode=mode, path_parameters=known))
    @settings(
        max_examples=SLOW_EXAMPLES.get(operation_id, EXAMPLES), deadline=None,
        derandomize=True, database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        _tame(case, mode)
        case.call_and_validate(
            headers={"Authorization": f"Bearer {KEY}"}, checks=CHECKS, timeout=20
        )

    run()


def test_the_document_is_the_committed_snapshot(tmp_path: Path) -> None:
    """The OpenAPI document is byte-identical to ``tests/openapi_snapshot.json``, so a
    refactoring cannot change the API contract unnoticed. After an intended change to the
    API, write the snapshot again (the assertion message says how) and review its diff."""
    document = openapi_document(SERVER, served_routes(tmp_path), version="snapshot")
    text = json.dumps(document, indent=1) + "\n"
    snapshot = Path(__file__).with_name("openapi_snapshot.json")
    assert text == snapshot.read_text(), (
        "the OpenAPI document changed: if that is intended, write it with "
        "openapi_document(SERVER, served_routes(tmp), version='snapshot') to " + str(snapshot)
    )
