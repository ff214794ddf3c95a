"""Server restart: a Message-API strategy killed (SIGKILL) after round 2 of 4 resumes from its
checkpoint and ends with the uninterrupted run's global model, bit for bit.

The server runs in a separate process (this file run as a script) with a fake ``Grid`` whose
three nodes follow the protocol and keep their state in files, as SuperNodes outlive a
restarted ServerApp. In the interrupted run the grid stops, after the nodes have trained
round 3, until the test kills the process.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import bits, fake_grid_class, ref_apply, ref_compact_decode, ref_record_arrays

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict  # noqa: E402

from jaxlayerx.flower.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from jaxlayerx.flower.records import arrays_to_record, payload_to_record, record_to_arrays  # noqa: E402
from jaxlayerx.payload import Entries  # noqa: E402

ROUNDS = 4
NODES = (11, 22, 33)
WAIT_S = 120  # bound on every wait of the test


def initial_model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "a": rng.normal(size=(3, 4)).astype(np.float32),
        "b": rng.normal(size=(4,)).astype(np.float32),
        "c": rng.normal(size=(2, 2)).astype(np.float32),
        "d": rng.normal(size=(5,)).astype(np.float32),
    }


class FileNode:
    """A node keeping the global model it knows and its version in a checkpoint directory."""

    def __init__(self, node_id: int, state_dir: Path, sparse: bool) -> None:
        self.node_id, self.folder, self.sparse = node_id, state_dir / f"node-{node_id}", sparse

    def __call__(self, message: Message) -> RecordDict:
        loaded = load_checkpoint(self.folder)
        model, version = (dict(loaded[0]), int(loaded[1]["round"])) if loaded else ({}, -1)
        config = message.content.config_records["config"]
        server_round, base = int(config["server-round"]), int(config["jaxlayerx.base-round"])
        if base != -1 and base != version:
            raise RuntimeError(f"node {self.node_id} holds version {version}, not {base}")
        payload = ref_compact_decode(ref_record_arrays(message.content.array_records["arrays"]))
        model = ref_apply({} if base == -1 else model, payload)
        save_checkpoint(self.folder, model, {"round": int(config["jaxlayerx.round"])})
        if message.metadata.message_type == MessageType.EVALUATE:
            return RecordDict({"metrics": MetricRecord({"num-examples": 1})})
        with open(self.folder / "train.log", "a") as log:
            log.write(json.dumps({"round": server_round, "base": base, "received": sorted(model)}) + "\n")
        names = sorted(model)
        picked = [names[(self.node_id + server_round) % len(names)], names[(self.node_id * server_round) % len(names)]]
        trained = {
            name: (model[name] * np.float32(0.9) + np.float32(0.01 * self.node_id)) for name in dict.fromkeys(picked)
        }
        metrics = MetricRecord({"num-examples": self.node_id + server_round})
        payload = collections.OrderedDict()
        for name, value in trained.items():
            if not self.sparse:
                payload[name] = Entries(value.reshape(-1), None, value.shape)
                continue
            flat = np.arange(0, value.size, 2 if (self.node_id + server_round) % 2 else 3, dtype=np.int64)
            payload[name] = Entries(value.reshape(-1)[flat], flat, value.shape)
        return RecordDict({"arrays": payload_to_record(payload), "metrics": metrics})


class FileGrid(fake_grid_class()):
    """With ``stop_after_train`` set, hangs after that round's training, to be killed."""

    def __init__(self, nodes, stop_after_train: int | None, marker: Path) -> None:
        super().__init__(nodes)
        self.stop_after_train, self.marker = stop_after_train, marker

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout=timeout)
        train = bool(messages) and messages[0].metadata.message_type == MessageType.TRAIN
        if train and messages[0].content.config_records["config"]["server-round"] == self.stop_after_train:
            self.marker.write_text("trained")
            time.sleep(WAIT_S)  # killed here by the test
            raise SystemExit("the test did not kill the server")
        return replies


def serve(work: Path, *, sparse: bool, resume: bool, stop_after_train: int | None) -> None:
    """The server process: run the strategy to the end and write its result."""
    from flwr.supercore.task_identity import TaskIdentity

    from jaxlayerx.flower.serverapp import FedAvgLayers, FedAvgSparse

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    nodes = {node: FileNode(node, work / "nodes", sparse) for node in NODES}
    cls = FedAvgSparse if sparse else FedAvgLayers
    strategy = cls(min_available_nodes=3, checkpoint_dir=work / "checkpoint", resume=resume)
    grid = FileGrid(nodes, stop_after_train, work / "stopped")
    result = strategy.start(grid, arrays_to_record(initial_model()), num_rounds=ROUNDS, timeout=10)
    rounds = {"train": sorted(result.train_metrics_clientapp), "evaluate": sorted(result.evaluate_metrics_clientapp)}
    save_checkpoint(work / "result", record_to_arrays(result.arrays), {"round": ROUNDS, "metric_rounds": rounds})


def _launch(work: Path, *options: str) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen(
        [sys.executable, __file__, str(work), *options],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(process: subprocess.Popen) -> None:
    try:
        output, _ = process.communicate(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    assert process.returncode == 0, output[-4000:]


def _checkpoint_round(folder: Path) -> int | None:
    try:
        return int(json.loads((folder / "state.json").read_text())["round"])
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _train_log(work: Path, node: int) -> list[dict]:
    return [json.loads(line) for line in (work / "nodes" / f"node-{node}" / "train.log").read_text().splitlines()]


@pytest.mark.deploy  # real server processes, killed
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_a_server_killed_after_round_2_resumes_bit_for_bit(tmp_path, sparse):
    flag = ["--sparse"] if sparse else []
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    _finish(_launch(straight, *flag))

    process = _launch(interrupted, *flag, "--resume", "--stop-after-train", "3")
    deadline = time.monotonic() + WAIT_S
    while not ((interrupted / "stopped").exists() and _checkpoint_round(interrupted / "checkpoint") == 2):
        assert process.poll() is None, process.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "round 3 never started"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=WAIT_S)
    assert process.returncode == -signal.SIGKILL
    assert _checkpoint_round(interrupted / "checkpoint") == 2  # killed with round 2's checkpoint on disk

    _finish(_launch(interrupted, *flag, "--resume"))

    expected, _ = load_checkpoint(straight / "result")
    got, state = load_checkpoint(interrupted / "result")
    assert list(got) == list(initial_model())
    for name in expected:
        assert got[name].dtype == expected[name].dtype
        np.testing.assert_array_equal(bits(got[name]), bits(expected[name]))
    assert not all(np.array_equal(got[name], initial_model()[name]) for name in got)  # the run did change it
    # The result carries the metrics of every round, those before the restart included.
    assert state["metric_rounds"] == {"train": [1, 2, 3, 4], "evaluate": [1, 2, 3, 4]}
    # No node redid rounds 1 and 2: each trained every round once, round 3 (the one cut short) at most twice.
    for node in NODES:
        rounds = [entry["round"] for entry in _train_log(interrupted, node)]
        assert rounds in ([1, 2, 3, 4], [1, 2, 3, 3, 4]), (node, rounds)
        # After the restart the server still knew what each node held: a delta, not the whole model.
        resent = _train_log(interrupted, node)[3]
        assert resent["round"] == 3 and resent["base"] == 2, resent


def test_save_and_load_keep_names_order_dtypes_and_bits(tmp_path):
    import ml_dtypes

    arrays = {
        "z/kernel": np.arange(2**16, dtype=np.uint16).view(ml_dtypes.bfloat16).reshape(256, 256),
        "a": np.array([np.nan, -0.0, 1.0], np.float16),
        "count": np.array(3, np.int64),
    }
    save_checkpoint(tmp_path, arrays, {"round": 7, "extra": [1, 2]})
    loaded, state = load_checkpoint(tmp_path)
    assert list(loaded) == list(arrays) and state == {"round": 7, "extra": [1, 2]}
    for name, array in arrays.items():
        assert loaded[name].dtype == array.dtype and loaded[name].shape == array.shape
        np.testing.assert_array_equal(bits(loaded[name]), bits(array))


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path, {"w": np.ones(3, np.float32)}, {"round": 1})
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, {"w": np.zeros(3, np.float32)}, {"round": 2, "bad": object()})
    loaded, state = load_checkpoint(tmp_path)
    assert state["round"] == 1 and loaded["w"].tolist() == [1, 1, 1]
    save_checkpoint(tmp_path, {"w": np.zeros(3, np.float32)}, {"round": 2})
    assert sorted(path.name for path in tmp_path.iterdir()) == ["arrays-000002.npz", "state.json"]
    assert load_checkpoint(tmp_path / "missing") is None


def _run(strategy, nodes, rounds):
    grid = fake_grid_class()(nodes)
    for server_round in rounds:
        messages = strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid)
        strategy.aggregate_train(server_round, grid.send_and_receive(messages))
    return grid


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_state_is_arrays_and_json_and_restores_the_server(tmp_path, sparse, task_identity):
    from jaxlayerx.flower.serverapp import FedAvgLayers, FedAvgSparse

    cls = FedAvgSparse if sparse else FedAvgLayers
    nodes = {node: FileNode(node, tmp_path / "nodes", sparse) for node in (11, 22)}
    strategy = cls(min_train_nodes=2, min_available_nodes=2, checkpoint_dir=tmp_path / "checkpoint")
    strategy.set_global_model(arrays_to_record(initial_model()))
    _run(strategy, nodes, [1, 2])
    arrays, state = strategy.state()
    json.loads(json.dumps(state))  # JSON all through
    assert state["round"] == 2 and state["core"]["version"] == 2
    # both nodes answered round 2's message, which brought version 1
    assert sorted(map(tuple, state["core"]["held"])) == [(11, 1), (22, 1)]
    assert [entry["server_round"] for entry in state["history"]] == [1, 2]
    layers = {name: value for name, value in arrays.items() if not name.startswith("updated_in/")}
    assert list(layers) == list(initial_model())
    for name, value in layers.items():
        np.testing.assert_array_equal(bits(value), bits(strategy.global_layers[name]))
    # the version in which each layer (entry) last changed, from what the nodes' logs say they sent
    changed = {name: np.zeros(value.shape, np.int64) for name, value in initial_model().items()}
    for server_round in (1, 2):
        for node in (11, 22):
            names = sorted(initial_model())
            for name in {names[(node + server_round) % 4], names[(node * server_round) % 4]}:
                step = 2 if (node + server_round) % 2 else 3
                flat = np.arange(0, changed[name].size, step) if sparse else np.arange(changed[name].size)
                changed[name].reshape(-1)[flat] = server_round
    if sparse:
        for name, rounds in changed.items():
            np.testing.assert_array_equal(arrays[f"updated_in/{name}"], rounds, err_msg=name)
    else:
        assert state["core"]["updated_in"] == {name: int(rounds.max()) for name, rounds in changed.items()}

    # a fresh strategy restored from the saved checkpoint serves exactly what the first one would
    strategy.save_checkpoint()
    restored = cls(min_train_nodes=2, min_available_nodes=2)
    restored.set_global_model(arrays_to_record(initial_model()))
    restored.restore_state(*load_checkpoint(tmp_path / "checkpoint"))
    assert restored.version == 2 and restored.history == strategy.history
    for name in initial_model():
        np.testing.assert_array_equal(bits(restored.global_layers[name]), bits(strategy.global_layers[name]))
    grid = fake_grid_class()(nodes)
    ours = {m.metadata.dst_node_id: m for m in strategy.configure_train(3, ArrayRecord(), ConfigRecord(), grid)}
    theirs = {m.metadata.dst_node_id: m for m in restored.configure_train(3, ArrayRecord(), ConfigRecord(), grid)}
    assert sorted(ours) == sorted(theirs) == [11, 22]
    for node in ours:
        assert dict(ours[node].content.config_records["config"]) == dict(theirs[node].content.config_records["config"])
        assert ours[node].content.config_records["config"]["jaxlayerx.base-round"] == 1
        mine = ref_record_arrays(ours[node].content.array_records["arrays"])
        other = ref_record_arrays(theirs[node].content.array_records["arrays"])
        assert list(mine) == list(other)
        for key in mine:
            np.testing.assert_array_equal(bits(mine[key]), bits(other[key]))


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    from jaxlayerx.flower.serverapp import FedAvgLayers

    saved = FedAvgLayers(checkpoint_dir=tmp_path)
    saved.set_global_model(arrays_to_record({"w": np.ones(3, np.float32)}))
    saved.save_checkpoint()
    strategy = FedAvgLayers(checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="differ"):
        strategy.start(fake_grid_class()({}), arrays_to_record({"w": np.ones(4, np.float32)}), num_rounds=2)
    with pytest.raises(ValueError, match="differ"):
        strategy.start(fake_grid_class()({}), arrays_to_record({"v": np.ones(3, np.float32)}), num_rounds=2)


def test_resume_refuses_a_checkpoint_of_the_other_strategy(tmp_path):
    from jaxlayerx.flower.serverapp import FedAvgLayers, FedAvgSparse

    saved = FedAvgLayers(checkpoint_dir=tmp_path)
    saved.set_global_model(arrays_to_record({"w": np.ones(3, np.float32)}))
    saved.save_checkpoint()
    strategy = FedAvgSparse(checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="other kind"):
        strategy.start(fake_grid_class()({}), arrays_to_record({"w": np.ones(3, np.float32)}), num_rounds=2)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("work", type=Path)
    parser.add_argument("--sparse", action="store_true")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--stop-after-train", type=int)
    arguments = parser.parse_args()
    serve(arguments.work, sparse=arguments.sparse, resume=arguments.resume, stop_after_train=arguments.stop_after_train)
