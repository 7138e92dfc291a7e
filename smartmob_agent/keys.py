"""Who may do what: access keys and their scopes: pure.

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
import re
import secrets
from collections.abc import Iterable, Mapping
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

    >>> from smartmob_agent.keys import parse_key_lines
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
