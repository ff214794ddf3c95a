"""Dynamic layer selection by drift: norms, masks and selection rules.

The drift of a layer is the L2 norm of ``current - initial``, computed in float32 (integer
and half-precision leaves are cast), divided by the layer's number of elements when
``normalize`` is true. Two rules pick layers from the drifts:

* threshold: drift ``> norm_threshold`` (``select_drift_more``), else ``<= norm_threshold``;
  the comparison is exact, as between real numbers (as fl4health does in float64);
* percentage: the ``ceil(N * exchange_percentage)`` layers of largest drift (smallest when
  not ``select_drift_more``), ``N`` the number of layers, computed as
  ``math.ceil(N * exchange_percentage)`` in Python floats like fl4health (so 25 layers at
  0.28 select 8: ``25 * 0.28 == 7.000000000000001``); ties go to the layer that comes
  first in flatten order.

The pure functions here (:func:`drift_norms`, :func:`threshold_mask`,
:func:`percentage_mask`) take and return ordered ``name -> array`` dicts of fixed shapes,
so they run inside ``jax.jit`` and ``jax.vmap``. The selection functions built by
:class:`LayerSelectionFunctionConstructor` run them as one jitted computation with a single
device-to-host transfer of the mask, then gather the selected layers as numpy arrays.
"""

from __future__ import annotations

import collections
import functools
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlayerx.errors import unknown_layer
from jaxlayerx.packing import to_numpy
from jaxlayerx.tree import flatten

LayerSelectionFunction = Callable[[Any, Any], tuple[list[np.ndarray], list[str]]]


def check_matching_layers(current: Mapping[str, Any], initial: Mapping[str, Any]) -> None:
    """Checks that two flat views hold the same layer names with the same shapes.

    Raises:
      KeyError: a layer is in one view but not in the other (named, with close matches).
      ValueError: a layer's shapes differ.
    """
    for name in current:
        if name not in initial:
            raise unknown_layer(name, initial, what="the initial model")
    for name in initial:
        if name not in current:
            raise unknown_layer(name, current, what="the current model")
    for name, value in current.items():
        if _shape(value) != _shape(initial[name]):
            raise ValueError(
                f"layer {name!r}: current shape {np.shape(value)} differs from the initial "
                f"model's shape {np.shape(initial[name])}"
            )


def _shape(value: Any) -> tuple[int, ...]:
    shape = getattr(value, "shape", None)
    return tuple(shape) if shape is not None else np.shape(value)


def drift_norm(current: jax.Array, initial: jax.Array, normalize: bool = True) -> jax.Array:
    """The float32 L2 norm of ``current - initial``, over its size when ``normalize``."""
    current, initial = jnp.asarray(current), jnp.asarray(initial)
    # Reduced as a 1-D vector: XLA's CPU reduction over all axes of a conv kernel is
    # slower than over the same bytes raveled (ResNet-50 norms: 6.1 -> 5.6 ms).
    diff = current.astype(jnp.float32).ravel() - initial.astype(jnp.float32).ravel()
    norm = jnp.sqrt(jnp.sum(jnp.square(diff)))
    if normalize:
        norm = norm / max(current.size, 1)
    return norm


def drift_norms(
    current: Mapping[str, jax.Array], initial: Mapping[str, jax.Array], *, normalize: bool = True
) -> collections.OrderedDict[str, jax.Array]:
    """Drift norms of every layer, in the order of ``current``; pure and jit/vmap-able.

    Args:
      current: flat view of the model after local training (see :func:`jaxlayerx.flatten`).
      initial: flat view of the model at the start of the round, same names and shapes.
      normalize: divide each norm by the layer's number of elements.

    Returns:
      An ordered dict ``name -> float32 scalar``.
    """
    check_matching_layers(current, initial)
    return collections.OrderedDict(
        (name, drift_norm(value, initial[name], normalize)) for name, value in current.items()
    )


def threshold_mask(
    norms: Mapping[str, jax.Array], norm_threshold: float | jax.Array, *, select_drift_more: bool = True
) -> collections.OrderedDict[str, jax.Array]:
    """Per-layer booleans: drift ``> norm_threshold``, or ``<=`` if not ``select_drift_more``.

    A Python number threshold is compared exactly (as a real number) with the float32
    norms; an array threshold is compared in float32.
    """
    threshold = _float32_floor(norm_threshold)
    return collections.OrderedDict(
        (name, (norm > threshold) if select_drift_more else (norm <= threshold))
        for name, norm in norms.items()
    )


def percentage_mask(
    norms: Mapping[str, jax.Array], exchange_percentage: float, *, select_drift_more: bool = True
) -> collections.OrderedDict[str, jax.Array]:
    """Per-layer booleans marking the ``ceil(N * exchange_percentage)`` largest drifts.

    Smallest drifts when not ``select_drift_more``. Ties go to the layer that comes first
    in the order of ``norms``. ``exchange_percentage`` must be a Python number (it fixes
    the number of layers, a static shape).
    """
    validate_exchange_percentage(exchange_percentage)
    names = list(norms)
    if not names:
        return collections.OrderedDict()
    count = num_layers_to_exchange(len(names), exchange_percentage)
    stacked = jnp.stack([jnp.asarray(norms[name], jnp.float32) for name in names])
    # lax.top_k returns the lower index first among equal values: ties go to the earlier layer.
    _, chosen = jax.lax.top_k(stacked if select_drift_more else -stacked, count)
    selected = jnp.zeros(len(names), dtype=bool).at[chosen].set(True)
    return collections.OrderedDict((name, selected[i]) for i, name in enumerate(names))


def num_layers_to_exchange(num_layers: int, exchange_percentage: float) -> int:
    """``ceil(num_layers * exchange_percentage)``, in Python floats as fl4health computes it."""
    return int(math.ceil(num_layers * exchange_percentage))


def select_layers_by_threshold(
    norm_threshold: float, normalize: bool, select_drift_more: bool, model: Any, initial_model: Any
) -> tuple[list[np.ndarray], list[str]]:
    """Layers of ``model`` whose drift from ``initial_model`` passes ``norm_threshold``.

    Returns the selected arrays (numpy, in their own dtype) and names, in flatten order.
    """
    validate_norm_threshold(norm_threshold)
    threshold = jnp.asarray(_float32_floor(norm_threshold), jnp.float32)
    return _select(
        _threshold_mask_vector, model, initial_model, threshold, normalize=normalize, select_drift_more=select_drift_more
    )


def select_layers_by_percentage(
    exchange_percentage: float, normalize: bool, select_drift_more: bool, model: Any, initial_model: Any
) -> tuple[list[np.ndarray], list[str]]:
    """The ``ceil(N * exchange_percentage)`` layers of ``model`` that drifted most (or least).

    Returns the selected arrays (numpy, in their own dtype) and names, in flatten order.
    """
    validate_exchange_percentage(exchange_percentage)
    return _select(
        _percentage_mask_vector,
        model,
        initial_model,
        exchange_percentage=float(exchange_percentage),
        normalize=normalize,
        select_drift_more=select_drift_more,
    )


class LayerSelectionFunctionConstructor:
    """Builds drift-based layer selection functions for :class:`DynamicLayerExchanger`.

    Args:
      norm_threshold: threshold on the drift norm, ``> 0``.
      exchange_percentage: fraction of layers to select, in ``(0, 1]``.
      normalize: divide each layer's norm by its number of elements.
      select_drift_more: select large drifts (else small ones).

    Raises:
      ValueError: a value out of range. TypeError: a value that is not a real number.
    """

    def __init__(
        self,
        norm_threshold: float,
        exchange_percentage: float,
        normalize: bool = True,
        select_drift_more: bool = True,
    ) -> None:
        validate_norm_threshold(norm_threshold)
        validate_exchange_percentage(exchange_percentage)
        self.norm_threshold = norm_threshold
        self.exchange_percentage = exchange_percentage
        self.normalize = bool(normalize)
        self.select_drift_more = bool(select_drift_more)

    def select_by_threshold(self) -> LayerSelectionFunction:
        """A function ``(model, initial_model) -> (arrays, names)`` for the threshold rule."""
        return functools.partial(
            select_layers_by_threshold, self.norm_threshold, self.normalize, self.select_drift_more
        )

    def select_by_percentage(self) -> LayerSelectionFunction:
        """A function ``(model, initial_model) -> (arrays, names)`` for the percentage rule."""
        return functools.partial(
            select_layers_by_percentage, self.exchange_percentage, self.normalize, self.select_drift_more
        )


# The jitted mask functions take the layer names (static) and two lists of arrays: a
# list dispatches about twice as fast as an OrderedDict of the same arrays.


@functools.partial(jax.jit, static_argnames=("names", "normalize", "select_drift_more"))
def _threshold_mask_vector(names, current, initial, threshold, *, normalize, select_drift_more):
    norms = drift_norms(_named(names, current), _named(names, initial), normalize=normalize)
    return _stack(threshold_mask(norms, threshold, select_drift_more=select_drift_more))


@functools.partial(jax.jit, static_argnames=("names", "exchange_percentage", "normalize", "select_drift_more"))
def _percentage_mask_vector(names, current, initial, *, exchange_percentage, normalize, select_drift_more):
    norms = drift_norms(_named(names, current), _named(names, initial), normalize=normalize)
    return _stack(percentage_mask(norms, exchange_percentage, select_drift_more=select_drift_more))


def _named(names: tuple[str, ...], arrays: list[jax.Array]) -> collections.OrderedDict[str, jax.Array]:
    return collections.OrderedDict(zip(names, arrays))


def _stack(mask: Mapping[str, jax.Array]) -> jax.Array:
    return jnp.stack(list(mask.values())) if mask else jnp.zeros((0,), dtype=bool)


def _select(mask_vector: Callable[..., jax.Array], model: Any, initial_model: Any, *args: Any, **static: Any):
    """Flattens both models, runs the jitted mask (which checks their layers), gathers the chosen ones."""
    current, initial = _flat_pair(model, initial_model)
    if current.keys() != initial.keys():
        check_matching_layers(current, initial)  # raises, naming the layer
    names = tuple(current)
    arrays = list(current.values())
    mask = mask_vector(names, arrays, [initial[name] for name in names], *args, **static)
    return _gather(names, arrays, mask)


def _flat_pair(model: Any, initial_model: Any):
    if initial_model is None:
        raise ValueError(
            "dynamic layer selection needs initial_model: the model as it was at the start "
            "of the round (pass initial_model=...)"
        )
    # The shapes are checked by drift_norms while the mask function traces: a mismatch
    # changes the jit cache key, so it is always traced, and raises, before use.
    return flatten(model), flatten(initial_model)


def _gather(names: tuple[str, ...], arrays: list[jax.Array], mask: jax.Array) -> tuple[list[np.ndarray], list[str]]:
    selected = np.asarray(mask).tolist()  # the one device-to-host sync of the selection
    chosen = [position for position, keep in enumerate(selected) if keep]
    return to_numpy([arrays[position] for position in chosen]), [names[position] for position in chosen]


def _float32_floor(threshold: Any) -> Any:
    """The largest float32 <= a Python number; arrays pass through.

    For a float32 ``x`` and a real ``t``, ``x > t`` exactly when ``x > floor32(t)``, so
    comparing in float32 against this value gives the exact real-number comparison.
    """
    if not isinstance(threshold, numbers.Real):
        return threshold
    floor = np.float32(threshold)
    if float(floor) > float(threshold):
        floor = np.nextafter(floor, np.float32(-np.inf))
    return floor


def validate_norm_threshold(norm_threshold: Any) -> None:
    if not isinstance(norm_threshold, numbers.Real) or isinstance(norm_threshold, bool):
        raise TypeError(f"norm_threshold must be a real number, got {norm_threshold!r}")
    if not norm_threshold > 0:
        raise ValueError(f"norm_threshold must be > 0, got {norm_threshold}")


def validate_exchange_percentage(exchange_percentage: Any) -> None:
    if not isinstance(exchange_percentage, numbers.Real) or isinstance(exchange_percentage, bool):
        raise TypeError(f"exchange_percentage must be a real number, got {exchange_percentage!r}")
    if not 0 < exchange_percentage <= 1:
        raise ValueError(f"exchange_percentage must be in (0, 1], got {exchange_percentage}")
