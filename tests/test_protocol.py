"""The protocol core (jaxlayerx/protocol): what a client is sent, what a failure means,
when the version moves, how replies are checked and averaged, and the client's side.

Every expectation is written out by hand or computed with plain numpy.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest

import jaxlayerx as jlx
from jaxlayerx.errors import UnknownLayerError
from jaxlayerx.payload import Entries, dense_entries
from jaxlayerx.protocol import ClientState, ExchangeServer, VersionMismatchError, push, receive
from jaxlayerx.protocol.ledger import NOTHING, changed_since, held_after_round, mark_changed
from jaxlayerx.quantize import quantize_update


def layers(seed: int = 0) -> collections.OrderedDict:
    rng = np.random.default_rng(seed)
    return collections.OrderedDict(
        a=rng.standard_normal((3, 4)).astype(np.float32),
        b=rng.standard_normal(4).astype(np.float32),
        c=rng.standard_normal(2).astype(np.float32),
    )


def whole(flat) -> collections.OrderedDict:
    return collections.OrderedDict((name, dense_entries(value)) for name, value in flat.items())


def entries(values, indices, shape) -> Entries:
    return Entries(np.asarray(values, np.float32), np.asarray(indices, np.int64), shape)


# --- the ledger ------------------------------------------------------------------------


def test_the_ledger_rules_by_hand():
    updated_in = np.array([0, 2, 5, 3])
    assert changed_since(updated_in, NOTHING).tolist() == [True, True, True, True]
    assert changed_since(updated_in, 2).tolist() == [False, False, True, True]
    per_client = changed_since(updated_in[None], np.array([[5], [0]]))
    assert per_client.tolist() == [[False, False, False, False], [False, True, True, True]]
    assert mark_changed(updated_in, np.array([True, False, False, True]), 7, np).tolist() == [7, 2, 5, 7]
    assert held_after_round(4) == 3


# --- serving -----------------------------------------------------------------------------


def test_first_contact_is_the_whole_model_then_what_changed_since_the_version_held():
    start = layers()
    server = ExchangeServer(start, entrywise=False)
    update = server.serve("c1")
    assert update.whole_model and update.base is None and update.version == 0
    assert list(update.payload) == ["a", "b", "c"] and all(e.dense for e in update.payload.values())
    np.testing.assert_array_equal(update.payload["a"].layer(), start["a"])
    server.confirm("c1")
    assert server.holds("c1") == 0
    change = server.aggregate([server.accept("c1", 10, collections.OrderedDict(b=dense_entries(np.ones(4))))], 1)
    assert change.changed == ("b",) and server.version == 1
    update = server.serve("c1")
    assert update.base == 0 and update.version == 1 and list(update.payload) == ["b"]
    np.testing.assert_array_equal(update.payload["b"].layer(), np.ones(4, np.float32))
    # a client that never took part still gets the whole model
    assert server.serve("c2").whole_model


def test_the_version_moves_every_round_even_when_nothing_changes():
    server = ExchangeServer(layers(), entrywise=False)
    server.serve("c")
    server.confirm("c")
    for round_ in (1, 2, 3):
        assert server.aggregate([], round_).changed == ()
    assert server.version == 3
    update = server.serve("c")
    assert update.base == 0 and update.version == 3 and list(update.payload) == []
    with pytest.raises(ValueError, match="round 3 does not come after version 3"):
        server.aggregate([], 3)


def test_a_forgotten_client_gets_the_whole_model_and_an_unconfirmed_one_keeps_its_last():
    server = ExchangeServer(layers(), entrywise=False)
    for client in ("ok", "failed", "silent"):
        server.serve(client)
        server.confirm(client)
    server.aggregate([], 1)
    for client in ("ok", "failed", "silent"):
        server.serve(client)
    server.confirm("ok")
    server.forget("failed")
    assert server.holds("ok") == 1 and server.holds("failed") is None
    assert server.holds("silent") == 0  # in flight, not confirmed: still known at its last confirmed version
    assert server.serve("failed").whole_model
    assert server.clients() == {"ok": 1, "silent": 0}


def test_a_sparse_server_serves_exactly_the_changed_entries():
    start = layers()
    server = ExchangeServer(start, entrywise=True)
    server.serve(1)
    server.confirm(1)
    reply = server.accept(2, 1, collections.OrderedDict(a=entries([5.0, 6.0], [1, 10], (3, 4))))
    server.aggregate([reply], 1)
    update = server.serve(1)
    assert list(update.payload) == ["a"]
    assert update.payload["a"].indices.tolist() == [1, 10] and update.payload["a"].values.tolist() == [5.0, 6.0]
    expected = start["a"].copy()
    expected.reshape(-1)[[1, 10]] = [5.0, 6.0]
    np.testing.assert_array_equal(server.global_layers["a"], expected)


# --- replies -------------------------------------------------------------------------------


def numpy_mean(replies, start, name, over):
    """The weighted average a server must compute, written out per entry."""
    base = start[name].astype(np.float64).reshape(-1)
    summed = np.zeros_like(base)
    total = np.zeros_like(base)
    everyone = 0.0
    for weight, payload in replies:
        everyone += weight
        if name not in payload:
            continue
        sent = payload[name]
        index = np.arange(base.size) if sent.indices is None else sent.indices
        values = sent.values.astype(np.float64)
        summed[index] += weight * (values if over == "senders" else values - base[index])
        total[index] += weight
    if over == "senders":
        mean = np.where(total > 0, summed / np.where(total > 0, total, 1), base)
    else:
        mean = np.where(total > 0, base + summed / everyone, base)
    return mean.reshape(start[name].shape)


@pytest.mark.parametrize("over", ["senders", "participants"])
@pytest.mark.parametrize("entrywise", [False, True])
def test_aggregation_is_the_weighted_mean_over_the_senders(over, entrywise):
    start = layers()
    rng = np.random.default_rng(1)
    server = ExchangeServer(start, entrywise=entrywise, average_over=over)
    sent = []
    for client, weight in (("x", 5), ("y", 20), ("z", 1)):
        payload = collections.OrderedDict()
        for name, layer in start.items():
            if rng.random() < 0.3:
                continue
            values = rng.standard_normal(layer.shape).astype(np.float32)
            if entrywise:
                keep = np.flatnonzero(rng.random(layer.size) < 0.5)
                payload[name] = entries(values.reshape(-1)[keep], keep, layer.shape)
            else:
                payload[name] = dense_entries(values)
        sent.append((weight, payload))
        server.accept(client, weight, payload)
    server.aggregate([server.accept(c, w, p) for c, (w, p) in zip("xyz", sent)], 1)
    for name in start:
        np.testing.assert_allclose(
            server.global_layers[name], numpy_mean(sent, start, name, over), rtol=2e-6, atol=1e-7
        )


def test_replies_average_alike_whatever_order_they_arrive_in():
    start = layers()
    payloads = {c: whole(layers(seed)) for c, seed in (("b", 1), ("a", 2), ("c", 3))}

    def run(order):
        server = ExchangeServer(start, entrywise=False)
        server.aggregate([server.accept(c, 7, payloads[c]) for c in order], 1)
        return server.global_layers

    one, other = run("abc"), run("cab")
    for name in start:
        assert np.array_equal(one[name].view(np.uint32), other[name].view(np.uint32))


def test_a_layer_server_refuses_partial_layers_and_the_core_refuses_unknown_names():
    server = ExchangeServer(layers(), entrywise=False)
    with pytest.raises(ValueError, match="layer 'a': a layer exchange averages whole layers, got 2 of its 12"):
        server.accept("c", 1, collections.OrderedDict(a=entries([1, 2], [0, 1], (3, 4))))
    with pytest.raises(UnknownLayerError, match="'d'"):
        server.accept("c", 1, collections.OrderedDict(d=dense_entries(np.ones(2))))
    with pytest.raises(ValueError, match="non-finite"):
        server.accept("c", 1, collections.OrderedDict(c=dense_entries(np.array([np.nan, 1], np.float32))))
    tolerant = ExchangeServer(layers(), entrywise=False, allow_nonfinite=True)
    tolerant.accept("c", 1, collections.OrderedDict(c=dense_entries(np.array([np.inf, 1], np.float32))))


def test_a_quantized_reply_is_rebuilt_over_the_global_values():
    start = layers()
    server = ExchangeServer(start, entrywise=True)
    update = np.array([0.5, -0.25], np.float32)
    scale = np.float32(0.5 / 127)
    q = np.array([127, -64], np.int8)  # round(update / scale)
    reply = server.accept(
        "c", 1, collections.OrderedDict(b=Entries(q, np.array([0, 3], np.int64), (4,), "int8", scale))
    )
    expected = start["b"][[0, 3]] + q.astype(np.float32) * scale
    np.testing.assert_allclose(reply.payload["b"].values, expected, rtol=1e-6)
    assert reply.payload["b"].quantized is None
    np.testing.assert_allclose(q * scale, update, atol=scale)


def test_state_restores_what_each_client_holds_and_the_versions():
    server = ExchangeServer(layers(), entrywise=True)
    server.serve(7)
    server.confirm(7)
    server.aggregate([server.accept(9, 3, collections.OrderedDict(c=entries([4.0], [1], (2,))))], 1)
    arrays, meta = server.state()
    restored = ExchangeServer(layers(), entrywise=True)
    restored.restore(arrays, meta)
    assert restored.version == 1 and restored.clients() == {7: 0}
    np.testing.assert_array_equal(restored.updated_in["c"], [0, 1])
    np.testing.assert_array_equal(restored.global_layers["c"], server.global_layers["c"])
    assert restored.serve(7).payload["c"].indices.tolist() == [1]
    with pytest.raises(ValueError, match="differ"):
        ExchangeServer(collections.OrderedDict(a=np.zeros(2)), entrywise=True).restore(arrays, meta)
    with pytest.raises(ValueError, match="other kind"):
        ExchangeServer(layers(), entrywise=False).restore(arrays, meta)


# --- the client side -------------------------------------------------------------------------


def test_a_client_refuses_an_update_over_a_version_it_does_not_hold():
    exchanger = jlx.FullParameterExchanger()
    model = {"w": np.zeros(3, np.float32)}
    layout = jlx.flatten(model)
    with pytest.raises(ValueError, match="first message must hold the whole model"):
        receive(exchanger, whole(layout), model, ClientState(), layout=layout, whole_model=False, base=0)
    model, state = receive(exchanger, whole(layout), model, ClientState(), layout=layout, whole_model=True, version=2)
    assert state.version == 2
    with pytest.raises(VersionMismatchError, match="over global version 1, but the client holds version 2"):
        receive(exchanger, whole(layout), model, state, layout=layout, whole_model=False, base=1, version=3)
    with pytest.raises(ValueError, match="every layer, whole; 1 missing"):
        receive(exchanger, collections.OrderedDict(), model, state, layout=layout, whole_model=True, version=3)


def test_a_fedbn_client_keeps_its_local_layers_when_the_whole_model_comes_again():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self):
            self.fc = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
            self.bn = nnx.BatchNorm(2, rngs=nnx.Rngs(0))

    model = Net()
    fedbn = jlx.LayerExchangerWithExclusions(model, {nnx.BatchNorm})
    layout = jlx.flatten(model)
    server_model = collections.OrderedDict((n, np.full(np.shape(v), 3.0, np.float32)) for n, v in layout.items())
    model, state = receive(fedbn, whole(server_model), model, ClientState(), layout=layout, whole_model=True, version=0)
    assert all((np.asarray(v) == 3).all() for v in jlx.flatten(model).values())  # the first model: every layer
    model.bn.mean.value = model.bn.mean.value + 1  # local statistics move
    again = collections.OrderedDict((n, np.full(np.shape(v), 9.0, np.float32)) for n, v in layout.items())
    model, state = receive(fedbn, whole(again), model, state, layout=layout, whole_model=True, version=4)
    flat = jlx.flatten(model)
    assert (np.asarray(flat["bn/mean"]) == 4).all() and (np.asarray(flat["fc/kernel"]) == 9).all()
    assert state.version == 4


def test_push_with_quantization_sends_the_update_over_what_was_pulled():
    model = {"w": np.array([1.0, 2.0, 3.0, 4.0], np.float32)}
    exchanger = jlx.FullParameterExchanger(quantize="int8", error_feedback=True)
    layout = jlx.flatten(model)
    model, state = receive(exchanger, whole(layout), model, ClientState(), layout=layout, whole_model=True, version=0)
    trained = {"w": np.array([1.5, 2.0, 2.9, 4.0001], np.float32)}
    payload, state = push(exchanger, trained, model, state)
    sent = payload["w"]
    update = trained["w"] - model["w"]
    scale = np.float32(np.abs(update).max()) * np.float32(1 / 127)
    expected_q = np.clip(np.rint(update * (np.float32(1) / scale)), -127, 127).astype(np.int8)
    assert sent.quantized == "int8" and np.float32(sent.scale) == scale
    np.testing.assert_array_equal(sent.values, expected_q)
    np.testing.assert_allclose(state.exchange.residual["w"], update - expected_q * scale, atol=1e-7)
    # and the library's quantizer agrees with that reference
    q, s = quantize_update(update, np.True_, "int8")
    np.testing.assert_array_equal(np.asarray(q), expected_q)


def test_client_state_saves_and_restores_bit_for_bit():
    import ml_dtypes

    state = ClientState(
        3,
        jlx.ExchangeState(
            collections.OrderedDict(w=np.array([1.5, -0.0], ml_dtypes.bfloat16)),
            collections.OrderedDict(w=np.array([0.25, 1e-9], np.float32)),
        ),
    )
    back = ClientState.from_arrays(3, state.to_arrays())
    assert back.version == 3
    assert back.exchange.reference["w"].dtype == ml_dtypes.bfloat16
    assert (
        back.exchange.reference["w"].view(np.uint16).tolist() == state.exchange.reference["w"].view(np.uint16).tolist()
    )
    np.testing.assert_array_equal(back.exchange.residual["w"], state.exchange.residual["w"])
    with pytest.raises(ValueError, match="not an exchange state entry"):
        jlx.ExchangeState.from_arrays({"weights/w": np.zeros(1)})
