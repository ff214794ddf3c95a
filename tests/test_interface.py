"""The one exchanger interface (``jaxlayerx.Exchanger``): every built-in satisfies it, and
the simulation and the Flower client run any exchanger through it, user-written ones too.

Expectations come from hand-written values or independent references written here in
plain numpy (layer names and their order, drift measures, the top-k rule, the kept
weights of a sparse case, the quantizer of jaxlayerx/quantize.py's docstring, the bytes
of ``numpy.save`` and of the compact layout written from docs/wire-formats.md), never from
the library's own results. The user exchangers below subclass ``jaxlayerx.ExchangerBase``
and write only ``send_mask`` (and ``payload_kind``); one plain class with every member of
the protocol shows that the protocol needs no base class.
"""

from __future__ import annotations

import collections
import fnmatch
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import LINEN_SHAPES, RefLayer, nest, npy_size, ref_compact_decode, ref_compact_encode, ref_flat

import jaxlayerx as jlx
from jaxlayerx import (
    DynamicLayerExchanger,
    FixedLayerExchanger,
    FullParameterExchanger,
    LayerExchangerWithExclusions,
    LayerSelectionFunctionConstructor,
    SparseCooParameterExchanger,
)
from jaxlayerx.simulation import ExchangerSpec, Simulation, SimulationConfig, load_digits_data, make_client_data
from jaxlayerx.wire import LEGACY

Flat = collections.OrderedDict
F32 = np.float32

# ---------------------------------------------------------------------------------------
# A tiny Linen model, its layer names written by hand (JAX's sorted-dict-key order)
# ---------------------------------------------------------------------------------------

X = jnp.zeros((1, 4), jnp.float32)


class TinyNet(nn.Module):
    """Dense(3) -> BatchNorm -> Dense(2): params and batch_stats."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(3)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(2)(x)


TINY_NAMES = list(LINEN_SHAPES)  # TinyNet's layers are LinenNet's
TINY_BN = [name for name in TINY_NAMES if "BatchNorm" in name]

# The default simulation MLP (Dense_0 -> BatchNorm_0 -> Dense_1 -> Dense_2), by hand.
MLP_NAMES = [
    "batch_stats/BatchNorm_0/mean",
    "batch_stats/BatchNorm_0/var",
    "params/BatchNorm_0/bias",
    "params/BatchNorm_0/scale",
    "params/Dense_0/bias",
    "params/Dense_0/kernel",
    "params/Dense_1/bias",
    "params/Dense_1/kernel",
    "params/Dense_2/bias",
    "params/Dense_2/kernel",
]


def tiny_variables(seed: int = 0) -> dict[str, Any]:
    return TinyNet().init(jax.random.key(seed), X)


def random_layers(shapes: Mapping[str, tuple[int, ...]], seed: int, offset: float = 0.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal(shape) + offset).astype(np.float32) for name, shape in shapes.items()}


def flat_view(layers: Mapping[str, np.ndarray]) -> Flat:
    """A flat view in TINY_NAMES order (as the engine passes them: an OrderedDict of arrays)."""
    return Flat((name, jnp.asarray(layers[name])) for name in layers)


def assert_layers_equal(actual: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(np.asarray(actual[name]), np.asarray(value), err_msg=name)


def unpack_by_hand(payload: list[np.ndarray]) -> tuple[list[str], list[np.ndarray]]:
    """A named payload, read by hand: arrays, then one 1-D Unicode names array."""
    names = payload[-1]
    assert names.ndim == 1 and (names.dtype.kind == "U" or names.size == 0)
    assert len(payload) == names.size + 1
    return [str(n) for n in names.tolist()], [np.asarray(a) for a in payload[:-1]]


def pack_by_hand(arrays: list[np.ndarray], names: list[str]) -> list[np.ndarray]:
    """fl4health's named layout, by hand: the arrays, then a 1-D Unicode names array."""
    return [np.asarray(a) for a in arrays] + [np.array(names, dtype=np.str_)]


def ref_quantize(update: Any, mode: str) -> tuple[np.ndarray, np.float32]:
    """A whole layer's ``(q, scale)`` as jaxlayerx/quantize.py's docstring describes it:
    bfloat16 round to nearest even; int8 ``scale = max|u| / 127``, ``q = round_half_even(u *
    (1 / scale))`` clipped to [-127, 127] (zeros for a zero update)."""
    u = np.asarray(update, F32)
    if mode == "bf16":
        return u.astype(jnp.bfloat16), F32(1)
    scale = F32(np.max(np.abs(u), initial=F32(0))) / F32(127)
    with np.errstate(divide="ignore"):
        inverse = F32(1) / scale
    inverse = inverse if np.isfinite(inverse) else F32(0)
    return np.clip(np.rint(u * inverse), -127, 127).astype(np.int8), F32(scale)


def record_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Bytes of ``arrays`` in a Flower ``ArrayRecord``: each ``numpy.save`` blob plus its key."""
    return sum(npy_size(array) + len(key) for key, array in arrays.items())


def compact_whole_layers_bytes(layers: Mapping[str, np.ndarray]) -> int:
    """Message-API bytes of whole ``layers``: the compact layout written by hand
    (conftest.ref_compact_encode), in one ArrayRecord."""
    return record_bytes(
        ref_compact_encode({n: RefLayer(np.asarray(v).reshape(-1), None, v.shape) for n, v in layers.items()})
    )


def count_pulls(exchanger: Any, monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[str], bool]]:
    """A spy: ``exchanger.pull`` wrapped (for the test) to record, per call, the names in
    the payload and ``first``."""
    calls: list[tuple[list[str], bool]] = []
    original = exchanger.pull

    def pull(payload, model, state, *, first=False):
        calls.append((list(payload), first))
        return original(payload, model, state, first=first)

    monkeypatch.setattr(exchanger, "pull", pull)
    return calls


# ---------------------------------------------------------------------------------------
# Two user-written exchangers: ExchangerBase subclasses writing only send_mask
# ---------------------------------------------------------------------------------------


class DriftedKernels(jlx.ExchangerBase):
    """Named: sends the layers whose name matches ``pattern`` and whose L2 drift from the
    reference exceeds ``threshold``."""

    payload_kind = "named"

    def __init__(self, pattern: str = "*/kernel", threshold: float = 0.2) -> None:
        self.pattern = pattern
        self.threshold = threshold

    def send_mask(self, current, reference):
        mask = Flat()
        for name, value in current.items():
            if fnmatch.fnmatchcase(name, self.pattern):
                diff = jnp.asarray(value, jnp.float32) - jnp.asarray(reference[name], jnp.float32)
                mask[name] = jnp.sqrt(jnp.sum(diff * diff)) > self.threshold
            else:
                mask[name] = jnp.zeros((), bool)
        return mask


class HeadOnly(jlx.ExchangerBase):
    """Positional: sends the layers of module ``head``, kernel before bias (reverse name
    order, so the payload's order is not flatten order); Python bools as its mask."""

    payload_kind = "positional"

    def __init__(self, head: str = "Dense_2") -> None:
        self.head = head

    def send_mask(self, current, reference):
        names = list(current)
        heads = sorted((name for name in names if f"/{self.head}/" in name), reverse=True)
        order = heads + [name for name in names if name not in heads]
        return Flat((name, f"/{self.head}/" in name) for name in order)


class HeadOnlyInt8(HeadOnly):
    """HeadOnly with int8 uploads: the update over the values last pulled, coded."""

    quantize = "int8"


class PlainProtocol:
    """No base class: every member of the protocol written by hand (sends nothing)."""

    payload_kind = "named"
    error_feedback = False
    quantize = None

    def send_mask(self, current, reference):
        return Flat((name, jnp.zeros((), bool)) for name in current)

    def init_state(self):
        return jlx.ExchangeState()

    def push(self, model, state, initial_model=None):
        return collections.OrderedDict(), state

    def pull(self, payload, model, state, *, first=False):
        return jlx.merge_payload(model, payload), state


# ---------------------------------------------------------------------------------------
# 1. The built-ins satisfy the interface
# ---------------------------------------------------------------------------------------


def percentage_rule(p: float, measure: str = "l2/size"):
    return LayerSelectionFunctionConstructor(1.0, p, measure=measure).select_by_percentage()


def scores():
    return jlx.largest_magnitude_change_scores


# name -> (make, payload_kind, error_feedback, quantize)
BUILTINS = {
    "full": (lambda: FullParameterExchanger(), "positional", False, None),
    "full-int8-ef": (lambda: FullParameterExchanger(quantize="int8", error_feedback=True), "positional", True, "int8"),
    "fixed": (
        lambda: FixedLayerExchanger(["params/Dense_1/kernel", "params/Dense_0/bias"]),
        "positional",
        False,
        None,
    ),
    "fixed-bf16": (
        lambda: FixedLayerExchanger(["params/Dense_1/kernel", "params/Dense_0/bias"], quantize="bf16"),
        "positional",
        False,
        "bf16",
    ),
    "exclusions": (lambda: LayerExchangerWithExclusions(TinyNet(), {nn.BatchNorm}, X), "positional", False, None),
    "dynamic": (lambda: DynamicLayerExchanger(percentage_rule(0.5)), "named", False, None),
    "dynamic-ef": (lambda: DynamicLayerExchanger(percentage_rule(0.5), error_feedback=True), "named", True, None),
    "dynamic-int8": (lambda: DynamicLayerExchanger(percentage_rule(0.5), quantize="int8"), "named", False, "int8"),
    "sparse": (lambda: SparseCooParameterExchanger(0.3, scores()), "sparse", False, None),
    "sparse-ef": (lambda: SparseCooParameterExchanger(0.3, scores(), error_feedback=True), "sparse", True, None),
    "sparse-bf16-ef": (
        lambda: SparseCooParameterExchanger(0.3, scores(), error_feedback=True, quantize="bf16"),
        "sparse",
        True,
        "bf16",
    ),
}


@pytest.mark.parametrize("which", list(BUILTINS))
def test_builtins_satisfy_the_protocol(which):
    make, kind, feedback, quantize = BUILTINS[which]
    exchanger = make()
    assert isinstance(exchanger, jlx.Exchanger)
    assert isinstance(exchanger, jlx.ExchangerBase)
    assert jlx.check_exchanger(exchanger) is None
    assert exchanger.payload_kind == kind
    assert exchanger.error_feedback is feedback
    assert exchanger.quantize == quantize
    for method in ("send_mask", "init_state", "push", "pull", "push_parameters", "pull_parameters"):
        assert callable(getattr(exchanger, method)), method
    # the state is explicit: empty before the first pull, and the shells' own read-only copy
    assert exchanger.init_state() == jlx.ExchangeState()
    assert isinstance(exchanger.state, jlx.ExchangeState) and not exchanger.state.seeded
    assert not hasattr(exchanger, "reference")


def tiny_pair(seed: int = 0) -> tuple[Flat, Flat]:
    return flat_view(random_layers(LINEN_SHAPES, seed)), flat_view(random_layers(LINEN_SHAPES, seed + 100))


def as_bools(mask: Mapping[str, Any]) -> dict[str, bool]:
    for name, value in mask.items():
        assert np.ndim(value) == 0, name
        assert np.asarray(value).dtype == np.bool_, name
    return {name: bool(value) for name, value in mask.items()}


def test_full_send_mask_is_every_layer_in_flatten_order():
    current, reference = tiny_pair()
    mask = FullParameterExchanger().send_mask(current, reference)
    assert list(mask) == TINY_NAMES
    assert as_bools(mask) == {name: True for name in TINY_NAMES}


def test_fixed_send_mask_lists_its_layers_first_in_list_order():
    current, reference = tiny_pair()
    layers = ["params/Dense_1/kernel", "params/Dense_0/bias"]
    mask = FixedLayerExchanger(layers).send_mask(current, reference)
    rest = [
        "batch_stats/BatchNorm_0/mean",
        "batch_stats/BatchNorm_0/var",
        "params/BatchNorm_0/bias",
        "params/BatchNorm_0/scale",
        "params/Dense_0/kernel",
        "params/Dense_1/bias",
    ]
    assert list(mask) == layers + rest
    assert as_bools(mask) == {**{name: True for name in layers}, **{name: False for name in rest}}


def test_fedbn_send_mask_keeps_batchnorm_layers():
    current, reference = tiny_pair()
    mask = LayerExchangerWithExclusions(TinyNet(), {nn.BatchNorm}, X).send_mask(current, reference)
    assert list(mask) == TINY_NAMES
    assert as_bools(mask) == {name: name not in TINY_BN for name in TINY_NAMES}


def numpy_drifts(current, reference, measure):
    drifts = {}
    for name in current:
        diff = np.asarray(current[name], np.float64) - np.asarray(reference[name], np.float64)
        norm = math.sqrt(float(np.sum(diff * diff)))
        drifts[name] = {"l2/size": norm / diff.size, "l2": norm, "rms": norm / math.sqrt(diff.size)}[measure]
    return drifts


@pytest.mark.parametrize("p, measure", [(0.5, "l2/size"), (0.25, "rms"), (0.75, "l2")])
def test_dynamic_percentage_send_mask_equals_numpy(p, measure):
    current, reference = tiny_pair(seed=3)
    drifts = numpy_drifts(current, reference, measure)
    count = math.ceil(len(TINY_NAMES) * p)
    top = sorted(TINY_NAMES, key=lambda name: -drifts[name])[:count]
    mask = DynamicLayerExchanger(percentage_rule(p, measure)).send_mask(current, reference)
    assert list(mask) == TINY_NAMES
    assert as_bools(mask) == {name: name in top for name in TINY_NAMES}
    assert sum(as_bools(mask).values()) == count


def test_dynamic_threshold_send_mask_equals_numpy():
    current, reference = tiny_pair(seed=4)
    drifts = numpy_drifts(current, reference, "l2/size")
    ordered = sorted(drifts.values())
    threshold = math.sqrt(ordered[3] * ordered[4])  # between the 4th and 5th smallest
    rule = LayerSelectionFunctionConstructor(threshold, 0.5).select_by_threshold()
    mask = DynamicLayerExchanger(rule).send_mask(current, reference)
    assert as_bools(mask) == {name: drifts[name] > threshold for name in TINY_NAMES}
    assert sum(as_bools(mask).values()) == 4


SPARSE_CURRENT = {
    "a": np.array([1.0, -2.0, 3.0, 0.5], np.float32),
    "b": np.array([[0.0, 4.0], [-1.0, 2.5]], np.float32),
    "c": np.array([0.0, 0.0], np.float32),
}
SPARSE_REFERENCE = {
    "a": np.array([1.0, 0.0, 0.0, 0.0], np.float32),
    "b": np.zeros((2, 2), np.float32),
    "c": np.array([5.0, -5.0], np.float32),
}
# |current - reference|: a [0, 2, 3, .5], b [[0, 4], [1, 2.5]], c [5, 5]; 10 weights.
SPARSE_CASES = {
    # k = 4: 5, 5, 4, 3 -> threshold 3; c's kept weights are all zero: c is not sent.
    0.4: {"a": [False, False, True, False], "b": [[False, True], [False, False]], "c": [False, False]},
    # k = 5: 5, 5, 4, 3, 2.5 -> threshold 2.5.
    0.5: {"a": [False, False, True, False], "b": [[False, True], [False, True]], "c": [False, False]},
}


@pytest.mark.parametrize("level", sorted(SPARSE_CASES))
def test_sparse_send_mask_hand_computed(level):
    exchanger = SparseCooParameterExchanger(level, jlx.largest_magnitude_change_scores)
    mask = exchanger.send_mask(flat_view(SPARSE_CURRENT), flat_view(SPARSE_REFERENCE))
    assert list(mask) == ["a", "b", "c"]
    for name, expected in SPARSE_CASES[level].items():
        value = np.asarray(mask[name])
        assert value.dtype == np.bool_ and value.shape == SPARSE_CURRENT[name].shape, name
        np.testing.assert_array_equal(value, np.array(expected), err_msg=name)
    # The packed path sends exactly those weights: values + indices + shapes + [names].
    payload = exchanger.push_parameters(SPARSE_CURRENT, initial_model=SPARSE_REFERENCE)
    k = (len(payload) - 1) // 3
    names = [str(n) for n in payload[-1].tolist()]
    assert names == ["a", "b"] and len(payload) == 3 * k + 1
    for i, name in enumerate(names):
        expected = np.array(SPARSE_CASES[level][name])
        np.testing.assert_array_equal(payload[2 * k + i], SPARSE_CURRENT[name].shape)
        np.testing.assert_array_equal(payload[k + i], np.argwhere(expected))
        np.testing.assert_array_equal(payload[i], SPARSE_CURRENT[name][expected])
    # The explicit push: the same weights as wire-neutral entries (ascending flat indices).
    entries, state = exchanger.push(SPARSE_CURRENT, exchanger.init_state(), SPARSE_REFERENCE)
    assert list(entries) == ["a", "b"]
    for name in entries:
        expected = np.array(SPARSE_CASES[level][name])
        np.testing.assert_array_equal(entries[name].indices, np.flatnonzero(expected))
        np.testing.assert_array_equal(entries[name].values, SPARSE_CURRENT[name][expected])
        assert entries[name].shape == SPARSE_CURRENT[name].shape and entries[name].quantized is None
    assert state == jlx.ExchangeState()  # no error feedback, no quantization: no state


@pytest.mark.parametrize("which", list(BUILTINS))
def test_send_mask_under_jit_vmap_equals_per_client(which):
    exchanger = BUILTINS[which][0]()
    clients = [tiny_pair(seed) for seed in range(3)]
    currents = Flat((n, jnp.stack([c[n] for c, _ in clients])) for n in TINY_NAMES)
    references = Flat((n, jnp.stack([r[n] for _, r in clients])) for n in TINY_NAMES)
    batched = jax.jit(jax.vmap(exchanger.send_mask))(currents, references)
    for client, (current, reference) in enumerate(clients):
        single = exchanger.send_mask(current, reference)
        assert list(batched) == list(single)
        for name, value in single.items():
            got = np.asarray(batched[name])
            assert got.dtype == np.bool_ and got.shape == (3, *np.shape(value)), name
            np.testing.assert_array_equal(got[client], np.asarray(value), err_msg=f"{name} client {client}")


# ---------------------------------------------------------------------------------------
# 2. check_exchanger names what is wrong
# ---------------------------------------------------------------------------------------


class OldStyle:
    """The protocol before the explicit state: send_mask and fl4health's method names only."""

    payload_kind = "named"
    error_feedback = False

    def send_mask(self, current, reference):
        return Flat((name, jnp.ones((), bool)) for name in current)

    def push_parameters(self, model, initial_model=None, config=None):
        return []

    def pull_parameters(self, parameters, model, config=None):
        return model


class NoPull(PlainProtocol):
    pull = None  # not callable


class NoPush(PlainProtocol):
    push = None


class DenseKind(PlainProtocol):
    payload_kind = "dense"


class IntFeedback(PlainProtocol):
    error_feedback = 1


class Fp8(PlainProtocol):
    quantize = "fp8"


class UpperInt8(PlainProtocol):
    quantize = "INT8"


class SendMaskOnly(jlx.ExchangerBase):
    """Everything from the base class, send_mask too: the base's raises NotImplementedError."""


@pytest.mark.parametrize(
    "candidate, pattern",
    [
        (object(), r"an exchanger needs a send_mask method; object has none"),
        (
            OldStyle(),
            r"needs a init_state method; OldStyle has none.*subclass jaxlayerx\.ExchangerBase and write send_mask",
        ),
        (NoPush(), r"an exchanger needs a push method; NoPush has none"),
        (NoPull(), r"an exchanger needs a pull method; NoPull has none"),
        (DenseKind(), r"payload_kind must be one of 'positional', 'named', 'sparse'; DenseKind has 'dense'"),
        (IntFeedback(), r"error_feedback must be True or False; IntFeedback has 1"),
        (Fp8(), r"quantize must be None, 'bf16' or 'int8'; Fp8 has 'fp8'"),
        (UpperInt8(), r"quantize must be None, 'bf16' or 'int8'; UpperInt8 has 'INT8'"),
    ],
    ids=["object", "old-style", "no-push", "no-pull", "dense-kind", "int-feedback", "fp8", "upper-int8"],
)
def test_check_exchanger_names_the_problem(candidate, pattern):
    with pytest.raises(TypeError, match=pattern):
        jlx.check_exchanger(candidate)


def test_protocol_isinstance_needs_every_member():
    assert not isinstance(object(), jlx.Exchanger)
    assert not isinstance(OldStyle(), jlx.Exchanger)  # no init_state, push, pull, quantize
    assert isinstance(PlainProtocol(), jlx.Exchanger)
    jlx.check_exchanger(PlainProtocol())
    for quantize in (None, "bf16", "int8"):
        candidate = PlainProtocol()
        candidate.quantize = quantize
        jlx.check_exchanger(candidate)
    # a subclass of ExchangerBase has every member, its send_mask included (the base's
    # raises until written: see test_simulation_refuses_an_exchanger_base_without_send_mask)
    assert isinstance(SendMaskOnly(), jlx.Exchanger)
    jlx.check_exchanger(SendMaskOnly())


class NoQuantize:
    """Every member of the protocol but quantize."""

    payload_kind = "named"
    error_feedback = False

    send_mask = PlainProtocol.send_mask
    init_state = PlainProtocol.init_state
    push = PlainProtocol.push
    pull = PlainProtocol.pull


def test_check_exchanger_refuses_an_exchanger_without_quantize():
    assert not isinstance(NoQuantize(), jlx.Exchanger)
    with pytest.raises(TypeError, match="quantize"):
        jlx.check_exchanger(NoQuantize())


# ---------------------------------------------------------------------------------------
# 3. User exchangers: the protocol, the simulation, the Flower client
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exchanger", [DriftedKernels(), HeadOnly(), HeadOnlyInt8()], ids=["named", "positional", "positional-int8"]
)
def test_user_exchangers_satisfy_the_protocol(exchanger):
    assert isinstance(exchanger, jlx.Exchanger)
    jlx.check_exchanger(exchanger)
    # what they did not write comes from ExchangerBase
    for method in ("init_state", "push", "pull", "push_parameters", "pull_parameters"):
        assert getattr(type(exchanger), method) is getattr(jlx.ExchangerBase, method), method
    assert exchanger.error_feedback is False
    assert exchanger.init_state() == jlx.ExchangeState()


CONFIG = SimulationConfig(rounds=2, local_steps=2, batch_size=8)


@pytest.fixture(scope="module")
def data():
    x, y = load_digits_data()
    return make_client_data(x[:400], y[:400], num_clients=3, beta=0.5, seed=0)


def run_two_rounds(exchanger, data):
    simulation = Simulation(exchanger, CONFIG, data)
    records, outputs = zip(*simulation.iterate())
    return simulation, records, outputs


@pytest.fixture(scope="module")
def named_run(data):
    return run_two_rounds(DriftedKernels("*/kernel", threshold=0.2), data)


@pytest.fixture(scope="module")
def positional_run(data):
    return run_two_rounds(HeadOnly("Dense_2"), data)


def client_model(layers, client, like):
    return jlx.unflatten({name: np.asarray(value[client]) for name, value in layers.items()}, like=like)


HEAD = ["params/Dense_2/kernel", "params/Dense_2/bias"]  # HeadOnly's order: kernel first


def test_simulation_layer_names_are_the_mlps(named_run):
    simulation, _, _ = named_run
    assert simulation.layer_names == MLP_NAMES
    assert list(jlx.flatten(simulation.initial_variables)) == MLP_NAMES
    assert simulation.label == "DriftedKernels"


@pytest.mark.parametrize("run", ["named_run", "positional_run"])
def test_simulation_runs_user_exchanger_as_a_packed_replay(run, request, data, monkeypatch):
    """Both rounds replayed client by client through the exchanger's own shells
    (push_parameters/pull_parameters) and FedAvgDynamicLayer over named payloads: starts,
    selections, global models, and the bytes of every message on both Flower routes."""
    simulation, records, outputs = request.getfixturevalue(run)
    exchanger = simulation.exchanger
    pulls = count_pulls(exchanger, monkeypatch)
    named = exchanger.payload_kind == "named"
    like = simulation.initial_variables
    initial = {name: np.asarray(value) for name, value in jlx.flatten(like).items()}
    counts = [int(n) for n in data.n_train]
    clients = data.num_clients

    server_payload = None  # round 1: every client starts from the whole initial model
    changed: dict[str, np.ndarray] = {}  # what the server changed in the round before
    global_model = like
    sent_per_round = []
    for round_index, (record, output) in enumerate(zip(records, outputs), start=1):
        results, sent_names, upload_legacy, upload_message = [], [], [], []
        for client in range(clients):
            if round_index == 1:
                start = like
            else:
                own = client_model(outputs[round_index - 2].trained_layers, client, like)
                start = exchanger.pull_parameters(server_payload, own)
            for name, value in jlx.flatten(start).items():
                np.testing.assert_array_equal(
                    np.asarray(value), np.asarray(output.start_layers[name][client]), err_msg=f"start {name}"
                )
            trained = client_model(output.trained_layers, client, like)
            pushed = exchanger.push_parameters(trained, initial_model=start)
            if named:
                names, arrays = unpack_by_hand(pushed)
            else:
                names, arrays = HEAD, list(pushed)
                mask = exchanger.send_mask(jlx.flatten(trained), jlx.flatten(start))
                assert [name for name, sends in mask.items() if bool(sends)] == HEAD
            # What the client sent is what the round's mask marked.
            marked = {name for name, mask in output.send_masks.items() if bool(mask[client])}
            assert set(names) == marked
            assert record["layers_sent"][client] == len(names)
            sent_names.append(names)
            results.append((pack_by_hand(arrays, names), counts[client]))
            # its bytes: the legacy route sends the layers named (numpy.save blobs), the
            # Message API the compact layout in one ArrayRecord
            upload_legacy.append(sum(npy_size(a) for a in pack_by_hand(arrays, names)))
            upload_message.append(compact_whole_layers_bytes(dict(zip(names, arrays))))

        averaged = jlx.FedAvgDynamicLayer(weighted_aggregation=True).aggregate(results)
        assert set(averaged) == set().union(*map(set, sent_names))
        replayed = jlx.flatten(jlx.merge_layers(global_model, averaged))
        for name, value in replayed.items():
            np.testing.assert_allclose(
                np.asarray(output.state.global_layers[name]), np.asarray(value), rtol=1e-6, atol=1e-7, err_msg=name
            )
        # Layers nobody sent keep their previous global value, exactly.
        previous = jlx.flatten(global_model)
        for name in MLP_NAMES:
            if name not in averaged:
                np.testing.assert_array_equal(
                    np.asarray(output.state.global_layers[name]), np.asarray(previous[name]), err_msg=name
                )

        # Bytes, Message API (the records) and legacy (recomputed for that wire).
        legacy_upload, legacy_download = simulation.message_bytes(jax.device_get(output.metrics), LEGACY)
        assert record["client_upload_bytes"] == upload_message
        assert record["upload_bytes"] == sum(upload_message)
        assert legacy_upload == upload_legacy
        if round_index == 1:  # the whole model: compact, or positional (unnamed) on the legacy route
            assert record["client_download_bytes"] == [compact_whole_layers_bytes(initial)] * clients
            assert legacy_download == [sum(npy_size(v) for v in initial.values())] * clients
        else:  # the layers the server changed in round 1, named
            assert record["client_download_bytes"] == [compact_whole_layers_bytes(changed)] * clients
            named_changed = pack_by_hand(list(changed.values()), list(changed))
            assert legacy_download == [sum(npy_size(a) for a in named_changed)] * clients
        assert record["download_bytes"] == sum(record["client_download_bytes"])

        # The server's answer: the averaged layers, at the simulation's own global values,
        # in the exchanger's layout (named, or its own layers in its order).
        changed = {name: np.asarray(output.state.global_layers[name]) for name in sorted(averaged)}
        if named:
            server_payload = pack_by_hand(list(changed.values()), list(changed))
        else:
            assert list(averaged) == sorted(HEAD)
            server_payload = [changed[name] for name in HEAD]
        global_model = jlx.unflatten(output.state.global_layers, like=like)
        sent_per_round.append(sent_names)
        if round_index == 1:
            round_one_changed = list(changed)

    flat = [name for round_names in sent_per_round for names in round_names for name in names]
    if named:
        # A real selection: only kernels, some sent, not all of them by everyone.
        assert flat and all(name.endswith("/kernel") for name in flat)
        assert len(flat) < 3 * clients * len(records)
    else:
        assert all(names == HEAD for round_names in sent_per_round for names in round_names)
    # the replay's round-2 pulls went through the exchanger's pull (ExchangerBase's shell)
    assert len(pulls) == clients and all(first is False for _, first in pulls)
    assert all(names == (round_one_changed if named else HEAD) for names, _ in pulls)


def test_simulation_positional_user_exchanger_keeps_other_layers_local(positional_run):
    simulation, _, (first, second) = positional_run
    for name in MLP_NAMES:
        for client in range(3):
            start = np.asarray(second.start_layers[name][client])
            if name in HEAD:
                np.testing.assert_array_equal(start, np.asarray(first.state.global_layers[name]))
            else:
                np.testing.assert_array_equal(start, np.asarray(first.trained_layers[name][client]))


def test_simulation_runs_a_quantized_user_exchanger(data):
    # Round 1: every client starts from the initial model and sends HeadOnly's two layers
    # as int8 updates over it; the server averages what it rebuilds, initial + q * scale
    # (weighted by examples), and keeps every other layer.
    simulation = Simulation(HeadOnlyInt8("Dense_2"), SimulationConfig(rounds=1, local_steps=2, batch_size=8), data)
    assert simulation.label == "HeadOnlyInt8"
    [(record, output)] = list(simulation.iterate())
    initial = {name: np.asarray(value) for name, value in jlx.flatten(simulation.initial_variables).items()}
    counts = np.asarray(data.n_train, np.float64)
    for name in MLP_NAMES:
        got = np.asarray(output.state.global_layers[name])
        if name not in HEAD:
            np.testing.assert_array_equal(got, initial[name], err_msg=name)
            continue
        rebuilt, plain = [], []
        for client in range(data.num_clients):
            trained = np.asarray(output.trained_layers[name][client])
            q, scale = ref_quantize(trained - initial[name], "int8")
            rebuilt.append(initial[name].astype(np.float64) + q.astype(np.float64) * np.float64(scale))
            plain.append(trained.astype(np.float64))
        expected = np.tensordot(counts, np.stack(rebuilt), axes=1) / counts.sum()
        unquantized = np.tensordot(counts, np.stack(plain), axes=1) / counts.sum()
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7, err_msg=name)
        assert np.max(np.abs(got - unquantized)) > 1e-6, name  # the quantization is real
    # each reply: two int8 layers and their scales, compact (conftest's hand-written layout)
    head_shapes = {name: initial[name].shape for name in HEAD}
    reply = ref_compact_encode(
        {
            name: RefLayer(np.zeros(math.prod(shape), np.int8), None, shape, form=2, scale=1.0)
            for name, shape in head_shapes.items()
        }
    )
    assert record["client_upload_bytes"] == [record_bytes(reply)] * data.num_clients
    assert record["layers_sent"] == [2] * data.num_clients


def shifting_train_fn(deltas, record):
    def train_fn(model, config):
        received = ref_flat(model)
        record.append(received)
        trained = {name: value + np.float32(deltas.get(name, 0.0)) for name, value in received.items()}
        return nest(trained), 7, {"seen": 1}

    return train_fn


def test_flower_client_runs_a_named_user_exchanger(monkeypatch):
    pytest.importorskip("flwr")
    from jaxlayerx.flower import ExchangerClient

    deltas = {"params/Dense_0/kernel": 1.0, "params/Dense_1/kernel": 1e-4, "params/Dense_0/bias": 1.0}
    record: list = []
    exchanger = DriftedKernels("*/kernel", threshold=0.01)
    pulls = count_pulls(exchanger, monkeypatch)
    client = ExchangerClient(tiny_variables(), exchanger, shifting_train_fn(deltas, record))

    # the first message: the whole model, unnamed, in the model's (flatten) order
    first = random_layers(LINEN_SHAPES, seed=1, offset=5.0)
    payload, num_examples, metrics = client.fit([first[n] for n in TINY_NAMES], {})
    assert_layers_equal(record[0], first)  # the whole first payload was applied
    assert pulls == [(TINY_NAMES, True)]  # through the exchanger's pull, as the first
    # Dense_0/kernel moved by sqrt(12) > 0.01; Dense_1/kernel by 1e-4 * sqrt(6) < 0.01;
    # Dense_0/bias moved but is not a kernel.
    names, arrays = unpack_by_hand(payload)
    assert names == ["params/Dense_0/kernel"]
    np.testing.assert_array_equal(arrays[0], first["params/Dense_0/kernel"] + np.float32(1.0))
    assert num_examples == 7
    assert metrics["seen"] == 1 and metrics["layers_sent"] == 1
    # numpy.save blobs: a (4, 3) float32 array and the names array
    assert metrics["payload_bytes"] == npy_size(np.zeros((4, 3), F32)) + npy_size(np.array(names))
    assert metrics["payload_bytes"] == sum(npy_size(a) for a in payload)

    trained = {name: value + np.float32(deltas.get(name, 0.0)) for name, value in first.items()}
    new = random_layers(LINEN_SHAPES, seed=2, offset=-5.0)
    partial = ["params/Dense_1/kernel", "batch_stats/BatchNorm_0/mean"]
    payload, _, metrics = client.fit(pack_by_hand([new[n] for n in partial], partial), {})
    expected = {name: (new[name] if name in partial else trained[name]) for name in TINY_NAMES}
    assert_layers_equal(record[1], expected)  # exactly the named layers applied, the rest kept
    assert pulls == [(TINY_NAMES, True), (partial, False)]
    names, arrays = unpack_by_hand(payload)
    assert names == ["params/Dense_0/kernel"]
    np.testing.assert_array_equal(arrays[0], expected["params/Dense_0/kernel"] + np.float32(1.0))
    assert metrics["layers_sent"] == 1


def test_flower_client_runs_a_positional_user_exchanger(monkeypatch):
    pytest.importorskip("flwr")
    from jaxlayerx.flower import ExchangerClient

    head = ["params/Dense_1/kernel", "params/Dense_1/bias"]  # HeadOnly("Dense_1")'s order
    deltas = {name: 0.5 for name in TINY_NAMES}
    record: list = []
    exchanger = HeadOnly("Dense_1")
    pulls = count_pulls(exchanger, monkeypatch)
    client = ExchangerClient(tiny_variables(), exchanger, shifting_train_fn(deltas, record))

    first = random_layers(LINEN_SHAPES, seed=3)
    payload, _, metrics = client.fit([first[n] for n in TINY_NAMES], {})
    assert_layers_equal(record[0], first)  # the first payload is applied whole, BN included
    assert pulls == [(TINY_NAMES, True)]
    trained = {name: value + np.float32(0.5) for name, value in first.items()}
    # The pushes go out named with the mask's True names, in the mask's order.
    names, arrays = unpack_by_hand(payload)
    assert names == head
    for name, array in zip(names, arrays):
        np.testing.assert_array_equal(array, trained[name], err_msg=name)
    assert metrics["layers_sent"] == 2
    assert metrics["payload_bytes"] == npy_size(np.zeros((3, 2), F32)) + npy_size(np.zeros(2, F32)) + npy_size(
        np.array(head)
    )

    # A later named payload: only the head is applied; the rest stays local.
    new = random_layers(LINEN_SHAPES, seed=4, offset=3.0)
    partial = ["params/Dense_0/kernel", "params/Dense_1/kernel", "batch_stats/BatchNorm_0/var"]
    payload, _, _ = client.fit(pack_by_hand([new[n] for n in partial], partial), {})
    expected = {name: (new[name] if name == "params/Dense_1/kernel" else trained[name]) for name in TINY_NAMES}
    assert_layers_equal(record[1], expected)
    names, arrays = unpack_by_hand(payload)
    assert names == head
    for name, array in zip(names, arrays):
        np.testing.assert_array_equal(array, expected[name] + np.float32(0.5), err_msg=name)
    assert pulls[1] == (partial, False)  # offered every named layer; its pull keeps its own

    # An unnamed payload (a plain FedAvg server): the exchanger's layers, in its order.
    trained = {name: value + np.float32(0.5) for name, value in expected.items()}
    unnamed = [np.full((3, 2), 7.0, np.float32), np.full((2,), -7.0, np.float32)]
    client.fit(unnamed, {})
    expected = {**trained, head[0]: unnamed[0], head[1]: unnamed[1]}
    assert_layers_equal(record[2], expected)
    assert pulls[2] == (head, False)
    assert len(pulls) == 3


def test_flower_client_runs_a_quantized_user_exchanger():
    pytest.importorskip("flwr")
    from jaxlayerx.flower import ExchangerClient

    # Server values multiples of 1/16, updates multiples of 1/16 with largest |u| = 0.5 in
    # each layer: exact in float32, so u is exactly the delta (and max/127 exact either way).
    head = ["params/Dense_1/kernel", "params/Dense_1/bias"]
    rng = np.random.default_rng(7)
    first = {name: (rng.integers(-32, 33, shape) / 16).astype(F32) for name, shape in LINEN_SHAPES.items()}
    deltas = {name: (rng.integers(-7, 8, shape) / 16).astype(F32) for name, shape in LINEN_SHAPES.items()}
    for delta in deltas.values():
        delta.flat[0] = 0.5

    def train_fn(model, config):
        return nest({n: v + deltas[n] for n, v in ref_flat(model).items()}), 3, {}

    client = ExchangerClient(tiny_variables(), HeadOnlyInt8("Dense_1"), train_fn)
    payload, _, metrics = client.fit([first[n] for n in TINY_NAMES], {})
    # a quantized upload travels compact: header, int8 values, scales (read by hand)
    decoded = ref_compact_decode(dict(zip(["header", "values0", "scales"], payload, strict=True)))
    assert list(decoded) == head
    for name in head:
        q, scale = ref_quantize(deltas[name], "int8")
        layer = decoded[name]
        assert layer.form == 2 and layer.flat is None and layer.shape == LINEN_SHAPES[name]
        np.testing.assert_array_equal(layer.values, q.reshape(-1))
        assert layer.values.dtype == np.int8
        assert F32(layer.scale) == scale == F32(0.5) / F32(127)
    assert metrics["layers_sent"] == 2
    assert metrics["payload_bytes"] == sum(npy_size(a) for a in payload)
    # the client keeps the values it pulled as the base of its next update
    assert_layers_equal(client.state.exchange.reference, first)


# ---------------------------------------------------------------------------------------
# 4. The simulation refuses exchangers whose send_mask does not fit the model
# ---------------------------------------------------------------------------------------


class BadMask(jlx.ExchangerBase):
    """An exchanger whose send_mask is ``make(current)``."""

    payload_kind = "named"

    def __init__(self, make):
        self.make = make

    def send_mask(self, current, reference):
        return self.make(current)


def float_mask(current):
    return Flat((name, jnp.ones((), jnp.float32)) for name in current)


def wrong_shape(current):
    return Flat(
        (name, jnp.ones((1,) if name == "params/Dense_1/kernel" else np.shape(value), bool))
        for name, value in current.items()
    )


def missing_layer(current):
    return Flat((name, jnp.ones((), bool)) for name in current if name != "params/Dense_2/bias")


def unknown_name(current):
    return Flat([*((name, jnp.ones((), bool)) for name in current), ("params/Dense_9/kernel", jnp.ones((), bool))])


def not_a_mapping(current):
    return [jnp.ones((), bool) for _ in current]


@pytest.mark.parametrize(
    "make, error, pattern",
    [
        (float_mask, TypeError, r"BadMask\.send_mask: layer 'batch_stats/BatchNorm_0/mean'.*float32.*bool"),
        (wrong_shape, ValueError, r"BadMask\.send_mask: layer 'params/Dense_1/kernel'.*\(1,\).*\(64, 64\)"),
        (missing_layer, KeyError, r"'params/Dense_2/bias' is not in the send mask of BadMask"),
        (unknown_name, KeyError, r"'params/Dense_9/kernel'.*BadMask\.send_mask"),
        (not_a_mapping, TypeError, r"BadMask\.send_mask must return a name -> bool mapping, got list"),
    ],
    ids=["float", "wrong-shape", "missing", "unknown", "not-mapping"],
)
def test_simulation_refuses_bad_masks(make, error, pattern, data):
    with pytest.raises(error, match=pattern):
        Simulation(BadMask(make), CONFIG, data)


def test_simulation_refuses_a_dynamic_exchanger_without_mask_form(data):
    def plain(model, initial_model):
        return [], []

    with pytest.raises(TypeError, match="mask"):
        Simulation(DynamicLayerExchanger(plain), CONFIG, data)


def test_simulation_refuses_an_exchanger_base_without_send_mask(data):
    with pytest.raises(NotImplementedError, match=r"SendMaskOnly must define send_mask\(current, reference\)"):
        Simulation(SendMaskOnly(), CONFIG, data)


def test_simulation_refuses_objects_failing_the_protocol(data):
    with pytest.raises(TypeError, match=r"needs a pull method; NoPull has none"):
        Simulation(NoPull(), CONFIG, data)
    with pytest.raises(TypeError, match=r"needs a init_state method; OldStyle has none"):
        Simulation(OldStyle(), CONFIG, data)
    with pytest.raises(TypeError, match=r"payload_kind.*DenseKind"):
        Simulation(DenseKind(), CONFIG, data)
    with pytest.raises(TypeError, match=r"quantize.*Fp8 has 'fp8'"):
        Simulation(Fp8(), CONFIG, data)


def test_flower_client_refuses_bad_exchangers_and_runs_sparse_ones():
    pytest.importorskip("flwr")
    from jaxlayerx.flower import ExchangerClient

    def train(model, config):
        return model, 1, {}

    with pytest.raises(TypeError, match=r"needs a pull method; NoPull has none"):
        ExchangerClient(tiny_variables(), NoPull(), train)
    with pytest.raises(TypeError, match=r"needs a init_state method; OldStyle has none"):
        ExchangerClient(tiny_variables(), OldStyle(), train)
    with pytest.raises(TypeError, match=r"quantize.*UpperInt8 has 'INT8'"):
        ExchangerClient(tiny_variables(), UpperInt8(), train)
    # sparse COO exchange runs on Flower (FedAvgSparseCooTensorStrategy; tests/test_flower_client.py)
    sparse = ExchangerClient(
        tiny_variables(), SparseCooParameterExchanger(0.1, jlx.largest_magnitude_change_scores), train
    )
    assert sparse.exchanger.payload_kind == "sparse"
    # and so does an exchanger with no base class, through the protocol's members alone
    plain = ExchangerClient(tiny_variables(), PlainProtocol(), train)
    layers = random_layers(LINEN_SHAPES, seed=9)
    payload, _, metrics = plain.fit([layers[n] for n in TINY_NAMES], {})
    assert unpack_by_hand(payload) == ([], [])
    assert metrics["layers_sent"] == 0
    assert_layers_equal(jlx.flatten(plain.model), layers)


# ---------------------------------------------------------------------------------------
# 5. Labels
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, label",
    [
        (ExchangerSpec("dynamic-budget", byte_fraction=0.25, error_feedback=True), "dynamic-budget(0.25, ef)"),
        (ExchangerSpec("dynamic-percentage", exchange_percentage=0.5, measure="rms"), "dynamic-percentage(0.5, rms)"),
        (ExchangerSpec("full"), "full"),
        (ExchangerSpec("sparse-largest-magnitude-change", sparsity_level=0.1), "sparse-largest-magnitude-change(0.1)"),
        (ExchangerSpec("full", quantize="int8"), "full(int8)"),
        (ExchangerSpec("exclude-bn", error_feedback=True, quantize="bf16"), "exclude-bn(ef, bf16)"),
        (
            ExchangerSpec("sparse-largest-magnitude-change", sparsity_level=0.1, error_feedback=True, quantize="int8"),
            "sparse-largest-magnitude-change(0.1, ef, int8)",
        ),
    ],
    ids=["budget-ef", "percentage-rms", "full", "sparse", "full-int8", "exclude-bn-ef-bf16", "sparse-ef-int8"],
)
def test_simulation_label_of_a_spec(spec, label, data):
    assert spec.label == label
    simulation = Simulation(spec, CONFIG, data)
    assert simulation.label == label
    assert simulation.exchanger.quantize == spec.quantize
    assert simulation.exchanger.error_feedback is spec.error_feedback
    assert Simulation(spec, CONFIG, data, label="mine").label == "mine"


def test_spec_error_feedback_on_a_fixed_kind_needs_quantization():
    with pytest.raises(ValueError, match="error feedback needs a dynamic or sparse exchanger, or quantization"):
        ExchangerSpec("full", error_feedback=True)
    with pytest.raises(ValueError, match="quantize must be None, 'bf16' or 'int8'"):
        ExchangerSpec("full", quantize="fp16")


def test_simulation_label_of_a_user_exchanger(data):
    assert Simulation(HeadOnly(), CONFIG, data).label == "HeadOnly"
    assert Simulation(DriftedKernels(), CONFIG, data, label="kernels>0.2").label == "kernels>0.2"
