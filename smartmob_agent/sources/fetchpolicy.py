"""Which source URLs the agent fetches, and which addresses it connects to for them: pure.

A source URL is fetched when:

* its scheme is ``http`` or ``https``; ``file`` only when the agent was given a folder of
  file sources (``--allow-file-sources``), and then only for a file under that folder,
  named without ``..`` (a redirect never leads to a ``file`` URL);
* when an allow-list of hosts is given (``--source-allow``), its host is on it: a name
  (``example.com``), every name under a domain (``*.example.com``), or an address or a
  network (``10.0.0.5``, ``10.0.0.0/8``, ``fd00::/8``) matching a host written as an
  address;
* its host is not an address the agent refuses by default: link-local addresses
  (``169.254.0.0/16``, ``fe80::/10``: cloud metadata services answer at
  ``169.254.169.254``) and the other known metadata addresses (``fd00:ec2::254``,
  ``100.100.100.200``), also when written as an IPv4-mapped, NAT64 or 6to4 IPv6 address;
  an address of an allow-list network lifts the refusal for it. Legacy spellings of IPv4
  addresses (``2852039166``, ``0xa9fea9fe``, ``169.254.43518``) are refused too, since
  resolvers turn them into any address.

:meth:`FetchPolicy.check_url` decides from the URL alone; the address a host name
resolves to is checked by :meth:`FetchPolicy.check_address` when the connection is made
(see :class:`smartmob_agent.sources.download.GuardedResolver`). Loopback and private addresses
are allowed: the agent fetches from its own machine and from internal servers.

>>> policy = FetchPolicy()
>>> policy.check_url("https://example.com/app.tar.gz") is None
True
>>> policy.check_url("http://169.254.169.254/latest/meta-data/")
'169.254.169.254 is a link-local address, where cloud metadata services answer'
>>> FetchPolicy(allow=("*.example.com",)).check_url("https://evil.test/a.tgz")
"the host 'evil.test' is not on the allow-list of source hosts (--source-allow)"
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from urllib.parse import unquote_to_bytes

from yarl import URL

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_LINK_LOCAL = "a link-local address, where cloud metadata services answer"
#: The addresses refused by default, and why (the first match names the reason).
REFUSED: tuple[tuple[Network, str], ...] = (
    (ipaddress.ip_network("169.254.0.0/16"), _LINK_LOCAL),
    (ipaddress.ip_network("fe80::/10"), "a link-local address"),
    (ipaddress.ip_network("fd00:ec2::254/128"), "the address of a cloud metadata service"),
    (ipaddress.ip_network("100.100.100.200/32"), "the address of a cloud metadata service"),
)
#: NAT64's well-known prefix: an IPv4 address in the last 32 bits (RFC 6052).
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
#: A host made of numbers and dots only, or hexadecimal ones: a legacy IPv4 spelling.
_NUMERIC_HOST = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]*))*$", re.IGNORECASE)
#: A host name as the allow-list takes it (lowercase ASCII, IDNA-encoded).
_NAME = re.compile(r"^(\*\.)?[a-z0-9_-]+(\.[a-z0-9_-]+)*$")
_SCHEMES = ("http", "https")


def parse_allow_entry(text: str) -> str:
    """Check one ``--source-allow`` entry and return it normalised (lowercase, no trailing
    dot, IDNA-encoded); an address or network is returned in its canonical form.

    >>> parse_allow_entry("Example.COM.")
    'example.com'
    >>> parse_allow_entry("10.1.0.0/16")
    '10.1.0.0/16'

    Raises:
        ValueError: the entry is none of a host name, ``*.`` and a domain, an address or
            a network.
    """
    entry = text.strip().lower().rstrip(".")
    if entry.startswith("[") and entry.endswith("]"):
        entry = entry[1:-1]
    try:
        return str(ipaddress.ip_network(entry, strict=False))
    except ValueError:
        pass
    try:
        encoded = entry.encode("idna").decode("ascii")
    except UnicodeError:
        encoded = ""
    if (not encoded or not _NAME.match(encoded) or len(encoded) > 253
            or _NUMERIC_HOST.match(encoded.removeprefix("*."))):
        raise ValueError(
            "must be a host name (example.com), '*.' and a domain (*.example.com), an "
            "address (10.0.0.5) or a network (10.0.0.0/8)"
        )
    return encoded


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, NAT64, 6to4), if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(address.packed[-4:])
    return address.sixtofour


@dataclass(frozen=True)
class FetchPolicy:
    """The rules of which source URLs may be fetched.

    Args:
        allow: the allow-list of hosts (see :func:`parse_allow_entry`); empty: any host.
        file_root: the absolute folder ``file://`` URLs may read from; ``None``: no
            ``file://`` URL is fetched.
    """

    allow: tuple[str, ...] = ()
    file_root: PurePosixPath | None = None
    _names: frozenset[str] = field(init=False, repr=False, compare=False)
    _domains: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _networks: tuple[Network, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        entries = [parse_allow_entry(entry) for entry in self.allow]
        networks: list[Network] = []
        names: set[str] = set()
        domains: list[str] = []
        for entry in entries:
            try:
                networks.append(ipaddress.ip_network(entry))
            except ValueError:
                if entry.startswith("*."):
                    domains.append(entry[1:])  # ".example.com"
                else:
                    names.add(entry)
        object.__setattr__(self, "_names", frozenset(names))
        object.__setattr__(self, "_domains", tuple(domains))
        object.__setattr__(self, "_networks", tuple(networks))
        if self.file_root is not None and not self.file_root.is_absolute():
            raise ValueError("the folder of file sources must be an absolute path")

    def check_address(self, address: str) -> str | None:
        """Why the agent must not connect to ``address`` (an IP address), or ``None``.

        >>> FetchPolicy().check_address("::ffff:169.254.169.254")[:42]
        '::ffff:a9fe:a9fe (that is 169.254.169.254)'
        >>> FetchPolicy().check_address("127.0.0.1") is None
        True
        """
        try:
            parsed: Address = ipaddress.ip_address(address)
        except ValueError:
            return f"{address!r} is not an IP address"
        candidates: list[Address] = [parsed]
        if isinstance(parsed, ipaddress.IPv6Address):
            parsed = ipaddress.IPv6Address(parsed.packed)  # without a scope (fe80::1%eth0)
            candidates = [parsed]
            embedded = _embedded_ipv4(parsed)
            if embedded is not None:
                candidates.append(embedded)
        if any(candidate in network for candidate in candidates for network in self._networks
               if network.version == candidate.version):
            return None  # explicitly allowed
        for candidate in candidates:
            for network, why in REFUSED:
                if candidate.version == network.version and candidate in network:
                    if candidate is not parsed:
                        return f"{parsed} (that is {candidate}) is {why}"
                    return f"{parsed} is {why}"
        return None

    def check_url(self, url: str, *, redirect: bool = False) -> str | None:
        """Why the agent must not fetch ``url``, or ``None`` if it may (as far as the URL
        alone says: a host name is checked again once resolved).

        ``redirect``: the URL is where a server redirected to; a ``file`` URL is then
        refused whatever the policy.
        """
        try:
            parsed = URL(url)
        except (ValueError, TypeError):
            return "the URL is not valid"
        scheme = parsed.scheme.lower()
        if scheme == "file":
            if redirect:
                return "a redirect to a file:// URL is never followed"
            return self._file_problem(parsed)[0]
        if scheme not in _SCHEMES:
            shown = f"{scheme}://" if scheme else "a URL without a scheme"
            return f"{shown} is not allowed: only http:// and https:// URLs are fetched"
        host = (parsed.raw_host or "").lower().rstrip(".")
        if not host:
            return "the URL is not valid: it names no host"
        address = _address(parsed)
        if address is None and _NUMERIC_HOST.match(host):
            return f"the host {host!r} is not written as an IP address should be"
        if self.allow and not self._allowed(host, address):
            return f"the host {host!r} is not on the allow-list of source hosts (--source-allow)"
        if address is not None:
            return self.check_address(address)
        return None

    def _allowed(self, host: str, address: str | None) -> bool:
        if address is not None:
            parsed = ipaddress.ip_address(address.partition("%")[0])
            return any(parsed in network for network in self._networks
                       if network.version == parsed.version)
        return host in self._names or any(host.endswith(domain) for domain in self._domains)

    def file_parts(self, url: str) -> tuple[str, ...]:
        """The path of the file a ``file://`` URL names, as components under
        :attr:`file_root` (each one a name, never ``..``).

        Raises:
            ValueError: the URL may not be read (the message says why).
        """
        problem, parts = self._file_problem(URL(url))
        if problem is not None:
            raise ValueError(problem)
        return parts

    def _file_problem(self, url: URL) -> tuple[str | None, tuple[str, ...]]:
        root = self.file_root
        if root is None:
            return (
                "file:// URLs are not allowed (the agent reads local files only with "
                "--allow-file-sources)", (),
            )
        if (url.raw_host or "").lower() not in ("", "localhost"):
            return "a file:// URL names no host: file:///path/to/archive", ()
        if url.raw_query_string or url.raw_fragment:
            return "a file:// URL has no query or fragment", ()
        parts: list[str] = []
        for raw in url.raw_path.split("/"):
            if not raw:
                continue
            data = unquote_to_bytes(raw)
            if data in (b".", b"..") or b"/" in data or b"\x00" in data:
                return "a file:// URL must name a path without '.', '..', or encoded '/' or NUL", ()
            parts.append(data.decode("utf-8", "surrogateescape"))
        root_parts = root.parts[1:]
        if tuple(parts[:len(root_parts)]) != root_parts or len(parts) == len(root_parts):
            return f"a file:// URL must name a file under {root} (--allow-file-sources)", ()
        return None, tuple(parts[len(root_parts):])


def _address(url: URL) -> str | None:
    """The host of ``url`` if it is an IP address (an IPv6 one maybe with a scope)."""
    host = url.host or ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return host
