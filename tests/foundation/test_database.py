import logging
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import inspect

from app.db import get_engine
from app.db.engine import BackgroundCheckpoints
from app.db.migrate import current_heads, expected_heads, upgrade
from app.services.audit import (
    AUDIT_STRING_LIMIT,
    MASK,
    list_calls,
    mask_secrets,
    record_call,
)
from app.services.health import check_database
from app.settings import Settings


def test_migrations_reach_every_head(database_url: str) -> None:
    assert current_heads(database_url) == expected_heads()
    tables = inspect(get_engine(database_url)).get_table_names()
    assert "audit_log" in tables
    assert "alembic_version" in tables


def test_upgrade_twice_is_a_no_op(database_url: str) -> None:
    assert upgrade(database_url) == expected_heads()


def test_heads_of_a_database_before_migrations(empty_database_url: str) -> None:
    assert current_heads(empty_database_url) == []
    upgrade(empty_database_url)
    assert current_heads(empty_database_url) == expected_heads()


def test_reading_the_heads_reuses_one_compiled_statement(
    database_url: str, tmp_path: Path
) -> None:
    # `system_health` reads the heads on every call. A statement built anew
    # each time (alembic builds a new version `Table` per call) adds an entry
    # to the engine's compiled cache that keeps that table alive.
    engine = get_engine(database_url)
    settings = Settings(data_dir=tmp_path, database_url=database_url)
    assert check_database(settings).status == "healthy"
    cached = len(engine._compiled_cache)  # type: ignore[arg-type]
    for _ in range(20):
        assert current_heads(database_url) == expected_heads()
        assert check_database(settings).status == "healthy"
    assert len(engine._compiled_cache) == cached  # type: ignore[arg-type]


def test_failed_health_check_masks_password(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Nothing listens on port 9 of 127.0.0.1, so the check fails at once.
    for url in [
        "postgresql+psycopg://u@127.0.0.1:9/db?password=query-secret",
        "postgresql+psycopg://u:at-secret@part@127.0.0.1:9/db",
    ]:
        settings = Settings(data_dir=tmp_path, database_url=url)
        with caplog.at_level(logging.WARNING, logger="app.services.health"):
            health = check_database(settings)
        assert health.status == "unhealthy"
        shown = f"{health.url} {health.error} {caplog.text}"
        for part in ["query-secret", "at-secret", "part@"]:
            assert part not in shown
        caplog.clear()


def test_audit_round_trip_newest_first(database_url: str) -> None:
    first = record_call(
        database_url,
        user_id="alice",
        tool="sandbox_create",
        arguments={"template": "python", "env_vars": {"API_KEY": "sk-1"}},
        outcome="success",
        duration_ms=12.5,
        ids={"sandbox_id": "sbx_1"},
    )
    second = record_call(
        database_url,
        user_id="bob",
        tool="audit_log",
        arguments={"limit": 5},
        outcome="error",
        duration_ms=1.0,
        error="boom",
    )
    events = list_calls(database_url, limit=10)
    assert [e.id for e in events] == [second, first]
    assert events[1].arguments["env_vars"] == {"API_KEY": MASK}
    assert events[1].ids == {"sandbox_id": "sbx_1"}
    assert events[0].error == "boom"
    assert [e.id for e in list_calls(database_url, user_id="alice")] == [first]
    assert [e.id for e in list_calls(database_url, tool="audit_log")] == [second]
    assert len(list_calls(database_url, limit=1)) == 1


def test_mask_secrets_by_name_and_nesting() -> None:
    masked = mask_secrets(
        {
            "anthropic_key": "sk-ant",
            "config": {"api_token": "t0k", "name": "plain"},
            "steps": [{"params": {"password": "pw"}}],
            "envs": {"A": "1"},
            "max_key_count": None,
        }
    )
    assert masked["anthropic_key"] == MASK
    assert masked["config"] == {"api_token": MASK, "name": "plain"}
    assert masked["steps"][0]["params"]["password"] == MASK
    assert masked["envs"] == {"A": MASK}
    assert masked["max_key_count"] is None


def test_mask_secrets_by_name_segment() -> None:
    """A name segment that contains a secret word is a secret unless it is
    an ordinary word, so `keyboard` stays readable while run-together names
    such as `PRIVATEKEYPEM` are masked."""
    secret = [
        "key",
        "api_key",
        "apikey",
        "OPENAI_API_KEY",
        "X-Api-Key",
        "secretToken",
        "authToken",
        "db_password",
        "passwd",
        "credentials",
        "Authorization",
        "APIKey",
        "private_keys",
        "SECRETVALUE",
        "PRIVATEKEYPEM",
        "GITHUBTOKENFILE",
        "DB_PASS",
        "MYSQL_PWD",
        "passphrase",
        "GITHUB_PAT",
    ]
    plain = [
        "keyboard",
        "turkey_count",
        "monkeys",
        "tokenizer",
        "secretary",
        "compass",
        "path",
    ]
    masked = mask_secrets({name: "value" for name in secret + plain})
    for name in secret:
        assert masked[name] == MASK, name
    for name in plain:
        assert masked[name] == "value", name


def test_mask_secrets_cuts_long_strings() -> None:
    content = "x" * (AUDIT_STRING_LIMIT + 10)
    masked = mask_secrets({"content": content, "path": "a.txt"})
    assert masked["content"].startswith("x" * AUDIT_STRING_LIMIT)
    assert masked["content"].endswith("... [10 more characters]")
    assert masked["path"] == "a.txt"
    assert mask_secrets({"code": "y" * AUDIT_STRING_LIMIT})["code"] == (
        "y" * AUDIT_STRING_LIMIT
    )


def _autocheckpoint(url: str) -> int:
    with get_engine(url).connect() as connection:
        return int(connection.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar_one())


def test_background_checkpoints_take_over_from_commits(tmp_path: Path) -> None:
    path = tmp_path / "checkpoints.db"
    url = f"sqlite:///{path}"
    upgrade(url)
    assert _autocheckpoint(url) == 1000
    checkpoints = BackgroundCheckpoints(url, interval=0.05)
    checkpoints.start()
    try:
        assert _autocheckpoint(url) == 0
        size = path.stat().st_size
        # Rows land in the WAL; only a checkpoint copies them into the file.
        for index in range(300):
            record_call(
                url,
                user_id="checkpoints",
                tool="system_health",
                arguments={"padding": "x" * 2000, "index": index},
                outcome="success",
                duration_ms=1.0,
            )
        deadline = time.monotonic() + 10
        while path.stat().st_size == size and time.monotonic() < deadline:
            time.sleep(0.05)
        assert path.stat().st_size > size
    finally:
        checkpoints.stop()
    assert _autocheckpoint(url) == 1000
    assert len(list_calls(url, user_id="checkpoints", limit=1000)) == 300


def test_background_checkpoints_only_for_sqlite_files() -> None:
    assert not BackgroundCheckpoints("sqlite://").start()
    assert not BackgroundCheckpoints("postgresql+psycopg://nexus@127.0.0.1/x").start()


_UPGRADE = """
import sys
from app.db.migrate import upgrade
upgrade(sys.argv[1])
"""


def test_workers_starting_together_migrate_once(tmp_path: Path) -> None:
    # Every worker migrates on start; on a new SQLite file, those that start
    # together must wait for the first instead of creating the same tables.
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _UPGRADE, url],
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=180)
        assert process.returncode == 0, stderr
    assert current_heads(url) == expected_heads()


def test_subscriptions_migrate_to_key_ids(empty_database_url: str) -> None:
    """Subscriptions made before ownership by key id go to the key of their
    name that was active when they were made, through its rotations."""
    from alembic import command
    from sqlalchemy import text

    from app.db.migrate import alembic_config

    url = empty_database_url
    config = alembic_config(url)
    with get_engine(url).begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "realtime_0002")
        command.upgrade(config, "api_0001_keys")
    keys = [
        # id, name, created, revoked, replaced by
        ("solo", "solo", "2026-01-01", None, None),
        ("rot1", "rotated", "2026-01-01", "2026-01-03", "rot2"),
        ("rot2", "rotated", "2026-01-03", None, None),
        ("dup1", "dup", "2026-01-01", None, None),
        ("dup2", "dup", "2026-01-01", None, None),
        ("old", "reused", "2026-01-01", "2026-01-03", None),
        ("new", "reused", "2026-01-04", None, None),
    ]
    subscriptions = [
        ("sub_solo", "key:solo"),
        ("sub_rotated", "key:rotated"),
        ("sub_dup", "key:dup"),
        ("sub_reused", "key:reused"),
        ("sub_cli", "cli:someone"),
    ]
    with get_engine(url).begin() as connection:
        for key_id, name, created, revoked, replaced_by in keys:
            connection.execute(
                text(
                    "INSERT INTO api_keys (id, name, salt, secret_hash, "
                    "created_at, revoked_at, replaced_by) VALUES (:id, :name, "
                    "'00', '00', :created, :revoked, :replaced_by)"
                ),
                {
                    "id": key_id,
                    "name": name,
                    "created": datetime.fromisoformat(created).replace(tzinfo=UTC),
                    "revoked": None
                    if revoked is None
                    else datetime.fromisoformat(revoked).replace(tzinfo=UTC),
                    "replaced_by": replaced_by,
                },
            )
        for subscription_id, user_id in subscriptions:
            connection.execute(
                text(
                    "INSERT INTO realtime_subscriptions (id, table_name, "
                    "event_type, filter, cursor, delivered, batch_size, "
                    "buffer_timeout_ms, max_buffer_size, user_id, created_at, "
                    "updated_at) VALUES (:id, 'audit_log', '*', '', 0, 0, 100, "
                    "1000, 10000, :user_id, :created, :created)"
                ),
                {
                    "id": subscription_id,
                    "user_id": user_id,
                    "created": datetime(2026, 1, 2, tzinfo=UTC),
                },
            )
    upgrade(url)
    with get_engine(url).connect() as connection:
        owners = dict(
            connection.execute(
                text("SELECT id, key_id FROM realtime_subscriptions")
            ).all()
        )
    assert owners == {
        "sub_solo": "solo",
        "sub_rotated": "rot2",
        "sub_dup": None,
        "sub_reused": "old",
        "sub_cli": None,
    }


def test_silent_database_host_gives_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """A host that accepts connections and never responds gives the
    unreachable-database error after the connect timeout, not a hang."""
    import socket
    import threading

    from app.db import engine as engine_module

    monkeypatch.setattr(engine_module, "CONNECT_TIMEOUT_SECONDS", 1, raising=False)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        url = f"postgresql+psycopg://u:pw@127.0.0.1:{port}/db"
        found: list[str | None] = []
        checker = threading.Thread(
            target=lambda: found.append(
                engine_module.unreachable_database_message(url)
            ),
            daemon=True,
        )
        checker.start()
        checker.join(60)
    assert found, "the connection attempt still waits after 60 s"
    message = found[0]
    assert message is not None
    assert "cannot be reached" in message
    assert ":pw@" not in message
