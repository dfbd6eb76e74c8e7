"""Filters by column type on both backends: timestamps as instants, exact
integers, floats, binary columns, operators a type does not support, and the
values events carry."""

from __future__ import annotations

import math
import random
import struct
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
    LargeBinary,
    MetaData,
    Numeric,
    String,
    Table,
    Time,
    insert,
)
from sqlalchemy import text as sql_text

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

measures = Table(
    "measures",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("price", Float),
    Column("whole", Numeric(30, 0)),
    Column("data", LargeBinary),
    Column("doc", JSON),
)

MEASURE_ROWS: list[dict[str, Any]] = [
    {"id": 1, "price": 0.1 + 0.2, "data": None},
    {"id": 2, "price": 1 / 3, "data": b""},
    {"id": 3, "price": 123456789.123456789, "data": b"\x01\xff"},
    {"id": 4, "price": 3.0, "data": None},
    {"id": 5, "price": math.inf, "data": None},
    {"id": 6, "price": None, "data": None},
    {"id": 7, "price": 1e20, "data": None},
    {"id": 8, "price": -math.inf, "data": None},
]

# (filter, ids that match) on `typed`; the same on both backends.
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

# (filter, ids that match) on `measures`; the same on both backends, and the
# rows PostgreSQL's WHERE would select.
MEASURE_CASES = [
    ("price=eq.0.30000000000000004", {1}),
    ("price=eq.0.3", set()),
    ("price=eq.0.3333333333333333", {2}),
    ("price=eq.0.333333333333333", set()),
    ("price=eq.123456789.12345679", {3}),
    ("price=eq.123456789.123457", set()),
    ("price=in.(0.30000000000000004,3)", {1, 4}),
    ("price=eq.3", {4}),
    # The literal rounds to the float 3.0, as PostgreSQL casts it for a
    # double precision column.
    ("price=eq.3.0000000000000001", {4}),
    ("price=eq.1e20", {7}),
    ("price=gte.100000000000000000000", {5, 7}),
    ("price=gt.1e300", {5}),
    ("price=lt.-1e300", {8}),
    ("price=neq.3", {1, 2, 3, 5, 7, 8}),
    ("price=is.null", {6}),
    ("data=is.null", {1, 4, 5, 6, 7, 8}),
    ("data=not.is.null", {2, 3}),
    ("data=eq.\\x", {2}),
    ("data=eq.\\x01ff", {3}),
]


def create_typed(url: str) -> None:
    metadata.create_all(get_engine(url))
    enable_realtime(url, "typed")
    enable_realtime(url, "measures")


@pytest.mark.parametrize(
    ("table", "rows", "cases"),
    [(typed, ROWS, CASES), (measures, MEASURE_ROWS, MEASURE_CASES)],
    ids=["typed", "measures"],
)
async def test_typed_filters_match_on_both_backends(
    database_url: str,
    table: Table,
    rows: list[dict[str, Any]],
    cases: list[tuple[str, set[int]]],
) -> None:
    create_typed(database_url)
    subscriptions = {
        filter_text: create_subscription(
            database_url, table.name, event="INSERT", filter_text=filter_text
        )
        for filter_text, _ in cases
    }
    with get_engine(database_url).begin() as connection:
        connection.execute(insert(table), rows)
    for filter_text, expected in cases:
        events, _ = await next_events(
            database_url, subscriptions[filter_text].subscription_id, limit=100
        )
        assert {event["new"]["id"] for event in events} == expected, filter_text


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


async def measure_events(url: str, rows: list[dict[str, Any]]) -> dict[int, Any]:
    """Insert `rows` into `measures` and return each row's event by id."""
    subscription = create_subscription(url, "measures")
    with get_engine(url).begin() as connection:
        connection.execute(insert(measures), rows)
    events, _ = await next_events(url, subscription.subscription_id, limit=1000)
    assert len(events) == len(rows)
    return {event["new"]["id"]: event["new"] for event in events}


async def test_events_carry_floats_as_postgresql_writes(database_url: str) -> None:
    create_typed(database_url)
    new = await measure_events(database_url, MEASURE_ROWS)
    assert new[1]["price"] == 0.1 + 0.2
    assert new[2]["price"] == 1 / 3
    assert new[3]["price"] == 123456789.123456789
    # PostgreSQL writes a float8 without fraction below 1e15 as an integer.
    assert new[4]["price"] == 3
    assert type(new[4]["price"]) is int
    assert new[7]["price"] == 1e20
    assert type(new[7]["price"]) is float
    # JSON has no infinities; PostgreSQL's to_json writes these strings.
    assert new[5]["price"] == "Infinity"
    assert new[8]["price"] == "-Infinity"
    assert new[6]["price"] is None


async def test_events_carry_binary_as_bytea_text(database_url: str) -> None:
    create_typed(database_url)
    new = await measure_events(database_url, MEASURE_ROWS)
    assert new[1]["data"] is None
    assert new[2]["data"] == "\\x"
    assert new[3]["data"] == "\\x01ff"


# Doubles whose 17-digit printf is wrong on SQLite 3.40.1, then the extremes.
HARD_FLOATS = [
    -1.1545580616824966e232,
    -1.566228692651259e302,
    1.4523142177899403e308,
    1.074903261319722e307,
    -1.0605571031729485e214,
    1.0650601789129527e229,
    1.7976931348623157e308,
    2.2250738585072014e-308,
    5e-324,
    -0.0,
    999999999999999.9,
    1e15,
    2.0**53 + 2,
]


async def test_events_carry_floats_exactly(database_url: str) -> None:
    create_typed(database_url)
    generator = random.Random(20261205)
    values = list(HARD_FLOATS)
    while len(values) < 600:
        bits = generator.getrandbits(64)
        value = struct.unpack("<d", struct.pack("<Q", bits))[0]
        if math.isfinite(value):
            values.append(value)
    rows = [{"id": i, "price": value} for i, value in enumerate(values)]
    new = await measure_events(database_url, rows)
    wrong = [
        (value, new[i]["price"])
        for i, value in enumerate(values)
        if new[i]["price"] != value
    ]
    assert wrong == []


async def test_numeric_beyond_64_bits_rounds_on_sqlite(database_url: str) -> None:
    create_typed(database_url)
    rows = [
        {"id": 1, "whole": Decimal(2**64 + 1)},
        {"id": 2, "whole": Decimal(5)},
    ]
    new = await measure_events(database_url, rows)
    assert new[2]["whole"] == 5
    assert type(new[2]["whole"]) is int
    if database_url.startswith("sqlite"):
        # SQLite stores the integer as REAL; see the NOTE in triggers.py.
        assert new[1]["whole"] == 1.8446744073709552e19
        assert type(new[1]["whole"]) is float
    else:
        assert new[1]["whole"] == 2**64 + 1


async def test_json_numbers_beyond_float_range(database_url: str) -> None:
    create_typed(database_url)
    subscription = create_subscription(database_url, "measures")
    cast = "CAST(:doc AS json)" if database_url.startswith("postgresql") else ":doc"
    document = '{"x": 1e400, "y": -2.5e400, "z": 0.5, "w": 1e5000, "v": 1.5e-400}'
    with get_engine(database_url).begin() as connection:
        connection.execute(
            sql_text(f"INSERT INTO measures (id, doc) VALUES (1, {cast})"),
            {"doc": document},
        )
    events, _ = await next_events(database_url, subscription.subscription_id)
    doc = events[0]["new"]["doc"]
    assert doc["x"] == 10**400
    assert type(doc["x"]) is int
    assert doc["y"] == -25 * 10**399
    assert doc["z"] == 0.5
    # More digits than Python prints in an int.
    assert doc["w"] is None
    assert doc["v"] == 0.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("big=like.9*", "like matches text, but column 'big' is a numeric column"),
        ("flag=ilike.t*", "ilike matches text, but column 'flag' is a boolean"),
        ("ts=like.2026*", "column 'ts' is a date and time column"),
        ('doc=eq.{"a": 1}', "column 'doc' contains JSON"),
        ("doc=is.true", "column 'doc' contains JSON"),
        ("big=is.true", "is.true tests a boolean, but column 'big' is a numeric"),
        ("ts=is.false", "is.false tests a boolean, but column 'ts' is a date and"),
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


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_sqlite_boolean_text_is_not_false(database_url: str) -> None:
    """SQLite keeps any value in a boolean column: text that spells a
    boolean is that boolean, and other text arrives as stored and matches no
    boolean filter."""
    create_typed(database_url)
    filters = ("flag=is.false", "flag=is.true", "flag=eq.false")
    subscriptions = {
        text: create_subscription(database_url, "typed", filter_text=text)
        for text in (*filters, "")
    }

    with get_engine(database_url).begin() as connection:
        for index, stored in enumerate(["true", "F", "yes", "garbage", 0, 2]):
            connection.exec_driver_sql(
                "INSERT INTO typed (id, flag) VALUES (?, ?)", (index + 1, stored)
            )
    everything, _ = await next_events(database_url, subscriptions[""].subscription_id)
    assert [event["new"]["flag"] for event in everything] == [
        True,
        False,
        "yes",
        "garbage",
        False,
        True,
    ]

    matched = {}
    for text in filters:
        events, _ = await next_events(database_url, subscriptions[text].subscription_id)
        matched[text] = [event["new"]["id"] for event in events]
    assert matched == {
        "flag=is.false": [2, 5],
        "flag=is.true": [1, 6],
        "flag=eq.false": [2, 5],
    }
