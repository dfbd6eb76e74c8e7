"""Definition validation and template rendering, without a server."""

from typing import Any

import pytest

from app.contracts.workflows import WorkflowDefinition
from app.workflows.steps import step_type_names
from app.workflows.templates import TemplateError, render
from app.workflows.validation import DefinitionError, validate_definition


def _definition(steps: list[dict[str, Any]], **extra: Any) -> WorkflowDefinition:
    return WorkflowDefinition.model_validate({"name": "t", "steps": steps, **extra})


BAD_DEFINITIONS = [
    (
        "duplicate name",
        [{"name": "a", "type": "echo"}, {"name": "a", "type": "echo"}],
        "step 'a': duplicate step name",
    ),
    (
        "unknown dependency",
        [{"name": "a", "type": "echo", "depends_on": ["ghost"]}],
        "step 'a': depends_on names unknown step 'ghost'",
    ),
    (
        "self dependency",
        [{"name": "a", "type": "echo", "depends_on": ["a"]}],
        "step 'a': depends on itself; remove 'a' from its depends_on",
    ),
    (
        "cycle",
        [
            {"name": "a", "type": "echo", "depends_on": ["c"]},
            {"name": "b", "type": "echo", "depends_on": ["a"]},
            {"name": "c", "type": "echo", "depends_on": ["b"]},
        ],
        "form a dependency cycle",
    ),
    (
        "unknown type",
        [{"name": "a", "type": "teleport"}],
        "step 'a': unknown step type 'teleport'",
    ),
    (
        "zero timeout",
        [{"name": "a", "type": "echo", "timeout": 0}],
        "step 'a': invalid timeout 0",
    ),
    (
        "negative retries",
        [{"name": "a", "type": "echo", "retry_attempts": -1}],
        "step 'a': invalid retry_attempts -1",
    ),
    (
        "too many retries",
        [{"name": "a", "type": "echo", "retry_attempts": 1000}],
        "step 'a': invalid retry_attempts 1000",
    ),
    (
        "reference to a step that is not upstream",
        [
            {"name": "a", "type": "echo"},
            {"name": "b", "type": "echo", "params": {"x": "{{steps.a.output.v}}"}},
        ],
        "step 'b': {{steps.a.output.v}} names step 'a', which is not upstream",
    ),
    (
        "reference to a downstream step",
        [
            {"name": "a", "type": "echo", "params": {"x": "{{steps.b.output.v}}"}},
            {"name": "b", "type": "echo", "depends_on": ["a"]},
        ],
        "step 'a': {{steps.b.output.v}} names step 'b', which is not upstream",
    ),
    (
        "reference to an unknown step",
        [{"name": "a", "type": "echo", "params": {"x": "{{steps.zz.output.v}}"}}],
        "step 'a': {{steps.zz.output.v}} names unknown step 'zz'",
    ),
    (
        "malformed reference",
        [{"name": "a", "type": "echo", "params": {"x": "{{step.a.v}}"}}],
        "step 'a': invalid reference {{step.a.v}}",
    ),
    (
        "dot in a step name",
        [{"name": "a.b", "type": "echo"}],
        "step 'a.b': invalid name",
    ),
]


@pytest.mark.parametrize(
    ("steps", "expected"),
    [(steps, expected) for _, steps, expected in BAD_DEFINITIONS],
    ids=[case for case, _, _ in BAD_DEFINITIONS],
)
def test_bad_definition_rejected(steps: list[dict[str, Any]], expected: str) -> None:
    with pytest.raises(DefinitionError) as caught:
        validate_definition(_definition(steps), step_type_names())
    assert expected in str(caught.value)


def test_schedule_without_cron_rejected() -> None:
    definition = _definition(
        [{"name": "a", "type": "echo"}], triggers=[{"type": "schedule"}]
    )
    with pytest.raises(DefinitionError, match="trigger 0: a schedule trigger needs"):
        validate_definition(definition, step_type_names())


def test_bad_cron_rejected() -> None:
    definition = _definition(
        [{"name": "a", "type": "echo"}],
        triggers=[{"type": "schedule", "cron": "every minute"}],
    )
    with pytest.raises(DefinitionError, match="invalid cron 'every minute'"):
        validate_definition(definition, step_type_names())


def test_transitive_reference_accepted() -> None:
    definition = _definition(
        [
            {"name": "a", "type": "echo"},
            {"name": "b", "type": "echo", "depends_on": ["a"]},
            {
                "name": "c",
                "type": "echo",
                "depends_on": ["b"],
                "params": {"x": "{{steps.a.output.v}} and {{input.n}}"},
            },
        ]
    )
    validate_definition(definition, step_type_names())


def test_render_keeps_types_and_interpolates() -> None:
    outputs = {"a": {"v": 3, "nested": {"items": [{"id": "x"}]}}}
    rendered = render(
        {
            "whole": "{{steps.a.output.v}}",
            "text": "n={{input.n}}, v={{ steps.a.output.v }}",
            "deep": ["{{steps.a.output.nested.items.0.id}}"],
            "object": "{{steps.a.output.nested}}",
        },
        {"n": 7},
        outputs,
    )
    assert rendered["whole"] == 3
    assert rendered["text"] == "n=7, v=3"
    assert rendered["deep"] == ["x"]
    assert rendered["object"] == {"items": [{"id": "x"}]}


def test_render_missing_field_names_it() -> None:
    with pytest.raises(TemplateError, match="'missing' not found in the output"):
        render("{{steps.a.output.missing}}", {}, {"a": {"v": 1}})
    with pytest.raises(TemplateError, match="not found in the execution's input"):
        render("{{input.n}}", {}, {})
