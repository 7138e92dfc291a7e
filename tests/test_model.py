"""The process model: the transition table, exits, specs."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import signal
import sys

import pytest

from smartmob_agent.errors import AgentError, InvalidTransition
from smartmob_agent.model import (
    RESTING_STATES,
    TRANSITIONS,
    Exit,
    ExitRecord,
    ProcessInfo,
    ProcessState,
    Spec,
    check_transition,
)

S = ProcessState
LEGAL = sorted((old, new) for old, targets in TRANSITIONS.items() for new in targets)
ILLEGAL = sorted(
    (old, new) for old, new in itertools.product(S, S) if new not in TRANSITIONS[old]
)

#: The lifecycle of design.md section 3, edge by edge.
DOCUMENTED_EDGES = {
    (S.PENDING, S.DOWNLOADING), (S.DOWNLOADING, S.UNPACKING), (S.UNPACKING, S.STARTING),
    (S.STARTING, S.RUNNING), (S.RUNNING, S.BACKOFF), (S.BACKOFF, S.STARTING),
    (S.STOPPING, S.STOPPED),
    # issue 4's build step, between unpacking and starting
    (S.UNPACKING, S.BUILDING), (S.BUILDING, S.STARTING),
}


def test_state_values_are_the_api_contract() -> None:
    """The states are exactly the strings design.md lists, and print as those strings."""
    assert [state.value for state in S] == [
        "pending", "downloading", "unpacking", "building", "starting", "running",
        "backoff", "stopping", "stopped", "exited", "failed",
    ]
    for state in S:
        assert str(state) == state.value
        assert f"{state}" == state.value
        assert json.dumps(state) == f'"{state.value}"'
        assert S(state.value) is state


def test_every_state_has_a_row() -> None:
    """The transition table has one row per state and only states as targets."""
    assert set(TRANSITIONS) == set(S)
    for targets in TRANSITIONS.values():
        assert targets <= set(S)


def test_table_is_read_only() -> None:
    """Nobody can add an edge to the table at run time."""
    with pytest.raises(TypeError):
        TRANSITIONS[S.STOPPED] = frozenset({S.PENDING})  # type: ignore[index]  # read-only: tested


@pytest.mark.parametrize(("old", "new"), LEGAL, ids=lambda s: str(s))
def test_legal_transitions_are_accepted(old: ProcessState, new: ProcessState) -> None:
    """Each edge of the table passes check_transition()."""
    check_transition(old, new)


@pytest.mark.parametrize(("old", "new"), ILLEGAL, ids=lambda s: str(s))
def test_illegal_transitions_raise(old: ProcessState, new: ProcessState) -> None:
    """Each pair of states with no edge raises InvalidTransition naming both: a bug of the
    agent, which no request causes, so no AgentError (those are answered as the client's
    fault, or end a process in ``failed`` without a traceback)."""
    with pytest.raises(InvalidTransition) as caught:
        check_transition(old, new)
    assert f"from {old} to {new}" in str(caught.value)
    assert not isinstance(caught.value, AgentError)


def test_pairs_cover_the_whole_square() -> None:
    """Legal and illegal pairs together are every ordered pair of states, without overlap."""
    assert len(LEGAL) + len(ILLEGAL) == len(S) ** 2
    assert not set(LEGAL) & set(ILLEGAL)


def test_documented_lifecycle_is_legal() -> None:
    """Every edge of the documented lifecycle is in the table."""
    assert set(LEGAL) >= DOCUMENTED_EDGES


@pytest.mark.parametrize("state", [s for s in S if s is not S.STOPPED])
def test_every_live_state_can_be_stopped(state: ProcessState) -> None:
    """A delete reaches stopped from any state: stopping directly, or already stopping."""
    if state is S.STOPPING:
        check_transition(state, S.STOPPED)
    else:
        check_transition(state, S.STOPPING)


def test_only_resting_states_start_again() -> None:
    """Only a process with no child and nothing scheduled goes back to pending or starting
    by a start control; stopped is left only that way."""
    assert TRANSITIONS[S.STOPPED] == frozenset({S.PENDING, S.STARTING})
    back_to_pending = {old for old, targets in TRANSITIONS.items() if S.PENDING in targets}
    assert back_to_pending == set(RESTING_STATES)


def test_every_state_is_reachable_from_pending() -> None:
    """Walking the graph from pending reaches every state."""
    seen, todo = {S.PENDING}, [S.PENDING]
    while todo:
        for new in TRANSITIONS[todo.pop()]:
            if new not in seen:
                seen.add(new)
                todo.append(new)
    assert seen == set(S)


def wait_status_of(code: str) -> int:
    """Run ``python -c code`` and return its raw os.waitpid() status."""
    pid = os.posix_spawn(sys.executable, [sys.executable, "-c", code], dict(os.environ))
    waited, status = os.waitpid(pid, 0)
    assert waited == pid
    return status


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        pytest.param("pass", Exit(0), id="exit-0"),
        pytest.param("raise SystemExit(3)", Exit(3), id="exit-3"),
        pytest.param("raise SystemExit(255)", Exit(255), id="exit-255"),
        pytest.param("import os; os.kill(os.getpid(), 9)", Exit(-signal.SIGKILL), id="sigkill"),
        pytest.param("import os; os.kill(os.getpid(), 15)", Exit(-signal.SIGTERM), id="sigterm"),
        pytest.param("import os, signal; signal.signal(signal.SIGINT, signal.SIG_DFL);"
                     " os.kill(os.getpid(), signal.SIGINT)", Exit(-signal.SIGINT), id="sigint"),
    ],
)
def test_exit_from_real_children(code: str, expected: Exit) -> None:
    """A real child's wait status becomes Popen's convention: the code, or minus the signal."""
    assert Exit.from_wait_status(wait_status_of(code)) == expected


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        pytest.param(0x0000, 0, id="exit-0"),
        pytest.param(0x0100, 1, id="exit-1"),
        pytest.param(0x7F00, 127, id="exit-127"),
        pytest.param(0xFF00, 255, id="exit-255"),
        pytest.param(0x0009, -9, id="killed-sigkill"),
        pytest.param(0x000F, -15, id="killed-sigterm"),
        pytest.param(0x0086, -6, id="sigabrt-with-core-dump"),
        pytest.param(0x008B, -11, id="sigsegv-with-core-dump"),
    ],
)
def test_exit_from_known_encodings(status: int, expected: int) -> None:
    """Linux wait-status encodings (code << 8, signal, core-dump bit) decode as expected."""
    assert Exit.from_wait_status(status).code == expected


@pytest.mark.parametrize(
    ("code", "name", "phrase"),
    [
        pytest.param(0, None, "exited with code 0", id="clean"),
        pytest.param(3, None, "exited with code 3", id="failed"),
        pytest.param(127, None, "exited with code 127", id="not-found"),
        pytest.param(-9, "SIGKILL", "was killed by SIGKILL", id="sigkill"),
        pytest.param(-15, "SIGTERM", "was killed by SIGTERM", id="sigterm"),
        pytest.param(-2, "SIGINT", "was killed by SIGINT", id="sigint"),
        pytest.param(-11, "SIGSEGV", "was killed by SIGSEGV", id="sigsegv"),
        pytest.param(-200, "signal 200", "was killed by signal 200", id="unknown-signal"),
    ],
)
def test_exit_signal_and_description(code: int, name: str | None, phrase: str) -> None:
    """Exit.signal names the killing signal (None for a normal exit) and describe() says it."""
    exit = Exit(code)
    assert exit.signal == name
    assert exit.describe() == phrase


def test_exit_is_a_frozen_value() -> None:
    """Two exits with the same code are equal, hashable and immutable."""
    assert Exit(1) == Exit(1)
    assert len({Exit(1), Exit(1), Exit(-9)}) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        Exit(1).code = 2  # type: ignore[misc]  # frozen: the write is the test


@pytest.mark.parametrize(
    ("app", "node", "slug"),
    [
        pytest.param("shop", "web.0", "shop.web.0", id="seed-example"),
        pytest.param("myapp", "worker.12", "myapp.worker.12", id="two-digit-node"),
        pytest.param("a", "b", "a.b", id="shortest"),
        pytest.param("my-app_2", "clock", "my-app_2.clock", id="dash-underscore"),
    ],
)
def test_spec_slug(app: str, node: str, slug: str) -> None:
    """A spec's slug is '<app>.<node>'."""
    spec = Spec(app=app, node=node, process_type="web", source_url="http://127.0.0.1/a.tgz")
    assert spec.slug == slug


def test_spec_is_frozen_with_read_only_empty_env() -> None:
    """A spec cannot change, and its default env is empty and read-only."""
    spec = Spec("shop", "web.0", "web", "http://127.0.0.1/a.tgz")
    assert dict(spec.env) == {}
    with pytest.raises(TypeError):
        spec.env["A"] = "1"  # type: ignore[index]  # read-only: the write is the test
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.app = "other"  # type: ignore[misc]  # frozen: the write is the test


def test_process_info_holds_a_snapshot() -> None:
    """ProcessInfo carries what the API shows and cannot be changed."""
    spec = Spec("shop", "web.0", "web", "http://127.0.0.1/a.tgz", {"A": "1"})
    last_exit = ExitRecord(Exit(-9), at=1796148000.0, ran_for=1.5)
    info = ProcessInfo(spec, S.RUNNING, pid=42, error=None, restarts=2, last_exit=last_exit)
    assert info.spec.slug == "shop.web.0"
    assert info.last_exit is not None
    assert info.last_exit.exit.signal == "SIGKILL"
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.state = S.STOPPED  # type: ignore[misc]  # frozen: the write is the test
