"""Requests the agent cannot read are answered like every other error: a JSON document
that says why, with one log line and no traceback, and nothing about Python's insides."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.agent_process import AgentProcess
from tests.helpers import eventually
from tests.test_connections import open_raw, parse_response, read_to_end


@pytest.fixture
async def agent_process(tmp_path: Path) -> AsyncIterator[AgentProcess]:
    process = await AgentProcess(tmp_path / "state").start()
    yield process
    await process.kill()


@pytest.mark.parametrize("request_bytes", [
    pytest.param(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
                 id="request-line"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n",
                 id="header"),
])
async def test_an_oversized_request_line_or_header_gets_json_and_one_log_line(
    agent_process: AgentProcess, request_bytes: bytes
) -> None:
    """Over 8190 bytes: a JSON 400 that says what is too long and the limit, and one
    line in the agent's log, without a traceback."""
    reader, writer = await open_raw(agent_process)
    writer.write(request_bytes)
    async with asyncio.timeout(10):
        status, headers, body = parse_response(await read_to_end(reader))
    writer.close()
    assert status == 400
    assert headers["content-type"].startswith("application/json")
    assert set(body) == {"error"}
    assert "too long" in body["error"]
    assert "8190 bytes" in body["error"]
    await eventually(lambda: "answered 400" in agent_process.stderr,
                     what="the agent to log the bad request")
    logged = [line for line in agent_process.stderr.splitlines() if "answered 400" in line]
    assert len(logged) == 1, logged
    assert "too long" in logged[0]
    assert "Traceback" not in agent_process.stderr


async def test_bytes_that_are_not_http_get_json(agent_process: AgentProcess) -> None:
    """Malformed HTTP is a JSON 400 too, with the gist of what is wrong."""
    reader, writer = await open_raw(agent_process)
    writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: x\r\n\r\n")
    async with asyncio.timeout(10):
        status, headers, body = parse_response(await read_to_end(reader))
    writer.close()
    assert status == 400
    assert headers["content-type"].startswith("application/json")
    assert body["error"].startswith("the request is not valid HTTP: ")
    assert "\n" not in body["error"]


async def test_https_sent_to_the_http_port_gets_json_and_no_log_line(
    agent_process: AgentProcess,
) -> None:
    """A TLS ClientHello sent to the plain HTTP port (a client that says https:// by
    mistake, or a scanner) is a JSON 400, logged at debug only: common, and nothing for
    a person to act on. The next malformed request is logged, and is the only line."""
    reader, writer = await open_raw(agent_process)
    writer.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32))
    async with asyncio.timeout(10):
        status, headers, _ = parse_response(await read_to_end(reader))
    writer.close()
    assert status == 400
    assert headers["content-type"].startswith("application/json")
    reader, writer = await open_raw(agent_process)
    writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: x\r\n\r\n")
    async with asyncio.timeout(10):
        await read_to_end(reader)
    writer.close()
    await eventually(lambda: "answered 400" in agent_process.stderr,
                     what="the agent to log the second bad request")
    logged = [line for line in agent_process.stderr.splitlines() if "answered 400" in line]
    assert len(logged) == 1, logged
    assert "Content-Length" in logged[0] or "not valid HTTP" in logged[0], logged


@pytest.mark.parametrize("number", ["9" * 5000, "-" + "9" * 5000])
async def test_an_integer_of_5000_digits_is_too_large(
    client: TestClient[Any, Any], number: str
) -> None:
    """The answer says the number is too large, not how to change Python's limits."""
    response = await client.post(
        "/create-process", data='{"app": "a", "node": "web.0", "restart": {"max_restarts": '
        + number + "}}",
    )
    assert response.status == 400
    error = (await response.json())["error"]
    assert "too large" in error
    assert "sys." not in error
    assert "int_max_str_digits" not in error


async def test_an_integer_at_the_limit_reaches_the_field_checks(
    client: TestClient[Any, Any]
) -> None:
    """4300 digits is read as a number; the field's own rule then refuses it."""
    body = {"app": "a", "node": "web.0", "process_type": "web",
            "source_url": "http://127.0.0.1:9/x.tgz"}
    text = json.dumps(body)[:-1] + ', "restart": {"max_restarts": ' + "9" * 4300 + "}}"
    response = await client.post("/create-process", data=text)
    assert response.status == 400
    error = (await response.json())["error"]
    assert "too large" not in error
