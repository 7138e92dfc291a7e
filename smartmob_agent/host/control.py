"""The interval rules of host statistics and the messages a ``host-stats`` WebSocket
client sends: pure.

A client chooses how often snapshots come (``?interval=`` on the handshake, or a
``{"interval": s}`` message at any time), and may pause and resume them
(``{"stop": true}``, ``{"start": true}``). A bad value is refused with a sentence and
changes nothing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from smartmob_agent.errors import InvalidRequest

#: Shortest interval between two snapshots, in seconds: below it a snapshot would cost
#: the agent more than it tells (and CPU figures over a shorter window are noise).
MIN_INTERVAL = 0.5
#: Longest interval, in seconds (an hour).
MAX_INTERVAL = 3600.0
#: The interval when the client gives none.
DEFAULT_INTERVAL = 2.0
#: The keys a control message may hold.
CONTROL_KEYS = ("interval", "stop", "start")


def check_interval(value: object) -> float:
    """The interval ``value`` stands for, in seconds, if it is a number in the rules.

    >>> from smartmob_agent.host.control import check_interval
    >>> check_interval(0.5), check_interval(3600)
    (0.5, 3600.0)
    >>> check_interval(0.49)
    Traceback (most recent call last):
    ...
    ValueError: the interval must be from 0.5 to 3600 seconds (0.49 is not)

    Raises:
        ValueError: saying why in a sentence: not a number (a boolean is not one), not
            finite, or out of :data:`MIN_INTERVAL` .. :data:`MAX_INTERVAL`.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(
            f"the interval must be a number of seconds, not {json.dumps(value)[:40]}"
        )
    seconds = float(value)
    if not math.isfinite(seconds) or not MIN_INTERVAL <= seconds <= MAX_INTERVAL:
        raise ValueError(
            f"the interval must be from {MIN_INTERVAL:g} to {MAX_INTERVAL:g} seconds "
            f"({value!r} is not)"
        )
    return seconds


def interval_query(values: list[str]) -> float:
    """The interval of a handshake's ``?interval=`` values (:data:`DEFAULT_INTERVAL`
    when there are none).

    >>> from smartmob_agent.host.control import interval_query
    >>> interval_query([]), interval_query(["0.5"]), interval_query(["10"])
    (2.0, 0.5, 10.0)

    Raises:
        InvalidRequest: given twice, not a number, or outside the rules.
    """
    if not values:
        return DEFAULT_INTERVAL
    problem = None
    if len(values) > 1:
        problem = "give interval at most once"
    else:
        try:
            return check_interval(float(values[0]))
        except ValueError as error:
            problem = (
                str(error) if "interval" in str(error)
                else f"the interval must be a number of seconds, not {values[0][:40]!r}"
            )
    raise InvalidRequest(f"bad query on host-stats: {problem}", {"interval": problem})


@dataclass(frozen=True)
class Control:
    """What one client message asks for; ``None`` for what it does not touch.

    Attributes:
        interval: the new interval, in seconds.
        paused: ``True`` for ``{"stop": true}``, ``False`` for ``{"start": true}``.
    """

    interval: float | None = None
    paused: bool | None = None


def parse_control(text: str) -> Control:
    """Read one text frame of a client: a JSON object with ``interval`` (a number of
    seconds), ``stop`` (``true``) or ``start`` (``true``); ``stop`` and ``start``
    together are refused.

    >>> from smartmob_agent.host.control import parse_control
    >>> parse_control('{"interval": 0.5}'), parse_control('{"stop": true}')
    (Control(interval=0.5, paused=None), Control(interval=None, paused=True))

    Raises:
        ValueError: saying why in a sentence.
    """
    try:
        message = json.loads(text)
    except ValueError:
        raise ValueError(
            'a message must be a JSON object such as {"interval": 2}, {"stop": true} '
            'or {"start": true}'
        ) from None
    if not isinstance(message, dict) or not message:
        raise ValueError(
            'a message must be a JSON object with "interval", "stop" or "start"'
        )
    unknown = sorted(set(message) - set(CONTROL_KEYS))
    if unknown:
        raise ValueError(
            f"unknown key(s) {', '.join(map(repr, unknown))}: a message may hold "
            '"interval", "stop" and "start"'
        )
    for key in ("stop", "start"):
        if key in message and message[key] is not True:
            raise ValueError(f'"{key}" may only be true')
    if "stop" in message and "start" in message:
        raise ValueError('"stop" and "start" cannot go together')
    interval = check_interval(message["interval"]) if "interval" in message else None
    paused = True if "stop" in message else (False if "start" in message else None)
    return Control(interval, paused)
