"""The dtype policy: one rule for what a layer accepts, wherever values arrive.

Pulling a payload into a model, merging layers, the servers and the Flower adapters all
follow it:

* a value of the layer's own dtype is taken as it is;
* into a floating layer (bfloat16 to float64): booleans, integers and floating values of
  any width, rounded to the nearest value of the layer's dtype, as ``jnp.asarray`` and
  torch's ``load_state_dict`` do (float64 into float32 is accepted);
* into an integer layer: booleans and integers whose values all lie in the layer's range;
* into a complex layer: any real or complex value;
* a raw void array of the layer's item size (``|V2``: what Flower's serialization makes of
  bfloat16) is reinterpreted, bit for bit, as the layer's dtype;
* anything else changes kind with loss and is a ``TypeError`` naming the layer: a floating
  value into an integer layer, an integer out of the layer's range, a complex value into a
  real layer, a non-boolean into a boolean layer.

A server averaging a layer that clients sent in different dtypes averages it in their
promoted dtype (:func:`promoted_dtype`, JAX's type promotion: int64 with float64 is
float64, bfloat16 with float16 is float32) and returns it in the global model's dtype when
it knows one (the Flower strategies do), else in the promoted dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import jax.numpy as jnp
import numpy as np


def conform_dtype(name: str, value: Any, dtype: Any) -> Any:
    """``value`` checked against the dtype of layer ``name`` by the policy above.

    Returns ``value`` itself when the layer accepts its dtype (the cast, which rounds, is
    left to the caller), or a numpy view of it as ``dtype`` for a raw void array of the same
    item size.

    Raises:
      TypeError: the layer does not accept the value (naming ``name``, the dtypes and, for
        an integer out of range, the value).
    """
    dtype = np.dtype(dtype)
    if not hasattr(value, "dtype"):
        value = np.asarray(value)
    got = np.dtype(value.dtype)
    if got == dtype:
        return value
    got_kind, kind = dtype_kind(got), dtype_kind(dtype)
    if got_kind == "void" and got.itemsize == dtype.itemsize:
        return np.asarray(value).view(dtype)
    accepted = {
        "float": ("bool", "int", "float"),
        "complex": ("bool", "int", "float", "complex"),
        "int": ("bool", "int"),
    }.get(kind, ())
    if got_kind not in accepted:
        raise TypeError(f"layer {name!r}: a {dtype} layer does not accept {got} values ({_lossy(got_kind, kind)})")
    if kind == "int" and got_kind == "int":
        _check_range(name, value, dtype)
    return value


def promoted_dtype(dtypes: Iterable[Any]) -> np.dtype:
    """The dtype several clients' values of one layer are averaged in (JAX's promotion)."""
    return _promoted(frozenset(np.dtype(d) for d in dtypes))


@functools.lru_cache(maxsize=128)
def _promoted(dtypes: frozenset[np.dtype]) -> np.dtype:
    return np.dtype(functools.reduce(jnp.promote_types, sorted(dtypes, key=str)))


@functools.lru_cache(maxsize=128)
def dtype_kind(dtype: np.dtype) -> str:
    """``bool``, ``int``, ``float`` (bfloat16 included), ``complex``, ``void`` (raw bytes) or ``other``."""
    if dtype.type is np.void:
        return "void"
    if dtype == np.bool_:
        return "bool"
    for kind, family in (("int", jnp.integer), ("float", jnp.floating), ("complex", jnp.complexfloating)):
        if jnp.issubdtype(dtype, family):
            return kind
    return "other"


def _check_range(name: str, value: Any, dtype: np.dtype) -> None:
    array = np.asarray(value)
    if array.size == 0:
        return
    info = np.iinfo(dtype)
    low, high = array.min(), array.max()
    if low < info.min or high > info.max:
        bad = low if low < info.min else high
        raise TypeError(
            f"layer {name!r}: the value {int(bad)} is out of the range of its dtype {dtype} [{info.min}, {info.max}]"
        )


def _lossy(got_kind: str, kind: str) -> str:
    if kind == "int" and got_kind in ("float", "complex"):
        return f"{got_kind} into an integer layer loses the fraction"
    if got_kind == "complex":
        return "complex into a real layer loses the imaginary part"
    if kind == "bool":
        return "a boolean layer takes only booleans"
    return "not a numeric value the layer can hold"
