"""The data sets a simulation federates; none is downloaded at run time.

* ``digits``: scikit-learn's bundled 8x8 handwritten digits, 1797 examples.
* ``mnist1d``: MNIST-1D (Greydanus & Kobak, 2024), generated procedurally by the
  ``mnist1d`` package with its published default arguments (5000 signals of length 40,
  its own 4000/1000 train/test split); its download path is never called.
* a ``.npz`` file of your own: arrays ``x`` and ``y``, optionally ``x_test`` and ``y_test``.

Examples are float32 of shape ``(n, *feature_shape)``: images and signals channel-last
(digits ``(8, 8, 1)``, MNIST-1D ``(40, 1)``), feature vectors ``(features,)``; labels are
int32 in ``[0, num_classes)``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib
import random
import zipfile
from typing import Any, cast

import numpy as np

#: The bundled data sets by name.
DATASETS: tuple[str, ...] = ("digits", "mnist1d")


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Examples to federate, and their own test split when they have one.

    Attributes:
      name: ``digits``, ``mnist1d`` or the ``.npz`` file's name.
      x, y: the training examples and labels.
      x_test, y_test: the test split, or ``None``.
      num_classes: labels are in ``[0, num_classes)``.
    """

    name: str
    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    num_classes: int

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """The shape of one example."""
        return tuple(self.x.shape[1:])


def load_dataset(source: str | os.PathLike[str]) -> Dataset:
    """``digits``, ``mnist1d``, or the path of a ``.npz`` file (see :func:`load_npz`).

    Raises:
      ValueError: an unknown name. ImportError: the data set's package is not installed.
    """
    if str(source) in DATASETS:
        return load_digits() if str(source) == "digits" else load_mnist1d()
    if str(source).endswith(".npz"):
        return load_npz(source)
    raise ValueError(f"unknown data {str(source)!r}; choose from {', '.join(DATASETS)}, or a PATH.npz")


def load_digits_data() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled handwritten digits (no download), as flat vectors.

    Returns:
      ``x``: float32 ``(1797, 64)`` pixel values scaled to ``[0, 1]`` (divided by 16);
      ``y``: int32 ``(1797,)`` labels 0 to 9.

    Raises:
      ImportError: scikit-learn is not installed.
    """
    bundled = _sklearn_digits_file()
    if bundled is not None:
        # The file scikit-learn's load_digits reads (pixels, then the label, per row), read
        # without importing scikit-learn, which takes longer than the whole read.
        table = np.loadtxt(bundled, delimiter=",")
        data, target = table[:, :-1], table[:, -1].astype(np.int64)
    else:
        try:
            from sklearn.datasets import load_digits as sklearn_digits
        except ImportError as error:
            raise ImportError("the digits data set needs scikit-learn: pip install 'jaxlayerx[demo]'") from error
        digits = cast(Any, sklearn_digits())  # a Bunch, whose attributes scikit-learn leaves untyped
        data, target = digits.data, digits.target
    x = np.asarray(data, dtype=np.float32) / np.float32(16.0)
    y = np.asarray(target, dtype=np.int32)
    return x, y


def _sklearn_digits_file() -> pathlib.Path | None:
    """scikit-learn's ``datasets/data/digits.csv.gz``, found without importing scikit-learn."""
    try:
        spec = importlib.util.find_spec("sklearn")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = pathlib.Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


def load_digits() -> Dataset:
    """The digits as 8x8 single-channel images, ``(1797, 8, 8, 1)`` in ``[0, 1]``; no test split."""
    x, y = load_digits_data()
    return Dataset("digits", x.reshape(-1, 8, 8, 1), y, None, None, 10)


def load_mnist1d() -> Dataset:
    """MNIST-1D, generated with the ``mnist1d`` package's default arguments.

    ``(4000, 40, 1)`` training and ``(1000, 40, 1)`` test signals, standardized by the
    generator. Generated in about a second; nothing is read from the network or from disk.
    numpy's and Python's global random states, which the generator reseeds, are restored.

    Raises:
      ImportError: ``mnist1d`` is not installed.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset  # pyright: ignore[reportUnknownVariableType]
    except ImportError as error:
        raise ImportError("the mnist1d data set needs the mnist1d package: pip install 'jaxlayerx[demo]'") from error
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        data = cast("dict[str, Any]", make_dataset(get_dataset_args()))
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    x, x_test = (np.asarray(data[key], np.float32)[..., None] for key in ("x", "x_test"))
    y, y_test = (np.asarray(data[key], np.int32) for key in ("y", "y_test"))
    return Dataset("mnist1d", x, y, x_test, y_test, 10)


def load_npz(path: str | os.PathLike[str]) -> Dataset:
    """Arrays ``x`` and ``y`` (and optionally ``x_test`` and ``y_test``) from a ``.npz`` file.

    ``x`` holds one example per row, of any shape (cast to float32); ``y`` one integer label
    per example. ``num_classes`` is the largest label plus one.

    Raises:
      FileNotFoundError: no such file. KeyError: ``x`` or ``y`` is missing, or only one of
      ``x_test``/``y_test`` is there. ValueError: not an ``.npz`` archive, or one that cannot be
      read; an array without examples; labels that are not integers (or integer-valued),
      negative labels, a label array that is not 1-D, or lengths that differ.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such .npz file: {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path.name} is not an .npz archive (a zip of .npy arrays, as numpy.savez writes)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (ValueError, EOFError, OSError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path.name}: cannot read its arrays ({type(error).__name__}: {error})") from error
    for key in ("x", "y"):
        if key not in arrays:
            raise KeyError(f"{path.name}: no array {key!r} (found {sorted(arrays) or 'none'}); expected x and y")
    if ("x_test" in arrays) != ("y_test" in arrays):
        present, absent = ("x_test", "y_test") if "x_test" in arrays else ("y_test", "x_test")
        raise KeyError(f"{path.name}: {present!r} without {absent!r}; give both or neither")
    x, y = _examples(path.name, arrays["x"], arrays["y"], "x", "y")
    x_test = y_test = None
    if "x_test" in arrays:
        x_test, y_test = _examples(path.name, arrays["x_test"], arrays["y_test"], "x_test", "y_test")
        if x_test.shape[1:] != x.shape[1:]:
            raise ValueError(f"{path.name}: x_test examples have shape {x_test.shape[1:]}, x examples {x.shape[1:]}")
    labels = y if y_test is None else np.concatenate([y, y_test])
    return Dataset(path.name, x, y, x_test, y_test, int(labels.max()) + 1 if labels.size else 0)


def _examples(file: str, x: np.ndarray, y: np.ndarray, x_key: str, y_key: str) -> tuple[np.ndarray, np.ndarray]:
    if x.ndim >= 1 and len(x) == 0:
        raise ValueError(f"{file}: {x_key!r} holds no examples")
    if x.ndim < 1 or x.dtype.kind not in "biuf":
        raise ValueError(
            f"{file}: {x_key!r} must be a numeric array with one example per row, got dtype {x.dtype} and shape {x.shape}"
        )
    if y.ndim != 1:
        raise ValueError(f"{file}: {y_key!r} must be 1-D (one label per example), got shape {y.shape}")
    if len(x) != len(y):
        raise ValueError(f"{file}: {len(x)} examples in {x_key!r} but {len(y)} labels in {y_key!r}")
    if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        y = y.astype(np.int64)
    if y.dtype.kind not in "iu":
        raise ValueError(f"{file}: {y_key!r} must hold integer class labels, got dtype {y.dtype}")
    if y.size and y.min() < 0:
        raise ValueError(f"{file}: {y_key!r} holds the negative label {int(y.min())}; labels are in [0, classes)")
    if y.size and y.max() >= 2**31:
        raise ValueError(f"{file}: {y_key!r} holds the label {int(y.max())}; labels are class indices in [0, classes)")
    return x.astype(np.float32), y.astype(np.int32)
