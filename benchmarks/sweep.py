"""Time to the picture: the default ``compare``, ``compare --repeat 3`` and a budget sweep.

    python -m benchmarks.sweep [--checkout PATH] [--runs N] [--json FILE] [--quick]

Each case is a whole ``jaxlayerx compare`` process on the bundled digits (start, imports,
data, compilation, training, the run folder and its plots), timed from the outside:

* ``cold``: with JAX's persistent compilation cache in a new, empty folder;
* ``warm``: again, with the folder the cold run filled.

The cases, and the ratios the main job's promises are about:

* ``default``: ``compare`` with its default exchangers (spelled out, so that an older
  checkout runs the same ones);
* ``repeat 3``: the same with ``--repeat 3``, over ``default`` (``--repeat 1``);
* ``budget sweep``: five budgets, ``dynamic-budget(F, ef)`` for F in 0.1 ... 0.9, over
  ``budget``: the one budget ``dynamic-budget(0.5, ef)`` alone.

``--checkout PATH`` runs the same cases on another checkout of jaxlayerx (its package
first on ``PYTHONPATH``), to time the code before a change against the code after it on
the same machine and in one sitting. Each time is the median of ``--runs`` runs (default 1:
each cold run needs its own empty cache). ``--quick`` runs tiny federations (3 clients, 2
rounds of 2 steps), to check that the script works, not to time anything.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

#: The default exchangers of ``compare`` (jaxlayerx.simulation.cli.COMPARE_DEFAULT), spelled out.
DEFAULT_EXCHANGERS = (
    "full,dynamic-threshold(0.0001, l2/size),dynamic-percentage(0.5, l2/size),dynamic-budget(0.5, ef),"
    "dynamic-percentage(0.5, rms, ef),sparse-largest-magnitude-change(0.05, ef, int8)"
)
BUDGETS = ",".join(f"dynamic-budget({value:g}, ef)" for value in (0.1, 0.25, 0.5, 0.75, 0.9))

CASES: dict[str, list[str]] = {
    "default": ["--exchangers", DEFAULT_EXCHANGERS],
    "repeat 3": ["--exchangers", DEFAULT_EXCHANGERS, "--repeat", "3"],
    "budget": ["--exchangers", "dynamic-budget(0.5, ef)"],
    "budget sweep": ["--exchangers", BUDGETS],
}
#: Each ratio: the case over its baseline.
RATIOS = {"repeat 3": "default", "budget sweep": "budget"}


#: The options of ``--quick``.
QUICK = ["--clients", "3", "--rounds", "2", "--local-steps", "2", "--batch-size", "8"]


def run_case(options: list[str], cache: pathlib.Path, checkout: pathlib.Path | None) -> float:
    """Wall seconds of one ``jaxlayerx compare`` process with ``options``, caching in ``cache``."""
    environment = {**os.environ, "JAXLAYERX_CACHE": str(cache)}
    if checkout is not None:
        environment["PYTHONPATH"] = os.pathsep.join([str(checkout), environment.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "jaxlayerx", "compare", *options, "--out", out, "--overwrite"]
        start = time.perf_counter()
        completed = subprocess.run(command + ["--no-progress"], env=environment, capture_output=True, text=True)
        seconds = time.perf_counter() - start
    if completed.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{completed.stderr}")
    return seconds


def measure(checkout: pathlib.Path | None, runs: int, extra: list[str]) -> dict[str, dict[str, float]]:
    """``{case: {"cold": seconds, "warm": seconds}}``, medians over ``runs``; ``extra``
    options go to every case."""
    times: dict[str, dict[str, list[float]]] = {case: {"cold": [], "warm": []} for case in CASES}
    for _ in range(runs):
        for case, case_options in CASES.items():
            options = [*case_options, *extra]
            with tempfile.TemporaryDirectory() as cache:
                times[case]["cold"].append(run_case(options, pathlib.Path(cache), checkout))
                times[case]["warm"].append(run_case(options, pathlib.Path(cache), checkout))
            print(f"  {case:>13}: cold {times[case]['cold'][-1]:6.1f} s, warm {times[case]['warm'][-1]:6.1f} s")
    return {case: {kind: statistics.median(values) for kind, values in kinds.items()} for case, kinds in times.items()}


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """A markdown table: each case's cold and warm seconds per checkout, then the ratios."""
    trees = list(results)
    header = ["case"] + [f"{tree} {kind} (s)" for tree in trees for kind in ("cold", "warm")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for case in CASES:
        cells = [f"{results[tree][case][kind]:.1f}" for tree in trees for kind in ("cold", "warm")]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    for case, baseline in RATIOS.items():
        cells = [
            f"{results[tree][case][kind] / results[tree][baseline][kind]:.2f}x"
            for tree in trees
            for kind in ("cold", "warm")
        ]
        lines.append(f"| {case} / {baseline} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", type=pathlib.Path, default=None, help="also time this checkout (before)")
    parser.add_argument("--runs", type=int, default=1, help="runs per case and cache state; the median is kept")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="write the times here")
    parser.add_argument("--quick", action="store_true", help="tiny federations: checks the script, times nothing")
    args = parser.parse_args()
    extra = QUICK if args.quick else []
    results: dict[str, dict[str, dict[str, float]]] = {}
    if args.checkout is not None:
        print(f"before: {args.checkout}")
        results["before"] = measure(args.checkout.resolve(), args.runs, extra)
    print("after: this checkout")
    results["after"] = measure(None, args.runs, extra)
    print(table(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
