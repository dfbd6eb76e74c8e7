"""Checks of a workflow definition; every message names the step at fault.

Pure functions over the contract models, used by `workflow_create` and again
by `FlowNexusWorkflow`, which can be started from outside with any snapshot.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from pydantic import ValidationError

from app.contracts.swarm import AGENT_TYPES
from app.contracts.workflows import (
    MAX_RETRY_ATTEMPTS,
    MAX_STEP_TIMEOUT_SECONDS,
    SECRET_PARAMS,
    StepSpec,
    WorkflowDefinition,
)
from app.services.audit import is_secret_name
from app.workflows.templates import TemplateError, find_references, unclosed_reference

_STEP_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\- ]{0,99}$")
# Five fields (minute hour day month weekday) or a predefined @ descriptor.
_CRON_DESCRIPTORS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@hourly"}
_MONTHS = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN"]
_MONTHS += ["JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]
_WEEKDAYS = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"]
# (field name, lowest, highest, names for lowest, lowest+1, ...); the ranges
# are the Temporal server's, which also takes 7 for Sunday.
_CRON_FIELDS: list[tuple[str, int, int, list[str]]] = [
    ("minute", 0, 59, []),
    ("hour", 0, 23, []),
    ("day-of-month", 1, 31, []),
    ("month", 1, 12, _MONTHS),
    ("day-of-week", 0, 7, _WEEKDAYS),
]
_CRON_ITEM = re.compile(r"^(?:(\*)|(\w+)(?:-(\w+))?)(?:/(\w+))?$")


# The maximum number of days of each month; February has 29 in leap years.
_DAYS_IN_MONTH = [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]


class DefinitionError(ValueError):
    """A definition that cannot run; `problems` lists every reason."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid workflow definition: " + "; ".join(problems))
        self.problems = problems


def topological_order(steps: Iterable[StepSpec]) -> list[str]:
    """Return step names so that each comes after its dependencies, keeping the
    definition's order among independent steps.

    Raises:
        DefinitionError: the dependencies contain a cycle.
    """
    steps = list(steps)
    remaining = {s.name: set(s.depends_on) for s in steps}
    order: list[str] = []
    while remaining:
        ready = [s.name for s in steps if s.name in remaining and not remaining[s.name]]
        if not ready:
            cycle = _find_cycle({n: sorted(d) for n, d in remaining.items()})
            raise DefinitionError(
                [
                    f"steps {' -> '.join(cycle)} form a dependency cycle; remove "
                    "one of these depends_on entries"
                ]
            )
        for name in ready:
            order.append(name)
            del remaining[name]
        for deps in remaining.values():
            deps.difference_update(ready)
    return order


def _find_cycle(graph: dict[str, list[str]]) -> list[str]:
    for start in graph:
        path = [start]
        seen = {start}
        current = start
        while graph.get(current):
            current = graph[current][0]
            if current in seen:
                return [*path[path.index(current) :], current]
            path.append(current)
            seen.add(current)
    return sorted(graph)


def ancestors(steps: Iterable[StepSpec]) -> dict[str, set[str]]:
    """Return each step's transitive dependencies (the definition must be
    acyclic)."""
    by_name = {s.name: s for s in steps}
    result: dict[str, set[str]] = {}
    for name in topological_order(by_name.values()):
        found: set[str] = set()
        for dependency in by_name[name].depends_on:
            found.add(dependency)
            found |= result[dependency]
        result[name] = found
    return result


def validate_definition(
    definition: WorkflowDefinition, known_types: Iterable[str]
) -> None:
    """Check names, types, limits, dependencies, cycles and templates.

    Raises:
        DefinitionError: with one message per problem found.
    """
    known = set(known_types)
    problems: list[str] = []
    names: set[str] = set()
    for step in definition.steps:
        label = f"step {step.name!r}"
        if not _STEP_NAME.match(step.name):
            problems.append(
                f"{label}: invalid name; use 1-100 letters, digits, '_', '-' or "
                "spaces, starting with a letter, digit or '_'"
            )
        if step.name in names:
            problems.append(f"{label}: duplicate step name; give each step its own")
        names.add(step.name)
        if step.type not in known:
            problems.append(
                f"{label}: unknown step type {step.type!r}; use one of "
                f"{', '.join(sorted(known))}"
            )
        if not 0 < step.timeout <= MAX_STEP_TIMEOUT_SECONDS:
            problems.append(
                f"{label}: invalid timeout {step.timeout!r}; use seconds greater "
                f"than 0 and at most {MAX_STEP_TIMEOUT_SECONDS:g}"
            )
        if not 0 <= step.retry_attempts <= MAX_RETRY_ATTEMPTS:
            problems.append(
                f"{label}: invalid retry_attempts {step.retry_attempts!r}; use "
                f"0 to {MAX_RETRY_ATTEMPTS} retries after the first attempt"
            )
    for step in definition.steps:
        # Each listed step once, so a repeated entry is reported once below
        # and not again as unknown or as the step itself.
        for dependency in dict.fromkeys(step.depends_on):
            if dependency not in names:
                problems.append(
                    f"step {step.name!r}: depends_on names unknown step {dependency!r}"
                )
            elif dependency == step.name:
                problems.append(
                    f"step {step.name!r}: depends on itself; remove "
                    f"{step.name!r} from its depends_on"
                )
        repeated = [
            d for d in dict.fromkeys(step.depends_on) if step.depends_on.count(d) > 1
        ]
        if repeated:
            problems.append(
                f"step {step.name!r}: depends_on lists "
                f"{', '.join(repr(d) for d in repeated)} more than once; list each "
                "step once"
            )
    for index, trigger in enumerate(definition.triggers):
        if trigger.type == "schedule":
            problems += _check_cron(index, trigger.cron)
    if problems:
        # The references are checked too, so that one reply lists every
        # problem; which steps are upstream is known only without a broken
        # dependency.
        try:
            upstream: dict[str, set[str]] | None = ancestors(definition.steps)
        except (DefinitionError, KeyError):
            upstream = None
        raise DefinitionError(
            problems
            + _cycle_problems(definition.steps, names)
            + _reference_problems(definition.steps, names, upstream)
        )
    upstream = ancestors(definition.steps)  # raises on a cycle
    problems = _reference_problems(definition.steps, names, upstream)
    if problems:
        raise DefinitionError(problems)


def _cycle_problems(steps: Iterable[StepSpec], names: set[str]) -> list[str]:
    """Return the cycle among the known dependencies, if any. Unknown steps
    and self-dependencies are left out, since they have their own problems."""
    known = [
        step.model_copy(
            update={
                "depends_on": [
                    d
                    for d in dict.fromkeys(step.depends_on)
                    if d in names and d != step.name
                ]
            }
        )
        for step in {s.name: s for s in steps}.values()
    ]
    try:
        topological_order(known)
    except DefinitionError as error:
        return error.problems
    return []


def _reference_problems(
    steps: Iterable[StepSpec],
    names: set[str],
    upstream: dict[str, set[str]] | None,
) -> list[str]:
    """Return the problems of the `{{...}}` references in the steps' params:
    malformed ones, unknown steps, and, where `upstream` is known, steps
    that are not upstream."""
    problems: list[str] = []
    for step in steps:
        try:
            references = find_references(step.params)
        except TemplateError as error:
            problems.append(f"step {step.name!r}: {_template_problem(step, error)}")
            continue
        for reference in references:
            if reference.step is None:
                continue
            if reference.step not in names:
                problems.append(
                    f"step {step.name!r}: {{{{{reference.text}}}}} names unknown "
                    f"step {reference.step!r}"
                )
            elif reference.step == step.name:
                problems.append(
                    f"step {step.name!r}: {{{{{reference.text}}}}} names the step "
                    "itself, whose output does not exist while it runs; take the "
                    "value from an upstream step or from {{input.FIELD}}"
                )
            elif upstream is not None and reference.step not in upstream.get(
                step.name, set()
            ):
                problems.append(
                    f"step {step.name!r}: {{{{{reference.text}}}}} names step "
                    f"{reference.step!r}, which is not upstream; add it to "
                    "depends_on (directly or through another step)"
                )
    return problems


def _check_cron(index: int, cron: str | None) -> list[str]:
    label = f"triggers.{index}.cron"
    if not cron:
        return [f"{label}: a schedule trigger needs cron, e.g. '0 * * * *'"]
    if cron.strip() in _CRON_DESCRIPTORS:
        return []
    if len(cron.split()) != 5:
        return [
            f"{label}: invalid cron {cron!r}; use five fields "
            "(minute hour day-of-month month day-of-week), e.g. '*/5 * * * *'"
        ]
    return []


def check_cron_fields(definition: WorkflowDefinition) -> None:
    """Check every field of each schedule trigger's cron, as the Temporal
    server would, so that a bad cron is rejected before anything is stored.

    Kept out of `validate_definition`: schedules are made only by
    `workflow_create`, and a run must not start failing on a cron that an
    earlier, more lenient check let through.

    Raises:
        DefinitionError: with one message per invalid field.
    """
    problems: list[str] = []
    for index, trigger in enumerate(definition.triggers):
        cron = trigger.cron
        if trigger.type != "schedule" or not cron:
            continue
        fields = cron.split()
        if cron.strip() in _CRON_DESCRIPTORS or len(fields) != 5:
            continue  # validate_definition reports a wrong field count
        found = len(problems)
        for text, (field, low, high, names) in zip(fields, _CRON_FIELDS, strict=True):
            reason = _cron_field_problem(text, low, high, names)
            if reason:
                allowed = f"{low}-{high}"
                if names:
                    allowed += f" or {names[0]}-{names[-1]}"
                problems.append(
                    f"triggers.{index}.cron: invalid {field} {text!r} in {cron!r} "
                    f"({reason}); use *, a value in {allowed}, a range A-B, a "
                    "step */N or A-B/N, or a comma-separated list of these"
                )
        if len(problems) == found:
            problems += _never_fires(index, cron, fields[2], fields[3])
    if problems:
        raise DefinitionError(problems)


def _never_fires(index: int, cron: str, days_text: str, months_text: str) -> list[str]:
    """Return a problem when no listed month has any listed day of the month,
    such as 31 February. The Temporal server accepts that schedule, but it
    never starts a run. The day of the week cannot help, because the server
    matches a time only when both the day of the month and the day of the
    week match."""
    days = _cron_values(days_text, *_CRON_FIELDS[2][1:])
    months = _cron_values(months_text, *_CRON_FIELDS[3][1:])
    if any(min(days) <= _DAYS_IN_MONTH[month - 1] for month in months):
        return []
    lengths = ", ".join(
        f"{_MONTHS[month - 1]}: {_DAYS_IN_MONTH[month - 1]} days"
        for month in sorted(months)
    )
    return [
        f"triggers.{index}.cron: {cron!r} never fires, because day-of-month "
        f"{days_text!r} is past the last day of every listed month ({lengths}); "
        "use a day-of-month that one of these months has, or other months"
    ]


def _cron_values(text: str, low: int, high: int, names: list[str]) -> set[int]:
    """Return the values that one valid cron field matches."""

    def value(token: str) -> int:
        return int(token) if token.isdigit() else low + names.index(token.upper())

    values: set[int] = set()
    for item in text.split(","):
        match = _CRON_ITEM.match(item)
        assert match is not None  # checked by _cron_field_problem
        star, start, end, step = match.groups()
        first = low if star else value(start)
        # "A/N" runs from A to the field's highest value, as "A-high/N".
        last = high if star or (end is None and step) else value(end or start)
        values.update(range(first, last + 1, int(step or 1)))
    return values


def _cron_field_problem(text: str, low: int, high: int, names: list[str]) -> str:
    """Return why one cron field is invalid, or "" when it is valid."""

    def value(token: str) -> int | None:
        if token.isdigit():
            number = int(token)
            return number if low <= number <= high else None
        upper = token.upper()
        return low + names.index(upper) if upper in names else None

    for item in text.split(","):
        match = _CRON_ITEM.match(item)
        if not match:
            return f"{item!r} is not *, a value, a range or a step"
        star, start, end, step = match.groups()
        if step is not None and not (step.isdigit() and int(step) >= 1):
            return f"step {step!r} must be a whole number of at least 1"
        if star:
            continue
        first = value(start)
        if first is None:
            return f"{start!r} is outside {low}-{high}"
        if end is not None:
            last = value(end)
            if last is None:
                return f"{end!r} is outside {low}-{high}"
            if last < first:
                return f"range {start}-{end} ends before it starts"
    return ""


def workflow_name_problems(name: str) -> list[str]:
    """Return why a definition name is invalid: one message, or none when it
    is printable and not padded with spaces. The model checks its length
    (1-200).

    Kept out of `validate_definition`, so that recorded runs still replay.
    """
    reason = ""
    if not name.strip():
        reason = "it is blank"
    else:
        for position, character in enumerate(name):
            if not character.isprintable():
                reason = (
                    f"character {character!r} at position {position} is not printable"
                )
                break
    if not reason and name != name.strip():
        reason = "it starts or ends with a space"
    if not reason:
        return []
    return [
        f"name: invalid workflow name {name!r} ({reason}); use 1-200 printable "
        "characters, without tabs, newlines or other control characters, that "
        "do not start or end with a space"
    ]


def check_step_params(definition: WorkflowDefinition) -> None:
    """Check what a step would otherwise reject only when it runs: each step's
    params against its type's params model, unclosed references, and the
    agent_type.

    A params field whose value contains a reference such as `{{input.FIELD}}`
    is checked when the step runs, once the reference is filled in. Every
    other field is checked here. Kept out of `validate_definition`, so that
    recorded runs still replay.

    Raises:
        DefinitionError: with one message per invalid field.
    """
    from app.workflows.steps import get_step_type

    problems: list[str] = []
    for step in definition.steps:
        label = f"step {step.name!r}"
        if step.agent_type is not None and step.agent_type not in AGENT_TYPES:
            problems.append(agent_type_problem(label, step.agent_type))
        unclosed = unclosed_reference(step.params)
        if unclosed is not None:
            path, text = unclosed
            quoted = "the value" if _is_secret_path(path) else repr(text)
            problems.append(
                f"{label}: params.{path}: {quoted} opens a reference with '{{{{' "
                "that is never closed; end it with '}}', e.g. "
                "'{{steps.NAME.output.FIELD}}'"
            )
            continue
        step_type = get_step_type(step.type)
        if step_type is None or not step_type.available:
            continue
        try:
            if any(find_references(key) for key in step.params):
                continue  # a templated key: nothing to check before the run
        except TemplateError:
            continue  # validate_definition reports it
        try:
            step_type.params_model.model_validate(step.params)
        except ValidationError as error:
            for item in error.errors(include_url=False):
                if item["loc"] and _reference_on_path(step.params, item["loc"]):
                    continue
                where = ".".join(["params", *(str(part) for part in item["loc"])])
                problems.append(
                    f"{label}: {where}: {_message(item)}{_shown(item)} "
                    f"(step type {step.type})"
                )
    if problems:
        raise DefinitionError(problems)


def _reference_on_path(params: dict[str, Any], loc: tuple[Any, ...]) -> bool:
    """Return whether a reference fills in the value at `loc` or a value that
    contains it, so that only the run can check it. A reference elsewhere in
    the same dict, such as another env var, does not count."""
    current: Any = params
    for part in loc:
        if isinstance(part, str) and _has_reference(part):
            return True
        found = (isinstance(current, dict) and part in current) or (
            isinstance(current, list) and isinstance(part, int) and part < len(current)
        )
        if not found:
            return False
        current = current[part]
        if isinstance(current, str) and _has_reference(current):
            return True
    return False


def _has_reference(text: str) -> bool:
    try:
        return bool(find_references(text))
    except TemplateError:
        return False  # validate_definition reports it


def _is_secret_path(path: str) -> bool:
    """Return whether a dotted params path is inside a secret param, whose
    values an error message must not show."""
    return path.split(".", 1)[0] in SECRET_PARAMS


def _template_problem(step: StepSpec, error: TemplateError) -> str:
    """Return the message of a malformed reference, without the reference's
    text when it is in a secret param's value."""
    public = {k: v for k, v in step.params.items() if k not in SECRET_PARAMS}
    try:
        find_references(public)
    except TemplateError:
        return str(error)
    names = ", ".join(k for k in step.params if k in SECRET_PARAMS)
    return (
        f"params.{names}: a value contains an invalid reference (the value is "
        "not shown, since it may be a secret); use {{input.FIELD}} or "
        "{{steps.NAME.output.FIELD}}"
    )


def describe_input_errors(error: ValidationError) -> list[str]:
    """Return one message per field of a model that rejected its input, e.g.
    "definition.priority: Input should be less than or equal to 10, got 99"."""
    return [
        f"{'.'.join(str(part) for part in item['loc']) or 'input'}: "
        f"{_message(item)}{_shown(item)}"
        for item in error.errors(include_url=False)
    ]


def _message(item: Any) -> str:
    # pydantic puts "Value error, " before a validator's own message.
    return str(item["msg"]).removeprefix("Value error, ")


def _shown(item: Any) -> str:
    """Return ", got VALUE" for a short scalar input; never for env_vars, whose
    values may be secrets, or a field whose name marks a secret."""
    value = item.get("input")
    secret = any(
        part in SECRET_PARAMS or (isinstance(part, str) and is_secret_name(part))
        for part in item["loc"]
    )
    if secret or not isinstance(value, str | int | float):
        return ""
    text = repr(value)
    if len(text) > 80 or text in item["msg"]:
        return ""
    return f", got {text}"


def agent_type_problem(label: str, agent_type: str) -> str:
    """Return the message for an agent_type that no swarm agent can have."""
    return (
        f"{label}: unknown agent_type {agent_type!r}; use one of "
        f"{', '.join(AGENT_TYPES)}"
    )
