"""jaxlayerx.flower.serverapp: the Message-API strategies against the core aggregation and numpy.

Replies are hand-built Flower ``Message``s (``Message(content, reply_to=instruction)``, as a
ClientApp's reply is made); ``start()`` runs against a fake ``Grid`` whose nodes are functions.
"""

from __future__ import annotations

import logging
import random
import time

import ml_dtypes
import numpy as np
import pytest
from conftest import bits, fake_grid_class

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.common import serde  # noqa: E402
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # noqa: E402

from jaxlayerx.aggregation import FedAvgDynamicLayer as CoreDynamic  # noqa: E402
from jaxlayerx.coo import SparseLayer, write_coo  # noqa: E402
from jaxlayerx.flower.records import (  # noqa: E402
    arrays_to_record,
    content_nbytes,
    record_to_arrays,
    sparse_to_records,
)
from jaxlayerx.flower.serverapp import (  # noqa: E402
    ACCEPTED_KEY,
    FAILURES_KEY,
    REJECTED_KEY,
    SERVER_BYTES_RECEIVED_KEY,
    SERVER_BYTES_SENT_KEY,
    FedAvgDynamicLayer,
    FedAvgSparseCooTensor,
)
from jaxlayerx.sparse_aggregation import FedAvgSparseCooTensor as CoreSparse  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)


@pytest.fixture(autouse=True)
def task_identity():
    """Messages are built outside a run here: give them the identity a ServerApp process has."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def global_model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "dense/kernel": rng.normal(size=(3, 4)).astype(np.float32),
        "dense/bias": rng.normal(size=(4,)).astype(np.float32),
        "head/kernel": rng.normal(size=(4, 2)).astype(BF16),
        "counter": np.array(5, np.int32),
        "frozen": rng.normal(size=(2, 2)).astype(np.float32),
    }


def like(name: str, seed: int) -> np.ndarray:
    """A random value for layer ``name`` of the global model."""
    reference = global_model()[name]
    rng = np.random.default_rng(seed)
    if reference.dtype == np.int32:
        return np.asarray(rng.integers(0, 100, size=reference.shape), np.int32)
    return rng.normal(size=reference.shape).astype(reference.dtype)


def instruction(node: int, message_type: str = MessageType.TRAIN) -> Message:
    return Message(content=RecordDict(), dst_node_id=node, message_type=message_type)


def reply(node: int, layers: dict[str, np.ndarray], num_examples, *, serialize: bool = True) -> Message:
    content = RecordDict({"arrays": arrays_to_record(layers), "metrics": MetricRecord({"num-examples": num_examples})})
    return content_reply(node, content, serialize=serialize)


def content_reply(node: int, content: RecordDict, *, serialize: bool = True) -> Message:
    if serialize:  # through Flower's protobuf serialization, as a reply crosses the wire
        content = serde.recorddict_from_proto(
            ProtoRecordDict.FromString(serde.recorddict_to_proto(content).SerializeToString())
        )
    return Message(content, reply_to=instruction(node))


def error_reply(node: int) -> Message:
    return Message(Error(code=0, reason="ClientApp raised"), reply_to=instruction(node))


def strategy(cls=FedAvgDynamicLayer, **options) -> FedAvgDynamicLayer:
    s = cls(**options)
    s.set_global_model(arrays_to_record(global_model()))
    return s


def numpy_mean(values: list[np.ndarray], weights: list[float], dtype) -> np.ndarray:
    """Independent reference: float64 weighted mean, cast to the layer's dtype."""
    mean = sum(w * v.astype(np.float64) for v, w in zip(values, weights)) / sum(weights)
    return np.rint(mean).astype(dtype) if np.dtype(dtype).kind in "iu" else mean.astype(dtype)


GOOD = [
    (1, {"dense/kernel": like("dense/kernel", 1), "head/kernel": like("head/kernel", 2)}, 10),
    (2, {"dense/bias": like("dense/bias", 3), "dense/kernel": like("dense/kernel", 4)}, 30),
    (3, {"counter": like("counter", 5), "head/kernel": like("head/kernel", 6), "dense/bias": like("dense/bias", 7)}, 5),
    (4, {}, 8),  # an empty reply: counted, changes nothing
]


def check_against_references(s: FedAvgDynamicLayer, before: dict[str, np.ndarray], good) -> None:
    core = CoreDynamic().aggregate_layers([(layers, n) for _, layers, n in good if layers])
    for name, old in before.items():
        senders = [(layers[name], n) for _, layers, n in good if name in layers]
        got = s.global_layers[name]
        assert got.dtype == old.dtype and got.shape == old.shape, name
        if not senders:  # nobody sent it: bit-identical
            np.testing.assert_array_equal(bits(got), bits(old))
            continue
        np.testing.assert_array_equal(bits(got), bits(core[name].astype(old.dtype)))
        expected = numpy_mean([v for v, _ in senders], [n for _, n in senders], old.dtype)
        tolerance = 1e-2 if old.dtype == BF16 else 1e-6
        np.testing.assert_allclose(got.astype(np.float64), expected.astype(np.float64), rtol=tolerance, atol=tolerance)


def test_replies_with_different_keys_and_an_empty_one():
    s = strategy()
    before = dict(s.global_layers)
    arrays, metrics = s.aggregate_train(1, [reply(node, layers, n) for node, layers, n in GOOD])
    check_against_references(s, before, GOOD)
    assert metrics[ACCEPTED_KEY] == 4 and metrics[REJECTED_KEY] == 0 and metrics[FAILURES_KEY] == 0
    # The returned record is the full global model, in model order.
    decoded = record_to_arrays(arrays)
    assert list(decoded) == list(global_model())
    for name, value in decoded.items():
        np.testing.assert_array_equal(bits(value), bits(s.global_layers[name]))
    assert s.history[-1].aggregated_layers == ("counter", "dense/bias", "dense/kernel", "head/kernel")


def test_unweighted_aggregation():
    s = strategy(weighted_aggregation=False)
    before = dict(s.global_layers)
    s.aggregate_train(1, [reply(node, layers, n) for node, layers, n in GOOD])
    check_against_references(s, before, [(node, layers, 1) for node, layers, _ in GOOD])


def test_reply_order_does_not_matter():
    results = []
    for seed in range(4):
        replies = [reply(node, layers, n) for node, layers, n in GOOD]
        random.Random(seed).shuffle(replies)
        s = strategy()
        s.aggregate_train(1, replies)
        results.append(s.global_layers)
    for other in results[1:]:
        for name in results[0]:
            np.testing.assert_array_equal(bits(other[name]), bits(results[0][name]))


def _bad_array_record() -> ArrayRecord:
    good = Array(np.zeros(4, np.float32))
    return ArrayRecord({"dense/bias": Array(dtype="float32", shape=(4,), stype=good.stype, data=b"garbage")})


def _metrics(**values) -> MetricRecord:
    return MetricRecord(values)


BAD = {
    "unknown layer": (
        RecordDict(
            {
                "arrays": arrays_to_record({"dense/kernal": like("dense/kernel", 9)}),
                "m": _metrics(**{"num-examples": 3}),
            }
        ),
        "dense/kernal",
    ),
    "wrong shape": (
        RecordDict(
            {"arrays": arrays_to_record({"dense/bias": np.zeros(5, np.float32)}), "m": _metrics(**{"num-examples": 3})}
        ),
        r"expected shape \(4,\)",
    ),
    "lossy dtype": (
        RecordDict(
            {"arrays": arrays_to_record({"counter": np.array(1.5, np.float32)}), "m": _metrics(**{"num-examples": 3})}
        ),
        "does not accept",
    ),
    "nan": (
        RecordDict(
            {
                "arrays": arrays_to_record({"dense/bias": np.array([0, np.nan, 0, 0], np.float32)}),
                "m": _metrics(**{"num-examples": 3}),
            }
        ),
        "non-finite",
    ),
    "inf bf16": (
        RecordDict(
            {
                "arrays": arrays_to_record({"head/kernel": np.full((4, 2), np.inf, BF16)}),
                "m": _metrics(**{"num-examples": 3}),
            }
        ),
        "non-finite",
    ),
    "missing weight": (
        RecordDict({"arrays": arrays_to_record({"dense/bias": like("dense/bias", 9)}), "m": _metrics(loss=1.0)}),
        "num-examples",
    ),
    "no metrics": (RecordDict({"arrays": arrays_to_record({"dense/bias": like("dense/bias", 9)})}), "num-examples"),
    "negative weight": (
        RecordDict(
            {"arrays": arrays_to_record({"dense/bias": like("dense/bias", 9)}), "m": _metrics(**{"num-examples": -2})}
        ),
        "integer >= 0",
    ),
    "fractional weight": (
        RecordDict(
            {"arrays": arrays_to_record({"dense/bias": like("dense/bias", 9)}), "m": _metrics(**{"num-examples": 2.5})}
        ),
        "integer >= 0",
    ),
    "undecodable array": (
        RecordDict({"arrays": _bad_array_record(), "m": _metrics(**{"num-examples": 3})}),
        "does not decode",
    ),
    "sparse to dense": (
        RecordDict({**sparse_to_records({}), "m": _metrics(**{"num-examples": 3})}),
        "unexpected ArrayRecord",
    ),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_a_bad_reply_among_good_ones_is_dropped_whole(kind, caplog):
    content, reason = BAD[kind]
    # The bad reply also sends a valid layer first, which must not be applied.
    arrays = content.array_records.get("arrays")
    if arrays is not None and kind not in ("undecodable array", "sparse to dense"):
        full = {"frozen": like("frozen", 99), **record_to_arrays(arrays)}
        content = RecordDict({**dict(content), "arrays": arrays_to_record(full)})
    s = strategy()
    before = dict(s.global_layers)
    replies = [reply(node, layers, n) for node, layers, n in GOOD]
    replies.insert(1, content_reply(77, content))
    with caplog.at_level(logging.WARNING, logger="jaxlayerx.flower"):
        _, metrics = s.aggregate_train(1, replies)
    check_against_references(s, before, GOOD)  # "frozen" untouched: nothing of the bad reply applied
    assert metrics[REJECTED_KEY] == 1 and metrics[ACCEPTED_KEY] == 4
    (node, logged_reason), *_ = s.history[-1].rejected
    assert node == 77
    assert __import__("re").search(reason, logged_reason), logged_reason
    assert any("node 77" in message and "rejected" in message for message in caplog.messages)


def test_nonfinite_values_allowed_when_asked():
    s = strategy(allow_nonfinite=True)
    s.aggregate_train(1, [reply(1, {"dense/bias": np.array([1, np.nan, 2, 3], np.float32)}, 2)])
    assert np.isnan(s.global_layers["dense/bias"][1])


def test_error_replies_are_failures_and_the_round_goes_on():
    s = strategy()
    before = dict(s.global_layers)
    _, metrics = s.aggregate_train(1, [reply(node, layers, n) for node, layers, n in GOOD] + [error_reply(9)])
    check_against_references(s, before, GOOD)
    assert metrics[FAILURES_KEY] == 1 and s.history[-1].failures == (9,)


def test_zero_examples_carry_no_weight():
    s = strategy()
    before = dict(s.global_layers)
    s.aggregate_train(
        1, [reply(1, {"dense/bias": like("dense/bias", 1)}, 0), reply(2, {"frozen": like("frozen", 2)}, 0)]
    )
    for name, old in before.items():
        np.testing.assert_array_equal(bits(s.global_layers[name]), bits(old))


FakeGrid = fake_grid_class()


class Node:
    """A minimal protocol-following node: keeps the global model it knows, checks the base round,
    merges, and sends back some layers (a deterministic function of the round)."""

    def __init__(self, node_id: int, picks, fail_rounds=()):
        self.node_id, self.picks, self.fail_rounds = node_id, picks, set(fail_rounds)
        self.model: dict[str, np.ndarray] = {}
        self.version: int | None = None
        self.received: list[tuple[int, int, list[str]]] = []  # (round, base, names)

    def __call__(self, message: Message) -> RecordDict:
        config = message.content.config_records["config"]
        base, server_round = int(config["jaxlayerx.base-round"]), int(config["server-round"])
        arrays = record_to_arrays(message.content.array_records["arrays"])
        self.received.append((server_round, base, list(arrays)))
        if base != -1 and base != self.version:
            raise RuntimeError(f"node {self.node_id} holds version {self.version}, the server assumed {base}")
        self.model.update(arrays)
        self.version = int(config["jaxlayerx.round"])
        if message.metadata.message_type == MessageType.EVALUATE:
            return RecordDict({"metrics": MetricRecord({"num-examples": 1, "loss": float(self.node_id)})})
        if server_round in self.fail_rounds:
            raise RuntimeError("training failed")
        sent = {
            name: (self.model[name].astype(np.float32) + self.node_id * 0.5).astype(self.model[name].dtype)
            for name in self.picks(server_round)
        }
        return RecordDict(
            {"arrays": arrays_to_record(sent), "metrics": MetricRecord({"num-examples": 10 * self.node_id})}
        )


def test_start_returns_the_full_model_and_nodes_catch_up_after_skipping_rounds():
    floats = ["dense/kernel", "dense/bias", "head/kernel", "frozen"]
    nodes = {
        1: Node(1, lambda r: [floats[r % 3]]),
        2: Node(2, lambda r: [floats[(r + 1) % 3]]),
        3: Node(3, lambda r: ["dense/bias"]),
    }
    grid = FakeGrid(nodes)
    s = FedAvgDynamicLayer(min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1)
    # Node 3 takes part in round 1, skips rounds 2 and 3 (unavailable), comes back in round 4.
    original = grid.send_and_receive

    def send_and_receive(messages, *, timeout=None):
        messages = list(messages)
        server_round = int(messages[0].content.config_records["config"]["server-round"])
        grid.available = [1, 2] if server_round in (2, 3) else [1, 2, 3]
        return original([m for m in messages if m.metadata.dst_node_id in grid.available], timeout=timeout)

    grid.send_and_receive = send_and_receive
    result = s.start(grid, arrays_to_record(global_model()), num_rounds=5, timeout=10)
    # Result: the full model, equal to the strategy's.
    decoded = record_to_arrays(result.arrays)
    assert list(decoded) == list(global_model())
    for name in decoded:
        np.testing.assert_array_equal(bits(decoded[name]), bits(s.global_layers[name]))
    np.testing.assert_array_equal(bits(decoded["frozen"]), bits(global_model()["frozen"]))  # nobody sent it
    assert sorted(result.train_metrics_clientapp) == [1, 2, 3, 4, 5]
    # First contact: the whole model (base -1); later: only what changed since the version held.
    assert nodes[1].received[0] == (1, -1, list(global_model()))
    history = {record.server_round: set(record.aggregated_layers) for record in s.history}
    for node in nodes.values():
        bases = [base for _, base, _ in node.received]
        assert bases[0] == -1 and -1 not in bases[1:]  # the whole model once, deltas after
        assert bases[1:] == sorted(bases[1:])
        # Every node ends holding exactly the global model's values of every layer it was sent.
        for name, value in node.model.items():
            np.testing.assert_array_equal(bits(value), bits(s.global_layers[name]))
    train_round_4 = [entry for entry in nodes[3].received if entry[0] == 4][0]
    assert train_round_4[1] == 1  # it holds the version of round 1's evaluate message
    assert set(train_round_4[2]) == history[2] | history[3]  # exactly the layers changed since
    # Bytes: what each train message carried and what each reply carried, per node.
    train_messages = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    first_round = [m for m in train_messages if m.content.config_records["config"]["server-round"] == 1]
    assert dict(s.history[0].bytes_sent) == {
        m.metadata.dst_node_id: m.content.array_records["arrays"].count_bytes() for m in first_round
    }
    assert result.train_metrics_clientapp[1][SERVER_BYTES_SENT_KEY] == sum(dict(s.history[0].bytes_sent).values())
    assert result.train_metrics_clientapp[1][SERVER_BYTES_RECEIVED_KEY] == sum(
        r.bytes_received for r in s.history[0].accepted
    )


def test_a_node_whose_reply_is_an_error_gets_the_whole_model_next_time():
    nodes = {1: Node(1, lambda r: ["dense/bias"]), 2: Node(2, lambda r: ["dense/kernel"], fail_rounds=[2])}
    s = FedAvgDynamicLayer(min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1, fraction_evaluate=0.0)
    s.start(FakeGrid(nodes), arrays_to_record(global_model()), num_rounds=3, timeout=10)
    bases = [(r, base) for r, base, _ in nodes[2].received]
    assert bases == [(1, -1), (2, 0), (3, -1)]  # no evaluate messages: it holds round 1's version 0
    assert len(nodes[2].received[2][2]) == len(global_model())
    assert [(r, base) for r, base, _ in nodes[1].received] == [(1, -1), (2, 0), (3, 1)]
    assert s.history[1].failures == (2,)


def test_a_node_that_lost_its_state_is_resynced():
    """The node raises on a base it does not hold; the next message holds the whole model."""
    nodes = {1: Node(1, lambda r: ["dense/bias"])}
    s = FedAvgDynamicLayer(min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1, fraction_evaluate=0.0)
    grid = FakeGrid(nodes)
    s.set_global_model(arrays_to_record(global_model()))
    for server_round in (1, 2, 3):
        if server_round == 2:
            nodes[1].version = None  # a restarted node
        s.aggregate_train(
            server_round, grid.send_and_receive(s.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid))
        )
    assert [(r, base) for r, base, _ in nodes[1].received] == [(1, -1), (2, 0), (3, -1)]
    assert list(nodes[1].model) == list(global_model())
    for name in set(global_model()) - set(s.history[-1].aggregated_layers):
        np.testing.assert_array_equal(bits(nodes[1].model[name]), bits(s.global_layers[name]))


# --- sparse ---------------------------------------------------------------------------


def sparse(name: str, flat: list[int], seed: int) -> SparseLayer:
    reference = global_model()[name]
    values = np.random.default_rng(seed).normal(size=len(flat)).astype(reference.dtype)
    return SparseLayer(values, np.asarray(flat, np.int64), reference.shape)


def sparse_reply(node: int, layers: dict[str, SparseLayer], n) -> Message:
    content = RecordDict({**sparse_to_records(layers), "metrics": MetricRecord({"num-examples": n})})
    return content_reply(node, content)


SPARSE_GOOD = [
    (1, {"dense/kernel": sparse("dense/kernel", [0, 5, 11], 1), "head/kernel": sparse("head/kernel", [1, 2], 2)}, 10),
    (2, {"dense/kernel": sparse("dense/kernel", [5, 6], 3), "dense/bias": sparse("dense/bias", [3], 4)}, 30),
    (3, {"head/kernel": sparse("head/kernel", [2, 7], 5), "dense/kernel": sparse("dense/kernel", [11, 0], 6)}, 5),
    (4, {}, 8),
]


def check_sparse(s, before, good) -> None:
    core = CoreSparse().aggregate([(write_coo(layers), n) for _, layers, n in good if layers])
    for name, old in before.items():
        got = s.global_layers[name].reshape(-1)
        expected = old.reshape(-1).copy()
        if name in core:
            expected[core[name].flat_indices] = core[name].values.astype(old.dtype)
        np.testing.assert_array_equal(bits(got), bits(expected))  # the core's, and bit-identical elsewhere
        for index in range(old.size):  # independent numpy: each weight over the nodes that sent it
            senders = [
                (layers[name].values[list(layers[name].flat_indices).index(index)], n)
                for _, layers, n in good
                if name in layers and index in layers[name].flat_indices
            ]
            if senders:
                mean = numpy_mean([np.asarray(v) for v, _ in senders], [n for _, n in senders], old.dtype)
                tolerance = 1e-2 if old.dtype == BF16 else 1e-6
                np.testing.assert_allclose(float(got[index]), float(mean), rtol=tolerance, atol=tolerance)
            else:
                assert bits(got[index]).tobytes() == bits(old.reshape(-1)[index]).tobytes()


def test_sparse_replies_with_different_layers_and_weights():
    s = strategy(FedAvgSparseCooTensor)
    before = {name: value.copy() for name, value in s.global_layers.items()}
    arrays, metrics = s.aggregate_train(1, [sparse_reply(node, layers, n) for node, layers, n in SPARSE_GOOD])
    check_sparse(s, before, SPARSE_GOOD)
    assert metrics[ACCEPTED_KEY] == 4
    assert list(record_to_arrays(arrays)) == list(global_model())


def test_sparse_reply_order_does_not_matter():
    outcomes = []
    for seed in range(3):
        replies = [sparse_reply(node, layers, n) for node, layers, n in SPARSE_GOOD]
        random.Random(seed).shuffle(replies)
        s = strategy(FedAvgSparseCooTensor)
        s.aggregate_train(1, replies)
        outcomes.append(s.global_layers)
    for other in outcomes[1:]:
        for name in outcomes[0]:
            np.testing.assert_array_equal(bits(other[name]), bits(outcomes[0][name]))


def _sparse_content(layers, n=3, mutate=None) -> RecordDict:
    records = sparse_to_records(layers)
    if mutate:
        mutate(records)
    return RecordDict({**records, "m": MetricRecord({"num-examples": n})})


def _set_indices(name, indices):
    def mutate(records):
        current = dict(record_to_arrays(records["coo-indices"]))
        current[name] = np.asarray(indices, np.int64)
        records["coo-indices"] = arrays_to_record(current)

    return mutate


SPARSE_BAD = {
    "unknown layer": (_sparse_content({"nope": SparseLayer(np.zeros(1, np.float32), np.array([0]), (4,))}), "nope"),
    "wrong shape": (
        _sparse_content({"dense/bias": SparseLayer(np.zeros(1, np.float32), np.array([0]), (5,))}),
        r"expected shape \(4,\)",
    ),
    "out of bounds": (
        _sparse_content({"dense/bias": sparse("dense/bias", [1], 0)}, mutate=_set_indices("dense/bias", [[4]])),
        "out of bounds",
    ),
    "repeated entry": (
        _sparse_content({"dense/bias": sparse("dense/bias", [1, 2], 0)}, mutate=_set_indices("dense/bias", [[1], [1]])),
        "more than once",
    ),
    "lossy dtype": (
        _sparse_content({"counter": SparseLayer(np.array([1.5], np.float32), np.array([0]), ())}),
        "does not accept",
    ),
    "nan": (
        _sparse_content({"dense/bias": SparseLayer(np.array([np.nan], np.float32), np.array([0]), (4,))}),
        "non-finite",
    ),
    "negative weight": (_sparse_content({"dense/bias": sparse("dense/bias", [1], 0)}, n=-1), "integer >= 0"),
    "missing record": (
        _sparse_content({"dense/bias": sparse("dense/bias", [1], 0)}, mutate=lambda r: r.pop("coo-shapes")),
        "coo-shapes",
    ),
    "dense to sparse": (
        RecordDict(
            {"arrays": arrays_to_record({"dense/bias": like("dense/bias", 1)}), "m": MetricRecord({"num-examples": 3})}
        ),
        "coo-indices",
    ),
}


@pytest.mark.parametrize("kind", list(SPARSE_BAD))
def test_a_bad_sparse_reply_among_good_ones_is_dropped_whole(kind, caplog):
    content, reason = SPARSE_BAD[kind]
    s = strategy(FedAvgSparseCooTensor)
    before = {name: value.copy() for name, value in s.global_layers.items()}
    replies = [sparse_reply(node, layers, n) for node, layers, n in SPARSE_GOOD]
    replies.insert(2, content_reply(55, content))
    with caplog.at_level(logging.WARNING, logger="jaxlayerx.flower"):
        _, metrics = s.aggregate_train(1, replies)
    check_sparse(s, before, SPARSE_GOOD)
    assert metrics[REJECTED_KEY] == 1
    node, logged = s.history[-1].rejected[0]
    assert node == 55 and __import__("re").search(reason, logged), logged
    assert any("node 55" in message for message in caplog.messages)


def test_sparse_catch_up_sends_whole_changed_layers():
    s = strategy(FedAvgSparseCooTensor, min_train_nodes=1, min_available_nodes=1)
    grid = FakeGrid({})
    grid.available = [1, 2]
    first = s.configure_train(1, ArrayRecord(), ConfigRecord(), grid)
    replies = [
        Message(RecordDict({**sparse_to_records(layers), "m": MetricRecord({"num-examples": n})}), reply_to=m)
        for m, (_, layers, n) in zip(sorted(first, key=lambda m: m.metadata.dst_node_id), SPARSE_GOOD[:2])
    ]
    s.aggregate_train(1, replies)
    second = {m.metadata.dst_node_id: m for m in s.configure_train(2, ArrayRecord(), ConfigRecord(), grid)}
    for message in second.values():
        assert message.content.config_records["config"]["jaxlayerx.base-round"] == 0
        sent = record_to_arrays(message.content.array_records["arrays"])
        assert set(sent) == {"dense/kernel", "head/kernel", "dense/bias"}
        for name, value in sent.items():
            np.testing.assert_array_equal(bits(value), bits(s.global_layers[name]))


def test_content_nbytes_recorded_per_node():
    s = strategy()
    replies = [reply(node, layers, n) for node, layers, n in GOOD]
    s.aggregate_train(1, replies)
    assert {r.node: r.bytes_received for r in s.history[-1].accepted} == {
        m.metadata.src_node_id: content_nbytes(m.content) for m in replies
    }


@pytest.mark.parametrize("records", [{}, {"arrays": ArrayRecord()}], ids=["no records", "empty values record"])
def test_an_empty_sparse_reply_is_accepted_and_changes_nothing(records):
    s = strategy(FedAvgSparseCooTensor)
    before = {name: value.copy() for name, value in s.global_layers.items()}
    _, metrics = s.aggregate_train(
        1, [content_reply(1, RecordDict({**records, "m": MetricRecord({"num-examples": 3})}))]
    )
    assert metrics[ACCEPTED_KEY] == 1 and metrics[REJECTED_KEY] == 0
    for name, old in before.items():
        np.testing.assert_array_equal(bits(s.global_layers[name]), bits(old))


def test_evaluate_metrics_are_weighted_and_bad_replies_ignored():
    s = strategy()
    replies = [
        content_reply(1, RecordDict({"m": MetricRecord({"num-examples": 1, "loss": 1.0})})),
        content_reply(2, RecordDict({"m": MetricRecord({"num-examples": 3, "loss": 3.0})})),
        content_reply(3, RecordDict({"m": MetricRecord({"loss": 100.0})})),  # no weight: ignored
        error_reply(4),
    ]
    metrics = s.aggregate_evaluate(1, replies)
    assert metrics["loss"] == pytest.approx((1.0 * 1 + 3.0 * 3) / 4)
    assert s.aggregate_evaluate(2, [error_reply(4)]) is None


@pytest.mark.parametrize("node_timeout", [0.3, None])
def test_a_round_short_of_nodes_stops_after_the_node_timeout(node_timeout):
    """Flower's sampling waits for its minimum without a bound; the strategy raises instead."""
    grid = FakeGrid({1: Node(1, lambda r: ["dense/bias"])})
    s = FedAvgDynamicLayer(min_train_nodes=2, min_available_nodes=2, node_timeout=node_timeout)
    began = time.monotonic()
    with pytest.raises(TimeoutError, match="1 of the 2 nodes needed connected within 0.3 s"):
        s.start(grid, arrays_to_record(global_model()), num_rounds=2, timeout=0.3)
    assert time.monotonic() - began < 5
    assert grid.sent == []  # nothing was sent to the one node


def test_node_timeout_must_be_positive():
    with pytest.raises(ValueError, match="node_timeout must be a positive number"):
        FedAvgDynamicLayer(node_timeout=0)
