"""Sparse selection: the top-scoring fraction of all the weights of a model.

Given per-weight scores (see :mod:`jaxlayerx.scores`) and a ``sparsity_level`` in ``(0, 1]``:

* ``k = ceil(total * sparsity_level)``, ``total`` the number of weights of the model, in
  Python floats as fl4health computes it;
* the global threshold is the ``k``-th largest score over the whole model;
* in each layer, the weights whose score is ``>=`` the threshold are kept. Scores tied with
  the threshold are all kept, so more than ``k`` weights may be kept (as in fl4health);
* a layer with nothing kept, or whose kept values are all zero, is not sent (as in
  fl4health, which cannot tell such a layer from an empty one).

NaN scores rank below every number and are never kept; ``-0.0`` and ``0.0`` are the same
score. Unlike fl4health, kept weights that are exactly zero are sent (a receiver writes
only the entries it gets, so a weight that moved to zero must travel), and 0-d layers
take part like any other.

The k-th largest score is found exactly, without a sort: a two-pass radix select over the
order-preserving ``uint32`` keys of the float32 scores (16 bits per pass, a histogram
each), as one jitted function of fixed shapes that also runs inside ``jax.jit`` and
``jax.vmap`` (:func:`score_threshold`, :func:`sparse_masks`). When the scores live in host
memory (the CPU backend), the packed path finds the same value with ``numpy.partition``,
which was measured faster there (``benchmarks/``, case ``sparse``).
"""

from __future__ import annotations

import collections
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from jaxlayerx._host import in_host_memory, to_numpy
from jaxlayerx.base import FlatView
from jaxlayerx.coo import unravel
from jaxlayerx.errors import check_same_layers

_HALF_BITS = 16
_BUCKETS = 1 << _HALF_BITS
_SIGN = np.uint32(0x80000000)
_INF_BITS = np.uint32(0x7F800000)


def validate_sparsity_level(sparsity_level: Any) -> None:
    """Raises ``TypeError`` unless a real number, ``ValueError`` unless in ``(0, 1]``."""
    if isinstance(sparsity_level, bool) or not isinstance(sparsity_level, numbers.Real):
        raise TypeError(f"sparsity_level must be a real number, got {sparsity_level!r}")
    if not 0 < cast(float, sparsity_level) <= 1:  # a real number (numbers.Real has no typed comparisons)
        raise ValueError(f"sparsity_level must be in (0, 1], got {sparsity_level}")


def num_weights_to_exchange(total: int, sparsity_level: float) -> int:
    """``ceil(total * sparsity_level)``, in Python floats as fl4health computes it."""
    return int(math.ceil(total * sparsity_level))


def score_threshold(scores: Mapping[str, jax.Array], sparsity_level: float) -> jax.Array:
    """The ``ceil(total * sparsity_level)``-th largest of all ``scores``, as float32.

    Pure and jit/vmap-able (``sparsity_level`` must be a Python number: ``k`` is computed
    from it exactly; :func:`score_threshold_at` takes ``k`` itself). NaN scores count as
    ``-inf``. Returns ``+inf`` when there are no scores at all.
    """
    validate_sparsity_level(sparsity_level)
    total = sum(math.prod(np.shape(score)) for score in scores.values())
    return score_threshold_at(scores, num_weights_to_exchange(total, sparsity_level))


def score_threshold_at(scores: Mapping[str, jax.Array], k: int | jax.Array) -> jax.Array:
    """The ``k``-th largest of all ``scores`` (``1 <= k <= total``), as float32; ``k`` may be
    traced: one compiled program serves every ``k``. ``+inf`` when there are no scores."""
    keys = [_sortable_key(score).reshape(-1) for score in scores.values()]
    if sum(key.size for key in keys) == 0:
        return jnp.asarray(jnp.inf, jnp.float32)
    high = [key >> _HALF_BITS for key in keys]
    top, above = _select_bucket(_histogram(high), k)
    low = [jnp.where(h == top, key & (_BUCKETS - 1), _BUCKETS) for h, key in zip(high, keys)]
    bottom, _ = _select_bucket(_histogram(low), k - above)
    return _float_of_key((top << _HALF_BITS) | bottom)


def sparse_masks(
    scores: Mapping[str, jax.Array],
    layers: Mapping[str, jax.Array],
    sparsity_level: float,
) -> collections.OrderedDict[str, jax.Array]:
    """Per-weight booleans: what a client sends at ``sparsity_level``; pure and jit/vmap-able.

    Args:
      scores: ``name -> score array`` of each layer's shape.
      layers: the values the scores belong to (a layer whose kept values are all zero is
        not sent).
      sparsity_level: the fraction of all weights to keep, in ``(0, 1]``.

    Returns:
      An ordered dict ``name -> bool array of the layer's shape``, in the order of ``scores``.
    """
    return masks_at_threshold(scores, layers, score_threshold(scores, sparsity_level))


def weights_to_keep(layers: Mapping[str, Any], sparsity_level: float) -> np.ndarray:
    """``k = ceil(total * sparsity_level)`` for layers of these shapes (int32): the form in
    which :func:`score_threshold_at` takes the sparsity level."""
    validate_sparsity_level(sparsity_level)
    total = sum(math.prod(np.shape(layer)) for layer in layers.values())
    return np.asarray(num_weights_to_exchange(total, sparsity_level), np.int32)


def masks_at_threshold(
    scores: Mapping[str, jax.Array], layers: Mapping[str, jax.Array], threshold: jax.Array
) -> collections.OrderedDict[str, jax.Array]:
    """Per-weight booleans ``score >= threshold``, cleared in layers whose kept values are all zero."""
    # Compared as sortable keys, bit for bit: XLA flushes subnormal floats to zero in
    # arithmetic and comparisons, and that must not merge distinct scores.
    threshold_key = _sortable_key(threshold)
    masks = FlatView()
    for name, score in scores.items():
        kept = (_sortable_key(score) >= threshold_key) & ~_is_nan(score)
        masks[name] = kept & jnp.any(kept & _nonzero(layers[name]))
    return masks


def select_sparse_coo(
    score_gen_function: Callable[[Any, Any], Mapping[str, Any]],
    sparsity_level: float,
    current: Mapping[str, jax.Array],
    initial: Mapping[str, jax.Array] | None,
) -> tuple[list[np.ndarray], tuple[list[np.ndarray], list[np.ndarray], list[str]]]:
    """The kept weights of the flat view ``current``, in COO form, layers in its order.

    Returns ``(values, (indices, shapes, names))`` for the sent layers: 1-D values in the
    layer's dtype, ``(n_kept, ndim)`` int64 indices in row-major order, int64 shapes.

    Raises:
      KeyError, ValueError: the scores miss a layer, name an unknown one, or have another shape.
    """
    masks = host_sparse_masks(score_gen_function, sparsity_level, current, initial)
    values: list[np.ndarray] = []
    indices: list[np.ndarray] = []
    shapes: list[np.ndarray] = []
    names: list[str] = []
    for (name, layer), mask in zip(current.items(), masks.values()):
        if not mask.any():
            continue
        flat = np.flatnonzero(mask)
        array = np.asarray(layer)
        values.append(array.reshape(-1)[flat])
        indices.append(unravel(flat, array.shape))
        shapes.append(np.asarray(array.shape, np.int64))
        names.append(name)
    return values, (indices, shapes, names)


def host_sparse_masks(
    score_gen_function: Callable[[Any, Any], Mapping[str, Any]],
    sparsity_level: float,
    current: Mapping[str, jax.Array],
    initial: Mapping[str, jax.Array] | None,
) -> FlatView:
    """:func:`sparse_masks` of the scores of ``current``, computed for the host: ``name ->
    numpy bool array`` in the order of ``current`` (the threshold by ``numpy.partition``
    when the scores are in host memory)."""
    validate_sparsity_level(sparsity_level)
    scores = check_scores(score_gen_function(current, initial), current)
    masks = to_numpy(cast(FlatView, _masks_at(scores, current, _threshold(scores, sparsity_level))).values())
    return FlatView(zip(current, masks))


def check_scores(scores: Mapping[str, Any], layers: Mapping[str, Any]) -> FlatView:
    """``scores`` in the order of ``layers``, after checking they match name for name and shape for shape."""
    if not isinstance(cast(object, scores), Mapping):
        raise TypeError(f"a score function must return a name -> array mapping, got {type(scores).__name__}")
    check_same_layers(scores, layers, extra="the model (a score names it)", missing="the scores")
    ordered = FlatView()
    for name, layer in layers.items():
        score = scores[name]
        if np.shape(score) != np.shape(layer):
            raise ValueError(f"scores of layer {name!r}: expected shape {np.shape(layer)}, got {np.shape(score)}")
        dtype = score.dtype if hasattr(score, "dtype") else np.asarray(score).dtype
        if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
            raise TypeError(f"scores of layer {name!r} must be real numbers, got dtype {dtype}")
        ordered[name] = score
    return ordered


def _threshold(scores: Mapping[str, Any], sparsity_level: float) -> jax.Array | np.float32:
    """The k-th largest score: ``numpy.partition`` for scores in host memory, else on device."""
    if all(isinstance(s, np.ndarray) or (isinstance(s, jax.Array) and in_host_memory(s)) for s in scores.values()):
        return _host_threshold(scores, sparsity_level)
    return cast(jax.Array, _device_threshold(scores, sparsity_level=sparsity_level))


def _host_threshold(scores: Mapping[str, Any], sparsity_level: float) -> np.float32:
    total = sum(int(np.size(score)) for score in scores.values())
    if total == 0:
        return np.float32(np.inf)
    flat = np.empty(total, np.float32)
    start = 0
    for score in scores.values():
        stop = start + int(np.size(score))
        np.copyto(flat[start:stop], np.asarray(score).reshape(-1), casting="unsafe")
        start = stop
    flat[np.isnan(flat)] = -np.inf
    position = total - num_weights_to_exchange(total, sparsity_level)
    flat.partition(position)
    return np.float32(flat[position] + np.float32(0))  # -0.0 and 0.0 are the same score


_device_threshold = jax.jit(score_threshold, static_argnames="sparsity_level")  # pyright: ignore[reportUnknownMemberType]
_masks_at = jax.jit(masks_at_threshold)  # pyright: ignore[reportUnknownMemberType]


def _float32_bits(score: Any) -> jax.Array:
    return jax.lax.bitcast_convert_type(jnp.asarray(score).astype(jnp.float32), jnp.uint32)


def _sortable_key(score: Any) -> jax.Array:
    """uint32 keys in the order of the float32 scores (NaN as -inf, -0.0 as 0.0), computed
    on the bits alone so that subnormal scores keep their order."""
    bits = _float32_bits(score)
    bits = jnp.where(bits == _SIGN, jnp.uint32(0), bits)  # -0.0 -> 0.0
    bits = jnp.where((bits & ~_SIGN) > _INF_BITS, _SIGN | _INF_BITS, bits)  # NaN -> -inf
    return jnp.where(bits >= _SIGN, ~bits, bits | _SIGN)


def _is_nan(score: Any) -> jax.Array:
    return (_float32_bits(score) & ~_SIGN) > _INF_BITS


def _nonzero(values: Any) -> jax.Array:
    """``values != 0``, on the bits for floats (a subnormal weight is not zero)."""
    values = jnp.asarray(values)
    if not jnp.issubdtype(values.dtype, jnp.floating):
        return values != 0
    unsigned = jnp.dtype(f"uint{8 * values.dtype.itemsize}")
    magnitude_bits = jnp.iinfo(unsigned).max >> 1
    return (jax.lax.bitcast_convert_type(values, unsigned) & magnitude_bits) != 0


def _float_of_key(key: jax.Array) -> jax.Array:
    bits = jnp.where(key >= _SIGN, key & ~_SIGN, ~key)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _histogram(digits: list[jax.Array]) -> jax.Array:
    """Counts of each 16-bit digit value over all arrays (the value ``_BUCKETS`` is dropped)."""
    counts = jnp.zeros(_BUCKETS, jnp.int32)
    for digit in digits:
        counts = counts.at[digit.astype(jnp.int32)].add(1, mode="drop")
    return counts


def _select_bucket(counts: jax.Array, k: Any) -> tuple[jax.Array, jax.Array]:
    """The largest digit ``b`` with at least ``k`` counts at ``>= b``, and the counts above it."""
    at_or_above = jnp.cumsum(counts[::-1])[::-1]
    bucket = jnp.sum(at_or_above >= k) - 1
    above = jnp.where(bucket + 1 < _BUCKETS, at_or_above[jnp.minimum(bucket + 1, _BUCKETS - 1)], 0)
    return bucket.astype(jnp.uint32), above
