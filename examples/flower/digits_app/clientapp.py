"""The example's ClientApp: :func:`jaxlayerx.flower.clientapp.exchanger_client_app` on the digits.

The node's partition comes from its ``--node-config`` (``partition-id``,
``num-partitions``); the exchanger from the run config (``exchanger``,
``exchange-percentage``), so one ClientApp serves dense and sparse runs.
"""

from __future__ import annotations

import functools
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from digits_app import task
from jaxlayerx.flower.clientapp import exchanger_client_app
from jaxlayerx.flower.records import SERVER_ROUND_KEY

app = ClientApp()


@app.train()
def train(message: Message, context: Context) -> Message:
    return _handle(message, context)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    return _handle(message, context)


def _handle(message: Message, context: Context) -> Message:
    """Hands the message to jaxlayerx's ClientApp for the run's exchanger."""
    run = context.run_config
    return _node_app(str(run["exchanger"]), float(run["exchange-percentage"]))(message, context)


@functools.cache
def _node_app(kind: str, exchange_percentage: float) -> ClientApp:
    """jaxlayerx's ClientApp for the exchanger ``kind`` of ``jaxlayerx simulate --exchangers``."""
    return exchanger_client_app(
        lambda context: task.init_variables(),
        lambda model: task.make_exchanger(kind, model, exchange_percentage),
        train_fn,
        evaluate_fn,
    )


def _partition(context: Context) -> tuple[int, int]:
    return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])


def train_fn(variables: Any, config: dict[str, Any], context: Context) -> tuple[Any, int, dict[str, Any]]:
    """Local epochs of SGD on the node's partition (raises in ``fail-round`` on ``fail-partition``)."""
    partition, partitions = _partition(context)
    server_round = int(config[SERVER_ROUND_KEY])
    run = context.run_config
    if partition == int(run["fail-partition"]) and server_round == int(run["fail-round"]):
        raise RuntimeError(f"partition {partition} fails in round {server_round}, as asked")
    x, y, _, _ = task.load_partition(partition, partitions)
    train = task.make_train_fn(x, y, epochs=int(config.get("local-epochs", 1)), seed=partition)
    return train(variables, {"current_server_round": server_round})


def evaluate_fn(variables: Any, config: dict[str, Any], context: Context) -> tuple[float, int, dict[str, Any]]:
    """Loss and accuracy of the global model on the node's test examples."""
    _, _, x, y = task.load_partition(*_partition(context))
    loss, accuracy = task.evaluate(variables, x, y)
    return loss, len(x), {"accuracy": accuracy}
