"""The wire format: named layers as Flower-style ``NDArrays``.

A payload is the selected arrays followed by one last array holding their names::

    weights + [np.array(names)]    # names: 1-D Unicode array, dtype.kind == "U"

the layout of fl4health's ``ParameterPackerWithLayerNames``, so payloads travel both ways
between jaxlayerx and fl4health peers. The names array is never an ``object`` array, so
it survives ``numpy.save(..., allow_pickle=False)`` (Flower's serialization).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import numpy as np

from jaxlayerx._host import to_numpy
from jaxlayerx.base import NDArrays

__all__ = ["is_packed", "pack_layers", "payload_nbytes", "read_names", "to_numpy", "unpack_layers"]


def pack_layers(weights: Sequence[Any], names: Sequence[str]) -> NDArrays:
    """Packs ``weights`` and their layer ``names`` into one payload.

    Arrays leave as numpy in their own dtype (bfloat16 included).

    Raises:
      ValueError: counts differ, or a name repeats.
      TypeError: a name is not a string.
    """
    names = list(names)
    _check_names(names, len(weights))
    return to_numpy(weights) + [np.array(names, dtype=np.str_)]


def unpack_layers(payload: Sequence[np.ndarray]) -> tuple[NDArrays, list[str]]:
    """Splits a payload into its arrays and their layer names, checking its layout.

    An empty names array of any dtype is accepted as "no layers" (fl4health packs an
    empty selection as ``np.array([])``, a float array).

    Raises:
      ValueError: the payload is empty; the last array is not a 1-D Unicode string
        array; the number of names differs from the number of arrays; a name repeats.
    """
    if not isinstance(payload, (list, tuple)):
        raise TypeError(f"a payload is a list of numpy arrays, got {type(payload).__name__}")
    if len(payload) == 0:
        raise ValueError("empty payload: expected the layers followed by one names array")
    weights = [np.asarray(weight) for weight in payload[:-1]]
    return weights, read_names(payload[-1], len(weights))


def read_names(names_array: Any, count: int) -> list[str]:
    """The layer names of a payload's last array, checked: 1-D Unicode (or empty), ``count``
    of them, no repeats.

    Raises:
      ValueError: as :func:`unpack_layers`.
    """
    names_array = np.asarray(names_array)
    if names_array.ndim != 1 or (names_array.dtype.kind != "U" and names_array.size > 0):
        raise ValueError(
            "the last array of a payload must be the 1-D Unicode array of layer names; "
            f"got an array of dtype {names_array.dtype} and shape {names_array.shape}"
        )
    names = [str(name) for name in names_array.tolist()]
    _check_names(names, count)
    return names


def is_packed(payload: Sequence[Any]) -> bool:
    """Whether ``payload`` ends with a names array, as :func:`pack_layers` makes.

    The last array must be 1-D and Unicode, or empty (fl4health's empty selection,
    ``np.array([])``, as :func:`unpack_layers` reads it). An unnamed payload (fl4health's
    full or fixed exchange: the arrays only) gives ``False``.
    """
    if len(payload) == 0:
        return False
    last = np.asarray(payload[-1])
    return last.ndim == 1 and (last.dtype.kind == "U" or last.size == 0)


def payload_nbytes(payload: Sequence[np.ndarray]) -> int:
    """Bytes of a payload as Flower sends it on the legacy route: each array's ``numpy.save``
    blob, header and data (names array included); see :mod:`jaxlayerx.wire.npy`."""
    from jaxlayerx.wire.npy import ndarrays_nbytes  # the wire package builds on this module

    return ndarrays_nbytes(payload)


def _check_names(names: list[str], count: int) -> None:
    if len(names) != count:
        raise ValueError(f"{count} arrays but {len(names)} layer names")
    for name in cast("list[object]", names):
        if not isinstance(name, str):
            raise TypeError(f"layer names must be strings, got {type(name).__name__} {name!r}")
    if len(set(names)) != len(names):
        repeated = sorted({name for name in names if names.count(name) > 1})
        raise ValueError(f"duplicate layer names in payload: {repeated}")
