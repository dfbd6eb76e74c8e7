"""Plain JAX jit loop against `neural_train_distributed` over 2 worker nodes.

Both train the same 64-128-10 MLP on digits for the same number of samples
(epochs x training split, batch 128). Run: `python -m bench.neural
[--epochs N] [--rounds R]`. Prints samples per second of both, the ratio and
the test accuracy of both.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from temporalio.testing import WorkflowEnvironment

from app.contracts.queues import NEURAL, ORCHESTRATION
from app.db.migrate import upgrade
from app.neural import data, nets
from app.neural.training import loss_and_accuracy
from app.settings import Settings
from app.temporal.client import build_data_converter
from app.temporal.devserver import temporal_binary
from app.temporal.search_attributes import dev_server_args
from app.tools import ToolContext, invoke_tool, load_tools

WIDTH = 128
BATCH = 128
LEARNING_RATE = 0.003


def plain_loop(dataset: data.Dataset, epochs: int) -> tuple[float, float, int]:
    """A single-process jitted step per batch; returns samples/s, accuracy
    and samples trained. A first, compiling epoch runs before the clock."""
    spec = nets.ModelSpec("feedforward", dataset.features, dataset.classes, (WIDTH,))
    optimizer = optax.adam(LEARNING_RATE)
    params = nets.init_params(spec, 0)
    state = optimizer.init(params)

    @jax.jit
    def step(params: Any, state: Any, x: Any, y: Any) -> Any:
        (loss, _), grads = jax.value_and_grad(
            lambda p: loss_and_accuracy(p, x, y, spec), has_aux=True
        )(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    x, y = dataset.x_train, dataset.y_train
    steps = len(x) // BATCH
    samples = 0
    started = 0.0
    for epoch in range(epochs + 1):
        if epoch == 1:
            jax.block_until_ready(params)
            started = time.perf_counter()
        order = np.random.default_rng(epoch).permutation(len(x))
        for i in range(steps):
            chosen = order[i * BATCH : (i + 1) * BATCH]
            params, state, _ = step(params, state, x[chosen], y[chosen])
            if epoch >= 1:
                samples += BATCH
    jax.block_until_ready(params)
    seconds = time.perf_counter() - started
    _, accuracy = loss_and_accuracy(params, dataset.x_test, dataset.y_test, spec)
    return samples / seconds, float(accuracy), samples


async def distributed(epochs: int, rounds: int) -> tuple[float, float, dict[str, Any]]:
    """Run one warm-up session, then the timed session; the rate is samples
    trained over the session's wall time as the caller sees it."""
    from tests.conftest import running_workers
    from tests.neural.conftest import node_workers

    folder = Path(tempfile.mkdtemp(prefix="bench-neural-"))
    base = Settings(data_dir=folder, neural_embedded_nodes=False)
    upgrade(base.effective_database_url)
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(temporal_binary()),
        data_converter=build_data_converter(base),
        dev_server_extra_args=dev_server_args(),
    )
    try:
        client = env.client
        address = str(client.service_client.config.target_host)
        settings = base.model_copy(update={"temporal_address": address})
        load_tools()
        ctx = ToolContext(settings, temporal_client=client)
        cluster = await invoke_tool(
            ctx,
            "neural_cluster_init",
            {"name": "bench", "architecture": "feedforward", "consensus": "raft"},
        )
        ids = []
        for _ in range(2):
            node = await invoke_tool(
                ctx,
                "neural_node_deploy",
                {
                    "cluster_id": cluster["cluster_id"],
                    "model": "custom",
                    "layers": [WIDTH],
                },
            )
            ids.append(node["node_id"])
        arguments = {
            "cluster_id": cluster["cluster_id"],
            "dataset": "digits",
            "batch_size": BATCH,
            "learning_rate": LEARNING_RATE,
            "federated": True,
            "wait": True,
        }
        async with (
            running_workers(client, settings, [ORCHESTRATION, NEURAL]),
            node_workers(client, settings, ids),
        ):
            # The warm-up compiles the nodes' epoch function, as the plain
            # loop's untimed first epoch does.
            await invoke_tool(
                ctx, "neural_train_distributed", {**arguments, "epochs": 1, "rounds": 1}
            )
            started = time.perf_counter()
            result = await invoke_tool(
                ctx,
                "neural_train_distributed",
                {**arguments, "epochs": epochs, "rounds": rounds},
            )
            seconds = time.perf_counter() - started
        session = result["result"]
        return session["samples"] / seconds, session["accuracy"], session
    finally:
        await env.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    options = parser.parse_args()
    dataset = data.prepare("digits", Settings(), seed=0)
    plain_rate, plain_accuracy, plain_samples = plain_loop(dataset, options.epochs)
    rate, accuracy, session = asyncio.run(distributed(options.epochs, options.rounds))
    print(
        f"epochs {options.epochs}, rounds {options.rounds}, batch {BATCH}, "
        f"MLP 64-{WIDTH}-10"
    )
    print(
        f"plain jit loop:      {plain_rate:12.0f} samples/s  accuracy "
        f"{plain_accuracy:.4f}  ({plain_samples} samples)"
    )
    print(
        f"distributed 2 nodes: {rate:12.0f} samples/s  accuracy {accuracy:.4f}  "
        f"({session['samples']} samples, session wall time)"
    )
    print(f"ratio distributed/plain: {rate / plain_rate:.3f}")
    print(f"accuracy difference: {100 * (accuracy - plain_accuracy):+.2f} points")


if __name__ == "__main__":
    main()
