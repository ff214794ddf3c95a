"""A server's state on disk: arrays in an ``.npz``, the rest in JSON, each written atomically
and each checkpoint self-verifying, the previous one kept.

The checkpoint of round ``r`` is ``state-<r>.json`` and the ``arrays-<r>.npz`` it names
(:data:`STATE_FILE`, :data:`ARRAYS_FILE`). The JSON records the arrays file's SHA-256 and
size, and a SHA-256 of its own content. Every file is written to a temporary file in the
same directory, flushed to disk and renamed over its destination (``os.replace``), the
arrays first, the state last (the commit point); only then are older checkpoints deleted,
keeping the newest :data:`KEEP`. :func:`load_checkpoint` takes the newest checkpoint that
verifies: a torn one (unparsable, a checksum, size or shape that disagrees, a file
missing) is logged and passed over for the previous one. Array dtypes are kept by name in
the JSON, so bfloat16 (which ``numpy.savez`` writes as raw ``|V2``) comes back bit for bit.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any, cast

import ml_dtypes as ml_dtypes  # noqa: F401 - registers bfloat16 and the other JAX dtypes with numpy
import numpy as np

logger = logging.getLogger(__name__)

#: A checkpoint's commit point, by round: it names and checks the arrays file of the same round.
STATE_FILE = "state-{round:06d}.json"
#: A checkpoint's arrays, by round.
ARRAYS_FILE = "arrays-{round:06d}.npz"
#: How many checkpoints :func:`save_checkpoint` keeps (the newest and the one before it).
KEEP = 2
#: Bumped when the layout changes.
FORMAT_VERSION = 2

_CHECKPOINT = re.compile(r"state-(\d+)\.json|arrays-(\d+)\.npz")
_TEMPORARY = re.compile(r"\.(state|arrays)-\d+\.(json|npz)\..*\.tmp")


class _Torn(Exception):
    """A checkpoint that does not verify: why, in words."""


def save_checkpoint(
    directory: str | os.PathLike[str], arrays: Mapping[str, np.ndarray], state: Mapping[str, Any]
) -> Path:
    """Writes ``arrays`` and the JSON-serializable ``state`` (which holds ``"round"``) atomically,
    then deletes all but the newest :data:`KEEP` checkpoints (this one and the one before it).

    Returns:
      The path of this checkpoint's state file.

    Raises:
      TypeError: ``state`` is not JSON-serializable (nothing is written).
      KeyError: ``state`` has no ``"round"``.
    """
    folder = Path(directory)
    server_round = int(state["round"])
    body = json.loads(json.dumps(dict(state)))  # fails before anything is written
    buffer = io.BytesIO()
    np.savez(buffer, *[np.asarray(a) for a in arrays.values()])
    data = buffer.getvalue()
    arrays_file = ARRAYS_FILE.format(round=server_round)
    document: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "state": body,
        "arrays": {
            "file": arrays_file,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "names": list(arrays),
            "dtypes": [np.asarray(array).dtype.name for array in arrays.values()],
            "shapes": [list(np.shape(array)) for array in arrays.values()],
        },
    }
    document["sha256"] = _digest(document)
    text = json.dumps(document)
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write(folder / arrays_file, lambda file: file.write(data))
    state_path = folder / STATE_FILE.format(round=server_round)
    _atomic_write(state_path, lambda file: file.write(text.encode("utf-8")))
    _delete_stale(folder, server_round)
    return state_path


def load_checkpoint(
    directory: str | os.PathLike[str],
) -> tuple[collections.OrderedDict[str, np.ndarray], dict[str, Any]] | None:
    """The ``(arrays, state)`` of the newest checkpoint in ``directory`` that verifies, or
    ``None`` when there is none; a torn newer one is logged (a warning) and passed over.

    Raises:
      ValueError: every checkpoint is torn (each named, with why), or one is of another format.
    """
    folder = Path(directory)
    candidates = _state_files(folder)
    if not candidates:
        if (folder / "state.json").exists():
            raise ValueError(f"{folder / 'state.json'}: checkpoint format 1, expected {FORMAT_VERSION}")
        return None
    torn: list[str] = []
    for _, path in candidates:
        try:
            loaded = _read(path)
        except _Torn as error:
            logger.warning("torn checkpoint %s: %s", path, error)
            torn.append(f"{path.name} ({error})")
            continue
        if torn:
            logger.warning("checkpoint %s used instead of the torn %s", path, ", ".join(torn))
        return loaded
    raise ValueError(f"{folder}: every checkpoint is torn: {'; '.join(torn)}")


def _read(path: Path) -> tuple[collections.OrderedDict[str, np.ndarray], dict[str, Any]]:
    """The checkpoint whose state file is ``path``, verified; :class:`_Torn` when it is not whole."""
    document = _read_document(path)
    meta: dict[str, Any] = document["arrays"]
    file_name, size, digest = str(meta["file"]), int(meta["bytes"]), str(meta["sha256"])
    try:
        data = (path.parent / file_name).read_bytes()
    except OSError as error:
        raise _Torn(f"{file_name}: {error.strerror or error}") from None
    if len(data) != size:
        raise _Torn(f"{file_name}: {len(data)} bytes, expected {size}")
    if hashlib.sha256(data).hexdigest() != digest:
        raise _Torn(f"{file_name}: its SHA-256 disagrees with {path.name}")
    names: list[str] = meta["names"]
    dtypes: list[str] = meta["dtypes"]
    shapes: list[list[int]] = meta["shapes"]
    arrays: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as stored:
            for i, (name, dtype_name, shape) in enumerate(zip(names, dtypes, shapes, strict=True)):
                array = stored[f"arr_{i}"]
                dtype = np.dtype(dtype_name)
                if array.dtype != dtype:
                    array = array.view(dtype)
                if list(array.shape) != shape:
                    raise _Torn(f"{file_name}: layer {name!r}: expected shape {tuple(shape)}, got {array.shape}")
                arrays[name] = array
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        raise _Torn(f"{file_name}: {error}") from None
    state: dict[str, Any] = document["state"]
    return arrays, state


def _read_document(path: Path) -> dict[str, Any]:
    """The JSON of a state file whose checksum agrees with its content, else :class:`_Torn`.

    Raises:
      ValueError: a checkpoint of another format.
    """
    try:
        parsed: Any = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _Torn(f"unreadable: {error}") from None
    if not isinstance(parsed, dict):
        raise _Torn("not a JSON object")
    document = cast(dict[str, Any], parsed)
    checksum = document.pop("sha256", None)
    if checksum != _digest(document):
        raise _Torn("its checksum disagrees with its content")
    if document.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {document.get('format')!r}, expected {FORMAT_VERSION}")
    return document


def _digest(document: Mapping[str, Any]) -> str:
    """SHA-256 of ``document`` written canonically (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(document, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def _state_files(folder: Path) -> list[tuple[int, Path]]:
    """``(round, path)`` of each state file in ``folder``, newest round first."""
    found: list[tuple[int, Path]] = []
    for path in folder.glob("state-*.json"):
        if (r := _round(path)) is not None:
            found.append((r, path))
    return sorted(found, reverse=True)


def _round(path: Path) -> int | None:
    """The round of a checkpoint file (``state-<r>.json``, ``arrays-<r>.npz``), else ``None``."""
    match = _CHECKPOINT.fullmatch(path.name)
    return None if match is None else int(match.group(1) or match.group(2))


def _delete_stale(folder: Path, server_round: int) -> None:
    """Deletes the checkpoint files of every round but ``server_round`` and the newest committed
    ones before it (:data:`KEEP` in all), and the temporary files of interrupted writes."""
    earlier = [r for r, _ in _state_files(folder) if r < server_round]
    keep = {server_round, *earlier[: KEEP - 1]}
    for path in folder.iterdir():
        r = _round(path)
        if (r is not None and r not in keep) or _TEMPORARY.fullmatch(path.name):
            path.unlink(missing_ok=True)


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
