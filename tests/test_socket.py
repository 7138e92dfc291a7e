"""Inherited listening sockets (the ``socket`` option), on a real agent: the agent listens,
each child accepts on fd 3 as systemd's socket activation hands it over, and the socket
outlives children (kill -9, updates): a client connecting meanwhile waits, never refused.

The app is a tiny server that accepts on fd 3 and answers each connection with one line:
its version, its pid, and ``LISTEN_PID``/``LISTEN_FDS``/``LISTEN_FDNAMES``/``PORT`` as it
got them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from typing import Any

import pytest

from smartmob_agent.errors import Conflict
from smartmob_agent.events.bus import ProcessEvent
from smartmob_agent.model import ProcessState as S
from smartmob_agent.model import Spec
from smartmob_agent.processes.spawn import shell_script
from smartmob_agent.schemas import create_request, spec_from_request
from smartmob_agent.supervision.agent import Agent
from smartmob_agent.supervision.watcher import Watcher
from tests.conftest import ArchiveServer
from tests.helpers import app_archive, wait_for_state

#: Accepts on fd 3 and answers one line per connection (``VERSION`` is replaced).
SERVER = """
import os, select, signal, socket
# a stop ends the loop between two connections, never in the middle of one: what waits in
# the backlog is for the next child (as a graceful server does)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
listener = socket.socket(fileno=3)
listener.setblocking(False)  # two children may wake for one connection during an update
print("serving", flush=True)
while signal.SIGTERM not in signal.sigpending():
    if not select.select([listener], [], [], 0.05)[0]:
        continue
    try:
        connection, _ = listener.accept()
    except BlockingIOError:
        continue
    env = os.environ
    line = " ".join(["VERSION", str(os.getpid()), env.get("LISTEN_PID", "-"),
                     env.get("LISTEN_FDS", "-"), env.get("LISTEN_FDNAMES", "-"),
                     env.get("PORT", "-")])
    connection.setblocking(True)
    connection.sendall(line.encode() + b"\\n")
    connection.close()
"""


def version(archives: ArchiveServer, name: str) -> str:
    """Serve the app saying ``name``; its URL."""
    return archives.add(f"{name}.tar.gz", app_archive(
        "web: {PYTHON} -u app.py\n", {"app.py": SERVER.replace("VERSION", name)}))


def make_spec(url: str, **options: Any) -> Spec:
    """The spec of ``shop.web.0`` from ``url``."""
    return spec_from_request(create_request.validate({
        "app": "shop", "node": "web.0", "process_type": "web", "source_url": url,
        **options}))


async def ask(port: int, timeout: float = 10.0) -> list[str]:
    """Connect to 127.0.0.1:``port`` and read the server's line, split in words."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            return (await reader.readline()).decode().split()
        finally:
            writer.close()


async def serving(agent: Agent, url: str, **options: Any) -> Watcher:
    """Create ``shop.web.0`` with a socket; return it once it runs."""
    watcher = agent.create(make_spec(url, socket=True, **options))
    await wait_for_state(watcher, S.RUNNING)
    return watcher


def test_the_shell_sets_listen_pid_to_its_own_pid_which_exec_keeps() -> None:
    """``LISTEN_PID`` is set by the shell as ``$$``: the program's pid once exec'd."""
    assert "LISTEN_PID=$$; export LISTEN_PID; exec serve" in shell_script(
        "serve", 1, listen=True)
    assert "LISTEN_PID" not in shell_script("serve", 1)


async def test_a_child_accepts_on_fd_3_with_the_activation_variables(
    agent: Agent, archive_server: ArchiveServer
) -> None:
    """The agent listens on a port it picked; the child accepts on fd 3 and was told so
    (LISTEN_FDS=1, its own pid as LISTEN_PID, the process type as its name, PORT the
    socket's); the status document shows the socket and which child has it."""
    watcher = await serving(agent, version(archive_server, "v1"))
    socket_spec = watcher.spec.options.socket
    assert socket_spec is not None
    assert socket_spec.port is not None
    name, pid, listen_pid, fds, names, port = await ask(socket_spec.port)
    assert (name, int(pid), int(listen_pid)) == ("v1", watcher.pid, watcher.pid)
    assert (fds, names, int(port)) == ("1", "web", socket_spec.port)
    assert watcher.port == socket_spec.port
    document = watcher.info()
    assert document.pid == watcher.pid


async def test_the_socket_survives_a_kill_9_of_the_child(
    agent: Agent, archive_server: ArchiveServer
) -> None:
    """SIGKILL the child, connect at once: the connection waits in the backlog and the
    next child answers it; nothing is refused."""
    watcher = await serving(agent, version(archive_server, "v1"))
    port = watcher.port
    assert port is not None
    old = watcher.pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    answers = await asyncio.gather(*(ask(port) for _ in range(5)))
    assert {int(answer[1]) for answer in answers} != {old}
    assert all(answer[0] == "v1" for answer in answers)


async def test_an_update_keeps_serving_on_the_same_socket(
    agent: Agent, archive_server: ArchiveServer
) -> None:
    """Requests sent all through an update are all answered, first by v1 then by v2;
    the socket and its port are the process's still."""
    v2 = version(archive_server, "v2")
    watcher = await serving(agent, version(archive_server, "v1"), start_seconds=0.3)
    port = watcher.port
    assert port is not None
    assert (await ask(port))[0] == "v1"
    ended: list[ProcessEvent] = []

    def listen(event: ProcessEvent) -> None:
        if event["event"] == "process:update" and event["outcome"] != "started":
            ended.append(event)

    agent.events.add_listener(listen)
    agent.update(watcher, make_spec(v2, start_seconds=0.3))
    seen: list[str] = []
    async with asyncio.timeout(15):
        while not ended:
            seen.append((await ask(port))[0])
    agent.events.remove_listener(listen)
    outcome = ended[0]
    assert outcome["event"] == "process:update"
    assert outcome["outcome"] == "succeeded"
    assert len(seen) > 1
    assert (await ask(port))[0] == "v2"
    assert watcher.port == port
    assert watcher.spec.options.socket == watcher.releases.previous[0].options.socket  # type: ignore[index]


async def test_a_socket_port_in_use_is_a_conflict(
    agent: Agent, archive_server: ArchiveServer
) -> None:
    """Asking for a port something else listens on is refused, and nothing is created."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(Conflict, match="in use"):
            agent.create(make_spec(version(archive_server, "v1"), socket={"port": port}))
    assert agent.list() == []


#: Answers HTTP on each socket it inherits (``SHARED=0``: not on the shared one, fd 3)
#: with ``STATUS`` and its version.
HTTP_SERVER = """
import os, select, signal, socket
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
names = os.environ["LISTEN_FDNAMES"].split(":")
fds = [3 + i for i in range(int(os.environ["LISTEN_FDS"]))]
if os.environ.get("SHARED") == "0":
    fds = fds[1:]
listeners = [socket.socket(fileno=fd) for fd in fds]
for listener in listeners:
    listener.setblocking(False)
status = os.environ.get("STATUS", "200").encode()
while signal.SIGTERM not in signal.sigpending():
    for listener in select.select(listeners, [], [], 0.05)[0]:
        try:
            connection, _ = listener.accept()
        except BlockingIOError:
            continue
        connection.setblocking(True)
        connection.recv(65536)
        body = b"VERSION " + names[listener.fileno() - 3].encode()
        connection.sendall(b"HTTP/1.0 " + status + b" X\\r\\nContent-Length: "
                           + str(len(body)).encode() + b"\\r\\n\\r\\n" + body)
        connection.close()
"""
HEALTH = {"http": "/", "interval": 0.2, "timeout": 0.5, "failures": 2}


async def http_app(agent: Agent, archives: ArchiveServer, name: str, **env: str) -> Spec:
    """The spec of an HTTP version ``name`` with a socket and an HTTP health check."""
    url = archives.add(f"{name}.tar.gz", app_archive(
        "web: {PYTHON} -u app.py\n", {"app.py": HTTP_SERVER.replace("VERSION", name)}))
    return make_spec(url, socket=True, health=HEALTH, start_seconds=0.1, env=env)


async def updated(agent: Agent, watcher: Watcher, spec: Spec) -> ProcessEvent:
    """Update ``watcher`` to ``spec``; the event that ends the update."""
    ended: asyncio.Future[ProcessEvent] = asyncio.get_running_loop().create_future()

    def listen(event: ProcessEvent) -> None:
        if event["event"] == "process:update" and event["outcome"] != "started" \
                and not ended.done():
            ended.set_result(event)

    agent.events.add_listener(listen)
    try:
        agent.update(watcher, spec)
        async with asyncio.timeout(15):
            return await ended
    finally:
        agent.events.remove_listener(listen)


async def test_with_a_socket_the_health_gate_probes_the_new_child_itself(
    agent: Agent, archive_server: ArchiveServer
) -> None:
    """The new child's HTTP probes go to its own health socket (fd 4): a new version
    that is unhealthy there is not switched to, though the old child answers 200 on
    the shared port all along."""
    watcher = agent.create(await http_app(agent, archive_server, "v1"))
    await wait_for_state(watcher, S.RUNNING)
    old = watcher.pid
    sick = await http_app(agent, archive_server, "sick", SHARED="0", STATUS="503")
    event = await updated(agent, watcher, sick)
    assert event["event"] == "process:update"
    assert event["outcome"] == "failed"
    assert watcher.releases.reason == "unhealthy"
    assert watcher.pid == old


async def test_with_a_socket_a_healthy_new_version_is_switched_to(
    agent: Agent, archive_server: ArchiveServer
) -> None:
    """A new version healthy on its own health socket is switched to, and serves the
    shared port; the health socket is named ``health`` in LISTEN_FDNAMES."""
    watcher = agent.create(await http_app(agent, archive_server, "v1"))
    await wait_for_state(watcher, S.RUNNING)
    event = await updated(agent, watcher, await http_app(agent, archive_server, "v2"))
    assert event["event"] == "process:update"
    assert event["outcome"] == "succeeded", event
    assert watcher.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", watcher.port)
    writer.write(b"GET / HTTP/1.0\r\n\r\n")
    answer = await reader.read()
    writer.close()
    assert answer.endswith(b"v2 web")
