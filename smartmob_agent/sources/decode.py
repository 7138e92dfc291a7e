"""Decoding the small text files of a source (``Procfile``, ``.env``): pure.

Both are read as UTF-8, bounded in size, and refused with a sentence that names the line
when they are not text a command or a variable can hold.
"""

from __future__ import annotations

from collections.abc import Callable


def line_of(text: str, index: int) -> int:
    """The 1-based line number of ``text[index]``.

    >>> line_of("a\\nb\\nc", 4)
    3
    """
    return text.count("\n", 0, index) + 1


def decode_text(
    data: bytes, name: str, max_bytes: int, error: Callable[[str], Exception]
) -> str:
    """Decode the file ``name`` (as messages call it: ``"the Procfile"``) as UTF-8.

    Args:
        data: the file's content.
        name: the file, as a sentence names it.
        max_bytes: the most bytes it may have.
        error: makes the exception to raise from its message.

    Returns:
        The text, as it is (a byte order mark and line ends are the parser's).

    Raises:
        Exception: made by ``error``, if the data is over ``max_bytes``, not UTF-8 or
            holds a NUL character (no command or variable can hold one: spawning would
            fail with a bare ValueError); the message names the line.

    >>> decode_text(b"a\\n\\xff", "the file", 100, ValueError)
    Traceback (most recent call last):
    ...
    ValueError: the file is not valid UTF-8 (line 2, byte 2)
    """
    if len(data) > max_bytes:
        raise error(f"{name} is larger than {max_bytes} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as failure:
        line = data.count(b"\n", 0, failure.start) + 1
        raise error(f"{name} is not valid UTF-8 (line {line}, byte {failure.start})") from None
    if "\x00" in text:
        line = line_of(text, text.index("\x00"))
        raise error(f"{name} contains a NUL character (line {line})")
    return text
