"""FedProx with optax: a proximal client update, AdamW with a schedule on the clients,
Adam on the server.

The client update is :func:`jaxlayerx.recipes.fedprox`: local training on the loss plus
``mu / 2 * ||w - w_start||^2``. Each client's AdamW state, and so its learning-rate
schedule, carries over from one of its rounds to the next
(``keep_client_optimizer_state``); the server takes an Adam step along the round's
pseudo-gradient, over the whole model at once (FedOpt).

    python examples/fedprox.py --rounds 20 --mu 0.01
"""

from __future__ import annotations

import argparse

import optax

from jaxlayerx import recipes
from jaxlayerx.simulation import Simulation, SimulationConfig, load_digits_data, make_client_data


def main(rounds: int = 20, mu: float = 0.01, clients: int = 8, seed: int = 0, verbose: bool = True) -> dict[str, list]:
    """Runs FedProx and, for comparison, FedAvg with the same optimizers; returns each
    one's round records."""
    x, y = load_digits_data()
    data = make_client_data(x, y, clients, beta=0.1, seed=seed)
    local_steps = 20
    schedule = optax.cosine_decay_schedule(3e-3, decay_steps=rounds * local_steps, alpha=0.1)
    config = SimulationConfig(rounds=rounds, local_steps=local_steps, seed=seed)
    runs = {}
    for recipe in (recipes.fedprox(mu), recipes.fedavg()):
        simulation = Simulation(
            recipe.exchanger,
            config,
            data,
            client_optimizer=optax.adamw(schedule, weight_decay=1e-4),
            keep_client_optimizer_state=True,
            server_optimizer=optax.adam(1e-2, b1=0.9, b2=0.99, eps=1e-3),
            **recipe.options,
        )
        runs[recipe.name] = simulation.run()
    if verbose:
        for name, records in runs.items():
            last = records[-1]
            print(
                f"{name:<14} global accuracy {last['global_accuracy']:.3f}  "
                f"local accuracy {last['local_accuracy_mean']:.3f}  train loss {sum(last['train_loss']) / clients:.3f}"
            )
    return runs


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--mu", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.rounds, args.mu, seed=args.seed)
