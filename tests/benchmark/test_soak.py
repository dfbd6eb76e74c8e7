"""`python -m bench.soak`: option checks and help, which run before any
server starts, and interrupts of a run."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from app.benchmark import recording
from app.settings import Settings
from app.temporal.devserver import port_is_open
from bench import soak
from tests.benchmark.test_cli import _start_cli

# Each row: the arguments, then the text that the error must start with.
REJECTED = [
    (["--minutes", "0"], "--minutes 0 is invalid"),
    (["--minutes", "-1"], "--minutes -1 is invalid"),
    (["--minutes", "20000"], "--minutes 20000 is invalid"),
    (["--port", "0"], "--port 0 is invalid"),
    (["--port", "70000"], "--port 70000 is invalid"),
    # Its HTTP API would listen on 65536.
    (["--port", "63536"], "--port 63536 is invalid"),
    (["--port", "63536", "--ui-port", "3000"], "--port 63536 is invalid"),
    (["--ui-port", "0"], "--ui-port 0 is invalid"),
    (["--http-port", "70000"], "--http-port 70000 is invalid"),
    (["--port", "33000", "--ui-port", "33000"], "--ui-port 33000 is invalid"),
    (["--ui-port", "33001", "--http-port", "33001"], "--http-port 33001 is invalid"),
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
    assert "--ui-port UI_PORT" in text
    assert "--http-port HTTP_PORT" in text


def test_ports_in_one_range_accepted() -> None:
    # An operator limited to one range of ports can place all three in it.
    arguments = ["--port", "65000", "--ui-port", "65001", "--http-port", "65002"]
    options = soak.parse_options(arguments)
    assert soak.invalid_option(options) is None
    assert soak.listen_ports(options) == (65000, 65001, 65002)
    assert soak.listen_ports(soak.parse_options(["--port", "30000"])) == (
        30000,
        31000,
        32000,
    )


def test_heap_legend_names_allocator() -> None:
    glibc = soak.heap_legend("system")
    jemalloc = soak.heap_legend("jemalloc")
    assert "glibc's in-use bytes" in glibc
    assert "jemalloc" not in glibc
    assert "glibc" not in jemalloc
    assert "jemalloc's allocated bytes" in jemalloc
    assert "PYTHONMALLOC=malloc" in jemalloc
    mixed = soak.heap_legend("system,nexus-orchestration=glibc")
    assert "without Python's objects of 512 bytes or less" in mixed
    assert "glibc's in-use bytes with every Python object" in mixed
    assert "jemalloc" not in mixed


def test_unusable_data_dir_rejected(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    data_dir = blocker / "soak-data"
    done = _soak(["--data-dir", str(data_dir)], tmp_path / "tmp")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith(
        f"python -m bench.soak: error: --data-dir {data_dir} cannot be created: "
    )
    assert done.stderr.count("\n") == 1


def _free_soak_port() -> int:
    """Return a port that is free, with the two that the soak adds to it."""
    while True:
        port = random.randrange(20000, 40000)
        if not any(port_is_open("127.0.0.1", port + k) for k in (0, 1000, 2000)):
            return port


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stop", ["ctrl-c", "kill"])
async def test_interrupt_cancels_soak_run(tmp_path: Path, stop: str) -> None:
    env = {key: value for key, value in os.environ.items() if "NEXUS_" not in key}
    env["NEXUS_WORKER_WARM_UP"] = "false"
    data_dir = tmp_path / "soak"
    command = [
        sys.executable,
        "-m",
        "bench.soak",
        "--minutes",
        "1",
        "--port",
        str(_free_soak_port()),
        "--data-dir",
        str(data_dir),
    ]
    process, output = _start_cli(command, env)
    try:
        run_id = (await output.wait_for(r"Benchmark (benchmark-\S+):", 240))[1]
        if stop == "ctrl-c":
            os.killpg(process.pid, signal.SIGINT)
        else:
            process.send_signal(signal.SIGTERM)
        exit_code = await asyncio.to_thread(process.wait, 120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert exit_code == (130 if stop == "ctrl-c" else 143), output.text
    assert "Traceback" not in output.text
    assert "python -m bench.soak: interrupted; no growth is printed" in output.text
    url = Settings(data_dir=data_dir).effective_database_url
    assert recording.run_status(url, run_id) == "cancelled"
