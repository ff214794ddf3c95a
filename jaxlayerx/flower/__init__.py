"""Flower adapters: jaxlayerx exchangers in real, multi-process federations.

Both routes are thin shells over the framework-free protocol core
(:mod:`jaxlayerx.protocol`) and the codecs of :mod:`jaxlayerx.wire`, so they serve,
validate, average and count bytes alike.

The Message API (Flower 1.21 and later; these modules import only from ``flwr.app``,
``flwr.clientapp`` and ``flwr.serverapp``):

* :class:`FedAvgLayers` and :class:`FedAvgSparse` (:mod:`jaxlayerx.flower.serverapp`): the
  layer and sparse exchange strategies of a ``ServerApp``;
* :func:`exchanger_client_app` (:mod:`jaxlayerx.flower.clientapp`): a ``ClientApp`` around a
  model, a local train function and any jaxlayerx exchanger, its state kept in
  ``context.state`` between messages;
* :mod:`jaxlayerx.flower.records`: payloads and models as Flower records.

The legacy route (``NumPyClient`` and ``flwr.server.strategy``, :mod:`jaxlayerx.flower.legacy`),
for interoperating with fl4health's servers and clients in fl4health's layouts:

* :class:`ExchangerClient`: a Flower ``NumPyClient`` around a Flax model, a local train
  function and any exchanger; :func:`stateful_client_fn` and :func:`client_app` build
  Flower's ``client_fn``/``ClientApp`` from it, keeping the model between messages;
* :class:`FedAvgDynamicLayerStrategy` and :class:`FedAvgSparseCooTensorStrategy`: Flower
  ``FedAvg`` strategies averaging layers, or weights, over the clients that sent them.

Every name loads its module on first use, so importing ``jaxlayerx.flower`` loads none of
Flower's deprecated import paths.

Needs the ``flower`` extra: ``pip install 'jaxlayerx[flower]'``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

try:
    import flwr as flwr  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised without the extra
    raise ImportError("jaxlayerx.flower needs Flower; install it with: pip install 'jaxlayerx[flower]'") from error

from jaxlayerx.flower.metrics import weighted_metrics_average

if TYPE_CHECKING:
    from jaxlayerx.flower.clientapp import exchanger_client_app
    from jaxlayerx.flower.history import NodeReply, RoundRecord
    from jaxlayerx.flower.legacy.client import ExchangerClient, client_app, stateful_client_fn
    from jaxlayerx.flower.legacy.strategy import FedAvgDynamicLayerStrategy, FedAvgSparseCooTensorStrategy
    from jaxlayerx.flower.serverapp import ExchangeStrategy, FedAvgLayers, FedAvgSparse

#: Public name -> the module that defines it, imported on first access.
_LAZY = {
    "ExchangeStrategy": "jaxlayerx.flower.serverapp",
    "FedAvgLayers": "jaxlayerx.flower.serverapp",
    "FedAvgSparse": "jaxlayerx.flower.serverapp",
    "exchanger_client_app": "jaxlayerx.flower.clientapp",
    "NodeReply": "jaxlayerx.flower.history",
    "RoundRecord": "jaxlayerx.flower.history",
    "ExchangerClient": "jaxlayerx.flower.legacy.client",
    "client_app": "jaxlayerx.flower.legacy.client",
    "stateful_client_fn": "jaxlayerx.flower.legacy.client",
    "FedAvgDynamicLayerStrategy": "jaxlayerx.flower.legacy.strategy",
    "FedAvgSparseCooTensorStrategy": "jaxlayerx.flower.legacy.strategy",
}

__all__ = [
    # the Message API
    "FedAvgLayers",
    "FedAvgSparse",
    "ExchangeStrategy",
    "exchanger_client_app",
    "RoundRecord",
    "NodeReply",
    "weighted_metrics_average",
    # the legacy route
    "ExchangerClient",
    "FedAvgDynamicLayerStrategy",
    "FedAvgSparseCooTensorStrategy",
    "client_app",
    "stateful_client_fn",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
