"""jaxlayerx.flower.records: models, compact payloads and client state through Flower's records.

Compact payloads are read and written here with the independent codec of ``conftest``
(``ref_compact_encode``/``ref_compact_decode``, written from docs/wire-formats.md), and
carried through Flower's protobuf serialization and object store.
"""

from __future__ import annotations

import collections

import ml_dtypes
import numpy as np
import pytest
from conftest import (
    RefLayer,
    bits,
    flower_metadata,
    npy_size,
    ref_compact_decode,
    ref_compact_encode,
    ref_record_arrays,
)

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict  # noqa: E402
from flwr.app.message.message import make_message  # noqa: E402
from flwr.common import serde  # noqa: E402
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # noqa: E402
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects  # noqa: E402
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents  # noqa: E402

from jaxlayerx.coo import SparseLayer  # noqa: E402
from jaxlayerx.flower.records import (  # noqa: E402
    arrays_to_record,
    content_nbytes,
    decode_array,
    is_sparse,
    load_client,
    payload_to_record,
    record_to_arrays,
    record_to_payload,
    records_to_sparse,
    save_client,
    sparse_to_records,
)
from jaxlayerx.payload import Entries  # noqa: E402
from jaxlayerx.protocol import ClientState  # noqa: E402
from jaxlayerx.state import ExchangeState  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)


def _special_values(dtype: np.dtype) -> np.ndarray:
    """Every 16-bit pattern of ``dtype``: NaNs with payloads, -0.0, subnormals, infinities."""
    return np.arange(2**16, dtype=np.uint16).view(dtype).reshape(256, 256)


def _through_protobuf(content: RecordDict) -> RecordDict:
    """``content`` serialized to protobuf bytes by Flower's serde and read back."""
    wire = serde.recorddict_to_proto(content).SerializeToString()
    return serde.recorddict_from_proto(ProtoRecordDict.FromString(wire))


def _through_object_store(content: RecordDict) -> RecordDict:
    """``content`` inside a Message deflated into Flower's object contents (what the
    SuperLink stores and nodes pull) and inflated back."""
    message = make_message(metadata=flower_metadata("train", src_node_id=1, dst_node_id=2), content=content)
    objects = get_all_nested_objects(message)
    contents = {object_id: obj.deflate() for object_id, obj in objects.items()}
    inflated = inflate_object_from_contents(message.object_id, contents)
    assert isinstance(inflated, type(message))
    return inflated.content


CARRIERS = [pytest.param(lambda c: c, id="in-memory"), pytest.param(_through_protobuf, id="protobuf")]
CARRIERS.append(pytest.param(_through_object_store, id="object-store"))


def flower_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord built with Flower's classes only."""
    return ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in arrays.items()})


# --- whole models keyed by layer names ----------------------------------------------------


@pytest.mark.parametrize("carry", CARRIERS)
@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16], ids=["bfloat16", "float16"])
def test_16_bit_floats_cross_bit_exactly(carry, dtype):
    flat = {"dense/kernel": _special_values(np.dtype(dtype)), "dense/bias": np.arange(3, dtype=np.float32)}
    content = carry(RecordDict({"arrays": arrays_to_record(flat), "config": ConfigRecord({"server-round": 1})}))
    record = content.array_records["arrays"]
    assert record["dense/kernel"].dtype == np.dtype(dtype).name
    if dtype is ml_dtypes.bfloat16:  # what Flower alone gives back: raw bytes
        assert record["dense/kernel"].numpy().dtype == np.dtype("V2")
    decoded = record_to_arrays(record)
    assert list(decoded) == ["dense/kernel", "dense/bias"]
    assert decoded["dense/kernel"].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(bits(decoded["dense/kernel"]), bits(flat["dense/kernel"]))
    np.testing.assert_array_equal(bits(decoded["dense/bias"]), bits(flat["dense/bias"]))


@pytest.mark.parametrize("carry", CARRIERS)
def test_names_order_dtypes_and_shapes_kept(carry):
    rng = np.random.default_rng(0)
    names = ["z", "a", "m/0", "layers.1.weight", "scalar"]
    arrays = [
        rng.normal(size=(2, 3)).astype(np.float32),
        rng.integers(-5, 5, size=(4,)).astype(np.int8),
        np.array([True, False]),
        rng.normal(size=(1, 2, 3)),
        np.array(7, dtype=np.int64),
    ]
    flat = dict(zip(names, arrays))
    decoded = record_to_arrays(carry(RecordDict({"arrays": arrays_to_record(flat)})).array_records["arrays"])
    assert list(decoded) == names
    for name, array in flat.items():
        assert decoded[name].dtype == array.dtype and decoded[name].shape == array.shape, name
        np.testing.assert_array_equal(bits(decoded[name]), bits(array))


def test_jax_arrays_are_taken():
    import jax.numpy as jnp

    decoded = record_to_arrays(arrays_to_record({"w": jnp.arange(4, dtype=jnp.bfloat16)}))
    assert decoded["w"].dtype == BF16
    np.testing.assert_array_equal(decoded["w"].astype(np.float32), np.arange(4, dtype=np.float32))


def test_declared_dtype_or_shape_that_lies_is_refused():
    good = Array(np.zeros((2, 2), np.float32))
    wrong_dtype = Array(dtype="float64", shape=(2, 2), stype=good.stype, data=good.data)
    with pytest.raises(ValueError, match=r"'w'.*declared dtype float64.*float32"):
        decode_array("w", wrong_dtype)
    wrong_shape = Array(dtype="float32", shape=(4,), stype=good.stype, data=good.data)
    with pytest.raises(ValueError, match=r"'w'.*declared shape \(4,\)"):
        decode_array("w", wrong_shape)
    garbage = Array(dtype="float32", shape=(2, 2), stype=good.stype, data=b"not npy")
    with pytest.raises(ValueError, match="'w' does not decode"):
        decode_array("w", garbage)
    unknown = Array(dtype="no-such-dtype", shape=(2, 2), stype=good.stype, data=good.data)
    with pytest.raises(ValueError, match="'w' does not decode"):
        decode_array("w", unknown)


# --- compact payloads ---------------------------------------------------------------------


def _payload() -> collections.OrderedDict[str, Entries]:
    """Whole layers, entries in each encoding, a bfloat16 layer and int8/bf16 updates."""
    rng = np.random.default_rng(1)
    big = rng.normal(size=300).astype(np.float32)
    return collections.OrderedDict(
        [
            ("conv/kernel", Entries(np.array([1.5, -2.0, 3.25], np.float32), np.array([0, 7, 23]), (2, 3, 4))),
            ("dense/bias", Entries(np.arange(6, dtype=np.float32), None, (2, 3))),
            ("big", Entries(big[:290], np.arange(290), (300,))),
            ("half", Entries(big[:20], np.arange(0, 40, 2), (40,))),
            ("head", Entries(np.array([0.5, -1.0], BF16), np.array([1, 4]), (5,))),
            ("q8", Entries(np.array([-127, 0, 127, 5], np.int8), None, (2, 2), "int8", np.float32(0.125))),
            ("q16", Entries(np.array([1.0, -0.5], BF16), np.array([2, 3]), (4,), "bf16")),
        ]
    )


#: What docs/wire-formats.md's table picks for each layer of ``_payload`` (computed by hand).
#: conv/kernel: 3 of 24, uint8 -> indices 3 B, complement 21 B, bitmask 3 B: the tie goes to indices.
#: big: 290 of 300, uint16 -> indices 580, complement 20, bitmask 38: complement.
#: half: 20 of 40 -> indices 20, complement 20, bitmask 5: bitmask.
#: head: 2 of 5 -> indices 2, complement 3, bitmask 1: bitmask. q16: 2 of 4 -> 2, 2, 1: bitmask.
EXPECTED_ENCODING = {"conv/kernel": 1, "dense/bias": 0, "big": 2, "half": 3, "head": 3, "q8": 0, "q16": 3}


@pytest.mark.parametrize("carry", CARRIERS)
def test_payload_to_record_writes_the_documented_compact_layout(carry):
    payload = _payload()
    record = carry(RecordDict({"arrays": payload_to_record(payload)})).array_records["arrays"]
    arrays = ref_record_arrays(record)
    # float32 values (group 0), then bfloat16 (group 1), int8 (group 2); an index; one scale
    assert list(arrays) == ["header", "values0", "values1", "values2", "index", "scales"]
    assert [arrays[f"values{g}"].dtype for g in range(3)] == [np.dtype(np.float32), BF16, np.dtype(np.int8)]
    assert arrays["header"].dtype == np.uint8 and arrays["index"].dtype == np.uint8
    decoded = ref_compact_decode(arrays)
    assert list(decoded) == list(payload)
    forms = {None: 0, "bf16": 1, "int8": 2}
    for name, entries in payload.items():
        got = decoded[name]
        assert got.encoding == EXPECTED_ENCODING[name], name
        assert got.shape == entries.shape and got.form == forms[entries.quantized], name
        assert got.values.dtype == entries.values.dtype, name
        np.testing.assert_array_equal(bits(got.values), bits(entries.values))
        if entries.indices is None:
            assert got.flat is None, name
        else:
            np.testing.assert_array_equal(got.flat, entries.indices)
    assert decoded["q8"].scale == 0.125
    # the whole thing is exactly what an independent writer of the format writes
    written = ref_compact_encode(
        {
            name: RefLayer(e.values, e.indices, e.shape, form=forms[e.quantized], scale=e.scale)
            for name, e in payload.items()
        }
    )
    assert list(written) == list(arrays)
    for key in written:
        np.testing.assert_array_equal(bits(arrays[key]), bits(written[key]))


@pytest.mark.parametrize("carry", CARRIERS)
def test_record_to_payload_reads_an_independently_written_record(carry):
    payload = _payload()
    forms = {None: 0, "bf16": 1, "int8": 2}
    written = ref_compact_encode(
        {
            name: RefLayer(e.values, e.indices, e.shape, form=forms[e.quantized], scale=e.scale)
            for name, e in payload.items()
        }
    )
    record = carry(RecordDict({"arrays": flower_record(written)})).array_records["arrays"]
    layout = {name: np.zeros(e.shape, BF16 if name == "head" else np.float32) for name, e in payload.items()}
    for read in (record_to_payload(record), record_to_payload(record, layout)):
        assert list(read) == list(payload)
        for name, entries in payload.items():
            got = read[name]
            assert got.shape == entries.shape and got.quantized == entries.quantized, name
            np.testing.assert_array_equal(bits(got.values), bits(entries.values))
            if entries.indices is None:
                assert got.indices is None, name
            else:
                assert got.indices.dtype == np.int64
                np.testing.assert_array_equal(got.indices, entries.indices)
        assert float(read["q8"].scale) == 0.125


def _sparse_layers() -> dict[str, SparseLayer]:
    return {
        "conv/kernel": SparseLayer(np.array([1.5, -2.0, 3.25], BF16), np.array([0, 7, 23], np.int64), (2, 3, 4)),
        "bias": SparseLayer(np.array([0.5], np.float16), np.array([2], np.int64), (5,)),
        "empty": SparseLayer(np.zeros(0, np.float32), np.zeros(0, np.int64), (3, 3)),
        "whole": SparseLayer(np.arange(4, dtype=np.float32), np.arange(4, dtype=np.int64), (2, 2)),
        # given out of order: written ascending, each value staying with its index
        "shuffled": SparseLayer(np.array([3.0, 1.0, 2.0], np.float32), np.array([30, 10, 20], np.int64), (40,)),
    }


@pytest.mark.parametrize("carry", CARRIERS)
def test_sparse_layout_round_trip(carry):
    layers = _sparse_layers()
    content = RecordDict({**sparse_to_records(layers), "metrics": MetricRecord({"num-examples": 4})})
    content = carry(content)
    assert is_sparse(content)
    assert set(content.array_records) == {"arrays"}  # one compact record, nothing beside it
    decoded = ref_compact_decode(ref_record_arrays(content.array_records["arrays"]))
    assert list(decoded) == list(layers)
    for name, layer in layers.items():
        order = np.argsort(layer.flat_indices)
        got = decoded[name]
        assert got.shape == layer.shape and got.values.dtype == layer.values.dtype, name
        np.testing.assert_array_equal(bits(got.values), bits(layer.values[order]))
        flat = np.arange(np.prod(layer.shape)) if got.flat is None else got.flat
        np.testing.assert_array_equal(flat, layer.flat_indices[order])
    assert decoded["whole"].encoding == 0  # every entry: dense
    # and records_to_sparse reads it back, whatever the encoding of each layer
    back = records_to_sparse(content)
    assert list(back) == list(layers)
    for name, layer in layers.items():
        order = np.argsort(layer.flat_indices)
        got = back[name]
        assert got.shape == layer.shape and got.values.dtype == layer.values.dtype
        np.testing.assert_array_equal(bits(got.values), bits(layer.values[order]))
        np.testing.assert_array_equal(got.flat_indices, layer.flat_indices[order])


def test_records_to_sparse_reads_a_layer_sent_whole_as_all_of_its_entries():
    values = np.arange(6, dtype=np.float32)
    record = flower_record(ref_compact_encode({"w": RefLayer(values, None, (2, 3))}))
    got = records_to_sparse({"arrays": record})["w"]
    np.testing.assert_array_equal(got.flat_indices, np.arange(6))
    np.testing.assert_array_equal(got.values, values)
    assert got.shape == (2, 3)


def test_is_sparse_tells_entries_from_whole_layers():
    whole = flower_record(ref_compact_encode({"w": RefLayer(np.zeros(4, np.float32), None, (4,))}))
    some = flower_record(ref_compact_encode({"w": RefLayer(np.zeros(1, np.float32), np.array([2]), (4,))}))
    assert not is_sparse(RecordDict({"arrays": whole}))
    assert is_sparse(RecordDict({"arrays": some}))
    assert not is_sparse(RecordDict({}))
    assert not is_sparse(RecordDict({"arrays": arrays_to_record({"w": np.zeros(4, np.float32)})}))  # no header
    assert is_sparse(RecordDict({"weights": some}), values_key="weights")


def test_sparse_values_key_is_configurable():
    records = sparse_to_records(_sparse_layers(), values_key="weights")
    assert list(records) == ["weights"]
    assert list(records_to_sparse(records, values_key="weights")) == list(_sparse_layers())
    with pytest.raises(KeyError, match="'arrays'"):
        records_to_sparse(records)


def _good() -> dict[str, RefLayer]:
    return {
        "bias": RefLayer(np.array([0.5, 1.5], np.float32), np.array([1, 3]), (5,), encoding=1),
        "kernel": RefLayer(np.arange(10, dtype=np.float32), np.arange(10), (13,), encoding=3),
    }


def _with(**changes):
    layers = _good()
    for name, fields in changes.items():
        layers[name] = layers[name]._replace(**fields)
    return ref_compact_encode(layers)


def _header_edit(edit):
    arrays = ref_compact_encode(_good())
    arrays["header"] = np.frombuffer(edit(arrays["header"].tobytes()), np.uint8).copy()
    return arrays


def _index_edit(edit):
    arrays = ref_compact_encode(_good())
    index = bytearray(arrays["index"].tobytes())
    edit(index)
    arrays["index"] = np.frombuffer(bytes(index), np.uint8).copy()
    return arrays


def _drop(key):
    arrays = ref_compact_encode(_good())
    arrays.pop(key)
    return arrays


#: Hand-made malformations of a good payload (bias: indices [1, 3] as uint8 at index[0:2];
#: kernel: 10 of 13 entries as a 2-byte bitmask at index[2:4], bits 13-15 padding), and what
#: the error must say.
MALFORMED = {
    "no header": (lambda: _drop("header"), ValueError, "needs the array 'header'"),
    "no index": (lambda: _drop("index"), ValueError, "announces the arrays"),
    "an extra array": (lambda: {**_with(), "extra": np.zeros(1, np.float32)}, ValueError, "announces the arrays"),
    "too few values": (
        lambda: {**_with(), "values0": np.zeros(11, np.float32)},
        ValueError,
        "value group 0: expected 12 values",
    ),
    "index out of range": (lambda: _with(bias={"flat": np.array([1, 5])}), ValueError, "below the layer's 5"),
    "repeated index": (lambda: _with(bias={"flat": np.array([3, 3])}), ValueError, "ascending, distinct"),
    "descending indices": (lambda: _with(bias={"flat": np.array([3, 1])}), ValueError, "ascending, distinct"),
    "bitmask count": (lambda: _index_edit(lambda b: b.__setitem__(2, 0x7F)), ValueError, "bitmask marks 9"),
    "bitmask padding": (
        lambda: _index_edit(lambda b: b.__setitem__(3, b[3] | 0x80)),
        ValueError,
        "sets bits past the layer's 13 entries",
    ),
    "short index": (
        lambda: {**_with(), "index": _with()["index"][:-1]},
        ValueError,
        "index must be a 1-D uint8 array of 4 bytes",
    ),
    "float index": (
        lambda: {**_with(), "index": _with()["index"].astype(np.float32)},
        ValueError,
        "index must be a 1-D uint8 array",
    ),
    "header of floats": (
        lambda: {**_with(), "header": _with()["header"].astype(np.float32)},
        TypeError,
        "header must be a 1-D uint8",
    ),
    "format 2": (lambda: _header_edit(lambda h: b"\x02" + h[1:]), ValueError, "format 2, expected 1"),
    "truncated header": (
        lambda: _header_edit(lambda h: h[:-3]),
        ValueError,
        "the header ends before layer 'kernel': the count",
    ),
    "truncated shape": (lambda: _header_edit(lambda h: h[:-1]), ValueError, "a 1-d shape in a header of 25 bytes"),
    "truncated name": (lambda: _header_edit(lambda h: h[:-8]), ValueError, "the header ends inside a layer name"),
    "bytes after the last layer": (lambda: _header_edit(lambda h: h + b"\x00"), ValueError, "after its last layer"),
    "more entries than the layer": (
        lambda: _with(bias={"values": np.zeros(6, np.float32), "flat": np.arange(6), "encoding": 1}),
        ValueError,
        "6 entries in indices form for a layer of 5",
    ),
    "a layer twice": (
        lambda: _header_edit(lambda h: h.replace(b"\x06kernel", b"\x04bias")),
        ValueError,
        "layer 'bias' appears twice",
    ),
    "unknown encoding": (lambda: _with(bias={"encoding": 7}), ValueError, "unknown encoding 7"),
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_malformed_compact_payloads_are_refused(kind):
    make, error, message = MALFORMED[kind]
    with pytest.raises(error, match=message):
        records_to_sparse(RecordDict({"arrays": flower_record(make())}))


def test_the_good_payload_of_the_malformed_cases_is_read():
    got = records_to_sparse(RecordDict({"arrays": flower_record(_with())}))
    np.testing.assert_array_equal(got["bias"].flat_indices, [1, 3])
    np.testing.assert_array_equal(got["kernel"].flat_indices, np.arange(10))
    np.testing.assert_array_equal(got["kernel"].values, np.arange(10, dtype=np.float32))


def test_a_payload_the_model_refuses_names_the_layer():
    record = flower_record(_with())
    layout = {"bias": np.zeros(5, np.float32), "kernel": np.zeros(13, np.float32)}
    assert list(record_to_payload(record, layout)) == ["bias", "kernel"]
    with pytest.raises(KeyError, match="kernel"):
        record_to_payload(record, {"bias": layout["bias"], "kernal": layout["kernel"]})
    with pytest.raises(ValueError, match=r"layer 'kernel': expected shape \(4, 4\)"):
        record_to_payload(record, {"bias": layout["bias"], "kernel": np.zeros((4, 4), np.float32)})
    with pytest.raises(TypeError, match="'bias'"):
        record_to_payload(record, {"bias": np.zeros(5, np.int32), "kernel": layout["kernel"]})
    nan = flower_record(ref_compact_encode({"bias": RefLayer(np.array([np.nan], np.float32), np.array([0]), (5,))}))
    assert np.isnan(record_to_payload(nan, {"bias": layout["bias"]})["bias"].values[0])
    with pytest.raises(ValueError, match="non-finite"):
        record_to_payload(nan, {"bias": layout["bias"]}, allow_nonfinite=False)


# --- bytes --------------------------------------------------------------------------------


def test_byte_counts_are_what_flower_serializes():
    record = payload_to_record(_payload())
    content = RecordDict({"arrays": record, "metrics": MetricRecord({"x": 1})})
    arrays = ref_record_arrays(record)
    # every array is one numpy.save blob: a 128-byte header, then the data
    for key, array in arrays.items():
        assert npy_size(array) == 128 + array.nbytes, key
    expected = sum(npy_size(array) + len(key) for key, array in arrays.items())
    assert content_nbytes(content) == expected == record.count_bytes()
    # Flower's own reading: the serialized blobs and the keys
    assert expected == sum(len(array.data) + len(key) for key, array in record.items())
    named = arrays_to_record({"a": np.zeros((3, 4), np.float32), "b": np.zeros(5, BF16)})
    assert content_nbytes(RecordDict({"arrays": named, "more": record})) == (128 + 48 + 1) + (128 + 10 + 1) + expected
    assert content_nbytes(RecordDict({"arrays": ArrayRecord()})) == 0


# --- a client's state in context.state ------------------------------------------------------


def test_client_state_is_saved_and_restored_bit_for_bit():
    layers = {"w": _special_values(BF16), "b": np.array([1.0, -0.0, np.nan], np.float32)}
    exchange = ExchangeState(
        collections.OrderedDict(w=_special_values(BF16)[::-1].copy(), b=np.array([2.0, 3.0, 4.0], np.float32)),
        collections.OrderedDict(b=np.array([0.25, 0.0, -0.5], np.float32)),
    )
    saved = RecordDict()
    assert load_client(saved) == (collections.OrderedDict(), None)
    save_client(saved, layers, ClientState(3, exchange))
    # the documented keys of context.state
    assert saved.config_records["jaxlayerx.version"]["version"] == 3
    assert list(saved.array_records["jaxlayerx.layers"]) == ["w", "b"]
    assert sorted(saved.array_records["jaxlayerx.exchange"]) == ["reference/b", "reference/w", "residual/b"]
    saved = _through_protobuf(saved)
    loaded, state = load_client(saved)
    assert list(loaded) == ["w", "b"] and state.version == 3
    for name, value in layers.items():
        assert loaded[name].dtype == value.dtype
        np.testing.assert_array_equal(bits(loaded[name]), bits(value))
    for mine, theirs in ((state.exchange.reference, exchange.reference), (state.exchange.residual, exchange.residual)):
        assert sorted(mine) == sorted(theirs)
        for name in theirs:
            assert mine[name].dtype == theirs[name].dtype
            np.testing.assert_array_equal(bits(mine[name]), bits(theirs[name]))
    # a client that holds no version yet (its first message failed) is saved as -2 and read as None
    save_client(saved, layers, ClientState(None, ExchangeState()))
    assert saved.config_records["jaxlayerx.version"]["version"] == -2
    loaded, state = load_client(saved)
    assert state.version is None and not state.exchange.reference and list(loaded) == ["w", "b"]
