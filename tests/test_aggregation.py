"""Tests for jaxlayerx/aggregation.py: FedAvgDynamicLayer.aggregate and masked_fedavg.

Every expected value comes from hand arithmetic (shown in comments) or from the small
float64 numpy reference ``reference_fedavg`` below, which is written independently of the
library: a plain loop that accumulates ``w * x`` and ``w`` per layer name.
"""

from __future__ import annotations

import functools
import itertools
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxlayerx import FedAvgDynamicLayer, masked_fedavg, pack_layers

# --------------------------------------------------------------------------------------
# Helpers (independent of the library)
# --------------------------------------------------------------------------------------


def payload(layers: dict) -> list:
    """A packed payload of ``name -> array`` (in dict order)."""
    return pack_layers([np.asarray(v) for v in layers.values()], list(layers))


def reference_fedavg(results, weighted=True):
    """Plain float64 FedAvg over named layers: ``sum w_i x_i / sum w_i`` per layer."""
    sums: dict = {}
    totals: dict = {}
    for packed, n in results:
        names = [str(x) for x in np.asarray(packed[-1]).tolist()]
        for name, array in zip(names, packed[:-1]):
            w = float(n) if weighted else 1.0
            sums[name] = sums.get(name, 0.0) + w * np.asarray(array).astype(np.float64)
            totals[name] = totals.get(name, 0.0) + w
    return {name: sums[name] / totals[name] for name in sums}


def snapshot(results):
    """A deep copy of results, to check later that nothing was modified."""
    return [([np.array(a, copy=True) for a in packed], n) for packed, n in results]


def assert_unchanged(results, before):
    assert len(results) == len(before)
    for (packed, n), (packed0, n0) in zip(results, before):
        assert n == n0 and type(n) is type(n0)
        assert isinstance(packed, list) and len(packed) == len(packed0)
        for a, a0 in zip(packed, packed0):
            assert a.dtype == a0.dtype and a.shape == a0.shape
            assert np.asarray(a).tobytes() == np.asarray(a0).tobytes()


def bits(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array).tobytes()


def assert_bit_identical(got: dict, want: dict):
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert got[name].shape == want[name].shape, name
        assert bits(got[name]) == bits(want[name]), name


def varied_float32(rng, shape):
    """float32 values of random sign and magnitudes spanning 1e-6 .. 1e6."""
    mags = 10.0 ** rng.uniform(-6, 6, size=shape)
    return (rng.choice([-1.0, 1.0], size=shape) * mags * rng.uniform(1, 2, size=shape)).astype(np.float32)


def random_results(rng, n_clients, layer_shapes, *, weight_high=1000, min_layers=0, values=None):
    """Random payloads: each client sends a random subset of the layers (in random order)."""
    names = list(layer_shapes)
    results = []
    for _ in range(n_clients):
        k = int(rng.integers(min_layers, len(names) + 1))
        chosen = list(rng.choice(names, size=k, replace=False)) if k else []
        layers = {
            str(name): (values or (lambda r, s: r.uniform(1.0, 2.0, size=s).astype(np.float32)))(
                rng, layer_shapes[name]
            )
            for name in chosen
        }
        results.append((payload(layers), int(rng.integers(1, weight_high + 1))))
    return results


# --------------------------------------------------------------------------------------
# Hand-computed values
# --------------------------------------------------------------------------------------

A_a = np.array([1.0, 2.0], np.float32)
A_b = np.array([10.0, 20.0], np.float32)
B_b = np.array([40.0, 50.0], np.float32)
B_c = np.array([[7.0, -7.5]], np.float32)
C_b = np.array([100.0, -100.0], np.float32)


def overlapping_results():
    # A sends 'a','b' (10 examples); B sends 'b','c' (30); C sends 'b' (60).
    return [
        (payload({"b": A_b, "a": A_a}), 10),
        (payload({"c": B_c, "b": B_b}), 30),
        (payload({"b": C_b}), 60),
    ]


def test_overlapping_weighted_hand_computed():
    results = overlapping_results()
    before = snapshot(results)
    out = FedAvgDynamicLayer().aggregate(results)
    assert list(out) == ["a", "b", "c"]
    # b = (10*[10,20] + 30*[40,50] + 60*[100,-100]) / (10+30+60)
    #   = ([100,200] + [1200,1500] + [6000,-6000]) / 100 = [7300,-4300]/100 = [73,-43]
    np.testing.assert_array_equal(out["b"], np.array([73.0, -43.0], np.float32))
    # 'a' only from A, 'c' only from B: their own values exactly.
    np.testing.assert_array_equal(out["a"], A_a)
    np.testing.assert_array_equal(out["c"], B_c)
    assert all(v.dtype == np.float32 for v in out.values())
    assert out["c"].shape == (1, 2)
    assert_unchanged(results, before)


def test_overlapping_unweighted_hand_computed():
    results = overlapping_results()
    out = FedAvgDynamicLayer(weighted_aggregation=False).aggregate(results)
    assert list(out) == ["a", "b", "c"]
    # b = ([10,20] + [40,50] + [100,-100]) / 3 = [150,-30]/3 = [50,-10]
    np.testing.assert_array_equal(out["b"], np.array([50.0, -10.0], np.float32))
    np.testing.assert_array_equal(out["a"], A_a)
    np.testing.assert_array_equal(out["c"], B_c)


def test_weighted_is_default():
    results = overlapping_results()
    a = FedAvgDynamicLayer().aggregate(results)
    b = FedAvgDynamicLayer(weighted_aggregation=True).aggregate(results)
    assert_bit_identical(a, b)
    # and differs from the unweighted one (73 vs 50)
    assert FedAvgDynamicLayer(False).aggregate(results)["b"][0] == 50.0
    assert a["b"][0] == 73.0


def test_disjoint_layer_sets():
    x = np.array([[1.5, 2.5], [3.5, 4.5]], np.float32)
    y = np.array([-1.0], np.float32)
    z = np.float32(3.25) * np.ones((), np.float32)  # a scalar layer
    results = [(payload({"x": x}), 5), (payload({"y": y, "z": z}), 7)]
    for weighted in (True, False):
        out = FedAvgDynamicLayer(weighted).aggregate(results)
        assert list(out) == ["x", "y", "z"]
        np.testing.assert_array_equal(out["x"], x)
        np.testing.assert_array_equal(out["y"], y)
        assert out["z"].shape == () and out["z"] == np.float32(3.25)


@pytest.mark.parametrize(
    "empty",
    [
        lambda: [np.array([], dtype=str)],
        lambda: pack_layers([], []),
        lambda: [np.array([])],  # fl4health packs an empty selection as a float array
    ],
    ids=["np_str_empty", "pack_layers_empty", "fl4health_float_empty"],
)
def test_empty_payload_contributes_nothing(empty):
    results = overlapping_results()
    # An empty client with a huge weight, in the middle of the list.
    with_empty = results[:1] + [(empty(), 1_000_000)] + results[1:]
    before = snapshot(with_empty)
    for weighted in (True, False):
        want = FedAvgDynamicLayer(weighted).aggregate(results)
        got = FedAvgDynamicLayer(weighted).aggregate(with_empty)
        assert_bit_identical(got, want)
    assert_unchanged(with_empty, before)
    # all clients empty (or no clients at all) -> {}
    assert FedAvgDynamicLayer().aggregate([(empty(), 3), (empty(), 0)]) == {}
    assert FedAvgDynamicLayer(False).aggregate([(empty(), 3)]) == {}
    assert FedAvgDynamicLayer().aggregate([]) == {}


def test_zero_example_client_contributes_nothing_when_weighted():
    # 'w' from a client with 0 examples and a client with 4: weighted result = the latter's.
    w0 = np.array([100.0, 100.0], np.float32)
    w1 = np.array([1.0, 3.0], np.float32)
    results = [(payload({"w": w0}), 0), (payload({"w": w1}), 4)]
    np.testing.assert_array_equal(FedAvgDynamicLayer().aggregate(results)["w"], w1)
    # unweighted: (100+1)/2 = 50.5, (100+3)/2 = 51.5
    np.testing.assert_array_equal(FedAvgDynamicLayer(False).aggregate(results)["w"], np.array([50.5, 51.5], np.float32))


def test_numpy_integer_num_examples_accepted():
    results = [
        (payload({"w": np.array([0.0], np.float32)}), np.int64(1)),
        (payload({"w": np.array([4.0], np.float32)}), np.int32(3)),
    ]
    # (1*0 + 3*4) / 4 = 3
    np.testing.assert_array_equal(FedAvgDynamicLayer().aggregate(results)["w"], np.array([3.0], np.float32))


# --------------------------------------------------------------------------------------
# Against the float64 reference on random data
# --------------------------------------------------------------------------------------

SHAPES = {
    "conv/kernel": (3, 3, 2),
    "conv/bias": (2,),
    "dense/kernel": (5, 4),
    "dense/bias": (4,),
    "bn/mean": (4,),
    "bn/var": (4,),
    "scalar": (),
    "z/last": (7,),
}


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_matches_float64_reference(seed, weighted):
    rng = np.random.default_rng(seed)
    results = random_results(rng, 12, SHAPES)
    before = snapshot(results)
    out = FedAvgDynamicLayer(weighted).aggregate(results)
    ref = reference_fedavg(results, weighted)
    assert list(out) == sorted(ref)
    for name in ref:
        assert isinstance(out[name], np.ndarray)
        assert out[name].dtype == np.float32 and out[name].shape == SHAPES[name]
        assert np.allclose(out[name], ref[name], rtol=1e-6), name
    assert_unchanged(results, before)


@settings(deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_clients=st.integers(1, 9),
    weighted=st.booleans(),
)
def test_random_signed_matches_reference_hypothesis(seed, n_clients, weighted):
    # Signed values: the float32 error is bounded relative to the weighted mean of |x|.
    rng = np.random.default_rng(seed)
    shapes = {"a": (3,), "b": (2, 2), "c": (), "d": (5,)}
    results = random_results(
        rng, n_clients, shapes, weight_high=50, values=lambda r, s: r.normal(size=s).astype(np.float32)
    )
    out = FedAvgDynamicLayer(weighted).aggregate(results)
    ref = reference_fedavg(results, weighted)
    abs_ref = reference_fedavg([([np.abs(a) for a in p[:-1]] + [p[-1]], n) for p, n in results], weighted)
    assert list(out) == sorted(ref)
    for name in ref:
        assert out[name].shape == shapes[name] and out[name].dtype == np.float32
        assert np.all(np.abs(out[name] - ref[name]) <= 1e-6 * abs_ref[name] + 1e-30), name


def test_large_case_matches_float64_reference():
    # 10 clients, 20 layers of 64x64, each client sends a random half of the layers.
    rng = np.random.default_rng(1234)
    names = [f"layer_{i:02d}/kernel" for i in range(20)]
    results = []
    for _ in range(10):
        chosen = rng.choice(names, size=10, replace=False)
        layers = {str(n): rng.uniform(0.5, 1.5, size=(64, 64)).astype(np.float32) for n in chosen}
        results.append((payload(layers), int(rng.integers(1, 5000))))
    for weighted in (True, False):
        out = FedAvgDynamicLayer(weighted).aggregate(results)
        ref = reference_fedavg(results, weighted)
        assert list(out) == sorted(ref)
        for name in ref:
            assert out[name].shape == (64, 64) and out[name].dtype == np.float32
            assert np.allclose(out[name], ref[name], rtol=1e-6, atol=0), name


# --------------------------------------------------------------------------------------
# Keys, dtypes, integer rounding
# --------------------------------------------------------------------------------------


def test_result_keys_sorted():
    v = np.zeros(1, np.float32)
    results = [
        (payload({"z": v, "m/1": v, "B": v}), 1),
        (payload({"a": v, "m/0": v}), 2),
        (payload({"Z": v, "b": v, "m/1": v}), 3),
    ]
    out = FedAvgDynamicLayer().aggregate(results)
    assert list(out) == sorted(["z", "m/1", "B", "a", "m/0", "Z", "b"])
    assert list(out) == ["B", "Z", "a", "b", "m/0", "m/1", "z"]


def test_float_dtypes_preserved_with_values():
    bf16 = ml_dtypes.bfloat16
    results = [
        (
            payload(
                {
                    "h": np.array([1.0, 2.0], np.float16),
                    "bf": np.array([1.0, 2.0], bf16),
                    "f": np.array([1.0, 2.0], np.float32),
                    "d": np.array([1.0, 2.0], np.float64),
                }
            ),
            1,
        ),
        (
            payload(
                {
                    "h": np.array([4.0, 8.0], np.float16),
                    "bf": np.array([5.0, -2.0], bf16),
                    "f": np.array([0.25, 0.5], np.float32),
                    "d": np.array([0.1, 0.2], np.float64),
                }
            ),
            3,
        ),
    ]
    before = snapshot(results)
    out = FedAvgDynamicLayer().aggregate(results)
    assert out["h"].dtype == np.float16
    assert out["bf"].dtype == bf16
    assert out["f"].dtype == np.float32
    assert out["d"].dtype == np.float64
    # h = (1*[1,2] + 3*[4,8]) / 4 = [13, 26]/4 = [3.25, 6.5]   (exact in float16)
    np.testing.assert_array_equal(out["h"].astype(np.float64), [3.25, 6.5])
    # bf = (1*[1,2] + 3*[5,-2]) / 4 = [16, -4]/4 = [4, -1]     (exact in bfloat16)
    np.testing.assert_array_equal(out["bf"].astype(np.float64), [4.0, -1.0])
    # f = (1*[1,2] + 3*[0.25,0.5]) / 4 = [1.75, 3.5]/4 = [0.4375, 0.875]
    np.testing.assert_array_equal(out["f"], np.array([0.4375, 0.875], np.float32))
    # d = (1*[1,2] + 3*[0.1,0.2]) / 4 = [0.325, 0.65] in float64 precision
    np.testing.assert_allclose(out["d"], [(1 + 3 * 0.1) / 4, (2 + 3 * 0.2) / 4], rtol=1e-15)
    assert_unchanged(results, before)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32, np.float64])
def test_low_precision_random_close_to_reference(dtype):
    rng = np.random.default_rng(7)
    results = [
        (payload({"w": rng.uniform(1, 2, size=(6, 5)).astype(dtype)}), int(rng.integers(1, 100))) for _ in range(6)
    ]
    out = FedAvgDynamicLayer().aggregate(results)["w"]
    ref = reference_fedavg(results)["w"]
    assert out.dtype == np.dtype(dtype)
    # accumulated in float32 (float64 for float64): for half types only the final rounding to
    # `dtype` matters (<= 1 ulp); float64 keeps a few ulp of summation error.
    rtol = 1e-13 if dtype == np.float64 else float(ml_dtypes.finfo(dtype).eps)
    np.testing.assert_allclose(out.astype(np.float64), ref, rtol=rtol, atol=0)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.int16, np.uint8])
def test_integer_layers_rounded_half_to_even(dtype):
    def agg(values, counts=None, weighted=False):
        counts = counts or [1] * len(values)
        res = [(payload({"i": np.array(v, dtype)}), n) for v, n in zip(values, counts)]
        out = FedAvgDynamicLayer(weighted).aggregate(res)["i"]
        assert out.dtype == np.dtype(dtype)
        return out

    # unweighted (1 + 2)/2 = 1.5 -> 2 (ties to even); (2 + 3)/2 = 2.5 -> 2 (ties to even)
    # (3 + 4)/2 = 3.5 -> 4; (4 + 5)/2 = 4.5 -> 4
    # three clients: (1 + 2 + 2)/3 = 1.67 -> 2; (1 + 1 + 2)/3 = 1.33 -> 1
    np.testing.assert_array_equal(agg([[1, 2, 3, 4], [2, 3, 4, 5]]), [2, 2, 4, 4])
    np.testing.assert_array_equal(agg([[1, 1], [2, 1], [2, 2]]), [2, 1])
    # weighted (w = 1 and 3): (1*0 + 3*10)/4 = 30/4 = 7.5 -> 8 (8 is even);
    #   (1*1 + 3*10)/4 = 31/4 = 7.75 -> 8;  (1*2 + 3*7)/4 = 23/4 = 5.75 -> 6
    np.testing.assert_array_equal(agg([[0, 1, 2], [10, 10, 7]], counts=[1, 3], weighted=True), [8, 8, 6])
    # (1*7 + 3*2)/4 = 13/4 = 3.25 -> 3; (1*2 + 3*1)/4 = 5/4 = 1.25 -> 1; (1*3 + 3*1)/4 = 1.5 -> 2
    np.testing.assert_array_equal(agg([[7, 2, 3], [2, 1, 1]], counts=[1, 3], weighted=True), [3, 1, 2])
    np.testing.assert_array_equal(agg([[0, 1, 7], [10, 10, 2]], counts=[1, 3], weighted=True), [8, 8, 3])
    if np.issubdtype(dtype, np.signedinteger):
        # (-1 + -2)/2 = -1.5 -> -2; (-2 + -3)/2 = -2.5 -> -2; (-1 + 0)/2 = -0.5 -> 0
        np.testing.assert_array_equal(agg([[-1, -2, -1], [-2, -3, 0]]), [-2, -2, 0])


def test_int32_hand_values_from_spec():
    # int32 1 and 2 unweighted -> 2 (1.5 rounds to 2); 2 and 3 -> 2 (2.5 rounds to 2)
    res = [
        (payload({"p": np.array(1, np.int32), "q": np.array(2, np.int32)}), 5),
        (payload({"p": np.array(2, np.int32), "q": np.array(3, np.int32)}), 9),
    ]
    out = FedAvgDynamicLayer(weighted_aggregation=False).aggregate(res)
    assert out["p"].dtype == np.int32 and out["q"].dtype == np.int32
    assert int(out["p"]) == 2 and int(out["q"]) == 2


def test_bool_layers_rounded():
    res = [
        (payload({"m": np.array([True, True, False, True])}), 1),
        (payload({"m": np.array([False, True, False, True])}), 1),
        (payload({"m": np.array([True, False, False, True])}), 1),
    ]
    out = FedAvgDynamicLayer(False).aggregate(res)["m"]
    assert out.dtype == np.bool_
    # means 2/3, 2/3, 0, 1 -> True, True, False, True
    np.testing.assert_array_equal(out, [True, True, False, True])


# --------------------------------------------------------------------------------------
# Permutation invariance (bit-identical)
# --------------------------------------------------------------------------------------


def _naive_float32_sum_depends_on_order(results, weighted):
    """True when plain float32 left-to-right summation gives different bits for some order."""

    def naive(rs):
        acc = {}
        for packed, n in rs:
            names = [str(x) for x in packed[-1].tolist()]
            for name, a in zip(names, packed[:-1]):
                w = np.float32(n if weighted else 1)
                acc[name] = acc.get(name, np.zeros_like(a, np.float32)) + w * a.astype(np.float32)
        return acc

    base = naive(results)
    for perm in itertools.islice(itertools.permutations(range(len(results))), 1, 60):
        other = naive([results[i] for i in perm])
        if any(bits(other[k]) != bits(base[k]) for k in base):
            return True
    return False


def _check_permutations(results, weighted, n_perms=8, seed=0):
    before = snapshot(results)
    agg = FedAvgDynamicLayer(weighted)
    base = agg.aggregate(results)
    rng = np.random.default_rng(seed)
    perms = [list(reversed(range(len(results))))] + [list(rng.permutation(len(results))) for _ in range(n_perms)]
    for perm in perms:
        assert_bit_identical(agg.aggregate([results[i] for i in perm]), base)
    assert_unchanged(results, before)
    return base


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_permutation_invariance_random(seed, weighted):
    rng = np.random.default_rng(100 + seed)
    shapes = {f"l{i}": s for i, s in enumerate([(8,), (3, 4), (), (20,), (2, 2, 5), (33,)])}
    results = random_results(rng, 7, shapes, weight_high=5, min_layers=2, values=varied_float32)
    # the data really makes float32 summation order matter (so the test can fail)
    assert _naive_float32_sum_depends_on_order(results, weighted)
    base = _check_permutations(results, weighted, seed=seed)
    ref = reference_fedavg(results, weighted)
    abs_ref = reference_fedavg([([np.abs(a) for a in p[:-1]] + [p[-1]], n) for p, n in results], weighted)
    for name in ref:
        assert np.all(np.abs(base[name] - ref[name]) <= 1e-6 * abs_ref[name]), name


@pytest.mark.parametrize("weighted", [True, False])
def test_permutation_invariance_byte_identical_clients(weighted):
    rng = np.random.default_rng(5)
    same = varied_float32(rng, (40,))
    results = [
        (payload({"w": same}), 7),
        (payload({"w": same.copy()}), 7),  # byte-identical array, same weight
        (payload({"w": varied_float32(rng, (40,)), "v": varied_float32(rng, (3,))}), 7),
        (payload({"w": varied_float32(rng, (40,))}), 2),
        (payload({"v": varied_float32(rng, (3,)), "w": varied_float32(rng, (40,))}), 7),
    ]
    agg = FedAvgDynamicLayer(weighted)
    base = agg.aggregate(results)
    for perm in itertools.permutations(range(len(results))):
        assert_bit_identical(agg.aggregate([results[i] for i in perm]), base)
    ref = reference_fedavg(results, weighted)
    np.testing.assert_allclose(base["w"], ref["w"], rtol=1e-3, atol=1e-3 * np.abs(ref["w"]).max())


@pytest.mark.parametrize("weighted", [True, False])
def test_permutation_invariance_equal_weights_equal_prefix(weighted):
    # Same weight, identical first 99 elements, different last elements of wildly different
    # magnitudes: float32 sums of the last element depend on order:
    # (1e8 + 1) - 1e8 = 0 in float32 but (1e8 - 1e8) + 1 = 1.
    prefix = np.linspace(-3, 3, 99, dtype=np.float32)
    tails = [np.float32(1e8), np.float32(1.0), np.float32(-1e8), np.float32(3e-3)]
    results = [(payload({"w": np.append(prefix, t).astype(np.float32).reshape(10, 10)}), 4) for t in tails]
    assert _naive_float32_sum_depends_on_order(results, weighted)
    agg = FedAvgDynamicLayer(weighted)
    base = agg.aggregate(results)
    for perm in itertools.permutations(range(len(results))):
        assert_bit_identical(agg.aggregate([results[i] for i in perm]), base)
    # the identical elements average to themselves: 4*w*x / (4*w) with x exact
    np.testing.assert_allclose(base["w"].ravel()[:99], prefix, rtol=1e-6)


def test_permutation_invariance_with_mixed_dtypes_and_ints():
    rng = np.random.default_rng(11)
    results = []
    for n in [3, 3, 3, 8, 1, 3]:
        layers = {
            "h": rng.uniform(-100, 100, size=(17,)).astype(np.float16),
            "bf": rng.uniform(-100, 100, size=(17,)).astype(ml_dtypes.bfloat16),
            "f": varied_float32(rng, (17,)),
            "i": rng.integers(-1000, 1000, size=(17,)).astype(np.int32),
        }
        results.append((payload(layers), n))
    for weighted in (True, False):
        _check_permutations(results, weighted, n_perms=10, seed=3)


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape0, shape1",
    [((2, 3), (3, 2)), ((6,), (1, 6)), ((1, 6), (6,)), ((), (1,)), ((4,), (5,)), ((3, 1), (3,))],
)
def test_shape_mismatch_value_error(shape0, shape1):
    results = [
        (payload({"ok": np.ones(2, np.float32), "enc/kernel": np.ones(shape0, np.float32)}), 3),
        (payload({"ok": np.ones(2, np.float32)}), 3),
        (payload({"enc/kernel": np.ones(shape1, np.float32)}), 5),
    ]
    before = snapshot(results)
    for weighted in (True, False):
        with pytest.raises(ValueError, match=re.escape("enc/kernel")) as excinfo:
            FedAvgDynamicLayer(weighted).aggregate(results)
        message = str(excinfo.value)
        assert str(shape0) in message and str(shape1) in message, message
    assert_unchanged(results, before)


def test_shape_mismatch_detected_regardless_of_order():
    results = [
        (payload({"w": np.ones((6,), np.float32)}), 1),
        (payload({"w": np.ones((6,), np.float32)}), 1),
        (payload({"w": np.ones((1, 6), np.float32)}), 1),
    ]
    for perm in itertools.permutations(range(3)):
        permuted = [results[i] for i in perm]
        with pytest.raises(ValueError, match=r"'w'"):
            FedAvgDynamicLayer().aggregate(permuted)


# JAX's promotion, written out for the pairs below (the library uses jnp.promote_types).
PROMOTED = {
    (np.float32, np.float64): np.float64,
    (np.float32, ml_dtypes.bfloat16): np.float32,
    (np.float16, ml_dtypes.bfloat16): np.float32,
    (np.int32, np.int64): np.int64,
    (np.float32, np.int32): np.float32,
    (np.int64, np.float64): np.float64,
}


@pytest.mark.parametrize("dtype0, dtype1", list(PROMOTED), ids=[f"{np.dtype(a)}-{np.dtype(b)}" for a, b in PROMOTED])
def test_mixed_dtypes_are_averaged_in_the_promoted_dtype(dtype0, dtype1):
    # 2 and 6 examples; values 1.25 and 3 (ints: 1 and 3): mean (2 * x0 + 6 * x1) / 8.
    x0 = np.array([1.25, 1.25, 1.25]).astype(dtype0)
    x1 = np.array([3.0, 3.0, 3.0]).astype(dtype1)
    results = [
        (payload({"head/bias": x0}), 2),
        (payload({"other": np.ones(1, np.float32)}), 2),
        (payload({"head/bias": x1}), 6),
    ]
    before = snapshot(results)
    averaged = FedAvgDynamicLayer().aggregate(results)["head/bias"]
    promoted = np.dtype(PROMOTED[(dtype0, dtype1)])
    assert averaged.dtype == promoted
    expected = (2 * x0.astype(np.float64) + 6 * x1.astype(np.float64)) / 8
    if promoted.kind in "iu":
        expected = np.rint(expected)  # integers round to nearest, ties to even
    np.testing.assert_allclose(averaged.astype(np.float64), expected, rtol=1e-6)
    assert_unchanged(results, before)


def test_aggregate_layers_takes_decoded_views_and_equals_aggregate():
    rng = np.random.default_rng(5)
    views = [
        ({"a": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}, 3),
        ({"a": rng.normal(size=(3, 2)).astype(np.float32)}, 5),
        ({"b": rng.normal(size=4).astype(np.float64)}, 2),
    ]
    server = FedAvgDynamicLayer()
    packed = server.aggregate([(payload(layers), n) for layers, n in views])
    decoded = server.aggregate_layers(views)
    assert list(decoded) == list(packed) == ["a", "b"]
    for name in decoded:
        assert decoded[name].dtype == packed[name].dtype
        assert decoded[name].tobytes() == packed[name].tobytes()
    with pytest.raises(TypeError, match="client 1: decoded layers are a name -> array mapping"):
        server.aggregate_layers([({"a": np.ones(1)}, 1), ([np.ones(1)], 1)])
    with pytest.raises(TypeError, match="client 0: layer names must be strings"):
        server.aggregate_layers([({0: np.ones(1)}, 1)])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused_naming_client_and_layer(bad):
    # A large layer (several blocks of the mean) with the bad value far from the start.
    good = np.ones(300_000, np.float32)
    poisoned = good.copy()
    poisoned[250_123] = bad
    results = [(payload({"big": good, "s": np.ones(2, np.float32)}), 3), (payload({"big": poisoned}), 4)]
    before = snapshot(results)
    with pytest.raises(
        ValueError, match=r"client 1: layer 'big' holds a non-finite value \(.*inf|nan.* at flat index 250123\)"
    ):
        FedAvgDynamicLayer().aggregate(results)
    assert_unchanged(results, before)
    # fl4health's behaviour on request: averaged in.
    averaged = FedAvgDynamicLayer(allow_nonfinite=True).aggregate(results)["big"]
    assert not np.isfinite(averaged[250_123]) and np.isfinite(np.delete(averaged, 250_123)).all()


def test_zero_total_weight_value_error_but_unweighted_works():
    w0 = np.array([1.0, 2.0], np.float32)
    w1 = np.array([3.0, 6.0], np.float32)
    results = [
        (payload({"dead/kernel": w0, "live": np.ones(1, np.float32)}), 0),
        (payload({"live": np.zeros(1, np.float32)}), 5),
        (payload({"dead/kernel": w1}), 0),
    ]
    before = snapshot(results)
    with pytest.raises(ValueError, match=re.escape("dead/kernel")):
        FedAvgDynamicLayer(weighted_aggregation=True).aggregate(results)
    assert_unchanged(results, before)
    out = FedAvgDynamicLayer(weighted_aggregation=False).aggregate(results)
    # dead = ([1,2] + [3,6]) / 2 = [2, 4]; live = (1 + 0)/2 = 0.5
    np.testing.assert_array_equal(out["dead/kernel"], np.array([2.0, 4.0], np.float32))
    np.testing.assert_array_equal(out["live"], np.array([0.5], np.float32))
    assert_unchanged(results, before)


@pytest.mark.parametrize("weighted", [True, False])
def test_negative_num_examples_value_error(weighted):
    results = [(payload({"w": np.ones(2, np.float32)}), 3), (payload({"w": np.ones(2, np.float32)}), -1)]
    before = snapshot(results)
    with pytest.raises(ValueError, match=r"client 1\b"):
        FedAvgDynamicLayer(weighted).aggregate(results)
    assert_unchanged(results, before)


@pytest.mark.parametrize("bad", [1.5, True, False, 2.0, "3", None, np.float32(4.0)])
@pytest.mark.parametrize("weighted", [True, False])
def test_non_integer_num_examples_type_error(bad, weighted):
    results = [(payload({"w": np.ones(2, np.float32)}), 3), (payload({"w": np.ones(2, np.float32)}), bad)]
    before = snapshot(results)
    with pytest.raises(TypeError, match=r"client 1\b"):
        FedAvgDynamicLayer(weighted).aggregate(results)
    assert_unchanged(results, before)


def _malformed_payloads():
    one = np.ones(2, np.float32)
    return {
        "names_count_mismatch_more_arrays": [one, one, np.array(["a"])],
        "names_count_mismatch_more_names": [one, np.array(["a", "b"])],
        "duplicate_names": [one, one, np.array(["a", "a"])],
        "last_array_not_strings": [one, np.array([1])],
        "last_array_object": [one, np.array(["a"], dtype=object)],
        "last_array_2d": [one, np.array([["a"]])],
        "empty_list": [],
    }


@pytest.mark.parametrize("kind", list(_malformed_payloads()))
def test_malformed_payload_value_error_names_client(kind):
    bad = _malformed_payloads()[kind]
    results = [
        (payload({"a": np.zeros(2, np.float32)}), 3),
        (bad, 4),
        (payload({"a": np.ones(2, np.float32)}), 5),
    ]
    before = snapshot(results)
    for weighted in (True, False):
        with pytest.raises(ValueError, match=r"client 1\b"):
            FedAvgDynamicLayer(weighted).aggregate(results)
    assert_unchanged(results, before)


@pytest.mark.parametrize(
    "results",
    [None, {"c0": ([np.array([], str)], 1)}, "abc", 5, np.zeros(3), (r for r in [(pack_layers([], []), 1)])],
    ids=["none", "dict", "str", "int", "ndarray", "generator"],
)
def test_results_not_a_list_type_error(results):
    with pytest.raises(TypeError, match=r"(?i)list"):
        FedAvgDynamicLayer().aggregate(results)


@pytest.mark.parametrize("bad", [([np.array([], str)],), ([np.array([], str)], 1, 2), "x", 3])
def test_result_not_a_pair_value_error_names_client(bad):
    results = [(payload({"a": np.zeros(2, np.float32)}), 3), bad]
    with pytest.raises(ValueError, match=r"client 1\b"):
        FedAvgDynamicLayer().aggregate(results)


# --------------------------------------------------------------------------------------
# masked_fedavg
# --------------------------------------------------------------------------------------

MASK_SHAPES = {
    "enc/kernel": (4, 3),
    "enc/bias": (3,),
    "dec/kernel": (3, 2),
    "dec/bias": (2,),
    "bn/scale": (3,),
    "never/sent": (5,),
    "scalar": (),
}


def make_federation(seed, n_clients=5, dtype=np.float32):
    """Full flat dicts per client, masks (never/sent is masked off everywhere) and counts."""
    rng = np.random.default_rng(seed)
    clients = [
        {name: rng.uniform(-2, 2, size=shape).astype(dtype) for name, shape in MASK_SHAPES.items()}
        for _ in range(n_clients)
    ]
    masks = {name: rng.random(n_clients) < 0.5 for name in MASK_SHAPES}
    masks["never/sent"][:] = False
    masks["enc/kernel"][:] = True
    masks["dec/bias"][:] = False
    masks["dec/bias"][2] = True  # exactly one sender
    counts = rng.integers(1, 200, size=n_clients)
    return clients, masks, counts


def stack(clients):
    return {name: np.stack([c[name] for c in clients]) for name in clients[0]}


def packed_for(clients, masks, counts):
    results = []
    for c, layers in enumerate(clients):
        chosen = {name: layers[name] for name in layers if masks[name][c]}
        results.append((payload(chosen), int(counts[c])))
    return results


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_fedavg_matches_packed_path(seed, weighted):
    clients, masks, counts = make_federation(seed)
    stacked = stack(clients)
    stacked_before = {k: v.copy() for k, v in stacked.items()}
    averages, sent = masked_fedavg(
        {k: jnp.asarray(v) for k, v in stacked.items()},
        {k: jnp.asarray(v) for k, v in masks.items()},
        jnp.asarray(counts),
        weighted=weighted,
    )
    packed = FedAvgDynamicLayer(weighted).aggregate(packed_for(clients, masks, counts))
    ref = reference_fedavg(packed_for(clients, masks, counts), weighted)
    assert list(averages) == list(MASK_SHAPES) and list(sent) == list(MASK_SHAPES)
    assert set(packed) == {n for n in MASK_SHAPES if masks[n].any()}
    for name in MASK_SHAPES:
        assert averages[name].shape == MASK_SHAPES[name]
        assert averages[name].dtype == jnp.float32
        assert bool(sent[name]) == bool(masks[name].any()), name
        if masks[name].any():
            np.testing.assert_allclose(np.asarray(averages[name]), packed[name], rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(np.asarray(averages[name]), ref[name], rtol=1e-6, atol=1e-6)
        else:
            np.testing.assert_array_equal(np.asarray(averages[name]), np.zeros(MASK_SHAPES[name], np.float32))
    # dec/bias was sent by client 2 only: its own value
    np.testing.assert_allclose(np.asarray(averages["dec/bias"]), clients[2]["dec/bias"], rtol=1e-6)
    for k in stacked:
        np.testing.assert_array_equal(stacked[k], stacked_before[k])


def test_masked_fedavg_hand_computed_and_fallback():
    # 3 clients, layer 'b' sent by all: weighted (10*[10,20] + 30*[40,50] + 60*[100,-100])/100 = [73,-43]
    client_layers = {
        "b": jnp.array([[10.0, 20.0], [40.0, 50.0], [100.0, -100.0]], jnp.float32),
        "a": jnp.array([[1.0], [2.0], [3.0]], jnp.float32),
        "none": jnp.array([[1.0, 1.0, 1.0]] * 3, jnp.float32),
    }
    masks = {
        "b": jnp.array([True, True, True]),
        "a": jnp.array([False, True, True]),
        "none": jnp.array([False, False, False]),
    }
    counts = jnp.array([10, 30, 60])
    fallback = {"b": jnp.full((2,), -9.0), "a": jnp.full((1,), -9.0), "none": jnp.array([7.0, 8.0, 9.0])}
    avg, sent = masked_fedavg(client_layers, masks, counts, fallback=fallback)
    np.testing.assert_array_equal(np.asarray(avg["b"]), [73.0, -43.0])
    # a = (30*2 + 60*3)/90 = 240/90 = 2.6667
    np.testing.assert_allclose(np.asarray(avg["a"]), [240.0 / 90.0], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(avg["none"]), [7.0, 8.0, 9.0])
    assert [bool(sent[k]) for k in ("b", "a", "none")] == [True, True, False]
    assert avg["none"].dtype == jnp.float32
    # unweighted: b = ([10,20]+[40,50]+[100,-100])/3 = [50,-10]; a = (2+3)/2 = 2.5
    avg, sent = masked_fedavg(client_layers, masks, counts, weighted=False)
    np.testing.assert_array_equal(np.asarray(avg["b"]), [50.0, -10.0])
    np.testing.assert_array_equal(np.asarray(avg["a"]), [2.5])
    np.testing.assert_array_equal(np.asarray(avg["none"]), [0.0, 0.0, 0.0])
    assert not bool(sent["none"])


def test_masked_fedavg_zero_weight_senders_use_fallback():
    # 'w' sent only by a client with 0 examples: no positive weight -> fallback, sent False.
    client_layers = {"w": jnp.array([[5.0, 6.0], [1.0, 2.0]], jnp.float32)}
    masks = {"w": jnp.array([True, False])}
    counts = jnp.array([0, 10])
    avg, sent = masked_fedavg(client_layers, masks, counts, fallback={"w": jnp.array([-1.0, -2.0])})
    np.testing.assert_array_equal(np.asarray(avg["w"]), [-1.0, -2.0])
    assert not bool(sent["w"])
    # unweighted: the mask alone counts: [5,6]
    avg, sent = masked_fedavg(client_layers, masks, counts, weighted=False)
    np.testing.assert_array_equal(np.asarray(avg["w"]), [5.0, 6.0])
    assert bool(sent["w"])


def test_masked_fedavg_dtypes_and_integer_rounding():
    client_layers = {
        "i": jnp.array([[1, 2], [2, 3]], jnp.int32),
        "h": jnp.array([[1.0, 2.0], [4.0, 8.0]], jnp.float16),
        "bf": jnp.array([[1.0, 2.0], [5.0, -2.0]], jnp.bfloat16),
    }
    masks = {k: jnp.array([True, True]) for k in client_layers}
    avg, _ = masked_fedavg(client_layers, masks, jnp.array([1, 1]), weighted=False)
    assert avg["i"].dtype == jnp.int32 and avg["h"].dtype == jnp.float16 and avg["bf"].dtype == jnp.bfloat16
    # (1+2)/2 = 1.5 -> 2 ; (2+3)/2 = 2.5 -> 2 (ties to even)
    np.testing.assert_array_equal(np.asarray(avg["i"]), [2, 2])
    avg, _ = masked_fedavg(client_layers, masks, jnp.array([1, 3]))
    # h = (1*[1,2] + 3*[4,8])/4 = [3.25, 6.5]; bf = (1*[1,2] + 3*[5,-2])/4 = [4, -1]
    np.testing.assert_array_equal(np.asarray(avg["h"], np.float64), [3.25, 6.5])
    np.testing.assert_array_equal(np.asarray(avg["bf"], np.float64), [4.0, -1.0])
    # i = (1*[1,2] + 3*[2,3])/4 = [7/4, 11/4] = [1.75, 2.75] -> [2, 3]
    np.testing.assert_array_equal(np.asarray(avg["i"]), [2, 3])


@pytest.mark.parametrize("weighted", [True, False])
def test_masked_fedavg_jit_equals_eager(weighted):
    clients, masks, counts = make_federation(10)
    stacked = {k: jnp.asarray(v) for k, v in stack(clients).items()}
    jmasks = {k: jnp.asarray(v) for k, v in masks.items()}
    fallback = {k: jnp.full(s, 0.5, jnp.float32) for k, s in MASK_SHAPES.items()}
    eager = masked_fedavg(stacked, jmasks, jnp.asarray(counts), weighted=weighted, fallback=fallback)
    jitted = jax.jit(functools.partial(masked_fedavg, weighted=weighted))(
        stacked, jmasks, jnp.asarray(counts), fallback=fallback
    )
    for part_e, part_j in zip(eager, jitted):
        # (jax.jit rebuilds a plain-dict argument with sorted keys, so only the key set is compared)
        assert sorted(part_e) == sorted(part_j) == sorted(MASK_SHAPES)
        for k in part_e:
            assert part_j[k].dtype == part_e[k].dtype and part_j[k].shape == part_e[k].shape
            np.testing.assert_allclose(np.asarray(part_j[k]), np.asarray(part_e[k]), rtol=1e-6, atol=0)
    np.testing.assert_array_equal(np.asarray(jitted[0]["never/sent"]), np.full(5, 0.5, np.float32))
    assert not bool(jitted[1]["never/sent"])


@pytest.mark.parametrize("weighted", [True, False])
def test_masked_fedavg_vmap_over_federations(weighted):
    feds = [make_federation(20), make_federation(21)]
    stacked = {k: jnp.stack([stack(c)[k] for c, _, _ in feds]) for k in MASK_SHAPES}  # (2, C, *shape)
    masks = {k: jnp.stack([m[k] for _, m, _ in feds]) for k in MASK_SHAPES}  # (2, C)
    # federation 1: nobody sends enc/bias
    masks["enc/bias"] = masks["enc/bias"].at[1].set(False)
    counts = jnp.stack([jnp.asarray(n) for _, _, n in feds])  # (2, C)
    fallback = {k: jnp.stack([jnp.full(s, 1.0), jnp.full(s, 2.0)]).astype(jnp.float32) for k, s in MASK_SHAPES.items()}
    fn = functools.partial(masked_fedavg, weighted=weighted)
    vmapped = jax.vmap(fn)(stacked, masks, counts, fallback=fallback)
    jit_vmapped = jax.jit(jax.vmap(fn))(stacked, masks, counts, fallback=fallback)
    for f in range(2):
        eager = masked_fedavg(
            {k: v[f] for k, v in stacked.items()},
            {k: v[f] for k, v in masks.items()},
            counts[f],
            weighted=weighted,
            fallback={k: v[f] for k, v in fallback.items()},
        )
        clients_f = [{k: np.asarray(stacked[k][f, c]) for k in MASK_SHAPES} for c in range(5)]
        masks_f = {k: np.asarray(masks[k][f]) for k in MASK_SHAPES}
        packed = FedAvgDynamicLayer(weighted).aggregate(packed_for(clients_f, masks_f, np.asarray(counts[f])))
        for batch in (vmapped, jit_vmapped):
            for k in MASK_SHAPES:
                got = np.asarray(batch[0][k][f])
                np.testing.assert_allclose(got, np.asarray(eager[0][k]), rtol=1e-6, atol=0)
                assert bool(batch[1][k][f]) == bool(masks_f[k].any())
                if masks_f[k].any():
                    np.testing.assert_allclose(got, packed[k], rtol=1e-6, atol=1e-7)
                else:
                    np.testing.assert_array_equal(got, np.full(MASK_SHAPES[k], float(f + 1), np.float32))
    assert not bool(vmapped[1]["enc/bias"][1])


def test_masked_fedavg_integer_matches_packed_path_large_values():
    # The packed path averages integer layers in float64 (module docstring); the pure form
    # does too when JAX has x64 enabled (documented: float32 otherwise, exact below 2**24).
    # Values above 2**24 are not exact in float32.
    # weighted: (1*16777217 + 2*16777219) / 3 = 50331655 / 3 = 16777218.33 -> 16777218
    #           (1*33554433 + 2*0) / 3 = 11184811 exactly
    vals = np.array([[16777217, 33554433], [16777219, 0]], np.int32)
    counts = np.array([1, 2])
    masks = {"i": np.array([True, True])}
    with jax.enable_x64(True):
        avg, _ = masked_fedavg({"i": jnp.asarray(vals)}, {"i": jnp.asarray(masks["i"])}, jnp.asarray(counts))
    packed = FedAvgDynamicLayer().aggregate(packed_for([{"i": vals[0]}, {"i": vals[1]}], masks, counts))
    np.testing.assert_array_equal(packed["i"], [16777218, 11184811])
    np.testing.assert_array_equal(np.asarray(avg["i"]), packed["i"])


def test_masked_fedavg_integer_without_x64_is_exact_below_2_pow_24():
    # Default JAX (no x64): integer layers accumulate in float32, exact while sums < 2**24.
    # weighted: (3*1001 + 1*1004) / 4 = 4007 / 4 = 1001.75 -> 1002; (3*(-7) + 1*5)/4 = -4 -> -4
    vals = np.array([[1001, -7], [1004, 5]], np.int32)
    counts = np.array([3, 1])
    masks = {"i": np.array([True, True])}
    avg, _ = masked_fedavg({"i": jnp.asarray(vals)}, {"i": jnp.asarray(masks["i"])}, jnp.asarray(counts))
    packed = FedAvgDynamicLayer().aggregate(packed_for([{"i": vals[0]}, {"i": vals[1]}], masks, counts))
    np.testing.assert_array_equal(packed["i"], [1002, -4])
    np.testing.assert_array_equal(np.asarray(avg["i"]), packed["i"])


def test_masked_fedavg_rejects_misaligned_shapes_instead_of_broadcasting():
    layers = {"w": jnp.ones((3, 2)), "b": jnp.ones((3,))}
    masks = {"w": jnp.array([True, False, True]), "b": jnp.array([True, True, True])}
    counts = jnp.array([1, 2, 3])
    with pytest.raises(ValueError, match=r"layer 'w': expected a leading client axis of 2"):
        masked_fedavg(layers, masks, jnp.array([1, 2]))  # 2 counts, 3 clients
    with pytest.raises(ValueError, match=r"mask of layer 'w': expected shape \(3,\) or \(3, 2\), got \(1,\)"):
        masked_fedavg(layers, {**masks, "w": jnp.array([True])}, counts)  # would broadcast
    with pytest.raises(KeyError, match=r"layer 'b' is not in the masks"):
        masked_fedavg(layers, {"w": masks["w"]}, counts)
    with pytest.raises(ValueError, match=r"fallback of layer 'w': expected shape \(2,\), got \(3, 2\)"):
        masked_fedavg(layers, masks, counts, fallback={"w": jnp.zeros((3, 2)), "b": jnp.zeros(())})
    with pytest.raises(ValueError, match=r"num_examples must have shape \(num_clients,\)"):
        masked_fedavg(layers, masks, jnp.ones((3, 1)))
    # The same checks hold under jit (they run on static shapes while tracing; jit hands
    # the function a plain dict with sorted keys, so 'b' is checked first there).
    with pytest.raises(ValueError, match=r"layer 'b': expected a leading client axis of 2"):
        jax.jit(masked_fedavg)(layers, masks, jnp.array([1, 2]))


def test_masked_fedavg_a_layer_not_sent_never_reaches_the_sum_even_as_nan_or_inf():
    # Client 1 diverged (NaN, inf) but did not send "w": the average is client 0's and 2's,
    # (1 * 1 + 3 * 5) / 4 = 4 and (1 * 2 + 3 * 6) / 4 = 5.
    layers = {"w": jnp.array([[1.0, 2.0], [np.nan, np.inf], [5.0, 6.0]])}
    masks = {"w": jnp.array([True, False, True])}
    averages, sent = masked_fedavg(layers, masks, jnp.array([1, 7, 3]))
    np.testing.assert_array_equal(np.asarray(averages["w"]), [4.0, 5.0])
    assert bool(sent["w"])


# --------------------------------------------------------------------------------------
# masked_fedavg over the participants: unsent counts as no change from the fallback.
# --------------------------------------------------------------------------------------


def ref_participants(stacked, masks, counts, fallback, weighted=True):
    """fallback + sum_c w_c m_c (x_c - fallback) / sum_c w_c, per weight, in float64."""
    w = np.asarray(counts, np.float64) if weighted else np.ones(len(counts))
    x = np.asarray(stacked, np.float64)
    m = np.asarray(masks, np.float64).reshape(masks.shape + (1,) * (x.ndim - masks.ndim))
    g = np.asarray(fallback, np.float64)
    return g + np.sum(w.reshape((-1,) + (1,) * (x.ndim - 1)) * m * (x - g), axis=0) / w.sum()


def test_masked_fedavg_over_participants_hand_computed():
    # 3 clients (10, 20, 30 examples), fallback 1.0. Layer "a" sent by clients 0 and 2 with
    # values 3 and 5: 1 + (10 * 2 + 30 * 4) / 60 = 1 + 140 / 60 = 3.333...; over the senders it
    # would be (10 * 3 + 30 * 5) / 40 = 4.5. Layer "b" sent by nobody: the fallback.
    stacked = {"a": jnp.array([3.0, 9.0, 5.0]), "b": jnp.array([7.0, 7.0, 7.0])}
    masks = {"a": jnp.array([True, False, True]), "b": jnp.array([False, False, False])}
    fallback = {"a": jnp.array(1.0), "b": jnp.array(2.0)}
    averages, sent = masked_fedavg(stacked, masks, jnp.array([10, 20, 30]), fallback=fallback, over="participants")
    np.testing.assert_allclose(float(averages["a"]), 1 + 140 / 60, rtol=1e-6)
    assert float(averages["b"]) == 2.0 and not bool(sent["b"]) and bool(sent["a"])
    senders, _ = masked_fedavg(stacked, masks, jnp.array([10, 20, 30]), fallback=fallback)
    np.testing.assert_allclose(float(senders["a"]), 4.5, rtol=1e-6)


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("per_weight", [True, False])
def test_masked_fedavg_over_participants_matches_reference(weighted, per_weight):
    rng = np.random.default_rng(7)
    shapes = {"k": (3, 4), "b": (4,), "s": ()}
    clients = 5
    stacked = {n: rng.normal(size=(clients, *s)).astype(np.float32) for n, s in shapes.items()}
    fallback = {n: rng.normal(size=s).astype(np.float32) for n, s in shapes.items()}
    masks = {n: rng.random((clients, *s) if per_weight else (clients,)) < 0.5 for n, s in shapes.items()}
    counts = np.array([5, 1, 0, 8, 3])
    averages, sent = jax.jit(functools.partial(masked_fedavg, weighted=weighted, over="participants"))(
        stacked, masks, counts, fallback=fallback
    )
    for name in shapes:
        want = ref_participants(stacked[name], masks[name], counts, fallback[name], weighted)
        np.testing.assert_allclose(np.asarray(averages[name]), want, rtol=1e-5, atol=1e-6, err_msg=name)
        w = counts if weighted else np.ones(clients)
        m = masks[name].reshape(masks[name].shape + (1,) * (len(shapes[name]) + 1 - masks[name].ndim))
        anyone = np.sum(w.reshape((-1,) + (1,) * len(shapes[name])) * m, axis=0) > 0
        np.testing.assert_array_equal(np.asarray(sent[name]), anyone.reshape(np.shape(sent[name])), err_msg=name)


def test_masked_fedavg_over_needs_a_known_rule_and_a_fallback():
    stacked, masks = {"a": jnp.ones(2)}, {"a": jnp.array([True, True])}
    with pytest.raises(ValueError, match="over must be one of senders, participants"):
        masked_fedavg(stacked, masks, jnp.ones(2), over="everyone")
    with pytest.raises(ValueError, match="pass fallback="):
        masked_fedavg(stacked, masks, jnp.ones(2), over="participants")
