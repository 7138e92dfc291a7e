"""Supervision options and controls on real processes, through the HTTP API.

Restart policies and exit codes, ``max_restarts`` and the crash-loop diagnosis fields,
backoff growth and its reset by ``start``, ``stop_signal`` and ``stop_timeout``, the
``start``/``stop``/``restart``/``signal`` controls, ``autostart: false`` and the bulk
routes. Each test drives the agent with HTTP requests that follow the links of the index
and the status documents, and waits for the states it expects on the watcher's own
state-change events (never on a guessed sleep).
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from smartmob_agent.model import ProcessState as S
from smartmob_agent.supervision.agent import Agent
from smartmob_agent.supervision.watcher import Watcher
from tests.conftest import ArchiveServer
from tests.helpers import app_archive, eventually, pid_alive, wait_for_state

Client = TestClient[Any, Any]

#: Prints ready with its pid, then exits with code 0 on SIGTERM.
WAIT_TERM = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("ready", os.getpid(), flush=True)
while True:
    time.sleep(60)
"""

#: Ignores SIGTERM; exits with code 0 on SIGINT.
INT_NOT_TERM = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
print("ready", os.getpid(), flush=True)
while True:
    time.sleep(60)
"""

#: Reports whether the grandchild of the previous run still lives, then starts a
#: grandchild that takes 0.4 s to exit after SIGTERM. Dies at once on SIGTERM itself.
#: Lines that may be written while another process writes to the same pipe go out in one
#: ``os.write`` each (``print`` may split a line into several writes).
PARENT = """
import os, signal, subprocess, sys

def alive(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            return file.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False

previous = open("grandchild.pid").read().strip() if os.path.exists("grandchild.pid") else ""
state = "alive" if previous and alive(int(previous)) else "gone"
print("previous-grandchild", previous or "-", state, flush=True)
subprocess.Popen([sys.executable, "-u", "slow.py"])
os.write(1, b"parent %d\\n" % os.getpid())
while True:
    signal.pause()
"""

SLOW = """
import os, signal, sys, time

def on_term(*_):
    time.sleep(0.4)
    sys.exit(0)

signal.signal(signal.SIGTERM, on_term)
with open("grandchild.pid", "w") as file:
    file.write(str(os.getpid()))
os.write(1, b"grandchild %d\\n" % os.getpid())
while True:
    time.sleep(60)
"""

#: A background job of a shell; with the argument ``setsid`` it leaves the shell's group.
HUP = """
import os, signal, sys, time
if "setsid" in sys.argv:
    os.setsid()
signal.signal(signal.SIGHUP, lambda *_: os.write(1, b"grandchild-got-HUP %d\\n" % os.getpid()))
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
os.write(1, b"ready %d %d\\n" % (os.getpid(), os.getpgid(0)))
while True:
    time.sleep(60)
"""

#: Counts its runs in a file, prints one line on each stream, exits with code 4.
COUNTED_CRASH = (
    'n=$(cat runs 2>/dev/null || echo 0); n=$((n+1)); echo $n > runs; '
    'echo "run $n out"; echo "run $n err" >&2; exit 4'
)


# -- helpers ------------------------------------------------------------------------------


class Output:
    """A hub subscriber that keeps every line of a process (those already in its backlog
    included) and lets a test await the n-th line that starts with a prefix."""

    def __init__(self, watcher: Watcher) -> None:
        self.lines = [line.decode(errors="replace") for line in watcher.hub.recent]
        self._changed = asyncio.Event()
        watcher.hub.subscribe(self)

    def send_lines(self, stream: str, lines: list[bytes]) -> None:
        self.lines.extend(line.decode(errors="replace") for line in lines)
        self._changed.set()

    def close(self) -> None:
        self._changed.set()

    def starting(self, prefix: str) -> list[str]:
        """Every line so far that starts with ``prefix``."""
        return [line for line in self.lines if line.startswith(prefix)]

    async def nth(self, prefix: str, n: int = 1, timeout: float = 5.0) -> str:
        """Wait for the ``n``-th line starting with ``prefix``; return it."""
        try:
            async with asyncio.timeout(timeout):
                while len(self.starting(prefix)) < n:
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(
                f"no {n} line(s) starting with {prefix!r} within {timeout} s: {self.lines}"
            ) from None
        return self.starting(prefix)[n - 1]


async def get_json(client: Client, url: str, status: int = 200) -> Any:
    response = await client.session.get(url)
    assert response.status == status, await response.text()
    return await response.json()


async def index(client: Client) -> dict[str, str]:
    document: dict[str, str] = await get_json(client, str(client.make_url("/")))
    return document


async def post(client: Client, url: str, body: Any = None, status: int = 200) -> Any:
    """POST ``body`` as JSON (nothing for ``None``); check the status; return the JSON."""
    data = None if body is None else json.dumps(body)
    response = await client.session.post(url, data=data)
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    return await response.json()


async def create(
    client: Client, url: str, *, app: str = "myapp", node: str = "web.0", **options: Any
) -> dict[str, Any]:
    """Create a ``web`` process from ``url`` with these options; its 201 document."""
    body = {"app": app, "node": node, "process_type": "web", "source_url": url, **options}
    document: dict[str, Any] = await post(
        client, (await index(client))["create"], body, status=201
    )
    return document


async def status_of(client: Client, document: dict[str, Any]) -> dict[str, Any]:
    """The current status document of a process, through its ``details`` link."""
    status: dict[str, Any] = await get_json(client, document["details"])
    return status


async def control(
    client: Client, document: dict[str, Any], relation: str, body: Any = None,
    status: int = 200,
) -> dict[str, Any]:
    """POST to the ``relation`` link of a status document (empty body unless given)."""
    answer: dict[str, Any] = await post(client, document[relation], body, status)
    return answer


def serve(archive_server: ArchiveServer, procfile: str, name: str = "app.tgz",
          **scripts: str) -> str:
    """Serve an app with this Procfile and these scripts (name without ``.py``)."""
    files = {f"{script}.py": text for script, text in scripts.items()}
    return archive_server.add(name, app_archive(procfile, files))


def at(stamp: str) -> float:
    """The epoch seconds of an ISO 8601 time of the API."""
    return datetime.fromisoformat(stamp).timestamp()


async def running_pid(agent: Agent, client: Client, document: dict[str, Any]) -> int:
    """Wait until the process runs; the pid its status document shows."""
    await wait_for_state(agent.get(document["slug"]), S.RUNNING)
    pid = (await status_of(client, document))["pid"]
    assert isinstance(pid, int)
    return pid


async def gone(*pids: int) -> None:
    """Wait (2 s at most) until none of ``pids`` is alive; zombies count as gone."""
    await eventually(lambda: not any(map(pid_alive, pids)), timeout=2.0,
                     what=f"the end of {pids}")


# -- restart policies ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "command", "state", "code", "signal"),
    [
        ({"restart": "on-failure"}, "exit 0", "exited", 0, None),
        ({"restart": "on-failure"}, "exit 3", "backoff", 3, None),
        ({"restart": "on-failure", "exit_codes": [0, 3]}, "exit 3", "exited", 3, None),
        ({"restart": "on-failure", "exit_codes": [3]}, "exit 0", "backoff", 0, None),
        ({"restart": "on-failure", "exit_codes": [0, 15]}, "kill -TERM $$", "backoff",
         -15, "SIGTERM"),
        ({"restart": "always"}, "exit 0", "backoff", 0, None),
        ({}, "exit 0", "backoff", 0, None),
        ({"restart": "never"}, "exit 3", "exited", 3, None),
        ({"restart": "never"}, "kill -TERM $$", "exited", -15, "SIGTERM"),
    ],
    ids=[
        "on-failure-clean", "on-failure-code-3", "on-failure-custom-clean",
        "on-failure-0-not-listed", "on-failure-signal", "always-clean", "default-is-always",
        "never-code-3", "never-signal",
    ],
)
async def test_restart_policy_and_exit_codes_decide_exited_or_backoff(
    client: Client, agent: Agent, archive_server: ArchiveServer,
    options: dict[str, Any], command: str, state: str, code: int, signal: str | None,
) -> None:
    """A quick exit ends in ``exited`` (no restart) or ``backoff`` (a restart is due) as
    ``restart`` and ``exit_codes`` say: on-failure restarts only codes not listed and any
    death by a signal (even one whose number is listed), always restarts clean exits too,
    never restarts nothing; ``last_exit`` says how the child ended."""
    url = serve(archive_server, f"web: {command}\n")
    # a long backoff keeps a restarting process in backoff while the test looks at it
    document = await create(client, url, backoff={"initial": 30, "max": 30}, **options)
    await wait_for_state(agent.get(document["slug"]), S.EXITED, S.BACKOFF)

    status = await status_of(client, document)
    assert status["state"] == state
    assert status["error"] is None
    assert status["pid"] is None
    assert status["restarts"] == (1 if state == "backoff" else 0)
    last = status["last_exit"]
    assert (last["code"], last["signal"], last["reason"]) == (code, signal, None)
    assert 0 <= last["ran_for"] < 1
    assert status["exits"] == [last]
    echoed = status["options"]
    assert echoed["restart"] == options.get("restart", "always")
    assert echoed["exit_codes"] == sorted(options.get("exit_codes", [0]))


async def test_exited_process_stays_exited_until_started(
    client: Client, agent: Agent, archive_server: ArchiveServer
) -> None:
    """An exited process is not restarted by itself; ``start`` runs it again."""
    url = serve(archive_server, "web: echo hello; exit 0\n")
    document = await create(client, url, restart="on-failure")
    watcher = agent.get(document["slug"])
    await wait_for_state(watcher, S.EXITED)
    output = Output(watcher)
    await asyncio.sleep(0.2)  # proves a negative: nothing happens by itself
    status = await status_of(client, document)
    assert (status["state"], status["restarts"], len(status["exits"])) == ("exited", 0, 1)
    assert status["output_tail"] == ["hello"]

    started = await control(client, document, "start")
    assert started["state"] == "starting"
    await output.nth("hello")
    await wait_for_state(watcher, S.EXITED)
    assert len((await status_of(client, document))["exits"]) == 2


# -- max_restarts and the crash-loop diagnosis ------------------------------------------


@pytest.mark.parametrize(("max_restarts", "runs"), [(0, 1), (2, 3), (11, 12)])
async def test_max_restarts_fails_with_the_reason_and_a_diagnosis(
    client: Client, agent: Agent, archive_server: ArchiveServer, max_restarts: int, runs: int
) -> None:
    """A crash loop fails after ``max_restarts + 1`` failed starts in a row (so 0 gives up
    after the first), with the reason in ``error``, the last exits (at most 10) in
    ``exits`` and the last lines printed (both streams) in ``output_tail``."""
    url = serve(archive_server, f"web: {COUNTED_CRASH}\n")
    document = await create(client, url, max_restarts=max_restarts,
                            backoff={"initial": 0.01, "max": 0.01})
    await wait_for_state(agent.get(document["slug"]), S.FAILED)

    status = await status_of(client, document)
    assert status["state"] == "failed"
    assert status["error"] == (
        f"gave up after {runs} failed start(s) in a row (runs shorter than 1 s; "
        f"max_restarts is {max_restarts}); the last one exited with code 4"
    )
    assert status["restarts"] == runs - 1
    assert status["pid"] is None
    assert status["backoff_delay"] is None
    assert status["next_start_at"] is None
    assert len(status["exits"]) == min(runs, 10)
    assert status["last_exit"] == status["exits"][-1]
    for record in status["exits"]:
        assert (record["code"], record["signal"], record["reason"]) == (4, None, None)
        assert record["ran_for"] < 1
    moments = [at(record["at"]) for record in status["exits"]]
    assert moments == sorted(moments)
    tail = status["output_tail"]
    assert len(tail) == min(2 * runs, 10)
    assert {f"run {runs} out", f"run {runs} err"} <= set(tail)
    assert status["options"]["max_restarts"] == max_restarts


async def test_backoff_shows_its_delay_next_start_and_output(
    client: Client, agent: Agent, archive_server: ArchiveServer
) -> None:
    """In backoff, the status document says how long the wait is, when the next start is
    due (the delay less at most 25% of jitter), how the child ended and what it printed;
    a running process shows none of that."""
    url = serve(archive_server, f"web: {COUNTED_CRASH}\n")
    document = await create(client, url, backoff={"initial": 20, "max": 60})
    watcher = agent.get(document["slug"])
    await wait_for_state(watcher, S.BACKOFF)

    before = time.time()
    status = await status_of(client, document)
    assert status["state"] == "backoff"
    assert status["backoff_delay"] == 20
    wait = at(status["next_start_at"]) - before
    assert 20 * 0.75 - 0.5 <= wait <= 20, status["next_start_at"]
    assert status["restarts"] == 1
    assert status["error"] is None
    assert status["pid"] is None
    assert status["last_exit"]["code"] == 4
    assert sorted(status["output_tail"]) == ["run 1 err", "run 1 out"]
    answer = await control(client, document, "signal", {"signal": "HUP"}, status=409)
    assert "backoff" in answer["error"]


async def test_running_process_has_no_crash_diagnosis(
    client: Client, agent: Agent, archive_server: ArchiveServer
) -> None:
    """While running, ``backoff_delay``, ``next_start_at`` and ``output_tail`` are empty,
    and ``pid``, ``started_at`` and ``uptime`` are set."""
    url = serve(archive_server, "web: exec {PYTHON} -u app.py\n", app=WAIT_TERM)
    document = await create(client, url)
    watcher = agent.get(document["slug"])
    output = Output(watcher)
    await output.nth("ready")
    status = await status_of(client, document)
    assert status["state"] == "running"
    assert (status["backoff_delay"], status["next_start_at"]) == (None, None)
    assert status["output_tail"] == []
    assert status["pid"] == int((await output.nth("ready")).split()[1])
    assert abs(at(status["started_at"]) - time.time()) < 5
    assert 0 <= status["uptime"] < 5


# -- backoff ----------------------------------------------------------------------------


async def test_backoff_doubles_up_to_its_maximum(
    client: Client, agent: Agent, archive_server: ArchiveServer
) -> None:
    """Each quick exit doubles the backoff delay, from ``initial`` up to ``max``, and the
    wait in backoff lasts the delay less at most 25% of it; an ``initial`` under 0.1 s
    is raised to 0.1 s, and the status document says so."""
    url = serve(archive_server, "web: exit 1\n")
    document = await create(client, url, backoff={"initial": 0.05, "max": 0.3})
    watcher = agent.get(document["slug"])
    delays: list[float] = []
    entered: list[float] = []
    left: list[float] = []

    def listener(w: Watcher, old: S, new: S) -> None:
        if new is S.BACKOFF:
            delays.append(w.info().backoff_delay or 0.0)
            entered.append(time.monotonic())
        elif old is S.BACKOFF:
            left.append(time.monotonic())

    watcher.add_listener(listener)
    await eventually(lambda: len(left) >= 5, timeout=5.0, what="five backoffs")
    watcher.remove_listener(listener)

    assert delays[:5] == pytest.approx([0.1, 0.2, 0.3, 0.3, 0.3])
    for delay, start, end in zip(delays[:5], entered, left, strict=False):
        assert max(delay * 0.75, 0.1) - 0.01 <= end - start < delay + 0.5
    assert (await status_of(client, document))["options"]["backoff"] == {
        "initial": 0.1, "max": 0.3,
    }


async def test_start_in_backoff_starts_now_and_resets_the_delay(
    client: Client, agent: Agent, archive_server: ArchiveServer
) -> None:
    """``start`` on a process in backoff starts it at once instead of waiting out the
    delay, and the next quick exit waits the initial delay again, not a doubled one."""
    url = serve(archive_server, f"web: {COUNTED_CRASH}\n")
    document = await create(client, url, backoff={"initial": 20, "max": 60})
    watcher = agent.get(document["slug"])
    await wait_for_state(watcher, S.BACKOFF)
    assert (await status_of(client, document))["backoff_delay"] == 20

    asked = time.monotonic()
    await control(client, document, "start")
    await eventually(lambda: watcher.state is S.BACKOFF and watcher.restarts == 2,
                     timeout=5.0, what="the second backoff")
    assert time.monotonic() - asked < 5  # not the 15 to 20 s of the delay

    status = await status_of(client, document)
    assert status["backoff_delay"] == 20  # not 40: start reset the series
    assert [record["code"] for record in status["exits"]] == [4, 4]
    assert sorted(status["output_tail"])[-2:] == ["run 2 err", "run 2 out"]


async def test_start_in_backoff_answers_starting(
    client: Client, agent: Agent, archive_server: ArchiveServer
) -> None:
    """The answer to ``start`` on a process in backoff says what happens: it is starting
    now, with no backoff delay nor next start time left over from the wait it cut short."""
    url = serve(archive_server, f"web: {COUNTED_CRASH}\n")
    document = await create(client, url, backoff={"initial": 20, "max": 60})
    await wait_for_state(agent.get(document["slug"]), S.BACKOFF)

    answer = await control(client, document, "start")
    assert (answer["state"], answer["backoff_delay"], answer["next_start_at"]) == (
        "starting", None, None,
    )


async def test_start_on_a_failed_process_counts_failed_starts_afresh(
    client: Client, agent: Agent, archive_server: ArchiveServer
) -> None:
    """``start`` on a process that gave up (max_restarts) runs it again with its error
    cleared and a fresh count of failed starts: it gives up again after as many runs."""
    url = serve(archive_server, f"web: {COUNTED_CRASH}\n")
    document = await create(client, url, max_restarts=1,
                            backoff={"initial": 0.01, "max": 0.01})
    watcher = agent.get(document["slug"])
    await wait_for_state(watcher, S.FAILED)
    assert "gave up after 2 failed start(s)" in (await status_of(client, document))["error"]

    started = await control(client, document, "start")
    assert (started["state"], started["error"]) == ("starting", None)
    await wait_for_state(watcher, S.FAILED)

    status = await status_of(client, document)
    assert status["error"].startswith("gave up after 2 failed start(s)")
    assert len(status["exits"]) == 4
    assert {"run 4 out", "run 4 err"} <= set(status["output_tail"])


async def test_a_run_longer_than_start_seconds_is_not_a_failed_start(
    client: Client, agent: Agent, archive_server: ArchiveServer
) -> None:
    """A run that lasts ``start_seconds`` or more restarts at once, without backoff, and
    never counts towards ``max_restarts``."""
    url = serve(archive_server, "web: sleep 0.15; exit 1\n")
    document = await create(client, url, start_seconds=0.1, max_restarts=0)
    watcher = agent.get(document["slug"])
    seen: list[S] = []
    watcher.add_listener(lambda w, old, new: seen.append(new))
    await eventually(lambda: watcher.restarts >= 3, timeout=5.0, what="three restarts")

    assert S.BACKOFF not in seen
    assert S.FAILED not in seen
    status = await status_of(client, document)
    assert status["state"] in ("starting", "running")
    assert all(record["ran_for"] >= 0.1 for record in status["exits"])


# -- the stop sequence -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("stop_signal", "stop_timeout", "code", "signal"),
    [("INT", 3, 0, None), ("TERM", 0.3, -9, "SIGKILL")],
    ids=["INT-honoured", "TERM-ignored-then-SIGKILL"],
)
async def test_stop_signal_and_stop_timeout(
    client: Client, agent: Agent, archive_server: ArchiveServer,
    stop_signal: str, stop_timeout: float, code: int, signal: str | None,
) -> None:
    """A child that ignores SIGTERM but exits on SIGINT stops at once with stop_signal INT;
    with TERM it is killed by SIGKILL once stop_timeout has passed."""
    url = serve(archive_server, "web: exec {PYTHON} -u app.py\n", app=INT_NOT_TERM)
    document = await create(client, url, stop_signal=stop_signal, stop_timeout=stop_timeout)
    output = Output(agent.get(document["slug"]))
    pid = int((await output.nth("ready")).split()[1])

    started = time.monotonic()
    stopped = await control(client, document, "stop")
    took = time.monotonic() - started

    if signal == "SIGKILL":
        assert stop_timeout <= took < stop_timeout + 2
    else:
        assert took < 1.5  # far from stop_timeout
    assert stopped["state"] == "stopped"
    last = stopped["last_exit"]
    assert (last["code"], last["signal"], last["reason"]) == (code, signal, "stopped")
    assert stopped["options"]["stop_signal"] == stop_signal
    assert stopped["options"]["stop_timeout"] == stop_timeout
    assert not pid_alive(pid)


async def test_stop_keeps_the_process_stopped_and_start_runs_it_again(
    client: Client, agent: Agent, archive_server: ArchiveServer
) -> None:
    """``stop`` answers once the child is gone; the process stays listed as stopped with
    no restart; ``start`` runs it again with a new pid."""
    url = serve(archive_server, "web: exec {PYTHON} -u app.py\n", app=WAIT_TERM)
    document = await create(client, url)
    first = await running_pid(agent, client, document)

    stopped = await control(client, document, "stop")
    assert (stopped["state"], stopped["pid"]) == ("stopped", None)
    assert stopped["last_exit"]["reason"] == "stopped"
    assert not pid_alive(first)
    await asyncio.sleep(0.3)  # proves a negative: no restart comes
    listing = await get_json(client, (await index(client))["list"])
    [listed] = listing["processes"]
    assert (listed["slug"], listed["state"], listed["restarts"]) == ("myapp.web.0", "stopped", 0)
    assert listed["pid"] is None

    started = await control(client, document, "start")
    assert started["state"] == "starting"
    second = await running_pid(agent, client, document)
    assert second != first
    assert pid_alive(second)


async def test_restart_waits_for_the_old_child_and_grandchild(
    client: Client, agent: Agent, archive_server: ArchiveServer
) -> None:
    """``restart`` answers ``starting`` only once the old child and its grandchild (which
    takes 0.4 s to exit) are gone, and the new run finds the old grandchild gone."""
    url = serve(archive_server, "web: exec {PYTHON} -u parent.py\n",
                parent=PARENT, slow=SLOW)
    document = await create(client, url)
    watcher = agent.get(document["slug"])
    output = Output(watcher)
    grandchild = int((await output.nth("grandchild")).split()[1])
    parent = await running_pid(agent, client, document)
    assert parent == int((await output.nth("parent")).split()[1])
    assert (await output.nth("previous-grandchild")) == "previous-grandchild - gone"

    started = time.monotonic()
    restarted = await control(client, document, "restart")
    took = time.monotonic() - started
    assert not pid_alive(parent)
    assert not pid_alive(grandchild)

    assert restarted["state"] == "starting"
    assert took >= 0.4
    assert await output.nth("previous-grandchild", 2) == (
        f"previous-grandchild {grandchild} gone"
    )
    second = await running_pid(agent, client, document)
    assert second != parent
    status = await status_of(client, document)
    assert status["last_exit"]["reason"] == "restarted"
    assert status["error"] is None


@pytest.mark.parametrize("mode", ["same-group", "setsid"])
async def test_signal_reaches_the_grandchildren(
    client: Client, agent: Agent, archive_server: ArchiveServer, mode: str
) -> None:
    """``signal`` sends the signal to the child's process group and to every descendant,
    even one that left the group; the process keeps running, untouched."""
    url = serve(
        archive_server,
        f"web: trap 'echo shell-got-HUP' HUP; {{PYTHON}} -u hup.py {mode} & wait $!; wait $!\n",
        hup=HUP,
    )
    document = await create(client, url)
    output = Output(agent.get(document["slug"]))
    _, pid, group = (await output.nth("ready")).split()
    shell = await running_pid(agent, client, document)
    assert int(pid) != shell
    assert (int(group) == shell) == (mode == "same-group")

    signalled = await control(client, document, "signal", {"signal": "HUP"})
    assert (signalled["state"], signalled["pid"]) == ("running", shell)

    assert await output.nth("grandchild-got-HUP") == f"grandchild-got-HUP {pid}"
    await output.nth("shell-got-HUP")
    status = await status_of(client, document)
    assert (status["state"], status["pid"], status["restarts"]) == ("running", shell, 0)
    assert len(output.starting("grandchild-got-HUP")) == 1  # once, not twice


# -- nonsensical controls ----------------------------------------------------------------


async def test_controls_that_make_no_sense_are_conflicts(
    client: Client, agent: Agent, archive_server: ArchiveServer
) -> None:
    """Starting a running process, stopping or signalling a stopped one answer 409 with
    an error that says why; malformed control bodies are 400s and unknown slugs 404s."""
    url = serve(archive_server, "web: exec {PYTHON} -u app.py\n", app=WAIT_TERM)
    document = await create(client, url)
    pid = await running_pid(agent, client, document)

    answer = await control(client, document, "start", status=409)
    assert answer["error"] == (
        "process 'myapp.web.0' is running: start applies to a stopped, exited, failed or "
        "backoff process"
    )
    answer = await control(client, document, "signal", {"signal": "BOGUS"}, status=400)
    assert "signal" in answer["fields"]
    answer = await control(client, document, "signal", status=400)
    assert "empty" in answer["error"]
    answer = await control(client, document, "stop", {"now": True}, status=400)
    assert "takes no fields" in answer["error"]
    assert pid_alive(pid)  # none of these touched it

    await control(client, document, "stop")
    answer = await control(client, document, "stop", {}, status=409)
    assert answer["error"] == "process 'myapp.web.0' is already stopped"
    answer = await control(client, document, "signal", {"signal": "HUP"}, status=409)
    assert answer["error"] == (
        "process 'myapp.web.0' is stopped: only a running process can be signalled"
    )
    assert (await status_of(client, document))["state"] == "stopped"

    unknown = {relation: str(client.make_url(f"/{path}-process/nope.web.0"))
               for relation, path in [("start", "start"), ("stop", "stop"),
                                      ("restart", "restart"), ("signal", "signal")]}
    for relation in ("start", "stop", "restart"):
        answer = await control(client, unknown, relation, status=404)
        assert "nope.web.0" in answer["error"]
    await control(client, unknown, "signal", {"signal": "HUP"}, status=404)


@pytest.mark.parametrize("relation", ["start", "restart"])
async def test_control_queued_behind_a_delete_does_not_revive_the_process(
    client: Client, agent: Agent, archive_server: ArchiveServer, relation: str
) -> None:
    """A start or restart that arrives while a delete is stopping the process is refused
    with 409 and starts nothing: once deleted, the process has no child and no run."""
    # it ignores SIGTERM, so the delete's stop lasts stop_timeout: time for the control
    url = serve(archive_server, "web: exec {PYTHON} -u app.py\n", app=INT_NOT_TERM)
    document = await create(client, url, stop_timeout=0.3)
    watcher = agent.get(document["slug"])
    await Output(watcher).nth("ready")
    deleting = asyncio.ensure_future(post(client, document["delete"]))
    try:
        await wait_for_state(watcher, S.STOPPING)
        response = await client.session.post(document[relation])
        assert await deleting == {}
        assert response.status == 409, await response.text()
        assert (watcher.state, watcher.pid) == (S.STOPPED, None)
        assert agent.watchers() == []
    finally:
        await asyncio.wait([deleting])
        await watcher.stop()  # the agent forgot it: end whatever the control started


# -- autostart ---------------------------------------------------------------------------


async def test_autostart_false_downloads_nothing_until_start(
    client: Client, agent: Agent, archive_server: ArchiveServer
) -> None:
    """A process created with ``autostart: false`` is stopped and downloads nothing (the
    archive server sees no request, no folder is made) until a ``start``, which provisions
    and runs it."""
    url = serve(archive_server, "web: exec {PYTHON} -u app.py\n", app=WAIT_TERM)
    document = await create(client, url, autostart=False)
    assert (document["state"], document["pid"]) == ("stopped", None)
    assert document["options"]["autostart"] is False
    await asyncio.sleep(0.2)  # proves a negative: nothing is fetched by itself
    assert archive_server.hits("app.tgz") == 0
    assert not (agent.processes_dir / document["slug"]).exists()
    assert (await status_of(client, document))["state"] == "stopped"
    answer = await control(client, document, "stop", status=409)
    assert "already stopped" in answer["error"]

    started = await control(client, document, "start")
    assert started["state"] == "pending"
    await running_pid(agent, client, document)
    assert archive_server.hits("app.tgz") == 1


# -- provisioning retried -----------------------------------------------------------------


@pytest.mark.parametrize("relation", ["restart", "start"])
async def test_restart_of_a_failed_download_provisions_again(
    client: Client, agent: Agent, archive_server: ArchiveServer, relation: str
) -> None:
    """A process that failed to download (404) is provisioned afresh by ``restart`` or
    ``start`` once the archive is there, and runs."""
    url = archive_server.url("late.tgz")
    document = await create(client, url)
    watcher = agent.get(document["slug"])
    await wait_for_state(watcher, S.FAILED)
    assert "404" in (await status_of(client, document))["error"]
    serve(archive_server, "web: exec {PYTHON} -u app.py\n", name="late.tgz", app=WAIT_TERM)

    answer = await control(client, document, relation)
    assert (answer["state"], answer["error"]) == ("pending", None)
    await running_pid(agent, client, document)
    assert archive_server.hits("late.tgz") == 2
    assert (await status_of(client, document))["error"] is None


# -- bulk controls -------------------------------------------------------------------------


async def two_apps(
    client: Client, agent: Agent, archive_server: ArchiveServer
) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
    """Create alpha.web.0, alpha.web.1 and beta.web.0, all running; their documents and
    pids by slug."""
    url = serve(archive_server, "web: exec {PYTHON} -u app.py\n", app=WAIT_TERM)
    documents = {}
    for app, node in [("alpha", "web.0"), ("alpha", "web.1"), ("beta", "web.0")]:
        document = await create(client, url, app=app, node=node)
        documents[document["slug"]] = document
    pids = {slug: await running_pid(agent, client, d) for slug, d in documents.items()}
    return documents, pids


async def states(client: Client) -> dict[str, tuple[str, int | None]]:
    """Every listed process's state and pid, by slug."""
    listing = await get_json(client, (await index(client))["list"])
    return {p["slug"]: (p["state"], p["pid"]) for p in listing["processes"]}


ALPHA_OK = {"processes": [{"slug": "alpha.web.0", "ok": True},
                          {"slug": "alpha.web.1", "ok": True}]}


async def test_bulk_controls_of_one_app_leave_the_other_alone(
    client: Client, agent: Agent, archive_server: ArchiveServer
) -> None:
    """Bulk stop, start, restart and delete with ``{"app": ...}`` act on that app's
    processes only, and report a conflict per process without stopping the others."""
    links = await index(client)
    documents, pids = await two_apps(client, agent, archive_server)
    beta = ("running", pids["beta.web.0"])

    assert await post(client, links["bulk_stop"], {"app": "alpha"}) == ALPHA_OK
    assert await states(client) == {
        "alpha.web.0": ("stopped", None), "alpha.web.1": ("stopped", None), "beta.web.0": beta,
    }
    assert not pid_alive(pids["alpha.web.0"])
    assert not pid_alive(pids["alpha.web.1"])

    again = await post(client, links["bulk_stop"], {"app": "alpha"})
    assert [(p["slug"], p["ok"]) for p in again["processes"]] == [
        ("alpha.web.0", False), ("alpha.web.1", False),
    ]
    assert all("already stopped" in p["error"] for p in again["processes"])

    assert await post(client, links["bulk_start"], {"app": "alpha"}) == ALPHA_OK
    started = {slug: await running_pid(agent, client, documents[slug])
               for slug in ("alpha.web.0", "alpha.web.1")}
    assert set(started.values()).isdisjoint(pids.values())

    # with alpha.web.1 stopped, a bulk start starts it and conflicts on alpha.web.0 alone
    await control(client, documents["alpha.web.1"], "stop")
    mixed = await post(client, links["bulk_start"], {"app": "alpha"})
    assert [(p["slug"], p["ok"]) for p in mixed["processes"]] == [
        ("alpha.web.0", False), ("alpha.web.1", True),
    ]
    assert "is running" in mixed["processes"][0]["error"]
    await running_pid(agent, client, documents["alpha.web.1"])

    before = await states(client)
    assert await post(client, links["bulk_restart"], {"app": "alpha"}) == ALPHA_OK
    assert not pid_alive(before["alpha.web.0"][1] or 0)
    assert not pid_alive(before["alpha.web.1"][1] or 0)
    restarted = {slug: await running_pid(agent, client, documents[slug])
                 for slug in ("alpha.web.0", "alpha.web.1")}
    for slug, pid in restarted.items():
        assert pid != before[slug][1]

    assert await post(client, links["bulk_delete"], {"app": "alpha"}) == ALPHA_OK
    assert await states(client) == {"beta.web.0": beta}
    assert await post(client, links["bulk_stop"], {"app": "nobody"}) == {"processes": []}


async def test_bulk_controls_of_every_process(
    client: Client, agent: Agent, archive_server: ArchiveServer
) -> None:
    """Bulk stop, start, restart and delete with ``{"all": true}`` act on every process,
    of every app, in creation order."""
    links = await index(client)
    documents, pids = await two_apps(client, agent, archive_server)
    everyone = {"processes": [{"slug": slug, "ok": True} for slug in documents]}

    assert await post(client, links["bulk_stop"], {"all": True}) == everyone
    assert set((await states(client)).values()) == {("stopped", None)}
    await gone(*pids.values())

    assert await post(client, links["bulk_start"], {"all": True}) == everyone
    started = {slug: await running_pid(agent, client, d) for slug, d in documents.items()}
    assert set(started.values()).isdisjoint(pids.values())

    assert await post(client, links["bulk_restart"], {"all": True}) == everyone
    assert not any(map(pid_alive, started.values()))
    for slug, document in documents.items():
        assert await running_pid(agent, client, document) != started[slug]

    assert await post(client, links["bulk_delete"], {"all": True}) == everyone
    assert await states(client) == {}
    assert agent.watchers() == []


@pytest.mark.parametrize(
    "body", [{}, {"app": "alpha", "all": True}, {"all": False}, {"app": "../x"}, {"x": 1}],
)
async def test_bulk_requests_name_exactly_one_target(client: Client, body: Any) -> None:
    """A bulk request must name an app or ``"all": true``, not both nor neither: 400."""
    links = await index(client)
    for relation in ("bulk_start", "bulk_stop", "bulk_restart", "bulk_delete"):
        answer = await post(client, links[relation], body, status=400)
        assert answer["error"]
