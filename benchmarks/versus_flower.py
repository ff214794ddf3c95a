"""``jaxlayerx simulate`` against Flower's simulation engine, on the same federation.

    python benchmarks/versus_flower.py [--clients 8] [--rounds 20] [--wide-clients 64] [--wide-rounds 4] [--json out.json]

Needs the ``simulation`` extra (``pip install 'jaxlayerx[simulation]'``: ``flwr[simulation]``,
which brings Ray); not run in CI.

The federation is ``jaxlayerx simulate --exchangers full``: the bundled digits split over 8 clients
(Dirichlet 0.5, seed 0, a fifth of each client's data held out), the MLP, 20 rounds of 20
local SGD steps (batch 32, learning rate 0.05, momentum 0.9), every layer exchanged and
averaged by example count, the global model evaluated on the held-out data after every
round and each client's model on its own test split.

On Flower (1.42), the same federation runs as a Message-API ``ServerApp`` (Flower's own
``FedAvg`` strategy from ``flwr.serverapp.strategy``, every node trained and evaluated each
round, a central ``evaluate_fn``) and ``ClientApp`` through ``flwr.simulation.run_simulation``
(the Ray backend, one CPU per client actor). The ``ClientApp`` trains with jaxlayerx's own
jitted per-client update (:meth:`Simulation.client_update`, the same batches), so that
both sides do the same arithmetic and only the orchestration differs.
``run_simulation`` rather than ``flwr run``: it is the same simulation engine started from
Python in one process, with no app folder to install and no SuperLink to start, so its
end-to-end time holds the engine's own costs and none of the command's.

Each side runs in a fresh process, timed from its start to its exit (end to end), and per
round (the median of the rounds after the first, from each side's own clock). Both are
measured twice: with an empty compilation cache, then with the cache the first run filled
(``jaxlayerx simulate`` uses JAX's persistent cache by default; the Flower processes get
the same through ``JAX_COMPILATION_CACHE_DIR``). Then the same per round with
``--wide-clients`` clients. The two ratios printed are Flower's time over jaxlayerx's.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

_CLI = "import sys; from jaxlayerx.simulation.cli import main; sys.exit(main())"

#: ``jaxlayerx simulate``'s default split of the digits (see jaxlayerx/simulation/cli.py).
BETA, TEST_FRACTION, SEED = 0.5, 0.2, 0


# -- the Flower side (runs in a child process) ----------------------------------------------


@functools.cache
def _federation(clients: int) -> Any:
    """The ``Simulation`` of the default federation with ``clients`` clients, and its jitted
    per-client update and evaluation (one per process: the server and each Ray actor)."""
    import jax
    import jax.numpy as jnp

    from jaxlayerx.base import FlatView
    from jaxlayerx.simulation import ExchangerSpec, Simulation, SimulationConfig, make_client_data
    from jaxlayerx.simulation.datasets import load_dataset
    from jaxlayerx.simulation.models import make_model
    from jaxlayerx.simulation.task import LocalData

    dataset = load_dataset("digits")
    data = make_client_data(dataset.x, dataset.y, clients, beta=BETA, seed=SEED, test_fraction=TEST_FRACTION)
    sim = Simulation(ExchangerSpec("full"), SimulationConfig(seed=SEED), data, make_model("mlp", dataset.num_classes))
    pull = FlatView((name, jnp.ones(shape, bool)) for name, shape in sim.mask_shapes.items())

    def update(global_layers: Any, round_index: Any, client: Any, x: Any, y: Any, n: Any) -> Any:
        key = sim.round_keys(round_index, client[None], sim.batch_key)[0]
        # (pull mask, own layers, reference, residual, optimizer state, key, data): no error
        # feedback, so no reference and no residual, and a fresh optimizer state; the
        # trained layers are the second output.
        inputs = (pull, global_layers, FlatView(), FlatView(), None, key, LocalData({"x": x, "y": y}, n))
        return sim.client_update(global_layers, inputs)[1]

    def evaluate(layers: Any, x: Any, y: Any, n: Any) -> Any:
        loss, metrics = sim.evaluate(layers, LocalData({"x": x, "y": y}, n))
        return loss, metrics["accuracy"]

    return sim, jax.jit(update), jax.jit(evaluate)


def _layers(sim: Any, arrays: Any) -> Any:
    import jax.numpy as jnp

    from jaxlayerx.base import FlatView

    return FlatView(zip(sim.layer_names, (jnp.asarray(a) for a in arrays.to_numpy_ndarrays())))


def _counting(aggregate: Any, failures: list[str]) -> Any:
    """``aggregate`` (a strategy's), noting every reply that carries an error."""

    def counted(server_round: int, replies: Any) -> Any:
        replies = list(replies)
        failures.extend(f"round {server_round}: {reply.error}" for reply in replies if reply.has_error())
        return aggregate(server_round, replies)

    return counted


def _flower_apps(
    clients: int, rounds: int, times: list[float], accuracy: list[float], failures: list[str]
) -> tuple[Any, Any]:
    import numpy as np
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:  # pyright: ignore[reportUnusedFunction]
        sim, update, _ = _federation(int(context.node_config["num-partitions"]))
        client = int(context.node_config["partition-id"])
        round_index = int(msg.content["config"]["server-round"])  # pyright: ignore[reportArgumentType]
        data = sim.data
        trained = update(
            _layers(sim, msg.content["arrays"]),
            np.int32(round_index),
            np.int32(client),
            data.x_train[client],
            data.y_train[client],
            data.n_train[client],
        )
        arrays = ArrayRecord([np.asarray(trained[name]) for name in sim.layer_names])
        metrics = MetricRecord({"num-examples": int(data.n_train[client])})
        return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:  # pyright: ignore[reportUnusedFunction]
        sim, _, evaluate_fn = _federation(int(context.node_config["num-partitions"]))
        client = int(context.node_config["partition-id"])
        data = sim.data
        loss, acc = evaluate_fn(
            _layers(sim, msg.content["arrays"]), data.x_test[client], data.y_test[client], data.n_test[client]
        )
        metrics = MetricRecord({"loss": float(loss), "accuracy": float(acc), "num-examples": int(data.n_test[client])})
        return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:  # pyright: ignore[reportUnusedFunction]
        sim, _, evaluate_fn = _federation(clients)

        def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            data = sim.data
            loss, acc = evaluate_fn(
                _layers(sim, arrays), data.x_global_test, data.y_global_test, len(data.y_global_test)
            )
            times.append(time.perf_counter())
            accuracy.append(float(acc))
            return MetricRecord({"loss": float(loss), "accuracy": float(acc)})

        strategy = FedAvg(
            fraction_train=1.0,
            fraction_evaluate=1.0,
            min_train_nodes=clients,
            min_evaluate_nodes=clients,
            min_available_nodes=clients,
        )
        strategy.aggregate_train = _counting(strategy.aggregate_train, failures)  # type: ignore[method-assign]
        strategy.aggregate_evaluate = _counting(strategy.aggregate_evaluate, failures)  # type: ignore[method-assign]
        initial = ArrayRecord([np.asarray(sim.initial_layers[name]) for name in sim.layer_names])
        strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=rounds,
            train_config=ConfigRecord({}),
            evaluate_fn=central,
        )

    return server_app, client_app


def flower_child(clients: int, rounds: int) -> None:
    """Runs the federation on Flower's simulation engine; prints one ``RESULT`` JSON line."""
    from flwr.simulation import run_simulation

    times: list[float] = []
    accuracy: list[float] = []
    failures: list[str] = []
    server_app, client_app = _flower_apps(clients, rounds, times, accuracy, failures)
    backend_config: Any = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"include_dashboard": False, "log_to_driver": False},
    }
    run_simulation(server_app, client_app, num_supernodes=clients, backend_config=backend_config)
    # times[0] is the evaluation of the initial model; times[r] ends round r.
    rounds_s = [b - a for a, b in zip(times, times[1:])]
    result = {"round_s": rounds_s, "accuracy": accuracy[-1] if accuracy else None, "failures": failures}
    print("RESULT " + json.dumps(result))


# -- the parent: both sides, timed ----------------------------------------------------------


def _timed(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])}... failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def run_jaxlayerx(clients: int, rounds: int, cache: str) -> dict[str, Any]:
    """``jaxlayerx simulate`` in a fresh process: end-to-end seconds, per-round seconds."""
    with tempfile.TemporaryDirectory() as folder:
        out = pathlib.Path(folder) / "run"
        script = pathlib.Path(sys.executable).with_name("jaxlayerx")  # the installed command
        launcher = [str(script)] if script.is_file() else [sys.executable, "-c", _CLI]
        command = [*launcher, "simulate", "--exchangers", "full", "--no-progress", "--out", str(out)]
        command += ["--clients", str(clients), "--rounds", str(rounds)]
        seconds, _ = _timed(command, {**os.environ, "JAXLAYERX_CACHE": cache})
        history = json.loads((out / "metrics.json").read_text())["full"]
    walls = [record["wall_seconds"] for record in history]
    return {
        "end_to_end_s": seconds,
        "round_s": statistics.median(walls[1:]) if len(walls) > 1 else walls[0],
        "first_round_s": walls[0],
        "accuracy": history[-1]["global_accuracy"],
    }


def run_flower(clients: int, rounds: int, cache: str) -> dict[str, Any]:
    """The same federation on Flower's simulation engine in a fresh process."""
    env = {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": cache,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "RAY_DEDUP_LOGS": "0",
    }
    # As a module of the repository, so that Ray's actors import the client functions by name.
    root = str(pathlib.Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "benchmarks.versus_flower", "--flower-child"]
    seconds, stdout = _timed([*command, "--clients", str(clients), "--rounds", str(rounds)], env)
    line = next(line for line in stdout.splitlines() if line.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    if len(result["round_s"]) != rounds or result["failures"]:
        raise RuntimeError(f"the Flower run did not complete its {rounds} rounds: {result}")
    walls = result["round_s"]
    return {
        "end_to_end_s": seconds,
        "round_s": statistics.median(walls[1:]) if len(walls) > 1 else walls[0],
        "first_round_s": walls[0],
        "accuracy": result["accuracy"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--wide-clients", type=int, default=64, help="clients of the per-round comparison")
    parser.add_argument("--wide-rounds", type=int, default=4, help="rounds run at --wide-clients")
    parser.add_argument("--json", type=pathlib.Path, default=None)
    parser.add_argument("--flower-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.flower_child:
        # From the module by its name, not __main__: Ray's actors import the client functions.
        importlib.import_module("benchmarks.versus_flower").flower_child(args.clients, args.rounds)
        return {}
    try:
        import flwr.simulation  # noqa: F401  # pyright: ignore[reportUnusedImport]
        import ray  # noqa: F401  # pyright: ignore[reportUnusedImport, reportMissingImports]
    except ImportError:
        sys.exit("benchmarks/versus_flower.py needs Flower's simulation engine: pip install 'jaxlayerx[simulation]'")
    results: dict[str, Any] = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}
    with tempfile.TemporaryDirectory() as cache:
        for label in ("cold cache", "warm cache"):
            results[f"jaxlayerx, {label}"] = run_jaxlayerx(args.clients, args.rounds, cache)
            results[f"flower, {label}"] = run_flower(args.clients, args.rounds, cache)
        results[f"jaxlayerx, {args.wide_clients} clients"] = run_jaxlayerx(args.wide_clients, args.wide_rounds, cache)
        results[f"flower, {args.wide_clients} clients"] = run_flower(args.wide_clients, args.wide_rounds, cache)
    print(f"{'run':28} {'end to end s':>12} {'round ms':>9} {'first round ms':>15} {'accuracy':>9}")
    for label, row in results.items():
        if isinstance(row, dict):
            print(
                f"{label:28} {row['end_to_end_s']:12.2f} {row['round_s'] * 1e3:9.1f} "
                f"{row['first_round_s'] * 1e3:15.1f} {row['accuracy']:9.3f}"
            )
    for label in ("cold cache", "warm cache"):
        ratio = results[f"flower, {label}"]["end_to_end_s"] / results[f"jaxlayerx, {label}"]["end_to_end_s"]
        results[f"end-to-end ratio, {label}"] = ratio
        print(f"end to end, {args.clients} clients x {args.rounds} rounds, {label}: jaxlayerx {ratio:.1f}x faster")
    for label in (f"{args.clients} clients", f"{args.wide_clients} clients"):
        flower = results["flower, warm cache" if label.startswith(str(args.clients)) else f"flower, {label}"]
        ours = results["jaxlayerx, warm cache" if label.startswith(str(args.clients)) else f"jaxlayerx, {label}"]
        ratio = flower["round_s"] / ours["round_s"]
        results[f"per-round ratio, {label}"] = ratio
        print(f"per round, {label}: jaxlayerx {ratio:.0f}x faster")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
