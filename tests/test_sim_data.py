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
        (
            np.zeros((10, 3)),
            np.zeros(10, complex),
            {},
            r"y must hold integer labels or float targets, got dtype complex128",
        ),
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
        (
            np.zeros((10, 3)),
            np.zeros(10, np.int32),
            {"groups": np.zeros(9, int)},
            r"groups must be one integer per example",
        ),
    ],
)
def test_make_client_data_errors(x, y, kwargs, message):
    kwargs = {"num_clients": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        make_client_data(x, y, **kwargs)


# ---------------------------------------------------------------- make_client_data: dict data, splits


def ref_dirichlet_split(keys, num_clients, beta, seed, min_size=2, tries=100, test_keys=None):
    """An independent numpy reimplementation of the Dirichlet split over ``keys`` (labels or
    a grouping key): per key value (ascending), its indices shuffled and cut among the
    clients at the rounded cumulative Dirichlet proportions; redrawn until every client has
    ``min_size``. With ``test_keys``, also the test split's indices, each key value's
    shuffled and cut in that value's proportions (the same generator, after the split)."""
    rng = np.random.default_rng(seed)
    values = np.unique(keys if test_keys is None else np.concatenate([keys, test_keys]))

    def deal(indices, shares, parts):
        cuts = np.round(np.cumsum(shares)[:-1] * len(indices)).astype(int)
        for client, chunk in enumerate(np.split(indices, cuts)):
            parts[client].append(chunk)

    for _ in range(tries):
        parts = [[] for _ in range(num_clients)]
        proportions = []
        for value in values:
            indices = rng.permutation(np.flatnonzero(keys == value))
            proportions.append(rng.dirichlet(np.full(num_clients, beta)))
            deal(indices, proportions[-1], parts)
        parts = [np.sort(np.concatenate(chunks)) for chunks in parts]
        if min(len(part) for part in parts) >= min_size:
            break
    else:
        raise AssertionError("the reference found no split")
    if test_keys is None:
        return parts
    held = [[] for _ in range(num_clients)]
    for value, shares in zip(values, proportions):
        deal(rng.permutation(np.flatnonzero(test_keys == value)), shares, held)
    return parts, [np.sort(np.concatenate(chunks)) for chunks in held]


def ref_iid_split(count, num_clients, rng):
    return [np.sort(part) for part in np.array_split(rng.permutation(count), num_clients)]


def ref_hold_out(parts, test_fraction, seed):
    """Each client's examples shuffled by ``default_rng([seed, 1])``; the last
    ``round(test_fraction * n)``, clamped to ``[1, n - 1]``, held out."""
    rng = np.random.default_rng([seed, 1])
    train, test = [], []
    for part in parts:
        shuffled = rng.permutation(part)
        n = len(shuffled)
        n_test = min(max(round(test_fraction * n), 1), n - 1)
        train.append(shuffled[: n - n_test])
        test.append(shuffled[n - n_test :])
    return train, test


def client_ids(data, c, name="id"):
    """Client ``c``'s real train and test ids, in their stored order."""
    return data.train[name][c, : data.n_train[c]].tolist(), data.test[name][c, : data.n_test[c]].tolist()


def mixed_data(n=97, num_classes=4, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x": rng.normal(size=(n, 3)),  # float64 -> float32
        "y": rng.integers(0, num_classes, size=n),  # int64 -> int32
        "w": rng.random(n) < 0.5,  # bool stays bool
        "tokens": rng.integers(-50, 50, size=(n, 5)).astype(np.int16),  # int16 -> int32
        "id": np.arange(n, dtype=np.int64),
    }


def check_dict_rows(data, arrays, ids_of_train, ids_of_test, test_arrays=None, test_offset=0):
    """Every array's real rows are the original rows at the ids (test rows: of ``test_arrays``
    at the ids less ``test_offset``, when given); padding is zero."""
    for name, original in arrays.items():
        held = original if test_arrays is None else test_arrays[name]
        for c in range(data.num_clients):
            n_tr, n_te = int(data.n_train[c]), int(data.n_test[c])
            train, test = data.train[name][c], data.test[name][c]
            test_rows = np.asarray(ids_of_test[c], dtype=np.int64) - test_offset
            np.testing.assert_array_equal(train[:n_tr], original[ids_of_train[c]].astype(train.dtype), err_msg=name)
            np.testing.assert_array_equal(test[:n_te], held[test_rows].astype(test.dtype), err_msg=name)
            assert not np.any(train[n_tr:]) and not np.any(test[n_te:]), f"{name}: padding is zero"


@pytest.mark.parametrize("num_clients, beta", [(4, 0.5), (3, None), (1, 1.0)])
def test_make_client_data_dict_rows(num_clients, beta):
    arrays = mixed_data()
    n = len(arrays["id"])
    data = make_client_data(arrays, num_clients=num_clients, beta=beta, seed=3)
    assert set(data.train) == set(data.test) == set(data.global_test) == set(arrays)
    expected_dtypes = {"x": np.float32, "y": np.int32, "w": np.bool_, "tokens": np.int32, "id": np.int32}
    for name, dtype in expected_dtypes.items():
        assert data.train[name].dtype == data.test[name].dtype == data.global_test[name].dtype == dtype, name
    width_tr, width_te = int(data.n_train.max()), int(data.n_test.max())
    for name, original in arrays.items():
        assert data.train[name].shape == (num_clients, width_tr, *original.shape[1:])
        assert data.test[name].shape == (num_clients, width_te, *original.shape[1:])
        assert data.global_test[name].shape == (int(data.n_test.sum()), *original.shape[1:])
    ids_train = [client_ids(data, c)[0] for c in range(num_clients)]
    ids_test = [client_ids(data, c)[1] for c in range(num_clients)]
    check_dict_rows(data, arrays, ids_train, ids_test)
    everything = sum(ids_train, []) + sum(ids_test, [])
    assert sorted(everything) == list(range(n)), "train and test ids partition range(N)"
    for c in range(num_clients):
        total = len(ids_train[c]) + len(ids_test[c])
        assert len(ids_test[c]) == min(max(round(0.2 * total), 1), total - 1)
    all_test = np.concatenate([np.asarray(ids, dtype=np.int64) for ids in ids_test])
    for name, original in arrays.items():
        np.testing.assert_array_equal(data.global_test[name], original[all_test].astype(data.global_test[name].dtype))
    assert data.labels
    assert data.x_train is data.train["x"] and data.y_test is data.test["y"]
    assert data.x_global_test is data.global_test["x"] and data.y_global_test is data.global_test["y"]


def test_make_client_data_dict_follows_the_label_split():
    arrays = mixed_data(n=150)
    data = make_client_data(arrays, num_clients=5, beta=0.3, seed=4)
    parts = ref_dirichlet_split(arrays["y"], 5, 0.3, 4)
    train, test = ref_hold_out(parts, 0.2, 4)
    for c in range(5):
        assert client_ids(data, c) == (train[c].tolist(), test[c].tolist())


def test_make_client_data_pairs_equal_dict():
    x, y = unique_rows_data(n=300)
    for kwargs in ({"beta": 0.3, "seed": 7, "test_fraction": 0.25}, {"beta": None, "seed": 1}):
        pair = make_client_data(x, y, 5, **kwargs)
        mapping = make_client_data({"x": x, "y": y}, num_clients=5, **kwargs)
        assert set(mapping.train) == {"x", "y"} and pair.labels and mapping.labels
        for field in ("train", "test", "global_test"):
            for name in ("x", "y"):
                a, b = getattr(pair, field)[name], getattr(mapping, field)[name]
                assert a.dtype == b.dtype and a.shape == b.shape
                np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(pair.n_train, mapping.n_train)
        np.testing.assert_array_equal(pair.n_test, mapping.n_test)


def test_make_client_data_pairs_equal_dict_with_a_test_split():
    x, y = unique_rows_data(n=300)
    x_test, y_test = unique_rows_data(n=80, seed=1)
    pair = make_client_data(x, y, 4, beta=0.5, seed=2, x_test=x_test, y_test=y_test)
    mapping = make_client_data({"x": x, "y": y}, num_clients=4, beta=0.5, seed=2, test={"x": x_test, "y": y_test})
    for field in ("train", "test", "global_test"):
        for name in ("x", "y"):
            np.testing.assert_array_equal(getattr(pair, field)[name], getattr(mapping, field)[name])
    np.testing.assert_array_equal(pair.n_test, mapping.n_test)
    assert int(mapping.n_test.sum()) == 80


@pytest.mark.parametrize("num_clients, seed, test_fraction", [(4, 0, 0.2), (3, 11, 0.35), (5, 2, 0.5)])
@pytest.mark.parametrize("as_dict", [False, True])
def test_make_client_data_float_targets_split_iid(num_clients, seed, test_fraction, as_dict):
    n = 103
    rng = np.random.default_rng(42)
    x = np.column_stack([np.arange(n), rng.normal(size=n)])  # column 0 names the example
    y = rng.normal(size=n)  # regression targets
    if as_dict:
        data = make_client_data({"x": x, "y": y}, num_clients=num_clients, seed=seed, test_fraction=test_fraction)
    else:
        data = make_client_data(x, y, num_clients, seed=seed, test_fraction=test_fraction)
    assert not data.labels
    assert data.y_train.dtype == data.y_test.dtype == np.float32 and data.x_train.dtype == np.float32
    parts = ref_iid_split(n, num_clients, np.random.default_rng(seed))
    train, test = ref_hold_out(parts, test_fraction, seed)
    for c in range(num_clients):
        n_tr, n_te = int(data.n_train[c]), int(data.n_test[c])
        assert data.x_train[c, :n_tr, 0].astype(int).tolist() == train[c].tolist()
        assert data.x_test[c, :n_te, 0].astype(int).tolist() == test[c].tolist()
        np.testing.assert_array_equal(data.y_train[c, :n_tr], y[train[c]].astype(np.float32))
        np.testing.assert_array_equal(data.y_test[c, :n_te], y[test[c]].astype(np.float32))
        assert not np.any(data.y_train[c, n_tr:]) and not np.any(data.x_test[c, n_te:])


def test_make_client_data_float_targets_ignore_beta():
    """No labels: the split is IID whatever beta says."""
    rng = np.random.default_rng(0)
    arrays = {"x": rng.normal(size=(60, 2)), "y": rng.normal(size=60), "id": np.arange(60)}
    skewed = make_client_data(arrays, num_clients=3, beta=0.01, seed=5)
    parts = ref_iid_split(60, 3, np.random.default_rng(5))
    train, test = ref_hold_out(parts, 0.2, 5)
    for c in range(3):
        assert client_ids(skewed, c) == (train[c].tolist(), test[c].tolist())


def assignment_data(n=30, num_clients=3, seed=0):
    rng = np.random.default_rng(seed)
    assignment = rng.integers(0, num_clients, size=n)
    assert np.bincount(assignment, minlength=num_clients).min() >= 2
    arrays = {"x": rng.normal(size=(n, 2)), "y": rng.integers(0, 2, size=n), "id": np.arange(n)}
    return arrays, assignment


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8])
def test_make_client_data_assignment(dtype):
    arrays, assignment = assignment_data()
    data = make_client_data(arrays, num_clients=3, beta=0.01, seed=2, assignment=assignment.astype(dtype))
    parts = [np.flatnonzero(assignment == c) for c in range(3)]
    train, test = ref_hold_out(parts, 0.2, 2)
    for c in range(3):
        ids_train, ids_test = client_ids(data, c)
        assert sorted(ids_train + ids_test) == parts[c].tolist(), "exactly the examples assigned to it"
        assert (ids_train, ids_test) == (train[c].tolist(), test[c].tolist())
    check_dict_rows(
        data, arrays, [client_ids(data, c)[0] for c in range(3)], [client_ids(data, c)[1] for c in range(3)]
    )


def test_make_client_data_assignment_with_pairs():
    x, y = unique_rows_data(n=40)
    assignment = np.arange(40) % 4
    data = make_client_data(x, y, 4, assignment=assignment, seed=0)
    for c in range(4):
        train = recover_indices(data.x_train[c, : data.n_train[c]], data.y_train[c, : data.n_train[c]], x, y)
        test = recover_indices(data.x_test[c, : data.n_test[c]], data.y_test[c, : data.n_test[c]], x, y)
        assert sorted(train + test) == list(range(c, 40, 4))


def test_make_client_data_assignment_with_a_test_split():
    arrays, assignment = assignment_data()
    test = {"x": np.ones((11, 2)), "y": np.zeros(11, int), "id": 1000 + np.arange(11)}
    data = make_client_data(arrays, num_clients=3, seed=6, assignment=assignment, test=test)
    expected = ref_iid_split(11, 3, np.random.default_rng(6))
    for c in range(3):
        ids_train, ids_test = client_ids(data, c)
        assert ids_train == np.flatnonzero(assignment == c).tolist(), "no hold-out: every assigned example trains"
        assert ids_test == (1000 + expected[c]).tolist()


@pytest.mark.parametrize(
    "assignment, kwargs, error, message",
    [
        (np.arange(30) % 4, {}, ValueError, r"assignment holds clients 0\.\.3, outside 0\.\.2"),
        (np.arange(30) % 3 - 1, {}, ValueError, r"assignment holds clients -1\.\.1, outside 0\.\.2"),
        (
            np.r_[np.zeros(28, int), 2, 2],
            {},
            ValueError,
            r"assignment gives client 1 0 example\(s\); each needs at least 2",
        ),
        (
            np.r_[np.zeros(27, int), 1, 2, 2],
            {},
            ValueError,
            r"assignment gives client 1 1 example\(s\); each needs at least 2",
        ),
        (np.arange(29) % 3, {}, ValueError, r"assignment must be one integer per example, shape \(30,\); got int64"),
        (
            (np.arange(30) % 3).astype(float),
            {},
            ValueError,
            r"assignment must be one integer per example, shape \(30,\); got float64",
        ),
        (np.arange(30) % 3 == 0, {}, ValueError, r"assignment must be one integer per example"),
        ((np.arange(30) % 3).reshape(15, 2), {}, ValueError, r"assignment must be one integer per example"),
        (np.arange(30) % 3, {"groups": np.arange(30) % 2}, ValueError, r"groups and assignment are two ways"),
    ],
)
def test_make_client_data_assignment_errors(assignment, kwargs, error, message):
    arrays, _ = assignment_data()
    with pytest.raises(error, match=message):
        make_client_data(arrays, num_clients=3, assignment=assignment, **kwargs)


def grouped_data(n=400, num_groups=4, seed=0):
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, num_groups, size=n)
    # labels that disagree with the groups: the split must follow the groups
    arrays = {"x": rng.normal(size=(n, 2)), "y": rng.integers(0, 3, size=n), "id": np.arange(n)}
    return arrays, groups


def group_shares(data, groups, num_clients, num_groups):
    """shares[g, c]: the fraction of group g's examples that client c holds (train + test)."""
    counts = np.zeros((num_groups, num_clients))
    for c in range(num_clients):
        ids = np.asarray(sum(client_ids(data, c), []), dtype=np.int64)
        counts[:, c] = np.bincount(groups[ids], minlength=num_groups)
    return counts / counts.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("seed", [6, 7, 18])  # seeds whose every group has a client with >= 80 %
def test_make_client_data_groups_small_beta(seed):
    arrays, groups = grouped_data()
    data = make_client_data(arrays, num_clients=4, beta=0.05, seed=seed, groups=groups)
    parts = ref_dirichlet_split(groups, 4, 0.05, seed)
    train, test = ref_hold_out(parts, 0.2, seed)
    for c in range(4):
        assert client_ids(data, c) == (train[c].tolist(), test[c].tolist())
    shares = group_shares(data, groups, 4, 4)
    assert np.all(shares.max(axis=1) >= 0.8), shares
    check_dict_rows(
        data, arrays, [client_ids(data, c)[0] for c in range(4)], [client_ids(data, c)[1] for c in range(4)]
    )


def test_make_client_data_groups_small_beta_over_seeds():
    """Over seeds, a group mostly lands on one client; under a large beta never."""
    arrays, groups = grouped_data()
    skewed, uniform = [], []
    for seed in range(10):
        for beta, tops in ((0.05, skewed), (1e6, uniform)):
            data = make_client_data(arrays, num_clients=4, beta=beta, seed=seed, groups=groups)
            tops.extend(group_shares(data, groups, 4, 4).max(axis=1))
    assert np.median(skewed) >= 0.9 and np.mean(np.asarray(skewed) >= 0.8) >= 0.7, skewed
    assert max(uniform) < 0.35, uniform


def test_make_client_data_groups_large_beta():
    arrays, groups = grouped_data(n=800)
    data = make_client_data(arrays, num_clients=4, beta=1e6, seed=0, groups=groups)
    shares = group_shares(data, groups, 4, 4)
    assert np.all(np.abs(shares - 0.25) < 0.02), shares
    parts = ref_dirichlet_split(groups, 4, 1e6, 0)
    train, test = ref_hold_out(parts, 0.2, 0)
    for c in range(4):
        assert client_ids(data, c) == (train[c].tolist(), test[c].tolist())


def test_make_client_data_groups_with_pairs():
    x, y = unique_rows_data(n=200, num_classes=3)
    groups = np.arange(200) % 5
    data = make_client_data(x, y, 5, beta=0.05, seed=3, groups=groups)
    parts = ref_dirichlet_split(groups, 5, 0.05, 3)
    for c, part in enumerate(parts):
        train = recover_indices(data.x_train[c, : data.n_train[c]], data.y_train[c, : data.n_train[c]], x, y)
        test = recover_indices(data.x_test[c, : data.n_test[c]], data.y_test[c, : data.n_test[c]], x, y)
        assert sorted(train + test) == part.tolist()


@pytest.mark.parametrize(
    "groups, message",
    [
        (np.arange(10) % 2, r"groups must be one integer per example, shape \(12,\); got int64 \(10,\)"),
        (np.zeros(12), r"groups must be one integer per example, shape \(12,\); got float64"),
    ],
)
def test_make_client_data_groups_errors(groups, message):
    with pytest.raises(ValueError, match=message):
        make_client_data({"x": np.zeros((12, 2))}, num_clients=2, groups=groups)


@pytest.mark.parametrize(
    "data, kwargs, error, message",
    [
        (
            {"x": np.zeros((10, 3)), "y": np.zeros(9, int)},
            {},
            ValueError,
            r"the data: arrays of different lengths \(examples\): \{'x': 10, 'y': 9\}",
        ),
        ({"x": np.zeros((10, 3)), "s": np.float32(1.0)}, {}, ValueError, r"array 's' is a scalar"),
        ({"x": np.zeros((10, 3)), "name": np.array(["a"] * 10)}, {}, ValueError, r"array 'name' has dtype <U1"),
        ({"x": np.zeros((10, 3)), "z": np.zeros(10, complex)}, {}, ValueError, r"array 'z' has dtype complex128"),
        ({"x": np.zeros((10, 3)), "o": np.array([None] * 10)}, {}, ValueError, r"array 'o' has dtype object"),
        ({}, {}, ValueError, r"the data holds no arrays"),
        ({"x": np.zeros((0, 3))}, {}, ValueError, r"the data holds no examples"),
        (
            {"x": np.zeros((10, 3))},
            {"y": np.zeros(10, int)},
            ValueError,
            r"with dict data, give the test split as test=",
        ),
        ({"x": np.zeros((10, 3))}, {"x_test": np.zeros((4, 3))}, ValueError, r"with dict data"),
        ({"x": np.zeros((10, 3))}, {"y_test": np.zeros(4, int)}, ValueError, r"with dict data"),
        (
            {"x": np.zeros((10, 3)), "y": np.zeros(10, int)},
            {"test": {"x": np.zeros((4, 3))}},
            ValueError,
            r"the test split has arrays \['x'\], the data \['x', 'y'\]",
        ),
        (
            {"x": np.zeros((10, 3))},
            {"test": {"x": np.zeros((4, 3)), "extra": np.zeros(4)}},
            ValueError,
            r"the test split has arrays \['extra', 'x'\], the data \['x'\]",
        ),
        (
            {"x": np.zeros((10, 3)), "y": np.zeros(10, int)},
            {"test": {"x": np.zeros((4, 5)), "y": np.zeros(4, int)}},
            ValueError,
            r"test array 'x' has examples of shape \(5,\), the data \(3,\)",
        ),
        (
            {"x": np.zeros((10, 3))},
            {"test": {"x": np.zeros((4, 3, 1))}},
            ValueError,
            r"test array 'x' has examples of shape \(3, 1\), the data \(3,\)",
        ),
        (
            {"x": np.zeros((10, 3)), "y": np.zeros(10, int)},
            {"test": {"x": np.zeros((4, 3)), "y": np.zeros(5, int)}},
            ValueError,
            r"the test split: arrays of different lengths \(examples\): \{'x': 4, 'y': 5\}",
        ),
        ({"tokens": np.zeros((10, 4), int)}, {"shift": True}, ValueError, r"shift moves float features x"),
        ({"x": np.zeros((10, 4), int), "y": np.zeros(10, int)}, {"shift": True}, ValueError, r"shift moves float"),
        (
            {"x": np.zeros((10, 2)), "id": np.arange(10) + 2**40},
            {},
            ValueError,
            r"array 'id' holds integers beyond int32",
        ),
        (
            {"x": np.zeros((10, 2)), "y": np.zeros(10, int)},
            {"test": {"x": np.zeros((4, 2)), "y": np.zeros(4)}},
            ValueError,
            r"test array 'y' is float32, the data's int32",
        ),
        (
            {"x": np.zeros((10, 2))},
            {"groups": np.arange(10) % 2, "beta": None},
            ValueError,
            r"groups are split by a Dirichlet\(beta\) draw: give beta",
        ),
        ({"x": np.zeros((10, 3))}, {"num_clients": None}, TypeError, r"make_client_data needs num_clients"),
        ({"x": np.zeros((10, 3))}, {"num_clients": 6}, ValueError, r"more clients than samples"),
        ({"x": np.zeros((10, 3))}, {"test_fraction": 1.0}, ValueError, r"test_fraction must be in \(0, 1\)"),
    ],
)
def test_make_client_data_dict_errors(data, kwargs, error, message):
    kwargs = {"num_clients": 2, **kwargs}
    with pytest.raises(error, match=message):
        make_client_data(data, **kwargs)


def test_make_client_data_without_num_clients():
    with pytest.raises(TypeError, match=r"needs num_clients"):
        make_client_data({"x": np.zeros((10, 3))})
    with pytest.raises(TypeError, match=r"needs num_clients"):
        make_client_data(np.zeros((10, 3)), np.zeros(10, int))


def test_make_client_data_pairs_reject_a_dict_test_split():
    with pytest.raises(ValueError, match=r"with \(x, y\) data, give the test split as x_test and y_test"):
        make_client_data(np.zeros((10, 3)), np.zeros(10, int), 2, test={"x": np.zeros((4, 3))})
    with pytest.raises(ValueError, match=r"give labels y with features x"):
        make_client_data(np.zeros((10, 3)), num_clients=2)


@pytest.mark.parametrize("num_clients, seed", [(3, 0), (4, 9), (1, 2)])
def test_make_client_data_dict_test_split_iid(num_clients, seed):
    rng = np.random.default_rng(1)
    n, m = 50, 23
    arrays = {"tokens": rng.integers(0, 100, size=(n, 5)), "id": np.arange(n)}
    test = {"tokens": rng.integers(0, 100, size=(m, 5)), "id": 1000 + np.arange(m)}
    data = make_client_data(arrays, num_clients=num_clients, seed=seed, test=test)
    assert not data.labels
    split_rng = np.random.default_rng(seed)
    expected_train = ref_iid_split(n, num_clients, split_rng)
    expected_test = ref_iid_split(m, num_clients, split_rng)  # the same generator, next draw
    for c in range(num_clients):
        ids_train, ids_test = client_ids(data, c)
        assert ids_train == expected_train[c].tolist()
        assert ids_test == (1000 + expected_test[c]).tolist()
    assert int(data.n_train.sum()) == n and int(data.n_test.sum()) == m
    assert sorted(data.global_test["id"].tolist()) == (1000 + np.arange(m)).tolist(), "test ids partition the split"
    check_dict_rows(
        data,
        arrays,
        [client_ids(data, c)[0] for c in range(num_clients)],
        [client_ids(data, c)[1] for c in range(num_clients)],
        test_arrays=test,
        test_offset=1000,
    )


def test_make_client_data_dict_test_split_with_labels():
    """Labels and a dict test split: each client's test examples are its per-class share."""
    arrays = mixed_data(n=200)
    rng = np.random.default_rng(3)
    m = 60
    test = {
        "x": rng.normal(size=(m, 3)),
        "y": rng.integers(0, 4, size=m),
        "w": np.ones(m, bool),
        "tokens": np.zeros((m, 5), int),
        "id": 1000 + np.arange(m),
    }
    data = make_client_data(arrays, num_clients=4, beta=0.2, seed=8, test=test)
    parts, held = ref_dirichlet_split(arrays["y"], 4, 0.2, 8, test_keys=test["y"])
    for c in range(4):
        ids_train, ids_test = client_ids(data, c)
        assert ids_train == parts[c].tolist(), "no hold-out: the client's whole split trains"
        assert ids_test == (1000 + held[c]).tolist(), "its per-class share of the test split"
    assert sorted(data.global_test["id"].tolist()) == (1000 + np.arange(m)).tolist()
    check_dict_rows(
        data,
        arrays,
        [client_ids(data, c)[0] for c in range(4)],
        [client_ids(data, c)[1] for c in range(4)],
        test_arrays=test,
        test_offset=1000,
    )


def test_make_client_data_groups_with_a_test_split():
    """A groups split: the test split is cut IID (its own draw from default_rng(seed))."""
    arrays, groups = grouped_data(n=120)
    m = 31
    test = {"x": np.zeros((m, 2)), "y": np.zeros(m, int), "id": 1000 + np.arange(m)}
    data = make_client_data(arrays, num_clients=4, beta=0.05, seed=7, groups=groups, test=test)
    parts = ref_dirichlet_split(groups, 4, 0.05, 7)
    held = ref_iid_split(m, 4, np.random.default_rng(7))
    for c in range(4):
        assert client_ids(data, c) == (parts[c].tolist(), (1000 + held[c]).tolist())
