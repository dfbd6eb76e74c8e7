"""The architectures and model sizes that training jobs and clusters accept,
in a module without imports so that the CLI and the tools' input models can
name them without loading JAX."""

from __future__ import annotations

TRAIN_ARCHITECTURES = (
    "feedforward",
    "cnn",
    "lstm",
    "rnn",
    "transformer",
    "autoencoder",
    "hybrid",
    "gnn",
)
# A cluster's architecture and the model architecture its nodes train.
CLUSTER_ARCHITECTURES = {
    "transformer": "transformer",
    "cnn": "cnn",
    "rnn": "lstm",
    "gnn": "gnn",
    "hybrid": "hybrid",
    "feedforward": "feedforward",
}

# Bounds on a model's size, checked when a request is validated. 20 million
# float32 parameters take 80 MB, and training with Adam keeps about four
# times that (parameters, gradients and two moments). That estimate fits
# beside the other models that a shared nexus-neural worker trains.
# NOTE: activations are not bounded. For cnn, hybrid, gnn and transformer
# models they grow with batch size x features x width, so a data set with
# thousands of features can still exhaust a worker's memory.
MAX_LAYER_WIDTH = 4096
MAX_PARAMETERS = 20_000_000


def check_architecture(value: str) -> str:
    """Return `value` if it names an architecture that training accepts.

    Raises:
        ValueError: an unknown architecture, with the ones to choose from.
    """
    if value not in TRAIN_ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {value!r}; choose one of "
            f"{', '.join(TRAIN_ARCHITECTURES)}"
        )
    return value
