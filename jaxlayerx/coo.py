"""The sparse wire format: kept weights in COO form, as Flower-style ``NDArrays``.

For ``k`` sent layers, a payload is ``3k + 1`` arrays::

    values (k arrays) + indices (k) + shapes (k) + [names]

* ``values[i]``: 1-D, the sent weights of layer ``i``, in the layer's dtype;
* ``indices[i]``: ``(n_i, ndim_i)`` integers, the row-major coordinates of those weights;
* ``shapes[i]``: ``(ndim_i,)`` integers, the layer's shape;
* ``names``: 1-D Unicode array of the ``k`` layer names.

This is the layout of fl4health's ``SparseCooParameterPacker``, so payloads travel both ways.
jaxlayerx writes int64 indices and shapes (what ``torch.nonzero`` gives); it reads any
integer dtype. Nothing is an ``object`` array: payloads survive
``numpy.save(..., allow_pickle=False)``, Flower's serialization.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from flax import nnx

from jaxlayerx._host import to_numpy
from jaxlayerx.base import Model, NDArrays
from jaxlayerx.merge import merge_payload
from jaxlayerx.packing import read_names
from jaxlayerx.payload import Entries
from jaxlayerx.tree import DEFAULT_NNX_FILTER


class SparseLayer(NamedTuple):
    """The sent weights of one layer: ``values`` at row-major ``flat_indices`` of ``shape``."""

    values: np.ndarray
    flat_indices: np.ndarray
    shape: tuple[int, ...]


def pack_coo(values: Sequence[Any], indices: Sequence[Any], shapes: Sequence[Any], names: Sequence[str]) -> NDArrays:
    """Packs COO layers as ``values + indices + shapes + [names]``.

    Raises:
      ValueError: the four lists differ in length, or a name repeats.
      TypeError: a name is not a string.
    """
    names = list(names)
    if not len(values) == len(indices) == len(shapes) == len(names):
        raise ValueError(
            f"COO parts differ in length: {len(values)} values, {len(indices)} indices, "
            f"{len(shapes)} shapes, {len(names)} names"
        )
    read_names(np.array(names, dtype=np.str_), len(names))
    return to_numpy(values) + to_numpy(indices) + to_numpy(shapes) + [np.array(names, dtype=np.str_)]


def unpack_coo(payload: Sequence[Any]) -> tuple[NDArrays, tuple[NDArrays, NDArrays, list[str]]]:
    """Splits a COO payload into ``(values, (indices, shapes, names))``, all of it checked.

    Checks everything that does not need the model (see :func:`read_coo`); the arrays come
    back as given.
    """
    read_coo(payload)
    k = (len(payload) - 1) // 3
    arrays = [np.asarray(array) for array in payload[:-1]]
    names = [str(name) for name in np.asarray(payload[-1]).tolist()]
    return arrays[:k], (arrays[k : 2 * k], arrays[2 * k :], names)


def read_coo(payload: Sequence[Any]) -> collections.OrderedDict[str, SparseLayer]:
    """The layers of a COO payload, in payload order, after checking all of it.

    Raises:
      TypeError: the payload is not a list; indices or a shape are not integers.
      ValueError: not ``3k + 1`` arrays; a bad names array (see :func:`jaxlayerx.unpack_layers`);
        values that are not 1-D; indices that are not ``(len(values), ndim)``; a shape with a
        negative entry; an index out of bounds; the same entry twice. Messages name the layer.
    """
    if not isinstance(payload, (list, tuple)):
        raise TypeError(f"a payload is a list of numpy arrays, got {type(payload).__name__}")
    if len(payload) % 3 != 1:
        raise ValueError(
            "a sparse COO payload holds 3k + 1 arrays (k values, k indices, k shapes, then the "
            f"names); got {len(payload)}"
        )
    k = (len(payload) - 1) // 3
    names = read_names(payload[-1], k)
    layers: collections.OrderedDict[str, SparseLayer] = collections.OrderedDict()
    for i, name in enumerate(names):
        layers[name] = _read_layer(name, payload[i], payload[k + i], payload[2 * k + i])
    return layers


def write_coo(layers: Mapping[str, SparseLayer]) -> NDArrays:
    """Packs ``name -> SparseLayer`` as a COO payload, with int64 indices and shapes."""
    return pack_coo(
        [layer.values for layer in layers.values()],
        [unravel(layer.flat_indices, layer.shape) for layer in layers.values()],
        [np.asarray(layer.shape, np.int64) for layer in layers.values()],
        list(layers),
    )


def unravel(flat: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Row-major flat indices as ``(n, ndim)`` int64 coordinates (``numpy.nonzero`` order)."""
    coordinates = np.empty((flat.size, len(shape)), np.int64)
    remaining = flat.astype(np.int64, copy=False)
    for axis in range(len(shape) - 1, 0, -1):
        remaining, coordinates[:, axis] = np.divmod(remaining, shape[axis])
    if shape:
        coordinates[:, 0] = remaining
    return coordinates


def _read_layer(name: str, values: Any, indices: Any, shape: Any) -> SparseLayer:
    values, indices, shape = np.asarray(values), np.asarray(indices), np.asarray(shape)
    if shape.ndim == 1 and shape.size == 0:
        shape = shape.astype(np.int64)  # a 0-d layer's shape, np.array(()) of any dtype
    if indices.ndim == 2 and indices.size == 0:
        indices = indices.astype(np.int64)  # no coordinates (0-d, or nothing kept), of any dtype
    if values.ndim != 1:
        raise ValueError(f"layer {name!r}: values must be 1-D, got shape {values.shape}")
    if not _is_integer_array(shape) or shape.ndim != 1:
        raise TypeError(
            f"layer {name!r}: the shape must be a 1-D integer array, got dtype {shape.dtype} and shape {shape.shape}"
        )
    if (shape < 0).any():
        raise ValueError(f"layer {name!r}: negative entry in shape {shape.tolist()}")
    dims = tuple(int(d) for d in shape)
    if math.prod(dims) >= 2**63:
        raise ValueError(f"layer {name!r}: shape {dims} has more entries than an int64 flat index can address")
    if not _is_integer_array(indices):
        raise TypeError(f"layer {name!r}: indices must be integers, got dtype {indices.dtype}")
    if indices.shape != (values.size, len(dims)):
        raise ValueError(
            f"layer {name!r}: expected indices of shape {(values.size, len(dims))} "
            f"({values.size} values, {len(dims)}-d shape {dims}), got {indices.shape}"
        )
    coordinates = indices.astype(np.int64, copy=False)
    _check_bounds(name, indices, coordinates, dims)
    flat = _ravel(coordinates, dims)
    _check_distinct(name, flat, math.prod(dims))
    return SparseLayer(values, flat, dims)


def _is_integer_array(array: np.ndarray) -> bool:
    return array.dtype.kind in "iu"


def _ravel(indices: np.ndarray, dims: tuple[int, ...]) -> np.ndarray:
    """Row-major flat indices of in-bounds ``(n, ndim)`` coordinates, as int64."""
    flat = np.zeros(indices.shape[0], np.int64)
    for axis, size in enumerate(dims):
        flat *= size
        flat += indices[:, axis]
    return flat


def _check_bounds(name: str, indices: np.ndarray, coordinates: np.ndarray, dims: tuple[int, ...]) -> None:
    """Every coordinate in ``[0, dim)``: one maximum per column of the unsigned view, in
    which negative coordinates (and uint64 ones beyond int64, which wrap negative) are huge."""
    unsigned = coordinates.view(np.uint64)
    for axis, size in enumerate(dims):
        if unsigned.shape[0] and unsigned[:, axis].max() >= size:
            bad = int(np.flatnonzero(unsigned[:, axis] >= size)[0])
            raise ValueError(f"layer {name!r}: index {indices[bad].tolist()} is out of bounds for shape {dims}")


def _check_distinct(name: str, flat: np.ndarray, size: int) -> None:
    """No flat index twice. Row-major sorted indices (what ``numpy.nonzero`` and
    ``torch.nonzero`` give) pass in one comparison; others take a bitmap of the layer when
    it is not much larger than the indices (linear time), else a sort (a payload may claim
    any shape)."""
    if (flat[1:] > flat[:-1]).all():
        return
    if size <= 16 * flat.size + 4096:
        seen = np.zeros(size, bool)
        seen[flat] = True
        if np.count_nonzero(seen) == flat.size:
            return
    order = np.sort(flat)
    repeats = np.flatnonzero(order[1:] == order[:-1])
    if repeats.size:
        raise ValueError(
            f"layer {name!r}: entry {int(order[repeats[0]])} (row-major) appears more than once in the indices"
        )


def merge_sparse_layers(
    model: Model, layers: Mapping[str, SparseLayer], *, nnx_filter: nnx.filterlib.Filter = DEFAULT_NNX_FILTER
) -> Model:
    """Returns ``model`` with exactly the given entries of the named layers replaced.

    Every other weight keeps its value. Names, shapes and value dtypes (the rules of
    :func:`jaxlayerx.conform_layer`) are all checked before anything changes. A pytree is
    never mutated; an ``nnx.Module`` is updated in place (see :func:`jaxlayerx.merge_layers`).

    Raises:
      KeyError: a name is not a layer of ``model``. ValueError: a layer's shape differs.
      TypeError: values that cannot be cast to the layer's dtype without loss.
    """
    payload = collections.OrderedDict(
        (name, Entries(np.asarray(layer.values), np.asarray(layer.flat_indices, np.int64), tuple(layer.shape)))
        for name, layer in layers.items()
    )
    return merge_payload(model, payload, nnx_filter=nnx_filter)
