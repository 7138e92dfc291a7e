"""A child process the test drives: it runs Python statements the test sends it.

The child connects to a TCP server of the test on 127.0.0.1 (port in ``PUPPET_PORT``),
then executes each line it receives and answers ``ok``. Tests thus decide exactly when
a child writes, exits or forks, and wait for the answer instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

PUPPET_SCRIPT = """
import os, socket, sys
sock = socket.create_connection(("127.0.0.1", int(os.environ["PUPPET_PORT"])))
sock.sendall(b"pid %d\\n" % os.getpid())
for line in sock.makefile("rb"):
    exec(line.decode())
    sock.sendall(b"ok\\n")
"""


@dataclass
class Puppet:
    """One connected puppet child."""

    pid: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def run(self, statement: str, timeout: float = 10.0) -> None:
        """Have the child execute one line of Python; wait until it has."""
        assert "\n" not in statement
        self.writer.write(statement.encode() + b"\n")
        async with asyncio.timeout(timeout):
            await self.writer.drain()
            answer = await self.reader.readline()
        assert answer == b"ok\n", f"the puppet answered {answer!r}"


@dataclass
class PuppetServer:
    """Accepts puppet connections on 127.0.0.1."""

    port: int = 0
    arrivals: asyncio.Queue[Puppet] = field(default_factory=asyncio.Queue)
    server: asyncio.Server | None = None
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def start(self) -> PuppetServer:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        hello = await reader.readline()
        await self.arrivals.put(Puppet(int(hello.split()[1]), reader, writer))

    async def next(self, timeout: float = 10.0) -> Puppet:
        """Wait for the next puppet to connect."""
        async with asyncio.timeout(timeout):
            return await self.arrivals.get()

    async def close(self) -> None:
        """Close every puppet connection and the server."""
        for writer in self.writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
