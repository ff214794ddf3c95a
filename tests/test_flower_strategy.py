"""Unit tests of the legacy Flower layer strategy (jaxlayerx/flower/legacy/strategy.py,
``FedAvgDynamicLayerStrategy``), driven directly.

No networking: the strategy is built from a small model, instructions come from
``configure_fit``/``configure_evaluate`` with a ``SimpleClientManager`` of fake client
proxies, and ``aggregate_fit`` gets ``FitRes`` objects built from
``ndarrays_to_parameters(jaxlayerx.pack_layers(arrays, names))``.

Every average is checked against ``ref_mean``, a per-layer weighted mean written as a
plain loop in float64 over the values cast to the global layer's dtype (the strategy casts
each reply to the global dtype, then averages); bytes against the serialized ``Parameters``
tensors and ``numpy.save`` sizes.
"""

from __future__ import annotations

import io
import itertools
import logging
import re

import pytest

pytest.importorskip("flwr")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
from conftest import LinenNet, fake_proxy  # noqa: E402
from flax import nnx  # noqa: E402
from flwr.common import (  # noqa: E402
    Code,
    EvaluateRes,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import SimpleClientManager  # noqa: E402
from flwr.server.client_proxy import ClientProxy  # noqa: E402

import jaxlayerx  # noqa: E402
from jaxlayerx.flower import (  # noqa: E402
    ExchangerClient,
    FedAvgDynamicLayerStrategy,
    weighted_metrics_average,
)
from jaxlayerx.wire.fl4health import decode_named  # noqa: E402

BF16 = ml_dtypes.bfloat16
LOGGER = "jaxlayerx.flower"
BASE_ROUND = "jaxlayerx.base-round"
VERSION = "jaxlayerx.round"


# ---------------------------------------------------------------------------------------
# Fakes and helpers
# ---------------------------------------------------------------------------------------


def manager(*cids: str) -> SimpleClientManager:
    cm = SimpleClientManager()
    for cid in cids:
        assert cm.register(fake_proxy(cid))
    return cm


def fit_res(layers: dict, num_examples: int, metrics: dict | None = None) -> FitRes:
    payload = jaxlayerx.pack_layers(list(layers.values()), list(layers))
    return raw_fit_res(payload, num_examples, metrics)


def raw_fit_res(payload: list, num_examples: int, metrics: dict | None = None) -> FitRes:
    return FitRes(
        status=Status(code=Code.OK, message="ok"),
        parameters=ndarrays_to_parameters(payload),
        num_examples=num_examples,
        metrics=dict(metrics or {}),
    )


def results_of(clients: list[tuple[str, dict, int]]) -> list[tuple[ClientProxy, FitRes]]:
    return [(fake_proxy(cid), fit_res(layers, n)) for cid, layers, n in clients]


def decode(parameters: Parameters) -> dict[str, np.ndarray]:
    """A packed Flower Parameters as ``name -> array`` (names array checked to be Unicode)."""
    arrays = parameters_to_ndarrays(parameters)
    assert len(arrays) >= 1
    names = arrays[-1]
    assert names.ndim == 1 and names.dtype.kind == "U", names.dtype
    assert len(names) == len(arrays) - 1
    return dict(zip([str(n) for n in names.tolist()], arrays[:-1]))


def decode_names(parameters: Parameters) -> list[str]:
    return list(decode(parameters))


def positional(parameters: Parameters, names: list[str]) -> dict[str, np.ndarray]:
    """An unnamed Flower Parameters holding one array per layer of ``names``, in that order
    (the whole model: fl4health's initial parameters, and what aggregate_fit returns)."""
    arrays = parameters_to_ndarrays(parameters)
    assert len(arrays) == len(names)
    assert all(array.dtype.kind != "U" for array in arrays)  # no names array
    return dict(zip(names, arrays))


def npy_size(array: np.ndarray) -> int:
    """Bytes of ``numpy.save(array)``: what Flower carries for one array."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return len(buffer.getvalue())


def serialized_size(payload: list) -> int:
    return sum(npy_size(array) for array in payload)


def tensor_bytes(parameters: Parameters) -> int:
    """Bytes of a Flower ``Parameters``, measured on its serialized tensors."""
    return sum(len(tensor) for tensor in parameters.tensors)


def ref_mean(clients: list[tuple[str, dict, int]], weighted: bool, model: dict | None = None) -> dict[str, np.ndarray]:
    """Per-layer mean over the clients that sent the layer, as a float64 loop over the
    values cast to the global layer's dtype (``model[name].dtype``; their own without a model).

    Weighted: weight = num_examples, clients with 0 examples skipped; a layer whose
    senders all have 0 examples is left out. Unweighted: every sender has weight 1.
    """
    sums: dict[str, np.ndarray] = {}
    totals: dict[str, float] = {}
    for _, layers, n in clients:
        weight = float(n) if weighted else 1.0
        if weight == 0:
            continue
        for name, array in layers.items():
            array = np.asarray(array)
            if model is not None:
                array = array.astype(np.asarray(model[name]).dtype)
            value = array.astype(np.float64) * weight
            if name in sums:
                sums[name] = sums[name] + value
                totals[name] += weight
            else:
                sums[name] = value
                totals[name] = weight
    return {name: sums[name] / totals[name] for name in sums}


def snapshot(layers: dict) -> dict[str, np.ndarray]:
    return {name: np.array(array, copy=True) for name, array in layers.items()}


def assert_bit_equal(a: np.ndarray, b: np.ndarray) -> None:
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert a.tobytes() == b.tobytes()


def assert_layers_unchanged(now: dict, before: dict) -> None:
    assert list(now) == list(before)
    for name in before:
        assert np.array_equal(now[name], before[name]), name
        assert_bit_equal(now[name], before[name])


def make_model(seed: int = 0) -> dict[str, np.ndarray]:
    """A flat float32 model of five small layers, in sorted order (flatten's order too)."""
    rng = np.random.default_rng(seed)
    shapes = {"a": (2, 3), "b": (4,), "c": (3,), "d": (2, 2), "e": (5,)}
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()}


def client_layers(model: dict, names: str, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.normal(size=model[name].shape).astype(model[name].dtype) for name in names}


def strategy_for(model, **options) -> FedAvgDynamicLayerStrategy:
    options.setdefault("min_fit_clients", 1)
    options.setdefault("min_evaluate_clients", 1)
    options.setdefault("min_available_clients", 1)
    return FedAvgDynamicLayerStrategy(model, **options)


EMPTY_PARAMS = Parameters(tensors=[], tensor_type="numpy.ndarray")


class NnxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.lin = nnx.Linear(4, 3, rngs=rngs)
        self.bn = nnx.BatchNorm(3, rngs=rngs)
        self.out = nnx.Linear(3, 2, rngs=rngs)


@pytest.fixture(scope="module")
def linen_variables():
    return LinenNet().init(jax.random.key(0), jnp.ones((1, 4)))


# ---------------------------------------------------------------------------------------
# 1. Aggregation against a numpy reference
# ---------------------------------------------------------------------------------------

# Four clients, each with a different subset; nobody sends "d" or "e".
SUBSETS = [("c0", "ab", 10), ("c1", "bc", 30), ("c2", "ac", 5), ("c3", "b", 7)]


def four_clients(model: dict) -> list[tuple[str, dict, int]]:
    return [(cid, client_layers(model, names, seed=i + 1), n) for i, (cid, names, n) in enumerate(SUBSETS)]


@pytest.mark.parametrize("weighted", [True, False])
def test_aggregate_fit_matches_numpy_reference(weighted):
    model = make_model()
    strategy = strategy_for(model, weighted_aggregation=weighted)
    before = snapshot(strategy.global_layers)
    clients = four_clients(model)

    parameters, metrics = strategy.aggregate_fit(1, results_of(clients), [])

    assert parameters is not None
    # what goes back to Flower: the full global model, unnamed, in model order
    returned = positional(parameters, list(model))
    expected = ref_mean(clients, weighted, model)
    assert set(expected) == {"a", "b", "c"}
    for name in ("a", "b", "c"):
        np.testing.assert_allclose(returned[name], expected[name], rtol=1e-6)
        np.testing.assert_allclose(strategy.global_layers[name], expected[name], rtol=1e-6)
    for name in model:
        assert_bit_equal(strategy.global_layers[name], returned[name])
    # Layers nobody sent: bit-identical to before; the model keeps its order.
    assert list(strategy.global_layers) == list(before)
    for name in ("d", "e"):
        assert_bit_equal(strategy.global_layers[name], before[name])
    record = strategy.history[-1]
    assert record.server_round == 1
    assert record.aggregated_layers == ("a", "b", "c")
    assert [r.node for r in record.accepted] == ["c0", "c1", "c2", "c3"]
    assert [r.layers for r in record.accepted] == [("a", "b"), ("b", "c"), ("a", "c"), ("b",)]
    # entries: every entry of each layer sent whole (a: 6, b: 4, c: 3), counted by hand
    assert [r.entries for r in record.accepted] == [10, 7, 9, 4]
    assert record.rejected == () and record.failures == () and record.missing == ()
    assert metrics["layers_aggregated"] == 3


def test_weighted_hand_computed_value():
    # One-element layer "x": client values 1, 3, 9 with 1, 2, 1 examples.
    # weighted: (1*1 + 2*3 + 1*9) / (1+2+1) = 16/4 = 4.0; unweighted: (1+3+9)/3 = 13/3.
    model = {"x": np.zeros((1,), np.float32), "y": np.full((1,), 7.0, np.float32)}
    clients = [
        ("p", {"x": np.array([1.0], np.float32)}, 1),
        ("q", {"x": np.array([3.0], np.float32)}, 2),
        ("r", {"x": np.array([9.0], np.float32)}, 1),
    ]
    weighted = strategy_for(model)
    weighted.aggregate_fit(1, results_of(clients), [])
    np.testing.assert_allclose(weighted.global_layers["x"], [4.0], rtol=1e-6)
    unweighted = strategy_for(model, weighted_aggregation=False)
    unweighted.aggregate_fit(1, results_of(clients), [])
    np.testing.assert_allclose(unweighted.global_layers["x"], [13.0 / 3.0], rtol=1e-6)
    assert_bit_equal(weighted.global_layers["y"], np.full((1,), 7.0, np.float32))


def test_two_rounds_accumulate_into_the_global_model():
    model = make_model()
    strategy = strategy_for(model)
    round1 = [("c0", client_layers(model, "ab", 11), 4), ("c1", client_layers(model, "a", 12), 6)]
    round2 = [("c0", client_layers(model, "c", 13), 3), ("c1", client_layers(model, "cb", 14), 1)]
    strategy.aggregate_fit(1, results_of(round1), [])
    after1 = snapshot(strategy.global_layers)
    strategy.aggregate_fit(2, results_of(round2), [])
    exp1, exp2 = ref_mean(round1, True, model), ref_mean(round2, True, model)
    np.testing.assert_allclose(strategy.global_layers["a"], exp1["a"], rtol=1e-6)
    assert_bit_equal(strategy.global_layers["a"], after1["a"])  # not sent in round 2
    np.testing.assert_allclose(strategy.global_layers["b"], exp2["b"], rtol=1e-6)
    np.testing.assert_allclose(strategy.global_layers["c"], exp2["c"], rtol=1e-6)
    for name in ("d", "e"):
        assert_bit_equal(strategy.global_layers[name], model[name])
    assert [r.server_round for r in strategy.history] == [1, 2]
    assert strategy.history[-1].aggregated_layers == ("b", "c")
    assert strategy.server.version == 2


def test_replies_are_averaged_in_the_global_layers_dtype():
    """float64 replies into a float32 layer are cast to float32 first, then averaged in
    float32. Weights 2 and 2 keep every product and the division by 4 exact, so the float32
    reference is bit for bit; the promoted (float64) average differs from it in many entries."""
    rng = np.random.default_rng(5)
    x1, x2 = rng.normal(size=(40, 25)), rng.normal(size=(40, 25))
    model = {"w": np.zeros((40, 25), np.float32), "v": np.ones(3, np.float32)}
    strategy = strategy_for(model)
    _, metrics = strategy.aggregate_fit(1, results_of([("p", {"w": x1}, 2), ("q", {"w": x2}, 2)]), [])
    assert metrics["clients_rejected"] == 0
    f32 = np.float32
    cast_first = (f32(2) * x1.astype(f32) + f32(2) * x2.astype(f32)) / f32(4)
    promoted = ((2 * x1 + 2 * x2) / 4).astype(f32)
    assert np.count_nonzero(cast_first != promoted) > 100  # the premise: the two rules differ
    assert strategy.global_layers["w"].dtype == np.float32
    assert_bit_equal(strategy.global_layers["w"], cast_first)
    np.testing.assert_allclose(
        strategy.global_layers["w"], ref_mean([("p", {"w": x1}, 2), ("q", {"w": x2}, 2)], True, model)["w"], rtol=1e-6
    )


def test_average_over_participants_moves_each_layer_by_the_mean_change():
    """``average_over="participants"``: a layer moves from its global value by
    ``sum_i w_i m_i (x_i - g) / sum_i w_i`` over every accepted client, a client that did
    not send it counting as no change."""
    model = make_model()
    clients = four_clients(model)
    strategy = strategy_for(model, average_over="participants")
    strategy.aggregate_fit(1, results_of(clients), [])
    total = sum(n for _, _, n in clients)
    for name in model:
        change = sum(n * (layers[name].astype(np.float64) - model[name]) for _, layers, n in clients if name in layers)
        expected = model[name].astype(np.float64) + change / total
        np.testing.assert_allclose(strategy.global_layers[name], expected, rtol=1e-5, atol=1e-6, err_msg=name)
    for name in ("d", "e"):
        assert_bit_equal(strategy.global_layers[name], model[name])
    senders = strategy_for(model)
    senders.aggregate_fit(1, results_of(clients), [])
    assert not np.allclose(senders.global_layers["a"], strategy.global_layers["a"])  # the rules differ


def test_average_over_is_checked():
    with pytest.raises(ValueError, match="average_over must be one of senders, participants"):
        strategy_for(make_model(), average_over="everyone")


@pytest.mark.parametrize("quantize", ["bf16", "int8"])
def test_quantized_uploads_are_rebuilt_over_the_global_values(quantize):
    """A client quantizing its upload (bf16 or int8, in the compact layout) sends its update
    over the global value it pulled; the strategy rebuilds ``g + dequantized update``. One
    client with one example: the average is the rebuilt value itself."""
    model = {"w": np.random.default_rng(3).normal(size=(4, 5)).astype(np.float32)}
    trained = np.random.default_rng(4).normal(size=(4, 5)).astype(np.float32)
    f32 = np.float32
    update = trained - model["w"]
    if quantize == "bf16":
        rebuilt = model["w"] + update.astype(BF16).astype(f32)
    else:
        scale = np.max(np.abs(update)) * f32(1 / 127)
        levels = np.clip(np.rint(update * (f32(1) / scale)), -127, 127).astype(np.int8)
        rebuilt = model["w"] + levels.astype(f32) * scale
    strategy = strategy_for(model)
    ((proxy, ins),) = strategy.configure_fit(1, EMPTY_PARAMS, manager("q"))
    client = ExchangerClient(
        {"w": np.zeros((4, 5), np.float32)},
        jaxlayerx.FullParameterExchanger(quantize=quantize),
        lambda model, config: ({"w": trained}, 1, {}),
    )
    payload, n, _ = client.fit(parameters_to_ndarrays(ins.parameters), ins.config)
    assert payload[0].dtype == np.uint8  # the compact header: fl4health's layouts carry no quantized values
    _, metrics = strategy.aggregate_fit(1, [(proxy, raw_fit_res(payload, n))], [])
    assert metrics["clients_accepted"] == 1, strategy.history[-1].rejected
    np.testing.assert_allclose(strategy.global_layers["w"], rebuilt, rtol=1e-6, atol=1e-6)
    assert not np.array_equal(strategy.global_layers["w"], trained)  # the quantization error is there
    np.testing.assert_allclose(strategy.global_layers["w"], trained, atol=0.05)


# ---------------------------------------------------------------------------------------
# 2. Initial model: Linen, NNX, flat dict
# ---------------------------------------------------------------------------------------


def _check_initial(strategy, expected_flat):
    expected = {name: np.asarray(value) for name, value in expected_flat.items()}
    assert list(strategy.global_layers) == list(expected)
    for name, value in expected.items():
        assert isinstance(strategy.global_layers[name], np.ndarray)
        assert_bit_equal(strategy.global_layers[name], value)
    initial = strategy.initialize_parameters(manager("x", "y"))
    assert initial is not None
    # fl4health's initial parameters: every layer, unnamed, in model order
    arrays = parameters_to_ndarrays(initial)
    assert len(arrays) == len(expected)
    for array, value in zip(arrays, expected.values()):
        assert_bit_equal(array, value)


def test_initial_model_from_linen_variables(linen_variables):
    strategy = strategy_for(linen_variables)
    expected = jaxlayerx.flatten(linen_variables)
    assert "batch_stats/BatchNorm_0/mean" in expected and "params/Dense_0/kernel" in expected
    _check_initial(strategy, expected)


def test_initial_model_from_nnx_module():
    module = NnxNet(nnx.Rngs(0))
    strategy = strategy_for(module)
    expected = jaxlayerx.flatten(module)
    assert "bn/mean" in expected and "lin/kernel" in expected
    _check_initial(strategy, expected)


def test_initial_model_from_flat_dict(linen_variables):
    # A flat view (names with "/"), as flatten returns it, with numpy values.
    flat = {name: np.asarray(value) for name, value in jaxlayerx.flatten(linen_variables).items()}
    strategy = strategy_for(flat)
    _check_initial(strategy, jaxlayerx.flatten(linen_variables))
    # A plain dict with simple names: flatten's order is the dict's (sorted) order.
    plain = make_model()
    strategy = strategy_for(plain)
    assert list(jaxlayerx.flatten(plain)) == list(plain)
    _check_initial(strategy, jaxlayerx.flatten(plain))


def list_model():
    """A pytree whose flatten order (numeric list indices) is not the sorted order of its names."""
    return {"layers": [np.full((2,), float(i), np.float32) for i in range(11)], "head": np.zeros(3, np.float32)}


def test_order_is_flatten_order_not_sorted_order():
    model = list_model()
    flat = jaxlayerx.flatten(model)
    order = list(flat)
    assert order[:4] == ["head", "layers/0", "layers/1", "layers/2"] and order[-1] == "layers/10"
    assert order != sorted(order)  # the premise: "layers/10" sorts before "layers/2"
    calls = []
    for source in (model, flat):  # the pytree itself and its flat view
        strategy = strategy_for(source, evaluate_fn=lambda r, arrays, c: calls.append(arrays) or (0.0, {}))
        _check_initial(strategy, flat)
        assert list(strategy.global_layers) == order
        # the first message is positional: its order is the values' ("layers/i" holds i)
        ((_, ins),) = strategy.configure_fit(1, EMPTY_PARAMS, manager("A"))
        sent = parameters_to_ndarrays(ins.parameters)
        assert len(sent) == len(order)
        np.testing.assert_array_equal(sent[0], np.zeros(3, np.float32))
        for i, array in enumerate(sent[1:]):
            np.testing.assert_array_equal(array, np.full((2,), float(i), np.float32))
        strategy.evaluate(0, EMPTY_PARAMS)
        assert len(calls[-1]) == len(order)
        for i, array in enumerate(calls[-1][1:]):  # "layers/i" holds the value i
            np.testing.assert_array_equal(array, np.full((2,), float(i), np.float32))
        # a later update names its layers, in model order
        strategy.aggregate_fit(
            1, results_of([("A", {"layers/10": np.ones(2, np.float32), "layers/2": np.ones(2, np.float32)}, 1)]), []
        )
        ((_, ins),) = strategy.configure_fit(2, EMPTY_PARAMS, manager("A"))
        assert decode_names(ins.parameters) == ["layers/2", "layers/10"]


def test_nnx_model_aggregation_updates_named_layers():
    module = NnxNet(nnx.Rngs(1))
    flat = {name: np.asarray(value) for name, value in jaxlayerx.flatten(module).items()}
    strategy = strategy_for(module)
    clients = [
        ("c0", client_layers(flat, ["bn/mean", "lin/kernel"], 1), 3),
        ("c1", client_layers(flat, ["lin/kernel"], 2), 5),
    ]
    strategy.aggregate_fit(1, results_of(clients), [])
    expected = ref_mean(clients, True, flat)
    for name in flat:
        if name in expected:
            np.testing.assert_allclose(strategy.global_layers[name], expected[name], rtol=1e-6)
        else:
            assert_bit_equal(strategy.global_layers[name], flat[name])


# ---------------------------------------------------------------------------------------
# 3. Per-client payloads and config
# ---------------------------------------------------------------------------------------


def _by_cid(instructions):
    return {client.cid: ins for client, ins in instructions}


def evaluate_results(*cids: str) -> list[tuple[ClientProxy, EvaluateRes]]:
    return [
        (fake_proxy(cid), EvaluateRes(status=Status(code=Code.OK, message="ok"), loss=0.0, num_examples=1, metrics={}))
        for cid in cids
    ]


def test_per_client_payloads_track_what_each_client_has():
    # A client holds a model once it answered the message that carried it; a client asked
    # that does not answer (it failed, or never replied) is forgotten and is sent the whole
    # model next time. The version moves every round.
    model = make_model()
    strategy = strategy_for(model, on_fit_config_fn=lambda r: {"lr": 0.5, "epochs": r})
    everyone = manager("A", "B", "C")

    # Round 1: nobody seen yet -> the whole model, unnamed, in flatten order.
    ins1 = _by_cid(strategy.configure_fit(1, EMPTY_PARAMS, everyone))
    assert set(ins1) == {"A", "B", "C"}
    for ins in ins1.values():
        for name, value in positional(ins.parameters, list(model)).items():
            assert_bit_equal(value, model[name])
        assert ins.config == {"current_server_round": 1, "lr": 0.5, "epochs": 1, BASE_ROUND: -1, VERSION: 0}
    # A and B answer; C never does.
    round1 = [("A", client_layers(model, "a", 1), 2), ("B", client_layers(model, "b", 2), 3)]
    strategy.aggregate_fit(1, results_of(round1), [])
    assert strategy.history[-1].missing == ("C",)
    exp1 = ref_mean(round1, True, model)

    # Round 2: only A and B sampled; each gets exactly {a, b} with the new values, named.
    ins2 = _by_cid(strategy.configure_fit(2, EMPTY_PARAMS, manager("A", "B")))
    assert set(ins2) == {"A", "B"}
    for ins in ins2.values():
        got = decode(ins.parameters)
        assert list(got) == ["a", "b"]
        for name in ("a", "b"):
            np.testing.assert_allclose(got[name], exp1[name], rtol=1e-6)
            assert_bit_equal(got[name], strategy.global_layers[name])
        assert ins.config == {"current_server_round": 2, "lr": 0.5, "epochs": 2, BASE_ROUND: 0, VERSION: 1}
    # Only A answers round 2 (B fails: reported as a bare exception, no client id).
    round2 = [("A", client_layers(model, "c", 3), 4)]
    strategy.aggregate_fit(2, results_of(round2), [BaseException("B timed out")])
    assert strategy.history[-1].failures == (("?", "BaseException: B timed out"),)
    assert strategy.history[-1].missing == ("B",)

    # Round 3: A (holds version 1) gets only {c}; B failed, C never answered and D is new:
    # each gets the whole model.
    ins3 = _by_cid(strategy.configure_fit(3, EMPTY_PARAMS, manager("A", "B", "C", "D")))
    got = decode(ins3["A"].parameters)
    assert list(got) == ["c"]
    assert_bit_equal(got["c"], strategy.global_layers["c"])
    np.testing.assert_allclose(got["c"], round2[0][1]["c"], rtol=1e-6)
    assert ins3["A"].config[BASE_ROUND] == 1 and ins3["A"].config[VERSION] == 2
    for cid in "BCD":
        for name, value in positional(ins3[cid].parameters, list(model)).items():
            assert_bit_equal(value, strategy.global_layers[name])
        assert ins3[cid].config[BASE_ROUND] == -1 and ins3[cid].config[VERSION] == 2

    # Everyone answers round 3 with nothing: nothing changed (the version still moves, to
    # 3), so evaluation payloads are empty, over version 2 that all of them hold.
    parameters, metrics = strategy.aggregate_fit(3, results_of([(cid, {}, 1) for cid in "ABCD"]), [])
    assert parameters is None and metrics["layers_aggregated"] == 0
    assert strategy.server.version == 3
    evaluate_ins = _by_cid(strategy.configure_evaluate(3, EMPTY_PARAMS, manager("A", "B", "C", "D")))
    assert set(evaluate_ins) == {"A", "B", "C", "D"}
    for ins in evaluate_ins.values():
        arrays = parameters_to_ndarrays(ins.parameters)
        assert len(arrays) == 1
        assert arrays[0].ndim == 1 and arrays[0].size == 0 and arrays[0].dtype.kind == "U"
        assert ins.config == {"current_server_round": 3, BASE_ROUND: 2, VERSION: 3}


def test_configure_evaluate_serves_changes_and_config():
    model = make_model()
    strategy = strategy_for(model, on_evaluate_config_fn=lambda r: {"batch": 8})
    ins = _by_cid(strategy.configure_evaluate(1, EMPTY_PARAMS, manager("A", "B", "C")))
    for one in ins.values():
        for name, value in positional(one.parameters, list(model)).items():
            assert_bit_equal(value, model[name])
        assert one.config == {"current_server_round": 1, "batch": 8, BASE_ROUND: -1, VERSION: 0}
    strategy.aggregate_evaluate(1, evaluate_results("A", "B"), [])  # C does not answer: forgotten
    clients = [("A", client_layers(model, "de", 5), 1)]
    strategy.aggregate_fit(1, results_of(clients), [])
    ins = _by_cid(strategy.configure_evaluate(2, EMPTY_PARAMS, manager("A", "B", "C")))
    for cid in ("A", "B"):
        got = decode(ins[cid].parameters)
        assert list(got) == ["d", "e"]
        for name in ("d", "e"):
            np.testing.assert_allclose(got[name], clients[0][1][name], rtol=1e-6)
        assert ins[cid].config[BASE_ROUND] == 0 and ins[cid].config[VERSION] == 1
    for name, value in positional(ins["C"].parameters, list(model)).items():
        assert_bit_equal(value, strategy.global_layers[name])
    assert ins["C"].config[BASE_ROUND] == -1


def test_user_config_round_value_wins():
    strategy = strategy_for(make_model(), on_fit_config_fn=lambda r: {"current_server_round": 99, "k": "v"})
    for _, ins in strategy.configure_fit(4, EMPTY_PARAMS, manager("A", "B")):
        assert ins.config == {"current_server_round": 99, "k": "v", BASE_ROUND: -1, VERSION: 0}


def test_config_without_user_function_holds_the_round():
    strategy = strategy_for(make_model())
    for _, ins in strategy.configure_fit(7, EMPTY_PARAMS, manager("A", "B")):
        assert ins.config == {"current_server_round": 7, BASE_ROUND: -1, VERSION: 0}


# ---------------------------------------------------------------------------------------
# 4. FedAvg options
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("registered", "fraction_fit", "min_fit_clients", "expected"),
    [
        (4, 0.5, 1, 2),  # int(4 * 0.5) = 2 >= 1
        (4, 0.25, 3, 3),  # int(4 * 0.25) = 1 < 3 -> 3
        (4, 1.0, 1, 4),  # everyone
        (5, 0.5, 1, 2),  # int(2.5) = 2
    ],
)
def test_fraction_and_min_fit_clients_decide_the_sample(registered, fraction_fit, min_fit_clients, expected):
    strategy = strategy_for(
        make_model(), fraction_fit=fraction_fit, min_fit_clients=min_fit_clients, min_available_clients=1
    )
    cids = [f"c{i}" for i in range(registered)]
    instructions = strategy.configure_fit(1, EMPTY_PARAMS, manager(*cids))
    sampled = [client.cid for client, _ in instructions]
    assert len(sampled) == expected
    assert len(set(sampled)) == expected and set(sampled) <= set(cids)


def test_fraction_evaluate_zero_configures_no_evaluation():
    strategy = strategy_for(make_model(), fraction_evaluate=0.0)
    assert strategy.configure_evaluate(1, EMPTY_PARAMS, manager("A", "B")) == []


def test_initial_parameters_option_is_refused():
    with pytest.raises(TypeError, match="initial_parameters"):
        FedAvgDynamicLayerStrategy(make_model(), initial_parameters=ndarrays_to_parameters([np.ones(2)]))


def test_accept_failures_option_is_kept():
    assert strategy_for(make_model(), accept_failures=False).accept_failures is False
    assert strategy_for(make_model()).accept_failures is True


# ---------------------------------------------------------------------------------------
# 5. Rejection and failures
# ---------------------------------------------------------------------------------------

GOOD_SUBSETS = [("g0", "ab", 10), ("g1", "bc", 20)]


def good_clients(model: dict) -> list[tuple[str, dict, int]]:
    return [(cid, client_layers(model, names, seed=40 + i), n) for i, (cid, names, n) in enumerate(GOOD_SUBSETS)]


def _valid_d(model):
    # A valid layer that no good client sends: it must never be applied from a bad payload.
    return np.full(model["d"].shape, 100.0, np.float32)


BAD_CASES = {
    # name: (payload builder, num_examples, text the strategy's reason must contain,
    #        (error, text) that fl4health's named codec raises, or None when it accepts the arrays)
    "wrong_shape": (
        lambda m: jaxlayerx.pack_layers([_valid_d(m), np.zeros((3, 2), np.float32)], ["d", "a"]),
        5,
        r"'a'.*expected shape \(2, 3\), got \(3, 2\)",
        (ValueError, r"'a'.*expected shape \(2, 3\), got \(3, 2\)"),
    ),
    "unknown_name": (
        lambda m: jaxlayerx.pack_layers([_valid_d(m), np.zeros(3, np.float32)], ["d", "zzz"]),
        5,
        r"'zzz'.*not in the model",
        (KeyError, r"'zzz'"),
    ),
    "int_names_array": (
        lambda m: [_valid_d(m), np.array([0])],
        5,
        r"names array.*dtype int64",
        (ValueError, r"Unicode array of layer names.*int64"),
    ),
    "names_count_mismatch": (
        lambda m: [_valid_d(m), np.zeros((2, 3), np.float32), np.array(["d"])],
        5,
        r"2 arrays but 1 layer names",
        (ValueError, r"2 arrays but 1 layer names"),
    ),
    "lossy_dtype": (
        lambda m: jaxlayerx.pack_layers([_valid_d(m), np.zeros((2, 3), np.complex64)], ["d", "a"]),
        5,
        r"'a'.*float32.*complex64",
        (TypeError, r"'a'.*float32.*complex64"),
    ),
    "non_finite": (  # refused by the strategy (a deliberate difference from fl4health)
        lambda m: jaxlayerx.pack_layers([_valid_d(m), np.full((2, 3), np.nan, np.float32)], ["d", "a"]),
        5,
        r"'a' holds a non-finite value",
        None,  # the codec accepts it unless asked not to
    ),
    "duplicate_names": (
        lambda m: [_valid_d(m), _valid_d(m), np.array(["d", "d"])],
        5,
        r"duplicate",
        (ValueError, r"duplicate"),
    ),
    "negative_num_examples": (
        lambda m: jaxlayerx.pack_layers([_valid_d(m)], ["d"]),
        -3,
        r"num_examples.*-3",
        None,
    ),
    "count_beyond_uint64": (
        lambda m: jaxlayerx.pack_layers([_valid_d(m)], ["d"]),
        2**64,
        r"at most 2\*\*64 - 1, got a 65-bit integer",
        None,
    ),
    "garbage_bytes": (None, 5, r"deserialize", None),
    # a header declaring 10**9 float64 (8 GB) over 64 bytes: refused before numpy allocates it
    "gigabyte_header": (None, 5, r"declares shape \(1000000000,\) of float64 \(8000000000 bytes\)", None),
}


def _gigabyte_header() -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f8", "fortran_order": False, "shape": (10**9,)})
    return buffer.getvalue() + bytes(64)


RAW_TENSORS = {
    "garbage_bytes": lambda: [b"\x00garbage-not-npy", b"junk"],
    "gigabyte_header": lambda: [_gigabyte_header()],
}


def _bad_result(case: str, model: dict) -> tuple[ClientProxy, FitRes]:
    build, n, _, _ = BAD_CASES[case]
    if build is None:
        res = FitRes(
            status=Status(code=Code.OK, message="ok"),
            parameters=Parameters(tensors=RAW_TENSORS[case](), tensor_type="numpy.ndarray"),
            num_examples=n,
            metrics={},
        )
    else:
        res = raw_fit_res(build(model), n)
    return fake_proxy("bad-client"), res


def _mixed_results(case, model, goods):
    good = results_of(goods)
    return [good[0], _bad_result(case, model), good[1]]


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_payload_rejected_others_averaged(case, caplog):
    model = make_model()
    strategy = strategy_for(model, accept_failures=True)
    before = snapshot(strategy.global_layers)
    goods = good_clients(model)
    caplog.set_level(logging.WARNING, logger=LOGGER)

    parameters, metrics = strategy.aggregate_fit(1, _mixed_results(case, model, goods), [])

    assert parameters is not None
    expected = ref_mean(goods, True, model)
    returned = positional(parameters, list(model))
    assert set(expected) == {"a", "b", "c"}
    for name in expected:
        np.testing.assert_allclose(strategy.global_layers[name], expected[name], rtol=1e-6)
        assert_bit_equal(returned[name], strategy.global_layers[name])
    for name in ("d", "e"):  # "d" came only from the bad client: never partially applied
        assert_bit_equal(strategy.global_layers[name], before[name])
    record = strategy.history[-1]
    assert record.aggregated_layers == ("a", "b", "c")
    assert [cid for cid, _ in record.rejected] == ["bad-client"]
    assert [r.node for r in record.accepted] == ["g0", "g1"]
    _, _, reason_pattern, _ = BAD_CASES[case]
    assert re.search(reason_pattern, record.rejected[0][1]), record.rejected[0][1]
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert any("bad-client" in r.getMessage() for r in warnings)
    assert metrics["clients_rejected"] == 1
    assert metrics["clients_accepted"] == 2


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_payload_without_accept_failures_changes_nothing(case, caplog):
    model = make_model()
    strategy = strategy_for(model, accept_failures=False)
    served = strategy.configure_fit(1, EMPTY_PARAMS, manager("g0", "g1"))
    assert len(served) == 2
    before = snapshot(strategy.global_layers)
    caplog.set_level(logging.WARNING, logger=LOGGER)

    parameters, metrics = strategy.aggregate_fit(1, _mixed_results(case, model, good_clients(model)), [])

    assert parameters is None
    assert metrics["layers_aggregated"] == 0
    assert_layers_unchanged(strategy.global_layers, before)
    record = strategy.history[-1]
    assert record.aggregated_layers == ()
    assert [cid for cid, _ in record.rejected] == ["bad-client"]
    assert [r.node for r in record.accepted] == ["g0", "g1"]  # would have been averaged
    assert any("bad-client" in r.getMessage() for r in caplog.records if r.name == LOGGER)
    # The version moves even so; nothing changed, so the clients that answered (holding the
    # initial model, version 0) get nothing new next round.
    assert strategy.server.version == 1
    for _, ins in strategy.configure_fit(2, EMPTY_PARAMS, manager("g0", "g1")):
        assert decode(ins.parameters) == {}
        assert ins.config[BASE_ROUND] == 0 and ins.config[VERSION] == 1


@pytest.mark.parametrize("case", sorted(c for c in BAD_CASES if BAD_CASES[c][3] is not None))
def test_named_codec_raises_and_leaves_the_model_alone(case):
    # fl4health's named layout decoded against the model (what the strategy decodes a
    # packed reply with): the same reasons, and the layout is never touched.
    model = make_model()
    reference = snapshot(model)
    build, _, _, (error, pattern) = BAD_CASES[case]
    with pytest.raises(error, match=pattern):
        decode_named(build(model), model, allow_nonfinite=False)
    assert_layers_unchanged(model, reference)


def test_named_codec_keeps_the_sent_dtypes_and_reads_bfloat16_bytes():
    reference = {"w": np.zeros((2,), np.float32), "h": np.zeros((3,), BF16), "i": np.zeros((2,), np.int64)}
    half = np.array([1.5, -2.0], np.float16)  # accepted by a float32 layer; cast where it is used
    bf = np.array([1.0, 2.5, -3.0], BF16)
    small_int = np.array([3, -4], np.int32)  # accepted by an int64 layer (in range)
    packed = jaxlayerx.pack_layers([half, bf, small_int], ["w", "h", "i"])
    payload = parameters_to_ndarrays(ndarrays_to_parameters(packed))
    assert payload[1].dtype.kind == "V"
    out = decode_named(payload, reference)
    assert list(out) == ["w", "h", "i"]
    assert all(entries.dense and entries.quantized is None for entries in out.values())
    assert out["w"].values.dtype == np.float16 and out["w"].layer().tolist() == [1.5, -2.0]
    assert out["h"].values.dtype == BF16  # the raw |V2 bytes, read as the layer's bfloat16
    assert_bit_equal(out["h"].layer().view(np.uint16), bf.view(np.uint16))
    assert out["i"].values.dtype == np.int32 and out["i"].layer().tolist() == [3, -4]


def test_named_codec_refuses_non_finite_values_unless_allowed():
    reference = {"w": np.zeros((3,), np.float32)}
    payload = jaxlayerx.pack_layers([np.array([1.0, np.nan, 2.0], np.float32)], ["w"])
    with pytest.raises(ValueError, match=r"layer 'w' holds a non-finite value"):
        decode_named(payload, reference, allow_nonfinite=False)
    assert np.isnan(decode_named(payload, reference)["w"].values[1])


def test_allow_nonfinite_averages_nan_in():
    model = make_model()
    strategy = strategy_for(model, allow_nonfinite=True)
    nan_a = np.full((2, 3), np.nan, np.float32)
    _, metrics = strategy.aggregate_fit(1, results_of([("n", {"a": nan_a}, 1), ("g", {"a": model["a"]}, 1)]), [])
    assert metrics["clients_rejected"] == 0
    assert np.isnan(strategy.global_layers["a"]).all()


def failed_fit():
    """A client's failure as Flower reports it: the proxy and a FitRes whose status is not OK."""
    status = Status(code=Code.FIT_NOT_IMPLEMENTED, message="no fit")
    return fake_proxy("failed"), FitRes(status=status, parameters=EMPTY_PARAMS, num_examples=0, metrics={})


@pytest.mark.parametrize(
    "failure",
    [
        BaseException("boom"),
        "tuple",
    ],
)
def test_failures_without_accept_failures_change_nothing(failure, caplog):
    model = make_model()
    strategy = strategy_for(model, accept_failures=False)
    before = snapshot(strategy.global_layers)
    expected_failure = ("?", "BaseException: boom")
    if failure == "tuple":
        failure, expected_failure = failed_fit(), ("failed", "no fit")
    caplog.set_level(logging.WARNING, logger=LOGGER)
    parameters, _ = strategy.aggregate_fit(1, results_of(good_clients(model)), [failure])
    assert parameters is None
    assert_layers_unchanged(strategy.global_layers, before)
    assert strategy.history[-1].aggregated_layers == ()
    assert strategy.history[-1].failures == (expected_failure,)
    assert any(r.name == LOGGER and r.levelno == logging.WARNING for r in caplog.records)


@pytest.mark.parametrize("failure", [BaseException("boom"), "tuple"])
def test_failures_with_accept_failures_do_not_stop_aggregation(failure):
    model = make_model()
    strategy = strategy_for(model, accept_failures=True)
    if failure == "tuple":
        failure = failed_fit()
    goods = good_clients(model)
    parameters, metrics = strategy.aggregate_fit(1, results_of(goods), [failure])
    assert parameters is not None
    expected = ref_mean(goods, True, model)
    for name in expected:
        np.testing.assert_allclose(strategy.global_layers[name], expected[name], rtol=1e-6)
    for name in ("d", "e"):
        assert_bit_equal(strategy.global_layers[name], model[name])
    assert strategy.history[-1].aggregated_layers == ("a", "b", "c")
    assert len(strategy.history[-1].failures) == 1
    assert metrics["clients_accepted"] == 2


def test_a_failed_client_is_forgotten_and_gets_the_whole_model():
    model = make_model()
    strategy = strategy_for(model)
    strategy.configure_fit(1, EMPTY_PARAMS, manager("g0", "failed"))
    strategy.aggregate_fit(1, results_of(good_clients(model)[:1]), [failed_fit()])
    assert strategy.history[-1].failures == (("failed", "no fit"),)
    ins = _by_cid(strategy.configure_fit(2, EMPTY_PARAMS, manager("g0", "failed")))
    assert list(decode(ins["g0"].parameters)) == ["a", "b"]
    assert ins["failed"].config[BASE_ROUND] == -1
    for name, value in positional(ins["failed"].parameters, list(model)).items():
        assert_bit_equal(value, strategy.global_layers[name])


def test_fl4health_layout_payloads_are_accepted():
    # Hand-built, fl4health's ParameterPackerWithLayerNames layout: arrays then np.array(names);
    # an empty selection is np.array([]) (a float array).
    model = make_model()
    strategy = strategy_for(model)
    before = snapshot(strategy.global_layers)
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    results = [
        (fake_proxy("fl4h"), raw_fit_res([a, np.array(["a"])], 3)),
        (fake_proxy("empty"), raw_fit_res([np.array([])], 2)),
    ]
    parameters, _ = strategy.aggregate_fit(1, results, [])
    assert strategy.history[-1].rejected == ()
    assert strategy.history[-1].aggregated_layers == ("a",)
    assert [r.layers for r in strategy.history[-1].accepted] == [("a",), ()]
    np.testing.assert_allclose(strategy.global_layers["a"], a, rtol=1e-6)
    assert_bit_equal(positional(parameters, list(model))["a"], strategy.global_layers["a"])
    for name in "bcde":
        assert_bit_equal(strategy.global_layers[name], before[name])


# ---------------------------------------------------------------------------------------
# 6. Zero examples
# ---------------------------------------------------------------------------------------


def test_zero_example_client_contributes_nothing_when_weighted():
    model = make_model()
    strategy = strategy_for(model)
    clients = [
        ("c0", client_layers(model, "ab", 1), 10),
        ("c1", client_layers(model, "bc", 2), 0),  # only sender of "c"
        ("c2", client_layers(model, "a", 3), 5),
    ]
    parameters, _ = strategy.aggregate_fit(1, results_of(clients), [])
    expected = ref_mean(clients, True, model)  # excludes c1
    assert set(expected) == {"a", "b"}
    np.testing.assert_allclose(strategy.global_layers["a"], expected["a"], rtol=1e-6)
    np.testing.assert_allclose(strategy.global_layers["b"], clients[0][1]["b"], rtol=1e-6)
    for name in "cde":
        assert_bit_equal(strategy.global_layers[name], model[name])
    returned = positional(parameters, list(model))
    for name in model:
        assert_bit_equal(returned[name], strategy.global_layers[name])
    assert strategy.history[-1].aggregated_layers == ("a", "b")


def test_zero_example_client_counts_uniformly_when_unweighted():
    model = make_model()
    strategy = strategy_for(model, weighted_aggregation=False)
    clients = [("c0", client_layers(model, "ab", 1), 10), ("c1", client_layers(model, "bc", 2), 0)]
    strategy.aggregate_fit(1, results_of(clients), [])
    expected = ref_mean(clients, False, model)
    assert set(expected) == {"a", "b", "c"}
    for name, value in expected.items():
        np.testing.assert_allclose(strategy.global_layers[name], value, rtol=1e-6)


def test_all_zero_examples_weighted_keeps_the_model():
    model = make_model()
    strategy = strategy_for(model)
    before = snapshot(strategy.global_layers)
    clients = [("c0", client_layers(model, "ab", 1), 0), ("c1", client_layers(model, "c", 2), 0)]
    parameters, metrics = strategy.aggregate_fit(1, results_of(clients), [])
    assert_layers_unchanged(strategy.global_layers, before)
    assert metrics["layers_aggregated"] == 0
    assert parameters is None  # nothing changed
    assert strategy.history[-1].aggregated_layers == ()


# ---------------------------------------------------------------------------------------
# 7. bfloat16
# ---------------------------------------------------------------------------------------


def bf16_model():
    rng = np.random.default_rng(7)
    return {
        "b": rng.normal(size=(3,)).astype(np.float32),
        "w": rng.normal(size=(2, 3)).astype(BF16),
    }


def test_bfloat16_single_client_round_trip_is_bit_exact():
    model = bf16_model()
    strategy = strategy_for(model)
    # The initial payload (unnamed, model order b, w): Flower makes the bf16 layer |V2;
    # conform_layer restores it.
    initial = parameters_to_ndarrays(strategy.initialize_parameters(manager("x", "y")))
    assert len(initial) == 2
    w0 = initial[1]
    assert w0.dtype.kind == "V" and w0.dtype.itemsize == 2
    assert_bit_equal(jaxlayerx.conform_layer("w", w0, model["w"]).view(np.uint16), model["w"].view(np.uint16))

    ((_, first),) = strategy.configure_fit(1, EMPTY_PARAMS, manager("c0"))
    w_first = positional(first.parameters, ["b", "w"])["w"]
    assert_bit_equal(jaxlayerx.conform_layer("w", w_first, model["w"]).view(np.uint16), model["w"].view(np.uint16))

    sent = np.random.default_rng(8).normal(size=(2, 3)).astype(BF16)
    res = fit_res({"w": sent}, 7)
    wire = parameters_to_ndarrays(res.parameters)
    assert wire[0].dtype.kind == "V"  # the premise: Flower lost the dtype

    parameters, _ = strategy.aggregate_fit(1, [(fake_proxy("c0"), res)], [])

    assert strategy.global_layers["w"].dtype == BF16
    assert_bit_equal(strategy.global_layers["w"].view(np.uint16), sent.view(np.uint16))
    assert_bit_equal(strategy.global_layers["b"], model["b"])
    returned = positional(parameters, ["b", "w"])
    assert_bit_equal(returned["b"], model["b"])
    restored = jaxlayerx.conform_layer("w", returned["w"], model["w"])
    assert restored.dtype == BF16
    assert_bit_equal(restored.view(np.uint16), sent.view(np.uint16))
    # What the strategy sends next round to the client it served (only "w" changed) is
    # bit-identical too.
    ((_, ins),) = strategy.configure_fit(2, EMPTY_PARAMS, manager("c0"))
    got = decode(ins.parameters)
    assert list(got) == ["w"]
    assert_bit_equal(jaxlayerx.conform_layer("w", got["w"], model["w"]).view(np.uint16), sent.view(np.uint16))


def test_bfloat16_jnp_model_and_two_clients():
    model = {"w": jnp.asarray(np.arange(6).reshape(2, 3), jnp.bfloat16), "b": jnp.zeros((3,), jnp.float32)}
    strategy = strategy_for(model)
    assert strategy.global_layers["w"].dtype == BF16
    x1 = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], BF16)
    x2 = np.array([[3.0, 2.0, 1.0], [0.0, -5.0, 2.0]], BF16)
    clients = [("c0", {"w": x1}, 1), ("c1", {"w": x2}, 3)]
    strategy.aggregate_fit(1, results_of(clients), [])
    # (1*x1 + 3*x2)/4, e.g. first element (1 + 9)/4 = 2.5: all exactly representable in bf16.
    expected = ref_mean(clients, True)
    assert strategy.global_layers["w"].dtype == BF16
    np.testing.assert_array_equal(strategy.global_layers["w"].astype(np.float64), expected["w"])


# ---------------------------------------------------------------------------------------
# 8. Metrics
# ---------------------------------------------------------------------------------------


def test_default_fit_metrics_and_records():
    model = make_model()
    strategy = strategy_for(model)
    layers = [client_layers(model, "ab", 1), client_layers(model, "b", 2), client_layers(model, "cde", 3)]
    counts = [10, 30, 20]
    client_metrics = [
        {"loss": 1.0, "acc": 0.5, "name": "x", "flag": True},
        {"loss": 3.0, "acc": 0.9},
        {"loss": 2, "note": b"raw"},
    ]
    payloads = [jaxlayerx.pack_layers(list(lay.values()), list(lay)) for lay in layers]
    fit_results = [raw_fit_res(p, n, m) for p, n, m in zip(payloads, counts, client_metrics)]
    results = [(fake_proxy(f"c{i}"), r) for i, r in enumerate(fit_results)]

    _, metrics = strategy.aggregate_fit(1, results, [])

    # serialized sizes, measured two independent ways: the Parameters' tensors, numpy.save
    expected_bytes = [tensor_bytes(r.parameters) for r in fit_results]
    assert expected_bytes == [serialized_size(p) for p in payloads]
    assert expected_bytes == [jaxlayerx.payload_nbytes(p) for p in payloads]
    assert all(n > sum(a.nbytes for a in p) for n, p in zip(expected_bytes, payloads))  # headers on top
    # loss: (10*1 + 30*3 + 20*2) / 60 = 140/60; acc: (10*0.5 + 30*0.9) / 40 = 32/40 = 0.8
    assert metrics["loss"] == pytest.approx(140 / 60)
    assert metrics["acc"] == pytest.approx(0.8)
    for skipped in ("name", "flag", "note"):
        assert skipped not in metrics
    assert metrics["clients_accepted"] == 3
    assert metrics["clients_rejected"] == 0
    assert metrics["layers_aggregated"] == 5
    assert metrics["payload_bytes_received"] == sum(expected_bytes)
    assert metrics["payload_bytes_sent"] == 0  # nothing was configured this round
    record = strategy.history[-1]
    for i, accepted in enumerate(record.accepted):
        assert accepted.node == f"c{i}"
        assert accepted.num_examples == counts[i]
        assert accepted.layers == tuple(layers[i])
        assert accepted.entries == sum(array.size for array in layers[i].values())
        assert accepted.bytes_received == expected_bytes[i]
    assert record.total_bytes_received == sum(expected_bytes)


def test_payload_bytes_sent_are_the_served_parameters():
    model = make_model()
    strategy = strategy_for(model)
    ins1 = _by_cid(strategy.configure_fit(1, EMPTY_PARAMS, manager("A", "B")))
    whole = serialized_size(list(model.values()))  # one numpy.save blob per layer, no names
    assert [tensor_bytes(ins.parameters) for ins in ins1.values()] == [whole, whole]
    _, metrics = strategy.aggregate_fit(1, results_of([("A", client_layers(model, "ab", 1), 1), ("B", {}, 1)]), [])
    assert metrics["payload_bytes_sent"] == 2 * whole
    assert strategy.history[-1].bytes_sent == (("A", whole), ("B", whole))
    ins2 = _by_cid(strategy.configure_fit(2, EMPTY_PARAMS, manager("A", "B")))
    update = jaxlayerx.pack_layers([strategy.global_layers["a"], strategy.global_layers["b"]], ["a", "b"])
    for ins in ins2.values():
        assert tensor_bytes(ins.parameters) == serialized_size(update)
    _, metrics = strategy.aggregate_fit(2, results_of([("A", {}, 1), ("B", {}, 1)]), [])
    assert metrics["payload_bytes_sent"] == 2 * serialized_size(update)


def test_fit_metrics_exclude_rejected_payload_bytes():
    model = make_model()
    strategy = strategy_for(model)
    goods = good_clients(model)
    good_payloads = [jaxlayerx.pack_layers(list(lay.values()), list(lay)) for _, lay, _ in goods]
    _, metrics = strategy.aggregate_fit(1, _mixed_results("wrong_shape", model, goods), [])
    assert metrics["clients_rejected"] == 1
    assert metrics["payload_bytes_received"] == sum(serialized_size(p) for p in good_payloads)


def test_weighted_metrics_average_directly():
    # a: (10*1 + 30*2) / 40 = 70/40 = 1.75; strings, bytes and bools skipped.
    out = weighted_metrics_average([(10, {"a": 1.0, "s": "x", "b": True}), (30, {"a": 2, "s2": b"y"})])
    assert out == {"a": pytest.approx(1.75)}
    # All weights 0: plain mean (1 + 4) / 2 = 2.5.
    assert weighted_metrics_average([(0, {"a": 1.0}), (0, {"a": 4.0})]) == {"a": pytest.approx(2.5)}
    # Per metric: "a" weighted over its reporters (0*1 + 10*3)/10 = 3; "z" reported only by a
    # zero-example client: plain mean 5.
    out = weighted_metrics_average([(0, {"a": 1.0, "z": 5.0}), (10, {"a": 3.0})])
    assert out == {"a": pytest.approx(3.0), "z": pytest.approx(5.0)}
    # Each metric over the clients that report it: m = (2*4 + 6*8)/8 = 56/8 = 7, k = 1.
    out = weighted_metrics_average([(2, {"m": 4, "k": 1}), (6, {"m": 8})])
    assert out == {"m": pytest.approx(7.0), "k": pytest.approx(1.0)}
    assert weighted_metrics_average([]) == {}
    assert weighted_metrics_average([(5, {"only_text": "x", "flag": False})]) == {}


def test_user_fit_metrics_aggregation_fn_is_used():
    seen = []

    def aggregate(results):
        seen.append([(n, dict(m)) for n, m in results])
        return {"custom": sum(n for n, _ in results)}

    model = make_model()
    strategy = strategy_for(model, fit_metrics_aggregation_fn=aggregate)
    results = [
        (fake_proxy("c0"), fit_res(client_layers(model, "a", 1), 4, {"loss": 1.0})),
        (fake_proxy("c1"), fit_res(client_layers(model, "b", 2), 6, {"loss": 3.0})),
    ]
    _, metrics = strategy.aggregate_fit(1, results, [])
    assert seen == [[(4, {"loss": 1.0}), (6, {"loss": 3.0})]]
    assert metrics["custom"] == 10  # 4 + 6
    assert "loss" not in metrics
    assert metrics["clients_accepted"] == 2
    assert metrics["clients_rejected"] == 0
    assert metrics["layers_aggregated"] == 2
    assert metrics["payload_bytes_received"] == sum(tensor_bytes(res.parameters) for _, res in results)


# ---------------------------------------------------------------------------------------
# 9. Server-side evaluate
# ---------------------------------------------------------------------------------------


def test_evaluate_gets_full_global_model_in_flatten_order(linen_variables):
    calls = []

    def evaluate_fn(server_round, arrays, config):
        calls.append((server_round, [np.array(a, copy=True) for a in arrays], config))
        return 0.25, {"accuracy": 0.75}

    flat = {name: np.asarray(v) for name, v in jaxlayerx.flatten(linen_variables).items()}
    strategy = strategy_for(linen_variables, evaluate_fn=evaluate_fn)
    clients = [
        ("c0", client_layers(flat, ["params/Dense_0/kernel", "batch_stats/BatchNorm_0/var"], 1), 2),
        ("c1", client_layers(flat, ["params/Dense_0/kernel"], 2), 6),
    ]
    strategy.aggregate_fit(1, results_of(clients), [])
    expected = ref_mean(clients, True, flat)

    assert strategy.evaluate(1, EMPTY_PARAMS) == (0.25, {"accuracy": 0.75})
    assert len(calls) == 1
    server_round, arrays, config = calls[0]
    assert server_round == 1
    assert config == {}
    names = list(jaxlayerx.flatten(linen_variables))
    assert len(arrays) == len(names)
    for name, array in zip(names, arrays):
        assert_bit_equal(array, strategy.global_layers[name])
        if name in expected:
            np.testing.assert_allclose(array, expected[name], rtol=1e-6)
        else:
            assert_bit_equal(array, flat[name])


def test_evaluate_without_evaluate_fn_returns_none():
    assert strategy_for(make_model()).evaluate(0, EMPTY_PARAMS) is None


# ---------------------------------------------------------------------------------------
# 10. Permutation invariance
# ---------------------------------------------------------------------------------------


def test_results_order_does_not_change_the_global_model():
    model = make_model()
    rng = np.random.default_rng(99)
    # Same weights for two clients so that ties are broken by content, not by weight.
    clients = [
        ("c0", client_layers(model, "abc", 1), 7),
        ("c1", client_layers(model, "abd", 2), 7),
        ("c2", {"a": rng.normal(size=(2, 3)).astype(np.float32) * 1e3}, 13),
        ("c3", client_layers(model, "ab", 4), 3),
    ]
    reference = None
    for order in itertools.permutations(range(len(clients))):
        strategy = strategy_for(model)
        parameters, _ = strategy.aggregate_fit(1, results_of([clients[i] for i in order]), [])
        layers = {name: value.tobytes() for name, value in strategy.global_layers.items()}
        returned = [t for t in parameters.tensors]
        if reference is None:
            reference = (layers, returned)
            expected = ref_mean(clients, True, model)
            for name, value in expected.items():
                np.testing.assert_allclose(strategy.global_layers[name], value, rtol=1e-6)
        else:
            assert layers == reference[0], order
            assert returned == reference[1], order
