"""Which tables a caller may enable and subscribe to: every table of the
platform has a rule, tables with secrets are never captured, and a key
limited to tool groups reads only the tables of its groups."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import text
from sqlmodel import SQLModel
from typer.testing import CliRunner

from app.api.keys import create_key
from app.cli import cli
from app.db import get_engine
from app.realtime import triggers
from app.realtime.access import (
    STREAM_GROUPS,
    TABLE_GROUPS,
    UNLIMITED_TABLES,
    platform_tables,
    unruled_tables,
)
from app.realtime.service import create_subscription
from app.realtime.triggers import (
    DEFAULT_TABLES,
    INTERNAL_TABLES,
    SECRET_TABLES,
    RealtimeTableError,
    enable_default_tables,
    enable_realtime,
    enabled_tables,
)
from app.services.audit import record_call
from app.settings import Settings
from app.tools import ToolContext, ToolError, all_tools, invoke_tool, load_tools
from tests.realtime.helpers import create_items, items

load_tools()

# Column names that mark a secret, the audit log's rule plus salts and hashes.
SECRET_COLUMN = re.compile(
    r"(key|secret|token|password|passwd|credential|authorization|salt|hash)",
    re.IGNORECASE,
)
# Columns outside `SECRET_TABLES` whose names match `SECRET_COLUMN` but
# contain no secret, each checked by hand.
REVIEWED_COLUMNS = {
    ("audit_log", "key_id"),  # the public id of the calling key
    ("realtime_subscriptions", "key_id"),  # the public id of the owning key
}


def realtime_only(settings: Settings) -> ToolContext:
    return ToolContext(settings, user_id="key:rt", key_id="k_rt", groups=("realtime",))


def test_every_platform_table_has_rule() -> None:
    assert "api_keys" in platform_tables()
    assert "alembic_version" in platform_tables()
    assert unruled_tables() == []


def test_rules_name_tool_groups() -> None:
    groups = {spec.group for spec in all_tools()}
    for table, needed in TABLE_GROUPS.items():
        assert set(needed) <= groups, table
    assert set(STREAM_GROUPS.values()) <= groups
    assert not TABLE_GROUPS.keys() & (INTERNAL_TABLES | SECRET_TABLES.keys())


def test_default_tables_are_subscribable() -> None:
    for table in DEFAULT_TABLES:
        assert table in TABLE_GROUPS.keys() | UNLIMITED_TABLES.keys(), table


def test_secret_columns_only_in_secret_tables() -> None:
    import app.db.all_models  # noqa: F401  (fills the metadata)

    for name, table in SQLModel.metadata.tables.items():
        if name in SECRET_TABLES:
            continue
        for column in table.columns:
            if SECRET_COLUMN.search(column.name):
                assert (name, column.name) in REVIEWED_COLUMNS, (name, column.name)


@pytest.mark.parametrize("table", sorted(SECRET_TABLES))
def test_secret_table_cannot_be_enabled(table: str) -> None:
    with pytest.raises(RealtimeTableError, match="cannot be enabled") as raised:
        triggers.validate_table_name(table)
    assert repr(table) in str(raised.value)
    assert SECRET_TABLES[table] in str(raised.value)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_cli_enable_rejects_api_keys(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = settings.effective_database_url
    monkeypatch.setattr("app.cli.load_settings", lambda: settings)
    result = CliRunner().invoke(cli, ["realtime", "enable", "api_keys"])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: table 'api_keys' contains the salts")
    assert "Traceback" not in result.output
    assert result.stdout == ""
    assert "api_keys" not in enabled_tables(url)
    create_key(url, "after-enable")
    with get_engine(url).connect() as connection:
        logged = connection.execute(
            text("SELECT COUNT(*) FROM realtime_changes WHERE table_name = 'api_keys'")
        ).scalar_one()
    assert logged == 0


async def test_realtime_only_key_reads_only_user_tables(settings: Settings) -> None:
    url = settings.effective_database_url
    create_items(url)
    for table in ("neural_jobs", "storage_objects", "benchmark_runs", "agents"):
        enable_realtime(url, table)
    ctx = realtime_only(settings)
    for table in ("neural_jobs", "storage_objects", "benchmark_runs", "agents"):
        with pytest.raises(ToolError) as denied:
            await invoke_tool(ctx, "realtime_subscribe", {"table": table})
        assert denied.value.kind == "forbidden", table
        group = TABLE_GROUPS[table][0]
        assert f"--group {group}" in denied.value.message
    for table in ("api_keys", "workflow_definition_versions", "realtime_changes"):
        with pytest.raises(ToolError) as rejected:
            await invoke_tool(ctx, "realtime_subscribe", {"table": table})
        assert rejected.value.kind == "invalid_argument", table
        assert rejected.value.message.startswith(f"table {table!r} ")
    created = await invoke_tool(ctx, "realtime_subscribe", {"table": "items"})
    assert created["user_id"] == "key:rt"


async def test_group_key_reads_its_group_tables(settings: Settings) -> None:
    url = settings.effective_database_url
    enable_realtime(url, "neural_jobs")
    ctx = ToolContext(
        settings, user_id="key:nn", key_id="k_nn", groups=("realtime", "neural")
    )
    created = await invoke_tool(ctx, "realtime_subscribe", {"table": "neural_jobs"})
    assert created["table"] == "neural_jobs"
    with pytest.raises(ToolError) as denied:
        await invoke_tool(ctx, "realtime_subscribe", {"table": "storage_objects"})
    assert denied.value.kind == "forbidden"


async def test_unruled_platform_table_needs_every_group(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = settings.effective_database_url
    enable_realtime(url, "neural_jobs")
    # A platform table without a rule yet.
    monkeypatch.delitem(TABLE_GROUPS, "neural_jobs")
    limited = ToolContext(
        settings, user_id="key:nn", key_id="k_nn", groups=("realtime", "neural")
    )
    with pytest.raises(ToolError) as denied:
        await invoke_tool(limited, "realtime_subscribe", {"table": "neural_jobs"})
    assert denied.value.kind == "forbidden"
    assert "no realtime access rule" in denied.value.message
    created = await invoke_tool(
        ToolContext(settings), "realtime_subscribe", {"table": "neural_jobs"}
    )
    assert created["table"] == "neural_jobs"


def _left_of(url: str, table: str) -> dict[str, int]:
    with get_engine(url).connect() as connection:
        return {
            name: connection.execute(
                text(f"SELECT COUNT(*) FROM {name} WHERE table_name = :t"),
                {"t": table},
            ).scalar_one()
            for name in (
                "realtime_tables",
                "realtime_changes",
                "realtime_subscriptions",
            )
        }


def test_upgrade_removes_captured_api_keys(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An earlier version enabled api_keys on request.
    monkeypatch.delitem(SECRET_TABLES, "api_keys")
    enable_realtime(database_url, "api_keys")
    create_subscription(database_url, "api_keys", from_start=True)
    create_key(database_url, "before-upgrade")
    monkeypatch.undo()
    assert _left_of(database_url, "api_keys") == {
        "realtime_tables": 1,
        "realtime_changes": 1,
        "realtime_subscriptions": 1,
    }

    enable_default_tables(database_url)

    assert _left_of(database_url, "api_keys") == {
        "realtime_tables": 0,
        "realtime_changes": 0,
        "realtime_subscriptions": 0,
    }
    create_key(database_url, "after-upgrade")
    assert _left_of(database_url, "api_keys")["realtime_changes"] == 0
    assert "audit_log" in enabled_tables(database_url)


async def test_events_of_dropped_table_rejected(settings: Settings) -> None:
    url = settings.effective_database_url
    create_items(url)
    ctx = ToolContext(settings)
    created = await invoke_tool(ctx, "realtime_subscribe", {"table": "items"})
    items.drop(get_engine(url))
    with pytest.raises(ToolError) as rejected:
        await invoke_tool(
            ctx, "realtime_events", {"subscription_id": created["subscription_id"]}
        )
    assert rejected.value.kind == "invalid_argument"
    assert "'items' not found" in rejected.value.message


async def test_audit_log_needs_a_key_without_groups(settings: Settings) -> None:
    """The audit log contains every key's call arguments, and the audit_log
    tool shows a limited key only part of them. So only a key without groups
    may subscribe, and a subscription made before this rule is no longer
    read."""
    url = settings.effective_database_url
    enable_realtime(url, "audit_log")
    dashboards = ToolContext(
        settings, user_id="key:dash", key_id="k_dash", groups=("system", "realtime")
    )
    with pytest.raises(ToolError) as denied:
        await invoke_tool(dashboards, "realtime_subscribe", {"table": "audit_log"})
    assert denied.value.kind == "forbidden"
    assert denied.value.message.startswith(
        "table: 'audit_log' contains the arguments of every key's calls"
    )
    assert "a key created without --group" in denied.value.message

    earlier = create_subscription(url, "audit_log", user_id="key:dash", key_id="k_dash")
    record_call(
        url,
        user_id="key:other",
        tool="storage_upload",
        arguments={"content": "PRIVATE"},
        outcome="success",
        duration_ms=1.0,
    )
    with pytest.raises(ToolError) as stopped:
        await invoke_tool(
            dashboards, "realtime_events", {"subscription_id": earlier.subscription_id}
        )
    assert stopped.value.kind == "forbidden"

    # Its owner may still delete it.
    await invoke_tool(
        dashboards, "realtime_unsubscribe", {"subscription_id": earlier.subscription_id}
    )

    every_group = ToolContext(settings, user_id="key:admin", key_id="k_admin")
    created = await invoke_tool(
        every_group, "realtime_subscribe", {"table": "audit_log"}
    )
    assert created["table"] == "audit_log"


async def test_run_without_key_named_by_groups(settings: Settings) -> None:
    """A workflow step or swarm action calls tools with its run's groups and
    no key id, so a rejection names those groups."""
    enable_realtime(settings.effective_database_url, "audit_log")
    step = ToolContext(
        settings, user_id="workflow:exec_1/m", groups=("realtime", "workflows")
    )
    with pytest.raises(ToolError) as denied:
        await invoke_tool(step, "realtime_subscribe", {"table": "audit_log"})
    assert denied.value.kind == "forbidden"
    assert "a run limited to the groups: realtime, workflows" in denied.value.message
    assert "None" not in denied.value.message
    with pytest.raises(ToolError) as stream:
        await invoke_tool(
            step, "execution_stream_subscribe", {"sandbox_id": "sbx_000000000000"}
        )
    assert stream.value.kind == "forbidden"
    assert "a run limited to the groups: realtime, workflows" in stream.value.message


def _audit_call(url: str) -> None:
    record_call(
        url,
        user_id="key:case",
        tool="system_health",
        arguments={},
        outcome="success",
        duration_ms=1.0,
    )


async def test_table_rules_ignore_letter_case(settings: Settings) -> None:
    url = settings.effective_database_url
    limited = realtime_only(settings)
    local = ToolContext(settings)
    for table in ("API_KEYS", "Api_Keys", "Workflow_Definition_Versions"):
        with pytest.raises(RealtimeTableError, match="cannot be enabled"):
            enable_realtime(url, table)
        for ctx in (limited, local):
            with pytest.raises(ToolError) as rejected:
                await invoke_tool(ctx, "realtime_subscribe", {"table": table})
            assert rejected.value.kind == "invalid_argument", table
            assert "cannot be enabled" in rejected.value.message
    for table in ("AUDIT_LOG", "Audit_Log"):
        with pytest.raises(ToolError) as denied:
            await invoke_tool(limited, "realtime_subscribe", {"table": table})
        assert denied.value.kind == "forbidden", table
        assert "table: 'audit_log' contains" in denied.value.message
    create_items(url)
    assert enable_realtime(url, "ITEMS") == "items"
    assert "ITEMS" not in enabled_tables(url)
    created = await invoke_tool(limited, "realtime_subscribe", {"table": "Items"})
    assert created["table"] == "items"


async def test_enable_in_upper_case_keeps_events(settings: Settings) -> None:
    url = settings.effective_database_url
    ctx = ToolContext(settings)
    created = await invoke_tool(ctx, "realtime_subscribe", {"table": "audit_log"})
    assert enable_realtime(url, "AUDIT_LOG") == "audit_log"
    upper = await invoke_tool(ctx, "realtime_subscribe", {"table": "AUDIT_LOG"})
    assert upper["table"] == "audit_log"
    _audit_call(url)
    for subscription in (created, upper):
        batch = await invoke_tool(
            ctx,
            "realtime_events",
            {"subscription_id": subscription["subscription_id"]},
        )
        # Tool calls are audited too, so the batch has more events.
        assert {event["table"] for event in batch["events"]} == {"audit_log"}
        callers = [event["new"]["user_id"] for event in batch["events"]]
        assert callers.count("key:case") == 1


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_cli_enable_folds_letter_case(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("app.cli.load_settings", lambda: settings)
    rejected = CliRunner().invoke(cli, ["realtime", "enable", "API_KEYS"])
    assert rejected.exit_code == 1
    assert rejected.stderr.startswith("error: table 'API_KEYS' contains the salts")
    enabled = CliRunner().invoke(cli, ["realtime", "enable", "AUDIT_LOG"])
    assert enabled.exit_code == 0, enabled.output
    assert '"table": "audit_log"' in enabled.stdout


def _as_typed(table: str) -> str:
    """The table name check of earlier versions, which kept the letter case."""
    if table in INTERNAL_TABLES or table in SECRET_TABLES:
        raise RealtimeTableError(f"table {table!r} cannot be enabled")
    return table


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_upgrade_folds_upper_case_names(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On PostgreSQL an earlier version found no table `AUDIT_LOG`, because
    # it quoted the name; SQLite matched `audit_log`.
    monkeypatch.setattr(triggers, "validate_table_name", _as_typed)
    monkeypatch.setattr("app.realtime.service.validate_table_name", _as_typed)
    enable_realtime(database_url, "API_KEYS")
    enable_realtime(database_url, "AUDIT_LOG")
    create_subscription(database_url, "API_KEYS", from_start=True)
    create_subscription(database_url, "AUDIT_LOG", from_start=True)
    create_key(database_url, "before-upgrade")
    _audit_call(database_url)
    monkeypatch.undo()
    assert _left_of(database_url, "API_KEYS")["realtime_changes"] == 1
    assert _left_of(database_url, "AUDIT_LOG")["realtime_changes"] == 1

    enable_default_tables(database_url)

    for table in ("API_KEYS", "AUDIT_LOG"):
        assert _left_of(database_url, table) == {
            "realtime_tables": 0,
            "realtime_changes": 0,
            "realtime_subscriptions": 0,
        }, table
    # The audit event logged under `AUDIT_LOG` is filed under `audit_log`.
    assert _left_of(database_url, "audit_log")["realtime_changes"] == 1
    create_key(database_url, "after-upgrade")
    _audit_call(database_url)
    assert _left_of(database_url, "api_keys")["realtime_changes"] == 0
    assert _left_of(database_url, "audit_log")["realtime_changes"] == 2
    assert "audit_log" in enabled_tables(database_url)
