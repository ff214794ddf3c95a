"""Aggregating the metrics that clients report to a Flower strategy."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from flwr.app import MetricRecord, RecordDict

Scalar = bool | bytes | float | int | str


def weighted_metrics_average(results: Sequence[tuple[int, Mapping[str, Scalar]]]) -> dict[str, Scalar]:
    """The example-weighted mean of every numeric metric over the clients that report it.

    Args:
      results: one ``(num_examples, metrics)`` pair per client (Flower's
        ``MetricsAggregationFn`` input).

    Returns:
      ``name -> sum(n_i * m_i) / sum(n_i)`` over the clients reporting ``name``, for every
      int or float metric (booleans, strings and bytes are skipped). A metric whose
      reporters have no examples at all gets their plain mean.
    """
    sums: dict[str, float] = {}
    totals: dict[str, float] = {}
    plain: dict[str, list[float]] = {}
    for num_examples, metrics in results:
        for name, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                continue
            sums[name] = sums.get(name, 0.0) + num_examples * float(value)
            totals[name] = totals.get(name, 0.0) + num_examples
            plain.setdefault(name, []).append(float(value))
    return {
        name: sums[name] / totals[name] if totals[name] > 0 else sum(plain[name]) / len(plain[name])
        for name in sorted(sums)
    }


def agreeing_metrics(contents: Sequence[RecordDict], keep: str) -> tuple[list[RecordDict], list[str]]:
    """The replies' metric records without the keys that cannot be averaged across them, and
    those keys, sorted: a key holding a number in one reply and a list in another, lists of
    different lengths, or a number too large for a float. ``keep`` (the example count) stays.
    """
    kinds: dict[str, set[int | None]] = {}
    unusable: set[str] = set()
    for content in contents:
        for record in content.metric_records.values():
            for key, value in record.items():
                kinds.setdefault(key, set()).add(len(value) if isinstance(value, list) else None)
                if not all(_float_sized(v) for v in (value if isinstance(value, list) else [value])):
                    unusable.add(key)
    dropped = sorted(key for key, kind in kinds.items() if key != keep and (len(kind) > 1 or key in unusable))
    if not dropped:
        return list(contents), []
    kept = [
        RecordDict(
            {
                name: MetricRecord({key: value for key, value in record.items() if key not in dropped})
                for name, record in content.metric_records.items()
            }
        )
        for content in contents
    ]
    return kept, dropped


def _float_sized(value: Any) -> bool:
    """Whether ``value`` converts to a float (an integer below 2**1024)."""
    return not isinstance(value, int) or value.bit_length() <= 1024 - 1
