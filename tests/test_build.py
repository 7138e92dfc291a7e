"""The build step and release phase (issue 4), on real processes: a real ``venv``, a real
pip installing a wheel made here (no network: ``PIP_NO_INDEX``, no configuration file),
real release commands, a real agent serving archives from 127.0.0.1.

Counts of runs come from :class:`~smartmob_agent.sources.builds.Builds`; the states from the
watchers' own state-change events, and the output from the processes' logs.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import doctest
import hashlib
import io
import os
import shutil
import zipfile
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import psutil
import pytest

from smartmob_agent.config import Settings
from smartmob_agent.model import Options, RestartPolicy, Spec
from smartmob_agent.model import ProcessState as S
from smartmob_agent.sources import buildplan as build
from smartmob_agent.sources.builds import Builds
from smartmob_agent.sources.procfile import ProcfileEntry
from smartmob_agent.supervision.agent import Agent
from smartmob_agent.supervision.watcher import Watcher
from tests.conftest import ArchiveServer
from tests.helpers import eventually, make_archive, pid_alive, record_states, wait_for_state

#: A build makes a virtual environment and runs pip: seconds on a busy machine.
BUILD_WAIT = 60.0
WHEEL = "tiny-1.0-py3-none-any.whl"
#: Imports the installed package and says where its interpreter lives.
USE_TINY = (
    'python -c "import os, sys, tiny; print(tiny.X, sys.prefix == os.environ[\'VIRTUAL_ENV\'])"'
)


def tiny_wheel() -> bytes:
    """A wheel of the package ``tiny`` (``tiny.X == 42``), made by hand: a zip with the
    package, its METADATA, WHEEL and RECORD."""
    files = {
        "tiny/__init__.py": b"X = 42\n",
        "tiny-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: tiny\nVersion: 1.0\n",
        "tiny-1.0.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            record.append(f"{name},sha256={digest.decode()},{len(data)}")
        record.append("tiny-1.0.dist-info/RECORD,,")
        wheel.writestr("tiny-1.0.dist-info/RECORD", "\n".join(record) + "\n")
    return buffer.getvalue()


#: A local project whose build never ends: its in-tree build backend writes its pid to
#: $SLOW_PID_FILE and sleeps (it needs nothing installed, so pip runs it offline).
SLOW_PROJECT: dict[str, str | bytes] = {
    "slow/pyproject.toml": (
        '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n'
    ),
    "slow/backend.py": (
        "import os, time\n"
        "def get_requires_for_build_wheel(config_settings=None):\n"
        "    with open(os.environ['SLOW_PID_FILE'], 'w') as file:\n"
        "        file.write(str(os.getpid()))\n"
        "    time.sleep(1000)\n"
    ),
}


def read_pid(path: Path) -> int | None:
    """The pid written in ``path``, once it is there whole."""
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def source(procfile: str, requirements: str | None = None,
           extra: Mapping[str, str | bytes] | None = None) -> bytes:
    """An app archive: a Procfile, the tiny wheel, and a requirements.txt if given."""
    files: dict[str, str | bytes] = {"Procfile": procfile, WHEEL: tiny_wheel()}
    if requirements is not None:
        files["requirements.txt"] = requirements
    files.update(extra or {})
    return make_archive(files)


@pytest.fixture
def pid_file(tmp_path: Path) -> Path:
    return tmp_path / "slow.pid"


@pytest.fixture
def build_env(pid_file: Path) -> dict[str, str]:
    """The agent's environment: pip never looks at an index nor at the machine's pip
    configuration (whatever it says), and never asks whether it is up to date."""
    return {
        **os.environ, "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull,
        "PIP_DISABLE_PIP_VERSION_CHECK": "1", "SLOW_PID_FILE": str(pid_file),
    }


@pytest.fixture
async def agent(settings: Settings, build_env: dict[str, str]) -> AsyncIterator[Agent]:
    async with Agent(settings, base_env=build_env) as agent:
        yield agent


def spec(url: str, node: str = "web.0", process_type: str = "web", *, app: str = "shop",
         **options: Any) -> Spec:
    return Spec(app, node, process_type, url, options=Options(**options))


async def output(watcher: Watcher) -> list[str]:
    """Every line in the process's log."""
    return [line.line for line in await watcher.output_log.read(10_000)]


def in_folder(pid: int, watcher: Watcher) -> bool:
    """Whether process ``pid`` works in the work folder of ``watcher``."""
    return Path(psutil.Process(pid).cwd()).is_relative_to(watcher.workdir.resolve())


def builds_of(agent: Agent) -> Builds:
    assert agent.builds is not None
    return agent.builds


def build_folders(agent: Agent) -> list[str]:
    """The build folders, not counting those being removed."""
    return sorted(p.name for p in agent.builds_dir.iterdir() if not p.name.startswith("."))


# -- the build -------------------------------------------------------------------------


async def test_requirements_are_installed_and_the_environment_is_first_on_path(
    agent: Agent, archive_server: ArchiveServer
) -> None:
    """A source with a requirements.txt goes through ``building``; its process runs with
    the environment's python (``VIRTUAL_ENV`` set, first on PATH) and imports what pip
    installed; pip's output is in the process's log."""
    url = archive_server.add("app.tgz", source(f"web: {USE_TINY}\n", f"./{WHEEL}\n"))
    watcher = agent.create(spec(url, restart=RestartPolicy.NEVER))
    states = record_states(watcher)
    await wait_for_state(watcher, S.EXITED, S.FAILED, timeout=BUILD_WAIT)
    assert watcher.state is S.EXITED, watcher.error
    assert states[:4] == [S.DOWNLOADING, S.UNPACKING, S.BUILDING, S.STARTING]
    lines = await output(watcher)
    assert "42 True" in lines
    assert any("Successfully installed tiny-1.0" in line for line in lines), lines
    assert builds_of(agent).builds_run == 1
    [key] = build_folders(agent)
    assert key == watcher.build_key
    assert (agent.builds_dir / key / "built").is_file()


async def test_a_source_without_anything_to_build_skips_building(
    agent: Agent, archive_server: ArchiveServer
) -> None:
    """No requirements.txt and no release entry: straight from unpacking to starting, no
    build folder, the agent's PATH untouched."""
    url = archive_server.add("app.tgz", source('web: echo "$PATH"; echo "${VIRTUAL_ENV-none}"\n'))
    watcher = agent.create(spec(url, restart=RestartPolicy.NEVER))
    states = record_states(watcher)
    await wait_for_state(watcher, S.EXITED, S.FAILED)
    assert S.BUILDING not in states
    assert await output(watcher) == [os.environ["PATH"], os.environ.get("VIRTUAL_ENV", "none")]
    assert build_folders(agent) == []


async def test_processes_of_one_source_share_one_build(
    agent: Agent, archive_server: ArchiveServer
) -> None:
    """Two processes created together wait for one build (both see its output); a third
    one later uses it without building, nor entering ``building``."""
    url = archive_server.add(
        "app.tgz", source(f"web: {USE_TINY} && exec sleep 1000\n", f"./{WHEEL}\n")
    )
    first = agent.create(spec(url, "web.0"))
    second = agent.create(spec(url, "web.1"))
    for watcher in (first, second):
        await wait_for_state(watcher, S.RUNNING, S.FAILED, timeout=BUILD_WAIT)
        assert watcher.state is S.RUNNING, watcher.error
    assert builds_of(agent).builds_run == 1
    for watcher in (first, second):
        def said_so(watcher: Watcher = watcher) -> bool:
            return b"42 True" in watcher.hub.recent

        await eventually(said_so, what="42 True")
        assert any("Successfully installed tiny-1.0" in line for line in await output(watcher))
    third = agent.create(spec(url, "web.2"))
    states = record_states(third)
    await wait_for_state(third, S.RUNNING, S.FAILED, timeout=BUILD_WAIT)
    assert S.BUILDING not in states
    await eventually(lambda: b"42 True" in third.hub.recent, what="42 True")
    assert builds_of(agent).builds_run == 1
    assert len(build_folders(agent)) == 1


async def test_failing_requirements_fail_the_process_with_the_tail_of_pip(
    agent: Agent, archive_server: ArchiveServer
) -> None:
    """A requirement pip cannot install: ``failed``, the error names the step and quotes
    pip's last lines; nothing is left under the key; a later start tries again."""
    url = archive_server.add("app.tgz", source(f"web: {USE_TINY}\n", "./missing-1.0.tar.gz\n"))
    watcher = agent.create(spec(url))
    await wait_for_state(watcher, S.FAILED, S.RUNNING, timeout=BUILD_WAIT)
    assert watcher.state is S.FAILED
    error = watcher.error or ""
    assert error.startswith("pip install -r requirements.txt exited with code 1; its last "
                            "lines of output:\n"), error
    assert "missing-1.0.tar.gz" in error
    assert len(error.splitlines()) <= 1 + build.TAIL_LINES
    assert watcher.pid is None
    assert not watcher.exits
    assert build_folders(agent) == []
    await watcher.request_start()
    await wait_for_state(watcher, S.FAILED, timeout=BUILD_WAIT)
    assert builds_of(agent).builds_run == 2


async def test_a_build_that_overruns_the_timeout_is_stopped(
    settings: Settings, build_env: dict[str, str], archive_server: ArchiveServer,
    pid_file: Path,
) -> None:
    """Past --build-timeout, pip and what it runs are stopped and the process fails.

    The backend must have started for its stop to be seen: on a machine too loaded for
    pip to reach it in time, the build is tried again with twice the timeout."""
    url = archive_server.add("app.tgz", source("web: true\n", "./slow\n", SLOW_PROJECT))
    for timeout in (2, 4, 8, 16):
        with contextlib.suppress(FileNotFoundError):
            os.remove(pid_file)  # an earlier try's
        quick = dataclasses.replace(settings, build_timeout=float(timeout),
                                    state_dir=settings.state_dir / str(timeout))
        async with Agent(quick, base_env=build_env) as agent:
            watcher = agent.create(spec(url))
            await wait_for_state(watcher, S.FAILED, timeout=BUILD_WAIT + timeout)
            assert f"did not finish within {timeout} s (--build-timeout)" in (
                watcher.error or "")
            backend = read_pid(pid_file)
            assert build_folders(agent) == []
            if backend is not None:
                assert not pid_alive(backend)  # stopped by the timeout, the agent still up
                return
    raise AssertionError("pip never reached the build backend, even in 16 s")


async def test_a_stop_during_the_build_stops_pip(
    agent: Agent, archive_server: ArchiveServer, pid_file: Path
) -> None:
    """A stop while pip runs stops pip and every process it started (the build backend),
    removes the half-made environment, and ends ``stopped``."""
    url = archive_server.add("app.tgz", source("web: true\n", "./slow\n", SLOW_PROJECT))
    watcher = agent.create(spec(url))
    await wait_for_state(watcher, S.BUILDING, timeout=BUILD_WAIT)
    await eventually(lambda: read_pid(pid_file) is not None,
                     timeout=BUILD_WAIT, what="the build backend started")
    backend = read_pid(pid_file)
    assert backend is not None
    assert pid_alive(backend)
    await agent.control(watcher, "stop")
    assert watcher.state is S.STOPPED
    assert watcher.error is None
    assert not pid_alive(backend)
    assert build_folders(agent) == []


async def test_a_waiting_process_builds_again_when_the_building_one_is_deleted(
    agent: Agent, archive_server: ArchiveServer, pid_file: Path
) -> None:
    """The build runs in the folder of the process that started it: deleting that one
    stops it, and a process that was waiting for it runs the build itself."""
    url = archive_server.add("app.tgz", source("web: true\n", "./slow\n", SLOW_PROJECT))
    first = agent.create(spec(url, "web.0"))
    second = agent.create(spec(url, "web.1"))
    for watcher in (first, second):
        await wait_for_state(watcher, S.BUILDING, timeout=BUILD_WAIT)
    await eventually(lambda: read_pid(pid_file) is not None,
                     timeout=BUILD_WAIT, what="the build backend started")
    backend = read_pid(pid_file)
    assert backend is not None
    # whichever finished unpacking first runs the build, in its own folder
    builder, waiter = (first, second) if in_folder(backend, first) else (second, first)
    assert in_folder(backend, builder)
    os.unlink(pid_file)
    await agent.delete(builder.spec.slug)
    assert not pid_alive(backend)
    await eventually(lambda: read_pid(pid_file) is not None,
                     timeout=BUILD_WAIT, what="the second build started")
    assert builds_of(agent).builds_run == 2
    assert waiter.state is S.BUILDING
    again = read_pid(pid_file)
    assert again is not None
    assert in_folder(again, waiter)
    await agent.delete(waiter.spec.slug)
    assert not pid_alive(again)


# -- the release phase -------------------------------------------------------------------

RELEASE = (
    "release: env STEP=migrations python -c \"import os, tiny; "
    "print('release', os.environ['STEP'], tiny.X, os.environ['GREETING'])\"\n"
    "web: echo web started && exec sleep 1000\n"
)


async def test_the_release_runs_once_before_the_processes_start(
    settings: Settings, build_env: dict[str, str], archive_server: ArchiveServer
) -> None:
    """The release command runs once for two processes created together, before either
    starts, with the environment of a process (the build's python, the request's env, its
    Procfile line's variables); an agent restart does not run it again."""
    url = archive_server.add("app.tgz", source(RELEASE, f"./{WHEEL}\n"))
    started_before_release: list[str] = []
    async with Agent(settings, base_env=build_env) as agent:
        watchers = [
            agent.create(Spec("shop", f"web.{n}", "web", url, env={"GREETING": "hi"}))
            for n in range(2)
        ]

        def check(watcher: Watcher, old: S, new: S) -> None:
            key = watcher.build_key
            if new is S.RUNNING and (key is None or not builds.is_released(key, "shop")):
                started_before_release.append(watcher.spec.slug)

        builds = builds_of(agent)
        for watcher in watchers:
            watcher.add_listener(check)
        for watcher in watchers:
            await wait_for_state(watcher, S.RUNNING, S.FAILED, timeout=BUILD_WAIT)
            assert watcher.state is S.RUNNING, watcher.error
            lines = await output(watcher)
            assert "release migrations 42 hi" in lines, lines
        assert started_before_release == []
        assert builds.releases_run == 1
        assert builds.builds_run == 1
    seen: list[tuple[str, str]] = []
    agent = Agent(settings, base_env=build_env)
    agent.events.add_listener(
        lambda event: seen.append((event["slug"], event["state"]))
        if event["event"] == "process:state" else None
    )
    async with agent:
        for watcher in agent.watchers():
            await wait_for_state(watcher, S.RUNNING, S.FAILED, timeout=BUILD_WAIT)
            assert watcher.state is S.RUNNING, watcher.error
        assert builds_of(agent).releases_run == 0
        assert builds_of(agent).builds_run == 0
        assert ("shop.web.0", "building") not in seen
        assert ("shop.web.0", "starting") in seen


async def test_a_failed_release_fails_the_start(
    agent: Agent, archive_server: ArchiveServer
) -> None:
    """A release command that exits with another code than 0: ``failed`` with its last
    lines, no process started; a later start runs it again."""
    url = archive_server.add("app.tgz", source(
        "release: echo migrating; echo 'cannot reach the database' >&2; exit 3\n"
        "web: exec sleep 1000\n"
    ))
    watcher = agent.create(spec(url))
    states = record_states(watcher)
    await wait_for_state(watcher, S.FAILED, S.RUNNING, timeout=BUILD_WAIT)
    assert S.BUILDING in states
    assert S.STARTING not in states
    head, _, tail = (watcher.error or "").partition("\n")
    assert head == "the release command exited with code 3; its last lines of output:"
    # two pipes: the order of lines of stdout and stderr is not kept between them
    assert sorted(tail.splitlines()) == ["cannot reach the database", "migrating"]
    assert watcher.pid is None
    assert not watcher.exits
    assert sorted(await output(watcher)) == ["cannot reach the database", "migrating"]
    await watcher.request_start()
    await wait_for_state(watcher, S.FAILED, timeout=BUILD_WAIT)
    assert builds_of(agent).releases_run == 2


async def test_a_stop_during_the_release_stops_it(
    agent: Agent, archive_server: ArchiveServer, tmp_path: Path
) -> None:
    """A stop while the release command runs stops it (and its children), records no
    release, and a later start runs it again."""
    pid_file = tmp_path / "release.pid"
    url = archive_server.add("app.tgz", source(
        f"release: sh -c 'echo $$ > {pid_file}; exec sleep 1000'\nweb: exec sleep 1000\n"
    ))
    watcher = agent.create(spec(url))
    await wait_for_state(watcher, S.BUILDING)
    await eventually(lambda: read_pid(pid_file) is not None, what="the release started")
    release = read_pid(pid_file)
    assert release is not None
    await agent.control(watcher, "stop")
    assert watcher.state is S.STOPPED
    assert not pid_alive(release)
    key = watcher.build_key
    assert key is not None
    assert not builds_of(agent).is_released(key, "shop")


async def test_release_is_not_a_process_type(
    agent: Agent, archive_server: ArchiveServer
) -> None:
    """The release entry runs as the release phase only, never as a process."""
    url = archive_server.add("app.tgz", source("release: true\nweb: exec sleep 1000\n"))
    watcher = agent.create(spec(url, "release.0", "release"))
    await wait_for_state(watcher, S.FAILED)
    assert "release phase" in (watcher.error or "")


async def test_a_restored_process_builds_again_when_its_build_is_gone(
    settings: Settings, build_env: dict[str, str], archive_server: ArchiveServer
) -> None:
    """An agent that reuses an unpacked source whose build was removed goes from
    ``pending`` to ``building`` (no download), and the process runs with it again."""
    url = archive_server.add(
        "app.tgz", source(f"web: {USE_TINY} && exec sleep 1000\n", f"./{WHEEL}\n")
    )
    async with Agent(settings, base_env=build_env) as agent:
        watcher = agent.create(spec(url))
        await wait_for_state(watcher, S.RUNNING, S.FAILED, timeout=BUILD_WAIT)
        assert watcher.state is S.RUNNING, watcher.error
    shutil.rmtree(settings.state_dir / "builds")
    downloads = archive_server.hits("app.tgz")
    seen: list[tuple[str | None, str]] = []
    agent = Agent(settings, base_env=build_env)
    agent.events.add_listener(
        lambda event: seen.append((event.get("previous"), event["state"]))
        if event["event"] == "process:state" else None
    )
    async with agent:
        watcher = agent.get("shop.web.0")
        await wait_for_state(watcher, S.RUNNING, S.FAILED, timeout=BUILD_WAIT)
        assert watcher.state is S.RUNNING, watcher.error
        assert seen[:2] == [("pending", "building"), ("building", "starting")]
        assert builds_of(agent).builds_run == 1
        await eventually(lambda: b"42 True" in watcher.hub.recent, what="42 True")
    assert archive_server.hits("app.tgz") == downloads


async def test_unused_builds_are_collected_but_the_last_few(
    agent: Agent, archive_server: ArchiveServer
) -> None:
    """Deleting processes removes the builds nobody uses, except the most recent ones."""
    builds = builds_of(agent)
    builds.keep = 1
    keys = []
    for n in range(3):
        url = archive_server.add(f"app{n}.tgz", source(
            f"web: {USE_TINY}\n# version {n}\n", f"./{WHEEL}\n"
        ))
        watcher = agent.create(spec(url, restart=RestartPolicy.NEVER))
        await wait_for_state(watcher, S.EXITED, S.FAILED, timeout=BUILD_WAIT)
        assert watcher.state is S.EXITED, watcher.error
        keys.append(watcher.build_key)
        await agent.delete("shop.web.0")
    assert build_folders(agent) == [keys[-1]]


# -- the pure parts ------------------------------------------------------------------------


def test_the_doctests_of_the_build_module() -> None:
    assert doctest.testmod(build).failed == 0


def test_the_build_key_depends_on_the_archive_and_the_interpreter() -> None:
    key = build.build_key("a" * 64, "/usr/bin/python3", "3.11.7")
    assert key == build.build_key("a" * 64, "/usr/bin/python3", "3.11.7")
    assert key != build.build_key("b" * 64, "/usr/bin/python3", "3.11.7")
    assert key != build.build_key("a" * 64, "/opt/python3", "3.11.7")
    assert key != build.build_key("a" * 64, "/usr/bin/python3", "3.11.8")


def test_the_plan() -> None:
    web = ProcfileEntry("serve", {})
    assert not build.plan(False, {"web": web}).needed
    assert build.plan(True, {"web": web}).needed
    release = ProcfileEntry("migrate", {"A": "1"})
    planned = build.plan(False, {"web": web, "release": release})
    assert planned.needed
    assert planned.release is release
    assert not planned.requirements


def test_the_environment_goes_first_on_whatever_path_was_set() -> None:
    env = build.activate({"PATH": "/request/bin", "PYTHONHOME": "/x", "A": "b"}, "/v")
    assert env == {"PATH": "/v/bin:/request/bin", "VIRTUAL_ENV": "/v", "A": "b"}
