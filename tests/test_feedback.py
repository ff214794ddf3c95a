"""Tests of the exchangers' explicit state (jaxlayerx/state.py): error feedback for the
dynamic and sparse exchangers, quantized uploads (jaxlayerx/quantize.py) and the error
feedback that carries their loss, saving and restoring a state, and the Flower client
persisting it.

Every expectation comes from the small plain-numpy references below, or from hand-computed
values with the arithmetic in a comment, never from the library itself:

* ``ref_flat`` / ``nest``: a flat ``name -> numpy copy`` view of nested dicts (sorted keys,
  JAX's dict order) and back;
* ``ref_l2``: the L2 norm of ``current - reference`` in float64, ``/ size`` when normalized;
* ``ref_threshold_pick``: the layers whose drift is ``> threshold``, in flatten order;
* ``ref_sparse_pick``: ``|w - w0|`` scores, the ``ceil(total * level)``-th largest as the
  threshold, weights scoring ``>=`` it kept (layers whose kept values are all zero dropped);
* ``ref_quantize`` / ``ref_dequantize``: the quantizer as jaxlayerx/quantize.py's docstring
  describes it (bfloat16 round to nearest even; int8 ``scale = max|u| / 127`` over the sent
  entries, ``q = round_half_even(u * (1 / scale))`` clipped to [-127, 127]);
* ``RefExchange``: the state as jaxlayerx/state.py describes it: the reference seeded whole
  from the first model pulled, then written entry by entry by each pull (a layer never
  pulled again keeps its seed); the residual carried by error feedback with quantization.

Simulated rounds: the client pulls what the "server" sends (the full model first, then
what the client sent the round before), snapshots the model as ``initial_model``, trains
(adds a fixed delta) and pushes.
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import nest, ref_compact_decode, ref_flat
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxlayerx import (
    DynamicLayerExchanger,
    Entries,
    ExchangeState,
    FixedLayerExchanger,
    FullParameterExchanger,
    LayerExchangerWithExclusions,
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


def whole(layers: Mapping[str, Any]) -> collections.OrderedDict[str, Entries]:
    """A wire-neutral payload of whole layers, by hand: every value in row-major order."""
    return collections.OrderedDict(
        (name, Entries(np.asarray(value).reshape(-1), None, tuple(np.shape(value)))) for name, value in layers.items()
    )


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


def assert_state(
    state: ExchangeState,
    reference: Mapping[str, Any],
    residual: Mapping[str, Any] | None = None,
    ordered: bool = False,
) -> None:
    """``state`` holds exactly ``reference`` and ``residual`` (none when ``None``), as numpy arrays."""
    assert isinstance(state, ExchangeState)
    assert isinstance(state.reference, collections.OrderedDict)
    assert_flat(state.reference, reference, ordered)
    assert_flat(state.residual, {} if residual is None else residual, ordered)
    for name, value in [*state.reference.items(), *state.residual.items()]:
        assert type(value) is np.ndarray, name


def assert_payloads_identical(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_identical(a, b, f"payload[{i}]")


def assert_entries_identical(got: Mapping[str, Entries], want: Mapping[str, Entries]) -> None:
    """Two wire-neutral payloads alike, name for name, field for field, bit for bit."""
    assert list(got) == list(want)
    for name, expected in want.items():
        entries = got[name]
        assert_identical(entries.values, expected.values, f"{name} values")
        if expected.indices is None:
            assert entries.indices is None, name
        else:
            assert_identical(entries.indices, expected.indices, f"{name} indices")
        assert tuple(entries.shape) == tuple(expected.shape), name
        assert entries.quantized == expected.quantized, name
        assert_identical(np.float32(entries.scale), np.float32(expected.scale), f"{name} scale")


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


def ref_quantize(update: Any, sent: Any, mode: str) -> tuple[np.ndarray, np.float32]:
    """``(q, scale)`` of a float32 ``update`` over the entries ``sent`` marks (unsent ones
    quantize to 0 and do not enter the scale), as jaxlayerx/quantize.py's docstring says."""
    update = np.asarray(update, F32)
    u = np.where(np.broadcast_to(np.asarray(sent, bool), update.shape), update, F32(0)).astype(F32)
    if mode == "bf16":
        return u.astype(BF16), F32(1)  # round to nearest even (ml_dtypes)
    scale = F32(np.max(np.abs(u), initial=F32(0))) / F32(127)
    with np.errstate(divide="ignore"):
        inverse = F32(1) / scale
    if not np.isfinite(inverse):
        inverse = F32(0)  # a layer whose largest update is 0 sends zeros
    q = np.clip(np.rint(u * inverse), -127, 127).astype(np.int8)  # rint: ties to even
    return q, F32(scale)


def ref_dequantize(q: np.ndarray, scale: Any) -> np.ndarray:
    if q.dtype == np.int8:
        return q.astype(F32) * F32(scale)
    return q.astype(F32)


def ref_lost(update: Any, q: np.ndarray, scale: Any) -> np.ndarray:
    """What quantization lost of ``update``: ``update - q * scale`` computed exactly and
    rounded once to float32. (float64 holds it exactly: an int8 times a float32 needs 32
    bits. Under jit XLA fuses the multiply and the subtraction, so the library's residual
    is this correctly rounded value, not ``update - float32(q * scale)``.)"""
    exact = q.astype(np.float64) * np.float64(F32(scale))
    return (np.asarray(update, F32).astype(np.float64) - exact).astype(F32)


def threshold_exchanger(
    threshold: float = 1.0, error_feedback: bool = False, quantize: str | None = None, **kwargs: Any
) -> DynamicLayerExchanger:
    """The threshold rule; plain L2 drift (normalize=False) unless told otherwise."""
    kwargs.setdefault("normalize", False)
    rule = LayerSelectionFunctionConstructor(threshold, 0.5, **kwargs).select_by_threshold()
    return DynamicLayerExchanger(rule, error_feedback=error_feedback, quantize=quantize)


def sparse_exchanger(
    level: float, error_feedback: bool = False, quantize: str | None = None
) -> SparseCooParameterExchanger:
    return SparseCooParameterExchanger(
        level, largest_magnitude_change_scores, error_feedback=error_feedback, quantize=quantize
    )


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

    # the state: the last pull was at the start of round 6, of round 5's payload
    # (enc/fast = 1 + 3*5 = 16, and enc/slow too when round 5 sent it); the rest come
    # from their last pull before that (head/still: the round-1 seed). No quantization:
    # no residual.
    last_slow_sent = max(r for r in spec["sent_rounds"] if r <= ROUNDS - 1)
    slow_ref = np.zeros(spec["slow_shape"], F32)
    for _ in range(last_slow_sent):
        slow_ref = slow_ref + F32(0.4)
    assert_state(
        feedback_exchanger.state,
        {"enc/fast": np.full((2, 2), 16.0, F32), "enc/slow": slow_ref, "head/still": start["head/still"]},
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
# 2. The state after a pull: seeded whole by the first, then exactly the pulled entries
# ---------------------------------------------------------------------------------------


def mixed_model() -> dict[str, Any]:
    return nest_copies(
        {
            "a/bf": np.array([1.0, -2.0, 0.5], BF16),
            "a/int": np.array([[1, 2], [3, 4]], np.int32),
            "b/f": np.array([0.25, 0.5], F32),
        }
    )


def test_state_is_seeded_whole_by_the_first_pull_then_follows_exactly_the_pulled_layers():
    exchanger = threshold_exchanger(error_feedback=True)
    assert exchanger.state == ExchangeState() and not exchanger.state.seeded
    assert exchanger.init_state() == ExchangeState()
    assert len(exchanger.state.reference) == 0 and len(exchanger.state.residual) == 0
    model = mixed_model()

    # the first pull carries a/int and a/bf only; the reference is seeded from the WHOLE
    # model after it: b/f, not pulled, at its local value. Flatten order; no residual
    # (error feedback without quantization).
    bf = np.array([3.0, 0.0078125, -0.0], BF16)
    ints16 = np.array([[7, -8], [9, 10]], np.int16)  # lossless upcast into the int32 layer
    payload = packed({"a/int": ints16, "a/bf": bf})
    model = exchanger.pull_parameters(payload, model)
    expected_ref = {
        "a/bf": bf.copy(),
        "a/int": np.array([[7, -8], [9, 10]], np.int32),
        "b/f": np.array([0.25, 0.5], F32),
    }
    assert exchanger.state.seeded
    assert_state(exchanger.state, expected_ref, ordered=True)
    assert_flat(ref_flat(model), expected_ref)

    # the reference holds copies: changing the payload's arrays afterwards changes nothing
    ints16[...] = 0
    payload[1][...] = 0
    assert_state(exchanger.state, expected_ref)

    # a float16 payload into the float32 layer: the reference is in the model's dtype
    model = exchanger.pull_parameters(packed({"b/f": np.array([1.5, -3.0], np.float16)}), model)
    expected_ref["b/f"] = np.array([1.5, -3.0], F32)
    assert_state(exchanger.state, expected_ref)

    # a later pull of one layer moves only that layer's reference
    bf2 = np.array([-1.0, 2.0, 4.0], BF16)
    model = exchanger.pull_parameters(packed({"a/bf": bf2}), model)
    expected_ref["a/bf"] = bf2
    assert_state(exchanger.state, expected_ref, ordered=True)

    # an empty payload moves nothing
    model = exchanger.pull_parameters(packed({}), model)
    assert_state(exchanger.state, expected_ref)

    # training (a new tree) leaves the reference where the pulls put it
    train(model, {"a/bf": 1, "a/int": 1, "b/f": 1})
    assert_state(exchanger.state, expected_ref)

    # the reference is a snapshot: writing into the pulled model's numpy leaves in place
    # does not reach it
    for leaf in (model["a"]["bf"], model["a"]["int"], model["b"]["f"]):
        assert isinstance(leaf, np.ndarray)
        leaf[...] = 0
    assert_state(exchanger.state, expected_ref)


def test_explicit_pull_returns_a_new_state_and_leaves_the_one_given_alone():
    # optax-style: pull(payload, model, state) -> (model, state); the state passed in is
    # never changed, and the fl4health shells' own state is not touched.
    exchanger = threshold_exchanger(error_feedback=True)
    state0 = exchanger.init_state()
    model0 = mixed_model()
    model1, state1 = exchanger.pull(whole({"b/f": np.array([4.0, 5.0], F32)}), model0, state0)
    assert state0 == ExchangeState()
    seeded = {
        "a/bf": np.array([1.0, -2.0, 0.5], BF16),
        "a/int": np.array([[1, 2], [3, 4]], np.int32),
        "b/f": np.array([4.0, 5.0], F32),
    }
    assert_state(state1, seeded, ordered=True)
    assert_flat(ref_flat(model1), seeded)
    assert_identical(ref_flat(model0)["b/f"], np.array([0.25, 0.5], F32))  # a pytree is never mutated

    model2, state2 = exchanger.pull(whole({"a/int": np.array([[0, 0], [0, 9]], np.int32)}), model1, state1)
    assert_state(state1, seeded)  # unchanged by the second pull
    assert_state(state2, dict(seeded, **{"a/int": np.array([[0, 0], [0, 9]], np.int32)}))
    assert exchanger.state == ExchangeState()  # the shells' state: never pulled through them


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
    assert_state(exchanger.state, pulled)  # pushing moves no reference


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
    # seeded whole: inner/w, not pulled, at the module's value
    expected = dict(pulled, **{"inner/w": np.array([[1.0, 2.0], [3.0, 4.0]], F32)})
    assert_state(exchanger.state, expected)
    # in-place training of the module does not reach the reference
    set_nnx_layer(module, "inner/h", jnp.array([5.0, 5.0], BF16))
    set_nnx_layer(module, "inner/w", jnp.zeros((2, 2), jnp.float32))
    set_nnx_layer(module, "steps", jnp.array([0, 0, 0], jnp.int32))
    assert_state(exchanger.state, expected)


# ---------------------------------------------------------------------------------------
# 3. A layer never pulled keeps its seed: its drift accumulates across rounds
# ---------------------------------------------------------------------------------------

FALLBACK_TRAINED = {"p/a": np.array([1.5, 1.0], F32), "p/b": np.array([3.0, 0.0], F32), "q/c": np.array([0.5], F32)}
FALLBACK_PULLED_A = np.array([1.0, 1.0], F32)
# the first pull (of p/a alone, into a zero model) seeds every layer
FALLBACK_SEED = {"p/a": FALLBACK_PULLED_A, "p/b": np.zeros(2, F32), "q/c": np.zeros(1, F32)}


def fallback_setup(exchanger):
    model = nest_copies({"p/a": np.zeros(2, F32), "p/b": np.zeros(2, F32), "q/c": np.zeros(1, F32)})
    exchanger.pull_parameters(packed({"p/a": FALLBACK_PULLED_A}), model)
    assert_state(exchanger.state, FALLBACK_SEED)
    return nest_copies(FALLBACK_TRAINED)


@pytest.mark.parametrize(
    "initial",
    [
        {"p/a": [6.0, 1.0], "p/b": [0.0, 0.0], "q/c": [0.0]},
        # an initial_model that would pick q/c (1.5) and not p/b (0.5)
        {"p/a": [6.0, 1.0], "p/b": [2.5, 0.0], "q/c": [-1.0]},
    ],
)
def test_dynamic_feedback_measures_every_layer_from_the_state_not_initial_model(initial):
    # Against the seed: p/a |[0.5, 0]| = 0.5, p/b |[3, 0]| = 3 > 1, q/c 0.5 -> p/b only,
    # whatever initial_model says (old behaviour: unpulled layers fell back to it).
    initial = {name: np.asarray(value, F32) for name, value in initial.items()}
    exchanger = threshold_exchanger(error_feedback=True)
    trained = fallback_setup(exchanger)
    assert ref_threshold_pick(FALLBACK_TRAINED, FALLBACK_SEED, 1.0) == ["p/b"]
    sent = unpack(exchanger.push_parameters(trained, nest_copies(initial)))
    assert list(sent) == ["p/b"]
    assert_identical(sent["p/b"], FALLBACK_TRAINED["p/b"])
    assert_state(exchanger.state, FALLBACK_SEED)  # the push seeds nothing again

    # fl4health's select_parameters keeps no state: it measures from initial_model
    against_initial = ref_threshold_pick(FALLBACK_TRAINED, initial, 1.0)
    assert against_initial in (["p/a", "p/b"], ["p/a", "q/c"])
    _, names = exchanger.select_parameters(trained, nest_copies(initial))
    assert names == against_initial

    # without feedback, every layer is measured from initial_model (p/a: 4.5 > 1)
    plain = unpack(threshold_exchanger().push_parameters(trained, nest_copies(initial)))
    assert list(plain) == against_initial


def test_dynamic_layer_never_pulled_again_keeps_accumulating_drift():
    # p/a moves by 3 per element per round (sent, and pulled back, every round); q/c moves
    # by 0.4 per round and the server never sends it back. Its reference stays the round-1
    # seed (0), so its drift accumulates: 0.4, 0.8, 1.2 > 1 (round 3), 1.6, 2.0, 2.4 ->
    # sent from round 3 on. Without feedback (and with the old reset of unpulled layers to
    # each round's initial_model) the drift is 0.4 every round: never sent.
    start = {"p/a": np.zeros(2, F32), "q/c": np.zeros(1, F32)}
    delta = {"p/a": F32(3.0), "q/c": F32(0.4)}
    sent = {}
    for feedback in (False, True):
        exchanger = threshold_exchanger(1.0, error_feedback=feedback)
        model = nest_copies(start)
        to_pull = dict(start)
        sent[feedback] = []
        for _ in range(6):
            model = exchanger.pull_parameters(packed(to_pull), model)
            initial = model
            model = train(model, delta)
            pushed = unpack(exchanger.push_parameters(model, initial))
            sent[feedback].append(pushed)
            to_pull = {"p/a": pushed["p/a"]}  # the server answers p/a only
        if feedback:
            assert_state(exchanger.state, {"p/a": np.full(2, 15.0, F32), "q/c": np.zeros(1, F32)})
        else:
            assert exchanger.state == ExchangeState()
    assert [list(p) for p in sent[False]] == [["p/a"]] * 6
    assert [list(p) for p in sent[True]] == [["p/a"]] * 2 + [["p/a", "q/c"]] * 4
    q = np.zeros(1, F32)
    for r, pushed in enumerate(sent[True], start=1):
        q = q + F32(0.4)
        if r >= 3:
            assert_identical(pushed["q/c"], q, f"round {r}")


def test_dynamic_after_a_partial_first_pull_needs_no_initial_model():
    # The first pull seeded every layer: pushing without initial_model measures from it.
    exchanger = threshold_exchanger(error_feedback=True)
    trained = fallback_setup(exchanger)
    assert list(unpack(exchanger.push_parameters(trained))) == ["p/b"]
    # fl4health's select_parameters keeps no state: it still needs initial_model
    with pytest.raises(ValueError, match="initial_model"):
        exchanger.select_parameters(trained, None)
    assert_state(exchanger.state, FALLBACK_SEED)

    # p/b and q/c pulled: p/b [3, 0] - [0, 0] -> 3 (sent); q/c [0.5] - [0.25] -> 0.25; p/a 0.5
    exchanger.pull_parameters(packed({"p/b": np.zeros(2, F32), "q/c": np.array([0.25], F32)}), trained)
    assert list(unpack(exchanger.push_parameters(trained))) == ["p/b"]
    assert_state(exchanger.state, {"p/a": FALLBACK_PULLED_A, "p/b": np.zeros(2, F32), "q/c": np.array([0.25], F32)})


def test_pushing_before_any_pull_seeds_the_state_from_initial_model():
    exchanger = threshold_exchanger(error_feedback=True)
    initial = {"p/a": np.array([1.5, 0.0], F32), "p/b": np.array([0.0, 0.0], F32), "q/c": np.array([2.0], F32)}
    trained = nest_copies(FALLBACK_TRAINED)
    # against initial: p/a |[0, 1]| = 1 (not > 1), p/b 3, q/c 1.5 -> p/b, q/c
    expected = ref_threshold_pick(FALLBACK_TRAINED, initial, 1.0)
    assert expected == ["p/b", "q/c"]
    source = nest_copies(initial)
    payload, state = exchanger.push(trained, exchanger.init_state(), source)
    assert list(payload) == expected
    for name in expected:
        assert_identical(payload[name].layer(), FALLBACK_TRAINED[name], name)
    assert_state(state, initial, ordered=True)
    source["q"]["c"][...] = 99.0  # the seed is a copy
    assert_state(state, initial)

    # the next push measures from that seed, not from another round's initial_model
    other = nest_copies({"p/a": np.zeros(2, F32), "p/b": np.array([3.0, 0.0], F32), "q/c": np.zeros(1, F32)})
    payload, state = exchanger.push(trained, state, other)
    assert list(payload) == expected
    assert_state(state, initial)

    # the shells seed their own state the same way
    assert list(unpack(exchanger.push_parameters(trained, nest_copies(initial)))) == expected
    assert_state(exchanger.state, initial)


def test_nothing_pulled_and_no_initial_model_is_a_value_error():
    trained = nest_copies(FALLBACK_TRAINED)
    for make in (threshold_exchanger, lambda error_feedback: sparse_exchanger(0.5, error_feedback)):
        with pytest.raises(ValueError, match="needs initial_model"):
            make(error_feedback=False).push_parameters(trained)
        exchanger = make(error_feedback=True)
        with pytest.raises(ValueError, match=r"pull the server's model first, or pass initial_model"):
            exchanger.push_parameters(trained)
        assert exchanger.state == ExchangeState()
        with pytest.raises(ValueError, match="initial_model"):
            exchanger.push(trained, exchanger.init_state())


def test_sparse_unpulled_weights_are_scored_against_the_seed():
    # The first pull writes u/x = [1, 1, 1] into a model whose v/y is [0, 0.5]: the seed.
    # u/x trained to [1, 4, 1] scores [0, 3, 0] against it; v/y trained to [2, 2] scores
    # [2, 1.5]. Level 0.4 of 5 weights: k = ceil(2.0) = 2, scores sorted 3, 2, 1.5, 0, 0
    # -> threshold 2: u/x[1] and v/y[0], whatever initial_model says.
    exchanger = sparse_exchanger(0.4, error_feedback=True)
    model = nest_copies({"u/x": np.zeros(3, F32), "v/y": np.array([0.0, 0.5], F32)})
    exchanger.pull_parameters(coo_payload({"u/x": ([0, 1, 2], [1.0, 1.0, 1.0])}, {"u/x": (3,)}), model)
    seed = {"u/x": np.ones(3, F32), "v/y": np.array([0.0, 0.5], F32)}
    assert_state(exchanger.state, seed, ordered=True)
    trained = {"u/x": np.array([1.0, 4.0, 1.0], F32), "v/y": np.array([2.0, 2.0], F32)}
    initial = {"u/x": np.full(3, 5.0, F32), "v/y": np.array([9.0, 9.0], F32)}
    expected = ref_sparse_pick(trained, seed, 0.4)
    assert {n: f.tolist() for n, f in expected.items()} == {"u/x": [1], "v/y": [0]}
    for given_initial in (nest_copies(initial), None):
        got = unpack_coo(exchanger.push_parameters(nest_copies(trained), given_initial))
        assert {n: f.tolist() for n, (_, f, _) in got.items()} == {"u/x": [1], "v/y": [0]}
        assert_identical(got["u/x"][0], np.array([4.0], F32))
        assert_identical(got["v/y"][0], np.array([2.0], F32))
    # fl4health's select_parameters keeps no state: it needs initial_model
    with pytest.raises(ValueError, match="initial_model"):
        exchanger.select_parameters(nest_copies(trained))


# ---------------------------------------------------------------------------------------
# 4. A bad payload changes neither the model nor the state
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
def test_dynamic_bad_payload_changes_neither_model_nor_state(case):
    layers, error = BAD_DYNAMIC[case]
    exchanger = threshold_exchanger(error_feedback=True)
    model = exchanger.pull_parameters(packed({"a/int": np.array([[5, 6], [7, 8]], np.int32)}), mixed_model())
    model_before, reference_before = ref_flat(model), copies(exchanger.state.reference)
    with pytest.raises(error):
        exchanger.pull_parameters(packed(layers), model)
    assert_flat(ref_flat(model), model_before)
    assert_state(exchanger.state, reference_before)

    # a malformed layout (two names, one array) also changes nothing
    with pytest.raises(ValueError):
        exchanger.pull_parameters([GOOD_B, np.array(["b/f", "a/bf"])], model)
    assert_state(exchanger.state, reference_before)

    # the same payload through the explicit API: the state given stays as it was
    state = exchanger.state
    with pytest.raises(error):
        exchanger.pull(whole(layers), model, state)
    assert_flat(ref_flat(model), model_before)
    assert_state(state, reference_before)


def test_a_bad_first_payload_leaves_the_state_unseeded():
    exchanger = threshold_exchanger(error_feedback=True)
    model = mixed_model()
    with pytest.raises(KeyError, match="zz/nope"):
        exchanger.pull_parameters(packed({"b/f": GOOD_B, "zz/nope": np.zeros(2, F32)}), model)
    assert exchanger.state == ExchangeState()
    assert_identical(ref_flat(model)["b/f"], np.array([0.25, 0.5], F32))


def test_dynamic_bad_payload_leaves_an_nnx_module_and_state_alone():
    module = TinyNNX()
    exchanger = threshold_exchanger(error_feedback=True)
    exchanger.pull_parameters(packed({"steps": np.array([4, 5, 6], np.int32)}), module)
    model_before, reference_before = ref_flat(module), copies(exchanger.state.reference)
    bad = {"inner/w": np.zeros((2, 2), F32), "steps": np.zeros(3, F32)}  # first valid, second lossy
    with pytest.raises(TypeError):
        exchanger.pull_parameters(packed(bad), module)
    assert_flat(ref_flat(module), model_before)
    assert_state(exchanger.state, reference_before)


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
def test_sparse_bad_payload_changes_neither_model_nor_state(case):
    exchanger = sparse_exchanger(0.5, error_feedback=True)
    model = exchanger.pull_parameters(coo_payload({"l/w": ([1], [10.0])}, SPARSE_SHAPES), sparse_model())
    model_before, reference_before = ref_flat(model), copies(exchanger.state.reference)
    with pytest.raises((KeyError, ValueError, TypeError)):
        exchanger.pull_parameters(_bad_sparse(case), model)
    assert_flat(ref_flat(model), model_before)
    assert_state(exchanger.state, reference_before)


def quantized_feedback_setup(quantize: str):
    """An int8/bf16 error-feedback exchanger after one pull and one push: a state with a
    nonzero residual (b/f moved by [0.3, 0.7]: l2 0.76 > 0.5, sent)."""
    exchanger = threshold_exchanger(0.5, error_feedback=True, quantize=quantize)
    model = exchanger.pull_parameters(
        packed({"b/f": np.array([1.0, 2.0], F32), "c/g": np.array([0.5, 0.5, 0.5], F32)}),
        nest_copies({"b/f": np.zeros(2, F32), "c/g": np.zeros(3, F32)}),
    )
    trained = train(model, {"b/f": np.array([0.3, 0.7], F32)})
    payload, state = exchanger.push(trained, exchanger.state, model)
    assert list(payload) == ["b/f"]
    assert np.any(state.residual["b/f"] != 0)
    return exchanger, trained, state


BAD_QUANTIZED = {
    "unknown layer": (whole({"b/f": GOOD_B, "zz/nope": np.zeros(2, F32)}), KeyError),
    "wrong shape": (whole({"b/f": GOOD_B, "c/g": np.zeros(4, F32)}), ValueError),
    "lossy complex": (whole({"b/f": GOOD_B, "c/g": np.zeros(3, np.complex64)}), TypeError),
    # a quantized update is rebuilt by a server over its base, never pulled into a model
    "quantized update": (
        collections.OrderedDict(
            [("b/f", whole({"b/f": GOOD_B})["b/f"]), ("c/g", Entries(np.ones(3, np.int8), None, (3,), "int8", F32(1)))]
        ),
        ValueError,
    ),
    "index out of bounds": (
        collections.OrderedDict(
            [("b/f", whole({"b/f": GOOD_B})["b/f"]), ("c/g", Entries(np.ones(1, F32), np.array([3]), (3,)))]
        ),
        ValueError,
    ),
}


@pytest.mark.parametrize("quantize", ["bf16", "int8"])
@pytest.mark.parametrize("case", list(BAD_QUANTIZED))
def test_bad_payload_changes_neither_model_nor_reference_nor_residual(case, quantize):
    payload, error = BAD_QUANTIZED[case]
    exchanger, model, state = quantized_feedback_setup(quantize)
    model_before = ref_flat(model)
    reference_before, residual_before = copies(state.reference), copies(state.residual)
    with pytest.raises(error):
        exchanger.pull(payload, model, state)
    assert_flat(ref_flat(model), model_before)
    assert_state(state, reference_before, residual_before)


# ---------------------------------------------------------------------------------------
# 5. Sparse: per-weight references, scores against them
# ---------------------------------------------------------------------------------------


def test_sparse_reference_is_updated_weight_by_weight():
    exchanger = sparse_exchanger(0.25, error_feedback=True)
    model = sparse_model()  # l/w [[1, 2, 3], [4, 5, 6]], m/v [1, 2, 3, 4]

    # first (partial) pull, of l/w entries 1 and 4: the reference is seeded with the whole
    # model after the pull, m/v included
    model = exchanger.pull_parameters(coo_payload({"l/w": ([1, 4], [10.0, 20.0])}, SPARSE_SHAPES), model)
    after_first = np.array([[1, 10, 3], [4, 20, 6]], F32)
    m_seed = np.array([1, 2, 3, 4], F32)
    assert_flat(ref_flat(model), {"l/w": after_first, "m/v": m_seed})
    assert_state(exchanger.state, {"l/w": after_first, "m/v": m_seed}, ordered=True)
    seeded_state = exchanger.state

    # local training: l/w + 1, m/v + 2 (the reference does not move)
    model = train(model, {"l/w": 1.0, "m/v": 2.0})  # l/w [[2, 11, 4], [5, 21, 7]], m/v [3, 4, 5, 6]
    assert_state(exchanger.state, {"l/w": after_first, "m/v": m_seed})

    # second pull of l/w: entries 0 and 4 -> only those reference entries are overwritten;
    # entry 1 keeps the 10 of the first pull (not the trained 11)
    model = exchanger.pull_parameters(coo_payload({"l/w": ([0, 4], [7.0, 8.0])}, SPARSE_SHAPES), model)
    assert_flat(ref_flat(model), {"l/w": np.array([[7, 11, 4], [5, 8, 7]], F32), "m/v": np.array([3, 4, 5, 6], F32)})
    reference_l = np.array([[7, 10, 3], [4, 8, 6]], F32)
    assert_state(exchanger.state, {"l/w": reference_l, "m/v": m_seed})
    assert_state(seeded_state, {"l/w": after_first, "m/v": m_seed})  # an earlier state is never written

    # a pull of m/v entry 2: that entry of the seed is overwritten, the rest keep the seed
    # (not the trained values)
    model = exchanger.pull_parameters(coo_payload({"m/v": ([2], [0.5])}, SPARSE_SHAPES), model)
    reference_m = np.array([1, 2, 0.5, 4], F32)
    assert_state(exchanger.state, {"l/w": reference_l, "m/v": reference_m})

    # scores against the reference: l/w |[[7, 11, 4], [5, 8, 7]] - [[7, 10, 3], [4, 8, 6]]|
    # = [[0, 1, 1], [1, 0, 1]], m/v |[3, 4, 0.5, 6] - [1, 2, 0.5, 4]| = [2, 2, 0, 2].
    # Level 0.25 of 10 weights: k = ceil(2.5) = 3, threshold 2 -> m/v entries 0, 1, 3
    # (values 3, 4, 6); l/w nothing.
    current = ref_flat(model)
    against = {"l/w": reference_l, "m/v": reference_m}
    assert {n: f.tolist() for n, f in ref_sparse_pick(current, against, 0.25).items()} == {"m/v": [0, 1, 3]}
    sent = unpack_coo(exchanger.push_parameters(model, nest_copies({n: v + 100 for n, v in current.items()})))
    assert list(sent) == ["m/v"]
    values, flat, shape = sent["m/v"]
    assert flat.tolist() == [0, 1, 3] and shape == (4,)
    assert_identical(values, np.array([3, 4, 6], F32))


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
# 6. error_feedback=False is fl4health's behaviour; the options are checked
# ---------------------------------------------------------------------------------------


def test_dynamic_without_feedback_pushes_exactly_as_a_plain_exchanger():
    start = dynamic_start((1,))
    rule = LayerSelectionFunctionConstructor(1.0, 0.5, normalize=False).select_by_threshold()
    default = DynamicLayerExchanger(rule)
    assert default.error_feedback is False and default.quantize is None
    off = DynamicLayerExchanger(rule, error_feedback=False)
    payloads_default, _ = run_dynamic_rounds(default, start)
    payloads_off, _ = run_dynamic_rounds(off, start)
    for a, b in zip(payloads_default, payloads_off):
        assert_payloads_identical(a, b)
    # no error feedback, no quantization: the state stays empty
    assert off.state == ExchangeState() and default.state == ExchangeState()
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
    assert exchanger.state == ExchangeState()
    assert_payloads_identical(
        exchanger.push_parameters(model, nest_copies(initial)), pack_layers(*rule(model, nest_copies(initial)))
    )


def test_sparse_without_feedback_pushes_exactly_as_a_plain_exchanger():
    default = sparse_exchanger(0.25)
    assert default.error_feedback is False and default.quantize is None
    off = sparse_exchanger(0.25, error_feedback=False)
    raw_default, raw_off = [], []
    run_sparse_rounds(default, raw=raw_default)
    sent = run_sparse_rounds(off, raw=raw_off)
    for a, b in zip(raw_default, raw_off, strict=True):
        assert_payloads_identical(a, b)
    assert off.state == ExchangeState() and default.state == ExchangeState()
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
    with pytest.raises(TypeError, match="error_feedback"):
        FullParameterExchanger(error_feedback=bad, quantize="int8")


def test_error_feedback_accepts_numpy_bool():
    rule = LayerSelectionFunctionConstructor(1.0, 0.5).select_by_threshold()
    assert DynamicLayerExchanger(rule, error_feedback=np.bool_(True)).error_feedback is True
    assert SparseCooParameterExchanger(0.5, largest_magnitude_change_scores, np.bool_(False)).error_feedback is False


POSITIONAL = {
    "full": lambda **options: FullParameterExchanger(**options),
    "fixed": lambda **options: FixedLayerExchanger(["a/w"], **options),
    "exclusions": lambda **options: LayerExchangerWithExclusions({"a": {"w": np.zeros(2, F32)}}, set(), **options),
}


@pytest.mark.parametrize("kind", list(POSITIONAL))
def test_positional_error_feedback_needs_quantization(kind):
    # a positional exchanger always sends the same layers: error feedback alone has nothing to carry
    with pytest.raises(ValueError, match=r"error feedback has nothing to carry.*quantize='bf16' or 'int8'"):
        POSITIONAL[kind](error_feedback=True)
    for quantize in ("bf16", "int8"):
        exchanger = POSITIONAL[kind](error_feedback=True, quantize=quantize)
        assert exchanger.error_feedback is True and exchanger.quantize == quantize
    plain = POSITIONAL[kind]()
    assert plain.error_feedback is False and plain.quantize is None


@pytest.mark.parametrize("bad", ["fp8", "INT8", "int4", "", 8, True])
def test_quantize_must_be_none_bf16_or_int8(bad):
    rule = LayerSelectionFunctionConstructor(1.0, 0.5).select_by_threshold()
    makers = [
        lambda: DynamicLayerExchanger(rule, quantize=bad),
        lambda: SparseCooParameterExchanger(0.5, largest_magnitude_change_scores, quantize=bad),
        *(lambda make=make: make(quantize=bad) for make in POSITIONAL.values()),
    ]
    for make in makers:
        with pytest.raises(ValueError, match=r"quantize must be None, 'bf16' or 'int8'"):
            make()


# ---------------------------------------------------------------------------------------
# 7. Saving and restoring a state (ExchangeState.to_arrays / from_arrays)
# ---------------------------------------------------------------------------------------


def test_the_shells_state_is_read_only_and_the_reference_attribute_is_gone():
    exchanger = threshold_exchanger(error_feedback=True)
    exchanger.pull_parameters(packed({"p/a": FALLBACK_PULLED_A}), nest_copies(FALLBACK_SEED))
    before = exchanger.state
    with pytest.raises(AttributeError):
        exchanger.state = ExchangeState()
    assert exchanger.state is before
    assert not hasattr(exchanger, "reference")
    assert_state(exchanger.state, FALLBACK_SEED)


@pytest.mark.parametrize("key", ["enc/fast", "references/enc/fast", "Reference/enc/fast", "residual", "ref/x"])
def test_from_arrays_rejects_keys_that_are_not_state_entries(key):
    arrays = {"reference/enc/fast": np.ones(2, F32), key: np.zeros(2, F32)}
    with pytest.raises(ValueError, match=re.escape(repr(key))):
        ExchangeState.from_arrays(arrays)


def test_state_arrays_round_trip_in_order_as_numpy_copies():
    source_reference = collections.OrderedDict(
        [
            ("z/last", np.array([1.0, 2.0], F32)),
            ("a/first", jnp.array([3, 4], jnp.int32)),
            ("m/bf", np.array([0.5, -0.0, 3.0078125], BF16)),
        ]
    )
    source_residual = collections.OrderedDict([("z/last", np.array([0.25, -0.125], F32))])
    arrays = ExchangeState(source_reference, source_residual).to_arrays()
    # one flat mapping, keys written by hand: the references first, then the residuals
    assert list(arrays) == ["reference/z/last", "reference/a/first", "reference/m/bf", "residual/z/last"]

    restored = ExchangeState.from_arrays(arrays)
    expected_reference = {
        "z/last": np.array([1.0, 2.0], F32),
        "a/first": np.array([3, 4], np.int32),
        "m/bf": np.array([0.5, -0.0, 3.0078125], BF16),  # bit for bit, -0.0 included
    }
    assert_state(restored, expected_reference, {"z/last": np.array([0.25, -0.125], F32)}, ordered=True)
    # copies: the source's later changes do not reach it
    source_reference["z/last"][0] = 99.0
    source_residual["z/last"][0] = 99.0
    source_reference["m/bf"][0] = 99.0
    assert_state(restored, expected_reference, {"z/last": np.array([0.25, -0.125], F32)}, ordered=True)


def test_from_arrays_reads_residuals_as_float32():
    restored = ExchangeState.from_arrays(
        {"reference/w": np.array([1.0, 2.0], np.float64), "residual/w": np.array([0.5, -0.25], np.float64)}
    )
    assert_state(restored, {"w": np.array([1.0, 2.0], np.float64)}, {"w": np.array([0.5, -0.25], F32)})


def savez_round_trip(state: ExchangeState, path) -> ExchangeState:
    """The documented recipe: numpy.savez of to_arrays(), from_arrays(dict(numpy.load))."""
    np.savez(path, **state.to_arrays())
    with np.load(path) as loaded:
        return ExchangeState.from_arrays(dict(loaded))


def test_state_survives_savez_and_the_next_push_is_unchanged(tmp_path):
    start = dynamic_start((1,))
    start["head/count"] = np.array([3, -2], np.int32)
    saved_exchanger = threshold_exchanger(error_feedback=True)
    other_exchanger = threshold_exchanger(error_feedback=True)
    # two rounds: enc/slow has accumulated 0.8 since its round-1 pull
    run_dynamic_rounds(saved_exchanger, start, rounds=2)
    _, model = run_dynamic_rounds(other_exchanger, start, rounds=2)

    restored = savez_round_trip(saved_exchanger.state, tmp_path / "state.npz")
    assert_state(restored, saved_exchanger.state.reference, ordered=True)  # names with "/", order, dtype, bits

    # round 3 for both: pull what round 2 sent (enc/fast), train, push: enc/slow at 1.2 > 1
    pulled = {"enc/fast": np.full((2, 2), 7.0, F32)}
    fresh = threshold_exchanger(error_feedback=True)
    model_a, state_a = other_exchanger.pull(whole(pulled), model, other_exchanger.state)
    model_b, state_b = fresh.pull(whole(pulled), model, restored)
    trained_a, trained_b = train(model_a, DYNAMIC_DELTA), train(model_b, DYNAMIC_DELTA)
    a, state_a = other_exchanger.push(trained_a, state_a, model_a)
    b, state_b = fresh.push(trained_b, state_b, model_b)
    assert_entries_identical(b, a)
    assert list(b) == ["enc/fast", "enc/slow"]
    assert_state(state_b, state_a.reference, ordered=True)
    # and through the shells, the same payload as the exchanger that was never saved
    assert_payloads_identical(
        other_exchanger.push_parameters(trained_a, model_a),
        pack_layers([b[n].layer() for n in b], list(b)),
    )


def test_quantized_feedback_state_survives_savez_and_the_next_push_is_unchanged(tmp_path):
    exchanger, model, state = quantized_feedback_setup("int8")
    restored = savez_round_trip(state, tmp_path / "state.npz")
    assert_state(restored, state.reference, state.residual, ordered=True)
    trained = train(model, {"b/f": np.array([0.5, -0.25], F32), "c/g": np.array([1.0, 0.0, 0.0], F32)})
    a, state_a = exchanger.push(trained, state, model)
    b, state_b = threshold_exchanger(0.5, error_feedback=True, quantize="int8").push(trained, restored, model)
    assert list(a) == ["b/f", "c/g"]
    assert_entries_identical(b, a)
    assert_state(state_b, state_a.reference, state_a.residual, ordered=True)


@pytest.mark.parametrize("quantize", [None, "bf16", "int8"])
def test_bf16_state_round_trips_bit_for_bit_and_the_next_push_is_unchanged(quantize):
    # l2, threshold 1.0: w pulled at [1, 2], trained to [2.5, 2] -> drift 1.5 > 1 (sent);
    # the reference's bfloat16 bits survive to_arrays/from_arrays in memory.
    exchanger = threshold_exchanger(error_feedback=True, quantize=quantize)
    model = nest_copies({"m/w": np.array([0.0, 0.0], BF16)})
    model = exchanger.pull_parameters(packed({"m/w": np.array([1.0, 2.0], BF16)}), model)
    restored = ExchangeState.from_arrays(exchanger.state.to_arrays())
    residual = None if quantize is None else {"m/w": np.zeros(2, F32)}
    assert_state(restored, {"m/w": np.array([1.0, 2.0], BF16)}, residual)
    trained = nest_copies({"m/w": np.array([2.5, 2.0], BF16)})
    expected, expected_state = exchanger.push(trained, exchanger.state, model)
    assert list(expected) == ["m/w"]
    got, got_state = threshold_exchanger(error_feedback=True, quantize=quantize).push(trained, restored, model)
    assert_entries_identical(got, expected)
    assert_state(got_state, expected_state.reference, None if quantize is None else expected_state.residual)


def test_bf16_state_survives_savez_and_the_next_push_is_unchanged(tmp_path):
    # The documented recipe (numpy.savez / dict(numpy.load)) with a bfloat16 layer.
    # l2, threshold 1.0: w pulled at [1, 2], trained to [2.5, 2] -> drift 1.5 > 1 (sent).
    exchanger = threshold_exchanger(error_feedback=True)
    model = nest_copies({"m/w": np.array([0.0, 0.0], BF16)})
    model = exchanger.pull_parameters(packed({"m/w": np.array([1.0, 2.0], BF16)}), model)
    restored = savez_round_trip(exchanger.state, tmp_path / "state.npz")
    trained = nest_copies({"m/w": np.array([2.5, 2.0], BF16)})
    expected, _ = exchanger.push(trained, exchanger.state, model)
    assert list(expected) == ["m/w"]
    got, after = threshold_exchanger(error_feedback=True).push(trained, restored, model)
    assert_entries_identical(got, expected)
    # numpy.savez keeps the bits (as |V2); the reference takes its layer's dtype back when used
    assert restored.reference["m/w"].tobytes() == np.array([1.0, 2.0], BF16).tobytes()
    assert_state(after, {"m/w": np.array([1.0, 2.0], BF16)})


# ---------------------------------------------------------------------------------------
# 8. Flower: the state survives the client being rebuilt for each message
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


def positional(layers: Mapping[str, Any]) -> list[np.ndarray]:
    """The whole model as a server first sends it: every layer, unnamed, in flatten (sorted) order."""
    return [np.asarray(layers[name]) for name in sorted(layers)]


def fit(client_fn, context, arrays):
    result = client_fn(context).fit(FitIns(ndarrays_to_parameters(arrays), {}))
    assert result.status.code == Code.OK
    return parameters_to_ndarrays(result.parameters)


def saved_state(context: Context) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The exchanger state the client saved, read by hand: ``reference/<layer>`` and
    ``residual/<layer>`` arrays of the ``jaxlayerx.exchange`` record (raw ``|V2`` data viewed
    as the dtype the record declares, bfloat16)."""
    record = context.state["jaxlayerx.exchange"]
    out: dict[str, dict[str, np.ndarray]] = {"reference": {}, "residual": {}}
    for key in record.keys():
        kind, _, name = key.partition("/")
        value = record[key].numpy()
        if value.dtype.kind == "V":
            value = value.view(np.dtype(record[key].dtype))
        out[kind][name] = value
    assert set(out) == {"reference", "residual"}
    return out["reference"], out["residual"]


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

    # fit 1: the whole model (positional); enc/slow moves 0.6 (not > 1), enc/fast 3 per
    # element (6) -> fast only
    sent1 = fit(client_fn, context, positional(SERVER_FULL))
    assert list(unpack(sent1)) == ["enc/fast"]
    # the saved reference: exactly the pulled (server) values, not the trained ones
    reference, residual = saved_state(context)
    assert_flat(reference, SERVER_FULL, ordered=False)
    assert residual == {}

    # fit 2: a rebuilt client; the server sends enc/fast only. enc/slow's drift since its
    # fit-1 pull: 10 + 0.6 + 0.6 - 10 = 1.2 > 1 -> sent with fast.
    sent2 = fit(client_fn, context, packed({"enc/fast": SERVER_FAST}))
    assert len(built) == 2 and built[0] is not built[1] and built[0].exchanger is not built[1].exchanger
    got = unpack(sent2)
    assert list(got) == ["enc/fast", "enc/slow"]
    assert_identical(got["enc/fast"], SERVER_FAST + F32(3.0))
    assert_identical(got["enc/slow"], np.array([10.0], F32) + F32(0.6) + F32(0.6))
    reference, _ = saved_state(context)
    assert_flat(reference, dict(SERVER_FULL, **{"enc/fast": SERVER_FAST}), ordered=False)
    assert_state(built[1].state.exchange, dict(SERVER_FULL, **{"enc/fast": SERVER_FAST}))

    # the same two messages to one client that is never rebuilt: the same payloads
    lone = ExchangerClient(nest_copies(FLOWER_START), threshold_exchanger(1.0, error_feedback=True), flower_train_fn)
    lone1, _, _ = lone.fit(positional(SERVER_FULL), {})
    lone2, _, _ = lone.fit(packed({"enc/fast": SERVER_FAST}), {})
    assert_payloads_identical(sent1, lone1)
    assert_payloads_identical(sent2, lone2)


@needs_flower
def test_stateful_client_without_feedback_saves_an_empty_state():
    def make_client(context):
        return ExchangerClient(nest_copies(FLOWER_START), threshold_exchanger(1.0), flower_train_fn)

    client_fn = stateful_client_fn(make_client)
    context = new_context()
    fit(client_fn, context, positional(SERVER_FULL))
    assert saved_state(context) == ({}, {})
    # fit 2: enc/slow measured from the round's start only: 0.6, not sent
    assert list(unpack(fit(client_fn, context, packed({"enc/fast": SERVER_FAST})))) == ["enc/fast"]
    assert saved_state(context) == ({}, {})


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
    assert list(unpack(fit(client_fn, context, positional(server)))) == []
    reference, _ = saved_state(context)
    assert_flat(reference, server, ordered=False)  # bfloat16, bit for bit
    sent = unpack(fit(client_fn, context, packed({})))
    assert list(sent) == ["m/w"]
    # Flower's serialization carries bfloat16 as raw |V2 bytes: read them back as bfloat16.
    assert sent["m/w"].dtype == np.dtype("V2")
    assert_identical(sent["m/w"].view(BF16), np.array([2.5, 2.0], BF16))  # 1 + 0.75 + 0.75, 2


@needs_flower
def test_stateful_client_keeps_the_quantization_residual():
    # int8 with error feedback: what quantization lost in fit 1 is saved with the client and
    # reappears in fit 2's update, in a rebuilt client as in one that is never rebuilt.
    start = {"w/a": np.zeros(3, F32)}
    server = {"w/a": np.zeros(3, F32)}
    deltas = iter([np.array([2.0, 0.5, 0.3], F32), np.zeros(3, F32)] * 2)

    def train_fn(model, config):
        return train(model, {"w/a": next(deltas)}), 1, {}

    def make(context=None):
        return ExchangerClient(
            nest_copies(start), FullParameterExchanger(quantize="int8", error_feedback=True), train_fn
        )

    client_fn = stateful_client_fn(make)
    context = new_context()
    sent1 = fit(client_fn, context, positional(server))
    u1 = np.array([2.0, 0.5, 0.3], F32)
    q1, scale1 = ref_quantize(u1, True, "int8")
    np.testing.assert_array_equal(q1, [127, 32, 19])  # 0.5 * 63.5 = 31.75 -> 32; 0.3 * 63.5 = 19.05 -> 19
    # a quantized upload travels compact (header, int8 values, scales): read by hand
    decoded = ref_compact_decode(dict(zip(["header", "values0", "scales"], sent1, strict=True)))
    assert decoded["w/a"].form == 2 and decoded["w/a"].flat is None
    assert_identical(decoded["w/a"].values, q1)
    assert_identical(F32(decoded["w/a"].scale), scale1)
    reference, residual = saved_state(context)
    assert_flat(reference, server)
    assert_flat(residual, {"w/a": ref_lost(u1, q1, scale1)})
    # fit 2: the server sends what it rebuilt of fit 1 (0 + q1 * scale1); the client does not
    # train: its update over that is exactly the residual
    rebuilt = {"w/a": F32(0) + ref_dequantize(q1, scale1)}
    sent2 = fit(client_fn, context, packed(rebuilt))
    lone = make()
    assert_payloads_identical(sent1, lone.fit(positional(server), {})[0])
    assert_payloads_identical(sent2, lone.fit(packed(rebuilt), {})[0])
    r1 = ref_lost(u1, q1, scale1)
    assert np.count_nonzero(r1) >= 2  # 0.5 - 32 * 2/127 and 0.3 - 19 * 2/127 at least
    q2, scale2 = ref_quantize(r1, True, "int8")
    assert np.count_nonzero(q2) >= 2
    decoded = ref_compact_decode(dict(zip(["header", "values0", "scales"], sent2, strict=True)))
    assert_identical(decoded["w/a"].values, q2)
    assert_identical(F32(decoded["w/a"].scale), scale2)
    reference, residual = saved_state(context)
    assert_flat(reference, rebuilt)
    assert_flat(residual, {"w/a": ref_lost(r1, q2, scale2)})
    assert_state(lone.state.exchange, rebuilt, {"w/a": ref_lost(r1, q2, scale2)})


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


@settings(deadline=None)
@given(case=feedback_cases())
def test_dynamic_feedback_matches_the_accumulate_until_sent_process(case):
    start, deltas, offsets, full_first, threshold = case
    exchanger = threshold_exchanger(threshold, error_feedback=True, normalize=False)

    model = nest_copies(start)  # the library's model
    current = copies(start)  # the numpy process
    pulled: dict[str, np.ndarray] | None = None  # name -> value at its last pull; seeded whole by the first
    to_pull = copies(start) if full_first else {}
    for r, (delta, offset) in enumerate(zip(deltas, offsets)):
        model = exchanger.pull_parameters(packed(to_pull), model)
        for name, value in to_pull.items():
            current[name] = value.copy()
        if pulled is None:
            pulled = copies(current)  # the whole model after the first pull, pulled or not
        for name, value in to_pull.items():
            pulled[name] = value.copy()
        assert_flat(ref_flat(model), current)
        assert_state(exchanger.state, pulled)

        initial = model
        model = train(model, delta)
        current = {name: current[name] + delta[name] for name in current}
        expected = ref_threshold_pick(current, pulled, threshold)

        sent = unpack(exchanger.push_parameters(model, initial))
        assert list(sent) == expected, (r, {n: ref_l2(current[n], pulled[n]) for n in current})
        for name in expected:
            assert_identical(sent[name], current[name], name)
        # the server sends back what it got, moved by its offset (its average with others)
        to_pull = {name: value + F32(offset) for name, value in sent.items()}


# ---------------------------------------------------------------------------------------
# 10. Quantized pushes: the update over the reference, coded; the residual of error feedback
# ---------------------------------------------------------------------------------------

Q_SHAPES = {"a/k": (3, 4), "b/v": (6,), "c/h": (4,), "d/z": (2,)}
Q_DTYPES = {"a/k": F32, "b/v": F32, "c/h": BF16, "d/z": F32}
Q_FIXED = ["c/h", "a/k"]  # list order, not flatten order: the payload's order


def q_global(seed: int) -> dict[str, np.ndarray]:
    """Server values: multiples of 1/8 in [-2, 2], exact in bfloat16 and float32."""
    rng = np.random.default_rng(seed)
    return {n: (rng.integers(-16, 17, shape) / 8).astype(Q_DTYPES[n]) for n, shape in Q_SHAPES.items()}


def q_delta(round_index: int) -> dict[str, np.ndarray]:
    """A round of local training. Each moving layer has one designated largest update, a
    power of two or 1.5 (for which max/127 is the same however it is rounded), all others
    smaller; d/z never moves (an int8 layer whose largest update is 0 sends zeros, scale 0).
    Round 1 leaves 0 at round 2's designated entries, so their residual is exactly 0 and
    round 2's largest updates stay exact with error feedback too. In round 2 b/v barely
    moves (l2 < 0.1; not sent by the threshold rule, not among the sparse top half)."""
    rng = np.random.default_rng(100 + round_index)
    delta = {n: rng.uniform(-0.9, 0.9, shape).astype(F32) for n, shape in Q_SHAPES.items()}
    delta["d/z"][...] = 0
    if round_index == 1:
        delta["a/k"].flat[5], delta["a/k"].flat[7] = 2.0, 0.0
        delta["b/v"].flat[2], delta["b/v"].flat[4] = -1.5, 0.0
        delta["c/h"].flat[1], delta["c/h"].flat[3] = 1.0, 0.0
    else:
        delta["a/k"].flat[7] = -2.0
        delta["b/v"] = rng.uniform(-0.03, 0.03, Q_SHAPES["b/v"]).astype(F32)
        delta["b/v"].flat[4] = 0.03125
        delta["c/h"].flat[3] = -1.0
    return delta


def plus(layers: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each layer plus its float32 delta, in float32, back in the layer's dtype."""
    return {n: (v.astype(F32) + delta[n]).astype(v.dtype) for n, v in layers.items()}


class RefExchange:
    """The exchange state and quantized push in numpy, as jaxlayerx/state.py and
    jaxlayerx/quantize.py describe them.

    ``select(trained, against) -> name -> bool array of the layer's shape`` is the
    exchanger's choice; ``order`` the payload's layer order.
    """

    def __init__(self, select: Callable, order: list[str], mode: str, feedback: bool) -> None:
        self.select, self.order, self.mode, self.feedback = select, order, mode, feedback
        self.reference: dict[str, np.ndarray] | None = None
        self.residual: dict[str, np.ndarray] = {}

    def pull(self, model_after: Mapping[str, np.ndarray], pulled: list[str]) -> None:
        if self.reference is None:  # seeded whole by the first pull
            self.reference = copies(model_after)
            if self.feedback:
                self.residual = {n: np.zeros(np.shape(v), F32) for n, v in model_after.items()}
        for name in pulled:
            self.reference[name] = np.array(model_after[name], copy=True)

    def push(self, trained: Mapping[str, np.ndarray], initial: Mapping[str, np.ndarray]):
        assert self.reference is not None
        if self.feedback:  # drift from the reference less the residual, in the reference's dtype
            against = {n: (r.astype(F32) - self.residual[n]).astype(r.dtype) for n, r in self.reference.items()}
        else:
            against = initial
        masks = self.select(trained, against)
        payload = collections.OrderedDict()
        for name in self.order:
            mask = np.broadcast_to(np.asarray(masks[name], bool), Q_SHAPES[name])
            if not mask.any():
                continue
            update = trained[name].astype(F32) - self.reference[name].astype(F32)
            if self.feedback:
                update = update + self.residual[name]
            q, scale = ref_quantize(update, mask, self.mode)
            flat = np.flatnonzero(mask)
            dense = bool(mask.all())
            values = q.reshape(-1) if dense else q.reshape(-1)[flat]
            payload[name] = Entries(values, None if dense else flat.astype(np.int64), Q_SHAPES[name], self.mode, scale)
            if self.feedback:
                self.residual[name] = np.where(mask, ref_lost(update, q, scale), self.residual[name]).astype(F32)
        return payload


def _all(trained, against):
    return {n: True for n in trained}


def _threshold_half(trained, against):
    chosen = ref_threshold_pick(trained, against, 0.5)
    return {n: n in chosen for n in trained}


def _sparse_half(trained, against):
    kept = ref_sparse_pick(trained, against, 0.5)
    masks = {}
    for name, shape in Q_SHAPES.items():
        mask = np.zeros(math.prod(shape), bool)
        mask[kept.get(name, [])] = True
        masks[name] = mask.reshape(shape)
    return masks


FLATTEN = sorted(Q_SHAPES)
QUANTIZED_KINDS = {
    # make(quantize, feedback), select, payload order, layers a later pull writes
    "full": (
        lambda q, ef: FullParameterExchanger(quantize=q, error_feedback=ef),
        _all,
        FLATTEN,
        FLATTEN,
    ),
    "fixed": (
        lambda q, ef: FixedLayerExchanger(Q_FIXED, quantize=q, error_feedback=ef),
        lambda trained, against: {n: n in Q_FIXED for n in trained},
        Q_FIXED,
        Q_FIXED,
    ),
    "dynamic": (
        lambda q, ef: threshold_exchanger(0.5, error_feedback=ef, quantize=q),
        _threshold_half,
        FLATTEN,
        FLATTEN,
    ),
    "sparse": (lambda q, ef: sparse_exchanger(0.5, error_feedback=ef, quantize=q), _sparse_half, FLATTEN, FLATTEN),
}


@pytest.mark.parametrize("feedback", [False, True], ids=["plain", "ef"])
@pytest.mark.parametrize("mode", ["bf16", "int8"])
@pytest.mark.parametrize("kind", list(QUANTIZED_KINDS))
def test_quantized_push_matches_the_numpy_quantizer(kind, mode, feedback):
    """Two rounds: pull the server's whole model (seeding the state), train, push; the
    payload (coded values, indices, scales) and the state after each step against
    RefExchange. A positional exchanger's later pulls write only its own layers."""
    make, select, order, exchanged = QUANTIZED_KINDS[kind]
    exchanger = make(mode, feedback)
    assert exchanger.quantize == mode and exchanger.error_feedback is feedback
    ref = RefExchange(select, order, mode, feedback)
    state = exchanger.init_state()
    model = nest_copies({n: np.zeros(shape, Q_DTYPES[n]) for n, shape in Q_SHAPES.items()})
    local = ref_flat(model)
    sent_layers = []
    for round_index in (1, 2):
        server = q_global(round_index)
        first = round_index == 1
        model, state = exchanger.pull(whole(server), model, state, first=first)
        pulled = FLATTEN if first else exchanged
        local = {n: (server[n] if n in pulled else local[n]) for n in FLATTEN}
        ref.pull(local, pulled)
        assert_flat(ref_flat(model), local, ordered=False)
        assert_state(state, ref.reference, ref.residual or None)

        trained = plus(local, q_delta(round_index))
        payload, state = exchanger.push(nest_copies(trained), state, model)
        expected = ref.push(trained, local)
        assert_entries_identical(payload, expected)
        # pushing moves no reference; the residual follows what quantization lost
        assert_state(state, ref.reference, ref.residual or None)
        sent_layers.append(list(payload))
        model, local = nest_copies(trained), trained

    # the cases cover what they claim: the dynamic rule skips b/v in round 2 and d/z
    # always; the sparse rule sends some layers in part; full sends d/z as zeros
    if kind == "dynamic":
        assert sent_layers == [["a/k", "b/v", "c/h"], ["a/k", "c/h"]]
    if kind == "full":
        assert sent_layers == [FLATTEN, FLATTEN]


def test_int8_push_by_hand():
    # w pulled at [0, 0, 0, 0], trained to [2, 0.5, -0.3, -2]: u = the trained values,
    # scale = 2 / 127, 1 / scale = 63.5: q = rint([127, 31.75, -19.05, -127]) = [127, 32, -19, -127].
    exchanger = FullParameterExchanger(quantize="int8")
    model, state = exchanger.pull(whole({"w": np.zeros(4, F32)}), {"w": np.ones(4, F32)}, ExchangeState(), first=True)
    payload, state = exchanger.push({"w": np.array([2.0, 0.5, -0.3, -2.0], F32)}, state, model)
    assert list(payload) == ["w"]
    entries = payload["w"]
    assert entries.quantized == "int8" and entries.indices is None and entries.shape == (4,)
    assert_identical(entries.values, np.array([127, 32, -19, -127], np.int8))
    assert_identical(F32(entries.scale), F32(2) / F32(127))
    assert_state(state, {"w": np.zeros(4, F32)})  # quantization keeps a reference; no residual without feedback


def test_sparse_int8_scale_is_over_the_sent_entries_only():
    # Without error feedback the choice is measured from initial_model, the update from the
    # state's reference (the pulled zeros). initial_model [0, 0, 5, 0], trained
    # [0.125, 1, 5, 0.5]: drift [0.125, 1, 0, 0.5] -> level 0.5 of 4: entries 1 and 3.
    # Their updates, 1 and 0.5, give the scale 1/127; entry 2's update of 5, not sent,
    # neither enters the scale (5/127 if it did) nor travels. 0.5 * 127 = 63.5 -> 64 (ties to even).
    exchanger = sparse_exchanger(0.5, quantize="int8")
    model, state = exchanger.pull(whole({"w": np.zeros(4, F32)}), {"w": np.ones(4, F32)}, ExchangeState())
    trained = {"w": np.array([0.125, 1.0, 5.0, 0.5], F32)}
    payload, after = exchanger.push(trained, state, {"w": np.array([0.0, 0.0, 5.0, 0.0], F32)})
    entries = payload["w"]
    assert entries.quantized == "int8" and entries.shape == (4,)
    assert_identical(entries.indices, np.array([1, 3], np.int64))
    assert_identical(F32(entries.scale), F32(1) / F32(127))
    assert entries.values.tolist() == [127, 64]
    q, scale = ref_quantize(trained["w"], [False, True, False, True], "int8")
    assert_identical(entries.values, q[[1, 3]])
    assert_identical(F32(entries.scale), scale)
    assert_state(after, {"w": np.zeros(4, F32)})


def test_bf16_push_by_hand():
    # u = [1 + 2^-9, -3 - 2^-7, 0.1]: bfloat16 keeps 8 significant bits, ties to even:
    # 1 + 2^-9 -> 1; -3 - 2^-7 (exactly between -3 and -3 - 2^-6) -> -3 (even); 0.1 -> 0.10009765625
    exchanger = FullParameterExchanger(quantize="bf16", error_feedback=True)
    model, state = exchanger.pull(whole({"w": np.zeros(3, F32)}), {"w": np.zeros(3, F32)}, ExchangeState())
    update = np.array([1 + 2**-9, -3 - 2**-7, 0.1], F32)
    payload, state = exchanger.push({"w": update}, state, model)
    entries = payload["w"]
    assert entries.quantized == "bf16" and entries.indices is None
    assert_identical(F32(entries.scale), F32(1))
    assert_identical(entries.values, np.array([1.0, -3.0, 0.10009765625], BF16))
    lost = update - np.array([1.0, -3.0, 0.10009765625], F32)
    assert_state(state, {"w": np.zeros(3, F32)}, {"w": lost})
    assert lost[0] == F32(2**-9) and lost[1] == F32(-(2**-7))


@pytest.mark.parametrize("mode", ["bf16", "int8"])
def test_error_feedback_resends_what_quantization_lost(mode):
    # Round 1: w from 0 to [2, 0.5, 0.3] (int8: scale 2/127, q = [127, 32, 19]; bf16: 0.3
    # is not a bfloat16). The server rebuilds 0 + dequantize(q); round 2: the client pulls
    # it and does not train. With error feedback the update is what round 1 lost, and the
    # server's value after both rounds is nearer the trained one; without, nothing is sent
    # but zeros.
    trained1 = np.array([2.0, 0.5, 0.3], F32)
    results = {}
    for feedback in (False, True):
        exchanger = FullParameterExchanger(quantize=mode, error_feedback=feedback)
        model, state = exchanger.pull(whole({"w": np.zeros(3, F32)}), {"w": np.zeros(3, F32)}, ExchangeState())
        payload, state = exchanger.push({"w": trained1}, state, model)
        q1, scale1 = ref_quantize(trained1, True, mode)
        assert_identical(payload["w"].values, q1)
        server1 = F32(0) + ref_dequantize(q1, scale1)
        lost = ref_lost(trained1, q1, scale1)
        assert np.count_nonzero(lost) >= 1
        model, state = exchanger.pull(whole({"w": server1}), model, state)
        assert_state(state, {"w": server1}, {"w": lost} if feedback else None)
        payload, state = exchanger.push({"w": server1.copy()}, state, model)
        carried = lost if feedback else np.zeros(3, F32)
        q2, scale2 = ref_quantize((server1 - server1) + carried, True, mode)
        assert_identical(payload["w"].values, q2)
        assert_identical(F32(payload["w"].scale), scale2)
        if feedback:
            assert_state(state, {"w": server1}, {"w": ref_lost(carried, q2, scale2)})
        results[feedback] = server1 + ref_dequantize(q2, scale2)
    assert np.all(results[False] == F32(0) + ref_dequantize(*ref_quantize(trained1, True, mode)))
    error_plain = np.abs(results[False] - trained1)
    error_feedback = np.abs(results[True] - trained1)
    assert np.all(error_feedback <= error_plain) and np.any(error_feedback < error_plain)


def test_feedback_counts_the_lost_quantization_error_as_drift():
    # Dynamic threshold 0.001 with bf16 and error feedback. Round 1: w from 0 to 1 + 2^-9,
    # sent as bfloat16 1.0 (lost: 2^-9). Round 2: the client pulls the server's 1.0 and does
    # not train. Drift from reference - residual = 1 - 2^-9: 2^-9 = 0.00195 > 0.001 -> w is
    # sent again, carrying exactly 2^-9; without quantization (error feedback alone) the
    # server got 1 + 2^-9 exactly and nothing drifts.
    w1 = np.array([1 + 2**-9], F32)
    quantized = threshold_exchanger(0.001, error_feedback=True, quantize="bf16")
    plain = threshold_exchanger(0.001, error_feedback=True)
    start = {"w": np.zeros(1, F32), "v": np.zeros(1, F32)}
    for exchanger, server1 in ((quantized, np.array([1.0], F32)), (plain, w1)):
        model, state = exchanger.pull(whole(start), nest_copies(start), ExchangeState())
        payload, state = exchanger.push(nest_copies({"w": w1, "v": start["v"]}), state, model)
        assert list(payload) == ["w"]
        model, state = exchanger.pull(whole({"w": server1}), model, state)
        payload, state = exchanger.push(nest_copies({"w": server1, "v": start["v"]}), state, model)
        if exchanger is quantized:
            assert list(payload) == ["w"]
            assert_identical(payload["w"].values, np.array([2**-9], BF16))
            assert_state(state, {"w": server1, "v": start["v"]}, {"w": np.zeros(1, F32), "v": np.zeros(1, F32)})
        else:
            assert list(payload) == []


def test_quantize_without_feedback_selects_from_initial_model_and_codes_over_the_reference():
    # The state's reference (the pulled [0, 0], [0, 0]) is the base of the update; without
    # error feedback the choice is measured from initial_model. Threshold 0.25, l2:
    #   against initial ([1, 0], [5, 5]): w |[0, 0.5]| = 0.5 (sent), v 0 -> w;
    #   against the reference (error feedback): w 1.118, v 7.07 -> w and v.
    # w's update over the reference is [1, 0.5]: scale 1/127, q = [127, 64] (63.5 -> 64).
    start = {"v": np.zeros(2, F32), "w": np.zeros(2, F32)}
    initial = {"v": np.array([5.0, 5.0], F32), "w": np.array([1.0, 0.0], F32)}
    trained = {"v": np.array([5.0, 5.0], F32), "w": np.array([1.0, 0.5], F32)}
    sent = {}
    for feedback in (False, True):
        exchanger = threshold_exchanger(0.25, error_feedback=feedback, quantize="int8")
        model, state = exchanger.pull(whole(start), nest_copies(start), exchanger.init_state())
        payload, state = exchanger.push(nest_copies(trained), state, nest_copies(initial))
        sent[feedback] = payload
        if feedback:  # what int8 lost of each layer's update (v and w both sent)
            residual = {}
            for name in ("v", "w"):
                q, scale = ref_quantize(trained[name] - start[name], True, "int8")
                residual[name] = ref_lost(trained[name] - start[name], q, scale)
            assert_state(state, start, residual)
        else:
            assert_state(state, start)
    assert list(sent[False]) == ref_threshold_pick(trained, initial, 0.25) == ["w"]
    assert list(sent[True]) == ref_threshold_pick(trained, start, 0.25) == ["v", "w"]
    assert_identical(sent[False]["w"].values, np.array([127, 64], np.int8))
    assert_identical(F32(sent[False]["w"].scale), F32(1) / F32(127))
    assert_entries_identical(sent[False], collections.OrderedDict([("w", sent[True]["w"])]))


def test_pull_of_a_quantized_payload_is_refused():
    exchanger = FullParameterExchanger(quantize="int8")
    model, state = exchanger.pull(whole({"w": np.ones(2, F32)}), {"w": np.zeros(2, F32)}, ExchangeState())
    payload, _ = exchanger.push({"w": np.array([2.0, 1.0], F32)}, state, model)
    with pytest.raises(ValueError, match="quantized update is rebuilt by the server"):
        exchanger.pull(payload, model, state)
    assert_identical(ref_flat(model)["w"], np.ones(2, F32))
    assert_state(state, {"w": np.ones(2, F32)})


def test_int8_scale_is_max_times_the_float32_inverse_of_127_as_documented():
    exchanger = FullParameterExchanger(quantize="int8")
    model, state = exchanger.pull(whole({"w": np.zeros(2, F32)}), {"w": np.zeros(2, F32)}, ExchangeState())
    payload, _ = exchanger.push({"w": np.array([9.0, 1.0], F32)}, state, model)
    assert_identical(F32(payload["w"].scale), F32(9) * F32(1 / 127))
    assert abs(int(F32(payload["w"].scale).view(np.int32)) - int((F32(9) / F32(127)).view(np.int32))) <= 1


def test_quantized_push_of_a_model_with_an_integer_layer_is_accepted():
    from jaxlayerx.validation import check_payload

    layers = {"a/w": np.array([1.0, 2.0], F32), "s/n": np.array([3, 4], np.int32)}
    exchanger = FullParameterExchanger(quantize="int8")
    model, state = exchanger.pull(whole(layers), nest_copies(layers), ExchangeState(), first=True)
    payload, _ = exchanger.push(
        nest_copies({"a/w": np.array([1.5, 2.0], F32), "s/n": np.array([5, 4], np.int32)}), state, model
    )
    check_payload(payload, layers)  # what a server checks a reply against: the global model
