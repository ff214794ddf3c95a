"""Benchmark cases 1-4: selection end to end, packed aggregation, and the jitted mask forms.

Each case is timed against its read floor and against the reference's algorithm as the
reference runs it (:mod:`benchmarks.reference`: torch CPU tensors in torch layout with
fl4health's per-layer loops, or the same loops in numpy without torch). jaxlayerx runs in
Flax layout; the ``torch shapes`` rows feed it the same bytes in torch's shapes (trailing
unit dimensions). A per-layer loop written in JAX is an extra column, never the headline.
"""

from __future__ import annotations

import collections
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

import jaxlayerx as jlx
from benchmarks import reference
from benchmarks.timing import median_time, read_floor, row
from benchmarks.trees import nested, random_tree

CLIENTS = 10
THRESHOLD = 1e-4
PERCENTAGE = 0.5


def per_layer_norms(model, initial) -> dict[str, float]:
    """One jitted norm and one host sync per layer, as fl4health computes drift."""
    current, start = jlx.flatten(model), jlx.flatten(initial)
    return {name: float(jnp.linalg.norm(current[name] - start[name]) / current[name].size) for name in current}


def per_layer_threshold(model, initial):
    norms = per_layer_norms(model, initial)
    current = jlx.flatten(model)
    names = [name for name, norm in norms.items() if norm > THRESHOLD]
    return [np.asarray(current[name]) for name in names], names


def per_layer_percentage(model, initial):
    norms = per_layer_norms(model, initial)
    current = jlx.flatten(model)
    names = sorted(norms, key=norms.__getitem__, reverse=True)[: math.ceil(len(norms) * PERCENTAGE)]
    return [np.asarray(current[name]) for name in names], names


def model_pair(shapes, torch_shapes: bool = False):
    """The initial and the trained model as jax pytrees, and the same two as the reference's
    state dicts (torch layout); with ``torch_shapes`` jaxlayerx gets torch's shapes too."""
    initial_flat = jlx.flatten(random_tree(shapes, seed=0))
    drift = jlx.flatten(random_tree(shapes, seed=1, scale=0.01))
    model_flat = {name: initial_flat[name] + drift[name] for name in initial_flat}
    reference_initial, reference_model = reference.state_dict(initial_flat), reference.state_dict(model_flat)
    if torch_shapes:
        initial_flat = {
            name: np.asarray(layer).reshape(tuple(layer.shape)) for name, layer in reference_initial.items()
        }
        model_flat = {name: np.asarray(layer).reshape(tuple(layer.shape)) for name, layer in reference_model.items()}
    as_jax = lambda flat: nested({name: jnp.asarray(value) for name, value in flat.items()})  # noqa: E731
    return as_jax(initial_flat), as_jax(model_flat), reference_initial, reference_model


def selection_cases(tree_name: str, shapes, repeats: int, torch_shapes: bool = False) -> list[dict[str, object]]:
    """Cases 1 and 2: threshold and percentage selection through ``push_parameters``."""
    initial, model, reference_initial, reference_model = model_pair(shapes, torch_shapes)
    nbytes = sum(leaf.nbytes for leaf in jax.tree.leaves(model))
    floor = read_floor(2 * nbytes, repeats)  # the current and the initial model are both read
    rules = jlx.LayerSelectionFunctionConstructor(THRESHOLD, PERCENTAGE)
    slow_repeats = max(1, repeats // 2)
    label = f"{tree_name}{' (torch shapes)' if torch_shapes else ''}"
    rows = []
    for rule, select, baseline, loop in [
        ("threshold", rules.select_by_threshold(), reference.push_by_threshold, per_layer_threshold),
        ("percentage", rules.select_by_percentage(), reference.push_by_percentage, per_layer_percentage),
    ]:
        exchanger = jlx.DynamicLayerExchanger(select)
        argument = THRESHOLD if rule == "threshold" else PERCENTAGE
        ours = median_time(lambda: exchanger.push_parameters(model, initial_model=initial), repeats)
        theirs = reference.fastest(
            lambda: median_time(lambda: baseline(reference_model, reference_initial, argument), slow_repeats)
        )
        jax_loop = median_time(lambda: loop(model, initial), slow_repeats)
        rows.append(row(f"{label}: {rule} selection (push)", ours, floor, theirs, jax_loop))
    return rows


def client_payloads(shapes, seed: int) -> tuple[list, int]:
    """10 clients, each sending a random half of the layers; and the bytes sent."""
    rng = np.random.default_rng(seed)
    names = list(shapes)
    results, sent = [], 0
    for client in range(CLIENTS):
        flat = jlx.flatten(random_tree(shapes, seed=100 + client))
        chosen = sorted(rng.choice(len(names), size=len(names) // 2, replace=False).tolist())
        payload = jlx.pack_layers([flat[names[i]] for i in chosen], [names[i] for i in chosen])
        sent += sum(np.asarray(array).nbytes for array in payload)  # the data the server reads
        results.append((payload, int(rng.integers(10, 100))))
    return results, sent


def aggregation_case(tree_name: str, shapes, repeats: int) -> dict[str, object]:
    """Case 3: ``FedAvgDynamicLayer.aggregate`` over 10 clients sending half the layers."""
    results, sent = client_payloads(shapes, seed=2)
    server = jlx.FedAvgDynamicLayer()
    ours = median_time(lambda: server.aggregate(results), repeats)
    theirs = reference.fastest(
        lambda: median_time(lambda: reference.fedavg_dynamic_layer(results), max(1, repeats // 2))
    )
    return row(f"{tree_name}: FedAvgDynamicLayer, {CLIENTS} clients", ours, read_floor(sent, repeats), theirs)


def mask_cases(tree_name: str, shapes, repeats: int) -> list[dict[str, object]]:
    """Case 4: the jitted mask forms, as the simulation runs them."""
    initial_tree = jax.tree.map(jnp.asarray, random_tree(shapes, seed=0))
    model_tree = jax.tree.map(lambda a, b: a + jnp.asarray(b), initial_tree, random_tree(shapes, seed=1, scale=0.01))
    initial, current = jlx.flatten(initial_tree), jlx.flatten(model_tree)
    nbytes = sum(leaf.nbytes for leaf in current.values())
    # Stacked into one vector, as inside the simulation's jitted round: the case measures the
    # computation, not building one output array per layer.
    norms_and_mask = jax.jit(
        lambda c, i: jnp.stack(list(jlx.percentage_mask(jlx.drift_norms(c, i), PERCENTAGE).values()))
    )
    ours = median_time(lambda: norms_and_mask(current, initial), repeats)
    reference_initial, reference_model = reference.state_dict(initial), reference.state_dict(current)
    theirs = reference.fastest(
        lambda: median_time(
            lambda: reference.push_by_percentage(reference_model, reference_initial, PERCENTAGE), max(1, repeats // 2)
        )
    )
    jax_loop = median_time(lambda: per_layer_percentage(model_tree, initial_tree), max(1, repeats // 2))
    rows = [
        row(f"{tree_name}: jitted norms + percentage mask", ours, read_floor(2 * nbytes, repeats), theirs, jax_loop)
    ]

    rng = np.random.default_rng(3)
    stacked = jax.tree.map(lambda x: jnp.stack([x + 0.01 * c for c in range(CLIENTS)]), current)
    masks = collections.OrderedDict((name, jnp.asarray(rng.random(CLIENTS) < 0.5)) for name in current)
    counts = jnp.asarray(rng.integers(10, 100, CLIENTS))
    aggregate = jax.jit(jlx.masked_fedavg)
    ours = median_time(lambda: aggregate(stacked, masks, counts), repeats)
    host = jax.device_get((stacked, masks, counts))

    def plain_masked():
        out = {}
        for name, layer in host[0].items():
            sent = [(layer[c] * host[2][c], host[2][c]) for c in range(CLIENTS) if host[1][name][c]]
            if sent:
                out[name] = functools.reduce(np.add, [a for a, _ in sent]) / sum(n for _, n in sent)
        return out

    plain = median_time(plain_masked, max(1, repeats // 2))
    rows.append(
        row(f"{tree_name}: jitted masked_fedavg, {CLIENTS} clients", ours, read_floor(CLIENTS * nbytes, repeats), plain)
    )
    return rows
