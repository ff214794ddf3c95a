"""A federated run in which the clients of a round train at once, under ``jax.vmap``, in one jitted round.

One round ``r``:

1. ``clients_per_round`` of the ``num_clients`` clients are sampled (seeded, without
   replacement; all of them by default);
2. each starts from its own model with what the server changed since it last took part
   merged in: all layers on its first round; then the layers (the weights, for sparse
   exchangers) aggregated since, so that the others stay local as in FedBN and FedPer;
3. it trains ``local_steps`` steps of its local optimizer (or ``local_epochs``) on batches
   of its own data;
4. it picks what to send with the exchanger's pure ``send_mask`` (see
   :class:`jaxlayerx.Exchanger`): the same rule as its packed path, a boolean per layer or,
   for sparse exchangers, per weight. Drift is measured from the round's start, or with
   error feedback from the last values the client pulled, carried per client in the state;
5. the server averages each layer (each weight) over its senders
   (:func:`jaxlayerx.masked_fedavg`), and takes the average, or with a server optimizer a
   step along ``global - average`` (:mod:`jaxlayerx.simulation.server`); what nobody sent
   keeps its global value.

The sampled clients train in chunks of ``chunk_size`` (``lax.map`` over a ``vmap`` of each
chunk), so that a round's memory grows with the chunk, not with the federation: the
federation itself is only each client's stored layers and data.

The simulation knows exchangers only through that interface: any object satisfying
:class:`jaxlayerx.Exchanger` runs, and :class:`ExchangerSpec` names the built-in ones.
With several JAX devices, the clients of an unchunked round are sharded across them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlayerx.aggregation import compiled_masked_fedavg
from jaxlayerx.base import Exchanger, FlatView, check_exchanger
from jaxlayerx.protocol.accounting import LayerSpec
from jaxlayerx.simulation.accounting import ByteAccounting, round_record
from jaxlayerx.simulation.adapters import ModelAdapter
from jaxlayerx.simulation.config import SimulationConfig, local_steps_for
from jaxlayerx.simulation.data import ClientData
from jaxlayerx.simulation.exchange import ExchangerSpec
from jaxlayerx.simulation.models import MLP
from jaxlayerx.simulation.round import RoundProgram, send_mask_shapes
from jaxlayerx.simulation.server import server_optimizer
from jaxlayerx.simulation.state import ClientUpdates, RoundOutput, SimulationState
from jaxlayerx.tree import DEFAULT_NNX_FILTER, unflatten
from jaxlayerx.wire import MESSAGE_API, Wire

__all__ = ["ClientUpdates", "RoundOutput", "Simulation", "SimulationConfig", "SimulationState", "simulate"]


class Simulation:
    """A federated run of one exchanger over stacked client data.

    Args:
      exchanger: an :class:`ExchangerSpec` (built for ``module``), or any exchanger
        satisfying :class:`jaxlayerx.Exchanger` for the module's variables.
      config: training settings.
      data: per-client data (see :func:`jaxlayerx.simulation.make_client_data`).
      module: a Flax Linen module called as ``module(x, train=bool)``, or an ``nnx.Module``
        called as ``module(x)`` (see :mod:`jaxlayerx.simulation.adapters`); default :class:`MLP`.
      label: the run's name in tables and plots; default the spec's label, or the
        exchanger's class name.
      nnx_filter: for an ``nnx.Module``, which variables are layers (exchanged, and kept per
        client); the spec's exchanger is built with it. Default: all but RNG state.
      wire: the route whose bytes the records count (:class:`jaxlayerx.wire.Wire`): the
        Message API by default, or :data:`jaxlayerx.wire.LEGACY` (fl4health's layouts).

    Raises:
      TypeError, ValueError: the exchanger does not satisfy the interface, or its
        ``send_mask`` does not give one boolean (or one of the layer's shape) per layer;
        ``clients_per_round`` above the number of clients.
    """

    def __init__(
        self,
        exchanger: ExchangerSpec | Exchanger,
        config: SimulationConfig,
        data: ClientData,
        module: nn.Module | nnx.Module | None = None,
        *,
        label: str | None = None,
        nnx_filter: nnx.filterlib.Filter = DEFAULT_NNX_FILTER,
        wire: Wire = MESSAGE_API,
    ) -> None:
        self.config, self.data = config, data
        self.wire = wire
        self.clients_per_round = config.clients_per_round or data.num_clients
        if self.clients_per_round > data.num_clients:
            raise ValueError(
                f"clients-per-round ({self.clients_per_round}) is more than the {data.num_clients} clients"
            )
        self.module = module if module is not None else MLP(num_classes=int(np.max(data.y_train)) + 1)
        self.local_steps = local_steps_for(config, data)
        example = jnp.asarray(data.x_train[0, :1])
        init_key, self.batch_key = jax.random.split(jax.random.key(config.seed))
        self.model = ModelAdapter(self.module, example, init_key, nnx_filter)
        self.initial_layers = self.model.initial_layers
        self.initial_variables = self._variables_like_module()
        if isinstance(exchanger, ExchangerSpec):
            label = label or exchanger.label
            exchanger = exchanger.make_exchanger(self.module, self.initial_variables, example, nnx_filter=nnx_filter)
        check_exchanger(exchanger)
        self.exchanger = exchanger
        self.label = label or type(exchanger).__name__
        abstract: FlatView = jax.eval_shape(lambda: self.initial_layers)  # pyright: ignore[reportUnknownMemberType]
        self.layer_names = list(abstract)
        self.mask_shapes = send_mask_shapes(exchanger, abstract)
        layers = [LayerSpec(name, tuple(layer.shape), np.dtype(layer.dtype)) for name, layer in abstract.items()]
        self.accounting = ByteAccounting(layers, self.mask_shapes, exchanger.quantize, wire)
        self.entrywise = self.accounting.entrywise
        self.program = RoundProgram(
            exchanger,
            self.model,
            config,
            self.local_steps,
            self.mask_shapes,
            data.num_clients,
            self.clients_per_round,
            server_optimizer(config.server_optimizer, config.server_lr),
        )
        self.arrays = tuple(jnp.asarray(a) for a in _client_arrays(data))
        self._clients = jax.jit(self.program.clients)  # pyright: ignore[reportUnknownMemberType]
        self._finish = jax.jit(self.program.finish)  # pyright: ignore[reportUnknownMemberType]
        self._init_state = jax.jit(self.program.init_state)  # pyright: ignore[reportUnknownMemberType]

    # --- running ----------------------------------------------------------------------------

    def init_state(self) -> SimulationState:
        """Before round 1: every client holds the initial model and has never taken part."""
        return cast(SimulationState, self._init_state(self.initial_layers))

    def sample_clients(self, round_index: int) -> np.ndarray:
        """The clients of round ``round_index``, ascending: all of them, or
        ``clients_per_round`` drawn without replacement from ``default_rng([seed, 2, round])``."""
        if self.clients_per_round == self.data.num_clients:
            return np.arange(self.data.num_clients, dtype=np.int32)
        rng = np.random.default_rng([self.config.seed, 2, round_index])
        return np.sort(rng.choice(self.data.num_clients, self.clients_per_round, replace=False)).astype(np.int32)

    def round(self, state: SimulationState, round_index: int) -> RoundOutput:
        """Runs round ``round_index`` (from 1) from ``state``.

        Three compiled programs: the clients' updates, the server's masked average (the very
        program a Flower server runs, :func:`jaxlayerx.aggregation.compiled_masked_fedavg`,
        so that both average bit for bit alike), and the server step with the evaluation.
        """
        clients = self.sample_clients(round_index)
        index = np.int32(round_index)
        x_train, y_train, n_train, *tests = self.arrays
        updates = cast(ClientUpdates, self._clients(state, index, clients, self.batch_key, x_train, y_train, n_train))
        averages, sent = self._average(state, updates)
        return cast(RoundOutput, self._finish(state, index, clients, updates, averages, sent, *tests))

    def run(self, progress: Callable[[int, dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        """Runs every round; returns one metrics dict per round (see ``report.py``)."""
        return [record for record, _ in self.iterate(progress)]

    def iterate(
        self, progress: Callable[[int, dict[str, Any]], None] | None = None
    ) -> Iterator[tuple[dict[str, Any], RoundOutput]]:
        """Yields ``(metrics record, round output)`` round by round."""
        state = self.init_state()
        for round_index in range(1, self.config.rounds + 1):
            start = time.perf_counter()
            output = self.round(state, round_index)
            record = round_record(round_index, output, self.accounting, self.data.n_test)
            record["wall_seconds"] = time.perf_counter() - start
            if progress is not None:
                progress(round_index, record)
            yield record, output
            state = output.state

    def compiled_round(self, state: SimulationState | None = None, round_index: int = 1) -> dict[str, Any]:
        """The round's three programs, compiled for ``state`` and ``round_index`` (default: the
        first round): ``{"clients", "average", "finish"}`` -> ``jax.stages.Compiled``, for
        their ``memory_analysis()`` and ``cost_analysis()``. Runs nothing."""
        state = self.init_state() if state is None else state
        clients, index = self.sample_clients(round_index), np.int32(round_index)
        x_train, y_train, n_train, *tests = self.arrays
        client_args = (state, index, clients, self.batch_key, x_train, y_train, n_train)
        updates = jax.eval_shape(self._clients, *client_args)  # pyright: ignore[reportUnknownMemberType]
        average_args = (updates.values, updates.masks, updates.counts, state.global_layers)
        options = {"weighted": self.config.weighted, "over": self.config.average_over}

        def average(*args: Any) -> Any:
            return compiled_masked_fedavg(*args, **options)  # pyright: ignore[reportUnknownVariableType]

        averages, sent = jax.eval_shape(average, *average_args)  # pyright: ignore[reportUnknownMemberType]
        finish_args = (state, index, clients, updates, averages, sent, *tests)
        return {
            "clients": self._clients.lower(*client_args).compile(),  # pyright: ignore[reportUnknownMemberType]
            "average": compiled_masked_fedavg.lower(*average_args, **options).compile(),  # pyright: ignore[reportFunctionMemberAccess, reportUnknownMemberType]
            "finish": self._finish.lower(*finish_args).compile(),  # pyright: ignore[reportUnknownMemberType]
        }

    def _average(self, state: SimulationState, updates: ClientUpdates) -> tuple[FlatView, FlatView]:
        return cast(
            tuple[FlatView, FlatView],
            compiled_masked_fedavg(  # the program a Flower server runs
                updates.values,
                updates.masks,
                updates.counts,
                state.global_layers,
                weighted=self.config.weighted,
                over=self.config.average_over,
            ),
        )

    # --- the pieces, for benchmarks and your own loops -------------------------------------

    def client_update(
        self, global_layers: FlatView, inputs: tuple[Any, ...]
    ) -> tuple[FlatView, FlatView, FlatView, FlatView, FlatView, FlatView]:
        """One client's round (pure); see :meth:`RoundProgram.client_update`."""
        return self.program.client_update(global_layers, inputs)

    def local_step(
        self, carry: tuple[Any, Any, Any], key: jax.Array, x: jax.Array, y: jax.Array, n: jax.Array
    ) -> tuple[Any, Any, Any]:
        """One local step (pure); see :meth:`RoundProgram.local_step`."""
        return self.program.local_step(carry, key, x, y, n)

    def evaluate(self, layers: FlatView, x: jax.Array, y: jax.Array, n: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Mean loss and accuracy of ``layers`` on the first ``n`` examples (pure)."""
        return self.program.evaluate(layers, x, y, n)

    def round_keys(self, round_index: jax.Array, clients: jax.Array, batch_key: jax.Array) -> jax.Array:
        """The batch keys of the round's clients; see :meth:`RoundProgram.round_keys`."""
        return self.program.round_keys(round_index, clients, batch_key)

    def message_bytes(self, metrics: Mapping[str, Any], wire: Wire | None = None) -> tuple[list[int], list[int]]:
        """``(upload, download)`` bytes of each sampled client's messages in a round's
        ``metrics``, on ``wire`` (default: the simulation's); see :class:`ByteAccounting`."""
        return self.accounting.message_bytes(metrics, wire)

    @property
    def personalized(self) -> bool:
        """Whether some layers never leave the clients (a positional exchanger that does not
        send every layer, as FedBN): the global model is then not meant to be used alone."""
        if self.exchanger.payload_kind != "positional":
            return False
        masks = self.exchanger.send_mask(self.initial_layers, self.initial_layers)
        return not all(bool(np.all(mask)) for mask in masks.values())

    def _variables_like_module(self) -> Any:
        """The initial model in the module's own form: Linen variables, or the NNX module."""
        if isinstance(self.module, nnx.Module):
            return self.module
        return unflatten(self.initial_layers, like=self.model.template)


def _client_arrays(data: ClientData) -> tuple[np.ndarray, ...]:
    return (
        data.x_train,
        data.y_train,
        data.n_train,
        data.x_test,
        data.y_test,
        data.n_test,
        data.x_global_test,
        data.y_global_test,
    )


def simulate(
    exchanger: ExchangerSpec | Exchanger,
    config: SimulationConfig,
    data: ClientData,
    module: nn.Module | nnx.Module | None = None,
    progress: Callable[[int, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Runs a federated simulation; returns one metrics dict per round."""
    return Simulation(exchanger, config, data, module).run(progress)
