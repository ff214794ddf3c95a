"""Tests of the parameter exchangers (jaxlayerx/exchangers.py) and module typing (jaxlayerx/modules.py).

Every test compares the library with small, independent references written here:
``ref_flat`` (a flat ``name -> numpy array`` view built directly on ``jax.tree_util`` and
``nnx.state``), plain-numpy drift norms, and hand-written lists of layer names.
"""

from __future__ import annotations

import io
import math
import re
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import bits, ref_flat, ref_name
from flax import nnx
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import jaxlayerx
from jaxlayerx import (
    DynamicLayerExchanger,
    FixedLayerExchanger,
    FullParameterExchanger,
    LayerExchangerWithExclusions,
    LayerSelectionFunctionConstructor,
)
from jaxlayerx.modules import linen_module_types, nnx_module_types, pytree_node_types

BF16 = jnp.bfloat16
KINDS = ["linen", "nnx", "plain"]


# ---------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------


class Block(nn.Module):
    """Nested Linen module: Dense + BatchNorm (auto-named Dense_0 / BatchNorm_0)."""

    features: int = 4

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.features)(x)
        x = nn.BatchNorm(use_running_average=True)(x)
        return nn.relu(x)


class LinenNet(nn.Module):
    """Linen model: a Dense defined in setup and called twice (shared), a nested Block, a BN."""

    def setup(self):
        self.shared = nn.Dense(4)
        self.block = Block()
        self.bn = nn.BatchNorm(use_running_average=True)
        self.head = nn.Dense(2)

    def __call__(self, x):
        x = self.shared(x)
        x = self.block(x)
        x = self.shared(x)  # the same Dense a second time: its params exist once
        x = self.bn(x)
        return self.head(x)


class LinenPrefix(nn.Module):
    """Linen model where a BatchNorm 'bn1' is a string prefix of a Dense 'bn10'."""

    def setup(self):
        self.bn1 = nn.BatchNorm(use_running_average=True)
        self.bn10 = nn.Dense(3)

    def __call__(self, x):
        return self.bn10(self.bn1(x))


# Linen module names (path segments) of BatchNorm modules in LinenNet, read off the code above.
LINEN_BN_SEGMENTS = {"BatchNorm_0", "bn"}
X = jnp.asarray(np.random.default_rng(123).standard_normal((2, 4)), jnp.float32)


class Sub(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(3, 3, rngs=rngs)
        self.norm = nnx.BatchNorm(3, rngs=rngs)


class NNXNet(nnx.Module):
    """NNX model: Linear, BatchNorm, nested BatchNorm, nnx.List, and a tied submodule."""

    def __init__(self, rngs):
        self.fc1 = nnx.Linear(4, 3, rngs=rngs)
        self.bn1 = nnx.BatchNorm(3, rngs=rngs)
        self.sub = Sub(rngs)
        self.layers = nnx.List([nnx.Linear(3, 3, rngs=rngs), nnx.Linear(3, 2, rngs=rngs)])
        self.tied = self.fc1  # shared submodule: its variables live once, under 'fc1'


# Layer-name prefixes of BatchNorm modules in NNXNet, read off the code above.
NNX_BN_PREFIXES = ("bn1/", "sub/norm/")


class NNXPrefix(nnx.Module):
    def __init__(self, rngs):
        self.bn1 = nnx.BatchNorm(3, rngs=rngs)
        self.bn10 = nnx.Linear(3, 3, rngs=rngs)


class BF16Net(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(4, 3, param_dtype=BF16, dtype=BF16, rngs=rngs)
        self.bn = nnx.BatchNorm(3, param_dtype=BF16, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(3, 2, param_dtype=BF16, rngs=rngs)])


def plain_template() -> dict:
    return {
        "enc": {"w": np.zeros((3, 4), np.float32), "b": np.zeros((4,), np.float32)},
        "dec": {"w": np.zeros((4, 2), np.float32), "b": np.zeros((2,), np.float32)},
        "norm": {"scale": np.zeros((2,), np.float32), "step": np.zeros((), np.int32)},
    }


_LINEN_TEMPLATE = None


def linen_template():
    global _LINEN_TEMPLATE
    if _LINEN_TEMPLATE is None:
        _LINEN_TEMPLATE = LinenNet().init(jax.random.key(0), X)
    return _LINEN_TEMPLATE


def _rand_like(a, rng):
    a = np.asarray(a)
    if np.issubdtype(a.dtype, np.integer):
        return rng.integers(-100000, 100000, size=a.shape).astype(a.dtype)
    return rng.standard_normal(a.shape).astype(a.dtype)


def make(kind: str, seed: int):
    """A model of ``kind`` whose every layer holds distinct random values (BN stats too)."""
    rng = np.random.default_rng(seed)
    if kind == "linen":
        return jax.tree.map(lambda a: jnp.asarray(_rand_like(a, rng)), linen_template())
    if kind == "nnx":
        m = NNXNet(nnx.Rngs(seed))
        nnx.update(m, jax.tree.map(lambda a: jnp.asarray(_rand_like(a, rng)), nnx.state(m)))
        return m
    if kind == "plain":
        return jax.tree.map(lambda a: _rand_like(a, rng), plain_template())
    if kind == "bf16_nnx":
        m = BF16Net(nnx.Rngs(seed))
        nnx.update(m, jax.tree.map(lambda a: jnp.asarray(_rand_like(a, rng)), nnx.state(m)))
        return m
    if kind == "bf16_plain":
        tree = {
            "a": {"w": rng.standard_normal((3, 4)).astype(BF16), "b": rng.standard_normal(4).astype(BF16)},
            "z": rng.standard_normal((5,)).astype(np.float32),
        }
        # awkward bit patterns: -0.0, a subnormal, +/-inf, the smallest normal, max
        tree["a"]["b"] = np.array([-0.0, 1e-40, np.inf, -np.inf], dtype=BF16)
        # bit patterns: smallest normal, max, -max, 3.140625
        tree["a"]["w"][0, :] = np.array([0x0080, 0x7F7F, 0xFF7F, 0x4049], dtype=np.uint16).view(BF16)
        return tree
    raise AssertionError(kind)


# ---------------------------------------------------------------------------------------
# Independent references
# ---------------------------------------------------------------------------------------


def assert_arrays_identical(got, want, what=""):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert np.array_equal(bits(got), bits(want)), f"{what}: values differ"


def assert_flat_equal(got: dict, want: dict):
    assert list(got) == list(want)
    for name in want:
        assert_arrays_identical(got[name], want[name], name)


def snapshot_payload(payload):
    return [np.array(a, copy=True) for a in payload]


def assert_payload_unchanged(payload, snap):
    assert len(payload) == len(snap)
    for got, want in zip(payload, snap):
        assert_arrays_identical(got, want)


def check_pulled(kind_model_in, before_in: dict, result, expected: dict):
    """The result of a pull holds ``expected``; a pytree input is untouched, an nnx one is ``result``."""
    if isinstance(kind_model_in, nnx.Module):
        assert result is kind_model_in
    else:
        assert result is not kind_model_in
        assert_flat_equal(ref_flat(kind_model_in), before_in)
    assert_flat_equal(ref_flat(result), expected)


def copy_model(model):
    if isinstance(model, nnx.Module):
        return nnx.clone(model)
    return jax.tree.map(lambda a: np.array(a, copy=True) if isinstance(a, np.ndarray) else a, model)


def set_layer(model, name: str, value):
    """Sets one layer by walking the model by hand (dict keys / attributes / list indices)."""
    parts = name.split("/")
    if isinstance(model, nnx.Module):
        obj = model
        for p in parts[:-1]:
            obj = obj[int(p)] if p.isdigit() else getattr(obj, p)
        var = getattr(obj, parts[-1])
        var[...] = jnp.asarray(value, dtype=var.get_value().dtype)
        return
    obj = model
    for p in parts[:-1]:
        obj = obj[p]
    old = obj[parts[-1]]
    obj[parts[-1]] = (
        np.asarray(value, dtype=old.dtype) if isinstance(old, np.ndarray) else jnp.asarray(value, old.dtype)
    )


def ref_drifts(current: dict, initial: dict, normalize: bool) -> dict[str, float]:
    out = {}
    for name in current:
        diff = current[name].astype(np.float32) - initial[name].astype(np.float32)
        norm = float(np.sqrt(np.sum(np.square(diff.astype(np.float64)))))
        out[name] = norm / max(diff.size, 1) if normalize else norm
    return out


def ref_percentage(drifts: dict[str, float], pct: float, more: bool) -> list[str]:
    names = list(drifts)
    k = math.ceil(len(names) * pct)
    order = sorted(range(len(names)), key=lambda i: ((-drifts[names[i]]) if more else drifts[names[i]], i))
    chosen = sorted(order[:k])
    return [names[i] for i in chosen]


# Per-kind layer choices (names follow from the model definitions above).
CHOSEN = {
    "linen": ["params/head/kernel", "batch_stats/bn/mean", "params/block/Dense_0/bias"],
    "nnx": ["sub/norm/var", "fc1/kernel", "layers/1/bias"],
    "plain": ["norm/step", "enc/w", "dec/b"],
}
MISSPELLED = {  # (misspelled, a valid name that must be suggested)
    "linen": ("params/head/kernal", "params/head/kernel"),
    "nnx": ("fc1/kernl", "fc1/kernel"),
    "plain": ("enc/ww", "enc/w"),
}
DRIFTING = {  # two layers that drift in the dynamic tests: (name, added constant)
    "linen": [("params/head/kernel", 3.0), ("batch_stats/block/BatchNorm_0/mean", 1.0)],
    "nnx": [("sub/lin/kernel", 3.0), ("layers/1/bias", 1.0)],
    "plain": [("dec/w", 3.0), ("enc/b", 1.0)],
}
FLOAT32_LAYER = {"linen": "params/shared/kernel", "nnx": "layers/0/kernel", "plain": "enc/w"}


def test_reference_flat_view_matches_library_flatten():
    # Cross-check: the reference names/order are those of jaxlayerx.flatten, so the
    # comparisons below speak about the same layers.
    for kind in KINDS:
        m = make(kind, 0)
        lib = jaxlayerx.flatten(m)
        ref = ref_flat(m)
        assert list(lib) == list(ref)
        for name in ref:
            assert_arrays_identical(np.asarray(lib[name]), ref[name], name)
    names = list(ref_flat(make("nnx", 0)))
    assert not any(n.startswith("tied/") for n in names)  # tied submodule: once, under fc1
    assert "layers/0/kernel" in names and "sub/norm/mean" in names


# ---------------------------------------------------------------------------------------
# FullParameterExchanger
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_full_push_is_flatten_order_as_numpy(kind):
    a = make(kind, 1)
    ref = ref_flat(a)
    flat = jaxlayerx.flatten(a)
    payload = FullParameterExchanger().push_parameters(a)
    assert isinstance(payload, list)
    assert len(payload) == len(ref) == len(flat)
    for arr, (name, want), lib_value in zip(payload, ref.items(), flat.values()):
        assert type(arr) is np.ndarray, name
        assert_arrays_identical(arr, want, name)
        assert_arrays_identical(arr, np.asarray(lib_value), name)


@pytest.mark.parametrize("kind", KINDS)
def test_full_round_trip(kind):
    a, b = make(kind, 1), make(kind, 2)
    want = ref_flat(a)
    b_before = ref_flat(b)
    assert any(not np.array_equal(want[n], b_before[n]) for n in want)
    ex = FullParameterExchanger()
    result = ex.pull_parameters(ex.push_parameters(a), b)
    check_pulled(b, b_before, result, want)
    assert_flat_equal(ref_flat(a), want)  # the sender is untouched too


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("change", ["missing", "extra"])
def test_full_wrong_count_is_value_error_and_changes_nothing(kind, change):
    a, b = make(kind, 1), make(kind, 2)
    b_before = ref_flat(b)
    n = len(b_before)
    payload = FullParameterExchanger().push_parameters(a)
    payload = payload[:-1] if change == "missing" else payload + [np.zeros(3, np.float32)]
    snap = snapshot_payload(payload)
    with pytest.raises(ValueError, match=rf"expected {n} arrays.*got {len(payload)}"):
        FullParameterExchanger().pull_parameters(payload, b)
    assert_flat_equal(ref_flat(b), b_before)
    assert_payload_unchanged(payload, snap)


@pytest.mark.parametrize("kind", KINDS)
def test_full_wrong_shape_in_last_array_changes_nothing(kind):
    a, b = make(kind, 1), make(kind, 2)
    b_before = ref_flat(b)
    last = list(b_before)[-1]
    payload = FullParameterExchanger().push_parameters(a)
    payload[-1] = np.zeros(payload[-1].shape + (2,), payload[-1].dtype)
    with pytest.raises(ValueError, match=re.escape(repr(last))):
        FullParameterExchanger().pull_parameters(payload, b)
    assert_flat_equal(ref_flat(b), b_before)


# ---------------------------------------------------------------------------------------
# FixedLayerExchanger
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_fixed_push_is_listed_layers_in_list_order(kind):
    a = make(kind, 1)
    ref = ref_flat(a)
    names = CHOSEN[kind]
    assert [n for n in ref if n in names] != names  # the list is not in flatten order
    ex = FixedLayerExchanger(names)
    for payload in (ex.push_parameters(a), ex.apply_layer_filter(a)):
        assert len(payload) == len(names)
        for arr, name in zip(payload, names):
            assert type(arr) is np.ndarray
            assert_arrays_identical(arr, ref[name], name)


@pytest.mark.parametrize("kind", KINDS)
def test_fixed_round_trip_moves_exactly_the_listed_layers(kind):
    a, b = make(kind, 1), make(kind, 2)
    a_flat, b_before = ref_flat(a), ref_flat(b)
    names = CHOSEN[kind]
    ex = FixedLayerExchanger(names)
    result = ex.pull_parameters(ex.push_parameters(a), b)
    expected = {n: (a_flat[n] if n in names else b_before[n]) for n in b_before}
    # sanity: the test can see a difference on every listed layer
    assert all(not np.array_equal(a_flat[n], b_before[n]) for n in names)
    check_pulled(b, b_before, result, expected)


@pytest.mark.parametrize("kind", KINDS)
def test_fixed_unknown_name_at_push_lists_closest(kind):
    a = make(kind, 1)
    before = ref_flat(a)
    bad, close = MISSPELLED[kind]
    ex = FixedLayerExchanger([CHOSEN[kind][0], bad])
    with pytest.raises(KeyError, match=re.escape(repr(bad))) as info:
        ex.push_parameters(a)
    assert close in str(info.value)
    with pytest.raises(KeyError, match=re.escape(close)):
        ex.apply_layer_filter(a)
    assert_flat_equal(ref_flat(a), before)


@pytest.mark.parametrize("kind", KINDS)
def test_fixed_unknown_name_at_pull_changes_nothing(kind):
    a, b = make(kind, 1), make(kind, 2)
    b_before = ref_flat(b)
    bad, close = MISSPELLED[kind]
    good = CHOSEN[kind][0]
    # The misspelled layer comes last and its array has the intended layer's shape.
    payload = [np.asarray(ref_flat(a)[good]), np.asarray(ref_flat(a)[close])]
    ex = FixedLayerExchanger([good, bad])
    with pytest.raises(KeyError, match=re.escape(repr(bad))) as info:
        ex.pull_parameters(payload, b)
    assert close in str(info.value)
    assert_flat_equal(ref_flat(b), b_before)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad_index", [0, -1])
def test_fixed_wrong_shape_names_layer_and_changes_nothing(kind, bad_index):
    a, b = make(kind, 1), make(kind, 2)
    b_before = ref_flat(b)
    names = CHOSEN[kind]
    ex = FixedLayerExchanger(names)
    payload = ex.push_parameters(a)
    bad_name = names[bad_index]
    good_shape = payload[bad_index].shape
    payload[bad_index] = np.zeros(good_shape + (1, 2), payload[bad_index].dtype)
    snap = snapshot_payload(payload)
    with pytest.raises(ValueError, match=re.escape(repr(bad_name))) as info:
        ex.pull_parameters(payload, b)
    assert str(good_shape) in str(info.value)  # expected shape is reported
    assert_flat_equal(ref_flat(b), b_before)
    assert_payload_unchanged(payload, snap)


@pytest.mark.parametrize("kind", KINDS)
def test_fixed_wrong_count_is_value_error(kind):
    a, b = make(kind, 1), make(kind, 2)
    b_before = ref_flat(b)
    ex = FixedLayerExchanger(CHOSEN[kind])
    payload = ex.push_parameters(a)
    for bad in (payload[:2], payload + [payload[0]], []):
        with pytest.raises(ValueError, match=rf"expected 3 arrays.*got {len(bad)}"):
            ex.pull_parameters(bad, b)
        assert_flat_equal(ref_flat(b), b_before)


@pytest.mark.parametrize("kind", KINDS)
def test_fixed_lossy_dtype_is_type_error(kind):
    a, b = make(kind, 1), make(kind, 2)
    b_before = ref_flat(b)
    name = FLOAT32_LAYER[kind]
    assert b_before[name].dtype == np.float32
    ex = FixedLayerExchanger([CHOSEN[kind][0], name])
    payload = ex.push_parameters(a)
    payload[1] = payload[1].astype(np.complex64)  # a complex value into a real layer: lossy
    with pytest.raises(TypeError, match=re.escape(repr(name)) + r".*float32.*complex64"):
        ex.pull_parameters(payload, b)
    assert_flat_equal(ref_flat(b), b_before)


@pytest.mark.parametrize("kind", KINDS)
def test_fixed_lossless_upcast_is_accepted(kind):
    # float16 -> float32 is exact: the layer gets the float16 values, in float32.
    b = make(kind, 2)
    b_before = ref_flat(b)
    name = FLOAT32_LAYER[kind]
    value = np.random.default_rng(5).standard_normal(b_before[name].shape).astype(np.float16)
    result = FixedLayerExchanger([name]).pull_parameters([value], b)
    expected = dict(b_before)
    expected[name] = value.astype(np.float32)
    check_pulled(b, b_before, result, expected)


def test_fixed_layer_list_validation():
    with pytest.raises(TypeError):
        FixedLayerExchanger("enc/w")  # one string, not a list
    with pytest.raises(ValueError, match="enc/w"):
        FixedLayerExchanger(["enc/w", "dec/b", "enc/w"])


@settings(deadline=None)
@given(data=st.data())
def test_fixed_any_subset_any_order_plain(data):
    a, b = make("plain", 11), make("plain", 12)
    a_flat, b_before = ref_flat(a), ref_flat(b)
    all_names = list(b_before)
    names = data.draw(st.permutations(all_names))
    names = names[: data.draw(st.integers(0, len(all_names)))]
    ex = FixedLayerExchanger(names)
    payload = ex.push_parameters(a)
    assert len(payload) == len(names)
    for arr, n in zip(payload, names):
        assert_arrays_identical(arr, a_flat[n], n)
    result = ex.pull_parameters(payload, b)
    expected = {n: (a_flat[n] if n in names else b_before[n]) for n in all_names}
    check_pulled(b, b_before, result, expected)


# ---------------------------------------------------------------------------------------
# LayerExchangerWithExclusions and module typing
# ---------------------------------------------------------------------------------------


def linen_expected_transfer(names) -> list[str]:
    return [n for n in names if not (set(n.split("/")) & LINEN_BN_SEGMENTS)]


def nnx_expected_transfer(names) -> list[str]:
    return [n for n in names if not n.startswith(NNX_BN_PREFIXES)]


def test_linen_module_types_maps_paths_to_types():
    types, abstract = linen_module_types(LinenNet(), X)
    assert types[()] is LinenNet
    assert types[("shared",)] is nn.Dense
    assert types[("block",)] is Block
    assert types[("block", "Dense_0")] is nn.Dense
    assert types[("block", "BatchNorm_0")] is nn.BatchNorm
    assert types[("bn",)] is nn.BatchNorm
    assert types[("head",)] is nn.Dense
    # abstract init has the same layer names and shapes as a real init, and no values
    real = ref_flat(linen_template())
    abstract_leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]
    assert [ref_name(p) for p, _ in abstract_leaves] == list(real)
    for (_, leaf), (name, arr) in zip(abstract_leaves, real.items()):
        assert isinstance(leaf, jax.ShapeDtypeStruct)
        assert leaf.shape == arr.shape and leaf.dtype == arr.dtype, name


def test_nnx_module_types_tied_found_once():
    m = make("nnx", 0)
    types = nnx_module_types(m)
    assert types[()] is NNXNet
    assert types[("fc1",)] is nnx.Linear
    assert types[("bn1",)] is nnx.BatchNorm
    assert types[("sub", "norm")] is nnx.BatchNorm
    assert types[("sub", "lin")] is nnx.Linear
    assert types[("layers", 0)] is nnx.Linear and types[("layers", 1)] is nnx.Linear
    assert ("tied",) not in types  # the same object as fc1, recorded once


def test_pytree_node_types_of_dataclass_nodes():
    tree = {"lin": LinParams(np.ones((2, 2), np.float32), np.ones(2, np.float32)), "x": np.ones(3)}
    types = pytree_node_types(tree)
    assert types[()] is dict
    assert types[("lin",)] is LinParams
    assert ("x",) not in types


def test_exclusions_linen_batchnorm():
    v = make("linen", 1)
    names = list(ref_flat(v))
    expected = linen_expected_transfer(names)
    # sanity on the reference: BN params and batch_stats of both BNs (nested included) go,
    # and the shared Dense is there once
    assert "params/block/BatchNorm_0/scale" not in expected
    assert "batch_stats/block/BatchNorm_0/mean" not in expected
    assert "params/bn/bias" not in expected and "batch_stats/bn/var" not in expected
    assert not any(n.startswith("batch_stats/") for n in expected)
    assert expected.count("params/shared/kernel") == 1
    assert set(expected) == {
        "params/block/Dense_0/bias",
        "params/block/Dense_0/kernel",
        "params/head/bias",
        "params/head/kernel",
        "params/shared/bias",
        "params/shared/kernel",
    }

    ex = LayerExchangerWithExclusions(LinenNet(), {nn.BatchNorm}, X)
    assert ex.layers_to_transfer == expected
    assert ex.get_layers_to_transfer(v) == expected
    ref = ref_flat(v)
    for payload in (ex.apply_layer_filter(v), ex.push_parameters(v)):
        assert len(payload) == len(expected)
        for arr, name in zip(payload, expected):
            assert_arrays_identical(arr, ref[name], name)


def test_exclusions_linen_example_kwargs():
    ex = LayerExchangerWithExclusions(LinenNet(), {nn.BatchNorm}, x=X)
    assert ex.layers_to_transfer == linen_expected_transfer(list(ref_flat(linen_template())))


def test_exclusions_nnx_batchnorm():
    m = make("nnx", 1)
    ref = ref_flat(m)
    expected = nnx_expected_transfer(list(ref))
    assert expected == [
        "fc1/bias",
        "fc1/kernel",
        "layers/0/bias",
        "layers/0/kernel",
        "layers/1/bias",
        "layers/1/kernel",
        "sub/lin/bias",
        "sub/lin/kernel",
    ]
    ex = LayerExchangerWithExclusions(m, {nnx.BatchNorm})
    assert ex.layers_to_transfer == expected
    assert ex.get_layers_to_transfer(m) == expected
    payload = ex.push_parameters(m)
    assert len(payload) == len(expected)  # tied fc1 is sent once
    for arr, name in zip(payload, expected):
        assert_arrays_identical(arr, ref[name], name)
    assert_flat_equal(ref_flat(m), ref)


def test_should_module_be_excluded():
    m = make("nnx", 0)
    ex = LayerExchangerWithExclusions(m, {nnx.BatchNorm})
    assert ex.should_module_be_excluded(m.bn1)
    assert ex.should_module_be_excluded(m.sub.norm)
    assert ex.should_module_be_excluded(nnx.BatchNorm(2, rngs=nnx.Rngs(0)))
    assert not ex.should_module_be_excluded(m.fc1)
    assert not ex.should_module_be_excluded(m.tied)
    assert not ex.should_module_be_excluded(m.sub)
    assert not ex.should_module_be_excluded(m)

    class MyBN(nnx.BatchNorm):
        pass

    # documented: exact type match, as fl4health (a subclass is not excluded)
    assert not ex.should_module_be_excluded(MyBN(2, rngs=nnx.Rngs(0)))

    lex = LayerExchangerWithExclusions(LinenNet(), {nn.BatchNorm}, X)
    assert lex.should_module_be_excluded(nn.BatchNorm())
    assert not lex.should_module_be_excluded(nn.Dense(3))
    assert not lex.should_module_be_excluded(Block())


def test_should_layer_be_excluded_names():
    lex = LayerExchangerWithExclusions(LinenNet(), {nn.BatchNorm}, X)
    for name in (
        "params/bn/scale",
        "batch_stats/bn/mean",
        "params/block/BatchNorm_0/bias",
        "batch_stats/block/BatchNorm_0/var",
    ):
        assert lex.should_layer_be_excluded(name), name
    for name in ("params/block/Dense_0/kernel", "params/shared/bias", "params/head/kernel"):
        assert not lex.should_layer_be_excluded(name), name

    m = make("nnx", 0)
    ex = LayerExchangerWithExclusions(m, {nnx.BatchNorm})
    for name in ("bn1/scale", "bn1/mean", "sub/norm/var", "sub/norm/bias"):
        assert ex.should_layer_be_excluded(name), name
    for name in ("fc1/kernel", "sub/lin/kernel", "layers/0/bias", "layers/1/kernel"):
        assert not ex.should_layer_be_excluded(name), name


def test_exclusion_prefix_pitfall_nnx():
    m = NNXPrefix(nnx.Rngs(0))
    ex = LayerExchangerWithExclusions(m, {nnx.BatchNorm})
    assert ex.should_layer_be_excluded("bn1/scale")
    assert ex.should_layer_be_excluded("bn1/mean")
    assert not ex.should_layer_be_excluded("bn10/kernel")
    assert not ex.should_layer_be_excluded("bn10/bias")
    # reference: the layers of the Linear 'bn10' (the BatchNorm 'bn1' is out)
    expected = [n for n in ref_flat(m) if n.split("/")[0] == "bn10"]
    assert expected == ["bn10/bias", "bn10/kernel"]
    assert ex.layers_to_transfer == expected
    assert ex.get_layers_to_transfer(m) == expected


def test_exclusion_prefix_pitfall_linen():
    x = jnp.ones((2, 3))
    v = LinenPrefix().init(jax.random.key(0), x)
    ex = LayerExchangerWithExclusions(LinenPrefix(), {nn.BatchNorm}, x)
    expected = [n for n in ref_flat(v) if n.split("/")[1] == "bn10"]
    assert expected == ["params/bn10/bias", "params/bn10/kernel"]
    assert ex.get_layers_to_transfer(v) == expected
    assert not ex.should_layer_be_excluded("params/bn10/kernel")
    assert ex.should_layer_be_excluded("params/bn1/scale")


def test_exclusion_type_absent_transfers_everything():
    v = make("linen", 1)
    lex = LayerExchangerWithExclusions(LinenNet(), {nn.Dropout}, X)
    assert lex.layers_to_transfer == list(ref_flat(v))
    assert lex.get_layers_to_transfer(v) == list(ref_flat(v))
    for got, want in zip(lex.push_parameters(v), ref_flat(v).values()):
        assert_arrays_identical(got, want)

    m = make("nnx", 1)
    for exclusions in ({nnx.Conv}, {nnx.Dropout, nnx.Conv}, set()):
        ex = LayerExchangerWithExclusions(m, exclusions)
        assert ex.layers_to_transfer == list(ref_flat(m))
        assert len(ex.push_parameters(m)) == len(ref_flat(m))


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_exclusions_round_trip_keeps_local_batchnorm(kind):
    a, b = make(kind, 1), make(kind, 2)
    a_flat, b_before = ref_flat(a), ref_flat(b)
    if kind == "linen":
        ex = LayerExchangerWithExclusions(LinenNet(), {nn.BatchNorm}, X)
        transfer = linen_expected_transfer(list(b_before))
    else:
        ex = LayerExchangerWithExclusions(b, {nnx.BatchNorm})
        transfer = nnx_expected_transfer(list(b_before))
    result = ex.pull_parameters(ex.push_parameters(a), b)
    expected = {n: (a_flat[n] if n in transfer else b_before[n]) for n in b_before}
    excluded = [n for n in b_before if n not in transfer]
    assert len(excluded) >= 8  # 2 BatchNorms x (scale, bias, mean, var)
    assert all(not np.array_equal(a_flat[n], b_before[n]) for n in excluded)
    check_pulled(b, b_before, result, expected)
    if kind == "nnx":
        assert b.tied is b.fc1
        assert_arrays_identical(np.asarray(b.tied.kernel.get_value()), a_flat["fc1/kernel"])


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_exclusions_pull_errors_change_nothing(kind):
    a, b = make(kind, 1), make(kind, 2)
    b_before = ref_flat(b)
    if kind == "linen":
        ex = LayerExchangerWithExclusions(LinenNet(), {nn.BatchNorm}, X)
    else:
        ex = LayerExchangerWithExclusions(b, {nnx.BatchNorm})
    payload = ex.push_parameters(a)
    n = len(payload)
    with pytest.raises(ValueError, match=rf"expected {n} arrays.*got {n - 1}"):
        ex.pull_parameters(payload[:-1], b)
    assert_flat_equal(ref_flat(b), b_before)
    last = ex.get_layers_to_transfer(b)[-1]
    bad = payload[:-1] + [np.zeros((7,), np.float32)]
    with pytest.raises(ValueError, match=re.escape(repr(last))):
        ex.pull_parameters(bad, b)
    assert_flat_equal(ref_flat(b), b_before)


@flax.struct.dataclass
class LinParams:
    w: Any
    b: Any


@flax.struct.dataclass
class NormParams:
    scale: Any
    mean: Any


def test_exclusions_plain_pytree_node_types():
    # A plain pytree: its internal node types are its module types.
    rng = np.random.default_rng(0)

    def tree():
        return {
            "lin": LinParams(rng.standard_normal((2, 3)).astype(np.float32), rng.standard_normal(3).astype(np.float32)),
            "norm": NormParams(rng.standard_normal(3).astype(np.float32), rng.standard_normal(3).astype(np.float32)),
            "out": {"w": rng.standard_normal((3, 1)).astype(np.float32)},
        }

    a, b = tree(), tree()
    assert list(ref_flat(a)) == ["lin/w", "lin/b", "norm/scale", "norm/mean", "out/w"]
    ex = LayerExchangerWithExclusions(a, {NormParams})
    assert ex.layers_to_transfer == ["lin/w", "lin/b", "out/w"]
    assert ex.should_layer_be_excluded("norm/mean") and not ex.should_layer_be_excluded("lin/w")
    a_flat, b_before = ref_flat(a), ref_flat(b)
    result = ex.pull_parameters(ex.push_parameters(a), b)
    expected = {n: (b_before[n] if n.startswith("norm/") else a_flat[n]) for n in b_before}
    check_pulled(b, b_before, result, expected)
    assert isinstance(result["norm"], NormParams) and isinstance(result["lin"], LinParams)


@pytest.mark.parametrize(
    "model_kind, exclusions, pattern",
    [
        ("nnx", {nn.BatchNorm}, r"Linen"),
        ("plain", {nn.BatchNorm}, r"Linen"),
        ("plain", {nnx.BatchNorm}, r"NNX.*nnx\.Module"),
        ("nnx", {"BatchNorm"}, r"module types.*'BatchNorm'"),
        ("plain", {3}, r"module types.*3"),
        ("nnx", {nnx.BatchNorm, "Linear"}, r"module types.*'Linear'"),
    ],
)
def test_exclusions_constructor_type_errors(model_kind, exclusions, pattern):
    model = make(model_kind, 1)
    before = ref_flat(model)
    with pytest.raises(TypeError, match=pattern):
        LayerExchangerWithExclusions(model, exclusions)
    assert_flat_equal(ref_flat(model), before)


def test_exclusions_linen_instance_in_exclusions_is_type_error():
    with pytest.raises(TypeError, match="module types"):
        LayerExchangerWithExclusions(LinenNet(), {nn.BatchNorm()}, X)


# ---------------------------------------------------------------------------------------
# DynamicLayerExchanger
# ---------------------------------------------------------------------------------------


def drifted_pair(kind: str, seed: int = 1):
    """(initial, current): current = initial + a known constant on exactly two layers."""
    initial = make(kind, seed)
    current = copy_model(initial)
    init_flat = ref_flat(initial)
    for name, delta in DRIFTING[kind]:
        set_layer(current, name, init_flat[name] + np.float32(delta))
    return initial, current


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rule", ["threshold", "percentage2", "percentage1"])
@pytest.mark.parametrize("normalize", [True, False])
def test_dynamic_push_selects_the_drifted_layers(kind, rule, normalize):
    initial, current = drifted_pair(kind)
    cur, ini = ref_flat(current), ref_flat(initial)
    drifts = ref_drifts(cur, ini, normalize)
    n = len(cur)
    drifting = [name for name, _ in DRIFTING[kind]]
    # Reference: only the two modified layers moved.
    assert sorted(k for k, d in drifts.items() if d > 0) == sorted(drifting)
    if rule == "threshold":
        threshold = 1e-3
        expected = [k for k, d in drifts.items() if d > threshold]
        assert sorted(expected) == sorted(drifting)
        fn = LayerSelectionFunctionConstructor(threshold, 0.5, normalize=normalize).select_by_threshold()
    else:
        pct = (1.5 if rule == "percentage2" else 0.5) / n  # ceil(N * pct) = 2 or 1
        expected = ref_percentage(drifts, pct, more=True)
        assert len(expected) == (2 if rule == "percentage2" else 1)
        fn = LayerSelectionFunctionConstructor(1.0, pct, normalize=normalize).select_by_percentage()
    if rule == "percentage1":
        # the larger constant wins: drift = |delta| * sqrt(size) (/ size when normalizing)
        (n1, d1), (n2, d2) = DRIFTING[kind]
        s1, s2 = cur[n1].size, cur[n2].size
        f = (lambda d, s: abs(d) / math.sqrt(s)) if normalize else (lambda d, s: abs(d) * math.sqrt(s))
        assert expected == [n1 if f(d1, s1) > f(d2, s2) else n2]

    ex = DynamicLayerExchanger(fn)
    weights, names = ex.select_parameters(current, initial)
    assert names == expected
    for w, name in zip(weights, names):
        assert_arrays_identical(w, cur[name], name)

    payload = ex.push_parameters(current, initial_model=initial)
    assert len(payload) == len(expected) + 1
    assert payload[-1].dtype.kind == "U"
    assert payload[-1].ndim == 1
    assert payload[-1].tolist() == expected
    for w, name in zip(payload[:-1], expected):
        assert type(w) is np.ndarray
        assert_arrays_identical(w, cur[name], name)
    # selection does not touch either model
    assert_flat_equal(ref_flat(current), cur)
    assert_flat_equal(ref_flat(initial), ini)


@pytest.mark.parametrize("kind", KINDS)
def test_dynamic_percentage_select_drift_less_ties_to_flatten_order(kind):
    initial, current = drifted_pair(kind)
    cur, ini = ref_flat(current), ref_flat(initial)
    drifts = ref_drifts(cur, ini, True)
    expected = ref_percentage(drifts, 0.5, more=False)
    # N - 2 layers tie at drift 0: the first ones in flatten order win
    undrifted = [k for k in cur if drifts[k] == 0]
    assert expected == undrifted[: math.ceil(len(cur) * 0.5)]
    fn = LayerSelectionFunctionConstructor(1.0, 0.5, select_drift_more=False).select_by_percentage()
    payload = DynamicLayerExchanger(fn).push_parameters(current, initial)
    assert payload[-1].tolist() == expected


@pytest.mark.parametrize("kind", KINDS)
def test_dynamic_threshold_select_drift_less(kind):
    initial, current = drifted_pair(kind)
    cur, ini = ref_flat(current), ref_flat(initial)
    drifts = ref_drifts(cur, ini, True)
    expected = [k for k, d in drifts.items() if d <= 1e-3]
    assert len(expected) == len(cur) - 2
    fn = LayerSelectionFunctionConstructor(1e-3, 1.0, select_drift_more=False).select_by_threshold()
    assert DynamicLayerExchanger(fn).push_parameters(current, initial)[-1].tolist() == expected


@pytest.mark.parametrize("kind", KINDS)
def test_dynamic_pull_applies_named_layers_in_any_order(kind):
    initial, current = drifted_pair(kind)
    cur = ref_flat(current)
    # select every layer (100%), then send a shuffled subset of 4 of them
    fn = LayerSelectionFunctionConstructor(1.0, 1.0).select_by_percentage()
    ex = DynamicLayerExchanger(fn)
    payload = ex.push_parameters(current, initial)
    names = payload[-1].tolist()
    assert names == list(cur)  # 100%: every layer, flatten order
    rng = np.random.default_rng(7)
    keep = rng.permutation(len(names))[:4]  # a subset, in a shuffled order
    assert list(keep) != sorted(keep)
    shuffled = [payload[i] for i in keep] + [np.array([names[i] for i in keep])]
    target = make(kind, 9)
    t_before = ref_flat(target)
    chosen = {names[i] for i in keep}
    result = ex.pull_parameters(shuffled, target)
    expected = {n: (cur[n] if n in chosen else t_before[n]) for n in t_before}
    check_pulled(target, t_before, result, expected)


@pytest.mark.parametrize("kind", KINDS)
def test_dynamic_round_trip_drifted_layers_into_other_model(kind):
    initial, current = drifted_pair(kind)
    cur = ref_flat(current)
    fn = LayerSelectionFunctionConstructor(1e-3, 0.5).select_by_threshold()
    ex = DynamicLayerExchanger(fn)
    payload = ex.push_parameters(current, initial)
    rng = np.random.default_rng(3)
    perm = rng.permutation(len(payload) - 1)
    if list(perm) == sorted(perm):
        perm = perm[::-1]
    shuffled = [payload[i] for i in perm] + [payload[-1][perm]]
    target = make(kind, 5)
    t_before = ref_flat(target)
    drifting = {n for n, _ in DRIFTING[kind]}
    result = ex.pull_parameters(shuffled, target)
    expected = {n: (cur[n] if n in drifting else t_before[n]) for n in t_before}
    check_pulled(target, t_before, result, expected)


@pytest.mark.parametrize("kind", KINDS)
def test_dynamic_empty_selection_changes_nothing(kind):
    initial, current = drifted_pair(kind)
    fn = LayerSelectionFunctionConstructor(1e6, 0.5).select_by_threshold()
    ex = DynamicLayerExchanger(fn)
    payload = ex.push_parameters(current, initial)
    assert len(payload) == 1 and payload[0].size == 0
    target = make(kind, 4)
    t_before = ref_flat(target)
    result = ex.pull_parameters(payload, target)
    check_pulled(target, t_before, result, t_before)
    # fl4health packs an empty selection as np.array([]) (float): documented as accepted
    result = ex.pull_parameters([np.array([])], target)
    check_pulled(target, t_before, result, t_before)


def test_dynamic_pack_unpack_round_trip():
    ex = DynamicLayerExchanger(LayerSelectionFunctionConstructor(1.0, 1.0).select_by_percentage())
    rng = np.random.default_rng(0)
    weights = [
        rng.standard_normal((2, 3)).astype(np.float32),
        np.arange(4, dtype=np.int32),
        rng.standard_normal(5).astype(BF16),
        np.float64(2.5) * np.ones(()),
    ]
    names = ["a/kernel", "layers/0/bias", "bf/w", "é/scalar"]
    packed = ex.pack_parameters(weights, names)
    assert len(packed) == 5
    assert packed[-1].dtype.kind == "U" and packed[-1].shape == (4,)
    assert packed[-1].tolist() == names
    for got, want in zip(packed[:-1], weights):
        assert_arrays_identical(got, want)
    w2, n2 = ex.unpack_parameters(packed)
    assert n2 == names
    for got, want in zip(w2, weights):
        assert_arrays_identical(got, want)
    # byte-compatible with fl4health's packer: weights + [np.array(names)]
    fl4health_style = list(weights) + [np.array(names)]
    w3, n3 = ex.unpack_parameters(fl4health_style)
    assert n3 == names
    assert packed[-1].dtype == np.array(names).dtype


@pytest.mark.parametrize("kind", KINDS)
def test_dynamic_payload_survives_numpy_save_load(kind):
    initial, current = drifted_pair(kind)
    cur = ref_flat(current)
    ex = DynamicLayerExchanger(LayerSelectionFunctionConstructor(1e-3, 0.5).select_by_threshold())
    payload = ex.push_parameters(current, initial)

    def wire(a):
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        buf.seek(0)
        return np.load(buf, allow_pickle=False)

    received = [wire(a) for a in payload]
    assert received[-1].dtype.kind == "U"
    weights, names = ex.unpack_parameters(received)
    assert names == payload[-1].tolist()
    target = make(kind, 6)
    t_before = ref_flat(target)
    result = ex.pull_parameters(received, target)
    expected = {n: (cur[n] if n in names else t_before[n]) for n in t_before}
    check_pulled(target, t_before, result, expected)


@pytest.mark.parametrize("kind", KINDS)
def test_dynamic_push_without_initial_model(kind):
    m = make(kind, 1)
    before = ref_flat(m)
    for fn in (
        LayerSelectionFunctionConstructor(0.1, 0.5).select_by_threshold(),
        LayerSelectionFunctionConstructor(0.1, 0.5).select_by_percentage(),
    ):
        with pytest.raises(ValueError, match="initial_model"):
            DynamicLayerExchanger(fn).push_parameters(m)
    assert_flat_equal(ref_flat(m), before)


def test_dynamic_initial_model_mismatch_names_the_layer():
    cur = make("plain", 1)
    ini = make("plain", 2)
    del ini["enc"]["b"]
    fn = LayerSelectionFunctionConstructor(0.1, 0.5).select_by_percentage()
    with pytest.raises(KeyError, match=re.escape("'enc/b'")):
        DynamicLayerExchanger(fn).push_parameters(cur, initial_model=ini)
    ini = make("plain", 2)
    ini["dec"]["w"] = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match=re.escape("'dec/w'")):
        DynamicLayerExchanger(fn).push_parameters(cur, initial_model=ini)


def test_selection_constructor_rejects_out_of_range():
    for bad_pct in (0, -0.1, 1.01):
        with pytest.raises(ValueError, match="exchange_percentage"):
            LayerSelectionFunctionConstructor(0.1, bad_pct)
    for bad_thr in (0, -1.0):
        with pytest.raises(ValueError, match="norm_threshold"):
            LayerSelectionFunctionConstructor(bad_thr, 0.5)
    with pytest.raises(TypeError):
        DynamicLayerExchanger("not a function")


def _bad_payload(kind_of_bad: str, payload: list, names: list[str], model_flat: dict):
    weights = [np.array(w, copy=True) for w in payload[:-1]]
    if kind_of_bad == "unknown_name":
        bad = names[:-1] + [names[-1] + "x"]
        return weights + [np.array(bad)], KeyError, re.escape(repr(names[-1] + "x"))
    if kind_of_bad == "duplicate":
        bad = [names[0]] + [names[0]] + names[2:]
        return weights + [np.array(bad)], ValueError, r"duplicate.*" + re.escape(repr(names[0]))
    if kind_of_bad == "count":
        return weights[:-1] + [np.array(names)], ValueError, rf"{len(names) - 1} arrays but {len(names)} layer names"
    if kind_of_bad == "shape_first":
        weights[0] = np.zeros(weights[0].shape + (3,), weights[0].dtype)
        return weights + [np.array(names)], ValueError, re.escape(repr(names[0]))
    if kind_of_bad == "shape_last":
        weights[-1] = np.zeros((11,), weights[-1].dtype)
        return weights + [np.array(names)], ValueError, re.escape(repr(names[-1]))
    if kind_of_bad == "names_not_strings":
        return weights + [np.arange(len(names))], ValueError, r"Unicode.*dtype int"
    if kind_of_bad == "names_2d":
        return weights + [np.array(names).reshape(1, -1)], ValueError, r"1-D"
    if kind_of_bad == "empty":
        return [], ValueError, r"empty payload"
    if kind_of_bad == "lossy_dtype":
        f32 = [i for i, n in enumerate(names) if model_flat[n].dtype == np.float32]
        i = f32[-1]
        weights[i] = weights[i].astype(np.complex64)
        return weights + [np.array(names)], TypeError, re.escape(repr(names[i])) + r".*complex64"
    raise AssertionError(kind_of_bad)


BAD_PAYLOADS = [
    "unknown_name",
    "duplicate",
    "count",
    "shape_first",
    "shape_last",
    "names_not_strings",
    "names_2d",
    "empty",
    "lossy_dtype",
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", BAD_PAYLOADS)
def test_dynamic_bad_payload_changes_nothing(kind, bad):
    initial, current = drifted_pair(kind)
    ex = DynamicLayerExchanger(LayerSelectionFunctionConstructor(1.0, 1.0).select_by_percentage())
    good = ex.push_parameters(current, initial)
    names = good[-1].tolist()
    assert len(names) >= 4
    target = make(kind, 8)
    t_before = ref_flat(target)
    payload, exc, pattern = _bad_payload(bad, good, names, t_before)
    snap = snapshot_payload(payload)
    with pytest.raises(exc, match=pattern):
        ex.pull_parameters(payload, target)
    assert_flat_equal(ref_flat(target), t_before)
    assert_payload_unchanged(payload, snap)


def test_dynamic_pull_does_not_alias_payload():
    # conform_layer: the layer gets a new array, never an alias of the payload's array
    b = make("plain", 2)
    payload = [np.full((3, 4), 5.0, np.float32), np.array(["enc/w"])]
    ex = DynamicLayerExchanger(LayerSelectionFunctionConstructor(1.0, 1.0).select_by_percentage())
    result = ex.pull_parameters(payload, b)
    payload[0][...] = -1.0
    assert np.array_equal(result["enc"]["w"], np.full((3, 4), 5.0, np.float32))
    assert result["enc"]["w"].dtype == np.float32


@settings(deadline=None)
@given(
    deltas=st.lists(st.integers(-6, 6), min_size=6, max_size=6),
    pct=st.sampled_from([0.2, 0.5, 0.75, 1.0]),
    more=st.booleans(),
    normalize=st.booleans(),
)
def test_dynamic_percentage_matches_numpy_reference(deltas, pct, more, normalize):
    initial = make("plain", 21)
    current = copy_model(initial)
    ini = ref_flat(initial)
    for (name, value), d in zip(ini.items(), deltas):
        set_layer(current, name, value + np.asarray(d, value.dtype))
    cur = ref_flat(current)
    drifts = ref_drifts(cur, ini, normalize)
    values = sorted(drifts.values())
    # keep examples where the ranking is unambiguous: equal drifts are exactly equal
    # (both 0, or same |delta| on same-size layers), distinct ones are well apart
    for x, y in zip(values, values[1:]):
        assume(x == y or y - x > 1e-4 * max(y, 1e-30))
    expected = ref_percentage(drifts, pct, more)
    fn = LayerSelectionFunctionConstructor(1.0, pct, normalize=normalize, select_drift_more=more).select_by_percentage()
    payload = DynamicLayerExchanger(fn).push_parameters(current, initial)
    assert payload[-1].tolist() == expected
    for w, n in zip(payload[:-1], expected):
        assert_arrays_identical(w, cur[n], n)


# ---------------------------------------------------------------------------------------
# Never mutates / in place for NNX
# ---------------------------------------------------------------------------------------


def _all_exchangers_payloads(kind, a, b):
    """(exchanger, payload) pairs covering every exchanger for a model kind."""
    pairs = [
        (FullParameterExchanger(), FullParameterExchanger().push_parameters(a)),
        (FixedLayerExchanger(CHOSEN[kind]), FixedLayerExchanger(CHOSEN[kind]).push_parameters(a)),
    ]
    dyn = DynamicLayerExchanger(LayerSelectionFunctionConstructor(1.0, 0.5).select_by_percentage())
    pairs.append((dyn, dyn.push_parameters(a, initial_model=b)))
    if kind == "linen":
        ex = LayerExchangerWithExclusions(LinenNet(), {nn.BatchNorm}, X)
        pairs.append((ex, ex.push_parameters(a)))
    elif kind == "nnx":
        ex = LayerExchangerWithExclusions(a, {nnx.BatchNorm})
        pairs.append((ex, ex.push_parameters(a)))
    return pairs


@pytest.mark.parametrize("kind", ["linen", "plain"])
def test_pull_never_mutates_pytree(kind):
    a, b = make(kind, 1), make(kind, 2)
    b_before = ref_flat(b)
    b_structure = jax.tree_util.tree_structure(b)
    for ex, payload in _all_exchangers_payloads(kind, a, b):
        result = ex.pull_parameters(payload, b)
        assert result is not b
        assert jax.tree_util.tree_structure(result) == b_structure
        assert_flat_equal(ref_flat(b), b_before)
        assert list(ref_flat(result)) == list(b_before)


def test_pull_nnx_in_place_returns_same_object():
    a = make("nnx", 1)
    a_flat = ref_flat(a)
    for i, (ex, payload) in enumerate(_all_exchangers_payloads("nnx", a, make("nnx", 3))):
        b = make("nnx", 10 + i)
        fc1 = b.fc1
        b_before = ref_flat(b)
        result = ex.pull_parameters(payload, b)
        assert result is b
        assert b.fc1 is fc1 and b.tied is b.fc1  # structure and tying kept
        after = ref_flat(b)
        assert list(after) == list(b_before)
        changed = [n for n in after if not np.array_equal(after[n], b_before[n])]
        assert changed, type(ex).__name__
        for n in changed:
            assert_arrays_identical(after[n], a_flat[n], n)


# ---------------------------------------------------------------------------------------
# bfloat16
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bf16_nnx", "bf16_plain"])
@pytest.mark.parametrize("as_void", [False, True])
def test_bfloat16_full_round_trip_bit_exact(kind, as_void):
    a, b = make(kind, 1), make(kind, 2)
    a_flat, b_before = ref_flat(a), ref_flat(b)
    assert any(v.dtype == BF16 for v in a_flat.values())
    ex = FullParameterExchanger()
    payload = ex.push_parameters(a)
    for arr, (name, want) in zip(payload, a_flat.items()):
        assert arr.dtype == want.dtype, name  # bfloat16 leaves as bfloat16
    if as_void:
        # what Flower's serialization does to bfloat16
        payload = [p.view("V2") if p.dtype == BF16 else p for p in payload]
        assert any(p.dtype == np.dtype("V2") for p in payload)
    result = ex.pull_parameters(payload, b)
    check_pulled(b, b_before, result, a_flat)


@pytest.mark.parametrize("kind", ["bf16_nnx", "bf16_plain"])
@pytest.mark.parametrize("as_void", [False, True])
def test_bfloat16_dynamic_and_fixed_round_trip_bit_exact(kind, as_void):
    initial, current = make(kind, 1), make(kind, 2)
    cur = ref_flat(current)
    names = [n for n, v in cur.items() if v.dtype == BF16]
    dyn = DynamicLayerExchanger(LayerSelectionFunctionConstructor(1.0, 1.0).select_by_percentage())
    payload = dyn.push_parameters(current, initial)
    assert payload[-1].dtype.kind == "U"
    fixed = FixedLayerExchanger(names)
    fpayload = fixed.push_parameters(current)
    if as_void:
        payload = [p.view("V2") if p.dtype == BF16 else p for p in payload[:-1]] + [payload[-1]]
        fpayload = [p.view("V2") for p in fpayload]

        # and through numpy.save/load without pickle, as Flower does
        def wire(x):
            buf = io.BytesIO()
            np.save(buf, x, allow_pickle=False)
            buf.seek(0)
            return np.load(buf, allow_pickle=False)

        payload = [wire(p) for p in payload]
        fpayload = [wire(p) for p in fpayload]
    for ex, pl, moved in ((dyn, payload, set(cur)), (fixed, fpayload, set(names))):
        target = make(kind, 3)
        t_before = ref_flat(target)
        result = ex.pull_parameters(pl, target)
        expected = {n: (cur[n] if n in moved else t_before[n]) for n in t_before}
        check_pulled(target, t_before, result, expected)


@pytest.mark.parametrize("kind, name", [("bf16_plain", "a/b"), ("bf16_nnx", "fc/bias")])
@pytest.mark.parametrize("as_void", [False, True])
def test_bfloat16_special_bit_patterns_preserved(kind, name, as_void):
    # NaNs with payload bits, a subnormal, -0.0 must arrive bit-exact
    b = make(kind, 2)
    b_before = ref_flat(b)
    size = b_before[name].size
    raw = np.array([0x7FC1, 0xFFC0, 0x0001, 0x8000], dtype=np.uint16)[:size]
    value = raw.view(BF16)
    sent = value.view("V2") if as_void else value
    result = FixedLayerExchanger([name]).pull_parameters([sent], b)
    expected = dict(b_before)
    expected[name] = value
    check_pulled(b, b_before, result, expected)
    assert np.array_equal(ref_flat(result)[name].view(np.uint16), raw)


@pytest.mark.parametrize("kind", ["bf16_nnx", "bf16_plain"])
def test_bfloat16_layer_takes_float32_rounded_and_refuses_integers_out_of_kind(kind):
    b = make(kind, 2)
    b_before = ref_flat(b)
    name = next(n for n, v in b_before.items() if v.dtype == BF16)
    # float32 values into a bfloat16 layer: accepted, rounded to nearest (as jnp.asarray does).
    wide = (b_before[name].astype(np.float32) + np.float32(1e-3)).astype(np.float32)
    pulled = ref_flat(FixedLayerExchanger([name]).pull_parameters([wide], make(kind, 2)))[name]
    assert pulled.dtype == BF16 and pulled.tobytes() == wide.astype(BF16).tobytes()
    bad = b_before[name].astype(np.complex64)
    with pytest.raises(TypeError, match=re.escape(repr(name)) + r".*bfloat16.*complex64"):
        FixedLayerExchanger([name]).pull_parameters([bad], b)
    assert_flat_equal(ref_flat(b), b_before)
    bad = b_before[name].astype(np.float32)
    # a void array of the wrong item size is not reinterpreted
    with pytest.raises(TypeError, match=re.escape(repr(name))):
        FixedLayerExchanger([name]).pull_parameters([bad.view("V4")], b)
    assert_flat_equal(ref_flat(b), b_before)
