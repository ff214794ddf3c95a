"""Quality bars of the simulation: outcomes of seeded runs, pinned loosely (never timings).

The figures the docs report (docs/simulation.md, docs/rules.md) come from the same runs
through the command line; these tests re-run them through the Python API.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from jaxlayerx.simulation import ExchangerSpec, SimulationConfig, load_digits_data, make_client_data, simulate
from jaxlayerx.simulation.datasets import load_digits, load_mnist1d
from jaxlayerx.simulation.models import CNN, MLP

ROOT = pathlib.Path(__file__).resolve().parent.parent


def uploaded(history):
    return sum(record["upload_bytes"] for record in history)


def final(history, key="global_accuracy"):
    return history[-1][key]


# -- the default scenario: digits, 8 clients, Dirichlet 0.5, 20 rounds --------------------


@pytest.fixture(scope="module")
def runs():
    x, y = load_digits_data()
    data = make_client_data(x, y, num_clients=8, beta=0.5, seed=0)
    config = SimulationConfig()
    specs = {
        "full": ExchangerSpec("full"),
        "percentage": ExchangerSpec("dynamic-percentage", exchange_percentage=0.5),
        "percentage-absolute": ExchangerSpec("dynamic-percentage", exchange_percentage=0.5, normalize=False),
        "percentage-absolute-0.3": ExchangerSpec("dynamic-percentage", exchange_percentage=0.3, normalize=False),
        "sparse-increase": ExchangerSpec("sparse-largest-increase-in-magnitude", sparsity_level=0.1),
        "sparse-change": ExchangerSpec("sparse-largest-magnitude-change", sparsity_level=0.1),
        "percentage-rms-ef": ExchangerSpec(
            "dynamic-percentage", exchange_percentage=0.5, measure="rms", error_feedback=True
        ),
        "budget-ef": ExchangerSpec("dynamic-budget", byte_fraction=0.5, error_feedback=True),
    }
    histories = {name: simulate(spec, config, data) for name, spec in specs.items()}
    participants = SimulationConfig(average_over="participants")
    sparse = ExchangerSpec("sparse-largest-magnitude-change", sparsity_level=0.05, error_feedback=True)
    histories["sparse-0.05-ef-participants"] = simulate(sparse, participants, data)
    return histories


def test_full_exchange_reaches_93_percent_global_accuracy(runs):
    assert final(runs["full"]) >= 0.93


def test_absolute_drift_percentage_stays_within_3_points_of_full(runs):
    full = final(runs["full"])
    for name in ("percentage-absolute", "percentage-absolute-0.3"):
        assert abs(final(runs[name]) - full) <= 0.03, name
    # At 0.5 the top half by absolute drift holds all three kernels (98% of the bytes);
    # at 0.3 one kernel stays home and the upload drops clearly.
    assert uploaded(runs["percentage-absolute"]) < uploaded(runs["full"])
    assert uploaded(runs["percentage-absolute-0.3"]) <= 0.85 * uploaded(runs["full"])


def test_normalized_percentage_sends_only_small_layers(runs):
    # normalize=True divides by the layer size, so biases and BatchNorm layers win: the
    # kernels never leave the clients, the upload is tiny and the global model stays poor.
    assert uploaded(runs["percentage"]) <= 0.1 * uploaded(runs["full"])
    assert final(runs["percentage"]) < 0.5


def test_sparse_top_tenth_of_weights_keeps_a_good_global_model_for_half_the_upload(runs):
    # COO costs 4 value bytes + 8 per index dimension per weight: 20 bytes for a kernel's
    # weight, so 10% of the weights take about half the dense upload.
    full = final(runs["full"])
    assert abs(final(runs["sparse-increase"]) - full) <= 0.03
    assert final(runs["sparse-change"]) >= 0.9
    for name in ("sparse-increase", "sparse-change"):
        assert uploaded(runs[name]) <= 0.55 * uploaded(runs["full"]), name


def test_bar_1_a_partial_exchanger_within_a_point_of_full_for_half_its_upload(runs):
    # Measured 2026-11-30: percentage on rms drift with error feedback 0.964 (= full) for 39%
    # of the upload; the budget at 0.5 with error feedback 0.961 for 32%.
    full = final(runs["full"])
    for name in ("percentage-rms-ef", "budget-ef"):
        assert final(runs[name]) >= full - 0.01, name
        assert uploaded(runs[name]) <= 0.5 * uploaded(runs["full"]), name


def test_bar_2_sparse_with_error_feedback_at_sparsity_five_percent_within_a_point_of_full(runs):
    # Measured 2026-11-30: 0.958 against 0.964, averaged over all the round's clients
    # (unsent counts as no change); averaged over the senders only it reached 0.886.
    assert final(runs["sparse-0.05-ef-participants"]) >= final(runs["full"]) - 0.01


# -- feature shift: FedBN against FedAvg, three seeds ------------------------------------


def shift_runs(dataset, module):
    local = {"full": [], "exclude-bn": []}
    for seed in (0, 1, 2):
        data = make_client_data(
            dataset.x, dataset.y, 8, beta=None, seed=seed, x_test=dataset.x_test, y_test=dataset.y_test, shift=True
        )
        for kind in local:
            history = simulate(ExchangerSpec(kind), SimulationConfig(seed=seed), data, module)
            local[kind].append(final(history, "local_accuracy_mean"))
    return {kind: float(np.mean(values)) for kind, values in local.items()}


@pytest.mark.parametrize("dataset", ["digits", "mnist1d"])
def test_bar_3_fedbn_beats_fedavg_on_local_accuracy_under_feature_shift(dataset):
    # Measured 2026-11-30 (mean local accuracy over seeds 0-2): digits FedBN 0.947, FedAvg
    # 0.708; mnist1d FedBN 0.636, FedAvg 0.285.
    if dataset == "digits":
        local = shift_runs(load_digits(), MLP(num_classes=10))
    else:
        local = shift_runs(load_mnist1d(), CNN(num_classes=10))
    assert local["exclude-bn"] >= local["full"] + 0.02, local


# -- mnist1d with the CNN -----------------------------------------------------------------


def test_bar_4_mnist1d_cnn_full_exchange_reaches_80_percent():
    # The defaults of `jaxlayerx simulate --data mnist1d`: 8 clients, Dirichlet 0.5, 20
    # rounds of 20 steps of 32. Measured 2026-11-30: 0.857.
    dataset = load_mnist1d()
    data = make_client_data(dataset.x, dataset.y, 8, beta=0.5, seed=0, x_test=dataset.x_test, y_test=dataset.y_test)
    assert final(simulate(ExchangerSpec("full"), SimulationConfig(), data, CNN(num_classes=10))) >= 0.80


# -- scale: 1000 clients, 50 a round -------------------------------------------------------

SCALE_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    from jaxlayerx.simulation.cli import main
    code = main(["simulate", "--data", "mnist1d", "--clients", sys.argv[1], "--clients-per-round", "50",
                 "--rounds", "5", "--beta", "iid", "--exchangers", "full", "--out", sys.argv[2], "--no-progress"])
    print(json.dumps({"code": code, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    """
)


def scale_run(clients, folder):
    completed = subprocess.run(
        [sys.executable, "-c", SCALE_SCRIPT, str(clients), str(folder)],
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["code"] == 0
    return result["peak_mb"], json.loads((folder / "metrics.json").read_text())["full"]


def test_bar_5_a_thousand_clients_fifty_a_round_and_memory_does_not_follow_n(tmp_path):
    # Measured with `python -m benchmarks.scale`; docs/simulation.md has the table.
    small_peak, _ = scale_run(250, tmp_path / "small")
    peak, history = scale_run(1000, tmp_path / "large")
    assert [len(record["clients"]) for record in history] == [50] * 5
    assert all(len(set(record["clients"])) == 50 for record in history)
    # Four times the clients: the stored models and data grow (about 50 kB a client), the
    # round does not. Far from proportional growth.
    assert peak <= 1.5 * small_peak, (small_peak, peak)
