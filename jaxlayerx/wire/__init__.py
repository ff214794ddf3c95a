"""Payloads and their codecs: what crosses the wire, and exactly how many bytes it takes.

* :mod:`~jaxlayerx.payload`: the wire-neutral :data:`Payload` (``name -> Entries``);
* :mod:`~jaxlayerx.wire.compact`: the compact encoding (the Message API's, and the legacy
  route's for quantized or compact sparse payloads);
* :mod:`~jaxlayerx.wire.fl4health`: fl4health's positional, named and COO layouts;
* :mod:`~jaxlayerx.wire.routes`: which codec a payload travels in on each route
  (:class:`Wire`, :data:`MESSAGE_API`, :data:`LEGACY`);
* :mod:`~jaxlayerx.wire.npy`: exact serialized sizes, as Flower counts them.
"""

from jaxlayerx.payload import Entries, Payload, dense_entries, dense_payload, sparse_entries
from jaxlayerx.wire.compact import LayerCount, choose_encoding, compact_nbytes, index_dtype
from jaxlayerx.wire.npy import npy_nbytes, record_nbytes
from jaxlayerx.wire.routes import LEGACY, MESSAGE_API, Wire, layer_counts

__all__ = [
    "LEGACY",
    "MESSAGE_API",
    "Entries",
    "LayerCount",
    "Payload",
    "Wire",
    "choose_encoding",
    "compact_nbytes",
    "dense_entries",
    "dense_payload",
    "index_dtype",
    "layer_counts",
    "npy_nbytes",
    "record_nbytes",
    "sparse_entries",
]
