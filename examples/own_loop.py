"""A federated loop of your own: NNX models, an optax training step, jaxlayerx in between.

Four clients train an NNX MLP on their share of scikit-learn's digits. Each round, every
client pulls what the server changed, snapshots its model, trains a few steps of its own
optax loop, and pushes the half of its layers that moved most (root-mean-square drift),
with error feedback; the server averages each layer over the clients that sent it.
BatchNorm statistics travel like any other layer here.

    python examples/own_loop.py --rounds 10
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxlayerx as jlx
from jaxlayerx.simulation import load_digits_data, make_client_data


class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(64, 64, rngs=rngs)
        self.bn = nnx.BatchNorm(64, rngs=rngs)
        self.head = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(nnx.relu(self.bn(self.hidden(x))))


def loss_fn(model: Net, x: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def train_step(model: Net, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
    """One optax step on one batch (the model and the optimizer are updated in place)."""
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def accuracy(model: Net, x: jax.Array, y: jax.Array) -> jax.Array:
    model.eval()
    correct = jnp.mean(jnp.argmax(model(x), axis=-1) == y)
    model.train()
    return correct


def main(
    rounds: int = 10, clients: int = 4, steps: int = 20, share: float = 0.5, seed: int = 0
) -> list[dict[str, float]]:
    x, y = load_digits_data()
    data = make_client_data(x, y, clients, beta=0.5, seed=seed)
    rules = jlx.LayerSelectionFunctionConstructor(norm_threshold=1e-3, exchange_percentage=share, measure="rms")
    exchangers = [jlx.DynamicLayerExchanger(rules.select_by_percentage(), error_feedback=True) for _ in range(clients)]
    server = jlx.FedAvgDynamicLayer()
    global_model = Net(nnx.Rngs(seed))
    models = [nnx.clone(global_model) for _ in range(clients)]
    # The first payload is the whole model: every client starts from the server's.
    update = jlx.pack_layers(list(jlx.flatten(global_model).values()), list(jlx.flatten(global_model)))
    rng = np.random.default_rng(seed)
    history = []
    for round_index in range(1, rounds + 1):
        results = []
        for client, (model, exchanger) in enumerate(zip(models, exchangers)):
            exchanger.pull_parameters(update, model)  # in place; also moves the error-feedback reference
            initial = nnx.clone(model)  # the round's snapshot: drift is measured from it
            optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
            n = int(data.n_train[client])
            for _ in range(steps):
                batch = rng.integers(0, n, size=32)
                train_step(model, optimizer, data.x_train[client, batch], data.y_train[client, batch])
            payload = exchanger.push_parameters(model, initial_model=initial)
            results.append((payload, n))
        averaged = server.aggregate(results)  # each layer over the clients that sent it
        update = jlx.pack_layers(list(averaged.values()), list(averaged))
        jlx.DynamicLayerExchanger(rules.select_by_percentage()).pull_parameters(update, global_model)
        record = {
            "round": round_index,
            "global_accuracy": float(accuracy(global_model, data.x_global_test, data.y_global_test)),
            "upload_bytes": sum(jlx.payload_nbytes(payload) for payload, _ in results),
            "layers_averaged": len(averaged),
        }
        history.append(record)
        print(
            f"round {round_index:2d}: global accuracy {record['global_accuracy']:.3f}, "
            f"{record['upload_bytes'] / 1e3:.1f} kB up, {record['layers_averaged']} layers averaged"
        )
    return history


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="local optax steps per round")
    parser.add_argument("--share", type=float, default=0.5, help="share of the layers a client sends each round")
    args = parser.parse_args()
    main(args.rounds, args.clients, args.steps, args.share)
