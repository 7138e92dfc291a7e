"""Reading a Procfile: pure parsing on top of the ``procfile`` package.

The package implements the smartmob Procfile RFC but has no notion of comments (a
``# note: x`` line would even become a process type named ``# note``), of Windows line
ends or of a UTF-8 byte order mark. This module cleans those up first, keeping line
numbers intact so the package's errors still point at the right line, and checks what
the package leaves loose (process type names, ``env`` assignments).

The package's line regex backtracks super-linearly on hostile ``env`` lines (and ``re``
holds the GIL while it does, stalling every thread), so no line reaches it unless it is
short enough and shaped so that the backtracking stays small: see ``_env_work``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import procfile as _rfc

from smartmob_agent.errors import ProcfileError, UnknownProcessType
from smartmob_agent.sources.decode import decode_text

#: Names a process type may have (Heroku's rule, which the API's ``process_type`` follows).
PROCESS_TYPE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BLANKS = re.compile(r"\s+")

#: Largest Procfile read; a real one is a few hundred bytes.
MAX_PROCFILE_BYTES = 64 * 1024
#: Longest logical line (continuations joined) handed to the package, in characters.
MAX_LINE_CHARS = 2048
#: Most process types (non-blank logical lines) a Procfile may have.
MAX_PROCESS_TYPES = 1000
#: Backtracking steps (see :func:`_env_work`) allowed per character of an ``env`` line,
#: counting 16 more per line: about 2 ms for a line at the length limit, and under 0.1 s
#: for a whole Procfile at the size limit.
_ENV_WORK_PER_CHAR = 32


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


def _split_type(line: str) -> tuple[str, str] | None:
    """Split a line as the package's regex does: (process type, text after ``:`` and blanks).

    The regex takes the shortest non-empty process type before a ``:``; on a stripped line
    that is the text before the first ``:`` past the first character.
    """
    stripped = line.strip()
    colon = stripped.find(":", 1)
    if colon == -1:
        return None
    return stripped[:colon], stripped[colon + 1 :].lstrip()


def _env_work(line: str) -> int:
    """Bound the steps the package's line regex backtracks through on ``line``; linear time.

    Only a line whose command starts with ``env`` and a blank enters the regex's
    ``(?:\\s+.+?=.+?)+`` group, and its search for one more assignment ends in a single
    failed attempt. That attempt retries each shorter prefix of the blank run it starts on,
    and for each of those scans to every later ``=`` and from each ``=`` to the end of the
    line, looking for a blank. No blank follows those ``=`` (or the attempt would succeed),
    so all but two of them lie in the last word: the work is at most (longest blank run) x
    (line length + the scans from the ``=``), in steps of some 15 to 45 ns.
    """
    split = _split_type(line)
    if split is None:
        return 0
    rest = split[1]
    if not (rest.startswith("env") and rest[3:4].isspace()):
        return 0
    longest_blanks = max(len(blanks) for blanks in _BLANKS.findall(rest))
    last_word = rest.rsplit(None, 1)[-1]
    scans = 2 * (len(last_word) + 2)  # the two "=" that may come just before the last word
    equals = last_word.find("=")
    while equals != -1:
        scans += len(last_word) - equals
        equals = last_word.find("=", equals + 1)
    return longest_blanks * (len(rest) + scans)


def _check_limits(lines: list[tuple[int, str]]) -> None:
    """Fail if there are too many process types or a line is too long; no regex runs here."""
    if len(lines) > MAX_PROCESS_TYPES:
        raise ProcfileError(
            f"the Procfile is invalid: it has more than {MAX_PROCESS_TYPES} process types"
        )
    long_lines = [str(number) for number, line in lines if len(line) > MAX_LINE_CHARS]
    if len(long_lines) == 1:
        raise ProcfileError(
            f"the Procfile is invalid: line {long_lines[0]} is longer than "
            f"{MAX_LINE_CHARS} characters"
        )
    if long_lines:
        raise ProcfileError(
            f"the Procfile is invalid: lines {', '.join(long_lines)} are longer than "
            f"{MAX_LINE_CHARS} characters"
        )


def _parse_lines(lines: list[tuple[int, str]]) -> list[tuple[int, str, Any]]:
    """Parse each non-blank logical line once; return (line number, process type, item).

    The package stops at the first line it cannot parse and does not say which line that
    is, so each logical line is handed over on its own and every bad line is reported.
    Duplicates (process types across lines, variables within one) are reported next, with
    the package's wording.
    """
    parsed: list[tuple[int, str, Any]] = []
    problems: list[str] = []
    duplicate_variables: list[str] = []
    named: list[tuple[int, str]] = []
    for number, line in lines:
        if _env_work(line) > _ENV_WORK_PER_CHAR * (len(line) + 16):
            problems.append(
                f'Line {number}: the "env" assignments have too many blanks or "=" to be '
                "parsed safely."
            )
            continue
        try:
            # the package would drop a trailing "\" (left by a "\\" before a line end) and
            # join on: one more "\" and an empty line make it keep the line as it is
            ((name, item),) = _rfc.loads(
                line + "\\\n" if line.rstrip().endswith("\\") else line
            ).items()
        except ValueError as error:
            split = _split_type(line)
            if error.args and isinstance(error.args[0], list) and split is not None:
                # a duplicate variable (so the line matched), worded for a one-line file
                duplicate_variables.extend(
                    str(message).replace("Line 1:", f"Line {number}:", 1)
                    for message in error.args[0]
                )
                named.append((number, split[0]))
                continue
            problems.append(
                f'Line {number}: "{line.strip()[:80]}" is not a "<process type>: <command>" line.'
            )
            continue
        parsed.append((number, name, item))
        named.append((number, name))
    if problems:
        raise ProcfileError("the Procfile is invalid: " + " ".join(problems))
    first_line: dict[str, int] = {}
    for number, name in named:
        if name in first_line:
            problems.append(
                f'Line {number}: duplicate process type "{name}": already appears on '
                f"line {first_line[name]}."
            )
        else:
            first_line[name] = number
    problems.extend(duplicate_variables)
    if problems:
        raise ProcfileError("the Procfile is invalid: " + " ".join(problems))
    return parsed


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
        ProcfileError: with every problem found, each naming its line; or, before any
            line is parsed, if the text is over :data:`MAX_PROCFILE_BYTES`, has more
            than :data:`MAX_PROCESS_TYPES` lines or a line over :data:`MAX_LINE_CHARS`.
    """
    if len(text) > MAX_PROCFILE_BYTES:  # each character is at least one byte
        raise ProcfileError(f"the Procfile is larger than {MAX_PROCFILE_BYTES} bytes")
    lines = [(number, line) for number, line in _logical_lines(_strip_comments(text))
             if line.strip()]
    _check_limits(lines)
    entries: dict[str, ProcfileEntry] = {}
    problems = []
    for number, name, item in _parse_lines(lines):
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
    return decode_text(data, "the Procfile", MAX_PROCFILE_BYTES, ProcfileError)


def select(entries: Mapping[str, ProcfileEntry], process_type: str) -> ProcfileEntry:
    """Return the entry for ``process_type``, or fail naming the types that do exist.

    Raises:
        UnknownProcessType: the Procfile has no such entry.
    """
    try:
        return entries[process_type]
    except KeyError:
        known = ", ".join(f'"{name}"' for name in entries) or "none"
        raise UnknownProcessType(
            f'the Procfile has no process type "{process_type}" (it has: {known})'
        ) from None
