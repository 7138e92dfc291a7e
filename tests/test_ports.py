"""PORT allocation: free kernel ports, stable per process, never handed out twice."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable

import pytest

from smartmob_agent.errors import AgentError
from smartmob_agent.processes.ports import MAX_TRIES, PortAllocator, PortsExhausted, probe_free_port


def scripted(ports: Iterable[int]) -> tuple[Callable[[], int], list[int]]:
    """A probe returning ports in order, and the list of those it returned so far."""
    remaining = iter(ports)
    returned: list[int] = []

    def probe() -> int:
        returned.append(next(remaining))
        return returned[-1]

    return probe, returned


def can_bind(port: int, host: str = "0.0.0.0") -> bool:
    """Whether a TCP socket can bind port on host right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def test_each_owner_gets_a_distinct_bindable_port() -> None:
    """Fifty owners get fifty distinct ports, each free to bind when handed out."""
    ports = PortAllocator()
    given = []
    for number in range(50):
        port = ports.allocate(f"web.{number}")
        assert 1024 <= port <= 65535
        assert can_bind(port)
        given.append(port)
    assert len(set(given)) == 50


def test_real_probe_returns_a_free_port() -> None:
    """The kernel probe returns a port that can be bound, on IPv4 and on loopback."""
    for host in ("0.0.0.0", "127.0.0.1"):
        port = probe_free_port(host)
        assert 1 <= port <= 65535
        assert can_bind(port, host)


def test_real_probe_on_ipv6_loopback() -> None:
    """An address with ":" is probed over IPv6."""
    try:
        port = probe_free_port("::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        sock.bind(("::1", port))


def test_real_probe_on_a_foreign_address_fails() -> None:
    """Probing an address this machine does not have raises OSError, and allocate says so."""
    try:
        probe_free_port("192.0.2.1")  # TEST-NET-1: never assigned to a real machine
    except OSError:
        pass
    else:
        pytest.skip("this machine allows binding non-local addresses")
    with pytest.raises(PortsExhausted, match="cannot find a free TCP port"):
        PortAllocator("192.0.2.1").allocate("web.1")


def test_allocate_is_stable_for_an_owner() -> None:
    """Allocating again for the same owner returns its port without probing again."""
    probe, returned = scripted([5001, 5002])
    ports = PortAllocator(probe=probe)
    assert ports.allocate("web.1") == 5001
    assert ports.allocate("web.1") == 5001
    assert ports.port_of("web.1") == 5001
    assert returned == [5001]


def test_port_of_an_unknown_owner_is_none() -> None:
    """An owner that was never given a port has none."""
    assert PortAllocator(probe=lambda: 5001).port_of("web.1") is None


def test_held_ports_are_skipped() -> None:
    """A probed port another owner holds is skipped, and the next free one is given."""
    probe, returned = scripted([5001, 5001, 5001, 5002])
    ports = PortAllocator(probe=probe)
    assert ports.allocate("web.1") == 5001
    assert ports.allocate("web.2") == 5002
    assert returned == [5001, 5001, 5001, 5002]


def test_reserved_ports_are_never_handed_out() -> None:
    """Ports reserved by owners (their request set PORT) are skipped by allocate."""
    probe, returned = scripted([8000, 8001, 8002, 9000])
    ports = PortAllocator(probe=probe)
    for number, port in enumerate((8000, 8001, 8002)):
        ports.reserve(f"custom.{number}", port)
    assert ports.allocate("web.1") == 9000
    assert returned == [8000, 8001, 8002, 9000]


def test_reserved_ports_are_avoided_with_the_real_probe() -> None:
    """With ports the kernel just gave out reserved, the real probe hands out only others."""
    guesses = {probe_free_port() for _ in range(30)}
    ports = PortAllocator()
    for port in guesses:
        ports.reserve(f"custom.{port}", port)
    given = {ports.allocate(f"web.{number}") for number in range(30)}
    assert not given & guesses
    assert len(given) == 30


def test_a_port_may_be_reserved_by_several_owners() -> None:
    """Two owners may reserve the same port; it stays held until both release it."""
    probe, _ = scripted([8000, 8000, 8001, 8000])
    ports = PortAllocator(probe=probe)
    ports.reserve("a.1", 8000)
    ports.reserve("b.1", 8000)
    assert ports.port_of("a.1") == ports.port_of("b.1") == 8000
    ports.release("a.1")
    assert ports.allocate("web.1") == 8001
    ports.release("b.1")
    assert ports.allocate("web.2") == 8000


def test_reserve_may_take_a_port_allocate_gave_another() -> None:
    """Reserving a port that allocate gave another owner is allowed: the user asked for it."""
    ports = PortAllocator(probe=lambda: 5001)
    assert ports.allocate("web.1") == 5001
    ports.reserve("custom.1", 5001)
    assert ports.port_of("web.1") == ports.port_of("custom.1") == 5001


def test_reserve_replaces_an_owner_port() -> None:
    """Reserving for an owner that holds a port replaces it, and frees the old one."""
    probe, _ = scripted([5001, 5001])
    ports = PortAllocator(probe=probe)
    assert ports.allocate("web.1") == 5001
    ports.reserve("web.1", 8000)
    assert ports.port_of("web.1") == 8000
    assert ports.allocate("web.2") == 5001


def test_reserving_the_same_port_again_keeps_it_held_once() -> None:
    """Reserving an owner's own port again does not leave it held after release."""
    ports = PortAllocator(probe=lambda: 8000)
    ports.reserve("web.1", 8000)
    ports.reserve("web.1", 8000)
    ports.release("web.1")
    assert ports.allocate("web.2") == 8000


@pytest.mark.parametrize("port", [0, -1, 65536, 100_000])
def test_reserve_rejects_impossible_ports(port: int) -> None:
    """A number that is not a TCP port cannot be reserved."""
    ports = PortAllocator(probe=lambda: 5001)
    with pytest.raises(ValueError, match="not a TCP port"):
        ports.reserve("web.1", port)
    assert ports.port_of("web.1") is None


def test_release_frees_the_port() -> None:
    """A released port can be handed to another owner, and its old owner has none."""
    probe, _ = scripted([5001, 5001])
    ports = PortAllocator(probe=probe)
    assert ports.allocate("web.1") == 5001
    ports.release("web.1")
    assert ports.port_of("web.1") is None
    assert ports.allocate("web.2") == 5001


def test_release_of_an_owner_without_port_does_nothing() -> None:
    """Releasing an owner that holds nothing is harmless."""
    ports = PortAllocator(probe=lambda: 5001)
    ports.release("web.1")
    assert ports.allocate("web.1") == 5001


def test_gives_up_after_the_tries() -> None:
    """When every probe returns a held port, allocate raises PortsExhausted after MAX_TRIES."""
    probe, returned = scripted([5001] * (MAX_TRIES + 10))
    ports = PortAllocator(probe=probe)
    assert ports.allocate("web.1") == 5001
    with pytest.raises(PortsExhausted, match=f"the {MAX_TRIES} ports tried"):
        ports.allocate("web.2")
    assert len(returned) == 1 + MAX_TRIES
    assert ports.port_of("web.2") is None


def test_tries_can_be_set() -> None:
    """The number of tries is a constructor argument."""
    probe, returned = scripted([5001] * 10)
    ports = PortAllocator(probe=probe, tries=3)
    ports.reserve("custom.1", 5001)
    with pytest.raises(PortsExhausted):
        ports.allocate("web.1")
    assert len(returned) == 3


def test_probe_errors_become_ports_exhausted() -> None:
    """An OSError from the probe (out of file descriptors) is a PortsExhausted naming it."""
    def probe() -> int:
        raise OSError(24, "Too many open files")

    with pytest.raises(PortsExhausted, match="Too many open files"):
        PortAllocator(probe=probe).allocate("web.1")


def test_ports_exhausted_is_an_agent_error() -> None:
    """PortsExhausted is an AgentError, so the server maps it like the others."""
    assert issubclass(PortsExhausted, AgentError)
