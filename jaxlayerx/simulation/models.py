"""Small default models for the simulation (any Flax Linen module taking ``(x, train)`` works)."""

from __future__ import annotations

import flax.linen as nn
import jax


class MLP(nn.Module):
    """Dense -> BatchNorm -> ReLU -> Dense -> ReLU -> Dense: a digits classifier with
    BatchNorm, so that the FedBN exchanger has something to keep local."""

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
