"""Quantized uploads: each sent layer's update in bfloat16, or in int8 with one scale.

What is quantized is the *update* of a layer, ``u = current - base``, where ``base`` is the
layer as the server holds it for this client (what the client last pulled): both sides
know it, so the server rebuilds the value as ``base + dequantize(q)`` and the error is that
of the update alone, not of the weight. With error feedback, what quantization lost,
``u - dequantize(q)``, is carried into the client's next update (EF-SGD, Karimireddy et
al. 2019), so that nothing is lost for good.

* ``"bf16"``: ``q = bfloat16(u)``, round to nearest even; 2 bytes a value;
* ``"int8"``: ``scale = max|u| * float32(1 / 127)`` over the sent entries of the layer
  (a multiplication by that float32 constant, exact alike on every backend, so within an
  ulp of ``max|u| / 127``), ``q = round(u * (1 / scale))`` (ties to even) in
  ``[-127, 127]``; 1 byte a value and a float32 scale per layer. A layer whose largest
  update is 0, or whose scale has no finite inverse, sends zeros.

Only floating layers are quantized; integer and boolean layers (a step counter) travel as
they are.

The functions are pure and run inside ``jax.jit`` and ``jax.vmap``; the host paths (the
Flower clients and servers) call the same functions jitted, so a simulated federation and
a deployed one quantize and rebuild bit for bit alike. Downloads are never quantized.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal, cast, get_args

import jax
import jax.numpy as jnp
import numpy as np

#: How uploads are quantized: ``"bf16"`` or ``"int8"`` (``None``: values as they are).
Quantize = Literal["bf16", "int8"]
QUANTIZE_MODES: tuple[str, ...] = get_args(Quantize)

#: The largest int8 level used (symmetric: -127..127).
INT8_LEVELS = 127
_INV_LEVELS = np.float32(1.0 / INT8_LEVELS)


def check_quantize(quantize: Any) -> Quantize | None:
    """``quantize`` checked: ``None``, ``"bf16"`` or ``"int8"``.

    Raises:
      ValueError: anything else (naming the accepted values).
    """
    if quantize is None:
        return None
    if not isinstance(quantize, str) or quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be None, 'bf16' or 'int8', got {quantize!r}")
    return cast(Quantize, quantize)


def quantizable(dtype: Any) -> bool:
    """Whether a layer of ``dtype`` is quantized (floating layers only)."""
    return bool(jnp.issubdtype(np.dtype(dtype), jnp.floating))


def layer_quantize(quantize: Quantize | None, dtype: Any) -> Quantize | None:
    """How a layer of ``dtype`` is quantized: ``quantize`` for a floating layer, else ``None``."""
    return quantize if quantize is not None and quantizable(dtype) else None


def wire_dtype(quantize: Quantize | None, dtype: Any) -> np.dtype:
    """The dtype a layer of ``dtype`` travels in: its own, bfloat16 or int8."""
    quantize = layer_quantize(quantize, dtype)
    if quantize == "bf16":
        return np.dtype(jnp.bfloat16)
    if quantize == "int8":
        return np.dtype(np.int8)
    return np.dtype(dtype)


def quantize_update(update: Any, mask: Any, quantize: Quantize) -> tuple[jax.Array, jax.Array]:
    """``(q, scale)`` of a layer's float32 ``update`` over the entries ``mask`` marks.

    ``mask`` is a boolean scalar (the whole layer) or of the layer's shape; entries it does
    not mark quantize to 0 and do not enter the scale. ``q`` has the update's shape, in
    bfloat16 or int8; ``scale`` is a float32 scalar (1 for bfloat16). Pure and jit/vmap-able.
    """
    update = jnp.asarray(update, jnp.float32)
    kept = jnp.broadcast_to(jnp.asarray(mask, bool), update.shape)
    update = jnp.where(kept, update, 0.0)
    if quantize == "bf16":
        return update.astype(jnp.bfloat16), jnp.float32(1)
    scale = jnp.max(jnp.abs(update), initial=0.0) * _INV_LEVELS
    inverse = jnp.float32(1) / scale
    inverse = jnp.where(jnp.isfinite(inverse), inverse, 0.0)
    levels = jnp.clip(jnp.round(update * inverse), -INT8_LEVELS, INT8_LEVELS)
    return levels.astype(jnp.int8), scale.astype(jnp.float32)


def dequantize(q: Any, scale: Any) -> jax.Array:
    """The float32 update that ``q`` (bfloat16, or int8 with ``scale``) stands for; pure."""
    q = jnp.asarray(q)
    if q.dtype == jnp.int8:
        return q.astype(jnp.float32) * jnp.asarray(scale, jnp.float32)
    return q.astype(jnp.float32)


def rebuild(base: Any, q: Any, scale: Any) -> jax.Array:
    """``base + dequantize(q, scale)`` in float32, then in ``base``'s dtype; pure."""
    base = jnp.asarray(base)
    return (base.astype(jnp.float32) + dequantize(q, scale)).astype(base.dtype)


def quantized_push(
    current: Any, base: Any, residual: Any, mask: Any, quantize: Quantize
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One layer's quantized upload: ``(q, scale, rebuilt, residual)``; pure and jit/vmap-able.

    The update is ``current - base + residual`` (``residual`` 0 without error feedback);
    ``rebuilt`` is what the server will hold for the sent entries, ``base + dequantize(q)``
    in the layer's dtype; the new residual is what quantization lost of the sent entries'
    update, and the old residual elsewhere.
    """
    update = jnp.asarray(current).astype(jnp.float32) - jnp.asarray(base).astype(jnp.float32)
    update = update + jnp.asarray(residual, jnp.float32)
    q, scale = quantize_update(update, mask, quantize)
    restored = dequantize(q, scale)
    kept = jnp.broadcast_to(jnp.asarray(mask, bool), update.shape)
    new_residual = jnp.where(kept, update - restored, jnp.asarray(residual, jnp.float32))
    return q, scale, rebuild(base, q, scale), new_residual


def drift_reference(reference: Any, residual: Any) -> jax.Array:
    """What error feedback measures drift from when quantizing: ``reference - residual``
    (in float32, then in the reference's dtype), so that a sent entry's lost quantization
    error counts as drift still to send; pure."""
    reference = jnp.asarray(reference)
    return (reference.astype(jnp.float32) - jnp.asarray(residual, jnp.float32)).astype(reference.dtype)


@functools.partial(jax.jit, static_argnames="quantize")  # pyright: ignore[reportUnknownMemberType]
def host_quantized_push(
    current: dict[str, Any], base: dict[str, Any], residual: dict[str, Any], mask: dict[str, Any], quantize: Quantize
) -> dict[str, tuple[jax.Array, jax.Array, jax.Array, jax.Array]]:
    """:func:`quantized_push` of several layers at once, compiled: what the host paths call."""
    return {name: quantized_push(current[name], base[name], residual[name], mask[name], quantize) for name in current}


@jax.jit  # pyright: ignore[reportUnknownMemberType]
def host_drift_reference(reference: dict[str, Any], residual: dict[str, Any]) -> dict[str, jax.Array]:
    """:func:`drift_reference` of several layers at once, compiled: what the host paths call."""
    return {name: drift_reference(reference[name], residual[name]) for name in reference}


host_rebuild: Callable[[Any, Any, Any], jax.Array] = jax.jit(rebuild)  # pyright: ignore[reportUnknownMemberType]
