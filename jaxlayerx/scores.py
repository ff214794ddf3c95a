"""Per-weight scores for sparse exchange (the super-mask criteria that fl4health ships).

A score function maps ``(model, initial_model)`` to ``name -> float32 array of the layer's
shape``; :class:`jaxlayerx.SparseCooParameterExchanger` keeps the weights of highest score.
Both arguments may be models (anything :func:`jaxlayerx.flatten` takes) or flat views
(``name -> array`` mappings, as inside ``jax.jit``/``jax.vmap``); the result is an ordered
dict in the order of ``model``. Scores are computed in float32 by one jitted function.

================================  =================================
function                          score of a weight ``w`` (start ``w0``)
================================  =================================
largest_final_magnitude_scores    ``|w|``
smallest_final_magnitude_scores   ``-|w|``
largest_magnitude_change_scores   ``|w - w0|``
smallest_magnitude_change_scores  ``-|w - w0|``
largest_increase_in_magnitude     ``|w| - |w0|``
smallest_increase_in_magnitude    ``|w0| - |w|``
================================  =================================
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, cast

import jax
import jax.numpy as jnp

from jaxlayerx.base import FlatView, ScoreGenFunction
from jaxlayerx.tree import as_flat_view, check_matching_layers


def largest_final_magnitude_scores(model: Any, initial_model: Any = None) -> FlatView:
    """``|w|``: keeps the largest weights (``initial_model`` is not used)."""
    return cast(FlatView, _final_magnitude(as_flat_view(model), negate=False))


def smallest_final_magnitude_scores(model: Any, initial_model: Any = None) -> FlatView:
    """``-|w|``: keeps the smallest weights (``initial_model`` is not used)."""
    return cast(FlatView, _final_magnitude(as_flat_view(model), negate=True))


def largest_magnitude_change_scores(model: Any, initial_model: Any) -> FlatView:
    """``|w - w0|``: keeps the weights that moved most."""
    return cast(FlatView, _change(*_flat_pair(model, initial_model, "largest_magnitude_change_scores"), negate=False))


def smallest_magnitude_change_scores(model: Any, initial_model: Any) -> FlatView:
    """``-|w - w0|``: keeps the weights that moved least."""
    return cast(FlatView, _change(*_flat_pair(model, initial_model, "smallest_magnitude_change_scores"), negate=True))


def largest_increase_in_magnitude_scores(model: Any, initial_model: Any) -> FlatView:
    """``|w| - |w0|``: keeps the weights whose magnitude grew most."""
    return cast(
        FlatView, _increase(*_flat_pair(model, initial_model, "largest_increase_in_magnitude_scores"), negate=False)
    )


def smallest_increase_in_magnitude_scores(model: Any, initial_model: Any) -> FlatView:
    """``|w0| - |w|``: keeps the weights whose magnitude shrank most."""
    return cast(
        FlatView, _increase(*_flat_pair(model, initial_model, "smallest_increase_in_magnitude_scores"), negate=True)
    )


def score_key(function: ScoreGenFunction) -> str:
    """The name a score function goes by on the command line: its own, without ``_scores``,
    with dashes (``largest_magnitude_change_scores`` is ``largest-magnitude-change``)."""
    return getattr(function, "__name__", repr(function)).removesuffix("_scores").replace("_", "-")


#: The score functions by the names the ``jaxlayerx simulate`` command uses (:func:`score_key`).
SCORE_FUNCTIONS: dict[str, ScoreGenFunction] = {
    score_key(function): function
    for function in (
        largest_final_magnitude_scores,
        smallest_final_magnitude_scores,
        largest_magnitude_change_scores,
        smallest_magnitude_change_scores,
        largest_increase_in_magnitude_scores,
        smallest_increase_in_magnitude_scores,
    )
}


def _flat_pair(model: Any, initial_model: Any, function: str) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    if initial_model is None:
        raise ValueError(f"{function} needs initial_model: the model as it was at the start of the round")
    current, initial = as_flat_view(model), as_flat_view(initial_model)
    check_matching_layers(current, initial)
    return current, initial


def _as_float32(value: Any) -> jax.Array:
    return jnp.asarray(value).astype(jnp.float32)


def _signed(score: jax.Array, negate: bool) -> jax.Array:
    return -score if negate else score


@functools.partial(jax.jit, static_argnames="negate")  # pyright: ignore[reportUnknownMemberType]
def _final_magnitude(current: Mapping[str, Any], *, negate: bool) -> FlatView:
    return FlatView((name, _signed(jnp.abs(_as_float32(w)), negate)) for name, w in current.items())


@functools.partial(jax.jit, static_argnames="negate")  # pyright: ignore[reportUnknownMemberType]
def _change(current: Mapping[str, Any], initial: Mapping[str, Any], *, negate: bool) -> FlatView:
    return FlatView(
        (name, _signed(jnp.abs(_as_float32(w) - _as_float32(initial[name])), negate)) for name, w in current.items()
    )


@functools.partial(jax.jit, static_argnames="negate")  # pyright: ignore[reportUnknownMemberType]
def _increase(current: Mapping[str, Any], initial: Mapping[str, Any], *, negate: bool) -> FlatView:
    return FlatView(
        (name, _signed(jnp.abs(_as_float32(w)) - jnp.abs(_as_float32(initial[name])), negate))
        for name, w in current.items()
    )
