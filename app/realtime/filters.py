"""PostgREST-style row filters (`column=op.value`, commas meaning AND),
parsed once at subscribe time and evaluated against change records."""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any, Literal

# The comparison rules of a column, from its declared type. "number" covers
# integer and numeric columns, which compare exactly, and "float" the
# floating-point ones, which compare as 64-bit floats. "json" columns only
# take is.null: a document has no order, and comparing its text would depend
# on key order and spacing, which differ between the backends.
ColumnKind = Literal[
    "number", "float", "boolean", "text", "datetime", "date", "time", "json"
]
_NUMERIC_KINDS = ("number", "float")

OPERATORS = ("eq", "neq", "lt", "lte", "gt", "gte", "in", "is", "like", "ilike")
MAX_IN_VALUES = 100


class FilterError(ValueError):
    """A filter that names an unknown column or operator, or a bad value."""


@dataclass(frozen=True)
class Condition:
    """One `column=[not.]op.value` term with its value parsed for the column."""

    column: str
    operator: str
    value: Any
    negated: bool = False

    def evaluate(self, record: Mapping[str, Any], kind: ColumnKind) -> bool | None:
        """Return True, False, or None where SQL would yield NULL (a NULL
        column compared with anything), so `not.` of NULL stays unmatched.

        This states the rules plainly. `RowFilter` runs compiled checks that
        must agree with it.
        """
        actual = _coerce_record_value(record.get(self.column), kind)
        if self.operator == "is":
            result: bool | None = _evaluate_is(actual, self.value)
        elif actual is None:
            return None
        else:
            value = self.value
            if kind in _NUMERIC_KINDS and type(actual) is float:
                # A float compares as floats, as PostgreSQL casts the literal
                # to double precision for a float column.
                value = _approximate(value)
            result = _compare(self.operator, actual, value)
        if result is None:
            return None
        return not result if self.negated else result


@dataclass(frozen=True)
class RowFilter:
    """Every condition of a filter string; a record matches when all are True."""

    text: str
    conditions: tuple[Condition, ...]
    kinds: Mapping[str, ColumnKind]
    # One compiled check per condition: a subscription evaluates its filter
    # for every change of its table, so the interpretation is done once here.
    _checks: tuple[Callable[[Mapping[str, Any]], bool], ...] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        checks = tuple(
            _compile(condition, self.kinds[condition.column])
            for condition in self.conditions
        )
        object.__setattr__(self, "_checks", checks)

    def matches(self, record: Mapping[str, Any] | None) -> bool:
        if not self._checks:
            return True
        if record is None:
            return False
        # A loop, not all() over a generator, which doubled the cost here.
        for check in self._checks:  # noqa: SIM110
            if not check(record):
                return False
        return True


_COMPARISONS: dict[str, Callable[[Any, Any], Any]] = {
    "eq": operator.eq,
    "neq": operator.ne,
    "lt": operator.lt,
    "lte": operator.le,
    "gt": operator.gt,
    "gte": operator.ge,
    "in": lambda actual, values: actual in values,
    "like": lambda actual, pattern: pattern.fullmatch(str(actual)) is not None,
    "ilike": lambda actual, pattern: pattern.fullmatch(str(actual)) is not None,
}


def _compile(
    condition: Condition, kind: ColumnKind
) -> Callable[[Mapping[str, Any]], bool]:
    """Build a check that is True exactly when `condition.evaluate` is True."""
    column = condition.column
    value = condition.value
    negated = condition.negated
    if condition.operator == "is":

        def check_is(record: Mapping[str, Any]) -> bool:
            result = _evaluate_is(_coerce_record_value(record.get(column), kind), value)
            return not result if negated else result

        return check_is
    compare = _COMPARISONS[condition.operator]
    if kind == "float":
        approximate = _approximate(value)

        def check_float(record: Mapping[str, Any]) -> bool:
            actual = record.get(column)
            if type(actual) is not float:
                actual = _coerce_record_value(actual, "float")
                if actual is None:
                    return False
            result = bool(compare(actual, approximate))
            return not result if negated else result

        return check_float
    if kind == "number":
        # JSON integers arrive as int and compare exactly with the filter's
        # int or Decimal; floats compare with the value as a float.
        approximate = _approximate(value)

        def check_number(record: Mapping[str, Any]) -> bool:
            actual = record.get(column)
            kind_of = type(actual)
            if kind_of is int:
                operand = value
            elif kind_of is float:
                operand = approximate
            else:
                actual = _coerce_record_value(actual, "number")
                if actual is None:
                    return False
                operand = approximate if type(actual) is float else value
            try:
                result = bool(compare(actual, operand))
            except TypeError:
                return False
            return not result if negated else result

        return check_number
    # Record values of this type are already what _coerce_record_value returns.
    exact: type | None = {"text": str, "boolean": bool}.get(kind)

    def check(record: Mapping[str, Any]) -> bool:
        actual = record.get(column)
        if actual is None or type(actual) is not exact:
            actual = _coerce_record_value(actual, kind)
            if actual is None:
                return False
        try:
            result = bool(compare(actual, value))
        except TypeError:
            return False
        return not result if negated else result

    return check


def split_top_level(text: str, separator: str = ",") -> list[str]:
    """Split on `separator` outside double quotes and parentheses."""
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    quoted = False
    escaped = False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
            continue
        if char == "\\" and quoted:
            current.append(char)
            escaped = True
            continue
        if char == '"':
            quoted = not quoted
        elif not quoted and char == "(":
            depth += 1
        elif not quoted and char == ")":
            depth = max(depth - 1, 0)
        elif char == separator and not quoted and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    if quoted:
        raise FilterError(f"unterminated double quote in filter {text!r}")
    parts.append("".join(current))
    return parts


def unquote(value: str) -> str:
    """Strip PostgREST double quotes and backslash escapes from one value."""
    if len(value) >= 2 and value.startswith('"') and value.endswith('"'):
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def parse_filter(text: str | None, kinds: Mapping[str, ColumnKind]) -> RowFilter:
    """Parse a filter string for a table whose columns have `kinds`.

    Raises:
        FilterError: an unknown column or operator, a malformed term, a value
            that does not fit the column's type, or more than 100 `in` values.
    """
    text = (text or "").strip()
    conditions: list[Condition] = []
    if text:
        for term in split_top_level(text):
            conditions.append(_parse_term(term.strip(), kinds))
    return RowFilter(text=text, conditions=tuple(conditions), kinds=dict(kinds))


def _parse_term(term: str, kinds: Mapping[str, ColumnKind]) -> Condition:
    column, sep, rest = term.partition("=")
    column = column.strip()
    if not sep or not column:
        raise FilterError(
            f"invalid filter term {term!r}: write column=operator.value, "
            "for example status=eq.active"
        )
    if column not in kinds:
        raise FilterError(
            f"unknown column {column!r} in filter; the table has the columns "
            f"{', '.join(sorted(kinds))}"
        )
    negated = False
    if rest.startswith("not."):
        negated = True
        rest = rest[4:]
    operator, dot, raw = rest.partition(".")
    if operator not in OPERATORS:
        raise FilterError(
            f"unknown operator {operator!r} in filter term {term!r}; use one of "
            f"{', '.join(OPERATORS)}, optionally prefixed with not."
        )
    if not dot:
        raise FilterError(
            f"invalid filter term {term!r}: the operator {operator!r} needs a "
            f"value after a dot, for example {column}={operator}.VALUE"
        )
    kind = kinds[column]
    value = _parse_value(column, operator, raw, kind)
    return Condition(column=column, operator=operator, value=value, negated=negated)


_KIND_NAMES: dict[str, str] = {
    "number": "numeric",
    "float": "floating-point",
    "boolean": "boolean",
    "datetime": "date and time",
    "date": "date",
    "time": "time",
    "json": "JSON",
}


def _parse_value(column: str, operator: str, raw: str, kind: ColumnKind) -> Any:
    if kind == "json" and not (operator == "is" and raw == "null"):
        raise FilterError(
            f"column {column!r} contains JSON, which a filter can only test with "
            f"is.null or not.is.null, not {operator}; filter on another column"
        )
    if operator == "is":
        if raw not in ("null", "true", "false"):
            raise FilterError(
                f"invalid value {raw!r} for is on column {column!r}: use is.null, "
                "is.true or is.false"
            )
        if raw != "null" and kind != "boolean":
            # As PostgreSQL rejects `integer IS TRUE`: such a filter would
            # match nothing.
            raise FilterError(
                f"is.{raw} tests a boolean, but column {column!r} is a "
                f"{_KIND_NAMES[kind]} column; use is.null, or compare it with eq "
                "or neq"
            )
        return raw
    if operator in ("like", "ilike") and kind != "text":
        raise FilterError(
            f"{operator} matches text, but column {column!r} is a "
            f"{_KIND_NAMES[kind]} column; compare it with eq, neq, lt, lte, gt, "
            "gte or in"
        )
    if operator == "in":
        if not (raw.startswith("(") and raw.endswith(")")):
            raise FilterError(
                f"invalid in list {raw!r} on column {column!r}: write "
                f'{column}=in.(a,b,"c,d")'
            )
        inner = raw[1:-1]
        items = [] if inner.strip() == "" else split_top_level(inner)
        if len(items) > MAX_IN_VALUES:
            raise FilterError(
                f"the in list on column {column!r} has {len(items)} values; at most "
                f"{MAX_IN_VALUES} are allowed, so split the subscription"
            )
        return tuple(
            _typed_value(column, unquote(item.strip()), kind) for item in items
        )
    if operator in ("like", "ilike"):
        regex = _like_regex(column, unquote(raw))
        flags = re.IGNORECASE | re.DOTALL if operator == "ilike" else re.DOTALL
        return re.compile(regex, flags)
    return _typed_value(column, unquote(raw), kind)


def _like_regex(column: str, pattern: str) -> str:
    """Translate a LIKE pattern to a regular expression: `*` or `%` any
    characters, `_` one, and, as in PostgreSQL, a backslash makes the next
    character literal (`\\_` an underscore, `\\\\` a backslash)."""
    parts: list[str] = []
    escaped = False
    for ch in pattern:
        if escaped:
            parts.append(re.escape(ch))
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch in "*%":
            parts.append(".*")
        elif ch == "_":
            parts.append(".")
        else:
            parts.append(re.escape(ch))
    if escaped:
        raise FilterError(
            f"the pattern {pattern!r} on column {column!r} ends with a backslash, "
            "which escapes nothing; write \\\\ for a literal backslash"
        )
    return "".join(parts)


# A decimal literal as SQL writes one: no nan, inf, underscores or hex.
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
# An integral value with more digits stays a Decimal, which compares just as
# exactly without building a huge int.
_MAX_INT_DIGITS = 1000


def _parse_number(text: str) -> int | Decimal | None:
    """Parse a decimal literal exactly: int when integral, else Decimal."""
    text = text.strip()
    if not _NUMBER.fullmatch(text):
        return None
    number = Decimal(text)
    if number == number.to_integral_value() and number.adjusted() < _MAX_INT_DIGITS:
        return int(number)
    return number


def _approximate(value: Any) -> Any:
    """Convert a filter value, or each value of an in list, to float."""
    if isinstance(value, tuple):
        return tuple(_approximate(item) for item in value)
    if isinstance(value, int | Decimal) and not isinstance(value, bool):
        # float() of a Decimal beyond the float range gives inf, not an error.
        return float(Decimal(value))
    return value


def _parse_datetime(text: str) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    # Naive values are UTC: SQLite stores timestamps without an offset, and
    # PostgreSQL's timestamptz columns arrive with one.
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _parse_date(text: str) -> date | None:
    try:
        return date.fromisoformat(text.strip())
    except ValueError:
        return None


def _parse_time(text: str) -> time | None:
    try:
        return time.fromisoformat(text.strip())
    except ValueError:
        return None


_EXAMPLES = {
    "datetime": "2026-01-01T12:00:00Z or 2026-01-01 12:00:00+02:00",
    "date": "2026-01-01",
    "time": "12:00:00",
}
_TEMPORAL_PARSERS: dict[str, Callable[[str], Any]] = {
    "datetime": _parse_datetime,
    "date": _parse_date,
    "time": _parse_time,
}


def _typed_value(column: str, value: str, kind: ColumnKind) -> Any:
    if kind in _NUMERIC_KINDS:
        number = _parse_number(value)
        if number is None:
            raise FilterError(
                f"value {value!r} for column {column!r} is not a number, but the "
                "column is numeric; write a decimal number such as 10, -2.5 or "
                "1e3 (nan, inf and underscores are not accepted)"
            )
        return number
    if kind == "boolean":
        lowered = value.lower()
        if lowered in ("true", "t", "1"):
            return True
        if lowered in ("false", "f", "0"):
            return False
        raise FilterError(
            f"value {value!r} for boolean column {column!r} is not true or false"
        )
    if kind in _TEMPORAL_PARSERS:
        parsed = _TEMPORAL_PARSERS[kind](value)
        if parsed is None:
            raise FilterError(
                f"value {value!r} for column {column!r} is not a "
                f"{_KIND_NAMES[kind]}, but the column holds one; write ISO 8601, "
                f"for example {_EXAMPLES[kind]}"
            )
        return parsed
    return value


# The strings PostgreSQL's to_json writes for a float8 infinity, and the
# capture on SQLite for a REAL one, because JSON has no infinities.
_INFINITIES = {"Infinity": math.inf, "-Infinity": -math.inf}


_BOOLEAN_WORDS = {
    "true": True,
    "t": True,
    "1": True,
    "false": False,
    "f": False,
    "0": False,
}


def _coerce_record_value(value: Any, kind: ColumnKind) -> Any:
    if value is None:
        return None
    if kind == "number":
        kind_of = type(value)
        if kind_of is int or kind_of is float or kind_of is Decimal:
            return value
        if kind_of is bool:
            return int(value)
        if isinstance(value, str):
            number = _parse_number(value)
            return _INFINITIES.get(value) if number is None else number
        return None
    if kind == "float":
        return _to_float(_coerce_record_value(value, "number"))
    if kind == "boolean":
        if isinstance(value, str):
            # Text that SQLite kept in a boolean column: spelled as a filter
            # spells booleans, or no boolean at all, as a number that does
            # not parse is no number.
            return _BOOLEAN_WORDS.get(value.lower())
        # Changes logged by earlier SQLite triggers hold booleans as 0 and 1.
        return bool(value)
    if kind in _TEMPORAL_PARSERS:
        return _TEMPORAL_PARSERS[kind](value) if isinstance(value, str) else None
    if kind == "json":
        return value
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _to_float(value: int | float | Decimal | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except OverflowError:
        # An int beyond the float range; a Decimal gives an infinity itself.
        return math.inf if value > 0 else -math.inf


def _evaluate_is(actual: Any, value: str) -> bool:
    if value == "null":
        return actual is None
    if value == "true":
        return actual is True
    return actual is False


def _compare(operator: str, actual: Any, value: Any) -> bool | None:
    try:
        if operator == "eq":
            return bool(actual == value)
        if operator == "neq":
            return bool(actual != value)
        if operator == "lt":
            return bool(actual < value)
        if operator == "lte":
            return bool(actual <= value)
        if operator == "gt":
            return bool(actual > value)
        if operator == "gte":
            return bool(actual >= value)
        if operator == "in":
            return actual in value
        if operator in ("like", "ilike"):
            return value.fullmatch(str(actual)) is not None
    except TypeError:
        return None
    raise FilterError(f"unknown operator {operator!r}")
