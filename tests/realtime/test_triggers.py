"""Capture triggers: the logged rows of multi-row statements, the PostgreSQL
statement triggers and the move from the row trigger of earlier versions."""

import json
from typing import Any

import psycopg
import pytest
from sqlalchemy import text

from app.db import get_engine
from app.db.migrate import upgrade
from app.realtime.stream import libpq_conninfo
from app.realtime.triggers import NOTIFY_CHANNEL, disable_realtime, enable_realtime
from tests.realtime.helpers import create_items

# The PostgreSQL row trigger that earlier versions installed, kept verbatim so
# the upgrade test starts from what an existing database contains.
LEGACY_ROW_FUNCTION = """
CREATE OR REPLACE FUNCTION nexus_realtime_capture() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    change_id bigint;
    first_change boolean;
BEGIN
    first_change := current_setting('nexus.realtime_xact', true)
        IS DISTINCT FROM txid_current()::text;
    IF first_change THEN
        PERFORM pg_advisory_xact_lock(7233002);
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
        PERFORM pg_notify('nexus_realtime', change_id::text);
    END IF;
    RETURN NULL;
END
$$
"""


def logged(url: str) -> list[tuple[int, str, Any, Any]]:
    with get_engine(url).connect() as connection:
        rows = connection.execute(
            text(
                "SELECT id, event_type, record, old_record FROM realtime_changes "
                "WHERE table_name = 'items' ORDER BY id"
            )
        ).all()
    return [(int(r[0]), r[1], _loaded(r[2]), _loaded(r[3])) for r in rows]


def _loaded(value: Any) -> Any:
    if isinstance(value, str):
        return json.loads(value)
    return value


def triggers_of(url: str, table: str) -> set[str]:
    with get_engine(url).connect() as connection:
        rows = connection.execute(
            text(
                "SELECT tgname FROM pg_trigger "
                "WHERE tgrelid = to_regclass(:t) AND NOT tgisinternal"
            ),
            {"t": table},
        ).scalars()
        return set(rows)


def run(url: str, *statements: str) -> None:
    with get_engine(url).begin() as connection:
        for statement in statements:
            connection.execute(text(statement))


def test_multi_row_statements_log_each_row(database_url: str) -> None:
    create_items(database_url)
    run(
        database_url,
        "INSERT INTO items (name, n) VALUES ('a', 1), ('b', 2), ('c', 3)",
        "UPDATE items SET n = n * 10 WHERE n >= 2",
        "DELETE FROM items WHERE n = 1",
        "UPDATE items SET n = 0 WHERE n < 0",
    )
    changes = logged(database_url)
    assert [c[1] for c in changes] == ["INSERT"] * 3 + ["UPDATE"] * 2 + ["DELETE"]
    assert [c[2]["name"] for c in changes[:3]] == ["a", "b", "c"]
    assert all(c[3] is None for c in changes[:3])
    updates = {c[2]["name"]: (c[3]["n"], c[2]["n"]) for c in changes[3:5]}
    assert updates == {"b": (2, 20), "c": (3, 30)}
    assert changes[5][2] is None
    assert changes[5][3]["name"] == "a"
    ids = [c[0] for c in changes]
    assert ids == sorted(ids)


def test_update_of_primary_key_pairs_rows(database_url: str) -> None:
    create_items(database_url)
    run(database_url, "INSERT INTO items (name, n) VALUES ('a', 1), ('b', 2)")
    run(database_url, "UPDATE items SET id = id + 100, n = n + 1")
    updates = [c for c in logged(database_url) if c[1] == "UPDATE"]
    pairs = {(c[3]["id"], c[3]["n"], c[2]["id"], c[2]["n"]) for c in updates}
    assert pairs == {(1, 1, 101, 2), (2, 2, 102, 3)}
    assert {c[2]["name"] for c in updates} == {c[3]["name"] for c in updates}


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_statement_without_rows_logs_nothing(database_url: str) -> None:
    create_items(database_url)
    run(
        database_url,
        "UPDATE items SET n = 1 WHERE n = -1",
        "DELETE FROM items WHERE n = -1",
        "INSERT INTO items (name) SELECT 'x' WHERE false",
    )
    assert logged(database_url) == []


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_one_notification_names_first_change(database_url: str) -> None:
    create_items(database_url)
    run(database_url, "INSERT INTO items (name) VALUES ('before')")
    with psycopg.connect(libpq_conninfo(database_url), autocommit=True) as listener:
        listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        run(
            database_url,
            "INSERT INTO items (name) VALUES ('a'), ('b')",
            "UPDATE items SET n = 5",
            "DELETE FROM items WHERE name = 'before'",
        )
        payloads = [n.payload for n in listener.notifies(timeout=2.0)]
    changes = logged(database_url)
    first_of_transaction = changes[1][0]
    assert payloads == [str(first_of_transaction)]
    assert len(changes) == 1 + 2 + 3 + 1


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_upgrade_replaces_row_trigger(database_url: str) -> None:
    create_items(database_url)
    disable_realtime(database_url, "items")
    run(
        database_url,
        LEGACY_ROW_FUNCTION,
        # The helper that the first statement triggers called.
        "CREATE FUNCTION nexus_realtime_first_append() RETURNS boolean "
        "LANGUAGE sql AS 'SELECT true'",
        'CREATE TRIGGER "nexus_realtime_items" AFTER INSERT OR UPDATE OR DELETE '
        'ON "items" FOR EACH ROW EXECUTE FUNCTION nexus_realtime_capture()',
        "INSERT INTO realtime_tables (table_name, enabled_at) "
        "VALUES ('items', CURRENT_TIMESTAMP)",
    )
    run(database_url, "INSERT INTO items (name) VALUES ('old')")
    assert triggers_of(database_url, "items") == {"nexus_realtime_items"}

    upgrade(database_url)

    assert triggers_of(database_url, "items") == {
        "nexus_realtime_items_insert",
        "nexus_realtime_items_update",
        "nexus_realtime_items_delete",
    }
    with get_engine(database_url).connect() as connection:
        legacy = connection.execute(
            text(
                "SELECT 1 FROM pg_proc WHERE proname IN "
                "('nexus_realtime_capture', 'nexus_realtime_first_append')"
            )
        ).first()
    assert legacy is None
    run(database_url, "INSERT INTO items (name) VALUES ('new')")
    names = [c[2]["name"] for c in logged(database_url)]
    assert names == ["old", "new"]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_enable_twice_keeps_triggers(database_url: str) -> None:
    create_items(database_url)
    before = triggers_of(database_url, "items")
    enable_realtime(database_url, "items")
    assert triggers_of(database_url, "items") == before
    run(database_url, "INSERT INTO items (name) VALUES ('once')")
    assert len(logged(database_url)) == 1
    disable_realtime(database_url, "items")
    assert triggers_of(database_url, "items") == set()


def _document_types(url: str) -> set[str]:
    with get_engine(url).connect() as connection:
        rows = connection.execute(
            text(
                "SELECT data_type FROM information_schema.columns WHERE "
                "table_name = 'realtime_changes' "
                "AND column_name IN ('record', 'old_record')"
            )
        ).scalars()
        return set(rows)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_upgrade_stores_documents_as_json(database_url: str) -> None:
    """A change log from before documents were `json` keeps its changes, and
    captures that the earlier functions make still land while the new ones
    are not installed yet."""
    assert _document_types(database_url) == {"json"}
    create_items(database_url)
    run(database_url, "INSERT INTO items (name, n, flag) VALUES ('before', 1, true)")
    run(
        database_url,
        "ALTER TABLE realtime_changes ALTER COLUMN record TYPE jsonb "
        "USING record::jsonb",
        "ALTER TABLE realtime_changes ALTER COLUMN old_record TYPE jsonb "
        "USING old_record::jsonb",
        # The later realtime migrations run again, so their changes go too.
        "ALTER TABLE realtime_subscriptions DROP COLUMN key_id",
        "UPDATE alembic_version SET version_num = 'realtime_0001' "
        "WHERE version_num LIKE 'realtime_%'",
    )
    run(database_url, "UPDATE items SET n = 2")

    upgrade(database_url)

    assert _document_types(database_url) == {"json"}
    run(database_url, "DELETE FROM items")
    changes = [(event, new, old) for _, event, new, old in logged(database_url)]
    before = {"id": 1, "name": "before", "n": 1, "price": None, "flag": True}
    before["code"] = None
    updated = {**before, "n": 2}
    assert changes == [
        ("INSERT", before, None),
        ("UPDATE", updated, before),
        ("DELETE", None, updated),
    ]
