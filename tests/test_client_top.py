"""``smartmob top`` in a pseudo-terminal, and the shell completion scripts."""

from __future__ import annotations

import asyncio
import os
import pty
import re
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from smartmob_agent.client import AgentClient
from tests.agent_process import AgentProcess
from tests.client_apps import (
    SMARTMOB,
    cli_env,
    created_and_running,
    echo_archive,
    running_agent,
    smartmob,
    write_echo_app,
)
from tests.conftest import ArchiveServer

pytestmark = pytest.mark.timeout(120)
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[AgentProcess]:
    async with running_agent(tmp_path / "state") as agent:
        yield agent


@pytest.fixture
def env(tmp_path: Path, agent: AgentProcess) -> dict[str, str]:
    return cli_env(tmp_path / "home", SMARTMOB_URL=agent.url, TERM="xterm")


class Screen:
    """What a command writes to a pseudo-terminal, read as it comes."""

    def __init__(self, master: int) -> None:
        self.master = master
        self.text = ""

    async def until(self, predicate: object, timeout: float = 20.0) -> str:
        """Read until ``predicate(text read so far)`` holds; return the text."""
        assert callable(predicate)
        async with asyncio.timeout(timeout):
            while not predicate(self.text):
                chunk = await asyncio.to_thread(os.read, self.master, 65536)
                if not chunk:
                    raise AssertionError(f"the terminal closed; it showed {self.text!r}")
                self.text += chunk.decode(errors="replace")
        return self.text


async def test_top_draws_the_table_in_a_terminal_and_redraws_on_events(
    env: dict[str, str], agent: AgentProcess, archive_server: ArchiveServer,
) -> None:
    """On a terminal, top clears the screen and draws the table with coloured states;
    a stop is drawn at once (an event, not the 60 s interval); CTRL-C ends it with 0."""
    async with AgentClient(agent.url) as client:
        await created_and_running(client, archive_server.add("echo.tgz", echo_archive()))
        master, slave = pty.openpty()
        proc = await asyncio.create_subprocess_exec(
            *SMARTMOB, "top", "--interval", "60", env=env, stdin=slave, stdout=slave,
            stderr=slave)
        os.close(slave)
        screen = Screen(master)
        try:
            first = await screen.until(lambda text: "shop.web.0" in text)
            assert first.startswith("\x1b[H\x1b[2J")
            assert "\x1b[32mrunning\x1b[0m" in first  # green: a terminal gets colour
            plain = ANSI.sub("", first)
            assert "smartmob top - 1 agent(s), 1 process(es)" in plain
            assert re.search(r"SLUG +STATE +PID +UPTIME +RESTARTS +CPU +MEMORY", plain)
            await client.stop("shop.web.0")
            await screen.until(lambda text: "stopped" in ANSI.sub("", text[len(first):]))
            proc.send_signal(signal.SIGINT)
            async with asyncio.timeout(20):
                assert await proc.wait() == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            os.close(master)


async def in_terminal(*args: str, env: dict[str, str]) -> str:
    """Run ``smartmob ARGS`` on a pseudo-terminal to its end; what the terminal showed."""
    master, slave = pty.openpty()
    proc = await asyncio.create_subprocess_exec(*SMARTMOB, *args, env=env, stdin=slave,
                                                stdout=slave, stderr=slave)
    os.close(slave)
    shown = b""
    try:
        async with asyncio.timeout(30):
            while True:
                try:
                    chunk = await asyncio.to_thread(os.read, master, 65536)
                except OSError:  # EIO: every writer of the terminal closed it
                    break
                if not chunk:
                    break
                shown += chunk
            assert await proc.wait() == 0, shown
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        os.close(master)
    return shown.decode(errors="replace")


async def test_a_terminal_gets_colour_unless_no_color_is_set(
    env: dict[str, str], agent: AgentProcess, archive_server: ArchiveServer,
) -> None:
    """ls on a terminal colours the states; with NO_COLOR set (https://no-color.org) the
    same table comes without a single escape code."""
    async with AgentClient(agent.url) as client:
        await created_and_running(client, archive_server.add("echo.tgz", echo_archive()))
    coloured = await in_terminal("ls", env=env)
    assert "\x1b[32mrunning\x1b[0m" in coloured
    plain = await in_terminal("ls", env={**env, "NO_COLOR": "1"})
    assert "\x1b" not in plain
    assert "shop.web.0" in plain
    assert "running" in plain


async def test_deploy_shows_its_progress_on_a_terminal(
    env: dict[str, str], agent: AgentProcess, tmp_path: Path,
) -> None:
    """On a terminal, deploy shows how the packing goes and a progress bar of the
    upload, each rewritten in place and ending full (piped, it writes neither: see
    test_client_deploy)."""
    folder = write_echo_app(tmp_path / "shop")
    shown = await in_terminal("deploy", str(folder), "--app", "shop", "-p", "web=1", env=env)
    assert "\rpacking 2/2 files" in shown
    assert re.search(r"\r\[#{30}\] 100%", shown), shown
    assert "deployed shop: web=1" in shown


async def test_top_once_when_piped(env: dict[str, str], agent: AgentProcess) -> None:
    """Piped, top --once writes the table once, without screen codes, and ends."""
    ran = await smartmob("top", "--once", env=env)
    assert ran.code == 0
    assert "\x1b" not in ran.out
    assert ran.out.splitlines()[2].split() == [
        "SLUG", "STATE", "PID", "UPTIME", "RESTARTS", "CPU", "MEMORY"]


def complete(script: str, words: list[str], env: dict[str, str]) -> list[str]:
    """What the bash completion offers for ``words`` (the last is being typed)."""
    line = " ".join(f"'{word}'" for word in words)
    bash = (f'{script}\nCOMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; _smartmob; '
            'printf "%s\\n" "${COMPREPLY[@]}"')
    result = subprocess.run(["bash", "-c", bash], capture_output=True, text=True,
                            env=env, timeout=30, check=True)
    return sorted(filter(None, result.stdout.splitlines()))


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
async def test_bash_completion(env: dict[str, str], agent: AgentProcess,
                               archive_server: ArchiveServer, tmp_path: Path) -> None:
    """The bash script completes commands, each command's options, the slugs of the
    agent, agent names after --agent, and files for upload and after --file."""
    async with AgentClient(agent.url) as client:
        await client.create("shop", "web.0", archive_server.add("e.tgz", echo_archive()))
    ran = await smartmob("completion", "bash", env=env)
    assert ran.code == 0
    script = ran.out
    bin_dir = tmp_path / "bin"  # the script calls smartmob itself
    bin_dir.mkdir()
    (bin_dir / "smartmob").write_text(f"#!/bin/sh\nexec {' '.join(SMARTMOB)} \"$@\"\n")
    (bin_dir / "smartmob").chmod(0o755)
    env = {**env, "PATH": f"{bin_dir}:{env['PATH']}"}
    config = Path(env["HOME"]) / ".config" / "smartmob"
    config.mkdir(parents=True)
    (config / "agents.toml").write_text(f'[agents.prod]\nurl = "{agent.url}"\n')
    complete_ = await asyncio.to_thread(complete, script, ["smartmob", "st"], env)
    assert complete_ == ["start", "status", "stop"]
    assert await asyncio.to_thread(complete, script, ["smartmob", "logs", "--t"], env) == [
        "--tail", "--timeout"]
    assert await asyncio.to_thread(
        complete, script, ["smartmob", "--agent", "prod", "status", "sh"], env) == [
        "shop.web.0"]
    assert await asyncio.to_thread(complete, script, ["smartmob", "--agent", "p"], env) == [
        "prod"]
    (tmp_path / "shop-app").mkdir()
    offered = await asyncio.to_thread(
        complete, script, ["smartmob", "upload", str(tmp_path / "shop-")], env)
    assert offered == [str(tmp_path / "shop-app")]
    (tmp_path / "staging.toml").write_text("")
    offered = await asyncio.to_thread(
        complete, script, ["smartmob", "apply", "--file", str(tmp_path / "stag")], env)
    assert offered == [str(tmp_path / "staging.toml")]


async def test_zsh_completion_is_the_bash_one_through_bashcompinit(
    env: dict[str, str],
) -> None:
    """The zsh script loads bashcompinit, then defines the same function; zsh reads it
    without a syntax error (when zsh is installed)."""
    ran = await smartmob("completion", "zsh", env=env)
    assert ran.code == 0
    assert "bashcompinit" in ran.out
    assert "complete -F _smartmob smartmob" in ran.out
    if shutil.which("zsh"):
        checked = await asyncio.to_thread(
            subprocess.run, ["zsh", "-n"], input=ran.out, text=True, capture_output=True,
            check=False)
        assert checked.returncode == 0, checked.stderr
