"""Shared types, and the exchanger interface every exchanger satisfies.

An *exchanger* decides what a client sends and how it applies what it receives. It is
anything with these members (a :class:`typing.Protocol`: no inheritance needed, though
:class:`jaxlayerx.ExchangerBase` writes all but ``send_mask`` for you):

* ``send_mask(current, reference) -> name -> bool``: what a client whose flat view is
  ``current`` sends, drift measured against the flat view ``reference``. Pure, fixed
  shapes: it runs inside ``jax.jit`` and ``jax.vmap``. A scalar per layer for layer
  exchangers, an array of the layer's shape for sparse ones;
* ``payload_kind``: how it selects and how fl4health names what it sends (:data:`PayloadKind`);
* ``error_feedback``: whether drift is measured against the values last pulled (the
  state's reference) rather than the round's ``initial_model``;
* ``quantize``: ``None``, ``"bf16"`` or ``"int8"``: how its uploads' values are coded
  (:mod:`jaxlayerx.quantize`);
* ``init_state() -> ExchangeState``, ``push(model, state, initial_model) -> (payload,
  state)`` and ``pull(payload, model, state, first=False) -> (model, state)``: the
  exchange itself, its state (:class:`jaxlayerx.ExchangeState`) passed in and returned,
  optax-style, and payloads in the wire-neutral form of :mod:`jaxlayerx.payload`.

The simulation and the Flower adapters use nothing else, so a rule written once runs in
both. :func:`check_exchanger` says what a candidate lacks.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeAlias, TypeVar, runtime_checkable

import jax
import numpy as np

if TYPE_CHECKING:
    from jaxlayerx.payload import Payload
    from jaxlayerx.quantize import Quantize
    from jaxlayerx.state import ExchangeState

#: A model: Linen variables, an ``nnx.Module``, an ``nnx.State``, or any pytree of arrays.
Model = TypeVar("Model")

#: A flat view of a model: ``name -> array`` in flatten order (see :func:`jaxlayerx.flatten`).
#: At runtime the plain ``collections.OrderedDict`` class (so ``FlatView(...)`` builds one);
#: for type checkers ``OrderedDict[str, Any]``.
if TYPE_CHECKING:
    FlatView: TypeAlias = collections.OrderedDict[str, Any]
else:
    FlatView = collections.OrderedDict

#: Flower-style payload: a list of numpy arrays.
NDArrays = list[np.ndarray]

#: A round's configuration, as Flower passes it (``name -> bool | bytes | float | int | str``).
Config = Mapping[str, Any]

#: fl4health's selection function: ``(model, initial_model) -> (arrays, names)``.
LayerSelectionFunction = Callable[[Any, Any], tuple[NDArrays, list[str]]]

#: ``(model, initial_model) -> name -> float32 scores of the layer's shape``.
ScoreGenFunction = Callable[[Any, Any], Mapping[str, jax.Array]]

#: How a payload names what it holds:
#:
#: * ``"positional"``: the layers only, without names (fl4health's full, fixed and
#:   exclusions exchangers): those whose ``send_mask`` is set, in the order of the mask's
#:   keys. Which layers is fixed: the mask does not depend on the values;
#: * ``"named"``: the chosen layers followed by their names (:func:`jaxlayerx.pack_layers`);
#: * ``"sparse"``: chosen weights in COO form (:func:`jaxlayerx.pack_coo`).
PayloadKind = Literal["positional", "named", "sparse"]

PAYLOAD_KINDS: tuple[str, ...] = ("positional", "named", "sparse")


@runtime_checkable
class Exchanger(Protocol):
    """What every exchanger provides (see the module docstring)."""

    payload_kind: PayloadKind
    error_feedback: bool
    quantize: Quantize | None

    def send_mask(self, current: Mapping[str, Any], reference: Mapping[str, Any]) -> Mapping[str, Any]:
        """``name -> bool`` (scalar, or of the layer's shape): what ``current`` sends; pure."""
        ...

    def init_state(self) -> ExchangeState:
        """The state before the first pull."""
        ...

    def push(self, model: Any, state: ExchangeState, initial_model: Any = None) -> tuple[Payload, ExchangeState]:
        """The payload a client sends for ``model``, and the state after sending it."""
        ...

    def pull(
        self, payload: Payload, model: Any, state: ExchangeState, *, first: bool = False
    ) -> tuple[Any, ExchangeState]:
        """``model`` with ``payload`` applied (checked whole first), and the state after it."""
        ...


@runtime_checkable
class MaskedSelectionFunction(Protocol):
    """A layer selection function that also has its pure mask form.

    Called as fl4health's ``(model, initial_model) -> (arrays, names)``; ``mask(current,
    reference)`` gives the same choice as ``name -> bool`` scalars inside ``jax.jit`` and
    ``jax.vmap``. The rules built by :class:`jaxlayerx.LayerSelectionFunctionConstructor`
    are such functions.
    """

    def __call__(self, model: Any, initial_model: Any) -> tuple[NDArrays, list[str]]: ...

    def mask(self, current: Mapping[str, Any], reference: Mapping[str, Any]) -> Mapping[str, Any]: ...


def check_exchanger(exchanger: Any) -> None:
    """Raises ``TypeError`` unless ``exchanger`` satisfies :class:`Exchanger`, naming what is missing."""
    what = type(exchanger).__name__
    for method in ("send_mask", "init_state", "push", "pull"):
        if not callable(getattr(exchanger, method, None)):
            raise TypeError(
                f"an exchanger needs a {method} method; {what} has none (see jaxlayerx.Exchanger, or "
                "subclass jaxlayerx.ExchangerBase and write send_mask)"
            )
    kind = getattr(exchanger, "payload_kind", None)
    if kind not in PAYLOAD_KINDS:
        raise TypeError(
            f"an exchanger's payload_kind must be one of {', '.join(map(repr, PAYLOAD_KINDS))}; {what} has {kind!r}"
        )
    feedback = getattr(exchanger, "error_feedback", None)
    if not isinstance(feedback, bool):
        raise TypeError(f"an exchanger's error_feedback must be True or False; {what} has {feedback!r}")
    if not hasattr(exchanger, "quantize"):
        raise TypeError(f"an exchanger needs a quantize attribute (None, 'bf16' or 'int8'); {what} has none")
    quantize = exchanger.quantize
    if quantize not in (None, "bf16", "int8"):
        raise TypeError(f"an exchanger's quantize must be None, 'bf16' or 'int8'; {what} has {quantize!r}")
