"""Payloads and models as Flower records, and the keys of the Message-API protocol.

Every message of the exchange carries its payload as one ``ArrayRecord`` (under the
strategy's ``arrayrecord_key``, ``"arrays"`` by default) in the compact encoding of
:mod:`jaxlayerx.wire.compact`: whole layers, sparse entries, quantized updates alike.
:func:`payload_to_record` and :func:`record_to_payload` convert; a whole model outside the
exchange (a strategy's ``Result.arrays``, a checkpoint, your own code) is an ``ArrayRecord``
keyed by layer names (:func:`arrays_to_record`, :func:`record_to_arrays`).

Every dtype, bfloat16 and float16 included, crosses bit for bit: Flower serializes an
``Array`` with ``numpy.save``, which writes bfloat16 as raw ``|V2`` bytes, while
``Array.dtype`` keeps the name ``"bfloat16"``; :func:`decode_array` decodes by that name.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import Any, cast

import ml_dtypes as ml_dtypes  # noqa: F401 - registers bfloat16 and the other JAX dtypes with numpy
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from jaxlayerx._host import to_numpy
from jaxlayerx.coo import SparseLayer
from jaxlayerx.payload import Entries, Payload
from jaxlayerx.protocol import ClientState
from jaxlayerx.wire import MESSAGE_API, compact
from jaxlayerx.wire.npy import read_npy

#: The config key of the round a message belongs to (Flower's own name for it).
SERVER_ROUND_KEY = "server-round"
#: Config key: the global version the node must hold to apply the sent arrays, -1 when they are the whole model.
BASE_ROUND_KEY = "jaxlayerx.base-round"
#: Config key: the global version the node holds once it has merged the sent arrays.
VERSION_KEY = "jaxlayerx.round"
#: Metric key: the node's example count (Flower's ``weighted_by_key`` default).
NUM_EXAMPLES_KEY = "num-examples"
#: Metric key: bytes of the arrays the node sent back.
BYTES_SENT_KEY = "jaxlayerx.bytes-sent"
#: Metric key: bytes of the arrays the node received.
BYTES_RECEIVED_KEY = "jaxlayerx.bytes-received"
#: The default ArrayRecord key of a message's arrays.
ARRAYS_KEY = "arrays"


def arrays_to_record(flat: Mapping[str, Any]) -> ArrayRecord:
    """``name -> array`` (numpy or JAX) as an ArrayRecord, names and order kept."""
    names = list(flat)
    record = ArrayRecord()
    for name, array in zip(names, to_numpy(flat.values())):
        record[name] = Array(np.asarray(array))
    return record


def record_to_arrays(record: ArrayRecord) -> collections.OrderedDict[str, np.ndarray]:
    """The inverse of :func:`arrays_to_record`: ``name -> numpy array`` in record order.

    Raises:
      ValueError: an entry that does not decode to its declared dtype and shape (naming it).
    """
    return collections.OrderedDict((name, decode_array(name, array)) for name, array in record.items())


def decode_array(name: str, array: Array) -> np.ndarray:
    """One Flower ``Array`` as numpy, in the dtype its ``dtype`` string names.

    Raises:
      ValueError: the data does not deserialize, or disagrees with the declared dtype or shape.
    """
    try:
        dtype = np.dtype(array.dtype)
        value = _load_npy(array)
    except Exception as error:  # noqa: BLE001 - the npy reader and np.dtype raise many types on bad input
        raise ValueError(f"array {name!r} does not decode: {type(error).__name__}: {error}") from error
    if value.dtype != dtype:
        if value.dtype.kind != "V" or value.dtype.itemsize != dtype.itemsize:
            raise ValueError(f"array {name!r}: declared dtype {array.dtype}, but its data holds {value.dtype}")
        value = value.view(dtype)
    if tuple(value.shape) != tuple(array.shape):
        raise ValueError(f"array {name!r}: declared shape {tuple(array.shape)}, but its data has {value.shape}")
    return value


#: The serialization ``Array.numpy()`` reads (Flower's ``SType.NUMPY``), as Flower writes it.
_NUMPY_STYPE = Array(np.zeros(0, np.float32)).stype


def _load_npy(array: Array) -> np.ndarray:
    """``Array.numpy()``, without trusting the blob's header (:func:`read_npy`)."""
    if array.stype != _NUMPY_STYPE:
        raise TypeError(f"unsupported serialization type {array.stype!r}")
    return read_npy(array.data)


def payload_to_record(payload: Payload) -> ArrayRecord:
    """``payload`` as one ``ArrayRecord``, in the compact encoding."""
    arrays = MESSAGE_API.encode(payload, sparse=True)
    record = ArrayRecord()
    for key, array in cast(Mapping[str, np.ndarray], arrays).items():
        record[key] = Array(np.ascontiguousarray(array))
    return record


def record_to_payload(
    record: ArrayRecord, layout: Mapping[str, Any] | None = None, *, allow_nonfinite: bool = True
) -> Payload:
    """The payload of a compact ``ArrayRecord``, checked whole against the model ``layout``
    (``None``: read as it declares itself).

    Raises:
      ValueError, KeyError, TypeError: a malformed record, or one the model refuses (naming
        the array or the layer).
    """
    arrays = record_to_arrays(record)
    if layout is None:
        return compact.decode(arrays, None, allow_nonfinite=allow_nonfinite)
    return MESSAGE_API.decode(arrays, layout, allow_nonfinite=allow_nonfinite)


def sparse_to_records(layers: Mapping[str, SparseLayer], *, values_key: str = ARRAYS_KEY) -> dict[str, ArrayRecord]:
    """``name -> SparseLayer`` as the records of a message: ``{values_key: ArrayRecord}``
    in the compact encoding (each layer in its cheapest form).

    Put them into the message's ``RecordDict`` (``content.update(...)``).
    """
    payload: Payload = collections.OrderedDict()
    for name, layer in layers.items():
        flat = np.asarray(layer.flat_indices, np.int64)
        order = np.argsort(flat, kind="stable")
        payload[name] = Entries(np.asarray(layer.values)[order], flat[order], tuple(layer.shape))
    return {values_key: payload_to_record(payload)}


def is_sparse(content: RecordDict, *, values_key: str = ARRAYS_KEY) -> bool:
    """Whether ``content`` holds a payload of single entries (some layer not sent whole)."""
    record = content.array_records.get(values_key)
    if record is None or compact.HEADER_KEY not in record:
        return False
    return any(not entries.dense for entries in record_to_payload(record).values())


def records_to_sparse(
    content: RecordDict | Mapping[str, ArrayRecord], *, values_key: str = ARRAYS_KEY
) -> collections.OrderedDict[str, SparseLayer]:
    """The entries of ``content``'s payload as ``name -> SparseLayer``, in payload order,
    whatever each layer's encoding: a layer sent whole comes back as all of its entries.

    Raises:
      KeyError: no record under ``values_key``.
      ValueError, TypeError: a malformed payload (naming the array or the layer).
    """
    records = content.array_records if isinstance(content, RecordDict) else content
    if values_key not in records:
        raise KeyError(f"no ArrayRecord {values_key!r}; got {sorted(records)}")
    return collections.OrderedDict(
        (name, SparseLayer(np.asarray(entries.values), entries.flat_indices(), entries.shape))
        for name, entries in record_to_payload(records[values_key]).items()
    )


#: ``context.state`` keys of a client: its layers, the version it holds, its exchanger's state.
STATE_LAYERS = "jaxlayerx.layers"
STATE_VERSION = "jaxlayerx.version"
STATE_EXCHANGE = "jaxlayerx.exchange"
#: The saved version of a client that holds nothing yet.
NO_VERSION = -2


def save_client(saved: RecordDict, layers: Mapping[str, Any], state: ClientState) -> None:
    """Writes a client's layers and protocol state into ``saved`` (a ``context.state``)."""
    saved[STATE_LAYERS] = arrays_to_record(layers)
    saved[STATE_VERSION] = ConfigRecord({"version": NO_VERSION if state.version is None else state.version})
    saved[STATE_EXCHANGE] = arrays_to_record(state.to_arrays())


def load_client(saved: RecordDict) -> tuple[collections.OrderedDict[str, np.ndarray], ClientState | None]:
    """What :func:`save_client` wrote: the layers and the state (``None`` when nothing was saved)."""
    if STATE_VERSION not in saved.config_records:
        return collections.OrderedDict(), None
    layers_record = saved.array_records.get(STATE_LAYERS)
    layers = record_to_arrays(layers_record if layers_record is not None else ArrayRecord())
    version = int(cast(Any, saved.config_records[STATE_VERSION]["version"]))
    exchange_record = saved.array_records.get(STATE_EXCHANGE)
    exchange = record_to_arrays(exchange_record if exchange_record is not None else ArrayRecord())
    return layers, ClientState.from_arrays(None if version == NO_VERSION else version, exchange)


def content_nbytes(content: RecordDict) -> int:
    """Bytes of the arrays ``content`` carries, as Flower counts them (``ArrayRecord.count_bytes``,
    what ``arrays_size_mod`` logs)."""
    return sum(record.count_bytes() for record in content.array_records.values())
