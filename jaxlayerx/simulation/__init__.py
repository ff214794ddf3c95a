"""Federated simulation: every client trains at once under ``jax.vmap`` in one jitted round."""

from jaxlayerx.simulation.config import SimulationConfig
from jaxlayerx.simulation.data import ClientData, dirichlet_label_split, load_digits_data, make_client_data
from jaxlayerx.simulation.engine import Simulation, simulate
from jaxlayerx.simulation.exchange import DEFAULT_FIXED_LAYERS, EXCHANGER_KINDS, ExchangerSpec, match_layers
from jaxlayerx.simulation.models import MLP
from jaxlayerx.simulation.state import ClientUpdates, RoundOutput, SimulationState

__all__ = [
    "DEFAULT_FIXED_LAYERS",
    "EXCHANGER_KINDS",
    "MLP",
    "ClientData",
    "ClientUpdates",
    "ExchangerSpec",
    "RoundOutput",
    "Simulation",
    "SimulationConfig",
    "SimulationState",
    "dirichlet_label_split",
    "load_digits_data",
    "make_client_data",
    "match_layers",
    "simulate",
]
