"""ThreadHeartbeat: a thread activity's latest progress, repeated from a
helper thread while the activity works between two reports."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from temporalio.testing import ActivityEnvironment

from activities.heartbeat import ThreadHeartbeat


def _environment(previous: list[Any]) -> tuple[ActivityEnvironment, list[tuple]]:
    environment = ActivityEnvironment()
    environment.info = dataclasses.replace(environment.info, heartbeat_details=previous)
    sent: list[tuple] = []
    environment.on_heartbeat = lambda *details: sent.append(details)
    return environment, sent


def test_latest_details_repeated() -> None:
    environment, sent = _environment([])

    def work() -> None:
        with ThreadHeartbeat(0.05) as heartbeat:
            heartbeat({"epoch": 1})
            time.sleep(0.4)

    environment.run(work)
    assert sent[0] == ({"epoch": 1},)
    assert len(sent) >= 3
    assert all(details == ({"epoch": 1},) for details in sent)


def test_repeats_keep_previous_attempt_details() -> None:
    environment, sent = _environment([{"epoch": 4, "checkpoint": "c"}])

    def work() -> None:
        with ThreadHeartbeat(0.05):
            time.sleep(0.3)

    environment.run(work)
    assert sent
    assert all(details == ({"epoch": 4, "checkpoint": "c"},) for details in sent)


def test_repeats_stop_with_activity() -> None:
    environment, sent = _environment([])

    def work() -> None:
        with ThreadHeartbeat(0.05) as heartbeat:
            heartbeat({"epoch": 1})
            time.sleep(0.2)

    environment.run(work)
    count = len(sent)
    time.sleep(0.2)
    assert len(sent) == count
