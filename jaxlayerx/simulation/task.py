"""What a client trains on and how: the task (model, loss, metrics, optimizer) and the
client update, as pure functions the simulation runs under ``vmap``.

A client update is any pure function

    client_update(start, opt_state, data, key, steps, task) -> (trained, opt_state, metrics)

* ``start``: the client's layers at the round's start (a flat view: the global layers it
  pulled merged with its own local ones);
* ``opt_state``: its client optimizer's state: fresh each round, or the one it left last
  time with ``keep_client_optimizer_state``;
* ``data``: its training examples (:class:`LocalData`);
* ``key``: its batch key for the round; ``steps``: the local steps (a Python int);
* ``task``: the :class:`Task`, whose :meth:`Task.step` takes one optimizer step;

and it returns the trained layers, the optimizer state and a dict of scalar metrics. The
default, :func:`local_training`, is ``steps`` steps of the client optimizer on batches
drawn with replacement::

    def local_training(start, opt_state, data, key, steps, task):
        layers, opt_state, losses = train_steps(start, opt_state, data, key, steps, task)
        return layers, opt_state, {"loss": jnp.mean(losses)}

    def train_steps(start, opt_state, data, key, steps, task, *, penalty=None, only=None):
        indices = jax.vmap(lambda k: task.batch_index(k, data.size))(jax.random.split(key, steps))

        def step(carry, index):
            layers, opt_state = carry
            layers, opt_state, loss = task.step(layers, opt_state, data.take(index), penalty=penalty, only=only)
            return (layers, opt_state), loss

        (layers, opt_state), losses = jax.lax.scan(step, (start, opt_state), indices)
        return layers, opt_state, losses

:mod:`jaxlayerx.recipes` builds FedProx, FedRep and more on the same form.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping
from typing import Any, NamedTuple, Protocol, cast

import jax
import jax.numpy as jnp
import optax

from jaxlayerx.base import FlatView

#: A batch: name -> per-example array (``x``/``y``, ``tokens``, several inputs).
Batch = Mapping[str, jax.Array]

#: ``loss_fn(output, batch)``: one loss per example (any trailing axes are averaged), or
#: the batch's mean loss (a scalar).
LossFn = Callable[[Any, Batch], jax.Array]

#: ``metrics_fn(output, batch)``: named metrics, each one value per example (averaged) or
#: the batch's value (a scalar).
MetricsFn = Callable[[Any, Batch], Mapping[str, jax.Array]]


class LocalData(NamedTuple):
    """A client's examples: ``arrays`` (name -> ``(max_examples, ...)``, zero-padded) and
    ``size``, how many are real."""

    arrays: Batch
    size: jax.Array

    def take(self, index: jax.Array) -> Batch:
        """The examples at ``index``, from every array."""
        return {name: array[index] for name, array in self.arrays.items()}


class ClientUpdate(Protocol):
    """A client's local training; see the module's docstring.

    A client update may also have ``init_state(task, layers)``, a client's first state in
    place of a fresh optimizer state, and ``personalize(layers, state)``, the model a
    client is evaluated with (Ditto's personal model); the state is then kept across
    rounds (``keep_client_optimizer_state``).
    """

    def __call__(
        self, start: FlatView, opt_state: Any, data: LocalData, key: jax.Array, steps: int, task: Task
    ) -> tuple[FlatView, Any, Mapping[str, jax.Array]]: ...


def classification_loss(output: jax.Array, batch: Batch) -> jax.Array:
    """Softmax cross-entropy of the logits ``output`` against the integer labels ``batch["y"]``."""
    return optax.softmax_cross_entropy_with_integer_labels(output, batch["y"])


def classification_metrics(output: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    """``accuracy``: whether the largest logit is the label."""
    return {"accuracy": jnp.argmax(output, axis=-1) == batch["y"]}


def features(batch: Batch) -> Any:
    """The model's input: ``batch["x"]``."""
    return batch["x"]


@dataclasses.dataclass(frozen=True)
class Task:
    """The model and what training means for it, as pure functions over flat views.

    Attributes:
      apply: ``apply(layers, inputs, train) -> (output, layers as the call left them)``.
      trainable: the names of the layers gradient descent moves.
      loss_fn: see :data:`LossFn`.
      metrics_fn: see :data:`MetricsFn`.
      input_fn: the model's input from a batch.
      optimizer: the client optimizer.
      batch_size: examples per local step.
    """

    apply: Callable[[FlatView, Any, bool], tuple[Any, FlatView]]
    trainable: tuple[str, ...]
    loss_fn: LossFn
    metrics_fn: MetricsFn
    input_fn: Callable[[Batch], Any]
    optimizer: optax.GradientTransformation
    batch_size: int

    def init_optimizer(self, layers: FlatView) -> Any:
        """A fresh client optimizer state for ``layers``' trainable ones."""
        return self.optimizer.init(self.params(layers))

    def params(self, layers: FlatView) -> FlatView:
        """The trainable layers of ``layers``."""
        return FlatView((name, layers[name]) for name in self.trainable)

    def batch_index(self, key: jax.Array, count: jax.Array) -> jax.Array:
        """The example indices of one local step's batch, drawn from ``[0, count)``."""
        return jax.random.randint(key, (self.batch_size,), 0, count)

    def loss(self, layers: FlatView, batch: Batch) -> tuple[jax.Array, FlatView]:
        """The training loss of ``layers`` on ``batch`` (the mean of ``loss_fn``), and the
        layers as the forward pass left them (BatchNorm statistics move)."""
        output, moved = self.apply(layers, self.input_fn(batch), True)
        return jnp.mean(self.loss_fn(output, batch)), moved

    def step(
        self,
        layers: FlatView,
        opt_state: Any,
        batch: Batch,
        *,
        penalty: Callable[[FlatView], jax.Array] | None = None,
        only: Collection[str] | None = None,
    ) -> tuple[FlatView, Any, jax.Array]:
        """One client optimizer step on ``batch``: the new layers, optimizer state and the
        batch's loss (before the step).

        Args:
          penalty: a term added to the loss, of the trainable layers (FedProx's proximal
            term, Ditto's pull towards the global model).
          only: move only these trainable layers (FedRep's head, then its body); the
            others keep their values.
        """
        params = self.params(layers)

        def objective(params: FlatView) -> tuple[jax.Array, FlatView]:
            loss, moved = self.loss(_with(layers, params), batch)
            return (loss if penalty is None else loss + penalty(params)), moved

        (loss, moved), grads = jax.value_and_grad(objective, has_aux=True)(params)  # pyright: ignore[reportUnknownMemberType]
        updates, opt_state = self.optimizer.update(grads, opt_state, params)
        if only is not None:
            moving = cast(FlatView, updates)
            updates = FlatView(
                (name, value if name in only else jnp.zeros_like(value)) for name, value in moving.items()
            )
        params = cast(FlatView, optax.apply_updates(params, updates))
        return _with(moved, params), opt_state, loss

    def evaluate(self, layers: FlatView, data: LocalData) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Mean loss and metrics of ``layers`` over ``data``'s ``count`` real examples."""
        output, _ = self.apply(layers, self.input_fn(data.arrays), False)
        first = next(iter(data.arrays.values()))
        valid = jnp.arange(first.shape[0]) < data.size
        count = jnp.maximum(data.size, 1).astype(jnp.float32)

        def mean(values: jax.Array) -> jax.Array:
            return jnp.sum(jnp.where(valid, values, 0)) / count

        loss = mean(_per_example(self.loss_fn, output, data.arrays))
        metrics = _per_example_metrics(self.metrics_fn, output, data.arrays)
        return loss, {name: mean(values) for name, values in metrics.items()}


def local_training(
    start: FlatView, opt_state: Any, data: LocalData, key: jax.Array, steps: int, task: Task
) -> tuple[FlatView, Any, dict[str, jax.Array]]:
    """The default client update: ``steps`` steps of the client optimizer, each on a batch
    drawn with replacement from the client's examples (:func:`train_steps`); its metric is
    the mean training loss."""
    layers, opt_state, losses = train_steps(start, opt_state, data, key, steps, task)
    return layers, opt_state, {"loss": jnp.mean(losses)}


def train_steps(
    start: FlatView,
    opt_state: Any,
    data: LocalData,
    key: jax.Array,
    steps: int,
    task: Task,
    *,
    penalty: Callable[[FlatView], jax.Array] | None = None,
    only: Collection[str] | None = None,
) -> tuple[FlatView, Any, jax.Array]:
    """``steps`` calls of :meth:`Task.step` from ``start``, each on a batch drawn with
    replacement from ``data`` (every step's indices drawn up front from
    ``split(key, steps)``, each step gathering its own batch); returns the layers, the
    optimizer state and each step's loss. ``penalty`` and ``only`` go to every step."""
    draw: Callable[[jax.Array], jax.Array] = lambda step_key: task.batch_index(step_key, data.size)
    indices = jax.vmap(draw)(jax.random.split(key, steps))

    def step(carry: tuple[FlatView, Any], index: jax.Array) -> tuple[tuple[FlatView, Any], jax.Array]:
        layers, state = carry
        layers, state, loss = task.step(layers, state, data.take(index), penalty=penalty, only=only)
        return (layers, state), loss

    (layers, opt_state), losses = jax.lax.scan(step, (start, opt_state), indices)
    return layers, opt_state, losses


def _per_example(function: Callable[[Any, Batch], jax.Array], output: Any, batch: Batch) -> jax.Array:
    """``function``'s value per example: its own when it gives one per example (any
    trailing axes averaged), else its value on each example as a batch of one."""
    values = jnp.asarray(function(output, batch))
    if values.ndim == 0:
        return _one_by_one(lambda o, b: jnp.asarray(function(o, b)), output, batch)
    return values if values.ndim == 1 else values.reshape(values.shape[0], -1).mean(axis=1)


def _per_example_metrics(function: MetricsFn, output: Any, batch: Batch) -> dict[str, jax.Array]:
    """Each metric of ``function`` per example, as :func:`_per_example` reads one."""
    return {
        name: _per_example(lambda o, b, name=name: function(o, b)[name], output, batch)
        for name in function(output, batch)
    }


def _one_by_one(function: Callable[[Any, Batch], jax.Array], output: Any, batch: Batch) -> jax.Array:
    """``function`` on each example as a batch of one."""
    one: Callable[[Any], Any] = lambda value: value[None]

    def single(example_output: Any, example: Batch) -> jax.Array:
        return function(jax.tree.map(one, example_output), jax.tree.map(one, example))

    return jax.vmap(single)(output, batch)


def _with(layers: FlatView, replacements: Mapping[str, Any]) -> FlatView:
    return FlatView((name, replacements[name] if name in replacements else value) for name, value in layers.items())
