"""Unit tests of the legacy sparse Flower strategy (jaxlayerx/flower/legacy/strategy.py,
``FedAvgSparseCooTensorStrategy``).

Payloads are built by hand in fl4health's ``FedAvgSparseCooTensor`` layout (``values +
indices + shapes + [names]``: 1-D values, ``(n, ndim)`` int64 coordinates, int64 shapes, a
Unicode names array) with plain numpy, and carried through Flower's serialization
(``ndarrays_to_parameters``). Every average is checked against ``ref_sparse_mean``, a
per-weight loop over the clients that sent the weight, written here (values cast to the
global layer's dtype first, as the strategy averages them); bytes against the serialized
``Parameters`` tensors and ``numpy.save`` sizes.
"""

from __future__ import annotations

import io
import itertools
import logging
import re

import pytest

pytest.importorskip("flwr")

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
from conftest import bits, fake_proxy  # noqa: E402
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays  # noqa: E402
from flwr.server.client_manager import SimpleClientManager  # noqa: E402

from jaxlayerx.flower import FedAvgSparseCooTensorStrategy  # noqa: E402

BF16 = ml_dtypes.bfloat16
LOGGER = "jaxlayerx.flower"
BASE_ROUND = "jaxlayerx.base-round"
VERSION = "jaxlayerx.round"
#: make_model's layers in the strategy's order: a plain dict is taken in sorted key order
#: (the order JAX traverses a dict in), written by hand.
ORDER = ["a/bias", "a/kernel", "b/kernel"]


def make_model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "a/kernel": rng.normal(size=(3, 4)).astype(np.float32),
        "a/bias": rng.normal(size=(4,)).astype(np.float32),
        "b/kernel": rng.normal(size=(2, 2, 2)).astype(np.float32),
    }


def coo(layers: dict[str, tuple[list[tuple[int, ...]], list[float]]], model: dict, dtype=np.float32) -> list:
    """fl4health's layout from ``name -> (coordinates, values)``, in numpy only."""
    names = list(layers)
    values = [np.array(layers[n][1], dtype) for n in names]
    indices = [np.array(layers[n][0], np.int64).reshape(len(layers[n][0]), model[n].ndim) for n in names]
    shapes = [np.array(model[n].shape, np.int64) for n in names]
    return values + indices + shapes + [np.array(names)]


def fit_res(payload: list, num_examples: int, metrics: dict | None = None) -> FitRes:
    return FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(payload), num_examples, dict(metrics or {}))


def npy_size(array: np.ndarray) -> int:
    """Bytes of ``numpy.save(array)``: what Flower carries for one array."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return len(buffer.getvalue())


def tensor_bytes(parameters) -> int:
    """Bytes of a Flower ``Parameters``, measured on its serialized tensors."""
    return sum(len(tensor) for tensor in parameters.tensors)


def ref_sparse_mean(model, clients, weighted: bool) -> dict[str, np.ndarray]:
    """The global model after one round: each sent weight's mean over its senders, their
    values cast to the layer's dtype first; the weights nobody sent keep their value."""
    out = {name: value.astype(np.float64) for name, value in model.items()}
    for name in model:
        dtype = model[name].dtype
        for index in np.ndindex(model[name].shape):
            total = weight_sum = 0.0
            for _, layers, n in clients:
                coordinates = [tuple(c) for c in layers.get(name, ([], []))[0]]
                if index in coordinates:
                    w = n if weighted else 1
                    value = np.asarray(layers[name][1][coordinates.index(index)]).astype(dtype)
                    total += w * float(value)
                    weight_sum += w
            if weight_sum:
                out[name][index] = total / weight_sum
    return {name: value.astype(model[name].dtype) for name, value in out.items()}


def three_clients():
    return [
        ("c0", {"a/kernel": ([(0, 0), (1, 2), (2, 3)], [1.0, 2.0, 3.0]), "b/kernel": ([(1, 0, 1)], [5.0])}, 10),
        ("c1", {"a/kernel": ([(0, 0), (2, 3)], [4.0, -1.0])}, 30),
        ("c2", {"a/bias": ([(3,)], [8.0]), "b/kernel": ([(1, 0, 1), (0, 0, 0)], [-3.0, 0.5])}, 20),
    ]


def run_round(strategy, clients, server_round=1, failures=()):
    results = [(fake_proxy(cid), fit_res(coo(layers, strategy.global_layers), n)) for cid, layers, n in clients]
    return strategy.aggregate_fit(server_round, results, list(failures))


def test_the_global_order_is_sorted_key_order_for_a_plain_dict():
    assert list(FedAvgSparseCooTensorStrategy(make_model()).global_layers) == ORDER


@pytest.mark.parametrize("weighted", [True, False])
def test_per_weight_mean_over_senders_keeps_the_rest(weighted):
    model = make_model()
    strategy = FedAvgSparseCooTensorStrategy(model, weighted_aggregation=weighted)
    parameters, metrics = run_round(strategy, three_clients())
    expected = ref_sparse_mean(model, three_clients(), weighted)
    for name in model:
        np.testing.assert_allclose(strategy.global_layers[name], expected[name], rtol=1e-6, err_msg=name)
        untouched = np.ones(model[name].shape, bool)
        for _, layers, _ in three_clients():
            for c in layers.get(name, ([], []))[0]:
                untouched[c] = False
        assert np.array_equal(strategy.global_layers[name][untouched], model[name][untouched]), name
    # hand-computed: a/kernel[0, 0] = (10 * 1 + 30 * 4) / 40 weighted, (1 + 4) / 2 uniform
    assert strategy.global_layers["a/kernel"][0, 0] == pytest.approx(3.25 if weighted else 2.5)
    assert metrics["clients_accepted"] == 3 and metrics["clients_rejected"] == 0
    assert metrics["layers_aggregated"] == 3
    # what goes back to Flower: the full global model, unnamed, in the global order
    returned = parameters_to_ndarrays(parameters)
    assert len(returned) == len(ORDER)
    for array, name in zip(returned, ORDER):
        assert array.dtype == model[name].dtype and np.array_equal(bits(array), bits(strategy.global_layers[name]))
        np.testing.assert_allclose(array, expected[name], rtol=1e-6, err_msg=name)
    record = strategy.history[-1]
    assert record.aggregated_layers == tuple(ORDER)
    assert [reply.node for reply in record.accepted] == ["c0", "c1", "c2"]
    assert [reply.entries for reply in record.accepted] == [4, 2, 3]  # entries sent, counted by hand


def test_each_weight_is_averaged_in_the_global_layers_dtype():
    """float64 values into a float32 layer: cast to float32 first, then averaged in float32.
    Weights 2 and 2 keep every product and the division by 4 exact, so the float32 reference
    is bit for bit; the promoted (float64) average differs from it in many entries."""
    rng = np.random.default_rng(5)
    size = 1000
    x1, x2 = rng.normal(size=size), rng.normal(size=size)
    model = {"w": np.zeros(size, np.float32)}
    strategy = FedAvgSparseCooTensorStrategy(model)
    everywhere = [(i,) for i in range(size)]
    results = [
        (fake_proxy("p"), fit_res(coo({"w": (everywhere, x1)}, model, np.float64), 2)),
        (fake_proxy("q"), fit_res(coo({"w": (everywhere, x2)}, model, np.float64), 2)),
    ]
    _, metrics = strategy.aggregate_fit(1, results, [])
    assert metrics["clients_rejected"] == 0
    f32 = np.float32
    cast_first = (f32(2) * x1.astype(f32) + f32(2) * x2.astype(f32)) / f32(4)
    promoted = ((2 * x1 + 2 * x2) / 4).astype(f32)
    assert np.count_nonzero(cast_first != promoted) > 100  # the premise: the two rules differ
    got = strategy.global_layers["w"]
    assert got.dtype == np.float32
    assert np.array_equal(bits(got), bits(cast_first))


def test_average_over_participants_moves_each_weight_by_the_mean_change():
    """``average_over="participants"``: each weight moves from the global value by
    ``sum_i w_i m_i (x_i - g) / sum_i w_i`` over every accepted client (a client that did not
    send the weight counts as no change)."""
    model = make_model()
    strategy = FedAvgSparseCooTensorStrategy(model, average_over="participants")
    clients = three_clients()
    run_round(strategy, clients)
    total = sum(n for _, _, n in clients)  # 60
    for name in model:
        expected = model[name].astype(np.float64)
        for index in np.ndindex(model[name].shape):
            change = 0.0
            for _, layers, n in clients:
                coordinates = [tuple(c) for c in layers.get(name, ([], []))[0]]
                if index in coordinates:
                    value = float(np.float32(layers[name][1][coordinates.index(index)]))
                    change += n * (value - float(model[name][index]))
            expected[index] += change / total
        np.testing.assert_allclose(strategy.global_layers[name], expected, rtol=1e-6, atol=1e-6, err_msg=name)
    # hand-computed: a/kernel[0, 0] moves by (10 * (1 - g) + 30 * (4 - g)) / 60
    g = float(model["a/kernel"][0, 0])
    assert strategy.global_layers["a/kernel"][0, 0] == pytest.approx(g + (10 * (1 - g) + 30 * (4 - g)) / 60, rel=1e-6)


def test_results_in_any_order_give_the_same_bits():
    model = make_model()
    outcomes = []
    for order in itertools.permutations(three_clients()):
        strategy = FedAvgSparseCooTensorStrategy(model)
        run_round(strategy, list(order))
        outcomes.append({name: bits(value) for name, value in strategy.global_layers.items()})
    for other in outcomes[1:]:
        for name in model:
            assert np.array_equal(outcomes[0][name], other[name]), name


def manager(*cids):
    cm = SimpleClientManager()
    for cid in cids:
        assert cm.register(fake_proxy(cid))
    return cm


def served(strategy, server_round, cm):
    return {
        proxy.cid: (parameters_to_ndarrays(ins.parameters), ins.config, tensor_bytes(ins.parameters))
        for proxy, ins in strategy.configure_fit(server_round, strategy.initial_parameters, cm)
    }


def apply_coo(model: dict, payload: list) -> dict:
    """A client's numpy pull: write each sent entry, keep the others (independent of jaxlayerx)."""
    k = (len(payload) - 1) // 3
    assert len(payload) == 3 * k + 1 and payload[-1].dtype.kind == "U"
    out = {name: value.copy() for name, value in model.items()}
    for values, indices, shape, name in zip(payload[:k], payload[k : 2 * k], payload[2 * k : 3 * k], payload[-1]):
        assert tuple(shape) == out[str(name)].shape
        for value, index in zip(values, indices):
            out[str(name)][tuple(index)] = value
    return out


def assert_whole_model(payload: list, layers) -> None:
    """``payload`` is the whole model, unnamed, in the global order, bit for bit."""
    assert len(payload) == len(ORDER)
    for got, name in zip(payload, ORDER):
        assert got.dtype == layers[name].dtype and np.array_equal(bits(got), bits(layers[name])), name


def test_first_message_is_the_whole_model_then_changes_since_what_each_client_holds():
    model = make_model()
    strategy = FedAvgSparseCooTensorStrategy(model, fraction_fit=1.0, min_fit_clients=2, min_available_clients=2)
    cm = manager("a", "b")
    first = served(strategy, 1, cm)
    for cid in "ab":
        payload, config, _ = first[cid]
        assert_whole_model(payload, model)  # fl4health's initial parameters
        assert config == {"current_server_round": 1, BASE_ROUND: -1, VERSION: 0}
    held = {cid: {name: model[name].copy() for name in ORDER} for cid in "ab"}
    round1 = three_clients()[:2]
    run_round(strategy, [("a", round1[0][1], 10), ("b", round1[1][1], 30)], 1)
    assert strategy.history[-1].bytes_sent == tuple((cid, first[cid][2]) for cid in "ab")

    second = served(strategy, 2, cm)
    for cid in "ab":
        payload, config, _ = second[cid]
        assert config == {"current_server_round": 2, BASE_ROUND: 0, VERSION: 1}
        # exactly the entries round 1 changed
        assert list(payload[-1]) == ["a/kernel", "b/kernel"]
        assert payload[2].tolist() == [[0, 0], [1, 2], [2, 3]] and payload[3].tolist() == [[1, 0, 1]]
        held[cid] = apply_coo(held[cid], payload)
        for name in model:
            assert np.array_equal(held[cid][name], strategy.global_layers[name]), name
    # only a answers round 2: b was asked and never answered, so it is forgotten and gets the
    # whole model in round 3; a holds version 1 and gets the entry round 2 changed
    _, metrics = run_round(strategy, [("a", {"a/bias": ([(0,)], [9.0])}, 5)], 2)
    assert strategy.history[-1].missing == ("b",)
    assert metrics["payload_bytes_sent"] == second["a"][2] + second["b"][2]
    third = served(strategy, 3, cm)
    assert third["a"][1] == {"current_server_round": 3, BASE_ROUND: 1, VERSION: 2}
    assert list(third["a"][0][-1]) == ["a/bias"]
    assert third["a"][0][1].tolist() == [[0]]
    assert third["b"][1] == {"current_server_round": 3, BASE_ROUND: -1, VERSION: 2}
    assert_whole_model(third["b"][0], strategy.global_layers)
    caught_up = apply_coo(held["a"], third["a"][0])
    for name in model:
        assert np.array_equal(caught_up[name], strategy.global_layers[name]), name
    assert strategy.global_layers["a/bias"][0] == np.float32(9.0)


def test_a_client_whose_fit_failed_is_forgotten():
    model = make_model()
    strategy = FedAvgSparseCooTensorStrategy(model, min_fit_clients=2, min_available_clients=2)
    cm = manager("a", "b")
    served(strategy, 1, cm)
    failed = FitRes(Status(Code.FIT_NOT_IMPLEMENTED, "no fit"), ndarrays_to_parameters([]), 0, {})
    results = [(fake_proxy("a"), fit_res(coo(three_clients()[0][1], model), 10))]
    strategy.aggregate_fit(1, results, [(fake_proxy("b"), failed)])
    assert strategy.history[-1].failures == (("b", "no fit"),)
    second = served(strategy, 2, cm)
    assert second["a"][1][BASE_ROUND] == 0 and list(second["a"][0][-1]) == ["a/kernel", "b/kernel"]
    assert second["b"][1][BASE_ROUND] == -1
    assert_whole_model(second["b"][0], strategy.global_layers)


def test_new_client_late_gets_the_whole_current_model():
    model = make_model()
    strategy = FedAvgSparseCooTensorStrategy(model, min_fit_clients=1, min_available_clients=1)
    run_round(strategy, three_clients(), 1)
    payload, config, _ = served(strategy, 2, manager("late"))["late"]
    assert config[BASE_ROUND] == -1 and config[VERSION] == 1
    assert_whole_model(payload, strategy.global_layers)
    assert any(not np.array_equal(strategy.global_layers[name], model[name]) for name in model)


def test_bfloat16_layers_average_bit_exactly_through_flower():
    model = {"w": np.array([1.0, 2.0, -0.5, 3.0], BF16), "v": np.zeros(2, np.float32)}
    strategy = FedAvgSparseCooTensorStrategy(model)
    clients = [
        ("x", {"w": ([(0,), (2,)], [3.0, 0.25])}, 1),
        ("y", {"w": ([(0,), (3,)], [2.0, -8.0])}, 1),
    ]
    results = [(fake_proxy(cid), fit_res(coo(layers, model, BF16), n)) for cid, layers, n in clients]
    assert parameters_to_ndarrays(results[0][1].parameters)[0].dtype.kind == "V"  # Flower's bfloat16 bytes
    _, metrics = strategy.aggregate_fit(1, results, [])
    assert metrics["clients_rejected"] == 0
    got = strategy.global_layers["w"]
    assert got.dtype == BF16
    assert np.array_equal(bits(got), bits(np.array([2.5, 2.0, 0.25, -8.0], BF16)))


def bad_payloads(model):
    good = coo({"a/kernel": ([(0, 0)], [1.0])}, model)
    return {
        "unknown-name": (coo({"a/kernel": ([(0, 0)], [1.0])}, model)[:-1] + [np.array(["a/kernal"])], "a/kernal"),
        "wrong-shape": (good[:2] + [np.array([4, 3], np.int64)] + good[3:], r"expected shape \(3, 4\)"),
        "out-of-bounds": (coo({"a/kernel": ([(0, 0), (3, 0)], [1.0, 2.0])}, model), "out of bounds"),
        "repeated-entry": (coo({"a/kernel": ([(1, 1), (1, 1)], [1.0, 2.0])}, model), "more than once"),
        "complex": (coo({"a/kernel": ([(0, 0)], [1.0])}, model, np.complex64), "does not accept complex64"),
        "nan": (coo({"a/kernel": ([(0, 0)], [float("nan")])}, model), "non-finite"),
        # values, indices and names without the shapes: not 3k + 1 arrays, and not the
        # k + 1 of a named payload either
        "not-3k+1": (good[:-2] + good[-1:], "2 arrays but 1 layer names"),
        "float-indices": (good[:1] + [good[1].astype(np.float32)] + good[2:], "indices must be integers"),
    }


CASES = list(bad_payloads(make_model()))


@pytest.mark.parametrize("case", CASES)
def test_bad_payload_rejected_whole_others_averaged(case, caplog):
    model = make_model()
    payload, match = bad_payloads(model)[case]
    # the bad client also sends a valid layer first: nothing of it may be applied
    bad = payload if case in ("not-3k+1",) else _with_valid_first(payload, model)
    strategy = FedAvgSparseCooTensorStrategy(model)
    goods = three_clients()[1:]
    results = [(fake_proxy(cid), fit_res(coo(layers, model), n)) for cid, layers, n in goods]
    results.insert(1, (fake_proxy("bad"), fit_res(bad, 100)))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _, metrics = strategy.aggregate_fit(1, results, [])
    assert metrics["clients_rejected"] == 1 and metrics["clients_accepted"] == 2
    (client, reason), *_ = strategy.history[-1].rejected
    assert client == "bad"
    assert re.search(match, reason), reason
    assert any("client bad" in record.getMessage() for record in caplog.records)
    expected = ref_sparse_mean(model, goods, True)
    for name in model:
        np.testing.assert_allclose(strategy.global_layers[name], expected[name], rtol=1e-6, err_msg=name)
    # the bad client's valid a/bias[1] = 7 was not applied
    assert strategy.global_layers["a/bias"][1] == model["a/bias"][1]


def _with_valid_first(payload: list, model: dict) -> list:
    """``payload`` with a valid ``a/bias`` layer in front (a COO payload stays a COO payload)."""
    k = (len(payload) - 1) // 3
    names = [str(n) for n in payload[-1]]
    return (
        [np.array([7.0], np.float32)]
        + payload[:k]
        + [np.array([[1]], np.int64)]
        + payload[k : 2 * k]
        + [np.array([4], np.int64)]
        + payload[2 * k : 3 * k]
        + [np.array(["a/bias", *names])]
    )


@pytest.mark.parametrize("case", CASES)
def test_bad_payload_without_accept_failures_changes_nothing(case):
    model = make_model()
    payload, _ = bad_payloads(model)[case]
    strategy = FedAvgSparseCooTensorStrategy(model, accept_failures=False, min_fit_clients=2, min_available_clients=2)
    served(strategy, 1, manager("good", "bad"))
    results = [
        (fake_proxy("good"), fit_res(coo(three_clients()[0][1], model), 3)),
        (fake_proxy("bad"), fit_res(payload, 1)),
    ]
    parameters, metrics = strategy.aggregate_fit(1, results, [])
    assert parameters is None and metrics["clients_rejected"] == 1
    for name in model:
        assert np.array_equal(bits(strategy.global_layers[name]), bits(model[name])), name
    assert strategy.history[-1].aggregated_layers == ()
    assert metrics["layers_aggregated"] == 0
    # the version moves every round, even one that changed nothing; both clients answered
    # and hold the initial model, so next round they are sent no entry at all
    assert strategy.server.version == 1
    for cid, (sent, config, _) in served(strategy, 2, manager("good", "bad")).items():
        assert config[BASE_ROUND] == 0 and config[VERSION] == 1, cid
        assert len(sent) == 1 and sent[0].size == 0 and sent[0].dtype.kind == "U", cid


def test_negative_example_count_is_rejected():
    model = make_model()
    strategy = FedAvgSparseCooTensorStrategy(model)
    results = [(fake_proxy("neg"), fit_res(coo(three_clients()[0][1], model), 0))]
    results[0][1].num_examples = -2
    _, metrics = strategy.aggregate_fit(1, results, [])
    assert metrics["clients_rejected"] == 1
    assert "num_examples must be an integer >= 0" in strategy.history[-1].rejected[0][1]


def test_payload_bytes_are_the_serialized_arrays():
    model = make_model()
    strategy = FedAvgSparseCooTensorStrategy(model)
    payloads = [coo(layers, model) for _, layers, _ in three_clients()]
    results = [(fake_proxy(cid), fit_res(p, n)) for (cid, _, n), p in zip(three_clients(), payloads)]
    _, metrics = strategy.aggregate_fit(1, results, [])
    measured = [tensor_bytes(res.parameters) for _, res in results]
    # the serialized tensors are numpy.save blobs: headers and data, not the raw data alone
    assert measured == [sum(npy_size(a) for a in payload) for payload in payloads]
    assert measured[0] > sum(a.nbytes for a in payloads[0])
    assert metrics["payload_bytes_received"] == sum(measured)
    assert [record.bytes_received for record in strategy.history[-1].accepted] == measured
    assert [record.layers for record in strategy.history[-1].accepted] == [
        ("a/kernel", "b/kernel"),
        ("a/kernel",),
        ("a/bias", "b/kernel"),
    ]


def test_bytes_sent_are_the_served_parameters():
    model = make_model()
    strategy = FedAvgSparseCooTensorStrategy(model, min_fit_clients=2, min_available_clients=2)
    first = served(strategy, 1, manager("a", "b"))
    # the whole model: one numpy.save blob per layer
    for cid in "ab":
        assert first[cid][2] == sum(npy_size(model[name]) for name in ORDER)
    _, metrics = run_round(strategy, [("a", three_clients()[0][1], 10), ("b", three_clients()[1][1], 30)], 1)
    assert metrics["payload_bytes_sent"] == first["a"][2] + first["b"][2]
    second = served(strategy, 2, manager("a", "b"))
    for cid in "ab":
        payload, _, measured = second[cid]
        assert measured == sum(npy_size(array) for array in payload)
