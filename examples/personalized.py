"""Personalized federated learning: FedPer, FedRep, FedBN and Ditto against FedAvg and FedProx.

Each method is a recipe (:mod:`jaxlayerx.recipes`): what is exchanged and how a client
trains. Under strong label skew (``--beta 0.1``) each client sees few classes, so a
client's own head fits its classes better than the global one; under a feature shift
(``--shift``) each client sees its inputs through its own transform, so local BatchNorm
layers fit it better. The table gives, per method and over the seeds, the mean local
accuracy (every client's personalized model on its own test examples), the global
model's accuracy on every client's test examples together, and the bytes sent.

    python examples/personalized.py --beta 0.1 --seeds 3
    python examples/personalized.py --beta iid --shift --seeds 3
    python examples/personalized.py --data mnist1d --beta 0.1 --seeds 3
"""

from __future__ import annotations

import argparse

import numpy as np

from jaxlayerx import recipes
from jaxlayerx.simulation import Simulation, SimulationConfig, make_client_data
from jaxlayerx.simulation.datasets import load_dataset
from jaxlayerx.simulation.models import BODY_LAYERS, DEFAULT_MODEL, make_model


def methods(model: str) -> list[recipes.Recipe]:
    body = BODY_LAYERS[model]
    return [
        recipes.fedavg(),
        recipes.fedprox(0.01),
        recipes.fedper(body),
        recipes.fedrep(body, head_steps=5),
        recipes.fedbn(),
        recipes.ditto(0.1),
    ]


def main(
    data: str = "digits",
    beta: float | None = 0.1,
    shift: bool = False,
    seeds: int = 3,
    rounds: int = 20,
    clients: int = 8,
    local_steps: int = 20,
) -> dict[str, dict[str, float]]:
    """Runs every method for ``seeds`` seeds; returns, per method, the means over seeds of
    ``local_accuracy``, ``global_accuracy`` and ``upload_mb``, and their standard deviations."""
    dataset = load_dataset(data)
    model = DEFAULT_MODEL.get(dataset.name, "mlp")
    results: dict[str, list[tuple[float, float, float]]] = {}
    for seed in range(seeds):
        split = make_client_data(
            dataset.x,
            dataset.y,
            clients,
            beta=beta,
            seed=seed,
            x_test=dataset.x_test,
            y_test=dataset.y_test,
            shift=shift,
        )
        config = SimulationConfig(rounds=rounds, local_steps=local_steps, seed=seed)
        for recipe in methods(model):
            module = make_model(model, dataset.num_classes)
            simulation = Simulation(recipe.exchanger, config, split, module, **recipe.options)
            state, upload = None, 0
            for record, output in simulation.iterate():
                upload += record["upload_bytes"]
                state = output.state
            local = float(np.nanmean(simulation.evaluate_clients(state)["accuracy"]))
            results.setdefault(recipe.name, []).append((local, float(record["global_accuracy"]), upload / 1e6))
    table: dict[str, dict[str, float]] = {}
    for name, rows in results.items():
        values = np.asarray(rows)
        mean, std = values.mean(axis=0), values.std(axis=0)
        table[name] = {
            "local_accuracy": float(mean[0]),
            "local_accuracy_std": float(std[0]),
            "global_accuracy": float(mean[1]),
            "global_accuracy_std": float(std[1]),
            "upload_mb": float(mean[2]),
        }
    return table


def print_table(table: dict[str, dict[str, float]]) -> None:
    print(f"{'method':<14} {'local acc':>15} {'global acc':>15} {'upload MB':>10}")
    for name, row in table.items():
        local = f"{row['local_accuracy']:.3f} ± {row['local_accuracy_std']:.3f}"
        global_ = f"{row['global_accuracy']:.3f} ± {row['global_accuracy_std']:.3f}"
        print(f"{name:<14} {local:>15} {global_:>15} {row['upload_mb']:>10.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits", choices=["digits", "mnist1d"])
    parser.add_argument("--beta", default="0.1", help="Dirichlet label skew, or iid")
    parser.add_argument("--shift", action="store_true", help="a feature shift per client")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--local-steps", type=int, default=20)
    args = parser.parse_args()
    print_table(
        main(
            args.data,
            None if args.beta == "iid" else float(args.beta),
            args.shift,
            args.seeds,
            args.rounds,
            args.clients,
            args.local_steps,
        )
    )
