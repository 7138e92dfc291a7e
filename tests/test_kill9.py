"""Kill -9 the real agent 50 times at random moments (issue 4).

One state folder; fifty times in a row, the real ``smartmob-agent`` command is started on
it and, while the test creates processes (some crash-looping, some ``sleep 1000``) and
deletes earlier ones, SIGKILLed at a random moment 0 to 400 ms after it answered its
first listing. After each kill:

* the next agent starts (the database always opens);
* every create the agent acknowledged (201) is listed, unless a later delete was sent;
* no delete the agent acknowledged (200) comes back, ever; nor does a create that never
  reached the agent (connection refused);
* a request cut short by the kill may have happened or not, but once the next listing
  has settled it, that outcome holds for good;
* nothing unknown is listed, and no process's ``restarts`` is lower than the highest
  value the test ever saw for it (a crash-looping process restarts every few tens of
  milliseconds, and is polled during each run);
* the killed agent's guardian exits and its children end; one it missed (a child being
  spawned at the kill, see the test at the end) is counted, and must have been
  stopped by the next agent once that one listens; no child of an earlier agent runs.

At the end a last agent is stopped cleanly (SIGTERM): it exits 0 and no process of any
of the 51 agents is left. The random choices come from a seeded ``random.Random``; the
seed is printed, is in every failure message, and ``SMARTMOB_KILL9_SEED`` replays it
(timing differs from run to run, so a replay makes the same choices, not the same race).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import select
import signal
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from tests.agent_process import AgentProcess
from tests.conftest import ArchiveServer
from tests.helpers import app_archive, pid_alive

ITERATIONS = 50
#: The agent is SIGKILLed this long (at most, in seconds) after its first listing.
KILL_WINDOW = 0.4
#: Processes kept at most (known, or maybe created); creates turn into deletes above.
MAX_LIVE = 8
#: Crash-looping processes kept at most (each restarts some 20 times a second).
MAX_CRASHING = 3
#: Every child of every agent of this test carries this variable (from the request's env).
TOKEN_VARIABLE = "SMARTMOB_KILL9_TEST"
SEED_VARIABLE = "SMARTMOB_KILL9_SEED"
CRASH_OPTIONS: dict[str, Any] = {
    "backoff": {"initial": 0.01, "max": 0.05}, "start_seconds": 0.5,
}
#: A live agent answers every request well within this; only a hang reaches it.
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=10)
#: How long the guardian and the children it kills may take to be gone.
CLEANUP_TIMEOUT = 10.0
#: How long a child the guardian SIGKILLed may take to end; one still alive after that
#: escaped it.
ESCAPE_WAIT = 2.0
PROCFILE = "web: exec sleep 1000\ncrash: exit 1\n"


@dataclass
class Ledger:
    """What the test knows of the agent's processes, from the answers it got.

    ``present``: must be listed by the next agent (a 201, or listed since, and no delete
    sent since). ``absent``: must never be listed again (a 200 to its delete, a create
    that never reached the agent, or an unknown outcome the next listing settled as
    absent). ``maybe_created`` and ``maybe_deleted``: requests cut short by the kill,
    settled by the next listing.
    """

    kinds: dict[str, str] = field(default_factory=dict)
    present: set[str] = field(default_factory=set)
    absent: set[str] = field(default_factory=set)
    maybe_created: set[str] = field(default_factory=set)
    maybe_deleted: set[str] = field(default_factory=set)
    deleting: set[str] = field(default_factory=set)
    creating: set[str] = field(default_factory=set)
    restarts: dict[str, int] = field(default_factory=dict)
    stats: Counter[str] = field(default_factory=Counter)
    created: int = 0

    def see(self, document: dict[str, Any], where: str) -> None:
        """Check and remember the restart count of a status document."""
        slug, restarts = document["slug"], document["restarts"]
        last = self.restarts.get(slug, 0)
        assert restarts >= last, (
            f"{where}: the restart count of {slug} went back from {last} to {restarts}")
        self.restarts[slug] = restarts
        if restarts > last:
            self.stats["restarts seen"] += restarts - last

    def live_kinds(self) -> Counter[str]:
        return Counter(self.kinds[s] for s in self.present | self.maybe_created | self.creating)


def our_processes(markers: Iterable[str]) -> list[int]:
    """Live (not zombie) processes whose environment holds one of ``markers``."""
    wanted = {marker.encode() for marker in markers}
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as file:
                entries = file.read().split(b"\0")
        except OSError:
            continue
        if wanted.intersection(entries) and pid_alive(int(name)):
            found.append(int(name))
    return found


def strays_of(token_marker: str, markers: Iterable[str]) -> list[int]:
    """Live processes whose environment holds ``token_marker`` but none of ``markers``
    (each read once: in the middle of an exec a process shows no environment at all)."""
    wanted = {marker.encode() for marker in markers}
    token = token_marker.encode()
    found = []
    for pid in our_processes([token_marker]):
        try:
            with open(f"/proc/{pid}/environ", "rb") as file:
                entries = set(file.read().split(b"\0"))
        except OSError:
            continue
        if token in entries and not wanted & entries and pid_alive(pid):
            found.append(pid)
    return found


def resolve(future: asyncio.Future[None]) -> None:
    """Mark ``future`` done (once: a readable pidfd stays readable)."""
    if not future.done():
        future.set_result(None)


async def wait_gone(fds: Iterable[int], timeout: float, what: str) -> None:
    """Wait until every pidfd in ``fds`` is readable (its process ended)."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            for fd in fds:
                ended: asyncio.Future[None] = loop.create_future()
                loop.add_reader(fd, resolve, ended)
                try:
                    await ended
                finally:
                    loop.remove_reader(fd)
    except TimeoutError:
        raise AssertionError(f"{what} did not end within {timeout} s") from None


async def survivors(markers: Iterable[str], timeout: float) -> dict[int, int]:
    """Wait up to ``timeout`` seconds for every live process carrying one of ``markers``
    to end; return those still alive then, as pid -> pidfd (the caller closes them)."""
    loop = asyncio.get_running_loop()
    fds: dict[int, int] = {}
    for pid in our_processes(markers):
        with contextlib.suppress(ProcessLookupError):
            fds[pid] = os.pidfd_open(pid)
    ended: dict[int, asyncio.Future[None]] = {}
    for pid, fd in fds.items():
        ended[pid] = loop.create_future()
        loop.add_reader(fd, resolve, ended[pid])
    try:
        if ended:
            await asyncio.wait(ended.values(), timeout=timeout)
    finally:
        for fd in fds.values():
            loop.remove_reader(fd)
    alive = {pid: fd for pid, fd in fds.items() if not ended[pid].done()}
    for pid, fd in fds.items():
        if pid not in alive:
            os.close(fd)
    return alive


def has_ended(fd: int) -> bool:
    """Whether the process of a pidfd has ended (the pidfd is readable)."""
    return bool(select.select([fd], [], [], 0)[0])


async def wait_processes_gone(markers: Iterable[str], timeout: float, what: str) -> None:
    """Wait until no live process carries one of ``markers``."""
    markers = list(markers)
    fds = []
    try:
        for pid in our_processes(markers):
            with contextlib.suppress(ProcessLookupError):
                fds.append(os.pidfd_open(pid))
        try:
            await wait_gone(fds, timeout, what)
        except AssertionError as error:
            raise AssertionError(f"{error}: {describe(our_processes(markers))}") from None
    finally:
        for fd in fds:
            os.close(fd)
    left = our_processes(markers)
    assert not left, f"{what}: still alive: {describe(left)}"


def describe(pids: Iterable[int]) -> list[str]:
    """Who each process is: pid, parent, state, age and command line."""
    found = []
    for pid in pids:
        try:
            with open("/proc/uptime", "rb") as file:
                uptime = float(file.read().split()[0])
            with open(f"/proc/{pid}/stat", "rb") as file:
                fields = file.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as file:
                command = file.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError as error:
            found.append(f"{pid}: {error}")
            continue
        age = uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")
        found.append(f"{pid} (parent {int(fields[1])}, state {fields[0].decode()}, "
                     f"{age:.2f} s old): {command.strip()}")
    return found


async def guardian_of(agent: AgentProcess) -> tuple[int, list[str]]:
    """The pid of the agent's guardian and the markers it sweeps (``NAME=agent id``):
    its arguments after ``python -I -S -c CODE``.

    Polled (deadline 5 s): in the middle of its exec, a process shows no command line.
    """
    children: list[psutil.Process] = []
    try:
        async with asyncio.timeout(5):
            while True:
                found = []
                children = psutil.Process(agent.pid).children()
                for child in children:
                    with contextlib.suppress(psutil.Error):  # a child just ended (a zombie)
                        command = child.cmdline()
                        if "smartmob_agent.processes.guardian" in " ".join(command):
                            found.append((child.pid, command[5:]))
                if found:
                    break
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(
            f"no guardian among the children of the agent: "
            f"{describe(child.pid for child in children)}") from None
    assert len(found) == 1, found
    assert found[0][1], found
    assert all("=" in marker for marker in found[0][1]), found
    return found[0]


async def listing(http: aiohttp.ClientSession, url: str) -> list[dict[str, Any]]:
    async with http.get(url + "/list-processes", timeout=REQUEST_TIMEOUT) as response:
        assert response.status == 200, await response.text()
        processes: list[dict[str, Any]] = (await response.json())["processes"]
    return processes


def settle(ledger: Ledger, processes: list[dict[str, Any]], where: str) -> None:
    """Check a new agent's first listing against the ledger, and settle the unknowns."""
    slugs = [p["slug"] for p in processes]
    assert len(slugs) == len(set(slugs)), f"{where}: a slug is listed twice: {slugs}"
    listed = set(slugs)
    vanished = ledger.present - listed
    assert not vanished, f"{where}: acknowledged processes vanished: {sorted(vanished)}"
    back = ledger.absent & listed
    assert not back, f"{where}: deleted (or never created) processes came back: {sorted(back)}"
    unknown = listed - ledger.present - ledger.maybe_created - ledger.maybe_deleted
    assert not unknown, f"{where}: processes nobody created: {sorted(unknown)}"
    for name, maybe in (("create", ledger.maybe_created), ("delete", ledger.maybe_deleted)):
        for slug in maybe:
            happened = (slug in listed) == (name == "create")
            ledger.stats[f"unknown {name}s that {'happened' if happened else 'did not'}"] += 1
            (ledger.present if slug in listed else ledger.absent).add(slug)
        maybe.clear()
    for process in processes:
        ledger.see(process, where)


class Run:
    """One agent's life: the chaos while it runs, until the SIGKILL."""

    def __init__(self, ledger: Ledger, rng: random.Random, url: str, source: str,
                 token: str, http: aiohttp.ClientSession) -> None:
        self.ledger = ledger
        self.rng = rng
        self.url = url
        self.source = source
        self.token = token
        self.http = http
        self.killed = False

    def dead(self) -> bool:
        """Whether the agent was SIGKILLed (a method: it changes while a request waits)."""
        return self.killed

    async def create(self, kind: str) -> None:
        ledger = self.ledger
        ledger.created += 1
        node = f"{kind[0]}{ledger.created}"
        slug = f"kill9.{node}"
        body: dict[str, Any] = {
            "app": "kill9", "node": node, "process_type": kind, "source_url": self.source,
            "env": {TOKEN_VARIABLE: self.token},
        }
        if kind == "crash":
            body.update(CRASH_OPTIONS)
        ledger.kinds[slug] = kind
        ledger.creating.add(slug)
        try:
            async with self.http.post(self.url + "/create-process", json=body,
                                      timeout=REQUEST_TIMEOUT) as response:
                assert response.status == 201, (
                    f"create {slug}: {response.status} {await response.text()}")
                document = await response.json()
        except aiohttp.ClientConnectorError:  # refused: the agent never saw it
            ledger.absent.add(slug)
            ledger.stats["creates never received"] += 1
        except aiohttp.ClientError:
            assert self.killed, f"create {slug} failed while the agent runs"
            ledger.maybe_created.add(slug)
        else:
            assert document["slug"] == slug
            ledger.present.add(slug)
            ledger.see(document, f"create {slug}")
            ledger.stats["creates acknowledged"] += 1
        finally:
            ledger.creating.discard(slug)

    async def delete(self, slug: str) -> None:
        ledger = self.ledger
        ledger.deleting.add(slug)
        try:
            async with self.http.post(self.url + f"/delete-process/{slug}", json={},
                                      timeout=REQUEST_TIMEOUT) as response:
                assert response.status == 200, (
                    f"delete {slug}: {response.status} {await response.text()}")
                await response.json()
        except aiohttp.ClientConnectorError:  # refused: still there
            ledger.stats["deletes never received"] += 1
        except aiohttp.ClientError:
            assert self.killed, f"delete {slug} failed while the agent runs"
            ledger.present.discard(slug)
            ledger.maybe_deleted.add(slug)
        else:
            ledger.present.discard(slug)
            ledger.absent.add(slug)
            ledger.stats["deletes acknowledged"] += 1
        finally:
            ledger.deleting.discard(slug)

    async def operation(self, delay: float, kind: str) -> None:
        """After ``delay``, unless the agent is dead by then: create a ``crash`` or
        ``web`` process, or delete one (``kind`` is ``delete``); too many processes turn
        a create into a delete, none to delete turns a delete into a create."""
        await asyncio.sleep(delay)
        if self.killed:
            return
        ledger = self.ledger
        deletable = sorted(ledger.present - ledger.deleting)
        live = ledger.live_kinds()
        if kind != "delete" and sum(live.values()) >= MAX_LIVE:
            kind = "delete"
        if kind == "crash" and live["crash"] >= MAX_CRASHING:
            kind = "web"
        if kind == "delete" and not deletable:
            kind = "web"
        if kind == "delete":
            await self.delete(self.rng.choice(deletable))
        else:
            await self.create(kind)

    async def poll(self) -> None:
        """List the processes again and again until the kill; check their restart counts."""
        while not self.killed:
            try:
                processes = await listing(self.http, self.url)
            except aiohttp.ClientError:
                assert self.dead(), "the listing failed while the agent runs"
                return
            for process in processes:
                self.ledger.see(process, "a listing during the run")
            self.ledger.stats["listings during the runs"] += 1
            await asyncio.sleep(0.02)

    async def chaos(self, agent: AgentProcess) -> float:
        """Run creates, deletes and the listing poll; SIGKILL the agent at a random
        moment; return that moment (seconds after the start of the chaos)."""
        rng = self.rng
        kill_at = rng.uniform(0.0, KILL_WINDOW)
        delays = [rng.uniform(0.0, kill_at) for _ in range(rng.randint(1, 3))]
        if rng.random() < 0.5:  # one request right before the kill: often cut short
            delays.append(max(0.0, kill_at - rng.uniform(0.0, 0.01)))
        kinds = [rng.choice(("web", "crash", "delete", "delete")) for _ in delays]
        tasks = [asyncio.ensure_future(self.operation(d, k)) for d, k in zip(delays, kinds,
                                                                                strict=True)]
        tasks.append(asyncio.ensure_future(self.poll()))
        try:
            await asyncio.sleep(kill_at)
            assert agent.proc is not None
            assert agent.proc.returncode is None, f"the agent exited: {agent.stderr}"
            agent.proc.send_signal(signal.SIGKILL)
            self.killed = True
            await agent.kill()  # reaps it
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return kill_at


@pytest.mark.timeout(180)
async def test_kill9_fifty_times_while_creating_deleting_and_crash_looping(
    tmp_path: Path, archive_server: ArchiveServer, http: aiohttp.ClientSession,
) -> None:
    """The agent SIGKILLed 50 times at random moments: the database always opens, every
    acknowledged create is there until deleted, no acknowledged delete comes back,
    restart counts never go backwards, and no child outlives the agents."""
    seed = int(os.environ.get(SEED_VARIABLE) or random.SystemRandom().randrange(2**32))
    print(f"kill9 seed: {seed} (replay with {SEED_VARIABLE}={seed})")
    rng = random.Random(seed)
    token = uuid.uuid4().hex
    token_marker = f"{TOKEN_VARIABLE}={token}"
    source = archive_server.add("kill9.tgz", app_archive(PROCFILE))
    state_dir = tmp_path / "state"
    ledger = Ledger()
    agent_markers: list[str] = []
    escaped: dict[int, int] = {}  # pid -> pidfd: children a guardian missed
    agent: AgentProcess | None = None
    guardian_fd: int | None = None
    timings: defaultdict[str, float] = defaultdict(float)
    kill_moments: list[float] = []
    started = time.monotonic()
    where = "start"
    try:
        for iteration in range(ITERATIONS + 1):
            final = iteration == ITERATIONS
            where = f"agent {iteration + 1}"
            clock = time.monotonic()
            agent = AgentProcess(state_dir)
            await agent.start()  # fails with the agent's stderr if the database is refused
            timings["start"] += time.monotonic() - clock
            guardian_pid, markers = await guardian_of(agent)
            guardian_fd = os.pidfd_open(guardian_pid)
            agent_markers.extend(markers)
            # what escaped the last guardian, this agent stopped before it listened;
            # and every child of this test that runs is this agent's
            while escaped:
                pid, fd = escaped.popitem()
                ended = has_ended(fd)
                os.close(fd)
                assert ended, f"{where} left running {describe([pid])}"
            strays = strays_of(token_marker, markers)
            assert not strays, f"children of earlier agents run: {describe(strays)}"

            clock = time.monotonic()
            settle(ledger, await listing(http, agent.url), f"{where}, first listing")
            timings["first listing"] += time.monotonic() - clock
            if final:
                break

            clock = time.monotonic()
            run = Run(ledger, rng, agent.url, source, token, http)
            kill_moments.append(await run.chaos(agent))
            timings["chaos"] += time.monotonic() - clock

            # the guardian saw the agent die: it kills every child, then exits; a child
            # it missed (see the test below) the next agent must stop
            clock = time.monotonic()
            await wait_gone([guardian_fd], CLEANUP_TIMEOUT, f"{where}'s guardian")
            os.close(guardian_fd)
            guardian_fd = None
            escaped = await survivors([*markers, token_marker], ESCAPE_WAIT)
            if escaped:
                ledger.stats["children that escaped a guardian"] += len(escaped)
                print(f"kill9: escaped the guardian of {where}: "
                      f"{describe(escaped)}", flush=True)
            timings["cleanup"] += time.monotonic() - clock

        # every process brought back after the last kill works: sleepers run, the
        # crash-looping ones keep restarting
        assert agent is not None
        clock = time.monotonic()
        async with asyncio.timeout(15):
            while True:
                processes = await listing(http, agent.url)
                for process in processes:
                    ledger.see(process, f"{where}, a listing")
                states = {p["slug"]: p["state"] for p in processes}
                assert {s for s in states if states[s] in ("failed", "exited")} == set(), states
                if all(state == "running" for slug, state in states.items()
                       if ledger.kinds[slug] == "web"):
                    break
                await asyncio.sleep(0.02)
        crashing = [p["slug"] for p in processes if ledger.kinds[p["slug"]] == "crash"]
        if crashing:  # at 20 restarts a second, each restarts again within a deadline
            before = {slug: ledger.restarts[slug] for slug in crashing}
            async with asyncio.timeout(10):
                while any(ledger.restarts[slug] <= before[slug] for slug in crashing):
                    for process in await listing(http, agent.url):
                        ledger.see(process, f"{where}, a listing")
                    await asyncio.sleep(0.02)

        # a clean stop: exit 0, the guardian exits, no process of any agent is left
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGTERM)
        assert await agent.wait(30) == 0, agent.stderr
        assert guardian_fd is not None
        await wait_gone([guardian_fd], CLEANUP_TIMEOUT, "the last guardian")
        left = our_processes([token_marker, *agent_markers])
        assert not left, f"processes left after a clean stop: {left}"
        timings["final checks"] += time.monotonic() - clock
    except (AssertionError, TimeoutError) as error:
        raise AssertionError(
            f"seed {seed} ({SEED_VARIABLE}={seed}), {where}: {error}\n"
            f"last agent's stderr (end):\n{agent.stderr[-3000:] if agent else ''}"
        ) from error
    finally:
        if agent is not None:
            await agent.kill()
        if guardian_fd is not None:
            with contextlib.suppress(AssertionError):
                await wait_gone([guardian_fd], CLEANUP_TIMEOUT, "the guardian")
            os.close(guardian_fd)
        for fd in escaped.values():
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            os.close(fd)
        for pid in our_processes([token_marker, *agent_markers]):  # a failure's leftovers
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    total = time.monotonic() - started
    print(f"kill9: {ITERATIONS} kills in {total:.1f} s; seed {seed}")
    print("kill9 timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    print(f"kill9 kill moments: min {min(kill_moments) * 1000:.0f} ms, "
          f"max {max(kill_moments) * 1000:.0f} ms")
    print("kill9 stats: " + ", ".join(f"{k}: {v}" for k, v in sorted(ledger.stats.items())))
    print(f"kill9 processes at the end: {len(processes)}; highest restart count: "
          f"{max(ledger.restarts.values(), default=0)}")
    assert ledger.stats["creates acknowledged"] > 0
    assert ledger.stats["deletes acknowledged"] > 0
    assert ledger.stats["restarts seen"] > 0


async def wait_state(http: aiohttp.ClientSession, url: str, state: str) -> None:
    """Poll the listing of the only process until it is in ``state`` (deadline 10 s)."""
    async with asyncio.timeout(10):
        while True:
            (process,) = await listing(http, url)
            if process["state"] == state:
                return
            await asyncio.sleep(0.02)


@pytest.mark.timeout(60)
async def test_a_delete_cut_short_by_sigkill_leaves_no_folder_behind(
    tmp_path: Path, archive_server: ArchiveServer, http: aiohttp.ClientSession,
) -> None:
    """The agent is SIGKILLed while a delete waits for a child that ignores SIGTERM (its
    row is already gone: the agent shows it ``stopping``). The next agent does not list
    it (the delete holds), and no folder of it is left in the state folder.

    Found by the kill -9 test above (about one kill in four cuts a delete short there:
    14 of the 50 of seed 1252171248 left 12 folders in ``processes/``); this one makes
    the moment certain."""
    source = archive_server.add("stubborn.tgz", app_archive(
        "stubborn: trap '' TERM; exec sleep 1000\n"))
    token = uuid.uuid4().hex
    token_marker = f"{TOKEN_VARIABLE}={token}"
    state_dir = tmp_path / "state"
    slug = "kill9.stubborn"
    first = AgentProcess(state_dir)
    second: AgentProcess | None = None
    markers = [token_marker]
    deleting: asyncio.Future[Any] | None = None
    try:
        await first.start()
        guardian_pid, agent_markers = await guardian_of(first)
        markers.extend(agent_markers)
        guardian_fd = os.pidfd_open(guardian_pid)
        try:
            body = {"app": "kill9", "node": "stubborn", "process_type": "stubborn",
                    "source_url": source, "env": {TOKEN_VARIABLE: token}, "stop_timeout": 60}
            async with http.post(first.url + "/create-process", json=body,
                                 timeout=REQUEST_TIMEOUT) as response:
                if response.status != 201:
                    pytest.fail(f"create: {response.status} {await response.text()}")

            await wait_state(http, first.url, "running")
            if not (state_dir / "processes" / slug).is_dir():
                pytest.fail("the process has no work folder")
            deleting = asyncio.ensure_future(http.post(
                first.url + f"/delete-process/{slug}", json={}, timeout=REQUEST_TIMEOUT))
            await wait_state(http, first.url, "stopping")  # its row is already removed
            await first.kill()
            with contextlib.suppress(aiohttp.ClientError):
                (await deleting).release()
                pytest.fail("the delete was answered before the kill")
            await wait_gone([guardian_fd], CLEANUP_TIMEOUT, "the guardian")
        finally:
            os.close(guardian_fd)
        await wait_processes_gone(markers, CLEANUP_TIMEOUT, "the children of the agent")

        second = AgentProcess(state_dir)
        await second.start()
        markers.extend((await guardian_of(second))[1])
        if await listing(http, second.url) != []:
            pytest.fail("the deleted process came back")
        left = [folder for folder in ("processes", "logs")
                if (state_dir / folder / slug).exists()]
        assert not left, f"folders of the deleted {slug} left in {state_dir}: {left}"
    finally:
        if deleting is not None and not deleting.done():
            deleting.cancel()
        for agent in (first, second):
            if agent is not None:
                await agent.kill()
        for pid in our_processes(markers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


#: Installed (through PYTHONPATH) in the agent of the next test: the child of a process
#: whose command runs ``sleep 1001`` stops itself between fork and exec, right after
#: closing the agent's file descriptors as ``close_fds`` does, as if the scheduler had
#: preempted it there, before anything of the agent's own set-up between fork and exec
#: (a ``preexec_fn``, which it runs after, if there is one). The guardian and everything
#: else run as usual.
HOLD_BEFORE_EXEC = '''
import os, signal, subprocess

_Popen = subprocess.Popen


class _Held(_Popen):
    def __init__(self, args, *rest, **options):
        if isinstance(args, list) and any("sleep 1001" in str(arg) for arg in args):
            setup = options.get("preexec_fn")
            def hold():
                os.closerange(3, os.sysconf("SC_OPEN_MAX"))
                os.kill(os.getpid(), signal.SIGSTOP)
                if setup is not None:
                    setup()
            options["preexec_fn"] = hold
        super().__init__(args, *rest, **options)


subprocess.Popen = _Held
'''


def process_state(pid: int) -> str | None:
    """The state letter of ``pid`` (``T`` when stopped), or ``None`` once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            return file.read().rsplit(b")", 1)[1].split()[0].decode()
    except OSError:
        return None


def ran_command(pid: int, markers: Iterable[str]) -> bool:
    """Whether the environment of ``pid`` holds one of ``markers`` (the test's token is
    only in the environment a command is exec'd with)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as file:
            entries = file.read().split(b"\0")
    except OSError:
        return False
    return any(marker.encode() in entries for marker in markers)


def runs_sleep_1001(pid: int) -> bool:
    """Whether ``pid`` runs the held process's command, ``sleep 1001``."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return file.read() == b"sleep\x001001\x00"
    except OSError:
        return False


@pytest.mark.timeout(60)
async def test_a_child_between_fork_and_exec_does_not_outlive_a_sigkilled_agent(
    tmp_path: Path, archive_server: ArchiveServer, http: aiohttp.ClientSession,
) -> None:
    """The agent is SIGKILLed while its only child is between fork and exec (held there
    by a stop, standing in for a preemption); once the guardian has swept and exited,
    the child goes on: it must not run its command.

    The guardian's sweep misses it (no marker yet), and its parent-death signal is not
    set yet: its shell's guard (its parent is no longer the agent) ends it."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOLD_BEFORE_EXEC)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook), env.get("PYTHONPATH")]))
    source = archive_server.add("held.tgz", app_archive("held: exec sleep 1001\n"))
    token = uuid.uuid4().hex
    token_marker = f"{TOKEN_VARIABLE}={token}"
    markers = [token_marker]
    agent = AgentProcess(tmp_path / "state", env=env)
    child_fd: int | None = None
    try:
        await agent.start()
        guardian_pid, agent_markers = await guardian_of(agent)
        markers.extend(agent_markers)
        guardian_fd = os.pidfd_open(guardian_pid)
        try:
            body = {"app": "kill9", "node": "held", "process_type": "held",
                    "source_url": source, "env": {TOKEN_VARIABLE: token}}
            async with http.post(agent.url + "/create-process", json=body,
                                 timeout=REQUEST_TIMEOUT) as response:
                if response.status != 201:
                    pytest.fail(f"create: {response.status} {await response.text()}")
            async with asyncio.timeout(10):
                while True:
                    (process,) = await listing(http, agent.url)
                    if process["state"] == "running" and process_state(process["pid"]) == "T":
                        break
                    await asyncio.sleep(0.02)
            pid = process["pid"]
            child_fd = os.pidfd_open(pid)
            if ran_command(pid, [token_marker]):  # only its command's environment has it
                pytest.fail("the held child has already run its command")

            await agent.kill()
            await wait_gone([guardian_fd], CLEANUP_TIMEOUT, "the guardian")
        finally:
            os.close(guardian_fd)
        with contextlib.suppress(ProcessLookupError):  # gone already: the sweep got it
            signal.pidfd_send_signal(child_fd, signal.SIGCONT)
        async with asyncio.timeout(10):  # it ends, or runs its command (after the guard)
            while True:
                if process_state(pid) in (None, "Z") or runs_sleep_1001(pid):
                    break
                await asyncio.sleep(0.01)
        assert process_state(pid) in (None, "Z"), (
            f"the child escaped the guardian: {describe([pid])}")
    finally:
        await agent.kill()
        if child_fd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(child_fd, signal.SIGKILL)
            os.close(child_fd)
        for pid in our_processes(markers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
