"""JSON that every peer accepts: strict parsing of request bodies, and
encoding that cannot fail on values already stored.

Python's json module accepts what strict parsers reject: a lone UTF-16
surrogate escape (`"\\ud800"`), `NaN`, `Infinity` and numbers beyond the
double range (`1e400` becomes `inf`). A string with a lone surrogate cannot be
encoded as UTF-8, and a non-finite float is not JSON, so either one accepted
at the edge fails later, in the database or in a response encoder.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

# In a Python str a valid pair is one code point above U+FFFF, so every code
# point in this range is a lone surrogate.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
REPLACEMENT_CHARACTER = "\ufffd"
# orjson returns a float for an integer outside the 64-bit range, where the
# json module keeps the exact int.
_INT64_LIMIT = 2.0**63
# Maximum characters of a value that an error message repeats.
_SHOWN_VALUE_CHARACTERS = 100
# The deepest nesting of objects and arrays that a request may send. No tool
# input needs more than a few levels, and the walks over a value (checks,
# masking, serialization) would otherwise each meet Python's and pydantic's
# recursion limits at a different depth.
MAX_JSON_DEPTH = 64
# Mask that an error message shows in place of a secret value, as the audit log does.
_MASK = "********"


def replace_lone_surrogates(text: str) -> str:
    """Return `text` with each lone surrogate replaced by U+FFFD."""
    if text.isascii():
        return text
    return _LONE_SURROGATE.sub(REPLACEMENT_CHARACTER, text)


def encodable(value: Any) -> Any:
    """Return `value` in a form every JSON encoder accepts: lone surrogates
    in strings and keys replaced by U+FFFD, non-finite floats replaced by
    None (which orjson and pydantic write as null). Returns `value` itself
    when orjson already encodes it."""
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError:
        return _cleaned(value)
    return value


def _cleaned(value: Any) -> Any:
    if isinstance(value, str):
        return replace_lone_surrogates(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {
            replace_lone_surrogates(str(key)): _cleaned(item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [_cleaned(item) for item in value]
    return value


def dumps(value: Any) -> bytes:
    """Encode `value` as UTF-8 JSON; never raises for JSON-like values.

    orjson first (non-finite floats become null). A value orjson rejects is
    cleaned as `encodable` does, and an integer wider than 64 bits goes
    through the json module. Other types are written with `str`.
    """
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        pass
    cleaned = _cleaned(value)
    try:
        return orjson.dumps(cleaned, default=str)
    except orjson.JSONEncodeError:
        text = json.dumps(
            cleaned,
            ensure_ascii=False,
            allow_nan=False,
            separators=(",", ":"),
            default=str,
        )
        return text.encode()


@dataclass(frozen=True)
class _Rejected:
    """A number the json module accepted but JSON does not allow."""

    text: str


class InvalidJSONError(ValueError):
    """A request body that is not strict JSON.

    Attributes:
        message: what is wrong and where, for the client.
        field: dotted path of the offending value or key, when one was found.
        value: the offending value as the client wrote it (cut short).
        problem: what is wrong with that value, without the field.
        document: the body as the json module parses it, leniently; only
            meaningful when `lenient` is true.
        lenient: whether the json module parsed the body.
    """

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        value: str | None = None,
        problem: str | None = None,
        document: Any = None,
        lenient: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.value = value
        self.problem = problem
        self.document = document
        self.lenient = lenient


def load_strict(
    body: bytes | str, *, is_secret: Callable[[str], bool] | None = None
) -> Any:
    """Parse a request body as strict JSON (RFC 8259 in UTF-8).

    Integers of any size stay exact.

    Args:
        body: the request body.
        is_secret: returns whether a field name is that of a secret, whose value
            an error message must not repeat.

    Raises:
        InvalidJSONError: the body is not JSON, or contains a lone surrogate,
            NaN, Infinity or a number beyond the double range; the message
            names the field, the value as written and the line and column.
            Also raised for an object that repeats a key, naming the key.
    """
    try:
        loaded = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        loaded = _load_rejected(body, error, is_secret)
    else:
        _reject_too_deep(loaded)
        if has_wide_float(loaded):
            loaded = json.loads(body)
    if isinstance(loaded, dict | list):
        _reject_duplicate_keys(body, loaded)
    return loaded


class DuplicateKeyError(ValueError):
    """A JSON object that contains the same key twice."""

    def __init__(self, key: str) -> None:
        super().__init__(
            f"the key {key!r} appears more than once in one object; send each key once"
        )
        self.key = key


def repeated_key_path(text: bytes | str) -> tuple[str, ...] | None:
    """Return the path to the first key that an object of the JSON `text`
    repeats, ending with that key, or None. Raises as `json.loads` does."""
    return _first_repeated_key(
        json.loads(text, object_pairs_hook=_MarkedObject.from_pairs)
    )


def _reject_duplicate_keys(body: bytes | str, document: Any) -> None:
    # orjson keeps the last of repeated keys without telling, so the body is
    # parsed again with a hook that receives every pair and marks the object.
    found = repeated_key_path(body)
    if found is None:
        return
    duplicate = DuplicateKeyError(found[-1])
    field = ".".join(replace_lone_surrogates(part) for part in found)
    raise InvalidJSONError(
        f"the request body is invalid: {field}: {duplicate}",
        field=field,
        problem=str(duplicate),
        document=_cleaned(document),
        lenient=True,
    )


class _MarkedObject(dict[str, Any]):
    """A parsed JSON object that remembers the first key it got twice."""

    repeated: str | None = None

    @classmethod
    def from_pairs(cls, pairs: list[tuple[str, Any]]) -> _MarkedObject:
        parsed = cls()
        for key, value in pairs:
            if key in parsed and parsed.repeated is None:
                parsed.repeated = key
            parsed[key] = value
        return parsed


def _first_repeated_key(document: Any) -> tuple[str, ...] | None:
    """Return the path to the first repeated key, in the body's order."""
    pending: list[tuple[Any, tuple[str, ...]]] = [(document, ())]
    while pending:
        item, path = pending.pop()
        if isinstance(item, _MarkedObject):
            if item.repeated is not None:
                return (*path, item.repeated)
            children = [(child, (*path, str(key))) for key, child in item.items()]
        elif isinstance(item, list):
            children = [(child, (*path, str(i))) for i, child in enumerate(item)]
        else:
            continue
        # Reversed, so that the stack pops them in the body's order.
        pending.extend(reversed(children))
    return None


def has_wide_float(value: Any) -> bool:
    """Return whether a value decoded by orjson contains a float beyond the
    64-bit integer range, which may be an integer that orjson rounded."""
    pending = [value]
    while pending:
        item = pending.pop()
        kind = type(item)
        if kind is float:
            if not -_INT64_LIMIT < item < _INT64_LIMIT:
                return True
        elif kind is dict:
            pending.extend(item.values())
        elif kind is list:
            pending.extend(item)
    return False


def too_deep(value: Any) -> tuple[str, ...] | None:
    """Return the path to the first object or array nested deeper than
    `MAX_JSON_DEPTH` levels (the value itself is level 1), or None."""
    pending: list[tuple[Any, tuple[str, ...]]] = [(value, ())]
    while pending:
        item, path = pending.pop()
        if isinstance(item, dict):
            children: list[tuple[Any, tuple[str, ...]]] = [
                (child, (*path, str(key))) for key, child in item.items()
            ]
        elif isinstance(item, list | tuple):
            children = [(child, (*path, str(i))) for i, child in enumerate(item)]
        else:
            continue
        if len(path) >= MAX_JSON_DEPTH:
            return path
        pending.extend(children)
    return None


def depth_problem() -> str:
    """Say what is wrong with a value that `too_deep` found."""
    return (
        f"it is nested more than {MAX_JSON_DEPTH} levels deep (objects and "
        f"arrays inside each other); send at most {MAX_JSON_DEPTH} levels"
    )


def _reject_too_deep(document: Any) -> None:
    """Raise for a document nested too deep. The error carries the document
    for the caller to read its shape (a JSON-RPC id, a plain `/mcp` call),
    so it must hold only JSON values."""
    path = too_deep(document)
    if path is None:
        return
    field = ".".join(replace_lone_surrogates(part) for part in path)
    problem = depth_problem()
    raise InvalidJSONError(
        f"the request body is invalid: {field}: {problem}",
        field=field,
        problem=problem,
        document=document,
        lenient=True,
    )


def _load_rejected(
    body: bytes | str,
    error: orjson.JSONDecodeError,
    is_secret: Callable[[str], bool] | None,
) -> Any:
    """Explain why orjson rejected `body`, or return the json module's result
    for valid JSON that orjson cannot hold (an integer beyond the double
    range)."""
    position = f"line {error.lineno} column {error.colno}"

    if isinstance(body, bytes):
        # Decoded here, because the json module would also take UTF-16 and
        # UTF-32 bytes, which JSON between systems does not allow.
        try:
            body = body.decode()
        except UnicodeDecodeError as decode_error:
            raise InvalidJSONError(
                f"the request body is not valid UTF-8 (byte {decode_error.start}); "
                "send JSON encoded as UTF-8"
            ) from None

    try:
        document = _load_lenient(body, cut=False)
    except (ValueError, RecursionError) as lenient_error:
        if not isinstance(lenient_error, RecursionError) and "depth" not in error.msg:
            # orjson's message names the position, and reads better than the
            # json module's for the same text.
            raise InvalidJSONError(
                f"the request body is not valid JSON: {error.msg} at {position}"
            ) from None
        # Beyond orjson's limit of 1024 levels or the json module's. Parsed
        # again without what lies below 65 levels, so that the error still
        # names the path and the caller can read the JSON-RPC id.
        try:
            document = _load_lenient(body, cut=True)
        except (ValueError, RecursionError):
            problem = f"{depth_problem()} (stopped at {position})"
            raise InvalidJSONError(
                f"the request body is invalid: {problem}",
                field="(body)",
                problem=problem,
            ) from None
    _reject_too_deep(_cleaned(_without_rejected(document)))
    found = _first_invalid(document, ())
    if found is None:
        return document

    path, invalid = found
    field = ".".join(path) or "(body)"
    secret = is_secret is not None and any(is_secret(part) for part in path)
    shown, problem = _describe(invalid, secret)
    problem += f" (near {position})"
    raise InvalidJSONError(
        f"the request body is not valid JSON: {field}: {problem}",
        field=field,
        value=shown,
        problem=problem,
        document=_cleaned(_without_rejected(document)),
        lenient=True,
    )


def _load_lenient(text: str, *, cut: bool) -> Any:
    """Parse `text` with the json module, keeping rejected numbers as
    `_Rejected`. With `cut`, each object or array deeper than
    `MAX_JSON_DEPTH` levels is first replaced by `[]`, which `too_deep`
    still finds at the same path."""
    if cut:
        text = _cut_too_deep(text)
    return json.loads(text, parse_float=_parse_float, parse_constant=_Rejected)


# A JSON string, or one bracket or brace outside any string.
_STRING_OR_BRACKET = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


def _cut_too_deep(text: str) -> str:
    """Return `text` with each object or array at level `MAX_JSON_DEPTH + 1`
    replaced by `[]`. Brackets of invalid JSON are counted all the same, so
    the result may still be invalid."""
    kept: list[str] = []
    depth = 0
    kept_until = 0
    cut_from = 0
    for match in _STRING_OR_BRACKET.finditer(text):
        token = match.group()
        if token in ("[", "{"):
            depth += 1
            if depth == MAX_JSON_DEPTH + 1:
                cut_from = match.start()
        elif token in ("]", "}"):
            depth -= 1
            if depth == MAX_JSON_DEPTH:
                kept.append(text[kept_until:cut_from])
                kept.append("[]")
                kept_until = match.end()
    kept.append(text[kept_until:])
    return "".join(kept)


def _describe(invalid: _Rejected | str, secret: bool) -> tuple[str, str]:
    """Return the offending value as shown to the client, and what is wrong
    with it and how to fix it."""
    if isinstance(invalid, _Rejected):
        shown = _MASK if secret else invalid.text
        if invalid.text in ("NaN", "Infinity", "-Infinity"):
            problem = f"{shown} is not a JSON number (JSON has no NaN or Infinity)"
        else:
            problem = f"{shown} is beyond the range of a double"
        return shown, f"{problem}; send a finite number within ±1.8e308, or a string"
    shown = _MASK if secret else _shown_string(invalid)
    return shown, (
        f"{shown} contains a lone UTF-16 surrogate escape, which is not a "
        "character and cannot be stored as UTF-8; send both halves of a "
        "surrogate pair, or the character itself"
    )


def _parse_float(text: str) -> float | _Rejected:
    number = float(text)
    return number if math.isfinite(number) else _Rejected(text)


def _first_invalid(
    value: Any, path: tuple[str, ...]
) -> tuple[tuple[str, ...], _Rejected | str] | None:
    """Find the first rejected number or string with a lone surrogate, as
    the path to it and the offending value (a key counts as a value)."""
    if isinstance(value, _Rejected):
        return path, value
    if isinstance(value, str):
        return (path, value) if _LONE_SURROGATE.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            if _LONE_SURROGATE.search(key):
                return (*path, _shown_string(key)), key
            found = _first_invalid(item, (*path, key))
            if found is not None:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _first_invalid(item, (*path, str(index)))
            if found is not None:
                return found
    return None


def _without_rejected(value: Any) -> Any:
    if isinstance(value, _Rejected):
        return None
    if isinstance(value, dict):
        return {key: _without_rejected(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_rejected(item) for item in value]
    return value


def _shown_string(text: str) -> str:
    """Return `text` as a JSON string literal with non-ASCII escaped, so a
    lone surrogate shows as the escape the client sent."""
    shown = json.dumps(text[:_SHOWN_VALUE_CHARACTERS])
    if len(text) > _SHOWN_VALUE_CHARACTERS:
        shown += f" (first {_SHOWN_VALUE_CHARACTERS} characters)"
    return shown


def format_shown_value(value: Any) -> str:
    """Return `value` as an error shows it: JSON's true, false and null,
    which the caller wrote, in place of Python's True, False and None."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return repr(value)


def json_type(value: Any) -> str:
    """Return the JSON type name of a value parsed from JSON."""
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"
