"""Timing helpers: medians after warm-up, and this machine's floors."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in seconds; jax outputs are waited for."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def read_floor(nbytes: int, repeats: int) -> float:
    """Best time to read ``nbytes`` of float32 once (two halves dotted together, BLAS)."""
    half = max(nbytes // 8, 1)
    a, b = np.ones(half, np.float32), np.ones(half, np.float32)
    return min(median_time(lambda: np.dot(a, b), repeats) for _ in range(3))


def matmul_rate(repeats: int, size: int = 2048) -> float:
    """FLOP/s of one large float32 matmul: this machine's compute ceiling, in practice."""
    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    return 2 * size**3 / min(median_time(lambda: matmul(a, a), repeats) for _ in range(3))


def row(case: str, seconds: float, floor: float, baseline: float) -> dict[str, object]:
    """One table row: the time, its floor, the baseline, and the two ratios."""
    return {
        "case": case,
        "ms": seconds * 1e3,
        "floor_ms": floor * 1e3,
        "x_floor": seconds / floor,
        "baseline_ms": baseline * 1e3,
        "speedup_vs_baseline": baseline / seconds,
    }
