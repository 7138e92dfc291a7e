"""Procfile parsing: comments, line ends, env assignments, and errors naming lines."""

from __future__ import annotations

import pytest

from smartmob_agent.errors import ProcfileError
from smartmob_agent.procfile import (
    MAX_PROCFILE_BYTES,
    ProcfileEntry,
    decode_procfile,
    parse_procfile,
    select,
)


def simple(entries: dict[str, ProcfileEntry]) -> dict[str, tuple[str, dict[str, str]]]:
    """Entries as plain values, easy to compare."""
    return {name: (entry.command, dict(entry.env)) for name, entry in entries.items()}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("web: python app.py\n", {"web": ("python app.py", {})}, id="one-entry"),
        pytest.param("web: a\nworker: b", {"web": ("a", {}), "worker": ("b", {})},
                     id="no-final-newline"),
        pytest.param("web:a\n", {"web": ("a", {})}, id="no-space-after-colon"),
        pytest.param("web:    a   b  \n", {"web": ("a   b", {})}, id="blanks-trimmed"),
        pytest.param("  web: a\n", {"web": ("a", {})}, id="indented"),
        pytest.param("", {}, id="empty-file"),
        pytest.param("\n\n   \n", {}, id="only-blank-lines"),
        pytest.param("# just a comment\n", {}, id="only-a-comment"),
        pytest.param("# note: x\nweb: a\n", {"web": ("a", {})}, id="comment-with-colon"),
        pytest.param("   # indented: comment\nweb: a\n", {"web": ("a", {})},
                     id="indented-comment"),
        pytest.param("web: a\n\n# between\n\nworker: b\n",
                     {"web": ("a", {}), "worker": ("b", {})},
                     id="blank-lines-and-comments-between"),
        pytest.param("web: echo '#not a comment'\n", {"web": ("echo '#not a comment'", {})},
                     id="hash-inside-command-kept"),
        pytest.param("web: a\r\nworker: b\r\n", {"web": ("a", {}), "worker": ("b", {})},
                     id="crlf"),
        pytest.param("web: a\rworker: b\r", {"web": ("a", {}), "worker": ("b", {})},
                     id="old-mac-cr"),
        pytest.param("\ufeffweb: a\n", {"web": ("a", {})}, id="utf8-bom"),
        pytest.param("\ufeff# comment first: x\r\nweb: a\r\n", {"web": ("a", {})},
                     id="bom-then-comment-crlf"),
        pytest.param("web: python -m http.server 8000\n",
                     {"web": ("python -m http.server 8000", {})}, id="colon-free-command"),
        pytest.param("web: gunicorn app:main --bind 0.0.0.0:$PORT\n",
                     {"web": ("gunicorn app:main --bind 0.0.0.0:$PORT", {})},
                     id="colons-inside-command"),
        pytest.param("web: env A=1 B=2 cmd\n", {"web": ("cmd", {"A": "1", "B": "2"})},
                     id="env-assignments"),
        pytest.param("web: env A=1 cmd --flag x=y\n", {"web": ("cmd --flag x=y", {"A": "1"})},
                     id="env-then-argument-with-equals"),
        pytest.param("web: env A=1  B=2 cmd\n", {"web": ("cmd", {"A": "1", "B": "2"})},
                     id="env-two-spaces"),
        pytest.param("web: env URL=a=b cmd\n", {"web": ("cmd", {"URL": "a=b"})},
                     id="env-value-with-equals"),
        pytest.param("web: env _X9=é cmd\n", {"web": ("cmd", {"_X9": "é"})},
                     id="env-unicode-value"),
        pytest.param("web: environment\n", {"web": ("environment", {})}, id="env-prefix-word"),
        pytest.param("w-e_b9: a\n", {"w-e_b9": ("a", {})}, id="name-with-dash-underscore-digit"),
        pytest.param("WEB: a\nweb: b\n", {"WEB": ("a", {}), "web": ("b", {})},
                     id="names-are-case-sensitive"),
        pytest.param("web: a \\\n  b\n", {"web": ("a b", {})}, id="continuation"),
        pytest.param("web: a \\   \n  b\n", {"web": ("a b", {})},
                     id="continuation-with-trailing-blanks"),
        pytest.param("web: a \\\r\n  b\r\n", {"web": ("a b", {})}, id="continuation-crlf"),
        pytest.param(f"{'w' * 64}: a\n", {"w" * 64: ("a", {})}, id="longest-name"),
    ],
)
def test_parses_valid_procfiles(text: str, expected: dict[str, tuple[str, dict[str, str]]]) -> None:
    """A valid Procfile gives one entry per process type with its command and variables."""
    assert simple(parse_procfile(text)) == expected


def test_entries_keep_file_order() -> None:
    """Entries come back in the order of the file."""
    names = [f"p{i}" for i in range(20, 0, -1)]
    text = "".join(f"{name}: run {name}\n" for name in names)
    assert list(parse_procfile(text)) == names


def test_entry_env_is_read_only() -> None:
    """An entry's variables cannot be changed after parsing."""
    entry = parse_procfile("web: env A=1 cmd\n")["web"]
    with pytest.raises(TypeError):
        entry.env["A"] = "2"  # type: ignore[index]


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        pytest.param("web: a\nweb: b\n", ["Line 2", 'duplicate process type "web"', "line 1"],
                     id="duplicate-type"),
        pytest.param("web: a\n# c\n\nweb: b\n", ["Line 4", "line 1"],
                     id="duplicate-type-line-numbers-count-comments"),
        pytest.param("\ufeffweb: a\r\n\r\nweb: b\r\n", ["Line 3", "line 1"],
                     id="duplicate-type-crlf-bom"),
        pytest.param("web: env A=1 A=2 cmd\n", ["Line 1", 'duplicate variable "A"'],
                     id="duplicate-variable"),
        pytest.param("just words\n", ["Line 1", '"just words"'], id="no-colon"),
        pytest.param("web: a\n\nnonsense\n", ["Line 3", '"nonsense"'], id="invalid-line-number"),
        pytest.param("web:\n", ["Line 1", '"web:"'], id="no-command"),
        pytest.param(": cmd\n", ["Line 1"], id="no-name"),
        pytest.param("we b: a\n", ["Line 1", '"we b"', "not a valid process type"],
                     id="space-in-name"),
        pytest.param("web.1: a\n", ['"web.1"', "not a valid process type"], id="dot-in-name"),
        pytest.param("# x\nwéb: a\n", ["Line 2", '"wéb"'], id="non-ascii-name"),
        pytest.param(f"{'w' * 65}: a\n", ["Line 1", "not a valid process type"],
                     id="name-too-long"),
        pytest.param("web: env 1A=2 cmd\n", ["Line 1", '"1A=2"', "invalid variable"],
                     id="env-name-starting-with-digit"),
        pytest.param("web: env A-B=2 cmd\n", ['"A-B=2"'], id="env-name-with-dash"),
        pytest.param("web: a\nworker: env B-C=1 x\n", ["Line 2", 'process type "worker"'],
                     id="env-error-names-its-line"),
    ],
)
def test_invalid_procfiles_name_the_problem(text: str, fragments: list[str]) -> None:
    """An invalid Procfile raises ProcfileError naming the line and what is wrong."""
    with pytest.raises(ProcfileError) as caught:
        parse_procfile(text)
    message = str(caught.value)
    assert message.startswith("the Procfile is invalid: ")
    for fragment in fragments:
        assert fragment in message


def test_every_invalid_line_is_reported_at_once() -> None:
    """Several bad lines are all named in one error, each with its line number."""
    text = "bad one\nweb: ok\nbad two\n# fine\nbad three\n"
    with pytest.raises(ProcfileError) as caught:
        parse_procfile(text)
    message = str(caught.value)
    for number, words in ((1, "bad one"), (3, "bad two"), (5, "bad three")):
        assert f'Line {number}: "{words}"' in message
    assert "Line 2" not in message


def test_every_invalid_name_is_reported_at_once() -> None:
    """Invalid process type names and assignments on different lines are all reported."""
    text = "a b: x\nok: y\nc.d: z\ne: env 9=1 w\n"
    with pytest.raises(ProcfileError) as caught:
        parse_procfile(text)
    message = str(caught.value)
    assert 'Line 1: "a b"' in message
    assert 'Line 3: "c.d"' in message
    assert "Line 4:" in message
    assert '"9=1"' in message


@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        pytest.param(b"web: \xff\n", ["not valid UTF-8", "line 1", "byte 5"], id="invalid-utf8"),
        pytest.param(b"web: a\nworker: \xc3\x28\n", ["not valid UTF-8", "line 2"],
                     id="invalid-utf8-second-line"),
        pytest.param("web: a\n".encode("utf-16"), ["not valid UTF-8"], id="utf16"),
        pytest.param(b"web: a\x00b\n", ["NUL", "line 1"], id="nul"),
        pytest.param(b"web: a\n\nw: \x00\n", ["NUL", "line 3"], id="nul-third-line"),
        pytest.param(b"#" * (MAX_PROCFILE_BYTES + 1), ["larger than", str(MAX_PROCFILE_BYTES)],
                     id="too-large"),
    ],
)
def test_decode_errors_help_a_person(data: bytes, fragments: list[str]) -> None:
    """Bytes that cannot be a Procfile raise ProcfileError saying why and where."""
    with pytest.raises(ProcfileError) as caught:
        decode_procfile(data)
    for fragment in fragments:
        assert fragment in str(caught.value)


@pytest.mark.parametrize(
    ("data", "text"),
    [
        pytest.param(b"web: a\n", "web: a\n", id="ascii"),
        pytest.param("web: echo é €\n".encode(), "web: echo é €\n", id="utf8"),
        pytest.param(b"\xef\xbb\xbfweb: a\n", "\ufeffweb: a\n", id="bom-kept-for-parser"),
        pytest.param(b"#" * MAX_PROCFILE_BYTES, "#" * MAX_PROCFILE_BYTES, id="largest"),
        pytest.param(b"", "", id="empty"),
    ],
)
def test_decode_accepts_utf8(data: bytes, text: str) -> None:
    """UTF-8 bytes up to the size limit decode to their text."""
    assert decode_procfile(data) == text


def test_decoded_bom_file_parses() -> None:
    """A file saved with a BOM by a Windows editor parses like any other."""
    data = "\ufeffweb: run\r\nworker: env A=1 go\r\n".encode()
    assert simple(parse_procfile(decode_procfile(data))) == {
        "web": ("run", {}), "worker": ("go", {"A": "1"}),
    }


def test_select_returns_the_entry() -> None:
    """select() returns the entry of the process type asked for."""
    entries = parse_procfile("web: a\nworker: b\n")
    assert select(entries, "worker") == entries["worker"]


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        pytest.param("web: a\nworker: b\n", ['no process type "clock"', '"web", "worker"'],
                     id="lists-existing"),
        pytest.param("", ['no process type "clock"', "none"], id="empty-procfile"),
    ],
)
def test_select_unknown_type_lists_existing_types(text: str, fragments: list[str]) -> None:
    """Asking for a missing process type raises ProcfileError naming the types that exist."""
    with pytest.raises(ProcfileError) as caught:
        select(parse_procfile(text), "clock")
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_select_is_case_sensitive() -> None:
    """select() does not match a process type written with other letter case."""
    with pytest.raises(ProcfileError, match='"Web"'):
        select(parse_procfile("web: a\n"), "Web")
