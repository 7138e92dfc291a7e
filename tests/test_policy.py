"""Restart decisions as tables: the backoff series and commands that cannot run."""

from __future__ import annotations

import dataclasses

import pytest

from smartmob_agent.model import Exit
from smartmob_agent.policy import SHELL_CANNOT_RUN, BackoffPolicy, cannot_run, next_delay

POLICY = BackoffPolicy(initial=0.1, maximum=1.0, factor=2.0, reset_after=5.0)


@pytest.mark.parametrize(
    ("previous", "ran_for", "expected"),
    [
        pytest.param(0.0, 0.0, 0.1, id="first-quick-exit-gets-initial"),
        pytest.param(-1.0, 0.0, 0.1, id="negative-previous-counts-as-none"),
        pytest.param(0.1, 0.0, 0.2, id="doubles"),
        pytest.param(0.2, 1.0, 0.4, id="doubles-again"),
        pytest.param(0.4, 4.99, 0.8, id="just-under-reset-still-doubles"),
        pytest.param(0.8, 0.0, 1.0, id="capped-at-maximum"),
        pytest.param(1.0, 0.0, 1.0, id="stays-at-maximum"),
        pytest.param(0.0, 5.0, 0.0, id="reset-at-exactly-reset-after"),
        pytest.param(1.0, 5.0, 0.0, id="long-run-clears-maximum"),
        pytest.param(0.8, 3600.0, 0.0, id="very-long-run"),
    ],
)
def test_next_delay_table(previous: float, ran_for: float, expected: float) -> None:
    """next_delay() follows the doubling series, capped, and resets after a healthy run."""
    assert next_delay(POLICY, previous, ran_for) == pytest.approx(expected)


def test_crash_loop_series_doubles_up_to_the_cap() -> None:
    """Repeated quick exits give initial, doubled delays, then the maximum forever."""
    delays, delay = [], 0.0
    for _ in range(8):
        delay = next_delay(POLICY, delay, ran_for=0.01)
        delays.append(delay)
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0])


def test_healthy_run_in_the_middle_restarts_the_series() -> None:
    """After a run as long as reset_after, the next quick exit starts again at initial."""
    delay = next_delay(POLICY, 0.8, ran_for=0.0)
    assert delay == pytest.approx(1.0)
    delay = next_delay(POLICY, delay, ran_for=POLICY.reset_after)
    assert delay == 0.0
    assert next_delay(POLICY, delay, ran_for=0.0) == pytest.approx(POLICY.initial)


@pytest.mark.parametrize(
    ("policy", "previous", "expected"),
    [
        pytest.param(BackoffPolicy(initial=5.0, maximum=2.0), 0.0, 2.0, id="initial-over-max"),
        pytest.param(BackoffPolicy(initial=0.0, maximum=2.0), 0.0, 0.0, id="zero-initial"),
        pytest.param(BackoffPolicy(factor=3.0), 0.1, 0.3, id="other-factor"),
        pytest.param(BackoffPolicy(initial=0.0, maximum=0.0), 0.0, 0.0, id="all-zero-for-tests"),
    ],
)
def test_next_delay_with_other_policies(
    policy: BackoffPolicy, previous: float, expected: float
) -> None:
    """The initial delay is capped by the maximum too, and the factor is honoured."""
    assert next_delay(policy, previous, ran_for=0.0) == pytest.approx(expected)


def test_default_policy_is_sane() -> None:
    """The default policy starts small, caps in tens of seconds and is immutable."""
    policy = BackoffPolicy()
    assert 0 < policy.initial < policy.maximum <= 60
    assert policy.factor > 1
    assert policy.reset_after > 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.initial = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("code", "ran_for", "expected"),
    [
        pytest.param(127, 0.0, True, id="not-found-at-once"),
        pytest.param(126, 0.5, True, id="not-executable-quickly"),
        pytest.param(127, 4.99, True, id="just-under-reset"),
        pytest.param(127, 5.0, False, id="after-a-healthy-run"),
        pytest.param(126, 100.0, False, id="long-run-exiting-126"),
        pytest.param(0, 0.0, False, id="clean-exit"),
        pytest.param(1, 0.0, False, id="ordinary-failure"),
        pytest.param(125, 0.0, False, id="just-below"),
        pytest.param(128, 0.0, False, id="just-above"),
        pytest.param(-9, 0.0, False, id="killed-by-signal"),
        pytest.param(-127, 0.0, False, id="signal-127-is-not-exit-127"),
    ],
)
def test_cannot_run_table(code: int, ran_for: float, expected: bool) -> None:
    """Only a quick shell exit 126 or 127 means the command itself cannot run."""
    assert cannot_run(Exit(code), ran_for, POLICY) is expected


def test_shell_cannot_run_codes() -> None:
    """The shell's 'not executable' and 'not found' statuses are the ones recognised."""
    assert frozenset({126, 127}) == SHELL_CANNOT_RUN
