"""Shared types, and the exchanger interface every exchanger satisfies.

An *exchanger* decides what a client sends and how it applies what it receives. It is
anything with these members (a :class:`typing.Protocol`: no inheritance needed):

* ``push_parameters(model, initial_model=None, config=None) -> NDArrays``: the payload;
* ``pull_parameters(parameters, model, config=None) -> model``: applies a payload;
* ``send_mask(current, reference) -> name -> bool``: what a client whose flat view is
  ``current`` sends, drift measured against the flat view ``reference``. Pure, fixed
  shapes: it runs inside ``jax.jit`` and ``jax.vmap``. A scalar per layer for layer
  exchangers, an array of the layer's shape for sparse ones;
* ``payload_kind``: how payloads name what they hold (:data:`PayloadKind`);
* ``error_feedback``: whether drift is measured against the last values pulled rather
  than the round's ``initial_model``. When true, the exchanger also has ``reference``: a
  flat view of those values, which the caller may save and restore.

The simulation and the Flower adapters use nothing else, so a rule written once runs in
both. :func:`check_exchanger` says what a candidate lacks.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeAlias, TypeVar, runtime_checkable

import jax
import numpy as np

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

    def push_parameters(self, model: Any, initial_model: Any = None, config: Config | None = None) -> NDArrays:
        """The payload a client sends for ``model`` (drift measured from ``initial_model``)."""
        ...

    def pull_parameters(self, parameters: Sequence[np.ndarray], model: Any, config: Config | None = None) -> Any:
        """``model`` with ``parameters`` applied (validated whole before anything changes)."""
        ...

    def send_mask(self, current: Mapping[str, Any], reference: Mapping[str, Any]) -> Mapping[str, Any]:
        """``name -> bool`` (scalar, or of the layer's shape): what ``current`` sends; pure."""
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
    for method in ("push_parameters", "pull_parameters", "send_mask"):
        if not callable(getattr(exchanger, method, None)):
            raise TypeError(f"an exchanger needs a {method} method; {what} has none (see jaxlayerx.Exchanger)")
    kind = getattr(exchanger, "payload_kind", None)
    if kind not in PAYLOAD_KINDS:
        raise TypeError(
            f"an exchanger's payload_kind must be one of {', '.join(map(repr, PAYLOAD_KINDS))}; {what} has {kind!r}"
        )
    feedback = getattr(exchanger, "error_feedback", None)
    if not isinstance(feedback, bool):
        raise TypeError(f"an exchanger's error_feedback must be True or False; {what} has {feedback!r}")
    if feedback and not isinstance(getattr(exchanger, "reference", None), Mapping):
        raise TypeError(f"{what} has error_feedback=True but no reference mapping (the last values it pulled)")
