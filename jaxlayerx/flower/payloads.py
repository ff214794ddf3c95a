"""Checking a received payload against the layers it claims to update."""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxlayerx.errors import unknown_layer
from jaxlayerx.packing import is_packed, unpack_layers
from jaxlayerx.tree import conform_layer


def conform_payload(
    payload: Sequence[np.ndarray], reference: Mapping[str, Any]
) -> collections.OrderedDict[str, np.ndarray]:
    """Validates a packed payload against ``reference`` layers and converts it to their dtypes.

    Every array is checked (known name, exact shape, lossless dtype; a raw ``|V2`` array,
    what Flower's serialization makes of bfloat16, is reinterpreted as the reference's
    2-byte dtype) before anything is returned, so a caller applies all of it or nothing.

    Args:
      payload: layers followed by their names array (:func:`jaxlayerx.pack_layers`).
      reference: ``name -> array`` (numpy or JAX) giving each layer's shape and dtype.

    Returns:
      ``name -> numpy array`` in the payload's order, in the reference's dtypes.

    Raises:
      ValueError: malformed layout, repeated names, or a shape mismatch.
      KeyError: a name that ``reference`` does not have (with the closest valid names).
      TypeError: a dtype that does not convert to the reference's without loss.
    """
    weights, names = unpack_layers(list(payload))
    conformed = collections.OrderedDict()
    for name, weight in zip(names, weights):
        if name not in reference:
            raise unknown_layer(name, reference)
        conformed[name] = np.asarray(conform_layer(name, weight, np.asarray(reference[name])))
    return conformed


def named_payload(payload: Sequence[np.ndarray], layer_names: Sequence[str]) -> list[np.ndarray]:
    """``payload`` packed with names: as is when already packed, else positional over ``layer_names``.

    Raises:
      ValueError: an unnamed payload whose length is not one array per name.
    """
    payload = list(payload)
    if is_packed(payload):
        return payload
    if len(payload) != len(layer_names):
        last = f"an array of dtype {np.asarray(payload[-1]).dtype} and shape {np.shape(payload[-1])}" if payload else "nothing"
        raise ValueError(
            f"an unnamed payload must hold one array per expected layer ({len(layer_names)}), got "
            f"{len(payload)} arrays; a named payload must end with a 1-D Unicode names array, "
            f"this one ends with {last}"
        )
    return payload + [np.array(list(layer_names), dtype=np.str_)]
