"""Feature shift: each client sees its inputs through its own fixed transform.

FedBN (Li et al., 2021) was designed for clients whose inputs look different (scanners,
cameras, sites), not for clients with different labels. ``--shift`` makes such clients.
Client ``c`` draws its transform once, from ``numpy.random.default_rng([seed, 3, c])``,
and applies it to its own training and test examples alike:

1. contrast and brightness: ``x -> mean + a (x - mean) + b * std``, with ``|a|`` drawn in
   ``[0.5, 1.5]``, ``a`` negative (the input inverted) with probability 1/2, and ``b`` in
   ``[-0.5, 0.5]``; ``mean`` and ``std`` are the data set's own;
2. additive Gaussian noise of a standard deviation drawn in ``[0, 0.3] * std``, one fixed
   draw per example;
3. for images and signals (examples of shape ``(*spatial, channels)``), a translation by
   up to 5% of each spatial size, rounded (MNIST-1D's 40 steps: up to 2; the digits' 8
   pixels: none), zero-filled; for plain feature vectors (examples of shape
   ``(features,)``), a permutation of a tenth of the features (at least two).

Step 1 is what a private BatchNorm can absorb, per channel, and a shared one cannot: under
it FedBN's claim, that local BatchNorm layers beat FedAvg, can be tested.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class ClientShift:
    """One client's transform (see the module docstring).

    Attributes:
      contrast: ``a``; negative means inverted.
      brightness: ``b``, in units of the data's standard deviation.
      noise: the noise's standard deviation, in units of the data's standard deviation.
      translation: per spatial axis, the steps the example moves (images and signals).
      permutation: the feature order (feature vectors), or ``None``.
    """

    contrast: float
    brightness: float
    noise: float
    translation: tuple[int, ...]
    permutation: tuple[int, ...] | None


def draw_shift(feature_shape: tuple[int, ...], seed: int, client: int) -> ClientShift:
    """Client ``client``'s transform for examples of ``feature_shape``; a function of ``(seed, client)``."""
    rng = np.random.default_rng([seed, 3, client])
    contrast = float(rng.uniform(0.5, 1.5)) * (-1.0 if rng.random() < 0.5 else 1.0)
    brightness = float(rng.uniform(-0.5, 0.5))
    noise = float(rng.uniform(0.0, 0.3))
    if len(feature_shape) >= 2:
        spatial = feature_shape[:-1]
        limits = [round(0.05 * size) for size in spatial]
        translation = tuple(int(rng.integers(-limit, limit + 1)) for limit in limits)
        return ClientShift(contrast, brightness, noise, translation, None)
    features = feature_shape[0] if feature_shape else 1
    if features < 2:  # one value per example: nothing to permute
        return ClientShift(contrast, brightness, noise, (), None)
    count = min(features, max(2, features // 10))
    order = np.arange(features)
    chosen = rng.choice(features, size=count, replace=False)
    order[chosen] = order[rng.permutation(chosen)]
    return ClientShift(contrast, brightness, noise, (), tuple(int(i) for i in order))


def apply_shift(x: np.ndarray, shift: ClientShift, mean: float, std: float, rng: np.random.Generator) -> np.ndarray:
    """``x`` (``(n, *feature_shape)`` float32) seen through ``shift``; noise drawn from ``rng``."""
    x = np.asarray(x, np.float32)
    out = np.float32(mean) + np.float32(shift.contrast) * (x - np.float32(mean)) + np.float32(shift.brightness * std)
    out = out + rng.normal(0.0, shift.noise * std, size=x.shape).astype(np.float32)
    for axis, steps in enumerate(shift.translation, start=1):
        out = _translate(out, axis, steps)
    if shift.permutation is not None:
        out = out[:, np.asarray(shift.permutation)]
    return out.astype(np.float32)


def _translate(x: np.ndarray, axis: int, steps: int) -> np.ndarray:
    """``x`` moved by ``steps`` along ``axis``, the uncovered part zero-filled."""
    if steps == 0:
        return x
    moved = np.roll(x, steps, axis=axis)
    index = [slice(None)] * x.ndim
    index[axis] = slice(0, steps) if steps > 0 else slice(steps, None)
    moved[tuple(index)] = 0
    return moved
