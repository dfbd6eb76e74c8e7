"""Reject JSON booleans given for number fields of tool arguments.

Pydantic's lax mode, which the tool input models use, reads `true` as 1 for
an int field and as 1.0 for a float field. A boolean there is a type error
in the request, so it is found here before the model validates the
arguments. Floats still accept integers, as JSON has one number type.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel
from pydantic_core import InitErrorDetails

_NUMBERS = {int: "int_type", float: "float_type"}


def boolean_number_errors(
    model: type[BaseModel], arguments: Mapping[str, Any]
) -> list[InitErrorDetails]:
    """Return a pydantic `int_type` or `float_type` error for each boolean
    given for a number field of `model`, at any depth of nested models,
    lists and dicts."""
    errors: list[InitErrorDetails] = []
    _check_model(model, arguments, (), errors)
    return errors


def _check_model(
    model: type[BaseModel],
    arguments: Mapping[str, Any],
    loc: tuple[int | str, ...],
    errors: list[InitErrorDetails],
) -> None:
    for key, value in arguments.items():
        info = model.model_fields.get(key)
        if info is None:
            info = next(
                (f for f in model.model_fields.values() if f.alias == key), None
            )
        if info is not None:
            _check_value(info.annotation, value, (*loc, key), errors)


def _check_value(
    annotation: Any,
    value: Any,
    loc: tuple[int | str, ...],
    errors: list[InitErrorDetails],
) -> None:
    members = _union_members(annotation)
    if isinstance(value, bool):
        if bool in members or typing.Any in members:
            return
        number = next((_NUMBERS[m] for m in members if m in _NUMBERS), None)
        if number is not None:
            errors.append({"type": number, "loc": loc, "input": value})
        return
    for member in members:
        origin = typing.get_origin(member) or member
        parameters = typing.get_args(member)
        is_model = isinstance(member, type) and issubclass(member, BaseModel)
        if is_model and isinstance(value, Mapping):
            _check_model(member, value, loc, errors)
            return
        is_collection = origin in (list, tuple, set, frozenset) and parameters
        if is_collection and isinstance(value, list):
            for index, item in enumerate(value):
                _check_value(_item_type(member, index), item, (*loc, index), errors)
            return
        if origin is dict and len(parameters) == 2 and isinstance(value, Mapping):
            for key, item in value.items():
                _check_value(parameters[1], item, (*loc, str(key)), errors)
            return


def _item_type(annotation: Any, index: int) -> Any:
    """Return the type of item `index` of a list, set or tuple annotation."""
    origin = typing.get_origin(annotation)
    parameters = typing.get_args(annotation)
    if origin is tuple and parameters[-1] is not Ellipsis:
        return parameters[index] if index < len(parameters) else typing.Any
    return parameters[0]


def _union_members(annotation: Any) -> list[Any]:
    """Return the types a field accepts: the members of a union, with
    `Annotated` metadata removed."""
    if typing.get_origin(annotation) is typing.Annotated:
        return _union_members(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members: list[Any] = []
        for argument in typing.get_args(annotation):
            members += _union_members(argument)
        return members
    return [annotation]
