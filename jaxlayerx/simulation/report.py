"""Writing a simulation run's folder: its config, metrics (JSON and CSV), plots, a summary.

A run's history is, per exchanger label, a list of per-round dicts with the keys of
``HISTORY_KEYS``: ``round`` (from 1), ``global_accuracy``, ``global_loss``,
``local_accuracy_mean``, ``local_accuracy`` (per sampled client; ``None`` for a client
without test examples), ``upload_bytes`` and ``download_bytes`` (all sampled clients, this
round), ``layers_sent`` (per sampled client) and ``wall_seconds``. With ``--repeat``, an
exchanger has one history per seed; the files then hold the mean over the seeds, and
``metrics.csv`` one row per seed.

The picture is accuracy against bytes: every exchanger's run as a line, its final point
marked, and the Pareto frontier of final accuracy against bytes drawn through the points
no other exchanger beats on both.
"""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, cast

import numpy as np

HISTORY_KEYS = (
    "round",
    "global_accuracy",
    "global_loss",
    "local_accuracy_mean",
    "local_accuracy",
    "upload_bytes",
    "download_bytes",
    "layers_sent",
    "wall_seconds",
)

CSV_COLUMNS = (
    "exchanger",
    "round",
    "global_accuracy",
    "global_loss",
    "local_accuracy_mean",
    "upload_bytes",
    "download_bytes",
    "cumulative_upload_mb",
    "layers_sent_mean",
    "wall_seconds",
)

#: The scalar metrics averaged over seeds.
_MEANS = ("global_accuracy", "global_loss", "local_accuracy_mean", "upload_bytes", "download_bytes", "wall_seconds")

History = list[dict[str, Any]]


def cumulative_upload_mb(history: Sequence[Mapping[str, Any]]) -> list[float]:
    """The running sum of ``upload_bytes`` over the rounds of ``history``, in MB (1e6 bytes)."""
    return _cumulative_mb(history, ("upload_bytes",))


def cumulative_total_mb(history: Sequence[Mapping[str, Any]]) -> list[float]:
    """The running sum of ``upload_bytes + download_bytes``, in MB."""
    return _cumulative_mb(history, ("upload_bytes", "download_bytes"))


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[bool]:
    """Which ``(cost, value)`` points no other point beats: none has a cost as low and a
    value as high, one of them strictly. NaN values are never on the frontier."""
    flags: list[bool] = []
    for cost, value in points:
        beaten = math.isnan(value) or any(
            other_cost <= cost and other_value >= value and (other_cost < cost or other_value > value)
            for other_cost, other_value in points
            if not math.isnan(other_value)
        )
        flags.append(not beaten)
    return flags


def seed_histories(run: Sequence[Any]) -> list[History]:
    """One exchanger's runs: a history (a list of records) is one seed's, a list of
    histories is one per seed."""
    if run and not isinstance(run[0], Mapping):
        return [list(history) for history in run]
    return [list(run)]


def mean_history(runs: Sequence[History]) -> History:
    """The seeds' histories as one: each record of the first seed, its scalar metrics
    replaced by their mean over the seeds, plus ``by_seed`` (``metric -> value per seed``)
    when there are several."""
    if len(runs) == 1:
        return runs[0]
    merged: History = []
    for records in zip(*runs, strict=True):
        record = dict(records[0])
        by_seed = {key: [r[key] for r in records] for key in _MEANS}
        record.update({key: _mean(values) for key, values in by_seed.items()})
        record["by_seed"] = by_seed
        merged.append(record)
    return merged


def write_run(
    folder: str | os.PathLike[str],
    config: Mapping[str, Any],
    runs: Mapping[str, Sequence[Any]],
    notes: Mapping[str, str] | None = None,
) -> dict[str, pathlib.Path]:
    """Writes a run's folder (created with its parents if missing).

    Files: ``config.json`` (``config``, indent 2, sorted keys); ``metrics.json``
    (``{exchanger: history}``, the mean over seeds with ``--repeat``); ``metrics.csv`` (one
    row per exchanger, seed and round, columns ``CSV_COLUMNS`` and, with several seeds,
    ``seed``; per-client lists are left out, ``layers_sent`` enters as its mean);
    ``plot.png`` (global and mean local test accuracy against cumulative MB uploaded) and
    ``plot_total.png`` (the same against MB uploaded and downloaded), each with the final
    points and the Pareto frontier. Numpy scalars and arrays are written as plain JSON.

    Args:
      folder: the run's folder.
      config: the run's settings; ``num_clients``, ``rounds`` and ``data``, if there,
        title the plots; ``seeds``, if there, names the seeds of the CSV rows.
      runs: per exchanger label, its history, or a list of histories (one per seed).
      notes: per exchanger label, a note for its legend entry (``personalized``).

    Returns:
      ``{"config", "metrics_json", "metrics_csv", "plot", "plot_total"}`` -> the written paths.

    Raises:
      ValueError: a record lacks one of ``HISTORY_KEYS``; seeds of one exchanger with
        different numbers of rounds.
      ImportError: matplotlib is not installed.
    """
    seeds = {label: seed_histories(run) for label, run in runs.items()}
    _check_histories(seeds)
    means = {label: mean_history(histories) for label, histories in seeds.items()}
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "config": folder / "config.json",
        "metrics_json": folder / "metrics.json",
        "metrics_csv": folder / "metrics.csv",
        "plot": folder / "plot.png",
        "plot_total": folder / "plot_total.png",
    }
    paths["config"].write_text(json.dumps(dict(config), indent=2, sort_keys=True, default=_jsonable) + "\n")
    paths["metrics_json"].write_text(json.dumps(means, indent=2, default=_jsonable) + "\n")
    _write_csv(paths["metrics_csv"], seeds, config.get("seeds"))
    _write_plot(paths["plot"], config, seeds, notes or {}, cumulative_upload_mb, "cumulative upload (MB)")
    _write_plot(
        paths["plot_total"], config, seeds, notes or {}, cumulative_total_mb, "cumulative upload + download (MB)"
    )
    return paths


def summary_table(runs: Mapping[str, Sequence[Any]], notes: Mapping[str, str] | None = None) -> str:
    """A fixed-width text table, one row per exchanger, sorted by MB uploaded.

    Columns: final global accuracy, final mean local accuracy (``± std`` over seeds with
    several), total MB uploaded and downloaded, mean layers sent per client in the last
    round, total wall seconds, ``frontier`` (``global``, ``local``: on the Pareto frontier
    of that final accuracy against MB uploaded) and ``note`` (from ``notes``). An exchanger
    with no rounds gets ``-`` throughout.
    """
    notes = notes or {}
    summaries = {label: _summary(seed_histories(run)) for label, run in runs.items()}
    done = [label for label, summary in summaries.items() if summary is not None]
    on_frontier: dict[str, list[str]] = {label: [] for label in summaries}
    for metric in ("global", "local"):
        finished = [cast("dict[str, Any]", summaries[label]) for label in done]  # the summaries that are not None
        points = [(summary["up"], summary[metric][0]) for summary in finished]
        for label, flag in zip(done, pareto_frontier(points)):
            if flag:
                on_frontier[label].append(metric)
    header = ("exchanger", "global_acc", "local_acc", "up_MB", "down_MB", "layers_sent", "wall_s", "frontier", "note")
    rows: list[tuple[str, ...]] = [header]
    for label in sorted(summaries, key=lambda label: _upload_key(summaries[label])):
        summary = summaries[label]
        if summary is None:
            rows.append((label, *("-" for _ in header[1:-1]), notes.get(label, "")))
            continue
        rows.append(
            (
                label,
                _accuracy(summary["global"]),
                _accuracy(summary["local"]),
                f"{summary['up']:.2f}",
                f"{summary['down']:.2f}",
                f"{summary['layers']:.1f}",
                f"{summary['wall']:.1f}",
                ",".join(on_frontier[label]) or "-",
                notes.get(label, ""),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            [
                row[0].ljust(widths[0]),
                *(cell.rjust(w) for cell, w in zip(row[1:-2], widths[1:-2])),
                *(cell.ljust(w) for cell, w in zip(row[-2:], widths[-2:])),
            ]
        )
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def takeaway(
    runs: Mapping[str, Sequence[Any]],
    exclude: Collection[str] = (),
    *,
    baseline: str = "full",
    within: float = 0.01,
) -> str | None:
    """One line that says which exchanger to pick, computed from the run: the one that
    uploads least while its final global accuracy is within ``within`` of ``baseline``'s,
    with its accuracy and its share of ``baseline``'s upload; else the most accurate one,
    and how close it came. Exchangers in ``exclude`` (personalized ones: their global model
    is not meant to be used alone) are left out. ``None`` without ``baseline`` or
    another exchanger.
    """
    summaries = {label: _summary(seed_histories(run)) for label, run in runs.items()}
    base = summaries.get(baseline)
    others = {
        label: summary
        for label, summary in summaries.items()
        if label != baseline and summary is not None and label not in exclude
    }
    if base is None or not others:
        return None
    accuracy = base["global"][0]
    close = {label: summary for label, summary in others.items() if summary["global"][0] >= accuracy - within}
    if close:
        label = min(close, key=lambda label: (close[label]["up"], -close[label]["global"][0]))
        share = close[label]["up"] / base["up"] if base["up"] else math.nan
        return (
            f"{label}: {close[label]['global'][0]:.3f} global accuracy ({baseline} {accuracy:.3f}) "
            f"for {share:.0%} of {baseline}'s upload"
        )
    label = max(others, key=lambda label: others[label]["global"][0])
    return (
        f"no exchanger came within {within * 100:g} point{'s' if within != 0.01 else ''} of {baseline}'s "
        f"{accuracy:.3f} global accuracy; the closest, {label}, reached {others[label]['global'][0]:.3f}"
    )


def _summary(runs: list[History]) -> dict[str, Any] | None:
    """Final accuracies (mean, std over seeds), MB up and down, last layers sent, wall time."""
    if not runs or not runs[0]:
        return None
    finals = [history[-1] for history in runs]
    return {
        "global": _mean_std([float(r["global_accuracy"]) for r in finals]),
        "local": _mean_std([float(r["local_accuracy_mean"]) for r in finals]),
        "up": _mean([cumulative_upload_mb(history)[-1] for history in runs]),
        "down": _mean([sum(int(r["download_bytes"]) for r in history) / 1e6 for history in runs]),
        "layers": _mean([_mean(r["layers_sent"]) for r in finals]),
        "wall": _mean([sum(float(r["wall_seconds"]) for r in history) for history in runs]),
        "seeds": len(runs),
    }


def _upload_key(summary: dict[str, Any] | None) -> float:
    return math.inf if summary is None else summary["up"]


def _accuracy(mean_std: tuple[float, float]) -> str:
    mean, std = mean_std
    return f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f}±{std:.3f}"


def _mean_std(values: list[float]) -> tuple[float, float]:
    """The mean, and the sample standard deviation (NaN for a single value)."""
    array = np.asarray(values, np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else float("nan")


def _cumulative_mb(history: Sequence[Mapping[str, Any]], keys: tuple[str, ...]) -> list[float]:
    total = 0
    sums: list[float] = []
    for record in history:
        total += sum(int(record[key]) for key in keys)
        sums.append(total / 1e6)
    return sums


def _check_histories(runs: Mapping[str, list[History]]) -> None:
    for name, histories in runs.items():
        for history in histories:
            for index, record in enumerate(history):
                missing = [key for key in HISTORY_KEYS if key not in record]
                if missing:
                    raise ValueError(f"history of {name!r}, record {index}: missing keys {missing}")
        if len({len(history) for history in histories}) > 1:
            raise ValueError(f"the seeds of {name!r} ran different numbers of rounds")


def _mean(values: Any) -> float:
    values = np.asarray([np.nan if value is None else value for value in values], dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def _jsonable(value: Any) -> Any:
    """``json.dumps``'s fallback: numpy values as Python ones, paths as strings."""
    if isinstance(value, (np.generic, np.ndarray)):
        return cast("np.generic[Any] | np.ndarray", value).tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(cast("os.PathLike[Any]", value))
    raise TypeError(f"cannot write a {type(value).__name__} as JSON: {value!r}")


def _write_csv(path: pathlib.Path, runs: Mapping[str, list[History]], seeds: Sequence[int] | None) -> None:
    several = any(len(histories) > 1 for histories in runs.values())
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(CSV_COLUMNS + (("seed",) if several else ()))
        for name, histories in runs.items():
            for index, history in enumerate(histories):
                seed = (seeds[index] if seeds is not None and index < len(seeds) else index,) if several else ()
                for record, cumulative in zip(history, cumulative_upload_mb(history)):
                    writer.writerow(
                        [
                            name,
                            int(record["round"]),
                            float(record["global_accuracy"]),
                            float(record["global_loss"]),
                            float(record["local_accuracy_mean"]),
                            int(record["upload_bytes"]),
                            int(record["download_bytes"]),
                            cumulative,
                            _mean(record["layers_sent"]),
                            float(record["wall_seconds"]),
                            *seed,
                        ]
                    )


def _write_plot(
    path: pathlib.Path,
    config: Mapping[str, Any],
    runs: Mapping[str, list[History]],
    notes: Mapping[str, str],
    megabytes_of: Callable[[History], list[float]],
    x_label: str,
) -> None:
    """Two panels, global and mean local test accuracy against cumulative MB; each line the
    mean over seeds (a band from the lowest to the highest seed when several), its final
    point marked, and the Pareto frontier of the final points dashed.

    Uses matplotlib's object API (no pyplot), so the global backend is left alone.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("plotting a run needs matplotlib: pip install 'jaxlayerx[demo]'") from error
    figure = Figure(figsize=(12, 5), layout="constrained")
    panels = figure.subplots(1, 2)
    for axes, key, what in zip(
        panels, ("global_accuracy", "local_accuracy_mean"), ("global test accuracy", "mean local test accuracy")
    ):
        finals: list[tuple[float, float]] = []
        for name, histories in runs.items():
            if not histories or not histories[0]:
                continue
            megabytes = np.mean([megabytes_of(history) for history in histories], axis=0)
            values = np.array([[np.nan if r[key] is None else float(r[key]) for r in history] for history in histories])
            mean = np.nanmean(values, axis=0) if not np.all(np.isnan(values)) else values[0]
            label = f"{name} ({notes[name]})" if name in notes else name
            (line,) = axes.plot(megabytes, mean, marker="o", markersize=3, linewidth=1.2, label=label)
            if len(histories) > 1:
                axes.fill_between(
                    megabytes, np.nanmin(values, axis=0), np.nanmax(values, axis=0), color=line.get_color(), alpha=0.15
                )
            axes.plot(megabytes[-1:], mean[-1:], marker="*", markersize=12, color=line.get_color(), linestyle="none")
            finals.append((float(megabytes[-1]), float(mean[-1])))
        frontier = sorted(point for point, flag in zip(finals, pareto_frontier(finals)) if flag)
        if frontier:
            axes.plot(
                *zip(*frontier),
                linestyle="--",
                color="0.35",
                linewidth=1,
                drawstyle="steps-post",
                label="Pareto frontier",
            )
        axes.set_xlabel(x_label)
        axes.set_ylabel(what)
        axes.set_title(what.capitalize())
        axes.grid(True, alpha=0.3)
        if finals:
            axes.legend(fontsize="small")
    figure.suptitle(_plot_title(config))  # pyright: ignore[reportUnknownMemberType]
    figure.savefig(path, dpi=120)  # pyright: ignore[reportUnknownMemberType]


def _plot_title(config: Mapping[str, Any]) -> str:
    parts: list[str] = []
    if "data" in config:
        parts.append(str(config["data"]))
    if "num_clients" in config:
        sampled = config.get("clients_per_round")
        parts.append(f"{config['num_clients']} clients" + (f", {sampled} a round" if sampled else ""))
    if "rounds" in config:
        parts.append(f"{config['rounds']} rounds")
    if len(config.get("seeds", ())) > 1:
        parts.append(f"{len(config['seeds'])} seeds")
    return "Federated run" + (": " + ", ".join(parts) if parts else "")
