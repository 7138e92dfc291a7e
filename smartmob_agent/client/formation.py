"""A formation (how many processes of each type an app runs) and the steps that reach it.

Pure: :func:`plan_deploy` and :func:`plan_scale` compare the formation with the nodes an
agent has and say what to create, replace, keep or delete. Nodes are named
``<type>.<n>``, ``n`` counting from 0 (``web.0``, ``web.1``, ``worker.0``), as the API's
convention says; nodes of the app named otherwise are left alone.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

_TYPE = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: The most processes of one type a formation may ask for (a typo guard: web=1000).
MAX_COUNT = 100


class FormationError(ValueError):
    """A formation argument that is not ``TYPE=COUNT``."""


def parse_formation(values: Iterable[str]) -> dict[str, int]:
    """``TYPE=COUNT`` arguments as a formation, in the order given.

    >>> parse_formation(["web=2", "worker=0"])
    {'web': 2, 'worker': 0}
    >>> parse_formation(["web"])
    Traceback (most recent call last):
    ...
    smartmob_agent.client.formation.FormationError: 'web' is not TYPE=COUNT (such as web=2)
    """
    formation: dict[str, int] = {}
    for value in values:
        kind, equals, count = value.partition("=")
        if not equals or not _TYPE.fullmatch(kind) or not count.isdigit():
            raise FormationError(f"{value!r} is not TYPE=COUNT (such as web=2)")
        if int(count) > MAX_COUNT:
            raise FormationError(f"{value!r}: at most {MAX_COUNT} processes of one type")
        if kind in formation:
            raise FormationError(f"the type {kind!r} is given twice")
        formation[kind] = int(count)
    return formation


@dataclass(frozen=True)
class Node:
    """A process of the app as the plan sees it."""

    node: str
    process_type: str
    checksum: str | None = None


@dataclass(frozen=True)
class Step:
    """One thing to do: ``create``, ``replace`` (delete, then create from the new
    source), ``keep`` (it already runs this source) or ``delete``."""

    action: str
    node: str
    process_type: str


def index_of(node: str, process_type: str) -> int | None:
    """The ``n`` of a node named ``<process_type>.<n>``, else ``None``.

    >>> index_of("web.3", "web"), index_of("web.x", "web"), index_of("web.3", "worker")
    (3, None, None)
    """
    prefix = process_type + "."
    rest = node[len(prefix):]
    if node.startswith(prefix) and rest.isdigit() and str(int(rest)) == rest:
        return int(rest)
    return None


def _counted(existing: Iterable[Node], process_type: str) -> dict[int, Node]:
    return {index: node for node in existing if node.process_type == process_type
            and (index := index_of(node.node, process_type)) is not None}


def plan_deploy(formation: Mapping[str, int], existing: Iterable[Node], checksum: str
                ) -> list[Step]:
    """The steps that make the app run ``formation`` from the source ``checksum``.

    Each type's nodes ``0`` to ``count - 1`` are kept if they run this source, else
    replaced, else created; its nodes from ``count`` up are deleted. Types not in the
    formation are left alone.

    >>> existing = [Node("web.0", "web", "sha256:old"), Node("web.1", "web", "sha256:new"),
    ...             Node("web.2", "web", "sha256:new"), Node("clock.0", "clock", "x")]
    >>> [(s.action, s.node) for s in plan_deploy({"web": 2, "worker": 1}, existing,
    ...                                            "sha256:new")]
    [('replace', 'web.0'), ('keep', 'web.1'), ('delete', 'web.2'), ('create', 'worker.0')]
    """
    existing = list(existing)
    steps = []
    for process_type, count in formation.items():
        nodes = _counted(existing, process_type)
        for index in range(count):
            node = nodes.get(index)
            name = f"{process_type}.{index}"
            if node is None:
                steps.append(Step("create", name, process_type))
            elif node.checksum is not None and node.checksum.lower() == checksum.lower():
                steps.append(Step("keep", name, process_type))
            else:
                steps.append(Step("replace", name, process_type))
        steps += [Step("delete", nodes[index].node, process_type)
                  for index in sorted(nodes) if index >= count]
    return steps


def plan_scale(formation: Mapping[str, int], existing: Iterable[Node]) -> list[Step]:
    """The steps that bring each type of ``formation`` to its count: nodes created
    (the lowest free numbers first) or deleted (the highest first); the others kept.

    >>> existing = [Node("web.0", "web"), Node("web.2", "web"), Node("worker.0", "worker")]
    >>> [(s.action, s.node) for s in plan_scale({"web": 3, "worker": 0}, existing)]
    [('keep', 'web.0'), ('keep', 'web.2'), ('create', 'web.1'), ('delete', 'worker.0')]
    >>> [(s.action, s.node) for s in plan_scale({"web": 1}, existing)]
    [('keep', 'web.0'), ('delete', 'web.2')]
    """
    existing = list(existing)
    steps = []
    for process_type, count in formation.items():
        nodes = _counted(existing, process_type)
        kept = sorted(nodes)[:count]
        steps += [Step("keep", nodes[index].node, process_type) for index in kept]
        free = (index for index in range(MAX_COUNT + len(nodes)) if index not in nodes)
        steps += [Step("create", f"{process_type}.{next(free)}", process_type)
                  for _ in range(count - len(kept))]
        steps += [Step("delete", nodes[index].node, process_type)
                  for index in sorted(nodes, reverse=True) if index not in kept]
    return steps


def describe(formation: Mapping[str, int]) -> str:
    """``web=2 worker=1``."""
    return " ".join(f"{kind}={count}" for kind, count in formation.items())
