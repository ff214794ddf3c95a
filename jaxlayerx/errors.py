"""Error types and message helpers shared by the whole package."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UnknownLayerError(KeyError):
    """A layer name that the model does not have.

    A ``KeyError`` whose message is printed as written (``KeyError`` normally
    prints the repr of its argument) and names the closest valid layers.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def closest_names(name: str, valid: Iterable[str], n: int = 3) -> list[str]:
    """Returns up to ``n`` names from ``valid`` that look most like ``name``."""
    valid = list(valid)
    close = difflib.get_close_matches(name, valid, n=n, cutoff=0.4)
    return close or valid[:n]


def unknown_layer(name: str, valid: Iterable[str], what: str = "the model") -> UnknownLayerError:
    """Builds the error for a layer ``name`` missing from ``valid``."""
    suggestions = ", ".join(repr(s) for s in closest_names(name, valid))
    return UnknownLayerError(
        f"layer {name!r} is not in {what}; closest valid layers: {suggestions or '(none)'}"
    )
