"""The errors of the client: one class per kind of failure, each a sentence for a person.

Pure: no I/O. An error the agent answered carries what it said: :attr:`ClientError.error`
(the agent's one-sentence ``error``), :attr:`ClientError.reason` (its ``reason``, when it
gives one), :attr:`ClientError.fields` (one entry per bad field of a ``400``), the HTTP
``status`` and the whole ``body``. ``str(error)`` is one
sentence naming the agent, fit to print as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class ClientError(Exception):
    """Base of every error the client raises on purpose.

    Args:
        message: the sentence shown to a person (``str(error)``).
        agent: the URL (or configured name) of the agent it concerns, if any.
        status: the HTTP status the agent answered with, if it answered.
        body: the agent's JSON error document, if it sent one.
    """

    #: What kind of failure this is, in one word (``--json`` output names it).
    kind = "error"

    def __init__(
        self,
        message: str,
        *,
        agent: str | None = None,
        status: int | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.agent = agent
        self.status = status
        self.body: dict[str, Any] = dict(body or {})

    @property
    def error(self) -> str | None:
        """The agent's own sentence (its ``error`` field), if it sent one."""
        value = self.body.get("error")
        return value if isinstance(value, str) else None

    @property
    def reason(self) -> str | None:
        """The agent's ``reason`` field, if it sent one."""
        value = self.body.get("reason")
        return value if isinstance(value, str) else None

    @property
    def fields(self) -> dict[str, str]:
        """One entry per bad field of the request (a ``400``); empty otherwise."""
        fields = self.body.get("fields")
        if not isinstance(fields, dict):
            return {}
        return {str(name): str(problem) for name, problem in fields.items()}

    def to_dict(self) -> dict[str, Any]:
        """The error as a JSON object: ``{"kind", "message", "status", "body"}``."""
        return {"kind": self.kind, "message": self.message, "status": self.status,
                "body": self.body or None}


class Unreachable(ClientError):
    """The agent could not be reached (refused, reset, timed out, bad address)."""

    kind = "unreachable"


class AuthError(ClientError):
    """The agent refused the key (``401``), or the key may not do this (``403``), or
    refuses keys from here for a while (``429``)."""

    kind = "auth"


class UnauthorizedError(AuthError):
    """No key, or a key the agent does not know (``401``)."""


class ForbiddenError(AuthError):
    """The key is known but may not do this, such as an app key reaching beyond its app
    (``403``)."""


class TooManyAttempts(AuthError):
    """Too many wrong keys from this address (``429``); :attr:`retry_after` says how many
    seconds to wait, if the agent said."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any
                 ) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class NotFoundError(ClientError):
    """No such process on the agent (``404``), or nothing at a link."""

    kind = "not_found"


class InvalidRequestError(ClientError):
    """The agent refused the request's fields or body (``400``); ``fields`` names each
    bad field."""

    kind = "invalid"


class ConflictError(ClientError):
    """The request clashes with the process's state (``409``): the slug exists, or the
    control makes no sense now."""

    kind = "conflict"


class TooLargeError(ClientError):
    """The request body or upload is over the agent's limit (``413``)."""

    kind = "too_large"


class AgentFailure(ClientError):
    """The agent failed (``5xx``): a bug, a full disk, no free port."""

    kind = "agent_failure"


class UnexpectedAnswer(ClientError):
    """The agent answered something this client cannot read (not JSON, a wrong shape):
    it may not be a smartmob agent."""

    kind = "unexpected"


class MissingLink(ClientError):
    """The agent's documents lack a link this call needs: the agent is older than the
    feature (it may speak only the original API of 2016)."""

    kind = "missing_link"

    def __init__(self, relation: str, **kwargs: Any) -> None:
        self.relation = relation
        super().__init__(missing_link_message(relation), **kwargs)


class ProcessFailed(ClientError):
    """A process went where a wait did not want it (``failed``, say) or was deleted.

    Args:
        process: the last status document seen (a :class:`~.results.Process`), or
            ``None`` if the process is gone.
    """

    kind = "process_failed"

    def __init__(self, message: str, *, process: Any = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.process = process


class WaitTimeout(ClientError):
    """A wait for a process's state ran out of time; ``process`` is the last status
    seen."""

    kind = "timeout"

    def __init__(self, message: str, *, process: Any = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.process = process


#: What each link relation brings, to say what an agent without it is older than.
FEATURES = {
    "events": "the events WebSocket",
    "upload": "uploads",
    "logs": "the logs link",
    "start": "process controls",
    "stop": "process controls",
    "restart": "process controls",
    "signal": "signals",
    "tokens": "access keys",
    "openapi": "the OpenAPI document",
    "agent-log": "the agent log",
    "bulk_start": "bulk controls",
    "bulk_stop": "bulk controls",
    "bulk_restart": "bulk controls",
    "bulk_delete": "bulk controls",
    "update": "updates in place",
    "rollback": "updates in place",
}


def missing_link_message(relation: str) -> str:
    """The sentence for an agent that lacks ``relation``.

    >>> from smartmob_agent.client.errors import missing_link_message
    >>> print(missing_link_message("events").replace(": ", ":\\n"))
    this agent has no 'events' link:
    it is older than the events WebSocket (it may speak only the original API of 2016)
    """
    feature = FEATURES.get(relation)
    if feature is None:
        return f"this agent has no '{relation}' link, which this call needs"
    return (f"this agent has no '{relation}' link: it is older than {feature} "
            "(it may speak only the original API of 2016)")


#: The error class of each HTTP status the agent documents.
BY_STATUS: dict[int, type[ClientError]] = {
    400: InvalidRequestError, 401: UnauthorizedError, 403: ForbiddenError, 404: NotFoundError,
    409: ConflictError, 413: TooLargeError, 429: TooManyAttempts,
}


def error_for_status(
    status: int, body: Mapping[str, Any] | None, *, agent: str, what: str,
    retry_after: str | None = None,
) -> ClientError:
    """The error for an answer of ``status`` with the JSON ``body`` (if any).

    Args:
        status: the HTTP status, 400 or more.
        body: the agent's error document, or ``None`` if it sent none.
        agent: the agent's URL or name, to say in the message.
        what: what was asked, for an answer without a sentence ("GET /list-processes").
        retry_after: the ``Retry-After`` header of a ``429``.

    >>> from smartmob_agent.client.errors import error_for_status
    >>> str(error_for_status(404, {"error": "there is no process named 'a.b'"},
    ...                      agent="http://h:8080", what="GET /x"))
    "agent http://h:8080: there is no process named 'a.b'"
    >>> type(error_for_status(502, None, agent="a", what="GET /")).__name__
    'AgentFailure'
    """
    said = body.get("error") if body else None
    if not isinstance(said, str) or not said:
        said = f"{what} answered {status} without saying why"
    message = f"agent {agent}: {said}"
    kwargs: dict[str, Any] = {"agent": agent, "status": status, "body": body}
    if status == 429:
        return TooManyAttempts(message, retry_after=_seconds(retry_after), **kwargs)
    cls = BY_STATUS.get(status)
    if cls is None:
        cls = AgentFailure if status >= 500 else ClientError
    return cls(message, **kwargs)


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
