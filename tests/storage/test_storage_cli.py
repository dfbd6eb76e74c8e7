"""`nexus storage upload` and `download`: local files round-trip, and a bad
local path is one error line with exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from app.cli import cli
from app.settings import Settings

BINARY = bytes(range(256))


@pytest.fixture
def nexus(settings: Settings, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("app.cli.load_settings", lambda: settings)

    def run(*arguments: str) -> Result:
        return CliRunner().invoke(cli, ["storage", *arguments])

    return run


def assert_one_line_error(result: Result, start: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: {start}"), result.stderr
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_cli_round_trip_byte_exact(nexus, tmp_path: Path) -> None:
    source = tmp_path / "in.bin"
    source.write_bytes(BINARY)
    uploaded = nexus("upload", "reports", "b.bin", str(source))
    assert uploaded.exit_code == 0, uploaded.output
    target = tmp_path / "out.bin"
    downloaded = nexus("download", "reports", "b.bin", "-o", str(target))
    assert downloaded.exit_code == 0, downloaded.output
    assert target.read_bytes() == BINARY


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_cli_upload_missing_file(nexus, tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent"
    result = nexus("upload", "reports", "x.txt", str(missing))
    assert_one_line_error(result, f"cannot read {missing}: no such file")
    assert "pass an existing readable file, or - for stdin" in result.stderr
    listed = nexus("list", "reports")
    assert '"count": 0' in listed.stdout


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_cli_upload_folder_rejected(nexus, tmp_path: Path) -> None:
    result = nexus("upload", "reports", "x.txt", str(tmp_path))
    assert_one_line_error(result, f"cannot read {tmp_path}: is a directory")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_cli_download_into_missing_folder(nexus, tmp_path: Path) -> None:
    source = tmp_path / "in.bin"
    source.write_bytes(BINARY)
    assert nexus("upload", "reports", "b.bin", str(source)).exit_code == 0
    target = tmp_path / "nonexistent" / "dir" / "f"
    result = nexus("download", "reports", "b.bin", "-o", str(target))
    assert_one_line_error(
        result, f"cannot write {target}: its folder {target.parent} does not exist"
    )
    assert not target.parent.exists()
    into_file = source / "f"
    result = nexus("download", "reports", "b.bin", "-o", str(into_file))
    assert_one_line_error(result, f"cannot write {into_file}: {source} is not a")
    result = nexus("download", "reports", "b.bin", "-o", str(tmp_path))
    assert_one_line_error(result, f"cannot write {tmp_path}: it is a folder")
