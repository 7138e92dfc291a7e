"""Output logs: the ring buffer, the rotated files, and the ``logs`` link.

The :class:`ProcessLog` tests write real files; the others run real processes under a
real agent, through a real HTTP client. Waits are on conditions with deadlines.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from smartmob_agent.config import Settings
from smartmob_agent.model import ProcessState as S
from smartmob_agent.output.logs import LOG_NAME, SEQ_BLOCK, LogHandler, ProcessLog
from smartmob_agent.representations import format_time
from smartmob_agent.supervision.agent import Agent
from smartmob_agent.web.server import make_app
from tests.conftest import ArchiveServer
from tests.helpers import app_archive, eventually, wait_for_state

Client = TestClient[Any, Any]

#: Prints "out I" on stdout and "err I" on stderr for I < 5, then "first done"; waits
#: for the file "go" in its folder, prints "second I" (I < 3) and "second done"; then
#: waits for SIGTERM. Each run numbers itself (run 1, run 2, ...) in the file "runs".
TWO_PHASES = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
run = 1 + (int(open("runs").read()) if os.path.exists("runs") else 0)
open("runs", "w").write(str(run))
for i in range(5):
    print(f"run {run} out {i}", flush=True)
    print(f"run {run} err {i}", file=sys.stderr, flush=True)
print(f"run {run} first done", flush=True)
deadline = time.monotonic() + 30
while not os.path.exists("go") and time.monotonic() < deadline:
    time.sleep(0.005)
for i in range(3):
    print(f"run {run} second {i}", flush=True)
print(f"run {run} second done", flush=True)
while True:
    time.sleep(60)
"""


# -- ProcessLog on real files -------------------------------------------------------------------


def lines(prefix: str, count: int) -> list[bytes]:
    return [f"{prefix} {i}".encode() for i in range(count)]


async def test_the_ring_buffer_is_bounded_and_the_files_hold_the_rest(tmp_path: Path) -> None:
    log = ProcessLog(tmp_path / "p", lines=5)
    for i in range(20):
        log.send_lines("stdout", lines(f"batch {i}", 10))
    assert len(log._memory()) == 5
    # the ring covers a short tail; a longer one is read from the file
    assert [e.line for e in await log.read(3)] == ["batch 19 7", "batch 19 8", "batch 19 9"]
    everything = await log.read(10_000)
    assert [e.line for e in everything] == [
        f"batch {i} {j}" for i in range(20) for j in range(10)
    ]
    log.close()
    memory = ProcessLog(None, lines=5)
    for i in range(20):
        memory.send_lines("stderr", lines(f"batch {i}", 10))
    assert [e.line for e in await memory.read(100)] == [f"batch 19 {j}" for j in range(5, 10)]
    assert not (tmp_path / "none").exists()


async def test_a_first_batch_larger_than_the_ring_is_read_whole_from_the_file(
    tmp_path: Path,
) -> None:
    """A busy agent can read a child's whole output as one batch: the ring keeps its last
    lines only, so a longer tail must come from the file (this once came from the ring)."""
    log = ProcessLog(tmp_path / "p", lines=5)
    log.send_lines("stdout", lines("line", 50))
    assert [e.line for e in await log.read(100)] == [f"line {j}" for j in range(50)]
    log.close()


async def test_each_line_keeps_its_stream_and_the_time_of_its_batch(tmp_path: Path) -> None:
    now = iter([1000.25, 2000.5])
    log = ProcessLog(tmp_path, lines=1, clock=lambda: next(now))
    log.send_lines("stdout", [b"out", b"more out"])
    log.set_run(4242, 3)
    log.send_lines("stderr", [b"err"])
    log.close()
    # each record carries its batch's first number: "more out" is 1 + 1
    assert (tmp_path / LOG_NAME).read_bytes() == (
        b"1000.250000 1 o - - out\n1000.250000 1 o - - more out\n"
        b"2000.500000 3 e 4242 3 err\n"
    )
    entries = await ProcessLog(tmp_path, lines=10).read(10)
    assert [(e.seq, e.at, e.stream, e.line, e.pid, e.restarts) for e in entries] == [
        (1, 1000.25, "stdout", "out", None, None), (2, 1000.25, "stdout", "more out", None, None),
        (3, 2000.5, "stderr", "err", 4242, 3),
    ]


async def test_files_rotate_at_the_configured_size_keeping_k_of_them(tmp_path: Path) -> None:
    log = ProcessLog(tmp_path, lines=3, max_bytes=300, files=2, clock=lambda: 1.0)
    record = len(b"1.000000 101 o - - line 000\n")  # 28 bytes: 10 records to a file
    for i in range(100):
        log.send_lines("stdout", [b"line %03d" % i])
    log.send_lines("stdout", [b"line %03d" % i for i in range(100, 130)])  # one big batch
    log.flush()
    names = sorted(p.name for p in tmp_path.iterdir())  # noqa: ASYNC240
    assert names == [LOG_NAME, f"{LOG_NAME}.1", f"{LOG_NAME}.2"]
    for name in names:
        assert (tmp_path / name).stat().st_size <= 300
    assert (tmp_path / f"{LOG_NAME}.1").stat().st_size == 10 * record
    # the big batch was cut by rotations: each file's part starts with its own number
    for name in names:
        first = (tmp_path / name).read_bytes().split(b"\n")[0].split(b" ")
        assert int(first[1]) == int(first[-1]) + 1  # "line N" is seq N + 1
    kept = await log.read(10_000)
    # 130 lines, 10 to a file: the last ones are kept, each with its number
    assert 20 < len(kept) <= 30
    assert [e.line for e in kept] == [f"line {i:03d}" for i in range(130 - len(kept), 130)]
    assert [e.seq for e in kept] == list(range(131 - len(kept), 131))
    log.close()
    again = ProcessLog(tmp_path, lines=3, max_bytes=300, files=2)
    assert [e.seq for e in await again.read(10_000)] == [e.seq for e in kept]
    assert again.next_seq == 131
    again.close()


async def test_a_new_log_on_the_same_folder_is_refilled_from_the_files(tmp_path: Path) -> None:
    log = ProcessLog(tmp_path, lines=4, max_bytes=200, files=1)
    for i in range(30):
        log.send_lines("stderr" if i % 2 else "stdout", [b"n %02d" % i])
    log.close()
    with open(tmp_path / LOG_NAME, "ab") as file:  # noqa: ASYNC230
        file.write(b"17000")  # the cut-off end of a file whose agent was SIGKILLed
    again = ProcessLog(tmp_path, lines=4, max_bytes=200, files=1)
    assert [raw[3] for raw in again._memory()] == [b"n 26", b"n 27", b"n 28", b"n 29"]
    assert [raw[2] for raw in again._memory()] == ["stdout", "stderr", "stdout", "stderr"]
    assert [raw[0] for raw in again._memory()] == [27, 28, 29, 30]
    assert len(await again.read(10)) == 10  # beyond the ring: from the files
    again.send_lines("stdout", [b"after"])
    assert [e.line for e in await again.read(2)] == ["n 29", "after"]
    again.close()


async def test_since_reads_the_ring_or_the_files(tmp_path: Path) -> None:
    clock = iter(range(100, 200))
    log = ProcessLog(tmp_path, lines=3, clock=lambda: float(next(clock)))
    for i in range(10):  # line i at 100 + i
        log.send_lines("stdout", [b"%d" % i])
    assert [e.line for e in await log.read(100, since=108)] == ["8", "9"]  # the ring
    assert [e.line for e in await log.read(100, since=102.5)] == [str(i) for i in range(3, 10)]
    assert [e.line for e in await log.read(2, since=102)] == ["8", "9"]
    assert await log.read(0) == []
    log.close()


# -- through the agent --------------------------------------------------------------------------


@pytest.fixture
def two_phases(archive_server: ArchiveServer) -> str:
    return archive_server.add(
        "phases.tgz", app_archive("web: {PYTHON} app.py\n", {"app.py": TWO_PHASES})
    )


def create_body(url: str, node: str = "web.0") -> str:
    return json.dumps(
        {"app": "myapp", "node": node, "process_type": "web", "source_url": url}
    )


async def create(client: Client, url: str, node: str = "web.0") -> dict[str, Any]:
    response = await client.post("/create-process", data=create_body(url, node))
    assert response.status == 201, await response.text()
    document: dict[str, Any] = await response.json()
    return document


async def logged(agent: Agent, slug: str, *lines: str, timeout: float = 10.0) -> None:
    """Wait until each of ``lines`` is in the process's log (ring buffer or files)."""
    log = agent.get(slug).output_log
    deadline = time.monotonic() + timeout
    while True:
        found = {entry.line for entry in await log.read(10_000)}
        if found.issuperset(lines):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{lines} not logged within {timeout} s; found {found}")
        await asyncio.sleep(0.01)


async def get(client: Client, url: str, accept: str | None = None) -> Any:
    headers = {} if accept is None else {"Accept": accept}
    response = await client.session.get(url, headers=headers)
    assert response.status == 200, await response.text()
    if response.content_type == "text/plain":
        return await response.text()
    assert response.content_type == "application/json"
    return await response.json()


async def test_tail_and_since_in_json_and_text(
    client: Client, agent: Agent, two_phases: str
) -> None:
    process = await create(client, two_phases)
    url = process["logs"]
    assert url == str(client.make_url("/process-logs/myapp.web.0"))
    await logged(agent, "myapp.web.0", "run 1 first done", "run 1 err 4")
    everything = await get(client, url)
    assert [e["line"] for e in everything if e["stream"] == "stdout"] == [
        *(f"run 1 out {i}" for i in range(5)), "run 1 first done",
    ]
    assert [e["line"] for e in everything if e["stream"] == "stderr"] == [
        f"run 1 err {i}" for i in range(5)
    ]
    assert set(everything[0]) == {"seq", "at", "stream", "line", "pid", "restarts"}
    assert [e["seq"] for e in everything] == sorted({e["seq"] for e in everything})
    assert everything[0]["at"].endswith("Z")
    assert await get(client, f"{url}?tail=1") == everything[-1:]

    # the lines after `since` and none before
    boundary = math.ceil(time.time() * 1000) / 1000 + 0.001
    await eventually(lambda: time.time() >= boundary, what="the clock to pass the boundary")
    (agent.get("myapp.web.0").workdir / "source" / "go").touch()
    await logged(agent, "myapp.web.0", "run 1 second done")
    second = [f"run 1 second {i}" for i in range(3)] + ["run 1 second done"]
    for since in (str(boundary), format_time(boundary)):
        found = await get(client, f"{url}?since={since}")
        assert [e["line"] for e in found] == second
        found = await get(client, f"{url}?since={since}&tail=2")
        assert [e["line"] for e in found] == second[-2:]

    text = await get(client, f"{url}?tail=2", accept="text/plain")
    entries = await get(client, f"{url}?tail=2", accept="application/json, text/plain;q=0.5")
    assert text == "".join(f"{e['at']} stdout {e['line']}\n" for e in entries)
    assert text.endswith(" stdout run 1 second done\n")
    assert await get(client, f"{url}?tail=0", accept="text/*") == ""


@pytest.mark.parametrize(("query", "field"), [
    ("tail=-1", "tail"), ("tail=10001", "tail"), ("tail=ten", "tail"), ("tail=", "tail"),
    ("since=yesterday", "since"), ("since=2026-12-01T18:00:00", "since"),
    ("since=nan", "since"), ("since=inf", "since"), ("since=-5", "since"),
])
async def test_bad_tail_or_since_is_400_naming_it(
    client: Client, two_phases: str, query: str, field: str
) -> None:
    process = await create(client, two_phases)
    response = await client.session.get(f"{process['logs']}?{query}")
    assert response.status == 400
    body = await response.json()
    assert list(body["fields"]) == [field]
    assert field in body["error"]


async def test_unknown_process_is_404(client: Client) -> None:
    response = await client.get("/process-logs/nope.web.0")
    assert response.status == 404
    assert "nope.web.0" in (await response.json())["error"]


async def test_logs_go_with_the_process_on_delete(
    client: Client, agent: Agent, two_phases: str
) -> None:
    process = await create(client, two_phases)
    await logged(agent, "myapp.web.0", "run 1 first done", "run 1 err 4")
    folder = agent.logs_dir / "myapp.web.0"
    agent.get("myapp.web.0").output_log.flush()
    assert b"run 1 err 4" in (folder / LOG_NAME).read_bytes()
    response = await client.session.post(process["delete"], data="{}")
    assert response.status == 200
    assert not folder.exists()
    # a new process of that name starts with no output, whatever was left in its folder
    folder.mkdir(parents=True)
    (folder / LOG_NAME).write_bytes(b"1.000000 o stale\n")
    await create(client, two_phases)
    await logged(agent, "myapp.web.0", "run 1 first done", "run 1 err 4")
    found = await get(client, process["logs"])
    assert "stale" not in [e["line"] for e in found]
    assert len(found) == 11


async def test_logs_survive_an_agent_restart(
    settings: Settings, archive_server: ArchiveServer, two_phases: str
) -> None:
    settings = dataclasses.replace(settings, log_lines=4)
    async with Agent(settings) as first:
        watcher = first.create(
            first_spec(two_phases)
        )
        await wait_for_state(watcher, S.RUNNING)
        await logged(first, watcher.spec.slug, "run 1 first done", "run 1 err 4")
    async with Agent(settings) as second:
        watcher = second.get("myapp.web.0")
        # refilled from the file before the new child wrote anything
        refilled = [raw[3] for raw in watcher.output_log._memory()]
        assert len(refilled) == 4
        assert all(line.startswith(b"run 1 ") for line in refilled)
        await wait_for_state(watcher, S.RUNNING)
        await logged(second, "myapp.web.0", "run 2 first done", "run 2 err 4")
        entries = await watcher.output_log.read(1000)
        for stream, lines in (
            ("stdout", [*(f"out {i}" for i in range(5)), "first done"]),
            ("stderr", [f"err {i}" for i in range(5)]),
        ):
            assert [e.line for e in entries if e.stream == stream] == [
                f"run {run} {line}" for run in (1, 2) for line in lines
            ]


def first_spec(url: str) -> Any:
    from smartmob_agent.schemas import create_request, spec_from_request

    return spec_from_request(create_request.validate(json.loads(create_body(url))))


async def test_rotation_through_the_agent_and_disk_logging_off(
    settings: Settings, archive_server: ArchiveServer, aiohttp_client: Any
) -> None:
    script = "import sys\nfor i in range(500): print('line %03d' % i)\nprint('end')\n" \
             "import time\ntime.sleep(60)\n"
    url = archive_server.add("many.tgz", app_archive("web: {PYTHON} app.py\n", {"app.py": script}))
    rotating = dataclasses.replace(settings, log_max_bytes=2000, log_files=2, log_lines=10)
    async with Agent(rotating) as agent:
        client = await aiohttp_client(make_app(rotating, agent))
        process = await create(client, url)
        await logged(agent, "myapp.web.0", "end")
        agent.get("myapp.web.0").output_log.flush()
        folder = agent.logs_dir / "myapp.web.0"
        assert sorted(p.name for p in folder.iterdir()) == [
            LOG_NAME, f"{LOG_NAME}.1", f"{LOG_NAME}.2"]
        assert all(p.stat().st_size <= 2000 for p in folder.iterdir())
        found = await get(client, f"{process['logs']}?tail=10000")
        assert found[-1]["line"] == "end"
        assert 10 < len(found) < 500  # more than the ring, fewer than were written
        assert [e["line"] for e in found[:-1]] == [
            f"line {i:03d}" for i in range(500 - len(found) + 1, 500)]
    off = dataclasses.replace(settings, log_max_bytes=0, log_lines=10,
                              state_dir=settings.state_dir.with_name("off"))
    async with Agent(off) as agent:
        client = await aiohttp_client(make_app(off, agent))
        process = await create(client, url)
        await logged(agent, "myapp.web.0", "end")
        found = await get(client, f"{process['logs']}?tail=10000")
        assert [e["line"] for e in found] == [f"line {i:03d}" for i in range(491, 500)] + ["end"]
        assert not (off.state_dir / "logs").exists()


async def test_a_slow_reader_does_not_block_writes(tmp_path: Path) -> None:
    """Reading the files happens off the event loop, on files opened before."""
    log = ProcessLog(tmp_path, lines=1, max_bytes=1000, files=1)
    for i in range(200):
        log.send_lines("stdout", [b"x %03d" % i])
    reading = asyncio.ensure_future(log.read(1000))
    await asyncio.sleep(0)  # the read opens the files and hands them to a thread
    for i in range(200, 400):  # rotations while the read runs
        log.send_lines("stdout", [b"x %03d" % i])
    found = [e.line for e in await reading]
    assert found == [f"x {i:03d}" for i in range(200 - len(found), 200)]
    assert len(found) > 30
    log.close()


# -- sequence numbers ---------------------------------------------------------------------------


async def test_lines_are_numbered_and_marks_reserved_before_use(tmp_path: Path) -> None:
    """Each line gets the next number; a mark is reserved (written) before any number at
    or above the previous mark is used, once per block, and a close gives back the rest."""
    marks: list[int] = []
    log = ProcessLog(tmp_path, lines=10, reserve=marks.append)
    assert log.next_seq == 1
    first = log.append("stdout", [b"a", b"b", b"c"])
    assert first is not None
    assert (first.seq, first.pid, first.restarts) == (1, None, None)
    assert marks == [4 + SEQ_BLOCK]  # before lines 1..3 were handed out
    log.set_run(99, 2)
    second = log.append("stderr", [b"d"] * (SEQ_BLOCK + 10))  # crosses the mark
    assert second is not None
    assert (second.seq, second.pid, second.restarts) == (4, 99, 2)
    assert marks == [4 + SEQ_BLOCK, 4 + SEQ_BLOCK + 10 + SEQ_BLOCK]
    assert log.append("stdout", []) is None
    assert [raw[0] for raw in log._memory()] == list(range(SEQ_BLOCK + 4, SEQ_BLOCK + 14))
    log.close()
    assert marks[-1] == log.next_seq == SEQ_BLOCK + 14  # the unused part given back
    assert log.append("stdout", [b"late"]) is None  # closed: neither kept nor numbered


async def test_a_new_log_numbers_on_from_the_mark_or_the_files(tmp_path: Path) -> None:
    """A log on an earlier agent's folder starts at the reserved mark (numbers below it
    may have reached clients and not the file), or after the file's last number when that
    is higher (no database): numbers are never reused."""
    log = ProcessLog(tmp_path, lines=10)
    log.append("stdout", [b"x"] * 5)
    log.close()
    # an agent killed after reserving up to 100005 but whose last lines never reached the file
    again = ProcessLog(tmp_path, lines=10, first_seq=100_005)
    assert again.next_seq == 100_005
    stamp = again.append("stdout", [b"after the kill"])
    assert stamp is not None
    assert stamp.seq == 100_005
    again.close()
    entries = await ProcessLog(tmp_path, lines=10).read(100)
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5, 100_005]
    # no mark at all (lines in memory only, or no database): after the files' last one
    assert ProcessLog(tmp_path, lines=2, first_seq=3).next_seq == 100_006


async def test_lines_of_the_older_format_read_as_seq_0(tmp_path: Path) -> None:
    """Records written before lines were numbered are read, with seq 0 (before every
    numbered line): a tail shows them, ``after`` never does; numbering starts at 1."""
    (tmp_path / LOG_NAME).write_bytes(
        b"1000.000000 o old one\n1000.500000 e old two words\n"
    )
    log = ProcessLog(tmp_path, lines=10)
    assert log.next_seq == 1
    log.append("stdout", [b"new"])
    entries = await log.read(10)
    assert [(e.seq, e.stream, e.line) for e in entries] == [
        (0, "stdout", "old one"), (0, "stderr", "old two words"), (1, "stdout", "new"),
    ]
    assert [e.line for e in (await log.window(10, after=0))[0]] == ["new"]
    log.close()
    reread = ProcessLog(tmp_path, lines=1)  # the old lines now come from the file
    assert [e.seq for e in await reread.read(10)] == [0, 0, 1]
    reread.close()


@pytest.mark.parametrize("ring", [1000, 3])
async def test_window_after_and_before_from_the_ring_or_the_files(
    tmp_path: Path, ring: int
) -> None:
    """``after`` and ``before`` select by number, with the count of matching lines older
    than the ``tail`` returned; the same from the ring buffer as from the files."""
    log = ProcessLog(tmp_path, lines=ring)
    for i in range(10):  # batches of 2: lines 1..20
        log.append("stdout", [b"%d" % (2 * i + 1), b"%d" % (2 * i + 2)])
    lines, more = await log.window(100, after=14)
    assert [e.seq for e in lines] == [15, 16, 17, 18, 19, 20]
    assert more == 0
    assert [e.line for e in lines] == [str(n) for n in range(15, 21)]
    lines, more = await log.window(2, after=14)
    assert [e.seq for e in lines] == [19, 20]
    assert more == 4
    lines, more = await log.window(3, after=5, before=11)
    assert [e.seq for e in lines] == [8, 9, 10]
    assert more == 2
    lines, more = await log.window(3, before=2)
    assert [e.seq for e in lines] == [1]
    assert more == 0
    assert await log.window(5, after=20) == ([], 0)
    log.close()


async def test_the_agent_log_handler_keeps_records_as_stderr_lines(tmp_path: Path) -> None:
    """Records of :mod:`logging` become numbered stderr lines, a traceback one line each,
    from the loop's thread and from others; a record logged while one is kept is not."""
    target = ProcessLog(tmp_path, lines=100)
    handler = LogHandler(target)
    logger = logging.getLogger("smartmob_agent.test_handler")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        logger.info("hello %s", "there")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("it failed")
        await asyncio.to_thread(logger.warning, "from a thread")
        await eventually(lambda: any(raw[3] == b"WARNING smartmob_agent.test_handler: "
                                     b"from a thread" for raw in target._memory()),
                         what="the thread's record")
        handler._busy = True  # as if a record came while one is being kept
        logger.warning("looping")
        handler._busy = False
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    entries = await target.read(100)
    lines = [e.line for e in entries]
    assert lines[0] == "INFO smartmob_agent.test_handler: hello there"
    assert lines[1] == "ERROR smartmob_agent.test_handler: it failed"
    assert lines[2] == "Traceback (most recent call last):"
    assert lines[-2] == "ValueError: boom"
    assert lines[-1] == "WARNING smartmob_agent.test_handler: from a thread"
    assert {e.stream for e in entries} == {"stderr"}
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
    target.close()
