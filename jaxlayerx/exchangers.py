"""Parameter exchangers: what a client sends, and how it applies what it receives.

The method names are those of fl4health's ``parameter_exchange`` package. Every exchanger
takes any model kind that :func:`jaxlayerx.flatten` takes. ``push_parameters`` returns
Flower-style ``NDArrays`` (a list of numpy arrays); ``pull_parameters`` returns the updated
model: a new pytree (the one given is never mutated), or the same ``nnx.Module`` updated in
place. A payload is fully validated (names, counts, shapes, dtypes) before anything changes.

Every exchanger satisfies :class:`jaxlayerx.Exchanger`: ``send_mask(current, reference)``
is what it sends, as a pure function of flat views, and ``payload_kind`` says how its
payloads name what they hold.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

import flax.linen as linen
import numpy as np
from flax import nnx

from jaxlayerx._host import to_numpy
from jaxlayerx.base import (
    Config,
    FlatView,
    LayerSelectionFunction,
    MaskedSelectionFunction,
    Model,
    NDArrays,
    PayloadKind,
    ScoreGenFunction,
)
from jaxlayerx.coo import merge_sparse_layers, pack_coo, read_coo, unpack_coo
from jaxlayerx.errors import unknown_layer
from jaxlayerx.feedback import ErrorFeedback
from jaxlayerx.modules import linen_module_types, nnx_module_types, pytree_node_types
from jaxlayerx.packing import pack_layers, unpack_layers
from jaxlayerx.sparse_selection import select_sparse_coo, sparse_masks, validate_sparsity_level
from jaxlayerx.tree import DEFAULT_NNX_FILTER, as_flat_view, check_snapshot, flatten, merge_layers


class _Layers:
    """How an exchanger reads and writes a model's layers: through flat views of the NNX
    variables its ``nnx_filter`` selects (every other leaf of a pytree is always a layer)."""

    nnx_filter: nnx.filterlib.Filter = DEFAULT_NNX_FILTER

    def _flatten(self, model: Any) -> FlatView:
        return flatten(model, nnx_filter=self.nnx_filter)

    def _view(self, model: Any) -> FlatView:
        """A model's flat view, or a flat view (an ordered ``name -> array`` mapping) as it is."""
        return as_flat_view(model, nnx_filter=self.nnx_filter)

    def _merge(self, model: Model, layers: Mapping[str, Any]) -> Model:
        return merge_layers(model, layers, nnx_filter=self.nnx_filter)

    def _filter_layers(self, model: Any, names: Sequence[str]) -> NDArrays:
        flat = self._flatten(model)
        for name in names:
            if name not in flat:
                raise unknown_layer(name, flat)
        return to_numpy(flat[name] for name in names)

    def _pull_positional(self, parameters: Sequence[np.ndarray], names: Sequence[str], model: Model) -> Model:
        if len(parameters) != len(names):
            raise ValueError(f"expected {len(names)} arrays (one per layer to transfer), got {len(parameters)}")
        return self._merge(model, dict(zip(names, parameters)))


class FullParameterExchanger(_Layers):
    """Exchanges every layer, in flatten order, without names.

    Args:
      nnx_filter: which NNX variables are layers (default: all but RNG state).
    """

    payload_kind: PayloadKind = "positional"
    error_feedback = False

    def __init__(self, *, nnx_filter: nnx.filterlib.Filter = DEFAULT_NNX_FILTER) -> None:
        self.nnx_filter = nnx_filter

    def send_mask(self, current: Mapping[str, Any], reference: Mapping[str, Any]) -> FlatView:
        """Every layer: ``True`` for each name of ``current``."""
        return _constant_mask(current, lambda name: True)

    def push_parameters(self, model: Any, initial_model: Any = None, config: Config | None = None) -> NDArrays:
        """All layers of ``model`` as numpy arrays, in flatten order."""
        return to_numpy(self._flatten(model).values())

    def pull_parameters(self, parameters: Sequence[np.ndarray], model: Model, config: Config | None = None) -> Model:
        """Puts ``parameters`` (one array per layer, in flatten order) into ``model``."""
        return self._pull_positional(parameters, list(self._flatten(model)), model)


class FixedLayerExchanger(_Layers):
    """Exchanges a fixed list of layers, in the list's order, without names.

    Args:
      layers_to_transfer: flattened layer names, for example ``["params/Dense_0/kernel"]``.
      nnx_filter: which NNX variables are layers (default: all but RNG state).
    """

    payload_kind: PayloadKind = "positional"
    error_feedback = False

    def __init__(
        self, layers_to_transfer: Sequence[str], *, nnx_filter: nnx.filterlib.Filter = DEFAULT_NNX_FILTER
    ) -> None:
        self.layers_to_transfer = _checked_layer_list(layers_to_transfer)
        self.nnx_filter = nnx_filter

    def send_mask(self, current: Mapping[str, Any], reference: Mapping[str, Any]) -> FlatView:
        """``True`` for the layers to transfer, which come first, in the list's order (the
        order of the payload), then ``False`` for the others.

        Raises:
          KeyError: a layer to transfer is not in ``current`` (lists the closest names).
        """
        for name in self.layers_to_transfer:
            if name not in current:
                raise unknown_layer(name, current)
        chosen = set(self.layers_to_transfer)
        order = [*self.layers_to_transfer, *(name for name in current if name not in chosen)]
        return _constant_mask(order, chosen.__contains__)

    def apply_layer_filter(self, model: Any) -> NDArrays:
        """The layers to transfer of ``model``, as numpy arrays.

        Raises:
          KeyError: a layer to transfer is not in ``model`` (lists the closest names).
        """
        return self._filter_layers(model, self.layers_to_transfer)

    def push_parameters(self, model: Any, initial_model: Any = None, config: Config | None = None) -> NDArrays:
        return self.apply_layer_filter(model)

    def pull_parameters(self, parameters: Sequence[np.ndarray], model: Model, config: Config | None = None) -> Model:
        return self._pull_positional(parameters, self.layers_to_transfer, model)


class LayerExchangerWithExclusions(_Layers):
    """Exchanges every layer except those of modules of excluded types (FedBN and kin).

    A layer belongs to a module when the module's path is a prefix of the layer's path
    (Linen names start with the collection, ``params/`` or ``batch_stats/``, which is
    skipped). A module is excluded when its exact type is in ``module_exclusions``, as in
    fl4health (a subclass of an excluded type is not excluded). A type that never occurs
    in the model is allowed and changes nothing.

    Args:
      model: an ``nnx.Module`` (types from its object graph); a Linen ``nn.Module`` with
        ``example_args``/``example_kwargs`` to trace it abstractly (``jax.eval_shape``;
        push and pull then take its variables dict); or any other pytree, whose internal
        node types are its module types (for example equinox modules).
      module_exclusions: module types whose layers stay local, e.g. ``{nnx.BatchNorm}``.
      nnx_filter: which NNX variables are layers (default: all but RNG state).
      *example_args: example positional inputs for a Linen module's ``init``.
      **example_kwargs: example keyword inputs for a Linen module's ``init``.
    """

    payload_kind: PayloadKind = "positional"
    error_feedback = False

    def __init__(
        self,
        model: Any,
        module_exclusions: Iterable[type],
        *example_args: Any,
        nnx_filter: nnx.filterlib.Filter = DEFAULT_NNX_FILTER,
        **example_kwargs: Any,
    ) -> None:
        self.nnx_filter = nnx_filter
        self.module_exclusions = set(module_exclusions)
        for excluded in self.module_exclusions:
            if not isinstance(cast(object, excluded), type):
                raise TypeError(f"module_exclusions must hold module types, got {excluded!r}")
        self._collection_prefixed = isinstance(model, linen.Module)
        if isinstance(model, linen.Module):
            types, abstract_variables = _traced_module_types(model, example_args, example_kwargs)
            layer_source = abstract_variables
        else:
            if example_args or example_kwargs:
                raise TypeError("example inputs are only used with a Linen module")
            self._check_exclusion_kinds(model)
            types = nnx_module_types(model) if isinstance(model, nnx.Module) else pytree_node_types(model)
            layer_source = model
        self.modules_to_filter: set[str] = {
            "/".join(str(part) for part in path)
            for path, module_type in types.items()
            if path and module_type in self.module_exclusions
        }
        self.layers_to_transfer: list[str] = self.get_layers_to_transfer(layer_source)

    def should_module_be_excluded(self, module: Any) -> bool:
        """Whether ``module`` (an instance, or a type) is of an excluded type."""
        module_type = module if isinstance(module, type) else type(module)
        return module_type in self.module_exclusions

    def should_layer_be_excluded(self, layer_name: str) -> bool:
        """Whether ``layer_name`` belongs to an excluded module."""
        parts = layer_name.split("/")
        if self._collection_prefixed:
            parts = parts[1:]
        return any("/".join(parts[:end]) in self.modules_to_filter for end in range(1, len(parts)))

    def get_layers_to_transfer(self, model: Any) -> list[str]:
        """Names of the layers of ``model`` that are not excluded, in flatten order."""
        return [name for name in self._flatten(model) if not self.should_layer_be_excluded(name)]

    def send_mask(self, current: Mapping[str, Any], reference: Mapping[str, Any]) -> FlatView:
        """``True`` for the layers of ``current`` that are not excluded."""
        return _constant_mask(current, lambda name: not self.should_layer_be_excluded(name))

    def apply_layer_filter(self, model: Any) -> NDArrays:
        """The non-excluded layers of ``model``, as numpy arrays in flatten order."""
        return self._filter_layers(model, self.get_layers_to_transfer(model))

    def push_parameters(self, model: Any, initial_model: Any = None, config: Config | None = None) -> NDArrays:
        return self.apply_layer_filter(model)

    def pull_parameters(self, parameters: Sequence[np.ndarray], model: Model, config: Config | None = None) -> Model:
        return self._pull_positional(parameters, self.get_layers_to_transfer(model), model)

    def _check_exclusion_kinds(self, model: Any) -> None:
        linen_types = [t for t in self.module_exclusions if issubclass(t, linen.Module)]
        if linen_types:
            raise TypeError(
                f"excluding Linen module types {linen_types} needs the Linen module and example "
                "inputs: LayerExchangerWithExclusions(module, exclusions, *example_args); "
                f"got a {type(model).__name__}"
            )
        nnx_types = [t for t in self.module_exclusions if issubclass(t, nnx.Module)]
        if nnx_types and not isinstance(model, nnx.Module):
            raise TypeError(
                f"excluding NNX module types {nnx_types} needs the nnx.Module itself "
                f"(its object graph holds the types); got a {type(model).__name__}"
            )


class DynamicLayerExchanger(ErrorFeedback, _Layers):
    """Sends, each round, the layers chosen by a selection function, with their names.

    Args:
      layer_selection_function: ``(model, initial_model) -> (arrays, names)``, for example
        ``LayerSelectionFunctionConstructor(...).select_by_percentage()``. The rules built
        by :class:`jaxlayerx.LayerSelectionFunctionConstructor` also carry their pure mask
        form, which :meth:`send_mask` needs.
      error_feedback: measure drift from the last values pulled, not from
        ``initial_model`` (see :mod:`jaxlayerx.feedback`). Off by default, as in fl4health.
      nnx_filter: which NNX variables are layers (default: all but RNG state).

    Attributes:
      reference: with error feedback, ``name -> numpy array``: the last value pulled of
        each layer. Assign a saved one to restore it.
    """

    payload_kind: PayloadKind = "named"

    def __init__(
        self,
        layer_selection_function: LayerSelectionFunction,
        error_feedback: bool = False,
        *,
        nnx_filter: nnx.filterlib.Filter = DEFAULT_NNX_FILTER,
    ) -> None:
        if not callable(layer_selection_function):
            raise TypeError("layer_selection_function must be callable")
        super().__init__(error_feedback)
        self.layer_selection_function = layer_selection_function
        self.nnx_filter = nnx_filter

    def __repr__(self) -> str:
        return f"DynamicLayerExchanger({self.layer_selection_function!r}, error_feedback={self.error_feedback})"

    def select_parameters(self, model: Any, initial_model: Any = None) -> tuple[NDArrays, list[str]]:
        """The selected layers of ``model`` and their names.

        Raises:
          ValueError: error feedback has neither a pulled value nor ``initial_model`` for a layer.
        """
        function = self.layer_selection_function
        if not self.error_feedback and not isinstance(function, MaskedSelectionFunction):
            return function(model, initial_model)  # a function of your own gets the models, as in fl4health
        check_snapshot(model, initial_model)
        current = self._flatten(model)
        initial = None if initial_model is None else self._view(initial_model)
        return function(current, self.drift_reference(current, initial))

    def push_parameters(self, model: Any, initial_model: Any = None, config: Config | None = None) -> NDArrays:
        """The selected layers packed with their names (see :func:`pack_layers`)."""
        return self.pack_parameters(*self.select_parameters(model, initial_model))

    def pull_parameters(self, parameters: Sequence[np.ndarray], model: Model, config: Config | None = None) -> Model:
        """Puts exactly the named layers of a packed payload into ``model``, in any order
        (and, with error feedback, remembers them as the reference)."""
        weights, names = self.unpack_parameters(parameters)
        model = self._merge(model, dict(zip(names, weights)))
        if self.error_feedback:
            self.record_pull(self._flatten(model), names)
        return model

    def send_mask(self, current: Mapping[str, Any], reference: Mapping[str, Any]) -> Mapping[str, Any]:
        """The selection rule's pure mask form: ``name -> bool`` scalar.

        Raises:
          TypeError: the selection function has no mask form (a ``mask`` method).
        """
        if not isinstance(self.layer_selection_function, MaskedSelectionFunction):
            raise TypeError(
                f"the layer selection function {self.layer_selection_function!r} has no pure mask form "
                "(a mask(current, reference) method), which jit/vmap consumers need; build it with "
                "LayerSelectionFunctionConstructor, or give it such a method"
            )
        return self.layer_selection_function.mask(current, reference)

    def pack_parameters(self, weights: Sequence[Any], names: Sequence[str]) -> NDArrays:
        return pack_layers(weights, names)

    def unpack_parameters(self, packed: Sequence[np.ndarray]) -> tuple[NDArrays, list[str]]:
        return unpack_layers(packed)


class SparseCooParameterExchanger(ErrorFeedback, _Layers):
    """Sends the top-scoring fraction of all weights of the model, in COO form.

    Every weight gets a score from ``score_gen_function``; the ``ceil(total *
    sparsity_level)`` best over the whole model set a threshold, and each layer sends its
    weights scoring at least that (see :mod:`jaxlayerx.sparse_selection` for ties, NaN and
    zeros) as values, indices, shape and name (see :mod:`jaxlayerx.coo` for the layout).

    ``pull_parameters`` writes exactly the sent entries and leaves every other weight as it
    was. (fl4health rebuilds each sent layer as a dense tensor with zeros elsewhere: that
    wipes the weights a client did not receive, which is never what a partial exchange wants.)

    Args:
      sparsity_level: the fraction of all weights to keep, in ``(0, 1]``.
      score_gen_function: ``(model, initial_model) -> name -> scores of the layer's shape``,
        called with the flat views of both (``initial_model`` may be ``None``), for example
        :func:`jaxlayerx.largest_magnitude_change_scores`.
      error_feedback: score against the last values pulled, weight by weight, not against
        ``initial_model`` (see :mod:`jaxlayerx.feedback`). Off by default, as in fl4health.
      nnx_filter: which NNX variables are layers (default: all but RNG state).

    Attributes:
      reference: with error feedback, ``name -> numpy array``: the last value pulled of
        each weight. Assign a saved one to restore it.

    Raises:
      ValueError: ``sparsity_level`` outside ``(0, 1]``. TypeError: not a number, or a
        ``score_gen_function`` that is not callable.
    """

    payload_kind: PayloadKind = "sparse"

    def __init__(
        self,
        sparsity_level: float,
        score_gen_function: ScoreGenFunction,
        error_feedback: bool = False,
        *,
        nnx_filter: nnx.filterlib.Filter = DEFAULT_NNX_FILTER,
    ) -> None:
        validate_sparsity_level(sparsity_level)
        if not callable(score_gen_function):
            raise TypeError("score_gen_function must be callable")
        super().__init__(error_feedback)
        self.nnx_filter = nnx_filter
        self.sparsity_level = float(sparsity_level)
        self.score_gen_function = score_gen_function

    def __repr__(self) -> str:
        score = getattr(self.score_gen_function, "__name__", repr(self.score_gen_function))
        return f"SparseCooParameterExchanger({self.sparsity_level}, {score}, error_feedback={self.error_feedback})"

    def send_mask(self, current: Mapping[str, Any], reference: Mapping[str, Any]) -> FlatView:
        """Per-weight booleans of each layer's shape: what ``current`` sends (see
        :func:`jaxlayerx.sparse_masks`); pure and jit/vmap-able."""
        return sparse_masks(self.score_gen_function(current, reference), current, self.sparsity_level)

    def generate_parameter_scores(self, model: Any, initial_model: Any = None) -> Mapping[str, Any]:
        """The scores of every weight of ``model``, by layer name."""
        current, reference = self._current_and_reference(model, initial_model)
        return self.score_gen_function(current, reference)

    def select_parameters(
        self, model: Any, initial_model: Any = None
    ) -> tuple[NDArrays, tuple[NDArrays, NDArrays, list[str]]]:
        """The kept weights as ``(values, (indices, shapes, names))``, layers in flatten order.

        Raises:
          KeyError, ValueError, TypeError: the scores do not match the model's layers.
        """
        current, reference = self._current_and_reference(model, initial_model)
        return select_sparse_coo(self.score_gen_function, self.sparsity_level, current, reference)

    def push_parameters(self, model: Any, initial_model: Any = None, config: Config | None = None) -> NDArrays:
        """The kept weights packed as ``values + indices + shapes + [names]``."""
        values, additional_parameters = self.select_parameters(model, initial_model)
        return self.pack_parameters(values, additional_parameters)

    def pull_parameters(self, parameters: Sequence[np.ndarray], model: Model, config: Config | None = None) -> Model:
        """Writes exactly the entries of a COO payload into ``model``; the payload is
        checked whole (layout, bounds, repeats, names, shapes, dtypes) before anything changes.
        With error feedback, the written entries become the reference."""
        layers = read_coo(parameters)
        model = merge_sparse_layers(model, layers, nnx_filter=self.nnx_filter)
        if self.error_feedback:
            self.record_sparse_pull(self._flatten(model), {name: layer.flat_indices for name, layer in layers.items()})
        return model

    def _current_and_reference(self, model: Any, initial_model: Any) -> tuple[FlatView, FlatView | None]:
        check_snapshot(model, initial_model)
        current = self._flatten(model)
        initial = None if initial_model is None else self._view(initial_model)
        return current, self.drift_reference(current, initial)

    def pack_parameters(
        self, model_weights: Sequence[Any], additional_parameters: tuple[Sequence[Any], Sequence[Any], Sequence[str]]
    ) -> NDArrays:
        indices, shapes, names = additional_parameters
        return pack_coo(model_weights, indices, shapes, names)

    def unpack_parameters(
        self, packed_parameters: Sequence[np.ndarray]
    ) -> tuple[NDArrays, tuple[NDArrays, NDArrays, list[str]]]:
        return unpack_coo(packed_parameters)


def _constant_mask(names: Iterable[str], sends: Callable[[str], bool]) -> FlatView:
    """``name -> numpy bool`` for every name, in order: ``sends(name)``, whatever the values."""
    return collections.OrderedDict((name, np.bool_(sends(name))) for name in names)


def _traced_module_types(
    module: linen.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[dict[Any, type], Any]:
    """:func:`linen_module_types`, with a clear error when the example inputs are missing."""
    try:
        return linen_module_types(module, *args, **kwargs)
    except TypeError as error:
        if args or kwargs:
            raise
        raise TypeError(
            f"a Linen module ({type(module).__name__}) is traced on example inputs to find its module "
            "types: pass them after the exclusions, LayerExchangerWithExclusions(module, {nn.BatchNorm}, x)"
            f" ({error})"
        ) from error


def _checked_layer_list(names: Sequence[str]) -> list[str]:
    if isinstance(names, str):
        raise TypeError("layers_to_transfer must be a list of layer names, not one string")
    names = list(names)
    for name in names:
        if not isinstance(cast(object, name), str):
            raise TypeError(f"layer names must be strings, got {name!r}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"layers_to_transfer repeats {repeated}")
    return names
