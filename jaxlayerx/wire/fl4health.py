"""fl4health's payload layouts as codecs: positional, named, and sparse COO.

These are the layouts of fl4health's packers, kept exactly so that payloads travel both
ways between jaxlayerx and fl4health peers on the legacy Flower route (Flower's
``Parameters``, a list of ``numpy.save`` blobs):

* positional: the layers alone, in an order both sides know (fl4health's full and fixed
  exchangers, and the whole model a server first sends);
* named: ``layers + [names]`` (``ParameterPackerWithLayerNames``; :func:`jaxlayerx.pack_layers`);
* COO: ``values + indices + shapes + [names]`` with int64 row-major coordinates
  (``SparseCooParameterPacker``; :func:`jaxlayerx.pack_coo`).

Each codec encodes a :data:`jaxlayerx.payload.Payload`, decodes one checked whole against the
receiving model, and counts its bytes from counts, shapes and dtypes alone.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxlayerx.base import NDArrays
from jaxlayerx.coo import read_coo, unravel
from jaxlayerx.packing import pack_layers, unpack_layers
from jaxlayerx.payload import Entries, Payload, dense_entries
from jaxlayerx.validation import check_payload
from jaxlayerx.wire.compact import LayerCount
from jaxlayerx.wire.npy import npy_nbytes


def encode_positional(payload: Payload) -> NDArrays:
    """The whole layers of ``payload``, in its order, without names."""
    return [_whole_layer(name, entries) for name, entries in payload.items()]


def decode_positional(
    arrays: Sequence[Any], names: Sequence[str], layout: Mapping[str, Any], *, allow_nonfinite: bool = True
) -> Payload:
    """The layers ``names`` (one array each, in that order) checked against ``layout``.

    Raises:
      ValueError: not one array per name; and as :func:`jaxlayerx.validation.check_payload`.
    """
    arrays = list(arrays)
    if len(arrays) != len(names):
        raise ValueError(f"expected {len(names)} arrays (one per layer, in order), got {len(arrays)}")
    payload = collections.OrderedDict((name, dense_entries(array)) for name, array in zip(names, arrays))
    return check_payload(payload, layout, allow_nonfinite=allow_nonfinite)


def positional_nbytes(layers: Iterable[LayerCount]) -> int:
    """Bytes of a positional payload of the whole ``layers``."""
    return sum(npy_nbytes(layer.dtype, layer.shape) for layer in layers)


def encode_named(payload: Payload) -> NDArrays:
    """The whole layers of ``payload`` packed with their names."""
    return pack_layers([_whole_layer(name, entries) for name, entries in payload.items()], list(payload))


def decode_named(arrays: Sequence[Any], layout: Mapping[str, Any], *, allow_nonfinite: bool = True) -> Payload:
    """A named payload's layers, checked whole against ``layout``.

    Raises:
      ValueError, KeyError, TypeError: the layout of :func:`jaxlayerx.unpack_layers`, then
      as :func:`jaxlayerx.validation.check_payload`.
    """
    weights, names = unpack_layers(list(arrays))
    payload = collections.OrderedDict((name, dense_entries(weight)) for name, weight in zip(names, weights))
    return check_payload(payload, layout, allow_nonfinite=allow_nonfinite)


def named_nbytes(layers: Iterable[LayerCount]) -> int:
    """Bytes of a named payload of the whole ``layers``: the layers and the names array."""
    layers = list(layers)
    return positional_nbytes(layers) + names_nbytes(layer.name for layer in layers)


def encode_coo(payload: Payload) -> NDArrays:
    """The entries of ``payload`` as a COO payload (a dense layer as all of its entries)."""
    values = [np.asarray(entries.values) for entries in payload.values()]
    indices = [unravel(entries.flat_indices(), entries.shape) for entries in payload.values()]
    shapes = [np.asarray(entries.shape, np.int64) for entries in payload.values()]
    names = np.array(list(payload), dtype=np.str_)
    return [*values, *indices, *shapes, names]


def decode_coo(arrays: Sequence[Any], layout: Mapping[str, Any], *, allow_nonfinite: bool = True) -> Payload:
    """A COO payload's entries, checked whole against ``layout``.

    Raises:
      ValueError, KeyError, TypeError: the layout checks of :func:`jaxlayerx.read_coo`
      (counts, names, bounds, repeats), then as :func:`jaxlayerx.validation.check_payload`.
    """
    payload: Payload = collections.OrderedDict()
    for name, layer in read_coo(list(arrays)).items():
        order = np.argsort(layer.flat_indices, kind="stable")
        sorted_flat = layer.flat_indices[order]
        if sorted_flat.size == math.prod(layer.shape):
            payload[name] = Entries(np.asarray(layer.values)[order], None, layer.shape)
        else:
            payload[name] = Entries(np.asarray(layer.values)[order], sorted_flat, layer.shape)
    return check_payload(payload, layout, allow_nonfinite=allow_nonfinite)


def coo_nbytes(layers: Iterable[LayerCount]) -> int:
    """Bytes of the COO payload holding ``count`` entries of each of ``layers``."""
    layers = list(layers)
    total = names_nbytes(layer.name for layer in layers)
    for layer in layers:
        ndim = len(layer.shape)
        total += npy_nbytes(layer.dtype, (layer.entries,))
        total += npy_nbytes(np.int64, (layer.entries, ndim)) + npy_nbytes(np.int64, (ndim,))
    return total


def names_nbytes(names: Iterable[str]) -> int:
    """Bytes of the Unicode names array that ends a named or COO payload."""
    names = list(names)
    array = np.array(names, dtype=np.str_)
    return npy_nbytes(array.dtype, array.shape)


def _whole_layer(name: str, entries: Entries) -> np.ndarray:
    if entries.quantized is not None:
        raise ValueError(
            f"layer {name!r}: fl4health's layouts carry plain values; quantized updates need the compact wire"
        )
    if not entries.dense:
        raise ValueError(
            f"layer {name!r}: positional and named payloads carry whole layers, got {entries.sent} entries"
        )
    return entries.layer()
