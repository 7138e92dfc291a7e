"""The state database (:mod:`smartmob_agent.store`) on its own: no agent, no processes.

Each test opens a real SQLite file in a fresh folder; damaged, locked, older and newer
databases are made with the :mod:`sqlite3` module directly, as a crash, an operator or
another version of the agent would leave them.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from smartmob_agent.model import Exit, ExitRecord
from smartmob_agent.store import (
    DATABASE_NAME,
    MIGRATIONS,
    SCHEMA_VERSION,
    Record,
    Store,
    StoreError,
)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """An existing, empty state folder."""
    path = tmp_path / "state"
    path.mkdir()
    return path


@pytest.fixture
def store(folder: Path) -> Iterator[Store]:
    """The database of ``folder``, open, closed after the test."""
    opened = Store.open(folder)
    yield opened
    opened.close()


def raw(folder: Path) -> sqlite3.Connection:
    """A plain connection to the folder's database (for what the agent never writes)."""
    return sqlite3.connect(folder / DATABASE_NAME, isolation_level=None)


def user_version(folder: Path) -> int:
    connection = raw(folder)
    try:
        return int(connection.execute("PRAGMA user_version").fetchone()[0])
    finally:
        connection.close()


def record(slug: str, **fields: Any) -> Record:
    """A record of ``slug`` with a small request and sensible defaults."""
    values: dict[str, Any] = {
        "request": {"app": "shop", "node": slug, "env": {"TOKEN": f"secret-{slug}"}},
        "desired": "running",
        "process_id": f"id-{slug}",
    }
    values.update(fields)
    return Record(slug, **values)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- opening ----------------------------------------------------------------------------


def test_open_creates_the_file_for_the_owner_only_at_the_current_schema(folder: Path) -> None:
    """Opening an empty folder creates ``agent.db`` with mode 0600 (it holds every
    request's env) at the latest schema version, with no process and no value."""
    opened = Store.open(folder)
    try:
        path = folder / DATABASE_NAME
        assert opened.path == path
        assert mode(path) == 0o600
        assert opened.load() == []
        assert opened.get_value("agent_id") is None
    finally:
        opened.close()
    assert SCHEMA_VERSION == len(MIGRATIONS) >= 1
    assert user_version(folder) == SCHEMA_VERSION


def test_reopening_keeps_everything(folder: Path) -> None:
    """What one open wrote, a later open reads back (closing loses nothing)."""
    first = Store.open(folder)
    first.add(record("a", port=8001))
    first.set_value("agent_id", "one")
    first.close()
    second = Store.open(folder)
    try:
        assert second.load() == [record("a", port=8001)]
        assert second.get_value("agent_id") == "one"
    finally:
        second.close()
    assert user_version(folder) == SCHEMA_VERSION


def test_no_file_of_the_database_is_readable_by_others(folder: Path) -> None:
    """Every file of the database (``agent.db`` and its ``-wal``/``-shm`` companions) is
    for the agent's user only, since each may hold a request's secret env (under the
    usual umask 022, which would let every user read what the agent does not protect)."""
    previous = os.umask(0o022)
    try:
        store = Store.open(folder)
    finally:
        os.umask(previous)
    try:
        store.add(record("a"))
        files = sorted(folder.glob(DATABASE_NAME + "*"))
        modes = {path.name: oct(mode(path)) for path in files}
        secret_on_disk = any(b"secret-a" in path.read_bytes() for path in files)
    finally:
        store.close()
    assert secret_on_disk
    assert modes == dict.fromkeys(modes, oct(0o600))


# -- reads and writes -------------------------------------------------------------------


def test_add_and_load_keep_creation_order_and_every_field(store: Store) -> None:
    """``load`` gives the records in the order they were added (not by slug), with their
    request, desired state, process id, port and restarts; pid and start time start
    empty."""
    added = [
        record("zeta", port=8005, restarts=2),
        record("alpha", desired="stopped"),
        record("mid", port=None, request={"nested": {"list": [1, "two", None]}}),
    ]
    for each in added:
        store.add(each)
    assert store.load() == added
    assert [r.slug for r in store.load()] == ["zeta", "alpha", "mid"]


def test_order_survives_removals(store: Store) -> None:
    """After removing the first and the last record, new ones still come after those
    left (creation order, not slot reuse before older ones)."""
    for slug in ("a", "b", "c"):
        store.add(record(slug))
    store.remove("a")
    store.remove("c")
    store.add(record("d"))
    store.add(record("a"))
    assert [r.slug for r in store.load()] == ["b", "d", "a"]


def test_set_desired_set_child_and_remove(store: Store) -> None:
    """``set_desired`` and ``set_child`` change one record only; ``set_child`` with no
    pid clears it; ``remove`` forgets the record for good; each is a no-op for an
    unknown slug."""
    store.add(record("a"))
    store.add(record("b", port=9000))
    store.set_desired("a", "stopped")
    store.set_child("b", 4242, 1_700_000_000.25, 3)
    by_slug = {r.slug: r for r in store.load()}
    assert by_slug["a"] == record("a", desired="stopped")
    assert by_slug["b"] == record("b", port=9000, pid=4242, pid_started=1_700_000_000.25,
                                  restarts=3)
    store.set_child("b", None, None, 4)
    assert store.load()[1] == record("b", port=9000, restarts=4)
    store.set_desired("a", "running")
    assert store.load()[0].desired == "running"

    store.set_desired("ghost", "stopped")
    store.set_child("ghost", 1, 1.0, 1)
    store.remove("ghost")
    store.remove("a")
    assert [r.slug for r in store.load()] == ["b"]


def test_an_invalid_desired_state_is_refused(store: Store) -> None:
    """The database accepts only ``running`` and ``stopped`` as desired states."""
    store.add(record("a"))
    with pytest.raises(StoreError, match="cannot be written"):
        store.set_desired("a", "paused")
    with pytest.raises(StoreError):
        store.add(record("b", desired="maybe"))
    assert store.load() == [record("a")]


def test_a_slug_is_added_once(store: Store) -> None:
    """Adding a slug that is already there fails, and leaves the first record as it was."""
    store.add(record("a", port=1))
    with pytest.raises(StoreError, match="cannot be written"):
        store.add(record("a", port=2))
    assert store.load() == [record("a", port=1)]


def test_values(store: Store) -> None:
    """``get_value`` gives what ``set_value`` kept (the last one wins) and ``None`` for an
    unknown key."""
    assert store.get_value("agent_id") is None
    store.set_value("agent_id", "first")
    store.set_value("other", "x")
    store.set_value("agent_id", "second")
    assert store.get_value("agent_id") == "second"
    assert store.get_value("other") == "x"
    assert store.get_value("missing") is None


def test_use_after_close_is_a_store_error(folder: Path) -> None:
    """A closed store raises :class:`StoreError`, not a bare ``sqlite3`` error."""
    opened = Store.open(folder)
    opened.close()
    with pytest.raises(StoreError):
        opened.load()


# -- a second agent ---------------------------------------------------------------------


def test_a_second_open_of_the_same_folder_is_refused(folder: Path, store: Store) -> None:
    """While one agent has the database open, a second open (another agent on the same
    folder would run every process twice) fails, saying so and what to do; once the
    first closes, it succeeds."""
    store.add(record("a"))
    with pytest.raises(StoreError) as caught:
        Store.open(folder)
    message = str(caught.value)
    assert str(folder / DATABASE_NAME) in message
    assert "in use by another smartmob-agent" in message
    assert "--state-dir" in message
    # nor can anything else read it meanwhile
    connection = raw(folder)
    connection.execute("PRAGMA busy_timeout = 0")
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            connection.execute("SELECT * FROM processes").fetchall()
    finally:
        connection.close()
    store.close()
    again = Store.open(folder)
    try:
        assert again.load() == [record("a")]
    finally:
        again.close()


# -- damaged databases ------------------------------------------------------------------


def assert_move_aside_advice(message: str, folder: Path) -> None:
    path = str(folder / DATABASE_NAME)
    assert path in message
    assert f"move {path} aside" in message
    assert "--state-dir" in message


def test_a_file_that_is_not_a_database_is_refused_with_advice(folder: Path) -> None:
    """Garbage in ``agent.db`` is a :class:`StoreError` naming the file and saying to move
    it aside (or use another folder); the file is left untouched."""
    garbage = b"this is not an SQLite database, just some bytes\n" * 100
    (folder / DATABASE_NAME).write_bytes(garbage)
    with pytest.raises(StoreError) as caught:
        Store.open(folder)
    assert_move_aside_advice(str(caught.value), folder)
    assert (folder / DATABASE_NAME).read_bytes() == garbage


def corrupt_page(folder: Path, page: int) -> None:
    """Overwrite page ``page`` (1-based) of the closed database with 0xff bytes."""
    path = folder / DATABASE_NAME
    assert not path.with_name(DATABASE_NAME + "-wal").exists()  # all is in the main file
    connection = raw(folder)
    size = int(connection.execute("PRAGMA page_size").fetchone()[0])
    connection.close()
    data = bytearray(path.read_bytes())
    data[size * (page - 1):size * page] = b"\xff" * size
    path.write_bytes(bytes(data))


def test_a_corrupt_table_is_refused_with_advice(folder: Path) -> None:
    """A database whose ``processes`` table is damaged is a :class:`StoreError` with the
    move-aside advice, at open."""
    opened = Store.open(folder)
    opened.add(record("a"))
    opened.close()
    connection = raw(folder)
    root = connection.execute(
        "SELECT rootpage FROM sqlite_master WHERE name = 'processes'"
    ).fetchone()[0]
    connection.close()
    corrupt_page(folder, root)
    with pytest.raises(StoreError) as caught:
        Store.open(folder)
    assert_move_aside_advice(str(caught.value), folder)


def test_a_corrupt_index_is_refused_at_open(folder: Path) -> None:
    """A database whose slug index is damaged (found by the integrity check at open) is a
    :class:`StoreError` with the move-aside advice at open, not on a later write."""
    opened = Store.open(folder)
    opened.add(record("a"))
    opened.close()
    connection = raw(folder)
    root = connection.execute(
        "SELECT rootpage FROM sqlite_master WHERE name = 'sqlite_autoindex_processes_1'"
    ).fetchone()[0]
    connection.close()
    corrupt_page(folder, root)
    try:
        reopened = Store.open(folder)
    except StoreError as error:
        assert_move_aside_advice(str(error), folder)
        return
    try:
        with pytest.raises(StoreError):  # how the damage shows today: on a write
            reopened.set_desired("a", "stopped")
    finally:
        reopened.close()
    pytest.fail("a database with a damaged index was opened")


def test_an_unreadable_request_is_a_store_error(folder: Path) -> None:
    """A row whose request is not JSON makes ``load`` raise a :class:`StoreError` naming
    the slug and saying what to do."""
    opened = Store.open(folder)
    opened.add(record("good"))
    opened.add(record("bad"))
    opened.close()
    connection = raw(folder)
    connection.execute("UPDATE processes SET request = '{not json' WHERE slug = 'bad'")
    connection.close()
    reopened = Store.open(folder)
    try:
        with pytest.raises(StoreError) as caught:
            reopened.load()
    finally:
        reopened.close()
    assert "unreadable request for 'bad'" in str(caught.value)
    assert_move_aside_advice(str(caught.value), folder)


# -- schema versions --------------------------------------------------------------------


def test_a_newer_schema_is_refused(folder: Path) -> None:
    """A database from a newer agent (higher ``user_version``) is refused with a message
    that says so and what to do; its version is left as it was."""
    connection = raw(folder)
    connection.execute("CREATE TABLE future (x)")
    connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    connection.close()
    with pytest.raises(StoreError) as caught:
        Store.open(folder)
    message = str(caught.value)
    assert str(folder / DATABASE_NAME) in message
    assert "newer smartmob-agent" in message
    assert f"schema {SCHEMA_VERSION + 5}" in message
    assert "upgrade the agent" in message
    assert "--state-dir" in message
    assert user_version(folder) == SCHEMA_VERSION + 5
    # the refusal released the file: a second try says the same, not "in use"
    with pytest.raises(StoreError, match="newer smartmob-agent"):
        Store.open(folder)


def test_an_empty_database_of_version_0_is_migrated(folder: Path) -> None:
    """An empty file (as ``sqlite3.connect`` leaves it, schema version 0) is brought to
    the current schema and works."""
    raw(folder).close()
    assert (folder / DATABASE_NAME).stat().st_size == 0
    opened = Store.open(folder)
    try:
        opened.add(record("a"))
        opened.set_value("agent_id", "x")
        assert opened.load() == [record("a")]
    finally:
        opened.close()
    assert user_version(folder) == SCHEMA_VERSION
    assert mode(folder / DATABASE_NAME) == 0o600


def test_each_migration_starts_from_the_version_before(folder: Path) -> None:
    """A database left at version 1 (first migration only, with a row) gets the later
    migrations only, and keeps its row."""
    connection = raw(folder)
    connection.execute(MIGRATIONS[0])
    connection.execute(
        "INSERT INTO processes (slug, position, request, desired, process_id, port) "
        "VALUES ('old', 1, ?, 'stopped', 'pid-old', 8123)",
        (json.dumps({"app": "old"}),),
    )
    connection.execute("PRAGMA user_version = 1")
    connection.close()
    opened = Store.open(folder)
    try:
        assert opened.load() == [Record("old", {"app": "old"}, "stopped", "pid-old", 8123)]
        opened.set_value("agent_id", "y")  # a table a later migration made
        assert opened.get_value("agent_id") == "y"
    finally:
        opened.close()
    assert user_version(folder) == SCHEMA_VERSION


def older_database(folder: Path, column: str) -> None:
    """Leave in ``folder`` a database of the version before the migration that added
    ``column``, holding one process, ``old``."""
    (before,) = [i for i, step in enumerate(MIGRATIONS) if f"ADD COLUMN {column} " in step]
    connection = raw(folder)
    for step in MIGRATIONS[:before]:
        connection.execute(step)
    connection.execute(
        "INSERT INTO processes (slug, position, request, desired, process_id) "
        "VALUES ('old', 1, ?, 'running', 'pid-old')", (json.dumps({"app": "old"}),),
    )
    connection.execute(f"PRAGMA user_version = {before}")
    connection.close()


def test_the_reserved_seq_mark_is_kept_and_migrated(folder: Path) -> None:
    """The mark below which a process's output lines may be numbered survives a reopen;
    a database from before it gets it as 0 for each row."""
    older_database(folder, "seq_reserved")
    opened = Store.open(folder)
    try:
        assert opened.load() == [Record("old", {"app": "old"}, "running", "pid-old")]
        assert opened.load()[0].seq_reserved == 0
        opened.add(record("new"))
        opened.set_seq_reserved("new", 100_042)
        opened.set_seq_reserved("gone", 7)  # a deleted process: nothing to update
    finally:
        opened.close()
    again = Store.open(folder)
    try:
        assert {r.slug: r.seq_reserved for r in again.load()} == {"old": 0, "new": 100_042}
    finally:
        again.close()
    assert user_version(folder) == SCHEMA_VERSION


def test_the_last_exits_are_kept_and_migrated(folder: Path) -> None:
    """A process's last exits (code, time, run length and reason, oldest first) survive a
    reopen exactly; ``set_exits`` replaces them; a database from before them gets none
    for each row, and an unreadable list is forgotten (said in the log), not refused."""
    older_database(folder, "exits")
    exits = (ExitRecord(Exit(3), 1796148000.123456, 0.25),
             ExitRecord(Exit(-15), 1796148001.5, 12.000001, "stopped"))
    opened = Store.open(folder)
    try:
        assert opened.load()[0].exits == ()
        opened.add(record("new"))
        opened.set_exits("new", exits[:1])
        opened.set_exits("new", exits)
        opened.set_exits("gone", exits)  # a deleted process: nothing to update
    finally:
        opened.close()
    again = Store.open(folder)
    try:
        assert {r.slug: r.exits for r in again.load()} == {"old": (), "new": exits}
    finally:
        again.close()
    connection = raw(folder)
    connection.execute("UPDATE processes SET exits = '[{\"code\": \"x\"}]' WHERE slug = 'new'")
    connection.close()
    third = Store.open(folder)
    try:
        assert [r.exits for r in third.load()] == [(), ()]
    finally:
        third.close()
    assert user_version(folder) == SCHEMA_VERSION
