"""End to end over real gRPC, the legacy route: a Flower server and 3 clients as processes on 127.0.0.1.

The processes are the example's own scripts (``examples/flower/legacy``). Each client saves
the payloads it sends (and the bytes and versions of what it received) and the server saves
the global model after every round, so the test checks the run against an independent numpy
reading of what crossed the wire: averages as example-weighted means over the senders, bytes
as ``numpy.save`` sizes. The clients start before the server (they retry until it listens),
and a server short of clients exits within its timeout.
"""

from __future__ import annotations

import io
import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("flwr")
pytest.importorskip("sklearn")

sys.path.insert(
    0, str(pathlib.Path(__file__).resolve().parent.parent)
)  # the loopback helpers of benchmarks/deployment.py
from benchmarks.deployment import free_port as free_loopback_port  # noqa: E402
from benchmarks.deployment import loopback_environment  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "flower" / "legacy"
ROUNDS = 3
CLIENTS = 3
#: Seconds any process of a run may take, start-up included.
PROCESS_TIMEOUT = 240


def _run_federation(
    record: pathlib.Path,
    *,
    fail_client: int | None = None,
    clients: int = CLIENTS,
    started: int = CLIENTS,
    round_timeout: float = 120,
    connect_timeout: float = PROCESS_TIMEOUT / 2,
    exchanger: str = "dynamic-percentage",
) -> dict[str, int]:
    """Starts ``started`` clients, then the server; waits (bounded) for every process to exit.

    The clients start first: the server is not listening yet when they try to connect.
    """
    port = free_loopback_port()
    address = f"127.0.0.1:{port}"
    env = loopback_environment()
    min_clients = clients - (fail_client is not None)
    server = {
        "server": [
            sys.executable,
            str(EXAMPLE / "server.py"),
            "--address",
            address,
            "--rounds",
            str(ROUNDS),
            "--clients",
            str(clients),
            "--min-clients",
            str(min_clients),
            "--round-timeout",
            str(round_timeout),
            "--record",
            str(record),
            "--exchanger",
            exchanger,
        ],
    }
    commands = {}
    for client in range(started):
        command = [
            sys.executable,
            str(EXAMPLE / "client.py"),
            "--address",
            address,
            "--client-id",
            str(client),
            "--clients",
            str(clients),
            "--record",
            str(record),
            "--connect-timeout",
            str(connect_timeout),
            "--exchanger",
            exchanger,
        ]
        if client == fail_client:
            command += ["--fail-in-round", "2"]
        commands[f"client{client}"] = command
    commands.update(server)
    logs = {name: (record / f"{name}.log").open("w") for name in commands}
    processes = {}
    try:
        for name, command in commands.items():
            processes[name] = subprocess.Popen(command, cwd=ROOT, env=env, stdout=logs[name], stderr=subprocess.STDOUT)
        results = {}
        for name, process in processes.items():
            try:
                process.wait(timeout=PROCESS_TIMEOUT)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name} did not exit within {PROCESS_TIMEOUT} s:\n{_tail(record / f'{name}.log')}")
            results[name] = process.returncode
        return results
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
        for log in logs.values():
            log.close()


def _tail(path: pathlib.Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _npy_size(array: np.ndarray) -> int:
    """Bytes of ``numpy.save(array)``: what Flower carries for one array."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return len(buffer.getvalue())


def _global(record: pathlib.Path, server_round: int) -> dict[str, np.ndarray]:
    with np.load(record / f"global_round{server_round}.npz") as saved:
        names = [str(name) for name in saved["names"]]
        return {name: saved[f"layer{i}"] for i, name in enumerate(names)}


def _sent(
    record: pathlib.Path, client: int, server_round: int
) -> tuple[dict[str, np.ndarray], dict, list[np.ndarray]] | None:
    """What ``client`` sent in ``server_round`` (its saved payload by name, its metadata and
    the arrays as sent), or None."""
    path = record / f"client{client}_round{server_round}.npz"
    if not path.exists():
        return None
    with np.load(path) as saved:
        arrays = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    names = arrays[-1]
    assert names.ndim == 1 and names.dtype.kind == "U"
    meta = json.loads(path.with_suffix(".json").read_text())
    return dict(zip((str(name) for name in names), arrays[:-1])), meta, arrays


def _check_rounds(record: pathlib.Path, senders_per_round: dict[int, list[int]]) -> dict[int, str]:
    """Checks every round against the clients' records; returns ``client -> the server's id for it``."""
    history = json.loads((record / "server_history.json").read_text())
    assert [entry["server_round"] for entry in history] == list(range(1, ROUNDS + 1))
    whole_model = sum(_npy_size(layer) for layer in _global(record, 0).values())
    ever_sent: set[str] = set()
    node_of: dict[int, str] = {}
    for entry in history:
        server_round = entry["server_round"]
        before, after = _global(record, server_round - 1), _global(record, server_round)
        assert list(before) == list(after)
        payloads = {client: _sent(record, client, server_round) for client in range(CLIENTS)}
        payloads = {client: payload for client, payload in payloads.items() if payload is not None}
        assert sorted(payloads) == senders_per_round[server_round]
        # The server's records match the clients' own: layers, example counts, bytes.
        by_examples = {
            meta["num_examples"]: (client, layers, meta, arrays) for client, (layers, meta, arrays) in payloads.items()
        }
        assert len(by_examples) == len(payloads), "example counts identify the clients"
        assert len(entry["accepted"]) == len(payloads) and not entry["rejected"]
        sent_bytes = dict(entry["bytes_sent"])
        for accepted in entry["accepted"]:
            client, layers, meta, arrays = by_examples[accepted["num_examples"]]
            assert node_of.setdefault(client, accepted["node"]) == accepted["node"]
            assert accepted["layers"] == list(layers)
            assert accepted["entries"] == sum(array.size for array in layers.values())
            # bytes as Flower carries them: each array's numpy.save blob, headers included
            assert accepted["bytes_received"] == meta["payload_bytes"] == sum(_npy_size(a) for a in arrays)
            # what the server says it sent the client is what the client received
            assert sent_bytes[accepted["node"]] == meta["received_bytes"]
            if server_round == 1:
                # the first message: the whole model, unnamed (fl4health's initial parameters)
                assert (meta["base_round"], meta["version"]) == (-1, 0)
                assert meta["received_bytes"] == whole_model and meta["received_arrays"] == len(before)
            else:
                # each round's evaluation brought the client to that round's version, so the
                # next fit is an update over it holding nothing new: an empty names array
                assert (meta["base_round"], meta["version"]) == (server_round - 1, server_round - 1)
                assert meta["received_arrays"] == 1
                assert meta["received_bytes"] == _npy_size(np.array([], dtype=np.str_))
        # Every layer: the numpy weighted mean over its senders, or unchanged when nobody sent it.
        sent = set().union(*(layers for layers, _, _ in payloads.values()))
        assert sorted(entry["aggregated_layers"]) == sorted(sent)
        ever_sent |= sent
        for name in after:
            senders = [(meta["num_examples"], layers[name]) for layers, meta, _ in payloads.values() if name in layers]
            if not senders:
                np.testing.assert_array_equal(after[name], before[name], err_msg=name)
                continue
            total = sum(count for count, _ in senders)
            # the values cast to the global layer's dtype first (they already are: float32)
            dtype = before[name].dtype
            expected = sum(count * array.astype(dtype).astype(np.float64) for count, array in senders) / total
            np.testing.assert_allclose(after[name], expected, rtol=2e-6, atol=1e-7, err_msg=name)
    first, last = _global(record, 0), _global(record, ROUNDS)
    for name in first:
        if name not in ever_sent:
            np.testing.assert_array_equal(last[name], first[name], err_msg=name)
    assert any(not np.array_equal(last[name], first[name]) for name in ever_sent)
    return node_of


def test_three_clients_three_rounds_over_loopback(tmp_path):
    codes = _run_federation(tmp_path)
    for name, code in codes.items():
        assert code == 0, f"{name} exited with {code}:\n{_tail(tmp_path / f'{name}.log')}"
    _check_rounds(tmp_path, {r: list(range(CLIENTS)) for r in range(1, ROUNDS + 1)})


def test_a_client_failing_in_round_two_does_not_stop_the_run(tmp_path):
    codes = _run_federation(tmp_path, fail_client=2)
    assert codes["server"] == 0, _tail(tmp_path / "server.log")
    assert codes["client0"] == 0 and codes["client1"] == 0
    assert codes["client2"] != 0  # Flower's legacy transport ends a client that raises
    assert "fails in round 2, as asked" in (tmp_path / "client2.log").read_text()
    history = json.loads((tmp_path / "server_history.json").read_text())
    assert [len(entry["failures"]) for entry in history] == [0, 1, 0]
    node_of = _check_rounds(tmp_path, {1: [0, 1, 2], 2: [0, 1], 3: [0, 1]})
    # the client asked in round 2 that never answered is forgotten (it would get the whole
    # model next time), and is not asked again: its process has ended
    assert [entry["missing"] for entry in history] == [[], [node_of[2]], []]
    assert sorted(node for node, _ in history[2]["bytes_sent"]) == sorted([node_of[0], node_of[1]])


def test_a_server_short_of_clients_exits_within_its_timeout(tmp_path):
    """One client of the two the server waits for: the server gives up after its timeout,
    says so and exits with status 1; the client, whose server went away, gives up too."""
    codes = _run_federation(tmp_path, clients=2, started=1, round_timeout=5, connect_timeout=30)
    log = (tmp_path / "server.log").read_text()
    assert codes["server"] == 1, log
    assert re.search(r"server: [01] of the 2 clients needed connected within 5 s; stopping", log), log
    assert codes["client0"] == 1, _tail(tmp_path / "client0.log")
    # It had reached the server: the message says the server went away, not that there was none.
    client_log = (tmp_path / "client0.log").read_text()
    assert "closed the connection before sending this client any work" in client_log, client_log
    assert "no server at" not in client_log


def test_a_sparse_exchanger_runs_on_the_sparse_strategy(tmp_path):
    """The example's sparse-* option works: each weight some client sent is the example-weighted
    mean of the values sent for it, every other weight is unchanged."""
    codes = _run_federation(tmp_path, exchanger="sparse-largest-magnitude-change")
    for name, code in codes.items():
        assert code == 0, f"{name} exited with {code}:\n{_tail(tmp_path / f'{name}.log')}"
    history = json.loads((tmp_path / "server_history.json").read_text())
    assert [len(entry["accepted"]) for entry in history] == [CLIENTS] * ROUNDS
    for server_round in range(1, ROUNDS + 1):
        before, after = _global(tmp_path, server_round - 1), _global(tmp_path, server_round)
        total = {name: np.zeros(layer.size) for name, layer in before.items()}
        weight = {name: np.zeros(layer.size) for name, layer in before.items()}
        entry = history[server_round - 1]
        accepted = {reply["num_examples"]: reply for reply in entry["accepted"]}
        sent_bytes = dict(entry["bytes_sent"])
        for client in range(CLIENTS):
            with np.load(tmp_path / f"client{client}_round{server_round}.npz") as saved:
                payload = [saved[f"arr_{i}"] for i in range(len(saved.files))]
            meta = json.loads((tmp_path / f"client{client}_round{server_round}.json").read_text())
            count = meta["num_examples"]
            # bytes as Flower carries them (numpy.save blobs), on both sides of the wire
            reply = accepted[count]
            assert reply["bytes_received"] == meta["payload_bytes"] == sum(_npy_size(a) for a in payload)
            assert sent_bytes[reply["node"]] == meta["received_bytes"]
            if server_round == 1:
                assert meta["base_round"] == -1
                assert meta["received_bytes"] == sum(_npy_size(layer) for layer in before.values())
            names = [str(name) for name in payload[-1]]
            assert reply["layers"] == names
            assert reply["entries"] == sum(np.asarray(values).size for values in payload[: len(names)])
            k = len(names)
            for name, values, indices, shape in zip(names, payload[:k], payload[k : 2 * k], payload[2 * k : 3 * k]):
                assert tuple(shape) == before[name].shape, name
                flat = np.ravel_multi_index(tuple(np.asarray(indices).T), tuple(shape))
                np.add.at(total[name], flat, count * values.astype(np.float64))
                np.add.at(weight[name], flat, count)
        assert any(w.any() for w in weight.values()), f"round {server_round}: nothing sent"
        for name in before:
            sent = weight[name] > 0
            got, old = after[name].ravel(), before[name].ravel()
            np.testing.assert_array_equal(got[~sent], old[~sent], err_msg=name)
            expected = total[name][sent] / weight[name][sent]
            np.testing.assert_allclose(got[sent], expected, rtol=2e-6, atol=1e-7, err_msg=name)
