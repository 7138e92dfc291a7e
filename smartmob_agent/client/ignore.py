"""Which files of a folder to leave out of its archive: ``.gitignore`` rules.

Pure: the rules are parsed from text and matched against relative paths; reading the
files and walking the folder is :mod:`smartmob_agent.client.pack`'s job. The syntax and
precedence are git's (``gitignore(5)``): blank lines and ``#`` comments ignored; ``!``
re-includes; a pattern with a ``/`` at its start or middle is relative to its file's
folder, one without matches at any depth; a trailing ``/`` matches folders only; ``*``,
``?`` and ``[...]`` do not match ``/``; ``**/``, ``/**`` and ``/**/`` match any number of
folders; the last rule that matches wins, and the rules of a deeper file come after
those of the folders above it. As in git, a file inside an excluded folder cannot be
re-included (the folder is not even read).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    """One pattern of an ignore file."""

    #: The pattern as written (after unescaping the trailing space and ``!``).
    pattern: str
    #: Matches the path relative to :attr:`base`.
    regex: re.Pattern[str]
    #: The pattern re-includes (``!``).
    negate: bool
    #: The pattern ends with ``/``: it matches folders only.
    folders_only: bool
    #: The folder of the ignore file, relative to the root (``""`` for the root), with
    #: ``/`` separators.
    base: str


def parse(text: str, base: str = "") -> list[Rule]:
    """The rules of an ignore file's ``text``, found in folder ``base`` of the root.

    >>> from smartmob_agent.client.ignore import parse
    >>> [rule.pattern for rule in parse("# build output\\n/build/\\n!keep.log\\n\\n*.log\\n")]
    ['/build/', 'keep.log', '*.log']
    """
    rules = []
    for raw in text.splitlines():
        line = _strip_trailing_spaces(raw)
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        if negate or line.startswith("\\!") or line.startswith("\\#"):
            line = line[1:]
        folders_only = line.endswith("/")
        body = line.rstrip("/")
        if not body:
            continue
        rules.append(Rule(line, re.compile(translate(body)), negate, folders_only, base))
    return rules


def _strip_trailing_spaces(line: str) -> str:
    """Drop trailing spaces, except one escaped with a backslash."""
    stripped = line.rstrip(" ")
    if stripped.endswith("\\") and len(stripped) < len(line):
        return stripped[:-1] + " "
    return stripped


def translate(pattern: str) -> str:
    """The regular expression (for ``fullmatch``) of a pattern without its trailing ``/``.

    >>> from smartmob_agent.client.ignore import translate
    >>> translate("*.log")
    '(?:.*/)?[^/]*\\\\.log'
    >>> translate("/build")
    'build'
    >>> translate("docs/**/*.md")
    'docs/(?:.*/)?[^/]*\\\\.md'
    """
    anchored = "/" in pattern
    segments = pattern.lstrip("/").split("/")
    parts: list[str] = []
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == "**":
            parts.append(".*" if last else "(?:.*/)?")
            continue
        parts.append(_segment(segment) + ("" if last else "/"))
    regex = "".join(parts)
    if parts and segments[-1] == "**":  # "dir/**": everything inside, not dir itself
        regex = regex[:-2] + ".+"
    return regex if anchored else "(?:.*/)?" + regex


def _segment(segment: str) -> str:
    """One path segment of a pattern as a regular expression."""
    out: list[str] = []
    index = 0
    while index < len(segment):
        char = segment[index]
        if char == "\\" and index + 1 < len(segment):
            out.append(re.escape(segment[index + 1]))
            index += 2
            continue
        if char == "*":
            while index + 1 < len(segment) and segment[index + 1] == "*":
                index += 1  # "**" inside a segment is a plain "*"
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            end = _class_end(segment, index)
            if end < 0:
                out.append(re.escape(char))
            else:
                out.append(_character_class(segment[index + 1:end]))
                index = end
        else:
            out.append(re.escape(char))
        index += 1
    return "".join(out)


def _class_end(segment: str, start: int) -> int:
    """Index of the ``]`` closing the class opened at ``start``, or -1."""
    index = start + 1
    if index < len(segment) and segment[index] in "!^":
        index += 1
    if index < len(segment) and segment[index] == "]":
        index += 1
    while index < len(segment):
        if segment[index] == "]":
            return index
        index += 1
    return -1


def _character_class(inside: str) -> str:
    negate = inside[:1] in ("!", "^")
    if negate:
        inside = inside[1:]
    body = inside.replace("\\", "\\\\").replace("[", "\\[")
    # a negated class never matches "/" either: "*", "?" and classes stay in one segment
    return f"[^/{body}]" if negate else f"[{body}]"


def ignored(rules: Iterable[Rule], path: str, is_folder: bool) -> bool:
    """Whether ``path`` (relative to the root, ``/`` separators) is left out.

    ``rules`` are in precedence order: those of the root's files first, then those of
    deeper folders; the last rule that matches decides.

    >>> from smartmob_agent.client.ignore import ignored, parse
    >>> rules = parse("*.log\\n!keep.log\\nbuild/\\n")
    >>> ignored(rules, "a/debug.log", False), ignored(rules, "a/keep.log", False)
    (True, False)
    >>> ignored(rules, "build", True), ignored(rules, "build", False)
    (True, False)
    """
    result = False
    for rule in rules:
        if rule.folders_only and not is_folder:
            continue
        if rule.base:
            if not path.startswith(rule.base + "/"):
                continue
            relative = path[len(rule.base) + 1:]
        else:
            relative = path
        if rule.regex.fullmatch(relative):
            result = not rule.negate
    return result
