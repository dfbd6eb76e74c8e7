"""`nexus swarm task` and `nexus swarm results`: exit codes by task status,
and the task options that map to task_orchestrate's arguments."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from typer.testing import CliRunner

from app.cli import cli
from app.settings import Settings
from tests.api.conftest import REPO_ROOT, server_env
from tests.swarm.conftest import GATED_PROGRAM, Swarms, agent_folder, wait_for_file


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> dict[str, Any]:
        return json.loads(self.stdout)  # type: ignore[no-any-return]


async def nexus(swarms: Swarms, *args: str) -> Run:
    """Run `nexus ARGS` in a subprocess, so this test's workers keep running
    on the event loop while the command waits."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "app",
        *args,
        cwd=REPO_ROOT,
        env=server_env(swarms.settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 180)
    assert process.returncode is not None
    return Run(process.returncode, stdout.decode(), stderr.decode())


def remember_task(swarms: Swarms, run: Run) -> dict[str, Any]:
    """Parse a command's JSON result and let teardown end its task workflow."""
    result = run.json()
    swarms.workflow_ids.append(f"swarm-task-{result['task_id']}")
    return result


async def test_task_wait_exit_codes(swarms: Swarms) -> None:
    swarm_id, _ = await swarms.swarm("mesh", ["coder"])
    task = ("swarm", "task", "--swarm", swarm_id)

    completed = await nexus(swarms, *task, "ok", "--command", "echo ok", "--wait", "60")
    assert completed.returncode == 0, completed.stderr
    assert remember_task(swarms, completed)["status"] == "completed"

    failed = await nexus(swarms, *task, "fail", "--command", "exit 2", "--wait", "60")
    assert failed.returncode == 3, failed.stderr
    assert remember_task(swarms, failed)["status"] == "failed"
    assert f"task {failed.json()['task_id']} failed" in failed.stderr
    assert "exit code 2" in failed.stderr


async def test_task_wait_ran_out(swarms: Swarms) -> None:
    swarm_id, agents = await swarms.swarm("mesh", ["coder"])
    task = ("swarm", "task", "--swarm", swarm_id)

    running = await nexus(
        swarms, *task, "gated", "--code", GATED_PROGRAM, "--wait", "2"
    )
    assert running.returncode == 4, running.stderr
    task_id = remember_task(swarms, running)["task_id"]
    assert running.json()["status"] in ("queued", "running")
    assert "after waiting 2 s" in running.stderr
    # The agent gets its sandbox with its first task.
    folder = await agent_folder(swarms, agents[0]["agent_id"])

    unwaited = await nexus(swarms, "swarm", "results", task_id)
    assert unwaited.returncode == 4, unwaited.stderr
    assert f"task {task_id} has not ended" in unwaited.stderr

    await wait_for_file(folder / "started")
    (folder / "gate").touch()
    finished = await nexus(swarms, "swarm", "results", task_id, "--wait", "60")
    assert finished.returncode == 0, finished.stderr
    assert finished.json()["status"] == "completed"


async def test_task_options_reach_tool(swarms: Swarms) -> None:
    swarm_id, _ = await swarms.swarm("mesh", [])
    await swarms.call(
        "agent_spawn", type="analyst", capabilities=["audit"], swarm_id=swarm_id
    )
    task = ("swarm", "task", "--swarm", swarm_id)

    audited = await nexus(
        swarms,
        *task,
        "read the audit log",
        "--action",
        "audit_log",
        "--action-args",
        '{"limit": 1}',
        "--required-capability",
        "audit",
        "--wait",
        "60",
    )
    assert audited.returncode == 0, audited.stderr
    step = remember_task(swarms, audited)["results"][0]
    assert step["output"]["count"] == 1

    # No agent has gpu and the swarm may grow, so the task waits for one.
    queued = await nexus(
        swarms, *task, "x", "--command", "true", "--required-capability", "gpu"
    )
    assert queued.returncode == 0, queued.stderr
    status = await nexus(swarms, "swarm", "status", "--task", queued.json()["task_id"])
    assert status.returncode == 0, status.stderr
    assert "required_capabilities ['gpu']" in status.json()["waiting_reason"]

    slow = await nexus(
        swarms, *task, "slow", "--command", "sleep 30", "--timeout", "1", "--wait", "60"
    )
    assert slow.returncode == 3, slow.stderr
    assert "timed out" in remember_task(swarms, slow)["error"]


def test_malformed_action_args_rejected() -> None:
    for value, problem in (
        ("{limit: 1}", "is not valid JSON"),
        ("[1]", "is not a JSON object"),
    ):
        result = CliRunner().invoke(
            cli, ["swarm", "task", "x", "--action", "audit_log", "--action-args", value]
        )
        output = " ".join(result.output.replace("│", " ").split())
        assert result.exit_code == 2, output
        assert f"Invalid value for '--action-args': {value!r} {problem}" in output
        assert """e.g. '{"limit": 10}'""" in output
        assert result.exception is None or isinstance(result.exception, SystemExit)


def test_bad_seconds_named() -> None:
    wait_range = "use a number of seconds from 0 and at most 3600"
    timeout_range = "use a number of seconds above 0 and at most 86400"
    for arguments, message in (
        (
            ["results", "t", "--wait", "nan"],
            f"'--wait': nan is out of range; {wait_range}",
        ),
        (
            ["results", "t", "--wait", "inf"],
            f"'--wait': inf is out of range; {wait_range}",
        ),
        (
            ["results", "t", "--wait", "abc"],
            f"'--wait': 'abc' is not a number; {wait_range}",
        ),
        (
            ["task", "x", "--wait", "3601"],
            f"'--wait': 3601 is out of range; {wait_range}",
        ),
        (
            ["task", "x", "--timeout", "0"],
            f"'--timeout': 0 is out of range; {timeout_range}",
        ),
        (["task", "x", "--timeout", "abc"], "'--timeout': 'abc' is not a number"),
    ):
        result = CliRunner().invoke(cli, ["swarm", *arguments])
        output = " ".join(result.output.replace("│", " ").split())
        assert result.exit_code == 2, output
        assert f"Invalid value for {message}" in output


def test_status_of_empty_task_id_rejected(swarm_settings: Settings) -> None:
    # An empty --task is a task id that is missing, not a request for the
    # swarm's status.
    result = CliRunner().invoke(
        cli, ["swarm", "status", "--task", ""], env=server_env(swarm_settings)
    )
    output = " ".join(result.output.split())
    assert result.exit_code == 1, output
    assert "task_id: '' is invalid" in output
    assert "task_id is empty; give the task_id that task_orchestrate returned" in (
        output
    )


def test_max_agents_range_names_flag() -> None:
    runner = CliRunner()
    for args in (
        ["swarm", "init", "mesh", "--max-agents", "0"],
        ["swarm", "init", "mesh", "--max-agents", "101"],
        ["swarm", "task", "x", "--swarm", "s", "--max-agents", "11"],
    ):
        result = runner.invoke(cli, args)
        assert result.exit_code == 2, result.output
        assert "Invalid value for '--max-agents'" in result.output


def test_choice_flags_are_usage_errors() -> None:
    runner = CliRunner()
    for args, flag, allowed in (
        (["swarm", "init", "rings"], "'topology'", "hierarchical, mesh, ring, star"),
        (["swarm", "init", "mesh", "--strategy", "x"], "'--strategy'", "balanced"),
        (["swarm", "task", "x", "--priority", "urgent"], "'--priority'", "critical"),
        (["swarm", "task", "x", "--strategy", "fast"], "'--strategy'", "adaptive"),
        (["swarm", "task", "x", "--language", "ruby"], "'--language'", "bash"),
        (["swarm", "spawn", "wizard"], "'agent_type'", "coder"),
    ):
        result = runner.invoke(cli, args)
        assert result.exit_code == 2, result.output
        # The error box wraps its lines.
        text = " ".join(result.output.replace("│", " ").split())
        assert f"Invalid value for {flag}" in text
        assert allowed in text


async def test_sandbox_exec_exit_codes(swarms: Swarms) -> None:
    # Here for this module's subprocess helper and the sandbox queue's workers.
    created = await swarms.call("sandbox_create", template="python")
    sandbox_id = created["sandbox_id"]
    swarms.workflow_ids.append(f"sandbox-{sandbox_id}")
    exec_ = ("sandbox", "exec", sandbox_id)

    completed = await nexus(swarms, *exec_, "print('ok')")
    assert completed.returncode == 0, completed.stderr
    assert completed.json()["stdout"] == "ok\n"
    failed = await nexus(swarms, *exec_, "import sys; sys.exit(2)")
    assert failed.returncode == 3, failed.stderr
    assert failed.json()["exit_code"] == 2
    timed_out = await nexus(
        swarms, *exec_, "import time; time.sleep(30)", "--timeout", "1"
    )
    assert timed_out.returncode == 4, timed_out.stderr
    assert timed_out.json()["status"] == "timed_out"
