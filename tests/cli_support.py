"""What the command-line tests share: tiny run options, the default MLP's layers and the
sizes of its messages (by the tests' reference codec), running the command in process or
as a subprocess, and the one-line error check."""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import math
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
from conftest import RefLayer, ref_message_nbytes

from jaxlayerx.simulation import MLP
from jaxlayerx.simulation.cli import main

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


def varint_size(number: int) -> int:
    """Bytes of ``number`` as an unsigned LEB128 varint: 7 bits a byte."""
    return max(1, -(-number.bit_length() // 7))


# -- compare -----------------------------------------------------------------------------
