"""The guardian: kills the agent's descendants if the agent dies without stopping them.

SIGKILL gives the agent no chance to stop its children, and ``PR_SET_PDEATHSIG`` would
reach only direct children, not ``sleep 1000 & sleep 1000`` grandchildren. So the CLI
starts this tiny program (``python -I -S``, see :func:`command`) with a pipe on its stdin.
When the agent dies, for whatever reason, the pipe reaches end of file; the guardian then
SIGKILLs every process whose environment carries the marker it was given (an entry such
as ``SMARTMOB_AGENT_ID=<id>``, which every child inherits) and the groups they lead, and
exits. After a clean shutdown it finds nobody and exits at once.

It runs as the agent's user, where the children of an agent without ``--user`` run too,
and any of them may read a process's ``/proc/<pid>/environ`` and memory unless it is
non-dumpable. So it gets none of the agent's environment (the keys of ``SMARTMOB_TOKEN``,
``SMARTMOB_APP_TOKEN``, ``SMARTMOB_WEBHOOK_SECRET`` would be there for the taking): only
what an interpreter may need to start (:func:`environment`); it holds no descriptor of
the agent's but its stdin pipe and standard output and error; and it makes itself
non-dumpable first thing (as the agent does), so that nothing it ever holds can be read.

Imports only the standard library (and :mod:`~smartmob_agent.processes.proctable` and
:mod:`~smartmob_agent.processes.privacy`, which do too), to stay small in memory.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Mapping

from smartmob_agent.processes.privacy import make_undumpable
from smartmob_agent.processes.proctable import marked_processes

_SWEEPS = 5
#: The only variables of the agent's environment the guardian gets: where the
#: interpreter's libraries are, and the locale its one message is written in.
KEPT_VARIABLES = ("LD_LIBRARY_PATH", "LANG", "LC_ALL", "LC_CTYPE")


def sweep(marker: bytes) -> int:
    """SIGKILL every marked process and the group it leads; return how many were found."""
    own = {os.getpid(), os.getpgid(0)}
    killed = 0
    for _ in range(_SWEEPS):  # again, in case one forked while we were killing
        pids = [pid for pid in marked_processes(marker) if pid not in own]
        if not pids:
            break
        for pid in pids:
            killed += 1
            for kill in (os.kill, os.killpg):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    kill(pid, signal.SIGKILL)
    return killed


def environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The guardian's environment, from the agent's ``environ``: the
    :data:`KEPT_VARIABLES` it has, nothing else (``python -I`` ignores ``PYTHON*``).

    >>> from smartmob_agent.processes.guardian import environment
    >>> environment({"SMARTMOB_TOKEN": "k", "LANG": "C.UTF-8", "HOME": "/root"})
    {'LANG': 'C.UTF-8'}
    """
    return {name: environ[name] for name in KEPT_VARIABLES if name in environ}


def command(marker: str) -> list[str]:
    """The command line that runs the guardian for ``marker``.

    ``-I -S`` skips site-packages and the environment: the guardian needs only the
    standard library and this package, whose folder is put on the path explicitly.
    """
    # this file is smartmob_agent/processes/guardian.py: the package's parent is 3 levels up
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = (
        f"import sys; sys.path.insert(0, {package_parent!r}); "
        "from smartmob_agent.processes.guardian import main; raise SystemExit(main())"
    )
    return [sys.executable, "-I", "-S", "-c", code, marker]


def main(argv: list[str] | None = None) -> int:
    """Wait for end of file on stdin, then sweep; the only argument is the marker, an
    environment entry such as ``SMARTMOB_AGENT_ID=<id>``."""
    make_undumpable()  # first: its environment is clean, but keep it all unreadable
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or "=" not in args[0]:
        print("usage: python -m smartmob_agent.processes.guardian NAME=VALUE", file=sys.stderr)
        return 2
    # the agent decides when we end: terminal and service signals are not for us
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    marker = args[0].encode()
    while os.read(0, 4096):
        pass
    killed = sweep(marker)
    if killed:
        print(f"smartmob-agent guardian: the agent died; killed {killed} leftover process(es)",
              file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover - runs as its own process
    raise SystemExit(main())
