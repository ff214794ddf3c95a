"""Exact sizes of arrays as Flower carries them: one ``.npy`` blob each.

Flower serializes every array with ``numpy.save`` (``Array.from_numpy_ndarray`` on the
Message API, ``ndarray_to_bytes`` on the legacy route): a header of a multiple of 64 bytes
that names the dtype and the shape, then the data. An ``ArrayRecord`` counts each entry's
blob plus the length of its key (``ArrayRecord.count_bytes``, what ``arrays_size_mod``
logs); a legacy ``Parameters`` is the list of blobs alone. These functions give those sizes
from dtypes and shapes, without serializing anything, and :func:`read_npy` reads a blob
that came over the wire without trusting its header.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from numpy.lib import format as npy_format

try:  # where numpy writes the header that numpy.save writes (growth padding included)
    from numpy.lib._format_impl import _write_array_header  # pyright: ignore
except ImportError:  # pragma: no cover - numpy < 2.1
    from numpy.lib.format import _write_array_header  # pyright: ignore  # noqa: F401


def npy_nbytes(dtype: Any, shape: tuple[int, ...]) -> int:
    """Bytes of ``numpy.save`` of an array of ``dtype`` and ``shape``: header and data."""
    dtype = np.dtype(dtype)
    return _header_nbytes(dtype, tuple(int(d) for d in shape)) + math.prod(shape) * dtype.itemsize


def array_nbytes(array: Any) -> int:
    """:func:`npy_nbytes` of ``array``."""
    array = np.asarray(array)
    return npy_nbytes(array.dtype, array.shape)


def record_nbytes(arrays: Mapping[str, Any]) -> int:
    """Bytes of ``arrays`` in a Flower ``ArrayRecord``: each blob plus its key."""
    return sum(array_nbytes(array) + len(key) for key, array in arrays.items())


def ndarrays_nbytes(arrays: Iterable[Any]) -> int:
    """Bytes of ``arrays`` in a legacy Flower ``Parameters``: the blobs alone."""
    return sum(array_nbytes(array) for array in arrays)


@functools.lru_cache(maxsize=4096)
def _header_nbytes(dtype: np.dtype, shape: tuple[int, ...]) -> int:
    stand_in = np.broadcast_to(np.zeros((), dtype), shape)  # the header, no data allocated
    header = npy_format.header_data_from_array_1_0(stand_in)
    buffer = io.BytesIO()
    _write_array_header(buffer, header, None)  # pyright: ignore[reportUnknownArgumentType]
    return len(buffer.getvalue())


def read_npy(data: bytes) -> np.ndarray:
    """One ``.npy`` blob (format 1.0 or 2.0) as an array, refused unless it holds exactly the
    bytes its header declares: ``numpy.load`` allocates the declared size before reading
    (gigabytes for a header of a hundred bytes).

    Raises:
      ValueError: not an npy blob, an object dtype, or a declared size that is not the size held.
    """
    stream = io.BytesIO(data)
    version = npy_format.read_magic(stream)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f"npy format {version}, expected (1, 0) or (2, 0)")
    read_header = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(stream)
    if dtype.hasobject:
        raise ValueError("object arrays cannot be loaded")
    count = math.prod(shape)
    held = len(data) - stream.tell()
    if count * dtype.itemsize != held:
        raise ValueError(
            f"its header declares shape {shape} of {dtype} ({count * dtype.itemsize} bytes), but it holds {held} bytes"
        )
    value = np.frombuffer(data, dtype, count, offset=stream.tell()).copy()
    return value.reshape(shape[::-1]).transpose() if fortran_order else value.reshape(shape)
