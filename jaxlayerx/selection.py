"""Dynamic layer selection by drift: drift measures, masks and selection rules.

The drift of a layer is computed from ``current - initial`` in float32 (integer and
half-precision leaves are cast first), by one of the measures of :data:`MEASURES`:

==============  ==============================================  ==========================
measure         drift of a layer of ``n`` elements               fl4health
==============  ==============================================  ==========================
``"l2/size"``   ``||current - initial|| / n``                    ``normalize=True``
``"l2"``        ``||current - initial||``                        ``normalize=False``
``"rms"``       ``sqrt(||current - initial||^2 / n)``           (not offered)
``"relative"``  ``||current - initial|| / ||initial||``          (not offered)
==============  ==============================================  ==========================

``"relative"`` of a layer whose ``initial`` is all zeros is ``0`` when it did not move and
``+inf`` when it did (it moved infinitely far relative to its size). ``"rms"`` is
scale-free across layer sizes: a bias and a kernel that moved each weight by the same
amount have the same drift, where ``"l2/size"`` favours the small layer by its size.

Three rules pick layers:

* threshold: drift ``> norm_threshold`` (``select_drift_more``), else ``<= norm_threshold``;
  the comparison is exact, as between real numbers (as fl4health does in float64);
* percentage: the ``ceil(N * exchange_percentage)`` layers of largest drift (smallest when
  not ``select_drift_more``), ``N`` the number of layers, computed as
  ``math.ceil(N * exchange_percentage)`` in Python floats like fl4health (so 25 layers at
  0.28 select 8: ``25 * 0.28 == 7.000000000000001``); ties go to the layer that comes
  first in flatten order;
* budget (not in fl4health): layers ranked by drift energy per byte,
  ``||current - initial||^2 / nbytes`` (``nbytes`` the layer's bytes in its own dtype; ties
  to the earlier layer), are taken greedily in that order while they fit: a layer is
  taken when it fits in ``byte_fraction * (bytes of all layers)`` together with those
  already taken; one that does not fit is skipped, and smaller ones after it can still be
  taken. The measure does not enter: energy per byte ranks as ``"rms"`` squared over the
  item size.

The pure functions here (:func:`drift_norms`, :func:`threshold_mask`,
:func:`percentage_mask`, :func:`budget_mask`) take and return ordered ``name -> array``
dicts of fixed shapes, so they run inside ``jax.jit`` and ``jax.vmap``. The rules that
:class:`LayerSelectionFunctionConstructor` builds are small callable objects: called as
fl4health's ``(model, initial_model) -> (arrays, names)`` they run the mask as one jitted
computation with a single device-to-host transfer, then gather the selected layers as
numpy arrays; their ``mask(current, reference)`` method is the same rule in pure form.
"""

from __future__ import annotations

import collections
import dataclasses
import fractions
import functools
import math
import numbers
from collections.abc import Mapping
from typing import Any, TypeAlias, cast

import jax
import jax.numpy as jnp
import numpy as np

from jaxlayerx._host import to_numpy
from jaxlayerx.base import FlatView, NDArrays
from jaxlayerx.tree import as_flat_view, check_matching_layers, check_snapshot

#: A real number as :func:`_exact` reads it (``numbers.Real`` alone: type checkers do not
#: count ``float`` and numpy floats as its subclasses, which they are at runtime).
_Real: TypeAlias = "numbers.Real | float | np.floating[Any]"

#: The drift measures, by name (see the module docstring).
MEASURES: tuple[str, ...] = ("l2/size", "l2", "rms", "relative")


def resolve_measure(measure: str | None, normalize: bool = True) -> str:
    """``measure`` checked, or fl4health's measure for ``normalize`` when it is ``None``.

    Raises:
      ValueError: a measure not in :data:`MEASURES`.
    """
    if measure is None:
        return "l2/size" if normalize else "l2"
    if not isinstance(cast(object, measure), str) or measure not in MEASURES:
        raise ValueError(f"unknown drift measure {measure!r}; choose from {', '.join(MEASURES)}")
    return measure


def drift_norm(current: Any, initial: Any, normalize: bool = True, *, measure: str | None = None) -> jax.Array:
    """The float32 drift of one layer by ``measure`` (default: fl4health's, set by ``normalize``)."""
    measure = resolve_measure(measure, normalize)
    current, initial = _float32_vector(current), _float32_vector(initial)
    energy = jnp.sum(jnp.square(current - initial))
    size = max(current.size, 1)
    if measure == "rms":
        return jnp.sqrt(energy / size)  # root mean square: exact for any power-of-two size
    norm = jnp.sqrt(energy)
    if measure == "l2/size":
        return norm / size
    if measure == "relative":
        base = jnp.sqrt(jnp.sum(jnp.square(initial)))
        moved = jnp.where(norm > 0, jnp.float32(jnp.inf), jnp.float32(0))
        return jnp.where(base > 0, norm / jnp.where(base > 0, base, 1), moved)
    return norm


def drift_norms(
    current: Mapping[str, Any],
    initial: Mapping[str, Any],
    *,
    normalize: bool = True,
    measure: str | None = None,
) -> FlatView:
    """Drifts of every layer, in the order of ``current``; pure and jit/vmap-able.

    Args:
      current: flat view of the model after local training (see :func:`jaxlayerx.flatten`).
      initial: flat view of what drift is measured against, same names and shapes.
      normalize: fl4health's switch, used when ``measure`` is ``None``: ``"l2/size"`` if
        true, else ``"l2"``.
      measure: one of :data:`MEASURES`.

    Returns:
      An ordered dict ``name -> float32 scalar``.
    """
    measure = resolve_measure(measure, normalize)
    check_matching_layers(current, initial)
    return collections.OrderedDict(
        (name, drift_norm(value, initial[name], measure=measure)) for name, value in current.items()
    )


def threshold_mask(
    norms: Mapping[str, jax.Array], norm_threshold: float | jax.Array, *, select_drift_more: bool = True
) -> FlatView:
    """Per-layer booleans: drift ``> norm_threshold``, or ``<=`` if not ``select_drift_more``.

    A Python number threshold is compared exactly (as a real number) with the float32
    norms; an array threshold is compared in float32.
    """
    threshold = _float32_floor(norm_threshold)
    return collections.OrderedDict(
        (name, (norm > threshold) if select_drift_more else (norm <= threshold)) for name, norm in norms.items()
    )


def percentage_mask(
    norms: Mapping[str, jax.Array], exchange_percentage: float, *, select_drift_more: bool = True
) -> FlatView:
    """Per-layer booleans marking the ``ceil(N * exchange_percentage)`` largest drifts.

    Smallest drifts when not ``select_drift_more``. Ties go to the layer that comes first
    in the order of ``norms``. ``exchange_percentage`` must be a Python number (the count
    is computed from it exactly, as fl4health does); :func:`percentage_mask_at` takes the
    count itself.
    """
    validate_exchange_percentage(exchange_percentage)
    count = num_layers_to_exchange(len(norms), exchange_percentage)
    return percentage_mask_at(norms, count, select_drift_more=select_drift_more)


def percentage_mask_at(
    norms: Mapping[str, jax.Array], count: int | jax.Array, *, select_drift_more: bool = True
) -> FlatView:
    """Per-layer booleans marking the ``count`` largest drifts (smallest when not
    ``select_drift_more``; ties to the earlier layer). ``count`` may be traced: one
    compiled program serves every count."""
    names = list(norms)
    if not names:
        return collections.OrderedDict()
    stacked = jnp.stack([jnp.asarray(norms[name], jnp.float32) for name in names])
    # lax.top_k returns the lower index first among equal values: ties go to the earlier
    # layer. The whole order, then its first `count`: the same layers as top_k(count).
    _, order = jax.lax.top_k(stacked if select_drift_more else -stacked, len(names))
    return _unstack(names, jnp.zeros(len(names), bool).at[order].set(jnp.arange(len(names)) < count))


def budget_mask(current: Mapping[str, Any], initial: Mapping[str, Any], byte_fraction: float) -> FlatView:
    """Per-layer booleans of the budget rule (see the module docstring); pure and jit/vmap-able.

    Args:
      current: a flat view (``name -> array``).
      initial: a flat view with the same names and shapes.
      byte_fraction: the share of the bytes of all layers that may be sent, in ``(0, 1]``;
        a Python number (the capacity is computed from it exactly);
        :func:`budget_mask_at` takes the capacity itself.

    Returns:
      An ordered dict ``name -> bool scalar``, in the order of ``current``.
    """
    validate_byte_fraction(byte_fraction)
    return budget_mask_at(current, initial, budget_capacity(current, byte_fraction))


def budget_capacity(layers: Mapping[str, Any], byte_fraction: float) -> int:
    """The budget rule's capacity for layers of these shapes and dtypes:
    ``floor(byte_fraction * bytes of all layers)``, exact in rational arithmetic, in units
    of the layers' sizes' greatest common divisor (the form :func:`budget_mask_at` takes)."""
    validate_byte_fraction(byte_fraction)
    sizes = [layer_nbytes(layer) for layer in layers.values()]
    return math.floor(_exact(byte_fraction) * sum(sizes)) // (math.gcd(*sizes) or 1)


def budget_mask_at(current: Mapping[str, Any], initial: Mapping[str, Any], capacity: int | jax.Array) -> FlatView:
    """:func:`budget_mask` for a capacity given in units (:func:`budget_capacity`); the
    capacity may be traced: one compiled program serves every budget."""
    check_matching_layers(current, initial)
    names = list(current)
    if not names:
        return collections.OrderedDict()
    sizes = [layer_nbytes(current[name]) for name in names]
    energies = jnp.stack([_energy_per_byte(current[name], initial[name], size) for name, size in zip(names, sizes)])
    return _unstack(names, _greedy_fill(energies, sizes, capacity))


def layer_nbytes(layer: Any) -> int:
    """Bytes of a layer's values in its own dtype (static: from shape and dtype alone)."""
    return math.prod(np.shape(layer)) * np.dtype(layer.dtype).itemsize


def num_layers_to_exchange(num_layers: int, exchange_percentage: float) -> int:
    """``ceil(num_layers * exchange_percentage)``, in Python floats as fl4health computes it."""
    return int(math.ceil(num_layers * exchange_percentage))


#: A last axis narrower than this (torch's kernel layouts: ``(out, in, 1, 1)``, ``(out, in, 3, 3)``)
#: gets the reduction kept on the raveled vector (see :func:`_float32_vector`).
_NARROW_AXIS = 16


def _float32_vector(value: Any) -> jax.Array:
    """``value`` in float32, raveled: the vector a layer's drift is reduced over.

    XLA's CPU reduction over all axes of a kernel is slower than over the same bytes
    raveled, and XLA folds a ravel back into the reduction that follows it; with a narrow
    last axis that folded loop is slower still, so there the ravel is kept behind an
    optimization barrier (a bitcast: nothing is copied).
    """
    array = jnp.asarray(value).astype(jnp.float32)
    vector = array.ravel()
    if array.ndim > 1 and array.shape[-1] < _NARROW_AXIS:
        vector = cast(jax.Array, jax.lax.optimization_barrier(vector))  # pyright: ignore[reportUnknownMemberType]
    return vector


def _energy_per_byte(current: Any, initial: Any, nbytes: int) -> jax.Array:
    """``||current - initial||^2 / nbytes`` in float32; 0 for a layer of no bytes."""
    energy = jnp.sum(jnp.square(_float32_vector(current) - _float32_vector(initial)))
    return energy / np.float32(nbytes) if nbytes else jnp.zeros((), jnp.float32)


def _greedy_fill(energies: jax.Array, sizes: list[int], capacity: int | jax.Array) -> jax.Array:
    """Takes layers by decreasing energy (ties: lower index; NaN last) while they fit in
    ``capacity`` units of the sizes' greatest common divisor; the running total is counted
    in those units, in int32 (int64 under x64), so it is exact."""
    unit = math.gcd(*sizes) or 1
    units = [size // unit for size in sizes]
    index_dtype = jax.dtypes.canonicalize_dtype(jnp.int64)
    if sum(units) > np.iinfo(index_dtype).max:
        raise ValueError(
            f"the budget rule counts {sum(sizes)} bytes, too many for {np.dtype(index_dtype)}; "
            'enable 64-bit JAX: jax.config.update("jax_enable_x64", True)'
        )
    capacity = jnp.asarray(capacity, index_dtype)
    rank_key = jnp.where(jnp.isnan(energies), -jnp.inf, energies)
    order = jnp.argsort(-rank_key, stable=True)

    def take(used: jax.Array, size: jax.Array) -> tuple[jax.Array, jax.Array]:
        fits = used + size <= capacity
        return jnp.where(fits, used + size, used), fits

    _, taken = jax.lax.scan(take, jnp.zeros((), index_dtype), jnp.asarray(units, index_dtype)[order])
    return jnp.zeros(len(sizes), bool).at[order].set(taken)


def _unstack(names: list[str], vector: jax.Array) -> FlatView:
    return collections.OrderedDict((name, vector[i]) for i, name in enumerate(names))


# -- rules -------------------------------------------------------------------------------


class _LayerSelectionRule:
    """A layer selection function (fl4health's calling convention) with its pure mask form.

    A rule's numeric parameter reaches its mask as an argument (:meth:`argument`, exact,
    computed on the host from the layers' shapes), so that the mask can take it traced
    (:meth:`mask_at`): one compiled program serves every value of the parameter.
    """

    def argument(self, layers: Mapping[str, Any]) -> np.ndarray:
        """The rule's parameter in the exact form :meth:`mask_at` takes, for layers of these
        shapes and dtypes (the float32 threshold, the count of layers, the capacity)."""
        raise NotImplementedError

    def mask_at(self, current: Mapping[str, Any], reference: Mapping[str, Any], argument: Any) -> FlatView:
        """:meth:`mask` with the parameter given as ``argument`` (:meth:`argument`; may be traced)."""
        raise NotImplementedError

    def mask(self, current: Mapping[str, Any], reference: Mapping[str, Any]) -> FlatView:
        """``name -> bool scalar``: the layers this rule sends for ``current``, drift measured
        against ``reference`` (flat views); pure and jit/vmap-able."""
        return self.mask_at(current, reference, self.argument(current))

    def __call__(self, model: Any, initial_model: Any) -> tuple[NDArrays, list[str]]:
        """The selected layers of ``model`` (numpy, in their own dtype) and their names, in
        flatten order; drift measured against ``initial_model``.

        Raises:
          ValueError: ``initial_model`` is ``None`` or ``model`` itself (or shares its NNX
            variables), or a layer's shapes differ.
          KeyError: the two models do not have the same layers (naming the layer).
        """
        if initial_model is None:
            raise ValueError(
                "dynamic layer selection needs initial_model: the model as it was at the start "
                "of the round (pass initial_model=...)"
            )
        check_snapshot(model, initial_model)
        current = as_flat_view(model)
        names = tuple(current)
        arrays = list(current.values())
        chosen = np.flatnonzero(self.host_mask(current, as_flat_view(initial_model))).tolist()
        return to_numpy([arrays[position] for position in chosen]), [names[position] for position in chosen]

    def host_mask(self, current: Mapping[str, Any], reference: Mapping[str, Any]) -> np.ndarray:
        """:meth:`mask` for the host: a numpy boolean per layer, in the order of ``current``,
        computed by one jitted function with one device-to-host transfer.

        Raises:
          KeyError: the two flat views do not have the same layers (naming the layer).
          ValueError: a layer's shapes differ.
        """
        if current.keys() != reference.keys():
            check_matching_layers(current, reference)  # raises, naming the layer
        # Shapes are checked by drift_norms while the mask function traces: a mismatch
        # changes the jit cache key, so it is always traced, and raises, before use.
        names = tuple(current)
        mask = self._mask_vector(names, list(current.values()), [reference[name] for name in names])
        return np.asarray(mask)

    def _mask_vector(self, names: tuple[str, ...], current: list[Any], initial: list[Any]) -> jax.Array:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class ThresholdRule(_LayerSelectionRule):
    """Sends the layers whose drift is ``> norm_threshold`` (``<=`` when not ``select_drift_more``)."""

    norm_threshold: float
    measure: str = "l2/size"
    select_drift_more: bool = True

    def __post_init__(self) -> None:
        validate_norm_threshold(self.norm_threshold)
        resolve_measure(self.measure)

    def argument(self, layers: Mapping[str, Any]) -> np.ndarray:
        """The threshold's float32 floor: compared in float32, it gives the exact comparison."""
        return _threshold_argument(self.norm_threshold)

    def mask_at(self, current: Mapping[str, Any], reference: Mapping[str, Any], argument: Any) -> FlatView:
        norms = drift_norms(current, reference, measure=self.measure)
        return threshold_mask(norms, argument, select_drift_more=self.select_drift_more)

    def _mask_vector(self, names: tuple[str, ...], current: list[Any], initial: list[Any]) -> jax.Array:
        return cast(
            jax.Array,
            _threshold_mask_vector(
                names,
                current,
                initial,
                self.argument({}),
                measure=self.measure,
                select_drift_more=self.select_drift_more,
            ),
        )


@dataclasses.dataclass(frozen=True)
class PercentageRule(_LayerSelectionRule):
    """Sends the ``ceil(N * exchange_percentage)`` layers that drifted most (least when not
    ``select_drift_more``)."""

    exchange_percentage: float
    measure: str = "l2/size"
    select_drift_more: bool = True

    def __post_init__(self) -> None:
        validate_exchange_percentage(self.exchange_percentage)
        resolve_measure(self.measure)

    def argument(self, layers: Mapping[str, Any]) -> np.ndarray:
        """The number of layers sent, ``ceil(N * exchange_percentage)`` (int32)."""
        return np.asarray(num_layers_to_exchange(len(layers), self.exchange_percentage), np.int32)

    def mask_at(self, current: Mapping[str, Any], reference: Mapping[str, Any], argument: Any) -> FlatView:
        norms = drift_norms(current, reference, measure=self.measure)
        return percentage_mask_at(norms, argument, select_drift_more=self.select_drift_more)

    def _mask_vector(self, names: tuple[str, ...], current: list[Any], initial: list[Any]) -> jax.Array:
        return cast(
            jax.Array,
            _percentage_mask_vector(
                names,
                current,
                initial,
                self.argument(dict.fromkeys(names)),
                measure=self.measure,
                select_drift_more=self.select_drift_more,
            ),
        )


@dataclasses.dataclass(frozen=True)
class BudgetRule(_LayerSelectionRule):
    """Sends the layers that moved most per byte, up to ``byte_fraction`` of the model's bytes."""

    byte_fraction: float

    def __post_init__(self) -> None:
        validate_byte_fraction(self.byte_fraction)

    def argument(self, layers: Mapping[str, Any]) -> np.ndarray:
        """The capacity in units of the layers' sizes' greatest common divisor (:func:`budget_capacity`)."""
        return np.asarray(budget_capacity(layers, self.byte_fraction), jax.dtypes.canonicalize_dtype(jnp.int64))

    def mask_at(self, current: Mapping[str, Any], reference: Mapping[str, Any], argument: Any) -> FlatView:
        return budget_mask_at(current, reference, argument)

    def _mask_vector(self, names: tuple[str, ...], current: list[Any], initial: list[Any]) -> jax.Array:
        capacity = self.argument(_named(names, current))
        return cast(jax.Array, _budget_mask_vector(names, current, initial, capacity))


def select_layers_by_threshold(
    norm_threshold: float, normalize: bool, select_drift_more: bool, model: Any, initial_model: Any
) -> tuple[NDArrays, list[str]]:
    """Layers of ``model`` whose drift from ``initial_model`` passes ``norm_threshold``
    (fl4health's function); see :class:`ThresholdRule`."""
    return ThresholdRule(norm_threshold, resolve_measure(None, normalize), bool(select_drift_more))(
        model, initial_model
    )


def select_layers_by_percentage(
    exchange_percentage: float, normalize: bool, select_drift_more: bool, model: Any, initial_model: Any
) -> tuple[NDArrays, list[str]]:
    """The ``ceil(N * exchange_percentage)`` layers of ``model`` that drifted most (or least)
    (fl4health's function); see :class:`PercentageRule`."""
    rule = PercentageRule(exchange_percentage, resolve_measure(None, normalize), bool(select_drift_more))
    return rule(model, initial_model)


class LayerSelectionFunctionConstructor:
    """Builds drift-based layer selection rules for :class:`jaxlayerx.DynamicLayerExchanger`.

    Args:
      norm_threshold: threshold on the drift, ``> 0``.
      exchange_percentage: fraction of layers to select, in ``(0, 1]``.
      normalize: fl4health's measure switch: drift divided by the layer's number of
        elements (``"l2/size"``) when true, plain L2 (``"l2"``) when false. Used only when
        ``measure`` is not given.
      select_drift_more: select large drifts (else small ones).
      measure: the drift measure, one of :data:`MEASURES`; replaces ``normalize``.

    Raises:
      ValueError: a value out of range, an unknown measure. TypeError: a value that is not
        a real number.
    """

    def __init__(
        self,
        norm_threshold: float,
        exchange_percentage: float,
        normalize: bool = True,
        select_drift_more: bool = True,
        *,
        measure: str | None = None,
    ) -> None:
        validate_norm_threshold(norm_threshold)
        validate_exchange_percentage(exchange_percentage)
        self.norm_threshold = norm_threshold
        self.exchange_percentage = exchange_percentage
        self.normalize = bool(normalize)
        self.select_drift_more = bool(select_drift_more)
        resolve_measure(measure)
        self._measure = measure

    @property
    def measure(self) -> str:
        """The drift measure of the rules built next: the one given, else fl4health's for
        ``normalize`` as it is now (changing ``normalize`` later takes effect, as in fl4health)."""
        return resolve_measure(self._measure, self.normalize)

    @measure.setter
    def measure(self, measure: str | None) -> None:
        resolve_measure(measure)
        self._measure = measure

    def select_by_threshold(self) -> ThresholdRule:
        """The threshold rule: callable as ``(model, initial_model) -> (arrays, names)``."""
        return ThresholdRule(self.norm_threshold, self.measure, self.select_drift_more)

    def select_by_percentage(self) -> PercentageRule:
        """The percentage rule: callable as ``(model, initial_model) -> (arrays, names)``."""
        return PercentageRule(self.exchange_percentage, self.measure, self.select_drift_more)

    def select_by_budget(self, byte_fraction: float) -> BudgetRule:
        """The budget rule: at most ``byte_fraction`` of the model's bytes, the layers that
        moved most per byte first (see the module docstring).

        Raises:
          ValueError: ``byte_fraction`` outside ``(0, 1]``, or ``select_drift_more=False``
            (the budget always spends its bytes on the layers that moved most).
        """
        if not self.select_drift_more:
            raise ValueError(
                "select_by_budget sends the layers that moved most per byte; it has no form for select_drift_more=False"
            )
        return BudgetRule(byte_fraction)


# The jitted mask functions take the layer names (static) and two lists of arrays: a
# list dispatches about twice as fast as an OrderedDict of the same arrays.


@functools.partial(jax.jit, static_argnames=("names", "measure", "select_drift_more"))  # pyright: ignore[reportUnknownMemberType]
def _threshold_mask_vector(
    names: tuple[str, ...],
    current: list[Any],
    initial: list[Any],
    threshold: jax.Array,
    *,
    measure: str,
    select_drift_more: bool,
) -> jax.Array:
    norms = drift_norms(_named(names, current), _named(names, initial), measure=measure)
    return _stack(threshold_mask(norms, threshold, select_drift_more=select_drift_more))


@functools.partial(jax.jit, static_argnames=("names", "measure", "select_drift_more"))  # pyright: ignore[reportUnknownMemberType]
def _percentage_mask_vector(
    names: tuple[str, ...],
    current: list[Any],
    initial: list[Any],
    count: jax.Array,
    *,
    measure: str,
    select_drift_more: bool,
) -> jax.Array:
    norms = drift_norms(_named(names, current), _named(names, initial), measure=measure)
    return _stack(percentage_mask_at(norms, count, select_drift_more=select_drift_more))


@functools.partial(jax.jit, static_argnames=("names",))  # pyright: ignore[reportUnknownMemberType]
def _budget_mask_vector(
    names: tuple[str, ...], current: list[Any], initial: list[Any], capacity: jax.Array
) -> jax.Array:
    return _stack(budget_mask_at(_named(names, current), _named(names, initial), capacity))


def _named(names: tuple[str, ...], arrays: list[Any]) -> FlatView:
    return collections.OrderedDict(zip(names, arrays))


def _stack(mask: Mapping[str, jax.Array]) -> jax.Array:
    return jnp.stack(list(mask.values())) if mask else jnp.zeros((0,), dtype=bool)


@functools.lru_cache(maxsize=64)
def _threshold_argument(norm_threshold: float) -> np.ndarray:
    """The jitted threshold mask's argument for a threshold: its float32 floor as a
    read-only numpy scalar array (computed once per value)."""
    threshold = np.asarray(_float32_floor(norm_threshold), np.float32)
    threshold.flags.writeable = False
    return threshold


def _float32_floor(threshold: Any) -> Any:
    """The largest float32 <= a Python number; arrays pass through.

    For a float32 ``x`` and a real ``t``, ``x > t`` exactly when ``x > floor32(t)``, so
    comparing in float32 against this value gives the exact real-number comparison.
    """
    if not isinstance(threshold, numbers.Real):
        return threshold
    exact = _exact(threshold)
    floor = np.float32(float(threshold))
    if np.isinf(floor):  # beyond float32's range: compare against its largest finite value
        return floor if floor < 0 else np.finfo(np.float32).max
    while _exact(floor) > exact:
        floor = np.nextafter(floor, np.float32(-np.inf))
    return floor


def _exact(value: _Real) -> fractions.Fraction:
    """The exact rational value of a real number: ints and fractions as they are, floats bit
    for bit."""
    if isinstance(value, numbers.Rational):
        return fractions.Fraction(int(value.numerator), int(value.denominator))
    return fractions.Fraction(float(value))


def _validate_real(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a real number, got {value!r}")


def validate_norm_threshold(norm_threshold: Any) -> None:
    """Raises ``TypeError`` unless a real number, ``ValueError`` unless ``> 0``."""
    _validate_real(norm_threshold, "norm_threshold")
    if not norm_threshold > 0:
        raise ValueError(f"norm_threshold must be > 0, got {norm_threshold}")


def validate_exchange_percentage(exchange_percentage: Any) -> None:
    """Raises ``TypeError`` unless a real number, ``ValueError`` unless in ``(0, 1]``."""
    _validate_real(exchange_percentage, "exchange_percentage")
    if not 0 < exchange_percentage <= 1:
        raise ValueError(f"exchange_percentage must be in (0, 1], got {exchange_percentage}")


def validate_byte_fraction(byte_fraction: Any) -> None:
    """Raises ``TypeError`` unless a real number, ``ValueError`` unless in ``(0, 1]``."""
    _validate_real(byte_fraction, "byte_fraction")
    if not 0 < byte_fraction <= 1:
        raise ValueError(f"byte_fraction must be in (0, 1], got {byte_fraction}")
