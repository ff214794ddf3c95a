"""Misuse and sharp edges: what a user gets wrong, and what the library says back.

1. ``initial_model`` that is the model itself (or shares its NNX variables) is refused with
   advice to snapshot; real snapshots give the real drift.
2. Unknown layer names spelled the torch way get Flax suggestions.
3. A Linen exclusions exchanger without example inputs says how to pass them.
4. ``nnx_filter`` reaches every exchanger (push and pull).
5. The Flower client with ``nnx_filter=nnx.Param``.
6. The simulation with ``nnx_filter=nnx.Param``.
7. The dtype policy on the Flower side (client and strategy).
8. Non-finite client values (strategy, ``FedAvgDynamicLayer``, ``FedAvgSparseCooTensor``).
9. Host methods (``push``, ``pull`` and fl4health's ``push_parameters``/``pull_parameters``)
   called on traced values (under ``jax.jit``, ``jax.vmap``, ``jax.grad``) name the
   jit/vmap-able forms instead of failing in JAX.
10. A glob of the simulation's fixed layers that matches no layer lists the layers.

Every expectation is written by hand (layer names, counts, byte sizes) or computed here
with plain numpy; the library's own output is never the reference.
"""

from __future__ import annotations

import collections
import logging
import math
import re

import pytest

pytest.importorskip("flwr")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from conftest import (  # noqa: E402
    LINEN_SHAPES,
    NNX_DIGITS_LAYERS,
    NNX_DIGITS_PARAMS,
    LinenNet,
    NnxDigitsNet,
    RefLayer,
    fake_proxy,
    ref_message_nbytes,
)
from flax import nnx
from flwr.common import (
    Code,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)

import jaxlayerx
from jaxlayerx import (
    DynamicLayerExchanger,
    FixedLayerExchanger,
    FullParameterExchanger,
    LayerExchangerWithExclusions,
    LayerSelectionFunctionConstructor,
    SparseCooParameterExchanger,
)
from jaxlayerx.flower import ExchangerClient, FedAvgDynamicLayerStrategy
from jaxlayerx.payload import dense_entries

LOGGER = "jaxlayerx.flower"

# ---------------------------------------------------------------------------------------
# Models, with their layer names written by hand (JAX traverses attributes sorted)
# ---------------------------------------------------------------------------------------


class Net(nnx.Module):
    """fc: Linear(8, 8) -> bn: BatchNorm(8) -> head: Linear(8, 2)."""

    def __init__(self, rngs: nnx.Rngs):
        self.fc = nnx.Linear(8, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.head = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(self.bn(self.fc(x)))


ALL_LAYERS = ["bn/bias", "bn/mean", "bn/scale", "bn/var", "fc/bias", "fc/kernel", "head/bias", "head/kernel"]
PARAM_LAYERS = ["bn/bias", "bn/scale", "fc/bias", "fc/kernel", "head/bias", "head/kernel"]
STAT_LAYERS = ["bn/mean", "bn/var"]
SHAPES = {
    "bn/bias": (8,),
    "bn/mean": (8,),
    "bn/scale": (8,),
    "bn/var": (8,),
    "fc/bias": (8,),
    "fc/kernel": (8, 8),
    "head/bias": (2,),
    "head/kernel": (8, 2),
}


X4 = jnp.ones((1, 4), jnp.float32)


def variable(model: nnx.Module, name: str) -> nnx.Variable:
    owner, leaf = name.split("/")
    return getattr(getattr(model, owner), leaf)


def read(model: nnx.Module, name: str) -> np.ndarray:
    return np.array(variable(model, name)[...], copy=True)


def read_all(model: nnx.Module, names=ALL_LAYERS) -> dict[str, np.ndarray]:
    return {name: read(model, name) for name in names}


def dyadic(shape, offset: int) -> np.ndarray:
    """Non-zero float32 values that are multiples of 1/8 (adding 1.0 to them is exact)."""
    size = math.prod(shape)
    values = ((np.arange(size) + offset) % 7 + 1) / 8.0
    return values.reshape(shape).astype(np.float32)


def make_net(seed: int = 0) -> Net:
    """A ``Net`` whose every layer holds distinct, non-zero, exactly representable values."""
    model = Net(nnx.Rngs(seed))
    for position, name in enumerate(ALL_LAYERS):
        variable(model, name)[...] = jnp.asarray(dyadic(SHAPES[name], position + seed))
    return model


def assert_bit_equal(a, b) -> None:
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert a.tobytes() == b.tobytes()


def assert_same_layers(now: dict, before: dict) -> None:
    assert list(now) == list(before)
    for name, value in before.items():
        assert_bit_equal(now[name], value)


def percentage_rule(fraction: float):
    return LayerSelectionFunctionConstructor(1e-3, fraction).select_by_percentage()


def names_of(payload) -> list[str]:
    return [str(name) for name in np.asarray(payload[-1]).tolist()]


def coo_payload(names, values_of) -> list[np.ndarray]:
    """A COO payload holding every entry of the named layers, values from ``values_of(name)``."""
    values, indices, shapes = [], [], []
    for name in names:
        shape = SHAPES[name]
        values.append(values_of(name).reshape(-1))
        indices.append(np.argwhere(np.ones(shape, bool)).astype(np.int64))
        shapes.append(np.asarray(shape, np.int64))
    return values + indices + shapes + [np.array(list(names), dtype=np.str_)]


# ---------------------------------------------------------------------------------------
# 1. initial_model must be a snapshot
# ---------------------------------------------------------------------------------------

SNAPSHOT_WORDS = ("nnx.clone", "snapshot")


def _drift_callers():
    """``(label, call(model, initial_model), exchanger or None)``: every entry point that measures drift."""
    dynamic = DynamicLayerExchanger(percentage_rule(0.125))
    dynamic_ef = DynamicLayerExchanger(percentage_rule(0.125), error_feedback=True)
    sparse = SparseCooParameterExchanger(0.5, jaxlayerx.largest_magnitude_change_scores)
    rule = percentage_rule(0.125)
    return [
        ("dynamic.push", dynamic.push_parameters, dynamic),
        ("dynamic.select", dynamic.select_parameters, dynamic),
        ("dynamic_ef.push", dynamic_ef.push_parameters, dynamic_ef),
        ("dynamic_ef.select", dynamic_ef.select_parameters, dynamic_ef),
        ("sparse.push", sparse.push_parameters, sparse),
        ("sparse.select", sparse.select_parameters, sparse),
        ("sparse.scores", sparse.generate_parameter_scores, sparse),
        ("rule", rule, None),
    ]


CALLERS = [label for label, _, _ in _drift_callers()]


def _caller(label):
    return next((call, exchanger) for name, call, exchanger in _drift_callers() if name == label)


def _assert_snapshot_advice(message: str) -> None:
    for word in SNAPSHOT_WORDS:
        assert word in message, (word, message)


@pytest.mark.parametrize("label", CALLERS)
def test_same_nnx_module_twice_is_refused(label):
    call, exchanger = _caller(label)
    model = make_net()
    before = read_all(model)
    with pytest.raises(ValueError) as info:
        call(model, model)
    _assert_snapshot_advice(str(info.value))
    assert "itself" in str(info.value)
    assert_same_layers(read_all(model), before)
    if exchanger is not None and exchanger.error_feedback:
        assert exchanger.state == jaxlayerx.ExchangeState()  # nothing pulled, nothing seeded


@pytest.mark.parametrize("label", CALLERS)
def test_shared_nnx_state_is_refused_naming_a_layer(label):
    call, exchanger = _caller(label)
    model = make_net()
    before = read_all(model)
    with pytest.raises(ValueError) as info:
        call(model, nnx.state(model))
    message = str(info.value)
    _assert_snapshot_advice(message)
    named = re.search(r"layer '([^']+)'", message)
    assert named is not None, message
    assert named.group(1) in ALL_LAYERS
    assert named.group(1) == "bn/bias"  # the first variable in traversal order
    assert_same_layers(read_all(model), before)
    if exchanger is not None and exchanger.error_feedback:
        assert exchanger.state == jaxlayerx.ExchangeState()  # nothing pulled, nothing seeded


@pytest.mark.parametrize("label", CALLERS)
def test_same_linen_variables_twice_is_refused(label):
    call, exchanger = _caller(label)
    variables = LinenNet().init(jax.random.key(0), X4)
    leaves_before = jax.tree.leaves(variables)
    copies_before = [np.array(leaf, copy=True) for leaf in leaves_before]
    with pytest.raises(ValueError) as info:
        call(variables, variables)
    _assert_snapshot_advice(str(info.value))
    leaves_after = jax.tree.leaves(variables)
    assert all(a is b for a, b in zip(leaves_after, leaves_before))
    for leaf, copy in zip(leaves_after, copies_before):
        assert_bit_equal(leaf, copy)
    if exchanger is not None and exchanger.error_feedback:
        assert exchanger.state == jaxlayerx.ExchangeState()  # nothing pulled, nothing seeded


SNAPSHOTS = {
    "nnx.clone": nnx.clone,
    "unflatten(flatten)": lambda model: jaxlayerx.unflatten(jaxlayerx.flatten(model), like=model),
}


@pytest.mark.parametrize("snapshot", list(SNAPSHOTS))
@pytest.mark.parametrize("label", CALLERS)
def test_snapshots_give_the_real_drift(label, snapshot):
    call, _ = _caller(label)
    model = make_net()
    initial = SNAPSHOTS[snapshot](model)
    old_kernel = read(model, "fc/kernel")
    model.fc.kernel[...] += 1.0
    new_kernel = old_kernel + np.float32(1.0)  # exact: dyadic values
    np.testing.assert_array_equal(read(model, "fc/kernel"), new_kernel)
    assert_bit_equal(read(initial, "fc/kernel"), old_kernel)  # the snapshot did not move
    result = call(model, initial)
    if label.startswith("dynamic") and label.endswith("push"):
        # ceil(8 layers * 0.125) = 1 layer: the one that moved.
        assert names_of(result) == ["fc/kernel"]
        np.testing.assert_array_equal(result[0], new_kernel)
    elif label.startswith("dynamic") or label == "rule":
        arrays, names = result
        assert names == ["fc/kernel"]
        np.testing.assert_array_equal(arrays[0], new_kernel)
    elif label == "sparse.scores":
        assert list(result) == ALL_LAYERS
        for name in ALL_LAYERS:
            expected = np.ones(SHAPES[name], np.float32) if name == "fc/kernel" else np.zeros(SHAPES[name], np.float32)
            np.testing.assert_array_equal(np.asarray(result[name]), expected, err_msg=name)
    else:
        # 122 weights, k = ceil(61.0) = 61: the 64 kernel weights that moved by exactly 1 are
        # all >= the 61st largest score (1.0); every other score is 0.
        if label == "sparse.push":
            values, (indices, shapes, names) = jaxlayerx.unpack_coo(result)
        else:
            values, (indices, shapes, names) = result
        assert list(names) == ["fc/kernel"]
        np.testing.assert_array_equal(np.asarray(shapes[0]), [8, 8])
        np.testing.assert_array_equal(np.asarray(indices[0]), np.argwhere(np.ones((8, 8), bool)))
        np.testing.assert_array_equal(np.asarray(values[0]), new_kernel.reshape(-1))


# ---------------------------------------------------------------------------------------
# 2. Torch-style unknown names
# ---------------------------------------------------------------------------------------


def suggestions(message: str) -> list[str]:
    tail = message.split("closest valid layers: ", 1)[1]
    return re.findall(r"'([^']+)'", tail)


@pytest.mark.parametrize(
    "wrong, first",
    [
        ("fc.weight", "fc/kernel"),
        ("bn.running_mean", "bn/mean"),
        ("bn.running_var", "bn/var"),
        ("bn.weight", "bn/scale"),
    ],
)
def test_torch_names_suggest_flax_names_nnx(wrong, first):
    model = make_net()
    with pytest.raises(jaxlayerx.UnknownLayerError) as info:
        FixedLayerExchanger([wrong]).push_parameters(model)
    assert isinstance(info.value, KeyError)
    message = str(info.value)
    assert repr(wrong) in message
    listed = suggestions(message)
    assert listed, message
    assert listed[0] == first, listed
    assert set(listed) <= set(ALL_LAYERS)


def test_torch_names_suggest_flax_names_linen():
    variables = LinenNet().init(jax.random.key(0), X4)
    with pytest.raises(jaxlayerx.UnknownLayerError) as info:
        FixedLayerExchanger(["Dense_0.weight"]).push_parameters(variables)
    assert isinstance(info.value, KeyError)
    listed = suggestions(str(info.value))
    assert listed[0] == "params/Dense_0/kernel", listed


# ---------------------------------------------------------------------------------------
# 3. Linen exclusions without example inputs
# ---------------------------------------------------------------------------------------


def test_linen_exclusions_without_inputs_says_how_to_pass_them():
    with pytest.raises(TypeError) as info:
        LayerExchangerWithExclusions(LinenNet(), {nn.BatchNorm})
    message = str(info.value)
    assert "example inputs" in message
    assert "LayerExchangerWithExclusions(module, {nn.BatchNorm}, x)" in message


def test_linen_exclusions_with_inputs_works():
    exchanger = LayerExchangerWithExclusions(LinenNet(), {nn.BatchNorm}, X4)
    expected = ["params/Dense_0/bias", "params/Dense_0/kernel", "params/Dense_1/bias", "params/Dense_1/kernel"]
    assert exchanger.layers_to_transfer == expected
    variables = LinenNet().init(jax.random.key(1), X4)
    pushed = exchanger.push_parameters(variables)
    hand = [
        variables["params"]["Dense_0"]["bias"],
        variables["params"]["Dense_0"]["kernel"],
        variables["params"]["Dense_1"]["bias"],
        variables["params"]["Dense_1"]["kernel"],
    ]
    assert len(pushed) == 4
    for got, want in zip(pushed, hand):
        assert_bit_equal(got, np.asarray(want))


# ---------------------------------------------------------------------------------------
# 4. nnx_filter reaches every exchanger
# ---------------------------------------------------------------------------------------

FIXED = ["fc/kernel", "bn/scale"]


def _exchanger(kind: str, model: nnx.Module, **filter_kw):
    if kind == "full":
        return FullParameterExchanger(**filter_kw)
    if kind == "fixed":
        return FixedLayerExchanger(FIXED, **filter_kw)
    if kind == "exclusions":
        return LayerExchangerWithExclusions(model, {nnx.Linear}, **filter_kw)
    if kind == "dynamic":
        return DynamicLayerExchanger(percentage_rule(1.0), **filter_kw)
    return SparseCooParameterExchanger(1.0, jaxlayerx.largest_final_magnitude_scores, **filter_kw)


KINDS = ["full", "fixed", "exclusions", "dynamic", "sparse"]
#: What each exchanger sends, in payload order, with nnx_filter=nnx.Param (by hand).
SENT_PARAM = {
    "full": PARAM_LAYERS,
    "fixed": FIXED,
    "exclusions": ["bn/bias", "bn/scale"],
    "dynamic": PARAM_LAYERS,
    "sparse": PARAM_LAYERS,
}
#: ... and with the default filter (BatchNorm statistics included).
SENT_DEFAULT = {
    "full": ALL_LAYERS,
    "fixed": FIXED,
    "exclusions": ["bn/bias", "bn/mean", "bn/scale", "bn/var"],
    "dynamic": ALL_LAYERS,
    "sparse": ALL_LAYERS,
}


def _push(kind, exchanger, model):
    """``name -> array`` of what ``exchanger`` sends for ``model``, in payload order."""
    initial = nnx.clone(model)
    model.fc.kernel[...] += 1.0  # some drift for the dynamic rule
    payload = exchanger.push_parameters(model, initial_model=initial)
    if kind in ("full", "fixed", "exclusions"):
        names = SENT_PARAM[kind] if exchanger.nnx_filter is nnx.Param else SENT_DEFAULT[kind]
        assert len(payload) == len(names)
        return dict(zip(names, payload))
    if kind == "dynamic":
        assert len(payload) == len(names_of(payload)) + 1
        return dict(zip(names_of(payload), payload[:-1]))
    values, (indices, shapes, names) = jaxlayerx.unpack_coo(payload)
    layers = {}
    for name, value, index, shape in zip(names, values, indices, shapes):
        assert tuple(np.asarray(shape).tolist()) == SHAPES[name]
        dense = np.full(SHAPES[name], np.nan, np.float32)
        dense[tuple(np.asarray(index).T)] = value
        layers[name] = dense
    return layers


@pytest.mark.parametrize("kind", KINDS)
def test_nnx_filter_push_sends_only_params(kind):
    model = make_net()
    exchanger = _exchanger(kind, model, nnx_filter=nnx.Param)
    sent = _push(kind, exchanger, model)
    assert list(sent) == SENT_PARAM[kind]
    assert not set(sent) & set(STAT_LAYERS)
    for name, value in sent.items():
        assert_bit_equal(value, read(model, name))


@pytest.mark.parametrize("kind", KINDS)
def test_default_filter_push_includes_batch_stats(kind):
    model = make_net()
    exchanger = _exchanger(kind, model)
    sent = _push(kind, exchanger, model)
    assert list(sent) == SENT_DEFAULT[kind]
    if kind != "fixed":
        assert set(STAT_LAYERS) <= set(sent)
    for name, value in sent.items():
        assert_bit_equal(value, read(model, name))


def _payload_for(kind, names, new):
    if kind in ("full", "fixed", "exclusions"):
        return [new[name] for name in names]
    if kind == "dynamic":
        return jaxlayerx.pack_layers([new[name] for name in names], names)
    return coo_payload(names, lambda name: new[name])


@pytest.mark.parametrize("kind", KINDS)
def test_nnx_filter_pull_applies_params_and_keeps_batch_stats(kind):
    model = make_net()
    exchanger = _exchanger(kind, model, nnx_filter=nnx.Param)
    before = read_all(model)
    names = SENT_PARAM[kind]
    new = {name: before[name] + np.float32(10.0) for name in names}
    result = exchanger.pull_parameters(_payload_for(kind, names, new), model)
    assert result is model  # an nnx.Module is updated in place
    for name in ALL_LAYERS:
        expected = new[name] if name in new else before[name]
        assert_bit_equal(read(model, name), expected)
    for name in STAT_LAYERS:
        assert_bit_equal(read(model, name), before[name])


@pytest.mark.parametrize("kind", ["dynamic", "sparse"])
def test_nnx_filter_named_pull_of_batch_stats_is_unknown(kind):
    model = make_net()
    exchanger = _exchanger(kind, model, nnx_filter=nnx.Param)
    before = read_all(model)
    new = {name: before[name] + np.float32(3.0) for name in ["fc/bias", "bn/mean"]}
    with pytest.raises(jaxlayerx.UnknownLayerError) as info:
        exchanger.pull_parameters(_payload_for(kind, ["fc/bias", "bn/mean"], new), model)
    assert "'bn/mean'" in str(info.value)
    assert_same_layers(read_all(model), before)  # nothing applied, fc/bias included


def test_nnx_filter_fixed_batch_stat_name_is_unknown():
    model = make_net()
    with pytest.raises(jaxlayerx.UnknownLayerError):
        FixedLayerExchanger(["bn/mean"], nnx_filter=nnx.Param).push_parameters(model)
    (mean,) = FixedLayerExchanger(["bn/mean"]).push_parameters(model)
    assert_bit_equal(mean, read(model, "bn/mean"))


# ---------------------------------------------------------------------------------------
# 5. The Flower client with nnx_filter=nnx.Param
# ---------------------------------------------------------------------------------------


def add_one_to_params(model, config):
    for name in PARAM_LAYERS:
        variable(model, name)[...] += 1.0
    return model, 7, {}


def server_values(seed: int = 5) -> dict[str, np.ndarray]:
    return {name: dyadic(SHAPES[name], seed + i) * np.float32(-2.0) for i, name in enumerate(PARAM_LAYERS)}


@pytest.mark.parametrize(
    "make_exchanger",
    [
        lambda: FullParameterExchanger(nnx_filter=nnx.Param),
        lambda: DynamicLayerExchanger(percentage_rule(1.0), nnx_filter=nnx.Param),
    ],
    ids=["full", "dynamic"],
)
@pytest.mark.parametrize("first", ["positional", "named whole", "named"])
def test_flower_client_param_filter_first_fit(make_exchanger, first):
    model = make_net()
    stats_before = read_all(model, STAT_LAYERS)
    client = ExchangerClient(model, make_exchanger(), add_one_to_params, nnx_filter=nnx.Param)
    received = server_values()
    # The whole model as a server sends it first: the Param layers alone (the filter's
    # model), unnamed in model order (fl4health's initial parameters), or named with the
    # config saying it is the whole model (base round -1) or without a word from the server.
    payload, config = first_message(first, PARAM_LAYERS, received)
    sent, num_examples, metrics = client.fit(payload, config)
    assert num_examples == 7
    assert names_of(sent) == PARAM_LAYERS
    assert len(sent) == len(PARAM_LAYERS) + 1
    assert metrics["layers_sent"] == len(PARAM_LAYERS)
    for array, name in zip(sent[:-1], PARAM_LAYERS):
        assert_bit_equal(array, received[name] + np.float32(1.0))  # applied, then trained
        assert_bit_equal(read(client.model, name), received[name] + np.float32(1.0))
    for name in STAT_LAYERS:  # local: neither received nor sent
        assert_bit_equal(read(client.model, name), stats_before[name])


def first_message(form: str, names: list[str], values: dict) -> tuple[list[np.ndarray], dict]:
    """A server's first message holding the layers ``names``, and its config."""
    arrays = [values[name] for name in names]
    if form == "positional":
        return arrays, {}
    if form == "named whole":
        return jaxlayerx.pack_layers(arrays, names), {"jaxlayerx.base-round": -1, "jaxlayerx.round": 0}
    return jaxlayerx.pack_layers(arrays, names), {}  # named, the server silent: taken as the whole model


@pytest.mark.parametrize(
    "form, pattern",
    [
        ("positional", r"expected 8 arrays \(one per layer, in order\), got 6"),
        ("named whole", r"every layer.*2 missing or partial.*'bn/mean', 'bn/var'"),
        ("named", r"every layer.*2 missing or partial.*'bn/mean', 'bn/var'"),
    ],
)
def test_flower_client_default_filter_refuses_param_only_first_payload(form, pattern):
    model = make_net()
    before = read_all(model)
    client = ExchangerClient(model, FullParameterExchanger(), add_one_to_params)
    received = server_values()
    payload, config = first_message(form, PARAM_LAYERS, received)
    with pytest.raises(ValueError, match=pattern):
        client.fit(payload, config)
    assert_same_layers(read_all(model), before)
    assert not client.initialized


# ---------------------------------------------------------------------------------------
# 6. The simulation with nnx_filter=nnx.Param
# ---------------------------------------------------------------------------------------


#: float32 bytes of the Param layers: bn 2*16, linear1 64*16 + 16, linear2 16*10 + 10.
SIM_PARAM_BYTES = 4 * (2 * 16 + 64 * 16 + 16 + 16 * 10 + 10)
#: The compact header of the six Param layers, whole (docs/wire-formats.md): the format
#: version and the layer count (2), then per layer the name's length and bytes, encoding
#: and form (2), value group, entry count, rank and each dimension (varints; 1024 and
#: 160 entries take 2 bytes):
#: bn/bias 1+7+2+1+1+1+1 = 14, bn/scale 15, linear1/bias 1+12+2+4 = 19,
#: linear1/kernel 1+14+2+1+2+1+1+1 = 23, linear2/bias 19, linear2/kernel 23.
SIM_PARAM_HEADER = 2 + 14 + 15 + 19 + 23 + 19 + 23
#: The Message API's record of the whole Param model: "header" (uint8) and "values0"
#: (float32), each a 128-byte .npy header, its data and its key.
SIM_PARAM_MESSAGE = (128 + SIM_PARAM_HEADER + len("header")) + (128 + SIM_PARAM_BYTES + len("values0"))


@pytest.fixture(scope="module")
def digits3():
    from jaxlayerx.simulation import load_digits_data, make_client_data

    x, y = load_digits_data()
    return make_client_data(x[:300], y[:300], 3, beta=0.5, seed=0)


def test_simulation_nnx_param_filter(digits3):
    from jaxlayerx.simulation import ExchangerSpec, Simulation, SimulationConfig

    config = SimulationConfig(rounds=2, local_steps=2, batch_size=8)
    simulation = Simulation(
        ExchangerSpec("full"), config, digits3, module=NnxDigitsNet(nnx.Rngs(0)), nnx_filter=nnx.Param
    )
    assert simulation.layer_names == NNX_DIGITS_PARAMS
    records, outputs = zip(*simulation.iterate())
    assert [record["round"] for record in records] == [1, 2]
    # Only the Param layers travel, whole, each way: written compact and counted by Flower.
    shapes = {"bn/bias": (16,), "bn/scale": (16,), "linear1/bias": (16,), "linear1/kernel": (64, 16)}
    shapes |= {"linear2/bias": (10,), "linear2/kernel": (16, 10)}
    whole = {name: RefLayer(np.zeros(shapes[name], np.float32), None, shapes[name]) for name in NNX_DIGITS_PARAMS}
    assert ref_message_nbytes(whole) == SIM_PARAM_MESSAGE
    for record in records:
        assert math.isfinite(record["global_loss"])
        assert record["client_upload_bytes"] == [SIM_PARAM_MESSAGE] * 3
        assert record["client_download_bytes"] == [SIM_PARAM_MESSAGE] * 3
        assert record["upload_bytes"] == 3 * SIM_PARAM_MESSAGE
        assert record["download_bytes"] == 3 * SIM_PARAM_MESSAGE
    assert list(outputs[-1].state.global_layers) == NNX_DIGITS_PARAMS
    assert list(outputs[-1].send_masks) == NNX_DIGITS_PARAMS


def test_simulation_nnx_default_filter_includes_batch_stats(digits3):
    from jaxlayerx.simulation import ExchangerSpec, Simulation, SimulationConfig

    config = SimulationConfig(rounds=2, local_steps=2, batch_size=8)
    simulation = Simulation(ExchangerSpec("full"), config, digits3, module=NnxDigitsNet(nnx.Rngs(0)))
    assert simulation.layer_names == NNX_DIGITS_LAYERS


# ---------------------------------------------------------------------------------------
# 7. The dtype policy on the Flower side
# ---------------------------------------------------------------------------------------


def fit_res(layers: dict, num_examples: int) -> FitRes:
    payload = jaxlayerx.pack_layers(list(layers.values()), list(layers))
    return FitRes(
        status=Status(code=Code.OK, message="ok"),
        parameters=ndarrays_to_parameters(payload),
        num_examples=num_examples,
        metrics={},
    )


def results(*clients) -> list:
    return [(fake_proxy(cid), fit_res(layers, n)) for cid, layers, n in clients]


def decode(parameters) -> dict[str, np.ndarray]:
    """The strategy's answer: the full global model, unnamed, in model order ("b", "w")."""
    arrays = parameters_to_ndarrays(parameters)
    assert len(arrays) == 2 and not jaxlayerx.is_packed(arrays)
    return dict(zip(["b", "w"], arrays))


def global_model() -> dict[str, np.ndarray]:
    return {"b": np.zeros(3, np.float32), "w": np.zeros(4, np.float32)}


def strategy(**options) -> FedAvgDynamicLayerStrategy:
    return FedAvgDynamicLayerStrategy(
        global_model(), min_fit_clients=1, min_evaluate_clients=1, min_available_clients=1, **options
    )


A32 = np.array([0.1, -1.7, 2.25, 3.3], np.float32)
B64 = np.array([1 / 3, 2 / 7, -5 / 9, 1e-3 + 1e-12], np.float64)
I32 = np.array([1, -2, 3, 40], np.int32)


def test_client_accepts_float64_payload_rounded_to_float32():
    model = make_net()
    client = ExchangerClient(model, FullParameterExchanger(), lambda m, c: (m, 1, {}))
    rng = np.random.default_rng(0)
    received = {name: rng.normal(size=SHAPES[name]).astype(np.float64) / 3 for name in ALL_LAYERS}
    received["bn/var"] = np.abs(received["bn/var"]) + 0.5
    # The whole model first, unnamed in model order, as a server sends it.
    payload = [received[name] for name in ALL_LAYERS]
    sent, _, _ = client.fit(payload, {})
    for name in ALL_LAYERS:
        expected = received[name].astype(np.float32)
        assert not np.array_equal(expected.astype(np.float64), received[name])  # rounding happened
        assert_bit_equal(read(client.model, name), expected)
    assert names_of(sent) == ALL_LAYERS
    for array, name in zip(sent[:-1], ALL_LAYERS):
        assert_bit_equal(array, received[name].astype(np.float32))


def float32_average(*weighted) -> np.ndarray:
    """``sum w x / sum w`` with every value cast to float32 first and summed in float32,
    client by client: the global layer's dtype, as the strategy averages."""
    summed = np.zeros_like(np.asarray(weighted[0][1], np.float32))
    for weight, values in weighted:
        summed = summed + np.float32(weight) * np.asarray(values).astype(np.float32)
    return summed / np.float32(sum(weight for weight, _ in weighted))


def test_strategy_averages_float32_and_float64_into_float32():
    s = strategy()
    parameters, metrics = s.aggregate_fit(1, results(("1", {"w": A32}, 3), ("2", {"w": B64}, 5)), [])
    expected = float32_average((3, A32), (5, B64))
    assert s.global_layers["w"].dtype == np.float32
    np.testing.assert_allclose(s.global_layers["w"], expected, rtol=1e-6)
    out = decode(parameters)
    assert out["w"].dtype == np.float32 and out["b"].dtype == np.float32
    np.testing.assert_allclose(out["w"], expected, rtol=1e-6)
    assert metrics["clients_accepted"] == 2 and metrics["clients_rejected"] == 0
    assert metrics["layers_aggregated"] == 1
    assert_bit_equal(s.global_layers["b"], np.zeros(3, np.float32))
    assert_bit_equal(out["b"], np.zeros(3, np.float32))  # not sent: the global value, in the full model


def test_strategy_casts_float64_values_to_the_layers_float32_before_averaging():
    """Changed on purpose: a float64 reply to a float32 layer is cast to float32 first, then
    averaged in float32 (the compiled masked average), not averaged in float64. Values
    whose float64 mean survives in float32 only if averaged in float64 tell them apart."""
    s = strategy()
    tiny = 2.0**-40  # lost when -1 + tiny is cast to float32; 2**-41 is a float32 number
    near_minus_one = np.array([-1.0 + tiny, -1.0 + tiny, -0.5, -1.0 + tiny], np.float64)
    ones = np.array([1.0, 1.0, 0.5, 1.0], np.float32)
    parameters, _ = s.aggregate_fit(1, results(("1", {"w": ones}, 1), ("2", {"w": near_minus_one}, 1)), [])
    assert np.float32(-1.0 + tiny) == np.float32(-1.0)
    assert ((ones.astype(np.float64) + near_minus_one) / 2).astype(np.float32)[0] == np.float32(2.0**-41)
    assert_bit_equal(s.global_layers["w"], np.zeros(4, np.float32))  # cast first: -1 + 1 = 0 exactly
    assert_bit_equal(decode(parameters)["w"], np.zeros(4, np.float32))


def test_strategy_averages_an_int_layer_into_a_float_layer():
    s = strategy()
    parameters, metrics = s.aggregate_fit(1, results(("1", {"w": A32}, 3), ("2", {"w": I32}, 2)), [])
    expected = float32_average((3, A32), (2, I32))
    assert s.global_layers["w"].dtype == np.float32
    np.testing.assert_allclose(s.global_layers["w"], expected, rtol=1e-6)
    assert metrics["clients_accepted"] == 2 and metrics["clients_rejected"] == 0
    assert decode(parameters)["w"].dtype == np.float32
    np.testing.assert_allclose(decode(parameters)["w"], expected, rtol=1e-6)


def test_strategy_rejects_a_complex_payload(caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    s = strategy()
    complex_w = (A32 + 1j * A32).astype(np.complex64)
    parameters, metrics = s.aggregate_fit(1, results(("1", {"w": A32}, 3), ("9", {"w": complex_w}, 5)), [])
    assert metrics["clients_rejected"] == 1 and metrics["clients_accepted"] == 1
    ((cid, reason),) = s.history[-1].rejected
    assert cid == "9"
    assert "complex" in reason and "'w'" in reason
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert any("client 9" in message and "complex" in message for message in warnings), warnings
    # Only the accepted client's value (3 * w / 3, rounded in float32).
    np.testing.assert_allclose(s.global_layers["w"], A32, rtol=1e-6)
    np.testing.assert_allclose(decode(parameters)["w"], A32, rtol=1e-6)


# ---------------------------------------------------------------------------------------
# 8. Non-finite values
# ---------------------------------------------------------------------------------------

NAN_W = np.array([1.0, np.nan, 2.0, 4.0], np.float32)


def test_strategy_rejects_nan_by_default(caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    s = strategy()
    _, metrics = s.aggregate_fit(1, results(("1", {"w": A32}, 3), ("7", {"w": NAN_W}, 5)), [])
    assert metrics["clients_rejected"] == 1
    ((cid, reason),) = s.history[-1].rejected
    assert cid == "7"
    assert "non-finite" in reason and "'w'" in reason
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert any("client 7" in message for message in warnings), warnings
    np.testing.assert_allclose(s.global_layers["w"], A32, rtol=1e-6)


def test_strategy_allow_nonfinite_averages_nan_in():
    s = strategy(allow_nonfinite=True)
    _, metrics = s.aggregate_fit(1, results(("1", {"w": A32}, 3), ("7", {"w": NAN_W}, 5)), [])
    assert metrics["clients_rejected"] == 0 and metrics["clients_accepted"] == 2
    assert s.history[-1].rejected == ()
    w = s.global_layers["w"]
    assert w.dtype == np.float32
    assert np.isnan(w[1])
    expected = float32_average((3, A32), (5, NAN_W))
    finite = [0, 2, 3]
    np.testing.assert_allclose(w[finite], expected[finite], rtol=1e-6)


@pytest.mark.parametrize(
    "bad_client, layer",
    [(0, "w"), (1, "b")],
)
def test_fedavg_dynamic_layer_names_the_nan_client_and_layer(bad_client, layer):
    w = {0: NAN_W, 1: A32}[bad_client]
    b = {0: np.zeros(3, np.float32), 1: np.array([0.0, np.inf, 1.0], np.float32)}[bad_client]
    payloads = [
        (jaxlayerx.pack_layers([w, np.ones(3, np.float32)], ["w", "b"]), 3),
        (jaxlayerx.pack_layers([b], ["b"]), 2),
    ]
    with pytest.raises(ValueError) as info:
        jaxlayerx.FedAvgDynamicLayer().aggregate(payloads)
    message = str(info.value)
    assert f"client {bad_client}" in message
    assert f"'{layer}'" in message
    # Allowed, the same payloads average the non-finite value in.
    averaged = jaxlayerx.FedAvgDynamicLayer(allow_nonfinite=True).aggregate(payloads)
    assert not np.isfinite(averaged[layer]).all()


@pytest.mark.parametrize("nan_client", [0, 1])
def test_fedavg_sparse_coo_names_the_nan_client_and_layer(nan_client):
    def coo(values):
        values = np.asarray(values, np.float32)
        return jaxlayerx.pack_coo([values], [np.array([[0], [2]], np.int64)], [np.array([4], np.int64)], ["w"])

    payloads = [(coo([1.0, 2.0]), 3), (coo([3.0, 4.0]), 2)]
    payloads[nan_client] = (coo([np.nan, 2.0]), [3, 2][nan_client])
    with pytest.raises(ValueError) as info:
        jaxlayerx.FedAvgSparseCooTensor().aggregate(payloads)
    message = str(info.value)
    assert f"client {nan_client}" in message
    assert "'w'" in message


# ---------------------------------------------------------------------------------------
# 9. Host methods under jax.jit, jax.vmap and jax.grad
# ---------------------------------------------------------------------------------------

LINEN_LAYERS = list(LINEN_SHAPES)
LINEN_DENSE = ["params/Dense_0/bias", "params/Dense_0/kernel", "params/Dense_1/bias", "params/Dense_1/kernel"]
LINEN_FIXED = ["params/Dense_1/kernel", "params/BatchNorm_0/scale"]
#: What each exchanger sends of LinenNet's variables, in payload order (by hand).
LINEN_SENT = {
    "full": LINEN_LAYERS,
    "fixed": LINEN_FIXED,
    "exclusions": LINEN_DENSE,
    "dynamic": LINEN_LAYERS,
    "sparse": LINEN_LAYERS,
}
HOST_WORDS = ("runs on the host", "numpy payloads", "send_mask(current, reference)", "mask(current, reference)")


def linen_variables(seed: int = 0) -> dict:
    """LinenNet's variables, every layer distinct, non-zero and exact (dyadic), as jax arrays."""
    variables = LinenNet().init(jax.random.key(seed), X4)
    layers = [jnp.asarray(dyadic(LINEN_SHAPES[name], i + seed)) for i, name in enumerate(LINEN_LAYERS)]
    return jax.tree.unflatten(jax.tree.structure(variables), layers)  # leaves in LINEN_LAYERS order


def linen_layer(variables: dict, name: str) -> np.ndarray:
    collection, module, leaf = name.split("/")
    return np.array(variables[collection][module][leaf], copy=True)


def _linen_exchanger(kind: str, **options):
    if kind == "full":
        return FullParameterExchanger(**options)
    if kind == "fixed":
        return FixedLayerExchanger(LINEN_FIXED, **options)
    if kind == "exclusions":
        return LayerExchangerWithExclusions(LinenNet(), {nn.BatchNorm}, X4, **options)
    if kind == "dynamic":
        return DynamicLayerExchanger(percentage_rule(1.0), **options)
    return SparseCooParameterExchanger(1.0, jaxlayerx.largest_final_magnitude_scores, **options)


def _linen_payload(kind: str, layers: dict[str, np.ndarray]) -> list[np.ndarray]:
    """fl4health's layout of ``kind`` holding every entry of ``layers`` (by hand)."""
    if kind in ("full", "fixed", "exclusions"):
        return list(layers.values())
    names = np.array(list(layers), dtype=np.str_)
    if kind == "dynamic":
        return [*layers.values(), names]
    shapes = [LINEN_SHAPES[name] for name in layers]
    indices = [np.argwhere(np.ones(shape, bool)).astype(np.int64) for shape in shapes]
    return [v.reshape(-1) for v in layers.values()] + indices + [np.array(s, np.int64) for s in shapes] + [names]


def _sent_layers(kind: str, payload: list[np.ndarray]) -> dict[str, np.ndarray]:
    """``name -> layer`` of a payload of ``kind``, read by hand (every entry is sent)."""
    if kind in ("full", "fixed", "exclusions"):
        assert len(payload) == len(LINEN_SENT[kind])
        return dict(zip(LINEN_SENT[kind], payload))
    names = names_of(payload)
    if kind == "dynamic":
        assert len(payload) == len(names) + 1
        return dict(zip(names, payload[:-1]))
    count = len(names)
    assert len(payload) == 3 * count + 1
    layers = {}
    for name, values, indices, shape in zip(names, payload[:count], payload[count : 2 * count], payload[2 * count :]):
        assert tuple(np.asarray(shape).tolist()) == LINEN_SHAPES[name]
        dense = np.full(LINEN_SHAPES[name], np.nan, np.float32)
        dense[tuple(np.asarray(indices).T)] = values
        layers[name] = dense
    return layers


def _assert_teaches(error: BaseException, method: str, argument: str) -> None:
    assert type(error) is TypeError, type(error)  # not JAX's TracerArrayConversionError
    message = str(error)
    assert f".{method} runs on the host" in message, message
    assert f"its {argument} holds traced values" in message, message
    for words in (*HOST_WORDS, "jaxlayerx.masked_fedavg", "jax.jit", "jax.vmap"):
        assert words in message, (words, message)


def _host_call_still_works(kind: str, exchanger, variables: dict) -> None:
    """A plain push sends ``variables``' layers bit for bit, as the exchanger always did."""
    initial = jax.tree.map(lambda leaf: np.array(leaf, copy=True), variables)
    sent = _sent_layers(kind, exchanger.push_parameters(variables, initial_model=initial))
    assert list(sent) == LINEN_SENT[kind]
    for name, value in sent.items():
        assert_bit_equal(value, linen_layer(variables, name))


@pytest.mark.parametrize("kind", KINDS)
def test_push_parameters_under_jit_says_it_runs_on_the_host(kind):
    exchanger = _linen_exchanger(kind)
    variables = linen_variables()
    with pytest.raises(TypeError) as info:
        jax.jit(lambda model: exchanger.push_parameters(model))(variables)
    _assert_teaches(info.value, "push_parameters", "model")
    assert type(exchanger).__name__ in str(info.value)
    assert exchanger.state == jaxlayerx.ExchangeState()
    _host_call_still_works(kind, exchanger, variables)


def test_push_parameters_names_a_traced_initial_model():
    exchanger = _linen_exchanger("dynamic")
    variables = linen_variables()
    with pytest.raises(TypeError) as info:
        jax.jit(lambda initial: exchanger.push_parameters(variables, initial_model=initial))(linen_variables(1))
    _assert_teaches(info.value, "push_parameters", "initial_model")


@pytest.mark.parametrize("kind", KINDS)
def test_pull_parameters_under_jit_says_it_runs_on_the_host(kind):
    exchanger = _linen_exchanger(kind)
    variables = linen_variables()
    new = {name: linen_layer(variables, name) + np.float32(10.0) for name in LINEN_SENT[kind]}
    payload = _linen_payload(kind, new)
    numeric = [array for array in payload if array.dtype.kind != "U"]  # the names array cannot be traced
    names = payload[len(numeric) :]
    with pytest.raises(TypeError) as info:
        jax.jit(lambda arrays: exchanger.pull_parameters([*arrays, *names], variables))(numeric)
    _assert_teaches(info.value, "pull_parameters", "parameters")
    with pytest.raises(TypeError) as info:  # a traced model, which the merge itself would have taken
        jax.jit(lambda model: exchanger.pull_parameters(payload, model))(variables)
    _assert_teaches(info.value, "pull_parameters", "model")
    assert exchanger.state == jaxlayerx.ExchangeState()
    pulled = exchanger.pull_parameters(payload, variables)
    for name in LINEN_LAYERS:
        assert_bit_equal(linen_layer(pulled, name), new.get(name, linen_layer(variables, name)))
        assert_bit_equal(linen_layer(variables, name), dyadic(LINEN_SHAPES[name], LINEN_LAYERS.index(name)))


@pytest.mark.parametrize("kind", KINDS)
def test_push_and_pull_under_jit_say_they_run_on_the_host(kind):
    exchanger = _linen_exchanger(kind)
    variables = linen_variables()
    initial = linen_variables(1)
    state = exchanger.init_state()
    with pytest.raises(TypeError) as info:
        jax.jit(lambda model: exchanger.push(model, state, initial)[0])(variables)
    _assert_teaches(info.value, "push", "model")
    payload, _ = exchanger.push(variables, state, initial)
    assert list(payload) == LINEN_SENT[kind]
    with pytest.raises(TypeError) as info:
        jax.jit(lambda sent: exchanger.pull(sent, variables, state)[0])(payload)
    _assert_teaches(info.value, "pull", "payload")
    with pytest.raises(TypeError) as info:
        jax.jit(lambda model: exchanger.pull(payload, model, state)[0])(variables)
    _assert_teaches(info.value, "pull", "model")


@pytest.mark.parametrize("kind", KINDS)
def test_traced_calls_leave_the_state_and_the_model_as_they_were(kind):
    exchanger = _linen_exchanger(kind, quantize="int8")  # keeps a state: the values last pulled
    variables = linen_variables()
    before = {name: linen_layer(variables, name) for name in LINEN_LAYERS}
    payload = _linen_payload(kind, {name: before[name] + np.float32(1.0) for name in LINEN_SENT[kind]})
    variables = exchanger.pull_parameters(payload, variables)
    state = exchanger.state
    assert state.seeded
    pulled = {name: linen_layer(variables, name) for name in LINEN_LAYERS}
    pushed = collections.OrderedDict((name, dense_entries(before[name])) for name in LINEN_SENT[kind])
    calls = {
        "push_parameters": lambda model: exchanger.push_parameters(model),
        "pull_parameters": lambda model: exchanger.pull_parameters(payload, model),
        "push": lambda model: exchanger.push(model, state)[0],
        "pull": lambda model: exchanger.pull(pushed, model, state)[0],
    }
    for method, call in calls.items():
        with pytest.raises(TypeError) as info:
            jax.jit(call)(variables)
        _assert_teaches(info.value, method, "model")
        assert exchanger.state is state
        assert_same_layers({name: linen_layer(variables, name) for name in LINEN_LAYERS}, pulled)


def test_traced_state_is_refused():
    exchanger = _linen_exchanger("full", quantize="int8")
    variables = linen_variables()
    _, state = exchanger.pull(
        collections.OrderedDict((name, dense_entries(linen_layer(variables, name))) for name in LINEN_LAYERS),
        variables,
        exchanger.init_state(),
    )
    assert state.seeded
    with pytest.raises(TypeError) as info:
        jax.jit(lambda traced: exchanger.push(variables, traced)[0])(state)
    _assert_teaches(info.value, "push", "state")


@pytest.mark.parametrize("kind", ["full", "sparse"])
def test_host_methods_under_vmap_say_they_run_on_the_host(kind):
    exchanger = _linen_exchanger(kind)
    variables = linen_variables()
    stacked = jax.tree.map(lambda leaf: jnp.stack([leaf, leaf + 1.0]), variables)  # two clients
    with pytest.raises(TypeError) as info:
        jax.vmap(lambda model: exchanger.push_parameters(model))(stacked)
    _assert_teaches(info.value, "push_parameters", "model")
    payload = _linen_payload(kind, {name: linen_layer(variables, name) for name in LINEN_SENT[kind]})
    with pytest.raises(TypeError) as info:
        jax.vmap(lambda model: exchanger.pull_parameters(payload, model))(stacked)
    _assert_teaches(info.value, "pull_parameters", "model")
    assert exchanger.state == jaxlayerx.ExchangeState()
    _host_call_still_works(kind, exchanger, variables)


def test_push_parameters_under_grad_says_it_runs_on_the_host():
    exchanger = _linen_exchanger("full")
    with pytest.raises(TypeError) as info:
        jax.grad(lambda model: jnp.sum(exchanger.push_parameters(model)[0]))(linen_variables())
    _assert_teaches(info.value, "push_parameters", "model")


class GraphNet(nnx.Module, pytree=False):
    """``Net``'s layers in a module that is no pytree (its variables are read through ``nnx.state``)."""

    def __init__(self, rngs: nnx.Rngs):
        self.fc = nnx.Linear(8, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.head = nnx.Linear(8, 2, rngs=rngs)


@pytest.mark.parametrize("make", [make_net, lambda: GraphNet(nnx.Rngs(0))], ids=["pytree", "graph"])
@pytest.mark.parametrize("kind", KINDS)
def test_nnx_module_under_nnx_jit_says_it_runs_on_the_host(kind, make):
    model = make()
    exchanger = _exchanger(kind, model)
    before = read_all(model)
    with pytest.raises(TypeError) as info:
        nnx.jit(lambda traced: exchanger.push_parameters(traced))(model)
    _assert_teaches(info.value, "push_parameters", "model")
    new = {name: before[name] + np.float32(10.0) for name in SENT_DEFAULT[kind]}
    payload = _payload_for(kind, SENT_DEFAULT[kind], new)
    with pytest.raises(TypeError) as info:
        nnx.jit(lambda traced: exchanger.pull_parameters(payload, traced))(model)
    _assert_teaches(info.value, "pull_parameters", "model")
    assert_same_layers(read_all(model), before)  # the module is updated in place: it was not
    assert exchanger.pull_parameters(payload, model) is model
    assert_same_layers(read_all(model, SENT_DEFAULT[kind]), new)


# ---------------------------------------------------------------------------------------
# 10. A glob that matches no layer
# ---------------------------------------------------------------------------------------


def _quoted(text: str) -> list[str]:
    return re.findall(r"'([^']+)'", text)


def test_glob_matching_no_layer_lists_the_layers():
    from jaxlayerx.simulation.exchange import match_layers

    assert match_layers(["*/Dense_?/kernel"], LINEN_LAYERS) == ["params/Dense_0/kernel", "params/Dense_1/kernel"]
    for glob in ["*/nothing/*", "params/Dense_[23]/*", "params/Dense_0/?"]:
        with pytest.raises(jaxlayerx.UnknownLayerError) as info:
            match_layers(["params/*", glob], LINEN_LAYERS)
        assert isinstance(info.value, KeyError)
        message = str(info.value)
        assert message.startswith(f"pattern {glob!r} matched no layer; "), message
        assert _quoted(message.split("matched no layer", 1)[1]) == LINEN_LAYERS
        assert "8 layers" in message
        assert "more" not in message
        assert "closest" not in message


def test_glob_matching_no_layer_lists_the_first_twenty_layers_and_a_count():
    from jaxlayerx.simulation.exchange import match_layers

    names = [f"params/Dense_{i}/kernel" for i in range(23)]
    with pytest.raises(jaxlayerx.UnknownLayerError) as info:
        match_layers(["*/Conv_*"], names)
    message = str(info.value)
    assert _quoted(message.split("matched no layer", 1)[1]) == names[:20]
    assert message.endswith(" and 3 more"), message
    assert "23 layers" in message
    names = names[:20]  # exactly twenty: all of them, no count
    with pytest.raises(jaxlayerx.UnknownLayerError) as info:
        match_layers(["*/Conv_*"], names)
    assert _quoted(str(info.value).split("matched no layer", 1)[1]) == names
    assert "more" not in str(info.value)


def test_exact_unknown_name_still_gives_the_closest_layers():
    from jaxlayerx.simulation.exchange import match_layers

    with pytest.raises(jaxlayerx.UnknownLayerError) as info:
        match_layers(["params/Dense_0/kernl"], LINEN_LAYERS)
    message = str(info.value)
    assert "layer 'params/Dense_0/kernl' is not in the model" in message
    assert suggestions(message)[0] == "params/Dense_0/kernel"
    assert "matched no layer" not in message
