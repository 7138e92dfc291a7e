"""The agent's log records: named events, the request they belong to, and how each
format (``--log-format``) writes them.

Every module logs through :mod:`logging`, under a stable logger name. Most records are
sentences for people (``could not clean the source cache ...``); the ones a collector
acts on are *named events* with fields, logged with :func:`event`: ``bind``,
``http.access``, ``process.create``, ``process.attach``, ``process.delete``,
``process.state``, ``stop``. A record is turned into one flat dict by :func:`structure`::

    {"@timestamp": "2026-12-06T20:15:00.123456+00:00", "event": "http.access",
     "level": "info", "logger": "smartmob_agent.access", "method": "GET", "path": "/",
     "outcome": 200, "duration": 0.0012, "remote": "127.0.0.1", "request": "4f0c..."}

(a sentence is ``"event": "log"`` with its ``message``); ``kv`` and ``json`` render that
dict with structlog's renderers (:func:`formatter`), FluentD gets it as it is. The
``text`` format stays the line a person reads: time, level, logger, message.

A record logged while a request is answered (in :func:`request_scope`) carries that
request's id, in every format. No format shows a secret: the value of every
credential-like query parameter is hidden in every string of a record (see
:mod:`smartmob_agent.output.redact`), and no record holds a key or a header.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from smartmob_agent.output.redact import redact
from smartmob_agent.output.throttle import RepeatLimit

if TYPE_CHECKING:
    import structlog

#: The attributes of a :class:`logging.LogRecord` that make it a named event.
EVENT_ATTR = "smartmob_event"
FIELDS_ATTR = "smartmob_fields"
#: The ``event`` of a record that is a sentence, not a named event.
SENTENCE = "log"
#: How the ``text`` format writes a record.
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: How the agent's own log (the ``agent-log`` link) keeps a ``text`` record: the time is
#: the line's ``at``.
AGENT_LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
#: The logger of the ``http.access`` records, and that of the ``process.state`` ones: the
#: ``text`` format writes theirs only at ``--log-level debug`` (a line per request or
#: state change is noise for a person at a terminal); ``kv`` and ``json`` at ``info``.
ACCESS_LOGGER = "smartmob_agent.access"
STATES_LOGGER = "smartmob_agent.states"
CHATTY_LOGGERS = (ACCESS_LOGGER, STATES_LOGGER)
#: Keys every structured record has; an event's fields do not replace them.
_BASE_KEYS = frozenset({"@timestamp", "event", "level", "logger"})


def event(
    logger: logging.Logger, name: str, message: str | None = None, /, *,
    level: int = logging.INFO, text: str | None = None, **fields: Any,
) -> None:
    """Log the named event ``name`` with ``fields`` (JSON values: strings, numbers,
    booleans, ``None``).

    Args:
        message: the sentence the ``text`` format writes, and the others as the
            record's ``message``.
        text: without ``message``, the line the ``text`` format writes, which the others
            leave out (their fields say it); by default ``name`` and the fields as
            ``key=value``.
    """
    if message is not None:
        fields = {**fields, "message": message}
    else:
        message = text if text is not None else " ".join(
            [name, *(f"{key}={fields[key]}" for key in sorted(fields))])
    logger.log(level, "%s", message, extra={EVENT_ATTR: name, FIELDS_ATTR: fields})


class StateRecords:
    """The ``process.state`` records: ``slug``, ``from``, ``to``, and for a change to
    ``failed`` its ``reason`` (the failure's name, such as ``download failure``) and
    ``error`` (its sentence). A process in a crash loop changes state many times a
    second: as its other records (:mod:`~smartmob_agent.output.throttle`), each change
    of one process is logged :data:`~smartmob_agent.output.throttle.BURST` times per
    window at most, the others summed up."""

    def __init__(self) -> None:
        self._limits: dict[str, RepeatLimit] = {}

    def changed(
        self, slug: str, old: str, new: str, reason: str | None = None,
        error: str | None = None,
    ) -> None:
        """Log process ``slug`` going from ``old`` to ``new``."""
        limit = self._limits.get(slug)
        if limit is None:
            limit = self._limits[slug] = RepeatLimit(logging.getLogger(STATES_LOGGER), slug)
        fields = {"slug": slug, "from": old, "to": new, "reason": reason, "error": error}
        why = f" ({reason}: {error})" if reason or error else ""
        # one template per change, so that each kind of change has its own window
        limit.info(f"%s: {old} -> {new}%s", slug, why, extra={
            EVENT_ATTR: "process.state", FIELDS_ATTR: {**fields, "message": f"{slug}: "
                                                        f"{old} -> {new}{why}"}})

    def forget(self, slug: str) -> None:
        """Say what was held back of process ``slug``, and forget it (it is deleted)."""
        limit = self._limits.pop(slug, None)
        if limit is not None:
            limit.flush()


class _Scope:
    """The request being answered: its id, until the answer is done."""

    __slots__ = ("id", "open")

    def __init__(self, request_id: str) -> None:
        self.id = request_id
        self.open = True


# a task started while a request is answered (a process's provisioning) inherits the
# scope; closing it at the end of the request keeps that task's later records unmarked
_REQUEST: contextvars.ContextVar[_Scope | None] = contextvars.ContextVar(
    "smartmob_request", default=None
)


@contextlib.contextmanager
def request_scope(request_id: str) -> Iterator[None]:
    """Mark every record logged inside (by this task, and by those it starts, until the
    block ends) as one of request ``request_id``."""
    scope = _Scope(request_id)
    token = _REQUEST.set(scope)
    try:
        yield
    finally:
        scope.open = False
        _REQUEST.reset(token)


def current_request() -> str | None:
    """The id of the request being answered, if a record now belongs to one."""
    scope = _REQUEST.get()
    return scope.id if scope is not None and scope.open else None


def timestamp(created: float, utc: bool) -> str:
    """``created`` (seconds since the epoch) in ISO 8601, in UTC (``+00:00``) or in local
    time with its offset.

    >>> from smartmob_agent.output.logrecords import timestamp
    >>> timestamp(1796148000.25, utc=True)
    '2026-12-01T18:00:00.250000+00:00'
    """
    moment = datetime.fromtimestamp(created, UTC)
    return (moment if utc else moment.astimezone()).isoformat(timespec="microseconds")


def _plain(value: Any) -> Any:
    """``value`` as JSON (and msgpack) can hold it, every string redacted."""
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return redact(str(value))


def structure(
    record: logging.LogRecord, *, utc: bool, message: str | None = None
) -> dict[str, Any]:
    """The flat dict of ``record``: ``@timestamp``, ``event``, ``level``, ``logger``,
    then its ``message`` (a sentence; ``message`` if given, else the record's), its
    fields (a named event), its ``request`` and its ``exception`` (a traceback), every
    string redacted."""
    fields: dict[str, Any] = {}
    name = getattr(record, EVENT_ATTR, None)
    if name is None:
        name = SENTENCE
        fields["message"] = record.getMessage() if message is None else message
    else:
        fields.update(getattr(record, FIELDS_ATTR, None) or {})
    request = current_request()
    if request is not None:
        fields.setdefault("request", request)
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        fields["exception"] = record.exc_text
    result = {key: _plain(value) for key, value in fields.items() if key not in _BASE_KEYS}
    result.update({
        "@timestamp": timestamp(record.created, utc), "event": str(name),
        "level": record.levelname.lower(), "logger": record.name,
    })
    return result


class TextFormatter(logging.Formatter):
    """The ``text`` format: today's line, with ``[request <id>]`` after the message of a
    record logged while a request is answered; the time in UTC if asked."""

    def __init__(self, fmt: str = TEXT_FORMAT, *, utc: bool = False) -> None:
        super().__init__(fmt)
        if utc:
            self.converter = time.gmtime

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        fields = getattr(record, FIELDS_ATTR, None) or {}
        request = fields["request"] if "request" in fields else current_request()
        return text if request is None else f"{text} [request {request}]"


def formatter(log_format: str, *, utc: bool = False, agent_log: bool = False) -> logging.Formatter:
    """The formatter of ``log_format`` (``text``, ``kv`` or ``json``).

    Args:
        agent_log: for the agent's own log, whose lines have their own time: the
            ``text`` format leaves it out.
    """
    if log_format == "text":
        return TextFormatter(AGENT_LOG_FORMAT if agent_log else TEXT_FORMAT, utc=utc)
    # here: the default text format does without structlog, which imports rich (and
    # pygments) where they are installed: 1 to 5 MB of memory
    import structlog

    renderer: structlog.types.Processor
    if log_format == "kv":  # the original agent's order: the time and the event first
        renderer = structlog.processors.KeyValueRenderer(
            sort_keys=True, key_order=["@timestamp", "event"]
        )
    elif log_format == "json":
        renderer = structlog.processors.JSONRenderer(sort_keys=True)
    else:
        raise ValueError(f"unknown log format {log_format!r}")

    def structured(
        _logger: Any, _method: str, event_dict: structlog.types.EventDict
    ) -> structlog.types.EventDict:
        # the record is a copy whose arguments structlog took away: its message is here
        return structure(event_dict["_record"], utc=utc, message=event_dict["event"])

    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structured], processors=[renderer], keep_exc_info=False,
    )


class RedactKeys(logging.Filter):
    """Hides the value of every credential-like query parameter in log records (their
    message and traceback), such as a key in the access log's request line: see
    :func:`~smartmob_agent.output.redact.redact`."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        hidden = redact(message)
        if hidden != message:
            record.msg, record.args = hidden, None
        if record.exc_info and not record.exc_text:  # formatted once, here, then kept
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True
