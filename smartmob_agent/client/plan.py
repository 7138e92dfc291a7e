"""What ``smartmob apply`` does: the desired nodes against the observed ones.

Pure: :func:`place` spreads each app's formation over its agents, :func:`compute`
compares the nodes wanted with the processes the agents have, and says per node and
agent what to do: ``create``, ``update`` (its source or options changed), ``replace``
(it runs another process type: deleted, then created), ``delete`` (the file no longer
names it; done only with ``--prune``) or ``unchanged``.

What cannot be compared is not: the agent does not show a process's environment (it
may hold secrets), so a change of ``env`` alone is not seen (``apply --update-all``
sends it); options the file does not name are not compared; a source is compared by
checksum, else by URL, when the agent shows them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from smartmob_agent.client.formation import index_of
from smartmob_agent.client.manifest import AppSpec

#: The kinds of action, in the order :func:`compute` lists them.
KINDS = ("create", "replace", "update", "delete", "unchanged")


@dataclass(frozen=True)
class Source:
    """Which source a node runs, as far as it is known: an archive's URL and checksum."""

    url: str | None = None
    checksum: str | None = None

    def differs(self, other: Source) -> bool:
        """Whether the two are known to differ: by checksum if both have one, else by
        URL if both have one; otherwise they cannot be told apart.

        >>> from smartmob_agent.client.plan import Source
        >>> Source("u1", "sha256:aa").differs(Source("u2", "sha256:AA"))
        False
        >>> Source("u1").differs(Source("u2", "sha256:aa")), Source(None).differs(Source("u"))
        (True, False)
        """
        if self.checksum and other.checksum:
            return self.checksum.lower() != other.checksum.lower()
        if self.url and other.url:
            return self.url != other.url
        return False

    def short(self) -> str:
        """How a plan names it: the start of its checksum, else its URL."""
        if self.checksum:
            return self.checksum[:19]
        return self.url or "?"


@dataclass(frozen=True)
class Desired:
    """A node the file wants, on one agent."""

    agent: str
    app: str
    node: str
    process_type: str
    source: Source
    env: Mapping[str, str] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def slug(self) -> str:
        """``app.node``."""
        return f"{self.app}.{self.node}"


@dataclass(frozen=True)
class Observed:
    """A process an agent has, as the plan sees it."""

    app: str
    node: str
    process_type: str
    source: Source
    #: The options in force, as the status document shows them (``None``: not shown).
    options: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Action:
    """One thing to do (or not) to one node on one agent."""

    kind: str
    agent: str
    app: str
    node: str
    process_type: str
    #: Why, in short phrases: ``source sha256:ab -> sha256:cd``, ``options: health``.
    why: tuple[str, ...] = ()
    #: The node wanted (``None`` for a delete).
    desired: Desired | None = None

    @property
    def slug(self) -> str:
        """``app.node``."""
        return f"{self.app}.{self.node}"


def place(app: AppSpec, agents: Sequence[str], source: Source) -> list[Desired]:
    """The app's nodes, spread over ``agents``: node ``TYPE.i`` goes to agent ``i``
    modulo their number, so names are stable and each agent gets its share.

    >>> from smartmob_agent.client.manifest import parse_manifest
    >>> from smartmob_agent.client.plan import Source, place
    >>> app = parse_manifest('[apps.a]\\nsource="."\\nformation={web=3, worker=1}').apps[0]
    >>> [(d.agent, d.node) for d in place(app, ["x", "y"], Source())]
    [('x', 'web.0'), ('y', 'web.1'), ('x', 'web.2'), ('x', 'worker.0')]
    """
    if not agents:
        raise ValueError("an app needs at least one agent")
    return [Desired(agents[index % len(agents)], app.name, f"{spec.process_type}.{index}",
                    spec.process_type, source, spec.env, spec.options)
            for spec in app.types for index in range(spec.count)]


def compute(desired: Iterable[Desired], observed: Mapping[str, Sequence[Observed]],
            apps: Iterable[str], *, update_all: bool = False) -> list[Action]:
    """The actions that take the ``observed`` processes (per agent) to the ``desired``
    nodes. Only the processes of ``apps`` are looked at: an app the file does not name
    is never touched.

    >>> from smartmob_agent.client.plan import Desired, Observed, Source, compute
    >>> want = [Desired("x", "a", "web.0", "web", Source(checksum="sha256:new")),
    ...         Desired("x", "a", "web.1", "web", Source(checksum="sha256:new"))]
    >>> have = {"x": [Observed("a", "web.0", "web", Source(checksum="sha256:old")),
    ...               Observed("a", "web.7", "web", Source()),
    ...               Observed("b", "web.0", "web", Source())]}
    >>> for action in compute(want, have, ["a"]):
    ...     print(action.kind, action.node, action.why)
    create web.1 ()
    update web.0 ('source sha256:old -> sha256:new',)
    delete web.7 ('not in the file',)
    """
    names = set(apps)
    wanted = {(d.agent, d.app, d.node): d for d in desired}
    actions: list[Action] = []
    seen: set[tuple[str, str, str]] = set()
    for agent, processes in observed.items():
        for process in processes:
            if process.app not in names:
                continue
            key = (agent, process.app, process.node)
            seen.add(key)
            actions.append(_compare(agent, process, wanted.get(key), update_all))
    actions += [Action("create", d.agent, d.app, d.node, d.process_type, (), d)
                for key, d in wanted.items() if key not in seen]
    return sorted(actions, key=_order)


def _order(action: Action) -> tuple[int, str, str, int, str]:
    """Kind, then app, type, the node's number and name: the same plan for the same
    fleet, whatever order the agents list their processes in."""
    index = index_of(action.node, action.process_type)
    return (KINDS.index(action.kind), action.app, action.process_type,
            -1 if index is None else index, action.node)


def _compare(agent: str, process: Observed, desired: Desired | None, update_all: bool
             ) -> Action:
    if desired is None:
        elsewhere = "not in the file" if index_of(process.node, process.process_type) \
            is not None else "not in the file (not named TYPE.N)"
        return Action("delete", agent, process.app, process.node, process.process_type,
                      (elsewhere,))
    base = (agent, process.app, process.node, process.process_type)
    if desired.process_type != process.process_type:
        return Action("replace", *base,
                      (f"type {process.process_type} -> {desired.process_type}",), desired)
    why = []
    if process.source.differs(desired.source):
        why.append(f"source {process.source.short()} -> {desired.source.short()}")
    changed = options_changed(desired.options, process.options)
    if changed:
        why.append("options: " + ", ".join(changed))
    if update_all and not why:
        why.append("--update-all")
    return Action("update" if why else "unchanged", *base, tuple(why), desired)


def options_changed(wanted: Mapping[str, Any], shown: Mapping[str, Any] | None
                    ) -> list[str]:
    """The options the file names whose value differs from the one in force. An option
    the status document does not show cannot be compared, and is not.

    >>> from smartmob_agent.client.plan import options_changed
    >>> options_changed({"stop_timeout": 5, "umask": "22", "health": {"http": "/"}},
    ...                 {"stop_timeout": 5.0, "umask": "0022",
    ...                  "health": {"http": "/", "interval": 10}})
    []
    >>> options_changed({"restart": "never", "socket": True}, {"restart": "always"})
    ['restart']
    """
    if shown is None:
        return []
    return [key for key, value in wanted.items()
            if key in shown and not same(key, value, shown[key])]


def same(key: str, wanted: Any, shown: Any) -> bool:
    """Whether an option's value in the file is the one in force: numbers by value,
    ``umask`` as octal, ``exit_codes`` as a set, tables by the keys the file gives,
    ``socket = true`` as any socket."""
    if key == "umask" and isinstance(wanted, str) and isinstance(shown, str):
        try:
            return int(wanted, 8) == int(shown, 8)
        except ValueError:
            return False
    if key == "exit_codes" and isinstance(wanted, list) and isinstance(shown, list):
        return sorted(wanted) == sorted(shown)
    if key == "socket" and isinstance(wanted, bool):  # true: any port the agent picked
        return wanted == isinstance(shown, dict)
    if isinstance(wanted, dict) and isinstance(shown, dict):
        return all(k in shown and same(k, v, shown[k]) for k, v in wanted.items())
    if isinstance(wanted, bool) or isinstance(shown, bool):
        return wanted is shown
    if isinstance(wanted, (int, float)) and isinstance(shown, (int, float)):
        return float(wanted) == float(shown)
    return bool(wanted == shown)


def counts(actions: Iterable[Action]) -> dict[str, int]:
    """How many actions of each kind.

    >>> from smartmob_agent.client.plan import Action, counts
    >>> counts([Action("create", "x", "a", "web.0", "web")])
    {'create': 1, 'replace': 0, 'update': 0, 'delete': 0, 'unchanged': 0}
    """
    found = {kind: 0 for kind in KINDS}
    for action in actions:
        found[action.kind] += 1
    return found
