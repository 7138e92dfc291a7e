"""What the HTTP layer checks before a handler runs: keys in requests, the browser guard
against cross-site requests and DNS rebinding, and the slowing down of guessers: pure.

The keys themselves and their scopes are :mod:`smartmob_agent.keys`.
"""

from __future__ import annotations

import ipaddress
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Iterable


def bearer_key(authorization: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header, or ``None``.

    >>> from smartmob_agent.web.access import bearer_key
    >>> bearer_key("Bearer abc"), bearer_key("bearer  abc "), bearer_key("Basic abc")
    ('abc', 'abc', None)
    """
    if not authorization:
        return None
    scheme, _, key = authorization.strip().partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        return None
    return key


def query_key(raw_query: str) -> str | None:
    """The key of a raw (still percent-encoded) query string's ``token`` parameter.

    Only a parameter spelled exactly ``token=`` counts, not an escaped ``%74oken=`` nor
    ``TOKEN=``: one spelling, documented. (Log lines hide every credential-like
    parameter however it is spelled: :mod:`smartmob_agent.output.redact`.)

    >>> from smartmob_agent.web.access import query_key
    >>> query_key("app=a&token=abc%2Bd"), query_key("%74oken=abc&xtoken=1")
    ('abc+d', None)
    """
    for part in raw_query.split("&"):
        name, _, value = part.partition("=")
        if name == "token":
            return urllib.parse.unquote(value) or None
    return None


def _hostname(authority: str) -> str:
    """The host of a ``host[:port]`` (brackets of an IPv6 address removed), lowercase."""
    authority = authority.strip().lower()
    if authority.startswith("["):
        return authority[1:].split("]", 1)[0]
    if authority.count(":") == 1:
        return authority.split(":", 1)[0]
    return authority


def host_allowed(name: str, allowed: Iterable[str]) -> bool:
    """Whether the host ``name`` is one of ``allowed`` (``--allow-host``): the same name,
    or a name under the domain of a ``*.domain`` entry (not the domain itself).

    >>> from smartmob_agent.web.access import host_allowed
    >>> host_allowed("smartmob-agent", ["smartmob-agent"])
    True
    >>> [host_allowed(n, ["*.example.org"]) for n in ("a.example.org", "a.b.example.org",
    ...                                             "example.org", "evil-example.org")]
    [True, True, False, False]
    """
    for entry in allowed:
        if entry.startswith("*."):
            if name.endswith(entry[1:]) and len(name) > len(entry) - 1:
                return True
        elif name == entry:
            return True
    return False


def browser_problem(
    host: str | None, origin: str | None, listen_host: str, allowed: Iterable[str] = ()
) -> str | None:
    """Why an agent without keys must refuse this request as a browser's, or ``None``.

    Without keys, the only lock is that the agent listens on loopback. A web page the
    user visits can still reach it: by a cross-origin request (a "simple" POST needs no
    preflight, and the agent reads JSON whatever the content type), or through DNS
    rebinding (a name of the page's that now resolves to 127.0.0.1, whose answers the
    page may read). So: a request from another origin is refused, and the ``Host`` must
    be an IP address, ``localhost``, the address the agent was told to listen on, or a
    name given with ``--allow-host`` (``allowed``: a service name behind docker-compose,
    Kubernetes or a reverse proxy).

    >>> from smartmob_agent.web.access import browser_problem
    >>> browser_problem("127.0.0.1:8080", None, "127.0.0.1") is None
    True
    >>> browser_problem("evil.example:8080", None, "127.0.0.1")[:40]
    "the Host 'evil.example' is not an IP add"
    >>> browser_problem("127.0.0.1:8080", "http://evil.example", "127.0.0.1")[:36]
    'a request from a web page of another'
    """
    if host:
        name = _hostname(host)
        try:
            ipaddress.ip_address(name)
        except ValueError:
            if name not in {"localhost", listen_host.lower()} and not host_allowed(
                name, allowed
            ):
                return (
                    f"the Host {name!r} is not an IP address, localhost, --host or an "
                    "--allow-host name: an agent without keys answers no other name (a web "
                    f"page could reach it by DNS rebinding); start it with --allow-host "
                    f"{name} to answer this name, or give it keys"
                )
    if origin is not None and (not host or origin.split("://", 1)[-1].lower() != host.lower()):
        return (
            "a request from a web page of another origin is refused by an agent without "
            "keys (any page the user visits could otherwise run commands); give it keys"
        )
    return None


#: The default port of each scheme an origin may have (left out of a normal origin).
_DEFAULT_PORTS = {"http": 80, "https": 443}


def normal_origin(text: str) -> str | None:
    """The origin ``text`` names, written one way (``scheme://host[:port]``, lowercase,
    the scheme's default port left out), or ``None`` if it is not an http(s) origin.

    A path of ``/`` is tolerated (a URL copied from the address bar); any other path, a
    query, a fragment or a user name is not an origin.

    >>> from smartmob_agent.web.access import normal_origin
    >>> normal_origin("HTTPS://Dash.Example.org:443/"), normal_origin("http://[::1]:8000")
    ('https://dash.example.org', 'http://[::1]:8000')
    >>> normal_origin("http://a.example/ui/"), normal_origin("null"), normal_origin("*")
    (None, None, None)
    """
    try:
        parts = urllib.parse.urlsplit(text.strip())
        port = parts.port
    except ValueError:  # a port that is not a number, or out of range
        return None
    scheme, host = parts.scheme.lower(), parts.hostname
    if (scheme not in _DEFAULT_PORTS or not host or parts.username is not None
            or parts.path not in {"", "/"} or parts.query or parts.fragment
            or "#" in text or "?" in text):
        return None
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}" + ("" if port in {None, _DEFAULT_PORTS[scheme]} else f":{port}")


def cors_problem(origin: str, allowed: Iterable[str], has_keys: bool) -> str | None:
    """Why a request from a page of ``origin`` gets no CORS answer, or ``None``.

    Only an agent with keys answers other origins, and only those of ``allowed``
    (``--allow-origin``, normal origins): a keyless agent has no lock but its loopback
    address, which a page that a browser may read answers from would open.

    >>> from smartmob_agent.web.access import cors_problem
    >>> cors_problem("http://dash.example:8000", ["http://dash.example:8000"], True) is None
    True
    >>> cors_problem("http://evil.example", ["http://dash.example:8000"], True)[:42]
    "the origin 'http://evil.example' is not an"
    """
    if not has_keys:
        return (
            "an agent without keys answers no request from a page of another origin, "
            "--allow-origin or not (any page the user visits could run commands): give it "
            "keys"
        )
    normal = normal_origin(origin)
    if normal is None or normal not in allowed:
        return (
            f"the origin {origin[:100]!r} is not an --allow-origin of this agent, so its "
            "pages may not call it"
        )
    return None


class FailureLimiter:
    """Slows down an address that keeps presenting wrong keys.

    Each address may fail ``burst`` times; a failure costs one token of its bucket, and
    the bucket refills at one token per ``refill`` seconds. An address with an empty
    bucket is refused without its key being checked until a token comes back. At most
    ``max_addresses`` buckets are kept (the least recently failing are forgotten), so
    failures from many addresses cannot grow the agent. IPv6 addresses count by /64.
    """

    def __init__(
        self,
        burst: int = 10,
        refill: float = 6.0,
        max_addresses: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._burst = burst
        self._refill = refill
        self._max = max_addresses
        self._clock = clock
        #: address -> (tokens left, when they were counted)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    @staticmethod
    def bucket(address: str) -> str:
        """The bucket an address counts in: itself, or for IPv6 its /64 network, since
        one client usually holds a whole /64 and could try from a new address each time.

        >>> from smartmob_agent.web.access import FailureLimiter
        >>> FailureLimiter.bucket("2001:db8::1"), FailureLimiter.bucket("192.0.2.7")
        ('2001:db8::/64', '192.0.2.7')
        """
        try:
            parsed = ipaddress.ip_address(address)
        except ValueError:
            return address
        if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is None:
            return str(ipaddress.ip_network(f"{parsed}/64", strict=False))
        return address

    def _tokens(self, address: str) -> float:
        entry = self._buckets.get(address)
        if entry is None:
            return float(self._burst)
        tokens, counted = entry
        return min(float(self._burst), tokens + (self._clock() - counted) / self._refill)

    def retry_after(self, address: str) -> float:
        """Seconds until ``address`` may try again; ``0`` if it may now."""
        tokens = self._tokens(self.bucket(address))
        return 0.0 if tokens >= 1 else (1 - tokens) * self._refill

    def failed(self, address: str) -> None:
        """Count one wrong key from ``address``."""
        address = self.bucket(address)
        tokens = max(0.0, self._tokens(address) - 1)
        self._buckets[address] = (tokens, self._clock())
        self._buckets.move_to_end(address)
        while len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
