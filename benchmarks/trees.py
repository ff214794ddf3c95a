"""Synthetic float32 parameter trees with real shapes, for the benchmarks."""

from __future__ import annotations

import numpy as np


def resnet50_shapes() -> dict[str, tuple[int, ...]]:
    """The 267 parameter and running-statistic shapes of ResNet-50 (torchvision layout,
    without ``num_batches_tracked``; kernels in Flax's HWIO order): 25.6 M values."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv_bn(name: str, kernel: int, cin: int, cout: int) -> None:
        shapes[f"{name}/conv/kernel"] = (kernel, kernel, cin, cout)
        for part in ("scale", "bias", "mean", "var"):
            shapes[f"{name}/bn/{part}"] = (cout,)

    conv_bn("stem", 7, 3, 64)
    cin = 64
    for stage, (width, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)]):
        for block in range(blocks):
            prefix = f"stage{stage}/block{block}"
            conv_bn(f"{prefix}/conv1", 1, cin, width)
            conv_bn(f"{prefix}/conv2", 3, width, width)
            conv_bn(f"{prefix}/conv3", 1, width, 4 * width)
            if block == 0:
                conv_bn(f"{prefix}/downsample", 1, cin, 4 * width)
            cin = 4 * width
    shapes["head/kernel"] = (2048, 1000)
    shapes["head/bias"] = (1000,)
    return shapes


def small_layers_shapes(count: int = 400, side: int = 64) -> dict[str, tuple[int, ...]]:
    """``count`` layers of ``side x side``: overhead-dominated, as in many small models."""
    return {f"layer{i:03d}/kernel": (side, side) for i in range(count)}


def transformer_block_shapes(
    blocks: int = 4, width: int = 512, heads: int = 8, mlp: int = 2048
) -> dict[str, tuple[int, ...]]:
    """``blocks`` pre-LayerNorm transformer blocks (attention and MLP), 12.6 M values at the defaults."""
    shapes: dict[str, tuple[int, ...]] = {}
    head_dim = width // heads
    for block in range(blocks):
        prefix = f"block{block}"
        for norm in ("ln1", "ln2"):
            shapes[f"{prefix}/{norm}/scale"] = (width,)
            shapes[f"{prefix}/{norm}/bias"] = (width,)
        for projection in ("query", "key", "value"):
            shapes[f"{prefix}/attention/{projection}/kernel"] = (width, heads, head_dim)
            shapes[f"{prefix}/attention/{projection}/bias"] = (heads, head_dim)
        shapes[f"{prefix}/attention/out/kernel"] = (heads, head_dim, width)
        shapes[f"{prefix}/attention/out/bias"] = (width,)
        shapes[f"{prefix}/mlp/up/kernel"] = (width, mlp)
        shapes[f"{prefix}/mlp/up/bias"] = (mlp,)
        shapes[f"{prefix}/mlp/down/kernel"] = (mlp, width)
        shapes[f"{prefix}/mlp/down/bias"] = (width,)
    return shapes


def nested(flat: dict[str, np.ndarray]) -> dict:
    """A nested dict (a pytree like Linen params) from ``a/b/c`` names."""
    tree: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def random_tree(shapes: dict[str, tuple[int, ...]], seed: int, scale: float = 1.0) -> dict:
    """A nested dict of float32 normal arrays with the given shapes."""
    rng = np.random.default_rng(seed)
    return nested({name: scale * rng.standard_normal(shape, dtype=np.float32) for name, shape in shapes.items()})
