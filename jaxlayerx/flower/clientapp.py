"""A Flower Message-API ``ClientApp`` around a model, a local train function and an exchanger:
a thin shell over the protocol core's client (:mod:`jaxlayerx.protocol.client`).

Each ``train`` message is handled in the order of the protocol in :mod:`jaxlayerx.flower.records`:

1. the model is made (``make_model(context)``) and the node's saved layers, version and
   exchanger state are restored from ``context.state``;
2. the message's payload (a compact ``ArrayRecord``) is checked against the model; if its
   ``"jaxlayerx.base-round"`` is not -1, the node must hold exactly that global version,
   else the handler raises (:class:`jaxlayerx.protocol.VersionMismatchError`; Flower then
   replies with an error and the server sends the whole model next time); with -1 the
   payload is the whole model;
3. the payload is pulled through the exchanger, and the node records ``"jaxlayerx.round"``
   as the version it holds;
4. ``train_fn`` trains; the exchanger pushes; the reply holds what it sent, one compact
   ``ArrayRecord``, and a MetricRecord with ``"num-examples"``, ``"jaxlayerx.bytes-sent"``
   and ``"jaxlayerx.bytes-received"`` (bytes of the ArrayRecords, as Flower's
   ``arrays_size_mod`` counts them) and the user's metrics.

``evaluate`` messages merge the same way, then call ``evaluate_fn``. Imports come only from
``flwr.app`` and ``flwr.clientapp``.

A node answers each server round as if once. It keeps, beside its state, the state it had
before the round's first message (one more copy of its layers and exchanger state). A
second message of a kind it already handled in that round means a server resumed from the
checkpoint before the round; the node goes back to the round's start before receiving it,
so the round's replies are the ones an uninterrupted run gets, bit for bit. A server more
than one round behind (its newest checkpoint torn, the one before used) finds the node
ahead of the version it names; the node raises, and is sent the whole model next.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Mapping
from typing import Any, cast

import numpy as np
from flax import nnx
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from jaxlayerx.base import Config, Exchanger, check_exchanger
from jaxlayerx.compile_cache import OFF, cache_dir, enable_compile_cache
from jaxlayerx.flower import records
from jaxlayerx.flower.user_functions import checked_triple, real_scalar, snapshot
from jaxlayerx.protocol import ClientState, push, receive
from jaxlayerx.tree import DEFAULT_NNX_FILTER, flatten, merge_layers

Metrics = dict[str, Any]
#: ``(model, config, context) -> (trained model, num_examples, metrics)``.
TrainFn = Callable[[Any, Config, Context], tuple[Any, int, Metrics]]
#: ``(model, config, context) -> (loss, num_examples, metrics)``.
EvaluateFn = Callable[[Any, Config, Context], tuple[float, int, Metrics]]


def exchanger_client_app(
    make_model: Callable[[Context], Any],
    exchanger: Exchanger | Callable[[Any], Exchanger],
    train_fn: TrainFn,
    evaluate_fn: EvaluateFn | None = None,
    *,
    arrayrecord_key: str = records.ARRAYS_KEY,
    nnx_filter: nnx.filterlib.Filter = DEFAULT_NNX_FILTER,
    compile_cache: bool = True,
) -> ClientApp:
    """A ``ClientApp`` whose ``train`` (and, with ``evaluate_fn``, ``evaluate``) handlers run
    ``exchanger`` over the node's model (see the module docstring for each step).

    Args:
      make_model: ``context -> model`` (Linen variables, an ``nnx.Module`` or any pytree):
        the model's structure and its values before the first message; read the node's
        partition from ``context.node_config`` for the data in ``train_fn``.
      exchanger: any :class:`jaxlayerx.Exchanger` (positional, named or sparse payloads,
        quantized or not), or ``model -> exchanger`` for those built from the model
        (exclusions). Its state (:class:`jaxlayerx.ExchangeState`) is saved in and
        restored from ``context.state``.
      train_fn: ``(model, config, context) -> (trained model, num_examples, metrics)``;
        ``config`` is the message's ConfigRecord as a dict. Return a new pytree (or the
        same ``nnx.Module``); never mutate the pytree passed in.
      evaluate_fn: ``(model, config, context) -> (loss, num_examples, metrics)``.
      arrayrecord_key: the RecordDict key of the arrays (the strategy's ``arrayrecord_key``).
      nnx_filter: which NNX variables are layers.
      compile_cache: keep JAX's compiled programs on disk across messages. Flower starts a
        fresh ClientApp process for every message, which would otherwise compile the
        model's steps again each time. The folder is the node config's
        ``jax-cache-dir`` (``flower-supernode --node-config "jax-cache-dir='/path'"``;
        ``off`` turns it off), else ``$JAXLAYERX_CACHE``, else ``~/.cache/jaxlayerx/xla``
        (:mod:`jaxlayerx.compile_cache`); a cache folder set for JAX itself is left as it is.

    Metrics must be ints or floats (what a ``MetricRecord`` holds).
    """
    if not callable(make_model):
        raise TypeError("make_model must be callable: context -> model")
    if not callable(train_fn):
        raise TypeError("train_fn must be callable: (model, config, context) -> (model, num_examples, metrics)")
    if evaluate_fn is not None and not callable(evaluate_fn):
        raise TypeError("evaluate_fn must be callable: (model, config, context) -> (loss, num_examples, metrics)")
    node = _Node(make_model, exchanger, arrayrecord_key, nnx_filter, compile_cache)
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:  # pyright: ignore[reportUnusedFunction]
        model, exchanger_, state, config, received = node.receive(message, context)
        initial_model = snapshot(model)
        model, num_examples, metrics = checked_triple(
            train_fn(model, config, context), "train_fn", "(model, num_examples, metrics)"
        )
        payload, state = push(exchanger_, model, initial_model, state)
        node.save(context, model, state)
        content = RecordDict({arrayrecord_key: records.payload_to_record(payload)})
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
            model, _, state, config, received = node.receive(message, context)
            node.save(context, model, state)
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
    """What the handlers share: building the node's model and exchanger, receiving, saving."""

    def __init__(
        self,
        make_model: Callable[[Context], Any],
        exchanger: Exchanger | Callable[[Any], Exchanger],
        arrayrecord_key: str,
        nnx_filter: nnx.filterlib.Filter,
        compile_cache: bool,
    ) -> None:
        if not isinstance(cast(object, exchanger), Exchanger) and not callable(exchanger):
            check_exchanger(exchanger)  # raises, naming what is missing
        self.make_model = make_model
        self.exchanger = exchanger
        self.key = arrayrecord_key
        self.nnx_filter = nnx_filter
        self.compile_cache = compile_cache

    def receive(self, message: Message, context: Context) -> tuple[Any, Exchanger, ClientState, dict[str, Any], int]:
        """The node's model with the message's payload merged in (all of it or nothing), its
        exchanger, its state after the merge, the message's config, and the bytes received."""
        if self.compile_cache:
            enable_compile_cache(node_cache_dir(context.node_config))
        content = message.content
        config: dict[str, Any] = dict(content.config_records["config"]) if "config" in content.config_records else {}
        if records.SERVER_ROUND_KEY in config:
            rewind_to_round_start(
                context.state, int(cast(int, config[records.SERVER_ROUND_KEY])), message.metadata.message_type
            )
        model = self.make_model(context)
        exchanger = self._exchanger(model)
        layers, saved = records.load_client(context.state)
        state = ClientState(None, exchanger.init_state()) if saved is None else saved
        model = merge_layers(model, layers, nnx_filter=self.nnx_filter) if layers else model
        received = sum(record.count_bytes() for record in content.array_records.values())
        record = content.array_records.get(self.key)
        if record is None:
            return model, exchanger, state, config, received
        layout = flatten(model, nnx_filter=self.nnx_filter)
        base = int(config.get(records.BASE_ROUND_KEY, -1))
        version = config.get(records.VERSION_KEY)
        model, state = receive(
            exchanger,
            records.record_to_payload(record, layout),
            model,
            state,
            layout=layout,
            whole_model=base == -1,
            base=None if base == -1 else base,
            version=None if version is None else int(version),
        )
        return model, exchanger, state, config, received

    def save(self, context: Context, model: Any, state: ClientState) -> None:
        """Writes the node's layers, version and exchanger state into ``context.state``."""
        records.save_client(context.state, flatten(model, nnx_filter=self.nnx_filter), state)

    def _exchanger(self, model: Any) -> Exchanger:
        if isinstance(cast(object, self.exchanger), Exchanger):
            exchanger = cast(Exchanger, self.exchanger)
        else:
            exchanger = cast(Callable[[Any], Exchanger], self.exchanger)(model)
        check_exchanger(exchanger)
        return exchanger


#: ``context.state`` keys: the round a node last answered and the message kinds it handled
#: in it, and its saved state (:func:`records.save_client`) as it was before that round.
STATE_ROUND = "jaxlayerx.round"
ROUND_START = "jaxlayerx.round-start."
_SAVED = (records.STATE_LAYERS, records.STATE_VERSION, records.STATE_EXCHANGE)


def rewind_to_round_start(saved: RecordDict, server_round: int, kind: str) -> None:
    """Before a message of ``kind`` in ``server_round``: a new round keeps the node's saved
    state as the round's start; a kind already handled in the round (a resumed server
    repeating it) puts the round's start back first."""
    seen = saved.config_records.get(STATE_ROUND)
    last = None if seen is None else int(cast(int, seen["round"]))
    handled = [] if seen is None else [str(k) for k in cast(list[str], seen["handled"])]
    if last != server_round:
        _copy_saved(saved, "", ROUND_START)
        handled = []
    elif kind in handled:
        _copy_saved(saved, ROUND_START, "")
        handled = []
    saved[STATE_ROUND] = ConfigRecord({"round": server_round, "handled": [*handled, kind]})


def _copy_saved(saved: RecordDict, source: str, target: str) -> None:
    for key in _SAVED:
        if source + key in saved:
            saved[target + key] = saved[source + key]
        elif target + key in saved:
            del saved[target + key]


#: The node config key naming the ClientApp's compilation cache folder (``off``: none).
CACHE_DIR_KEY = "jax-cache-dir"


def node_cache_dir(node_config: Mapping[str, Any]) -> pathlib.Path | None:
    """The compilation cache folder of a node: its config's ``jax-cache-dir`` (``None`` for
    ``off`` or an empty value), else :func:`jaxlayerx.compile_cache.cache_dir`."""
    if CACHE_DIR_KEY not in node_config:
        return cache_dir()
    setting = str(node_config[CACHE_DIR_KEY]).strip()
    if not setting or setting.lower() in OFF:
        return None
    return pathlib.Path(setting).expanduser()


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
