"""Server restart: a Message-API strategy killed (SIGKILL) at points drawn at random, several
times in a row, resumes from its checkpoint each time and ends with the uninterrupted run's
global model, bit for bit; and a torn checkpoint is never loaded.

The server runs in a separate process (this file run as a script) with a fake ``Grid`` whose
three nodes follow the protocol and keep their state in files, as SuperNodes outlive a
restarted ServerApp. Given ``--kill-at ROUND:PHASE`` the process kills itself (SIGKILL) at
that point of that round (:data:`PHASES`): in the grid, or inside a checkpoint write, by
wrapping :func:`jaxlayerx.flower.checkpoint._atomic_write` in the process.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import os
import random
import signal
import subprocess
import sys
import zipfile
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
#: Where in a round the server can be killed, in the order they happen: the nodes' train
#: replies are in (not yet aggregated); the evaluate messages are about to go (the round
#: aggregated); the evaluate replies are in (the nodes hold the round's model); half the
#: arrays file written to its temporary file; the arrays file renamed into place, the state
#: not yet written; half the state file written; the state file renamed into place (the
#: checkpoint committed), the older checkpoints not yet deleted.
PHASES = ("trained", "aggregated", "evaluated", "arrays-partial", "arrays-renamed", "state-partial", "committed")
#: Kill points in the middle of a file's write.
MID_WRITE = ("arrays-partial", "state-partial")
SEED = 24
KILLS = 5  # kill points per run


def initial_model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "a": rng.normal(size=(3, 4)).astype(np.float32),
        "b": rng.normal(size=(4,)).astype(np.float32),
        "c": rng.normal(size=(2, 2)).astype(np.float32),
        "d": rng.normal(size=(5,)).astype(np.float32),
    }


class FileNode:
    """A node keeping in a checkpoint directory the global version it holds and the one it
    came from, so that it can go back one version: a server killed after a round's evaluate
    messages and before that round's checkpoint resumes one version behind its nodes.
    (jaxlayerx's ClientApp goes back to the round's start for the same reason:
    ``clientapp.rewind_to_round_start``; its error-feedback state goes back with it.)"""

    def __init__(self, node_id: int, state_dir: Path, sparse: bool) -> None:
        self.node_id, self.folder, self.sparse = node_id, state_dir / f"node-{node_id}", sparse

    def _held(self) -> dict[int, dict[str, np.ndarray]]:
        loaded = load_checkpoint(self.folder)
        held: dict[int, dict[str, np.ndarray]] = collections.defaultdict(dict)
        for key, value in (loaded[0] if loaded else {}).items():
            version, name = key.split(":", 1)
            held[int(version)][name] = value
        return held

    def _keep(self, held: dict[int, dict[str, np.ndarray]]) -> None:
        arrays = {f"{version}:{name}": value for version, model in held.items() for name, value in model.items()}
        save_checkpoint(self.folder, arrays, {"round": max(held)})

    def __call__(self, message: Message) -> RecordDict:
        held = self._held()
        config = message.content.config_records["config"]
        server_round, base = int(config["server-round"]), int(config["jaxlayerx.base-round"])
        if base != -1 and base not in held:
            raise RuntimeError(f"node {self.node_id} holds versions {sorted(held)}, not {base}")
        payload = ref_compact_decode(ref_record_arrays(message.content.array_records["arrays"]))
        model = ref_apply({} if base == -1 else held[base], payload)
        self._keep({**({} if base == -1 else {base: held[base]}), int(config["jaxlayerx.round"]): model})
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


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class FileGrid(fake_grid_class()):
    """Kills the process at ``kill_at`` when it is one of the grid's phases."""

    def __init__(self, nodes, kill_at: tuple[int, str] | None) -> None:
        super().__init__(nodes)
        self.kill_at = kill_at

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if not messages:
            return super().send_and_receive(messages, timeout=timeout)
        server_round = int(messages[0].content.config_records["config"]["server-round"])
        train = messages[0].metadata.message_type == MessageType.TRAIN
        if not train and self.kill_at == (server_round, "aggregated"):
            _die()
        replies = super().send_and_receive(messages, timeout=timeout)
        if self.kill_at == (server_round, "trained" if train else "evaluated"):
            _die()
        return replies


def kill_in_checkpoint_writes(folder: Path, server_round: int, phase: str) -> None:
    """Makes this process kill itself at ``phase`` of round ``server_round``'s checkpoint write
    into ``folder`` (other writes, the nodes' included, go through)."""
    from jaxlayerx.flower import checkpoint

    original = checkpoint._atomic_write
    targets = {
        folder / checkpoint.ARRAYS_FILE.format(round=server_round): "arrays",
        folder / checkpoint.STATE_FILE.format(round=server_round): "state",
    }

    def write_half(write):
        def half(file):
            buffer = io.BytesIO()
            write(buffer)
            file.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            file.flush()
            os.fsync(file.fileno())
            _die()

        return half

    def atomic_write(path, write):
        target = targets.get(path)
        original(path, write_half(write) if phase == f"{target}-partial" else write)
        if (target, phase) in {("arrays", "arrays-renamed"), ("state", "committed")}:
            _die()

    checkpoint._atomic_write = atomic_write


def serve(work: Path, *, sparse: bool, resume: bool, kill_at: tuple[int, str] | None) -> None:
    """The server process: run the strategy to the end and write its result."""
    from flwr.supercore.task_identity import TaskIdentity

    from jaxlayerx.flower.serverapp import FedAvgLayers, FedAvgSparse

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    if kill_at is not None:
        kill_in_checkpoint_writes(work / "checkpoint", *kill_at)
    nodes = {node: FileNode(node, work / "nodes", sparse) for node in NODES}
    cls = FedAvgSparse if sparse else FedAvgLayers
    strategy = cls(min_available_nodes=3, checkpoint_dir=work / "checkpoint", resume=resume)
    grid = FileGrid(nodes, kill_at)
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


def _finish(process: subprocess.Popen) -> tuple[int, str]:
    try:
        output, _ = process.communicate(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    return process.returncode, output


def kill_points(seed: int) -> list[tuple[int, str]]:
    """:data:`KILLS` distinct ``(round, phase)`` in the order they happen, one in a file's write."""
    rng = random.Random(seed)
    points = [(r, phase) for r in range(1, ROUNDS + 1) for phase in PHASES]
    mid_write = rng.choice([point for point in points if point[1] in MID_WRITE])
    drawn = [mid_write, *rng.sample([point for point in points if point != mid_write], KILLS - 1)]
    return sorted(drawn, key=lambda point: (point[0], PHASES.index(point[1])))


def _checkpoint_round(folder: Path) -> int | None:
    loaded = load_checkpoint(folder)
    return None if loaded is None else int(loaded[1]["round"])


def _assert_every_final_file_whole(folder: Path, context: str) -> None:
    """Every file at a final name in ``folder`` is whole: each state file parses and its
    checksums agree with it and with its arrays file, each arrays file is a sound ``.npz``.
    Only temporary files (``.<name>.<random>.tmp``) may be partial."""
    for path in sorted(folder.iterdir()) if folder.exists() else []:
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            continue
        if path.suffix == ".json":
            try:
                document = json.loads(path.read_text("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                pytest.fail(f"{context}: {path.name} is torn: {error}")
            checksum = document.pop("sha256")
            canonical = json.dumps(document, sort_keys=True, separators=(",", ":")).encode("utf-8")
            assert hashlib.sha256(canonical).hexdigest() == checksum, f"{context}: {path.name} is torn"
            data = (folder / document["arrays"]["file"]).read_bytes()
            assert len(data) == document["arrays"]["bytes"], f"{context}: {path.name}'s arrays file is torn"
            assert hashlib.sha256(data).hexdigest() == document["arrays"]["sha256"], f"{context}: {path.name}"
        elif path.suffix == ".npz":
            try:
                with zipfile.ZipFile(path) as stored:
                    assert stored.testzip() is None, f"{context}: {path.name} is torn"
            except zipfile.BadZipFile as error:
                pytest.fail(f"{context}: {path.name} is torn: {error}")
        else:
            pytest.fail(f"{context}: unexpected file {path.name}")


def _train_log(work: Path, node: int) -> list[dict]:
    return [json.loads(line) for line in (work / "nodes" / f"node-{node}" / "train.log").read_text().splitlines()]


@pytest.mark.deploy  # real server processes, killed
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_a_server_killed_anywhere_several_times_resumes_bit_for_bit(tmp_path, sparse):
    flag = ["--sparse"] if sparse else []
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    code, output = _finish(_launch(straight, *flag))
    assert code == 0, output[-4000:]

    seed = SEED + sparse
    points = kill_points(seed)
    drawn = f"seed {seed}, kill points {points}"
    for server_round, phase in points:
        context = f"{drawn}: killed at round {server_round} {phase}"
        code, output = _finish(_launch(interrupted, *flag, "--resume", "--kill-at", f"{server_round}:{phase}"))
        assert code == -signal.SIGKILL, f"{context}: exit code {code}\n{output[-4000:]}"
        _assert_every_final_file_whole(interrupted / "checkpoint", context)
        committed = server_round if phase == "committed" else server_round - 1
        assert _checkpoint_round(interrupted / "checkpoint") == (committed or None), context

    code, output = _finish(_launch(interrupted, *flag, "--resume"))
    assert code == 0, f"{drawn}\n{output[-4000:]}"

    expected, _ = load_checkpoint(straight / "result")
    got, state = load_checkpoint(interrupted / "result")
    assert list(got) == list(initial_model()), drawn
    for name in expected:
        assert got[name].dtype == expected[name].dtype, drawn
        np.testing.assert_array_equal(bits(got[name]), bits(expected[name]), err_msg=f"{drawn}: {name}")
    assert not all(np.array_equal(got[name], initial_model()[name]) for name in got)  # the run did change it
    # The result carries the metrics of every round, those before the restarts included.
    assert state["metric_rounds"] == {"train": [1, 2, 3, 4], "evaluate": [1, 2, 3, 4]}, drawn
    # The nodes trained each round once, and once more for each kill before its checkpoint
    # committed; after each restart the server still knew what each node held: a delta from
    # the previous version, not the whole model.
    redone = collections.Counter(r for r, phase in points if phase != "committed")
    trained = [r for r in range(1, ROUNDS + 1) for _ in range(1 + redone[r])]
    for node in NODES:
        log = _train_log(interrupted, node)
        assert [entry["round"] for entry in log] == trained, (drawn, node, log)
        assert [entry["base"] for entry in log] == [r - 1 if r > 1 else -1 for r in trained], (drawn, node, log)
    # The newest two checkpoints are left, and no temporary file; a kill after the last
    # round's checkpoint committed leaves what its next save would have deleted.
    left = sorted(path.name for path in (interrupted / "checkpoint").iterdir())
    last_committed = points[-1] == (ROUNDS, "committed")
    kept = [2, 3, 4] if last_committed else [3, 4]
    names = [f"arrays-{r:06d}.npz" for r in kept] + [f"state-{r:06d}.json" for r in kept]
    assert [name for name in left if not name.startswith(".")] == names, (drawn, left)
    assert last_committed or left == names, (drawn, left)


def test_kill_points_are_seeded_distinct_ordered_and_one_is_in_a_write():
    points = kill_points(SEED)
    assert points == kill_points(SEED) and len(set(points)) == KILLS
    assert points == sorted(points, key=lambda point: (point[0], PHASES.index(point[1])))
    assert any(phase in MID_WRITE for _, phase in points)


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


def test_a_failed_save_leaves_the_previous_checkpoint_and_two_are_kept(tmp_path):
    save_checkpoint(tmp_path, {"w": np.ones(3, np.float32)}, {"round": 1})
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, {"w": np.zeros(3, np.float32)}, {"round": 2, "bad": object()})
    loaded, state = load_checkpoint(tmp_path)
    assert state["round"] == 1 and loaded["w"].tolist() == [1, 1, 1]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["arrays-000001.npz", "state-000001.json"]
    for server_round in (2, 3):
        save_checkpoint(tmp_path, {"w": np.full(3, server_round, np.float32)}, {"round": server_round})
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "arrays-000002.npz",
        "arrays-000003.npz",
        "state-000002.json",
        "state-000003.json",
    ]
    # A run started over in the same folder: its first checkpoint is the newest, the rest go.
    save_checkpoint(tmp_path, {"w": np.zeros(3, np.float32)}, {"round": 1})
    assert sorted(path.name for path in tmp_path.iterdir()) == ["arrays-000001.npz", "state-000001.json"]
    assert load_checkpoint(tmp_path)[1] == {"round": 1}
    assert load_checkpoint(tmp_path / "missing") is None


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


#: Ways to tear round 2's checkpoint: ``(file, how)``.
TEARS = {
    "arrays truncated": ("arrays-000002.npz", _truncate),
    "arrays byte flipped": ("arrays-000002.npz", _flip_a_byte),
    "arrays deleted": ("arrays-000002.npz", Path.unlink),
    "arrays emptied": ("arrays-000002.npz", lambda path: path.write_bytes(b"")),
    "state truncated": ("state-000002.json", _truncate),
    "state byte flipped": ("state-000002.json", _flip_a_byte),
}


def _two_checkpoints(folder: Path) -> dict[int, dict[str, np.ndarray]]:
    import ml_dtypes

    rng = np.random.default_rng(5)
    saved = {}
    for server_round in (1, 2):
        saved[server_round] = {
            "w": rng.normal(size=(4, 3)).astype(np.float32),
            "z": rng.normal(size=(7,)).astype(ml_dtypes.bfloat16),
        }
        save_checkpoint(folder, saved[server_round], {"round": server_round, "tag": f"r{server_round}"})
    return saved


@pytest.mark.parametrize("tear", list(TEARS))
def test_a_torn_checkpoint_is_passed_over_for_the_previous_one(tmp_path, caplog, tear):
    saved = _two_checkpoints(tmp_path)
    file_name, how = TEARS[tear]
    how(tmp_path / file_name)
    with caplog.at_level(logging.WARNING, logger="jaxlayerx.flower.checkpoint"):
        arrays, state = load_checkpoint(tmp_path)
    assert state == {"round": 1, "tag": "r1"}
    assert list(arrays) == ["w", "z"]
    for name, array in saved[1].items():
        assert arrays[name].dtype == array.dtype
        np.testing.assert_array_equal(bits(arrays[name]), bits(array), err_msg=name)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any("state-000002.json" in message and "torn" in message for message in warnings), warnings
    assert any("state-000001.json" in message and "instead" in message for message in warnings), warnings


def test_with_every_checkpoint_torn_load_raises_naming_them(tmp_path):
    _two_checkpoints(tmp_path)
    _flip_a_byte(tmp_path / "arrays-000002.npz")
    _truncate(tmp_path / "state-000001.json")
    with pytest.raises(ValueError, match="every checkpoint is torn") as raised:
        load_checkpoint(tmp_path)
    assert "state-000002.json" in str(raised.value) and "state-000001.json" in str(raised.value)


def test_an_untorn_checkpoint_loads_without_warnings_and_a_format_1_one_is_refused(tmp_path, caplog):
    saved = _two_checkpoints(tmp_path / "new")
    with caplog.at_level(logging.WARNING, logger="jaxlayerx.flower.checkpoint"):
        arrays, state = load_checkpoint(tmp_path / "new")
    assert state["round"] == 2 and not caplog.records
    np.testing.assert_array_equal(bits(arrays["z"]), bits(saved[2]["z"]))
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "state.json").write_text(json.dumps({"format": 1, "round": 3}))
    with pytest.raises(ValueError, match="format 1"):
        load_checkpoint(tmp_path / "old")


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
    parser.add_argument("--kill-at", help="ROUND:PHASE, a phase of PHASES")
    arguments = parser.parse_args()
    kill_at = None
    if arguments.kill_at:
        kill_round, kill_phase = arguments.kill_at.split(":")
        assert kill_phase in PHASES, kill_phase
        kill_at = (int(kill_round), kill_phase)
    serve(arguments.work, sparse=arguments.sparse, resume=arguments.resume, kill_at=kill_at)
