"""Reads the machine's figures with ``psutil``: one :class:`~smartmob_agent.host.shape.HostSample`.

``psutil`` is imported here, inside :func:`read_sample`, and so only once someone asks for
host statistics: an agent nobody asks does not load it for this. Nothing here shells out
(no ``ps``, ``uptime`` or ``who``). A sample reads a few small files of ``/proc`` and
``statvfs`` of one filesystem: about a millisecond, run in a worker thread by
:func:`sample` so that a slow ``/proc`` never holds up the event loop.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path
from typing import Any

from smartmob_agent.host.shape import CoreTimes, HostSample

#: Fields of psutil's CPU times that count as a core doing nothing.
_IDLE_FIELDS = ("idle", "iowait")
#: Fields that Linux counts inside ``user`` and ``nice`` already (added again, a guest's
#: time would count twice).
_GUEST_FIELDS = ("guest", "guest_nice")


def core_times(times: Any) -> CoreTimes:
    """Busy and total seconds of one of psutil's ``cpu_times(percpu=True)`` entries."""
    fields = times._asdict()
    total = sum(value for name, value in fields.items() if name not in _GUEST_FIELDS)
    idle = sum(fields.get(name, 0.0) for name in _IDLE_FIELDS)
    return (total - idle, total)


def read_sample(disk_path: Path) -> HostSample:
    """The machine's figures now, and those of this process (the agent).

    Args:
        disk_path: a path on the filesystem whose use is reported (the state folder; its
            nearest existing parent if it does not exist yet).
    """
    import psutil  # here: only an agent asked for host statistics loads it for them

    path = disk_path
    while not path.exists() and path != path.parent:
        path = path.parent
    disk = psutil.disk_usage(str(path))
    memory = psutil.virtual_memory()
    swap = psutil.swap_memory()
    network = psutil.net_io_counters()
    me = psutil.Process()
    with me.oneshot():
        mine = me.cpu_times()
        rss = me.memory_info().rss
    return HostSample(
        hostname=socket.gethostname(),
        at=time.time(),
        monotonic=time.monotonic(),
        boot_time=psutil.boot_time(),
        users=len(psutil.users()),
        load=os.getloadavg(),
        cores=tuple(core_times(times) for times in psutil.cpu_times(percpu=True)),
        memory={
            "total": memory.total, "used": memory.used, "available": memory.available,
            # "cached" is Linux's; elsewhere the page cache is not told apart
            "cached": getattr(memory, "cached", 0),
        },
        swap={"total": swap.total, "used": swap.used, "free": swap.free},
        disk={"path": str(disk_path), "total": disk.total, "used": disk.used,
              "free": disk.free},
        network={
            "bytes_in": network.bytes_recv if network is not None else 0,
            "bytes_out": network.bytes_sent if network is not None else 0,
        },
        agent_pid=me.pid,
        agent_rss=rss,
        agent_cpu=mine.user + mine.system,
    )


async def sample(disk_path: Path) -> HostSample:
    """:func:`read_sample`, in a worker thread."""
    return await asyncio.to_thread(read_sample, disk_path)
