"""The examples run as their READMEs say: examples/own_loop.py, a federated loop of your own."""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
from flax import nnx

import jaxlayerx

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_own_loop_trains_and_sends_half_the_layers_with_error_feedback(capsys):
    own_loop = load("own_loop")
    history = own_loop.main(rounds=3, clients=3, steps=5)
    assert [record["round"] for record in history] == [1, 2, 3]
    # The model: hidden 64x64 kernel + bias, BatchNorm scale, bias, mean, var (64 each), head
    # 64x10 kernel + bias, float32; 8 layers.
    model_bytes = 4 * (64 * 64 + 64 + 4 * 64 + 64 * 10 + 10)
    model = own_loop.Net(nnx.Rngs(0))
    assert sum(int(np.asarray(v).nbytes) for v in jaxlayerx.flatten(model).values()) == model_bytes
    for record in history:
        # ceil(8 * 0.5) = 4 layers a client, never all 8: less than the whole model each round.
        assert record["upload_bytes"] < 3 * model_bytes
        assert 1 <= record["layers_averaged"] <= 8
        assert 0.0 <= record["global_accuracy"] <= 1.0
    assert history[-1]["global_accuracy"] > history[0]["global_accuracy"]
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in printed] == ["round  1", "round  2", "round  3"]


def test_regression_fits_below_the_mean_predictor_and_sends_less_than_the_model():
    regression = load("regression")
    records, initial, final = regression.main(rounds=4, verbose=False)
    data, _ = regression.synthetic_data(8, 100, 0)
    baseline = float(np.var(data["y"]))  # predicting the mean
    losses = [record["global_loss"] for record in records]
    assert losses[-1] < 0.6 * baseline and losses[-1] < losses[0]
    assert "global_accuracy" not in records[-1] and records[-1]["global_mae"] > 0
    # The model's bytes, by hand: Dense 4->16, 16->16, 16->1 in float32.
    model_bytes = 4 * ((4 * 16 + 16) + (16 * 16 + 16) + (16 + 1))
    for record in records:  # the budget: at most 3/4 of the bytes of values a client, plus framing
        assert all(sent < model_bytes for sent in record["client_upload_bytes"])
    assert sorted(final) == sorted(initial) and len(final) == 6
    for name in final:  # every layer fits the budget, so every layer was sent and moved
        assert not np.array_equal(final[name], initial[name]), name


def test_fedprox_example_runs_both_methods_with_kept_optimizer_states():
    fedprox = load("fedprox")
    runs = fedprox.main(rounds=3, verbose=False)
    assert list(runs) == ["fedprox(0.01)", "fedavg"]
    for records in runs.values():
        assert [r["round"] for r in records] == [1, 2, 3]
        assert records[-1]["global_accuracy"] > records[0]["global_accuracy"]
        assert len(records[-1]["train_loss"]) == 8
    # the proximal term changes the training: the two runs' losses differ
    assert runs["fedprox(0.01)"][-1]["train_loss"] != runs["fedavg"][-1]["train_loss"]


def test_char_lm_learns_next_characters_on_token_data():
    char_lm = load("char_lm")
    records = char_lm.main(rounds=3, verbose=False)
    tokens, paragraph, vocabulary = char_lm.windows(char_lm.TEXT.read_text(), 16, 4)
    assert tokens.shape[1] == 17 and len(set(paragraph.tolist())) > 4
    assert records[-1]["global_loss"] < records[0]["global_loss"] < np.log(len(vocabulary))
    assert records[-1]["global_accuracy"] > 3 / len(vocabulary)


def test_personalized_example_prints_every_method_and_fedper_fits_skewed_clients(capsys):
    personalized = load("personalized")
    table = personalized.main(seeds=1, rounds=3, local_steps=10)
    assert list(table) == ["fedavg", "fedprox(0.01)", "fedper", "fedrep(5)", "fedbn", "ditto(0.1)"]
    for row in table.values():
        assert 0.0 <= row["local_accuracy"] <= 1.0 and 0.0 <= row["global_accuracy"] <= 1.0
    # FedPer and FedRep send the body only: fewer bytes than FedAvg
    assert table["fedper"]["upload_mb"] < table["fedavg"]["upload_mb"]
    # label skew (beta 0.1): a local head fits each client's few classes
    assert table["fedper"]["local_accuracy"] > table["fedavg"]["local_accuracy"]
    personalized.print_table(table)
    assert capsys.readouterr().out.splitlines()[0].split() == [
        "method",
        "local",
        "acc",
        "global",
        "acc",
        "upload",
        "MB",
    ]
