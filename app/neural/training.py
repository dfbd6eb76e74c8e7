"""Training, evaluation and serialization of the JAX models with optax.

With `jit=True` (what a cluster's `wasmOptimization` selects) an epoch is one
XLA-compiled `lax.scan` over its batches; with `jit=False` every batch runs
op by op through the same functions, without compilation.
"""

from __future__ import annotations

import io
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from app.neural.nets import ModelSpec, Params, apply_model, autoencode

OPTIMIZERS = ("adam", "sgd", "rmsprop", "adagrad")


def make_optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
    """Return the optax optimizer `name`.

    Raises:
        ValueError: an unknown optimizer or a learning rate that is not positive.
    """
    if not learning_rate > 0:
        raise ValueError(f"learning_rate {learning_rate!r} must be greater than 0")
    factories = {
        "adam": optax.adam,
        "sgd": optax.sgd,
        "rmsprop": optax.rmsprop,
        "adagrad": optax.adagrad,
    }
    if name not in factories:
        raise ValueError(
            f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}"
        )
    return factories[name](learning_rate)


def loss_and_accuracy(
    params: Params, x: jax.Array, y: jax.Array, spec: ModelSpec
) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy (plus reconstruction error for the autoencoder) and
    the fraction of correct predictions."""
    if spec.architecture == "autoencoder":
        logits, reconstruction = autoencode(params, x, spec)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        loss = loss + jnp.mean((reconstruction - x) ** 2)
    else:
        logits = apply_model(params, x, spec)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == y)
    return loss, accuracy


# How many times the starting model's test loss an epoch's loss may reach
# before the training counts as diverged.
LOSS_GROWTH_LIMIT = 1000.0


class TrainingDivergedError(ValueError):
    """A loss that became NaN or infinite, after which training cannot recover.

    Attributes:
        metric: which loss is not finite, such as "loss is NaN".
        problem: the metric and where it happened, such as "loss is NaN at
            epoch 1".
        epoch: the epoch (1-based) whose loss is not finite, or None.
        learning_rate: the learning rate of the run, named in the fix.
    """

    def __init__(
        self, metric: str, where: str, learning_rate: float, epoch: int | None = None
    ) -> None:
        self.metric = metric
        self.problem = f"{metric} at {where}"
        self.epoch = epoch
        self.learning_rate = learning_rate
        super().__init__(
            f"training diverged: {self.problem}; lower learning_rate "
            f"(now {learning_rate:g})"
        )


def non_finite_name(value: float) -> str:
    """Name a non-finite value for a message: NaN or infinite."""
    return "NaN" if math.isnan(value) else "infinite"


@dataclass
class EpochMetrics:
    epoch: int
    loss: float
    accuracy: float
    val_loss: float
    val_accuracy: float
    seconds: float
    samples: int


@dataclass
class Trainer:
    """Compiled (or eager) training functions of one model and optimizer."""

    spec: ModelSpec
    optimizer_name: str
    learning_rate: float
    jit: bool = True
    optimizer: optax.GradientTransformation = field(init=False)

    def __post_init__(self) -> None:
        self.optimizer = make_optimizer(self.optimizer_name, self.learning_rate)
        spec, optimizer = self.spec, self.optimizer

        def loss(params: Params, x: jax.Array, y: jax.Array) -> Any:
            return loss_and_accuracy(params, x, y, spec)

        grad = jax.value_and_grad(loss, has_aux=True)

        def step(carry: Any, batch: Any) -> Any:
            params, opt_state = carry
            x, y = batch
            (value, accuracy), grads = grad(params, x, y)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), (value, accuracy)

        def epoch(params: Params, opt_state: Any, xs: jax.Array, ys: jax.Array) -> Any:
            (params, opt_state), (losses, accuracies) = jax.lax.scan(
                step, (params, opt_state), (xs, ys)
            )
            return params, opt_state, losses.mean(), accuracies.mean()

        def gradient(params: Params, x: jax.Array, y: jax.Array) -> Any:
            (value, accuracy), grads = grad(params, x, y)
            return grads, value, accuracy

        def apply_gradient(params: Params, opt_state: Any, grads: Params) -> Any:
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        self._step = step
        self._epoch = jax.jit(epoch) if self.jit else None
        self._evaluate = jax.jit(loss) if self.jit else loss
        self._gradient = jax.jit(gradient) if self.jit else gradient
        self._apply_gradient = jax.jit(apply_gradient) if self.jit else apply_gradient
        self._logits = (
            jax.jit(lambda p, x: apply_model(p, x, spec))
            if self.jit
            else (lambda p, x: apply_model(p, x, spec))
        )

    def init_state(self, params: Params) -> Any:
        return self.optimizer.init(params)

    def run_epoch(
        self,
        params: Params,
        opt_state: Any,
        x: np.ndarray,
        y: np.ndarray,
        batch_size: int,
        seed: int,
    ) -> tuple[Params, Any, float, float, int]:
        """Train one epoch on a seeded shuffle; a final partial batch is
        dropped so every step has one compiled shape."""
        batch = min(batch_size, len(x))
        steps = len(x) // batch
        order = np.random.default_rng(seed).permutation(len(x))[: steps * batch]
        xs = jnp.asarray(x[order].reshape(steps, batch, -1))
        ys = jnp.asarray(y[order].reshape(steps, batch))
        if self._epoch is not None:
            params, opt_state, loss, accuracy = self._epoch(params, opt_state, xs, ys)
            return params, opt_state, float(loss), float(accuracy), steps * batch
        losses, accuracies = [], []
        for i in range(steps):
            (params, opt_state), (loss, accuracy) = self._step(
                (params, opt_state), (xs[i], ys[i])
            )
            losses.append(float(loss))
            accuracies.append(float(accuracy))
        return (
            params,
            opt_state,
            float(np.mean(losses)),
            float(np.mean(accuracies)),
            steps * batch,
        )

    def evaluate(
        self, params: Params, x: np.ndarray, y: np.ndarray
    ) -> tuple[float, float]:
        loss, accuracy = self._evaluate(params, jnp.asarray(x), jnp.asarray(y))
        return float(loss), float(accuracy)

    def gradient(
        self, params: Params, x: np.ndarray, y: np.ndarray
    ) -> tuple[Params, float, float]:
        grads, loss, accuracy = self._gradient(params, jnp.asarray(x), jnp.asarray(y))
        return grads, float(loss), float(accuracy)

    def apply_gradient(self, params: Params, opt_state: Any, grads: Params) -> Any:
        return self._apply_gradient(params, opt_state, grads)

    def logits(self, params: Params, x: np.ndarray) -> np.ndarray:
        return np.asarray(self._logits(params, jnp.asarray(x, dtype=jnp.float32)))

    def train(
        self,
        params: Params,
        opt_state: Any,
        x: np.ndarray,
        y: np.ndarray,
        x_val: np.ndarray,
        y_val: np.ndarray,
        *,
        epochs: int,
        batch_size: int,
        seed: int,
        start_epoch: int = 0,
        on_epoch: Callable[[EpochMetrics, Params, Any], None] | None = None,
    ) -> tuple[Params, Any, list[EpochMetrics]]:
        """Train epochs `start_epoch`..`epochs - 1`, calling `on_epoch` after each.

        Raises:
            TrainingDivergedError: an epoch's training or test loss is NaN,
                infinite, or over LOSS_GROWTH_LIMIT times the starting model's
                test loss. That epoch never reaches `on_epoch`, so only the
                epochs before it are recorded.
        """
        history: list[EpochMetrics] = []
        # A loss that grows this far past the starting model's has run away,
        # even while it is finite: the model it leaves predicts no better.
        start_loss, _ = self.evaluate(params, x_val, y_val)
        for epoch in range(start_epoch, epochs):
            started = time.perf_counter()
            params, opt_state, loss, accuracy, samples = self.run_epoch(
                params, opt_state, x, y, batch_size, seed * 1000 + epoch
            )
            val_loss, val_accuracy = self.evaluate(params, x_val, y_val)
            metrics = EpochMetrics(
                epoch=epoch + 1,
                loss=loss,
                accuracy=accuracy,
                val_loss=val_loss,
                val_accuracy=val_accuracy,
                seconds=time.perf_counter() - started,
                samples=samples,
            )
            for name, value in (("loss", loss), ("test loss", val_loss)):
                if not math.isfinite(value):
                    raise TrainingDivergedError(
                        f"{name} is {non_finite_name(value)}",
                        f"epoch {epoch + 1}",
                        self.learning_rate,
                        epoch + 1,
                    )
                if 0 < start_loss < math.inf and value > LOSS_GROWTH_LIMIT * start_loss:
                    raise TrainingDivergedError(
                        f"{name} is {value:.4g}, over {LOSS_GROWTH_LIMIT:g} times the "
                        f"starting model's test loss of {start_loss:.4g},",
                        f"epoch {epoch + 1}",
                        self.learning_rate,
                        epoch + 1,
                    )
            history.append(metrics)
            if on_epoch is not None:
                on_epoch(metrics, params, opt_state)
        return params, opt_state, history


# Each trainer keeps the XLA executables of its model, and the key includes
# the learning rate and layer widths that a caller chooses. A long-running
# worker that sees many models would otherwise keep every one of them, so
# the least recently used trainer is dropped once this many are cached.
TRAINER_CACHE_LIMIT = 16
_trainers: OrderedDict[tuple[Any, ...], Trainer] = OrderedDict()
_trainers_lock = threading.Lock()


def get_trainer(
    spec: ModelSpec, optimizer: str, learning_rate: float, jit: bool = True
) -> Trainer:
    """Return a cached trainer, so repeated rounds reuse compiled functions."""
    key = (spec, optimizer, learning_rate, jit)
    with _trainers_lock:
        trainer = _trainers.get(key)
        if trainer is None:
            trainer = Trainer(spec, optimizer, learning_rate, jit)
            _trainers[key] = trainer
            while len(_trainers) > TRAINER_CACHE_LIMIT:
                _trainers.popitem(last=False)
        else:
            _trainers.move_to_end(key)
        return trainer


def cached_trainers() -> int:
    """Return the number of cached trainers, each with its compiled functions."""
    with _trainers_lock:
        return len(_trainers)


def clear_compiled() -> int:
    """Drop cached trainers and JAX's compilation caches; return how many
    trainers were dropped."""
    with _trainers_lock:
        count = len(_trainers)
        _trainers.clear()
    jax.clear_caches()
    return count


# Serialization --------------------------------------------------------------


def flatten_tree(tree: Params, prefix: str = "") -> dict[str, np.ndarray]:
    flat: dict[str, np.ndarray] = {}
    for key in sorted(tree):
        value = tree[key]
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_tree(value, f"{name}/"))
        else:
            flat[name] = np.asarray(value)
    return flat


def unflatten_tree(flat: dict[str, np.ndarray]) -> Params:
    tree: Params = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = jnp.asarray(value)
    return tree


def dump_params(params: Params, extra: dict[str, np.ndarray] | None = None) -> bytes:
    """Serialize a parameter tree (and optional `__`-prefixed arrays) as NPZ."""
    arrays = flatten_tree(params)
    for key, value in (extra or {}).items():
        arrays[f"__{key}"] = np.asarray(value)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def load_params(blob: bytes) -> tuple[Params, dict[str, np.ndarray]]:
    """Inverse of `dump_params`: the tree and the extra arrays."""
    with np.load(io.BytesIO(blob)) as archive:
        flat = {name: archive[name] for name in archive.files}
    extra = {k[2:]: v for k, v in flat.items() if k.startswith("__")}
    tree = unflatten_tree({k: v for k, v in flat.items() if not k.startswith("__")})
    return tree, extra


def dump_state(state: Any) -> bytes:
    """Serialize an optimizer state's leaves; `load_state` restores them into
    the structure of a fresh `optimizer.init`."""
    leaves = jax.tree_util.tree_leaves(state)
    buffer = io.BytesIO()
    np.savez(buffer, *[np.asarray(leaf) for leaf in leaves])
    return buffer.getvalue()


def load_state(blob: bytes, template: Any) -> Any:
    structure = jax.tree_util.tree_structure(template)
    with np.load(io.BytesIO(blob)) as archive:
        leaves = [jnp.asarray(archive[f"arr_{i}"]) for i in range(len(archive.files))]
    return jax.tree_util.tree_unflatten(structure, leaves)


def weighted_average(trees: list[Params], weights: list[float]) -> Params:
    """Average parameter trees leaf by leaf, weighted (federated averaging).

    Raises:
        ValueError: no trees, mismatched lengths or a non-positive total weight.
    """
    if not trees or len(trees) != len(weights):
        raise ValueError(
            f"need one weight per tree, got {len(trees)} trees and "
            f"{len(weights)} weights"
        )
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights {weights} sum to {total}; it must be positive")
    scaled = [
        jax.tree_util.tree_map(lambda leaf, w=w: leaf * (w / total), tree)
        for tree, w in zip(trees, weights, strict=True)
    ]
    return jax.tree_util.tree_map(lambda *leaves: sum(leaves[1:], leaves[0]), *scaled)
