"""Server optimizers (FedOpt, Reddi et al. 2021) over partially aggregated layers.

Each round the server averages what clients sent (:func:`jaxlayerx.masked_fedavg`). With
``avg`` that average is the new global model. With an optimizer, the average only gives a
pseudo-gradient, ``global - average``, which an optax optimizer turns into the step:

    new_global = global + optimizer.update(global - average, state, global)

Only the layers (the weights, for sparse exchange) that some client sent this round take
the step; the others do not move and keep their optimizer state. Each layer has its own
optimizer state, so a layer that is rarely sent keeps its own step count (Adam's bias
correction). ``sgd`` with ``server_lr=1`` is plain FedAvg.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
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


def init_server_state(optimizer: optax.GradientTransformation | None, global_layers: Mapping[str, Any]) -> FlatView:
    """One optimizer state per layer (empty for ``avg``)."""
    if optimizer is None:
        return FlatView()
    return FlatView((name, optimizer.init(_float32(layer))) for name, layer in global_layers.items())


def server_step(
    optimizer: optax.GradientTransformation | None,
    global_layers: Mapping[str, Any],
    averages: Mapping[str, Any],
    sent: Mapping[str, Any],
    state: Mapping[str, Any],
) -> tuple[FlatView, FlatView]:
    """The new global model and optimizer state after one round; pure and jit-able.

    Args:
      optimizer: from :func:`server_optimizer`; ``None`` takes the averages as they are.
      global_layers: the global model before the round.
      averages: the round's averages (:func:`jaxlayerx.masked_fedavg`, with the global
        model as fallback: equal to it where nothing was sent).
      sent: per layer, a boolean scalar or one per weight: what some client sent.
      state: per layer, its optimizer state (:func:`init_server_state`).
    """
    if optimizer is None:
        return FlatView(averages), FlatView(state)
    new_global, new_state = FlatView(), FlatView()
    for name, layer in global_layers.items():
        current = _float32(layer)
        updates, stepped = optimizer.update(current - _float32(averages[name]), state[name], current)
        moved = sent[name]
        stepped_layer = cast(jax.Array, optax.apply_updates(current, updates))
        new_global[name] = cast_mean(jnp.where(moved, stepped_layer, current), layer.dtype, jnp)
        # A layer keeps its state where it did not move: per weight, and for the scalars
        # of the state (the step count) when nothing of the layer was sent.
        keep: Callable[[Any, Any], jax.Array] = lambda new, old, moved=moved: jnp.where(
            moved if jnp.shape(new) == jnp.shape(moved) else jnp.any(moved), new, old
        )
        new_state[name] = jax.tree.map(keep, stepped, state[name])
    return new_global, new_state


def _float32(layer: Any) -> jax.Array:
    return jnp.asarray(layer).astype(jnp.float32)
