"""Error types and message helpers shared by the whole package."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable


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
