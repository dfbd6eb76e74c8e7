"""`nexus sandbox ...` argument parsing, before any call reaches Temporal."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from app.cli import cli
from app.sandbox.cli import parse_env


def test_env_without_equals_rejected() -> None:
    result = CliRunner().invoke(
        cli, ["sandbox", "create", "python", "--env", "MY_TOKEN S3CL01noequals"]
    )
    assert result.exit_code == 2
    assert "item 1 (23 characters) is not NAME=VALUE" in result.output
    # The item may be a secret given without its name.
    assert "S3CL01noequals" not in result.output
    assert "--env" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_env_items_parsed() -> None:
    parsed = parse_env(["A=1", "URL=http://x/?a=b", "EMPTY="])
    assert parsed == {"A": "1", "URL": "http://x/?a=b", "EMPTY": ""}


@pytest.mark.parametrize("item", ["NOEQUALS", "=value"])
def test_env_item_invalid(item: str) -> None:
    with pytest.raises(typer.BadParameter, match="is not NAME=VALUE"):
        parse_env([item])
