"""The reference's algorithms as the reference runs them: fl4health's loops on torch CPU tensors.

fl4health (the library jaxlayerx reimplements) runs layer exchange in PyTorch: each client
walks its ``state_dict`` and calls one ``torch.linalg.norm`` and one ``.item()`` per layer;
its ``FedAvgDynamicLayer`` server averages numpy arrays with ``functools.reduce(np.add, ...)``
over weighted copies; its sparse exchanger concatenates every score, sorts them all, rebuilds
each layer densely with zeros below the threshold and extracts the nonzeros; its sparse
server rebuilds each payload densely in torch and sums with ``reduce(torch.add, ...)``.

The functions here are those algorithms written for this benchmark (fl4health itself is not
imported). Models are ``name -> tensor`` dicts in torch layout (OIHW kernels), as a
``state_dict`` is. When torch is not installed, :data:`BASELINE` is ``"numpy"`` and the same
loops run on numpy arrays instead. Each baseline is timed with torch's default threads and
with one (:func:`fastest`), and the faster counts.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

try:
    import torch
except ImportError:  # the optional `bench` extra is not installed
    torch = None

#: Which baseline runs: ``"torch <version> (CPU)"`` or ``"numpy"``.
BASELINE = f"torch {torch.__version__} CPU" if torch is not None else "numpy (torch not installed)"


def fastest(time: Callable[[], float]) -> float:
    """The reference's best time: ``time()`` with torch's default intra-op threads and with
    one thread, whichever is faster (on a loaded machine torch's waiting threads can make
    it several times slower, which would flatter jaxlayerx)."""
    best = time()
    default = torch.get_num_threads() if torch is not None else 1
    if default > 1:
        torch.set_num_threads(1)
        try:
            best = min(best, time())
        finally:
            torch.set_num_threads(default)
    return best


def torch_layout(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A Flax kernel shape in torch's layout: HWIO convolutions as OIHW, ``(in, out)`` as ``(out, in)``."""
    if len(shape) == 4:
        h, w, i, o = shape
        return (o, i, h, w)
    if len(shape) == 2:
        return shape[::-1]
    return shape


def state_dict(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """``name -> tensor`` in torch layout (numpy arrays when torch is missing), each a fresh copy."""
    out: dict[str, Any] = {}
    for name, array in flat.items():
        array = np.ascontiguousarray(np.asarray(array).reshape(torch_layout(np.shape(array))))
        out[name] = torch.from_numpy(array.copy()) if torch is not None else array.copy()
    return out


def _drift_norm(current: Any, initial: Any) -> float:
    """fl4health's drift: ``||current - initial|| / numel``, read back with one host sync."""
    if torch is not None:
        diff = (current - initial).float()
        norm = torch.linalg.norm(diff)
        norm /= torch.numel(diff)
        return norm.item()
    diff = (current - initial).astype(np.float32)
    return float(np.linalg.norm(diff.reshape(-1)) / diff.size)


def _to_numpy(tensor: Any) -> np.ndarray:
    return tensor.cpu().numpy() if torch is not None else np.asarray(tensor)


def push_by_threshold(model: Mapping[str, Any], initial: Mapping[str, Any], threshold: float) -> list[np.ndarray]:
    """A client's push with threshold selection: the layers whose drift exceeds it, packed with names."""
    names, arrays = [], []
    for name, layer in model.items():
        if _drift_norm(layer, initial[name]) > threshold:
            arrays.append(_to_numpy(layer))
            names.append(name)
    return arrays + [np.array(names)]


def push_by_percentage(model: Mapping[str, Any], initial: Mapping[str, Any], percentage: float) -> list[np.ndarray]:
    """A client's push with percentage selection: the ``ceil(N * percentage)`` layers that drifted most."""
    drifts = {name: _drift_norm(layer, initial[name]) for name, layer in model.items()}
    count = int(math.ceil(len(drifts) * percentage))
    names = sorted(drifts, key=drifts.__getitem__, reverse=True)[:count]
    return [_to_numpy(model[name]) for name in names] + [np.array(names)]


def fedavg_dynamic_layer(results: list[tuple[list[np.ndarray], int]]) -> dict[str, np.ndarray]:
    """The server's weighted average (numpy, as fl4health's server runs it): per layer name, a
    ``reduce(np.add, ...)`` over the clients' weighted copies, divided by their total weight."""
    weighted: dict[str, list[np.ndarray]] = {}
    totals: dict[str, int] = {}
    for payload, num_examples in results:
        layers, names = payload[:-1], payload[-1].tolist()
        for layer, name in zip(layers, names):
            weighted.setdefault(name, []).append(layer * num_examples)
            totals[name] = totals.get(name, 0) + num_examples
    return {name: functools.reduce(np.add, arrays) / totals[name] for name, arrays in weighted.items()}


def sparse_push(model: Mapping[str, Any], initial: Mapping[str, Any], sparsity: float) -> list[np.ndarray]:
    """A client's sparse COO push scored by ``|w - w0|``: all scores concatenated and fully sorted,
    each layer rebuilt densely with zeros below the threshold, then its nonzeros extracted."""
    if torch is None:
        return _numpy_sparse_push(model, initial, sparsity)
    scores = {name: torch.abs(layer - initial[name]) for name, layer in model.items()}
    ordered, _ = torch.sort(torch.cat([score.flatten() for score in scores.values()]), descending=True)
    threshold = ordered[math.ceil(len(ordered) * sparsity) - 1].item()
    values, indices, shapes, names = [], [], [], []
    for name, score in scores.items():
        dense = torch.where(score >= threshold, model[name], 0)
        if dense.shape == torch.Size([]) or bool((dense == 0).all()):
            continue
        values.append(dense[torch.nonzero(dense, as_tuple=True)].cpu().numpy())
        indices.append(torch.nonzero(dense, as_tuple=False).cpu().numpy())
        shapes.append(np.array(dense.shape))
        names.append(name)
    return values + indices + shapes + [np.array(names)]


def _numpy_sparse_push(model: Mapping[str, Any], initial: Mapping[str, Any], sparsity: float) -> list[np.ndarray]:
    scores = {name: np.abs(layer - initial[name]) for name, layer in model.items()}
    ordered = np.sort(np.concatenate([score.reshape(-1) for score in scores.values()]))[::-1]
    threshold = ordered[math.ceil(ordered.size * sparsity) - 1]
    values, indices, shapes, names = [], [], [], []
    for name, score in scores.items():
        dense = np.where(score >= threshold, model[name], 0)
        if dense.ndim == 0 or not dense.any():
            continue
        values.append(dense[np.nonzero(dense)])
        indices.append(np.argwhere(dense))
        shapes.append(np.array(dense.shape))
        names.append(name)
    return values + indices + shapes + [np.array(names)]


def sparse_threshold(scores: list[Any], sparsity: float) -> float:
    """The global score threshold alone: concatenate, full descending sort, index."""
    if torch is None:
        ordered = np.sort(np.concatenate([score.reshape(-1) for score in scores]))[::-1]
        return float(ordered[math.ceil(ordered.size * sparsity) - 1])
    ordered, _ = torch.sort(torch.cat([score.flatten() for score in scores]), descending=True)
    return ordered[math.ceil(len(ordered) * sparsity) - 1].item()


def fedavg_sparse_coo(results: list[tuple[list[np.ndarray], int]]) -> dict[str, Any]:
    """The sparse server's weighted average: each payload's layers rebuilt densely (torch COO
    tensors made dense), weighted, and summed with ``reduce``."""
    dense: dict[str, list[Any]] = {}
    totals: dict[str, int] = {}
    for payload, num_examples in results:
        count = (len(payload) - 1) // 3
        values, indices, shapes = payload[:count], payload[count : 2 * count], payload[2 * count : 3 * count]
        for value, index, shape, name in zip(values, indices, shapes, payload[-1].tolist()):
            if torch is not None:
                coo = torch.sparse_coo_tensor(
                    torch.tensor(index.T), torch.tensor(value), size=torch.Size(shape.tolist()), check_invariants=False
                )
                layer = coo.to_dense()
            else:
                layer = np.zeros(tuple(shape), value.dtype)
                layer[tuple(index.T)] = value
            dense.setdefault(name, []).append(layer * num_examples)
            totals[name] = totals.get(name, 0) + num_examples
    add = torch.add if torch is not None else np.add
    return {name: functools.reduce(add, arrays) / totals[name] for name, arrays in dense.items()}
