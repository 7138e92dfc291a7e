"""Blocking work of the sources (copying a file source, unpacking) run in a thread that a
cancel can stop.

A thread cannot be interrupted: :func:`run_cancellable` hands the work a
:class:`threading.Event` to check between two steps, sets it when the caller is cancelled,
and waits for the thread to finish before the cancellation goes on, so that nothing is
written any more into files or folders the caller removes next.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

#: What the work returns.
T = TypeVar("T")


async def run_cancellable(work: Callable[[threading.Event], T]) -> T:
    """Run ``work(cancel)`` in a thread; return what it returns, or raise what it raises.

    When the caller is cancelled, ``cancel`` is set and the thread is waited for (what it
    then raises is dropped) before :class:`asyncio.CancelledError` goes on.
    """
    cancel = threading.Event()
    running = asyncio.ensure_future(asyncio.to_thread(work, cancel))
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        cancel.set()
        with contextlib.suppress(Exception):
            await running
        raise
