"""What a child is given: its PORT, its environment layers, its folder, umask and stdin.

Every test runs real children of a real agent, created through the HTTP API from
archives served on 127.0.0.1. A child tells what it saw by writing a report file (its
path in the request's ``OUT`` variable, written atomically) or by printing lines that
arrive on the attach WebSocket.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import tarfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from smartmob_agent.config import Settings
from smartmob_agent.model import ProcessState as S
from smartmob_agent.processes.ports import PortAllocator
from smartmob_agent.supervision.agent import AGENT_ID_VARIABLE, Agent
from smartmob_agent.supervision.provision import PROCESS_ID_VARIABLE
from smartmob_agent.web.attach import INPUT_NOT_DELIVERED, INPUT_NOT_TEXT
from tests.conftest import ArchiveServer
from tests.helpers import PYTHON, app_archive, eventually, make_archive, wait_for_state

Client = TestClient[Any, Any]

#: The agent's own environment in this module: the lowest layer, with variables that
#: every other layer overrides, including the ones the agent must force.
AGENT_ENV = {
    "LAYER_ALL": "agent",
    "LAYER_THREE": "agent",
    "LAYER_TWO": "agent",
    "AGENT_ONLY": "agent",
    "PORT": "1",
    PROCESS_ID_VARIABLE: "agent",
    AGENT_ID_VARIABLE: "agent",
}

#: Reports what it sees to $OUT (if set), then echoes each stdin line as "got <line>";
#: "quit" makes it exit with code 3.
PROBE = """
import json, os, signal, sys
out = os.environ.get("OUT")
if out:
    with open(out + ".tmp", "w") as file:
        json.dump({"pid": os.getpid(), "cwd": os.getcwd(), "env": dict(os.environ)}, file)
    os.replace(out + ".tmp", out)
print("ready", flush=True)
for line in sys.stdin:
    line = line.rstrip("\\n")
    if line == "quit":
        sys.exit(3)
    print("got " + line, flush=True)
signal.pause()
"""

NOT_DELIVERED = INPUT_NOT_DELIVERED.decode()
NOT_TEXT = INPUT_NOT_TEXT.decode()


@pytest.fixture
async def agent(settings: Settings) -> AsyncIterator[Agent]:
    """The agent of conftest, but starting children from :data:`AGENT_ENV` too."""
    async with Agent(settings, base_env={**os.environ, **AGENT_ENV}) as agent:
        yield agent


def body(url: str, node: str = "web.0", **extra: Any) -> dict[str, Any]:
    """A create request for process type ``web`` of app ``myapp``."""
    return {"app": "myapp", "node": node, "process_type": "web", "source_url": url, **extra}


async def create(client: Client, request: dict[str, Any], status: int = 201) -> Any:
    """POST a create request; check the status and return the JSON answer."""
    response = await client.post("/create-process", data=json.dumps(request))
    assert response.status == status, await response.text()
    return await response.json()


async def status_of(client: Client, slug: str) -> Any:
    """The status document of ``slug``."""
    response = await client.get(f"/process-status/{slug}")
    assert response.status == 200, await response.text()
    return await response.json()


async def control(client: Client, action: str, slug: str) -> None:
    """POST a control (``start``, ``stop``, ``restart``) and check it was accepted."""
    response = await client.post(f"/{action}-process/{slug}")
    assert response.status == 200, await response.text()


async def report(path: Path, *, other_than: int | None = None) -> dict[str, Any]:
    """Wait for the probe's report at ``path`` (from a child other than pid ``other_than``)."""
    found: dict[str, Any] = {}

    def ready() -> bool:
        if not path.exists():
            return False
        found.update(json.loads(path.read_text()))
        return bool(found["pid"] != other_than)

    await eventually(ready, what=f"a report in {path.name}")
    return found


async def attach(client: Client, agent: Agent, slug: str) -> aiohttp.ClientWebSocketResponse:
    """Attach to ``slug`` and wait until the agent has subscribed the socket."""
    hub = agent.get(slug).hub
    before = hub.subscriber_count
    ws = await client.session.ws_connect(client.make_url(f"/attach-console/{slug}"))
    await eventually(lambda: hub.subscriber_count > before, what="the socket subscribed")
    return ws


async def frame_until(ws: aiohttp.ClientWebSocketResponse, last: str) -> list[str]:
    """Receive text frames up to and including one equal to ``last`` (10 s deadline)."""
    frames: list[str] = []
    async with asyncio.timeout(10):
        while not frames or frames[-1] != last:
            message = await ws.receive()
            assert message.type == aiohttp.WSMsgType.TEXT, message
            frames.append(message.data)
    return frames


def probe_app(procfile: str = "web: {PYTHON} probe.py\n", **files: str) -> bytes:
    """An archive holding the probe, a Procfile and ``files`` (``.env`` as ``dotenv``)."""
    scripts = {"probe.py": PROBE}
    scripts.update({(".env" if name == "dotenv" else name): text for name, text in files.items()})
    return app_archive(procfile, scripts)


# -- PORT -----------------------------------------------------------------------------------


async def test_fifty_processes_get_fifty_distinct_ports(
    client: Client, agent: Agent, archive_server: ArchiveServer, tmp_path: Path
) -> None:
    """Fifty processes created at once each get a port of their own, shown in their status
    and seen as PORT by their child."""
    url = archive_server.add("port.tgz", app_archive(
        'web: printf %s "$PORT" > "$OUT.tmp" && mv "$OUT.tmp" "$OUT" && exec sleep 600\n'))
    count = 50
    documents = await asyncio.gather(*(
        create(client, body(url, f"web.{i}", env={"OUT": str(tmp_path / f"port.{i}")}))
        for i in range(count)
    ))
    files = [tmp_path / f"port.{i}" for i in range(count)]
    await eventually(lambda: all(file.exists() for file in files), timeout=30,
                     what="every child to write its PORT")
    seen = [int(file.read_text()) for file in files]
    shown = [(await status_of(client, f"myapp.web.{i}"))["port"] for i in range(count)]
    assert len(set(seen)) == count
    assert seen == shown
    assert [document["port"] for document in documents] == shown
    assert all(1024 <= port <= 65535 for port in seen)


async def test_port_is_kept_across_a_restart_and_freed_on_delete(
    client: Client, agent: Agent, archive_server: ArchiveServer, tmp_path: Path
) -> None:
    """A restarted child gets the same PORT; once deleted, the port can be handed out again
    (here, to the next process, by an allocator whose probe always offers that port)."""
    url = archive_server.add("probe.tgz", probe_app())
    out = tmp_path / "report"
    document = await create(client, body(url, env={"OUT": str(out)}))
    port = document["port"]
    first = await report(out)
    assert first["env"]["PORT"] == str(port)
    # from now on the kernel "offers" only this port: only a release can free it
    agent.ports = PortAllocator(probe=lambda: port, tries=3)
    agent.ports.reserve("myapp.web.0", port)

    await control(client, "restart", "myapp.web.0")
    second = await report(out, other_than=first["pid"])
    assert second["env"]["PORT"] == str(port)
    assert (await status_of(client, "myapp.web.0"))["port"] == port

    response = await client.post("/delete-process/myapp.web.0")
    assert response.status == 200
    assert agent.ports.port_of("myapp.web.0") is None
    again = await create(client, body(url, "web.1", env={"OUT": str(tmp_path / "again")}))
    assert again["port"] == port
    assert (await report(tmp_path / "again"))["env"]["PORT"] == str(port)


async def test_ports_held_by_others_are_not_handed_out(
    client: Client, agent: Agent, archive_server: ArchiveServer
) -> None:
    """When every port the kernel offers is held, the create answers 503 and creates
    nothing, rather than giving two processes one port."""
    url = archive_server.add("probe.tgz", probe_app())
    first = await create(client, body(url))
    agent.ports = PortAllocator(probe=lambda: first["port"], tries=3)
    agent.ports.reserve("myapp.web.0", first["port"])
    await create(client, body(url, "web.1"), status=503)
    assert [info.spec.slug for info in agent.list()] == ["myapp.web.0"]


async def test_exhausted_ports_are_explained(
    client: Client, agent: Agent, archive_server: ArchiveServer
) -> None:
    """The 503 for exhausted ports says so: it is the machine's state, not an agent bug."""
    url = archive_server.add("probe.tgz", probe_app())
    first = await create(client, body(url))
    agent.ports = PortAllocator(probe=lambda: first["port"], tries=3)
    agent.ports.reserve("myapp.web.0", first["port"])
    answer = await create(client, body(url, "web.1"), status=503)
    assert "free TCP port" in answer["error"], answer


@pytest.mark.parametrize(
    ("given", "shown"),
    [
        pytest.param("5555", 5555, id="number"),
        pytest.param("not-a-port", None, id="not-a-number"),
        pytest.param("0", None, id="zero-is-no-port"),
    ],
)
async def test_request_env_port_wins(
    client: Client, agent: Agent, archive_server: ArchiveServer, tmp_path: Path,
    given: str, shown: int | None,
) -> None:
    """A PORT in the request's env is what the child sees, and the status shows it when
    it is a port number; no port is allocated for it."""
    url = archive_server.add("probe.tgz", probe_app())
    out = tmp_path / "report"
    document = await create(client, body(url, env={"OUT": str(out), "PORT": given}))
    assert document["port"] == shown
    assert (await report(out))["env"]["PORT"] == given
    assert agent.ports.port_of("myapp.web.0") == shown


# -- environment layers ---------------------------------------------------------------------


async def test_environment_layers_later_wins(
    client: Client, agent: Agent, archive_server: ArchiveServer, tmp_path: Path
) -> None:
    """Agent env < .env < Procfile line < request env < the agent's forced variables."""
    dotenv = (
        "LAYER_ALL=dotenv\nLAYER_THREE=dotenv\nLAYER_TWO=dotenv\nDOTENV_ONLY=dotenv\n"
        f"PORT=2\n{PROCESS_ID_VARIABLE}=dotenv\n{AGENT_ID_VARIABLE}=dotenv\n"
    )
    procfile = (
        "web: env LAYER_ALL=procfile LAYER_THREE=procfile PROCFILE_ONLY=procfile PORT=3 "
        f"{PROCESS_ID_VARIABLE}=procfile {{PYTHON}} probe.py\n"
    )
    url = archive_server.add("layers.tgz", probe_app(procfile, dotenv=dotenv))
    out = tmp_path / "report"
    request_env = {
        "OUT": str(out), "LAYER_ALL": "request", "REQUEST_ONLY": "request",
        PROCESS_ID_VARIABLE: "request", AGENT_ID_VARIABLE: "request",
    }
    document = await create(client, body(url, env=request_env))
    env = (await report(out))["env"]
    assert {name: env.get(name) for name in (
        "LAYER_ALL", "LAYER_THREE", "LAYER_TWO", "AGENT_ONLY", "DOTENV_ONLY",
        "PROCFILE_ONLY", "REQUEST_ONLY",
    )} == {
        "LAYER_ALL": "request", "LAYER_THREE": "procfile", "LAYER_TWO": "dotenv",
        "AGENT_ONLY": "agent", "DOTENV_ONLY": "dotenv", "PROCFILE_ONLY": "procfile",
        "REQUEST_ONLY": "request",
    }
    # forced: nothing the agent relies on can be overridden by any layer
    assert env["PORT"] == str(document["port"])
    assert env[AGENT_ID_VARIABLE] == agent.id
    process_id = env[PROCESS_ID_VARIABLE]
    assert process_id not in {"agent", "dotenv", "procfile", "request"}
    assert len(process_id) == 32
    assert env.get("PATH") == os.environ.get("PATH")  # the agent's own, untouched

DOTENV_SYNTAX = (
    "# a comment line\n"
    "   # an indented comment\n"
    "\n"
    "export EXPORTED=yes\n"
    "SINGLE='a $HOME # kept'\n"
    'DOUBLE="tab\\there \\"quoted\\" # kept"  # a comment after the quotes\n'
    'MULTI="line one\n'
    'line two"\n'
    "UNQUOTED=plain words   # a comment\n"
    "HASH=x#1\n"
    "EMPTY=\n"
    "  SPACED  =  spaced out  \r\n"
    "TWICE=first\n"
    "TWICE=second\n"
)


async def test_dotenv_syntax_end_to_end(
    client: Client, agent: Agent, archive_server: ArchiveServer, tmp_path: Path
) -> None:
    """Quotes, escapes, comments, export, blanks and CRLF in .env reach the child as meant."""
    url = archive_server.add("dotenv.tgz", probe_app(dotenv=DOTENV_SYNTAX))
    out = tmp_path / "report"
    await create(client, body(url, env={"OUT": str(out)}))
    env = (await report(out))["env"]
    expected = {
        "EXPORTED": "yes",
        "SINGLE": "a $HOME # kept",
        "DOUBLE": 'tab\there "quoted" # kept',
        "MULTI": "line one\nline two",
        "UNQUOTED": "plain words",
        "HASH": "x#1",
        "EMPTY": "",
        "SPACED": "spaced out",
        "TWICE": "second",
    }
    assert {name: env.get(name) for name in expected} == expected
    assert "export EXPORTED" not in env


@pytest.mark.parametrize(
    ("dotenv", "fragments"),
    [
        pytest.param("GOOD=1\n\nthis line is bad\n", ["Line 3", 'no "="'], id="no-equals"),
        pytest.param("A=1\n9X=2\n", ["Line 2", '"9X"', "not a valid variable name"],
                     id="bad-name"),
        pytest.param("A='open\n", ["Line 1", "no closing quote"], id="unclosed-quote"),
        pytest.param('A="x" y\n', ["Line 1", "after the closing quote"], id="text-after-quote"),
        pytest.param("A=1\nB=\xff\n", [".env", "line 2"], id="not-utf8"),
    ],
)
async def test_bad_dotenv_fails_the_process_naming_the_line(
    client: Client, agent: Agent, archive_server: ArchiveServer, dotenv: str,
    fragments: list[str],
) -> None:
    """A .env the agent cannot read makes the process failed, and the error names the
    line; no child is started."""
    data = dotenv.encode("latin-1") if "\xff" in dotenv else dotenv.encode()
    archive = make_archive({"Procfile": "web: true\n", ".env": data})
    url = archive_server.add("bad-dotenv.tgz", archive)
    await create(client, body(url))
    await wait_for_state(agent.get("myapp.web.0"), S.FAILED)
    status = await status_of(client, "myapp.web.0")
    assert status["pid"] is None
    assert ".env" in status["error"]
    for fragment in fragments:
        assert fragment in status["error"], status["error"]


# -- working_dir and umask ------------------------------------------------------------------


def tar_with_links(files: dict[str, str], links: dict[str, str], top: str) -> bytes:
    """A tar.gz of ``files`` and symbolic ``links`` (name -> target) under folder ``top``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, text in files.items():
            data = text.replace("{PYTHON}", PYTHON).encode()
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
            archive.addfile(info, io.BytesIO(data))
        for name, target in links.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.type, info.linkname, info.mtime = tarfile.SYMTYPE, target, int(time.time())
            archive.addfile(info)
    return buffer.getvalue()


#: A GitHub-like archive (one top folder, which becomes the source root) whose probe
#: runs from a sub-folder, with a link inside the source and one out of it: "up" points
#: at the folder above the root, which the archive checks accept since, in the archive,
#: the top folder's parent is still inside.
WORKING_DIR_APP = tar_with_links(
    {
        "Procfile": "web: {PYTHON} ../../probe.py\n",
        "probe.py": PROBE,
        "sub/dir/marker": "",
        "sub/file": "",
    },
    {"inner": "sub/dir", "up": ".."},
    top="app-main",
)


@pytest.mark.parametrize("working_dir", ["sub/dir", "sub/dir/", "./sub/dir", "inner"])
async def test_working_dir_runs_the_command_there(
    client: Client, agent: Agent, archive_server: ArchiveServer, tmp_path: Path,
    working_dir: str,
) -> None:
    """The command runs in working_dir, a folder inside the source (through a link that
    stays inside too), and the status shows the option."""
    url = archive_server.add("wd.tgz", WORKING_DIR_APP)
    out = tmp_path / "report"
    document = await create(client, body(url, env={"OUT": str(out)}, working_dir=working_dir))
    assert document["options"]["working_dir"] == working_dir
    cwd = Path((await report(out))["cwd"])
    assert (cwd / "marker").is_file()
    root = agent.processes_dir / "myapp.web.0" / "source" / "app-main"
    assert cwd == (root / "sub" / "dir").resolve()


@pytest.mark.parametrize(
    ("working_dir", "fragment"),
    [
        pytest.param("up", "'up' leads outside the source", id="link-out-of-the-source"),
        pytest.param("up/app-main/up", "leads outside the source", id="back-and-out-again"),
        pytest.param("missing", "'missing' is not a folder of the source", id="missing"),
        pytest.param("sub/file", "'sub/file' is not a folder of the source", id="a-file"),
    ],
)
async def test_bad_working_dir_fails_the_process(
    client: Client, agent: Agent, archive_server: ArchiveServer, working_dir: str,
    fragment: str,
) -> None:
    """A working_dir that leads out of the source (through a symbolic link) or is not a
    folder makes the process failed, saying why; no child is started."""
    url = archive_server.add("wd.tgz", WORKING_DIR_APP)
    await create(client, body(url, working_dir=working_dir))
    await wait_for_state(agent.get("myapp.web.0"), S.FAILED)
    status = await status_of(client, "myapp.web.0")
    assert fragment in status["error"], status["error"]
    assert status["pid"] is None
    assert status["exits"] == []


@pytest.mark.parametrize("working_dir", ["../x", "/etc", "a/../../b", "sub\\..\\.."])
async def test_working_dir_outside_is_refused_at_once(
    client: Client, agent: Agent, working_dir: str
) -> None:
    """A working_dir that is absolute or climbs with '..' is a 400 naming the field."""
    answer = await create(client, body("http://127.0.0.1:1/x.tgz", working_dir=working_dir),
                          status=400)
    assert set(answer["fields"]) == {"working_dir"}
    assert agent.list() == []


@pytest.mark.parametrize(
    ("umask", "file_mode", "dir_mode", "shown"),
    [
        pytest.param("077", 0o600, 0o700, "0077", id="077"),
        pytest.param("0027", 0o640, 0o750, "0027", id="0027"),
        pytest.param("0", 0o666, 0o777, "0000", id="zero"),
    ],
)
async def test_umask_is_honoured(
    client: Client, agent: Agent, archive_server: ArchiveServer, tmp_path: Path,
    umask: str, file_mode: int, dir_mode: int, shown: str,
) -> None:
    """Files and folders the child creates get the modes the umask option leaves."""
    url = archive_server.add("umask.tgz", app_archive(
        'web: mkdir "$OUT.dir" && touch "$OUT.file" && mv "$OUT.file" "$OUT" '
        "&& exec sleep 600\n"))
    out, folder = tmp_path / "made", tmp_path / "made.dir"
    document = await create(client, body(url, env={"OUT": str(out)}, umask=umask))
    assert document["options"]["umask"] == shown
    await eventually(out.exists, what="the child to create its file")
    assert out.stat().st_mode & 0o777 == file_mode
    assert folder.stat().st_mode & 0o777 == dir_mode


# -- stdin through the attach socket --------------------------------------------------------


async def test_stdin_round_trip_and_after_a_restart(
    client: Client, agent: Agent, archive_server: ArchiveServer
) -> None:
    """A text frame reaches the child's stdin as a line; after a restart control and after
    a crash, the new child has a new stdin that works too; binary frames are refused."""
    url = archive_server.add("probe.tgz", probe_app())
    await create(client, body(url, autostart=False))
    ws = await attach(client, agent, "myapp.web.0")
    await control(client, "start", "myapp.web.0")
    assert await frame_until(ws, "ready") == ["ready"]
    await ws.send_str("hello")
    assert await frame_until(ws, "got hello") == ["got hello"]
    await ws.send_str("two words  and spaces ")
    assert await frame_until(ws, "got two words  and spaces ") == ["got two words  and spaces "]
    await ws.send_bytes(b"hello")
    assert await frame_until(ws, NOT_TEXT) == [NOT_TEXT]

    await control(client, "restart", "myapp.web.0")
    assert await frame_until(ws, "ready") == ["ready"]
    await ws.send_str("again")
    assert await frame_until(ws, "got again") == ["got again"]

    watcher = agent.get("myapp.web.0")
    pid = watcher.pid
    await ws.send_str("quit")  # exits 3: the policy restarts it
    assert await frame_until(ws, "ready") == ["ready"]
    assert watcher.pid != pid
    await ws.send_str("third")
    assert await frame_until(ws, "got third") == ["got third"]
    await ws.close()


@pytest.mark.parametrize("how", ["stopped", "exited"])
async def test_input_without_a_child_gets_a_notice(
    client: Client, agent: Agent, archive_server: ArchiveServer, how: str
) -> None:
    """Input sent when no child runs (stopped, or exited for good) is answered with a
    notice frame, not lost silently."""
    url = archive_server.add("probe.tgz", probe_app())
    extra = {"restart": "never"} if how == "exited" else {}
    await create(client, body(url, **extra))
    watcher = agent.get("myapp.web.0")
    await wait_for_state(watcher, S.RUNNING)
    ws = await attach(client, agent, "myapp.web.0")
    if how == "stopped":
        await control(client, "stop", "myapp.web.0")
    else:
        await ws.send_str("quit")
        await wait_for_state(watcher, S.EXITED)
    await ws.send_str("hello")
    frames = await frame_until(ws, NOT_DELIVERED)
    assert frames[-1].startswith("[smartmob-agent] input not delivered")
    assert not any(frame.startswith("got ") for frame in frames)
    await ws.close()


async def test_input_a_child_does_not_read_gets_a_notice(
    client: Client, agent: Agent, archive_server: ArchiveServer
) -> None:
    """A child that never reads its stdin: once the pipe and the agent's bounded queue are
    full, further input is refused with a notice; the child is not disturbed."""
    url = archive_server.add("sleeper.tgz", app_archive("web: exec sleep 600\n"))
    await create(client, body(url))
    watcher = agent.get("myapp.web.0")
    await wait_for_state(watcher, S.RUNNING)
    ws = await attach(client, agent, "myapp.web.0")
    for _ in range(4):
        await ws.send_str("x" * 60_000)
    await ws.send_bytes(b"end")
    frames = await frame_until(ws, NOT_TEXT)
    assert NOT_DELIVERED in frames
    assert set(frames) == {NOT_DELIVERED, NOT_TEXT}
    assert watcher.state is S.RUNNING
    await ws.close()


CLOSES_STDIN = """
import os, signal
os.close(0)
print("stdin closed", flush=True)
signal.pause()
"""


async def test_input_to_a_closed_stdin_gets_a_notice(
    client: Client, agent: Agent, archive_server: ArchiveServer
) -> None:
    """A child that closed its stdin: the very first input sent is answered with a notice."""
    url = archive_server.add("closer.tgz", app_archive(
        "web: exec {PYTHON} closer.py\n", {"closer.py": CLOSES_STDIN}))
    await create(client, body(url, autostart=False))
    ws = await attach(client, agent, "myapp.web.0")
    await control(client, "start", "myapp.web.0")
    assert await frame_until(ws, "stdin closed") == ["stdin closed"]
    await ws.send_str("first")
    await ws.send_bytes(b"end")  # answered in order: marks the end of the answers
    assert await frame_until(ws, NOT_TEXT) == [NOT_DELIVERED, NOT_TEXT]
    await ws.close()
