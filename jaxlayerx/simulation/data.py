"""Non-IID client data for a federated simulation.

Examples are split across clients by label with a Dirichlet draw per class (small
``beta``: each client sees few classes; large ``beta``: every client sees the global mix),
then each client's examples are split into train and test. The per-client arrays are
stacked on a leading client axis and zero-padded to the largest client, for ``jax.vmap``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

#: How many Dirichlet draws ``dirichlet_label_split`` tries before giving up on ``min_size``.
MAX_SPLIT_TRIES = 100


def load_digits_data() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled handwritten digits (no download).

    Returns:
      ``x``: float32 ``(1797, 64)`` pixel values scaled to ``[0, 1]`` (divided by 16);
      ``y``: int32 ``(1797,)`` labels 0 to 9.

    Raises:
      ImportError: scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(
            "the digits data set needs scikit-learn: pip install 'jaxlayerx[demo]'"
        ) from error
    digits = load_digits()
    x = np.asarray(digits.data, dtype=np.float32) / np.float32(16.0)
    y = np.asarray(digits.target, dtype=np.int32)
    return x, y


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
    labels = np.asarray(labels)
    _check_split_args(labels, num_clients, beta, min_size)
    rng = np.random.default_rng(seed)
    class_indices = [np.flatnonzero(labels == label) for label in np.unique(labels)]
    for _ in range(MAX_SPLIT_TRIES):
        clients = _draw_split(class_indices, num_clients, beta, rng)
        sizes = [len(indices) for indices in clients]
        if min(sizes) >= min_size:
            return clients
    smallest = int(np.argmin(sizes))
    raise ValueError(
        f"client {smallest} has {sizes[smallest]} examples, fewer than min_size={min_size}, "
        f"after {MAX_SPLIT_TRIES} Dirichlet draws (beta={beta}, {num_clients} clients, "
        f"{len(labels)} examples): use a larger beta or fewer clients"
    )


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
) -> list[np.ndarray]:
    """One Dirichlet draw per class: the class's shuffled indices cut in those proportions
    (cut points rounded to the nearest index)."""
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for indices in class_indices:
        indices = rng.permutation(indices)
        proportions = rng.dirichlet(np.full(num_clients, beta))
        cuts = np.round(np.cumsum(proportions)[:-1] * len(indices)).astype(np.int64)
        for client, chunk in enumerate(np.split(indices, cuts)):
            parts[client].append(chunk)
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
    beta: float = 0.5,
    seed: int = 0,
    test_fraction: float = 0.2,
) -> ClientData:
    """Splits ``(x, y)`` across clients, non-IID, each client with its own train and test.

    Client ``c`` holds the examples ``dirichlet_label_split(y, num_clients, beta, seed)[c]``
    (at least 2 each). They are shuffled (seeded) and the last
    ``round(test_fraction * n)`` of them, clamped to ``[1, n - 1]``, are its test examples.

    Args:
      x: ``(N, *feature_shape)`` features, cast to float32.
      y: ``(N,)`` integer labels, cast to int32.
      num_clients: number of clients.
      beta: Dirichlet concentration of the label split.
      seed: seed of the split and of the shuffles.
      test_fraction: the share of each client's examples held out for test, in ``(0, 1)``.

    Returns:
      The padded, stacked ``ClientData``.

    Raises:
      ValueError: ``x`` and ``y`` differ in length (or one is a scalar); ``y`` does not
        hold integers; ``test_fraction`` is not in ``(0, 1)``; any error of
        ``dirichlet_label_split``.
    """
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim < 1 or y.ndim < 1 or len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got shapes {x.shape} and {y.shape}")
    if y.ndim == 1 and y.dtype.kind not in "iu":
        raise ValueError(f"y must hold integer labels, got dtype {y.dtype}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    clients = dirichlet_label_split(y, num_clients, beta, seed, min_size=2)
    rng = np.random.default_rng([seed, 1])  # a stream apart from the split's
    train, test = [], []
    for indices in clients:
        indices = rng.permutation(indices)
        n_test = min(max(round(test_fraction * len(indices)), 1), len(indices) - 1)
        train.append(indices[: len(indices) - n_test])
        test.append(indices[len(indices) - n_test :])
    x = x.astype(np.float32, copy=False)
    y = y.astype(np.int32, copy=False)
    x_train, y_train, n_train = _stack_padded(x, y, train)
    x_test, y_test, n_test = _stack_padded(x, y, test)
    all_test = np.concatenate(test)
    return ClientData(x_train, y_train, n_train, x_test, y_test, n_test, x[all_test], y[all_test])


def _stack_padded(
    x: np.ndarray, y: np.ndarray, groups: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``x[g]`` and ``y[g]`` for each group ``g``, stacked and zero-padded to the largest."""
    counts = np.array([len(group) for group in groups], dtype=np.int32)
    width = int(counts.max())
    xs = np.zeros((len(groups), width, *x.shape[1:]), dtype=x.dtype)
    ys = np.zeros((len(groups), width), dtype=y.dtype)
    for client, group in enumerate(groups):
        xs[client, : len(group)] = x[group]
        ys[client, : len(group)] = y[group]
    return xs, ys, counts
