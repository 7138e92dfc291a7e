"""The listening sockets the agent holds for processes (the ``socket`` option).

The agent binds and listens itself, once, when the process is created (or brought back
by a new agent), and passes the socket to each of its children as fd 3 (see
:func:`~smartmob_agent.processes.spawn.spawn_shell`). The socket outlives the children:
while one restarts or an update replaces it, connections wait in the backlog instead of
being refused. The agent never accepts on it, and leaves it blocking: the file status
flags are shared with the children, whose servers expect a socket as ``socket()`` makes
it.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import socket

from smartmob_agent.errors import AgentError, Conflict, InvalidRequest
from smartmob_agent.model import Spec

log = logging.getLogger("smartmob_agent.agent")  # stable name: its messages are the agent's


def listen_for(spec: Spec) -> tuple[Spec, socket.socket | None]:
    """Bind and listen on the socket ``spec`` asks for, if it asks for one; return the
    spec with the port the socket got (``"socket": true`` asks the kernel for one), and
    the socket (not inheritable: only children it is passed to get it).

    Raises:
        Conflict: the port is in use.
        InvalidRequest: the host is not an address of this machine, or the port is one
            the agent's user may not bind.
    """
    wanted = spec.options.socket
    if wanted is None:
        return spec, None
    family = socket.AF_INET6 if ":" in wanted.host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        # a port that a stopped agent's socket left in TIME_WAIT is free to bind again
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((wanted.host, wanted.port or 0))
        listener.listen(wanted.backlog)
    except OSError as error:
        listener.close()
        where = f"{wanted.host}:{wanted.port or 0}"
        if error.errno == errno.EADDRINUSE:
            raise Conflict(f"the socket {where} cannot be bound: the port is in use") from None
        raise InvalidRequest(
            f"the socket {where} cannot be bound: {error.strerror or error}",
            {"socket": f"cannot be bound ({error.strerror or error})"},
        ) from None
    port = listener.getsockname()[1]
    options = dataclasses.replace(
        spec.options, socket=dataclasses.replace(wanted, port=port))
    return dataclasses.replace(spec, options=options), listener


def listen_again(spec: Spec) -> tuple[Spec, socket.socket | None]:
    """:func:`listen_for` a process a new agent brings back: a socket that cannot be
    bound again (its port taken meanwhile) is said in the log, and the children run
    without it (they say what they lack)."""
    try:
        return listen_for(spec)
    except AgentError as error:
        log.error("%s: its socket is not passed on: %s", spec.slug, error)
        return spec, None


def private_listener() -> socket.socket:
    """A socket listening on a free port of 127.0.0.1, for one child alone: its health
    socket, which the agent's HTTP probes reach (the shared one may lead to another
    child)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
    except OSError:
        listener.close()
        raise
    return listener
