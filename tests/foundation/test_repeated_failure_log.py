"""The rate-limited log of a task that fails again and again."""

from __future__ import annotations

import logging

import pytest

from app.logs import RepeatedFailureLog


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fail(log: RepeatedFailureLog, message: str) -> None:
    try:
        raise ConnectionError(f"{message}\nsecond line of the error")
    except ConnectionError:
        log.failed()


def test_outage_logs_traceback_once(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    log = RepeatedFailureLog(
        logging.getLogger("tests.outage"),
        "the sync of things",
        reminder_seconds=60.0,
        clock=clock,
    )
    caplog.set_level(logging.INFO, logger="tests.outage")
    # 46 failures 2 s apart: a first line, then one at 60 s.
    for _ in range(46):
        fail(log, "connection refused")
        clock.now += 2.0
    log.succeeded()
    records = [r for r in caplog.records if r.name == "tests.outage"]
    messages = [r.getMessage() for r in records]
    assert len(records) == 3
    assert messages[0] == "the sync of things failed; retrying"
    assert records[0].exc_info is not None
    assert records[1].exc_info is None
    assert messages[1] == (
        "the sync of things failed 31 times in 60 s, 30 since the last line; "
        "the last error: ConnectionError: connection refused; retrying"
    )
    assert records[2].levelno == logging.INFO
    assert messages[2] == "the sync of things works again after 46 failures in 92 s"


def test_next_outage_starts_over(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    log = RepeatedFailureLog(
        logging.getLogger("tests.outage"), "the sync of things", clock=clock
    )
    caplog.set_level(logging.INFO, logger="tests.outage")
    fail(log, "first outage")
    log.succeeded()
    log.succeeded()
    fail(log, "second outage")
    records = [r for r in caplog.records if r.name == "tests.outage"]
    assert [r.exc_info is not None for r in records] == [True, False, True]
    assert log.failures == 1
