"""Filters by column type on both backends: timestamps as instants, exact
integers, operators a type does not support, and the values events carry."""

from __future__ import annotations

from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Float,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    Time,
    insert,
)

from app.db import get_engine
from app.realtime.filters import FilterError, parse_filter
from app.realtime.service import SubscriptionError, create_subscription
from app.realtime.stream import next_events
from app.realtime.triggers import column_kinds, enable_realtime

metadata = MetaData()
typed = Table(
    "typed",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(20)),
    Column("big", BigInteger),
    Column("amount", Numeric(20, 2)),
    Column("price", Float),
    Column("ts", DateTime(timezone=True)),
    Column("day", Date),
    Column("at", Time),
    Column("doc", JSON),
    Column("flag", Boolean),
)

ROWS: list[dict[str, Any]] = [
    {
        "id": 1,
        "name": "ten",
        "big": 9007199254740993,
        "amount": Decimal("1.10"),
        "price": 0.1,
        "ts": datetime(2026, 1, 1, 10, 0, tzinfo=UTC),
        "day": date(2026, 1, 1),
        "at": time(10, 0),
        "doc": {"a": 1},
        "flag": True,
    },
    {
        "id": 2,
        "name": "noon",
        "big": 9007199254740992,
        "amount": Decimal("2.50"),
        "price": 2.5,
        "ts": datetime(2026, 1, 1, 12, 0, tzinfo=UTC),
        "day": date(2026, 1, 2),
        "at": time(12, 30),
        "doc": None,
        "flag": False,
    },
]

# (filter, ids that match); the same on both backends.
CASES = [
    ("ts=gt.2026-01-01T11:00:00", {2}),
    ("ts=gt.2026-01-01 11:00:00", {2}),
    ("ts=gt.2026-01-01T11:00:00Z", {2}),
    ("ts=lt.2026-01-01T13:00:00+02:00", {1}),
    ("ts=eq.2026-01-01T12:00:00+00:00", {2}),
    ("ts=in.(2026-01-01 10:00:00,2026-01-05)", {1}),
    ("day=eq.2026-01-02", {2}),
    ("day=gte.2026-01-01", {1, 2}),
    ("at=gt.11:00", {2}),
    ("big=eq.9007199254740992", {2}),
    ("big=gt.9007199254740992", {1}),
    ("big=in.(9007199254740993)", {1}),
    ("amount=eq.1.10", {1}),
    ("amount=eq.1.1", {1}),
    ("amount=gt.1.5", {2}),
    ("price=eq.0.1", {1}),
    ("price=lt.2.5", {1}),
    ("price=gte.2.5e0", {2}),
    ("doc=is.null", {2}),
    ("doc=not.is.null", {1}),
    ("flag=is.true", {1}),
    ("flag=eq.false", {2}),
]


def create_typed(url: str) -> None:
    metadata.create_all(get_engine(url))
    enable_realtime(url, "typed")


async def test_typed_filters_match_on_both_backends(database_url: str) -> None:
    create_typed(database_url)
    subscriptions = {
        text: create_subscription(
            database_url, "typed", event="INSERT", filter_text=text
        )
        for text, _ in CASES
    }
    with get_engine(database_url).begin() as connection:
        connection.execute(insert(typed), ROWS)
    for text, expected in CASES:
        events, _ = await next_events(
            database_url, subscriptions[text].subscription_id, limit=100
        )
        assert {event["new"]["id"] for event in events} == expected, text


async def test_events_carry_booleans_and_exact_integers(database_url: str) -> None:
    create_typed(database_url)
    subscription = create_subscription(database_url, "typed")
    with get_engine(database_url).begin() as connection:
        connection.execute(insert(typed), ROWS)
    events, _ = await next_events(database_url, subscription.subscription_id)
    # `is`, because 1 == True: SQLite's json_object wrote 0 and 1 before.
    flags = [event["new"]["flag"] for event in events]
    assert flags[0] is True
    assert flags[1] is False
    assert [event["new"]["big"] for event in events] == [
        9007199254740993,
        9007199254740992,
    ]
    assert events[0]["new"]["doc"] == {"a": 1}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("big=like.9*", "like matches text, but column 'big' is a numeric column"),
        ("flag=ilike.t*", "ilike matches text, but column 'flag' is a boolean"),
        ("ts=like.2026*", "column 'ts' is a date and time column"),
        ('doc=eq.{"a": 1}', "column 'doc' contains JSON"),
        ("doc=is.true", "column 'doc' contains JSON"),
        ("big=eq.nan", "value 'nan' for column 'big' is not a number"),
        ("big=eq.inf", "value 'inf' for column 'big' is not a number"),
        ("big=gt.-inf", "value '-inf' for column 'big' is not a number"),
        ("big=eq.1_0", "value '1_0' for column 'big' is not a number"),
        ("price=in.(1,0x10)", "value '0x10' for column 'price' is not a number"),
        ("ts=gt.yesterday", "value 'yesterday' for column 'ts' is not a date"),
        ("day=eq.2026-13-01", "value '2026-13-01' for column 'day' is not a date"),
        ("at=lt.noon", "value 'noon' for column 'at' is not a time"),
    ],
)
async def test_unsupported_values_and_operators_rejected(
    database_url: str, text: str, message: str
) -> None:
    create_typed(database_url)
    with pytest.raises(SubscriptionError, match=message.replace("(", r"\(")):
        create_subscription(database_url, "typed", filter_text=text)


def test_column_kinds_follow_declared_types(database_url: str) -> None:
    create_typed(database_url)
    assert column_kinds(database_url, "typed") == {
        "id": "number",
        "name": "text",
        "big": "number",
        "amount": "number",
        "price": "float",
        "ts": "datetime",
        "day": "date",
        "at": "time",
        "doc": "json",
        "flag": "boolean",
    }


def test_number_values_parse_exactly() -> None:
    kinds = {"n": "number"}
    values = [
        parse_filter(f"n=eq.{text}", kinds).conditions[0].value
        for text in ("9007199254740993", "1e3", "-2.50", "0.1")
    ]
    assert values == [9007199254740993, 1000, Decimal("-2.50"), Decimal("0.1")]
    assert type(values[1]) is int
    row_filter = parse_filter("n=eq.9007199254740993", kinds)
    assert row_filter.matches({"n": 9007199254740993})
    assert not row_filter.matches({"n": 9007199254740992})
    # A float record compares as floats, as PostgreSQL compares a float8
    # column with a numeric literal.
    assert parse_filter("n=eq.0.1", kinds).matches({"n": 0.1})
    with pytest.raises(FilterError, match="'NaN' for column 'n' is not a number"):
        parse_filter("n=in.(1,NaN)", kinds)
