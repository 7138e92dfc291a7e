"""The agent's access keys: those the settings give, and those minted through the API.

The keys of the settings come from flags, variables and key files (read once, at start);
minted keys are kept in the state database, by digest only, so that they survive a
restart and a revoked one never comes back. Checking a key is the keyring's business
(:class:`~smartmob_agent.keys.Keyring`).
"""

from __future__ import annotations

import time

from smartmob_agent.config import Settings
from smartmob_agent.errors import InvalidRequest, NotFound
from smartmob_agent.keys import Keyring, MintedKey, digest, mint_key, parse_key_lines
from smartmob_agent.store import Store


def configured_keys(settings: Settings) -> tuple[list[str], dict[str, str]]:
    """The admin keys and the app keys (``{key: app}``) the settings give, key files
    included.

    Raises:
        InvalidRequest: a key file cannot be read or holds a bad line.
    """
    admin = list(settings.token)
    apps = {key: app for app, key in settings.app_token}
    for path, scoped in ((settings.token_file, False), (settings.app_tokens_file, True)):
        if path is None:
            continue
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as error:
            raise InvalidRequest(f"cannot read the key file {path}: {error}") from None
        for app, key in parse_key_lines(text, str(path), scoped=scoped):
            if app is None:
                admin.append(key)
            else:
                apps[key] = app
    return admin, apps


def mint(store: Store, keyring: Keyring, app: str) -> tuple[MintedKey, str]:
    """Make a new key scoped to ``app``, keep it in ``store`` and open ``keyring`` to it;
    return it with its secret, which is kept nowhere (the database holds its digest).

    Raises:
        StoreError: the database cannot be written; the key is not usable.
    """
    key_id, secret = mint_key()
    key = MintedKey(key_id, app, digest(secret), time.time())
    store.add_key(key)  # before it is usable: a key never outlives a crash unsaved
    keyring.add_minted(key)
    return key, secret


def revoke(store: Store, keyring: Keyring, key_id: str) -> None:
    """Stop accepting the minted key ``key_id``, for good.

    Raises:
        NotFound: no minted key has that id.
        StoreError: the database cannot be written; the key still opens the API.
    """
    if not any(key.id == key_id for key in keyring.minted()):
        raise NotFound(f"there is no minted key with id {key_id!r}")
    store.remove_key(key_id)
    keyring.remove_minted(key_id)
