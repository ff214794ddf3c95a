"""jaxlayerx.flower.serverapp: the Message-API strategies against numpy, message by message.

Replies are hand-built Flower ``Message``s (``Message(content, reply_to=instruction)``, as a
ClientApp's reply is made), their payload one compact ``ArrayRecord`` made with
``records.payload_to_record``, or written by hand (``conftest.ref_compact_encode``) when it
must be malformed. What the strategy sends is read with the independent reader
``conftest.ref_compact_decode``. ``start()`` runs against a fake ``Grid`` whose nodes are
functions. Averages are checked against a numpy weighted mean over the senders, bytes
against ``ArrayRecord.count_bytes`` of the records actually sent and the ``numpy.save``
sizes of their arrays.
"""

from __future__ import annotations

import collections
import logging
import random
import re
import threading
import time
import uuid

import ml_dtypes
import numpy as np
import pytest
from conftest import (
    RefLayer,
    bits,
    fake_grid_class,
    npy_size,
    ref_apply,
    ref_compact_decode,
    ref_compact_encode,
    ref_record_arrays,
)

pytest.importorskip("flwr")

from flwr.app import (  # noqa: E402
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.app.message.message import make_message  # noqa: E402
from flwr.common import serde  # noqa: E402
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # noqa: E402

from jaxlayerx.coo import SparseLayer  # noqa: E402
from jaxlayerx.flower.records import arrays_to_record, payload_to_record, record_to_arrays  # noqa: E402
from jaxlayerx.flower.serverapp import (  # noqa: E402
    ACCEPTED_KEY,
    FAILURES_KEY,
    LAYERS_KEY,
    MISSING_KEY,
    REJECTED_KEY,
    SERVER_BYTES_RECEIVED_KEY,
    SERVER_BYTES_SENT_KEY,
    WEIGHTS_RECEIVED_KEY,
    FedAvgLayers,
    FedAvgSparse,
)
from jaxlayerx.payload import Entries  # noqa: E402

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
        "counter": np.array([5, -3], np.int32),
        "frozen": rng.normal(size=(2, 2)).astype(np.float32),
    }


def like(name: str, seed: int) -> np.ndarray:
    """A random value for layer ``name`` of the global model."""
    reference = global_model()[name]
    rng = np.random.default_rng(seed)
    if reference.dtype == np.int32:
        return np.asarray(rng.integers(0, 100, size=reference.shape), np.int32)
    return rng.normal(size=reference.shape).astype(reference.dtype)


def whole(array) -> Entries:
    """Every entry of a layer, as a payload holds it."""
    array = np.asarray(array)
    return Entries(array.reshape(-1), None, array.shape)


def dense_record(layers: dict[str, np.ndarray]) -> ArrayRecord:
    return payload_to_record(collections.OrderedDict((name, whole(value)) for name, value in layers.items()))


def sparse_record(layers: dict[str, SparseLayer]) -> ArrayRecord:
    payload = collections.OrderedDict()
    for name, layer in layers.items():
        order = np.argsort(layer.flat_indices)
        payload[name] = Entries(np.asarray(layer.values)[order], np.asarray(layer.flat_indices)[order], layer.shape)
    return payload_to_record(payload)


def instruction(node: int, message_type: str = MessageType.TRAIN) -> Message:
    return Message(content=RecordDict(), dst_node_id=node, message_type=message_type)


def reply(node: int, layers: dict[str, np.ndarray], num_examples, *, serialize: bool = True) -> Message:
    content = RecordDict({"arrays": dense_record(layers), "metrics": MetricRecord({"num-examples": num_examples})})
    return content_reply(node, content, serialize=serialize)


def content_reply(node: int, content: RecordDict, *, serialize: bool = True) -> Message:
    if serialize:  # through Flower's protobuf serialization, as a reply crosses the wire
        content = serde.recorddict_from_proto(
            ProtoRecordDict.FromString(serde.recorddict_to_proto(content).SerializeToString())
        )
    return Message(content, reply_to=instruction(node))


def error_reply(node: int) -> Message:
    return Message(Error(code=0, reason="ClientApp raised"), reply_to=instruction(node))


def strategy(cls=FedAvgLayers, **options) -> FedAvgLayers:
    s = cls(**options)
    s.set_global_model(arrays_to_record(global_model()))
    return s


def numpy_mean(values: list[np.ndarray], weights: list[float], dtype) -> np.ndarray:
    """Independent reference: float64 weighted mean, cast to the layer's dtype."""
    mean = sum(w * v.astype(np.float64) for v, w in zip(values, weights)) / sum(weights)
    return np.rint(mean).astype(dtype) if np.dtype(dtype).kind in "iu" else mean.astype(dtype)


def decoded(message: Message) -> dict[str, RefLayer]:
    """What a message of the strategy carries, read independently."""
    return ref_compact_decode(ref_record_arrays(message.content.array_records["arrays"]))


def record_bytes(record: ArrayRecord) -> int:
    """Bytes of a record as Flower serializes it: each array's ``numpy.save`` size plus its key."""
    return sum(npy_size(array) + len(key) for key, array in ref_record_arrays(record).items())


GOOD = [
    (1, {"dense/kernel": like("dense/kernel", 1), "head/kernel": like("head/kernel", 2)}, 10),
    (2, {"dense/bias": like("dense/bias", 3), "dense/kernel": like("dense/kernel", 4)}, 30),
    (3, {"counter": like("counter", 5), "head/kernel": like("head/kernel", 6), "dense/bias": like("dense/bias", 7)}, 5),
    (4, {}, 8),  # an empty reply: counted, changes nothing
]


def check_against_references(s: FedAvgLayers, before: dict[str, np.ndarray], good) -> None:
    for name, old in before.items():
        senders = [(layers[name], n) for _, layers, n in good if name in layers and n > 0]
        got = s.global_layers[name]
        assert got.dtype == old.dtype and got.shape == old.shape, name
        if not senders:  # nobody sent it: bit-identical
            np.testing.assert_array_equal(bits(got), bits(old))
            continue
        expected = numpy_mean([v for v, _ in senders], [n for _, n in senders], old.dtype)
        tolerance = 1e-2 if old.dtype == BF16 else 1e-6
        np.testing.assert_allclose(got.astype(np.float64), expected.astype(np.float64), rtol=tolerance, atol=tolerance)
        assert not np.array_equal(got, old), name  # it did move


def test_replies_with_different_keys_and_an_empty_one():
    s = strategy()
    before = dict(s.global_layers)
    arrays, metrics = s.aggregate_train(1, [reply(node, layers, n) for node, layers, n in GOOD])
    check_against_references(s, before, GOOD)
    assert metrics[ACCEPTED_KEY] == 4 and metrics[REJECTED_KEY] == 0 and metrics[FAILURES_KEY] == 0
    assert metrics[MISSING_KEY] == 0 and metrics[LAYERS_KEY] == 4
    # The returned record is the full global model, in model order.
    decoded_model = record_to_arrays(arrays)
    assert list(decoded_model) == list(global_model())
    for name, value in decoded_model.items():
        np.testing.assert_array_equal(bits(value), bits(s.global_layers[name]))
    assert s.history[-1].aggregated_layers == ("counter", "dense/bias", "dense/kernel", "head/kernel")
    # what each accepted reply held, by hand
    accepted = {r.node: r for r in s.history[-1].accepted}
    assert {node: (r.num_examples, r.layers) for node, r in accepted.items()} == {
        node: (n, tuple(layers)) for node, layers, n in GOOD
    }
    assert accepted[3].entries == 2 + 8 + 4 and accepted[4].entries == 0
    assert s.version == 1


@pytest.mark.parametrize("cls", [FedAvgLayers, FedAvgSparse])
def test_a_scalar_layer_is_the_mean_of_its_senders(cls):
    s = cls()
    s.set_global_model(arrays_to_record({"temperature": np.array(2.0, np.float32), "steps": np.array(5, np.int32)}))
    s.aggregate_train(
        1,
        [
            reply(1, {"temperature": np.array(7.0, np.float32), "steps": np.array(67, np.int32)}, 4),
            reply(2, {"temperature": np.array(3.0, np.float32)}, 1),
        ],
    )
    assert s.global_layers["temperature"].shape == () and s.global_layers["steps"].dtype == np.int32
    np.testing.assert_allclose(s.global_layers["temperature"], (7.0 * 4 + 3.0 * 1) / 5, rtol=1e-6)
    assert int(s.global_layers["steps"]) == 67


def test_unweighted_aggregation():
    s = strategy(weighted_aggregation=False)
    before = dict(s.global_layers)
    s.aggregate_train(1, [reply(node, layers, n) for node, layers, n in GOOD])
    check_against_references(s, before, [(node, layers, 1) for node, layers, _ in GOOD])


def test_average_over_participants_moves_by_the_mean_change_of_everyone():
    s = strategy(average_over="participants")
    before = dict(s.global_layers)
    s.aggregate_train(1, [reply(node, layers, n) for node, layers, n in GOOD])
    total = sum(n for _, _, n in GOOD)
    for name in ("dense/kernel", "dense/bias"):
        old = before[name].astype(np.float64)
        change = sum(n * (layers[name].astype(np.float64) - old) for _, layers, n in GOOD if name in layers)
        np.testing.assert_allclose(s.global_layers[name], old + change / total, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(bits(s.global_layers["frozen"]), bits(before["frozen"]))


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
    good = Array(np.zeros(4, np.uint8))
    return ArrayRecord({"header": Array(dtype="uint8", shape=(4,), stype=good.stype, data=b"garbage")})


#: Every bad reply also sends a valid layer first, which must not be applied.
FROZEN = {"frozen": whole(like("frozen", 99))}


def _bad(entries: dict[str, Entries] | None, metrics: dict | None = None, **records) -> RecordDict:
    content = RecordDict(dict(records))
    if entries is not None:
        content["arrays"] = payload_to_record(collections.OrderedDict({**FROZEN, **entries}))
    content["m"] = MetricRecord({"num-examples": 3} if metrics is None else metrics)
    return content


def _short_values() -> ArrayRecord:
    arrays = ref_compact_encode(
        {
            "frozen": RefLayer(FROZEN["frozen"].values, None, (2, 2)),
            "dense/bias": RefLayer(np.zeros(4, np.float32), None, (4,)),
        }
    )
    arrays["values0"] = arrays["values0"][:-1]
    return ArrayRecord({key: Array(value) for key, value in arrays.items()})


BAD = {
    "unknown layer": (_bad({"dense/kernal": whole(like("dense/kernel", 9))}), "dense/kernal"),
    "wrong shape": (_bad({"dense/bias": whole(np.zeros(5, np.float32))}), r"expected shape \(4,\)"),
    "lossy dtype": (_bad({"counter": whole(np.array([1.5, 2.0], np.float32))}), "does not accept"),
    "nan": (_bad({"dense/bias": whole(np.array([0, np.nan, 0, 0], np.float32))}), "non-finite"),
    "inf bf16": (_bad({"head/kernel": whole(np.full((4, 2), np.inf, BF16))}), "non-finite"),
    "missing weight": (_bad({"dense/bias": whole(like("dense/bias", 9))}, {"loss": 1.0}), "num-examples"),
    "no metrics": (
        RecordDict({"arrays": payload_to_record(collections.OrderedDict(FROZEN))}),
        "num-examples",
    ),
    "negative weight": (_bad({"dense/bias": whole(like("dense/bias", 9))}, {"num-examples": -2}), "integer >= 0"),
    "fractional weight": (_bad({"dense/bias": whole(like("dense/bias", 9))}, {"num-examples": 2.5}), "integer >= 0"),
    "undecodable array": (_bad(None, arrays=_bad_array_record()), "does not decode"),
    "entries to a layer exchange": (
        _bad({"dense/bias": Entries(np.ones(1, np.float32), np.array([1]), (4,))}),
        "averages whole layers, got 1 of its 4 entries",
    ),
    "an extra record": (
        _bad({"dense/bias": whole(like("dense/bias", 9))}, other=arrays_to_record({"x": np.zeros(1)})),
        "unexpected ArrayRecord",
    ),
    "no payload record": (_bad(None), "no ArrayRecord 'arrays'"),
    "named layers instead of a compact payload": (
        _bad(None, arrays=arrays_to_record({"frozen": like("frozen", 99), "dense/bias": like("dense/bias", 9)})),
        "needs the array 'header'",
    ),
    "too few values": (_bad(None, arrays=_short_values()), "value group 0: expected 8 values"),
    "a quantized update to an integer layer": (
        _bad({"counter": Entries(np.array([3, 1], np.int8), None, (2,), "int8", np.float32(1.0))}),
        "takes no quantized update",
    ),
    "a negative int8 scale": (
        _bad({"dense/bias": Entries(np.ones(4, np.int8), None, (4,), "int8", np.float32(-1.0))}),
        "scale must be finite and >= 0",
    ),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_a_bad_reply_among_good_ones_is_dropped_whole(kind, caplog):
    content, reason = BAD[kind]
    s = strategy()
    before = dict(s.global_layers)
    replies = [reply(node, layers, n) for node, layers, n in GOOD]
    replies.insert(1, content_reply(77, content))
    with caplog.at_level(logging.WARNING, logger="jaxlayerx.flower"):
        _, metrics = s.aggregate_train(1, replies)
    check_against_references(s, before, GOOD)  # "frozen" untouched: nothing of the bad reply applied
    assert metrics[REJECTED_KEY] == 1 and metrics[ACCEPTED_KEY] == 4
    ((node, logged_reason),) = s.history[-1].rejected
    assert node == 77
    assert re.search(reason, logged_reason), logged_reason
    assert any("node 77" in message and "rejected" in message for message in caplog.messages)
    assert 77 not in {r.node for r in s.history[-1].accepted}


def test_nonfinite_values_allowed_when_asked():
    s = strategy(allow_nonfinite=True)
    s.aggregate_train(1, [reply(1, {"dense/bias": np.array([1, np.nan, 2, 3], np.float32)}, 2)])
    assert np.isnan(s.global_layers["dense/bias"][1])
    np.testing.assert_array_equal(s.global_layers["dense/bias"][[0, 2, 3]], [1, 2, 3])


def test_error_replies_are_failures_and_the_round_goes_on():
    s = strategy()
    before = dict(s.global_layers)
    _, metrics = s.aggregate_train(1, [reply(node, layers, n) for node, layers, n in GOOD] + [error_reply(9)])
    check_against_references(s, before, GOOD)
    assert metrics[FAILURES_KEY] == 1 and s.history[-1].failures == ((9, "ClientApp raised"),)
    assert metrics[ACCEPTED_KEY] == 4


def test_zero_examples_carry_no_weight():
    s = strategy()
    before = dict(s.global_layers)
    s.aggregate_train(
        1, [reply(1, {"dense/bias": like("dense/bias", 1)}, 0), reply(2, {"frozen": like("frozen", 2)}, 0)]
    )
    for name, old in before.items():
        np.testing.assert_array_equal(bits(s.global_layers[name]), bits(old))
    assert s.history[-1].aggregated_layers == ()


FakeGrid = fake_grid_class()


class FlowerIdGrid(FakeGrid):
    """A fake grid that gives every message it sends an id, as Flower's grids do on push."""

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
        return super().send_and_receive(messages, timeout=timeout)


class Node:
    """A minimal protocol-following node: keeps the global model it knows, checks the base round,
    merges, and sends back some layers (a deterministic function of the round)."""

    def __init__(self, node_id: int, picks, fail_rounds=()):
        self.node_id, self.picks, self.fail_rounds = node_id, picks, set(fail_rounds)
        self.model: dict[str, np.ndarray] = {}
        self.version: int | None = None
        self.received: list[tuple[int, int, list[str]]] = []  # (round, base, names)
        self.versions: list[int] = []  # "jaxlayerx.round" of each message
        self.replies: list[tuple[int, ArrayRecord]] = []  # (round, record) of each train reply

    def __call__(self, message: Message) -> RecordDict:
        config = message.content.config_records["config"]
        base, server_round = int(config["jaxlayerx.base-round"]), int(config["server-round"])
        payload = decoded(message)
        self.received.append((server_round, base, list(payload)))
        self.versions.append(int(config["jaxlayerx.round"]))
        if base != -1 and base != self.version:
            raise RuntimeError(f"node {self.node_id} holds version {self.version}, the server assumed {base}")
        if base == -1:
            assert all(layer.flat is None for layer in payload.values()) and list(payload) == list(global_model())
            self.model = {}
        self.model = ref_apply(self.model, payload)
        self.version = int(config["jaxlayerx.round"])
        if message.metadata.message_type == MessageType.EVALUATE:
            return RecordDict({"metrics": MetricRecord({"num-examples": 1, "loss": float(self.node_id)})})
        if server_round in self.fail_rounds:
            raise RuntimeError("training failed")
        sent = {
            name: (self.model[name].astype(np.float32) + self.node_id * 0.5).astype(self.model[name].dtype)
            for name in self.picks(server_round)
        }
        record = dense_record(sent)
        self.replies.append((server_round, record))
        return RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": 10 * self.node_id})})


def test_start_returns_the_full_model_and_nodes_catch_up_after_skipping_rounds():
    floats = ["dense/kernel", "dense/bias", "head/kernel", "frozen"]
    nodes = {
        1: Node(1, lambda r: [floats[r % 3]]),
        2: Node(2, lambda r: [floats[(r + 1) % 3]]),
        3: Node(3, lambda r: ["dense/bias"]),
    }
    grid = FlowerIdGrid(nodes)
    s = FedAvgLayers(min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1)
    # Node 3 takes part in round 1, is not connected in rounds 2 and 3 (never sampled), comes
    # back in round 4.
    original = grid.send_and_receive
    globals_before: dict[int, dict[str, np.ndarray]] = {}

    def send_and_receive(messages, *, timeout=None):
        messages = list(messages)
        server_round = int(messages[0].content.config_records["config"]["server-round"])
        train = messages[0].metadata.message_type == MessageType.TRAIN
        if train:
            globals_before[server_round] = {name: value.copy() for name, value in s.global_layers.items()}
        replies = original(messages, timeout=timeout)
        upcoming = server_round if train else server_round + 1  # the round the next sampling is for
        grid.available = [1, 2] if upcoming in (2, 3) else [1, 2, 3]
        return replies

    grid.send_and_receive = send_and_receive
    result = s.start(grid, arrays_to_record(global_model()), num_rounds=5, timeout=10)
    # Result: the full model, equal to the strategy's.
    decoded_model = record_to_arrays(result.arrays)
    assert list(decoded_model) == list(global_model())
    for name in decoded_model:
        np.testing.assert_array_equal(bits(decoded_model[name]), bits(s.global_layers[name]))
    np.testing.assert_array_equal(bits(decoded_model["frozen"]), bits(global_model()["frozen"]))  # nobody sent it
    assert sorted(result.train_metrics_clientapp) == [1, 2, 3, 4, 5]
    assert s.version == 5
    assert all(record.missing == () and record.failures == () for record in s.history)
    # First contact: the whole model (base -1); later: only what changed since the version held.
    assert nodes[1].received[0] == (1, -1, list(global_model()))
    history = {record.server_round: set(record.aggregated_layers) for record in s.history}
    for node in nodes.values():
        bases = [base for _, base, _ in node.received]
        assert bases[0] == -1 and -1 not in bases[1:]  # the whole model once, deltas after
        assert bases[1:] == sorted(bases[1:])
        # Every node ends holding exactly the global model's values.
        assert list(node.model) == list(global_model())
        for name, value in node.model.items():
            np.testing.assert_array_equal(bits(value), bits(s.global_layers[name]))
    # Versions move every round: a train message of round r brings version r - 1, an
    # evaluate message (after the round's aggregation) version r.
    for node in (nodes[1], nodes[2]):
        assert node.versions == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5]
    train_round_4 = [entry for entry in nodes[3].received if entry[0] == 4][0]
    assert train_round_4[1] == 1  # it holds the version of round 1's evaluate message
    assert set(train_round_4[2]) == history[2] | history[3]  # exactly the layers changed since
    # Each round's layers are the numpy weighted mean of the nodes that sent them.
    for record in s.history:
        r = record.server_round
        replies = {
            node: {
                name: layer.values.reshape(layer.shape)
                for name, layer in ref_compact_decode(ref_record_arrays(sent)).items()
            }
            for node in nodes
            for rr, sent in nodes[node].replies
            if rr == r
        }
        assert {reply.node for reply in record.accepted} == set(replies)
        after = s.global_layers if r == 5 else globals_before[r + 1]
        good = [(node, layers, 10 * node) for node, layers in replies.items()]
        for name, old in globals_before[r].items():
            senders = [(layers[name], n) for _, layers, n in good if name in layers]
            if not senders:
                np.testing.assert_array_equal(bits(after[name]), bits(old))
                continue
            expected = numpy_mean([v for v, _ in senders], [n for _, n in senders], old.dtype)
            tolerance = 1e-2 if old.dtype == BF16 else 1e-6
            np.testing.assert_allclose(
                after[name].astype(np.float64), expected.astype(np.float64), rtol=tolerance, atol=tolerance
            )
    # Bytes: what each train message carried and what each reply carried, per node and round.
    train_messages = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    for record in s.history:
        sent = [m for m in train_messages if m.content.config_records["config"]["server-round"] == record.server_round]
        counts = {m.metadata.dst_node_id: m.content.array_records["arrays"].count_bytes() for m in sent}
        assert dict(record.bytes_sent) == counts
        assert counts == {m.metadata.dst_node_id: record_bytes(m.content.array_records["arrays"]) for m in sent}
        received = {
            node: r.count_bytes() for node in nodes for rr, r in nodes[node].replies if rr == record.server_round
        }
        assert {reply.node: reply.bytes_received for reply in record.accepted} == received
        metrics = result.train_metrics_clientapp[record.server_round]
        assert metrics[SERVER_BYTES_SENT_KEY] == sum(counts.values())
        assert metrics[SERVER_BYTES_RECEIVED_KEY] == sum(received.values())


def test_versions_move_every_round_even_when_nothing_changes():
    nodes = {1: Node(1, lambda r: []), 2: Node(2, lambda r: [])}
    s = FedAvgLayers(min_train_nodes=2, min_available_nodes=2, fraction_evaluate=0.0)
    s.start(FakeGrid(nodes), arrays_to_record(global_model()), num_rounds=3, timeout=10)
    assert s.version == 3 and [record.aggregated_layers for record in s.history] == [(), (), ()]
    for node in nodes.values():
        assert [(r, base, names) for r, base, names in node.received][1:] == [(2, 0, []), (3, 1, [])]
        assert node.versions == [0, 1, 2]
    # an empty update: the header alone (format 1, no layers: 2 bytes), one numpy.save blob and its key
    assert dict(s.history[2].bytes_sent) == {1: 128 + 2 + len("header"), 2: 128 + 2 + len("header")}
    for name, value in global_model().items():
        np.testing.assert_array_equal(bits(s.global_layers[name]), bits(value))


def test_a_node_whose_reply_is_an_error_gets_the_whole_model_next_time():
    nodes = {1: Node(1, lambda r: ["dense/bias"]), 2: Node(2, lambda r: ["dense/kernel"], fail_rounds=[2])}
    s = FedAvgLayers(min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1, fraction_evaluate=0.0)
    s.start(FakeGrid(nodes), arrays_to_record(global_model()), num_rounds=3, timeout=10)
    bases = [(r, base) for r, base, _ in nodes[2].received]
    assert bases == [(1, -1), (2, 0), (3, -1)]  # no evaluate messages: it holds round 1's version 0
    assert nodes[2].received[2][2] == list(global_model())
    assert [(r, base) for r, base, _ in nodes[1].received] == [(1, -1), (2, 0), (3, 1)]
    assert s.history[1].failures == ((2, "training failed"),)
    assert s.history[1].missing == ()


def _configure(s, server_round: int, grid) -> dict[int, Message]:
    """The round's train messages by node, each given an id as Flower's grid does on push."""
    messages = s.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid)
    for message in messages:
        message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
    return {message.metadata.dst_node_id: message for message in messages}


def _answer(message: Message, layers: dict[str, np.ndarray], n: int) -> Message:
    content = RecordDict({"arrays": dense_record(layers), "m": MetricRecord({"num-examples": n})})
    return Message(content, reply_to=message)


def test_an_error_reply_is_pinned_on_the_node_its_message_went_to():
    """An error reply whose source node id is another node's (as Flower makes for a node
    it could not reach) is the failure of the node the message went to: that node is named
    and forgotten, the other is not."""
    s = strategy(min_train_nodes=3, min_available_nodes=3)
    grid = FakeGrid({})
    grid.available = [1, 2, 3]
    first = _configure(s, 1, grid)
    s.aggregate_train(1, [_answer(first[n], {"dense/bias": like("dense/bias", n)}, n) for n in (1, 2, 3)])
    second = _configure(s, 2, grid)
    assert {n: m.content.config_records["config"]["jaxlayerx.base-round"] for n, m in second.items()} == {
        1: 0,
        2: 0,
        3: 0,
    }
    metadata = Metadata(
        run_id=1,
        message_id="",
        src_node_id=2,  # not the node the message went to
        dst_node_id=0,
        reply_to_message_id=second[3].metadata.message_id,
        group_id="",
        created_at=time.time(),
        ttl=3600.0,
        message_type=MessageType.TRAIN,
    )
    failed = make_message(metadata, error=Error(code=0, reason="unreachable"))
    before = dict(s.global_layers)
    _, metrics = s.aggregate_train(
        2, [_answer(second[1], {"frozen": like("frozen", 1)}, 4), failed, _answer(second[2], {}, 6)]
    )
    record = s.history[-1]
    assert record.failures == ((3, "unreachable"),)
    assert [reply.node for reply in record.accepted] == [1, 2] and record.missing == ()
    assert metrics[FAILURES_KEY] == 1 and metrics[ACCEPTED_KEY] == 2
    np.testing.assert_array_equal(bits(s.global_layers["frozen"]), bits(like("frozen", 1)))  # node 1 alone sent it
    np.testing.assert_array_equal(bits(s.global_layers["dense/bias"]), bits(before["dense/bias"]))
    third = _configure(s, 3, grid)
    configs = {n: m.content.config_records["config"] for n, m in third.items()}
    assert {n: (c["jaxlayerx.base-round"], c["jaxlayerx.round"]) for n, c in configs.items()} == {
        1: (1, 2),
        2: (1, 2),
        3: (-1, 2),
    }
    assert list(decoded(third[3])) == list(global_model())  # forgotten: the whole model
    assert list(decoded(third[2])) == ["frozen"]  # not forgotten: what changed in round 2


def test_a_sampled_node_that_never_replies_is_missing_and_forgotten():
    s = strategy(min_train_nodes=3, min_available_nodes=3, min_evaluate_nodes=3)
    grid = FakeGrid({})
    grid.available = [1, 2, 3]
    first = _configure(s, 1, grid)
    s.aggregate_train(1, [_answer(first[n], {"dense/kernel": like("dense/kernel", n)}, n) for n in (1, 2, 3)])
    assert s.history[-1].missing == ()
    second = _configure(s, 2, grid)
    _, metrics = s.aggregate_train(2, [_answer(second[1], {"frozen": like("frozen", 5)}, 1), _answer(second[2], {}, 1)])
    record = s.history[-1]
    assert record.missing == (3,) and record.failures == () and record.rejected == ()
    assert metrics[MISSING_KEY] == 1 and metrics[ACCEPTED_KEY] == 2
    assert dict(record.bytes_sent).keys() == {1, 2, 3}  # it was sent a message
    third = _configure(s, 3, grid)
    bases = {n: m.content.config_records["config"]["jaxlayerx.base-round"] for n, m in third.items()}
    assert bases == {1: 1, 2: 1, 3: -1}
    assert list(decoded(third[3])) == list(global_model())
    # an evaluate message nobody answers forgets the same way
    s.aggregate_train(3, [_answer(third[n], {}, 1) for n in (1, 2, 3)])
    evaluate = s.configure_evaluate(3, ArrayRecord(), ConfigRecord(), grid)
    replies = [
        Message(RecordDict({"m": MetricRecord({"num-examples": 1})}), reply_to=m)
        for m in evaluate
        if m.metadata.dst_node_id != 1
    ]
    s.aggregate_evaluate(3, replies)
    fourth = _configure(s, 4, grid)
    bases = {n: m.content.config_records["config"]["jaxlayerx.base-round"] for n, m in fourth.items()}
    assert bases == {1: -1, 2: 3, 3: 3}


def test_a_node_that_lost_its_state_is_resynced():
    """The node raises on a base it does not hold; the next message holds the whole model."""
    nodes = {1: Node(1, lambda r: ["dense/bias"])}
    s = FedAvgLayers(min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1, fraction_evaluate=0.0)
    grid = FakeGrid(nodes)
    s.set_global_model(arrays_to_record(global_model()))
    for server_round in (1, 2, 3):
        if server_round == 2:
            nodes[1].version = None  # a restarted node
        s.aggregate_train(
            server_round, grid.send_and_receive(s.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid))
        )
    assert [(r, base) for r, base, _ in nodes[1].received] == [(1, -1), (2, 0), (3, -1)]
    assert [len(record.failures) for record in s.history] == [0, 1, 0]
    assert list(nodes[1].model) == list(global_model())
    for name in set(global_model()) - set(s.history[-1].aggregated_layers):
        np.testing.assert_array_equal(bits(nodes[1].model[name]), bits(s.global_layers[name]))


# --- sparse ---------------------------------------------------------------------------


def sparse(name: str, flat: list[int], seed: int) -> SparseLayer:
    reference = global_model()[name]
    values = np.random.default_rng(seed).normal(size=len(flat)).astype(reference.dtype)
    return SparseLayer(values, np.asarray(flat, np.int64), reference.shape)


def sparse_reply(node: int, layers: dict[str, SparseLayer], n) -> Message:
    content = RecordDict({"arrays": sparse_record(layers), "metrics": MetricRecord({"num-examples": n})})
    return content_reply(node, content)


SPARSE_GOOD = [
    (1, {"dense/kernel": sparse("dense/kernel", [0, 5, 11], 1), "head/kernel": sparse("head/kernel", [1, 2], 2)}, 10),
    (2, {"dense/kernel": sparse("dense/kernel", [5, 6], 3), "dense/bias": sparse("dense/bias", [3], 4)}, 30),
    (3, {"head/kernel": sparse("head/kernel", [2, 7], 5), "dense/kernel": sparse("dense/kernel", [11, 0], 6)}, 5),
    (4, {}, 8),
]


def check_sparse(s, before, good) -> None:
    """Independent numpy: each weight the mean over the nodes that sent it; bit-identical elsewhere."""
    for name, old in before.items():
        got = s.global_layers[name].reshape(-1)
        assert s.global_layers[name].dtype == old.dtype and s.global_layers[name].shape == old.shape
        for index in range(old.size):
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
    s = strategy(FedAvgSparse)
    before = {name: value.copy() for name, value in s.global_layers.items()}
    arrays, metrics = s.aggregate_train(1, [sparse_reply(node, layers, n) for node, layers, n in SPARSE_GOOD])
    check_sparse(s, before, SPARSE_GOOD)
    assert metrics[ACCEPTED_KEY] == 4
    assert list(record_to_arrays(arrays)) == list(global_model())
    assert {r.node: r.entries for r in s.history[-1].accepted} == {1: 5, 2: 3, 3: 4, 4: 0}
    # a layer sent whole to the sparse strategy: every weight averaged with the entries sent
    s.aggregate_train(
        2,
        [
            reply(1, {"dense/bias": np.full(4, 2.0, np.float32)}, 1),
            sparse_reply(2, {"dense/bias": SparseLayer(np.array([4.0], np.float32), np.array([1]), (4,))}, 3),
        ],
    )
    np.testing.assert_allclose(s.global_layers["dense/bias"], [2.0, 3.5, 2.0, 2.0], rtol=1e-6)


def test_sparse_reply_order_does_not_matter():
    outcomes = []
    for seed in range(3):
        replies = [sparse_reply(node, layers, n) for node, layers, n in SPARSE_GOOD]
        random.Random(seed).shuffle(replies)
        s = strategy(FedAvgSparse)
        s.aggregate_train(1, replies)
        outcomes.append(s.global_layers)
    for other in outcomes[1:]:
        for name in outcomes[0]:
            np.testing.assert_array_equal(bits(other[name]), bits(outcomes[0][name]))


def _sparse_content(layers: dict[str, RefLayer], n=3, mutate=None) -> RecordDict:
    """A hand-written compact reply (indices written as given), optionally mutated."""
    arrays = ref_compact_encode(layers)
    if mutate:
        mutate(arrays)
    record = ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in arrays.items()})
    return RecordDict({"arrays": record, "m": MetricRecord({"num-examples": n})})


def ref(values, flat, shape, **fields) -> RefLayer:
    return RefLayer(np.asarray(values, np.float32), None if flat is None else np.asarray(flat), shape, **fields)


SPARSE_BAD = {
    "unknown layer": (_sparse_content({"nope": ref([0.0], [0], (4,))}), "nope"),
    "wrong shape": (_sparse_content({"dense/bias": ref([0.0], [0], (5,))}), r"expected shape \(4,\)"),
    "out of bounds": (_sparse_content({"dense/bias": ref([1.0], [4], (4,), encoding=1)}), "below the layer's 4"),
    "repeated entry": (_sparse_content({"dense/bias": ref([1.0, 2.0], [1, 1], (4,), encoding=1)}), "distinct"),
    "descending entries": (_sparse_content({"dense/bias": ref([1.0, 2.0], [2, 1], (4,), encoding=1)}), "ascending"),
    "bitmask of another count": (
        _sparse_content(
            {"dense/kernel": ref([1.0, 2.0], [0, 5], (3, 4), encoding=3)},
            mutate=lambda a: a.update(index=np.array([0x07, 0x00], np.uint8)),
        ),
        "the bitmask marks 3 entries, the header says 2",
    ),
    "lossy dtype": (_sparse_content({"counter": ref([1.5], [1], (2,))}), "does not accept"),
    "nan": (_sparse_content({"dense/bias": ref([np.nan], [0], (4,))}), "non-finite"),
    "negative weight": (_sparse_content({"dense/bias": ref([1.0], [1], (4,))}, n=-1), "integer >= 0"),
    "missing index": (
        _sparse_content({"dense/bias": ref([1.0], [1], (4,))}, mutate=lambda a: a.pop("index")),
        "announces the arrays",
    ),
    "named layers instead of a compact payload": (
        RecordDict(
            {"arrays": arrays_to_record({"dense/bias": like("dense/bias", 1)}), "m": MetricRecord({"num-examples": 3})}
        ),
        "needs the array 'header'",
    ),
    "the old COO records beside": (
        RecordDict(
            {
                "arrays": sparse_record({"dense/bias": sparse("dense/bias", [1], 0)}),
                "coo-indices": arrays_to_record({"dense/bias": np.array([[1]], np.int64)}),
                "m": MetricRecord({"num-examples": 3}),
            }
        ),
        r"unexpected ArrayRecord\(s\) \['coo-indices'\]",
    ),
}


@pytest.mark.parametrize("kind", list(SPARSE_BAD))
def test_a_bad_sparse_reply_among_good_ones_is_dropped_whole(kind, caplog):
    content, reason = SPARSE_BAD[kind]
    s = strategy(FedAvgSparse)
    before = {name: value.copy() for name, value in s.global_layers.items()}
    replies = [sparse_reply(node, layers, n) for node, layers, n in SPARSE_GOOD]
    replies.insert(2, content_reply(55, content))
    with caplog.at_level(logging.WARNING, logger="jaxlayerx.flower"):
        _, metrics = s.aggregate_train(1, replies)
    check_sparse(s, before, SPARSE_GOOD)
    assert metrics[REJECTED_KEY] == 1 and metrics[ACCEPTED_KEY] == 4
    ((node, logged),) = s.history[-1].rejected
    assert node == 55 and re.search(reason, logged), logged
    assert any("node 55" in message for message in caplog.messages)


def test_sparse_catch_up_sends_exactly_the_changed_entries():
    s = strategy(FedAvgSparse, min_train_nodes=1, min_available_nodes=1)
    grid = FakeGrid({})
    grid.available = [1, 2]
    first = s.configure_train(1, ArrayRecord(), ConfigRecord(), grid)
    replies = [
        Message(RecordDict({"arrays": sparse_record(layers), "m": MetricRecord({"num-examples": n})}), reply_to=m)
        for m, (_, layers, n) in zip(sorted(first, key=lambda m: m.metadata.dst_node_id), SPARSE_GOOD[:2])
    ]
    s.aggregate_train(1, replies)
    changed = collections.defaultdict(set)
    for _, layers, _ in SPARSE_GOOD[:2]:
        for name, layer in layers.items():
            changed[name] |= set(layer.flat_indices.tolist())
    second = {m.metadata.dst_node_id: m for m in s.configure_train(2, ArrayRecord(), ConfigRecord(), grid)}
    for message in second.values():
        config = message.content.config_records["config"]
        assert (config["jaxlayerx.base-round"], config["jaxlayerx.round"]) == (0, 1)
        sent = decoded(message)
        assert set(sent) == {"dense/kernel", "head/kernel", "dense/bias"}
        for name, layer in sent.items():
            assert layer.flat is not None and layer.flat.tolist() == sorted(changed[name]), name
            global_values = s.global_layers[name].reshape(-1)[layer.flat]
            assert layer.values.dtype == global_values.dtype
            np.testing.assert_array_equal(bits(layer.values), bits(global_values))
    assert dict(s.history[0].bytes_sent) == {
        m.metadata.dst_node_id: record_bytes(m.content.array_records["arrays"]) for m in first
    }


def test_bytes_received_recorded_per_node():
    s = strategy()
    replies = [reply(node, layers, n) for node, layers, n in GOOD]
    s.aggregate_train(1, replies)
    expected = {m.metadata.src_node_id: m.content.array_records["arrays"].count_bytes() for m in replies}
    assert {r.node: r.bytes_received for r in s.history[-1].accepted} == expected
    assert expected == {m.metadata.src_node_id: record_bytes(m.content.array_records["arrays"]) for m in replies}


@pytest.mark.parametrize("cls", [FedAvgLayers, FedAvgSparse])
def test_an_empty_payload_is_accepted_and_changes_nothing(cls):
    s = strategy(cls)
    before = {name: value.copy() for name, value in s.global_layers.items()}
    empty = RecordDict({"arrays": payload_to_record(collections.OrderedDict()), "m": MetricRecord({"num-examples": 3})})
    _, metrics = s.aggregate_train(1, [content_reply(1, empty)])
    assert metrics[ACCEPTED_KEY] == 1 and metrics[REJECTED_KEY] == 0
    for name, old in before.items():
        np.testing.assert_array_equal(bits(s.global_layers[name]), bits(old))
    assert s.version == 1 and s.history[-1].accepted[0].layers == ()


@pytest.mark.parametrize(
    ("records", "reason"),
    [({}, "no ArrayRecord 'arrays'"), ({"arrays": ArrayRecord()}, "needs the array 'header'")],
    ids=["no records", "empty values record"],
)
def test_a_reply_without_a_compact_payload_is_rejected(records, reason):
    s = strategy(FedAvgSparse)
    before = {name: value.copy() for name, value in s.global_layers.items()}
    _, metrics = s.aggregate_train(
        1, [content_reply(1, RecordDict({**records, "m": MetricRecord({"num-examples": 3})}))]
    )
    assert metrics[ACCEPTED_KEY] == 0 and metrics[REJECTED_KEY] == 1
    assert re.search(reason, s.history[-1].rejected[0][1])
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
    s = FedAvgLayers(min_train_nodes=2, min_available_nodes=2, node_timeout=node_timeout)
    began = time.monotonic()
    with pytest.raises(TimeoutError, match="1 of the 2 nodes needed connected within 0.3 s"):
        s.start(grid, arrays_to_record(global_model()), num_rounds=2, timeout=0.3)
    assert time.monotonic() - began < 5
    assert grid.sent == []  # nothing was sent to the one node


class ShrinkingGrid(FakeGrid):
    """Lists every node the first time it is asked, then one node fewer (a node lost)."""

    def __init__(self, nodes):
        super().__init__(nodes)
        self.asked = 0

    def get_node_ids(self):
        self.asked += 1
        return list(self.available) if self.asked == 1 else list(self.available)[:-1]


@pytest.mark.parametrize("kind", ["train", "evaluate"])
def test_a_node_lost_between_counting_and_sampling_does_not_stall_the_round(kind):
    """Flower counts the nodes, then samples while asking again, and waits without a bound
    while fewer are listed; the strategy samples from the nodes it counted."""
    nodes = {node: Node(node, lambda r: ["dense/bias"]) for node in (1, 2, 3)}
    s = FedAvgLayers(min_train_nodes=3, min_evaluate_nodes=3, min_available_nodes=3, fraction_evaluate=1.0)
    s.set_global_model(arrays_to_record(global_model()))
    configure = s.configure_train if kind == "train" else s.configure_evaluate
    messages: list = []
    worker = threading.Thread(
        target=lambda: messages.extend(configure(1, ArrayRecord(), ConfigRecord(), ShrinkingGrid(nodes))), daemon=True
    )
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "the sampling waited for a node that was gone"
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 2, 3]


def test_node_timeout_must_be_positive():
    with pytest.raises(ValueError, match="node_timeout must be a positive number"):
        FedAvgLayers(node_timeout=0)


@pytest.mark.parametrize("cls", [FedAvgLayers, FedAvgSparse])
def test_the_stream_shows_each_rounds_bytes_and_the_runs_share_of_full_exchange(cls, caplog):
    """The INFO lines `flwr run --stream` shows: each round's bytes sent and received (the
    sums of the serialized records' sizes), the weights received for sparse exchange, and
    the run's totals as a share of full exchange (the whole model in every message)."""
    nodes = {1: Node(1, lambda r: ["dense/bias"]), 2: Node(2, lambda r: ["dense/kernel", "head/kernel"])}
    grid = FakeGrid(nodes)
    s = cls(min_train_nodes=2, min_available_nodes=2, fraction_evaluate=0.0)
    with caplog.at_level(logging.INFO, logger="jaxlayerx.flower"):
        result = s.start(grid, arrays_to_record(global_model()), num_rounds=3, timeout=10)
    lines = [m for m in caplog.messages if re.match(r"round \d+: averaged", m)]
    assert len(lines) == 3
    train = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    totals = [0, 0]
    for server_round, line in enumerate(lines, start=1):
        sent = sum(
            record_bytes(m.content.array_records["arrays"])
            for m in train
            if m.content.config_records["config"]["server-round"] == server_round
        )
        records = [r for node in nodes.values() for rr, r in node.replies if rr == server_round]
        received = sum(record_bytes(r) for r in records)
        totals[0] += sent
        totals[1] += received
        assert f"sent {sent / 1e6:.3f} MB, received {received / 1e6:.3f} MB" in line, line
        weights = sum(  # the values arrays of each reply's compact record
            int(np.size(v)) for r in records for k, v in ref_record_arrays(r).items() if k.startswith("values")
        )
        metrics = result.train_metrics_clientapp[server_round]
        if cls is FedAvgSparse:
            assert line.endswith(f", {weights} weights received")
            assert metrics[WEIGHTS_RECEIVED_KEY] == weights
        else:
            assert "weights" not in line and WEIGHTS_RECEIVED_KEY not in metrics
    # Full exchange: each message the size of round 1's, which held the whole model.
    whole = record_bytes(train[0].content.array_records["arrays"])
    assert s.full_exchange_bytes() == whole
    (summary,) = [m for m in caplog.messages if m.startswith("run: ")]
    assert summary == (
        f"run: sent {totals[0] / 1e6:.3f} MB ({totals[0] / (whole * 6):.1%} of full exchange), "
        f"received {totals[1] / 1e6:.3f} MB ({totals[1] / (whole * 6):.1%} of full exchange) over 3 round(s)"
    )
