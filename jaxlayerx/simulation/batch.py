"""Several runs of one round program at once: seeds and swept parameters under one ``vmap``.

Runs that differ only in their seed (the split, the model's initialisation, the sampling
and the batches) and in the numeric parameter of their send rule (a budget fraction, an
exchange percentage, a sparsity level, a threshold) run the same compiled round: the
parameter reaches the send mask as a traced argument (the exchanger's ``mask_argument``).
:func:`run_together` stacks such runs, the *members*, on a leading axis and runs each
round once for all of them, under ``jax.vmap``: one compilation serves every member.

Each member's records are those of its own run (:meth:`Simulation.run`): the same
sampling, batches and bytes, and the same numbers to float rounding (the batched program
is another XLA program; reductions may round differently). Data of members whose splits
have different sizes is zero-padded to the largest, which changes nothing but the length
of the arrays: batches are drawn from each client's real examples, and evaluations count
real examples only.

Memory: a batch of members holds every member's state, data and round outputs at once.
Members are grouped so that a group's estimate, twice the bytes of one member's state,
data and round outputs (:func:`member_bytes`, from shapes alone) times the number of
members, stays within ``memory_budget``; groups run one after another. The default budget
is a quarter of the device's memory (of the host's, on CPU). A single member that does not
fit runs alone.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from jaxlayerx.aggregation import compiled_masked_fedavg
from jaxlayerx.simulation.accounting import metrics_record
from jaxlayerx.simulation.engine import Simulation
from jaxlayerx.simulation.round import RoundProgram
from jaxlayerx.simulation.state import ClientUpdates, RoundOutput, SimulationState

__all__ = ["default_memory_budget", "member_bytes", "run_together"]

#: A member's estimated memory is its state, data and round outputs times this factor.
MEMORY_FACTOR = 2

Progress = Callable[[int, list[dict[str, Any]]], None]


def run_together(
    simulations: Sequence[Simulation],
    progress: Progress | None = None,
    *,
    memory_budget: int | None = None,
) -> list[list[dict[str, Any]]]:
    """Runs ``simulations`` (members of one round program) together; returns each one's
    records, as :meth:`Simulation.run` would.

    Args:
      simulations: runs that share their round program: the same kind of exchanger and
        options but for its numeric parameter (built from :class:`ExchangerSpec`\\s), the
        same configuration but for the seed, model, number of clients, functions and
        optimizers (see :func:`check_same_program`).
      progress: called after each round with the round index and the members' records.
      memory_budget: bytes a group of members may take (default
        :func:`default_memory_budget`); the members run in groups that fit.

    Raises:
      ValueError: the simulations do not share their round program (naming what differs).
    """
    if not simulations:
        return []
    check_same_program(simulations)
    budget = default_memory_budget() if memory_budget is None else memory_budget
    per_group = max(1, budget // max(1, MEMORY_FACTOR * member_bytes(simulations[0])))
    if len(simulations) == 1 or simulations[0].program.client_sharding is not None:
        per_group = 1  # one member runs its own program; sharded clients run one member at a time
    records: list[list[dict[str, Any]]] = []
    for start in range(0, len(simulations), per_group):
        group = simulations[start : start + per_group]
        records.extend(_run_group(group, progress) if len(group) > 1 else [group[0].run(_single(progress))])
    return records


def check_same_program(simulations: Sequence[Simulation]) -> None:
    """Raises ``ValueError`` unless every simulation runs the first one's round program."""
    first = simulations[0]
    for simulation in simulations[1:]:
        for what, mine, theirs in _program_parts(first, simulation):
            if mine != theirs:
                raise ValueError(
                    f"{simulation.label!r} cannot run together with {first.label!r}: their {what} differ "
                    f"({theirs!r} against {mine!r}); run them separately"
                )


def _program_parts(first: Simulation, other: Simulation) -> list[tuple[str, Any, Any]]:
    def key(simulation: Simulation) -> Any:
        spec = simulation.spec
        return None if spec is None else spec.program_key

    if first.spec is None or other.spec is None:
        return [("exchangers (not built from ExchangerSpecs)", id(first.exchanger), id(other.exchanger))]

    def settings(simulation: Simulation) -> Any:
        return dataclasses.replace(simulation.config, seed=0)

    def examples(simulation: Simulation) -> Any:
        return {name: (array.shape[2:], array.dtype) for name, array in simulation.data.train.items()}

    parts: list[tuple[str, Callable[[Simulation], Any]]] = [
        ("exchangers, but for their numeric parameter", key),
        ("settings, but for the seed", settings),
        ("models", lambda simulation: simulation.module),
        ("numbers of clients", lambda simulation: simulation.data.num_clients),
        ("example shapes and dtypes", examples),
        ("functions and optimizers", lambda simulation: simulation.functions),
        ("wires", lambda simulation: simulation.wire),
    ]
    return [(what, read(first), read(other)) for what, read in parts]


def member_bytes(simulation: Simulation) -> int:
    """The bytes one member holds at once: its state and data, and a round's outputs (the
    sampled clients' starting, trained and sent layers and their masks, about four models
    each); from shapes alone, nothing runs."""
    state = jax.eval_shape(simulation.init_state)  # pyright: ignore[reportUnknownMemberType]
    model = _nbytes(simulation.initial_layers)
    return _nbytes((state, simulation.arrays)) + 4 * simulation.clients_per_round * model


def _nbytes(tree: Any) -> int:
    leaves: list[Any] = jax.tree.leaves(tree)
    return int(sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in leaves))


def default_memory_budget() -> int:
    """A quarter of the first device's memory limit, or of the host's memory on CPU."""
    device: Any = jax.devices()[0]
    stats: dict[str, int] = device.memory_stats() or {}
    limit = stats.get("bytes_limit")
    if limit is None:
        limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(limit) // 4


def _single(progress: Progress | None) -> Callable[[int, dict[str, Any]], None] | None:
    if progress is None:
        return None
    return lambda round_index, record: progress(round_index, [record])


def _run_group(group: Sequence[Simulation], progress: Progress | None) -> list[list[dict[str, Any]]]:
    first = group[0]
    program = first.program
    arrays = _stacked_arrays([simulation.arrays for simulation in group])
    train, n_train, *tests = arrays
    batch_keys = jnp.stack([simulation.batch_key for simulation in group])
    arguments = _stacked_arguments([simulation.mask_argument for simulation in group])
    init, clients_fn, average, finish = _programs(program, first.config.weighted, first.config.average_over)
    state = cast(SimulationState, init(_stack([simulation.initial_layers for simulation in group])))
    records: list[list[dict[str, Any]]] = [[] for _ in group]
    for round_index in range(1, first.config.rounds + 1):
        start = time.perf_counter()
        clients = np.stack([simulation.sample_clients(round_index) for simulation in group])
        index = np.int32(round_index)
        updates = cast(ClientUpdates, clients_fn(state, index, clients, batch_keys, train, n_train, arguments))
        averages, sent = average(updates.values, updates.masks, updates.counts, state.global_layers)
        output = cast(
            RoundOutput,
            finish(state, index, clients, updates, averages, sent, batch_keys, train, n_train, *tests),
        )
        metrics, sampled = jax.device_get((output.metrics, output.clients))  # one fetch a round
        seconds = (time.perf_counter() - start) / len(group)
        round_records: list[dict[str, Any]] = []
        for member, simulation in enumerate(group):
            member_metrics = {name: np.asarray(value)[member] for name, value in metrics.items()}
            record = metrics_record(
                round_index, member_metrics, np.asarray(sampled)[member], simulation.accounting, simulation.data.n_test
            )
            record["wall_seconds"] = seconds
            records[member].append(record)
            round_records.append(record)
        if progress is not None:
            progress(round_index, round_records)
        state = output.state
    return records


@functools.lru_cache(maxsize=32)
def _programs(program: RoundProgram, weighted: bool, over: str) -> tuple[Callable[..., Any], ...]:
    """The round program's functions under ``jit(vmap(...))`` over the member axis: made
    once per program, so that later runs of it reuse their compilations."""

    def average(values: Any, masks: Any, counts: Any, fallback: Any) -> Any:
        return compiled_masked_fedavg(values, masks, counts, fallback, weighted=weighted, over=over)  # pyright: ignore[reportUnknownVariableType]

    def batched(function: Callable[..., Any], in_axes: Any = 0) -> Callable[..., Any]:
        return jax.jit(jax.vmap(function, in_axes=in_axes))  # pyright: ignore[reportUnknownMemberType]

    return (
        batched(program.init_state),
        batched(program.clients, (0, None, 0, 0, 0, 0, 0)),
        batched(average),
        batched(program.finish, (0, None, *(0,) * 11)),
    )


def _stack(trees: Sequence[Any]) -> Any:
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def _stacked_arguments(arguments: Sequence[Any]) -> Any:
    if arguments[0] is None:
        return None
    return np.stack([np.asarray(argument) for argument in arguments])


def _stacked_arrays(members: Sequence[tuple[Any, ...]]) -> tuple[Any, ...]:
    """Each member's ``(train, n_train, test, n_test, global_test, n_global_test)`` stacked on
    a leading member axis, the example axes zero-padded to the longest member's."""
    train, n_train, test, n_test, global_test, n_global_test = zip(*members)
    return (
        _padded_stack(train, axis=1),
        jnp.stack(n_train),
        _padded_stack(test, axis=1),
        jnp.stack(n_test),
        _padded_stack(global_test, axis=0),
        jnp.stack([jnp.asarray(n) for n in n_global_test]),
    )


def _padded_stack(parts: Sequence[dict[str, Any]], axis: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in parts[0]:
        arrays = [part[name] for part in parts]
        length = max(array.shape[axis] for array in arrays)
        padded: list[jax.Array] = []
        for array in arrays:
            widths = [(0, 0)] * array.ndim
            widths[axis] = (0, length - array.shape[axis])
            padded.append(jnp.pad(array, widths))  # pyright: ignore[reportUnknownMemberType]
        out[name] = jnp.stack(padded)
    return out
