"""A user table with typed columns, enabled for realtime, on either database."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    delete,
    insert,
    text,
    update,
)

from app.db import get_engine
from app.realtime.triggers import enable_realtime

metadata = MetaData()
items = Table(
    "items",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(100), nullable=False),
    Column("n", Integer, nullable=True),
    Column("price", Float, nullable=True),
    Column("flag", Boolean, nullable=True),
    Column("code", String(20), nullable=True),
)


def create_items(url: str) -> None:
    metadata.create_all(get_engine(url))
    enable_realtime(url, "items")


def insert_items(url: str, rows: list[dict[str, Any]]) -> None:
    with get_engine(url).begin() as connection:
        for row in rows:
            connection.execute(insert(items).values(**row))


def update_items(url: str, name: str, **values: Any) -> None:
    with get_engine(url).begin() as connection:
        connection.execute(update(items).where(items.c.name == name).values(**values))


def delete_items(url: str, name: str) -> None:
    with get_engine(url).begin() as connection:
        connection.execute(delete(items).where(items.c.name == name))


def insert_audit_row_with_lone_surrogate(url: str, user_id: str) -> None:
    """Store an audit row whose arguments hold a lone surrogate, as servers
    did before the audit log replaced them: the JSON text carries the escape
    `\\ud800`, which the json module reads back as a lone surrogate."""
    arguments = "CAST(:arguments AS json)" if "postgresql" in url else ":arguments"
    with get_engine(url).begin() as connection:
        connection.execute(
            text(
                "INSERT INTO audit_log (created_at, user_id, tool, arguments, "
                f"outcome, duration_ms, ids) VALUES (:now, :user_id, 'audit_log', "
                f"{arguments}, 'error', 1.0, '{{}}')"
            ),
            {
                "now": datetime.now(UTC),
                "user_id": user_id,
                "arguments": '{"user_id": "\\ud800"}',
            },
        )
