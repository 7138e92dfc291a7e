"""The hostile-archive corpus (:mod:`tests.hostile_archives`) against a real agent.

Each archive is served by a real HTTP server on 127.0.0.1 and named in a create request
to an agent driven through its HTTP API. A hostile one must leave the process ``failed``
with an ``error`` that says what was wrong (and, for a limit, which limit and its value);
an odd but harmless one (unicode names, setuid bits) must run, unpacked exactly. Either
way the test checks the file system: nothing appeared or changed outside the state folder
(an ``outside`` folder next to it is what the escapes aim at), nothing inside it but the
process's own folders and the cached archive, no partial file, and ``/etc/passwd``
untouched.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from smartmob_agent.config import Settings
from smartmob_agent.model import ProcessState as S
from smartmob_agent.supervision.agent import Agent
from smartmob_agent.web.server import make_app
from tests.conftest import ArchiveServer
from tests.helpers import wait_for_state
from tests.hostile_archives import Hostile, builders

Client = TestClient[Any, Any]
#: Where the escapes aim, in every test's tmp_path (the corpus is built once, at import).
OUTSIDE_NAME = "outside"
#: The names only: each test builds its own case, aimed at its own folder.
CASES = list(builders(Path("/nonexistent")))


def snapshot(root: Path, skip: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under ``root`` but ``skip``, with its mode, size and modification time."""
    found = {}
    for folder, dirs, files in os.walk(root):
        if Path(folder) == skip or skip in Path(folder).parents:
            continue
        for name in dirs + files:
            path = os.path.join(folder, name)
            if Path(path) == skip:
                continue  # the state folder's own mtime changes whenever the agent writes in it
            info = os.lstat(path)
            found[os.path.relpath(path, root)] = (info.st_mode, info.st_size, info.st_mtime_ns)
    return found


def state_files(state: Path) -> set[str]:
    """Every file (not folder) under the state folder, relative to it."""
    return {
        os.path.relpath(os.path.join(folder, name), state)
        for folder, _, files in os.walk(state) for name in files
    }


def passwd() -> tuple[int, int, int]:
    info = os.stat("/etc/passwd")
    return info.st_nlink, info.st_size, info.st_mtime_ns


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", CASES)
async def test_hostile_archive(
    name: str, tmp_path: Path, archive_server: ArchiveServer,
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> None:
    """Each hostile archive fails with a clear error and its reason (``archive refused``
    for an unsafe one or one over a limit, ``unpack failure`` for a broken one) and
    writes nothing outside the work folder; each odd but harmless one runs, unpacked
    exactly."""
    outside = tmp_path / OUTSIDE_NAME
    outside.mkdir()
    case: Hostile = builders(outside)[name]()
    state = tmp_path / "state"
    settings = dataclasses.replace(
        Settings(host="127.0.0.1", port=0, state_dir=state, stop_timeout=5.0,
                 download_stall=5.0),
        **case.settings,
    )
    url = archive_server.add(case.filename, case.data)
    async with Agent(settings) as agent:
        client = await aiohttp_client(make_app(settings, agent))
        before = snapshot(tmp_path, state)
        passwd_before = passwd()
        state_before = state_files(state)
        index = await (await client.get("/")).json()
        body = {"app": "hostile", "node": "web.0", "process_type": "web", "source_url": url}
        response = await client.session.post(index["create"], json=body)
        assert response.status == 201, await response.text()
        watcher = agent.get("hostile.web.0")
        expected = S.FAILED if case.error is not None else S.RUNNING
        reached = await wait_for_state(watcher, S.FAILED, S.RUNNING, timeout=30)
        document = await (await client.get(f"/process-status/{watcher.spec.slug}")).json()
        assert reached == expected, document.get("error")
        assert document["reason"] == (None if case.error is None else case.reason), document
        if case.error is not None:
            error = document["error"]
            assert any(part in error for part in case.error.split("|")), error
            assert "\n" not in error
        if case.error is not None and not case.unpacks:
            # partial files removed: the unpacked tree is gone
            assert not (watcher.workdir / "source").exists()
        else:
            check_unpacked(watcher.workdir / "source", case)
        # nothing outside the state folder appeared or changed; /etc/passwd untouched
        assert snapshot(tmp_path, state) == before
        assert list(outside.iterdir()) == []
        assert passwd() == passwd_before
        # inside: the cached archive, the process's folders, nothing half-written
        new = state_files(state) - state_before
        slug = watcher.spec.slug
        for path in new:
            allowed = (f"processes/{slug}/", f"logs/{slug}/", "cache/", "agent-log/")
            assert path.startswith(allowed), path
            assert not path.endswith(".part"), path
        assert any(path.startswith("cache/") and path.endswith(".archive") for path in new)


def check_unpacked(source: Path, case: Hostile) -> None:
    """The files of an accepted case are there, with their exact names and contents, and
    no set-uid or set-gid bit survived."""
    for name, content in case.files.items():
        raw = name if isinstance(name, bytes) else os.fsencode(name)
        path = os.path.join(os.fsencode(source), raw)
        with open(path, "rb") as file:
            assert file.read() == content, name
        assert not os.stat(path).st_mode & (stat.S_ISUID | stat.S_ISGID), name
    names = {os.fsdecode(entry) for entry in os.listdir(os.fsencode(source))}
    expected = {os.fsdecode(name).split("/")[0] for name in case.files}
    if case.error is None:
        expected.add("Procfile")
    assert names == expected
