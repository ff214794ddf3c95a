"""A Flower client around a Flax model, a local train function and a jaxlayerx exchanger."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, cast

import numpy as np
from flax import nnx
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.client import Client, NumPyClient
from flwr.clientapp import ClientApp

from jaxlayerx._host import to_numpy
from jaxlayerx.base import Config, Exchanger, NDArrays, check_exchanger
from jaxlayerx.flower._user_results import checked_triple, real_scalar, snapshot
from jaxlayerx.flower.clientapp import whole_layers_coo
from jaxlayerx.flower.payloads import checked_payload, named_payload
from jaxlayerx.packing import is_packed, pack_layers, payload_nbytes, unpack_layers
from jaxlayerx.tree import DEFAULT_NNX_FILTER, flatten, merge_layers

Metrics = dict[str, Any]
#: ``(model, config) -> (trained model, num_examples, metrics)``.
TrainFn = Callable[[Any, Config], tuple[Any, int, Metrics]]
#: ``(model, config) -> (loss, num_examples, metrics)``.
EvaluateFn = Callable[[Any, Config], tuple[float, int, Metrics]]


class _WithReference(Protocol):
    """An exchanger with ``error_feedback`` set also has ``reference`` (see :class:`jaxlayerx.Exchanger`)."""

    reference: Mapping[str, Any]


#: Keys of the client's saved state in a Flower ``Context.state``.
STATE_LAYERS = "jaxlayerx.layers"
STATE_FLAGS = "jaxlayerx.flags"
STATE_REFERENCE = "jaxlayerx.reference"


class ExchangerClient(NumPyClient):
    """A Flower ``NumPyClient`` that trains a Flax model and exchanges layers through an exchanger.

    Each ``fit``: apply what the server sent, remember the result as ``initial_model`` (the
    drift reference of a :class:`~jaxlayerx.DynamicLayerExchanger`), train with
    ``train_fn``, and send ``exchanger.push_parameters(model, initial_model, config)``.

    The client knows its exchanger only through :class:`jaxlayerx.Exchanger`. What it
    receives is applied whole or not at all (every layer is validated first). The first
    payload must hold every layer of the model: packed with names (what
    :class:`FedAvgDynamicLayerStrategy` sends a new client) or, fl4health's initial
    parameters, one unnamed array per layer in flatten order. Later payloads hold named
    layers, or (from a plain fl4health ``FedAvg`` server) unnamed ones: a positional
    exchanger's layers in its own order, else every layer in flatten order. A positional
    exchanger (fixed, exclusions) applies only the layers its ``send_mask`` marks and keeps
    the others local (FedBN, FedPer); a named one pulls through its ``pull_parameters``,
    which also moves its error-feedback reference.

    A sparse exchanger (``payload_kind`` ``"sparse"``, with
    :class:`FedAvgSparseCooTensorStrategy` or fl4health's ``FedAvgSparseCooTensor``)
    receives whole layers the same way (named or, fl4health's initial parameters, unnamed),
    handed to its ``pull_parameters`` as COO payloads holding every weight of those layers,
    and COO payloads (``values + indices + shapes + [names]``), which it pulls as they are.

    What the client sends always carries the layer names: a named or sparse exchanger's
    payload as is, a positional exchanger's layers packed with their names, so one server
    can average any mix of layer exchangers layer by layer. With error feedback, the
    exchanger's reference is saved with the model (see :func:`stateful_client_fn`).

    Args:
      model: Linen variables, an ``nnx.Module`` (updated in place) or any pytree.
      exchanger: any exchanger (:class:`jaxlayerx.Exchanger`).
      train_fn: ``(model, config) -> (trained model, num_examples, metrics)``; return a new
        pytree (or the same ``nnx.Module``); never mutate the pytree passed in.
      evaluate_fn: ``(model, config) -> (loss, num_examples, metrics)``; optional.
      nnx_filter: which NNX variables are layers.

    Fit metrics gain ``payload_bytes`` (array bytes sent, names included) and
    ``layers_sent`` (the layers the payload names).
    """

    def __init__(
        self,
        model: Any,
        exchanger: Exchanger,
        train_fn: TrainFn,
        evaluate_fn: EvaluateFn | None = None,
        *,
        nnx_filter: nnx.filterlib.Filter = DEFAULT_NNX_FILTER,
    ) -> None:
        if not callable(train_fn):
            raise TypeError("train_fn must be callable: (model, config) -> (model, num_examples, metrics)")
        if evaluate_fn is not None and not callable(evaluate_fn):
            raise TypeError("evaluate_fn must be callable: (model, config) -> (loss, num_examples, metrics)")
        check_exchanger(exchanger)
        self.model = model
        self.exchanger = exchanger
        self.train_fn = train_fn
        self.evaluate_fn = evaluate_fn
        self.nnx_filter = nnx_filter
        self.initialized = False
        self.initial_model: Any = None

    def get_parameters(self, config: Config) -> NDArrays:
        """Every layer of the model, packed with names."""
        layers = self._layers()
        return pack_layers(list(layers.values()), list(layers))

    def fit(self, parameters: NDArrays, config: Config) -> tuple[NDArrays, int, Metrics]:
        self.receive(parameters)
        self.initial_model = snapshot(self.model)
        model, num_examples, metrics = checked_triple(
            self.train_fn(self.model, dict(config)), "train_fn", "(model, num_examples, metrics)"
        )
        self.model = model
        payload = self.payload(config)
        layers_sent = (len(payload) - 1) // 3 if self.exchanger.payload_kind == "sparse" else len(payload) - 1
        metrics = {**metrics, "payload_bytes": payload_nbytes(payload), "layers_sent": layers_sent}
        return payload, num_examples, metrics

    def evaluate(self, parameters: NDArrays, config: Config) -> tuple[float, int, Metrics]:
        if self.evaluate_fn is None:
            raise NotImplementedError("this ExchangerClient was built without an evaluate_fn")
        self.receive(parameters)
        loss, num_examples, metrics = checked_triple(
            self.evaluate_fn(self.model, dict(config)), "evaluate_fn", "(loss, num_examples, metrics)"
        )
        return real_scalar(loss, "loss"), num_examples, metrics

    def receive(self, parameters: NDArrays) -> None:
        """Applies a server payload to the model (all of it, validated first, or nothing).

        Raises:
          ValueError: the first payload does not hold every layer; a malformed payload.
          KeyError, TypeError: an unknown layer, a lossy dtype.
        """
        parameters = list(parameters)
        layers = self._layers()
        if self.exchanger.payload_kind == "sparse" and _is_coo(parameters):
            if not self.initialized:
                raise ValueError(
                    "the first payload must hold every layer of the model, dense (named or unnamed); "
                    "got a sparse COO payload"
                )
            self.model = self.exchanger.pull_parameters(parameters, self.model)
        elif self.initialized and not is_packed(parameters) and self.exchanger.payload_kind == "positional":
            self.model = self.exchanger.pull_parameters(parameters, self.model)  # its own layers, its own order
        else:
            payload = named_payload(parameters, list(layers))  # unnamed: every layer, in flatten order
            if not self.initialized:
                _check_whole_model(payload, layers)
            self.model = self._pull_named(payload, layers)
        self.initialized = True

    def payload(self, config: Config | None = None) -> NDArrays:
        """What the exchanger sends for the current model, packed with names."""
        pushed = self.exchanger.push_parameters(self.model, initial_model=self.initial_model, config=config)
        if self.exchanger.payload_kind != "positional":
            return list(pushed)
        return named_payload(to_numpy(pushed), self._exchanged_layers(self._layers()))

    def save_state(self, state: Any) -> None:
        """Writes the model's layers and the client's flags into a Flower ``RecordDict``."""
        state[STATE_LAYERS] = _array_record(self._layers())
        state[STATE_FLAGS] = ConfigRecord({"initialized": self.initialized})
        if self.exchanger.error_feedback:
            state[STATE_REFERENCE] = _array_record(cast(_WithReference, self.exchanger).reference)

    def load_state(self, state: Any) -> None:
        """Restores what :meth:`save_state` wrote (nothing happens for an empty state)."""
        if STATE_LAYERS not in state:
            return
        record = state[STATE_LAYERS]
        saved = {name: record[name].numpy() for name in record.keys()}
        self.model = merge_layers(self.model, saved, nnx_filter=self.nnx_filter)
        self.initialized = bool(state[STATE_FLAGS]["initialized"])
        if self.exchanger.error_feedback and STATE_REFERENCE in state:
            reference = state[STATE_REFERENCE]
            cast(_WithReference, self.exchanger).reference = {
                name: reference[name].numpy() for name in reference.keys()
            }

    def _layers(self) -> Mapping[str, Any]:
        return flatten(self.model, nnx_filter=self.nnx_filter)

    def _exchanged_layers(self, layers: Mapping[str, Any]) -> list[str]:
        """The layers a positional exchanger sends and applies: those its send mask marks,
        in the mask's order (the order of its payloads)."""
        return [name for name, sends in self.exchanger.send_mask(layers, layers).items() if bool(sends)]

    def _pull_named(self, payload: NDArrays, layers: Mapping[str, Any]) -> Any:
        """Applies a packed payload: a named exchanger pulls it; a positional one takes the
        layers it exchanges (all of them on the first payload) and keeps the others."""
        if self.exchanger.payload_kind == "named":
            return self.exchanger.pull_parameters(payload, self.model)
        received = checked_payload(payload, layers)
        if self.exchanger.payload_kind == "sparse":
            return self.exchanger.pull_parameters(whole_layers_coo(received), self.model)
        if self.initialized:
            keep = set(self._exchanged_layers(layers))
            received = {name: value for name, value in received.items() if name in keep}
        return merge_layers(self.model, received, nnx_filter=self.nnx_filter)


def stateful_client_fn(make_client: Callable[[Context], ExchangerClient]) -> Callable[[Context], Client]:
    """A Flower ``client_fn`` whose clients keep their model between messages.

    Flower may build a new client for every message (a ``ClientApp`` does). The model's
    layers and the client's flags are therefore saved in ``context.state`` after each
    ``fit``/``evaluate`` and restored into the freshly made client before the next one,
    so local layers (FedBN, FedPer) survive across rounds.

    Args:
      make_client: ``context -> ExchangerClient`` (read the client's data partition from
        ``context.node_config`` for example).
    """

    def client_fn(context: Context) -> Client:
        client = make_client(context)
        if not isinstance(cast(object, client), ExchangerClient):
            raise TypeError(f"make_client must return an ExchangerClient, got {type(client).__name__}")
        client.load_state(context.state)
        return _Persisting(client, context).to_client()

    return client_fn


def client_app(make_client: Callable[[Context], ExchangerClient]) -> ClientApp:
    """A Flower ``ClientApp`` running :func:`stateful_client_fn` clients."""
    return ClientApp(client_fn=stateful_client_fn(make_client))


class _Persisting(NumPyClient):
    """Forwards to an :class:`ExchangerClient` and saves its state after each message."""

    def __init__(self, client: ExchangerClient, context: Context) -> None:
        self._client = client
        self._context = context

    def get_parameters(self, config: Config) -> NDArrays:
        return self._client.get_parameters(config)

    def fit(self, parameters: NDArrays, config: Config) -> tuple[NDArrays, int, Metrics]:
        result = self._client.fit(parameters, config)
        self._client.save_state(self._context.state)
        return result

    def evaluate(self, parameters: NDArrays, config: Config) -> tuple[float, int, Metrics]:
        result = self._client.evaluate(parameters, config)
        self._client.save_state(self._context.state)
        return result


def _is_coo(payload: NDArrays) -> bool:
    """Whether ``payload`` is laid out as COO (``3k + 1`` arrays, ``k`` names) rather than
    as dense layers with names (``k + 1``); an empty selection (names only) is both."""
    if not is_packed(payload):
        return False
    return len(payload) == 3 * np.asarray(payload[-1]).size + 1


def _check_whole_model(payload: NDArrays, layers: Mapping[str, Any]) -> None:
    _, names = unpack_layers(payload)
    received = set(names)
    missing = [name for name in layers if name not in received]
    if missing:
        raise ValueError(
            f"the first payload must hold every layer of the model; {len(missing)} missing, for example {missing[:3]}"
        )


def _array_record(layers: Mapping[str, Any]) -> ArrayRecord:
    arrays = to_numpy(layers.values())
    return ArrayRecord(array_dict={name: Array(np.ascontiguousarray(array)) for name, array in zip(layers, arrays)})
