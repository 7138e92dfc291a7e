"""The failure reasons as a table: each error class that fails a process, its one reason."""

from __future__ import annotations

import doctest

import pytest

from smartmob_agent import errors
from smartmob_agent.model import FailureReason
from smartmob_agent.sources.dotenv import DotenvError
from smartmob_agent.supervision import failures
from smartmob_agent.supervision.failures import REASONS, failure_reason

R = FailureReason


@pytest.mark.parametrize(("error", "reason"), [
    (errors.DownloadError("404"), R.DOWNLOAD_FAILURE),
    (errors.ChecksumMismatch("other digest"), R.CHECKSUM_MISMATCH),
    (errors.ArchiveError("corrupt"), R.UNPACK_FAILURE),
    (errors.ArchiveRefused("unsafe"), R.ARCHIVE_REFUSED),
    (errors.NoProcfile("none"), R.NO_PROCFILE),
    (errors.ProcfileError("invalid"), R.BAD_PROCFILE),
    (DotenvError("invalid"), R.BAD_DOTENV),
    (errors.UnknownProcessType("worker"), R.UNKNOWN_PROCESS_TYPE),
    (errors.WorkingDirError("nope"), R.BAD_WORKING_DIR),
    (errors.VirtualEnvironmentError("venv"), R.VIRTUAL_ENVIRONMENT_FAILURE),
    (errors.PipInstallError("pip"), R.PIP_INSTALL_FAILURE),
    (errors.ReleaseError("release"), R.RELEASE_FAILURE),
    (errors.SpawnError("cannot run"), R.START_FAILURE),
    (errors.TooManyRestarts("gave up"), R.MAX_RESTARTS),
    (errors.AgentError("an error no way of failing raises"), R.INTERNAL_ERROR),
    (errors.InvalidTransition("a bug"), R.INTERNAL_ERROR),
    (OSError(28, "No space left on device"), R.INTERNAL_ERROR),
])
def test_each_error_has_its_reason(error: BaseException, reason: FailureReason) -> None:
    """The reason of each error class; anything unforeseen is ``internal error``."""
    assert failure_reason(error) is reason


def test_each_reason_but_internal_error_stands_for_exactly_one_class() -> None:
    """The set is closed and each name means one way of failing."""
    named = [reason for _, reason in REASONS]
    assert len(named) == len(set(named))
    assert set(named) == set(R) - {R.INTERNAL_ERROR}


def test_no_entry_is_hidden_by_an_earlier_one() -> None:
    """A subclass comes before its base, or the base's reason would win."""
    for position, (kind, _) in enumerate(REASONS):
        for earlier, _ in REASONS[:position]:
            assert not issubclass(kind, earlier), (kind, earlier)


def test_the_original_names_are_kept() -> None:
    """The names the original agent's clients switch on are values of the set."""
    original = {"download failure", "no procfile", "unknown process type",
                "pip install failure", "virtual environment failure"}
    assert original <= {reason.value for reason in R}


def test_the_doctests_of_the_module() -> None:
    assert doctest.testmod(failures).failed == 0
