"""What the Flower example federates: the digits, split non-IID, and a small Flax MLP.

Shared by ``server.py`` and ``client.py``: the model, one client's data, local training and
evaluation as plain functions over Linen variables.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlayerx.simulation import MLP, ExchangerSpec, load_digits_data, make_client_data

MODULE = MLP()


def init_variables(seed: int = 0) -> dict[str, Any]:
    """The model's starting variables (the same on the server and every client), made by
    one compiled program (eagerly, every operation would compile on its own, in every
    ClientApp process)."""
    return _init(jax.random.key(seed))


@jax.jit
def _init(key: jax.Array) -> dict[str, Any]:
    return MODULE.init(key, jnp.zeros((1, 64), jnp.float32))


def make_exchanger(kind: str, variables: Any, exchange_percentage: float = 0.5) -> Any:
    """The jaxlayerx exchanger named ``kind`` (see ``jaxlayerx simulate --help``)."""
    spec = ExchangerSpec(kind=kind, exchange_percentage=exchange_percentage, normalize=False)
    return spec.make_exchanger(MODULE, variables, jnp.zeros((1, 64), jnp.float32))


def load_partition(client_id: int, num_clients: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Client ``client_id``'s ``(x_train, y_train, x_test, y_test)`` of a Dirichlet(0.5) split."""
    x, y = load_digits_data()
    data = make_client_data(x, y, num_clients, beta=0.5, seed=seed)
    n_train, n_test = int(data.n_train[client_id]), int(data.n_test[client_id])
    return (
        data.x_train[client_id, :n_train],
        data.y_train[client_id, :n_train],
        data.x_test[client_id, :n_test],
        data.y_test[client_id, :n_test],
    )


def global_test_set(num_clients: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Every client's test examples together (the server evaluates the global model on them)."""
    x, y = load_digits_data()
    data = make_client_data(x, y, num_clients, beta=0.5, seed=seed)
    return data.x_global_test, data.y_global_test


@functools.partial(jax.jit, static_argnames="optimizer")
def _sgd_step(variables, opt_state, x, y, optimizer):
    def loss_fn(params):
        logits, updates = MODULE.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, x, train=True, mutable=["batch_stats"]
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    changes, opt_state = optimizer.update(grads, opt_state, variables["params"])
    params = optax.apply_updates(variables["params"], changes)
    return {"params": params, "batch_stats": updates["batch_stats"]}, opt_state, loss


def make_train_fn(x: np.ndarray, y: np.ndarray, epochs: int = 1, batch_size: int = 32, seed: int = 0):
    """``train_fn(variables, config) -> (variables, num_examples, metrics)``: SGD over the data."""
    optimizer = optax.sgd(0.1)

    def train_fn(variables: Any, config: dict[str, Any]) -> tuple[Any, int, dict[str, Any]]:
        rng = np.random.default_rng([seed, int(config.get("current_server_round", 0))])
        opt_state = optimizer.init(variables["params"])
        losses = []
        for _ in range(epochs):
            order = rng.permutation(len(x))
            for start in range(0, len(x), batch_size):
                batch = order[start : start + batch_size]
                variables, opt_state, loss = _sgd_step(variables, opt_state, x[batch], y[batch], optimizer)
                losses.append(loss)
        return variables, len(x), {"train_loss": float(np.mean(losses))}

    return train_fn


def evaluate(variables: Any, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """``(mean cross-entropy, accuracy)`` of the model on ``(x, y)``."""
    loss, accuracy = _evaluate(variables, x, y)
    return float(loss), float(accuracy)


@jax.jit
def _evaluate(variables: Any, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits = MODULE.apply(variables, x, train=False)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == y)


def make_evaluate_fn(x: np.ndarray, y: np.ndarray):
    """``evaluate_fn(variables, config) -> (loss, num_examples, {"accuracy": ...})``."""

    def evaluate_fn(variables: Any, config: dict[str, Any]) -> tuple[float, int, dict[str, Any]]:
        loss, accuracy = evaluate(variables, x, y)
        return loss, len(x), {"accuracy": accuracy}

    return evaluate_fn
