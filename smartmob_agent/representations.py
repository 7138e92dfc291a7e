"""JSON documents of the API, built from model values: pure.

Hypermedia lives here: every document links to what a client can do next, using a
``link(relation, slug)`` callable that the web layer provides (it alone knows the host
and the routes). Nothing in this module knows about HTTP.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from smartmob_agent.model import ProcessInfo


class Linker(Protocol):
    """Builds absolute URLs for link relations."""

    def index(self, relation: str) -> str:
        """Return the URL of an index-level relation (``list``, ``create``)."""

    def process(self, relation: str, slug: str) -> str:
        """Return the URL of a per-process relation (``details``, ``attach``, ...)."""


#: Relations of the index document, in the order shown.
INDEX_RELATIONS = ("list", "create")
#: Relations of a process status document. ``status`` is ``details`` under the name the
#: seed's reference table uses; both are served.
PROCESS_RELATIONS = ("details", "status", "attach", "delete")


def index_document(links: Linker) -> dict[str, Any]:
    """Return the index: the entry point that links to every collection-level action."""
    return {relation: links.index(relation) for relation in INDEX_RELATIONS}


def process_document(info: ProcessInfo, links: Linker) -> dict[str, Any]:
    """Return the process status document of one process."""
    spec = info.spec
    exit = info.last_exit
    document: dict[str, Any] = {
        "app": spec.app,
        "node": spec.node,
        "process_type": spec.process_type,
        "slug": spec.slug,
        "state": info.state.value,
        "pid": info.pid,
        "error": info.error,
        "restarts": info.restarts,
        "last_exit": None if exit is None else {"code": exit.code, "signal": exit.signal},
    }
    for relation in PROCESS_RELATIONS:
        document[relation] = links.process(relation, spec.slug)
    return document


def listing_document(infos: Iterable[ProcessInfo], links: Linker) -> dict[str, Any]:
    """Return the listing: every process's status document, in creation order."""
    return {"processes": [process_document(info, links) for info in infos]}


def error_document(message: str, **extra: Any) -> dict[str, Any]:
    """Return the body of an error response: ``{"error": sentence, ...}``."""
    return {"error": message, **extra}

