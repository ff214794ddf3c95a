"""A Flower strategy that averages partial, named payloads layer by layer."""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Iterable, Mapping
from typing import Any, cast

import jax
import numpy as np
from flax import nnx
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg

from jaxlayerx._host import to_numpy
from jaxlayerx._results import is_example_count
from jaxlayerx.aggregation import FedAvgDynamicLayer, cast_mean
from jaxlayerx.flower.metrics import weighted_metrics_average
from jaxlayerx.flower.payloads import checked_payload
from jaxlayerx.packing import pack_layers, payload_nbytes
from jaxlayerx.tree import DEFAULT_NNX_FILTER, flatten

logger = logging.getLogger("jaxlayerx.flower")

#: The config key telling clients the round (fl4health's name for it).
ROUND_KEY = "current_server_round"


@dataclasses.dataclass(frozen=True)
class ClientRecord:
    """One client's accepted payload in one round.

    Attributes:
      client: the Flower client id (``ClientProxy.cid``).
      num_examples: the example count the client reported.
      layers: the names of the layers it sent, in its order.
      payload_bytes: bytes of array data, names array included (:func:`payload_nbytes`).
      wire_bytes: bytes of the serialized tensors as Flower carried them.
      metrics: the metrics the client reported.
    """

    client: str
    num_examples: int
    layers: tuple[str, ...]
    payload_bytes: int
    wire_bytes: int
    metrics: Mapping[str, Scalar]


@dataclasses.dataclass(frozen=True)
class RoundRecord:
    """What the strategy did with one round of fit results.

    Attributes:
      server_round: the round.
      accepted: the payloads that were averaged (or, with failures refused, would have been).
      rejected: ``(client id, reason)`` for each payload that failed validation.
      failures: clients that raised, timed out or disconnected.
      aggregated_layers: the layers whose global value changed, sorted.
      applied: whether the global model was updated this round.
    """

    server_round: int
    accepted: tuple[ClientRecord, ...]
    rejected: tuple[tuple[str, str], ...]
    failures: int
    aggregated_layers: tuple[str, ...]
    applied: bool


class FedAvgDynamicLayerStrategy(FedAvg):
    """Flower ``FedAvg`` for partial exchange: each layer averaged over the clients that sent it.

    Clients send packed payloads (their layers followed by a names array, fl4health's
    layout: :func:`jaxlayerx.pack_layers`). The strategy keeps the full global model: a
    layer that no client sent this round keeps its previous global value. Each client
    receives, packed with names, the layers that changed since the last model it is known
    to hold (it answered the message that carried it): the first message a client gets
    holds every layer, and a client that skipped rounds or failed catches up exactly.

    Every payload is checked whole against the global model (known names, exact shapes,
    dtypes the layers accept by :mod:`jaxlayerx.dtypes`, finite values; ``|V2`` arrays from
    Flower's serialization of bfloat16 are reinterpreted) before any of it is used. A
    payload that fails is rejected with a logged reason naming the client, and counts as a
    failure: with ``accept_failures`` the round goes on with the others; without it the
    round changes nothing. Clients that sent a layer in different dtypes are averaged in
    their promoted dtype, and the average is cast to the global model's.

    Args:
      initial_model: the starting global model: any model :func:`jaxlayerx.flatten`
        takes, or a flat ``name -> array`` mapping.
      weighted_aggregation: weight clients by their example counts (else uniformly).
      allow_nonfinite: accept NaN and infinite client values (fl4health's behaviour)
        instead of rejecting the payload.
      nnx_filter: which NNX variables of an ``nnx.Module`` form the model.
      **fedavg_options: ``FedAvg``'s options (``fraction_fit``, ``min_fit_clients``,
        ``min_available_clients``, ``accept_failures``, ``on_fit_config_fn``,
        ``evaluate_fn``, ``fit_metrics_aggregation_fn``...). ``initial_parameters`` is
        not one: it comes from ``initial_model``. Client metrics are aggregated with
        :func:`weighted_metrics_average` unless an aggregation function is given.

    Attributes:
      global_layers: the global model, ``name -> numpy array`` in flatten order.
      history: one :class:`RoundRecord` per aggregated round.
    """

    def __init__(
        self,
        initial_model: Any,
        *,
        weighted_aggregation: bool = True,
        allow_nonfinite: bool = False,
        nnx_filter: nnx.filterlib.Filter = DEFAULT_NNX_FILTER,
        **fedavg_options: Any,
    ) -> None:
        if "initial_parameters" in fedavg_options:
            raise TypeError("initial_parameters is taken from initial_model; do not pass both")
        fedavg_options.setdefault("fit_metrics_aggregation_fn", weighted_metrics_average)
        fedavg_options.setdefault("evaluate_metrics_aggregation_fn", weighted_metrics_average)
        super().__init__(**fedavg_options)
        self.weighted_aggregation = bool(weighted_aggregation)
        self.allow_nonfinite = bool(allow_nonfinite)
        self.global_layers = _global_copy(initial_model, nnx_filter)
        self.history: list[RoundRecord] = []
        self._updated_in: dict[str, int] = dict.fromkeys(self.global_layers, 0)
        self._version = 0
        self._client_versions: dict[str, int] = {}  # the global version each client holds
        self._in_flight: dict[str, int] = {}  # the version sent to each client, not yet confirmed
        self._payload_cache: dict[tuple[int, int | None], Parameters] = {}
        self.initial_parameters = ndarrays_to_parameters(self.global_payload())

    def __repr__(self) -> str:
        return (
            f"FedAvgDynamicLayerStrategy(layers={len(self.global_layers)}, "
            f"weighted_aggregation={self.weighted_aggregation}, accept_failures={self.accept_failures})"
        )

    def global_payload(self, since: int | None = None) -> list[np.ndarray]:
        """The global layers updated after round ``since`` (all when ``None``), packed with names."""
        names = [name for name in self.global_layers if since is None or self._updated_in[name] > since]
        return pack_layers([self.global_layers[name] for name in names], names)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """FedAvg's sampling and config; each client gets the layers it has not seen yet."""
        return self._served(super().configure_fit(server_round, parameters, client_manager), FitIns, server_round)

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """FedAvg's sampling and config; each client gets the layers it has not seen yet."""
        instructions = super().configure_evaluate(server_round, parameters, client_manager)
        return self._served(instructions, EvaluateIns, server_round)

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Validates every payload, then averages each layer over the clients that sent it.

        Returns:
          The averaged layers packed with names (``None`` when nothing was applied) and
          the aggregated client metrics with the strategy's own counts.
        """
        accepted: list[tuple[ClientRecord, collections.OrderedDict[str, Any]]] = []
        rejected: list[tuple[str, str]] = []
        for client, fit_res in results:
            try:
                accepted.append(self._check_result(client.cid, fit_res))
            except (ValueError, TypeError, KeyError) as error:
                reason = str(error)
                rejected.append((client.cid, reason))
                logger.warning("round %d: rejected the payload of client %s: %s", server_round, client.cid, reason)
        self._confirm_delivery(client for client, _ in results)
        for failure in failures:
            logger.warning("round %d: client failure: %s", server_round, _describe(failure))
        refuse = bool(failures or rejected) and not self.accept_failures
        if refuse:
            logger.warning(
                "round %d: %d failure(s) and %d rejected payload(s) with accept_failures=False: "
                "the global model is unchanged",
                server_round,
                len(failures),
                len(rejected),
            )
        averages = {} if refuse or not accepted else self._average(accepted)
        self._apply(averages, server_round)
        if averages:
            self._version = server_round
            self._payload_cache.clear()
        records = tuple(record for record, _ in accepted)
        applied = not refuse and bool(accepted)
        self.history.append(
            RoundRecord(server_round, records, tuple(rejected), len(failures), tuple(averages), applied)
        )
        metrics = self._fit_metrics(records, rejected, averages)
        if not applied:
            return None, metrics
        logger.info(
            "round %d: averaged %d layer(s) from %d client(s), %d payload bytes received",
            server_round,
            len(averages),
            len(records),
            metrics["payload_bytes_received"],
        )
        return ndarrays_to_parameters(self._update_payload(averages)), metrics

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """FedAvg's loss and metrics aggregation (clients that answered hold the model they were sent)."""
        self._confirm_delivery(client for client, _ in results)
        return super().aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        """Calls ``evaluate_fn(server_round, full global model arrays in flatten order, {})``."""
        if self.evaluate_fn is None:
            return None
        arrays = [array.copy() for array in self.global_layers.values()]
        return self.evaluate_fn(server_round, arrays, {})

    def _check_result(self, client: str, fit_res: FitRes) -> tuple[ClientRecord, collections.OrderedDict[str, Any]]:
        """One client's result checked whole against the global model: its record and layers.

        Raises:
          ValueError, TypeError, KeyError: the result is rejected (the message says why).
        """
        num_examples = fit_res.num_examples
        if not is_example_count(num_examples):
            raise ValueError(f"num_examples must be an integer >= 0, got {num_examples!r}")
        try:
            payload = parameters_to_ndarrays(fit_res.parameters)
        except Exception as error:  # noqa: BLE001 - np.load raises many types on bad bytes
            raise ValueError(f"the payload does not deserialize: {type(error).__name__}: {error}") from error
        layers = self._checked_layers(payload)
        record = ClientRecord(
            client=client,
            num_examples=int(num_examples),
            layers=tuple(layers),
            payload_bytes=payload_nbytes(payload),
            wire_bytes=sum(len(tensor) for tensor in fit_res.parameters.tensors),
            metrics=dict(fit_res.metrics),
        )
        return record, layers

    def _checked_layers(self, payload: list[np.ndarray]) -> collections.OrderedDict[str, Any]:
        """A deserialized payload's layers, checked whole against the global model."""
        return checked_payload(payload, self.global_layers, allow_nonfinite=self.allow_nonfinite)

    def _apply(self, averages: Mapping[str, Any], server_round: int) -> None:
        """Writes a round's averages (from :meth:`_average`) into the global model."""
        for name, average in averages.items():
            self.global_layers[name] = average
            self._updated_in[name] = server_round

    def _update_payload(self, averages: Mapping[str, Any]) -> list[np.ndarray]:
        """A round's averages as the payload ``aggregate_fit`` returns to Flower."""
        return pack_layers(list(averages.values()), list(averages))

    def _average(self, accepted: list[tuple[ClientRecord, collections.OrderedDict[str, Any]]]) -> dict[str, Any]:
        contributions = [
            (layers, record.num_examples)
            for record, layers in accepted
            if record.num_examples > 0 or not self.weighted_aggregation
        ]
        # Checked already (finite unless allowed); averaged in the senders' promoted dtype,
        # then cast once to the global model's.
        averages = FedAvgDynamicLayer(self.weighted_aggregation, allow_nonfinite=True).aggregate_layers(contributions)
        return {name: cast_mean(average, self.global_layers[name].dtype, np) for name, average in averages.items()}

    def _served(self, instructions: list[tuple[ClientProxy, Any]], make_ins: Any, server_round: int) -> list[Any]:
        """FedAvg's instructions with each client's own payload and the round in the config."""
        return [
            (client, make_ins(self._parameters_for(client.cid), _with_round(ins.config, server_round)))
            for client, ins in instructions
        ]

    def _parameters_for(self, client: str) -> Parameters:
        """The layers updated since the last model ``client`` is known to hold, packed."""
        since = self._client_versions.get(client)
        key = (self._version, since)
        if key not in self._payload_cache:
            self._payload_cache[key] = ndarrays_to_parameters(self.global_payload(since))
        self._in_flight[client] = self._version
        return self._payload_cache[key]

    def _confirm_delivery(self, clients: Iterable[ClientProxy]) -> None:
        """Clients that answered applied what they were sent (a client applies before it works).

        A client that failed or never answered is not confirmed, so its next payload
        again holds everything since the last model it is known to hold.
        """
        for client in clients:
            if client.cid in self._in_flight:
                self._client_versions[client.cid] = self._in_flight.pop(client.cid)

    def _fit_metrics(
        self, records: tuple[ClientRecord, ...], rejected: list[tuple[str, str]], averages: Mapping[str, Any]
    ) -> dict[str, Scalar]:
        metrics: dict[str, Scalar] = {}
        if records and self.fit_metrics_aggregation_fn is not None:
            metrics.update(self.fit_metrics_aggregation_fn([(r.num_examples, dict(r.metrics)) for r in records]))
        metrics.update(
            clients_accepted=len(records),
            clients_rejected=len(rejected),
            layers_aggregated=len(averages),
            payload_bytes_received=sum(record.payload_bytes for record in records),
        )
        return metrics


def _global_copy(model: Any, nnx_filter: nnx.filterlib.Filter) -> collections.OrderedDict[str, np.ndarray]:
    if _is_flat_view(model):
        layers = collections.OrderedDict(model)
    else:
        layers = flatten(model, nnx_filter=nnx_filter)
    return collections.OrderedDict(
        (name, np.array(array, copy=True)) for name, array in zip(layers, to_numpy(layers.values()))
    )


def _is_flat_view(model: Any) -> bool:
    """Whether ``model`` is already a ``name -> array`` mapping (as :func:`flatten` returns)."""
    return (
        isinstance(model, Mapping)
        and not isinstance(model, nnx.State)
        and all(
            isinstance(value, (np.ndarray, np.generic, jax.Array))
            for value in cast("Mapping[Any, Any]", model).values()
        )
    )


def _with_round(config: Mapping[str, Scalar], server_round: int) -> dict[str, Scalar]:
    return {ROUND_KEY: server_round, **config}


def _describe(failure: tuple[ClientProxy, FitRes] | BaseException) -> str:
    if isinstance(failure, BaseException):
        return f"{type(failure).__name__}: {failure}"
    client, fit_res = failure
    return f"client {client.cid}: {fit_res.status.message}"
