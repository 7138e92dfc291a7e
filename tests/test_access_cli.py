"""Access control through the real ``smartmob-agent`` command: the refusal to listen
beyond loopback without a key, TLS, key files, and keys kept out of logs and children."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import trustme

from tests.agent_process import AgentProcess
from tests.conftest import ArchiveServer
from tests.helpers import app_archive, eventually

KEY = "cli-admin-key-0123456789abcdef"


async def run_to_exit(state: Path, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "smartmob_agent", "--port", "0", "--state-dir", str(state),
        *args, stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(20):
        _, stderr = await proc.communicate()
    return proc.returncode or 0, stderr.decode()


async def test_it_refuses_a_non_loopback_address_without_a_key(tmp_path: Path) -> None:
    code, stderr = await run_to_exit(tmp_path / "s", "--host", "0.0.0.0")
    assert code == 2
    assert "refusing to listen on 0.0.0.0 without a key" in stderr
    assert "Traceback" not in stderr
    assert stderr.count("\n") == 1  # one line, no traceback


async def test_insecure_listens_and_warns_loudly(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    agent = AgentProcess(tmp_path / "s", ["--host", "0.0.0.0", "--insecure"])
    try:
        await agent.start()
        assert "INSECURE" in agent.stderr
        port = agent.url.rsplit(":", 1)[1]
        async with http.get(f"http://127.0.0.1:{port}/") as response:
            assert response.status == 200
    finally:
        await agent.kill()


async def test_a_key_file_and_a_bad_key_file(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"{KEY}\n")
    agent = AgentProcess(tmp_path / "s", ["--token-file", str(keys)])
    try:
        await agent.start()
        async with http.get(agent.url + "/") as response:
            assert response.status == 401
        async with http.get(agent.url + "/", headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status == 200
    finally:
        await agent.kill()
    keys.write_text("too-short\n")
    code, stderr = await run_to_exit(tmp_path / "s2", "--token-file", str(keys))
    assert code == 2
    assert f"{keys} line 1" in stderr
    assert "too-short" not in stderr


async def test_keys_stay_out_of_the_log_and_of_children(
    tmp_path: Path, http: aiohttp.ClientSession, archive_server: ArchiveServer
) -> None:
    """The key given by variable is not in a child's environment, and one passed in a
    WebSocket URL is not in the (debug) access log."""
    env_key = "env-admin-key-0123456789abcdef"
    env = {**os.environ, "SMARTMOB_TOKEN": env_key}
    agent = AgentProcess(tmp_path / "s", ["--log-level", "debug"], env=env)
    url = archive_server.add("env.tar.gz", app_archive(
        "web: env; echo done; exec sleep 1000\n"
    ))
    headers = {"Authorization": f"Bearer {env_key}"}
    try:
        await agent.start()
        body = {"app": "sec", "node": "web.0", "process_type": "web", "source_url": url}
        async with http.post(agent.url + "/create-process", json=body, headers=headers) as r:
            assert r.status == 201, await r.text()
            logs = (await r.json())["logs"]
        lines: list[str] = []

        async def read_done() -> bool:
            async with http.get(logs, headers=headers) as response:
                lines[:] = [entry["line"] for entry in await response.json()]
            return "done" in lines

        for _ in range(300):  # 15 s at most: the output log has no event to wait on
            if await read_done():
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"the child's environment never showed up: {lines}")
        assert any(line.startswith("PATH=") for line in lines)
        assert not any("SMARTMOB_TOKEN" in line or env_key in line for line in lines)
        ws_url = agent.url.replace("http", "ws") + f"/events?token={env_key}"
        async with http.ws_connect(ws_url) as ws:
            assert not ws.closed
        await eventually(lambda: "/events?token=" in agent.stderr, what="the access log line")
        assert env_key not in agent.stderr
        # the agent-log link shows the same line, redacted too
        async with http.get(agent.url + "/agent-log?tail=10000", headers=headers) as r:
            kept = [entry["line"] for entry in await r.json()]
        assert any("/events?token=[hidden]" in line for line in kept), kept[-5:]
        assert not any(env_key in line for line in kept)
    finally:
        await agent.kill()


async def test_tls_serves_https_and_links_say_https_and_wss(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    certificate.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    certificate.private_key_pem.write_to_path(str(key_file))
    agent = AgentProcess(
        tmp_path / "s", ["--tls-cert", str(cert_file), "--tls-key", str(key_file)]
    )
    client_context = ssl.create_default_context()
    authority.configure_trust(client_context)
    try:
        await agent.start()
        assert agent.url.startswith("https://127.0.0.1:")
        async with http.get(agent.url + "/", ssl=client_context) as response:
            index = await response.json()
        assert index["list"].startswith("https://")
        assert index["events"].startswith("wss://")
        async with http.ws_connect(index["events"], ssl=client_context) as ws:
            assert not ws.closed
        plain = agent.url.replace("https://", "http://") + "/"
        with pytest.raises(aiohttp.ClientError):
            async with http.get(plain) as response:
                await response.read()
    finally:
        await agent.kill()


async def test_a_bad_certificate_is_one_line(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("not a certificate\n")
    code, stderr = await run_to_exit(
        tmp_path / "s", "--tls-cert", str(bogus), "--tls-key", str(bogus)
    )
    assert code == 2
    assert "cannot use the TLS certificate" in stderr
    assert "Traceback" not in stderr
    code, stderr = await run_to_exit(tmp_path / "s", "--tls-cert", str(bogus))
    assert code == 2
    assert "--tls-key" in stderr


def test_the_agent_can_make_itself_undumpable() -> None:
    """make_undumpable() (called first thing by serve) clears the process's dumpable flag,
    which is what keeps processes of the same user (its children) from reading its
    /proc/<pid>/environ, where SMARTMOB_TOKEN may be."""
    script = (
        "import ctypes; from smartmob_agent.cli import make_undumpable\n"
        "libc = ctypes.CDLL(None)\n"
        "before = libc.prctl(3, 0, 0, 0, 0)\n"  # PR_GET_DUMPABLE
        "print(before, make_undumpable(), libc.prctl(3, 0, 0, 0, 0))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=30, check=True)
    assert result.stdout.split() == ["1", "True", "0"]


async def test_keys_on_the_command_line_are_warned_about(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path / "s", ["--token", KEY])
    try:
        await agent.start()
        assert "can be read by every user of this machine in the process list" in agent.stderr
        assert KEY not in agent.stderr
    finally:
        await agent.kill()
