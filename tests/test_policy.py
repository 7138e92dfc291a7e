"""Restart decisions as tables: the backoff series, commands that cannot run, and decide()."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from smartmob_agent.model import MIN_RESTART_DELAY, Backoff, Exit, Options, RestartPolicy
from smartmob_agent.supervision.restart import (
    JITTER,
    MIN_START_SECONDS,
    SHELL_CANNOT_RUN,
    Action,
    Decision,
    Restarts,
    cannot_run,
    decide,
    next_delay,
    reset_after,
)

POLICY = Backoff(initial=0.1, maximum=1.0, factor=2.0)
#: Runs at least this long are healthy in the tables of next_delay() and cannot_run().
RESET_AFTER = 5.0


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
    assert next_delay(POLICY, previous, ran_for, RESET_AFTER) == pytest.approx(expected)


def test_crash_loop_series_doubles_up_to_the_cap() -> None:
    """Repeated quick exits give initial, doubled delays, then the maximum forever."""
    delays, delay = [], 0.0
    for _ in range(8):
        delay = next_delay(POLICY, delay, ran_for=0.01, reset_after=RESET_AFTER)
        delays.append(delay)
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0])


def test_healthy_run_in_the_middle_restarts_the_series() -> None:
    """After a run as long as reset_after, the next quick exit starts again at initial."""
    delay = next_delay(POLICY, 0.8, ran_for=0.0, reset_after=RESET_AFTER)
    assert delay == pytest.approx(1.0)
    delay = next_delay(POLICY, delay, ran_for=RESET_AFTER, reset_after=RESET_AFTER)
    assert delay == 0.0
    assert next_delay(POLICY, delay, ran_for=0.0, reset_after=RESET_AFTER) == pytest.approx(
        POLICY.initial
    )


@pytest.mark.parametrize(
    ("policy", "previous", "expected"),
    [
        pytest.param(Backoff(initial=5.0, maximum=2.0), 0.0, 2.0, id="initial-over-max"),
        pytest.param(Backoff(initial=0.0, maximum=2.0), 0.0, 0.0, id="zero-initial"),
        pytest.param(Backoff(factor=3.0), 0.1, 0.3, id="other-factor"),
        pytest.param(Backoff(initial=0.0, maximum=0.0), 0.0, 0.0, id="all-zero-for-tests"),
    ],
)
def test_next_delay_with_other_policies(
    policy: Backoff, previous: float, expected: float
) -> None:
    """The initial delay is capped by the maximum too, and the factor is honoured."""
    assert next_delay(policy, previous, 0.0, RESET_AFTER) == pytest.approx(expected)


def test_default_policy_is_sane() -> None:
    """The default policy starts small, caps in tens of seconds and is immutable."""
    policy = Backoff()
    assert 0 < policy.initial < policy.maximum <= 60
    assert policy.factor > 1
    assert reset_after(Options()) > 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.initial = 1.0  # type: ignore[misc]  # frozen: the write is the test


@pytest.mark.parametrize("backoff", [
    Backoff(), Backoff(0.5, 30.0), Backoff(0.1, 1.0), Backoff(5.0, 2.0), Backoff(0.0, 2.0),
    Backoff(0.1, 10.0, factor=3.0),
])
def test_retry_delays_and_restart_delays_are_one_series(backoff: Backoff) -> None:
    """The n-th delay of a series (a webhook's retries) is the one after() reaches in n
    steps (a process's restarts): one formula for both."""
    delay = 0.0
    for attempt in range(1, 40):
        delay = backoff.after(delay)
        assert backoff.delay(attempt) == pytest.approx(delay)


def test_a_late_retry_delay_does_not_overflow() -> None:
    """The delay of a very late attempt is the maximum, not an overflow."""
    assert Backoff(0.5, 30.0).delay(100_000) == 30.0


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
    assert cannot_run(Exit(code), ran_for, RESET_AFTER) is expected


def test_shell_cannot_run_codes() -> None:
    """The shell's 'not executable' and 'not found' statuses are the ones recognised."""
    assert frozenset({126, 127}) == SHELL_CANNOT_RUN


# -- decide() ---------------------------------------------------------------------------------

#: Options for decide() tables: runs of 1 s or more are healthy, backoff 0.5 s to 4 s.
LONG = 1.0  # ran_for of a healthy run (exactly start_seconds)
QUICK = 0.2  # ran_for of a failed start
CLEAN, UNCLEAN, KILLED, TERMINATED = Exit(0), Exit(1), Exit(-9), Exit(-15)


def options(**changes: Any) -> Options:
    """Options with start_seconds 1 and backoff 0.5 to 4 s, plus ``changes``."""
    base: dict[str, Any] = {"start_seconds": 1.0, "backoff": Backoff(0.5, 4.0)}
    return Options(**{**base, **changes})


R, X, F = Action.RESTART, Action.EXIT, Action.FAIL


@pytest.mark.parametrize(
    ("restart", "exit", "expected"),
    [
        pytest.param(RestartPolicy.ALWAYS, CLEAN, R, id="always-clean"),
        pytest.param(RestartPolicy.ALWAYS, UNCLEAN, R, id="always-unclean"),
        pytest.param(RestartPolicy.ALWAYS, KILLED, R, id="always-killed"),
        pytest.param(RestartPolicy.ALWAYS, TERMINATED, R, id="always-terminated"),
        pytest.param(RestartPolicy.ON_FAILURE, CLEAN, X, id="on-failure-clean"),
        pytest.param(RestartPolicy.ON_FAILURE, UNCLEAN, R, id="on-failure-unclean"),
        pytest.param(RestartPolicy.ON_FAILURE, KILLED, R, id="on-failure-killed"),
        pytest.param(RestartPolicy.ON_FAILURE, TERMINATED, R, id="on-failure-terminated"),
        pytest.param(RestartPolicy.NEVER, CLEAN, X, id="never-clean"),
        pytest.param(RestartPolicy.NEVER, UNCLEAN, X, id="never-unclean"),
        pytest.param(RestartPolicy.NEVER, KILLED, X, id="never-killed"),
        pytest.param(RestartPolicy.NEVER, TERMINATED, X, id="never-terminated"),
    ],
)
@pytest.mark.parametrize("ran_for", [LONG, QUICK], ids=["long-run", "quick-run"])
def test_restart_policy_table(
    restart: RestartPolicy, exit: Exit, expected: Action, ran_for: float
) -> None:
    """Each restart policy against clean, unclean and signal exits, after a long or a quick
    run: a restart after a long run is immediate, after a quick one it waits."""
    decision = decide(options(restart=restart), exit, ran_for, 0, 0.0)
    assert decision.action is expected
    assert decision.reason == ""
    assert decision.failed_starts == (1 if ran_for < 1.0 else 0)
    if expected is R:
        assert decision.delay == decision.wait == (0.0 if ran_for >= 1.0 else 0.5)
    else:
        assert decision.delay == decision.wait == 0.0


@pytest.mark.parametrize(
    ("exit_codes", "exit", "expected"),
    [
        pytest.param({0, 3}, Exit(3), X, id="listed-code-is-clean"),
        pytest.param({0, 3}, Exit(0), X, id="zero-still-listed"),
        pytest.param({0, 3}, Exit(1), R, id="unlisted-code"),
        pytest.param({3}, Exit(0), R, id="zero-not-listed"),
        pytest.param(set(), Exit(0), R, id="nothing-is-clean"),
        pytest.param({9, 15}, Exit(-9), R, id="signal-never-clean-even-if-its-number-is-listed"),
        pytest.param({255}, Exit(255), X, id="code-255"),
    ],
)
def test_on_failure_uses_exit_codes(exit_codes: set[int], exit: Exit, expected: Action) -> None:
    """on-failure leaves alone exactly the exits whose code is in exit_codes."""
    decision = decide(
        options(restart=RestartPolicy.ON_FAILURE, exit_codes=frozenset(exit_codes)),
        exit, LONG, 0, 0.0,
    )
    assert decision.action is expected


@pytest.mark.parametrize(
    ("max_restarts", "failed_starts", "ran_for", "expected", "count"),
    [
        pytest.param(0, 0, QUICK, F, 1, id="zero-first-failed-start-fails"),
        pytest.param(0, 0, LONG, R, 0, id="zero-long-run-restarts"),
        pytest.param(0, 5, LONG, R, 0, id="zero-long-run-after-failures-restarts"),
        pytest.param(2, 0, QUICK, R, 1, id="two-first"),
        pytest.param(2, 1, QUICK, R, 2, id="two-second-is-the-last-allowed"),
        pytest.param(2, 2, QUICK, F, 3, id="two-third-fails"),
        pytest.param(2, 7, QUICK, F, 8, id="two-well-past"),
        pytest.param(2, 2, LONG, R, 0, id="two-long-run-resets"),
        pytest.param(2, 1, 0.999, R, 2, id="two-just-under-start-seconds"),
        pytest.param(None, 1_000_000, QUICK, R, 1_000_001, id="none-never-gives-up"),
    ],
)
def test_max_restarts_boundaries(
    max_restarts: int | None, failed_starts: int, ran_for: float, expected: Action,
    count: int,
) -> None:
    """max_restarts counts failed starts in a row (this one included); going past it fails,
    and a run as long as start_seconds clears the count."""
    decision = decide(options(max_restarts=max_restarts), UNCLEAN, ran_for, failed_starts, 0.0)
    assert decision.action is expected
    assert decision.failed_starts == count
    if expected is F:
        assert decision.reason == (
            f"gave up after {count} failed start(s) in a row (runs shorter than 1 s; "
            f"max_restarts is {max_restarts}); the last one exited with code 1"
        )
        assert decision.delay == decision.wait == 0.0


def test_gave_up_reason_names_a_signal() -> None:
    """When the last failed start was killed, the reason says by which signal."""
    decision = decide(options(max_restarts=0), KILLED, QUICK, 0, 0.0)
    assert decision.action is F
    assert decision.reason.endswith("the last one was killed by SIGKILL")


@pytest.mark.parametrize(
    ("restart", "exit"),
    [
        pytest.param(RestartPolicy.NEVER, UNCLEAN, id="never"),
        pytest.param(RestartPolicy.ON_FAILURE, CLEAN, id="on-failure-clean"),
    ],
)
def test_exit_comes_before_max_restarts(restart: RestartPolicy, exit: Exit) -> None:
    """A run the policy does not restart exits, even past max_restarts: nothing gave up."""
    decision = decide(options(restart=restart, max_restarts=0), exit, QUICK, 9, 0.0)
    assert decision.action is X
    assert decision.failed_starts == 10


@pytest.mark.parametrize(
    ("failed_starts", "previous_delay", "ran_for"),
    [
        pytest.param(1, 0.5, 1.0, id="exactly-start-seconds"),
        pytest.param(9, 4.0, 1.5, id="at-the-maximum"),
        pytest.param(3, 2.0, 3600.0, id="an-hour"),
    ],
)
def test_long_run_resets_count_and_delay(
    failed_starts: int, previous_delay: float, ran_for: float
) -> None:
    """A run as long as start_seconds restarts at once, with the count and delay cleared;
    the next quick exit starts the series again at initial."""
    decision = decide(options(), UNCLEAN, ran_for, failed_starts, previous_delay)
    assert decision == Decision(R, delay=0.0, wait=0.0, failed_starts=0)
    following = decide(options(), UNCLEAN, QUICK, decision.failed_starts, decision.delay)
    assert (following.delay, following.failed_starts) == (0.5, 1)


def test_quick_exits_walk_the_backoff_series() -> None:
    """Quick exits in a row double the delay from initial up to max, counting each."""
    delay, count, seen = 0.0, 0, []
    for _ in range(6):
        decision = decide(options(), UNCLEAN, QUICK, count, delay)
        assert decision.action is R
        delay, count = decision.delay, decision.failed_starts
        seen.append((delay, count))
    assert seen == [(0.5, 1), (1.0, 2), (2.0, 3), (4.0, 4), (4.0, 5), (4.0, 6)]


@pytest.mark.parametrize("jitter", [0.0, 1e-9, 0.25, 0.5, 0.75, 0.999999])
@pytest.mark.parametrize("previous", [0.0, 0.5, 2.0, 4.0])
def test_jitter_shortens_the_wait_only(jitter: float, previous: float) -> None:
    """Jitter in [0, 1) takes at most 25% off the wait and never changes the delay."""
    plain = decide(options(), UNCLEAN, QUICK, 0, previous)
    decision = decide(options(), UNCLEAN, QUICK, 0, previous, jitter=jitter)
    assert decision.delay == plain.delay == plain.wait
    assert decision.failed_starts == plain.failed_starts
    assert (1 - JITTER) * decision.delay < decision.wait <= decision.delay
    assert decision.wait == pytest.approx(decision.delay * (1 - JITTER * jitter))


def test_jitter_is_at_most_a_quarter() -> None:
    """The share jitter may take is 25%."""
    assert JITTER == 0.25


@pytest.mark.parametrize(("jitter", "share"), [(-1.0, 1.0), (1.0, 0.75), (7.0, 0.75)])
def test_jitter_out_of_range_is_clamped(jitter: float, share: float) -> None:
    """A jitter outside [0, 1] is clamped: the wait stays between 75% and 100% of delay."""
    decision = decide(options(), UNCLEAN, QUICK, 0, 2.0, jitter=jitter)
    assert decision.delay == 4.0
    assert decision.wait == pytest.approx(4.0 * share)


def test_jitter_does_nothing_after_a_long_run() -> None:
    """An immediate restart stays immediate whatever the jitter."""
    decision = decide(options(), UNCLEAN, LONG, 0, 2.0, jitter=0.9)
    assert decision.delay == decision.wait == 0.0


@pytest.mark.parametrize("restart", list(RestartPolicy))
@pytest.mark.parametrize("code", [126, 127])
def test_cannot_run_fails_whatever_the_policy(restart: RestartPolicy, code: int) -> None:
    """A quick exit 126/127 (the shell could not run the command) fails, counted as a
    failed start, under every restart policy and whatever max_restarts allows."""
    decision = decide(options(restart=restart), Exit(code), QUICK, 2, 1.0)
    assert decision == Decision(F, failed_starts=3, reason="cannot run")


@pytest.mark.parametrize("code", [126, 127])
def test_long_run_exiting_126_or_127_is_an_ordinary_exit(code: int) -> None:
    """A program that ran as long as start_seconds may exit 126/127 itself: restarted."""
    decision = decide(options(), Exit(code), LONG, 0, 0.0)
    assert decision.action is R


@pytest.mark.parametrize("code", [-126, -127, 125, 128])
def test_neighbours_of_cannot_run_are_ordinary(code: int) -> None:
    """Only the codes 126 and 127 mean the command cannot run, not signals 126/127."""
    assert decide(options(), Exit(code), QUICK, 0, 0.0).action is R


def test_decide_is_pure() -> None:
    """The same inputs give the same decision, and the options are left as they were."""
    given = options(max_restarts=3)
    first = decide(given, UNCLEAN, QUICK, 1, 0.5, 0.3)
    assert decide(given, UNCLEAN, QUICK, 1, 0.5, 0.3) == first
    assert given == options(max_restarts=3)


# -- the floor of the restart rate (issue 13, item 8) ------------------------------------------


@pytest.mark.parametrize("backoff", [Backoff(0.001, 0.001), Backoff(0.0, 0.0), Backoff(0.05, 2.0)])
@pytest.mark.parametrize("jitter", [0.0, 0.999999])
def test_a_failed_start_never_waits_under_the_floor(backoff: Backoff, jitter: float) -> None:
    """Whatever the backoff (even one built in code, which no request could ask for) and
    the jitter, a failed start waits at least MIN_RESTART_DELAY, and the delay shown is no
    smaller, even with start_seconds 0."""
    opts = options(backoff=backoff, start_seconds=0.0)
    decision = decide(opts, UNCLEAN, 0.001, 0, 0.0, jitter=jitter)
    assert decision.action is R
    assert decision.wait >= MIN_RESTART_DELAY == 0.1
    assert decision.delay >= decision.wait


def test_the_floor_leaves_longer_delays_and_their_jitter_alone() -> None:
    """Above the floor the series and its jitter are as before."""
    decision = decide(options(backoff=Backoff(0.4, 4.0)), UNCLEAN, QUICK, 0, 0.0, jitter=1.0)
    assert decision.delay == 0.4
    assert decision.wait == pytest.approx(0.3)


def test_a_run_as_long_as_the_shortest_start_is_restarted_at_once() -> None:
    """A run of MIN_START_SECONDS (0.1 s) with start_seconds 0 is a success: no wait, so
    a loop of such runs still starts at most ten times a second."""
    decision = decide(options(start_seconds=0.0), UNCLEAN, MIN_START_SECONDS, 0, 0.0)
    assert (decision.action, decision.delay, decision.wait) == (R, 0.0, 0.0)
    assert MIN_START_SECONDS >= MIN_RESTART_DELAY


def test_a_spawn_that_failed_for_want_of_resources_waits_the_floor_too() -> None:
    """A transient spawn failure is retried after at least MIN_RESTART_DELAY."""
    assert Restarts().after_spawn_failure(Backoff(0.001, 0.001)) == MIN_RESTART_DELAY
    assert Restarts().after_spawn_failure(Backoff(0.3, 1.0)) == 0.3
