"""WebSocket text frames for many lines at once (RFC 6455 section 5.2), pure.

Sending each line through ``WebSocketResponse.send_str`` costs one Python call, one
frame object and one socket write per line, which caps a stream near 200,000 lines a
second. Encoding a whole batch into one ``bytes`` and writing it once is several times
faster. Server frames are never masked, and the agent's WebSockets negotiate no
extension, so a frame is just a header and the UTF-8 payload.
"""

from __future__ import annotations

from collections.abc import Iterable
from json.encoder import encode_basestring as _quote

#: Header of an unmasked, final text frame, for each payload length below 126.
_SHORT_HEADERS = tuple(bytes((0x81, n)) for n in range(126))


def text_frame_header(length: int) -> bytes:
    """Return the header of a final, unmasked text frame carrying ``length`` bytes."""
    if length < 126:
        return _SHORT_HEADERS[length]
    if length < 65536:
        return b"\x81\x7e" + length.to_bytes(2, "big")
    return b"\x81\x7f" + length.to_bytes(8, "big")


def encode_text_frames(lines: Iterable[bytes]) -> bytes:
    """Encode each line (valid UTF-8) as one text frame and join them.

    Args:
        lines: payloads, each already valid UTF-8.

    Returns:
        The bytes to write to the connection, frames in order.
    """
    parts: list[bytes] = []
    append = parts.append
    short = _SHORT_HEADERS
    for line in lines:
        n = len(line)
        append(short[n] if n < 126 else text_frame_header(n))
        append(line)
    return b"".join(parts)


def json_line_payloads(
    lines: list[bytes], seq: int | None, at: str, stream: str, pid: int | None,
    restarts: int | None,
) -> list[bytes]:
    """The JSON text of each line of a batch, as ``attach?format=json`` sends it:
    ``{"seq", "at", "stream", "line", "pid", "restarts"}``, numbered on from ``seq``
    (``null`` for every line if ``None``).

    The part every line shares is encoded once per batch.

    >>> from smartmob_agent.web.frames import json_line_payloads
    >>> json_line_payloads([b'hi', b'"quoted"'], 7, "2026-12-01T18:00:00.123Z", "stdout",
    ...                    42, 0)[1]
    b'{"seq":8,"at":"2026-12-01T18:00:00.123Z","stream":"stdout","line":"\\\\"quoted\\\\"","pid":42,"restarts":0}'
    """
    middle = f',"at":{_quote(at)},"stream":{_quote(stream)},"line":'.encode()
    end = f',"pid":{_number(pid)},"restarts":{_number(restarts)}}}'.encode()
    quote = _quote
    if seq is None:
        return [b'{"seq":null%s%s%s' % (middle, quote(line.decode(errors="replace")).encode(), end)
                for line in lines]
    return [
        b'{"seq":%d%s%s%s' % (number, middle, quote(line.decode(errors="replace")).encode(), end)
        for number, line in enumerate(lines, seq)
    ]


def _number(value: int | None) -> str:
    return "null" if value is None else str(value)
