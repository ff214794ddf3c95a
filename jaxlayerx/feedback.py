"""Error feedback: drift measured against the last values a client pulled.

Without it, a client measures drift from the round's ``initial_model``, so a layer (or a
weight) that moves a little every round but never enough to be chosen is never sent: its
movement is lost each round. With it, the exchanger remembers, per layer (per weight for
sparse exchange), the last value the server holds for this client, which is what the
client last pulled, and measures drift from there. What was not sent keeps accumulating
until it is sent (the residual accumulation of DGC, Aji & Heafield 2017, and STC).

The state is a flat view, ``reference``: ``name -> numpy array``, the value each pulled
layer had right after its last pull. A layer never pulled falls back to ``initial_model``.
For sparse exchange, a pull writes the pulled weights into the reference; a layer whose
first pull is partial starts its reference from the whole layer as it stands after that
pull (its other weights at the client's own values then). Save it with
``numpy.savez(path, **exchanger.reference)`` and restore it by assigning
``exchanger.reference = dict(numpy.load(path))``.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping
from typing import Any, cast

import numpy as np

from jaxlayerx._host import to_numpy
from jaxlayerx.base import FlatView
from jaxlayerx.dtypes import conform_dtype
from jaxlayerx.tree import is_array_leaf


class ErrorFeedback:
    """The opt-in error-feedback state shared by the dynamic and sparse exchangers.

    Attributes:
      error_feedback: whether drift is measured against ``reference``.
      reference: ``name -> numpy array``, the last value pulled of each layer.
    """

    def __init__(self, error_feedback: bool) -> None:
        if not isinstance(cast(object, error_feedback), (bool, np.bool_)):
            raise TypeError(f"error_feedback must be True or False, got {error_feedback!r}")
        self.error_feedback = bool(error_feedback)
        self._reference: FlatView = collections.OrderedDict()

    @property
    def reference(self) -> FlatView:
        """The last values pulled, by layer name (empty until a pull, or when error feedback is off)."""
        return self._reference

    @reference.setter
    def reference(self, layers: Mapping[str, Any]) -> None:
        if not isinstance(cast(object, layers), Mapping) or not all(map(is_array_leaf, layers.values())):
            raise TypeError("a reference is a name -> array mapping (as exchanger.reference holds)")
        self._reference = collections.OrderedDict(
            (str(name), np.array(value, copy=True)) for name, value in zip(layers, to_numpy(layers.values()))
        )

    def drift_reference(self, current: Mapping[str, Any], initial: Mapping[str, Any] | None) -> FlatView | None:
        """What drift is measured against for the flat view ``current``.

        The flat view ``initial`` (the round's ``initial_model``) without error feedback;
        with it, the reference of every layer pulled before and ``initial``'s layer for the
        others. ``None`` when there is nothing to measure against: no ``initial`` and nothing
        pulled yet.

        Raises:
          ValueError: error feedback has pulled values for some layers but not all, and no
            ``initial`` for the others.
        """
        if not self.error_feedback or (initial is None and not self._reference):
            return None if initial is None else collections.OrderedDict(initial)
        missing = [name for name in current if name not in self._reference]
        if missing and initial is None:
            raise ValueError(
                f"error feedback has no pulled value for {len(missing)} layer(s), for example "
                f"{missing[0]!r}, and no initial_model to fall back on: pass initial_model=..."
            )
        return collections.OrderedDict(
            # initial is not None here: a layer with no pulled value raised above without it
            (name, self._pulled(name, layer) if name in self._reference else cast(Mapping[str, Any], initial)[name])
            for name, layer in current.items()
        )

    def _pulled(self, name: str, layer: Any) -> np.ndarray:
        """The reference of ``name`` in the dtype of ``layer``: a restored bfloat16 reference
        comes back from ``numpy.load`` or Flower as raw ``|V2`` bytes."""
        return conform_dtype(name, self._reference[name], layer.dtype)

    def record_pull(self, pulled: Mapping[str, Any], names: Iterable[str]) -> None:
        """Remembers the layers ``names`` of the flat view ``pulled`` (the model after a pull)."""
        if self.error_feedback:
            self._reference.update(_copies(pulled, names))

    def record_sparse_pull(self, pulled: Mapping[str, Any], flat_indices: Mapping[str, np.ndarray]) -> None:
        """Remembers, per layer, the weights at row-major ``flat_indices`` of the flat view ``pulled``."""
        if not self.error_feedback:
            return
        for name, layer in _copies(pulled, flat_indices).items():
            if name in self._reference:
                entries = flat_indices[name]
                self._reference[name].reshape(-1)[entries] = layer.reshape(-1)[entries]
            else:
                self._reference[name] = layer


def _copies(flat: Mapping[str, Any], names: Iterable[str]) -> dict[str, np.ndarray]:
    names = list(names)
    return {name: np.array(array, copy=True) for name, array in zip(names, to_numpy(flat[name] for name in names))}
