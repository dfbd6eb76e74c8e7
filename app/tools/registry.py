"""Tool declarations, input validation, invocation and auditing."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
import secrets
import time
import typing
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError
from temporalio.client import Client

from app.db.engine import unreachable_database_message
from app.jsonsafe import MAX_JSON_DEPTH, depth_problem, dumps, format_shown_value
from app.services.audit import is_secret_name, mask_all, mask_secrets, record_call
from app.services.audit_writer import AuditWriter, installed_writer
from app.services.health_cache import HealthSnapshots
from app.settings import Settings
from app.suggest import did_you_mean
from app.temporal.client import connect
from app.tools.numbers import boolean_number_errors

logger = logging.getLogger(__name__)

ErrorKind = Literal[
    "invalid_argument", "not_found", "forbidden", "unavailable", "conflict", "failed"
]


class ToolError(Exception):
    """A tool call that failed; its message names what failed, the value and the fix.

    Attributes:
        kind: a coarse class that the HTTP API maps to a status code.
    """

    def __init__(self, message: str, *, kind: ErrorKind = "failed") -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind


class ToolInputError(ToolError):
    """Arguments that do not match the tool's input model."""

    def __init__(
        self,
        message: str,
        errors: list[dict[str, Any]],
        lines: list[str] | None = None,
    ) -> None:
        super().__init__(message, kind="invalid_argument")
        self.errors = errors
        # The message's part for each error, in order, for merging two.
        self.lines = lines if lines is not None else [message]


@dataclass
class ToolContext:
    """Who is calling, and the connections a tool may need.

    Attributes:
        audit_writer: where a long-running server queues audit events; None
            writes each event before the call returns.
        health_snapshots: the server's shared `system_health` reading; None
            reads live on every call.
    """

    settings: Settings
    user_id: str = "local"
    key_id: str | None = None
    # The tool groups the caller's key may call; None for every group.
    groups: tuple[str, ...] | None = None
    temporal_client: Client | None = None
    _connect_lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    audit_writer: AuditWriter | None = None
    health_snapshots: HealthSnapshots | None = None

    @property
    def database_url(self) -> str:
        return self.settings.effective_database_url

    async def client(self) -> Client:
        """Return the Temporal client, connecting on first use.

        Raises:
            ToolError: Temporal is unreachable (kind "unavailable").
        """
        async with self._connect_lock:
            if self.temporal_client is None:
                try:
                    self.temporal_client = await connect(self.settings)
                except RuntimeError as error:
                    raise ToolError(str(error), kind="unavailable") from error
            return self.temporal_client

    async def optional_client(self) -> Client | None:
        try:
            return await self.client()
        except ToolError:
            return None


Handler = Callable[[ToolContext, Any], Awaitable[BaseModel]]


@dataclass(frozen=True)
class ToolSpec:
    name: str
    group: str
    description: str
    input_model: type[BaseModel]
    result_model: type[BaseModel]
    handler: Handler


_registry: dict[str, ToolSpec] = {}


def tool(name: str, *, group: str) -> Callable[[Handler], Handler]:
    """Register an async handler `(ctx, args: InputModel) -> ResultModel` as a tool.

    The input and result models come from the handler's annotations, and the
    description from its docstring, which MCP clients show to an LLM.
    """

    def register(handler: Handler) -> Handler:
        hints = typing.get_type_hints(handler)
        input_model = hints.get("args")
        result_model = hints.get("return")
        if not (isinstance(input_model, type) and issubclass(input_model, BaseModel)):
            raise TypeError(f"tool {name}: the `args` parameter needs a pydantic model")
        if not (isinstance(result_model, type) and issubclass(result_model, BaseModel)):
            raise TypeError(
                f"tool {name}: the return annotation needs a pydantic model"
            )
        if name in _registry:
            raise ValueError(f"tool {name} is registered twice")
        _registry[name] = ToolSpec(
            name=name,
            group=group,
            description=inspect.cleandoc(handler.__doc__ or name),
            input_model=input_model,
            result_model=result_model,
            handler=handler,
        )
        return handler

    return register


def get_tool(name: str) -> ToolSpec:
    try:
        return _registry[name]
    except KeyError:
        hint = did_you_mean(name, _registry)
        # Cut like any invalid value, since the name is the caller's input.
        shown_name = brief_value(name)
        raise ToolError(
            f"unknown tool {shown_name!r}{hint}; list the tools with `nexus tools`",
            kind="not_found",
        ) from None


def known_tool(name: str) -> ToolSpec | None:
    """Return the tool registered as `name`, or None."""
    return _registry.get(name)


def all_tools() -> list[ToolSpec]:
    return sorted(_registry.values(), key=lambda spec: (spec.group, spec.name))


@functools.cache
def secret_fields(model: type[BaseModel]) -> frozenset[str]:
    """Names and aliases of the fields a tool marks secret with
    `Field(json_schema_extra={"secret": True})`."""
    names: set[str] = set()
    for field_name, info in model.model_fields.items():
        extra = info.json_schema_extra
        if isinstance(extra, dict) and extra.get("secret") is True:
            names.add(field_name)
            if info.alias:
                names.add(info.alias)
    return frozenset(names)


def mask_arguments(
    arguments: Mapping[str, Any], marked: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """Mask the secret values of tool arguments: the fields the tool marks
    secret and every argument `mask_secrets` treats as one.

    Strings stay whole: the audit log cuts them when it stores the event,
    and an error cuts the value it shows, each once with the true count.
    """
    return {
        str(key): mask_all(value)
        if key in marked
        else mask_secrets(value, name=key, string_limit=None)
        for key, value in arguments.items()
    }


def masked_input(
    loc: tuple[int | str, ...], value: Any, marked: frozenset[str] = frozenset()
) -> Any:
    """Return the input of one validation error, fit to show.

    The input is masked whole when any part of its location is a secret
    field (an env var map, a key), else only its secret-named parts are.
    """
    if any(
        isinstance(part, str) and (part in marked or is_secret_name(part))
        for part in loc
    ):
        return mask_all(value)
    if not loc and isinstance(value, Mapping):
        return mask_arguments(value, marked)
    last = loc[-1] if loc and isinstance(loc[-1], str) else ""
    return mask_secrets(value, name=last, string_limit=None)


# The pydantic error type of a rule across arguments; see `arguments_error`.
ARGUMENTS_ERROR = "invalid_arguments"


def arguments_error(message: str, *fields: str) -> PydanticCustomError:
    """Build the error a model validator raises for a rule across arguments.

    `describe_validation_error` reports it under the named fields with only
    their given values, where a plain ValueError from a model validator would
    be reported against the whole argument dict.

    Args:
        message: what is wrong and the fix. Braces around a name are
            placeholders for pydantic, so the message must not contain
            `{fields}`.
        fields: the fields the rule involves, by field name.
    """
    return PydanticCustomError(ARGUMENTS_ERROR, message, {"fields": fields})


def _reject_unencodable_values(
    tool_name: str, arguments: Mapping[str, Any], marked: frozenset[str]
) -> None:
    """Reject an argument, at any depth, that JSON cannot carry: a string
    with a lone UTF-16 surrogate, or a NaN or infinite float; and objects
    and arrays nested deeper than `MAX_JSON_DEPTH` levels.

    JSON can encode a lone surrogate (`"\\ud800"`) and Python decodes it, but
    it is not valid Unicode text, so the call would fail later at an
    unexpected spot, such as encoding a Temporal payload. The JSON parsers
    of `nexus call` and of MCP over stdio accept `NaN` and `Infinity`. The
    input models' float fields reject them, but free-form objects and lists
    (a step's `params`, an inline `dataset`) are not typed, and their
    results would show such a value as null.

    Raises:
        ToolInputError: naming the first such argument and its value.
    """
    pending: list[tuple[tuple[int | str, ...], Any]] = [((), arguments)]
    while pending:
        loc, value = pending.pop(0)
        if isinstance(value, Mapping | list | tuple) and len(loc) >= MAX_JSON_DEPTH:
            path = ".".join(str(part) for part in loc)
            message = depth_problem()
            raise ToolInputError(
                f"invalid arguments for {tool_name}: {path}: {message}",
                [{"field": path, "value": None, "message": message}],
            )
        if isinstance(value, Mapping):
            pending += [((*loc, str(key)), item) for key, item in value.items()]
        elif isinstance(value, list | tuple):
            pending += [((*loc, index), item) for index, item in enumerate(value)]
        elif isinstance(value, float) and not math.isfinite(value):
            path = ".".join(str(part) for part in loc)
            shown_value = _jsonable(masked_input(loc, value, marked))
            message = (
                "Input should be a finite number: JSON has no NaN or Infinity; "
                "send a finite number within ±1.8e308"
            )
            raise ToolInputError(
                f"invalid arguments for {tool_name}: {path}: {shown_value!r} is "
                f"invalid: {message}",
                [{"field": path, "value": shown_value, "message": message}],
            )
        elif isinstance(value, str):
            try:
                value.encode()
            except UnicodeEncodeError as error:
                path = ".".join(str(part) for part in loc)
                # The masked value is valid JSON, with U+FFFD for the
                # surrogate, so the message names the surrogate by its escape.
                masked = brief_value(masked_input(loc, value, marked))
                message = (
                    f"it contains the lone UTF-16 surrogate "
                    f"{value[error.start]!r} at character {error.start}, which "
                    "is not valid Unicode text; send valid UTF-8 text"
                )
                raise ToolInputError(
                    f"invalid arguments for {tool_name}: {path}: {masked!r} is "
                    f"invalid: {message}",
                    [{"field": path, "value": masked, "message": message}],
                ) from None


def _validate_arguments(name: str, spec: ToolSpec, raw: dict[str, Any]) -> Any:
    """Return the tool's input model for `raw`.

    Raises:
        ToolInputError: naming every invalid field: the booleans given for
            numbers, which pydantic would take as 0 and 1, and the model's
            own errors on the other fields.
    """
    marked = secret_fields(spec.input_model)
    booleans = boolean_number_errors(spec.input_model, raw)
    invalid: ToolInputError | None
    try:
        args = spec.input_model.model_validate(raw)
    except ValidationError as error:
        invalid = describe_validation_error(name, error, marked, model=spec.input_model)
        if not booleans:
            raise invalid from None
    else:
        if not booleans:
            return args
        invalid = None
    found = describe_validation_error(
        name,
        ValidationError.from_exception_data(spec.input_model.__name__, booleans),
        marked,
        model=spec.input_model,
    )
    if invalid is None:
        raise found
    # Both lists, each field once, the boolean's error first.
    named = {detail["field"] for detail in found.errors}
    lines, details = list(found.lines), list(found.errors)
    for detail, line in zip(invalid.errors, invalid.lines, strict=False):
        if detail["field"] not in named:
            details.append(detail)
            lines.append(line)
    raise ToolInputError(f"invalid arguments for {name}: " + "; ".join(lines), details)


def describe_validation_error(
    tool_name: str,
    error: ValidationError,
    marked: frozenset[str] = frozenset(),
    *,
    prefix: tuple[str, ...] = (),
    model: type[BaseModel] | None = None,
) -> ToolInputError:
    """Turn pydantic's errors into one message naming each field, value and
    rule; values of secret fields are masked there and in the details.

    Args:
        prefix: the location of the validated value among the tool's
            arguments, put in front of each field path (`action_args` for
            the arguments of a swarm action).
        model: the validated model, whose field names and aliases are
            suggested for an unknown argument.
    """
    details: list[dict[str, Any]] = []
    lines: list[str] = []
    for item in error.errors(include_url=False):
        loc = tuple(item["loc"])
        # pydantic puts "Value error, " before a validator's own message.
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == ARGUMENTS_ERROR:
            fields = tuple(item.get("ctx", {}).get("fields", ()))
            path = ", ".join(
                ".".join(str(part) for part in (*prefix, *loc, name)) for name in fields
            )
            value = _given_values(item.get("input"), fields, loc, marked, model)
        else:
            path = ".".join(str(part) for part in (*prefix, *loc))
            value = masked_input(loc, item.get("input"), marked)
        path = path or "(arguments)"
        value = brief_value(value)
        if item["type"] == "missing":
            # Pydantic reports the object that lacks the field as its input,
            # so showing it would echo every other argument.
            value = None
            lines.append(f"{path} is required: the arguments have no {loc[-1]}")
        elif item["type"] == "extra_forbidden":
            message = _extra_field_message(model, loc, message)
            lines.append(f"{path}: {format_shown_value(value)} is invalid: {message}")
        elif value is None and item["type"] == ARGUMENTS_ERROR:
            lines.append(f"{path}: {message}")
        else:
            lines.append(f"{path}: {format_shown_value(value)} is invalid: {message}")
        details.append({"field": path, "value": _jsonable(value), "message": message})
    message = f"invalid arguments for {tool_name}: " + "; ".join(lines)
    return ToolInputError(message, details, lines)


# Maximum length of a value that an error repeats. A longer string is cut
# and a longer array or object is described, so a 1 MB argument is not
# echoed in the message, its details and the audit row.
_SHOWN_LIMIT = 1000


def brief_value(value: Any) -> Any:
    """Return `value` fit to repeat in an error: a string over
    `_SHOWN_LIMIT` characters cut with the count of characters cut, a long
    array or object described by its length and size."""
    if isinstance(value, str) and len(value) > _SHOWN_LIMIT:
        cut = len(value) - _SHOWN_LIMIT
        return f"{value[:_SHOWN_LIMIT]}... [{cut} more characters]"
    if isinstance(value, Mapping | list | tuple):
        size = len(dumps(value))
        if size > _SHOWN_LIMIT:
            if isinstance(value, Mapping):
                return f"(a JSON object of {len(value)} keys, {size} bytes)"
            return f"(a JSON array of {len(value)} items, {size} bytes)"
    return value


def _given_values(
    arguments: Any,
    fields: tuple[str, ...],
    loc: tuple[int | str, ...],
    marked: frozenset[str],
    model: type[BaseModel] | None,
) -> Any:
    """Return the values given for `fields`: the value of the one given field,
    a dict of several, or None when none was given."""
    if not isinstance(arguments, Mapping):
        return None
    target = _model_at(model, loc)
    given: dict[str, Any] = {}
    for name in fields:
        info = target.model_fields.get(name) if target else None
        for key in (name, *_spellings(info)):
            if key is not None and key in arguments:
                given[key] = masked_input((*loc, name), arguments[key], marked)
                break
    if not given:
        return None
    if len(given) == 1:
        return next(iter(given.values()))
    return given


def _spellings(info: FieldInfo | None) -> list[str]:
    """Return the other names a field accepts: its alias, or each string of
    its validation alias choices."""
    if info is None:
        return []
    names = [info.alias] if info.alias else []
    choices = info.validation_alias
    if isinstance(choices, str):
        names.append(choices)
    elif isinstance(choices, AliasChoices):
        names += [choice for choice in choices.choices if isinstance(choice, str)]
    return names


def _suggest_field(model: type[BaseModel] | None, loc: tuple[int | str, ...]) -> str:
    """Return "; did you mean NAME?" for an unknown argument at `loc`, naming
    the closest field or alias of the model that rejected it."""
    target = _model_at(model, loc[:-1])
    if target is None or not loc or not isinstance(loc[-1], str):
        return ""
    known = set(target.model_fields)
    known.update(info.alias for info in target.model_fields.values() if info.alias)
    return did_you_mean(loc[-1], known)


def _extra_field_message(
    model: type[BaseModel] | None, loc: tuple[int | str, ...], message: str
) -> str:
    """Explain an unknown argument at `loc`. A field name or alias is
    reported as unknown when the field's other spelling was also given, or
    when the model accepts only the alias."""
    target = _model_at(model, loc[:-1])
    name = loc[-1] if loc else None
    info = _field_named(target, name) if target and isinstance(name, str) else None
    if target is None or info is None or info.alias is None:
        return message + _suggest_field(model, loc)
    field_name = next(
        key for key, field in target.model_fields.items() if field is info
    )
    other = info.alias if name == field_name else field_name
    config = target.model_config
    by_name = config.get("populate_by_name") or config.get("validate_by_name")
    if name == field_name and not by_name:
        return f"{message}; send it as {other}"
    return (
        f"{name} and {other} are two spellings of one argument, and both were "
        "given; send only one"
    )


def _model_at(
    model: type[BaseModel] | None, loc: tuple[int | str, ...]
) -> type[BaseModel] | None:
    """Return the model validated at `loc` inside `model`, following nested
    model fields and list items. Return None where the path leaves models."""
    current = model
    for part in loc:
        if current is None:
            return None
        if isinstance(part, int):
            continue  # an item of a list field, whose model is already known
        info = _field_named(current, part)
        current = _model_in(info.annotation) if info else None
    return current


def _field_named(model: type[BaseModel], name: str) -> FieldInfo | None:
    """Return the field of `model` with this name or alias, or None."""
    if name in model.model_fields:
        return model.model_fields[name]
    for info in model.model_fields.values():
        if info.alias == name:
            return info
    return None


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """Return the model in a field's annotation (`M`, `M | None`, `list[M]`)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in typing.get_args(annotation):
        found = _model_in(argument)
        if found is not None:
            return found
    return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # "inf" or "nan": JSON has no such number
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, Mapping | list):
        return value
    return repr(value)


def _result_ids(result: Mapping[str, Any]) -> dict[str, str]:
    return {
        key: str(value)
        for key, value in result.items()
        if key.endswith("_id") and isinstance(value, str | int)
    }


async def invoke_tool(
    ctx: ToolContext, name: str, arguments: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Validate `arguments`, run the tool, audit the call and return its result.

    Raises:
        ToolInputError: the arguments do not match the tool's input model.
        ToolError: the tool failed; nothing reports success for it.
    """
    raw = dict(arguments or {})
    try:
        spec = get_tool(name)
    except ToolError as unknown:
        # Audited too: a key that probes for tool names leaves a trace.
        rejected = {
            "user_id": ctx.user_id,
            "key_id": ctx.key_id,
            "tool": name,
            "arguments": mask_arguments(raw),
            "outcome": "error",
            "duration_ms": 0.0,
            "error": unknown.message,
        }
        await _record(ctx, rejected, wait=True)
        raise
    started = time.perf_counter()
    outcome = "error"
    cancelled = False
    error_text: str | None = None
    result: dict[str, Any] = {}
    try:
        if ctx.groups is not None and spec.group not in ctx.groups:
            # The API checks a key's groups before it calls in here. This
            # check covers the calls that run for a key later, as workflow
            # steps and swarm actions, which must not do more than the key.
            allowed = ", ".join(ctx.groups) or "none"
            raise ToolError(
                f"{name} is in the tool group {spec.group}, and this call runs "
                f"for a key limited to the groups: {allowed}; run it with a "
                f"key that may call {spec.group} tools",
                kind="forbidden",
            )
        _reject_unencodable_values(name, raw, secret_fields(spec.input_model))
        args = _validate_arguments(name, spec, raw)
        model = await spec.handler(ctx, args)
        result = model.model_dump(mode="json", by_alias=True)
        outcome = "success"
        return result
    except ToolError as error:
        error_text = error.message
        raise
    except asyncio.CancelledError as stopped:
        # The caller stopped waiting, as a workflow step at its timeout or
        # a stopping worker does, and may have given the reason.
        error_text = f"{name} was cancelled before it finished"
        if stopped.args:
            error_text += f": {stopped.args[0]}"
        cancelled = True
        raise
    except Exception as error:
        # The exception's text can hold SQL, bound parameters (secrets) or
        # paths, so the caller and the audit row get its class and an id to
        # find it in the log. The engines hide bound parameters, so the
        # logged traceback carries the SQL but not the values.
        reference = secrets.token_hex(4)
        logger.exception("tool %s failed (error %s)", name, reference)
        error_text = (
            f"{name} failed with an unexpected {type(error).__name__}; retry "
            "the call, and if it fails again, find the traceback in the server "
            f"log under error {reference}"
        )
        raise ToolError(error_text) from error
    finally:
        duration = (time.perf_counter() - started) * 1000
        event: dict[str, Any] = {
            "user_id": ctx.user_id,
            "key_id": ctx.key_id,
            "tool": name,
            "arguments": mask_arguments(raw, secret_fields(spec.input_model)),
            "outcome": outcome,
            "duration_ms": duration,
            "error": error_text,
            "ids": _result_ids(result),
        }
        await _record(ctx, event, wait=not cancelled)


async def _record(ctx: ToolContext, event: dict[str, Any], *, wait: bool) -> None:
    """Write or queue one call's audit event; with `wait`, return once a
    queued event is committed.

    The event goes to the context's writer, else to the writer that a worker
    process installed with `queued_audit`, else straight to the database.
    """
    writer = ctx.audit_writer or installed_writer(ctx.database_url)
    try:
        if writer is not None:
            writer.submit(**event)
            if wait:
                # Responded to only once its row is stored, so that a server
                # killed after the response has not lost the row.
                await writer.committed()
        else:
            await asyncio.to_thread(record_call, ctx.database_url, **event)
    except Exception as error:
        if _no_audit_table(error):
            # A database that no command migrated yet, as `nexus health` on a
            # new data folder reports it.
            logger.warning(
                "audit event for tool %s not written: the database has no audit "
                "table yet; run `nexus db upgrade`",
                event["tool"],
            )
            return
        unreachable = await asyncio.to_thread(
            unreachable_database_message, ctx.database_url
        )
        if unreachable is not None:
            # One line per call while the database is down, not a traceback.
            logger.error(
                "audit event for tool %s not written: %s", event["tool"], unreachable
            )
            return
        # The call itself already ran; losing its audit row must be loud.
        logger.exception("could not write the audit event for tool %s", event["tool"])


def _no_audit_table(error: Exception) -> bool:
    text = str(getattr(error, "orig", error))
    return "audit_log" in text and ("no such table" in text or "does not exist" in text)
