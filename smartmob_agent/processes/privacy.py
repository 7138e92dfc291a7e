"""What the agent keeps to itself, and what the processes it starts get instead.

- Its memory and ``/proc/<pid>/environ``, where the keys it was given in ``SMARTMOB_TOKEN``
  (and the like) stay for its whole life: :func:`make_undumpable`, which its guardian
  calls too. Processes of the same user could read them otherwise; a child gets the
  default back when it execs.
- The files it writes (logs, database, cached archives, marks): for its user only, by
  the umask ``077`` (:func:`make_files_private`); the commands it starts keep the umask
  the agent was given, or the one their create request asks for (:func:`children_umask`).

Standard library only: the guardian, a separate small program, uses it too.
"""

from __future__ import annotations

import ctypes
import os

_PR_SET_DUMPABLE = 4
#: The umask of everything the agent writes itself: nothing for the group or others.
PRIVATE_UMASK = 0o077

#: The umask this process had before :func:`make_files_private` (``None``: not called),
#: a process-wide value kept as such.
_given: list[int] = []


def make_undumpable() -> bool:
    """Make this process's memory and ``/proc/<pid>/environ`` unreadable by the other
    processes of its user, and refuse them ``ptrace`` (Linux ``PR_SET_DUMPABLE`` 0).
    Returns whether it worked."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) == 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return False


def make_files_private() -> int:
    """Set this process's umask to :data:`PRIVATE_UMASK`; return the umask it was given
    (kept for :func:`children_umask`). Calling it again changes nothing more."""
    previous = os.umask(PRIVATE_UMASK)
    if not _given:
        _given.append(previous)
    return _given[0]


def given_umask() -> int | None:
    """The umask this process had before :func:`make_files_private`, or ``None`` if that
    was never called (an agent used as a library: the umask is its caller's)."""
    return _given[0] if _given else None


def children_umask(requested: int | None) -> int:
    """The ``umask`` argument of :class:`subprocess.Popen` for a command the agent
    starts: the umask ``requested`` (a create request's option), else the one the agent
    was given, else ``-1`` (leave it as it is). The agent's own private umask is never
    passed on: the files of an app are the app's business.

    >>> from smartmob_agent.processes.privacy import children_umask
    >>> children_umask(0o027)
    23
    """
    if requested is not None:
        return requested
    given = given_umask()
    return -1 if given is None else given
