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
from jaxlayerx.errors import unknown_layer
from jaxlayerx.protocol import ledger
from jaxlayerx.quantize import drift_reference, quantizable, quantized_push
from jaxlayerx.simulation.adapters import ModelAdapter
from jaxlayerx.simulation.config import SimulationConfig
from jaxlayerx.simulation.server import init_server_state, server_step
from jaxlayerx.simulation.state import ClientUpdates, RoundOutput, SimulationState


class RoundProgram:
    """The pure functions of a round, for one exchanger, model and configuration.

    Args:
      exchanger: the exchanger every client runs (its pure ``send_mask``, ``quantize`` and
        ``error_feedback``).
      model: the model as pure functions over flat views.
      config: the training settings.
      local_steps: local steps per client per round.
      mask_shapes: each layer's send-mask shape (:func:`send_mask_shapes`).
      num_clients: clients in the federation.
      clients_per_round: clients sampled each round.
      server_optimizer: the server's optax optimizer, or ``None`` for FedAvg.
    """

    def __init__(
        self,
        exchanger: Exchanger,
        model: ModelAdapter,
        config: SimulationConfig,
        local_steps: int,
        mask_shapes: FlatView,
        num_clients: int,
        clients_per_round: int,
        server_optimizer: optax.GradientTransformation | None,
    ) -> None:
        self.exchanger = exchanger
        self.model = model
        self.config = config
        self.local_steps = local_steps
        self.mask_shapes = mask_shapes
        self.num_clients = num_clients
        self.clients_per_round = clients_per_round
        self.optimizer = config.optimizer
        self.server_optimizer = server_optimizer
        chunked = config.chunk_size is not None and config.chunk_size < clients_per_round
        self._client_sharding, self._replicated = (None, None) if chunked else _shardings(clients_per_round)

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
        return SimulationState(
            global_layers=global_layers,
            client_layers=client_layers,
            references=references,
            residuals=residuals,
            updated_in=updated_in,
            synced=jnp.full(clients, ledger.NOTHING, jnp.int32),
            server_state=init_server_state(self.server_optimizer, global_layers),
            round_index=jnp.zeros((), jnp.int32),
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
        x_train: jax.Array,
        y_train: jax.Array,
        n_train: jax.Array,
    ) -> ClientUpdates:
        """The sampled clients' round: what each pulls, trains and sends."""
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
        starts, trained, masks, references, residuals, values = self.map_clients(
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
        trained = self.train(start, key, x, y, n)
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

    def train(self, start: FlatView, key: jax.Array, x: jax.Array, y: jax.Array, n: jax.Array) -> FlatView:
        """``local_steps`` steps of the local optimizer from ``start``, on batches of the client's data."""
        params = FlatView((name, start[name]) for name in self.model.trainable)
        carry = (params, start, self.optimizer.init(params))
        # Every step's batch indices drawn before the loop in one vectorized draw (the same
        # batches as local_step draws step by step); each step gathers its own batch, so that
        # memory does not grow with the steps.
        draw: Callable[[jax.Array], jax.Array] = lambda step_key: self.batch_index(step_key, n)
        indices = jax.vmap(draw)(jax.random.split(key, self.local_steps))
        step: Callable[[tuple[Any, Any, Any], jax.Array], tuple[tuple[Any, Any, Any], None]]
        step = lambda carry, index: (self.update(carry, x[index], y[index]), None)  # noqa: E731
        (params, layers, _), _ = jax.lax.scan(step, carry, indices)
        return FlatView((name, params[name] if name in params else value) for name, value in layers.items())

    def batch_index(self, key: jax.Array, n: jax.Array) -> jax.Array:
        """The example indices of one local step's batch, drawn from ``[0, n)``."""
        return jax.random.randint(key, (self.config.batch_size,), 0, n)

    def local_step(
        self, carry: tuple[Any, Any, Any], key: jax.Array, x: jax.Array, y: jax.Array, n: jax.Array
    ) -> tuple[Any, Any, Any]:
        """One local step (pure): a batch drawn from the client's ``n`` examples, one update.

        ``carry`` is ``(trainable layers, all layers, optimizer state)``; the untrainable
        layers (BatchNorm statistics) move as the forward pass moves them.
        """
        index = self.batch_index(key, n)
        return self.update(carry, x[index], y[index])

    def update(self, carry: tuple[Any, Any, Any], xb: jax.Array, yb: jax.Array) -> tuple[Any, Any, Any]:
        """One optimizer step on the batch ``(xb, yb)``."""
        params, layers, opt_state = carry

        def loss_fn(params: FlatView) -> tuple[jax.Array, FlatView]:
            logits, moved = self.model.apply(_with(layers, params), xb, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), moved

        (_, moved), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)  # pyright: ignore[reportUnknownMemberType]
        updates, opt_state = self.optimizer.update(grads, opt_state, params)
        params = cast(FlatView, optax.apply_updates(params, updates))
        return params, _with(moved, params), opt_state

    def evaluate(self, layers: FlatView, x: jax.Array, y: jax.Array, n: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Mean loss and accuracy of ``layers`` over the first ``n`` examples of ``(x, y)``."""
        logits, _ = self.model.apply(layers, x, train=False)
        valid = jnp.arange(y.shape[0]) < n
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        correct = jnp.argmax(logits, axis=-1) == y
        count = jnp.maximum(n, 1).astype(jnp.float32)
        return jnp.sum(jnp.where(valid, losses, 0.0)) / count, jnp.sum(valid & correct) / count

    # --- program 3: the server's step and the evaluation ------------------------------------

    def finish(
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
        """The server's step after the average, the evaluation and the next state."""
        take = functools.partial(_take, clients)
        global_layers, server_state = server_step(
            self.server_optimizer, state.global_layers, averages, sent, state.server_state
        )
        trained = updates.trained
        personal = FlatView((n, jnp.where(sent[n], global_layers[n], trained[n])) for n in trained)
        global_loss, global_accuracy = self.evaluate(global_layers, x_global, y_global, jnp.asarray(len(y_global)))
        evaluated = self.map_clients(
            lambda args: self.evaluate(*args), (personal, *map(take, (x_test, y_test, n_test)))
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


def _shardings(num_clients: int) -> tuple[NamedSharding | None, NamedSharding | None]:
    """Client-axis and replicated shardings over as many devices as divide ``num_clients``."""
    devices = jax.devices()
    count = math.gcd(num_clients, len(devices))
    if count <= 1:
        return None, None
    mesh = Mesh(np.array(devices[:count]), ("clients",))
    return NamedSharding(mesh, PartitionSpec("clients")), NamedSharding(mesh, PartitionSpec())
