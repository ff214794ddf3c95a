"""Tests of the Message-API client app (jaxlayerx/flower/clientapp.py).

The ``ClientApp`` is called directly with hand-built ``Message``s whose payload is one
compact ``ArrayRecord`` written here independently (``conftest.ref_compact_encode``, from
docs/wire-formats.md), and a ``Context`` whose ``state`` carries the node between messages,
as a SuperNode does. Replies are read with the independent ``conftest.ref_compact_decode``
and compared with what the exchanger itself pushes for the trained model, and with values
computed here in numpy. Byte metrics are compared with Flower's own count of the records
(serialized arrays plus keys). Flower's deprecation warnings (logged by the ``flwr`` logger
as "DEPRECATED FEATURE") are captured during every test and must not appear.
"""

from __future__ import annotations

import logging
import math
import os
import pathlib

import pytest

pytest.importorskip("flwr")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from conftest import (  # noqa: E402
    LINEN_SHAPES,
    LinenNet,
    RefLayer,
    bits,
    flower_metadata,
    nest,
    ref_compact_decode,
    ref_compact_encode,
    ref_flat,
    ref_record_arrays,
    slow,
)
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

import jaxlayerx  # noqa: E402
from jaxlayerx.flower.clientapp import exchanger_client_app  # noqa: E402
from jaxlayerx.protocol import VersionMismatchError  # noqa: E402

X = np.zeros((1, 4), np.float32)
NAMES = list(LINEN_SHAPES)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(autouse=True)
def no_flower_deprecations():
    handler = _Collect()
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    deprecated = [m for m in handler.messages if "DEPRECATED" in m]
    assert not deprecated, deprecated


def make_model(context):
    return LinenNet().init(jax.random.key(0), X)


def full_layers(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        name: (rng.standard_normal(shape) + 10 + i).astype(np.float32)
        for i, (name, shape) in enumerate(LINEN_SHAPES.items())
    }


def compact_record(layers: dict) -> ArrayRecord:
    """A compact payload written independently, built with Flower's own classes: arrays
    are whole layers, ``RefLayer``s are entries."""
    written = ref_compact_encode(
        {
            name: value if isinstance(value, RefLayer) else RefLayer(np.asarray(value).reshape(-1), None, value.shape)
            for name, value in layers.items()
        }
    )
    return ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in written.items()})


def message(content: RecordDict, kind: str = "train") -> Message:
    return Message(metadata=flower_metadata(kind, src_node_id=0, dst_node_id=7), content=content)


def train_message(layers, base: int, version: int, kind: str = "train", extra: dict | None = None) -> Message:
    config = ConfigRecord(
        {"server-round": version + 1, "jaxlayerx.base-round": base, "jaxlayerx.round": version, **(extra or {})}
    )
    return message(RecordDict({"arrays": compact_record(layers), "config": config}), kind)


def new_context(node_id: int = 7) -> Context:
    return Context(run_id=1, node_id=node_id, node_config={}, state=RecordDict(), run_config={})


def shifting_train(deltas: dict[str, float], seen: list, metrics: dict | None = None, examples: int = 11):
    def train_fn(model, config, context):
        received = ref_flat(model)
        seen.append({"received": received, "config": dict(config)})
        trained = {name: value + np.float32(deltas.get(name, 0.0)) for name, value in received.items()}
        seen[-1]["trained"] = trained
        return nest(trained), examples, dict(metrics or {})

    return train_fn


def assert_same(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    for name in expected:
        assert np.asarray(actual[name]).dtype == np.asarray(expected[name]).dtype, name
        np.testing.assert_array_equal(bits(actual[name]), bits(expected[name]), err_msg=name)


def content_bytes(content: RecordDict) -> int:
    """Flower's own count (what arrays_size_mod logs): serialized array bytes plus key lengths."""
    return sum(
        len(array.data) + len(name) for record in content.array_records.values() for name, array in record.items()
    )


def reply_payload(reply: Message) -> dict[str, RefLayer]:
    return ref_compact_decode(ref_record_arrays(reply.content.array_records["arrays"]))


def saved_layers(context: Context) -> dict[str, np.ndarray]:
    return ref_record_arrays(context.state.array_records["jaxlayerx.layers"])


def saved_reference(context: Context) -> dict[str, np.ndarray]:
    """The exchanger's saved reference (``reference/<layer>`` of ``jaxlayerx.exchange``)."""
    arrays = ref_record_arrays(context.state.array_records["jaxlayerx.exchange"])
    return {key.removeprefix("reference/"): value for key, value in arrays.items() if key.startswith("reference/")}


def saved_version(context: Context) -> int:
    return context.state.config_records["jaxlayerx.version"]["version"]


def test_the_app_is_a_client_app():
    assert isinstance(
        exchanger_client_app(make_model, jaxlayerx.FullParameterExchanger(), lambda m, c, x: (m, 1, {})), ClientApp
    )


def test_dense_state_across_messages_delta_merge_and_reply():
    seen: list = []
    deltas = {"params/Dense_0/kernel": 1.0, "params/Dense_1/bias": -0.5}

    def exchanger():
        return jaxlayerx.DynamicLayerExchanger(
            jaxlayerx.LayerSelectionFunctionConstructor(
                norm_threshold=1.0, exchange_percentage=0.25, normalize=False
            ).select_by_percentage()
        )

    app = exchanger_client_app(make_model, exchanger(), shifting_train(deltas, seen, {"train-loss": 0.5}))
    context = new_context()
    full = full_layers(1)
    incoming = train_message(full, base=-1, version=0)
    reply = app(incoming, context)
    assert_same(seen[0]["received"], full)
    assert seen[0]["config"]["jaxlayerx.round"] == 0
    # the reply: exactly what the exchanger pushes for the trained model (its fl4health shell,
    # named layout), and by hand: the two shifted layers (ceil(8 * 0.25) = 2), whole, as trained
    pushed, names = jaxlayerx.unpack_layers(exchanger().push_parameters(nest(seen[0]["trained"]), nest(full)))
    sent = reply_payload(reply)
    assert list(sent) == names and sorted(sent) == sorted(deltas)
    for name, weights in zip(names, pushed):
        assert sent[name].flat is None and sent[name].form == 0 and sent[name].shape == LINEN_SHAPES[name]
        np.testing.assert_array_equal(bits(sent[name].values), bits(np.asarray(weights).reshape(-1)))
        np.testing.assert_array_equal(bits(sent[name].values), bits(seen[0]["trained"][name].reshape(-1)))
    metrics = reply.content.metric_records["metrics"]
    assert metrics["num-examples"] == 11 and metrics["train-loss"] == 0.5
    assert metrics["jaxlayerx.bytes-sent"] == content_bytes(reply.content)
    assert metrics["jaxlayerx.bytes-sent"] == reply.content.array_records["arrays"].count_bytes()
    assert metrics["jaxlayerx.bytes-received"] == content_bytes(incoming.content)
    assert list(reply.content) == ["arrays", "metrics"]
    assert saved_version(context) == 0

    # message 2: a delta over version 0; the node merges it into its own trained model
    delta = {"params/Dense_1/kernel": np.full((3, 2), 0.25, np.float32)}
    app(train_message(delta, base=0, version=1), context)
    assert_same(seen[1]["received"], dict(seen[0]["trained"], **delta))
    assert saved_version(context) == 1

    # message 3 claims a base the node does not hold: it raises and changes nothing
    layers_before = saved_layers(context)
    with pytest.raises(VersionMismatchError, match=r"update is over global version 5, but the client holds version 1"):
        app(train_message(delta, base=5, version=6), context)
    assert len(seen) == 2
    assert_same(saved_layers(context), layers_before)
    assert saved_version(context) == 1

    # after the mismatch the server sends the whole model (base -1) again: accepted
    again = full_layers(2)
    app(train_message(again, base=-1, version=6), context)
    assert_same(seen[2]["received"], again)
    assert saved_version(context) == 6


def test_a_fresh_node_refuses_a_delta_and_a_partial_whole_model():
    app = exchanger_client_app(make_model, jaxlayerx.FullParameterExchanger(), lambda m, c, x: (m, 1, {}))
    context = new_context()
    with pytest.raises(ValueError, match="the first message must hold the whole model"):
        app(train_message({"params/Dense_0/bias": np.ones(3, np.float32)}, base=0, version=1), context)
    with pytest.raises(ValueError, match=r"the whole model must hold every layer, whole; 7 missing or partial"):
        app(train_message({"params/Dense_0/bias": np.ones(3, np.float32)}, base=-1, version=1), context)
    entries = dict(full_layers(3))
    entries["params/Dense_0/bias"] = RefLayer(np.ones(2, np.float32), np.array([0, 2]), (3,))
    with pytest.raises(ValueError, match=r"1 missing or partial, for example \['params/Dense_0/bias'\]"):
        app(train_message(entries, base=-1, version=1), context)
    assert "jaxlayerx.version" not in context.state.config_records  # nothing was saved


def test_a_payload_the_model_refuses_changes_nothing():
    seen: list = []
    app = exchanger_client_app(make_model, jaxlayerx.FullParameterExchanger(), shifting_train({}, seen))
    context = new_context()
    full = full_layers(4)
    app(train_message(full, base=-1, version=0), context)
    layers_before = saved_layers(context)
    good = {"params/Dense_0/bias": np.full(3, 7.0, np.float32)}
    with pytest.raises(ValueError, match=r"layer 'params/Dense_1/bias': expected shape \(2,\), got \(3,\)"):
        app(train_message({**good, "params/Dense_1/bias": np.zeros(3, np.float32)}, base=0, version=1), context)
    with pytest.raises(KeyError, match="params/Dense_9/bias"):
        app(train_message({**good, "params/Dense_9/bias": np.zeros(2, np.float32)}, base=0, version=1), context)
    with pytest.raises(ValueError, match="index must be a 1-D uint8 array"):
        bad = compact_record({"params/Dense_0/bias": RefLayer(np.ones(1, np.float32), np.array([1]), (3,))})
        bad["index"] = Array(np.zeros(1, np.float32))
        config = ConfigRecord({"server-round": 2, "jaxlayerx.base-round": 0, "jaxlayerx.round": 1})
        app(message(RecordDict({"arrays": bad, "config": config})), context)
    assert len(seen) == 1 and saved_version(context) == 0
    assert_same(saved_layers(context), layers_before)


def test_fedbn_keeps_local_layers_after_the_first_message():
    seen: list = []
    exchanger = jaxlayerx.LayerExchangerWithExclusions(LinenNet(), {nn.BatchNorm}, X)
    app = exchanger_client_app(make_model, exchanger, shifting_train({"batch_stats/BatchNorm_0/mean": 2.0}, seen))
    context = new_context()
    reply = app(train_message(full_layers(3), base=-1, version=0), context)
    sent = reply_payload(reply)
    assert sorted(sent) == sorted(name for name in NAMES if "BatchNorm" not in name)
    for name, layer in sent.items():
        np.testing.assert_array_equal(bits(layer.values), bits(seen[0]["trained"][name].reshape(-1)))
    # the server forgot the node and sends the whole model: the node's BatchNorm layers stay local
    other = full_layers(4)
    app(train_message(other, base=-1, version=3), context)
    expected = {name: (seen[0]["trained"][name] if "BatchNorm" in name else other[name]) for name in NAMES}
    assert_same(seen[1]["received"], expected)


def test_sparse_reply_and_error_feedback_reference_persist_per_node():
    seen: list = []
    exchanger = jaxlayerx.SparseCooParameterExchanger(
        0.1, jaxlayerx.largest_magnitude_change_scores, error_feedback=True
    )
    app = exchanger_client_app(make_model, exchanger, shifting_train({"params/Dense_0/kernel": 1.0}, seen))
    a, b = new_context(1), new_context(2)
    full_a, full_b = full_layers(5), full_layers(6)
    reply = app(train_message(full_a, base=-1, version=0), a)
    # the reference after the first message is the whole model pulled
    assert_same(saved_reference(a), full_a)
    # the sparse reply equals the exchanger's push (its fl4health shell, COO layout)
    check = jaxlayerx.SparseCooParameterExchanger(0.1, jaxlayerx.largest_magnitude_change_scores)
    expected = jaxlayerx.read_coo(check.push_parameters(nest(seen[0]["trained"]), nest(full_a)))
    got = reply_payload(reply)
    assert list(got) == list(expected)
    for name in expected:
        flat = np.arange(math.prod(got[name].shape)) if got[name].flat is None else got[name].flat
        np.testing.assert_array_equal(bits(got[name].values), bits(expected[name].values))
        np.testing.assert_array_equal(flat, expected[name].flat_indices)
    # ceil(0.1 * 35) = 4 weights, but the 12 shifted kernel weights tie at the threshold: all sent
    assert math.ceil(0.1 * sum(math.prod(s) for s in LINEN_SHAPES.values())) == 4
    assert list(got) == ["params/Dense_0/kernel"] and got["params/Dense_0/kernel"].values.size == 12
    np.testing.assert_array_equal(
        bits(got["params/Dense_0/kernel"].values), bits(seen[0]["trained"]["params/Dense_0/kernel"].reshape(-1))
    )
    metrics = reply.content.metric_records["metrics"]
    assert metrics["jaxlayerx.bytes-sent"] == content_bytes(reply.content)
    assert set(reply.content.array_records) == {"arrays"}

    # node b in the same process: its own reference, not a's
    app(train_message(full_b, base=-1, version=0), b)
    assert_same(saved_reference(b), full_b)

    # a sparse message to a: exactly those entries change in its model and its reference
    entry = {"params/Dense_1/bias": RefLayer(np.array([-7.0], np.float32), np.array([1]), (2,))}
    app(train_message(entry, base=0, version=1), a)
    expected_model = {name: value.copy() for name, value in seen[0]["trained"].items()}
    expected_model["params/Dense_1/bias"][1] = -7.0
    assert_same(seen[2]["received"], expected_model)
    reference = {name: value.copy() for name, value in full_a.items()}
    reference["params/Dense_1/bias"][1] = -7.0
    assert_same(saved_reference(a), reference)
    # and b's saved reference is still its own
    assert_same(saved_reference(b), full_b)


def _round_message(server_round: int, kind: str, layers: dict, base: int, version: int) -> Message:
    config = ConfigRecord({"server-round": server_round, "jaxlayerx.base-round": base, "jaxlayerx.round": version})
    return message(RecordDict({"arrays": compact_record(layers), "config": config}), kind)


@pytest.mark.parametrize("evaluate", [True, False], ids=["train-and-evaluate", "train-only"])
def test_a_round_repeated_by_a_resumed_server_is_answered_as_the_first_time(evaluate):
    """A server killed before its round-2 checkpoint resumes after round 1 and sends round 2
    again. The node goes back to the start of round 2 (its model, version and error-feedback
    state), so its replies to round 2 and 3 are those of the uninterrupted run, bit for bit;
    a node that did not would hold a newer version than the repeated message's base."""
    exchanger = jaxlayerx.SparseCooParameterExchanger(
        0.2, jaxlayerx.largest_magnitude_change_scores, error_feedback=True
    )
    deltas = {name: 0.01 * (i + 1) for i, name in enumerate(NAMES)}
    app = exchanger_client_app(
        make_model, exchanger, shifting_train(deltas, []), evaluate_fn=lambda m, c, x: (0.5, 3, {})
    )
    update = {name: value + 1 for name, value in full_layers(2).items() if "bias" in name}
    # (server round, kind, layers, base, version): with per-node evaluation the evaluate
    # message brings the round's new version; without it the next train message does
    if evaluate:
        rounds = [
            [(1, "train", full_layers(1), -1, 0), (1, "evaluate", update, 0, 1)],
            [(2, "train", {}, 1, 1), (2, "evaluate", update, 1, 2)],
            [(3, "train", {}, 2, 2)],
        ]
    else:
        rounds = [[(1, "train", full_layers(1), -1, 0)], [(2, "train", update, 0, 1)], [(3, "train", update, 1, 2)]]

    def replies(context: Context, schedule) -> list[dict]:
        answered = [app(_round_message(*step), context) for step in schedule]
        return [reply_payload(reply) for reply in answered if reply.content.array_records]

    straight, resumed = new_context(), new_context()
    expected = replies(straight, [step for steps in rounds for step in steps])
    got = replies(resumed, [step for steps in (rounds[0], rounds[1], rounds[1], rounds[2]) for step in steps])
    assert len(expected) == 3 and len(got) == 4
    # round 2 answered twice, each time as in the uninterrupted run; then round 3
    for mine, theirs in zip(got[1:], [expected[1], expected[1], expected[2]]):
        assert list(mine) == list(theirs)
        for name in theirs:
            np.testing.assert_array_equal(bits(mine[name].values), bits(theirs[name].values), err_msg=name)
    assert_same(saved_layers(resumed), saved_layers(straight))
    assert_same(saved_reference(resumed), saved_reference(straight))
    assert saved_version(resumed) == saved_version(straight) == 2
    # without going back, the repeated round-2 train message is over a version the node left
    if evaluate:
        rewound = new_context()
        replies(rewound, rounds[0] + rounds[1])
        del rewound.state["jaxlayerx.round"]
        with pytest.raises(VersionMismatchError, match="over global version 1, but the client holds version 2"):
            app(_round_message(*rounds[1][0]), rewound)


def test_a_quantized_reply_codes_the_update_over_the_pulled_model():
    seen: list = []
    deltas = {name: 0.01 * (i + 1) for i, name in enumerate(NAMES)}
    app = exchanger_client_app(
        make_model, jaxlayerx.FullParameterExchanger(quantize="int8"), shifting_train(deltas, seen)
    )
    context = new_context()
    full = full_layers(7)
    reply = app(train_message(full, base=-1, version=0), context)
    got = reply_payload(reply)
    assert list(got) == NAMES
    arrays = ref_record_arrays(reply.content.array_records["arrays"])
    assert arrays["scales"].dtype == np.float32 and arrays["scales"].shape == (len(NAMES),)
    for name in NAMES:
        layer = got[name]
        assert layer.form == 2 and layer.values.dtype == np.int8 and layer.flat is None, name
        update = seen[0]["trained"][name].astype(np.float64) - full[name].astype(np.float64)
        scale = np.abs(update).max() / 127
        np.testing.assert_allclose(layer.scale, scale, rtol=1e-3)
        # every coded value is within half a step of the update
        coded = layer.values.astype(np.float64) * layer.scale
        assert np.all(np.abs(coded - update.reshape(-1)) <= layer.scale * 0.5 + 1e-6), name
    assert reply.content.metric_records["metrics"]["jaxlayerx.bytes-sent"] == content_bytes(reply.content)


def test_evaluate_merges_and_reports():
    losses: list = []

    def evaluate_fn(model, config, context):
        losses.append(ref_flat(model))
        return np.float32(0.25), 5, {"accuracy": 0.75}

    app = exchanger_client_app(make_model, jaxlayerx.FullParameterExchanger(), lambda m, c, x: (m, 1, {}), evaluate_fn)
    context = new_context()
    app(train_message(full_layers(8), base=-1, version=0), context)
    bias = {"params/Dense_1/bias": np.array([3.0, 4.0], np.float32)}
    incoming = train_message(bias, base=0, version=1, kind="evaluate")
    reply = app(incoming, context)
    assert_same(losses[0], dict(full_layers(8), **bias))
    metrics = reply.content.metric_records["metrics"]
    assert metrics["loss"] == 0.25 and metrics["num-examples"] == 5 and metrics["accuracy"] == 0.75
    assert metrics["jaxlayerx.bytes-received"] == content_bytes(incoming.content)
    assert not reply.content.array_records
    assert saved_version(context) == 1


def test_bad_train_results_and_metrics_are_clear_errors():
    context = new_context()
    bad = exchanger_client_app(make_model, jaxlayerx.FullParameterExchanger(), lambda m, c, x: (m, 1, {"note": "text"}))
    with pytest.raises(TypeError, match="metric 'note' must be an int or a float"):
        bad(train_message(full_layers(9), base=-1, version=0), context)
    negative = exchanger_client_app(make_model, jaxlayerx.FullParameterExchanger(), lambda m, c, x: (m, -1, {}))
    with pytest.raises(TypeError, match="integer num_examples >= 0"):
        negative(train_message(full_layers(9), base=-1, version=0), new_context())
    clash = exchanger_client_app(
        make_model, jaxlayerx.FullParameterExchanger(), lambda m, c, x: (m, 1, {"jaxlayerx.bytes-sent": 1})
    )
    with pytest.raises(ValueError, match="set by the client app itself"):
        clash(train_message(full_layers(9), base=-1, version=0), new_context())


@pytest.mark.parametrize("sparse", [False, True], ids=["dynamic", "sparse"])
def test_nodes_against_the_serverapp_strategies(sparse, task_identity):
    """Three client-app nodes (one fails in round 2) and jaxlayerx's Message-API strategy, over
    a fake grid: every node ends holding the global value of every weight it did not train
    away itself, the server's global model is the numpy weighted mean of what the replies
    sent, and the bytes both sides count are those of the records that crossed."""
    from conftest import fake_grid_class

    from jaxlayerx.flower.serverapp import FedAvgLayers, FedAvgSparse

    if sparse:
        exchanger = jaxlayerx.SparseCooParameterExchanger(0.2, jaxlayerx.largest_magnitude_change_scores)
        strategy = FedAvgSparse(min_train_nodes=3, min_available_nodes=3)
    else:
        rule = jaxlayerx.LayerSelectionFunctionConstructor(1.0, exchange_percentage=0.25, normalize=False)
        exchanger = jaxlayerx.DynamicLayerExchanger(rule.select_by_percentage())
        strategy = FedAvgLayers(min_train_nodes=3, min_available_nodes=3)
    seen: dict[int, list] = {1: [], 2: [], 3: []}
    contexts = {node: new_context(node) for node in seen}
    evaluated: dict[int, dict] = {}
    replies: dict[tuple[int, int], Message] = {}  # (round, node) -> train reply

    def node_fn(node: int):
        # a layer of its own, and one every node trains (averaged over several senders)
        deltas = {NAMES[(node * 2) % 8]: 0.5 * node, "params/Dense_0/kernel": -0.25 * node}
        train = shifting_train(deltas, seen[node], examples=10 * node)

        def train_fn(model, config, context):
            if node == 2 and config["server-round"] == 2:
                raise RuntimeError("node 2 fails in round 2")
            return train(model, config, context)

        def evaluate_fn(model, config, context):
            evaluated[node] = ref_flat(model)
            return 0.5, 1, {}

        app = exchanger_client_app(make_model, exchanger, train_fn, evaluate_fn)

        def handle(message: Message) -> RecordDict:
            reply = app(message, contexts[node])
            if message.metadata.message_type == "train":
                replies[(int(message.content.config_records["config"]["server-round"]), node)] = reply
            return reply.content

        return handle

    grid = fake_grid_class()({node: node_fn(node) for node in seen})
    start = full_layers(10)
    globals_after: dict[int, dict[str, np.ndarray]] = {0: start}

    def server_evaluate(server_round, arrays):
        globals_after[server_round] = ref_record_arrays(arrays)

    result = strategy.start(grid, compact_named(start), num_rounds=3, timeout=10, evaluate_fn=server_evaluate)
    final = ref_record_arrays(result.arrays)
    assert list(final) == NAMES
    assert [record.failures for record in strategy.history] == [(), ((2, "node 2 fails in round 2"),), ()]
    assert all(record.missing == () for record in strategy.history)
    # each round's global model is the numpy weighted mean of the replies (per layer or per weight)
    for server_round in (1, 2, 3):
        record = strategy.history[server_round - 1]
        before, after = globals_after[server_round - 1], globals_after[server_round]
        sent = {node: reply_payload(r) for (rr, node), r in replies.items() if rr == server_round}
        assert sorted(sent) == ([1, 3] if server_round == 2 else [1, 2, 3])
        assert sorted(reply.node for reply in record.accepted) == sorted(sent)
        for name in NAMES:
            total = np.zeros(before[name].size)
            weight = np.zeros(before[name].size)
            for node, payload in sent.items():
                if name in payload:
                    layer = payload[name]
                    flat = np.arange(before[name].size) if layer.flat is None else layer.flat
                    total[flat] += 10 * node * layer.values.astype(np.float64)
                    weight[flat] += 10 * node
            moved = weight > 0
            expected = before[name].reshape(-1).astype(np.float64).copy()
            expected[moved] = total[moved] / weight[moved]
            got = after[name].reshape(-1)
            np.testing.assert_array_equal(bits(got[~moved]), bits(before[name].reshape(-1)[~moved]), err_msg=name)
            np.testing.assert_allclose(got[moved], expected[moved], rtol=1e-6, atol=1e-6, err_msg=name)
        # bytes: the server's count and each node's are those of the records that crossed
        messages = {
            m.metadata.dst_node_id: m
            for m in grid.sent
            if m.metadata.message_type == "train" and m.content.config_records["config"]["server-round"] == server_round
        }
        assert dict(record.bytes_sent) == {
            n: m.content.array_records["arrays"].count_bytes() for n, m in messages.items()
        }
        for node, reply in ((n, r) for (rr, n), r in replies.items() if rr == server_round):
            metrics = reply.content.metric_records["metrics"]
            assert metrics["jaxlayerx.bytes-received"] == messages[node].content.array_records["arrays"].count_bytes()
            assert metrics["jaxlayerx.bytes-sent"] == reply.content.array_records["arrays"].count_bytes()
            assert metrics["jaxlayerx.bytes-sent"] == {r.node: r.bytes_received for r in record.accepted}[node]
    # the model each node evaluated after round 3 (merged up to the final version) is the
    # global one except in layers it trained itself (its own unsent progress)
    for node, context in contexts.items():
        held = evaluated[node]
        assert saved_version(context) == 3
        for name in NAMES:
            differs = ~np.equal(held[name], final[name])
            if differs.any():
                assert any(
                    name in step["trained"] and not np.array_equal(step["trained"][name], step["received"][name])
                    for step in seen[node]
                ), (node, name)
    # node 2 failed in round 2: the next message it got (round 2's evaluate) held the whole model
    to_2 = [m for m in grid.sent if m.metadata.dst_node_id == 2]
    failed = next(i for i, m in enumerate(to_2) if m.content.config_records["config"]["server-round"] == 2)
    assert to_2[failed].metadata.message_type == "train"
    assert to_2[failed + 1].content.config_records["config"]["jaxlayerx.base-round"] == -1
    assert list(ref_compact_decode(ref_record_arrays(to_2[failed + 1].content.array_records["arrays"]))) == NAMES


def compact_named(layers: dict[str, np.ndarray]) -> ArrayRecord:
    """A whole model keyed by layer names (what a strategy starts from), with Flower's classes."""
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in layers.items()})


# -- the compilation cache across messages -------------------------------------------------

CACHE_SCRIPT = """
import pathlib, sys
sys.path.insert(0, sys.argv[2])
import jax, jax.numpy as jnp, numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from conftest import flower_metadata
import jaxlayerx
from jaxlayerx.flower import records
from jaxlayerx.flower.clientapp import exchanger_client_app
from jaxlayerx.payload import Entries
from jaxlayerx.tree import flatten

def make_model(context):
    return {"w": jnp.ones((4, 3), jnp.float32), "b": jnp.zeros((3,), jnp.float32)}

@jax.jit
def step(model):
    return jax.tree.map(lambda v: v * 0.5 + 1.0, model)

def train(model, config, context):
    return step(model), 4, {}

app = exchanger_client_app(make_model, jaxlayerx.FullParameterExchanger(), train)
whole = {name: Entries(np.asarray(v).reshape(-1), None, v.shape) for name, v in flatten(make_model(None)).items()}
config = ConfigRecord({"server-round": 1, "jaxlayerx.base-round": -1, "jaxlayerx.round": 0})
content = RecordDict({"arrays": records.payload_to_record(whole), "config": config})
message = Message(metadata=flower_metadata("train", src_node_id=0, dst_node_id=7), content=content)
context = Context(run_id=1, node_id=7, node_config={"jax-cache-dir": sys.argv[1]}, state=RecordDict(), run_config={})
reply = app(message, context)
assert not reply.has_error(), reply.error
print(jax.config.jax_compilation_cache_dir)
"""


@pytest.mark.parametrize("setting", [slow("folder"), slow("off")])
def test_the_client_app_keeps_compiled_steps_in_the_nodes_cache_folder(setting, tmp_path):
    """A fresh process (as Flower starts for each message) handling one train message writes
    its compiled programs into the node config's jax-cache-dir, and nothing with 'off'."""
    import subprocess
    import sys

    folder = tmp_path / "cache"
    argument = str(folder) if setting == "folder" else "off"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("JAX_COMPILATION", "JAXLAYERX"))}
    completed = subprocess.run(
        [sys.executable, "-c", CACHE_SCRIPT, argument, str(pathlib.Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "HOME": str(tmp_path / "home"), "JAX_PLATFORMS": "cpu"},
    )
    assert completed.returncode == 0, completed.stderr
    written = [path for path in folder.rglob("*") if path.is_file()] if folder.exists() else []
    if setting == "folder":
        assert completed.stdout.strip() == str(folder)
        assert written, "no compiled program was kept"
    else:
        assert completed.stdout.strip() in ("", "None") and not written
        assert not (tmp_path / "home" / ".cache" / "jaxlayerx").exists()


def test_the_nodes_cache_folder_comes_from_its_config_then_the_environment(monkeypatch, tmp_path):
    from jaxlayerx.flower.clientapp import node_cache_dir

    monkeypatch.setenv("JAXLAYERX_CACHE", str(tmp_path / "from-env"))
    assert node_cache_dir({"jax-cache-dir": str(tmp_path / "node")}) == tmp_path / "node"
    assert node_cache_dir({"jax-cache-dir": "off"}) is None
    assert node_cache_dir({"jax-cache-dir": ""}) is None
    assert node_cache_dir({}) == tmp_path / "from-env"
    monkeypatch.setenv("JAXLAYERX_CACHE", "off")
    assert node_cache_dir({}) is None
