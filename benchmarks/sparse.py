"""Benchmark case 6: sparse COO exchange (per-weight scores, one global threshold).

Timed against the read floor and against fl4health's algorithm written plainly on the
host: every score concatenated and fully sorted, each layer rebuilt densely with zeros
below the threshold, then its nonzeros extracted; on the server, every payload made dense
and summed with ``functools.reduce``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

import jaxlayerx as jlx
from benchmarks.timing import median_time, read_floor, row
from benchmarks.trees import random_tree
from jaxlayerx.sparse_selection import _device_threshold, _host_threshold

SPARSITY = 0.1
CLIENTS = 10


def host_sort_push(model, initial):
    """fl4health's SparseCooParameterExchanger.push_parameters, in numpy."""
    current, start = jlx.flatten(model), jlx.flatten(initial)
    scores = {name: np.abs(np.asarray(current[name]) - np.asarray(start[name])) for name in current}
    ordered = np.sort(np.concatenate([score.reshape(-1) for score in scores.values()]))[::-1]
    threshold = ordered[math.ceil(ordered.size * SPARSITY) - 1]
    values, indices, shapes, names = [], [], [], []
    for name, score in scores.items():
        dense = np.where(score >= threshold, np.asarray(current[name]), 0)
        if dense.ndim == 0 or not dense.any():
            continue
        values.append(dense[np.nonzero(dense)])
        indices.append(np.argwhere(dense))
        shapes.append(np.array(dense.shape))
        names.append(name)
    return values + indices + shapes + [np.array(names)]


def host_sort_threshold(scores) -> np.float32:
    ordered = np.sort(np.concatenate([np.asarray(score).reshape(-1) for score in scores.values()]))[::-1]
    return ordered[math.ceil(ordered.size * SPARSITY) - 1]


def dense_reduce_aggregate(results):
    """fl4health's FedAvgSparseCooTensor.weighted_aggregate, in numpy: dense copies, reduce."""
    dense: dict[str, list[np.ndarray]] = {}
    totals: dict[str, int] = {}
    for payload, num_examples in results:
        values, (indices, shapes, names) = jlx.unpack_coo(payload)
        for value, index, shape, name in zip(values, indices, shapes, names):
            array = np.zeros(tuple(shape), value.dtype)
            array[tuple(index.T)] = value
            dense.setdefault(name, []).append(array * num_examples)
            totals[name] = totals.get(name, 0) + num_examples
    return {name: functools.reduce(np.add, arrays) / totals[name] for name, arrays in dense.items()}


def sparse_cases(tree_name: str, shapes, repeats: int) -> list[dict[str, object]]:
    """Push (end to end), the global threshold alone, and server aggregation."""
    initial = jax.tree.map(jnp.asarray, random_tree(shapes, seed=0))
    model = jax.tree.map(lambda a, b: a + jnp.asarray(b), initial, random_tree(shapes, seed=1, scale=0.01))
    nbytes = sum(leaf.nbytes for leaf in jax.tree.leaves(model))
    floor = read_floor(2 * nbytes, repeats)
    slow_repeats = max(1, repeats // 3)
    exchanger = jlx.SparseCooParameterExchanger(SPARSITY, jlx.largest_magnitude_change_scores)
    ours = median_time(lambda: exchanger.push_parameters(model, initial_model=initial), repeats)
    plain = median_time(lambda: host_sort_push(model, initial), slow_repeats)
    label = f"{tree_name}: sparse COO push, sparsity {SPARSITY}"
    rows = [row(label, ours, floor, plain)]

    scores = jlx.largest_magnitude_change_scores(model, initial)
    sort_time = median_time(lambda: host_sort_threshold(scores), slow_repeats)
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
    plain = median_time(lambda: dense_reduce_aggregate(results), slow_repeats)
    rows.append(row(f"{tree_name}: FedAvgSparseCooTensor, {CLIENTS} clients", ours, read_floor(sent, repeats), plain))
    return rows


def sparse_client_payloads(model, initial, exchanger) -> tuple[list, int]:
    """10 clients' COO payloads (each its own drift of the model); and the bytes sent."""
    rng = np.random.default_rng(4)
    results, sent = [], 0
    for _ in range(CLIENTS):
        moved = jax.tree.map(lambda x: x + jnp.asarray(0.01 * rng.standard_normal(x.shape, np.float32)), model)
        payload = exchanger.push_parameters(moved, initial_model=initial)
        sent += jlx.payload_nbytes(payload)
        results.append((payload, int(rng.integers(10, 100))))
    return results, sent
