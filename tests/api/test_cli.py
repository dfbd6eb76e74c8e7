"""`nexus keys` and the generated `nexus tool NAME --field value`."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from app.api.cli import describe_tool_fields, parse_field_options
from app.api.keys import (
    default_key_file_id,
    default_key_path,
    ensure_default_key,
    verify_token,
)
from app.api.mcp_server import tool_definitions
from app.cli import first_sentence
from app.db.migrate import upgrade
from app.services.audit import list_calls
from app.settings import Settings
from app.tools import all_tools, get_tool, load_tools
from tests.api.conftest import REPO_ROOT, ApiServer, server_env
from tests.conftest import TEST_ENCRYPTION_KEY


def nexus(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        cwd=REPO_ROOT,
        env=server_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_field_options_follow_schema() -> None:
    load_tools()
    model = get_tool("audit_log").input_model
    parsed = parse_field_options(
        ["--limit", "5", "--user-id", "42", "--tool=system_health"], model
    )
    assert parsed == {"limit": 5, "user_id": "42", "tool": "system_health"}
    with pytest.raises(ValueError, match="given twice, as '1' and '2'"):
        parse_field_options(["--limit", "1", "--limit", "2"], model)
    with pytest.raises(ValueError, match="not a --FIELD option"):
        parse_field_options(["limit"], model)
    with pytest.raises(ValueError, match="--limit has no value; give --limit VALUE"):
        parse_field_options(["--limit"], model)
    with pytest.raises(ValueError, match="--limit has no value"):
        parse_field_options(["--limit", "--tool", "x"], model)


def test_tool_summaries_whole_sentences() -> None:
    load_tools()
    for definition in tool_definitions():
        assert definition.description is not None
        # MCP clients show the description as it is, so no indentation.
        assert "\n " not in definition.description, definition.name
    for spec in all_tools():
        summary = first_sentence(spec.description)
        assert summary[-1] in ".!?", (spec.name, summary)
        assert summary[0].isupper(), (spec.name, summary)
    optimize = first_sentence(get_tool("neural_cluster_optimize").description)
    assert optimize.startswith("Free memory in a cluster's worker processes")
    assert first_sentence("Run a, e.g. b.\nSecond line.\n\nMore.") == ("Run a, e.g. b.")


def test_field_options_take_lists_and_aliases() -> None:
    load_tools()
    model = get_tool("task_orchestrate").input_model
    repeated = parse_field_options(
        [
            "--required-capabilities",
            "gpu",
            "--required-capabilities=fast",
            "--dependencies",
            '["task_a", "task_b"]',
            "--action-args",
            '{"limit": 1}',
        ],
        model,
    )
    assert repeated["required_capabilities"] == ["gpu", "fast"]
    assert repeated["dependencies"] == ["task_a", "task_b"]
    assert repeated["action_args"] == {"limit": 1}
    assert parse_field_options(["--maxAgents", "3"], model) == {"maxAgents": 3}
    assert parse_field_options(["--max-agents", "3"], model) == {"maxAgents": 3}
    with pytest.raises(ValueError, match="--maxAgents and --max-agents both set"):
        parse_field_options(["--maxAgents", "3", "--max-agents", "4"], model)
    with pytest.raises(ValueError, match="--dependencies has no value"):
        parse_field_options(["--dependencies"], model)
    with pytest.raises(ValueError, match=r"""JSON list like '\["a", "b"\]'"""):
        parse_field_options(["--dependencies", "[task_a"], model)
    with pytest.raises(ValueError, match=r"'gpu' is not valid JSON.*JSON object"):
        parse_field_options(["--action-args", "gpu"], model)


def test_tool_help_spells_fields_one_way() -> None:
    load_tools()
    described = describe_tool_fields(get_tool("task_orchestrate").input_model)
    assert "--max-agents, --maxAgents (integer | null, default None)" in described
    assert "--swarm-id (string | null, default None)" in described
    assert "--required-capabilities (array, default [], repeatable" in described


def test_model_typed_field_is_object() -> None:
    load_tools()
    model = get_tool("neural_train").input_model
    assert "  --config (object, required)" in describe_tool_fields(model)
    parsed = parse_field_options(["--config", '{"epochs": 2}'], model)
    assert parsed["config"] == {"epochs": 2}
    with pytest.raises(ValueError, match="--config '5' is not a JSON object"):
        parse_field_options(["--config", "5"], model)


def test_keys_commands_round_trip(api_settings: Settings) -> None:
    created = nexus(api_settings, "keys", "create", "cli-key", "--group", "system")
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)
    assert key["key"].startswith(f"nxk_{key['id']}_")
    assert key["groups"] == ["system"]
    listed = json.loads(nexus(api_settings, "keys", "list").stdout)
    assert key["id"] in [item["id"] for item in listed]
    assert all("key" not in item and "secret_hash" not in item for item in listed)
    rotated = nexus(api_settings, "keys", "rotate", key["id"])
    assert rotated.returncode == 0, rotated.stderr
    new_id = json.loads(rotated.stdout)["id"]
    revoked = nexus(api_settings, "keys", "revoke", new_id)
    assert revoked.returncode == 0, revoked.stderr
    again = nexus(api_settings, "keys", "revoke", new_id)
    assert again.returncode == 1
    assert "no active API key" in again.stderr
    unknown_group = nexus(api_settings, "keys", "create", "x", "--group", "nope")
    assert unknown_group.returncode == 2
    assert "unknown tool group" in unknown_group.stderr


def test_tool_command_calls_and_rejects(api_settings: Settings) -> None:
    called = nexus(api_settings, "tool", "audit_log", "--limit", "3")
    assert called.returncode == 0, called.stderr
    assert json.loads(called.stdout)["count"] <= 3
    invalid = nexus(api_settings, "tool", "audit_log", "--limit", "0")
    assert invalid.returncode == 1
    assert "limit: 0 is invalid" in invalid.stderr
    described = nexus(api_settings, "tool", "audit_log", "--help")
    assert "--limit (integer, default 100)" in described.stdout
    usage = nexus(api_settings, "tool", "--help")
    assert usage.returncode == 0, usage.stderr
    assert "Usage: python -m app tool" in usage.stdout
    assert "nexus tools" in usage.stdout
    mistyped = nexus(api_settings, "tool", "swarm_lst")
    assert mistyped.returncode == 2
    assert "did you mean swarm_list?" in mistyped.stderr


def test_call_rejects_boolean_and_repeated_key(api_settings: Settings) -> None:
    boolean = nexus(api_settings, "call", "audit_log", '{"limit": true}')
    assert boolean.returncode == 1, boolean.stdout
    assert "limit: true is invalid: Input should be a valid integer" in (boolean.stderr)
    repeated = nexus(api_settings, "call", "audit_log", '{"limit": 1, "limit": 2}')
    assert repeated.returncode == 2, repeated.stdout
    assert "the key 'limit' appears more than once" in repeated.stderr


def test_call_rejects_non_finite_numbers(api_settings: Settings) -> None:
    beyond = nexus(api_settings, "call", "audit_log", '{"limit": 1e400}')
    assert beyond.returncode == 2, beyond.stdout
    assert "limit: 1e400 is beyond the range of a double" in beyond.stderr
    assert "inf" not in beyond.stderr
    not_a_number = nexus(api_settings, "call", "audit_log", '{"limit": NaN}')
    assert not_a_number.returncode == 2, not_a_number.stdout
    assert "limit: NaN is not a JSON number" in not_a_number.stderr
    assert "'nan'" not in not_a_number.stderr


def test_invalid_utf8_argument_named(api_settings: Settings) -> None:
    # os.fsdecode keeps the byte 0xFF, which the child process receives.
    arguments = os.fsdecode(b'{"limit": 1, "tool": "\xff"}')
    called = nexus(api_settings, "call", "audit_log", arguments)
    assert called.returncode == 2, called.stdout
    assert "the arguments are not valid UTF-8 (byte 22)" in called.stderr
    assert "surrogate" not in called.stderr

    option = nexus(api_settings, "tool", "audit_log", "--tool", os.fsdecode(b"a\xff"))
    assert option.returncode == 2, option.stdout
    assert "is not valid UTF-8 (byte 1)" in option.stderr
    assert "surrogate" not in option.stderr


async def _status_until(
    server: ApiServer, token: str, expected: int, deadline_seconds: float = 60
) -> int:
    """Call system_health with `token` until it answers `expected`, or the
    deadline passes; return the last status."""
    deadline = time.monotonic() + deadline_seconds
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
        while True:
            response = await http.post(
                "/api/tools/system_health",
                json={},
                headers={"Authorization": f"Bearer {token}"},
            )
            if response.status_code == expected or time.monotonic() > deadline:
                return response.status_code
            await asyncio.sleep(0.1)


async def test_cli_revoke_reaches_cached_server(api_server: ApiServer) -> None:
    """A key that the server verified and cached is rejected after another
    process revokes it, and a key rotated by another process works at once."""
    settings = api_server.settings
    created = json.loads(nexus(settings, "keys", "create", "cached-cli").stdout)
    assert await _status_until(api_server, created["key"], 200) == 200
    rotated = nexus(settings, "keys", "rotate", created["id"])
    assert rotated.returncode == 0, rotated.stderr
    new = json.loads(rotated.stdout)
    assert await _status_until(api_server, new["key"], 200, 0) == 200
    assert await _status_until(api_server, created["key"], 401) == 401
    revoked = nexus(settings, "keys", "revoke", new["id"])
    assert revoked.returncode == 0, revoked.stderr
    assert await _status_until(api_server, new["key"], 401) == 401


def test_keys_commands_keep_info_logs_off(api_settings: Settings) -> None:
    # server_env sets NEXUS_LOG_LEVEL=INFO, the default.
    created = nexus(api_settings, "keys", "create", "quiet-key")
    assert created.returncode == 0, created.stderr
    assert created.stderr == "Store the key now: it cannot be shown again.\n"
    listed = nexus(api_settings, "keys", "list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stderr == ""
    revoked = nexus(api_settings, "keys", "revoke", json.loads(created.stdout)["id"])
    assert revoked.returncode == 0, revoked.stderr
    assert revoked.stderr == ""


def test_keys_commands_log_at_debug(api_settings: Settings) -> None:
    listed = subprocess.run(
        [sys.executable, "-m", "app", "keys", "list"],
        cwd=REPO_ROOT,
        env={**server_env(api_settings), "NEXUS_LOG_LEVEL": "DEBUG"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    assert "realtime enabled on table audit_log" in listed.stderr


def test_keys_dates_iso_8601_utc(api_settings: Settings) -> None:
    iso_utc = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")
    created = json.loads(nexus(api_settings, "keys", "create", "dated-key").stdout)
    assert iso_utc.fullmatch(created["created_at"])
    rotated = json.loads(nexus(api_settings, "keys", "rotate", created["id"]).stdout)
    assert iso_utc.fullmatch(rotated["created_at"])
    revoked = json.loads(nexus(api_settings, "keys", "revoke", rotated["id"]).stdout)
    assert iso_utc.fullmatch(revoked["revoked_at"])
    listed = json.loads(nexus(api_settings, "keys", "list", "--all").stdout)
    old = next(item for item in listed if item["id"] == created["id"])
    assert iso_utc.fullmatch(old["created_at"])
    assert iso_utc.fullmatch(old["revoked_at"])


@pytest.mark.parametrize("name", ["", "   "])
def test_keys_create_rejects_empty_name(api_settings: Settings, name: str) -> None:
    before = json.loads(nexus(api_settings, "keys", "list", "--all").stdout)
    created = nexus(api_settings, "keys", "create", name)
    assert created.returncode == 2
    assert f"key name {name!r} is empty" in created.stderr
    assert "nexus keys create ci-bot" in created.stderr
    after = json.loads(nexus(api_settings, "keys", "list", "--all").stdout)
    assert len(after) == len(before)


def test_keys_create_rejects_active_name(api_settings: Settings) -> None:
    first = nexus(api_settings, "keys", "create", "shared-name")
    assert first.returncode == 0, first.stderr
    first_id = json.loads(first.stdout)["id"]
    second = nexus(api_settings, "keys", "create", "shared-name")
    assert second.returncode == 2
    assert second.stdout == ""
    assert f"already used by the active key {first_id}" in second.stderr
    assert f"nexus keys rotate {first_id}" in second.stderr
    listed = json.loads(nexus(api_settings, "keys", "list").stdout)
    assert [item["id"] for item in listed if item["name"] == "shared-name"] == [
        first_id
    ]
    assert nexus(api_settings, "keys", "revoke", first_id).returncode == 0
    third = nexus(api_settings, "keys", "create", "shared-name")
    assert third.returncode == 0, third.stderr


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("n" * 300, "is 300 characters long, over the maximum of 196"),
        ("evil\nname", "contains the control or format character U+000A"),
    ],
)
def test_keys_create_rejects_invalid_name(
    api_settings: Settings, name: str, expected: str
) -> None:
    before = json.loads(nexus(api_settings, "keys", "list", "--all").stdout)
    created = nexus(api_settings, "keys", "create", name)
    assert created.returncode == 2
    assert expected in created.stderr
    assert "Traceback" not in created.stderr
    after = json.loads(nexus(api_settings, "keys", "list", "--all").stdout)
    assert len(after) == len(before)


@pytest.mark.parametrize(
    ("module", "variable", "value", "expected"),
    [
        (
            "app",
            "NEXUS_API_RATE_LIMIT",
            "-5",
            "invalid setting NEXUS_API_RATE_LIMIT='-5': Input should be greater "
            "than 0; set an accepted value, or unset NEXUS_API_RATE_LIMIT for the "
            "default 20.0",
        ),
        (
            "app.api",
            "NEXUS_API_KEY_CACHE_SECONDS",
            "abc",
            "invalid setting NEXUS_API_KEY_CACHE_SECONDS='abc': Input should be a "
            "valid number",
        ),
        (
            "app",
            "NEXUS_API_KEY_CACHE_SECONDS",
            "inf",
            "invalid setting NEXUS_API_KEY_CACHE_SECONDS='inf': Input should be a "
            "finite number",
        ),
        (
            "workers",
            "NEXUS_HTTP_PORT",
            "99999",
            "invalid setting NEXUS_HTTP_PORT='99999': Input should be less than or "
            "equal to 65535",
        ),
    ],
)
def test_invalid_setting_names_variable_and_value(
    api_settings: Settings, module: str, variable: str, value: str, expected: str
) -> None:
    env = {**server_env(api_settings), variable: value}
    args = {"app": ["config"], "workers": ["--queue", "nexus-sandbox"]}.get(module, [])
    completed = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2
    assert expected in completed.stderr


def test_rotating_default_key_rewrites_its_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings(
        data_dir=tmp_path, encryption_key=TEST_ENCRYPTION_KEY, temporal_address="x:1"
    )
    url = settings.effective_database_url
    upgrade(url)
    first = ensure_default_key(settings)
    assert first is not None
    path = default_key_path(settings)
    old_id = default_key_file_id(settings)
    rotated = nexus(settings, "keys", "rotate", str(old_id))
    assert rotated.returncode == 0, rotated.stderr
    assert f"replaces the old one in {path}" in rotated.stderr
    token = path.read_text().strip()
    assert token == json.loads(rotated.stdout)["key"]
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert verify_token(url, token) is not None
    assert verify_token(url, first) is None

    new_id = default_key_file_id(settings)
    revoked = nexus(settings, "keys", "revoke", str(new_id))
    assert revoked.returncode == 0
    assert "holds this key's token, which no longer works" in revoked.stderr
    # Another active key exists, so a start creates none and warns instead.
    nexus(settings, "keys", "create", "other")
    capsys.readouterr()
    assert ensure_default_key(settings) is None
    assert f"{path} holds the token of key {new_id}" in capsys.readouterr().err


def test_calls_that_reach_no_tool_are_audited(api_settings: Settings) -> None:
    url = api_settings.effective_database_url
    repeated = nexus(api_settings, "call", "audit_log", '{"limit": 1, "limit": 2}')
    assert repeated.returncode == 2
    unknown = nexus(api_settings, "call", "nope_tool_w", '{"x": 1}')
    # The same exit status as `nexus tool nope_tool_w`.
    assert unknown.returncode == 2
    assert "unknown tool 'nope_tool_w'" in unknown.stderr
    [probe] = list_calls(url, tool="nope_tool_w", limit=5)
    assert probe.outcome == "error"
    assert probe.arguments == {"x": 1}
    assert probe.user_id.startswith("cli:")
    rejected = list_calls(url, tool="audit_log", limit=5)
    assert any(
        event.error == "rejected: the arguments are invalid: limit: the key "
        "'limit' appears more than once in one object; send each key once"
        for event in rejected
    )


def test_long_unknown_tool_name_cut(api_settings: Settings) -> None:
    name = "c" * 5000
    unknown = nexus(api_settings, "call", name, "{}")
    assert unknown.returncode == 2
    assert name not in unknown.stderr
    assert f"unknown tool '{'c' * 1000}... [4000 more characters]'" in unknown.stderr
    [probe] = list_calls(api_settings.effective_database_url, limit=1)
    assert probe.error is not None
    assert name not in probe.error
    assert "[4000 more characters]" in probe.error
