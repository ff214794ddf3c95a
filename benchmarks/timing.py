"""Timing helpers: medians after warm-up, and this machine's floors."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

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
    """Best time to read ``nbytes`` of float32 once, with one core or both.

    One core: two halves dotted together (BLAS). Both cores: each of two threads dots its
    own quarter pair (numpy releases the GIL), so the floor is the machine's, not one core's.
    """
    half = max(nbytes // 8, 1)
    a, b = np.ones(half, np.float32), np.ones(half, np.float32)
    quarter = max(half // 2, 1)
    with ThreadPoolExecutor(2) as pool:

        def both_cores() -> None:
            other = pool.submit(np.dot, a[quarter:], b[quarter:])
            np.dot(a[:quarter], b[:quarter])
            other.result()

        return min(min(median_time(lambda: np.dot(a, b), repeats), median_time(both_cores, repeats)) for _ in range(3))


def matmul_rate(repeats: int, size: int = 2048) -> float:
    """FLOP/s of one large float32 matmul: this machine's compute ceiling, in practice."""
    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    return 2 * size**3 / min(median_time(lambda: matmul(a, a), repeats) for _ in range(3))


def row(case: str, seconds: float, floor: float, baseline: float, jax_loop: float | None = None) -> dict[str, object]:
    """One table row: the time, its floor, the baseline (the reference's algorithm, see
    :mod:`benchmarks.reference`), the two ratios, and optionally a per-layer JAX loop's time."""
    return {
        "case": case,
        "ms": seconds * 1e3,
        "floor_ms": floor * 1e3,
        "x_floor": seconds / floor,
        "baseline_ms": baseline * 1e3,
        "speedup_vs_baseline": baseline / seconds,
        "jax_loop_ms": None if jax_loop is None else jax_loop * 1e3,
    }
