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
from typing import NamedTuple

from smartmob_agent.errors import InvalidTransition


class ProcessState(enum.StrEnum):
    """Where a process is in its life; the value is what the API shows."""

    PENDING = "pending"
    DOWNLOADING = "downloading"
    UNPACKING = "unpacking"
    BUILDING = "building"
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
        # pending -> starting/building: a source an earlier agent unpacked is reused
        S.PENDING: frozenset({S.DOWNLOADING, S.BUILDING, S.STARTING, S.FAILED, S.STOPPING}),
        S.DOWNLOADING: frozenset({S.UNPACKING, S.FAILED, S.STOPPING}),
        # unpacking -> starting: nothing to build or release, or done before
        S.UNPACKING: frozenset({S.BUILDING, S.STARTING, S.FAILED, S.STOPPING}),
        # the virtual environment and the release command (see docs/lifecycle.rst)
        S.BUILDING: frozenset({S.STARTING, S.FAILED, S.STOPPING}),
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


class FailureReason(enum.StrEnum):
    """Why a process is ``failed``, as a name a client can switch on (``reason`` in the
    status document and the events; ``error`` says the same to a person, in a sentence).

    A closed set: each way a process can fail has exactly one (see
    :mod:`~smartmob_agent.supervision.failures`). The first names are the original
    agent's, which its clients know; :doc:`api` has the table.
    """

    #: the source could not be fetched (a bad URL, an HTTP error, a stall, too large)
    DOWNLOAD_FAILURE = "download failure"
    #: the source has no Procfile at its root
    NO_PROCFILE = "no procfile"
    #: the Procfile has no entry for the process type (or it is the ``release`` entry)
    UNKNOWN_PROCESS_TYPE = "unknown process type"
    #: the virtual environment of the source's build could not be made
    VIRTUAL_ENVIRONMENT_FAILURE = "virtual environment failure"
    #: ``pip install -r requirements.txt`` failed
    PIP_INSTALL_FAILURE = "pip install failure"
    #: the archive fetched does not have the request's ``checksum``
    CHECKSUM_MISMATCH = "checksum mismatch"
    #: the source is not a zip or tar archive, or is corrupt, encrypted or unreadable
    UNPACK_FAILURE = "unpack failure"
    #: the archive is unsafe to unpack, or over a limit of unpacking
    ARCHIVE_REFUSED = "archive refused"
    #: the Procfile is unreadable or invalid
    BAD_PROCFILE = "bad procfile"
    #: the ``.env`` file is unreadable or invalid
    BAD_DOTENV = "bad dotenv"
    #: the request's ``working_dir`` is no folder of the source
    BAD_WORKING_DIR = "bad working dir"
    #: the source's release command failed
    RELEASE_FAILURE = "release failure"
    #: the command cannot start (the shell cannot be spawned, or exits at once with 127
    #: or 126: not found, not executable)
    START_FAILURE = "start failure"
    #: more starts failed in a row than ``max_restarts``
    MAX_RESTARTS = "max restarts"
    #: an error the agent did not foresee (a bug): its log has the details
    INTERNAL_ERROR = "internal error"


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


class RestartPolicy(enum.StrEnum):
    """When a child that ended is started again (the ``restart`` option)."""

    #: whatever the exit: the seed's rule, "restart until deleted"
    ALWAYS = "always"
    #: only after an exit code not in ``exit_codes``, or death by a signal
    ON_FAILURE = "on-failure"
    NEVER = "never"


#: What a ``health`` check does not say: seconds between probes, seconds a probe may take,
#: failed probes in a row before a restart.
HEALTH_DEFAULTS: Mapping[str, float | int] = MappingProxyType(
    {"interval": 10, "timeout": 5, "failures": 3}
)

#: Signals a ``stop_signal`` (and the ``signal`` control) may name, without ``SIG``.
SIGNAL_NAMES = ("TERM", "INT", "QUIT", "HUP", "KILL", "USR1", "USR2")


#: The resource limits a create request may set (``rlimits``), each the name of a
#: ``RLIMIT_*`` constant in lower case: open files, address space (bytes), processes of
#: the user, core file size (bytes), CPU time (seconds), file size (bytes).
RLIMIT_NAMES = ("nofile", "as", "nproc", "core", "cpu", "fsize")


@dataclass(frozen=True)
class RunAs:
    """The user the children run as (:option:`--user`), resolved once at start: its
    name, uid, primary or chosen group, every group it belongs to, and its home."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str

    def environment(self) -> dict[str, str]:
        """What a login of this user would find in ``HOME``, ``USER`` and ``LOGNAME``."""
        return {"HOME": self.home, "USER": self.name, "LOGNAME": self.name}


#: The shortest wait before a process is started again after a failed start, in
#: seconds, whatever its ``backoff`` option asks: a command that fails at once is started
#: at most some ten times a second (see :func:`~smartmob_agent.supervision.restart.decide`).
MIN_RESTART_DELAY = 0.1


@dataclass(frozen=True)
class Backoff:
    """An exponential series of delays, in seconds: ``initial``, then ``factor`` times the
    delay before, never over ``maximum``.

    The one backoff of the agent: a process's restarts follow its own (the ``backoff``
    option, see :mod:`~smartmob_agent.supervision.restart`), and so do the retries of a
    webhook (see :mod:`~smartmob_agent.events.webhooks`); each adds its own jitter.

    >>> from smartmob_agent.model import Backoff
    >>> series = Backoff(initial=0.5, maximum=4.0)
    >>> [series.delay(attempt) for attempt in range(1, 6)]
    [0.5, 1.0, 2.0, 4.0, 4.0]
    >>> series.after(0.0), series.after(1.0), series.after(4.0)
    (0.5, 2.0, 4.0)
    """

    initial: float = 0.1
    maximum: float = 30.0
    factor: float = 2.0

    def after(self, previous: float) -> float:
        """The delay that follows ``previous`` in the series (``0``: none yet, the first)."""
        if previous <= 0:
            return min(self.initial, self.maximum)
        return min(previous * self.factor, self.maximum)

    def delay(self, attempt: int) -> float:
        """The delay before retry number ``attempt`` (``1``: the first delay)."""
        delay = min(self.initial, self.maximum)
        # step by step rather than initial * factor ** n, which overflows for a large n
        for _ in range(attempt - 1):
            if delay >= self.maximum:
                break
            delay = self.after(delay)
        return delay


#: The backlog of a process's listening socket when its ``socket`` option sets none.
DEFAULT_BACKLOG = 128


@dataclass(frozen=True)
class SocketSpec:
    """The listening socket the agent holds for a process (the ``socket`` option) and
    passes to each of its children as fd 3 (systemd's socket activation).

    ``port`` ``None``: the agent picks a free one when the process is created.
    """

    port: int | None = None
    host: str = "127.0.0.1"
    backlog: int = DEFAULT_BACKLOG


@dataclass(frozen=True)
class Options:
    """How one process is supervised: the optional fields of a create request.

    Every field has the default a create request without it gets. ``stop_timeout`` of
    ``None`` means the agent's :option:`--stop-timeout`; ``health`` is the request's
    ``health`` object as given (the watcher turns it into a check).
    """

    restart: RestartPolicy = RestartPolicy.ALWAYS
    exit_codes: frozenset[int] = frozenset({0})
    max_restarts: int | None = None
    start_seconds: float = 1.0
    backoff: Backoff = Backoff()
    stop_signal: str = "TERM"
    stop_timeout: float | None = None
    working_dir: str | None = None
    umask: int | None = None
    autostart: bool = True
    health: Mapping[str, object] | None = None
    notify: tuple[str, ...] = ()
    #: resource limits as ``(name, value)`` pairs in :data:`RLIMIT_NAMES` order; a value
    #: of ``None`` means unlimited
    rlimits: tuple[tuple[str, int | None], ...] = ()
    #: the listening socket the agent holds for it, if any
    socket: SocketSpec | None = None

    def is_clean(self, exit: Exit) -> bool:
        """Tell whether ``exit`` counts as a clean one (a code in ``exit_codes``)."""
        return exit.code >= 0 and exit.code in self.exit_codes

    @property
    def signal_number(self) -> int:
        """The number of :attr:`stop_signal`."""
        return int(signal.Signals[f"SIG{self.stop_signal}"])


@dataclass(frozen=True)
class Spec:
    """What a create request asked for. Frozen: a process never changes its spec."""

    app: str
    node: str
    process_type: str
    source_url: str
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    options: Options = Options()
    #: the expected SHA-256 of the archive, as lowercase hex, if the request gave one
    sha256: str | None = None

    @property
    def slug(self) -> str:
        """The process's unique name: ``<app>.<node>``."""
        return f"{self.app}.{self.node}"


@dataclass(frozen=True)
class ExitRecord:
    """One past exit of a child: how it ended, when (epoch seconds), after how long, and
    why the agent ended it, if it did (``"stopped"``, ``"unhealthy: ..."``)."""

    exit: Exit
    at: float
    ran_for: float
    reason: str | None = None


@dataclass(frozen=True)
class LogLine:
    """One output line of a process: when the agent read it (seconds since the epoch),
    its stream (``stdout`` or ``stderr``), its text without the newline, its sequence
    number (``0`` for a line logged before lines had one) and the run it came from (the
    child's pid and the process's restart count then, ``None`` if unknown)."""

    at: float
    stream: str
    line: str
    seq: int = 0
    pid: int | None = None
    restarts: int | None = None


class Stamp(NamedTuple):
    """What a batch of output lines is stamped with: the sequence number of its first
    line (the others follow on, one each), when the agent read it (seconds since the
    epoch), and the run it came from (see :class:`LogLine`)."""

    seq: int
    at: float
    pid: int | None
    restarts: int | None


@dataclass(frozen=True)
class DownloadProgress:
    """How far the download of a source is: bytes received, out of ``total`` when the
    server said how many it sends."""

    bytes: int
    total: int | None = None


@dataclass(frozen=True)
class SourceRef:
    """One source of a process: the URL it came from, the SHA-256 it was checked
    against (if any), since when (epoch seconds) it is the current (or pending) one, and,
    while it is pending, the step its update is at (``downloading``, ``starting``...)."""

    url: str
    sha256: str | None
    since: float
    step: str | None = None


@dataclass
class Releases:
    """What a process's updates left (see :mod:`~smartmob_agent.supervision.update`):
    mutable, owned by its watcher."""

    #: when its current source became current (epoch seconds)
    since: float
    #: where its current source is unpacked, relative to its work folder (``""``: the
    #: work folder itself, as before any update)
    folder: str = ""
    #: the source an update is installing, while it does
    pending: SourceRef | None = None
    #: the spec before the last successful update (a rollback's target), with since when
    #: it was current
    previous: tuple[Spec, float] | None = None
    #: why the last update failed (cleared by the next success)
    error: str | None = None
    #: the same as a name (``start failure``, ``unhealthy``...)
    reason: str | None = None


@dataclass(frozen=True)
class Resumed:
    """What an earlier agent left of a process that the agent brings back."""

    #: the value of ``SMARTMOB_PROCESS_ID`` its children had
    process_id: str
    #: it was to stay stopped (created so, or stopped by a control): it still is
    stopped: bool
    #: its restart count
    restarts: int = 0
    #: the lowest sequence number its output lines may get (the mark an earlier agent
    #: reserved up to)
    seq_start: int = 0
    #: its last exits, oldest first, as the earlier agent's status document showed them
    exits: tuple[ExitRecord, ...] = ()
    #: what its updates left (its current source's folder among them)
    releases: Releases | None = None


@dataclass(frozen=True)
class ProcessInfo:
    """A snapshot of one process, taken when a client asks; what the API shows."""

    spec: Spec
    state: ProcessState
    pid: int | None
    error: str | None
    restarts: int
    last_exit: ExitRecord | None
    #: the last few exits, oldest first (the last one included)
    exits: tuple[ExitRecord, ...] = ()
    #: epoch seconds the current child was spawned at, while there is one
    started_at: float | None = None
    #: seconds the current child has run, while there is one
    uptime: float | None = None
    port: int | None = None
    healthy: bool | None = None
    #: the current child's whole process tree, as last sampled (None before a sample)
    cpu_percent: float | None = None
    memory_rss: int | None = None
    #: while in backoff: the delay being waited, and when (epoch) the next start is due
    backoff_delay: float | None = None
    next_start_at: float | None = None
    #: while in backoff, failed or exited: the last lines of output before the last exit
    output_tail: tuple[str, ...] = ()
    #: the stop timeout in force: the process's own, else the agent's
    stop_timeout: float | None = None
    #: while downloading: how far the download of the source is
    download: DownloadProgress | None = None
    #: while failed: why, as a name (``error`` says it in a sentence)
    reason: FailureReason | None = None
    #: its current source, and what its updates left (see :class:`Releases`)
    source: SourceRef | None = None
    releases: Releases | None = None
