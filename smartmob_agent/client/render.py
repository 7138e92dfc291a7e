"""How the ``smartmob`` command shows things to a person: pure formatting.

Tables are aligned on the visible width of their cells (colour codes do not count);
numbers are right-aligned. Colour is an ANSI code around a state's name, used only when
the caller says so (a terminal, and no ``NO_COLOR``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

#: ANSI colour of each state (others are left plain).
STATE_COLOURS = {
    "running": "32", "failed": "31;1", "backoff": "33", "exited": "33", "stopping": "33",
    "stopped": "2", "pending": "36", "downloading": "36", "unpacking": "36",
    "building": "36", "starting": "36",
}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def paint(text: str, code: str | None, colour: bool) -> str:
    """``text`` in the ANSI colour ``code`` if ``colour``; else as it is."""
    return f"\x1b[{code}m{text}\x1b[0m" if colour and code else text


def visible(text: str) -> int:
    """The width of ``text`` on a terminal, colour codes left out."""
    return len(_ANSI.sub("", text))


def table(headers: Sequence[str], rows: Iterable[Sequence[str]],
          right: Iterable[int] = ()) -> list[str]:
    """Rows aligned under their headers, two spaces apart; columns in ``right`` are
    right-aligned.

    >>> print("\\n".join(table(["SLUG", "PID"], [["a.web.0", "12"], ["b.web.10", "345"]],
    ...                        right=[1])))
    SLUG      PID
    a.web.0    12
    b.web.10  345
    """
    rows = [list(row) for row in rows]
    right = set(right)
    widths = [max([visible(h)] + [visible(row[i]) for row in rows])
              for i, h in enumerate(headers)]
    lines = []
    for row in [list(headers), *rows]:
        cells = []
        for i, cell in enumerate(row):
            pad = " " * (widths[i] - visible(cell))
            cells.append(pad + cell if i in right else cell + pad)
        lines.append("  ".join(cells).rstrip())
    return lines


def dash(value: Any) -> str:
    """``-`` for ``None``, else ``str(value)``."""
    return "-" if value is None else str(value)


def duration(seconds: float | None) -> str:
    """A duration in at most two units.

    >>> [duration(s) for s in (None, 4.2, 125, 3720, 273600)]
    ['-', '4s', '2m05s', '1h02m', '3d04h']
    """
    if seconds is None:
        return "-"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def size(count: int | None) -> str:
    """A number of bytes in binary units.

    >>> [size(n) for n in (None, 512, 2048, 15 * 1024 * 1024, 3 * 1024 ** 3)]
    ['-', '512B', '2.0K', '15.0M', '3.0G']
    """
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "K", "M", "G"):
        if value < 1024 or unit == "G":
            return f"{count}B" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def percent(value: float | None) -> str:
    """A CPU percentage: ``12.5%``, or ``-``."""
    return "-" if value is None else f"{value:.1f}%"


def state(value: str | None, colour: bool) -> str:
    """A state's name, coloured by :data:`STATE_COLOURS`."""
    if value is None:
        return "-"
    return paint(value, STATE_COLOURS.get(value), colour)


def details(fields: Mapping[str, str]) -> list[str]:
    """``name: value`` lines with the values aligned.

    >>> details({"slug": "a.web.0", "state": "running"})
    ['slug:  a.web.0', 'state: running']
    """
    width = max((len(name) for name in fields), default=0) + 2
    return [f"{name + ':':<{width}}{value}" for name, value in fields.items()]


def progress_bar(done: int, total: int, width: int = 30) -> str:
    """An upload's progress: ``[#####.....]  50%  1.0M/2.0M``.

    >>> progress_bar(1024, 2048, width=10)
    '[#####.....]  50%  1.0K/2.0K'
    """
    fraction = 1.0 if total <= 0 else min(1.0, done / total)
    filled = int(fraction * width)
    return (f"[{'#' * filled}{'.' * (width - filled)}] {int(fraction * 100):3d}%  "
            f"{size(done)}/{size(total)}")
