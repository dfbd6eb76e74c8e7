"""Enabling a table: no change is lost while triggers are replaced, column
names are quoted, and a failed enable changes nothing."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from app.cli import cli
from app.db import get_engine
from app.realtime import triggers
from app.realtime.service import SubscriptionError, create_subscription
from app.realtime.stream import next_events
from app.realtime.triggers import (
    RealtimeEnableError,
    RealtimeTableError,
    enable_realtime,
    enabled_tables,
    validate_table_name,
)
from app.settings import Settings
from tests.realtime.helpers import create_items

WRITER = textwrap.dedent(
    """
    import sqlite3, sys, time
    connection = sqlite3.connect(sys.argv[1], timeout=60)
    connection.execute("PRAGMA busy_timeout=60000")
    print("ready", flush=True)
    for i in range(int(sys.argv[2])):
        with connection:
            connection.execute("INSERT INTO items (name) VALUES (?)", (f"w{i}",))
        # A pause between transactions, so the enabling process gets the
        # lock between them, as it would beside a worker that does more than
        # insert.
        time.sleep(0.002)
    connection.close()
    """
)


def sqlite_schema(url: str, table: str) -> tuple[int, dict[str, str]]:
    with get_engine(url).connect() as connection:
        version = connection.exec_driver_sql("PRAGMA schema_version").scalar_one()
        rows = connection.execute(
            text(
                "SELECT name, sql FROM sqlite_master "
                "WHERE type = 'trigger' AND tbl_name = :t"
            ),
            {"t": table},
        )
        return int(version), {name: sql for name, sql in rows}


def count_inserts(url: str, table: str) -> int:
    with get_engine(url).connect() as connection:
        return int(
            connection.execute(
                text(
                    "SELECT COUNT(*) FROM realtime_changes "
                    "WHERE table_name = :t AND event_type = 'INSERT'"
                ),
                {"t": table},
            ).scalar_one()
        )


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_replacing_triggers_loses_no_concurrent_insert(
    database_url: str, tmp_path: Path
) -> None:
    create_items(database_url)
    path = database_url.removeprefix("sqlite:///")
    rows = 1000
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, path, str(rows)],
        stdout=subprocess.PIPE,
        text=True,
    )
    replaced = 0
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline() == "ready\n"
        # Each added column changes the trigger SQL, so every enable drops
        # and re-creates the triggers while the other process commits rows.
        while writer.poll() is None and replaced < 50:
            with get_engine(database_url).connect() as connection:
                connection.exec_driver_sql(
                    f"ALTER TABLE items ADD COLUMN extra_{replaced} INTEGER"
                )
            enable_realtime(database_url, "items")
            replaced += 1
        assert writer.wait(timeout=120) == 0
    finally:
        if writer.poll() is None:
            writer.kill()
    assert replaced > 0
    _, stored = sqlite_schema(database_url, "items")
    assert f"extra_{replaced - 1}" in stored["nexus_realtime_items_insert"]
    with get_engine(database_url).connect() as connection:
        committed = connection.execute(text("SELECT COUNT(*) FROM items")).scalar()
    assert committed == rows
    assert count_inserts(database_url, "items") == rows


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_enable_of_unchanged_table_leaves_schema_alone(database_url: str) -> None:
    create_items(database_url)
    before = sqlite_schema(database_url, "items")
    enable_realtime(database_url, "items")
    assert sqlite_schema(database_url, "items") == before


QUIRKY = 'CREATE TABLE quirky (id INTEGER PRIMARY KEY, "it\'s" TEXT, "a""b:c" TEXT)'


async def test_column_names_with_quotes_and_colons(database_url: str) -> None:
    with get_engine(database_url).begin() as connection:
        connection.exec_driver_sql(QUIRKY)
    enable_realtime(database_url, "quirky")
    subscription = create_subscription(database_url, "quirky")
    with get_engine(database_url).begin() as connection:
        connection.exec_driver_sql(
            'INSERT INTO quirky (id, "it\'s", "a""b:c") VALUES (1, \'x\', \'y\')'
        )
    events, _ = await next_events(database_url, subscription.subscription_id)
    assert [event["new"] for event in events] == [{"id": 1, "it's": "x", 'a"b:c': "y"}]


async def test_table_created_again_is_captured_again(database_url: str) -> None:
    """A table dropped and created again (SQLite drops its triggers with it),
    or given a column, is captured in full again by the next subscription or
    worker start. An older subscription whose filter no longer fits asks the
    caller to subscribe again."""
    with get_engine(database_url).begin() as connection:
        connection.exec_driver_sql("CREATE TABLE redo (id INTEGER PRIMARY KEY, v TEXT)")
    enable_realtime(database_url, "redo")
    old = create_subscription(database_url, "redo", filter_text="v=eq.a")
    with get_engine(database_url).begin() as connection:
        connection.exec_driver_sql("DROP TABLE redo")
        connection.exec_driver_sql(
            "CREATE TABLE redo (id INTEGER PRIMARY KEY, v INTEGER)"
        )

    fresh = create_subscription(database_url, "redo")
    with get_engine(database_url).begin() as connection:
        connection.exec_driver_sql("INSERT INTO redo (id, v) VALUES (1, 5)")
    events, _ = await next_events(database_url, fresh.subscription_id)
    assert [event["new"] for event in events] == [{"id": 1, "v": 5}]
    with pytest.raises(SubscriptionError) as stale:
        await next_events(database_url, old.subscription_id)
    assert f"subscription {old.subscription_id} no longer fits its table" in str(
        stale.value
    )
    assert "unsubscribe it and subscribe again" in str(stale.value)

    # A column added later, then the table created again: the next worker
    # start (enable_default_tables) puts the capture back, with the column.
    with get_engine(database_url).begin() as connection:
        connection.exec_driver_sql("ALTER TABLE redo ADD COLUMN w TEXT")
    assert triggers.capture_is_current(database_url, "redo") == (
        database_url.startswith("postgresql")
    )
    assert "redo" in triggers.enable_default_tables(database_url)
    assert triggers.capture_is_current(database_url, "redo")
    with get_engine(database_url).begin() as connection:
        connection.exec_driver_sql("INSERT INTO redo (id, v, w) VALUES (2, 6, 'c')")
    events, _ = await next_events(database_url, fresh.subscription_id)
    assert [event["new"] for event in events] == [{"id": 2, "v": 6, "w": "c"}]


def _break_update_trigger(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force a fault: the UPDATE trigger's statement becomes invalid SQL."""
    original = triggers._sqlite_trigger_sql

    def broken(table: str, event: str, record: str, old: str) -> str:
        sql = original(table, event, record, old)
        return sql.replace("BEGIN", "BEGIN broken", 1) if event == "UPDATE" else sql

    monkeypatch.setattr(triggers, "_sqlite_trigger_sql", broken)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_failed_enable_changes_nothing(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    create_items(database_url)
    with get_engine(database_url).connect() as connection:
        connection.exec_driver_sql("ALTER TABLE items ADD COLUMN later INTEGER")
    before = sqlite_schema(database_url, "items")
    _break_update_trigger(monkeypatch)
    with pytest.raises(RealtimeEnableError) as raised:
        enable_realtime(database_url, "items")
    message = str(raised.value)
    assert "enabling realtime on table 'items' failed" in message
    assert "Nothing was changed" in message
    assert "INSERT INTO" not in message
    assert "CREATE" not in message
    # The INSERT trigger was replaced before the UPDATE one failed; the
    # rollback restored it.
    assert sqlite_schema(database_url, "items") == before
    assert "later" not in before[1]["nexus_realtime_items_insert"]
    assert "items" in enabled_tables(database_url)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_cli_enable_failure_is_one_line(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = settings.effective_database_url
    create_items(url)
    with get_engine(url).connect() as connection:
        connection.exec_driver_sql("ALTER TABLE items ADD COLUMN later INTEGER")
    monkeypatch.setattr("app.cli.load_settings", lambda: settings)
    _break_update_trigger(monkeypatch)
    result = CliRunner().invoke(cli, ["realtime", "enable", "items"])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: enabling realtime on table 'items' failed")
    assert "Traceback" not in result.output + result.stderr
    assert result.stdout == ""


def test_table_name_with_trailing_newline_rejected() -> None:
    with pytest.raises(RealtimeTableError, match="invalid table name 'items\\\\n'"):
        validate_table_name("items\n")
