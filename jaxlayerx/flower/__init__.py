"""Flower adapters: jaxlayerx exchangers in real, multi-process federations.

The Message API (Flower 1.21 and later; these modules import only from ``flwr.app``,
``flwr.clientapp`` and ``flwr.serverapp``):

* :func:`jaxlayerx.flower.clientapp.exchanger_client_app`: a ``ClientApp`` around a
  model, a local train function and any jaxlayerx exchanger, its state kept in
  ``context.state`` between messages;
* :mod:`jaxlayerx.flower.serverapp`: the partial and sparse exchange strategies;
* :mod:`jaxlayerx.flower.records`: flat ``name -> array`` views as Flower records.

The legacy route (``NumPyClient`` and ``flwr.server.strategy``), for interoperating with
fl4health's servers and clients:

* :class:`ExchangerClient`: a Flower ``NumPyClient`` around a Flax model, a local train
  function and any jaxlayerx exchanger, sparse ones included; :func:`stateful_client_fn`
  and :func:`client_app` build Flower's ``client_fn``/``ClientApp`` from it, keeping the
  model between messages.
* :class:`FedAvgDynamicLayerStrategy`: a Flower ``FedAvg`` that averages packed, named,
  partial payloads layer by layer and keeps the full global model.
* :class:`FedAvgSparseCooTensorStrategy`: the same for fl4health's sparse COO payloads,
  weight by weight.

The legacy modules are loaded on first use of one of their names, so importing
``jaxlayerx.flower`` (or its Message-API modules) loads none of Flower's deprecated
import paths.

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
from jaxlayerx.flower.payloads import checked_payload

if TYPE_CHECKING:
    from jaxlayerx.flower.client import ExchangerClient, client_app, stateful_client_fn
    from jaxlayerx.flower.clientapp import exchanger_client_app
    from jaxlayerx.flower.sparse_strategy import FedAvgSparseCooTensorStrategy
    from jaxlayerx.flower.strategy import ClientRecord, FedAvgDynamicLayerStrategy, RoundRecord

#: Public name -> the module that defines it, imported on first access.
_LAZY = {
    "ClientRecord": "jaxlayerx.flower.strategy",
    "ExchangerClient": "jaxlayerx.flower.client",
    "FedAvgDynamicLayerStrategy": "jaxlayerx.flower.strategy",
    "FedAvgSparseCooTensorStrategy": "jaxlayerx.flower.sparse_strategy",
    "RoundRecord": "jaxlayerx.flower.strategy",
    "client_app": "jaxlayerx.flower.client",
    "exchanger_client_app": "jaxlayerx.flower.clientapp",
    "stateful_client_fn": "jaxlayerx.flower.client",
}

__all__ = [
    "ClientRecord",
    "ExchangerClient",
    "FedAvgDynamicLayerStrategy",
    "FedAvgSparseCooTensorStrategy",
    "RoundRecord",
    "client_app",
    "checked_payload",
    "exchanger_client_app",
    "stateful_client_fn",
    "weighted_metrics_average",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
