"""Which agents a ``smartmob`` command talks to, and with which keys.

Agents come from three places, the first that says something winning:

1. ``--agent URL`` or ``--agent NAME`` (repeatable), or ``--all`` (every agent of the
   config file);
2. the environment: ``SMARTMOB_URL`` (one agent) and ``SMARTMOB_TOKEN`` (its key);
3. the config file, ``~/.config/smartmob/agents.toml`` (``$XDG_CONFIG_HOME`` or
   ``$SMARTMOB_CONFIG`` move it): named agents, each with a URL and a token or token
   file, and which one is the default.

Without any, the agent of this machine: ``http://127.0.0.1:8080``, the agent's own
default. The parsing is pure; only :func:`load_config` and :func:`read_token_file` read
files.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

#: The agent a command talks to when nothing says otherwise: the agent's own default.
LOCAL_AGENT = "http://127.0.0.1:8080"


class UsageError(Exception):
    """A wrong command line, environment or config file (exit status 2)."""


@dataclass(frozen=True)
class Target:
    """One agent to talk to."""

    #: What the output calls it: its name in the config file, or its URL.
    name: str
    url: str
    token: str | None = None


@dataclass(frozen=True)
class Config:
    """The agents of the config file, in the file's order, and the default one's name."""

    agents: tuple[Target, ...] = ()
    default: str | None = None
    #: Where it was read from (for messages).
    source: str = ""

    def named(self, name: str) -> Target | None:
        """The agent called ``name``, if any."""
        return next((agent for agent in self.agents if agent.name == name), None)


def config_path(environ: Mapping[str, str]) -> Path:
    """Where the config file is: ``$SMARTMOB_CONFIG``, else
    ``$XDG_CONFIG_HOME/smartmob/agents.toml``, else ``~/.config/smartmob/agents.toml``."""
    if environ.get("SMARTMOB_CONFIG"):
        return Path(environ["SMARTMOB_CONFIG"]).expanduser()
    base = environ.get("XDG_CONFIG_HOME") or str(Path(environ.get("HOME", "~")) / ".config")
    return Path(base).expanduser() / "smartmob" / "agents.toml"


def parse_config(
    text: str, source: str, read_token: Callable[[Path], str]
) -> Config:
    """Read a config file's text.

    Args:
        source: the file's path, for messages and for relative token files.
        read_token: reads a token file (given its path).

    Raises:
        UsageError: the file is not TOML, or an agent lacks a URL, or has both ``token``
            and ``token_file``, or ``default`` names no agent.

    >>> config = parse_config('''
    ... default = "b"
    ... [agents.a]
    ... url = "http://10.0.0.1:8080"
    ... [agents.b]
    ... url = "http://10.0.0.2:8080/"
    ... token = "k"
    ... ''', "agents.toml", lambda path: "")
    >>> [(a.name, a.url, a.token) for a in config.agents], config.default
    ([('a', 'http://10.0.0.1:8080', None), ('b', 'http://10.0.0.2:8080', 'k')], 'b')
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"the config file {source} is not valid TOML: {error}") from None
    agents = document.get("agents", {})
    if not isinstance(agents, dict):
        raise UsageError(f"the config file {source}: 'agents' must be a table of agents")
    targets = [_target(name, entry, source, read_token) for name, entry in agents.items()]
    default = document.get("default")
    if default is not None and default not in agents:
        raise UsageError(f"the config file {source}: default = {default!r} names no agent "
                         f"(it has: {', '.join(agents) or 'none'})")
    return Config(tuple(targets), default, source)


def _target(name: str, entry: object, source: str, read_token: Callable[[Path], str]
            ) -> Target:
    where = f"the config file {source}: agent {name!r}"
    if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
        raise UsageError(f"{where} needs a url = \"http://host:port\"")
    url = entry["url"].rstrip("/")
    if "://" not in url:
        raise UsageError(f"{where}: url {url!r} is not a URL (http://host:port)")
    token, token_file = entry.get("token"), entry.get("token_file")
    if token is not None and token_file is not None:
        raise UsageError(f"{where} has both token and token_file: keep one")
    if token_file is not None:
        path = Path(str(token_file)).expanduser()
        token = read_token(path if path.is_absolute() else Path(source).parent / path)
    if token is not None and not isinstance(token, str):
        raise UsageError(f"{where}: token must be a string")
    return Target(name, url, token or None)


def read_token_file(path: Path) -> str:
    """The key in a token file (its first line, stripped).

    Raises:
        UsageError: the file cannot be read.
    """
    try:
        return path.read_text(encoding="utf-8").strip().splitlines()[0].strip()
    except (OSError, UnicodeDecodeError, IndexError) as error:
        why = error.strerror if isinstance(error, OSError) and error.strerror else "empty"
        raise UsageError(f"cannot read the token file {path}: {why.lower()}") from None


def load_config(path: Path, *, required: bool = False) -> Config:
    """Read the config file at ``path``; an absent file is an empty config unless
    ``required`` (it was named on the command line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if required:
            raise UsageError(f"there is no config file {path}") from None
        return Config(source=str(path))
    except OSError as error:
        raise UsageError(f"cannot read the config file {path}: {error.strerror}") from None
    return parse_config(text, str(path), read_token_file)


def select(
    named: Sequence[str], every: bool, environ: Mapping[str, str], config: Config
) -> list[Target]:
    """The agents a command talks to.

    Args:
        named: the ``--agent`` values: URLs, or names from the config file.
        every: ``--all``: every agent of the config file (or the default one if the file
            has none).

    Raises:
        UsageError: a name that is neither a URL nor in the config file.

    >>> config = Config((Target("a", "http://a:1"), Target("b", "http://b:1", "kb")))
    >>> [t.name for t in select([], True, {}, config)]
    ['a', 'b']
    >>> select(["http://b:1/"], False, {"SMARTMOB_TOKEN": "env"}, config)
    [Target(name='http://b:1', url='http://b:1', token='kb')]
    >>> select([], False, {"SMARTMOB_URL": "http://c:1"}, config)
    [Target(name='http://c:1', url='http://c:1', token=None)]
    >>> select([], False, {}, Config())
    [Target(name='http://127.0.0.1:8080', url='http://127.0.0.1:8080', token=None)]
    """
    env_token = environ.get("SMARTMOB_TOKEN") or None
    if named:
        return _unique([_resolve(name, config, env_token) for name in named])
    if every and config.agents:
        return [_with_env_token(agent, env_token) for agent in config.agents]
    if environ.get("SMARTMOB_URL"):
        return [_resolve(environ["SMARTMOB_URL"], config, env_token)]
    default = config.named(config.default) if config.default else (
        config.agents[0] if len(config.agents) == 1 else None)
    if default is not None:
        return [_with_env_token(default, env_token)]
    return [Target(LOCAL_AGENT, LOCAL_AGENT, env_token)]


def _resolve(name: str, config: Config, env_token: str | None) -> Target:
    agent = config.named(name)
    if agent is not None:
        return _with_env_token(agent, env_token)
    if "://" not in name:
        where = config.source or "the config file"
        if not config.agents:
            raise UsageError(f"no agent is named {name!r}: give a URL such as "
                             f"http://host:8080, or name agents in {where}")
        known = ", ".join(a.name for a in config.agents)
        raise UsageError(f"no agent is named {name!r} in {where} (it has: {known}); "
                         "give one of those, or a URL such as http://host:8080")
    url = name.rstrip("/")
    # a URL of a configured agent uses that agent's key
    same = next((agent for agent in config.agents if agent.url == url), None)
    return Target(url, url, (same.token if same else None) or env_token)


def _with_env_token(agent: Target, env_token: str | None) -> Target:
    return agent if agent.token or not env_token else Target(agent.name, agent.url, env_token)


def _unique(targets: list[Target]) -> list[Target]:
    """The targets without repeats (an agent named twice is asked once)."""
    unique: dict[str, Target] = {}
    for target in targets:
        unique.setdefault(target.url, target)
    return list(unique.values())
