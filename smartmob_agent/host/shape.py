"""The host statistics snapshot as a JSON document, from raw samples: pure.

A :class:`HostSample` is what :mod:`smartmob_agent.host.gather` reads from the machine at
one moment. CPU use is a rate, so it needs two samples: :func:`snapshot_document` takes the
previous sample of the same client too, and the percentages it gives are measured between
the two (``cpu.interval`` seconds), never since boot.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smartmob_agent.model import ProcessInfo, ProcessState
from smartmob_agent.representations import format_time

#: The busy and total seconds of one CPU core since boot.
CoreTimes = tuple[float, float]


@dataclass(frozen=True)
class HostSample:
    """The raw figures of the machine and the agent at one moment.

    Attributes:
        hostname: the machine's name.
        at: when (epoch seconds).
        monotonic: when, on the monotonic clock (rates are measured on it).
        boot_time: when the machine booted (epoch seconds).
        users: how many sessions of users are open (logged in, as ``who`` lists them).
        load: the load average over 1, 5 and 15 minutes.
        cores: busy and total CPU seconds of each core since boot.
        memory: ``total``, ``used``, ``available`` and ``cached`` bytes.
        swap: ``total``, ``used`` and ``free`` bytes.
        disk: the state folder's filesystem: ``path``, ``total``, ``used``, ``free``.
        network: ``bytes_in`` and ``bytes_out`` of every interface since boot.
        agent_pid: the agent's pid.
        agent_rss: the agent's resident set, in bytes.
        agent_cpu: CPU seconds (user + system) the agent has used.
    """

    hostname: str
    at: float
    monotonic: float
    boot_time: float
    users: int
    load: tuple[float, float, float]
    cores: tuple[CoreTimes, ...]
    memory: Mapping[str, int]
    swap: Mapping[str, int]
    disk: Mapping[str, Any]
    network: Mapping[str, int]
    agent_pid: int
    agent_rss: int
    agent_cpu: float


@dataclass(frozen=True)
class HostContext:
    """What a plugin is given.

    Attributes:
        processes: the processes the client asking may see (an app key: its app's),
            in creation order.
        state_dir: the agent's state folder.
    """

    processes: tuple[ProcessInfo, ...]
    state_dir: Path


def busy_percent(before: CoreTimes, after: CoreTimes) -> float:
    """The share of time a core was busy between two of its samples, in percent.

    >>> from smartmob_agent.host.shape import busy_percent
    >>> busy_percent((10.0, 100.0), (10.5, 102.0)), busy_percent((1.0, 5.0), (1.0, 5.0))
    (25.0, 0.0)
    """
    total = after[1] - before[1]
    if total <= 0:  # no tick between the samples (or a counter that went back)
        return 0.0
    return round(min(100.0, max(0.0, 100.0 * (after[0] - before[0]) / total)), 1)


def cpu_section(sample: HostSample, previous: HostSample | None) -> dict[str, Any]:
    """The ``cpu`` section: per core and in all, over the time since ``previous``
    (``null`` figures without one: a rate needs two samples)."""
    count = len(sample.cores)
    if previous is None or len(previous.cores) != count:  # a core went on or offline
        return {"count": count, "percent": None, "per_core": None, "interval": None}
    per_core = [busy_percent(old, new)
                for old, new in zip(previous.cores, sample.cores, strict=True)]
    whole = busy_percent(
        (sum(core[0] for core in previous.cores), sum(core[1] for core in previous.cores)),
        (sum(core[0] for core in sample.cores), sum(core[1] for core in sample.cores)),
    )
    interval = round(sample.monotonic - previous.monotonic, 3)
    return {"count": count, "percent": whole, "per_core": per_core, "interval": interval}


def _percent(part: float, whole: float) -> float:
    return round(100.0 * part / whole, 1) if whole > 0 else 0.0


def agent_section(
    sample: HostSample, previous: HostSample | None, processes: Iterable[ProcessInfo]
) -> dict[str, Any]:
    """The ``agent`` section: its pid, resident set, CPU use (percent of one core, over
    the time since ``previous``) and how many processes it runs, by state."""
    cpu = None
    if previous is not None and sample.monotonic > previous.monotonic:
        used = max(0.0, sample.agent_cpu - previous.agent_cpu)
        cpu = round(100.0 * used / (sample.monotonic - previous.monotonic), 1)
    states = Counter(info.state for info in processes)
    return {
        "pid": sample.agent_pid,
        "rss": sample.agent_rss,
        "cpu_percent": cpu,
        "processes": sum(states.values()),
        "states": {state.value: states[state] for state in ProcessState if states[state]},
    }


def snapshot_document(
    sample: HostSample,
    previous: HostSample | None,
    processes: Sequence[ProcessInfo],
    plugins: Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    """The snapshot: the machine, the agent and the plugins' sections.

    Args:
        sample: the figures now.
        previous: an earlier sample of the same client, which CPU use is measured from.
        processes: the processes the client may see (an app key sees its app's).
        plugins: each plugin's section, by its name.
    """
    memory, swap, disk = sample.memory, sample.swap, sample.disk
    return {
        "hostname": sample.hostname,
        "time": format_time(sample.at),
        "boot_time": format_time(sample.boot_time),
        "uptime": round(max(0.0, sample.at - sample.boot_time), 3),
        "users": sample.users,
        "load": list(sample.load),
        "cpu": cpu_section(sample, previous),
        "memory": {**memory, "percent": _percent(memory["used"], memory["total"])},
        "swap": {**swap, "percent": _percent(swap["used"], swap["total"])},
        "disk": {**disk, "percent": _percent(disk["used"], disk["total"])},
        "network": dict(sample.network),
        "agent": agent_section(sample, previous, processes),
        "plugins": {name: dict(section) for name, section in plugins.items()},
    }
