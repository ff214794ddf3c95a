"""jaxlayerx.flower.records: flat views and COO layers through Flower's records and serialization."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from conftest import bits, flower_metadata

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.app.message.message import make_message  # noqa: E402
from flwr.common import serde  # noqa: E402
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # noqa: E402
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects  # noqa: E402
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents  # noqa: E402

from jaxlayerx.coo import SparseLayer  # noqa: E402
from jaxlayerx.flower.records import (  # noqa: E402
    COO_INDICES_KEY,
    COO_SHAPES_KEY,
    arrays_to_record,
    content_nbytes,
    data_nbytes,
    decode_array,
    is_sparse,
    record_to_arrays,
    records_to_sparse,
    sparse_to_records,
)


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
    assert isinstance(inflated, Message)
    return inflated.content


CARRIERS = [pytest.param(lambda c: c, id="in-memory"), pytest.param(_through_protobuf, id="protobuf")]
CARRIERS.append(pytest.param(_through_object_store, id="object-store"))


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


def _sparse_layers() -> dict[str, SparseLayer]:
    return {
        "conv/kernel": SparseLayer(
            np.array([1.5, -2.0, 3.25], ml_dtypes.bfloat16), np.array([0, 7, 23], np.int64), (2, 3, 4)
        ),
        "bias": SparseLayer(np.array([0.5], np.float16), np.array([2], np.int64), (5,)),
        "empty": SparseLayer(np.zeros(0, np.float32), np.zeros(0, np.int64), (3, 3)),
    }


@pytest.mark.parametrize("carry", CARRIERS)
def test_sparse_layout_round_trip(carry):
    layers = _sparse_layers()
    content = RecordDict({**sparse_to_records(layers), "metrics": MetricRecord({"num-examples": 4})})
    content = carry(content)
    assert is_sparse(content)
    assert set(content.array_records) == {"arrays", COO_INDICES_KEY, COO_SHAPES_KEY}
    # The layout itself, checked against independent numpy: coordinates as np.unravel_index gives them.
    indices = record_to_arrays(content.array_records[COO_INDICES_KEY])
    expected = np.stack(np.unravel_index([0, 7, 23], (2, 3, 4)), axis=1)
    np.testing.assert_array_equal(indices["conv/kernel"], expected)
    assert indices["conv/kernel"].dtype == np.int64
    np.testing.assert_array_equal(record_to_arrays(content.array_records[COO_SHAPES_KEY])["bias"], [5])
    decoded = records_to_sparse(content)
    assert list(decoded) == list(layers)
    for name, layer in layers.items():
        got = decoded[name]
        assert got.shape == layer.shape and got.values.dtype == layer.values.dtype
        np.testing.assert_array_equal(bits(got.values), bits(layer.values))
        np.testing.assert_array_equal(got.flat_indices, layer.flat_indices)


def test_sparse_values_key_is_configurable():
    records = sparse_to_records(_sparse_layers(), values_key="weights")
    assert "weights" in records
    assert list(records_to_sparse(records, values_key="weights")) == list(_sparse_layers())


def test_malformed_sparse_layouts_are_refused():
    def content(mutate):
        records = sparse_to_records(_sparse_layers())
        mutate(records)
        return RecordDict(records)

    with pytest.raises(KeyError, match=COO_SHAPES_KEY):
        records_to_sparse(content(lambda r: r.pop(COO_SHAPES_KEY)))

    def rename(records):
        records[COO_INDICES_KEY] = arrays_to_record(
            {"other": np.zeros((3, 3), np.int64), **record_to_arrays(records[COO_INDICES_KEY])}
        )

    with pytest.raises(ValueError, match="names layers"):
        records_to_sparse(content(rename))

    def out_of_bounds(records):
        indices = dict(record_to_arrays(records[COO_INDICES_KEY]))
        indices["bias"] = np.array([[5]], np.int64)
        records[COO_INDICES_KEY] = arrays_to_record(indices)

    with pytest.raises(ValueError, match=r"'bias'.*out of bounds"):
        records_to_sparse(content(out_of_bounds))

    def float_indices(records):
        indices = dict(record_to_arrays(records[COO_INDICES_KEY]))
        indices["bias"] = np.array([[2.0]])
        records[COO_INDICES_KEY] = arrays_to_record(indices)

    with pytest.raises(TypeError, match="'bias'.*integers"):
        records_to_sparse(content(float_indices))


def test_byte_counts():
    flat = {"a": np.zeros((3, 4), np.float32), "b": np.zeros(5, ml_dtypes.bfloat16)}
    record = arrays_to_record(flat)
    assert data_nbytes(flat) == 3 * 4 * 4 + 5 * 2
    content = RecordDict({"arrays": record, "metrics": MetricRecord({"x": 1})})
    # Flower's own count: serialized npy bytes plus the key lengths.
    assert content_nbytes(content) == sum(len(array.data) + len(name) for name, array in record.items())
    assert content_nbytes(RecordDict({"arrays": ArrayRecord()})) == 0
