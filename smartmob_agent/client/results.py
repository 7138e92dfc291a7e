"""Typed results of the client: the agent's JSON documents as frozen dataclasses.

Pure: no I/O. Each result keeps the whole document it was read from (``document``), so
fields a newer agent adds are kept, not dropped: :attr:`Process.extra` lists them, and
``to_dict()`` gives the document back as the agent sent it. Every field but the
identifying ones is optional, since an agent of the original API (2016) sends only
``app``, ``node``, ``slug`` and the links ``attach``, ``details`` and ``delete``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: Link relations of a process status document.
PROCESS_RELATIONS = frozenset({
    "details", "status", "attach", "logs", "delete", "start", "stop", "restart", "signal",
    "update", "rollback",
})
#: The fields :class:`Process` models (besides the links).
PROCESS_FIELDS = frozenset({
    "app", "node", "process_type", "slug", "state", "pid", "error", "reason", "port",
    "started_at",
    "uptime", "restarts", "last_exit", "exits", "cpu_percent", "memory_rss", "healthy",
    "checksum", "output_tail", "options",
    # update in place: read through the properties of the same names
    "source", "pending_source", "previous_source", "update_error", "update_reason",
})
#: States in which a process has stopped for good until someone starts it again.
SETTLED_STATES = frozenset({"stopped", "exited", "failed"})


def _str(document: Mapping[str, Any], key: str) -> str | None:
    value = document.get(key)
    return value if isinstance(value, str) else None


def _int(document: Mapping[str, Any], key: str) -> int | None:
    value = document.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float(document: Mapping[str, Any], key: str) -> float | None:
    value = document.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _table(document: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    value = document.get(key)
    return value if isinstance(value, dict) else None


def _bool(document: Mapping[str, Any], key: str) -> bool | None:
    value = document.get(key)
    return value if isinstance(value, bool) else None


@dataclass(frozen=True)
class Exit:
    """How a child ended (``last_exit``, or an entry of ``exits``)."""

    #: The exit status, or minus the signal number (``-15``).
    code: int | None
    #: The signal's name (``"SIGTERM"``), or ``None`` for an exit status.
    signal: str | None
    #: When the agent saw it (ISO 8601, UTC).
    at: str | None
    #: How long the child ran, in seconds.
    ran_for: float | None
    #: Why the agent ended it (``"stopped"``, ``"restarted"``, ``"unhealthy: ..."``), or
    #: ``None`` if it ended by itself.
    reason: str | None
    #: The whole document.
    document: Mapping[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_document(cls, document: Mapping[str, Any]) -> Exit:
        """Read an exit object."""
        return cls(_int(document, "code"), _str(document, "signal"), _str(document, "at"),
                   _float(document, "ran_for"), _str(document, "reason"), dict(document))

    def describe(self) -> str:
        """In words: ``"exited with code 3"``, ``"killed by SIGKILL"``.

        >>> from smartmob_agent.client.results import Exit
        >>> Exit.from_document({"code": -9, "signal": "SIGKILL"}).describe()
        'killed by SIGKILL'
        >>> Exit.from_document({"code": 3, "signal": None, "reason": "stopped"}).describe()
        'exited with code 3 (stopped)'
        """
        said = f"killed by {self.signal}" if self.signal else f"exited with code {self.code}"
        return f"{said} ({self.reason})" if self.reason else said


@dataclass(frozen=True)
class Process:
    """A process status document."""

    #: Unique name of the process on its agent: ``<app>.<node>``.
    slug: str
    app: str | None
    node: str | None
    process_type: str | None
    #: One of the agent's states (``running``, ``failed``, ...); ``None`` from an agent
    #: of the original API, which reports none.
    state: str | None
    pid: int | None
    #: Why the process is ``failed``, in one sentence.
    error: str | None
    #: Why the process is ``failed``, as a name from the agent's closed set (``download
    #: failure``, ``no procfile``, ...) to switch on; ``None`` unless failed, and from an
    #: agent older than the field.
    reason: str | None
    port: int | None
    started_at: str | None
    uptime: float | None
    restarts: int | None
    last_exit: Exit | None
    exits: tuple[Exit, ...]
    cpu_percent: float | None
    memory_rss: int | None
    healthy: bool | None
    checksum: str | None
    output_tail: tuple[str, ...]
    #: The supervision options in force, as the agent spells them.
    options: Mapping[str, Any] | None
    #: Link relation -> absolute URL (``details``, ``attach``, ``stop``, ...).
    links: Mapping[str, str]
    #: The whole document, unknown fields included.
    document: Mapping[str, Any] = field(repr=False, compare=False)
    #: The agent this document came from (its configured name or URL), if known.
    agent: str | None = field(default=None, compare=False)

    @classmethod
    def from_document(cls, document: Mapping[str, Any], agent: str | None = None) -> Process:
        """Read a status document.

        Raises:
            ValueError: the document has no ``slug`` (it is not a status document).
        """
        slug = _str(document, "slug")
        if not slug:
            raise ValueError("a process status document must have a slug")
        last = document.get("last_exit")
        exits = document.get("exits")
        tail = document.get("output_tail")
        options = document.get("options")
        links = {relation: value for relation in PROCESS_RELATIONS
                 if isinstance(value := document.get(relation), str)}
        return cls(
            slug=slug, app=_str(document, "app"), node=_str(document, "node"),
            process_type=_str(document, "process_type"), state=_str(document, "state"),
            pid=_int(document, "pid"), error=_str(document, "error"),
            reason=_str(document, "reason"), port=_int(document, "port"),
            started_at=_str(document, "started_at"),
            uptime=_float(document, "uptime"), restarts=_int(document, "restarts"),
            last_exit=Exit.from_document(last) if isinstance(last, dict) else None,
            exits=tuple(Exit.from_document(e) for e in exits if isinstance(e, dict))
            if isinstance(exits, list) else (),
            cpu_percent=_float(document, "cpu_percent"),
            memory_rss=_int(document, "memory_rss"), healthy=_bool(document, "healthy"),
            checksum=_str(document, "checksum"),
            output_tail=tuple(str(line) for line in tail) if isinstance(tail, list) else (),
            options=dict(options) if isinstance(options, dict) else None,
            links=links, document=dict(document), agent=agent,
        )

    @property
    def source(self) -> Mapping[str, Any] | None:
        """The source it runs (``{"url", "checksum", "since"}``), from an agent that
        updates in place; else ``None``."""
        return _table(self.document, "source")

    @property
    def pending_source(self) -> Mapping[str, Any] | None:
        """The source an update in progress is bringing, if any."""
        return _table(self.document, "pending_source")

    @property
    def previous_source(self) -> Mapping[str, Any] | None:
        """The source a ``rollback`` brings back, if any."""
        return _table(self.document, "previous_source")

    @property
    def update_error(self) -> str | None:
        """Why the last update failed (``None`` once one succeeds)."""
        return _str(self.document, "update_error")

    @property
    def update_reason(self) -> str | None:
        """Why the last update failed, as a name (``start failure``, ``unhealthy``,
        ...), to switch on."""
        return _str(self.document, "update_reason")

    @property
    def extra(self) -> dict[str, Any]:
        """The fields of the document this class does not model (a newer agent's)."""
        return {key: value for key, value in self.document.items()
                if key not in PROCESS_FIELDS and key not in PROCESS_RELATIONS}

    def to_dict(self) -> dict[str, Any]:
        """The document as the agent sent it."""
        return dict(self.document)


@dataclass(frozen=True)
class LogLine:
    """One line of output: from ``logs``, or from ``attach``.

    From an agent that sends bare text frames (the original API), only :attr:`line` is
    known and the rest is ``None``.
    """

    line: str
    #: The line's number, per process, strictly increasing (``attach?after=`` takes it).
    seq: int | None = None
    #: When the agent read it (ISO 8601, UTC).
    at: str | None = None
    #: ``stdout`` or ``stderr``.
    stream: str | None = None
    pid: int | None = None
    restarts: int | None = None

    @classmethod
    def from_document(cls, document: Mapping[str, Any]) -> LogLine:
        """Read a line object (``{"seq", "at", "stream", "line", "pid", "restarts"}``)."""
        return cls(str(document.get("line", "")), _int(document, "seq"), _str(document, "at"),
                   _str(document, "stream"), _int(document, "pid"),
                   _int(document, "restarts"))

    def to_dict(self) -> dict[str, Any]:
        """The line as a JSON object, as the agent spells it."""
        return {"seq": self.seq, "at": self.at, "stream": self.stream, "line": self.line,
                "pid": self.pid, "restarts": self.restarts}


@dataclass(frozen=True)
class Marker:
    """A frame of ``attach`` (JSON format) that is not a line: ``spawned``, ``exited``,
    ``backoff``, ``dropped`` or ``notice``."""

    event: str
    document: Mapping[str, Any] = field(compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The frame as the agent sent it."""
        return dict(self.document)


@dataclass(frozen=True)
class Event:
    """One event of the ``events`` WebSocket (``process:state``, ``process:exit``, ...)."""

    #: The kind: ``process:state``, ``process:online``, ``process:exit``,
    #: ``process:exception`` or ``events:dropped``.
    event: str
    slug: str | None
    app: str | None
    state: str | None
    pid: int | None
    at: str | None
    #: The whole event (``previous``, ``code``, ``signal``, ``error``, ...).
    document: Mapping[str, Any] = field(repr=False, compare=False)
    #: The agent it came from (its configured name or URL), if known.
    agent: str | None = field(default=None, compare=False)

    @classmethod
    def from_document(cls, document: Mapping[str, Any], agent: str | None = None) -> Event:
        """Read an event object."""
        return cls(str(document.get("event", "")), _str(document, "slug"),
                   _str(document, "app"), _str(document, "state"), _int(document, "pid"),
                   _str(document, "at"), dict(document), agent)

    def to_dict(self) -> dict[str, Any]:
        """The event as the agent sent it."""
        return dict(self.document)


@dataclass(frozen=True)
class Upload:
    """The answer to an upload: where the agent serves the archive, and its checksum."""

    source_url: str
    #: ``sha256:`` and the hexadecimal SHA-256 of the archive.
    checksum: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        """As the agent spells it."""
        return {"source_url": self.source_url, "checksum": self.checksum, "size": self.size}


@dataclass(frozen=True)
class Token:
    """A minted app key, as the ``tokens`` link lists it (never the key itself)."""

    id: str
    app: str | None
    created_at: str | None
    #: The link that revokes it.
    revoke: str | None
    document: Mapping[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_document(cls, document: Mapping[str, Any]) -> Token:
        """Read an entry of the ``tokens`` list."""
        return cls(str(document.get("id", "")), _str(document, "app"),
                   _str(document, "created_at"), _str(document, "revoke"), dict(document))

    def to_dict(self) -> dict[str, Any]:
        """As the agent sent it."""
        return dict(self.document)


@dataclass(frozen=True)
class Outcome:
    """What a bulk control did to one process."""

    slug: str
    ok: bool
    #: The sentence of the conflict, when ``ok`` is false.
    error: str | None = None

    @classmethod
    def from_document(cls, document: Mapping[str, Any]) -> Outcome:
        """Read an entry of a bulk answer."""
        return cls(str(document.get("slug", "")), document.get("ok") is True,
                   _str(document, "error"))

    def to_dict(self) -> dict[str, Any]:
        """As the agent spells it."""
        return {"slug": self.slug, "ok": self.ok,
                **({"error": self.error} if self.error is not None else {})}
