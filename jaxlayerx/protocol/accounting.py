"""The bytes of every message, from what each one holds: the simulation's byte accounting.

The simulation knows, per client and layer, how many entries were sent and pulled; these
functions turn that into the exact bytes a Flower deployment of the same federation
carries, through the same codecs the routes encode with (:class:`jaxlayerx.wire.Wire`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from jaxlayerx.quantize import Quantize, layer_quantize, wire_dtype
from jaxlayerx.wire import LayerCount, Wire


class LayerSpec(NamedTuple):
    """A layer of the model: its name, shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype


def layer_counts(
    layers: Sequence[LayerSpec], counts: Sequence[int], *, quantize: Quantize | None = None
) -> list[LayerCount]:
    """The :class:`jaxlayerx.wire.LayerCount` of a payload holding ``counts[i]`` entries of
    layer ``i`` (all of them: the whole layer); layers with none are not in it."""
    return [
        LayerCount(
            layer.name,
            layer.shape,
            wire_dtype(quantize, layer.dtype),
            int(count),
            layer_quantize(quantize, layer.dtype),
        )
        for layer, count in zip(layers, counts)
        if count > 0
    ]


def upload_nbytes(
    wire: Wire, layers: Sequence[LayerSpec], counts: Sequence[int], *, sparse: bool, quantize: Quantize | None = None
) -> int:
    """Bytes of a client's reply holding ``counts[i]`` entries of layer ``i``; ``sparse``
    for a sparse exchanger's reply (entries) rather than whole layers."""
    return wire.nbytes(layer_counts(layers, counts, quantize=quantize), sparse=sparse)


def download_nbytes(
    wire: Wire, layers: Sequence[LayerSpec], counts: Sequence[int], *, sparse: bool, whole_model: bool
) -> int:
    """Bytes of what a client is sent: the whole model, or ``counts[i]`` changed entries of
    layer ``i`` (``sparse``: from a server that tracks entries)."""
    return wire.nbytes(layer_counts(layers, counts), sparse=sparse and not whole_model, whole_model=whole_model)
