"""Benchmark case 6: sparse COO exchange (per-weight scores, one global threshold).

Timed against the read floor and against the reference's algorithm as the reference runs
it (:mod:`benchmarks.reference`, torch CPU in torch layout when installed): every score
concatenated and fully sorted, each layer rebuilt densely with zeros below the threshold,
then its nonzeros extracted; on the server, every payload made dense and summed with
``functools.reduce``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxlayerx as jlx
from benchmarks import reference
from benchmarks.cases import model_pair
from benchmarks.timing import median_time, read_floor, row
from jaxlayerx.sparse_selection import _device_threshold, _host_threshold

SPARSITY = 0.1
CLIENTS = 10


def sparse_cases(tree_name: str, shapes, repeats: int) -> list[dict[str, object]]:
    """Push (end to end), the global threshold alone, and server aggregation."""
    initial, model, reference_initial, reference_model = model_pair(shapes)
    nbytes = sum(leaf.nbytes for leaf in jax.tree.leaves(model))
    floor = read_floor(2 * nbytes, repeats)
    slow_repeats = max(1, repeats // 3)
    exchanger = jlx.SparseCooParameterExchanger(SPARSITY, jlx.largest_magnitude_change_scores)
    ours = median_time(lambda: exchanger.push_parameters(model, initial_model=initial), repeats)
    plain = reference.fastest(
        lambda: median_time(lambda: reference.sparse_push(reference_model, reference_initial, SPARSITY), slow_repeats)
    )
    label = f"{tree_name}: sparse COO push, sparsity {SPARSITY}"
    rows = [row(label, ours, floor, plain)]

    scores = jlx.largest_magnitude_change_scores(model, initial)
    reference_scores = [abs(layer - reference_initial[name]) for name, layer in reference_model.items()]
    sort_time = reference.fastest(
        lambda: median_time(lambda: reference.sparse_threshold(reference_scores, SPARSITY), slow_repeats)
    )
    score_floor = read_floor(nbytes, repeats)
    for method, threshold in [
        ("numpy partition", lambda: _host_threshold(scores, SPARSITY)),
        ("jitted radix select", lambda: _device_threshold(scores, sparsity_level=SPARSITY)),
    ]:
        rows.append(
            row(f"{tree_name}: sparse threshold, {method}", median_time(threshold, repeats), score_floor, sort_time)
        )

    current, start = jlx.flatten(model), jlx.flatten(initial)
    masks = jax.jit(lambda c, i: jlx.sparse_masks(jlx.largest_magnitude_change_scores(c, i), c, SPARSITY))
    ours = median_time(lambda: masks(current, start), repeats)
    rows.append(row(f"{tree_name}: jitted scores + sparse masks", ours, floor, plain))

    results, sent = sparse_client_payloads(model, initial, exchanger)
    server = jlx.FedAvgSparseCooTensor()
    ours = median_time(lambda: server.aggregate(results), repeats)
    plain = reference.fastest(lambda: median_time(lambda: reference.fedavg_sparse_coo(results), slow_repeats))
    rows.append(row(f"{tree_name}: FedAvgSparseCooTensor, {CLIENTS} clients", ours, read_floor(sent, repeats), plain))
    return rows


def sparse_client_payloads(model, initial, exchanger) -> tuple[list, int]:
    """10 clients' COO payloads (each its own drift of the model); and the bytes sent."""
    rng = np.random.default_rng(4)
    results, sent = [], 0
    for _ in range(CLIENTS):
        moved = jax.tree.map(lambda x: x + jnp.asarray(0.01 * rng.standard_normal(x.shape, np.float32)), model)
        payload = exchanger.push_parameters(moved, initial_model=initial)
        sent += sum(np.asarray(array).nbytes for array in payload)  # the data the server reads
        results.append((payload, int(rng.integers(10, 100))))
    return results, sent
