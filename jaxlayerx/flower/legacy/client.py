"""The legacy-route Flower client (``NumPyClient``) around a Flax model, a local train
function and a jaxlayerx exchanger, for fl4health's servers and ours."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from flax import nnx
from flwr.app import Context
from flwr.client import Client, NumPyClient
from flwr.clientapp import ClientApp

from jaxlayerx.base import Config, Exchanger, FlatView, NDArrays, check_exchanger
from jaxlayerx.flower.records import BASE_ROUND_KEY, VERSION_KEY, load_client, save_client
from jaxlayerx.flower.user_functions import checked_triple, real_scalar, snapshot
from jaxlayerx.packing import is_packed, pack_layers
from jaxlayerx.protocol import ClientState, push, receive
from jaxlayerx.tree import DEFAULT_NNX_FILTER, flatten, merge_layers
from jaxlayerx.wire import Wire
from jaxlayerx.wire.compact import is_compact
from jaxlayerx.wire.fl4health import decode_positional
from jaxlayerx.wire.npy import ndarrays_nbytes
from jaxlayerx.wire.routes import SparseWire

Metrics = dict[str, Any]
#: ``(model, config) -> (trained model, num_examples, metrics)``.
TrainFn = Callable[[Any, Config], tuple[Any, int, Metrics]]
#: ``(model, config) -> (loss, num_examples, metrics)``.
EvaluateFn = Callable[[Any, Config], tuple[float, int, Metrics]]


class ExchangerClient(NumPyClient):
    """A Flower ``NumPyClient`` that trains a Flax model and exchanges layers through an exchanger.

    A thin shell over the protocol core's client (:mod:`jaxlayerx.protocol.client`). Each
    ``fit``: apply what the server sent, remember the result as ``initial_model`` (the drift
    reference without error feedback), train with ``train_fn``, and send what the exchanger
    pushes. The client knows its exchanger only through :class:`jaxlayerx.Exchanger`; its
    state (the global version it holds, the exchanger's state) is explicit and saved with
    the model (:func:`stateful_client_fn`).

    What it receives is applied whole or not at all (every layer is validated first): the
    whole model, unnamed in the model's order (fl4health's initial parameters, and what
    :class:`FedAvgDynamicLayerStrategy` sends a client first) or named; then updates:
    named layers, COO or compact entries, or (from a plain fl4health ``FedAvg`` server)
    unnamed arrays: a positional exchanger's layers in its own order, else every layer in
    model order. When the config carries ``"jaxlayerx.base-round"``, an update must be over
    the version the client holds (else :class:`jaxlayerx.protocol.VersionMismatchError`).
    A positional exchanger (fixed, exclusions) applies only its own layers after the first
    message and keeps the others local (FedBN, FedPer).

    What the client sends always carries the layer names: whole layers packed with their
    names (fl4health's layout), entries as COO (``sparse_wire="coo"``, fl4health's) or
    compact, and quantized uploads compact, so that one server can average any mix of
    layer exchangers layer by layer.

    Args:
      model: Linen variables, an ``nnx.Module`` (updated in place) or any pytree.
      exchanger: any exchanger (:class:`jaxlayerx.Exchanger`).
      train_fn: ``(model, config) -> (trained model, num_examples, metrics)``; return a new
        pytree (or the same ``nnx.Module``); never mutate the pytree passed in.
      evaluate_fn: ``(model, config) -> (loss, num_examples, metrics)``; optional.
      nnx_filter: which NNX variables are layers.
      sparse_wire: the layout of a sparse exchanger's uploads, ``"coo"`` or ``"compact"``.

    Fit metrics gain ``payload_bytes`` (bytes of the serialized payload, as Flower sends
    it) and ``layers_sent``.
    """

    def __init__(
        self,
        model: Any,
        exchanger: Exchanger,
        train_fn: TrainFn,
        evaluate_fn: EvaluateFn | None = None,
        *,
        nnx_filter: nnx.filterlib.Filter = DEFAULT_NNX_FILTER,
        sparse_wire: SparseWire = "coo",
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
        self.wire = Wire("ndarrays", sparse_wire)
        self.state = ClientState(exchange=exchanger.init_state())
        self.initial_model: Any = None
        self._layers_sent = 0

    @property
    def initialized(self) -> bool:
        """Whether the client holds a model from the server."""
        return self.state.version is not None

    def get_parameters(self, config: Config) -> NDArrays:
        """Every layer of the model, packed with names."""
        layers = self._layers()
        return pack_layers(list(layers.values()), list(layers))

    def fit(self, parameters: NDArrays, config: Config) -> tuple[NDArrays, int, Metrics]:
        self.receive(parameters, config)
        self.initial_model = snapshot(self.model)
        model, num_examples, metrics = checked_triple(
            self.train_fn(self.model, dict(config)), "train_fn", "(model, num_examples, metrics)"
        )
        self.model = model
        payload = self.payload()
        metrics = {**metrics, "payload_bytes": ndarrays_nbytes(payload), "layers_sent": self._layers_sent}
        return payload, num_examples, metrics

    def evaluate(self, parameters: NDArrays, config: Config) -> tuple[float, int, Metrics]:
        if self.evaluate_fn is None:
            raise NotImplementedError("this ExchangerClient was built without an evaluate_fn")
        self.receive(parameters, config)
        loss, num_examples, metrics = checked_triple(
            self.evaluate_fn(self.model, dict(config)), "evaluate_fn", "(loss, num_examples, metrics)"
        )
        return real_scalar(loss, "loss"), num_examples, metrics

    def receive(self, parameters: NDArrays, config: Config | None = None) -> None:
        """Applies a server payload to the model (all of it, validated first, or nothing).

        Raises:
          ValueError: the first payload does not hold every layer; a malformed payload; an
            update over a version the client does not hold.
          KeyError, TypeError: an unknown layer, a lossy dtype.
        """
        config = {} if config is None else config
        arrays = list(parameters)
        layers = self._layers()
        base = int(config.get(BASE_ROUND_KEY, -2))  # -2: the server does not say
        positional = not is_packed(arrays) and not is_compact(arrays)
        if positional and self.initialized and base == -2 and self.exchanger.payload_kind == "positional":
            names = [name for name, sends in self.exchanger.send_mask(layers, layers).items() if bool(sends)]
            payload = decode_positional(arrays, names, layers)  # a plain FedAvg server's: its own layers, its order
            whole = False
        else:
            # A server that states no version (fl4health's) sends the whole model first, and a
            # plain FedAvg one sends it unnamed every round.
            whole = base == -1 or (base == -2 and (positional or not self.initialized))
            payload = self.wire.decode(arrays, layers, whole_model=whole)
        version = config.get(VERSION_KEY)
        self.model, self.state = receive(
            self.exchanger,
            payload,
            self.model,
            self.state,
            layout=layers,
            whole_model=whole,
            base=base if base >= 0 else None,
            version=None if version is None else int(version),
        )

    def payload(self, config: Config | None = None) -> NDArrays:
        """What the exchanger sends for the current model, with the layer names."""
        pushed, self.state = push(self.exchanger, self.model, self.initial_model, self.state)
        self._layers_sent = len(pushed)
        return cast(NDArrays, self.wire.encode(pushed, sparse=self.exchanger.payload_kind == "sparse"))

    def save_state(self, state: Any) -> None:
        """Writes the model's layers, the held version and the exchanger's state into a Flower ``RecordDict``."""
        save_client(state, self._layers(), self.state)

    def load_state(self, state: Any) -> None:
        """Restores what :meth:`save_state` wrote (nothing happens for an empty state)."""
        layers, saved = load_client(state)
        if saved is None:
            return
        self.model = merge_layers(self.model, layers, nnx_filter=self.nnx_filter)
        self.state = saved

    def _layers(self) -> FlatView:
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
