"""What a payload carries, whatever the wire: some entries of some layers.

A :data:`Payload` is an ordered ``name -> Entries`` mapping. :class:`Entries` holds the
values of one layer's sent entries, their row-major flat indices (``None``: every entry,
in order), the layer's shape and, for a quantized upload, how its values are coded. Every
codec (:mod:`jaxlayerx.wire`) encodes a payload into arrays and decodes arrays back into
one; the exchangers push and pull payloads, and the servers average them.
"""

from __future__ import annotations

import collections
import math
from typing import Any, NamedTuple, TypeAlias

import numpy as np

from jaxlayerx.quantize import Quantize


class Entries(NamedTuple):
    """The sent entries of one layer.

    Attributes:
      values: 1-D values, one per sent entry, in row-major order.
      indices: the entries' row-major flat indices, ascending (int64); ``None`` when every
        entry of the layer is sent (``values`` then holds all of them).
      shape: the layer's shape.
      quantized: ``None`` for plain values; ``"bf16"`` or ``"int8"`` when ``values`` code
        the update over the receiver's base (see :mod:`jaxlayerx.quantize`).
      scale: the int8 scale (float32); 1 otherwise.
    """

    values: np.ndarray
    indices: np.ndarray | None
    shape: tuple[int, ...]
    quantized: Quantize | None = None
    scale: np.float32 = np.float32(1)

    @property
    def size(self) -> int:
        """Entries of the whole layer."""
        return math.prod(self.shape)

    @property
    def sent(self) -> int:
        """Entries sent."""
        return int(self.values.size)

    @property
    def dense(self) -> bool:
        """Whether every entry of the layer is sent."""
        return self.indices is None

    def flat_indices(self) -> np.ndarray:
        """The sent entries' row-major flat indices (``arange`` for a dense layer)."""
        return np.arange(self.size, dtype=np.int64) if self.indices is None else self.indices

    def layer(self) -> np.ndarray:
        """The values in the layer's shape (a dense layer only)."""
        if self.indices is not None:
            raise ValueError("only a dense layer's entries have the layer's shape")
        return self.values.reshape(self.shape)


#: An ordered ``name -> Entries`` mapping.
Payload: TypeAlias = "collections.OrderedDict[str, Entries]"


def dense_entries(array: Any) -> Entries:
    """Every entry of a layer."""
    array = np.asarray(array)
    return Entries(array.reshape(-1), None, tuple(array.shape))


def sparse_entries(array: Any, mask: Any) -> Entries:
    """The entries of ``array`` that the boolean ``mask`` (of its shape) marks; all of them
    as a dense layer when the mask marks every entry."""
    array, mask = np.asarray(array), np.asarray(mask, bool)
    if mask.all():
        return dense_entries(array)
    flat = np.flatnonzero(mask)
    return Entries(array.reshape(-1)[flat], flat.astype(np.int64, copy=False), tuple(array.shape))


def dense_payload(layers: Any) -> Payload:
    """``name -> array`` as a payload of whole layers, in its order."""
    return collections.OrderedDict((name, dense_entries(array)) for name, array in layers.items())


def counts(payload: Payload) -> dict[str, int]:
    """``name -> entries sent``."""
    return {name: entries.sent for name, entries in payload.items()}
