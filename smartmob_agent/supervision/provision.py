"""Provisioning: what happens once before a process's first child, in its work folder.

A :class:`Provisioner` gets the source archive (from the cache, or downloaded into it),
unpacks it, reads the Procfile and ``.env`` at its root, builds the source and runs its
release command if it has them (see :ref:`lifecycle-build`), and returns the
:class:`Command` every child of the process runs. It marks the work folder as it goes,
so that a later agent reuses a source that was completely unpacked.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from smartmob_agent.errors import AgentError, NoProcfile, ProcfileError, WorkingDirError
from smartmob_agent.model import DownloadProgress, ProcessState, RunAs, Spec
from smartmob_agent.processes.spawn import Sink
from smartmob_agent.processes.users import give_tree
from smartmob_agent.sources import buildplan as build
from smartmob_agent.sources import dotenv, procfile, unpack
from smartmob_agent.supervision.runtime import Runtime

log = logging.getLogger("smartmob_agent.watcher")  # stable name: its messages were the watcher's

S = ProcessState
#: Set in the environment of every child of a process, with a value of its own: the
#: descendants that escape its process group are found by it (see
#: :func:`~smartmob_agent.processes.stop.stop_marked`).
PROCESS_ID_VARIABLE = "SMARTMOB_PROCESS_ID"
#: Written in a work folder once its source is completely unpacked: the source root,
#: relative to ``source/``.
UNPACKED_MARK = "unpacked"
#: Written in a work folder before :data:`UNPACKED_MARK`: the SHA-256 of the archive the
#: source came from, which names its build.
DIGEST_FILE = "source.sha256"
#: The most a ``.env`` file may hold.
_DOTENV_LIMIT = dotenv.MAX_DOTENV_BYTES


def child_environment(
    base: Mapping[str, str],
    procfile_env: Mapping[str, str],
    request_env: Mapping[str, str],
    forced: Mapping[str, str] = MappingProxyType({}),
    dotenv_env: Mapping[str, str] = MappingProxyType({}),
) -> dict[str, str]:
    """Merge the environments of a child, later layers winning: the agent's own, the
    source's ``.env``, the Procfile line's, the request's ``env``, then the variables the
    agent sets itself (its ids, which the guardian looks for, and ``PORT`` unless the
    request set it)."""
    return {**base, **dotenv_env, **procfile_env, **request_env, **forced}


@dataclass(frozen=True)
class Command:
    """What each child of a process executes, fixed once its source is provisioned."""

    command: str
    cwd: Path
    env: Mapping[str, str]


@dataclass(frozen=True)
class Version:
    """A version of a process, provisioned and ready to run: what an update installs
    (see :meth:`.Watcher.adopt`)."""

    spec: Spec
    source: Provisioner
    command: Command
    #: the value of :data:`PROCESS_ID_VARIABLE` of its children
    process_id: str
    #: the ``PORT`` of its children, if the agent gave them one
    port: int | None


class Provisioner:
    """Gets the command of one process ready to run, in its work folder.

    Args:
        spec: what was asked for.
        workdir: the process's work folder.
        runtime: shared collaborators (the source cache, the builds, the environments).
        enter: moves the process to a state (``downloading``, ``unpacking``,
            ``building``), as each step begins.
        sink: receives the output lines of the build and release commands.
        process_id: the value of :data:`PROCESS_ID_VARIABLE` for its children.
        port: the ``PORT`` of its children, unless the request's ``env`` sets it.
        request_id: the id of the create request, sent along with the download.
        reuse_source: use the source a previous agent unpacked in ``workdir``, if it
            finished unpacking it, instead of fetching it again (once).
    """

    def __init__(
        self,
        spec: Spec,
        workdir: Path,
        runtime: Runtime,
        enter: Callable[[ProcessState], None],
        sink: Sink,
        *,
        process_id: str,
        port: int | None = None,
        request_id: str | None = None,
        reuse_source: bool = False,
    ) -> None:
        self.spec = spec
        self.workdir = workdir
        self._runtime = runtime
        self._enter = enter
        self._sink = sink
        self._process_id = process_id
        self._port = port
        self._request_id = request_id
        self._reuse_source = reuse_source
        #: how far the download of the source is, while it is downloaded
        self.download: DownloadProgress | None = None
        #: the SHA-256 of the archive the source came from, once known (read back from
        #: the work folder when reusing a source, so that the agent knows at once which
        #: build it uses: see :attr:`build_key`)
        self.source_sha256 = _source_digest(workdir) if reuse_source else None

    @property
    def build_key(self) -> str | None:
        """The key of the build of its source (see :mod:`~smartmob_agent.sources.builds`),
        once known."""
        if self.source_sha256 is None:
            return None
        return self._runtime.builds.key(self.source_sha256)

    async def provision(self) -> Command:
        """Download and unpack the source, read its Procfile and ``.env``, build it and
        run its release command if it has them (see :ref:`lifecycle-build`).

        Raises:
            AgentError: a class of error for each way of failing, which names its
                failure reason (see :data:`~smartmob_agent.supervision.failures.REASONS`).
        """
        root = await self._fetch()
        entries, dotenv_env = await asyncio.to_thread(_read_source, root)
        entry = procfile.select(entries, self.spec.process_type)
        build.check_process_type(self.spec.process_type)
        cwd = _working_dir(root, self.spec.options.working_dir)
        runtime = self._runtime
        forced = dict(runtime.forced_env)
        forced[PROCESS_ID_VARIABLE] = self._process_id
        if self._port is not None and "PORT" not in self.spec.env:
            forced["PORT"] = str(self._port)
        env = child_environment(
            runtime.base_env, entry.env, self.spec.env, forced, dotenv_env
        )
        # a stat: microseconds, like the source cache's, on the loop
        plan = build.plan((root / build.REQUIREMENTS).is_file(), entries)
        if plan.needed:
            venv = await self._build(plan, root, cwd, forced, dotenv_env)
            if venv is not None:
                env = build.activate(env, str(venv))
        return Command(entry.command, cwd, MappingProxyType(env))

    async def _build(
        self,
        plan: build.Plan,
        root: Path,
        cwd: Path,
        forced: Mapping[str, str],
        dotenv_env: Mapping[str, str],
    ) -> Path | None:
        """Make the source's virtual environment and run its release command, unless
        done before (by this process or another of the same source); return the
        environment's folder, if it has one.

        ``building`` is entered only when there is something to do or to wait for: a
        source whose build and release are done goes straight to ``starting``.
        """
        runtime = self._runtime
        builds = runtime.builds
        assert self.source_sha256 is not None, "known once the source is fetched"
        key = builds.key(self.source_sha256)
        building = False

        def enter_building() -> None:
            nonlocal building
            if not building:
                building = True
                self._enter(S.BUILDING)  # PENDING (a source reused) or UNPACKING -> BUILDING

        venv: Path | None = None
        if plan.requirements:
            if not builds.is_built(key):
                enter_building()
            # pip is configured by the agent's environment (PIP_INDEX_URL, ...), not by a
            # request's env: the build is shared by every process of the source
            build_env = build.activate(
                {**runtime.base_env, **runtime.forced_env, "PYTHONUNBUFFERED": "1"},
                str(builds.venv(key)),
            )
            venv = await builds.build(key, root, build_env, self._sink)
        release = plan.release
        if release is not None and not builds.is_released(key, self.spec.app):
            enter_building()
            # what a process would get, with the release line's own variables
            release_env = child_environment(
                runtime.base_env, release.env, self.spec.env, forced, dotenv_env
            )
            if venv is not None:
                release_env = build.activate(release_env, str(venv))
            await builds.release(key, self.spec.app, release.command, cwd, release_env, self._sink)
        return venv

    async def _fetch(self) -> Path:
        """Get the source archive (from the cache, or downloaded into it) and unpack it
        into the work folder; return the source's root folder.

        Each process unpacks a copy of its own, even from a shared archive: see
        :ref:`lifecycle-source-cache`.
        """
        workdir = self.workdir
        runtime = self._runtime
        # a source its user could write to is unpacked again, from the cached archive,
        # rather than read by the agent as root (see :ref:`security-children`)
        if self._reuse_source and runtime.run_as is None:
            self._reuse_source = False  # once: a later start after a failure fetches again
            root = await asyncio.to_thread(_unpacked_root, workdir)
            # without its archive's digest, the source's build cannot be found: fetch
            if root is not None and self.source_sha256 is not None:
                return root
        self.source_sha256 = None
        if workdir.exists():  # left by an earlier run or agent on this state folder
            await asyncio.to_thread(shutil.rmtree, workdir, True)
        workdir.mkdir(parents=True, exist_ok=True)
        path = await self._download()
        self._enter(S.UNPACKING)  # DOWNLOADING -> UNPACKING
        # the identity of the source, for its build: the checksum the cache verified, or
        # the digest of the file (a URL may serve another version tomorrow)
        digest = self.spec.sha256
        if digest is None:
            digest = await asyncio.to_thread(_file_sha256, path)
        self.source_sha256 = digest
        root = await _unpack(path, workdir / "source", runtime.unpack_limits)
        if runtime.run_as is not None:  # the children may write in their source
            await asyncio.to_thread(_give_source, workdir, runtime.run_as)
        await asyncio.to_thread(_mark_unpacked, workdir, root, digest)
        return root

    async def _download(self) -> Path:
        """Get the archive from the source cache, in ``downloading``; return its file."""
        headers = {"X-Request-Id": self._request_id} if self._request_id else None
        self._enter(S.DOWNLOADING)  # PENDING -> DOWNLOADING
        self.download = DownloadProgress(0)
        try:
            return await self._runtime.sources.get(
                self.spec.source_url, self.spec.sha256, headers=headers,
                progress=self._on_progress,
            )
        finally:
            self.download = None

    def _on_progress(self, size: int, total: int | None) -> None:
        if self.download is not None:
            self.download = DownloadProgress(size, total)


async def _unpack(path: Path, dest: Path, limits: unpack.UnpackLimits) -> Path:
    """Unpack the archive at ``path`` into ``dest`` in a thread; return the source root.

    If cancelled, the unpacking stops and finishes before this returns, or it would write
    again into a work folder being removed.
    """
    return await unpack.unpack_in_thread(path, dest, limits=limits)


def _give_source(workdir: Path, run_as: RunAs) -> None:
    """Make the unpacked source belong to the children's user; the work folder stays
    the agent's (its marks say what was unpacked), but anyone may pass through it."""
    os.chmod(workdir, 0o755)
    give_tree(workdir / "source", run_as)


def _mark_unpacked(workdir: Path, root: Path, sha256: str) -> None:
    (workdir / DIGEST_FILE).write_text(sha256 + "\n")
    (workdir / UNPACKED_MARK).write_text(str(root.relative_to(workdir / "source")) + "\n")


def _source_digest(workdir: Path) -> str | None:
    """The SHA-256 of the archive unpacked in ``workdir``, if it was recorded."""
    try:
        digest = (workdir / DIGEST_FILE).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    valid = len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)
    return digest if valid else None


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _unpacked_root(workdir: Path) -> Path | None:
    """The source root an earlier agent finished unpacking in ``workdir``, if any."""
    try:
        relative = (workdir / UNPACKED_MARK).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    source = (workdir / "source").resolve()
    root = (source / relative).resolve()
    if not root.is_relative_to(source) or not root.is_dir():
        return None
    return root


def _working_dir(root: Path, relative: str | None) -> Path:
    """The folder a process runs in: ``relative`` inside ``root``, which it may not leave
    (through ``..`` or a symbolic link)."""
    if relative is None:
        return root
    target = (root / relative).resolve()
    if not target.is_relative_to(root.resolve()):
        raise WorkingDirError(f"working_dir {relative!r} leads outside the source")
    if not target.is_dir():
        raise WorkingDirError(f"working_dir {relative!r} is not a folder of the source")
    return target


def _read_source(root: Path) -> tuple[dict[str, procfile.ProcfileEntry], dict[str, str]]:
    """Read the Procfile and the optional ``.env`` at the root of the source."""
    return _read_procfile(root), _read_dotenv(root)


def _read_procfile(root: Path) -> dict[str, procfile.ProcfileEntry]:
    path = root / "Procfile"
    try:
        with open(path, "rb") as file:
            data = file.read(procfile.MAX_PROCFILE_BYTES + 1)
    except FileNotFoundError:
        raise NoProcfile(
            "the source has no Procfile at its root" + _nested_archive_hint(root)
        ) from None
    except (IsADirectoryError, PermissionError) as error:
        raise ProcfileError(f"the Procfile cannot be read: {error.strerror}") from None
    return procfile.parse_procfile(procfile.decode_procfile(data))


def _nested_archive_hint(root: Path) -> str:
    """A hint for a source whose only file is an archive itself (a zip inside a tar)."""
    try:
        entries = list(root.iterdir())
        if len(entries) != 1 or entries[0].is_symlink() or not entries[0].is_file():
            return ""
        with open(entries[0], "rb") as file:
            kind = unpack.detect_format(file.read(512))
    except (OSError, AgentError):
        return ""
    return (
        f" (it holds only {entries[0].name!r}, a {kind} archive: an archive inside the "
        "archive is not unpacked)"
    )


def _read_dotenv(root: Path) -> dict[str, str]:
    path = root / ".env"
    try:
        with open(path, "rb") as file:
            data = file.read(_DOTENV_LIMIT + 1)
    except FileNotFoundError:
        return {}
    except (IsADirectoryError, PermissionError) as error:
        raise dotenv.DotenvError(f"the .env file cannot be read: {error.strerror}") from None
    return dotenv.parse_dotenv(dotenv.decode_dotenv(data))
