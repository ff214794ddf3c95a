"""Federated methods built on the simulation's hooks: each a :class:`Recipe`, the exchanger
and the client update it needs.

Run one with ``Simulation(recipe.exchanger, config, data, module, **recipe.options)``:

* :func:`fedavg`: every layer exchanged, plain local training (the baseline);
* :func:`fedprox`: FedAvg with a proximal term ``mu / 2 * ||w - w_start||^2`` in the local
  loss (Li et al., 2020);
* :func:`fedper`: the body exchanged, the head kept local (Arivazhagan et al., 2019);
* :func:`fedrep`: the body exchanged; each round the head trains first with the body
  frozen, then the body with the head frozen (Collins et al., 2021);
* :func:`fedbn`: every layer but the BatchNorm ones exchanged (Li et al., 2021);
* :func:`ditto`: every layer exchanged; each client also trains a personal model pulled
  towards the global one, and is evaluated with it (Li et al., 2021).

A recipe is data: its exchanger is an :class:`~jaxlayerx.simulation.ExchangerSpec`, its
client update a pure function (:mod:`jaxlayerx.simulation.task`), so that a new method is
a new function of the same form.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp

from jaxlayerx.base import FlatView
from jaxlayerx.simulation.exchange import ExchangerSpec
from jaxlayerx.simulation.task import ClientUpdate, LocalData, Task, train_steps

__all__ = ["Recipe", "ditto", "fedavg", "fedbn", "fedper", "fedprox", "fedrep"]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A federated method: what is exchanged and how a client trains.

    Attributes:
      name: the method's name, for tables.
      exchanger: what clients send and pull.
      client_update: the local training; ``None`` for the default
        (:func:`~jaxlayerx.simulation.task.local_training`).
      keep_client_state: whether a client's state (its optimizer's, or what the method
        keeps, as Ditto's personal model) carries over between its rounds.
    """

    name: str
    exchanger: ExchangerSpec
    client_update: ClientUpdate | None = None
    keep_client_state: bool = False

    @property
    def options(self) -> dict[str, Any]:
        """The :class:`~jaxlayerx.simulation.Simulation` keywords of the recipe: ``label``,
        ``client_update`` and, where the method keeps a state of its own (Ditto),
        ``keep_client_optimizer_state=True``."""
        options: dict[str, Any] = {"label": self.name, "client_update": self.client_update}
        if self.keep_client_state:  # else the caller's choice
            options["keep_client_optimizer_state"] = True
        return options


def fedavg() -> Recipe:
    """FedAvg: every layer exchanged, plain local training."""
    return Recipe("fedavg", ExchangerSpec("full"))


def fedprox(mu: float) -> Recipe:
    """FedProx: local training on ``loss + mu / 2 * ||w - w_start||^2`` over the trainable
    layers, ``w_start`` the round's starting model; every layer exchanged.

    Raises:
      ValueError: ``mu`` is not a finite number >= 0.
    """
    _check_strength("mu", mu)

    def update(
        start: FlatView, opt_state: Any, data: LocalData, key: jax.Array, steps: int, task: Task
    ) -> tuple[FlatView, Any, dict[str, jax.Array]]:
        penalty = _proximal(task.params(start), mu)
        layers, opt_state, losses = train_steps(start, opt_state, data, key, steps, task, penalty=penalty)
        return layers, opt_state, {"loss": jnp.mean(losses)}

    return Recipe(f"fedprox({mu:g})", ExchangerSpec("full"), update)


def fedper(body: Sequence[str]) -> Recipe:
    """FedPer: the layers matching ``body`` (names or ``fnmatch`` globs, as
    ``ExchangerSpec("fixed", layers=...)``) exchanged, the others (the head) kept local;
    plain local training."""
    return Recipe("fedper", ExchangerSpec("fixed", layers=tuple(body)))


def fedrep(body: Sequence[str], head_steps: int) -> Recipe:
    """FedRep: the ``body`` layers exchanged; each round a client first trains its head
    (every trainable layer not in ``body``) for ``head_steps`` steps with the body frozen,
    then its body for the round's remaining steps with the head frozen. One optimizer state
    serves both phases.

    Raises:
      ValueError: ``head_steps`` is not a positive integer.
    """
    if not isinstance(cast(object, head_steps), int) or isinstance(head_steps, bool) or head_steps < 1:
        raise ValueError(f"head_steps must be a positive integer, got {head_steps!r}")
    patterns = tuple(body)

    def update(
        start: FlatView, opt_state: Any, data: LocalData, key: jax.Array, steps: int, task: Task
    ) -> tuple[FlatView, Any, dict[str, jax.Array]]:
        if steps <= head_steps:
            raise ValueError(f"fedrep needs more local steps ({steps}) than head steps ({head_steps})")
        in_body = {n for n in task.trainable if any(fnmatch.fnmatchcase(n, p) for p in patterns)}
        head = [n for n in task.trainable if n not in in_body]
        head_key, body_key = jax.random.split(key)
        layers, opt_state, head_losses = train_steps(start, opt_state, data, head_key, head_steps, task, only=head)
        layers, opt_state, body_losses = train_steps(
            layers, opt_state, data, body_key, steps - head_steps, task, only=sorted(in_body)
        )
        return layers, opt_state, {"loss": jnp.mean(body_losses), "head_loss": jnp.mean(head_losses)}

    return Recipe(f"fedrep({head_steps})", ExchangerSpec("fixed", layers=patterns), update)


def fedbn() -> Recipe:
    """FedBN: every layer but the BatchNorm ones (their scale, bias and statistics)
    exchanged; plain local training."""
    return Recipe("fedbn", ExchangerSpec("exclude-bn"))


def ditto(lam: float) -> Recipe:
    """Ditto: every layer exchanged and trained as in FedAvg; each client also keeps a
    personal model, trained each round for the same steps on
    ``loss + lam / 2 * ||v - w_start||^2`` (``w_start`` the global model the round started
    from), and is evaluated with it. The client's state, kept across rounds, is
    ``(global optimizer state, personal optimizer state, personal model)``.

    Raises:
      ValueError: ``lam`` is not a finite number >= 0.
    """
    _check_strength("lam", lam)
    return Recipe(f"ditto({lam:g})", ExchangerSpec("full"), _Ditto(lam), keep_client_state=True)


@dataclasses.dataclass(frozen=True)
class _Ditto:
    lam: float

    def init_state(self, task: Task, layers: FlatView) -> tuple[Any, Any, FlatView]:
        return task.init_optimizer(layers), task.init_optimizer(layers), FlatView(layers)

    def personalize(self, layers: FlatView, state: tuple[Any, Any, FlatView]) -> FlatView:
        return state[2]

    def __call__(
        self, start: FlatView, opt_state: Any, data: LocalData, key: jax.Array, steps: int, task: Task
    ) -> tuple[FlatView, Any, dict[str, jax.Array]]:
        global_state, personal_state, personal = opt_state
        global_key, personal_key = jax.random.split(key)
        layers, global_state, losses = train_steps(start, global_state, data, global_key, steps, task)
        penalty = _proximal(task.params(start), self.lam)
        personal, personal_state, personal_losses = train_steps(
            personal, personal_state, data, personal_key, steps, task, penalty=penalty
        )
        metrics = {"loss": jnp.mean(losses), "personal_loss": jnp.mean(personal_losses)}
        return layers, (global_state, personal_state, personal), metrics


def _proximal(anchor: FlatView, strength: float) -> Any:
    """``strength / 2 * ||params - anchor||^2`` over the anchor's layers."""

    def penalty(params: FlatView) -> jax.Array:
        return 0.5 * strength * sum((jnp.sum(jnp.square(params[n] - anchor[n])) for n in params), jnp.zeros(()))

    return penalty


def _check_strength(name: str, value: float) -> None:
    number = cast(object, value)
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not 0 <= value < float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
