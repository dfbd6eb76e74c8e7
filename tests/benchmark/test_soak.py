"""`python -m bench.soak`: option checks and help, which run before any
server starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Each row: the arguments, then the text that the error must start with.
REJECTED = [
    (["--minutes", "0"], "--minutes 0 is invalid"),
    (["--minutes", "-1"], "--minutes -1 is invalid"),
    (["--minutes", "20000"], "--minutes 20000 is invalid"),
    (["--port", "0"], "--port 0 is invalid"),
    (["--port", "70000"], "--port 70000 is invalid"),
    # Its HTTP API would listen on 65536.
    (["--port", "63536"], "--port 63536 is invalid"),
    (["--sample-seconds", "0"], "--sample-seconds 0 is invalid"),
    (["--warmup-minutes", "-1"], "--warmup-minutes -1 is invalid"),
    (["--minutes", "5", "--warmup-minutes", "5"], "--warmup-minutes 5 is invalid"),
]


def _soak(arguments: list[str], tmp: Path) -> subprocess.CompletedProcess[str]:
    tmp.mkdir(exist_ok=True)
    # mkdtemp makes the default data folder under TMPDIR.
    env = {**os.environ, "TMPDIR": str(tmp)}
    return subprocess.run(
        [sys.executable, "-m", "bench.soak", *arguments],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(("arguments", "error"), REJECTED)
def test_invalid_option_rejected(
    arguments: list[str], error: str, tmp_path: Path
) -> None:
    done = _soak(arguments, tmp_path / "tmp")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith(f"python -m bench.soak: error: {error}: ")
    assert done.stderr.count("\n") == 1
    assert "pass" in done.stderr or "left out" in done.stderr
    assert "Traceback" not in done.stderr
    assert list((tmp_path / "tmp").iterdir()) == []


def test_invalid_option_creates_no_data_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "soak-data"
    done = _soak(["--port", "0", "--data-dir", str(data_dir)], tmp_path / "tmp")
    assert done.returncode == 2
    assert not data_dir.exists()


def test_help_describes_ports(tmp_path: Path) -> None:
    done = _soak(["--help"], tmp_path / "tmp")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert (
        "print each worker's memory growth in MB (10**6 bytes) per minute, over "
        "the whole run and after a warm-up."
    ) in text
    assert "web UI on --port + 1000 and the HTTP API on --port + 2000" in text
    assert "The web UI uses PORT + 1000 and the HTTP API PORT + 2000" in text
