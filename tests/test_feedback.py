"""Tests of the opt-in error feedback (jaxlayerx/feedback.py) of ``DynamicLayerExchanger``
and ``SparseCooParameterExchanger``, and of the Flower client persisting its reference.

Every expectation comes from the small plain-numpy references below, or from hand-computed
values with the arithmetic in a comment, never from the library itself:

* ``ref_flat`` / ``nest``: a flat ``name -> numpy copy`` view of nested dicts (sorted keys,
  JAX's dict order) and back;
* ``ref_l2``: the L2 norm of ``current - reference`` in float64, ``/ size`` when normalized;
* ``ref_threshold_pick``: the layers whose drift is ``> threshold``, in flatten order;
* ``ref_sparse_pick``: ``|w - w0|`` scores, the ``ceil(total * level)``-th largest as the
  threshold, weights scoring ``>=`` it kept (layers whose kept values are all zero dropped);
* the property test's numpy process: a dict of the values last pulled, per layer, drift
  measured from it, or from the round's start for a layer never pulled.

Simulated rounds: the client pulls what the "server" sends (the full model first, then
what the client sent the round before), snapshots the model as ``initial_model``, trains
(adds a fixed delta) and pushes.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import nest, ref_flat
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxlayerx import (
    DynamicLayerExchanger,
    LayerSelectionFunctionConstructor,
    SparseCooParameterExchanger,
    SparseLayer,
    largest_magnitude_change_scores,
    pack_layers,
    write_coo,
)

F32 = np.float32
BF16 = jnp.bfloat16


# ---------------------------------------------------------------------------------------
# Independent references and helpers
# ---------------------------------------------------------------------------------------


def nest_copies(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The nested dict of numpy copies whose layers are ``flat``."""
    return nest(flat, lambda value: np.array(value, copy=True))


def packed(layers: Mapping[str, Any]) -> list[np.ndarray]:
    """fl4health's named layout, by hand: the arrays, then a 1-D Unicode names array."""
    return [np.asarray(value) for value in layers.values()] + [np.array(list(layers), dtype=np.str_)]


def unpack(payload: list[np.ndarray]) -> collections.OrderedDict[str, np.ndarray]:
    names = payload[-1]
    assert names.ndim == 1 and (names.dtype.kind == "U" or names.size == 0)
    assert len(payload) == names.size + 1
    return collections.OrderedDict((str(n), np.asarray(a)) for n, a in zip(names.tolist(), payload[:-1]))


def unpack_coo(payload: list[np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray, tuple[int, ...]]]:
    """A COO payload by hand: ``name -> (values, row-major flat indices, shape)``."""
    k = (len(payload) - 1) // 3
    assert len(payload) == 3 * k + 1
    out = {}
    for i, name in enumerate(payload[-1].tolist()):
        shape = tuple(int(d) for d in payload[2 * k + i])
        coordinates = np.asarray(payload[k + i])
        flat = np.ravel_multi_index(tuple(coordinates.T), shape) if shape else np.zeros(len(coordinates), np.int64)
        out[str(name)] = (np.asarray(payload[i]), np.asarray(flat), shape)
    return out


def bits(array: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(array)).view(np.uint8)


def assert_identical(got: Any, want: Any, what: str = "") -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert np.array_equal(bits(got), bits(want)), f"{what}: values differ: {got} != {want}"


def assert_flat(got: Mapping[str, Any], want: Mapping[str, Any], ordered: bool = True) -> None:
    if ordered:
        assert list(got) == list(want)
    else:
        assert set(got) == set(want), (sorted(got), sorted(want))
    for name in want:
        assert_identical(got[name], want[name], name)


def assert_payloads_identical(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_identical(a, b, f"payload[{i}]")


def copies(flat: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {name: np.array(value, copy=True) for name, value in flat.items()}


def ref_l2(current: np.ndarray, reference: np.ndarray, normalize: bool = False) -> float:
    diff = np.asarray(current, np.float64) - np.asarray(reference, np.float64)
    norm = math.sqrt(float(np.sum(diff * diff)))
    return norm / max(diff.size, 1) if normalize else norm


def ref_threshold_pick(
    current: Mapping[str, np.ndarray], against: Mapping[str, np.ndarray], threshold: float, normalize: bool = False
) -> list[str]:
    """The threshold rule in numpy: drift ``> threshold``, names in flatten (sorted) order."""
    return [name for name in sorted(current) if ref_l2(current[name], against[name], normalize) > threshold]


def ref_sparse_pick(
    current: Mapping[str, np.ndarray], against: Mapping[str, np.ndarray], level: float
) -> dict[str, np.ndarray]:
    """``name -> sorted kept flat indices``: scores ``|w - w0|`` (float32), the
    ``ceil(total * level)``-th largest as threshold, ``>=`` kept, all-zero-value layers dropped."""
    names = sorted(current)
    scores = {n: np.abs(current[n].astype(F32) - against[n].astype(F32)).reshape(-1) for n in names}
    everything = np.sort(np.concatenate([scores[n] for n in names]))[::-1]
    threshold = everything[math.ceil(everything.size * level) - 1]
    kept = {}
    for n in names:
        flat = np.flatnonzero(scores[n] >= threshold)
        if flat.size and np.any(current[n].reshape(-1)[flat] != 0):
            kept[n] = flat
    return kept


def threshold_exchanger(threshold: float = 1.0, error_feedback: bool = False, **kwargs: Any) -> DynamicLayerExchanger:
    """The threshold rule; plain L2 drift (normalize=False) unless told otherwise."""
    kwargs.setdefault("normalize", False)
    rule = LayerSelectionFunctionConstructor(threshold, 0.5, **kwargs).select_by_threshold()
    return DynamicLayerExchanger(rule, error_feedback=error_feedback)


def sparse_exchanger(level: float, error_feedback: bool = False) -> SparseCooParameterExchanger:
    return SparseCooParameterExchanger(level, largest_magnitude_change_scores, error_feedback=error_feedback)


def coo_payload(entries: Mapping[str, tuple[list[int], list[float]]], shapes: Mapping[str, tuple[int, ...]], dtype=F32):
    """``name -> (flat indices, values)`` as a COO payload."""
    return write_coo(
        {
            name: SparseLayer(np.asarray(values, dtype), np.asarray(flat, np.int64), tuple(shapes[name]))
            for name, (flat, values) in entries.items()
        }
    )


# ---------------------------------------------------------------------------------------
# 1. Dynamic exchange over several rounds: accumulation until sent
# ---------------------------------------------------------------------------------------

# enc/fast moves by 3 in each of 4 elements (L2 = sqrt(4 * 9) = 6, L2/size = 1.5): sent
# every round under both rules below. head/still never moves. enc/slow is the subject.
CASES_DYNAMIC = {
    # l2, threshold 1.0, a 1-element layer moving by 0.4 per round: per-round drift 0.4 is
    # never > 1. Accumulated since its last pull: 0.4, 0.8, 1.2 > 1 -> sent in round 3;
    # pulled back in round 4, then 0.4, 0.8, 1.2 again -> sent in round 6.
    "l2": dict(measure="l2", threshold=1.0, slow_shape=(1,), sent_rounds=[3, 6]),
    # l2/size, threshold 0.5, a 2-element layer moving by 0.4 per element per round: drift
    # after k rounds since its last pull = sqrt(2 * (0.4 k)^2) / 2 = 0.2828 k: 0.283 < 0.5,
    # then 0.566 > 0.5 -> sent in rounds 2, 4, 6.
    "l2/size": dict(measure="l2/size", threshold=0.5, slow_shape=(2,), sent_rounds=[2, 4, 6]),
}
ROUNDS = 6


def dynamic_start(slow_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    return {
        "enc/fast": np.full((2, 2), 1.0, F32),
        "enc/slow": np.zeros(slow_shape, F32),
        "head/still": np.array([2.0, -1.0], F32),
    }


DYNAMIC_DELTA = {"enc/fast": F32(3.0), "enc/slow": F32(0.4), "head/still": F32(0.0)}


def train(model: Any, delta: Mapping[str, Any]) -> dict[str, Any]:
    """A new nested dict: every layer plus its delta (0 if absent), in its own dtype."""
    return nest_copies({n: v + np.asarray(delta.get(n, 0), v.dtype) for n, v in ref_flat(model).items()})


def run_dynamic_rounds(exchanger: DynamicLayerExchanger, start: Mapping[str, np.ndarray], rounds: int = ROUNDS):
    """Round 1: the server sends the full model; later rounds: it sends back what the client
    sent the round before (as the only client, the average is its own values). Each round
    the client pulls, snapshots the model as initial_model, trains (adds DYNAMIC_DELTA) and
    pushes. Returns the pushed payloads and the final model."""
    model = nest_copies({n: np.zeros_like(v) for n, v in start.items()})
    to_pull = dict(start)
    payloads = []
    for _ in range(rounds):
        model = exchanger.pull_parameters(packed(to_pull), model)
        initial = model
        model = train(model, DYNAMIC_DELTA)
        payload = exchanger.push_parameters(model, initial)
        payloads.append(payload)
        to_pull = unpack(payload)
    return payloads, model


@pytest.mark.parametrize("case", list(CASES_DYNAMIC))
def test_dynamic_slow_layer_is_sent_once_its_accumulated_drift_passes_the_threshold(case):
    spec = CASES_DYNAMIC[case]
    start = dynamic_start(spec["slow_shape"])

    plain, _ = run_dynamic_rounds(threshold_exchanger(spec["threshold"], measure=spec["measure"]), start)
    feedback_exchanger = threshold_exchanger(spec["threshold"], error_feedback=True, measure=spec["measure"])
    feedback, final = run_dynamic_rounds(feedback_exchanger, start)

    for r in range(1, ROUNDS + 1):
        # without error feedback the slow layer's per-round drift never passes
        assert list(unpack(plain[r - 1])) == ["enc/fast"], r
        expected = ["enc/fast", "enc/slow"] if r in spec["sent_rounds"] else ["enc/fast"]
        assert list(unpack(feedback[r - 1])) == expected, r

    # the values sent: the trained values, slow = 0.4 added r times in float32
    for r in spec["sent_rounds"]:
        slow = np.zeros(spec["slow_shape"], F32)
        for _ in range(r):
            slow = slow + F32(0.4)
        assert_identical(unpack(feedback[r - 1])["enc/slow"], slow, f"round {r}")
    for r in range(1, ROUNDS + 1):
        assert_identical(unpack(feedback[r - 1])["enc/fast"], np.full((2, 2), 1.0 + 3.0 * r, F32), f"round {r}")

    # the reference: the last pull was at the start of round 6, of round 5's payload
    # (enc/fast = 1 + 3*5 = 16, and enc/slow too when round 5 sent it); the rest come
    # from their last pull before that.
    last_slow_sent = max(r for r in spec["sent_rounds"] if r <= ROUNDS - 1)
    slow_ref = np.zeros(spec["slow_shape"], F32)
    for _ in range(last_slow_sent):
        slow_ref = slow_ref + F32(0.4)
    assert_flat(
        feedback_exchanger.reference,
        {"enc/fast": np.full((2, 2), 16.0, F32), "enc/slow": slow_ref, "head/still": start["head/still"]},
        ordered=False,
    )
    assert_identical(ref_flat(final)["head/still"], start["head/still"])


def test_dynamic_percentage_rule_with_feedback_sends_the_accumulated_layer():
    # Percentage rule, l2, 1 of 2 layers (ceil(2 * 0.5) = 1): the layer that drifted most.
    # Per round a/big moves by 1.0 and b/small by 0.75 (1-element layers, both from 0).
    # Round 1 pulls the full model; later rounds pull back the layer sent the round before.
    # Without feedback a/big (1.0 > 0.75) is sent every round.
    rule = LayerSelectionFunctionConstructor(1.0, 0.5, normalize=False).select_by_percentage()
    delta = {"a/big": F32(1.0), "b/small": F32(0.75)}
    sent = {}
    for feedback in (False, True):
        exchanger = DynamicLayerExchanger(rule, error_feedback=feedback)
        model = nest_copies({"a/big": np.zeros(1, F32), "b/small": np.zeros(1, F32)})
        to_pull = ref_flat(model)
        sent[feedback] = []
        for _ in range(4):
            model = exchanger.pull_parameters(packed(to_pull), model)
            initial = model
            model = train(model, delta)
            to_pull = unpack(exchanger.push_parameters(model, initial))
            sent[feedback].append(list(to_pull))
    assert sent[False] == [["a/big"]] * 4
    # round 1: a 1.0 vs b 0.75 -> a. round 2: a 1.0 (pulled back) vs b 1.5 -> b.
    # round 3: a 2.0 (last pulled at round 2's start) vs b 0.75 (pulled back) -> a.
    # round 4: a 1.0 vs b 1.5 -> b.
    assert sent[True] == [["a/big"], ["b/small"], ["a/big"], ["b/small"]]


# ---------------------------------------------------------------------------------------
# 2. The reference after a pull
# ---------------------------------------------------------------------------------------


def mixed_model() -> dict[str, Any]:
    return nest_copies(
        {
            "a/bf": np.array([1.0, -2.0, 0.5], BF16),
            "a/int": np.array([[1, 2], [3, 4]], np.int32),
            "b/f": np.array([0.25, 0.5], F32),
        }
    )


def test_reference_starts_empty_and_follows_exactly_the_pulled_layers():
    exchanger = threshold_exchanger(error_feedback=True)
    assert isinstance(exchanger.reference, collections.OrderedDict) and len(exchanger.reference) == 0
    model = mixed_model()

    bf = np.array([3.0, 0.0078125, -0.0], BF16)
    ints16 = np.array([[7, -8], [9, 10]], np.int16)  # lossless upcast into the int32 layer
    payload = packed({"a/int": ints16, "a/bf": bf})
    model = exchanger.pull_parameters(payload, model)
    expected_ref = {"a/int": np.array([[7, -8], [9, 10]], np.int32), "a/bf": bf.copy()}
    assert_flat(exchanger.reference, expected_ref, ordered=False)
    assert "b/f" not in exchanger.reference
    for name, value in exchanger.reference.items():
        assert isinstance(value, np.ndarray), name
    assert_flat(ref_flat(model), {"a/bf": bf, "a/int": expected_ref["a/int"], "b/f": np.array([0.25, 0.5], F32)})

    # the reference holds copies: changing the payload's arrays afterwards changes nothing
    ints16[...] = 0
    payload[1][...] = 0
    assert_flat(exchanger.reference, expected_ref, ordered=False)

    # a float16 payload into the float32 layer: the reference is in the model's dtype
    model = exchanger.pull_parameters(packed({"b/f": np.array([1.5, -3.0], np.float16)}), model)
    expected_ref["b/f"] = np.array([1.5, -3.0], F32)
    assert_flat(exchanger.reference, expected_ref, ordered=False)

    # a later pull of one layer moves only that layer's reference
    bf2 = np.array([-1.0, 2.0, 4.0], BF16)
    model = exchanger.pull_parameters(packed({"a/bf": bf2}), model)
    expected_ref["a/bf"] = bf2
    assert_flat(exchanger.reference, expected_ref, ordered=False)

    # an empty payload moves nothing
    model = exchanger.pull_parameters(packed({}), model)
    assert_flat(exchanger.reference, expected_ref, ordered=False)

    # training (a new tree) leaves the reference where the pulls put it
    train(model, {"a/bf": 1, "a/int": 1, "b/f": 1})
    assert_flat(exchanger.reference, expected_ref, ordered=False)

    # the reference is a snapshot: writing into the pulled model's numpy leaves in place
    # does not reach it
    for leaf in (model["a"]["bf"], model["a"]["int"], model["b"]["f"]):
        assert isinstance(leaf, np.ndarray)
        leaf[...] = 0
    assert_flat(exchanger.reference, expected_ref, ordered=False)


def test_reference_of_bf16_and_int32_layers_drives_the_next_selection():
    # After pulling all three layers, drift (l2, threshold 1.0) is measured against the
    # pulled bf16 / int32 / float32 values: moving a/int by [[1, 1], [0, 0]] gives
    # sqrt(2) = 1.414 > 1 (sent); a/bf by [0.5, 0, 0] gives 0.5 (not); b/f unchanged.
    exchanger = threshold_exchanger(error_feedback=True)
    pulled = {
        "a/bf": np.array([3.0, 1.0, -2.0], BF16),
        "a/int": np.array([[1, 2], [3, 4]], np.int32),
        "b/f": np.array([0.5, 0.5], F32),
    }
    model = exchanger.pull_parameters(packed(pulled), mixed_model())
    trained = nest_copies(
        {
            "a/bf": np.array([3.5, 1.0, -2.0], BF16),
            "a/int": np.array([[2, 3], [3, 4]], np.int32),
            "b/f": np.array([0.5, 0.5], F32),
        }
    )
    sent = unpack(exchanger.push_parameters(trained, model))
    assert list(sent) == ["a/int"]
    assert_identical(sent["a/int"], np.array([[2, 3], [3, 4]], np.int32))


class Inner(nnx.Module):
    def __init__(self) -> None:
        self.w = nnx.Param(jnp.array([[1.0, 2.0], [3.0, 4.0]], jnp.float32))
        self.h = nnx.Param(jnp.array([0.5, 1.5], BF16))


class TinyNNX(nnx.Module):
    def __init__(self) -> None:
        self.inner = Inner()
        self.steps = nnx.Param(jnp.array([1, 2, 3], jnp.int32))


def set_nnx_layer(module: nnx.Module, name: str, value: Any) -> None:
    *parents, leaf = name.split("/")
    node = module
    for part in parents:
        node = getattr(node, part)
    getattr(node, leaf)[...] = value


def test_reference_does_not_alias_an_nnx_module_updated_in_place():
    module = TinyNNX()
    exchanger = threshold_exchanger(error_feedback=True)
    pulled = {"inner/h": np.array([2.0, -4.0], BF16), "steps": np.array([7, 8, 9], np.int32)}
    result = exchanger.pull_parameters(packed(pulled), module)
    assert result is module
    assert_flat(exchanger.reference, pulled, ordered=False)
    # in-place training of the module does not reach the reference
    set_nnx_layer(module, "inner/h", jnp.array([5.0, 5.0], BF16))
    set_nnx_layer(module, "steps", jnp.array([0, 0, 0], jnp.int32))
    assert_flat(exchanger.reference, pulled, ordered=False)


# ---------------------------------------------------------------------------------------
# 3. Layers never pulled fall back to initial_model
# ---------------------------------------------------------------------------------------

FALLBACK_TRAINED = {"p/a": np.array([1.5, 1.0], F32), "p/b": np.array([3.0, 0.0], F32), "q/c": np.array([0.5], F32)}
FALLBACK_PULLED_A = np.array([1.0, 1.0], F32)


def fallback_setup(exchanger):
    model = nest_copies({"p/a": np.zeros(2, F32), "p/b": np.zeros(2, F32), "q/c": np.zeros(1, F32)})
    exchanger.pull_parameters(packed({"p/a": FALLBACK_PULLED_A}), model)
    return nest_copies(FALLBACK_TRAINED)


@pytest.mark.parametrize(
    "initial, expected",
    [
        # p/a against its pulled [1, 1]: |[0.5, 0]| = 0.5 (not sent; against the initial
        # [6, 1] it would be 4.5). p/b against the initial [0, 0]: 3 > 1 (sent).
        # q/c against the initial [0]: 0.5 (not sent).
        ({"p/a": [6.0, 1.0], "p/b": [0.0, 0.0], "q/c": [0.0]}, ["p/b"]),
        # p/b against the initial [2.5, 0]: 0.5 (not sent); q/c against [-1]: 1.5 (sent).
        ({"p/a": [6.0, 1.0], "p/b": [2.5, 0.0], "q/c": [-1.0]}, ["q/c"]),
    ],
)
def test_dynamic_unpulled_layers_fall_back_to_initial_model(initial, expected):
    initial = {name: np.asarray(value, F32) for name, value in initial.items()}
    exchanger = threshold_exchanger(error_feedback=True)
    trained = fallback_setup(exchanger)
    against = dict(initial, **{"p/a": FALLBACK_PULLED_A})
    assert ref_threshold_pick(FALLBACK_TRAINED, against, 1.0) == expected
    sent = unpack(exchanger.push_parameters(trained, nest_copies(initial)))
    assert list(sent) == expected
    for name in expected:
        assert_identical(sent[name], FALLBACK_TRAINED[name], name)
    arrays, names = exchanger.select_parameters(trained, nest_copies(initial))
    assert names == expected

    # without feedback, p/a is measured against the initial [6, 1] too: 4.5 > 1
    plain = unpack(threshold_exchanger().push_parameters(trained, nest_copies(initial)))
    assert list(plain) == ref_threshold_pick(FALLBACK_TRAINED, initial, 1.0)
    assert "p/a" in plain


def test_dynamic_partially_pulled_without_initial_model_is_a_value_error():
    exchanger = threshold_exchanger(error_feedback=True)
    trained = fallback_setup(exchanger)
    before = copies(exchanger.reference)
    with pytest.raises(ValueError, match="initial_model"):
        exchanger.push_parameters(trained)
    with pytest.raises(ValueError, match="initial_model"):
        exchanger.select_parameters(trained, None)
    assert_flat(exchanger.reference, before)

    # once every layer was pulled, no initial_model is needed: drift against the pulls
    # p/b [3, 0] - [0, 0] -> 3 (sent); q/c [0.5] - [0.25] -> 0.25; p/a 0.5.
    exchanger.pull_parameters(packed({"p/b": np.zeros(2, F32), "q/c": np.array([0.25], F32)}), trained)
    sent = unpack(exchanger.push_parameters(trained))
    assert list(sent) == ["p/b"]


def test_nothing_pulled_and_no_initial_model_behaves_as_without_feedback():
    trained = nest_copies(FALLBACK_TRAINED)
    for feedback in (False, True):
        with pytest.raises(ValueError, match="needs initial_model"):
            threshold_exchanger(error_feedback=feedback).push_parameters(trained)
        with pytest.raises(ValueError, match="needs initial_model"):
            sparse_exchanger(0.5, error_feedback=feedback).push_parameters(trained)


def test_sparse_unpulled_layers_fall_back_and_partial_pull_needs_initial_model():
    # u/x pulled at [1, 1, 1] then trained to [1, 4, 1]: scores against the pull [0, 3, 0]
    # (against the initial [5, 5, 5] they would be [4, 1, 4]); v/y never pulled, trained
    # [2, 2] against the initial [0, 0.5]: scores [2, 1.5]. Level 0.4 of 5 weights:
    # k = ceil(2.0) = 2, scores sorted 3, 2, 1.5, 0, 0 -> threshold 2: u/x[1] and v/y[0].
    exchanger = sparse_exchanger(0.4, error_feedback=True)
    model = nest_copies({"u/x": np.zeros(3, F32), "v/y": np.zeros(2, F32)})
    exchanger.pull_parameters(coo_payload({"u/x": ([0, 1, 2], [1.0, 1.0, 1.0])}, {"u/x": (3,)}), model)
    assert_flat(exchanger.reference, {"u/x": np.ones(3, F32)})
    trained = {"u/x": np.array([1.0, 4.0, 1.0], F32), "v/y": np.array([2.0, 2.0], F32)}
    initial = {"u/x": np.full(3, 5.0, F32), "v/y": np.array([0.0, 0.5], F32)}
    expected = ref_sparse_pick(trained, {"u/x": np.ones(3, F32), "v/y": initial["v/y"]}, 0.4)
    assert {n: f.tolist() for n, f in expected.items()} == {"u/x": [1], "v/y": [0]}
    got = unpack_coo(exchanger.push_parameters(nest_copies(trained), nest_copies(initial)))
    assert {n: f.tolist() for n, (_, f, _) in got.items()} == {"u/x": [1], "v/y": [0]}
    assert_identical(got["u/x"][0], np.array([4.0], F32))
    assert_identical(got["v/y"][0], np.array([2.0], F32))

    with pytest.raises(ValueError, match="initial_model"):
        exchanger.push_parameters(nest_copies(trained))
    with pytest.raises(ValueError, match="initial_model"):
        exchanger.select_parameters(nest_copies(trained))


# ---------------------------------------------------------------------------------------
# 4. A bad payload changes neither the model nor the reference
# ---------------------------------------------------------------------------------------

GOOD_B = np.array([9.0, 9.0], F32)  # a valid first layer in every bad payload

BAD_DYNAMIC = {
    "unknown layer": ({"b/f": GOOD_B, "zz/nope": np.zeros(2, F32)}, KeyError),
    "wrong shape": ({"b/f": GOOD_B, "a/int": np.zeros((2, 3), np.int32)}, ValueError),
    "lossy float into int": ({"b/f": GOOD_B, "a/int": np.zeros((2, 2), F32)}, TypeError),
    "lossy complex into float32": ({"a/int": np.zeros((2, 2), np.int32), "b/f": np.zeros(2, np.complex64)}, TypeError),
    "lossy int64 out of int32's range": ({"b/f": GOOD_B, "a/int": np.full((2, 2), 2**40, np.int64)}, TypeError),
}


@pytest.mark.parametrize("case", list(BAD_DYNAMIC))
def test_dynamic_bad_payload_changes_neither_model_nor_reference(case):
    layers, error = BAD_DYNAMIC[case]
    exchanger = threshold_exchanger(error_feedback=True)
    model = exchanger.pull_parameters(packed({"a/int": np.array([[5, 6], [7, 8]], np.int32)}), mixed_model())
    model_before, reference_before = ref_flat(model), copies(exchanger.reference)
    with pytest.raises(error):
        exchanger.pull_parameters(packed(layers), model)
    assert_flat(ref_flat(model), model_before)
    assert_flat(exchanger.reference, reference_before)

    # a malformed layout (two names, one array) also changes nothing
    with pytest.raises(ValueError):
        exchanger.pull_parameters([GOOD_B, np.array(["b/f", "a/bf"])], model)
    assert_flat(exchanger.reference, reference_before)


def test_dynamic_bad_payload_leaves_an_nnx_module_and_reference_alone():
    module = TinyNNX()
    exchanger = threshold_exchanger(error_feedback=True)
    exchanger.pull_parameters(packed({"steps": np.array([4, 5, 6], np.int32)}), module)
    model_before, reference_before = ref_flat(module), copies(exchanger.reference)
    bad = {"inner/w": np.zeros((2, 2), F32), "steps": np.zeros(3, F32)}  # first valid, second lossy
    with pytest.raises(TypeError):
        exchanger.pull_parameters(packed(bad), module)
    assert_flat(ref_flat(module), model_before)
    assert_flat(exchanger.reference, reference_before)


SPARSE_SHAPES = {"l/w": (2, 3), "m/v": (4,)}


def sparse_model() -> dict[str, Any]:
    return nest_copies({"l/w": np.array([[1, 2, 3], [4, 5, 6]], F32), "m/v": np.array([1, 2, 3, 4], F32)})


def _bad_sparse(case: str) -> list[np.ndarray]:
    good = SparseLayer(np.array([9.0], F32), np.array([0]), (4,))
    if case == "unknown layer":
        return write_coo({"m/v": good, "zz/nope": SparseLayer(np.array([1.0], F32), np.array([0]), (4,))})
    if case == "wrong shape":
        return write_coo({"m/v": good, "l/w": SparseLayer(np.array([1.0], F32), np.array([0]), (3, 2))})
    if case == "lossy dtype":
        return write_coo({"m/v": good, "l/w": SparseLayer(np.array([1.0], np.complex64), np.array([0]), (2, 3))})
    if case == "out of bounds":
        payload = write_coo({"m/v": good, "l/w": SparseLayer(np.array([1.0], F32), np.array([0]), (2, 3))})
        payload[3] = np.array([[2, 0]], np.int64)  # row 2 of a 2-row layer
        return payload
    if case == "repeated entry":
        return write_coo({"m/v": good, "l/w": SparseLayer(np.array([1.0, 2.0], F32), np.array([4, 4]), (2, 3))})
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["unknown layer", "wrong shape", "lossy dtype", "out of bounds", "repeated entry"])
def test_sparse_bad_payload_changes_neither_model_nor_reference(case):
    exchanger = sparse_exchanger(0.5, error_feedback=True)
    model = exchanger.pull_parameters(coo_payload({"l/w": ([1], [10.0])}, SPARSE_SHAPES), sparse_model())
    model_before, reference_before = ref_flat(model), copies(exchanger.reference)
    with pytest.raises((KeyError, ValueError, TypeError)):
        exchanger.pull_parameters(_bad_sparse(case), model)
    assert_flat(ref_flat(model), model_before)
    assert_flat(exchanger.reference, reference_before)


# ---------------------------------------------------------------------------------------
# 5. Sparse: per-weight references, scores against them
# ---------------------------------------------------------------------------------------


def test_sparse_reference_is_updated_weight_by_weight():
    exchanger = sparse_exchanger(0.4, error_feedback=True)
    model = sparse_model()  # l/w [[1, 2, 3], [4, 5, 6]], m/v [1, 2, 3, 4]

    # first (partial) pull of l/w: entries 1 and 4 -> the reference is the whole layer after the pull
    model = exchanger.pull_parameters(coo_payload({"l/w": ([1, 4], [10.0, 20.0])}, SPARSE_SHAPES), model)
    after_first = np.array([[1, 10, 3], [4, 20, 6]], F32)
    assert_flat(ref_flat(model), {"l/w": after_first, "m/v": np.array([1, 2, 3, 4], F32)})
    assert_flat(exchanger.reference, {"l/w": after_first})

    # local training: every weight + 1 (the reference does not move)
    model = train(model, {"l/w": 1.0, "m/v": 1.0})  # l/w [[2, 11, 4], [5, 21, 7]], m/v [2, 3, 4, 5]
    assert_flat(exchanger.reference, {"l/w": after_first})

    # second pull of l/w: entries 0 and 4 -> only those reference entries are overwritten;
    # entry 1 keeps the 10 of the first pull (not the trained 11)
    model = exchanger.pull_parameters(coo_payload({"l/w": ([0, 4], [7.0, 8.0])}, SPARSE_SHAPES), model)
    assert_flat(ref_flat(model), {"l/w": np.array([[7, 11, 4], [5, 8, 7]], F32), "m/v": np.array([2, 3, 4, 5], F32)})
    reference_l = np.array([[7, 10, 3], [4, 8, 6]], F32)
    assert_flat(exchanger.reference, {"l/w": reference_l})

    # first (partial) pull of m/v: entry 2 -> the whole trained layer with that entry written
    model = exchanger.pull_parameters(coo_payload({"m/v": ([2], [0.5])}, SPARSE_SHAPES), model)
    assert_flat(exchanger.reference, {"l/w": reference_l, "m/v": np.array([2, 3, 0.5, 5], F32)}, ordered=False)

    # scores against the reference: l/w |[[7, 11, 4], [5, 8, 7]] - [[7, 10, 3], [4, 8, 6]]|
    # = [[0, 1, 1], [1, 0, 1]], m/v 0. Level 0.4 of 10 weights: k = 4, threshold 1 ->
    # l/w entries 1, 2, 3, 5 (values 11, 4, 5, 7); m/v nothing.
    current = ref_flat(model)
    against = {"l/w": reference_l, "m/v": np.array([2, 3, 0.5, 5], F32)}
    assert {n: f.tolist() for n, f in ref_sparse_pick(current, against, 0.4).items()} == {"l/w": [1, 2, 3, 5]}
    sent = unpack_coo(exchanger.push_parameters(model, nest_copies({n: v + 100 for n, v in current.items()})))
    assert list(sent) == ["l/w"]
    values, flat, shape = sent["l/w"]
    assert flat.tolist() == [1, 2, 3, 5] and shape == (2, 3)
    assert_identical(values, np.array([11, 4, 5, 7], F32))


def run_sparse_rounds(exchanger: SparseCooParameterExchanger, rounds: int = ROUNDS, raw: list | None = None):
    """Round 1: the full model; later rounds: the server sends back exactly the entries the
    client sent. Training: a/w += [3, 0, 0], b/w += 1.25. Returns the pushed payloads,
    unpacked (and appends them as sent to ``raw``)."""
    shapes = {"a/w": (3,), "b/w": (1,)}
    start = {"a/w": np.array([1.0, 2.0, 3.0], F32), "b/w": np.array([5.0], F32)}
    model = nest_copies({n: np.zeros_like(v) for n, v in start.items()})
    to_pull = coo_payload({n: (list(range(v.size)), v.tolist()) for n, v in start.items()}, shapes)
    delta = {"a/w": np.array([3.0, 0.0, 0.0], F32), "b/w": F32(1.25)}
    sent = []
    for _ in range(rounds):
        model = exchanger.pull_parameters(to_pull, model)
        initial = model
        model = train(model, delta)
        to_pull = exchanger.push_parameters(model, initial)
        sent.append(unpack_coo(to_pull))
        if raw is not None:
            raw.append(to_pull)
    return sent


def test_sparse_small_steady_weight_is_eventually_kept_with_feedback_only():
    # 4 weights, level 0.25: k = 1. Per round a/w[0] moves by 3, b/w[0] by 1.25.
    # Without feedback: scores 3 vs 1.25 every round -> a/w[0] only, b/w never.
    # With feedback (pulled back when sent):
    #   round 1: a 3, b 1.25 -> a     round 4: a 6 (last pulled at round 3's start), b 1.25 -> a
    #   round 2: a 3, b 2.5  -> a     round 5: a 3, b 2.5  -> a
    #   round 3: a 3, b 3.75 -> b     round 6: a 3, b 3.75 -> b
    plain = run_sparse_rounds(sparse_exchanger(0.25))
    feedback = run_sparse_rounds(sparse_exchanger(0.25, error_feedback=True))
    for r in range(1, ROUNDS + 1):
        values, flat, _ = plain[r - 1]["a/w"]
        assert list(plain[r - 1]) == ["a/w"] and flat.tolist() == [0], r
        assert_identical(values, np.array([1.0 + 3.0 * r], F32))  # a/w[0] = 1 + 3r
        if r in (3, 6):
            assert list(feedback[r - 1]) == ["b/w"], r
            values, flat, _ = feedback[r - 1]["b/w"]
            assert flat.tolist() == [0]
            assert_identical(values, np.array([5.0 + 1.25 * r], F32))  # 8.75, 12.5
        else:
            assert list(feedback[r - 1]) == ["a/w"], r
            values, flat, _ = feedback[r - 1]["a/w"]
            assert flat.tolist() == [0]
            assert_identical(values, np.array([1.0 + 3.0 * r], F32))


# ---------------------------------------------------------------------------------------
# 6. error_feedback=False is fl4health's behaviour
# ---------------------------------------------------------------------------------------


def test_dynamic_without_feedback_pushes_exactly_as_a_plain_exchanger():
    start = dynamic_start((1,))
    rule = LayerSelectionFunctionConstructor(1.0, 0.5, normalize=False).select_by_threshold()
    default = DynamicLayerExchanger(rule)
    assert default.error_feedback is False
    off = DynamicLayerExchanger(rule, error_feedback=False)
    payloads_default, _ = run_dynamic_rounds(default, start)
    payloads_off, _ = run_dynamic_rounds(off, start)
    for a, b in zip(payloads_default, payloads_off):
        assert_payloads_identical(a, b)
    assert len(off.reference) == 0 and len(default.reference) == 0
    # and what fl4health does: drift of the round only (0.4 for enc/slow, never > 1)
    assert all(list(unpack(p)) == ["enc/fast"] for p in payloads_off)

    # one round by hand, against a numpy reference measured from initial_model
    exchanger = DynamicLayerExchanger(rule, error_feedback=False)
    model = exchanger.pull_parameters(
        packed(FALLBACK_TRAINED), nest_copies({n: np.zeros_like(v) for n, v in FALLBACK_TRAINED.items()})
    )
    initial = {"p/a": np.array([6.0, 1.0], F32), "p/b": np.array([0.0, 0.0], F32), "q/c": np.array([0.0], F32)}
    sent = unpack(exchanger.push_parameters(model, nest_copies(initial)))
    assert list(sent) == ref_threshold_pick(FALLBACK_TRAINED, initial, 1.0) == ["p/a", "p/b"]
    assert len(exchanger.reference) == 0
    assert_payloads_identical(
        exchanger.push_parameters(model, nest_copies(initial)), pack_layers(*rule(model, nest_copies(initial)))
    )


def test_sparse_without_feedback_pushes_exactly_as_a_plain_exchanger():
    default = sparse_exchanger(0.25)
    assert default.error_feedback is False
    off = sparse_exchanger(0.25, error_feedback=False)
    raw_default, raw_off = [], []
    run_sparse_rounds(default, raw=raw_default)
    sent = run_sparse_rounds(off, raw=raw_off)
    for a, b in zip(raw_default, raw_off, strict=True):
        assert_payloads_identical(a, b)
    assert len(off.reference) == 0 and len(default.reference) == 0
    # fl4health's behaviour: scored from the round's start, a/w[0] (3 > 1.25) every round
    assert all(list(s) == ["a/w"] and s["a/w"][1].tolist() == [0] for s in sent)
    rng = np.random.default_rng(3)
    model = nest_copies({"l/w": rng.standard_normal((2, 3)).astype(F32), "m/v": rng.standard_normal(4).astype(F32)})
    initial = nest_copies({"l/w": rng.standard_normal((2, 3)).astype(F32), "m/v": rng.standard_normal(4).astype(F32)})
    off.pull_parameters(coo_payload({"l/w": ([0, 5], [1.0, 2.0])}, SPARSE_SHAPES), model)
    a = default.push_parameters(model, initial)
    b = off.push_parameters(model, initial)
    assert_payloads_identical(a, b)
    expected = ref_sparse_pick(ref_flat(model), ref_flat(initial), 0.25)
    assert {n: f.tolist() for n, (_, f, _) in unpack_coo(b).items()} == {n: f.tolist() for n, f in expected.items()}


@pytest.mark.parametrize("bad", [1, 0, "yes", None, 1.0, "True"])
def test_error_feedback_must_be_a_bool(bad):
    rule = LayerSelectionFunctionConstructor(1.0, 0.5).select_by_threshold()
    with pytest.raises(TypeError, match="error_feedback"):
        DynamicLayerExchanger(rule, error_feedback=bad)
    with pytest.raises(TypeError, match="error_feedback"):
        SparseCooParameterExchanger(0.5, largest_magnitude_change_scores, error_feedback=bad)


def test_error_feedback_accepts_numpy_bool():
    rule = LayerSelectionFunctionConstructor(1.0, 0.5).select_by_threshold()
    assert DynamicLayerExchanger(rule, error_feedback=np.bool_(True)).error_feedback is True
    assert SparseCooParameterExchanger(0.5, largest_magnitude_change_scores, np.bool_(False)).error_feedback is False


# ---------------------------------------------------------------------------------------
# 7. Restoring a saved reference
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        [("a/w", np.zeros(2, F32))],  # a list of pairs, not a mapping
        np.zeros(3, F32),
        None,
        "a/w",
        {"a/w": [1.0, 2.0]},  # values that are not arrays
        {"a/w": 1.0},
        {"a/w": "x"},
        {"a/w": np.zeros(2, F32), "b/w": None},
    ],
)
def test_reference_setter_rejects_what_is_not_a_name_to_array_mapping(bad):
    for exchanger in (threshold_exchanger(error_feedback=True), sparse_exchanger(0.5, error_feedback=True)):
        exchanger.reference = {"keep/me": np.ones(2, F32)}
        with pytest.raises(TypeError):
            exchanger.reference = bad
        assert_flat(exchanger.reference, {"keep/me": np.ones(2, F32)})


def test_reference_setter_copies_to_numpy_in_order():
    exchanger = threshold_exchanger(error_feedback=True)
    source = {
        "z/last": np.array([1.0, 2.0], F32),
        "a/first": jnp.array([3, 4], jnp.int32),
        "m/bf": np.array([0.5], BF16),
    }
    exchanger.reference = source
    assert isinstance(exchanger.reference, collections.OrderedDict)
    assert list(exchanger.reference) == ["z/last", "a/first", "m/bf"]
    for value in exchanger.reference.values():
        assert type(value) is np.ndarray
    expected = {
        "z/last": np.array([1.0, 2.0], F32),
        "a/first": np.array([3, 4], np.int32),
        "m/bf": np.array([0.5], BF16),
    }
    assert_flat(exchanger.reference, expected)
    source["z/last"][0] = 99.0  # a copy: the source's later changes do not reach it
    assert_flat(exchanger.reference, expected)


def test_reference_survives_savez_and_the_next_push_is_unchanged(tmp_path):
    start = dynamic_start((1,))
    start["head/count"] = np.array([3, -2], np.int32)
    saved_exchanger = threshold_exchanger(error_feedback=True)
    other_exchanger = threshold_exchanger(error_feedback=True)
    # two rounds: enc/slow has accumulated 0.8 since its round-1 pull
    run_dynamic_rounds(saved_exchanger, start, rounds=2)
    _, model = run_dynamic_rounds(other_exchanger, start, rounds=2)

    path = tmp_path / "reference.npz"
    np.savez(path, **saved_exchanger.reference)
    restored = threshold_exchanger(error_feedback=True)
    restored.reference = dict(np.load(path))
    assert_flat(restored.reference, saved_exchanger.reference)  # names with "/", order, dtype, bits

    # round 3 for both: pull what round 2 sent (enc/fast), train, push: enc/slow at 1.2 > 1
    pulled = {"enc/fast": np.full((2, 2), 7.0, F32)}
    model_a = other_exchanger.pull_parameters(packed(pulled), model)
    model_b = restored.pull_parameters(packed(pulled), model)
    trained_a, trained_b = train(model_a, DYNAMIC_DELTA), train(model_b, DYNAMIC_DELTA)
    a = other_exchanger.push_parameters(trained_a, model_a)
    b = restored.push_parameters(trained_b, model_b)
    assert_payloads_identical(b, a)
    assert list(unpack(b)) == ["enc/fast", "enc/slow"]


def test_bf16_reference_survives_savez_and_the_next_push_is_unchanged(tmp_path):
    # The documented recipe (numpy.savez / dict(numpy.load)) with a bfloat16 layer.
    # l2, threshold 1.0: w pulled at [1, 2], trained to [2.5, 2] -> drift 1.5 > 1 (sent).
    exchanger = threshold_exchanger(error_feedback=True)
    model = nest_copies({"m/w": np.array([0.0, 0.0], BF16)})
    model = exchanger.pull_parameters(packed({"m/w": np.array([1.0, 2.0], BF16)}), model)
    path = tmp_path / "reference.npz"
    np.savez(path, **exchanger.reference)
    restored = threshold_exchanger(error_feedback=True)
    restored.reference = dict(np.load(path))
    trained = nest_copies({"m/w": np.array([2.5, 2.0], BF16)})
    expected = exchanger.push_parameters(trained, model)
    assert list(unpack(expected)) == ["m/w"]
    assert_payloads_identical(restored.push_parameters(trained, model), expected)


# ---------------------------------------------------------------------------------------
# 8. Flower: the reference survives the client being rebuilt for each message
# ---------------------------------------------------------------------------------------

try:
    from flwr.app import Context, RecordDict
    from flwr.common import Code, FitIns, ndarrays_to_parameters, parameters_to_ndarrays

    from jaxlayerx.flower import ExchangerClient, stateful_client_fn
except ImportError:  # pragma: no cover - without the flower extra only these tests skip
    HAS_FLOWER = False
else:
    HAS_FLOWER = True

needs_flower = pytest.mark.skipif(not HAS_FLOWER, reason="needs flwr (the flower extra)")

FLOWER_START = {"enc/fast": np.zeros((2, 2), F32), "enc/slow": np.zeros(1, F32), "head/still": np.zeros(2, F32)}
FLOWER_DELTA = {"enc/fast": F32(3.0), "enc/slow": F32(0.6)}
SERVER_FULL = {
    "enc/fast": np.array([[1.0, 2.0], [3.0, 4.0]], F32),
    "enc/slow": np.array([10.0], F32),
    "head/still": np.array([-1.0, 1.0], F32),
}
SERVER_FAST = np.full((2, 2), 20.0, F32)


def flower_train_fn(model, config):
    return train(model, FLOWER_DELTA), 5, {}


def new_context() -> Context:
    return Context(run_id=0, node_id=7, node_config={}, state=RecordDict(), run_config={})


def fit(client_fn, context, layers):
    result = client_fn(context).fit(FitIns(ndarrays_to_parameters(packed(layers)), {}))
    assert result.status.code == Code.OK
    return parameters_to_ndarrays(result.parameters)


def reference_record(context: Context) -> dict[str, np.ndarray]:
    record = context.state["jaxlayerx.reference"]
    return {name: record[name].numpy() for name in record.keys()}


@needs_flower
def test_stateful_client_keeps_the_reference_between_rebuilt_clients():
    built = []

    def make_client(context):
        client = ExchangerClient(
            nest_copies(FLOWER_START), threshold_exchanger(1.0, error_feedback=True), flower_train_fn
        )
        built.append(client)
        return client

    client_fn = stateful_client_fn(make_client)
    context = new_context()

    # fit 1: the full model; enc/slow moves 0.6 (not > 1), enc/fast 3 per element (6) -> fast only
    sent1 = fit(client_fn, context, SERVER_FULL)
    assert list(unpack(sent1)) == ["enc/fast"]
    # the saved reference: exactly the pulled (server) values, not the trained ones
    assert_flat(reference_record(context), SERVER_FULL, ordered=False)

    # fit 2: a rebuilt client; the server sends enc/fast only. enc/slow's drift since its
    # fit-1 pull: 10 + 0.6 + 0.6 - 10 = 1.2 > 1 -> sent with fast.
    sent2 = fit(client_fn, context, {"enc/fast": SERVER_FAST})
    assert len(built) == 2 and built[0] is not built[1] and built[0].exchanger is not built[1].exchanger
    got = unpack(sent2)
    assert list(got) == ["enc/fast", "enc/slow"]
    assert_identical(got["enc/fast"], SERVER_FAST + F32(3.0))
    assert_identical(got["enc/slow"], np.array([10.0], F32) + F32(0.6) + F32(0.6))
    assert_flat(reference_record(context), dict(SERVER_FULL, **{"enc/fast": SERVER_FAST}), ordered=False)

    # the same two messages to one client that is never rebuilt: the same payloads
    lone = ExchangerClient(nest_copies(FLOWER_START), threshold_exchanger(1.0, error_feedback=True), flower_train_fn)
    lone1, _, _ = lone.fit(packed(SERVER_FULL), {})
    lone2, _, _ = lone.fit(packed({"enc/fast": SERVER_FAST}), {})
    assert_payloads_identical(sent1, lone1)
    assert_payloads_identical(sent2, lone2)


@needs_flower
def test_stateful_client_without_feedback_saves_no_reference():
    def make_client(context):
        return ExchangerClient(nest_copies(FLOWER_START), threshold_exchanger(1.0), flower_train_fn)

    client_fn = stateful_client_fn(make_client)
    context = new_context()
    fit(client_fn, context, SERVER_FULL)
    assert "jaxlayerx.reference" not in context.state
    # fit 2: enc/slow measured from the round's start only: 0.6, not sent
    assert list(unpack(fit(client_fn, context, {"enc/fast": SERVER_FAST}))) == ["enc/fast"]


@needs_flower
def test_stateful_client_keeps_a_bf16_reference():
    # l2, threshold 1.0. m/w (bf16) pulled at [1, 2] in fit 1 and moved by 0.75 per fit:
    # fit 1 drift 0.75 (not sent), fit 2 drift 1.5 > 1 (sent), measured against the
    # restored bf16 reference.
    start = {"m/w": np.zeros(2, BF16), "n/v": np.zeros(1, F32)}
    server = {"m/w": np.array([1.0, 2.0], BF16), "n/v": np.array([0.0], F32)}

    def train_fn(model, config):
        return train(model, {"m/w": np.array([0.75, 0.0], BF16)}), 1, {}

    client_fn = stateful_client_fn(
        lambda context: ExchangerClient(nest_copies(start), threshold_exchanger(1.0, error_feedback=True), train_fn)
    )
    context = new_context()
    assert list(unpack(fit(client_fn, context, server))) == []
    sent = unpack(fit(client_fn, context, {}))
    assert list(sent) == ["m/w"]
    # Flower's serialization carries bfloat16 as raw |V2 bytes: read them back as bfloat16.
    assert sent["m/w"].dtype == np.dtype("V2")
    assert_identical(sent["m/w"].view(BF16), np.array([2.5, 2.0], BF16))  # 1 + 0.75 + 0.75, 2


# ---------------------------------------------------------------------------------------
# 9. Property: the dynamic exchanger with feedback is the accumulate-until-sent process
# ---------------------------------------------------------------------------------------


@st.composite
def feedback_cases(draw):
    n_layers = draw(st.integers(1, 5))
    shapes = [tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))) for _ in range(n_layers)]
    names = [f"layer{i}/w" for i in range(n_layers)]

    def int_array(shape, low, high):
        size = math.prod(shape)
        return np.array(draw(st.lists(st.integers(low, high), min_size=size, max_size=size)), F32).reshape(shape)

    start = {name: int_array(shape, -3, 3) for name, shape in zip(names, shapes)}
    n_rounds = draw(st.integers(3, 5))
    deltas = [{name: int_array(shape, -2, 2) for name, shape in zip(names, shapes)} for _ in range(n_rounds)]
    offsets = [draw(st.integers(-1, 1)) for _ in range(n_rounds)]  # the server's change to what it sends back
    full_first = draw(st.booleans())
    # thresholds whose squares are not integers: never tied with an L2 norm of integers
    threshold = draw(st.sampled_from([0.5, 1.5, 2.5, 3.5]))
    return start, deltas, offsets, full_first, threshold


@settings(max_examples=30, deadline=None)
@given(case=feedback_cases())
def test_dynamic_feedback_matches_the_accumulate_until_sent_process(case):
    start, deltas, offsets, full_first, threshold = case
    exchanger = threshold_exchanger(threshold, error_feedback=True, normalize=False)

    model = nest_copies(start)  # the library's model
    current = copies(start)  # the numpy process
    pulled: dict[str, np.ndarray] = {}  # name -> value at its last pull
    to_pull = copies(start) if full_first else {}
    for r, (delta, offset) in enumerate(zip(deltas, offsets)):
        model = exchanger.pull_parameters(packed(to_pull), model)
        for name, value in to_pull.items():
            current[name] = value.copy()
            pulled[name] = value.copy()
        assert_flat(ref_flat(model), current)
        assert_flat(exchanger.reference, pulled, ordered=False)

        initial, round_start = model, copies(current)
        model = train(model, delta)
        current = {name: current[name] + delta[name] for name in current}
        against = {name: pulled.get(name, round_start[name]) for name in current}
        expected = ref_threshold_pick(current, against, threshold)

        sent = unpack(exchanger.push_parameters(model, initial))
        assert list(sent) == expected, (r, {n: ref_l2(current[n], against[n]) for n in current})
        for name in expected:
            assert_identical(sent[name], current[name], name)
        # the server sends back what it got, moved by its offset (its average with others)
        to_pull = {name: value + F32(offset) for name, value in sent.items()}
