"""Failure reasons: which :class:`~smartmob_agent.model.FailureReason` each error that
fails a process gets.

Pure. A process fails on an error raised after the ``201`` of its creation: each class
of error below stands for one way of failing and has one reason; anything else is a bug
of the agent, ``internal error``. The classes are looked up most specific first, so a
:class:`~smartmob_agent.errors.NoProcfile` is ``no procfile`` although it is a
:class:`~smartmob_agent.errors.ProcfileError` too.

>>> from smartmob_agent.errors import ChecksumMismatch
>>> from smartmob_agent.supervision.failures import failure_reason
>>> failure_reason(ChecksumMismatch("the sha256 differs"))
<FailureReason.CHECKSUM_MISMATCH: 'checksum mismatch'>
>>> failure_reason(KeyError("a bug")).value
'internal error'
"""

from __future__ import annotations

from smartmob_agent.errors import (
    ArchiveError,
    ArchiveRefused,
    ChecksumMismatch,
    DownloadError,
    NoProcfile,
    PipInstallError,
    ProcfileError,
    ReleaseError,
    SpawnError,
    TooManyRestarts,
    UnknownProcessType,
    VirtualEnvironmentError,
    WorkingDirError,
)
from smartmob_agent.model import FailureReason
from smartmob_agent.sources.dotenv import DotenvError

R = FailureReason

#: Each class of error that fails a process, with its reason; a subclass comes before
#: its base class.
REASONS: tuple[tuple[type[Exception], FailureReason], ...] = (
    (ChecksumMismatch, R.CHECKSUM_MISMATCH),
    (DownloadError, R.DOWNLOAD_FAILURE),
    (ArchiveRefused, R.ARCHIVE_REFUSED),
    (ArchiveError, R.UNPACK_FAILURE),
    (NoProcfile, R.NO_PROCFILE),
    (UnknownProcessType, R.UNKNOWN_PROCESS_TYPE),
    (WorkingDirError, R.BAD_WORKING_DIR),
    (ProcfileError, R.BAD_PROCFILE),
    (DotenvError, R.BAD_DOTENV),
    (VirtualEnvironmentError, R.VIRTUAL_ENVIRONMENT_FAILURE),
    (PipInstallError, R.PIP_INSTALL_FAILURE),
    (ReleaseError, R.RELEASE_FAILURE),
    (SpawnError, R.START_FAILURE),
    (TooManyRestarts, R.MAX_RESTARTS),
)


def failure_reason(error: BaseException) -> FailureReason:
    """The reason of a process that fails on ``error``: that of the first class in
    :data:`REASONS` it is an instance of, else ``internal error``."""
    for kind, reason in REASONS:
        if isinstance(error, kind):
            return reason
    return FailureReason.INTERNAL_ERROR
