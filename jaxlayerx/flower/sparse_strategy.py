"""A Flower strategy that averages sparse COO payloads weight by weight (legacy route)."""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxlayerx.aggregation import cast_mean
from jaxlayerx.coo import SparseLayer, read_coo, write_coo
from jaxlayerx.dtypes import conform_dtype, dtype_kind
from jaxlayerx.errors import unknown_layer
from jaxlayerx.flower.strategy import ClientRecord, FedAvgDynamicLayerStrategy
from jaxlayerx.sparse_aggregation import FedAvgSparseCooTensor


class FedAvgSparseCooTensorStrategy(FedAvgDynamicLayerStrategy):
    """Flower ``FedAvg`` for sparse exchange: each weight averaged over the clients that sent it.

    Clients send fl4health's ``FedAvgSparseCooTensor`` payloads, ``values + indices +
    shapes + [names]`` (:func:`jaxlayerx.pack_coo`; what
    :class:`jaxlayerx.SparseCooParameterExchanger` pushes). The averaging is the core's
    :class:`jaxlayerx.FedAvgSparseCooTensor`: a weight's mean is taken over the clients
    that sent that weight (fl4health counts the entries a client did not send as zeros).
    The strategy keeps the full global model: every weight nobody sent keeps its value.

    What a client receives: the first message holds every layer, dense and unnamed, in the
    global model's order (fl4health's initial parameters); later ones hold, as a COO
    payload, exactly the weights that changed since the last model the client is known to
    hold, so a client that skipped rounds or failed catches up exactly.

    Validation, rejection, ``accept_failures``, metrics, :attr:`history` and the options
    are those of :class:`FedAvgDynamicLayerStrategy`: every payload is checked whole
    (layout, bounds, repeated entries, known names, exact shapes, dtypes the layers accept,
    finite values; ``|V2`` bfloat16 from Flower's serialization is reinterpreted) before
    any of it is used. The aggregated result handed back to Flower is the round's averages
    as a COO payload.

    Args:
      initial_model: the starting global model (a model or a flat ``name -> array`` view).
      weighted_aggregation: weight clients by their example counts (else uniformly).
      allow_nonfinite: accept NaN and infinite client values instead of rejecting the payload.
      nnx_filter: which NNX variables of an ``nnx.Module`` form the model.
      **fedavg_options: ``FedAvg``'s options, as for :class:`FedAvgDynamicLayerStrategy`.
    """

    def __init__(self, initial_model: Any, **options: Any) -> None:
        super().__init__(initial_model, **options)
        # the round in which each weight last changed (0: the initial model)
        self._entry_rounds = {name: np.zeros(layer.shape, np.int64) for name, layer in self.global_layers.items()}

    def __repr__(self) -> str:
        return (
            f"FedAvgSparseCooTensorStrategy(layers={len(self.global_layers)}, "
            f"weighted_aggregation={self.weighted_aggregation}, accept_failures={self.accept_failures})"
        )

    def global_payload(self, since: int | None = None) -> list[np.ndarray]:
        """Every global layer, dense and unnamed, when ``since`` is ``None``; else the
        weights updated after round ``since`` as a COO payload (layers in global order)."""
        if since is None:
            return [layer.copy() for layer in self.global_layers.values()]
        changed: collections.OrderedDict[str, SparseLayer] = collections.OrderedDict()
        for name, layer in self.global_layers.items():
            if self._updated_in[name] > since:
                entries = np.flatnonzero(self._entry_rounds[name].reshape(-1) > since)
                changed[name] = SparseLayer(layer.reshape(-1)[entries], entries, layer.shape)
        return write_coo(changed)

    def _checked_layers(self, payload: list[np.ndarray]) -> collections.OrderedDict[str, Any]:
        """A deserialized COO payload's layers, checked whole against the global model."""
        return checked_coo(payload, self.global_layers, allow_nonfinite=self.allow_nonfinite)

    def _average(self, accepted: list[tuple[ClientRecord, collections.OrderedDict[str, Any]]]) -> dict[str, Any]:
        results = [
            (write_coo(layers), record.num_examples)
            for record, layers in accepted
            if record.num_examples > 0 or not self.weighted_aggregation
        ]
        # Checked already; averaged in the senders' promoted dtype, then cast once to the global model's.
        averages = FedAvgSparseCooTensor(self.weighted_aggregation, allow_nonfinite=True).aggregate(results)
        return {
            name: layer._replace(values=cast_mean(layer.values, self.global_layers[name].dtype, np))
            for name, layer in averages.items()
        }

    def _apply(self, averages: Mapping[str, Any], server_round: int) -> None:
        for name, layer in averages.items():
            updated = self.global_layers[name].copy()  # payloads already handed out keep their values
            updated.reshape(-1)[layer.flat_indices] = layer.values
            self.global_layers[name] = updated
            self._entry_rounds[name].reshape(-1)[layer.flat_indices] = server_round
            self._updated_in[name] = server_round

    def _update_payload(self, averages: Mapping[str, Any]) -> list[np.ndarray]:
        return write_coo(averages)


def checked_coo(
    payload: list[np.ndarray], reference: Mapping[str, Any], *, allow_nonfinite: bool = True
) -> collections.OrderedDict[str, SparseLayer]:
    """Validates a COO payload against ``reference`` layers, all of it before returning.

    The layout checks of :func:`jaxlayerx.read_coo` (counts, names, bounds, repeated
    entries), then per layer: a known name, the exact shape, a value dtype the layer
    accepts (:mod:`jaxlayerx.dtypes`; ``|V2`` is reinterpreted as the layer's 2-byte
    dtype) and, unless ``allow_nonfinite``, finite values. Values keep the dtype they were
    sent in.

    Returns:
      ``name -> SparseLayer`` in payload order.

    Raises:
      ValueError: malformed layout, a shape mismatch, a non-finite value.
      KeyError: an unknown name (with the closest valid names).
      TypeError: a dtype the layer does not accept; non-integer indices or shapes.
    """
    checked: collections.OrderedDict[str, SparseLayer] = collections.OrderedDict()
    for name, layer in read_coo(payload).items():
        if name not in reference:
            raise unknown_layer(name, reference)
        like = reference[name]
        if tuple(layer.shape) != tuple(np.shape(like)):
            raise ValueError(f"layer {name!r}: expected shape {tuple(np.shape(like))}, got {tuple(layer.shape)}")
        values = np.asarray(conform_dtype(name, layer.values, like.dtype))
        if not allow_nonfinite and dtype_kind(values.dtype) == "float" and not np.isfinite(values).all():
            raise ValueError(f"layer {name!r} holds a non-finite value (NaN or infinity)")
        checked[name] = layer._replace(values=values)
    return checked
