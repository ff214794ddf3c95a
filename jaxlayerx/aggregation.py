"""Server-side averaging of partial, named payloads: each layer over the clients that sent it.

Two forms with the same arithmetic:

* :class:`FedAvgDynamicLayer` takes the packed payloads of the clients (host numpy arrays),
  or their decoded ``name -> array`` views (:meth:`FedAvgDynamicLayer.aggregate_layers`);
* :func:`masked_fedavg` takes all clients' flat views stacked on a leading axis and a
  per-layer boolean mask per client (fixed shapes: runs inside ``jax.jit``/``jax.vmap``).

A layer's average is ``sum_i w_i x_i / sum_i w_i`` over the clients ``i`` that sent it,
``w_i`` the client's number of examples (1 when not weighted). Floating layers are averaged
in float32 (float64 for float64 layers) and returned in their own dtype; integer and
boolean layers are averaged in float64 and rounded to the nearest integer (ties to even).
Clients that sent one layer in different dtypes are averaged in their promoted dtype
(:mod:`jaxlayerx.dtypes`). A client value that is NaN or infinite is refused, naming the
client and the layer, unless ``allow_nonfinite=True`` (fl4health averages it in).
Inside JAX, float64 exists only with x64 enabled (``jax.config.update("jax_enable_x64",
True)``); without it :func:`masked_fedavg` accumulates float64, integer and boolean layers
in float32, exact while the weighted sums stay below ``2**24``.
"""

from __future__ import annotations

import collections
import functools
import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from jaxlayerx.base import NDArrays
from jaxlayerx.contributions import check_consistent, check_finite, check_numeric, check_total_weight, read_results
from jaxlayerx.dtypes import promoted_dtype
from jaxlayerx.errors import unknown_layer
from jaxlayerx.packing import unpack_layers

#: What a masked average is taken over (see :func:`masked_fedavg`).
AVERAGE_OVER: tuple[str, ...] = ("senders", "participants")

#: How many leading elements order two contributions before their whole bytes are compared.
_PREFIX_ELEMENTS = 16
#: Elements of the scratch matrix that the clients' slices of a layer are copied into.
_SCRATCH_ELEMENTS = 1 << 18


class FedAvgDynamicLayer:
    """Averages each layer over the clients that sent it (fl4health's FedAvg variant).

    Args:
      weighted_aggregation: weight each client by its number of examples (else uniformly).
      allow_nonfinite: average NaN and infinite client values in, as fl4health does, instead
        of refusing them.
    """

    def __init__(self, weighted_aggregation: bool = True, *, allow_nonfinite: bool = False) -> None:
        self.weighted_aggregation = bool(weighted_aggregation)
        self.allow_nonfinite = bool(allow_nonfinite)

    def aggregate(self, results: Sequence[tuple[NDArrays, int]]) -> dict[str, np.ndarray]:
        """Averages the layers of packed client payloads.

        Args:
          results: one ``(payload, num_examples)`` per client; each payload is packed with
            layer names (:func:`jaxlayerx.pack_layers`).

        Returns:
          ``name -> averaged array`` for every layer some client sent, sorted by name, in
          the layer's dtype (the promoted dtype of its senders' when they differ). The
          result is bit-identical for any order of ``results``.

        Raises:
          ValueError: a malformed payload or example count (naming the client); one layer
            name with different shapes from two clients (naming both); a layer whose
            clients' weights sum to zero; a NaN or infinite value (naming the client and
            the layer) without ``allow_nonfinite``.
          TypeError: values that cannot be averaged (complex, strings).
        """
        return self._average(read_results(results, _unpacked, self.weighted_aggregation))

    def aggregate_layers(self, results: Sequence[tuple[Mapping[str, Any], int]]) -> dict[str, np.ndarray]:
        """:meth:`aggregate` over decoded payloads: one ``(name -> array, num_examples)`` per
        client (arrays in host memory, numpy or CPU ``jax.Array``), no packing involved."""
        return self._average(read_results(results, _named_arrays, self.weighted_aggregation))

    def _average(self, readings: Iterable[tuple[int, float, list[tuple[str, np.ndarray]]]]) -> dict[str, np.ndarray]:
        contributions: dict[str, list[tuple[float, np.ndarray]]] = {}
        owners: dict[int, int] = {}  # id(array) -> the client that sent it
        first_senders: dict[str, tuple[int, tuple[int, ...]]] = {}
        numeric: set[np.dtype[Any]] = set()  # dtypes already checked
        for client, weight, layers in readings:
            for name, array in layers:
                check_consistent(name, (client, array.shape), first_senders)
                if array.dtype not in numeric:
                    check_numeric(client, name, array.dtype)
                    numeric.add(array.dtype)
                contributions.setdefault(name, []).append((weight, array))
                owners[id(array)] = client
        for name, items in contributions.items():
            check_total_weight(name, [weight for weight, _ in items])
        averages: dict[str, np.ndarray] = {}
        for name in sorted(contributions):
            weights, arrays = zip(*canonical_order(contributions[name]))
            try:
                averages[name] = _weighted_mean(list(arrays), list(weights), finite=not self.allow_nonfinite)
            except _NonFinite as error:
                array = arrays[error.row]
                check_finite(owners[id(array)], name, array)
                raise AssertionError("a non-finite block without a non-finite client value") from error
        return averages


def _unpacked(payload: Sequence[np.ndarray]) -> list[tuple[str, np.ndarray]]:
    arrays, names = unpack_layers(payload)
    return list(zip(names, arrays))


def _named_arrays(layers: Mapping[str, Any]) -> list[tuple[str, np.ndarray]]:
    if not isinstance(cast(object, layers), Mapping):
        raise TypeError(f"decoded layers are a name -> array mapping, got {type(layers).__name__}")
    for name in layers:
        if not isinstance(cast(object, name), str):
            raise TypeError(f"layer names must be strings, got {type(name).__name__} {name!r}")
    return [(name, np.asarray(array)) for name, array in layers.items()]


class _NonFinite(Exception):
    """A block of a mean came out non-finite; ``row`` is the first contribution holding NaN or infinity."""

    def __init__(self, row: int) -> None:
        super().__init__(row)
        self.row = row


def masked_fedavg(
    client_layers: Mapping[str, jax.Array],
    masks: Mapping[str, jax.Array],
    num_examples: jax.Array,
    *,
    weighted: bool = True,
    fallback: Mapping[str, jax.Array] | None = None,
    over: str = "senders",
) -> tuple[collections.OrderedDict[str, jax.Array], collections.OrderedDict[str, jax.Array]]:
    """Per-layer FedAvg over stacked clients and masks; pure and jit/vmap-able.

    Args:
      client_layers: ``name -> (C, *shape)`` arrays, client ``c``'s layer at index ``c``.
      masks: ``name -> (C,)`` booleans, whether client ``c`` sent the layer; or
        ``name -> (C, *shape)`` booleans, whether it sent each weight (sparse exchange:
        each weight is then averaged over the clients that sent it).
      num_examples: ``(C,)`` example counts (ignored when not ``weighted``).
      weighted: weight each client by its example count (else uniformly).
      fallback: ``name -> array`` used for layers that no client sent (or whose weights
        sum to zero); zeros when omitted. The global model, for a server.
      over: ``"senders"``: each layer (weight) is the mean of the values of the clients
        that sent it (fl4health's layer rule). ``"participants"``: it moves from
        ``fallback`` by the mean change over all the clients, a client that did not send it
        counting as no change: ``fallback + sum_i w_i m_i (x_i - fallback) / sum_i w_i``,
        the aggregation of sparse updates that error feedback (DGC, STC) assumes. Needs
        ``fallback``.

    Returns:
      ``(averages, sent)``: ordered dicts of averaged layers (in their own dtypes) and of
      booleans telling whether any client sent each layer (each weight, for per-weight
      masks) with a positive weight.

    Raises:
      ValueError: a layer, mask, count or fallback without the shared leading client
        axis (checked on static shapes, so also under ``jit``); an unknown ``over``, or
        ``"participants"`` without a fallback.
      KeyError: a layer without a mask (or without a fallback, when one is given).
    """
    if over not in AVERAGE_OVER:
        raise ValueError(f"over must be one of {', '.join(AVERAGE_OVER)}, got {over!r}")
    if over == "participants" and fallback is None:
        raise ValueError('over="participants" moves each layer from fallback (the global model): pass fallback=')
    counts = jnp.asarray(num_examples, jnp.float32)
    _check_stacked(client_layers, masks, counts, fallback)
    weights = counts if weighted else jnp.ones_like(counts)
    averages: collections.OrderedDict[str, jax.Array] = collections.OrderedDict()
    sent: collections.OrderedDict[str, jax.Array] = collections.OrderedDict()
    for name, stacked in client_layers.items():
        stacked = jnp.asarray(stacked)
        mask = jnp.asarray(masks[name], bool)
        accumulate = _masked_accumulator(stacked.dtype)
        if over == "senders":
            summed, total = _masked_sums(stacked, mask, weights, accumulate)
            mean = summed / jnp.where(total > 0, total, 1.0).astype(accumulate)
        else:
            base = jnp.asarray(cast(Mapping[str, jax.Array], fallback)[name]).astype(accumulate)  # checked above
            changes, total = _masked_sums(stacked.astype(accumulate) - base, mask, weights, accumulate)
            everyone = jnp.sum(weights).astype(accumulate)
            mean = base + changes / jnp.where(everyone > 0, everyone, 1.0)
        mean = cast_mean(mean, stacked.dtype, jnp)
        default = jnp.zeros_like(mean) if fallback is None else jnp.asarray(fallback[name], mean.dtype)
        averages[name] = jnp.where(total > 0, mean, default)
        sent[name] = total > 0
    return averages, sent


@functools.partial(jax.jit, static_argnames=("weighted", "over"))  # pyright: ignore[reportUnknownMemberType]
def compiled_masked_fedavg(
    client_layers: Mapping[str, jax.Array],
    masks: Mapping[str, jax.Array],
    num_examples: jax.Array,
    fallback: Mapping[str, jax.Array],
    *,
    weighted: bool,
    over: str,
) -> tuple[collections.OrderedDict[str, jax.Array], collections.OrderedDict[str, jax.Array]]:
    """:func:`masked_fedavg` with the global model as ``fallback``, compiled on its own.

    The one program that averages a round, in the simulation and on a Flower server alike
    (:class:`jaxlayerx.protocol.ExchangeServer`): called with the same layers, shapes and
    options, both run the same compiled code, so they average bit for bit alike. (Compiled
    inside a larger program, the same arithmetic may fuse and round differently.)
    """
    return masked_fedavg(client_layers, masks, num_examples, weighted=weighted, fallback=fallback, over=over)


def _masked_sums(
    stacked: jax.Array, mask: jax.Array, counts: jax.Array, accumulate: Any
) -> tuple[jax.Array, jax.Array]:
    """``sum_c w_c x_c`` and ``sum_c w_c`` over the clients (the weights) that sent, with
    ``w_c = counts[c]`` where ``mask[c]`` is set and 0 elsewhere.

    One term per client, added in client order: XLA fuses it into one elementwise pass over
    the clients' arrays (on CPU several times faster than a dot or a reduction over the
    client axis), and what a client did not send never reaches the sum, even as NaN or inf.
    """
    summed = jnp.zeros(stacked.shape[1:], accumulate)
    total = jnp.zeros(mask.shape[1:], accumulate)
    for client in range(stacked.shape[0]):
        sent = mask[client]
        weight = jnp.where(sent, counts[client], 0).astype(accumulate)
        summed = summed + jnp.where(sent, weight * stacked[client].astype(accumulate), 0)
        total = total + weight
    return summed, total


def _check_stacked(
    client_layers: Mapping[str, Any], masks: Mapping[str, Any], counts: jax.Array, fallback: Mapping[str, Any] | None
) -> None:
    """Static shape checks of the masked form: one leading client axis everywhere."""
    if counts.ndim != 1:
        raise ValueError(f"num_examples must have shape (num_clients,), got {counts.shape}")
    num_clients = counts.shape[0]
    for name, stacked in client_layers.items():
        shape = jnp.shape(stacked)
        if not shape or shape[0] != num_clients:
            raise ValueError(f"layer {name!r}: expected a leading client axis of {num_clients}, got shape {shape}")
        if name not in masks:
            raise unknown_layer(name, masks, what="the masks")
        if jnp.shape(masks[name]) not in ((num_clients,), shape):
            raise ValueError(
                f"mask of layer {name!r}: expected shape ({num_clients},) or {shape}, got {jnp.shape(masks[name])}"
            )
        if fallback is not None:
            if name not in fallback:
                raise unknown_layer(name, fallback, what="the fallback")
            if jnp.shape(fallback[name]) != shape[1:]:
                raise ValueError(
                    f"fallback of layer {name!r}: expected shape {shape[1:]}, got {jnp.shape(fallback[name])}"
                )


def _masked_accumulator(dtype: Any) -> Any:
    """float32 for floating layers up to 32 bits; for float64, integer and bool layers,
    float64 when JAX runs with x64 enabled, else float32 (exact while the weighted sums
    stay below 2**24)."""
    if _is_floating(dtype) and dtype != jnp.float64:
        return jnp.float32
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def canonical_order(items: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Sorts ``(weight, *arrays)`` contributions by content, so the summation order
    ignores arrival order.

    Ordered by weight, then by the bytes of the arrays' first elements; contributions still
    tied are ordered by their full bytes unless they are identical (then any order sums alike).
    """

    def key(item: tuple[Any, ...]) -> tuple[Any, ...]:
        weight, *arrays = item
        return (weight, *(array.reshape(-1)[:_PREFIX_ELEMENTS].tobytes() for array in arrays))

    def same(one: tuple[Any, ...], other: tuple[Any, ...]) -> bool:
        return all(np.array_equal(a, b) for a, b in zip(one[1:], other[1:]))

    by_weight = sorted(items, key=lambda item: item[0])
    if all(one[0] != other[0] for one, other in zip(by_weight, by_weight[1:])):
        return by_weight  # distinct weights (the common case) order alone: no bytes read
    keyed = sorted(((key(item), item) for item in items), key=lambda pair: pair[0])
    result: list[tuple[Any, ...]] = []
    for _, run in itertools.groupby(keyed, key=lambda pair: pair[0]):
        group = [item for _, item in run]
        if len(group) > 1 and not all(same(group[0], other) for other in group[1:]):
            group = sorted(group, key=lambda item: tuple(array.tobytes() for array in item[1:]))
        result.extend(group)
    return result


def _weighted_mean(arrays: list[np.ndarray], weights: list[float], finite: bool = True) -> np.ndarray:
    """``sum(w_i * x_i) / sum(w_i)`` over the arrays in the given order, in their (promoted) dtype.

    Works through the layer in cache-sized column blocks: the clients' slices are copied
    into a small scratch matrix and reduced by one BLAS matrix-vector product, so each
    client array is read from memory once and no layer-sized stack is ever built. With
    ``finite``, a block whose mean is not finite raises :class:`_NonFinite` naming the first
    contribution holding NaN or infinity there (a check on the block's result, while in cache).
    """
    dtypes = {array.dtype for array in arrays}
    dtype = dtypes.pop() if len(dtypes) == 1 else promoted_dtype(dtypes)
    accumulate = host_accumulator(dtype)
    flat = [array.reshape(-1) for array in arrays]
    scale = np.asarray(weights, accumulate)
    total = accumulate(sum(weights))
    size = flat[0].size
    block = max(1, _SCRATCH_ELEMENTS // len(flat))
    if size <= block and all(array.dtype == accumulate for array in arrays):
        return _small_weighted_mean(flat, scale, total, finite).reshape(arrays[0].shape)  # already in its dtype
    scratch = np.empty((len(flat), min(size, block)), accumulate)
    mean = np.empty(size, accumulate)
    for start in range(0, size, block):
        stop = min(start + block, size)
        rows, out = scratch[:, : stop - start], mean[start:stop]
        for row, array in zip(rows, flat):
            row[...] = array[start:stop]
        np.dot(scale, rows, out=out)
        out /= total  # while the block is in cache: no second pass over the layer
        if finite and not np.isfinite(out).all():
            bad_rows = [i for i, row in enumerate(rows) if not np.isfinite(row).all()]
            if bad_rows:
                raise _NonFinite(bad_rows[0])
    return cast_mean(mean.reshape(arrays[0].shape), dtype, np)


def _small_weighted_mean(flat: list[np.ndarray], scale: np.ndarray, total: Any, finite: bool) -> np.ndarray:
    """:func:`_weighted_mean` of a layer that fits in one block, already in the accumulator
    dtype: the same product on the same matrix, with fewer steps around it."""
    out = np.dot(scale, np.concatenate(flat).reshape(len(flat), flat[0].size))  # np.stack's matrix, built faster
    out /= total
    if finite and not np.isfinite(out).all():
        raise _NonFinite(next(i for i, row in enumerate(flat) if not np.isfinite(row).all()))
    return out


def host_accumulator(dtype: Any) -> type[np.float32] | type[np.float64]:
    """The host dtype a layer's average is summed in: float32 for floating layers up to
    32 bits, float64 for float64, integer and boolean layers."""
    return np.float32 if _is_floating(dtype) and dtype != np.float64 else np.float64


@functools.lru_cache(maxsize=64)
def _is_floating(dtype: Any) -> bool:
    """Whether ``dtype`` is floating (bfloat16 included); cached, ``jnp.issubdtype`` is slow."""
    return bool(jnp.issubdtype(dtype, jnp.floating))


def cast_mean(mean: Any, dtype: Any, xp: Any) -> Any:
    """Casts an average back to the layer's dtype, rounding for integer and bool layers."""
    if not _is_floating(dtype):
        mean = xp.rint(mean)
    return xp.asarray(mean).astype(dtype, copy=False)  # no copy when already in the layer's dtype
