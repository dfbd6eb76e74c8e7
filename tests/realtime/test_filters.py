import pytest

from app.realtime.filters import (
    ColumnKind,
    FilterError,
    parse_filter,
    split_top_level,
)
from app.realtime.service import SubscriptionError, create_subscription
from app.realtime.stream import next_events
from tests.realtime.helpers import create_items, insert_items

ROWS = [
    {"name": "alpha", "n": 9, "price": 1.5, "flag": True, "code": "9"},
    {"name": "beta", "n": 10, "price": 20.0, "flag": False, "code": "10"},
    {"name": "gamma", "n": 100, "price": None, "flag": None, "code": "100"},
    {"name": "a,b", "n": None, "price": 3.25, "flag": True, "code": None},
    {"name": "x(y)", "n": 2, "price": 0.0, "flag": False, "code": "2"},
    {"name": "Delta", "n": -5, "price": -1.0, "flag": True, "code": "-5"},
]

# (filter, names that match); numbers compare as numbers in `n`, as text in
# `code` ("10" < "9" as text).
CASES = [
    ("n=eq.10", {"beta"}),
    ("n=neq.10", {"alpha", "gamma", "x(y)", "Delta"}),
    ("n=gt.9", {"beta", "gamma"}),
    ("n=gte.9", {"alpha", "beta", "gamma"}),
    ("n=lt.9", {"x(y)", "Delta"}),
    ("n=lte.2", {"x(y)", "Delta"}),
    ("code=gt.9", set()),
    ("code=lt.9", {"beta", "gamma", "x(y)", "Delta"}),
    ("code=eq.10", {"beta"}),
    ("price=gt.1.5", {"beta", "a,b"}),
    ("price=eq.0", {"x(y)"}),
    ("n=in.(9,100)", {"alpha", "gamma"}),
    ("n=not.in.(9,100)", {"beta", "x(y)", "Delta"}),
    ('name=in.("a,b","x(y)")', {"a,b", "x(y)"}),
    ('name=eq."a,b"', {"a,b"}),
    ('name=eq."x(y)"', {"x(y)"}),
    ("n=is.null", {"a,b"}),
    ("n=not.is.null", {"alpha", "beta", "gamma", "x(y)", "Delta"}),
    ("flag=is.true", {"alpha", "a,b", "Delta"}),
    ("flag=is.false", {"beta", "x(y)"}),
    ("flag=eq.true", {"alpha", "a,b", "Delta"}),
    ("price=is.null", {"gamma"}),
    ("name=like.*a", {"alpha", "beta", "gamma", "Delta"}),
    ("name=like.d*", set()),
    ("name=ilike.d*", {"Delta"}),
    ("name=like.%mm%", {"gamma"}),
    ("name=not.like.*a", {"a,b", "x(y)"}),
    ("n=gt.0,flag=is.true", {"alpha"}),
    ("n=gte.0,n=lte.10,name=neq.beta", {"alpha", "x(y)"}),
    ("", {row["name"] for row in ROWS}),
]


async def test_filter_cases_on_database(database_url: str) -> None:
    create_items(database_url)
    subscriptions = {
        text: create_subscription(
            database_url, "items", event="INSERT", filter_text=text
        )
        for text, _ in CASES
    }
    insert_items(database_url, ROWS)
    for text, expected in CASES:
        events, _ = await next_events(
            database_url, subscriptions[text].subscription_id, limit=100
        )
        names = {event["new"]["name"] for event in events}
        assert names == expected, f"filter {text!r}"


async def test_unknown_column_rejected(database_url: str) -> None:
    create_items(database_url)
    with pytest.raises(SubscriptionError, match="unknown column 'nope'"):
        create_subscription(database_url, "items", filter_text="nope=eq.1")


async def test_unknown_operator_rejected(database_url: str) -> None:
    create_items(database_url)
    with pytest.raises(SubscriptionError, match="unknown operator 'between'"):
        create_subscription(database_url, "items", filter_text="n=between.1")


async def test_number_value_checked(database_url: str) -> None:
    create_items(database_url)
    with pytest.raises(SubscriptionError, match="'abc' for column 'n' is not a number"):
        create_subscription(database_url, "items", filter_text="n=gt.abc")


KINDS = {"n": "number", "name": "text"}


def test_in_list_limit() -> None:
    values = ",".join(str(i) for i in range(100))
    assert len(parse_filter(f"n=in.({values})", KINDS).conditions[0].value) == 100
    with pytest.raises(FilterError, match="has 101 values; at most 100"):
        parse_filter(f"n=in.({values},100)", KINDS)


def test_quoted_split() -> None:
    parts = split_top_level('name=eq."a,b",n=in.(1,2),name=eq."q\\"x"')
    assert parts == ['name=eq."a,b"', "n=in.(1,2)", 'name=eq."q\\"x"']
    condition = parse_filter('name=eq."q\\"x"', KINDS).conditions[0]
    assert condition.value == 'q"x'


@pytest.mark.parametrize(
    "text",
    ["n", "n=eq", "=eq.1", 'name=eq."open', "n=in.1,2", "n=is.maybe"],
)
def test_malformed_filter_rejected(text: str) -> None:
    with pytest.raises(FilterError):
        parse_filter(text, KINDS)


@pytest.mark.parametrize(
    "text, matching, other",
    [
        (r"s=like.*\_*", ["under_score", "_"], ["underscore", "under-score"]),
        (r"s=like.100\%", ["100%"], ["1000", "100"]),
        (r"s=like.a\*b", ["a*b"], ["axb", "ab"]),
        (r"s=like.a\\b", ["a\\b"], ["ab", "a\\\\b"]),
        (r"s=ilike.A\_*", ["a_z", "A_"], ["az"]),
    ],
)
def test_like_backslash_escapes(
    text: str, matching: list[str], other: list[str]
) -> None:
    row_filter = parse_filter(text, {"s": "text"})
    for value in matching:
        assert row_filter.matches({"s": value}), value
    for value in other:
        assert not row_filter.matches({"s": value}), value


def test_like_trailing_backslash_rejected() -> None:
    with pytest.raises(FilterError, match="ends with a backslash"):
        parse_filter("s=like.ab\\", {"s": "text"})


def test_compiled_checks_agree_with_evaluate() -> None:
    kinds: dict[str, ColumnKind] = {"n": "number", "s": "text", "b": "boolean"}
    filters = [
        "n=eq.3",
        "n=neq.3",
        "n=lt.2.5",
        "n=lte.2",
        "n=gt.-1",
        "n=gte.10",
        "n=in.(1,2,3)",
        "n=not.in.(1,2)",
        "n=is.null",
        "n=not.is.null",
        "s=eq.a",
        "s=not.eq.a",
        's=in.(a,"b,c")',
        "s=like.a*",
        "s=ilike.*B%",
        "s=gt.b",
        "b=is.true",
        "b=is.false",
        "b=eq.true",
        "b=not.eq.false",
        "n=gte.1,s=neq.a",
    ]
    values: dict[str, list[object]] = {
        "n": [None, 0, 1, 2, 2.5, 3, 3.0, "3", "x", True, False, 10, -2, 1e9],
        "s": [None, "a", "b", "b,c", "ab", "AB", "", 1, True, 2.5],
        "b": [None, True, False, 0, 1, "true", "false", ""],
    }
    checked = 0
    for text in filters:
        row_filter = parse_filter(text, kinds)
        for n in values["n"]:
            for s in values["s"]:
                for b in values["b"]:
                    record = {"n": n, "s": s, "b": b}
                    expected = all(
                        c.evaluate(record, kinds[c.column]) is True
                        for c in row_filter.conditions
                    )
                    assert row_filter.matches(record) is expected, (text, record)
                    checked += 1
    assert checked == len(filters) * 14 * 10 * 8


def test_compiled_checks_agree_on_numbers_and_times() -> None:
    kinds: dict[str, ColumnKind] = {"n": "number", "ts": "datetime"}
    filters = [
        "n=eq.9007199254740993",
        "n=lt.9007199254740993",
        "n=eq.0.1",
        "n=gt.1.5",
        "n=in.(1,0.1,9007199254740992)",
        "n=not.eq.2",
        "ts=gt.2026-01-01T11:00:00",
        "ts=lte.2026-01-01 12:00:00+00:00",
        "ts=in.(2026-01-01T10:00:00Z)",
        "ts=not.lt.2026-01-01T12:00:00+01:00",
    ]
    values: dict[str, list[object]] = {
        "n": [None, 0, 2, 0.1, 1.5, 9007199254740992, 9007199254740993, "0.1", "x"],
        "ts": [
            None,
            "2026-01-01 10:00:00.000000",
            "2026-01-01T12:00:00+00:00",
            "2026-01-01T11:30:00",
            "2026-01-01T13:00:00+02:00",
            "not a time",
            5,
        ],
    }
    for text in filters:
        row_filter = parse_filter(text, kinds)
        for n in values["n"]:
            for ts in values["ts"]:
                record = {"n": n, "ts": ts}
                expected = all(
                    c.evaluate(record, kinds[c.column]) is True
                    for c in row_filter.conditions
                )
                assert row_filter.matches(record) is expected, (text, record)
    assert parse_filter("n=eq.9007199254740992", kinds).matches({"n": 9007199254740992})
    assert not parse_filter("n=eq.9007199254740992", kinds).matches(
        {"n": 9007199254740993}
    )


def test_float_column_compares_as_floats() -> None:
    kinds: dict[str, ColumnKind] = {"f": "float", "n": "number"}
    filters = [
        "f=eq.3.0000000000000001",
        "f=eq.0.30000000000000004",
        "f=gt.1e300",
        "f=lt.-1e300",
        "f=neq.3",
        "f=in.(3,0.1)",
        "f=is.null",
        "f=not.gte.0",
        "n=eq.3.0000000000000001",
        "n=gt.1e300",
    ]
    values: list[object] = [
        None,
        3,
        3.0,
        0.1,
        0.1 + 0.2,
        1e20,
        10**400,
        "3",
        "Infinity",
        "-Infinity",
        "NaN",
        "x",
        True,
    ]

    for text in filters:
        row_filter = parse_filter(text, kinds)
        for value in values:
            for column in ("f", "n"):
                record = {column: value}
                expected = all(
                    c.evaluate(record, kinds[c.column]) is True
                    for c in row_filter.conditions
                )
                assert row_filter.matches(record) is expected, (text, record)

    # PostgreSQL casts the literal to double precision for a float column,
    # and compares it exactly with an integer or numeric one.
    assert parse_filter("f=eq.3.0000000000000001", kinds).matches({"f": 3})
    assert not parse_filter("n=eq.3.0000000000000001", kinds).matches({"n": 3})

    infinite = parse_filter("f=gt.1e300", kinds)
    assert infinite.matches({"f": "Infinity"})
    assert infinite.matches({"f": 10**400})
    assert not infinite.matches({"f": "-Infinity"})
    assert parse_filter("n=gt.1e300", kinds).matches({"n": "Infinity"})

    # NaN matches no comparison, as NULL does.
    assert not parse_filter("f=neq.3", kinds).matches({"f": "NaN"})
    assert not parse_filter("f=not.eq.3", kinds).matches({"f": "NaN"})
