"""The legacy Flower route (``NumPyClient``, ``flwr.server.strategy``) in fl4health's
layouts, for fl4health's servers and clients: :class:`ExchangerClient`,
:class:`FedAvgDynamicLayerStrategy` and :class:`FedAvgSparseCooTensorStrategy`."""

from jaxlayerx.flower.legacy.client import ExchangerClient, client_app, stateful_client_fn
from jaxlayerx.flower.legacy.strategy import FedAvgDynamicLayerStrategy, FedAvgSparseCooTensorStrategy

__all__ = [
    "ExchangerClient",
    "FedAvgDynamicLayerStrategy",
    "FedAvgSparseCooTensorStrategy",
    "client_app",
    "stateful_client_fn",
]
