"""PostgREST-style row filters (`column=op.value`, commas meaning AND),
parsed once at subscribe time and evaluated against change records."""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

ColumnKind = Literal["number", "boolean", "text"]

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
        column compared with anything), so `not.` of NULL stays unmatched."""
        actual = _coerce_record_value(record.get(self.column), kind)
        if self.operator == "is":
            result: bool | None = _evaluate_is(actual, self.value)
        elif actual is None:
            return None
        else:
            result = _compare(self.operator, actual, self.value)
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
    # Record values of this type are already what _coerce_record_value returns.
    exact: type = {"number": float, "text": str, "boolean": bool}[kind]

    def check(record: Mapping[str, Any]) -> bool:
        actual = record.get(column)
        if exact is float and type(actual) is int:
            # JSON integers arrive as int; float() is what coercion returns.
            actual = float(actual)
        elif actual is None or type(actual) is not exact:
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


def _parse_value(column: str, operator: str, raw: str, kind: ColumnKind) -> Any:
    if operator == "is":
        if raw not in ("null", "true", "false"):
            raise FilterError(
                f"invalid value {raw!r} for is on column {column!r}: use is.null, "
                "is.true or is.false"
            )
        return raw
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
        pattern = unquote(raw)
        regex = "".join(
            ".*" if ch in "*%" else "." if ch == "_" else re.escape(ch)
            for ch in pattern
        )
        flags = re.IGNORECASE | re.DOTALL if operator == "ilike" else re.DOTALL
        return re.compile(regex, flags)
    return _typed_value(column, unquote(raw), kind)


def _typed_value(column: str, value: str, kind: ColumnKind) -> Any:
    if kind == "number":
        try:
            return float(value)
        except ValueError:
            raise FilterError(
                f"value {value!r} for column {column!r} is not a number, but the "
                "column is numeric"
            ) from None
    if kind == "boolean":
        lowered = value.lower()
        if lowered in ("true", "t", "1"):
            return True
        if lowered in ("false", "f", "0"):
            return False
        raise FilterError(
            f"value {value!r} for boolean column {column!r} is not true or false"
        )
    return value


def _coerce_record_value(value: Any, kind: ColumnKind) -> Any:
    if value is None:
        return None
    if kind == "number":
        if isinstance(value, bool):
            return float(value)
        if isinstance(value, int | float):
            return float(value)
        try:
            return float(value)
        except (TypeError, ValueError):
            return None
    if kind == "boolean":
        # SQLite's json_object writes booleans as 0 and 1.
        return bool(value)
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


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
