"""The ``jaxlayerx`` command line, in process: one tiny ``simulate`` run, every bad option
(one error line, exit status 2, no run folder), the help, the progress bar. The command's
other runs (``compare``, every exchanger kind, the entry points as subprocesses) are in
``tests/test_cli_runs.py`` (the slow tier).
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from cli_support import (  # the command-line tests' shared constants and helpers
    ALL_EXCHANGERS,
    BATCH,
    CLIENTS,
    LAYERS,
    LOCAL_STEPS,
    MODEL_BYTES,
    MODEL_MESSAGE,
    OPTIONS,
    ROUNDS,
    SEED,
    SHAPES,
    SPARSE_EXCHANGERS,
    TINY,
    assert_one_error_line,
    varint_size,
)

from jaxlayerx.simulation.cli import main
from jaxlayerx.simulation.report import CSV_COLUMNS, HISTORY_KEYS

# -- end to end --------------------------------------------------------------------------


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


def test_the_defaults_show_the_recommended_rules_beside_full_and_fl4healths():
    """simulate: the recommended rule beside full; compare: full, fl4health's two dynamic
    defaults and the three recommended rules, each label a spec that runs (parsed here;
    the runs themselves are in the slow tier)."""
    from jaxlayerx.simulation.cli import build_parser, specs_from_args

    parser = build_parser()
    simulate = [spec.label for spec in specs_from_args(parser.parse_args(["simulate"]))]
    assert simulate == ["full", "dynamic-budget(0.5, ef)"]
    compare = [spec.label for spec in specs_from_args(parser.parse_args(["compare"]))]
    assert compare == [
        "full",
        "dynamic-threshold(0.0001, l2/size)",
        "dynamic-percentage(0.5, l2/size)",
        "dynamic-budget(0.5, ef)",
        "dynamic-percentage(0.5, rms, ef)",
        "sparse-largest-magnitude-change(0.05, ef, int8)",
    ]


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


def test_quantize_refuses_an_unknown_mode(capsys):
    with pytest.raises(SystemExit) as info:
        main(["simulate", "--quantize", "int4", *TINY])
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert_one_error_line(captured.out, captured.err, "--quantize", "int4")


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


@pytest.mark.slow  # a three-exchanger compare
def test_labels_given_back_to_exchangers_run_under_those_labels(tmp_path, capsys):
    folder = tmp_path / "run"
    specs = "full,dynamic-budget(0.25, ef),dynamic-budget(0.5, ef)"
    code = main(["compare", "--exchangers", specs, "--out", str(folder), *TINY])
    capsys.readouterr()
    assert code == 0
    metrics = json.loads((folder / "metrics.json").read_text())
    assert list(metrics) == ["full", "dynamic-budget(0.25, ef)", "dynamic-budget(0.5, ef)"]


@pytest.mark.parametrize(
    "specs, needles",
    [
        ("full,dynamc-budget(0.5)", ["dynamc-budget", "closest kind: dynamic-budget", "KIND(NUMBER, WORD, ...)"]),
        ("dynamic-budget(0.5, efx)", ["unknown word 'efx'", "KIND(NUMBER, WORD, ...)"]),
        ("full,dynamic-budget(0.5", ["unbalanced parentheses"]),
        ("dynamic-budget(0.5, ef),dynamic-budget(0.50, ef)", ["repeats dynamic-budget(0.5, ef)"]),
    ],
    ids=["unknown-kind", "unknown-word", "unbalanced", "repeated"],
)
def test_malformed_exchanger_specs_exit_2_with_one_line(specs, needles, tmp_path, capsys):
    folder = tmp_path / "run"
    code = main(["compare", "--exchangers", specs, "--out", str(folder), *TINY])
    captured = capsys.readouterr()
    assert code == 2
    assert_one_error_line(captured.out, captured.err, *needles)
    assert not (folder / "metrics.json").exists()


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
