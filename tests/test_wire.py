"""The codecs (jaxlayerx/wire): exact sizes, the compact encoding, its validation.

Sizes are checked against what numpy.save writes and what Flower's ArrayRecord counts;
encodings against hand-computed layouts and a brute-force choice of the cheapest one;
decoding against malformed payloads, each refused with a message naming what is wrong.
"""

from __future__ import annotations

import collections
import io
import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxlayerx.errors import UnknownLayerError
from jaxlayerx.payload import Entries, dense_entries, sparse_entries
from jaxlayerx.wire import (
    LEGACY,
    MESSAGE_API,
    Wire,
    choose_encoding,
    compact,
    compact_nbytes,
    index_dtype,
    layer_counts,
)
from jaxlayerx.wire.npy import npy_nbytes


def saved_nbytes(array: np.ndarray) -> int:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return len(buffer.getvalue())


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int8, np.uint16, ml_dtypes.bfloat16, "<U7", np.bool_])
@pytest.mark.parametrize("shape", [(), (0,), (1,), (7,), (100_000,), (3, 4), (64, 64, 3, 3), (1,) * 12, (10**6, 0)])
def test_npy_nbytes_is_what_numpy_save_writes(dtype, shape):
    assert npy_nbytes(dtype, shape) == saved_nbytes(np.zeros(shape, dtype))


def test_npy_nbytes_agrees_with_flower_serialization():
    from flwr.app import Array, ArrayRecord
    from flwr.common import ndarray_to_bytes

    arrays = {
        "a": np.ones((5, 3), np.float32),
        "bb": np.zeros(1000, np.uint8),
        "name/with/slashes": np.ones(2, np.int8),
    }
    record = ArrayRecord({key: Array(array) for key, array in arrays.items()})
    assert record.count_bytes() == sum(npy_nbytes(a.dtype, a.shape) + len(k) for k, a in arrays.items())
    assert [len(ndarray_to_bytes(a)) for a in arrays.values()] == [
        npy_nbytes(a.dtype, a.shape) for a in arrays.values()
    ]


# --- choosing an encoding ----------------------------------------------------------------


def brute_force_encoding(size: int, count: int) -> tuple[int, int]:
    """Every encoding's index bytes written out, the cheapest kept (ties to the first)."""
    width = 1 if size <= 2**8 else 2 if size <= 2**16 else 4 if size <= 2**32 else 8
    candidates = []
    if count == size:
        candidates.append((0, 0))  # dense
    candidates.append((count * width, 1))  # indices
    candidates.append(((size - count) * width, 2))  # complement
    candidates.append((-(-size // 8), 3))  # bitmask
    cost, encoding = min(candidates)
    return encoding, cost


@given(st.integers(1, 2**34), st.data())
def test_the_cheapest_encoding_is_chosen(size, data):
    count = data.draw(st.integers(0, size))
    assert choose_encoding(size, count) == brute_force_encoding(size, count)


def test_index_dtype_is_the_smallest_that_addresses_the_layer():
    assert [index_dtype(n).itemsize for n in (1, 256, 257, 65536, 65537, 2**32, 2**32 + 1)] == [1, 1, 2, 2, 4, 4, 8]


# --- the compact encoding, by hand ---------------------------------------------------------


def varint(number: int) -> bytes:
    out = bytearray()
    while True:
        out.append((number & 0x7F) | (0x80 if number >> 7 else 0))
        number >>= 7
        if not number:
            return bytes(out)


def test_a_hand_built_payload_encodes_to_the_documented_layout():
    kernel = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    sent = np.flatnonzero(np.arange(4096) % 20 == 0)  # 205 entries: uint16 indices (410 bytes) beat the bitmask (512)
    bias = np.arange(64, dtype=np.float32)
    payload = collections.OrderedDict(
        kernel=Entries(kernel.reshape(-1)[sent], sent.astype(np.int64), (64, 64)),
        bias=Entries(bias, None, (64,)),
    )
    arrays = compact.encode(payload)
    assert list(arrays) == ["header", "values0", "index"]
    header = b"\x01" + varint(2)
    header += varint(6) + b"kernel" + bytes([1, 0]) + varint(0) + varint(205) + varint(2) + varint(64) + varint(64)
    header += varint(4) + b"bias" + bytes([0, 0]) + varint(0) + varint(64) + varint(1) + varint(64)
    assert arrays["header"].tobytes() == header
    np.testing.assert_array_equal(arrays["values0"], np.concatenate([kernel.reshape(-1)[sent], bias]))
    assert arrays["index"].tobytes() == sent.astype("<u2").tobytes()
    assert compact_nbytes(layer_counts(payload), "record") == sum(saved_nbytes(a) + len(k) for k, a in arrays.items())


def test_bitmask_complement_and_int8_scales_by_hand():
    layer = np.arange(20, dtype=np.float32)
    half = np.arange(0, 20, 2)  # 10 of 20: uint8 indices (10 bytes) lose to the bitmask (3 bytes)
    most = np.delete(np.arange(20), [3])  # 19 of 20: the complement (1 byte)
    payload = collections.OrderedDict(
        a=Entries(layer[half], half.astype(np.int64), (20,)),
        b=Entries(layer[most], most.astype(np.int64), (4, 5)),
        c=Entries(np.array([3, -127], np.int8), np.array([0, 7], np.int64), (8,), "int8", np.float32(0.5)),
    )
    arrays = compact.encode(payload)
    assert list(arrays) == ["header", "values0", "values1", "index", "scales"]
    bits = np.zeros(24, np.uint8)
    bits[half] = 1
    # c: 2 of 8 entries, uint8 indices (2 bytes) lose to the bitmask (1 byte: bits 0 and 7)
    expected_index = np.packbits(bits, bitorder="little").tobytes() + bytes([3]) + bytes([0b10000001])
    assert arrays["index"].tobytes() == expected_index
    assert arrays["values1"].dtype == np.int8 and arrays["values1"].tolist() == [3, -127]
    assert arrays["scales"].tolist() == [0.5]
    back = compact.decode(arrays, None)
    assert back["a"].indices.tolist() == half.tolist() and back["b"].indices.tolist() == most.tolist()
    assert back["c"].quantized == "int8" and back["c"].scale == np.float32(0.5)


# --- round trips and sizes, generated --------------------------------------------------------

LAYOUT = collections.OrderedDict(
    kernel=np.zeros((64, 64), np.float32),
    conv=np.zeros((3, 3, 4, 8), np.float32),
    bias=np.zeros(64, np.float32),
    scalar=np.zeros((), np.float32),
    wide=np.zeros(70_000, np.float32),
    half=np.zeros(33, ml_dtypes.bfloat16),
    empty=np.zeros((0, 5), np.float32),
)


@st.composite
def payloads(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    payload = collections.OrderedDict()
    for name, like in LAYOUT.items():
        if not draw(st.booleans()):
            continue
        density = draw(st.sampled_from([0.0, 0.001, 0.05, 0.3, 0.97, 1.0]))
        mask = rng.random(like.shape) < density
        if not mask.any() and like.size:
            continue
        values = rng.standard_normal(like.shape).astype(like.dtype)
        entries = sparse_entries(values, mask) if like.size else dense_entries(values)
        if draw(st.booleans()) and like.dtype == np.float32:
            kind = draw(st.sampled_from(["int8", "bf16"]))
            coded = entries.values.astype(np.int8 if kind == "int8" else ml_dtypes.bfloat16)
            entries = entries._replace(values=coded, quantized=kind, scale=np.float32(rng.random()))
        payload[name] = entries
    return payload


def assert_same_payload(got, expected):
    assert list(got) == list(expected)
    for name, entries in expected.items():
        assert got[name].shape == entries.shape and got[name].quantized == entries.quantized
        np.testing.assert_array_equal(got[name].flat_indices(), entries.flat_indices())
        assert got[name].values.dtype == entries.values.dtype
        np.testing.assert_array_equal(got[name].values.view(np.uint8), entries.values.view(np.uint8))
        if entries.quantized == "int8":
            assert got[name].scale == entries.scale


@settings(deadline=None)
@given(payloads())
def test_compact_round_trips_and_its_size_is_what_flower_counts(payload):
    from flwr.app import Array, ArrayRecord

    arrays = MESSAGE_API.encode(payload, sparse=True)
    assert_same_payload(MESSAGE_API.decode(arrays, LAYOUT), payload)
    record = ArrayRecord({key: Array(np.ascontiguousarray(array)) for key, array in arrays.items()})
    assert record.count_bytes() == MESSAGE_API.nbytes(layer_counts(payload), sparse=True)
    listed = Wire("ndarrays", "compact").encode(payload, sparse=True)
    assert_same_payload(Wire("ndarrays", "compact").decode(listed, LAYOUT), payload)
    assert sum(map(saved_nbytes, listed)) == Wire("ndarrays", "compact").nbytes(layer_counts(payload), sparse=True)


@settings(deadline=None)
@given(payloads())
def test_a_float32_layer_never_costs_more_than_sent_whole(payload):
    """Index bytes of any float32 layer are at most the values it leaves out."""
    for name, entries in payload.items():
        if LAYOUT[name].dtype != np.float32 or entries.quantized:
            continue
        _, index_bytes = choose_encoding(entries.size, entries.sent)
        assert index_bytes <= (entries.size - entries.sent) * 4


@settings(deadline=None)
@given(payloads())
def test_coo_and_named_sizes_are_what_numpy_save_writes(payload):
    plain = collections.OrderedDict((n, e) for n, e in payload.items() if e.quantized is None)
    coo = LEGACY.encode(plain, sparse=True)
    assert sum(map(saved_nbytes, coo)) == LEGACY.nbytes(layer_counts(plain), sparse=True)
    assert_same_payload(LEGACY.decode(coo, LAYOUT), plain) if plain else None
    whole = collections.OrderedDict((n, dense_entries(np.zeros(LAYOUT[n].shape, LAYOUT[n].dtype))) for n in plain)
    named = LEGACY.encode(whole, sparse=False)
    assert sum(map(saved_nbytes, named)) == LEGACY.nbytes(layer_counts(whole), sparse=False)
    positional = LEGACY.encode(whole, sparse=False, whole_model=True)
    assert sum(map(saved_nbytes, positional)) == LEGACY.nbytes(layer_counts(whole), sparse=False, whole_model=True)


# --- refusing malformed payloads ------------------------------------------------------------


def good_arrays() -> dict[str, np.ndarray]:
    payload = collections.OrderedDict(
        kernel=Entries(np.ones(3, np.float32), np.array([1, 5, 9], np.int64), (64, 64)),
        bias=Entries(np.ones(64, np.float32), None, (64,)),
    )
    return dict(compact.encode(payload))


def header(*layers: bytes, count: int | None = None, version: int = 1) -> np.ndarray:
    body = bytes([version]) + varint(len(layers) if count is None else count) + b"".join(layers)
    return np.frombuffer(body, np.uint8)


def layer_entry(name: bytes, encoding: int, form: int, group: int, count: int, shape: tuple[int, ...]) -> bytes:
    return (
        varint(len(name)) + name + bytes([encoding, form]) + b"".join(map(varint, (group, count, len(shape), *shape)))
    )


MALFORMED = {
    "format version": (lambda a: {**a, "header": header(version=2)}, ValueError, "format 2"),
    "unknown layer": (
        lambda a: {
            "header": header(layer_entry(b"kernal", 0, 0, 0, 4096, (64, 64))),
            "values0": np.ones(4096, np.float32),
        },
        UnknownLayerError,
        "'kernal'.*closest valid layers: 'kernel'",
    ),
    "shape": (
        lambda a: {"header": header(layer_entry(b"bias", 0, 0, 0, 65, (65,))), "values0": np.ones(65, np.float32)},
        ValueError,
        r"layer 'bias': expected shape \(64,\), got \(65,\)",
    ),
    "rank": (
        lambda a: {"header": header(layer_entry(b"bias", 0, 0, 0, 64, (8, 8))), "values0": np.ones(64, np.float32)},
        ValueError,
        "expected shape .64,., got a 2-d shape",
    ),
    "dense count": (
        lambda a: {"header": header(layer_entry(b"bias", 0, 0, 0, 63, (64,))), "values0": np.ones(63, np.float32)},
        ValueError,
        "63 entries in dense form",
    ),
    "count above size": (
        lambda a: {"header": header(layer_entry(b"bias", 1, 0, 0, 65, (64,))), "values0": np.ones(65, np.float32)},
        ValueError,
        "65 entries",
    ),
    "values length": (lambda a: {**a, "values0": a["values0"][:-1]}, ValueError, "value group 0: expected 67 values"),
    "index length": (
        lambda a: {**a, "index": a["index"][:-1]},
        ValueError,
        "index must be a 1-D uint8 array of 6 bytes",
    ),
    "unsorted indices": (
        lambda a: {**a, "index": np.array([9, 5, 1], np.uint16).view(np.uint8)},
        ValueError,
        "'kernel'.*ascending, distinct",
    ),
    "repeated indices": (
        lambda a: {**a, "index": np.array([5, 5, 9], np.uint16).view(np.uint8)},
        ValueError,
        "ascending, distinct",
    ),
    "extra array": (lambda a: {**a, "scales": np.ones(1, np.float32)}, ValueError, "announces the arrays"),
    "missing array": (lambda a: {k: v for k, v in a.items() if k != "index"}, ValueError, "announces the arrays"),
    "truncated header": (lambda a: {**a, "header": a["header"][:9]}, ValueError, "the header ends"),
    "trailing header bytes": (
        lambda a: {**a, "header": np.concatenate([a["header"], np.zeros(1, np.uint8)])},
        ValueError,
        "after its last layer",
    ),
    "header dtype": (lambda a: {**a, "header": a["header"].astype(np.int16)}, TypeError, "1-D uint8"),
    "values dtype": (lambda a: {**a, "values0": a["values0"].astype(np.complex64)}, TypeError, "does not accept"),
    "non-finite": (
        lambda a: {**a, "values0": np.where(np.arange(67) == 10, np.nan, a["values0"]).astype(np.float32)},
        ValueError,
        "'bias' holds a non-finite value",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_compact_payloads_are_refused_naming_the_problem(case):
    layout = {"kernel": np.zeros((64, 64), np.float32), "bias": np.zeros(64, np.float32)}
    make, error, pattern = MALFORMED[case]
    with pytest.raises(error, match=pattern):
        compact.decode(make(good_arrays()), layout, allow_nonfinite=False)


def test_quantized_values_are_checked():
    layout = {"w": np.zeros(4, np.float32), "n": np.zeros(4, np.int32)}
    int8 = layer_entry(b"w", 0, 2, 0, 4, (4,))
    arrays = {"header": header(int8), "values0": np.ones(4, np.int8), "scales": np.array([np.nan], np.float32)}
    with pytest.raises(ValueError, match="int8 scale must be finite"):
        compact.decode(arrays, layout)
    arrays = {"header": header(int8), "values0": np.ones(4, np.float32), "scales": np.ones(1, np.float32)}
    with pytest.raises(TypeError, match="int8 values must be int8"):
        compact.decode(arrays, layout)
    into_int = layer_entry(b"n", 0, 2, 0, 4, (4,))
    arrays = {"header": header(into_int), "values0": np.ones(4, np.int8), "scales": np.ones(1, np.float32)}
    with pytest.raises(TypeError, match="takes no quantized update"):
        compact.decode(arrays, layout)
    bitmask = layer_entry(b"w", 3, 0, 0, 2, (4,))
    arrays = {"header": header(bitmask), "values0": np.ones(2, np.float32), "index": np.array([0b10011], np.uint8)}
    with pytest.raises(ValueError, match="past the layer's 4 entries"):
        compact.decode(arrays, layout)
    arrays = {"header": header(bitmask), "values0": np.ones(2, np.float32), "index": np.array([0b0111], np.uint8)}
    with pytest.raises(ValueError, match="marks 3 entries, the header says 2"):
        compact.decode(arrays, layout)


def test_a_declared_size_beyond_the_data_allocates_nothing():
    """A payload read without a model (records_to_sparse) may declare any shape; what it
    allocates is bounded by its own arrays, so a huge declared layer is refused first."""
    huge = (2**40,)
    for encoding, count in ((2, 1), (3, 1), (0, 2**40)):  # complement, bitmask, dense
        arrays = {"header": header(layer_entry(b"w", encoding, 0, 0, count, huge)), "values0": np.ones(1, np.float32)}
        if encoding:
            arrays["index"] = np.zeros(8, np.uint8)
        with pytest.raises(ValueError):
            compact.decode(arrays, None)
    with pytest.raises(ValueError, match="layers in"):
        compact.decode({"header": header(count=10**9)}, None)


def test_a_header_with_a_number_of_more_than_64_bits_is_refused():
    raw = np.frombuffer(b"\x01" + b"\xff" * 11 + b"\x01", np.uint8)
    with pytest.raises(ValueError, match="over 64 bits"):
        compact.decode({"header": raw}, None)


def test_empty_payload_is_one_small_array():
    arrays = compact.encode(collections.OrderedDict())
    assert list(arrays) == ["header"] and arrays["header"].tobytes() == b"\x01\x00"
    assert compact.decode(arrays, {"w": np.zeros(3)}) == collections.OrderedDict()
    assert compact_nbytes([], "record") == saved_nbytes(arrays["header"]) + len("header")


def test_decoding_needs_no_math_on_the_declared_size_for_indices():
    layout = {"w": np.zeros(300, np.float32)}
    arrays = {
        "header": header(layer_entry(b"w", 1, 0, 0, 2, (300,))),
        "values0": np.array([1.0, 2.0], np.float32),
        "index": np.array([4, 299], "<u2").view(np.uint8),
    }
    entries = compact.decode(arrays, layout)["w"]
    assert entries.indices.tolist() == [4, 299] and entries.size == math.prod((300,))
