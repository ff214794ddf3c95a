"""Unit tests of the legacy sparse Flower strategy (jaxlayerx/flower/sparse_strategy.py).

Payloads are built by hand in fl4health's ``FedAvgSparseCooTensor`` layout (``values +
indices + shapes + [names]``: 1-D values, ``(n, ndim)`` int64 coordinates, int64 shapes, a
Unicode names array) with plain numpy, and carried through Flower's serialization
(``ndarrays_to_parameters``). Every average is checked against ``ref_sparse_mean``, a
per-weight loop in float64 over the clients that sent the weight, written here.
"""

from __future__ import annotations

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


def ref_sparse_mean(model, clients, weighted: bool) -> dict[str, np.ndarray]:
    """The global model after one round: each sent weight's mean over its senders."""
    out = {name: value.astype(np.float64) for name, value in model.items()}
    for name in model:
        for index in np.ndindex(model[name].shape):
            total = weight_sum = 0.0
            for _, layers, n in clients:
                if name in layers and index in [tuple(c) for c in layers[name][0]]:
                    w = n if weighted else 1
                    total += w * layers[name][1][[tuple(c) for c in layers[name][0]].index(index)]
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
    # what goes back to Flower: the averaged entries as a COO payload, sorted by name
    returned = parameters_to_ndarrays(parameters)
    assert list(returned[-1]) == ["a/bias", "a/kernel", "b/kernel"]
    assert returned[4].tolist() == [[0, 0], [1, 2], [2, 3]]  # a/kernel: values, then indices


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
        proxy.cid: (parameters_to_ndarrays(ins.parameters), ins.config)
        for proxy, ins in strategy.configure_fit(server_round, strategy.initial_parameters, cm)
    }


def apply_coo(model: dict, payload: list) -> dict:
    """A client's numpy pull: write each sent entry, keep the others (independent of jaxlayerx)."""
    k = (len(payload) - 1) // 3
    out = {name: value.copy() for name, value in model.items()}
    for values, indices, shape, name in zip(payload[:k], payload[k : 2 * k], payload[2 * k : 3 * k], payload[-1]):
        assert tuple(shape) == out[str(name)].shape
        for value, index in zip(values, indices):
            out[str(name)][tuple(index)] = value
    return out


def test_first_message_is_the_whole_model_then_changes_since_what_each_client_holds():
    model = make_model()
    strategy = FedAvgSparseCooTensorStrategy(model, fraction_fit=1.0, min_fit_clients=2, min_available_clients=2)
    cm = manager("a", "b")
    first = served(strategy, 1, cm)
    for cid in "ab":
        payload, config = first[cid]
        assert len(payload) == len(model)  # dense and unnamed, in the model's order (fl4health's initial parameters)
        for got, want in zip(payload, model.values()):
            assert np.array_equal(got, want)
        assert config["current_server_round"] == 1
    held = {cid: dict(model) for cid in "ab"}
    round1 = three_clients()[:2]
    run_round(strategy, [("a", round1[0][1], 10), ("b", round1[1][1], 30)], 1)

    second = served(strategy, 2, cm)
    for cid in "ab":
        payload = second[cid][0]
        # exactly the entries round 1 changed
        assert list(payload[-1]) == ["a/kernel", "b/kernel"]
        assert payload[2].tolist() == [[0, 0], [1, 2], [2, 3]] and payload[3].tolist() == [[1, 0, 1]]
        held[cid] = apply_coo(held[cid], payload)
        for name in model:
            assert np.array_equal(held[cid][name], strategy.global_layers[name]), name
    # only a answers round 2: b is known to hold only the model it was sent in round 1 (the
    # initial one), so in round 3 it gets every entry rounds 1 and 2 changed
    run_round(strategy, [("a", {"a/bias": ([(0,)], [9.0])}, 5)], 2)
    third = served(strategy, 3, cm)
    assert list(third["a"][0][-1]) == ["a/bias"]
    assert third["a"][0][1].tolist() == [[0]]
    assert list(third["b"][0][-1]) == ["a/kernel", "a/bias", "b/kernel"]  # the global order
    caught_up = {"a": apply_coo(held["a"], third["a"][0]), "b": apply_coo(model, third["b"][0])}
    for cid in "ab":
        for name in model:
            assert np.array_equal(caught_up[cid][name], strategy.global_layers[name]), (cid, name)
    assert strategy.global_layers["a/bias"][0] == np.float32(9.0)


def test_new_client_late_gets_the_whole_current_model():
    model = make_model()
    strategy = FedAvgSparseCooTensorStrategy(model, min_fit_clients=1, min_available_clients=1)
    run_round(strategy, three_clients(), 1)
    payload = served(strategy, 2, manager("late"))["late"][0]
    assert len(payload) == len(model)
    for got, name in zip(payload, model):
        assert np.array_equal(got, strategy.global_layers[name])


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
        "not-3k+1": (good[:-2] + good[-1:], "3k \\+ 1"),
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
    strategy = FedAvgSparseCooTensorStrategy(model, accept_failures=False)
    results = [
        (fake_proxy("good"), fit_res(coo(three_clients()[0][1], model), 3)),
        (fake_proxy("bad"), fit_res(payload, 1)),
    ]
    parameters, metrics = strategy.aggregate_fit(1, results, [])
    assert parameters is None and metrics["clients_rejected"] == 1
    for name in model:
        assert np.array_equal(bits(strategy.global_layers[name]), bits(model[name])), name
    assert not strategy.history[-1].applied


def test_negative_example_count_is_rejected():
    model = make_model()
    strategy = FedAvgSparseCooTensorStrategy(model)
    results = [(fake_proxy("neg"), fit_res(coo(three_clients()[0][1], model), 0))]
    results[0][1].num_examples = -2
    _, metrics = strategy.aggregate_fit(1, results, [])
    assert metrics["clients_rejected"] == 1
    assert "num_examples must be an integer >= 0" in strategy.history[-1].rejected[0][1]


def test_payload_bytes_are_the_sent_arrays():
    model = make_model()
    strategy = FedAvgSparseCooTensorStrategy(model)
    payloads = [coo(layers, model) for _, layers, _ in three_clients()]
    _, metrics = run_round(strategy, three_clients())
    assert metrics["payload_bytes_received"] == sum(a.nbytes for payload in payloads for a in payload)
    assert [record.layers for record in strategy.history[-1].accepted] == [
        ("a/kernel", "b/kernel"),
        ("a/kernel",),
        ("a/bias", "b/kernel"),
    ]
