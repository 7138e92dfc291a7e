"""The attach WebSocket: every output line as one text frame, for every client."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient

from smartmob_agent.model import ProcessState as S
from smartmob_agent.output.hub import Hub
from smartmob_agent.supervision.agent import Agent
from smartmob_agent.web.subscriber import MAX_BUFFER, WebSocketSubscriber
from tests.conftest import ArchiveServer
from tests.helpers import app_archive, eventually, wait_for_state
from tests.puppet import PUPPET_SCRIPT, Puppet, PuppetServer

Client = TestClient[Any, Any]


async def start_puppet(
    client: Client, agent: Agent, archive_server: ArchiveServer, puppets: PuppetServer,
    node: str = "web.0",
) -> tuple[dict[str, Any], Puppet]:
    """Create a process whose child is a puppet; return its status document and puppet."""
    url = archive_server.add("puppet.tgz", app_archive(
        "web: {PYTHON} -u puppet.py\n", {"puppet.py": PUPPET_SCRIPT}))
    body = {"app": "myapp", "node": node, "process_type": "web", "source_url": url,
            "env": {"PUPPET_PORT": str(puppets.port)}}
    response = await client.post("/create-process", data=json.dumps(body))
    assert response.status == 201
    process = await response.json()
    await wait_for_state(agent.get(process["slug"]), S.RUNNING)
    return process, await puppets.next()


def socket_subscribers(hub: Hub) -> list[WebSocketSubscriber]:
    """The attach WebSockets subscribed to ``hub`` (every subscriber must be one), for a
    test that looks into what each dropped or holds."""
    found = [s for s in hub._subscribers if isinstance(s, WebSocketSubscriber)]
    assert len(found) == len(hub._subscribers), hub._subscribers
    return found


async def receive_lines(ws: aiohttp.ClientWebSocketResponse, count: int) -> list[str]:
    """Receive ``count`` text frames (10 s deadline)."""
    lines: list[str] = []
    async with asyncio.timeout(10):
        while len(lines) < count:
            message = await ws.receive()
            assert message.type == aiohttp.WSMsgType.TEXT, message
            lines.append(message.data)
    return lines


async def test_lines_arrive_as_frames_in_order(
    client: Client, agent: Agent, archive_server: ArchiveServer, puppets: PuppetServer
) -> None:
    """Each line of stdout and stderr arrives as one frame without newline, in order."""
    process, puppet = await start_puppet(client, agent, archive_server, puppets)
    ws = await client.session.ws_connect(process["attach"])
    await puppet.run("[print('out', i) for i in range(500)]")
    await puppet.run("[print('err', i, file=sys.stderr) for i in range(500)]")
    lines = await receive_lines(ws, 1000)
    assert [line for line in lines if line.startswith("out")] == [f"out {i}" for i in range(500)]
    assert [line for line in lines if line.startswith("err")] == [f"err {i}" for i in range(500)]
    await ws.close()


async def test_odd_output_is_delivered_whole(
    client: Client, agent: Agent, archive_server: ArchiveServer, puppets: PuppetServer
) -> None:
    """A 1 MB line comes in pieces that join back, bad UTF-8 is replaced, CRLF is a line."""
    process, puppet = await start_puppet(client, agent, archive_server, puppets)
    ws = await client.session.ws_connect(process["attach"])
    await puppet.run("sys.stdout.buffer.write(b'\\xff\\xfebad\\r\\n' + b'x' * 1_000_000 + b'\\n')")
    first = await receive_lines(ws, 1)
    assert first == ["\ufffd\ufffdbad"]
    pieces: list[str] = []
    while sum(map(len, pieces)) < 1_000_000:
        pieces += await receive_lines(ws, 1)
    assert len(pieces) > 1
    assert "".join(pieces) == "x" * 1_000_000
    await ws.close()


async def test_final_line_without_newline_is_kept(
    client: Client, agent: Agent, archive_server: ArchiveServer, puppets: PuppetServer
) -> None:
    """The last line a process writes without a newline arrives when it exits."""
    process, puppet = await start_puppet(client, agent, archive_server, puppets)
    ws = await client.session.ws_connect(process["attach"])
    puppet.writer.write(b"sys.stdout.write('last words'); sys.stdout.flush(); os._exit(0)\n")
    assert await receive_lines(ws, 1) == ["last words"]
    await ws.close()


async def test_several_clients_get_every_line(
    client: Client, agent: Agent, archive_server: ArchiveServer, puppets: PuppetServer
) -> None:
    """Three attached clients each receive every line."""
    process, puppet = await start_puppet(client, agent, archive_server, puppets)
    sockets = [await client.session.ws_connect(process["attach"]) for _ in range(3)]
    await puppet.run("[print('line', i) for i in range(300)]")
    for ws in sockets:
        assert await receive_lines(ws, 300) == [f"line {i}" for i in range(300)]
        await ws.close()


async def test_socket_closes_normally_when_the_process_is_deleted(
    client: Client, agent: Agent, archive_server: ArchiveServer, puppets: PuppetServer
) -> None:
    """Deleting the process closes every attached socket with code 1000."""
    process, _ = await start_puppet(client, agent, archive_server, puppets)
    ws = await client.session.ws_connect(process["attach"])
    response = await client.session.post(process["delete"])
    assert response.status == 200
    async with asyncio.timeout(10):
        message = await ws.receive()
    assert message.type == aiohttp.WSMsgType.CLOSE
    assert message.data == 1000, (message, ws.close_code)


async def test_attach_to_unknown_process_is_404(client: Client) -> None:
    """Attaching to a slug that does not exist answers 404 with a JSON error."""
    response = await client.get("/attach-console/nope.web.0")
    assert response.status == 404
    assert "nope.web.0" in (await response.json())["error"]


async def open_stuck_client(host: str, port: int, path: str) -> socket.socket:
    """Open a WebSocket that completes the handshake and then never reads a byte."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (host, port))
    key = base64.b64encode(os.urandom(16)).decode()
    await loop.sock_sendall(sock, (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode())
    head = b""
    async with asyncio.timeout(10):
        while b"\r\n\r\n" not in head:
            head += await loop.sock_recv(sock, 1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


async def test_stuck_client_neither_blocks_nor_grows(
    client: Client, agent: Agent, archive_server: ArchiveServer, puppets: PuppetServer
) -> None:
    """A live-only client (``?live=1``) that never reads loses lines (counted, then
    announced) while the child and a reading client go on, and what is queued for it
    stays bounded."""
    process, puppet = await start_puppet(client, agent, archive_server, puppets)
    server = client.server
    stuck = await open_stuck_client(str(server.host), int(server.port or 0),
                                    f"/attach-console/{process['slug']}?live=1")
    reader = await client.session.ws_connect(process["attach"] + "?live=1")
    hub = agent.get(process["slug"]).hub
    await eventually(lambda: hub.subscriber_count == 2, what="both clients attached")
    count, line = 100_000, "y" * 100

    async def consume() -> tuple[int, int]:
        received, announced = 0, 0
        while (message := await reader.receive()).data != "done":
            if message.data.startswith("[smartmob-agent]"):
                announced += int(message.data.split()[1])
            else:
                received += 1
        return received, announced

    consuming = asyncio.ensure_future(consume())
    # the child is never blocked: it writes everything while one client reads nothing
    await puppet.run(f"[print({line!r}) for _ in range({count})]")
    stuck_subscriber = next(s for s in socket_subscribers(hub) if s.dropped)
    assert stuck_subscriber._transport.get_write_buffer_size() <= MAX_BUFFER + 2 * 65536
    # the reading client gets every line, or is told how many it missed
    await eventually(lambda: all(s._transport.get_write_buffer_size() == 0
                                 for s in socket_subscribers(hub) if s is not stuck_subscriber),
                     what="the reading client to catch up")
    await puppet.run("print('done')")
    async with asyncio.timeout(30):
        received, announced = await consuming
    assert received + announced == count
    assert received > 0
    # once the stuck client drains, it is told how many lines it missed, although the
    # process writes nothing more
    loop = asyncio.get_running_loop()
    drained = bytearray()
    notice = f"{stuck_subscriber.dropped} line(s) dropped".encode()
    async with asyncio.timeout(10):
        while notice not in drained:
            drained.extend(await loop.sock_recv(stuck, 65536))
    assert stuck_subscriber.pending_drops == 0
    stuck.close()
    await reader.close()


async def test_stuck_client_does_not_hang_delete(
    client: Client, agent: Agent, archive_server: ArchiveServer, puppets: PuppetServer
) -> None:
    """Deleting a process whose live-only client stopped reading ends promptly, cutting
    it off."""
    process, puppet = await start_puppet(client, agent, archive_server, puppets)
    server = client.server
    stuck = await open_stuck_client(str(server.host), int(server.port or 0),
                                    f"/attach-console/{process['slug']}?live=1")
    hub = agent.get(process["slug"]).hub
    await eventually(lambda: hub.subscriber_count == 1, what="the client attached")
    [subscriber] = socket_subscribers(hub)
    await puppet.run(f"[print({'z' * 100!r}) for _ in range(100_000)]")
    assert subscriber.dropped > 0
    async with asyncio.timeout(10):
        response = await client.session.post(process["delete"])
        assert response.status == 200
        await subscriber.wait_closed()
    assert subscriber._transport.is_closing()
    stuck.close()
