"""A server's state on disk: arrays in an ``.npz``, the rest in JSON, each written atomically.

A checkpoint directory holds ``state.json`` and the ``arrays-<round>.npz`` it names. Every
file is written to a temporary file in the same directory, flushed to disk and renamed
over its destination (``os.replace``), and ``state.json`` is written last: a server killed
at any moment leaves either the previous checkpoint or the new one, never a mix. Array
dtypes are kept by name in the JSON, so bfloat16 (which ``numpy.savez`` writes as raw
``|V2``) comes back bit for bit.
"""

from __future__ import annotations

import collections
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import ml_dtypes as ml_dtypes  # noqa: F401 - registers bfloat16 and the other JAX dtypes with numpy
import numpy as np

#: The checkpoint's commit point: it names the arrays file of the same checkpoint.
STATE_FILE = "state.json"
#: Bumped when the layout changes.
FORMAT_VERSION = 1


def save_checkpoint(
    directory: str | os.PathLike[str], arrays: Mapping[str, np.ndarray], state: Mapping[str, Any]
) -> Path:
    """Writes ``arrays`` and the JSON-serializable ``state`` (which holds ``"round"``) atomically.

    Returns:
      The path of ``state.json``.

    Raises:
      TypeError: ``state`` is not JSON-serializable (nothing is replaced).
      KeyError: ``state`` has no ``"round"``.
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    arrays_file = f"arrays-{int(state['round']):06d}.npz"
    document = {
        **state,
        "format": FORMAT_VERSION,
        "arrays_file": arrays_file,
        "names": list(arrays),
        "dtypes": [np.asarray(array).dtype.name for array in arrays.values()],
        "shapes": [list(np.shape(array)) for array in arrays.values()],
    }
    text = json.dumps(document)  # fails before anything is written
    _atomic_write(folder / arrays_file, lambda file: np.savez(file, *[np.asarray(a) for a in arrays.values()]))
    _atomic_write(folder / STATE_FILE, lambda file: file.write(text.encode("utf-8")))
    for stale in folder.glob("arrays-*.npz"):
        if stale.name != arrays_file:
            stale.unlink(missing_ok=True)
    return folder / STATE_FILE


def load_checkpoint(
    directory: str | os.PathLike[str],
) -> tuple[collections.OrderedDict[str, np.ndarray], dict[str, Any]] | None:
    """The ``(arrays, state)`` last saved in ``directory``, or ``None`` when there is none.

    Raises:
      ValueError: a checkpoint of another format, or arrays that disagree with the state.
    """
    folder = Path(directory)
    if not (folder / STATE_FILE).exists():
        return None
    state: dict[str, Any] = json.loads((folder / STATE_FILE).read_text("utf-8"))
    if state.get("format") != FORMAT_VERSION:
        raise ValueError(f"{folder / STATE_FILE}: checkpoint format {state.get('format')!r}, expected {FORMAT_VERSION}")
    names: list[str] = state.pop("names")
    dtypes: list[str] = state.pop("dtypes")
    shapes: list[list[int]] = state.pop("shapes")
    arrays: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
    with np.load(folder / state.pop("arrays_file"), allow_pickle=False) as stored:
        for i, (name, dtype_name, shape) in enumerate(zip(names, dtypes, shapes)):
            array = stored[f"arr_{i}"]
            dtype = np.dtype(dtype_name)
            if array.dtype != dtype:
                array = array.view(dtype)
            if list(array.shape) != shape:
                raise ValueError(f"checkpoint layer {name!r}: expected shape {tuple(shape)}, got {array.shape}")
            arrays[name] = array
    state.pop("format")
    return arrays, state


def _atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Writes through ``write`` into a temporary file beside ``path``, then renames it over ``path``."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
