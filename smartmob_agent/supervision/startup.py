"""What the agent does once as it starts, before any process runs.

It checks that the children's user (:option:`--user`) can reach its folders, then takes
over from an earlier agent. The state database holds every process that agent was asked
to run (see :mod:`~smartmob_agent.store`). Before any of them runs again, whatever that
agent left running is stopped, so that nothing ever runs twice: every descendant it
started carries its id in its environment, and each process's last child is also found
by its pid and start time. The folders of processes deleted while that agent crashed go
too.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterable, Set
from pathlib import Path

from smartmob_agent.errors import AgentError
from smartmob_agent.model import Resumed, RunAs, Spec
from smartmob_agent.processes.stop import one_scan, stop_marked, stop_survivor
from smartmob_agent.processes.users import blocked_folder
from smartmob_agent.schemas import create_request, spec_from_request
from smartmob_agent.store import Record, Store, StoreError
from smartmob_agent.supervision.update import releases_from_json

log = logging.getLogger("smartmob_agent.agent")  # stable name: its messages were the agent's

#: Set in every child's environment; the guardian finds the agent's descendants by it.
AGENT_ID_VARIABLE = "SMARTMOB_AGENT_ID"


def check_reachable(folders: Iterable[Path], run_as: RunAs) -> None:
    """Let the children's user pass through the agent's ``folders``, and refuse to start
    if a folder above them (the operator's) keeps it out.

    Raises:
        AgentError: naming the folder the user cannot pass through.
    """
    for folder in folders:
        folder.chmod(folder.stat().st_mode | 0o111)  # search only: no listing
        blocked = blocked_folder(folder, run_as)
        if blocked is not None:
            raise AgentError(
                f"the children's user {run_as.name} cannot reach {folder}: it may not "
                f"pass through {blocked} (mode {blocked.stat().st_mode & 0o7777:04o}); "
                "let it (chmod o+x), or choose another --state-dir"
            )
    python = Path(os.path.realpath(sys.executable))
    if blocked_folder(python.parent, run_as) is not None or not python.stat().st_mode & 0o001:
        log.warning(
            "the children's user %s may not run this agent's Python (%s): building a "
            "source that has a requirements.txt will fail", run_as.name, python,
        )


async def take_over(
    store: Store, agent_id: str, stop_timeout: float, folders: Iterable[Path]
) -> list[Record]:
    """Return every process of the state database, in creation order, once whatever an
    earlier agent left running is stopped and the process folders (one per slug, in each
    of ``folders``) of the processes it no longer holds are removed; record ``agent_id``
    as the id of the agent that now runs them.

    Raises:
        StoreError: the database cannot be read or written.
        AgentError: what the earlier agent left running would not end.
    """
    records = store.load()
    previous = store.get_value("agent_id")
    try:
        if previous is not None:
            # everything the earlier agent started carries its id, wherever it went
            left = await stop_marked(f"{AGENT_ID_VARIABLE}={previous}", stop_timeout)
            if left:
                log.warning("stopped %d process(es) left running by the previous agent",
                            left)
        with one_scan():  # the descendants of every survivor from one pass over /proc
            survivors = await asyncio.gather(*(
                stop_survivor(r.pid, r.pid_started, stop_timeout)
                for r in records if r.pid is not None and r.pid_started is not None
            ))
    except TimeoutError:
        raise AgentError(
            "processes left running by the previous agent did not end even after "
            "SIGKILL (stuck in the kernel?): not starting, so that no process runs twice"
        ) from None
    # only now: an agent that dies during the stops leaves the next one the same work
    store.set_value("agent_id", agent_id)
    if any(survivors):
        log.warning("stopped %d child(ren) of the previous agent found by pid and "
                    "start time", sum(survivors))
    # a delete cut short by a crash (its row goes first) leaves the process's folders,
    # which no later agent would know of: remove them, now that nothing runs there
    known = {record.slug for record in records}
    try:
        removed = await asyncio.to_thread(_remove_unknown, folders, known)
    except OSError as error:
        log.warning("could not clean the folders of deleted processes: %s", error)
    else:
        if removed:
            log.info("removed the folders of %d deleted process(es)", removed)
    return records


def resumed(record: Record, database: Path) -> tuple[Spec, Resumed]:
    """The spec of the process ``record`` holds, and what the earlier agent left of it.

    Raises:
        StoreError: its request is one this agent cannot read (the message says what to
            do; ``database`` is the file).
    """
    try:
        spec = spec_from_request(create_request.validate(record.request))
    except AgentError as error:
        raise StoreError(
            f"the state database {database} holds a request for {record.slug!r} this agent "
            f"cannot read ({error}): start the agent that wrote it, or move the database "
            "aside"
        ) from None
    return spec, Resumed(
        record.process_id, stopped=record.desired == "stopped", restarts=record.restarts,
        seq_start=record.seq_reserved, exits=record.exits,
        releases=releases_from_json(record.releases, time.time()),
    )


def _remove_unknown(parents: Iterable[Path], known: Set[str]) -> int:
    """Remove every folder in ``parents`` not named after a ``known`` slug; return how
    many slugs had one."""
    removed: set[str] = set()
    for parent in parents:
        if not parent.is_dir():
            continue
        for entry in parent.iterdir():
            if entry.name not in known and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
                removed.add(entry.name)
    return len(removed)
