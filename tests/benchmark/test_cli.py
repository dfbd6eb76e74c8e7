"""`nexus benchmark ...`: option checks and command errors."""

from __future__ import annotations

import subprocess
import uuid

import pytest
from temporalio.client import ScheduleAlreadyRunningError
from typer.testing import CliRunner

from app.benchmark.cli import parse_duration
from app.cli import cli
from app.temporal.devserver import temporal_binary

# Each row: the command line, then the option and the value the message names.
REJECTED = [
    (["run", "--duration", "3x"], "'--duration'", "'3x'"),
    (["run", "--duration", "0s"], "'--duration'", "'0s'"),
    (["run", "--duration", "-1m"], "'--duration'", "'-1m'"),
    (["run", "--duration", "99999d"], "'--duration'", "'99999d'"),
    (["run", "--interval", "-5s"], "'--interval'", "'-5s'"),
    (["run", "--load-multiplier", "0"], "'--load-multiplier'", "0"),
    (["run", "--load-multiplier", "1000"], "'--load-multiplier'", "1000"),
    (["run", "--streams", "0"], "'--streams'", "0"),
    (["run", "--epochs", "-3"], "'--epochs'", "-3"),
    (["schedule", "--every", "0s"], "'--every'", "'0s'"),
    (["schedule", "--duration", "8d"], "'--duration'", "'8d'"),
]


@pytest.mark.parametrize(("arguments", "option", "value"), REJECTED)
def test_bad_option_rejected(arguments: list[str], option: str, value: str) -> None:
    result = CliRunner().invoke(cli, ["benchmark", *arguments])
    output = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2, output
    assert f"Invalid value for {option}: {value} " in output
    assert "use a" in output or "pass a value" in output
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize(("text", "seconds"), [("0", 0.0), ("0s", 0.0), ("0m", 0.0)])
def test_zero_interval_accepted(text: str, seconds: float) -> None:
    assert parse_duration(text, "--interval", allow_zero=True) == seconds


def test_durations_parsed() -> None:
    assert parse_duration("90") == 90.0
    assert parse_duration("1.5m") == 90.0
    assert parse_duration("2h") == 7200.0
    assert parse_duration("1d") == 86400.0


def test_duplicate_schedule_id_rejected(temporal_address: str) -> None:
    schedule_id = f"bench-duplicate-{uuid.uuid4().hex[:6]}"
    command = ["benchmark", "schedule", "--every", "6h", "--id", schedule_id]
    env = {"NEXUS_TEMPORAL_ADDRESS": temporal_address}
    try:
        first = CliRunner().invoke(cli, command, env=env)
        assert first.exit_code == 0, first.output
        second = CliRunner().invoke(cli, command, env=env)
        assert second.exit_code == 1
        assert f"schedule with id {schedule_id!r} already exists" in second.output
        assert not isinstance(second.exception, ScheduleAlreadyRunningError)
    finally:
        delete = ["schedule", "delete", "--schedule-id", schedule_id]
        done = subprocess.run(
            [str(temporal_binary()), *delete, "--address", temporal_address],
            capture_output=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
