"""Finding processes by an environment entry they inherited (reads ``/proc``).

A process that leaves its process group (``setsid``) and whose parent dies can no longer
be found through the group or the process tree. Every child of the agent carries marker
entries in its environment, which all its descendants inherit (unless they clear their
environment on purpose), so scanning ``/proc/*/environ`` finds them wherever they went.

Standard library only: the guardian, a separate small program, uses it too.
"""

from __future__ import annotations

import os


def marked_processes(marker: bytes, proc: str = "/proc") -> list[int]:
    """Pids of processes whose environment contains exactly the entry ``marker``.

    Args:
        marker: a whole ``NAME=value`` entry, as bytes.
        proc: where the process table is mounted.
    """
    found = []
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        try:
            with open(f"{proc}/{name}/environ", "rb") as file:
                environ = file.read()
        except OSError:  # gone, or not ours to read
            continue
        if marker in environ.split(b"\0"):
            found.append(int(name))
    return found
