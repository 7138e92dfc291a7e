"""Failure reasons end to end: each ``reason`` a failed process can have, produced by a
real failing source (a 404, an archive without a Procfile, a requirement pip cannot
install, a release command that fails...) on a real agent, and read where clients read
it: the status document, and the frames of the events WebSocket.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from smartmob_agent.config import Settings
from smartmob_agent.model import FailureReason, Spec
from smartmob_agent.model import ProcessState as S
from smartmob_agent.supervision.agent import Agent
from smartmob_agent.supervision.watcher import Watcher
from smartmob_agent.web.server import make_app
from tests.conftest import ArchiveServer
from tests.helpers import app_archive, make_archive, wait_for_state
from tests.hostile_archives import builders
from tests.test_build import BUILD_WAIT, USE_TINY, WHEEL, source
from tests.test_events_functional import (
    Client,
    Event,
    connect_events,
    create,
    get_json,
    is_,
    post_json,
)

SLUG = "myapp.web.0"
#: pip never looks at an index nor at the machine's configuration (see test_build).
BUILD_ENV = {"PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull,
             "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
SERVE = "web: exec sleep 1000\n"


@dataclass(frozen=True)
class Case:
    """A real way for a source to fail, and what the process must then say."""

    reason: FailureReason
    #: a fragment of its ``error``
    error: str
    #: the create request's fields (``source_url`` included), given the archive server
    #: and a folder of the test's own
    request: Callable[[ArchiveServer, Path], dict[str, Any]]
    #: added to the environment the agent gives its builds and children, given a folder
    #: of the test's own
    env: Callable[[Path], dict[str, str]] = lambda _: {}


def serve(files: dict[str, str | bytes]) -> Callable[[ArchiveServer, Path], dict[str, Any]]:
    """A request for an archive of ``files``, served as ``app.tgz``."""
    return lambda server, _: {"source_url": server.add("app.tgz", make_archive(files))}


def served(data: bytes, name: str = "app.tgz", **fields: Any) -> Callable[
    [ArchiveServer, Path], dict[str, Any]
]:
    """A request for ``data`` served as ``name``, with more create fields."""
    return lambda server, _: {"source_url": server.add(name, data), **fields}


def broken_venv_module(folder: Path) -> dict[str, str]:
    """An environment whose ``python -m venv`` finds, first on ``PYTHONPATH``, a ``venv``
    that exits 1 (as a broken or missing ``venv`` module would)."""
    package = folder / "broken" / "venv"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(
        'import sys\nsys.exit("venv: no virtual environments here (a test)")\n')
    return {"PYTHONPATH": str(folder / "broken")}


def hostile(name: str) -> Callable[[ArchiveServer, Path], dict[str, Any]]:
    """A request for the hostile archive ``name`` of the corpus, aimed at the test's own
    folder."""
    def request(server: ArchiveServer, folder: Path) -> dict[str, Any]:
        case = builders(folder / "outside")[name]()
        return {"source_url": server.add(case.filename, case.data)}
    return request


R = FailureReason
#: Every reason but ``internal error`` (a bug: see the test of its own below), each from
#: a real failure.
CASES: dict[str, Case] = {
    "404": Case(R.DOWNLOAD_FAILURE, "the server answered 404 Not Found",
                lambda server, _: {"source_url": server.url("missing.tgz")}),
    "checksum": Case(R.CHECKSUM_MISMATCH, "does not match its checksum",
                     served(app_archive(SERVE), checksum="sha256:" + "0" * 64)),
    "not-an-archive": Case(R.UNPACK_FAILURE, "not a zip or tar archive (it is an HTML page)",
                           lambda server, _: {"source_url": server.url("page.html")}),
    "tar-slip": Case(R.ARCHIVE_REFUSED, "contains '..'", hostile("tar-slip")),
    "no-procfile": Case(R.NO_PROCFILE, "the source has no Procfile at its root",
                        serve({"README": "no procfile"})),
    "bad-procfile": Case(R.BAD_PROCFILE, "the Procfile is invalid: Line 1",
                         serve({"Procfile": "this is no Procfile line\n"})),
    "bad-dotenv": Case(R.BAD_DOTENV, "the .env file is invalid: Line 2",
                       serve({"Procfile": SERVE, ".env": "GOOD=1\nno assignment\n"})),
    "unknown-type": Case(R.UNKNOWN_PROCESS_TYPE, 'the Procfile has no process type "worker"',
                         served(app_archive(SERVE), process_type="worker")),
    "release-type": Case(R.UNKNOWN_PROCESS_TYPE, "is the release phase",
                         served(app_archive(f"{SERVE}release: true\n"),
                                process_type="release")),
    "working-dir": Case(R.BAD_WORKING_DIR, "working_dir 'nope' is not a folder",
                        served(app_archive(SERVE), working_dir="nope")),
    "venv": Case(R.VIRTUAL_ENVIRONMENT_FAILURE, "creating the virtual environment exited",
                 served(source(f"web: {USE_TINY}\n", f"./{WHEEL}\n")),
                 env=broken_venv_module),
    "pip": Case(R.PIP_INSTALL_FAILURE, "pip install -r requirements.txt exited with code 1",
                served(source(f"web: {USE_TINY}\n", "./missing-1.0.tar.gz\n"))),
    "release": Case(R.RELEASE_FAILURE, "the release command exited with code 3",
                    served(app_archive(f"{SERVE}release: echo no database; exit 3\n"))),
    "not-found": Case(R.START_FAILURE, "cannot run: /bin/sh exited with code 127",
                      served(app_archive("web: no-such-command-for-the-test\n"))),
    "crash-loop": Case(R.MAX_RESTARTS, "gave up after 2 failed start(s) in a row",
                       served(app_archive("web: exit 1\n"), max_restarts=1)),
}


def test_every_reason_but_internal_error_has_a_case() -> None:
    """The cases below cover the whole closed set (``internal error`` has a test of its
    own, since no source can cause a bug)."""
    assert {case.reason for case in CASES.values()} == set(R) - {R.INTERNAL_ERROR}


def check_failure_events(events: list[Event], reason: str) -> None:
    """The events up to the failure: ``reason`` on the change to ``failed`` and on
    ``process:exception``, ``null`` on every event before."""
    *before, to_failed, exception = events
    assert (to_failed["event"], to_failed["state"]) == ("process:state", "failed")
    assert to_failed["reason"] == exception["reason"] == reason
    assert exception["event"] == "process:exception"
    assert [event["reason"] for event in before] == [None] * len(before), before


@pytest.mark.timeout(BUILD_WAIT * 2)
@pytest.mark.parametrize("name", list(CASES))
async def test_each_reason_comes_from_a_real_failure(
    name: str, settings: Settings, tmp_path: Path, archive_server: ArchiveServer,
    aiohttp_client: Callable[..., Any],
) -> None:
    """A source that fails in each way gets its process ``failed`` with the one reason of
    that way, in the status document and in the events frames; until then ``reason`` is
    ``null``."""
    case = CASES[name]
    request = case.request(archive_server, tmp_path)
    env = {**os.environ, **BUILD_ENV, **case.env(tmp_path)}
    async with Agent(settings, base_env=env) as agent:
        client: Client = await aiohttp_client(make_app(settings, agent))
        events = await connect_events(client, slug=SLUG)
        created = await create(client, **request)
        assert (created["state"], created["reason"]) == ("pending", None)
        seen = await events.until(is_("exception"), timeout=BUILD_WAIT)
        check_failure_events(seen, case.reason.value)
        status = await get_json(client, created["details"])
        assert (status["state"], status["reason"]) == ("failed", case.reason.value)
        assert case.error in status["error"], status["error"]
        await events.ws.close()


async def test_the_reason_is_cleared_when_the_process_leaves_failed(
    client: Client, agent: Agent, archive_server: ArchiveServer,
) -> None:
    """A start control after a failure: every event of the new attempt has ``reason``
    ``null`` until it fails again, with its reason again."""
    url = archive_server.add("app.tgz", make_archive({"README": "no procfile"}))
    events = await connect_events(client, slug=SLUG)
    created = await create(client, url)
    check_failure_events(await events.until(is_("exception")), "no procfile")
    await post_json(client, created["start"])
    again = await events.until(is_("exception"))
    assert [event["state"] for event in again[:2]] == ["pending", "downloading"]
    check_failure_events(again, "no procfile")
    assert (await get_json(client, created["details"]))["reason"] == "no procfile"
    await post_json(client, created["stop"])
    stopped = await events.until(is_("state", state="stopped"))
    assert [event["reason"] for event in stopped] == [None] * len(stopped)
    assert (await get_json(client, created["details"]))["reason"] is None
    await events.ws.close()


async def test_a_bug_of_the_agent_is_an_internal_error(
    client: Client, agent: Agent, archive_server: ArchiveServer,
) -> None:
    """An error the agent did not foresee (here, a listener that corrupts the state while
    a child is spawned, as in test_faults) fails the process with ``internal error``."""
    url = archive_server.add("app.tgz", app_archive(SERVE))
    events = await connect_events(client, slug=SLUG)
    watcher = agent.create(Spec("myapp", "web.0", "web", url))

    def corrupt(w: Watcher, old: S, new: S) -> None:
        if new is S.STARTING:
            w.state = S.STOPPED  # the bug: the state says stopped, the loop spawns

    watcher.add_listener(corrupt)
    check_failure_events(await events.until(is_("exception")), "internal error")
    await wait_for_state(watcher, S.FAILED)
    assert watcher.reason is R.INTERNAL_ERROR
    status = await get_json(client, str(client.make_url(f"/process-status/{SLUG}")))
    assert status["reason"] == "internal error"
    assert status["error"].startswith("internal error of the agent: InvalidTransition")
    await events.ws.close()
