"""A simple command replaces its shell (``exec``), so a signal reaches the program itself.

Debian's ``/bin/sh`` (dash) does not exec the last command of ``sh -c``: the shell stays
as the process's pid, and a ``signal`` control's SIGHUP killed it (the agent saw an exit
and restarted the app, although the app handled the signal). A simple command now runs
with ``exec`` in front; a command that needs its shell (a list, a pipe, a redirection, a
builtin, an assignment) keeps it, and still stops as a group.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from smartmob_agent.model import ProcessState as S
from smartmob_agent.processes.spawn import exec_command, shell_script
from smartmob_agent.supervision.agent import Agent
from tests.conftest import ArchiveServer
from tests.helpers import app_archive, eventually, pid_alive, wait_for_state

Client = TestClient[Any, Any]

#: Handles SIGHUP (says so, with its pid), prints its pid and first argument when ready.
HUP_APP = """
import os, signal, sys, time
signal.signal(signal.SIGHUP, lambda *_: os.write(1, b"got-HUP %d\\n" % os.getpid()))
os.write(1, b"ready %d %s\\n" % (os.getpid(), sys.argv[1].encode()))
while True:
    time.sleep(60)
"""


@pytest.mark.parametrize(("command", "expected"), [
    ("gunicorn -b :$PORT app:main", "exec gunicorn -b :$PORT app:main"),
    ("./server --name 'a b; c' \"x && y\"", "exec ./server --name 'a b; c' \"x && y\""),
    ("python -u app.py  # the web", "exec python -u app.py  # the web"),
    ("~/bin/serve *.conf", "exec ~/bin/serve *.conf"),
    ("exec serve", "exec serve"),
    ("migrate && serve", "migrate && serve"),
    ("serve || true", "serve || true"),
    ("a; b", "a; b"),
    ("a | b", "a | b"),
    ("serve &", "serve &"),
    ("serve > out.log 2>&1", "serve > out.log 2>&1"),
    ("serve < input", "serve < input"),
    ("(cd web && serve)", "(cd web && serve)"),
    ("serve $(cat args)", "serve $(cat args)"),
    ("serve `cat args`", "serve `cat args`"),
    ("first\nsecond", "first\nsecond"),
    ("exit 3", "exit 3"),
    ("kill -TERM $$", "kill -TERM $$"),
    ("trap '' HUP; serve", "trap '' HUP; serve"),
    ("echo hello", "echo hello"),
    ("if true; then serve; fi", "if true; then serve; fi"),
    ("{ serve; }", "{ serve; }"),
    ("! serve", "! serve"),
    ("DEBUG=1 serve", "DEBUG=1 serve"),
    ("serve 'unclosed", "serve 'unclosed"),
    ("", ""),
    ("   ", "   "),
])
def test_only_a_simple_command_gets_exec(command: str, expected: str) -> None:
    """A program and its arguments, whatever their quotes and expansions, get ``exec``;
    operators outside quotes, line breaks, builtins, reserved words, assignments and
    commands the shell cannot parse keep their shell."""
    assert exec_command(command) == expected


def test_the_shell_script_exits_unless_its_parent_is_the_agent() -> None:
    """The guard comes first, on the same line (the shell's error messages keep naming
    line 1), then the command."""
    assert shell_script("serve", 1234) == '[ "$PPID" = 1234 ] || exit 1; exec serve'
    assert shell_script("a && b", 7) == '[ "$PPID" = 7 ] || exit 1; a && b'


# -- on real processes, through the API ---------------------------------------------------


async def _post(client: Client, url: str, body: Any = None, status: int = 200) -> Any:
    response = await client.session.post(url, data=None if body is None else json.dumps(body))
    assert response.status == status, await response.text()
    return await response.json()


async def _create(client: Client, url: str) -> dict[str, Any]:
    index = await (await client.session.get(client.make_url("/"))).json()
    body = {"app": "myapp", "node": "web.0", "process_type": "web", "source_url": url}
    document: dict[str, Any] = await _post(client, index["create"], body, status=201)
    return document


async def _status(client: Client, document: dict[str, Any]) -> dict[str, Any]:
    status: dict[str, Any] = await (await client.session.get(document["details"])).json()
    return status


def _command_name(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as file:
        return file.read().strip()


def _lines(agent: Agent, slug: str, prefix: str) -> list[str]:
    lines = (line.decode(errors="replace") for line in agent.get(slug).hub.recent)
    return [line for line in lines if line.startswith(prefix)]


async def _line(agent: Agent, slug: str, prefix: str) -> str:
    await eventually(lambda: bool(_lines(agent, slug, prefix)), timeout=5.0,
                     what=f"a line starting with {prefix!r}")
    return _lines(agent, slug, prefix)[0]


async def test_a_handled_signal_reaches_the_app_and_restarts_nothing(
    client: Client, agent: Agent, archive_server: ArchiveServer
) -> None:
    """``signal`` HUP to a process whose command is a simple one: the app itself (its
    pid is the process's pid) handles it and goes on running, the pid stays and
    ``restarts`` stays 0. ``$PORT`` is still expanded by the shell that execs it."""
    url = archive_server.add("hup.tgz", app_archive(
        "web: {PYTHON} -u hup.py $PORT\n", {"hup.py": HUP_APP}))
    document = await _create(client, url)
    slug = document["slug"]
    await wait_for_state(agent.get(slug), S.RUNNING)
    _, pid, port = (await _line(agent, slug, "ready")).split()
    status = await _status(client, document)
    assert status["pid"] == int(pid)  # the app's own pid, no shell in between
    assert port == str(status["port"])

    signalled = await _post(client, document["signal"], {"signal": "HUP"})
    assert (signalled["state"], signalled["pid"]) == ("running", int(pid))
    assert await _line(agent, slug, "got-HUP") == f"got-HUP {pid}"
    await _post(client, document["signal"], {"signal": "HUP"})
    await eventually(lambda: len(_lines(agent, slug, "got-HUP")) == 2, timeout=5.0,
                     what="the second HUP")
    status = await _status(client, document)
    assert (status["state"], status["pid"], status["restarts"]) == ("running", int(pid), 0)
    assert status["exits"] == []
    assert pid_alive(int(pid))


async def test_a_compound_command_keeps_its_shell_and_stops_as_a_group(
    client: Client, agent: Agent, archive_server: ArchiveServer
) -> None:
    """A list (``&``, ``;``) runs in its shell, the process's pid, with both its
    programs in the shell's group; a stop ends the shell and both."""
    url = archive_server.add("pair.tgz", app_archive(
        "web: {PYTHON} -u hup.py one & {PYTHON} -u hup.py two; wait\n", {"hup.py": HUP_APP}))
    document = await _create(client, url)
    slug = document["slug"]
    await wait_for_state(agent.get(slug), S.RUNNING)
    first = int((await _line(agent, slug, "ready")).split()[1])
    await eventually(lambda: len(_lines(agent, slug, "ready")) == 2, timeout=5.0,
                     what="both programs ready")
    programs = [int(line.split()[1]) for line in _lines(agent, slug, "ready")]
    assert first in programs
    shell = (await _status(client, document))["pid"]
    assert shell not in programs
    assert _command_name(shell) in ("sh", "dash")
    assert all(os.getpgid(pid) == shell for pid in programs)

    stopped = await _post(client, document["stop"])
    assert stopped["state"] == "stopped"
    assert not any(map(pid_alive, [shell, *programs]))
