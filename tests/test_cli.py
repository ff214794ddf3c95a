"""The ``jaxlayerx`` command line: ``simulate`` and ``compare`` end to end, on tiny runs.

Runs in-process through ``jaxlayerx.simulation.cli.main`` where it can, plus a few
subprocesses (``python -m jaxlayerx`` and the ``jaxlayerx`` console script) for the real
entry points, exit statuses and stderr.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import itertools
import json
import math
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import RefLayer, ref_message_nbytes

from jaxlayerx.simulation import MLP
from jaxlayerx.simulation.cli import main
from jaxlayerx.simulation.report import CSV_COLUMNS, HISTORY_KEYS

CLIENTS, ROUNDS, LOCAL_STEPS, BATCH, SEED = 3, 2, 2, 8, 0
TINY = [
    "--clients",
    str(CLIENTS),
    "--rounds",
    str(ROUNDS),
    "--local-steps",
    str(LOCAL_STEPS),
    "--batch-size",
    str(BATCH),
    "--no-progress",
]
ALL_EXCHANGERS = ["full", "exclude-bn", "dynamic-percentage", "dynamic-threshold", "fixed"]
PERCENTAGE = 0.25  # ceil(10 * 0.25) = 3, where round() and floor() both give 2
#: Each exchanger's label in the table and metrics.json, with the parameters of the compare run below.
LABELS = {
    "full": "full",
    "exclude-bn": "exclude-bn",
    "dynamic-percentage": "dynamic-percentage(0.25, l2/size)",
    "dynamic-threshold": "dynamic-threshold(0.0001, l2/size)",
    "fixed": "fixed",
}
OPTIONS = [
    "--exchangers",
    "--clients",
    "--rounds",
    "--local-steps",
    "--local-epochs",
    "--batch-size",
    "--learning-rate",
    "--momentum",
    "--beta",
    "--test-fraction",
    "--seed",
    "--unweighted",
    "--layers",
    "--norm-threshold",
    "--exchange-percentage",
    "--normalize",
    "--no-normalize",
    "--select-drift-less",
    "--sparsity-level",
    "--out",
    "--no-progress",
    "--measure",
    "--budget",
    "--error-feedback",
    "--overwrite",
    "--no-compile-cache",
    "--quantize",
]
SPARSE_EXCHANGERS = [
    "sparse-largest-final-magnitude",
    "sparse-smallest-final-magnitude",
    "sparse-largest-magnitude-change",
    "sparse-smallest-magnitude-change",
    "sparse-largest-increase-in-magnitude",
    "sparse-smallest-increase-in-magnitude",
]


# -- helpers -----------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def no_compile_cache():
    """The runs here (in process and in subprocesses) leave JAX's persistent compilation
    cache off; tests/test_sim_cache.py covers it. Module-scoped, so that it comes before
    the module-scoped runs."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JAXLAYERX_CACHE", "off")
        yield


def layer_shapes() -> dict[str, tuple[int, ...]]:
    """name -> shape of the default MLP's layers, from its own variables (not the engine's)."""
    variables = MLP(num_classes=10).init(jax.random.key(0), jnp.ones((1, 64)))
    leaves, _ = jax.tree_util.tree_flatten_with_path(variables)
    return {"/".join(str(k.key) for k in path): tuple(np.shape(leaf)) for path, leaf in leaves}


SHAPES = layer_shapes()
#: name -> bytes of the layer's float32 values.
LAYERS = {name: 4 * math.prod(shape) for name, shape in SHAPES.items()}
MODEL_BYTES = sum(LAYERS.values())


@functools.cache
def message_nbytes(names: frozenset[str], int8: bool = False) -> int:
    """Bytes of the Message-API message holding the layers ``names`` whole (float32 values,
    or with ``int8`` int8-coded updates, one float32 scale a layer): the compact arrays
    written by the tests' reference codec, counted by Flower's ArrayRecord."""
    dtype, form = (np.int8, 2) if int8 else (np.float32, 0)
    layers = {n: RefLayer(np.zeros(SHAPES[n], dtype), None, SHAPES[n], form=form) for n in SHAPES if n in names}
    return ref_message_nbytes(layers)


#: The whole model, as one message.
MODEL_MESSAGE = message_nbytes(frozenset(SHAPES))


def dynamic_client_bytes(k: int, fits=lambda chosen: True, int8: bool = False) -> set[int]:
    """Every message size of a dynamic client sending ``k`` whole layers (those ``fits`` allows)."""
    combinations = itertools.combinations(LAYERS, k)
    return {message_nbytes(frozenset(chosen), int8) for chosen in combinations if fits(chosen)}


def assert_dynamic_uploads(record: dict, fits=lambda chosen: True, int8: bool = False) -> None:
    """Each client's upload is the message of as many whole layers as it sent, and the
    round's upload their sum."""
    assert len(record["client_upload_bytes"]) == len(record["layers_sent"])
    for upload, k in zip(record["client_upload_bytes"], record["layers_sent"]):
        assert upload in dynamic_client_bytes(k, fits, int8), (upload, k)
    assert record["upload_bytes"] == sum(record["client_upload_bytes"])


def run_in_process(argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` with stdout and stderr captured: (code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def run_subprocess(args: list[str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)


def without_wall_seconds(metrics: dict) -> dict:
    return {
        name: [{k: v for k, v in r.items() if k != "wall_seconds"} for r in history]
        for name, history in metrics.items()
    }


def assert_one_error_line(out: str, err: str, *needles: str) -> str:
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("jaxlayerx") and "error" in line, line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


# -- end to end --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def simulate_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "run"
    code, out, err = run_in_process(["simulate", "--out", str(folder), "--seed", str(SEED), *TINY])
    return folder, code, out, err


def test_simulate_writes_the_run_folder(simulate_run):
    folder, code, out, _ = simulate_run
    assert code == 0
    for name in ("config.json", "metrics.json", "metrics.csv", "plot.png"):
        assert (folder / name).is_file(), name

    metrics = json.loads((folder / "metrics.json").read_text())
    assert list(metrics) == ["full"]
    history = metrics["full"]
    assert [r["round"] for r in history] == list(range(1, ROUNDS + 1))
    for record in history:
        assert set(HISTORY_KEYS) <= set(record)
        assert len(record["local_accuracy"]) == CLIENTS and len(record["layers_sent"]) == CLIENTS
        assert 0 <= record["global_accuracy"] <= 1 and math.isfinite(record["global_loss"])
        assert record["local_accuracy_mean"] == pytest.approx(np.mean(record["local_accuracy"]))

    config = json.loads((folder / "config.json").read_text())
    assert config["num_clients"] == CLIENTS
    assert config["rounds"] == ROUNDS
    assert config["local_steps"] == LOCAL_STEPS
    assert config["batch_size"] == BATCH
    assert config["seed"] == SEED
    assert config["command"] == "simulate"
    assert [e["kind"] for e in config["exchangers"]] == ["full"]

    with (folder / "metrics.csv").open(newline="") as file:
        rows = list(csv.reader(file))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [row[0] for row in rows[1:]] == ["full"] * ROUNDS

    png = (folder / "plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(folder / "plot.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100

    assert "exchanger" in out and "global_acc" in out
    assert any(line.split()[:1] == ["full"] for line in out.splitlines())
    assert str(folder) in out


def test_full_exchange_moves_the_whole_model_each_way(simulate_run):
    folder = simulate_run[0]
    # By hand: the header names 10 layers (2 + per layer 1 + name + 2 + group, count, rank
    # and dimension varints), the values are every float32 of the model; each array is a
    # 128-byte .npy header, its data and its key ("header", "values0").
    header = 2 + sum(
        1 + len(n) + 2 + 1 + varint_size(math.prod(s)) + 1 + sum(map(varint_size, s)) for n, s in SHAPES.items()
    )
    assert MODEL_MESSAGE == (128 + header + len("header")) + (128 + MODEL_BYTES + len("values0"))
    for record in json.loads((folder / "metrics.json").read_text())["full"]:
        assert record["client_upload_bytes"] == [MODEL_MESSAGE] * CLIENTS
        assert record["client_download_bytes"] == [MODEL_MESSAGE] * CLIENTS
        assert record["upload_bytes"] == CLIENTS * MODEL_MESSAGE
        assert record["download_bytes"] == CLIENTS * MODEL_MESSAGE
        assert record["layers_sent"] == [len(LAYERS)] * CLIENTS


def varint_size(number: int) -> int:
    """Bytes of ``number`` as an unsigned LEB128 varint: 7 bits a byte."""
    return max(1, -(-number.bit_length() // 7))


# -- compare -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "compare"
    argv = [
        "compare",
        "--exchangers",
        ",".join(ALL_EXCHANGERS),
        "--layers",
        "params/Dense_2/*",
        "--exchange-percentage",
        str(PERCENTAGE),
        "--out",
        str(folder),
        *TINY,
    ]
    code, out, _ = run_in_process(argv)
    assert code == 0
    return folder, json.loads((folder / "metrics.json").read_text()), out


def test_compare_runs_every_exchanger_on_the_same_split(compare_run):
    folder, metrics, out = compare_run
    assert list(metrics) == [LABELS[name] for name in ALL_EXCHANGERS]
    with (folder / "metrics.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    for name in map(LABELS.get, ALL_EXCHANGERS):
        assert [int(r["round"]) for r in rows if r["exchanger"] == name] == list(range(1, ROUNDS + 1)), name
        assert any(line.startswith(name + " ") for line in out.splitlines()), name
        for record in metrics[name]:
            assert set(HISTORY_KEYS) <= set(record)
            assert len(record["local_accuracy"]) == CLIENTS
            assert len(record["layers_sent"]) == CLIENTS
    config = json.loads((folder / "config.json").read_text())
    assert config["command"] == "compare"
    assert [e["kind"] for e in config["exchangers"]] == ALL_EXCHANGERS
    assert [e["label"] for e in config["exchangers"]] == [LABELS[name] for name in ALL_EXCHANGERS]


def test_compare_upload_bytes_full_fixed_and_fedbn(compare_run):
    _, metrics, _ = compare_run
    head = message_nbytes(frozenset({"params/Dense_2/kernel", "params/Dense_2/bias"}))
    dense = message_nbytes(frozenset(n for n in LAYERS if n.startswith("params/Dense_")))
    assert len([n for n in LAYERS if n.startswith("params/Dense_")]) == 6
    for record in metrics["full"]:
        assert record["client_upload_bytes"] == [MODEL_MESSAGE] * CLIENTS
        assert record["upload_bytes"] == CLIENTS * MODEL_MESSAGE
    for record in metrics["fixed"]:
        assert record["client_upload_bytes"] == [head] * CLIENTS
        assert record["upload_bytes"] == CLIENTS * head
        assert record["layers_sent"] == [2] * CLIENTS
    for record in metrics["exclude-bn"]:
        assert record["client_upload_bytes"] == [dense] * CLIENTS
        assert record["upload_bytes"] == CLIENTS * dense
        assert record["layers_sent"] == [6] * CLIENTS


def test_compare_dynamic_upload_is_consistent_with_layers_sent(compare_run):
    _, metrics, _ = compare_run
    assert len(LAYERS) == 10
    for record in metrics[LABELS["dynamic-percentage"]]:
        assert record["layers_sent"] == [math.ceil(10 * PERCENTAGE)] * CLIENTS
        assert_dynamic_uploads(record)
    for record in metrics[LABELS["dynamic-threshold"]]:
        assert all(0 <= k <= 10 for k in record["layers_sent"])
        assert_dynamic_uploads(record)


def test_dynamic_percentage_one_sends_every_layer_and_its_names(tmp_path):
    folder = tmp_path / "run"
    code, _, _ = run_in_process(
        ["simulate", "--exchangers", "dynamic-percentage", "--exchange-percentage", "1.0", "--out", str(folder), *TINY]
    )
    assert code == 0
    for record in json.loads((folder / "metrics.json").read_text())["dynamic-percentage(1, l2/size)"]:
        assert record["layers_sent"] == [10] * CLIENTS
        # Every layer, with its name in the compact header (a dynamic exchanger's are named).
        assert record["client_upload_bytes"] == [MODEL_MESSAGE] * CLIENTS
        assert record["upload_bytes"] == CLIENTS * MODEL_MESSAGE


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "budget"
    argv = [
        "compare",
        "--exchangers",
        "full,dynamic-budget,dynamic-percentage,sparse-largest-magnitude-change",
        "--budget",
        "0.3,0.7",
        "--measure",
        "rms",
        "--error-feedback",
        "--out",
        str(folder),
        *TINY,
    ]
    code, out, _ = run_in_process(argv)
    assert code == 0
    return folder, json.loads((folder / "metrics.json").read_text()), out


BUDGET_LABELS = [
    "full",
    "dynamic-budget(0.3, ef)",
    "dynamic-budget(0.7, ef)",
    "dynamic-percentage(0.5, rms, ef)",
    "sparse-largest-magnitude-change(0.1, ef)",
]


def test_budget_sweep_runs_one_line_per_value_and_labels_carry_the_parameters(budget_run):
    folder, metrics, out = budget_run
    assert list(metrics) == BUDGET_LABELS  # error feedback reaches the adaptive kinds only
    for label in BUDGET_LABELS:
        assert any(line.startswith(label + " ") for line in out.splitlines()), label
    config = json.loads((folder / "config.json").read_text())
    assert [e["label"] for e in config["exchangers"]] == BUDGET_LABELS
    assert [e["byte_fraction"] for e in config["exchangers"]][1:3] == [0.3, 0.7]
    assert [e["error_feedback"] for e in config["exchangers"]] == [False, True, True, True, True]
    assert {e["measure"] for e in config["exchangers"]} == {"rms"}


def test_budget_uploads_stay_within_the_budget(budget_run):
    _, metrics, _ = budget_run
    for fraction in (0.3, 0.7):
        capacity = math.floor(fraction * MODEL_BYTES)  # bytes of the layers' values a client may send
        for record in metrics[f"dynamic-budget({fraction}, ef)"]:
            assert_dynamic_uploads(record, fits=lambda chosen, c=capacity: sum(LAYERS[n] for n in chosen) <= c)
    # The larger budget sends more over the run.
    low, high = (sum(r["upload_bytes"] for r in metrics[f"dynamic-budget({f}, ef)"]) for f in (0.3, 0.7))
    assert low < high


def test_measure_and_error_feedback_options_reach_simulate(tmp_path):
    folder = tmp_path / "run"
    argv = [
        "simulate",
        "--exchangers",
        "dynamic-threshold",
        "--measure",
        "relative",
        "--error-feedback",
        "--out",
        str(folder),
        *TINY,
    ]
    code, _, _ = run_in_process(argv)
    assert code == 0
    assert list(json.loads((folder / "metrics.json").read_text())) == ["dynamic-threshold(0.0001, relative, ef)"]


def test_sparse_exchangers_send_weights_in_compact_form(tmp_path):
    """Every sparse kind runs; a client's upload is a compact payload of at least
    ceil(total * 0.2) float32 values, the partly sent layers' entries indexed in their
    cheapest encoding (never more than a bitmask of the layer)."""
    folder = tmp_path / "run"
    argv = [
        "compare",
        "--exchangers",
        ",".join(SPARSE_EXCHANGERS),
        "--sparsity-level",
        "0.2",
        "--out",
        str(folder),
        *TINY,
    ]
    code, out, _ = run_in_process(argv)
    assert code == 0
    metrics = json.loads((folder / "metrics.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    assert set(metrics) == {f"{kind}(0.2)" for kind in SPARSE_EXCHANGERS}
    assert {spec["sparsity_level"] for spec in config["exchangers"]} == {0.2}
    total = sum(nbytes // 4 for nbytes in LAYERS.values())  # float32 weights
    kept = math.ceil(total * 0.2)
    # Arrays: "header" (uint8), "values0" (float32), "index" (uint8, absent when every sent
    # layer is whole); each a 128-byte .npy header, its data and its key. The smallest: one
    # layer in a header of at least 2 + 8 bytes (name length, a 1-byte name, encoding, form,
    # group, count, rank, one dimension), kept values, no index. The
    # largest: every layer in the header with its largest counts, every value, and each
    # layer's index no larger than its bitmask (ceil(size / 8) bytes).
    smallest = (128 + 2 + 8 + len("header")) + (128 + 4 * kept + len("values0"))
    header = 2 + sum(
        1 + len(n) + 2 + 1 + varint_size(math.prod(s)) + 1 + sum(map(varint_size, s)) for n, s in SHAPES.items()
    )
    bitmasks = sum(-(-math.prod(shape) // 8) for shape in SHAPES.values())
    largest = (128 + header + len("header")) + (128 + 4 * total + len("values0")) + (128 + bitmasks + len("index"))
    for kind in SPARSE_EXCHANGERS:
        first = metrics[f"{kind}(0.2)"][0]
        # Round 1: the whole model, dense.
        assert first["client_download_bytes"] == [MODEL_MESSAGE] * CLIENTS
        assert first["download_bytes"] == CLIENTS * MODEL_MESSAGE
        for record in metrics[f"{kind}(0.2)"]:
            for upload in record["client_upload_bytes"]:
                assert smallest <= upload <= largest, kind
            assert record["upload_bytes"] == sum(record["client_upload_bytes"]), kind
            assert all(1 <= k <= len(LAYERS) for k in record["layers_sent"]), kind
        assert kind in out


def test_quantize_int8_codes_every_upload_in_one_byte_a_value(tmp_path):
    """--quantize reaches the specs, the labels and the bytes: an int8 upload carries one
    byte a value and one float32 scale a layer; what the server sends stays float32."""
    folder = tmp_path / "run"
    argv = ["compare", "--exchangers", "full,dynamic-percentage", "--quantize", "int8", "--error-feedback"]
    code, out, _ = run_in_process([*argv, "--out", str(folder), *TINY])
    assert code == 0
    metrics = json.loads((folder / "metrics.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    labels = ["full(ef, int8)", "dynamic-percentage(0.5, l2/size, ef, int8)"]
    assert list(metrics) == labels
    assert [e["label"] for e in config["exchangers"]] == labels
    assert [e["quantize"] for e in config["exchangers"]] == ["int8", "int8"]
    assert [e["error_feedback"] for e in config["exchangers"]] == [True, True]  # with quantize, even full
    # By hand: the float32 message with int8 values (a quarter of the bytes) and the
    # "scales" array (10 float32 numbers: 128 + 40 bytes and its key).
    int8_model = MODEL_MESSAGE - MODEL_BYTES + MODEL_BYTES // 4 + (128 + 4 * len(SHAPES) + len("scales"))
    assert message_nbytes(frozenset(SHAPES), int8=True) == int8_model
    for record in metrics[labels[0]]:
        assert math.isfinite(record["global_loss"])
        assert record["client_upload_bytes"] == [int8_model] * CLIENTS
        assert record["client_download_bytes"] == [MODEL_MESSAGE] * CLIENTS
        assert record["layers_sent"] == [len(LAYERS)] * CLIENTS
    for record in metrics[labels[1]]:
        assert record["layers_sent"] == [math.ceil(10 * 0.5)] * CLIENTS
        assert_dynamic_uploads(record, int8=True)
    for label in labels:
        assert any(line.startswith(label + " ") for line in out.splitlines()), label


def test_quantize_refuses_an_unknown_mode(capsys):
    with pytest.raises(SystemExit) as info:
        main(["simulate", "--quantize", "int4", *TINY])
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert_one_error_line(captured.out, captured.err, "--quantize", "int4")


# -- reproducibility ---------------------------------------------------------------------


def test_same_seed_same_metrics_other_seed_other_metrics(simulate_run, tmp_path):
    first = without_wall_seconds(json.loads((simulate_run[0] / "metrics.json").read_text()))
    again, other = tmp_path / "again", tmp_path / "other"
    assert run_in_process(["simulate", "--out", str(again), "--seed", str(SEED), *TINY])[0] == 0
    assert run_in_process(["simulate", "--out", str(other), "--seed", str(SEED + 1), *TINY])[0] == 0
    assert without_wall_seconds(json.loads((again / "metrics.json").read_text())) == first
    assert without_wall_seconds(json.loads((other / "metrics.json").read_text())) != first


# -- entry points ------------------------------------------------------------------------


def test_python_dash_m_simulate(tmp_path):
    folder = tmp_path / "run"
    result = run_subprocess([sys.executable, "-m", "jaxlayerx", "simulate", "--out", str(folder), *TINY], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "full" in result.stdout and str(folder) in result.stdout
    assert set(json.loads((folder / "metrics.json").read_text())) == {"full"}
    assert (folder / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_console_script_simulate(tmp_path):
    script = shutil.which("jaxlayerx")
    assert script is not None, "the jaxlayerx console script is not installed (pip install -e .)"
    folder = tmp_path / "run"
    args = [script, "simulate", "--exchangers", "fixed", "--layers", "params/Dense_2/*", "--out", str(folder), *TINY]
    result = run_subprocess(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "fixed" in result.stdout and str(folder) in result.stdout
    assert set(json.loads((folder / "metrics.json").read_text())) == {"fixed"}


# -- bad options -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--exchange-percentage", "0", "--exchangers", "dynamic-percentage"], ["exchange_percentage"]),
        (["--exchange-percentage", "1.5"], ["exchange_percentage"]),
        (["--norm-threshold", "-1"], ["norm_threshold"]),
        (["--norm-threshold", "0", "--exchangers", "dynamic-threshold"], ["norm_threshold"]),
        (["--clients", "0"], ["clients"]),
        (["--rounds", "0"], ["rounds"]),
        (["--beta", "0"], ["beta"]),
        (["--exchangers", "full,fixed", "--layers", "params/Dense_9/*"], ["params/Dense_9/*"]),
        (["--sparsity-level", "0", "--exchangers", "sparse-largest-magnitude-change"], ["sparsity_level", "(0, 1]"]),
        (["--sparsity-level", "1.5"], ["sparsity_level", "1.5"]),
        (["--budget", "0", "--exchangers", "dynamic-budget"], ["--budget", "(0, 1]"]),
        (["--budget", "0.5,1.5", "--exchangers", "dynamic-budget"], ["--budget", "1.5"]),
        (["--budget", "half", "--exchangers", "dynamic-budget"], ["--budget", "half"]),
        (["--budget", "0.5,0.5", "--exchangers", "dynamic-budget"], ["--budget", "repeats"]),
        (["--budget", ",", "--exchangers", "dynamic-budget"], ["--budget", "empty"]),
        (["--exchangers", "dynamic-budget", "--select-drift-less"], ["dynamic-budget", "select-drift-less"]),
    ],
    ids=[
        "percentage-0",
        "percentage-1.5",
        "threshold-neg",
        "threshold-0",
        "clients-0",
        "rounds-0",
        "beta-0",
        "layers-glob",
        "sparsity-0",
        "sparsity-1.5",
        "budget-0",
        "budget-1.5",
        "budget-word",
        "budget-repeat",
        "budget-empty",
        "budget-less",
    ],
)
def test_bad_option_in_process(args, needles, tmp_path, capsys):
    folder = tmp_path / "run"
    code = main(["simulate", "--out", str(folder), *TINY, *args])
    captured = capsys.readouterr()
    assert code == 2
    assert_one_error_line(captured.out, captured.err, *needles)
    assert not (folder / "metrics.json").exists()


def test_unknown_exchanger_lists_the_valid_ones(tmp_path, capsys):
    code = main(["compare", "--exchangers", "full,fedprox", "--out", str(tmp_path / "run"), *TINY])
    captured = capsys.readouterr()
    assert code == 2
    line = assert_one_error_line(captured.out, captured.err, "fedprox")
    for kind in ALL_EXCHANGERS + SPARSE_EXCHANGERS:
        assert kind in line


@pytest.mark.parametrize(
    "argv, needle",
    [(["simulate", "--rounds", "abc"], "abc"), ([], "command"), (["simulate", "--clients"], "--clients")],
    ids=["rounds-abc", "no-subcommand", "missing-value"],
)
def test_argparse_errors_exit_2_with_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert_one_error_line(captured.out, captured.err, needle)


@pytest.mark.parametrize(
    "command, needle",
    [
        (["-m", "jaxlayerx", "simulate", "--exchangers", "bogus"], "full, fixed, exclude-bn"),
        (["-m", "jaxlayerx", "simulate", "--clients", "5000"], "5000"),
        (["-m", "jaxlayerx", "compare", "--rounds", "abc"], "abc"),
    ],
    ids=["unknown-exchanger", "clients-5000", "rounds-abc"],
)
def test_bad_option_subprocess(command, needle, tmp_path):
    result = run_subprocess([sys.executable, *command, "--out", str(tmp_path / "run"), "--no-progress"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert_one_error_line(result.stdout, result.stderr, needle)
    assert not (tmp_path / "run").exists()


# Found while writing these tests: each of these ends in a Python traceback (exit status 1)
# instead of one error line and exit status 2.


def test_seed_too_large_for_jax_is_an_option_error(tmp_path, capsys):
    # numpy accepts the seed for the split, then jax.random.key overflows (int64).
    code = main(["simulate", "--seed", str(2**63), "--out", str(tmp_path / "run"), *TINY])
    captured = capsys.readouterr()
    assert code == 2
    assert_one_error_line(captured.out, captured.err, "seed")


@pytest.mark.parametrize("epochs", ["inf", "1e30"])
def test_non_finite_or_huge_local_epochs_is_an_option_error(epochs, tmp_path, capsys):
    # `not local_epochs > 0` lets inf through; math.ceil(inf) raises OverflowError.
    code = main(["simulate", "--local-epochs", epochs, "--out", str(tmp_path / "run"), *TINY])
    captured = capsys.readouterr()
    assert code == 2
    assert_one_error_line(captured.out, captured.err, "local-epochs")


def test_out_path_that_is_a_file_is_an_error_not_a_traceback(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("not a folder")
    code = main(["simulate", "--out", str(target), *TINY])
    captured = capsys.readouterr()
    assert code == 2
    assert_one_error_line(captured.out, captured.err, str(target))


# -- help and progress -------------------------------------------------------------------


@pytest.mark.parametrize("command", ["simulate", "compare"])
def test_help_lists_every_option(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # argparse wraps at hyphens: keep "exclude-bn" whole
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: jaxlayerx {command}")
    for option in OPTIONS:
        assert option in out, option
    for kind in ALL_EXCHANGERS:
        assert kind in out


def test_top_level_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: jaxlayerx")
    assert "simulate" in out and "compare" in out


def test_progress_bar_shows_accuracy_and_megabytes(tmp_path, capsys):
    argv = ["simulate", "--out", str(tmp_path / "run"), *[a for a in TINY if a != "--no-progress"]]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "acc=" in err and "MB=" in err
    assert f"{ROUNDS}/{ROUNDS}" in err
    assert "full" in err


def test_no_progress_silences_stderr(simulate_run):
    assert simulate_run[3] == ""
