"""What a simulated federation carries from round to round, and what one round computes."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from jaxlayerx.base import FlatView


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SimulationState:
    """Everything a run carries from round to round (device arrays).

    Attributes:
      global_layers: the server's model.
      client_layers: every client's own model, stacked on a leading client axis.
      references: with error feedback, every client's last pulled values (stacked); else empty.
      residuals: with error feedback and quantization, every client's carried quantization
        error (float32, stacked); else empty.
      updated_in: per layer (per weight, for sparse exchangers), the round in which the
        global value last changed (0: the initial model).
      synced: ``(num_clients,)``, the round whose global model each client holds (``-1``:
        it never took part).
      server_state: the server optimizer's state over the whole model (empty for FedAvg).
      round_index: the last round run (0 before the first).
      opt_states: with ``keep_client_optimizer_state``, every client's optimizer state
        (stacked); else ``None``.
    """

    global_layers: FlatView
    client_layers: FlatView
    references: FlatView
    residuals: FlatView
    updated_in: FlatView
    synced: jax.Array
    server_state: Any
    round_index: jax.Array
    opt_states: Any = None

    @property
    def pull_mask(self) -> FlatView:
        """What the last round changed in the global model: what a client that took part in
        it pulls next (a scalar per layer, or per weight)."""
        return FlatView((name, rounds == self.round_index) for name, rounds in self.updated_in.items())


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ClientUpdates:
    """What the sampled clients of a round computed (client-stacked device arrays).

    Attributes:
      starts, trained: each client's layers at the round's start and after training.
      masks: what each sent (a boolean per layer, or per weight).
      values: what the server receives of it: the trained values, or with quantization
        what the server rebuilds.
      references, residuals: each client's error-feedback state after the round.
      counts: each client's weight (its training examples, float32).
      pull_counts: ``(clients, layers)``: how many values of each layer each pulled.
      first_contact: whether each got the whole model.
      opt_states: each client's optimizer state after training.
      train_metrics: each client's metrics from its client update.
    """

    starts: FlatView
    trained: FlatView
    masks: FlatView
    values: FlatView
    references: FlatView
    residuals: FlatView
    counts: jax.Array
    pull_counts: jax.Array
    first_contact: jax.Array
    opt_states: Any
    train_metrics: dict[str, jax.Array]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RoundOutput:
    """Everything one round computed (device arrays); client-stacked values follow ``clients``.

    Attributes:
      state: the state after the round.
      clients: ``(clients_per_round,)`` the sampled clients, ascending.
      start_layers, trained_layers, send_masks: each sampled client's.
      metrics: the global loss and metrics (``global_loss``, ``global_<metric>``), each
        sampled client's local ones (``local_loss``, ``local_<metric>``) and client-update
        metrics (``train_<metric>``), and the values each client sent and pulled per layer.
    """

    state: SimulationState
    clients: jax.Array
    start_layers: FlatView
    trained_layers: FlatView
    send_masks: FlatView
    metrics: dict[str, jax.Array]
