"""Handing each process a free TCP port for its ``PORT`` variable.

foreman and honcho give ``PORT`` as a base port plus an offset per process, which collides
with whatever else listens on the machine. Here the kernel picks the port instead: binding
a socket to port 0 returns one nothing is bound to, and it is closed again at once so the
process can bind it. The allocator remembers every port it handed out or was told about,
so two processes of this agent never get the same one.

The port is only free when probed: the kernel does not keep it, so an outside program may
still take it before the process binds it. Ports are drawn from the kernel's ephemeral
range, where such races are rare.
"""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Callable

from smartmob_agent.errors import AgentError

#: Probes tried before giving up when each returns a port already held.
MAX_TRIES = 100


class PortsExhausted(AgentError):
    """No free TCP port could be found for a process."""


def probe_free_port(host: str = "0.0.0.0") -> int:
    """Ask the kernel for a TCP port nothing is bound to on ``host``, and return it.

    Args:
        host: the address to bind the probe to; an address with ``:`` is IPv6.

    Raises:
        OSError: if no socket can be opened or bound (out of file descriptors, or
            ``host`` is not an address of this machine).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


class PortAllocator:
    """The ports of the agent's processes, each process (owner) holding at most one.

    Meant for one thread (the event loop's): nothing here is locked.

    Args:
        host: the address the kernel probe binds to.
        probe: returns a candidate free port; the kernel probe on ``host`` by default.
            Tests pass their own.
        tries: how many candidates to draw before giving up.
    """

    def __init__(
        self,
        host: str = "0.0.0.0",
        *,
        probe: Callable[[], int] | None = None,
        tries: int = MAX_TRIES,
    ) -> None:
        self._probe = probe if probe is not None else lambda: probe_free_port(host)
        self._tries = tries
        self._ports: dict[str, int] = {}
        # how many owners hold each port: reserve() may give one port to several
        self._holders: Counter[int] = Counter()

    def port_of(self, owner: str) -> int | None:
        """Return the port ``owner`` holds, or None."""
        return self._ports.get(owner)

    def allocate(self, owner: str) -> int:
        """Return ``owner``'s port, finding a free one if it has none yet.

        An owner keeps its port until released, so a restarted process gets the same one.

        Args:
            owner: the process the port is for.

        Raises:
            PortsExhausted: if every candidate drawn is held by another owner, or the
                kernel probe fails.
        """
        held = self._ports.get(owner)
        if held is not None:
            return held
        for _ in range(self._tries):
            try:
                port = self._probe()
            except OSError as error:
                raise PortsExhausted(
                    f"cannot find a free TCP port for PORT: {error.strerror or error}"
                ) from None
            if not self._holders[port]:
                self._hold(owner, port)
                return port
        raise PortsExhausted(
            f"cannot find a free TCP port for PORT: the {self._tries} ports tried are all "
            "held by other processes"
        )

    def reserve(self, owner: str, port: int) -> None:
        """Record that ``owner`` uses ``port`` (its request set ``PORT`` itself).

        The port replaces any port the owner held. Another owner may hold it too (the
        user asked for it), but :meth:`allocate` will not hand it out while it is held.

        Args:
            owner: the process that uses the port.
            port: the port it was given, from 1 to 65535.

        Raises:
            ValueError: if ``port`` is not a TCP port number.
        """
        if not 1 <= port <= 65535:
            raise ValueError(f"{port} is not a TCP port number")
        self.release(owner)
        self._hold(owner, port)

    def release(self, owner: str) -> None:
        """Forget ``owner``'s port, if it has one, so it may be handed out again."""
        port = self._ports.pop(owner, None)
        if port is None:
            return
        self._holders[port] -= 1
        if not self._holders[port]:
            del self._holders[port]

    def _hold(self, owner: str, port: int) -> None:
        """Give ``port`` to ``owner``, which holds none."""
        self._ports[owner] = port
        self._holders[port] += 1
