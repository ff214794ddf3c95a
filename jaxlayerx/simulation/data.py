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
from collections.abc import Mapping
from typing import Any, cast

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
    """Per-client train and test examples, each a dict of per-example arrays (``x``/``y``,
    ``tokens``, several inputs: whatever the model and the loss read), stacked on a leading
    client axis and zero-padded to the largest client, for ``jax.vmap``.

    Attributes:
      train: name -> ``(C, max_train, *example_shape)``; zero rows beyond ``n_train[c]``.
      n_train: ``(C,)`` int32, each client's number of real train examples.
      test: name -> ``(C, max_test, *example_shape)``, the same for the test examples.
      n_test: ``(C,)`` int32.
      global_test: name -> every client's real test examples concatenated in client order
        (no padding), ``(sum(n_test), *example_shape)``.

    ``x_train``, ``y_train``, ``x_test``, ``y_test``, ``x_global_test`` and
    ``y_global_test`` read the ``x`` and ``y`` arrays of a classification data set.
    """

    train: Mapping[str, np.ndarray]
    n_train: np.ndarray
    test: Mapping[str, np.ndarray]
    n_test: np.ndarray
    global_test: Mapping[str, np.ndarray]

    @property
    def num_clients(self) -> int:
        """The number of clients ``C``."""
        return int(self.n_train.shape[0])

    @property
    def labels(self) -> bool:
        """Whether the data has integer class labels: a ``y`` of one integer per example."""
        y = self.train.get("y")
        return y is not None and y.ndim == 2 and y.dtype.kind in "iu"

    @property
    def x_train(self) -> np.ndarray:
        return self.train["x"]

    @property
    def y_train(self) -> np.ndarray:
        return self.train["y"]

    @property
    def x_test(self) -> np.ndarray:
        return self.test["x"]

    @property
    def y_test(self) -> np.ndarray:
        return self.test["y"]

    @property
    def x_global_test(self) -> np.ndarray:
        return self.global_test["x"]

    @property
    def y_global_test(self) -> np.ndarray:
        return self.global_test["y"]


def make_client_data(
    x: np.ndarray | Mapping[str, np.ndarray],
    y: np.ndarray | None = None,
    num_clients: int | None = None,
    beta: float | None = 0.5,
    seed: int = 0,
    test_fraction: float = 0.2,
    *,
    x_test: np.ndarray | None = None,
    y_test: np.ndarray | None = None,
    test: Mapping[str, np.ndarray] | None = None,
    groups: np.ndarray | None = None,
    assignment: np.ndarray | None = None,
    shift: bool = False,
) -> ClientData:
    """Splits a data set across clients, each client with its own train and test examples.

    The data is ``(x, y)`` (features and integer labels), or any dict of per-example
    arrays given as ``x`` (``{"x": ..., "y": ...}``, ``{"tokens": ...}``, several inputs).
    How the examples are split:

    * by label, when there are integer labels (a ``y`` of one integer per example): client
      ``c`` holds ``dirichlet_label_split(y, num_clients, beta, seed)[c]`` (at least 2 each);
    * IID with ``beta=None`` (the default split when there are no labels): a uniformly
      random share each;
    * by ``groups``: a Dirichlet(``beta``) split over a per-example integer grouping key
      instead of the labels (a speaker, a writer, a document);
    * by ``assignment``: each example's client, given (``0 <= assignment < num_clients``,
      every client at least 2 examples).

    Without a test split, each client's examples are shuffled (seeded) and the last
    ``round(test_fraction * n)`` of them, clamped to ``[1, n - 1]``, are its test examples.
    With one (``x_test``/``y_test``, or ``test`` for dict data), its test examples are its
    share of that split, cut with the same per-class proportions as its training examples
    under a label split, or at random otherwise (a client may get none: its local metrics
    are then left out). The global test set is every client's test examples together.

    Floating arrays are cast to float32, integer ones to int32 (``(x, y)``: ``x`` to
    float32, ``y`` to int32).

    Args:
      x: ``(N, *feature_shape)`` features, or a dict of per-example arrays (``y`` unset).
      y: ``(N,)`` integer labels, with array ``x``.
      num_clients: number of clients.
      beta: Dirichlet concentration of the label (or ``groups``) split; ``None`` for IID.
      seed: seed of the split, the shuffles and the shifts.
      test_fraction: without a test split, the share of each client's examples held out.
      x_test: the features of the data set's own test split, with array ``x``.
      y_test: its labels or targets.
      test: the data set's own test split, with dict ``x`` (the same keys).
      groups: ``(N,)`` integer grouping key to split over instead of the labels.
      assignment: ``(N,)`` each example's client.
      shift: give every client its own feature shift of ``x`` (:mod:`jaxlayerx.simulation.shift`).

    Returns:
      The padded, stacked ``ClientData``.

    Raises:
      ValueError: arrays of different lengths; ``y`` that is neither integer labels nor
        float targets; ``test_fraction`` not in ``(0, 1)``; only one of
        ``x_test``/``y_test``; ``groups`` with ``assignment``, or either of the wrong
        length or kind; a client with fewer than 2 examples; any error of
        ``dirichlet_label_split``.
    """
    arrays, held_arrays = _checked_data(x, y, x_test, y_test, test)
    if num_clients is None:
        raise TypeError("make_client_data needs num_clients")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    count = len(next(iter(arrays.values())))
    labels = arrays["y"] if "y" in arrays and arrays["y"].ndim == 1 and arrays["y"].dtype.kind in "iu" else None
    test_labels = None if held_arrays is None or labels is None else held_arrays["y"]
    if groups is not None and assignment is not None:
        raise ValueError("groups and assignment are two ways to split: give one")
    held_out: list[np.ndarray] | None
    if assignment is not None:
        clients = _assigned(_checked_key(assignment, count, "assignment"), num_clients)
        held_out = None if held_arrays is None else _iid_split(_length(held_arrays), num_clients, _rng(seed))
    elif groups is not None:
        if beta is None:
            raise ValueError("groups are split by a Dirichlet(beta) draw: give beta (large for near-IID)")
        key = _checked_key(groups, count, "groups")
        clients = _label_split(key, None, num_clients, beta, seed, min_size=2)[0]
        held_out = None if held_arrays is None else _iid_split(_length(held_arrays), num_clients, _rng(seed))
    elif beta is None or labels is None:
        _check_split_args(np.zeros(count), num_clients, 1.0, 2)
        rng = _rng(seed)
        clients = _iid_split(count, num_clients, rng)
        held_out = None if held_arrays is None else _iid_split(_length(held_arrays), num_clients, rng)
    else:
        clients, held_out = _label_split(labels, test_labels, num_clients, beta, seed, min_size=2)
    if held_out is None:
        held_arrays = arrays
        clients, held_out = _hold_out(clients, test_fraction, seed)
    train, n_train = _stack_padded(arrays, clients)
    # held_arrays is set: given, or the examples themselves when held out of them
    tested, n_test = _stack_padded(cast("dict[str, np.ndarray]", held_arrays), held_out)
    if shift:
        if "x" not in arrays or arrays["x"].dtype != np.float32:
            raise ValueError("shift moves float features x; this data has none")
        train["x"], tested["x"] = (
            _shifted(stack, counts, arrays["x"], seed, part)
            for part, (stack, counts) in enumerate(((train["x"], n_train), (tested["x"], n_test)))
        )
    global_test = {
        name: np.concatenate([stack[c, : n_test[c]] for c in range(num_clients)]) for name, stack in tested.items()
    }
    return ClientData(train, n_train, tested, n_test, global_test)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _length(arrays: Mapping[str, np.ndarray]) -> int:
    return len(next(iter(arrays.values())))


def _checked_data(
    x: np.ndarray | Mapping[str, np.ndarray],
    y: np.ndarray | None,
    x_test: np.ndarray | None,
    y_test: np.ndarray | None,
    test: Mapping[str, np.ndarray] | None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """The data and its test split as dicts of cast arrays, checked."""
    if isinstance(x, Mapping):
        if y is not None or x_test is not None or y_test is not None:
            raise ValueError("with dict data, give the test split as test= (a dict), not y, x_test or y_test")
        arrays = _checked_arrays(x, "the data")
        held = None if test is None else _checked_arrays(test, "the test split")
        if held is not None:
            if set(held) != set(arrays):
                raise ValueError(f"the test split has arrays {sorted(held)}, the data {sorted(arrays)}")
            for name, array in held.items():
                if array.dtype != arrays[name].dtype:
                    raise ValueError(f"test array {name!r} is {array.dtype}, the data's {arrays[name].dtype}")
                if array.shape[1:] != arrays[name].shape[1:]:
                    raise ValueError(
                        f"test array {name!r} has examples of shape {array.shape[1:]}, the data {arrays[name].shape[1:]}"
                    )
        return arrays, held
    if y is None:
        raise ValueError("give labels y with features x, or a dict of per-example arrays as x")
    if test is not None:
        raise ValueError("with (x, y) data, give the test split as x_test and y_test, not test=")
    if (x_test is None) != (y_test is None):
        raise ValueError("x_test and y_test come together: give both or neither")
    features, labels = _checked_examples(x, y, "x", "y")
    arrays = {"x": features, "y": labels}
    if x_test is None:
        return arrays, None
    held_x, held_y = _checked_examples(x_test, cast(np.ndarray, y_test), "x_test", "y_test")  # both or neither
    if held_x.shape[1:] != features.shape[1:]:
        raise ValueError(f"x_test examples have shape {held_x.shape[1:]}, x examples {features.shape[1:]}")
    if held_y.dtype != labels.dtype or held_y.shape[1:] != labels.shape[1:]:
        raise ValueError(
            f"y_test is {held_y.dtype} with examples of shape {held_y.shape[1:]}, "
            f"y {labels.dtype} with {labels.shape[1:]}: they must be alike"
        )
    return arrays, {"x": held_x, "y": held_y}


def _checked_arrays(data: Mapping[str, Any], what: str) -> dict[str, np.ndarray]:
    """Per-example arrays of one length, floating ones as float32 and integer ones as int32."""
    if not data:
        raise ValueError(f"{what} holds no arrays")
    arrays: dict[str, np.ndarray] = {}
    for name, value in data.items():
        array = np.asarray(value)
        if array.ndim < 1:
            raise ValueError(f"{what}: array {name!r} is a scalar; give one row per example")
        if array.dtype.kind == "f":
            array = array.astype(np.float32, copy=False)
        elif array.dtype.kind in "iu":
            if array.size and (array.min() < np.iinfo(np.int32).min or array.max() > np.iinfo(np.int32).max):
                raise ValueError(f"{what}: array {name!r} holds integers beyond int32, which the simulation uses")
            array = array.astype(np.int32, copy=False)
        elif array.dtype.kind != "b":
            raise ValueError(f"{what}: array {name!r} has dtype {array.dtype}; expected numbers or booleans")
        arrays[str(name)] = array
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{what}: arrays of different lengths (examples): {lengths}")
    if not next(iter(lengths.values())):
        raise ValueError(f"{what} holds no examples")
    return arrays


def _checked_key(key: np.ndarray, count: int, what: str) -> np.ndarray:
    key = np.asarray(key)
    if key.shape != (count,) or key.dtype.kind not in "iu":
        raise ValueError(f"{what} must be one integer per example, shape ({count},); got {key.dtype} {key.shape}")
    return key


def _assigned(assignment: np.ndarray, num_clients: int) -> list[np.ndarray]:
    """Each client's examples, as ``assignment`` gives them (at least 2 each)."""
    if num_clients < 1:
        raise ValueError(f"num_clients must be at least 1, got {num_clients}")
    if assignment.min() < 0 or assignment.max() >= num_clients:
        raise ValueError(
            f"assignment holds clients {assignment.min()}..{assignment.max()}, outside 0..{num_clients - 1}"
        )
    clients = [np.flatnonzero(assignment == client).astype(np.int64) for client in range(num_clients)]
    sizes = [len(indices) for indices in clients]
    if min(sizes) < 2:
        smallest = int(np.argmin(sizes))
        raise ValueError(f"assignment gives client {smallest} {sizes[smallest]} example(s); each needs at least 2")
    return clients


def _checked_examples(x: np.ndarray, y: np.ndarray, x_name: str, y_name: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim < 1 or y.ndim < 1 or len(x) != len(y):
        raise ValueError(f"{x_name} and {y_name} must have the same length, got shapes {x.shape} and {y.shape}")
    if len(x) == 0:
        raise ValueError(f"{x_name} holds no examples")
    if y.dtype.kind not in "iuf":
        raise ValueError(f"{y_name} must hold integer labels or float targets, got dtype {y.dtype}")
    return x.astype(np.float32, copy=False), y.astype(np.int32 if y.dtype.kind in "iu" else np.float32, copy=False)


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


def _stack_padded(
    arrays: Mapping[str, np.ndarray], groups: list[np.ndarray]
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Each array's rows of each group, stacked and zero-padded to the largest group."""
    counts = np.array([len(group) for group in groups], dtype=np.int32)
    width = max(int(counts.max()), 1)
    stacked: dict[str, np.ndarray] = {}
    for name, array in arrays.items():
        out = np.zeros((len(groups), width, *array.shape[1:]), dtype=array.dtype)
        for client, group in enumerate(groups):
            out[client, : len(group)] = array[group]
        stacked[name] = out
    return stacked, counts
