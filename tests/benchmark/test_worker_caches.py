"""State that a long-running worker keeps between benchmark cycles: compiled
trainers stay bounded, a repeated training on the same shapes compiles
nothing new, and per-agent sandbox locks go once they are used."""

from __future__ import annotations

import asyncio
import uuid

import numpy as np
from temporalio.client import Client

from app.contracts.queues import ORCHESTRATION, SANDBOX
from app.neural import nets, training
from app.sandbox import service as sandbox_service
from app.settings import Settings
from app.swarm.executor import SandboxSessionExecutor, agent_sandbox_id
from tests.conftest import running_workers


def _data(rows: int) -> tuple[np.ndarray, np.ndarray]:
    generator = np.random.default_rng(0)
    x = generator.normal(size=(rows, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    return x, y


def test_repeated_training_adds_no_compiled_entries() -> None:
    spec = nets.ModelSpec("feedforward", 8, 2, (16,))
    x, y = _data(64)
    trainer = training.get_trainer(spec, "sgd", 0.05)
    sizes = []
    for seed in range(3):
        params = nets.init_params(spec, seed)
        params, _, history = trainer.train(
            params,
            trainer.init_state(params),
            x,
            y,
            x,
            y,
            epochs=2,
            batch_size=16,
            seed=seed,
        )
        assert len(history) == 2
        assert training.get_trainer(spec, "sgd", 0.05) is trainer
        sizes.append((trainer._epoch._cache_size(), trainer._evaluate._cache_size()))
    # One executable per function after the first training, and no more after.
    assert sizes == [(1, 1)] * 3


def test_trainer_cache_has_a_bound() -> None:
    spec = nets.ModelSpec("feedforward", 8, 2, (4,))
    limit = training.TRAINER_CACHE_LIMIT
    first = training.get_trainer(spec, "sgd", 1e-6)
    for index in range(limit + 5):
        training.get_trainer(spec, "sgd", 1e-5 + index * 1e-6)
    assert training.cached_trainers() == limit
    assert training.get_trainer(spec, "sgd", 1e-6) is not first
    # The most recently used trainer stays cached.
    recent = training.get_trainer(spec, "sgd", 1e-5 + (limit + 4) * 1e-6)
    assert training.get_trainer(spec, "sgd", 1e-5 + (limit + 4) * 1e-6) is recent


async def test_sandbox_locks_go_after_use(client: Client, settings: Settings) -> None:
    settings = settings.model_copy(
        # A closed local port: no sandbox install ever leaves the machine.
        update={"sandbox_package_index": "http://127.0.0.1:9/simple"}
    )
    agent_id = f"agent_{uuid.uuid4().hex[:12]}"
    sandbox_id = agent_sandbox_id(agent_id)
    async with running_workers(client, settings, (ORCHESTRATION, SANDBOX)):
        executor = SandboxSessionExecutor(client, settings)
        try:
            ensured = await asyncio.gather(
                executor.ensure_sandbox(agent_id), executor.ensure_sandbox(agent_id)
            )
            assert ensured == [sandbox_id, sandbox_id]
            assert executor.ensuring() == 0
            # A sandbox that exists already is ensured without a new entry.
            assert await executor.ensure_sandbox(agent_id) == sandbox_id
            assert executor.ensuring() == 0
        finally:
            await sandbox_service.delete_sandbox(client, settings, sandbox_id)
