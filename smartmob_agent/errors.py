"""The exception hierarchy.

Every error the agent raises on purpose is an :class:`AgentError`. Each carries a message
written for a person; :mod:`smartmob_agent.web.server` maps the classes to HTTP statuses in
one place, and :mod:`smartmob_agent.supervision.watcher` turns those raised after ``201`` into the
``failed`` state with the message as ``error`` and the class's
:class:`~smartmob_agent.model.FailureReason` as ``reason`` (see
:mod:`~smartmob_agent.supervision.failures`). :class:`InvalidTransition` is the one
exception here that is no :class:`AgentError`: it means a bug.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of every deliberate error; ``str(error)`` is the sentence shown to users."""

    #: HTTP headers the error's response carries (e.g. ``Retry-After``)
    headers: dict[str, str] = {}  # noqa: RUF012 - read-only by convention


class InvalidRequest(AgentError):
    """A request body or field is wrong.

    Args:
        message: the sentence shown to the user.
        fields: one entry per bad field, naming what is wrong with it.
    """

    def __init__(self, message: str, fields: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.fields: dict[str, str] = dict(fields or {})


class NotFound(AgentError):
    """No process has the slug asked for."""


class Conflict(AgentError):
    """The request clashes with the current state (duplicate slug, process being deleted)."""


class TooLarge(AgentError):
    """A request body (an uploaded archive) is over the size limit."""


class StorageError(AgentError):
    """The agent cannot write to its state folder (a full or read-only disk)."""


class InvalidTransition(RuntimeError):
    """A process was asked to move between two states that have no edge between them.

    Not an :class:`AgentError`: no request or source can cause it, only a bug of the
    agent, which is logged with its traceback (and answered with a 500).
    """


class DownloadError(AgentError):
    """The source archive could not be fetched."""


class ChecksumMismatch(DownloadError):
    """The archive fetched does not have the SHA-256 the create request gave."""


class ArchiveError(AgentError):
    """The source archive is not a zip or tar archive, or cannot be read or unpacked."""


class ArchiveRefused(ArchiveError):
    """The source archive is unsafe to unpack (a member that would land outside the
    source, a device...) or goes over a limit of unpacking (members, sizes, ratio)."""


class ProcfileError(AgentError):
    """The Procfile is missing, unreadable, or has no entry for the process type."""


class NoProcfile(ProcfileError):
    """The source has no Procfile at its root."""


class UnknownProcessType(ProcfileError):
    """The Procfile has no entry for the process type, or the entry cannot be run as a
    process (``release``)."""


class WorkingDirError(ProcfileError):
    """The ``working_dir`` of the request is no folder of the source."""


class BuildError(AgentError):
    """The build of a source (its virtual environment and requirements) or its release
    command failed; the message quotes the last lines of its output."""


class VirtualEnvironmentError(BuildError):
    """The virtual environment of a source's build could not be made."""


class PipInstallError(BuildError):
    """``pip install -r requirements.txt`` failed in a source's build."""


class ReleaseError(BuildError):
    """The release command of a source failed."""


class SpawnError(AgentError):
    """The process's command could not be started at all (the shell could not be
    spawned, or it exited at once with 127 or 126: the command is not found or not
    executable).

    Args:
        message: the sentence shown to the user.
        transient: the cause may go away by itself (out of file descriptors, memory or
            processes), so starting again later may work.
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class TooManyRestarts(AgentError):
    """More starts failed in a row than the process's ``max_restarts``."""


class Unauthorized(AgentError):
    """The request has no key, or a key the agent does not know (never says which)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.headers = {"WWW-Authenticate": 'Bearer realm="smartmob-agent"'}


class Forbidden(AgentError):
    """The key is valid but scoped to one app, and the request reaches beyond it."""


class TooManyFailures(AgentError):
    """The address presented too many wrong keys; it must wait before trying again.

    Args:
        retry_after: seconds until it may try again.
    """

    def __init__(self, retry_after: float) -> None:
        wait = max(1, round(retry_after + 0.5))
        super().__init__(
            f"too many requests with a wrong key from this address: try again in {wait} s"
        )
        self.headers = {"Retry-After": str(wait)}
