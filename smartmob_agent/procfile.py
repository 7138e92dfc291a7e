"""Reading a Procfile: pure parsing on top of the ``procfile`` package.

The package implements the smartmob Procfile RFC but has no notion of comments (a
``# note: x`` line would even become a process type named ``# note``), of Windows line
ends or of a UTF-8 byte order mark. This module cleans those up first, keeping line
numbers intact so the package's errors still point at the right line, and checks what
the package leaves loose (process type names, ``env`` assignments).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import procfile as _rfc

from smartmob_agent.errors import ProcfileError

#: Names a process type may have (Heroku's rule, which the API's ``process_type`` follows).
PROCESS_TYPE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

#: Largest Procfile read; a real one is a few hundred bytes.
MAX_PROCFILE_BYTES = 256 * 1024


@dataclass(frozen=True)
class ProcfileEntry:
    """One line of a Procfile: the shell command and the variables set before it."""

    command: str
    env: Mapping[str, str]


def _strip_comments(text: str) -> str:
    """Blank out comment lines (keeping the line count) and normalise line ends.

    Trailing blanks are dropped too, so that a ``\\`` continuation followed by spaces
    still continues the line (the package would otherwise cut a space, not the ``\\``).
    """
    text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(
        "" if line.lstrip().startswith("#") else line.rstrip() for line in text.split("\n")
    )


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Join ``\\`` continuations as the package does; return (first line number, text)."""
    joined: list[tuple[int, str]] = []
    parts: list[str] = []
    start = 1
    for number, line in enumerate(text.split("\n"), 1):
        if not parts:
            start = number
        if line.endswith("\\"):
            parts.append(line[:-1])
            continue
        joined.append((start, "".join(parts) + line.lstrip() if parts else line))
        parts = []
    if parts:
        joined.append((start, "".join(parts)))
    return joined


def _check_lines(text: str) -> dict[str, int]:
    """Return the line number of each process type; fail naming every line not parsed.

    The package stops at the first line it cannot parse and does not say which line
    that is, so each logical line is tried on its own first.
    """
    first_line: dict[str, int] = {}
    problems = []
    for number, line in _logical_lines(text):
        if not line.strip():
            continue
        try:
            parsed = _rfc.loads(line)
        except ValueError as error:
            if error.args and isinstance(error.args[0], list):
                continue  # a duplicate variable: reported with the whole file below
            problems.append(
                f'Line {number}: "{line.strip()[:80]}" is not a "<process type>: <command>" line.'
            )
            continue
        for name in parsed:
            first_line.setdefault(name, number)
    if problems:
        raise ProcfileError("the Procfile is invalid: " + " ".join(problems))
    return first_line


def _parse_env(name: str, number: int, assignments: list[tuple[str, ...]]) -> dict[str, str]:
    """Read the ``env A=1 B=2`` assignments the package split on single spaces and ``=``."""
    env: dict[str, str] = {}
    problems = []
    # rejoin and split again: runs of blanks are one separator, a value may hold "="
    for word in " ".join("=".join(assignment) for assignment in assignments).split():
        variable, equals, value = word.partition("=")
        if not equals or not _ENV_NAME.fullmatch(variable):
            problems.append(
                f'Line {number}: process type "{name}" has an invalid variable '
                f'assignment "{word}".'
            )
            continue
        env[variable] = value
    if problems:
        raise ProcfileError(" ".join(problems))
    return env


def parse_procfile(text: str) -> dict[str, ProcfileEntry]:
    """Parse the text of a Procfile.

    Lines whose first non-blank character is ``#`` are comments. A ``\\`` at the end
    of a line continues it on the next one.

    Args:
        text: the whole file, already decoded.

    Returns:
        One entry per process type, in file order.

    Raises:
        ProcfileError: with every problem found, each naming its line.
    """
    cleaned = _strip_comments(text)
    first_line = _check_lines(cleaned)
    try:
        parsed = _rfc.loads(cleaned)
    except ValueError as error:
        problems = error.args[0] if error.args and isinstance(error.args[0], list) else [str(error)]
        raise ProcfileError("the Procfile is invalid: " + " ".join(problems)) from None
    entries: dict[str, ProcfileEntry] = {}
    problems = []
    for name, item in parsed.items():
        number = first_line[name]
        if not PROCESS_TYPE.fullmatch(name):
            problems.append(
                f'Line {number}: "{name[:80]}" is not a valid process type (1 to 64 letters, '
                'digits, "_" or "-").'
            )
            continue
        try:
            env = _parse_env(name, number, item["env"])
        except ProcfileError as error:
            problems.append(str(error))
            continue
        entries[name] = ProcfileEntry(command=item["cmd"], env=MappingProxyType(env))
    if problems:
        raise ProcfileError("the Procfile is invalid: " + " ".join(problems))
    return entries


def decode_procfile(data: bytes) -> str:
    """Decode Procfile bytes as UTF-8, with an error a person understands.

    Raises:
        ProcfileError: if the data is too large, not UTF-8 or holds a NUL character.
    """
    if len(data) > MAX_PROCFILE_BYTES:
        raise ProcfileError(f"the Procfile is larger than {MAX_PROCFILE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ProcfileError(
            f"the Procfile is not valid UTF-8 (line {line}, byte {error.start})"
        ) from None
    if "\x00" in text:
        # no shell command can hold one: spawning would fail with a bare ValueError
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise ProcfileError(f"the Procfile contains a NUL character (line {line})")
    return text


def select(entries: Mapping[str, ProcfileEntry], process_type: str) -> ProcfileEntry:
    """Return the entry for ``process_type``, or fail naming the types that do exist."""
    try:
        return entries[process_type]
    except KeyError:
        known = ", ".join(f'"{name}"' for name in entries) or "none"
        raise ProcfileError(
            f'the Procfile has no process type "{process_type}" (it has: {known})'
        ) from None
