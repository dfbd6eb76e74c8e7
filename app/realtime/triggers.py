"""Capture triggers that append every change of a table to the change log in
the transaction of the change, so no committed change can be missed."""

from __future__ import annotations

import logging
import re

from sqlalchemy import Connection, inspect, text
from sqlalchemy import types as sqltypes

from app.db import get_engine
from app.realtime.filters import ColumnKind

logger = logging.getLogger(__name__)

# Tables of the platform that have realtime from the start. Capabilities add
# their own table names here; `app.db.migrate.upgrade` enables each one that
# exists after every migration branch has run.
DEFAULT_TABLES: list[str] = [
    "audit_log",
    "execution_output",
    "workflow_executions",
    "workflow_steps",
    "sandboxes",
    "neural_epochs",
    "neural_round_events",
    "swarm_events",
    "benchmark_samples",
    "benchmark_operations",
    "extended_duration_test_events",
]

NOTIFY_CHANNEL = "nexus_realtime"
# Held from a change's log append to its commit, so change ids become visible
# in id order and a cursor never skips a change committed late.
_APPEND_LOCK_KEY = 7233002
_INTERNAL_TABLES = {
    "realtime_changes",
    "realtime_subscriptions",
    "realtime_tables",
    "alembic_version",
}
_TABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class RealtimeTableError(ValueError):
    """A table that cannot be enabled: missing, internal, or a bad name."""


_PG_FUNCTION = f"""
CREATE OR REPLACE FUNCTION nexus_realtime_capture() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    change_id bigint;
    first_change boolean;
BEGIN
    -- The first change of a transaction takes the append lock (held to the
    -- commit) and sends the one notification of the transaction; one per
    -- row would flood the queue, and later rows already hold the lock.
    first_change := current_setting('nexus.realtime_xact', true)
        IS DISTINCT FROM txid_current()::text;
    IF first_change THEN
        PERFORM pg_advisory_xact_lock({_APPEND_LOCK_KEY});
        PERFORM set_config('nexus.realtime_xact', txid_current()::text, true);
    END IF;
    INSERT INTO realtime_changes
        (schema_name, table_name, event_type, record, old_record, committed_at)
    VALUES (
        TG_TABLE_SCHEMA,
        TG_TABLE_NAME,
        TG_OP,
        CASE WHEN TG_OP = 'DELETE' THEN NULL ELSE to_jsonb(NEW) END,
        CASE WHEN TG_OP = 'INSERT' THEN NULL ELSE to_jsonb(OLD) END,
        clock_timestamp()
    )
    RETURNING id INTO change_id;
    IF first_change THEN
        PERFORM pg_notify('{NOTIFY_CHANNEL}', change_id::text);
    END IF;
    RETURN NULL;
END
$$
"""


def validate_table_name(table: str) -> str:
    if not _TABLE_NAME.match(table):
        raise RealtimeTableError(
            f"invalid table name {table!r}: use letters, digits and underscores, "
            "starting with a letter or underscore"
        )
    if table in _INTERNAL_TABLES:
        raise RealtimeTableError(
            f"table {table!r} belongs to realtime itself and cannot be subscribed to"
        )
    return table


def column_kinds(url: str, table: str) -> dict[str, ColumnKind]:
    """Read the table's columns and classify each for filter comparisons.

    Raises:
        RealtimeTableError: the table does not exist.
    """
    validate_table_name(table)
    with get_engine(url).connect() as connection:
        return _column_kinds(connection, table)


def _column_kinds(connection: Connection, table: str) -> dict[str, ColumnKind]:
    inspector = inspect(connection)
    if not inspector.has_table(table):
        raise RealtimeTableError(
            f"table {table!r} not found in the application database; create it "
            "first, or check the spelling"
        )
    kinds: dict[str, ColumnKind] = {}
    for column in inspector.get_columns(table):
        kinds[column["name"]] = _kind(column["type"])
    return kinds


def _kind(column_type: sqltypes.TypeEngine[object]) -> ColumnKind:
    if isinstance(column_type, sqltypes.Boolean):
        return "boolean"
    if isinstance(column_type, sqltypes.Integer | sqltypes.Numeric | sqltypes.Float):
        return "number"
    return "text"


def enable_realtime(url: str, table: str) -> None:
    """Install the capture triggers on `table` (idempotent) and record it.

    Raises:
        RealtimeTableError: the table is missing, internal or badly named.
    """
    validate_table_name(table)
    engine = get_engine(url)
    with engine.begin() as connection:
        kinds = _column_kinds(connection, table)
        if connection.dialect.name == "postgresql":
            # Workers that start together all run this; one at a time.
            connection.execute(text("SELECT pg_advisory_xact_lock(7233003)"))
            _enable_postgresql(connection, table)
        else:
            _enable_sqlite(connection, table, kinds)
        connection.execute(
            text("DELETE FROM realtime_tables WHERE table_name = :t"), {"t": table}
        )
        connection.execute(
            text(
                "INSERT INTO realtime_tables (table_name, enabled_at) "
                "VALUES (:t, CURRENT_TIMESTAMP)"
            ),
            {"t": table},
        )
    logger.info("realtime enabled on table %s", table)


def _enable_postgresql(connection: Connection, table: str) -> None:
    connection.execute(text(_PG_FUNCTION))
    trigger = f"nexus_realtime_{table}"
    exists = connection.execute(
        text(
            "SELECT 1 FROM pg_trigger WHERE tgname = :trigger "
            "AND tgrelid = to_regclass(:table)"
        ),
        {"trigger": trigger, "table": f'"{table}"'},
    ).first()
    if exists:
        # The row trigger reads whole rows, so it survives column changes,
        # and re-creating it would lock the table against running workers.
        return
    connection.execute(
        text(
            f'CREATE TRIGGER "{trigger}" AFTER INSERT OR UPDATE OR DELETE '
            f'ON "{table}" FOR EACH ROW EXECUTE FUNCTION nexus_realtime_capture()'
        )
    )


def _sqlite_record(connection: Connection, table: str, alias: str) -> str:
    pairs: list[str] = []
    for column in inspect(connection).get_columns(table):
        name = column["name"]
        value = f'{alias}."{name}"'
        if isinstance(column["type"], sqltypes.LargeBinary):
            # json_object rejects BLOB values, so bytes travel as hex text.
            value = f"hex({value})"
        elif isinstance(column["type"], sqltypes.JSON):
            # JSON columns hold text; json() embeds them as documents.
            value = f"CASE WHEN json_valid({value}) THEN json({value}) ELSE {value} END"
        pairs.append(f"'{name}', {value}")
    return f"json_object({', '.join(pairs)})"


def _enable_sqlite(
    connection: Connection, table: str, kinds: dict[str, ColumnKind]
) -> None:
    del kinds  # the column list is read again with its declared types
    now = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
    new_record = _sqlite_record(connection, table, "NEW")
    old_record = _sqlite_record(connection, table, "OLD")
    bodies = {
        "INSERT": (new_record, "NULL"),
        "UPDATE": (new_record, old_record),
        "DELETE": ("NULL", old_record),
    }
    for event, (record, old) in bodies.items():
        trigger = f"nexus_realtime_{table}_{event.lower()}"
        connection.execute(text(f'DROP TRIGGER IF EXISTS "{trigger}"'))
        # pysqlite runs DDL outside a transaction, so workers that start
        # together interleave these statements; IF NOT EXISTS keeps the one
        # that loses the race from crashing on the other's trigger.
        connection.execute(
            text(
                f'CREATE TRIGGER IF NOT EXISTS "{trigger}" AFTER {event} ON "{table}" '
                "BEGIN "
                "INSERT INTO realtime_changes (schema_name, table_name, event_type, "
                "record, old_record, committed_at) "
                f"VALUES ('main', '{table}', '{event}', {record}, {old}, {now}); END"
            )
        )


def disable_realtime(url: str, table: str) -> None:
    """Drop the capture triggers of `table`; the logged changes stay."""
    validate_table_name(table)
    with get_engine(url).begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(
                text(f'DROP TRIGGER IF EXISTS "nexus_realtime_{table}" ON "{table}"')
            )
        else:
            for event in ("insert", "update", "delete"):
                connection.execute(
                    text(f'DROP TRIGGER IF EXISTS "nexus_realtime_{table}_{event}"')
                )
        connection.execute(
            text("DELETE FROM realtime_tables WHERE table_name = :t"), {"t": table}
        )


def enabled_tables(url: str) -> list[str]:
    with get_engine(url).connect() as connection:
        rows = connection.execute(
            text("SELECT table_name FROM realtime_tables ORDER BY table_name")
        )
        return [row[0] for row in rows]


def enable_default_tables(url: str) -> list[str]:
    """Enable realtime on every table of `DEFAULT_TABLES` that exists."""
    enabled: list[str] = []
    with get_engine(url).connect() as connection:
        inspector = inspect(connection)
        if not inspector.has_table("realtime_changes"):
            return enabled
        present = [t for t in DEFAULT_TABLES if inspector.has_table(t)]
    for table in present:
        enable_realtime(url, table)
        enabled.append(table)
    return enabled
