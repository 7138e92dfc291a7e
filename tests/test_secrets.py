"""Hardening (issue 13): what a process created with an app key can read of the agent's
keys, keys in log lines, and the modes of the files the agent writes.

The scans run the real ``smartmob-agent`` command with every kind of key: admin keys in
``SMARTMOB_TOKEN`` and in a ``--token-file``, an app key in ``SMARTMOB_APP_TOKEN``, the
webhook key in ``SMARTMOB_WEBHOOK_SECRET``. A process created with the app key reads
everything it may of every process on the machine (``/proc/*/environ``,
``/proc/*/cmdline``) and lists the descriptors its shell was given; no key may be
there, and only standard input, output and error may have been inherited.

Who runs the children decides what they can read, hence two cases:

* the children run as the agent's own user (no ``--user``), the case of the issue: a
  process may read ``/proc/<pid>/environ`` of any dumpable process of its user (the
  guardian's held the agent's whole environment). As root that case cannot be seen, since
  root reads every process's environment, dumpable or not: so a root test runner starts
  the agent as root *without any capability* (``setpriv``), which makes it and its
  children an ordinary user's processes (they may read one another's environment when
  dumpable, and no other root process's); a runner that is not root runs the agent as
  itself, the very case;
* the agent runs as root with ``--user nobody`` (root only): the children are
  ``nobody``'s, and may read only ``nobody``'s processes.
"""

from __future__ import annotations

import contextlib
import doctest
import io
import logging
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from yarl import URL

from smartmob_agent.output import logs, redact
from smartmob_agent.output.logrecords import RedactKeys
from smartmob_agent.processes import guardian, privacy, spawn
from smartmob_agent.store import prepare_state_dir
from tests.agent_process import AgentProcess
from tests.conftest import ArchiveServer
from tests.helpers import eventually, make_archive

try:
    NOBODY: pwd.struct_passwd | None = pwd.getpwnam("nobody")
except KeyError:  # pragma: no cover - every Debian and Red Hat has one
    NOBODY = None

#: Reads every environment and command line it may, and lists the descriptors of the
#: shell that runs it (its parent), which are those the agent gave that command. Its
#: argument names the result files: ``found-NAME.txt`` and ``fds-NAME.txt``.
SCAN = r"""
for fd in /proc/$PPID/fd/*; do
    printf '%s -> %s\n' "${fd##*/}" "$(readlink "$fd")"
done > "fds-$1.part"
for f in /proc/[0-9]*/environ /proc/[0-9]*/cmdline; do
    if text=$(tr '\0' '\n' 2>/dev/null < "$f"); then
        printf '== %s\n%s\n' "$f" "$text"
    fi
done > "found-$1.part"
mv "fds-$1.part" "fds-$1.txt" && mv "found-$1.part" "found-$1.txt"
"""
#: The scan, run by the release command, by the process and by its health command: the
#: compound commands keep their shell, whose descriptors the scan lists.
SCANNER = make_archive({
    "Procfile": "release: sh scan.sh release; true\n"
                "web: sh scan.sh web; echo scanned; exec sleep 600\n",
    "scan.sh": SCAN,
})
#: Who runs the scan: the source's release command, the process, its health command.
SCANS = ("release", "web", "health")


@dataclass(frozen=True)
class Keys:
    """A fresh key of every kind the agent takes."""

    admin_env: str = field(default_factory=lambda: "admin-env-" + secrets.token_hex(16))
    admin_file: str = field(default_factory=lambda: "admin-file-" + secrets.token_hex(16))
    app: str = field(default_factory=lambda: "app-env-" + secrets.token_hex(16))
    webhook: str = field(default_factory=lambda: "webhook-env-" + secrets.token_hex(16))

    def every(self) -> list[str]:
        return [self.admin_env, self.admin_file, self.app, self.webhook]


def unprivileged_wrapper() -> list[str]:
    """The command that runs the agent as an ordinary user's process: nothing when the
    tests do not run as root, ``setpriv`` dropping every capability when they do."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("as root, the same-user case needs setpriv to drop the capabilities")
    wrapper = [setpriv, "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--"]
    if subprocess.run([*wrapper, "true"], capture_output=True, timeout=30).returncode:
        pytest.skip("setpriv cannot drop the capabilities here (a container without them?)")
    return wrapper


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A fresh folder every user may pass through (not list): pytest's are root's only."""
    folder = Path(tempfile.mkdtemp(prefix="smartmob-secrets-"))
    folder.chmod(0o711)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def agent_with_every_key(
    folder: Path, keys: Keys, args: list[str], wrapper: list[str]
) -> AgentProcess:
    token_file = folder / "tokens"
    token_file.write_text(keys.admin_file + "\n")
    token_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMARTMOB_")}
    env.update({
        "SMARTMOB_TOKEN": keys.admin_env,
        "SMARTMOB_APP_TOKEN": f"scan={keys.app}",
        "SMARTMOB_WEBHOOK_SECRET": keys.webhook,
    })
    return AgentProcess(folder / "state", ["--token-file", str(token_file), *args], env=env,
                        wrapper=wrapper)


async def guardian_pid(agent: AgentProcess) -> int:
    """The pid of the agent's guardian, once it has exec'd (polled, deadline 10 s)."""
    found: list[int] = []

    def look() -> bool:
        for child in psutil.Process(agent.pid).children():
            with contextlib.suppress(psutil.Error):
                if "smartmob_agent.processes.guardian" in " ".join(child.cmdline()):
                    found.append(child.pid)
        return bool(found)

    await eventually(look, what="the guardian's exec")
    return found[0]


async def scan_with_the_app_key(
    agent: AgentProcess, keys: Keys, archive_server: ArchiveServer
) -> dict[str, tuple[str, str]]:
    """Create the scanner with the app key; return what each of :data:`SCANS` found,
    and the descriptors it was given."""
    url = archive_server.add(f"scan-{secrets.token_hex(4)}.tgz", SCANNER)
    body = {"app": "scan", "node": "web.0", "process_type": "web", "source_url": url,
            "health": {"command": "sh scan.sh health; true", "interval": 0.2}}
    async with aiohttp.ClientSession() as http, http.post(
        agent.url + "/create-process", json=body,
        headers={"Authorization": f"Bearer {keys.app}"},
    ) as response:
        assert response.status == 201, await response.text()
    source = agent.state_dir / "processes" / "scan.web.0" / "source"
    scans = {}
    for name in SCANS:
        found = source / f"found-{name}.txt"
        await eventually(found.exists, timeout=30, what=f"the scan of the {name} command")
        scans[name] = (found.read_text(errors="replace"),
                       (source / f"fds-{name}.txt").read_text(errors="replace"))
    return scans


def where(found: str, key: str) -> str:
    """The file of the scan (``/proc/<pid>/environ``) that held ``key``."""
    return found[: found.index(key)].rpartition("== ")[2].partition("\n")[0]


def assert_found_no_key(scans: dict[str, tuple[str, str]], keys: Keys, guardian: int) -> None:
    for name, (found, fds) in scans.items():
        # the scan worked: it read its own environment, and reached the guardian
        assert "SMARTMOB_AGENT_ID=" in found, name
        assert f"== /proc/{guardian}/cmdline\n" in found, name
        for key in keys.every():
            assert key not in found, (
                f"the {name} command could read {key[:12]}... in {where(found, key)}")
            assert key not in fds, name
        # only stdin, stdout and stderr: not the listening socket, the database, a key file
        descriptors = sorted(line.split(" -> ")[0] for line in fds.splitlines())
        assert descriptors == ["0", "1", "2"], (name, fds)


async def stop(agent: AgentProcess) -> None:
    """SIGTERM the agent and wait for its clean exit (it stops its children first)."""
    assert agent.proc is not None
    if agent.proc.returncode is None:
        agent.proc.terminate()
    assert await agent.wait() == 0, agent.stderr


# -- what a child of an app key can read ----------------------------------------------------


@pytest.mark.timeout(90)
async def test_a_child_of_the_agents_user_finds_no_key(
    tmp_path: Path, archive_server: ArchiveServer
) -> None:
    """Children of the agent's own user (see the module's docstring): the agent and its
    guardian are non-dumpable, so their environments cannot be read; the guardian holds
    none of the agent's keys anyway; the child inherited no descriptor of the agent's."""
    keys = Keys()
    agent = agent_with_every_key(tmp_path, keys, [], unprivileged_wrapper())
    try:
        await agent.start()
        guardian = await guardian_pid(agent)
        scans = await scan_with_the_app_key(agent, keys, archive_server)
        assert_found_no_key(scans, keys, guardian)
        for found, _ in scans.values():  # non-dumpable: what they hold stays theirs
            for pid in (agent.pid, guardian):
                assert f"== /proc/{pid}/environ\n" not in found, pid
        await stop(agent)
    finally:
        await agent.kill()


@pytest.mark.timeout(90)
@pytest.mark.skipif(os.geteuid() != 0 or NOBODY is None, reason="needs root and 'nobody'")
async def test_a_child_of_the_user_option_finds_no_key(
    open_dir: Path, archive_server: ArchiveServer
) -> None:
    """The agent as root, the children as --user nobody: nothing of root's is theirs to
    read, and nothing of the keys was handed to them (environment, arguments,
    descriptors). The state folder lets them pass, not list; its private parts are
    closed to them."""
    keys = Keys()
    agent = agent_with_every_key(open_dir, keys, ["--user", "nobody"], [])
    try:
        await agent.start()
        guardian = await guardian_pid(agent)
        assert_found_no_key(await scan_with_the_app_key(agent, keys, archive_server),
                            keys, guardian)
        state = agent.state_dir
        await eventually((state / "logs" / "scan.web.0").exists, what="the output log")
        assert mode(state) == 0o711
        for name in ("logs", "agent-log", "cache"):
            assert mode(state / name) == 0o700, name
        await stop(agent)
    finally:
        await agent.kill()


def test_the_guardians_environment_holds_nothing_of_the_agents() -> None:
    """Only what an interpreter may need to start, and the doctests of the modules."""
    environ = {"SMARTMOB_TOKEN": "k", "SMARTMOB_APP_TOKEN": "a=k", "HOME": "/root",
               "PATH": "/usr/bin", "LD_LIBRARY_PATH": "/opt/lib", "LC_ALL": "C.UTF-8"}
    assert guardian.environment(environ) == {"LD_LIBRARY_PATH": "/opt/lib", "LC_ALL": "C.UTF-8"}
    for module in (guardian, privacy, redact):
        assert doctest.testmod(module).failed == 0, module


def test_the_trial_of_the_death_signal_wrapper_gets_no_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The agent tries ``setpriv`` once, before its first spawn: the trial runs with an
    empty environment, not with the agent's (which may hold its keys)."""
    monkeypatch.setenv("SMARTMOB_TOKEN", "admin-key-in-the-environment")
    seen = tmp_path / "environ"
    trial = (sys.executable, "-c",
             f"import os; open({str(seen)!r}, 'w').write(repr(dict(os.environ)))")
    assert spawn.wrapper_works(trial)
    assert "admin-key-in-the-environment" not in seen.read_text()
    assert not spawn.wrapper_works(("/bin/false",))


@pytest.mark.timeout(60)
async def test_keys_on_the_command_line_are_warned_about(tmp_path: Path) -> None:
    """--webhook-secret is a key too: in the process list for every user to read."""
    secret = "webhook-key-" + secrets.token_hex(8)
    agent = AgentProcess(tmp_path / "s", ["--webhook-secret", secret])
    try:
        await agent.start()
        assert "--webhook-secret can be read by every user of this machine" in agent.stderr
        assert secret not in agent.stderr
    finally:
        await agent.kill()


# -- keys in the log ------------------------------------------------------------------------

#: Query parameters a client might put a key in, each spelled as the request line has it.
SPELLINGS = ("TOKEN", "%74oken", "Token", "access_token", "api_key", "X-Api-Key",
             "Password", "client%5Fsecret", "%2574oken")


@pytest.mark.timeout(60)
async def test_a_key_in_any_query_parameter_is_hidden_in_every_log(tmp_path: Path) -> None:
    """The access log (debug) writes request lines; a key sent in a query, under any
    name that looks like a credential, however spelled, is hidden on stderr, in the
    agent-log answer, and in agent-log/output.log."""
    key = "query-key-" + secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMARTMOB_")}
    env["SMARTMOB_TOKEN"] = key
    agent = AgentProcess(tmp_path / "s", ["--log-level", "debug"], env=env)
    auth = {"Authorization": f"Bearer {key}"}
    try:
        await agent.start()
        async with aiohttp.ClientSession() as http:
            for name in SPELLINGS:  # encoded=True: sent exactly as written
                url = URL(f"{agent.url}/list-processes?app=shop&{name}={key}&tail=5",
                          encoded=True)
                async with http.get(url, headers=auth) as response:
                    assert response.status == 200
            await eventually(lambda: agent.stderr.count("/list-processes?") >= len(SPELLINGS),
                             what="the access log lines")
            async with http.get(agent.url + "/agent-log?tail=10000", headers=auth) as r:
                answer = "\n".join(entry["line"] for entry in await r.json())
        await stop(agent)
    finally:
        await agent.kill()
    written = (tmp_path / "s" / "agent-log" / "output.log").read_text()
    for where, text in (("stderr", agent.stderr), ("answer", answer), ("file", written)):
        assert key not in text, where
        for name in SPELLINGS:
            assert f"&{name}=[hidden]&tail=5" in text, (where, name)
        assert "?app=shop&" in text, where  # the rest of the line is kept


def test_a_key_in_a_logged_traceback_is_hidden() -> None:
    """The filter hides keys in a record's traceback too (an error quoting a URL)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactKeys())
    logger = logging.getLogger("tests.secrets.traceback")
    logger.addHandler(handler)
    try:
        try:
            raise ValueError("cannot fetch https://x.example/a.tgz?Signature=s3cr3t")
        except ValueError:
            logger.error("failed: %s", "https://x.example/?api_key=0p3n", exc_info=True)
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    for hidden in ("s3cr3t", "0p3n"):
        assert hidden not in text, text
    for shown in ("?Signature=[hidden]", "?api_key=[hidden]"):
        assert shown in text, text


# -- modes of the agent's files -------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


#: A process that says its umask and writes a file; a release; a build (requirements).
MODES_APP = make_archive({
    "Procfile": "web: umask > umask.txt && echo made > made.txt && echo ready "
                "&& exec sleep 600\nrelease: echo released\n",
    "requirements.txt": "# nothing to install: the build makes the environment only\n",
})


@pytest.mark.timeout(120)
async def test_the_agents_files_are_its_users_only_children_keep_their_umask(
    tmp_path: Path, archive_server: ArchiveServer
) -> None:
    """After a real run (a download, a build, a release, two processes' output, the
    agent's log, the database), every folder in the state folder is 0700 and every file
    0600, the state folder itself included; except what belongs to the apps, below
    folders that are 0700: the unpacked sources (their archive's modes) and the virtual
    environments (their build's). A child gets the umask the agent was given (022 here),
    or the one its request asks for, never the agent's own 077."""
    url = archive_server.add("modes.tgz", MODES_APP)
    given_umask = ["sh", "-c", 'umask 022 && exec "$@"', "sh"]
    agent = AgentProcess(tmp_path / "state", [], wrapper=given_umask,
                         env={k: v for k, v in os.environ.items()
                              if not k.startswith("SMARTMOB_")})
    state = agent.state_dir
    try:
        await agent.start()
        async with aiohttp.ClientSession() as http:
            for node, umask in (("web.0", None), ("web.1", "0027")):
                body: dict[str, Any] = {"app": "modes", "node": node, "process_type": "web",
                                        "source_url": url}
                if umask is not None:
                    body["umask"] = umask
                async with http.post(agent.url + "/create-process", json=body) as response:
                    assert response.status == 201, await response.text()
        for node in ("web.0", "web.1"):
            made = state / "processes" / f"modes.{node}" / "source" / "made.txt"
            await eventually(made.exists, timeout=60, what=f"{node} to start")
        await stop(agent)
    finally:
        await agent.kill()
    sources = state / "processes"
    assert (sources / "modes.web.0" / "source" / "umask.txt").read_text() == "0022\n"
    assert (sources / "modes.web.1" / "source" / "umask.txt").read_text() == "0027\n"
    assert mode(sources / "modes.web.0" / "source" / "made.txt") == 0o644
    apps = [*sources.glob("*/source"), *(state / "builds").glob("*/venv")]
    assert len(apps) == 3, apps
    checked = _check_modes(state, set(apps))
    for written in ("agent.db", "agent-log/output.log", "logs/modes.web.0/output.log",
                    "logs/modes.web.1/output.log"):
        assert state / written in checked, written
    for folder in ("cache", "builds"):  # the archive, the build's marks
        assert any(state / folder in path.parents and path.is_file() for path in checked)


def _check_modes(state: Path, apps: set[Path]) -> list[Path]:
    """Check every path below ``state`` (and itself) but inside ``apps``; return them."""
    checked = [state]
    assert mode(state) == 0o700
    for folder, dirs, files in os.walk(state):
        here = Path(folder)
        if here in apps:
            dirs[:] = []  # the app's own: its modes are the archive's or its build's
            continue
        for name in dirs:
            if here / name in apps:
                continue
            assert mode(here / name) == 0o700, here / name
            checked.append(here / name)
        for name in files:
            path = here / name
            assert stat.S_ISREG(path.lstat().st_mode), path
            assert mode(path) == 0o600, (path, oct(mode(path)))
            checked.append(path)
    return checked


def test_prepare_state_dir_closes_a_folder_however_it_came(tmp_path: Path) -> None:
    """A state folder made 0755 (by an older agent, or systemd's StateDirectory=) is
    made 0700 at start, or 0711 when the children's user must pass through; the private
    folders below it, 0700; missing folders above it are made 0755, whatever the umask,
    as they lead to it."""
    state = tmp_path / "above" / "more" / "state"
    previous = os.umask(0o077)
    try:
        prepare_state_dir(state, shared=False)
    finally:
        os.umask(previous)
    assert mode(state) == 0o700
    assert mode(tmp_path / "above") == mode(tmp_path / "above" / "more") == 0o755
    logs_dir, cache = state / "logs", state / "cache"
    logs_dir.mkdir(mode=0o755)
    logs_dir.chmod(0o755)
    state.chmod(0o755)
    prepare_state_dir(state, shared=True, private=(logs_dir, cache))
    assert mode(state) == 0o711
    assert mode(logs_dir) == 0o700
    assert not cache.exists()  # only closed if there


def test_an_older_log_file_is_made_private_when_written(tmp_path: Path) -> None:
    """An output log left 0644 by an older agent is 0600 once written to; a new one is
    created 0600 in a 0700 folder, whatever the umask."""
    folder = tmp_path / "logs" / "a"
    previous = os.umask(0o022)
    try:
        log = logs.ProcessLog(folder, lines=10, max_bytes=1 << 20, files=2)
        log.append("stdout", [b"one"])
        log.close()
        assert mode(folder) == 0o700
        assert mode(folder / logs.LOG_NAME) == 0o600
        (folder / logs.LOG_NAME).chmod(0o644)
        log = logs.ProcessLog(folder, lines=10, max_bytes=1 << 20, files=2)
        log.append("stdout", [b"two"])
        log.close()
    finally:
        os.umask(previous)
    assert mode(folder / logs.LOG_NAME) == 0o600


def test_children_umask_is_the_given_one_or_the_requested_one() -> None:
    """Before the agent makes its files private, children keep whatever umask they
    inherit (-1); after, the umask the agent was given, or the one requested. Run in a
    child interpreter: the umask is the whole process's."""
    script = (
        "import os; from smartmob_agent.processes import privacy as p\n"
        "os.umask(0o022)\n"
        "before = (p.children_umask(None), p.given_umask())\n"
        "p.make_files_private(); p.make_files_private()\n"
        "now = os.umask(0o077)\n"
        "print(before, now, p.children_umask(None), p.children_umask(0o027), p.given_umask())\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=30, check=True)
    assert result.stdout.split() == ["(-1,", "None)", "63", "18", "23", "18"], result
