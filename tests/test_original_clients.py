"""The original project's own clients, as their users run them, against the real agent.

gitmesh-deploy's ``post_receive`` hook archives a git push, uploads the archive, GETs the
agent's index and POSTs its ``create`` link with an ``X-Request-Id`` header, and asserts
that the same id comes back on every answer. When its own request id is unset it sends
``?``; people send sentences.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.agent_process import AgentProcess
from tests.conftest import ArchiveServer

#: The ids gitmesh-deploy's users send (the first when its own id is unset).
IDS = ("?", "MY-REQUEST-ID", str(uuid.uuid4()), "My very own request ID!")

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="needs the git command")


@pytest.fixture
async def agent_process(tmp_path: Path) -> AsyncIterator[AgentProcess]:
    process = await AgentProcess(tmp_path / "state").start()
    yield process
    await process.kill()


def git_archive(tmp_path: Path) -> bytes:
    """A pushed repository as gitmesh-deploy archives it: ``git archive`` of the pushed
    commit to a ``.zip`` file (git picks the zip format from the name)."""
    repo = tmp_path / "repo"
    repo.mkdir(parents=True)
    (repo / "Procfile").write_text("web: echo hello from git; sleep 1000\n")

    def run(*args: str) -> bytes:
        return subprocess.run(
            ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.org",
             *args],
            check=True, capture_output=True, timeout=30,
        ).stdout

    run("init", "-q")
    run("add", "Procfile")
    run("commit", "-q", "-m", "first push")
    output = tmp_path / "push.zip"
    run("archive", "HEAD", f"--output={output}")
    return output.read_bytes()


@needs_git
@pytest.mark.parametrize("request_id", IDS)
async def test_gitmesh_deploy_flow_echoes_its_request_id(
    tmp_path: Path, agent_process: AgentProcess, archive_server: ArchiveServer,
    http: aiohttp.ClientSession, request_id: str,
) -> None:
    """The hook's steps and headers: git archive (zip) -> PUT to the storage -> GET the
    index -> POST its create link (node "1", empty env): every answer echoes the id, and
    the agent's download of the archive carries it."""
    source_url = archive_server.url("push.zip")
    async with http.put(source_url, data=git_archive(tmp_path), headers={
        "Content-Type": "application/zip", "X-Request-Id": request_id,
    }) as response:
        assert response.status in (201, 204)

    headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
    async with http.get(agent_process.url + "/", headers=headers) as response:
        assert response.status == 200
        assert response.headers["X-Request-Id"] == request_id
        links = await response.json()
    body = {"app": "gitmesh", "node": "1", "source_url": source_url, "process_type": "web",
            "env": {}}
    async with http.post(links["create"], data=json.dumps(body), headers=headers) as response:
        assert response.status == 201, await response.text()
        assert response.headers["X-Request-Id"] == request_id
        details = (await response.json())["details"]

    async with asyncio.timeout(15):
        while True:
            async with http.get(details, headers=headers) as response:
                assert response.headers["X-Request-Id"] == request_id
                status = await response.json()
            if status["state"] == "running":
                break
            assert status["state"] != "failed", status
            await asyncio.sleep(0.02)
    downloads = [r for r in archive_server.requests
                 if r.method == "GET" and r.path == "/push.zip"]
    assert [r.headers.get("X-Request-Id") for r in downloads] == [request_id]

    # the upload link answers the same way, for a hook that uploads to the agent itself
    async with http.post(links["upload"], data=git_archive(tmp_path / "again"),
                         headers={"X-Request-Id": request_id}) as response:
        assert response.status == 201, await response.text()
        assert response.headers["X-Request-Id"] == request_id


async def raw_request_id(url: str, value: bytes) -> str | None:
    """GET / with ``X-Request-Id: <value>`` sent byte for byte (a client library would
    refuse to send some of these); return the id the agent answered, or ``None`` when the
    HTTP parser refused the request as malformed (then nothing of it is echoed)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                     b"X-Request-Id: " + value + b"\r\n\r\n")
        async with asyncio.timeout(10):
            answer = await reader.read()
    finally:
        writer.close()
    head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    if head.startswith("HTTP/1.0 400") or head.startswith("HTTP/1.1 400"):
        assert value.decode("latin-1") not in head
        return None
    assert head.startswith("HTTP/1.1 200"), head
    [echoed] = [line.split(":", 1)[1].strip() for line in head.split("\r\n")[1:]
                if line.lower().startswith("x-request-id:")]
    return echoed


@pytest.mark.parametrize("value", [
    b"",                        # empty
    b"x" * 201,                 # too long
    b"tab\there",               # a control character
    b"caf\xc3\xa9",             # non-ASCII (UTF-8)
    b"fake\x7fdelete",          # DEL
])
async def test_hostile_request_ids_are_replaced(
    agent_process: AgentProcess, value: bytes
) -> None:
    """Ids that are empty, too long or hold control or non-ASCII bytes get a fresh id,
    so an id can never forge a header or a log line."""
    echoed = await raw_request_id(agent_process.url, value)
    if echoed is None:  # refused by the HTTP parser before any handler: nothing echoed
        assert value, "an empty id is a valid header: it must reach the agent"
        return
    assert echoed != value.decode("latin-1")
    assert len(echoed) == 32
    assert all(c in "0123456789abcdef" for c in echoed)


async def test_the_longest_printable_id_is_echoed(agent_process: AgentProcess) -> None:
    """200 printable characters, spaces and punctuation included, come back as sent."""
    value = (b"a ?!\"#$%&'()*+,-./:;<=>@[\\]^_`{|}~" * 7)[:200]
    assert await raw_request_id(agent_process.url, value) == value.decode()


async def index_by_name(
    http: aiohttp.ClientSession, agent: AgentProcess, host: str
) -> tuple[int, dict[str, str]]:
    """GET / with ``Host: <host>``, as a client that reaches the agent by that name."""
    async with http.get(agent.url + "/", headers={"Host": host}) as response:
        return response.status, await response.json()


async def test_a_service_name_is_answered_with_allow_host(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """smartmob-demo's docker-compose reaches the agent as http://smartmob-agent/: with
    --allow-host it answers, and its links are built from that name."""
    agent = await AgentProcess(
        tmp_path / "state", ["--allow-host", "smartmob-agent", "--allow-host", "*.example.org"]
    ).start()
    try:
        status, links = await index_by_name(http, agent, "smartmob-agent")
        assert status == 200, links
        assert links["list"] == "http://smartmob-agent/list-processes"
        status, links = await index_by_name(http, agent, "Agent-7.Fleet.Example.org:8080")
        assert status == 200, links
        assert links["list"] == "http://agent-7.fleet.example.org:8080/list-processes"
        for refused in ("example.org", "smartmob-agent.evil.test", "evil-example.org"):
            status, error = await index_by_name(http, agent, refused)
            assert status == 403, (refused, error)
    finally:
        await agent.kill()


async def test_without_allow_host_the_refusal_names_the_flag(
    agent_process: AgentProcess, http: aiohttp.ClientSession
) -> None:
    """The guard against DNS rebinding stays; its 403 says which flag lets the name in."""
    status, error = await index_by_name(http, agent_process, "smartmob-agent")
    assert status == 403
    assert "--allow-host smartmob-agent" in error["error"]


async def test_allow_host_from_the_environment(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """SMARTMOB_ALLOW_HOST takes names separated by spaces."""
    env = {**os.environ, "SMARTMOB_ALLOW_HOST": "smartmob-agent agent.internal"}
    agent = await AgentProcess(tmp_path / "state", env=env).start()
    try:
        for name in ("smartmob-agent", "agent.internal"):
            status, _ = await index_by_name(http, agent, name)
            assert status == 200, name
    finally:
        await agent.kill()


@pytest.mark.parametrize("value", ["http://smartmob-agent", "agent:8080", "*", "a b", ""])
def test_a_bad_allow_host_stops_the_agent_at_start(tmp_path: Path, value: str) -> None:
    """A value that is not a host name (or *.domain) is a usage error (exit status 2)."""
    result = subprocess.run(
        [sys.executable, "-m", "smartmob_agent", "--state-dir", str(tmp_path / "s"),
         "--port", "0", "--allow-host", value],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "--allow-host" in result.stderr
