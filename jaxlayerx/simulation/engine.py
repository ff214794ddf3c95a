"""A federated run in which every client trains at once, under ``jax.vmap``, in one jitted round.

One round:

1. each client starts from its own model with the layers the server sends merged in (all
   layers in round 1; then the exchanged layers, so the others stay local as in FedBN and
   FedPer; for dynamic exchangers, the layers the server aggregated last round);
2. it trains ``local_steps`` SGD steps (or ``local_epochs``) on batches of its own data;
3. it picks what to send with the exchanger's pure ``send_mask`` (see
   :class:`jaxlayerx.Exchanger`): the same rule as its packed path, a boolean per layer
   or, for sparse exchangers, per weight. Drift is measured from the round's start, or
   with error feedback from the last values the client pulled, carried per client in the
   round state;
4. the server averages each layer (each weight, for sparse exchangers) over its senders
   (:func:`jaxlayerx.masked_fedavg`); what nobody sent keeps its previous global value.
   Sparse exchangers then send back exactly the weights they averaged, in COO form.

The simulation knows exchangers only through that interface: any object satisfying
:class:`jaxlayerx.Exchanger` runs, and :class:`ExchangerSpec` names the built-in ones.

With several JAX devices, the client axis is sharded across them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlayerx.aggregation import masked_fedavg
from jaxlayerx.base import Exchanger, FlatView, check_exchanger
from jaxlayerx.coo import coo_nbytes
from jaxlayerx.errors import unknown_layer
from jaxlayerx.simulation.data import ClientData
from jaxlayerx.simulation.exchange import ExchangerSpec
from jaxlayerx.simulation.models import MLP
from jaxlayerx.tree import flatten, unflatten



#: Local steps per round above this are refused (a typo, not a plan).
MAX_LOCAL_STEPS = 100_000


@dataclasses.dataclass(frozen=True)
class SimulationConfig:
    """How a federated run trains.

    Attributes:
      rounds: federated rounds.
      local_steps: SGD steps per client per round (a batch each, drawn with replacement
        from the client's own training data).
      local_epochs: if set, replaces ``local_steps`` by
        ``ceil(local_epochs * mean client training size / batch_size)`` (the same for every
        client: they all train in one vmapped computation).
      batch_size: examples per local step.
      learning_rate, momentum: of ``optax.sgd``; a fresh optimizer state each round.
      weighted: weight the server average by each client's number of training examples.
      seed: seeds the model initialisation and the batches.
    """

    rounds: int = 20
    local_steps: int = 20
    local_epochs: float | None = None
    batch_size: int = 32
    learning_rate: float = 0.05
    momentum: float = 0.9
    weighted: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("rounds", "local_steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.local_steps > MAX_LOCAL_STEPS:
            raise ValueError(f"local-steps must be at most {MAX_LOCAL_STEPS}, got {self.local_steps}")
        if self.local_epochs is not None and not (math.isfinite(self.local_epochs) and self.local_epochs > 0):
            raise ValueError(f"local-epochs must be a finite number > 0, got {self.local_epochs}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning-rate must be a finite number > 0, got {self.learning_rate}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SimulationState:
    """The server model, the clients' own models (stacked), what the server sends next,
    and, with error feedback, each client's last pulled values (stacked; else empty)."""

    global_layers: FlatView
    client_layers: FlatView
    pull_mask: FlatView
    references: FlatView


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RoundOutput:
    """Everything one round computed (device arrays)."""

    state: SimulationState
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
      module: a Flax Linen module called as ``module(x, train=bool)``; default :class:`MLP`.
      label: the run's name in tables and plots; default the spec's label, or the
        exchanger's class name.

    Raises:
      TypeError, ValueError: the exchanger does not satisfy the interface, or its
        ``send_mask`` does not give one boolean (or one of the layer's shape) per layer.
    """

    def __init__(
        self,
        exchanger: ExchangerSpec | Exchanger,
        config: SimulationConfig,
        data: ClientData,
        module: nn.Module | None = None,
        *,
        label: str | None = None,
    ):
        self.config, self.data = config, data
        self.module = module if module is not None else MLP(num_classes=int(np.max(data.y_train)) + 1)
        self.local_steps = local_steps_for(config, data)
        example = jnp.asarray(data.x_train[0, :1])
        init_key, self._batch_key = jax.random.split(jax.random.key(config.seed))
        self.initial_variables = self.module.init(init_key, example, train=False)
        self.template = jax.eval_shape(lambda: self.initial_variables)
        if isinstance(exchanger, ExchangerSpec):
            label = label or exchanger.label
            exchanger = exchanger.make_exchanger(self.module, self.initial_variables, example)
        check_exchanger(exchanger)
        self.exchanger = exchanger
        self.label = label or type(exchanger).__name__
        abstract = flatten(self.template)
        self.layer_names = list(abstract)
        self.mask_shapes = _mask_shapes(exchanger, abstract)
        self.layer_shapes = [tuple(layer.shape) for layer in abstract.values()]
        self.layer_itemsizes = [layer.dtype.itemsize for layer in abstract.values()]
        self.layer_nbytes = np.array([math.prod(shape) * size for shape, size in zip(self.layer_shapes, self.layer_itemsizes)])
        self._client_sharding, self._replicated = _shardings(data.num_clients)
        self._arrays = self._device_data()
        self._round = jax.jit(self._round_fn)

    def init_state(self) -> SimulationState:
        """Round 1's state: every client holds the initial model and pulls all layers."""
        global_layers = flatten(self.initial_variables)
        clients = self.data.num_clients
        client_layers = self._place_clients(
            FlatView((n, jnp.broadcast_to(v, (clients, *v.shape))) for n, v in global_layers.items())
        )
        # Per-weight masks (sparse exchangers) have the layers' shapes from the start.
        pull_mask = FlatView((n, jnp.ones(shape, bool)) for n, shape in self.mask_shapes.items())
        references = client_layers if self.exchanger.error_feedback else FlatView()
        return SimulationState(global_layers, client_layers, pull_mask, references)

    def round(self, state: SimulationState, round_index: int) -> RoundOutput:
        """Runs round ``round_index`` (from 1) from ``state``."""
        keys = jax.random.split(jax.random.fold_in(self._batch_key, round_index), self.data.num_clients)
        return self._round(state, self._place_clients(keys), *self._arrays)

    def run(self, progress: Callable[[int, dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        """Runs every round; returns one metrics dict per round (see ``report.py``)."""
        return [record for record, _ in self.iterate(progress)]

    def iterate(self, progress: Callable[[int, dict[str, Any]], None] | None = None) -> Iterator[tuple[dict[str, Any], RoundOutput]]:
        """Yields ``(metrics record, round output)`` round by round."""
        state = self.init_state()
        for round_index in range(1, self.config.rounds + 1):
            start = time.perf_counter()
            pulled = np.array([np.count_nonzero(mask) for mask in jax.device_get(list(state.pull_mask.values()))])
            output = self.round(state, round_index)
            record = self._record(round_index, output, pulled)
            record["wall_seconds"] = time.perf_counter() - start
            if progress is not None:
                progress(round_index, record)
            yield record, output
            state = output.state

    # -- the jitted round ------------------------------------------------------------------

    def _round_fn(self, state: SimulationState, keys, x_train, y_train, n_train, x_test, y_test, n_test, x_global, y_global):
        global_layers, pull_mask = state.global_layers, state.pull_mask
        client = functools.partial(self.client_update, global_layers, pull_mask)
        starts, trained, masks, references = jax.vmap(client)(
            state.client_layers, state.references, keys, x_train, y_train, n_train
        )
        trained = self._replicate(trained)
        masks = self._replicate(masks)
        counts = n_train.astype(jnp.float32)
        averages, next_pull = masked_fedavg(trained, masks, counts, weighted=self.config.weighted, fallback=global_layers)
        personal = jax.vmap(lambda own: FlatView((n, jnp.where(next_pull[n], averages[n], own[n])) for n in own))(trained)
        global_loss, global_accuracy = self._evaluate(averages, x_global, y_global, jnp.asarray(len(y_global)))
        _, local_accuracy = jax.vmap(self._evaluate)(personal, x_test, y_test, n_test)
        metrics = {
            "global_loss": global_loss,
            "global_accuracy": global_accuracy,
            "local_accuracy": local_accuracy,
            "send_counts": jnp.stack([masks[n].reshape(masks[n].shape[0], -1).sum(axis=1) for n in masks], axis=1),
        }
        new_state = SimulationState(averages, trained, next_pull, references)
        return RoundOutput(new_state, starts, trained, masks, metrics)

    def client_update(
        self, global_layers: FlatView, pull_mask: FlatView, local: FlatView, reference: FlatView, key, x, y, n
    ) -> tuple[FlatView, FlatView, FlatView, FlatView]:
        """One client's round (pure): merge the pulled layers, train, pick what to send.

        ``reference`` holds the client's last pulled values (error feedback; else empty).
        Returns the round's starting layers, the trained layers, the send mask and the
        updated reference.
        """
        start = _merged(pull_mask, global_layers, local)
        if self.exchanger.error_feedback:
            reference = _merged(pull_mask, global_layers, reference)
        trained = self._train(start, key, x, y, n)
        mask = self.exchanger.send_mask(trained, reference if self.exchanger.error_feedback else start)
        return start, trained, FlatView((name, jnp.asarray(mask[name], bool)) for name in trained), reference

    def _train(self, start: FlatView, key, x, y, n) -> FlatView:
        variables = unflatten(start, like=self.template)
        params = variables["params"]
        state = {k: v for k, v in variables.items() if k != "params"}
        carry = (params, state, self.optimizer.init(params))
        step = lambda carry, step_key: (self.sgd_step(carry, step_key, x, y, n), None)  # noqa: E731
        (params, state, _), _ = jax.lax.scan(step, carry, jax.random.split(key, self.local_steps))
        return flatten({"params": params, **state})

    @property
    def optimizer(self) -> optax.GradientTransformation:
        return optax.sgd(self.config.learning_rate, momentum=self.config.momentum or None)

    def sgd_step(self, carry: tuple[Any, Any, Any], key, x, y, n) -> tuple[Any, Any, Any]:
        """One local step (pure): a batch drawn from the client's ``n`` examples, one update.

        ``carry`` is ``(params, other collections, optimizer state)``.
        """
        params, state, opt_state = carry
        index = jax.random.randint(key, (self.config.batch_size,), 0, n)
        xb, yb = x[index], y[index]

        def loss_fn(params):
            if state:
                logits, new_state = self.module.apply({"params": params, **state}, xb, train=True, mutable=list(state))
            else:
                logits, new_state = self.module.apply({"params": params}, xb, train=True), {}
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), new_state

        (_, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = self.optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_state, opt_state

    def _evaluate(self, layers: FlatView, x, y, n):
        logits = self.module.apply(unflatten(layers, like=self.template), x, train=False)
        valid = jnp.arange(y.shape[0]) < n
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        correct = jnp.argmax(logits, axis=-1) == y
        count = jnp.maximum(n, 1).astype(jnp.float32)
        return jnp.sum(jnp.where(valid, losses, 0.0)) / count, jnp.sum(valid & correct) / count

    # -- host side -------------------------------------------------------------------------

    def _record(self, round_index: int, output: RoundOutput, pulled: np.ndarray) -> dict[str, Any]:
        """The round's metrics; ``pulled`` counts the values each layer's download holds."""
        metrics = jax.device_get(output.metrics)
        send_counts = np.asarray(metrics["send_counts"])  # (clients, layers): values sent
        upload = [self._upload_bytes(row) for row in send_counts]
        download = self._download_bytes(pulled, round_index)
        return {
            "round": round_index,
            "global_accuracy": float(metrics["global_accuracy"]),
            "global_loss": float(metrics["global_loss"]),
            "local_accuracy_mean": float(np.mean(metrics["local_accuracy"])),
            "local_accuracy": [float(a) for a in metrics["local_accuracy"]],
            "upload_bytes": int(sum(upload)),
            "download_bytes": int(download * self.data.num_clients),
            "layers_sent": [int(np.count_nonzero(row)) for row in send_counts],
        }

    def _upload_bytes(self, counts: np.ndarray) -> int:
        """Exact bytes of one client's payload, as :func:`jaxlayerx.payload_nbytes` counts them."""
        return self._payload_bytes(counts, self.exchanger.payload_kind)

    def _download_bytes(self, pulled: np.ndarray, round_index: int) -> int:
        """Exact bytes of the server's payload to one client: the whole model, unnamed, in
        round 1; then what the exchanger sends back."""
        return self._payload_bytes(pulled, "positional" if round_index == 1 else self.exchanger.payload_kind)

    def _payload_bytes(self, counts: np.ndarray, kind: str) -> int:
        """Bytes of a payload of ``kind`` holding ``counts[i]`` values of layer ``i``."""
        if kind == "sparse":
            return self._coo_bytes(counts)
        return self._dense_bytes(counts > 0, names=kind == "named")

    def _dense_bytes(self, mask: np.ndarray, names: bool) -> int:
        """The masked layers, plus their names array when ``names``."""
        arrays = int(self.layer_nbytes[mask].sum())
        if not names:
            return arrays
        selected = [name for name, keep in zip(self.layer_names, mask) if keep]
        return arrays + np.array(selected, dtype=np.str_).nbytes

    def _coo_bytes(self, counts: np.ndarray) -> int:
        """The COO payload holding ``counts[i]`` values of layer ``i`` (layers with none are not sent)."""
        sent = np.flatnonzero(counts)
        return coo_nbytes(
            [int(counts[i]) for i in sent],
            [self.layer_shapes[i] for i in sent],
            [self.layer_itemsizes[i] for i in sent],
            [self.layer_names[i] for i in sent],
        )

    def _device_data(self) -> tuple[jax.Array, ...]:
        data = self.data
        clients = [data.x_train, data.y_train, data.n_train, data.x_test, data.y_test, data.n_test]
        placed = [self._place_clients(jnp.asarray(a)) for a in clients]
        return (*placed, jnp.asarray(data.x_global_test), jnp.asarray(data.y_global_test))

    def _place_clients(self, tree):
        if self._client_sharding is None:
            return tree
        return jax.device_put(tree, self._client_sharding)

    def _replicate(self, tree):
        if self._replicated is None:
            return tree
        return jax.lax.with_sharding_constraint(tree, self._replicated)


def _merged(pull_mask: FlatView, pulled: FlatView, own: FlatView) -> FlatView:
    """``pulled`` where the mask is set (per layer or per weight), else ``own``."""
    return FlatView((name, jnp.where(pull_mask[name], pulled[name], own[name])) for name in own)


def _mask_shapes(exchanger: Exchanger, layers: FlatView) -> FlatView:
    """The shape of each layer's send mask: ``()`` or the layer's shape, checked once.

    Raises:
      KeyError: the mask misses a layer or names an unknown one.
      TypeError, ValueError: a mask that is not boolean, or of another shape.
    """
    what = type(exchanger).__name__
    masks = jax.eval_shape(exchanger.send_mask, layers, layers)
    if not isinstance(masks, Mapping):
        raise TypeError(f"{what}.send_mask must return a name -> bool mapping, got {type(masks).__name__}")
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
    module: nn.Module | None = None,
    progress: Callable[[int, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Runs a federated simulation; returns one metrics dict per round."""
    return Simulation(exchanger, config, data, module).run(progress)
