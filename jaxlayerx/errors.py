"""Error types and message helpers shared by the whole package."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.core
from flax import nnx


class UnknownLayerError(KeyError):
    """A layer name that the model does not have.

    A ``KeyError`` whose message is printed as written (``KeyError`` normally
    prints the repr of its argument) and names the closest valid layers.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


#: Torch and Keras leaf names with their Flax spellings, for suggestions.
_FLAX_SPELLINGS = {
    "weight": ("kernel", "scale", "embedding"),
    "running_mean": ("mean",),
    "running_var": ("var",),
    "moving_mean": ("mean",),
    "moving_variance": ("var",),
    "gamma": ("scale",),
    "beta": ("bias",),
}


def closest_names(name: str, valid: Iterable[str], n: int = 3) -> list[str]:
    """Returns up to ``n`` names from ``valid`` that look most like ``name``.

    A torch-style name is read the Flax way too: dots as separators, ``weight`` as
    ``kernel`` or ``scale``, ``running_mean`` as ``mean``; ``fc.weight`` finds
    ``params/fc/kernel``. With nothing close, the first ``n`` valid names.
    """
    valid = list(valid)
    spellings = _spellings(name)
    score = {
        candidate: max(difflib.SequenceMatcher(None, spelling, candidate).ratio() for spelling in spellings)
        for candidate in valid
    }
    close = [candidate for candidate in sorted(valid, key=lambda c: -score[c]) if score[candidate] >= 0.4]
    return close[:n] or valid[:n]


def _spellings(name: str) -> list[str]:
    """``name``, with dots as separators, and with its last part in Flax's words."""
    parts = re.split(r"[./]", name)
    spellings = [name, "/".join(parts)]
    spellings += ["/".join([*parts[:-1], flax]) for flax in _FLAX_SPELLINGS.get(parts[-1], ())]
    return list(dict.fromkeys(spellings))


def unknown_layer(name: str, valid: Iterable[str], what: str = "the model") -> UnknownLayerError:
    """Builds the error for a layer ``name`` missing from ``valid``."""
    suggestions = ", ".join(repr(s) for s in closest_names(name, valid))
    return UnknownLayerError(f"layer {name!r} is not in {what}; closest valid layers: {suggestions or '(none)'}")


def check_same_layers(values: Mapping[str, Any], layers: Mapping[str, Any], *, extra: str, missing: str) -> None:
    """Checks that ``values`` (what a user's function returned) names exactly the layers of
    ``layers``.

    Raises:
      UnknownLayerError: a name not in ``layers`` (``extra`` says where it is missing:
        "the model (a score names it)"), or a layer missing from ``values`` (``missing``
        says from what: "the scores").
    """
    for name in values:
        if name not in layers:
            raise unknown_layer(name, layers, what=extra)
    for name in layers:
        if name not in values:
            raise unknown_layer(name, values, what=missing)


def unmatched_pattern(pattern: str, valid: Iterable[str], limit: int = 20) -> UnknownLayerError:
    """Builds the error for a glob ``pattern`` that matches none of the layers ``valid``,
    listing them (the first ``limit`` and a count of the others)."""
    valid = list(valid)
    listed = ", ".join(repr(name) for name in valid[:limit]) or "(none)"
    more = f" and {len(valid) - limit} more" if len(valid) > limit else ""
    return UnknownLayerError(f"pattern {pattern!r} matched no layer; the {len(valid)} layers: {listed}{more}")


def traced_on_host(what: str, argument: str) -> TypeError:
    """Builds the error for the host method ``what`` given a traced ``argument``."""
    method = what.rsplit(".", 1)[-1]
    return TypeError(
        f"{what} runs on the host (it builds numpy payloads), but its {argument} holds traced values: it was "
        "called inside jax.jit, jax.vmap or jax.grad. Under a transformation, use the jit/vmap-able forms: the "
        "exchanger's send_mask(current, reference) for what is sent, a selection rule's mask(current, reference), "
        f"and jaxlayerx.masked_fedavg to average; or call {method} outside the transformation"
    )


def reject_traced(what: str, **trees: Any) -> None:
    """Raises :func:`traced_on_host`'s error, naming the argument, when a leaf of one of
    ``trees`` (keyword arguments of the host method ``what``) is a JAX tracer.

    Raises:
      TypeError: a traced leaf (the method was called inside ``jax.jit``, ``jax.vmap``...).
    """
    for argument, tree in trees.items():
        if _holds_tracer(tree):
            raise traced_on_host(what, argument)


def _holds_tracer(tree: Any) -> bool:
    """Whether a leaf of ``tree``, or of an NNX module in it that is no pytree, is a tracer."""
    for leaf in jax.tree_util.tree_leaves(tree):
        if isinstance(leaf, jax.core.Tracer):
            return True
        if isinstance(leaf, nnx.Module) and _holds_tracer(nnx.state(leaf)):  # pyright: ignore[reportUnknownMemberType]
            return True
    return False
