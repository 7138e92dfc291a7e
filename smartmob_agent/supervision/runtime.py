"""What every watcher shares, owned by the agent: :class:`Runtime`."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from smartmob_agent.events.bus import EventKind
from smartmob_agent.model import ProcessState, RunAs
from smartmob_agent.processes.monitor import Monitor
from smartmob_agent.processes.reaper import Reaper
from smartmob_agent.sources import unpack
from smartmob_agent.sources.builds import Builds
from smartmob_agent.sources.cache import SourceCache

if TYPE_CHECKING:
    from smartmob_agent.supervision.watcher import Watcher

#: Called as ``listener(watcher, old_state, new_state)`` after every transition.
Listener = Callable[["Watcher", ProcessState, ProcessState], None]
#: Called as ``emit(watcher, kind, fields)`` for each event (see :mod:`.events.bus`).
Emitter = Callable[["Watcher", EventKind, Mapping[str, Any]], None]


@dataclass(frozen=True)
class Runtime:
    """What every watcher shares, owned by the agent."""

    session: aiohttp.ClientSession
    reaper: Reaper
    base_env: Mapping[str, str]
    #: the cache of source archives, shared by every process
    sources: SourceCache
    #: the builds of sources (virtual environments, releases), shared by every process
    builds: Builds
    #: set after every other layer: what the agent relies on cannot be overridden
    forced_env: Mapping[str, str] = field(default_factory=dict)
    #: the bounds of each unpack (members, sizes, compression ratio, path length)
    unpack_limits: unpack.UnpackLimits = unpack.UnpackLimits()  # noqa: RUF009 (frozen)
    stop_timeout: float = 10.0
    clock: Callable[[], float] = time.monotonic
    wall_clock: Callable[[], float] = time.time
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    jitter: Callable[[], float] = random.random
    monitor: Monitor | None = None
    emit: Emitter | None = None
    #: the folder of the processes' output log files (one folder each); ``None`` keeps
    #: output lines in memory only
    logs_dir: Path | None = None
    #: output lines of each process kept in memory (see
    #: :class:`~smartmob_agent.output.logs.ProcessLog`)
    log_lines: int = 1000
    #: size at which an output log file is rotated
    log_max_bytes: int = 10 * 1024 * 1024
    #: rotated output log files kept per process
    log_files: int = 3
    #: called as ``reserve_seq(slug, mark)`` to keep the mark below which a process's
    #: output lines may be numbered (see :class:`~smartmob_agent.output.logs.ProcessLog`)
    reserve_seq: Callable[[str, int], None] | None = None
    #: the user the children run as (:option:`--user`); ``None``: the agent's own
    run_as: RunAs | None = None
