"""Values that describe processes: states with their transition table, specs and exits.

Pure: no I/O. The names of :class:`ProcessState` are the API contract (``state`` in the
process status document).
"""

from __future__ import annotations

import enum
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from smartmob_agent.errors import InvalidTransition


class ProcessState(enum.StrEnum):
    """Where a process is in its life; the value is what the API shows."""

    PENDING = "pending"
    DOWNLOADING = "downloading"
    UNPACKING = "unpacking"
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    STOPPED = "stopped"
    EXITED = "exited"
    FAILED = "failed"


S = ProcessState

#: Every legal edge. Anything not listed raises :class:`InvalidTransition`.
TRANSITIONS: Mapping[ProcessState, frozenset[ProcessState]] = MappingProxyType(
    {
        # provisioning runs in order; any step can fail or be cut short by a stop
        S.PENDING: frozenset({S.DOWNLOADING, S.STARTING, S.FAILED, S.STOPPING}),
        S.DOWNLOADING: frozenset({S.UNPACKING, S.FAILED, S.STOPPING}),
        S.UNPACKING: frozenset({S.STARTING, S.FAILED, S.STOPPING}),
        # starting -> running once the command is spawned; failed when it cannot be
        # starting -> backoff: the spawn failed for want of resources (fds, memory)
        S.STARTING: frozenset({S.RUNNING, S.BACKOFF, S.FAILED, S.STOPPING}),
        # running -> starting: a run that lasted long enough restarts at once;
        # running -> backoff: a quick exit waits first; running -> exited: the restart
        # policy does not restart it; running -> failed: the command does not exist, or
        # max_restarts failed starts in a row
        S.RUNNING: frozenset({S.STARTING, S.BACKOFF, S.EXITED, S.FAILED, S.STOPPING}),
        # backoff -> starting: the delay passed, or a start control cut it short
        S.BACKOFF: frozenset({S.STARTING, S.STOPPING}),
        S.STOPPING: frozenset({S.STOPPED}),
        # the resting states: a start control runs it again (pending when its source
        # is not there yet: a process created with autostart false, or whose
        # provisioning failed); a stop or delete goes through stopping like any other
        S.STOPPED: frozenset({S.PENDING, S.STARTING}),
        S.EXITED: frozenset({S.PENDING, S.STARTING, S.STOPPING}),
        S.FAILED: frozenset({S.PENDING, S.STARTING, S.STOPPING}),
    }
)

#: States with no child and nothing scheduled: a start control makes sense in them.
RESTING_STATES = frozenset({S.STOPPED, S.EXITED, S.FAILED})


def check_transition(old: ProcessState, new: ProcessState) -> None:
    """Raise :class:`InvalidTransition` unless ``old -> new`` is an edge of the graph."""
    if new not in TRANSITIONS[old]:
        raise InvalidTransition(f"a process cannot go from {old} to {new}")


@dataclass(frozen=True)
class Exit:
    """How one child ended, with :class:`subprocess.Popen`'s convention.

    ``code`` is the exit status, or minus the signal number when a signal killed it.
    """

    code: int

    @classmethod
    def from_wait_status(cls, status: int) -> Exit:
        """Build from a raw :func:`os.waitpid` status."""
        return cls(os.waitstatus_to_exitcode(status))

    @property
    def signal(self) -> str | None:
        """The name of the signal that killed the child (``"SIGKILL"``), or ``None``."""
        if self.code >= 0:
            return None
        try:
            return signal.Signals(-self.code).name
        except ValueError:
            return f"signal {-self.code}"

    def describe(self) -> str:
        """A short phrase for logs and errors: ``"exited with code 3"``."""
        if self.signal is not None:
            return f"was killed by {self.signal}"
        return f"exited with code {self.code}"


@dataclass(frozen=True)
class Spec:
    """What a create request asked for. Frozen: a process never changes its spec."""

    app: str
    node: str
    process_type: str
    source_url: str
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def slug(self) -> str:
        """The process's unique name: ``<app>.<node>``."""
        return f"{self.app}.{self.node}"


@dataclass(frozen=True)
class ProcessInfo:
    """A snapshot of one process, taken when a client asks; what the API shows."""

    spec: Spec
    state: ProcessState
    pid: int | None
    error: str | None
    restarts: int
    last_exit: Exit | None
