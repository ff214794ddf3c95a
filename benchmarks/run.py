"""Benchmarks of the hot paths, as ratios measured in one run.

    python benchmarks/run.py [--quick] [--json out.json]

Each case is the median of several runs after warm-up, reported as a ratio to
* the floor: for selection and aggregation, the best time to read the same bytes once (a
  numpy dot product over arrays of the same total size); for a simulated round, its
  training FLOPs at the rate of one large matmul on this machine; and
* a straightforward baseline: fl4health's algorithm written plainly (one norm and one host
  sync per layer; a ``functools.reduce(np.add, ...)`` average over copies; for a simulated
  round, a Python loop over clients calling the same jitted per-client step).
Absolute times on a shared machine are noise; the ratios are what to compare.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import jaxlayerx as jlx


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in seconds; jax outputs are waited for."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def read_floor(nbytes: int, repeats: int) -> float:
    """Best time to read ``nbytes`` of float32 once (two halves dotted together)."""
    half = max(nbytes // 8, 1)
    a, b = np.ones(half, np.float32), np.ones(half, np.float32)
    return min(median_time(lambda: np.dot(a, b), repeats) for _ in range(3))


def small_layers_tree(count: int, side: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"layer_{i:03d}": {"kernel": rng.standard_normal((side, side), np.float32)} for i in range(count)}


def drifted(tree, scale: float, seed: int):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x + scale * rng.standard_normal(x.shape, np.float32), tree)


def per_layer_percentage(model, initial, exchange_percentage: float):
    """fl4health's percentage selection written plainly: one norm and host sync per layer."""
    current, start = jlx.flatten(model), jlx.flatten(initial)
    norms = {name: float(jnp.linalg.norm(current[name] - start[name]) / current[name].size) for name in current}
    count = math.ceil(len(norms) * exchange_percentage)
    names = sorted(norms, key=norms.__getitem__, reverse=True)[:count]
    return [np.asarray(current[name]) for name in names], names


def reduce_fedavg(results):
    """fl4health's FedAvgDynamicLayer written plainly: a reduce over weighted copies."""
    by_name: dict[str, list[tuple[np.ndarray, int]]] = {}
    for payload, num_examples in results:
        weights, names = jlx.unpack_layers(payload)
        for name, array in zip(names, weights):
            by_name.setdefault(name, []).append((array * num_examples, num_examples))
    return {
        name: functools.reduce(np.add, [a for a, _ in items]) / sum(n for _, n in items)
        for name, items in by_name.items()
    }


def run(quick: bool) -> list[dict[str, object]]:
    repeats = 3 if quick else 9
    count, side, clients = (40, 16, 4) if quick else (400, 64, 10)
    initial = jax.tree.map(jnp.asarray, small_layers_tree(count, side, seed=0))
    model = jax.tree.map(jnp.asarray, drifted(small_layers_tree(count, side, seed=0), 0.01, seed=1))
    nbytes = sum(x.nbytes for x in jax.tree.leaves(model))
    rows = []

    exchanger = jlx.DynamicLayerExchanger(jlx.LayerSelectionFunctionConstructor(1e-4, 0.5).select_by_percentage())
    selection = median_time(lambda: exchanger.push_parameters(model, initial_model=initial), repeats)
    baseline = median_time(lambda: per_layer_percentage(model, initial, 0.5), repeats)
    floor = read_floor(2 * nbytes, repeats)  # current and initial are both read
    rows.append(_row(f"percentage selection, {count} layers {side}x{side}", selection, floor, baseline))

    rng = np.random.default_rng(2)
    results = []
    for client in range(clients):
        tree = jlx.flatten(drifted(small_layers_tree(count, side, seed=0), 0.01, seed=10 + client))
        names = sorted(rng.choice(list(tree), size=count // 2, replace=False).tolist())
        results.append((jlx.pack_layers([np.asarray(tree[n]) for n in names], names), int(rng.integers(10, 100))))
    sent_bytes = sum(jlx.payload_nbytes(payload) for payload, _ in results)
    server = jlx.FedAvgDynamicLayer()
    aggregation = median_time(lambda: server.aggregate(results), repeats)
    baseline = median_time(lambda: reduce_fedavg(results), repeats)
    rows.append(
        _row(f"FedAvgDynamicLayer, {clients} clients x half of {count} layers", aggregation, read_floor(sent_bytes, repeats), baseline)
    )
    rows.extend(simulation_round_cases(quick, repeats))
    return rows


def simulation_round_cases(quick: bool, repeats: int) -> list[dict[str, object]]:
    """One simulated round, all clients under jax.vmap, against Python loops over clients:
    one calling the same jitted per-client update (local training, selection), one calling
    a jitted SGD step per client and step; both then run the same jitted server step."""
    from jaxlayerx.simulation import ExchangerSpec, Simulation, SimulationConfig, load_digits_data, make_client_data

    clients = 8 if quick else 64
    x, y = load_digits_data()
    data = make_client_data(x, y, clients, beta=1.0, seed=0)
    simulation = Simulation(ExchangerSpec("dynamic-percentage"), SimulationConfig(local_steps=20, batch_size=32), data)
    state = simulation.init_state()
    vmapped = median_time(lambda: simulation.round(state, 1), repeats)

    client_step = jax.jit(simulation.client_update)
    server_step = jax.jit(functools.partial(jlx.masked_fedavg, weighted=True))
    keys = jax.random.split(jax.random.key(0), clients)
    locals_ = [jax.tree.map(lambda v, c=c: v[c], state.client_layers) for c in range(clients)]
    arrays = [jnp.asarray(a) for a in (data.x_train, data.y_train, data.n_train)]
    per_client = [[a[c] for a in arrays] for c in range(clients)]
    counts = jnp.asarray(data.n_train)

    def loop():
        outputs = [
            client_step(state.global_layers, state.pull_mask, locals_[c], keys[c], *per_client[c]) for c in range(clients)
        ]
        trained = jax.tree.map(lambda *v: jnp.stack(v), *[out[1] for out in outputs])
        masks = jax.tree.map(lambda *v: jnp.stack(v), *[out[2] for out in outputs])
        return server_step(trained, masks, counts, fallback=state.global_layers)

    looped = median_time(loop, repeats)

    # The training loop people write first: a jitted SGD step, called per client and per step.
    sgd_step = jax.jit(simulation.sgd_step)
    merge = jax.jit(lambda g, m, l: jax.tree.map(lambda gv, mv, lv: jnp.where(mv, gv, lv), g, m, l))
    select = jax.jit(simulation._send_mask)

    def step_loop():
        trained_all, masks_all = [], []
        for c in range(clients):
            start = merge(state.global_layers, state.pull_mask, locals_[c])
            variables = jlx.unflatten(start, like=simulation.initial_variables)
            params, other = variables["params"], {k: v for k, v in variables.items() if k != "params"}
            carry = (params, other, simulation.optimizer.init(params))
            for step_key in jax.random.split(keys[c], simulation.local_steps):
                carry = sgd_step(carry, step_key, *per_client[c])
            trained = jlx.flatten({"params": carry[0], **carry[1]})
            trained_all.append(trained)
            masks_all.append(select(trained, start))
        stacked = jax.tree.map(lambda *v: jnp.stack(v), *trained_all)
        masks = jax.tree.map(lambda *v: jnp.stack(v), *masks_all)
        return server_step(stacked, masks, counts, fallback=state.global_layers)

    step_looped = median_time(step_loop, max(1, repeats // 3), warmup=1)

    # The compute floor: the training FLOPs (XLA's count for one SGD step, times steps and
    # clients; evaluation left out) at the rate of one large matmul on this machine.
    carry = (
        simulation.initial_variables["params"],
        {k: v for k, v in simulation.initial_variables.items() if k != "params"},
        simulation.optimizer.init(simulation.initial_variables["params"]),
    )
    step_flops = _flops(sgd_step.lower(carry, keys[0], *per_client[0]).compile())
    compute_floor = step_flops * simulation.local_steps * clients / matmul_rate(repeats)
    return [
        _row(f"simulation round, {clients} clients: vs loop", vmapped, compute_floor, looped),
        _row(f"simulation round, {clients} clients: vs step loop", vmapped, compute_floor, step_looped),
    ]


def matmul_rate(repeats: int, size: int = 2048) -> float:
    """FLOP/s of one large float32 matmul: this machine's compute ceiling, in practice."""
    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    return 2 * size**3 / min(median_time(lambda: matmul(a, a), repeats) for _ in range(3))


def _flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis["flops"])


def _row(case: str, seconds: float, floor: float, baseline: float) -> dict[str, object]:
    return {
        "case": case,
        "ms": seconds * 1e3,
        "floor_ms": floor * 1e3,
        "x_floor": seconds / floor,
        "baseline_ms": baseline * 1e3,
        "speedup_vs_baseline": baseline / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument("--json", help="also write the rows as JSON to this path")
    args = parser.parse_args()
    device = jax.devices()[0]
    print(f"device: {device.platform} ({device.device_kind}); {platform.processor() or platform.machine()}")
    rows = run(args.quick)
    print(f"{'case':<52} {'ms':>9} {'floor ms':>9} {'x floor':>8} {'baseline ms':>12} {'x faster':>9}")
    for row in rows:
        print(
            f"{row['case']:<52} {row['ms']:>9.3f} {row['floor_ms']:>9.3f} {row['x_floor']:>8.2f} "
            f"{row['baseline_ms']:>12.3f} {row['speedup_vs_baseline']:>9.2f}"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": str(device), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
