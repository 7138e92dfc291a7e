"""RepeatLimit: the agent's log records about one process, bounded per kind and window,
with a record that says how many were held back."""

from __future__ import annotations

import logging

import pytest

from smartmob_agent.output.throttle import RepeatLimit
from tests.helpers import eventually

LOGGER = "smartmob_agent.test_throttle"


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == LOGGER]


@pytest.fixture
def logger(caplog: pytest.LogCaptureFixture) -> logging.Logger:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    return logging.getLogger(LOGGER)


def test_the_first_records_of_a_window_pass_and_the_rest_are_summed_up(
    logger: logging.Logger, caplog: pytest.LogCaptureFixture,
) -> None:
    """Of 50 records of one kind within a window, 3 reach the log; the next record after
    the window first says that 47 were held back, with the last of them."""
    clock = Clock()
    limit = RepeatLimit(logger, "app.web", burst=3, window=10.0, clock=clock)
    for pid in range(50):
        limit.info("%s: process %d exited", "app.web", pid)
        clock.now += 0.1
    assert messages(caplog) == [f"app.web: process {pid} exited" for pid in range(3)]
    clock.now += 10.0
    limit.info("%s: process %d exited", "app.web", 50)
    assert messages(caplog)[3:] == [
        "app.web: 47 similar record(s) held back in 10 s; the last: app.web: process 49 exited",
        "app.web: process 50 exited",
    ]


def test_each_kind_of_record_has_its_own_count(
    logger: logging.Logger, caplog: pytest.LogCaptureFixture,
) -> None:
    """A record of another template is not held back because one kind repeats."""
    limit = RepeatLimit(logger, "app.web", burst=1, window=10.0, clock=Clock())
    for _ in range(5):
        limit.info("%s: exited", "app.web")
    limit.warning("%s failed: %s", "app.web", "gave up")
    assert messages(caplog) == ["app.web: exited", "app.web failed: gave up"]
    assert caplog.records[-1].levelno == logging.WARNING


async def test_the_summary_comes_at_the_end_of_the_window_on_the_event_loop(
    logger: logging.Logger, caplog: pytest.LogCaptureFixture,
) -> None:
    """With an event loop running, the summary is logged when the window ends, without
    waiting for another record; it has the level of the records it stands for."""
    limit = RepeatLimit(logger, "app.web", burst=2, window=0.2)
    for pid in range(6):
        limit.warning("%s: process %d exited", "app.web", pid)
    assert len(messages(caplog)) == 2
    await eventually(lambda: len(messages(caplog)) == 3, timeout=5.0, what="the summary")
    assert messages(caplog)[2] == (
        "app.web: 4 similar record(s) held back in 0.2 s; the last: app.web: process 5 exited"
    )
    assert caplog.records[-1].levelno == logging.WARNING


def test_flush_says_what_was_held_back_at_once(
    logger: logging.Logger, caplog: pytest.LogCaptureFixture,
) -> None:
    """A process going away flushes its limit: the summary is logged now, once."""
    limit = RepeatLimit(logger, "app.web", burst=1, window=10.0, clock=Clock())
    for _ in range(3):
        limit.info("%s: exited", "app.web")
    limit.flush()
    limit.flush()
    assert messages(caplog) == [
        "app.web: exited",
        "app.web: 2 similar record(s) held back in 10 s; the last: app.web: exited",
    ]


def test_records_below_the_logger_level_count_for_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Records the logger would drop anyway use none of the burst and are not summed up."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    limit = RepeatLimit(logging.getLogger(LOGGER), "app.web", burst=1, window=10.0,
                        clock=Clock())
    for _ in range(5):
        limit.debug("%s: starting -> running", "app.web")
    limit.info("%s: exited", "app.web")
    limit.flush()
    assert messages(caplog) == ["app.web: exited"]
