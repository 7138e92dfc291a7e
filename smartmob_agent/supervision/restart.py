"""Restart decisions: pure functions of what happened, tested as tables.

The seed's rule is "restart until deleted"; the ``restart`` option narrows it
(:class:`~smartmob_agent.model.RestartPolicy`). A run that ends quickly is a crash loop in
the making, so the delay before the next start follows the process's
:class:`~smartmob_agent.model.Backoff` series on each quick exit (doubling, from
``backoff.initial`` up to ``backoff.maximum``), never under
:data:`~smartmob_agent.model.MIN_RESTART_DELAY`; a run that lasted at least
:func:`reset_after` seconds (``start_seconds``) clears it and is restarted at once.
:func:`decide` puts the rules together, and :func:`failure` names what a process that it
gave up on fails with.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass

from smartmob_agent.errors import AgentError, SpawnError, TooManyRestarts
from smartmob_agent.model import MIN_RESTART_DELAY, Backoff, Exit, Options, RestartPolicy

#: A run shorter than this is a failed start whatever ``start_seconds`` says, so that even
#: with ``start_seconds: 0`` a crash loop backs off instead of spinning.
MIN_START_SECONDS = 0.1
#: The share of a delay that random jitter may take off, so that processes which crash
#: together do not all restart in the same millisecond.
JITTER = 0.25

#: ``/bin/sh`` exits with these when the command is not found (127) or not executable (126).
SHELL_CANNOT_RUN = frozenset({126, 127})
#: The :attr:`Decision.reason` of a command that cannot run (see :func:`cannot_run`).
CANNOT_RUN = "cannot run"


def reset_after(options: Options) -> float:
    """How long a run must last to count as a successful start, which clears the backoff:
    ``start_seconds``, but never under :data:`MIN_START_SECONDS`."""
    return max(options.start_seconds, MIN_START_SECONDS)


def next_delay(backoff: Backoff, previous: float, ran_for: float, reset_after: float) -> float:
    """Return how long to wait before starting again.

    Args:
        backoff: the series of delays to follow.
        previous: the delay used before the run that just ended (0 if none).
        ran_for: how long that run lasted, in seconds.
        reset_after: a run at least this long counts as healthy (see :func:`reset_after`).

    Returns:
        0 when the run was long enough to count as healthy, else the next delay of the
        series (see :meth:`.Backoff.after`).
    """
    if ran_for >= reset_after:
        return 0.0
    return backoff.after(previous)


def cannot_run(exit: Exit, ran_for: float, reset_after: float) -> bool:
    """Tell whether an exit means the command itself cannot run (not found, not executable).

    Restarting such a command only repeats the same error, so the process fails instead.
    Only a quick exit counts (under ``reset_after``, and under 1 s whatever it is): a
    long-running program may legitimately exit with 127.
    """
    return exit.code in SHELL_CANNOT_RUN and ran_for < max(reset_after, 1.0)


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
        wait: how long to wait before the restart: ``delay`` less some jitter, but
            never under :data:`~smartmob_agent.model.MIN_RESTART_DELAY` after a failed
            start.
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
    healthy_after = reset_after(options)
    failed = ran_for < healthy_after
    count = failed_starts + 1 if failed else 0
    if cannot_run(exit, ran_for, healthy_after):
        return Decision(Action.FAIL, failed_starts=count, reason=CANNOT_RUN)
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
    delay = next_delay(options.backoff, previous_delay, ran_for, healthy_after)
    wait = delay * (1.0 - JITTER * min(max(jitter, 0.0), 1.0))
    if failed:  # whatever the backoff says, a crash loop never spins (issue 13 item 8)
        delay, wait = max(delay, MIN_RESTART_DELAY), max(wait, MIN_RESTART_DELAY)
    return Decision(Action.RESTART, delay=delay, wait=wait, failed_starts=count)


def failure_message(decision: Decision, exit: Exit, process_type: str, last_line: str) -> str:
    """The ``error`` of a process that :func:`decide` gave up on (:attr:`Action.FAIL`), given
    the last line of output before the exit.

    >>> from smartmob_agent.model import Exit
    >>> from smartmob_agent.supervision.restart import Action, Decision, failure_message
    >>> gave_up = Decision(Action.FAIL, reason="cannot run")
    >>> print(failure_message(gave_up, Exit(127), "web", "sh: 1: gunicorn: not found"))
    the command of process type 'web' cannot run: /bin/sh exited with code 127 (sh: 1: ...)
    """
    if decision.reason != CANNOT_RUN:
        return decision.reason
    return (
        f"the command of process type {process_type!r} cannot run: /bin/sh {exit.describe()}"
        + (f" ({last_line})" if last_line else "")
    )


def failure(decision: Decision, exit: Exit, process_type: str, last_line: str) -> AgentError:
    """The error a process that :func:`decide` gave up on fails with, its message as
    :func:`failure_message` says: a :class:`.SpawnError` for a command that cannot run,
    else :class:`.TooManyRestarts`."""
    message = failure_message(decision, exit, process_type, last_line)
    if decision.reason == CANNOT_RUN:
        return SpawnError(message)
    return TooManyRestarts(message)


@dataclass
class Restarts:
    """What the restart policy keeps about one process across its runs.

    Attributes:
        count: the starts that followed an exit (``restarts`` in the status document).
        failed_starts: consecutive runs shorter than ``start_seconds``.
        delay: the backoff delay waited before the current run (0: none).
    """

    count: int = 0
    failed_starts: int = 0
    delay: float = 0.0

    def after_exit(
        self, options: Options, exit: Exit, ran_for: float, jitter: float, *,
        on_purpose: bool = False,
    ) -> Decision:
        """Decide what follows an exit (see :func:`decide`) and keep what it changes.

        ``on_purpose``: the agent ended the run to start it again (a failed health check),
        which it does at once, whatever the restart policy, and is no failed start.
        """
        if on_purpose:
            ran_for = max(ran_for, options.start_seconds)
            options = dataclasses.replace(options, restart=RestartPolicy.ALWAYS)
        decision = decide(options, exit, ran_for, self.failed_starts, self.delay, jitter)
        self.failed_starts = decision.failed_starts
        if decision.action is Action.RESTART:
            self.count += 1
            self.delay = decision.delay
        return decision

    def after_spawn_failure(self, backoff: Backoff) -> float:
        """The delay before trying again to spawn a child that could not be (for want of
        resources), kept as the backoff delay (never under :data:`.MIN_RESTART_DELAY`)."""
        self.delay = max(backoff.after(self.delay), MIN_RESTART_DELAY)
        return self.delay

    def reset(self) -> None:
        """Begin the backoff and the count of failed starts afresh (a start control)."""
        self.delay = 0.0
        self.failed_starts = 0
