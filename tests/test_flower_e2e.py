"""End to end over real gRPC, the legacy route: a Flower server and 3 clients as processes on 127.0.0.1.

The processes are the example's own scripts (``examples/flower/legacy``). Each client saves
the payloads it sends and the server saves the global model after every round, so the test
checks the run against an independent numpy reading of what crossed the wire. The clients
start before the server (they retry until it listens), and a server short of clients
exits within its timeout.
"""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("flwr")
pytest.importorskip("sklearn")

from conftest import free_loopback_port, loopback_environment  # noqa: E402

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


def _global(record: pathlib.Path, server_round: int) -> dict[str, np.ndarray]:
    with np.load(record / f"global_round{server_round}.npz") as saved:
        names = [str(name) for name in saved["names"]]
        return {name: saved[f"layer{i}"] for i, name in enumerate(names)}


def _sent(record: pathlib.Path, client: int, server_round: int) -> tuple[dict[str, np.ndarray], dict] | None:
    """What ``client`` sent in ``server_round`` (its saved payload and metrics), or None."""
    path = record / f"client{client}_round{server_round}.npz"
    if not path.exists():
        return None
    with np.load(path) as saved:
        arrays = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    names = arrays[-1]
    assert names.ndim == 1 and names.dtype.kind == "U"
    meta = json.loads(path.with_suffix(".json").read_text())
    return dict(zip((str(name) for name in names), arrays[:-1])), meta


def _check_rounds(record: pathlib.Path, senders_per_round: dict[int, list[int]]) -> None:
    history = json.loads((record / "server_history.json").read_text())
    assert [entry["server_round"] for entry in history] == list(range(1, ROUNDS + 1))
    ever_sent: set[str] = set()
    for entry in history:
        server_round = entry["server_round"]
        before, after = _global(record, server_round - 1), _global(record, server_round)
        assert list(before) == list(after)
        payloads = {client: _sent(record, client, server_round) for client in range(CLIENTS)}
        payloads = {client: payload for client, payload in payloads.items() if payload is not None}
        assert sorted(payloads) == senders_per_round[server_round]
        # The server's records match the clients' own: layers, example counts, bytes.
        by_examples = {meta["num_examples"]: (layers, meta) for layers, meta in payloads.values()}
        assert len(by_examples) == len(payloads), "example counts identify the clients"
        assert entry["applied"] and len(entry["accepted"]) == len(payloads) and not entry["rejected"]
        for accepted in entry["accepted"]:
            layers, meta = by_examples[accepted["num_examples"]]
            array_bytes = sum(array.nbytes for array in layers.values()) + np.array(list(layers)).nbytes
            assert accepted["layers"] == list(layers)
            assert accepted["payload_bytes"] == meta["payload_bytes"] == array_bytes
            assert accepted["wire_bytes"] > accepted["payload_bytes"]  # .npy headers on top
        # Every layer: the numpy weighted mean over its senders, or unchanged when nobody sent it.
        sent = set().union(*(layers for layers, _ in payloads.values()))
        assert sorted(entry["aggregated_layers"]) == sorted(sent)
        ever_sent |= sent
        for name in after:
            senders = [(meta["num_examples"], layers[name]) for layers, meta in payloads.values() if name in layers]
            if not senders:
                np.testing.assert_array_equal(after[name], before[name], err_msg=name)
                continue
            total = sum(count for count, _ in senders)
            expected = sum(count * array.astype(np.float64) for count, array in senders) / total
            np.testing.assert_allclose(after[name], expected, rtol=2e-6, atol=1e-7, err_msg=name)
    first, last = _global(record, 0), _global(record, ROUNDS)
    for name in first:
        if name not in ever_sent:
            np.testing.assert_array_equal(last[name], first[name], err_msg=name)
    assert any(not np.array_equal(last[name], first[name]) for name in ever_sent)


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
    assert [entry["failures"] for entry in history] == [0, 1, 0]
    _check_rounds(tmp_path, {1: [0, 1, 2], 2: [0, 1], 3: [0, 1]})


def test_a_server_short_of_clients_exits_within_its_timeout(tmp_path):
    """One client of the two the server waits for: the server gives up after its timeout,
    says so and exits with status 1; the client, whose server went away, gives up too."""
    codes = _run_federation(tmp_path, clients=2, started=1, round_timeout=5, connect_timeout=30)
    log = (tmp_path / "server.log").read_text()
    assert codes["server"] == 1, log
    assert re.search(r"server: [01] of the 2 clients needed connected within 5 s; stopping", log), log
    assert codes["client0"] == 1, _tail(tmp_path / "client0.log")
    assert "no server at" in (tmp_path / "client0.log").read_text()


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
        for client in range(CLIENTS):
            with np.load(tmp_path / f"client{client}_round{server_round}.npz") as saved:
                payload = [saved[f"arr_{i}"] for i in range(len(saved.files))]
            count = json.loads((tmp_path / f"client{client}_round{server_round}.json").read_text())["num_examples"]
            names = [str(name) for name in payload[-1]]
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
