"""Client data for a federated simulation: label skew, feature shift, per-client test sets.

Examples are split across clients by label with a Dirichlet draw per class (small
``beta``: each client sees few classes; large ``beta``: every client sees the global mix),
or uniformly at random (``beta=None``: IID). Each client then holds out test examples: a
share of its own, or, for a data set with its own test split, its share of that split,
cut with the same per-class proportions as its training examples. With ``shift``, each
client sees its examples through its own transform (:mod:`jaxlayerx.simulation.shift`).
The per-client arrays are stacked on a leading client axis and zero-padded to the largest
client, for ``jax.vmap``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import cast

import numpy as np

from jaxlayerx.simulation.datasets import load_digits_data
from jaxlayerx.simulation.shift import apply_shift, draw_shift

#: How many Dirichlet draws ``dirichlet_label_split`` tries before giving up on ``min_size``.
MAX_SPLIT_TRIES = 100

__all__ = ["MAX_SPLIT_TRIES", "ClientData", "dirichlet_label_split", "load_digits_data", "make_client_data"]


def dirichlet_label_split(
    labels: np.ndarray, num_clients: int, beta: float, seed: int, min_size: int = 2
) -> list[np.ndarray]:
    """Splits example indices across clients, non-IID by label.

    For each class, the class's indices are shuffled and cut among the clients in
    proportions drawn from ``Dirichlet(beta * ones(num_clients))``. The whole draw is
    repeated (same generator, at most ``MAX_SPLIT_TRIES`` times) until every client holds
    at least ``min_size`` examples.

    Args:
      labels: 1-D array of class labels, one per example.
      num_clients: number of clients, at least 1.
      beta: Dirichlet concentration, positive and finite; smaller is more skewed.
      seed: seed of ``np.random.default_rng``; the split is a function of it.
      min_size: the fewest examples a client may hold.

    Returns:
      One sorted int64 index array per client; disjoint, and together every index.

    Raises:
      ValueError: ``labels`` is not 1-D; ``num_clients < 1``; ``beta`` is not positive and
        finite; ``min_size < 0``; ``num_clients * min_size > len(labels)``; no draw gave
        every client ``min_size`` examples.
    """
    return _label_split(np.asarray(labels), None, num_clients, beta, seed, min_size)[0]


def _label_split(
    labels: np.ndarray, test_labels: np.ndarray | None, num_clients: int, beta: float, seed: int, min_size: int
) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """The Dirichlet split of ``labels``, and of ``test_labels`` with the same per-class proportions."""
    _check_split_args(labels, num_clients, beta, min_size)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels if test_labels is None else np.concatenate([labels, test_labels]))
    class_indices = [np.flatnonzero(labels == label) for label in classes]
    test_indices = None if test_labels is None else [np.flatnonzero(test_labels == label) for label in classes]
    sizes: list[int] = []  # bound by the first draw (MAX_SPLIT_TRIES >= 1)
    for _ in range(MAX_SPLIT_TRIES):
        clients, proportions = _draw_split(class_indices, num_clients, beta, rng)
        sizes = [len(indices) for indices in clients]
        if min(sizes) >= min_size:
            return clients, None if test_indices is None else _cut(test_indices, proportions, rng)
    smallest = int(np.argmin(sizes))
    raise ValueError(
        f"client {smallest} has {sizes[smallest]} examples, fewer than min_size={min_size}, "
        f"after {MAX_SPLIT_TRIES} Dirichlet draws (beta={beta}, {num_clients} clients, "
        f"{len(labels)} examples): use a larger beta or fewer clients"
    )


def _iid_split(count: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A uniformly random partition of ``range(count)`` into near-equal parts."""
    return [np.sort(part).astype(np.int64) for part in np.array_split(rng.permutation(count), num_clients)]


def _check_split_args(labels: np.ndarray, num_clients: int, beta: float, min_size: int) -> None:
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {labels.shape}")
    if num_clients < 1:
        raise ValueError(f"num_clients must be at least 1, got {num_clients}")
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be positive and finite, got {beta}")
    if min_size < 0:
        raise ValueError(f"min_size must be at least 0, got {min_size}")
    if num_clients * min_size > len(labels):
        raise ValueError(
            f"more clients than samples: {num_clients} clients x min_size={min_size} "
            f"need {num_clients * min_size} examples, but there are {len(labels)}"
        )


def _draw_split(
    class_indices: list[np.ndarray], num_clients: int, beta: float, rng: np.random.Generator
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """One Dirichlet draw per class: the class's shuffled indices cut in those proportions.
    Returns the clients' indices and the proportions of each class."""
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    proportions: list[np.ndarray] = []
    for indices in class_indices:
        indices = rng.permutation(indices)
        proportions.append(rng.dirichlet(np.full(num_clients, beta)))
        _deal(indices, proportions[-1], parts)
    return _joined(parts), proportions


def _cut(class_indices: list[np.ndarray], proportions: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """Each class's shuffled indices cut among the clients in the given proportions."""
    parts: list[list[np.ndarray]] = [[] for _ in range(len(proportions[0]))]
    for indices, shares in zip(class_indices, proportions):
        _deal(rng.permutation(indices), shares, parts)
    return _joined(parts)


def _deal(indices: np.ndarray, shares: np.ndarray, parts: list[list[np.ndarray]]) -> None:
    """Appends to each client its cut of ``indices`` (cut points rounded to the nearest index)."""
    cuts = np.round(np.cumsum(shares)[:-1] * len(indices)).astype(np.int64)
    for client, chunk in enumerate(np.split(indices, cuts)):
        parts[client].append(chunk)


def _joined(parts: list[list[np.ndarray]]) -> list[np.ndarray]:
    return [np.sort(np.concatenate(chunks)).astype(np.int64) for chunks in parts]


@dataclasses.dataclass(frozen=True)
class ClientData:
    """Per-client train/test arrays stacked on a leading client axis and zero-padded to
    the largest client, for ``jax.vmap``.

    Attributes:
      x_train: ``(C, max_train, *feature_shape)`` float32; zero rows beyond ``n_train[c]``.
      y_train: ``(C, max_train)`` int32; 0 beyond ``n_train[c]``.
      n_train: ``(C,)`` int32, each client's number of real train examples.
      x_test, y_test, n_test: the same for the test examples.
      x_global_test: every client's real test examples concatenated in client order
        (no padding), ``(sum(n_test), *feature_shape)`` float32.
      y_global_test: their labels, int32.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    n_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_test: np.ndarray
    x_global_test: np.ndarray
    y_global_test: np.ndarray

    @property
    def num_clients(self) -> int:
        """The number of clients ``C``."""
        return int(self.n_train.shape[0])


def make_client_data(
    x: np.ndarray,
    y: np.ndarray,
    num_clients: int,
    beta: float | None = 0.5,
    seed: int = 0,
    test_fraction: float = 0.2,
    *,
    x_test: np.ndarray | None = None,
    y_test: np.ndarray | None = None,
    shift: bool = False,
) -> ClientData:
    """Splits ``(x, y)`` across clients, each client with its own train and test examples.

    Client ``c`` holds the examples ``dirichlet_label_split(y, num_clients, beta, seed)[c]``
    (at least 2 each), or with ``beta=None`` a uniformly random share (IID). Without a test
    split, its examples are shuffled (seeded) and the last ``round(test_fraction * n)`` of
    them, clamped to ``[1, n - 1]``, are its test examples. With one (``x_test``,
    ``y_test``), its test examples are its share of that split, cut with the same per-class
    proportions as its training examples (a client may get none: its local accuracy is then
    left out). The global test set is every client's test examples together.

    Args:
      x: ``(N, *feature_shape)`` features, cast to float32.
      y: ``(N,)`` integer labels, cast to int32.
      num_clients: number of clients.
      beta: Dirichlet concentration of the label split; ``None`` for an IID split.
      seed: seed of the split, the shuffles and the shifts.
      test_fraction: without a test split, the share of each client's examples held out.
      x_test: the features of the data set's own test split, or ``None``.
      y_test: the labels of the data set's own test split, or ``None``.
      shift: give every client its own feature shift (:mod:`jaxlayerx.simulation.shift`).

    Returns:
      The padded, stacked ``ClientData``.

    Raises:
      ValueError: ``x`` and ``y`` (or ``x_test`` and ``y_test``) differ in length (or one
        is a scalar); labels that are not integers; ``test_fraction`` not in ``(0, 1)``;
        only one of ``x_test``/``y_test``; any error of ``dirichlet_label_split``.
    """
    x, y = _checked_examples(x, y, "x", "y")
    if (x_test is None) != (y_test is None):
        raise ValueError("x_test and y_test come together: give both or neither")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if x_test is not None:
        x_test, y_test = _checked_examples(x_test, cast(np.ndarray, y_test), "x_test", "y_test")  # both or neither
        if x_test.shape[1:] != x.shape[1:]:
            raise ValueError(f"x_test examples have shape {x_test.shape[1:]}, x examples {x.shape[1:]}")
    if beta is None:
        _check_split_args(y, num_clients, 1.0, 2)
        rng = np.random.default_rng(seed)
        clients = _iid_split(len(y), num_clients, rng)
        held_out = None if y_test is None else _iid_split(len(y_test), num_clients, rng)
    else:
        clients, held_out = _label_split(y, y_test, num_clients, beta, seed, min_size=2)
    if held_out is None:
        x_test, y_test = x, y
        clients, held_out = _hold_out(clients, test_fraction, seed)
    x_train, y_train, n_train = _stack_padded(x, y, clients)
    # x_test and y_test are set: given, or the examples themselves when held out of them
    x_held, y_held, n_test = _stack_padded(cast(np.ndarray, x_test), cast(np.ndarray, y_test), held_out)
    if shift:
        x_train, x_held = (
            _shifted(stack, counts, x, seed, part)
            for part, (stack, counts) in enumerate(((x_train, n_train), (x_held, n_test)))
        )
    x_global = np.concatenate([x_held[c, : n_test[c]] for c in range(num_clients)])
    y_global = np.concatenate([y_held[c, : n_test[c]] for c in range(num_clients)])
    return ClientData(x_train, y_train, n_train, x_held, y_held, n_test, x_global, y_global)


def _checked_examples(x: np.ndarray, y: np.ndarray, x_name: str, y_name: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim < 1 or y.ndim < 1 or len(x) != len(y):
        raise ValueError(f"{x_name} and {y_name} must have the same length, got shapes {x.shape} and {y.shape}")
    if len(x) == 0:
        raise ValueError(f"{x_name} holds no examples")
    if y.ndim == 1 and y.dtype.kind not in "iu":
        raise ValueError(f"{y_name} must hold integer labels, got dtype {y.dtype}")
    return x.astype(np.float32, copy=False), y.astype(np.int32, copy=False)


def _hold_out(clients: list[np.ndarray], test_fraction: float, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each client's examples, shuffled, split into train and the last ``test_fraction``."""
    rng = np.random.default_rng([seed, 1])  # a stream apart from the split's
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for indices in clients:
        indices = rng.permutation(indices)
        n_test = min(max(round(test_fraction * len(indices)), 1), len(indices) - 1)
        train.append(indices[: len(indices) - n_test])
        test.append(indices[len(indices) - n_test :])
    return train, test


def _shifted(stacked: np.ndarray, counts: np.ndarray, x: np.ndarray, seed: int, part: int) -> np.ndarray:
    """Every client's real rows of ``stacked`` through its own shift (padding stays zero);
    the noise of ``part`` (train 0, test 1) drawn from ``default_rng([seed, 4, client, part])``."""
    mean, std = float(x.mean()), float(x.std()) or 1.0
    out = stacked.copy()
    for client, count in enumerate(counts):
        shift = draw_shift(tuple(x.shape[1:]), seed, client)
        rng = np.random.default_rng([seed, 4, client, part])
        out[client, :count] = apply_shift(stacked[client, :count], shift, mean, std, rng)
    return out


def _stack_padded(x: np.ndarray, y: np.ndarray, groups: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``x[g]`` and ``y[g]`` for each group ``g``, stacked and zero-padded to the largest."""
    counts = np.array([len(group) for group in groups], dtype=np.int32)
    width = max(int(counts.max()), 1)
    xs = np.zeros((len(groups), width, *x.shape[1:]), dtype=x.dtype)
    ys = np.zeros((len(groups), width), dtype=y.dtype)
    for client, group in enumerate(groups):
        xs[client, : len(group)] = x[group]
        ys[client, : len(group)] = y[group]
    return xs, ys, counts
