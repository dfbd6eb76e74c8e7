"""Repeated options on the `nexus` command line: a single-value option given
twice is a usage error, repeatable options and flags still repeat."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from app.api.cli import json_text
from app.cli import cli
from app.cli_group import NexusGroup, unwrap_help

REPO_ROOT = Path(__file__).resolve().parents[2]

# Commands of each command group, the option given twice, its hint in the
# error, and the values given.
REPEATED = [
    (["swarm", "status", "--swarm", "a", "--swarm", "b"], "'--swarm'", ["a", "b"]),
    (["swarm", "status", "--swarm=a", "--swarm", "b"], "'--swarm'", ["a", "b"]),
    (["audit", "--limit", "1", "--limit", "2"], "'--limit'", ["1", "2"]),
    (
        ["sandbox", "list", "--status", "running", "--status=all"],
        "'--status'",
        ["running", "all"],
    ),
    (
        ["benchmark", "run", "--duration", "1m", "--duration", "2m"],
        "'--duration'",
        ["1m", "2m"],
    ),
    (
        ["neural", "cluster", "train", "c1", "--epochs", "1", "--epochs", "2"],
        "'--epochs'",
        ["1", "2"],
    ),
    (
        ["storage", "download", "b", "p", "--output", "x", "-o", "y"],
        "'--output' / '-o'",
        ["x", "y"],
    ),
    (
        ["workflow", "status", "w1", "--workflow", "a", "--workflow", "b"],
        "'--workflow'",
        ["a", "b"],
    ),
]


def flat(output: str) -> str:
    """Return the output without rich's box lines and line breaks."""
    return " ".join(output.replace("│", " ").split())


@pytest.mark.parametrize(("arguments", "hint", "values"), REPEATED)
def test_repeated_option_rejected(
    arguments: list[str], hint: str, values: list[str]
) -> None:
    result = CliRunner().invoke(cli, arguments)
    output = flat(result.output)
    assert result.exit_code == 2, output
    assert f"Invalid value for {hint}: given twice" in output, output
    assert f"as {values[0]!r} and {values[1]!r}" in output, output
    assert "takes one value; give it once." in output, output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_option_three_times_lists_all() -> None:
    arguments = ["swarm", "status", "--swarm", "a", "--swarm", "b", "--swarm", "c"]
    result = CliRunner().invoke(cli, arguments)
    output = flat(result.output)
    assert result.exit_code == 2, output
    assert "given 3 times, as 'a', 'b' and 'c'" in output, output


def test_help_wins_over_repeat() -> None:
    arguments = ["swarm", "status", "--swarm", "a", "--swarm", "b", "--help"]
    result = CliRunner().invoke(cli, arguments)
    assert result.exit_code == 0, result.output
    assert "Usage: nexus swarm status" in flat(result.output)


def test_list_options_still_repeat() -> None:
    # Each command fails on its last value after the option parsed every
    # value, so no call reaches Temporal.
    env = CliRunner().invoke(
        cli, ["sandbox", "create", "python", "--env", "A=1", "--env", "NOEQUALS"]
    )
    assert env.exit_code == 2, env.output
    assert "item 2 (8 characters) is not NAME=VALUE" in flat(env.output)
    assert "given twice" not in flat(env.output)
    groups = CliRunner().invoke(
        cli, ["keys", "create", "k", "--group", "nope1", "--group", "nope2"]
    )
    assert groups.exit_code == 2, groups.output
    assert "unknown tool group(s) 'nope1', 'nope2'" in flat(groups.output)


def test_keys_create_quotes_blank_group() -> None:
    for value, shown in [("", "''"), (" storage", "' storage'")]:
        result = CliRunner().invoke(cli, ["keys", "create", "k", "--group", value])
        assert result.exit_code == 2, result.output
        assert f"unknown tool group(s) {shown};" in flat(result.output)


def test_tool_fields_repeat_by_type() -> None:
    repeated = CliRunner().invoke(
        cli, ["tool", "audit_log", "--limit", "1", "--limit", "2"]
    )
    assert repeated.exit_code == 2, repeated.output
    message = flat(repeated.output)
    assert "--limit is given twice, as '1' and '2'" in message, message
    assert "give it once" in message, message

    aliases = CliRunner().invoke(
        cli, ["tool", "task_orchestrate", "--maxAgents", "3", "--max-agents", "4"]
    )
    assert aliases.exit_code == 2, aliases.output
    assert "--maxAgents and --max-agents both set maxAgents, as '3' and '4'" in flat(
        aliases.output
    )

    # A list field takes one item per option: the call fails only on the
    # malformed object after both items.
    listed = CliRunner().invoke(
        cli,
        [
            "tool",
            "task_orchestrate",
            "--required-capabilities",
            "gpu",
            "--required-capabilities",
            "fast",
            "--action-args",
            "gpu",
        ],
    )
    assert listed.exit_code == 2, listed.output
    assert "'gpu' is not valid JSON" in flat(listed.output)
    assert "given twice" not in flat(listed.output)

    bare = CliRunner().invoke(
        cli, ["tool", "task_orchestrate", "--required-capabilities"]
    )
    assert bare.exit_code == 2, bare.output
    assert "--required-capabilities has no value" in flat(bare.output)


def test_flags_still_repeat(tmp_path: Path) -> None:
    # `keys list` reads only the SQLite database in the data folder.
    result = CliRunner().invoke(
        cli, ["keys", "list", "--all", "--all"], env={"NEXUS_DATA_DIR": str(tmp_path)}
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "[]"


def test_repeated_option_exits_2_subprocess(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env["NEXUS_DATA_DIR"] = str(tmp_path)
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "app",
            "swarm",
            "status",
            "--swarm",
            "a",
            "--swarm",
            "b",
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2, completed.stderr
    assert completed.stdout == ""
    message = flat(completed.stderr)
    assert "Invalid value for '--swarm': given twice, as 'a' and 'b'" in message
    assert "give it once" in message


def test_every_group_checks_repeats() -> None:
    root = typer.main.get_command(cli)
    groups = [root]
    found = []
    while groups:
        group = groups.pop()
        assert isinstance(group, NexusGroup), f"{group.name} is {type(group)}"
        found.append(group.name)
        groups += [c for c in group.commands.values() if hasattr(c, "commands")]
    assert {"swarm", "sandbox", "cluster", "benchmark", "db", "keys"} <= set(found)


def test_help_paragraphs_joined() -> None:
    result = CliRunner().invoke(cli, ["benchmark", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    lines = [line.strip("│ ") for line in result.output.splitlines()]
    assert (
        "run       Run the benchmark, show progress per phase, then print the "
        "report path and the run's web UI link."
    ) in lines, result.output

    task = CliRunner().invoke(cli, ["swarm", "task", "--help"], env={"COLUMNS": "200"})
    assert task.exit_code == 0, task.output
    assert (
        "With --wait the exit code is 0 for a completed task, 3 for a failed or "
        "cancelled one and 4 when the wait ran out first. Without --wait it is 0 "
        "once the task is submitted."
    ) in [line.strip() for line in task.output.splitlines()], task.output


def test_unwrap_help_keeps_marked_paragraphs() -> None:
    text = (
        "First line\ncontinues.\n\n"
        "\bkept\nas is\n\n"
        "Steps:\n- one\n- two\n\n"
        "Example:\n    nexus up\n\n"
        "Last\nparagraph.\f\nhidden\ntext"
    )
    assert unwrap_help(text) == (
        "First line continues.\n\n"
        "\bkept\nas is\n\n"
        "Steps:\n- one\n- two\n\n"
        "Example:\n    nexus up\n\n"
        "Last paragraph.\f\nhidden\ntext"
    )
    assert unwrap_help(None) is None


def test_json_output_keeps_non_ascii(tmp_path: Path) -> None:
    folder = tmp_path / "Grüße"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env["NEXUS_DATA_DIR"] = str(folder)
    for encoding, shown in (("utf-8", str(folder)), ("ascii", "Gr\\u00fc\\u00dfe")):
        env["PYTHONIOENCODING"] = encoding
        completed = subprocess.run(
            [sys.executable, "-m", "app", "config"],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            timeout=120,
        )
        assert completed.returncode == 0, completed.stderr
        assert shown in completed.stdout.decode(encoding)


def test_json_text_escapes_lone_surrogate() -> None:
    assert json_text({"text": "a\ud800"}, "utf-8") == '{\n  "text": "a\\ud800"\n}'
    assert json_text({"text": "日本"}, "utf-8") == '{\n  "text": "日本"\n}'


def test_json_text_writes_null_for_nan() -> None:
    value = {"probabilities": [[float("nan"), float("inf"), 0.5]], "loss": -math.inf}
    text = json_text(value, "utf-8")

    def reject(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    # Strict JSON: a parser that rejects NaN and Infinity reads it.
    assert json.loads(text, parse_constant=reject) == {
        "probabilities": [[None, None, 0.5]],
        "loss": None,
    }


@pytest.mark.parametrize("module", ["app", "app.cli"])
def test_module_runs_command_line(module: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env["NEXUS_DATA_DIR"] = str(tmp_path)
    completed = subprocess.run(
        [sys.executable, "-m", module, "benchmark", "--help"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert f"Usage: python -m {module} benchmark" in completed.stdout
