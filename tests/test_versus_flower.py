"""benchmarks/versus_flower.py runs the federation of ``jaxlayerx simulate`` on Flower's
simulation engine: on a small one, Flower's run must reach the accuracy jaxlayerx's own
simulation reaches (the same arithmetic, orchestrated by Flower). Needs the ``simulation``
extra (Ray); skipped without it."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("ray")
pytest.importorskip("flwr.simulation")

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_flower_run_matches_the_simulation():
    from jaxlayerx.simulation import ExchangerSpec, Simulation, SimulationConfig, make_client_data
    from jaxlayerx.simulation.datasets import load_dataset
    from jaxlayerx.simulation.models import make_model

    clients, rounds = 2, 2
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "benchmarks.versus_flower", "--flower-child"]
    command += ["--clients", str(clients), "--rounds", str(rounds)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert result["failures"] == [] and len(result["round_s"]) == rounds

    dataset = load_dataset("digits")
    data = make_client_data(dataset.x, dataset.y, clients, beta=0.5, seed=0, test_fraction=0.2)
    config = SimulationConfig(rounds=rounds)
    history = Simulation(ExchangerSpec("full"), config, data, make_model("mlp", 10)).run()
    # The same training; only the server's float summation order differs.
    assert abs(result["accuracy"] - history[-1]["global_accuracy"]) <= 2 / len(data.y_global_test)
    assert result["accuracy"] > 0.5
