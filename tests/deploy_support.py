"""What the tests of real Flower deployments share: the loopback federation of
benchmarks/deployment.py wrapped for pytest, and an independent numpy reading of what the
example's ServerApp recorded (``record-dir``): each round's global model, the replies
(compact ``ArrayRecord``s, read with ``conftest.ref_compact_decode``), and the exact checks
of a run and of its stream."""

from __future__ import annotations

import contextlib
import io
import json
import pathlib
import sys
from collections.abc import Iterator

import numpy as np
import pytest
from conftest import ref_compact_decode

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the loopback harness of benchmarks/deployment.py
from benchmarks.deployment import MessageApiFederation, make_tls  # noqa: E402

NODES = 3
ROUNDS = 3
#: Seconds a ``flwr run`` may take, from submission to the run's end.
RUN_TIMEOUT = 420


class Deployment(MessageApiFederation):
    """The benchmark's loopback federation (benchmarks/deployment.py), failing the test
    where the benchmark raises, and sharing one compilation cache between messages. With
    ``tls``: TLS with a CA and certificates made in ``folder/tls``, and only registered
    SuperNodes admitted (each of the federation's is registered before it starts)."""

    def __init__(self, folder: pathlib.Path, *, tls: bool = False) -> None:
        super().__init__(
            folder,
            NODES,
            tls=make_tls(folder / "tls") if tls else None,
            supernode_auth=tls,
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
def deployment(folder: pathlib.Path, *, tls: bool = False) -> Iterator[Deployment]:
    federation = Deployment(folder, tls=tls)
    try:
        federation.start_federation()
        yield federation
    finally:
        left = federation.stop()
        assert not left, f"processes still running after SIGKILL: {left}"


# --- reading what the ServerApp recorded -------------------------------------------------


def global_model(record: pathlib.Path, server_round: int) -> dict[str, np.ndarray]:
    with np.load(record / f"global_round{server_round}.npz") as saved:
        return {name: saved[name] for name in saved.files}


def replies_of(record: pathlib.Path, server_round: int) -> dict[int, dict]:
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


def wire_bytes(arrays: dict[str, dict[str, np.ndarray]]) -> int:
    """Bytes of ``record -> name -> array`` as Flower counts an ArrayRecord: each array's
    ``numpy.save`` serialization plus its name."""
    total = 0
    for part in arrays.values():
        for name, array in part.items():
            buffer = io.BytesIO()
            np.save(buffer, array, allow_pickle=False)
            total += len(buffer.getvalue()) + len(name)
    return total


def dense_reference(before, replies):
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


def sparse_reference(before, replies):
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


def check_round_mean(before, after, replies, aggregated_layers, *, sparse: bool) -> dict:
    """``after`` is the example-weighted numpy mean of ``replies`` over ``before`` (each layer,
    or for sparse exchange each weight, some reply sent; everything else bit-identical), and
    ``aggregated_layers`` names the layers that changed. Returns the reference."""
    expected = sparse_reference(before, replies) if sparse else dense_reference(before, replies)
    for name in after:
        if name not in expected:
            np.testing.assert_array_equal(after[name], before[name], err_msg=name)
        elif sparse:
            mean, sent = expected[name]
            np.testing.assert_array_equal(after[name][~sent], before[name][~sent], err_msg=name)
            np.testing.assert_allclose(after[name][sent], mean[sent], rtol=2e-6, atol=1e-7, err_msg=name)
        else:
            np.testing.assert_allclose(after[name], expected[name], rtol=2e-6, atol=1e-7, err_msg=name)
    assert sorted(aggregated_layers) == sorted(expected)
    return expected


def check_run(record: pathlib.Path, *, sparse: bool, senders_per_round: dict[int, int]) -> None:
    history = {entry["server_round"]: entry for entry in json.loads((record / "history.json").read_text())}
    assert sorted(history) == list(range(1, ROUNDS + 1))
    for server_round in range(1, ROUNDS + 1):
        before, after = global_model(record, server_round - 1), global_model(record, server_round)
        assert list(before) == list(after)
        replies = replies_of(record, server_round)
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
            assert reply["metrics"]["jaxlayerx.bytes-sent"] == reply["content_bytes"] == wire_bytes(reply["arrays"])
            assert reply["metrics"]["jaxlayerx.bytes-received"] == sent_bytes[accepted["node"]]
        expected = check_round_mean(before, after, good, entry["aggregated_layers"], sparse=sparse)
        assert expected, f"round {server_round}: nobody sent anything"


def check_stream(output: str, record: pathlib.Path, *, sparse: bool) -> None:
    """The stream shows each round's bytes, as the nodes counted what they were sent and as
    the replies' arrays serialize, and for sparse exchange the weights received."""
    for server_round in range(1, ROUNDS + 1):
        replies = list(replies_of(record, server_round).values())
        sent = sum(reply["metrics"]["jaxlayerx.bytes-received"] for reply in replies)
        received = sum(wire_bytes(reply["arrays"]) for reply in replies)
        line = f"round {server_round}: averaged "
        (shown,) = [text for text in output.splitlines() if line in text]
        assert f"sent {sent / 1e6:.3f} MB, received {received / 1e6:.3f} MB" in shown, shown
        weights = sum(layer.values.size for reply in replies for layer in reply["payload"].values())
        assert (f", {weights} weights received" in shown) == sparse, shown
    assert sum("run: sent " in text and "of full exchange" in text for text in output.splitlines()) == 1


def run_dynamic_then_sparse(federation: Deployment, dense: pathlib.Path, sparse: pathlib.Path) -> tuple[str, str]:
    """3 rounds of dynamic layer exchange (nodes evaluating too) recorded in ``dense``, then 3
    of sparse exchange going on from its result, recorded in ``sparse``; their outputs."""
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
    return dense_output, sparse_output


def check_dynamic_then_sparse(dense: pathlib.Path, sparse: pathlib.Path, outputs: tuple[str, str]) -> None:
    """The exact checks of both runs of :func:`run_dynamic_then_sparse`, every node replying."""
    check_run(dense, sparse=False, senders_per_round=dict.fromkeys(range(1, ROUNDS + 1), NODES))
    check_run(sparse, sparse=True, senders_per_round=dict.fromkeys(range(1, ROUNDS + 1), NODES))
    check_stream(outputs[0], dense, sparse=False)
    check_stream(outputs[1], sparse, sparse=True)
    first, last = global_model(sparse, 0), global_model(dense, ROUNDS)
    assert all(np.array_equal(first[name], last[name]) for name in last), "the sparse run goes on from the dynamic one"
