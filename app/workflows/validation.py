"""Checks of a workflow definition; every message names the step at fault.

Pure functions over the contract models, used by `workflow_create` and again
by `FlowNexusWorkflow`, which can be started from outside with any snapshot.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from app.contracts.workflows import (
    MAX_RETRY_ATTEMPTS,
    MAX_STEP_TIMEOUT_SECONDS,
    StepSpec,
    WorkflowDefinition,
)
from app.workflows.templates import TemplateError, find_references

_STEP_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\- ]{0,99}$")
# Five fields (minute hour day month weekday) or a predefined @ descriptor.
_CRON_DESCRIPTORS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@hourly"}


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
        for dependency in step.depends_on:
            if dependency not in names:
                problems.append(
                    f"step {step.name!r}: depends_on names unknown step {dependency!r}"
                )
            elif dependency == step.name:
                problems.append(
                    f"step {step.name!r}: depends on itself; remove "
                    f"{step.name!r} from its depends_on"
                )
        if len(set(step.depends_on)) != len(step.depends_on):
            problems.append(f"step {step.name!r}: depends_on lists a step twice")
    for index, trigger in enumerate(definition.triggers):
        if trigger.type == "schedule":
            problems += _check_cron(index, trigger.cron)
    if problems:
        raise DefinitionError(problems)
    upstream = ancestors(definition.steps)  # raises on a cycle
    for step in definition.steps:
        try:
            references = find_references(step.params)
        except TemplateError as error:
            problems.append(f"step {step.name!r}: {error}")
            continue
        for reference in references:
            if reference.step is None:
                continue
            if reference.step not in names:
                problems.append(
                    f"step {step.name!r}: {{{{{reference.text}}}}} names unknown "
                    f"step {reference.step!r}"
                )
            elif reference.step not in upstream[step.name]:
                problems.append(
                    f"step {step.name!r}: {{{{{reference.text}}}}} names step "
                    f"{reference.step!r}, which is not upstream; add it to "
                    "depends_on (directly or through another step)"
                )
    if problems:
        raise DefinitionError(problems)


def _check_cron(index: int, cron: str | None) -> list[str]:
    label = f"trigger {index}"
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


def check_step_params(definition: WorkflowDefinition) -> None:
    """Validate each step's params against its type's params model, for steps
    whose params hold no template; templated params are checked when the step
    runs, once the references are filled in.

    Raises:
        DefinitionError: with one message per invalid field.
    """
    from pydantic import ValidationError

    from app.workflows.steps import get_step_type

    problems: list[str] = []
    for step in definition.steps:
        step_type = get_step_type(step.type)
        if step_type is None or not step_type.available:
            continue
        try:
            if find_references(step.params):
                continue
        except TemplateError:
            continue  # validate_definition reports it
        try:
            step_type.params_model.model_validate(step.params)
        except ValidationError as error:
            for item in error.errors(include_url=False):
                field = ".".join(str(part) for part in item["loc"]) or "params"
                problems.append(
                    f"step {step.name!r}: params.{field}: {item['msg']} "
                    f"(step type {step.type})"
                )
    if problems:
        raise DefinitionError(problems)
