"""The attach WebSocket's input frames up to the documented 64 KiB, and its closing
handshake as aiohttp's own client sees it."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient

from smartmob_agent.supervision.agent import Agent
from smartmob_agent.web.attach import FRAME_TOO_LARGE, MAX_INPUT_FRAME
from tests.conftest import ArchiveServer
from tests.puppet import PuppetServer
from tests.test_ws_functional import receive_lines, start_puppet

Client = TestClient[Any, Any]


async def test_an_input_frame_of_exactly_64_kib_keeps_the_socket_open(
    client: Client, agent: Agent, archive_server: ArchiveServer, puppets: PuppetServer
) -> None:
    """A text frame of 65536 bytes, the most the docs allow, does not close the socket:
    the input that follows it still reaches the process, and the output the client."""
    process, puppet = await start_puppet(client, agent, archive_server, puppets)
    ws = await client.session.ws_connect(process["attach"])
    await ws.send_str("x" * MAX_INPUT_FRAME)
    await ws.send_str("after")
    # the 64 KiB line may come first (see the test below): read up to "after"
    await puppet.run("line = ''")
    await puppet.run("while line != 'after\\n': line = sys.stdin.readline()")
    await puppet.run("print('read up to after', flush=True)")
    async with asyncio.timeout(10):
        while (message := await ws.receive()).data != "read up to after":
            assert message.type is aiohttp.WSMsgType.TEXT, message
    await ws.close()


async def test_an_input_frame_of_exactly_64_kib_reaches_the_process(
    client: Client, agent: Agent, archive_server: ArchiveServer, puppets: PuppetServer
) -> None:
    """A text frame of 65536 bytes is one line of the process's stdin, whole."""
    process, puppet = await start_puppet(client, agent, archive_server, puppets)
    ws = await client.session.ws_connect(process["attach"])
    await ws.send_str("x" * MAX_INPUT_FRAME)
    await ws.send_str("after")  # so that a line comes even if the first does not
    # not "line": the puppet's own loop variable (tests/puppet.py) would overwrite it
    await puppet.run("got = sys.stdin.readline()")
    await puppet.run(f"print(len(got), got == 'x' * {MAX_INPUT_FRAME} + '\\n', flush=True)")
    assert await receive_lines(ws, 1) == [f"{MAX_INPUT_FRAME + 1} True"]
    await ws.close()


async def test_an_input_frame_over_64_kib_closes_the_socket_saying_why(
    client: Client, agent: Agent, archive_server: ArchiveServer, puppets: PuppetServer
) -> None:
    """One byte more closes the socket with 1009 and a reason a person understands; the
    process is not touched."""
    process, puppet = await start_puppet(client, agent, archive_server, puppets)
    ws = await client.session.ws_connect(process["attach"])
    await ws.send_str("x" * (MAX_INPUT_FRAME + 1))
    async with asyncio.timeout(10):
        message = await ws.receive()
    assert message.type is aiohttp.WSMsgType.CLOSE, message
    assert message.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    assert message.extra == FRAME_TOO_LARGE.decode()
    assert "65536 bytes" in message.extra
    assert ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    await puppet.run("pass")  # still running, and its input untouched
    status = await (await client.session.get(process["details"])).json()
    assert status["state"] == "running"


async def test_aiohttps_client_sees_1000_when_the_process_is_deleted(
    client: Client, agent: Agent, archive_server: ArchiveServer, puppets: PuppetServer
) -> None:
    """The agent waits for the client's close frame before closing the connection, so
    aiohttp's client ends with the agent's code (1000), not 1006."""
    process, _ = await start_puppet(client, agent, archive_server, puppets)
    ws = await client.session.ws_connect(process["attach"])
    response = await client.session.post(process["delete"])
    assert response.status == 200
    async with asyncio.timeout(10):
        message = await ws.receive()
        assert message.type is aiohttp.WSMsgType.CLOSE, message
        assert (message.data, message.extra) == (1000, "process deleted")
        assert (await ws.receive()).type is aiohttp.WSMsgType.CLOSED
    assert ws.exception() is None
    assert ws.close_code == 1000
