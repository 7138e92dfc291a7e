"""The client of smartmob agents: a library, and the ``smartmob`` command.

:class:`AgentClient` talks to one agent (asynchronously), :class:`Fleet` to several at
once, :class:`Agent` is a synchronous facade for scripts. They speak HTTP only, start at
the agent's index and follow its links: nothing here imports the agent's internals.

The names are loaded on first use, so that importing a pure module of the package (the
errors, the results) does not load aiohttp.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from smartmob_agent.client.agent import AgentClient
    from smartmob_agent.client.errors import (
        AgentFailure,
        AuthError,
        ClientError,
        ConflictError,
        ForbiddenError,
        InvalidRequestError,
        MissingLink,
        NotFoundError,
        ProcessFailed,
        TooLargeError,
        TooManyAttempts,
        UnauthorizedError,
        UnexpectedAnswer,
        Unreachable,
        WaitTimeout,
    )
    from smartmob_agent.client.fleet import Fleet, Result, Results
    from smartmob_agent.client.results import (
        Event,
        Exit,
        LogLine,
        Marker,
        Outcome,
        Process,
        Token,
        Upload,
    )
    from smartmob_agent.client.streams import Attachment, EventStream
    from smartmob_agent.client.sync import Agent

#: Where each public name lives.
_HOMES = {
    "AgentClient": "agent", "Fleet": "fleet", "Result": "fleet", "Results": "fleet",
    "Agent": "sync", "Attachment": "streams", "EventStream": "streams",
    **{name: "results" for name in (
        "Event", "Exit", "LogLine", "Marker", "Outcome", "Process", "Token", "Upload")},
    **{name: "errors" for name in (
        "AgentFailure", "AuthError", "ClientError", "ConflictError", "ForbiddenError",
        "InvalidRequestError", "MissingLink", "NotFoundError", "ProcessFailed", "TooLargeError",
        "TooManyAttempts", "UnauthorizedError", "UnexpectedAnswer", "Unreachable",
        "WaitTimeout")},
}

__all__ = [
    "Agent", "AgentClient", "AgentFailure", "Attachment", "AuthError", "ClientError",
    "ConflictError", "Event", "EventStream", "Exit", "Fleet", "ForbiddenError",
    "InvalidRequestError", "LogLine", "Marker", "MissingLink", "NotFoundError", "Outcome",
    "Process", "ProcessFailed", "Result", "Results", "Token", "TooLargeError",
    "TooManyAttempts", "UnauthorizedError", "UnexpectedAnswer", "Unreachable", "Upload",
    "WaitTimeout",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
