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
import optax
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
from jaxlayerx.simulation.round import RoundProgram, mask_argument, send_mask_shapes
from jaxlayerx.simulation.server import server_optimizer as named_server_optimizer
from jaxlayerx.simulation.state import ClientUpdates, RoundOutput, SimulationState
from jaxlayerx.simulation.task import (
    Batch,
    ClientUpdate,
    LocalData,
    LossFn,
    MetricsFn,
    Task,
    classification_loss,
    classification_metrics,
    features,
    local_training,
)
from jaxlayerx.tree import DEFAULT_NNX_FILTER, unflatten
from jaxlayerx.wire import MESSAGE_API, Wire

__all__ = ["ClientUpdates", "RoundOutput", "Simulation", "SimulationConfig", "SimulationState", "simulate"]


#: The default of a keyword that falls back to :class:`SimulationConfig`'s named setting.
_FROM_CONFIG: Any = object()


class Simulation:
    """A federated run of one exchanger over stacked client data.

    Args:
      exchanger: an :class:`ExchangerSpec` (built for ``module``), or any exchanger
        satisfying :class:`jaxlayerx.Exchanger` for the module's variables.
      config: training settings.
      data: per-client data (see :func:`jaxlayerx.simulation.make_client_data`).
      module: a Flax Linen module called as ``module(inputs, train=bool)``, or an
        ``nnx.Module`` called as ``module(inputs)`` (see :mod:`jaxlayerx.simulation.adapters`);
        default :class:`MLP`, for classification data.
      label: the run's name in tables and plots; default the spec's label, or the
        exchanger's class name.
      nnx_filter: for an ``nnx.Module``, which variables are layers (exchanged, and kept per
        client); the spec's exchanger is built with it. Default: all but RNG state.
      wire: the route whose bytes the records count (:class:`jaxlayerx.wire.Wire`): the
        Message API by default, or :data:`jaxlayerx.wire.LEGACY` (fl4health's layouts).
      loss_fn: ``loss_fn(output, batch)``, one loss per example (trailing axes averaged) or
        the batch's loss; default softmax cross-entropy against ``batch["y"]`` for data
        with integer labels, required otherwise.
      metrics_fn: ``metrics_fn(output, batch) -> {name: value}``, per example or per batch;
        default ``accuracy`` with integer labels (whatever the loss), none otherwise (the
        loss only).
      input_fn: the model's input from a batch; default ``batch["x"]``.
      client_optimizer: an ``optax.GradientTransformation``; default the config's
        ``local_optimizer`` and ``learning_rate``.
      server_optimizer: ``None`` for FedAvg, or an ``optax.GradientTransformation`` over the
        whole pseudo-gradient tree (:mod:`jaxlayerx.simulation.server`); default the
        config's ``server_optimizer`` and ``server_lr``.
      client_update: a pure function replacing the local training, run under ``vmap``
        (:mod:`jaxlayerx.simulation.task`); default
        :func:`~jaxlayerx.simulation.task.local_training`.
      keep_client_optimizer_state: carry each client's optimizer state to its next round
        (an optax schedule then goes on where it stopped); default fresh each round.
      fine_tune_steps: local steps each client takes from its personalized model before it
        is evaluated (the round's local metrics and :meth:`evaluate_clients`); default 0.

    Raises:
      TypeError, ValueError: the exchanger does not satisfy the interface, or its
        ``send_mask`` does not give one boolean (or one of the layer's shape) per layer;
        ``clients_per_round`` above the number of clients; a name where an optax
        transformation is expected, or the reverse; data without integer labels and no
        ``loss_fn``; data without ``x`` and no ``input_fn``.
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
        loss_fn: LossFn | None = None,
        metrics_fn: MetricsFn | None = None,
        input_fn: Callable[[Batch], Any] | None = None,
        client_optimizer: optax.GradientTransformation | None = None,
        server_optimizer: optax.GradientTransformation | None = _FROM_CONFIG,
        client_update: ClientUpdate | None = None,
        keep_client_optimizer_state: bool = False,
        fine_tune_steps: int = 0,
    ) -> None:
        self.config, self.data = config, data
        self.wire = wire
        self.clients_per_round = config.clients_per_round or data.num_clients
        if self.clients_per_round > data.num_clients:
            raise ValueError(
                f"clients-per-round ({self.clients_per_round}) is more than the {data.num_clients} clients"
            )
        if (
            not isinstance(cast(object, fine_tune_steps), int)
            or isinstance(fine_tune_steps, bool)
            or fine_tune_steps < 0
        ):
            raise ValueError(f"fine_tune_steps must be an integer >= 0, got {fine_tune_steps!r}")
        if input_fn is None:
            if "x" not in data.train:
                raise ValueError(
                    f"the data has no 'x' array (it has {sorted(data.train)}): pass input_fn=, a function "
                    "from a batch (name -> array) to the model's input"
                )
            input_fn = features
        if loss_fn is None:
            if not data.labels:
                raise ValueError(
                    "the data has no integer labels y (one per example), so there is no default loss: pass "
                    "loss_fn=, a function (output, batch) -> loss per example or for the batch"
                )
            loss_fn = classification_loss
        if metrics_fn is None:
            metrics_fn = classification_metrics if data.labels else _no_metrics
        if module is None:
            if not data.labels:
                raise ValueError("the default model (an MLP classifier) needs integer labels y: pass module=")
            module = MLP(num_classes=int(np.max(data.y_train)) + 1)
        self.module = module
        self.local_steps = local_steps_for(config, data)
        init_key, self.batch_key = jax.random.split(jax.random.key(config.seed))
        example = input_fn({name: jnp.asarray(array[0, :1]) for name, array in data.train.items()})
        self.model = ModelAdapter(self.module, example, init_key, nnx_filter)
        self.initial_layers = self.model.initial_layers
        self.initial_variables = self._variables_like_module()
        self.spec = exchanger if isinstance(exchanger, ExchangerSpec) else None
        #: What, beside the exchanger and the settings, decides the round program (compared by
        #: :func:`jaxlayerx.simulation.batch.run_together`).
        self.functions = (
            loss_fn,
            metrics_fn,
            input_fn,
            client_optimizer,
            server_optimizer,
            client_update,
            keep_client_optimizer_state,
            fine_tune_steps,
            nnx_filter,
        )
        if isinstance(exchanger, ExchangerSpec):
            label = label or exchanger.label
            exchanger = exchanger.make_exchanger(self.module, self.initial_variables, example, nnx_filter=nnx_filter)
        check_exchanger(exchanger)
        self.exchanger = exchanger
        self.label = label or type(exchanger).__name__
        abstract: FlatView = jax.eval_shape(lambda: self.initial_layers)  # pyright: ignore[reportUnknownMemberType]
        self.layer_names = list(abstract)
        self.mask_shapes = _mask_shapes(self.spec, exchanger, abstract)
        self.mask_argument = mask_argument(exchanger, abstract)
        layers = [LayerSpec(name, tuple(layer.shape), np.dtype(layer.dtype)) for name, layer in abstract.items()]
        self.accounting = ByteAccounting(layers, self.mask_shapes, exchanger.quantize, wire)
        self.entrywise = self.accounting.entrywise
        self.task = Task(
            apply=self.model.apply,
            trainable=tuple(self.model.trainable),
            loss_fn=loss_fn,
            metrics_fn=metrics_fn,
            input_fn=input_fn,
            optimizer=_checked_transformation("client_optimizer", client_optimizer, config.optimizer),
            batch_size=config.batch_size,
        )
        if server_optimizer is _FROM_CONFIG:
            server_optimizer = named_server_optimizer(config.server_optimizer, config.server_lr)
        elif config.server_optimizer != "avg" or config.server_lr is not None:
            raise ValueError(
                "give the server optimizer once: as Simulation(server_optimizer=...) or as "
                f"SimulationConfig(server_optimizer={config.server_optimizer!r}, server_lr=...), not both"
            )
        elif server_optimizer is not None:
            server_optimizer = _checked_transformation("server_optimizer", server_optimizer, None)
        if client_update is not None and not callable(client_update):
            raise TypeError(f"client_update must be a function, got {type(client_update).__name__}")
        keeps = [hook for hook in ("init_state", "personalize") if hasattr(client_update, hook)]
        if keeps and not keep_client_optimizer_state:
            raise ValueError(
                f"client_update has {' and '.join(keeps)}: it keeps a state of its own between rounds, so it "
                "needs keep_client_optimizer_state=True"
            )
        self.program = RoundProgram(
            exchanger,
            self.task,
            config,
            self.local_steps,
            self.mask_shapes,
            data.num_clients,
            self.clients_per_round,
            server_optimizer,
            update=client_update or local_training,
            keep_optimizer_state=keep_client_optimizer_state,
            fine_tune_steps=fine_tune_steps,
        )
        self.arrays = _device_arrays(data)
        self._clients = jax.jit(self.program.clients)  # pyright: ignore[reportUnknownMemberType]
        self._finish = jax.jit(self.program.finish)  # pyright: ignore[reportUnknownMemberType]
        self._init_state = jax.jit(self.program.init_state)  # pyright: ignore[reportUnknownMemberType]
        self._personalized = jax.jit(self.program.personalized)  # pyright: ignore[reportUnknownMemberType]
        self._evaluate_clients = jax.jit(self.program.evaluate_clients)  # pyright: ignore[reportUnknownMemberType]

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
        train, n_train, *tests = self.arrays
        updates = cast(
            ClientUpdates, self._clients(state, index, clients, self.batch_key, train, n_train, self.mask_argument)
        )
        averages, sent = self._average(state, updates)
        return cast(
            RoundOutput,
            self._finish(state, index, clients, updates, averages, sent, self.batch_key, train, n_train, *tests),
        )

    def run(self, progress: Callable[[int, dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        """Runs every round; returns one record per round: ``round``, ``clients``, the global
        and local losses and metrics, the client updates' metrics, the bytes of every
        message, ``layers_sent`` and ``wall_seconds`` (:func:`~jaxlayerx.simulation.accounting.round_record`).
        For the final state too, loop over :meth:`iterate`."""
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

    def personalized_models(self, state: SimulationState, clients: Any = None) -> FlatView:
        """Each client's personalized model in ``state``: its own layers with every change
        of the global model since it last took part merged in (what it would start its next
        round from), fine-tuned with ``fine_tune_steps``. Client-stacked, in the order of
        ``clients`` (default: every client)."""
        return cast(
            FlatView, self._personalized(state, self._client_indices(clients), self.batch_key, *self.arrays[:2])
        )

    def evaluate_clients(self, state: SimulationState, clients: Any = None) -> dict[str, np.ndarray]:
        """Every client's (or each of ``clients``') loss and metrics of its personalized model
        (:meth:`personalized_models`) on its own test examples: ``{"clients", "loss",
        <metric>...}``, one value per client. A client without test examples gets NaN."""
        indices = self._client_indices(clients)
        models = self.personalized_models(state, indices)
        _, _, test, n_test, *_ = self.arrays
        loss, metrics = jax.device_get(self._evaluate_clients(models, indices, test, n_test))
        tested = np.asarray(self.data.n_test)[indices] > 0
        out: dict[str, np.ndarray] = {"clients": indices}
        for name, values in {"loss": loss, **metrics}.items():
            out[name] = np.where(tested, np.asarray(values, np.float64), np.nan)
        return out

    def _client_indices(self, clients: Any) -> np.ndarray:
        if clients is None:
            return np.arange(self.data.num_clients, dtype=np.int32)
        indices = np.asarray(clients)
        if indices.ndim != 1 or indices.dtype.kind not in "iu" or len(indices) == 0:
            raise ValueError(f"clients must be a non-empty 1-D array of client indices, got {clients!r}")
        if indices.min() < 0 or indices.max() >= self.data.num_clients:
            raise ValueError(f"clients must be in 0..{self.data.num_clients - 1}, got {indices.tolist()}")
        return indices.astype(np.int32)

    def compiled_round(self, state: SimulationState | None = None, round_index: int = 1) -> dict[str, Any]:
        """The round's three programs, compiled for ``state`` and ``round_index`` (default: the
        first round): ``{"clients", "average", "finish"}`` -> ``jax.stages.Compiled``, for
        their ``memory_analysis()`` and ``cost_analysis()``. Runs nothing."""
        state = self.init_state() if state is None else state
        clients, index = self.sample_clients(round_index), np.int32(round_index)
        train, n_train, *tests = self.arrays
        client_args = (state, index, clients, self.batch_key, train, n_train, self.mask_argument)
        updates = jax.eval_shape(self._clients, *client_args)  # pyright: ignore[reportUnknownMemberType]
        average_args = (updates.values, updates.masks, updates.counts, state.global_layers)
        options = {"weighted": self.config.weighted, "over": self.config.average_over}

        def average(*args: Any) -> Any:
            return compiled_masked_fedavg(*args, **options)  # pyright: ignore[reportUnknownVariableType]

        averages, sent = jax.eval_shape(average, *average_args)  # pyright: ignore[reportUnknownMemberType]
        finish_args = (state, index, clients, updates, averages, sent, self.batch_key, train, n_train, *tests)
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

    def client_update(self, global_layers: FlatView, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
        """One client's round (pure); see :meth:`RoundProgram.client_update`."""
        return self.program.client_update(global_layers, inputs, self.mask_argument)

    def local_step(self, carry: tuple[FlatView, Any], key: jax.Array, data: LocalData) -> tuple[FlatView, Any]:
        """One local step (pure); see :meth:`RoundProgram.local_step`."""
        return self.program.local_step(carry, key, data)

    def evaluate(self, layers: FlatView, data: LocalData) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Mean loss and metrics of ``layers`` on ``data``'s real examples (pure)."""
        return self.program.evaluate(layers, data)

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


#: The send-mask shapes of each round program and model, traced once (:func:`_mask_shapes`).
_MASK_SHAPES: dict[tuple[Any, ...], FlatView] = {}


def _mask_shapes(spec: ExchangerSpec | None, exchanger: Exchanger, abstract: FlatView) -> FlatView:
    """:func:`send_mask_shapes`, traced once per round program (``spec.program_key``) and
    model shapes: the seeds and swept values of a ``compare`` share it."""
    if spec is None:
        return send_mask_shapes(exchanger, abstract)
    key = (spec.program_key, tuple((name, layer.shape, str(layer.dtype)) for name, layer in abstract.items()))
    if key not in _MASK_SHAPES:
        _MASK_SHAPES[key] = send_mask_shapes(exchanger, abstract)
    return _MASK_SHAPES[key]


def _device_arrays(data: ClientData) -> tuple[Any, ...]:
    """``(train, n_train, test, n_test, global_test, n_global_test)`` on device."""
    put: Callable[[Any], Any] = jnp.asarray
    n_global_test = np.int32(len(next(iter(data.global_test.values()))))
    return tuple(
        jax.tree.map(put, dict(part) if isinstance(part, Mapping) else part)
        for part in (data.train, data.n_train, data.test, data.n_test, data.global_test, n_global_test)
    )


def _no_metrics(output: Any, batch: Batch) -> dict[str, jax.Array]:
    return {}


def _checked_transformation(
    what: str, value: Any, default: optax.GradientTransformation | None
) -> optax.GradientTransformation:
    """``value`` if it is an optax transformation (``default`` if ``None``); a teaching error
    for a name or anything else."""
    if value is None and default is not None:
        return default
    if isinstance(value, str):
        hint = (
            "SimulationConfig(local_optimizer=..., learning_rate=...)"
            if what == "client_optimizer"
            else "SimulationConfig(server_optimizer=..., server_lr=...)"
        )
        raise TypeError(
            f"{what} takes an optax.GradientTransformation (for example optax.adam(1e-3)), got the name "
            f"{value!r}; names are for {hint} and the command line"
        )
    if not (callable(getattr(value, "init", None)) and callable(getattr(value, "update", None))):
        raise TypeError(f"{what} must be an optax.GradientTransformation, got {type(value).__name__}")
    return cast(optax.GradientTransformation, value)


def simulate(
    exchanger: ExchangerSpec | Exchanger,
    config: SimulationConfig,
    data: ClientData,
    module: nn.Module | nnx.Module | None = None,
    progress: Callable[[int, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Runs a federated simulation; returns one metrics dict per round."""
    return Simulation(exchanger, config, data, module).run(progress)
