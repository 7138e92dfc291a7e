"""Following a process's log forward (output.follow, output.logfiles): every line from a
number on, across reads cut inside a batch, rotations and older records; what the log
no longer keeps is counted. Real files in a temporary folder."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from smartmob_agent.output.follow import Follower
from smartmob_agent.output.logfiles import Batch
from smartmob_agent.output.logs import LOG_NAME, ProcessLog


def numbered(count: int, start: int = 0) -> list[bytes]:
    return [b"n %06d " % i + b"y" * 90 for i in range(start, start + count)]


def flat(batches: list[Batch]) -> list[tuple[int, bytes]]:
    return [(first + i, line) for first, _, _, lines, _ in batches
            for i, line in enumerate(lines)]


async def follow_all(follower: Follower, limit: int = 4096) -> tuple[list[tuple[int, bytes]], int]:
    """Every line until caught up, and the numbers passed over."""
    got: list[tuple[int, bytes]] = []
    missing = 0
    async with asyncio.timeout(10):
        while not follower.caught_up:
            batches, lost = await follower.read(limit)
            got += flat(batches)
            missing += lost
    follower.close()
    return got, missing


async def test_a_batch_cut_by_a_read_is_numbered_on(tmp_path: Path) -> None:
    """Reads of a few KiB cut one batch of 5000 lines many times: each piece goes on
    numbering from where the previous one stopped."""
    log = ProcessLog(tmp_path, lines=10)
    log.append("stdout", numbered(1))
    mark = log.mark()
    log.append("stdout", numbered(5000, 1))
    got, missing = await follow_all(Follower(log, 2, mark), limit=3000)
    assert missing == 0
    assert got == list(enumerate(numbered(5000, 1), 2))
    log.close()


async def test_follows_the_files_across_rotations_while_lines_come(tmp_path: Path) -> None:
    """From a mark, with lines appended while reads run in a thread and the files
    rotating every 40 kB, a follower gets every line once, in order, then is caught up."""
    log = ProcessLog(tmp_path, lines=100, max_bytes=40_000, files=200)
    rnd = random.Random(7)
    written = 0

    async def writer() -> None:
        nonlocal written
        while written < 20_000:
            count = rnd.randint(1, 300)
            log.append("stdout", numbered(count, written))
            written += count
            await asyncio.sleep(0)

    follower = Follower(log, log.next_seq, log.mark())
    task = asyncio.ensure_future(writer())
    got: list[tuple[int, bytes]] = []
    async with asyncio.timeout(30):
        while not task.done() or not follower.caught_up:
            await asyncio.sleep(0)
            batches, missing = await follower.read(rnd.choice([1000, 50_000, 400_000]))
            assert missing == 0
            got += flat(batches)
    follower.close()
    assert log.rotations > 20
    assert got == list(enumerate(numbered(written), 1))
    log.close()


async def test_lines_rotated_away_are_counted(tmp_path: Path) -> None:
    """A follower from line 1 when the files keep only the last lines: the numbers
    missing are counted, and the lines the files keep follow in order."""
    log = ProcessLog(tmp_path, lines=10, max_bytes=20_000, files=1)
    for start in range(0, 3000, 100):
        log.append("stdout", numbered(100, start))
    got, missing = await follow_all(Follower(log, 1))
    assert got
    assert missing == got[0][0] - 1
    assert got == list(enumerate(numbered(len(got), 3000 - len(got)), got[0][0]))
    assert got[-1][0] == 3000
    log.close()


async def test_without_files_the_ring_buffer_is_followed(tmp_path: Path) -> None:
    """A log kept in memory only is followed in its ring buffer: what it dropped is
    counted."""
    log = ProcessLog(None, lines=100)
    for start in range(0, 300, 30):
        log.append("stdout", numbered(30, start))
    got, missing = await follow_all(Follower(log, 1))
    assert missing == 200
    assert got == list(enumerate(numbered(100, 200), 201))


def write_earlier_log(folder: Path) -> None:
    """The file an earlier agent left: an older record, a batch, and a cut-off end."""
    (folder / LOG_NAME).write_bytes(
        b"1796148000.000000 o an old line\n"
        b"1796148000.100000 1 o 42 0 first\n"
        b"1796148000.100000 1 o 42 0 second\n"
        b"1796148000.200000 3 e 42 0 third\n"
        b"1796148000.300000 4 o 4"  # the agent was killed while writing its prefix
    )


async def test_from_the_middle_of_a_file_past_older_and_cut_off_records(
    tmp_path: Path,
) -> None:
    """Without a mark, the follower finds the line in the files: records of the older
    format and one cut off by a killed agent are passed over, and a later agent's lines
    (numbered from its reserved mark) follow."""
    write_earlier_log(tmp_path)
    log = ProcessLog(tmp_path, lines=2, first_seq=100)
    log.append("stdout", [b"after", b"restart"])
    got, missing = await follow_all(Follower(log, 2))
    assert missing == 0
    assert [(seq, line) for seq, line in got] == [
        (2, b"second"), (3, b"third"), (100, b"after"), (101, b"restart")]
    log.close()
