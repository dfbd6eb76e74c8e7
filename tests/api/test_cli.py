"""`nexus keys` and the generated `nexus tool NAME --field value`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from app.api.cli import parse_field_options
from app.settings import Settings
from app.tools import get_tool, load_tools
from tests.api.conftest import REPO_ROOT, server_env


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
    with pytest.raises(ValueError, match="given twice"):
        parse_field_options(["--limit", "1", "--limit", "2"], model)
    with pytest.raises(ValueError, match="not a --FIELD option"):
        parse_field_options(["limit"], model)


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
