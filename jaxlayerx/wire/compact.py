"""The compact sparse wire: each layer's entries in the cheapest of four encodings.

A payload (:data:`jaxlayerx.payload.Payload`) becomes a handful of arrays, however many layers
it holds, so that no layer pays a serialization header of its own:

==========  ========  ============================================================
key         dtype     holds
==========  ========  ============================================================
``header``  uint8     the layout: format version, then per layer its name, encoding,
                      value form, value group, entry count and shape (below)
``values0`` any       the sent values of the layers of value group 0, in payload
                      order; ``values1``... for layers whose values travel in
                      another dtype
``index``   uint8     the layers' index encodings, concatenated (absent if none)
``scales``  float32   one scale per int8-quantized layer, in payload order (absent
                      if none)
==========  ========  ============================================================

Each layer's entries are encoded in the cheapest way that carries exactly them, for a layer
of ``size`` entries of which ``count`` are sent, ``w`` the bytes of the smallest unsigned
integer type that addresses the layer (uint8 up to 256 entries, uint16 up to 65,536...):

==================  =====================================  ==========================
encoding            index bytes                            when possible
==================  =====================================  ==========================
``dense``           0                                      every entry is sent
``indices``         ``count * w``: flat row-major indices  always
``complement``      ``(size - count) * w``: the unsent     always
``bitmask``         ``ceil(size / 8)``: one bit an entry   always
==================  =====================================  ==========================

Ties go to the encoding listed first. The values cost the same whatever the encoding, so a
layer never costs more than its dense form plus its share of the header, for float32
values (``w <= 4``). Indices are ascending; a bitmask is little-endian within each byte,
its padding bits zero.

The header is bytes: ``1`` (the format version), then the number of layers, then per
layer: the name's length and its UTF-8 bytes, the encoding (0 dense, 1 indices, 2
complement, 3 bitmask), the value form (0 plain values, 1 bfloat16 update, 2 int8 update;
see :mod:`jaxlayerx.quantize`), the value group, the count, the number of dimensions and
each dimension. Numbers are unsigned LEB128 varints; the encoding and the form are one
byte each.

On the Message API the arrays are one ``ArrayRecord`` under their keys; on the legacy
route a list in the order of the table (the header says which follow).

Decoding checks everything against the receiving model before it allocates anything
sized by the payload: a declared shape must be the model's, and every count, length and
index is checked against it.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np

from jaxlayerx.errors import unknown_layer
from jaxlayerx.payload import Entries, Payload
from jaxlayerx.quantize import Quantize
from jaxlayerx.validation import check_payload, check_shape
from jaxlayerx.wire.npy import npy_nbytes

FORMAT_VERSION = 1
HEADER_KEY = "header"
INDEX_KEY = "index"
SCALES_KEY = "scales"
VALUES_PREFIX = "values"

#: The encodings, in the order ties are broken.
DENSE, INDICES, COMPLEMENT, BITMASK = 0, 1, 2, 3
ENCODINGS = ("dense", "indices", "complement", "bitmask")
_FORMS: tuple[Quantize | None, ...] = (None, "bf16", "int8")

#: How arrays travel: ``"record"`` (an ``ArrayRecord``, keys counted) or ``"ndarrays"`` (a list).
Container = Literal["record", "ndarrays"]


class LayerCount(NamedTuple):
    """What a codec's ``nbytes`` needs of one sent layer: its name, shape, the dtype its
    values travel in, how many of its entries are sent, and how they are quantized."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    entries: int
    quantized: Quantize | None = None


def index_dtype(size: int) -> np.dtype:
    """The smallest unsigned integer dtype that addresses ``size`` entries."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype).newbyteorder("<")
    return np.dtype(np.uint64).newbyteorder("<")


def choose_encoding(size: int, count: int) -> tuple[int, int]:
    """``(encoding, index bytes)`` of the cheapest encoding of ``count`` of ``size`` entries."""
    width = index_dtype(size).itemsize
    costs = [
        0 if count == size else None,
        count * width,
        (size - count) * width,
        (size + 7) // 8,
    ]
    cost, encoding = min((cost, encoding) for encoding, cost in enumerate(costs) if cost is not None)
    return encoding, cost


# --- encoding ---------------------------------------------------------------------------


def encode(payload: Payload) -> collections.OrderedDict[str, np.ndarray]:
    """The arrays of ``payload``, keyed as in the module docstring, in that order."""
    header = bytearray([FORMAT_VERSION])
    _put_varint(header, len(payload))
    groups: dict[np.dtype, list[np.ndarray]] = {}
    index: list[bytes] = []
    scales: list[np.float32] = []
    for name, entries in payload.items():
        values = np.asarray(entries.values).reshape(-1)
        size = entries.size
        if values.size > size:
            raise ValueError(f"layer {name!r}: {values.size} values for a layer of {size} entries")
        encoding, _ = choose_encoding(size, values.size)
        group = list(groups).index(values.dtype) if values.dtype in groups else len(groups)
        groups.setdefault(values.dtype, []).append(values)
        encoded_name = name.encode("utf-8")
        _put_varint(header, len(encoded_name))
        header += encoded_name
        header += bytes([encoding, _FORMS.index(entries.quantized)])
        for number in (group, values.size, len(entries.shape), *entries.shape):
            _put_varint(header, int(number))
        if encoding != DENSE:
            index.append(_index_bytes(encoding, entries.flat_indices(), size))
        if entries.quantized == "int8":
            scales.append(np.float32(entries.scale))
    arrays: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
    arrays[HEADER_KEY] = np.frombuffer(bytes(header), np.uint8)
    for number, (dtype, parts) in enumerate(groups.items()):
        arrays[f"{VALUES_PREFIX}{number}"] = np.concatenate(parts) if parts else np.zeros(0, dtype)
    if index:
        arrays[INDEX_KEY] = np.frombuffer(b"".join(index), np.uint8)
    if scales:
        arrays[SCALES_KEY] = np.asarray(scales, np.float32)
    return arrays


def _index_bytes(encoding: int, flat: np.ndarray, size: int) -> bytes:
    if encoding == INDICES:
        return flat.astype(index_dtype(size)).tobytes()
    keep = np.zeros(size, bool)
    keep[flat] = True
    if encoding == COMPLEMENT:
        return np.flatnonzero(~keep).astype(index_dtype(size)).tobytes()
    return np.packbits(keep, bitorder="little").tobytes()


def _put_varint(buffer: bytearray, number: int) -> None:
    if number < 0:
        raise ValueError(f"a varint must be >= 0, got {number}")
    while True:
        low, number = number & 0x7F, number >> 7
        buffer.append(low | (0x80 if number else 0))
        if not number:
            return


# --- sizes -------------------------------------------------------------------------------


def compact_nbytes(layers: Iterable[LayerCount], container: Container) -> int:
    """Bytes of the compact payload of ``layers`` in ``container``, computed without encoding.

    Equal to the bytes Flower carries for :func:`encode`'s arrays: ``ArrayRecord.count_bytes``
    for ``"record"``, the serialized ``Parameters`` tensors for ``"ndarrays"``.
    """
    header = 1
    layers = list(layers)
    header += _varint_size(len(layers))
    group_counts: dict[np.dtype, int] = {}
    index = 0
    scales = 0
    for layer in layers:
        size = math.prod(layer.shape)
        dtype = np.dtype(layer.dtype)
        _, index_bytes = choose_encoding(size, layer.entries)
        group = list(group_counts).index(dtype) if dtype in group_counts else len(group_counts)
        group_counts[dtype] = group_counts.get(dtype, 0) + layer.entries
        name_bytes = len(layer.name.encode("utf-8"))
        header += _varint_size(name_bytes) + name_bytes + 2
        header += sum(_varint_size(n) for n in (group, layer.entries, len(layer.shape), *layer.shape))
        index += index_bytes
        scales += layer.quantized == "int8"
    arrays: list[tuple[str, np.dtype, int]] = [(HEADER_KEY, np.dtype(np.uint8), header)]
    arrays += [(f"{VALUES_PREFIX}{g}", dtype, n) for g, (dtype, n) in enumerate(group_counts.items())]
    if index:
        arrays.append((INDEX_KEY, np.dtype(np.uint8), index))
    if scales:
        arrays.append((SCALES_KEY, np.dtype(np.float32), scales))
    keys = container == "record"
    return sum(npy_nbytes(dtype, (n,)) + (len(key) if keys else 0) for key, dtype, n in arrays)


def _varint_size(number: int) -> int:
    return max(1, (int(number).bit_length() + 6) // 7)


# --- decoding ---------------------------------------------------------------------------


class _Layer(NamedTuple):
    name: str
    encoding: int
    form: Quantize | None
    group: int
    entries: int
    shape: tuple[int, ...]


def decode(
    arrays: Mapping[str, Any] | Sequence[Any], layout: Mapping[str, Any] | None, *, allow_nonfinite: bool = True
) -> Payload:
    """The payload of a compact payload's arrays, all of it checked against ``layout``.

    Args:
      arrays: ``key -> array`` (an ``ArrayRecord``'s entries) or the list of the legacy route.
      layout: the receiving model, ``name -> array`` (or anything with ``shape`` and ``dtype``);
        ``None`` to read the payload as it declares itself (its structure still checked;
        what it allocates is bounded by its own arrays' sizes).
      allow_nonfinite: accept NaN and infinite values.

    Raises:
      ValueError: a malformed payload: the header, missing, extra or mis-sized arrays,
        indices out of order or out of range, a bitmask whose count differs (naming the
        layer where there is one); shapes that differ from the model's.
      KeyError: a layer the model does not have (with the closest names).
      TypeError: arrays of the wrong dtype; values the layer does not accept.
    """
    if isinstance(arrays, Mapping):
        header = np.asarray(_required(arrays, HEADER_KEY))
    else:
        header = np.asarray(arrays[0]) if len(arrays) else np.zeros(0, np.uint8)
    if header.dtype != np.uint8 or header.ndim != 1:
        raise TypeError(f"the header must be a 1-D uint8 array, got dtype {header.dtype} and shape {header.shape}")
    layers = _read_header(header.tobytes(), layout)
    groups = max((layer.group for layer in layers), default=-1) + 1
    expected = [HEADER_KEY, *(f"{VALUES_PREFIX}{g}" for g in range(groups))]
    if any(layer.encoding != DENSE for layer in layers):
        expected.append(INDEX_KEY)
    if any(layer.form == "int8" for layer in layers):
        expected.append(SCALES_KEY)
    named = _named_arrays(arrays, expected)
    values = _split_values(named, layers, groups)
    offsets = _index_offsets(named, layers)
    scales = iter(_scales(named, layers))
    payload: Payload = collections.OrderedDict()
    for layer, layer_values in zip(layers, values):
        indices = None if layer.encoding == DENSE else _decode_indices(layer, named[INDEX_KEY], offsets[layer.name])
        scale = next(scales) if layer.form == "int8" else np.float32(1)
        payload[layer.name] = Entries(layer_values, indices, layer.shape, layer.form, scale)
    if layout is None:
        return payload
    return check_payload(payload, layout, allow_nonfinite=allow_nonfinite)


def is_compact(arrays: Sequence[Any]) -> bool:
    """Whether a list of arrays (the legacy route's) is a compact payload: it starts with the
    1-D uint8 header and does not end with a names array (fl4health's named and COO
    layouts do)."""
    if not arrays:
        return False
    first, last = np.asarray(arrays[0]), np.asarray(arrays[-1])
    return first.dtype == np.uint8 and first.ndim == 1 and not (last.dtype.kind == "U" and last.size)


def _is_list(arrays: Any) -> bool:
    return isinstance(arrays, (list, tuple))


def _required(arrays: Mapping[str, Any], key: str) -> Any:
    if key not in arrays:
        raise ValueError(f"a compact payload needs the array {key!r}; got {sorted(arrays)}")
    return arrays[key]


def _named_arrays(arrays: Mapping[str, Any] | Sequence[Any], expected: list[str]) -> dict[str, np.ndarray]:
    if _is_list(arrays):
        listed = list(arrays)  # pyright: ignore[reportUnknownArgumentType]
        if len(listed) != len(expected):
            raise ValueError(f"the header announces {len(expected)} arrays ({', '.join(expected)}), got {len(listed)}")
        return {key: np.asarray(array) for key, array in zip(expected, listed)}
    mapping: Mapping[str, Any] = arrays  # pyright: ignore[reportAssignmentType]
    if set(mapping) != set(expected):
        raise ValueError(f"the header announces the arrays {expected}, got {sorted(mapping)}")
    return {key: np.asarray(mapping[key]) for key in expected}


def _read_header(data: bytes, layout: Mapping[str, Any] | None) -> list[_Layer]:
    reader = _Reader(data)
    version = reader.byte("the format version")
    if version != FORMAT_VERSION:
        raise ValueError(f"compact payload format {version}, expected {FORMAT_VERSION}")
    count = reader.varint("the number of layers")
    if count > len(data):
        raise ValueError(f"the header announces {count} layers in {len(data)} bytes")
    layers: list[_Layer] = []
    seen: set[str] = set()
    for _ in range(count):
        name = reader.text()
        if name in seen:
            raise ValueError(f"layer {name!r} appears twice in the payload")
        seen.add(name)
        if layout is not None and name not in layout:
            raise unknown_layer(name, layout)
        encoding, form = reader.byte(f"layer {name!r}: the encoding"), reader.byte(f"layer {name!r}: the form")
        if encoding >= len(ENCODINGS) or form >= len(_FORMS):
            raise ValueError(f"layer {name!r}: unknown encoding {encoding} or value form {form}")
        group, entries = reader.varint(f"layer {name!r}: the group"), reader.varint(f"layer {name!r}: the count")
        ndim = reader.varint(f"layer {name!r}: the rank")
        if ndim > reader.remaining():
            raise ValueError(f"layer {name!r}: a {ndim}-d shape in a header of {len(data)} bytes")
        if layout is not None and ndim != len(np.shape(layout[name])):
            raise ValueError(f"layer {name!r}: expected shape {tuple(np.shape(layout[name]))}, got a {ndim}-d shape")
        shape = tuple(reader.varint(f"layer {name!r}: the shape") for _ in range(ndim))
        if layout is not None:
            check_shape(name, shape, tuple(np.shape(layout[name])))
        size = math.prod(shape)
        if entries > size or (encoding == DENSE and entries != size):
            raise ValueError(
                f"layer {name!r}: {entries} entries in {ENCODINGS[encoding]} form for a layer of {size} entries"
            )
        if group > count:
            raise ValueError(f"layer {name!r}: value group {group} of at most {count}")
        layers.append(_Layer(name, encoding, _FORMS[form], group, entries, shape))
    if not reader.done():
        raise ValueError(f"the header has {reader.remaining()} byte(s) after its last layer")
    return layers


def _split_values(named: Mapping[str, np.ndarray], layers: list[_Layer], groups: int) -> list[np.ndarray]:
    """Each layer's slice of its group's values, after checking every group's length."""
    totals = [0] * groups
    for layer in layers:
        totals[layer.group] += layer.entries
    for group, total in enumerate(totals):
        array = named[f"{VALUES_PREFIX}{group}"]
        if array.ndim != 1 or array.size != total:
            raise ValueError(f"value group {group}: expected {total} values in a 1-D array, got shape {array.shape}")
    offsets = [0] * groups
    sliced: list[np.ndarray] = []
    for layer in layers:
        start = offsets[layer.group]
        offsets[layer.group] = start + layer.entries
        sliced.append(named[f"{VALUES_PREFIX}{layer.group}"][start : start + layer.entries])
    return sliced


def _index_offsets(named: Mapping[str, np.ndarray], layers: list[_Layer]) -> dict[str, int]:
    offsets: dict[str, int] = {}
    total = 0
    for layer in layers:
        if layer.encoding == DENSE:
            continue
        offsets[layer.name] = total
        total += _index_nbytes(layer)
    if offsets:
        index = named[INDEX_KEY]
        if index.dtype != np.uint8 or index.ndim != 1 or index.size != total:
            raise ValueError(
                f"the index must be a 1-D uint8 array of {total} bytes, got dtype {index.dtype} shape {index.shape}"
            )
    return offsets


def _index_nbytes(layer: _Layer) -> int:
    size = math.prod(layer.shape)
    width = index_dtype(size).itemsize
    return {INDICES: layer.entries * width, COMPLEMENT: (size - layer.entries) * width, BITMASK: (size + 7) // 8}[
        layer.encoding
    ]


def _scales(named: Mapping[str, np.ndarray], layers: list[_Layer]) -> np.ndarray:
    quantized = sum(layer.form == "int8" for layer in layers)
    if not quantized:
        return np.zeros(0, np.float32)
    scales = named[SCALES_KEY]
    if scales.dtype != np.float32 or scales.shape != (quantized,):
        raise ValueError(f"expected {quantized} float32 scales, got dtype {scales.dtype} and shape {scales.shape}")
    return scales


def _decode_indices(layer: _Layer, index: np.ndarray, offset: int) -> np.ndarray:
    size = math.prod(layer.shape)
    chunk = index[offset : offset + _index_nbytes(layer)]
    if layer.encoding == BITMASK:
        bits = np.unpackbits(chunk, bitorder="little")
        if bits[size:].any():
            raise ValueError(f"layer {layer.name!r}: the bitmask sets bits past the layer's {size} entries")
        flat = np.flatnonzero(bits[:size])
        if flat.size != layer.entries:
            raise ValueError(
                f"layer {layer.name!r}: the bitmask marks {flat.size} entries, the header says {layer.entries}"
            )
        return flat.astype(np.int64, copy=False)
    listed = np.frombuffer(chunk.tobytes(), index_dtype(size)).astype(np.int64)
    if listed.size and (listed[-1] >= size or (listed.size > 1 and not (listed[1:] > listed[:-1]).all())):
        what = "unsent entries" if layer.encoding == COMPLEMENT else "indices"
        raise ValueError(
            f"layer {layer.name!r}: the {what} must be ascending, distinct and below the layer's {size} entries"
        )
    if layer.encoding == INDICES:
        return listed
    keep = np.ones(size, bool)
    keep[listed] = False
    return np.flatnonzero(keep)


class _Reader:
    """Reads bytes and varints off the header, never past its end."""

    def __init__(self, data: bytes) -> None:
        self.data, self.position = data, 0

    def byte(self, what: str) -> int:
        if self.position >= len(self.data):
            raise ValueError(f"the header ends before {what}")
        self.position += 1
        return self.data[self.position - 1]

    def varint(self, what: str) -> int:
        number = shift = 0
        while True:
            byte = self.byte(what)
            number |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return number
            shift += 7
            if shift > 63:
                raise ValueError(f"the header holds a number over 64 bits in {what}")

    def text(self) -> str:
        length = self.varint("a layer name's length")
        if length > self.remaining():
            raise ValueError(f"the header ends inside a layer name ({length} bytes announced)")
        raw = self.data[self.position : self.position + length]
        self.position += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"a layer name is not UTF-8: {raw[:40]!r}") from error

    def remaining(self) -> int:
        return len(self.data) - self.position

    def done(self) -> bool:
        return self.position == len(self.data)
