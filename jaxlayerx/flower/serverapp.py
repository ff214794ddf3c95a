"""Message-API server strategies for partial and sparse exchange (Flower ``ServerApp``).

:class:`FedAvgDynamicLayer` and :class:`FedAvgSparseCooTensor` are Flower
``flwr.serverapp.strategy`` strategies, built on Flower's ``FedAvg`` (its options, node
sampling and metric aggregation), for nodes that send only some layers (dense) or some
weights (COO layout of :mod:`jaxlayerx.flower.records`). Use them in a ``ServerApp``::

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvgDynamicLayer(min_available_nodes=3, checkpoint_dir="ckpt", resume=True)
        result = strategy.start(grid, arrays_to_record(flatten(model)), num_rounds=10)

The protocol (what each message carries) is in ``docs/flower.md``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from jaxlayerx._results import is_example_count
from jaxlayerx.aggregation import FedAvgDynamicLayer as _CoreDynamicLayer
from jaxlayerx.aggregation import cast_mean
from jaxlayerx.coo import SparseLayer, read_coo, write_coo
from jaxlayerx.flower.checkpoint import load_checkpoint, save_checkpoint
from jaxlayerx.flower.payloads import checked_payload
from jaxlayerx.flower.records import (
    ARRAYS_KEY,
    BASE_ROUND_KEY,
    COO_INDICES_KEY,
    COO_SHAPES_KEY,
    NUM_EXAMPLES_KEY,
    SERVER_ROUND_KEY,
    VERSION_KEY,
    arrays_to_record,
    content_nbytes,
    record_to_arrays,
    records_to_coo_payload,
)
from jaxlayerx.packing import pack_layers
from jaxlayerx.sparse_aggregation import FedAvgSparseCooTensor as _CoreSparseCoo

logger = logging.getLogger("jaxlayerx.flower")

#: Metric keys the strategies add to each round's aggregated train metrics.
ACCEPTED_KEY = "jaxlayerx.accepted"
REJECTED_KEY = "jaxlayerx.rejected"
FAILURES_KEY = "jaxlayerx.failures"
LAYERS_KEY = "jaxlayerx.layers-aggregated"
SERVER_BYTES_SENT_KEY = "jaxlayerx.server-bytes-sent"
SERVER_BYTES_RECEIVED_KEY = "jaxlayerx.server-bytes-received"

MetricsAggregation = Callable[[list[RecordDict], str], MetricRecord]


@dataclasses.dataclass(frozen=True)
class NodeReply:
    """One node's accepted train reply.

    Attributes:
      node: the Flower node id.
      num_examples: its weight (``weighted_by_key``).
      layers: the layers it sent, in its order.
      bytes_received: bytes of the arrays of its reply (``ArrayRecord.count_bytes``).
    """

    node: int
    num_examples: int
    layers: tuple[str, ...]
    bytes_received: int


@dataclasses.dataclass(frozen=True)
class RoundRecord:
    """What a strategy did in one round.

    Attributes:
      server_round: the round.
      accepted: the train replies that were averaged.
      rejected: ``(node, reason)`` for each train reply that failed validation.
      failures: nodes whose train reply was an error.
      aggregated_layers: the layers whose global value changed, sorted.
      bytes_sent: ``(node, bytes)`` of the arrays each train message carried.
    """

    server_round: int
    accepted: tuple[NodeReply, ...]
    rejected: tuple[tuple[int, str], ...]
    failures: tuple[int, ...]
    aggregated_layers: tuple[str, ...]
    bytes_sent: tuple[tuple[int, int], ...]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RoundRecord:
        return cls(
            server_round=int(data["server_round"]),
            accepted=tuple(
                NodeReply(int(a["node"]), int(a["num_examples"]), tuple(a["layers"]), int(a["bytes_received"]))
                for a in data["accepted"]
            ),
            rejected=tuple((int(node), str(reason)) for node, reason in data["rejected"]),
            failures=tuple(int(node) for node in data["failures"]),
            aggregated_layers=tuple(data["aggregated_layers"]),
            bytes_sent=tuple((int(node), int(n)) for node, n in data["bytes_sent"]),
        )


class FedAvgDynamicLayer(FedAvg):
    """Flower's Message-API ``FedAvg`` for partial exchange: each layer averaged over the nodes that sent it.

    Nodes reply with an ``ArrayRecord`` of the layers they chose to send (any subset, any
    order) and their example count. The strategy keeps the full global model: a layer is
    averaged by the core's :class:`jaxlayerx.FedAvgDynamicLayer` over the replies holding
    it, and a layer nobody sent keeps its global value bit for bit. :meth:`start` returns
    a ``Result`` whose ``arrays`` is the full global model.

    Each node is sent only the layers that changed since the global version it is known
    to hold (it answered the message that carried it), with ``"jaxlayerx.base-round"``
    (that version; -1 with the whole model) and ``"jaxlayerx.round"`` (the version after
    merging) in the config. A node that never answered gets the whole model; a node whose
    reply is an error is forgotten, and gets the whole model next time.

    A train reply is checked whole against the global model before any of it is used
    (known layer names, exact shapes, dtypes the layers accept by :mod:`jaxlayerx.dtypes`,
    finite values unless ``allow_nonfinite``, an integer example count >= 0 under
    ``weighted_by_key`` in its first ``MetricRecord``). A reply that fails is dropped, its
    reason logged with the node id, and counted under ``"jaxlayerx.rejected"`` in the
    round's train metrics.

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
      global_layers: the global model, ``name -> numpy array``.
      history: one :class:`RoundRecord` per round.
    """

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
        self.allow_nonfinite = bool(allow_nonfinite)
        self.checkpoint_dir = checkpoint_dir
        self.resume = bool(resume)
        self.node_timeout = node_timeout
        self._start_timeout = 3600.0  # start()'s timeout, the default bound of the wait for nodes
        self.global_layers: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self.history: list[RoundRecord] = []
        self.version = 0  # rounds aggregated so far: the label of the current global model
        self._updated_in: dict[str, int] = {}  # the version in which each layer last changed
        self._node_versions: dict[int, int] = {}  # the global version each node is known to hold
        self._in_flight: dict[int, int] = {}  # the version each node was sent, not yet confirmed
        self._sent_bytes: dict[int, int] = {}  # bytes of the arrays each node was sent this round
        self._records: dict[int | None, ArrayRecord] = {}  # per base version, for the current version
        self._result = Result()

    # --- the global model ---------------------------------------------------------------

    def set_global_model(self, arrays: ArrayRecord | Mapping[str, Any]) -> None:
        """Starts from ``arrays`` (an ``ArrayRecord`` or ``name -> array``) at version 0, forgetting every node."""
        layers = record_to_arrays(arrays) if isinstance(arrays, ArrayRecord) else arrays
        self.global_layers = collections.OrderedDict((name, np.array(a, copy=True)) for name, a in layers.items())
        self._updated_in = dict.fromkeys(self.global_layers, 0)
        self.version = 0
        self.history = []
        self._node_versions.clear()
        self._in_flight.clear()
        self._records.clear()
        self._result = Result()

    def global_record(self) -> ArrayRecord:
        """The full global model as an ``ArrayRecord``."""
        return arrays_to_record(self.global_layers)

    def changed_since(self, version: int | None) -> list[str]:
        """The layers updated after global ``version`` (all when ``None``), in model order."""
        return [name for name in self.global_layers if version is None or self._updated_in[name] > version]

    # --- messages to the nodes ----------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """Flower's sampling; each node's message holds the layers it lacks (``arrays`` is not used)."""
        self._sent_bytes = {}
        self._wait_for_nodes(grid, max(self.min_available_nodes, self.min_train_nodes))
        return self._per_node(super().configure_train(server_round, ArrayRecord(), _copy(config), grid), server_round)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """Flower's sampling; each node's message holds the layers it lacks (``arrays`` is not used)."""
        if self.fraction_evaluate > 0:
            self._wait_for_nodes(grid, max(self.min_available_nodes, self.min_evaluate_nodes))
        return self._per_node(
            super().configure_evaluate(server_round, ArrayRecord(), _copy(config), grid), server_round
        )

    def _wait_for_nodes(self, grid: Grid, count: int) -> None:
        """Returns once ``count`` nodes are connected; ``TimeoutError`` after ``node_timeout`` s."""
        timeout = self._start_timeout if self.node_timeout is None else self.node_timeout
        deadline = time.monotonic() + timeout
        while (connected := len(list(grid.get_node_ids()))) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{connected} of the {count} nodes needed connected within {timeout:g} s")
            time.sleep(min(0.5, max(deadline - time.monotonic(), 0.0) + 0.01))

    def _per_node(self, messages: Iterable[Message], server_round: int) -> list[Message]:
        per_node: list[Message] = []
        for message in messages:
            node = message.metadata.dst_node_id
            base = self._node_versions.get(node)
            if base not in self._records:
                self._records[base] = arrays_to_record(
                    {name: self.global_layers[name] for name in self.changed_since(base)}
                )
            config = _copy(message.content.config_records[self.configrecord_key])
            config[SERVER_ROUND_KEY] = server_round
            config[BASE_ROUND_KEY] = -1 if base is None else base
            config[VERSION_KEY] = self.version
            content = RecordDict({self.arrayrecord_key: self._records[base], self.configrecord_key: config})
            per_node.append(Message(content=content, dst_node_id=node, message_type=message.metadata.message_type))
            self._in_flight[node] = self.version
            if message.metadata.message_type == MessageType.TRAIN:
                self._sent_bytes[node] = self._records[base].count_bytes()
        return per_node

    def _confirm(self, replies: Iterable[Message]) -> None:
        """A node that answered holds what it was sent; one that answered with an error is forgotten."""
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                self._node_versions.pop(node, None)
                self._in_flight.pop(node, None)
            elif node in self._in_flight:
                self._node_versions[node] = self._in_flight.pop(node)

    # --- aggregation --------------------------------------------------------------------

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Checks every reply, then averages each layer over the replies holding it.

        Returns:
          The full global model after the round and the aggregated train metrics, with
          the strategy's counts (``"jaxlayerx.accepted"``, ``"jaxlayerx.rejected"``...).
        """
        replies = list(replies)
        self._confirm(replies)
        accepted: list[tuple[NodeReply, Mapping[str, Any], RecordDict]] = []
        rejected: list[tuple[int, str]] = []
        failures: list[int] = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                failures.append(node)
                logger.warning("round %d: node %d replied with an error: %s", server_round, node, reply.error.reason)
                continue
            try:
                weight, layers = self._checked_reply(reply.content)
            except (ValueError, TypeError, KeyError) as error:
                rejected.append((node, str(error)))
                logger.warning("round %d: rejected the reply of node %d: %s", server_round, node, error)
                continue
            record = NodeReply(node, weight, tuple(layers), content_nbytes(reply.content))
            accepted.append((record, layers, reply.content))
        averages = self._average([(layers, record.num_examples) for record, layers, _ in accepted])
        self._apply(averages, server_round)
        self.version = server_round
        self._records.clear()
        record = RoundRecord(
            server_round,
            tuple(r for r, _, _ in accepted),
            tuple(rejected),
            tuple(failures),
            tuple(sorted(averages)),
            tuple(sorted(self._sent_bytes.items())),
        )
        self.history.append(record)
        metrics = self._train_metrics(record, [content for _, _, content in accepted])
        logger.info(
            "round %d: averaged %d layer(s) from %d node(s); %d rejected, %d failed",
            server_round,
            len(averages),
            len(accepted),
            len(rejected),
            len(failures),
        )
        return self.global_record(), metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Flower's weighted metric average over the replies that carry a valid weight."""
        replies = list(replies)
        self._confirm(replies)
        usable: list[RecordDict] = []
        for reply in replies:
            if reply.has_error():
                logger.warning(
                    "round %d: node %d evaluate error: %s", server_round, reply.metadata.src_node_id, reply.error.reason
                )
                continue
            try:
                self._weight(reply.content)
            except (ValueError, KeyError) as error:
                logger.warning(
                    "round %d: ignored the evaluate reply of node %d: %s",
                    server_round,
                    reply.metadata.src_node_id,
                    error,
                )
                continue
            usable.append(reply.content)
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
            raise ValueError(f"{self.weighted_by_key!r} must be an integer >= 0, got {weight!r}")
        return int(cast(int, weight))

    def _checked_reply(self, content: RecordDict) -> tuple[int, Mapping[str, Any]]:
        """``(weight, name -> array)`` of a dense reply, all of it checked."""
        weight = self._weight(content)
        extra = sorted(set(content.array_records) - {self.arrayrecord_key})
        if extra:
            raise ValueError(f"unexpected ArrayRecord(s) {extra}: only {self.arrayrecord_key!r} is read")
        record = content.array_records.get(self.arrayrecord_key, ArrayRecord())
        layers = record_to_arrays(record)
        payload = pack_layers(list(layers.values()), list(layers))
        return weight, checked_payload(payload, self.global_layers, allow_nonfinite=self.allow_nonfinite)

    def _contributing(self, results: list[tuple[Mapping[str, Any], int]]) -> list[tuple[Mapping[str, Any], int]]:
        """Zero-example replies carry no weight in a weighted average."""
        return [(layers, n) for layers, n in results if layers and (n > 0 or not self.weighted_aggregation)]

    def _average(self, results: list[tuple[Mapping[str, Any], int]]) -> dict[str, Any]:
        # Checked already; averaged in the senders' promoted dtype, cast once to the global model's.
        core = _CoreDynamicLayer(self.weighted_aggregation, allow_nonfinite=True)
        averages = core.aggregate_layers(self._contributing(results))
        return {name: cast_mean(mean, self.global_layers[name].dtype, np) for name, mean in averages.items()}

    def _apply(self, averages: Mapping[str, Any], server_round: int) -> None:
        for name, average in averages.items():
            self.global_layers[name] = average
            self._updated_in[name] = server_round

    def _train_metrics(self, record: RoundRecord, contents: list[RecordDict]) -> MetricRecord:
        metrics = self._aggregate_metrics(self.train_metrics_aggr_fn, contents) or MetricRecord()
        metrics[ACCEPTED_KEY] = len(record.accepted)
        metrics[REJECTED_KEY] = len(record.rejected)
        metrics[FAILURES_KEY] = len(record.failures)
        metrics[LAYERS_KEY] = len(record.aggregated_layers)
        metrics[SERVER_BYTES_SENT_KEY] = sum(n for _, n in record.bytes_sent)
        metrics[SERVER_BYTES_RECEIVED_KEY] = sum(r.bytes_received for r in record.accepted)
        return metrics

    def _aggregate_metrics(self, aggregate: MetricsAggregation, contents: list[RecordDict]) -> MetricRecord | None:
        weights = [self._weight(content) for content in contents]
        if not contents or sum(weights) == 0:
            return None
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
            _, train_metrics = self.aggregate_train(server_round, grid.send_and_receive(messages, timeout=timeout))
            if train_metrics is not None:
                result.train_metrics_clientapp[server_round] = train_metrics
            messages = self.configure_evaluate(server_round, ArrayRecord(), evaluate_config, grid)
            evaluate_metrics = self.aggregate_evaluate(server_round, grid.send_and_receive(messages, timeout=timeout))
            if evaluate_metrics is not None:
                result.evaluate_metrics_clientapp[server_round] = evaluate_metrics
            if evaluate_fn is not None:
                self._server_evaluate(evaluate_fn, server_round, result)
            self.save_checkpoint()
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
        expected = {name: np.shape(array) for name, array in self.global_layers.items()}
        if {name: np.shape(array) for name, array in arrays.items()} != expected:
            raise ValueError(
                f"the checkpoint in {self.checkpoint_dir} holds layers {sorted(arrays)} that differ "
                f"(names or shapes) from initial_arrays {sorted(expected)}"
            )
        self.restore_state(arrays, state)
        logger.info("resumed from %s after round %d", self.checkpoint_dir, self.version)
        return self.version + 1

    def state(self) -> dict[str, Any]:
        """The strategy's state besides the global model, JSON-serializable (the checkpoint's)."""
        return {
            "round": self.version,
            "updated_in": self._updated_in,
            "node_versions": sorted(self._node_versions.items()),
            "optimizer": None,  # FedAvg keeps no server optimizer state
            "history": [record.to_json() for record in self.history],
            "metrics": {
                field: {str(r): dict(m) for r, m in getattr(self._result, field).items()}
                for field in ("train_metrics_clientapp", "evaluate_metrics_clientapp", "evaluate_metrics_serverapp")
            },
        }

    def restore_state(self, arrays: Mapping[str, np.ndarray], state: Mapping[str, Any]) -> None:
        """Restores what :meth:`state` and :attr:`global_layers` held."""
        self.global_layers = collections.OrderedDict((name, np.array(a, copy=True)) for name, a in arrays.items())
        self.version = int(state["round"])
        self._updated_in = {name: int(v) for name, v in state["updated_in"].items()}
        self._node_versions = {int(node): int(v) for node, v in state["node_versions"]}
        self._in_flight.clear()
        self._records.clear()
        self.history = [RoundRecord.from_json(data) for data in state["history"]]
        self._result = Result()
        for field, rounds in state["metrics"].items():
            setattr(self._result, field, {int(r): MetricRecord(m) for r, m in rounds.items()})

    def save_checkpoint(self) -> None:
        """Writes the state after the last round to ``checkpoint_dir`` atomically (no-op without one)."""
        if self.checkpoint_dir is not None:
            save_checkpoint(self.checkpoint_dir, self.global_layers, self.state())


class FedAvgSparseCooTensor(FedAvgDynamicLayer):
    """:class:`FedAvgDynamicLayer` for sparse replies: each weight averaged over the nodes that sent it.

    Nodes reply in the COO layout of :mod:`jaxlayerx.flower.records` (values under
    ``arrayrecord_key``, ``"coo-indices"``, ``"coo-shapes"``). The averaging is the core's
    :class:`jaxlayerx.FedAvgSparseCooTensor`; every weight nobody sent keeps its global
    value bit for bit. Nodes receive, as for the dense strategy, the whole layers that
    changed since the version they hold. Checks and options are the dense strategy's, plus
    the COO layout's (bounds, repeated entries, integer indices and shapes).
    """

    def _checked_reply(self, content: RecordDict) -> tuple[int, Mapping[str, Any]]:
        weight = self._weight(content)
        expected = {self.arrayrecord_key, COO_INDICES_KEY, COO_SHAPES_KEY}
        present = set(content.array_records)
        if not any(len(content.array_records[key]) for key in present):
            return weight, {}  # sent nothing, in whatever records
        if present != expected:
            raise ValueError(f"a sparse reply holds the ArrayRecords {sorted(expected)}, got {sorted(present)}")
        payload = records_to_coo_payload(content, values_key=self.arrayrecord_key)
        return weight, _checked_coo(payload, self.global_layers, self.allow_nonfinite)

    def _average(self, results: list[tuple[Mapping[str, Any], int]]) -> dict[str, Any]:
        core = _CoreSparseCoo(self.weighted_aggregation, allow_nonfinite=True)
        averages = core.aggregate([(write_coo(layers), n) for layers, n in self._contributing(results)])
        return {
            name: layer._replace(values=cast_mean(layer.values, self.global_layers[name].dtype, np))
            for name, layer in averages.items()
        }

    def _apply(self, averages: Mapping[str, Any], server_round: int) -> None:
        for name, layer in averages.items():
            updated = self.global_layers[name].copy()  # records already sent keep their values
            updated.reshape(-1)[layer.flat_indices] = layer.values
            self.global_layers[name] = updated
            self._updated_in[name] = server_round


def _checked_coo(
    payload: list[np.ndarray], reference: Mapping[str, np.ndarray], allow_nonfinite: bool
) -> collections.OrderedDict[str, SparseLayer]:
    """A COO payload checked whole: :func:`jaxlayerx.read_coo`'s layout checks, then
    :func:`checked_payload`'s on zero-strided stand-ins of each layer's full shape (names,
    shapes) and on the values against stand-ins in the layer's dtype (dtypes, finiteness)."""
    layers = read_coo(payload)
    names = list(layers)

    def stand_in(dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
        return np.broadcast_to(np.zeros((), dtype), shape)

    shapes = [stand_in(layer.values.dtype, layer.shape) for layer in layers.values()]
    checked_payload(pack_layers(shapes, names), reference, allow_nonfinite=True)
    value_reference = {name: stand_in(reference[name].dtype, layer.values.shape) for name, layer in layers.items()}
    values = checked_payload(
        pack_layers([layer.values for layer in layers.values()], names),
        value_reference,
        allow_nonfinite=allow_nonfinite,
    )
    return collections.OrderedDict((name, layer._replace(values=values[name])) for name, layer in layers.items())


def _copy(config: ConfigRecord) -> ConfigRecord:
    return ConfigRecord(dict(config))
