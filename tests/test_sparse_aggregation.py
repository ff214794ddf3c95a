"""Tests for jaxlayerx/sparse_aggregation.py (FedAvgSparseCooTensor), the COO helpers it
feeds (write_coo / read_coo / merge_sparse_layers) and masked_fedavg with per-weight masks.

Every expected value comes from hand arithmetic (shown in comments) or from the small
float64 numpy reference ``reference_sparse`` below, written independently of the library:
it parses each COO payload by hand and keeps dense accumulators per layer name,
``sum of w_i * x_i`` and ``sum of w_i`` over the clients that sent each entry.
"""

from __future__ import annotations

import functools
import itertools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import ref_name
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxlayerx import (
    FedAvgSparseCooTensor,
    SparseLayer,
    masked_fedavg,
    merge_sparse_layers,
    read_coo,
    write_coo,
)

BF16 = ml_dtypes.bfloat16

# --------------------------------------------------------------------------------------
# Helpers (independent of the library)
# --------------------------------------------------------------------------------------


def coo_payload(layers: dict) -> list:
    """A COO payload in fl4health's layout from ``name -> (coords, values, shape, dtype)``.

    ``coords`` is a list of index tuples (row-major order is NOT imposed: given as is).
    Layout: values (k) + indices (k, int64, (n, ndim)) + shapes (k, int64) + [names].
    """
    values, indices, shapes = [], [], []
    for coords, vals, shape, dtype in layers.values():
        values.append(np.asarray(vals, dtype).reshape(-1))
        indices.append(np.asarray(coords, np.int64).reshape(len(vals), len(shape)))
        shapes.append(np.asarray(shape, np.int64).reshape(len(shape)))
    return values + indices + shapes + [np.array(list(layers), dtype=np.str_)]


def coo_from_masks(dense: dict, masks: dict) -> list:
    """The COO payload of the entries of ``dense[name]`` where ``masks[name]`` is True.

    Layers with nothing masked are not sent (as the exchanger does). Indices are
    ``np.argwhere`` rows (row-major), as the spec asks.
    """
    values, indices, shapes, names = [], [], [], []
    for name, array in dense.items():
        array = np.asarray(array)
        mask = np.asarray(masks[name], bool)
        if not mask.any():
            continue
        values.append(array[mask].reshape(-1))
        indices.append(np.argwhere(mask).astype(np.int64))
        shapes.append(np.array(array.shape, np.int64))
        names.append(name)
    return values + indices + shapes + [np.array(names, dtype=np.str_)]


def ref_flat_indices(coords: np.ndarray, shape) -> np.ndarray:
    """Row-major flat index of each ``(n, ndim)`` coordinate row (plain arithmetic)."""
    coords = np.asarray(coords, np.int64)
    coords = coords.reshape(coords.shape[0], len(shape))
    flat = np.zeros(coords.shape[0], np.int64)
    for axis, size in enumerate(shape):
        flat = flat * size + coords[:, axis]
    return flat


def ref_coords(flat: np.ndarray, shape) -> np.ndarray:
    """``(n, ndim)`` coordinates of row-major flat indices, as np.argwhere would give."""
    mask = np.zeros(int(np.prod(shape, dtype=np.int64)), bool)
    mask[np.asarray(flat, np.int64)] = True
    return np.argwhere(mask.reshape(shape))


def parse_payload(payload):
    """name -> (flat indices, values, shape), read by hand from a COO payload."""
    k = (len(payload) - 1) // 3
    names = [str(x) for x in np.asarray(payload[-1]).tolist()]
    out = {}
    for i, name in enumerate(names):
        shape = tuple(int(d) for d in payload[2 * k + i])
        out[name] = (ref_flat_indices(payload[k + i], shape), np.asarray(payload[i]), shape)
    return out


def reference_sparse(results, weighted=True):
    """Plain float64 per-weight FedAvg: name -> (sorted flat indices sent, means, shape, dtype)."""
    sums, totals, senders, shapes, dtypes = {}, {}, {}, {}, {}
    for packed, n in results:
        w = float(n) if weighted else 1.0
        for name, (flat, values, shape) in parse_payload(packed).items():
            size = int(np.prod(shape, dtype=np.int64))
            shapes[name], dtypes[name] = shape, values.dtype
            sums.setdefault(name, np.zeros(size))
            totals.setdefault(name, np.zeros(size))
            senders.setdefault(name, np.zeros(size, np.int64))
            sums[name][flat] += w * values.astype(np.float64)
            totals[name][flat] += w
            senders[name][flat] += 1
    out = {}
    for name in sums:
        entries = np.flatnonzero(senders[name] > 0)
        out[name] = (entries, sums[name][entries] / totals[name][entries], shapes[name], dtypes[name])
    return out


def expected_cast(mean64: np.ndarray, dtype) -> np.ndarray:
    """The documented dtype rule: floats cast back, integers / bools rounded half to even."""
    dtype = np.dtype(dtype)
    if dtype.kind in "iub":
        return np.rint(mean64).astype(dtype)
    return mean64.astype(dtype)


def assert_matches_reference(out, ref, *, float32_atol_scale=2e-6):
    """``out`` (library) against ``reference_sparse`` output."""
    assert list(out) == sorted(ref), "layers missing/extra or not sorted by name"
    for name, (entries, mean64, shape, dtype) in ref.items():
        layer = out[name]
        assert isinstance(layer, SparseLayer)
        assert tuple(layer.shape) == tuple(shape), name
        np.testing.assert_array_equal(np.asarray(layer.flat_indices), entries, err_msg=name)
        assert layer.values.dtype == np.dtype(dtype), name
        assert layer.values.shape == (entries.size,), name
        got = np.asarray(layer.values)
        if np.dtype(dtype).kind in "iub":
            np.testing.assert_array_equal(got, expected_cast(mean64, dtype), err_msg=name)
        elif np.dtype(dtype) == np.float64:
            np.testing.assert_allclose(got, mean64, rtol=1e-12, atol=1e-12, err_msg=name)
        else:
            scale = float(np.max(np.abs(mean64), initial=1.0))
            np.testing.assert_allclose(
                got.astype(np.float64), mean64, rtol=1e-6, atol=float32_atol_scale * scale, err_msg=name
            )


def snapshot(results):
    return [([np.array(a, copy=True) for a in packed], n) for packed, n in results]


def bits(array) -> bytes:
    return np.ascontiguousarray(np.asarray(array)).tobytes()


def assert_unchanged(results, before):
    assert len(results) == len(before)
    for (packed, n), (packed0, n0) in zip(results, before):
        assert n is n0 or (n == n0 and type(n) is type(n0))
        assert len(packed) == len(packed0)
        for a, a0 in zip(packed, packed0):
            a = np.asarray(a)
            assert a.dtype == a0.dtype and a.shape == a0.shape
            assert bits(a) == bits(a0)


def assert_sparse_identical(got, want):
    assert list(got) == list(want)
    for name in want:
        g, w = got[name], want[name]
        assert tuple(g.shape) == tuple(w.shape), name
        assert g.values.dtype == w.values.dtype, name
        assert bits(g.values) == bits(w.values), name
        np.testing.assert_array_equal(np.asarray(g.flat_indices), np.asarray(w.flat_indices), err_msg=name)


def varied_float32(rng, shape):
    """float32 values of random sign and magnitudes spanning 1e-6 .. 1e6."""
    mags = 10.0 ** rng.uniform(-6, 6, size=shape)
    return (rng.choice([-1.0, 1.0], size=shape) * mags * rng.uniform(1, 2, size=shape)).astype(np.float32)


def aggregate(results, weighted=True):
    return FedAvgSparseCooTensor(weighted_aggregation=weighted).aggregate(results)


# --------------------------------------------------------------------------------------
# Hand-computed examples
# --------------------------------------------------------------------------------------


def hand_results():
    # layer 'w' (2x2, float32), entry (1,0) sent by nobody:
    #   client 0 (1 example):  (0,0)=2,  (0,1)=4
    #   client 1 (3 examples): (0,1)=8,  (1,1)=-4
    #   client 2 (4 examples): (0,0)=10, (1,1)=4
    # layer 'b' (3,), only client 1 sends it: (2,)=5
    f32 = np.float32
    return [
        (coo_payload({"w": ([(0, 0), (0, 1)], [2.0, 4.0], (2, 2), f32)}), 1),
        (coo_payload({"w": ([(0, 1), (1, 1)], [8.0, -4.0], (2, 2), f32), "b": ([(2,)], [5.0], (3,), f32)}), 3),
        (coo_payload({"w": ([(1, 1), (0, 0)], [4.0, 10.0], (2, 2), f32)}), 4),  # not row-major on purpose
    ]


def test_hand_computed_weighted():
    results = hand_results()
    before = snapshot(results)
    out = aggregate(results)
    assert list(out) == ["b", "w"]  # sorted by name
    w = out["w"]
    assert w.shape == (2, 2) and w.values.dtype == np.float32
    # row-major flat indices of (0,0), (0,1), (1,1): 0, 1, 3 ((1,0) = 2 absent)
    np.testing.assert_array_equal(w.flat_indices, [0, 1, 3])
    # (0,0): (1*2 + 4*10) / (1+4) = 42/5 = 8.4
    # (0,1): (1*4 + 3*8)  / (1+3) = 28/4 = 7
    # (1,1): (3*(-4) + 4*4) / (3+4) = 4/7
    np.testing.assert_allclose(w.values, [8.4, 7.0, 4.0 / 7.0], rtol=1e-6)
    # 'b' from client 1 alone: 3*5/3 = 5
    assert out["b"].shape == (3,)
    np.testing.assert_array_equal(out["b"].flat_indices, [2])
    np.testing.assert_allclose(out["b"].values, [5.0], rtol=1e-7)
    assert_unchanged(results, before)
    assert_matches_reference(out, reference_sparse(results, True))


def test_hand_computed_unweighted():
    results = hand_results()
    out = aggregate(results, weighted=False)
    # (0,0): (2+10)/2 = 6; (0,1): (4+8)/2 = 6; (1,1): (-4+4)/2 = 0
    np.testing.assert_array_equal(out["w"].flat_indices, [0, 1, 3])
    np.testing.assert_array_equal(out["w"].values, np.array([6.0, 6.0, 0.0], np.float32))
    np.testing.assert_array_equal(out["b"].values, np.array([5.0], np.float32))
    assert_matches_reference(out, reference_sparse(results, False))


def test_weighted_is_the_default():
    results = hand_results()
    default = FedAvgSparseCooTensor().aggregate(results)
    assert_sparse_identical(default, aggregate(results, weighted=True))
    assert bits(default["w"].values) != bits(aggregate(results, weighted=False)["w"].values)


@pytest.mark.parametrize("weighted", [True, False])
def test_per_weight_not_per_tensor_semantics(weighted):
    # Both clients send layer 'w' (4,), 2 examples each (so weighted == unweighted here):
    #   client 0: entry 0 = 1, entry 1 = 2
    #   client 1: entry 1 = 6, entry 2 = 8
    # per weight: entry 0 = 1 (client 0 alone), entry 1 = (2+6)/2 = 4, entry 2 = 8
    # fl4health's per-tensor average would give entry 0 = (1+0)/2 = 0.5 and entry 2 = 4.
    f32 = np.float32
    results = [
        (coo_payload({"w": ([(0,), (1,)], [1.0, 2.0], (4,), f32)}), 2),
        (coo_payload({"w": ([(1,), (2,)], [6.0, 8.0], (4,), f32)}), 2),
    ]
    out = aggregate(results, weighted)["w"]
    np.testing.assert_array_equal(out.flat_indices, [0, 1, 2])
    np.testing.assert_array_equal(out.values, np.array([1.0, 4.0, 8.0], f32))
    assert out.values[0] != 0.5 and out.values[2] != 4.0


def test_entry_sent_by_one_of_two_weighted_clients_is_that_value():
    # client 0 (10 examples) sends entry (1,2) = 3.5 only; client 1 (90) sends (0,0) = -1.
    # Each entry has one sender: its own value, whatever the weights.
    f32 = np.float32
    results = [
        (coo_payload({"k": ([(1, 2)], [3.5], (2, 3), f32)}), 10),
        (coo_payload({"k": ([(0, 0)], [-1.0], (2, 3), f32)}), 90),
    ]
    out = aggregate(results)["k"]
    np.testing.assert_array_equal(out.flat_indices, [0, 5])  # (0,0) -> 0, (1,2) -> 1*3+2 = 5
    np.testing.assert_array_equal(out.values, np.array([-1.0, 3.5], f32))


def test_scalar_layer_and_empty_results():
    # 0-d layers: indices (n, 0), shape array empty. (2*1 + 6*3)/(2+6) = 20/8 = 2.5
    f32 = np.float32
    results = [
        (coo_payload({"s": ([()], [1.0], (), f32)}), 2),
        (coo_payload({"s": ([()], [3.0], (), f32)}), 6),
        (coo_payload({}), 5),
    ]  # a client that sends nothing
    out = aggregate(results)
    assert list(out) == ["s"]
    assert out["s"].shape == ()
    np.testing.assert_array_equal(out["s"].flat_indices, [0])
    np.testing.assert_array_equal(out["s"].values, np.array([2.5], f32))
    assert aggregate([]) == {}
    assert aggregate([(coo_payload({}), 3)]) == {}


@pytest.mark.parametrize("index_dtype", [np.int32, np.uint8, np.uint64, np.int16])
def test_any_integer_index_dtype_is_read(index_dtype):
    # The hand example with its indices and shapes in another integer dtype: same result.
    results = [
        (
            [
                np.asarray(a).astype(index_dtype) if 0 < i < len(p) - 1 and i >= (len(p) - 1) // 3 else a
                for i, a in enumerate(p)
            ],
            n,
        )
        for p, n in hand_results()
    ]
    assert all(p[(len(p) - 1) // 3].dtype == np.dtype(index_dtype) for p, _ in results)
    assert_sparse_identical(aggregate(results), aggregate(hand_results()))


def test_results_sorted_by_name_and_row_major():
    f32 = np.float32
    rng = np.random.default_rng(3)
    names = ["z", "m/1", "B", "a", "m/0", "Z", "b"]
    results = []
    for c in range(3):
        layers = {}
        for name in rng.permutation(names):
            mask = rng.random((3, 4)) < 0.5
            mask[rng.integers(3), rng.integers(4)] = True
            coords = [tuple(x) for x in rng.permutation(np.argwhere(mask))]  # shuffled rows
            layers[str(name)] = (coords, rng.uniform(-1, 1, len(coords)), (3, 4), f32)
        results.append((coo_payload(layers), c + 1))
    out = aggregate(results)
    assert list(out) == sorted(names) == ["B", "Z", "a", "b", "m/0", "m/1", "z"]
    for layer in out.values():
        flat = np.asarray(layer.flat_indices)
        assert np.all(np.diff(flat) > 0)  # strictly increasing: row-major, no repeats
    assert_matches_reference(out, reference_sparse(results))


# --------------------------------------------------------------------------------------
# Random cases against the numpy reference (hypothesis)
# --------------------------------------------------------------------------------------

LAYER_POOL = {
    "a": ((3,), np.float32),
    "enc/kernel": ((2, 3), np.float32),
    "enc/bias": ((4,), np.float64),
    "B": ((), np.float32),
    "count": ((2, 2), np.int32),
    "flag": ((5,), np.bool_),
    "t": ((2, 1, 3), np.float32),
}


def random_values(rng, shape, dtype, *, signed=True):
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if dtype.kind in "iu":
        return rng.integers(-50 if signed else 0, 50, size=shape).astype(dtype)
    low = -3.0 if signed else 1.0
    return rng.uniform(low, 3.0, size=shape).astype(dtype)


def random_sparse_results(rng, n_clients, layer_names, density, weight_high=1000, signed=True):
    results = []
    for _ in range(n_clients):
        dense, masks = {}, {}
        for name in rng.permutation(layer_names):
            if rng.random() < 0.3:
                continue  # this client does not send the layer
            shape, dtype = LAYER_POOL[str(name)]
            dense[str(name)] = random_values(rng, shape, dtype, signed=signed)
            masks[str(name)] = rng.random(shape) < density
        results.append((coo_from_masks(dense, masks), int(rng.integers(1, weight_high + 1))))
    return results


@settings(deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_clients=st.integers(1, 5),
    weighted=st.booleans(),
    names=st.lists(st.sampled_from(sorted(LAYER_POOL)), min_size=1, max_size=len(LAYER_POOL), unique=True),
    density=st.sampled_from([0.1, 0.5, 0.9, 1.0]),
)
def test_random_matches_numpy_reference_hypothesis(seed, n_clients, weighted, names, density):
    rng = np.random.default_rng(seed)
    results = random_sparse_results(rng, n_clients, names, density)
    before = snapshot(results)
    out = aggregate(results, weighted)
    assert_matches_reference(out, reference_sparse(results, weighted))
    assert_unchanged(results, before)


def test_large_random_case_matches_reference():
    rng = np.random.default_rng(11)
    shapes = {"conv": (8, 3, 3, 4), "fc": (64, 10), "bias": (10,), "bn/mean": (32,)}
    results = []
    for _ in range(5):
        dense = {n: rng.normal(size=s).astype(np.float32) for n, s in shapes.items()}
        masks = {n: rng.random(s) < 0.2 for n, s in shapes.items()}
        results.append((coo_from_masks(dense, masks), int(rng.integers(1, 500))))
    for weighted in (True, False):
        assert_matches_reference(aggregate(results, weighted), reference_sparse(results, weighted))


# --------------------------------------------------------------------------------------
# Permutation invariance (bit-identical)
# --------------------------------------------------------------------------------------


def naive_float32_depends_on_order(results, weighted):
    """Whether plain float32 left-to-right per-entry summation gives different bits in some order."""

    def naive(rs):
        acc = {}
        for packed, n in rs:
            w = np.float32(n if weighted else 1)
            for name, (flat, values, shape) in parse_payload(packed).items():
                a = acc.setdefault(name, np.zeros(int(np.prod(shape)), np.float32))
                a[flat] += w * values.astype(np.float32)
        return acc

    base = naive(results)
    for perm in itertools.permutations(range(len(results))):
        other = naive([results[i] for i in perm])
        if any(bits(other[k]) != bits(base[k]) for k in base):
            return True
    return False


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_permutation_invariance_all_orders_of_four_clients(seed, weighted):
    rng = np.random.default_rng(50 + seed)
    shapes = {"w": (6, 5), "v": (17,), "s": ()}
    results = []
    for _ in range(4):
        dense = {n: varied_float32(rng, s) for n, s in shapes.items()}
        masks = {n: rng.random(s) < 0.8 for n, s in shapes.items()}
        # counts from {1, 2}: equal weights happen, so ties must be broken by content
        results.append((coo_from_masks(dense, masks), int(rng.integers(1, 3))))
    assert naive_float32_depends_on_order(results, weighted)  # order would matter
    before = snapshot(results)
    base = aggregate(results, weighted)
    for perm in itertools.permutations(range(4)):
        assert_sparse_identical(aggregate([results[i] for i in perm], weighted), base)
    assert_unchanged(results, before)
    assert_matches_reference(base, reference_sparse(results, weighted), float32_atol_scale=1e-5)


def test_permutation_invariance_same_weight_same_prefix():
    # Four unweighted clients send all 40 entries of 'w' with the same first 20 values and
    # wildly different later values: the order cannot be decided by a prefix alone.
    rng = np.random.default_rng(9)
    prefix = varied_float32(rng, 20)
    results = []
    for _ in range(4):
        values = np.concatenate([prefix, varied_float32(rng, 20)])
        results.append((coo_from_masks({"w": values}, {"w": np.ones(40, bool)}), 7))
    assert naive_float32_depends_on_order(results, False)
    base = aggregate(results, weighted=False)
    for perm in itertools.permutations(range(4)):
        assert_sparse_identical(aggregate([results[i] for i in perm], weighted=False), base)


# --------------------------------------------------------------------------------------
# Dtypes: integer, bool, float64, float16, bfloat16
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.int16, np.uint8])
def test_integer_layers_rounded_half_to_even(dtype):
    # layer 'i' (4,):
    #   client 0: entries 0,1,2,3 = 1, 2, 3, 0
    #   client 1: entries 0,1,3   = 2, 3, 5
    # unweighted: e0 (1+2)/2 = 1.5 -> 2; e1 (2+3)/2 = 2.5 -> 2 (ties to even);
    #             e2 = 3 (client 0 alone); e3 (0+5)/2 = 2.5 -> 2
    # weighted (1 and 3 examples): e0 (1*1 + 3*2)/4 = 7/4 = 1.75 -> 2;
    #             e1 (1*2 + 3*3)/4 = 11/4 = 2.75 -> 3; e2 = 3; e3 (0 + 3*5)/4 = 15/4 = 3.75 -> 4
    results = [
        (coo_payload({"i": ([(0,), (1,), (2,), (3,)], [1, 2, 3, 0], (4,), dtype)}), 1),
        (coo_payload({"i": ([(0,), (1,), (3,)], [2, 3, 5], (4,), dtype)}), 3),
    ]
    out = aggregate(results, weighted=False)["i"]
    assert out.values.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out.values, np.array([2, 2, 3, 2], dtype))
    out = aggregate(results, weighted=True)["i"]
    assert out.values.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out.values, np.array([2, 3, 3, 4], dtype))
    # (1*2 + 3*0)/4 = 0.5 -> 0 (ties to even); (1*6 + 3*0)/4 = 1.5 -> 2
    tie = [
        (coo_payload({"i": ([(0,), (1,)], [2, 6], (2,), dtype)}), 1),
        (coo_payload({"i": ([(0,), (1,)], [0, 0], (2,), dtype)}), 3),
    ]
    np.testing.assert_array_equal(aggregate(tie)["i"].values, np.array([0, 2], dtype))
    if np.issubdtype(dtype, np.signedinteger):
        # (-1 + -2)/2 = -1.5 -> -2; (-3 + -2)/2 = -2.5 -> -2; (-1 + 0)/2 = -0.5 -> -0 = 0
        neg = [
            (coo_payload({"i": ([(0,), (1,), (2,)], [-1, -3, -1], (3,), dtype)}), 1),
            (coo_payload({"i": ([(0,), (1,), (2,)], [-2, -2, 0], (3,), dtype)}), 1),
        ]
        np.testing.assert_array_equal(aggregate(neg, False)["i"].values, np.array([-2, -2, 0], dtype))


def test_bool_layers_rounded():
    # layer 'm' (2,2) bool, unweighted:
    #   (0,0): clients 0,1,2 send T,T,F -> 2/3 -> True
    #   (0,1): clients 0,1 send T,F      -> 1/2 -> 0 (ties to even) -> False
    #   (1,0): client 2 sends F          -> False
    #   (1,1): client 1 sends T          -> True
    b = np.bool_
    results = [
        (coo_payload({"m": ([(0, 0), (0, 1)], [True, True], (2, 2), b)}), 1),
        (coo_payload({"m": ([(0, 0), (0, 1), (1, 1)], [True, False, True], (2, 2), b)}), 1),
        (coo_payload({"m": ([(0, 0), (1, 0)], [False, False], (2, 2), b)}), 2),
    ]
    out = aggregate(results, weighted=False)["m"]
    assert out.values.dtype == np.bool_
    np.testing.assert_array_equal(out.flat_indices, [0, 1, 2, 3])
    np.testing.assert_array_equal(out.values, [True, False, False, True])
    # weighted (1, 1, 2): (0,0): (1+1+0)/4 = 0.5 -> False; the others as above
    out = aggregate(results, weighted=True)["m"]
    np.testing.assert_array_equal(out.values, [False, False, False, True])


def test_float_dtypes_preserved_with_values():
    # client 0 (1 example), client 1 (3 examples), each layer's entries 0 and 1:
    #   h  (float16):  (1*[1,2] + 3*[4,8]) / 4 = [13,26]/4 = [3.25, 6.5]
    #   bf (bfloat16): (1*[1,2] + 3*[5,-2]) / 4 = [16,-4]/4 = [4, -1]
    #   d  (float64):  (1*[1,2] + 3*[0.1,0.2]) / 4 = [1.3/4, 2.6/4]
    #   f  (float32):  (1*[1,2] + 3*[0.25,0.5]) / 4 = [0.4375, 0.875]
    coords = [(0,), (1,)]
    results = [
        (
            coo_payload(
                {
                    "h": (coords, [1, 2], (2,), np.float16),
                    "bf": (coords, [1, 2], (2,), BF16),
                    "d": (coords, [1, 2], (2,), np.float64),
                    "f": (coords, [1, 2], (2,), np.float32),
                }
            ),
            1,
        ),
        (
            coo_payload(
                {
                    "h": (coords, [4, 8], (2,), np.float16),
                    "bf": (coords, [5, -2], (2,), BF16),
                    "d": (coords, [0.1, 0.2], (2,), np.float64),
                    "f": (coords, [0.25, 0.5], (2,), np.float32),
                }
            ),
            3,
        ),
    ]
    before = snapshot(results)
    out = aggregate(results)
    assert list(out) == ["bf", "d", "f", "h"]
    assert out["h"].values.dtype == np.float16
    assert out["bf"].values.dtype == BF16
    assert out["d"].values.dtype == np.float64
    assert out["f"].values.dtype == np.float32
    np.testing.assert_array_equal(out["h"].values.astype(np.float64), [3.25, 6.5])
    np.testing.assert_array_equal(out["bf"].values.astype(np.float64), [4.0, -1.0])
    np.testing.assert_array_equal(out["f"].values, np.array([0.4375, 0.875], np.float32))
    # float64 stays float64 precision (a float32 accumulator would be off by ~1e-8)
    np.testing.assert_allclose(out["d"].values, [(1 + 3 * 0.1) / 4, (2 + 3 * 0.2) / 4], rtol=1e-15)
    assert_unchanged(results, before)


@pytest.mark.parametrize("dtype", [BF16, np.float16, np.float64])
def test_low_precision_and_float64_random_against_reference(dtype):
    rng = np.random.default_rng(21)
    results = []
    for _ in range(5):
        dense = {"w": rng.uniform(1, 2, size=(5, 4)).astype(dtype)}
        masks = {"w": rng.random((5, 4)) < 0.6}
        results.append((coo_from_masks(dense, masks), int(rng.integers(1, 100))))
    out = aggregate(results)
    entries, mean64, shape, _ = reference_sparse(results)["w"]
    assert out["w"].values.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out["w"].flat_indices, entries)
    # half types: only the final rounding to `dtype` matters (<= 1 ulp)
    rtol = 1e-13 if dtype == np.float64 else float(ml_dtypes.finfo(dtype).eps)
    np.testing.assert_allclose(out["w"].values.astype(np.float64), mean64, rtol=rtol, atol=0)


# --------------------------------------------------------------------------------------
# write_coo -> read_coo, and merge_sparse_layers
# --------------------------------------------------------------------------------------


def mixed_results():
    rng = np.random.default_rng(31)
    layers = {"w": ((3, 4), np.float32), "s": ((), np.float32), "i": ((5,), np.int32), "d": ((2, 2, 2), np.float64)}
    results = []
    for c in range(3):
        dense = {n: random_values(rng, s, d) for n, (s, d) in layers.items()}
        masks = {n: rng.random(s) < 0.6 for n, (s, d) in layers.items()}
        masks["s"] = np.array(c != 1)
        results.append((coo_from_masks(dense, masks), c + 2))
    return results


def test_write_coo_layout_and_read_coo_round_trip(tmp_path):
    out = aggregate(mixed_results())
    names = list(out)
    payload = write_coo(out)
    k = len(names)
    assert isinstance(payload, list) and len(payload) == 3 * k + 1
    assert payload[-1].ndim == 1 and payload[-1].dtype.kind == "U"
    assert payload[-1].tolist() == names
    for i, name in enumerate(names):
        layer = out[name]
        values, indices, shape = payload[i], payload[k + i], payload[2 * k + i]
        assert values.ndim == 1 and values.dtype == layer.values.dtype
        assert bits(values) == bits(layer.values)
        assert indices.dtype == np.int64 and shape.dtype == np.int64
        assert indices.shape == (layer.values.size, len(layer.shape))
        np.testing.assert_array_equal(indices, ref_coords(layer.flat_indices, layer.shape))
        np.testing.assert_array_equal(shape, np.array(layer.shape, np.int64))
        assert shape.shape == (len(layer.shape),)
    assert payload[2 * k + names.index("s")].shape == (0,)  # a 0-d layer: empty shape array
    assert payload[k + names.index("s")].shape == (1, 0)
    assert_sparse_identical(read_coo(payload), out)
    # Flower's serialization (no pickle) keeps it, and averaging one unweighted client
    # that sends the result back gives it back bit for bit (x * 1 / 1).
    np.savez(tmp_path / "p.npz", *payload, allow_pickle=False)
    with np.load(tmp_path / "p.npz", allow_pickle=False) as loaded:
        reloaded = [loaded[f"arr_{i}"] for i in range(len(payload))]
    assert_sparse_identical(read_coo(reloaded), out)
    assert_sparse_identical(aggregate([(reloaded, 5)], weighted=False), out)


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(3)(x)
        return nn.BatchNorm(use_running_average=not train)(x)


class NNXNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.lin = nnx.Linear(4, 3, rngs=rngs)
        self.bn = nnx.BatchNorm(3, rngs=rngs)


NNX_NAMES = ["lin/kernel", "lin/bias", "bn/scale", "bn/bias", "bn/mean", "bn/var"]


def nnx_get(model, name):
    module, attr = name.split("/")
    return np.array(getattr(getattr(model, module), attr)[...], copy=True)


def nnx_set(model, name, value):
    module, attr = name.split("/")
    var = getattr(getattr(model, module), attr)
    var[...] = jnp.asarray(value, var[...].dtype)


def model_flat(model) -> dict:
    """name -> numpy copy of each layer, read independently of the library."""
    if isinstance(model, nnx.Module):
        return {name: nnx_get(model, name) for name in NNX_NAMES}
    leaves = jax.tree_util.tree_flatten_with_path(model)[0]
    return {ref_name(path): np.array(leaf, copy=True) for path, leaf in leaves}


def make_model(kind, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "plain":
        return {
            "enc": {
                "w": rng.normal(size=(3, 4)).astype(np.float32),
                "b": jnp.asarray(rng.normal(size=(4,)).astype(np.float32)),
            },
            "count": rng.integers(0, 9, size=(2, 3)).astype(np.int32),
            "s": np.array(1.5, np.float32),
        }
    if kind == "linen":
        variables = LinenNet().init(jax.random.PRNGKey(seed), jnp.ones((1, 4)))
        return jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape).astype(np.float32)), variables)
    model = NNXNet(nnx.Rngs(seed))
    for name in NNX_NAMES:
        nnx_set(model, name, rng.normal(size=nnx_get(model, name).shape))
    return model


def client_results_for(flat: dict, rng, n_clients=3):
    results = []
    for c in range(n_clients):
        dense = {n: random_values(rng, a.shape, a.dtype) for n, a in flat.items()}
        masks = {n: rng.random(a.shape) < 0.4 for n, a in flat.items()}
        masks[sorted(flat)[0]][...] = False  # one layer that nobody sends
        results.append((coo_from_masks(dense, masks), c + 1))
    return results


@pytest.mark.parametrize("kind", ["plain", "linen", "nnx"])
def test_merge_sparse_layers_changes_only_the_sent_entries(kind):
    model = make_model(kind)
    before = model_flat(model)
    rng = np.random.default_rng(41)
    results = client_results_for(before, rng)
    out = aggregate(results)
    assert sorted(flat for flat in before if flat not in out) == [sorted(before)[0]]
    expected = {n: a.copy() for n, a in before.items()}
    for name, layer in out.items():
        expected[name].reshape(-1)[np.asarray(layer.flat_indices)] = layer.values.astype(expected[name].dtype)
    merged = merge_sparse_layers(model, out)
    if kind == "nnx":
        assert merged is model  # updated in place
    else:
        assert merged is not model
        after_in = model_flat(model)  # a pytree is never mutated
        for name in before:
            assert bits(after_in[name]) == bits(before[name]), name
    got = model_flat(merged)
    assert sorted(got) == sorted(expected)
    changed = 0
    for name in expected:
        assert got[name].dtype == before[name].dtype and got[name].shape == before[name].shape, name
        assert bits(got[name]) == bits(expected[name]), name
        changed += int(np.sum(got[name] != before[name]))
    assert changed > 0


@pytest.mark.parametrize("kind", ["plain", "nnx"])
def test_merge_sparse_layers_bad_layers_change_nothing(kind):
    model = make_model(kind)
    before = model_flat(model)
    good_name = "enc/w" if kind == "plain" else "lin/kernel"
    good = SparseLayer(np.array([9.0], np.float32), np.array([0]), before[good_name].shape)
    cases = [
        (KeyError, r"no/such", {good_name: good, "no/such": good}),
        (ValueError, rf"{good_name}.*shape", {good_name: good._replace(shape=(99,))}),
        (TypeError, rf"{good_name}.*complex64", {good_name: good._replace(values=np.array([9.0], np.complex64))}),
    ]
    for error, pattern, layers in cases:
        with pytest.raises(error, match=pattern):
            merge_sparse_layers(model, layers)
        after = model_flat(model)
        for name in before:
            assert bits(after[name]) == bits(before[name]), (pattern, name)


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------

F32 = np.float32


def good_payload(value=1.0):
    return coo_payload({"w": ([(0, 0), (1, 1)], [value, value + 1], (2, 2), F32)})


def _malformed():
    v = np.array([1.0, 2.0], F32)
    idx = np.array([[0, 0], [1, 1]], np.int64)
    shp = np.array([2, 2], np.int64)
    names = np.array(["w"])
    return {
        # kind: (payload, exception, regex after "client 1: ")
        "wrong_length": ([v, idx, shp], ValueError, r"3k \+ 1.*got 3"),
        "wrong_length_5": ([v, idx, shp, names, names], ValueError, r"3k \+ 1.*got 5"),
        "names_not_unicode": ([v, idx, shp, np.array([7])], ValueError, r"names"),
        "names_object": ([v, idx, shp, np.array(["w"], dtype=object)], ValueError, r"names"),
        "names_2d": ([v, idx, shp, np.array([["w"]])], ValueError, r"names"),
        "names_duplicate": ([v, v, idx, idx, shp, shp, np.array(["w", "w"])], ValueError, r"duplicate.*'w'"),
        "names_count": ([v, idx, shp, np.array(["w", "x"])], ValueError, r"1 arrays but 2"),
        "values_2d": ([v.reshape(2, 1), idx, shp, names], ValueError, r"layer 'w': values must be 1-D"),
        "index_out_of_bounds": (
            [v, np.array([[0, 0], [2, 0]]), shp, names],
            ValueError,
            r"layer 'w': index \[2, 0\] is out of bounds",
        ),
        "index_negative": (
            [v, np.array([[0, 0], [0, -1]]), shp, names],
            ValueError,
            r"layer 'w': index \[0, -1\] is out of bounds",
        ),
        "repeated_entry": (
            [v, np.array([[1, 1], [1, 1]]), shp, names],
            ValueError,
            r"layer 'w': entry 3 .*more than once",
        ),
        "float_indices": ([v, idx.astype(np.float64), shp, names], TypeError, r"layer 'w': indices must be integers"),
        "bool_indices": ([v, idx.astype(bool), shp, names], TypeError, r"layer 'w': indices must be integers"),
        "indices_rows": ([v, idx[:1], shp, names], ValueError, r"layer 'w': expected indices of shape \(2, 2\)"),
        "indices_cols": ([v, idx[:, :1], shp, names], ValueError, r"layer 'w': expected indices of shape \(2, 2\)"),
        "negative_shape": ([v, idx, np.array([2, -2]), names], ValueError, r"layer 'w': negative entry"),
        "float_shape": ([v, idx, shp.astype(np.float64), names], TypeError, r"layer 'w': the shape must be"),
        "not_a_list": (np.zeros(4), TypeError, r"a payload is a list"),
    }


@pytest.mark.parametrize("kind", list(_malformed()))
@pytest.mark.parametrize("weighted", [True, False])
def test_malformed_payload_names_the_client(kind, weighted):
    bad, error, pattern = _malformed()[kind]
    results = [(good_payload(1.0), 3), (bad, 4), (good_payload(5.0), 5)]
    arrays = bad if isinstance(bad, list) else [bad]
    before = snapshot([results[0], results[2], (arrays, 4)])
    with pytest.raises(error, match=r"client 1: .*" + pattern):
        aggregate(results, weighted)
    assert_unchanged([results[0], results[2], (arrays, 4)], before)
    # the same payload at position 2 names client 2
    with pytest.raises(error, match=r"client 2: .*" + pattern):
        aggregate([results[0], results[2], (bad, 1)], weighted)


def test_shape_mismatch_names_layer_and_both_clients():
    results = [
        (good_payload(), 3),
        (coo_payload({"v": ([(0,)], [1.0], (3,), F32)}), 1),
        (coo_payload({"w": ([(0,), (3,)], [1.0, 2.0], (4,), F32)}), 2),
    ]
    before = snapshot(results)
    with pytest.raises(ValueError, match=r"layer 'w'.*client 0 sent \(2, 2\).*client 2 sent \(4,\)"):
        aggregate(results)
    assert_unchanged(results, before)
    # same shape in a different arrangement of the clients: the first sender is named
    with pytest.raises(ValueError, match=r"layer 'w'.*client 1 sent \(4,\).*client 2 sent \(2, 2\)"):
        aggregate([results[1], results[2], results[0]])


def test_mixed_value_dtypes_are_averaged_in_the_promoted_dtype():
    # Client 0 (3 examples) sends w[0,0] = 1 and w[1,1] = 2 as float32; client 1 (2 examples)
    # sends w[0,0] = 6 as float64: w[0,0] = (3 * 1 + 2 * 6) / 5 = 3, w[1,1] = 2, in float64.
    results = [(good_payload(), 3), (coo_payload({"w": ([(0, 0)], [6.0], (2, 2), np.float64)}), 2)]
    before = snapshot(results)
    layer = aggregate(results)["w"]
    assert layer.values.dtype == np.float64
    assert layer.flat_indices.tolist() == [0, 3] and layer.values.tolist() == [3.0, 2.0]
    assert_unchanged(results, before)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_values_are_refused_naming_client_and_layer(bad):
    results = [(good_payload(), 3), (coo_payload({"w": ([(0, 0), (1, 0)], [1.0, bad], (2, 2), F32)}), 2)]
    before = snapshot(results)
    with pytest.raises(ValueError, match=r"client 1: layer 'w' holds a non-finite value .* at flat index 1\)"):
        aggregate(results)
    assert_unchanged(results, before)
    layer = FedAvgSparseCooTensor(allow_nonfinite=True).aggregate(results)["w"]
    assert layer.flat_indices.tolist() == [0, 2, 3] and not np.isfinite(layer.values[1])


@pytest.mark.parametrize("values", [np.array(["a"]), np.array([1 + 2j], np.complex64)], ids=["str", "complex"])
def test_values_that_cannot_be_averaged_type_error(values):
    results = [([values, np.array([[0]]), np.array([2]), np.array(["w"])], 1)]
    with pytest.raises(TypeError, match=r"layer 'w'.*cannot be averaged"):
        aggregate(results)


@pytest.mark.parametrize("bad", [1.5, True, False, 2.0, "3", None, np.float32(4.0)])
@pytest.mark.parametrize("weighted", [True, False])
def test_non_integer_num_examples_type_error(bad, weighted):
    results = [(good_payload(), 3), (good_payload(2.0), bad)]
    before = snapshot(results)
    with pytest.raises(TypeError, match=r"client 1: num_examples must be an integer"):
        aggregate(results, weighted)
    assert_unchanged(results, before)


@pytest.mark.parametrize("weighted", [True, False])
def test_negative_num_examples_value_error(weighted):
    results = [(good_payload(), 3), (good_payload(2.0), -1)]
    with pytest.raises(ValueError, match=r"client 1: num_examples must be >= 0, got -1"):
        aggregate(results, weighted)


def test_numpy_integer_num_examples_accepted():
    # (np.int64(1)*1 + np.uint8(3)*3) / 4 = 10/4 = 2.5 at (0,0)
    results = [
        (coo_payload({"w": ([(0, 0)], [1.0], (2, 2), F32)}), np.int64(1)),
        (coo_payload({"w": ([(0, 0)], [3.0], (2, 2), F32)}), np.uint8(3)),
    ]
    np.testing.assert_array_equal(aggregate(results)["w"].values, np.array([2.5], F32))


@pytest.mark.parametrize(
    "results",
    [None, {"c0": (good_payload(), 1)}, "abc", 5, np.zeros(3), (r for r in [(good_payload(), 1)])],
    ids=["none", "dict", "str", "int", "ndarray", "generator"],
)
def test_results_not_a_list_type_error(results):
    with pytest.raises(TypeError, match=r"results must be a list"):
        aggregate(results)


def test_results_tuple_accepted():
    results = hand_results()
    assert_sparse_identical(aggregate(tuple(results)), aggregate(results))


@pytest.mark.parametrize("bad", [(good_payload(),), (good_payload(), 1, 2), "x", 3])
def test_result_not_a_pair_names_client(bad):
    with pytest.raises(ValueError, match=r"client 1: expected a \(payload, num_examples\) pair"):
        aggregate([(good_payload(), 3), bad])


def test_weights_sent_only_by_zero_example_clients():
    # client 0 (0 examples) sends (0,0), (0,1); client 1 (5 examples) sends (0,1), (1,1).
    # (0,0) has senders whose weights sum to zero -> ValueError (weighted).
    results = [
        (coo_payload({"w": ([(0, 0), (0, 1)], [7.0, 100.0], (2, 2), F32)}), 0),
        (coo_payload({"w": ([(0, 1), (1, 1)], [2.0, 3.0], (2, 2), F32)}), 5),
    ]
    before = snapshot(results)
    with pytest.raises(ValueError, match=r"layer 'w'.*zero examples"):
        aggregate(results)
    with pytest.raises(ValueError, match=r"layer 'w'.*zero examples"):
        aggregate(results[::-1])
    assert_unchanged(results, before)
    # unweighted, every sender counts 1: (0,0) = 7, (0,1) = (100+2)/2 = 51, (1,1) = 3
    out = aggregate(results, weighted=False)["w"]
    np.testing.assert_array_equal(out.flat_indices, [0, 1, 3])
    np.testing.assert_array_equal(out.values, np.array([7.0, 51.0, 3.0], F32))


def test_zero_example_client_sharing_entries_with_others_is_fine():
    # client 0 (0 examples) sends (0,1) = 100 only, which client 1 (5 examples) also sends;
    # a 0 weight contributes nothing: (0,1) = (0*100 + 5*2)/(0+5) = 2; (1,1) = 3.
    # A layer sent only by a zero-example client, with its other layer sent by client 1, too.
    results = [
        (coo_payload({"w": ([(0, 1)], [100.0], (2, 2), F32)}), 0),
        (coo_payload({"w": ([(0, 1), (1, 1)], [2.0, 3.0], (2, 2), F32)}), 5),
    ]
    out = aggregate(results)["w"]
    np.testing.assert_array_equal(out.flat_indices, [1, 3])
    np.testing.assert_array_equal(out.values, np.array([2.0, 3.0], F32))
    only_zero = results + [(coo_payload({"z": ([(0,)], [1.0], (1,), F32)}), 0)]
    with pytest.raises(ValueError, match=r"layer 'z'.*zero examples"):
        aggregate(only_zero)


# --------------------------------------------------------------------------------------
# masked_fedavg with per-weight masks
# --------------------------------------------------------------------------------------

PW_SHAPES = {"k": (3, 4), "b": (4,), "s": (), "t": (2, 1, 3)}


def make_pw_federation(seed, n_clients=4, positive=False, zero_count=False):
    rng = np.random.default_rng(seed)
    low = 1.0 if positive else -2.0
    stacked = {n: rng.uniform(low, 2.0, size=(n_clients,) + s).astype(np.float32) for n, s in PW_SHAPES.items()}
    masks = {n: rng.random((n_clients,) + s) < 0.5 for n, s in PW_SHAPES.items()}
    masks["k"][:, 0, 0] = False  # entry (0,0) of 'k' sent by nobody
    masks["k"][:, 2, 3] = False
    masks["k"][1, 2, 3] = True  # entry (2,3) sent by client 1 only
    counts = rng.integers(1, 100, size=n_clients)
    if zero_count:
        counts[0] = 0
    return stacked, masks, counts


def reference_masked(stacked, masks, counts, weighted, fallback=None):
    """float64 per-weight (or per-layer, for (C,) masks) FedAvg over stacked clients."""
    out, sent = {}, {}
    for name, x in stacked.items():
        x = np.asarray(x)
        m = np.asarray(masks[name], bool)
        if m.ndim == 1:
            m = np.broadcast_to(m.reshape((-1,) + (1,) * (x.ndim - 1)), x.shape)
        w = np.asarray(counts, np.float64) if weighted else np.ones(x.shape[0])
        wm = np.where(m, w.reshape((-1,) + (1,) * (x.ndim - 1)), 0.0)
        total = wm.sum(axis=0)
        summed = np.where(m, wm * x.astype(np.float64), 0.0).sum(axis=0)
        mean = summed / np.where(total > 0, total, 1.0)
        default = np.zeros(x.shape[1:]) if fallback is None else np.asarray(fallback[name], np.float64)
        out[name] = np.where(total > 0, mean, default)
        sent[name] = total > 0
        if np.asarray(masks[name]).ndim == 1:  # per layer: one boolean
            sent[name] = np.asarray(masks[name], bool).any() and bool(total.reshape(-1)[0] > 0)
    return out, sent


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_masked_per_weight_matches_reference(seed, weighted, use_jit):
    stacked, masks, counts = make_pw_federation(seed)
    before = {n: a.copy() for n, a in stacked.items()}
    fn = functools.partial(masked_fedavg, weighted=weighted)
    if use_jit:
        fn = jax.jit(fn)
    averages, sent = fn(
        {n: jnp.asarray(a) for n, a in stacked.items()},
        {n: jnp.asarray(m) for n, m in masks.items()},
        jnp.asarray(counts),
    )
    ref, ref_sent = reference_masked(stacked, masks, counts, weighted)
    assert sorted(averages) == sorted(sent) == sorted(PW_SHAPES)
    for name, shape in PW_SHAPES.items():
        got = np.asarray(averages[name])
        assert got.shape == shape and got.dtype == np.float32, name
        assert np.asarray(sent[name]).shape == shape and np.asarray(sent[name]).dtype == np.bool_, name
        np.testing.assert_array_equal(np.asarray(sent[name]), ref_sent[name], err_msg=name)
        np.testing.assert_allclose(got, ref[name], rtol=1e-6, atol=1e-6, err_msg=name)
    # the entry sent by client 1 alone is its value, not a fraction of it
    assert float(averages["k"][2, 3]) == stacked["k"][1, 2, 3]
    assert not bool(sent["k"][0, 0]) and float(averages["k"][0, 0]) == 0.0
    for n in stacked:
        np.testing.assert_array_equal(stacked[n], before[n])


def test_masked_per_weight_hand_computed_with_fallback():
    # 2 clients, layer 'w' (2,2), counts 1 and 3:
    #   (0,0): both send 2 and 6   -> weighted (1*2 + 3*6)/4 = 20/4 = 5; unweighted 4
    #   (0,1): client 0 sends 8    -> 8
    #   (1,0): nobody              -> fallback -1
    #   (1,1): client 1 sends -4   -> -4
    x = jnp.array([[[2.0, 8.0], [50.0, 50.0]], [[6.0, 50.0], [50.0, -4.0]]], jnp.float32)
    m = jnp.array([[[True, True], [False, False]], [[True, False], [False, True]]])
    fb = {"w": jnp.full((2, 2), -1.0)}
    avg, sent = masked_fedavg({"w": x}, {"w": m}, jnp.array([1, 3]), fallback=fb)
    np.testing.assert_array_equal(np.asarray(avg["w"]), [[5.0, 8.0], [-1.0, -4.0]])
    np.testing.assert_array_equal(np.asarray(sent["w"]), [[True, True], [False, True]])
    avg, _ = masked_fedavg({"w": x}, {"w": m}, jnp.array([1, 3]), weighted=False)
    np.testing.assert_array_equal(np.asarray(avg["w"]), [[4.0, 8.0], [0.0, -4.0]])


def test_masked_per_weight_zero_count_senders_use_fallback():
    # (0,) sent only by client 0 (0 examples): weighted -> fallback 9, sent False;
    # unweighted -> its value 5, sent True. (1,) sent by both: (0*1 + 2*3)/2 = 3.
    x = jnp.array([[5.0, 1.0], [7.0, 3.0]], jnp.float32)
    m = jnp.array([[True, True], [False, True]])
    avg, sent = masked_fedavg({"w": x}, {"w": m}, jnp.array([0, 2]), fallback={"w": jnp.array([9.0, 9.0])})
    np.testing.assert_array_equal(np.asarray(avg["w"]), [9.0, 3.0])
    np.testing.assert_array_equal(np.asarray(sent["w"]), [False, True])
    avg, sent = masked_fedavg({"w": x}, {"w": m}, jnp.array([0, 2]), weighted=False)
    np.testing.assert_array_equal(np.asarray(avg["w"]), [5.0, 2.0])  # (1+3)/2 = 2
    np.testing.assert_array_equal(np.asarray(sent["w"]), [True, True])


def test_masked_per_weight_integer_rounding():
    # int32, unweighted: (1+2)/2 = 1.5 -> 2; (2+3)/2 = 2.5 -> 2; 7 alone -> 7
    x = jnp.array([[1, 2, 7], [2, 3, 100]], jnp.int32)
    m = jnp.array([[True, True, True], [True, True, False]])
    avg, _ = masked_fedavg({"i": x}, {"i": m}, jnp.array([1, 1]), weighted=False)
    assert avg["i"].dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(avg["i"]), [2, 2, 7])


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("weighted", [True, False])
def test_masked_mixed_per_layer_and_per_weight_masks(weighted, use_jit):
    stacked, masks, counts = make_pw_federation(5)
    masks["b"] = np.array([True, False, True, False])  # per layer
    masks["s"] = np.array([False, False, False, False])  # per layer, nobody
    fallback = {n: np.full(s, 0.25, np.float32) for n, s in PW_SHAPES.items()}
    fn = functools.partial(masked_fedavg, weighted=weighted)
    if use_jit:
        fn = jax.jit(fn)
    avg, sent = fn(
        {n: jnp.asarray(a) for n, a in stacked.items()},
        {n: jnp.asarray(m) for n, m in masks.items()},
        jnp.asarray(counts),
        fallback={n: jnp.asarray(f) for n, f in fallback.items()},
    )
    ref, ref_sent = reference_masked(stacked, masks, counts, weighted, fallback)
    for name in PW_SHAPES:
        np.testing.assert_allclose(np.asarray(avg[name]), ref[name], rtol=1e-6, atol=1e-6, err_msg=name)
    assert np.asarray(sent["b"]).shape == () and bool(sent["b"])
    assert np.asarray(sent["s"]).shape == () and not bool(sent["s"])
    np.testing.assert_array_equal(np.asarray(avg["s"]), np.float32(0.25))
    assert np.asarray(sent["k"]).shape == (3, 4)
    np.testing.assert_array_equal(np.asarray(sent["k"]), ref_sent["k"])
    assert float(avg["k"][0, 0]) == 0.25  # sent by nobody: fallback


@pytest.mark.parametrize("use_jit", [False, True])
def test_masked_bad_mask_shapes_value_error(use_jit):
    layers = {"w": np.ones((3, 2, 2), np.float32)}
    counts = np.array([1, 2, 3])
    before = layers["w"].copy()
    fn = jax.jit(masked_fedavg) if use_jit else masked_fedavg
    for bad in [
        np.ones((3, 2), bool),
        np.ones((3, 1, 1), bool),
        np.ones((2, 2, 2), bool),
        np.ones((2, 2), bool),
        np.ones((3, 2, 2, 1), bool),
        np.ones((2,), bool),
        np.ones((), bool),
    ]:
        with pytest.raises(
            ValueError,
            match=r"mask of layer 'w': expected shape \(3,\) or \(3, 2, 2\), got " + re.escape(str(bad.shape)),
        ):
            fn({"w": jnp.asarray(layers["w"])}, {"w": jnp.asarray(bad)}, jnp.asarray(counts))
    np.testing.assert_array_equal(layers["w"], before)


def test_masked_per_weight_non_senders_do_not_leak_into_the_average():
    # Each weight is averaged over the clients that sent it: what a client holds at a
    # weight it did not send (here NaN / inf) must not matter. Entry 0: client 0 alone = 1;
    # entry 1: (2 + 4)/2 = 3 (client 1 does not send entry 0; client 0 does send entry 1).
    x = jnp.array([[1.0, 2.0], [np.nan, 4.0], [np.inf, -np.inf]], jnp.float32)
    m = jnp.array([[True, True], [False, True], [False, False]])
    avg, sent = masked_fedavg({"w": x}, {"w": m}, jnp.array([1, 1, 1]), weighted=False)
    np.testing.assert_array_equal(np.asarray(avg["w"]), [1.0, 3.0])
    np.testing.assert_array_equal(np.asarray(sent["w"]), [True, True])


# --------------------------------------------------------------------------------------
# Agreement: masked_fedavg (per-weight masks) == FedAvgSparseCooTensor on COO payloads
# --------------------------------------------------------------------------------------


def check_agreement(stacked, masks, counts, weighted):
    n_clients = len(counts)
    results = [
        (coo_from_masks({n: a[c] for n, a in stacked.items()}, {n: m[c] for n, m in masks.items()}), int(counts[c]))
        for c in range(n_clients)
    ]
    coo = aggregate(results, weighted)
    avg, sent = masked_fedavg(
        {n: jnp.asarray(a) for n, a in stacked.items()},
        {n: jnp.asarray(m) for n, m in masks.items()},
        jnp.asarray(counts),
        weighted=weighted,
    )
    assert set(coo) == {n for n in stacked if np.asarray(sent[n]).any()}
    for name in stacked:
        sent_flat = np.flatnonzero(np.asarray(sent[name]).reshape(-1))
        np.testing.assert_array_equal(sent_flat, np.flatnonzero(np.asarray(masks[name]).any(axis=0).reshape(-1)))
        if name not in coo:
            continue
        np.testing.assert_array_equal(np.asarray(coo[name].flat_indices), sent_flat, err_msg=name)
        assert coo[name].values.dtype == np.asarray(avg[name]).dtype, name
        np.testing.assert_allclose(
            coo[name].values, np.asarray(avg[name]).reshape(-1)[sent_flat], rtol=1e-6, atol=0, err_msg=name
        )


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_and_coo_agree(seed, weighted):
    stacked, masks, counts = make_pw_federation(100 + seed, positive=True)
    check_agreement(stacked, masks, counts, weighted)


@settings(deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_clients=st.integers(1, 5),
    weighted=st.booleans(),
    density=st.sampled_from([0.0, 0.2, 0.6, 1.0]),
)
def test_masked_and_coo_agree_hypothesis(seed, n_clients, weighted, density):
    rng = np.random.default_rng(seed)
    stacked = {n: rng.uniform(1.0, 2.0, size=(n_clients,) + s).astype(np.float32) for n, s in PW_SHAPES.items()}
    stacked["i"] = rng.integers(-100, 100, size=(n_clients, 5)).astype(np.int32)
    masks = {n: rng.random(a.shape) < density for n, a in stacked.items()}
    counts = rng.integers(1, 50, size=n_clients)
    check_agreement(stacked, masks, counts, weighted)
