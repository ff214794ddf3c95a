"""Aggregating the metrics that clients report to a Flower strategy."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence

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
