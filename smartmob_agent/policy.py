"""Restart decisions: pure functions of what happened, tested as tables.

The seed's rule is "restart until deleted". A run that ends quickly is a crash loop in the
making, so the delay before the next start doubles on each quick exit, from
:attr:`BackoffPolicy.initial` up to :attr:`BackoffPolicy.maximum`; a run that lasted at
least :attr:`BackoffPolicy.reset_after` seconds clears it and is restarted at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from smartmob_agent.model import Exit

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
    Only a quick exit counts: a long-running program may legitimately exit with 127.
    """
    return exit.code in SHELL_CANNOT_RUN and ran_for < policy.reset_after
