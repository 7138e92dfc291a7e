"""The builds of sources in the state folder: virtual environments and release runs (a
files + processes adapter).

Knows nothing of processes as the API sees them. :class:`Builds` keeps one folder per
build key (see :func:`~smartmob_agent.sources.buildplan.build_key`)::

    builds/<key>/
        venv/              the virtual environment, with the requirements installed
        built              written once the environment is complete
        released.<app>     written once the release command of <app> succeeded

* **Once per source.** :meth:`Builds.build` returns at once when ``built`` is there;
  otherwise it creates the environment in place (a virtual environment cannot be moved:
  its scripts name its own path) and writes ``built`` last. A folder without it is the
  leftover of a build that was cut short (a stop, a crash of the agent): it is removed
  and built again. A failed build is removed at once.
* **Concurrent callers share one run** (single flight), as the source cache shares
  downloads: the first caller runs it, in its own source folder, with its environment,
  and every caller waiting meanwhile gets the output lines and the outcome. A failure
  fails them all; a later call tries again. If the caller that runs it gives up (its
  process is stopped or deleted), the run is stopped at once, since it works in that
  process's folder, and the others start it again from their own.
* **Children are the agent's**: each step is a :class:`~smartmob_agent.processes.spawn.Child`,
  reaped by the agent's :class:`~smartmob_agent.processes.reaper.Reaper`, with its stdin closed,
  stopped with the stop sequence when its run is cancelled or overruns the timeout.

:meth:`Builds.collect` removes the builds no process uses, except the
:data:`KEEP_UNUSED` most recently used of them; a build's folder's modification time is
when it was last used.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import shlex
import shutil
import signal
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smartmob_agent.errors import (
    BuildError,
    PipInstallError,
    ReleaseError,
    SpawnError,
    VirtualEnvironmentError,
)
from smartmob_agent.model import RunAs
from smartmob_agent.processes.reaper import Reaper
from smartmob_agent.processes.spawn import Child, Sink
from smartmob_agent.processes.users import give_tree
from smartmob_agent.sources import buildplan as build

log = logging.getLogger("smartmob_agent.builder")  # stable name: internals.rst

#: Builds that no process uses, kept (the most recently used first) for rollbacks.
KEEP_UNUSED = 3
#: The virtual environment's folder, and the marks, in a build folder.
VENV = "venv"
BUILT_MARK = "built"
#: Prefix of a folder being removed (renamed first, so that its key is free at once).
_TRASH = ".trash-"
#: How long the pipes of a step that ended may stay open before they are closed.
_SETTLE = 1.0
#: The first pip whose ``--python`` installs into another environment.
_PIP_WITH_PYTHON_OPTION = (22, 3)


def agent_pip_usable() -> bool:
    """Whether the agent's interpreter has a pip that can install into another
    environment (``--python``): then environments are made without pip, in a tenth of a
    second, instead of seconds of ``ensurepip`` each."""
    import importlib.metadata  # here: only builds need it, and it is ~0.7 MB of memory

    try:
        version = importlib.metadata.version("pip")
    except importlib.metadata.PackageNotFoundError:
        return False
    numbers: list[int] = []
    for part in version.split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        numbers.append(int(digits) if digits else 0)
    return tuple(numbers) >= _PIP_WITH_PYTHON_OPTION


@dataclass
class _Flight:
    """One build or release run in progress, and who receives its output."""

    task: asyncio.Task[None] | None = None
    sinks: list[Sink] = field(default_factory=list)
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=build.TAIL_LINES))

    def feed(self, stream: str, lines: list[bytes]) -> None:
        """A batch of output lines of the run: kept for an error, sent to each waiter."""
        self.tail.extend(line.decode(errors="replace") for line in lines)
        for sink in list(self.sinks):
            sink(stream, lines)


class Builds:
    """The builds of one folder, and the runs that fill it.

    Args:
        folder: where builds are kept (created if needed); folders a removal left
            behind (the agent was killed) are removed.
        reaper: the agent's reaper, which reaps every child of the agent.
        timeout: the longest a build (environment and install together) or a release
            command may take, in seconds.
        stop_timeout: the grace period of the stop sequence of a run that is stopped.
        keep: how many unused builds :meth:`collect` keeps.
        run_as: the user the steps run as (:option:`--user`), who then owns each
            virtual environment (never the build folder, which holds the agent's marks);
            ``None``: the agent's own.
    """

    def __init__(
        self,
        folder: Path,
        reaper: Reaper,
        *,
        timeout: float = 600.0,
        stop_timeout: float = 10.0,
        keep: int = KEEP_UNUSED,
        run_as: RunAs | None = None,
    ) -> None:
        self.folder = folder
        self._run_as = run_as
        self.timeout = timeout
        self.keep = keep
        self._reaper = reaper
        self._stop_timeout = stop_timeout
        self._python = sys.executable
        # the interpreter the environments are made from, for the key: a path alone may
        # be upgraded in place, so its version too
        self._interpreter = os.path.realpath(sys.executable)
        self._agent_pip_usable: bool | None = None  # looked up at the first build
        self._flights: dict[tuple[str, ...], _Flight] = {}
        #: builds and release runs started (a figure for tests and benchmarks)
        self.builds_run = 0
        self.releases_run = 0
        folder.mkdir(parents=True, exist_ok=True)
        for path in folder.iterdir():
            if path.name.startswith(_TRASH):
                shutil.rmtree(path, ignore_errors=True)

    @property
    def _agent_pip(self) -> bool:
        """Whether the agent's pip can install into an environment, looked up once, at
        the first build (an agent that builds nothing need not load package metadata)."""
        if self._agent_pip_usable is None:
            self._agent_pip_usable = agent_pip_usable()
        return self._agent_pip_usable

    def key(self, archive_sha256: str) -> str:
        """The build key of the source whose archive has this SHA-256."""
        return build.build_key(archive_sha256, self._interpreter, sys.version)

    def venv(self, key: str) -> Path:
        """The virtual environment of the build ``key``."""
        return self.folder / key / VENV

    def is_built(self, key: str) -> bool:
        """Whether the build ``key`` is complete."""
        return (self.folder / key / BUILT_MARK).is_file()

    def is_released(self, key: str, app: str) -> bool:
        """Whether the release command of ``app`` succeeded for the source of ``key``."""
        return (self.folder / key / build.released_mark(app)).is_file()

    async def build(
        self, key: str, root: Path, env: Mapping[str, str], sink: Sink
    ) -> Path:
        """Make the virtual environment of ``key`` unless it is complete, installing the
        ``requirements.txt`` of the source root ``root``; return its folder.

        ``env`` is the environment of pip; ``sink(stream, lines)`` receives the output.

        Raises:
            VirtualEnvironmentError: the environment could not be made, in time;
            PipInstallError: pip failed, or did not finish in time (every waiter gets
                the error).
        """
        await self._join(
            ("build", key), lambda: self.is_built(key),
            lambda flight: self._build(key, root, dict(env), flight), sink,
        )
        self._touch(key)
        return self.venv(key)

    async def release(
        self,
        key: str,
        app: str,
        command: str,
        cwd: Path,
        env: Mapping[str, str],
        sink: Sink,
    ) -> None:
        """Run the release command of ``app`` for the source of ``key`` unless it
        succeeded before: ``/bin/sh -c command`` in ``cwd`` with exactly ``env``.

        Raises:
            ReleaseError: it could not start, exited with another code than 0, or timed
                out.
        """
        await self._join(
            ("release", key, app), lambda: self.is_released(key, app),
            lambda flight: self._release(key, app, command, cwd, dict(env), flight), sink,
        )
        self._touch(key)

    async def _join(
        self,
        flight_key: tuple[str, ...],
        done: Callable[[], bool],
        start: Callable[[_Flight], Coroutine[Any, Any, None]],
        sink: Sink,
    ) -> None:
        """Wait for the run of ``flight_key``, starting it unless one is under way;
        return at once if ``done()`` says it was done before."""
        while not done():
            flight = self._flights.get(flight_key)
            if flight is not None and flight.task is not None and flight.task.done():
                flight = None  # it ended without success just now: not for a newcomer
            owner = flight is None
            if flight is None:
                flight = _Flight()
                flight.task = asyncio.get_running_loop().create_task(
                    start(flight), name=" ".join(flight_key)
                )
                self._flights[flight_key] = flight
                flight.task.add_done_callback(
                    functools.partial(self._landed, flight_key, flight)
                )
            task = flight.task
            assert task is not None
            flight.sinks.append(sink)
            try:
                # not `await task`: that would cancel the run along with a waiter
                await asyncio.wait({task})
            except asyncio.CancelledError:
                if owner and not task.done():
                    # it runs in this caller's source folder, about to be stopped or
                    # removed: stop it, and wait until its children are gone
                    task.cancel()
                    await asyncio.wait({task})
                raise
            finally:
                flight.sinks.remove(sink)
            if task.cancelled():
                continue  # its owner gave up: run it again, from this caller's folder
            task.result()  # raises the run's error
            return

    def _landed(
        self, flight_key: tuple[str, ...], flight: _Flight, _: object = None
    ) -> None:
        if self._flights.get(flight_key) is flight:
            del self._flights[flight_key]
        task = flight.task
        if task is not None and not task.cancelled():
            task.exception()  # each waiter got it; it needs no "never retrieved" warning

    async def _build(
        self, key: str, root: Path, env: dict[str, str], flight: _Flight
    ) -> None:
        folder = self.folder / key
        venv = folder / VENV
        self.builds_run += 1
        log.info("building %s from %s", folder, root)
        try:
            # a folder without its mark is a build cut short: start afresh
            await asyncio.to_thread(_reset, folder, venv, self._run_as)
            deadline = asyncio.get_running_loop().time() + self.timeout
            agent_pip = self._agent_pip
            await self._step(
                flight, "creating the virtual environment",
                shlex.join(build.venv_command(self._python, str(venv),
                                              with_pip=not agent_pip)),
                root, env, deadline, VirtualEnvironmentError,
            )
            runner = self._python if agent_pip else str(venv / "bin" / "python")
            target = str(venv / "bin" / "python") if agent_pip else None
            await self._step(
                flight, f"pip install -r {build.REQUIREMENTS}",
                shlex.join(build.pip_command(runner, target)), root, env, deadline,
                PipInstallError,
            )
            await asyncio.to_thread(_write_mark, folder / BUILT_MARK, {
                "interpreter": self._interpreter, "version": sys.version,
                "source": str(root), "built_at": time.time(),
            })
        except BaseException:
            # never a half-made environment under the key (nor one without its mark)
            await asyncio.to_thread(shutil.rmtree, folder, True)
            raise

    async def _release(
        self, key: str, app: str, command: str, cwd: Path, env: dict[str, str],
        flight: _Flight,
    ) -> None:
        folder = self.folder / key
        self.releases_run += 1
        log.info("running the release command of %s for %s", app, folder)
        # a source without requirements has no build folder yet: the mark needs one
        await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
        deadline = asyncio.get_running_loop().time() + self.timeout
        await self._step(
            flight, "the release command", command, cwd, env, deadline, ReleaseError
        )
        await asyncio.to_thread(_write_mark, folder / build.released_mark(app), {
            "app": app, "command": command, "released_at": time.time(),
        })

    async def _step(
        self,
        flight: _Flight,
        step: str,
        command: str,
        cwd: Path,
        env: Mapping[str, str],
        deadline: float,
        failed: type[BuildError],
    ) -> None:
        """Run ``/bin/sh -c command`` to its end; raise ``failed`` (a :class:`BuildError`
        that names the step) unless it exits with code 0 before ``deadline`` (of the
        event loop's clock)."""
        flight.tail.clear()  # the error quotes this step's output, not an earlier one's
        try:
            child = Child.spawn(command, cwd=cwd, env=env, sink=flight.feed,
                                reaper=self._reaper, run_as=self._run_as)
        except SpawnError as error:
            raise failed(f"{step} could not start: {error}") from None
        child.close_input()  # nobody can answer a question
        try:
            async with asyncio.timeout_at(deadline):
                exit = await child.wait()
        except TimeoutError:
            await child.stop(signal.SIGTERM, self._stop_timeout)
            await _settle(child)
            raise failed(build.failure(
                step, f"did not finish within {self.timeout:g} s (--build-timeout)",
                flight.tail,
            )) from None
        finally:
            if not child.exited:
                # cancelled (a stop or delete of the process): nothing may keep running
                await child.stop(signal.SIGTERM, self._stop_timeout)
        await _settle(child)
        if exit.code != 0:
            raise failed(build.failure(step, exit.describe(), flight.tail))

    def _touch(self, key: str) -> None:
        """Mark the build ``key`` used now (for :meth:`collect`)."""
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.folder / key)

    def collect(self, in_use: Iterable[str]) -> list[str]:
        """Remove the builds not in ``in_use`` (nor being run), except the ``keep`` most
        recently used of them; return the keys removed.

        Each is renamed at once, and its files removed in a worker thread: an
        environment holds thousands of files.
        """
        busy = set(in_use) | {flight_key[1] for flight_key in self._flights}
        unused: list[tuple[int, str]] = []
        for path in self.folder.iterdir():
            if path.name in busy or path.name.startswith(_TRASH) or not path.is_dir():
                continue
            with contextlib.suppress(FileNotFoundError):
                unused.append((path.stat().st_mtime_ns, path.name))
        unused.sort(reverse=True)
        removed = [key for _, key in unused[self.keep:]]
        for key in removed:
            trash = self.folder / f"{_TRASH}{uuid.uuid4().hex}"
            with contextlib.suppress(FileNotFoundError):
                os.rename(self.folder / key, trash)
                asyncio.get_running_loop().run_in_executor(
                    None, shutil.rmtree, trash, True
                )
        if removed:
            log.info("removed %d unused build(s) from %s", len(removed), self.folder)
        return removed


def _reset(folder: Path, venv: Path, run_as: RunAs | None) -> None:
    """An empty ``folder``, whatever was there; with ``run_as``, holding an empty
    ``venv`` folder that belongs to that user, who makes the environment there."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    if run_as is not None:
        folder.chmod(0o755)
        venv.mkdir(mode=0o755)
        give_tree(venv, run_as)


def _write_mark(path: Path, content: Mapping[str, object]) -> None:
    """Write a mark file whole or not at all (renamed into place)."""
    part = path.with_name(f"{path.name}.{uuid.uuid4().hex}.part")
    part.write_text(json.dumps(content) + "\n")
    os.replace(part, path)


async def _settle(child: Child) -> None:
    """Give the pipes a moment to deliver the last lines, then stop reading them (a
    descendant may hold them open for ever)."""
    try:
        async with asyncio.timeout(_SETTLE):
            await child.output_closed()
    except TimeoutError:
        child.close_output()
