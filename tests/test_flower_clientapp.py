"""Tests of the Message-API client app (jaxlayerx/flower/clientapp.py).

The ``ClientApp`` is called directly with hand-built ``Message``s (``flwr.app`` records
built from numpy arrays here) and a ``Context`` whose ``state`` carries the node between
messages, as a SuperNode does. Replies are decoded with jaxlayerx.flower.records and
compared with what the exchanger itself pushes for the trained model, and with values
computed here in numpy. Flower's deprecation warnings (logged by the ``flwr`` logger as
"DEPRECATED FEATURE") are captured during every test and must not appear.
"""

from __future__ import annotations

import logging
import math

import pytest

pytest.importorskip("flwr")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from conftest import LINEN_SHAPES, LinenNet, flower_metadata, nest, ref_flat  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

import jaxlayerx  # noqa: E402
from jaxlayerx.flower import records  # noqa: E402
from jaxlayerx.flower.clientapp import VersionMismatchError, exchanger_client_app  # noqa: E402

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


def array_record(flat: dict[str, np.ndarray]) -> ArrayRecord:
    """Built with Flower's own classes only."""
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in flat.items()})


def message(content: RecordDict, kind: str = "train") -> Message:
    return Message(metadata=flower_metadata(kind, src_node_id=0, dst_node_id=7), content=content)


def train_message(flat, base: int, version: int, kind: str = "train", extra: dict | None = None) -> Message:
    config = ConfigRecord(
        {"server-round": version + 1, "jaxlayerx.base-round": base, "jaxlayerx.round": version, **(extra or {})}
    )
    return message(RecordDict({"arrays": array_record(flat), "config": config}), kind)


def new_context(node_id: int = 7) -> Context:
    return Context(run_id=1, node_id=node_id, node_config={}, state=RecordDict(), run_config={})


def shifting_train(deltas: dict[str, float], seen: list, metrics: dict | None = None):
    def train_fn(model, config, context):
        received = ref_flat(model)
        seen.append({"received": received, "config": dict(config)})
        trained = {name: value + np.float32(deltas.get(name, 0.0)) for name, value in received.items()}
        seen[-1]["trained"] = trained
        return nest(trained), 11, dict(metrics or {})

    return train_fn


def assert_same(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    for name in expected:
        assert np.asarray(actual[name]).dtype == np.asarray(expected[name]).dtype, name
        assert np.array_equal(actual[name], expected[name]), name


def content_bytes(content: RecordDict) -> int:
    """Flower's own count (what arrays_size_mod logs): serialized array bytes plus key lengths."""
    return sum(
        len(array.data) + len(name) for record in content.array_records.values() for name, array in record.items()
    )


def test_the_app_is_a_client_app():
    assert isinstance(
        exchanger_client_app(make_model, jaxlayerx.FullParameterExchanger(), lambda m, c, x: (m, 1, {})), ClientApp
    )


def test_dense_state_across_messages_delta_merge_and_reply():
    seen: list = []
    deltas = {"params/Dense_0/kernel": 1.0, "params/Dense_1/bias": -0.5}
    exchanger = jaxlayerx.DynamicLayerExchanger(
        jaxlayerx.LayerSelectionFunctionConstructor(
            norm_threshold=1.0, exchange_percentage=0.25, normalize=False
        ).select_by_percentage()
    )
    app = exchanger_client_app(make_model, exchanger, shifting_train(deltas, seen, {"train-loss": 0.5}))
    context = new_context()
    full = full_layers(1)
    incoming = train_message(full, base=-1, version=0)
    reply = app(incoming, context)
    assert_same(seen[0]["received"], full)
    assert seen[0]["config"]["jaxlayerx.round"] == 0
    # the reply: exactly the exchanger's push for the trained model, decoded with records.py
    pushed, names = jaxlayerx.unpack_layers(exchanger.push_parameters(nest(seen[0]["trained"]), nest(full)))
    sent = records.record_to_arrays(reply.content.array_records["arrays"])
    assert_same(sent, dict(zip(names, pushed)))
    assert sorted(sent) == sorted(deltas)  # ceil(8 * 0.25) = 2: the two shifted layers
    metrics = reply.content.metric_records["metrics"]
    assert metrics["num-examples"] == 11 and metrics["train-loss"] == 0.5
    assert metrics["jaxlayerx.bytes-sent"] == content_bytes(
        RecordDict({"arrays": reply.content.array_records["arrays"]})
    )
    assert metrics["jaxlayerx.bytes-received"] == content_bytes(incoming.content)
    assert list(reply.content) == ["arrays", "metrics"]

    # message 2: a delta over version 0; the node merges it into its own trained model
    delta = {"params/Dense_1/kernel": np.full((3, 2), 0.25, np.float32)}
    app(train_message(delta, base=0, version=1), context)
    assert_same(seen[1]["received"], dict(seen[0]["trained"], **delta))

    # message 3 claims a base the node does not hold: it raises and changes nothing
    state_before = records.record_to_arrays(context.state.array_records["jaxlayerx.layers"])
    with pytest.raises(VersionMismatchError, match=r"node 7: .*global version 5.* holds version 1"):
        app(train_message(delta, base=5, version=6), context)
    assert len(seen) == 2
    assert_same(records.record_to_arrays(context.state.array_records["jaxlayerx.layers"]), state_before)
    assert context.state.config_records["jaxlayerx.version"]["version"] == 1

    # after the mismatch the server sends the whole model (base -1) again: accepted
    again = full_layers(2)
    app(train_message(again, base=-1, version=6), context)
    assert_same(seen[2]["received"], again)


def test_a_fresh_node_refuses_a_delta_and_a_partial_whole_model():
    app = exchanger_client_app(make_model, jaxlayerx.FullParameterExchanger(), lambda m, c, x: (m, 1, {}))
    with pytest.raises(VersionMismatchError, match="holds no global model"):
        app(train_message({"params/Dense_0/bias": np.ones(3, np.float32)}, base=0, version=1), new_context())
    with pytest.raises(ValueError, match="whole model; 7 layer"):
        app(train_message({"params/Dense_0/bias": np.ones(3, np.float32)}, base=-1, version=1), new_context())


def test_fedbn_keeps_local_layers_after_the_first_message():
    seen: list = []
    exchanger = jaxlayerx.LayerExchangerWithExclusions(LinenNet(), {nn.BatchNorm}, X)
    app = exchanger_client_app(make_model, exchanger, shifting_train({"batch_stats/BatchNorm_0/mean": 2.0}, seen))
    context = new_context()
    reply = app(train_message(full_layers(3), base=-1, version=0), context)
    sent = records.record_to_arrays(reply.content.array_records["arrays"])
    assert sorted(sent) == sorted(name for name in NAMES if "BatchNorm" not in name)
    # the server forgot the node and sends the whole model: the node's BatchNorm layers stay local
    other = full_layers(4)
    app(train_message(other, base=-1, version=3), context)
    expected = {name: (seen[0]["trained"][name] if "BatchNorm" in name else other[name]) for name in NAMES}
    assert_same(seen[1]["received"], expected)


def sparse_server_message(layers: dict[str, tuple[list, list]], base: int, version: int) -> Message:
    """A COO payload in the records layout, built with Flower's classes and numpy."""
    values = {n: np.array(v, np.float32) for n, (_, v) in layers.items()}
    indices = {n: np.array(i, np.int64).reshape(len(i), len(LINEN_SHAPES[n])) for n, (i, _) in layers.items()}
    shapes = {n: np.array(LINEN_SHAPES[n], np.int64) for n in layers}
    config = ConfigRecord({"server-round": version + 1, "jaxlayerx.base-round": base, "jaxlayerx.round": version})
    content = RecordDict(
        {
            "arrays": array_record(values),
            "coo-indices": array_record(indices),
            "coo-shapes": array_record(shapes),
            "config": config,
        }
    )
    return message(content)


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
    assert_same(records.record_to_arrays(a.state.array_records["jaxlayerx.reference"]), full_a)
    # the sparse reply decoded with records.py equals the exchanger's push
    check = jaxlayerx.SparseCooParameterExchanger(0.1, jaxlayerx.largest_magnitude_change_scores)
    expected = jaxlayerx.read_coo(check.push_parameters(nest(seen[0]["trained"]), nest(full_a)))
    got = records.records_to_sparse(reply.content)
    assert list(got) == list(expected)
    for name in expected:
        assert np.array_equal(got[name].values, expected[name].values)
        assert np.array_equal(got[name].flat_indices, expected[name].flat_indices)
    # ceil(0.1 * 35) = 4 weights, but the 12 shifted kernel weights tie at the threshold: all sent
    assert math.ceil(0.1 * sum(math.prod(s) for s in LINEN_SHAPES.values())) == 4
    assert list(got) == ["params/Dense_0/kernel"] and got["params/Dense_0/kernel"].values.size == 12
    metrics = reply.content.metric_records["metrics"]
    assert metrics["jaxlayerx.bytes-sent"] == content_bytes(
        RecordDict({k: reply.content.array_records[k] for k in ("arrays", "coo-indices", "coo-shapes")})
    )

    # node b in the same process: its own reference, not a's
    app(train_message(full_b, base=-1, version=0), b)
    assert_same(records.record_to_arrays(b.state.array_records["jaxlayerx.reference"]), full_b)

    # a COO message to a: exactly those entries change in its model and its reference
    app(sparse_server_message({"params/Dense_1/bias": ([[1]], [-7.0])}, base=0, version=1), a)
    expected_model = {name: value.copy() for name, value in seen[0]["trained"].items()}
    expected_model["params/Dense_1/bias"][1] = -7.0
    assert_same(seen[2]["received"], expected_model)
    reference = {name: value.copy() for name, value in full_a.items()}
    reference["params/Dense_1/bias"][1] = -7.0
    assert_same(records.record_to_arrays(a.state.array_records["jaxlayerx.reference"]), reference)
    # and b's saved reference is still its own
    assert_same(records.record_to_arrays(b.state.array_records["jaxlayerx.reference"]), full_b)


def test_evaluate_merges_and_reports():
    losses: list = []

    def evaluate_fn(model, config, context):
        losses.append(ref_flat(model))
        return np.float32(0.25), 5, {"accuracy": 0.75}

    app = exchanger_client_app(make_model, jaxlayerx.FullParameterExchanger(), lambda m, c, x: (m, 1, {}), evaluate_fn)
    context = new_context()
    app(train_message(full_layers(8), base=-1, version=0), context)
    bias = {"params/Dense_1/bias": np.array([3.0, 4.0], np.float32)}
    reply = app(train_message(bias, base=0, version=1, kind="evaluate"), context)
    assert_same(losses[0], dict(full_layers(8), **bias))
    metrics = reply.content.metric_records["metrics"]
    assert metrics["loss"] == 0.25 and metrics["num-examples"] == 5 and metrics["accuracy"] == 0.75
    assert context.state.config_records["jaxlayerx.version"]["version"] == 1


def test_bad_train_results_and_metrics_are_clear_errors():
    context = new_context()
    bad = exchanger_client_app(make_model, jaxlayerx.FullParameterExchanger(), lambda m, c, x: (m, 1, {"note": "text"}))
    with pytest.raises(TypeError, match="metric 'note' must be an int or a float"):
        bad(train_message(full_layers(9), base=-1, version=0), context)
    negative = exchanger_client_app(make_model, jaxlayerx.FullParameterExchanger(), lambda m, c, x: (m, -1, {}))
    with pytest.raises(TypeError, match="num_examples >= 0"):
        negative(train_message(full_layers(9), base=-1, version=0), new_context())


@pytest.fixture
def task_identity():
    """Flower's server-side Message() needs a run id (a SuperLink sets it)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@pytest.mark.parametrize("sparse", [False, True], ids=["dynamic", "sparse"])
def test_nodes_against_the_serverapp_strategies(sparse, task_identity):
    """Three client-app nodes (one fails in round 2) and jaxlayerx's Message-API strategy, over
    a fake grid: every node ends holding the global value of every weight it did not train
    away itself, and the server's global model is what the replies average to."""
    from conftest import fake_grid_class

    serverapp = pytest.importorskip("jaxlayerx.flower.serverapp")
    if sparse:
        exchanger = jaxlayerx.SparseCooParameterExchanger(0.2, jaxlayerx.largest_magnitude_change_scores)
        strategy = serverapp.FedAvgSparseCooTensor(min_train_nodes=3, min_available_nodes=3)
    else:
        rule = jaxlayerx.LayerSelectionFunctionConstructor(1.0, exchange_percentage=0.25, normalize=False)
        exchanger = jaxlayerx.DynamicLayerExchanger(rule.select_by_percentage())
        strategy = serverapp.FedAvgDynamicLayer(min_train_nodes=3, min_available_nodes=3)
    seen: dict[int, list] = {1: [], 2: [], 3: []}
    contexts = {node: new_context(node) for node in seen}
    evaluated: dict[int, dict] = {}

    def node_fn(node: int):
        deltas = {NAMES[(node * 2) % 8]: 0.5 * node, NAMES[(node * 2 + 3) % 8]: -0.25 * node}
        train = shifting_train(deltas, seen[node])

        def train_fn(model, config, context):
            if node == 2 and config["server-round"] == 2:
                raise RuntimeError("node 2 fails in round 2")
            return train(model, config, context)

        def evaluate_fn(model, config, context):
            evaluated[node] = ref_flat(model)
            return 0.5, 1, {}

        app = exchanger_client_app(make_model, exchanger, train_fn, evaluate_fn)
        return lambda message: app(message, contexts[node]).content

    grid = fake_grid_class()({node: node_fn(node) for node in seen})
    start = full_layers(10)
    result = strategy.start(grid, records.arrays_to_record(start), num_rounds=3, timeout=10)
    final = records.record_to_arrays(result.arrays)
    assert list(final) == NAMES
    assert all(record.failures == () for record in strategy.history if record.server_round != 2)
    assert strategy.history[1].failures == (2,)
    # the model each node evaluated after round 3 (merged up to the final version) is the
    # global one except in layers it trained itself (its own unsent progress)
    for node, context in contexts.items():
        held = evaluated[node]
        assert context.state.config_records["jaxlayerx.version"]["version"] == 3
        for name in NAMES:
            differs = ~np.equal(held[name], final[name])
            if differs.any():
                # only in layers this node trains (its own unsent progress)
                assert any(
                    name in step["trained"] and not np.array_equal(step["trained"][name], step["received"][name])
                    for step in seen[node]
                ), (node, name)
    # node 2 failed in round 2: the next message it got (round 2's evaluate) held the whole model
    to_2 = [m for m in grid.sent if m.metadata.dst_node_id == 2]
    failed = next(i for i, m in enumerate(to_2) if m.content.config_records["config"]["server-round"] == 2)
    assert to_2[failed].metadata.message_type == "train"
    assert to_2[failed + 1].content.config_records["config"]["jaxlayerx.base-round"] == -1
