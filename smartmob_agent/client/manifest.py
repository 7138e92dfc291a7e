"""``smartmob.toml``: the fleet an operator wants, read from its text.

Pure: :func:`parse_manifest` turns the file's text into a :class:`Manifest` (or a
:class:`ManifestError` whose sentence names the app and the key at fault); reading the
file is the caller's. The format::

    [apps.shop]
    source = "./shop"               # a folder (relative to the file) or an archive's URL
    checksum = "sha256:..."         # optional, for a URL
    agents = ["a", "b"]             # optional: names of the config file, or URLs
    env = { GREETING = "hi" }       # every node's environment
    options = { stop_timeout = 5 }  # every node's supervision options
    health = { http = "/health" }   # the same as options.health
    socket = true                   # the same as options.socket

    [apps.shop.formation]
    web = 2                                       # a count,
    worker = { count = 1, env = { QUEUE = "a" } } # or a count with the type's own
                                                  # env, options, health and socket
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from smartmob_agent.client.formation import MAX_COUNT

_APP = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")
_TYPE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}")
_CHECKSUM = re.compile(r"sha256:[0-9a-fA-F]{64}")
#: The keys of an app's table, and of a type's table in its formation.
APP_KEYS = ("source", "checksum", "agents", "env", "options", "health", "socket",
            "formation")
TYPE_KEYS = ("count", "env", "options", "health", "socket")


class ManifestError(ValueError):
    """A ``smartmob.toml`` that cannot be applied: one sentence on what and where."""


@dataclass(frozen=True)
class ProcessSpec:
    """One process type of an app: how many nodes, and what each gets."""

    process_type: str
    count: int
    #: The environment of each node (the app's, with the type's on top).
    env: Mapping[str, str] = field(default_factory=dict)
    #: The supervision options of each node, as a create request spells them.
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AppSpec:
    """One app of the file."""

    name: str
    #: A folder (as written: relative to the file) or an archive's URL; ``None`` only
    #: for an app whose formation is empty (all its nodes to go).
    source: str | None
    checksum: str | None
    #: The agents that run it (config names or URLs); empty: the command's agents.
    agents: tuple[str, ...]
    types: tuple[ProcessSpec, ...]

    @property
    def is_url(self) -> bool:
        """Whether the source is an archive's URL (else a folder)."""
        return self.source is not None and "://" in self.source


@dataclass(frozen=True)
class Manifest:
    """Every app of a ``smartmob.toml``, in the file's order."""

    apps: tuple[AppSpec, ...]
    #: Where it was read from (for messages and relative folders).
    source: str = "smartmob.toml"

    def app(self, name: str) -> AppSpec | None:
        """The app called ``name``, if the file has it."""
        return next((app for app in self.apps if app.name == name), None)


def parse_manifest(text: str, source: str = "smartmob.toml") -> Manifest:
    """Read a ``smartmob.toml``.

    >>> from smartmob_agent.client.manifest import ManifestError, parse_manifest
    >>> manifest = parse_manifest('''
    ... [apps.shop]
    ... source = "./shop"
    ... env = { A = "1" }
    ... health = { http = "/" }
    ... [apps.shop.formation]
    ... web = 2
    ... worker = { count = 1, env = { B = "2" }, health = false }
    ... ''')
    >>> [(t.process_type, t.count, dict(t.env), dict(t.options))
    ...  for t in manifest.apps[0].types]
    [('web', 2, {'A': '1'}, {'health': {'http': '/'}}), ('worker', 1, {'A': '1', 'B': '2'}, {})]
    >>> try:
    ...     parse_manifest('[apps.a]\\nsource = "x"\\nformation = { web = "two" }', "f")
    ... except ManifestError as error:
    ...     print(error)
    f: app 'a': formation.web must be a count from 0 to 100, or a table with a count
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ManifestError(f"{source} is not valid TOML: {error}") from None
    unknown = sorted(set(document) - {"apps"})
    if unknown:
        raise ManifestError(f"{source}: unknown key {unknown[0]!r} (the file has one "
                            "table, [apps.NAME], per app)")
    apps = document.get("apps", {})
    if not isinstance(apps, dict) or not apps:
        raise ManifestError(f"{source} names no app: add an [apps.NAME] table")
    return Manifest(tuple(_app(name, entry, source) for name, entry in apps.items()),
                    source)


def _app(name: str, entry: Any, source: str) -> AppSpec:
    where = f"{source}: app {name!r}"
    if not _APP.fullmatch(name):
        raise ManifestError(f"{where}: an app's name is 1 to 64 letters, digits, '_' or "
                            "'-', not starting with '-'")
    if not isinstance(entry, dict):
        raise ManifestError(f"{where} must be a table")
    _known(entry, APP_KEYS, where)
    formation = entry.get("formation", {})
    if not isinstance(formation, dict):
        raise ManifestError(f"{where}: formation must be a table such as {{ web = 2 }}")
    env = _env(entry.get("env", {}), where, "env")
    options = _options(entry, where, "")
    types = tuple(_type(kind, value, env, options, where) for kind, value in formation.items())
    app_source, checksum = entry.get("source"), entry.get("checksum")
    if app_source is not None and (not isinstance(app_source, str) or not app_source):
        raise ManifestError(f"{where}: source must be a folder or an archive's URL")
    if app_source is None and any(t.count for t in types):
        raise ManifestError(f"{where} needs a source: a folder or an archive's URL")
    if checksum is not None and (not isinstance(checksum, str)
                                 or not _CHECKSUM.fullmatch(checksum)):
        raise ManifestError(f"{where}: checksum must be 'sha256:' and 64 hexadecimal digits")
    if checksum is not None and (app_source is None or "://" not in app_source):
        raise ManifestError(f"{where}: a checksum goes with a URL source (a folder's is "
                            "computed)")
    agents = entry.get("agents", [])
    if not isinstance(agents, list) or not all(isinstance(a, str) and a for a in agents):
        raise ManifestError(f"{where}: agents must be a list of agent names or URLs")
    return AppSpec(name, app_source, checksum, tuple(dict.fromkeys(agents)), types)


def _type(kind: str, value: Any, env: Mapping[str, str], options: Mapping[str, Any],
          where: str) -> ProcessSpec:
    rule = (f"{where}: formation.{kind} must be a count from 0 to {MAX_COUNT}, or a table "
            "with a count")
    if not _TYPE.fullmatch(kind):
        raise ManifestError(f"{where}: formation.{kind}: a process type is 1 to 64 "
                            "letters, digits, '_' or '-'")
    table = value if isinstance(value, dict) else {"count": value}
    _known(table, TYPE_KEYS, f"{where}: formation.{kind}")
    count = table.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= MAX_COUNT:
        raise ManifestError(rule)
    own_env = _env(table.get("env", {}), where, f"formation.{kind}.env")
    own = _options(table, where, f"formation.{kind}.")
    merged = {**options, **own}
    return ProcessSpec(kind, count, {**env, **own_env},
                       {key: value for key, value in merged.items() if value is not False
                        or key not in {"health", "socket"}})


def _known(table: Mapping[str, Any], keys: tuple[str, ...], where: str) -> None:
    unknown = [key for key in table if key not in keys]
    if unknown:
        raise ManifestError(f"{where}: unknown key {unknown[0]!r} (known: "
                            f"{', '.join(keys)})")


def _env(value: Any, where: str, key: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ManifestError(f"{where}: {key} must be a table of NAME = \"value\"")
    for name, text in value.items():
        if not _ENV_NAME.fullmatch(name) or not isinstance(text, str):
            raise ManifestError(f"{where}: {key}.{name} must be a string, and its name "
                                "letters, digits and '_', not starting with a digit")
    return dict(value)


def _options(table: Mapping[str, Any], where: str, prefix: str) -> dict[str, Any]:
    """A table's ``options``, with its ``health`` and ``socket`` shortcuts on top
    (``false`` for either: none, overriding the app's)."""
    options = table.get("options", {})
    if not isinstance(options, dict):
        raise ManifestError(f"{where}: {prefix}options must be a table of supervision "
                            "options (restart, stop_timeout, ...)")
    options = dict(options)
    for key in ("health", "socket"):
        if key in table:
            options[key] = table[key]
    return options
