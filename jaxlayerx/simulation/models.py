"""Small default models for the simulation.

Any Flax Linen module called as ``module(x, train=bool)`` works, and any ``nnx.Module``
called as ``module(x)`` (see :mod:`jaxlayerx.simulation.adapters`).
"""

from __future__ import annotations

import flax.linen as nn
import jax

#: The models the command line offers, and the default of each data set.
MODELS: tuple[str, ...] = ("mlp", "cnn")
DEFAULT_MODEL = {"digits": "mlp", "mnist1d": "cnn"}

#: Every layer of each model but its classification head (``fixed``'s default, FedPer-style).
BODY_LAYERS = {"mlp": ("*/Dense_0/*", "*/BatchNorm_0/*", "*/Dense_1/*"), "cnn": ("*/Conv_*/*", "*/BatchNorm_*/*")}


class MLP(nn.Module):
    """Dense -> BatchNorm -> ReLU -> Dense -> ReLU -> Dense: a digits classifier with
    BatchNorm, so that the FedBN exchanger has something to keep local.

    Two 64x64 kernels hold 89% of its bytes (on digits).
    """

    hidden: int = 64
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        x = nn.Dense(self.hidden)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
    """Three convolutions with BatchNorm, each halving the resolution, then a dense head.

    For images ``(batch, height, width, channels)`` the convolutions are 3x3, for signals
    ``(batch, length, channels)`` of width 5 (a feature vector ``(batch, length)`` is read as
    a one-channel signal). The second and third convolutions have the same size and hold most
    of the bytes, so that no single layer dominates: on MNIST-1D they hold 36% each and the
    head 11%; on the digits 42% each.
    """

    channels: int = 32
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if x.ndim == 2:
            x = x[..., None]
        spatial = x.ndim - 2
        window = (3,) * spatial if spatial >= 2 else (5,)
        for _ in range(3):
            x = nn.Conv(self.channels, window, strides=(2,) * spatial)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = nn.relu(x)
        return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


def make_model(name: str, num_classes: int) -> nn.Module:
    """The model named ``name`` (one of :data:`MODELS`) for ``num_classes`` classes."""
    if name == "mlp":
        return MLP(num_classes=num_classes)
    if name == "cnn":
        return CNN(num_classes=num_classes)
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
