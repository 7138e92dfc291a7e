"""JSON documents of the API, built from model values: pure.

Hypermedia lives here: every document links to what a client can do next, using a
``link(relation, slug)`` callable that the web layer provides (it alone knows the host
and the routes). Nothing in this module knows about HTTP.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, Protocol

from smartmob_agent.keys import MintedKey
from smartmob_agent.model import (
    DownloadProgress,
    ExitRecord,
    LogLine,
    Options,
    ProcessInfo,
    Releases,
    SocketSpec,
    SourceRef,
    Spec,
)


class Linker(Protocol):
    """Builds absolute URLs for link relations."""

    def index(self, relation: str) -> str:
        """Return the URL of an index-level relation (``list``, ``create``)."""

    def process(self, relation: str, slug: str) -> str:
        """Return the URL of a per-process relation (``details``, ``attach``, ...)."""

    def key(self, relation: str, key_id: str) -> str:
        """Return the URL of a per-key relation (``revoke``)."""


#: Relations of the index document, in the order shown.
INDEX_RELATIONS = (
    "list", "create", "upload", "events", "agent-log", "bulk_start", "bulk_stop", "bulk_restart",
    "bulk_delete",
    "tokens", "openapi",
)
#: Relations of a process status document. ``status`` is ``details`` under the name the
#: seed's reference table uses; both are served.
PROCESS_RELATIONS = (
    "details", "status", "attach", "logs", "delete", "start", "stop", "restart", "signal",
    "update", "rollback",
)


def format_time(timestamp: float) -> str:
    """Return a POSIX timestamp as ISO 8601 UTC with milliseconds, ending in ``Z``.

    >>> format_time(1796148000.1234)
    '2026-12-01T18:00:00.123Z'
    """
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="milliseconds").removesuffix("+00:00") + "Z"


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def exit_document(record: ExitRecord) -> dict[str, Any]:
    """One exit: ``{"code", "signal", "at", "ran_for", "reason"}``."""
    return {
        "code": record.exit.code,
        "signal": record.exit.signal,
        "at": format_time(record.at),
        "ran_for": round(record.ran_for, 3),
        "reason": record.reason,
    }


def download_document(progress: DownloadProgress | None) -> dict[str, Any] | None:
    """The progress of a download: ``{"bytes", "total"}``, or ``None`` if there is none.

    >>> download_document(DownloadProgress(65536, 1048576))
    {'bytes': 65536, 'total': 1048576}
    """
    if progress is None:
        return None
    return {"bytes": progress.bytes, "total": progress.total}


def options_document(options: Options, stop_timeout: float | None) -> dict[str, Any]:
    """The supervision options in force, spelt as a create request spells them."""
    return {
        "restart": options.restart.value,
        "exit_codes": sorted(options.exit_codes),
        "max_restarts": options.max_restarts,
        "start_seconds": options.start_seconds,
        "backoff": {"initial": options.backoff.initial, "max": options.backoff.maximum},
        "stop_signal": options.stop_signal,
        "stop_timeout": stop_timeout,
        "working_dir": options.working_dir,
        "umask": None if options.umask is None else f"{options.umask:04o}",
        "autostart": options.autostart,
        "health": None if options.health is None else dict(options.health),
        "notify": list(options.notify),
        "rlimits": None if not options.rlimits else {
            name: "unlimited" if value is None else value for name, value in options.rlimits
        },
        "socket": None if options.socket is None else {
            "port": options.socket.port, "host": options.socket.host,
            "backlog": options.socket.backlog,
        },
    }


def source_document(source: SourceRef | None) -> dict[str, Any] | None:
    """A source: ``{"url", "checksum", "since"}``, and ``step`` for a pending one.

    >>> from smartmob_agent.model import SourceRef
    >>> from smartmob_agent.representations import source_document
    >>> source_document(SourceRef("https://example.com/app.tgz", None, 1796148000.0))
    {'url': 'https://example.com/app.tgz', 'checksum': None, 'since': '2026-12-01T18:00:00.000Z'}
    """
    if source is None:
        return None
    document: dict[str, Any] = {
        "url": source.url,
        "checksum": None if source.sha256 is None else f"sha256:{source.sha256}",
        "since": format_time(source.since),
    }
    if source.step is not None:
        document["step"] = source.step
    return document


def releases_document(
    source: SourceRef | None, releases: Releases | None
) -> dict[str, Any]:
    """The fields of a status document about updates (see :doc:`deploys`)."""
    previous = None if releases is None else releases.previous
    return {
        "source": source_document(source),
        "pending_source": source_document(None if releases is None else releases.pending),
        "previous_source": None if previous is None else source_document(
            SourceRef(previous[0].source_url, previous[0].sha256, previous[1])),
        "update_error": None if releases is None else releases.error,
        "update_reason": None if releases is None else releases.reason,
    }


def socket_document(socket: SocketSpec | None, pid: int | None) -> dict[str, Any] | None:
    """The listening socket of a process (``None`` without one): its address, its fd
    in the children, and the pid of the child that has it now.

    >>> from smartmob_agent.model import SocketSpec
    >>> from smartmob_agent.representations import socket_document
    >>> socket_document(SocketSpec(8000), 4242)
    {'address': '127.0.0.1:8000', 'host': '127.0.0.1', 'port': 8000, 'backlog': 128, \
'fd': 3, 'inherited_by': 4242}
    """
    if socket is None:
        return None
    host = f"[{socket.host}]" if ":" in socket.host else socket.host
    return {"address": f"{host}:{socket.port}", "host": socket.host, "port": socket.port,
            "backlog": socket.backlog, "fd": 3, "inherited_by": pid}


def index_document(links: Linker) -> dict[str, Any]:
    """Return the index: the entry point that links to every collection-level action."""
    return {relation: links.index(relation) for relation in INDEX_RELATIONS}


def process_document(info: ProcessInfo, links: Linker) -> dict[str, Any]:
    """Return the process status document of one process."""
    spec = info.spec
    last = info.last_exit
    document: dict[str, Any] = {
        "app": spec.app,
        "node": spec.node,
        "process_type": spec.process_type,
        "slug": spec.slug,
        "checksum": None if spec.sha256 is None else f"sha256:{spec.sha256}",
        "state": info.state.value,
        "pid": info.pid,
        "error": info.error,
        "reason": None if info.reason is None else info.reason.value,
        "port": info.port,
        "started_at": None if info.started_at is None else format_time(info.started_at),
        "uptime": _seconds(info.uptime),
        "restarts": info.restarts,
        "last_exit": None if last is None else exit_document(last),
        "exits": [exit_document(record) for record in info.exits],
        "cpu_percent": info.cpu_percent,
        "memory_rss": info.memory_rss,
        "healthy": info.healthy,
        "backoff_delay": _seconds(info.backoff_delay),
        "next_start_at": (
            None if info.next_start_at is None else format_time(info.next_start_at)
        ),
        "output_tail": list(info.output_tail),
        "download": download_document(info.download),
        # nested: "restart" is both an option and a link relation
        "options": options_document(spec.options, info.stop_timeout),
        **releases_document(info.source, info.releases),
        "socket": socket_document(spec.options.socket, info.pid),
    }
    for relation in PROCESS_RELATIONS:
        document[relation] = links.process(relation, spec.slug)
    return document


def log_document(entries: Iterable[LogLine]) -> list[dict[str, Any]]:
    """Output lines as the ``logs`` link returns them in JSON, oldest first: each as the
    ``attach`` WebSocket sends it with ``?format=json``.

    >>> from smartmob_agent.model import LogLine
    >>> from smartmob_agent.representations import log_document
    >>> log_document([LogLine(1796148000.1234, "stderr", "oops", 42, 4242, 0)])
    [{'seq': 42, 'at': '2026-12-01T18:00:00.123Z', 'stream': 'stderr', 'line': 'oops', \
'pid': 4242, 'restarts': 0}]
    """
    return [line_document(entry) for entry in entries]


def line_document(entry: LogLine) -> dict[str, Any]:
    """One output line: ``{"seq", "at", "stream", "line", "pid", "restarts"}``."""
    return {
        "seq": entry.seq, "at": format_time(entry.at), "stream": entry.stream,
        "line": entry.line, "pid": entry.pid, "restarts": entry.restarts,
    }


def log_text(entries: Iterable[LogLine]) -> str:
    """Output lines as the ``logs`` link returns them in plain text: ``at stream line``.

    >>> from smartmob_agent.model import LogLine
    >>> from smartmob_agent.representations import log_text
    >>> print(log_text([LogLine(1796148000.1234, "stdout", "hello")]), end="")
    2026-12-01T18:00:00.123Z stdout hello
    """
    return "".join(f"{format_time(e.at)} {e.stream} {e.line}\n" for e in entries)


def request_document(spec: Spec) -> dict[str, Any]:
    """The create request that makes ``spec`` again (what the state database keeps)."""
    options = options_document(spec.options, spec.options.stop_timeout)
    document: dict[str, Any] = {
        "app": spec.app,
        "node": spec.node,
        "process_type": spec.process_type,
        "source_url": spec.source_url,
        "env": dict(spec.env),
        **({"checksum": f"sha256:{spec.sha256}"} if spec.sha256 else {}),
        # fields a request may not give as null are left out when unset
        **{k: v for k, v in options.items() if v is not None or k == "max_restarts"},
    }
    return document


def listing_document(infos: Iterable[ProcessInfo], links: Linker) -> dict[str, Any]:
    """Return the listing: every process's status document, in creation order."""
    return {"processes": [process_document(info, links) for info in infos]}


def key_document(key: MintedKey, links: Linker) -> dict[str, Any]:
    """A minted key as the admin sees it: never the key itself, which nobody keeps."""
    return {
        "id": key.id,
        "app": key.app,
        "created_at": format_time(key.created_at),
        "revoke": links.key("revoke", key.id),
    }


def upload_document(source_url: str, sha256: str, size: int) -> dict[str, Any]:
    """The answer to an upload: what a create request gives to run the archive.

    >>> from smartmob_agent.representations import upload_document
    >>> document = upload_document("http://127.0.0.1:8080/sources/" + "ab" * 32, "ab" * 32, 9)
    >>> document["checksum"] == "sha256:" + "ab" * 32, document["size"]
    (True, 9)
    """
    return {"source_url": source_url, "checksum": f"sha256:{sha256}", "size": size}


def error_document(message: str, **extra: Any) -> dict[str, Any]:
    """Return the body of an error response: ``{"error": sentence, ...}``."""
    return {"error": message, **extra}

