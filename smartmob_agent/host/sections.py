"""The host statistics plugins that ship with the agent (entry points of
``smartmob_agent.host_stats`` in ``setup.cfg``): pure."""

from __future__ import annotations

from typing import Any

from smartmob_agent.host.shape import HostContext
from smartmob_agent.model import ProcessState


def process_types(context: HostContext) -> dict[str, Any]:
    """Totals per process type of each app: how many processes, how many running, their
    restarts, CPU (percent of one core, as last sampled) and resident memory (bytes).

    The ``types`` list is sorted by app, then process type.
    """
    totals: dict[tuple[str, str], dict[str, Any]] = {}
    for info in context.processes:
        key = (info.spec.app, info.spec.process_type)
        total = totals.setdefault(key, {
            "app": key[0], "process_type": key[1], "processes": 0, "running": 0,
            "restarts": 0, "cpu_percent": 0.0, "memory_rss": 0,
        })
        total["processes"] += 1
        total["running"] += info.state is ProcessState.RUNNING
        total["restarts"] += info.restarts
        total["cpu_percent"] = round(total["cpu_percent"] + (info.cpu_percent or 0.0), 1)
        total["memory_rss"] += info.memory_rss or 0
    return {"types": [totals[key] for key in sorted(totals)]}
