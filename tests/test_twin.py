"""The twin test: a simulated federation replayed through both Flower routes agrees with
the simulation to the byte, and its global model after every round matches.

A :class:`Simulation` runs with client sampling (a fixed schedule in which client 3 misses
two rounds and client 5 first appears in round 2), error feedback and int8 quantization.
Every round's trained client models are then replayed as node replies:

* through the Message-API strategy's own ``start()``, in process, over a fake grid whose
  nodes run ``exchanger_client_app`` (their "training" returns the simulated client's
  trained model);
* through the legacy strategy (``configure_fit``/``aggregate_fit``) and ``ExchangerClient``s.

Bytes are measured from the messages actually built (``ArrayRecord.count_bytes`` on the
Message API; the serialized ``Parameters`` tensors on the legacy route), never with the
codecs' own ``nbytes``; they must equal the simulation's records exactly, node by node and
round by round. Each node must also start every round from exactly the model the simulated
client started from.
"""

from __future__ import annotations

import collections
import functools

import jax
import numpy as np
import pytest

pytest.importorskip("flwr")

from conftest import fake_grid_class, fake_proxy  # noqa: E402
from flwr.app import Context, MetricRecord, RecordDict  # noqa: E402
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays  # noqa: E402
from flwr.server.client_manager import ClientManager  # noqa: E402

from jaxlayerx import flatten, unflatten  # noqa: E402
from jaxlayerx.flower import records  # noqa: E402
from jaxlayerx.flower.clientapp import exchanger_client_app  # noqa: E402
from jaxlayerx.flower.legacy.client import ExchangerClient  # noqa: E402
from jaxlayerx.flower.legacy.strategy import FedAvgDynamicLayerStrategy, FedAvgSparseCooTensorStrategy  # noqa: E402
from jaxlayerx.flower.serverapp import FedAvgLayers, FedAvgSparse  # noqa: E402
from jaxlayerx.simulation import ExchangerSpec, Simulation, SimulationConfig, make_client_data  # noqa: E402
from jaxlayerx.simulation.datasets import load_dataset  # noqa: E402
from jaxlayerx.wire import MESSAGE_API, Wire  # noqa: E402

CLIENTS = 6
#: Which clients each round samples: client 3 misses rounds 2 and 3, client 5 first comes in round 2.
SCHEDULE = [[0, 1, 2, 3], [0, 1, 4, 5], [0, 2, 4, 5], [1, 3, 4, 5], [0, 2, 3, 5]]
ROUNDS = len(SCHEDULE)

CASES = {
    "budget-ef-int8": ExchangerSpec("dynamic-budget", byte_fraction=0.5, error_feedback=True, quantize="int8"),
    "sparse-ef-int8": ExchangerSpec(
        "sparse-largest-magnitude-change", sparsity_level=0.1, error_feedback=True, quantize="int8"
    ),
    "sparse-ef": ExchangerSpec("sparse-largest-magnitude-change", sparsity_level=0.1, error_feedback=True),
}


class ScheduledSimulation(Simulation):
    """A simulation sampling :data:`SCHEDULE` instead of a seeded draw."""

    def sample_clients(self, round_index: int) -> np.ndarray:
        return np.asarray(SCHEDULE[round_index - 1], np.int32)


@functools.cache
def data():
    dataset = load_dataset("digits")
    return make_client_data(
        dataset.x, dataset.y, CLIENTS, beta=0.5, seed=3, x_test=dataset.x_test, y_test=dataset.y_test
    )


@functools.cache
def twin(case: str, average_over: str):
    """The simulation of ``case``: its per-round records and outputs, as numpy."""
    config = SimulationConfig(rounds=ROUNDS, local_steps=4, clients_per_round=4, seed=1, average_over=average_over)
    simulation = ScheduledSimulation(CASES[case], config, data())
    rounds = []
    for record, output in simulation.iterate():
        rounds.append((record, jax.device_get(output)))
    return simulation, rounds


def legacy_wire(spec: ExchangerSpec) -> Wire:
    """The legacy route's layouts: fl4health's, or compact where a quantized upload needs it."""
    return Wire("ndarrays", "compact" if spec.quantize else "coo")


def trained_model(simulation, output, client: int):
    """The simulated client's trained model, as the Linen variables a node holds."""
    row = int(np.flatnonzero(np.asarray(output.clients) == client)[0])
    flat = collections.OrderedDict((name, np.asarray(value[row])) for name, value in output.trained_layers.items())
    return unflatten(flat, like=simulation.initial_variables)


def start_layers(output, client: int) -> dict[str, np.ndarray]:
    row = int(np.flatnonzero(np.asarray(output.clients) == client)[0])
    return {name: np.asarray(value[row]) for name, value in output.start_layers.items()}


def assert_bitwise(actual, expected, what: str) -> None:
    assert list(actual) == list(expected), what
    for name in expected:
        a, e = np.asarray(actual[name]), np.asarray(expected[name])
        assert a.dtype == e.dtype and a.shape == e.shape, (what, name)
        assert np.array_equal(a.view(np.uint8), e.view(np.uint8)), (what, name)


def assert_global(actual, expected, what: str) -> None:
    for name in expected:
        np.testing.assert_allclose(
            np.asarray(actual[name], np.float32),
            np.asarray(expected[name], np.float32),
            rtol=1e-6,
            atol=1e-7,
            err_msg=f"{what}: {name}",
        )


@pytest.mark.parametrize("average_over", ["senders", "participants"])
@pytest.mark.parametrize("case", list(CASES))
def test_message_api_start_agrees_with_the_simulation(case, average_over, task_identity):
    simulation, rounds = twin(case, average_over)
    outputs = {index + 1: output for index, (_, output) in enumerate(rounds)}
    exchanger = simulation.exchanger
    contexts = {
        client: Context(run_id=1, node_id=client + 1, node_config={}, state=RecordDict(), run_config={})
        for client in range(CLIENTS)
    }
    starts: dict[tuple[int, int], dict] = {}

    def node(client: int):
        def train_fn(model, config, context):
            server_round = int(config["server-round"])
            starts[(server_round, client)] = {n: np.asarray(v) for n, v in flatten(model).items()}
            n_train = int(simulation.data.n_train[client])
            return trained_model(simulation, outputs[server_round], client), n_train, {}

        app = exchanger_client_app(lambda context: simulation.initial_variables, exchanger, train_fn)
        return lambda message: app(message, contexts[client]).content

    class ScheduledGrid(fake_grid_class()):
        round = 1

        def get_node_ids(self):
            return [client + 1 for client in SCHEDULE[min(self.round, ROUNDS) - 1]]

        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            replies = super().send_and_receive(messages, timeout=timeout)
            if messages:
                self.round += 1
            return replies

    grid = ScheduledGrid({client + 1: node(client) for client in range(CLIENTS)})
    strategy_class = FedAvgSparse if simulation.entrywise else FedAvgLayers
    strategy = strategy_class(
        fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1, average_over=average_over
    )
    globals_after: dict[int, dict] = {}

    def evaluate_fn(server_round, arrays):
        globals_after[server_round] = records.record_to_arrays(arrays)
        return MetricRecord({})

    initial = records.arrays_to_record({n: np.asarray(v) for n, v in simulation.initial_layers.items()})
    strategy.start(grid, initial, num_rounds=ROUNDS, timeout=60, evaluate_fn=evaluate_fn)

    assert [len(record.accepted) for record in strategy.history] == [4] * ROUNDS, case
    for index, (record, output) in enumerate(rounds):
        server_round = index + 1
        history = strategy.history[index]
        uploaded = {reply.node - 1: reply.bytes_received for reply in history.accepted}
        downloaded = {node - 1: n for node, n in history.bytes_sent}
        for client, up, down in zip(record["clients"], record["client_upload_bytes"], record["client_download_bytes"]):
            assert uploaded[client] == up, (case, server_round, client, "upload")
            assert downloaded[client] == down, (case, server_round, client, "download")
            assert_bitwise(starts[(server_round, client)], start_layers(output, client), f"round {server_round}")
        assert_global(globals_after[server_round], output.state.global_layers, f"{case} round {server_round}")


class ScheduledClientManager(ClientManager):
    """Samples :data:`SCHEDULE`'s clients, round after round."""

    def __init__(self, proxies):
        self.proxies = proxies
        self.round = 0

    def num_available(self):
        return len(self.proxies)

    def register(self, client):
        raise NotImplementedError

    def unregister(self, client):
        raise NotImplementedError

    def all(self):
        return dict(self.proxies)

    def wait_for(self, num_clients, timeout):
        return True

    def sample(self, num_clients, min_num_clients=None, criterion=None):
        self.round += 1
        return [self.proxies[f"client-{client}"] for client in SCHEDULE[self.round - 1]]


@pytest.mark.parametrize("case", list(CASES))
def test_legacy_strategy_agrees_with_the_simulation(case):
    simulation, rounds = twin(case, "senders")
    spec = CASES[case]
    wire = legacy_wire(spec)
    outputs = {index + 1: output for index, (_, output) in enumerate(rounds)}
    starts: dict[tuple[int, int], dict] = {}

    def client(number: int) -> ExchangerClient:
        def train_fn(model, config):
            server_round = int(config["current_server_round"])
            starts[(server_round, number)] = {n: np.asarray(v) for n, v in flatten(model).items()}
            trained = trained_model(simulation, outputs[server_round], number)
            return trained, int(simulation.data.n_train[number]), {}

        return ExchangerClient(simulation.initial_variables, simulation.exchanger, train_fn, sparse_wire=wire.sparse)

    clients = {f"client-{number}": client(number) for number in range(CLIENTS)}
    proxies = {cid: fake_proxy(cid) for cid in clients}
    manager = ScheduledClientManager(proxies)
    strategy_class = FedAvgSparseCooTensorStrategy if simulation.entrywise else FedAvgDynamicLayerStrategy
    strategy = strategy_class(
        collections.OrderedDict((n, np.asarray(v)) for n, v in simulation.initial_layers.items()),
        fraction_evaluate=0.0,
        min_fit_clients=1,
        min_available_clients=1,
        sparse_wire=wire.sparse,
    )
    parameters = strategy.initial_parameters
    for index, (record, output) in enumerate(rounds):
        server_round = index + 1
        results = []
        downloaded, uploaded = {}, {}
        for proxy, fit_ins in strategy.configure_fit(server_round, parameters, manager):
            number = int(proxy.cid.removeprefix("client-"))
            downloaded[number] = sum(len(tensor) for tensor in fit_ins.parameters.tensors)
            payload, num_examples, metrics = clients[proxy.cid].fit(
                parameters_to_ndarrays(fit_ins.parameters), fit_ins.config
            )
            fit_res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(payload), num_examples, metrics)
            uploaded[number] = sum(len(tensor) for tensor in fit_res.parameters.tensors)
            results.append((proxy, fit_res))
        strategy.aggregate_fit(server_round, results, [])
        upload, download = simulation.message_bytes(output.metrics, wire)
        for position, number in enumerate(record["clients"]):
            assert uploaded[number] == upload[position], (case, server_round, number, "upload")
            assert downloaded[number] == download[position], (case, server_round, number, "download")
            assert_bitwise(starts[(server_round, number)], start_layers(output, number), f"round {server_round}")
        assert_global(strategy.global_layers, output.state.global_layers, f"{case} round {server_round}")


def test_the_simulation_records_per_client_bytes_that_sum_to_the_round():
    _, rounds = twin("sparse-ef-int8", "senders")
    for record, _ in rounds:
        assert record["upload_bytes"] == sum(record["client_upload_bytes"])
        assert record["download_bytes"] == sum(record["client_download_bytes"])
        assert len(record["client_upload_bytes"]) == len(record["clients"]) == 4


def test_the_message_api_bytes_of_the_simulation_are_what_flower_counts():
    """An independent check of the simulation's Message-API accounting: the bytes of a
    compact record equal ArrayRecord.count_bytes of the record built from the same payload."""
    simulation, rounds = twin("budget-ef-int8", "senders")
    assert simulation.wire == MESSAGE_API
    first = rounds[0][0]
    whole = records.payload_to_record(
        collections.OrderedDict(
            (name, __import__("jaxlayerx").wire.dense_entries(np.asarray(layer)))
            for name, layer in simulation.initial_layers.items()
        )
    )
    assert first["client_download_bytes"] == [whole.count_bytes()] * 4
