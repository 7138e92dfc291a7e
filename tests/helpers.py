"""Test helpers: archives built in memory, waits on real events with deadlines."""

from __future__ import annotations

import asyncio
import io
import shlex
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable, Mapping
from typing import Literal

from smartmob_agent.model import ProcessState
from smartmob_agent.supervision.watcher import Watcher

#: The interpreter running the tests, quoted for a Procfile line.
PYTHON = shlex.quote(sys.executable)

ARCHIVE_KINDS = ("zip", "tar", "tar.gz", "tar.bz2", "tar.xz")

#: A mode of :func:`tarfile.open` that writes an archive (typeshed types modes as literals).
TarWriteMode = Literal["w", "w:gz", "w:bz2", "w:xz"]
_TAR_WRITE_MODES: dict[str, TarWriteMode] = {
    "tar": "w", "tar.gz": "w:gz", "tar.bz2": "w:bz2", "tar.xz": "w:xz",
}


def tar_write_mode(kind: str) -> TarWriteMode:
    """The :func:`tarfile.open` mode that writes a ``tar``, ``tar.gz``, ``tar.bz2`` or
    ``tar.xz`` archive."""
    return _TAR_WRITE_MODES[kind]


def make_archive(
    files: Mapping[str, str | bytes],
    kind: str = "tar.gz",
    *,
    top: str = "",
    executable: frozenset[str] = frozenset(),
) -> bytes:
    """Build an archive of ``files`` (name -> content) in memory.

    Args:
        kind: ``zip``, ``tar``, ``tar.gz``, ``tar.bz2`` or ``tar.xz``.
        top: put every file under this folder (as GitHub archives do).
        executable: names whose mode gets the executable bits.
    """
    buffer = io.BytesIO()
    prefix = f"{top}/" if top else ""
    if kind == "zip":
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, content in files.items():
                info = zipfile.ZipInfo(prefix + name)
                info.external_attr = (0o100755 if name in executable else 0o100644) << 16
                data = content.encode() if isinstance(content, str) else content
                archive.writestr(info, data)
        return buffer.getvalue()
    with tarfile.open(fileobj=buffer, mode=tar_write_mode(kind)) as tar:
        for name, content in files.items():
            data = content.encode() if isinstance(content, str) else content
            member = tarfile.TarInfo(prefix + name)
            member.size = len(data)
            member.mode = 0o755 if name in executable else 0o644
            member.mtime = int(time.time())
            tar.addfile(member, io.BytesIO(data))
    return buffer.getvalue()


def app_archive(
    procfile: str, scripts: Mapping[str, str | bytes] | None = None, kind: str = "tar.gz",
    top: str = "",
) -> bytes:
    """An app: a Procfile plus Python scripts or other files (``{PYTHON}`` in the Procfile
    is the test's)."""
    files: dict[str, str | bytes] = {"Procfile": procfile.replace("{PYTHON}", PYTHON)}
    files.update(scripts or {})
    return make_archive(files, kind, top=top)


async def wait_for_state(
    watcher: Watcher, *states: ProcessState, timeout: float = 10.0
) -> ProcessState:
    """Wait until the watcher is in one of ``states``; fail after ``timeout`` seconds."""
    if watcher.state in states:
        return watcher.state
    reached: asyncio.Future[ProcessState] = asyncio.get_running_loop().create_future()

    def listener(_: Watcher, old: ProcessState, new: ProcessState) -> None:
        if new in states and not reached.done():
            reached.set_result(new)

    watcher.add_listener(listener)
    try:
        async with asyncio.timeout(timeout):
            return await reached
    except TimeoutError:
        raise AssertionError(
            f"{watcher.spec.slug} did not reach {[str(s) for s in states]} within "
            f"{timeout} s; it is {watcher.state} (error: {watcher.error})"
        ) from None
    finally:
        watcher.remove_listener(listener)


def record_states(watcher: Watcher) -> list[ProcessState]:
    """Return a list that fills with every state the watcher enters from now on."""
    seen: list[ProcessState] = []
    watcher.add_listener(lambda _, old, new: seen.append(new))
    return seen


async def eventually(
    predicate: Callable[[], bool], *, timeout: float = 10.0, what: str = "condition"
) -> None:
    """Wait for ``predicate()`` to hold, checking at each loop turn and every 10 ms.

    For conditions no event announces (a process vanishing from the OS table).
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        await asyncio.sleep(0.01)


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            state = file.read().rsplit(b")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in (b"Z", b"X")
