"""The agent's own heap: one ``malloc`` arena for all its threads, and memory it freed
given back.

glibc gives each thread that allocates an arena of its own (up to eight per core), and
memory freed in one stays there for that arena's next allocations, resident. The agent's
few threads (file work, the usage monitor's samples) allocate little, under the GIL
anyway, while the event loop's thread does everything else: sharing the main arena costs
them nothing measurable and leaves about 2 MB less resident with a few hundred processes
(``benchmarks/memory.py``). And what start-up frees (compiling a request schema
allocates megabytes for a moment) stays resident until :func:`trim` gives it back.

Standard library only, like :mod:`~smartmob_agent.processes.privacy`.
"""

from __future__ import annotations

import ctypes

#: ``mallopt`` parameter number of ``M_ARENA_MAX`` (glibc's malloc.h).
_M_ARENA_MAX = -8


def one_arena() -> bool:
    """Have every thread of this process allocate from the main ``malloc`` arena (the
    arenas already made stay). Call it before starting threads. Returns whether it
    worked (``False`` without glibc)."""
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_ARENA_MAX, 1) == 1)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return False


def trim() -> bool:
    """Give back to the system the free memory of the heap (glibc ``malloc_trim``): what
    a burst of work freed stays resident otherwise. It walks the free chunks (a fraction
    of a millisecond): for after start-up, not for every request. Returns whether it
    released anything."""
    try:
        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return False
