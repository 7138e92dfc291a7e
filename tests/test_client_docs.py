"""The command reference of ``docs/client.rst`` says what ``smartmob --help`` says: the
same commands, the same options and arguments for each, and each --help example."""

from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path

import pytest

from smartmob_agent.client.cli import COMMANDS
from tests.client_apps import SMARTMOB, cli_env

DOC = Path(__file__).resolve().parent.parent / "docs" / "client.rst"
#: The options every command takes (documented once, under ``smartmob``).
COMMON = {"--agent", "--all", "--json", "--config", "--timeout"}


@cache
def documented() -> dict[str, tuple[set[str], str]]:
    """Each ``.. program::`` of the page: its options and arguments, and its text."""
    sections = re.split(r"^\.\. program:: (smartmob(?: \S+)?)\n", DOC.read_text(), flags=re.M)
    programs = {}
    for name, text in zip(sections[1::2], sections[2::2], strict=True):
        text = re.split(r"^\S.*\n[-=~]{3,}\n", text, flags=re.M)[0]  # up to the next title
        names: set[str] = set()
        for option in re.findall(r"^\.\. option:: (.+)$", text, flags=re.M):
            for part in option.split(", "):
                names.add(part.split()[0])
        programs[name] = (names, text)
    return programs


@cache
def helped(command: str | None, tmp: Path) -> tuple[set[str], str]:
    """The options and arguments ``smartmob [COMMAND] --help`` shows, and its text."""
    argv = [*SMARTMOB, *([command] if command else []), "--help"]
    text = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60,
                          env=cli_env(tmp)).stdout
    names: set[str] = set()
    section = ""
    for line in text.splitlines():
        if line and not line.startswith(" "):
            section = line
            continue
        if section == "positional arguments:" and re.match(r"  \S", line):
            names.add(line.split()[0])
        elif re.match(r"  -", line):
            names.update(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", line.split("  ")[1]))
    if command is None:
        names.discard("COMMAND")
    return names, text


def test_every_command_is_documented() -> None:
    """The page documents exactly the commands smartmob has."""
    assert set(documented()) == {"smartmob"} | {f"smartmob {c}" for c in COMMANDS}


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_the_reference_matches_help(command: str | None, tmp_path: Path) -> None:
    """Each command's options and arguments in the page are those of its --help (the
    common ones under smartmob itself), and each example of its --help is in the page."""
    names, text = helped(command, tmp_path)
    doc_names, doc_text = documented()["smartmob" + (f" {command}" if command else "")]
    if command is None:
        assert doc_names == names
    else:
        names -= {"-h", "--help"}
        assert names >= COMMON or command == "completion"
        assert doc_names == names - COMMON
    examples = text.split("\nexample")[1].split(":", 1)[1].strip().splitlines()
    for example in examples:
        assert example.strip() in doc_text, example
