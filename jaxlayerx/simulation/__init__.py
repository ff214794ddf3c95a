"""Federated simulation: every client trains at once under ``jax.vmap`` in one jitted round."""

from jaxlayerx.simulation.config import SimulationConfig
from jaxlayerx.simulation.data import ClientData, dirichlet_label_split, load_digits_data, make_client_data
from jaxlayerx.simulation.engine import Simulation, simulate
from jaxlayerx.simulation.exchange import DEFAULT_FIXED_LAYERS, EXCHANGER_KINDS, ExchangerSpec, match_layers
from jaxlayerx.simulation.models import MLP
from jaxlayerx.simulation.state import ClientUpdates, RoundOutput, SimulationState
from jaxlayerx.simulation.task import (
    ClientUpdate,
    LocalData,
    Task,
    classification_loss,
    classification_metrics,
    local_training,
)

__all__ = [
    "DEFAULT_FIXED_LAYERS",
    "EXCHANGER_KINDS",
    "MLP",
    "ClientData",
    "ClientUpdate",
    "ClientUpdates",
    "ExchangerSpec",
    "LocalData",
    "RoundOutput",
    "Simulation",
    "SimulationConfig",
    "SimulationState",
    "Task",
    "classification_loss",
    "classification_metrics",
    "dirichlet_label_split",
    "load_digits_data",
    "local_training",
    "make_client_data",
    "match_layers",
    "simulate",
]
