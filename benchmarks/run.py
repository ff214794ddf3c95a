"""Benchmarks of the hot paths, as ratios measured in one run.

    python benchmarks/run.py [--quick] [--json out.json]

Trees (float32, real shapes): a ResNet-50-shaped tree (267 leaves, 25.6 M values), 400
layers of 64x64, and four transformer blocks (64 leaves, 12.6 M values). Cases:

1. threshold selection, end to end through ``DynamicLayerExchanger.push_parameters``;
2. percentage selection, the same;
3. ``FedAvgDynamicLayer.aggregate`` over 10 clients that each send a random half of the layers;
4. the jitted mask forms (drift norms and mask; ``masked_fedavg`` over 10 stacked clients);
5. one simulated round with 64 clients vmapped, against Python loops over clients;
6. sparse COO exchange at sparsity 0.1 (ResNet-50 tree): ``SparseCooParameterExchanger.push_parameters``,
   the global threshold by each method, the jitted mask form, and ``FedAvgSparseCooTensor``
   over 10 clients, against fl4health's host-sort algorithm and dense ``reduce`` average.

Each case is the median of several runs after warm-up, reported as a ratio to
* its floor: for cases 1-4 the best time to read the same bytes once (BLAS dot products
  over arrays of the same total size, on one core or on both, whichever is faster); for a
  round, its training FLOPs at the rate of one large matmul on this machine; and
* the baseline: the reference's algorithm as the reference runs it (benchmarks/reference.py):
  torch CPU tensors in torch layout (OIHW kernels) with fl4health's loops (one
  ``torch.linalg.norm`` and one ``.item()`` per layer; ``functools.reduce(np.add, ...)``
  over weighted numpy copies on the server; concatenate, full sort, dense rebuild and
  ``nonzero`` for sparse), or the same loops in numpy when torch (the ``bench`` extra) is
  missing: the table's header says which ran. Each baseline is timed with torch's default
  intra-op threads and with one thread; the faster counts. For a round, Python loops over clients
  calling the same jitted per-client update or SGD step.
jaxlayerx runs in Flax layout (HWIO kernels); the ``(torch shapes)`` rows give it the same
bytes in torch's shapes. The ``jax loop ms`` column is a per-layer loop written in JAX (one
jitted norm and one host sync per layer), for comparison only.
Absolute times on a shared machine are noise; the ratios are what to compare.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax

from benchmarks.cases import aggregation_case, mask_cases, selection_cases
from benchmarks.reference import BASELINE
from benchmarks.round import simulation_round_cases
from benchmarks.sparse import sparse_cases
from benchmarks.trees import resnet50_shapes, small_layers_shapes, transformer_block_shapes

#: The trees the sparse case runs on (one is enough: its cost is per weight, not per layer).
SPARSE_TREES = ("resnet50", "small-40")
#: The trees also run with torch's kernel shapes (trailing unit dimensions) fed to jaxlayerx.
TORCH_SHAPE_TREES = ("resnet50", "small-40")


def trees(quick: bool) -> dict[str, dict[str, tuple[int, ...]]]:
    if quick:
        return {"small-40": small_layers_shapes(40, 16)}
    return {
        "resnet50": resnet50_shapes(),
        "small-400": small_layers_shapes(400, 64),
        "transformer": transformer_block_shapes(),
    }


def run(quick: bool) -> list[dict[str, object]]:
    repeats = 3 if quick else 9
    rows: list[dict[str, object]] = []
    for name, shapes in trees(quick).items():
        rows.extend(selection_cases(name, shapes, repeats))
        if name in TORCH_SHAPE_TREES:
            rows.extend(selection_cases(name, shapes, repeats, torch_shapes=True))
        rows.append(aggregation_case(name, shapes, repeats))
        rows.extend(mask_cases(name, shapes, repeats))
        if name in SPARSE_TREES:
            rows.extend(sparse_cases(name, shapes, repeats))
    rows.extend(simulation_round_cases(quick, repeats))
    return rows


def device_note() -> str:
    device = jax.devices()[0]
    return f"{device.platform} ({device.device_kind}), {jax.device_count()} device(s); host {platform.machine()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument("--json", help="also write the rows as JSON to this path")
    args = parser.parse_args()
    note = device_note()
    print(f"device: {note}")
    print(f"baseline: the reference's algorithm on {BASELINE}")
    rows = run(args.quick)
    print(
        f"{'case':<60} {'ms':>9} {'floor ms':>9} {'x floor':>8} {'baseline ms':>12} {'x faster':>9} {'jax loop ms':>12}"
    )
    for row in rows:
        loop = "" if row.get("jax_loop_ms") is None else f"{row['jax_loop_ms']:.3f}"
        print(
            f"{row['case']:<60} {row['ms']:>9.3f} {row['floor_ms']:>9.3f} {row['x_floor']:>8.2f} "
            f"{row['baseline_ms']:>12.3f} {row['speedup_vs_baseline']:>9.2f} {loop:>12}"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": note, "baseline": BASELINE, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
