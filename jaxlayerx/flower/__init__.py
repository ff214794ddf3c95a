"""Flower adapters: jaxlayerx exchangers in real, multi-process federations.

* :class:`ExchangerClient`: a Flower ``NumPyClient`` around a Flax model, a local train
  function and any jaxlayerx exchanger; :func:`stateful_client_fn` and :func:`client_app`
  build Flower's ``client_fn``/``ClientApp`` from it, keeping the model between messages.
* :class:`FedAvgDynamicLayerStrategy`: a Flower ``FedAvg`` that averages packed, named,
  partial payloads layer by layer and keeps the full global model.

Needs the ``flower`` extra: ``pip install 'jaxlayerx[flower]'``.
"""

try:
    import flwr as flwr  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised without the extra
    raise ImportError("jaxlayerx.flower needs Flower; install it with: pip install 'jaxlayerx[flower]'") from error

from jaxlayerx.flower.client import ExchangerClient, client_app, stateful_client_fn
from jaxlayerx.flower.metrics import weighted_metrics_average
from jaxlayerx.flower.payloads import checked_payload
from jaxlayerx.flower.strategy import ClientRecord, FedAvgDynamicLayerStrategy, RoundRecord

__all__ = [
    "ClientRecord",
    "ExchangerClient",
    "FedAvgDynamicLayerStrategy",
    "RoundRecord",
    "client_app",
    "checked_payload",
    "stateful_client_fn",
    "weighted_metrics_average",
]
