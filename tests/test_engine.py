"""The vmapped simulation round against the packed path (sharded rounds: tests/test_sharding.py)."""

import copy
import pathlib

import jax
import numpy as np
import pytest
from conftest import RefLayer, npy_size, ref_message_nbytes, slow

import jaxlayerx as jlx
from jaxlayerx.simulation import ExchangerSpec, Simulation, SimulationConfig, load_digits_data, make_client_data
from jaxlayerx.simulation.accounting import round_record
from jaxlayerx.wire import LEGACY

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data():
    x, y = load_digits_data()
    return make_client_data(x[:600], y[:600], num_clients=4, beta=0.5, seed=3)


def client_model(layers, client, like):
    """Client ``client``'s Linen variables out of stacked flat layers."""
    return jlx.unflatten({name: np.asarray(value[client]) for name, value in layers.items()}, like=like)


def replay_pull(exchanger, server_payload, first, second, client, like):
    """Client ``client`` pulls the server's round-1 payload into its own trained model: the
    result must be its round-2 start in the vmapped round. Returns its round-2 trained
    and start models."""
    pulled = exchanger.pull_parameters(server_payload, client_model(first.trained_layers, client, like))
    for name, value in jlx.flatten(pulled).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(second.start_layers[name][client]), err_msg=name)
    return client_model(second.trained_layers, client, like), client_model(second.start_layers, client, like)


@pytest.mark.parametrize(
    "spec",
    [
        ExchangerSpec("dynamic-percentage", exchange_percentage=0.5),
        slow(ExchangerSpec("dynamic-percentage", exchange_percentage=0.3, normalize=False, select_drift_more=False)),
        slow(ExchangerSpec("dynamic-threshold", norm_threshold=2e-3)),
        slow(ExchangerSpec("dynamic-percentage", exchange_percentage=0.4, measure="rms")),
        ExchangerSpec("dynamic-threshold", norm_threshold=0.02, measure="relative"),
        ExchangerSpec("dynamic-budget", byte_fraction=0.3),
        slow(ExchangerSpec("dynamic-budget", byte_fraction=0.6)),
    ],
    ids=[
        "percentage",
        "percentage-less-unnormalized",
        "threshold",
        "percentage-rms",
        "threshold-relative",
        "budget-0.3",
        "budget-0.6",
    ],
)
def test_masked_round_equals_packed_replay(data, spec):
    """Round 2 replayed client by client through push_parameters, FedAvgDynamicLayer and
    pull_parameters gives the layers, the selection and the global model of the vmapped round."""
    simulation = Simulation(spec, SimulationConfig(rounds=2, local_steps=3, batch_size=8, seed=5), data)
    like = simulation.initial_variables
    first = simulation.round(simulation.init_state(), 1)
    second = simulation.round(first.state, 2)
    exchanger = simulation.exchanger  # the very object whose send_mask ran inside the round

    # The start of round 2: each client pulls the server's packed round-1 layers into its own model.
    sent_round_1 = [name for name, flag in first.state.pull_mask.items() if bool(flag)]
    server_payload = jlx.pack_layers([np.asarray(first.state.global_layers[n]) for n in sent_round_1], sent_round_1)
    results = []
    for client in range(data.num_clients):
        trained, start = replay_pull(exchanger, server_payload, first, second, client, like)
        # Its push selects exactly the layers the mask form selected.
        payload = exchanger.push_parameters(trained, initial_model=start)
        _, names = jlx.unpack_layers(payload)
        expected = [name for name, mask in second.send_masks.items() if bool(mask[client])]
        assert names == expected
        results.append((payload, int(data.n_train[client])))

    averaged = jlx.FedAvgDynamicLayer(weighted_aggregation=True).aggregate(results)
    server = exchanger.pull_parameters(
        jlx.pack_layers(list(averaged.values()), list(averaged)),
        jlx.unflatten(first.state.global_layers, like=like),
    )
    for name, value in jlx.flatten(server).items():
        np.testing.assert_allclose(
            np.asarray(second.state.global_layers[name]), value, rtol=1e-6, atol=1e-7, err_msg=name
        )
    assert sorted(averaged) == sorted(n for n, flag in second.state.pull_mask.items() if bool(flag))


@pytest.mark.parametrize(
    "spec",
    [
        slow(ExchangerSpec("sparse-largest-magnitude-change", sparsity_level=0.1)),
        ExchangerSpec("sparse-smallest-final-magnitude", sparsity_level=0.3),
        slow(ExchangerSpec("sparse-largest-increase-in-magnitude", sparsity_level=0.05)),
    ],
    ids=["largest-change", "smallest-final", "largest-increase"],
)
def test_masked_sparse_round_equals_packed_replay(data, spec):
    """Round 2 replayed client by client through SparseCooParameterExchanger and
    FedAvgSparseCooTensor gives the starts, the kept weights and the global model of the
    vmapped round; the bytes it records are those of the real payloads: on the Message API
    (compact ArrayRecords, written and counted independently) and on the legacy route (the
    fl4health COO payloads, their numpy.save blobs)."""
    simulation = Simulation(spec, SimulationConfig(rounds=2, local_steps=3, batch_size=8, seed=5), data)
    like = simulation.initial_variables
    first = simulation.round(simulation.init_state(), 1)
    second = simulation.round(first.state, 2)
    exchanger = simulation.exchanger

    # The server's round-1 payload: exactly the weights some client sent, in COO form.
    server_payload = coo_payload(first.state.global_layers, first.state.pull_mask)
    results, upload, legacy_upload = [], [], []
    for client in range(data.num_clients):
        trained, start = replay_pull(exchanger, server_payload, first, second, client, like)
        payload = exchanger.push_parameters(trained, initial_model=start)
        kept = {name: np.zeros(np.shape(value), bool) for name, value in jlx.flatten(trained).items()}
        sent = jlx.read_coo(payload)
        for name, layer in sent.items():
            kept[name].reshape(-1)[layer.flat_indices] = True
        for name, mask in second.send_masks.items():
            np.testing.assert_array_equal(kept[name], np.asarray(mask[client]), err_msg=name)
        results.append((payload, int(data.n_train[client])))
        # The same entries as the Message API's compact payload, and the legacy COO payload itself.
        upload.append(ref_message_nbytes(entries_of(sent)))
        legacy_upload.append(sum(npy_size(array) for array in payload))

    averaged = jlx.FedAvgSparseCooTensor(weighted_aggregation=True).aggregate(results)
    server = jlx.merge_sparse_layers(jlx.unflatten(first.state.global_layers, like=like), averaged)
    for name, value in jlx.flatten(server).items():
        np.testing.assert_allclose(
            np.asarray(second.state.global_layers[name]), value, rtol=1e-6, atol=1e-7, err_msg=name
        )
    for name, layer in averaged.items():
        np.testing.assert_array_equal(np.flatnonzero(np.asarray(second.state.pull_mask[name])), layer.flat_indices)
    record = round_record(2, second, simulation.accounting, simulation.data.n_test)
    assert record["client_upload_bytes"] == upload
    assert record["upload_bytes"] == sum(upload)
    # Every client took part in round 1: each is sent the entries the server changed in it.
    download = ref_message_nbytes(entries_of(jlx.read_coo(server_payload)))
    assert record["client_download_bytes"] == [download] * data.num_clients
    assert record["download_bytes"] == data.num_clients * download
    legacy_up, legacy_down = simulation.message_bytes(jax.device_get(second.metrics), LEGACY)
    assert legacy_up == legacy_upload
    assert legacy_down == [sum(npy_size(array) for array in server_payload)] * data.num_clients


def entries_of(sparse):
    """``name -> SparseLayer`` as the compact wire's layers: a layer sent whole is dense."""
    layers = {}
    for name, layer in sparse.items():
        order = np.argsort(layer.flat_indices)  # the compact wire lists entries ascending
        flat = np.asarray(layer.flat_indices)[order]
        whole = flat.size == np.prod(layer.shape)
        layers[name] = RefLayer(np.asarray(layer.values)[order], None if whole else flat, tuple(layer.shape))
    return layers


@pytest.mark.parametrize(
    "spec",
    [
        slow(ExchangerSpec("dynamic-threshold", norm_threshold=2e-3, error_feedback=True)),
        slow(ExchangerSpec("dynamic-percentage", exchange_percentage=0.3, measure="rms", error_feedback=True)),
        ExchangerSpec("dynamic-budget", byte_fraction=0.5, error_feedback=True),  # differs from no feedback by round 3
        slow(ExchangerSpec("sparse-largest-magnitude-change", sparsity_level=0.1, error_feedback=True)),
    ],
    ids=["threshold", "percentage-rms", "budget", "sparse"],
)
def test_error_feedback_rounds_equal_a_packed_replay(data, spec):
    """Three rounds replayed with one exchanger object per client (its own reference),
    through pull_parameters, push_parameters and the core servers: every start, every
    selection, every reference and every global model equals the vmapped rounds'."""
    simulation = Simulation(spec, SimulationConfig(rounds=3, local_steps=3, batch_size=8, seed=5), data)
    like = simulation.initial_variables
    outputs = [output for _, output in simulation.iterate()]
    clients = [copy.deepcopy(simulation.exchanger) for _ in range(data.num_clients)]
    sparse = simulation.exchanger.payload_kind == "sparse"
    everything = {name: np.ones(np.shape(v), bool) for name, v in jlx.flatten(like).items()}
    global_layers = jlx.flatten(like)
    server_payload = (
        coo_payload(global_layers, everything)
        if sparse
        else jlx.pack_layers(list(global_layers.values()), list(global_layers))
    )
    own = [like] * data.num_clients
    sent_any = []
    for output in outputs:
        results = []
        for client, exchanger in enumerate(clients):
            start = exchanger.pull_parameters(server_payload, own[client])
            for name, value in jlx.flatten(start).items():
                np.testing.assert_array_equal(
                    np.asarray(value), np.asarray(output.start_layers[name][client]), err_msg=name
                )
            # The exchanger's reference is the simulation's per-client reference.
            assert list(exchanger.state.reference) == simulation.layer_names
            for name, value in exchanger.state.reference.items():
                np.testing.assert_array_equal(value, np.asarray(output.state.references[name][client]), err_msg=name)
            trained = client_model(output.trained_layers, client, like)
            payload = exchanger.push_parameters(trained, initial_model=start)
            assert_selection_equals_mask(payload, sparse, output.send_masks, client, trained)
            sent_any.append(any(bool(np.any(output.send_masks[n][client])) for n in simulation.layer_names))
            results.append((payload, int(data.n_train[client])))
            own[client] = trained
        if sparse:
            averaged = jlx.FedAvgSparseCooTensor().aggregate(results)
            merged = jlx.merge_sparse_layers(jlx.unflatten(global_layers, like=like), averaged)
            server_payload = jlx.write_coo(averaged)
        else:
            averaged = jlx.FedAvgDynamicLayer().aggregate(results)
            merged = jlx.merge_layers(jlx.unflatten(global_layers, like=like), averaged)
            server_payload = jlx.pack_layers(list(averaged.values()), list(averaged))
        global_layers = jlx.flatten(merged)
        for name, value in global_layers.items():
            np.testing.assert_allclose(
                np.asarray(output.state.global_layers[name]), value, rtol=1e-6, atol=1e-7, err_msg=name
            )
        # The replay goes on from the simulation's own global model (float rounding aside).
        global_layers = jlx.flatten(jlx.unflatten(output.state.global_layers, like=like))
        server_payload = (
            coo_payload(global_layers, output.state.pull_mask)
            if sparse
            else named_payload(global_layers, output.state.pull_mask)
        )
    assert any(sent_any) and not all(
        all(bool(np.all(o.send_masks[n])) for n in simulation.layer_names) for o in outputs
    ), "the rule must send something, and not everything"


def assert_selection_equals_mask(payload, sparse, send_masks, client, trained):
    if sparse:
        kept = {name: np.zeros(np.shape(value), bool) for name, value in jlx.flatten(trained).items()}
        for name, layer in jlx.read_coo(payload).items():
            kept[name].reshape(-1)[layer.flat_indices] = True
        for name, mask in send_masks.items():
            np.testing.assert_array_equal(kept[name], np.asarray(mask[client]), err_msg=name)
    else:
        _, names = jlx.unpack_layers(payload)
        assert names == [name for name, mask in send_masks.items() if bool(mask[client])]


def named_payload(layers, masks):
    """The named payload of the layers ``masks`` marks (the server's answer)."""
    names = [name for name, flag in masks.items() if bool(flag)]
    return jlx.pack_layers([np.asarray(layers[name]) for name in names], names)


def coo_payload(layers, masks):
    """The COO payload of ``layers`` at the entries ``masks`` marks (the server's answer)."""
    sparse = {}
    for name, mask in masks.items():
        flat = np.flatnonzero(np.asarray(mask))
        if flat.size:
            sparse[name] = jlx.SparseLayer(
                np.asarray(layers[name]).reshape(-1)[flat], flat, tuple(np.shape(layers[name]))
            )
    return jlx.write_coo(sparse)


def test_static_exchanger_keeps_unexchanged_layers_local(data):
    """FedBN: BatchNorm layers never leave a client, everything else is the server's average."""
    simulation = Simulation(ExchangerSpec("exclude-bn"), SimulationConfig(rounds=2, local_steps=3, batch_size=8), data)
    first = simulation.round(simulation.init_state(), 1)
    second = simulation.round(first.state, 2)
    for name in simulation.layer_names:
        for client in range(data.num_clients):
            start = np.asarray(second.start_layers[name][client])
            if "BatchNorm" in name:
                np.testing.assert_array_equal(start, np.asarray(first.trained_layers[name][client]))
            else:
                np.testing.assert_array_equal(start, np.asarray(first.state.global_layers[name]))
    masks = np.stack([np.asarray(m) for m in second.send_masks.values()], axis=1)
    assert (masks.sum(axis=1) == sum("BatchNorm" not in n for n in simulation.layer_names)).all()
