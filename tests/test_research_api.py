"""The simulation's research API (loss_fn, metrics_fn, input_fn, client and server optimizers,
client_update, keep_client_optimizer_state, fine_tune_steps, evaluate_clients) against
plain numpy / plain JAX references written here.

Every federation is tiny (4 clients, 1-2 rounds, 3 local steps, a Dense(1) regression or
conftest's small classifiers); the runs shared by several tests are module fixtures.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import LinenNet, NnxDigitsNet, bits
from flax import nnx

from jaxlayerx.simulation import ExchangerSpec, Simulation, SimulationConfig, make_client_data
from jaxlayerx.simulation.round import FINE_TUNE_STREAM

SEED = 0
CLIENTS = 4
STEPS = 3
BATCH = 8
LR = 0.05
CONFIG = SimulationConfig(rounds=2, local_steps=STEPS, batch_size=BATCH, seed=SEED)
ONE_ROUND = SimulationConfig(rounds=1, local_steps=STEPS, batch_size=BATCH, seed=SEED)
FULL = ExchangerSpec("full")
KERNEL, BIAS = "params/Dense_0/kernel", "params/Dense_0/bias"

# float32 training against float64 references: a few ulps of float32 per step.
TOL = {"rtol": 2e-5, "atol": 2e-6}


class Linear(nn.Module):
    """Dense(1), called as ``module(x, train=...)``."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(1)(x)


def squared_error(out, batch):
    """Per-example loss: ``(B,)``."""
    return (out[:, 0] - batch["y"]) ** 2


def mean_squared_error(out, batch):
    """The same loss as the batch's mean: a scalar."""
    return jnp.mean((out[:, 0] - batch["y"]) ** 2)


def token_squared_error(out, batch):
    """The same loss as two 'tokens' per example, ``(B, 2)``, whose per-example mean is the
    squared error (their sum is twice it, their first half, their last 1.5 times)."""
    error = (out[:, 0] - batch["y"]) ** 2
    return jnp.stack([0.5 * error, 1.5 * error], axis=1)


def regression_metrics(out, batch):
    """``mae`` per example; ``worst`` the batch's largest absolute error, a scalar (so the
    simulation evaluates it on each example alone: its mean is the mean absolute error too)."""
    error = jnp.abs(out[:, 0] - batch["y"])
    return {"mae": error, "worst": jnp.max(error)}


def regression(**options):
    """The Dense(1) regression simulation with plain SGD on the squared error."""
    options.setdefault("loss_fn", squared_error)
    options.setdefault("client_optimizer", optax.sgd(LR))
    config = options.pop("config", CONFIG)
    exchanger = options.pop("exchanger", FULL)
    return Simulation(exchanger, config, options.pop("data"), Linear(), **options)


def run(simulation):
    """``[(record, output)]`` of every round."""
    return list(simulation.iterate())


def layers_np(layers, client=None):
    """A flat view as float64 numpy copies (one client's, of a client-stacked view)."""
    return {name: np.array(value if client is None else value[client], np.float64) for name, value in layers.items()}


# --- the independent references -----------------------------------------------------------


def ref_batch_key(seed=SEED):
    """engine.py: ``init_key, batch_key = split(key(seed))``."""
    return jax.random.split(jax.random.key(seed))[1]


def ref_round_keys(round_index, seed=SEED, clients=CLIENTS):
    """task.py / round.py: client ``c`` of round ``r`` draws from ``split(fold_in(batch_key, r), C)[c]``."""
    return jax.random.split(jax.random.fold_in(ref_batch_key(seed), round_index), clients)


def ref_fine_tune_keys(round_index, seed=SEED, clients=CLIENTS):
    """round.py ``_fine_tune_all``: ``split(fold_in(fold_in(batch_key, 7), r), C)``."""
    stream = jax.random.fold_in(ref_batch_key(seed), 7)
    return jax.random.split(jax.random.fold_in(stream, round_index), clients)


def ref_indices(key, steps, count, batch=BATCH):
    """The batches' example indices: ``split(key, steps)``, each ``randint(k, (B,), 0, n)``."""
    return [np.asarray(jax.random.randint(k, (batch,), 0, int(count))) for k in jax.random.split(key, steps)]


def ref_predict(params, x):
    return np.asarray(x, np.float64) @ params[KERNEL][:, 0] + params[BIAS][0]


def ref_mse(params, x, y):
    return float(np.mean((ref_predict(params, x) - np.asarray(y, np.float64)) ** 2))


def ref_mae(params, x, y):
    return float(np.mean(np.abs(ref_predict(params, x) - np.asarray(y, np.float64))))


def ref_sgd(params, x, y, indices, lr=LR, mu=0.0):
    """Numpy SGD on the mean squared error of Dense(1), with FedProx's ``mu/2 ||w - w0||^2``."""
    params = {name: value.copy() for name, value in params.items()}
    anchor = {name: value.copy() for name, value in params.items()}
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    for index in indices:
        xb, yb = x[index], y[index]
        residual = xb @ params[KERNEL][:, 0] + params[BIAS][0] - yb
        grads = {KERNEL: (2 * xb.T @ residual / len(index))[:, None], BIAS: np.array([2 * residual.mean()])}
        for name in params:
            params[name] = params[name] - lr * (grads[name] + mu * (params[name] - anchor[name]))
    return params


def ref_average(trained, counts):
    """FedAvg weighted by the clients' training examples."""
    weights = np.asarray(counts, np.float64)
    return {name: sum(w * p[name] for w, p in zip(weights, trained)) / weights.sum() for name in trained[0]}


def ref_fedavg_round(start, data, round_index, mu=0.0):
    """One round of the full exchanger: every client trains from ``start``; the clients'
    trained params and their weighted average."""
    keys = ref_round_keys(round_index)
    trained = [
        ref_sgd(
            start,
            data.train["x"][c],
            data.train["y"][c],
            ref_indices(keys[c], STEPS, data.n_train[c]),
            mu=mu,
        )
        for c in range(CLIENTS)
    ]
    return trained, ref_average(trained, data.n_train)


def ref_local(data, c):
    """Client ``c``'s test examples."""
    n = int(data.n_test[c])
    return data.test["x"][c, :n], data.test["y"][c, :n]


def assert_layers_close(got, expected, **tolerance):
    assert sorted(got) == sorted(expected)
    for name in expected:
        np.testing.assert_allclose(
            np.asarray(got[name], np.float64), expected[name], err_msg=name, **(tolerance or TOL)
        )


def max_difference(a, b):
    return max(float(np.max(np.abs(a[name] - b[name]))) for name in a)


# --- data and the shared runs ----------------------------------------------------------------


@pytest.fixture(scope="module")
def reg_data():
    """82 examples of ``y = x @ w + 0.3 + noise`` split IID over 4 clients: 17, 17, 16 and
    16 training examples (unequal, so that the weighting of FedAvg shows)."""
    rng = np.random.default_rng(11)
    x = rng.normal(size=(82, 3)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5]) + 0.3 + 0.1 * rng.normal(size=82)).astype(np.float32)
    data = make_client_data({"x": x, "y": y}, num_clients=CLIENTS, beta=None)
    assert data.n_train.tolist() == [17, 17, 16, 16]
    return data


@pytest.fixture(scope="module")
def fedavg(reg_data):
    """The plain regression run: per-example loss, custom metrics, SGD, FedAvg, 2 rounds."""
    simulation = regression(data=reg_data, metrics_fn=regression_metrics)
    return simulation, run(simulation)


@pytest.fixture(scope="module")
def initial(fedavg):
    """The initial model as float64 numpy, checked against Linen's own init on the key
    engine.py documents (``split(key(seed))[0]``)."""
    simulation, _ = fedavg
    init_key = jax.random.split(jax.random.key(SEED))[0]
    variables = Linear().init(init_key, jnp.asarray(simulation.data.train["x"][0, :1]), train=False)
    expected = {KERNEL: variables["params"]["Dense_0"]["kernel"], BIAS: variables["params"]["Dense_0"]["bias"]}
    got = layers_np(simulation.initial_layers)
    assert list(got) == [BIAS, KERNEL]
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], np.asarray(value, np.float64))
    return got


# --- 1. regression with a loss_fn --------------------------------------------------------------


def test_regression_rounds_equal_a_numpy_fedavg(reg_data, fedavg, initial):
    """Both rounds' global models are numpy SGD from the documented batches, then the
    example-weighted mean of the clients' params."""
    _, rounds = fedavg
    start = initial
    for round_index, (_, output) in enumerate(rounds, start=1):
        trained, expected = ref_fedavg_round(start, reg_data, round_index)
        got = layers_np(output.state.global_layers)
        assert_layers_close(got, expected)
        for c in range(CLIENTS):  # every client's trained params too
            assert_layers_close(layers_np(output.trained_layers, c), trained[c])
        # The test tells weighted from unweighted FedAvg.
        assert max_difference(expected, ref_average(trained, np.ones(CLIENTS))) > 100 * TOL["atol"]
        start = got


def test_regression_records_hold_the_loss_and_no_accuracy(reg_data, fedavg):
    _, rounds = fedavg
    for record, output in rounds:
        params = layers_np(output.state.global_layers)
        expected = ref_mse(params, reg_data.global_test["x"], reg_data.global_test["y"])
        assert record["global_loss"] == pytest.approx(expected, rel=1e-5)
        assert "global_accuracy" not in record and "local_accuracy" not in record
        assert {"global_loss", "local_loss", "local_loss_mean", "train_loss"} <= set(record)
        assert len(record["local_loss"]) == len(record["train_loss"]) == CLIENTS
        assert record["local_loss_mean"] == pytest.approx(np.mean(record["local_loss"]))


def test_regression_without_loss_fn_is_refused(reg_data):
    with pytest.raises(ValueError, match="loss_fn"):
        Simulation(FULL, CONFIG, reg_data, Linear())


# --- 2. batch, per-example and per-token losses ---------------------------------------------------


@pytest.fixture(scope="module")
def loss_forms(reg_data):
    """Round 1 with the loss as the batch's mean and as two tokens per example."""
    return {
        form: run(regression(data=reg_data, config=ONE_ROUND, loss_fn=loss))
        for form, loss in (("batch", mean_squared_error), ("tokens", token_squared_error))
    }


@pytest.mark.slow  # a whole simulation to compile: the fast tier keeps one per behaviour
@pytest.mark.parametrize("form", ["batch", "tokens"])
def test_loss_forms_evaluate_alike(reg_data, fedavg, loss_forms, form):
    """The same loss given per example, for the batch or per token: the same training and
    the same evaluation, which is the numpy MSE (per-token losses averaged per example)."""
    (expected_record, expected_output), *_ = fedavg[1]
    ((record, output),) = loss_forms[form]
    params = layers_np(output.state.global_layers)
    assert_layers_close(params, layers_np(expected_output.state.global_layers))
    assert record["global_loss"] == pytest.approx(expected_record["global_loss"], rel=1e-5)
    np.testing.assert_allclose(record["local_loss"], expected_record["local_loss"], rtol=1e-5)
    assert record["global_loss"] == pytest.approx(
        ref_mse(params, reg_data.global_test["x"], reg_data.global_test["y"]), rel=1e-5
    )
    for c in range(CLIENTS):
        assert record["local_loss"][c] == pytest.approx(ref_mse(params, *ref_local(reg_data, c)), rel=1e-5)


# --- 3. metrics_fn ----------------------------------------------------------------------------------


def test_custom_metrics_equal_numpy(reg_data, fedavg):
    """``global_mae`` on the global test set, ``local_mae`` per client on its own test set
    with its personalized model (the global one: the full exchanger sends every layer); a
    scalar metric is evaluated example by example (``worst`` of one example is its error)."""
    _, rounds = fedavg
    for record, output in rounds:
        params = layers_np(output.state.global_layers)
        expected = ref_mae(params, reg_data.global_test["x"], reg_data.global_test["y"])
        assert record["global_mae"] == pytest.approx(expected, rel=1e-5)
        assert record["global_worst"] == pytest.approx(expected, rel=1e-5)
        local = [ref_mae(params, *ref_local(reg_data, c)) for c in range(CLIENTS)]
        np.testing.assert_allclose(record["local_mae"], local, rtol=1e-5)
        np.testing.assert_allclose(record["local_worst"], local, rtol=1e-5)
        assert record["local_mae_mean"] == pytest.approx(np.mean(local), rel=1e-5)
        local_mse = [ref_mse(params, *ref_local(reg_data, c)) for c in range(CLIENTS)]
        np.testing.assert_allclose(record["local_loss"], local_mse, rtol=1e-5)


# --- 4. keep_client_optimizer_state -----------------------------------------------------------------


def plain_mse(params, x, y):
    return jnp.mean((x @ params["kernel"][:, 0] + params["bias"][0] - y) ** 2)


@functools.partial(jax.jit, static_argnums=0)
def optax_step(optimizer, params, state, x, y):
    """One step of plain optax on the mean squared error."""
    grads = jax.grad(plain_mse)(params, x, y)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def ref_optax_round(optimizer, start, states, data, round_index):
    """A round of plain optax in a Python loop: each client from ``start`` with its state
    in ``states`` (``None``: a fresh one). Returns the weighted average and the states."""
    keys = ref_round_keys(round_index)
    trained, new_states = [], []
    for c in range(CLIENTS):
        params = {"kernel": jnp.asarray(start[KERNEL], jnp.float32), "bias": jnp.asarray(start[BIAS], jnp.float32)}
        state = optimizer.init(params) if states is None else states[c]
        x, y = data.train["x"][c], data.train["y"][c]
        for index in ref_indices(keys[c], STEPS, data.n_train[c]):
            params, state = optax_step(optimizer, params, state, x[index], y[index])
        trained.append({KERNEL: np.asarray(params["kernel"], np.float64), BIAS: np.asarray(params["bias"], np.float64)})
        new_states.append(state)
    return ref_average(trained, data.n_train), new_states


ADAM = optax.adam(0.05)


@pytest.fixture(scope="module")
def adam_runs(reg_data):
    return {
        keep: run(regression(data=reg_data, client_optimizer=ADAM, keep_client_optimizer_state=keep))
        for keep in (True, False)
    }


def test_kept_optimizer_state_counts_every_step(adam_runs):
    (_, first), (_, second) = adam_runs[True]
    for output, rounds in ((first, 1), (second, 2)):
        counts = [
            np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(output.state.opt_states)
            if any(getattr(key, "name", None) == "count" for key in path)
        ]
        assert counts, "Adam's step count is in the kept state"
        for count in counts:
            assert count.tolist() == [rounds * STEPS] * CLIENTS
    assert all(output.state.opt_states is None for _, output in adam_runs[False])


@pytest.fixture(scope="module")
def adam_reference(reg_data, initial):
    """Round 1, then round 2 with each client's Adam state kept or fresh, in plain optax."""
    first, states = ref_optax_round(ADAM, initial, None, reg_data, 1)
    kept, _ = ref_optax_round(ADAM, first, states, reg_data, 2)
    fresh, _ = ref_optax_round(ADAM, first, None, reg_data, 2)
    assert max_difference(kept, fresh) > 1e-3  # the two modes differ
    return first, {True: kept, False: fresh}


@pytest.mark.parametrize("keep", [True, False], ids=["kept", "fresh"])
def test_client_optimizer_state_kept_or_fresh_equals_optax_loop(adam_runs, adam_reference, keep):
    first, second = adam_reference
    (_, got_first), (_, got_second) = adam_runs[keep]
    tolerance = {"rtol": 1e-5, "atol": 1e-6}
    assert_layers_close(layers_np(got_first.state.global_layers), first, **tolerance)
    assert_layers_close(layers_np(got_second.state.global_layers), second[keep], **tolerance)


# --- 5. server optimizers ----------------------------------------------------------------------------


def test_server_clip_by_global_norm_sees_every_layer(reg_data, initial):
    """new global = global - clip(global - average), the norm over every layer at once."""
    _, average = ref_fedavg_round(initial, reg_data, 1)
    pseudo = {name: initial[name] - average[name] for name in initial}
    norm = np.sqrt(sum(np.sum(value**2) for value in pseudo.values()))
    limit = 0.5 * norm  # clipping bites
    expected = {name: initial[name] - pseudo[name] * limit / norm for name in initial}
    per_layer = {
        name: initial[name] - pseudo[name] * min(1.0, limit / np.sqrt(np.sum(pseudo[name] ** 2))) for name in initial
    }
    assert max_difference(expected, per_layer) > 1e-3  # a per-layer clip would fail the test
    server = optax.chain(optax.clip_by_global_norm(float(limit)), optax.sgd(1.0))
    ((_, output),) = run(regression(data=reg_data, config=ONE_ROUND, server_optimizer=server))
    assert_layers_close(layers_np(output.state.global_layers), expected)


def test_optimizer_names_and_transformations_are_not_mixed(reg_data):
    with pytest.raises(ValueError, match="server optimizer once"):
        regression(
            data=reg_data, config=SimulationConfig(server_optimizer="adam", seed=SEED), server_optimizer=optax.sgd(1.0)
        )
    with pytest.raises(TypeError, match="optax"):
        regression(data=reg_data, client_optimizer="adam")
    with pytest.raises(TypeError, match="client_optimizer"):
        SimulationConfig(local_optimizer=optax.sgd(0.1))


# --- 6. client_update ---------------------------------------------------------------------------------


def frozen(start, opt_state, data, key, steps, task):
    return start, opt_state, {"zero": 0.0}


@pytest.fixture(scope="module")
def frozen_run(reg_data):
    simulation = regression(data=reg_data, client_update=frozen)
    return simulation, run(simulation)


def test_client_update_that_does_not_train_leaves_the_model(reg_data, initial, frozen_run):
    """Clients that return their start: the global model stays the initial one (up to the
    rounding of the weighted average, fl4health's sum n_c x / sum n_c in float32) and the records carry
    the update's metric."""
    simulation, rounds = frozen_run
    for record, output in rounds:
        for name, value in output.state.global_layers.items():
            np.testing.assert_array_max_ulp(np.asarray(value), np.asarray(simulation.initial_layers[name]), maxulp=2)
        assert record["train_zero"] == [0.0] * CLIENTS
        assert "train_loss" not in record
        assert record["global_loss"] == pytest.approx(
            ref_mse(initial, reg_data.global_test["x"], reg_data.global_test["y"]), rel=1e-5
        )


def reshaped(start, opt_state, data, key, steps, task):
    """Returns the kernel in the wrong shape."""
    return {**start, KERNEL: jnp.zeros((2, 2), jnp.float32)}, opt_state, {}


def dropped(start, opt_state, data, key, steps, task):
    """Leaves the bias out."""
    return {name: value for name, value in start.items() if name != BIAS}, opt_state, {}


def vector_metric(start, opt_state, data, key, steps, task):
    """A metric that is not a scalar."""
    return start, opt_state, {"per_weight": jnp.zeros(3)}


@pytest.mark.parametrize(
    ("update", "error", "match"),
    [
        (reshaped, ValueError, KERNEL),
        (dropped, KeyError, BIAS),
        (vector_metric, ValueError, "per_weight"),
    ],
    ids=["wrong-shape", "missing-layer", "vector-metric"],
)
def test_client_update_results_are_checked(reg_data, update, error, match):
    simulation = regression(data=reg_data, config=ONE_ROUND, client_update=update)
    with pytest.raises(error, match=match):
        simulation.round(simulation.init_state(), 1)


MU = 1.0


def fedprox(start, opt_state, data, key, steps, task):
    """FedProx on Task.step: ``mu/2 ||w - w_start||^2`` added to each step's loss."""
    anchor = task.params(start)

    def penalty(params):
        return MU / 2 * sum(jnp.sum((params[name] - anchor[name]) ** 2) for name in params)

    keys = jax.random.split(key, steps)
    layers, losses = start, []
    for step in range(steps):
        batch = data.take(task.batch_index(keys[step], data.size))
        layers, opt_state, loss = task.step(layers, opt_state, batch, penalty=penalty)
        losses.append(loss)
    return layers, opt_state, {"loss": jnp.mean(jnp.stack(losses))}


def test_fedprox_client_update_equals_a_numpy_loop(reg_data, initial):
    _, expected = ref_fedavg_round(initial, reg_data, 1, mu=MU)
    _, plain = ref_fedavg_round(initial, reg_data, 1)
    assert max_difference(expected, plain) > 1e-3  # the proximal term shows
    ((record, output),) = run(regression(data=reg_data, config=ONE_ROUND, client_update=fedprox))
    assert_layers_close(layers_np(output.state.global_layers), expected)
    assert len(record["train_loss"]) == CLIENTS


# --- 7. evaluate_clients with a FedPer-like exchanger ----------------------------------------------------

BODY = ("*/Dense_0/*", "*/BatchNorm_0/*")
HEAD = ("params/Dense_1/bias", "params/Dense_1/kernel")


def ref_linen_net(layers, x):
    """LinenNet in evaluation mode, in numpy: Dense(3), BatchNorm (eps 1e-5), Dense(2)."""
    h = np.asarray(x, np.float64) @ layers["params/Dense_0/kernel"] + layers["params/Dense_0/bias"]
    h = (h - layers["batch_stats/BatchNorm_0/mean"]) / np.sqrt(layers["batch_stats/BatchNorm_0/var"] + 1e-5)
    h = h * layers["params/BatchNorm_0/scale"] + layers["params/BatchNorm_0/bias"]
    return h @ layers["params/Dense_1/kernel"] + layers["params/Dense_1/bias"]


def ref_classification(logits, y):
    """Mean softmax cross-entropy and accuracy against integer labels."""
    top = logits.max(axis=1, keepdims=True)
    log_sum = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
    loss = float(np.mean(log_sum - logits[np.arange(len(y)), y]))
    return loss, float(np.mean(np.argmax(logits, axis=1) == y))


@pytest.fixture(scope="module")
def fedper():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(96, 4)).astype(np.float32)
    y = (x[:, 0] - x[:, 1] > 0).astype(np.int32)
    data = make_client_data({"x": x, "y": y}, num_clients=CLIENTS, beta=None, seed=1)
    exchanger = ExchangerSpec("fixed", layers=BODY)
    simulation = Simulation(exchanger, CONFIG, data, LinenNet(), client_optimizer=optax.sgd(0.1))
    assert simulation.personalized
    rounds = run(simulation)
    return simulation, rounds


def ref_personalized(state, c):
    """Client ``c``'s own layers with the global model's exchanged (body) layers merged in."""
    own, shared = layers_np(state.client_layers, c), layers_np(state.global_layers)
    return {name: own[name] if name in HEAD else shared[name] for name in own}


def test_evaluate_clients_merges_the_global_body(fedper):
    simulation, rounds = fedper
    record, output = rounds[-1]
    state, data = output.state, simulation.data
    got = simulation.evaluate_clients(state)
    assert got["clients"].tolist() == list(range(CLIENTS))
    assert set(got) == {"clients", "loss", "accuracy"}
    for c in range(CLIENTS):
        x, y = data.test["x"][c, : data.n_test[c]], data.test["y"][c, : data.n_test[c]]
        merged = ref_personalized(state, c)
        loss, accuracy = ref_classification(ref_linen_net(merged, x), y)
        assert got["loss"][c] == pytest.approx(loss, rel=1e-5)
        assert got["accuracy"][c] == pytest.approx(accuracy)
        assert record["local_loss"][c] == pytest.approx(loss, rel=1e-5)  # the round's own evaluation
        # Neither the client's own model nor the global one alone gives that loss.
        for alone in (layers_np(state.client_layers, c), layers_np(state.global_layers)):
            assert abs(ref_classification(ref_linen_net(alone, x), y)[0] - loss) > 1e-4
    models = simulation.personalized_models(state, [3, 1])
    for row, c in enumerate([3, 1]):
        expected = ref_personalized(state, c)
        for name, value in models.items():
            np.testing.assert_array_equal(np.asarray(value[row], np.float64), expected[name], err_msg=name)


def test_evaluate_clients_takes_a_subset_in_order(fedper):
    simulation, rounds = fedper
    state = rounds[-1][1].state
    everyone = simulation.evaluate_clients(state)
    for subset in ([0, 2], [2, 0]):
        got = simulation.evaluate_clients(state, clients=subset)
        assert got["clients"].tolist() == subset
        for name in ("loss", "accuracy"):
            np.testing.assert_allclose(got[name], everyone[name][subset], rtol=1e-6, err_msg=name)


@pytest.mark.parametrize("clients", [[], [4], [-1], [[0, 1]], [0.5], 2], ids=repr)
def test_evaluate_clients_refuses_bad_clients(fedper, clients):
    simulation, rounds = fedper
    with pytest.raises(ValueError, match="clients"):
        simulation.evaluate_clients(rounds[-1][1].state, clients=clients)


# --- 8. fine_tune_steps ------------------------------------------------------------------------------

TUNE = 2


@pytest.fixture(scope="module")
def fine_tuned(reg_data):
    simulation = regression(data=reg_data, metrics_fn=regression_metrics, fine_tune_steps=TUNE)
    return simulation, run(simulation)


def test_fine_tuning_changes_only_the_local_metrics(fedavg, fine_tuned):
    for (plain, plain_output), (tuned, tuned_output) in zip(fedavg[1], fine_tuned[1]):
        for name, value in tuned_output.state.global_layers.items():  # training is the same
            np.testing.assert_array_equal(bits(value), bits(plain_output.state.global_layers[name]), err_msg=name)
        assert tuned["global_loss"] == pytest.approx(plain["global_loss"], rel=1e-6)
        for c in range(CLIENTS):
            assert abs(tuned["local_loss"][c] - plain["local_loss"][c]) > 1e-6
            assert abs(tuned["local_mae"][c] - plain["local_mae"][c]) > 1e-6


def test_fine_tuned_evaluation_equals_numpy(reg_data, fine_tuned):
    """Each client's personalized model (the global one) after TUNE numpy SGD steps on the
    fine-tuning stream's batches, evaluated on its test set."""
    simulation, rounds = fine_tuned
    assert FINE_TUNE_STREAM == 7  # the stream ref_fine_tune_keys writes by hand
    record, output = rounds[-1]
    state = output.state
    keys = ref_fine_tune_keys(len(rounds))
    start = layers_np(state.global_layers)
    tuned = [
        ref_sgd(start, reg_data.train["x"][c], reg_data.train["y"][c], ref_indices(keys[c], TUNE, reg_data.n_train[c]))
        for c in range(CLIENTS)
    ]
    got = simulation.evaluate_clients(state)
    models = simulation.personalized_models(state)
    for c in range(CLIENTS):
        assert_layers_close(layers_np(models, c), tuned[c])
        loss, mae = ref_mse(tuned[c], *ref_local(reg_data, c)), ref_mae(tuned[c], *ref_local(reg_data, c))
        assert got["loss"][c] == pytest.approx(loss, rel=1e-5)
        assert got["mae"][c] == pytest.approx(mae, rel=1e-5)
        assert record["local_loss"][c] == pytest.approx(loss, rel=1e-5)
        # Without fine-tuning the loss is another one.
        assert abs(ref_mse(start, *ref_local(reg_data, c)) - loss) > 1e-6


# --- 9. input_fn --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_inputs():
    rng = np.random.default_rng(9)
    a = rng.normal(size=(80, 32)).astype(np.float32)
    b = rng.normal(size=(80, 32)).astype(np.float32)
    y = rng.integers(0, 10, size=80).astype(np.int32)
    return make_client_data({"a": a, "b": b, "y": y}, num_clients=CLIENTS, beta=None)


def concatenated(batch):
    return jnp.concatenate([batch["a"], batch["b"]], axis=-1)


def ref_nnx_digits_net(layers, x):
    """NnxDigitsNet in evaluation mode, in numpy."""
    h = np.asarray(x, np.float64) @ layers["linear1/kernel"] + layers["linear1/bias"]
    h = (h - layers["bn/mean"]) / np.sqrt(layers["bn/var"] + 1e-5) * layers["bn/scale"] + layers["bn/bias"]
    return np.maximum(h, 0) @ layers["linear2/kernel"] + layers["linear2/bias"]


def test_input_fn_feeds_the_model(two_inputs):
    config = SimulationConfig(rounds=1, local_steps=2, batch_size=BATCH, seed=SEED)
    simulation = Simulation(FULL, config, two_inputs, NnxDigitsNet(nnx.Rngs(0)), input_fn=concatenated)
    ((record, output),) = run(simulation)
    x = np.concatenate([two_inputs.global_test["a"], two_inputs.global_test["b"]], axis=1)
    loss, accuracy = ref_classification(
        ref_nnx_digits_net(layers_np(output.state.global_layers), x), two_inputs.global_test["y"]
    )
    assert record["global_loss"] == pytest.approx(loss, rel=1e-5)
    assert record["global_accuracy"] == pytest.approx(accuracy)


def test_data_without_x_needs_an_input_fn(two_inputs):
    with pytest.raises(ValueError, match="input_fn"):
        Simulation(FULL, CONFIG, two_inputs, NnxDigitsNet(nnx.Rngs(0)))


@pytest.mark.slow  # a whole simulation to compile: the fast tier keeps one per behaviour
def test_labels_keep_the_accuracy_metric_beside_a_loss_of_your_own(two_inputs):
    """Integer labels: accuracy is the default metric whatever the loss; the global
    accuracy is the numpy share of argmax hits of the global model."""
    config = SimulationConfig(rounds=1, local_steps=2, batch_size=BATCH, seed=SEED)

    def smoothed(logits, batch):  # a loss of one's own: label-smoothed cross-entropy
        targets = optax.smooth_labels(jax.nn.one_hot(batch["y"], 10), 0.1)
        return optax.softmax_cross_entropy(logits, targets)

    simulation = Simulation(
        FULL, config, two_inputs, NnxDigitsNet(nnx.Rngs(0)), input_fn=concatenated, loss_fn=smoothed
    )
    ((record, output),) = list(simulation.iterate())
    layers = {name: np.asarray(value, np.float64) for name, value in output.state.global_layers.items()}
    test = two_inputs.global_test
    logits = ref_nnx_digits_net(layers, np.concatenate([test["a"], test["b"]], axis=-1))
    assert record["global_accuracy"] == pytest.approx(float(np.mean(np.argmax(logits, -1) == test["y"])), abs=1e-6)
