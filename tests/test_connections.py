"""Slow and idle connections, and the connection limit, through the real agent command.

A client with no key must not be able to hold the agent's file descriptors: a request's
headers or body sent a byte at a time, and connections that send nothing, are cut after
``--header-timeout``, ``--body-timeout`` and ``--keepalive-timeout``; past
``--max-connections`` the longest idle connection makes room, or the new one gets 503.
WebSockets, which are one long request, are never cut by those timeouts. The timeouts are
set short by flags, so that each test takes seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from yarl import URL

from tests.agent_process import AgentProcess
from tests.conftest import ArchiveServer
from tests.helpers import app_archive, eventually, make_archive
from tests.test_end_to_end import create, wait_running

Starter = Callable[..., Awaitable[AgentProcess]]
Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]

#: A process that answers each line of its standard input.
ECHO = "import sys\nfor line in sys.stdin:\n    print('got', line.strip(), flush=True)\n"


@pytest.fixture
async def start_agent(tmp_path: Path) -> AsyncIterator[Starter]:
    """Start real agents with the given flags; each is killed after the test."""
    started: list[AgentProcess] = []

    async def start(*args: str, **options: Any) -> AgentProcess:
        agent = AgentProcess(tmp_path / f"state{len(started)}", args, **options)
        started.append(agent)
        return await agent.start()

    yield start
    for agent in started:
        await agent.kill()


async def open_raw(agent: AgentProcess) -> Connection:
    """A plain TCP connection to the agent, to send exactly what a test wants."""
    url = URL(agent.url)
    return await asyncio.open_connection(url.host, url.port)


async def read_to_end(reader: asyncio.StreamReader) -> bytes:
    """Every byte the agent sends until it closes the connection."""
    data = b""
    try:
        while chunk := await reader.read(65536):
            data += chunk
    except ConnectionResetError:  # closed while bytes of ours were still coming in
        pass
    return data


def parse_response(raw: bytes) -> tuple[int, dict[str, str], Any]:
    """Status, headers (lowercase names) and JSON body of one raw HTTP response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, json.loads(body)


async def dribble(
    writer: asyncio.StreamWriter, pieces: Sequence[bytes], every: float,
    until: asyncio.Future[bytes],
) -> None:
    """Send the pieces one at a time, ``every`` seconds apart (the slow client's
    attack), and stop as soon as ``until`` is done (the agent closed the connection)."""
    for piece in pieces:
        if until.done():
            return
        writer.write(piece)
        await asyncio.wait([until], timeout=every)


async def test_headers_sent_slowly_get_408_at_the_header_timeout(start_agent: Starter) -> None:
    """A client sending a header line every 0.25 s, for up to 10 s, gets a JSON 408 and
    is disconnected once the headers took longer than --header-timeout (1 s)."""
    agent = await start_agent("--header-timeout", "1", "--keepalive-timeout", "60")
    reader, writer = await open_raw(agent)
    writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    answer = asyncio.ensure_future(read_to_end(reader))
    await dribble(writer, [b"X-Slow-%d: 1\r\n" % i for i in range(40)], 0.25, answer)
    assert answer.done(), "the agent still waited for headers after 10 s"
    status, headers, body = parse_response(answer.result())
    assert status == 408
    assert headers["content-type"].startswith("application/json")
    assert "--header-timeout" in body["error"]
    writer.close()
    # a client that sends its request at once is served as before
    async with aiohttp.ClientSession() as http, http.get(agent.url + "/") as response:
        assert response.status == 200


async def test_a_tls_handshake_must_end_within_the_header_timeout(
    start_agent: Starter, tmp_path: Path,
) -> None:
    """On a TLS agent, a connection that sends nothing, or the start of a ClientHello
    and then nothing, is closed at --header-timeout (1 s), not held; a real client is
    served as before."""
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    certificate.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    certificate.private_key_pem.write_to_path(str(key_file))
    agent = await start_agent("--tls-cert", str(cert_file), "--tls-key", str(key_file),
                              "--header-timeout", "1", "--keepalive-timeout", "60")
    for first_bytes in (b"", b"\x16\x03\x01\x02\x00\x01"):
        reader, writer = await open_raw(agent)
        writer.write(first_bytes)
        async with asyncio.timeout(10):  # keep-alive is 60 s: only the header timeout
            assert await read_to_end(reader) == b""
        writer.close()
    context = ssl.create_default_context()
    authority.configure_trust(context)
    async with aiohttp.ClientSession() as http, http.get(agent.url + "/",
                                                           ssl=context) as response:
        assert response.status == 200


async def test_a_body_sent_slowly_gets_408_at_the_body_timeout(start_agent: Starter) -> None:
    """A 1000-byte body sent one byte every 0.25 s gets a JSON 408, and the connection is
    closed, once it took longer than --body-timeout (1 s), without a traceback."""
    agent = await start_agent(
        "--body-timeout", "1", "--header-timeout", "60", "--keepalive-timeout", "60"
    )
    reader, writer = await open_raw(agent)
    writer.write(b"POST /create-process HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
    answer = asyncio.ensure_future(read_to_end(reader))
    await dribble(writer, [b" "] * 40, 0.25, answer)
    assert answer.done(), "the agent still waited for the body after 10 s"
    status, headers, body = parse_response(answer.result())
    assert status == 408
    assert headers["content-type"].startswith("application/json")
    assert headers["connection"] == "close"
    assert "--body-timeout" in body["error"]
    assert "Traceback" not in agent.stderr
    writer.close()


async def test_a_steady_upload_outlasts_the_body_timeout(start_agent: Starter) -> None:
    """A body that keeps coming (1 MiB over about 3 s, far over 1 KiB a second) is not
    cut at --body-timeout (1 s): each KiB received buys it one more second."""
    agent = await start_agent("--body-timeout", "1")
    archive = make_archive({"Procfile": "web: true\n", "noise": os.urandom(1024 * 1024)})
    reader, writer = await open_raw(agent)
    writer.write(b"POST /upload-source HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(archive))
    answer = asyncio.ensure_future(read_to_end(reader))
    piece = len(archive) // 16 + 1
    pieces = [archive[i:i + piece] for i in range(0, len(archive), piece)]
    await dribble(writer, pieces, 0.2, answer)
    async with asyncio.timeout(10):
        status, _, body = parse_response(await answer)
    assert status == 201, body
    writer.close()


async def test_idle_connections_are_closed_at_the_keepalive_timeout(
    start_agent: Starter,
) -> None:
    """A connection that never sends a request, and one that got its answer and sends
    nothing more, are both closed after --keepalive-timeout (1 s)."""
    agent = await start_agent("--keepalive-timeout", "1")
    silent, silent_writer = await open_raw(agent)
    served, served_writer = await open_raw(agent)
    served_writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    async with asyncio.timeout(10):
        assert await read_to_end(silent) == b""
        assert (await read_to_end(served)).startswith(b"HTTP/1.1 200 ")
    silent_writer.close()
    served_writer.close()


async def test_websockets_outlive_every_timeout(
    start_agent: Starter, archive_server: ArchiveServer
) -> None:
    """An events socket and an attach socket left quiet for three times every timeout
    (1 s each) still work both ways."""
    agent = await start_agent(
        "--header-timeout", "1", "--body-timeout", "1", "--keepalive-timeout", "1"
    )
    url = archive_server.add("echo.tgz", app_archive(
        "web: {PYTHON} -u echo.py\n", {"echo.py": ECHO}))
    async with aiohttp.ClientSession() as http:
        process = await create(http, agent.url, source_url=url)
        await wait_running(http, process["details"])
        events = await http.ws_connect(agent.url + "/events", autoping=False)
        attach = await http.ws_connect(process["attach"])
        # the subject of the test: time passing with nothing sent either way
        await asyncio.sleep(3)
        await events.ping(b"still there?")
        async with asyncio.timeout(10):
            pong = await events.receive()
            assert pong.type is aiohttp.WSMsgType.PONG, pong
            await attach.send_str("hello")
            while (message := await attach.receive()).data != "got hello":
                assert message.type is aiohttp.WSMsgType.TEXT, message
        await events.close()
        await attach.close()


async def test_past_max_connections_the_longest_idle_one_makes_room(
    start_agent: Starter,
) -> None:
    """With --max-connections 8, twelve idle connections leave eight open (the four
    oldest are closed), and a new client's GET / is answered at once, the next oldest
    idle connection making room for it; the agent says so in its log."""
    agent = await start_agent(
        "--max-connections", "8", "--keepalive-timeout", "60", "--header-timeout", "60"
    )
    connections = [await open_raw(agent) for _ in range(12)]
    ends = [asyncio.ensure_future(read_to_end(reader)) for reader, _ in connections]
    await eventually(lambda: sum(end.done() for end in ends) == 4,
                     what="four connections closed")
    assert all(end.done() for end in ends[:4]), "the oldest were not the ones closed"
    async with (asyncio.timeout(10), aiohttp.ClientSession() as http,
                http.get(agent.url + "/") as response):
        assert response.status == 200
    await eventually(lambda: ends[4].done(), what="the next oldest closed")
    assert not any(end.done() for end in ends[5:])
    assert "the most --max-connections allows" in agent.stderr
    for _, writer in connections:
        writer.close()


async def test_when_every_connection_is_busy_a_new_one_gets_503(
    start_agent: Starter,
) -> None:
    """With --max-connections 2 taken by two WebSockets (busy, never closed to make
    room), a new connection gets a JSON 503 at once and is closed; the WebSockets go on;
    once one leaves, a new client is served."""
    agent = await start_agent("--max-connections", "2")
    async with aiohttp.ClientSession() as http:
        sockets = [await http.ws_connect(agent.url + "/events", autoping=False)
                   for _ in range(2)]
        reader, writer = await open_raw(agent)
        async with asyncio.timeout(10):
            status, headers, body = parse_response(await read_to_end(reader))
        assert status == 503
        assert headers["retry-after"] == "5"
        assert "--max-connections" in body["error"]
        writer.close()
        for ws in sockets:
            await ws.ping()
            async with asyncio.timeout(10):
                assert (await ws.receive()).type is aiohttp.WSMsgType.PONG
        await sockets[0].close()
    async with asyncio.timeout(10):
        while True:  # the agent notices the socket closed soon after the client
            reader, writer = await open_raw(agent)
            writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            answer = await read_to_end(reader)
            writer.close()
            if not answer.startswith(b"HTTP/1.1 503 "):
                break
            await asyncio.sleep(0.05)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:100]
    await sockets[1].close()


def _low_open_file_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


async def test_at_ulimit_256_three_hundred_idle_sockets_do_not_stop_the_agent(
    start_agent: Starter, archive_server: ArchiveServer
) -> None:
    """An agent limited to 256 open files, with its default limits, still answers GET /,
    creates and restarts a process while 300 idle connections were opened to it."""
    agent = await start_agent(preexec_fn=_low_open_file_limit)
    idle = [await open_raw(agent) for _ in range(300)]
    url = archive_server.add("echo.tgz", app_archive(
        "web: {PYTHON} -u echo.py\n", {"echo.py": ECHO}))
    async with asyncio.timeout(30), aiohttp.ClientSession() as http:
        async with http.get(agent.url + "/") as response:
            assert response.status == 200
        process = await create(http, agent.url, source_url=url)
        await wait_running(http, process["details"])
        async with http.post(process["restart"]) as response:
            assert response.status == 200, await response.text()
        await wait_running(http, process["details"])
    for _, writer in idle:
        writer.close()
