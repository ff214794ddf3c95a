"""The ``jaxlayerx`` command: ``simulate`` and ``compare`` federated runs, and ``--version``."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import os
import pathlib
import shutil
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from jaxlayerx import __version__
from jaxlayerx.compile_cache import CACHE_VARIABLE, cache_dir, enable_compile_cache
from jaxlayerx.quantize import QUANTIZE_MODES
from jaxlayerx.selection import MEASURES
from jaxlayerx.simulation.datasets import DATASETS
from jaxlayerx.simulation.exchange import EXCHANGER_KINDS, ExchangerSpec
from jaxlayerx.simulation.models import BODY_LAYERS, DEFAULT_MODEL, MODELS
from jaxlayerx.simulation.server import SERVER_OPTIMIZERS
from jaxlayerx.simulation.spec_grammar import split_specs

if TYPE_CHECKING:
    from jaxlayerx.simulation.config import SimulationConfig

#: The note of an exchanger whose global model is not meant to be used on its own.
PERSONALIZED = "personalized: read local_acc"

#: The note of fl4health's own settings of its dynamic exchanger.
FL4HEALTH_DEFAULT = "fl4health's default"
#: The note of the rules this library recommends.
RECOMMENDED = "recommended"

#: The rules the library recommends: a byte budget, the percentage rule with the rms
#: measure, and sparse weights in int8, each with error feedback.
RECOMMENDED_RULES = (
    "dynamic-budget(0.5, ef)",
    "dynamic-percentage(0.5, rms, ef)",
    "sparse-largest-magnitude-change(0.05, ef, int8)",
)
#: fl4health's dynamic exchanger with its own default settings.
FL4HEALTH_RULES = ("dynamic-threshold(0.0001, l2/size)", "dynamic-percentage(0.5, l2/size)")

COMPARE_DEFAULT = ",".join(("full", *FL4HEALTH_RULES, *RECOMMENDED_RULES))
SIMULATE_DEFAULT = ",".join(("full", RECOMMENDED_RULES[0]))


class _Parser(argparse.ArgumentParser):
    """Bad options end in one line on stderr and exit status 2, no usage dump, no traceback."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxlayerx", description="Partial parameter exchange for federated learning with JAX/Flax.")
    parser.add_argument("--version", action="version", version=f"jaxlayerx {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    simulate = commands.add_parser(
        "simulate",
        help="a federated run: the recommended rule against full exchange (default: the bundled digits)",
        description="Federated simulation: the clients of a round train at once under jax.vmap in one jitted round; "
        "the exchanger decides which layers cross the wire.",
    )
    _add_options(simulate, default_exchangers=SIMULATE_DEFAULT)
    compare = commands.add_parser(
        "compare",
        help="several exchangers on the same split and seed, on one plot and one table",
        description="Runs several exchangers on the same data split and seed and draws them together; by default "
        "full exchange, fl4health's two dynamic defaults and the rules this library recommends.",
    )
    _add_options(compare, default_exchangers=COMPARE_DEFAULT)
    return parser


def _add_options(parser: argparse.ArgumentParser, default_exchangers: str) -> None:
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        default="digits",
        metavar="NAME|PATH.npz",
        help=f"{', '.join(DATASETS)}, or a .npz file with arrays x and y (and optionally x_test, y_test) (default: digits)",
    )
    data.add_argument(
        "--model", choices=MODELS, default=None, help="mlp or cnn (default: mlp for digits and .npz, cnn for mnist1d)"
    )
    data.add_argument(
        "--beta",
        type=_beta,
        default=None,
        metavar="BETA|iid",
        help="Dirichlet concentration of the label split, smaller is more non-IID; or iid (default: 0.5, or iid with --shift)",
    )
    data.add_argument(
        "--shift",
        action="store_true",
        help="feature shift: each client sees its inputs through its own fixed transform",
    )
    data.add_argument(
        "--test-fraction",
        type=float,
        default=0.2,
        help="share of each client's data held out for testing, when the data has no test split (default: 0.2)",
    )
    run = parser.add_argument_group("run")
    run.add_argument(
        "--exchangers",
        default=default_exchangers,
        metavar="LIST",
        help=f"comma-separated exchangers: kinds among {', '.join(EXCHANGER_KINDS)}, or labels as the "
        f"table prints them, e.g. 'dynamic-budget(0.25, ef, int8)' (default: {default_exchangers})",
    )
    run.add_argument("--clients", type=int, default=8, help="number of clients (default: 8)")
    run.add_argument(
        "--clients-per-round",
        type=int,
        default=None,
        metavar="K",
        help="clients sampled each round, without replacement (default: all)",
    )
    run.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        metavar="C",
        help="clients trained at once within a round; bounds memory (default: all sampled clients)",
    )
    run.add_argument("--rounds", type=int, default=20, help="federated rounds (default: 20)")
    run.add_argument("--local-steps", type=int, default=20, help="local steps per client per round (default: 20)")
    run.add_argument(
        "--local-epochs",
        type=float,
        default=None,
        metavar="E",
        help="train about E epochs per round instead of --local-steps (steps = ceil(E * mean client size / batch size))",
    )
    run.add_argument("--batch-size", type=int, default=32, help="examples per local step (default: 32)")
    run.add_argument(
        "--local-optimizer", choices=("sgd", "adam"), default="sgd", help="the clients' optimizer (default: sgd)"
    )
    run.add_argument(
        "--learning-rate", type=float, default=0.05, help="the local optimizer's learning rate (default: 0.05)"
    )
    run.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    run.add_argument(
        "--server-optimizer",
        choices=SERVER_OPTIMIZERS,
        default="avg",
        help="avg (FedAvg) or FedOpt on the pseudo-gradient: sgd, adam, yogi, adagrad (default: avg)",
    )
    run.add_argument(
        "--average-over",
        choices=("senders", "participants"),
        default="senders",
        help="senders: each layer (weight) averaged over the clients that sent it; participants: moved by the mean "
        "change over the round's clients, unsent counting as no change (default: senders)",
    )
    run.add_argument(
        "--server-lr",
        type=float,
        default=None,
        help="the server optimizer's learning rate (default: sgd 1, adam and yogi 0.01, adagrad 0.1)",
    )
    run.add_argument(
        "--seed", type=int, default=0, help="seeds the split, the model, the sampling and the batches (default: 0)"
    )
    run.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="S",
        help="run S seeds (seed, seed + 1, ...) and report their mean and spread (default: 1)",
    )
    run.add_argument("--unweighted", action="store_true", help="average clients uniformly instead of by example count")
    exchange = parser.add_argument_group("exchangers")
    exchange.add_argument(
        "--layers",
        default=None,
        metavar="GLOBS",
        help="fixed: comma-separated layer names or globs (default: every layer but the model's head)",
    )
    exchange.add_argument(
        "--norm-threshold", type=float, default=1e-4, help="dynamic-threshold: drift threshold, > 0 (default: 1e-4)"
    )
    exchange.add_argument(
        "--exchange-percentage",
        type=float,
        default=0.5,
        help="dynamic-percentage: share of layers sent, in (0, 1] (default: 0.5)",
    )
    exchange.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fl4health's measure switch when --measure is not given: l2/size if on, l2 if off (default: on)",
    )
    exchange.add_argument(
        "--measure",
        choices=MEASURES,
        default=None,
        help="drift measure of dynamic-threshold and dynamic-percentage: l2/size (fl4health's normalize), l2, "
        "rms (l2 / sqrt(size)) or relative (l2 / l2 of the start) (default: set by --normalize)",
    )
    exchange.add_argument(
        "--budget",
        default="0.5",
        metavar="F[,F...]",
        help="dynamic-budget: share of the model's bytes a client may send, in (0, 1]; a comma-separated "
        "list runs one line per value (default: 0.5)",
    )
    exchange.add_argument(
        "--select-drift-less", action="store_true", help="send the layers that drifted least instead of most"
    )
    exchange.add_argument(
        "--error-feedback",
        action="store_true",
        help="dynamic-* and sparse-*: measure drift from the last values pulled, so what was not sent accumulates",
    )
    exchange.add_argument(
        "--quantize",
        choices=("none", *QUANTIZE_MODES),
        default="none",
        help="code each upload's update in bf16, or in int8 with one scale per layer; with --error-feedback, "
        "what quantization loses is carried into the next round (default: none)",
    )
    exchange.add_argument(
        "--sparsity-level",
        type=float,
        default=0.1,
        help="sparse-*: fraction of all weights sent each round, in (0, 1]; bytes count the indices (default: 0.1)",
    )
    output = parser.add_argument_group("output")
    output.add_argument(
        "--out", type=pathlib.Path, default=None, help="run folder (default: runs/<command>-<timestamp>)"
    )
    output.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --out folder")
    output.add_argument("--no-progress", action="store_true", help="no progress bar")
    output.add_argument(
        "--no-compile-cache",
        action="store_true",
        help=f"do not use JAX's persistent compilation cache (default: on, in ${CACHE_VARIABLE} or "
        "~/.cache/jaxlayerx/xla; JAXLAYERX_CACHE=off also turns it off)",
    )


def _beta(text: str) -> float | str:
    """``--beta``: a number, or ``iid``."""
    if text == "iid":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or iid, got {text!r}") from None


def specs_from_args(args: argparse.Namespace) -> list[ExchangerSpec]:
    """One :class:`ExchangerSpec` per spec in ``--exchangers`` (a kind, or a label as tables
    print it: :meth:`ExchangerSpec.parse`), the global options filling what a spec leaves
    out; a bare ``dynamic-budget`` once per value of ``--budget`` (ValueError on a bad one)."""
    texts = split_specs(args.exchangers)
    if not texts:
        raise ValueError("--exchangers is empty")
    model = args.model or DEFAULT_MODEL.get(str(args.data), "mlp")
    layers = (
        BODY_LAYERS[model]
        if args.layers is None
        else tuple(glob.strip() for glob in args.layers.split(",") if glob.strip())
    )
    defaults: dict[str, Any] = {
        "layers": layers,
        "norm_threshold": args.norm_threshold,
        "exchange_percentage": args.exchange_percentage,
        "normalize": args.normalize,
        "select_drift_more": not args.select_drift_less,
        "sparsity_level": args.sparsity_level,
        "measure": args.measure,
        "error_feedback": args.error_feedback,
        "quantize": None if args.quantize == "none" else args.quantize,
    }
    specs: list[ExchangerSpec] = []
    for text in texts:
        for byte_fraction in _budgets(args.budget) if text == "dynamic-budget" else [None]:
            options = defaults if byte_fraction is None else {**defaults, "byte_fraction": byte_fraction}
            specs.append(ExchangerSpec.parse(text, options))
    labels = [spec.label for spec in specs]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(f"--exchangers repeats {', '.join(repeated)}: {args.exchangers}")
    return specs


def _budgets(text: str) -> list[float]:
    """The values of ``--budget``: comma-separated numbers in ``(0, 1]``, none repeated."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--budget must be numbers separated by commas, got {text!r}") from None
    if not values:
        raise ValueError("--budget is empty")
    if len(set(values)) != len(values):
        raise ValueError(f"--budget repeats a value: {text}")
    for value in values:
        if not 0 < value <= 1:
            raise ValueError(f"--budget values must be in (0, 1], got {value:g}")
    return values


def config_from_args(args: argparse.Namespace, seed: int) -> SimulationConfig:
    """The :class:`SimulationConfig` of the parsed options, for ``seed`` (ValueError on a bad one)."""
    from jaxlayerx.simulation.config import SimulationConfig

    return SimulationConfig(
        rounds=args.rounds,
        local_steps=args.local_steps,
        local_epochs=args.local_epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        momentum=args.momentum,
        local_optimizer=args.local_optimizer,
        weighted=not args.unweighted,
        seed=seed,
        clients_per_round=args.clients_per_round,
        chunk_size=args.chunk_size,
        server_optimizer=args.server_optimizer,
        server_lr=args.server_lr,
        average_over=args.average_over,
    )


def run_command(args: argparse.Namespace) -> pathlib.Path:
    """Runs the parsed command; returns the run folder."""
    # Heavy imports here, so that --help and option errors are instant.
    from jaxlayerx.simulation.batch import run_together
    from jaxlayerx.simulation.data import make_client_data
    from jaxlayerx.simulation.datasets import load_dataset
    from jaxlayerx.simulation.engine import Simulation
    from jaxlayerx.simulation.models import make_model
    from jaxlayerx.simulation.report import summary_table, takeaway, write_run

    specs = specs_from_args(args)
    folder = run_folder(args)
    if args.clients < 1:
        raise ValueError(f"--clients must be a positive integer, got {args.clients}")
    if args.repeat < 1:
        raise ValueError(f"--repeat must be a positive integer, got {args.repeat}")
    seeds = [args.seed + offset for offset in range(args.repeat)]
    configs = [config_from_args(args, seed) for seed in seeds]
    dataset = load_dataset(args.data)
    beta = {None: None if args.shift else 0.5, "iid": None}.get(args.beta, args.beta)
    model_name = args.model or DEFAULT_MODEL.get(dataset.name, "mlp")
    # The options and the data are good: from here the run compiles (and fills the cache).
    if not args.no_compile_cache:
        enable_compile_cache(cache_dir())
    _import_in_background("matplotlib.figure", "matplotlib.backends.backend_agg", "tqdm.auto")
    # Everything that can be wrong is checked before any training: data, exchangers, globs.
    runs: dict[str, list[list[dict[str, Any]]]] = {spec.label: [] for spec in specs}
    notes: dict[str, str] = {}
    simulations_by_seed: list[list[Simulation]] = []
    for seed, config in zip(seeds, configs):
        data = make_client_data(
            dataset.x,
            dataset.y,
            args.clients,
            beta=beta,
            seed=seed,
            test_fraction=args.test_fraction,
            x_test=dataset.x_test,
            y_test=dataset.y_test,
            shift=args.shift,
        )
        module = make_model(model_name, dataset.num_classes)
        simulations_by_seed.append([Simulation(spec, config, data, module) for spec in specs])
    # The runs of one round program (seeds, and values of a rule's parameter) run together.
    groups: dict[Any, list[Simulation]] = {}
    for simulations in simulations_by_seed:
        for spec, simulation in zip(specs, simulations):
            groups.setdefault(spec.program_key, []).append(simulation)
    for group in groups.values():
        bar = _progress_bar(_group_name(group, len(seeds)), args.rounds, disabled=args.no_progress)
        for simulation, records in zip(group, run_together(group, bar)):
            runs[simulation.label].append(records)
            if simulation.personalized:
                notes[simulation.label] = PERSONALIZED
    for spec in specs:
        if spec.label in RECOMMENDED_RULES:
            notes.setdefault(spec.label, RECOMMENDED)
        elif spec.label in FL4HEALTH_RULES:
            notes.setdefault(spec.label, FL4HEALTH_DEFAULT)
    run_config = {
        "command": args.command,
        "data": dataset.name,
        "model": model_name,
        "num_clients": args.clients,
        "beta": beta,
        "shift": args.shift,
        "test_fraction": args.test_fraction,
        "seeds": seeds,
        **dataclasses.asdict(configs[0]),
        "local_steps_run": simulations_by_seed[0][0].local_steps,
        "exchangers": [{"label": spec.label, **dataclasses.asdict(spec)} for spec in specs],
    }
    # Written beside the folder, then moved into place: an interrupted run leaves the folder
    # as it was, and at most a sibling whose name says it is incomplete.
    staging = folder.with_name(f".{folder.name}.incomplete-{os.getpid()}")
    paths = write_run(staging, run_config, runs, notes)
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)
    paths = {key: folder / path.name for key, path in paths.items()}
    print(summary_table(runs, notes))
    line = takeaway(runs, exclude=[label for label, note in notes.items() if note == PERSONALIZED])
    if line is not None:
        print(f"takeaway: {line}")
    print(f"run folder: {folder} (plots: {paths['plot'].name}, {paths['plot_total'].name})")
    return folder


def _import_in_background(*modules: str) -> None:
    """Starts importing ``modules`` on a thread, while the run compiles and trains (XLA
    releases the GIL), so that they are there when the progress bar and the plots need them;
    one that is missing raises later, where it is used."""

    def load() -> None:
        for module in modules:
            try:
                importlib.import_module(module)
            except ImportError:
                return

    threading.Thread(target=load, name="jaxlayerx-imports", daemon=True).start()


def run_folder(args: argparse.Namespace) -> pathlib.Path:
    """Where the run is written: ``--out``, refused when it holds files unless
    ``--overwrite``; by default a new ``runs/<command>-<timestamp>`` (``-2``, ``-3``... when
    taken)."""
    if args.out is not None:
        if args.out.exists() and not args.out.is_dir():
            raise ValueError(f"--out {args.out} is a file, not a folder")
        if args.out.is_dir() and any(args.out.iterdir()) and not args.overwrite:
            raise ValueError(
                f"--out {args.out} exists and is not empty: pass --overwrite to replace it, or choose another folder"
            )
        return args.out
    stem = pathlib.Path("runs") / f"{args.command}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    folder, suffix = stem, 1
    while folder.exists():
        suffix += 1
        folder = stem.with_name(f"{stem.name}-{suffix}")
    return folder


def _group_name(group: Sequence[Any], seeds: int) -> str:
    """A progress bar's name: the run's label, with how many seeds and values run with it."""
    labels = list(dict.fromkeys(simulation.label for simulation in group))
    name = labels[0] if len(labels) == 1 else f"{labels[0]} +{len(labels) - 1} more"
    return name if seeds == 1 else f"{name}, {seeds} seeds"


def _progress_bar(name: str, rounds: int, disabled: bool) -> Callable[[int, list[dict[str, Any]]], None]:
    """A bar for runs that go on together: the first one's accuracies, and the mean upload."""
    from tqdm.auto import tqdm

    bar = tqdm(total=rounds, desc=f"{name:>26}", unit="round", disable=disabled, leave=True)
    uploaded = [0.0]

    def update(round_index: int, records: list[dict[str, Any]]) -> None:
        uploaded[0] += sum(record["upload_bytes"] for record in records) / len(records) / 1e6
        bar.set_postfix(  # pyright: ignore[reportUnknownMemberType]
            acc=f"{records[0]['global_accuracy']:.3f}",
            local=f"{records[0]['local_accuracy_mean']:.3f}",
            MB=f"{uploaded[0]:.2f}",
        )
        bar.update(1)
        if round_index == rounds:
            bar.close()

    return update


def main(argv: Sequence[str] | None = None) -> int:
    """The ``jaxlayerx`` command; returns its exit status (2 for a bad option, 130 when interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run_command(args)
    except (ValueError, KeyError, ImportError, OSError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"jaxlayerx {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\njaxlayerx {args.command}: interrupted; no run folder was written", file=sys.stderr)
        return 130
    return 0
