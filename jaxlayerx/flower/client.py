"""A Flower client around a Flax model, a local train function and a jaxlayerx exchanger."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.client import Client, ClientApp, NumPyClient

from jaxlayerx.aggregation import is_example_count
from jaxlayerx.exchangers import SparseCooParameterExchanger
from jaxlayerx.flower.payloads import conform_payload, named_payload
from jaxlayerx.packing import NDArrays, is_packed, pack_layers, payload_nbytes, to_numpy
from jaxlayerx.tree import DEFAULT_NNX_FILTER, flatten, merge_layers

Config = dict[str, Any]
Metrics = dict[str, Any]
#: ``(model, config) -> (trained model, num_examples, metrics)``.
TrainFn = Callable[[Any, Config], tuple[Any, int, Metrics]]
#: ``(model, config) -> (loss, num_examples, metrics)``.
EvaluateFn = Callable[[Any, Config], tuple[float, int, Metrics]]

#: Keys of the client's saved state in a Flower ``Context.state``.
STATE_LAYERS = "jaxlayerx.layers"
STATE_FLAGS = "jaxlayerx.flags"


class ExchangerClient(NumPyClient):
    """A Flower ``NumPyClient`` that trains a Flax model and exchanges layers through an exchanger.

    Each ``fit``: apply what the server sent, remember the result as ``initial_model`` (the
    drift reference of a :class:`~jaxlayerx.DynamicLayerExchanger`), train with
    ``train_fn``, and send ``exchanger.push_parameters(model, initial_model, config)``.

    What the client receives is applied whole or not at all (every layer is validated
    first). The first payload must hold every layer of the model: packed with names (what
    :class:`FedAvgDynamicLayerStrategy` sends a new client) or, fl4health's initial
    parameters, one unnamed array per layer in flatten order. Later payloads hold named
    layers, or (from a plain fl4health ``FedAvg`` server) the exchanger's layers unnamed, in
    its order; a fixed or exclusions exchanger applies only its own layers and keeps the
    others local (FedBN, FedPer).

    What the client sends always carries the layer names: a dynamic exchanger's packed
    payload as is, another exchanger's layers packed with their names, so one server can
    average any mix of exchangers layer by layer.

    Args:
      model: Linen variables, an ``nnx.Module`` (updated in place) or any pytree.
      exchanger: any jaxlayerx exchanger.
      train_fn: ``(model, config) -> (trained model, num_examples, metrics)``; return a new
        pytree (or the same ``nnx.Module``); never mutate the pytree passed in.
      evaluate_fn: ``(model, config) -> (loss, num_examples, metrics)``; optional.
      nnx_filter: which NNX variables are layers.

    Fit metrics gain ``payload_bytes`` (array bytes sent, names included) and
    ``layers_sent``.
    """

    def __init__(
        self,
        model: Any,
        exchanger: Any,
        train_fn: TrainFn,
        evaluate_fn: EvaluateFn | None = None,
        *,
        nnx_filter: Any = DEFAULT_NNX_FILTER,
    ) -> None:
        if not callable(train_fn):
            raise TypeError("train_fn must be callable: (model, config) -> (model, num_examples, metrics)")
        if evaluate_fn is not None and not callable(evaluate_fn):
            raise TypeError("evaluate_fn must be callable: (model, config) -> (loss, num_examples, metrics)")
        for method in ("push_parameters", "pull_parameters"):
            if not callable(getattr(exchanger, method, None)):
                raise TypeError(f"exchanger must have a {method} method, got {type(exchanger).__name__}")
        if isinstance(exchanger, SparseCooParameterExchanger):
            raise TypeError(
                "ExchangerClient exchanges whole layers; sparse COO payloads need a sparse server "
                "strategy, which jaxlayerx.flower does not provide yet (use SparseCooParameterExchanger "
                "with FedAvgSparseCooTensor directly)"
            )
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
        self.initial_model = _snapshot(self.model)
        model, num_examples, metrics = _checked_triple(
            self.train_fn(self.model, dict(config)), "train_fn", "(model, num_examples, metrics)"
        )
        self.model = model
        payload = self.payload(config)
        metrics = {**metrics, "payload_bytes": payload_nbytes(payload), "layers_sent": len(payload) - 1}
        return payload, num_examples, metrics

    def evaluate(self, parameters: NDArrays, config: Config) -> tuple[float, int, Metrics]:
        if self.evaluate_fn is None:
            raise NotImplementedError("this ExchangerClient was built without an evaluate_fn")
        self.receive(parameters)
        loss, num_examples, metrics = _checked_triple(
            self.evaluate_fn(self.model, dict(config)), "evaluate_fn", "(loss, num_examples, metrics)"
        )
        return _real_scalar(loss, "loss"), num_examples, metrics

    def receive(self, parameters: NDArrays) -> None:
        """Applies a server payload to the model (all of it, validated first, or nothing).

        Raises:
          ValueError: the first payload does not hold every layer; a malformed payload.
          KeyError, TypeError: an unknown layer, a lossy dtype.
        """
        layers = self._layers()
        expected = _exchanged_layers(self.exchanger, self.model, layers) if self.initialized else list(layers)
        parameters = list(parameters)
        if not is_packed(parameters):  # fl4health's unnamed payloads: the expected layers in order
            parameters = named_payload(parameters, expected)
        received = conform_payload(parameters, layers)
        if not self.initialized:
            missing = [name for name in layers if name not in received]
            if missing:
                raise ValueError(
                    f"the first payload must hold every layer of the model; {len(missing)} missing, "
                    f"for example {missing[:3]}"
                )
        else:
            keep = set(expected)
            received = {name: value for name, value in received.items() if name in keep}
        self.model = merge_layers(self.model, received, nnx_filter=self.nnx_filter)
        self.initialized = True

    def payload(self, config: Config | None = None) -> NDArrays:
        """What the exchanger pushes for the current model, packed with names."""
        pushed = self.exchanger.push_parameters(self.model, initial_model=self.initial_model, config=config)
        if is_packed(pushed):
            return list(pushed)
        return named_payload(to_numpy(pushed), _exchanged_layers(self.exchanger, self.model, self._layers()))

    def save_state(self, state: Any) -> None:
        """Writes the model's layers and the client's flags into a Flower ``RecordDict``."""
        layers = self._layers()
        state[STATE_LAYERS] = ArrayRecord(
            array_dict={name: Array(np.ascontiguousarray(array)) for name, array in zip(layers, to_numpy(layers.values()))}
        )
        state[STATE_FLAGS] = ConfigRecord({"initialized": self.initialized})

    def load_state(self, state: Any) -> None:
        """Restores what :meth:`save_state` wrote (nothing happens for an empty state)."""
        if STATE_LAYERS not in state:
            return
        record = state[STATE_LAYERS]
        saved = {name: record[name].numpy() for name in record.keys()}
        self.model = merge_layers(self.model, saved, nnx_filter=self.nnx_filter)
        self.initialized = bool(state[STATE_FLAGS]["initialized"])

    def _layers(self) -> Mapping[str, Any]:
        return flatten(self.model, nnx_filter=self.nnx_filter)


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
        if not isinstance(client, ExchangerClient):
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


def _exchanged_layers(exchanger: Any, model: Any, layers: Mapping[str, Any]) -> list[str]:
    """The layers ``exchanger`` sends and applies: its own list, else every layer."""
    if callable(getattr(exchanger, "get_layers_to_transfer", None)):
        return list(exchanger.get_layers_to_transfer(model))
    if hasattr(exchanger, "layers_to_transfer"):
        return list(exchanger.layers_to_transfer)
    return list(layers)


def _snapshot(model: Any) -> Any:
    """A copy of ``model`` that later in-place updates do not reach.

    An ``nnx.Module`` is cloned; a pytree gets new containers around the same (immutable)
    arrays, so replacing a leaf of the trained model's dicts leaves the snapshot as it was.
    """
    if isinstance(model, nnx.Module):
        return nnx.clone(model)
    return jax.tree.map(lambda leaf: leaf, model)


def _checked_triple(result: Any, what: str, form: str) -> tuple[Any, int, Metrics]:
    if not isinstance(result, tuple) or len(result) != 3:
        raise TypeError(f"{what} must return {form}, got {type(result).__name__}")
    first, num_examples, metrics = result
    if not is_example_count(num_examples):
        raise TypeError(f"{what} must return an integer num_examples >= 0, got {num_examples!r}")
    if not isinstance(metrics, Mapping):
        raise TypeError(f"{what} must return a metrics dict, got {type(metrics).__name__}")
    return first, int(num_examples), dict(metrics)


def _real_scalar(value: Any, what: str) -> float:
    """``value`` as a float: a Python or numpy real, or a 0-d numpy/JAX real array."""
    if np.ndim(value) == 0 and not isinstance(value, (bool, np.bool_)):
        dtype = np.asarray(value).dtype
        if dtype.kind in "iuf" or dtype.name == "bfloat16":
            return float(value)
    raise TypeError(f"evaluate_fn must return a real {what}, got {value!r}")
