"""WebSocket text frames, checked with an independent RFC 6455 parser."""

from __future__ import annotations

import json
from collections.abc import Iterable

import pytest

from smartmob_agent.web.frames import encode_text_frames, json_line_payloads, text_frame_header


def parse_frames(data: bytes) -> list[tuple[bool, int, bytes]]:
    """Parse server-to-client frames (RFC 6455 section 5.2); return (fin, opcode, payload)."""
    frames = []
    at = 0
    while at < len(data):
        assert len(data) - at >= 2, "truncated header"
        first, second = data[at], data[at + 1]
        fin = bool(first & 0x80)
        assert first & 0x70 == 0, "RSV bits set without an extension"
        opcode = first & 0x0F
        assert not second & 0x80, "a server must not mask its frames"
        length = second & 0x7F
        at += 2
        if length == 126:
            length = int.from_bytes(data[at:at + 2], "big")
            assert length >= 126, "non-minimal 16-bit length"
            at += 2
        elif length == 127:
            length = int.from_bytes(data[at:at + 8], "big")
            assert length >= 65536, "non-minimal 64-bit length"
            assert not length >> 63, "most significant bit of a 64-bit length must be 0"
            at += 8
        payload = data[at:at + length]
        assert len(payload) == length, "truncated payload"
        at += length
        frames.append((fin, opcode, payload))
    return frames


@pytest.mark.parametrize(
    "length",
    [0, 1, 125, 126, 127, 1000, 65535, 65536, 65537, 200_000],
)
def test_one_frame_of_each_length_class(length: int) -> None:
    """A payload of any length becomes one final, unmasked text frame with that payload."""
    payload = bytes(range(97, 123)) * (length // 26) + b"z" * (length % 26)
    assert parse_frames(encode_text_frames([payload])) == [(True, 0x1, payload)]


@pytest.mark.parametrize(
    ("length", "header"),
    [
        pytest.param(0, b"\x81\x00", id="empty"),
        pytest.param(125, b"\x81\x7d", id="longest-7-bit"),
        pytest.param(126, b"\x81\x7e\x00\x7e", id="shortest-16-bit"),
        pytest.param(65535, b"\x81\x7e\xff\xff", id="longest-16-bit"),
        pytest.param(65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00", id="shortest-64-bit"),
    ],
)
def test_header_bytes_at_the_boundaries(length: int, header: bytes) -> None:
    """Headers use the 7-bit, 16-bit and 64-bit length forms exactly at RFC 6455's limits."""
    assert text_frame_header(length) == header


def test_many_lines_keep_their_order_and_payloads() -> None:
    """A batch of lines of mixed lengths becomes one frame per line, in order."""
    lines = [f"line {i} ".encode() * (i * 37 % 3000) for i in range(300)]
    lines += ["é€😀".encode() * 20_000, b"", b"last"]
    frames = parse_frames(encode_text_frames(lines))
    assert [payload for _, _, payload in frames] == lines
    assert {(fin, opcode) for fin, opcode, _ in frames} == {(True, 0x1)}


def test_payloads_are_valid_utf8_text_unchanged() -> None:
    """Multi-byte text goes out byte for byte, so it decodes back to the same string."""
    text = "naïve café — 日本語 😀"
    (frame,) = parse_frames(encode_text_frames([text.encode()]))
    assert frame[2].decode("utf-8") == text


@pytest.mark.parametrize("lines", [[], iter([]), (b"x" for _ in range(0))])
def test_no_lines_give_no_bytes(lines: Iterable[bytes]) -> None:
    """An empty batch encodes to nothing."""
    assert encode_text_frames(lines) == b""


def test_accepts_any_iterable() -> None:
    """A generator of lines is encoded like a list of them."""
    lines = [b"a", b"b" * 300, b"c" * 70_000]
    assert encode_text_frames(line for line in lines) == encode_text_frames(lines)


def test_total_size_is_headers_plus_payloads() -> None:
    """The encoded size is exactly the payloads plus 2, 4 or 10 header bytes each."""
    lines = [b"a" * 10, b"b" * 300, b"c" * 70_000]
    assert len(encode_text_frames(lines)) == sum(map(len, lines)) + 2 + 4 + 10


def test_json_line_payloads_are_json_documents_numbered_on() -> None:
    """Each line becomes one JSON object, numbered from ``seq`` on (``null`` without one),
    with quotes, backslashes, control characters and non-ASCII text kept exactly."""
    lines = [b'say "hi"', b"back\\slash\ttab\x01", "d\u00e9j\u00e0 \U0001f600".encode(), b""]
    payloads = json_line_payloads(lines, 41, "2026-12-01T18:00:00.123Z", "stderr", None, 2)
    documents = [json.loads(payload) for payload in payloads]
    assert documents == [
        {"seq": 41 + i, "at": "2026-12-01T18:00:00.123Z", "stream": "stderr",
         "line": line.decode(), "pid": None, "restarts": 2}
        for i, line in enumerate(lines)
    ]
    assert list(documents[0]) == ["seq", "at", "stream", "line", "pid", "restarts"]
    unnumbered = json_line_payloads([b"x"], None, "t", "stdout", 7, None)
    assert json.loads(unnumbered[0])["seq"] is None
    assert json.loads(unnumbered[0])["pid"] == 7
