"""Checking what arrives against the model it claims to update: written once, used by
every codec, both Flower routes and the exchangers' pulls.

A *layout* is the model seen by the receiver: an ordered ``name -> array`` (or anything
with ``shape`` and ``dtype``), the global model on a server, the client's model on a
client. A payload is checked whole against it before any of it is used: every name known,
every shape exact, every value dtype accepted by the layer (:mod:`jaxlayerx.dtypes`),
every value finite unless allowed, and quantized values well formed.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxlayerx.dtypes import conform_dtype, dtype_kind
from jaxlayerx.errors import unknown_layer

if TYPE_CHECKING:
    from jaxlayerx.payload import Entries, Payload


def check_shape(name: str, got: tuple[int, ...], expected: tuple[int, ...]) -> None:
    """Raises ``ValueError`` naming the layer when the shapes differ."""
    if tuple(got) != tuple(expected):
        raise ValueError(f"layer {name!r}: expected shape {tuple(expected)}, got {tuple(got)}")


def checked_values(name: str, values: Any, dtype: Any, *, allow_nonfinite: bool = True) -> np.ndarray:
    """``values`` as numpy, checked against a layer of ``dtype`` (the dtype policy; ``|V2``
    reinterpreted) and, unless ``allow_nonfinite``, finite. Not cast: they keep the dtype
    they came in, so the caller casts once where they are used.

    Raises:
      TypeError: the layer does not accept the dtype. ValueError: a NaN or an infinity, or a
        finite value beyond the range of the (floating) layer's dtype.
    """
    values = np.asarray(conform_dtype(name, values, dtype))
    if not allow_nonfinite:
        check_finite(name, values)
        check_fits(name, values, dtype)
    return values


def check_fits(name: str, values: np.ndarray, dtype: Any) -> None:
    """Raises ``ValueError`` naming the layer, the value and its flat position when a finite
    value of ``values`` overflows a floating layer of ``dtype`` (float64 1e300 into float32).

    Only a narrowing cast can overflow, and rounding is monotonic: the largest and the
    smallest value decide, with no copy of ``values``.
    """
    dtype = np.dtype(dtype)
    if values.dtype == dtype or dtype_kind(dtype) != "float" or values.size == 0 or values.dtype.kind == "b":
        return
    if _largest(values.dtype) <= _largest(dtype):
        return
    with np.errstate(over="ignore"):
        extremes = np.array([values.min(), values.max()], values.dtype).astype(dtype)
    if np.isfinite(extremes).all():
        return
    with np.errstate(over="ignore"):
        position = int(np.flatnonzero(~np.isfinite(values.reshape(-1).astype(dtype)))[0])
    value = values.reshape(-1)[position]
    raise ValueError(f"layer {name!r}: the value {value} at flat index {position} overflows its dtype {dtype}")


def _largest(dtype: np.dtype) -> float:
    """The largest finite value of a numeric ``dtype`` (JAX's float types included)."""
    return float(np.iinfo(dtype).max) if dtype.kind in "iu" else float(cast(Any, ml_dtypes.finfo(dtype)).max)


def check_finite(name: str, values: np.ndarray) -> None:
    """Raises ``ValueError`` naming the layer, the value and its flat position when a
    floating ``values`` holds NaN or infinity."""
    if dtype_kind(values.dtype) == "float" and not np.isfinite(values).all():
        position = int(np.flatnonzero(~np.isfinite(values.reshape(-1)))[0])
        value = float(values.reshape(-1)[position])
        raise ValueError(f"layer {name!r} holds a non-finite value ({value} at flat index {position})")


def check_entries(name: str, entries: Entries, like: Any, *, allow_nonfinite: bool = True) -> Entries:
    """``entries`` of layer ``name`` checked against the model's layer ``like``.

    The shape must be the layer's; indices (the codecs check their order and range) must
    fit it; plain values must be of a dtype the layer accepts; quantized values must be
    bfloat16, or int8 with a finite scale >= 0.

    Raises:
      ValueError, TypeError: as the module docstring says, naming the layer.
    """
    check_shape(name, entries.shape, tuple(np.shape(like)))
    if entries.indices is not None and entries.indices.size and int(entries.indices[-1]) >= entries.size:
        raise ValueError(f"layer {name!r}: index {int(entries.indices[-1])} is out of bounds for shape {entries.shape}")
    if entries.quantized is None:
        return entries._replace(
            values=checked_values(name, entries.values, like.dtype, allow_nonfinite=allow_nonfinite)
        )
    expected = {"bf16": "bfloat16", "int8": "int8"}[entries.quantized]
    if entries.quantized == "bf16" and entries.values.dtype.kind == "V" and entries.values.dtype.itemsize == 2:
        entries = entries._replace(values=entries.values.view(jnp.bfloat16))  # Flower's serialization of bfloat16
    if np.dtype(entries.values.dtype).name != expected:
        raise TypeError(f"layer {name!r}: {entries.quantized} values must be {expected}, got {entries.values.dtype}")
    if dtype_kind(np.dtype(like.dtype)) != "float":
        raise TypeError(f"layer {name!r}: a {np.dtype(like.dtype)} layer takes no quantized update")
    if entries.quantized == "bf16" and not allow_nonfinite:
        check_finite(name, entries.values)
    scale = np.float32(entries.scale)
    if not (np.isfinite(scale) and scale >= 0):
        raise ValueError(f"layer {name!r}: the int8 scale must be finite and >= 0, got {float(scale)}")
    return entries


def check_payload(payload: Payload, layout: Mapping[str, Any], *, allow_nonfinite: bool = True) -> Payload:
    """Every layer of ``payload`` checked against ``layout`` (:func:`check_entries`),
    all of it before returning.

    Raises:
      KeyError: a name the layout does not have (with the closest valid names).
      ValueError, TypeError: as :func:`check_entries`.
    """
    checked: Payload = collections.OrderedDict()
    for name, entries in payload.items():
        if name not in layout:
            raise unknown_layer(name, layout)
        checked[name] = check_entries(name, entries, layout[name], allow_nonfinite=allow_nonfinite)
    return checked
