"""Clusters and distributed training over in-process node workers."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import numpy as np
import pytest
from temporalio import activity
from temporalio.client import Client

from activities.neural import NodeActivities
from app.contracts.neural import NodeTrainInput, NodeTrainResult
from app.neural import jobs, store
from app.neural.training import dump_params, load_params
from app.settings import Settings
from app.tools import ToolContext, ToolError, ToolInputError, invoke_tool, load_tools
from tests.neural.conftest import node_workers
from tests.support.replay import replay_run
from workers.registry import all_workflows

load_tools()


async def _cluster(
    ctx: ToolContext, roles: list[str], **init: object
) -> tuple[str, dict[str, list[str]]]:
    cluster = await invoke_tool(
        ctx,
        "neural_cluster_init",
        {"name": "test", "architecture": "feedforward", **init},
    )
    nodes: dict[str, list[str]] = {}
    for role in roles:
        node = await invoke_tool(
            ctx,
            "neural_node_deploy",
            {
                "cluster_id": cluster["cluster_id"],
                "role": role,
                "model": "custom",
                "layers": [32],
            },
        )
        nodes.setdefault(role, []).append(node["node_id"])
    return cluster["cluster_id"], nodes


def _all(nodes: dict[str, list[str]]) -> list[str]:
    return [n for ids in nodes.values() for n in ids]


async def test_federated_session_and_predictions(
    client: Client, neural_workers: Settings
) -> None:
    ctx = ToolContext(neural_workers, temporal_client=client)
    cluster_id, nodes = await _cluster(
        ctx, ["parameter_server", "worker", "worker", "validator"], topology="star"
    )
    wired = await invoke_tool(ctx, "neural_cluster_connect", {"cluster_id": cluster_id})
    assert wired["links"] == 3
    async with node_workers(client, neural_workers, _all(nodes)):
        started = await invoke_tool(
            ctx,
            "neural_train_distributed",
            {
                "cluster_id": cluster_id,
                "dataset": "digits",
                "epochs": 4,
                "rounds": 2,
                "batch_size": 64,
                "learning_rate": 0.01,
                "federated": True,
                "wait": True,
            },
        )
    result = started["result"]
    assert result["rounds_completed"] == 2
    assert result["rounds_rejected"] == 0
    assert result["accuracy"] > 0.85
    status = await invoke_tool(ctx, "neural_cluster_status", {"cluster_id": cluster_id})
    events = status["sessions"][0]["events"]
    assert sum(e["kind"] == "update" for e in events) == 4
    assert sum(e["kind"] == "accepted" and e["validated"] for e in events) == 2
    assert status["sessions"][0]["test_loss"] == result["loss"]
    listed = await invoke_tool(ctx, "neural_list_models", {"cluster_id": cluster_id})
    splits = {m["model_id"]: m["evaluated_on"] for m in listed["models"]}
    # Worker models are scored on the validator's hold-out, the global on test.
    assert splits == {
        result["model_id"]: "test",
        **{m: "holdout" for m in result["node_models"]},
    }
    test_losses = {m["model_id"]: m["test_loss"] for m in listed["models"]}
    assert test_losses[result["model_id"]] == result["loss"]
    assert all(test_losses[m] is None for m in result["node_models"])

    samples = np.asarray(
        __import__("sklearn.datasets").datasets.load_digits().data[:15]
    )
    expected = []
    for model_id in result["node_models"]:
        _, spec, params, mean, std = store.load_model(neural_workers, model_id)
        expected.append(jobs.predict_logits(spec, params, mean, std, samples.tolist()))
    mean_result = await invoke_tool(
        ctx,
        "neural_predict_distributed",
        {
            "cluster_id": cluster_id,
            "input_data": samples.tolist(),
            "aggregation": "mean",
        },
    )
    np.testing.assert_allclose(
        mean_result["probabilities"], np.mean(expected, axis=0), atol=1e-5
    )
    assert mean_result["classes"] == np.mean(expected, axis=0).argmax(axis=1).tolist()
    for aggregation in ("majority", "weighted", "ensemble"):
        other = await invoke_tool(
            ctx,
            "neural_predict_distributed",
            {
                "cluster_id": cluster_id,
                "input_data": samples.tolist(),
                "aggregation": aggregation,
            },
        )
        assert len(other["classes"]) == 15
        assert len(other["node_predictions"]) == 2
    await replay_run(client, started["workflow_id"], all_workflows())

    cleaned = await invoke_tool(
        ctx,
        "neural_cluster_optimize",
        {"cluster_id": cluster_id, "optimization": "memory_cleanup"},
    )
    assert cleaned["processes"]
    assert all(p["rss_before"] > 0 and p["rss_after"] > 0 for p in cleaned["processes"])
    # The nodes' workers run in this process: one report covers all of its
    # queues, and counts the trainers that the nodes' training compiled.
    pids = [(p["hostname"], p["pid"]) for p in cleaned["processes"]]
    assert len(pids) == len(set(pids))
    assert sum(p["compiled_trainers_cleared"] for p in cleaned["processes"]) >= 1
    assert cleaned["freed_bytes"] == sum(
        max(0, p["rss_before"] - p["rss_after"]) for p in cleaned["processes"]
    )
    ended = await invoke_tool(
        ctx, "neural_cluster_terminate", {"cluster_id": cluster_id}
    )
    assert ended["nodes_terminated"] == 4


async def test_gradient_averaging_hierarchical(
    client: Client, neural_workers: Settings
) -> None:
    ctx = ToolContext(neural_workers, temporal_client=client)
    cluster_id, nodes = await _cluster(
        ctx,
        ["parameter_server", "aggregator", "worker", "worker"],
        topology="hierarchical",
        consensus="raft",
    )
    wired = await invoke_tool(ctx, "neural_cluster_connect", {"cluster_id": cluster_id})
    parents = {n["node_id"]: n["parent_id"] for n in wired["nodes"]}
    aggregator = nodes["aggregator"][0]
    # Tree order: server 0, aggregator 1, workers 2 and 3; parent of i is (i-1)//2.
    assert parents[aggregator] == nodes["parameter_server"][0]
    assert parents[nodes["worker"][0]] == nodes["parameter_server"][0]
    assert parents[nodes["worker"][1]] == aggregator
    async with node_workers(client, neural_workers, _all(nodes)):
        started = await invoke_tool(
            ctx,
            "neural_train_distributed",
            {
                "cluster_id": cluster_id,
                "dataset": "iris",
                "epochs": 2,
                "batch_size": 32,
                "learning_rate": 0.05,
                "wait": True,
            },
        )
    result = started["result"]
    assert started["mode"] == "synchronous gradient averaging"
    assert result["rounds_completed"] >= 2
    status = await invoke_tool(ctx, "neural_cluster_status", {"cluster_id": cluster_id})
    kinds = [
        e["kind"] for e in status["sessions"][0]["events"] if e["node_id"] == aggregator
    ]
    assert kinds and set(kinds) == {"aggregated"}
    await replay_run(client, started["workflow_id"], all_workflows())


class CorruptingNode(NodeActivities):
    """A worker that trains honestly, then returns scrambled weights."""

    @activity.defn(name="neural_node_train")
    def node_train(self, request: NodeTrainInput) -> NodeTrainResult:
        result = super().node_train(request)
        params, _ = load_params(store.get_object(self.settings, result.update_path))
        rng = np.random.default_rng(0)
        import jax

        corrupted = jax.tree_util.tree_map(
            lambda leaf: np.asarray(leaf) + rng.normal(0, 50, np.shape(leaf)), params
        )
        store.put_object(self.settings, result.update_path, dump_params(corrupted))
        return result


async def test_proof_of_learning_rejects_corrupt_node(
    client: Client, neural_workers: Settings
) -> None:
    ctx = ToolContext(neural_workers, temporal_client=client)
    cluster_id, nodes = await _cluster(
        ctx, ["parameter_server", "worker", "worker", "validator"]
    )
    bad = nodes["worker"][1]
    fake = CorruptingNode(neural_workers, bad)
    async with node_workers(
        client,
        neural_workers,
        _all(nodes),
        {bad: [fake.node_train, fake.aggregate, fake.validate]},
    ):
        with pytest.raises(ToolError) as raised:
            await invoke_tool(
                ctx,
                "neural_train_distributed",
                {
                    "cluster_id": cluster_id,
                    "dataset": "digits",
                    "epochs": 2,
                    "rounds": 2,
                    "batch_size": 64,
                    "learning_rate": 0.01,
                    "federated": True,
                    "wait": True,
                },
            )
    # The model learned nothing, so the session fails rather than store the
    # untrained initial model as its result.
    assert "the validators rejected every round (2 of 2)" in raised.value.message
    assert "validation_tolerance (now 0.1)" in raised.value.message
    assert raised.value.kind == "invalid_argument"
    status = await invoke_tool(ctx, "neural_cluster_status", {"cluster_id": cluster_id})
    session = status["sessions"][0]
    assert session["status"] == "failed"
    assert session["rounds_rejected"] == 2
    assert session["model_id"] is None
    rejected = [e for e in session["events"] if e["kind"] == "rejected"]
    assert len(rejected) == 2
    assert all(e["candidate_loss"] > e["previous_loss"] for e in rejected)


async def test_proof_of_learning_keeps_accepted_rounds(
    client: Client, neural_workers: Settings
) -> None:
    """A session that has some rounds rejected and others accepted completes
    with the accepted model, and each worker's model is its update from the
    last accepted round, not from a rejected one."""
    ctx = ToolContext(neural_workers, temporal_client=client)
    cluster_id, nodes = await _cluster(ctx, ["worker", "worker", "validator"])
    bad = nodes["worker"][1]
    fake = LastRoundCorruptingNode(neural_workers, bad)
    async with node_workers(
        client,
        neural_workers,
        _all(nodes),
        {bad: [fake.node_train, fake.aggregate, fake.validate]},
    ):
        started = await invoke_tool(
            ctx,
            "neural_train_distributed",
            {
                "cluster_id": cluster_id,
                "dataset": "digits",
                "epochs": 2,
                "rounds": 2,
                "batch_size": 64,
                "learning_rate": 0.01,
                "federated": True,
                "wait": True,
            },
        )
    result = started["result"]
    assert result["rounds_rejected"] == 1
    models = await invoke_tool(ctx, "neural_list_models", {"cluster_id": cluster_id})
    by_node = {m["node_id"]: m for m in models["models"]}
    # Its scrambled update of round 1 would score about 0.1.
    assert by_node[bad]["accuracy"] > 0.5, by_node[bad]
    final, _ = load_params(
        store.get_object(neural_workers, f"models/{result['model_id']}.npz")
    )
    initial, _ = load_params(
        store.get_object(
            neural_workers, f"sessions/{started['session_id']}/global-0.npz"
        )
    )
    assert not np.allclose(final["dense_0"]["w"], initial["dense_0"]["w"])


class LastRoundCorruptingNode(CorruptingNode):
    """A worker that scrambles its weights in round 1 only."""

    @activity.defn(name="neural_node_train")
    def node_train(self, request: NodeTrainInput) -> NodeTrainResult:
        if request.round == 1:
            return super().node_train(request)
        return NodeActivities.node_train(self, request)


async def test_killed_node_resumes_from_checkpoint(
    client: Client, neural_workers: Settings
) -> None:
    from workers.neural_nodes import build_node_worker

    ctx = ToolContext(neural_workers, temporal_client=client)
    cluster_id, nodes = await _cluster(ctx, ["worker", "worker"])
    victim = nodes["worker"][0]
    survivor = build_node_worker(client, neural_workers, nodes["worker"][1])
    # No grace period: the running activity is cancelled at once, like a kill.
    worker = build_node_worker(
        client, neural_workers, victim, graceful_shutdown_seconds=0
    )
    async with survivor:
        run = asyncio.create_task(worker.run())
        started = await invoke_tool(
            ctx,
            "neural_train_distributed",
            {
                "cluster_id": cluster_id,
                "dataset": "digits",
                "epochs": 300,
                "rounds": 1,
                "batch_size": 8,
                "learning_rate": 0.01,
                "federated": True,
                "round_timeout_seconds": 240,
                "checkpoint_seconds": 0,
            },
        )
        checkpoint = f"sessions/{started['session_id']}/round-0/{victim}.checkpoint.npz"
        while not store.object_exists(neural_workers, checkpoint):
            await asyncio.sleep(0.2)
        await worker.shutdown()
        await run
        _, extra = load_params(store.get_object(neural_workers, checkpoint))
        stopped_after = int(extra["epoch"])
        assert 1 <= stopped_after < 300
        restarted = build_node_worker(client, neural_workers, victim)
        async with restarted:
            handle = client.get_workflow_handle(started["workflow_id"])
            await handle.result()
    status = await invoke_tool(ctx, "neural_cluster_status", {"cluster_id": cluster_id})
    session = status["sessions"][0]
    assert session["status"] == "completed"
    update = next(
        e for e in session["events"] if e["node_id"] == victim and e["kind"] == "update"
    )
    assert update["attempt"] >= 2
    assert update["resumed_from_epoch"] >= stopped_after
    await replay_run(client, started["workflow_id"], all_workflows())


async def test_silent_node_left_out(client: Client, neural_workers: Settings) -> None:
    ctx = ToolContext(neural_workers, temporal_client=client)
    cluster_id, nodes = await _cluster(ctx, ["worker", "worker"])
    # Only the first worker runs, so the second never returns a result.
    async with node_workers(client, neural_workers, nodes["worker"][:1]):
        started = await invoke_tool(
            ctx,
            "neural_train_distributed",
            {
                "cluster_id": cluster_id,
                "dataset": "iris",
                "epochs": 1,
                "batch_size": 64,
                "federated": True,
                "round_timeout_seconds": 20,
                "wait": True,
            },
        )
    status = await invoke_tool(ctx, "neural_cluster_status", {"cluster_id": cluster_id})
    missing = [e for e in status["sessions"][0]["events"] if e["kind"] == "missing"]
    assert [e["node_id"] for e in missing] == [nodes["worker"][1]]
    assert "no answer within 20 s" in missing[0]["reason"]
    assert started["result"]["rounds_completed"] == 1


@pytest.mark.parametrize("role", ["boss"])
async def test_bad_role_rejected(role: str, neural_settings: Settings) -> None:
    from app.tools import ToolError

    ctx = ToolContext(neural_settings)
    cluster = await invoke_tool(ctx, "neural_cluster_init", {"name": "x"})
    assert cluster["cluster_id"].startswith("dnc_")
    assert len(cluster["cluster_id"]) == 16
    with pytest.raises(ToolError, match="role: 'boss'"):
        await invoke_tool(
            ctx,
            "neural_node_deploy",
            {"cluster_id": cluster["cluster_id"], "role": role},
        )


async def test_inference_only_worker_and_terminated_cluster(
    client: Client, neural_workers: Settings
) -> None:
    from app.tools import ToolError

    ctx = ToolContext(neural_workers, temporal_client=client)
    cluster_id, nodes = await _cluster(ctx, ["worker"])
    trainer = nodes["worker"][0]
    idle = await invoke_tool(
        ctx,
        "neural_node_deploy",
        {"cluster_id": cluster_id, "role": "worker", "capabilities": ["inference"]},
    )
    assert idle["trains"] is False
    assert "without the training capability" in idle["note"]
    async with node_workers(client, neural_workers, [trainer]):
        started = await invoke_tool(
            ctx,
            "neural_train_distributed",
            {
                "cluster_id": cluster_id,
                "dataset": "iris",
                "epochs": 1,
                "batch_size": 64,
                "federated": True,
                "wait": True,
            },
        )
    assert started["workers"] == [trainer]
    assert list(started["left_out"]) == [idle["node_id"]]
    status = await invoke_tool(ctx, "neural_cluster_status", {"cluster_id": cluster_id})
    trains = {n["node_id"]: n["trains"] for n in status["nodes"]}
    assert trains == {trainer: True, idle["node_id"]: False}

    ended = await invoke_tool(
        ctx, "neural_cluster_terminate", {"cluster_id": cluster_id}
    )
    assert ended["nodes_terminated"] == 2
    status = await invoke_tool(ctx, "neural_cluster_status", {"cluster_id": cluster_id})
    assert status["status"] == "terminated"
    assert {n["node_id"]: n["status"] for n in status["nodes"]} == {
        trainer: "terminated",
        idle["node_id"]: "terminated",
    }
    with pytest.raises(ToolError, match=f"cluster {cluster_id} is terminated"):
        await invoke_tool(
            ctx,
            "neural_predict_distributed",
            {"cluster_id": cluster_id, "input_data": [[5.1, 3.5, 1.4, 0.2]]},
        )


async def test_custom_node_layers_must_be_positive(neural_settings: Settings) -> None:
    from app.tools import ToolError

    ctx = ToolContext(neural_settings)
    cluster = await invoke_tool(ctx, "neural_cluster_init", {"name": "x"})
    with pytest.raises(ToolError, match=r"layers\.1: 0 is invalid") as caught:
        await invoke_tool(
            ctx,
            "neural_node_deploy",
            {
                "cluster_id": cluster["cluster_id"],
                "model": "custom",
                "layers": [8, 0],
            },
        )
    assert caught.value.errors[0]["field"] == "layers.1"  # type: ignore[attr-defined]


async def test_node_model_size_bounded(neural_settings: Settings) -> None:
    from app.tools import ToolError

    ctx = ToolContext(neural_settings)
    cluster = await invoke_tool(
        ctx, "neural_cluster_init", {"name": "x", "architecture": "feedforward"}
    )
    cluster_id = cluster["cluster_id"]
    with pytest.raises(
        ToolError,
        match=r"layers\.0: 100000000 is invalid: Input should be less than or equal "
        "to 4096",
    ):
        await invoke_tool(
            ctx,
            "neural_node_deploy",
            {"cluster_id": cluster_id, "model": "custom", "layers": [100000000]},
        )
    # Each width is within bounds, so the deploy passes, but the parameter
    # count depends on the data set and is checked when training starts.
    await invoke_tool(
        ctx,
        "neural_node_deploy",
        {"cluster_id": cluster_id, "model": "custom", "layers": [4096, 4096, 4096]},
    )
    with pytest.raises(ToolError) as caught:
        await invoke_tool(
            ctx,
            "neural_train_distributed",
            {"cluster_id": cluster_id, "dataset": "digits"},
        )
    assert caught.value.kind == "invalid_argument"
    assert caught.value.message == (
        f"the worker nodes of cluster {cluster_id} have a model too large for this "
        "data set: the feedforward model with layers [4096, 4096, 4096] on 64 "
        "features and 10 classes has 33,869,834 parameters, more than the maximum "
        "of 20,000,000; use fewer or narrower layers"
    )


async def test_stopped_node_not_counted(
    client: Client, neural_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datetime import timedelta

    from app.services import health

    ctx = ToolContext(neural_settings, temporal_client=client)
    cluster_id, nodes = await _cluster(ctx, ["worker"])
    async with node_workers(client, neural_settings, nodes["worker"]):
        status = await invoke_tool(
            ctx, "neural_cluster_status", {"cluster_id": cluster_id}
        )
        assert status["nodes"][0]["pollers"] == 1
    # Temporal still lists the stopped worker's poller. A short staleness
    # limit makes its last poll old enough without waiting 90 s.
    monkeypatch.setattr(health, "POLLER_STALE_AFTER", timedelta(seconds=1))
    await asyncio.sleep(1.5)
    status = await invoke_tool(ctx, "neural_cluster_status", {"cluster_id": cluster_id})
    assert status["nodes"][0]["pollers"] == 0


async def test_rounds_need_federated(offline_settings: Settings) -> None:
    from app.tools import ToolError

    ctx = ToolContext(offline_settings)
    cluster_id, _ = await _cluster(ctx, ["worker"])
    arguments = {"cluster_id": cluster_id, "dataset": "iris", "epochs": 4, "rounds": 2}
    with pytest.raises(ToolError) as caught:
        await invoke_tool(ctx, "neural_train_distributed", arguments)
    problem = (
        "rounds applies only to federated training, because a synchronous "
        "session runs one gradient step per round (epochs x steps per epoch "
        "rounds in all); leave rounds out or set federated to true"
    )
    assert caught.value.kind == "invalid_argument"
    assert caught.value.message == (
        f"invalid arguments for neural_train_distributed: rounds: 2 is invalid: "
        f"{problem}"
    )
    assert caught.value.errors[0]["field"] == "rounds"  # type: ignore[attr-defined]
    # With federated, the same rounds pass validation, and the call fails
    # only because this Temporal address is unreachable.
    with pytest.raises(ToolError, match="cannot reach Temporal"):
        await invoke_tool(
            ctx, "neural_train_distributed", {**arguments, "federated": True}
        )


async def test_list_models_unknown_cluster(offline_settings: Settings) -> None:
    from app.tools import ToolError

    ctx = ToolContext(offline_settings)
    with pytest.raises(ToolError) as caught:
        await invoke_tool(ctx, "neural_list_models", {"cluster_id": "dnc_nope"})
    assert caught.value.kind == "not_found"
    assert caught.value.message == (
        "cluster 'dnc_nope' not found; create one with neural_cluster_init"
    )
    cluster_id, _ = await _cluster(ctx, ["worker"])
    listed = await invoke_tool(ctx, "neural_list_models", {"cluster_id": cluster_id})
    assert listed == {"models": [], "count": 0}


async def test_round_without_answers_recorded(
    client: Client, neural_workers: Settings
) -> None:
    """A round that no worker answers in time fails the session, names the
    timeout it may raise, and records each worker as missing."""
    ctx = ToolContext(neural_workers, temporal_client=client)
    cluster_id, nodes = await _cluster(ctx, ["worker", "worker"])
    # No node worker polls the nodes' queues.
    with pytest.raises(ToolError) as raised:
        await invoke_tool(
            ctx,
            "neural_train_distributed",
            {
                "cluster_id": cluster_id,
                "dataset": "iris",
                "epochs": 1,
                "federated": True,
                "round_timeout_seconds": 1,
                "wait": True,
            },
        )
    message = raised.value.message
    assert "no worker node answered in round 0 (no answer within 1 s)" in message
    assert "raise round_timeout_seconds (now 1)" in message
    assert "or train fewer local epochs per round (now 1) with more rounds" in message
    status = await invoke_tool(ctx, "neural_cluster_status", {"cluster_id": cluster_id})
    [session] = status["sessions"]
    assert session["status"] == "failed"
    missing = sorted(e["node_id"] for e in session["events"] if e["kind"] == "missing")
    assert missing == sorted(nodes["worker"])


async def test_connect_without_nodes_changes_nothing(
    client: Client, neural_workers: Settings
) -> None:
    ctx = ToolContext(neural_workers, temporal_client=client)
    cluster_id, _ = await _cluster(ctx, [], topology="mesh")
    with pytest.raises(ToolError) as refused:
        await invoke_tool(
            ctx,
            "neural_cluster_connect",
            {"cluster_id": cluster_id, "topology": "ring"},
        )
    assert refused.value.kind == "conflict"
    assert "has no nodes" in refused.value.message
    status = await invoke_tool(ctx, "neural_cluster_status", {"cluster_id": cluster_id})
    assert status["topology"] == "mesh"


async def test_layers_only_for_custom_nodes(
    client: Client, neural_workers: Settings
) -> None:
    ctx = ToolContext(neural_workers, temporal_client=client)
    cluster_id, _ = await _cluster(ctx, [])
    with pytest.raises(ToolInputError) as refused:
        await invoke_tool(
            ctx,
            "neural_node_deploy",
            {"cluster_id": cluster_id, "model": "large", "layers": [8]},
        )
    assert "model is 'large', whose widths are fixed" in refused.value.message


async def test_long_epoch_keeps_heartbeating(
    client: Client, neural_workers: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node whose epoch lasts longer than the heartbeat timeout finishes its
    round in its first attempt."""
    from app.neural import distributed

    settings = neural_workers.model_copy(
        update={"neural_node_heartbeat_timeout_seconds": 2.0}
    )
    real_get_trainer = distributed.get_trainer

    class SlowEpochTrainer:
        """A trainer whose first epoch takes 6 s, like a first compilation
        on a loaded machine, without a report in between."""

        def __init__(self, trainer: Any) -> None:
            self.trainer = trainer

        def __getattr__(self, name: str) -> Any:
            return getattr(self.trainer, name)

        def train(self, *args: Any, on_epoch: Any, **kwargs: Any) -> Any:
            def slow_on_epoch(metrics: Any, *rest: Any) -> None:
                if metrics.epoch == 1:
                    time.sleep(6)
                on_epoch(metrics, *rest)

            return self.trainer.train(*args, on_epoch=slow_on_epoch, **kwargs)

    monkeypatch.setattr(
        distributed,
        "get_trainer",
        lambda *args: SlowEpochTrainer(real_get_trainer(*args)),
    )
    ctx = ToolContext(settings, temporal_client=client)
    cluster_id, nodes = await _cluster(ctx, ["worker"])
    async with node_workers(client, settings, nodes["worker"]):
        started = await invoke_tool(
            ctx,
            "neural_train_distributed",
            {
                "cluster_id": cluster_id,
                "dataset": "iris",
                "epochs": 2,
                "rounds": 1,
                "batch_size": 64,
                "federated": True,
                "round_timeout_seconds": 60,
                "wait": True,
            },
        )
    assert started["status"] == "completed"
    status = await invoke_tool(ctx, "neural_cluster_status", {"cluster_id": cluster_id})
    [update] = [e for e in status["sessions"][0]["events"] if e["kind"] == "update"]
    assert update["attempt"] == 1
    assert update["resumed_from_epoch"] == 0


def test_node_attempts_never_overlap() -> None:
    """A node's next attempt starts only after the older one, which its
    cancellation cannot stop inside an epoch, has ended."""
    from activities.neural import _one_attempt_at_a_time

    order: list[str] = []
    old_entered = threading.Event()
    new_waiting = threading.Event()

    def old_attempt() -> None:
        with _one_attempt_at_a_time("session_x", "node_a"):
            old_entered.set()
            new_waiting.wait(10)
            # Still inside its epoch when the next attempt begins.
            time.sleep(0.5)
            order.append("old ended")

    def new_attempt() -> None:
        old_entered.wait(10)
        new_waiting.set()
        with _one_attempt_at_a_time("session_x", "node_a"):
            order.append("new started")

    threads = [
        threading.Thread(target=old_attempt),
        threading.Thread(target=new_attempt),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert order == ["old ended", "new started"]
    # Another session's attempt of the same node does not wait.
    with _one_attempt_at_a_time("session_y", "node_a"):
        order.append("other session")
    assert order[-1] == "other session"


@pytest.mark.parametrize(
    "capability", ["layers:100000", "layers:abc", "layers:", "layers:-5", "layers:8"]
)
async def test_layers_capability_rejected(
    capability: str, neural_settings: Settings
) -> None:
    ctx = ToolContext(neural_settings)
    cluster_id, _ = await _cluster(ctx, [])
    with pytest.raises(ToolInputError) as refused:
        await invoke_tool(
            ctx,
            "neural_node_deploy",
            {"cluster_id": cluster_id, "capabilities": ["training", capability]},
        )
    assert refused.value.kind == "invalid_argument"
    assert refused.value.errors[0]["field"] == "capabilities"  # type: ignore[attr-defined]
    assert f"{capability!r} sets layer widths" in refused.value.message
    assert "give model custom with layers" in refused.value.message
    status = await invoke_tool(ctx, "neural_cluster_status", {"cluster_id": cluster_id})
    assert status["nodes"] == []


@pytest.mark.parametrize("stored", ["layers:100000", "layers:abc", "layers:-5"])
async def test_stored_invalid_widths_rejected(
    stored: str, offline_settings: Settings
) -> None:
    """A node stored with invalid widths, as an older version accepted from
    capabilities, fails the training call with a conflict, not a crash."""
    from app.db import session_scope
    from app.neural.models import NeuralNode

    ctx = ToolContext(offline_settings)
    cluster_id, nodes = await _cluster(ctx, ["worker"])
    [node_id] = nodes["worker"]
    with session_scope(offline_settings.effective_database_url) as session:
        row = session.get(NeuralNode, node_id)
        assert row is not None
        row.capabilities = ["training", stored]
        session.add(row)
    with pytest.raises(ToolError) as refused:
        await invoke_tool(
            ctx,
            "neural_train_distributed",
            {"cluster_id": cluster_id, "dataset": "iris", "federated": True},
        )
    assert refused.value.kind == "conflict"
    assert f"node {node_id} has the invalid layer widths {stored!r}" in (
        refused.value.message
    )
    assert "deploy a new node with model custom" in refused.value.message


async def test_status_counts_omitted_sessions(offline_settings: Settings) -> None:
    from datetime import UTC, datetime, timedelta

    from app.neural.models import NeuralSession

    ctx = ToolContext(offline_settings)
    cluster_id, _ = await _cluster(ctx, ["worker"])
    start = datetime(2024, 1, 1, tzinfo=UTC)
    for index in range(12):
        store.add_record(
            offline_settings,
            NeuralSession(
                id=f"session_{index:02d}",
                cluster_id=cluster_id,
                workflow_id=f"neural-session-session_{index:02d}",
                status="completed",
                rounds_total=1,
                created_at=start + timedelta(minutes=index),
            ),
        )
    status = await invoke_tool(ctx, "neural_cluster_status", {"cluster_id": cluster_id})
    assert len(status["sessions"]) == 10
    assert status["sessions"][0]["session_id"] == "session_11"
    assert status["sessions_omitted"] == 2
    assert status["metrics"]["sessions"] == 12
    status = await invoke_tool(
        ctx, "neural_cluster_status", {"cluster_id": cluster_id, "session_limit": 12}
    )
    assert [s["session_id"] for s in status["sessions"]][-1] == "session_00"
    assert status["sessions_omitted"] == 0


async def test_worker_with_other_model_rejected(neural_settings: Settings) -> None:
    ctx = ToolContext(neural_settings)
    cluster_id, nodes = await _cluster(ctx, ["worker"])
    with pytest.raises(ToolError) as refused:
        await invoke_tool(
            ctx,
            "neural_node_deploy",
            {
                "cluster_id": cluster_id,
                "role": "worker",
                "model": "custom",
                "layers": [8],
            },
        )
    assert refused.value.kind == "conflict"
    assert refused.value.message == (
        f"cluster {cluster_id} trains a model with layers [32] (worker "
        f"{nodes['worker'][0]}, model 'custom'), and this worker's model 'custom' "
        "has layers [8]; averaging needs one model shape, so deploy the worker "
        "with the same model, or create a new cluster for the other model"
    )
    # The same model, a worker that does not train, and a validator pass.
    for arguments in [
        {"role": "worker", "model": "custom", "layers": [32]},
        {"role": "worker", "model": "large", "capabilities": ["inference"]},
        {"role": "validator", "model": "large"},
    ]:
        await invoke_tool(
            ctx, "neural_node_deploy", {"cluster_id": cluster_id, **arguments}
        )
    status = await invoke_tool(ctx, "neural_cluster_status", {"cluster_id": cluster_id})
    assert len(status["nodes"]) == 4
