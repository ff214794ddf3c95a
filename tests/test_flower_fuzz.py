"""Fuzzing the Message-API strategies' train aggregation (issue 24): hypothesis mixes
malformed replies with good ones and drives ``FedAvgLayers`` and ``FedAvgSparse`` through
``configure_train`` on a fake grid and their own ``aggregate_train`` (and a whole ``start()``).

Good replies are made by the library's encoder (``payload_to_record``); malformed ones are
built at Flower's record level (``ArrayRecord``, ``Array`` with raw ``dtype``/``shape``/
``stype``/``data``, ``MetricRecord``, ``ConfigRecord``, ``RecordDict``), the compact arrays
written by ``conftest.ref_compact_encode`` or byte by byte, so that the real decode path
(``records.record_to_payload``, ``decode_array``) reads them. Each malformed reply belongs
to a category of :data:`BAD` (``hypothesis.event`` records it); every finite value it
carries is :data:`SENTINEL`, which no good reply and no mean of good replies can hold.

The property, per round:

* the global model is an independent numpy float64 example-weighted mean of the good
  replies only (per layer for ``FedAvgLayers``, per weight for ``FedAvgSparse``), and what no
  good reply sent with a positive count stays bit-identical;
* every bad reply is rejected, its node named in ``history[-1].rejected`` and in the
  warning log; every good one is accepted;
* no global value is the sentinel, NaN or infinite; nothing raises;
* ``tracemalloc``'s peak during ``aggregate_train`` stays below :func:`memory_bound`, a small
  multiple of the model's and the replies' own bytes; the "huge" categories declare sizes
  of 10**7 to 10**10 elements, so an allocation of a declared size would blow it.

The fast tier runs each property with the hypothesis profile's count. The slow tier runs
``JAXLAYERX_FUZZ_EXAMPLES`` examples per strategy (default 2000), prints how many ran and
how often each category came, and checks that every category came at least once. A longer
run: ``JAXLAYERX_FUZZ_EXAMPLES=10000 python -m pytest -q -s tests/test_flower_fuzz.py -m slow``.
"""

from __future__ import annotations

import collections
import io
import logging
import math
import os
import tracemalloc
import uuid
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np
import pytest
from conftest import RefLayer, _ref_varint, bits, fake_grid_class, ref_compact_encode
from hypothesis import event, given, settings
from hypothesis import strategies as st

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.common.constant import SType  # noqa: E402

from jaxlayerx.flower.records import arrays_to_record, decode_array, payload_to_record, record_to_arrays  # noqa: E402
from jaxlayerx.flower.serverapp import (  # noqa: E402
    ACCEPTED_KEY,
    REJECTED_KEY,
    ExchangeStrategy,
    FedAvgLayers,
    FedAvgSparse,
)
from jaxlayerx.payload import Entries  # noqa: E402
from jaxlayerx.validation import check_fits  # noqa: E402

#: Examples per strategy in the slow tier (the start() property runs a tenth of them).
FUZZ_EXAMPLES = int(os.environ.get("JAXLAYERX_FUZZ_EXAMPLES", "2000"))
BF16 = np.dtype(ml_dtypes.bfloat16)
LOGGER = "jaxlayerx.flower"
#: Every finite value of a bad reply: exact in float32, bfloat16 and int32, and far from any
#: mean of the good replies' values (within +-100).
SENTINEL = 8192.0
SHAPES = {"dense/kernel": (3, 4), "dense/bias": (4,), "head/kernel": (4, 2), "counter": (2,), "scale": ()}
DTYPES = {"dense/kernel": np.float32, "dense/bias": np.float32, "head/kernel": BF16, "counter": np.int32}
FLOATS = ["dense/kernel", "dense/bias", "head/kernel", "scale"]
MAX_GOOD = 3
CLASSES = [FedAvgLayers, FedAvgSparse]


def global_model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    model = {}
    for name, shape in SHAPES.items():
        dtype = np.dtype(DTYPES.get(name, np.float32))
        values = rng.integers(-50, 50, size=shape) if dtype.kind == "i" else rng.normal(size=shape)
        model[name] = np.asarray(values).astype(dtype)
    return model


MODEL = global_model()
MODEL_NBYTES = sum(value.nbytes for value in MODEL.values())


# --- good replies ---------------------------------------------------------------------------


class Good(NamedTuple):
    """A good reply: what it sends (``Entries`` in the dtypes they travel in) and its count."""

    entries: dict[str, Entries]
    count: int


def good_values(rng: np.random.Generator, name: str, size: int) -> np.ndarray:
    """Values for a layer in a dtype the dtype policy accepts for it (its own mostly)."""
    dtype = np.dtype(DTYPES.get(name, np.float32))
    if dtype.kind == "i":
        choice = rng.choice(["own", "int8", "bool"], p=[0.8, 0.1, 0.1])
        event(f"good: {choice} into an int32 layer")
        if choice == "bool":
            return rng.integers(0, 2, size).astype(bool)
        return rng.integers(-100, 101, size).astype(np.int32 if choice == "own" else np.int8)
    choice = rng.choice(["own", "float64", "float16", "int16", "bool"], p=[0.6, 0.1, 0.1, 0.1, 0.1])
    event(f"good: {choice} into a float layer")
    if choice == "bool":
        return rng.integers(0, 2, size).astype(bool)
    if choice == "int16":
        return rng.integers(-100, 101, size).astype(np.int16)
    return rng.uniform(-100, 100, size).astype(dtype if choice == "own" else choice)


def good_reply(seed: int, entrywise: bool) -> Good:
    rng = np.random.default_rng(seed)
    entries = {}
    for name, shape in SHAPES.items():
        if rng.random() < 0.5:
            continue
        size = math.prod(shape)
        if entrywise and rng.random() < 0.6:
            flat = np.sort(rng.choice(size, rng.integers(0, size + 1), replace=False)).astype(np.int64)
            entries[name] = Entries(good_values(rng, name, flat.size), flat, shape)
        else:
            entries[name] = Entries(good_values(rng, name, size), None, shape)
    kind = rng.choice(["zero", "huge", "plain"], p=[0.1, 0.05, 0.85])
    event(f"good: {kind} count")
    count = {"zero": 0, "huge": [2**63 - 1, 2**64 - 1][int(rng.integers(0, 2))], "plain": int(rng.integers(1, 1000))}[
        kind
    ]
    return Good(entries, count)


def good_content(good: Good) -> RecordDict:
    record = payload_to_record(collections.OrderedDict(good.entries))
    return RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": good.count})})


def reference(before: Mapping[str, np.ndarray], goods: list[Good]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``name -> (mean, sent)``: each weight's float64 example-weighted mean over the good
    replies that sent it with a positive count (values first cast to the layer's dtype, as
    the server casts them), and whether any did."""
    out = {}
    for name, old in before.items():
        sums, totals = np.zeros(old.size), np.zeros(old.size)
        for good in goods:
            if name not in good.entries or good.count == 0:
                continue
            entries = good.entries[name]
            flat = np.arange(old.size) if entries.indices is None else entries.indices
            values = np.asarray(entries.values).astype(old.dtype).astype(np.float64)
            sums[flat] += float(good.count) * values
            totals[flat] += float(good.count)
        sent = totals > 0
        out[name] = (np.divide(sums, totals, out=np.zeros(old.size), where=sent), sent)
    return out


def after_rounds(
    before: Mapping[str, np.ndarray], rounds: list[list[Good]]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``name -> (value, sent)`` after several rounds: each weight the mean of the last round
    in which a good reply sent it (over ``"senders"``, a mean ignores the value before)."""
    out = {name: (np.zeros(old.size), np.zeros(old.size, bool)) for name, old in before.items()}
    for goods in rounds:
        for name, (mean, sent) in reference(before, goods).items():
            value, ever = out[name]
            out[name] = (np.where(sent, mean, value), ever | sent)
    return out


def check_means(
    now: Mapping[str, np.ndarray], before: Mapping[str, np.ndarray], expected: Mapping[str, tuple[np.ndarray, Any]]
) -> None:
    """``now`` against ``expected`` (:func:`reference`): bit-identical to ``before`` where
    nothing was sent, the mean within the layer dtype's rounding elsewhere."""
    for name, (mean, sent) in expected.items():
        old, got = before[name], now[name]
        assert got.dtype == old.dtype and got.shape == old.shape, name
        flat_got, flat_old = got.reshape(-1), old.reshape(-1)
        assert bits(flat_got[~sent]).tobytes() == bits(flat_old[~sent]).tobytes(), f"{name}: an unsent weight moved"
        values = flat_got[sent].astype(np.float64)
        if old.dtype.kind == "i":  # rounded to the nearest integer
            assert np.all(np.abs(values - mean[sent]) <= 0.5 + 1e-3), (name, values, mean[sent])
        elif old.dtype == BF16:
            np.testing.assert_allclose(values, mean[sent], rtol=2**-7, atol=1e-3, err_msg=name)
        else:
            np.testing.assert_allclose(values, mean[sent], rtol=1e-5, atol=1e-4, err_msg=name)


# --- bad replies: raw material --------------------------------------------------------------


def sentinel(name: str, size: int, dtype: Any = None) -> np.ndarray:
    return np.full(size, SENTINEL, np.dtype(dtype or DTYPES.get(name, np.float32)))


def decoys(rng: np.random.Generator, entrywise: bool, names: list[str] | None = None) -> dict[str, RefLayer]:
    """One or two layers of sentinel values, valid on their own (partial under the sparse strategy)."""
    names = names or list(rng.choice(list(SHAPES), rng.integers(1, 3), replace=False))
    layers = {}
    for name in names:
        shape, size = SHAPES[name], math.prod(SHAPES[name])
        if entrywise and size > 1 and rng.random() < 0.5:
            flat = np.sort(rng.choice(size, rng.integers(1, size), replace=False))
            layers[name] = RefLayer(sentinel(name, flat.size), flat, shape)
        else:
            layers[name] = RefLayer(sentinel(name, size), None, shape)
    return layers


def record(arrays: Mapping[str, Any]) -> ArrayRecord:
    """An ``ArrayRecord`` of numpy arrays (serialized by Flower) or ready-made ``Array``s."""
    return ArrayRecord(
        {key: value if isinstance(value, Array) else Array(np.array(value, order="C")) for key, value in arrays.items()}
    )


def content(arrays: Mapping[str, Any] | ArrayRecord, count: Any = 3, **records: Any) -> RecordDict:
    """A reply: ``arrays`` under "arrays", the count under "num-examples", and ``records``."""
    payload = arrays if isinstance(arrays, ArrayRecord) else record(arrays)
    return RecordDict({"arrays": payload, "metrics": MetricRecord({"num-examples": count}), **records})


def decoy_arrays(rng: np.random.Generator, entrywise: bool) -> dict[str, np.ndarray]:
    """The compact arrays of :func:`decoys`."""
    return ref_compact_encode(decoys(rng, entrywise))


def raw(data: bytes, dtype: str = "uint8", shape: tuple[int, ...] | None = None, stype: str = SType.NUMPY) -> Array:
    """A Flower ``Array`` whose fields are exactly these (the data need not agree)."""
    return Array(dtype=dtype, shape=(len(data),) if shape is None else shape, stype=stype, data=data)


def npy(shape: tuple[int, ...], descr: str, body: bytes = b"") -> bytes:
    """An ``.npy`` blob whose header declares ``shape`` and ``descr``, followed by ``body``."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue() + body


def header(*layers: tuple[Any, ...], version: int = 1, count: int | None = None, tail: bytes = b"") -> np.ndarray:
    """A compact header written field by field: ``(name, encoding, form, group, entries, shape)``."""
    out = bytearray([version]) + _ref_varint(len(layers) if count is None else count)
    for name, encoding, form, group, entries, shape in layers:
        name = name.encode("utf-8") if isinstance(name, str) else name
        out += _ref_varint(len(name)) + name + bytes([encoding, form])
        for number in (group, entries, len(shape), *shape):
            out += _ref_varint(number)
    return np.frombuffer(bytes(out + tail), np.uint8).copy()


def one_layer(rng: np.random.Generator, floats_only: bool = False) -> tuple[str, tuple[int, ...], int]:
    name = str(rng.choice(FLOATS if floats_only else list(SHAPES)))
    return name, SHAPES[name], math.prod(SHAPES[name])


def header_only(layer: tuple[Any, ...]) -> RecordDict:
    """A reply whose header is ``layer`` (its values group 0 sentinel, sized as declared when small)."""
    name, _, _, _, entries, _ = layer
    dtype = DTYPES.get(name, np.float32) if isinstance(name, str) and name in SHAPES else np.float32
    arrays: dict[str, Any] = {"header": header(layer)}
    arrays["values0"] = sentinel("", min(int(entries), 64), dtype)
    return content(arrays)


def index_layer(rng: np.random.Generator) -> tuple[str, tuple[int, ...], int]:
    """A layer of more than one entry (every layer here has at most 256: one-byte indices)."""
    name = str(rng.choice(["dense/kernel", "dense/bias", "head/kernel", "counter"]))
    return name, SHAPES[name], math.prod(SHAPES[name])


def with_index(
    rng: np.random.Generator, encoding: int, index: list[int], count: int | None = None, name: str | None = None
) -> RecordDict:
    """A reply whose one layer has ``count`` entries in ``encoding``, its index bytes ``index``."""
    name = name or index_layer(rng)[0]
    entries = len(index) if count is None else count
    arrays = {
        "header": header((name, encoding, 0, 0, entries, SHAPES[name])),
        "values0": sentinel(name, entries),
        "index": np.asarray(index, np.uint8),
    }
    return content(arrays)


# --- bad replies: the categories ------------------------------------------------------------


def _missing_array(rng: np.random.Generator, entrywise: bool) -> RecordDict:
    arrays = decoy_arrays(rng, entrywise)
    arrays.pop(str(rng.choice(sorted(arrays))))
    return content(arrays)


def _renamed_array(rng: np.random.Generator, entrywise: bool) -> RecordDict:
    arrays = decoy_arrays(rng, entrywise)
    key = str(rng.choice(sorted(arrays)))
    arrays[str(rng.choice(["values7", "Header", "indices", "values"]))] = arrays.pop(key)
    return content(arrays)


def _duplicate_layer(rng: np.random.Generator, entrywise: bool) -> RecordDict:
    name, shape, size = one_layer(rng)
    layer = (name, 0, 0, 0, size, shape)
    return content({"header": header(layer, layer), "values0": sentinel(name, 2 * size)})


def _values_of(dtype: Any, make: Callable[[int], np.ndarray] | None = None) -> Callable[..., RecordDict]:
    """A float layer's values sent as ``dtype`` (``make(size)`` builds them)."""

    def build(rng: np.random.Generator, entrywise: bool) -> RecordDict:
        name, shape, size = one_layer(rng, floats_only=True)
        values = make(size) if make else np.full(size, SENTINEL).astype(dtype)
        return content(ref_compact_encode({name: RefLayer(values, None, shape)}))

    return build


def _counter_values(values: Callable[[int], np.ndarray]) -> Callable[..., RecordDict]:
    def build(rng: np.random.Generator, entrywise: bool) -> RecordDict:
        return content(ref_compact_encode({"counter": RefLayer(values(2), None, (2,))}))

    return build


def _object_npy(rng: np.random.Generator, entrywise: bool) -> RecordDict:
    arrays: dict[str, Any] = decoy_arrays(rng, entrywise)
    size = int(arrays["values0"].size)
    arrays["values0"] = raw(npy((size,), "|O", b"\x80\x04N." * size), dtype="object", shape=(size,))
    return content(arrays)


def _declared_dtype(rng: np.random.Generator, entrywise: bool) -> RecordDict:
    arrays: dict[str, Any] = decoy_arrays(rng, entrywise)
    values = Array(np.asarray(arrays["values0"], np.float64))
    arrays["values0"] = raw(values.data, dtype=str(rng.choice(["float32", "int8", "bfloat16"])), shape=values.shape)
    return content(arrays)


def _declared_shape(rng: np.random.Generator, entrywise: bool) -> RecordDict:
    arrays: dict[str, Any] = decoy_arrays(rng, entrywise)
    key = str(rng.choice(sorted(arrays)))
    value = Array(np.array(arrays[key], order="C"))
    shape = [(value.shape[0] + 1,), (1, value.shape[0]), ()][int(rng.integers(0, 3))]
    arrays[key] = raw(value.data, dtype=value.dtype, shape=shape)
    return content(arrays)


def _changed_array(key: str, change: Callable[[np.ndarray], np.ndarray]) -> Callable[..., RecordDict]:
    """Decoy arrays with ``arrays[key]`` replaced by ``change(it)`` (a sparse decoy for "index")."""

    def build(rng: np.random.Generator, entrywise: bool) -> RecordDict:
        if key == "index":
            name, shape, size = index_layer(rng)
            arrays = ref_compact_encode({name: RefLayer(sentinel(name, 1), np.array([size - 1]), shape, encoding=1)})
        else:
            arrays = decoy_arrays(rng, entrywise)
        arrays[key] = change(np.asarray(arrays[key]))
        return content(arrays)

    return build


def _wrong_shape(rank: bool) -> Callable[..., RecordDict]:
    def build(rng: np.random.Generator, entrywise: bool) -> RecordDict:
        name, shape, size = one_layer(rng)
        if rank:
            declared = (size, 1) if shape else (1,)
        else:  # a scalar has no other shape of its rank
            declared = tuple(n + int(rng.integers(1, 3)) for n in shape) if shape else (2,)
        count = math.prod(declared)
        return content({"header": header((name, 0, 0, 0, count, declared)), "values0": sentinel(name, count)})

    return build


def _values_length(delta: int) -> Callable[..., RecordDict]:
    def build(rng: np.random.Generator, entrywise: bool) -> RecordDict:
        arrays = decoy_arrays(rng, entrywise)
        values = arrays["values0"]
        arrays["values0"] = values[: values.size + delta] if delta < 0 else np.concatenate([values, values[:delta]])
        return content(arrays)

    return build


def _nonfinite(value: float) -> Callable[..., RecordDict]:
    def build(rng: np.random.Generator, entrywise: bool) -> RecordDict:
        layers = decoys(rng, entrywise, [str(rng.choice(FLOATS))])
        (name, layer), *_ = layers.items()
        values = np.array(layer.values, copy=True)
        values[rng.integers(0, values.size)] = value
        layers[name] = layer._replace(values=values)
        return content(ref_compact_encode(layers))

    return build


def _count(value: Any) -> Callable[..., RecordDict]:
    def build(rng: np.random.Generator, entrywise: bool) -> RecordDict:
        return content(ref_compact_encode(decoys(rng, entrywise)), count=value)

    return build


def _huge_npy(key: str) -> Callable[..., RecordDict]:
    """``arrays[key]`` an npy blob whose header declares 10**7 to 10**10 elements (64 bytes held)."""

    def build(rng: np.random.Generator, entrywise: bool) -> RecordDict:
        arrays: dict[str, Any] = decoy_arrays(rng, entrywise)
        elements = int(10 ** rng.uniform(7, 10))
        shape = (elements,) if rng.random() < 0.5 else (elements // 1000, 1000)
        descr, dtype = ("|u1", "uint8") if key in ("header", "index") else ("<f8", "float64")
        arrays[key] = raw(npy(shape, descr, bytes(64)), dtype=dtype, shape=shape)
        return content(arrays)

    return build


def _huge_layer_shape(dense: bool) -> Callable[..., RecordDict]:
    """A real layer declared with 10**9 to 10**12 entries (a sparse layout's huge dense shape)."""

    def build(rng: np.random.Generator, entrywise: bool) -> RecordDict:
        name = str(rng.choice(["dense/bias", "counter"]))
        elements = int(10 ** rng.uniform(9, 12))
        if dense:
            return header_only((name, 0, 0, 0, elements, (elements,)))
        arrays = {"header": header((name, 1, 0, 0, 1, (elements,))), "values0": sentinel(name, 1)}
        arrays["index"] = np.zeros(8, np.uint8)
        return content(arrays)

    return build


def _quantized(values: Callable[[int], np.ndarray], form: int, scale: float = 1.0, counter: bool = False):
    def build(rng: np.random.Generator, entrywise: bool) -> RecordDict:
        name, shape, size = ("counter", (2,), 2) if counter else one_layer(rng, floats_only=True)
        return content(ref_compact_encode({name: RefLayer(values(size), None, shape, form=form, scale=scale)}))

    return build


def _npz(rng: np.random.Generator, entrywise: bool) -> RecordDict:
    arrays: dict[str, Any] = decoy_arrays(rng, entrywise)
    buffer = io.BytesIO()
    np.savez(buffer, values0=arrays["values0"])
    arrays["values0"] = raw(buffer.getvalue(), dtype=str(arrays["values0"].dtype), shape=arrays["values0"].shape)
    return content(arrays)


def _raw_data(change: Callable[[np.random.Generator, bytes], bytes], stype: str = SType.NUMPY):
    def build(rng: np.random.Generator, entrywise: bool) -> RecordDict:
        arrays: dict[str, Any] = decoy_arrays(rng, entrywise)
        key = str(rng.choice(sorted(arrays)))
        value = Array(np.array(arrays[key], order="C"))
        arrays[key] = raw(change(rng, value.data), dtype=value.dtype, shape=value.shape, stype=stype)
        return content(arrays)

    return build


def _header_change(change: Callable[[np.random.Generator, bytes], bytes]) -> Callable[..., RecordDict]:
    def build(rng: np.random.Generator, entrywise: bool) -> RecordDict:
        arrays = decoy_arrays(rng, entrywise)
        arrays["header"] = np.frombuffer(change(rng, arrays["header"].tobytes()), np.uint8).copy()
        return content(arrays)

    return build


def _first_layer(field: str, value: Callable[[np.random.Generator], Any]) -> Callable[..., RecordDict]:
    """A one-layer reply whose header field ``field`` (of ``name, encoding, form, group``) is ``value``."""

    def build(rng: np.random.Generator, entrywise: bool) -> RecordDict:
        name, shape, size = one_layer(rng)
        layer = dict(name=name, encoding=0, form=0, group=0)
        layer[field] = value(rng)
        return header_only((layer["name"], layer["encoding"], layer["form"], layer["group"], size, shape))

    return build


def _metrics(**records: Any) -> Callable[..., RecordDict]:
    def build(rng: np.random.Generator, entrywise: bool) -> RecordDict:
        return RecordDict({"arrays": record(ref_compact_encode(decoys(rng, entrywise))), **records})

    return build


def _scales_float64(rng: np.random.Generator, entrywise: bool) -> RecordDict:
    name, shape, size = one_layer(rng, floats_only=True)
    arrays = ref_compact_encode({name: RefLayer(np.ones(size, np.int8), None, shape, form=2)})
    arrays["scales"] = arrays["scales"].astype(np.float64)
    return content(arrays)


def _partial_layer(rng: np.random.Generator, entrywise: bool) -> RecordDict:
    name, shape, size = index_layer(rng)
    return content(ref_compact_encode({name: RefLayer(sentinel(name, 1), np.array([size - 1]), shape)}))


#: ``category -> (rng, entrywise) -> RecordDict``: every way a reply is malformed here.
BAD: dict[str, Callable[[np.random.Generator, bool], RecordDict]] = {
    # record keys: wrong, extra, missing
    "keys: no ArrayRecord": lambda rng, e: RecordDict({"metrics": MetricRecord({"num-examples": 3})}),
    "keys: the payload under another key": lambda rng, e: RecordDict(
        {"weights": record(decoy_arrays(rng, e)), "metrics": MetricRecord({"num-examples": 3})}
    ),
    "keys: an extra ArrayRecord": lambda rng, e: content(
        decoy_arrays(rng, e), extra=arrays_to_record({"x": np.zeros(2, np.float32)})
    ),
    "keys: an empty ArrayRecord": lambda rng, e: content(ArrayRecord()),
    "keys: an extra array": lambda rng, e: content(
        {**decoy_arrays(rng, e), str(rng.choice(["junk", "values9", "scales"])): np.zeros(3, np.float32)}
    ),
    "keys: a missing array": _missing_array,
    "keys: a renamed array": _renamed_array,
    "keys: named layers, not compact": lambda rng, e: content(
        arrays_to_record({name: sentinel(name, math.prod(SHAPES[name])).reshape(SHAPES[name]) for name in SHAPES})
    ),
    "keys: count in a ConfigRecord": lambda rng, e: RecordDict(
        {"arrays": record(decoy_arrays(rng, e)), "config": ConfigRecord({"num-examples": 3})}
    ),
    "keys: count under another key": _metrics(metrics=MetricRecord({"num_examples": 3, "loss": 0.5})),
    "keys: count in the second MetricRecord": _metrics(
        a=MetricRecord({"loss": 1.0}), b=MetricRecord({"num-examples": 3})
    ),
    "keys: unknown layer": lambda rng, e: content(
        ref_compact_encode(
            {str(rng.choice(["dense/kernal", "Dense/bias", "", "counter/0"])): RefLayer(sentinel("", 4), None, (4,))}
        )
    ),
    "keys: a layer twice": _duplicate_layer,
    # dtypes
    "dtype: complex": _values_of(np.complex64),
    "dtype: strings": _values_of("<U6", lambda size: np.full(size, "8192.0")),
    "dtype: bytes": _values_of("|S6", lambda size: np.full(size, b"8192.0")),
    "dtype: datetimes": _values_of("datetime64[s]", lambda size: np.full(size, 8192, "datetime64[s]")),
    "dtype: object npy": _object_npy,
    "dtype: declared dtype differs from the data": _declared_dtype,
    "dtype: floats into an integer layer": _counter_values(lambda size: np.full(size, SENTINEL, np.float32)),
    "dtype: integers beyond int32": _counter_values(lambda size: np.full(size, 2**40 + 8192, np.int64)),
    "dtype: float64 beyond the layer's range": _values_of(np.float64, lambda size: np.full(size, 1e300)),
    "dtype: a float32 header": _changed_array("header", lambda a: a.astype(np.float32)),
    "dtype: a 2-d header": _changed_array("header", lambda a: a.reshape(1, -1)),
    "dtype: a uint16 index": _changed_array("index", lambda a: a.astype(np.uint16)),
    # shapes and ranks
    "shape: another shape": _wrong_shape(rank=False),
    "shape: another rank": _wrong_shape(rank=True),
    "shape: 2-d values": _changed_array("values0", lambda a: a.reshape(1, -1)),
    "shape: 0-d values": _changed_array("values0", lambda a: a[:1].reshape(())),
    "shape: declared shape differs from the data": _declared_shape,
    "shape: too few values": _values_length(-1),
    "shape: too many values": _values_length(2),
    # NaN and infinities
    "nonfinite: nan": _nonfinite(np.nan),
    "nonfinite: inf": _nonfinite(np.inf),
    "nonfinite: -inf": _nonfinite(-np.inf),
    # example counts
    "count: negative": _count(-3),
    "count: fractional": _count(2.5),
    "count: a float": _count(3.0),
    "count: nan": _count(float("nan")),
    "count: inf": _count(float("inf")),
    "count: 2**64": _count(2**64),
    "count: 10**39": _count(10**39),
    "count: 10**400": _count(10**400),
    "count: a list": _count([3, 4]),
    "count: missing": _metrics(metrics=MetricRecord({"loss": 0.1})),
    "count: no MetricRecord": _metrics(),
    # sparse layouts
    "sparse: index out of range": lambda rng, e: with_index(rng, 1, [0, 200 + int(rng.integers(0, 56))]),
    "sparse: duplicate indices": lambda rng, e: with_index(rng, 1, [1, 1]),
    "sparse: unsorted indices": lambda rng, e: with_index(rng, 1, [1, 0]),
    "sparse: complement out of range": lambda rng, e: with_index(rng, 2, [255], count=1, name="counter"),
    "sparse: fewer indices than entries": lambda rng, e: with_index(rng, 1, [0], count=2),
    "sparse: more indices than entries": lambda rng, e: with_index(rng, 1, [0, 1, 2], count=1),
    "sparse: more entries than the layer": lambda rng, e: with_index(rng, 1, list(range(13)), count=13),
    "sparse: a bitmask of another count": lambda rng, e: with_index(rng, 3, [0b111], count=2, name="dense/bias"),
    "sparse: bitmask padding bits": lambda rng, e: with_index(rng, 3, [0b10001], count=1, name="dense/bias"),
    "sparse: dense form of fewer entries": lambda rng, e: header_only(("dense/bias", 0, 0, 0, 3, (4,))),
    "sparse: unknown encoding": _first_layer("encoding", lambda rng: int(rng.integers(4, 256))),
    "sparse: huge declared dense shape": _huge_layer_shape(dense=False),
    # gigabytes declared
    "huge: npy header of the values": _huge_npy("values0"),
    "huge: npy header of the header": _huge_npy("header"),
    "huge: npy header of the index": _huge_npy("index"),
    "huge: Array.shape field": lambda rng, e: content(
        {**decoy_arrays(rng, e), "values0": raw(Array(np.full(4, SENTINEL, np.float32)).data, "float32", (10**9,))}
    ),
    "huge: a dense layer of 10**9 entries": _huge_layer_shape(dense=True),
    "huge: 2**40 layers": lambda rng, e: content({"header": header(count=2**40), "values0": np.zeros(0, np.float32)}),
    "huge: a name of 2**40 bytes": _header_change(lambda rng, data: data[:2] + _ref_varint(2**40)),
    "huge: a rank of 10**9": lambda rng, e: content(
        {"header": header(count=1, tail=b"\x07counter\x00\x00\x00\x00" + _ref_varint(10**9)), "values0": np.zeros(0)}
    ),
    "huge: a varint over 64 bits": lambda rng, e: content(
        {"header": header(count=1, tail=b"\x07counter\x00\x00" + b"\xff" * 11 + b"\x01"), "values0": np.zeros(0)}
    ),
    "huge: value group 10**9": _first_layer("group", lambda rng: 10**9),
    # the header's bytes
    "header: another format version": _header_change(lambda rng, data: bytes([int(rng.integers(2, 256))]) + data[1:]),
    "header: bytes after the last layer": _header_change(lambda rng, data: data + b"\x00"),
    "header: cut short": _header_change(lambda rng, data: data[: int(rng.integers(0, len(data)))]),
    "header: a name not UTF-8": _first_layer("name", lambda rng: b"\xff\xfe"),
    "header: unknown value form": _first_layer("form", lambda rng: int(rng.integers(3, 256))),
    # undecodable data
    "data: random bytes": _raw_data(lambda rng, data: rng.bytes(len(data))),
    "data: an npz archive": _npz,
    "data: cut short": _raw_data(lambda rng, data: data[: int(rng.integers(0, len(data)))]),
    "data: another stype": _raw_data(lambda rng, data: data, stype="torch.Tensor"),
    # quantized updates
    "quantized: int8 into an integer layer": _quantized(lambda size: np.ones(size, np.int8), 2, counter=True),
    "quantized: a negative scale": _quantized(lambda size: np.ones(size, np.int8), 2, scale=-1.0),
    "quantized: a nan scale": _quantized(lambda size: np.ones(size, np.int8), 2, scale=float("nan")),
    "quantized: a scale overflowing the layer": _quantized(lambda size: np.full(size, 127, np.int8), 2, scale=3e38),
    "quantized: float32 values as int8": _quantized(lambda size: np.full(size, SENTINEL, np.float32), 2),
    "quantized: a nan bfloat16 update": _quantized(lambda size: np.full(size, np.nan, BF16), 1),
    "quantized: an infinite scale": _quantized(lambda size: np.ones(size, np.int8), 2, scale=np.inf),
    "quantized: float64 scales": _scales_float64,
}

#: Categories that are good replies to the sparse strategy (it takes some entries of a layer).
LAYERS_ONLY = {"sparse: some entries to a layer exchange": _partial_layer}


def categories(entrywise: bool) -> list[str]:
    return sorted(BAD) if entrywise else sorted({**BAD, **LAYERS_ONLY})


def bad_content(category: str, seed: int, entrywise: bool) -> RecordDict:
    return {**BAD, **LAYERS_ONLY}[category](np.random.default_rng(seed), entrywise)


# --- one round through configure_train and aggregate_train ----------------------------------


class Round(NamedTuple):
    """A drawn round: good replies' seeds, bad replies' ``(category, seed)``, the nodes (the
    good ones first) and the order the replies arrive in."""

    goods: list[int]
    bads: list[tuple[str, int]]
    nodes: list[int]
    order: list[int]


def bad_replies(entrywise: bool) -> st.SearchStrategy[tuple[str, int]]:
    """``(category, seed)``, the category picked by the seed: about uniform over the
    categories (hypothesis draws small indices far more often than large ones)."""
    names = categories(entrywise)
    pick = lambda seed: (names[int(np.random.default_rng([seed, 1]).integers(len(names)))], seed)  # noqa: E731
    return st.integers(0, 2**64 - 1).map(pick)


@st.composite
def rounds(draw: Any, entrywise: bool) -> Round:
    goods = draw(st.lists(st.integers(0, 2**32 - 1), max_size=MAX_GOOD))
    bads = draw(st.lists(bad_replies(entrywise), min_size=0 if goods else 1, max_size=4))
    count = len(goods) + len(bads)
    nodes = draw(st.lists(st.integers(1, 2**63 - 1), min_size=count, max_size=count, unique=True))
    return Round(goods, bads, nodes, list(draw(st.permutations(range(count)))))


class Warnings(logging.Handler):
    """Keeps the strategy's warnings."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def memory_bound(goods: int, reply_bytes: int) -> int:
    """The most ``aggregate_train`` may allocate at once: a small multiple of the model (the
    global model, the stacked replies, the returned record) and of the replies' own bytes,
    plus a fixed allowance for Python objects."""
    return 2**20 + 8 * (MODEL_NBYTES * (goods + 4) + reply_bytes)


def reply_nbytes(contents: list[RecordDict]) -> int:
    return sum(len(array.data) for c in contents for r in c.array_records.values() for array in r.values())


def new_strategy(cls: type[ExchangeStrategy], nodes: int) -> ExchangeStrategy:
    strategy = cls(min_train_nodes=nodes, min_available_nodes=nodes, fraction_evaluate=0.0)
    strategy.set_global_model(arrays_to_record(MODEL))
    return strategy


def train_messages(strategy: ExchangeStrategy, server_round: int, nodes: list[int]) -> dict[int, Message]:
    """The round's train messages by node, each given an id as Flower's grid does on push."""
    grid = fake_grid_class()({})
    grid.available = list(nodes)
    messages = strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid)
    for message in messages:
        message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
    return {message.metadata.dst_node_id: message for message in messages}


def check_global(now: Mapping[str, np.ndarray]) -> None:
    for name, value in now.items():
        wide = value.astype(np.float64)
        assert np.isfinite(wide).all() and not (wide == SENTINEL).any(), f"{name}: a bad reply's value got in"


def check_round(cls: type[ExchangeStrategy], case: Round, log: Warnings) -> list[str]:
    """One round of ``case`` against the property of the module docstring; returns its bad
    replies' categories."""
    entrywise = cls.entrywise
    goods = [good_reply(seed, entrywise) for seed in case.goods]
    contents = [good_content(good) for good in goods]
    contents += [bad_content(category, seed, entrywise) for category, seed in case.bads]
    for category, _ in case.bads:
        event(category)
    strategy = new_strategy(cls, len(case.nodes))
    messages = train_messages(strategy, 1, case.nodes)
    assert sorted(messages) == sorted(case.nodes)
    replies = [Message(contents[i], reply_to=messages[case.nodes[i]]) for i in case.order]
    before = {name: value.copy() for name, value in strategy.global_layers.items()}
    log.messages.clear()
    tracemalloc.reset_peak()
    start = tracemalloc.get_traced_memory()[0]
    _, metrics = strategy.aggregate_train(1, replies)
    peak = tracemalloc.get_traced_memory()[1] - start
    good_nodes, bad_nodes = case.nodes[: len(goods)], case.nodes[len(goods) :]
    round_record = strategy.history[-1]
    assert sorted(node for node, _ in round_record.rejected) == sorted(bad_nodes), round_record.rejected
    assert all(isinstance(reason, str) and reason for _, reason in round_record.rejected)
    assert sorted(reply.node for reply in round_record.accepted) == sorted(good_nodes)
    assert metrics is not None and (metrics[ACCEPTED_KEY], metrics[REJECTED_KEY]) == (len(goods), len(bad_nodes))
    for node in bad_nodes:
        assert any(f"node {node}:" in m and "rejected" in m for m in log.messages), (node, log.messages)
    check_means(strategy.global_layers, before, reference(before, goods))
    check_global(strategy.global_layers)
    bound = memory_bound(len(goods), reply_nbytes(contents))
    assert peak < bound, f"aggregate_train allocated {peak} bytes at its peak, more than {bound}"
    return [category for category, _ in case.bads]


def warm_up(cls: type[ExchangeStrategy]) -> None:
    """Compiles the averaging program for every number of good replies a round can hold, and
    the rebuilding of the quantized updates the bad replies send, so that no compilation
    counts in the memory measured."""
    every = Good({name: Entries(value.reshape(-1), None, value.shape) for name, value in MODEL.items()}, 1)
    for count in range(1, MAX_GOOD + 1):
        nodes = list(range(1, count + 1))
        strategy = new_strategy(cls, count)
        messages = train_messages(strategy, 1, nodes)
        strategy.aggregate_train(1, [Message(good_content(every), reply_to=messages[node]) for node in nodes])
    for form, dtype in ((1, BF16), (2, np.int8)):
        updates = {
            name: RefLayer(np.ones(math.prod(SHAPES[name]), dtype), None, SHAPES[name], form=form) for name in FLOATS
        }
        strategy, _ = one_round(cls, [content(ref_compact_encode(updates))])
        assert not strategy.history[-1].rejected, strategy.history[-1].rejected


def fuzz(
    check: Callable[[Any, Warnings], list[str]], draw: st.SearchStrategy[Any], max_examples: int | None
) -> collections.Counter:
    """Runs ``check(case, log)`` on hypothesis' cases (``max_examples``, or the profile's
    count) under ``tracemalloc``; returns how many examples ran and how often each category came."""
    seen: collections.Counter = collections.Counter()
    log = Warnings()
    logger = logging.getLogger(LOGGER)
    logger.addHandler(log)
    options = {} if max_examples is None else {"max_examples": max_examples}

    @settings(deadline=None, **options)
    @given(case=draw)
    def run(case: Any) -> None:
        seen["examples"] += 1
        seen.update(check(case, log))

    tracemalloc.start()
    try:
        run()
    finally:
        tracemalloc.stop()
        logger.removeHandler(log)
    return seen


def report(name: str, seen: collections.Counter, record_property: Callable[[str, Any], None]) -> None:
    """Prints and records the examples run and the bad replies per category."""
    bad = {category: n for category, n in seen.items() if category != "examples" and n}
    record_property("examples", seen["examples"])
    record_property("bad_replies", sum(bad.values()))
    print(f"\n{name}: {seen['examples']} examples, {sum(bad.values())} bad replies in {len(bad)} categories")
    for category, n in sorted(bad.items()):
        print(f"  {n:6d}  {category}")


@pytest.mark.hypothesis  # the profile's count: .ci/run's property step runs it "thorough"
@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_fuzzed_rounds_quick(cls, task_identity, record_property):
    """The property on the hypothesis profile's count of examples (the fast tier)."""
    warm_up(cls)
    seen = fuzz(lambda case, log: check_round(cls, case, log), rounds(cls.entrywise), None)
    report(cls.__name__, seen, record_property)


@pytest.mark.slow
@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_fuzzed_rounds(cls, task_identity, record_property):
    """The property on ``JAXLAYERX_FUZZ_EXAMPLES`` examples; every category drawn at least once."""
    warm_up(cls)
    seen = fuzz(lambda case, log: check_round(cls, case, log), rounds(cls.entrywise), FUZZ_EXAMPLES)
    report(cls.__name__, seen, record_property)
    assert seen["examples"] >= FUZZ_EXAMPLES
    missed = [category for category in categories(cls.entrywise) if not seen[category]]
    assert not missed, f"categories never drawn in {seen['examples']} examples: {missed}"


# --- whole runs: start() on a fake grid -----------------------------------------------------


class Run(NamedTuple):
    """A drawn run: per round, each node's reply (a good reply's seed, or ``(category, seed)``)."""

    rounds: list[dict[int, Any]]


@st.composite
def runs(draw: Any, entrywise: bool) -> Run:
    nodes = draw(st.lists(st.integers(1, 2**63 - 1), min_size=1, max_size=MAX_GOOD, unique=True))
    reply = st.one_of(st.integers(0, 2**32 - 1), bad_replies(entrywise))
    return Run([{node: draw(reply) for node in nodes} for _ in range(draw(st.integers(1, 3)))])


def check_start(cls: type[ExchangeStrategy], run: Run, log: Warnings) -> list[str]:
    """``start()`` over ``run``'s rounds: each round rejects exactly its bad replies, naming
    their nodes, and the result is the good replies' means, round after round."""
    entrywise = cls.entrywise
    goods = [
        {node: good_reply(r, entrywise) for node, r in replies.items() if isinstance(r, int)} for replies in run.rounds
    ]
    contents = [
        {
            node: good_content(goods[i][node]) if node in goods[i] else bad_content(*r, entrywise)
            for node, r in replies.items()
        }
        for i, replies in enumerate(run.rounds)
    ]
    nodes = {
        node: (
            lambda message, node=node: contents[int(message.content.config_records["config"]["server-round"]) - 1][node]
        )
        for node in run.rounds[0]
    }
    strategy = cls(min_train_nodes=len(nodes), min_available_nodes=len(nodes), fraction_evaluate=0.0)
    result = strategy.start(fake_grid_class()(nodes), arrays_to_record(MODEL), num_rounds=len(run.rounds), timeout=10)
    assert [record.server_round for record in strategy.history] == list(range(1, len(run.rounds) + 1))
    categories_seen = []
    for record, replies, good in zip(strategy.history, run.rounds, goods):
        bad = sorted(node for node in replies if node not in good)
        assert sorted(node for node, _ in record.rejected) == bad, record.rejected
        assert sorted(reply.node for reply in record.accepted) == sorted(good)
        assert record.failures == () and record.missing == ()
        categories_seen += [r[0] for r in replies.values() if not isinstance(r, int)]
    for node in {node for replies, good in zip(run.rounds, goods) for node in replies if node not in good}:
        assert any(f"node {node}:" in m and "rejected" in m for m in log.messages), node
    log.messages.clear()
    expected = after_rounds(MODEL, [list(good.values()) for good in goods])
    final = record_to_arrays(result.arrays)
    check_means(final, MODEL, expected)
    check_global(final)
    for name, value in strategy.global_layers.items():
        assert bits(final[name]).tobytes() == bits(value).tobytes(), name
    return categories_seen


@pytest.mark.hypothesis  # the profile's count: .ci/run's property step runs it "thorough"
@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_fuzzed_runs_quick(cls, task_identity, record_property):
    """``start()`` on the hypothesis profile's count of examples (the fast tier)."""
    seen = fuzz(lambda run, log: check_start(cls, run, log), runs(cls.entrywise), None)
    report(f"{cls.__name__} start()", seen, record_property)


@pytest.mark.slow
@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_fuzzed_runs(cls, task_identity, record_property):
    """``start()`` on a tenth of ``JAXLAYERX_FUZZ_EXAMPLES`` examples."""
    seen = fuzz(lambda run, log: check_start(cls, run, log), runs(cls.entrywise), max(FUZZ_EXAMPLES // 10, 1))
    report(f"{cls.__name__} start()", seen, record_property)
    assert seen["examples"] >= FUZZ_EXAMPLES // 10


# --- the bugs the fuzzing found, one plain test each -----------------------------------------


def one_round(cls: type[ExchangeStrategy], contents: list[RecordDict]) -> tuple[ExchangeStrategy, MetricRecord]:
    """``contents`` as the replies of nodes 1, 2... to one round's train messages."""
    nodes = list(range(1, len(contents) + 1))
    strategy = new_strategy(cls, len(nodes))
    messages = train_messages(strategy, 1, nodes)
    _, metrics = strategy.aggregate_train(1, [Message(c, reply_to=messages[n]) for n, c in zip(nodes, contents)])
    assert metrics is not None
    return strategy, metrics


def bias(value: float, count: int = 2, **metrics: Any) -> RecordDict:
    """A good reply sending "dense/bias" filled with ``value``."""
    payload = collections.OrderedDict({"dense/bias": Entries(np.full(4, value, np.float32), None, (4,))})
    return RecordDict({"arrays": payload_to_record(payload), "m": MetricRecord({"num-examples": count, **metrics})})


def test_an_npy_header_declaring_gigabytes_is_refused_before_numpy_allocates_it():
    """``numpy.load`` allocated the size an npy header declares (8 GB here) before reading."""
    array = raw(npy((10**9,), "<f8", bytes(64)), "float64", (10**9,))
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"\(1000000000,\) of float64 \(8000000000 bytes\), but it holds 64 bytes"):
            decode_array("values0", array)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20


def test_an_npz_archive_is_refused_as_undecodable():
    """``numpy.load`` opened a zip archive, and its ``NpzFile`` raised AttributeError out of aggregate_train."""
    buffer = io.BytesIO()
    np.savez(buffer, values0=np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="does not decode: ValueError: the magic string is not correct"):
        decode_array("values0", raw(buffer.getvalue(), "float32", (4,)))


@pytest.mark.parametrize("count", [2**64, 10**39, 10**400], ids=["2**64", "10**39", "10**400"])
def test_an_example_count_beyond_uint64_is_rejected(count, task_identity):
    """10**39 made the float32 weights infinite and the layer NaN; 10**400 raised OverflowError."""
    strategy, metrics = one_round(FedAvgLayers, [bias(3.0), bias(SENTINEL, count)])
    assert metrics[REJECTED_KEY] == 1
    ((node, reason),) = strategy.history[-1].rejected
    assert node == 2 and f"a {count.bit_length()}-bit integer" in reason
    np.testing.assert_array_equal(strategy.global_layers["dense/bias"], np.full(4, 3.0, np.float32))


def test_the_largest_count_a_message_carries_is_accepted(task_identity):
    strategy, metrics = one_round(FedAvgLayers, [bias(3.0, 1), bias(5.0, 2**64 - 1)])
    assert metrics[ACCEPTED_KEY] == 2
    np.testing.assert_allclose(strategy.global_layers["dense/bias"], np.full(4, 5.0), rtol=1e-6)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_a_finite_value_overflowing_the_layers_dtype_is_rejected(cls, task_identity):
    """float64 1e300 into a float32 layer was accepted and cast to inf."""
    payload = collections.OrderedDict({"dense/bias": Entries(np.array([0.0, 1e300, 0.0, 0.0]), None, (4,))})
    bad = RecordDict({"arrays": payload_to_record(payload), "m": MetricRecord({"num-examples": 2})})
    strategy, metrics = one_round(cls, [bias(3.0), bad])
    assert strategy.history[-1].rejected == (
        (2, "layer 'dense/bias': the value 1e+300 at flat index 1 overflows its dtype float32"),
    )
    np.testing.assert_array_equal(strategy.global_layers["dense/bias"], np.full(4, 3.0, np.float32))


def test_metrics_that_do_not_aggregate_keep_the_round_and_its_counts(task_identity, caplog):
    """A list under a key another reply holds a number under raised TypeError out of aggregate_train."""
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        strategy, metrics = one_round(FedAvgLayers, [bias(3.0, 1, loss=[1.0, 2.0]), bias(5.0, 3, loss=1.0)])
    assert (metrics[ACCEPTED_KEY], metrics[REJECTED_KEY]) == (2, 0) and "loss" not in metrics
    assert any("metrics do not aggregate" in message for message in caplog.messages)
    np.testing.assert_allclose(strategy.global_layers["dense/bias"], np.full(4, (3.0 + 15.0) / 4), rtol=1e-6)


def test_evaluate_metrics_that_do_not_aggregate_are_dropped_not_raised(task_identity, caplog):
    """The same clash in evaluate replies raised TypeError out of aggregate_evaluate (and start());
    so did an integer metric too large for a float (OverflowError)."""
    strategy = new_strategy(FedAvgLayers, 2)
    messages = train_messages(strategy, 1, [1, 2])
    replies = [
        Message(RecordDict({"m": MetricRecord({"num-examples": 1, "loss": [1.0, 2.0]})}), reply_to=messages[1]),
        Message(RecordDict({"m": MetricRecord({"num-examples": 3, "loss": 1.0})}), reply_to=messages[2]),
    ]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert dict(strategy.aggregate_evaluate(1, replies)) == {}
    assert any("metrics do not aggregate under ['loss']" in message for message in caplog.messages)
    agreeing = [
        Message(RecordDict({"m": MetricRecord({"num-examples": 1, "loss": 2.0})}), reply_to=messages[1]),
        Message(RecordDict({"m": MetricRecord({"num-examples": 3, "loss": 1.0})}), reply_to=messages[2]),
    ]
    assert strategy.aggregate_evaluate(1, agreeing)["loss"] == pytest.approx((2.0 + 3.0) / 4)


@pytest.mark.parametrize(
    ("values", "dtype"),
    [
        (np.array([1.0, 1e300]), np.float32),
        (np.array([-1e39, 0.0]), np.float32),
        (np.array([3.4028235e38, -3.4028235e38]), np.float32),
        (np.array([0, 70000], np.int32), np.float16),
        (np.array([-65504, 65504], np.int32), np.float16),
        (np.array([65519.0, 1.0], np.float32), np.float16),
        (np.array([1.0, 65520.0], np.float32), np.float16),
        (np.array([1e5], ml_dtypes.bfloat16), np.float16),
        (np.array([1e30], np.float32), np.float64),
        (np.array([True, False]), np.float16),
    ],
)
def test_a_value_fits_its_layer_exactly_when_casting_it_keeps_it_finite(values, dtype):
    """check_fits looks at the extremes only; the reference casts every value."""
    with np.errstate(over="ignore"):
        overflows = not np.isfinite(values.astype(dtype)).all()
    if overflows:
        with pytest.raises(ValueError, match="overflows its dtype"):
            check_fits("w", values, dtype)
    else:
        check_fits("w", values, dtype)


def test_a_metric_too_large_for_a_float_is_left_out_and_the_others_averaged(task_identity, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _, metrics = one_round(FedAvgLayers, [bias(3.0, 1, loss=1.0, big=10**400), bias(5.0, 3, loss=3.0, big=1)])
    assert "big" not in metrics and metrics["loss"] == pytest.approx((1.0 + 9.0) / 4)
    assert any("metrics do not aggregate under ['big']" in message for message in caplog.messages)
