"""Writing a simulation run's folder: its config, metrics (JSON and CSV), a plot, a summary.

A run's history is, per exchanger name, a list of per-round dicts with the keys of
``HISTORY_KEYS``: ``round`` (from 1), ``global_accuracy``, ``global_loss``,
``local_accuracy_mean``, ``local_accuracy`` (per client), ``upload_bytes`` and
``download_bytes`` (all clients, this round), ``layers_sent`` (per client) and
``wall_seconds``.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

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


def cumulative_upload_mb(history: list[dict]) -> list[float]:
    """The running sum of ``upload_bytes`` over the rounds of ``history``, in MB (1e6 bytes)."""
    total, sums = 0, []
    for record in history:
        total += int(record["upload_bytes"])
        sums.append(total / 1e6)
    return sums


def write_run(
    folder: str | os.PathLike, config: dict, histories: dict[str, list[dict]]
) -> dict[str, pathlib.Path]:
    """Writes a run's folder (created with its parents if missing).

    Files: ``config.json`` (``config``, indent 2, sorted keys); ``metrics.json``
    (``{exchanger: history}``); ``metrics.csv`` (one row per exchanger and round, columns
    ``CSV_COLUMNS``; per-client lists are left out, ``layers_sent`` enters as its mean);
    ``plot.png`` (global and mean local test accuracy against cumulative MB uploaded, one
    line per exchanger). Numpy scalars and arrays are written as plain JSON numbers and lists.

    Args:
      folder: the run's folder.
      config: the run's settings; ``num_clients`` and ``rounds``, if there, title the plot.
      histories: per exchanger name, its per-round records.

    Returns:
      ``{"config", "metrics_json", "metrics_csv", "plot"}`` -> the written paths.

    Raises:
      ValueError: a record lacks one of ``HISTORY_KEYS``.
      ImportError: matplotlib is not installed.
    """
    _check_histories(histories)
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "config": folder / "config.json",
        "metrics_json": folder / "metrics.json",
        "metrics_csv": folder / "metrics.csv",
        "plot": folder / "plot.png",
    }
    paths["config"].write_text(json.dumps(config, indent=2, sort_keys=True, default=_jsonable) + "\n")
    paths["metrics_json"].write_text(json.dumps(histories, indent=2, default=_jsonable) + "\n")
    _write_csv(paths["metrics_csv"], histories)
    _write_plot(paths["plot"], config, histories)
    return paths


def summary_table(histories: dict[str, list[dict]]) -> str:
    """A fixed-width text table, one row per exchanger.

    Columns: final global accuracy, final mean local accuracy, total MB uploaded and
    downloaded, mean layers sent per client in the last round, total wall seconds. An
    exchanger with no rounds gets ``-`` throughout.
    """
    header = ("exchanger", "global_acc", "local_acc", "up_MB", "down_MB", "layers_sent", "wall_s")
    rows = [header]
    for name, history in histories.items():
        if not history:
            rows.append((name, *("-" for _ in header[1:])))
            continue
        last = history[-1]
        rows.append((
            name,
            f"{float(last['global_accuracy']):.3f}",
            f"{float(last['local_accuracy_mean']):.3f}",
            f"{sum(int(r['upload_bytes']) for r in history) / 1e6:.2f}",
            f"{sum(int(r['download_bytes']) for r in history) / 1e6:.2f}",
            f"{_mean(last['layers_sent']):.1f}",
            f"{sum(float(r['wall_seconds']) for r in history):.1f}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join([row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])])
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def _check_histories(histories: Mapping[str, list[dict]]) -> None:
    for name, history in histories.items():
        for index, record in enumerate(history):
            missing = [key for key in HISTORY_KEYS if key not in record]
            if missing:
                raise ValueError(f"history of {name!r}, record {index}: missing keys {missing}")


def _mean(values: Any) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()) if values.size else float("nan")


def _jsonable(value: Any) -> Any:
    """``json.dumps``'s fallback: numpy values as Python ones, paths as strings."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cannot write a {type(value).__name__} as JSON: {value!r}")


def _write_csv(path: pathlib.Path, histories: Mapping[str, list[dict]]) -> None:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(CSV_COLUMNS)
        for name, history in histories.items():
            for record, cumulative in zip(history, cumulative_upload_mb(history)):
                writer.writerow([
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
                ])


def _write_plot(path: pathlib.Path, config: Mapping[str, Any], histories: Mapping[str, list[dict]]) -> None:
    """Two panels, global and mean local test accuracy against cumulative MB uploaded.

    Uses matplotlib's object API (no pyplot), so the global backend is left alone.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("plotting a run needs matplotlib: pip install 'jaxlayerx[demo]'") from error
    figure = Figure(figsize=(11, 4.5), layout="constrained")
    global_axes, local_axes = figure.subplots(1, 2)
    for name, history in histories.items():
        megabytes = cumulative_upload_mb(history)
        global_axes.plot(megabytes, [r["global_accuracy"] for r in history], marker="o", markersize=4, label=name)
        local_axes.plot(megabytes, [r["local_accuracy_mean"] for r in history], marker="o", markersize=4, label=name)
    for axes, what in ((global_axes, "global test accuracy"), (local_axes, "mean local test accuracy")):
        axes.set_xlabel("cumulative upload (MB)")
        axes.set_ylabel(what)
        axes.set_title(what.capitalize())
        axes.grid(True, alpha=0.3)
        if histories:
            axes.legend()
    figure.suptitle(_plot_title(config))
    figure.savefig(path, dpi=120)


def _plot_title(config: Mapping[str, Any]) -> str:
    parts = []
    if "num_clients" in config:
        parts.append(f"{config['num_clients']} clients")
    if "rounds" in config:
        parts.append(f"{config['rounds']} rounds")
    return "Federated run" + (": " + ", ".join(parts) if parts else "")
