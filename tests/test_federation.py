"""Client sampling, catch-up pulls, chunked rounds, server optimizers, local Adam, NNX
models and the CNN of the simulation, each against an independent reference.

The expectations come from numpy/optax re-implementations written here, from hand values,
or from the packed (host) path of the core library; never from the simulation's own output
for the quantity under test. Simulations are tiny and shared through module-scoped
fixtures: compiling a round dominates the time.
"""

import copy
import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from conftest import NNX_DIGITS_LAYERS, NNX_DIGITS_PARAMS, NnxDigitsNet, RefLayer, npy_size, ref_message_nbytes, slow
from flax import nnx

import jaxlayerx as jlx
from jaxlayerx.simulation import ExchangerSpec, Simulation, SimulationConfig, load_digits_data, make_client_data
from jaxlayerx.simulation.models import CNN
from jaxlayerx.simulation.server import init_server_state, server_optimizer, server_step
from jaxlayerx.wire import LEGACY

SEED = 3
DYNAMIC = ExchangerSpec("dynamic-percentage", exchange_percentage=0.5)
DYNAMIC_EF = ExchangerSpec("dynamic-percentage", exchange_percentage=0.5, error_feedback=True)
FULL = ExchangerSpec("full")
SPARSE = ExchangerSpec("sparse-largest-magnitude-change", sparsity_level=0.1)
#: The client of the 8-client federation that has no test examples.
UNTESTED = 2


# -- data and shared runs ----------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_digits_data()


@pytest.fixture(scope="module")
def data12(digits):
    x, y = digits
    return make_client_data(x[:720], y[:720], num_clients=12, beta=0.5, seed=1)


@pytest.fixture(scope="module")
def data8(digits):
    """8 clients, one of which (``UNTESTED``) has no test examples."""
    x, y = digits
    data = make_client_data(x[:480], y[:480], num_clients=8, beta=0.5, seed=1)
    n_test = np.array(data.n_test)
    n_test[UNTESTED] = 0
    return dataclasses.replace(data, n_test=n_test)


def config12(**overrides):
    return SimulationConfig(
        **{**{"rounds": 4, "local_steps": 2, "batch_size": 8, "clients_per_round": 4, "seed": SEED}, **overrides}
    )


def config8(**overrides):
    return SimulationConfig(
        **{**{"rounds": 4, "local_steps": 2, "batch_size": 8, "clients_per_round": 6, "seed": SEED}, **overrides}
    )


class Run:
    """A simulation run to the end: its records, outputs and the states between rounds."""

    def __init__(self, simulation):
        self.simulation = simulation
        self.records, self.outputs = [], []
        for record, output in simulation.iterate():
            self.records.append(record)
            self.outputs.append(output)
        self.states = [simulation.init_state()] + [output.state for output in self.outputs]


@pytest.fixture(scope="module")
def runs(data8):
    """``runs(spec, **config8 overrides)``: the 8-client runs, each run once."""
    cache = {}

    def get(spec, **overrides):
        key = (spec, tuple(sorted(overrides.items())))
        if key not in cache:
            cache[key] = Run(Simulation(spec, config8(**overrides), data8))
        return cache[key]

    return get


@pytest.fixture(scope="module")
def dynamic12(data12):
    return Run(Simulation(DYNAMIC, config12(), data12))


# -- helpers -------------------------------------------------------------------------------


def host(layers):
    return {name: np.asarray(value) for name, value in layers.items()}


def reference_clients(seed, num_clients, per_round, round_index):
    """The documented draw, written out with numpy."""
    return np.sort(np.random.default_rng([seed, 2, round_index]).choice(num_clients, per_round, replace=False))


def client_model(layers, index, like):
    """Row ``index`` of stacked flat layers, as Linen variables."""
    return jlx.unflatten({name: np.asarray(value[index]) for name, value in layers.items()}, like=like)


def compact_layers(entries, initial):
    """The compact wire's layers of a payload holding, of each layer of ``initial``, the
    entries its boolean ``entries[name]`` marks (a scalar marks the whole layer): in model
    order, a layer sent whole dense, no layer for nothing sent."""
    layers = {}
    for name, layer in initial.items():
        flat = np.flatnonzero(np.broadcast_to(entries[name], layer.shape))
        if flat.size:
            whole = flat.size == layer.size
            layers[name] = RefLayer(layer.reshape(-1)[flat], None if whole else flat, layer.shape)
    return layers


def legacy_size(entries, initial, *, entrywise, whole_model=False):
    """Bytes of the legacy route's payload of the same entries (fl4health's layouts, each
    array's numpy.save blob): the whole model unnamed; whole layers with their names; a
    sparse server's or client's entries as COO (values, int64 indices, int64 shape, names)."""
    if whole_model:
        return sum(npy_size(layer) for layer in initial.values())
    counts = {name: int(np.count_nonzero(np.broadcast_to(entries[name], initial[name].shape))) for name in initial}
    sent = [name for name, count in counts.items() if count > 0]
    total = npy_size(np.array(sent, dtype=np.str_))
    for name in sent:
        layer = initial[name]
        if not entrywise:
            total += npy_size(layer)
        else:
            total += npy_size(np.zeros(counts[name], layer.dtype))
            total += npy_size(np.zeros((counts[name], layer.ndim), np.int64)) + npy_size(np.zeros(layer.ndim, np.int64))
    return total


def expected_bytes(simulation, previous, output):
    """Each sampled client's ``(upload, download)`` of a round recomputed from the previous
    state and the masks: on the Message API (compact records, written by the reference
    codec and counted by Flower) and on the legacy route (numpy.save blobs)."""
    entrywise = simulation.exchanger.payload_kind == "sparse"
    initial = host(simulation.initial_layers)
    updated, synced = host(previous.updated_in), np.asarray(previous.synced)
    masks = host(output.send_masks)
    message = {"upload": [], "download": []}
    legacy = {"upload": [], "download": []}
    for row, client in enumerate(np.asarray(output.clients)):
        first = synced[client] < 0
        pulled = {name: first or updated[name] > synced[client] for name in initial}  # first: the whole model
        message["download"].append(ref_message_nbytes(compact_layers(pulled, initial)))
        legacy["download"].append(legacy_size(pulled, initial, entrywise=entrywise, whole_model=first))
        sent = {name: masks[name][row] for name in initial}
        message["upload"].append(ref_message_nbytes(compact_layers(sent, initial)))
        legacy["upload"].append(legacy_size(sent, initial, entrywise=entrywise))
    return message, legacy


def reconstructed_starts(previous, clients):
    """Each sampled client's start: its own layers, with what changed since its sync taken
    from the global model."""
    own, global_layers, updated = host(previous.client_layers), host(previous.global_layers), host(previous.updated_in)
    synced = np.asarray(previous.synced)
    return {
        name: np.stack([np.where(updated[name] > synced[c], global_layers[name], own[name][c]) for c in clients])
        for name in own
    }


def assert_records_close(actual, expected):
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if key == "wall_seconds":
            continue
        if isinstance(value, float):
            np.testing.assert_allclose(actual[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
        elif key.startswith(("local_", "train_")) and isinstance(value, list):
            assert [a is None for a in actual[key]] == [a is None for a in value]
            np.testing.assert_allclose(
                [a for a in actual[key] if a is not None], [a for a in value if a is not None], rtol=1e-5, atol=1e-6
            )
        else:
            assert actual[key] == value, key


# -- 1. sampling ---------------------------------------------------------------------------


def test_sampling_matches_the_reference_draw_and_is_deterministic(data12, dynamic12):
    records = dynamic12.records
    for round_index, record in enumerate(records[:3], start=1):
        clients = record["clients"]
        assert len(clients) == 4 and len(set(clients)) == 4
        assert clients == sorted(clients) and all(isinstance(c, int) and 0 <= c < 12 for c in clients)
        assert clients == reference_clients(SEED, 12, 4, round_index).tolist()
        assert np.asarray(dynamic12.outputs[round_index - 1].clients).tolist() == clients
        assert len(record["layers_sent"]) == 4 and len(record["local_accuracy"]) == 4

    # A fresh simulation with the same seed: same clients, same metrics.
    again = Simulation(DYNAMIC, config12(rounds=3), data12).run()
    for first, second in zip(records[:3], again, strict=True):
        assert {k: v for k, v in first.items() if k != "wall_seconds"} == {
            k: v for k, v in second.items() if k != "wall_seconds"
        }

    # Another seed draws other clients (and the documented draw for it).
    other = Simulation(DYNAMIC, config12(seed=SEED + 1), data12)
    draws = [other.sample_clients(r).tolist() for r in (1, 2, 3)]
    assert draws == [reference_clients(SEED + 1, 12, 4, r).tolist() for r in (1, 2, 3)]
    assert draws != [record["clients"] for record in records[:3]]


def test_all_clients_when_none_or_all_are_sampled(data12):
    for per_round in (None, 12):
        simulation = Simulation(FULL, config12(clients_per_round=per_round), data12)
        for round_index in (1, 2, 7):
            assert simulation.sample_clients(round_index).tolist() == list(range(12))
    with pytest.raises(ValueError):
        Simulation(FULL, config12(clients_per_round=13), data12)


# -- 2. who changes, synced and updated_in -------------------------------------------------


def test_unsampled_clients_keep_their_layers_and_sync_rules(dynamic12):
    simulation = dynamic12.simulation
    names = simulation.layer_names
    synced = np.full(12, -1)
    updated = {name: 0 for name in names}
    for round_index, output in enumerate(dynamic12.outputs, start=1):
        before, after = dynamic12.states[round_index - 1], output.state
        clients = reference_clients(SEED, 12, 4, round_index)
        own_before, own_after, trained = (
            host(before.client_layers),
            host(after.client_layers),
            host(output.trained_layers),
        )
        for client in range(12):
            if client in clients:
                row = clients.tolist().index(client)
                for name in names:
                    np.testing.assert_array_equal(own_after[name][client], trained[name][row], err_msg=name)
                assert not np.array_equal(
                    own_after["params/Dense_2/bias"][client], own_before["params/Dense_2/bias"][client]
                )
            else:
                for name in names:
                    assert np.array_equal(own_after[name][client], own_before[name][client]), (
                        round_index,
                        client,
                        name,
                    )
        # Hand rules: a client sampled in round r holds round r-1's global model; a layer
        # some client sent was updated in round r, the others keep their round.
        synced[clients] = round_index - 1
        masks = host(output.send_masks)
        for name in names:
            if masks[name].any():
                updated[name] = round_index
        assert np.asarray(after.synced).tolist() == synced.tolist()
        assert {name: int(value) for name, value in host(after.updated_in).items()} == updated
        assert int(after.round_index) == round_index
        for name in names:  # the global model moved exactly where some client sent
            moved = not np.array_equal(np.asarray(after.global_layers[name]), np.asarray(before.global_layers[name]))
            assert moved == bool(masks[name].any()), (round_index, name)
    # Round 1 by hand: the sampled clients hold round 0; every layer sent so far carries 1.
    first = dynamic12.outputs[0].state
    expected = np.full(12, -1)
    expected[reference_clients(SEED, 12, 4, 1)] = 0
    assert np.asarray(first.synced).tolist() == expected.tolist()
    assert {int(v) for v in host(first.updated_in).values()} <= {0, 1}
    assert 0 < sum(int(v) for v in host(first.updated_in).values())


# -- 3. bytes of catch-up pulls --------------------------------------------------------------


@pytest.mark.parametrize("which", ["dynamic", slow("full"), "sparse"])
def test_upload_and_download_bytes_follow_the_catch_up_rule(which, dynamic12, runs, data8):
    run = {"dynamic": lambda: dynamic12, "full": lambda: runs(FULL), "sparse": lambda: runs(SPARSE)}[which]()
    simulation = run.simulation
    returning = 0
    for round_index, (record, output) in enumerate(zip(run.records, run.outputs), start=1):
        previous = run.states[round_index - 1]
        message, legacy = expected_bytes(simulation, previous, output)
        assert record["client_upload_bytes"] == message["upload"], round_index
        assert record["client_download_bytes"] == message["download"], round_index
        assert record["upload_bytes"] == sum(message["upload"]), round_index
        assert record["download_bytes"] == sum(message["download"]), round_index
        on_legacy = simulation.message_bytes(jax.device_get(output.metrics), LEGACY)
        assert on_legacy == (legacy["upload"], legacy["download"]), round_index
        returning += int(np.sum(np.asarray(previous.synced)[np.asarray(output.clients)] >= 0))
        masks = host(output.send_masks)
        assert record["layers_sent"] == [
            sum(bool(masks[n][row].any()) for n in masks) for row in range(len(record["clients"]))
        ]
    assert returning > 0, "some client must come back (a catch-up pull)"
    assert len(run.records) >= 4

    if which == "full":
        # The personal model of a full exchanger is the global one: local accuracy is the
        # global model's accuracy on the client's own test examples; None without any.
        for record, output in zip(run.records, run.outputs):
            global_layers = output.state.global_layers
            for client, accuracy in zip(record["clients"], record["local_accuracy"]):
                n = int(data8.n_test[client])
                if n == 0:
                    assert client == UNTESTED and accuracy is None
                    continue
                logits, _ = simulation.model.apply(global_layers, jnp.asarray(data8.x_test[client, :n]), train=False)
                expected = float(np.mean(np.argmax(np.asarray(logits), -1) == data8.y_test[client, :n]))
                assert accuracy == pytest.approx(expected, abs=1e-6)
            tested = [a for a in record["local_accuracy"] if a is not None]
            assert record["local_accuracy_mean"] == pytest.approx(np.mean(tested), rel=1e-6)
        assert any(UNTESTED in record["clients"] for record in run.records)


# -- 4. packed replay of sampled rounds --------------------------------------------------------


def test_sampled_rounds_equal_a_packed_replay(dynamic12, data12):
    simulation = dynamic12.simulation
    like = simulation.initial_variables
    for round_index, output in enumerate(dynamic12.outputs, start=1):
        previous = dynamic12.states[round_index - 1]
        clients = np.asarray(output.clients)
        starts = reconstructed_starts(previous, clients)
        for name, value in starts.items():
            np.testing.assert_array_equal(np.asarray(output.start_layers[name]), value, err_msg=name)
        results = []
        for row, client in enumerate(clients):
            exchanger = copy.deepcopy(simulation.exchanger)
            start = jlx.unflatten({name: value[row] for name, value in starts.items()}, like=like)
            trained = client_model(output.trained_layers, row, like)
            payload = exchanger.push_parameters(trained, initial_model=start)
            _, names = jlx.unpack_layers(payload)
            assert names == [name for name, mask in output.send_masks.items() if bool(mask[row])]
            results.append((payload, int(data12.n_train[client])))
        averaged = jlx.FedAvgDynamicLayer().aggregate(results)
        new_global = host(output.state.global_layers)
        old_global = host(previous.global_layers)
        for name in simulation.layer_names:
            if name in averaged:
                np.testing.assert_allclose(new_global[name], averaged[name], rtol=1e-6, atol=1e-7, err_msg=name)
                assert int(output.state.updated_in[name]) == round_index
            else:
                np.testing.assert_array_equal(new_global[name], old_global[name], err_msg=name)
                assert int(output.state.updated_in[name]) == int(previous.updated_in[name])


# -- 5. chunked rounds ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "chunk"),
    [slow(FULL, 2), (FULL, 4), slow(DYNAMIC_EF, 2), slow(DYNAMIC_EF, 4), slow(SPARSE, 2), slow(SPARSE, 4)],
    ids=["full-2", "full-4", "dynamic-ef-2", "dynamic-ef-4", "sparse-2", "sparse-4"],
)
def test_chunked_rounds_equal_unchunked(spec, chunk, runs):
    whole, chunked = runs(spec), runs(spec, chunk_size=chunk)
    assert 6 % 4 != 0  # chunk 4 of 6 clients leaves a remainder
    for actual, expected in zip(chunked.records, whole.records, strict=True):
        assert_records_close(actual, expected)
    for name, value in host(whole.outputs[-1].state.global_layers).items():
        np.testing.assert_allclose(
            np.asarray(chunked.outputs[-1].state.global_layers[name]), value, rtol=1e-5, atol=1e-6, err_msg=name
        )
    for name, value in host(whole.outputs[-1].state.client_layers).items():
        np.testing.assert_allclose(
            np.asarray(chunked.outputs[-1].state.client_layers[name]), value, rtol=1e-5, atol=1e-6, err_msg=name
        )
    np.testing.assert_array_equal(
        np.asarray(chunked.outputs[-1].state.synced), np.asarray(whole.outputs[-1].state.synced)
    )


# -- 6. server optimizers --------------------------------------------------------------------------


def reference_optimizer(name, lr):
    return {
        "sgd": lambda: optax.sgd(lr),
        "adam": lambda: optax.adam(lr, b1=0.9, b2=0.99, eps=1e-3),
        "yogi": lambda: optax.yogi(lr, b1=0.9, b2=0.99, eps=1e-3),
        "adagrad": lambda: optax.adagrad(lr, initial_accumulator_value=0.0, eps=1e-3),
    }[name]()


def reference_server_step(optimizer, global_layers, averages, sent, state):
    """One optax update of the whole tree, then numpy ``where``: a layer (weight) moves
    where sent; the state's leaves under a layer's name and of its shape are kept where it
    was not sent, the others (step counts) advance every round."""
    current = {name: np.asarray(layer, np.float32) for name, layer in global_layers.items()}
    gradient = {name: jnp.asarray(current[name] - np.asarray(averages[name], np.float32)) for name in current}
    updates, stepped = optimizer.update(gradient, state, {n: jnp.asarray(v) for n, v in current.items()})
    new_global = {}
    for name, layer in global_layers.items():
        value = np.where(np.asarray(sent[name]), current[name] + np.asarray(updates[name]), current[name])
        if not jnp.issubdtype(np.asarray(layer).dtype, jnp.floating):  # numpy does not count bfloat16
            value = np.rint(value)
        new_global[name] = value.astype(np.asarray(layer).dtype)

    def keep(path, new, old):
        names = [key.key for key in path if isinstance(key, jax.tree_util.DictKey) and key.key in current]
        if names and np.shape(new) == current[names[-1]].shape:
            return np.where(np.asarray(sent[names[-1]]), np.asarray(new), np.asarray(old))
        return np.asarray(new)

    return new_global, jax.tree_util.tree_map_with_path(keep, stepped, state)


def layer_state(state, layer):
    """The leaves of ``state`` under the layer's name."""
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return [
        np.asarray(leaf)
        for path, leaf in leaves
        if any(isinstance(key, jax.tree_util.DictKey) and key.key == layer for key in path)
    ]


def tiny_tree():
    return {"a": np.array([0.5, -1.0, 2.0], np.float32), "b": np.array([[1.0, -2.0], [0.25, 3.0]], np.float32)}


AVERAGES = [
    {"a": np.array([0.1, -0.5, 2.5], np.float32), "b": np.array([[0.5, -1.0], [0.75, 2.0]], np.float32)},
    {"a": np.array([1.0, 0.0, 1.0], np.float32), "b": np.array([[2.0, -3.0], [0.0, 3.5]], np.float32)},
    {"a": np.array([-0.2, 0.3, 2.2], np.float32), "b": np.array([[0.9, -2.5], [0.5, 2.5]], np.float32)},
]
LAYER_MASKS = [{"a": True, "b": True}, {"a": False, "b": True}, {"a": True, "b": True}]  # "a" skipped in step 2
WEIGHT_MASKS = [
    {"a": np.array([True, False, True]), "b": np.array([[True, True], [False, True]])},
    {"a": np.array([True, True, True]), "b": np.zeros((2, 2), bool)},  # "b" skipped in step 2
    {"a": np.array([False, True, True]), "b": np.array([[False, True], [True, False]])},
]


def with_fallback(average, global_layers, sent):
    """What masked_fedavg gives the server: the global value wherever nothing was sent."""
    return {name: np.where(np.asarray(sent[name]), average[name], global_layers[name]) for name in average}


def scalar_leaves(state):
    return [int(leaf) for leaf in jax.tree.leaves(state) if np.ndim(leaf) == 0]


@pytest.mark.parametrize("masks", [LAYER_MASKS, WEIGHT_MASKS], ids=["per-layer", "per-weight"])
@pytest.mark.parametrize(
    "name, lr, reference_lr",
    [
        ("sgd", None, 1.0),
        ("sgd", 0.5, 0.5),
        ("adam", None, 0.01),
        ("adam", 0.3, 0.3),
        ("yogi", None, 0.01),
        ("yogi", 0.2, 0.2),
        ("adagrad", None, 0.1),
        ("adagrad", 0.4, 0.4),
    ],
)
def test_server_step_against_optax(name, lr, reference_lr, masks):
    optimizer = server_optimizer(name, lr)
    reference = reference_optimizer(name, reference_lr)
    global_layers = jlx.FlatView(tiny_tree().items())
    state = init_server_state(optimizer, global_layers)
    ref_global = dict(tiny_tree())
    ref_state = reference.init({n: jnp.asarray(v) for n, v in ref_global.items()})
    for step, (average, mask) in enumerate(zip(AVERAGES, masks)):
        average = with_fallback(average, host(global_layers), mask)
        sent = jlx.FlatView((n, jnp.asarray(m)) for n, m in mask.items())
        skipped = [n for n, m in mask.items() if not np.any(m)]
        before = {n: (np.asarray(global_layers[n]).copy(), layer_state(state, n)) for n in skipped}
        global_layers, state = server_step(
            optimizer, global_layers, jlx.FlatView((n, jnp.asarray(v)) for n, v in average.items()), sent, state
        )
        ref_global, ref_state = reference_server_step(reference, ref_global, average, mask, ref_state)
        for layer in ("a", "b"):
            assert np.asarray(global_layers[layer]).dtype == np.float32
            np.testing.assert_allclose(
                np.asarray(global_layers[layer]), ref_global[layer], rtol=1e-6, atol=1e-7, err_msg=f"{step} {layer}"
            )
        for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state), strict=True):
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-7, err_msg=f"{step} state")
        for layer, (value, old_state) in before.items():  # a layer nobody sent keeps its value and its state
            np.testing.assert_array_equal(np.asarray(global_layers[layer]), value)
            for got, want in zip(layer_state(state, layer), old_state, strict=True):
                np.testing.assert_array_equal(got, want)
    if name in ("adam", "yogi"):  # one step count for the whole model: it advances every round
        assert scalar_leaves(state) == [len(masks)]


def test_server_clip_by_global_norm_sees_the_whole_model():
    """optax.clip_by_global_norm as the server optimizer clips the pseudo-gradient of all
    layers together (numpy: scaled by max_norm / its global norm), not layer by layer."""
    global_layers = jlx.FlatView(tiny_tree().items())
    average = {"a": np.array([0.1, -0.5, 2.5], np.float32), "b": np.array([[0.5, -1.0], [0.75, 2.0]], np.float32)}
    optimizer = optax.chain(optax.clip_by_global_norm(0.5), optax.sgd(1.0))
    sent = jlx.FlatView((n, jnp.asarray(True)) for n in average)
    new_global, _ = server_step(
        optimizer,
        global_layers,
        jlx.FlatView((n, jnp.asarray(v)) for n, v in average.items()),
        sent,
        init_server_state(optimizer, global_layers),
    )
    pseudo = {n: tiny_tree()[n] - average[n] for n in average}
    norm = np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in pseudo.values()))
    assert norm > 0.5  # the clip acts
    for n in average:
        np.testing.assert_allclose(
            np.asarray(new_global[n]), tiny_tree()[n] - pseudo[n] * (0.5 / norm), rtol=1e-6, atol=1e-7, err_msg=n
        )


def test_server_sgd_and_avg_by_hand():
    global_layers = jlx.FlatView(tiny_tree().items())
    average = {"a": np.array([0.1, -0.5, 2.5], np.float32), "b": np.array([[0.5, -1.0], [0.75, 2.0]], np.float32)}
    sent = jlx.FlatView([("a", jnp.asarray(np.array([True, False, True]))), ("b", jnp.asarray(False))])
    fallback = with_fallback(average, tiny_tree(), sent)
    averages = jlx.FlatView((n, jnp.asarray(v)) for n, v in fallback.items())
    # avg: the averages as they are, and no state.
    assert len(init_server_state(None, global_layers)) == 0
    new, state = server_step(None, global_layers, averages, sent, jlx.FlatView())
    np.testing.assert_array_equal(np.asarray(new["a"]), np.array([0.1, -1.0, 2.5], np.float32))
    np.testing.assert_array_equal(np.asarray(new["b"]), tiny_tree()["b"])
    assert len(state) == 0
    # sgd lr 1: the average where sent.
    optimizer = server_optimizer("sgd", 1.0)
    new, _ = server_step(optimizer, global_layers, averages, sent, init_server_state(optimizer, global_layers))
    np.testing.assert_allclose(np.asarray(new["a"]), [0.1, -1.0, 2.5], rtol=1e-7)
    np.testing.assert_array_equal(np.asarray(new["b"]), tiny_tree()["b"])
    # sgd lr 0.5: half way.
    optimizer = server_optimizer("sgd", 0.5)
    new, _ = server_step(optimizer, global_layers, averages, sent, init_server_state(optimizer, global_layers))
    np.testing.assert_allclose(np.asarray(new["a"]), [0.3, -1.0, 2.25], rtol=1e-6)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_server_step_keeps_bf16_and_rounds_int32_layers(name):
    global_layers = jlx.FlatView(
        [
            ("h", jnp.asarray(np.array([1.0, 3.0], ml_dtypes.bfloat16))),
            ("i", jnp.asarray(np.array([1, 2, 3, 7], np.int32))),
        ]
    )
    averages = jlx.FlatView(
        [
            ("h", jnp.asarray(np.array([2.0, 2.0078125], ml_dtypes.bfloat16))),
            ("i", jnp.asarray(np.array([2, 2, 6, 9], np.int32))),
        ]
    )
    sent = jlx.FlatView([("h", jnp.asarray(True)), ("i", jnp.asarray(np.array([True, True, True, False])))])
    lr = 0.5
    optimizer = server_optimizer(name, lr)
    state = init_server_state(optimizer, global_layers)
    new, state = server_step(optimizer, global_layers, averages, sent, state)
    assert new["h"].dtype == jnp.bfloat16 and new["i"].dtype == jnp.int32
    if name == "sgd":
        # 3 - 0.5 * (3 - 2.0078125) = 2.50390625, which bf16 holds as 2.5; ints round half to even.
        np.testing.assert_array_equal(np.asarray(new["h"]).astype(np.float32), [1.5, 2.5])
        np.testing.assert_array_equal(np.asarray(new["i"]), [2, 2, 4, 7])
    reference = reference_optimizer(name, lr)
    ref_global, _ = reference_server_step(
        reference,
        {n: np.asarray(v) for n, v in global_layers.items()},
        {n: np.asarray(v) for n, v in averages.items()},
        {n: np.asarray(v) for n, v in sent.items()},
        reference.init({n: jnp.asarray(np.asarray(v), jnp.float32) for n, v in global_layers.items()}),
    )
    np.testing.assert_array_equal(np.asarray(new["h"]).astype(np.float32), ref_global["h"].astype(np.float32))
    np.testing.assert_array_equal(np.asarray(new["i"]), ref_global["i"])
    for leaf in jax.tree.leaves(state):  # the optimizer runs in float32
        assert np.asarray(leaf).dtype == np.float32 or np.ndim(leaf) == 0


@pytest.mark.parametrize("name", ["sgd", "adam", "yogi", "adagrad"])
def test_server_optimizer_rejects_bad_learning_rates(name):
    for lr in (0, 0.0, -1, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            server_optimizer(name, lr)
    assert server_optimizer("avg") is None


def test_server_optimizer_and_config_errors():
    with pytest.raises(ValueError):
        server_optimizer("fedprox")
    with pytest.raises(ValueError):
        SimulationConfig(server_optimizer="fedprox")
    with pytest.raises(ValueError):
        SimulationConfig(server_lr=0.1)  # avg takes no learning rate
    with pytest.raises(ValueError):
        SimulationConfig(server_optimizer="avg", server_lr=1.0)
    with pytest.raises(ValueError):
        SimulationConfig(server_optimizer="adam", server_lr=0.0)
    with pytest.raises(ValueError):
        SimulationConfig(server_optimizer="yogi", server_lr=float("nan"))
    with pytest.raises(ValueError):
        SimulationConfig(local_optimizer="rmsprop")
    SimulationConfig(server_optimizer="adam", server_lr=0.1, local_optimizer="adam")  # fine


#: FedAdam on the server and Adam on the clients, in one run (one compilation).
ADAM_BOTH = {"server_optimizer": "adam", "local_optimizer": "adam", "learning_rate": 0.01}


def test_server_sgd_lr_1_is_fedavg(runs):
    avg, sgd = runs(FULL), runs(FULL, server_optimizer="sgd", server_lr=1.0)
    for round_index in range(3):
        assert sgd.records[round_index]["clients"] == avg.records[round_index]["clients"]
        for name, value in host(avg.outputs[round_index].state.global_layers).items():
            np.testing.assert_allclose(
                np.asarray(sgd.outputs[round_index].state.global_layers[name]),
                value,
                rtol=1e-5,
                atol=1e-6,
                err_msg=name,
            )


def weighted_average(trained, weights):
    return {
        n: (np.tensordot(weights, v.astype(np.float64), axes=1) / weights.sum()).astype(np.float32)
        for n, v in trained.items()
    }


@pytest.mark.slow  # whole runs; the fast tier checks each step against optax (test_research_api, test_server_step_against_optax)
def test_server_adam_rounds_equal_a_reference_and_differ_from_the_average(runs, data8):
    """Each round of a FedAdam run: the weighted average of the sampled clients' trained
    layers (numpy), then one optax Adam step per layer along global - average; the new
    global model is not the average (FedAvg's answer)."""
    run = runs(FULL, **ADAM_BOTH)
    reference = reference_optimizer("adam", 0.01)
    ref_state = reference.init({n: jnp.asarray(v, jnp.float32) for n, v in host(run.simulation.initial_layers).items()})
    for round_index, output in enumerate(run.outputs, start=1):
        previous = host(run.states[round_index - 1].global_layers)
        weights = data8.n_train[np.asarray(output.clients)].astype(np.float64)
        average = weighted_average(host(output.trained_layers), weights)
        sent = {n: np.asarray(True) for n in average}  # the full exchanger: everyone sends all
        expected, ref_state = reference_server_step(reference, previous, average, sent, ref_state)
        new_global = host(output.state.global_layers)
        for name, value in expected.items():
            np.testing.assert_allclose(new_global[name], value, rtol=1e-5, atol=2e-6, err_msg=f"{round_index} {name}")
        assert scalar_leaves(output.state.server_state) == [round_index]
        assert any(not np.allclose(new_global[n], average[n], rtol=1e-3, atol=1e-5) for n in average)


# -- 7. local Adam -------------------------------------------------------------------------------------


def reference_local_training(simulation, optimizer, start, client, round_index):
    """The documented local training: per step a batch of indices drawn with the step's key,
    one optimizer step on the mean softmax cross-entropy; BatchNorm statistics as the
    training-mode forward pass leaves them."""
    config, data = simulation.config, simulation.data
    _, batch_key = jax.random.split(jax.random.key(config.seed))
    key = jax.random.split(jax.random.fold_in(batch_key, round_index), data.num_clients)[client]
    x, y = jnp.asarray(data.x_train[client]), jnp.asarray(data.y_train[client])
    n = jnp.asarray(data.n_train[client], jnp.int32)
    names = list(start)
    layers = {name: jnp.asarray(value) for name, value in start.items()}
    params = {name: layers[name] for name in names if name.startswith("params/")}
    opt_state = optimizer.init(params)
    for step_key in jax.random.split(key, config.local_steps):
        index = jax.random.randint(step_key, (config.batch_size,), 0, n)
        xb, yb = x[index], y[index]

        def loss_fn(params, layers=layers, xb=xb, yb=yb):
            merged = jlx.FlatView((name, params.get(name, layers[name])) for name in names)
            logits, moved = simulation.model.apply(merged, xb, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), moved

        (_, moved), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        layers = {name: params[name] if name in params else moved[name] for name in names}
    return host(layers)


#: The bias of the dense layer before BatchNorm has a gradient that is zero but for float
#: noise (BatchNorm subtracts the batch mean), which Adam normalises into steps of about
#: the learning rate in either direction; the running mean after it inherits them. These
#: two are compared to within the learning rate, the rest closely.
NOISE_DRIVEN = ("params/Dense_0/bias", "batch_stats/BatchNorm_0/mean")


@pytest.mark.slow  # whole runs; the fast tier checks each step against optax (test_research_api, test_server_step_against_optax)
def test_local_adam_equals_a_reference_training_loop(runs):
    adam_run = runs(FULL, **ADAM_BOTH)
    sgd_run = runs(FULL)
    simulation = adam_run.simulation
    assert adam_run.records[0]["clients"] == sgd_run.records[0]["clients"]
    client = int(adam_run.outputs[0].clients[0])
    start = host(simulation.initial_layers)  # first contact: the whole initial model
    for name, value in start.items():
        np.testing.assert_array_equal(np.asarray(adam_run.outputs[0].start_layers[name][0]), value)
    expected_adam = reference_local_training(simulation, optax.adam(0.01), start, client, 1)
    expected_sgd = reference_local_training(sgd_run.simulation, optax.sgd(0.05, momentum=0.9), start, client, 1)
    adam_trained = {n: np.asarray(v[0]) for n, v in adam_run.outputs[0].trained_layers.items()}
    sgd_trained = {n: np.asarray(v[0]) for n, v in sgd_run.outputs[0].trained_layers.items()}
    for name in start:
        np.testing.assert_allclose(sgd_trained[name], expected_sgd[name], rtol=1e-5, atol=1e-6, err_msg=name)
        tolerance = 2 * simulation.local_steps * 0.01 if name in NOISE_DRIVEN else 1e-6
        np.testing.assert_allclose(adam_trained[name], expected_adam[name], rtol=1e-5, atol=tolerance, err_msg=name)
    assert not np.allclose(adam_trained["params/Dense_0/kernel"], sgd_trained["params/Dense_0/kernel"])
    assert not np.allclose(adam_trained["params/Dense_0/kernel"], start["params/Dense_0/kernel"])


# -- 8. NNX ---------------------------------------------------------------------------------------------


def nnx_with(module, flat):
    """A copy of ``module`` holding ``flat``, set attribute by attribute."""
    model = nnx.clone(module)
    for name, value in flat.items():
        owner = model
        *path, leaf = name.split("/")
        for part in path:
            owner = getattr(owner, part)
        getattr(owner, leaf)[...] = jnp.asarray(value)
    return model


@pytest.fixture(scope="module")
def nnx_runs(data8):
    config = SimulationConfig(rounds=2, local_steps=2, batch_size=8, seed=SEED)
    return {
        kind: Run(Simulation(ExchangerSpec(kind), config, data8, module=NnxDigitsNet(nnx.Rngs(0))))
        for kind in ("full", "exclude-bn")
    }


def test_nnx_module_full_exchange(nnx_runs, data8):
    run = nnx_runs["full"]
    simulation = run.simulation
    assert simulation.layer_names == NNX_DIGITS_LAYERS
    assert simulation.model.trainable == NNX_DIGITS_PARAMS
    first, second = run.outputs
    initial = host(simulation.initial_layers)
    np.testing.assert_array_equal(initial["bn/mean"], np.zeros(16))
    # Training mode moves the BatchNorm statistics; the round-2 start is round 1's global model.
    assert not np.allclose(np.asarray(first.trained_layers["bn/mean"][0]), 0.0)
    for name in NNX_DIGITS_LAYERS:
        for client in range(8):
            np.testing.assert_array_equal(
                np.asarray(second.start_layers[name][client]), np.asarray(first.state.global_layers[name])
            )
    whole = ref_message_nbytes({name: RefLayer(value, None, value.shape) for name, value in initial.items()})
    assert run.records[0]["client_download_bytes"] == [whole] * 8
    assert run.records[0]["client_upload_bytes"] == [whole] * 8
    assert run.records[0]["download_bytes"] == 8 * whole and run.records[0]["upload_bytes"] == 8 * whole
    # The global loss is the global model's, evaluated in eval mode (running statistics).
    for record, output in zip(run.records, run.outputs):
        model = nnx_with(NnxDigitsNet(nnx.Rngs(0)), host(output.state.global_layers))
        model.eval()
        logits = model(jnp.asarray(data8.x_global_test))
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(data8.y_global_test)).mean()
        assert record["global_loss"] == pytest.approx(float(loss), rel=1e-5)


def test_nnx_module_fedbn_keeps_batchnorm_local(nnx_runs):
    run = nnx_runs["exclude-bn"]
    simulation = run.simulation
    assert isinstance(simulation.exchanger, jlx.LayerExchangerWithExclusions)
    assert simulation.layer_names == NNX_DIGITS_LAYERS
    first, second = run.outputs
    exchanged = [n for n in NNX_DIGITS_LAYERS if not n.startswith("bn/")]
    for name in NNX_DIGITS_LAYERS:
        sent = np.asarray(first.send_masks[name])
        assert sent.tolist() == [not name.startswith("bn/")] * 8, name
        for client in range(8):
            start = np.asarray(second.start_layers[name][client])
            if name.startswith("bn/"):
                np.testing.assert_array_equal(start, np.asarray(first.trained_layers[name][client]), err_msg=name)
            else:
                np.testing.assert_array_equal(start, np.asarray(first.state.global_layers[name]), err_msg=name)
    initial = host(simulation.initial_layers)
    for name in NNX_DIGITS_LAYERS:  # nobody sends BatchNorm: it stays the initial global value
        if name.startswith("bn/"):
            np.testing.assert_array_equal(np.asarray(second.state.global_layers[name]), initial[name])
    assert not np.array_equal(
        np.asarray(second.start_layers["bn/mean"][0]), np.asarray(second.start_layers["bn/mean"][1])
    )
    part = ref_message_nbytes({n: RefLayer(initial[n], None, initial[n].shape) for n in exchanged})
    assert run.records[1]["client_upload_bytes"] == [part] * 8
    assert run.records[1]["client_download_bytes"] == [part] * 8  # round 1 changed the exchanged layers only
    assert run.records[1]["upload_bytes"] == 8 * part and run.records[1]["download_bytes"] == 8 * part


# -- 9. CNN ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 8, 8, 1), slow((2, 40, 1)), slow((2, 40))])
def test_cnn_output_shapes(shape):
    model = CNN()
    x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
    variables = model.init(jax.random.key(0), x, train=False)
    assert model.apply(variables, x, train=False).shape == (2, 10)
    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert logits.shape == (2, 10) and set(updates) == {"batch_stats"}
    kernel = jlx.flatten(variables)["params/Conv_0/kernel"].shape
    assert kernel == ((3, 3, 1, 32) if len(shape) == 4 else (5, 1, 32))


def test_cnn_layers_for_signals():
    variables = CNN(channels=32, num_classes=10).init(jax.random.key(0), jnp.zeros((2, 40, 1)), train=False)
    shapes = {name: tuple(value.shape) for name, value in jlx.flatten(variables).items()}
    expected = {}
    for i in range(3):
        expected[f"batch_stats/BatchNorm_{i}/mean"] = (32,)
        expected[f"batch_stats/BatchNorm_{i}/var"] = (32,)
        expected[f"params/BatchNorm_{i}/scale"] = (32,)
        expected[f"params/BatchNorm_{i}/bias"] = (32,)
        expected[f"params/Conv_{i}/bias"] = (32,)
    expected["params/Conv_0/kernel"] = (5, 1, 32)
    expected["params/Conv_1/kernel"] = (5, 32, 32)
    expected["params/Conv_2/kernel"] = (5, 32, 32)
    expected["params/Dense_0/kernel"] = (160, 10)  # 40 -> 20 -> 10 -> 5 positions, 32 channels
    expected["params/Dense_0/bias"] = (10,)
    assert shapes == expected
    # Conv 2 and 3 are the same size: each holds about as many bytes.
    assert math.prod(shapes["params/Conv_1/kernel"]) == math.prod(shapes["params/Conv_2/kernel"])


def test_server_learning_rate_of_any_real_type_and_never_a_bool():
    from jaxlayerx.simulation.server import server_optimizer

    for rate in (np.float32(0.5), np.float64(0.5), 1, 0.25):
        assert server_optimizer("sgd", rate) is not None
    for rate in (True, "0.5", None.__class__):
        with pytest.raises(ValueError, match="server-lr must be a finite number > 0"):
            server_optimizer("adam", rate)
