"""The agent's durable state: one SQLite database in the state folder (the storage adapter).

What survives an agent restart is each process's *desired* state, written before the API
answers: the create request as it was accepted, whether the process should run or stay
stopped, its ``PORT``, its restart count, its last exits (as its status document shows
them), and the pid and start time of its current child (so that a child that outlived
its agent is recognised, and stopped, never run twice). Deleting a process deletes its
row first: it never comes back.

A write that fails for want of space says so ("no space left on device") and says to
free some, never to move the database aside: it holds every process.

The database is in WAL mode, written by one connection from the event loop's thread (each
write is a few hundred microseconds on a local disk), and its schema carries a version,
upgraded in place by :data:`MIGRATIONS`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smartmob_agent.errors import AgentError
from smartmob_agent.keys import MintedKey
from smartmob_agent.model import Exit, ExitRecord

#: Each step upgrades the schema by one version; step ``i`` brings it to version ``i + 1``.
#: One SQL statement each, run in the same transaction as the version change.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE processes (
        slug TEXT PRIMARY KEY,
        position INTEGER NOT NULL,
        request TEXT NOT NULL,
        desired TEXT NOT NULL CHECK (desired IN ('running', 'stopped')),
        process_id TEXT NOT NULL,
        port INTEGER,
        restarts INTEGER NOT NULL DEFAULT 0,
        pid INTEGER,
        pid_started REAL
    )
    """,
    "CREATE TABLE agent (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    # minted access keys: only their SHA-256 is kept (see smartmob_agent.keys)
    """
    CREATE TABLE tokens (
        id TEXT PRIMARY KEY,
        app TEXT NOT NULL,
        digest BLOB NOT NULL UNIQUE,
        created_at REAL NOT NULL
    )
    """,
    # output line numbers below this mark may have been used (see smartmob_agent.output.logs)
    "ALTER TABLE processes ADD COLUMN seq_reserved INTEGER NOT NULL DEFAULT 0",
    # the last exits, oldest first, as a JSON list (see exits_json)
    "ALTER TABLE processes ADD COLUMN exits TEXT NOT NULL DEFAULT '[]'",
    # what updates left: the current source's folder and since when, the pending and
    # the previous source, the last update's error (see smartmob_agent.supervision.update)
    "ALTER TABLE processes ADD COLUMN releases TEXT NOT NULL DEFAULT '{}'",
)
SCHEMA_VERSION = len(MIGRATIONS)
DATABASE_NAME = "agent.db"

log = logging.getLogger("smartmob_agent.store")


class StoreError(AgentError):
    """The state database cannot be opened or used; the message says what to do."""


@dataclass(frozen=True)
class Record:
    """One process as the database holds it.

    Attributes:
        slug: its name.
        request: the create request as accepted (JSON object).
        desired: ``"running"`` or ``"stopped"``.
        process_id: the value of ``SMARTMOB_PROCESS_ID`` in its children's environment,
            kept for its whole life.
        port: its ``PORT``, if the agent gave it one.
        restarts: how many times it was restarted, over every agent run.
        pid: the pid of its last child, while that child may be alive.
        pid_started: that child's start time (seconds since the epoch, as the kernel
            reports it), which tells it from a later process that reused the pid.
        seq_reserved: the sequence numbers of its output lines below this mark may
            have been used: the next agent numbers on from it.
        exits: its last exits, oldest first (those its status document shows).
        releases: what its updates left, as a JSON object (see
            :func:`~smartmob_agent.supervision.update.releases_json`).
    """

    slug: str
    request: Mapping[str, Any]
    desired: str
    process_id: str
    port: int | None = None
    restarts: int = 0
    pid: int | None = None
    pid_started: float | None = None
    seq_reserved: int = 0
    exits: tuple[ExitRecord, ...] = ()
    releases: Mapping[str, Any] = field(default_factory=dict)


class Store:
    """The state database of one state folder. Open with :meth:`open`.

    Raises:
        StoreError: from every method, when the database cannot be read or written.
    """

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self._db = connection
        self.path = path

    @classmethod
    def open(cls, state_dir: Path) -> Store:
        """Open (creating if needed) the database of ``state_dir`` and bring its schema up
        to date.

        Raises:
            StoreError: the file is not a database, is corrupt, is locked by another
                agent, or comes from a newer version of the agent.
        """
        path = state_dir / DATABASE_NAME
        try:
            # it holds every request's env, secrets included: for the agent's user only;
            # SQLite gives the -wal and -shm files the database file's mode
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            for name in (DATABASE_NAME, DATABASE_NAME + "-wal", DATABASE_NAME + "-shm"):
                companion = state_dir / name
                if companion.exists():
                    companion.chmod(0o600)
        except OSError as error:
            raise StoreError(_advice(path, error)) from None
        try:
            connection = sqlite3.connect(path, isolation_level=None, timeout=0.5)
        except sqlite3.Error as error:
            raise StoreError(_advice(path, error)) from None
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            # NORMAL: a power cut may lose the last writes, never corrupt the database
            connection.execute("PRAGMA synchronous=NORMAL")
            # a second agent on the same folder would run every process twice
            connection.execute("PRAGMA locking_mode=EXCLUSIVE")
            connection.execute("BEGIN IMMEDIATE")
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                connection.execute("ROLLBACK")
                raise StoreError(
                    f"the state database {path} was written by a newer smartmob-agent "
                    f"(schema {version}, this one knows up to {SCHEMA_VERSION}): upgrade "
                    "the agent, or start it with another --state-dir"
                )
            for step in MIGRATIONS[version:]:
                connection.execute(step)
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            connection.execute("COMMIT")
            problems = [row[0] for row in connection.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError(
                    "database disk image is malformed: " + problems[0].replace("\n", " ")
                )
        except (sqlite3.Error, OSError) as error:
            connection.close()
            raise StoreError(_advice(path, error)) from None
        except StoreError:
            connection.close()
            raise
        return cls(connection, path)

    def close(self) -> None:
        """Close the database (writes are already on disk)."""
        self._db.close()

    def _run(self, sql: str, parameters: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, parameters)
        except sqlite3.Error as error:
            raise StoreError(_write_failure(self.path, error)) from None

    # -- reads ------------------------------------------------------------------------------

    def load(self) -> list[Record]:
        """Every process, in creation order."""
        rows = self._run(
            "SELECT slug, request, desired, process_id, port, restarts, pid, pid_started, "
            "seq_reserved, exits, releases FROM processes ORDER BY position"
        ).fetchall()
        records = []
        for slug, request, desired, process_id, port, restarts, pid, pid_started, seq, \
                exits, releases in rows:
            try:
                data = json.loads(request)
                updates = json.loads(releases)
            except ValueError:
                raise StoreError(
                    f"the state database {self.path} holds an unreadable request for "
                    f"{slug!r}: " + _WHAT_TO_DO.format(path=self.path)
                ) from None
            records.append(Record(
                slug, data, desired, process_id, port, restarts, pid, pid_started, seq,
                _read_exits(slug, exits), updates if isinstance(updates, dict) else {},
            ))
        return records

    def get_value(self, key: str) -> str | None:
        """A value the agent keeps about itself (such as its last run's id)."""
        row = self._run("SELECT value FROM agent WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_value(self, key: str, value: str) -> None:
        """Keep ``value`` under ``key`` (see :meth:`get_value`)."""
        self._run("INSERT OR REPLACE INTO agent (key, value) VALUES (?, ?)", (key, value))

    # -- writes -----------------------------------------------------------------------------

    def add(self, record: Record) -> None:
        """Record a new process, after every other one."""
        self._run(
            "INSERT INTO processes (slug, position, request, desired, process_id, port, "
            "restarts, releases) VALUES "
            "(?, (SELECT COALESCE(MAX(position), 0) + 1 FROM processes), ?, ?, ?, ?, ?, ?)",
            (record.slug, json.dumps(dict(record.request), separators=(",", ":")),
             record.desired, record.process_id, record.port, record.restarts,
             _compact(record.releases)),
        )

    def set_desired(self, slug: str, desired: str) -> None:
        """Record whether ``slug`` should run (``"running"``) or stay ``"stopped"``."""
        self._run("UPDATE processes SET desired = ? WHERE slug = ?", (desired, slug))

    def set_child(
        self, slug: str, pid: int | None, started: float | None, restarts: int
    ) -> None:
        """Record the current child of ``slug`` (or none) and its restart count."""
        self._run(
            "UPDATE processes SET pid = ?, pid_started = ?, restarts = ? WHERE slug = ?",
            (pid, started, restarts, slug),
        )

    def set_exits(self, slug: str, exits: Iterable[ExitRecord]) -> None:
        """Record the last exits of ``slug``, oldest first (they replace those recorded)."""
        self._run("UPDATE processes SET exits = ? WHERE slug = ?", (exits_json(exits), slug))

    def set_releases(self, slug: str, releases: Mapping[str, Any]) -> None:
        """Record what the updates of ``slug`` left (a pending update, the last error)."""
        self._run("UPDATE processes SET releases = ? WHERE slug = ?",
                  (_compact(releases), slug))

    def switch(self, record: Record) -> None:
        """Make ``record`` the current version of its process at once (one statement):
        its request, process id, port, child and releases; what an update does once its
        new child is ready, before the old one is stopped."""
        self._run(
            "UPDATE processes SET request = ?, process_id = ?, port = ?, pid = ?, "
            "pid_started = ?, releases = ? WHERE slug = ?",
            (_compact(record.request), record.process_id, record.port, record.pid,
             record.pid_started, _compact(record.releases), record.slug),
        )

    def set_seq_reserved(self, slug: str, mark: int) -> None:
        """Record that the output lines of ``slug`` may be numbered up to ``mark``
        (excluded) before the next write of this mark."""
        self._run("UPDATE processes SET seq_reserved = ? WHERE slug = ?", (mark, slug))

    def remove(self, slug: str) -> None:
        """Forget ``slug`` for good."""
        self._run("DELETE FROM processes WHERE slug = ?", (slug,))

    # -- minted keys ------------------------------------------------------------------------

    def load_keys(self) -> list[MintedKey]:
        """Every minted key, oldest first."""
        rows = self._run(
            "SELECT id, app, digest, created_at FROM tokens ORDER BY created_at"
        ).fetchall()
        return [MintedKey(id, app, bytes(digest), created) for id, app, digest, created in rows]

    def add_key(self, key: MintedKey) -> None:
        """Keep a newly minted key (its digest only)."""
        self._run(
            "INSERT INTO tokens (id, app, digest, created_at) VALUES (?, ?, ?, ?)",
            (key.id, key.app, key.digest, key.created_at),
        )

    def remove_key(self, key_id: str) -> None:
        """Forget the minted key ``key_id`` (revoked)."""
        self._run("DELETE FROM tokens WHERE id = ?", (key_id,))


def _compact(data: Mapping[str, Any]) -> str:
    return json.dumps(dict(data), separators=(",", ":"))


_WHAT_TO_DO = (
    "stop every other agent using this state folder; if none is running, move {path} "
    "aside (the agent then starts empty and runs nothing from before), or start the agent "
    "with another --state-dir"
)


def _advice(path: Path, error: sqlite3.Error | OSError) -> str:
    """A message for an unusable database that says what to do about it."""
    text = str(error)
    if "locked" in text or "busy" in text:
        return (
            f"the state database {path} is in use by another smartmob-agent: stop it, or "
            "start this one with another --state-dir"
        )
    if _out_of_space(error, path.parent):
        # the database is fine and holds every process: moving it aside would lose them
        return _write_failure(path, error)
    return f"the state database {path} cannot be used ({text}): " + _WHAT_TO_DO.format(
        path=path
    )


#: The primary result code of SQLite for a full disk (``database or disk is full``).
SQLITE_FULL = 13
#: The primary result code of SQLite for a failed read or write of its files: on a full
#: disk, that of its shared-memory file (``SQLITE_IOERR_SHMSIZE``).
SQLITE_IOERR = 10
#: Below this many free bytes, a failed write of a database file is put down to the
#: disk being full (SQLite needs a few pages at a time).
LOW_SPACE = 1 << 20


def _write_failure(path: Path, error: sqlite3.Error | OSError) -> str:
    """Why the database ``path`` could not be written, and, when the disk is full, what
    to do: free space (never move the database aside: it holds every process)."""
    text = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    if not _out_of_space(error, path.parent):
        return f"the state database {path} cannot be written: {text}"
    what = "the disk quota is exceeded" if getattr(error, "errno", None) == errno.EDQUOT \
        else "no space left on device"
    return (
        f"the state database {path} cannot be written: {what} ({text}); free some space "
        f"on the file system of {path.parent} (the database keeps every process: do not "
        "move it), then try again"
    )


def _out_of_space(error: sqlite3.Error | OSError, folder: Path) -> bool:
    """Whether ``error``, met writing a file in ``folder``, comes from a full disk."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    code = getattr(error, "sqlite_errorcode", None)
    if not isinstance(code, int):
        return False
    if code & 0xFF == SQLITE_FULL:
        return True
    return code & 0xFF == SQLITE_IOERR and _little_room(folder)


def _little_room(folder: Path) -> bool:
    """Whether the file system of ``folder`` has less than :data:`LOW_SPACE` bytes free
    for the agent's user (root may use the blocks reserved for it)."""
    try:
        info = os.statvfs(folder)
    except OSError:
        return False
    blocks = info.f_bfree if os.geteuid() == 0 else info.f_bavail
    return blocks * info.f_frsize < LOW_SPACE


def exits_json(exits: Iterable[ExitRecord]) -> str:
    """The exits column: a JSON list of ``{"code", "at", "ran_for", "reason"}``."""
    return json.dumps(
        [{"code": e.exit.code, "at": e.at, "ran_for": e.ran_for, "reason": e.reason}
         for e in exits],
        separators=(",", ":"),
    )


def _read_exits(slug: str, text: str) -> tuple[ExitRecord, ...]:
    """The exits of the exits column; none if it cannot be read (a history is not worth
    refusing to start over: it is said in the log)."""
    try:
        return tuple(
            ExitRecord(Exit(int(e["code"])), float(e["at"]), float(e["ran_for"]),
                       None if e["reason"] is None else str(e["reason"]))
            for e in json.loads(text)
        )
    except (ValueError, TypeError, KeyError) as error:
        log.warning("%s: its last exits cannot be read from the state database (%s): "
                    "they are forgotten", slug, error)
        return ()


#: Mode of the state folder: it holds the processes' secrets (their ``env``, their
#: output), for the agent's user alone.
STATE_DIR_MODE = 0o700
#: Mode of the state folder with :option:`--user`: the children's user may pass through
#: it to its sources and builds, not list it.
SHARED_STATE_DIR_MODE = 0o711
#: Mode of the folders the agent creates above its state folder: they lead to it and are
#: not the agent's to hide (the children's user of ``--user`` passes through them).
PARENT_DIR_MODE = 0o755
#: Mode of the folders below the state folder that only the agent reads (logs, archives).
PRIVATE_DIR_MODE = 0o700


def prepare_state_dir(folder: Path, *, shared: bool, private: Iterable[Path] = ()) -> None:
    """Create the state ``folder`` (and the missing folders above it) and make it the
    agent's: :data:`STATE_DIR_MODE`, or :data:`SHARED_STATE_DIR_MODE` when ``shared``
    with the children's user; each folder of ``private`` that exists,
    :data:`PRIVATE_DIR_MODE`. At every start, not only on creation: a folder made by an
    older agent, or by systemd's ``StateDirectory=`` (mode 0755), is closed too.

    Raises:
        OSError: the folder cannot be created. A folder whose mode the agent's user may
            not change (not its own) is only warned about.
    """
    _make_parents(folder.parent)
    folder.mkdir(exist_ok=True)
    modes = [(folder, SHARED_STATE_DIR_MODE if shared else STATE_DIR_MODE)]
    modes.extend((path, PRIVATE_DIR_MODE) for path in private)
    for path, mode in modes:
        try:
            path.chmod(mode)
        except FileNotFoundError:  # a private folder not made yet: made private
            continue
        except PermissionError as error:
            log.warning("cannot give %s the mode %04o (%s): other users may read what it "
                        "holds", path, mode, error.strerror)


def _make_parents(folder: Path) -> None:
    """``mkdir -p folder``, each folder it makes getting :data:`PARENT_DIR_MODE`
    whatever the umask (the agent's own is ``077``)."""
    if folder.is_dir():
        return
    _make_parents(folder.parent)
    try:
        folder.mkdir()
    except FileExistsError:  # made meanwhile; or a file, which the state folder reports
        return
    folder.chmod(PARENT_DIR_MODE)
