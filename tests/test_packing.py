"""Tests for the wire format: jaxlayerx.pack_layers / unpack_layers / payload_nbytes / to_numpy."""

from __future__ import annotations

import io

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import npy_size
from flwr.common import ndarray_to_bytes

import jaxlayerx as jlx
from jaxlayerx import conform_layer, merge_layers, pack_layers, payload_nbytes, to_numpy, unpack_layers

BF16 = np.dtype(ml_dtypes.bfloat16)


def sample_weights():
    """Arrays of several dtypes, numpy and jax, with known contents."""
    return [
        np.arange(6, dtype=np.float32).reshape(2, 3),
        jnp.array([1.5, -2.25, 3.0], dtype=jnp.bfloat16),
        np.array([7, -8], dtype=np.int32),
        jnp.array([[0.5], [0.25]], dtype=jnp.float16),
        np.zeros((0, 3), dtype=np.float32),  # an empty layer is still a layer
    ]


SAMPLE_NAMES = ["params/Dense_0/kernel", "layers/0/bias", "batch_stats/BatchNorm_0/count", "héad/w", "empty"]


def copy_payload(payload):
    return [(np.asarray(a).dtype, np.asarray(a).shape, np.asarray(a).tobytes()) for a in payload]


def wire_roundtrip(payload):
    """What Flower does: every array through numpy.save / numpy.load, pickles off."""
    out = []
    for array in payload:
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        buffer.seek(0)
        out.append(np.load(buffer, allow_pickle=False))
    return out


# --------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------


def test_pack_layout_and_dtypes():
    weights = sample_weights()
    payload = pack_layers(weights, SAMPLE_NAMES)
    assert isinstance(payload, list)
    assert len(payload) == len(weights) + 1
    names_array = payload[-1]
    assert isinstance(names_array, np.ndarray)
    assert names_array.dtype.kind == "U"
    assert names_array.ndim == 1
    assert names_array.tolist() == SAMPLE_NAMES
    for original, sent in zip(weights, payload[:-1]):
        assert type(sent) is np.ndarray  # jax arrays leave as numpy
        assert sent.dtype == np.asarray(original).dtype  # in their own dtype (bfloat16 too)
        assert sent.shape == original.shape
        assert sent.tobytes() == np.asarray(original).tobytes()
    assert payload[1].dtype == BF16
    assert payload[3].dtype == np.float16


def test_pack_names_array_is_byte_compatible_with_fl4health():
    # fl4health packs with np.array(names): numpy's default for a list of str.
    payload = pack_layers(sample_weights(), SAMPLE_NAMES)
    reference = np.array(SAMPLE_NAMES)
    assert payload[-1].dtype == reference.dtype
    assert payload[-1].tobytes() == reference.tobytes()


def test_pack_empty_selection():
    payload = pack_layers([], [])
    assert len(payload) == 1
    assert payload[0].dtype.kind == "U"
    assert payload[0].ndim == 1 and payload[0].size == 0
    assert unpack_layers(payload) == ([], [])


def test_unpack_roundtrip():
    weights = sample_weights()
    got_weights, got_names = unpack_layers(pack_layers(weights, SAMPLE_NAMES))
    assert got_names == SAMPLE_NAMES
    assert all(type(n) is str for n in got_names)
    assert len(got_weights) == len(weights)
    for original, got in zip(weights, got_weights):
        assert isinstance(got, np.ndarray)
        assert got.dtype == np.asarray(original).dtype
        assert got.tobytes() == np.asarray(original).tobytes()


def test_pack_does_not_change_inputs():
    weights = [np.arange(3, dtype=np.float32), jnp.ones(2, jnp.bfloat16)]
    names = ("a", "b")  # any sequence of str
    before = copy_payload(weights)
    payload = pack_layers(weights, names)
    assert payload[-1].tolist() == ["a", "b"]
    assert names == ("a", "b") and len(weights) == 2
    assert copy_payload(weights) == before


def test_to_numpy():
    arrays = [
        jnp.arange(4, dtype=jnp.float32),
        jnp.array([1, 2], dtype=jnp.bfloat16),
        jnp.array([3], dtype=jnp.int32),
        np.array([1.0, 2.0], dtype=np.float16),
    ]
    out = to_numpy(arrays)
    assert isinstance(out, list) and len(out) == 4
    for original, got in zip(arrays, out):
        assert type(got) is np.ndarray
        assert got.dtype == np.asarray(original).dtype
        assert got.tobytes() == np.asarray(original).tobytes()
    assert out[1].dtype == BF16
    assert to_numpy([]) == []


# --------------------------------------------------------------------------------------
# Flower serialization (numpy.save / numpy.load, allow_pickle=False)
# --------------------------------------------------------------------------------------


def test_payload_survives_numpy_save_load():
    weights = sample_weights()
    payload = pack_layers(weights, SAMPLE_NAMES)
    received = wire_roundtrip(payload)
    got_weights, got_names = unpack_layers(received)
    assert got_names == SAMPLE_NAMES  # non-ASCII 'héad/w' included
    for original, got in zip(weights, got_weights):
        original = np.asarray(original)
        assert got.shape == original.shape
        assert got.tobytes() == original.tobytes()
        if original.dtype == BF16:
            # numpy.save writes ml_dtypes' bfloat16 as raw 2-byte void: the dtype may be lost,
            # the bytes never are.
            assert got.dtype == BF16 or (got.dtype.kind == "V" and got.dtype.itemsize == 2)
        else:
            assert got.dtype == original.dtype
            assert np.array_equal(got, original)


def test_bfloat16_through_the_wire_back_into_a_model():
    bf16 = np.array([1.5, -2.25, 3.0], dtype=BF16)
    (received,) = wire_roundtrip([bf16])
    assert received.tobytes() == bf16.tobytes()
    model = {"w": jnp.zeros(3, jnp.bfloat16), "b": jnp.ones(2, jnp.float32)}
    out = merge_layers(model, {"w": received})
    assert out["w"].dtype == jnp.bfloat16
    assert np.asarray(out["w"]).tobytes() == bf16.tobytes()
    direct = conform_layer("w", received, np.zeros(3, BF16))
    assert direct.dtype == BF16 and direct.tobytes() == bf16.tobytes()


# --------------------------------------------------------------------------------------
# fl4health interop
# --------------------------------------------------------------------------------------


def test_unpack_fl4health_payload():
    weights = [np.ones((2, 2), np.float32), np.arange(3, dtype=np.float64)]
    names = ["fc1.weight", "fc1.bias"]
    payload = weights + [np.array(names)]  # fl4health's ParameterPackerWithLayerNames layout
    assert payload[-1].dtype.kind == "U"
    got_weights, got_names = unpack_layers(payload)
    assert got_names == names
    for original, got in zip(weights, got_weights):
        assert got.dtype == original.dtype and np.array_equal(got, original)


def test_unpack_fl4health_empty_selection():
    payload = [np.array([])]  # fl4health: np.array of an empty list is float64, size 0
    assert payload[0].dtype == np.float64 and payload[0].size == 0
    before = copy_payload(payload)
    assert unpack_layers(payload) == ([], [])
    assert copy_payload(payload) == before


# --------------------------------------------------------------------------------------
# Bad payloads
# --------------------------------------------------------------------------------------

W = [np.ones(2, np.float32), np.zeros(3, np.float32)]

BAD_PAYLOADS = [
    ("empty", [], r"empty"),
    ("names_2d", W + [np.array([["a", "b"]])], r"1-D.*shape \(1, 2\)"),
    ("names_0d", W[:1] + [np.array("a")], r"1-D.*shape \(\)"),
    ("names_object", W + [np.array(["a", "b"], dtype=object)], r"1-D.*object"),
    ("names_int", W + [np.array([1, 2])], r"1-D.*int"),
    ("names_float", W + [np.array([1.0, 2.0])], r"1-D.*float64"),
    ("names_bytes", W + [np.array([b"a", b"b"])], r"1-D.*S1"),
    ("too_many_names", W + [np.array(["a", "b", "c"])], r"2 arrays but 3 layer names"),
    ("too_few_names", W + [np.array(["a"])], r"2 arrays but 1 layer names"),
    ("weights_no_names", W + [np.array([])], r"2 arrays but 0 layer names"),
    ("duplicate", W + [np.array(["dup/w", "dup/w"])], r"duplicate.*'dup/w'"),
]


@pytest.mark.parametrize("label,payload,pattern", BAD_PAYLOADS, ids=[b[0] for b in BAD_PAYLOADS])
def test_unpack_bad_payload_is_value_error(label, payload, pattern):
    before = copy_payload(payload)
    length = len(payload)
    with pytest.raises(ValueError, match=pattern):
        unpack_layers(payload)
    assert len(payload) == length
    assert copy_payload(payload) == before


@pytest.mark.parametrize(
    "payload",
    [np.array(["a"]), {"a": np.ones(1)}, (a for a in [np.ones(1), np.array(["a"])]), None, "a"],
    ids=["ndarray", "dict", "generator", "none", "str"],
)
def test_unpack_not_a_list_is_type_error(payload):
    with pytest.raises(TypeError, match=r"list"):
        unpack_layers(payload)


def test_pack_count_mismatch():
    weights = [np.ones(2, np.float32), np.ones(1, np.float32)]
    names = ["a"]
    with pytest.raises(ValueError, match=r"2 arrays but 1 layer names"):
        pack_layers(weights, names)
    with pytest.raises(ValueError, match=r"1 arrays but 2 layer names"):
        pack_layers(weights[:1], ["a", "b"])
    assert names == ["a"] and len(weights) == 2


def test_pack_duplicate_names():
    weights = [np.ones(2, np.float32), np.ones(1, np.float32), np.ones(1, np.float32)]
    names = ["x/kernel", "x/bias", "x/kernel"]
    with pytest.raises(ValueError, match=r"duplicate.*'x/kernel'"):
        pack_layers(weights, names)
    assert names == ["x/kernel", "x/bias", "x/kernel"]


def test_pack_non_string_name_is_type_error():
    with pytest.raises(TypeError, match=r"string.*1"):
        pack_layers([np.ones(1), np.ones(1)], ["a", 1])


# --------------------------------------------------------------------------------------
# payload_nbytes
# --------------------------------------------------------------------------------------


def test_payload_nbytes_hand_computed():
    payload = pack_layers([np.zeros((2, 3), np.float32), np.zeros(5, BF16), np.zeros(4, np.int8)], ["a", "bb", "ccc"])
    # What Flower carries: each array's numpy.save blob, a 128-byte .npy header (magic,
    # version, header length, the dict padded to 64-byte alignment with room to grow)
    # then the data.
    # float32 2x3: 6*4 = 24; bfloat16 x5: 5*2 = 10; int8 x4: 4*1 = 4;
    # names: 3 names of '<U3' (longest name 'ccc'), 4 bytes per char: 3*3*4 = 36.
    assert payload_nbytes(payload) == 4 * 128 + 24 + 10 + 4 + 36


def test_payload_nbytes_matches_independent_sum():
    payload = pack_layers(sample_weights(), SAMPLE_NAMES)
    expected = sum(npy_size(array) for array in payload)  # numpy.save into a buffer
    data = 0
    for array in payload:
        count = 1
        for dim in array.shape:
            count *= dim
        data += count * array.dtype.itemsize
    assert expected == data + 128 * len(payload)  # the reference itself: one 128-byte header each
    assert payload_nbytes(payload) == expected
    # Same after the wire (bfloat16 as void keeps its item size).
    assert payload_nbytes(wire_roundtrip(payload)) == expected
    # And what Flower's own serializer makes of each array.
    assert payload_nbytes(payload) == sum(len(ndarray_to_bytes(np.asarray(array))) for array in payload)


def test_payload_nbytes_empty_selection():
    # Nothing selected still sends one array: its header, no data.
    assert payload_nbytes([np.array([])]) == 128 == npy_size(np.array([]))
    assert payload_nbytes(pack_layers([], [])) == 128 == npy_size(np.array([], dtype=np.str_))


def test_public_exports():
    for name in ("pack_layers", "unpack_layers", "payload_nbytes", "to_numpy", "NDArrays"):
        assert hasattr(jlx, name)


@pytest.mark.parametrize(
    "payload, expected",
    [
        ([np.ones(2), np.array(["a"])], True),  # pack_layers' layout
        ([np.array([], dtype=np.str_)], True),  # nothing selected
        ([np.array([])], True),  # fl4health's empty selection: an empty float array
        ([np.ones(2), np.ones(3)], False),  # unnamed: arrays only
        ([np.ones(2), np.array([["a"]])], False),  # names must be 1-D
        ([np.ones(2), np.array([b"a"])], False),  # bytes are not Unicode
        ([np.ones(2), np.array(["a"], dtype=object)], False),  # object arrays never travel
        ([], False),
    ],
)
def test_is_packed(payload, expected):
    assert jlx.is_packed(payload) is expected
