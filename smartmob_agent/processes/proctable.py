"""Reading the process table (``/proc``): processes by an inherited environment entry,
and one scan of every process for the stop of many trees at once.

A process that leaves its process group (``setsid``) and whose parent dies can no longer
be found through the group or the process tree. Every child of the agent carries marker
entries in its environment, which all its descendants inherit (unless they clear their
environment on purpose), so scanning ``/proc/*/environ`` finds them wherever they went.

:func:`scan` reads the whole table once (each process's parent, group, start time and
markers), so that stopping many processes costs one pass over ``/proc``, not one per
process (see :func:`smartmob_agent.processes.stop.one_scan`). It is blocking file I/O:
callers on an event loop run it in a thread.

Standard library only: the guardian, a separate small program, uses it too; and the
agent reads the few fields it needs itself (descendants, start times, zombies) rather
than import ``psutil``, about a megabyte of memory for three numbers.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

#: The start of the name of every marker entry (``SMARTMOB_AGENT_ID=...``,
#: ``SMARTMOB_PROCESS_ID=...``): a scan keeps only these of each environment.
MARKER_PREFIX = b"SMARTMOB_"
# fields of /proc/[pid]/stat after the ")" that ends the command name (proc(5) numbers
# them from 1 with the pid; the state, field 3, is index 0 here)
_STATE, _PPID, _PGRP, _STARTTIME = 0, 1, 2, 19
_DEAD = (b"Z", b"X")
_TICKS = os.sysconf("SC_CLK_TCK")


def marked_processes(marker: bytes, proc: str = "/proc") -> list[int]:
    """Pids of processes whose environment contains exactly the entry ``marker``.

    Args:
        marker: a whole ``NAME=value`` entry, as bytes.
        proc: where the process table is mounted.
    """
    found = []
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        try:
            with open(f"{proc}/{name}/environ", "rb") as file:
                environ = file.read()
        except OSError:  # gone, or not ours to read
            continue
        if marker in environ.split(b"\0"):
            found.append(int(name))
    return found


class Entry:
    """One process as a :func:`scan` found it: its ``pid``, its ``parent``'s pid, its
    process ``group``, when it ``started`` (clock ticks since boot: with the pid, it
    names one process for good, see :func:`started`), and its ``markers``, the entries
    of its environment whose name starts with :data:`MARKER_PREFIX` (none if it was not
    ours to read)."""

    __slots__ = ("group", "markers", "parent", "pid", "started")

    def __init__(self, pid: int, parent: int, group: int, started: int,
                 markers: frozenset[bytes]) -> None:
        self.pid = pid
        self.parent = parent
        self.group = group
        self.started = started
        self.markers = markers

    def __repr__(self) -> str:
        return f"Entry(pid={self.pid}, parent={self.parent}, group={self.group})"


class Table:
    """The processes of one :func:`scan`, by pid."""

    def __init__(self, entries: Iterable[Entry]) -> None:
        self.entries = {entry.pid: entry for entry in entries}
        self._children: dict[int, list[Entry]] = {}
        for entry in self.entries.values():
            self._children.setdefault(entry.parent, []).append(entry)

    def descendants(self, pid: int) -> list[Entry]:
        """Every process below ``pid`` in the process tree, wherever its group."""
        found: list[Entry] = []
        below = list(self._children.get(pid, ()))
        while below:
            entry = below.pop()
            found.append(entry)
            below.extend(self._children.get(entry.pid, ()))
        return found

    def marked(self, marker: bytes) -> list[Entry]:
        """Every process whose environment holds the entry ``marker`` (``NAME=value``,
        whose name starts with :data:`MARKER_PREFIX`)."""
        if not marker.startswith(MARKER_PREFIX):
            raise ValueError(f"a scan keeps only markers that start with {MARKER_PREFIX!r}")
        return [entry for entry in self.entries.values() if marker in entry.markers]


def _fields(pid: str, proc: str) -> list[bytes] | None:
    """The fields of ``/proc/[pid]/stat`` after the command name, or ``None``."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as file:
            return file.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):  # gone
        return None


def _markers(pid: str, proc: str) -> frozenset[bytes]:
    try:
        with open(f"{proc}/{pid}/environ", "rb") as file:
            environ = file.read()
    except OSError:  # gone, or not ours to read: its place in the tree still counts
        return frozenset()
    if MARKER_PREFIX not in environ:
        return frozenset()
    return frozenset(e for e in environ.split(b"\0") if e.startswith(MARKER_PREFIX))


def _entries(proc: str) -> Iterator[Entry]:
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        fields = _fields(name, proc)
        if fields is None or fields[_STATE] in _DEAD:
            continue
        yield Entry(int(name), int(fields[_PPID]), int(fields[_PGRP]),
                    int(fields[_STARTTIME]), _markers(name, proc))


def scan(proc: str = "/proc") -> Table:
    """One pass over the process table: every live process (zombies left out), with its
    parent, group, start time and markers. Blocking: run it in a thread from a loop."""
    return Table(_entries(proc))


def started(pid: int, proc: str = "/proc") -> int | None:
    """When ``pid`` started (clock ticks since boot), or ``None`` if it is gone or a
    zombie: compared with :attr:`Entry.started`, it tells whether the pid still names
    the process a scan found."""
    fields = _fields(str(pid), proc)
    if fields is None or fields[_STATE] in _DEAD:
        return None
    return int(fields[_STARTTIME])


def is_zombie(pid: int, proc: str = "/proc") -> bool:
    """Whether ``pid`` is a zombie (dead, waiting to be reaped)."""
    fields = _fields(str(pid), proc)
    return fields is not None and fields[_STATE] == b"Z"


_boot_times: dict[str, float] = {}  # by proc folder: it does not change


def _boot_time(proc: str) -> float:
    """When the machine booted (seconds since the epoch), from ``/proc/stat``, read once:
    a start time is read for every child spawned."""
    found = _boot_times.get(proc)
    if found is not None:
        return found
    with open(f"{proc}/stat", "rb") as file:
        for line in file:
            if line.startswith(b"btime "):
                found = _boot_times[proc] = float(line.split()[1])
                return found
    raise OSError(f"no btime in {proc}/stat")


def start_time(pid: int, proc: str = "/proc") -> float | None:
    """When ``pid`` started (seconds since the epoch, as ``psutil``'s ``create_time``
    reads it: boot time plus the start in clock ticks), or ``None`` if it is gone."""
    fields = _fields(str(pid), proc)
    if fields is None:
        return None
    try:
        return _boot_time(proc) + int(fields[_STARTTIME]) / _TICKS
    except (OSError, ValueError, IndexError):
        return None


def descendants(pid: int, proc: str = "/proc") -> list[int]:
    """The pids below ``pid`` in the process tree (zombies included), wherever their
    group: one pass over ``/proc/*/stat`` (not the environments a :func:`scan` reads).
    ``[]`` if it is gone. Blocking, as :func:`scan`."""
    children: dict[int, list[int]] = {}
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        fields = _fields(name, proc)
        if fields is not None and len(fields) > _PPID:
            children.setdefault(int(fields[_PPID]), []).append(int(name))
    found: list[int] = []
    pending = [pid]
    seen = {pid}
    while pending:
        for child in children.get(pending.pop(), ()):
            if child not in seen:  # a pid reused during the scan could close a loop
                seen.add(child)
                found.append(child)
                pending.append(child)
    return found
