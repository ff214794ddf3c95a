"""Tests of jaxlayerx.selection: drift norms, masks and drift-based layer selection.

Every expectation comes from the small numpy reference below (or from hand-computed
values, with the arithmetic in a comment), never from the library itself.
"""

from __future__ import annotations

import collections
import math
import re

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ref_name
from flax import nnx
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import jaxlayerx
from jaxlayerx import (
    LayerSelectionFunctionConstructor,
    check_matching_layers,
    drift_norm,
    drift_norms,
    num_layers_to_exchange,
    percentage_mask,
    select_layers_by_percentage,
    select_layers_by_threshold,
    threshold_mask,
)
from jaxlayerx import selection as sel

BF16 = jnp.bfloat16
DTYPES = [np.float32, np.float16, BF16, np.int32]


# --------------------------------------------------------------------------------------
# The numpy reference of the selection semantics.
# --------------------------------------------------------------------------------------


def ref_drift(cur, init, normalize: bool) -> np.float32:
    """sqrt(sum((cur - init)**2)) in float32 numpy, leaves cast to float32 first."""
    c = np.asarray(cur).astype(np.float32)
    i = np.asarray(init).astype(np.float32)
    diff = c - i
    norm = np.float32(np.sqrt(np.sum(diff * diff, dtype=np.float32)))
    if normalize:
        norm = np.float32(norm / np.float32(diff.size))
    return norm


def ref_drifts(cur_flat, init_flat, normalize: bool) -> dict[str, np.float32]:
    return {name: ref_drift(cur_flat[name], init_flat[name], normalize) for name in cur_flat}


def ref_select_threshold(names, drifts, threshold: float, more: bool) -> list[str]:
    # Compared as real numbers: float(drift) (exact float64 of the float32) vs the Python float.
    if more:
        return [n for n in names if float(drifts[n]) > threshold]
    return [n for n in names if float(drifts[n]) <= threshold]


def ref_select_percentage(names, drifts, p: float, more: bool) -> list[str]:
    k = math.ceil(len(names) * p)
    # Python's sort is stable, also with reverse=True: equal drifts keep flatten order.
    ranked = sorted(names, key=lambda n: float(drifts[n]), reverse=more)
    chosen = set(ranked[:k])
    return [n for n in names if n in chosen]


# --------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------


def _leaf_np(x) -> np.ndarray:
    if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return np.array(jax.random.key_data(x))
    return np.array(x)


def snapshot(model) -> list[tuple[str, np.ndarray]]:
    """Copies of every leaf of a model (the full NNX state, RNG included)."""
    tree = nnx.state(model) if isinstance(model, nnx.Module) else model
    return [(ref_name(p), _leaf_np(x)) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def assert_same_snapshot(before, after):
    assert [n for n, _ in before] == [n for n, _ in after]
    for (name, a), (_, b) in zip(before, after):
        assert a.dtype == b.dtype, name
        assert a.shape == b.shape, name
        assert np.array_equal(a, b), name


def assert_arrays_are_current_layers(arrays, names, cur_flat):
    assert len(arrays) == len(names)
    for array, name in zip(arrays, names):
        want = np.asarray(cur_flat[name])
        assert isinstance(array, np.ndarray), (name, type(array))
        assert array.dtype == want.dtype, (name, array.dtype, want.dtype)
        assert array.shape == want.shape, name
        assert np.array_equal(array, want), name


def one_hot_delta(shape, value, position=0) -> np.ndarray:
    delta = np.zeros(int(np.prod(shape, dtype=int)), np.float64)
    delta[position] = value
    return delta.reshape(shape)


def well_separated(values, rel=1e-4) -> bool:
    """Distinct drifts differ by more than `rel` relatively (exact ties are fine)."""
    distinct = sorted({float(v) for v in values})
    return all(b - a > rel * b for a, b in zip(distinct, distinct[1:]))


def candidate_thresholds(values) -> list[float]:
    """Positive thresholds far from every drift: between them, below and above them all."""
    distinct = sorted({float(v) for v in values})
    out = [(a + b) / 2 for a, b in zip(distinct, distinct[1:])]
    out.append(distinct[-1] * 2 + 0.01)
    if distinct[0] > 0:
        out.append(distinct[0] / 2)
    return out


# --------------------------------------------------------------------------------------
# Models of each kind.
# --------------------------------------------------------------------------------------


class LinenBlock(linen.Module):
    features: int

    @linen.compact
    def __call__(self, x, train: bool = False):
        x = linen.Dense(self.features)(x)
        x = linen.BatchNorm(use_running_average=not train)(x)
        return linen.relu(x)


class LinenNet(linen.Module):
    @linen.compact
    def __call__(self, x, train: bool = False):
        x = LinenBlock(4)(x, train)
        x = LinenBlock(3)(x, train)
        return linen.Dense(2)(x)


class NNXNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(3, 4, rngs=rngs), nnx.Linear(4, 2, rngs=rngs)])
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)  # RNG state: not a layer

    def __call__(self, x):
        return self.layers[1](self.drop(self.bn(self.layers[0](x))))


def _nnx_variable(module, name):
    obj = module
    for part in name.split("/"):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def read_layer(model, name) -> np.ndarray:
    """A layer read straight off the model (attribute access for NNX, key paths else)."""
    if isinstance(model, nnx.Module):
        return np.asarray(_nnx_variable(model, name)[...])
    found = {ref_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(model)[0]}
    return np.asarray(found[name])


def apply_deltas_pytree(tree, deltas):
    def add(path, x):
        name = ref_name(path)
        if name not in deltas:
            return x
        return jnp.asarray(np.asarray(x).astype(np.float64) + deltas[name]).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(add, tree)


# Each builder: (current model, initial model, deltas applied, names of the
# "big" (+8 on one element), "mid" (+3 on one element), and the tied pair A, B
# (zero-initialised 4-vectors, A += [1,0,0,0], B += [0.5]*4: both of norm 1 exactly)).


def build_plain():
    rng = np.random.default_rng(1)
    initial = {
        "enc": {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": np.zeros(4, np.float32)},
        "head": {"w": rng.normal(size=(4, 2)).astype(BF16), "b": np.zeros(2, np.float16)},
        "bn": {"mean": np.zeros(4, np.float32), "var": np.ones(4, np.float32)},
        "step": np.array(3, np.int32),
    }
    deltas = {
        "enc/w": one_hot_delta((3, 4), 8.0),
        "step": np.array(3.0),
        "enc/b": one_hot_delta((4,), 1.0),
        "bn/mean": np.full(4, 0.5),
    }
    current = apply_deltas_pytree(initial, deltas)
    return current, initial, deltas, ("enc/w", "step", "enc/b", "bn/mean")


def build_linen():
    variables = LinenNet().init(jax.random.key(0), jnp.ones((1, 3)))
    big = "params/LinenBlock_0/Dense_0/kernel"
    mid = "params/Dense_0/kernel"
    a = "params/LinenBlock_0/Dense_0/bias"
    b = "batch_stats/LinenBlock_0/BatchNorm_0/mean"
    deltas = {
        big: one_hot_delta((3, 4), 8.0),
        mid: one_hot_delta((3, 2), 3.0),
        a: one_hot_delta((4,), 1.0),
        b: np.full(4, 0.5),
    }
    current = apply_deltas_pytree(variables, deltas)
    return current, variables, deltas, (big, mid, a, b)


def build_nnx():
    m = NNXNet(nnx.Rngs(0))
    initial = jaxlayerx.unflatten(jaxlayerx.flatten(m), like=m)
    deltas = {
        "layers/0/kernel": one_hot_delta((3, 4), 8.0),
        "layers/1/kernel": one_hot_delta((4, 2), 3.0),
        "layers/0/bias": one_hot_delta((4,), 1.0),
        "bn/mean": np.full(4, 0.5),
    }
    for name, delta in deltas.items():
        var = _nnx_variable(m, name)
        var[...] = jnp.asarray(np.asarray(var[...]).astype(np.float64) + delta, dtype=var[...].dtype)
    return m, initial, deltas, ("layers/0/kernel", "layers/1/kernel", "layers/0/bias", "bn/mean")


BUILDERS = {"plain": build_plain, "linen": build_linen, "nnx": build_nnx}


# --------------------------------------------------------------------------------------
# drift_norm / drift_norms.
# --------------------------------------------------------------------------------------


def test_drift_norm_hand_values():
    cur = np.array([3.0, 4.0], np.float32)
    init = np.zeros(2, np.float32)
    # sqrt(3^2 + 4^2) = 5; normalized: 5 / 2 elements = 2.5
    assert float(drift_norm(cur, init, normalize=False)) == 5.0
    assert float(drift_norm(cur, init, normalize=True)) == 2.5
    assert float(drift_norm(cur, init)) == 2.5  # normalize defaults to True
    # a scalar layer: size 1, |7 - 2| = 5 either way
    assert float(drift_norm(np.float32(7.0), np.float32(2.0), normalize=True)) == 5.0
    out = drift_norm(cur, init)
    assert out.dtype == jnp.float32 and out.shape == ()


def test_drift_norm_casts_integers_before_subtracting():
    # int32 subtraction would overflow: (2^31 - 1) - (-2^31) wraps to -1.
    # Cast first: float32(2^31 - 1) = 2^31, 2^31 - (-2^31) = 2^32, sqrt((2^32)^2) = 2^32.
    cur = np.array([2**31 - 1], np.int32)
    init = np.array([-(2**31)], np.int32)
    expected = ref_drift(cur, init, False)
    assert float(expected) == 2.0**32
    assert float(drift_norm(cur, init, normalize=False)) == 2.0**32


def test_drift_norm_casts_half_precision_before_squaring():
    # float16: 300^2 = 90000 overflows float16 (max 65504); in float32 the norm is 300.
    cur = np.array([300.0], np.float16)
    init = np.zeros(1, np.float16)
    assert float(drift_norm(cur, init, normalize=False)) == 300.0
    # bfloat16: a sum of 300 ones stalls at 256 in bfloat16 (256 + 1 rounds to 256);
    # in float32 it is 300, norm sqrt(300).
    cur = np.ones(300, BF16)
    init = np.zeros(300, BF16)
    np.testing.assert_allclose(float(drift_norm(cur, init, normalize=False)), math.sqrt(300), rtol=1e-6)
    np.testing.assert_allclose(float(drift_norm(cur, init, normalize=True)), math.sqrt(300) / 300, rtol=1e-6)


def test_drift_norms_order_and_values_against_reference():
    rng = np.random.default_rng(0)
    cur = collections.OrderedDict(
        [
            ("z/w", rng.normal(size=(2, 3)).astype(np.float32)),
            ("a/b", rng.integers(-5, 5, size=(4,)).astype(np.int32)),
            ("m", rng.normal(size=(3,)).astype(np.float16)),
            ("k", rng.normal(size=(2, 2, 2)).astype(BF16)),
        ]
    )
    init = collections.OrderedDict(
        (name, (np.asarray(v).astype(np.float32) * 0.5).astype(v.dtype)) for name, v in cur.items()
    )
    for normalize in (True, False):
        got = drift_norms(cur, init, normalize=normalize)
        assert list(got) == list(cur)  # the order of `current`
        want = ref_drifts(cur, init, normalize)
        for name in cur:
            assert got[name].dtype == jnp.float32
            np.testing.assert_allclose(np.float32(got[name]), want[name], rtol=1e-5, atol=0)


# --------------------------------------------------------------------------------------
# Hypothesis: random flat trees against the numpy reference.
# --------------------------------------------------------------------------------------


@st.composite
def layer_trees(draw):
    n = draw(st.integers(1, 10))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    current: dict = {}
    initial: dict = {}
    made: list[tuple[np.ndarray, np.ndarray]] = []
    for i in range(n):
        tie = bool(made) and draw(st.integers(0, 3)) == 0
        if tie:
            # a layer of identical shape, dtype and values: exactly the same drift
            init, cur = made[draw(st.integers(0, len(made) - 1))]
            init, cur = init.copy(), cur.copy()
        else:
            shape = tuple(draw(st.lists(st.integers(1, 4), max_size=3)))
            dtype = draw(st.sampled_from(DTYPES))
            kind = draw(st.sampled_from(["zero", "random", "random", "one"]))
            is_int = dtype == np.int32
            base = rng.integers(-8, 9, size=shape).astype(np.float64)
            if not is_int:
                base = base / 4
            if kind == "zero":
                delta = np.zeros(shape)
            elif kind == "one":
                size = int(np.prod(shape, dtype=int))
                value = draw(st.sampled_from([0.25, 1.0, 3.0, 8.0, 100.0, -2.0]))
                delta = one_hot_delta(shape, value, draw(st.integers(0, size - 1)))
            else:
                scale = draw(st.sampled_from([0.25, 1.0, 4.0]))
                delta = rng.integers(-16, 17, size=shape) * scale
            if is_int:
                delta = np.round(delta)
            init = base.astype(dtype)
            cur = (base + delta).astype(dtype)
        made.append((init, cur))
        group = draw(st.sampled_from([None, "g0", "g1"]))
        name = f"l{i}"
        if group is None:
            current[name], initial[name] = cur, init
        else:
            current.setdefault(group, {})[name] = cur
            initial.setdefault(group, {})[name] = init
    if draw(st.booleans()):
        current = jax.tree.map(jnp.asarray, current)
    return current, initial


PERCENTAGES = st.one_of(
    st.sampled_from([0.1, 0.25, 0.3, 0.5, 0.7, 1.0]),
    st.floats(min_value=0.01, max_value=1.0, allow_nan=False),
)


@settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(
    case=layer_trees(),
    normalize=st.booleans(),
    more=st.booleans(),
    percentages=st.lists(PERCENTAGES, min_size=1, max_size=2, unique=True),
)
def test_selection_matches_numpy_reference(case, normalize, more, percentages):
    current, initial = case
    cur_flat = jaxlayerx.flatten(current)
    init_flat = jaxlayerx.flatten(initial)
    names = list(cur_flat)
    assert names == list(init_flat)

    ref = ref_drifts(cur_flat, init_flat, normalize)
    lib = drift_norms(cur_flat, init_flat, normalize=normalize)
    assert list(lib) == names
    for name in names:
        np.testing.assert_allclose(np.float32(lib[name]), ref[name], rtol=1e-5, atol=0)

    # Exact ties and well separated drifts only: float32 last bits must not decide.
    assume(well_separated(ref.values()))

    for threshold in candidate_thresholds(ref.values()):
        expected = ref_select_threshold(names, ref, threshold, more)
        select = LayerSelectionFunctionConstructor(threshold, 0.5, normalize, more).select_by_threshold()
        arrays, got = select(current, initial)
        assert got == expected, (threshold, {n: float(ref[n]) for n in names})
        assert_arrays_are_current_layers(arrays, got, cur_flat)
        mask = threshold_mask(lib, threshold, select_drift_more=more)
        assert list(mask) == names
        assert [n for n in names if bool(mask[n])] == expected

    for p in percentages:
        expected = ref_select_percentage(names, ref, p, more)
        assert len(expected) == math.ceil(len(names) * p)
        select = LayerSelectionFunctionConstructor(1.0, p, normalize, more).select_by_percentage()
        arrays, got = select(current, initial)
        assert got == expected, (p, {n: float(ref[n]) for n in names})
        assert_arrays_are_current_layers(arrays, got, cur_flat)
        mask = percentage_mask(lib, p, select_drift_more=more)
        assert list(mask) == names
        assert [n for n in names if bool(mask[n])] == expected


# --------------------------------------------------------------------------------------
# Ties, ceil semantics, exact threshold.
# --------------------------------------------------------------------------------------


def _scalar_layers(values: dict[str, float]):
    """1-element float32 layers, initial zeros: the drift of each is |value| (either mode)."""
    current = {k: np.array([v], np.float32) for k, v in values.items()}
    initial = {k: np.zeros(1, np.float32) for k in values}
    return current, initial


@pytest.mark.parametrize(
    "values, p, more, expected",
    [
        # drifts a=1 b=2 c=2 d=3
        ({"a": 1, "b": 2, "c": 2, "d": 3}, 0.5, True, ["b", "d"]),  # k=2: d, then b over c
        ({"a": 1, "b": 2, "c": 2, "d": 3}, 0.5, False, ["a", "b"]),  # k=2: a, then b over c
        ({"a": 1, "b": 2, "c": 2, "d": 3}, 0.25, True, ["d"]),  # k=1
        # drifts a=0 b=5 c=5 d=0
        ({"a": 0, "b": 5, "c": 5, "d": 0}, 0.25, True, ["b"]),  # k=1: b over c
        ({"a": 0, "b": 5, "c": 5, "d": 0}, 0.25, False, ["a"]),  # k=1: a over d
        ({"a": 0, "b": 5, "c": 5, "d": 0}, 0.75, False, ["a", "b", "d"]),  # k=3: a, d, b over c
        ({"a": 0, "b": 5, "c": 5, "d": 0}, 0.75, True, ["a", "b", "c"]),  # k=3: b, c, a over d
        # all equal: the first k in flatten order, both directions
        ({"a": 2, "b": 2, "c": 2, "d": 2}, 0.5, True, ["a", "b"]),
        ({"a": 2, "b": 2, "c": 2, "d": 2}, 0.5, False, ["a", "b"]),
    ],
)
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_go_to_the_earlier_layer(values, p, more, expected, normalize):
    current, initial = _scalar_layers(values)
    assert list(jaxlayerx.flatten(current)) == ["a", "b", "c", "d"]
    arrays, names = LayerSelectionFunctionConstructor(1.0, p, normalize, more).select_by_percentage()(current, initial)
    assert names == expected
    assert [float(a[0]) for a in arrays] == [float(values[n]) for n in expected]
    mask = percentage_mask(
        drift_norms(jaxlayerx.flatten(current), jaxlayerx.flatten(initial)), p, select_drift_more=more
    )
    assert [n for n, keep in mask.items() if bool(keep)] == expected


@pytest.mark.parametrize("more, expected", [(True, "a"), (False, "a")])
def test_ties_follow_flatten_order_not_insertion_order(more, expected):
    # JAX traverses dict keys sorted, so flatten order is a, z although z was inserted first.
    current = {"z": np.array([4.0], np.float32), "a": np.array([4.0], np.float32)}
    initial = {"z": np.zeros(1, np.float32), "a": np.zeros(1, np.float32)}
    assert list(jaxlayerx.flatten(current)) == ["a", "z"]
    # k = ceil(2 * 0.5) = 1 of two equal drifts (4 or 4/1): the first in flatten order
    _, names = select_layers_by_percentage(0.5, False, more, current, initial)
    assert names == [expected]


def test_ceil_semantics_num_layers():
    # math.ceil(N * p) in Python floats, as fl4health computes it. Note: 10 * 0.3 is
    # exactly 3.0 in binary floating point (0.3 rounds down and the product rounds back
    # up), so 10 layers at 0.3 select 3; the float artefact shows at 25 * 0.28.
    assert 10 * 0.3 == 3.0
    assert num_layers_to_exchange(10, 0.3) == 3  # ceil(3.0)
    assert 25 * 0.28 == 7.000000000000001  # 0.28 is stored slightly above 0.28
    assert num_layers_to_exchange(25, 0.28) == 8  # ceil(7.000000000000001), not 7
    assert 100 * 0.07 == 7.000000000000001
    assert num_layers_to_exchange(100, 0.07) == 8
    assert num_layers_to_exchange(10, 0.25) == 3  # ceil(2.5)
    assert num_layers_to_exchange(10, 1.0) == 10
    assert num_layers_to_exchange(10, 1) == 10
    assert num_layers_to_exchange(3, 0.1) == 1  # ceil(0.30000000000000004)
    assert num_layers_to_exchange(7, 0.5) == 4  # ceil(3.5)
    assert num_layers_to_exchange(1, 0.01) == 1  # ceil(0.01)
    assert num_layers_to_exchange(4, 0.5) == 2  # exactly 2.0
    assert isinstance(num_layers_to_exchange(10, 0.3), int)


def test_ceil_float_artefact_in_selection():
    # 25 one-element layers with distinct drifts 1..25 (layer i has drift i + 1);
    # p = 0.28: ceil(25 * 0.28) = ceil(7.000000000000001) = 8 largest: drifts 18..25.
    current, initial = _scalar_layers({f"l{i:02d}": float(i + 1) for i in range(25)})
    _, names = select_layers_by_percentage(0.28, False, True, current, initial)
    assert names == [f"l{i:02d}" for i in range(17, 25)]
    _, names = select_layers_by_percentage(0.28, False, False, current, initial)
    assert names == [f"l{i:02d}" for i in range(8)]


# drifts of l00..l09 (normalize off, one-element layers): a permutation of 1..10
TEN_DRIFTS = [5, 1, 9, 3, 7, 2, 10, 4, 8, 6]


@pytest.mark.parametrize(
    "p, more, expected",
    [
        (0.3, True, ["l02", "l06", "l08"]),  # ceil(10 * 0.3) = ceil(3.0) = 3 largest: 10, 9, 8
        (0.3, False, ["l01", "l03", "l05"]),  # 3 smallest: 1 (l01), 2 (l05), 3 (l03)
        (0.35, True, ["l02", "l04", "l06", "l08"]),  # ceil(3.5) = 4: 10 (l06), 9 (l02), 8 (l08), 7 (l04)
        (0.35, False, ["l01", "l03", "l05", "l07"]),  # 4 smallest: 1 (l01), 2 (l05), 3 (l03), 4 (l07)
        (0.25, True, ["l02", "l06", "l08"]),  # 3 largest: 10, 9, 8
        (0.25, False, ["l01", "l03", "l05"]),  # 3 smallest: 1, 2, 3
        (1.0, True, [f"l{i:02d}" for i in range(10)]),
        (1.0, False, [f"l{i:02d}" for i in range(10)]),
    ],
)
def test_ceil_semantics_selection(p, more, expected):
    current, initial = _scalar_layers({f"l{i:02d}": v for i, v in enumerate(TEN_DRIFTS)})
    arrays, names = LayerSelectionFunctionConstructor(1.0, p, False, more).select_by_percentage()(current, initial)
    assert names == expected
    assert_arrays_are_current_layers(arrays, names, current)
    mask = percentage_mask(
        drift_norms(jaxlayerx.flatten(current), jaxlayerx.flatten(initial), normalize=False), p, select_drift_more=more
    )
    assert sum(bool(v) for v in mask.values()) == len(expected)


@pytest.mark.parametrize("d", [0.1, 1 / 3, 1e-3, 12345.678, 3.0, 1.3 * 2.0**-20, 7e18])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_threshold_is_compared_as_real_numbers(d, sign):
    d32 = np.float32(d)
    # The drift of a 1-element layer with delta +-d32 is |d32| exactly (sqrt(fl(d^2)) == d).
    current = {"x": np.array([sign * d32], np.float32)}
    initial = {"x": np.zeros(1, np.float32)}
    assert ref_drift(current["x"], initial["x"], False) == d32
    assert np.float32(drift_norm(current["x"], initial["x"], normalize=False)) == d32
    tiny = float(np.spacing(d32)) * 1e-3  # far below the float32 spacing at d32
    below, above = float(d32) - tiny, float(d32) + tiny
    # Neither is a float32: both round to d32, so a float32 comparison would be wrong in one
    # direction (d32 > float32(below) is False, though d32 > below in the reals).
    assert below != float(np.float32(below)) and np.float32(below) == d32
    assert above != float(np.float32(above)) and np.float32(above) == d32
    flat_cur, flat_init = jaxlayerx.flatten(current), jaxlayerx.flatten(initial)
    norms = drift_norms(flat_cur, flat_init, normalize=False)
    for threshold in (below, float(d32), above):
        for more in (True, False):
            real = float(d32) > threshold if more else float(d32) <= threshold
            want = ["x"] if real else []
            select = LayerSelectionFunctionConstructor(threshold, 1.0, False, more).select_by_threshold()
            _, names = select(current, initial)
            assert names == want, (threshold, more)
            _, names = select_layers_by_threshold(threshold, False, more, current, initial)
            assert names == want, (threshold, more)
            mask = threshold_mask(norms, threshold, select_drift_more=more)
            assert bool(mask["x"]) == real, (threshold, more)
            jitted = jax.jit(lambda n: threshold_mask(n, threshold, select_drift_more=more))
            assert bool(jitted(norms)["x"]) == real, (threshold, more)


# --------------------------------------------------------------------------------------
# Each model kind.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(BUILDERS))
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("more", [True, False])
def test_model_kinds_against_reference(kind, normalize, more):
    current, initial, deltas, _ = BUILDERS[kind]()
    before_cur, before_init = snapshot(current), snapshot(initial)
    cur_flat, init_flat = jaxlayerx.flatten(current), jaxlayerx.flatten(initial)
    names = list(cur_flat)
    if kind == "nnx":
        assert not any("drop" in n or "rngs" in n for n in names)  # RNG state is not a layer
    ref = ref_drifts(cur_flat, init_flat, normalize)
    assert well_separated(ref.values())
    for threshold in candidate_thresholds(ref.values()):
        arrays, got = LayerSelectionFunctionConstructor(threshold, 0.5, normalize, more).select_by_threshold()(
            current, initial
        )
        assert got == ref_select_threshold(names, ref, threshold, more)
        for array, name in zip(arrays, got):
            assert np.array_equal(array, read_layer(current, name)) and array.dtype == read_layer(current, name).dtype
    for p in (0.1, 0.3, 0.5, 1.0):
        arrays, got = LayerSelectionFunctionConstructor(1.0, p, normalize, more).select_by_percentage()(
            current, initial
        )
        assert got == ref_select_percentage(names, ref, p, more)
        for array, name in zip(arrays, got):
            assert np.array_equal(array, read_layer(current, name)) and array.dtype == read_layer(current, name).dtype
    # selecting reads the models, never changes them
    assert_same_snapshot(before_cur, snapshot(current))
    assert_same_snapshot(before_init, snapshot(initial))


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_model_kinds_hand_expectations(kind):
    current, initial, deltas, (big, mid, a, b) = BUILDERS[kind]()
    names = list(jaxlayerx.flatten(current))
    n = len(names)
    moved = {big, mid, a, b}
    still = [x for x in names if x not in moved]  # zero drift, in flatten order
    first_of_tie = min(a, b, key=names.index)
    # normalize off: drift(big) ~ 8, drift(mid) ~ 3, drift(a) = drift(b) = 1 exactly, others 0.
    _, got = select_layers_by_threshold(2.0, False, True, current, initial)
    assert got == [x for x in names if x in {big, mid}]
    _, got = select_layers_by_threshold(2.0, False, False, current, initial)
    assert got == [x for x in names if x not in {big, mid}]
    _, got = select_layers_by_threshold(0.5, False, True, current, initial)
    assert got == [x for x in names if x in moved]
    # k = 3 largest: big, mid and the first of the tied pair
    _, got = select_layers_by_percentage(2.5 / n, False, True, current, initial)
    assert got == [x for x in names if x in {big, mid, first_of_tie}]
    # k = len(still) + 1 smallest: every unchanged layer, then the first of the tied pair
    _, got = select_layers_by_percentage((len(still) + 0.5) / n, False, False, current, initial)
    assert got == [x for x in names if x in set(still) | {first_of_tie}]
    # normalize on: a and b are both 4-vectors, 1/4 = 0.25 each: still tied.
    _, got = select_layers_by_percentage((len(still) + 0.5) / n, True, False, current, initial)
    assert got == [x for x in names if x in set(still) | {first_of_tie}]
    # the arrays are the current model's layers, read off the model directly
    arrays, got = select_layers_by_threshold(2.0, False, True, current, initial)
    for array, name in zip(arrays, got):
        expected = read_layer(initial, name).astype(np.float64) + deltas[name]
        np.testing.assert_allclose(array.astype(np.float64), expected, rtol=1e-6)
        assert np.array_equal(array, read_layer(current, name))


# --------------------------------------------------------------------------------------
# Pure mask forms under jit and vmap.
# --------------------------------------------------------------------------------------

# Keys are sorted and free of "/", so each flat dict is also a plain model with the same flatten.
VMAP_SHAPES = collections.OrderedDict(
    [("enc_b", (2,)), ("enc_w", (3, 2)), ("out_b", (1,)), ("out_w", (2, 2)), ("t", ())]
)
# Client c, layer j: one element of value CLIENT_VALUES[c][j] on zero initial layers.
# normalize off: drift = |value|; normalize on: |value| / size (sizes 2, 6, 1, 4, 1).
CLIENT_VALUES = [
    [2.0, 6.0, 1.0, 8.0, 3.0],  # normalized: 1, 1, 1, 2, 3 (ties between enc_b, enc_w, out_b)
    [5.0, 1.0, 7.0, 0.0, 2.0],
    [3.0, 3.0, 3.0, 0.0, 0.0],  # normalize off: three-way tie, two zeros
]


def _client_flats():
    curs, inits = [], []
    for values in CLIENT_VALUES:
        cur = collections.OrderedDict()
        init = collections.OrderedDict()
        for (name, shape), v in zip(VMAP_SHAPES.items(), values):
            cur[name] = jnp.asarray(one_hot_delta(shape, v), jnp.float32)
            init[name] = jnp.zeros(shape, jnp.float32)
        curs.append(cur)
        inits.append(init)
    return curs, inits


def _stack(flats):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *flats)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("more", [True, False])
@pytest.mark.parametrize("p", [0.2, 0.5, 1.0])
def test_percentage_mask_under_vmap_and_jit(normalize, more, p):
    curs, inits = _client_flats()
    names = list(VMAP_SHAPES)
    stacked_cur, stacked_init = _stack(curs), _stack(inits)
    assert list(stacked_cur) == names

    def per_client(c, i):
        return percentage_mask(drift_norms(c, i, normalize=normalize), p, select_drift_more=more)

    masks = jax.jit(jax.vmap(per_client))(stacked_cur, stacked_init)
    assert list(masks) == names
    for name in names:
        assert masks[name].shape == (len(curs),) and masks[name].dtype == jnp.bool_
    jitted = jax.jit(per_client)
    for c, (cur, init) in enumerate(zip(curs, inits)):
        ref = ref_drifts(cur, init, normalize)
        expected = ref_select_percentage(names, ref, p, more)
        _, host = select_layers_by_percentage(p, normalize, more, cur, init)
        assert host == expected
        assert [n for n in names if bool(masks[n][c])] == expected
        single = jitted(cur, init)
        assert [n for n in names if bool(single[n])] == expected


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("more", [True, False])
def test_threshold_mask_under_vmap_and_jit(normalize, more):
    curs, inits = _client_flats()
    names = list(VMAP_SHAPES)
    stacked_cur, stacked_init = _stack(curs), _stack(inits)
    threshold = 1.5 if normalize else 2.5  # far from every drift listed above
    masks = jax.vmap(
        lambda c, i: threshold_mask(drift_norms(c, i, normalize=normalize), threshold, select_drift_more=more)
    )(stacked_cur, stacked_init)
    # an array threshold, one per client, traced under vmap (compared in float32)
    per_client_thresholds = jnp.asarray([threshold, 0.5, 4.5], jnp.float32)
    masks_t = jax.jit(
        jax.vmap(lambda c, i, t: threshold_mask(drift_norms(c, i, normalize=normalize), t, select_drift_more=more))
    )(stacked_cur, stacked_init, per_client_thresholds)
    for c, (cur, init) in enumerate(zip(curs, inits)):
        ref = ref_drifts(cur, init, normalize)
        expected = ref_select_threshold(names, ref, threshold, more)
        _, host = select_layers_by_threshold(threshold, normalize, more, cur, init)
        assert host == expected
        assert [n for n in names if bool(masks[n][c])] == expected
        t_c = float(per_client_thresholds[c])
        assert [n for n in names if bool(masks_t[n][c])] == ref_select_threshold(names, ref, t_c, more)


# --------------------------------------------------------------------------------------
# Errors.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0, 0.0, -0.1, 1.5, 1.0000001, float("nan"), float("-inf"), float("inf")])
def test_constructor_rejects_bad_percentage(p):
    with pytest.raises(ValueError, match="exchange_percentage"):
        LayerSelectionFunctionConstructor(0.1, p)
    with pytest.raises(ValueError, match="exchange_percentage"):
        percentage_mask({"a": jnp.float32(1.0)}, p)
    current, initial = _scalar_layers({"a": 1.0})
    before = snapshot(current)
    with pytest.raises(ValueError, match="exchange_percentage"):
        select_layers_by_percentage(p, True, True, current, initial)
    assert_same_snapshot(before, snapshot(current))


@pytest.mark.parametrize("t", [0, 0.0, -1e-9, -3.0, float("nan"), float("-inf")])
def test_constructor_rejects_bad_threshold(t):
    with pytest.raises(ValueError, match="norm_threshold"):
        LayerSelectionFunctionConstructor(t, 0.5)
    current, initial = _scalar_layers({"a": 1.0})
    with pytest.raises(ValueError, match="norm_threshold"):
        select_layers_by_threshold(t, True, True, current, initial)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"norm_threshold": "0.1", "exchange_percentage": 0.5}, "norm_threshold"),
        ({"norm_threshold": 0.1, "exchange_percentage": "0.5"}, "exchange_percentage"),
        ({"norm_threshold": None, "exchange_percentage": 0.5}, "norm_threshold"),
        ({"norm_threshold": 0.1, "exchange_percentage": None}, "exchange_percentage"),
    ],
)
def test_constructor_rejects_non_numbers_with_type_error(kwargs, field):
    # pytest.raises(TypeError) fails on an AssertionError (or any other type).
    with pytest.raises(TypeError, match=field):
        LayerSelectionFunctionConstructor(**kwargs)


def test_constructor_accepts_boundaries_and_keeps_values():
    ctor = LayerSelectionFunctionConstructor(1e-12, 1.0, normalize=False, select_drift_more=False)
    assert ctor.norm_threshold == 1e-12 and ctor.exchange_percentage == 1.0
    assert ctor.normalize is False and ctor.select_drift_more is False
    LayerSelectionFunctionConstructor(3, 1)  # ints are real numbers
    LayerSelectionFunctionConstructor(np.float64(0.5), np.float32(0.5))
    assert callable(ctor.select_by_threshold()) and callable(ctor.select_by_percentage())


@pytest.mark.parametrize("rule", ["threshold", "percentage"])
@pytest.mark.parametrize("kind", list(BUILDERS))
def test_missing_initial_model(rule, kind):
    current, _, _, _ = BUILDERS[kind]()
    before = snapshot(current)
    ctor = LayerSelectionFunctionConstructor(0.1, 0.5)
    select = ctor.select_by_threshold() if rule == "threshold" else ctor.select_by_percentage()
    with pytest.raises(ValueError, match="initial_model"):
        select(current, None)
    assert_same_snapshot(before, snapshot(current))


def _plain_pair():
    current = {"enc": {"w": np.ones((3, 4), np.float32), "b": np.ones(4, np.float32)}, "out": np.ones(2, np.float16)}
    initial = {"enc": {"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float32)}, "out": np.zeros(2, np.float16)}
    return current, initial


@pytest.mark.parametrize("rule", ["threshold", "percentage"])
def test_initial_model_missing_a_layer(rule):
    current, initial = _plain_pair()
    del initial["enc"]["b"]
    before_cur, before_init = snapshot(current), snapshot(initial)
    ctor = LayerSelectionFunctionConstructor(0.1, 0.5)
    select = ctor.select_by_threshold() if rule == "threshold" else ctor.select_by_percentage()
    with pytest.raises(KeyError, match=re.escape("'enc/b'")) as info:
        select(current, initial)
    assert "initial model" in str(info.value)
    assert_same_snapshot(before_cur, snapshot(current))
    assert_same_snapshot(before_init, snapshot(initial))


@pytest.mark.parametrize("rule", ["threshold", "percentage"])
def test_initial_model_with_an_extra_layer(rule):
    current, initial = _plain_pair()
    initial["extra"] = {"w": np.zeros(3, np.float32)}
    before_cur, before_init = snapshot(current), snapshot(initial)
    ctor = LayerSelectionFunctionConstructor(0.1, 0.5)
    select = ctor.select_by_threshold() if rule == "threshold" else ctor.select_by_percentage()
    with pytest.raises(KeyError, match=re.escape("'extra/w'")):
        select(current, initial)
    assert_same_snapshot(before_cur, snapshot(current))
    assert_same_snapshot(before_init, snapshot(initial))


@pytest.mark.parametrize("rule", ["threshold", "percentage"])
def test_initial_model_with_a_different_shape(rule):
    current, initial = _plain_pair()
    initial["enc"]["w"] = np.zeros((4, 3), np.float32)
    before_cur, before_init = snapshot(current), snapshot(initial)
    ctor = LayerSelectionFunctionConstructor(0.1, 0.5)
    select = ctor.select_by_threshold() if rule == "threshold" else ctor.select_by_percentage()
    with pytest.raises(ValueError, match=r"enc/w.*\(3, 4\).*\(4, 3\)"):
        select(current, initial)
    assert_same_snapshot(before_cur, snapshot(current))
    assert_same_snapshot(before_init, snapshot(initial))


def test_nnx_initial_model_with_a_different_architecture():
    class Wider(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(3, 5, rngs=rngs), nnx.Linear(5, 2, rngs=rngs)])
            self.bn = nnx.BatchNorm(4, rngs=rngs)
            self.drop = nnx.Dropout(0.1, rngs=rngs)

    m = NNXNet(nnx.Rngs(0))
    other = Wider(nnx.Rngs(1))
    before_m, before_other = snapshot(m), snapshot(other)
    # names in flatten order: bn/..., layers/0/bias (4,) vs (5,) is the first mismatch
    with pytest.raises(ValueError, match=r"layers/0/bias.*\(4,\).*\(5,\)"):
        select_layers_by_threshold(0.1, True, True, m, other)
    with pytest.raises(ValueError, match=r"layers/0/bias.*\(4,\).*\(5,\)"):
        select_layers_by_percentage(0.5, True, True, m, other)
    assert_same_snapshot(before_m, snapshot(m))
    assert_same_snapshot(before_other, snapshot(other))


def test_check_matching_layers_direct():
    a = collections.OrderedDict([("x", np.zeros(2)), ("y", np.zeros((1, 3)))])
    check_matching_layers(a, collections.OrderedDict([("x", np.ones(2)), ("y", np.ones((1, 3)))]))  # fine
    with pytest.raises(KeyError, match=re.escape("'y'")):
        check_matching_layers(a, {"x": np.zeros(2)})
    with pytest.raises(KeyError, match=re.escape("'z'")):
        check_matching_layers(a, {"x": np.zeros(2), "y": np.zeros((1, 3)), "z": np.zeros(1)})
    with pytest.raises(ValueError, match=r"'y'.*\(1, 3\).*\(3,\)"):
        check_matching_layers(a, {"x": np.zeros(2), "y": np.zeros(3)})
    with pytest.raises(KeyError, match=re.escape("'y'")):
        drift_norms(a, {"x": np.zeros(2)})


def test_empty_model_selects_nothing():
    assert select_layers_by_percentage(0.5, True, True, {}, {}) == ([], [])
    assert select_layers_by_threshold(0.5, True, True, {}, {}) == ([], [])
    assert percentage_mask({}, 0.5) == {}


# --------------------------------------------------------------------------------------
# One jitted computation, one device round trip, no retrace.
# --------------------------------------------------------------------------------------


def test_selection_is_one_jitted_computation_without_retrace(monkeypatch):
    fn_p, fn_t = sel._percentage_mask_vector, sel._threshold_mask_vector
    assert hasattr(fn_p, "lower") and hasattr(fn_t, "lower")  # jax.jit-wrapped
    if not (hasattr(fn_p, "_cache_size") and hasattr(fn_p, "clear_cache")):
        pytest.skip("this jax has no _cache_size() on jitted functions")

    # Count Python-level drift computations: they run only while tracing.
    calls = []
    real_drift_norm = sel.drift_norm

    def counting(*args, **kwargs):
        calls.append(1)
        return real_drift_norm(*args, **kwargs)

    monkeypatch.setattr(sel, "drift_norm", counting)
    fn_p.clear_cache()
    fn_t.clear_cache()
    try:
        rng = np.random.default_rng(3)
        shapes = {"a": (3, 2), "b": (4,), "c": (), "d": (2, 2)}
        init = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
        cur1 = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
        cur2 = {k: rng.normal(size=s).astype(np.float32) * 10 for k, s in shapes.items()}
        names = list(jaxlayerx.flatten(cur1))

        select = LayerSelectionFunctionConstructor(0.5, 0.5, True, True).select_by_percentage()
        for cur in (cur1, cur2):
            _, got = select(cur, init)
            ref = ref_drifts(jaxlayerx.flatten(cur), jaxlayerx.flatten(init), True)
            assert got == ref_select_percentage(names, ref, 0.5, True)
        assert fn_p._cache_size() == 1
        assert len(calls) == len(shapes)  # traced once: one drift_norm per layer, then none

        calls.clear()
        for threshold, cur in ((0.5, cur1), (0.7, cur2), (0.05, cur1)):
            select = LayerSelectionFunctionConstructor(threshold, 0.5, True, True).select_by_threshold()
            _, got = select(cur, init)
            ref = ref_drifts(jaxlayerx.flatten(cur), jaxlayerx.flatten(init), True)
            assert got == ref_select_threshold(names, ref, threshold, True)
        # the threshold is a traced argument: new values do not retrace
        assert fn_t._cache_size() == 1
        assert len(calls) == len(shapes)
    finally:
        fn_p.clear_cache()
        fn_t.clear_cache()
