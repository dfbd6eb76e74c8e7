"""The command group class of every `nexus` typer app.

click, and typer's copy of it, keep only the last value of an option that
takes one value, so `nexus swarm status --swarm a --swarm b` silently runs
with b. `NexusGroup` rejects that as a usage error (exit code 2) that names
the option, every value given and the fix. Options declared repeatable
(`list[...]` types), counters and flags are left alone.

It also joins the lines of each help paragraph (`unwrap_help`), so that
rich wraps help text to the terminal's width.

Every `typer.Typer(...)` of the command line passes `cls=NexusGroup`, and a
test walks the command tree to check that.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from typing import Any

import typer

# typer 0.29 carries its own copy of click, and its command classes take
# that copy's types; the click package is not what typer runs.
from typer import _click
from typer.core import TyperCommand, TyperGroup, TyperOption


class NexusGroup(TyperGroup):
    """A typer group that rejects a single-value option given more than once.

    It checks its own options when it parses its arguments, and the options
    of each command it runs before that command parses them. A subgroup
    that is a `NexusGroup` checks itself.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.help = unwrap_help(self.help)
        for command in self.commands.values():
            command.help = unwrap_help(command.help)

    def parse_args(self, ctx: _click.Context, args: list[str]) -> list[str]:
        reject_repeated_options(self, ctx, args)
        return super().parse_args(ctx, args)

    def resolve_command(
        self, ctx: _click.Context, args: list[str]
    ) -> tuple[str | None, _click.Command | None, list[str]]:
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None and not isinstance(command, NexusGroup):
            # The command's own context, unparsed: its settings (interspersed
            # arguments, unknown options) decide how the arguments read.
            command_ctx = command.context_class(
                command, info_name=name, parent=ctx, **command.context_settings
            )
            reject_repeated_options(command, command_ctx, rest)
        return name, command, rest


def unwrap_help(text: str | None) -> str | None:
    """Join the lines of each paragraph of a help text into one line.

    typer 0.29's rich help keeps a docstring's line breaks in a group's list
    of commands and in every paragraph after the first, so text wrapped at
    88 columns in the source showed ragged in a terminal of another width.
    On one line, rich wraps it to the terminal. A paragraph that starts with
    click's no-rewrap marker `\\b` keeps its lines, and so does one with an
    indented or bulleted line, and everything after `\\f`.
    """
    if not text:
        return text
    visible, marker, hidden = text.partition("\f")
    paragraphs = inspect.cleandoc(visible).split("\n\n")
    joined = [p if _keeps_lines(p) else " ".join(p.split()) for p in paragraphs]
    return "\n\n".join(joined) + marker + hidden


def _keeps_lines(paragraph: str) -> bool:
    lines = paragraph.splitlines()
    return paragraph.startswith("\b") or any(
        line[:1].isspace() or line.startswith(("- ", "* ")) for line in lines[1:]
    )


def reject_repeated_options(
    command: _click.Command, ctx: _click.Context, args: Sequence[str]
) -> None:
    """Raise a usage error when `args` give a single-value option twice.

    A copy of the command whose single-value options collect every value
    parses the arguments once more, so the check reads them by the parser's
    own rules (`--name=value`, short options, `--`).

    Raises:
        typer.BadParameter: an option that takes one value is given more
            than once. The message names the option and its values.
    """
    if ctx.resilient_parsing:
        return  # shell completion: report nothing
    params = command.get_params(ctx)
    single = {
        param.name: param
        for param in params
        if isinstance(param, TyperOption)
        and not (param.multiple or param.count or param.is_flag)
    }
    if not single:
        return
    collecting = [
        _collecting(param) if single.get(param.name) is param else param
        for param in params
    ]
    probe = TyperCommand(command.name, params=collecting, add_help_option=False)
    try:
        values, _, _ = probe.make_parser(ctx).parse_args(args=list(args))
    except _click.exceptions.UsageError:
        return  # the command's own parse reports the same error
    help_option = command.get_help_option(ctx)
    if help_option is not None and values.get(help_option.name):
        return  # --help shows the help, as it does when a value is invalid
    for name, option in single.items():
        option_values = values.get(name)
        if isinstance(option_values, list) and len(option_values) > 1:
            raise typer.BadParameter(
                _repeated_message(option_values), ctx=ctx, param=option
            )


def _collecting(option: TyperOption) -> TyperOption:
    """Return a copy of `option` that collects a value each time it appears."""
    clone = copy.copy(option)
    clone.multiple = True
    return clone


def _repeated_message(option_values: list[object]) -> str:
    count = len(option_values)
    times = "twice" if count == 2 else f"{count} times"
    quoted = [repr(value) for value in option_values]
    listed = f"{', '.join(quoted[:-1])} and {quoted[-1]}"
    return f"given {times}, as {listed}, but it takes one value; give it once."
