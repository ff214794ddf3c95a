"""How the simulation scales with the number of clients: memory and time per round.

    python -m benchmarks.scale [--clients 250,1000,2000] [--per-round 50] [--chunk-size C]

For each number of clients ``N``, one process runs ``jaxlayerx simulate --data mnist1d
--clients N --clients-per-round K --rounds 5 --beta iid`` and reports its peak resident
memory (``resource.getrusage``: the whole process, XLA's compilation included) and its time
per round (median of rounds 2-5; round 1 compiles). A second measure separates what grows
with ``N`` from what grows with the round: XLA's own accounting of the compiled round
(``memory_analysis`` of its three programs, which run one after the other: the clients'
updates, the server's masked average, the server step with the evaluation; the largest of
each figure): its arguments (the stored state and data of all ``N`` clients) and its
temporaries (the round's working memory, which grows with the clients trained at once).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap

CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import jax, numpy as np
    from jaxlayerx.simulation.cli import main
    clients, per_round, chunk, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    args = ["simulate", "--data", "mnist1d", "--clients", str(clients), "--clients-per-round", str(per_round),
            "--rounds", "5", "--beta", "iid", "--exchangers", "full", "--out", out, "--no-progress"]
    if chunk != "none":
        args += ["--chunk-size", chunk]
    assert main(args) == 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    walls = [r["wall_seconds"] for r in json.load(open(out + "/metrics.json"))["full"]]

    from jaxlayerx.simulation import ExchangerSpec, Simulation, SimulationConfig, make_client_data
    from jaxlayerx.simulation.datasets import load_mnist1d
    from jaxlayerx.simulation.models import CNN
    d = load_mnist1d()
    data = make_client_data(d.x, d.y, clients, beta=None, seed=0, x_test=d.x_test, y_test=d.y_test)
    config = SimulationConfig(clients_per_round=per_round, chunk_size=None if chunk == "none" else int(chunk))
    sim = Simulation(ExchangerSpec("full"), config, data, CNN())
    # A round is three compiled programs, run one after the other: the clients' updates, the
    # server's masked average, the server step with the evaluation (Simulation.compiled_round).
    memories = [program.memory_analysis() for program in sim.compiled_round().values()]
    print(json.dumps({"peak_mb": peak, "round_s": float(np.median(walls[1:])), "first_round_s": walls[0],
                      "arguments_mb": max(m.argument_size_in_bytes for m in memories) / 1e6,
                      "temporaries_mb": max(m.temp_size_in_bytes for m in memories) / 1e6}))
    """
)


def measure(clients: int, per_round: int, chunk: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        completed = subprocess.run(
            [sys.executable, "-c", CHILD, str(clients), str(per_round), chunk, folder],
            capture_output=True,
            text=True,
            check=False,
        )
    if completed.returncode != 0:
        raise RuntimeError(completed.stderr)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="250,1000,2000", help="comma-separated numbers of clients")
    parser.add_argument("--per-round", type=int, default=50, help="clients sampled each round")
    parser.add_argument("--chunk-size", default="none", help="clients trained at once (none: all sampled)")
    args = parser.parse_args()
    print(
        "| clients | per round | chunk | peak memory MB | round s | first round s | XLA arguments MB | XLA temporaries MB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for clients in (int(n) for n in args.clients.split(",")):
        m = measure(clients, args.per_round, args.chunk_size)
        print(
            f"| {clients} | {args.per_round} | {args.chunk_size} | {m['peak_mb']:.0f} | {m['round_s']:.2f} | "
            f"{m['first_round_s']:.1f} | {m['arguments_mb']:.0f} | {m['temporaries_mb']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
