"""Flat ``name -> array`` views as Flower records, and the keys of the Message-API protocol.

A dense payload is one :class:`flwr.app.ArrayRecord`: the layer names are its keys, in
order. A sparse (COO) payload is three ArrayRecords with the same keys, in one
``RecordDict``:

* ``"arrays"`` (the strategy's ``arrayrecord_key``): each sent layer's 1-D values;
* ``"coo-indices"``: each layer's ``(n, ndim)`` int64 row-major coordinates;
* ``"coo-shapes"``: each layer's ``(ndim,)`` int64 shape.

Every dtype, bfloat16 and float16 included, crosses bit for bit: Flower serializes an
``Array`` with ``numpy.save``, which writes bfloat16 as raw ``|V2`` bytes, while
``Array.dtype`` keeps the name ``"bfloat16"``; :func:`record_to_arrays` decodes by that name.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping
from typing import Any

import ml_dtypes as ml_dtypes  # noqa: F401 - registers bfloat16 and the other JAX dtypes with numpy
import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from jaxlayerx._host import to_numpy
from jaxlayerx.coo import SparseLayer, read_coo, unravel

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
#: RecordDict keys of a sparse payload's coordinates and shapes (its values go under ``"arrays"``).
COO_INDICES_KEY = "coo-indices"
COO_SHAPES_KEY = "coo-shapes"
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
        value = array.numpy()
    except Exception as error:  # noqa: BLE001 - np.load and np.dtype raise many types on bad input
        raise ValueError(f"array {name!r} does not decode: {type(error).__name__}: {error}") from error
    if value.dtype != dtype:
        if value.dtype.kind != "V" or value.dtype.itemsize != dtype.itemsize:
            raise ValueError(f"array {name!r}: declared dtype {array.dtype}, but its data holds {value.dtype}")
        value = value.view(dtype)
    if tuple(value.shape) != tuple(array.shape):
        raise ValueError(f"array {name!r}: declared shape {tuple(array.shape)}, but its data has {value.shape}")
    return value


def sparse_to_records(layers: Mapping[str, SparseLayer], *, values_key: str = ARRAYS_KEY) -> dict[str, ArrayRecord]:
    """``name -> SparseLayer`` as the three ArrayRecords of the COO layout (module docstring).

    Put them into the message's ``RecordDict`` (``content.update(...)`` or one by one).
    """
    values = {name: layer.values for name, layer in layers.items()}
    indices = {name: unravel(np.asarray(layer.flat_indices), layer.shape) for name, layer in layers.items()}
    shapes = {name: np.asarray(layer.shape, np.int64) for name, layer in layers.items()}
    return {
        values_key: arrays_to_record(values),
        COO_INDICES_KEY: arrays_to_record(indices),
        COO_SHAPES_KEY: arrays_to_record(shapes),
    }


def is_sparse(content: RecordDict) -> bool:
    """Whether ``content`` holds a COO payload (it has the coordinates record)."""
    return COO_INDICES_KEY in content.array_records


def records_to_sparse(
    content: RecordDict | Mapping[str, ArrayRecord], *, values_key: str = ARRAYS_KEY
) -> collections.OrderedDict[str, SparseLayer]:
    """The COO layers of ``content``, in the values record's order, after checking all of it.

    Raises:
      KeyError: a missing record.
      ValueError: the three records name different layers; an entry that does not decode;
        the checks of :func:`jaxlayerx.read_coo` (1-D values, ``(n, ndim)`` indices in
        bounds and distinct, a non-negative shape), naming the layer.
      TypeError: indices or a shape that are not integers.
    """
    return read_coo(records_to_coo_payload(content, values_key=values_key))


def records_to_coo_payload(
    content: RecordDict | Mapping[str, ArrayRecord], *, values_key: str = ARRAYS_KEY
) -> list[np.ndarray]:
    """The COO records of ``content`` as the legacy payload ``values + indices + shapes + [names]``
    (:func:`jaxlayerx.pack_coo`'s layout), decoded but not yet checked (see :func:`records_to_sparse`).

    Raises:
      KeyError: a missing record. ValueError: the records name different layers; an entry that does not decode.
    """
    records = content.array_records if isinstance(content, RecordDict) else content
    parts: list[collections.OrderedDict[str, np.ndarray]] = []
    for key in (values_key, COO_INDICES_KEY, COO_SHAPES_KEY):
        if key not in records:
            raise KeyError(f"a sparse payload needs the ArrayRecord {key!r}; got {sorted(records)}")
        parts.append(record_to_arrays(records[key]))
    values, indices, shapes = parts
    names = list(values)
    for key, part in zip((COO_INDICES_KEY, COO_SHAPES_KEY), (indices, shapes)):
        if list(part) != names:
            raise ValueError(f"the ArrayRecord {key!r} names layers {list(part)}, the values name {names}")
    return [*values.values(), *indices.values(), *shapes.values(), np.array(names, dtype=np.str_)]


def content_nbytes(content: RecordDict) -> int:
    """Bytes of the arrays ``content`` carries, as Flower counts them (``ArrayRecord.count_bytes``,
    what ``arrays_size_mod`` logs)."""
    return sum(record.count_bytes() for record in content.array_records.values())


def data_nbytes(layers: Mapping[str, np.ndarray]) -> int:
    """Bytes of the array data alone (no serialization headers, no names)."""
    return sum(math.prod(np.shape(array)) * np.asarray(array).dtype.itemsize for array in layers.values())
