"""Model architectures in plain JAX: parameter trees and apply functions.

Every model maps a batch of feature vectors `x` (shape `(n, features)`) to
class logits. Convolutional, recurrent, attention and graph models read the
feature vector as a grid: a square number of features (digits: 64) becomes a
square image, or a sequence of rows; any other count becomes one row.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from app.neural.architectures import MAX_LAYER_WIDTH, MAX_PARAMETERS

Params = dict[str, Any]

ARCHITECTURES = (
    "feedforward",
    "cnn",
    "lstm",
    "rnn",
    "transformer",
    "autoencoder",
    "hybrid",
    "gnn",
)

# Width and depth of the main stage of each size. Node models map onto tiers:
# base = small, large = medium, xl = large.
TIERS: dict[str, tuple[int, int]] = {
    "nano": (16, 1),
    "mini": (32, 1),
    "small": (64, 2),
    "medium": (128, 2),
    "large": (256, 3),
}
NODE_MODEL_TIERS = {"base": "small", "large": "medium", "xl": "large"}


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model's functions: architecture, input
    and output sizes, and the widths of its layers."""

    architecture: str
    features: int
    classes: int
    widths: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "features": self.features,
            "classes": self.classes,
            "widths": list(self.widths),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(
            architecture=str(data["architecture"]),
            features=int(data["features"]),
            classes=int(data["classes"]),
            widths=tuple(int(w) for w in data["widths"]),
        )


def layer_widths(tier: str, layers: list[Any] | None) -> tuple[int, ...]:
    """Widths from explicit `layers` (ints or objects with `units`), else from
    the tier's width and depth.

    Raises:
        ValueError: an unknown tier, or a layer without a positive width or
            wider than `MAX_LAYER_WIDTH`.
    """
    if layers:
        widths: list[int] = []
        for index, layer in enumerate(layers):
            units = (
                layer.get("units", layer.get("size"))
                if isinstance(layer, dict)
                else layer
            )
            if not isinstance(units, int) or isinstance(units, bool) or units < 1:
                raise ValueError(
                    f"layers[{index}]={layer!r} has no positive width; give an "
                    'integer such as 64 or an object such as {"units": 64}'
                )
            if units > MAX_LAYER_WIDTH:
                raise ValueError(
                    f"layers[{index}]={layer!r} is wider than the maximum of "
                    f"{MAX_LAYER_WIDTH} units; give at most {MAX_LAYER_WIDTH}"
                )
            widths.append(units)
        return tuple(widths)
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; choose one of {', '.join(TIERS)}")
    width, depth = TIERS[tier]
    return tuple([width] * depth)


def grid_shape(features: int) -> tuple[int, int]:
    """Rows and columns that the grid models read a feature vector as."""
    side = math.isqrt(features)
    if side * side == features and side > 1:
        return side, side
    return 1, features


def _dense(key: jax.Array, n_in: int, n_out: int) -> Params:
    scale = math.sqrt(2.0 / n_in)
    return {
        "w": jax.random.normal(key, (n_in, n_out)) * scale,
        "b": jnp.zeros((n_out,)),
    }


def _apply_dense(layer: Params, x: jax.Array) -> jax.Array:
    return x @ layer["w"] + layer["b"]


# Feedforward ---------------------------------------------------------------


def _init_feedforward(key: jax.Array, spec: ModelSpec) -> Params:
    sizes = [spec.features, *spec.widths, spec.classes]
    keys = jax.random.split(key, len(sizes) - 1)
    return {
        f"dense_{i}": _dense(keys[i], sizes[i], sizes[i + 1])
        for i in range(len(sizes) - 1)
    }


def _apply_feedforward(params: Params, x: jax.Array, spec: ModelSpec) -> jax.Array:
    count = len(spec.widths) + 1
    for i in range(count):
        x = _apply_dense(params[f"dense_{i}"], x)
        if i < count - 1:
            x = jax.nn.relu(x)
    return x


# Convolutional -------------------------------------------------------------


def _kernel(rows: int) -> tuple[int, int]:
    return (3, 3) if rows > 1 else (1, 3)


def _init_conv_stack(key: jax.Array, rows: int, channels: tuple[int, ...]) -> Params:
    kh, kw = _kernel(rows)
    params: Params = {}
    keys = jax.random.split(key, len(channels))
    c_in = 1
    for i, c_out in enumerate(channels):
        scale = math.sqrt(2.0 / (kh * kw * c_in))
        params[f"conv_{i}"] = {
            "w": jax.random.normal(keys[i], (kh, kw, c_in, c_out)) * scale,
            "b": jnp.zeros((c_out,)),
        }
        c_in = c_out
    return params


def _apply_conv_stack(params: Params, images: jax.Array, count: int) -> jax.Array:
    """Same-padded convolutions with ReLU; images are NHWC."""
    for i in range(count):
        layer = params[f"conv_{i}"]
        images = jax.lax.conv_general_dilated(
            images,
            layer["w"],
            window_strides=(1, 1),
            padding="SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        images = jax.nn.relu(images + layer["b"])
    return images


def _as_images(x: jax.Array, spec: ModelSpec) -> jax.Array:
    rows, cols = grid_shape(spec.features)
    return x.reshape((x.shape[0], rows, cols, 1))


def _init_cnn(key: jax.Array, spec: ModelSpec) -> Params:
    rows, _ = grid_shape(spec.features)
    conv_key, head_key = jax.random.split(key)
    params = _init_conv_stack(conv_key, rows, spec.widths)
    params["head"] = _dense(head_key, spec.widths[-1], spec.classes)
    return params


def _apply_cnn(params: Params, x: jax.Array, spec: ModelSpec) -> jax.Array:
    features = _apply_conv_stack(params, _as_images(x, spec), len(spec.widths))
    pooled = features.mean(axis=(1, 2))
    return _apply_dense(params["head"], pooled)


# Recurrent (LSTM; `rnn` is the same LSTM stack) ----------------------------


def _as_sequence(x: jax.Array, spec: ModelSpec) -> jax.Array:
    rows, cols = grid_shape(spec.features)
    if rows == 1:
        return x.reshape((x.shape[0], cols, 1))
    return x.reshape((x.shape[0], rows, cols))


def _init_lstm_cell(key: jax.Array, n_in: int, hidden: int) -> Params:
    k1, k2 = jax.random.split(key)
    return {
        "wx": jax.random.normal(k1, (n_in, 4 * hidden)) / math.sqrt(n_in),
        "wh": jax.random.normal(k2, (hidden, 4 * hidden)) / math.sqrt(hidden),
        # A forget-gate bias of 1 keeps early gradients flowing.
        "b": jnp.zeros((4 * hidden,)).at[hidden : 2 * hidden].set(1.0),
    }


def _run_lstm(cell: Params, sequence: jax.Array) -> jax.Array:
    """Run one LSTM layer over `(batch, time, features)`; return all states."""
    hidden = cell["wh"].shape[0]
    batch = sequence.shape[0]

    def step(carry: tuple[jax.Array, jax.Array], x_t: jax.Array) -> Any:
        h, c = carry
        gates = x_t @ cell["wx"] + h @ cell["wh"] + cell["b"]
        i, f, g, o = jnp.split(gates, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h

    zeros = jnp.zeros((batch, hidden))
    _, states = jax.lax.scan(step, (zeros, zeros), jnp.swapaxes(sequence, 0, 1))
    return jnp.swapaxes(states, 0, 1)


def _init_lstm(key: jax.Array, spec: ModelSpec) -> Params:
    rows, cols = grid_shape(spec.features)
    n_in = cols if rows > 1 else 1
    keys = jax.random.split(key, len(spec.widths) + 1)
    params: Params = {}
    for i, hidden in enumerate(spec.widths):
        params[f"lstm_{i}"] = _init_lstm_cell(keys[i], n_in, hidden)
        n_in = hidden
    params["head"] = _dense(keys[-1], n_in, spec.classes)
    return params


def _apply_lstm(params: Params, x: jax.Array, spec: ModelSpec) -> jax.Array:
    states = _as_sequence(x, spec)
    for i in range(len(spec.widths)):
        states = _run_lstm(params[f"lstm_{i}"], states)
    return _apply_dense(params["head"], states[:, -1, :])


# Transformer ---------------------------------------------------------------


def _layer_norm(layer: Params, x: jax.Array) -> jax.Array:
    mean = x.mean(axis=-1, keepdims=True)
    variance = x.var(axis=-1, keepdims=True)
    return (x - mean) / jnp.sqrt(variance + 1e-5) * layer["scale"] + layer["bias"]


def _init_norm(width: int) -> Params:
    return {"scale": jnp.ones((width,)), "bias": jnp.zeros((width,))}


def _heads(width: int) -> int:
    return 4 if width % 4 == 0 and width >= 16 else 1


def _init_block(key: jax.Array, width: int) -> Params:
    keys = jax.random.split(key, 4)
    return {
        "norm_1": _init_norm(width),
        "qkv": _dense(keys[0], width, 3 * width),
        "out": _dense(keys[1], width, width),
        "norm_2": _init_norm(width),
        "mlp_in": _dense(keys[2], width, 2 * width),
        "mlp_out": _dense(keys[3], 2 * width, width),
    }


def _apply_block(block: Params, tokens: jax.Array) -> jax.Array:
    batch, length, width = tokens.shape
    heads = _heads(width)
    normed = _layer_norm(block["norm_1"], tokens)
    q, k, v = jnp.split(_apply_dense(block["qkv"], normed), 3, axis=-1)

    def split_heads(t: jax.Array) -> jax.Array:
        return t.reshape(batch, length, heads, width // heads).transpose(0, 2, 1, 3)

    q, k, v = split_heads(q), split_heads(k), split_heads(v)
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(width // heads)
    attended = jax.nn.softmax(scores, axis=-1) @ v
    merged = attended.transpose(0, 2, 1, 3).reshape(batch, length, width)
    tokens = tokens + _apply_dense(block["out"], merged)
    hidden = jax.nn.gelu(
        _apply_dense(block["mlp_in"], _layer_norm(block["norm_2"], tokens))
    )
    return tokens + _apply_dense(block["mlp_out"], hidden)


def _init_transformer(key: jax.Array, spec: ModelSpec) -> Params:
    rows, cols = grid_shape(spec.features)
    length, token_size = (rows, cols) if rows > 1 else (cols, 1)
    width = spec.widths[0]
    keys = jax.random.split(key, len(spec.widths) + 3)
    params: Params = {
        "embed": _dense(keys[0], token_size, width),
        "position": jax.random.normal(keys[1], (length, width)) * 0.02,
        "norm": _init_norm(width),
        "head": _dense(keys[2], width, spec.classes),
    }
    for i in range(len(spec.widths)):
        params[f"block_{i}"] = _init_block(keys[3 + i], width)
    return params


def _apply_transformer(params: Params, x: jax.Array, spec: ModelSpec) -> jax.Array:
    tokens = _apply_dense(params["embed"], _as_sequence(x, spec)) + params["position"]
    for i in range(len(spec.widths)):
        tokens = _apply_block(params[f"block_{i}"], tokens)
    pooled = _layer_norm(params["norm"], tokens).mean(axis=1)
    return _apply_dense(params["head"], pooled)


# Autoencoder ---------------------------------------------------------------


def _init_autoencoder(key: jax.Array, spec: ModelSpec) -> Params:
    encoder = [spec.features, *spec.widths]
    decoder = list(reversed(encoder))
    keys = jax.random.split(key, len(encoder) + len(decoder))
    params: Params = {}
    for i in range(len(encoder) - 1):
        params[f"encode_{i}"] = _dense(keys[i], encoder[i], encoder[i + 1])
    for i in range(len(decoder) - 1):
        params[f"decode_{i}"] = _dense(
            keys[len(encoder) + i], decoder[i], decoder[i + 1]
        )
    params["head"] = _dense(keys[-1], spec.widths[-1], spec.classes)
    return params


def autoencode(
    params: Params, x: jax.Array, spec: ModelSpec
) -> tuple[jax.Array, jax.Array]:
    """Return the autoencoder's class logits (from the code) and reconstruction."""
    code = x
    for i in range(len(spec.widths)):
        code = jax.nn.relu(_apply_dense(params[f"encode_{i}"], code))
    reconstruction = code
    for i in range(len(spec.widths)):
        reconstruction = _apply_dense(params[f"decode_{i}"], reconstruction)
        if i < len(spec.widths) - 1:
            reconstruction = jax.nn.relu(reconstruction)
    return _apply_dense(params["head"], code), reconstruction


def _apply_autoencoder(params: Params, x: jax.Array, spec: ModelSpec) -> jax.Array:
    return autoencode(params, x, spec)[0]


# Hybrid: convolution, then an LSTM over the feature map's rows, then a head.


def _init_hybrid(key: jax.Array, spec: ModelSpec) -> Params:
    rows, cols = grid_shape(spec.features)
    channels = spec.widths[0]
    hidden = spec.widths[-1]
    conv_key, lstm_key, head_key = jax.random.split(key, 3)
    params = _init_conv_stack(conv_key, rows, (channels,))
    step_size = cols * channels if rows > 1 else channels
    params["lstm"] = _init_lstm_cell(lstm_key, step_size, hidden)
    params["head"] = _dense(head_key, hidden, spec.classes)
    return params


def _apply_hybrid(params: Params, x: jax.Array, spec: ModelSpec) -> jax.Array:
    rows, _ = grid_shape(spec.features)
    maps = _apply_conv_stack(params, _as_images(x, spec), 1)
    batch = maps.shape[0]
    # Rows of the feature map are the time steps; a single-row input steps
    # over its columns instead.
    steps = (
        maps.reshape(batch, rows, -1)
        if rows > 1
        else maps.reshape(batch, maps.shape[2], -1)
    )
    states = _run_lstm(params["lstm"], steps)
    return _apply_dense(params["head"], states[:, -1, :])


# Graph: each feature is a graph node joined to its grid neighbours.


def grid_adjacency(features: int) -> jax.Array:
    """Symmetrically normalized adjacency with self-loops of the feature grid."""
    rows, cols = grid_shape(features)
    adjacency = jnp.eye(features)
    for r in range(rows):
        for c in range(cols):
            i = r * cols + c
            for dr, dc in ((0, 1), (1, 0)):
                rr, cc = r + dr, c + dc
                if rr < rows and cc < cols:
                    j = rr * cols + cc
                    adjacency = adjacency.at[i, j].set(1.0).at[j, i].set(1.0)
    degree = adjacency.sum(axis=1)
    inverse_root = 1.0 / jnp.sqrt(degree)
    return adjacency * inverse_root[:, None] * inverse_root[None, :]


def _init_gnn(key: jax.Array, spec: ModelSpec) -> Params:
    sizes = [1, *spec.widths]
    keys = jax.random.split(key, len(sizes))
    params: Params = {
        f"graph_{i}": _dense(keys[i], sizes[i], sizes[i + 1])
        for i in range(len(sizes) - 1)
    }
    params["head"] = _dense(keys[-1], spec.widths[-1], spec.classes)
    return params


def _apply_gnn(params: Params, x: jax.Array, spec: ModelSpec) -> jax.Array:
    adjacency = grid_adjacency(spec.features)
    nodes = x[:, :, None]
    for i in range(len(spec.widths)):
        nodes = jax.nn.relu(adjacency @ _apply_dense(params[f"graph_{i}"], nodes))
    return _apply_dense(params["head"], nodes.mean(axis=1))


_INIT: dict[str, Callable[[jax.Array, ModelSpec], Params]] = {
    "feedforward": _init_feedforward,
    "cnn": _init_cnn,
    "lstm": _init_lstm,
    "rnn": _init_lstm,
    "transformer": _init_transformer,
    "autoencoder": _init_autoencoder,
    "hybrid": _init_hybrid,
    "gnn": _init_gnn,
}
_APPLY: dict[str, Callable[[Params, jax.Array, ModelSpec], jax.Array]] = {
    "feedforward": _apply_feedforward,
    "cnn": _apply_cnn,
    "lstm": _apply_lstm,
    "rnn": _apply_lstm,
    "transformer": _apply_transformer,
    "autoencoder": _apply_autoencoder,
    "hybrid": _apply_hybrid,
    "gnn": _apply_gnn,
}


def check_architecture(architecture: str) -> str:
    if architecture not in _INIT:
        raise ValueError(
            f"unknown architecture {architecture!r}; choose one of "
            f"{', '.join(ARCHITECTURES)}"
        )
    return architecture


def init_params(spec: ModelSpec, seed: int) -> Params:
    """Create the parameter tree of `spec` from `seed`."""
    check_architecture(spec.architecture)
    return _INIT[spec.architecture](jax.random.PRNGKey(seed), spec)


def parameter_count(spec: ModelSpec) -> int:
    """Count the parameters of `spec`'s model from their shapes alone, without
    allocating them."""
    shapes = jax.eval_shape(lambda: init_params(spec, 0))
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(shapes))


def check_model_size(spec: ModelSpec) -> None:
    """Reject a model with more than `MAX_PARAMETERS` parameters.

    Raises:
        ValueError: naming the model, its parameter count and the fix.
    """
    count = parameter_count(spec)
    if count > MAX_PARAMETERS:
        raise ValueError(
            f"the {spec.architecture} model with layers {list(spec.widths)} on "
            f"{spec.features} features and {spec.classes} classes has {count:,} "
            f"parameters, more than the maximum of {MAX_PARAMETERS:,}; use fewer "
            "or narrower layers"
        )


def apply_model(params: Params, x: jax.Array, spec: ModelSpec) -> jax.Array:
    """Return the class logits of `spec`'s model for the batch `x`."""
    return _APPLY[spec.architecture](params, x, spec)
