"""Training whose loss becomes NaN: jobs and sessions fail at once, naming
the epoch, the node and the fix."""

from __future__ import annotations

import re
import time

import jax
import numpy as np
import pytest
from sqlmodel import select
from temporalio import activity
from temporalio.client import Client

from activities.neural import NodeActivities
from app.contracts.neural import (
    FinishInput,
    NodeTrainInput,
    NodeTrainResult,
    PrepareInput,
)
from app.db import session_scope
from app.neural import distributed, store
from app.neural.models import NeuralJob
from app.neural.training import TrainingDivergedError, dump_params, load_params
from app.settings import Settings
from app.tools import ToolContext, ToolError, invoke_tool, load_tools
from tests.neural.conftest import node_workers, one_worker_plan
from tests.support.replay import replay_run, replay_saved
from workers.registry import all_workflows

load_tools()

# Plain SGD at this rate makes the loss of a 64-64 (or a nano) feedforward
# model on digits NaN within the first epoch at batch size 32.
DIVERGING = {"learning_rate": 10.0, "optimizer": "sgd"}


class DivergingNode(NodeActivities):
    """A worker that trains at a learning rate that diverges, whatever the
    session requests."""

    @activity.defn(name="neural_node_train")
    def node_train(self, request: NodeTrainInput) -> NodeTrainResult:
        return super().node_train(request.model_copy(update=DIVERGING))


async def _cluster(ctx: ToolContext, roles: list[str]) -> tuple[str, list[str]]:
    """Create a feedforward cluster whose nodes train a 64-64 model."""
    cluster = await invoke_tool(
        ctx, "neural_cluster_init", {"name": "diverging", "architecture": "feedforward"}
    )
    nodes = []
    for role in roles:
        node = await invoke_tool(
            ctx,
            "neural_node_deploy",
            {
                "cluster_id": cluster["cluster_id"],
                "role": role,
                "model": "custom",
                "layers": [64, 64],
            },
        )
        nodes.append(node["node_id"])
    return cluster["cluster_id"], nodes


async def _activity_attempts(client: Client, workflow_id: str) -> list[int]:
    """Return the attempt of each started activity in a workflow's history;
    a retried activity shows only its last attempt."""
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    return [
        event.activity_task_started_event_attributes.attempt
        for event in history.events
        if event.HasField("activity_task_started_event_attributes")
    ]


async def test_diverged_job_fails_once(
    client: Client, neural_workers: Settings
) -> None:
    ctx = ToolContext(neural_workers, temporal_client=client)
    config = {
        "architecture": {"type": "feedforward"},
        "training": {"epochs": 2, **DIVERGING},
    }
    with pytest.raises(ToolError) as caught:
        await invoke_tool(
            ctx, "neural_train", {"config": config, "dataset": "digits", "tier": "nano"}
        )
    expected = "training diverged: loss is NaN at epoch 1; lower learning_rate (now 10)"
    message = caught.value.message
    assert re.fullmatch(rf"training job job_\w+ failed: {re.escape(expected)}", message)
    # The arguments caused it, so a workflow step does not train again.
    assert caught.value.kind == "invalid_argument"
    with session_scope(neural_workers.effective_database_url) as session:
        job = session.exec(select(NeuralJob)).one()
    assert job.status == "failed"
    assert job.error == expected
    assert job.epochs_completed == 0
    status = await invoke_tool(ctx, "neural_training_status", {"job_id": job.id})
    assert status["epochs"] == []
    # Not retried: the one attempt failed for good.
    assert await _activity_attempts(client, job.workflow_id) == [1, 1]
    await replay_run(client, job.workflow_id, all_workflows())


async def test_diverged_workers_fail_session_at_once(
    client: Client, neural_workers: Settings
) -> None:
    ctx = ToolContext(neural_workers, temporal_client=client)
    cluster_id, nodes = await _cluster(ctx, ["worker", "worker"])
    started_at = time.monotonic()
    async with node_workers(client, neural_workers, nodes):
        with pytest.raises(ToolError) as caught:
            await invoke_tool(
                ctx,
                "neural_train_distributed",
                {
                    "cluster_id": cluster_id,
                    "dataset": "digits",
                    "epochs": 2,
                    "batch_size": 32,
                    "federated": True,
                    "round_timeout_seconds": 300,
                    "wait": True,
                    **DIVERGING,
                },
            )
    # The nodes fail without a retry, so the round does not wait out its
    # timeout.
    assert time.monotonic() - started_at < 120

    status = await invoke_tool(ctx, "neural_cluster_status", {"cluster_id": cluster_id})
    session = status["sessions"][0]
    problems = [f"{node} (loss is NaN at local epoch 1 of round 0)" for node in nodes]
    error = (
        f"training diverged on worker nodes {', '.join(problems)}; lower "
        "learning_rate (now 10)"
    )
    assert caught.value.message == f"session {session['session_id']} failed: {error}"
    assert session["status"] == "failed"
    assert session["error"] == error
    assert session["rounds_completed"] == 0

    events = {e["node_id"]: e for e in session["events"]}
    assert set(events) == set(nodes)
    for node in nodes:
        assert events[node]["kind"] == "diverged"
        assert events[node]["reason"] == (
            "training diverged: loss is NaN at local epoch 1 of round 0; lower "
            "learning_rate (now 10)"
        )

    workflow_id = f"neural-session-{session['session_id']}"
    attempts = await _activity_attempts(client, workflow_id)
    assert attempts
    assert set(attempts) == {1}
    await replay_run(client, workflow_id, all_workflows())


async def test_one_diverged_node_fails_session(
    client: Client, neural_workers: Settings
) -> None:
    ctx = ToolContext(neural_workers, temporal_client=client)
    cluster_id, nodes = await _cluster(
        ctx, ["parameter_server", "worker", "worker", "validator"]
    )
    _, good, bad, _ = nodes
    fake = DivergingNode(neural_workers, bad)
    started_at = time.monotonic()
    async with node_workers(
        client,
        neural_workers,
        nodes,
        {bad: [fake.node_train, fake.aggregate, fake.validate]},
    ):
        with pytest.raises(ToolError) as caught:
            await invoke_tool(
                ctx,
                "neural_train_distributed",
                {
                    "cluster_id": cluster_id,
                    "dataset": "digits",
                    "epochs": 2,
                    "batch_size": 32,
                    "learning_rate": 0.01,
                    "federated": True,
                    "wait": True,
                },
            )
    # The default round timeout is 300 s.
    assert time.monotonic() - started_at < 120
    error = (
        f"training diverged on worker node {bad} (loss is NaN at local epoch 1 of "
        "round 0); lower learning_rate (now 0.01)"
    )
    assert caught.value.message.endswith(f" failed: {error}")

    status = await invoke_tool(ctx, "neural_cluster_status", {"cluster_id": cluster_id})
    session = status["sessions"][0]
    assert session["status"] == "failed"
    assert session["error"] == error
    kinds = {e["node_id"]: e["kind"] for e in session["events"]}
    assert kinds == {good: "update", bad: "diverged"}

    await replay_run(client, f"neural-session-{session['session_id']}", all_workflows())


async def test_diverged_gradient_step_fails_session(
    client: Client, neural_workers: Settings
) -> None:
    ctx = ToolContext(neural_workers, temporal_client=client)
    cluster_id, nodes = await _cluster(ctx, ["worker", "worker"])
    async with node_workers(client, neural_workers, nodes):
        with pytest.raises(ToolError) as caught:
            await invoke_tool(
                ctx,
                "neural_train_distributed",
                {
                    "cluster_id": cluster_id,
                    "dataset": "digits",
                    "epochs": 1,
                    "batch_size": 32,
                    "wait": True,
                    **DIVERGING,
                },
            )
    # The first steps are finite, and a later step's loss overflows.
    node = "|".join(nodes)
    problem = r"loss is (NaN|infinite) at the gradient step of round [1-9]\d*"
    assert re.fullmatch(
        rf"session session_\w+ failed: training diverged on worker nodes? "
        rf"({node}) \({problem}\)(, ({node}) \({problem}\))?; lower "
        r"learning_rate \(now 10\)",
        caught.value.message,
    ), caught.value.message
    status = await invoke_tool(ctx, "neural_cluster_status", {"cluster_id": cluster_id})
    session = status["sessions"][0]
    assert session["rounds_completed"] > 0
    assert "diverged" in {e["kind"] for e in session["events"]}


async def test_session_before_divergence_patch_replays(client: Client) -> None:
    # Recorded with the workflow code before the patch: a worker whose
    # training diverged was left out of the round as missing, and the session
    # completed with the other worker.
    await replay_saved(client, "neural_session_before_divergence", all_workflows())


def test_diverged_global_model_fails_finish(neural_settings: Settings) -> None:
    plan = one_worker_plan("session_nan", learning_rate=10.0, optimizer="sgd")
    prepared = distributed.prepare_session(neural_settings, PrepareInput(plan=plan))
    params, _ = load_params(store.get_object(neural_settings, prepared.global_path))
    broken = jax.tree_util.tree_map(lambda leaf: np.full_like(leaf, np.nan), params)
    store.put_object(neural_settings, prepared.global_path, dump_params(broken))
    finish = FinishInput(
        plan=plan,
        data_path=prepared.data_path,
        global_path=prepared.global_path,
        rounds_completed=1,
        rounds_rejected=0,
        samples=0,
        train_seconds=1.0,
    )
    with pytest.raises(TrainingDivergedError) as caught:
        distributed.finish_session(neural_settings, finish)
    assert str(caught.value) == (
        "training diverged: test loss is NaN at the global model after 1 rounds; "
        "lower learning_rate (now 10)"
    )
    assert store.list_models(neural_settings) == []
