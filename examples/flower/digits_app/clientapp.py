"""The example's ClientApp, written by hand against the Message-API protocol of ``docs/flower.md``.

Provisional: it is to be replaced by ``jaxlayerx.flower.clientapp.exchanger_client_app``.
Each node keeps its model and the global version it holds in ``context.state``, merges
what the server sends, trains its partition and replies with what its exchanger sends.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from digits_app import task
from jaxlayerx.coo import read_coo
from jaxlayerx.flower.records import (
    BASE_ROUND_KEY,
    SERVER_ROUND_KEY,
    VERSION_KEY,
    arrays_to_record,
    data_nbytes,
    record_to_arrays,
    sparse_to_records,
)
from jaxlayerx.packing import unpack_layers
from jaxlayerx.tree import flatten, unflatten

app = ClientApp()


def _merged(msg: Message, context: Context):
    config = msg.content["config"]
    variables = task.init_variables()
    state = context.state
    held = record_to_arrays(state["model"]) if "model" in state.array_records else None
    version = int(state["version"]["round"]) if "version" in state.config_records else None
    base = int(config[BASE_ROUND_KEY])
    if base != -1 and base != version:
        raise ValueError(f"sent a delta on version {base}, holds {version}")
    layers = dict(held) if held is not None else {k: np.asarray(v) for k, v in flatten(variables).items()}
    layers.update(record_to_arrays(msg.content["arrays"]))
    state["model"] = arrays_to_record(layers)
    state["version"] = ConfigRecord({"round": int(config[VERSION_KEY])})
    return unflatten(layers, like=variables), variables


@app.train()
def train(msg: Message, context: Context) -> Message:
    run, node = context.run_config, context.node_config
    pid, parts = int(node["partition-id"]), int(node["num-partitions"])
    server_round = int(msg.content["config"][SERVER_ROUND_KEY])
    if pid == int(run["fail-partition"]) and server_round == int(run["fail-round"]):
        raise RuntimeError(f"partition {pid} fails in round {server_round}, as asked")
    model, _ = _merged(msg, context)
    x, y, _, _ = task.load_partition(pid, parts)
    trained, n, metrics = task.make_train_fn(x, y, seed=pid)(model, {"current_server_round": server_round})
    exchanger = task.make_exchanger(str(run["exchanger"]), model, float(run["exchange-percentage"]))
    payload = exchanger.push_parameters(trained, initial_model=model, config={})
    context.state["model"] = arrays_to_record({k: np.asarray(v) for k, v in flatten(trained).items()})
    if exchanger.payload_kind == "sparse":
        layers = read_coo([np.asarray(a) for a in payload])
        records = sparse_to_records(layers)
        sent = sum(data_nbytes(record_to_arrays(r)) for r in records.values())
    else:
        arrays, names = unpack_layers([np.asarray(a) for a in payload])
        flat = dict(zip(names, arrays))
        records = {"arrays": arrays_to_record(flat)}
        sent = data_nbytes(flat)
    m = MetricRecord(
        {
            "num-examples": n,
            "jaxlayerx.bytes-sent": sent,
            "jaxlayerx.bytes-received": msg.content["arrays"].count_bytes(),
            "train_loss": metrics["train_loss"],
        }
    )
    return Message(RecordDict({**records, "metrics": m}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    node = context.node_config
    pid, parts = int(node["partition-id"]), int(node["num-partitions"])
    model, _ = _merged(msg, context)
    _, _, x, y = task.load_partition(pid, parts)
    loss, acc = task.evaluate(model, x, y)
    return Message(
        RecordDict({"metrics": MetricRecord({"num-examples": len(x), "loss": loss, "accuracy": acc})}), reply_to=msg
    )
