"""Benchmark case 5: one simulated round with every client vmapped, against Python loops.

    python -m benchmarks.round [--quick] [--repeats N]

prints this case's rows alone (``benchmarks/run.py`` runs it with the others). The floor is
the round's training arithmetic (XLA's FLOP count of one local SGD step, times the steps and
the clients; evaluation and aggregation left out) at the rate of one large float32 matmul
on both cores: a bound no round can beat, not an estimate of what XLA can reach.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from benchmarks.timing import matmul_rate, median_time, row
from jaxlayerx.aggregation import compiled_masked_fedavg


def simulation_round_cases(quick: bool, repeats: int) -> list[dict[str, object]]:
    """One simulated round, all clients under jax.vmap, against Python loops over clients:
    one calling the same jitted per-client update (local training, selection), one calling
    a jitted SGD step per client and step; both then run the same jitted server step."""
    from jaxlayerx.simulation import ExchangerSpec, Simulation, SimulationConfig, load_digits_data, make_client_data
    from jaxlayerx.simulation.task import LocalData

    clients = 8 if quick else 64
    x, y = load_digits_data()
    data = make_client_data(x, y, clients, beta=1.0, seed=0)
    simulation = Simulation(ExchangerSpec("dynamic-percentage"), SimulationConfig(local_steps=20, batch_size=32), data)
    state = simulation.init_state()
    vmapped = median_time(lambda: simulation.round(state, 1), repeats)

    client_step = jax.jit(simulation.client_update)
    # The server's masked average: the very program a simulated round (and a Flower server) runs.
    server_step = functools.partial(compiled_masked_fedavg, weighted=True, over="senders")
    keys = jax.random.split(jax.random.key(0), clients)
    first_pull = jax.tree.map(lambda rounds: jnp.ones(rounds.shape, bool), state.updated_in)
    locals_ = [jax.tree.map(lambda v, c=c: v[c], state.client_layers) for c in range(clients)]
    train, n_train = simulation.arrays[:2]
    per_client = [LocalData({k: v[c] for k, v in train.items()}, n_train[c]) for c in range(clients)]
    counts = jnp.asarray(data.n_train)

    def loop():
        # client_update's inputs: (pull mask, own layers, reference, residual, optimizer
        # state, key, data); its outputs: (start, trained, mask, reference, residual, values
        # the server receives, optimizer state, metrics).
        outputs = [
            client_step(
                state.global_layers,
                (first_pull, locals_[c], state.references, state.residuals, None, keys[c], per_client[c]),
            )
            for c in range(clients)
        ]
        values = jax.tree.map(lambda *v: jnp.stack(v), *[out[5] for out in outputs])
        masks = jax.tree.map(lambda *v: jnp.stack(v), *[out[2] for out in outputs])
        return server_step(values, masks, counts, state.global_layers)

    looped = median_time(loop, repeats)

    # The training loop people write first: a jitted local step, called per client and per step.
    local_step = jax.jit(simulation.local_step)
    merge = jax.jit(lambda g, m, own: jax.tree.map(lambda gv, mv, ov: jnp.where(mv, gv, ov), g, m, own))
    select = jax.jit(simulation.exchanger.send_mask)

    def step_loop():
        trained_all, masks_all = [], []
        for c in range(clients):
            start = merge(state.global_layers, first_pull, locals_[c])
            carry = (start, simulation.task.init_optimizer(start))
            for step_key in jax.random.split(keys[c], simulation.local_steps):
                carry = local_step(carry, step_key, per_client[c])
            trained = carry[0]
            trained_all.append(trained)
            masks_all.append(select(trained, start))
        stacked = jax.tree.map(lambda *v: jnp.stack(v), *trained_all)
        masks = jax.tree.map(lambda *v: jnp.stack(v), *masks_all)
        return server_step(stacked, masks, counts, state.global_layers)

    step_looped = median_time(step_loop, max(1, repeats // 3), warmup=1)

    # The compute floor: the training FLOPs (XLA's count for one SGD step, times steps and
    # clients; evaluation left out) at the rate of one large matmul on this machine.
    carry = (simulation.initial_layers, simulation.task.init_optimizer(simulation.initial_layers))
    step_flops = _flops(local_step.lower(carry, keys[0], per_client[0]).compile())
    compute_floor = step_flops * simulation.local_steps * clients / matmul_rate(repeats)
    return [
        row(f"simulation round, {clients} clients: vs loop", vmapped, compute_floor, looped),
        row(f"simulation round, {clients} clients: vs step loop", vmapped, compute_floor, step_looped),
    ]


def _flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis["flops"])


def main() -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="One simulated round against its floor and Python loops.")
    parser.add_argument("--quick", action="store_true", help="8 clients instead of 64")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    for case in simulation_round_cases(args.quick, args.repeats):
        print(json.dumps({key: round(value, 3) if isinstance(value, float) else value for key, value in case.items()}))


if __name__ == "__main__":
    main()
