"""The jitted round: what each sampled client pulls, trains and sends, and the server's step.

A round is three compiled programs (:class:`RoundProgram`): the clients' updates (one
``vmap``, or ``lax.map`` over chunks), the server's masked average (the program a Flower
server runs, :func:`jaxlayerx.aggregation.compiled_masked_fedavg`) and the server step
with the evaluation. Everything here is pure and runs on device; the host side (sampling,
byte accounting, records) is in :mod:`jaxlayerx.simulation.engine` and
:mod:`jaxlayerx.simulation.accounting`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlayerx.base import Exchanger, FlatView
from jaxlayerx.errors import check_same_layers
from jaxlayerx.protocol import ledger
from jaxlayerx.quantize import drift_reference, quantizable, quantized_push
from jaxlayerx.simulation.config import SimulationConfig
from jaxlayerx.simulation.server import init_server_state, server_step
from jaxlayerx.simulation.state import ClientUpdates, RoundOutput, SimulationState
from jaxlayerx.simulation.task import Batch, ClientUpdate, LocalData, Task, local_training

#: The fine-tuning keys' stream, apart from the training batches' (``fold_in`` of the batch key).
FINE_TUNE_STREAM = 7


class RoundProgram:
    """The pure functions of a round, for one exchanger, task and configuration.

    Args:
      exchanger: the exchanger every client runs (its pure ``send_mask``, ``quantize`` and
        ``error_feedback``).
      task: the model, loss, metrics and client optimizer (:class:`Task`).
      config: the settings (``chunk_size``, ``rounds``).
      local_steps: local steps per client per round.
      mask_shapes: each layer's send-mask shape (:func:`send_mask_shapes`).
      num_clients: clients in the federation.
      clients_per_round: clients sampled each round.
      server_optimizer: the server's optax transformation, or ``None`` for FedAvg.
      update: the client update (:func:`jaxlayerx.simulation.task.local_training` by default).
      keep_optimizer_state: whether a client's optimizer state carries over to its next round.
      fine_tune_steps: local steps of :func:`local_training` a client takes from its
        personalized model before it is evaluated (0: none).
    """

    def __init__(
        self,
        exchanger: Exchanger,
        task: Task,
        config: SimulationConfig,
        local_steps: int,
        mask_shapes: FlatView,
        num_clients: int,
        clients_per_round: int,
        server_optimizer: optax.GradientTransformation | None,
        update: ClientUpdate = local_training,
        keep_optimizer_state: bool = False,
        fine_tune_steps: int = 0,
    ) -> None:
        self.exchanger = exchanger
        self.task = task
        self.config = config
        self.local_steps = local_steps
        self.mask_shapes = mask_shapes
        self.num_clients = num_clients
        self.clients_per_round = clients_per_round
        self.server_optimizer = server_optimizer
        self.update = update
        self.keep_optimizer_state = keep_optimizer_state
        self.fine_tune_steps = fine_tune_steps
        chunked = config.chunk_size is not None and config.chunk_size < clients_per_round
        self._client_sharding, self._replicated = (None, None) if chunked else _shardings(clients_per_round)

    @property
    def client_sharding(self) -> NamedSharding | None:
        """The sharding of the clients' axis over several devices, or ``None``."""
        return self._client_sharding

    # --- the state before round 1 ---------------------------------------------------------

    def init_state(self, global_layers: FlatView) -> SimulationState:
        """Before round 1: every client holds the initial model and has never taken part."""
        clients = self.num_clients
        client_layers = FlatView((n, jnp.broadcast_to(v, (clients, *v.shape))) for n, v in global_layers.items())
        references = client_layers if self.exchanger.error_feedback else FlatView()
        residuals = FlatView()
        if self.exchanger.error_feedback and self.exchanger.quantize is not None:
            residuals = FlatView((n, jnp.zeros((clients, *v.shape), jnp.float32)) for n, v in global_layers.items())
        updated_in = FlatView((n, jnp.zeros(shape, jnp.int32)) for n, shape in self.mask_shapes.items())
        opt_states = None
        if self.keep_optimizer_state:
            stack: Callable[[Any], Any] = lambda leaf: jnp.broadcast_to(leaf, (clients, *jnp.shape(leaf)))
            opt_states = jax.tree.map(stack, self.init_client_state(global_layers))
        return SimulationState(
            global_layers=global_layers,
            client_layers=client_layers,
            references=references,
            residuals=residuals,
            updated_in=updated_in,
            synced=jnp.full(clients, ledger.NOTHING, jnp.int32),
            server_state=init_server_state(self.server_optimizer, global_layers),
            round_index=jnp.zeros((), jnp.int32),
            opt_states=opt_states,
        )

    # --- program 1: the clients -----------------------------------------------------------

    def round_keys(self, round_index: jax.Array, clients: jax.Array, batch_key: jax.Array) -> jax.Array:
        """The batch keys of the round's clients: client ``c`` of round ``r`` draws from
        ``split(fold_in(batch_key, r), num_clients)[c]``, whichever clients are sampled."""
        return jax.random.split(jax.random.fold_in(batch_key, round_index), self.num_clients)[clients]

    def clients(
        self,
        state: SimulationState,
        round_index: jax.Array,
        clients: jax.Array,
        batch_key: jax.Array,
        train: Batch,
        n_train: jax.Array,
        argument: Any = None,
    ) -> ClientUpdates:
        """The sampled clients' round: what each pulls, trains and sends; ``argument`` is the
        send rule's parameter (the exchanger's ``mask_argument``; ``None`` for ``send_mask``)."""
        take = functools.partial(_take, clients)
        keys = self.round_keys(round_index, clients, batch_key)
        synced = state.synced[clients]
        pull_masks = _pull_masks(state, synced)
        inputs = (
            pull_masks,
            take(state.client_layers),
            take(state.references),
            take(state.residuals),
            take(state.opt_states),
            keys,
            LocalData(take(train), take(n_train)),
        )
        starts, trained, masks, references, residuals, values, opt_states, metrics = self.map_clients(
            functools.partial(self.client_update, state.global_layers, argument=argument), self._shard(inputs)
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
            opt_states=opt_states if self.keep_optimizer_state else None,
            train_metrics=metrics,
        )

    def client_update(self, global_layers: FlatView, inputs: tuple[Any, ...], argument: Any = None) -> tuple[Any, ...]:
        """One client's round (pure): merge what it pulls, train, pick what to send (with the
        send rule's parameter ``argument``, as :meth:`clients`).

        ``inputs`` is ``(pull_mask, own layers, reference, residual, optimizer state, key,
        data)``; ``reference`` holds the client's last pulled values (error feedback; else
        empty), ``residual`` its carried quantization error (error feedback with
        quantization; else empty), the optimizer state its own (kept) or ``None`` (fresh).
        Returns the round's starting layers, the trained layers, the send mask, the updated
        reference and residual, the values the server receives (the trained ones, or with
        quantization what the server rebuilds over its global values, which the client
        holds, having just pulled every change), the optimizer state and the client
        update's metrics.
        """
        pull_mask, local, reference, residual, opt_state, key, data = inputs
        exchanger = self.exchanger
        start = _merged(pull_mask, global_layers, local)
        if exchanger.error_feedback:
            reference = _merged(pull_mask, global_layers, reference)
        if opt_state is None:
            opt_state = self.init_client_state(start)
        trained, opt_state, metrics = self.train(start, opt_state, key, data)
        if not exchanger.error_feedback:
            drift_from = start
        elif residual:
            drift_from = FlatView((name, drift_reference(reference[name], residual[name])) for name in reference)
        else:
            drift_from = reference
        mask = send_mask(exchanger, trained, drift_from, argument)
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
        return start, trained, mask, reference, residual, values, opt_state, metrics

    def train(
        self, start: FlatView, opt_state: Any, key: jax.Array, data: LocalData
    ) -> tuple[FlatView, Any, dict[str, jax.Array]]:
        """The client update from ``start``, checked: the trained layers (in ``start``'s
        order, each of its shape and dtype), the optimizer state and scalar metrics."""
        trained, opt_state, metrics = self.update(start, opt_state, data, key, self.local_steps, self.task)
        return _checked_update(start, trained), opt_state, _checked_metrics(metrics)

    def local_step(self, carry: tuple[FlatView, Any], key: jax.Array, data: LocalData) -> tuple[FlatView, Any]:
        """One local step of :func:`local_training` (pure): a batch drawn from the client's
        examples, one optimizer step. ``carry`` is ``(layers, optimizer state)``."""
        layers, opt_state = carry
        layers, opt_state, _ = self.task.step(layers, opt_state, data.take(self.task.batch_index(key, data.size)))
        return layers, opt_state

    def evaluate(self, layers: FlatView, data: LocalData) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Mean loss and metrics of ``layers`` over ``data``'s real examples."""
        return self.task.evaluate(layers, data)

    def fine_tuned(self, layers: FlatView, key: jax.Array, data: LocalData) -> FlatView:
        """``layers`` after ``fine_tune_steps`` steps of :func:`local_training` on ``data``
        with a fresh optimizer state (``layers`` itself without fine-tuning)."""
        if not self.fine_tune_steps:
            return layers
        state = self.task.init_optimizer(layers)
        return local_training(layers, state, data, key, self.fine_tune_steps, self.task)[0]

    def personalized(
        self, state: SimulationState, clients: jax.Array, batch_key: jax.Array, train: Batch, n_train: jax.Array
    ) -> FlatView:
        """The personalized models of ``clients`` in ``state``: each one's own layers with
        every change of the global model since it last took part merged in (what it would
        start its next round from), fine-tuned if asked."""
        take = functools.partial(_take, clients)
        synced = state.synced[clients]
        pull_masks = _pull_masks(state, synced)
        merge: Callable[[Any, Any], Any] = lambda mask, own: _merged(mask, state.global_layers, own)
        models = self._personal(jax.vmap(merge)(pull_masks, take(state.client_layers)), take(state.opt_states))
        return self._fine_tune_all(models, clients, state.round_index, batch_key, train, n_train)

    def evaluate_clients(
        self,
        models: FlatView,
        clients: jax.Array,
        test: Batch,
        n_test: jax.Array,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Each of ``clients``' loss and metrics of its model in ``models`` on its test examples."""
        take = functools.partial(_take, clients)
        evaluate: Callable[[Any], Any] = lambda args: self.evaluate(args[0], LocalData(args[1], args[2]))
        return self.map_clients(evaluate, (models, take(test), take(n_test)))

    def init_client_state(self, layers: FlatView) -> Any:
        """A client's fresh state: the client update's ``init_state(task, layers)`` if it has
        one (a method that keeps more than an optimizer state), else a fresh optimizer state."""
        init = getattr(self.update, "init_state", None)
        return self.task.init_optimizer(layers) if init is None else init(self.task, layers)

    def _personal(self, models: FlatView, states: Any) -> FlatView:
        """The client update's ``personalize(layers, state)`` of each client (its own model,
        as Ditto keeps one), or ``models`` as they are."""
        personalize = getattr(self.update, "personalize", None)
        if personalize is None or states is None:
            return models
        return self.map_clients(lambda args: personalize(*args), (models, states))

    def _fine_tune_all(
        self,
        models: FlatView,
        clients: jax.Array,
        round_index: jax.Array,
        batch_key: jax.Array,
        train: Batch,
        n_train: jax.Array,
    ) -> FlatView:
        if not self.fine_tune_steps:
            return models
        take = functools.partial(_take, clients)
        keys = jax.random.split(
            jax.random.fold_in(jax.random.fold_in(batch_key, FINE_TUNE_STREAM), round_index), self.num_clients
        )
        tune: Callable[[Any], Any] = lambda args: self.fine_tuned(args[0], args[1], LocalData(args[2], args[3]))
        return self.map_clients(tune, (models, keys[clients], take(train), take(n_train)))

    # --- program 3: the server's step and the evaluation ------------------------------------

    def finish(
        self,
        state: SimulationState,
        round_index: jax.Array,
        clients: jax.Array,
        updates: ClientUpdates,
        averages: FlatView,
        sent: FlatView,
        batch_key: jax.Array,
        train: Batch,
        n_train: jax.Array,
        test: Batch,
        n_test: jax.Array,
        global_test: Batch,
        n_global_test: jax.Array,
    ) -> RoundOutput:
        """The server's step after the average, the evaluation and the next state."""
        global_layers, server_state = server_step(
            self.server_optimizer, state.global_layers, averages, sent, state.server_state
        )
        trained = updates.trained
        personal = FlatView((n, jnp.where(sent[n], global_layers[n], trained[n])) for n in trained)
        personal = self._personal(personal, updates.opt_states)
        personal = self._fine_tune_all(personal, clients, round_index, batch_key, train, n_train)
        global_loss, global_metrics = self.evaluate(global_layers, LocalData(global_test, n_global_test))
        local_loss, local_metrics = self.evaluate_clients(personal, clients, test, n_test)
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
            opt_states=_put_tree(state.opt_states, clients, updates.opt_states),
        )
        metrics = {
            "global_loss": global_loss,
            **{f"global_{name}": value for name, value in global_metrics.items()},
            "local_loss": local_loss,
            **{f"local_{name}": value for name, value in local_metrics.items()},
            **{f"train_{name}": value for name, value in updates.train_metrics.items()},
            "send_counts": _counts(updates.masks),
            "pull_counts": updates.pull_counts,
            "first_contact": updates.first_contact,
        }
        return RoundOutput(new_state, clients, updates.starts, trained, updates.masks, metrics)

    # --- mapping over clients ---------------------------------------------------------------

    def map_clients(self, function: Callable[[Any], Any], inputs: Any) -> Any:
        """``function`` over the leading client axis of ``inputs``: one ``vmap``, or
        ``lax.map`` over chunks of ``chunk_size`` clients."""
        chunk = self.config.chunk_size
        if chunk is None or chunk >= self.clients_per_round:
            per_client: Callable[[Any], Any] = lambda args: function(args)
            return jax.vmap(per_client)(inputs)
        return jax.lax.map(function, inputs, batch_size=chunk)  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]

    def _shard(self, tree: Any) -> Any:
        if self._client_sharding is None:
            return tree
        return jax.lax.with_sharding_constraint(tree, self._client_sharding)  # pyright: ignore[reportUnknownMemberType]

    def _replicate(self, tree: Any) -> Any:
        if self._replicated is None:
            return tree
        return jax.lax.with_sharding_constraint(tree, self._replicated)  # pyright: ignore[reportUnknownMemberType]


def send_mask(exchanger: Exchanger, current: FlatView, reference: FlatView, argument: Any) -> Mapping[str, Any]:
    """The exchanger's send mask, with its rule's parameter ``argument`` where it takes one."""
    if argument is None:
        return exchanger.send_mask(current, reference)
    return cast(Any, exchanger).send_mask_at(current, reference, argument)


def mask_argument(exchanger: Exchanger, layers: FlatView) -> Any:
    """The exchanger's ``mask_argument(layers)`` (its rule's parameter, as a traced
    argument takes it), or ``None`` for an exchanger without one."""
    method = getattr(exchanger, "mask_argument", None)
    return method(layers) if callable(method) else None


def send_mask_shapes(exchanger: Exchanger, layers: FlatView) -> FlatView:
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
    check_same_layers(masks, layers, extra=f"the model ({what}.send_mask names it)", missing=f"the send mask of {what}")
    shapes = FlatView()
    for name, layer in layers.items():
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


def _take(clients: jax.Array, tree: Any) -> Any:
    take: Callable[[Any], Any] = lambda value: value[clients]
    return jax.tree.map(take, tree)


def _put(stacked: FlatView, clients: jax.Array, values: FlatView) -> FlatView:
    return FlatView((name, stacked[name].at[clients].set(values[name])) for name in stacked)


def _pull_masks(state: SimulationState, synced: jax.Array) -> FlatView:
    """What clients holding the rounds ``synced`` pull from ``state``: every entry changed
    since (client-stacked; a scalar per layer, or per weight)."""
    return FlatView(
        (name, ledger.changed_since(rounds[None], synced.reshape(-1, *(1,) * rounds.ndim)))
        for name, rounds in state.updated_in.items()
    )


def _put_tree(stacked: Any, clients: jax.Array, values: Any) -> Any:
    if stacked is None:
        return None
    put: Callable[[Any, Any], Any] = lambda old, new: old.at[clients].set(new)
    return jax.tree.map(put, stacked, values)


def _checked_update(start: FlatView, trained: Any) -> FlatView:
    """The client update's trained layers, in ``start``'s order, checked against it."""
    if not isinstance(trained, Mapping):
        raise TypeError(
            f"client_update must return the trained layers as a name -> array mapping, got {type(trained).__name__}"
        )
    trained = cast("Mapping[str, Any]", trained)
    check_same_layers(
        trained, start, extra="the model (client_update returned it)", missing="what client_update returned"
    )
    out = FlatView()
    for name, layer in start.items():
        value = jnp.asarray(trained[name])
        if value.shape != layer.shape or value.dtype != layer.dtype:
            raise ValueError(
                f"client_update returned layer {name!r} as {value.dtype}{list(value.shape)}, "
                f"expected {layer.dtype}{list(layer.shape)} (the layer's shape and dtype)"
            )
        out[name] = value
    return out


def _checked_metrics(metrics: Any) -> dict[str, jax.Array]:
    if not isinstance(metrics, Mapping):
        raise TypeError(
            f"client_update must return its metrics as a name -> scalar mapping, got {type(metrics).__name__}"
        )
    out: dict[str, jax.Array] = {}
    for name, value in cast("Mapping[str, Any]", metrics).items():
        value = jnp.asarray(value)
        if value.ndim:
            raise ValueError(f"client_update metric {name!r} has shape {value.shape}; metrics are scalars")
        out[str(name)] = value
    return out


def _counts(masks: FlatView) -> jax.Array:
    """``(clients, layers)``: how many values of each layer each client's mask marks."""
    return jnp.stack([mask.reshape(mask.shape[0], -1).sum(axis=1) for mask in masks.values()], axis=1)


def _merged(pull_mask: FlatView, pulled: FlatView, own: FlatView) -> FlatView:
    """``pulled`` where the mask is set (per layer or per weight), else ``own``."""
    return FlatView((name, jnp.where(pull_mask[name], pulled[name], own[name])) for name in own)


def _shardings(num_clients: int) -> tuple[NamedSharding | None, NamedSharding | None]:
    """Client-axis and replicated shardings over as many devices as divide ``num_clients``."""
    devices = jax.devices()
    count = math.gcd(num_clients, len(devices))
    if count <= 1:
        return None, None
    mesh = Mesh(np.array(devices[:count]), ("clients",))
    return NamedSharding(mesh, PartitionSpec("clients")), NamedSharding(mesh, PartitionSpec())
