"""Where the agent's log records are written: the handlers of ``--logging-endpoint``.

Without an endpoint, ``text`` goes to stderr (a person at a terminal); ``kv`` and
``json`` go to stdout (as the original agent wrote them), but for warnings and errors,
which go to stderr, where problems are looked for. With an endpoint, every record goes
there, and nothing else is written to stdout or stderr:

* ``file:///dev/stdout``, ``file:///dev/stderr``: that stream;
* ``file://<path>``: appended to that file (relative to the agent's current folder),
  made ``0600`` if it is new, one record a line, written at once;
* ``fluent://host:port/tag``: sent to FluentD's forward input by ``fluent-logger``, each
  record (:func:`~smartmob_agent.output.logrecords.structure`, time in UTC) tagged
  ``<tag>.<event>``. A thread sends them, so a slow or absent FluentD never blocks the
  agent: it keeps what could not be sent (up to 1 MiB) and sends it when FluentD is
  back, and drops the oldest records past :data:`FLUENT_QUEUE` waiting ones.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any, TextIO

from smartmob_agent.output.endpoint import STDERR, STDOUT, Endpoint
from smartmob_agent.output.logrecords import RedactKeys, formatter, structure

#: Records waiting for the FluentD sender at most; past it the oldest are dropped.
FLUENT_QUEUE = 10_000
#: Longest wait for a connection to FluentD, or for one write to it.
FLUENT_TIMEOUT = 3.0
#: Longest the agent waits at exit for the records still queued for FluentD.
FLUENT_CLOSE_TIMEOUT = 5.0


class FluentHandler(logging.Handler):
    """Sends each record to a FluentD forward input, tagged ``<tag>.<event>``."""

    def __init__(self, endpoint: Endpoint) -> None:
        super().__init__()
        # here: an agent that sends nothing to FluentD need not hold fluent-logger and
        # msgpack (~0.4 MB of memory)
        from fluent import asyncsender

        self._event_time = asyncsender.EventTime
        self._sender: Any = asyncsender.FluentSender(
            endpoint.tag, host=endpoint.host, port=endpoint.port, timeout=FLUENT_TIMEOUT,
            nanosecond_precision=True, queue_maxsize=FLUENT_QUEUE, queue_circular=True,
        )

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = structure(record, utc=True)  # a collector's time: UTC, as the original
            self._sender.emit_with_time(
                fields["event"], self._event_time(record.created), fields
            )
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        """Send what is queued, for :data:`FLUENT_CLOSE_TIMEOUT` at most (a FluentD that
        is gone must not hold the agent's exit)."""
        closer = threading.Thread(target=self._sender.close, daemon=True)
        closer.start()
        closer.join(FLUENT_CLOSE_TIMEOUT)
        super().close()


class PrivateFileHandler(logging.FileHandler):
    """Appends records to a file, made ``0600`` if new (the agent's log names its
    processes, its requests and their addresses: its user's only, like ``agent-log/``).

    Raises:
        OSError: the file cannot be opened.
    """

    def __init__(self, path: str) -> None:
        super().__init__(path, mode="a", encoding="utf-8", errors="backslashreplace")

    def _open(self) -> Any:
        return open(
            self.baseFilename, self.mode, encoding=self.encoding, errors=self.errors,
            opener=lambda path, flags: os.open(path, flags | os.O_CLOEXEC, 0o600),
        )


def _stream_handler(
    stream: TextIO, *, below: int | None = None, at_least: int = 0
) -> logging.Handler:
    handler = logging.StreamHandler(stream)
    handler.setLevel(at_least)
    if below is not None:
        handler.addFilter(lambda record: record.levelno < below)
    return handler


def open_handlers(
    log_format: str, endpoint: Endpoint | None, *, utc: bool = False
) -> list[logging.Handler]:
    """The handlers that write the agent's records, each redacting keys.

    Raises:
        OSError: the file of a ``file://`` endpoint cannot be opened.
    """
    handlers: list[logging.Handler]
    if endpoint is None and log_format == "text":
        handlers = [_stream_handler(sys.stderr)]
    elif endpoint is None:
        handlers = [
            _stream_handler(sys.stdout, below=logging.WARNING),
            _stream_handler(sys.stderr, at_least=logging.WARNING),
        ]
    elif endpoint.scheme == "fluent":
        handlers = [FluentHandler(endpoint)]
    elif endpoint.path in (STDOUT, STDERR):
        handlers = [_stream_handler(sys.stdout if endpoint.path == STDOUT else sys.stderr)]
    else:
        handlers = [PrivateFileHandler(endpoint.path)]
    for handler in handlers:
        handler.setFormatter(formatter(log_format, utc=utc))
        handler.addFilter(RedactKeys())  # the message and the traceback, redacted
    return handlers
