"""Tests of the sparse COO exchange: score functions (jaxlayerx/scores.py), the global
threshold and masks (jaxlayerx/sparse_selection.py), the COO wire format (jaxlayerx/coo.py)
and SparseCooParameterExchanger (jaxlayerx/exchangers.py).

Every expectation comes from the small plain-numpy references below (or from hand-computed
values, with the arithmetic in a comment), never from the library itself:

* ``ref_score``: the six score formulas on float32 copies of the leaves;
* ``ref_threshold``: all scores concatenated as float32, NaN -> -inf, sorted descending,
  the ``math.ceil(total * s)``-th one (``-0.0`` read as ``0.0``);
* ``ref_masks``: ``score >= threshold``, cleared in layers whose kept values are all zero;
* ``ref_payload``: ``values + indices + shapes + [names]`` built with boolean indexing and
  ``np.argwhere`` (fl4health's layout);
* ``ref_pull``: a numpy copy of the model with exactly the payload's entries written.
"""

from __future__ import annotations

import collections
import io
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import bits, ref_flat
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxlayerx
from jaxlayerx import (
    SCORE_FUNCTIONS,
    SparseCooParameterExchanger,
    largest_final_magnitude_scores,
    largest_increase_in_magnitude_scores,
    largest_magnitude_change_scores,
    score_threshold,
    smallest_final_magnitude_scores,
    smallest_increase_in_magnitude_scores,
    smallest_magnitude_change_scores,
    sparse_masks,
    sparse_selection,
)

BF16 = jnp.bfloat16
KINDS = ["plain", "linen", "nnx"]
HYP = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------


class LinenSmall(nn.Module):
    """Dense + BatchNorm: params/Dense_0/{kernel,bias}, params/BatchNorm_0/{scale,bias},
    batch_stats/BatchNorm_0/{mean,var}."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(3)(x)
        return nn.BatchNorm(use_running_average=True)(x)


class NNXSmall(nnx.Module):
    """Linear + BatchNorm + one 0-d parameter."""

    def __init__(self, rngs, dtype=jnp.float32):
        self.fc = nnx.Linear(4, 3, param_dtype=dtype, rngs=rngs)
        self.bn = nnx.BatchNorm(3, param_dtype=dtype, rngs=rngs)
        self.temp = nnx.Param(jnp.asarray(0.5, dtype))


_LINEN_VARS = None


def linen_template():
    global _LINEN_VARS
    if _LINEN_VARS is None:
        _LINEN_VARS = LinenSmall().init(jax.random.key(0), jnp.ones((2, 4), jnp.float32))
    return _LINEN_VARS


def _rand_like(a, rng):
    a = np.asarray(a)
    if np.issubdtype(a.dtype, np.integer):
        return rng.integers(-50, 50, size=a.shape).astype(a.dtype)
    return rng.standard_normal(a.shape).astype(a.dtype)


def plain_tree(rng) -> dict:
    """Nested pytree: float32, bfloat16, int32 and 0-d leaves, numpy and jax."""
    return {
        "enc": {
            "w": rng.standard_normal((3, 4)).astype(np.float32),
            "b": jnp.asarray(rng.standard_normal(4), jnp.float32),
        },
        "half": rng.standard_normal((2, 3)).astype(BF16),
        "count": rng.integers(-20, 20, size=(5,)).astype(np.int32),
        "scalar": np.asarray(rng.standard_normal(), np.float32),
    }


def make(kind: str, seed: int):
    """A model of ``kind`` whose every weight is random (BatchNorm stats too)."""
    rng = np.random.default_rng(seed)
    if kind == "plain":
        return plain_tree(rng)
    if kind == "linen":
        return jax.tree.map(lambda a: jnp.asarray(_rand_like(a, rng)), linen_template())
    if kind in ("nnx", "bf16_nnx"):
        m = NNXSmall(nnx.Rngs(seed), dtype=BF16 if kind == "bf16_nnx" else jnp.float32)
        nnx.update(m, jax.tree.map(lambda a: jnp.asarray(_rand_like(a, rng)), nnx.state(m)))
        return m
    raise AssertionError(kind)


# ---------------------------------------------------------------------------------------
# Independent references
# ---------------------------------------------------------------------------------------


def f32(a) -> np.ndarray:
    return np.asarray(a).astype(np.float32)


SCORE_REFS = {
    # function: (needs initial, numpy formula on float32 copies)
    largest_final_magnitude_scores: (False, lambda w, w0: np.abs(w)),
    smallest_final_magnitude_scores: (False, lambda w, w0: -np.abs(w)),
    largest_magnitude_change_scores: (True, lambda w, w0: np.abs(w - w0)),
    smallest_magnitude_change_scores: (True, lambda w, w0: -np.abs(w - w0)),
    largest_increase_in_magnitude_scores: (True, lambda w, w0: np.abs(w) - np.abs(w0)),
    smallest_increase_in_magnitude_scores: (True, lambda w, w0: np.abs(w0) - np.abs(w)),
}
SCORE_FNS = list(SCORE_REFS)
NEEDS_INITIAL = [fn for fn, (needs, _) in SCORE_REFS.items() if needs]


def ref_score(fn, cur: dict, ini: dict | None) -> dict[str, np.ndarray]:
    _, formula = SCORE_REFS[fn]
    return {
        name: formula(f32(w), None if ini is None else f32(ini[name])).astype(np.float32) for name, w in cur.items()
    }


def ref_threshold(scores, s: float) -> np.float32:
    values = [np.asarray(v).astype(np.float32).reshape(-1) for v in scores.values()]
    all_scores = np.concatenate(values) if values else np.zeros(0, np.float32)
    if all_scores.size == 0:
        return np.float32(np.inf)
    all_scores = np.where(np.isnan(all_scores), np.float32(-np.inf), all_scores)
    k = math.ceil(all_scores.size * s)
    threshold = np.sort(all_scores)[::-1][k - 1]
    return np.float32(0.0) if threshold == 0 else np.float32(threshold)


def ref_masks(scores, layers, s: float) -> dict[str, np.ndarray]:
    t = ref_threshold(scores, s)
    out = {}
    for name, sc in scores.items():
        kept = np.asarray(sc).astype(np.float32) >= t  # NaN >= anything is False
        if not np.any(kept & (np.asarray(layers[name]) != 0)):
            kept = np.zeros_like(kept)
        out[name] = kept
    return out


def ref_payload(layers: dict, masks: dict) -> list[np.ndarray]:
    values, indices, shapes, names = [], [], [], []
    for name, layer in layers.items():
        mask = masks[name]
        if not mask.any():
            continue
        layer = np.asarray(layer)
        values.append(layer[mask])  # boolean indexing: row-major, like np.argwhere
        indices.append(np.argwhere(mask).astype(np.int64))
        shapes.append(np.array(layer.shape, dtype=np.int64))
        names.append(name)
    return values + indices + shapes + [np.array(names, dtype=np.str_)]


def ref_pull(before: dict[str, np.ndarray], entries: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict:
    """``before`` with ``values`` written at ``indices`` (n, ndim) of each named layer."""
    out = {name: np.array(a, copy=True) for name, a in before.items()}
    for name, (values, idx) in entries.items():
        layer = out[name]
        for row, v in zip(np.asarray(idx), np.asarray(values)):
            layer[tuple(int(i) for i in row)] = np.asarray(v).astype(layer.dtype)
    return out


def assert_identical(got, want, what=""):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    if got.dtype.kind == "O":
        assert got.tolist() == want.tolist(), what
        return
    assert np.array_equal(bits(got), bits(want)), f"{what}: values differ\n{got}\n{want}"


def assert_flat_identical(got: dict, want: dict):
    assert list(got) == list(want)
    for name in want:
        assert_identical(got[name], want[name], name)


def assert_payload_identical(got, want):
    assert isinstance(got, list)
    assert len(got) == len(want), (len(got), len(want))
    for i, (g, w) in enumerate(zip(got, want)):
        assert type(g) is np.ndarray, i
        if w.dtype.kind == "U":
            assert g.dtype.kind == "U" and g.ndim == 1
            assert g.tolist() == w.tolist()
        else:
            assert_identical(g, w, f"payload[{i}]")


def through_npy(payload):
    """Every array through np.save / np.load(allow_pickle=False): Flower's serialization."""
    out = []
    for a in payload:
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        buf.seek(0)
        out.append(np.load(buf, allow_pickle=False))
    return out


def mask_entries(source: dict, masks: dict) -> dict:
    return {name: (np.asarray(source[name])[m], np.argwhere(m)) for name, m in masks.items() if m.any()}


def copy_model(model):
    if isinstance(model, nnx.Module):
        return nnx.clone(model)
    return jax.tree.map(lambda a: np.array(a, copy=True) if isinstance(a, np.ndarray) else a, model)


# ---------------------------------------------------------------------------------------
# Score functions
# ---------------------------------------------------------------------------------------


def test_reference_flat_view_matches_library_flatten():
    # The names and order of ref_flat are those of jaxlayerx.flatten: the references speak
    # about the same layers.
    for kind in KINDS + ["bf16_nnx"]:
        m = make(kind, 0)
        assert list(jaxlayerx.flatten(m)) == list(ref_flat(m))
    assert "temp" in ref_flat(make("nnx", 0)) and ref_flat(make("nnx", 0))["temp"].shape == ()


def test_score_functions_registry_maps_cli_names():
    assert SCORE_FUNCTIONS == {
        "largest-final-magnitude": largest_final_magnitude_scores,
        "smallest-final-magnitude": smallest_final_magnitude_scores,
        "largest-magnitude-change": largest_magnitude_change_scores,
        "smallest-magnitude-change": smallest_magnitude_change_scores,
        "largest-increase-in-magnitude": largest_increase_in_magnitude_scores,
        "smallest-increase-in-magnitude": smallest_increase_in_magnitude_scores,
    }
    assert jaxlayerx.ScoreGenFunction is not None


@pytest.mark.parametrize("kind", KINDS + ["bf16_nnx", "flat", "flat-dict"])
@pytest.mark.parametrize("fn", SCORE_FNS, ids=lambda f: f.__name__)
def test_score_functions_match_numpy(fn, kind):
    if kind == "flat":  # a flat view (an OrderedDict name -> array) keeps its own order
        a, a0 = ref_flat(make("plain", 1)), ref_flat(make("plain", 2))
        a = collections.OrderedDict((name, a[name]) for name in reversed(list(a)))
        a0 = collections.OrderedDict((name, a0[name]) for name in reversed(list(a0)))
    elif kind == "flat-dict":  # a plain dict name -> array is read in sorted key order, as JAX reads dicts
        a, a0 = ref_flat(make("plain", 1)), ref_flat(make("plain", 2))
        a = {name: a[name] for name in reversed(list(a))}
        a0 = {name: a0[name] for name in reversed(list(a0))}
    else:
        a, a0 = make(kind, 1), make(kind, 2)
    if kind == "flat":
        cur, ini = a, a0
    elif kind == "flat-dict":
        cur, ini = ({name: d[name] for name in sorted(d)} for d in (a, a0))
    else:
        cur, ini = ref_flat(a), ref_flat(a0)
    before = (ref_flat(a), ref_flat(a0)) if kind not in ("flat", "flat-dict") else None
    got = fn(a, a0)
    want = ref_score(fn, cur, ini)
    assert list(got) == list(cur)
    for name in want:
        g = np.asarray(got[name])
        assert g.dtype == np.float32, name
        assert g.shape == want[name].shape, name
        np.testing.assert_array_equal(g, want[name], err_msg=name)
    if before is not None:  # pure: neither model changed
        assert_flat_identical(ref_flat(a), before[0])
        assert_flat_identical(ref_flat(a0), before[1])


@pytest.mark.parametrize("fn", SCORE_FNS, ids=lambda f: f.__name__)
def test_score_functions_compute_bf16_and_int_leaves_in_float32(fn):
    # int leaves: |int32 min| and |int8 -128| overflow in integer arithmetic but not in
    # float32 (2**31 and 128); 2**24 + 1 rounds to 2**24 in float32, so the change
    # |w - w0| for w = 2**24 + 1, w0 = 2**24 is 0 in float32 (it would be 1 in int32).
    # bf16 leaves: the difference of two bf16 values is taken in float32 (exact here),
    # not rounded back to bf16: 1 + 2**-7 (a bf16 value) minus 1 = 2**-7 in float32, while
    # (256 + 1) - 0 = 257 is not a bf16 value (bf16 rounds it to 256).
    cur = collections.OrderedDict(
        i32=np.array([-(2**31), 2**24 + 1, 7, -3], np.int32),
        i8=np.array([-128, 127, 0], np.int8),
        bf=np.array([1 + 2**-7, 257, -3.5], BF16),
    )
    ini = collections.OrderedDict(
        i32=np.array([0, 2**24, 7, 3], np.int32),
        i8=np.array([1, -1, 0], np.int8),
        bf=np.array([1.0, 0.0, 3.5], BF16),
    )
    got = fn(cur, ini)
    want = ref_score(fn, cur, ini)
    # sanity of the reference on the hand-computed cases
    if fn is largest_final_magnitude_scores:
        np.testing.assert_array_equal(want["i32"], np.array([2.0**31, 2.0**24, 7, 3], np.float32))
        np.testing.assert_array_equal(want["i8"], np.array([128, 127, 0], np.float32))
    if fn is largest_magnitude_change_scores:
        np.testing.assert_array_equal(want["i32"], np.array([2.0**31, 0, 0, 6], np.float32))
        np.testing.assert_array_equal(want["bf"], np.array([2.0**-7, 256, 7], np.float32))
    assert list(got) == list(cur)
    for name in want:
        g = np.asarray(got[name])
        assert g.dtype == np.float32, name
        np.testing.assert_array_equal(g, want[name], err_msg=name)


@pytest.mark.parametrize("fn", SCORE_FNS, ids=lambda f: f.__name__)
def test_score_functions_under_jit_and_vmap_over_clients(fn):
    rng = np.random.default_rng(5)
    names = ["z/kernel", "a/bias", "m/scalar"]
    shapes = [(2, 3), (3,), ()]
    clients = 3
    stacked = collections.OrderedDict(
        (n, rng.standard_normal((clients,) + s).astype(np.float32)) for n, s in zip(names, shapes)
    )
    stacked0 = collections.OrderedDict(
        (n, rng.standard_normal((clients,) + s).astype(np.float32)) for n, s in zip(names, shapes)
    )
    got = jax.jit(jax.vmap(fn))(stacked, stacked0)
    assert list(got) == names  # an OrderedDict keeps its order through jit/vmap
    for c in range(clients):
        cur = {n: stacked[n][c] for n in names}
        ini = {n: stacked0[n][c] for n in names}
        want = ref_score(fn, cur, ini)
        for n in names:
            np.testing.assert_array_equal(np.asarray(got[n][c]), want[n], err_msg=f"{n} client {c}")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fn", NEEDS_INITIAL, ids=lambda f: f.__name__)
def test_score_functions_needing_initial_reject_none(fn, kind):
    a = make(kind, 3)
    before = ref_flat(a)
    with pytest.raises(ValueError, match="initial_model"):
        fn(a, None)
    assert_flat_identical(ref_flat(a), before)


@pytest.mark.parametrize(
    "fn", [largest_final_magnitude_scores, smallest_final_magnitude_scores], ids=lambda f: f.__name__
)
def test_final_magnitude_scores_ignore_initial(fn):
    a = make("plain", 3)
    want = ref_score(fn, ref_flat(a), None)
    for got in (fn(a), fn(a, None)):
        assert list(got) == list(want)
        for n in want:
            np.testing.assert_array_equal(np.asarray(got[n]), want[n])


def _drop(tree, key):
    return {k: v for k, v in tree.items() if k != key}


@pytest.mark.parametrize("fn", NEEDS_INITIAL, ids=lambda f: f.__name__)
def test_score_functions_reject_mismatched_initial(fn):
    a, a0 = make("plain", 4), make("plain", 5)
    snap = (ref_flat(a), ref_flat(a0))
    # a layer of the model missing from the initial model
    with pytest.raises(KeyError, match=re.escape("'count'")):
        fn(a, _drop(a0, "count"))
    # a layer of the initial model that the model lacks
    with pytest.raises(KeyError, match=re.escape("'count'")):
        fn(_drop(a, "count"), a0)
    # same names, another shape
    bad = dict(a0, half=np.zeros((3, 2), BF16))
    with pytest.raises(ValueError, match=r"half.*\(2, 3\).*\(3, 2\)"):
        fn(a, bad)
    # flat dicts too
    with pytest.raises(ValueError, match=re.escape("'x'")):
        fn({"x": np.zeros(3, np.float32)}, {"x": np.zeros(4, np.float32)})
    assert_flat_identical(ref_flat(a), snap[0])
    assert_flat_identical(ref_flat(a0), snap[1])


# ---------------------------------------------------------------------------------------
# score_threshold and sparse_masks
# ---------------------------------------------------------------------------------------


def od(**kw):
    return collections.OrderedDict((k, np.asarray(v, np.float32)) for k, v in kw.items())


def check_threshold_and_masks(scores, layers, s, expected_threshold=None, expected_masks=None):
    t = np.float32(score_threshold(scores, s))
    want_t = ref_threshold(scores, s)
    assert t == want_t, (t, want_t)
    # both paths of the packed exchange find the same value (compared to each other and
    # to the reference only)
    host = np.float32(sparse_selection._host_threshold(scores, s))
    device = np.float32(
        sparse_selection._device_threshold(
            collections.OrderedDict((n, jnp.asarray(v)) for n, v in scores.items()), sparsity_level=s
        )
    )
    assert host == want_t and device == want_t, (host, device, want_t)
    if expected_threshold is not None:
        assert want_t == expected_threshold
    masks = sparse_masks(scores, layers, s)
    want = ref_masks(scores, layers, s)
    assert list(masks) == list(scores)
    for n in want:
        got = np.asarray(masks[n])
        assert got.dtype == np.bool_ and got.shape == np.shape(scores[n]), n
        np.testing.assert_array_equal(got, want[n], err_msg=n)
        if expected_masks is not None:
            np.testing.assert_array_equal(want[n], expected_masks[n], err_msg=n)


def test_threshold_hand_computed():
    # total 7, s = 0.3: 7 * 0.3 = 2.1 -> k = 3; descending 5, 4, 3, 2, 1, 0, -1 -> threshold 3
    scores = od(a=[3, 1, 2], b=[[5, 4], [0, -1]])
    layers = od(a=[1, 1, 1], b=[[1, 1], [1, 1]])
    check_threshold_and_masks(
        scores, layers, 0.3, 3.0, {"a": np.array([1, 0, 0], bool), "b": np.array([[1, 1], [0, 0]], bool)}
    )


@pytest.mark.parametrize(
    "s, k",
    [
        (0.28, 8),  # 25 * 0.28 == 7.000000000000001 in Python floats -> ceil = 8
        (0.3, 8),  # 25 * 0.3 == 7.5 -> 8
        (0.2, 5),  # 25 * 0.2 == 5.0 exactly -> 5
        (0.01, 1),  # 0.25 -> 1
        (1.0, 25),
        (0.04, 1),  # 25 * 0.04 == 1.0 exactly -> 1
    ],
)
def test_threshold_k_is_python_float_ceil(s, k):
    assert 25 * 0.28 > 7  # the float product, not the real one, decides
    assert jaxlayerx.num_weights_to_exchange(25, s) == k
    scores = od(a=np.arange(25, dtype=np.float32)[::-1])  # distinct: 24 .. 0
    layers = od(a=np.ones(25))
    # the k-th largest of 24..0 is 25 - k
    check_threshold_and_masks(scores, layers, s, np.float32(25 - k), {"a": np.arange(25)[::-1] >= 25 - k})
    assert int(np.asarray(sparse_masks(scores, layers, s)["a"]).sum()) == k


def test_threshold_ties_all_kept():
    # [1, 1, 1, 0], s = 0.25 -> k = 1 -> threshold 1: the three tied ones are kept
    scores = od(a=[1, 1, 1, 0])
    check_threshold_and_masks(scores, od(a=[1, 2, 3, 4]), 0.25, 1.0, {"a": np.array([1, 1, 1, 0], bool)})


@pytest.mark.parametrize("s", [1e-9, 0.2, 0.5, 1.0])
def test_threshold_all_equal_scores_keep_everything(s):
    scores = od(a=[2, 2, 2], b=[[2, 2]], c=2)
    layers = od(a=[1, 1, 1], b=[[1, 1]], c=1)
    check_threshold_and_masks(
        scores, layers, s, 2.0, {"a": np.ones(3, bool), "b": np.ones((1, 2), bool), "c": np.bool_(True)}
    )


def test_threshold_nan_scores_never_kept():
    nan = np.nan
    scores = od(a=[nan, 1, nan, 0.5])
    layers = od(a=[1, 1, 1, 1])
    # s = 1.0: k = 4; descending with NaN as -inf: 1, .5, -inf, -inf -> threshold -inf,
    # still no NaN kept (NaN >= -inf is False)
    check_threshold_and_masks(scores, layers, 1.0, np.float32(-np.inf), {"a": np.array([0, 1, 0, 1], bool)})
    # s = 0.5: k = 2 -> threshold 0.5
    check_threshold_and_masks(scores, layers, 0.5, 0.5, {"a": np.array([0, 1, 0, 1], bool)})
    # s = 0.25: k = 1 -> threshold 1
    check_threshold_and_masks(scores, layers, 0.25, 1.0, {"a": np.array([0, 1, 0, 0], bool)})
    # all NaN: nothing kept at any level
    for s in (0.25, 1.0):
        check_threshold_and_masks(od(a=[nan, nan]), od(a=[1, 1]), s, np.float32(-np.inf), {"a": np.zeros(2, bool)})


def test_threshold_infinities():
    inf = np.inf
    # 3 * (1/3) == 1.0 -> k = 1 -> +inf
    check_threshold_and_masks(
        od(a=[inf, -inf, 0]), od(a=[1, 1, 1]), 1 / 3, np.float32(inf), {"a": np.array([1, 0, 0], bool)}
    )
    # s = 1: k = 3 -> -inf, everything kept
    check_threshold_and_masks(od(a=[inf, -inf, 0]), od(a=[1, 1, 1]), 1.0, np.float32(-inf), {"a": np.ones(3, bool)})


def test_threshold_negative_zero_is_zero():
    # -0.0 and 0.0 are one score: k = 1 (s = 0.25 of 4) -> threshold 0, both kept
    scores = od(a=[-0.0, -1.0], b=[0.0, -2.0])
    layers = od(a=[1, 1], b=[1, 1])
    check_threshold_and_masks(scores, layers, 0.25, 0.0, {"a": np.array([1, 0], bool), "b": np.array([1, 0], bool)})
    t = np.float32(score_threshold(scores, 0.25))
    assert t == 0
    # the threshold is -0.0 itself when the k-th score is -0.0: keeps +0.0 scores too
    scores = od(a=[-0.0, 0.0, -1.0])
    check_threshold_and_masks(scores, od(a=[1, 1, 1]), 0.3, 0.0, {"a": np.array([1, 1, 0], bool)})
    scores = od(a=[0.0, -0.0, -1.0])
    check_threshold_and_masks(scores, od(a=[1, 1, 1]), 0.3, 0.0, {"a": np.array([1, 1, 0], bool)})


def test_threshold_sparsity_one_keeps_every_number():
    rng = np.random.default_rng(0)
    scores = od(a=rng.standard_normal((3, 4)), b=rng.standard_normal(5), c=-7.0)
    layers = od(a=np.ones((3, 4)), b=np.ones(5), c=1.0)
    check_threshold_and_masks(scores, layers, 1.0, np.float32(-7.0))
    for n, m in sparse_masks(scores, layers, 1.0).items():
        assert np.asarray(m).all(), n


@pytest.mark.parametrize("s", [1e-9, 1e-3, 1 / 60])
def test_tiny_sparsity_keeps_exactly_one_weight(s):
    # 60 distinct scores: ceil(60 * s) == 1 -> only the global maximum is kept
    scores_all = np.random.default_rng(1).permutation(60).astype(np.float32) * 0.5 - 10
    scores = od(a=scores_all[:24].reshape(2, 3, 4), b=scores_all[24:59], c=scores_all[59])
    layers = od(a=np.ones((2, 3, 4)), b=np.ones(35), c=1.0)
    masks = sparse_masks(scores, layers, s)
    kept = sum(int(np.asarray(m).sum()) for m in masks.values())
    assert kept == 1
    where = [n for n, m in masks.items() if np.asarray(m).any()]
    assert len(where) == 1
    assert np.asarray(scores[where[0]])[np.asarray(masks[where[0]])][0] == scores_all.max()
    check_threshold_and_masks(scores, layers, s, np.float32(scores_all.max()))


def test_push_never_sends_nan_scored_weights():
    # host path (numpy scores): [nan, 1, nan, 0.5] + [nan, 2]; 6 weights
    model = {"a": np.array([1, 2, 3, 4], np.float32), "b": np.array([5, 6], np.float32)}
    scores = {"a": np.array([np.nan, 1, np.nan, 0.5], np.float32), "b": np.array([np.nan, 2], np.float32)}
    for s, want in [
        (1 / 6, {"b": ([6.0], [[1]])}),  # k = 1 -> threshold 2
        (0.5, {"a": ([2.0, 4.0], [[1], [3]]), "b": ([6.0], [[1]])}),  # k = 3 -> threshold 0.5
        (1.0, {"a": ([2.0, 4.0], [[1], [3]]), "b": ([6.0], [[1]])}),  # k = 6 -> -inf, NaN still out
    ]:
        ex = SparseCooParameterExchanger(s, lambda m, i: scores)
        payload = ex.push_parameters(model)
        names = list(want)
        expected = (
            [np.array(want[n][0], np.float32) for n in names]
            + [np.array(want[n][1], np.int64) for n in names]
            + [np.array(model[n].shape, np.int64) for n in names]
            + [np.array(names)]
        )
        assert_payload_identical(payload, expected)


def test_masks_zero_rules():
    # k = 3 (s = 0.4 of 7: 2.8 -> 3); scores 9, 8, 7 kept
    scores = od(a=[9, 8, 1, 1], b=[7, 1, 1])
    # a keeps values [0, 0]: all zero -> cleared; b keeps [0]: cleared
    layers = od(a=[0, 0, 5, 0], b=[0, 3, 3])
    check_threshold_and_masks(scores, layers, 0.4, 7.0, {"a": np.zeros(4, bool), "b": np.zeros(3, bool)})
    # a keeps [0, -0.0, 5]: a non-zero among them -> all three kept, zeros included
    scores = od(a=[9, 8, 7, 1], b=[1, 1, 1])
    layers = od(a=[0, -0.0, 5, 0], b=[0, 0, 0])
    check_threshold_and_masks(scores, layers, 0.4, 7.0, {"a": np.array([1, 1, 1, 0], bool), "b": np.zeros(3, bool)})
    # -0.0 counts as zero for the "all zero" rule
    check_threshold_and_masks(
        od(a=[9, 8], b=[1, 1]), od(a=[-0.0, 0.0], b=[1, 1]), 0.5, 8.0, {"a": np.zeros(2, bool), "b": np.zeros(2, bool)}
    )


def test_threshold_compares_in_float32():
    # 1 and 1 + 1e-12 are the same float32: with k = 1 both are kept
    scores = collections.OrderedDict(a=np.array([1.0, 1.0 + 1e-12, 0.5], np.float64))
    layers = od(a=[1, 1, 1])
    check_threshold_and_masks(scores, layers, 0.3, 1.0, {"a": np.array([1, 1, 0], bool)})
    # integer scores are accepted
    check_threshold_and_masks(collections.OrderedDict(a=np.array([3, 1, 2], np.int32)), layers, 0.5, 2.0)


def test_threshold_empty():
    assert np.float32(score_threshold({}, 0.5)) == np.inf
    scores = od(a=np.zeros((0, 3)))
    assert np.float32(score_threshold(scores, 0.5)) == np.inf
    masks = sparse_masks(scores, od(a=np.zeros((0, 3))), 0.5)
    assert np.asarray(masks["a"]).shape == (0, 3)


@pytest.mark.parametrize(
    "s, error",
    [
        (0, ValueError),
        (-0.5, ValueError),
        (1.5, ValueError),
        (float("nan"), ValueError),
        (True, TypeError),
        ("0.5", TypeError),
    ],
)
def test_threshold_validates_sparsity(s, error):
    scores = od(a=[1, 2])
    with pytest.raises(error, match="sparsity_level"):
        score_threshold(scores, s)
    with pytest.raises(error, match="sparsity_level"):
        sparse_masks(scores, scores, s)


def _random_scores(rng, shapes, special=True):
    out = collections.OrderedDict()
    pool = np.array([0.0, -0.0, 1.0, -1.0, 2.5, np.nan, np.inf, -np.inf], np.float32)
    for i, shape in enumerate(shapes):
        a = rng.standard_normal(shape).astype(np.float32)
        if special:
            pick = rng.random(shape) < 0.4
            a = np.where(pick, rng.choice(pool, size=shape), a).astype(np.float32)
        out[f"l{i}"] = a
    return out


@pytest.mark.parametrize("s", [1e-9, 0.25, 0.6, 1.0])
def test_threshold_and_masks_under_jit_and_vmap_over_clients(s):
    rng = np.random.default_rng(int(s * 1000))
    shapes = [(2, 3), (4,), ()]
    clients = 4
    per_client = [_random_scores(rng, shapes) for _ in range(clients)]
    layers = [
        collections.OrderedDict(
            (n, rng.choice([0.0, 1.0, -2.0], size=np.shape(v)).astype(np.float32)) for n, v in sc.items()
        )
        for sc in per_client
    ]
    stacked = collections.OrderedDict((n, np.stack([c[n] for c in per_client])) for n in per_client[0])
    stacked_layers = collections.OrderedDict((n, np.stack([c[n] for c in layers])) for n in layers[0])
    thresholds = jax.jit(jax.vmap(lambda sc: score_threshold(sc, s)))(stacked)
    masks = jax.jit(jax.vmap(lambda sc, ly: sparse_masks(sc, ly, s)))(stacked, stacked_layers)
    assert list(masks) == list(stacked)
    for c in range(clients):
        assert np.asarray(thresholds)[c] == ref_threshold(per_client[c], s), c
        want = ref_masks(per_client[c], layers[c], s)
        for n in want:
            np.testing.assert_array_equal(np.asarray(masks[n][c]), want[n], err_msg=f"{n} client {c}")


finite_or_special = st.one_of(
    st.floats(width=32, allow_subnormal=False, allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 3.0, np.nan, np.nan, np.inf, -np.inf]),
)
sparsity = st.one_of(
    st.floats(min_value=0.0, max_value=1.0, exclude_min=True),
    st.sampled_from([1.0, 0.3, 0.7, 0.1, 1e-9, 0.5]),
)


@st.composite
def score_dicts(draw, max_layers=3):
    n = draw(st.integers(1, max_layers))
    out = collections.OrderedDict()
    for i in range(n):
        shape = draw(st.sampled_from([(), (1,), (5,), (2, 3), (0,)]))
        size = int(np.prod(shape, dtype=np.int64))
        vals = draw(st.lists(finite_or_special, min_size=size, max_size=size))
        out[f"s{i}"] = np.array(vals, np.float32).reshape(shape)
    return out


@settings(**HYP)
@given(scores=score_dicts(), s=sparsity)
def test_host_and_device_threshold_agree_with_reference(scores, s):
    want = ref_threshold(scores, s)
    host = sparse_selection._host_threshold(scores, s)
    device = sparse_selection._device_threshold(
        collections.OrderedDict((n, jnp.asarray(v)) for n, v in scores.items()), sparsity_level=s
    )
    assert np.float32(host) == want, (host, want)
    assert np.float32(device) == want, (device, want)
    # the pure function too, and the masks
    assert np.float32(score_threshold(scores, s)) == want


@settings(**HYP)
@given(scores=score_dicts(), s=sparsity, data=st.data())
def test_sparse_masks_match_reference(scores, s, data):
    layers = collections.OrderedDict(
        (
            n,
            np.array(
                data.draw(st.lists(st.sampled_from([0.0, -0.0, 1.0, -3.0]), min_size=v.size, max_size=v.size)),
                np.float32,
            ).reshape(v.shape),
        )
        for n, v in scores.items()
    )
    masks = sparse_masks(scores, layers, s)
    want = ref_masks(scores, layers, s)
    assert list(masks) == list(scores)
    for n in want:
        np.testing.assert_array_equal(np.asarray(masks[n]), want[n], err_msg=n)


SUBNORMALS = np.array([1e-40, 1e-45, 0.0, 5e-41, -1.0], np.float32)


def test_host_and_device_threshold_agree_on_subnormal_scores():
    # Subnormal float32 scores are distinct non-zero numbers. descending: 1e-40, 5e-41,
    # 1e-45, 0, -1. s = 0.2 of 5 -> k = 1 -> threshold 1e-40; s = 0.4 -> k = 2 -> 5e-41.
    scores = collections.OrderedDict(a=SUBNORMALS)
    for s, want in ((0.2, np.float32(1e-40)), (0.4, np.float32(5e-41)), (0.6, np.float32(1e-45))):
        assert ref_threshold(scores, s) == want
        host = np.float32(sparse_selection._host_threshold(scores, s))
        device = np.float32(
            sparse_selection._device_threshold(collections.OrderedDict(a=jnp.asarray(SUBNORMALS)), sparsity_level=s)
        )
        assert host == want, (s, host)
        assert device == host, f"s={s}: device threshold {device!r} != host threshold {host!r}"


def test_subnormal_scores_keep_exactly_k_distinct_weights():
    # k = 1 with 5 distinct scores: exactly one weight (the 1e-40 one) must be kept
    model = {"w": np.arange(1, 6, dtype=np.float32)}
    ex = SparseCooParameterExchanger(0.2, lambda m, i: {"w": SUBNORMALS})
    payload = ex.push_parameters(model)
    want = ref_payload(model, ref_masks({"w": SUBNORMALS}, model, 0.2))
    assert want[0].tolist() == [1.0]
    assert_payload_identical(payload, want)


@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["float32", "bfloat16"])
def test_subnormal_kept_weights_are_not_zero(dtype):
    # The zero rule looks at the kept values: a subnormal weight is not zero, so a layer
    # whose only kept weight is subnormal is sent (numpy: 1e-40 != 0). k = ceil(4 * 0.25)
    # = 1; the largest score (9) is on a's subnormal weight.
    tiny = np.array([1e-40], np.float32).astype(dtype)[0]
    assert tiny != 0
    model = {"a": np.array([tiny, 0, 0], dtype), "b": np.array([5], dtype)}
    scores = {"a": np.array([9, 1, 1], np.float32), "b": np.array([2], np.float32)}
    want = ref_payload(model, ref_masks(scores, model, 0.25))
    assert want[-1].tolist() == ["a"]
    assert_payload_identical(SparseCooParameterExchanger(0.25, lambda m, i: scores).push_parameters(model), want)
    masks = sparse_masks(scores, model, 0.25)
    np.testing.assert_array_equal(np.asarray(masks["a"]), [True, False, False])
    # and a kept -0.0 alone is zero: nothing sent
    model = {"a": np.array([-0.0, 0, 0], dtype), "b": np.array([5], dtype)}
    assert SparseCooParameterExchanger(0.25, lambda m, i: scores).push_parameters(model)[-1].tolist() == []


def test_repeated_entry_detected_in_a_huge_claimed_shape():
    # The repeat check must not depend on a dense bitmap of the claimed layer.
    ex = SparseCooParameterExchanger(0.5, largest_final_magnitude_scores)
    payload = [
        np.array([1.0, 2.0], np.float32),
        np.array([[7], [7]], np.int64),
        np.array([2**62], np.int64),
        np.array(["w"]),
    ]
    with pytest.raises(ValueError, match=r"'w'.*more than once"):
        ex.unpack_parameters(payload)
    payload[1] = np.array([[7], [2**62 - 1]], np.int64)
    values, (indices, shapes, names) = ex.unpack_parameters(payload)
    assert indices[0].tolist() == [[7], [2**62 - 1]]


# ---------------------------------------------------------------------------------------
# SparseCooParameterExchanger: constructor and score-function validation
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "s, error",
    [
        (0, ValueError),
        (0.0, ValueError),
        (-0.1, ValueError),
        (-1, ValueError),
        (1.0000001, ValueError),
        (2, ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        (True, TypeError),
        (False, TypeError),
        ("0.5", TypeError),
        (None, TypeError),
        (np.array([0.5]), TypeError),
        (0.5j, TypeError),
    ],
)
def test_constructor_rejects_bad_sparsity(s, error):
    with pytest.raises(error, match="sparsity_level"):
        SparseCooParameterExchanger(s, largest_final_magnitude_scores)


@pytest.mark.parametrize("s", [1, 1.0, 0.5, 1e-9, np.float32(0.25), np.float64(0.75)])
def test_constructor_accepts_valid_sparsity(s):
    ex = SparseCooParameterExchanger(s, largest_final_magnitude_scores)
    assert ex.sparsity_level == float(s)
    assert ex.score_gen_function is largest_final_magnitude_scores


@pytest.mark.parametrize("fn", [None, "largest-final-magnitude", 3, {"a": 1}])
def test_constructor_rejects_non_callable_score_function(fn):
    with pytest.raises(TypeError, match="score_gen_function"):
        SparseCooParameterExchanger(0.5, fn)


def _plain_scores_by_name(model):
    return {n: np.ones(a.shape, np.float32) for n, a in ref_flat(model).items()}


BAD_SCORES = {
    # case: (mutate scores dict, error type, regex)
    "missing layer": (lambda sc: {n: v for n, v in sc.items() if n != "count"}, KeyError, r"'count'"),
    "unknown layer": (lambda sc: dict(sc, extra=np.ones(3, np.float32)), KeyError, r"'extra'"),
    "wrong shape": (lambda sc: dict(sc, half=np.ones((3, 2), np.float32)), ValueError, r"'half'.*\(2, 3\).*\(3, 2\)"),
    "0-d given as (1,)": (lambda sc: dict(sc, scalar=np.ones((1,), np.float32)), ValueError, r"'scalar'"),
    "bool dtype": (lambda sc: dict(sc, count=np.ones(5, bool)), TypeError, r"'count'.*bool"),
    "complex dtype": (lambda sc: dict(sc, count=np.ones(5, np.complex64)), TypeError, r"'count'.*complex"),
    "string dtype": (lambda sc: dict(sc, count=np.array(list("abcde"))), TypeError, r"'count'"),
    "not a mapping": (lambda sc: list(sc.values()), TypeError, r"mapping"),
}


@pytest.mark.parametrize("case", list(BAD_SCORES))
def test_score_function_with_wrong_output_raises(case):
    mutate, error, pattern = BAD_SCORES[case]
    model = make("plain", 7)
    before = ref_flat(model)
    ex = SparseCooParameterExchanger(0.5, lambda m, i: mutate(_plain_scores_by_name(m)))
    with pytest.raises(error, match=pattern):
        ex.push_parameters(model)
    with pytest.raises(error, match=pattern):
        ex.select_parameters(model)
    assert_flat_identical(ref_flat(model), before)


def test_score_function_order_does_not_matter_and_receives_flat_views():
    model, initial = make("plain", 8), make("plain", 9)
    calls = []

    def fn(m, i):
        calls.append((m, i))
        # scores in reversed name order, integer dtype
        return {n: np.arange(np.size(a), dtype=np.int64).reshape(np.shape(a)) for n, a in reversed(list(m.items()))}

    ex = SparseCooParameterExchanger(0.5, fn)
    payload = ex.push_parameters(model, initial)
    names = list(ref_flat(model))
    m, i = calls[0]
    assert list(m) == names and list(i) == names
    for n in names:  # the flat views hold the model's own values
        assert_identical(np.asarray(m[n]), ref_flat(model)[n], n)
        assert_identical(np.asarray(i[n]), ref_flat(initial)[n], n)
    ex.push_parameters(model)
    assert calls[1][1] is None
    scores = {n: np.arange(a.size, dtype=np.float32).reshape(a.shape) for n, a in ref_flat(model).items()}
    want = ref_payload(ref_flat(model), ref_masks(scores, ref_flat(model), 0.5))
    assert_payload_identical(payload, want)


@pytest.mark.parametrize(
    "dtype, as_jax",
    [(BF16, False), (BF16, True), (np.float16, False), (np.float64, False), (np.uint8, False), (np.int64, True)],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_scores_of_any_real_dtype_are_compared_in_float32(dtype, as_jax):
    model = {"w": np.arange(1, 7, dtype=np.float32).reshape(2, 3), "s": np.asarray(2.5, np.float32)}
    raw = {"w": np.array([[5, 4, 3], [2, 1, 0]]).astype(dtype), "s": np.asarray(3, dtype)}
    scores = {n: jnp.asarray(v) if as_jax else v for n, v in raw.items()}
    ex = SparseCooParameterExchanger(0.5, lambda m, i: scores)
    # 7 weights, k = ceil(3.5) = 4: scores 5, 4, 3, 3 -> threshold 3 -> s and w[0, :]
    # (layers in flatten order: dict keys sorted, "s" before "w")
    want = ref_payload(ref_flat(model), ref_masks(raw, model, 0.5))
    assert want[-1].tolist() == ["s", "w"] and want[1].tolist() == [1.0, 2.0, 3.0]
    assert_payload_identical(ex.push_parameters(model), want)


# ---------------------------------------------------------------------------------------
# select / push against the numpy reference of the whole payload
# ---------------------------------------------------------------------------------------

LEAF_DTYPES = [np.float32, BF16, np.int32, np.float16]
CUSTOM = "custom"


@st.composite
def trees(draw):
    """(tree, initial, names): 1-4 layers of rank 0-3, mixed dtypes, numpy or jax leaves,
    values from a small pool (ties, zeros, -0.0) or random."""
    n = draw(st.integers(1, 4))
    tree, initial = {}, {}
    for i in range(n):
        rank = draw(st.integers(0, 3))
        shape = tuple(draw(st.lists(st.sampled_from([1, 2, 3, 1, 2, 3, 0]), min_size=rank, max_size=rank)))
        dtype = draw(st.sampled_from(LEAF_DTYPES))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        pooled = draw(st.booleans())
        as_jax = draw(st.booleans())
        arrays = []
        for _ in range(2):
            if np.issubdtype(dtype, np.integer):
                a = rng.choice([0, 1, -1, 2, -3, 5], size=shape) if pooled else rng.integers(-1000, 1000, size=shape)
            else:
                a = rng.choice([0.0, -0.0, 1.0, -1.0, 0.5, 2.0], size=shape) if pooled else rng.standard_normal(shape)
            a = np.asarray(a).astype(dtype)
            arrays.append(jnp.asarray(a) if as_jax else a)
        parent = draw(st.sampled_from(["", "g", "h/k"]))
        node_t, node_0 = tree, initial
        for part in [p for p in parent.split("/") if p]:
            node_t, node_0 = node_t.setdefault(part, {}), node_0.setdefault(part, {})
        node_t[f"l{i}"], node_0[f"l{i}"] = arrays
    return tree, initial


def custom_scores(names_shapes, seed, float64):
    rng = np.random.default_rng(seed)
    pool = np.array([0.0, -0.0, 1.0, 1.0, -1.0, np.nan, 2.0], np.float64)
    out = {}
    for name, shape in names_shapes:
        a = np.where(rng.random(shape) < 0.5, rng.choice(pool, size=shape), rng.standard_normal(shape))
        out[name] = np.asarray(a).astype(np.float64 if float64 else np.float32)
    return out


@settings(**HYP)
@given(
    pair=trees(),
    s=sparsity,
    fn=st.sampled_from(SCORE_FNS + [CUSTOM]),
    with_initial=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
    float64=st.booleans(),
)
def test_push_matches_reference_payload_and_round_trips(pair, s, fn, with_initial, seed, float64):
    tree, initial = pair
    cur, ini = ref_flat(tree), ref_flat(initial)
    snapshot = ref_flat(tree), ref_flat(initial)
    if fn is CUSTOM:
        fixed = custom_scores([(n, a.shape) for n, a in cur.items()], seed, float64)
        score_fn = lambda m, i: dict(reversed(list(fixed.items())))  # noqa: E731
        scores = fixed
    else:
        score_fn = fn
        with_initial = with_initial or SCORE_REFS[fn][0]
        scores = ref_score(fn, cur, ini if with_initial else None)
    ex = SparseCooParameterExchanger(s, score_fn)
    init_arg = initial if with_initial else None
    masks = ref_masks(scores, cur, s)
    want = ref_payload(cur, masks)

    payload = ex.push_parameters(tree, init_arg)
    assert_payload_identical(payload, want)
    values, (indices, shapes, names) = ex.select_parameters(tree, init_arg)
    k = len(names)
    assert names == want[-1].tolist()
    assert_payload_identical(list(values) + list(indices) + list(shapes) + [np.array(names, dtype=np.str_)], want)
    assert_flat_identical(ref_flat(tree), snapshot[0])  # push changes nothing
    assert_flat_identical(ref_flat(initial), snapshot[1])
    for i in range(k):
        assert payload[k + i].dtype == np.int64 and payload[2 * k + i].dtype == np.int64
        assert payload[i].dtype == cur[names[i]].dtype

    # round trip through Flower's serialization into the initial model
    received = through_npy(payload)
    pulled = ex.pull_parameters(received, initial)
    assert pulled is not initial
    assert_flat_identical(ref_flat(initial), snapshot[1])  # the pytree given is not mutated
    assert_flat_identical(ref_flat(pulled), ref_pull(ini, mask_entries(cur, masks)))


# ---------------------------------------------------------------------------------------
# Push on Linen / NNX models, zero rules
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS + ["bf16_nnx"])
@pytest.mark.parametrize("s", [0.05, 0.3, 1.0])
@pytest.mark.parametrize(
    "fn",
    [largest_magnitude_change_scores, smallest_final_magnitude_scores, largest_increase_in_magnitude_scores],
    ids=lambda f: f.__name__,
)
def test_push_models_match_reference(kind, s, fn):
    a, a0 = make(kind, 11), make(kind, 12)
    cur, ini = ref_flat(a), ref_flat(a0)
    scores = ref_score(fn, cur, ini)
    masks = ref_masks(scores, cur, s)
    want = ref_payload(cur, masks)
    ex = SparseCooParameterExchanger(s, fn)
    payload = ex.push_parameters(a, a0)
    assert_payload_identical(payload, want)
    assert_flat_identical(ref_flat(a), cur)
    assert_flat_identical(ref_flat(a0), ini)
    # with no zero weight in the model, at least k = ceil(total * s) weights are sent
    # (ties can only add)
    total = sum(v.size for v in cur.values())
    if all(np.all(v != 0) for v in cur.values()):
        k = (len(payload) - 1) // 3
        assert sum(payload[i].size for i in range(k)) >= math.ceil(total * s)


def test_push_zero_rules():
    # scores a: 9 8 1 1, b: 7 1 1; k = ceil(7 * 0.4) = 3 -> threshold 7
    model = {"a": np.array([0, 0, 5, 0], np.float32), "b": np.array([0, 3, 3], np.float32)}
    scores = {"a": np.array([9, 8, 1, 1], np.float32), "b": np.array([7, 1, 1], np.float32)}
    ex = SparseCooParameterExchanger(0.4, lambda m, i: scores)
    # a keeps [0, 0], b keeps [0]: both all zero -> nothing sent
    payload = ex.push_parameters(model)
    assert len(payload) == 1 and payload[0].dtype.kind == "U" and payload[0].shape == (0,)
    values, (indices, shapes, names) = ex.select_parameters(model)
    assert values == [] and indices == [] and shapes == [] and names == []

    # a keeps [-0.0, 0, 5] (scores 9 8 7): sent whole, the zeros with their bits
    model = {"a": np.array([-0.0, 0, 5, 0], np.float32), "b": np.zeros(3, np.float32)}
    scores = {"a": np.array([9, 8, 7, 1], np.float32), "b": np.array([1, 1, 1], np.float32)}
    ex = SparseCooParameterExchanger(0.4, lambda m, i: scores)
    want = [
        np.array([-0.0, 0, 5], np.float32),
        np.array([[0], [1], [2]], np.int64),
        np.array([4], np.int64),
        np.array(["a"]),
    ]
    assert_payload_identical(ex.push_parameters(model), want)

    # a kept zero travels and overwrites a non-zero weight of the receiver
    target = {"a": np.full(4, 7, np.float32), "b": np.ones(3, np.float32)}
    pulled = ex.pull_parameters(ex.push_parameters(model), target)
    assert_flat_identical(ref_flat(pulled), {"a": np.array([-0.0, 0, 5, 7], np.float32), "b": np.ones(3, np.float32)})


def test_push_zero_size_and_scalar_layers():
    # 0-d layers are like any other: shape array empty, indices (1, 0)
    model = {"e": np.zeros((0, 3), np.float32), "s": np.asarray(4.0, np.float32), "v": np.array([1, 2], np.float32)}
    ex = SparseCooParameterExchanger(0.5, largest_final_magnitude_scores)
    # scores |w|: 4, 1, 2 over 3 weights; k = ceil(1.5) = 2 -> threshold 2: s and v[1]
    payload = ex.push_parameters(model)
    want = [
        np.array([4.0], np.float32),
        np.array([2.0], np.float32),
        np.zeros((1, 0), np.int64),
        np.array([[1]], np.int64),
        np.zeros(0, np.int64),
        np.array([2], np.int64),
        np.array(["s", "v"]),
    ]
    assert_payload_identical(payload, want)


# ---------------------------------------------------------------------------------------
# Pull: exactly the sent entries
# ---------------------------------------------------------------------------------------


def hand_payload(entries: dict, shapes: dict, index_dtype=np.int64):
    names = list(entries)
    values = [np.asarray(entries[n][0]) for n in names]
    indices = [
        np.asarray(entries[n][1]).astype(index_dtype).reshape(len(values[i]), len(shapes[n]))
        for i, n in enumerate(names)
    ]
    shp = [np.array(shapes[n], dtype=np.int64) for n in names]
    return values + indices + shp + [np.array(names, dtype=np.str_)]


@settings(**HYP)
@given(
    pair=trees(), seed=st.integers(0, 2**32 - 1), index_dtype=st.sampled_from([np.int64, np.int32, np.uint16, np.int8])
)
def test_pull_writes_exactly_the_sent_entries_pytree(pair, seed, index_dtype):
    source, target = pair
    rng = np.random.default_rng(seed)
    src, before = ref_flat(source), ref_flat(target)
    names = [n for n in src if rng.random() < 0.7]
    rng.shuffle(names)  # any layer order is accepted
    entries = {}
    for n in names:
        mask = rng.random(src[n].shape) < 0.5
        entries[n] = (src[n][mask], np.argwhere(mask))
        if entries[n][0].size > 1 and rng.random() < 0.5:  # any row order is accepted
            perm = rng.permutation(entries[n][0].size)
            entries[n] = (entries[n][0][perm], entries[n][1][perm])
    payload = hand_payload(entries, {n: src[n].shape for n in names}, index_dtype)
    pulled = SparseCooParameterExchanger(0.5, largest_final_magnitude_scores).pull_parameters(payload, target)
    assert pulled is not target
    assert_flat_identical(ref_flat(target), before)
    assert_flat_identical(ref_flat(pulled), ref_pull(before, entries))


@pytest.mark.parametrize("kind", ["linen", "nnx", "bf16_nnx", "plain"])
def test_pull_writes_exactly_the_sent_entries_models(kind):
    source, target = make(kind, 21), make(kind, 22)
    src, before = ref_flat(source), ref_flat(target)
    rng = np.random.default_rng(0)
    entries = {}
    for n in list(src)[::2]:
        mask = rng.random(src[n].shape) < 0.5
        if not mask.any():
            mask.reshape(-1)[0] = True
        entries[n] = (src[n][mask], np.argwhere(mask))
    payload = hand_payload(entries, {n: src[n].shape for n in entries})
    pulled = SparseCooParameterExchanger(0.5, largest_final_magnitude_scores).pull_parameters(payload, target)
    want = ref_pull(before, entries)
    if isinstance(target, nnx.Module):
        assert pulled is target  # updated in place
        assert_flat_identical(ref_flat(target), want)
    else:
        assert pulled is not target
        assert_flat_identical(ref_flat(target), before)
    assert_flat_identical(ref_flat(pulled), want)
    # something did change (the test can see a pull that does nothing)
    assert any(not np.array_equal(bits(want[n]), bits(before[n])) for n in entries)


@pytest.mark.parametrize("kind", ["linen", "nnx", "bf16_nnx", "plain"])
@pytest.mark.parametrize("s", [0.1, 0.5, 1.0])
def test_round_trip_push_serialize_pull(kind, s):
    a, a0 = make(kind, 31), make(kind, 32)
    target = make(kind, 33)
    cur, ini, before = ref_flat(a), ref_flat(a0), ref_flat(target)
    fn = largest_magnitude_change_scores
    masks = ref_masks(ref_score(fn, cur, ini), cur, s)
    ex = SparseCooParameterExchanger(s, fn)
    received = through_npy(ex.push_parameters(a, a0))
    has_bf16 = any(v.dtype == BF16 and masks[n].any() for n, v in cur.items())
    if has_bf16:  # np.save turned the bf16 values into raw |V2
        assert any(r.dtype.kind == "V" and r.dtype.itemsize == 2 for r in received)
    assert received[-1].dtype.kind == "U"
    pulled = ex.pull_parameters(received, target)
    want = ref_pull(before, mask_entries(cur, masks))
    assert_flat_identical(ref_flat(pulled), want)
    if isinstance(target, nnx.Module):
        assert pulled is target
    else:
        assert_flat_identical(ref_flat(target), before)
    # unpack_parameters of the serialized payload gives the same layers
    values, (indices, shapes, names) = ex.unpack_parameters(received)
    assert names == [n for n in cur if masks[n].any()]
    for idx, shp, n in zip(indices, shapes, names):
        assert tuple(shp.tolist()) == cur[n].shape
        np.testing.assert_array_equal(idx, np.argwhere(masks[n]))


def test_round_trip_scalar_layers_nnx():
    # the 0-d 'temp' parameter alone moved: it is the only weight sent at k = 1
    a0 = make("nnx", 40)
    a = nnx.clone(a0)
    a.temp[...] = a0.temp[...] + 100.0
    target = make("nnx", 41)
    ex = SparseCooParameterExchanger(1e-9, largest_magnitude_change_scores)
    payload = ex.push_parameters(a, a0)
    assert [p.shape for p in payload] == [(1,), (1, 0), (0,), (1,)]
    assert payload[-1].tolist() == ["temp"]
    pulled = ex.pull_parameters(through_npy(payload), target)
    want = ref_flat(target)
    want["temp"] = ref_flat(a)["temp"]
    assert pulled is target
    assert_flat_identical(ref_flat(target), want)


# ---------------------------------------------------------------------------------------
# pack / unpack: fl4health's layout, interop
# ---------------------------------------------------------------------------------------


def test_pack_and_unpack_use_reference_layout():
    ex = SparseCooParameterExchanger(0.5, largest_final_magnitude_scores)
    values = [np.array([1.5, -2.0], np.float32), np.array([3], np.int32)]
    indices = [np.array([[0, 1], [2, 0]], np.int64), np.array([[4]], np.int64)]
    shapes = [np.array([3, 2], np.int64), np.array([5], np.int64)]
    names = ["w", "count"]
    packed = ex.pack_parameters(values, (indices, shapes, names))
    want = values + indices + shapes + [np.array(names)]
    assert_payload_identical(packed, want)
    v2, (i2, s2, n2) = ex.unpack_parameters(packed)
    assert n2 == names and all(type(n) is str for n in n2)
    for got, w in zip(v2 + i2 + s2, values + indices + shapes):
        assert_identical(got, w)
    # pack rejects parts of different lengths and repeated names
    with pytest.raises(ValueError, match="differ in length"):
        ex.pack_parameters(values, (indices[:1], shapes, names))
    with pytest.raises(ValueError, match="duplicate.*'w'"):
        ex.pack_parameters(values, (indices, shapes, ["w", "w"]))


def test_interop_with_fl4health_style_payload():
    # An fl4health peer sends the non-zero entries of each tensor: values t[t != 0],
    # indices torch.nonzero (int64, like np.argwhere), np.array(shape), np.array(names).
    rng = np.random.default_rng(3)
    target = make("plain", 50)
    before = ref_flat(target)
    sent = {
        "enc/w": np.where(rng.random((3, 4)) < 0.5, rng.standard_normal((3, 4)), 0).astype(np.float32),
        "count": np.array([0, 4, 0, -2, 9], np.int32),
    }
    names = list(sent)
    payload = (
        [t[t != 0] for t in sent.values()]
        + [np.argwhere(t != 0) for t in sent.values()]
        + [np.array(t.shape) for t in sent.values()]
        + [np.array(names)]
    )
    assert payload[2].dtype == np.int64 and payload[4].dtype == np.int64
    ex = SparseCooParameterExchanger(0.5, largest_final_magnitude_scores)
    pulled = ex.pull_parameters(through_npy(payload), target)
    want = ref_pull(before, {n: (t[t != 0], np.argwhere(t != 0)) for n, t in sent.items()})
    assert_flat_identical(ref_flat(pulled), want)
    assert_flat_identical(ref_flat(target), before)

    # and what jaxlayerx sends, an fl4health receiver can densify (zeros elsewhere)
    source = make("plain", 51)
    src = ref_flat(source)
    out = ex.push_parameters(source)
    k = (len(out) - 1) // 3
    assert k >= 1
    masks = ref_masks(ref_score(largest_final_magnitude_scores, src, None), src, 0.5)
    for i, name in enumerate(out[-1].tolist()):
        dense = np.zeros(tuple(out[2 * k + i]), out[i].dtype)
        for row, v in zip(out[k + i], out[i]):
            dense[tuple(row)] = v
        assert_identical(
            dense, np.where(masks[name], src[name], np.zeros((), src[name].dtype)).astype(src[name].dtype), name
        )


@pytest.mark.parametrize("empty", [np.array([]), np.array([], dtype=np.str_)])
def test_pull_of_empty_payload_changes_nothing(empty):
    # fl4health packs an empty selection as np.array([]) (float)
    ex = SparseCooParameterExchanger(0.5, largest_final_magnitude_scores)
    for kind in KINDS:
        model = make(kind, 60)
        before = ref_flat(model)
        pulled = ex.pull_parameters([empty], model)
        assert_flat_identical(ref_flat(pulled), before)
    assert ex.unpack_parameters([empty]) == ([], ([], [], []))


# ---------------------------------------------------------------------------------------
# Malformed payloads: right error, naming the layer; nothing changes
# ---------------------------------------------------------------------------------------

# Per model kind: a float32 2-D layer (the good first layer) and a float32 layer that the
# bad case targets, with their shapes.
LAYERS = {
    "plain": (("enc/w", (3, 4)), ("enc/b", (4,))),
    "linen": (("params/Dense_0/kernel", (4, 3)), ("batch_stats/BatchNorm_0/mean", (3,))),
    "nnx": (("fc/kernel", (4, 3)), ("bn/var", (3,))),
}


def _base_payload(kind, model):
    """A valid payload: two entries of the first layer, then two of the second."""
    (good, gshape), (bad, bshape) = LAYERS[kind]
    flat = ref_flat(model)
    assert flat[good].shape == gshape and flat[bad].shape == bshape
    gi = np.array([[0] * len(gshape), [1] * len(gshape)], np.int64)
    bi = np.array([[0] * len(bshape), [len(bshape) and 1] * len(bshape)], np.int64)
    gv = np.array([flat[good][tuple(r)] + 10 for r in gi], flat[good].dtype)
    bv = np.array([flat[bad][tuple(r)] + 10 for r in bi], flat[bad].dtype)
    return [gv, bv, gi, bi, np.array(gshape, np.int64), np.array(bshape, np.int64), np.array([good, bad])]


def _set(payload, i, value):
    p = list(payload)
    p[i] = value
    return p


# case -> (mutate(payload, bad_name, bad_shape), error, regex (with {name}), checked by unpack)
MALFORMED = {
    "not a list": (lambda p, n, s: {"a": p}, TypeError, r"list", True),
    "3k arrays": (lambda p, n, s: p[:-2] + p[-1:], ValueError, r"3k \+ 1", True),
    "3k+2 arrays": (lambda p, n, s: p[:1] + p, ValueError, r"3k \+ 1", True),
    "names 2-D": (lambda p, n, s: _set(p, 6, p[6].reshape(1, 2)), ValueError, r"names", True),
    "names bytes": (lambda p, n, s: _set(p, 6, p[6].astype("S")), ValueError, r"Unicode", True),
    "names object": (lambda p, n, s: _set(p, 6, p[6].astype(object)), ValueError, r"Unicode", True),
    "names int": (lambda p, n, s: _set(p, 6, np.array([1, 2])), ValueError, r"Unicode", True),
    "names repeated": (lambda p, n, s: _set(p, 6, np.array([n, n])), ValueError, r"duplicate.*{name}", True),
    "values 2-D": (lambda p, n, s: _set(p, 1, p[1].reshape(2, 1)), ValueError, r"{name}.*1-D", True),
    "values 0-d": (lambda p, n, s: _set(p, 1, p[1][0]), ValueError, r"{name}.*1-D", True),
    "indices float": (lambda p, n, s: _set(p, 3, p[3].astype(np.float64)), TypeError, r"{name}.*integer", True),
    "indices bool": (lambda p, n, s: _set(p, 3, p[3] > 0), TypeError, r"{name}.*integer", True),
    "indices 1-D": (lambda p, n, s: _set(p, 3, p[3].reshape(-1)), ValueError, r"{name}.*indices", True),
    "indices 3-D": (lambda p, n, s: _set(p, 3, p[3][None]), ValueError, r"{name}.*indices", True),
    "indices rows != values": (lambda p, n, s: _set(p, 3, p[3][:1]), ValueError, r"{name}.*indices", True),
    "indices cols != ndim": (
        lambda p, n, s: _set(p, 3, np.concatenate([p[3], p[3]], axis=1)),
        ValueError,
        r"{name}.*indices",
        True,
    ),
    "shape float": (lambda p, n, s: _set(p, 5, p[5].astype(np.float64)), TypeError, r"{name}.*shape", True),
    "shape 2-D": (lambda p, n, s: _set(p, 5, p[5].reshape(1, -1)), (TypeError, ValueError), r"{name}.*shape", True),
    "shape negative": (lambda p, n, s: _set(p, 5, -p[5]), ValueError, r"{name}.*negative", True),
    "index too large": (
        lambda p, n, s: _set(p, 3, p[3] + np.array(s, np.int64)),
        ValueError,
        r"{name}.*out of bounds",
        True,
    ),
    "index negative": (lambda p, n, s: _set(p, 3, p[3] - 1), ValueError, r"{name}.*out of bounds", True),
    "index uint64 huge": (
        lambda p, n, s: _set(p, 3, p[3].astype(np.uint64) + np.uint64(2**63)),
        ValueError,
        r"{name}.*out of bounds",
        True,
    ),
    "entry twice": (
        lambda p, n, s: _set(p, 3, np.stack([p[3][0], p[3][0]])),
        ValueError,
        r"{name}.*more than once",
        True,
    ),
    "unknown name": (lambda p, n, s: _set(p, 6, np.array([p[6][0], n + "x"])), KeyError, r"{name}x", False),
    "shape differs from model": (lambda p, n, s: _set(p, 5, p[5] + 1), ValueError, r"{name}.*expected shape", False),
    "ndim differs from model": (
        lambda p, n, s: _set(
            _set(p, 5, np.append(p[5], 1)), 3, np.concatenate([p[3], np.zeros((2, 1), np.int64)], axis=1)
        ),
        ValueError,
        r"{name}.*expected shape",
        False,
    ),
    "values bf16 as |V2 into float32": (
        lambda p, n, s: _set(p, 1, p[1].astype(BF16).view("V2")),
        TypeError,
        r"{name}.*float32",
        False,
    ),
    "values complex": (lambda p, n, s: _set(p, 1, p[1].astype(np.complex64)), TypeError, r"{name}.*complex", False),
    "values strings": (lambda p, n, s: _set(p, 1, np.array(["a", "b"])), TypeError, r"{name}", False),
    # 2**62 weights: no machine can hold a dense copy; the product of two overflows int64
    "claimed shape huge": (
        lambda p, n, s: _set(p, 5, np.array([2**62] * len(s), np.int64)),
        ValueError,
        r"{name}.*(expected shape|int64 flat index)",
        False,
    ),
}


# Where pulling says it differently from unpack_coo: pull_parameters reads the legacy
# route's layouts (jaxlayerx.wire), so a payload ending in names whose count of arrays is
# not 3k + 1 is read as a named payload (k arrays and k names), and one not ending in a
# Unicode names array is neither named, COO nor compact. Same error type, same point.
PULL_PATTERNS = {
    "3k arrays": r"5 arrays but 2 layer names",
    "3k+2 arrays": r"7 arrays but 2 layer names",
    "names bytes": r"ends with a names array.*got 7 arrays, the last of dtype \|S\d+ and shape \(2,\)",
    "names object": r"ends with a names array.*got 7 arrays, the last of dtype object and shape \(2,\)",
    "names int": r"ends with a names array.*got 7 arrays, the last of dtype int64 and shape \(2,\)",
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_payload_raises_and_changes_nothing(case, kind):
    mutate, error, pattern, _ = MALFORMED[case]
    pattern = PULL_PATTERNS.get(case, pattern)
    model = make(kind, 70)
    (_, _), (bad, bshape) = LAYERS[kind]
    base = _base_payload(kind, model)
    # the base payload is valid: pulled into a copy it changes the model
    ex = SparseCooParameterExchanger(0.5, largest_final_magnitude_scores)
    ok = ex.pull_parameters(base, copy_model(model))
    assert not np.array_equal(ref_flat(ok)[bad], ref_flat(model)[bad])
    payload = mutate(base, bad, bshape)
    before = ref_flat(model)
    regex = pattern.format(name=re.escape(bad))
    with pytest.raises(error, match=regex):
        ex.pull_parameters(payload, model)
    assert_flat_identical(ref_flat(model), before)


@pytest.mark.parametrize("case", [c for c, v in MALFORMED.items() if v[3]])
def test_malformed_payload_rejected_by_unpack(case):
    mutate, error, pattern, _ = MALFORMED[case]
    model = make("plain", 71)
    (_, _), (bad, bshape) = LAYERS["plain"]
    payload = mutate(_base_payload("plain", model), bad, bshape)
    snap = [np.array(a, copy=True) for a in payload] if isinstance(payload, list) else None
    ex = SparseCooParameterExchanger(0.5, largest_final_magnitude_scores)
    with pytest.raises(error, match=pattern.format(name=re.escape(bad))):
        ex.unpack_parameters(payload)
    if snap is not None:  # the payload itself is left as given
        for got, want in zip(payload, snap):
            assert_identical(got, want)


@pytest.mark.parametrize("shape", [[2**62], [2**40, 2**40]], ids=["2**62", "2**40 x 2**40"])
def test_valid_payload_with_huge_claimed_shape(shape):
    # Valid as a payload (non-negative integer shape, index in bounds, no repeats): it must
    # unpack without allocating the claimed layer (2**62 bools, or a product that
    # overflows int64), and pulling it into a model whose 'w' has shape (5,) is a shape
    # mismatch: ValueError naming the layer, nothing changed.
    # A shape of 2**80 entries cannot be addressed by an int64 flat index: it is refused
    # when read, with the layer named.
    ex = SparseCooParameterExchanger(0.5, largest_final_magnitude_scores)
    payload = [
        np.array([1.0], np.float32),
        np.ones((1, len(shape)), np.int64),
        np.array(shape, np.int64),
        np.array(["w"]),
    ]
    model = {"w": np.arange(5, dtype=np.float32)}
    addressable = math.prod(shape) < 2**63
    message = r"'w'.*expected shape \(5,\)" if addressable else r"'w'.*int64 flat index"
    with pytest.raises(ValueError, match=message):
        ex.pull_parameters(payload, model)
    np.testing.assert_array_equal(model["w"], np.arange(5, dtype=np.float32))
    if addressable:
        values, (indices, shapes, names) = ex.unpack_parameters(payload)
        assert names == ["w"] and shapes[0].tolist() == shape
    else:
        with pytest.raises(ValueError, match=r"'w'.*int64 flat index"):
            ex.unpack_parameters(payload)


def test_dtype_rules_on_pull_bf16_and_int_layers():
    ex = SparseCooParameterExchanger(0.5, largest_final_magnitude_scores)
    model = make("plain", 80)
    before = ref_flat(model)

    def one(name, values, idx):
        shape = before[name].shape
        return [values, np.asarray(idx, np.int64).reshape(-1, len(shape)), np.array(shape, np.int64), np.array([name])]

    # complex into a bf16 layer: lossy -> TypeError naming the layer; nothing changes
    with pytest.raises(TypeError, match=r"'half'.*bfloat16.*complex64"):
        ex.pull_parameters(one("half", np.array([1.5], np.complex64), [[0, 1]]), model)
    # float into an int layer: TypeError
    with pytest.raises(TypeError, match=r"'count'.*int32.*float32"):
        ex.pull_parameters(one("count", np.array([1.0], np.float32), [[2]]), model)
    # int64 into an int32 layer, out of its range
    with pytest.raises(TypeError, match=r"'count'.*2199023255552 is out of the range of its dtype int32"):
        ex.pull_parameters(one("count", np.array([2**41], np.int64), [[2]]), model)
    # |V4 (4 bytes) into a bf16 layer: wrong item size
    with pytest.raises(TypeError, match=r"'half'"):
        ex.pull_parameters(one("half", np.array([1.5], np.float32).view("V4"), [[0, 1]]), model)
    assert_flat_identical(ref_flat(model), before)

    # accepted casts: float16 -> float32, int8 -> int32, bf16 as |V2 -> bf16, float64 ->
    # float32 (1/3 rounded to nearest), int64 in range -> int32
    entries = {
        "enc/w": (np.array([0.25, -3.0], np.float16), [[2, 3], [0, 0]]),
        "count": (np.array([-7], np.int8), [[4]]),
        "half": (np.array([1.5, -0.0], BF16).view("V2"), [[1, 2], [0, 0]]),
        "scalar": (np.array([1 / 3], np.float64), np.zeros((1, 0), np.int64)),
    }
    payload = hand_payload(
        {n: (v, np.asarray(i, np.int64)) for n, (v, i) in entries.items()}, {n: before[n].shape for n in entries}
    )
    pulled = ex.pull_parameters(payload, model)
    want = ref_pull(
        before,
        {
            "enc/w": (np.array([0.25, -3.0], np.float32), np.array([[2, 3], [0, 0]])),
            "count": (np.array([-7], np.int32), np.array([[4]])),
            "half": (np.array([1.5, -0.0], BF16), np.array([[1, 2], [0, 0]])),
            "scalar": (np.array([1 / 3]).astype(np.float32), np.zeros((1, 0), np.int64)),
        },
    )
    assert_flat_identical(ref_flat(pulled), want)
    assert_flat_identical(ref_flat(model), before)


def test_malformed_second_layer_leaves_nnx_model_unchanged_in_place():
    # The first layer of the payload is valid; the second has an out-of-bounds index: the
    # in-place NNX model must not have received the first layer either.
    model = make("bf16_nnx", 90)
    before = ref_flat(model)
    payload = [
        np.array([1.0], BF16),
        np.array([2.0], BF16),
        np.array([[0, 0]]),
        np.array([[3]]),
        np.array([4, 3]),
        np.array([3]),
        np.array(["fc/kernel", "bn/mean"]),
    ]
    ex = SparseCooParameterExchanger(0.5, largest_final_magnitude_scores)
    with pytest.raises(ValueError, match=r"'bn/mean'.*out of bounds"):
        ex.pull_parameters(payload, model)
    assert_flat_identical(ref_flat(model), before)
    # fix the index: both layers land (and only those entries)
    payload[3] = np.array([[2]])
    ex.pull_parameters(payload, model)
    want = ref_pull(
        before,
        {"fc/kernel": (np.array([1.0], BF16), np.array([[0, 0]])), "bn/mean": (np.array([2.0], BF16), np.array([[2]]))},
    )
    assert_flat_identical(ref_flat(model), want)


def test_empty_shape_and_coordinates_of_any_dtype_mean_a_0d_layer():
    # fl4health-style hand packing of a scalar layer: np.array(()) is float64, and so is
    # np.zeros((1, 0)); both are empty, so they can only mean "0-d" and "no coordinates".
    ex = SparseCooParameterExchanger(0.5, largest_final_magnitude_scores)
    payload = [np.array([3.0], np.float32), np.zeros((1, 0)), np.array(()), np.array(["t"])]
    model = {"t": np.float32(1.0), "w": np.array([5.0, 6.0], np.float32)}
    pulled = ex.pull_parameters(payload, model)
    assert float(pulled["t"]) == 3.0 and pulled["w"].tolist() == [5.0, 6.0]
    assert float(model["t"]) == 1.0  # the given pytree is not mutated
