"""Procfile parsing: comments, line ends, env assignments, and errors naming lines."""

from __future__ import annotations

import contextlib
import time

import procfile
import pytest

from smartmob_agent.errors import ProcfileError
from smartmob_agent.sources.procfile import (
    MAX_LINE_CHARS,
    MAX_PROCESS_TYPES,
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
        pytest.param("web: a\\\\\n", {"web": ("a\\", {})}, id="escaped-backslash-at-end"),
        pytest.param("web: a\\\\", {"web": ("a\\", {})},
                     id="escaped-backslash-at-end-no-newline"),
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
        entry.env["A"] = "2"  # type: ignore[index]  # read-only: the write is the test


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
        pytest.param("web: a\n\nworker: env A=1 A=2 x\n",
                     ["Line 3", 'duplicate variable "A"', 'process type "worker"'],
                     id="duplicate-variable-names-its-line"),
        pytest.param("web: env A=1 A=2 x\nweb: y\n",
                     ['Line 2: duplicate process type "web"', 'Line 1: duplicate variable "A"'],
                     id="duplicate-type-and-variable"),
        pytest.param("web: env" + " " * 64 + "x" + "=" * 1000 + "\n",
                     ["Line 1", 'too many blanks or "="'], id="env-line-too-complex"),
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


def test_each_line_is_handed_to_the_package_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each non-blank logical line goes to the procfile package exactly once."""
    seen: list[str] = []
    loads = procfile.loads

    def spy(content: str) -> object:
        seen.append(content)
        return loads(content)

    monkeypatch.setattr(procfile, "loads", spy)
    parse_procfile("web: a\n\n# c: d\nworker: env A=1 b \\\n  c\n")
    assert seen == ["web: a", "worker: env A=1 b c"]


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


def at_limit(head: str, unit: str, tail: str = "") -> str:
    """A line of exactly MAX_LINE_CHARS characters: head, unit repeated, then tail."""
    return (head + unit * MAX_LINE_CHARS)[: MAX_LINE_CHARS - len(tail)] + tail


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(at_limit("web: ", "x") + "\n", id="one-line"),
        pytest.param(at_limit("web: env A=1 ", "x") + "\n", id="env-line"),
        pytest.param("web: " + "x \\\n" * 600 + "y\n" + at_limit("worker: ", "z") + "\n",
                     id="continued-lines-joined-under-the-limit"),
        pytest.param("# " + "x" * 5 * MAX_LINE_CHARS + "\nweb: a\n", id="long-comment"),
        pytest.param("web: env A=1 curl http://host/?"
                     + "&".join(f"p{i}={i}" for i in range(40)) + "\n",
                     id="url-with-many-equals-after-env"),
        pytest.param("web: env " + " ".join(f"V{i}=x" for i in range(300)) + " run\n",
                     id="many-env-assignments"),
    ],
)
def test_lines_within_the_limits_parse(text: str) -> None:
    """Lines up to MAX_LINE_CHARS long, long comments and busy env lines still parse."""
    assert parse_procfile(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("web: a\n# c\nworker: " + "x" * MAX_LINE_CHARS + "\n",
                     f"line 3 is longer than {MAX_LINE_CHARS} characters", id="one-line"),
        pytest.param("web: a \\\n" + "  b \\\n" * MAX_LINE_CHARS + "  c\n",
                     f"line 1 is longer than {MAX_LINE_CHARS} characters",
                     id="continued-line-named-by-its-first-line"),
        pytest.param("a: " + "x" * MAX_LINE_CHARS + "\nb: y\nc: " + "z" * MAX_LINE_CHARS,
                     f"lines 1, 3 are longer than {MAX_LINE_CHARS} characters",
                     id="several-lines"),
        pytest.param("".join(f"p{i}: run\n" for i in range(MAX_PROCESS_TYPES + 1)),
                     f"more than {MAX_PROCESS_TYPES} process types", id="too-many-types"),
        pytest.param("#" * (MAX_PROCFILE_BYTES + 1), f"larger than {MAX_PROCFILE_BYTES} bytes",
                     id="too-large"),
    ],
)
def test_procfiles_over_a_limit_are_rejected(text: str, message: str) -> None:
    """A Procfile over a size, line length or process type limit raises ProcfileError."""
    with pytest.raises(ProcfileError, match=message):
        parse_procfile(text)


def test_most_process_types_parse() -> None:
    """A Procfile with exactly MAX_PROCESS_TYPES process types parses."""
    text = "".join(f"p{i}: run\n" for i in range(MAX_PROCESS_TYPES))
    assert len(parse_procfile(text)) == MAX_PROCESS_TYPES


def hardest(head: str, length: int, equals_first: bool) -> str:
    """A line of length characters: head, then "=" and "a", with as many "=" as still parse.

    "=" at the end of a line make the procfile package backtrack after ``env``, so past a
    number of them the line is rejected before it reaches the package.
    """
    def line(count: int) -> str:
        equals, filler = "=" * count, "a" * (length - len(head) - count)
        return head + (equals + filler if equals_first else filler + equals)

    low, high = 0, length - len(head)
    while low < high:
        middle = (low + high + 1) // 2
        try:
            parse_procfile(line(middle))
        except ProcfileError as error:
            if "too many blanks" in str(error):
                high = middle - 1
                continue
        low = middle
    return line(low)


#: Seconds any Procfile within the limits may take to parse (hostile ones used to take minutes).
#: CPU seconds: backtracking costs many seconds, while a slow or loaded machine stays
#: well under one (0.06 s here, when idle)
FAST = 1.0


def assert_fast(text: str) -> None:
    """Parse text (succeeding or raising ProcfileError) and fail if that is not FAST.

    CPU time of this thread, not wall time: other processes on a loaded machine must not
    make it fail, while backtracking costs seconds of CPU whatever the load.
    """
    start = time.thread_time()
    with contextlib.suppress(ProcfileError):
        parse_procfile(text)
    assert time.thread_time() - start < FAST


@pytest.mark.parametrize(
    "line",
    [
        pytest.param(at_limit("web: env ", "a="), id="env-equals"),
        pytest.param(at_limit("web: env ", "a=a ", "cmd"), id="env-assignments"),
        pytest.param(at_limit("web: env ", "=a "), id="env-values-only"),
        pytest.param(at_limit("web: env ", " ="), id="env-names-only"),
        pytest.param(at_limit("web: env ", "="), id="env-only-equals"),
        pytest.param(at_limit("web: env" + " " * 682 + "x", "="), id="blanks-then-equals"),
        pytest.param(at_limit("web: env" + " " * 1000, "a="), id="more-blanks-then-equals"),
        pytest.param(at_limit("web: env" + "\t" * 682, "=x"), id="tabs-then-equals"),
        pytest.param(at_limit("web: env A=1" + " " * 682 + "x", "="),
                     id="assignment-blanks-then-equals"),
        pytest.param(at_limit("web: env " + "a" * 1024, "=", " x=y"), id="equals-then-one-blank"),
        pytest.param(at_limit("web: env", " ", "a=b"), id="blanks-then-assignment"),
        *(pytest.param(at_limit("web: env y", "a", "=" * count), id=f"last-word-{count}-equals")
          for count in (16, 32, 48, 64, 128, 512)),
        pytest.param(hardest("web: env y", MAX_LINE_CHARS, True), id="hardest-equals-first"),
        pytest.param(hardest("web: env y", MAX_LINE_CHARS, False), id="hardest-equals-last"),
        pytest.param(hardest("web: env A=1  y", MAX_LINE_CHARS, True),
                     id="hardest-after-an-assignment"),
        *(pytest.param(at_limit("web: env" + " " * blanks + "y", "a", "=" * 40),
                       id=f"{blanks}-blanks-and-40-equals") for blanks in (2, 4, 8, 16)),
        pytest.param(at_limit("web: ", "env "), id="env-words"),
        pytest.param(at_limit("web:", " ", "x"), id="blanks-after-colon"),
        pytest.param(at_limit("", ":"), id="colons"),
        pytest.param(at_limit("", "a:"), id="words-and-colons"),
        pytest.param(at_limit("", " :"), id="blanks-and-colons"),
        pytest.param(at_limit("", ":="), id="colons-and-equals"),
        pytest.param(at_limit("", "="), id="equals"),
        pytest.param(at_limit("", "a", ":"), id="colon-at-the-end"),
    ],
)
def test_hostile_lines_at_the_length_limit_parse_fast(line: str) -> None:
    """A hostile line of MAX_LINE_CHARS characters is parsed or rejected quickly."""
    assert len(line) == MAX_LINE_CHARS
    assert_fast(line + "\n")


def fill(line: str) -> str:
    """As many copies of a line starting with "0000" as fit in MAX_PROCFILE_BYTES, numbered."""
    count = min(MAX_PROCESS_TYPES, MAX_PROCFILE_BYTES // (len(line) + 1))
    return "".join(f"{number:04}{line[4:]}\n" for number in range(count))


@pytest.mark.parametrize(
    "text",
    [
        *(pytest.param(fill(hardest("0000: env" + " " * blanks + "y", length, first)),
                       id=f"{length}-chars-{blanks}-blanks-equals-{'first' if first else 'last'}")
          for length, blanks, first in [(64, 1, False), (64, 4, True), (128, 1, True),
                                        (256, 1, True), (256, 2, False), (512, 1, True),
                                        (MAX_LINE_CHARS, 1, True), (MAX_LINE_CHARS, 1, False),
                                        (MAX_LINE_CHARS, 2, True)]),
        pytest.param(fill(at_limit("0000: env ", "=a ")), id="assignment-lines"),
        pytest.param(fill(at_limit("0000: env ", "a=a ", "cmd")), id="duplicate-variable-lines"),
        pytest.param(fill(at_limit("0000: env ", "a=")), id="equals-lines"),
        pytest.param(fill("0000: env y" + "=" * 80), id="short-equals-lines"),
    ],
)
def test_hostile_procfiles_at_the_size_limit_parse_fast(text: str) -> None:
    """A Procfile of MAX_PROCFILE_BYTES full of hostile lines is parsed or rejected quickly."""
    assert len(text.encode()) <= MAX_PROCFILE_BYTES
    assert_fast(text)


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
