"""Server-side averaging of sparse COO payloads: each weight over the clients that sent it.

A weight's average is ``sum_i w_i x_i / sum_i w_i`` over the clients ``i`` that sent that
weight, ``w_i`` the client's number of examples (1 when not weighted), with the dtype rules
of :class:`jaxlayerx.FedAvgDynamicLayer` (mixed dtypes promoted; NaN and infinite values
refused, naming the client and the layer, unless ``allow_nonfinite=True``). fl4health's ``FedAvgSparseCooTensor`` instead
averages each tensor over the clients that sent any of it, counting the entries a client
did not send as zeros; that shrinks every weight towards zero by the share of clients that
did not pick it, so jaxlayerx does not follow it there.

The per-weight masked form, for stacked clients inside ``jax.jit``, is
:func:`jaxlayerx.masked_fedavg` with masks of each layer's shape.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import numpy as np

from jaxlayerx.aggregation import canonical_order, cast_mean, host_accumulator
from jaxlayerx.base import NDArrays
from jaxlayerx.contributions import check_consistent, check_finite, check_numeric, read_results
from jaxlayerx.coo import SparseLayer, read_coo
from jaxlayerx.dtypes import promoted_dtype


class FedAvgSparseCooTensor:
    """Averages sparse COO payloads weight by weight (see the module docstring).

    Args:
      weighted_aggregation: weight each client by its number of examples (else uniformly).
      allow_nonfinite: average NaN and infinite client values in instead of refusing them.
    """

    def __init__(self, weighted_aggregation: bool = True, *, allow_nonfinite: bool = False) -> None:
        self.weighted_aggregation = bool(weighted_aggregation)
        self.allow_nonfinite = bool(allow_nonfinite)

    def aggregate(self, results: Sequence[tuple[NDArrays, int]]) -> collections.OrderedDict[str, SparseLayer]:
        """Averages the weights of COO client payloads.

        Args:
          results: one ``(payload, num_examples)`` per client, each payload in the layout of
            :func:`jaxlayerx.pack_coo`.

        Returns:
          ``name -> SparseLayer`` for every layer some client sent, sorted by name: the
          averages at every entry some client sent, in row-major order. Pack it for the
          clients with :func:`jaxlayerx.write_coo`; apply it to a model with
          :func:`jaxlayerx.merge_sparse_layers`. The result is bit-identical for any order
          of ``results``.

        Raises:
          ValueError: a malformed payload or example count (naming the client); one layer
            name with different shapes from two clients (naming both); a weight whose
            senders' weights sum to zero; a NaN or infinite value without ``allow_nonfinite``.
          TypeError: values that cannot be averaged (complex, strings).
        """
        contributions, shapes = self._collect(results)
        return collections.OrderedDict(
            (name, _sparse_mean(name, canonical_order(contributions[name]), shapes[name]))
            for name in sorted(contributions)
        )

    def _collect(
        self, results: Sequence[tuple[NDArrays, int]]
    ) -> tuple[dict[str, list[tuple[float, np.ndarray, np.ndarray]]], dict[str, tuple[int, ...]]]:
        """Reads and checks every payload; ``name -> [(weight, values, flat indices)]`` and shapes."""
        contributions: dict[str, list[tuple[float, np.ndarray, np.ndarray]]] = {}
        first_senders: dict[str, tuple[int, tuple[int, ...]]] = {}
        for client, weight, layers in read_results(results, read_coo, self.weighted_aggregation):
            for name, layer in layers.items():
                check_consistent(name, (client, layer.shape), first_senders)
                check_numeric(client, name, layer.values.dtype)
                if not self.allow_nonfinite:
                    check_finite(client, name, layer.values)
                contributions.setdefault(name, []).append((weight, layer.values, layer.flat_indices))
        return contributions, {name: sender[1] for name, sender in first_senders.items()}


def _sparse_mean(name: str, items: list[tuple[float, np.ndarray, np.ndarray]], shape: tuple[int, ...]) -> SparseLayer:
    """The weighted mean of each entry over the contributions that hold it, summed in
    ``items`` order in the layer's host accumulator dtype."""
    dtype = promoted_dtype({values.dtype for _, values, _ in items})
    accumulate = host_accumulator(dtype)
    size = int(np.prod(shape, dtype=np.int64))
    summed = np.zeros(size, accumulate)
    total = np.zeros(size, accumulate)
    for weight, values, flat in items:
        summed[flat] += accumulate(weight) * values.astype(accumulate, copy=False)
        total[flat] += accumulate(weight)
    entries = np.flatnonzero(total != 0)
    silent = [flat for weight, _, flat in items if weight == 0]
    if silent and not np.isin(np.concatenate(silent), entries).all():
        raise ValueError(f"layer {name!r}: some weights were sent only by clients with zero examples")
    return SparseLayer(cast_mean(summed[entries] / total[entries], dtype, np), entries, shape)
