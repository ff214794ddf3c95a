"""Parameter exchangers: what a client sends, and how it applies what it receives.

Every exchanger satisfies :class:`jaxlayerx.Exchanger`: ``send_mask(current, reference)``
is what it sends, as a pure function of flat views, and :class:`ExchangerBase` turns that
one rule into the exchange itself, with its state explicit (optax-style):

* ``push(model, state, initial_model) -> (payload, state)``: the sent entries as a
  wire-neutral :data:`jaxlayerx.payload.Payload` (quantized when ``quantize`` is set);
* ``pull(payload, model, state, first=False) -> (model, state)``: the payload checked
  whole, then written; the state's reference follows what was pulled;
* ``init_state()``: the state before the first pull (:class:`jaxlayerx.ExchangeState`).

The method names of fl4health's ``parameter_exchange`` package are kept as thin shells over
those, speaking fl4health's layouts (:mod:`jaxlayerx.wire.fl4health`): ``push_parameters``
returns Flower-style ``NDArrays`` (a list of numpy arrays), ``pull_parameters`` returns the
updated model, a new pytree (the one given is never mutated) or the same ``nnx.Module``
updated in place. The shells keep the state of an exchanger with error feedback or
quantization on the exchanger (read it as :attr:`ExchangerBase.state`); the Flower
adapters and the simulation never touch it and carry their own.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

import flax.linen as linen
import jax
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
from jaxlayerx.coo import pack_coo, unpack_coo
from jaxlayerx.errors import reject_traced, unknown_layer
from jaxlayerx.merge import merge_payload
from jaxlayerx.modules import linen_module_types, nnx_module_types, pytree_node_types
from jaxlayerx.packing import pack_layers, unpack_layers
from jaxlayerx.payload import Entries, Payload, dense_entries, sparse_entries
from jaxlayerx.quantize import Quantize, check_quantize, host_drift_reference, host_quantized_push, quantizable
from jaxlayerx.sparse_selection import (
    host_sparse_masks,
    masks_at_threshold,
    score_threshold_at,
    select_sparse_coo,
    validate_sparsity_level,
    weights_to_keep,
)
from jaxlayerx.state import ExchangeState, conformed, record_pull, seed
from jaxlayerx.tree import DEFAULT_NNX_FILTER, as_flat_view, check_snapshot, flatten
from jaxlayerx.wire import LEGACY
from jaxlayerx.wire.fl4health import decode_named, decode_positional, encode_positional


class ExchangerBase:
    """The exchange written once over a subclass's ``send_mask`` (and ``payload_kind``).

    A subclass sets ``payload_kind`` (``"positional"``: a fixed set of whole layers;
    ``"named"``: whole layers chosen each round; ``"sparse"``: single entries) and writes
    ``send_mask``; ``push``, ``pull``, ``init_state`` and fl4health's ``push_parameters``/
    ``pull_parameters`` come from here.

    Attributes:
      error_feedback: measure drift from the state's reference (the values last pulled)
        rather than the round's ``initial_model``, so that what is not sent accumulates.
      quantize: ``None``, ``"bf16"`` or ``"int8"``: how uploads are coded
        (:mod:`jaxlayerx.quantize`).
      nnx_filter: which NNX variables are layers.
    """

    payload_kind: PayloadKind = "named"
    error_feedback: bool = False
    quantize: Quantize | None = None
    nnx_filter: nnx.filterlib.Filter = DEFAULT_NNX_FILTER
    _shell_state: ExchangeState = ExchangeState()

    def _set_options(self, error_feedback: Any, quantize: Any, nnx_filter: nnx.filterlib.Filter) -> None:
        if not isinstance(cast(object, error_feedback), (bool, np.bool_)):
            raise TypeError(f"error_feedback must be True or False, got {error_feedback!r}")
        self.error_feedback = bool(error_feedback)
        self.quantize = check_quantize(quantize)
        self.nnx_filter = nnx_filter
        self._shell_state = ExchangeState()

    @property
    def keeps_reference(self) -> bool:
        """Whether the state holds a reference (error feedback or quantization)."""
        return self.error_feedback or self.quantize is not None

    @property
    def state(self) -> ExchangeState:
        """The state ``push_parameters`` and ``pull_parameters`` keep (empty until a pull,
        or without error feedback and quantization)."""
        return self._shell_state

    def send_mask(self, current: Mapping[str, Any], reference: Mapping[str, Any]) -> Mapping[str, Any]:
        """``name -> bool`` (scalar or of the layer's shape): what ``current`` sends; pure."""
        raise NotImplementedError(f"{type(self).__name__} must define send_mask(current, reference)")

    def mask_argument(self, layers: Mapping[str, Any]) -> np.ndarray | None:
        """The send rule's numeric parameter, for layers of these shapes, in the exact form
        :meth:`send_mask_at` takes it (a count of weights or layers, a capacity, a float32
        threshold); ``None`` when the rule has none. Computed on the host from shapes alone."""
        del layers
        return None

    def send_mask_at(
        self, current: Mapping[str, Any], reference: Mapping[str, Any], argument: Any
    ) -> Mapping[str, Any]:
        """:meth:`send_mask` with the rule's parameter given as ``argument``
        (:meth:`mask_argument`), which may be traced: one compiled program then serves every
        value of the parameter, and values run side by side under ``jax.vmap``."""
        del argument
        return self.send_mask(current, reference)

    def host_mask(self, current: FlatView, reference: FlatView | None) -> FlatView:
        """:meth:`send_mask` for the host, as numpy booleans (a compiled ``send_mask``)."""
        masks = _jitted(self.send_mask)(current, reference)
        return FlatView(zip(masks, to_numpy(masks.values())))

    # --- the exchange ---------------------------------------------------------------------

    def init_state(self) -> ExchangeState:
        """The state before the first pull: empty (seeded by the first pull)."""
        return ExchangeState()

    def push(self, model: Any, state: ExchangeState, initial_model: Any = None) -> tuple[Payload, ExchangeState]:
        """What the client sends for ``model``: ``(payload, state after sending)``.

        Drift is measured from ``initial_model`` (the round's start), or with error
        feedback from the state's reference. A state not yet seeded is seeded from
        ``initial_model``. With ``quantize``, each sent layer's values are its update over
        the reference, coded (:mod:`jaxlayerx.quantize`).

        Raises:
          ValueError: ``initial_model`` is ``model`` itself (or shares its NNX variables);
            error feedback or quantization with neither a pulled state nor ``initial_model``.
          TypeError: traced values (called inside ``jax.jit`` or ``jax.vmap``: see :meth:`send_mask`).
        """
        self._reject_traced("push", model=model, state=state, initial_model=initial_model)
        check_snapshot(model, initial_model)
        current = self._flatten(model)
        initial = None if initial_model is None else self._view(initial_model)
        state = conformed(state, current)
        if self.keeps_reference and not state.seeded:
            if initial is None:
                raise ValueError(
                    f"{type(self).__name__} keeps the values last pulled (error feedback or quantization) and has "
                    "none yet: pull the server's model first, or pass initial_model=..."
                )
            state = seed(initial, residual=self.error_feedback and self.quantize is not None)
        masks = self.host_mask(current, self._drift_reference(current, initial, state))
        return self._payload(current, masks, state)

    def pull(
        self, payload: Payload, model: Model, state: ExchangeState, *, first: bool = False
    ) -> tuple[Model, ExchangeState]:
        """``model`` with ``payload`` written, and the state after the pull.

        A positional exchanger applies only the layers it exchanges, and keeps the others
        local (FedBN, FedPer), except on the ``first`` payload a client receives, the whole
        model, which it takes whole. The state's reference is seeded from the first model
        pulled, then follows exactly the entries pulled.

        Raises:
          KeyError, ValueError, TypeError: the payload does not fit the model (nothing changes).
          TypeError: traced values (called inside ``jax.jit`` or ``jax.vmap``: see :meth:`send_mask`).
        """
        self._reject_traced("pull", payload=payload, model=model, state=state)
        if self.payload_kind == "positional" and not first:
            exchanged = set(self._exchanged(self._flatten(model)))
            payload = collections.OrderedDict((name, e) for name, e in payload.items() if name in exchanged)
        model = merge_payload(model, payload, nnx_filter=self.nnx_filter)
        if self.keeps_reference:
            pulled = self._flatten(model)
            if state.seeded:
                state = record_pull(conformed(state, pulled), pulled, payload)
            else:
                state = seed(pulled, residual=self.error_feedback and self.quantize is not None)
        return model, state

    # --- fl4health's method names ---------------------------------------------------------

    def push_parameters(self, model: Any, initial_model: Any = None, config: Config | None = None) -> NDArrays:
        """The payload for ``model`` in fl4health's layout: positional, named or COO
        (compact when quantized, which fl4health cannot read); on the host only (see :meth:`push`)."""
        self._reject_traced("push_parameters", model=model, initial_model=initial_model)
        payload, self._shell_state = self.push(model, self._shell_state, initial_model)
        if self.payload_kind == "positional" and self.quantize is None:
            return encode_positional(payload)
        return cast(NDArrays, LEGACY.encode(payload, sparse=self.payload_kind == "sparse"))

    def pull_parameters(self, parameters: Sequence[np.ndarray], model: Model, config: Config | None = None) -> Model:
        """Applies a payload in fl4health's layout to ``model``; the payload is checked whole
        (layout, names, shapes, dtypes) before anything changes; on the host only (see :meth:`pull`)."""
        self._reject_traced("pull_parameters", parameters=parameters, model=model)
        layers = self._flatten(model)
        model, self._shell_state = self.pull(self._decode(parameters, layers), model, self._shell_state)
        return model

    def _decode(self, parameters: Sequence[np.ndarray], layers: FlatView) -> Payload:
        """A payload in fl4health's layout of this exchanger's kind, checked against ``layers``."""
        if not isinstance(cast(object, parameters), (list, tuple)):
            raise TypeError(f"a payload is a list of numpy arrays, got {type(parameters).__name__}")
        if self.payload_kind == "positional":
            return decode_positional(list(parameters), self._exchanged(layers), layers)
        if self.payload_kind == "named":
            return decode_named(list(parameters), layers)
        return LEGACY.decode(list(parameters), layers)

    # --- helpers --------------------------------------------------------------------------

    def _reject_traced(self, method: str, **trees: Any) -> None:
        """:func:`jaxlayerx.errors.reject_traced` for this exchanger's host ``method``."""
        reject_traced(f"{type(self).__name__}.{method}", **trees)

    def _flatten(self, model: Any) -> FlatView:
        return flatten(model, nnx_filter=self.nnx_filter)

    def _view(self, model: Any) -> FlatView:
        """A model's flat view, or a flat view (an ordered ``name -> array`` mapping) as it is."""
        return as_flat_view(model, nnx_filter=self.nnx_filter)

    def _exchanged(self, layers: Mapping[str, Any]) -> list[str]:
        """The layers a positional exchanger sends and applies, in its mask's order."""
        return [name for name, sends in self.send_mask(layers, layers).items() if bool(sends)]

    def _drift_reference(self, current: FlatView, initial: FlatView | None, state: ExchangeState) -> FlatView | None:
        if not self.error_feedback:
            return initial
        reference = FlatView((name, state.reference[name]) for name in current)
        if not state.residual:
            return reference
        residual = {name: state.residual[name] for name in current}
        shifted = cast(dict[str, jax.Array], host_drift_reference(dict(reference), residual))
        return FlatView(zip(reference, to_numpy(shifted[name] for name in reference)))

    def _payload(self, current: FlatView, masks: FlatView, state: ExchangeState) -> tuple[Payload, ExchangeState]:
        """The entries ``masks`` marks, in the masks' order; quantized when asked."""
        payload: Payload = collections.OrderedDict()
        values = dict(zip(current, to_numpy(current.values())))
        for name, mask in masks.items():
            if not mask.any():
                continue
            payload[name] = sparse_entries(values[name], mask) if mask.ndim else dense_entries(values[name])
        if self.quantize is None or not payload:
            return payload, state
        return self._quantized(payload, values, masks, state)

    def _quantized(
        self, payload: Payload, values: Mapping[str, np.ndarray], masks: FlatView, state: ExchangeState
    ) -> tuple[Payload, ExchangeState]:
        quantize = cast(Quantize, self.quantize)
        names = [name for name, entries in payload.items() if quantizable(entries.values.dtype)]
        if not names:
            return payload, state
        residual = state.residual or {name: np.zeros((), np.float32) for name in names}
        results = cast(
            dict[str, tuple[jax.Array, ...]],
            host_quantized_push(
                {name: values[name] for name in names},
                {name: state.reference[name] for name in names},
                {name: residual[name] for name in names},
                {name: masks[name] for name in names},
                quantize,
            ),
        )
        quantized: Payload = collections.OrderedDict()
        new_residual = collections.OrderedDict(state.residual)
        for name, entries in payload.items():
            if name not in results:
                quantized[name] = entries  # an integer or boolean layer travels as it is
                continue
            q, scale, _, layer_residual = to_numpy(results[name])
            flat = np.asarray(q).reshape(-1)
            chosen = flat if entries.indices is None else flat[entries.indices]
            quantized[name] = Entries(chosen, entries.indices, entries.shape, quantize, np.float32(scale))
            if state.residual:
                new_residual[name] = np.asarray(layer_residual, np.float32)
        return quantized, ExchangeState(state.reference, new_residual)


class _PositionalExchanger(ExchangerBase):
    """A fixed set of whole layers, sent without names in the order of the mask."""

    payload_kind: PayloadKind = "positional"

    def _set_options(self, error_feedback: Any, quantize: Any, nnx_filter: nnx.filterlib.Filter) -> None:
        super()._set_options(error_feedback, quantize, nnx_filter)
        if self.error_feedback and self.quantize is None:
            raise ValueError(
                f"{type(self).__name__} always sends the same layers: error feedback has nothing to carry but "
                "quantization error; pass quantize='bf16' or 'int8' with it, or leave it off"
            )

    def host_mask(self, current: FlatView, reference: FlatView | None) -> FlatView:
        return FlatView(self.send_mask(current, current))

    def _filter_layers(self, model: Any, names: Sequence[str]) -> NDArrays:
        flat = self._flatten(model)
        for name in names:
            if name not in flat:
                raise unknown_layer(name, flat)
        return to_numpy(flat[name] for name in names)


class FullParameterExchanger(_PositionalExchanger):
    """Exchanges every layer, in flatten order, without names.

    Args:
      quantize: ``None``, ``"bf16"`` or ``"int8"``: code uploads (:mod:`jaxlayerx.quantize`).
      error_feedback: with ``quantize``, carry what quantization lost into the next round.
      nnx_filter: which NNX variables are layers (default: all but RNG state).
    """

    def __init__(
        self,
        *,
        quantize: Quantize | None = None,
        error_feedback: bool = False,
        nnx_filter: nnx.filterlib.Filter = DEFAULT_NNX_FILTER,
    ) -> None:
        self._set_options(error_feedback, quantize, nnx_filter)

    def __repr__(self) -> str:
        return f"FullParameterExchanger(quantize={self.quantize!r}, error_feedback={self.error_feedback})"

    def send_mask(self, current: Mapping[str, Any], reference: Mapping[str, Any]) -> FlatView:
        """Every layer: ``True`` for each name of ``current``."""
        return _constant_mask(current, lambda name: True)


class FixedLayerExchanger(_PositionalExchanger):
    """Exchanges a fixed list of layers, in the list's order, without names.

    Args:
      layers_to_transfer: flattened layer names, for example ``["params/Dense_0/kernel"]``.
      quantize: ``None``, ``"bf16"`` or ``"int8"``: code uploads (:mod:`jaxlayerx.quantize`).
      error_feedback: with ``quantize``, carry what quantization lost into the next round.
      nnx_filter: which NNX variables are layers (default: all but RNG state).
    """

    def __init__(
        self,
        layers_to_transfer: Sequence[str],
        *,
        quantize: Quantize | None = None,
        error_feedback: bool = False,
        nnx_filter: nnx.filterlib.Filter = DEFAULT_NNX_FILTER,
    ) -> None:
        self.layers_to_transfer = _checked_layer_list(layers_to_transfer)
        self._set_options(error_feedback, quantize, nnx_filter)

    def __repr__(self) -> str:
        return f"FixedLayerExchanger({self.layers_to_transfer!r}, quantize={self.quantize!r})"

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


class LayerExchangerWithExclusions(_PositionalExchanger):
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
      quantize: ``None``, ``"bf16"`` or ``"int8"``: code uploads (:mod:`jaxlayerx.quantize`).
      error_feedback: with ``quantize``, carry what quantization lost into the next round.
      nnx_filter: which NNX variables are layers (default: all but RNG state).
      *example_args: example positional inputs for a Linen module's ``init``.
      **example_kwargs: example keyword inputs for a Linen module's ``init``.
    """

    def __init__(
        self,
        model: Any,
        module_exclusions: Iterable[type],
        *example_args: Any,
        quantize: Quantize | None = None,
        error_feedback: bool = False,
        nnx_filter: nnx.filterlib.Filter = DEFAULT_NNX_FILTER,
        **example_kwargs: Any,
    ) -> None:
        self._set_options(error_feedback, quantize, nnx_filter)
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

    def __repr__(self) -> str:
        excluded = sorted(t.__name__ for t in self.module_exclusions)
        return f"LayerExchangerWithExclusions(exclusions={excluded}, quantize={self.quantize!r})"

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


class DynamicLayerExchanger(ExchangerBase):
    """Sends, each round, the layers chosen by a selection function, with their names.

    Args:
      layer_selection_function: ``(model, initial_model) -> (arrays, names)``, for example
        ``LayerSelectionFunctionConstructor(...).select_by_percentage()``. The rules built
        by :class:`jaxlayerx.LayerSelectionFunctionConstructor` also carry their pure mask
        form, which :meth:`send_mask` needs; a function of your own without one runs on
        the host only (it gets the two models, or with error feedback or quantization the
        flat views of the model and of its drift reference).
      error_feedback: measure drift from the values last pulled, not from
        ``initial_model`` (see :mod:`jaxlayerx.state`). Off by default, as in fl4health.
      quantize: ``None``, ``"bf16"`` or ``"int8"``: code uploads (:mod:`jaxlayerx.quantize`).
      nnx_filter: which NNX variables are layers (default: all but RNG state).
    """

    payload_kind: PayloadKind = "named"

    def __init__(
        self,
        layer_selection_function: LayerSelectionFunction,
        error_feedback: bool = False,
        *,
        quantize: Quantize | None = None,
        nnx_filter: nnx.filterlib.Filter = DEFAULT_NNX_FILTER,
    ) -> None:
        if not callable(layer_selection_function):
            raise TypeError("layer_selection_function must be callable")
        self._set_options(error_feedback, quantize, nnx_filter)
        self.layer_selection_function = layer_selection_function

    def __repr__(self) -> str:
        return (
            f"DynamicLayerExchanger({self.layer_selection_function!r}, error_feedback={self.error_feedback}, "
            f"quantize={self.quantize!r})"
        )

    def select_parameters(self, model: Any, initial_model: Any = None) -> tuple[NDArrays, list[str]]:
        """The selected layers of ``model`` and their names (fl4health's method; no state).

        Raises:
          ValueError: the rule needs ``initial_model`` and has none.
        """
        function = self.layer_selection_function
        if not isinstance(function, MaskedSelectionFunction):
            return function(model, initial_model)  # a function of your own gets the models, as in fl4health
        check_snapshot(model, initial_model)
        return function(self._flatten(model), None if initial_model is None else self._view(initial_model))

    def push(self, model: Any, state: ExchangeState, initial_model: Any = None) -> tuple[Payload, ExchangeState]:
        self._reject_traced("push", model=model, state=state, initial_model=initial_model)
        if self.keeps_reference or isinstance(self.layer_selection_function, MaskedSelectionFunction):
            return super().push(model, state, initial_model)
        arrays, names = self.layer_selection_function(model, initial_model)  # as fl4health calls it
        current = self._flatten(model)
        masks = FlatView((name, np.bool_(name in set(names))) for name in current)
        del arrays  # the values are read off the model, checked to be its layers
        for name in names:
            if name not in current:
                raise unknown_layer(name, current, what="the model (the selection function named it)")
        return self._payload(current, masks, state)

    def host_mask(self, current: FlatView, reference: FlatView | None) -> FlatView:
        function = self.layer_selection_function
        if reference is None:
            raise ValueError(
                "dynamic layer selection needs initial_model: the model as it was at the start of the round "
                "(pass initial_model=...)"
            )
        if isinstance(function, MaskedSelectionFunction):
            host = getattr(function, "host_mask", None)
            if callable(host):
                return FlatView(zip(current, cast(np.ndarray, host(current, reference))))
            return super().host_mask(current, reference)
        _, names = function(current, reference)
        chosen = set(names)
        return FlatView((name, np.bool_(name in chosen)) for name in current)

    def send_mask(self, current: Mapping[str, Any], reference: Mapping[str, Any]) -> Mapping[str, Any]:
        """The selection rule's pure mask form: ``name -> bool`` scalar.

        Raises:
          TypeError: the selection function has no mask form (a ``mask`` method).
        """
        return self.send_mask_at(current, reference, self.mask_argument(current))

    def mask_argument(self, layers: Mapping[str, Any]) -> np.ndarray | None:
        argument: Callable[[Mapping[str, Any]], np.ndarray] | None = getattr(
            self.layer_selection_function, "argument", None
        )
        return argument(layers) if callable(argument) else None

    def send_mask_at(
        self, current: Mapping[str, Any], reference: Mapping[str, Any], argument: Any
    ) -> Mapping[str, Any]:
        function = self.layer_selection_function
        mask_at: Callable[..., Mapping[str, Any]] | None = getattr(function, "mask_at", None)
        if argument is None or not callable(mask_at):
            if not isinstance(function, MaskedSelectionFunction):
                raise TypeError(
                    f"the layer selection function {function!r} has no pure mask form "
                    "(a mask(current, reference) method), which jit/vmap consumers need; build it with "
                    "LayerSelectionFunctionConstructor, or give it such a method"
                )
            return function.mask(current, reference)
        return mask_at(current, reference, argument)

    def pack_parameters(self, weights: Sequence[Any], names: Sequence[str]) -> NDArrays:
        return pack_layers(weights, names)

    def unpack_parameters(self, packed: Sequence[np.ndarray]) -> tuple[NDArrays, list[str]]:
        return unpack_layers(packed)


class SparseCooParameterExchanger(ExchangerBase):
    """Sends the top-scoring fraction of all weights of the model, in COO form.

    Every weight gets a score from ``score_gen_function``; the ``ceil(total *
    sparsity_level)`` best over the whole model set a threshold, and each layer sends its
    weights scoring at least that (see :mod:`jaxlayerx.sparse_selection` for ties, NaN and
    zeros) as values, indices, shape and name (see :mod:`jaxlayerx.coo` for the layout).

    Pulling writes exactly the sent entries and leaves every other weight as it was.
    (fl4health rebuilds each sent layer as a dense tensor with zeros elsewhere: that wipes
    the weights a client did not receive, which is never what a partial exchange wants.)

    Args:
      sparsity_level: the fraction of all weights to keep, in ``(0, 1]``.
      score_gen_function: ``(model, initial_model) -> name -> scores of the layer's shape``,
        called with the flat views of both (``initial_model`` may be ``None``), for example
        :func:`jaxlayerx.largest_magnitude_change_scores`.
      error_feedback: score against the values last pulled, weight by weight, not against
        ``initial_model`` (see :mod:`jaxlayerx.state`). Off by default, as in fl4health.
      quantize: ``None``, ``"bf16"`` or ``"int8"``: code uploads (:mod:`jaxlayerx.quantize`).
      nnx_filter: which NNX variables are layers (default: all but RNG state).

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
        quantize: Quantize | None = None,
        nnx_filter: nnx.filterlib.Filter = DEFAULT_NNX_FILTER,
    ) -> None:
        validate_sparsity_level(sparsity_level)
        if not callable(score_gen_function):
            raise TypeError("score_gen_function must be callable")
        self._set_options(error_feedback, quantize, nnx_filter)
        self.sparsity_level = float(sparsity_level)
        self.score_gen_function = score_gen_function

    def __repr__(self) -> str:
        score = getattr(self.score_gen_function, "__name__", repr(self.score_gen_function))
        return (
            f"SparseCooParameterExchanger({self.sparsity_level}, {score}, error_feedback={self.error_feedback}, "
            f"quantize={self.quantize!r})"
        )

    def send_mask(self, current: Mapping[str, Any], reference: Mapping[str, Any]) -> FlatView:
        """Per-weight booleans of each layer's shape: what ``current`` sends (see
        :func:`jaxlayerx.sparse_masks`); pure and jit/vmap-able."""
        return self.send_mask_at(current, reference, self.mask_argument(current))

    def mask_argument(self, layers: Mapping[str, Any]) -> np.ndarray:
        """``k = ceil(total * sparsity_level)`` (:func:`jaxlayerx.sparse_selection.weights_to_keep`)."""
        return weights_to_keep(layers, self.sparsity_level)

    def send_mask_at(self, current: Mapping[str, Any], reference: Mapping[str, Any], argument: Any) -> FlatView:
        scores = self.score_gen_function(current, reference)
        return masks_at_threshold(scores, current, score_threshold_at(scores, argument))

    def host_mask(self, current: FlatView, reference: FlatView | None) -> FlatView:
        return host_sparse_masks(self.score_gen_function, self.sparsity_level, current, reference)

    def generate_parameter_scores(self, model: Any, initial_model: Any = None) -> Mapping[str, Any]:
        """The scores of every weight of ``model``, by layer name (against ``initial_model``)."""
        check_snapshot(model, initial_model)
        return self.score_gen_function(
            self._flatten(model), None if initial_model is None else self._view(initial_model)
        )

    def select_parameters(
        self, model: Any, initial_model: Any = None
    ) -> tuple[NDArrays, tuple[NDArrays, NDArrays, list[str]]]:
        """The kept weights as ``(values, (indices, shapes, names))``, layers in flatten order
        (fl4health's method; no state).

        Raises:
          KeyError, ValueError, TypeError: the scores do not match the model's layers.
        """
        check_snapshot(model, initial_model)
        initial = None if initial_model is None else self._view(initial_model)
        return select_sparse_coo(self.score_gen_function, self.sparsity_level, self._flatten(model), initial)

    def pack_parameters(
        self, model_weights: Sequence[Any], additional_parameters: tuple[Sequence[Any], Sequence[Any], Sequence[str]]
    ) -> NDArrays:
        indices, shapes, names = additional_parameters
        return pack_coo(model_weights, indices, shapes, names)

    def unpack_parameters(
        self, packed_parameters: Sequence[np.ndarray]
    ) -> tuple[NDArrays, tuple[NDArrays, NDArrays, list[str]]]:
        return unpack_coo(packed_parameters)


def _jitted(send_mask: Callable[[Any, Any], Mapping[str, Any]]) -> Callable[[Any, Any], Mapping[str, Any]]:
    """``send_mask`` compiled once per exchanger."""
    owner = cast(Any, send_mask).__self__
    compiled = owner.__dict__.get("_compiled_send_mask")
    if compiled is None:
        compiled = jax.jit(send_mask)  # pyright: ignore[reportUnknownMemberType]
        owner.__dict__["_compiled_send_mask"] = compiled
    return compiled


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
