"""WebSocket text frames for many lines at once (RFC 6455 section 5.2), pure.

Sending each line through ``WebSocketResponse.send_str`` costs one Python call, one
frame object and one socket write per line, which caps a stream near 200,000 lines a
second. Encoding a whole batch into one ``bytes`` and writing it once is several times
faster. Server frames are never masked, and the agent's WebSockets negotiate no
extension, so a frame is just a header and the UTF-8 payload.
"""

from __future__ import annotations

from collections.abc import Iterable

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
