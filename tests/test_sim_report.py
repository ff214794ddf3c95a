"""Tests for writing a simulation run: jaxlayerx.simulation.report."""

from __future__ import annotations

import csv
import json
import re
import sys

import numpy as np
import pytest

from jaxlayerx.simulation.report import (
    CSV_COLUMNS,
    cumulative_total_mb,
    cumulative_upload_mb,
    mean_history,
    pareto_frontier,
    summary_table,
    write_run,
)


def record(round_, acc, loss, local, upload, download, layers, wall):
    return {
        "round": round_,
        "global_accuracy": acc,
        "global_loss": loss,
        "local_accuracy_mean": float(np.mean(local)),
        "local_accuracy": local,
        "upload_bytes": upload,
        "download_bytes": download,
        "layers_sent": layers,
        "wall_seconds": wall,
    }


def sample_histories():
    """Two exchangers with different round counts; the numbers are chosen to check by hand."""
    return {
        "full": [
            record(1, 0.5, 1.9, [0.4, 0.6], 1_500_000, 1_000_000, [8, 8], 0.5),
            record(2, 0.75, 1.2, [0.7, 0.8], 2_000_000, 1_000_000, [8, 8], 0.25),
            record(3, 0.953, 0.4, [0.9, 0.95], 500_000, 1_000_000, [8, 8], 0.25),
        ],
        "dynamic-threshold": [
            record(1, 0.25, 2.1, [0.3, 0.2], 250_000, 400_000, [3, 5], 1.0),
            record(2, 0.8766, 0.9, [0.5, 0.7], 125_000, 400_000, [1, 2], 2.0),
        ],
    }


# hand-computed: 1.5, 1.5 + 2.0, 3.5 + 0.5 ; 0.25, 0.25 + 0.125
EXPECTED_CUMULATIVE = {"full": [1.5, 3.5, 4.0], "dynamic-threshold": [0.25, 0.375]}
CONFIG = {"num_clients": 2, "rounds": 3, "beta": 0.5, "seed": 0, "exchangers": ["full", "dynamic-threshold"]}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs") / "nested" / "run-1"
    histories = sample_histories()
    return folder, histories, write_run(folder, CONFIG, histories)


def test_cumulative_upload_mb():
    for name, history in sample_histories().items():
        assert cumulative_upload_mb(history) == pytest.approx(EXPECTED_CUMULATIVE[name])
    assert cumulative_upload_mb([]) == []


def test_cumulative_total_mb():
    # full: (1.5 + 1.0), + (2.0 + 1.0), + (0.5 + 1.0); dynamic: (0.25 + 0.4), + (0.125 + 0.4)
    assert cumulative_total_mb(sample_histories()["full"]) == pytest.approx([2.5, 5.5, 7.0])
    assert cumulative_total_mb(sample_histories()["dynamic-threshold"]) == pytest.approx([0.65, 1.175])


def test_write_run_writes_five_files(run):
    folder, _, paths = run
    assert set(paths) == {"config", "metrics_json", "metrics_csv", "plot", "plot_total"}
    assert paths["config"] == folder / "config.json"
    assert paths["metrics_json"] == folder / "metrics.json"
    assert paths["metrics_csv"] == folder / "metrics.csv"
    assert paths["plot"] == folder / "plot.png"
    assert paths["plot_total"] == folder / "plot_total.png"
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "metrics.csv",
        "metrics.json",
        "plot.png",
        "plot_total.png",
    ]


def test_config_json(run):
    _, _, paths = run
    text = paths["config"].read_text()
    assert json.loads(text) == CONFIG
    assert text == json.dumps(CONFIG, indent=2, sort_keys=True) + "\n"


def test_metrics_json_round_trip(run):
    _, histories, paths = run
    loaded = json.loads(paths["metrics_json"].read_text())
    assert loaded == histories
    assert list(loaded) == list(histories)


def test_metrics_csv(run):
    _, histories, paths = run
    with paths["metrics_csv"].open(newline="") as file:
        rows = list(csv.reader(file))
    header, body = rows[0], rows[1:]
    assert (
        tuple(header)
        == CSV_COLUMNS
        == (
            "exchanger",
            "round",
            "global_accuracy",
            "global_loss",
            "local_accuracy_mean",
            "upload_bytes",
            "download_bytes",
            "cumulative_upload_mb",
            "layers_sent_mean",
            "wall_seconds",
        )
    )
    assert len(body) == sum(len(h) for h in histories.values()) == 5
    by_name: dict[str, list[dict]] = {}
    for row in body:
        by_name.setdefault(row[0], []).append(dict(zip(header, row)))
    assert list(by_name) == list(histories)
    for name, history in histories.items():
        rows_ = by_name[name]
        assert [float(r["cumulative_upload_mb"]) for r in rows_] == pytest.approx(EXPECTED_CUMULATIVE[name])
        for r, rec in zip(rows_, history):
            assert int(r["round"]) == rec["round"]
            assert float(r["global_accuracy"]) == rec["global_accuracy"]
            assert float(r["global_loss"]) == rec["global_loss"]
            assert float(r["local_accuracy_mean"]) == pytest.approx(rec["local_accuracy_mean"])
            assert int(r["upload_bytes"]) == rec["upload_bytes"]
            assert int(r["download_bytes"]) == rec["download_bytes"]
            assert float(r["layers_sent_mean"]) == pytest.approx(sum(rec["layers_sent"]) / len(rec["layers_sent"]))
            assert float(r["wall_seconds"]) == rec["wall_seconds"]
    assert [float(r["layers_sent_mean"]) for r in by_name["dynamic-threshold"]] == [4.0, 1.5]


@pytest.mark.parametrize("which", ["plot", "plot_total"])
def test_plot_png(run, which):
    _, _, paths = run
    data = paths[which].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 5_000
    import matplotlib.image

    image = matplotlib.image.imread(paths[which])
    assert image.ndim >= 2 and image.shape[0] > 100 and image.shape[1] > 2 * 100
    assert image.shape[1] > image.shape[0], "two panels side by side"
    assert np.ptp(np.asarray(image, dtype=np.float64)) > 0, "not a blank image"


def test_write_run_existing_folder_and_numpy_values(tmp_path):
    histories = {"full": [dict(sample_histories()["full"][0])]}
    rec = histories["full"][0]
    rec["global_accuracy"] = np.float32(0.5)
    rec["upload_bytes"] = np.int64(1_500_000)
    rec["local_accuracy"] = np.array([0.4, 0.6])
    config = {"num_clients": np.int64(2), "out": tmp_path}
    write_run(tmp_path, config, histories)
    paths = write_run(tmp_path, config, histories)  # the folder exists already: fine
    loaded = json.loads(paths["metrics_json"].read_text())["full"][0]
    assert loaded["global_accuracy"] == 0.5 and loaded["upload_bytes"] == 1_500_000
    assert loaded["local_accuracy"] == [0.4, 0.6]
    assert json.loads(paths["config"].read_text()) == {"num_clients": 2, "out": str(tmp_path)}


def test_write_run_without_rounds_in_config(tmp_path):
    paths = write_run(tmp_path / "r", {}, sample_histories())
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG"


def test_write_run_missing_key(tmp_path):
    histories = sample_histories()
    del histories["dynamic-threshold"][1]["layers_sent"]
    with pytest.raises(ValueError, match=r"history of 'dynamic-threshold', record 1: missing keys \['layers_sent'\]"):
        write_run(tmp_path / "bad", CONFIG, histories)
    assert not (tmp_path / "bad").exists(), "nothing is written for a bad history"


def test_write_run_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'jaxlayerx\[demo\]'"):
        write_run(tmp_path, CONFIG, sample_histories())


def test_write_run_leaves_the_pyplot_backend_alone(tmp_path):
    import matplotlib

    before = matplotlib.get_backend()
    write_run(tmp_path, CONFIG, sample_histories())
    assert matplotlib.get_backend() == before


def test_summary_table():
    table = summary_table(sample_histories(), {"full": "a note"})
    lines = table.splitlines()
    assert len(lines) == 2 + 2  # header, rule, one row per exchanger
    assert lines[0].split() == [
        "exchanger",
        "global_acc",
        "local_acc",
        "up_MB",
        "down_MB",
        "layers_sent",
        "wall_s",
        "frontier",
        "note",
    ]
    # Sorted by MB uploaded: dynamic-threshold (0.375) before full (4.0).
    assert [line.split()[0] for line in lines[2:]] == ["dynamic-threshold", "full"]
    full, dynamic = lines[3], lines[2]
    # full: final acc 0.953, local mean 0.925, up 4.00 MB, down 3.00 MB, 8.0 layers, 1.0 s;
    # on the global frontier (0.953 beats 0.877 for more bytes), not the local one
    # (0.925 > 0.600 also: both on it); its note.
    assert full.split()[1:] == ["0.953", "0.925", "4.00", "3.00", "8.0", "1.0", "global,local", "a", "note"]
    # dynamic: 0.8766 -> 0.877 (3 decimals), local 0.600, up 0.375 -> 0.38 (2 dp), down 0.80,
    # 1.5 layers, 3.0 s; the cheapest, so on both frontiers.
    assert dynamic.split()[1:] == ["0.877", "0.600", "0.38", "0.80", "1.5", "3.0", "global,local"]
    rule_starts = [match.start() for match in re.finditer(r"-+", lines[1])]
    assert [lines[0].index(word) for word in lines[0].split()] == rule_starts, "header and rule line up"
    columns = [line.index(line.split()[1]) + len(line.split()[1]) for line in (lines[0], full, dynamic)]
    assert len(set(columns)) == 1, "fixed width: the second column ends at the same place"


def test_summary_table_empty_history():
    table = summary_table({"full": [], "fixed": sample_histories()["full"]})
    assert "full" in table and "fixed" in table and "0.953" in table
    assert table.splitlines()[-1].split()[0] == "full", "an exchanger without rounds sorts last"


def test_pareto_frontier_on_hand_made_points():
    # (cost, value): a=(1, 0.5) b=(2, 0.7) c=(2, 0.6) beaten by b; d=(3, 0.7) beaten by b (same
    # value, more cost); e=(4, 0.9); f=(0.5, 0.4) cheapest; g=(5, nan) never.
    points = [(1, 0.5), (2, 0.7), (2, 0.6), (3, 0.7), (4, 0.9), (0.5, 0.4), (5, float("nan"))]
    assert pareto_frontier(points) == [True, True, False, False, True, True, False]
    assert pareto_frontier([]) == []
    assert pareto_frontier([(1, 0.5), (1, 0.5)]) == [True, True]  # ties beat neither


def repeated_histories():
    """Two seeds of two rounds each; means by hand."""
    first = [
        record(1, 0.4, 2.0, [0.5, 0.7], 100, 300, [2, 2], 1.0),
        record(2, 0.6, 1.0, [0.8, 0.8], 200, 300, [1, 3], 1.0),
    ]
    second = [
        record(1, 0.6, 1.0, [0.3, 0.5], 300, 300, [2, 2], 3.0),
        record(2, 0.9, 0.5, [0.9, 0.9], 100, 300, [2, 2], 2.0),
    ]
    return {"dynamic": [first, second], "full": sample_histories()["full"]}


def test_mean_history_over_seeds():
    merged = mean_history(repeated_histories()["dynamic"])
    assert [r["global_accuracy"] for r in merged] == pytest.approx([0.5, 0.75])
    assert [r["local_accuracy_mean"] for r in merged] == pytest.approx([0.5, 0.85])  # (0.6 + 0.4) / 2, (0.8 + 0.9) / 2
    assert [r["upload_bytes"] for r in merged] == pytest.approx([200, 150])
    assert merged[1]["by_seed"]["global_accuracy"] == [0.6, 0.9]
    single = sample_histories()["full"]
    assert mean_history([single]) == single


def test_repeats_in_the_table_and_the_files(tmp_path):
    runs = repeated_histories()
    table = summary_table(runs)
    row = next(line for line in table.splitlines() if line.startswith("dynamic "))
    # final global 0.6, 0.9 -> mean 0.75, sample std 0.212; local 0.8, 0.9 -> 0.85 ± 0.071;
    # up (300 + 400) / 2 = 350 bytes -> 0.00 MB
    assert row.split()[1:4] == ["0.750±0.212", "0.850±0.071", "0.00"]
    paths = write_run(tmp_path, {"seeds": [7, 8]}, runs)
    loaded = json.loads(paths["metrics_json"].read_text())
    assert [r["global_accuracy"] for r in loaded["dynamic"]] == pytest.approx([0.5, 0.75])
    with paths["metrics_csv"].open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(r["exchanger"], r["seed"], r["round"]) for r in rows if r["exchanger"] == "dynamic"] == [
        ("dynamic", "7", "1"),
        ("dynamic", "7", "2"),
        ("dynamic", "8", "1"),
        ("dynamic", "8", "2"),
    ]
    assert {r["seed"] for r in rows if r["exchanger"] == "full"} == {"7"}


def test_seeds_with_different_round_counts_are_refused(tmp_path):
    runs = {"dynamic": [repeated_histories()["dynamic"][0], repeated_histories()["dynamic"][1][:1]]}
    with pytest.raises(ValueError, match="different numbers of rounds"):
        write_run(tmp_path / "bad", {}, runs)
