"""Tests for the flat views of models: jaxlayerx.flatten / unflatten / merge_layers / conform_layer."""

from __future__ import annotations

import collections
import dataclasses

import flax
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

import jaxlayerx as jlx
from jaxlayerx import conform_layer, flatten, merge_layers, unflatten

BF16 = jnp.bfloat16


# --------------------------------------------------------------------------------------
# Small models and helpers (kept in this file on purpose).
# --------------------------------------------------------------------------------------


class LinenBlock(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x, train):
        x = nn.Dense(self.features)(x)
        return nn.BatchNorm(use_running_average=not train)(x)


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = LinenBlock(4)(x, train)
        return nn.Dense(2)(nn.relu(x))


class NnxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Linear(2, 3, rngs=rngs)
        self.bn = nnx.BatchNorm(3, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(3, 3, rngs=rngs), nnx.Linear(3, 1, rngs=rngs)])
        self.tied = self.conv1  # shared submodule: its variables must appear once

    def __call__(self, x):
        x = nnx.relu(self.bn(self.tied(x)))
        return self.layers[1](nnx.relu(self.layers[0](x)))


class NnxDropNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.fc = nnx.Linear(2, 2, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)  # holds RNG state (key + count)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Point:
    x: jax.Array
    y: jax.Array
    tag: str = dataclasses.field(default="point", metadata=dict(static=True))


@flax.struct.dataclass
class Box:
    w: jax.Array
    label: str = flax.struct.field(pytree_node=False, default="box")


# Hand-derived names of LinenNet's variables: JAX visits dict keys sorted, so the
# collection 'batch_stats' comes before 'params', and 'Dense_0' before 'LinenBlock_0'.
LINEN_NAMES = [
    "batch_stats/LinenBlock_0/BatchNorm_0/mean",
    "batch_stats/LinenBlock_0/BatchNorm_0/var",
    "params/Dense_0/bias",
    "params/Dense_0/kernel",
    "params/LinenBlock_0/BatchNorm_0/bias",
    "params/LinenBlock_0/BatchNorm_0/scale",
    "params/LinenBlock_0/Dense_0/bias",
    "params/LinenBlock_0/Dense_0/kernel",
]

# Hand-derived names of NnxNet: NNX visits attributes sorted (bn < conv1 < layers < tied);
# the tied submodule is found first as conv1 and is not listed again under tied/.
NNX_NAMES = [
    "bn/bias",
    "bn/mean",
    "bn/scale",
    "bn/var",
    "conv1/bias",
    "conv1/kernel",
    "layers/0/bias",
    "layers/0/kernel",
    "layers/1/bias",
    "layers/1/kernel",
]


def _is_var(x):
    return isinstance(x, nnx.Variable)


def _as_np(x):
    """A leaf as numpy, PRNG key arrays through their key data."""
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(x))
    return np.asarray(x)


def snapshot(model):
    """Structure, leaf kinds, dtypes, shapes and raw bytes of every leaf of a model."""
    tree = nnx.state(model) if isinstance(model, nnx.Module) else model
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_var)
    leaves = []
    for path, leaf in path_leaves:
        kind = type(leaf)
        if _is_var(leaf):
            leaf = leaf.get_value()
        array = _as_np(leaf)
        leaves.append((jax.tree_util.keystr(path), kind, array.dtype, array.shape, array.tobytes()))
    return treedef, leaves


def assert_identical(a, b):
    """Same structure, same leaf types, same dtypes, shapes and bytes."""
    tree_a, leaves_a = snapshot(a)
    tree_b, leaves_b = snapshot(b)
    assert tree_a == tree_b
    assert len(leaves_a) == len(leaves_b)
    for la, lb in zip(leaves_a, leaves_b):
        assert la == lb, (la[:4], lb[:4])


def ref_flat(tree, sep="/"):
    return [(ref_name(path, sep), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


NOT_RNG = nnx.Not(nnx.RngState)


def nnx_ref_flat(model, filt=NOT_RNG):
    """Independent NNX reference: nnx's own flat state of the filtered state."""
    state = nnx.state(model, filt)
    return [("/".join(str(p) for p in path), var.get_value()) for path, var in nnx.to_flat_state(state)]


@pytest.fixture(scope="module")
def linen_vars():
    return LinenNet().init(jax.random.key(0), jnp.ones((1, 3)))


@pytest.fixture
def nnx_model():
    return NnxNet(nnx.Rngs(0))


def plain_tree():
    return {
        "z": [np.ones(2, np.float32), (np.zeros(3, np.float32), jnp.arange(2, dtype=jnp.int32))],
        "a": {"k": np.arange(4, dtype=np.float32).reshape(2, 2)},
        "dc": Point(np.ones(1, np.float32), np.full(1, 7, np.int32)),
        "box": Box(jnp.full((3,), 2.5, dtype=BF16)),
    }


# --------------------------------------------------------------------------------------
# Names and order
# --------------------------------------------------------------------------------------


def test_linen_names_order_and_values(linen_vars):
    flat = flatten(linen_vars)
    assert isinstance(flat, collections.OrderedDict)
    assert list(flat) == LINEN_NAMES
    reference = ref_flat(linen_vars)
    assert list(flat) == [name for name, _ in reference]
    for (name, leaf), value in zip(reference, flat.values()):
        assert value is leaf, name  # documented: nothing is copied
    assert flat["params/LinenBlock_0/Dense_0/kernel"].shape == (3, 4)
    assert flat["params/Dense_0/kernel"].shape == (4, 2)
    assert flat["batch_stats/LinenBlock_0/BatchNorm_0/mean"].shape == (4,)


def test_linen_flatten_with_other_sep(linen_vars):
    flat = flatten(linen_vars, sep=".")
    assert list(flat) == [name.replace("/", ".") for name in LINEN_NAMES]


def test_nnx_module_names_order_and_values(nnx_model):
    flat = flatten(nnx_model)
    assert isinstance(flat, collections.OrderedDict)
    assert list(flat) == NNX_NAMES
    reference = nnx_ref_flat(nnx_model)
    assert list(flat) == [name for name, _ in reference]
    for (name, ref_value), value in zip(reference, flat.values()):
        assert np.array_equal(np.asarray(value), np.asarray(ref_value)), name
    # Each value is the array of the module's variable.
    assert np.array_equal(np.asarray(flat["layers/1/kernel"]), np.asarray(nnx_model.layers[1].kernel[...]))
    assert np.array_equal(np.asarray(flat["bn/mean"]), np.asarray(nnx_model.bn.mean[...]))


def test_nnx_tied_submodule_appears_once(nnx_model):
    flat = flatten(nnx_model)
    assert not any(name.startswith("tied/") for name in flat)
    # Exactly one (2, 3) kernel: conv1's, shared with tied.
    assert [name for name, v in flat.items() if v.shape == (2, 3)] == ["conv1/kernel"]
    assert np.array_equal(np.asarray(flat["conv1/kernel"]), np.asarray(nnx_model.tied.kernel[...]))


def test_nnx_state_names(nnx_model):
    state = nnx.state(nnx_model)
    assert isinstance(state, nnx.State)
    flat = flatten(state)
    assert isinstance(flat, collections.OrderedDict)
    assert list(flat) == NNX_NAMES
    assert list(flat) == [name for name, _ in nnx_ref_flat(nnx_model)]


def test_nnx_filter_param_only(nnx_model):
    flat = flatten(nnx_model, nnx_filter=nnx.Param)
    expected = [n for n in NNX_NAMES if n not in ("bn/mean", "bn/var")]
    assert list(flat) == expected
    assert list(flat) == [name for name, _ in nnx_ref_flat(nnx_model, nnx.Param)]
    assert list(flatten(nnx_model, nnx_filter=nnx.BatchStat)) == ["bn/mean", "bn/var"]


def test_nnx_default_excludes_rng_state():
    model = NnxDropNet(nnx.Rngs(0))
    everything = flatten(model, nnx_filter=...)
    # The module really holds RNG state (so the default filter has something to drop).
    assert any("rngs" in name for name in everything)
    default = flatten(model)
    assert not any("rngs" in name for name in default)
    assert list(default) == ["fc/bias", "fc/kernel"]
    assert list(default) == [n for n, _ in nnx_ref_flat(model, nnx.Not(nnx.RngState))]
    assert jlx.DEFAULT_NNX_FILTER is not None
    assert list(flatten(model, nnx_filter=jlx.DEFAULT_NNX_FILTER)) == list(default)


def test_plain_pytree_names_and_order():
    tree = plain_tree()
    flat = flatten(tree)
    assert isinstance(flat, collections.OrderedDict)
    # Hand-derived: dict keys sorted (a < box < dc < z), dataclass fields in declaration
    # order (static/meta fields are not leaves), lists and tuples by index.
    assert list(flat) == ["a/k", "box/w", "dc/x", "dc/y", "z/0", "z/1/0", "z/1/1"]
    reference = ref_flat(tree)
    assert list(flat) == [name for name, _ in reference]
    for (name, leaf), value in zip(reference, flat.values()):
        assert value is leaf, name


def test_plain_pytree_holding_nnx_variables_deep_inside():
    # NNX variables nested in plain containers are unwrapped to their arrays and filtered,
    # however deep they sit; a tree without any is walked without the is_leaf callback.
    kernel, stat, key = jnp.ones((2, 3)), jnp.zeros(3), jax.random.key(0)
    tree = {"a": [jnp.arange(2.0), {"w": nnx.Param(kernel)}], "b": (nnx.BatchStat(stat), nnx.RngKey(key))}
    flat = flatten(tree)
    assert list(flat) == ["a/0", "a/1/w", "b/0"]  # hand-derived; the RNG key is filtered out
    assert flat["a/1/w"] is kernel and flat["b/0"] is stat
    assert list(flatten(tree, nnx_filter=nnx.Param)) == ["a/0", "a/1/w"]  # plain arrays always stay
    plain = {"a": [jnp.arange(2.0), {"w": kernel}], "b": (stat,)}
    assert list(flatten(plain)) == ["a/0", "a/1/w", "b/0"]
    assert flatten(plain)["a/1/w"] is kernel


def test_list_and_tuple_roots():
    lst = [np.zeros(1, np.float32), [np.ones(2, np.float32)]]
    assert list(flatten(lst)) == ["0", "1/0"]
    tup = (np.zeros(1, np.float32), {"w": np.ones(2, np.float32)})
    assert list(flatten(tup)) == ["0", "1/w"]


def test_order_survives_jit():
    tree = collections.OrderedDict([("b", np.ones(2, np.float32)), ("a", np.zeros(3, np.float32))])
    flat = flatten(tree)
    assert list(flat) == ["b", "a"]  # insertion order of the OrderedDict, not sorted
    out = jax.jit(lambda d: d)(flat)
    assert isinstance(out, collections.OrderedDict)
    assert list(out) == ["b", "a"]
    # Sanity: the check is meaningful, a plain dict would come back sorted.
    plain = jax.jit(lambda d: d)({"b": np.ones(2), "a": np.zeros(3)})
    assert list(plain) == ["a", "b"]


def test_nnx_flat_order_survives_jit(nnx_model):
    flat = flatten(nnx_model)
    out = jax.jit(lambda d: d)(flat)
    assert isinstance(out, collections.OrderedDict)
    assert list(out) == list(flat)


# --------------------------------------------------------------------------------------
# flatten errors
# --------------------------------------------------------------------------------------


def test_key_part_containing_sep_is_value_error():
    tree = {"a/b": {"c": np.ones(2, np.float32)}}
    before = snapshot(tree)
    with pytest.raises(ValueError, match=r"'a/b'.*separator"):
        flatten(tree)
    assert snapshot(tree) == before
    assert list(flatten(tree, sep=".")) == ["a/b.c"]


def test_linen_names_with_underscore_sep_is_value_error(linen_vars):
    with pytest.raises(ValueError, match=r"Dense_0|LinenBlock_0|batch_stats"):
        flatten(linen_vars, sep="_")


def test_duplicate_names_is_value_error():
    tree = collections.OrderedDict([(1, np.ones(2, np.float32)), ("1", np.zeros(2, np.float32))])
    before = snapshot(tree)
    with pytest.raises(ValueError, match=r"'1'"):
        flatten(tree)
    assert snapshot(tree) == before


@pytest.mark.parametrize("bad", ["hello", object(), 1.5], ids=["str", "object", "float"])
def test_non_array_leaf_is_type_error(bad):
    tree = {"a": {"w": np.ones(2, np.float32), "name": bad}}
    with pytest.raises(TypeError, match=r"'a/name'"):
        flatten(tree)
    assert tree["a"]["name"] is bad


# --------------------------------------------------------------------------------------
# unflatten
# --------------------------------------------------------------------------------------


def test_unflatten_roundtrip_linen(linen_vars):
    before = snapshot(linen_vars)
    out = unflatten(flatten(linen_vars), like=linen_vars)
    assert_identical(out, linen_vars)
    assert snapshot(linen_vars) == before


def test_unflatten_roundtrip_frozendict(linen_vars):
    frozen = flax.core.freeze(linen_vars)
    out = unflatten(flatten(frozen), like=frozen)
    assert isinstance(out, flax.core.FrozenDict)
    assert_identical(out, frozen)


def test_unflatten_roundtrip_nnx_state(nnx_model):
    state = nnx.state(nnx_model)
    out = unflatten(flatten(state), like=state)
    assert isinstance(out, nnx.State)
    assert_identical(out, state)


@pytest.mark.parametrize("cls", [NnxNet, NnxDropNet])
def test_unflatten_roundtrip_nnx_module(cls):
    model = cls(nnx.Rngs(0))
    before = snapshot(model)
    out = unflatten(flatten(model), like=model)
    assert isinstance(out, cls)
    assert out is not model
    assert_identical(out, model)  # full state, RNG state included
    assert snapshot(model) == before
    # A truly new module: changing it leaves the original alone.
    first = next(iter(flatten(out)))
    var = {"NnxNet": lambda m: m.bn.bias, "NnxDropNet": lambda m: m.fc.bias}[cls.__name__]
    var(out)[...] = jnp.full(var(out)[...].shape, 42.0)
    assert snapshot(model) == before, first
    if cls is NnxNet:
        assert out.tied is out.conv1  # the sharing is kept


def test_unflatten_new_values_into_nnx_module(nnx_model):
    before = snapshot(nnx_model)
    flat = flatten(nnx_model)
    new = collections.OrderedDict(
        (name, np.full(value.shape, i, dtype=np.float32)) for i, (name, value) in enumerate(flat.items())
    )
    out = unflatten(new, like=nnx_model)
    got = flatten(out)
    for i, name in enumerate(flat):
        assert np.array_equal(np.asarray(got[name]), np.full(flat[name].shape, i, np.float32)), name
    assert np.array_equal(np.asarray(out.tied.kernel[...]), np.full((2, 3), 5.0))  # conv1/kernel is #5
    assert snapshot(nnx_model) == before


def test_unflatten_with_param_filter_keeps_other_variables(nnx_model):
    before = snapshot(nnx_model)
    params = flatten(nnx_model, nnx_filter=nnx.Param)
    # Only Param layers are asked for; the batch statistics come from `like`.
    new = collections.OrderedDict((name, np.zeros(v.shape, np.float32)) for name, v in params.items())
    out = unflatten(new, like=nnx_model, nnx_filter=nnx.Param)
    got = flatten(out)
    for name in NNX_NAMES:
        if name in ("bn/mean", "bn/var"):
            assert np.array_equal(np.asarray(got[name]), np.asarray(flatten(nnx_model)[name])), name
        else:
            assert np.array_equal(np.asarray(got[name]), np.zeros(got[name].shape)), name
    assert snapshot(nnx_model) == before


def test_merge_layers_rng_state_is_not_a_layer_by_default():
    model = NnxDropNet(nnx.Rngs(0))
    before = snapshot(model)
    key_name = next(name for name in flatten(model, nnx_filter=...) if name.endswith("rngs/key"))
    with pytest.raises(KeyError, match=key_name):
        merge_layers(model, {key_name: jax.random.key(1)})
    assert snapshot(model) == before


def test_unflatten_plain_numpy_stays_numpy():
    tree = {
        "a": [np.arange(3, dtype=np.float32), np.arange(2, dtype=np.int32)],
        "b": {"c": np.ones((2, 2), dtype=np.float16)},
    }
    out = unflatten(flatten(tree), like=tree)
    assert_identical(out, tree)
    for leaf in jax.tree_util.tree_leaves(out):
        assert type(leaf) is np.ndarray
    # New arrays, not aliases of the input.
    assert not np.shares_memory(out["a"][0], tree["a"][0])


def test_unflatten_plain_pytree_with_dataclasses():
    tree = plain_tree()
    out = unflatten(flatten(tree), like=tree)
    assert_identical(out, tree)
    assert isinstance(out["dc"], Point) and out["dc"].tag == "point"
    assert isinstance(out["box"], Box) and out["box"].label == "box"


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16, np.int32])
@pytest.mark.parametrize("backend", ["numpy", "jax"])
def test_unflatten_preserves_dtypes(dtype, backend):
    values = np.array([[1, -2, 3], [4, 0, 7]]).astype(dtype)
    leaf = values if backend == "numpy" else jnp.asarray(values)
    tree = {"w": leaf, "v": {"u": np.arange(2, dtype=np.float32)}}
    out = unflatten(flatten(tree), like=tree)
    assert_identical(out, tree)
    assert out["w"].dtype == np.dtype(dtype)
    assert np.asarray(out["w"]).tobytes() == values.tobytes()


def test_unflatten_missing_layer_is_key_error(linen_vars):
    flat = flatten(linen_vars)
    del flat["params/Dense_0/bias"]
    before = snapshot(linen_vars)
    with pytest.raises(KeyError, match=r"params/Dense_0/bias"):
        unflatten(flat, like=linen_vars)
    assert snapshot(linen_vars) == before


def test_unflatten_extra_layer_is_key_error(nnx_model):
    flat = flatten(nnx_model)
    flat["conv2/kernel"] = np.zeros((2, 3), np.float32)
    before = snapshot(nnx_model)
    with pytest.raises(KeyError, match=r"conv2/kernel"):
        unflatten(flat, like=nnx_model)
    assert snapshot(nnx_model) == before


# --------------------------------------------------------------------------------------
# merge_layers
# --------------------------------------------------------------------------------------


def test_merge_layers_linen_replaces_exactly_named(linen_vars):
    before_snap = snapshot(linen_vars)
    before = {name: np.asarray(v).copy() for name, v in flatten(linen_vars).items()}
    new_bias = np.array([0.5, -1.5], dtype=np.float32)
    new_mean = np.arange(4, dtype=np.float32)
    out = merge_layers(
        linen_vars,
        {"params/Dense_0/bias": new_bias, "batch_stats/LinenBlock_0/BatchNorm_0/mean": new_mean},
    )
    assert out is not linen_vars
    after = flatten(out)
    assert list(after) == LINEN_NAMES
    for name in LINEN_NAMES:
        expected = {"params/Dense_0/bias": new_bias, "batch_stats/LinenBlock_0/BatchNorm_0/mean": new_mean}.get(
            name, before[name]
        )
        assert np.asarray(after[name]).dtype == before[name].dtype
        assert np.array_equal(np.asarray(after[name]), expected), name
    # The input is not mutated.
    assert snapshot(linen_vars) == before_snap
    assert np.array_equal(np.asarray(linen_vars["params"]["Dense_0"]["bias"]), before["params/Dense_0/bias"])


def test_merge_layers_never_mutates_plain_dict():
    inner = {"k": np.arange(3, dtype=np.float32)}
    tree = {"a": inner, "b": [np.ones(2, np.float32)]}
    k_obj, b0_obj = inner["k"], tree["b"][0]
    before = snapshot(tree)
    out = merge_layers(tree, {"a/k": np.array([9, 8, 7], np.float32)})
    assert np.array_equal(out["a"]["k"], [9, 8, 7])
    assert np.array_equal(out["b"][0], [1, 1])
    assert snapshot(tree) == before
    assert tree["a"] is inner and inner["k"] is k_obj and tree["b"][0] is b0_obj
    assert np.array_equal(inner["k"], [0, 1, 2])


def test_merge_layers_nnx_state_not_mutated(nnx_model):
    state = nnx.state(nnx_model)
    before_state, before_model = snapshot(state), snapshot(nnx_model)
    out = merge_layers(state, {"conv1/bias": np.array([1, 2, 3], np.float32)})
    assert np.array_equal(np.asarray(flatten(out)["conv1/bias"]), [1, 2, 3])
    assert snapshot(state) == before_state
    assert snapshot(nnx_model) == before_model


def test_merge_layers_nnx_in_place(nnx_model):
    before = {name: np.asarray(v).copy() for name, v in flatten(nnx_model).items()}
    new_kernel = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = merge_layers(nnx_model, {"conv1/kernel": new_kernel})
    assert out is nnx_model
    assert np.array_equal(np.asarray(nnx_model.conv1.kernel[...]), new_kernel)
    assert np.array_equal(np.asarray(nnx_model.tied.kernel[...]), new_kernel)  # tied sees it
    after = flatten(nnx_model)
    for name in NNX_NAMES:
        if name != "conv1/kernel":
            assert np.array_equal(np.asarray(after[name]), before[name]), name
    assert nnx_model.conv1.kernel[...].dtype == jnp.float32


def test_merge_layers_lossless_cast_keeps_model_dtype(nnx_model):
    update = np.array([0.5, 1.0, -2.0], dtype=np.float16)
    merge_layers(nnx_model, {"bn/bias": update})
    assert nnx_model.bn.bias[...].dtype == jnp.float32
    assert np.array_equal(np.asarray(nnx_model.bn.bias[...]), update.astype(np.float32))


def test_merge_layers_copies_update_values_nnx(nnx_model):
    update = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    merge_layers(nnx_model, {"conv1/bias": update})
    update[:] = -100.0
    assert np.array_equal(np.asarray(nnx_model.conv1.bias[...]), [1.0, 2.0, 3.0])


def test_merge_layers_copies_update_values_numpy_tree():
    tree = {"w": np.zeros(3, np.float32)}
    update = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    out = merge_layers(tree, {"w": update})
    update[:] = -100.0
    assert np.array_equal(out["w"], [1.0, 2.0, 3.0])
    assert np.array_equal(tree["w"], [0.0, 0.0, 0.0])


def test_merge_layers_unknown_name(nnx_model):
    before = snapshot(nnx_model)
    assert issubclass(jlx.UnknownLayerError, KeyError)
    with pytest.raises(jlx.UnknownLayerError, match=r"conv1/kernal.*'conv1/kernel'") as info:
        merge_layers(nnx_model, {"conv1/kernal": np.zeros((2, 3), np.float32)})
    assert isinstance(info.value, KeyError)
    assert snapshot(nnx_model) == before


def test_merge_layers_unknown_name_linen(linen_vars):
    before = snapshot(linen_vars)
    with pytest.raises(KeyError, match=r"'params/Dense_0/bias'"):
        merge_layers(linen_vars, {"params/Dense_0/bais": np.zeros(2, np.float32)})
    assert snapshot(linen_vars) == before


# Each bad update is the LAST of several; the good ones before it must not be applied.
BAD_LAST = [
    ("unknown", lambda: ("layers/2/bias", np.zeros(1, np.float32)), KeyError, r"layers/2/bias"),
    ("shape", lambda: ("layers/1/bias", np.zeros(2, np.float32)), ValueError, r"layers/1/bias.*\(1,\).*\(2,\)"),
    ("dtype", lambda: ("layers/1/bias", np.zeros(1, np.complex64)), TypeError, r"layers/1/bias.*float32.*complex64"),
]


@pytest.mark.parametrize("label,make_bad,exc,pattern", BAD_LAST, ids=[b[0] for b in BAD_LAST])
def test_merge_layers_last_bad_changes_nothing_nnx(nnx_model, label, make_bad, exc, pattern):
    before = snapshot(nnx_model)
    bad_name, bad_value = make_bad()
    updates = collections.OrderedDict(
        [
            ("conv1/kernel", np.ones((2, 3), np.float32)),
            ("bn/mean", np.ones(3, np.float32)),
            ("layers/0/bias", np.ones(3, np.float32)),
            (bad_name, bad_value),
        ]
    )
    with pytest.raises(exc, match=pattern):
        merge_layers(nnx_model, updates)
    assert snapshot(nnx_model) == before


@pytest.mark.parametrize("label,make_bad,exc,pattern", BAD_LAST, ids=[b[0] for b in BAD_LAST])
def test_merge_layers_last_bad_changes_nothing_pytree(label, make_bad, exc, pattern):
    tree = {
        "conv1": {"kernel": np.zeros((2, 3), np.float32)},
        "layers": [{"bias": np.zeros(3, np.float32)}, {"bias": np.zeros(1, np.float32)}],
    }
    before = snapshot(tree)
    bad_name, bad_value = make_bad()
    updates = collections.OrderedDict(
        [
            ("conv1/kernel", np.ones((2, 3), np.float32)),
            ("layers/0/bias", np.ones(3, np.float32)),
            (bad_name, bad_value),
        ]
    )
    with pytest.raises(exc, match=pattern):
        merge_layers(tree, updates)
    assert snapshot(tree) == before


# --------------------------------------------------------------------------------------
# conform_layer
# --------------------------------------------------------------------------------------

LIKE_KINDS = ["numpy", "jax"]


def _like(values, kind):
    return values if kind == "numpy" else jnp.asarray(values)


@pytest.mark.parametrize("kind", LIKE_KINDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16, np.int32, np.int8])
def test_conform_same_dtype(kind, dtype):
    like = _like(np.zeros((2, 2), dtype), kind)
    value = np.array([[1, 2], [-3, 4]]).astype(dtype)
    out = conform_layer("w", value, like)
    assert out.dtype == np.dtype(dtype)
    assert np.asarray(out).tobytes() == value.tobytes()
    if kind == "numpy":
        assert type(out) is np.ndarray
        assert not np.shares_memory(out, value)
    else:
        assert isinstance(out, jax.Array)


@pytest.mark.parametrize("kind", LIKE_KINDS)
@pytest.mark.parametrize(
    "src,dst",
    [
        (np.float16, np.float32),
        (ml_dtypes.bfloat16, np.float32),
        (np.int8, np.int32),
        (np.float64, np.float32),
        (np.float32, ml_dtypes.bfloat16),
        (ml_dtypes.bfloat16, np.float16),
        (np.int32, np.float32),
        (np.int64, np.float16),
        (np.bool_, np.float32),
        (np.int64, np.int32),
        (np.uint8, np.int8),
        (np.float32, np.complex64),
    ],
    ids=[
        "f16->f32",
        "bf16->f32",
        "i8->i32",
        "f64->f32",
        "f32->bf16",
        "bf16->f16",
        "i32->f32",
        "i64->f16",
        "bool->f32",
        "i64->i32",
        "u8->i8",
        "f32->c64",
    ],
)
def test_conform_accepted_cast_rounds_to_nearest(kind, src, dst):
    # The dtype policy: floating (and integer, boolean) values of any width into a floating
    # layer, rounded to nearest; integers within range into an integer layer.
    like = _like(np.zeros(6, dst), kind)
    if np.dtype(src) == np.bool_:
        value = np.array([True, False, True, True, False, False])
    elif np.dtype(src).kind in "iu":
        value = np.array([1, 2, 100, 0, 3, 7]).astype(src)
    else:
        # 0.1 and 1/3 are not exact in any binary width: the cast must round them.
        value = np.array([1.5, -2.0, 100.0, 0.0, 0.1, 1 / 3]).astype(src)
    out = conform_layer("w", value, like)
    assert out.dtype == np.dtype(dst)
    # Reference: numpy's (ml_dtypes') own cast, round to nearest even, via float64 where it
    # takes a detour (float64 holds every value of the narrower types exactly).
    expected = value.astype(np.float64).astype(dst) if np.dtype(src).kind not in "biu" else value.astype(dst)
    assert np.asarray(out).tobytes() == expected.tobytes()


@pytest.mark.parametrize("kind", LIKE_KINDS)
@pytest.mark.parametrize(
    "src,dst,values,pattern",
    [
        (np.float32, np.int32, [1.0, 2.0, 3.0], r"int32 layer does not accept float32 values.*loses the fraction"),
        (np.float64, np.int8, [1.0, 2.0, 3.0], r"int8 layer does not accept float64 values"),
        (np.complex64, np.float32, [1, 2, 3], r"float32 layer does not accept complex64 values.*imaginary"),
        (np.int64, np.int32, [1, 2**31, 3], r"value 2147483648 is out of the range of its dtype int32"),
        (np.int16, np.uint8, [1, -1, 3], r"value -1 is out of the range of its dtype uint8"),
        (np.int32, np.bool_, [1, 0, 1], r"bool layer does not accept int32 values"),
        (np.float32, np.bool_, [1, 0, 1], r"bool layer does not accept float32 values"),
    ],
    ids=["f32->i32", "f64->i8", "c64->f32", "i64->i32-out-of-range", "i16->u8-negative", "i32->bool", "f32->bool"],
)
def test_conform_lossy_cast_is_type_error(kind, src, dst, values, pattern):
    like = _like(np.zeros(3, dst), kind)
    value = np.array(values).astype(src)
    before = value.copy()
    with pytest.raises(TypeError, match=r"'w'.*" + pattern):
        conform_layer("w", value, like)
    assert np.array_equal(value, before) and value.dtype == np.dtype(src)


def test_conform_void_of_another_size_is_refused():
    raw = np.zeros(3, np.float32).view("V4")
    with pytest.raises(TypeError, match=r"'w'.*float16 layer does not accept \|V4 values"):
        conform_layer("w", raw, np.zeros(3, np.float16))


@pytest.mark.parametrize("kind", LIKE_KINDS)
def test_conform_shape_mismatch(kind):
    like = _like(np.zeros((2, 3), np.float32), kind)
    with pytest.raises(ValueError, match=r"'w'.*expected shape \(2, 3\), got \(3, 2\)"):
        conform_layer("w", np.zeros((3, 2), np.float32), like)
    with pytest.raises(ValueError, match=r"expected shape \(2, 3\), got \(6,\)"):
        conform_layer("w", np.zeros(6, np.float32), like)


@pytest.mark.parametrize("kind", LIKE_KINDS)
def test_conform_void_reinterpreted_as_bfloat16(kind):
    bf16 = np.array([1.5, -2.0, 3.25, 0.0, 1e-3, -7e4], dtype=ml_dtypes.bfloat16)
    raw = bf16.view("V2")
    assert raw.dtype.kind == "V" and raw.dtype.itemsize == 2
    like = _like(np.zeros(6, ml_dtypes.bfloat16), kind)
    out = conform_layer("w", raw, like)
    assert out.dtype == np.dtype(ml_dtypes.bfloat16)
    assert np.asarray(out).tobytes() == bf16.tobytes()  # bit-exact


def test_merge_void_payload_into_bfloat16_model():
    tree = {"w": jnp.zeros(3, BF16), "b": jnp.ones(2, jnp.float32)}
    bf16 = np.array([0.1, 2.5, -3.0], dtype=ml_dtypes.bfloat16)
    out = merge_layers(tree, {"w": bf16.view("V2")})
    assert out["w"].dtype == BF16
    assert np.asarray(out["w"]).tobytes() == bf16.tobytes()


# --------------------------------------------------------------------------------------
# Hypothesis: random nested dict trees
# --------------------------------------------------------------------------------------

KEYS = ["a", "b", "c", "W", "x1", "_", "k.v"]
DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16, np.int32]


@st.composite
def leaf_arrays(draw):
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=3)))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "i":
        values = rng.integers(-1000, 1000, size=shape).astype(dtype)
    else:
        values = (rng.standard_normal(size=shape) * 10).astype(dtype)
    values = np.asarray(values)  # numpy returns a scalar (np.generic) for shape ()
    return jnp.asarray(values) if draw(st.booleans()) else values


@st.composite
def nested_trees(draw):
    budget = [draw(st.integers(1, 8))]  # number of leaves still to place

    def node(depth):
        n = draw(st.integers(1, 3))
        keys = draw(st.lists(st.sampled_from(KEYS), min_size=n, max_size=n, unique=True))
        out = {}
        for key in keys:
            if budget[0] <= 0:
                break
            if depth < 3 and budget[0] > 1 and draw(st.booleans()):
                child = node(depth + 1)
                if child:
                    out[key] = child
            else:
                out[key] = draw(leaf_arrays())
                budget[0] -= 1
        return out

    tree = node(1)
    if not tree:
        tree = {"a": draw(leaf_arrays())}
    return tree


@settings(deadline=None)
@given(nested_trees())
def test_hypothesis_roundtrip_and_names(tree):
    n_leaves = len(jax.tree_util.tree_leaves(tree))
    assert 1 <= n_leaves <= 8
    before = snapshot(tree)
    flat = flatten(tree)
    reference = jax.tree_util.tree_flatten_with_path(tree)[0]
    assert list(flat) == ["/".join(str(k.key) for k in path) for path, _ in reference]
    out = unflatten(flat, like=tree)
    assert_identical(out, tree)
    assert snapshot(tree) == before


def test_numpy_scalar_leaf_round_trips_as_numpy_scalar():
    tree = {"a": np.float32(1.25), "b": np.int16(-3)}
    back = jlx.unflatten(jlx.flatten(tree), like=tree)
    assert type(back["a"]) is np.float32 and back["a"] == np.float32(1.25)
    assert type(back["b"]) is np.int16 and back["b"] == -3


class _ArraysOnly:
    """A pytree node whose unflatten refuses non-array children (like some validating nodes)."""

    def __init__(self, a, b):
        if not all(isinstance(x, (np.ndarray, jax.Array)) for x in (a, b)):
            raise TypeError("arrays only")
        self.a, self.b = a, b


jax.tree_util.register_pytree_with_keys(
    _ArraysOnly,
    lambda n: (((jax.tree_util.GetAttrKey("a"), n.a), (jax.tree_util.GetAttrKey("b"), n.b)), None),
    lambda _, children: _ArraysOnly(*children),
)


def test_nodes_that_refuse_placeholder_leaves_are_named_directly():
    tree = {"x": _ArraysOnly(np.ones(2, np.float32), np.zeros(3, np.float32)), "y": np.ones(1)}
    flat = jlx.flatten(tree)
    assert list(flat) == ["x/a", "x/b", "y"]
    back = jlx.unflatten(flat, like=tree)
    assert isinstance(back["x"], _ArraysOnly) and np.array_equal(back["x"].b, tree["x"].b)


def test_names_follow_each_structure_not_a_stale_cache():
    first = jlx.flatten({"a": np.ones(1), "b": {"c": np.ones(1)}})
    again = jlx.flatten({"a": np.zeros(1), "b": {"c": np.zeros(1)}})
    other = jlx.flatten({"a": np.ones(1), "b": {"d": np.ones(1)}})
    assert list(first) == list(again) == ["a", "b/c"]
    assert list(other) == ["a", "b/d"]
    assert list(jlx.flatten({"a": np.ones(1), "b": {"c": np.ones(1)}}, sep=".")) == ["a", "b.c"]
