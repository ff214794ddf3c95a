"""How a simulated federation trains: :class:`SimulationConfig`, checked."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, cast

import numpy as np
import optax

from jaxlayerx.aggregation import AVERAGE_OVER
from jaxlayerx.simulation.data import ClientData
from jaxlayerx.simulation.server import SERVER_OPTIMIZERS, server_optimizer

#: Local steps per round above this are refused (a typo, not a plan).
MAX_LOCAL_STEPS = 100_000

#: The local optimizers by name.
LOCAL_OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")


@dataclasses.dataclass(frozen=True)
class SimulationConfig:
    """How a federated run trains.

    Attributes:
      rounds: federated rounds.
      local_steps: local steps per client per round (a batch each, drawn with replacement
        from the client's own training data).
      local_epochs: if set, replaces ``local_steps`` by
        ``ceil(local_epochs * mean client training size / batch_size)`` (the same for every
        client: they train in one vmapped computation).
      batch_size: examples per local step.
      learning_rate: of the local optimizer (its state fresh each round, unless
        ``Simulation(keep_client_optimizer_state=True)``).
      momentum: of ``sgd`` (0 for none); ``adam`` ignores it.
      local_optimizer: ``sgd`` or ``adam``.
      weighted: weight the server average by each client's number of training examples.
      seed: seeds the model initialisation, the client sampling and the batches.
      clients_per_round: clients sampled each round; ``None`` for all of them.
      chunk_size: clients trained at once inside a round; ``None`` for all sampled clients.
      server_optimizer: ``avg`` (FedAvg), ``sgd``, ``adam``, ``yogi`` or ``adagrad`` (FedOpt).
      server_lr: the server optimizer's learning rate; ``None`` for its default.
      average_over: ``senders`` (each layer, or weight, averaged over the clients that
        sent it) or ``participants`` (moved by the mean change over the round's clients, a
        client that did not send it counting as no change); see :func:`jaxlayerx.masked_fedavg`.
    """

    rounds: int = 20
    local_steps: int = 20
    local_epochs: float | None = None
    batch_size: int = 32
    learning_rate: float = 0.05
    momentum: float = 0.9
    local_optimizer: str = "sgd"
    weighted: bool = True
    seed: int = 0
    clients_per_round: int | None = None
    chunk_size: int | None = None
    server_optimizer: str = "avg"
    server_lr: float | None = None
    average_over: str = "senders"

    def __post_init__(self) -> None:
        for name in ("rounds", "local_steps", "batch_size"):
            _check_positive_int(name, getattr(self, name))
        for name in ("clients_per_round", "chunk_size"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        if self.local_steps > MAX_LOCAL_STEPS:
            raise ValueError(f"local-steps must be at most {MAX_LOCAL_STEPS}, got {self.local_steps}")
        if self.local_epochs is not None and not (math.isfinite(self.local_epochs) and self.local_epochs > 0):
            raise ValueError(f"local-epochs must be a finite number > 0, got {self.local_epochs}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning-rate must be a finite number > 0, got {self.learning_rate}")
        if not isinstance(cast(object, self.seed), int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        for name, keyword in (("local_optimizer", "client_optimizer"), ("server_optimizer", "server_optimizer")):
            if not isinstance(cast(object, getattr(self, name)), str):
                raise TypeError(
                    f"SimulationConfig({name}=...) takes a name ({', '.join(_NAMES[name])}); pass an optax "
                    f"transformation as Simulation(..., {keyword}=...)"
                )
        if self.local_optimizer not in LOCAL_OPTIMIZERS:
            raise ValueError(
                f"unknown local optimizer {self.local_optimizer!r}; choose from {', '.join(LOCAL_OPTIMIZERS)}"
            )
        if self.server_optimizer not in SERVER_OPTIMIZERS:
            raise ValueError(
                f"unknown server optimizer {self.server_optimizer!r}; choose from {', '.join(SERVER_OPTIMIZERS)}"
            )
        if self.server_lr is not None and self.server_optimizer == "avg":
            raise ValueError("server-lr needs a server optimizer (sgd, adam, yogi or adagrad); avg takes the average")
        server_optimizer(self.server_optimizer, self.server_lr)  # checks the learning rate
        if self.average_over not in AVERAGE_OVER:
            raise ValueError(f"unknown average-over {self.average_over!r}; choose from {', '.join(AVERAGE_OVER)}")

    @property
    def optimizer(self) -> optax.GradientTransformation:
        """The local optimizer."""
        if self.local_optimizer == "adam":
            return optax.adam(self.learning_rate)
        return optax.sgd(self.learning_rate, momentum=self.momentum or None)


_NAMES = {"local_optimizer": LOCAL_OPTIMIZERS, "server_optimizer": SERVER_OPTIMIZERS}


def _check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")


def local_steps_for(config: SimulationConfig, data: ClientData) -> int:
    """``config.local_steps``, or the steps that make ``config.local_epochs`` epochs."""
    if config.local_epochs is None:
        return config.local_steps
    steps = max(1, math.ceil(config.local_epochs * float(np.mean(data.n_train)) / config.batch_size))
    if steps > MAX_LOCAL_STEPS:
        raise ValueError(f"local-epochs {config.local_epochs} means {steps} local steps, more than {MAX_LOCAL_STEPS}")
    return steps
