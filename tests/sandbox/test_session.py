"""Sandbox tools end to end: real local sandboxes, real workflows."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from temporalio.client import (
    Client,
    WorkflowHandle,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.exceptions import ApplicationError

from activities.sandbox import SandboxActivities
from app.contracts.sandbox import (
    CALL_INPUT_LIMIT,
    CUT_MARKER,
    LOG_BYTES_KEPT,
    RESULT_OUTPUT_LIMIT,
    SPEC_LIMIT,
    ExecuteRequest,
    SandboxSpec,
    encoded_size,
)
from app.sandbox import service
from app.sandbox.backend import SandboxBackendError
from app.sandbox.local import LocalBackend
from app.settings import Settings
from app.tools import ToolContext, ToolError, ToolInputError, invoke_tool
from tests.conftest import TEST_ENCRYPTION_KEY
from tests.support.replay import replay_run, replay_saved
from workflows.sandbox import SandboxSessionWorkflow

SECRET = "sk-test-very-secret-value-7f3a"


async def call(ctx: ToolContext, name: str, **arguments: Any) -> dict[str, Any]:
    return await invoke_tool(ctx, name, arguments)


def sandbox_home(ctx: ToolContext, backend_id: str) -> Path:
    return ctx.settings.resolved_data_dir / "sandboxes" / backend_id / "home"


async def test_execute_each_language(tool_ctx: ToolContext) -> None:
    created = await call(tool_ctx, "sandbox_create", template="python")
    sandbox_id = created["sandbox_id"]
    try:
        cases = {
            "python": "import sys; print('py', sys.version_info[0])",
            "javascript": "console.log('js', 1 + 1)",
            "bash": "echo bash $((2 + 3))",
        }
        expected = {"python": "py 3", "javascript": "js 2", "bash": "bash 5"}
        for language, code in cases.items():
            result = await call(
                tool_ctx,
                "sandbox_execute",
                sandbox_id=sandbox_id,
                code=code,
                language=language,
            )
            assert result["status"] == "completed", result
            assert result["exit_code"] == 0
            assert result["stdout"].strip() == expected[language]
            assert result["execution_time"] > 0
        failed = await call(
            tool_ctx,
            "sandbox_execute",
            sandbox_id=sandbox_id,
            code="import sys; sys.exit(3)",
        )
        assert failed["status"] == "failed"
        assert failed["exit_code"] == 3
        logs = await call(tool_ctx, "sandbox_logs", sandbox_id=sandbox_id, lines=2)
        assert logs["count"] == 2
        assert logs["lines"][-1] == "[stdout] bash 5"
    finally:
        await call(tool_ctx, "sandbox_delete", sandbox_id=sandbox_id)


async def test_env_vars_and_configure_last(tool_ctx: ToolContext) -> None:
    created = await call(
        tool_ctx, "sandbox_create", template="base", env_vars={"GREETING": "hello"}
    )
    sandbox_id = created["sandbox_id"]
    assert created["env_vars_configured"] == ["GREETING"]
    try:
        code = (
            "import os; e = os.environ; print(e.get('GREETING') == 'hello', "
            "e.get('ONCE') == 'x', e.get('LATER') == 'y')"
        )
        first = await call(
            tool_ctx,
            "sandbox_execute",
            sandbox_id=sandbox_id,
            code=code,
            env_vars={"ONCE": "x"},
        )
        assert first["stdout"].strip() == "True True False"
        configured = await call(
            tool_ctx,
            "sandbox_configure",
            sandbox_id=sandbox_id,
            env_vars={"LATER": "y"},
            run_commands=["echo configured > marker.txt"],
        )
        assert configured["env_vars_configured"] == ["GREETING", "LATER"]
        second = await call(
            tool_ctx, "sandbox_execute", sandbox_id=sandbox_id, code=code
        )
        assert second["stdout"].strip() == "True False True"
        marker = await call(
            tool_ctx,
            "sandbox_execute",
            sandbox_id=sandbox_id,
            code="cat marker.txt",
            language="bash",
        )
        assert marker["stdout"].strip() == "configured"
    finally:
        await call(tool_ctx, "sandbox_delete", sandbox_id=sandbox_id)


async def test_mask_env_vars_masks_any_name(
    tool_ctx: ToolContext, client: Client
) -> None:
    created = await call(
        tool_ctx, "sandbox_create", template="base", env_vars={"KEPT": "kept-value"}
    )
    sandbox_id = created["sandbox_id"]
    try:
        result = await call(
            tool_ctx,
            "sandbox_execute",
            sandbox_id=sandbox_id,
            language="bash",
            code='echo "$KEPT $ONCE $SHOWN"',
            env_vars={"ONCE": "once-value", "SHOWN": "shown-value"},
            mask_env_vars=["KEPT", "ONCE"],
        )
        assert result["stdout"] == "******** ******** shown-value\n"
        logs = await call(tool_ctx, "sandbox_logs", sandbox_id=sandbox_id)
        assert logs["lines"] == ["[stdout] ******** ******** shown-value"]
        with pytest.raises(ToolError) as unknown:
            await call(
                tool_ctx,
                "sandbox_execute",
                sandbox_id=sandbox_id,
                code="print(1)",
                mask_env_vars=["MISSING"],
            )
        assert unknown.value.kind == "invalid_argument"
        assert "mask_env_vars ['MISSING']" in unknown.value.message
        assert "['KEPT']" in unknown.value.message
        with pytest.raises(ToolInputError) as bad_name:
            await call(
                tool_ctx,
                "sandbox_execute",
                sandbox_id=sandbox_id,
                code="print(1)",
                mask_env_vars=["1BAD"],
            )
        assert "mask_env_vars" in bad_name.value.message
        assert "'1BAD' is invalid" in bad_name.value.message
    finally:
        await call(tool_ctx, "sandbox_delete", sandbox_id=sandbox_id)
    history = await client.get_workflow_handle(f"sandbox-{sandbox_id}").fetch_history()
    stored = b"".join(event.SerializeToString() for event in history.events)
    assert b"kept-value" not in stored
    assert b"once-value" not in stored
    assert b"shown-value" in stored


async def test_secret_names_match_segments(tool_ctx: ToolContext) -> None:
    """Metadata keys and env var names are secrets by whole name segments:
    `keyboard` and `turkey_count` are ordinary labels, while `api_key` and
    the names users give secrets, with or without separators, still are."""
    for key in ("api_key", "apikey", "X-Api-Key", "authToken", "db_password"):
        with pytest.raises(ToolInputError) as secret_metadata:
            await call(tool_ctx, "sandbox_create", template="base", metadata={key: "v"})
        assert f"metadata key {key!r} names a secret" in secret_metadata.value.message
    secret_names = [
        "OPENAI_API_KEY",
        "apikey",
        "authToken",
        "db_password",
        "KEYS",
        "PRIVATEKEYPEM",
        "MYSQL_PWD",
    ]
    plain_names = ["keyboard", "turkey_count", "TOKENIZER"]
    created = await call(
        tool_ctx,
        "sandbox_create",
        template="base",
        metadata={"keyboard": "us", "turkey_count": "3"},
        env_vars={name: f"value-of-{name}" for name in secret_names + plain_names},
    )
    sandbox_id = created["sandbox_id"]
    try:
        assert created["metadata"] == {"keyboard": "us", "turkey_count": "3"}
        result = await call(
            tool_ctx,
            "sandbox_execute",
            sandbox_id=sandbox_id,
            code=(
                "import os\n"
                f"for name in {secret_names + plain_names!r}: "
                "print(name, os.environ[name])"
            ),
        )
        shown = dict(line.split(" ", 1) for line in result["stdout"].splitlines())
        for name in secret_names:
            assert shown[name] == "********", name
        for name in plain_names:
            assert shown[name] == f"value-of-{name}", name
    finally:
        await call(tool_ctx, "sandbox_delete", sandbox_id=sandbox_id)


async def test_unanswered_call_times_out(
    tool_ctx: ToolContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    created = await call(tool_ctx, "sandbox_create", template="base")
    sandbox_id = created["sandbox_id"]

    async def no_reply(*args: object, **kwargs: object) -> object:
        # What the client raises when the RPC deadline passes without a reply.
        raise WorkflowUpdateRPCTimeoutOrCancelledError()

    try:
        monkeypatch.setattr(WorkflowHandle, "execute_update", no_reply)
        with pytest.raises(ToolError) as caught:
            await call(tool_ctx, "sandbox_execute", sandbox_id=sandbox_id, code="1")
        monkeypatch.undo()
        assert caught.value.kind == "unavailable"
        message = caught.value.message
        assert f"the execute call to sandbox {sandbox_id} timed out" in message
        assert "may still run" in message
    finally:
        monkeypatch.undo()
        await call(tool_ctx, "sandbox_delete", sandbox_id=sandbox_id)


async def test_timeout_kills_process_group(tool_ctx: ToolContext) -> None:
    created = await call(tool_ctx, "sandbox_create", template="base")
    sandbox_id = created["sandbox_id"]
    try:
        # A child in the background writes a file after 3 s unless killed.
        code = "(sleep 3; echo late > late.txt) & sleep 30"
        result = await call(
            tool_ctx,
            "sandbox_execute",
            sandbox_id=sandbox_id,
            code=code,
            language="bash",
            timeout=1,
        )
        assert result["status"] == "timed_out"
        assert result["exit_code"] is None
        check = await call(
            tool_ctx,
            "sandbox_execute",
            sandbox_id=sandbox_id,
            code="sleep 3; ls late.txt",
            language="bash",
        )
        assert check["status"] == "failed", check
    finally:
        await call(tool_ctx, "sandbox_delete", sandbox_id=sandbox_id)


async def test_output_cap_marks_dropped(tool_ctx: ToolContext) -> None:
    created = await call(tool_ctx, "sandbox_create", template="base")
    sandbox_id = created["sandbox_id"]
    limit = tool_ctx.settings.sandbox_output_limit
    try:
        result = await call(
            tool_ctx,
            "sandbox_execute",
            sandbox_id=sandbox_id,
            code=f"print('a' * {limit + 5000}, end='')",
        )
        assert result["stdout_dropped_bytes"] == 5000
        assert result["stdout"].endswith("[output truncated: 5000 bytes dropped]")
        assert result["stdout"].split("\n")[0] == "a" * limit
    finally:
        await call(tool_ctx, "sandbox_delete", sandbox_id=sandbox_id)


async def test_lost_sandbox_is_recreated(tool_ctx: ToolContext, client: Client) -> None:
    created = await call(
        tool_ctx,
        "sandbox_create",
        template="python",
        startup_script="echo started >> setup.log",
    )
    sandbox_id = created["sandbox_id"]
    try:
        status = await call(tool_ctx, "sandbox_status", sandbox_id=sandbox_id)
        assert status["live"]["alive"] is True
        shutil.rmtree(sandbox_home(tool_ctx, status["backend_id"]))
        lost = await call(tool_ctx, "sandbox_status", sandbox_id=sandbox_id)
        assert lost["live"]["alive"] is False
        assert lost["live"]["state"] == "lost"
        result = await call(
            tool_ctx,
            "sandbox_execute",
            sandbox_id=sandbox_id,
            code="print(open('setup.log').read().strip())",
        )
        assert result["status"] == "completed", result
        assert result["recreated"] == 1
        assert result["stdout"].strip() == "started"
        lost_folder = sandbox_home(tool_ctx, status["backend_id"]).parent
        assert not lost_folder.exists(), "the lost sandbox's files were left"
        after = await call(tool_ctx, "sandbox_status", sandbox_id=sandbox_id)
        assert after["recreated"] == 1
        assert after["live"]["alive"] is True
        kinds = [event["kind"] for event in after["events"]]
        assert "recreated" in kinds
        assert after["created_at"].endswith("Z")
        assert all(event["at"].endswith("Z") for event in after["events"])
        again = await call(
            tool_ctx, "sandbox_execute", sandbox_id=sandbox_id, code="print(2)"
        )
        assert again["recreated"] == 0
    finally:
        await call(tool_ctx, "sandbox_delete", sandbox_id=sandbox_id)
    await replay_run(client, f"sandbox-{sandbox_id}", [SandboxSessionWorkflow])


async def test_recreation_before_cleanup_replays(client: Client) -> None:
    # Recorded before recreation deleted the lost sandbox's files.
    await replay_saved(client, "sandbox_before_lost_cleanup", [SandboxSessionWorkflow])


async def test_killed_anchor_is_recreated(tool_ctx: ToolContext) -> None:
    import asyncio
    import os
    import signal

    created = await call(tool_ctx, "sandbox_create", template="base")
    sandbox_id = created["sandbox_id"]
    try:
        status = await call(tool_ctx, "sandbox_status", sandbox_id=sandbox_id)
        state_file = sandbox_home(tool_ctx, status["backend_id"]).parent / "state.json"
        pid = json.loads(state_file.read_text())["anchor_pid"]
        os.killpg(pid, signal.SIGKILL)
        # SIGKILL lands asynchronously; wait until the kernel shows it dead.
        stat = Path(f"/proc/{pid}/stat")
        while stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":
            await asyncio.sleep(0.01)
        result = await call(
            tool_ctx,
            "sandbox_upload",
            sandbox_id=sandbox_id,
            file_path="notes/a.txt",
            content="hi",
        )
        assert result["recreated"] == 1
        assert not state_file.parent.exists(), "the lost sandbox's files were left"
    finally:
        await call(tool_ctx, "sandbox_delete", sandbox_id=sandbox_id)


async def test_expired_sandbox_is_recreated(tool_ctx: ToolContext) -> None:
    import asyncio

    created = await call(tool_ctx, "sandbox_create", template="base", timeout=1)
    sandbox_id = created["sandbox_id"]
    try:
        backend_id = (await call(tool_ctx, "sandbox_status", sandbox_id=sandbox_id))[
            "backend_id"
        ]
        home = sandbox_home(tool_ctx, backend_id)
        for _ in range(100):
            if not home.exists():
                break
            await asyncio.sleep(0.1)
        assert not home.exists(), "the anchor did not remove the expired sandbox"
        status = await call(tool_ctx, "sandbox_status", sandbox_id=sandbox_id)
        assert status["live"]["state"] == "expired"
        result = await call(
            tool_ctx, "sandbox_execute", sandbox_id=sandbox_id, code="print('back')"
        )
        assert result["recreated"] == 1
        assert result["stdout"].strip() == "back"
        assert not home.parent.exists(), "the expired sandbox's state was left"
    finally:
        await call(tool_ctx, "sandbox_delete", sandbox_id=sandbox_id)


async def test_secret_absent_from_history_and_logs(
    tool_ctx: ToolContext, client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    created = await call(
        tool_ctx,
        "sandbox_create",
        template="claude-code" if shutil.which("claude") else "base",
        env_vars={"API_TOKEN": SECRET},
        anthropic_key=SECRET + "-anthropic",
    )
    sandbox_id = created["sandbox_id"]
    try:
        assert SECRET not in json.dumps(created)
        result = await call(
            tool_ctx,
            "sandbox_execute",
            sandbox_id=sandbox_id,
            code="import os; t = os.environ['API_TOKEN']; print(t); print(len(t))",
        )
        assert result["stdout"].splitlines() == ["********", str(len(SECRET))]
        await call(
            tool_ctx,
            "sandbox_configure",
            sandbox_id=sandbox_id,
            env_vars={"OTHER": SECRET + "-2"},
        )
        listed = await call(tool_ctx, "sandbox_list")
        assert SECRET not in json.dumps(listed)
        audit = await call(tool_ctx, "audit_log", limit=20)
        assert SECRET not in json.dumps(audit)
    finally:
        await call(tool_ctx, "sandbox_delete", sandbox_id=sandbox_id)
    history = await client.get_workflow_handle(f"sandbox-{sandbox_id}").fetch_history()
    text = history.to_json()
    # Payloads are base64 in the JSON form; search them decoded too.
    decoded = "\n".join(
        base64.b64decode(data).decode("utf-8", errors="replace")
        for data in re.findall(r'"data": "([A-Za-z0-9+/=]+)"', text)
    )
    assert "API_TOKEN" in decoded
    assert "sealed:v1:" in decoded
    assert SECRET not in text
    assert SECRET not in decoded
    assert SECRET not in caplog.text


async def test_multiline_secret_lines_masked(
    tool_ctx: ToolContext, client: Client
) -> None:
    """Each line of a multi-line secret is masked wherever the whole value is:
    in the result, the kept logs, the history and the database, also when
    printed a line at a time or with CRLF line ends. Lines under 8
    characters stay, because they are too common to mask."""
    body = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC"
    short = "Zq7x"
    pem = f"-----BEGIN KEY-----\n{body}\n{short}\n-----END KEY-----"
    created = await call(
        tool_ctx, "sandbox_create", template="base", env_vars={"PRIVATE_KEY": pem}
    )
    sandbox_id = created["sandbox_id"]
    try:
        result = await call(
            tool_ctx,
            "sandbox_execute",
            sandbox_id=sandbox_id,
            code=(
                "import os\n"
                "v = os.environ['PRIVATE_KEY']\n"
                "print(v)\n"
                "print(v.splitlines()[1])\n"
                "print(v.replace('\\n', '\\r\\n'))\n"
                "print(f'  {v.splitlines()[1]}  ', v.splitlines()[2])\n"
            ),
        )
        assert result["stdout"].split("\n") == [
            "********",
            "********",
            "********\r",
            "********\r",
            f"{short}\r",
            "********",
            f"  ********   {short}",
            "",
        ]
        logs = await call(tool_ctx, "sandbox_logs", sandbox_id=sandbox_id)
        assert logs["lines"]
        assert body not in json.dumps(logs)
        assert "********" in json.dumps(logs)
    finally:
        await call(tool_ctx, "sandbox_delete", sandbox_id=sandbox_id)
    history = await client.get_workflow_handle(f"sandbox-{sandbox_id}").fetch_history()
    stored = b"".join(event.SerializeToString() for event in history.events)
    assert body.encode() not in stored
    # The SQLite database with its write-ahead log, where recent rows are.
    data_dir = tool_ctx.settings.resolved_data_dir
    for database_file in data_dir.glob("nexus.db*"):
        assert body.encode() not in database_file.read_bytes(), database_file


async def test_bwrap_blocks_files_and_network(tool_ctx: ToolContext) -> None:
    import asyncio

    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed")
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    created = await call(tool_ctx, "sandbox_create", template="base")
    sandbox_id = created["sandbox_id"]
    try:
        code = (
            "import os, socket\n"
            "for path in ('/etc/shadow', '/root', '" + str(Path.cwd()) + "'):\n"
            "    print(path, os.path.exists(path))\n"
            "try:\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "    print('connected')\n"
            "except OSError as error:\n"
            "    print('blocked', type(error).__name__)\n"
        )
        result = await call(
            tool_ctx, "sandbox_execute", sandbox_id=sandbox_id, code=code
        )
        lines = result["stdout"].splitlines()
        assert lines[0] == "/etc/shadow False"
        assert lines[1] == "/root False"
        assert lines[2].endswith(" False")
        assert lines[3].startswith("blocked"), lines
    finally:
        server.close()
        await call(tool_ctx, "sandbox_delete", sandbox_id=sandbox_id)


async def test_templates_and_failing_install(tool_ctx: ToolContext) -> None:
    created = await call(tool_ctx, "sandbox_create", template="react")
    sandbox_id = created["sandbox_id"]
    try:
        result = await call(
            tool_ctx,
            "sandbox_execute",
            sandbox_id=sandbox_id,
            language="javascript",
            code="const deps = require('./package.json').dependencies;\n"
            "console.log(deps.react !== undefined)",
        )
        assert result["stdout"].strip() == "true"
    finally:
        await call(tool_ctx, "sandbox_delete", sandbox_id=sandbox_id)
    with pytest.raises(ToolError) as failure:
        await call(
            tool_ctx,
            "sandbox_create",
            template="python",
            install_packages=["nexus-no-such-package"],
        )
    assert failure.value.kind == "invalid_argument"
    assert "pip install" in failure.value.message
    assert "nexus-no-such-package" in failure.value.message
    assert (await call(tool_ctx, "sandbox_list", status="all"))["count"] == 0


async def test_failed_startup_script_leaves_nothing(
    tool_ctx: ToolContext, client: Client
) -> None:
    with pytest.raises(ToolError) as failure:
        await call(
            tool_ctx,
            "sandbox_create",
            template="base",
            startup_script="echo boom; echo oops >&2; exit 7",
        )
    message = failure.value.message
    assert failure.value.kind == "invalid_argument"
    assert "the startup script exited with code 7." in message, message
    assert "create the sandbox again" in message
    assert message.endswith("Its output ends:\nboom\noops")
    named = re.search(r"sandbox (sbx_\w+)", message)
    assert named is not None
    sandbox_id = named.group(1)

    assert (await call(tool_ctx, "sandbox_list", status="all"))["count"] == 0
    status = await call(tool_ctx, "sandbox_status", sandbox_id=sandbox_id)
    assert status["status"] == "failed"
    assert "exited with code 7" in status["error"]
    sandboxes = tool_ctx.settings.resolved_data_dir / "sandboxes"
    assert list(sandboxes.glob(f"{sandbox_id}-*")) == []
    deleted = await call(tool_ctx, "sandbox_delete", sandbox_id=sandbox_id)
    assert deleted["status"] == "deleted"
    await replay_run(client, f"sandbox-{sandbox_id}", [SandboxSessionWorkflow])


async def test_failed_configure_names_command(tool_ctx: ToolContext) -> None:
    created = await call(tool_ctx, "sandbox_create", template="base")
    sandbox_id = created["sandbox_id"]
    try:
        with pytest.raises(ToolError) as failure:
            await call(
                tool_ctx,
                "sandbox_configure",
                sandbox_id=sandbox_id,
                env_vars={"NEW_PASSWORD": "configured-pw"},
                run_commands=[
                    "echo $NEW_PASSWORD > pw.txt",
                    "echo half done; exit 3",
                    "touch never.txt",
                ],
            )
        message = failure.value.message
        assert failure.value.kind == "invalid_argument"
        assert "run_commands[1] `echo half done; exit 3` exited with code 3" in message
        assert "Before it, run_commands[0] `echo $NEW_PASSWORD > pw.txt` ran" in message
        assert "its env vars are not set" in message
        assert message.endswith("Its output ends:\nhalf done")
        result = await call(
            tool_ctx,
            "sandbox_execute",
            sandbox_id=sandbox_id,
            code=(
                "import os; print(os.environ.get('NEW_PASSWORD'), "
                "os.path.exists('pw.txt'), os.path.exists('never.txt'))"
            ),
        )
        assert result["stdout"] == "None True False\n"
        status = await call(tool_ctx, "sandbox_status", sandbox_id=sandbox_id)
        assert status["env_vars_configured"] == []
        assert [e["kind"] for e in status["events"]] == ["created"]
    finally:
        await call(tool_ctx, "sandbox_delete", sandbox_id=sandbox_id)


async def test_claude_code_failure_names_cause(
    tool_ctx: ToolContext, client: Client
) -> None:
    if shutil.which("claude") and tool_ctx.settings.anthropic_api_key:
        pytest.skip("claude and an Anthropic key are present, so creation works")
    # Without a setup, the creation runs as a local activity of the session.
    with pytest.raises(ToolError) as failure:
        await call(tool_ctx, "sandbox_create", template="claude-code")
    message = failure.value.message
    assert "template claude-code needs" in message, message
    assert "completed before the Update" not in message
    # Without a setup, no row was written, and the failure writes none.
    assert (await call(tool_ctx, "sandbox_list", status="all"))["count"] == 0
    named = re.search(r"sandbox (sbx_\w+)", message)
    assert named is not None
    sandbox_id = named.group(1)
    status = await call(tool_ctx, "sandbox_status", sandbox_id=sandbox_id)
    assert status["status"] == "failed"
    assert status["template"] == "claude-code"
    handle = client.get_workflow_handle(f"sandbox-{sandbox_id}")
    assert (await handle.result())["status"] == "failed"
    await replay_run(client, f"sandbox-{sandbox_id}", [SandboxSessionWorkflow])


async def test_bad_input_rejected(tool_ctx: ToolContext) -> None:
    with pytest.raises(ToolInputError):
        await call(tool_ctx, "sandbox_create", template="windows")
    with pytest.raises(ToolInputError):
        await call(tool_ctx, "sandbox_create", template="base", timeout=0)
    for package in ("--index-url=http://127.0.0.1:9/", "", "pip:-rfile", "npm: "):
        with pytest.raises(ToolInputError) as bad_package:
            await call(
                tool_ctx, "sandbox_create", template="base", install_packages=[package]
            )
        assert "install_packages" in bad_package.value.message
        assert f"package {package!r} is invalid" in bad_package.value.message
    # The installers have the network: nothing that fetches from elsewhere.
    for package in (
        "http://127.0.0.1:9/pkg.tar.gz",
        "git+https://127.0.0.1:9/repo",
        "npm:github:user/repo",
        "npm:user/repo",
        "pip:./pkg",
        "pip:name @ file:///tmp/pkg",
        "pip:pkg.tar.gz",
    ):
        with pytest.raises(ToolInputError) as fetching:
            await call(
                tool_ctx, "sandbox_create", template="base", install_packages=[package]
            )
        assert f"package {package!r} cannot be installed" in fetching.value.message
    with pytest.raises(ToolInputError) as secret_label:
        await call(
            tool_ctx,
            "sandbox_create",
            template="base",
            metadata={"team": "a", "api_token": "S3CEMETATOKEN5"},
        )
    assert "metadata key 'api_token' names a secret" in secret_label.value.message
    assert "S3CEMETATOKEN5" not in secret_label.value.message
    with pytest.raises(ToolInputError) as nul_script:
        await call(
            tool_ctx, "sandbox_create", template="base", startup_script="echo a\x00"
        )
    assert "startup_script contains a NUL character" in nul_script.value.message
    # Rejected before any session started.
    assert (await call(tool_ctx, "sandbox_list"))["count"] == 0
    created = await call(tool_ctx, "sandbox_create", template="base")
    sandbox_id = created["sandbox_id"]
    try:
        with pytest.raises(ToolInputError):
            await call(tool_ctx, "sandbox_execute", sandbox_id=sandbox_id, code="  ")
        with pytest.raises(ToolInputError) as nul_code:
            await call(
                tool_ctx, "sandbox_execute", sandbox_id=sandbox_id, code="print(1)\x00"
            )
        assert "code contains a NUL character at position 8" in nul_code.value.message
        with pytest.raises(ToolInputError):
            await call(
                tool_ctx,
                "sandbox_execute",
                sandbox_id=sandbox_id,
                code="1",
                timeout=-1,
            )
        for path in ("../escape.txt", "a/../../escape.txt", "/etc/passwd"):
            with pytest.raises(ToolError) as rejected:
                await call(
                    tool_ctx,
                    "sandbox_upload",
                    sandbox_id=sandbox_id,
                    file_path=path,
                    content="x",
                )
            assert "leaves the sandbox folder" in rejected.value.message
        running = await call(tool_ctx, "sandbox_list", status="running")
        assert [item["sandbox_id"] for item in running["sandboxes"]] == [sandbox_id]
        with pytest.raises(ToolInputError) as bad_configure:
            await call(
                tool_ctx,
                "sandbox_configure",
                sandbox_id=sandbox_id,
                install_packages=["-e."],
            )
        assert "package '-e.' is invalid" in bad_configure.value.message
        for commands, problem in (
            (["echo a", "  "], "run_commands.1: '  ' is invalid: the command is empty"),
            (["echo \x00"], "run_commands.0: 'echo \\x00' is invalid: the command "),
        ):
            with pytest.raises(ToolInputError) as bad_command:
                await call(
                    tool_ctx,
                    "sandbox_configure",
                    sandbox_id=sandbox_id,
                    run_commands=commands,
                )
            assert problem in bad_command.value.message
        stopped = await call(tool_ctx, "sandbox_stop", sandbox_id=sandbox_id)
        assert stopped["status"] == "stopped"
        with pytest.raises(ToolError):
            await call(tool_ctx, "sandbox_execute", sandbox_id=sandbox_id, code="1")
    finally:
        await call(tool_ctx, "sandbox_delete", sandbox_id=sandbox_id)
    with pytest.raises(ToolError) as missing:
        await call(tool_ctx, "sandbox_status", sandbox_id="sbx_missing")
    assert missing.value.kind == "not_found"


async def test_working_dir_outside_rejected(tool_ctx: ToolContext) -> None:
    created = await call(tool_ctx, "sandbox_create", template="base")
    sandbox_id = created["sandbox_id"]
    try:
        with pytest.raises(ToolError) as outside:
            await call(
                tool_ctx,
                "sandbox_execute",
                sandbox_id=sandbox_id,
                code="print(1)",
                working_dir="/etc",
            )
        message = outside.value.message
        assert outside.value.kind == "invalid_argument"
        assert "working_dir '/etc'" in message, message
        assert "file path" not in message
        assert "relative" in message
        home = (
            await call(
                tool_ctx,
                "sandbox_execute",
                sandbox_id=sandbox_id,
                code="pwd",
                language="bash",
            )
        )["stdout"].strip()
        assert f"({home}/...)" in message, message
        for working_dir in (".", home, "sub/.."):
            result = await call(
                tool_ctx,
                "sandbox_execute",
                sandbox_id=sandbox_id,
                code="pwd",
                language="bash",
                working_dir=working_dir,
            )
            assert result["stdout"].strip() == home, (working_dir, result)
    finally:
        await call(tool_ctx, "sandbox_delete", sandbox_id=sandbox_id)


async def test_delete_after_stop_shows_deleted(tool_ctx: ToolContext) -> None:
    created = await call(tool_ctx, "sandbox_create", template="base")
    sandbox_id = created["sandbox_id"]
    running = await call(tool_ctx, "sandbox_create", template="base")
    try:
        await call(tool_ctx, "sandbox_stop", sandbox_id=sandbox_id)
        stopped = await call(tool_ctx, "sandbox_status", sandbox_id=sandbox_id)
        assert stopped["status"] == "stopped"
        deleted = await call(tool_ctx, "sandbox_delete", sandbox_id=sandbox_id)
        assert deleted["status"] == "deleted"
        status = await call(tool_ctx, "sandbox_status", sandbox_id=sandbox_id)
        assert status["status"] == "deleted"
        assert status["live"] is None
        listed = await call(tool_ctx, "sandbox_list", status="all")
        ids = [item["sandbox_id"] for item in listed["sandboxes"]]
        assert ids == [running["sandbox_id"]]
    finally:
        await call(tool_ctx, "sandbox_delete", sandbox_id=running["sandbox_id"])
    # A running sandbox that is deleted reads the same.
    status = await call(tool_ctx, "sandbox_status", sandbox_id=running["sandbox_id"])
    assert status["status"] == "deleted"
    assert (await call(tool_ctx, "sandbox_list", status="all"))["count"] == 0


async def test_nul_env_value_rejected(tool_ctx: ToolContext) -> None:
    with pytest.raises(ToolError) as at_create:
        await call(
            tool_ctx, "sandbox_create", template="base", env_vars={"BAD": "a\0b"}
        )
    assert at_create.value.kind == "invalid_argument"
    assert "env var 'BAD'" in at_create.value.message
    assert "NUL byte" in at_create.value.message
    # Rejected before a session started: nothing to list.
    listed = await call(tool_ctx, "sandbox_list")
    assert listed["count"] == 0
    created = await call(tool_ctx, "sandbox_create", template="base")
    sandbox_id = created["sandbox_id"]
    try:
        with pytest.raises(ToolError) as at_execute:
            await call(
                tool_ctx,
                "sandbox_execute",
                sandbox_id=sandbox_id,
                code="print(1)",
                env_vars={"ONCE": "x\0"},
            )
        assert at_execute.value.kind == "invalid_argument"
        assert "env var 'ONCE'" in at_execute.value.message
        with pytest.raises(ToolError) as at_configure:
            await call(
                tool_ctx,
                "sandbox_configure",
                sandbox_id=sandbox_id,
                env_vars={"KEPT": "\0"},
            )
        assert at_configure.value.kind == "invalid_argument"
        status = await call(tool_ctx, "sandbox_status", sandbox_id=sandbox_id)
        assert status["env_vars_configured"] == []
        result = await call(
            tool_ctx, "sandbox_execute", sandbox_id=sandbox_id, code="print(1)"
        )
        assert result["stdout"] == "1\n"
    finally:
        await call(tool_ctx, "sandbox_delete", sandbox_id=sandbox_id)


async def test_local_calls_skip_sandbox_queue(
    tool_ctx: ToolContext, client: Client
) -> None:
    created = await call(tool_ctx, "sandbox_create", template="base")
    sandbox_id = created["sandbox_id"]
    try:
        result = await call(
            tool_ctx, "sandbox_execute", sandbox_id=sandbox_id, code="print(3)"
        )
        assert result["stdout"] == "3\n"
    finally:
        await call(tool_ctx, "sandbox_delete", sandbox_id=sandbox_id)
    history = await client.get_workflow_handle(f"sandbox-{sandbox_id}").fetch_history()
    scheduled = [
        event.activity_task_scheduled_event_attributes.activity_type.name
        for event in history.events
        if event.HasField("activity_task_scheduled_event_attributes")
    ]
    # Create (no setup), execute and delete ran as local activities, so
    # nothing went through the nexus-sandbox queue.
    assert scheduled == []
    markers = [
        e for e in history.events if e.HasField("marker_recorded_event_attributes")
    ]
    assert len(markers) >= 4
    await replay_run(client, f"sandbox-{sandbox_id}", [SandboxSessionWorkflow])


async def test_status_while_program_runs(tool_ctx: ToolContext) -> None:
    """The program's local activity keeps the session's workflow task open,
    so its queries wait for the task heartbeat. The status read meanwhile
    returns the mirror row and the live state read from the backend."""
    created = await call(tool_ctx, "sandbox_create", template="base")
    sandbox_id = created["sandbox_id"]
    before = await call(tool_ctx, "sandbox_status", sandbox_id=sandbox_id)
    assert before["busy"] is False
    home = sandbox_home(tool_ctx, before["backend_id"])
    gated = (
        "import pathlib, time\n"
        "pathlib.Path('started').touch()\n"
        "while not pathlib.Path('gate').exists():\n"
        "    time.sleep(0.05)\n"
        "print('done')\n"
    )
    running = asyncio.create_task(
        call(tool_ctx, "sandbox_execute", sandbox_id=sandbox_id, code=gated)
    )
    try:
        while not (home / "started").exists():
            assert not running.done(), running.result()
            await asyncio.sleep(0.05)
        status = await call(tool_ctx, "sandbox_status", sandbox_id=sandbox_id)
        assert status["busy"] is True
        assert (status["status"], status["events"]) == ("running", [])
        assert status["live"]["state"] == "running"
        assert status["backend_id"] == before["backend_id"]
        # A process with another data folder does not see the sandbox, so it
        # reads no live state rather than calling the sandbox lost.
        elsewhere = tool_ctx.settings.model_copy(
            update={
                "data_dir": tool_ctx.settings.resolved_data_dir / "elsewhere",
                "database_url": tool_ctx.settings.effective_database_url,
            }
        )
        other = await service.status(await tool_ctx.client(), elsewhere, sandbox_id)
        assert (other.busy, other.live) == (True, None)
        (home / "gate").write_text("open")
        result = await running
        assert result["stdout"] == "done\n"
        status = await call(tool_ctx, "sandbox_status", sandbox_id=sandbox_id)
        assert status["busy"] is False
        assert status["events"] and status["live"]["state"] == "running"
    finally:
        (home / "gate").write_text("open")
        await asyncio.gather(running, return_exceptions=True)
        await call(tool_ctx, "sandbox_delete", sandbox_id=sandbox_id)


async def test_status_after_answer_does_not_wait(
    tool_ctx: ToolContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call can start between the session's query and the live read. The
    read must then not wait for the call's task heartbeat."""
    created = await call(tool_ctx, "sandbox_create", template="base")
    sandbox_id = created["sandbox_id"]
    client = await tool_ctx.client()
    idle = await service.info(client, sandbox_id)
    home = sandbox_home(tool_ctx, idle.backend_id or "")
    gated = (
        "import pathlib, time\n"
        "pathlib.Path('started').touch()\n"
        "while not pathlib.Path('gate').exists():\n"
        "    time.sleep(0.05)\n"
    )
    running = asyncio.create_task(
        call(tool_ctx, "sandbox_execute", sandbox_id=sandbox_id, code=gated)
    )
    try:
        while not (home / "started").exists():
            await asyncio.sleep(0.05)

        async def answered_before_the_call(*args: object) -> service.SessionInfo:
            return idle

        updates: list[str] = []
        real_update = service._update

        async def recorded_update(*args: Any, **kwargs: Any) -> object:
            updates.append(args[2])
            return await real_update(*args, **kwargs)

        monkeypatch.setattr(service, "info", answered_before_the_call)
        monkeypatch.setattr(service, "_update", recorded_update)
        here = await service.status(client, tool_ctx.settings, sandbox_id)
        assert here.live is not None and here.live.state == "running"
        assert updates == []
        # A process that cannot read the backend sends the update, and stops
        # waiting for it after the status read's bound.
        elsewhere = tool_ctx.settings.model_copy(
            update={
                "data_dir": tool_ctx.settings.resolved_data_dir / "elsewhere",
                "database_url": tool_ctx.settings.effective_database_url,
            }
        )
        other = await service.status(client, elsewhere, sandbox_id)
        assert updates == ["describe"]
        assert (other.busy, other.live) == (True, None)
    finally:
        (home / "gate").write_text("open")
        await asyncio.gather(running, return_exceptions=True)
        await call(tool_ctx, "sandbox_delete", sandbox_id=sandbox_id)


async def test_status_backend_failure_named(
    tool_ctx: ToolContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    created = await call(tool_ctx, "sandbox_create", template="base")
    sandbox_id = created["sandbox_id"]

    async def failing_describe(self: LocalBackend, backend_id: str) -> None:
        raise SandboxBackendError(f"backend API timed out describing {backend_id}")

    try:
        with monkeypatch.context() as patched:
            patched.setattr(LocalBackend, "describe", failing_describe)
            with pytest.raises(ToolError) as failed:
                await call(tool_ctx, "sandbox_status", sandbox_id=sandbox_id)
        assert failed.value.kind == "failed"
        assert "backend API timed out describing" in failed.value.message
        assert "unexpected" not in failed.value.message
    finally:
        await call(tool_ctx, "sandbox_delete", sandbox_id=sandbox_id)


async def test_interrupt_stops_the_program(tool_ctx: ToolContext) -> None:
    client = await tool_ctx.client()
    created = await call(tool_ctx, "sandbox_create", template="base")
    sandbox_id = created["sandbox_id"]
    before = await call(tool_ctx, "sandbox_status", sandbox_id=sandbox_id)
    home = sandbox_home(tool_ctx, before["backend_id"])
    ticking = (
        "import pathlib, time\n"
        "n = 0\n"
        "while True:\n"
        "    n += 1\n"
        "    pathlib.Path('ticks').write_text(str(n))\n"
        "    time.sleep(0.1)\n"
    )
    request = ExecuteRequest(code=ticking, timeout=600)
    running = asyncio.create_task(
        service.execute(
            client, tool_ctx.settings, sandbox_id, request, call_id="call-ticks"
        )
    )
    try:
        while not (home / "ticks").exists():
            assert not running.done(), running.result()
            await asyncio.sleep(0.05)
        assert await service.interrupt(client, sandbox_id, "call-other") is True
        assert await service.interrupt(client, sandbox_id, "call-ticks") is True
        with pytest.raises(service.SandboxServiceError, match="interrupted"):
            await asyncio.wait_for(running, 40)
        ticks = (home / "ticks").read_text()
        await asyncio.sleep(1.0)
        assert (home / "ticks").read_text() == ticks
        # An interrupt that came before its execution stops it at once, and
        # the session goes on serving other calls.
        early = ExecuteRequest(code="print('never')", timeout=60)
        with pytest.raises(service.SandboxServiceError, match="interrupted"):
            await service.execute(
                client, tool_ctx.settings, sandbox_id, early, call_id="call-other"
            )
        after = await call(
            tool_ctx, "sandbox_execute", sandbox_id=sandbox_id, code="print('next')"
        )
        assert after["stdout"] == "next\n"
        status = await call(tool_ctx, "sandbox_status", sandbox_id=sandbox_id)
        interrupted = [e for e in status["events"] if e["kind"] == "interrupted"]
        assert [e["detail"] for e in interrupted] == [
            "execution call-ticks",
            "execution call-other",
        ]
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await call(tool_ctx, "sandbox_delete", sandbox_id=sandbox_id)
    assert await service.interrupt(client, sandbox_id, "call-ticks") is False
    await replay_run(client, service.workflow_id(sandbox_id), [SandboxSessionWorkflow])


async def test_invalid_create_and_call_inputs_rejected(tool_ctx: ToolContext) -> None:
    """Inputs that every later call would fail on are rejected up front, and
    the error names the field. They are a too long env var, a too long file
    name, a working_dir that is a file or a dangling symlink, and metadata
    that is not text."""
    with pytest.raises(ToolError) as long_env:
        await call(
            tool_ctx,
            "sandbox_create",
            template="base",
            env_vars={"BIG": "x" * 131072},
        )
    assert long_env.value.kind == "invalid_argument"
    assert "env var 'BIG'" in long_env.value.message
    assert "131072 bytes" in long_env.value.message
    for metadata in ({"flag": True}, {"none": None}, {"count": 3}):
        with pytest.raises(ToolInputError) as bad_metadata:
            await call(tool_ctx, "sandbox_create", template="base", metadata=metadata)
        assert "metadata" in bad_metadata.value.message
    assert (await call(tool_ctx, "sandbox_list"))["count"] == 0
    created = await call(
        tool_ctx,
        "sandbox_create",
        template="base",
        env_vars={"FITS": "x" * 131000},
        metadata={"team": "a"},
    )
    sandbox_id = created["sandbox_id"]
    try:
        assert created["metadata"]["team"] == "a"
        with pytest.raises(ToolError) as long_name:
            await call(
                tool_ctx,
                "sandbox_upload",
                sandbox_id=sandbox_id,
                file_path="dir/" + "n" * 300,
                content="x",
            )
        assert long_name.value.kind == "invalid_argument"
        assert "file_path 'dir/nnn" in long_name.value.message
        assert "255 bytes" in long_name.value.message
        await call(
            tool_ctx,
            "sandbox_execute",
            sandbox_id=sandbox_id,
            code=(
                "touch plain && ln -s missing dangling && ln -s /etc etclink && "
                "ln -s ../.. up && ln -s /nonexistent gone && mkdir real && "
                "ln -s real inlink && ln -s etclink chain && mkdir d && "
                "ln -s ../../.. d/up && ln -s missing2 hop && ln -s hop twice"
            ),
            language="bash",
        )
        for working_dir, problem in [
            ("plain", "runs into a file"),
            ("plain/sub", "runs into a file"),
            ("dangling", "dangling symlink"),
            ("etclink", "a symlink to '/etc', outside the sandbox folder"),
            ("up", "leads through symlinks out of the folder"),
            ("gone", "a symlink to '/nonexistent', outside the sandbox folder"),
            ("chain", "a symlink to '/etc', outside the sandbox folder"),
            ("d/up/etc", "leads through symlinks out of the folder"),
            ("twice", "dangling symlink"),
        ]:
            with pytest.raises(ToolError) as bad_dir:
                await call(
                    tool_ctx,
                    "sandbox_execute",
                    sandbox_id=sandbox_id,
                    code="print(1)",
                    working_dir=working_dir,
                )
            assert bad_dir.value.kind == "invalid_argument"
            assert f"working_dir {working_dir!r}" in bad_dir.value.message
            assert problem in bad_dir.value.message
        linked = await call(
            tool_ctx,
            "sandbox_execute",
            sandbox_id=sandbox_id,
            code="import os; print(os.path.basename(os.getcwd()))",
            working_dir="inlink",
        )
        assert linked["stdout"] == "real\n", linked
        made = await call(
            tool_ctx,
            "sandbox_execute",
            sandbox_id=sandbox_id,
            code="import os; print(len(os.environ['FITS']))",
            working_dir="new/sub",
        )
        assert made["stdout"] == "131000\n", made
    finally:
        await call(tool_ctx, "sandbox_delete", sandbox_id=sandbox_id)


async def test_startup_script_cut_short_by_timeout(tool_ctx: ToolContext) -> None:
    with pytest.raises(ToolError) as failed:
        await call(
            tool_ctx,
            "sandbox_create",
            template="base",
            timeout=3,
            startup_script="sleep 10; echo done",
        )
    message = failed.value.message
    assert "the startup script was cut short" in message, message
    assert "timeout of 3 s, which counts setup too" in message
    assert "exited with code None" not in message
    # No promise of a recreation that a sandbox ended in its setup never gets.
    assert "recreates the sandbox" not in message


async def test_settled_call_counts_removed_by_later_calls(
    tool_ctx: ToolContext,
) -> None:
    """A call's start count stays in the sandbox until a later execution,
    in a later workflow task, confirms that its result was recorded."""
    client = await tool_ctx.client()
    created = await call(tool_ctx, "sandbox_create", template="base")
    sandbox_id = created["sandbox_id"]
    status = await call(tool_ctx, "sandbox_status", sandbox_id=sandbox_id)
    calls = sandbox_home(tool_ctx, status["backend_id"]) / ".nexus" / "calls"
    request = ExecuteRequest(code="print(1)")
    try:
        first = await service.execute(
            client, tool_ctx.settings, sandbox_id, request, call_id="call-a"
        )
        assert first.runs == 1
        assert len(list(calls.iterdir())) == 1
        second = await service.execute(
            client, tool_ctx.settings, sandbox_id, request, call_id="call-b"
        )
        assert second.runs == 1
        # call-a's count went with call-b; call-b's waits for the next call.
        assert len(list(calls.iterdir())) == 1
        handle = client.get_workflow_handle(f"sandbox-{sandbox_id}")
        await replay_run(client, handle.id, [SandboxSessionWorkflow])
    finally:
        await call(tool_ctx, "sandbox_delete", sandbox_id=sandbox_id)


async def test_recreation_refused_on_another_backend(tool_ctx: ToolContext) -> None:
    """A worker whose NEXUS_SANDBOX_BACKEND changed does not recreate a
    sandbox of the other backend there, which would replace its files."""
    created = await call(tool_ctx, "sandbox_create", template="base")
    sandbox_id = created["sandbox_id"]
    try:
        spec = SandboxSpec(sandbox_id=sandbox_id, template="base", timeout=60)
        activities = SandboxActivities(tool_ctx.settings)
        activities._require_recorded_backend(spec, "local")
        with pytest.raises(ApplicationError) as refused:
            activities._require_recorded_backend(spec, "e2b")
        assert refused.value.non_retryable
        assert (
            f"sandbox {sandbox_id} was created on the local backend, and this "
            "worker uses e2b" in refused.value.message
        )
        assert "NEXUS_SANDBOX_BACKEND=local" in refused.value.message
    finally:
        await call(tool_ctx, "sandbox_delete", sandbox_id=sandbox_id)


def test_worker_anthropic_key_shared_only_when_chosen(tmp_path: Path) -> None:
    """A claude-code sandbox gets the worker's own key only where the
    operator chose to share it, since the sandbox's code can read it."""
    spec = SandboxSpec(sandbox_id="sbx_key", template="claude-code", timeout=60)
    base = Settings(
        data_dir=tmp_path,
        anthropic_api_key=SecretStr("sk-ant-worker-own"),
        encryption_key=TEST_ENCRYPTION_KEY,
    )
    assert "ANTHROPIC_API_KEY" not in SandboxActivities(base)._env(spec)
    shared = base.model_copy(update={"sandbox_share_anthropic_key": True})
    assert SandboxActivities(shared)._env(spec)["ANTHROPIC_API_KEY"] == (
        "sk-ant-worker-own"
    )


async def test_call_id_runs_the_code_once(tool_ctx: ToolContext) -> None:
    """A call with an earlier call's call_id gets that call's result, without
    running the program again; another call_id runs it."""
    created = await call(tool_ctx, "sandbox_create", template="base")
    sandbox_id = created["sandbox_id"]
    code = "echo run >> runs.txt; wc -l < runs.txt"
    try:
        first = await call(
            tool_ctx,
            "sandbox_execute",
            sandbox_id=sandbox_id,
            code=code,
            language="bash",
            call_id="step-abc.1:x",
        )
        again = await call(
            tool_ctx,
            "sandbox_execute",
            sandbox_id=sandbox_id,
            code=code,
            language="bash",
            call_id="step-abc.1:x",
        )
        other = await call(
            tool_ctx,
            "sandbox_execute",
            sandbox_id=sandbox_id,
            code=code,
            language="bash",
            call_id="step-abc.2",
        )
        assert first["stdout"] == again["stdout"] == "1\n"
        assert other["stdout"] == "2\n"
        with pytest.raises(ToolInputError) as bad:
            await call(
                tool_ctx,
                "sandbox_execute",
                sandbox_id=sandbox_id,
                code=code,
                call_id="has space",
            )
        assert "call_id" in bad.value.message
    finally:
        await call(tool_ctx, "sandbox_delete", sandbox_id=sandbox_id)


async def test_output_over_payload_limit_cut(tool_ctx: ToolContext) -> None:
    # Each \x01 takes 6 bytes in JSON, so both streams at the output limit
    # encode to 3 MiB, over Temporal's 2 MiB payload limit.
    created = await call(tool_ctx, "sandbox_create", template="base")
    sandbox_id = created["sandbox_id"]
    limit = tool_ctx.settings.sandbox_output_limit
    code = (
        "import sys\n"
        "open('count.txt', 'a').write('x')\n"
        f"sys.stdout.write('\\x01' * {limit}); sys.stderr.write('\\x01' * {limit})"
    )
    try:
        result = await call(
            tool_ctx,
            "sandbox_execute",
            sandbox_id=sandbox_id,
            code=code,
            call_id="big-output",
        )
        assert result["status"] == "completed", result["status"]
        assert result["runs"] == 1
        size = encoded_size(result["stdout"]) + encoded_size(result["stderr"])
        assert size <= RESULT_OUTPUT_LIMIT
        marker = CUT_MARKER.search(result["stdout"])
        assert marker is not None
        assert int(marker.group(1)) == result["stdout_dropped_bytes"]
        kept = result["stdout"][: marker.start()]
        assert kept == "\x01" * len(kept)
        assert result["stdout_dropped_bytes"] == limit - len(kept)
        assert result["stderr_dropped_bytes"] > 0
        count = await call(
            tool_ctx,
            "sandbox_execute",
            sandbox_id=sandbox_id,
            code="print(open('count.txt').read())",
        )
        assert count["stdout"].strip() == "x"
    finally:
        await call(tool_ctx, "sandbox_delete", sandbox_id=sandbox_id)


async def test_kept_logs_bounded_in_bytes(tool_ctx: ToolContext) -> None:
    # 2000 CJK characters take 6000 bytes, and 2000 control characters 12000
    # bytes in JSON: 1000 such lines would be 6 to 12 MB of session state.
    created = await call(tool_ctx, "sandbox_create", template="base")
    sandbox_id = created["sandbox_id"]
    try:
        for character in ("\\u4e2d", "\\x01"):
            code = (
                "import sys\n"
                f"for i in range(150): sys.stdout.write('{character}' * 2000 + '\\n')"
            )
            for _ in range(4):
                result = await call(
                    tool_ctx, "sandbox_execute", sandbox_id=sandbox_id, code=code
                )
                assert result["status"] == "completed", result["stderr"][-300:]
            logs = await call(
                tool_ctx, "sandbox_logs", sandbox_id=sandbox_id, lines=1000
            )
            assert logs["count"] > 0
            assert encoded_size(logs["lines"]) <= LOG_BYTES_KEPT
        after = await call(
            tool_ctx, "sandbox_execute", sandbox_id=sandbox_id, code="print(1)"
        )
        assert after["stdout"] == "1\n"
        status = await call(tool_ctx, "sandbox_status", sandbox_id=sandbox_id)
        assert status["status"] == "running"
        last = await call(tool_ctx, "sandbox_logs", sandbox_id=sandbox_id, lines=1)
        assert last["lines"] == ["[stdout] 1"]
    finally:
        await call(tool_ctx, "sandbox_delete", sandbox_id=sandbox_id)


def stop_runners(anchor_pid: int) -> list[int]:
    """SIGSTOP every runner process below a sandbox's anchor."""
    import os
    import signal

    from app.sandbox.runner import descendants

    stopped = []
    for pid in descendants(anchor_pid):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"runner.py" in command:
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
    return stopped


async def test_frozen_runner_is_recreated(tool_ctx: ToolContext) -> None:
    created = await call(tool_ctx, "sandbox_create", template="base")
    sandbox_id = created["sandbox_id"]
    try:
        status = await call(tool_ctx, "sandbox_status", sandbox_id=sandbox_id)
        state_file = sandbox_home(tool_ctx, status["backend_id"]).parent / "state.json"
        anchor = json.loads(state_file.read_text())["anchor_pid"]
        stopped = stop_runners(anchor)
        assert stopped, "no runner process found below the anchor"
        result = await call(
            tool_ctx,
            "sandbox_execute",
            sandbox_id=sandbox_id,
            code="print('after')",
            timeout=1,
        )
        assert result["recreated"] == 1
        assert result["stdout"] == "after\n"
        for pid in stopped:
            stat = Path(f"/proc/{pid}/stat")
            alive = stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0]
            assert alive in (False, "Z"), f"stopped runner {pid} was left running"
    finally:
        await call(tool_ctx, "sandbox_delete", sandbox_id=sandbox_id)


async def test_program_that_stops_its_runner_runs_once(tool_ctx: ToolContext) -> None:
    """A program that freezes its runner after it started is not run again
    on a new sandbox: the call ends as timed out, with what it printed."""
    created = await call(tool_ctx, "sandbox_create", template="base")
    sandbox_id = created["sandbox_id"]
    code = (
        "import os, signal\n"
        "print('before', flush=True)\n"
        "os.kill(os.getppid(), signal.SIGSTOP)\n"
        "print('after')\n"
    )
    try:
        result = await call(
            tool_ctx, "sandbox_execute", sandbox_id=sandbox_id, code=code, timeout=1
        )
        assert result["recreated"] == 0
        assert result["runs"] == 1
        assert result["status"] == "timed_out"
        # Ending the runner also lets the program go on until it is killed.
        assert result["stdout"].startswith("before\n")
        assert "did not respond" in result["stderr"]
        # The next call finds the ended runner and recreates the sandbox.
        after = await call(
            tool_ctx, "sandbox_execute", sandbox_id=sandbox_id, code="print(2)"
        )
        assert after["stdout"] == "2\n"
        assert after["recreated"] == 1
    finally:
        await call(tool_ctx, "sandbox_delete", sandbox_id=sandbox_id)


async def test_call_timeout_is_timed_out(
    tool_ctx: ToolContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datetime import timedelta

    from app.contracts.sandbox import ExecuteInput, ExecuteResult

    created = await call(tool_ctx, "sandbox_create", template="base")
    sandbox_id = created["sandbox_id"]

    async def hang(*args: object, **kwargs: object) -> object:
        # A backend that never responds, so the activity reaches its timeout.
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def short_call(
        self: SandboxSessionWorkflow, execute: ExecuteInput
    ) -> ExecuteResult:
        return await self._call(
            "sandbox_execute", execute, ExecuteResult, timedelta(seconds=3)
        )

    try:
        monkeypatch.setattr(LocalBackend, "run", hang)
        monkeypatch.setattr(SandboxSessionWorkflow, "_execute_call", short_call)
        with pytest.raises(ToolError) as caught:
            await call(tool_ctx, "sandbox_execute", sandbox_id=sandbox_id, code="1")
        monkeypatch.undo()
        assert caught.value.kind == "unavailable"
        message = caught.value.message
        assert f"a call to sandbox {sandbox_id} timed out" in message
        assert "Retry the call" in message
    finally:
        monkeypatch.undo()
        await call(tool_ctx, "sandbox_delete", sandbox_id=sandbox_id)


async def test_oversized_inputs_rejected(tool_ctx: ToolContext) -> None:
    created = await call(tool_ctx, "sandbox_create", template="base")
    sandbox_id = created["sandbox_id"]
    try:
        with pytest.raises(ToolInputError) as upload:
            await call(
                tool_ctx,
                "sandbox_upload",
                sandbox_id=sandbox_id,
                file_path="big.txt",
                content="a" * 3_000_000,
            )
        assert "content is too large" in str(upload.value)
        assert "3000002 bytes" in str(upload.value)
        assert f"limit of {CALL_INPUT_LIMIT} bytes" in str(upload.value)
        listing = await call(
            tool_ctx,
            "sandbox_execute",
            sandbox_id=sandbox_id,
            code="import os; print(os.path.exists('big.txt'))",
        )
        assert listing["stdout"] == "False\n"
        # Each configure fits, but together they would pass the spec limit.
        values = {f"V{index}": "a" * 60000 for index in range(2)}
        configured = 0
        with pytest.raises(ToolError) as configure:
            for _ in range(5):
                await call(
                    tool_ctx,
                    "sandbox_configure",
                    sandbox_id=sandbox_id,
                    env_vars={
                        f"{name}_{configured}": value for name, value in values.items()
                    },
                )
                configured += 1
        assert configure.value.kind == "invalid_argument"
        assert f"sandbox {sandbox_id}" in configure.value.message
        assert f"limit of {SPEC_LIMIT} bytes" in configure.value.message
        assert 0 < configured < 5
        after = await call(
            tool_ctx, "sandbox_execute", sandbox_id=sandbox_id, code="print(1)"
        )
        assert after["stdout"] == "1\n"
    finally:
        await call(tool_ctx, "sandbox_delete", sandbox_id=sandbox_id)
