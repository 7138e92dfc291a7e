"""The query parameters of the ``logs`` link and the ``attach`` WebSocket, checked: pure.

The request bodies are :mod:`smartmob_agent.schemas`; what a query may say is here, with
the same kind of errors (:class:`~smartmob_agent.errors.InvalidRequest`, naming each bad
parameter).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from smartmob_agent.errors import InvalidRequest

#: Lines a ``logs`` request returns when it gives no ``tail``, and the most it may ask.
DEFAULT_TAIL = 100
MAX_TAIL = 10_000


def parse_log_query(query: Mapping[str, str]) -> tuple[int, float | None]:
    """The ``tail`` and ``since`` of a ``logs`` request's query, checked.

    ``since`` is an ISO 8601 time with a time zone (as the status document writes them)
    or seconds since the epoch.

    >>> from smartmob_agent.queries import parse_log_query
    >>> parse_log_query({"tail": "5", "since": "2026-12-01T18:00:00.123Z"})
    (5, 1796148000.123)
    >>> parse_log_query({"since": "1796148000.5"})
    (100, 1796148000.5)

    Raises:
        InvalidRequest: naming each bad parameter.
    """
    problems: dict[str, str] = {}
    tail = _whole_parameter(query, "tail", MAX_TAIL, _TAIL_RULE, problems)
    since = None
    text = query.get("since")
    if text is not None:
        since = parse_time(text)
        if since is None:
            problems["since"] = (
                "must be a time in ISO 8601 with a time zone (2026-12-01T18:00:00.123Z) or "
                "seconds since the epoch (1796148000.123)"
            )
    _check_query(problems)
    return DEFAULT_TAIL if tail is None else tail, since


#: The highest sequence number ``after`` may name (SQLite's largest integer).
MAX_SEQ = 2**63 - 1


@dataclass(frozen=True)
class AttachQuery:
    """What an ``attach`` request asks for: replay the last ``tail`` lines (numbered
    above ``after`` if given; ``None``: every line after it that the log keeps) before
    following, as JSON frames or bare text; ``live``: drop what the client is too slow
    for, instead of serving it from the log."""

    tail: int | None = 0
    after: int | None = None
    json: bool = False
    live: bool = False


def parse_attach_query(query: Mapping[str, str]) -> AttachQuery:
    """The ``tail``, ``after``, ``format`` and ``live`` of an ``attach`` request's query,
    checked.

    Without ``tail``, nothing is replayed, unless ``after`` is given: then every line
    after it that the log keeps is (up to ``MAX_TAIL`` (10000) with ``live=1``).

    >>> from smartmob_agent.queries import parse_attach_query
    >>> parse_attach_query({"tail": "5", "format": "json"})
    AttachQuery(tail=5, after=None, json=True, live=False)
    >>> parse_attach_query({"after": "41"})
    AttachQuery(tail=None, after=41, json=False, live=False)
    >>> parse_attach_query({"after": "41", "live": "1"})
    AttachQuery(tail=10000, after=41, json=False, live=True)

    Raises:
        InvalidRequest: naming each bad parameter.
    """
    problems: dict[str, str] = {}
    tail = _whole_parameter(query, "tail", MAX_TAIL, _TAIL_RULE, problems)
    after = _whole_parameter(
        query, "after", MAX_SEQ,
        "must be the seq of a line (a whole number from 0), as a JSON frame gives it",
        problems,
    )
    form = query.get("format", "text")
    if form not in ("text", "json"):
        problems["format"] = "must be text (one bare line per frame, the default) or json"
    live = query.get("live", "0")
    if live not in ("0", "1"):
        problems["live"] = (
            "must be 1 (drop the lines this client is too slow for) or 0 (the default: "
            "send them from the log)"
        )
    _check_query(problems)
    if tail is None and after is None:
        tail = 0
    elif tail is None and live == "1":
        tail = MAX_TAIL
    return AttachQuery(tail, after, form == "json", live == "1")


_TAIL_RULE = f"must be a whole number of lines from 0 to {MAX_TAIL}"


def _whole_parameter(
    query: Mapping[str, str], name: str, highest: int, rule: str, problems: dict[str, str]
) -> int | None:
    """The query parameter ``name`` as a whole number up to ``highest``; ``None`` when
    absent, or when bad (then ``rule`` is noted in ``problems``)."""
    text = query.get(name)
    if text is None:
        return None
    if _whole(text, highest):
        return int(text)
    problems[name] = rule
    return None


def _check_query(problems: dict[str, str]) -> None:
    """Raise the error naming every bad query parameter, if there is one."""
    if problems:
        detail = "; ".join(f"{name} {why}" for name, why in problems.items())
        raise InvalidRequest(f"invalid query: {detail}", problems)


def _whole(text: str, highest: int) -> bool:
    """Whether ``text`` is a whole number in ASCII digits from 0 to ``highest``."""
    return (
        text.isascii() and text.isdigit() and len(text) <= len(str(highest))
        and int(text) <= highest
    )


def parse_time(text: str) -> float | None:
    """Seconds since the epoch from ISO 8601 with a time zone, or from seconds; ``None``
    if ``text`` is neither."""
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return seconds if 0 <= seconds < 1e11 else None  # no nan, inf or year 5000
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None or len(text) < 11:  # a bare date has no time zone either
        return None
    return moment.timestamp()
