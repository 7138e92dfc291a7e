"""Restart decisions: pure functions of what happened, tested as tables.

The seed's rule is "restart until deleted"; the ``restart`` option narrows it
(:class:`~smartmob_agent.model.RestartPolicy`). A run that ends quickly is a crash loop in
the making, so the delay before the next start doubles on each quick exit, from
:attr:`BackoffPolicy.initial` up to :attr:`BackoffPolicy.maximum`; a run that lasted at
least :attr:`BackoffPolicy.reset_after` seconds (``start_seconds``) clears it and is
restarted at once. :func:`decide` puts the rules together.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from smartmob_agent.model import Exit, Options, RestartPolicy

#: A run shorter than this is a failed start whatever ``start_seconds`` says, so that even
#: with ``start_seconds: 0`` a crash loop backs off instead of spinning.
MIN_START_SECONDS = 0.1
#: The share of a delay that random jitter may take off, so that processes which crash
#: together do not all restart in the same millisecond.
JITTER = 0.25

#: ``/bin/sh`` exits with these when the command is not found (127) or not executable (126).
SHELL_CANNOT_RUN = frozenset({126, 127})


@dataclass(frozen=True)
class BackoffPolicy:
    """Exponential restart delay, in seconds."""

    initial: float = 0.1
    maximum: float = 30.0
    factor: float = 2.0
    reset_after: float = 1.0


def next_delay(policy: BackoffPolicy, previous: float, ran_for: float) -> float:
    """Return how long to wait before starting again.

    Args:
        policy: the delays to apply.
        previous: the delay used before the run that just ended (0 if none).
        ran_for: how long that run lasted, in seconds.

    Returns:
        0 when the run was long enough to count as healthy, else the next delay of the
        exponential series, capped at ``policy.maximum``.
    """
    if ran_for >= policy.reset_after:
        return 0.0
    if previous <= 0:
        return min(policy.initial, policy.maximum)
    return min(previous * policy.factor, policy.maximum)


def cannot_run(exit: Exit, ran_for: float, policy: BackoffPolicy) -> bool:
    """Tell whether an exit means the command itself cannot run (not found, not executable).

    Restarting such a command only repeats the same error, so the process fails instead.
    Only a quick exit counts (under ``reset_after``, and under 1 s whatever it is): a
    long-running program may legitimately exit with 127.
    """
    return exit.code in SHELL_CANNOT_RUN and ran_for < max(policy.reset_after, 1.0)


def backoff_policy(options: Options) -> BackoffPolicy:
    """The backoff series a process's options ask for."""
    return BackoffPolicy(
        initial=options.backoff.initial,
        maximum=options.backoff.maximum,
        reset_after=max(options.start_seconds, MIN_START_SECONDS),
    )


class Action(enum.Enum):
    """What to do after a child exited."""

    RESTART = "restart"  # start again, after ``delay`` seconds (0: at once)
    EXIT = "exit"  # leave it ended: the restart policy does not restart it
    FAIL = "fail"  # give up: restarting cannot help or has been tried enough


@dataclass(frozen=True)
class Decision:
    """The outcome of :func:`decide`.

    Attributes:
        action: what to do.
        delay: the backoff delay to remember (the next quick exit doubles it).
        wait: how long to wait before the restart: ``delay`` less some jitter.
        failed_starts: consecutive runs shorter than ``start_seconds``, this one included.
        reason: why, for :attr:`Action.FAIL` (a sentence for ``error``).
    """

    action: Action
    delay: float = 0.0
    wait: float = 0.0
    failed_starts: int = 0
    reason: str = ""


def decide(
    options: Options,
    exit: Exit,
    ran_for: float,
    failed_starts: int,
    previous_delay: float,
    jitter: float = 0.0,
) -> Decision:
    """Decide what follows the exit of a child.

    Args:
        options: the process's options.
        exit: how the child ended.
        ran_for: how long it ran, in seconds.
        failed_starts: consecutive failed starts before this run.
        previous_delay: the backoff delay used before this run (0 if none).
        jitter: a number in [0, 1) (random in production): takes up to
            :data:`JITTER` of the delay off the wait.
    """
    policy = backoff_policy(options)
    failed = ran_for < policy.reset_after
    count = failed_starts + 1 if failed else 0
    if cannot_run(exit, ran_for, policy):
        return Decision(Action.FAIL, failed_starts=count, reason="cannot run")
    if options.restart is RestartPolicy.NEVER or (
        options.restart is RestartPolicy.ON_FAILURE and options.is_clean(exit)
    ):
        return Decision(Action.EXIT, failed_starts=count)
    if options.max_restarts is not None and count > options.max_restarts:
        return Decision(
            Action.FAIL,
            failed_starts=count,
            reason=(
                f"gave up after {count} failed start(s) in a row (runs shorter than "
                f"{options.start_seconds:g} s; max_restarts is {options.max_restarts}); "
                f"the last one {exit.describe()}"
            ),
        )
    delay = next_delay(policy, previous_delay, ran_for)
    wait = delay * (1.0 - JITTER * min(max(jitter, 0.0), 1.0))
    return Decision(Action.RESTART, delay=delay, wait=wait, failed_starts=count)
