"""`nexus neural ...` commands, run without Temporal."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from app.cli import cli
from app.db.migrate import upgrade
from app.neural import store
from app.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_train_command_shows_only_real_error(tmp_path: Path) -> None:
    upgrade(Settings(data_dir=tmp_path).effective_database_url)
    env = {"NEXUS_DATA_DIR": str(tmp_path), "NEXUS_TEMPORAL_ADDRESS": "127.0.0.1:1"}
    result = CliRunner().invoke(
        cli,
        ["neural", "train", "--tier", "nano", "--epochs", "0", "--dataset", "iris"],
        env=env,
    )
    assert result.exit_code == 1, result.output
    assert "config.training.epochs: 0 is invalid" in result.stderr
    # The command sends "layers": [], which selects the tier's widths.
    assert "layers" not in result.stderr
    assert "unknown tier" not in result.stderr


def test_jax_backend_probe_not_logged() -> None:
    # A CPU-only machine has no libtpu, and JAX logs the failed 'tpu' probe at
    # INFO when it picks a backend.
    script = (
        "from app.logs import configure_logging\n"
        "configure_logging('INFO')\n"
        "import jax\n"
        "jax.devices()\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "xla_bridge" not in completed.stderr, completed.stderr


def test_cluster_deploy_takes_layers(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    upgrade(settings.effective_database_url)
    env = {"NEXUS_DATA_DIR": str(tmp_path), "NEXUS_TEMPORAL_ADDRESS": "127.0.0.1:1"}
    runner = CliRunner()
    created = runner.invoke(cli, ["neural", "cluster", "init", "layers"], env=env)
    assert created.exit_code == 0, created.output
    cluster_id = json.loads(created.stdout)["cluster_id"]
    deploy = ["neural", "cluster", "deploy", cluster_id, "--model", "custom"]

    deployed = runner.invoke(cli, [*deploy, "--layers", "[32, 16]"], env=env)
    assert deployed.exit_code == 0, deployed.output
    node_id = json.loads(deployed.stdout)["node_id"]
    [node] = store.cluster_nodes(settings, cluster_id)
    assert node.id == node_id
    assert "layers:32,16" in node.capabilities

    missing = runner.invoke(cli, deploy, env=env)
    assert missing.exit_code == 1
    assert "model 'custom' needs layers" in missing.stderr
    malformed = runner.invoke(cli, [*deploy, "--layers", "[32,"], env=env)
    assert malformed.exit_code == 2
    assert "--layers is not valid JSON" in malformed.stderr


def test_node_worker_rejects_unknown_and_terminated(tmp_path: Path) -> None:
    """`python -m workers --neural-node` exits with one line for a node that
    does not exist or whose cluster was terminated, before it connects."""
    import asyncio

    from app.tools import ToolContext, invoke_tool, load_tools

    load_tools()
    settings = Settings(data_dir=tmp_path, neural_embedded_nodes=False)
    upgrade(settings.effective_database_url)
    ctx = ToolContext(settings)

    async def terminated_node() -> tuple[str, str]:
        cluster = await invoke_tool(ctx, "neural_cluster_init", {"name": "gone"})
        node = await invoke_tool(
            ctx, "neural_node_deploy", {"cluster_id": cluster["cluster_id"]}
        )
        # Terminating needs Temporal only for running sessions; mark it here.
        from app.db import session_scope
        from app.neural.models import NeuralCluster

        with session_scope(settings.effective_database_url) as session:
            row = session.get(NeuralCluster, cluster["cluster_id"])
            assert row is not None
            row.status = "terminated"
            session.add(row)
        return cluster["cluster_id"], node["node_id"]

    cluster_id, node_id = asyncio.run(terminated_node())
    env = {
        "NEXUS_DATA_DIR": str(tmp_path),
        # Nothing listens here, so a worker that went on would fail to connect.
        "NEXUS_TEMPORAL_ADDRESS": "127.0.0.1:1",
        "PYTHONPATH": str(REPO_ROOT),
        "PATH": "/usr/bin:/bin",
    }
    expected = {
        "node_doesnotexist": "error: node node_doesnotexist not found; give the "
        "node_id that neural_node_deploy returned",
        node_id: f"error: node {node_id} belongs to the terminated cluster "
        f"{cluster_id}; deploy a node on an active cluster",
    }
    for node, line in expected.items():
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "workers",
                "--neural-node",
                node,
                "--connect-wait",
                "0",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 1, result.stderr
        assert result.stderr.strip().splitlines()[-1] == line
