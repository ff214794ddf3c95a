"""Legacy-route Flower strategies (``flwr.server.strategy``) for partial and sparse exchange,
speaking fl4health's layouts: thin shells over :class:`jaxlayerx.protocol.ExchangeServer`."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, ClassVar, cast

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
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg

from jaxlayerx.contributions import EXAMPLE_COUNT_RULE, is_example_count, shown_count
from jaxlayerx.flower.history import NodeReply, RoundRecord
from jaxlayerx.flower.metrics import weighted_metrics_average
from jaxlayerx.flower.records import BASE_ROUND_KEY, VERSION_KEY
from jaxlayerx.protocol import ExchangeServer, Reply, Update
from jaxlayerx.tree import DEFAULT_NNX_FILTER, as_flat_view
from jaxlayerx.wire import Wire
from jaxlayerx.wire.npy import read_npy
from jaxlayerx.wire.routes import SparseWire

logger = logging.getLogger("jaxlayerx.flower")

#: The config key telling clients the round (fl4health's name for it).
ROUND_KEY = "current_server_round"


class FedAvgDynamicLayerStrategy(FedAvg):
    """Flower ``FedAvg`` for partial exchange: each layer averaged over the clients that sent it.

    Clients send packed payloads (their layers followed by a names array, fl4health's
    layout: :func:`jaxlayerx.pack_layers`), or quantized ones in the compact layout. The
    strategy keeps the full global model: a layer that no client sent this round keeps its
    previous global value. Each client receives what changed since the global version it
    is known to hold (it answered the message that carried it): its first message is the
    whole model, unnamed in the global model's order (fl4health's initial parameters);
    later ones the changed layers packed with their names, with ``"jaxlayerx.base-round"``
    and ``"jaxlayerx.round"`` in the config. A client that failed or never answered is
    forgotten and gets the whole model next time (:mod:`jaxlayerx.protocol.ledger`).

    Every payload is checked whole against the global model (known names, exact shapes,
    dtypes the layers accept by :mod:`jaxlayerx.dtypes`, finite values; ``|V2`` arrays from
    Flower's serialization of bfloat16 are reinterpreted) before any of it is used. A
    payload that fails is rejected with a logged reason naming the client, and counts as a
    failure: with ``accept_failures`` the round goes on with the others; without it the
    round changes nothing. The averaging is the protocol core's, the simulation's masked
    average (:func:`jaxlayerx.masked_fedavg`), clients in ascending order of their ids.

    Args:
      initial_model: the starting global model: any model :func:`jaxlayerx.flatten`
        takes, or a flat ``name -> array`` mapping.
      weighted_aggregation: weight clients by their example counts (else uniformly).
      average_over: ``"senders"`` or ``"participants"`` (see :func:`jaxlayerx.masked_fedavg`).
      allow_nonfinite: accept NaN and infinite client values (fl4health's behaviour)
        instead of rejecting the payload.
      nnx_filter: which NNX variables of an ``nnx.Module`` form the model.
      **fedavg_options: ``FedAvg``'s options (``fraction_fit``, ``min_fit_clients``,
        ``min_available_clients``, ``accept_failures``, ``on_fit_config_fn``,
        ``evaluate_fn``, ``fit_metrics_aggregation_fn``...). ``initial_parameters`` is
        not one: it comes from ``initial_model``. Client metrics are aggregated with
        :func:`jaxlayerx.flower.weighted_metrics_average` unless a function is given.

    Attributes:
      server: the protocol core (global model, versions, what each client holds).
      history: one :class:`jaxlayerx.flower.history.RoundRecord` per aggregated round.
    """

    #: Whether versions and averages are per entry (sparse) rather than per layer.
    entrywise: ClassVar[bool] = False

    def __init__(
        self,
        initial_model: Any,
        *,
        weighted_aggregation: bool = True,
        average_over: str = "senders",
        allow_nonfinite: bool = False,
        nnx_filter: nnx.filterlib.Filter = DEFAULT_NNX_FILTER,
        sparse_wire: SparseWire = "coo",
        **fedavg_options: Any,
    ) -> None:
        if "initial_parameters" in fedavg_options:
            raise TypeError("initial_parameters is taken from initial_model; do not pass both")
        fedavg_options.setdefault("fit_metrics_aggregation_fn", weighted_metrics_average)
        fedavg_options.setdefault("evaluate_metrics_aggregation_fn", weighted_metrics_average)
        super().__init__(**fedavg_options)
        self.wire = Wire("ndarrays", sparse_wire)
        self.weighted_aggregation = bool(weighted_aggregation)
        self.allow_nonfinite = bool(allow_nonfinite)
        self.server = ExchangeServer(
            as_flat_view(initial_model, nnx_filter=nnx_filter),
            entrywise=self.entrywise,
            weighted=self.weighted_aggregation,
            average_over=average_over,
            allow_nonfinite=self.allow_nonfinite,
        )
        self.history: list[RoundRecord] = []
        self._cache: dict[int | None, Parameters] = {}  # per base version, for the current version
        self._asked: dict[str, set[str]] = {"fit": set(), "evaluate": set()}
        self._sent_bytes: dict[str, int] = {}  # bytes of the arrays each client was sent this round
        self.initial_parameters = self._encode(self.server.changed_since(None), whole_model=True)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(layers={len(self.global_layers)}, "
            f"weighted_aggregation={self.weighted_aggregation}, accept_failures={self.accept_failures})"
        )

    @property
    def global_layers(self) -> Mapping[str, np.ndarray]:
        """The global model, ``name -> numpy array`` in model order."""
        return self.server.global_layers

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """FedAvg's sampling and config; each client gets what it has not seen yet."""
        instructions = super().configure_fit(server_round, parameters, client_manager)
        return self._served(instructions, FitIns, server_round, "fit")

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """FedAvg's sampling and config; each client gets what it has not seen yet."""
        instructions = super().configure_evaluate(server_round, parameters, client_manager)
        return self._served(instructions, EvaluateIns, server_round, "evaluate")

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Validates every payload, then averages each layer (entry) over the clients that sent it.

        Returns:
          The full global model (unnamed, in model order; ``None`` when nothing was applied)
          and the aggregated client metrics with the strategy's own counts.
        """
        accepted: list[tuple[Reply, NodeReply, Mapping[str, Scalar]]] = []
        rejected: list[tuple[str, str]] = []
        for client, fit_res in results:
            self.server.confirm(client.cid)
            try:
                reply, record = self._check_result(client.cid, fit_res)
            except (ValueError, TypeError, KeyError) as error:
                reason = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
                rejected.append((client.cid, reason))
                logger.warning("round %d: rejected the payload of client %s: %s", server_round, client.cid, reason)
                continue
            accepted.append((reply, record, fit_res.metrics))
        failed = [_describe(failure) for failure in failures]
        for cid, reason in failed:
            logger.warning("round %d: client failure: %s", server_round, f"client {cid}: {reason}" if cid else reason)
        missing = self._forget_silent("fit", {client.cid for client, _ in results})
        refuse = bool(failures or rejected) and not self.accept_failures
        if refuse:
            logger.warning(
                "round %d: %d failure(s) and %d rejected payload(s) with accept_failures=False: "
                "the global model is unchanged",
                server_round,
                len(failures),
                len(rejected),
            )
        change = self.server.aggregate([] if refuse else [reply for reply, _, _ in accepted], server_round)
        self._cache.clear()
        records = tuple(record for _, record, _ in accepted)
        record = RoundRecord(
            server_round,
            records,
            tuple(rejected),
            tuple((cid or "?", reason) for cid, reason in failed),
            tuple(missing),
            change.changed,
            tuple(sorted(self._sent_bytes.items())),
        )
        self.history.append(record)
        metrics: dict[str, Scalar] = {}
        if records and self.fit_metrics_aggregation_fn is not None:
            metrics.update(self.fit_metrics_aggregation_fn([(r.num_examples, dict(m)) for _, r, m in accepted]))
        metrics.update(
            clients_accepted=len(records),
            clients_rejected=len(rejected),
            layers_aggregated=len(change.changed),
            payload_bytes_received=record.total_bytes_received,
            payload_bytes_sent=record.total_bytes_sent,
        )
        if not change.changed:
            return None, metrics
        logger.info(
            "round %d: averaged %d layer(s) from %d client(s), %d payload bytes received",
            server_round,
            len(change.changed),
            len(records),
            record.total_bytes_received,
        )
        return ndarrays_to_parameters([layer.copy() for layer in self.global_layers.values()]), metrics

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """FedAvg's loss and metrics aggregation (clients that answered hold the model they were sent)."""
        for client, _ in results:
            self.server.confirm(client.cid)
        self._forget_silent("evaluate", {client.cid for client, _ in results})
        return super().aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        """Calls ``evaluate_fn(server_round, full global model arrays in model order, {})``."""
        if self.evaluate_fn is None:
            return None
        arrays = [array.copy() for array in self.global_layers.values()]
        return self.evaluate_fn(server_round, arrays, {})

    def _check_result(self, client: str, fit_res: FitRes) -> tuple[Reply, NodeReply]:
        """One client's result checked whole against the global model.

        Raises:
          ValueError, TypeError, KeyError: the result is rejected (the message says why).
        """
        num_examples = fit_res.num_examples
        if not is_example_count(num_examples):
            raise ValueError(f"num_examples must be {EXAMPLE_COUNT_RULE}, got {shown_count(num_examples)}")
        try:
            arrays = [read_npy(tensor) for tensor in fit_res.parameters.tensors]
        except Exception as error:  # noqa: BLE001 - the npy reader raises many types on bad bytes
            raise ValueError(f"the parameters do not deserialize: {type(error).__name__}: {error}") from error
        payload = self.wire.decode(arrays, self.global_layers, allow_nonfinite=self.allow_nonfinite)
        reply = self.server.accept(client, int(num_examples), payload)
        received = sum(len(tensor) for tensor in fit_res.parameters.tensors)
        entries = sum(entries.sent for entries in payload.values())
        return reply, NodeReply(client, int(num_examples), tuple(payload), entries, received)

    def _served(
        self, instructions: list[tuple[ClientProxy, Any]], make_ins: Any, server_round: int, kind: str
    ) -> list[Any]:
        """FedAvg's instructions with each client's own payload, its versions and the round."""
        self._asked[kind] = set()
        if kind == "fit":
            self._sent_bytes = {}
        served: list[Any] = []
        for client, ins in instructions:
            update = self.server.serve(client.cid)
            parameters = self._parameters_for(update)
            config = {ROUND_KEY: server_round, **ins.config}
            config[BASE_ROUND_KEY] = -1 if update.base is None else update.base
            config[VERSION_KEY] = update.version
            served.append((client, make_ins(parameters, config)))
            self._asked[kind].add(client.cid)
            if kind == "fit":
                self._sent_bytes[client.cid] = sum(len(tensor) for tensor in parameters.tensors)
        return served

    def _parameters_for(self, update: Update) -> Parameters:
        if update.base not in self._cache:
            self._cache[update.base] = self._encode(update.payload, whole_model=update.whole_model)
        return self._cache[update.base]

    def _encode(self, payload: Any, *, whole_model: bool) -> Parameters:
        arrays = self.wire.encode(payload, sparse=self.entrywise, whole_model=whole_model)
        return ndarrays_to_parameters(cast(list[np.ndarray], arrays))

    def _forget_silent(self, kind: str, answered: set[str]) -> list[str]:
        """Forgets the clients asked this round that did not answer; returns them, sorted."""
        silent = sorted(self._asked[kind] - answered)
        for cid in silent:
            self.server.forget(cid)
        self._asked[kind] = set()
        return silent


class FedAvgSparseCooTensorStrategy(FedAvgDynamicLayerStrategy):
    """Flower ``FedAvg`` for sparse exchange: each weight averaged over the clients that sent it.

    Clients send fl4health's ``FedAvgSparseCooTensor`` payloads, ``values + indices +
    shapes + [names]`` (:func:`jaxlayerx.pack_coo`; what
    :class:`jaxlayerx.SparseCooParameterExchanger` pushes), or with ``sparse_wire="compact"``
    the compact layout (also for quantized uploads). A weight's mean is taken over the
    clients that sent that weight (fl4health counts the entries a client did not send as
    zeros). Every weight nobody sent keeps its value. A client's first message is the whole
    model, unnamed (fl4health's initial parameters); later ones hold exactly the weights
    that changed since the version it holds. Everything else is
    :class:`FedAvgDynamicLayerStrategy`'s.
    """

    entrywise = True


def _describe(failure: tuple[ClientProxy, FitRes] | BaseException) -> tuple[str | None, str]:
    if isinstance(failure, BaseException):
        return None, f"{type(failure).__name__}: {failure}"
    client, fit_res = failure
    return client.cid, fit_res.status.message
