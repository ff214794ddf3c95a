"""Smoke test: the benchmark entry point runs end to end on tiny sizes."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_benchmark_quick_runs(tmp_path):
    out = tmp_path / "bench.json"
    completed = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(out.read_text())
    rows = report["rows"]
    cases = [row["case"] for row in rows]
    assert report["baseline"].startswith(("torch", "numpy"))
    assert f"baseline: the reference's algorithm on {report['baseline']}" in completed.stdout
    for case in (
        "threshold selection",
        "percentage selection",
        "FedAvgDynamicLayer",
        "jitted norms",
        "masked_fedavg",
        "vs loop",
        "vs step loop",
        "sparse COO push",
        "numpy partition",
        "jitted radix select",
        "sparse masks",
        "FedAvgSparseCooTensor",
        "(torch shapes): threshold selection",
        "(torch shapes): percentage selection",
    ):
        assert any(case in name for name in cases), case
    for row in rows:  # the per-layer JAX loop is an extra column of the selection rows only
        if "selection (push)" in row["case"]:
            assert row["jax_loop_ms"] > 0
        elif "norms" not in row["case"]:
            assert row["jax_loop_ms"] is None
    for row in rows:
        assert row["ms"] > 0 and row["floor_ms"] > 0 and row["baseline_ms"] > 0
        assert row["x_floor"] == pytest.approx(row["ms"] / row["floor_ms"])
        assert row["speedup_vs_baseline"] == pytest.approx(row["baseline_ms"] / row["ms"])
    assert "device: cpu" in completed.stdout or "device: gpu" in completed.stdout


def test_sweep_benchmark_quick_runs(tmp_path):
    """benchmarks/sweep.py times its four cases cold and warm, and the ratios it prints are
    the ones its JSON holds."""
    out = tmp_path / "sweep.json"
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.sweep", "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr
    after = json.loads(out.read_text())["after"]
    assert set(after) == {"default", "repeat 3", "budget", "budget sweep"}
    for case in after.values():
        assert set(case) == {"cold", "warm"} and all(seconds > 0 for seconds in case.values())
    ratio = after["repeat 3"]["cold"] / after["default"]["cold"]
    assert f"| repeat 3 / default | {ratio:.2f}x |" in completed.stdout


@pytest.mark.deploy
def test_deployment_benchmark_runs_both_routes_and_stops_every_process(tmp_path):
    """benchmarks/deployment.py (one round): the legacy route and the Message API both
    finish, every process it started is gone (it raises otherwise), and its table's ratios
    are the JSON's."""
    pytest.importorskip("flwr")
    out = tmp_path / "deployment.json"
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.deployment", "--rounds", "1", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(out.read_text())
    legacy = report["legacy"]["total"]
    for route in ("message api", "message api, nodes evaluate"):
        times = report[route]
        assert 0 < times["run"] <= times["total"]
        assert f"| {route} | {times['total']:.1f} | {times['run']:.1f} | {times['total'] / legacy:.2f}x |" in (
            completed.stdout
        )
    phases = report["clientapp phases"]
    assert set(phases) == {"empty cache", "cache filled"}
    assert [name for name, _ in phases["empty cache"]] == [name for name, _ in phases["cache filled"]]
