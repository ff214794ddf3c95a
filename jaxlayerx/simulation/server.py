"""Server optimizers (FedOpt, Reddi et al. 2021) over partially aggregated layers.

Each round the server averages what clients sent (:func:`jaxlayerx.masked_fedavg`). With
FedAvg (no optimizer) that average is the new global model. With an optax
transformation, the average only gives a pseudo-gradient, ``global - average``, for the
whole model at once, which the transformation turns into the step:

    new_global = global + optimizer.update(global - average, state, global)

so that a transformation over the whole tree (``optax.clip_by_global_norm``) sees every
layer together. A layer (a weight, for sparse exchange) that no client sent has a zero
pseudo-gradient and does not move. Its entries of the optimizer state, those under its
name and of its shape (the moments of Adam, Yogi and Adagrad), keep their values; the
state shared by all layers (Adam's step count) advances every round. ``optax.sgd(1.0)``
is plain FedAvg.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any, cast

import jax
import jax.numpy as jnp
import optax

from jaxlayerx.aggregation import cast_mean
from jaxlayerx.base import FlatView

#: The server optimizers by name; ``avg`` is plain FedAvg (no optimizer).
SERVER_OPTIMIZERS: tuple[str, ...] = ("avg", "sgd", "adam", "yogi", "adagrad")

#: The server learning rate of each optimizer when none is given.
DEFAULT_SERVER_LR = {"sgd": 1.0, "adam": 0.01, "yogi": 0.01, "adagrad": 0.1}

#: The adaptivity of FedAdam, FedYogi and FedAdagrad (tau in Reddi et al.).
ADAPTIVITY = 1e-3


def server_optimizer(name: str, learning_rate: float | None = None) -> optax.GradientTransformation | None:
    """The optax optimizer named ``name`` (``None`` for ``avg``).

    Raises:
      ValueError: an unknown name, or a learning rate that is not a finite number > 0.
    """
    if name not in SERVER_OPTIMIZERS:
        raise ValueError(f"unknown server optimizer {name!r}; choose from {', '.join(SERVER_OPTIMIZERS)}")
    if name == "avg":
        return None
    rate = DEFAULT_SERVER_LR[name] if learning_rate is None else learning_rate
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 < rate < float("inf"):
        raise ValueError(f"server-lr must be a finite number > 0, got {rate!r}")
    if name == "sgd":
        return optax.sgd(rate)
    if name == "adam":
        return optax.adam(rate, b1=0.9, b2=0.99, eps=ADAPTIVITY)
    if name == "yogi":
        return optax.yogi(rate, b1=0.9, b2=0.99, eps=ADAPTIVITY)
    return optax.adagrad(rate, initial_accumulator_value=0.0, eps=ADAPTIVITY)


def init_server_state(optimizer: optax.GradientTransformation | None, global_layers: Mapping[str, Any]) -> Any:
    """The optimizer's state for the whole model, in float32 (empty for FedAvg)."""
    if optimizer is None:
        return FlatView()
    return optimizer.init(FlatView((name, _float32(layer)) for name, layer in global_layers.items()))


def server_step(
    optimizer: optax.GradientTransformation | None,
    global_layers: Mapping[str, Any],
    averages: Mapping[str, Any],
    sent: Mapping[str, Any],
    state: Any,
) -> tuple[FlatView, Any]:
    """The new global model and optimizer state after one round; pure and jit-able.

    Args:
      optimizer: an optax transformation; ``None`` takes the averages as they are (FedAvg).
      global_layers: the global model before the round.
      averages: the round's averages (:func:`jaxlayerx.masked_fedavg`, with the global
        model as fallback: equal to it where nothing was sent).
      sent: per layer, a boolean scalar or one per weight: what some client sent.
      state: the optimizer's state (:func:`init_server_state`).
    """
    if optimizer is None:
        return FlatView(averages), state
    current = FlatView((name, _float32(layer)) for name, layer in global_layers.items())
    pseudo = FlatView((name, current[name] - _float32(averages[name])) for name in current)
    updates, stepped = optimizer.update(pseudo, state, current)
    moved = cast(FlatView, optax.apply_updates(current, updates))
    new_global = FlatView(
        (name, cast_mean(jnp.where(sent[name], moved[name], current[name]), layer.dtype, jnp))
        for name, layer in global_layers.items()
    )
    return new_global, _kept_where_unsent(stepped, state, sent, current)


def _kept_where_unsent(stepped: Any, state: Any, sent: Mapping[str, Any], layers: Mapping[str, Any]) -> Any:
    """``stepped``, with each layer's own entries (under its name, of its shape) kept at
    their old values where the layer (weight) was not sent."""

    def keep(path: tuple[Any, ...], new: Any, old: Any) -> Any:
        name = next(
            (key.key for key in reversed(path) if isinstance(key, jax.tree_util.DictKey) and key.key in sent), None
        )
        if name is None or jnp.shape(new) != jnp.shape(layers[name]):
            return new
        return jnp.where(sent[name], new, old)

    return jax.tree_util.tree_map_with_path(keep, stepped, state)


def _float32(layer: Any) -> jax.Array:
    return jnp.asarray(layer).astype(jnp.float32)
