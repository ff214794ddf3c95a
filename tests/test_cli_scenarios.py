"""The ``jaxlayerx`` command line end to end: data sets (mnist1d, .npz), models, feature
shift, client sampling and chunking, local and server optimizers, ``--repeat``, the sorted
summary table, ``--version`` and the errors of the options that come with them.

Tiny runs through ``jaxlayerx.simulation.cli.main``; runs several tests read are shared
through module-scoped fixtures.
"""

from __future__ import annotations

import csv
import json
import math
import re

import numpy as np
import pytest
from cli_support import LAYERS, MODEL_MESSAGE, TINY, assert_one_error_line, run_in_process, without_wall_seconds

from jaxlayerx.simulation.cli import PERSONALIZED, main

PNG = b"\x89PNG\r\n\x1a\n"
#: One round, for the runs whose content does not depend on several.
ONE_ROUND = ["--clients", "3", "--rounds", "1", "--local-steps", "2", "--batch-size", "8", "--no-progress"]
NEW_OPTIONS = [
    "--data",
    "--model",
    "--shift",
    "--beta",
    "--test-fraction",
    "--clients",
    "--clients-per-round",
    "--chunk-size",
    "--local-optimizer",
    "--learning-rate",
    "--server-optimizer",
    "--server-lr",
    "--repeat",
]


# -- helpers -----------------------------------------------------------------------------


def run_ok(folder, *argv: str) -> tuple[dict, dict, str]:
    """Runs ``argv`` into ``folder``; returns (config, metrics, stdout) after checking exit 0."""
    code, out, err = run_in_process([*argv, "--out", str(folder)])
    assert code == 0, err
    assert "Traceback" not in err
    config = json.loads((folder / "config.json").read_text())
    metrics = json.loads((folder / "metrics.json").read_text())
    return config, metrics, out


def run_error(argv: list[str], capsys) -> tuple[str, str]:
    """Runs ``argv``, which must fail as a bad option: exit status 2 whether ``main`` returns
    it or argparse exits with it; returns (stdout, stderr), neither with a traceback."""
    escaped = None
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    except Exception as error:  # a traceback for the user
        escaped = f"{type(error).__name__}: {error}"
    if escaped is not None:
        pytest.fail(f"main raised {escaped} (a traceback, not one error line with exit status 2)")
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert "Traceback" not in captured.out + captured.err
    return captured.out, captured.err


def check_records(history: list[dict], rounds: int, sampled: int) -> None:
    assert [r["round"] for r in history] == list(range(1, rounds + 1))
    for record in history:
        assert len(record["clients"]) == sampled
        assert len(record["local_accuracy"]) == sampled
        assert len(record["layers_sent"]) == sampled
        assert 0 <= record["global_accuracy"] <= 1 and math.isfinite(record["global_loss"])


def parse_table(out: str) -> tuple[list[str], list[dict[str, str]]]:
    """The summary table in ``out``: its header, and per row ``column -> cell`` (the note
    may hold spaces; exchanger labels here do not)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("exchanger "))
    header = lines[start].split()
    assert set(lines[start + 1].replace(" ", "")) == {"-"}
    rows = []
    for line in lines[start + 2 :]:
        if line.startswith("run folder:") or not line.strip():
            break
        cells = line.split(None, len(header) - 1)
        if len(cells) == len(header) - 1:  # an empty note
            cells.append("")
        rows.append(dict(zip(header, cells)))
    return header, rows


def assert_close(left, right, path="") -> None:
    """Equal structures, numbers to 1e-6."""
    if isinstance(left, dict):
        assert left.keys() == right.keys(), path
        for key in left:
            assert_close(left[key], right[key], f"{path}/{key}")
    elif isinstance(left, list):
        assert len(left) == len(right), path
        for index, (a, b) in enumerate(zip(left, right)):
            assert_close(a, b, f"{path}[{index}]")
    elif isinstance(left, float) or isinstance(right, float):
        assert left == pytest.approx(right, abs=1e-6, nan_ok=True), path
    else:
        assert left == right, path


# -- 1. mnist1d ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist1d_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("mnist1d")
    cnn = run_ok(base / "cnn", "simulate", "--data", "mnist1d", *ONE_ROUND)
    mlp = run_ok(base / "mlp", "simulate", "--data", "mnist1d", "--model", "mlp", *ONE_ROUND)
    return cnn, mlp


def test_mnist1d_runs_with_the_cnn_by_default(mnist1d_runs):
    config, metrics, out = mnist1d_runs[0]
    assert config["data"] == "mnist1d"
    assert config["model"] == "cnn"
    check_records(metrics["full"], rounds=1, sampled=3)
    assert "full" in out


def test_mnist1d_model_mlp_overrides_the_default(mnist1d_runs):
    (cnn_config, cnn_metrics, _), (config, metrics, _) = mnist1d_runs
    assert config["data"] == "mnist1d"
    assert config["model"] == "mlp"
    check_records(metrics["full"], rounds=1, sampled=3)
    # A different model moves a different number of bytes.
    assert metrics["full"][0]["upload_bytes"] != cnn_metrics["full"][0]["upload_bytes"]


def test_fixed_with_its_default_layers_runs_on_mnist1d(tmp_path):
    # Found while writing these tests: `jaxlayerx compare --data mnist1d` fails with its
    # default exchangers, because fixed's default --layers name the MLP's layers
    # (*/Dense_0/*, */BatchNorm_0/*, */Dense_1/*) and mnist1d's default model is the CNN,
    # which has no Dense_1 (its Dense_0 is the head): "layer '*/Dense_1/*' is not in the model".
    code, out, err = run_in_process(
        ["compare", "--data", "mnist1d", "--exchangers", "full,fixed", "--out", str(tmp_path / "run"), *ONE_ROUND]
    )
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    total = metrics["full"][0]["layers_sent"][0]
    assert metrics["fixed"][0]["layers_sent"] == [total - 2] * 3  # every layer but the head's kernel and bias


# -- 2. and 3. .npz files ------------------------------------------------------------------


def make_npz(path, n=120, n_test=None, seed=0, **overrides):
    """``n`` examples of shape (6,) in 3 classes, linearly separable-ish; a test split of
    ``n_test`` when given. ``overrides`` replace (or with ``None`` remove) arrays."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(3, 6)).astype(np.float32) * 3

    def examples(count):
        y = np.arange(count) % 3
        return (centers[y] + rng.normal(size=(count, 6))).astype(np.float32), y.astype(np.int64)

    arrays = dict(zip(("x", "y"), examples(n)))
    if n_test is not None:
        arrays.update(zip(("x_test", "y_test"), examples(n_test)))
    arrays.update(overrides)
    np.savez(path, **{key: value for key, value in arrays.items() if value is not None})
    return path


N_TEST = 37  # a prime: the global accuracy is a multiple of 1/37 when every test example is used


@pytest.fixture(scope="module")
def npz_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("npz")
    plain = make_npz(base / "plain.npz")
    split = make_npz(base / "split.npz", n_test=N_TEST)
    return (
        run_ok(base / "plain-run", "simulate", "--data", str(plain), *TINY),
        run_ok(base / "split-run", "simulate", "--data", str(split), *TINY),
    )


def test_npz_without_a_test_split(npz_runs):
    config, metrics, _ = npz_runs[0]
    assert config["data"] == "plain.npz"
    assert config["model"] == "mlp"
    check_records(metrics["full"], rounds=2, sampled=3)
    for record in metrics["full"]:
        # Each client holds out a share of its own examples: every client has tests.
        assert all(a is not None and 0 <= a <= 1 for a in record["local_accuracy"])


def test_npz_with_its_own_test_split(npz_runs):
    config, metrics, _ = npz_runs[1]
    assert config["data"] == "split.npz"
    check_records(metrics["full"], rounds=2, sampled=3)
    for record in metrics["full"]:
        local = record["local_accuracy"]
        assert len(local) == len(record["clients"]) == 3
        assert all(a is None or 0 <= a <= 1 for a in local)
        assert any(a is not None for a in local)
        tested = [a for a in local if a is not None]
        assert record["local_accuracy_mean"] == pytest.approx(np.mean(tested))
        # The global test set is the file's 37 test examples, shared out among the clients.
        correct = record["global_accuracy"] * N_TEST
        assert correct == pytest.approx(round(correct), abs=1e-3)


@pytest.mark.parametrize(
    "arrays, needles",
    [
        (None, ["missing.npz"]),
        ({"y": None}, ["'y'"]),
        ({"y": np.linspace(0, 2, 120) + 0.5}, ["'y'", "integer"]),
        ({"y": np.array(["a", "b", "c"] * 40)}, ["'y'", "integer"]),
        ({"x_test": np.zeros((10, 6), np.float32)}, ["x_test", "y_test"]),
        ({"y_test": np.zeros(10, np.int64)}, ["x_test", "y_test"]),
    ],
    ids=[
        "missing-file",
        "missing-y",
        "float-labels",
        "string-labels",
        "x_test-without-y_test",
        "y_test-without-x_test",
    ],
)
def test_bad_npz_is_one_error_line(arrays, needles, tmp_path, capsys):
    path = tmp_path / ("missing.npz" if arrays is None else "bad.npz")
    if arrays is not None:
        make_npz(path, **arrays)
    folder = tmp_path / "run"
    out, err = run_error(["simulate", "--data", str(path), "--out", str(folder), *TINY], capsys)
    assert_one_error_line(out, err, *needles)
    assert not (folder / "metrics.json").exists()


def test_unreadable_npz_is_one_error_line(tmp_path, capsys):
    path = tmp_path / "garbage.npz"
    path.write_bytes(b"not a zip archive")
    out, err = run_error(["simulate", "--data", str(path), "--out", str(tmp_path / "run"), *TINY], capsys)
    assert_one_error_line(out, err)  # numpy's message does not name the file
    assert not (tmp_path / "run").exists()


# Found while writing these tests: each of these ends in a Python traceback (exit status 1)
# instead of one error line and exit status 2.


def test_empty_npz_file_is_one_error_line(tmp_path, capsys):
    # np.load raises EOFError on a zero-byte file, which main does not catch.
    path = tmp_path / "empty.npz"
    path.write_bytes(b"")
    out, err = run_error(["simulate", "--data", str(path), "--out", str(tmp_path / "run"), *TINY], capsys)
    assert_one_error_line(out, err, "empty.npz")
    assert not (tmp_path / "run").exists()


def test_npz_with_an_empty_test_split_is_one_error_line(tmp_path, capsys):
    # x_test of shape (0, 6) passes load_npz; the global test set is then empty and the MLP's
    # reshape((0, -1)) raises ZeroDivisionError inside the first round, after the run
    # folder was made.
    path = make_npz(tmp_path / "split.npz", n_test=0)
    folder = tmp_path / "run"
    out, err = run_error(["simulate", "--data", str(path), "--out", str(folder), *TINY], capsys)
    assert_one_error_line(out, err, "x_test")
    assert not (folder / "metrics.json").exists()


# -- 4. feature shift ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def shift_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("shift")
    return (
        run_ok(base / "iid", "simulate", "--shift", *TINY),
        run_ok(base / "beta", "simulate", "--shift", "--beta", "0.5", *TINY),
    )


def test_shift_alone_splits_labels_iid(shift_runs):
    config, metrics, _ = shift_runs[0]
    assert config["shift"] is True
    assert config["beta"] is None
    check_records(metrics["full"], rounds=2, sampled=3)


def test_shift_with_beta_keeps_the_dirichlet_split(shift_runs):
    (_, iid_metrics, _), (config, metrics, _) = shift_runs
    assert config["shift"] is True
    assert config["beta"] == 0.5
    check_records(metrics["full"], rounds=2, sampled=3)
    assert without_wall_seconds(metrics) != without_wall_seconds(iid_metrics)


def test_no_shift_is_recorded_with_the_default_beta(optimizer_runs):
    config = optimizer_runs["avg"][0]
    assert config["shift"] is False
    assert config["beta"] == 0.5


# -- 5. client sampling and chunks ---------------------------------------------------------


SAMPLED = [
    "simulate",
    "--clients",
    "10",
    "--clients-per-round",
    "3",
    "--rounds",
    "3",
    "--local-steps",
    "2",
    "--batch-size",
    "8",
    "--no-progress",
]


@pytest.fixture(scope="module")
def sampled_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("sampled")
    return run_ok(base / "whole", *SAMPLED), run_ok(base / "chunked", *SAMPLED, "--chunk-size", "2")


def test_clients_per_round_samples_distinct_clients(sampled_runs):
    config, metrics, _ = sampled_runs[0]
    assert config["num_clients"] == 10
    assert config["clients_per_round"] == 3
    assert config["chunk_size"] is None
    history = metrics["full"]
    check_records(history, rounds=3, sampled=3)
    for record in history:
        clients = record["clients"]
        assert len(set(clients)) == 3
        assert all(isinstance(c, int) and 0 <= c < 10 for c in clients)
        assert record["client_upload_bytes"] == [MODEL_MESSAGE] * 3
        assert record["upload_bytes"] == 3 * MODEL_MESSAGE
        # Full exchange changes every layer every round: a client sampled before and one
        # sampled for the first time are both sent every layer.
        assert record["client_download_bytes"] == [MODEL_MESSAGE] * 3
        assert record["layers_sent"] == [len(LAYERS)] * 3
    # Seeded sampling over 3 rounds does not draw the same three every time.
    assert len({tuple(r["clients"]) for r in history}) > 1


def test_chunked_round_matches_the_unchunked_one(sampled_runs):
    (_, whole, _), (config, chunked, _) = sampled_runs
    assert config["chunk_size"] == 2
    assert_close(without_wall_seconds(chunked), without_wall_seconds(whole))


# -- 6. local and server optimizers --------------------------------------------------------


@pytest.fixture(scope="module")
def optimizer_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("optimizers")
    return {
        "avg": run_ok(base / "avg", "simulate", *TINY),
        "adam": run_ok(base / "adam", "simulate", "--server-optimizer", "adam", "--server-lr", "0.05", *TINY),
        "sgd": run_ok(base / "sgd", "simulate", "--server-optimizer", "sgd", *TINY),
        "local-adam": run_ok(
            base / "local-adam", "simulate", "--local-optimizer", "adam", "--learning-rate", "0.01", *TINY
        ),
    }


def test_server_adam_is_recorded(optimizer_runs):
    config, metrics, _ = optimizer_runs["adam"]
    assert config["server_optimizer"] == "adam"
    assert config["server_lr"] == 0.05
    check_records(metrics["full"], rounds=2, sampled=3)
    avg = optimizer_runs["avg"][1]["full"]
    assert [r["global_loss"] for r in metrics["full"]] != [r["global_loss"] for r in avg]


def test_server_sgd_at_rate_one_is_fedavg(optimizer_runs):
    config, metrics, _ = optimizer_runs["sgd"]
    assert config["server_optimizer"] == "sgd"
    assert config["server_lr"] is None  # the optimizer's default, 1
    avg_config, avg, _ = optimizer_runs["avg"]
    assert avg_config["server_optimizer"] == "avg" and avg_config["server_lr"] is None
    assert metrics["full"][-1]["global_accuracy"] == pytest.approx(avg["full"][-1]["global_accuracy"], abs=1e-3)
    assert metrics["full"][-1]["global_loss"] == pytest.approx(avg["full"][-1]["global_loss"], rel=1e-3)


def test_local_adam_is_recorded(optimizer_runs):
    config, metrics, _ = optimizer_runs["local-adam"]
    assert config["local_optimizer"] == "adam"
    assert config["learning_rate"] == 0.01
    check_records(metrics["full"], rounds=2, sampled=3)
    assert optimizer_runs["avg"][0]["local_optimizer"] == "sgd"


# -- 7. and 8. repeats and the table -------------------------------------------------------


REPEAT_EXCHANGERS = ["full", "fixed", "exclude-bn"]


@pytest.fixture(scope="module")
def repeat_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("repeat") / "run"
    config, metrics, out = run_ok(
        folder,
        "compare",
        "--exchangers",
        ",".join(REPEAT_EXCHANGERS),
        "--layers",
        "params/Dense_2/*",
        "--repeat",
        "2",
        "--seed",
        "5",
        *TINY,
    )
    return folder, config, metrics, out


def test_repeat_runs_consecutive_seeds(repeat_run):
    _, config, _, _ = repeat_run
    assert config["seeds"] == [5, 6]
    assert config["seed"] == 5


def test_repeat_table_shows_mean_and_spread(repeat_run):
    _, _, _, out = repeat_run
    _, rows = parse_table(out)
    assert [row["exchanger"] for row in rows] and {row["exchanger"] for row in rows} == set(REPEAT_EXCHANGERS)
    for row in rows:
        for column in ("global_acc", "local_acc"):
            assert re.fullmatch(r"[01]\.\d{3}±\d\.\d{3}", row[column]), (column, row[column])


def test_repeat_csv_has_a_seed_column(repeat_run):
    folder, _, _, _ = repeat_run
    with (folder / "metrics.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert "seed" in rows[0]
    assert {int(r["seed"]) for r in rows} == {5, 6}
    assert len(rows) == len(REPEAT_EXCHANGERS) * 2 * 2  # exchangers x seeds x rounds
    for name in REPEAT_EXCHANGERS:
        for seed in (5, 6):
            assert [int(r["round"]) for r in rows if r["exchanger"] == name and int(r["seed"]) == seed] == [1, 2]


def test_repeat_metrics_json_holds_means_and_by_seed(repeat_run):
    folder, _, metrics, _ = repeat_run
    assert list(metrics) == REPEAT_EXCHANGERS
    with (folder / "metrics.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    for name, history in metrics.items():
        assert len(history) == 2
        for record in history:
            by_seed = record["by_seed"]
            assert "global_accuracy" in by_seed and "upload_bytes" in by_seed
            for key, values in by_seed.items():
                assert len(values) == 2, key
                assert record[key] == pytest.approx(np.mean(values)), key
            csv_values = [
                float(r["global_accuracy"])
                for r in rows
                if r["exchanger"] == name and int(r["round"]) == record["round"]
            ]
            assert csv_values == pytest.approx(by_seed["global_accuracy"])


def test_table_is_sorted_by_upload_with_frontier_and_note(repeat_run):
    _, _, _, out = repeat_run
    header, rows = parse_table(out)
    assert header[0] == "exchanger" and header[-2:] == ["frontier", "note"]
    uploads = [float(row["up_MB"]) for row in rows]
    assert uploads == sorted(uploads)
    assert [row["exchanger"] for row in rows] == ["fixed", "exclude-bn", "full"]  # head < dense < all
    for row in rows:
        assert row["frontier"] == "-" or set(row["frontier"].split(",")) <= {"global", "local"}
    assert any(row["frontier"] != "-" for row in rows)  # the cheapest is always on it
    line = next(line for line in out.splitlines() if line.startswith("exclude-bn "))
    assert line.endswith(PERSONALIZED) and PERSONALIZED == "personalized: read local_acc"
    # fixed sends the head only: its other layers never leave the clients either.
    assert {row["exchanger"]: row["note"] for row in rows} == {
        "fixed": PERSONALIZED,
        "exclude-bn": PERSONALIZED,
        "full": "",
    }


def test_run_folder_has_both_plots(repeat_run):
    folder = repeat_run[0]
    for name in ("plot.png", "plot_total.png"):
        assert (folder / name).read_bytes()[:8] == PNG, name
    import matplotlib.image

    image = matplotlib.image.imread(folder / "plot_total.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


# -- 9. bad options ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--data", "nosuch"], ["nosuch"]),
        (["--model", "transformer"], ["--model", "transformer"]),
        (["--clients-per-round", "0"], ["clients-per-round", "0"]),
        (["--clients", "8", "--clients-per-round", "20"], ["clients-per-round", "20", "8"]),
        (["--chunk-size", "0"], ["chunk-size", "0"]),
        (["--server-optimizer", "nadam"], ["--server-optimizer", "nadam"]),
        (["--server-optimizer", "adam", "--server-lr", "0"], ["server-lr", "0"]),
        (["--server-lr", "0.1"], ["server-lr", "avg"]),
        (["--local-optimizer", "rmsprop"], ["--local-optimizer", "rmsprop"]),
        (["--repeat", "0"], ["--repeat", "0"]),
        (["--learning-rate", "-1"], ["learning-rate", "-1"]),
    ],
    ids=[
        "data-nosuch",
        "model-transformer",
        "per-round-0",
        "per-round-above-clients",
        "chunk-0",
        "server-nadam",
        "server-lr-0",
        "server-lr-with-avg",
        "local-rmsprop",
        "repeat-0",
        "learning-rate-neg",
    ],
)
@pytest.mark.parametrize("command", ["simulate", "compare"])
def test_bad_option_is_one_error_line(command, args, needles, tmp_path, capsys):
    folder = tmp_path / "run"
    out, err = run_error([command, "--out", str(folder), *TINY, *args], capsys)
    assert_one_error_line(out, err, *needles)
    assert not (folder / "metrics.json").exists()
    assert not folder.exists()


# -- 10. --version and --help --------------------------------------------------------------


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == "jaxlayerx 0.1.0"
    assert captured.err == ""


@pytest.mark.parametrize("command", ["simulate", "compare"])
def test_help_lists_the_new_options(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in NEW_OPTIONS:
        assert re.search(rf"(^|[\s\[]){re.escape(option)}(?![\w-])", out), option
    for choice in ("mnist1d", "mlp", "cnn", "{sgd,adam}", "{avg,sgd,adam,yogi,adagrad}"):
        assert choice in out, choice


# -- the run folder: never silently overwritten, never half written -------------------------


def test_an_existing_non_empty_out_folder_is_refused_unless_overwrite(tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    argv = ["simulate", "--out", str(folder), *TINY]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert_one_error_line(captured.out, captured.err, str(folder), "--overwrite")
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]  # untouched
    assert main([*argv, "--overwrite"]) == 0
    assert (folder / "metrics.json").is_file() and not (folder / "notes.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no staging folder left behind


def test_an_existing_empty_out_folder_is_used(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    assert main(["simulate", "--out", str(folder), *TINY]) == 0
    assert (folder / "metrics.json").is_file()


def test_ctrl_c_stops_with_one_line_status_130_and_no_run_folder(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    folder = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "jaxlayerx", "simulate", "--rounds", "100000", "--out", str(folder)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        line = ""
        while "round" not in line and time.monotonic() < deadline:  # the progress bar is running
            line = process.stderr.readline()
        assert "round" in line, "the run never started"
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130
    lines = [text for text in err.replace("\r", "\n").splitlines() if text.strip() and "round" not in text]
    assert lines == ["jaxlayerx simulate: interrupted; no run folder was written"], err[-2000:]
    assert "Traceback" not in err
    assert not folder.exists() and list(tmp_path.iterdir()) == []
