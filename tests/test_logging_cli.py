"""The agent's log records end to end: the real ``smartmob-agent`` command with each
format (``--log-format text|kv|json``) and each endpoint (stdout, stderr, a file,
FluentD), started, asked, and stopped by a signal."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest

from tests.agent_process import AgentProcess
from tests.helpers import eventually

pytestmark = pytest.mark.timeout(90)

KEY = "log-key-" + "5f" * 16
#: A time zone 5 h 30 min east of UTC, whatever the machine's (POSIX spells it negative).
TZ_PLUS_0530 = "XYZ-05:30"


def _env(**extra: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SMARTMOB_")}
    return {**environ, **extra}


def _json_lines(text: str) -> list[dict[str, Any]]:
    """Each line of ``text`` as a JSON object (it fails on a line that is not one)."""
    return [json.loads(line) for line in text.splitlines()]


_KV_PAIR = re.compile(r"""([^\s=]+)=('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|\S+)""")


def _kv_line(line: str) -> tuple[list[str], dict[str, Any]]:
    """The keys (in order) and the values of one ``kv`` record."""
    pairs = _KV_PAIR.findall(line)
    assert " ".join(f"{key}={value}" for key, value in pairs) == line, line
    return [key for key, _ in pairs], {key: ast.literal_eval(value) for key, value in pairs}


def _one(found: list[dict[str, Any]], event: str, **fields: Any) -> dict[str, Any]:
    """The one record of ``event`` with these ``fields``."""
    matching = [r for r in found if r.get("event") == event
                and all(r.get(k) == v for k, v in fields.items())]
    assert len(matching) == 1, (event, fields, found)
    return matching[0]


async def _get(url: str, **headers: str) -> int:
    """GET ``url``; return the status (a request id given is echoed)."""
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as response:
        if "X-Request-Id" in headers:
            assert response.headers["X-Request-Id"] == headers["X-Request-Id"]
        return response.status


async def _signal_and_wait(agent: AgentProcess, number: int) -> None:
    assert agent.proc is not None
    agent.proc.send_signal(number)
    assert await agent.wait() == 0, agent.stderr


async def test_json_start_get_ctrl_c(tmp_path: Path) -> None:
    """The done-when run: records on stdout show ``bind``, ``http.access`` (path ``/``,
    outcome 200, the request id) and ``stop`` (``ctrl-c``), each with sorted keys and a
    local ``@timestamp`` with its offset; stderr holds nothing but warnings."""
    agent = AgentProcess(tmp_path / "s", ["--log-format", "json"], env=_env(TZ=TZ_PLUS_0530))
    try:
        await agent.start()
        assert await _get(agent.url + "/", **{"X-Request-Id": "MY-REQUEST-ID"}) == 200
        await _signal_and_wait(agent, signal.SIGINT)
    finally:
        await agent.kill()
    found = _json_lines(agent.stdout)
    port = int(agent.url.rsplit(":", 1)[1])
    bind = _one(found, "bind", transport="tcp", host="127.0.0.1", port=port)
    assert bind["url"] == agent.url + "/"
    access = _one(found, "http.access", path="/", method="GET")
    assert (access["outcome"], access["request"]) == (200, "MY-REQUEST-ID")
    assert isinstance(access["duration"], float)
    assert access["logger"] == "smartmob_agent.access"
    _one(found, "stop", reason="ctrl-c")
    _one(found, "exit", status=0)
    assert [r["event"] for r in found][-2:] == ["stop", "exit"]
    for record in found:
        assert list(record) == sorted(record), record
        assert record["@timestamp"].endswith("+05:30"), record
        assert record["level"] in {"debug", "info"}, record  # warnings go to stderr
    for record in _json_lines(agent.stderr):  # e.g. running as root without --user
        assert record["level"] == "warning", record


async def test_kv_utc_and_sigterm(tmp_path: Path) -> None:
    """``kv`` as the original wrote it: the time and the event first, then the keys
    sorted; ``--utc`` writes ``+00:00``; SIGTERM is the ``sigterm`` stop."""
    agent = AgentProcess(tmp_path / "s", ["--log-format", "kv", "--utc"],
                         env=_env(TZ=TZ_PLUS_0530))
    try:
        await agent.start()
        assert await _get(agent.url + "/healthz") == 200
        await _signal_and_wait(agent, signal.SIGTERM)
    finally:
        await agent.kill()
    found = []
    for line in agent.stdout.splitlines():
        keys, record = _kv_line(line)
        assert keys[:2] == ["@timestamp", "event"]
        assert keys[2:] == sorted(keys[2:])
        assert record["@timestamp"].endswith("+00:00")
        found.append(record)
    _one(found, "bind", port=int(agent.url.rsplit(":", 1)[1]))
    _one(found, "http.access", path="/healthz", outcome=200)
    _one(found, "stop", reason="sigterm")


async def test_a_relative_file_endpoint_gets_every_record(tmp_path: Path) -> None:
    """``file://./agent.log``, relative to the agent's folder: every record is
    appended there (0600), and nothing is written to stdout or stderr."""
    agent = AgentProcess(tmp_path / "s", [
        "--log-format", "json", "--logging-endpoint", "file://./agent.log",
    ], env=_env(), cwd=tmp_path)
    log_file = tmp_path / "agent.log"
    try:
        await agent.start(ready=False)
        await eventually(lambda: '"bind"' in _read(log_file), what="the bind record")
        agent.url = _one(_json_lines(_read(log_file)), "bind")["url"].rstrip("/")
        assert await _get(agent.url + "/") == 200
        await _signal_and_wait(agent, signal.SIGINT)
    finally:
        await agent.kill()
    found = _json_lines(log_file.read_text())
    _one(found, "http.access", path="/", outcome=200)
    _one(found, "stop", reason="ctrl-c")
    assert (agent.stdout, agent.stderr) == ("", "")
    assert log_file.stat().st_mode & 0o777 == 0o600


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


async def test_the_stderr_endpoint_takes_every_record(tmp_path: Path) -> None:
    """``file:///dev/stderr``: the info records too; nothing on stdout."""
    agent = AgentProcess(tmp_path / "s", [
        "--log-format", "json", "--logging-endpoint", "file:///dev/stderr",
    ], env=_env())
    try:
        await agent.start()
        assert await _get(agent.url + "/") == 200
        await _signal_and_wait(agent, signal.SIGINT)
    finally:
        await agent.kill()
    found = _json_lines(agent.stderr)
    _one(found, "bind")
    _one(found, "http.access", path="/", outcome=200)
    _one(found, "stop", reason="ctrl-c")
    assert agent.stdout == ""


async def test_the_stdout_endpoint_takes_the_text_format_and_the_warnings(
    tmp_path: Path,
) -> None:
    """``file:///dev/stdout`` with ``text``: the ready line and every warning there,
    nothing on stderr; with ``--utc``, the time is UTC's."""
    agent = AgentProcess(tmp_path / "s", [
        "--logging-endpoint", "file:///dev/stdout", "--token", KEY, "--utc",
    ], env=_env(TZ=TZ_PLUS_0530))
    try:
        await agent.start()
        await _signal_and_wait(agent, signal.SIGINT)
    finally:
        await agent.kill()
    ready = re.search(r"^(\S+ \S+) INFO smartmob_agent: smartmob-agent \S+ listening on "
                      r"http://", agent.stdout, re.M)
    assert ready is not None, agent.stdout
    written = datetime.strptime(ready[1], "%Y-%m-%d %H:%M:%S,%f").replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - written).total_seconds()) < 600
    assert "WARNING smartmob_agent: keys given with --token" in agent.stdout
    assert KEY not in agent.stdout
    assert agent.stderr == ""


async def test_an_agent_without_endpoint_writes_text_to_stderr_only(tmp_path: Path) -> None:
    """The default stays today's: text lines on stderr, the access records only at
    ``--log-level debug``, nothing on stdout."""
    quiet = AgentProcess(tmp_path / "q", env=_env())
    loud = AgentProcess(tmp_path / "l", ["--log-level", "debug"], env=_env())
    try:
        for agent in (quiet, loud):
            await agent.start()
            assert await _get(agent.url + "/", **{"X-Request-Id": "abc"}) == 200
            await _signal_and_wait(agent, signal.SIGINT)
    finally:
        await quiet.kill()
        await loud.kill()
    assert "smartmob_agent.access" not in quiet.stderr
    assert re.search(r'INFO smartmob_agent\.access: 127\.0\.0\.1 "GET /" 200 [0-9.]+s '
                     r"\[request abc\]\n", loud.stderr), loud.stderr
    assert (quiet.stdout, loud.stdout) == ("", "")


async def test_the_records_of_a_process_carry_their_request_ids(tmp_path: Path) -> None:
    """``process.create``, ``process.attach`` and ``process.delete`` carry the id of the
    request that did it, as its ``http.access`` does; ``process.state`` tells each
    change (with the failure's reason and error); the agent-log link serves the same
    records."""
    agent = AgentProcess(tmp_path / "s", ["--log-format", "json"], env=_env())
    body = {"app": "shop", "node": "web.0", "process_type": "web",
            "source_url": "http://127.0.0.1:1/nothing-listens-here.tgz"}
    try:
        await agent.start()
        async with aiohttp.ClientSession() as http:
            async with http.post(agent.url + "/create-process", json=body,
                                 headers={"X-Request-Id": "gitmesh ?"}) as response:
                assert response.status == 201
                document = await response.json()
            await eventually(lambda: '"to": "failed"' in agent.stdout, what="the failure")
            async with http.ws_connect(document["attach"],
                                       headers={"X-Request-Id": "attach-1"}) as ws:
                await eventually(lambda: '"process.attach"' in agent.stdout, what="attach")
                await ws.close()
            async with http.post(document["delete"],
                                 headers={"X-Request-Id": "delete-1"}) as response:
                assert response.status == 200
            async with http.get(agent.url + "/agent-log?tail=1000") as response:
                kept = [json.loads(entry["line"]) for entry in await response.json()]
        await _signal_and_wait(agent, signal.SIGINT)
    finally:
        await agent.kill()
    found = _json_lines(agent.stdout)
    create = _one(found, "process.create", slug="shop.web.0", request="gitmesh ?")
    assert (create["app"], create["node"], create["process_type"]) == ("shop", "web.0", "web")
    _one(found, "http.access", path="/create-process", request="gitmesh ?", outcome=201)
    _one(found, "process.attach", slug="shop.web.0", request="attach-1")
    _one(found, "process.delete", slug="shop.web.0", request="delete-1")
    _one(found, "process.state", slug="shop.web.0", **{"from": "pending", "to": "downloading"})
    failed = _one(found, "process.state", slug="shop.web.0", to="failed")
    assert failed["reason"] == "download failure"
    assert "nothing-listens-here.tgz" in failed["error"]
    assert _one(found, "process.state", slug="shop.web.0", to="downloading")["reason"] is None
    by_time = {(r["event"], r["@timestamp"]) for r in found + _json_lines(agent.stderr)}
    assert [r for r in kept if (r["event"], r["@timestamp"]) not in by_time] == []
    assert {"bind", "process.create", "process.state", "http.access"} <= {
        r["event"] for r in kept}


# -- FluentD --------------------------------------------------------------------------------


class ForwardInput:
    """A FluentD forward input, as small as it gets: a TCP server on 127.0.0.1 that
    reads ``[tag, time, record]`` messages, msgpack one after the other."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, Any, dict[str, Any]]] = []
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        unpacker = msgpack.Unpacker(raw=False)
        while data := await reader.read(65536):
            unpacker.feed(data)
            for message in unpacker:
                tag, time, record = message[:3]
                self.messages.append((tag, time, record))
        writer.close()

    def records(self, tag: str) -> list[dict[str, Any]]:
        return [record for got, _, record in self.messages if got == tag]

    async def close(self) -> None:
        """Stop listening and drop every connection (FluentD gone)."""
        if self._server is not None:
            self._server.close()
            for writer in self._writers:
                writer.close()
            await self._server.wait_closed()


async def test_fluentd_gets_each_record_tagged_with_its_event(tmp_path: Path) -> None:
    """``fluent://127.0.0.1:<port>/smartmob``: every record, tagged ``smartmob.<event>``
    with the forward protocol's event time, no key in any of them, nothing on stdout or
    stderr."""
    fluentd = ForwardInput()
    port = await fluentd.start()
    agent = AgentProcess(tmp_path / "s", [
        "--logging-endpoint", f"fluent://127.0.0.1:{port}/smartmob",
    ], env=_env(SMARTMOB_TOKEN=KEY))
    try:
        await agent.start(ready=False)
        await eventually(lambda: bool(fluentd.records("smartmob.bind")), what="bind")
        agent.url = fluentd.records("smartmob.bind")[0]["url"].rstrip("/")
        status = await _get(agent.url + f"/list-processes?token={KEY}&tail=5",
                            Authorization=f"Bearer {KEY}", **{"X-Request-Id": "fluent-1"})
        assert status == 200
        await _signal_and_wait(agent, signal.SIGINT)
        await eventually(lambda: bool(fluentd.records("smartmob.exit")), what="exit")
    finally:
        await agent.kill()
        await fluentd.close()
    (access,) = fluentd.records("smartmob.http.access")
    assert access["path"] == "/list-processes?token=[hidden]&tail=5"
    assert (access["outcome"], access["request"], access["method"]) == (200, "fluent-1", "GET")
    assert access["@timestamp"].endswith("+00:00")
    (stop,) = fluentd.records("smartmob.stop")
    assert stop["reason"] == "ctrl-c"
    assert fluentd.records("smartmob.bind")[0]["port"] == int(agent.url.rsplit(":", 1)[1])
    for tag, time, record in fluentd.messages:
        assert tag == f"smartmob.{record['event']}"
        assert isinstance(time, msgpack.ExtType)
        assert time.code == 0  # EventTime: seconds and nanoseconds
    assert KEY not in repr(fluentd.messages)
    assert (agent.stdout, agent.stderr) == ("", "")


# -- refusals -------------------------------------------------------------------------------


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "smartmob_agent", "--state-dir", str(tmp_path / "s"), *args],
        capture_output=True, text=True, timeout=60, env=_env(), check=False,
    )


@pytest.mark.parametrize(("url", "message"), [
    ("syslog://localhost", 'Invalid logging endpoint "syslog://localhost".'),
    ("fluent://localhost:port/tag", 'Invalid URL: "fluent://localhost:port/tag".'),
    ("fluent://localhost:24224/tag?x", 'Invalid URL: "fluent://localhost:24224/tag?x".'),
])
def test_a_bad_endpoint_stops_the_agent_at_start(
    tmp_path: Path, url: str, message: str
) -> None:
    result = _run(tmp_path, "--logging-endpoint", url)
    assert result.returncode == 2
    assert result.stderr == f"smartmob-agent: {message}\n"
    assert not (tmp_path / "s").exists()


def test_a_bad_endpoint_in_the_environment_stops_the_agent_at_start(tmp_path: Path) -> None:
    """``SMARTMOB_LOGGING_ENDPOINT`` is checked as the flag is, with the same message."""
    result = subprocess.run(
        [sys.executable, "-m", "smartmob_agent", "--state-dir", str(tmp_path / "s")],
        capture_output=True, text=True, timeout=60, check=False,
        env=_env(SMARTMOB_LOGGING_ENDPOINT="syslog://localhost"),
    )
    assert result.returncode == 2
    assert result.stderr == 'smartmob-agent: Invalid logging endpoint "syslog://localhost".\n'
    assert not (tmp_path / "s").exists()


def test_an_endpoint_file_that_cannot_be_opened_stops_the_agent(tmp_path: Path) -> None:
    result = _run(tmp_path, "--logging-endpoint", f"file://{tmp_path}/no/such/agent.log")
    assert result.returncode == 2
    assert result.stderr.startswith(f"smartmob-agent: cannot write the log to file://{tmp_path}")
    assert len(result.stderr.splitlines()) == 1


def test_a_fatal_error_is_an_exit_record_where_the_records_go(tmp_path: Path) -> None:
    """In ``json``, a port in use is one ``exit`` record (level error, status 1) on
    stderr; with an endpoint, it goes there and nothing to stderr."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        plain = _run(tmp_path, "--port", port, "--log-format", "json")
        to_file = _run(tmp_path, "--port", port, "--log-format", "json",
                       "--logging-endpoint", f"file://{tmp_path}/agent.log")
    assert (plain.returncode, plain.stdout) == (1, "")
    (record,) = _json_lines(plain.stderr)
    assert (record["event"], record["level"], record["status"]) == ("exit", "error", 1)
    assert f"cannot listen on 127.0.0.1:{port}" in record["message"]
    assert (to_file.returncode, to_file.stdout, to_file.stderr) == (1, "", "")
    (record,) = _json_lines((tmp_path / "agent.log").read_text())
    assert record["event"] == "exit"


async def test_a_fluentd_that_goes_away_does_not_hold_the_agent(tmp_path: Path) -> None:
    """With FluentD gone, requests are still answered, and the agent stops cleanly
    (exit 0, within the few seconds it gives the last records), with nothing on stdout or
    stderr about it."""
    fluentd = ForwardInput()
    port = await fluentd.start()
    agent = AgentProcess(tmp_path / "s", [
        "--logging-endpoint", f"fluent://127.0.0.1:{port}/smartmob",
    ], env=_env())
    try:
        await agent.start(ready=False)
        await eventually(lambda: bool(fluentd.records("smartmob.bind")), what="bind")
        agent.url = fluentd.records("smartmob.bind")[0]["url"].rstrip("/")
        await fluentd.close()
        for _ in range(20):
            assert await _get(agent.url + "/healthz") == 200
        await _signal_and_wait(agent, signal.SIGINT)
    finally:
        await agent.kill()
        await fluentd.close()
    assert (agent.stdout, agent.stderr) == ("", "")
