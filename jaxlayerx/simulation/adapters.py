"""A Flax model seen by the simulation: pure functions over flat views.

The simulation trains, evaluates and exchanges flat views (``name -> array``, see
:func:`jaxlayerx.flatten`); a :class:`ModelAdapter` turns one back into a model to call it.

* Linen: ``module(x, train=bool)``; the layers are every collection of its variables
  (``params/...``, ``batch_stats/...``), the trainable ones those of ``params``.
* NNX: ``module(x)``, switched between ``module.train()`` and ``module.eval()``; the layers
  are the variables ``nnx_filter`` selects (default: everything ``nnx.state`` holds but RNG
  state, :data:`jaxlayerx.DEFAULT_NNX_FILTER`), the trainable ones its ``nnx.Param``
  variables. The other variables (RNG state; BatchNorm statistics under
  ``nnx_filter=nnx.Param``) keep the values they had when the simulation started, so a
  dropout layer draws the same masks every step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, TypeAlias, cast

import flax.linen as nn
import jax
from flax import nnx

from jaxlayerx.base import FlatView
from jaxlayerx.tree import DEFAULT_NNX_FILTER, flatten, unflatten

#: What ``nnx.split(model, filter, ...)`` returns (flax leaves the states' types unknown).
_Split: TypeAlias = "tuple[nnx.GraphDef[Any], nnx.State[Any, Any], nnx.State[Any, Any]]"


class ModelAdapter:
    """A Linen module or an ``nnx.Module`` as pure functions over flat views.

    Args:
      model: a Linen module (initialised here on ``example`` with ``key``) or an
        ``nnx.Module`` (its current state is the initial model).
      example: one batch of inputs, ``(batch, *feature_shape)``.
      key: the Linen initialisation key.
      nnx_filter: which NNX variables are layers.

    Attributes:
      initial_layers: the initial model's flat view.
      trainable: the names of the layers gradient descent updates, in flatten order.
      template: the abstract model (Linen variables or ``nnx.State`` of
        ``jax.ShapeDtypeStruct``) that flat views unflatten into.
    """

    def __init__(
        self,
        model: nn.Module | nnx.Module,
        example: jax.Array,
        key: jax.Array,
        nnx_filter: nnx.filterlib.Filter = DEFAULT_NNX_FILTER,
    ) -> None:
        self.nnx_filter = nnx_filter
        if isinstance(model, nnx.Module):
            self._nnx = True
            self._graphs = {mode: _nnx_graph(model, mode, nnx_filter) for mode in (True, False)}
            _, state, self._rest = cast(_Split, nnx.split(model, nnx_filter, ...))  # pyright: ignore[reportUnknownMemberType]
            self.template = jax.eval_shape(lambda: state)  # pyright: ignore[reportUnknownMemberType]
            self.initial_layers = flatten(state, nnx_filter=nnx_filter)
            trainable = set(flatten(model, nnx_filter=nnx.Param))
        elif isinstance(cast(object, model), nn.Module):
            self._nnx = False
            self._module = model
            variables = _jitted_init(model, key, example)
            self.template = jax.eval_shape(lambda: variables)  # pyright: ignore[reportUnknownMemberType]
            self.initial_layers = flatten(variables)
            trainable = {name for name in self.initial_layers if name.startswith("params/")}
        else:
            raise TypeError(f"the simulation takes a Linen module or an nnx.Module, got {type(model).__name__}")
        self.trainable = [name for name in self.initial_layers if name in trainable]

    def apply(self, layers: FlatView, x: jax.Array, train: bool) -> tuple[jax.Array, FlatView]:
        """The logits of ``x``, and the layers as the call left them (BatchNorm statistics
        move in training); pure."""
        if self._nnx:
            same: Callable[[Any], Any] = lambda value: value
            rest = jax.tree.map(same, self._rest)  # fresh variables, in this trace
            model = nnx.merge(
                self._graphs[train], unflatten(layers, like=self.template, nnx_filter=self.nnx_filter), rest
            )
            logits = model(x)
            state = nnx.state(model, self.nnx_filter)  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
            return logits, flatten(state, nnx_filter=self.nnx_filter)
        variables = unflatten(layers, like=self.template)
        if not train:
            return cast(jax.Array, self._module.apply(variables, x, train=False)), layers  # pyright: ignore[reportUnknownMemberType]
        mutable = [collection for collection in variables if collection != "params"]
        if not mutable:
            return cast(jax.Array, self._module.apply(variables, x, train=True)), layers  # pyright: ignore[reportUnknownMemberType]
        applied = self._module.apply(variables, x, train=True, mutable=mutable)  # pyright: ignore[reportUnknownMemberType]
        logits, updates = cast("tuple[jax.Array, Mapping[str, Any]]", applied)
        moved = flatten({"params": variables["params"], **updates})
        return logits, FlatView((name, moved[name]) for name in layers)


def _jitted_init(module: nn.Module, key: jax.Array, example: jax.Array) -> Any:
    """``module.init(key, example, train=False)`` as one compiled computation (the same
    values as the eager call, without one dispatch and one compilation per operation)."""

    try:
        init = _init_program(module)
    except TypeError:  # a module with an unhashable field: its own program
        init = _init_program.__wrapped__(module)
    try:
        return init(key, example)
    except TypeError as error:
        if "train" not in str(error):
            raise
        raise TypeError(
            f"the simulation calls a Linen module as module(inputs, train=bool) (BatchNorm and Dropout "
            f"switch on it): give {type(module).__name__}.__call__ a train argument, e.g. "
            f"`def __call__(self, x, train=False)`; Flax said: {error}"
        ) from error


@functools.lru_cache(maxsize=16)
def _init_program(module: nn.Module) -> Callable[[jax.Array, jax.Array], Any]:
    """The jitted ``module.init``, one per module (equal modules share it, and every
    simulation of that module reuses its compilation)."""

    def init(key: jax.Array, example: jax.Array) -> Any:
        return module.init(key, example, train=False)  # pyright: ignore[reportUnknownMemberType]

    return jax.jit(init)  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]


def _nnx_graph(model: nnx.Module, train: bool, nnx_filter: nnx.filterlib.Filter) -> Any:
    """The graph of ``model`` in training or evaluation mode (BatchNorm, Dropout)."""
    copy = nnx.clone(model)
    copy.train() if train else copy.eval()  # pyright: ignore[reportUnknownMemberType]
    graph, _, _ = cast(_Split, nnx.split(copy, nnx_filter, ...))  # pyright: ignore[reportUnknownMemberType]
    return graph
