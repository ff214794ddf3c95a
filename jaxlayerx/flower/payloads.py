"""Checking a received payload against the layers it claims to update."""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxlayerx.dtypes import conform_dtype, dtype_kind
from jaxlayerx.errors import unknown_layer
from jaxlayerx.packing import is_packed, unpack_layers


def checked_payload(
    payload: Sequence[np.ndarray], reference: Mapping[str, Any], *, allow_nonfinite: bool = True
) -> collections.OrderedDict[str, np.ndarray]:
    """Validates a packed payload against ``reference`` layers, all of it before returning.

    Every array is checked: a known name, the exact shape, a dtype the layer accepts (the
    policy of :mod:`jaxlayerx.dtypes`; a raw ``|V2`` array, what Flower's serialization
    makes of bfloat16, is reinterpreted as the reference's 2-byte dtype) and, unless
    ``allow_nonfinite``, finite values. Nothing is cast: the values come back in the dtypes
    they were sent in (cast once, where they are used), so a caller applies all of the
    payload or nothing.

    Args:
      payload: layers followed by their names array (:func:`jaxlayerx.pack_layers`).
      reference: ``name -> array`` (numpy or JAX) giving each layer's shape and dtype.
      allow_nonfinite: accept NaN and infinite values.

    Returns:
      ``name -> numpy array`` in the payload's order.

    Raises:
      ValueError: malformed layout, repeated names, a shape mismatch, a non-finite value.
      KeyError: a name that ``reference`` does not have (with the closest valid names).
      TypeError: a dtype the layer does not accept.
    """
    weights, names = unpack_layers(list(payload))
    checked: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
    for name, weight in zip(names, weights):
        if name not in reference:
            raise unknown_layer(name, reference)
        like = reference[name]
        if tuple(np.shape(weight)) != tuple(np.shape(like)):
            raise ValueError(f"layer {name!r}: expected shape {tuple(np.shape(like))}, got {tuple(np.shape(weight))}")
        value = np.asarray(conform_dtype(name, weight, like.dtype))
        if not allow_nonfinite and dtype_kind(value.dtype) == "float" and not np.isfinite(value).all():
            raise ValueError(f"layer {name!r} holds a non-finite value (NaN or infinity)")
        checked[name] = value
    return checked


def named_payload(payload: Sequence[np.ndarray], layer_names: Sequence[str]) -> list[np.ndarray]:
    """``payload`` packed with names: as is when already packed, else positional over ``layer_names``.

    Raises:
      ValueError: an unnamed payload whose length is not one array per name.
    """
    payload = list(payload)
    if is_packed(payload):
        return payload
    if len(payload) != len(layer_names):
        last = (
            f"an array of dtype {np.asarray(payload[-1]).dtype} and shape {np.shape(payload[-1])}"
            if payload
            else "nothing"
        )
        raise ValueError(
            f"an unnamed payload must hold one array per expected layer ({len(layer_names)}), got "
            f"{len(payload)} arrays; a named payload must end with a 1-D Unicode names array, "
            f"this one ends with {last}"
        )
    return payload + [np.array(list(layer_names), dtype=np.str_)]
