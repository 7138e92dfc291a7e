"""Reading a ``.env`` file: pure parsing of ``KEY=value`` lines, as foreman and honcho do.

The format has no specification; this module takes the rules most tools share (foreman,
honcho, python-dotenv, docker compose) and makes the loose ones strict, so that a typo is
reported with its line instead of silently changing a variable:

- ``KEY=value``, with an optional leading ``export``; blanks around the key and the
  ``=`` are ignored. Blank lines and lines whose first non-blank character is ``#`` are
  skipped. A line without ``=`` or with a key that is not a shell variable name is an error.
- An unquoted value ends at a ``#`` that follows a blank (``A=x # note`` is ``x``, but
  ``A=x#1`` is ``x#1``); blanks around it are dropped.
- A single-quoted value is taken literally. A double-quoted value understands ``\\n``,
  ``\\t``, ``\\"`` and ``\\\\``; any other backslash is kept as it is. Either may span
  lines, up to :data:`MAX_QUOTED_LINES`; after the closing quote only blanks and a
  comment may follow.
- A later assignment of a key wins, as in a shell.

Parsing scans each character a bounded number of times, with no backtracking regex, so a
hostile file at the size limit is parsed or rejected in milliseconds.
"""

from __future__ import annotations

import re

from smartmob_agent.errors import AgentError
from smartmob_agent.sources.decode import decode_text, line_of

#: Largest ``.env`` file read; a real one is a few kilobytes at most.
MAX_DOTENV_BYTES = 64 * 1024
#: Most lines a quoted value may span: room for a certificate chain, while a forgotten
#: closing quote is caught near where it was forgotten instead of swallowing the file.
MAX_QUOTED_LINES = 200
#: Most problems listed in one error; the rest are counted.
MAX_REPORTED_PROBLEMS = 20

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BLANKS = " \t"
# a "#" after a blank starts a comment in an unquoted value; a fixed two-character
# pattern cannot backtrack, so the search is linear
_COMMENT = re.compile(r"[ \t]#")
_DOUBLE_QUOTED_SPECIAL = re.compile(r'[\\"]')
_ESCAPES = {"n": "\n", "t": "\t", '"': '"', "\\": "\\"}


class DotenvError(AgentError):
    """The ``.env`` file is too large, not UTF-8, or has a line that is not ``KEY=value``."""


def _shown(text: str) -> str:
    """Quote a piece of a line for an error message, cut to a readable length."""
    return f'"{text[:40]}..."' if len(text) > 40 else f'"{text}"'


def _unquote(
    quote: str, first: str, lines: list[str], index: int
) -> tuple[str, str, int] | None:
    """Read a quoted value whose text starts with ``first`` (just after the opening quote).

    Args:
        quote: ``'`` or ``"``.
        first: the rest of the line the value starts on.
        lines: every line of the file.
        index: the index in ``lines`` of the line after the one ``first`` comes from.

    Returns:
        (value, text after the closing quote, index of the line after the closing one), or
        None if the quote is not closed within :data:`MAX_QUOTED_LINES` lines.
    """
    parts: list[str] = []
    chunk = first
    for spanned in range(1, MAX_QUOTED_LINES + 1):
        if spanned > 1:
            if index >= len(lines):
                return None
            parts.append("\n")
            chunk = lines[index]
            index += 1
        position = 0
        while True:
            if quote == "'":
                end = chunk.find("'", position)
                special = None if end == -1 else end
            else:
                found = _DOUBLE_QUOTED_SPECIAL.search(chunk, position)
                special = None if found is None else found.start()
            if special is None:
                parts.append(chunk[position:])
                break
            parts.append(chunk[position:special])
            if chunk[special] == quote:
                return "".join(parts), chunk[special + 1 :], index
            # a backslash in a double-quoted value
            escaped = _ESCAPES.get(chunk[special + 1 : special + 2])
            if escaped is None:
                parts.append("\\")  # kept as it is, like the character after it
                position = special + 1
            else:
                parts.append(escaped)
                position = special + 2
    return None


def _error(problems: list[str]) -> DotenvError:
    """One error listing the first problems and counting the others."""
    shown = problems[:MAX_REPORTED_PROBLEMS]
    more = len(problems) - len(shown)
    tail = f" (and {more} more problems)" if more else ""
    return DotenvError("the .env file is invalid: " + " ".join(shown) + tail)


def parse_dotenv(text: str) -> dict[str, str]:
    """Parse the text of a ``.env`` file (the rules are in this module's docstring).

    A leading byte order mark is ignored, and ``\\r\\n`` or ``\\r`` line ends count as
    ``\\n`` (a quoted value spanning lines holds ``\\n`` between them).

    Args:
        text: the whole file, already decoded.

    Returns:
        The variables, each in the position of its first assignment and with the value of
        its last one.

    Raises:
        DotenvError: with every problem found (up to :data:`MAX_REPORTED_PROBLEMS`), each
            naming its line; or, before any line is parsed, if the text is over
            :data:`MAX_DOTENV_BYTES` or holds a NUL character.
    """
    lines = _lines(text)
    variables: dict[str, str] = {}
    problems: list[str] = []
    index = 0
    while index < len(lines):
        index = _parse_line(lines, index, variables, problems)
    if problems:
        raise _error(problems)
    return variables


def _lines(text: str) -> list[str]:
    """The lines of ``text``, byte order mark dropped and line ends made ``\\n``, once it
    is known to be within the size limit and free of NUL."""
    if len(text) > MAX_DOTENV_BYTES:  # each character is at least one byte
        raise DotenvError(f"the .env file is larger than {MAX_DOTENV_BYTES} bytes")
    text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    if "\x00" in text:
        # no environment variable can hold one: spawning would fail with a bare ValueError
        nul_line = line_of(text, text.index("\x00"))
        raise DotenvError(f"the .env file contains a NUL character (line {nul_line})")
    return text.split("\n")


def _parse_line(
    lines: list[str], index: int, variables: dict[str, str], problems: list[str]
) -> int:
    """Read the line ``lines[index]`` (and those a quoted value spans): set its variable
    in ``variables`` or add what is wrong to ``problems``; return the index of the next
    line to read.

    Raises:
        DotenvError: a quoted value without its closing quote (no later line can be read
            reliably then), with the problems found so far.
    """
    number = index + 1
    line = lines[index].lstrip(_BLANKS)
    index += 1
    if not line or line.startswith("#"):
        return index
    if line.startswith("export") and line[6:7] in (" ", "\t"):
        unexported = line[6:].lstrip(_BLANKS)
        if not unexported.startswith("="):  # else "export" is the variable's name
            line = unexported
    key, equals, raw = line.partition("=")
    if not equals:
        problems.append(f'Line {number}: there is no "=" (expected KEY=value).')
        return index
    key = key.rstrip(_BLANKS)
    if not _NAME.fullmatch(key):
        # the value is still read below, so that a quoted one spanning lines is skipped
        problems.append(
            f"Line {number}: {_shown(key)} is not a valid variable name (letters, "
            'digits and "_", not starting with a digit).'
        )
    value = raw.lstrip(_BLANKS)
    if value[:1] not in ("'", '"'):
        comment = _COMMENT.search(raw)
        variables[key] = (raw if comment is None else raw[: comment.start()]).strip(_BLANKS)
        return index
    kind = "single" if value[0] == "'" else "double"
    unquoted = _unquote(value[0], value[1:], lines, index)
    if unquoted is None:
        # where the value ends is unknown, so no later line can be read reliably
        problems.append(
            f"Line {number}: the {kind}-quoted value of {_shown(key)} has no closing "
            f"quote (a quoted value may span at most {MAX_QUOTED_LINES} lines)."
        )
        raise _error(problems)
    value, after, index = unquoted
    if after.strip(_BLANKS) and not after.lstrip(_BLANKS).startswith("#"):
        problems.append(
            f"Line {index}: unexpected text after the closing quote of "
            f"{_shown(key)} (only a # comment may follow)."
        )
        return index
    variables[key] = value
    return index


def decode_dotenv(data: bytes) -> str:
    """Decode ``.env`` bytes as UTF-8, dropping a byte order mark, with a clear error.

    Line ends are left as they are: :func:`parse_dotenv` reads ``\\r\\n`` too.

    Args:
        data: the file's content.

    Returns:
        The text, without a leading byte order mark.

    Raises:
        DotenvError: if the data is over :data:`MAX_DOTENV_BYTES`, not UTF-8 or holds a
            NUL character; the error names the line.
    """
    text = decode_text(data, "the .env file", MAX_DOTENV_BYTES, DotenvError)
    return text.removeprefix("\ufeff")
