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

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlayerx.aggregation import AVERAGE_OVER, compiled_masked_fedavg
from jaxlayerx.base import Exchanger, FlatView, check_exchanger
from jaxlayerx.errors import unknown_layer
from jaxlayerx.protocol import ledger
from jaxlayerx.protocol.accounting import LayerSpec, download_nbytes, upload_nbytes
from jaxlayerx.quantize import drift_reference, quantizable, quantized_push
from jaxlayerx.simulation.adapters import ModelAdapter
from jaxlayerx.simulation.data import ClientData
from jaxlayerx.simulation.exchange import ExchangerSpec
from jaxlayerx.simulation.models import MLP
from jaxlayerx.simulation.server import SERVER_OPTIMIZERS, init_server_state, server_optimizer, server_step
from jaxlayerx.tree import DEFAULT_NNX_FILTER, unflatten
from jaxlayerx.wire import MESSAGE_API, Wire

#: Local steps per round above this are refused (a typo, not a plan).
MAX_LOCAL_STEPS = 100_000

#: The local optimizers by name.
LOCAL_OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")


@dataclasses.dataclass(frozen=True)
class SimulationConfig:
    """How a federated run trains.

    Attributes:
      rounds: federated rounds.
      local_steps: local steps per client per round (a batch each, drawn with replacement
        from the client's own training data).
      local_epochs: if set, replaces ``local_steps`` by
        ``ceil(local_epochs * mean client training size / batch_size)`` (the same for every
        client: they train in one vmapped computation).
      batch_size: examples per local step.
      learning_rate: of the local optimizer; a fresh optimizer state each round.
      momentum: of ``sgd`` (0 for none); ``adam`` ignores it.
      local_optimizer: ``sgd`` or ``adam``.
      weighted: weight the server average by each client's number of training examples.
      seed: seeds the model initialisation, the client sampling and the batches.
      clients_per_round: clients sampled each round; ``None`` for all of them.
      chunk_size: clients trained at once inside a round; ``None`` for all sampled clients.
      server_optimizer: ``avg`` (FedAvg), ``sgd``, ``adam``, ``yogi`` or ``adagrad`` (FedOpt).
      server_lr: the server optimizer's learning rate; ``None`` for its default.
      average_over: ``senders`` (each layer, or weight, averaged over the clients that
        sent it) or ``participants`` (moved by the mean change over the round's clients, a
        client that did not send it counting as no change); see :func:`jaxlayerx.masked_fedavg`.
    """

    rounds: int = 20
    local_steps: int = 20
    local_epochs: float | None = None
    batch_size: int = 32
    learning_rate: float = 0.05
    momentum: float = 0.9
    local_optimizer: str = "sgd"
    weighted: bool = True
    seed: int = 0
    clients_per_round: int | None = None
    chunk_size: int | None = None
    server_optimizer: str = "avg"
    server_lr: float | None = None
    average_over: str = "senders"

    def __post_init__(self) -> None:
        for name in ("rounds", "local_steps", "batch_size"):
            _check_positive_int(name, getattr(self, name))
        for name in ("clients_per_round", "chunk_size"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        if self.local_steps > MAX_LOCAL_STEPS:
            raise ValueError(f"local-steps must be at most {MAX_LOCAL_STEPS}, got {self.local_steps}")
        if self.local_epochs is not None and not (math.isfinite(self.local_epochs) and self.local_epochs > 0):
            raise ValueError(f"local-epochs must be a finite number > 0, got {self.local_epochs}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning-rate must be a finite number > 0, got {self.learning_rate}")
        if not isinstance(cast(object, self.seed), int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.local_optimizer not in LOCAL_OPTIMIZERS:
            raise ValueError(
                f"unknown local optimizer {self.local_optimizer!r}; choose from {', '.join(LOCAL_OPTIMIZERS)}"
            )
        if self.server_optimizer not in SERVER_OPTIMIZERS:
            raise ValueError(
                f"unknown server optimizer {self.server_optimizer!r}; choose from {', '.join(SERVER_OPTIMIZERS)}"
            )
        if self.server_lr is not None and self.server_optimizer == "avg":
            raise ValueError("server-lr needs a server optimizer (sgd, adam, yogi or adagrad); avg takes the average")
        server_optimizer(self.server_optimizer, self.server_lr)  # checks the learning rate
        if self.average_over not in AVERAGE_OVER:
            raise ValueError(f"unknown average-over {self.average_over!r}; choose from {', '.join(AVERAGE_OVER)}")

    @property
    def optimizer(self) -> optax.GradientTransformation:
        """The local optimizer."""
        if self.local_optimizer == "adam":
            return optax.adam(self.learning_rate)
        return optax.sgd(self.learning_rate, momentum=self.momentum or None)


def _check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")


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
      server_state: the server optimizer's state, per layer (empty for ``avg``).
      round_index: the last round run (0 before the first).
    """

    global_layers: FlatView
    client_layers: FlatView
    references: FlatView
    residuals: FlatView
    updated_in: FlatView
    synced: jax.Array
    server_state: FlatView
    round_index: jax.Array

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


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RoundOutput:
    """Everything one round computed (device arrays); client-stacked values follow ``clients``.

    Attributes:
      state: the state after the round.
      clients: ``(clients_per_round,)`` the sampled clients, ascending.
      start_layers, trained_layers, send_masks: each sampled client's.
      metrics: global loss and accuracy, each sampled client's local accuracy, and the
        values each client sent and pulled per layer.
    """

    state: SimulationState
    clients: jax.Array
    start_layers: FlatView
    trained_layers: FlatView
    send_masks: FlatView
    metrics: dict[str, jax.Array]


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
        init_key, self._batch_key = jax.random.split(jax.random.key(config.seed))
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
        self.mask_shapes = _mask_shapes(exchanger, abstract)
        self.layer_specs = [
            LayerSpec(name, tuple(layer.shape), np.dtype(layer.dtype)) for name, layer in abstract.items()
        ]
        self.layer_sizes = np.array([math.prod(spec.shape) for spec in self.layer_specs], np.int64)
        self.entrywise = any(shape != () for shape in self.mask_shapes.values())
        self.optimizer = config.optimizer
        self.server_optimizer = server_optimizer(config.server_optimizer, config.server_lr)
        chunked = config.chunk_size is not None and config.chunk_size < self.clients_per_round
        self._client_sharding, self._replicated = (None, None) if chunked else _shardings(self.clients_per_round)
        self._arrays = tuple(jnp.asarray(a) for a in _client_arrays(data))
        self._clients = jax.jit(self._clients_fn)  # pyright: ignore[reportUnknownMemberType]
        self._finish = jax.jit(self._finish_fn)  # pyright: ignore[reportUnknownMemberType]
        self._init_state = jax.jit(self._init_state_fn)  # pyright: ignore[reportUnknownMemberType]

    def init_state(self) -> SimulationState:
        """Before round 1: every client holds the initial model and has never taken part."""
        return cast(SimulationState, self._init_state(self.initial_layers))

    def _init_state_fn(self, global_layers: FlatView) -> SimulationState:
        clients = self.data.num_clients
        client_layers = FlatView((n, jnp.broadcast_to(v, (clients, *v.shape))) for n, v in global_layers.items())
        references = client_layers if self.exchanger.error_feedback else FlatView()
        residuals = FlatView()
        if self.exchanger.error_feedback and self.exchanger.quantize is not None:
            residuals = FlatView((n, jnp.zeros((clients, *v.shape), jnp.float32)) for n, v in global_layers.items())
        updated_in = FlatView((n, jnp.zeros(shape, jnp.int32)) for n, shape in self.mask_shapes.items())
        return SimulationState(
            global_layers=global_layers,
            client_layers=client_layers,
            references=references,
            residuals=residuals,
            updated_in=updated_in,
            synced=jnp.full(clients, -1, jnp.int32),
            server_state=init_server_state(self.server_optimizer, global_layers),
            round_index=jnp.zeros((), jnp.int32),
        )

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
        x_train, y_train, n_train, *tests = self._arrays
        updates = cast(ClientUpdates, self._clients(state, index, clients, self._batch_key, x_train, y_train, n_train))
        averages, sent = cast(
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
        return cast(RoundOutput, self._finish(state, index, clients, updates, averages, sent, *tests))

    def round_keys(self, round_index: jax.Array, clients: jax.Array, batch_key: jax.Array) -> jax.Array:
        """The batch keys of the round's clients: client ``c`` of round ``r`` draws from
        ``split(fold_in(batch_key, r), num_clients)[c]``, whichever clients are sampled."""
        return jax.random.split(jax.random.fold_in(batch_key, round_index), self.data.num_clients)[clients]

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
            record = self._record(round_index, output)
            record["wall_seconds"] = time.perf_counter() - start
            if progress is not None:
                progress(round_index, record)
            yield record, output
            state = output.state

    # -- the jitted round ------------------------------------------------------------------

    def _clients_fn(
        self,
        state: SimulationState,
        round_index: jax.Array,
        clients: jax.Array,
        batch_key: jax.Array,
        x_train: jax.Array,
        y_train: jax.Array,
        n_train: jax.Array,
    ) -> ClientUpdates:
        """The sampled clients' round: what each pulls, trains and sends (one program)."""
        take = functools.partial(_take, clients)
        keys = self.round_keys(round_index, clients, batch_key)
        synced = state.synced[clients]
        pull_masks = FlatView(
            (name, ledger.changed_since(rounds[None], synced.reshape(-1, *(1,) * rounds.ndim)))
            for name, rounds in state.updated_in.items()
        )
        inputs = (
            pull_masks,
            take(state.client_layers),
            take(state.references),
            take(state.residuals),
            keys,
            *map(take, (x_train, y_train, n_train)),
        )
        starts, trained, masks, references, residuals, values = self._map_clients(
            functools.partial(self.client_update, state.global_layers), self._shard(inputs)
        )
        return ClientUpdates(
            starts=starts,
            trained=self._replicate(trained),
            masks=self._replicate(masks),
            values=self._replicate(values),
            references=references,
            residuals=residuals,
            counts=take(n_train).astype(jnp.float32),
            pull_counts=_counts(pull_masks),
            first_contact=synced == ledger.NOTHING,
        )

    def _finish_fn(
        self,
        state: SimulationState,
        round_index: jax.Array,
        clients: jax.Array,
        updates: ClientUpdates,
        averages: FlatView,
        sent: FlatView,
        x_test: jax.Array,
        y_test: jax.Array,
        n_test: jax.Array,
        x_global: jax.Array,
        y_global: jax.Array,
    ) -> RoundOutput:
        """The server's step after the average, the evaluation and the next state (one program)."""
        take = functools.partial(_take, clients)
        global_layers, server_state = server_step(
            self.server_optimizer, state.global_layers, averages, sent, state.server_state
        )
        trained = updates.trained
        personal = FlatView((n, jnp.where(sent[n], global_layers[n], trained[n])) for n in trained)
        global_loss, global_accuracy = self._evaluate(global_layers, x_global, y_global, jnp.asarray(len(y_global)))
        evaluated = self._map_clients(
            lambda args: self._evaluate(*args), (personal, *map(take, (x_test, y_test, n_test)))
        )
        new_state = SimulationState(
            global_layers=global_layers,
            client_layers=_put(state.client_layers, clients, trained),
            references=_put(state.references, clients, updates.references),
            residuals=_put(state.residuals, clients, updates.residuals),
            updated_in=FlatView(
                (n, ledger.mark_changed(rounds, sent[n], round_index, jnp)) for n, rounds in state.updated_in.items()
            ),
            synced=state.synced.at[clients].set(ledger.held_after_round(round_index)),  # pyright: ignore[reportArgumentType]
            server_state=server_state,
            round_index=round_index,
        )
        metrics = {
            "global_loss": global_loss,
            "global_accuracy": global_accuracy,
            "local_accuracy": evaluated[1],
            "send_counts": _counts(updates.masks),
            "pull_counts": updates.pull_counts,
            "first_contact": updates.first_contact,
        }
        return RoundOutput(new_state, clients, updates.starts, trained, updates.masks, metrics)

    def _map_clients(self, function: Callable[[Any], Any], inputs: Any) -> Any:
        """``function`` over the leading client axis of ``inputs``: one ``vmap``, or
        ``lax.map`` over chunks of ``chunk_size`` clients."""
        chunk = self.config.chunk_size
        if chunk is None or chunk >= self.clients_per_round:
            per_client: Callable[[Any], Any] = lambda args: function(args)
            return jax.vmap(per_client)(inputs)
        return jax.lax.map(function, inputs, batch_size=chunk)  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]

    def client_update(
        self, global_layers: FlatView, inputs: tuple[Any, ...]
    ) -> tuple[FlatView, FlatView, FlatView, FlatView, FlatView, FlatView]:
        """One client's round (pure): merge what it pulls, train, pick what to send.

        ``inputs`` is ``(pull_mask, own layers, reference, residual, key, x, y, n)``;
        ``reference`` holds the client's last pulled values (error feedback; else empty),
        ``residual`` its carried quantization error (error feedback with quantization; else
        empty). Returns the round's starting layers, the trained layers, the send mask, the
        updated reference and residual, and the values the server receives: the trained
        ones, or with quantization what the server rebuilds over its global values (which
        the client holds, having just pulled every change).
        """
        pull_mask, local, reference, residual, key, x, y, n = inputs
        exchanger = self.exchanger
        start = _merged(pull_mask, global_layers, local)
        if exchanger.error_feedback:
            reference = _merged(pull_mask, global_layers, reference)
        trained = self._train(start, key, x, y, n)
        if not exchanger.error_feedback:
            drift_from = start
        elif residual:
            drift_from = FlatView((name, drift_reference(reference[name], residual[name])) for name in reference)
        else:
            drift_from = reference
        mask = exchanger.send_mask(trained, drift_from)
        mask = FlatView((name, jnp.asarray(mask[name], bool)) for name in trained)
        values = trained
        if exchanger.quantize is not None:
            values, new_residual = FlatView(), FlatView()
            for name in trained:
                if not quantizable(trained[name].dtype):
                    values[name] = trained[name]  # integer and boolean layers travel as they are
                    if residual:
                        new_residual[name] = residual[name]
                    continue
                carried = residual[name] if residual else jnp.zeros((), jnp.float32)
                _, _, values[name], new_residual[name] = quantized_push(
                    trained[name], global_layers[name], carried, mask[name], exchanger.quantize
                )
            residual = new_residual if residual else residual
        return start, trained, mask, reference, residual, values

    def _train(self, start: FlatView, key: jax.Array, x: jax.Array, y: jax.Array, n: jax.Array) -> FlatView:
        params = FlatView((name, start[name]) for name in self.model.trainable)
        carry = (params, start, self.optimizer.init(params))
        # Every step's batch indices drawn before the loop in one vectorized draw (the same
        # batches as local_step draws step by step); each step gathers its own batch, so that
        # memory does not grow with the steps.
        draw: Callable[[jax.Array], jax.Array] = lambda step_key: self._batch_index(step_key, n)
        indices = jax.vmap(draw)(jax.random.split(key, self.local_steps))
        step: Callable[[tuple[Any, Any, Any], jax.Array], tuple[tuple[Any, Any, Any], None]]
        step = lambda carry, index: (self._update(carry, x[index], y[index]), None)  # noqa: E731
        (params, layers, _), _ = jax.lax.scan(step, carry, indices)
        return FlatView((name, params[name] if name in params else value) for name, value in layers.items())

    def _batch_index(self, key: jax.Array, n: jax.Array) -> jax.Array:
        """The example indices of one local step's batch, drawn from ``[0, n)``."""
        return jax.random.randint(key, (self.config.batch_size,), 0, n)

    def local_step(
        self, carry: tuple[Any, Any, Any], key: jax.Array, x: jax.Array, y: jax.Array, n: jax.Array
    ) -> tuple[Any, Any, Any]:
        """One local step (pure): a batch drawn from the client's ``n`` examples, one update.

        ``carry`` is ``(trainable layers, all layers, optimizer state)``; the untrainable
        layers (BatchNorm statistics) move as the forward pass moves them.
        """
        index = self._batch_index(key, n)
        return self._update(carry, x[index], y[index])

    def _update(self, carry: tuple[Any, Any, Any], xb: jax.Array, yb: jax.Array) -> tuple[Any, Any, Any]:
        """One optimizer step on the batch ``(xb, yb)``."""
        params, layers, opt_state = carry

        def loss_fn(params: FlatView) -> tuple[jax.Array, FlatView]:
            logits, moved = self.model.apply(_with(layers, params), xb, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), moved

        (_, moved), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)  # pyright: ignore[reportUnknownMemberType]
        updates, opt_state = self.optimizer.update(grads, opt_state, params)
        params = cast(FlatView, optax.apply_updates(params, updates))
        return params, _with(moved, params), opt_state

    def _evaluate(self, layers: FlatView, x: jax.Array, y: jax.Array, n: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits, _ = self.model.apply(layers, x, train=False)
        valid = jnp.arange(y.shape[0]) < n
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        correct = jnp.argmax(logits, axis=-1) == y
        count = jnp.maximum(n, 1).astype(jnp.float32)
        return jnp.sum(jnp.where(valid, losses, 0.0)) / count, jnp.sum(valid & correct) / count

    # -- host side -------------------------------------------------------------------------

    def _record(self, round_index: int, output: RoundOutput) -> dict[str, Any]:
        """The round's metrics: accuracies, and the exact bytes of every message."""
        metrics, clients = jax.device_get((output.metrics, output.clients))  # one fetch a round
        clients = np.asarray(clients)
        upload, download = self.message_bytes(metrics)
        sent_entries = self.entry_counts(np.asarray(metrics["send_counts"]))
        has_test = self.data.n_test[clients] > 0
        local = [float(a) if tested else None for a, tested in zip(metrics["local_accuracy"], has_test)]
        return {
            "round": round_index,
            "clients": clients.tolist(),
            "global_accuracy": float(metrics["global_accuracy"]),
            "global_loss": float(metrics["global_loss"]),
            "local_accuracy_mean": float(np.mean([a for a in local if a is not None]))
            if any(has_test)
            else float("nan"),
            "local_accuracy": local,
            "upload_bytes": int(sum(upload)),
            "download_bytes": int(sum(download)),
            "client_upload_bytes": upload,
            "client_download_bytes": download,
            "layers_sent": [int(np.count_nonzero(row)) for row in sent_entries],
        }

    def message_bytes(self, metrics: Mapping[str, Any], wire: Wire | None = None) -> tuple[list[int], list[int]]:
        """``(upload, download)``: the bytes of each sampled client's reply and of the message
        it was sent, in a round's ``metrics`` (:attr:`RoundOutput.metrics`), on ``wire``
        (default: the simulation's), through the codecs the Flower routes encode with."""
        wire = self.wire if wire is None else wire
        sent_entries = self.entry_counts(np.asarray(metrics["send_counts"]))
        pulled_entries = self.entry_counts(np.asarray(metrics["pull_counts"]))
        quantize = self.exchanger.quantize
        upload = [
            upload_nbytes(wire, self.layer_specs, row, sparse=self.entrywise, quantize=quantize) for row in sent_entries
        ]
        download = [
            download_nbytes(wire, self.layer_specs, row, sparse=self.entrywise, whole_model=bool(first))
            for row, first in zip(pulled_entries, np.asarray(metrics["first_contact"]).tolist())
        ]
        return upload, download

    def entry_counts(self, counts: np.ndarray) -> np.ndarray:
        """``(clients, layers)`` entries from a round's send or pull counts, a layer-wise
        mask's flag (0 or 1) read as none or every entry of its layer."""
        scalar = np.array([shape == () for shape in self.mask_shapes.values()])
        return np.where(scalar, np.asarray(counts, np.int64) * self.layer_sizes, counts).astype(np.int64)

    def _variables_like_module(self) -> Any:
        """The initial model in the module's own form: Linen variables, or the NNX module."""
        if isinstance(self.module, nnx.Module):
            return self.module
        return unflatten(self.initial_layers, like=self.model.template)

    @property
    def personalized(self) -> bool:
        """Whether some layers never leave the clients (a positional exchanger that does not
        send every layer, as FedBN): the global model is then not meant to be used alone."""
        if self.exchanger.payload_kind != "positional":
            return False
        masks = self.exchanger.send_mask(self.initial_layers, self.initial_layers)
        return not all(bool(np.all(mask)) for mask in masks.values())

    def _shard(self, tree: Any) -> Any:
        if self._client_sharding is None:
            return tree
        return jax.lax.with_sharding_constraint(tree, self._client_sharding)  # pyright: ignore[reportUnknownMemberType]

    def _replicate(self, tree: Any) -> Any:
        if self._replicated is None:
            return tree
        return jax.lax.with_sharding_constraint(tree, self._replicated)  # pyright: ignore[reportUnknownMemberType]


def _take(clients: jax.Array, tree: Any) -> Any:
    take: Callable[[Any], Any] = lambda value: value[clients]
    return jax.tree.map(take, tree)


def _put(stacked: FlatView, clients: jax.Array, values: FlatView) -> FlatView:
    return FlatView((name, stacked[name].at[clients].set(values[name])) for name in stacked)


def _with(layers: FlatView, replacements: Mapping[str, Any]) -> FlatView:
    return FlatView((name, replacements[name] if name in replacements else value) for name, value in layers.items())


def _counts(masks: FlatView) -> jax.Array:
    """``(clients, layers)``: how many values of each layer each client's mask marks."""
    return jnp.stack([mask.reshape(mask.shape[0], -1).sum(axis=1) for mask in masks.values()], axis=1)


def _merged(pull_mask: FlatView, pulled: FlatView, own: FlatView) -> FlatView:
    """``pulled`` where the mask is set (per layer or per weight), else ``own``."""
    return FlatView((name, jnp.where(pull_mask[name], pulled[name], own[name])) for name in own)


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


def _mask_shapes(exchanger: Exchanger, layers: FlatView) -> FlatView:
    """The shape of each layer's send mask: ``()`` or the layer's shape, checked once.

    Raises:
      KeyError: the mask misses a layer or names an unknown one.
      TypeError, ValueError: a mask that is not boolean, or of another shape.
    """
    what = type(exchanger).__name__
    masks = jax.eval_shape(exchanger.send_mask, layers, layers)  # pyright: ignore[reportUnknownMemberType]
    if not isinstance(masks, Mapping):
        raise TypeError(f"{what}.send_mask must return a name -> bool mapping, got {type(masks).__name__}")
    masks = cast("Mapping[str, jax.ShapeDtypeStruct]", masks)
    for name in masks:
        if name not in layers:
            raise unknown_layer(name, layers, what=f"the model ({what}.send_mask names it)")
    shapes = FlatView()
    for name, layer in layers.items():
        if name not in masks:
            raise unknown_layer(name, masks, what=f"the send mask of {what}")
        mask = masks[name]
        if mask.dtype != jnp.bool_:
            raise TypeError(f"{what}.send_mask: layer {name!r} has a mask of dtype {mask.dtype}, expected bool")
        if mask.shape not in ((), tuple(layer.shape)):
            raise ValueError(
                f"{what}.send_mask: layer {name!r} has a mask of shape {mask.shape}; expected () (the "
                f"whole layer) or the layer's shape {tuple(layer.shape)} (weight by weight)"
            )
        shapes[name] = mask.shape
    return shapes


def local_steps_for(config: SimulationConfig, data: ClientData) -> int:
    """``config.local_steps``, or the steps that make ``config.local_epochs`` epochs."""
    if config.local_epochs is None:
        return config.local_steps
    steps = max(1, math.ceil(config.local_epochs * float(np.mean(data.n_train)) / config.batch_size))
    if steps > MAX_LOCAL_STEPS:
        raise ValueError(f"local-epochs {config.local_epochs} means {steps} local steps, more than {MAX_LOCAL_STEPS}")
    return steps


def _shardings(num_clients: int) -> tuple[NamedSharding | None, NamedSharding | None]:
    """Client-axis and replicated shardings over as many devices as divide ``num_clients``."""
    devices = jax.devices()
    count = math.gcd(num_clients, len(devices))
    if count <= 1:
        return None, None
    mesh = Mesh(np.array(devices[:count]), ("clients",))
    return NamedSharding(mesh, PartitionSpec("clients")), NamedSharding(mesh, PartitionSpec())


def simulate(
    exchanger: ExchangerSpec | Exchanger,
    config: SimulationConfig,
    data: ClientData,
    module: nn.Module | nnx.Module | None = None,
    progress: Callable[[int, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Runs a federated simulation; returns one metrics dict per round."""
    return Simulation(exchanger, config, data, module).run(progress)
