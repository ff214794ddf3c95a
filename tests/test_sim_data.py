"""Tests for the simulation's client data: jaxlayerx.simulation.data."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxlayerx.simulation.data import ClientData, dirichlet_label_split, load_digits_data, make_client_data


@pytest.fixture(scope="module")
def digits():
    return load_digits_data()


def unique_rows_data(n=600, num_classes=6, features=5, seed=0):
    """(x, y) whose rows are all distinct, so each row names its original index."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(np.float32)
    y = rng.integers(0, num_classes, size=n).astype(np.int32)
    return x, y


def class_shares(labels, indices, num_classes):
    """A client's class proportions, counted independently of the split."""
    counts = np.bincount(labels[indices], minlength=num_classes)
    return counts / counts.sum()


def check_partition(parts, n):
    for part in parts:
        assert part.dtype == np.int64
        assert part.ndim == 1
        assert np.all(np.diff(part) > 0), "each client's indices are sorted and distinct"
    everything = np.concatenate(parts)
    assert len(everything) == n, "disjoint: no index is given twice"
    assert np.array_equal(np.sort(everything), np.arange(n)), "covering: every index is given"


# ---------------------------------------------------------------- load_digits_data


def test_load_digits_data(digits):
    x, y = digits
    assert x.shape == (1797, 64) and x.dtype == np.float32
    assert y.shape == (1797,) and y.dtype == np.int32
    assert x.min() == 0.0 and x.max() == 1.0
    assert np.array_equal(np.unique(y), np.arange(10))
    # pixels are 0..16 in the source, so x * 16 is integral
    assert np.array_equal(x * 16, np.round(x * 16))


def test_load_digits_data_reads_the_bundled_file_without_importing_sklearn():
    code = (
        "import sys; from jaxlayerx.simulation.data import load_digits_data; x, y = load_digits_data(); "
        "print(x.shape, y.shape, 'sklearn' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.split() == ["(1797,", "64)", "(1797,)", "False"]


def test_load_digits_data_without_sklearn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'jaxlayerx\[demo\]'"):
        load_digits_data()


# ---------------------------------------------------------------- dirichlet_label_split


@pytest.mark.parametrize("num_clients, beta", [(1, 0.5), (3, 0.1), (10, 0.5), (7, 1000.0)])
def test_split_is_a_partition(digits, num_clients, beta):
    _, y = digits
    parts = dirichlet_label_split(y, num_clients, beta, seed=3)
    assert len(parts) == num_clients
    check_partition(parts, len(y))


@settings(deadline=None)
@given(
    labels=st.lists(st.integers(0, 4), min_size=1, max_size=80),
    num_clients=st.integers(1, 6),
    beta=st.floats(0.01, 100.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_split_is_a_partition_property(labels, num_clients, beta, seed):
    labels = np.array(labels)
    parts = dirichlet_label_split(labels, num_clients, beta, seed, min_size=0)
    assert len(parts) == num_clients
    check_partition(parts, len(labels))


def test_split_with_non_integer_labels():
    labels = np.array(["cat", "dog", "cat", "bird", "dog", "dog", "cat", "bird"])
    check_partition(dirichlet_label_split(labels, 2, 1.0, seed=0, min_size=1), len(labels))


def test_split_is_deterministic_for_a_seed(digits):
    _, y = digits
    first = dirichlet_label_split(y, 8, 0.5, seed=11)
    again = dirichlet_label_split(y, 8, 0.5, seed=11)
    other = dirichlet_label_split(y, 8, 0.5, seed=12)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_split_honours_min_size(digits):
    _, y = digits
    for seed in range(5):
        parts = dirichlet_label_split(y, 10, 0.3, seed=seed, min_size=40)
        assert min(len(part) for part in parts) >= 40
        check_partition(parts, len(y))


def test_split_min_size_unreachable_raises():
    labels = np.zeros(20, dtype=np.int32)  # one class: tiny beta hands it to one client
    with pytest.raises(ValueError, match=r"client \d+ has \d+ examples.*larger beta or fewer clients"):
        dirichlet_label_split(labels, 4, 1e-3, seed=0, min_size=2)


def test_large_beta_gives_near_uniform_clients(digits):
    _, y = digits
    global_shares = np.bincount(y, minlength=10) / len(y)
    parts = dirichlet_label_split(y, 5, 1000.0, seed=0)
    for part in parts:
        assert np.max(np.abs(class_shares(y, part, 10) - global_shares)) < 0.03
    sizes = np.array([len(part) for part in parts])
    assert np.all(np.abs(sizes / len(y) - 0.2) < 0.03)


def test_small_beta_gives_skewed_clients(digits):
    _, y = digits
    parts = dirichlet_label_split(y, 10, 0.05, seed=0)
    max_shares = np.array([class_shares(y, part, 10).max() for part in parts])
    assert max_shares.mean() > 0.6, max_shares
    # most clients see few classes (at least 5 % of their examples)
    classes_seen = [np.sum(class_shares(y, part, 10) >= 0.05) for part in parts]
    assert np.median(classes_seen) <= 3, classes_seen
    # against the IID-ish reference
    uniform = dirichlet_label_split(y, 10, 1000.0, seed=0)
    assert max(class_shares(y, part, 10).max() for part in uniform) < 0.2


@pytest.mark.parametrize(
    "args, message",
    [
        ((np.zeros((4, 2)), 2, 0.5), r"labels must be a 1-D array, got shape \(4, 2\)"),
        ((np.zeros(10), 0, 0.5), r"num_clients must be at least 1, got 0"),
        ((np.zeros(10), -3, 0.5), r"num_clients must be at least 1, got -3"),
        ((np.zeros(10), 2, 0.0), r"beta must be positive and finite, got 0.0"),
        ((np.zeros(10), 2, -1.0), r"beta must be positive and finite, got -1.0"),
        ((np.zeros(10), 2, float("inf")), r"beta must be positive and finite, got inf"),
        ((np.zeros(10), 2, float("nan")), r"beta must be positive and finite, got nan"),
        (
            (np.zeros(10), 6, 0.5),
            r"more clients than samples: 6 clients x min_size=2 need 12 examples, but there are 10",
        ),
    ],
)
def test_split_errors(args, message):
    with pytest.raises(ValueError, match=message):
        dirichlet_label_split(*args, seed=0)


def test_split_negative_min_size():
    with pytest.raises(ValueError, match=r"min_size must be at least 0, got -1"):
        dirichlet_label_split(np.zeros(10), 2, 0.5, seed=0, min_size=-1)


def test_split_exactly_enough_samples():
    labels = np.arange(10) % 2
    parts = dirichlet_label_split(labels, 5, 1000.0, seed=0, min_size=2)
    assert [len(part) for part in parts] == [2] * 5


# ---------------------------------------------------------------- make_client_data


def recover_indices(data_x, data_y, x, y):
    """Original indices of the rows of ``data_x`` by lookup; checks each row's label."""
    where = {row.tobytes(): i for i, row in enumerate(x.reshape(len(x), -1))}
    found = []
    for row, label in zip(data_x.reshape(len(data_x), -1), data_y):
        index = where.get(row.tobytes())
        assert index is not None, "a real row is not a row of the original x"
        assert label == y[index], "a row came with the wrong label"
        found.append(index)
    return found


def check_client_data(data: ClientData, x, y, num_clients, test_fraction):
    n = len(y)
    feature_shape = x.shape[1:]
    assert data.num_clients == num_clients
    assert data.n_train.shape == data.n_test.shape == (num_clients,)
    assert data.n_train.dtype == data.n_test.dtype == np.int32
    assert data.x_train.dtype == data.x_test.dtype == data.x_global_test.dtype == np.float32
    assert data.y_train.dtype == data.y_test.dtype == data.y_global_test.dtype == np.int32
    assert data.x_train.shape == (num_clients, data.n_train.max(), *feature_shape)
    assert data.y_train.shape == (num_clients, data.n_train.max())
    assert data.x_test.shape == (num_clients, data.n_test.max(), *feature_shape)
    assert data.y_test.shape == (num_clients, data.n_test.max())
    assert int(data.n_train.sum() + data.n_test.sum()) == n

    seen, global_rows = [], []
    for c in range(num_clients):
        n_tr, n_te = int(data.n_train[c]), int(data.n_test[c])
        total = n_tr + n_te
        assert n_tr >= 1 and n_te >= 1
        assert n_te == min(max(round(test_fraction * total), 1), total - 1)
        train = recover_indices(data.x_train[c, :n_tr], data.y_train[c, :n_tr], x, y)
        test = recover_indices(data.x_test[c, :n_te], data.y_test[c, :n_te], x, y)
        assert not set(train) & set(test)
        seen += train + test
        global_rows.append(data.x_test[c, :n_te])
        # padding is zero
        assert not np.any(data.x_train[c, n_tr:]) and not np.any(data.y_train[c, n_tr:])
        assert not np.any(data.x_test[c, n_te:]) and not np.any(data.y_test[c, n_te:])
    assert sorted(seen) == list(range(n)), "every example is used once"

    expected_x = np.concatenate(global_rows)
    expected_y = np.concatenate([data.y_test[c, : data.n_test[c]] for c in range(num_clients)])
    assert np.array_equal(data.x_global_test, expected_x)
    assert np.array_equal(data.y_global_test, expected_y)
    assert len(data.y_global_test) == int(data.n_test.sum())


@pytest.mark.parametrize(
    "num_clients, beta, test_fraction", [(4, 0.5, 0.2), (6, 0.1, 0.3), (3, 100.0, 0.5), (1, 1.0, 0.1)]
)
def test_make_client_data_rows(num_clients, beta, test_fraction):
    x, y = unique_rows_data()
    data = make_client_data(x, y, num_clients, beta=beta, seed=5, test_fraction=test_fraction)
    check_client_data(data, x, y, num_clients, test_fraction)


def test_make_client_data_follows_the_split():
    x, y = unique_rows_data()
    data = make_client_data(x, y, 5, beta=0.3, seed=9)
    parts = dirichlet_label_split(y, 5, 0.3, seed=9)
    for c, part in enumerate(parts):
        train = recover_indices(data.x_train[c, : data.n_train[c]], data.y_train[c, : data.n_train[c]], x, y)
        test = recover_indices(data.x_test[c, : data.n_test[c]], data.y_test[c, : data.n_test[c]], x, y)
        assert sorted(train + test) == part.tolist()


def test_make_client_data_is_shuffled_within_clients():
    x, y = unique_rows_data()
    data = make_client_data(x, y, 2, beta=1000.0, seed=0)
    train = recover_indices(data.x_train[0, : data.n_train[0]], data.y_train[0, : data.n_train[0]], x, y)
    assert train != sorted(train)


def test_make_client_data_on_digits(digits):
    x, y = digits
    data = make_client_data(x, y, 10, beta=0.5, seed=0)
    assert data.num_clients == 10
    assert data.x_train.shape[1:] == (data.n_train.max(), 64)
    assert int(data.n_train.sum() + data.n_test.sum()) == len(y)
    for c in range(10):
        n_tr = data.n_train[c]
        assert not np.any(data.x_train[c, n_tr:])
        assert np.all((data.x_train[c, :n_tr] >= 0) & (data.x_train[c, :n_tr] <= 1))


def test_make_client_data_image_shaped(digits):
    x, y = digits
    rng = np.random.default_rng(0)
    images = x.reshape(-1, 8, 8, 1) + rng.uniform(0, 1e-3, size=(len(x), 8, 8, 1)).astype(np.float32)
    data = make_client_data(images, y.astype(np.int64), 4, beta=0.5, seed=1)
    assert data.x_train.shape[2:] == (8, 8, 1) and data.x_test.shape[2:] == (8, 8, 1)
    assert data.x_global_test.shape[1:] == (8, 8, 1)
    check_client_data(data, images, y, 4, 0.2)


def test_make_client_data_deterministic():
    x, y = unique_rows_data()
    first = make_client_data(x, y, 4, seed=2)
    again = make_client_data(x, y, 4, seed=2)
    other = make_client_data(x, y, 4, seed=3)
    for field in ("x_train", "y_train", "n_train", "x_test", "y_test", "n_test", "x_global_test", "y_global_test"):
        assert np.array_equal(getattr(first, field), getattr(again, field))
    assert not np.array_equal(first.y_global_test, other.y_global_test)


def test_client_data_is_frozen():
    x, y = unique_rows_data(n=50)
    data = make_client_data(x, y, 2)
    with pytest.raises(AttributeError):
        data.n_train = np.zeros(2, np.int32)


@pytest.mark.parametrize(
    "x, y, kwargs, message",
    [
        (
            np.zeros((10, 3)),
            np.zeros(9, np.int32),
            {},
            r"x and y must have the same length, got shapes \(10, 3\) and \(9,\)",
        ),
        (np.zeros((10, 3)), np.zeros(10), {}, r"y must hold integer labels, got dtype float64"),
        (
            np.zeros((10, 3)),
            np.zeros(10, np.int32),
            {"test_fraction": 0.0},
            r"test_fraction must be in \(0, 1\), got 0.0",
        ),
        (
            np.zeros((10, 3)),
            np.zeros(10, np.int32),
            {"test_fraction": 1.0},
            r"test_fraction must be in \(0, 1\), got 1.0",
        ),
        (np.zeros((10, 3)), np.zeros(10, np.int32), {"test_fraction": -0.2}, r"test_fraction must be in \(0, 1\)"),
        (np.zeros((10, 3)), np.zeros(10, np.int32), {"num_clients": 6}, r"more clients than samples"),
        (np.zeros((10, 3)), np.zeros(10, np.int32), {"num_clients": 0}, r"num_clients must be at least 1"),
        (np.zeros((10, 3)), np.zeros(10, np.int32), {"beta": 0.0}, r"beta must be positive and finite"),
        (np.zeros((10, 3)), np.zeros((10, 2), np.int32), {}, r"labels must be a 1-D array"),
    ],
)
def test_make_client_data_errors(x, y, kwargs, message):
    kwargs = {"num_clients": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        make_client_data(x, y, **kwargs)
