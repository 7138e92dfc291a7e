"""LineSplitter: bytes chunks in, bounded lines of valid UTF-8 out."""

from __future__ import annotations

import random

import pytest

from smartmob_agent.output.lines import DEFAULT_MAX_LINE, LineSplitter

EURO = "€".encode()  # 3 bytes
EMOJI = "😀".encode()  # 4 bytes
REPLACEMENT = "\ufffd".encode()


def run(chunks: list[bytes], max_line: int = DEFAULT_MAX_LINE) -> tuple[list[bytes], list[bytes]]:
    """Feed ``chunks`` to a new splitter; return (lines from feed, lines from flush)."""
    splitter = LineSplitter(max_line)
    fed: list[bytes] = []
    for chunk in chunks:
        fed.extend(splitter.feed(chunk))
    return fed, splitter.flush()


def assert_bounded(lines: list[bytes], max_line: int) -> None:
    """Every line is valid UTF-8 and at most ``max_line`` bytes."""
    for line in lines:
        assert len(line) <= max_line, (len(line), line[:40])
        line.decode("utf-8", "strict")


@pytest.mark.parametrize(
    ("chunks", "fed", "flushed"),
    [
        pytest.param([b"hello\n"], [b"hello"], [], id="one-line"),
        pytest.param([b"hel", b"lo\n"], [b"hello"], [], id="partial-across-chunks"),
        pytest.param([b"h", b"e", b"l", b"l", b"o", b"\n"], [b"hello"], [], id="byte-by-byte"),
        pytest.param([b"a\nb\nc"], [b"a", b"b"], [b"c"], id="final-line-without-newline"),
        pytest.param([b"a\nb", b"c\nd"], [b"a", b"bc"], [b"d"], id="partials-join"),
        pytest.param([b"a\r\nb\r\n"], [b"a", b"b"], [], id="crlf"),
        pytest.param([b"a\r", b"\nb\r\n"], [b"a", b"b"], [], id="cr-split-from-lf"),
        pytest.param([b"a", b"\r", b"\n"], [b"a"], [], id="cr-alone-in-a-chunk"),
        pytest.param([b"a\rb\n"], [b"a\rb"], [], id="bare-cr-kept"),
        pytest.param([b"a\r\r\n"], [b"a\r"], [], id="only-one-cr-dropped"),
        pytest.param([b"\n\n\n"], [b"", b"", b""], [], id="empty-lines"),
        pytest.param([b"\r\n"], [b""], [], id="empty-crlf-line"),
        pytest.param([b"", b"", b""], [], [], id="empty-chunks"),
        pytest.param([], [], [], id="nothing"),
        pytest.param([b"abc\r"], [], [b"abc"], id="flush-drops-trailing-cr"),
        pytest.param([b"\r"], [], [], id="flush-of-a-lone-cr"),
        pytest.param([b"a\xffb\n"], ["a\ufffdb".encode()], [], id="invalid-byte-replaced"),
        pytest.param([b"\xc3\x28\n"], ["\ufffd(".encode()], [], id="invalid-sequence"),
        pytest.param([b"ok\n\xc3"], [b"ok"], [REPLACEMENT], id="truncated-char-at-eof"),
        pytest.param([b"\xed\xa0\x80\n"], [REPLACEMENT * 3], [], id="surrogate-rejected"),
        pytest.param(["é".encode()[:1], "é".encode()[1:] + b"\n"], ["é".encode()], [],
                     id="2-byte-char-split"),
        pytest.param([b"x" + EURO[:2], EURO[2:] + b"\n"], [b"x" + EURO], [],
                     id="3-byte-char-split"),
        pytest.param([b"a\n" + EMOJI[:1], EMOJI[1:3], EMOJI[3:] + b"\n"], [b"a", EMOJI], [],
                     id="4-byte-char-split-thrice"),
        pytest.param([EMOJI[:3]], [], [REPLACEMENT], id="unfinished-char-flushed"),
    ],
)
def test_splits_chunks_into_lines(
    chunks: list[bytes], fed: list[bytes], flushed: list[bytes]
) -> None:
    """The splitter returns complete lines from feed() and the unterminated rest from flush()."""
    assert run(chunks) == (fed, flushed)


@pytest.mark.parametrize("split", range(1, len(EMOJI)))
def test_multibyte_char_split_at_every_byte_stays_intact(split: int) -> None:
    """A character whose bytes arrive in two chunks comes out whole, not as U+FFFD."""
    text = "smile 😀 and € and é"
    data = text.encode()
    at = data.index(EMOJI) + split
    fed, flushed = run([data[:at], data[at:] + b"\n"])
    assert fed == [data]
    assert flushed == []


def test_flush_empties_the_splitter() -> None:
    """After flush() the splitter starts afresh and a second flush() returns nothing."""
    splitter = LineSplitter()
    assert splitter.feed(b"tail") == []
    assert splitter.flush() == [b"tail"]
    assert splitter.flush() == []
    assert splitter.feed(b"next\n") == [b"next"]


@pytest.mark.parametrize(
    ("line", "max_line", "pieces"),
    [
        pytest.param(b"x" * 8, 8, [b"x" * 8], id="exactly-max"),
        pytest.param(b"x" * 9, 8, [b"x" * 8, b"x"], id="one-over"),
        pytest.param(b"x" * 20, 8, [b"x" * 8, b"x" * 8, b"x" * 4], id="many-pieces"),
        pytest.param(b"x" * 16, 8, [b"x" * 8, b"x" * 8], id="two-exact-pieces"),
        pytest.param(b"xxxxxxx" + EURO, 8, [b"xxxxxxx", EURO], id="char-moved-to-next-piece"),
        pytest.param("é😀".encode(), 4, ["é".encode(), EMOJI], id="smallest-max"),
        pytest.param(EURO * 5, 4, [EURO] * 5, id="one-char-per-piece"),
    ],
)
def test_overlong_line_is_cut_at_character_boundaries(
    line: bytes, max_line: int, pieces: list[bytes]
) -> None:
    """A line longer than max_line comes out in pieces of at most max_line whole characters."""
    assert run([line + b"\n"], max_line) == (pieces, [])
    # the same pieces when the line arrives byte by byte, and when it is never terminated
    fed, flushed = run([bytes([b]) for b in line + b"\n"], max_line)
    assert fed == pieces
    assert flushed == []
    fed, flushed = run([line], max_line)
    assert fed + flushed == pieces


@pytest.mark.parametrize("max_line", [8, 9, 10, 64])
def test_overlong_multibyte_line_pieces_decode_strictly(max_line: int) -> None:
    """Every piece of an overlong line of multi-byte characters decodes on its own."""
    text = ("é€😀a" * 50)
    fed, flushed = run([text.encode() + b"\n"], max_line)
    assert_bounded(fed, max_line)
    assert b"".join(fed).decode() == text
    assert flushed == []


def test_megabyte_line_comes_out_in_bounded_pieces() -> None:
    """A 1 MB line fed in 64 KiB chunks comes out in pieces of at most max_line bytes."""
    text = "€" * (1024 * 1024 // 3) + "end"
    data = text.encode() + b"\n"
    splitter = LineSplitter()
    out: list[bytes] = []
    for start in range(0, len(data), 65536):
        out.extend(splitter.feed(data[start:start + 65536]))
    assert splitter.flush() == []
    assert_bounded(out, DEFAULT_MAX_LINE)
    # each piece but the last is as long as whole characters allow: 65535 = 21845 * 3
    assert {len(piece) for piece in out[:-1]} == {DEFAULT_MAX_LINE - 1}
    assert len(out) == 17
    assert b"".join(out).decode() == text


def test_megabyte_line_in_one_chunk_matches_chunked_result() -> None:
    """A 1 MB line cut in one feed() gives the same pieces as when it arrives in chunks."""
    data = ("ab€" * 200_000).encode()
    whole, _ = run([data + b"\n"])
    chunked, _ = run([data[i:i + 4096] for i in range(0, len(data), 4096)] + [b"\n"])
    assert whole == chunked
    assert_bounded(whole, DEFAULT_MAX_LINE)
    assert b"".join(whole) == data


@pytest.mark.parametrize(
    "chunks",
    [
        pytest.param([b"\xff" * 100 + b"\n"], id="in-a-complete-line"),
        pytest.param([b"\xff" * 100], id="in-an-unfinished-line"),
        pytest.param([b"\xff" * 3], id="short-unfinished-line"),
        pytest.param([b"\xff"] * 100, id="byte-by-byte"),
        pytest.param([b"ab\xff\xfecd" * 10 + b"\n"], id="mixed"),
    ],
)
def test_replacement_characters_do_not_exceed_max_line(chunks: list[bytes]) -> None:
    """Invalid bytes grow into 3-byte U+FFFD, yet no line handed on exceeds max_line."""
    fed, flushed = run(chunks, 8)
    assert_bounded(fed + flushed, 8)
    assert REPLACEMENT in b"".join(fed + flushed)


def test_line_of_exactly_max_with_crlf_split_gives_one_line() -> None:
    """A max_line-long line whose CR and LF arrive apart yields no extra empty line."""
    assert run([b"x" * 8 + b"\r", b"\n", b"y\n"], 8) == ([b"x" * 8, b"y"], [])
    assert run([b"x" * 16 + b"\r", b"\n"], 8) == ([b"x" * 8, b"x" * 8], [])


def test_unfinished_line_is_bounded_in_memory() -> None:
    """Without any newline, all but at most max_line + 1 of the bytes fed are handed on."""
    max_line = 1000
    splitter = LineSplitter(max_line)
    fed_bytes = handed_on = 0
    for _ in range(2000):
        chunk = b"y" * 517 + b"\r"
        fed_bytes += len(chunk)
        handed_on += sum(len(line) for line in splitter.feed(chunk))
        assert fed_bytes - handed_on <= max_line + 1
    rest = splitter.flush()
    assert handed_on + sum(len(line) for line in rest) == fed_bytes - 1  # the final CR


@pytest.mark.parametrize("max_line", [-1, 0, 3])
def test_max_line_below_four_is_refused(max_line: int) -> None:
    """A max_line that cannot hold one 4-byte character raises ValueError."""
    with pytest.raises(ValueError, match="at least 4"):
        LineSplitter(max_line)


ALPHABET = [b"a", b"bc", b"\n", b"\r\n", b"\r", "é".encode(), EURO, EMOJI, b" "]


@pytest.mark.parametrize("seed", range(40))
def test_chunking_never_changes_the_lines(seed: int) -> None:
    """Random valid UTF-8 streams give the same lines however they are cut into chunks."""
    rng = random.Random(seed)
    max_line = rng.randint(4, 24)
    data = b"".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 400)))
    expected = run([data], max_line)
    cuts = sorted(rng.sample(range(len(data) + 1), min(len(data) + 1, rng.randint(0, 60))))
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    assert run(chunks, max_line) == expected
    fed, flushed = expected
    assert_bounded(fed + flushed, max_line)
    # no byte is lost or invented: lines rejoined give back the text without line ends
    normal = data.replace(b"\r\n", b"\n").split(b"\n")
    if normal[-1].endswith(b"\r"):
        normal[-1] = normal[-1][:-1]
    assert b"".join(fed + flushed) == b"".join(normal)


@pytest.mark.parametrize("seed", range(40))
def test_chunking_of_invalid_utf8_keeps_lines_valid(seed: int) -> None:
    """Random streams with invalid bytes always give valid, bounded lines with the same text."""
    rng = random.Random(1000 + seed)
    max_line = rng.randint(4, 24)
    alphabet = [*ALPHABET, b"\xff", b"\x80", EMOJI[:2], EURO[1:]]
    data = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 400)))
    whole_fed, whole_flushed = run([data], max_line)
    chunks, start = [], 0
    while start < len(data):
        step = rng.randint(1, 9)
        chunks.append(data[start:start + step])
        start += step
    fed, flushed = run(chunks, max_line)
    assert_bounded(fed + flushed, max_line)
    assert b"".join(fed + flushed) == b"".join(whole_fed + whole_flushed)
