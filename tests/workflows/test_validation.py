"""Definition validation and template rendering, without a server."""

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from activities.integration import describe_code_failure
from app.contracts.workflows import WorkflowDefinition
from app.workflows.steps import step_type_names
from app.workflows.templates import TemplateError, render
from app.workflows.validation import (
    DefinitionError,
    check_cron_fields,
    check_step_params,
    validate_definition,
    workflow_name_problems,
)


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
        "repeated dependency",
        [
            {"name": "a", "type": "echo"},
            {"name": "b", "type": "echo", "depends_on": ["a", "a"]},
        ],
        "step 'b': depends_on lists 'a' more than once; list each step once",
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
        "reference to the step itself",
        [{"name": "a", "type": "echo", "params": {"x": "{{steps.a.output.y}}"}}],
        "step 'a': {{steps.a.output.y}} names the step itself, whose output "
        "does not exist while it runs",
    ),
    (
        "cycle next to an unknown dependency",
        [
            {"name": "a", "type": "echo", "depends_on": ["b"]},
            {"name": "b", "type": "echo", "depends_on": ["a"]},
            {"name": "c", "type": "echo", "depends_on": ["q"]},
        ],
        "steps a -> b -> a form a dependency cycle",
    ),
    (
        "unknown dependency next to a cycle",
        [
            {"name": "a", "type": "echo", "depends_on": ["b"]},
            {"name": "b", "type": "echo", "depends_on": ["a"]},
            {"name": "c", "type": "echo", "depends_on": ["q"]},
        ],
        "step 'c': depends_on names unknown step 'q'",
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


def test_repeated_self_dependency_reported_once() -> None:
    definition = _definition([{"name": "a", "type": "echo", "depends_on": ["a", "a"]}])
    with pytest.raises(DefinitionError) as caught:
        validate_definition(definition, step_type_names())
    assert caught.value.problems == [
        "step 'a': depends on itself; remove 'a' from its depends_on",
        "step 'a': depends_on lists 'a' more than once; list each step once",
    ]


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("   ", "it is blank"),
        ("bad\u0007name\n1", "character '\\x07' at position 3 is not printable"),
        ("tab\tname\n", "character '\\t' at position 3 is not printable"),
        ("line\u2028break", "character '\\u2028' at position 4 is not printable"),
        (" padded", "it starts or ends with a space"),
        ("padded ", "it starts or ends with a space"),
    ],
)
def test_bad_workflow_name_rejected(name: str, reason: str) -> None:
    [problem] = workflow_name_problems(name)
    assert problem.startswith(f"name: invalid workflow name {name!r} ({reason}); ")
    assert "use 1-200 printable characters" in problem


@pytest.mark.parametrize(
    "name", ["nightly-report", "My workflow (v2)", "data.pipeline/daily", "報告"]
)
def test_printable_workflow_names_accepted(name: str) -> None:
    assert workflow_name_problems(name) == []


def test_schedule_without_cron_rejected() -> None:
    definition = _definition(
        [{"name": "a", "type": "echo"}], triggers=[{"type": "schedule"}]
    )
    with pytest.raises(
        DefinitionError, match=r"triggers\.0\.cron: a schedule trigger needs"
    ):
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


BAD_CRONS = [
    ("99 99 * * *", "invalid minute '99' in '99 99 * * *' ('99' is outside 0-59)"),
    ("0 99 * * *", "invalid hour '99'"),
    ("61 * * * *", "invalid minute '61'"),
    ("a b c d e", "invalid minute 'a'"),
    ("0 0 0 * *", "invalid day-of-month '0' in '0 0 0 * *' ('0' is outside 1-31)"),
    ("0 0 * 13 *", "invalid month '13'"),
    ("0 0 * * 8", "invalid day-of-week '8'"),
    ("*/0 * * * *", "step '0' must be a whole number of at least 1"),
    ("10-5 * * * *", "range 10-5 ends before it starts"),
    ("1,,2 * * * *", "'' is not *, a value, a range or a step"),
    ("0 0 L * *", "invalid day-of-month 'L'"),
    ("0 0 * * 1#2", "invalid day-of-week '1#2'"),
]


@pytest.mark.parametrize(("cron", "expected"), BAD_CRONS)
def test_cron_fields_checked(cron: str, expected: str) -> None:
    definition = _definition(
        [{"name": "a", "type": "echo"}],
        triggers=[{"type": "manual"}, {"type": "schedule", "cron": cron}],
    )
    with pytest.raises(DefinitionError) as caught:
        check_cron_fields(definition)
    message = str(caught.value)
    assert message.startswith("invalid workflow definition: triggers.1.cron: ")
    assert expected in message
    assert "use *, a value in" in message


@pytest.mark.parametrize(
    ("cron", "months"),
    [
        ("0 3 31 2 *", "FEB: 29 days"),
        ("0 3 30 feb mon", "FEB: 29 days"),
        ("0 0 31 2,4,6 *", "FEB: 29 days, APR: 30 days, JUN: 30 days"),
        ("0 0 31 apr-jun/2 *", "APR: 30 days, JUN: 30 days"),
        ("0 0 30-31/1 2 *", "FEB: 29 days"),
    ],
)
def test_cron_that_never_fires_rejected(cron: str, months: str) -> None:
    definition = _definition(
        [{"name": "a", "type": "echo"}], triggers=[{"type": "schedule", "cron": cron}]
    )
    with pytest.raises(DefinitionError) as caught:
        check_cron_fields(definition)
    [problem] = caught.value.problems
    assert problem.startswith(f"triggers.0.cron: {cron!r} never fires, because ")
    assert f"is past the last day of every listed month ({months})" in problem
    assert "use a day-of-month that one of these months has" in problem


@pytest.mark.parametrize(
    "cron",
    [
        "0 3 29 2 *",
        "0 0 31 2,3 *",
        "0 0 31 */2 *",
        "0 0 30-31 feb-apr *",
        "0 0 31 2/1 *",
        "*/5 * * * *",
        "0-59/15 * * * *",
        "5/10 * * * *",
        "0,30 1-3 * * *",
        "0 0 * jan-mar mon-fri",
        "0 0 * JAN SUN-SAT",
        "0 0 * * 0-7",
        "@daily",
    ],
)
def test_valid_cron_fields_accepted(cron: str) -> None:
    definition = _definition(
        [{"name": "a", "type": "echo"}], triggers=[{"type": "schedule", "cron": cron}]
    )
    validate_definition(definition, step_type_names())
    check_cron_fields(definition)


BAD_PARAMS = [
    (
        {"type": "sandbox_execution", "params": {"code": "x", "template": "nope"}},
        "step 's': params.template: Input should be 'base', 'python', 'node', "
        "'claude-code', 'react', 'nextjs' or 'vanilla', got 'nope'",
    ),
    (
        # A templated field waits for the run; the others are checked now.
        {
            "type": "sandbox_execution",
            "params": {"code": "{{input.code}}", "template": "nope"},
        },
        "step 's': params.template: Input should be",
    ),
    (
        # A reference in one env var leaves the others to be checked now.
        {
            "type": "sandbox_execution",
            "params": {"code": "x", "env_vars": {"Y": 5, "Z": "{{input.z}}"}},
        },
        "step 's': params.env_vars.Y: Input should be a valid string",
    ),
    (
        {"type": "storage", "params": {"operation": "list", "bucket": "../../etc"}},
        "step 's': params.bucket: invalid bucket name '../../etc': "
        "use 3-63 lowercase letters",
    ),
    (
        {"type": "reporting", "params": {"bucket": "Reports"}},
        "step 's': params.bucket: invalid bucket name 'Reports'",
    ),
    (
        {"type": "echo", "params": {"x": {"y": ["{{steps.a.output"]}}},
        "step 's': params.x.y.0: '{{steps.a.output' opens a reference with '{{' "
        "that is never closed",
    ),
    (
        {"type": "echo", "agent_type": "wizard"},
        "step 's': unknown agent_type 'wizard'; use one of coordinator, researcher",
    ),
]


@pytest.mark.parametrize(("step", "expected"), BAD_PARAMS)
def test_params_checked_at_create(step: dict[str, Any], expected: str) -> None:
    definition = _definition([{"name": "s", **step}])
    validate_definition(definition, step_type_names())
    with pytest.raises(DefinitionError) as caught:
        check_step_params(definition)
    assert expected in str(caught.value)


def test_referenced_env_var_waits_for_the_run() -> None:
    definition = _definition(
        [
            {
                "name": "s",
                "type": "sandbox_execution",
                "params": {"code": "x", "env_vars": {"Y": "5", "Z": "{{input.z}}"}},
            },
            {
                "name": "t",
                "type": "sandbox_execution",
                "params": {"code": "x", "env_vars": "{{input.env}}"},
            },
        ]
    )
    check_step_params(definition)


def test_env_var_values_are_not_echoed() -> None:
    definition = _definition(
        [
            {
                "name": "s",
                "type": "sandbox_execution",
                "params": {"code": "x", "env_vars": {"TOKEN": 12345}},
            }
        ]
    )
    with pytest.raises(DefinitionError) as caught:
        check_step_params(definition)
    assert "params.env_vars.TOKEN: Input should be a valid string" in str(caught.value)
    assert "12345" not in str(caught.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [("priority", "7"), ("priority", True), ("priority", 7.0)],
)
def test_priority_must_be_an_integer(field: str, value: Any) -> None:
    with pytest.raises(ValidationError, match=f"{field}\n  Input should be a valid"):
        _definition([{"name": "a", "type": "echo"}], **{field: value})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("timeout", "5"),
        ("timeout", True),
        ("retry_attempts", "1"),
        ("retry_attempts", False),
        ("continue_on_failure", "yes"),
        ("continue_on_failure", 1),
    ],
)
def test_step_numbers_and_flags_are_strict(field: str, value: Any) -> None:
    with pytest.raises(ValidationError, match=f"steps.0.{field}"):
        _definition([{"name": "a", "type": "echo", field: value}])


def test_code_failure_message_is_complete() -> None:
    assert (
        describe_code_failure("failed", 3, "out\n", "")
        == "the code ended failed with exit code 3; stderr is empty, stdout ends: out"
    )
    assert (
        describe_code_failure("timed_out", None, "", "")
        == "the code ended timed_out; it printed nothing to stdout or stderr"
    )
    tail = describe_code_failure("failed", 1, "out", "x" * 600 + "boom\n")
    assert tail.endswith("; stderr ends: " + ("x" * 496) + "boom")


def test_secret_named_param_value_not_shown() -> None:
    """An error on a step param whose name marks a secret names the field but
    not its value."""
    definition = _definition(
        [
            {
                "name": "s",
                "type": "storage",
                "params": {
                    "operation": "get",
                    "bucket": "abc",
                    "path": "x",
                    "password": "S3CV02storagepw",
                    "colour": "plain-value",
                },
            }
        ]
    )
    with pytest.raises(DefinitionError) as caught:
        check_step_params(definition)
    message = str(caught.value)
    assert "params.password: Extra inputs are not permitted" in message
    assert "S3CV02storagepw" not in message
    assert "got 'plain-value'" in message


def test_neural_step_params_match_the_tool() -> None:
    """A neural_computation step takes what neural_train takes, and a predict
    step without its model fails when the workflow is created."""
    import app.integration.steps  # noqa: F401  (registers the step types)

    fine = _definition(
        [
            {
                "name": "train",
                "type": "neural_computation",
                "params": {"architecture": "hybrid", "learning_rate": 10},
            },
            {
                "name": "predict",
                "type": "neural_computation",
                "depends_on": ["train"],
                "params": {
                    "mode": "predict",
                    "input": [[1, 2]],
                    "model_id": "{{steps.train.output.model_id}}",
                },
            },
        ]
    )
    check_step_params(fine)
    bad = _definition(
        [
            {
                "name": "p",
                "type": "neural_computation",
                "params": {"mode": "predict", "input": [[1]]},
            },
            {
                "name": "q",
                "type": "neural_computation",
                "params": {"learning_rate": 100},
            },
        ]
    )
    with pytest.raises(DefinitionError) as caught:
        check_step_params(bad)
    message = str(caught.value)
    assert "step 'p': params: mode predict needs params model_id and input" in message
    strict = _definition(
        [
            {
                "name": "e",
                "type": "neural_computation",
                "params": {"epochs": True, "batch_size": "8"},
            }
        ]
    )
    with pytest.raises(DefinitionError) as loose:
        check_step_params(strict)
    assert "params.epochs: Input should be a valid integer" in str(loose.value)
    assert "params.batch_size: Input should be a valid integer" in str(loose.value)
    assert (
        "step 'q': params.learning_rate: Input should be less than or equal to 10"
        in (message)
    )


@pytest.mark.parametrize(
    ("name", "text", "where"),
    [
        (
            "bad.yaml",
            'name: x\nsteps:\n  - env:\n      DB_PASSWORD: "S3CY01yamlpw\n',
            "line",
        ),
        (
            "bad.json",
            '{"name": "x", "steps": [{"env": {"TOKEN": "S3CJ01jsonpw"}]}',
            "line 1",
        ),
    ],
)
def test_unreadable_definition_file_shows_no_text(
    tmp_path: Path, name: str, text: str, where: str
) -> None:
    """A definition file that does not parse is named with the problem and
    its place, not with the text there, which may be a secret."""
    from typer.testing import CliRunner

    from app.cli import cli

    path = tmp_path / name
    path.write_text(text)
    result = CliRunner().invoke(cli, ["workflow", "create", str(path)])
    assert result.exit_code == 2
    assert "is not valid JSON or YAML" in result.output
    assert where in result.output
    assert "S3C" not in result.output
