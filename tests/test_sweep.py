"""Sweeps in one compiled program: a send rule's parameter as a traced argument, and
seeds and swept values run together (jaxlayerx.simulation.batch).

References: masks against small numpy versions of each rule, and batched runs against
the same simulations run one by one (Simulation.run)."""

from __future__ import annotations

import collections
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import slow

from jaxlayerx import (
    DynamicLayerExchanger,
    LayerSelectionFunctionConstructor,
    SparseCooParameterExchanger,
    budget_mask,
    percentage_mask,
)
from jaxlayerx.scores import SCORE_FUNCTIONS
from jaxlayerx.selection import budget_capacity, budget_mask_at, percentage_mask_at
from jaxlayerx.simulation import batch
from jaxlayerx.simulation.config import SimulationConfig
from jaxlayerx.simulation.data import make_client_data
from jaxlayerx.simulation.datasets import load_dataset
from jaxlayerx.simulation.engine import Simulation
from jaxlayerx.simulation.exchange import ExchangerSpec
from jaxlayerx.simulation.report import takeaway
from jaxlayerx.sparse_selection import score_threshold_at, weights_to_keep

SHAPES = {"a/kernel": (6, 5), "a/bias": (5,), "b/kernel": (5, 3), "b/bias": (3,), "c/scale": ()}


def _layers(seed: int) -> collections.OrderedDict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    return collections.OrderedDict((n, jnp.asarray(rng.normal(size=s), jnp.float32)) for n, s in SHAPES.items())


# -- the rules' traced arguments ------------------------------------------------------------


def test_percentage_mask_at_takes_the_count_largest_ties_to_the_earlier_layer():
    norms = collections.OrderedDict((name, jnp.float32(v)) for name, v in zip("abcdef", [3, 1, 3, 2, 1, 5]))
    masks = jax.jit(jax.vmap(lambda count: percentage_mask_at(norms, count)))(jnp.arange(7))
    for count in range(7):
        # numpy: a stable sort of the negated drifts, then the first `count`.
        expected = np.zeros(6, bool)
        expected[np.argsort(-np.array([3, 1, 3, 2, 1, 5]), kind="stable")[:count]] = True
        assert [bool(masks[n][count]) for n in norms] == expected.tolist(), count
    for percentage in (0.1, 0.28, 0.5, 1.0):
        count = math.ceil(6 * percentage)
        assert {n: bool(v) for n, v in percentage_mask(norms, percentage).items()} == {
            n: bool(masks[n][count]) for n in norms
        }


def test_budget_mask_at_a_traced_capacity_is_budget_mask_at_each_fraction():
    current, initial = _layers(1), _layers(2)
    fractions = [0.05, 0.2, 1 / 3, 0.5, 0.9, 1.0]
    capacities = jnp.asarray([budget_capacity(current, f) for f in fractions])
    # Sizes 120, 20, 60, 12, 4 bytes: gcd 4, so the capacity counts 4-byte units of 216 bytes,
    # the fraction taken exactly (the float 1/3 is a little below a third: 71 bytes, 17 units).
    assert capacities.tolist() == [math.floor(Fraction(f) * 216) // 4 for f in fractions]
    assert capacities.tolist()[2] == 17
    step = jax.jit(lambda c: budget_mask_at(current, initial, c))
    for fraction, capacity in zip(fractions, capacities):
        assert {n: bool(v) for n, v in step(capacity).items()} == {
            n: bool(v) for n, v in budget_mask(current, initial, fraction).items()
        }
    assert step._cache_size() == 1  # one program for every capacity


def test_score_threshold_at_is_the_kth_largest_score_for_every_k():
    scores = _layers(3)
    flat = np.sort(np.concatenate([np.ravel(v) for v in scores.values()]))[::-1]
    ks = jnp.arange(1, flat.size + 1)
    thresholds = jax.jit(jax.vmap(lambda k: score_threshold_at(scores, k)))(ks)
    np.testing.assert_array_equal(np.asarray(thresholds), flat)


@pytest.mark.parametrize(
    "make",
    [
        lambda v: DynamicLayerExchanger(LayerSelectionFunctionConstructor(v, 0.5).select_by_threshold()),
        lambda v: DynamicLayerExchanger(
            LayerSelectionFunctionConstructor(1e-4, v, measure="rms").select_by_percentage()
        ),
        lambda v: DynamicLayerExchanger(LayerSelectionFunctionConstructor(1e-4, 0.5).select_by_budget(v)),
        slow(lambda v: SparseCooParameterExchanger(v, SCORE_FUNCTIONS["largest-magnitude-change"])),
    ],
    ids=["threshold", "percentage", "budget", "sparse"],
)
def test_send_mask_at_serves_every_value_of_the_parameter_from_one_program(make):
    current, reference = _layers(4), _layers(5)
    values = [0.02, 0.1, 0.3, 0.6]
    exchangers = [make(value) for value in values]
    arguments = np.stack([np.asarray(e.mask_argument(current)) for e in exchangers])
    swept = jax.jit(jax.vmap(lambda a: exchangers[0].send_mask_at(current, reference, a)))
    masks = swept(arguments)
    for row, exchanger in enumerate(exchangers):
        expected = exchanger.send_mask(current, reference)
        for name in current:
            np.testing.assert_array_equal(np.asarray(masks[name][row]), np.asarray(expected[name]), err_msg=name)
    one_by_one = jax.jit(lambda a: exchangers[0].send_mask_at(current, reference, a))
    for argument in arguments:
        one_by_one(argument)
    assert one_by_one._cache_size() == 1


def test_the_sparse_argument_is_fl4healths_k():
    layers = _layers(0)
    total = sum(math.prod(s) for s in SHAPES.values())
    for level in (0.01, 0.1, 0.28, 1.0):
        assert int(weights_to_keep(layers, level)) == math.ceil(total * level)


# -- runs together equal runs one by one ---------------------------------------------------

SETTINGS = {"rounds": 3, "local_steps": 3, "batch_size": 8}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _simulation(digits, spec: str, seed: int = 0, **settings) -> Simulation:
    data = make_client_data(digits.x, digits.y, 4, beta=0.5, seed=seed)
    return Simulation(ExchangerSpec.parse(spec), SimulationConfig(seed=seed, **{**SETTINGS, **settings}), data)


def _assert_same_runs(together, separate):
    assert len(together) == len(separate)
    for mine, theirs in zip(together, separate):
        for a, b in zip(mine, theirs, strict=True):
            for key in ("round", "clients", "upload_bytes", "download_bytes", "layers_sent", "client_upload_bytes"):
                assert a[key] == b[key], key
            for key in ("global_loss", "global_accuracy", "local_accuracy_mean"):
                np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.slow
def test_seeds_run_together_equal_their_runs_one_by_one(digits):
    specs = ["dynamic-budget(0.5, ef)"] * 3
    simulations = [_simulation(digits, spec, seed) for seed, spec in enumerate(specs)]
    # The seeds' splits differ in size: the members' data are padded to the longest.
    assert len({s.data.train["x"].shape[1] for s in simulations}) > 1
    together = batch.run_together(simulations)
    _assert_same_runs(together, [_simulation(digits, spec, seed).run() for seed, spec in enumerate(specs)])
    program = simulations[0].program
    clients = batch._programs(program, True, "senders")[1]
    assert clients._cache_size() == 1  # one compilation for the three seeds


@pytest.mark.parametrize(
    "specs",
    [
        slow(["dynamic-budget(0.1, ef)", "dynamic-budget(0.9, ef)"]),
        slow(["dynamic-percentage(0.3, rms)", "dynamic-percentage(0.8, rms)"]),
        slow(["dynamic-threshold(0.0001, l2/size)", "dynamic-threshold(0.01, l2/size)"]),
        slow(["sparse-largest-magnitude-change(0.05, ef, int8)", "sparse-largest-magnitude-change(0.2, ef, int8)"]),
    ],
    ids=["budget", "percentage", "threshold", "sparse"],
)
def test_a_sweep_runs_in_one_program_and_equals_its_runs_one_by_one(digits, specs):
    simulations = [_simulation(digits, spec, rounds=2) for spec in specs]
    together = batch.run_together(simulations)
    _assert_same_runs(together, [_simulation(digits, spec, rounds=2).run() for spec in specs])
    assert len({r[-1]["upload_bytes"] for r in together}) == len(specs)  # the values did differ
    clients = batch._programs(simulations[0].program, True, "senders")[1]
    assert clients._cache_size() == 1


@pytest.mark.slow
def test_a_memory_budget_runs_members_in_groups_that_fit(digits, monkeypatch):
    specs = ["dynamic-budget(0.25, ef)", "dynamic-budget(0.5, ef)", "dynamic-budget(0.75, ef)"]
    simulations = [_simulation(digits, spec, rounds=1) for spec in specs]
    sizes: list[int] = []
    run_group = batch._run_group

    def recorded(group, progress):
        sizes.append(len(group))
        return run_group(group, progress)

    monkeypatch.setattr(batch, "_run_group", recorded)
    need = batch.MEMORY_FACTOR * batch.member_bytes(simulations[0])
    grouped = batch.run_together(simulations, memory_budget=2 * need)
    assert sizes == [2]  # two together, then the third alone (its own program)
    alone = batch.run_together(simulations, memory_budget=need - 1)
    assert sizes == [2]  # a member that does not fit runs alone
    _assert_same_runs(grouped, alone)


def test_runs_of_different_programs_are_refused(digits):
    base = _simulation(digits, "dynamic-budget(0.5, ef)")
    cases = [
        (_simulation(digits, "dynamic-budget(0.5, ef)", rounds=2), "settings, but for the seed"),
        (_simulation(digits, "dynamic-budget(0.5)"), "exchangers, but for their numeric parameter"),
        (_simulation(digits, "dynamic-percentage(0.5, rms, ef)"), "exchangers, but for their numeric parameter"),
    ]
    for other, needle in cases:
        with pytest.raises(ValueError, match=needle) as info:
            batch.run_together([base, other])
        assert repr(other.label) in str(info.value)


@pytest.mark.slow
def test_a_budget_sweep_on_the_command_line_runs_in_one_program(tmp_path, monkeypatch):
    from jaxlayerx.simulation.cli import main

    groups: list[list[str]] = []
    run_together = batch.run_together

    def recorded(simulations, progress=None, **options):
        groups.append([s.label for s in simulations])
        return run_together(simulations, progress, **options)

    monkeypatch.setattr(batch, "run_together", recorded)
    specs = "full,dynamic-budget(0.25, ef),dynamic-budget(0.5, ef)"
    argv = ["compare", "--exchangers", specs, "--repeat", "2", "--out", str(tmp_path / "run"), "--no-progress"]
    argv += ["--clients", "3", "--rounds", "1", "--local-steps", "2", "--batch-size", "8", "--no-compile-cache"]
    assert main(argv) == 0
    assert groups == [
        ["full", "full"],
        ["dynamic-budget(0.25, ef)", "dynamic-budget(0.5, ef)"] * 2,
    ]


# -- the takeaway ----------------------------------------------------------------------------


def _history(accuracy: float, upload: int) -> list[dict[str, float]]:
    return [
        {
            "round": 1,
            "global_accuracy": accuracy,
            "local_accuracy_mean": accuracy,
            "upload_bytes": upload,
            "download_bytes": upload,
            "layers_sent": [1],
            "wall_seconds": 0.1,
        }
    ]


def test_the_takeaway_names_the_cheapest_exchanger_within_a_point_of_full():
    runs = {
        "full": _history(0.964, 6_000_000),
        "a": _history(0.961, 1_800_000),  # within a point, 30%
        "b": _history(0.950, 300_000),  # cheaper, but 1.4 points below
        "c": _history(0.970, 2_400_000),  # better, but dearer
        "fedbn": _history(0.965, 1_000_000),  # personalized: left out
    }
    assert takeaway(runs, exclude=["fedbn"]) == "a: 0.961 global accuracy (full 0.964) for 30% of full's upload"
    assert takeaway({"full": runs["full"], "b": runs["b"]}) == (
        "no exchanger came within 1 point of full's 0.964 global accuracy; the closest, b, reached 0.950"
    )
    assert takeaway({"a": runs["a"], "b": runs["b"]}) is None  # no full to compare with
