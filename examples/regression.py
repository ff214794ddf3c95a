"""Federated regression: your data, your loss, and a byte budget with error feedback.

Eight clients hold noisy samples of one linear function, each client's inputs drawn from
its own region. The model is a small Linen MLP; the loss is the mean squared error; each
client sends the layers that moved most per byte, up to three quarters of its model's
bytes, and what it does not send carries over to the next round (error feedback). A
budget never sends a layer larger than itself: here the largest layer (the 16x16 kernel)
is 69% of the model's bytes, so the budget is above that.

    python examples/regression.py --rounds 20
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import numpy as np
import optax

from jaxlayerx.simulation import ExchangerSpec, Simulation, SimulationConfig, make_client_data


class Regressor(nn.Module):
    """Two hidden layers and one output; the simulation calls it as ``module(x, train=...)``."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.relu(nn.Dense(16)(x))
        x = nn.relu(nn.Dense(16)(x))
        return nn.Dense(1)(x)[:, 0]


def squared_error(prediction: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
    """One loss per example."""
    return (prediction - batch["y"]) ** 2


def absolute_error(prediction: jax.Array, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {"mae": abs(prediction - batch["y"])}


def synthetic_data(clients: int, per_client: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``y = x . w + 0.5 + noise`` with ``x`` in 4 dimensions; client ``c``'s inputs centred
    on its own point. Returns the data and each example's client."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=4)
    centres = rng.normal(scale=2.0, size=(clients, 4))
    owner = np.repeat(np.arange(clients), per_client)
    x = centres[owner] + rng.normal(size=(len(owner), 4))
    y = x @ weights + 0.5 + rng.normal(scale=0.1, size=len(owner))
    return {"x": x, "y": y}, owner


def main(
    rounds: int = 20, clients: int = 8, per_client: int = 100, seed: int = 0, verbose: bool = True
) -> tuple[list[dict], dict, dict]:
    """Runs the federation; returns the round records (``global_loss`` is the mean squared
    error of the global model on every client's test examples), the initial and the final
    global model (name -> array)."""
    data, owner = synthetic_data(clients, per_client, seed)
    split = make_client_data(data, num_clients=clients, assignment=owner, seed=seed)
    simulation = Simulation(
        ExchangerSpec("dynamic-budget", byte_fraction=0.75, error_feedback=True),
        SimulationConfig(rounds=rounds, local_steps=20, batch_size=16, seed=seed),
        split,
        Regressor(),
        loss_fn=squared_error,
        metrics_fn=absolute_error,
        client_optimizer=optax.adam(1e-2),
    )
    baseline = float(np.mean((split.global_test["y"] - data["y"].mean()) ** 2))
    records, state = [], None
    for record, output in simulation.iterate():
        records.append(record)
        state = output.state
    final = {name: np.asarray(value) for name, value in state.global_layers.items()}
    initial = {name: np.asarray(value) for name, value in simulation.initial_layers.items()}
    if verbose:
        print(f"predicting the mean: mse {baseline:.3f}")
        for record in records:
            print(
                f"round {record['round']:2d}: global mse {record['global_loss']:.4f}  "
                f"mae {record['global_mae']:.4f}  upload {record['upload_bytes'] / 1e3:.1f} kB"
            )
    return records, initial, final


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.rounds, args.clients, seed=args.seed)
