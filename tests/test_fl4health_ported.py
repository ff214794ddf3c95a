"""fl4health's own unit tests of layer exchange, ported to jaxlayerx.

Each test below names, in its docstring, the fl4health test it ports
(``file::function``, in the repository VectorInstitute/FL4Health). The fixtures are
written here for Flax: Linen modules, NNX modules and plain pytrees stand in for the
torch models of fl4health's ``tests/test_utils/models_for_test.py``; torch's
``state_dict`` order becomes jaxlayerx's flatten order (sorted dict keys), and torch's
``(out, in, kh, kw)`` weight layout becomes Flax's ``(kh, kw, in, out)`` kernels.

Expected values are hand-computed or come from a few lines of numpy in the test itself;
nothing expected is computed by jaxlayerx.

Where jaxlayerx documents a deliberate difference from fl4health, the port asserts
jaxlayerx's documented behaviour and its docstring says which difference applies and
where it is documented. fl4health's tests of what jaxlayerx does not reimplement are not
ported: the packers of control variates (SCAFFOLD), clipping bits, FedProx's adaptive
constraint and extra variables, and FedPM's masked models; they are not layer exchange.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxlayerx as jlx

# ---------------------------------------------------------------------------------------
# Fixtures: Flax stand-ins for fl4health's torch test models
# ---------------------------------------------------------------------------------------


class TwoLinear(nn.Module):
    """Stands in for fl4health's ``LinearModel``: two bias-free square linear layers."""

    @nn.compact
    def __call__(self, x4, x3):
        return (
            nn.Dense(4, use_bias=False, name="independent_layer")(x4),
            nn.Dense(3, use_bias=False, name="shared_layer")(x3),
        )


class SmallConvNet(nn.Module):
    """Linen stand-in for fl4health's ``ToyConvNet`` and ``ConstantConvNet``: two bias-free
    5x5 convolutions with 2x2 max pooling, then two bias-free dense layers, on 28x28x1
    inputs (so the first dense layer sees 4 * 4 * channels[1] features). With
    ``include_bn``, a BatchNorm over 10 features that the output does not use, as in
    ``ToyConvNet(include_bn=True)``."""

    channels: tuple[int, int] = (8, 16)
    hidden: tuple[int, int] = (120, 64)
    include_bn: bool = False

    @nn.compact
    def __call__(self, x):
        for index, channels in enumerate(self.channels, start=1):
            x = nn.Conv(channels, (5, 5), padding="VALID", use_bias=False, name=f"conv{index}")(x)
            x = nn.max_pool(nn.relu(x), (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.hidden[0], use_bias=False, name="fc1")(x))
        x = nn.Dense(self.hidden[1], use_bias=False, name="fc2")(x)
        if self.include_bn:
            nn.BatchNorm(use_running_average=True, name="bn1")(x[:, :10])
        return x


IMAGE = jnp.ones((1, 28, 28, 1))


def init_linen(module: nn.Module, seed: int, *inputs):
    return module.init(jax.random.key(seed), *inputs)


def with_constants(variables, constants: dict[str, float]):
    """A copy of Linen ``variables`` whose ``params/<module>/kernel`` leaves are filled with
    ``constants[module]`` (other leaves kept), like ``nn.init.constant_`` on torch weights."""

    def fill(path, leaf):
        keys = [getattr(key, "key", None) for key in path]
        if keys[0] == "params" and keys[-1] == "kernel" and keys[1] in constants:
            return jnp.full(leaf.shape, constants[keys[1]], leaf.dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(fill, variables)


class NnxToyConvNet(nnx.Module):
    """NNX stand-in for ``ToyConvNet(include_bn=True)``: bias-free convolutions and dense
    layers, and a BatchNorm of 10 features (no forward pass is needed)."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 8, (5, 5), use_bias=False, rngs=rngs)
        self.conv2 = nnx.Conv(8, 16, (5, 5), use_bias=False, rngs=rngs)
        self.fc1 = nnx.Linear(16 * 4 * 4, 120, use_bias=False, rngs=rngs)
        self.fc2 = nnx.Linear(120, 64, use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(10, rngs=rngs)


class ConvUnit(nnx.Module):
    """A 3-D convolution, then a BatchNorm when ``norm`` (the convolution then has no bias,
    as in the U-Net's ``ConvolutionalBlock``). ``block`` holds the same submodules a second
    time: they are tied, as the torch block's ``conv_layer``/``norm_layer`` and its
    ``nn.Sequential``."""

    def __init__(self, cin: int, cout: int, *, norm: bool, kernel: int = 3, rngs: nnx.Rngs):
        # Constant initial weights: random 3-D kernels of many shapes take seconds to initialize.
        self.conv_layer = nnx.Conv(
            cin,
            cout,
            (kernel,) * 3,
            use_bias=not norm,
            kernel_init=nnx.initializers.constant(0.5),
            bias_init=nnx.initializers.constant(0.25),
            rngs=rngs,
        )
        self.norm_layer = nnx.BatchNorm(cout, rngs=rngs) if norm else None
        self.block = nnx.List([self.conv_layer] + ([self.norm_layer] if norm else []))


class TwoUnits(nnx.Module):
    def __init__(self, cin: int, cmid: int, cout: int, *, first_norm: bool, rngs: nnx.Rngs):
        self.conv1 = ConvUnit(cin, cmid, norm=first_norm, rngs=rngs)
        self.conv2 = ConvUnit(cmid, cout, norm=True, rngs=rngs)


class Encoder(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.encoding_blocks = nnx.List(
            [TwoUnits(1, 2, 4, first_norm=False, rngs=rngs), TwoUnits(4, 4, 8, first_norm=True, rngs=rngs)]
        )


class Decoder(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.decoding_blocks = nnx.List([TwoUnits(24, 8, 8, first_norm=True, rngs=rngs)])


class TinyUNet(nnx.Module):
    """A nested NNX stand-in for fl4health's ``UNet3D(num_encoding_blocks=2,
    out_channels_first_layer=2)``: encoder (a list of two blocks), bottom block, decoder (a
    list of one block) and a 1x1x1 classifier, every block holding tied submodules.

    Its distinct layers, by hand: 7 BatchNorms (encoder block 0: 1, block 1: 2, bottom: 2,
    decoder: 2), each with scale, bias, mean and var (28 layers); convolution kernels: 9;
    convolution biases: 2 (the encoder's first convolution and the classifier, the two
    without a BatchNorm after them). 28 + 11 = 39 layers, 11 of them outside BatchNorms."""

    def __init__(self, rngs: nnx.Rngs):
        self.encoder = Encoder(rngs)
        self.bottom_block = TwoUnits(8, 8, 16, first_norm=True, rngs=rngs)
        self.decoder = Decoder(rngs)
        self.classifier = ConvUnit(8, 2, norm=False, kernel=1, rngs=rngs)


@pytest.fixture
def ones_layers(layer_shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """Float64 arrays of ones of the given shapes (fl4health's ``get_ndarrays`` fixture)."""
    return [np.ones(shape) for shape in layer_shapes]


# ---------------------------------------------------------------------------------------
# tests/parameter_exchange/test_layer_exchanger.py
# ---------------------------------------------------------------------------------------


def test_layer_parameter_exchange():
    """Ports tests/parameter_exchange/test_layer_exchanger.py::test_layer_parameter_exchange.

    A fixed exchanger of one layer pushes exactly that layer and pulls into it alone.
    Unlike torch's in-place ``load_state_dict``, pulling into a Linen variables dict
    returns a new dict and leaves the given one as it was (README, "Exchangers").
    """
    variables = init_linen(TwoLinear(), 0, jnp.ones((1, 4)), jnp.ones((1, 3)))
    variables = with_constants(variables, {"independent_layer": 1.0, "shared_layer": 2.0})
    exchanger = jlx.FixedLayerExchanger(["params/shared_layer/kernel"])

    payload = exchanger.push_parameters(variables)
    assert len(payload) == 1
    assert np.array_equal(payload[0], np.full((3, 3), 2.0))

    pulled = exchanger.pull_parameters([2.0 * layer for layer in payload], variables)
    np.testing.assert_array_equal(pulled["params"]["shared_layer"]["kernel"], np.full((3, 3), 4.0))
    np.testing.assert_array_equal(pulled["params"]["independent_layer"]["kernel"], np.ones((4, 4)))
    np.testing.assert_array_equal(variables["params"]["shared_layer"]["kernel"], np.full((3, 3), 2.0))


def test_norm_drift_layer_exchange():
    """Ports tests/parameter_exchange/test_layer_exchanger.py::test_norm_drift_layer_exchange.

    Same sequence as fl4health's test, including switching the constructor to normalized
    drift by assigning ``constructor.normalize = True`` between two ``select_by_threshold()``
    calls. The drift norms are recomputed with numpy here: from all-zero kernels to
    constants 1/20000, 1/20000, 1 and 2, the plain L2 drifts are about 7.1e-4, 2.8e-3, 175.3
    and 175.3 (conv1, conv2, fc1, fc2), so a threshold of 2 sends fc1 and fc2; divided by
    the layer sizes (200, 3200, 30720, 7680) none is above 2; the 50% that drifted most
    (2 of 4 layers) are fc1 and fc2.
    """
    module = SmallConvNet()
    constants = {"conv1": 1 / 20000, "conv2": 1 / 20000, "fc1": 1.0, "fc2": 2.0}
    initial = with_constants(init_linen(module, 0, IMAGE), dict.fromkeys(constants, 0.0))
    model = with_constants(init_linen(module, 1, IMAGE), constants)

    names = ["params/conv1/kernel", "params/conv2/kernel", "params/fc1/kernel", "params/fc2/kernel"]
    sizes = {
        "params/conv1/kernel": 5 * 5 * 1 * 8,
        "params/conv2/kernel": 5 * 5 * 8 * 16,
        "params/fc1/kernel": 256 * 120,
        "params/fc2/kernel": 120 * 64,
    }
    values = dict(zip(names, constants.values()))
    plain = {name: math.sqrt(sizes[name]) * values[name] for name in names}  # ||c * ones(n)|| = c sqrt(n)
    normalized = {name: plain[name] / sizes[name] for name in names}
    assert [name for name in names if plain[name] > 2] == ["params/fc1/kernel", "params/fc2/kernel"]
    assert [name for name in names if normalized[name] > 2] == []
    top_half = sorted(names, key=lambda name: -normalized[name])[: math.ceil(len(names) * 0.5)]
    assert sorted(top_half) == ["params/fc1/kernel", "params/fc2/kernel"]

    constructor = jlx.LayerSelectionFunctionConstructor(
        norm_threshold=2, exchange_percentage=0.5, normalize=False, select_drift_more=True
    )
    exchanger = jlx.DynamicLayerExchanger(layer_selection_function=constructor.select_by_threshold())

    # Threshold on plain L2 drift: fc1 and fc2.
    layers, layer_names = exchanger.unpack_parameters(exchanger.push_parameters(model, initial))
    assert len(layers) == 2 and layer_names == ["params/fc1/kernel", "params/fc2/kernel"]

    # Threshold on normalized drift: nothing.
    constructor.normalize = True
    exchanger.layer_selection_function = constructor.select_by_threshold()
    layers, layer_names = exchanger.unpack_parameters(exchanger.push_parameters(model, initial))
    assert len(layers) == 0 and layer_names == [], f"normalized drift selected {layer_names}"

    # The half of the layers that drifted most: fc1 and fc2.
    exchanger.layer_selection_function = constructor.select_by_percentage()
    layers, layer_names = exchanger.unpack_parameters(exchanger.push_parameters(model, initial))
    assert len(layers) == 2 and layer_names == ["params/fc1/kernel", "params/fc2/kernel"]


# ---------------------------------------------------------------------------------------
# tests/parameter_exchange/test_packing_exchanger.py
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer_shapes", [[(3, 3)] * 6])
def test_parameter_packer_with_layer_names(ones_layers):
    """Ports tests/parameter_exchange/test_packing_exchanger.py::test_parameter_packer_with_layer_names.

    ``ParameterPackerWithLayerNames`` is ``jlx.pack_layers``/``jlx.unpack_layers``: the
    arrays, then one array of their names.
    """
    names = [f"layer{i}" for i in range(1, 7)]
    packed = jlx.pack_layers(ones_layers, names)

    assert len(packed) == len(ones_layers) + 1
    expected = ones_layers + [np.array(names)]
    for got, want in zip(packed, expected):
        assert got.size == want.size
        np.testing.assert_array_equal(got, want)
    assert packed[-1].dtype.kind == "U"  # a Unicode array, never object

    weights, unpacked_names = jlx.unpack_layers(packed)
    assert len(weights) == len(ones_layers)
    for got, want in zip(weights, ones_layers):
        assert got.size == want.size
        np.testing.assert_array_equal(got, want)
    assert unpacked_names == names


def nonzero_coo(dense: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Values, ``(n, ndim)`` row-major coordinates and shape of the non-zero entries."""
    return dense[dense != 0], np.argwhere(dense), np.array(dense.shape)


def test_sparse_coo_parameter_packer():
    """Ports tests/parameter_exchange/test_packing_exchanger.py::test_sparse_coo_parameter_packer.

    ``SparseCooParameterPacker`` is ``jlx.pack_coo``/``jlx.unpack_coo``: values, then
    indices, then shapes, then the names.
    """
    dense = np.array([[1, 0, 0, 0], [0, 2, 0, 0], [0, 0, 3, 0], [0, 0, 0, 4], [5, 0, 0, 0]])
    names = [f"tensor{i}" for i in range(1, 7)]
    parts = [nonzero_coo(dense.copy()) for _ in names]
    values = [part[0] for part in parts]
    indices = [part[1] for part in parts]
    shapes = [part[2] for part in parts]
    # By hand: the non-zeros in row-major order, at these coordinates.
    np.testing.assert_array_equal(values[0], [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(indices[0], [[0, 0], [1, 1], [2, 2], [3, 3], [4, 0]])

    packed = jlx.pack_coo(values, indices, shapes, names)

    assert len(packed) == 3 * len(values) + 1
    expected = values + indices + shapes + [np.array(names)]
    for got, want in zip(packed, expected):
        assert (got == want).all()

    unpacked_values, (unpacked_indices, unpacked_shapes, unpacked_names) = jlx.unpack_coo(packed)
    assert unpacked_names == names
    for got_list, want_list in ((unpacked_values, values), (unpacked_indices, indices), (unpacked_shapes, shapes)):
        assert len(got_list) == len(want_list)
        for got, want in zip(got_list, want_list):
            np.testing.assert_array_equal(got, want)


def test_sparse_coo_parameter_exchanger_sparsity_level():
    """Ports tests/parameter_exchange/test_packing_exchanger.py::test_sparse_coo_parameter_exchanger_sparsity_level.

    A randomly initialized conv net of 200 + 3200 + 30720 + 7680 = 41800 weights at
    sparsity 0.1 sends 4180 of them (its weights are continuous random values, so there
    is no tie at the threshold), each layer with as many indices as values.
    """
    module = SmallConvNet()
    model = init_linen(module, 42, IMAGE)
    initial = init_linen(module, 43, IMAGE)
    total = 5 * 5 * 1 * 8 + 5 * 5 * 8 * 16 + 256 * 120 + 120 * 64
    assert total == 41800 == sum(leaf.size for leaf in jax.tree.leaves(model))

    exchanger = jlx.SparseCooParameterExchanger(
        sparsity_level=0.1, score_gen_function=jlx.largest_final_magnitude_scores
    )
    values, (indices, shapes, names) = exchanger.select_parameters(model, initial)

    selected = sum(len(layer) for layer in values)
    assert selected * 10 == total
    for layer_values, layer_indices in zip(values, indices):
        assert len(layer_values) == len(layer_indices)
    # Cross-check with numpy: the 4180 largest magnitudes, read back at the sent coordinates.
    flat = {
        "/".join(str(k.key) for k in path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(model)
    }
    magnitudes = np.concatenate([np.abs(leaf).ravel() for leaf in flat.values()])
    threshold = np.sort(magnitudes)[::-1][4180 - 1]
    for name, layer_values, layer_indices, shape in zip(names, values, indices, shapes):
        layer = flat[name]
        assert tuple(shape) == layer.shape
        np.testing.assert_array_equal(layer[tuple(layer_indices.T)], layer_values)
        assert len(layer_values) == np.count_nonzero(np.abs(layer) >= threshold)


def test_sparse_coo_parameter_exchanger():
    """Ports tests/parameter_exchange/test_packing_exchanger.py::test_sparse_coo_parameter_exchanger.

    A constant conv net (conv1 6x1x5x5, conv2 16x6x5x5, fc1 16x256, fc2 4x16 in torch's
    layout; 6710 weights) moved from constants 0.1, 2, 3.2, 5 to 1.5, 2.5, 3.5, 4.5. At
    sparsity 0.001 (ceil(6.71) = 7 weights), the threshold is the score of whole layers, and
    ties are all kept, so each criterion sends exactly one whole layer. By hand, per layer
    (conv1, conv2, fc1, fc2): |w| = 1.5, 2.5, 3.5, 4.5; |w - w0| = 1.4, 0.5, 0.3, 0.5;
    |w| - |w0| = 1.4, 0.5, 0.3, -0.5. Flax kernels are transposed from torch's, hence the
    shapes (5, 5, 1, 6), (256, 16) and (16, 4).

    The pull sends 6.6 as float64 into the float32 fc2, as fl4health's test does; jaxlayerx's
    dtype policy accepts floating values of any width into a floating layer, rounded, as
    torch's ``load_state_dict`` does (jaxlayerx/dtypes.py, module docstring). Unlike
    torch's in-place load, pulling into a variables dict returns a new dict.
    """
    module = SmallConvNet(channels=(6, 16), hidden=(16, 4))
    initial = with_constants(init_linen(module, 0, IMAGE), {"conv1": 0.1, "conv2": 2.0, "fc1": 3.2, "fc2": 5.0})
    model = with_constants(init_linen(module, 0, IMAGE), {"conv1": 1.5, "conv2": 2.5, "fc1": 3.5, "fc2": 4.5})
    assert sum(leaf.size for leaf in jax.tree.leaves(model)) == 150 + 2400 + 4096 + 64

    exchanger = jlx.SparseCooParameterExchanger(
        sparsity_level=0.001, score_gen_function=jlx.largest_final_magnitude_scores
    )

    def select_one():
        values, (indices, shapes, names) = exchanger.select_parameters(model, initial)
        assert len(values) == len(indices) == len(shapes) == len(names) == 1
        return values[0], indices[0], shapes[0], names[0], (indices, shapes, names)

    # Largest final magnitude: fc2.
    values, indices, shape, name, additional = select_one()
    assert (values == 4.5).all()
    assert len(indices) == 64
    assert (shape == np.array([16, 4])).all()
    assert name == "params/fc2/kernel"

    # Pull new values for the selected weights.
    packed = exchanger.pack_parameters(model_weights=[np.full(values.shape, 6.6)], additional_parameters=additional)
    pulled = exchanger.pull_parameters(packed, model)
    params = pulled["params"]
    assert (np.asarray(params["conv1"]["kernel"]) == np.float32(1.5)).all()
    assert (np.asarray(params["conv2"]["kernel"]) == np.float32(2.5)).all()
    assert (np.asarray(params["fc1"]["kernel"]) == np.float32(3.5)).all()
    assert (np.asarray(params["fc2"]["kernel"]) == np.float32(6.6)).all()
    assert params["fc2"]["kernel"].dtype == jnp.float32
    assert (np.asarray(model["params"]["fc2"]["kernel"]) == np.float32(4.5)).all()  # the given dict is unchanged

    cases = [
        (jlx.largest_magnitude_change_scores, 1.5, 150, [5, 5, 1, 6], "params/conv1/kernel"),
        (jlx.largest_increase_in_magnitude_scores, 1.5, 150, [5, 5, 1, 6], "params/conv1/kernel"),
        (jlx.smallest_final_magnitude_scores, 1.5, 150, [5, 5, 1, 6], "params/conv1/kernel"),
        (jlx.smallest_magnitude_change_scores, 3.5, 4096, [256, 16], "params/fc1/kernel"),
        (jlx.smallest_increase_in_magnitude_scores, 4.5, 64, [16, 4], "params/fc2/kernel"),
    ]
    for score_function, value, count, expected_shape, expected_name in cases:
        exchanger.score_gen_function = score_function
        values, indices, shape, name, _ = select_one()
        assert (values == np.float32(value)).all(), score_function.__name__
        assert len(indices) == count, score_function.__name__
        assert (shape == np.array(expected_shape)).all(), score_function.__name__
        assert name == expected_name, score_function.__name__


# ---------------------------------------------------------------------------------------
# tests/parameter_exchange/test_layer_exchange_with_exclusions.py
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["nnx", "linen"])
def test_simple_model_exclusion(kind):
    """Ports tests/parameter_exchange/test_layer_exchange_with_exclusions.py::test_simple_model_exclusion.

    Excluding convolutions and BatchNorm leaves the two dense kernels (pooling has no
    layers). After pulling doubled values, the dense kernels are doubled and every excluded
    layer (convolutions, BatchNorm's scale, bias and running statistics) is unchanged. The
    NNX module is updated in place, as torch's is; the Linen variables come back as a new
    dict (README, "Exchangers").
    """
    if kind == "nnx":
        model = NnxToyConvNet(nnx.Rngs(0))
        model.fc1.kernel[...] = jnp.full((256, 120), 1.0)
        model.fc2.kernel[...] = jnp.full((120, 64), 2.0)
        model.bn1.scale[...] = jnp.linspace(0.5, 1.5, 10)
        exchanger = jlx.LayerExchangerWithExclusions(model, {nnx.Conv, nnx.BatchNorm})
        prefix = ""
    else:
        module = SmallConvNet(include_bn=True)
        model = with_constants(init_linen(module, 0, IMAGE), {"fc1": 1.0, "fc2": 2.0})
        exchanger = jlx.LayerExchangerWithExclusions(module, {nn.Conv, nn.BatchNorm}, IMAGE)
        prefix = "params/"
    before = {name: np.array(value) for name, value in jlx.flatten(model).items()}
    excluded = [name for name in before if "conv" in name or "bn1" in name]
    assert len(excluded) == len(before) - 2 == 2 + 4  # two conv kernels; scale, bias, mean, var

    assert exchanger.layers_to_transfer == [f"{prefix}fc1/kernel", f"{prefix}fc2/kernel"]
    payload = exchanger.push_parameters(model)
    assert len(payload) == 2

    pulled = exchanger.pull_parameters([2.0 * layer for layer in payload], model)
    after = {name: np.asarray(value) for name, value in jlx.flatten(pulled).items()}
    for name in excluded:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    np.testing.assert_array_equal(after[f"{prefix}fc1/kernel"], np.full((256, 120), 2.0))
    np.testing.assert_array_equal(after[f"{prefix}fc2/kernel"], np.full((120, 64), 4.0))
    if kind == "nnx":
        assert pulled is model
        np.testing.assert_array_equal(model.fc2.kernel[...], np.full((120, 64), 4.0))
        np.testing.assert_array_equal(model.bn1.scale[...], before["bn1/scale"])
        assert before["bn1/scale"][0] == 0.5 and before["bn1/scale"][-1] == 1.5


def test_nested_model_exclusion():
    """Ports tests/parameter_exchange/test_layer_exchange_with_exclusions.py::test_nested_model_exclusion.

    A nested NNX U-Net with tied submodules (see ``TinyUNet``: 11 layers outside its
    BatchNorms, counted by hand). Excluding ``nnx.BatchNorm`` sends those 11; pulling zeros
    zeroes every convolution and leaves every BatchNorm layer as it was, seen through
    either of the two attributes that hold the tied module.

    Documented difference: fl4health's torch U-Net gives 30 layers, counting a tied
    module's weights once per name in ``state_dict`` (and holding PReLU weights and
    ``num_batches_tracked``); in jaxlayerx's flat view "a shared (tied) submodule appears
    once" (README, "The flat view"), so the count here is that of distinct layers.
    """
    model = TinyUNet(nnx.Rngs(0))
    tied_bn = model.encoder.encoding_blocks[0].conv2.norm_layer
    assert tied_bn is model.encoder.encoding_blocks[0].conv2.block[1]
    tied_bn.scale[...] = jnp.array([0.25, 0.5, 0.75, 1.25])
    bn_scale = np.array(tied_bn.scale[...])
    assert len(jlx.flatten(model)) == 39

    exchanger = jlx.LayerExchangerWithExclusions(model, {nnx.BatchNorm})
    payload = exchanger.push_parameters(model)
    assert len(payload) == 11
    before = {name: np.array(value) for name, value in jlx.flatten(model).items()}

    exchanger.pull_parameters([0.0 * layer for layer in payload], model)

    block = model.encoder.encoding_blocks[0].conv2
    np.testing.assert_array_equal(block.norm_layer.scale[...], bn_scale)
    np.testing.assert_array_equal(block.block[1].scale[...], bn_scale)
    decoder_conv = model.decoder.decoding_blocks[0].conv2
    np.testing.assert_array_equal(decoder_conv.conv_layer.kernel[...], np.zeros((3, 3, 3, 8, 8)))
    np.testing.assert_array_equal(decoder_conv.block[0].kernel[...], np.zeros((3, 3, 3, 8, 8)))
    after = {name: np.asarray(value) for name, value in jlx.flatten(model).items()}
    bn_names = [
        name
        for name in after
        if name.rsplit("/", 1)[-1] in ("scale", "mean", "var")
        or (name.endswith("/bias") and name not in exchanger.layers_to_transfer)
    ]
    assert len(bn_names) == 28
    for name in bn_names:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    for name in exchanger.layers_to_transfer:
        assert not after[name].any(), name


# ---------------------------------------------------------------------------------------
# tests/strategies/test_dynamic_layer_fedavg.py
# ---------------------------------------------------------------------------------------


def test_dynamic_layer_fedavg_aggregate():
    """Ports tests/strategies/test_dynamic_layer_fedavg.py::test_aggregate.

    Four clients send different subsets of four named layers; each layer is averaged,
    weighted by example counts, over the clients that sent it. As in fl4health's test,
    client 0 sends float64 arrays and the others int64 arrays (``np.full`` of integers), so
    layer1 and layer2 arrive in mixed dtypes; the expectation is fl4health's float average
    (compared to float rounding: the summation order may differ).
    """
    payloads = [
        [np.ones((3, 3)), np.ones((4, 4)), np.array(["layer1", "layer2"])],
        [np.full((4, 4), 2), np.array(["layer2"])],
        [np.full((3, 3), 3), np.full((5, 5), 3), np.array(["layer1", "layer3"])],
        [np.full((4, 4), 4), np.full((6, 6), 4), np.array(["layer2", "layer4"])],
    ]
    sizes = [50, 50, 100, 200]

    result = jlx.FedAvgDynamicLayer().aggregate(list(zip(payloads, sizes)))

    expected = {
        "layer1": (50 * np.ones((3, 3)) + 100 * np.full((3, 3), 3)) / (50 + 100),  # 7/3
        "layer2": (50 * np.ones((4, 4)) + 50 * np.full((4, 4), 2) + 200 * np.full((4, 4), 4)) / (50 + 50 + 200),  # 3.5
        "layer3": np.full((5, 5), 3),
        "layer4": np.full((6, 6), 4),
    }
    assert set(result) == set(expected)
    for name, want in expected.items():
        assert np.shape(result[name]) == want.shape, name
        np.testing.assert_allclose(result[name], want, rtol=1e-6, err_msg=name)


# ---------------------------------------------------------------------------------------
# tests/strategies/test_fedavg_sparse_coo_tensor.py
# ---------------------------------------------------------------------------------------


def diagonal_coo(n: int, ones: bool, dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """COO parts of an n x n diagonal matrix: ones, or 1..n, on the diagonal."""
    values = np.ones(n, dtype) if ones else np.arange(1, n + 1).astype(dtype)
    return values, np.stack([np.arange(n), np.arange(n)], axis=1), np.array([n, n])


def client_coo_payload(names: list[str], sizes: list[int], dtype) -> list[np.ndarray]:
    parts = [diagonal_coo(n, ones, dtype) for n, ones in zip(sizes, [True, False])]
    return jlx.pack_coo([p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts], names)


@pytest.mark.parametrize("dtype", [np.int64, np.float64])
def test_fedavg_sparse_coo_tensor_aggregate(dtype):
    """Ports tests/strategies/test_fedavg_sparse_coo_tensor.py::test_aggregate.

    Three clients (25, 75 and 100 examples) send diagonal COO tensors: client 1 tensor1
    (3x3, ones) and tensor2 (4x4, 1..4); client 2 tensor2 (ones) and tensor3 (5x5, 1..5);
    client 3 tensor3 (ones) and tensor4 (6x6, 1..6). Every sender of a tensor sends the
    same entries (its diagonal), so averaging each weight over the clients that sent it
    gives the same numbers as fl4health's per-tensor average:
    tensor2 = (25 * [1, 2, 3, 4] + 75) / 100 = [1, 1.25, 1.5, 1.75] and
    tensor3 = (75 * [1..5] + 100) / 175.

    Documented differences that apply:

    * the result is ``name -> SparseLayer`` holding the averaged entries only (the
      diagonals), not a dense tensor with zeros elsewhere; writing it into zeros with
      ``merge_sparse_layers`` gives fl4health's dense result (README, "Server-side
      aggregation": each weight is averaged over the clients that sent that weight, and
      "the result is name -> SparseLayer (the averaged entries, row-major)");
    * fl4health's test sends integer values (``np.array`` of Python ints) and gets float
      averages from torch's division; in jaxlayerx "integer and boolean layers are averaged
      in float64 and rounded (ties to even)" and returned in their own dtype, with the same
      dtype rules for sparse payloads (README, "Server-side aggregation"). With int64 values
      (fl4health's payload) the port expects those rounded averages; with float64 values,
      fl4health's float averages.
    """
    payloads = [
        client_coo_payload(["tensor1", "tensor2"], [3, 4], dtype),
        client_coo_payload(["tensor2", "tensor3"], [4, 5], dtype),
        client_coo_payload(["tensor3", "tensor4"], [5, 6], dtype),
    ]
    sizes = [25, 75, 100]

    result = jlx.FedAvgSparseCooTensor(weighted_aggregation=True).aggregate(list(zip(payloads, sizes)))

    diagonals = {
        "tensor1": np.ones(3),
        "tensor2": (np.arange(1, 5) * 25 + np.ones(4) * 75) / (25 + 75),
        "tensor3": (np.arange(1, 6) * 75 + np.ones(5) * 100) / (75 + 100),
        "tensor4": np.arange(1, 7).astype(float),
    }
    np.testing.assert_allclose(diagonals["tensor2"], [1, 1.25, 1.5, 1.75])
    if dtype == np.int64:
        diagonals = {name: np.rint(diagonal) for name, diagonal in diagonals.items()}
        np.testing.assert_array_equal(diagonals["tensor2"], [1, 1, 2, 2])  # 1.25 -> 1, 1.5 -> 2 (to even), 1.75 -> 2
        np.testing.assert_array_equal(diagonals["tensor3"], [1, 1, 2, 2, 3])

    assert set(result) == set(diagonals)
    for name, diagonal in diagonals.items():
        n = len(diagonal)
        layer = result[name]
        assert tuple(layer.shape) == (n, n), name
        np.testing.assert_array_equal(layer.flat_indices, np.arange(n) * (n + 1), err_msg=name)  # the diagonal only
        assert layer.values.dtype == dtype, name
        np.testing.assert_allclose(layer.values, diagonal, rtol=1e-12, err_msg=name)
        dense = jlx.merge_sparse_layers({name: np.zeros((n, n), dtype)}, {name: layer})[name]
        np.testing.assert_allclose(dense, np.diag(diagonal), rtol=1e-12, err_msg=name)
