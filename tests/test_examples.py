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
