"""An exchanger's state between rounds: the server's values as last pulled, and the error
that quantization carries forward. Explicit, optax-style: passed in, returned, never hidden.

:class:`ExchangeState` holds two flat views (``name -> numpy array``):

* ``reference``: every layer as the client last pulled it, which is the server's value of
  it for this client. Kept when the exchanger has error feedback (drift is measured from
  it, so what was not sent keeps accumulating, as in DGC and STC) or quantizes (updates
  are quantized over it). Seeded whole from the first model pulled (or, pushing before any
  pull, from ``initial_model``); afterwards each pull writes exactly the pulled entries, so
  a layer never pulled is never reset.
* ``residual``: with error feedback *and* quantization, what quantization lost of each
  sent entry's update (float32), added to that entry's next update (EF-SGD).

An exchanger without error feedback or quantization keeps an empty state. Save a state
with :meth:`ExchangeState.to_arrays` (``numpy.savez``, a Flower ``ArrayRecord``) and
restore it with :meth:`ExchangeState.from_arrays`, bit for bit. (``numpy.savez`` writes a
bfloat16 reference as raw ``|V2`` bytes; it takes its layer's dtype back the next time the
exchanger pushes or pulls with it.)
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from jaxlayerx._host import to_numpy
from jaxlayerx.base import FlatView
from jaxlayerx.dtypes import conform_dtype
from jaxlayerx.payload import Payload

_REFERENCE = "reference/"
_RESIDUAL = "residual/"


class ExchangeState(NamedTuple):
    """What an exchanger carries from round to round (see the module docstring).

    Attributes:
      reference: ``name -> array``, the server's values as last pulled; empty before the first.
      residual: ``name -> float32 array``, quantization error carried by error feedback.
    """

    reference: FlatView = collections.OrderedDict()
    residual: FlatView = collections.OrderedDict()

    @property
    def seeded(self) -> bool:
        """Whether the reference holds the layers yet."""
        return bool(self.reference)

    def to_arrays(self) -> collections.OrderedDict[str, np.ndarray]:
        """The state as one flat ``key -> array`` mapping (``reference/<layer>``, ``residual/<layer>``)."""
        arrays: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        arrays.update((_REFERENCE + name, value) for name, value in self.reference.items())
        arrays.update((_RESIDUAL + name, value) for name, value in self.residual.items())
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> ExchangeState:
        """The state :meth:`to_arrays` wrote.

        Raises:
          ValueError: a key that is neither a reference nor a residual entry.
        """
        reference: FlatView = collections.OrderedDict()
        residual: FlatView = collections.OrderedDict()
        for key, value in arrays.items():
            if key.startswith(_REFERENCE):
                reference[key.removeprefix(_REFERENCE)] = np.array(value, copy=True)
            elif key.startswith(_RESIDUAL):
                residual[key.removeprefix(_RESIDUAL)] = np.array(value, copy=True, dtype=np.float32)
            else:
                raise ValueError(f"{key!r} is not an exchange state entry (reference/... or residual/...)")
        return cls(reference, residual)


def seed(layers: Mapping[str, Any], *, residual: bool) -> ExchangeState:
    """A state whose reference is a copy of every layer of ``layers`` (and zero residuals)."""
    names = list(layers)
    copies = collections.OrderedDict(
        (name, np.array(array, copy=True)) for name, array in zip(names, to_numpy(layers.values()))
    )
    residuals: FlatView = collections.OrderedDict()
    if residual:
        residuals.update((name, np.zeros(np.shape(array), np.float32)) for name, array in copies.items())
    return ExchangeState(copies, residuals)


def conformed(state: ExchangeState, layers: Mapping[str, Any]) -> ExchangeState:
    """``state`` with each reference in the dtype of its layer in ``layers``: a bfloat16
    reference saved with ``numpy.savez`` or sent through Flower comes back as raw ``|V2``
    bytes, reinterpreted here (:func:`jaxlayerx.dtypes.conform_dtype`)."""
    if all(name not in layers or value.dtype == layers[name].dtype for name, value in state.reference.items()):
        return state
    reference = collections.OrderedDict(
        (name, np.asarray(conform_dtype(name, value, layers[name].dtype)) if name in layers else value)
        for name, value in state.reference.items()
    )
    return ExchangeState(reference, state.residual)


def record_pull(state: ExchangeState, pulled: Mapping[str, Any], payload: Payload) -> ExchangeState:
    """``state`` with the entries ``payload`` carried taken from ``pulled`` (the model after the pull)."""
    reference = collections.OrderedDict(state.reference)
    names = [name for name in payload if name in reference]
    for name, value in zip(names, to_numpy(pulled[name] for name in names)):
        entries = payload[name]
        if entries.dense:
            reference[name] = np.array(value, copy=True)
        else:
            updated = np.array(reference[name], copy=True)
            updated.reshape(-1)[entries.indices] = np.asarray(value).reshape(-1)[entries.indices]
            reference[name] = updated
    return ExchangeState(reference, state.residual)
