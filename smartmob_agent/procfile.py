"""Reading a Procfile: pure parsing on top of the ``procfile`` package.

The package implements the smartmob Procfile RFC but has no notion of comments (a
``# note: x`` line would even become a process type named ``# note``), of Windows line
ends or of a UTF-8 byte order mark. This module cleans those up first, keeping line
numbers intact so the package's errors still point at the right line, and checks what
the package leaves loose (process type names, ``env`` assignments).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

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
    """Blank out comment lines (keeping the line count) and normalise line ends."""
    text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join("" if line.lstrip().startswith("#") else line for line in text.split("\n"))


def parse_procfile(text: str) -> dict[str, ProcfileEntry]:
    """Parse the text of a Procfile.

    Args:
        text: the whole file, already decoded.

    Returns:
        One entry per process type, in file order.

    Raises:
        ProcfileError: with every problem found, each naming its line.
    """
    cleaned = _strip_comments(text)
    try:
        parsed = _rfc.loads(cleaned)
    except ValueError as error:
        problems = error.args[0] if error.args and isinstance(error.args[0], list) else [str(error)]
        raise ProcfileError("the Procfile is invalid: " + " ".join(problems)) from None
    entries: dict[str, ProcfileEntry] = {}
    problems = []
    for name, item in parsed.items():
        if not PROCESS_TYPE.fullmatch(name):
            problems.append(
                f'"{name}" is not a valid process type (letters, digits, "_" and "-" only).'
            )
            continue
        env: dict[str, str] = {}
        for assignment in item["env"]:
            if len(assignment) != 2 or not _ENV_NAME.fullmatch(assignment[0]):
                problems.append(
                    f'process type "{name}" has an invalid variable assignment '
                    f'"{"=".join(assignment)}".'
                )
                continue
            env[assignment[0]] = assignment[1]
        entries[name] = ProcfileEntry(command=item["cmd"], env=MappingProxyType(env))
    if problems:
        raise ProcfileError("the Procfile is invalid: " + " ".join(problems))
    return entries


def decode_procfile(data: bytes) -> str:
    """Decode Procfile bytes as UTF-8, with an error a person understands."""
    if len(data) > MAX_PROCFILE_BYTES:
        raise ProcfileError(f"the Procfile is larger than {MAX_PROCFILE_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ProcfileError(f"the Procfile is not valid UTF-8 (byte {error.start})") from None


def select(entries: Mapping[str, ProcfileEntry], process_type: str) -> ProcfileEntry:
    """Return the entry for ``process_type``, or fail naming the types that do exist."""
    try:
        return entries[process_type]
    except KeyError:
        known = ", ".join(f'"{name}"' for name in entries) or "none"
        raise ProcfileError(
            f'the Procfile has no process type "{process_type}" (it has: {known})'
        ) from None
