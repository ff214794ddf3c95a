"""The recipes of jaxlayerx/recipes.py (FedProx, FedPer, FedRep, Ditto, FedBN) against
plain-JAX SGD loops written here.

Every federation is tiny (4 clients, 1-2 rounds, 4 local steps of plain SGD, a Dense ->
Dense MLP or conftest's Dense -> BatchNorm -> Dense); each recipe's run is a module
fixture. The references draw the batches with the documented keys: client ``c`` of round
``r`` from ``split(fold_in(batch_key, r), C)[c]``, ``batch_key = split(key(seed))[1]``;
``train_steps`` draws step ``i``'s batch from ``split(key, steps)[i]``.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import LinenNet

from jaxlayerx import recipes
from jaxlayerx.simulation import Simulation, SimulationConfig, make_client_data

SEED = 0
CLIENTS = 4
STEPS = 4
HEAD_STEPS = 2
BATCH = 8
LR = 0.1
CONFIG = SimulationConfig(rounds=2, local_steps=STEPS, batch_size=BATCH, seed=SEED)
ONE_ROUND = SimulationConfig(rounds=1, local_steps=STEPS, batch_size=BATCH, seed=SEED)

D0K, D0B = "params/Dense_0/kernel", "params/Dense_0/bias"
D1K, D1B = "params/Dense_1/kernel", "params/Dense_1/bias"
BODY = ("params/Dense_0/*",)
HEAD = (D1B, D1K)
BN_LAYERS = (
    "batch_stats/BatchNorm_0/mean",
    "batch_stats/BatchNorm_0/var",
    "params/BatchNorm_0/bias",
    "params/BatchNorm_0/scale",
)

# float32 training in the simulation against float32 plain-JAX loops: a few ulps per step.
TOL = {"rtol": 2e-5, "atol": 2e-6}


class MLP(nn.Module):
    """Dense(5) -> relu -> Dense(2), called as ``module(x, train=...)``."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        hidden = nn.relu(nn.Dense(5)(x))  # Dense_0, the body
        return nn.Dense(2)(hidden)  # Dense_1, the head


# --- the independent references -----------------------------------------------------------


def ref_mlp(layers, x, train):
    """MLP in plain JAX; no state moves."""
    hidden = jnp.maximum(x @ layers[D0K] + layers[D0B], 0.0)
    return hidden @ layers[D1K] + layers[D1B], {}


def ref_bn_net(layers, x, train):
    """conftest's LinenNet in plain JAX: Dense, BatchNorm (eps 1e-5, momentum 0.99, the
    batch's biased variance in training), Dense; returns the logits and the moved statistics."""
    mean_name, var_name = BN_LAYERS[0], BN_LAYERS[1]
    h = x @ layers["params/Dense_0/kernel"] + layers["params/Dense_0/bias"]
    if train:
        mean = h.mean(axis=0)
        var = jnp.maximum((h * h).mean(axis=0) - mean * mean, 0.0)
        moved = {
            mean_name: 0.99 * layers[mean_name] + 0.01 * mean,
            var_name: 0.99 * layers[var_name] + 0.01 * var,
        }
    else:
        mean, var, moved = layers[mean_name], layers[var_name], {}
    h = (h - mean) * jax.lax.rsqrt(var + 1e-5) * layers["params/BatchNorm_0/scale"] + layers["params/BatchNorm_0/bias"]
    return h @ layers["params/Dense_1/kernel"] + layers["params/Dense_1/bias"], moved


def ref_xent(logits, y):
    """Mean softmax cross-entropy against integer labels."""
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0])


@functools.partial(jax.jit, static_argnames=("forward", "moving"))
def ref_step(layers, xb, yb, anchor, strength, *, forward, moving):
    """One plain SGD step on ``xent + strength / 2 * ||params - anchor||^2`` that moves only
    the ``moving`` params (the statistics move with the forward pass); the objective before it."""
    params = {name: value for name, value in layers.items() if name.startswith("params/")}

    def objective(p):
        logits, moved = forward({**layers, **p}, xb, True)
        proximal = sum(jnp.sum((p[name] - anchor[name]) ** 2) for name in p)
        return ref_xent(logits, yb) + strength / 2 * proximal, moved

    (loss, moved), grads = jax.value_and_grad(objective, has_aux=True)(params)
    new = {**layers, **moved}
    for name in moving:
        new[name] = params[name] - LR * grads[name]
    return new, loss


def ref_sgd(layers, data, c, key, steps, *, forward=ref_mlp, moving=None, anchor=None, strength=0.0):
    """``steps`` plain SGD steps of client ``c`` from ``layers``; step ``i`` on the examples
    ``randint(split(key, steps)[i], (BATCH,), 0, n_train[c])``. Returns the layers and the losses."""
    layers = {name: jnp.asarray(value, jnp.float32) for name, value in layers.items()}
    params = tuple(sorted(name for name in layers if name.startswith("params/")))
    moving = params if moving is None else tuple(sorted(moving))
    anchor = {name: layers[name] for name in params} if anchor is None else {n: jnp.asarray(anchor[n]) for n in params}
    x, y = jnp.asarray(data.train["x"][c]), jnp.asarray(data.train["y"][c])
    losses = []
    for step_key in jax.random.split(key, steps):
        index = jax.random.randint(step_key, (BATCH,), 0, int(data.n_train[c]))
        layers, loss = ref_step(
            layers, x[index], y[index], anchor, jnp.float32(strength), forward=forward, moving=moving
        )
        losses.append(float(loss))
    return to_np(layers), losses


def ref_round_keys(round_index):
    """engine.py / round.py: ``split(fold_in(split(key(seed))[1], r), C)``."""
    batch_key = jax.random.split(jax.random.key(SEED))[1]
    return jax.random.split(jax.random.fold_in(batch_key, round_index), CLIENTS)


def ref_average(trained, counts, names):
    """FedAvg of ``names`` weighted by the clients' training examples (in float64, then
    float32 as the model's layers)."""
    weights = np.asarray(counts, np.float64)
    return {
        name: np.float32(sum(w * np.asarray(t[name], np.float64) for w, t in zip(weights, trained)) / weights.sum())
        for name in names
    }


def ref_test_loss(forward, layers, data, c):
    n = int(data.n_test[c])
    logits, _ = forward({k: jnp.asarray(v, jnp.float32) for k, v in layers.items()}, data.test["x"][c, :n], False)
    return float(ref_xent(logits, jnp.asarray(data.test["y"][c, :n])))


def to_np(layers, client=None):
    """A (client-stacked) flat view as numpy float32 copies (one client's)."""
    return {name: np.array(value if client is None else value[client], np.float32) for name, value in layers.items()}


def assert_layers_close(got, expected, names=None):
    for name in names or expected:
        np.testing.assert_allclose(
            np.asarray(got[name], np.float64), np.asarray(expected[name], np.float64), err_msg=name, **TOL
        )


def difference(a, b, names=None):
    return max(float(np.max(np.abs(np.asarray(a[n], np.float64) - np.asarray(b[n], np.float64)))) for n in names or a)


# --- data and the runs ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data():
    """Two classes of 4 features split IID over 4 clients with unequal training counts."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(94, 4)).astype(np.float32)
    y = (x[:, 0] - x[:, 1] + 0.5 * x[:, 2] > 0).astype(np.int32)
    split = make_client_data({"x": x, "y": y}, num_clients=CLIENTS, beta=None, seed=1)
    assert len(set(split.n_train.tolist())) > 1, "unequal counts show the weighting"
    return split


def simulate(recipe, data, module=None, config=CONFIG):
    """The recipe's simulation with plain SGD; ``[(record, output)]`` of every round."""
    simulation = Simulation(
        recipe.exchanger, config, data, module or MLP(), client_optimizer=optax.sgd(LR), **recipe.options
    )
    return simulation, list(simulation.iterate())


@pytest.fixture(scope="module")
def initial(data):
    """The initial MLP (Linen's own init on engine.py's init key ``split(key(seed))[0]``)."""
    init_key = jax.random.split(jax.random.key(SEED))[0]
    variables = MLP().init(init_key, jnp.asarray(data.train["x"][0, :1]), train=False)
    dense = variables["params"]
    return {
        D0K: np.asarray(dense["Dense_0"]["kernel"]),
        D0B: np.asarray(dense["Dense_0"]["bias"]),
        D1K: np.asarray(dense["Dense_1"]["kernel"]),
        D1B: np.asarray(dense["Dense_1"]["bias"]),
    }


def check_initial(simulation, initial):
    got = to_np(simulation.initial_layers)
    assert sorted(got) == sorted(initial)
    for name in initial:
        np.testing.assert_array_equal(got[name], initial[name], err_msg=name)


# --- 1. FedProx ---------------------------------------------------------------------------------

MU = 1.0


@pytest.fixture(scope="module")
def fedprox_run(data):
    return simulate(recipes.fedprox(MU), data, config=ONE_ROUND)


def test_fedprox_round_equals_a_proximal_sgd_loop(data, initial, fedprox_run):
    simulation, ((record, output),) = fedprox_run
    check_initial(simulation, initial)
    keys = ref_round_keys(1)
    for c in range(CLIENTS):
        expected, _ = ref_sgd(initial, data, c, keys[c], STEPS, strength=MU)
        plain, _ = ref_sgd(initial, data, c, keys[c], STEPS)
        assert difference(expected, plain) > 1e-3, "mu is large enough to tell FedProx from FedAvg"
        got = to_np(output.trained_layers, c)
        assert_layers_close(got, expected)
        assert difference(got, plain) > 1e-3
    trained = [to_np(output.trained_layers, c) for c in range(CLIENTS)]
    assert_layers_close(to_np(output.state.global_layers), ref_average(trained, data.n_train, initial))
    assert len(record["train_loss"]) == CLIENTS


@pytest.mark.parametrize("mu", [-1.0, float("nan"), float("inf"), "a", True, None], ids=repr)
def test_fedprox_refuses_a_bad_mu(mu):
    with pytest.raises(ValueError, match="mu"):
        recipes.fedprox(mu)


# --- 2. FedPer ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fedper_run(data):
    return simulate(recipes.fedper(BODY), data)


@pytest.fixture(scope="module")
def fedper_reference(data, initial):
    """Two rounds: every client trains every layer from the global body and its own
    previous head (round 1: the initial model); the body is averaged, the head kept."""
    heads = [{name: initial[name] for name in HEAD} for _ in range(CLIENTS)]
    body = {name: initial[name] for name in (D0B, D0K)}
    rounds = []
    for round_index in (1, 2):
        keys = ref_round_keys(round_index)
        trained = [ref_sgd({**body, **heads[c]}, data, c, keys[c], STEPS)[0] for c in range(CLIENTS)]
        body = ref_average(trained, data.n_train, (D0B, D0K))
        heads = [{name: t[name] for name in HEAD} for t in trained]
        rounds.append((trained, body))
    return rounds


@pytest.mark.slow  # a whole simulation to compile: the fast tier keeps one per behaviour
def test_fedper_keeps_each_head_on_its_client(data, initial, fedper_run, fedper_reference):
    simulation, rounds = fedper_run
    check_initial(simulation, initial)
    for (_, output), (trained, body) in zip(rounds, fedper_reference):
        glob = to_np(output.state.global_layers)
        assert_layers_close(glob, body)
        for name in HEAD:  # the global head never moves
            np.testing.assert_array_equal(glob[name], initial[name], err_msg=name)
        for c in range(CLIENTS):
            assert_layers_close(to_np(output.trained_layers, c), trained[c])
            assert_layers_close(to_np(output.state.client_layers, c), trained[c], HEAD)
    # Round 2 started from the client's own round-1 head, not from a shared one.
    (_, first), (_, second) = rounds
    for c in range(CLIENTS):
        start = to_np(second.start_layers, c)
        assert_layers_close(start, to_np(first.trained_layers, c), HEAD)
        assert_layers_close(start, to_np(first.state.global_layers), (D0B, D0K))
    # The heads are the clients' own: neither equal to each other nor to their average.
    final_trained = fedper_reference[-1][0]
    averaged_head = ref_average(final_trained, data.n_train, HEAD)
    for c in range(CLIENTS):
        assert difference(final_trained[c], averaged_head, HEAD) > 1e-3
    models = simulation.personalized_models(second.state)
    for c in range(CLIENTS):
        expected = {**fedper_reference[-1][1], **{n: final_trained[c][n] for n in HEAD}}
        assert_layers_close(to_np(models, c), expected)


# --- 3. FedRep ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fedrep_run(data):
    return simulate(recipes.fedrep(BODY, HEAD_STEPS), data)


def ref_fedrep_client(start, data, c, key):
    """FedRep's client: ``head_key, body_key = split(key)``; HEAD_STEPS steps moving the
    head, then the rest moving the body. Returns the layers after each phase and the losses."""
    head_key, body_key = jax.random.split(key)
    after_head, head_losses = ref_sgd(start, data, c, head_key, HEAD_STEPS, moving=HEAD)
    after_body, body_losses = ref_sgd(after_head, data, c, body_key, STEPS - HEAD_STEPS, moving=(D0B, D0K))
    return after_head, after_body, head_losses, body_losses


@pytest.fixture(scope="module")
def fedrep_reference(data, initial):
    heads = [{name: initial[name] for name in HEAD} for _ in range(CLIENTS)]
    body = {name: initial[name] for name in (D0B, D0K)}
    rounds = []
    for round_index in (1, 2):
        keys = ref_round_keys(round_index)
        clients = [ref_fedrep_client({**body, **heads[c]}, data, c, keys[c]) for c in range(CLIENTS)]
        starts = [{**body, **heads[c]} for c in range(CLIENTS)]
        body = ref_average([client[1] for client in clients], data.n_train, (D0B, D0K))
        heads = [{name: client[1][name] for name in HEAD} for client in clients]
        rounds.append((starts, clients, body))
    return rounds


@pytest.mark.slow  # a whole simulation to compile: the fast tier keeps one per behaviour
def test_fedrep_trains_the_head_then_the_body(data, initial, fedrep_run, fedrep_reference):
    simulation, rounds = fedrep_run
    check_initial(simulation, initial)
    for round_index, ((record, output), (starts, clients, body)) in enumerate(zip(rounds, fedrep_reference), 1):
        glob = to_np(output.state.global_layers)
        assert_layers_close(glob, body)
        for name in HEAD:
            np.testing.assert_array_equal(glob[name], initial[name], err_msg=name)
        for c in range(CLIENTS):
            after_head, after_body, head_losses, body_losses = clients[c]
            # In the reference, each phase moves only its own layers.
            assert difference(after_head, starts[c], HEAD) > 1e-4
            np.testing.assert_array_equal(after_head[D0K], starts[c][D0K])
            assert difference(after_body, after_head, (D0B, D0K)) > 1e-4
            np.testing.assert_array_equal(after_body[D1K], after_head[D1K])
            got = to_np(output.trained_layers, c)
            assert_layers_close(to_np(output.start_layers, c), starts[c])
            assert_layers_close(got, after_body)
            # The head is where the head phase left it (frozen, not trained for all steps).
            assert_layers_close(got, after_head, HEAD)
            # A body phase that moved every layer would have moved the head too.
            _, body_key = jax.random.split(ref_round_keys(round_index)[c])
            unfrozen, _ = ref_sgd(after_head, data, c, body_key, STEPS - HEAD_STEPS)
            assert difference(unfrozen, after_head, HEAD) > 1e-4
            assert record["train_head_loss"][c] == pytest.approx(np.mean(head_losses), rel=1e-5)
            assert record["train_loss"][c] == pytest.approx(np.mean(body_losses), rel=1e-5)


@pytest.mark.parametrize("head_steps", [0, -1, True, 1.5, "2"], ids=repr)
def test_fedrep_refuses_bad_head_steps(head_steps):
    with pytest.raises(ValueError, match="head_steps"):
        recipes.fedrep(BODY, head_steps)


@pytest.mark.slow  # a whole simulation to compile: the fast tier keeps one per behaviour
@pytest.mark.parametrize("head_steps", [STEPS, STEPS + 1], ids=["equal", "more"])
def test_fedrep_needs_more_local_steps_than_head_steps(data, head_steps):
    recipe = recipes.fedrep(BODY, head_steps)
    simulation = Simulation(recipe.exchanger, ONE_ROUND, data, MLP(), client_optimizer=optax.sgd(LR), **recipe.options)
    with pytest.raises(ValueError, match="head steps"):
        simulation.round(simulation.init_state(), 1)


# --- 4. Ditto -----------------------------------------------------------------------------------

LAM = 1.0


@pytest.fixture(scope="module")
def ditto_run(data):
    return simulate(recipes.ditto(LAM), data)


@pytest.fixture(scope="module")
def ditto_reference(data, initial):
    """Two rounds: ``global_key, personal_key = split(client_key)``; the global model is
    FedAvg of plain SGD from the global start; each personal model continues from its last
    one (round 1: the initial model) on ``xent + LAM / 2 * ||v - global start||^2``."""
    glob = dict(initial)
    personal = [dict(initial) for _ in range(CLIENTS)]
    rounds = []
    for round_index in (1, 2):
        keys = ref_round_keys(round_index)
        trained, from_global = [], []
        for c in range(CLIENTS):
            global_key, personal_key = jax.random.split(keys[c])
            trained.append(ref_sgd(glob, data, c, global_key, STEPS)[0])
            from_global.append(ref_sgd(glob, data, c, personal_key, STEPS, anchor=glob, strength=LAM)[0])
            personal[c] = ref_sgd(personal[c], data, c, personal_key, STEPS, anchor=glob, strength=LAM)[0]
        glob = ref_average(trained, data.n_train, initial)
        rounds.append((trained, glob, list(personal), from_global))
    return rounds


def test_ditto_global_model_is_fedavg(data, initial, ditto_run, ditto_reference):
    simulation, rounds = ditto_run
    check_initial(simulation, initial)
    for (record, output), (trained, glob, _, _) in zip(rounds, ditto_reference):
        assert_layers_close(to_np(output.state.global_layers), glob)
        for c in range(CLIENTS):
            assert_layers_close(to_np(output.trained_layers, c), trained[c])
        assert len(record["train_loss"]) == len(record["train_personal_loss"]) == CLIENTS


def test_ditto_personal_models_persist_and_are_evaluated(data, ditto_run, ditto_reference):
    simulation, rounds = ditto_run
    for round_index, ((record, output), (_, glob, personal, from_global)) in enumerate(
        zip(rounds, ditto_reference), start=1
    ):
        models = simulation.personalized_models(output.state)
        evaluated = simulation.evaluate_clients(output.state)
        for c in range(CLIENTS):
            got = to_np(models, c)
            assert_layers_close(got, personal[c])
            assert difference(got, glob) > 1e-3, "the personal model is not the global one"
            if round_index == 2:  # round 2 went on from round 1's personal model
                assert difference(got, from_global[c]) > 1e-3
            loss = ref_test_loss(ref_mlp, personal[c], data, c)
            assert evaluated["loss"][c] == pytest.approx(loss, rel=1e-5)
            assert record["local_loss"][c] == pytest.approx(loss, rel=1e-5)


def test_ditto_needs_kept_client_state(data):
    recipe = recipes.ditto(LAM)
    with pytest.raises(ValueError, match="keep_client_optimizer_state"):
        Simulation(recipe.exchanger, ONE_ROUND, data, MLP(), client_update=recipe.client_update)


@pytest.mark.parametrize("lam", [-1.0, float("nan"), "a", True], ids=repr)
def test_ditto_refuses_a_bad_lambda(lam):
    with pytest.raises(ValueError, match="lam"):
        recipes.ditto(lam)


# --- 5. FedBN -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fedbn_run(data):
    return simulate(recipes.fedbn(), data, module=LinenNet())


@pytest.mark.slow  # a whole simulation to compile: the fast tier keeps one per behaviour
def test_fedbn_keeps_batchnorm_on_the_clients(data, fedbn_run):
    simulation, rounds = fedbn_run
    initial = to_np(simulation.initial_layers)
    shared = [name for name in initial if name not in BN_LAYERS]
    assert sorted(shared) == [
        "params/Dense_0/bias",
        "params/Dense_0/kernel",
        "params/Dense_1/bias",
        "params/Dense_1/kernel",
    ]
    # The reference: every client from the global shared layers and its own BatchNorm.
    own = [{name: initial[name] for name in BN_LAYERS} for _ in range(CLIENTS)]
    glob = {name: initial[name] for name in shared}
    for round_index, (_, output) in enumerate(rounds, start=1):
        keys = ref_round_keys(round_index)
        trained = [ref_sgd({**glob, **own[c]}, data, c, keys[c], STEPS, forward=ref_bn_net)[0] for c in range(CLIENTS)]
        glob = ref_average(trained, data.n_train, shared)
        own = [{name: t[name] for name in BN_LAYERS} for t in trained]
        got = to_np(output.state.global_layers)
        assert_layers_close(got, glob)
        for name in BN_LAYERS:  # never averaged: the global BatchNorm stays the initial one
            np.testing.assert_array_equal(got[name], initial[name], err_msg=name)
        for c in range(CLIENTS):
            assert_layers_close(to_np(output.trained_layers, c), trained[c])
            assert_layers_close(to_np(output.state.client_layers, c), trained[c], BN_LAYERS)
            assert difference(trained[c], initial, BN_LAYERS) > 1e-4
        assert difference(trained[0], trained[1], BN_LAYERS) > 1e-4  # the clients' own


# --- 6. Recipe.options ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "name", "kind", "custom", "keep"),
    [
        (recipes.fedavg, "fedavg", "full", False, False),
        (lambda: recipes.fedprox(0.5), "fedprox(0.5)", "full", True, False),
        (lambda: recipes.fedper(BODY), "fedper", "fixed", False, False),
        (lambda: recipes.fedrep(BODY, 3), "fedrep(3)", "fixed", True, False),
        (recipes.fedbn, "fedbn", "exclude-bn", False, False),
        (lambda: recipes.ditto(0.25), "ditto(0.25)", "full", True, True),
    ],
    ids=["fedavg", "fedprox", "fedper", "fedrep", "fedbn", "ditto"],
)
def test_recipe_options(data, make, name, kind, custom, keep):
    """``options``: the label, the client update and, only for a method that keeps a state
    of its own (Ditto), ``keep_client_optimizer_state=True``; else the caller chooses."""
    recipe = make()
    assert recipe.name == name
    assert recipe.exchanger.kind == kind
    if kind == "fixed":
        assert recipe.exchanger.layers == BODY
    expected = {"label": name, "client_update": recipe.client_update}
    if keep:
        expected["keep_client_optimizer_state"] = True
    assert recipe.options == expected
    assert (recipe.client_update is not None) == custom
    assert recipe.keep_client_state is keep
    module = LinenNet() if kind == "exclude-bn" else MLP()
    simulation = Simulation(recipe.exchanger, ONE_ROUND, data, module, **recipe.options)
    assert simulation.label == name
    assert simulation.program.keep_optimizer_state is keep
    if not keep:  # the caller's choice
        kept = Simulation(recipe.exchanger, ONE_ROUND, data, module, keep_client_optimizer_state=True, **recipe.options)
        assert kept.program.keep_optimizer_state is True
