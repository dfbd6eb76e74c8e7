"""`nexus benchmark ...` option checks, before anything starts."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from app.benchmark.cli import parse_duration
from app.cli import cli

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
