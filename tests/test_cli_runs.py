"""The ``jaxlayerx`` command line end to end, on tiny runs: ``compare`` over every exchanger,
budgets, sparse and quantized uploads, reproducibility, and the real entry points
(``python -m jaxlayerx`` and the ``jaxlayerx`` console script) as subprocesses. The slow
tier; the fast checks of the command are in ``tests/test_cli.py``.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import sys

import pytest
from cli_support import (  # the command-line tests' shared constants and helpers
    ALL_EXCHANGERS,
    CLIENTS,
    LABELS,
    LAYERS,
    MODEL_BYTES,
    MODEL_MESSAGE,
    PERCENTAGE,
    ROUNDS,
    SEED,
    SHAPES,
    SPARSE_EXCHANGERS,
    TINY,
    assert_dynamic_uploads,
    assert_one_error_line,
    message_nbytes,
    run_in_process,
    run_subprocess,
    varint_size,
    without_wall_seconds,
)

from jaxlayerx.simulation.report import HISTORY_KEYS


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


# -- reproducibility ---------------------------------------------------------------------


def test_same_seed_same_metrics_other_seed_other_metrics(simulate_run, tmp_path):
    first = without_wall_seconds(json.loads((simulate_run[0] / "metrics.json").read_text()))
    again, other = tmp_path / "again", tmp_path / "other"
    full = ["--exchangers", "full"]  # as the simulate_run fixture
    assert run_in_process(["simulate", *full, "--out", str(again), "--seed", str(SEED), *TINY])[0] == 0
    assert run_in_process(["simulate", *full, "--out", str(other), "--seed", str(SEED + 1), *TINY])[0] == 0
    assert without_wall_seconds(json.loads((again / "metrics.json").read_text())) == first
    assert without_wall_seconds(json.loads((other / "metrics.json").read_text())) != first


# -- entry points ------------------------------------------------------------------------


def test_python_dash_m_simulate(tmp_path):
    folder = tmp_path / "run"
    result = run_subprocess([sys.executable, "-m", "jaxlayerx", "simulate", "--out", str(folder), *TINY], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "full" in result.stdout and str(folder) in result.stdout
    # The default: the recommended rule beside full exchange, and the line that compares them.
    assert set(json.loads((folder / "metrics.json").read_text())) == {"full", "dynamic-budget(0.5, ef)"}
    assert "takeaway: " in result.stdout
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
