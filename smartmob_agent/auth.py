"""Who may do what: access keys, their scopes, and the slowing down of guessers: pure.

Three kinds of keys open the API (see :doc:`security`):

- *admin* keys (``--token``, ``--token-file``) may do everything;
- *app* keys (``--app-token APP=KEY``, ``--app-tokens-file``) see and act on the
  processes of one app only;
- *minted* keys, made by the agent when a create request asks for ``issue_token``, are
  app keys that no peer has: the agent keeps only their SHA-256.

Every key is kept as its SHA-256 digest. A presented key is hashed, and the digest is
compared with every configured key's digest in constant time (:func:`hmac.compare_digest`,
all of them, no early exit), so response times say nothing about how much of a key was
right. Minted keys are looked up by digest in a table: what a lookup's timing could
reveal is the digest of a guess, which does not help find a key of 256 random bits.
A plain SHA-256 is enough (no slow password hash) because keys are random, not chosen
by people: there is nothing to brute-force from a digest.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from smartmob_agent.errors import InvalidRequest
from smartmob_agent.schemas import APP_PATTERN, MAX_NAME

#: What a minted key starts with, so that a leaked one is recognisable (secret scanners).
MINTED_PREFIX = "smk_"
#: Shortest key accepted from the configuration: a short key could be guessed.
MIN_KEY_LENGTH = 16


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: the admin (``app`` is ``None``) or one app's key."""

    app: str | None = None
    #: the id of the minted key used, if it was one
    key_id: str | None = None

    @property
    def is_admin(self) -> bool:
        """Whether this principal may do everything."""
        return self.app is None

    def may_see(self, app: str) -> bool:
        """Whether processes of ``app`` exist for this principal."""
        return self.app is None or self.app == app


#: Stands for "everything is allowed" when the agent has no keys configured.
ADMIN = Principal()


def digest(key: str) -> bytes:
    """The SHA-256 of a key, as kept and compared."""
    return hashlib.sha256(key.encode()).digest()


def mint_key() -> tuple[str, str]:
    """A new random key and its id: ``(id, key)``; the id is public, the key secret."""
    return secrets.token_hex(8), MINTED_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class MintedKey:
    """A key the agent made for one app: its public id, app, digest and creation time."""

    id: str
    app: str
    digest: bytes
    created_at: float


class Keyring:
    """Every key the agent accepts, and whom each stands for.

    Args:
        admin: the admin keys.
        apps: app keys, as ``{key: app}``.
        minted: keys the agent minted earlier (from its database).

    With no admin and no app key, access control is off: every request is the admin's
    (the agent then listens on loopback only, unless started with ``--insecure``).
    """

    def __init__(
        self,
        admin: Iterable[str] = (),
        apps: Mapping[str, str] | None = None,
        minted: Iterable[MintedKey] = (),
    ) -> None:
        self._configured: list[tuple[bytes, Principal]] = [
            (digest(key), ADMIN) for key in admin
        ] + [(digest(key), Principal(app)) for key, app in (apps or {}).items()]
        self._minted: dict[bytes, MintedKey] = {key.digest: key for key in minted}

    @property
    def enabled(self) -> bool:
        """Whether requests need a key (some admin or app key is configured)."""
        return bool(self._configured)

    def identify(self, presented: str) -> Principal | None:
        """Whom ``presented`` stands for, or ``None`` if it is no key of this ring."""
        presented_digest = digest(presented)
        found: Principal | None = None
        for key_digest, principal in self._configured:
            # compare with every key, no early exit: the time taken is the same
            if hmac.compare_digest(presented_digest, key_digest) and found is None:
                found = principal
        if found is not None:
            return found
        minted = self._minted.get(presented_digest)
        if minted is not None:
            return Principal(minted.app, minted.id)
        return None

    def add_minted(self, key: MintedKey) -> None:
        """Accept a newly minted key."""
        self._minted[key.digest] = key

    def remove_minted(self, key_id: str) -> MintedKey | None:
        """Stop accepting the minted key ``key_id``; return it, or ``None`` if unknown."""
        for key_digest, key in self._minted.items():
            if key.id == key_id:
                del self._minted[key_digest]
                return key
        return None

    def minted(self) -> list[MintedKey]:
        """The minted keys, oldest first."""
        return sorted(self._minted.values(), key=lambda key: key.created_at)


def parse_key_lines(
    text: str, source: str, *, scoped: bool
) -> list[tuple[str | None, str]]:
    r"""The keys of a key file: one per line, ``KEY`` (admin keys) or ``APP=KEY`` (app
    keys, when ``scoped``); blank lines and ``#`` comments are skipped.

    Raises:
        InvalidRequest: for a bad line, named by its number (never its content: it may
            hold a key).

    >>> from smartmob_agent.auth import parse_key_lines
    >>> parse_key_lines("# ci\nweb=0123456789abcdef0123\n", "keys", scoped=True)
    [('web', '0123456789abcdef0123')]
    """
    keys: list[tuple[str | None, str]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            keys.append(split_app_key(line) if scoped else (None, check_key(line)))
        except ValueError as error:
            raise InvalidRequest(f"{source} line {number}: {error}") from None
    return keys


def check_key(key: str) -> str:
    """Return ``key`` if it is usable as a configured key.

    Raises:
        ValueError: it is too short, or holds spaces or unprintable characters (the
            message never repeats it).
    """
    if len(key) < MIN_KEY_LENGTH or any(c.isspace() or not c.isprintable() for c in key):
        raise ValueError(
            f"a key must be at least {MIN_KEY_LENGTH} printable characters without spaces "
            "(e.g. from `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
        )
    return key


def split_app_key(text: str) -> tuple[str, str]:
    """``APP=KEY`` as ``(app, key)``.

    Raises:
        ValueError: not of that form, or a bad app name or key.
    """
    app, equals, key = text.partition("=")
    if not equals or len(app) > MAX_NAME or not re.fullmatch(APP_PATTERN, app):
        raise ValueError("must be APP=KEY, APP being an app name")
    return app, check_key(key)


def bearer_key(authorization: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header, or ``None``.

    >>> from smartmob_agent.auth import bearer_key
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

    Only a parameter spelled exactly ``token=`` counts, not an escaped ``%74oken=``: the
    filter that hides keys in log lines looks for the plain spelling.

    >>> from smartmob_agent.auth import query_key
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


def browser_problem(host: str | None, origin: str | None, listen_host: str) -> str | None:
    """Why an agent without keys must refuse this request as a browser's, or ``None``.

    Without keys, the only lock is that the agent listens on loopback. A web page the
    user visits can still reach it: by a cross-origin request (a "simple" POST needs no
    preflight, and the agent reads JSON whatever the content type), or through DNS
    rebinding (a name of the page's that now resolves to 127.0.0.1, whose answers the
    page may read). So: a request from another origin is refused, and the ``Host`` must
    be an IP address, ``localhost`` or the address the agent was told to listen on.

    >>> from smartmob_agent.auth import browser_problem
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
            if name not in {"localhost", listen_host.lower()}:
                return (
                    f"the Host {name!r} is not an IP address, localhost or --host: an agent "
                    "without keys answers no other name (a web page could reach it by "
                    "DNS rebinding); give it keys to use names"
                )
    if origin is not None and (not host or origin.split("://", 1)[-1].lower() != host.lower()):
        return (
            "a request from a web page of another origin is refused by an agent without "
            "keys (any page the user visits could otherwise run commands); give it keys"
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

        >>> from smartmob_agent.auth import FailureLimiter
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
