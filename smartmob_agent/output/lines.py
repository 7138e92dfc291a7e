"""Turning a child's output bytes into lines: pure, bounded, and fast.

The hot path of log streaming. Work is done on whole chunks with C-level bytes methods
(decode, replace, split) instead of per line in Python, since a child may write a million
lines a second. ``StreamReader.readline()`` is not used: on an over-long line it raises
again and again, then returns fragments.
"""

from __future__ import annotations

#: Longest line handed on; longer ones are cut into pieces of at most this many bytes.
DEFAULT_MAX_LINE = 64 * 1024


def _sanitize(block: bytes) -> bytes:
    """Return ``block`` as valid UTF-8, invalid bytes replaced by U+FFFD."""
    try:
        block.decode("utf-8")
    except UnicodeDecodeError:
        return block.decode("utf-8", "replace").encode("utf-8")
    return block


def _char_boundary(data: bytes, cut: int, start: int = 0) -> int:
    """Move ``cut`` back (at most 3 bytes, never to ``start``) off a UTF-8 sequence."""
    for back in range(4):
        if cut - back <= start:
            break
        if (data[cut - back] & 0xC0) != 0x80:
            return cut - back
    return cut


def _cut_long(line: bytes, max_line: int) -> list[bytes]:
    """Cut a sanitized line longer than ``max_line`` at character boundaries."""
    pieces = []
    start, end = 0, len(line)
    while end - start > max_line:
        cut = _char_boundary(line, start + max_line, start)
        pieces.append(line[start:cut])
        start = cut
    pieces.append(line[start:])
    return pieces


class LineSplitter:
    """Splits a byte stream into lines of valid UTF-8 without their line ending.

    ``\\n`` ends a line and a ``\\r`` just before it is dropped. A line longer than
    ``max_line`` bytes is handed on in pieces, so memory stays bounded whatever the
    child writes. A last line without a newline comes out of :meth:`flush`.
    """

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        if max_line < 4:
            raise ValueError("max_line must be at least 4 bytes")
        self.max_line = max_line
        self._pending = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        """Take the next chunk of output and return the lines it completes."""
        data = self._pending + chunk if self._pending else chunk
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            self._pending = data
            return self._drain_long_pending()
        block, self._pending = data[: cut - 1], data[cut:]
        if b"\r" in block:
            block = block.replace(b"\r\n", b"\n")
            if block.endswith(b"\r"):
                block = block[:-1]
        block = _sanitize(block)
        lines = block.split(b"\n")
        # measured after sanitizing: each invalid byte grows into a 3-byte U+FFFD
        if len(block) > self.max_line and max(map(len, lines)) > self.max_line:
            lines = [piece for line in lines for piece in _cut_long(line, self.max_line)]
        if self._pending:
            lines.extend(self._drain_long_pending())
        return lines

    def _drain_long_pending(self) -> list[bytes]:
        """Hand on the unfinished line in pieces once it is longer than ``max_line``.

        A trailing ``\\r`` stays pending and does not count: it may be the first half of a
        ``\\r\\n`` whose ``\\n`` comes in the next chunk.
        """
        data = self._pending
        end = len(data) - data.endswith(b"\r")
        if end <= self.max_line:
            return []
        pieces: list[bytes] = []
        start = 0
        while end - start > self.max_line:
            cut = _char_boundary(data, start + self.max_line, start)
            pieces.extend(self._finish(data[start:cut]))
            start = cut
        self._pending = data[start:]
        return pieces

    def _finish(self, raw: bytes) -> list[bytes]:
        """Sanitize one raw line of at most ``max_line`` bytes, cutting it if that grew it."""
        line = _sanitize(raw)
        if len(line) > self.max_line:
            return _cut_long(line, self.max_line)
        return [line]

    def flush(self) -> list[bytes]:
        """Return the last, unterminated line (if any) at end of stream."""
        data, self._pending = self._pending, b""
        if data.endswith(b"\r"):
            data = data[:-1]
        return self._finish(data) if data else []
