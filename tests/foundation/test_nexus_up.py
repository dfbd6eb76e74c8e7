"""`nexus up` as a user runs it: a subprocess, its own ports and data folder."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from app.contracts.queues import ALL_QUEUES
from app.datalock import OWNER_FILE
from app.settings import Settings
from app.supervisor import Stack, address_lines, http_url, reports_folder_warning
from app.temporal.devserver import EmbeddedTemporal, port_is_open, temporal_binary
from tests.support.postgres import free_port


class NexusUp:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.ui_port = free_port()
        self.env = {
            **os.environ,
            "NEXUS_DATA_DIR": str(data_dir),
            "NEXUS_TEMPORAL_PORT": str(self.port),
            "NEXUS_TEMPORAL_UI_PORT": str(self.ui_port),
            "NEXUS_HTTP_PORT": str(free_port()),
        }
        self.env.pop("NEXUS_TEMPORAL_ADDRESS", None)
        self.env.pop("NEXUS_DATABASE_URL", None)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        log = (self.data_dir / "up.log").open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app", "up"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def nexus(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "app", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def wait_healthy(self, timeout: float = 180.0) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            assert self.process is not None and self.process.poll() is None, self.log()
            result = self.nexus("health")
            last = result.stdout + result.stderr
            if result.returncode == 0:
                report = json.loads(result.stdout)
                workers = report["workers"]
                if all(workers[q]["activity_pollers"] for q in ALL_QUEUES):
                    return report  # type: ignore[no-any-return]
            time.sleep(1)
        raise AssertionError(f"nexus up never became healthy: {last}\n{self.log()}")

    def stop(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(120)

    def log(self) -> str:
        path = self.data_dir / "up.log"
        return path.read_text(errors="replace") if path.exists() else ""


def temporal_cli(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(temporal_binary()), *args, "--address", address],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def nexus_up(tmp_path: Path):  # type: ignore[no-untyped-def]
    up = NexusUp(tmp_path)
    yield up
    if up.process is not None and up.process.poll() is None:
        up.process.kill()


def test_up_health_stop_restart_keeps_history(nexus_up: NexusUp) -> None:
    nexus_up.start()
    report = nexus_up.wait_healthy()
    assert report["database"]["status"] == "healthy"  # type: ignore[index]

    ui = httpx.get(f"http://127.0.0.1:{nexus_up.ui_port}/api/v1/namespaces", timeout=10)
    assert ui.status_code == 200
    assert "default" in ui.text

    # A workflow started from outside, through the Temporal CLI.
    run = temporal_cli(
        nexus_up.address,
        "workflow",
        "execute",
        "--type",
        "SystemCheckWorkflow",
        "--task-queue",
        "nexus-orchestration",
        "--workflow-id",
        "up-check-1",
        "--input",
        json.dumps({"queues": list(ALL_QUEUES)}),
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "COMPLETED" in run.stdout.upper()

    # A sandbox leaves a spare runner behind, which belongs to no session.
    created = nexus_up.nexus("sandbox", "create", "base")
    assert created.returncode == 0, created.stdout + created.stderr
    sandbox_id = json.loads(created.stdout)["sandbox_id"]
    deleted = nexus_up.nexus("sandbox", "delete", sandbox_id)
    assert deleted.returncode == 0, deleted.stdout + deleted.stderr
    spares = nexus_up.data_dir / "sandboxes"
    assert [f for f in spares.iterdir() if f.name.startswith("_spare-")]

    assert nexus_up.process is not None
    children = psutil.Process(nexus_up.process.pid).children(recursive=True)
    assert len(children) >= len(ALL_QUEUES) + 1
    assert nexus_up.stop() == 0
    psutil.wait_procs(children, timeout=10)
    alive = [c.pid for c in children if c.is_running() and c.status() != "zombie"]
    assert alive == [], f"processes left behind: {alive}"
    assert not [f for f in spares.iterdir() if f.name.startswith("_spare-")]
    assert (nexus_up.data_dir / "temporal.db").exists()

    nexus_up.start()
    nexus_up.wait_healthy()
    listed = temporal_cli(nexus_up.address, "workflow", "list")
    assert "up-check-1" in listed.stdout, listed.stdout + listed.stderr
    assert nexus_up.stop() == 0


def test_unwritable_reports_folder_warned(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    settings = Settings(data_dir=tmp_path, reports_dir=blocker / "reports")
    warning = reports_folder_warning(settings)
    assert warning is not None
    assert warning.startswith(f"the workers' reports folder {blocker / 'reports'}")
    assert warning.endswith("until then every benchmark run fails at its start")
    writable = Settings(data_dir=tmp_path, reports_dir=tmp_path / "reports")
    assert reports_folder_warning(writable) is None


def test_config_masks_secrets(tmp_path: Path) -> None:
    up = NexusUp(tmp_path)
    up.env["NEXUS_ENCRYPTION_KEY"] = "very-secret-value"
    up.env["NEXUS_DATABASE_URL"] = "postgresql://nexus:hunter2@127.0.0.1:5/nexus"
    result = up.nexus("config")
    assert result.returncode == 0, result.stderr
    assert "very-secret-value" not in result.stdout
    assert "hunter2" not in result.stdout
    assert json.loads(result.stdout)["encryption_key"] == "********"


def test_invalid_setting_exits_with_message(tmp_path: Path) -> None:
    up = NexusUp(tmp_path)
    up.env["NEXUS_HTTP_PORT"] = "99999"
    result = up.nexus("config")
    assert result.returncode == 2
    assert "NEXUS_HTTP_PORT='99999'" in result.stderr
    assert "65535" in result.stderr


def test_unknown_variable_warned_on_stderr(tmp_path: Path) -> None:
    up = NexusUp(tmp_path)
    up.env["NEXUS_API_PORT"] = "3001"
    result = up.nexus("config")
    assert result.returncode == 0, result.stderr
    assert (
        "unknown setting NEXUS_API_PORT is ignored; did you mean NEXUS_HTTP_PORT?"
        in result.stderr
    )
    json.loads(result.stdout)  # stdout holds only the settings


def test_addresses_include_http_api_and_mcp(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, http_port=3100)
    stack = Stack(settings)
    stack.serves_api = True
    lines = address_lines(settings, stack)
    assert (
        "HTTP API   http://127.0.0.1:3100 (POST /api/tools/TOOL, /openapi.json)"
        in lines
    )
    assert "MCP        http://127.0.0.1:3100/mcp" in lines
    secure = settings.model_copy(
        update={
            "http_host": "::1",
            "tls_cert": tmp_path / "cert.pem",
            "tls_key": tmp_path / "key.pem",
        }
    )
    assert http_url(secure) == "https://[::1]:3100"
    assert not any(
        line.startswith(("HTTP API", "MCP"))
        for line in address_lines(secure, Stack(secure))
    )


def test_addresses_of_reused_server(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, temporal_ui_port=3200)
    stack = Stack(settings)
    stack.server = EmbeddedTemporal(settings)
    stack.server.reused = True
    # The UI port of this process's settings is not where anything listens.
    assert not any(line.startswith("Web UI") for line in address_lines(settings, stack))
    stack.server.reused_ui_url = "http://127.0.0.1:3300"
    lines = address_lines(settings, stack)
    assert "Web UI     http://127.0.0.1:3300 (of the reused server)" in lines


def test_health_without_server_exits_nonzero(tmp_path: Path) -> None:
    up = NexusUp(tmp_path)
    result = up.nexus("health")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["temporal"]["status"] == "unhealthy"
    # Nothing migrated this fresh data folder, and health says how to fix it.
    assert report["database"]["status"] == "degraded"
    assert "nexus db upgrade" in report["database"]["error"]
    # Its audit event has no table to go to, which is one line, not a traceback.
    assert "Traceback" not in result.stderr
    assert "audit event for tool system_health not written" in result.stderr


@pytest.mark.parametrize("port", ["NEXUS_TEMPORAL_UI_PORT", "NEXUS_TEMPORAL_PORT"])
def test_up_busy_port_writes_nothing(tmp_path: Path, port: str) -> None:
    up = NexusUp(tmp_path / "data")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", int(up.env[port])))
        holder.listen()
        done = up.nexus("up")
    assert done.returncode == 1, done.stderr
    assert f"port {up.env[port]} on 127.0.0.1" in done.stderr
    assert port in done.stderr
    # Nothing was migrated or written: no database and no API key.
    written = (
        sorted(p.name for p in up.data_dir.rglob("*")) if up.data_dir.exists() else []
    )
    assert written == []


def test_second_up_same_folder_rejected(nexus_up: NexusUp) -> None:
    nexus_up.start()
    assert nexus_up.process is not None
    owner = nexus_up.data_dir / OWNER_FILE
    deadline = time.monotonic() + 120
    while not owner.exists() and time.monotonic() < deadline:
        assert nexus_up.process.poll() is None, nexus_up.log()
        time.sleep(0.2)
    assert owner.exists(), nexus_up.log()

    # Other ports, so that only the folder is shared.
    second = NexusUp(nexus_up.data_dir)
    done = second.nexus("up")
    assert done.returncode == 1, done.stderr
    # The error is the only line.
    [error] = done.stderr.strip().splitlines()
    assert error.startswith(f"error: the data folder {nexus_up.data_dir} is in use")
    assert f"pid {nexus_up.process.pid}" in error
    assert f"Temporal {nexus_up.address}" in error
    assert "NEXUS_DATA_DIR" in error
    # The second one started nothing and left the first one's record.
    assert not port_is_open("127.0.0.1", second.port)
    assert owner.exists()

    assert nexus_up.stop() == 0
    assert not owner.exists()


def _temporal_servers(up: NexusUp) -> list[psutil.Process]:
    assert up.process is not None
    return [
        child
        for child in psutil.Process(up.process.pid).children(recursive=True)
        if "start-dev" in child.cmdline()
    ]


def test_up_restarts_killed_temporal_server(nexus_up: NexusUp) -> None:
    nexus_up.start()
    nexus_up.wait_healthy()
    [server] = _temporal_servers(nexus_up)
    server.kill()
    # psutil waits until the pid is gone, which a zombie is not: `nexus up`
    # must reap its dead server.
    server.wait(timeout=60)

    report = nexus_up.wait_healthy()
    assert report["temporal"]["status"] == "healthy"  # type: ignore[index]
    [restarted] = _temporal_servers(nexus_up)
    assert restarted.pid != server.pid
    log = nexus_up.log()
    assert f"embedded Temporal server (pid {server.pid}) exited with code" in log
    assert nexus_up.stop() == 0


@pytest.mark.parametrize(
    "command", [("up",), ("db", "upgrade"), ("workflow", "list"), ("health",)]
)
def test_unreachable_database_one_line(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    up = NexusUp(tmp_path)
    # A port where nothing listens, so every connection is refused.
    url = f"postgresql+psycopg://nexus:s3cretPW@127.0.0.1:{free_port()}/nexus"
    up.env["NEXUS_DATABASE_URL"] = url
    done = up.nexus(*command)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert "s3cretPW" not in done.stdout + done.stderr
    masked = url.replace("s3cretPW", "***")
    expected = (
        f"the database at {masked} cannot be reached (Connection refused); "
        "start it or fix NEXUS_DATABASE_URL"
    )
    assert expected in done.stderr
    if command != ("health",):
        assert done.stderr.strip().splitlines()[-1] == f"error: {expected}"
