"""Capture triggers that append every change of a table to the change log in
the transaction of the change, so no committed change can be missed."""

from __future__ import annotations

import contextlib
import logging
import re

from sqlalchemy import Connection, inspect, text
from sqlalchemy import types as sqltypes
from sqlalchemy.exc import DBAPIError

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
# Tables of realtime itself and Alembic's version table.
INTERNAL_TABLES = frozenset(
    {"realtime_changes", "realtime_subscriptions", "realtime_tables", "alembic_version"}
)
# Tables that contain credentials or secrets, each with what it contains.
# Realtime is never enabled on them, because the change log would keep a copy
# of every row and stream it to subscribers.
SECRET_TABLES: dict[str, str] = {
    "api_keys": "the salts and secret hashes of API keys",
    "workflow_definition_versions": (
        "workflow definitions with the secret env var values of their steps"
    ),
}
_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


class RealtimeTableError(ValueError):
    """A table that cannot be enabled: missing, internal, or a bad name."""


class RealtimeEnableError(RuntimeError):
    """The database rejected a statement of an enable, which changed nothing."""


# PostgreSQL captures with statement-level triggers, one per event because a
# trigger with transition tables may only fire on one event. One INSERT ...
# SELECT over the transition table appends all rows of a statement, where a
# row trigger ran its function and its own INSERT once per row. Change ids
# follow the order of the transition table, which is the order in which the
# statement processed its rows.
_PG_EVENTS = ("INSERT", "UPDATE", "DELETE")
# The function that earlier versions called from each capture; the capture
# functions now test the transaction themselves, and `enable_realtime` drops it.
_PG_OLD_HELPER = "nexus_realtime_first_append"
# The rows each event appends, read from the transition tables `new_rows`
# and `old_rows`. UPDATE pairs the old and new version of a row by position,
# because a primary key may change in the update or be missing.
# NOTE: pairing by position relies on PostgreSQL filling both transition
# tables row by row in the same order. Its documentation does not promise
# that; tests/realtime/test_triggers.py checks it on PostgreSQL 15.
_PG_CHANGES = {
    "INSERT": (
        "new_rows",
        "SELECT TG_TABLE_SCHEMA, TG_TABLE_NAME, 'INSERT', to_json(captured.*), "
        "NULL::json, clock_timestamp() FROM new_rows captured",
    ),
    "UPDATE": (
        "old_rows",
        "SELECT TG_TABLE_SCHEMA, TG_TABLE_NAME, 'UPDATE', n.record, o.record, "
        "clock_timestamp() "
        "FROM (SELECT to_json(captured.*) AS record, row_number() OVER () AS position "
        "FROM new_rows captured) n "
        "JOIN (SELECT to_json(captured.*) AS record, row_number() OVER () AS position "
        "FROM old_rows captured) o ON o.position = n.position "
        "ORDER BY n.position",
    ),
    "DELETE": (
        "old_rows",
        "SELECT TG_TABLE_SCHEMA, TG_TABLE_NAME, 'DELETE', NULL::json, "
        "to_json(captured.*), clock_timestamp() FROM old_rows captured",
    ),
}
_PG_REFERENCING = {
    "INSERT": "NEW TABLE AS new_rows",
    "UPDATE": "OLD TABLE AS old_rows NEW TABLE AS new_rows",
    "DELETE": "OLD TABLE AS old_rows",
}


def _pg_capture_function(event: str, sequence: str) -> str:
    rows, select = _PG_CHANGES[event]
    append = f"""INSERT INTO realtime_changes
        (schema_name, table_name, event_type, record, old_record, committed_at)
    {select};"""
    return f"""
CREATE OR REPLACE FUNCTION nexus_realtime_capture_{event.lower()}() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    appended bigint;
BEGIN
    -- Every statement after the transaction's first change only appends:
    -- the first one took the append lock, held to the commit, and sent the
    -- transaction's notification. A client that sends its rows as separate
    -- statements (psycopg's executemany) runs this path once per row.
    IF current_setting('nexus.realtime_xact', true)
            IS NOT DISTINCT FROM txid_current()::text THEN
        {append}
        RETURN NULL;
    END IF;
    -- A statement that changed no rows has nothing to log or announce.
    PERFORM 1 FROM {rows} LIMIT 1;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    -- One notification per transaction: one per statement would flood the
    -- queue.
    PERFORM pg_advisory_xact_lock({_APPEND_LOCK_KEY});
    PERFORM set_config('nexus.realtime_xact', txid_current()::text, true);
    {append}
    -- Appends hold the append lock, so this statement's rows took the last
    -- `appended` values of the id sequence; this is cheaper than collecting
    -- the ids with RETURNING.
    GET DIAGNOSTICS appended = ROW_COUNT;
    PERFORM pg_notify(
        '{NOTIFY_CHANNEL}', (currval('{sequence}') - appended + 1)::text
    );
    RETURN NULL;
END
$$
"""


def _pg_trigger_names(table: str) -> dict[str, str]:
    return {event: f"nexus_realtime_{table}_{event.lower()}" for event in _PG_EVENTS}


# The per-row trigger and function that earlier versions installed on
# PostgreSQL; `enable_realtime` replaces them with the statement triggers.
_PG_ROW_FUNCTION = "nexus_realtime_capture"


def validate_table_name(table: str) -> str:
    """Return `table` in lower case, the name realtime stores and matches.

    Realtime folds table names to lower case, as PostgreSQL folds unquoted
    identifiers and as SQLite matches names in any case, so that `API_KEYS`
    meets the rules of `api_keys`.

    Raises:
        RealtimeTableError: a bad name, or a table of `INTERNAL_TABLES` or
            `SECRET_TABLES` in any letter case.
    """
    # fullmatch: `$` would also accept a name that ends in a newline.
    if not _TABLE_NAME.fullmatch(table):
        raise RealtimeTableError(
            f"invalid table name {table!r}: use letters, digits and underscores, "
            "starting with a letter or underscore"
        )
    folded = table.lower()
    if folded in INTERNAL_TABLES:
        owner = (
            "Alembic's migration table"
            if folded == "alembic_version"
            else ("a table of realtime itself")
        )
        raise RealtimeTableError(
            f"table {table!r} is {owner} and cannot be subscribed to"
        )
    if folded in SECRET_TABLES:
        raise RealtimeTableError(
            f"table {table!r} contains {SECRET_TABLES[folded]}, so realtime cannot "
            "be enabled on it or subscribed to, because the change log would keep "
            "a copy of every row"
        )
    return folded


def column_kinds(url: str, table: str) -> dict[str, ColumnKind]:
    """Read the table's columns and classify each for filter comparisons.

    Raises:
        RealtimeTableError: the table does not exist.
    """
    table = validate_table_name(table)
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
    if isinstance(column_type, sqltypes.Float):
        return "float"
    if isinstance(column_type, sqltypes.Integer | sqltypes.Numeric):
        return "number"
    if isinstance(column_type, sqltypes.DateTime):
        return "datetime"
    if isinstance(column_type, sqltypes.Date):
        return "date"
    if isinstance(column_type, sqltypes.Time):
        return "time"
    if isinstance(column_type, sqltypes.JSON):
        return "json"
    return "text"


def enable_realtime(url: str, table: str) -> str:
    """Install the capture triggers on `table` (idempotent) and record it;
    return the name it is recorded under (see `validate_table_name`).

    Everything happens in one transaction, so a failure leaves the triggers
    and the `realtime_tables` entry as they were.

    Raises:
        RealtimeTableError: the table is missing, internal or badly named.
        RealtimeEnableError: the database rejected a statement.
    """
    table = validate_table_name(table)
    engine = get_engine(url)
    try:
        with engine.begin() as connection:
            if connection.dialect.name == "sqlite":
                # pysqlite autocommits DDL outside a transaction, so a change
                # committed between a DROP TRIGGER and its CREATE TRIGGER
                # would not be logged. The write lock makes other writers
                # wait until the triggers are in place again.
                connection.exec_driver_sql("BEGIN IMMEDIATE")
            kinds = _column_kinds(connection, table)
            if connection.dialect.name == "postgresql":
                # Workers that start together all run this; one at a time.
                connection.execute(text("SELECT pg_advisory_xact_lock(7233003)"))
                _enable_postgresql(connection, table)
            else:
                _enable_sqlite(connection, table, kinds)
            connection.execute(
                text("DELETE FROM realtime_tables WHERE table_name = :t"),
                {"t": table},
            )
            connection.execute(
                text(
                    "INSERT INTO realtime_tables (table_name, enabled_at) "
                    "VALUES (:t, CURRENT_TIMESTAMP)"
                ),
                {"t": table},
            )
    except DBAPIError as error:
        # The driver's first line names the problem; the rest, and the
        # statement SQLAlchemy appends, would only show trigger SQL.
        lines = str(error.orig).strip().splitlines()
        reason = lines[0] if lines else type(error.orig).__name__
        logger.warning("enabling realtime on table %s failed: %s", table, reason)
        raise RealtimeEnableError(
            f"enabling realtime on table {table!r} failed with the database error "
            f"{reason!r}. Nothing was changed. Check the table's definition and "
            "that no other process holds a long write lock, then retry"
        ) from None
    logger.info("realtime enabled on table %s", table)
    return table


def _enable_postgresql(connection: Connection, table: str) -> None:
    sequence = connection.execute(
        text("SELECT pg_get_serial_sequence('realtime_changes', 'id')")
    ).scalar_one()
    for event in _PG_EVENTS:
        connection.execute(text(_pg_capture_function(event, sequence)))
    connection.execute(text(f"DROP FUNCTION IF EXISTS {_PG_OLD_HELPER}()"))
    row_trigger = f"nexus_realtime_{table}"
    names = _pg_trigger_names(table)
    present = set(
        connection.execute(
            text(
                "SELECT tgname FROM pg_trigger WHERE tgrelid = to_regclass(:table) "
                "AND tgname = ANY(:names)"
            ),
            {"table": f'"{table}"', "names": [row_trigger, *names.values()]},
        ).scalars()
    )
    if present == set(names.values()):
        # The triggers read whole rows, so they survive column changes, and
        # re-creating them would lock the table against running workers.
        return
    # One transaction swaps the row trigger of an older version for the
    # statement triggers, so each change is logged exactly once.
    connection.execute(text(f'DROP TRIGGER IF EXISTS "{row_trigger}" ON "{table}"'))
    for event, trigger in names.items():
        if trigger in present:
            continue
        connection.execute(
            text(
                f'CREATE TRIGGER "{trigger}" AFTER {event} ON "{table}" '
                f"REFERENCING {_PG_REFERENCING[event]} FOR EACH STATEMENT "
                f"EXECUTE FUNCTION nexus_realtime_capture_{event.lower()}()"
            )
        )
    if row_trigger in present:
        logger.info("realtime on table %s moved to statement triggers", table)
    _drop_unused_row_function(connection)


def _drop_unused_row_function(connection: Connection) -> None:
    used = connection.execute(
        text(
            "SELECT 1 FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid "
            "WHERE p.proname = :name LIMIT 1"
        ),
        {"name": _PG_ROW_FUNCTION},
    ).first()
    if used is None:
        connection.execute(text(f"DROP FUNCTION IF EXISTS {_PG_ROW_FUNCTION}()"))


def _quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _sqlite_binary(value: str) -> str:
    """Build the SQL that writes a BLOB as PostgreSQL's to_json writes a
    bytea: `\\x` and lowercase hex digits (`bytea_output = hex`, PostgreSQL's
    default), so an empty blob is `\\x` and NULL stays null. json_object
    rejects BLOB values, and hex() of NULL is '', hence the CASE."""
    return f"CASE WHEN {value} IS NOT NULL THEN '\\x' || lower(hex({value})) END"


# Significant digits for a REAL in a document. json_object writes 15, which
# rounds 0.1 + 0.2 to 0.3. 17 suffice in theory, but SQLite 3.40.1 (x86-64)
# printed a wrong 17th digit for 0.3% of random doubles, all beyond 1e100.
# With 18, 1.5 million random doubles and the powers of 2 and 10 decoded
# back to the same double. tests/realtime/test_filter_types.py checks the
# SQLite it runs on.
_REAL_DIGITS = 18
# PostgreSQL writes a float8 without fraction below this magnitude as an
# integer (`3`, not `3.0`), and from it on in exponent form (`1e+15`).
_PG_INTEGER_FLOAT_LIMIT = "1e15"


def _sqlite_number(value: str) -> str:
    """Build the SQL that writes a REAL value so that it decodes to the same
    float, and to an int where PostgreSQL's to_json writes the same float8
    as an integer.

    Integers and text pass through json_object unchanged. JSON has no
    infinities, so they become the strings `"Infinity"` and `"-Infinity"`,
    as on PostgreSQL. SQLite stores NaN as NULL.
    """
    # NOTE: SQLite integers have at most 64 bits. A NUMERIC column stores a
    # larger integer as REAL, so 2**64 + 1 arrives as the float
    # 1.8446744073709552e+19, where PostgreSQL sends every digit.
    return (
        f"CASE WHEN typeof({value}) <> 'real' THEN {value} "
        f"WHEN abs({value}) < {_PG_INTEGER_FLOAT_LIMIT} "
        f"AND {value} = CAST({value} AS INTEGER) THEN CAST({value} AS INTEGER) "
        # SQLite has no literal for infinity; 9e999 overflows to it.
        f"WHEN {value} = 9e999 THEN 'Infinity' "
        f"WHEN {value} = -9e999 THEN '-Infinity' "
        f"ELSE json(printf('%!.{_REAL_DIGITS}g', {value})) END"
    )


def _sqlite_record(connection: Connection, table: str, alias: str) -> str:
    pairs: list[str] = []
    for column in inspect(connection).get_columns(table):
        name = column["name"]
        value = f"{alias}.{_quote_identifier(name)}"
        column_type = column["type"]
        if isinstance(column_type, sqltypes.LargeBinary):
            value = _sqlite_binary(value)
        elif isinstance(
            column_type, sqltypes.Float | sqltypes.Numeric | sqltypes.NullType
        ):
            # Numeric and float columns, and columns without a declared type,
            # have the affinities that keep REAL values.
            value = _sqlite_number(value)
        elif isinstance(column_type, sqltypes.JSON):
            # JSON columns hold text; json() embeds them as documents.
            value = f"CASE WHEN json_valid({value}) THEN json({value}) ELSE {value} END"
        elif isinstance(column_type, sqltypes.Boolean):
            # SQLite stores booleans as 0 and 1; PostgreSQL's to_json writes
            # true and false, and events carry the same on both. SQLite also
            # keeps any other value in the column: text that spells a boolean
            # as filters do is that boolean, and other text is carried as
            # stored, so that no boolean filter matches it.
            value = (
                f"CASE WHEN {value} IS NULL THEN NULL "
                f"WHEN typeof({value}) IN ('integer', 'real') THEN "
                f"CASE WHEN {value} <> 0 THEN json('true') ELSE json('false') END "
                f"WHEN typeof({value}) = 'blob' THEN {_sqlite_binary(value)} "
                f"WHEN lower({value}) IN ('true', 't', '1') THEN json('true') "
                f"WHEN lower({value}) IN ('false', 'f', '0') THEN json('false') "
                f"ELSE {value} END"
            )
        pairs.append(f"{_quote_literal(name)}, {value}")
    return f"json_object({', '.join(pairs)})"


def _sqlite_trigger_sql(table: str, event: str, record: str, old: str) -> str:
    """Build the CREATE TRIGGER statement, in the form sqlite_master stores."""
    now = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
    trigger = _quote_identifier(f"nexus_realtime_{table}_{event.lower()}")
    return (
        f"CREATE TRIGGER {trigger} AFTER {event} ON {_quote_identifier(table)} "
        "BEGIN "
        "INSERT INTO realtime_changes (schema_name, table_name, event_type, "
        "record, old_record, committed_at) "
        f"VALUES ('main', {_quote_literal(table)}, '{event}', {record}, {old}, "
        f"{now}); END"
    )


def _sqlite_expected_triggers(connection: Connection, table: str) -> dict[str, str]:
    """Return each capture trigger's name and SQL for the table's current
    columns, in the form sqlite_master stores."""
    new_record = _sqlite_record(connection, table, "NEW")
    old_record = _sqlite_record(connection, table, "OLD")
    bodies = {
        "INSERT": (new_record, "NULL"),
        "UPDATE": (new_record, old_record),
        "DELETE": ("NULL", old_record),
    }
    return {
        f"nexus_realtime_{table}_{event.lower()}": _sqlite_trigger_sql(
            table, event, record, old
        )
        for event, (record, old) in bodies.items()
    }


def _sqlite_stored_triggers(connection: Connection, table: str) -> dict[str, str]:
    rows = connection.execute(
        text(
            "SELECT name, sql FROM sqlite_master "
            "WHERE type = 'trigger' AND tbl_name = :t"
        ),
        {"t": table},
    )
    return {name: sql for name, sql in rows}


def _enable_sqlite(
    connection: Connection, table: str, kinds: dict[str, ColumnKind]
) -> None:
    """Create or replace the triggers; the caller holds SQLite's write lock."""
    del kinds  # the column list is read again with its declared types
    stored = _sqlite_stored_triggers(connection, table)
    for trigger, expected_sql in _sqlite_expected_triggers(connection, table).items():
        if stored.get(trigger) == expected_sql:
            # Unchanged: every worker start runs this, and leaving the
            # trigger alone changes neither the schema nor other writers.
            continue
        # Driver SQL: text() would read a colon in a column name as a
        # bind parameter.
        connection.exec_driver_sql(
            f"DROP TRIGGER IF EXISTS {_quote_identifier(trigger)}"
        )
        connection.exec_driver_sql(expected_sql)


def capture_is_current(url: str, table: str) -> bool:
    """Return whether an existing table's capture triggers are in place and,
    on SQLite, cover its current columns; True for a missing table.

    Dropping a table drops its triggers, and SQLite's usual way to alter a
    table (create a copy, drop, rename) does that too. A column added later
    is not in a SQLite trigger's column list; PostgreSQL's statement
    triggers log whole rows.
    """
    with get_engine(url).connect() as connection:
        if not inspect(connection).has_table(table):
            return True
        if connection.dialect.name == "postgresql":
            return _has_capture_triggers(connection, table)
        stored = _sqlite_stored_triggers(connection, table)
        expected = _sqlite_expected_triggers(connection, table)
    return all(stored.get(name) == sql for name, sql in expected.items())


def disable_realtime(url: str, table: str) -> None:
    """Drop the capture triggers of `table`; the logged changes stay."""
    table = validate_table_name(table)
    with get_engine(url).begin() as connection:
        if connection.dialect.name == "sqlite":
            # One transaction, as in enable_realtime, so the three drops and
            # the record go together.
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        _drop_triggers(connection, table)
        connection.execute(
            text("DELETE FROM realtime_tables WHERE table_name = :t"), {"t": table}
        )


# The suffixes of the SQLite capture triggers' names.
_SQLITE_EVENTS = ("insert", "update", "delete")


def _drop_triggers(connection: Connection, table: str) -> None:
    if connection.dialect.name == "postgresql":
        for trigger in (f"nexus_realtime_{table}", *_pg_trigger_names(table).values()):
            connection.execute(text(f'DROP TRIGGER IF EXISTS "{trigger}" ON "{table}"'))
    else:
        for event in _SQLITE_EVENTS:
            connection.execute(
                text(f'DROP TRIGGER IF EXISTS "nexus_realtime_{table}_{event}"')
            )


def _has_capture_triggers(connection: Connection, table: str) -> bool:
    if connection.dialect.name == "postgresql":
        names = [f"nexus_realtime_{table}", *_pg_trigger_names(table).values()]
        return (
            connection.execute(
                text(
                    "SELECT 1 FROM pg_trigger WHERE tgrelid = to_regclass(:table) "
                    "AND tgname = ANY(:names) LIMIT 1"
                ),
                {"table": f'"{table}"', "names": names},
            ).first()
            is not None
        )
    # SQLite matches table and trigger names in any letter case, and an
    # earlier version named the triggers after the table as the user typed it.
    stored = connection.execute(
        text(
            "SELECT lower(name) FROM sqlite_master "
            "WHERE type = 'trigger' AND lower(tbl_name) = :t"
        ),
        {"t": table},
    ).scalars()
    triggers = {f"nexus_realtime_{table}_{event}" for event in _SQLITE_EVENTS}
    return not triggers.isdisjoint(stored)


def _captured(connection: Connection, table: str) -> bool:
    """Return whether realtime left anything of `table` behind: triggers,
    the enabled record, logged changes or subscriptions. The record and the
    subscriptions count under the name in any letter case."""
    # NOTE: the change log is searched by the exact name only, because
    # lower() would scan the whole log on every worker start. Changes logged
    # under another letter case whose record is gone (an earlier version's
    # `disable_realtime`) stay until pruning deletes them.
    for statement in (
        "SELECT 1 FROM realtime_tables WHERE lower(table_name) = :t",
        "SELECT 1 FROM realtime_changes WHERE table_name = :t LIMIT 1",
        "SELECT 1 FROM realtime_subscriptions WHERE lower(table_name) = :t LIMIT 1",
    ):
        if connection.execute(text(statement), {"t": table}).first() is not None:
            return True
    return inspect(connection).has_table(table) and _has_capture_triggers(
        connection, table
    )


def remove_secret_tables(url: str) -> list[str]:
    """Remove realtime from every table of `SECRET_TABLES`: drop its capture
    triggers and delete its record, its logged changes and its subscriptions.

    Earlier versions let `nexus realtime enable` capture these tables, also
    under their names in other letter case, so the change log may contain
    copies of their rows. Each table is cleaned in one transaction.

    Returns:
        The tables that had anything to remove.
    """
    engine = get_engine(url)
    with engine.connect() as connection:
        found = [table for table in SECRET_TABLES if _captured(connection, table)]
    for table in found:
        with engine.begin() as connection:
            if connection.dialect.name == "sqlite":
                connection.exec_driver_sql("BEGIN IMMEDIATE")
            if inspect(connection).has_table(table):
                _drop_triggers(connection, table)
            changes = connection.execute(
                text("DELETE FROM realtime_changes WHERE lower(table_name) = :t"),
                {"t": table},
            ).rowcount
            subscriptions = connection.execute(
                text("DELETE FROM realtime_subscriptions WHERE lower(table_name) = :t"),
                {"t": table},
            ).rowcount
            connection.execute(
                text("DELETE FROM realtime_tables WHERE lower(table_name) = :t"),
                {"t": table},
            )
        logger.warning(
            "realtime removed from table %s, which contains %s: dropped its "
            "triggers, %d logged changes and %d subscriptions",
            table,
            SECRET_TABLES[table],
            changes,
            subscriptions,
        )
    return found


def fold_table_names(url: str) -> list[str]:
    """Move realtime off each table name that an earlier version recorded in
    other than lower case, and return those names.

    For each such name it drops the capture triggers, deletes its
    `realtime_tables` entry and its subscriptions, and files its logged
    changes under the lower-case name. The subscriptions go because their
    access check compared the name as typed, so `AUDIT_LOG` got past the
    rule of `audit_log`. On SQLite the table is then enabled again under
    its lower-case name, unless no caller may subscribe to it.
    """
    with get_engine(url).connect() as connection:
        recorded = connection.execute(
            text(
                "SELECT table_name FROM realtime_tables UNION "
                "SELECT table_name FROM realtime_subscriptions"
            )
        ).scalars()
        names = sorted({name for name in recorded if name != name.lower()})
    for name in names:
        _fold_table_name(url, name)
    return names


def _fold_table_name(url: str, name: str) -> None:
    folded = name.lower()
    with get_engine(url).begin() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        if _TABLE_NAME.fullmatch(name) and inspect(connection).has_table(name):
            _drop_triggers(connection, name)
        subscriptions = connection.execute(
            text("DELETE FROM realtime_subscriptions WHERE table_name = :t"),
            {"t": name},
        ).rowcount
        connection.execute(
            text("DELETE FROM realtime_tables WHERE table_name = :t"), {"t": name}
        )
        connection.execute(
            text("UPDATE realtime_changes SET table_name = :f WHERE table_name = :t"),
            {"f": folded, "t": name},
        )
        present = inspect(connection).has_table(folded)
    logger.warning(
        "realtime table name %r is not in lower case: dropped its triggers and "
        "%d subscriptions; subscribe to %r instead",
        name,
        subscriptions,
        folded,
    )
    if not (sqlite and present):
        # NOTE: on PostgreSQL a name with upper-case letters is a table
        # created with a quoted name, which realtime cannot capture; rename
        # the table to lower case and enable it again.
        return
    # A secret or internal table is rejected here; `remove_secret_tables`
    # cleans it.
    with contextlib.suppress(RealtimeTableError):
        enable_realtime(url, folded)


def enabled_tables(url: str) -> list[str]:
    with get_engine(url).connect() as connection:
        rows = connection.execute(
            text("SELECT table_name FROM realtime_tables ORDER BY table_name")
        )
        return [row[0] for row in rows]


def enable_default_tables(url: str) -> list[str]:
    """Enable realtime on every table of `DEFAULT_TABLES` that exists, after
    `remove_secret_tables`.

    On PostgreSQL it also re-enables every other table recorded in
    `realtime_tables` that exists, which moves a table still on the row
    trigger of an earlier version to the statement triggers. On SQLite it
    re-enables those whose triggers are missing or miss a column (see
    `capture_is_current`); the others it leaves alone, since enabling takes
    the write lock.
    """
    with get_engine(url).connect() as connection:
        if not inspect(connection).has_table("realtime_changes"):
            return []
    # First, so that a secret table recorded by an earlier version is not
    # enabled again below.
    remove_secret_tables(url)
    fold_table_names(url)
    with get_engine(url).connect() as connection:
        inspector = inspect(connection)
        present = [t for t in DEFAULT_TABLES if inspector.has_table(t)]
        postgresql = connection.dialect.name == "postgresql"
        recorded = connection.execute(
            text("SELECT table_name FROM realtime_tables ORDER BY table_name")
        ).scalars()
        others = [t for t in recorded if t not in present and inspector.has_table(t)]
    if not postgresql:
        others = [t for t in others if not capture_is_current(url, t)]
        for table in others:
            logger.warning(
                "the realtime capture triggers of table %s were missing or out of "
                "date (the table was created again or its columns changed); "
                "installing them again",
                table,
            )
    present += others
    for table in present:
        enable_realtime(url, table)
    return present
