"""Least privilege: children as an unprivileged user (--user/--group), per-process
resource limits (``rlimits``).

The user tests run the real ``smartmob-agent`` command as root (skipped otherwise) with
``--user nobody``, on a state folder that ``nobody`` may pass through (pytest's own
temporary folders are root's only), and read what the child says about itself from the
``logs`` link. The ``rlimits`` tests run real children of an in-process agent. Waits
poll with deadlines or wait for state changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from smartmob_agent.config import Settings
from smartmob_agent.errors import InvalidRequest
from smartmob_agent.model import Options
from smartmob_agent.model import ProcessState as S
from smartmob_agent.processes.users import blocked_folder, resolve_run_as
from smartmob_agent.schemas import check_rlimits, create_request, spec_from_request
from smartmob_agent.supervision.agent import Agent
from tests.agent_process import AgentProcess
from tests.conftest import ArchiveServer
from tests.helpers import app_archive, eventually, make_archive, wait_for_state

Client = TestClient[Any, Any]

try:
    NOBODY: pwd.struct_passwd | None = pwd.getpwnam("nobody")
except KeyError:  # pragma: no cover - every Debian and Red Hat has one
    NOBODY = None

ROOT_ONLY = pytest.mark.skipif(
    os.geteuid() != 0 or NOBODY is None, reason="switching users needs root and 'nobody'"
)
ROOT_WARNING = "running as root without --user"

#: Says who it runs as, and whether it can write in its own folder, then waits.
WHO_AM_I = (
    'web: echo "uid=$(id -u) gid=$(id -g) groups=$(id -G) home=$HOME user=$USER '
    'logname=$LOGNAME released=$(cat released-by)" && touch written-by-child '
    "&& echo wrote && exec sleep 600\n"
    "release: id -u > released-by\n"
)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A fresh folder every user may pass through (not list)."""
    folder = Path(tempfile.mkdtemp(prefix="smartmob-least-privilege-"))
    folder.chmod(0o711)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


async def poll(
    fetch: Callable[[], Awaitable[Any]], check: Callable[[Any], bool], *,
    timeout: float = 30.0, what: str = "condition",
) -> Any:
    """Call ``fetch()`` until ``check`` holds for what it returns; return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = await fetch()
        if check(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s: {value!r}")
        await asyncio.sleep(0.05)


async def stop(agent: AgentProcess) -> None:
    """SIGTERM the agent and wait for its clean exit (it stops its children first)."""
    assert agent.proc is not None
    if agent.proc.returncode is None:
        agent.proc.terminate()
    assert await agent.wait() == 0


def run_agent(*args: str, env: dict[str, str] | None = None, **popen: Any) -> Any:
    """Run the real command until it exits (a refused start); return its result."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SMARTMOB_")}
    return subprocess.run(
        [sys.executable, "-m", "smartmob_agent", "--port", "0", *args],
        capture_output=True, text=True, timeout=60, env={**environ, **(env or {})}, **popen,
    )


# -- --user and --group ------------------------------------------------------------------


@ROOT_ONLY
async def test_children_and_release_run_as_the_user(
    open_dir: Path, archive_server: ArchiveServer
) -> None:
    """With --user nobody, the command, its release command and its health command run
    as nobody (its uid, group and groups only, its HOME, USER and LOGNAME); its unpacked
    source belongs to nobody, the agent's marks beside it to root; the agent does not
    warn about root."""
    assert NOBODY is not None
    url = archive_server.add("who.tgz", make_archive({"Procfile": WHO_AM_I}))
    state = open_dir / "state"
    agent = AgentProcess(state, ["--user", "nobody"])
    await agent.start()
    try:
        assert f"children run as user nobody (uid {NOBODY.pw_uid}" in agent.stderr
        async with aiohttp.ClientSession() as session:
            document = await create(session, agent, url, health={
                "command": f'test "$(id -u)" = {NOBODY.pw_uid}', "interval": 0.1,
            })
            output = await poll(lambda: lines(session, document), lambda got: "wrote" in got,
                                what="the child's report")
            groups = " ".join(str(g) for g in sorted(
                set(os.getgrouplist("nobody", NOBODY.pw_gid))))
            assert (
                f"uid={NOBODY.pw_uid} gid={NOBODY.pw_gid} groups={groups} "
                f"home={NOBODY.pw_dir} user=nobody logname=nobody released={NOBODY.pw_uid}"
            ) in output
            healthy = await poll(lambda: status(session, document),
                                 lambda got: got["healthy"] is not None,
                                 what="the first health probe")
            assert healthy["healthy"] is True, healthy
        source = state / "processes" / "who.web.0" / "source"
        assert source.stat().st_uid == NOBODY.pw_uid
        assert source.stat().st_gid == NOBODY.pw_gid
        assert (source / "Procfile").stat().st_uid == NOBODY.pw_uid
        assert (source / "written-by-child").stat().st_uid == NOBODY.pw_uid
        assert (state / "processes" / "who.web.0").stat().st_uid == 0
    finally:
        await stop(agent)
        await agent.kill()
    assert ROOT_WARNING not in agent.stderr


def nobody_may_run(path: str) -> bool:
    """Whether nobody may run the program at ``path`` (every folder on the way)."""
    assert NOBODY is not None
    run_as = resolve_run_as("nobody", None)
    assert run_as is not None
    real = Path(os.path.realpath(path))
    return blocked_folder(real.parent, run_as) is None and bool(real.stat().st_mode & 0o001)


@ROOT_ONLY
async def test_the_build_runs_as_the_user(
    open_dir: Path, archive_server: ArchiveServer
) -> None:
    """The build of a source with a requirements.txt runs as nobody: its virtual
    environment belongs to nobody; or, where nobody may not run the agent's Python (it
    lives in root's home here), the build fails for want of permission, and the agent
    warned at start that it would."""
    assert NOBODY is not None
    url = archive_server.add("built.tgz", make_archive({
        "Procfile": "web: echo built && exec sleep 600\n",
        "requirements.txt": "# nothing to install\n",
    }))
    state = open_dir / "state"
    agent = AgentProcess(state, ["--user", "nobody"])
    await agent.start()
    try:
        async with aiohttp.ClientSession() as session:
            document = await create(session, agent, url, node="built.0")
            final = await poll(lambda: status(session, document),
                               lambda got: got["state"] in ("running", "failed"),
                               timeout=120, what="the build to end")
        if nobody_may_run(sys.executable):
            assert final["state"] == "running", final
            (venv,) = (state / "builds").glob("*/venv")
            assert venv.stat().st_uid == NOBODY.pw_uid
            assert (venv / "bin").stat().st_uid == NOBODY.pw_uid
            assert venv.parent.stat().st_uid == 0  # the agent's marks
        else:
            assert final["state"] == "failed", final
            assert "Permission denied" in final["error"], final
            assert "may not run this agent's Python" in agent.stderr
    finally:
        await stop(agent)
        await agent.kill()


async def create(
    session: aiohttp.ClientSession, agent: AgentProcess, url: str, node: str = "web.0",
    **extra: Any,
) -> Any:
    request = {"app": "who", "node": node, "process_type": "web", "source_url": url, **extra}
    async with session.post(f"{agent.url}/create-process", json=request) as answer:
        assert answer.status == 201, await answer.text()
        return await answer.json()


async def status(session: aiohttp.ClientSession, document: Any) -> Any:
    async with session.get(document["details"]) as answer:
        return await answer.json()


async def lines(session: aiohttp.ClientSession, document: Any) -> list[str]:
    async with session.get(document["logs"]) as answer:
        return [entry["line"] for entry in await answer.json()]


@ROOT_ONLY
async def test_root_without_user_warns(tmp_path: Path) -> None:
    """An agent running as root without --user says, by the time it says it listens,
    that its children run as root."""
    agent = AgentProcess(tmp_path / "state")
    await agent.start()
    try:
        assert ROOT_WARNING in agent.stderr
        assert " WARNING " in next(
            line for line in agent.stderr.splitlines() if ROOT_WARNING in line)
    finally:
        await stop(agent)
        await agent.kill()


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        pytest.param(["--user", "no-such-user-5x"], {},
                     "--user: there is no user 'no-such-user-5x' on this machine",
                     id="unknown-user"),
        pytest.param([], {"SMARTMOB_USER": "no-such-user-5x"},
                     "--user: there is no user 'no-such-user-5x' on this machine",
                     id="unknown-user-variable"),
        pytest.param(["--user", "nobody", "--group", "no-such-group-5x"], {},
                     "--group: there is no group 'no-such-group-5x' on this machine",
                     id="unknown-group"),
        pytest.param(["--group", "nogroup"], {}, "--group goes with --user",
                     id="group-without-user"),
        pytest.param(["--user", ""], {}, "--user: '' is not valid", id="empty"),
    ],
)
def test_a_user_that_cannot_be_used_stops_the_start(
    tmp_path: Path, args: list[str], env: dict[str, str], expected: str
) -> None:
    """An unknown user or group is one line on stderr and exit status 2; nothing is
    started (not even the state folder is made)."""
    state = tmp_path / "state"
    result = run_agent("--state-dir", str(state), *args, env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("smartmob-agent: invalid configuration: ")
    assert expected in result.stderr
    assert not state.exists()


@contextlib.contextmanager
def as_nobody() -> Iterator[None]:
    """Run the block with nobody's effective uid and gid (root's real ones stay, to come
    back)."""
    assert NOBODY is not None
    os.setegid(NOBODY.pw_gid)
    os.seteuid(NOBODY.pw_uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@ROOT_ONLY
def test_only_root_switches_users() -> None:
    """Not root, --user naming another user is refused, saying why; naming the agent's
    own user is nothing to do."""
    assert NOBODY is not None
    with as_nobody():
        with pytest.raises(InvalidRequest) as raised:
            resolve_run_as("root", None)
        assert resolve_run_as("nobody", None) is None
        with pytest.raises(InvalidRequest):
            resolve_run_as("nobody", "0")
    assert str(raised.value) == (
        "invalid configuration: --user root: only root can run children as another user, "
        f"and this agent runs as nobody (uid {NOBODY.pw_uid}): start it as root, or leave "
        "--user out")


NOBODY_RUNS_PYTHON = pytest.mark.skipif(
    os.geteuid() != 0 or NOBODY is None or not nobody_may_run(sys.executable),
    reason="needs root, and a Python that nobody may run",
)


@NOBODY_RUNS_PYTHON
def test_another_user_needs_root(open_dir: Path) -> None:
    """An agent that is not root cannot switch users: --user naming another user is
    refused at start with one line and exit status 2."""
    assert NOBODY is not None
    result = run_agent(
        "--state-dir", str(open_dir / "state"), "--user", "root",
        user=NOBODY.pw_uid, group=NOBODY.pw_gid, extra_groups=[], cwd=open_dir,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "--user root: only root can run children as another user, and this agent " \
        f"runs as nobody (uid {NOBODY.pw_uid})" in result.stderr


@NOBODY_RUNS_PYTHON
async def test_the_agents_own_user_is_a_no_op(open_dir: Path) -> None:
    """--user naming the user the agent runs as (not root) changes nothing: it starts,
    and does not warn about root."""
    assert NOBODY is not None
    state = open_dir / "state"
    state.mkdir()
    os.chown(state, NOBODY.pw_uid, NOBODY.pw_gid)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SMARTMOB_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "smartmob_agent", "--port", "0", "--state-dir", str(state),
        "--user", "nobody", stderr=asyncio.subprocess.PIPE, env=environ, cwd=open_dir,
        user=NOBODY.pw_uid, group=NOBODY.pw_gid, extra_groups=[],
    )
    assert process.stderr is not None
    seen: list[bytes] = []
    try:
        async with asyncio.timeout(20):
            while not any(b"listening on" in line for line in seen):
                line = await process.stderr.readline()
                assert line, b"".join(seen)
                seen.append(line)
    finally:
        if process.returncode is None:
            process.terminate()
        assert await process.wait() == 0
    text = b"".join(seen).decode()
    assert ROOT_WARNING not in text
    assert "children run as user" not in text


def test_the_agents_own_user_resolves_to_nothing() -> None:
    """Naming the agent's own user (and group) needs no switch, root or not."""
    me = pwd.getpwuid(os.geteuid()).pw_name
    assert resolve_run_as(me, None) is None
    assert resolve_run_as(str(os.geteuid()), str(os.getegid())) is None
    assert resolve_run_as(None, None) is None


@ROOT_ONLY
def test_a_user_resolves_with_its_groups() -> None:
    """As root, --user nobody resolves to its uid, primary group, groups and home;
    --group replaces the primary group."""
    assert NOBODY is not None
    run_as = resolve_run_as("nobody", None)
    assert run_as is not None
    assert (run_as.uid, run_as.gid, run_as.home) == (
        NOBODY.pw_uid, NOBODY.pw_gid, NOBODY.pw_dir)
    assert NOBODY.pw_gid in run_as.groups
    assert 0 not in run_as.groups
    other = resolve_run_as(str(NOBODY.pw_uid), "0")
    assert other is not None
    assert (other.uid, other.gid) == (NOBODY.pw_uid, 0)


# -- rlimits ------------------------------------------------------------------------------


def body(url: str, node: str = "web.0", **extra: Any) -> dict[str, Any]:
    """A create request for process type ``web`` of app ``myapp``."""
    return {"app": "myapp", "node": node, "process_type": "web", "source_url": url, **extra}


#: Prints its limits: open files (soft/hard, as the shell sees them), then address space,
#: CPU time and file size (soft, hard) as Python sees them.
LIMITS = 'web: echo "nofile=$(ulimit -n)/$(ulimit -Hn)" && {PYTHON} limits.py\n'
LIMITS_SCRIPT = """
import resource
print(*(f"{name}={resource.getrlimit(getattr(resource, 'RLIMIT_' + name.upper()))}"
        for name in ("as", "cpu", "fsize")))
"""


def limits_app() -> bytes:
    return app_archive(LIMITS, {"limits.py": LIMITS_SCRIPT})


async def output_of(client: Client, slug: str) -> list[str]:
    answer = await client.get(f"/process-logs/{slug}")
    assert answer.status == 200
    return [entry["line"] for entry in await answer.json()]


async def test_rlimits_are_applied_to_the_child(
    client: Client, agent: Agent, archive_server: ArchiveServer
) -> None:
    """The limits of the request are the child's, soft and hard; "unlimited" too; the
    status document shows them as given."""
    url = archive_server.add("limits.tgz", limits_app())
    rlimits = {"nofile": 64, "as": "unlimited", "cpu": 3600, "fsize": 10**9}
    answer = await client.post("/create-process", json=body(url, restart="never",
                                                             rlimits=rlimits))
    assert answer.status == 201, await answer.text()
    document = await answer.json()
    assert document["options"]["rlimits"] == rlimits
    await wait_for_state(agent.get("myapp.web.0"), S.EXITED, timeout=20)
    output = await output_of(client, "myapp.web.0")
    assert output[0] == "nofile=64/64"
    assert output[1] == "as=(-1, -1) cpu=(3600, 3600) fsize=(1000000000, 1000000000)"


async def test_without_rlimits_the_child_has_the_agents(
    client: Client, agent: Agent, archive_server: ArchiveServer
) -> None:
    """No ``rlimits``: the child keeps the agent's limits, and the status shows null."""
    url = archive_server.add("limits.tgz", limits_app())
    answer = await client.post("/create-process", json=body(url, restart="never"))
    document = await answer.json()
    assert document["options"]["rlimits"] is None
    await wait_for_state(agent.get("myapp.web.0"), S.EXITED, timeout=20)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert (await output_of(client, "myapp.web.0"))[0] == f"nofile={soft}/{hard}"


async def test_the_health_command_gets_the_umask_and_rlimits_of_its_process(
    client: Client, agent: Agent, archive_server: ArchiveServer, tmp_path: Path
) -> None:
    """A health command starts as the process's children do: with the ``umask`` and the
    ``rlimits`` of the create request, not the agent's."""
    url = archive_server.add("sleeper.tgz", app_archive("web: exec sleep 600\n"))
    out = tmp_path / "probed"
    report = '{ umask; ulimit -n; ulimit -t; } > "$OUT.part" && mv "$OUT.part" "$OUT"'
    answer = await client.post("/create-process", json=body(
        url, env={"OUT": str(out)}, umask="027", rlimits={"nofile": 64, "cpu": 3600},
        health={"command": report, "interval": 0.1, "timeout": 5},
    ))
    assert answer.status == 201, await answer.text()
    await eventually(out.exists, timeout=20, what="the health command's report")
    assert out.read_text() == "0027\n64\n3600\n"
    assert out.stat().st_mode & 0o777 == 0o640


async def test_an_rlimit_above_the_agents_hard_limit_is_400(
    client: Client, agent: Agent, archive_server: ArchiveServer
) -> None:
    """A limit above the agent's own hard limit is refused, naming ``rlimits.nofile`` and
    the limit; nothing is created."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    url = archive_server.add("limits.tgz", limits_app())
    for value in (hard + 1, "unlimited"):
        answer = await client.post("/create-process",
                                   json=body(url, rlimits={"nofile": value, "cpu": 5}))
        assert answer.status == 400
        error = await answer.json()
        assert error["error"] == "invalid fields in the request: rlimits.nofile"
        shown = repr(value) if isinstance(value, str) else str(value)
        assert error["fields"] == {"rlimits.nofile": (
            f"must be at most {hard}, the agent's own hard limit (got {shown})")}
    assert agent.watchers() == []


@pytest.mark.parametrize(
    ("rlimits", "got"),
    [
        pytest.param({"nofile": "64"}, "the string '64' for 'nofile'", id="string"),
        pytest.param({"nofile": -1}, "the number -1 for 'nofile'", id="negative"),
        pytest.param({"nofile": 1.5}, "the number 1.5 for 'nofile'", id="fraction"),
        pytest.param({"nofile": True}, "a boolean for 'nofile'", id="boolean"),
        pytest.param({"nofile": None}, "null for 'nofile'", id="null"),
        pytest.param({"stack": 10}, "an object", id="unknown-limit"),
        pytest.param("unlimited", "the string 'unlimited'", id="not-an-object"),
        pytest.param({"as": 2**63}, "for 'as'", id="too-large"),
    ],
)
async def test_a_bad_rlimits_is_400(
    client: Client, agent: Agent, archive_server: ArchiveServer, rlimits: Any, got: str
) -> None:
    """A limit of the wrong type or range, or an unknown one, is refused naming
    ``rlimits``."""
    url = archive_server.add("limits.tgz", limits_app())
    answer = await client.post("/create-process", json=body(url, rlimits=rlimits))
    assert answer.status == 400
    error = await answer.json()
    assert set(error["fields"]) == {"rlimits"}
    assert error["fields"]["rlimits"].startswith(
        "must be an object whose entries, each optional, are 'nofile', 'as', 'nproc', "
        "'core', 'cpu', 'fsize', each a whole number from 0 or the string 'unlimited'")
    assert got in error["fields"]["rlimits"]
    assert agent.watchers() == []


def test_check_rlimits_is_pure() -> None:
    """The check takes the hard limits it is given: unlimited ones allow anything."""
    options = Options(rlimits=(("nofile", 100), ("as", None)))
    check_rlimits(options, {"nofile": 100, "as": None})
    check_rlimits(options, {})
    with pytest.raises(InvalidRequest) as raised:
        check_rlimits(options, {"nofile": 99, "as": 10})
    assert set(raised.value.fields) == {"rlimits.nofile", "rlimits.as"}


async def test_rlimits_survive_an_agent_restart(
    settings: Settings, archive_server: ArchiveServer, tmp_path: Path
) -> None:
    """A new agent on the same state folder brings the process back with its limits, and
    its new child gets them."""
    url = archive_server.add("limits.tgz", app_archive(
        'web: ulimit -n > "$OUT.part" && mv "$OUT.part" "$OUT" && exec sleep 600\n'))
    out = tmp_path / "nofile"
    request = body(url, env={"OUT": str(out)}, rlimits={"nofile": 64, "nproc": 10_000})
    spec = spec_from_request(create_request.validate(request))
    async with Agent(settings) as first:
        first.create(spec)
        await eventually(out.exists, timeout=20, what="the first child's report")
        assert out.read_text() == "64\n"
    out.unlink()
    async with Agent(settings) as second:
        (again,) = second.watchers()
        assert again.spec == spec
        assert again.spec.options.rlimits == (("nofile", 64), ("nproc", 10_000))
        await eventually(out.exists, timeout=20, what="the second child's report")
        assert out.read_text() == "64\n"
