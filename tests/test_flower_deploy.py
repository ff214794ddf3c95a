"""A real Flower deployment on 127.0.0.1: ``flower-superlink``, 3 ``flower-supernode``s and ``flwr run``.

The test starts the SuperLink and the SuperNodes as separate processes on free loopback
ports (``--insecure``), submits the example app (``examples/flower``) with ``flwr run``
against that SuperLink, and checks what the ServerApp recorded against an independent
numpy reading of the replies (each one compact ``ArrayRecord``, read with the independent
``conftest.ref_compact_decode``): every layer (or weight) some node sent is the
example-weighted mean of what was sent, everything else is bit-identical to the round
before, and the byte counts match the arrays. One deployment runs 3 rounds of dynamic
layer exchange, then 3 rounds of sparse exchange going on from its result; a second one
has a node whose ClientApp raises in round 2. HOME and FLWR_HOME point into the test's
temporary folder, every wait is bounded, and every process the test started (and those
they started) is stopped by PID at the end.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import sys
import time
from collections.abc import Iterator

import numpy as np
import pytest

pytest.importorskip("flwr", reason="the deployment test needs Flower: pip install 'jaxlayerx[flower]'")
pytest.importorskip("sklearn", reason="the example's data (scikit-learn's digits) needs scikit-learn")

from conftest import ref_compact_decode  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the loopback harness of benchmarks/deployment.py
from benchmarks.deployment import MessageApiFederation  # noqa: E402

NODES = 3
ROUNDS = 3
#: Seconds a ``flwr run`` may take, from submission to the run's end.
RUN_TIMEOUT = 420


class Deployment(MessageApiFederation):
    """The benchmark's loopback federation (benchmarks/deployment.py), failing the test
    where the benchmark raises, and sharing one compilation cache between messages."""

    def __init__(self, folder: pathlib.Path) -> None:
        super().__init__(
            folder,
            NODES,
            JAX_COMPILATION_CACHE_DIR=str(folder / "jax-cache"),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        )

    def run(self, name: str, *, check: bool = True, **run_config: object) -> str:  # pyright: ignore[reportIncompatibleMethodOverride]
        """``flwr run`` of the example app with ``run_config``; returns its output once the run ended."""
        try:
            code, output = super().run(name, timeout=RUN_TIMEOUT, **run_config)
        except RuntimeError as error:
            pytest.fail(str(error))
        assert code == 0 or not check, output
        return output


@contextlib.contextmanager
def deployment(folder: pathlib.Path) -> Iterator[Deployment]:
    federation = Deployment(folder)
    try:
        federation.start_federation()
        yield federation
    finally:
        left = federation.stop()
        assert not left, f"processes still running after SIGKILL: {left}"


# --- reading what the ServerApp recorded -------------------------------------------------


def _global(record: pathlib.Path, server_round: int) -> dict[str, np.ndarray]:
    with np.load(record / f"global_round{server_round}.npz") as saved:
        return {name: saved[name] for name in saved.files}


def _replies(record: pathlib.Path, server_round: int) -> dict[int, dict]:
    """Each node's reply in ``server_round``: its metrics, byte count, arrays per record, and
    its payload (``"payload"``: the compact ``"arrays"`` record decoded)."""
    summary = json.loads((record / f"round{server_round}.json").read_text())
    replies = {}
    for node, entry in summary.items():
        if "error" not in entry:
            with np.load(record / f"round{server_round}_node{node}.npz") as saved:
                arrays: dict[str, dict[str, np.ndarray]] = {}
                for key in saved.files:
                    record_key, name = key.split(":", 1)
                    arrays.setdefault(record_key, {})[name] = saved[key]
            entry["arrays"] = {
                key: {name: arrays[key][name] for name in names} for key, names in entry["records"].items()
            }
            entry["payload"] = ref_compact_decode(entry["arrays"]["arrays"])
        replies[int(node)] = entry
    return replies


def _wire_bytes(arrays: dict[str, dict[str, np.ndarray]]) -> int:
    """Bytes of ``record -> name -> array`` as Flower counts an ArrayRecord: each array's
    ``numpy.save`` serialization plus its name."""
    total = 0
    for part in arrays.values():
        for name, array in part.items():
            buffer = io.BytesIO()
            np.save(buffer, array, allow_pickle=False)
            total += len(buffer.getvalue()) + len(name)
    return total


def _dense_reference(before, replies):
    """Each layer's example-weighted mean over the nodes that sent it (float64 numpy)."""
    for reply in replies:  # a layer exchange sends whole layers, plain values
        assert all(layer.flat is None and layer.form == 0 for layer in reply["payload"].values())
    expected = {}
    for name in before:
        senders = [
            (r["metrics"]["num-examples"], r["payload"][name].values.reshape(r["payload"][name].shape))
            for r in replies
            if name in r["payload"]
        ]
        if senders:
            total = sum(count for count, _ in senders)
            expected[name] = sum(count * array.astype(np.float64) for count, array in senders) / total
    return expected


def _sparse_reference(before, replies):
    """Each weight's example-weighted mean over the nodes that sent that weight (float64 numpy)."""
    expected = {}
    for name, layer in before.items():
        total = np.zeros(layer.size)
        weight = np.zeros(layer.size)
        for reply in replies:
            if name not in reply["payload"]:
                continue
            sent = reply["payload"][name]
            assert sent.shape == layer.shape and sent.form == 0, name
            flat = np.arange(layer.size) if sent.flat is None else sent.flat
            count = reply["metrics"]["num-examples"]
            np.add.at(total, flat, count * sent.values.astype(np.float64))
            np.add.at(weight, flat, count)
        if weight.any():
            sent = weight > 0
            mean = layer.astype(np.float64).ravel().copy()
            mean[sent] = total[sent] / weight[sent]
            expected[name] = (mean.reshape(layer.shape), sent.reshape(layer.shape))
    return expected


def _check_run(record: pathlib.Path, *, sparse: bool, senders_per_round: dict[int, int]) -> None:
    history = {entry["server_round"]: entry for entry in json.loads((record / "history.json").read_text())}
    assert sorted(history) == list(range(1, ROUNDS + 1))
    for server_round in range(1, ROUNDS + 1):
        before, after = _global(record, server_round - 1), _global(record, server_round)
        assert list(before) == list(after)
        replies = _replies(record, server_round)
        good = [reply for reply in replies.values() if "error" not in reply]
        entry = history[server_round]
        assert len(good) == senders_per_round[server_round], replies
        assert sorted(node for node, _ in entry["failures"]) == sorted(
            node for node, r in replies.items() if "error" in r
        )
        assert not entry["rejected"] and not entry["missing"]
        sent_bytes = dict(entry["bytes_sent"])
        for accepted in entry["accepted"]:
            reply = replies[accepted["node"]]
            # The server's counts match the reply: weight, layers, bytes as Flower counts them.
            assert accepted["num_examples"] == reply["metrics"]["num-examples"]
            assert list(reply["records"]) == ["arrays"]  # one compact record
            assert accepted["layers"] == list(reply["payload"])
            assert accepted["entries"] == sum(layer.values.size for layer in reply["payload"].values())
            assert accepted["bytes_received"] == reply["content_bytes"]
            # The node's own counts: the arrays it sent (serialized), what the server sent it.
            assert reply["metrics"]["jaxlayerx.bytes-sent"] == reply["content_bytes"] == _wire_bytes(reply["arrays"])
            assert reply["metrics"]["jaxlayerx.bytes-received"] == sent_bytes[accepted["node"]]
        if sparse:
            expected = _sparse_reference(before, good)
            for name in after:
                if name not in expected:
                    np.testing.assert_array_equal(after[name], before[name], err_msg=name)
                    continue
                mean, sent = expected[name]
                np.testing.assert_array_equal(after[name][~sent], before[name][~sent], err_msg=name)
                np.testing.assert_allclose(after[name][sent], mean[sent], rtol=2e-6, atol=1e-7, err_msg=name)
        else:
            expected = _dense_reference(before, good)
            for name in after:
                if name not in expected:
                    np.testing.assert_array_equal(after[name], before[name], err_msg=name)
                else:
                    np.testing.assert_allclose(after[name], expected[name], rtol=2e-6, atol=1e-7, err_msg=name)
        assert sorted(entry["aggregated_layers"]) == sorted(expected)
        assert expected, f"round {server_round}: nobody sent anything"


def _check_stream(output: str, record: pathlib.Path, *, sparse: bool) -> None:
    """The stream shows each round's bytes, as the nodes counted what they were sent and as
    the replies' arrays serialize, and for sparse exchange the weights received."""
    for server_round in range(1, ROUNDS + 1):
        replies = list(_replies(record, server_round).values())
        sent = sum(reply["metrics"]["jaxlayerx.bytes-received"] for reply in replies)
        received = sum(_wire_bytes(reply["arrays"]) for reply in replies)
        line = f"round {server_round}: averaged "
        (shown,) = [text for text in output.splitlines() if line in text]
        assert f"sent {sent / 1e6:.3f} MB, received {received / 1e6:.3f} MB" in shown, shown
        weights = sum(layer.values.size for reply in replies for layer in reply["payload"].values())
        assert (f", {weights} weights received" in shown) == sparse, shown
    assert sum("run: sent " in text and "of full exchange" in text for text in output.splitlines()) == 1


def test_dynamic_then_sparse_exchange_through_flwr_run(tmp_path):
    dense, sparse = tmp_path / "dynamic", tmp_path / "sparse"
    with deployment(tmp_path) as federation:
        dense_output = federation.run(
            "run_dynamic", exchanger="dynamic-percentage", **{"record-dir": str(dense), "fraction-evaluate": 1.0}
        )
        sparse_output = federation.run(
            "run_sparse",
            exchanger="sparse-largest-magnitude-change",
            **{
                "record-dir": str(sparse),
                "initial-model": str(dense / f"global_round{ROUNDS}.npz"),
                "fraction-evaluate": 0.0,
            },
        )
    _check_run(dense, sparse=False, senders_per_round=dict.fromkeys(range(1, ROUNDS + 1), NODES))
    _check_run(sparse, sparse=True, senders_per_round=dict.fromkeys(range(1, ROUNDS + 1), NODES))
    _check_stream(dense_output, dense, sparse=False)
    _check_stream(sparse_output, sparse, sparse=True)
    first, last = _global(sparse, 0), _global(dense, ROUNDS)
    assert all(np.array_equal(first[name], last[name]) for name in last), "the sparse run goes on from the dynamic one"


def test_a_node_raising_in_round_two_does_not_stop_the_run(tmp_path):
    """Then a run asking for more SuperNodes than there are ends after its timeout, saying so."""
    record = tmp_path / "record"
    with deployment(tmp_path) as federation:
        output = federation.run(
            "run",
            exchanger="dynamic-percentage",
            **{"record-dir": str(record), "fail-partition": 2, "fail-round": 2, "fraction-evaluate": 0.0},
        )
        short = federation.run("run_short", check=False, **{"min-nodes": NODES + 1, "round-timeout": 5.0})
    assert f"{NODES} of the {NODES + 1} nodes needed connected within 5 s" in short, short
    _check_run(record, sparse=False, senders_per_round={1: NODES, 2: NODES - 1, 3: NODES})
    errors = [entry["error"] for entry in _replies(record, 2).values() if "error" in entry]
    assert len(errors) == 1 and "fails in round 2, as asked" in errors[0], (errors, output)


def test_a_supernode_killed_mid_run_is_named_by_its_own_id(tmp_path):
    """SIGKILL one SuperNode once round 2 has started: the run goes on with the others, and
    every line about the lost node names its id (read from its own log), whether its reply
    is missing or an error reply Flower makes for it."""
    import re
    import signal
    import threading

    with deployment(tmp_path) as federation:
        outputs: list[str] = []
        run = threading.Thread(
            target=lambda: outputs.append(federation.run("run", **{"min-nodes": NODES - 1, "round-timeout": 30.0}))
        )
        run.start()
        deadline = time.monotonic() + RUN_TIMEOUT
        log = tmp_path / "run.log"  # written by flwr run, once the thread has started it
        while "[ROUND 2/3]" not in (log.read_text(errors="replace") if log.exists() else ""):
            assert time.monotonic() < deadline and run.is_alive(), log.read_text() if log.exists() else "no run.log"
            time.sleep(0.2)
        time.sleep(1.0)
        os.kill(federation.started["supernode1"].pid, signal.SIGKILL)
        run.join(timeout=RUN_TIMEOUT)
        (output,) = outputs
    node_ids = {
        node: re.search(r"SuperNode ID: (\d+)", (tmp_path / f"supernode{node}.log").read_text()).group(1)
        for node in range(NODES)
    }
    about_nodes = re.findall(r"node (\d+) (never replied|replied with an error)", output)
    assert about_nodes, output
    assert {node for node, _ in about_nodes} == {node_ids[1]}, (about_nodes, node_ids)
    for server_round in (2, 3):
        (line,) = [text for text in output.splitlines() if f"round {server_round}: averaged" in text]
        assert f"from {NODES - 1} node(s)" in line and re.search(r"(1 failed|1 missing)", line), line
