"""Where the ``smartmob`` command writes: the one place of the client that prints.

A :class:`Terminal` writes results to standard output and one-line errors to standard
error, in colour only on a terminal without ``NO_COLOR``; with ``--json`` it writes one
JSON document per command (or one per line for the streams).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any, TextIO

from smartmob_agent.client.errors import (
    AuthError,
    ClientError,
    NotFoundError,
    Unreachable,
)
from smartmob_agent.client.render import table

#: The exit statuses of the ``smartmob`` command.
OK, FAILED, USAGE, UNREACHABLE, AUTH, NOT_FOUND = 0, 1, 2, 3, 4, 5
#: When agents fail in several ways, the status says the first of these that happened.
PRECEDENCE = (UNREACHABLE, AUTH, NOT_FOUND, FAILED)


def exit_status(error: ClientError) -> int:
    """The exit status an error gives: 3 unreachable, 4 auth, 5 not found, else 1."""
    if isinstance(error, Unreachable):
        return UNREACHABLE
    if isinstance(error, AuthError):
        return AUTH
    if isinstance(error, NotFoundError):
        return NOT_FOUND
    return FAILED


def worst(statuses: Iterable[int]) -> int:
    """One exit status for several: the first of :data:`PRECEDENCE` among them, else 0.

    >>> worst([0, 5, 3, 1]), worst([0, 0]), worst([1, 5])
    (3, 0, 5)
    """
    found = set(statuses)
    return next((status for status in PRECEDENCE if status in found), OK)


def wants_colour(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """Colour on a terminal, unless ``NO_COLOR`` is set (https://no-color.org) or the
    terminal is ``dumb``."""
    if environ.get("NO_COLOR") or environ.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class Terminal:
    """The command's output.

    Args:
        json_output: ``--json``: documents instead of text.
    """

    def __init__(self, *, json_output: bool = False, out: TextIO | None = None,
                 err: TextIO | None = None, environ: Mapping[str, str] | None = None) -> None:
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.json = json_output
        environ = os.environ if environ is None else environ
        self.colour = not json_output and wants_colour(self.out, environ)
        self.err_colour = wants_colour(self.err, environ)
        #: Whether standard error is a terminal (for progress bars).
        self.err_tty = bool(getattr(self.err, "isatty", lambda: False)())

    def line(self, text: str = "") -> None:
        """Write a line of text to standard output."""
        self.out.write(text + "\n")
        self.out.flush()

    def lines(self, texts: Iterable[str]) -> None:
        """Write lines of text to standard output."""
        for text in texts:
            self.line(text)

    def table(self, headers: list[str], rows: list[list[str]], right: Iterable[int] = ()
              ) -> None:
        """Write an aligned table."""
        self.lines(table(headers, rows, right))

    def document(self, value: Any) -> None:
        """Write a JSON document (one line)."""
        self.out.write(json.dumps(value, ensure_ascii=False) + "\n")
        self.out.flush()

    def error(self, message: str) -> None:
        """Write one line to standard error, prefixed with ``smartmob:``."""
        prefix = "\x1b[31msmartmob:\x1b[0m" if self.err_colour else "smartmob:"
        self.err.write(f"{prefix} {message}\n")
        self.err.flush()

    def note(self, message: str) -> None:
        """Write a line of progress or context to standard error (never with --json on
        standard output, so machines read a clean document)."""
        self.err.write(message + "\n")
        self.err.flush()

    def status(self, message: str) -> None:
        """Rewrite the current line of standard error (a progress bar), on a terminal."""
        if self.err_tty:
            self.err.write("\r" + message)
            self.err.flush()

    def end_status(self) -> None:
        """End a line written by :meth:`status`."""
        if self.err_tty:
            self.err.write("\n")
            self.err.flush()
