"""Which codec a payload travels in, on each Flower route: the one rule both routes and the
simulation's byte accounting follow.

* The Message API (``container="record"``): every payload, dense or sparse, whole model or
  update, quantized or not, is a compact payload (:mod:`jaxlayerx.wire.compact`) in one
  ``ArrayRecord``.
* The legacy route (``container="ndarrays"``), fl4health's layouts where they can carry
  the payload: the whole model a client first receives is positional; whole layers are
  named; sparse entries are COO (``sparse="coo"``, fl4health's) or compact
  (``sparse="compact"``); a quantized upload is compact, which fl4health cannot read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from jaxlayerx.packing import is_packed
from jaxlayerx.payload import Payload
from jaxlayerx.wire import compact, fl4health
from jaxlayerx.wire.compact import Container, LayerCount
from jaxlayerx.wire.npy import ndarrays_nbytes, record_nbytes

SparseWire = Literal["compact", "coo"]


@dataclasses.dataclass(frozen=True)
class Wire:
    """How payloads travel on one route.

    Attributes:
      container: ``"record"`` (the Message API's ``ArrayRecord``) or ``"ndarrays"`` (the
        legacy route's ``Parameters``).
      sparse: on the legacy route, the layout of sparse entries: ``"coo"`` (fl4health's)
        or ``"compact"``. The Message API is always compact.
    """

    container: Container = "record"
    sparse: SparseWire = "compact"

    def __post_init__(self) -> None:
        if self.container not in ("record", "ndarrays"):
            raise ValueError(f"container must be 'record' or 'ndarrays', got {self.container!r}")
        if self.sparse not in ("compact", "coo"):
            raise ValueError(f"sparse must be 'compact' or 'coo', got {self.sparse!r}")
        if self.container == "record" and self.sparse != "compact":
            raise ValueError("the Message API carries every payload compact; 'coo' is a legacy layout")

    def codec(self, *, sparse: bool, whole_model: bool = False, quantized: bool = False) -> str:
        """The codec of a payload: ``"compact"``, ``"positional"``, ``"named"`` or ``"coo"``.

        Args:
          sparse: the payload holds entries of layers (a sparse exchanger's, or a sparse
            server's update) rather than whole layers.
          whole_model: the payload is the whole model a client receives first.
          quantized: some values are quantized updates.
        """
        if self.container == "record" or quantized:
            return "compact"
        if whole_model:
            return "positional"
        if sparse:
            return self.sparse
        return "named"

    def encode(
        self, payload: Payload, *, sparse: bool, whole_model: bool = False
    ) -> dict[str, np.ndarray] | list[np.ndarray]:
        """``payload`` as arrays: ``key -> array`` for a record, a list for ``Parameters``."""
        codec = self.codec(sparse=sparse, whole_model=whole_model, quantized=_quantized(payload))
        if codec == "compact":
            arrays = compact.encode(payload)
            return dict(arrays) if self.container == "record" else list(arrays.values())
        return {
            "positional": fl4health.encode_positional,
            "named": fl4health.encode_named,
            "coo": fl4health.encode_coo,
        }[codec](payload)

    def decode(
        self,
        arrays: Mapping[str, Any] | Sequence[Any],
        layout: Mapping[str, Any],
        *,
        whole_model: bool = False,
        allow_nonfinite: bool = True,
    ) -> Payload:
        """The payload of ``arrays``, checked whole against the receiving model ``layout``.

        On the legacy route the layout is read off the arrays: a list starting with a compact
        header is compact; one ending in a names array is named (``k + 1`` arrays) or COO
        (``3k + 1``); with ``whole_model``, a list without names holds every layer of
        ``layout`` in its order.

        Raises:
          ValueError, KeyError, TypeError: a malformed payload, or one the model refuses.
        """
        if self.container == "record":
            if not isinstance(arrays, Mapping):
                raise TypeError(f"a Message-API payload is a key -> array mapping, got {type(arrays).__name__}")
            return compact.decode(arrays, layout, allow_nonfinite=allow_nonfinite)
        if not isinstance(arrays, (list, tuple)):
            raise TypeError(f"a legacy payload is a list of numpy arrays, got {type(arrays).__name__}")
        listed = list(arrays)  # pyright: ignore[reportUnknownArgumentType]
        if compact.is_compact(listed):
            return compact.decode(listed, layout, allow_nonfinite=allow_nonfinite)
        if is_packed(listed):
            names = np.asarray(listed[-1]).size
            if len(listed) == 3 * names + 1 and names > 0:
                return fl4health.decode_coo(listed, layout, allow_nonfinite=allow_nonfinite)
            return fl4health.decode_named(listed, layout, allow_nonfinite=allow_nonfinite)
        if whole_model:
            return fl4health.decode_positional(listed, list(layout), layout, allow_nonfinite=allow_nonfinite)
        raise ValueError(
            f"a legacy payload ends with a names array (named or COO) or starts with a compact header; got "
            f"{len(listed)} arrays, the last of dtype {np.asarray(listed[-1]).dtype} and shape {np.shape(listed[-1])}"
            if listed
            else "an empty legacy payload: expected the layers followed by one names array"
        )

    def nbytes(self, layers: Iterable[LayerCount], *, sparse: bool, whole_model: bool = False) -> int:
        """Bytes of the payload holding ``layers`` (a count of entries each), computed without
        encoding: what Flower carries for :meth:`encode`'s arrays."""
        layers = list(layers)
        quantized = any(layer.quantized is not None for layer in layers)
        codec = self.codec(sparse=sparse, whole_model=whole_model, quantized=quantized)
        if codec == "compact":
            return compact.compact_nbytes(layers, self.container)
        return {
            "positional": fl4health.positional_nbytes,
            "named": fl4health.named_nbytes,
            "coo": fl4health.coo_nbytes,
        }[codec](layers)

    def measure(self, arrays: Mapping[str, Any] | Sequence[Any]) -> int:
        """Bytes of arrays already encoded (serialized sizes, keys included for a record)."""
        if isinstance(arrays, Mapping):
            return record_nbytes(arrays)
        return ndarrays_nbytes(arrays)


#: The Message API: compact payloads in ``ArrayRecord``s.
MESSAGE_API = Wire("record", "compact")
#: The legacy route, speaking fl4health's layouts (sparse entries as COO).
LEGACY = Wire("ndarrays", "coo")


def layer_counts(payload: Payload) -> list[LayerCount]:
    """What :meth:`Wire.nbytes` needs of an actual payload."""
    return [
        LayerCount(name, entries.shape, np.dtype(entries.values.dtype), entries.sent, entries.quantized)
        for name, entries in payload.items()
    ]


def _quantized(payload: Payload) -> bool:
    return any(entries.quantized is not None for entries in payload.values())
