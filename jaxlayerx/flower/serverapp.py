"""Message-API server strategies for partial and sparse exchange (Flower ``ServerApp``).

:class:`FedAvgLayers` and :class:`FedAvgSparse` are Flower ``flwr.serverapp.strategy``
strategies, built on Flower's ``FedAvg`` (its options, node sampling and metric
aggregation), thin shells over the framework-free :class:`jaxlayerx.protocol.ExchangeServer`:
nodes send only some layers (``FedAvgLayers``) or some entries (``FedAvgSparse``), each is
averaged over the nodes that sent it, and each node is sent only what it lacks. Use them
in a ``ServerApp``::

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvgLayers(min_available_nodes=3, checkpoint_dir="ckpt", resume=True)
        result = strategy.start(grid, arrays_to_record(flatten(model)), num_rounds=10)

The protocol (what each message carries) is in ``docs/flower.md``.
"""

from __future__ import annotations

import collections
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from jaxlayerx.contributions import EXAMPLE_COUNT_RULE, is_example_count, shown_count
from jaxlayerx.flower.checkpoint import load_checkpoint, save_checkpoint
from jaxlayerx.flower.history import NodeReply, RoundRecord
from jaxlayerx.flower.metrics import agreeing_metrics
from jaxlayerx.flower.records import (
    ARRAYS_KEY,
    BASE_ROUND_KEY,
    NUM_EXAMPLES_KEY,
    SERVER_ROUND_KEY,
    VERSION_KEY,
    arrays_to_record,
    payload_to_record,
    record_to_arrays,
    record_to_payload,
)
from jaxlayerx.protocol import ExchangeServer, Reply
from jaxlayerx.protocol.accounting import LayerSpec, download_nbytes
from jaxlayerx.wire import MESSAGE_API

logger = logging.getLogger("jaxlayerx.flower")

#: Metric keys the strategies add to each round's aggregated train metrics.
ACCEPTED_KEY = "jaxlayerx.accepted"
REJECTED_KEY = "jaxlayerx.rejected"
FAILURES_KEY = "jaxlayerx.failures"
MISSING_KEY = "jaxlayerx.missing"
LAYERS_KEY = "jaxlayerx.layers-aggregated"
SERVER_BYTES_SENT_KEY = "jaxlayerx.server-bytes-sent"
SERVER_BYTES_RECEIVED_KEY = "jaxlayerx.server-bytes-received"
WEIGHTS_RECEIVED_KEY = "jaxlayerx.weights-received"

MetricsAggregation = Callable[[list[RecordDict], str], MetricRecord]


class ExchangeStrategy(FedAvg):
    """Flower's Message-API ``FedAvg`` over :class:`jaxlayerx.protocol.ExchangeServer`.

    Nodes reply with a compact ``ArrayRecord`` (:mod:`jaxlayerx.flower.records`) of what
    they chose to send and their example count. The strategy keeps the full global model:
    each layer (entry) is averaged over the replies holding it, or moved by the mean change
    over the round's replies (``average_over``), and what nobody sent keeps its value bit
    for bit. :meth:`start` returns a ``Result`` whose ``arrays`` is the full global model.

    Each node is sent what changed since the global version it is known to hold (it
    answered the message that carried it), with ``"jaxlayerx.base-round"`` (that version;
    -1 with the whole model) and ``"jaxlayerx.round"`` (the version after merging) in the
    config. A node that never answered gets the whole model. A node whose reply is an
    error, or that never replies, is forgotten, and gets the whole model next time; the
    node is the one the message was sent to, whatever the reply says.

    A train reply is checked whole against the global model before any of it is used
    (the layout, known layer names, exact shapes, dtypes the layers accept by
    :mod:`jaxlayerx.dtypes`, finite values unless ``allow_nonfinite``, an integer example
    count from 0 to 2**64 - 1 under ``weighted_by_key`` in its first ``MetricRecord``). A reply that fails
    is dropped, its reason logged with the node id, and counted under
    ``"jaxlayerx.rejected"`` in the round's train metrics.

    Args:
      fraction_train: Flower ``FedAvg``'s: the share of the nodes sampled for training.
      fraction_evaluate: the share of the nodes sampled for evaluation (0: none).
      min_train_nodes: the fewest nodes sampled for training.
      min_evaluate_nodes: the fewest nodes sampled for evaluation.
      min_available_nodes: the nodes to wait for before sampling.
      weighted_by_key: the ``MetricRecord`` key of a reply's example count.
      arrayrecord_key: the ``RecordDict`` key of the arrays, both ways.
      configrecord_key: the ``RecordDict`` key of the config sent to the nodes.
      train_metrics_aggr_fn: ``(contents, weighted_by_key) -> MetricRecord`` over the
        accepted train replies (Flower's weighted average by default).
      evaluate_metrics_aggr_fn: the same over the evaluate replies.
      weighted_aggregation: weight nodes by their example counts (else uniformly).
      average_over: ``"senders"`` or ``"participants"`` (see :func:`jaxlayerx.masked_fedavg`).
      allow_nonfinite: accept NaN and infinite values instead of rejecting the reply.
      checkpoint_dir: save the strategy's state there after every round
        (:mod:`jaxlayerx.flower.checkpoint`); ``None``: no checkpoints.
      resume: when ``checkpoint_dir`` holds a checkpoint, :meth:`start` continues from
        it at the next round (``num_rounds`` counts all rounds, those before the restart
        included) and ignores ``initial_arrays`` but for checking its layers.
      node_timeout: the most seconds a round waits for the nodes it needs to connect
        (``max(min_available_nodes, min_train_nodes)``, or ``min_evaluate_nodes``) before
        it raises ``TimeoutError``; ``None``: :meth:`start`'s ``timeout``. Flower's own
        strategies wait without a bound.

    Attributes:
      server: the protocol core (global model, versions, what each node holds).
      history: one :class:`jaxlayerx.flower.history.RoundRecord` per round.
    """

    #: Whether versions and averages are per entry (sparse) rather than per layer.
    entrywise: ClassVar[bool] = False

    def __init__(
        self,
        *,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = NUM_EXAMPLES_KEY,
        arrayrecord_key: str = ARRAYS_KEY,
        configrecord_key: str = "config",
        train_metrics_aggr_fn: MetricsAggregation | None = None,
        evaluate_metrics_aggr_fn: MetricsAggregation | None = None,
        weighted_aggregation: bool = True,
        average_over: str = "senders",
        allow_nonfinite: bool = False,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        resume: bool = False,
        node_timeout: float | None = None,
    ) -> None:
        if node_timeout is not None and not node_timeout > 0:
            raise ValueError(f"node_timeout must be a positive number of seconds or None, got {node_timeout!r}")
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )
        self.weighted_aggregation = bool(weighted_aggregation)
        self.average_over = average_over
        self.allow_nonfinite = bool(allow_nonfinite)
        self.checkpoint_dir = checkpoint_dir
        self.resume = bool(resume)
        self.node_timeout = node_timeout
        self._start_timeout = 3600.0  # start()'s timeout, the default bound of the wait for nodes
        self.server = self._new_server({})
        self.history: list[RoundRecord] = []
        self._sent: list[tuple[Message, int]] = []  # the messages of the current exchange, with their node
        self._sent_bytes: dict[int, int] = {}  # bytes of the arrays each node was sent this round
        self._records: dict[int | None, ArrayRecord] = {}  # per base version, for the current version
        self._result = Result()

    def _new_server(self, layers: Mapping[str, Any]) -> ExchangeServer:
        return ExchangeServer(
            layers,
            entrywise=self.entrywise,
            weighted=self.weighted_aggregation,
            average_over=self.average_over,
            allow_nonfinite=self.allow_nonfinite,
        )

    # --- the global model ---------------------------------------------------------------

    @property
    def global_layers(self) -> collections.OrderedDict[str, np.ndarray]:
        """The global model, ``name -> numpy array``."""
        return self.server.global_layers

    @property
    def version(self) -> int:
        """The number of the last round aggregated: the label of the current global model."""
        return self.server.version

    def set_global_model(self, arrays: ArrayRecord | Mapping[str, Any]) -> None:
        """Starts from ``arrays`` (an ``ArrayRecord`` or ``name -> array``) at version 0, forgetting every node."""
        layers = record_to_arrays(arrays) if isinstance(arrays, ArrayRecord) else arrays
        self.server = self._new_server(layers)
        self.history = []
        self._sent = []
        self._records.clear()
        self._result = Result()

    def global_record(self) -> ArrayRecord:
        """The full global model as an ``ArrayRecord`` keyed by layer names."""
        return arrays_to_record(self.global_layers)

    # --- messages to the nodes ----------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """Flower's sampling; each node's message holds what it lacks (``arrays`` is not used)."""
        self._sent_bytes = {}
        nodes = self._wait_for_nodes(grid, max(self.min_available_nodes, self.min_train_nodes))
        messages = super().configure_train(
            server_round, ArrayRecord(), _copy(config), cast(Grid, _NodesAsOf(grid, nodes))
        )
        return self._per_node(messages, server_round)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """Flower's sampling; each node's message holds what it lacks (``arrays`` is not used)."""
        if self.fraction_evaluate > 0:
            nodes = self._wait_for_nodes(grid, max(self.min_available_nodes, self.min_evaluate_nodes))
            grid = cast(Grid, _NodesAsOf(grid, nodes))
        return self._per_node(
            super().configure_evaluate(server_round, ArrayRecord(), _copy(config), grid), server_round
        )

    def _wait_for_nodes(self, grid: Grid, count: int) -> list[int]:
        """The connected nodes once there are ``count``; ``TimeoutError`` after ``node_timeout`` s.

        Flower's sampling then counts and samples these nodes (:class:`_NodesAsOf`): asked
        again, the grid may list fewer (a node lost in between), and Flower would wait for
        more without a bound.
        """
        timeout = self._start_timeout if self.node_timeout is None else self.node_timeout
        deadline = time.monotonic() + timeout
        while len(connected := list(grid.get_node_ids())) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(connected)} of the {count} nodes needed connected within {timeout:g} s")
            time.sleep(min(0.5, max(deadline - time.monotonic(), 0.0) + 0.01))
        return connected

    def _per_node(self, messages: Iterable[Message], server_round: int) -> list[Message]:
        per_node: list[Message] = []
        self._sent = []
        for message in messages:
            node = message.metadata.dst_node_id
            update = self.server.serve(node)
            if update.base not in self._records:
                self._records[update.base] = payload_to_record(update.payload)
            config = _copy(message.content.config_records[self.configrecord_key])
            config[SERVER_ROUND_KEY] = server_round
            config[BASE_ROUND_KEY] = -1 if update.base is None else update.base
            config[VERSION_KEY] = update.version
            record = self._records[update.base]
            content = RecordDict({self.arrayrecord_key: record, self.configrecord_key: config})
            sent = Message(content=content, dst_node_id=node, message_type=message.metadata.message_type)
            per_node.append(sent)
            self._sent.append((sent, node))
            if message.metadata.message_type == MessageType.TRAIN:
                self._sent_bytes[node] = record.count_bytes()
        return per_node

    def _sorted_replies(self, replies: Iterable[Message]) -> tuple[list[tuple[int, Message]], list[int]]:
        """Each reply with the node its message went to, and the nodes that never replied.

        A reply is matched to the message it answers (``reply_to_message_id``), so that an
        error Flower makes for an unreachable node is pinned on that node; a reply that
        matches no sent message is read by its source node id.
        """
        by_id = {message.metadata.message_id: node for message, node in self._sent if message.metadata.message_id}
        answered: list[tuple[int, Message]] = []
        for reply in replies:
            node = by_id.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            answered.append((node, reply))
        replied = {node for node, _ in answered}
        missing = sorted({node for _, node in self._sent if node not in replied})
        return answered, missing

    # --- aggregation --------------------------------------------------------------------

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Checks every reply, then averages each layer (entry) over the replies holding it.

        Returns:
          The full global model after the round and the aggregated train metrics, with
          the strategy's counts (``"jaxlayerx.accepted"``, ``"jaxlayerx.rejected"``...).
        """
        answered, missing = self._sorted_replies(replies)
        accepted: list[tuple[Reply, NodeReply, RecordDict]] = []
        rejected: list[tuple[int, str]] = []
        failures: list[tuple[int, str]] = []
        for node, reply in answered:
            if reply.has_error():
                self.server.forget(node)
                failures.append((node, str(reply.error.reason)))
                logger.warning("round %d: node %d replied with an error: %s", server_round, node, reply.error.reason)
                continue
            self.server.confirm(node)
            try:
                checked, record = self._checked_reply(node, reply.content)
            except (ValueError, TypeError, KeyError) as error:
                rejected.append((node, _reason(error)))
                logger.warning("round %d: rejected the reply of node %d: %s", server_round, node, _reason(error))
                continue
            accepted.append((checked, record, reply.content))
        for node in missing:
            self.server.forget(node)
            logger.warning("round %d: node %d never replied", server_round, node)
        change = self.server.aggregate([checked for checked, _, _ in accepted], server_round)
        self._records.clear()
        record = RoundRecord(
            server_round,
            tuple(r for _, r, _ in accepted),
            tuple(rejected),
            tuple(failures),
            tuple(missing),
            change.changed,
            tuple(sorted(self._sent_bytes.items())),
        )
        self.history.append(record)
        metrics = self._train_metrics(record, [content for _, _, content in accepted])
        self._log_round(record)
        return self.global_record(), metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Flower's weighted metric average over the replies that carry a valid weight."""
        answered, missing = self._sorted_replies(replies)
        usable: list[RecordDict] = []
        for node, reply in answered:
            if reply.has_error():
                self.server.forget(node)
                logger.warning("round %d: node %d evaluate error: %s", server_round, node, reply.error.reason)
                continue
            self.server.confirm(node)
            try:
                self._weight(reply.content)
            except (ValueError, KeyError) as error:
                logger.warning("round %d: ignored the evaluate reply of node %d: %s", server_round, node, error)
                continue
            usable.append(reply.content)
        for node in missing:
            self.server.forget(node)
        return self._aggregate_metrics(self.evaluate_metrics_aggr_fn, usable)

    def _weight(self, content: RecordDict) -> int:
        """The reply's example count: ``weighted_by_key`` of its first ``MetricRecord`` (as Flower reads it)."""
        if not content.metric_records:
            raise KeyError(f"no MetricRecord holding {self.weighted_by_key!r}")
        metrics = next(iter(content.metric_records.values()))
        if self.weighted_by_key not in metrics:
            raise KeyError(f"the MetricRecord has no {self.weighted_by_key!r}, only {sorted(metrics)}")
        weight = metrics[self.weighted_by_key]
        if not is_example_count(weight):
            raise ValueError(f"{self.weighted_by_key!r} must be {EXAMPLE_COUNT_RULE}, got {shown_count(weight)}")
        return int(cast(int, weight))

    def _checked_reply(self, node: int, content: RecordDict) -> tuple[Reply, NodeReply]:
        """A train reply checked whole: the core's reply, and its record."""
        weight = self._weight(content)
        extra = sorted(set(content.array_records) - {self.arrayrecord_key})
        if extra:
            raise ValueError(f"unexpected ArrayRecord(s) {extra}: only {self.arrayrecord_key!r} is read")
        record = content.array_records.get(self.arrayrecord_key)
        if record is None:
            raise KeyError(f"no ArrayRecord {self.arrayrecord_key!r} in the reply")
        payload = record_to_payload(record, self.global_layers, allow_nonfinite=self.allow_nonfinite)
        reply = self.server.accept(node, weight, payload)
        entries = sum(entries.sent for entries in payload.values())
        return reply, NodeReply(node, weight, tuple(payload), entries, record.count_bytes())

    def _train_metrics(self, record: RoundRecord, contents: list[RecordDict]) -> MetricRecord:
        metrics = self._aggregate_metrics(self.train_metrics_aggr_fn, contents) or MetricRecord()
        metrics[ACCEPTED_KEY] = len(record.accepted)
        metrics[REJECTED_KEY] = len(record.rejected)
        metrics[FAILURES_KEY] = len(record.failures)
        metrics[MISSING_KEY] = len(record.missing)
        metrics[LAYERS_KEY] = len(record.aggregated_layers)
        metrics[SERVER_BYTES_SENT_KEY] = record.total_bytes_sent
        metrics[SERVER_BYTES_RECEIVED_KEY] = record.total_bytes_received
        if self.entrywise:
            metrics[WEIGHTS_RECEIVED_KEY] = sum(reply.entries for reply in record.accepted)
        return metrics

    def full_exchange_bytes(self) -> int:
        """Bytes of one message holding the whole model on the Message API (what full
        exchange sends each node, and receives from it, every round)."""
        layers = [LayerSpec(name, tuple(v.shape), np.dtype(v.dtype)) for name, v in self.global_layers.items()]
        sizes = [int(np.size(v)) for v in self.global_layers.values()]
        return download_nbytes(MESSAGE_API, layers, sizes, sparse=False, whole_model=True)

    def _log_round(self, record: RoundRecord) -> None:
        weights = ""
        if self.entrywise:
            weights = f", {sum(reply.entries for reply in record.accepted)} weights received"
        logger.info(
            "round %d: averaged %d layer(s) from %d node(s); %d rejected, %d failed, %d missing; sent %s, received %s%s",
            record.server_round,
            len(record.aggregated_layers),
            len(record.accepted),
            len(record.rejected),
            len(record.failures),
            len(record.missing),
            _megabytes(record.total_bytes_sent),
            _megabytes(record.total_bytes_received),
            weights,
        )

    def _log_totals(self) -> None:
        """The run's bytes each way, and their share of what full exchange would have moved
        for the same messages (the whole model in each message sent and each reply averaged)."""
        sent = sum(record.total_bytes_sent for record in self.history)
        received = sum(record.total_bytes_received for record in self.history)
        full = self.full_exchange_bytes()
        messages = sum(len(record.bytes_sent) for record in self.history)
        replies = sum(len(record.accepted) for record in self.history)
        logger.info(
            "run: sent %s (%s of full exchange), received %s (%s of full exchange) over %d round(s)",
            _megabytes(sent),
            _share(sent, full * messages),
            _megabytes(received),
            _share(received, full * replies),
            len(self.history),
        )

    def _aggregate_metrics(self, aggregate: MetricsAggregation, contents: list[RecordDict]) -> MetricRecord | None:
        """``aggregate`` over ``contents``, less the metric keys the replies disagree on
        (:func:`jaxlayerx.flower.metrics.agreeing_metrics`; logged)."""
        weights = [self._weight(content) for content in contents]
        if not contents or sum(weights) == 0:
            return None
        contents, dropped = agreeing_metrics(contents, self.weighted_by_key)
        if dropped:
            logger.warning("the replies' metrics do not aggregate under %s: left out", dropped)
        return aggregate(contents, self.weighted_by_key)

    # --- the run and its checkpoints ------------------------------------------------------

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Flower's round loop (train, evaluate, ``evaluate_fn``) from round 1, or after the
        checkpoint's round when resuming; saves a checkpoint after every round.

        Returns:
          A ``Result`` whose ``arrays`` is the full global model, with the metrics of
          every round (those before a restart included).
        """
        first = self._begin(initial_arrays)
        self._start_timeout = float(timeout)
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        result = self._result
        if evaluate_fn is not None and first == 1:
            self._server_evaluate(evaluate_fn, 0, result)
        for server_round in range(first, num_rounds + 1):
            logger.info("[ROUND %d/%d]", server_round, num_rounds)
            messages = self.configure_train(server_round, ArrayRecord(), train_config, grid)
            _, train_metrics = self.aggregate_train(server_round, send_and_receive(grid, messages, timeout))
            if train_metrics is not None:
                result.train_metrics_clientapp[server_round] = train_metrics
            messages = self.configure_evaluate(server_round, ArrayRecord(), evaluate_config, grid)
            evaluate_metrics = self.aggregate_evaluate(server_round, send_and_receive(grid, messages, timeout))
            if evaluate_metrics is not None:
                result.evaluate_metrics_clientapp[server_round] = evaluate_metrics
            if evaluate_fn is not None:
                self._server_evaluate(evaluate_fn, server_round, result)
            self.save_checkpoint()
        self._log_totals()
        result.arrays = self.global_record()
        return result

    def _server_evaluate(
        self, evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None], server_round: int, result: Result
    ) -> None:
        metrics = evaluate_fn(server_round, self.global_record())
        if metrics is not None:
            result.evaluate_metrics_serverapp[server_round] = metrics

    def _begin(self, initial_arrays: ArrayRecord | Mapping[str, Any]) -> int:
        """Sets up the global model (restored when resuming); returns the first round to run."""
        self.set_global_model(initial_arrays)
        if not (self.resume and self.checkpoint_dir is not None):
            return 1
        loaded = load_checkpoint(self.checkpoint_dir)
        if loaded is None:
            logger.info("no checkpoint in %s: starting at round 1", self.checkpoint_dir)
            return 1
        arrays, state = loaded
        self.restore_state(arrays, state)
        logger.info("resumed from %s after round %d", self.checkpoint_dir, self.version)
        return self.version + 1

    def state(self) -> tuple[collections.OrderedDict[str, np.ndarray], dict[str, Any]]:
        """``(arrays, state)``: the protocol core's arrays, and the rest, JSON-serializable."""
        arrays, core = self.server.state()
        return arrays, {
            "round": self.version,
            "core": core,
            "optimizer": None,  # FedAvg keeps no server optimizer state
            "history": [record.to_json() for record in self.history],
            "metrics": {
                field: {str(r): dict(m) for r, m in getattr(self._result, field).items()}
                for field in ("train_metrics_clientapp", "evaluate_metrics_clientapp", "evaluate_metrics_serverapp")
            },
        }

    def restore_state(self, arrays: Mapping[str, np.ndarray], state: Mapping[str, Any]) -> None:
        """Restores what :meth:`state` returned.

        Raises:
          ValueError: the saved layers differ (names or shapes) from the current global model.
        """
        self.server.restore(arrays, state["core"])
        self._records.clear()
        self.history = [RoundRecord.from_json(data) for data in state["history"]]
        self._result = Result()
        for field, rounds in state["metrics"].items():
            setattr(self._result, field, {int(r): MetricRecord(m) for r, m in rounds.items()})

    def save_checkpoint(self) -> None:
        """Writes the state after the last round to ``checkpoint_dir`` atomically (no-op without one)."""
        if self.checkpoint_dir is not None:
            arrays, state = self.state()
            save_checkpoint(self.checkpoint_dir, arrays, state)


class FedAvgLayers(ExchangeStrategy):
    """Layer exchange on the Message API: each layer averaged over the nodes that sent it
    (fl4health's ``FedAvgDynamicLayer``); see :class:`ExchangeStrategy` for everything else."""

    entrywise = False


class FedAvgSparse(ExchangeStrategy):
    """Sparse exchange on the Message API: each entry averaged over the nodes that sent it
    (fl4health's ``FedAvgSparseCooTensor``, without its zeros for unsent entries); a node
    catching up is sent exactly the entries that changed, each layer in its cheapest
    encoding. See :class:`ExchangeStrategy` for everything else."""

    entrywise = True


#: Seconds between two pulls of replies (Flower's ``Grid.send_and_receive`` waits 3 s).
REPLY_POLL_SECONDS = 0.1


class _NodesAsOf:
    """``grid``, listing ``nodes`` as its connected nodes (for one round's sampling)."""

    def __init__(self, grid: Grid, nodes: list[int]) -> None:
        self._grid, self._nodes = grid, nodes

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def send_and_receive(
    grid: Grid, messages: Iterable[Message], timeout: float, poll: float = REPLY_POLL_SECONDS
) -> list[Message]:
    """Flower's ``Grid.send_and_receive``: pushes ``messages``, then pulls their replies until
    every one has come or ``timeout`` seconds have passed; pulling every ``poll`` seconds
    instead of every 3 s, so that a round ends as soon as its last reply is in."""
    pending = set(grid.push_messages(messages))
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while pending:
        pulled = list(grid.pull_messages(pending))
        replies.extend(pulled)
        pending -= {reply.metadata.reply_to_message_id for reply in pulled}
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(poll)
    return replies


def _megabytes(count: int) -> str:
    return f"{count / 1e6:.3f} MB"


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "n/a"


def _reason(error: BaseException) -> str:
    return str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)


def _copy(config: ConfigRecord) -> ConfigRecord:
    return ConfigRecord(dict(config))


def __getattr__(name: str) -> Any:
    """The names of the previous release, kept importable for one more with a warning."""
    renamed = {"FedAvgDynamicLayer": FedAvgLayers, "FedAvgSparseCooTensor": FedAvgSparse}
    if name in renamed:
        warnings.warn(
            f"jaxlayerx.flower.serverapp.{name} is now {renamed[name].__name__} (the old name is the core "
            f"aggregator jaxlayerx.{name}); it will be removed in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return renamed[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
