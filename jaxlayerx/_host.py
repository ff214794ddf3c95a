"""Moving arrays to host memory: transfers started together, CPU arrays read in place."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np


def to_numpy(arrays: Iterable[Any]) -> list[np.ndarray]:
    """``arrays`` as numpy arrays in their own dtypes.

    Transfers from accelerators are all started before the first is waited for; arrays
    already in host memory (the CPU backend) are read in place, as read-only views.
    """
    arrays = list(arrays)
    if not _only_cpu_devices():
        for array in arrays:
            if isinstance(array, jax.Array) and not in_host_memory(array):
                array.copy_to_host_async()
    return [np.asarray(array) for array in arrays]


@functools.lru_cache(maxsize=1)
def _only_cpu_devices() -> bool:
    """Whether every device JAX can place arrays on is the host CPU."""
    return all(device.platform == "cpu" for device in jax.devices())


def in_host_memory(array: jax.Array) -> bool:
    """Whether every shard of ``array`` lives in host memory (the CPU backend)."""
    return all(device.platform == "cpu" for device in array.sharding.device_set)
