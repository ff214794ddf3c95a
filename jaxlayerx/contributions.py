"""What each client contributes to a server's average, read and checked: ``(payload,
num_examples)`` pairs, example counts, shapes consistent across clients, numeric and
finite values, a positive total weight. Errors name the client."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import numpy as np

from jaxlayerx import validation
from jaxlayerx.dtypes import dtype_kind


def read_results(
    results: Sequence[tuple[Any, int]], read: Callable[[Any], Any], weighted: bool
) -> Iterator[tuple[int, float, Any]]:
    """``(client, weight, read(payload))`` for each ``(payload, num_examples)`` of ``results``.

    The weight is the example count, or 1 when not ``weighted``. Errors of the results'
    shape, of an example count, or raised by ``read`` name the client.
    """
    if not isinstance(results, (list, tuple)):
        raise TypeError(f"results must be a list of (payload, num_examples), got {type(results).__name__}")
    for client, result in enumerate(results):
        if not isinstance(cast(object, result), (list, tuple)) or len(result) != 2:
            raise ValueError(f"client {client}: expected a (payload, num_examples) pair")
        payload, num_examples = result
        _check_num_examples(client, num_examples)
        try:
            read_payload = read(payload)
        except (ValueError, TypeError) as error:
            raise type(error)(f"client {client}: {error}") from error
        yield client, float(num_examples) if weighted else 1.0, read_payload


#: The largest number of examples a client may report: what a Flower message carries (uint64).
MAX_EXAMPLE_COUNT = 2**64 - 1
#: How the bound reads in error messages.
EXAMPLE_COUNT_RULE = "an integer >= 0 and at most 2**64 - 1"


def is_example_count(value: Any) -> bool:
    """Whether ``value`` can be a client's number of examples: an integer from 0 to
    :data:`MAX_EXAMPLE_COUNT`, not a bool (a larger count would make the float weights
    infinite)."""
    return _is_integer(value) and 0 <= value <= MAX_EXAMPLE_COUNT


def shown_count(value: Any) -> str:
    """``value`` for an error message: its ``repr``, or its bit length for an integer beyond
    :data:`MAX_EXAMPLE_COUNT` (whose digits may be too many to print)."""
    return f"a {value.bit_length()}-bit integer" if _is_integer(value) and value > MAX_EXAMPLE_COUNT else repr(value)


def _is_integer(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Integral)


def _check_num_examples(client: int, num_examples: Any) -> None:
    if not _is_integer(num_examples):
        raise TypeError(f"client {client}: num_examples must be an integer, got {num_examples!r}")
    if num_examples < 0:
        raise ValueError(f"client {client}: num_examples must be >= 0, got {num_examples}")


def check_consistent(
    name: str, sender: tuple[int, tuple[int, ...]], first_senders: dict[str, tuple[int, tuple[int, ...]]]
) -> None:
    """Checks a ``(client, shape)`` of layer ``name`` against its first sender's (recording
    it when it is the first). Dtypes may differ: they are promoted (:mod:`jaxlayerx.dtypes`).

    Raises:
      ValueError: shapes differ (naming both clients).
    """
    client, shape = sender
    first_client, first_shape = first_senders.setdefault(name, sender)
    if shape != first_shape:
        raise ValueError(
            f"layer {name!r} arrives with different shapes: client {first_client} sent "
            f"{first_shape}, client {client} sent {shape}"
        )


def check_numeric(client: int, name: str, dtype: np.dtype) -> None:
    """Raises ``TypeError`` unless ``dtype`` is boolean, integer or floating (naming the client)."""
    if dtype_kind(np.dtype(dtype)) not in ("bool", "int", "float"):
        raise TypeError(f"client {client}: layer {name!r} has dtype {dtype}, which cannot be averaged")


def check_finite(client: int, name: str, values: np.ndarray) -> None:
    """Raises ``ValueError`` if a floating ``values`` holds NaN or infinity (naming the client)."""
    try:
        validation.check_finite(name, values)
    except ValueError as error:
        raise ValueError(f"client {client}: {error}; pass allow_nonfinite=True to average it anyway") from None


def check_total_weight(name: str, weights: Sequence[float]) -> None:
    if math.fsum(weights) <= 0:
        raise ValueError(f"layer {name!r}: the clients that sent it have zero examples in total")
