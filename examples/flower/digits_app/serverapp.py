"""The example's ServerApp: partial (or sparse) layer exchange on the digits, averaged per layer.

The run config (``pyproject.toml``, or ``flwr run ... --run-config``) picks the exchanger the
nodes run; a sparse one gets :class:`jaxlayerx.flower.serverapp.FedAvgSparse`,
any other :class:`jaxlayerx.flower.serverapp.FedAvgLayers`. With ``record-dir`` set,
the ServerApp writes what a run can be checked against (see :func:`record_round`
and :func:`record_sent`).
"""

from __future__ import annotations

import json
import logging
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp

from digits_app import task
from jaxlayerx.flower.records import (
    ARRAYS_KEY,
    BASE_ROUND_KEY,
    VERSION_KEY,
    arrays_to_record,
    content_nbytes,
    record_to_arrays,
)
from jaxlayerx.flower.serverapp import ExchangeStrategy, FedAvgLayers, FedAvgSparse
from jaxlayerx.tree import flatten, unflatten

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    _show_jaxlayerx_logs()
    config = context.run_config
    record_dir = pathlib.Path(str(config["record-dir"])) if config["record-dir"] else None
    nodes = int(config["min-nodes"])
    variables = task.init_variables()
    exchanger = task.make_exchanger(str(config["exchanger"]), variables, float(config["exchange-percentage"]))
    base = FedAvgSparse if exchanger.payload_kind == "sparse" else FedAvgLayers
    if record_dir is not None:
        record_dir.mkdir(parents=True, exist_ok=True)
    strategy = _example_strategy(base, record_dir)(
        fraction_train=float(config["fraction-train"]),
        fraction_evaluate=float(config["fraction-evaluate"]),
        min_train_nodes=nodes,
        min_evaluate_nodes=nodes,
        min_available_nodes=nodes,
        node_timeout=float(config["round-timeout"]),  # Flower's own sampling would wait without a bound
    )
    initial = flatten(variables)
    if config["initial-model"]:  # go on from an earlier run's global model
        initial = dict(np.load(str(config["initial-model"])))
    x_test, y_test = task.global_test_set(int(config["num-partitions"]))

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        layers = record_to_arrays(arrays)
        if record_dir is not None:
            np.savez(record_dir / f"global_round{server_round}.npz", **layers)
        loss, accuracy = task.evaluate(unflatten(layers, like=variables), x_test, y_test)
        logging.getLogger("jaxlayerx.example").info("round %d: global accuracy %.3f", server_round, accuracy)
        return MetricRecord({"loss": loss, "accuracy": accuracy})

    strategy.start(
        grid,
        arrays_to_record(initial),
        num_rounds=int(config["num-server-rounds"]),
        timeout=float(config["round-timeout"]),
        train_config=ConfigRecord({"local-epochs": int(config["local-epochs"])}),
        evaluate_fn=evaluate_global,
    )
    if record_dir is not None:
        history = [record.to_json() for record in strategy.history]
        (record_dir / "history.json").write_text(json.dumps(history, indent=1))


def _show_jaxlayerx_logs() -> None:
    """Sends jaxlayerx's log lines (each round's aggregation, rejected replies) where Flower's go."""
    logger = logging.getLogger("jaxlayerx")
    for handler in logging.getLogger("flwr").handlers:
        if handler not in logger.handlers:
            logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _example_strategy(base: type[ExchangeStrategy], record_dir: pathlib.Path | None) -> type[ExchangeStrategy]:
    """``base``, saving train messages and replies to ``record_dir``."""

    class Strategy(base):
        train_messages: tuple[Message, ...] = ()  # the last round's; their ids are set once pushed

        def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Any:
            messages = super().configure_train(server_round, arrays, config, grid)
            self.train_messages = tuple(messages)
            if record_dir is not None:
                record_sent(record_dir, server_round, messages)
            return messages

        def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> Any:
            replies = list(replies)
            if record_dir is not None:
                sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in self.train_messages}
                record_round(record_dir, server_round, replies, sent_to)
            return super().aggregate_train(server_round, replies)

    return Strategy


def record_round(
    record_dir: pathlib.Path,
    server_round: int,
    replies: Iterable[Message],
    sent_to: Mapping[str, int] | None = None,
) -> None:
    """Saves each node's train reply of ``server_round`` as it arrived.

    ``round{R}_node{N}.npz`` holds the reply's ArrayRecords (``"<record>:<layer>"`` keys);
    ``round{R}.json`` maps each node to its metrics, the bytes of its arrays as Flower
    counts them, or its error (reason and Flower's error code). A reply's node is the one
    the message it answers was sent to (``sent_to``: message id -> node; an error Flower
    makes for a node it lost comes from the SuperLink), else its source.
    """
    sent_to = {} if sent_to is None else sent_to
    summary: dict[str, Any] = {}
    for reply in replies:
        node = sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        if reply.has_error():
            summary[str(node)] = {"error": reply.error.reason, "error_code": reply.error.code}
            continue
        content = reply.content
        arrays = {
            f"{key}:{name}": array
            for key, record in content.array_records.items()
            for name, array in record_to_arrays(record).items()
        }
        np.savez(record_dir / f"round{server_round}_node{node}.npz", **arrays)
        metrics: Mapping[str, Any] = next(iter(content.metric_records.values()), {})
        summary[str(node)] = {
            "metrics": dict(metrics),
            "content_bytes": content_nbytes(content),
            "records": {key: list(record.keys()) for key, record in content.array_records.items()},
        }
    (record_dir / f"round{server_round}.json").write_text(json.dumps(summary, indent=1))


def record_sent(record_dir: pathlib.Path, server_round: int, messages: Iterable[Message]) -> None:
    """Saves the train messages of ``server_round`` as they were sent.

    ``round{R}_sent.json`` lists each message's destination node, its config's
    ``jaxlayerx.base-round`` (the version the node is taken to hold; -1: the whole model)
    and ``jaxlayerx.round``, and the bytes of its arrays; ``round{R}_base{B}.npz`` holds the
    compact ArrayRecord sent over base ``B`` (the same record for every node on that base).
    """
    sent: list[dict[str, int]] = []
    bases: set[int] = set()
    for message in messages:
        config = message.content.config_records["config"]
        record = message.content.array_records[ARRAYS_KEY]
        base = int(config[BASE_ROUND_KEY])
        sent.append(
            {
                "node": message.metadata.dst_node_id,
                "base-round": base,
                "round": int(config[VERSION_KEY]),
                "bytes": record.count_bytes(),
            }
        )
        if base not in bases:
            bases.add(base)
            np.savez(record_dir / f"round{server_round}_base{base}.npz", **record_to_arrays(record))
    (record_dir / f"round{server_round}_sent.json").write_text(json.dumps(sent, indent=1))
