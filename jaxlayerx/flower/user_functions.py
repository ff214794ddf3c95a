"""What both Flower clients do around the user's ``train_fn`` and ``evaluate_fn``: keep the
model as it was before training, and check what the functions return."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

import jax
import numpy as np
from flax import nnx

from jaxlayerx.contributions import is_example_count, shown_count


def snapshot(model: Any) -> Any:
    """A copy of ``model`` that later in-place updates do not reach.

    An ``nnx.Module`` is cloned; a pytree gets new containers around the same (immutable)
    arrays, so replacing a leaf of the trained model's dicts leaves the snapshot as it was.
    """
    if isinstance(model, nnx.Module):
        return nnx.clone(model)
    same: Callable[[Any], Any] = lambda leaf: leaf
    return jax.tree.map(same, model)


def checked_triple(result: Any, what: str, form: str) -> tuple[Any, int, dict[str, Any]]:
    """``result`` as ``(first, num_examples, metrics)``; ``TypeError`` naming ``what`` (the
    function) and ``form`` (what it must return) otherwise."""
    if not isinstance(cast(object, result), tuple) or len(result) != 3:
        raise TypeError(f"{what} must return {form}, got {type(result).__name__}")
    first, num_examples, metrics = result
    if not is_example_count(num_examples):
        raise TypeError(
            f"{what} must return an integer num_examples >= 0 and at most 2**64 - 1, got {shown_count(num_examples)}"
        )
    if not isinstance(cast(object, metrics), Mapping):
        raise TypeError(f"{what} must return a metrics dict, got {type(metrics).__name__}")
    return first, int(num_examples), dict(metrics)


def real_scalar(value: Any, what: str) -> float:
    """``value`` as a float: a Python or numpy real, or a 0-d numpy/JAX real array."""
    if np.ndim(value) == 0 and not isinstance(value, (bool, np.bool_)):
        dtype = np.asarray(value).dtype
        if dtype.kind in "iuf" or dtype.name == "bfloat16":
            return float(value)
    raise TypeError(f"evaluate_fn must return a real {what}, got {value!r}")
