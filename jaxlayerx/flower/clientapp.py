"""A Flower Message-API ``ClientApp`` around a model, a local train function and an exchanger.

Each ``train`` message is handled in the order of the protocol in :mod:`jaxlayerx.flower.records`:

1. the model is made (``make_model(context)``) and the node's saved layers, version and
   error-feedback reference are restored from ``context.state``;
2. if the message's ``"jaxlayerx.base-round"`` is not -1, the node must hold exactly that
   global version, else the handler raises (Flower then replies with an error and the
   server sends the whole model next time); with -1 the ``"arrays"`` hold the whole model;
3. the received arrays are merged in (pulled through the exchanger), and the node records
   ``"jaxlayerx.round"`` as the version it holds;
4. ``train_fn`` trains; the exchanger pushes; the reply holds only the sent layers
   (dense: one ArrayRecord; sparse: the COO records of :func:`records.sparse_to_records`)
   and a MetricRecord with ``"num-examples"``, ``"jaxlayerx.bytes-sent"`` and
   ``"jaxlayerx.bytes-received"`` (bytes of the ArrayRecords, as Flower's ``arrays_size_mod``
   counts them) and the user's metrics.

``evaluate`` messages merge the same way, then call ``evaluate_fn``. Imports come only from
``flwr.app`` and ``flwr.clientapp``.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping
from typing import Any, cast

import numpy as np
from flax import nnx
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from jaxlayerx.base import Config, Exchanger, check_exchanger
from jaxlayerx.coo import SparseLayer, read_coo, write_coo
from jaxlayerx.flower import records
from jaxlayerx.flower._user_results import checked_triple, real_scalar, snapshot
from jaxlayerx.flower.payloads import checked_payload
from jaxlayerx.packing import pack_layers, unpack_layers
from jaxlayerx.tree import DEFAULT_NNX_FILTER, flatten, merge_layers

Metrics = dict[str, Any]
#: ``(model, config, context) -> (trained model, num_examples, metrics)``.
TrainFn = Callable[[Any, Config, Context], tuple[Any, int, Metrics]]
#: ``(model, config, context) -> (loss, num_examples, metrics)``.
EvaluateFn = Callable[[Any, Config, Context], tuple[float, int, Metrics]]

#: ``context.state`` keys: the node's layers, its version, its error-feedback reference.
STATE_LAYERS = "jaxlayerx.layers"
STATE_VERSION = "jaxlayerx.version"
STATE_REFERENCE = "jaxlayerx.reference"


class VersionMismatchError(ValueError):
    """The message's arrays are a delta over a global version the node does not hold."""


def exchanger_client_app(
    make_model: Callable[[Context], Any],
    exchanger: Exchanger | Callable[[Any], Exchanger],
    train_fn: TrainFn,
    evaluate_fn: EvaluateFn | None = None,
    *,
    arrayrecord_key: str = records.ARRAYS_KEY,
    nnx_filter: nnx.filterlib.Filter = DEFAULT_NNX_FILTER,
) -> ClientApp:
    """A ``ClientApp`` whose ``train`` (and, with ``evaluate_fn``, ``evaluate``) handlers run
    ``exchanger`` over the node's model (see the module docstring for each step).

    Args:
      make_model: ``context -> model`` (Linen variables, an ``nnx.Module`` or any pytree):
        the model's structure and its values before the first message; read the node's
        partition from ``context.node_config`` for the data in ``train_fn``.
      exchanger: any :class:`jaxlayerx.Exchanger` (positional, named or sparse payloads),
        or ``model -> exchanger`` for those built from the model (exclusions). With
        error feedback, its ``reference`` is saved in and restored from ``context.state``.
      train_fn: ``(model, config, context) -> (trained model, num_examples, metrics)``;
        ``config`` is the message's ConfigRecord as a dict. Return a new pytree (or the
        same ``nnx.Module``); never mutate the pytree passed in.
      evaluate_fn: ``(model, config, context) -> (loss, num_examples, metrics)``.
      arrayrecord_key: the RecordDict key of the arrays (the strategy's ``arrayrecord_key``).
      nnx_filter: which NNX variables are layers.

    Metrics must be ints or floats (what a ``MetricRecord`` holds).
    """
    if not callable(make_model):
        raise TypeError("make_model must be callable: context -> model")
    if not callable(train_fn):
        raise TypeError("train_fn must be callable: (model, config, context) -> (model, num_examples, metrics)")
    if evaluate_fn is not None and not callable(evaluate_fn):
        raise TypeError("evaluate_fn must be callable: (model, config, context) -> (loss, num_examples, metrics)")
    node = _Node(make_model, exchanger, arrayrecord_key, nnx_filter)
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:  # pyright: ignore[reportUnusedFunction]
        model, exchanger_, config, received = node.receive(message, context)
        initial_model = snapshot(model)
        model, num_examples, metrics = checked_triple(
            train_fn(model, config, context), "train_fn", "(model, num_examples, metrics)"
        )
        sent = node.push(exchanger_, model, initial_model, config)
        node.save(context, model, exchanger_, _held_version(config))
        content = RecordDict(dict[str, Any](sent))
        content["metrics"] = _metric_record(
            metrics,
            {
                records.NUM_EXAMPLES_KEY: num_examples,
                records.BYTES_SENT_KEY: records.content_nbytes(content),
                records.BYTES_RECEIVED_KEY: received,
            },
        )
        return Message(content, reply_to=message)

    if evaluate_fn is not None:

        @app.evaluate()
        def evaluate(message: Message, context: Context) -> Message:  # pyright: ignore[reportUnusedFunction]
            model, exchanger_, config, received = node.receive(message, context)
            node.save(context, model, exchanger_, _held_version(config))
            loss, num_examples, metrics = checked_triple(
                evaluate_fn(model, config, context), "evaluate_fn", "(loss, num_examples, metrics)"
            )
            metric_record = _metric_record(
                metrics,
                {
                    records.NUM_EXAMPLES_KEY: num_examples,
                    "loss": real_scalar(loss, "loss"),
                    records.BYTES_RECEIVED_KEY: received,
                },
            )
            return Message(RecordDict({"metrics": metric_record}), reply_to=message)

    return app


class _Node:
    """What the handlers share: building the node's model and exchanger, merging, pushing, saving."""

    def __init__(
        self,
        make_model: Callable[[Context], Any],
        exchanger: Exchanger | Callable[[Any], Exchanger],
        arrayrecord_key: str,
        nnx_filter: nnx.filterlib.Filter,
    ) -> None:
        if not isinstance(cast(object, exchanger), Exchanger) and not callable(exchanger):
            check_exchanger(exchanger)  # raises, naming what is missing
        self.make_model = make_model
        self.exchanger = exchanger
        self.key = arrayrecord_key
        self.nnx_filter = nnx_filter

    def receive(self, message: Message, context: Context) -> tuple[Any, Exchanger, dict[str, Any], int]:
        """The node's model with the message's arrays merged in (all of them or nothing),
        its exchanger, the message's config, and the bytes of arrays received."""
        content = message.content
        config: dict[str, Any] = dict(content.config_records["config"]) if "config" in content.config_records else {}
        model = self.make_model(context)
        exchanger = self._exchanger(model)
        held = self._restore(context, exchanger)
        model = merge_layers(model, held.layers, nnx_filter=self.nnx_filter) if held.layers else model
        base = int(config.get(records.BASE_ROUND_KEY, -1))
        if base != -1 and held.version != base:
            raise VersionMismatchError(
                f"node {context.node_id}: the arrays are the changes since global version {base}, but the node "
                f"holds {'no global model' if held.version is None else f'version {held.version}'}"
            )
        layers = flatten(model, nnx_filter=self.nnx_filter)
        if records.is_sparse(content):
            sparse = records.records_to_sparse(content, values_key=self.key)
            if base == -1:
                raise ValueError(f"node {context.node_id}: the whole model must come dense, got a sparse payload")
            model = exchanger.pull_parameters(write_coo(sparse), model)
        elif self.key in content.array_records:
            dense = records.record_to_arrays(content.array_records[self.key])
            if base == -1:
                missing = [name for name in layers if name not in dense]
                if missing:
                    raise ValueError(
                        f"node {context.node_id}: base round -1 means the arrays hold the whole model; "
                        f"{len(missing)} layer(s) missing, for example {missing[:3]}"
                    )
            model = self._pull_dense(exchanger, model, layers, dense, first=held.version is None)
        received = sum(record.count_bytes() for record in content.array_records.values())
        return model, exchanger, config, received

    def push(self, exchanger: Exchanger, model: Any, initial_model: Any, config: Config) -> dict[str, ArrayRecord]:
        """The exchanger's payload as ArrayRecords: the sent layers, dense or in COO form."""
        payload = list(exchanger.push_parameters(model, initial_model=initial_model, config=config))
        if exchanger.payload_kind == "sparse":
            return records.sparse_to_records(read_coo(payload), values_key=self.key)
        if exchanger.payload_kind == "named":
            arrays, names = unpack_layers(payload)
            return {self.key: records.arrays_to_record(dict(zip(names, arrays)))}
        names = _exchanged(exchanger, flatten(model, nnx_filter=self.nnx_filter))
        if len(names) != len(payload):
            raise ValueError(f"the exchanger pushed {len(payload)} arrays but its send_mask marks {len(names)} layers")
        return {self.key: records.arrays_to_record(dict(zip(names, payload)))}

    def save(self, context: Context, model: Any, exchanger: Exchanger, version: int) -> None:
        """Writes the node's layers, version and error-feedback reference into ``context.state``."""
        state = context.state
        state[STATE_LAYERS] = records.arrays_to_record(flatten(model, nnx_filter=self.nnx_filter))
        state[STATE_VERSION] = ConfigRecord({"version": version})
        if exchanger.error_feedback:
            state[STATE_REFERENCE] = records.arrays_to_record(_reference(exchanger))

    def _exchanger(self, model: Any) -> Exchanger:
        if isinstance(cast(object, self.exchanger), Exchanger):
            exchanger = cast(Exchanger, self.exchanger)
        else:
            exchanger = cast(Callable[[Any], Exchanger], self.exchanger)(model)
        check_exchanger(exchanger)
        return exchanger

    def _restore(self, context: Context, exchanger: Exchanger) -> _Held:
        state = context.state
        saved_layers = state.array_records.get(STATE_LAYERS)
        layers: Mapping[str, np.ndarray] = {} if saved_layers is None else records.record_to_arrays(saved_layers)
        version = None
        if STATE_VERSION in state.config_records:
            saved = int(cast(Any, state.config_records[STATE_VERSION]["version"]))
            version = None if saved < 0 else saved
        if exchanger.error_feedback:  # the exchanger may serve several nodes in one process
            saved_reference = state.array_records.get(STATE_REFERENCE)
            cast(Any, exchanger).reference = (
                records.record_to_arrays(saved_reference) if saved_reference is not None else {}
            )
        return _Held(layers, version)

    def _pull_dense(
        self, exchanger: Exchanger, model: Any, layers: Mapping[str, Any], dense: Mapping[str, np.ndarray], first: bool
    ) -> Any:
        """Dense layers through the exchanger: a named one pulls them, a sparse one pulls
        them as COO layers holding every weight, a positional one takes all of them on the
        node's first message and afterwards only the layers it exchanges (FedBN, FedPer)."""
        payload = pack_layers(list(dense.values()), list(dense))
        if exchanger.payload_kind == "named":
            return exchanger.pull_parameters(payload, model)
        checked = checked_payload(payload, layers)
        if exchanger.payload_kind == "sparse":
            return exchanger.pull_parameters(whole_layers_coo(checked), model)
        if not first:
            keep = set(_exchanged(exchanger, layers))
            checked = collections.OrderedDict((name, value) for name, value in checked.items() if name in keep)
        return merge_layers(model, checked, nnx_filter=self.nnx_filter)


class _Held:
    """What ``context.state`` held: the node's layers and the global version (None: none yet)."""

    def __init__(self, layers: Mapping[str, np.ndarray], version: int | None) -> None:
        self.layers = layers
        self.version = version


def whole_layers_coo(layers: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Dense layers as a COO payload holding every weight of each, in row-major order."""
    return write_coo(
        {
            name: SparseLayer(layer.reshape(-1), np.arange(layer.size, dtype=np.int64), layer.shape)
            for name, layer in layers.items()
        }
    )


def _held_version(config: Mapping[str, Any]) -> int:
    """The global version the node holds after merging (-1 when the message does not say)."""
    return int(config.get(records.VERSION_KEY, -1))


def _exchanged(exchanger: Exchanger, layers: Mapping[str, Any]) -> list[str]:
    """The layers a positional exchanger sends and applies, in its mask's order."""
    return [name for name, sends in exchanger.send_mask(layers, layers).items() if bool(sends)]


def _reference(exchanger: Exchanger) -> Mapping[str, Any]:
    reference = getattr(exchanger, "reference", None)
    if not isinstance(cast(object, reference), Mapping):
        raise TypeError(f"{type(exchanger).__name__} has error_feedback=True but no reference mapping")
    return cast(Mapping[str, Any], reference)


def _metric_record(user: Mapping[str, Any], own: Mapping[str, int | float]) -> MetricRecord:
    """The user's metrics (ints and floats; numpy scalars converted) and the app's own."""
    metrics: dict[str, int | float] = {}
    for name, value in user.items():
        if isinstance(value, (bool, np.bool_)) or np.ndim(value) != 0 or np.asarray(value).dtype.kind not in "iuf":
            raise TypeError(f"metric {name!r} must be an int or a float (a MetricRecord value), got {value!r}")
        metrics[name] = int(value) if np.asarray(value).dtype.kind in "iu" else float(value)
    clash = sorted(set(metrics) & set(own))
    if clash:
        raise ValueError(f"metrics {clash} are set by the client app itself; rename them")
    return MetricRecord({**metrics, **own})
