""".env parsing: quoting, comments, export, multi-line values, and errors naming lines."""

from __future__ import annotations

import contextlib
import time

import pytest

from smartmob_agent.errors import AgentError
from smartmob_agent.sources.dotenv import (
    MAX_DOTENV_BYTES,
    MAX_QUOTED_LINES,
    MAX_REPORTED_PROBLEMS,
    DotenvError,
    decode_dotenv,
    parse_dotenv,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("A=1\n", {"A": "1"}, id="one-variable"),
        pytest.param("A=1\nB=2", {"A": "1", "B": "2"}, id="no-final-newline"),
        pytest.param("", {}, id="empty-file"),
        pytest.param("\n  \n\t\n", {}, id="only-blank-lines"),
        pytest.param("# a comment\n  # indented = comment\nA=1\n", {"A": "1"}, id="comments"),
        pytest.param("A=\n", {"A": ""}, id="empty-value"),
        pytest.param("A=   \n", {"A": ""}, id="blank-value"),
        pytest.param("  A  =  x y  \n", {"A": "x y"}, id="blanks-around-key-equals-value"),
        pytest.param("\tA\t=\tx\t\n", {"A": "x"}, id="tabs"),
        pytest.param("A=a=b=c\n", {"A": "a=b=c"}, id="equals-in-value"),
        pytest.param("export A=1\n", {"A": "1"}, id="export"),
        pytest.param("export \t A = 1\n", {"A": "1"}, id="export-with-blanks"),
        pytest.param("  export A=1\n", {"A": "1"}, id="indented-export"),
        pytest.param("export=1\n", {"export": "1"}, id="variable-named-export"),
        pytest.param("export = 1\n", {"export": "1"}, id="variable-named-export-blanks"),
        pytest.param("exported=1\n", {"exported": "1"}, id="export-prefix-of-a-name"),
        pytest.param("A=x # note\n", {"A": "x"}, id="unquoted-comment"),
        pytest.param("A=x\t# note\n", {"A": "x"}, id="unquoted-comment-after-tab"),
        pytest.param("A=x#1\n", {"A": "x#1"}, id="hash-without-blank-kept"),
        pytest.param("A=#1\n", {"A": "#1"}, id="value-starting-with-hash"),
        pytest.param("A= # note\n", {"A": ""}, id="only-a-comment-after-equals"),
        pytest.param("A=http://h/#frag # note\n", {"A": "http://h/#frag"},
                     id="url-fragment-then-comment"),
        pytest.param("A=x 'y' \"z\"\n", {"A": "x 'y' \"z\""}, id="quotes-inside-unquoted"),
        pytest.param("A=a\\nb\n", {"A": "a\\nb"}, id="unquoted-backslash-literal"),
        pytest.param("A='x # y'\n", {"A": "x # y"}, id="single-quoted-hash"),
        pytest.param("A='  x  '\n", {"A": "  x  "}, id="single-quoted-blanks-kept"),
        pytest.param("A='a\\nb\\'\n", {"A": "a\\nb\\"}, id="single-quoted-no-escapes"),
        pytest.param("A='say \"hi\"'\n", {"A": 'say "hi"'}, id="single-quoted-double-quotes"),
        pytest.param("A=''\n", {"A": ""}, id="single-quoted-empty"),
        pytest.param("A='x' # note\n", {"A": "x"}, id="single-quoted-then-comment"),
        pytest.param("A='x'   \n", {"A": "x"}, id="single-quoted-then-blanks"),
        pytest.param("A='x'#note\n", {"A": "x"}, id="single-quoted-then-comment-no-blank"),
        pytest.param("A='line 1\nline 2'\nB=2\n", {"A": "line 1\nline 2", "B": "2"},
                     id="single-quoted-multi-line"),
        pytest.param('A="x # y"\n', {"A": "x # y"}, id="double-quoted-hash"),
        pytest.param('A="  x  "\n', {"A": "  x  "}, id="double-quoted-blanks-kept"),
        pytest.param('A="a\\nb"\n', {"A": "a\nb"}, id="escape-newline"),
        pytest.param('A="a\\tb"\n', {"A": "a\tb"}, id="escape-tab"),
        pytest.param('A="say \\"hi\\""\n', {"A": 'say "hi"'}, id="escape-quote"),
        pytest.param('A="a\\\\b"\n', {"A": "a\\b"}, id="escape-backslash"),
        pytest.param('A="a\\\\nb"\n', {"A": "a\\nb"}, id="escaped-backslash-before-n"),
        pytest.param('A="C:\\dir\\x"\n', {"A": "C:\\dir\\x"}, id="unknown-escapes-kept"),
        pytest.param('A="\\$HOME"\n', {"A": "\\$HOME"}, id="no-expansion"),
        pytest.param('A="x\\\\"\n', {"A": "x\\"}, id="escaped-backslash-before-quote"),
        pytest.param('A="it\'s"\n', {"A": "it's"}, id="double-quoted-single-quote"),
        pytest.param('A=""\n', {"A": ""}, id="double-quoted-empty"),
        pytest.param('A="x" # note\n', {"A": "x"}, id="double-quoted-then-comment"),
        pytest.param('A="line 1\nline 2"\nB=2\n', {"A": "line 1\nline 2", "B": "2"},
                     id="double-quoted-multi-line"),
        pytest.param('A="a\n  b\n\n# not a comment\n"\n', {"A": "a\n  b\n\n# not a comment\n"},
                     id="multi-line-keeps-indent-blank-lines-and-hashes"),
        pytest.param('A="end\\\nnext"\n', {"A": "end\\\nnext"},
                     id="backslash-at-line-end-kept"),
        pytest.param('A="x\r\ny"\r\n', {"A": "x\ny"}, id="multi-line-crlf"),
        pytest.param("A = 'x'\n", {"A": "x"}, id="blanks-before-quote"),
        pytest.param("A=1\nA=2\n", {"A": "2"}, id="later-duplicate-wins"),
        pytest.param("A=1\nB=2\nA=3\n", {"A": "3", "B": "2"}, id="duplicate-keeps-first-place"),
        pytest.param("_=1\n_a9=2\nZ_=3\n", {"_": "1", "_a9": "2", "Z_": "3"}, id="name-shapes"),
        pytest.param("a=1\nA=2\n", {"a": "1", "A": "2"}, id="names-are-case-sensitive"),
        pytest.param("A=é €\n", {"A": "é €"}, id="unicode-value"),
        pytest.param("A=1\r\nB=2\r\n", {"A": "1", "B": "2"}, id="crlf"),
        pytest.param("A=1\rB=2\r", {"A": "1", "B": "2"}, id="old-mac-cr"),
        pytest.param("\ufeffA=1\n", {"A": "1"}, id="utf8-bom"),
    ],
)
def test_parses_valid_files(text: str, expected: dict[str, str]) -> None:
    """A valid .env file gives its variables with their values."""
    assert parse_dotenv(text) == expected


def test_variables_keep_file_order() -> None:
    """Variables come back in the order of the file."""
    names = [f"V{i}" for i in range(20, 0, -1)]
    assert list(parse_dotenv("".join(f"{name}=x\n" for name in names))) == names


def test_error_is_an_agent_error() -> None:
    """DotenvError is an AgentError, so the server maps it like the others."""
    assert issubclass(DotenvError, AgentError)


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        pytest.param("JUST_A_NAME\n", ["Line 1", 'no "="'], id="no-equals"),
        pytest.param("A=1\n\nexport B\n", ["Line 3", 'no "="'], id="export-without-value"),
        pytest.param("A=1\n# c\nsome words\n", ["Line 3", 'no "="'], id="words"),
        pytest.param("=1\n", ["Line 1", '""', "not a valid variable name"], id="no-name"),
        pytest.param("1A=x\n", ["Line 1", '"1A"', "not a valid variable name"],
                     id="name-starting-with-digit"),
        pytest.param("A-B=x\n", ['"A-B"'], id="dash-in-name"),
        pytest.param("A B=x\n", ['"A B"'], id="blank-in-name"),
        pytest.param("A.B=x\n", ['"A.B"'], id="dot-in-name"),
        pytest.param("é=x\n", ['"é"'], id="non-ascii-name"),
        pytest.param("export export A=1\n", ['"export A"'], id="export-twice"),
        pytest.param("A='x\n", ["Line 1", 'single-quoted value of "A"', "no closing quote"],
                     id="unclosed-single-quote"),
        pytest.param('A=1\nB="x\nC=2\n', ["Line 2", 'double-quoted value of "B"',
                                         "no closing quote"], id="unclosed-double-quote"),
        pytest.param('A="x\\"\n', ["Line 1", "no closing quote"], id="escaped-closing-quote"),
        pytest.param("A='x'y\n", ["Line 1", 'after the closing quote of "A"'],
                     id="text-after-single-quote"),
        pytest.param('A="x" y\n', ["Line 1", 'after the closing quote of "A"'],
                     id="text-after-double-quote"),
        pytest.param('A="x\ny"z\n', ["Line 2", 'after the closing quote of "A"'],
                     id="text-after-multi-line-quote-names-closing-line"),
        pytest.param('A="1\nB=2\nC="3"\n', ["Line 3", 'after the closing quote of "A"'],
                     id="forgotten-quote-caught-at-next-quote"),
        pytest.param('1X="a\nb"\nC=1\n', ["Line 1", '"1X"'], id="bad-name-multi-line-value"),
    ],
)
def test_invalid_files_name_the_problem(text: str, fragments: list[str]) -> None:
    """An invalid .env file raises DotenvError naming the line and what is wrong."""
    with pytest.raises(DotenvError) as caught:
        parse_dotenv(text)
    message = str(caught.value)
    assert message.startswith("the .env file is invalid: ")
    for fragment in fragments:
        assert fragment in message


def error_of(text: str) -> str:
    """The message of the DotenvError that parsing text raises."""
    with pytest.raises(DotenvError) as caught:
        parse_dotenv(text)
    return str(caught.value)


def test_every_bad_line_is_reported_at_once() -> None:
    """Several bad lines are all named in one error, each with its line number."""
    text = "bad one\nOK=1\n2X=y\n# fine\nA='x'z\n"
    message = error_of(text)
    assert "Line 1:" in message
    assert 'Line 3: "2X"' in message
    assert "Line 5:" in message
    assert "Line 2" not in message
    assert "Line 4" not in message


def test_a_multi_line_value_under_a_bad_name_is_skipped_whole() -> None:
    """The lines of a quoted value are not read as assignments, even under a bad name."""
    message = error_of('1X="a\nb c\n"\n')
    assert "Line 2" not in message
    assert "Line 3" not in message


def test_values_are_not_echoed_in_errors() -> None:
    """A bad line's value (often a secret) does not appear in the error."""
    text = "TOKEN s3cr3t\nKEY='s3cr3t'junk\n9=s3cr3t\n"
    assert "s3cr3t" not in error_of(text)


def test_long_names_are_cut_in_errors() -> None:
    """A huge invalid name is shown cut short, not whole."""
    message = error_of("-" * 5000 + "=1\n")
    assert len(message) < 300


def test_problems_beyond_the_reported_are_counted() -> None:
    """Past MAX_REPORTED_PROBLEMS bad lines, the others are counted, not listed."""
    count = MAX_REPORTED_PROBLEMS + 7
    message = error_of("bad\n" * count)
    assert message.count("Line ") == MAX_REPORTED_PROBLEMS
    assert message.endswith("(and 7 more problems)")


def test_quoted_value_may_span_the_most_lines() -> None:
    """A quoted value spanning exactly MAX_QUOTED_LINES lines parses."""
    body = "\n".join(["x"] * MAX_QUOTED_LINES)
    assert parse_dotenv(f'A="{body}"\nB=1\n') == {"A": body, "B": "1"}


@pytest.mark.parametrize("quote", ["'", '"'])
def test_quoted_value_over_the_line_limit_is_rejected(quote: str) -> None:
    """A quoted value not closed within MAX_QUOTED_LINES lines is an error on its first line."""
    body = "\n".join(["x"] * (MAX_QUOTED_LINES + 1))
    with pytest.raises(DotenvError, match=r"Line 2: .*no closing quote"):
        parse_dotenv(f"A=1\nB={quote}{body}{quote}\n")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("#" * (MAX_DOTENV_BYTES + 1), f"larger than {MAX_DOTENV_BYTES} bytes",
                     id="too-large"),
        pytest.param("A=a\x00b\n", r"NUL character \(line 1\)", id="nul"),
        pytest.param("A=1\r\n\r\nB='\x00'\n", r"NUL character \(line 3\)", id="nul-third-line"),
        pytest.param("# \x00\n", r"NUL character \(line 1\)", id="nul-in-comment"),
    ],
)
def test_files_over_a_limit_or_with_nul_are_rejected(text: str, message: str) -> None:
    """Text over the size limit or holding a NUL character raises DotenvError."""
    with pytest.raises(DotenvError, match=message):
        parse_dotenv(text)


def test_largest_file_parses() -> None:
    """A file of exactly MAX_DOTENV_BYTES parses."""
    line = "A=" + "x" * 1021 + "\n"
    text = line * (MAX_DOTENV_BYTES // len(line))
    text += "#" * (MAX_DOTENV_BYTES - len(text))
    assert len(text) == MAX_DOTENV_BYTES
    assert parse_dotenv(text) == {"A": "x" * 1021}


#: Seconds any text within the size limit may take to parse.
#: CPU seconds (see test_procfile.FAST)
FAST = 1.0
HOSTILE = 60 * 1024


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("=" * HOSTILE, id="equals"),
        pytest.param("A" * HOSTILE, id="one-long-name-no-equals"),
        pytest.param("A" * HOSTILE + "=1", id="one-long-name"),
        pytest.param("A" * HOSTILE + "-=1", id="one-long-bad-name"),
        pytest.param("A=" + " #" * (HOSTILE // 2), id="blank-hashes"),
        pytest.param("A=" + "x" + " " * HOSTILE + "y", id="blanks-inside-value"),
        pytest.param("A=" + " " * HOSTILE, id="blanks-value"),
        pytest.param('A="' + "\\" * HOSTILE, id="backslashes-unclosed"),
        pytest.param('A="' + "\\" * HOSTILE + '"', id="backslashes"),
        pytest.param('A="' + '\\"' * (HOSTILE // 2), id="escaped-quotes"),
        pytest.param('A="' + "\\n" * (HOSTILE // 2) + '"', id="newline-escapes"),
        pytest.param("A='" + "x" * HOSTILE, id="single-unclosed"),
        pytest.param("A=" + "'" * HOSTILE, id="single-quotes"),
        pytest.param("A=" + '"' * HOSTILE, id="double-quotes"),
        pytest.param("export " * (HOSTILE // 7) + "A=1", id="exports"),
        pytest.param("export\t" * (HOSTILE // 7), id="exports-no-equals"),
        pytest.param(" " * HOSTILE + "A=1", id="leading-blanks"),
        pytest.param("A" + " " * HOSTILE + "=1", id="blanks-before-equals"),
        pytest.param("A=1\n" * (HOSTILE // 4), id="many-lines"),
        pytest.param("x\n" * (HOSTILE // 2), id="many-bad-lines"),
        pytest.param('A="\n' * (HOSTILE // 4), id="many-quote-openings"),
        pytest.param('A="x\n' + "\n" * (HOSTILE - 10), id="unclosed-then-blank-lines"),
        pytest.param("A='\n'" * (HOSTILE // 5), id="quote-pairs-across-lines"),
        pytest.param("\r" * HOSTILE, id="carriage-returns"),
        pytest.param("A=" + "é" * (HOSTILE // 2), id="unicode"),
    ],
)
def test_hostile_text_parses_fast(text: str) -> None:
    """Hostile text near the size limit is parsed or rejected quickly."""
    assert len(text) <= MAX_DOTENV_BYTES
    start = time.thread_time()  # CPU time: a loaded machine must not make it fail
    with contextlib.suppress(DotenvError):
        parse_dotenv(text)
    assert time.thread_time() - start < FAST


@pytest.mark.parametrize(
    ("data", "text"),
    [
        pytest.param(b"A=1\n", "A=1\n", id="ascii"),
        pytest.param("A=é €\n".encode(), "A=é €\n", id="utf8"),
        pytest.param(b"\xef\xbb\xbfA=1\n", "A=1\n", id="bom-dropped"),
        pytest.param(b"A=1\r\nB=2\r\n", "A=1\r\nB=2\r\n", id="crlf-kept"),
        pytest.param(b"#" * MAX_DOTENV_BYTES, "#" * MAX_DOTENV_BYTES, id="largest"),
        pytest.param(b"", "", id="empty"),
    ],
)
def test_decode_accepts_utf8(data: bytes, text: str) -> None:
    """UTF-8 bytes up to the size limit decode to their text, without a BOM."""
    assert decode_dotenv(data) == text


@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        pytest.param(b"A=\xff\n", ["not valid UTF-8", "line 1", "byte 2"], id="invalid-utf8"),
        pytest.param(b"A=1\nB=\xc3\x28\n", ["not valid UTF-8", "line 2"],
                     id="invalid-utf8-second-line"),
        pytest.param("A=é\n".encode("latin-1"), ["not valid UTF-8"], id="latin-1"),
        pytest.param("A=1\n".encode("utf-16"), ["not valid UTF-8"], id="utf16"),
        pytest.param(b"A=1\n\nB=\x00\n", ["NUL", "line 3"], id="nul-third-line"),
        pytest.param(b"#" * (MAX_DOTENV_BYTES + 1), ["larger than", str(MAX_DOTENV_BYTES)],
                     id="too-large"),
    ],
)
def test_decode_errors_help_a_person(data: bytes, fragments: list[str]) -> None:
    """Bytes that cannot be a .env file raise DotenvError saying why and where."""
    with pytest.raises(DotenvError) as caught:
        decode_dotenv(data)
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_decoded_windows_file_parses() -> None:
    """A file saved with a BOM and CRLF line ends by a Windows editor parses like any other."""
    data = '\ufeffexport A=1\r\nB="x\r\ny" # note\r\n'.encode()
    assert parse_dotenv(decode_dotenv(data)) == {"A": "1", "B": "x\ny"}
