"""Tests of the legacy-route Flower client adapter (jaxlayerx/flower/legacy/client.py):
``ExchangerClient``, ``stateful_client_fn`` and ``client_app``.

No networking: the ``NumPyClient`` methods are called directly, or the Flower ``Client``
made by the ``client_fn`` is given ``FitIns``/``EvaluateIns``. Every check compares the
client with independent references written here: ``ref_flat`` (a flat ``name -> numpy``
view walking nested dicts in sorted key order, the order JAX traverses dicts in),
hand-written layer-name lists, a plain-numpy version of the percentage selection rule, and
``numpy.save`` sizes for bytes.

The first message a client receives is the whole model: unnamed in model order
(fl4health's initial parameters, and what the jaxlayerx strategies send first), or named
when the server says so (config ``"jaxlayerx.base-round": -1``). Later messages are
updates, over the global version the config names when it names one.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping
from typing import Any

import pytest

pytest.importorskip("flwr")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
from conftest import (  # noqa: E402
    LINEN_SHAPES,
    LinenNet,  # noqa: E402
    fake_proxy,
    nest,
    ref_flat,
)
from flax import nnx  # noqa: E402
from flwr.app import Context, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.common import (  # noqa: E402
    Code,
    EvaluateIns,
    FitIns,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import SimpleClientManager  # noqa: E402

import jaxlayerx  # noqa: E402
from jaxlayerx import (  # noqa: E402
    DynamicLayerExchanger,
    FixedLayerExchanger,
    FullParameterExchanger,
    LayerExchangerWithExclusions,
    LayerSelectionFunctionConstructor,
)
from jaxlayerx.flower import ExchangerClient, client_app, stateful_client_fn  # noqa: E402
from jaxlayerx.protocol import ClientState, VersionMismatchError  # noqa: E402

BASE_ROUND = "jaxlayerx.base-round"
VERSION = "jaxlayerx.round"
#: The config of the whole model, version 0 (what a jaxlayerx strategy sends first).
WHOLE = {BASE_ROUND: -1, VERSION: 0}
#: The config of an update over version 0, to version 1.
UPDATE = {BASE_ROUND: 0, VERSION: 1}

# ---------------------------------------------------------------------------------------
# Models and their layers (names written by hand, in JAX's sorted-dict-key order)
# ---------------------------------------------------------------------------------------

X = jnp.zeros((1, 4), jnp.float32)


class NNXNet(nnx.Module):
    """nnx.Linear(4, 3) -> nnx.BatchNorm(3) -> nnx.Linear(3, 2)."""

    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(4, 3, rngs=rngs)
        self.bn = nnx.BatchNorm(3, rngs=rngs)
        self.l2 = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.bn(self.l1(x)))


class BF16Net(nn.Module):
    """A bfloat16 Dense followed by a float32 Dense."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(3, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)(x)
        return nn.Dense(2)(x)


LINEN_NAMES = list(LINEN_SHAPES)
LINEN_BN = [name for name in LINEN_NAMES if "BatchNorm" in name]
LINEN_DENSE = [name for name in LINEN_NAMES if "Dense" in name]

NNX_SHAPES = {
    "bn/bias": (3,),
    "bn/mean": (3,),
    "bn/scale": (3,),
    "bn/var": (3,),
    "l1/bias": (3,),
    "l1/kernel": (4, 3),
    "l2/bias": (2,),
    "l2/kernel": (3, 2),
}
NNX_NAMES = list(NNX_SHAPES)
NNX_BN = [name for name in NNX_NAMES if name.startswith("bn/")]
NNX_LINEAR = [name for name in NNX_NAMES if not name.startswith("bn/")]

BF16_NAMES = ["params/Dense_0/bias", "params/Dense_0/kernel", "params/Dense_1/bias", "params/Dense_1/kernel"]
BF16_LAYERS = ["params/Dense_0/bias", "params/Dense_0/kernel"]


def linen_variables(seed: int = 0) -> dict[str, Any]:
    return LinenNet().init(jax.random.key(seed), X)


def nnx_model(seed: int = 0) -> NNXNet:
    return NNXNet(nnx.Rngs(seed))


def bf16_variables(seed: int = 0) -> dict[str, Any]:
    return BF16Net().init(jax.random.key(seed), X)


def linen_fedbn() -> LayerExchangerWithExclusions:
    return LayerExchangerWithExclusions(LinenNet(), {nn.BatchNorm}, X)


def percentage_exchanger(p: float, normalize: bool = True) -> DynamicLayerExchanger:
    constructor = LayerSelectionFunctionConstructor(norm_threshold=1.0, exchange_percentage=p, normalize=normalize)
    return DynamicLayerExchanger(constructor.select_by_percentage())


# ---------------------------------------------------------------------------------------
# Independent references
# ---------------------------------------------------------------------------------------


def set_nnx_layer(module: nnx.Module, name: str, value: Any) -> None:
    *parents, leaf = name.split("/")
    node = module
    for part in parents:
        node = getattr(node, part)
    getattr(node, leaf)[...] = value


def assert_layers(actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]) -> None:
    """Same names (same order), and every layer equal, dtype included."""
    assert list(actual) == list(expected)
    for name in expected:
        a, e = np.asarray(actual[name]), np.asarray(expected[name])
        assert a.dtype == e.dtype, (name, a.dtype, e.dtype)
        assert a.shape == e.shape, (name, a.shape, e.shape)
        assert np.array_equal(a, e), name


def random_layers(shapes: Mapping[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """Float32 values well away from any Flax initialisation (offset by 10 + layer index)."""
    rng = np.random.default_rng(seed)
    return {
        name: (rng.standard_normal(shape) + 10.0 + i).astype(np.float32)
        for i, (name, shape) in enumerate(shapes.items())
    }


def packed(layers: Mapping[str, np.ndarray], names: list[str] | None = None) -> list[np.ndarray]:
    """fl4health's layout, built by hand: arrays, then a 1-D Unicode names array."""
    names = list(layers) if names is None else names
    return [layers[name] for name in names] + [np.array(names)]


def in_order(layers: Mapping[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
    """The whole model unnamed: one array per layer, in ``names``' order (fl4health's layout)."""
    return [layers[name] for name in names]


def npy_size(array: np.ndarray) -> int:
    """Bytes of ``numpy.save(array)``: what Flower carries for one array."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return len(buffer.getvalue())


def serialized_size(payload: list[np.ndarray]) -> int:
    """Bytes of ``payload`` as Flower sends it, measured two ways that must agree."""
    size = sum(npy_size(array) for array in payload)
    assert size == sum(len(tensor) for tensor in ndarrays_to_parameters(payload).tensors)
    return size


def unpack(payload: list[np.ndarray]) -> dict[str, np.ndarray]:
    names = payload[-1]
    assert names.ndim == 1 and names.dtype.kind == "U"
    assert len(payload) == len(names) + 1
    return {str(name): np.asarray(array) for name, array in zip(names.tolist(), payload[:-1])}


def ref_percentage_pick(
    trained: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray], p: float, normalize: bool
) -> list[str]:
    """The percentage rule in plain numpy: drift = ||trained - received||_2 (/ size if
    normalize); the ceil(N * p) largest drifts, ties to the earlier layer; flatten order."""
    names = list(trained)
    drift = []
    for name in names:
        diff = trained[name].astype(np.float64) - received[name].astype(np.float64)
        norm = math.sqrt(float(np.sum(diff * diff)))
        drift.append(norm / diff.size if normalize else norm)
    count = math.ceil(len(names) * p)
    order = sorted(range(len(names)), key=lambda i: (-drift[i], i))
    chosen = set(order[:count])
    return [name for i, name in enumerate(names) if i in chosen]


def shifting_train_fn(deltas: Mapping[str, float], record: list, metrics: dict | None = None):
    """Linen/pytree train_fn: returns a NEW tree with ``layer + delta`` (delta 0 if absent)."""

    def train_fn(model, config):
        received = ref_flat(model)
        record.append({"received": received, "config": dict(config), "model": model})
        trained = {name: value + np.asarray(deltas.get(name, 0.0), value.dtype) for name, value in received.items()}
        return nest(trained), 7, dict(metrics or {})

    return train_fn


def no_train(model, config):
    return model, 1, {}


def initialized_linen_client(exchanger: Any, train_fn=no_train, evaluate_fn=None, seed: int = 1):
    """A Linen client that has applied a whole first model (version 0, unnamed, as a
    jaxlayerx strategy sends it); returns (client, its layers)."""
    client = ExchangerClient(linen_variables(), exchanger, train_fn, evaluate_fn)
    start = random_layers(LINEN_SHAPES, seed)
    client.receive(in_order(start, LINEN_NAMES), WHOLE)
    assert client.initialized and client.state.version == 0
    assert_layers(ref_flat(client.model), start)
    return client, start


def initialized_nnx_client(exchanger_of=lambda module: percentage_exchanger(0.5), train_fn=no_train, seed: int = 1):
    module = nnx_model()
    client = ExchangerClient(module, exchanger_of(module), train_fn)
    start = random_layers(NNX_SHAPES, seed)
    client.receive(in_order(start, NNX_NAMES), WHOLE)
    assert client.model is module and client.state.version == 0
    assert_layers(ref_flat(module), start)
    return client, start


def test_reference_names_match_the_models():
    # The hand-written names and order are the library's flatten order, for both kinds.
    assert list(ref_flat(linen_variables())) == LINEN_NAMES
    assert list(jaxlayerx.flatten(linen_variables())) == LINEN_NAMES
    assert {k: v.shape for k, v in ref_flat(linen_variables()).items()} == LINEN_SHAPES
    assert list(ref_flat(nnx_model())) == NNX_NAMES
    assert list(jaxlayerx.flatten(nnx_model())) == NNX_NAMES
    assert {k: v.shape for k, v in ref_flat(nnx_model()).items()} == NNX_SHAPES
    assert linen_fedbn().layers_to_transfer == LINEN_DENSE


# ---------------------------------------------------------------------------------------
# 1. First payload
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["flatten", "reversed", "shuffled"])
def test_first_payload_named_any_order_linen(order):
    # A whole model sent named (the server says so: base-round -1) is applied by name.
    client = ExchangerClient(linen_variables(), percentage_exchanger(0.5), no_train)
    assert not client.initialized and client.state.version is None
    sent = random_layers(LINEN_SHAPES, seed=3)
    names = {
        "flatten": LINEN_NAMES,
        "reversed": LINEN_NAMES[::-1],
        "shuffled": [LINEN_NAMES[i] for i in (5, 0, 7, 2, 4, 1, 6, 3)],
    }[order]
    client.receive(packed(sent, names), {BASE_ROUND: -1, VERSION: 4})
    assert client.initialized and client.state.version == 4
    assert_layers(ref_flat(client.model), sent)  # params AND batch_stats, every layer


def test_first_payload_named_without_the_servers_word_is_the_whole_model():
    # Named arrays with no config, to a client that holds nothing: the whole model, named
    # (what a server that states no version may send first); one layer short is refused
    # and changes nothing.
    client = ExchangerClient(linen_variables(), percentage_exchanger(0.5), no_train)
    before = ref_flat(client.model)
    sent = random_layers(LINEN_SHAPES, seed=3)
    short = {name: value for name, value in sent.items() if name != LINEN_NAMES[0]}
    with pytest.raises(ValueError, match="must hold every layer, whole; 1 missing"):
        client.receive(packed(short))
    assert not client.initialized
    assert_layers(ref_flat(client.model), before)
    client.receive(packed(sent))
    assert client.initialized and client.state.version == -1  # jaxlayerx.protocol.UNVERSIONED
    assert_layers(ref_flat(client.model), sent)


def test_first_payload_unnamed_full_list_linen():
    # fl4health's initial parameters: one array per layer, in flatten order, no names, no
    # version: the client holds a model of unstated version.
    client = ExchangerClient(linen_variables(), FullParameterExchanger(), no_train)
    sent = random_layers(LINEN_SHAPES, seed=4)
    client.receive([sent[name] for name in LINEN_NAMES])
    assert client.initialized
    assert client.state.version == -1  # jaxlayerx.protocol.UNVERSIONED
    assert_layers(ref_flat(client.model), sent)


@pytest.mark.parametrize("named", [True, False])
def test_first_payload_nnx_updated_in_place(named):
    module = nnx_model()
    client = ExchangerClient(module, LayerExchangerWithExclusions(module, {nnx.BatchNorm}), no_train)
    sent = random_layers(NNX_SHAPES, seed=5)
    payload = packed(sent, NNX_NAMES[::-1]) if named else [sent[name] for name in NNX_NAMES]
    config = WHOLE if named else {}
    # Through fit, as Flower calls it: the first payload is applied whole (BN layers too).
    record = []

    def train_fn(model, config):
        record.append(ref_flat(model))
        return model, 1, {}

    client.train_fn = train_fn
    client.fit(payload, config)
    assert client.model is module  # the same module, updated in place
    assert_layers(ref_flat(module), sent)
    assert_layers(record[0], sent)
    assert client.initialized


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_first_payload_missing_a_layer(kind):
    if kind == "linen":
        model, shapes, missing = linen_variables(), LINEN_SHAPES, "params/Dense_1/kernel"
    else:
        model, shapes, missing = nnx_model(), NNX_SHAPES, "l2/kernel"
    client = ExchangerClient(model, percentage_exchanger(0.5), no_train)
    before = ref_flat(client.model)
    sent = random_layers(shapes, seed=6)
    del sent[missing]
    with pytest.raises(ValueError, match=f"whole model must hold every layer.*1 missing.*{missing}"):
        client.receive(packed(sent, list(sent)[::-1]), WHOLE)
    assert not client.initialized
    assert_layers(ref_flat(client.model), before)
    assert_layers(ref_flat(model), before)
    # the same through fit: nothing trained, nothing changed
    calls = []
    client.train_fn = lambda model, config: calls.append(1) or (model, 1, {})
    with pytest.raises(ValueError, match=missing):
        client.fit(packed(sent), WHOLE)
    assert calls == []
    assert not client.initialized
    assert_layers(ref_flat(client.model), before)


def test_first_payload_unnamed_wrong_count():
    client = ExchangerClient(linen_variables(), FullParameterExchanger(), no_train)
    before = ref_flat(client.model)
    sent = random_layers(LINEN_SHAPES, seed=7)
    with pytest.raises(ValueError, match=r"expected 8 arrays \(one per layer, in order\), got 7"):
        client.receive([sent[name] for name in LINEN_NAMES[:-1]])
    assert not client.initialized
    assert_layers(ref_flat(client.model), before)


# ---------------------------------------------------------------------------------------
# 2. Later payloads
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_later_named_partial_payload_dynamic(kind):
    if kind == "linen":
        client, start = initialized_linen_client(percentage_exchanger(0.5))
        shapes, update = LINEN_SHAPES, ["params/Dense_1/kernel", "batch_stats/BatchNorm_0/var"]
    else:
        client, start = initialized_nnx_client()
        shapes, update = NNX_SHAPES, ["l2/kernel", "bn/var"]
    new = random_layers(shapes, seed=8)
    client.receive(packed({name: new[name] for name in update}), UPDATE)
    expected = {name: (new[name] if name in update else start[name]) for name in start}
    assert_layers(ref_flat(client.model), expected)
    assert client.state.version == 1  # the version the config says the update brings


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_later_payload_fedbn_keeps_batchnorm_local(kind):
    if kind == "linen":
        client, start = initialized_linen_client(linen_fedbn())
        shapes, shared = LINEN_SHAPES, LINEN_DENSE
    else:
        client, start = initialized_nnx_client(lambda m: LayerExchangerWithExclusions(m, {nnx.BatchNorm}))
        shapes, shared = NNX_SHAPES, NNX_LINEAR
    new = random_layers(shapes, seed=9)
    client.receive(packed(new, list(new)[::-1]))  # every layer, BatchNorm ones included
    expected = {name: (new[name] if name in shared else start[name]) for name in start}
    assert_layers(ref_flat(client.model), expected)


def test_later_payload_fixed_exchanger_applies_only_its_layers():
    fixed = ["params/Dense_1/kernel", "params/Dense_0/bias"]
    client, start = initialized_linen_client(FixedLayerExchanger(fixed))
    new = random_layers(LINEN_SHAPES, seed=10)
    client.receive(packed(new))
    expected = {name: (new[name] if name in fixed else start[name]) for name in start}
    assert_layers(ref_flat(client.model), expected)


def test_later_unnamed_payload_is_the_exchangers_layers_in_its_order():
    # A plain fl4health FedAvg server sends a fixed exchanger's layers unnamed, in the
    # exchanger's order (not flatten order): they are applied positionally.
    fixed = ["params/Dense_1/kernel", "params/Dense_0/bias"]
    client, start = initialized_linen_client(FixedLayerExchanger(fixed))
    new = random_layers(LINEN_SHAPES, seed=11)
    client.receive([new[name] for name in fixed])
    expected = {name: (new[name] if name in fixed else start[name]) for name in start}
    assert_layers(ref_flat(client.model), expected)
    # The wrong count is refused, naming the expected count, and changes nothing.
    with pytest.raises(ValueError, match=r"expected 2 arrays \(one per layer, in order\), got 1"):
        client.receive([new["params/Dense_1/kernel"]])
    assert_layers(ref_flat(client.model), expected)


def test_later_unnamed_full_model_for_a_fedbn_client_skips_nothing_it_does_not_expect():
    # FedBN exchanges every layer but BatchNorm's, so an unnamed payload must hold exactly
    # those, in flatten order; the BatchNorm layers stay local.
    client, start = initialized_linen_client(linen_fedbn())
    new = random_layers(LINEN_SHAPES, seed=12)
    client.receive([new[name] for name in LINEN_NAMES if name not in LINEN_BN])
    expected = {name: (start[name] if name in LINEN_BN else new[name]) for name in start}
    assert_layers(ref_flat(client.model), expected)


@pytest.mark.parametrize("base", [1, 3])
def test_an_update_over_a_version_the_client_does_not_hold_is_refused(base):
    # The client holds version 0; an update over any other version is refused whole, and
    # the client keeps its model, its version and its exchanger's state.
    client, start = initialized_linen_client(FullParameterExchanger(quantize="int8"))
    exchange = client.state.exchange
    assert list(exchange.reference) == LINEN_NAMES  # seeded whole from the first model
    new = random_layers(LINEN_SHAPES, seed=14)
    with pytest.raises(VersionMismatchError, match=f"over global version {base}, but the client holds version 0"):
        client.receive(packed({name: new[name] for name in LINEN_NAMES[:4]}), {BASE_ROUND: base, VERSION: 4})
    assert client.state.version == 0
    assert client.state.exchange is exchange
    assert_layers(ref_flat(client.model), start)
    # the update over the version it holds is applied, and it then holds the new version
    client.receive(packed({name: new[name] for name in LINEN_NAMES[:4]}), {BASE_ROUND: 0, VERSION: 4})
    assert client.state.version == 4
    assert_layers(ref_flat(client.model), dict(start, **{name: new[name] for name in LINEN_NAMES[:4]}))
    # the reference follows exactly what was pulled
    assert_layers(client.state.exchange.reference, ref_flat(client.model))


def test_a_whole_model_resets_a_client_of_any_version():
    # A client the server forgot gets the whole model again (base-round -1): applied whole,
    # whatever version the client held.
    client, start = initialized_linen_client(percentage_exchanger(0.5))
    client.receive(packed({"params/Dense_0/bias": np.ones(3, np.float32)}), UPDATE)
    assert client.state.version == 1
    new = random_layers(LINEN_SHAPES, seed=15)
    client.receive(in_order(new, LINEN_NAMES), {BASE_ROUND: -1, VERSION: 5})
    assert client.state.version == 5
    assert_layers(ref_flat(client.model), new)


# ---------------------------------------------------------------------------------------
# 3. fit()
# ---------------------------------------------------------------------------------------

# Layer deltas chosen so the normalized and unnormalized rankings differ, with exact ties
# (drift 0) among the layers left alone:
#   Dense_0/kernel (12 elements) 1.0: ||.|| = sqrt(12) = 3.46, /12 = 0.289
#   Dense_1/kernel (6)           0.9: 0.9*sqrt(6) = 2.20,     /6 = 0.367
#   BatchNorm_0/mean (3)         0.8: 0.8*sqrt(3) = 1.39,     /3 = 0.462
#   Dense_1/bias (2)             0.5: 0.5*sqrt(2) = 0.707,    /2 = 0.354
LINEN_DELTAS = {
    "params/Dense_0/kernel": 1.0,
    "params/Dense_1/kernel": 0.9,
    "batch_stats/BatchNorm_0/mean": 0.8,
    "params/Dense_1/bias": 0.5,
}
NNX_DELTAS = {"l1/kernel": 1.0, "l2/kernel": 0.9, "bn/mean": 0.8, "l2/bias": 0.5}
# Hand-computed picks (N = 8): p = 0.375 -> 3 layers; p = 0.75 -> 6 (the 4 moved ones, then
# the two earliest unmoved ones: batch_stats/BatchNorm_0/var, params/BatchNorm_0/bias).
HAND_PICKS = {
    (0.375, False): ["batch_stats/BatchNorm_0/mean", "params/Dense_0/kernel", "params/Dense_1/kernel"],
    (0.375, True): ["batch_stats/BatchNorm_0/mean", "params/Dense_1/bias", "params/Dense_1/kernel"],
    (0.75, True): [
        "batch_stats/BatchNorm_0/mean",
        "batch_stats/BatchNorm_0/var",
        "params/BatchNorm_0/bias",
        "params/Dense_0/kernel",
        "params/Dense_1/bias",
        "params/Dense_1/kernel",
    ],
}


@pytest.mark.parametrize("p", [0.375, 0.75])
@pytest.mark.parametrize("normalize", [True, False])
def test_fit_dynamic_linen_selection_and_metrics(p, normalize):
    record: list = []
    train_fn = shifting_train_fn(LINEN_DELTAS, record, metrics={"train_loss": 0.25, "note": "hi"})
    client, start = initialized_linen_client(percentage_exchanger(p, normalize), train_fn)
    new = random_layers(LINEN_SHAPES, seed=11)
    update = ["params/Dense_0/kernel", "batch_stats/BatchNorm_0/var"]
    config = {"current_server_round": 2, "lr": 0.1}
    payload, num_examples, metrics = client.fit(packed({name: new[name] for name in update}), config)

    received = {name: (new[name] if name in update else start[name]) for name in start}
    # train_fn got the model as received, and the config
    assert len(record) == 1
    assert_layers(record[0]["received"], received)
    assert record[0]["config"] == config
    trained = ref_flat(client.model)
    expected_trained = {n: v + np.float32(LINEN_DELTAS.get(n, 0.0)) for n, v in received.items()}
    assert_layers(trained, expected_trained)

    picks = ref_percentage_pick(trained, received, p, normalize)
    if (p, normalize) in HAND_PICKS:
        assert picks == HAND_PICKS[(p, normalize)]  # the numpy reference agrees with the hand count
    assert jaxlayerx.is_packed(payload)
    sent = unpack(payload)
    assert list(sent) == picks
    assert_layers(sent, {name: trained[name] for name in picks})

    assert num_examples == 7
    assert metrics["train_loss"] == 0.25 and metrics["note"] == "hi"
    assert metrics["layers_sent"] == len(picks)
    # bytes as Flower carries them: each array's numpy.save blob, header included
    assert metrics["payload_bytes"] == serialized_size(payload)
    assert metrics["payload_bytes"] > sum(np.asarray(a).nbytes for a in payload)
    assert jaxlayerx.payload_nbytes(payload) == serialized_size(payload)
    assert set(metrics) == {"train_loss", "note", "layers_sent", "payload_bytes"}


# Same sizes and deltas as the Linen model; NNX's flatten order puts bn/bias, bn/scale first
# among the unmoved layers (l1/bias is moved by the payload, not by training: drift 0).
NNX_HAND_PICKS = {
    (0.375, False): ["bn/mean", "l1/kernel", "l2/kernel"],
    (0.375, True): ["bn/mean", "l2/bias", "l2/kernel"],
    (0.75, True): ["bn/bias", "bn/mean", "bn/scale", "l1/kernel", "l2/bias", "l2/kernel"],
}


@pytest.mark.parametrize("p, normalize", list(NNX_HAND_PICKS))
def test_fit_dynamic_nnx_in_place_training_uses_pre_training_state(p, normalize):
    record = []

    def train_fn(module, config):
        record.append(ref_flat(module))
        for name, delta in NNX_DELTAS.items():  # mutates the module in place
            set_nnx_layer(module, name, record[-1][name] + np.float32(delta))
        return module, 3, {"train_loss": 1.5}

    client, start = initialized_nnx_client(lambda m: percentage_exchanger(p, normalize), train_fn)
    module = client.model
    payload, num_examples, metrics = client.fit(packed({"l1/bias": start["l1/bias"] + 1}), {})
    received = dict(start, **{"l1/bias": start["l1/bias"] + 1})
    assert_layers(record[0], received)
    assert client.model is module
    trained = ref_flat(module)
    for name in NNX_NAMES:
        assert np.array_equal(trained[name], received[name] + np.float32(NNX_DELTAS.get(name, 0.0)))
    picks = ref_percentage_pick(trained, received, p, normalize)
    assert picks == NNX_HAND_PICKS[(p, normalize)]  # the numpy reference agrees with the hand count
    sent = unpack(payload)
    assert list(sent) == picks
    assert_layers(sent, {name: trained[name] for name in picks})
    assert metrics == {"train_loss": 1.5, "layers_sent": len(picks), "payload_bytes": serialized_size(payload)}
    assert num_examples == 3


@pytest.mark.parametrize("which", ["fixed", "fedbn-linen", "fedbn-nnx"])
def test_fit_fixed_or_exclusions_sends_named_layers(which):
    if which == "fixed":
        layers = ["params/Dense_1/kernel", "params/Dense_0/bias", "batch_stats/BatchNorm_0/mean"]
        record: list = []
        client, start = initialized_linen_client(FixedLayerExchanger(layers), shifting_train_fn(LINEN_DELTAS, record))
    elif which == "fedbn-linen":
        layers = LINEN_DENSE
        record = []
        client, start = initialized_linen_client(linen_fedbn(), shifting_train_fn(LINEN_DELTAS, record))
    else:
        layers = NNX_LINEAR

        def train_fn(module, config):
            for name, delta in NNX_DELTAS.items():
                set_nnx_layer(module, name, ref_flat(module)[name] + np.float32(delta))
            return module, 2, {}

        client, start = initialized_nnx_client(lambda m: LayerExchangerWithExclusions(m, {nnx.BatchNorm}), train_fn)
    payload, _, metrics = client.fit(packed({}), {})  # an empty selection: nothing changes
    assert jaxlayerx.is_packed(payload)
    assert payload[-1].ndim == 1 and payload[-1].dtype.kind == "U"
    sent = unpack(payload)
    assert list(sent) == layers
    trained = ref_flat(client.model)
    deltas = NNX_DELTAS if which == "fedbn-nnx" else LINEN_DELTAS
    for name in start:  # the model really trained
        assert np.array_equal(trained[name], start[name] + np.float32(deltas.get(name, 0.0)))
    assert_layers(sent, {name: trained[name] for name in layers})
    assert metrics["layers_sent"] == len(layers)
    assert metrics["payload_bytes"] == serialized_size(payload)


def test_fit_dynamic_selecting_nothing_sends_empty_names():
    # threshold rule with a threshold no drift reaches: an empty, still-named payload
    exchanger = DynamicLayerExchanger(
        LayerSelectionFunctionConstructor(norm_threshold=1e6, exchange_percentage=0.5).select_by_threshold()
    )
    client, _ = initialized_linen_client(exchanger, shifting_train_fn(LINEN_DELTAS, []))
    payload, _, metrics = client.fit(packed({}), {})
    assert len(payload) == 1 and payload[0].ndim == 1 and payload[0].size == 0
    assert payload[0].dtype.kind == "U"
    assert metrics["layers_sent"] == 0 and metrics["payload_bytes"] == npy_size(payload[0])


def test_evaluate_applies_payload_and_passes_config():
    seen = []

    def evaluate_fn(model, config):
        seen.append((ref_flat(model), dict(config)))
        return np.float32(0.5), 9, {"accuracy": 0.75}

    client, start = initialized_linen_client(percentage_exchanger(0.5), evaluate_fn=evaluate_fn)
    new = random_layers(LINEN_SHAPES, seed=12)
    loss, n, metrics = client.evaluate(packed({"params/Dense_1/bias": new["params/Dense_1/bias"]}), {"k": 1})
    assert (loss, n, metrics) == (0.5, 9, {"accuracy": 0.75}) and type(loss) is float
    assert seen[0][1] == {"k": 1}
    assert_layers(seen[0][0], dict(start, **{"params/Dense_1/bias": new["params/Dense_1/bias"]}))


# ---------------------------------------------------------------------------------------
# 4. Bad results from user functions; constructor checks
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "result, match",
    [
        (lambda m: (m, 3), r"train_fn must return \(model, num_examples, metrics\), got tuple"),
        (lambda m: [m, 3, {}], r"train_fn must return \(model, num_examples, metrics\), got list"),
        (lambda m: (m, 3.0, {}), r"integer num_examples >= 0 and at most 2\*\*64 - 1, got 3\.0"),
        (lambda m: (m, -1, {}), r"integer num_examples >= 0 and at most 2\*\*64 - 1, got -1"),
        (lambda m: (m, True, {}), r"integer num_examples >= 0 and at most 2\*\*64 - 1, got True"),
        (lambda m: (m, 3, [("loss", 1.0)]), r"metrics dict, got list"),
        (lambda m: (m, 3, None), r"metrics dict, got NoneType"),
    ],
)
def test_fit_bad_train_fn_result(result, match):
    def train_fn(model, config):
        moved = nest({n: v + 100.0 for n, v in ref_flat(model).items()})  # would be a change
        return result(moved)

    client, start = initialized_linen_client(percentage_exchanger(0.5), train_fn)
    new = random_layers(LINEN_SHAPES, seed=13)
    payload = packed({"params/Dense_0/bias": new["params/Dense_0/bias"]})
    with pytest.raises(TypeError, match=match):
        client.fit(payload, {})
    # the (valid) payload was applied; the bad training result was not adopted
    assert_layers(ref_flat(client.model), dict(start, **{"params/Dense_0/bias": new["params/Dense_0/bias"]}))


def test_evaluate_without_evaluate_fn():
    client, start = initialized_linen_client(percentage_exchanger(0.5))
    with pytest.raises(NotImplementedError, match="without an evaluate_fn"):
        client.evaluate(packed({}), {})
    assert_layers(ref_flat(client.model), start)


@pytest.mark.parametrize(
    "loss, match",
    [("0.5", r"real loss, got '0\.5'"), (1 + 2j, r"real loss, got \(1\+2j\)"), (None, "real loss, got None")],
)
def test_evaluate_non_real_loss(loss, match):
    client, start = initialized_linen_client(percentage_exchanger(0.5), evaluate_fn=lambda model, config: (loss, 4, {}))
    with pytest.raises(TypeError, match=match):
        client.evaluate(packed({}), {})
    assert_layers(ref_flat(client.model), start)


@pytest.mark.parametrize(
    "result, match",
    [
        (lambda: (0.5, 4), r"evaluate_fn must return \(loss, num_examples, metrics\)"),
        (
            lambda: (0.5, -2, {}),
            r"evaluate_fn must return an integer num_examples >= 0 and at most 2\*\*64 - 1, got -2",
        ),
        (lambda: (0.5, 4, "m"), r"evaluate_fn must return a metrics dict, got str"),
    ],
)
def test_evaluate_bad_result_shape(result, match):
    client, start = initialized_linen_client(percentage_exchanger(0.5), evaluate_fn=lambda m, c: result())
    with pytest.raises(TypeError, match=match):
        client.evaluate(packed({}), {})
    assert_layers(ref_flat(client.model), start)


class _MaskOnly:
    """An exchanger that writes send_mask but neither subclasses ExchangerBase nor has push/pull."""

    payload_kind = "named"
    error_feedback = False
    quantize = None

    def send_mask(self, current, reference):
        return {name: True for name in current}


class _BadQuantize(jaxlayerx.ExchangerBase):
    payload_kind = "named"
    quantize = "int4"

    def send_mask(self, current, reference):
        return {name: True for name in current}


def test_constructor_checks():
    variables = linen_variables()
    before = ref_flat(variables)
    with pytest.raises(TypeError, match="train_fn must be callable"):
        ExchangerClient(variables, FullParameterExchanger(), 42)
    with pytest.raises(TypeError, match="evaluate_fn must be callable"):
        ExchangerClient(variables, FullParameterExchanger(), no_train, "not a function")
    with pytest.raises(TypeError, match="needs a send_mask method; object has none"):
        ExchangerClient(variables, object(), no_train)
    with pytest.raises(TypeError, match="needs a init_state method; _MaskOnly has none"):
        ExchangerClient(variables, _MaskOnly(), no_train)
    with pytest.raises(TypeError, match="quantize must be None, 'bf16' or 'int8'; _BadQuantize has 'int4'"):
        ExchangerClient(variables, _BadQuantize(), no_train)
    with pytest.raises(ValueError, match="sparse must be 'compact' or 'coo'"):
        ExchangerClient(variables, FullParameterExchanger(), no_train, sparse_wire="csr")
    assert_layers(ref_flat(variables), before)


# ---------------------------------------------------------------------------------------
# 5. Bad server payloads after initialization
# ---------------------------------------------------------------------------------------


def _bad_payloads(kind: str):
    """(payload, exception, match) with a valid layer first: nothing may be half applied.
    Sent as an update (the server's config names the base version the client holds)."""
    if kind == "linen":
        good, good_shape = "params/Dense_0/bias", (3,)
        target, shape = "params/Dense_0/kernel", (4, 3)
    else:
        good, good_shape = "l1/bias", (3,)
        target, shape = "l1/kernel", (4, 3)
    ok = np.full(good_shape, 123.0, np.float32)
    value = np.full(shape, 7.0, np.float32)
    return {
        "wrong-shape": (
            [ok, np.full((3, 4), 7.0, np.float32), np.array([good, target])],
            ValueError,
            rf"{target}.*expected shape \(4, 3\), got \(3, 4\)",
        ),
        "unknown-name": (
            [ok, value, np.array([good, "head/Dense_9/kernel"])],
            KeyError,
            r"head/Dense_9/kernel",
        ),
        "complex64": (
            [ok, value.astype(np.complex64), np.array([good, target])],
            TypeError,
            rf"{target}.*float32 layer does not accept complex64",
        ),
        "int-names": ([ok, value, np.array([1, 2])], ValueError, r"names array.*dtype int64"),
        "object-names": ([ok, value, np.array([good, target], dtype=object)], ValueError, r"names array.*dtype object"),
        "bytes-names": (
            [ok, value, np.array([good.encode(), target.encode()])],
            ValueError,
            r"names array.*dtype \|S",
        ),
        "2d-names": ([ok, value, np.array([[good, target]])], ValueError, r"names array.*shape \(1, 2\)"),
        "unnamed": ([ok, value], ValueError, r"names array.*got 2 arrays"),
        "count-mismatch": ([ok, value, np.array([good])], ValueError, r"2 arrays but 1 layer names"),
        "duplicate-names": ([ok, ok, np.array([good, good])], ValueError, rf"duplicate.*{good}"),
    }


BAD_CASES = list(_bad_payloads("linen"))


@pytest.mark.parametrize("kind", ["linen", "nnx"])
@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_server_payload_changes_nothing(kind, case):
    payload, error, match = _bad_payloads(kind)[case]
    if kind == "linen":
        client, start = initialized_linen_client(percentage_exchanger(0.5))
    else:
        client, start = initialized_nnx_client()
    module = client.model
    state = client.state
    with pytest.raises(error, match=match):
        client.receive(payload, UPDATE)
    assert client.initialized
    assert client.state is state and client.state.version == 0  # the version did not move
    assert_layers(ref_flat(client.model), start)
    if kind == "nnx":
        assert client.model is module
    calls = []
    client.train_fn = lambda model, config: calls.append(1) or (model, 1, {})
    with pytest.raises(error, match=match):
        client.fit(payload, UPDATE)
    assert calls == []  # never trained on a rejected payload
    assert client.state is state
    assert_layers(ref_flat(client.model), start)


def test_unnamed_arrays_without_config_are_a_whole_model_of_the_right_count():
    # With no config (a plain fl4health FedAvg server), unnamed arrays sent to a client of a
    # named exchanger are every layer in model order: any other count is refused whole.
    client, start = initialized_linen_client(percentage_exchanger(0.5))
    new = random_layers(LINEN_SHAPES, seed=16)
    with pytest.raises(ValueError, match=r"expected 8 arrays \(one per layer, in order\), got 2"):
        client.receive(in_order(new, LINEN_NAMES[:2]))
    assert_layers(ref_flat(client.model), start)
    client.receive(in_order(new, LINEN_NAMES))
    assert_layers(ref_flat(client.model), new)


def test_unknown_name_is_a_key_error_listing_the_name():
    client, start = initialized_linen_client(percentage_exchanger(0.5))
    with pytest.raises(jaxlayerx.UnknownLayerError) as info:
        client.receive([np.zeros(3, np.float32), np.array(["params/Dense_7/bias"])])
    assert isinstance(info.value, KeyError)
    assert re.search(r"layer 'params/Dense_7/bias' is not in the model; closest valid layers", str(info.value))
    assert "params/Dense_0/bias" in str(info.value) or "params/Dense_1/bias" in str(info.value)  # suggestions
    assert_layers(ref_flat(client.model), start)


# ---------------------------------------------------------------------------------------
# 6. Interop with fl4health's layout
# ---------------------------------------------------------------------------------------


def test_server_side_hand_built_fl4health_payload_applied_by_name():
    client, start = initialized_linen_client(percentage_exchanger(0.5))
    w1 = np.arange(12, dtype=np.float32).reshape(4, 3) / 4  # kernel
    w2 = np.array([-1.0, 0.5, 2.0], np.float32)  # bias
    names = np.array(["params/Dense_0/kernel", "params/Dense_0/bias"])
    assert names.dtype == np.dtype("<U21") and names.dtype.kind == "U"
    client.receive([w1, w2, names])
    expected = dict(start, **{"params/Dense_0/kernel": w1, "params/Dense_0/bias": w2})
    assert_layers(ref_flat(client.model), expected)


def test_client_side_payload_is_fl4health_layout_and_saves_without_pickle():
    record: list = []
    client, start = initialized_linen_client(percentage_exchanger(0.5), shifting_train_fn(LINEN_DELTAS, record))
    payload, _, _ = client.fit(packed({}), {})
    assert isinstance(payload, list)
    assert all(isinstance(a, np.ndarray) for a in payload)
    names = payload[-1]
    assert names.ndim == 1 and names.dtype.kind == "U"
    trained = ref_flat(client.model)
    assert len(payload) == len(names) + 1 == 4 + 1  # ceil(8 * 0.5) = 4 layers, then names
    for array, name in zip(payload[:-1], names.tolist()):
        assert np.array_equal(array, trained[name]) and array.dtype == trained[name].dtype
    for array in payload:
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        buffer.seek(0)
        loaded = np.load(buffer, allow_pickle=False)
        assert loaded.dtype == array.dtype and np.array_equal(loaded, array)
    # and through Flower's own serialization
    back = parameters_to_ndarrays(ndarrays_to_parameters(payload))
    assert back[-1].tolist() == names.tolist() and back[-1].dtype.kind == "U"
    assert all(np.array_equal(a, b) for a, b in zip(back[:-1], payload[:-1]))


def test_fl4health_empty_selection_is_no_layers():
    empty = np.array([])
    assert empty.dtype == np.float64 and empty.size == 0
    for make in (lambda: initialized_linen_client(percentage_exchanger(0.5)), initialized_nnx_client):
        client, start = make()
        client.receive([empty])
        assert_layers(ref_flat(client.model), start)
    record: list = []
    client, start = initialized_linen_client(linen_fedbn(), shifting_train_fn({}, record))
    client.fit([np.array([])], {})
    assert_layers(record[0]["received"], start)


# ---------------------------------------------------------------------------------------
# 7. bfloat16 through Flower's serialization
# ---------------------------------------------------------------------------------------


def _bf16_bits(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """bfloat16 values from bit patterns: random finite ones plus -0, a subnormal, inf, NaN."""
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2**16, size=shape, dtype=np.uint16)
    bits = np.where((bits & 0x7F80) == 0x7F80, bits & 0xBFFF, bits).astype(np.uint16)  # no inf/NaN
    flat = bits.reshape(-1)
    flat[:3] = [0x8000, 0x0001, 0x7F80]  # -0.0, smallest subnormal, +inf
    if flat.size > 3:
        flat[3] = 0x7FC0  # the quiet NaN
    return bits.view(ml_dtypes.bfloat16)


def bf16_server_payload(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "params/Dense_0/bias": _bf16_bits((3,), seed),
        "params/Dense_0/kernel": _bf16_bits((4, 3), seed + 1),
        "params/Dense_1/bias": rng.standard_normal(2).astype(np.float32),
        "params/Dense_1/kernel": rng.standard_normal((3, 2)).astype(np.float32),
    }


def bits(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    return array.view(np.uint16) if array.dtype.itemsize == 2 else array.view(np.uint32)


def assert_bits(actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]) -> None:
    assert list(actual) == list(expected)
    for name in expected:
        assert np.asarray(actual[name]).dtype == np.asarray(expected[name]).dtype, name
        assert np.array_equal(bits(actual[name]), bits(expected[name])), name


def flower_round_trip(payload: list[np.ndarray]) -> list[np.ndarray]:
    return parameters_to_ndarrays(ndarrays_to_parameters(payload))


def bf16_train_fn(record: list):
    def train_fn(variables, config):
        record.append(ref_flat(variables))
        trained = {n: (v * np.asarray(2, v.dtype) + np.asarray(0.375, v.dtype)) for n, v in record[-1].items()}
        return nest(trained), 5, {}

    return train_fn


def test_bf16_model_survives_flower_round_trip_bit_exactly():
    variables = bf16_variables()
    assert {n: v.dtype for n, v in ref_flat(variables).items()} == {
        "params/Dense_0/bias": np.dtype(ml_dtypes.bfloat16),
        "params/Dense_0/kernel": np.dtype(jnp.bfloat16),
        "params/Dense_1/bias": np.dtype(np.float32),
        "params/Dense_1/kernel": np.dtype(np.float32),
    }
    record: list = []
    client = ExchangerClient(variables, FullParameterExchanger(), bf16_train_fn(record))

    server = bf16_server_payload(seed=20)
    wire = flower_round_trip(packed(server, BF16_NAMES[::-1]))  # the whole model, named
    for array, name in zip(wire[:-1], wire[-1].tolist()):
        if name in BF16_LAYERS:
            assert array.dtype == np.dtype("|V2") and array.dtype.kind == "V"  # the dtype is lost
        else:
            assert array.dtype == np.float32

    payload, _, _ = client.fit(wire, WHOLE)
    assert_bits(record[0], server)  # applied bit-identically, back in bfloat16
    model = ref_flat(client.model)
    assert model["params/Dense_0/kernel"].dtype == np.dtype(ml_dtypes.bfloat16)
    assert not np.array_equal(bits(model["params/Dense_0/kernel"]), bits(server["params/Dense_0/kernel"]))

    back = flower_round_trip(payload)
    names = back[-1].tolist()
    assert sorted(names) == sorted(BF16_NAMES)
    for array, name in zip(back[:-1], names):
        if name in BF16_LAYERS:
            assert array.dtype == np.dtype("|V2")
    conformed = {
        name: np.asarray(jaxlayerx.conform_layer(name, value, model[name])) for name, value in zip(names, back[:-1])
    }
    assert_bits({n: conformed[n] for n in BF16_NAMES}, model)

    # a later, partial bfloat16 payload through Flower again
    later = _bf16_bits((4, 3), seed=30)
    client.receive(flower_round_trip(packed({"params/Dense_0/kernel": later})), UPDATE)
    assert_bits(ref_flat(client.model), dict(model, **{"params/Dense_0/kernel": later}))
    # and the same whole model unnamed, in model order (fl4health's initial parameters)
    unnamed = ExchangerClient(bf16_variables(), FullParameterExchanger(), bf16_train_fn([]))
    unnamed.receive(flower_round_trip(in_order(server, BF16_NAMES)))
    assert_bits(ref_flat(unnamed.model), server)


def test_bf16_local_layers_persist_through_stateful_client_fn():
    record: list = []

    def make_client(context):
        return ExchangerClient(bf16_variables(), FixedLayerExchanger(["params/Dense_1/kernel"]), bf16_train_fn(record))

    client_fn = stateful_client_fn(make_client)
    context = Context(run_id=0, node_id=1, node_config={}, state=RecordDict(), run_config={})
    server = bf16_server_payload(seed=40)
    client_fn(context).fit(FitIns(ndarrays_to_parameters(in_order(server, BF16_NAMES)), WHOLE))
    round1 = {n: (v * np.asarray(2, v.dtype) + np.asarray(0.375, v.dtype)) for n, v in server.items()}
    kernel = np.full((3, 2), -3.0, np.float32)
    client_fn(context).fit(FitIns(ndarrays_to_parameters(packed({"params/Dense_1/kernel": kernel})), UPDATE))
    # round 2 starts from round 1's trained bfloat16 layers, bit for bit
    assert_bits(record[1], dict(round1, **{"params/Dense_1/kernel": kernel}))


# ---------------------------------------------------------------------------------------
# 8. stateful_client_fn / client_app
# ---------------------------------------------------------------------------------------


def new_context() -> Context:
    return Context(run_id=0, node_id=1, node_config={}, state=RecordDict(), run_config={})


def test_stateful_client_fn_round_two_starts_from_saved_state():
    built: list = []
    record: list = []
    deltas = {"batch_stats/BatchNorm_0/mean": 0.5, "params/BatchNorm_0/scale": -0.25, "params/Dense_0/kernel": 1.0}
    train_fn = shifting_train_fn(deltas, record, metrics={"train_loss": 0.125})

    def make_client(context):
        variables = linen_variables()  # fresh init variables, every call
        client = ExchangerClient(variables, linen_fedbn(), train_fn)
        built.append((client, ref_flat(variables)))
        return client

    client_fn = stateful_client_fn(make_client)
    context = new_context()
    fresh = ref_flat(linen_variables())

    # round 1: the full model (named, the server saying it is the whole model)
    full = random_layers(LINEN_SHAPES, seed=50)
    res1 = client_fn(context).fit(FitIns(ndarrays_to_parameters(packed(full, LINEN_NAMES[::-1])), {"r": 1, **WHOLE}))
    assert res1.status.code == Code.OK
    assert_layers(record[0]["received"], full)
    assert record[0]["config"] == {"r": 1, **WHOLE}
    round1 = {name: value + np.float32(deltas.get(name, 0.0)) for name, value in full.items()}
    sent1 = unpack(parameters_to_ndarrays(res1.parameters))
    assert list(sent1) == LINEN_DENSE
    assert_layers(sent1, {name: round1[name] for name in LINEN_DENSE})
    assert res1.num_examples == 7
    assert res1.metrics["train_loss"] == 0.125 and res1.metrics["layers_sent"] == 4

    # what was saved: the layers, the version held and the exchanger's state, read back
    # with Flower's own records
    assert set(context.state) == {"jaxlayerx.layers", "jaxlayerx.version", "jaxlayerx.exchange"}
    saved = {name: array.numpy() for name, array in context.state.array_records["jaxlayerx.layers"].items()}
    assert_layers(saved, round1)
    assert context.state.config_records["jaxlayerx.version"]["version"] == 0
    assert len(context.state.array_records["jaxlayerx.exchange"]) == 0  # no error feedback, no quantization

    # round 2: a new client from client_fn, a partial payload over version 0
    dense1 = np.full((3, 2), 0.5, np.float32)
    partial = ndarrays_to_parameters(packed({"params/Dense_1/kernel": dense1}))
    res2 = client_fn(context).fit(FitIns(partial, {"r": 2, **UPDATE}))
    assert res2.status.code == Code.OK
    assert len(built) == 2 and built[0][0] is not built[1][0]
    for _, variables in built:  # each made from fresh init variables
        assert_layers(variables, fresh)
    received2 = record[1]["received"]
    # local BatchNorm layers are round 1's trained values, not the fresh init
    for name in LINEN_BN:
        assert np.array_equal(received2[name], round1[name]), name
    assert any(not np.array_equal(round1[name], fresh[name]) for name in LINEN_BN)
    assert_layers(received2, dict(round1, **{"params/Dense_1/kernel": dense1}))
    assert built[1][0].initialized  # the partial payload was accepted: initialized persisted
    assert built[1][0].state.version == 1
    assert context.state.config_records["jaxlayerx.version"]["version"] == 1

    # without the saved state, a fresh client refuses the same partial payload
    with pytest.raises(ValueError, match="the first message must hold the whole model"):
        client_fn(new_context()).fit(FitIns(partial, UPDATE))
    # and a client of the saved state refuses an update over a version it does not hold
    with pytest.raises(VersionMismatchError, match="over global version 0, but the client holds version 1"):
        client_fn(context).fit(FitIns(partial, UPDATE))


def test_stateful_client_fn_saves_state_after_evaluate():
    record: list = []
    losses = []

    def evaluate_fn(model, config):
        losses.append(ref_flat(model))
        return 0.25, 3, {}

    def make_client(context):
        return ExchangerClient(linen_variables(), percentage_exchanger(0.5), shifting_train_fn({}, record), evaluate_fn)

    client_fn = stateful_client_fn(make_client)
    context = new_context()
    full = random_layers(LINEN_SHAPES, seed=60)
    client_fn(context).fit(FitIns(ndarrays_to_parameters(in_order(full, LINEN_NAMES)), WHOLE))
    bias = np.array([4.0, 5.0], np.float32)
    update = ndarrays_to_parameters(packed({"params/Dense_1/bias": bias}))
    res = client_fn(context).evaluate(EvaluateIns(update, UPDATE))
    assert res.loss == 0.25 and res.num_examples == 3
    assert_layers(losses[0], dict(full, **{"params/Dense_1/bias": bias}))
    assert context.state.config_records["jaxlayerx.version"]["version"] == 1  # saved after evaluate
    client_fn(context).fit(FitIns(ndarrays_to_parameters(packed({})), {BASE_ROUND: 1, VERSION: 2}))
    assert_layers(record[1]["received"], dict(full, **{"params/Dense_1/bias": bias}))


def test_make_client_must_return_an_exchanger_client():
    context = new_context()
    client_fn = stateful_client_fn(lambda context: {"not": "a client"})
    with pytest.raises(TypeError, match="make_client must return an ExchangerClient, got dict"):
        client_fn(context)
    assert len(context.state) == 0


def test_client_app_is_a_flower_client_app():
    app = client_app(lambda context: ExchangerClient(linen_variables(), FullParameterExchanger(), no_train))
    assert isinstance(app, ClientApp)


def test_get_parameters_is_every_layer_named():
    client, start = initialized_linen_client(linen_fedbn())  # even with FedBN: the full model
    payload = client.get_parameters({})
    assert jaxlayerx.is_packed(payload)
    assert_layers(unpack(payload), start)


@pytest.mark.parametrize(
    "loss", [jnp.float32(0.25), jnp.asarray(0.25, jnp.bfloat16), np.float64(0.25), np.asarray(0.25), 1]
)
def test_evaluate_accepts_real_scalars_of_any_array_kind(loss):
    # a jnp.mean(...) loss is a 0-d JAX array: it must be accepted, as a float
    client, _ = initialized_linen_client(percentage_exchanger(0.5), evaluate_fn=lambda model, config: (loss, 4, {}))
    result, count, _ = client.evaluate(packed({}), {})
    assert type(result) is float and result == 0.25 * (loss != 1) + (loss == 1) * 1.0 and count == 4


def test_evaluate_rejects_arrays_with_more_than_one_value():
    client, start = initialized_linen_client(
        percentage_exchanger(0.5), evaluate_fn=lambda model, config: (jnp.ones(2), 4, {})
    )
    with pytest.raises(TypeError, match="real loss"):
        client.evaluate(packed({}), {})
    assert_layers(ref_flat(client.model), start)


def test_train_fn_replacing_leaves_in_the_received_dicts_does_not_move_the_drift_reference():
    # A train_fn that writes new arrays into the nested dicts it was given (against the
    # docs, but easy to do) must not change what the drift is measured against.
    def train_in_place(model, config):
        model["params"]["Dense_1"]["kernel"] = model["params"]["Dense_1"]["kernel"] + 5.0
        return model, 4, {}

    client, start = initialized_linen_client(percentage_exchanger(0.125, normalize=False), train_in_place)
    payload, _, _ = client.fit(packed({}), {})
    # Only Dense_1/kernel moved (by 5 in each of its elements): the top 1 of 8 layers.
    sent = unpack(payload)
    assert list(sent) == ["params/Dense_1/kernel"]
    np.testing.assert_array_equal(sent["params/Dense_1/kernel"], start["params/Dense_1/kernel"] + np.float32(5.0))


# ---------------------------------------------------------------------------------------
# 9. Sparse exchangers (COO payloads, FedAvgSparseCooTensorStrategy or fl4health's server)
# ---------------------------------------------------------------------------------------


def sparse_exchanger(level: float = 0.25, error_feedback: bool = False):
    return jaxlayerx.SparseCooParameterExchanger(level, jaxlayerx.largest_magnitude_change_scores, error_feedback)


def ref_coo_entries(payload: list[np.ndarray]) -> dict[str, dict[tuple[int, ...], float]]:
    """A COO payload read with numpy: ``name -> {coordinates: value}``."""
    k = (len(payload) - 1) // 3
    assert len(payload) == 3 * k + 1 and payload[-1].dtype.kind == "U"
    out = {}
    for values, indices, shape, name in zip(payload[:k], payload[k : 2 * k], payload[2 * k : 3 * k], payload[-1]):
        assert values.ndim == 1 and indices.shape == (values.size, len(shape))
        out[str(name)] = {tuple(int(i) for i in index): value for index, value in zip(indices, values)}
    return out


@pytest.mark.parametrize("first", ["named", "unnamed"])
def test_sparse_client_round_trip(first):
    record: list = []
    deltas = {"params/Dense_0/kernel": 3.0, "params/Dense_1/bias": -2.0}
    client = ExchangerClient(linen_variables(), sparse_exchanger(0.25), shifting_train_fn(deltas, record))
    full = random_layers(LINEN_SHAPES, seed=70)
    payload, config = (packed(full), WHOLE) if first == "named" else (in_order(full, LINEN_NAMES), {})
    sent, n, metrics = client.fit(flower_round_trip(payload), config)
    assert_layers(record[0]["received"], full)
    trained = {name: value + np.float32(deltas.get(name, 0.0)) for name, value in full.items()}
    entries = ref_coo_entries(sent)
    # the reference rule in numpy: scores |trained - received|, the ceil(0.25 * total)-th best
    # is the threshold and every weight scoring at least that is sent (ties included)
    scores = np.concatenate([np.abs(trained[name] - full[name]).ravel() for name in LINEN_NAMES])
    threshold = np.sort(scores)[::-1][math.ceil(0.25 * scores.size) - 1]
    expected_entries = {
        name: {
            tuple(int(i) for i in index) for index in zip(*np.nonzero(np.abs(trained[name] - full[name]) >= threshold))
        }
        for name in LINEN_NAMES
    }
    assert {name: set(values) for name, values in entries.items()} == {
        name: chosen for name, chosen in expected_entries.items() if chosen
    }
    for name, values in entries.items():
        for index, value in values.items():
            assert value == trained[name][index], (name, index)
    assert n == 7
    assert metrics["payload_bytes"] == serialized_size(sent)
    assert metrics["layers_sent"] == len(entries)

    # a COO payload from the server: exactly its entries change
    server = [np.array([1.5, -4.0], np.float32), np.array([[0, 1], [3, 2]], np.int64), np.array([4, 3], np.int64)]
    client.receive(flower_round_trip([server[0], server[1], server[2], np.array(["params/Dense_0/kernel"])]))
    expected = {name: value.copy() for name, value in trained.items()}
    expected["params/Dense_0/kernel"][0, 1] = 1.5
    expected["params/Dense_0/kernel"][3, 2] = -4.0
    assert_layers(ref_flat(client.model), expected)


def test_sparse_client_with_the_compact_wire_sends_the_same_entries_compact():
    deltas = {"params/Dense_0/kernel": 3.0, "params/Dense_1/bias": -2.0}
    full = random_layers(LINEN_SHAPES, seed=70)
    sent = {}
    for wire in ("coo", "compact"):
        client = ExchangerClient(
            linen_variables(), sparse_exchanger(0.25), shifting_train_fn(deltas, []), sparse_wire=wire
        )
        payload, _, metrics = client.fit(in_order(full, LINEN_NAMES), WHOLE)
        assert metrics["payload_bytes"] == serialized_size(payload)
        sent[wire] = payload
    assert sent["compact"][0].dtype == np.uint8 and sent["compact"][0].ndim == 1  # the compact header
    assert all(array.dtype.kind != "U" for array in sent["compact"])  # no names array: not fl4health's layout
    # the compact values are the COO values, in the same (row-major, payload) order
    k = (len(sent["coo"]) - 1) // 3
    coo_values = np.concatenate(sent["coo"][:k])
    assert sent["compact"][1].dtype == np.float32
    np.testing.assert_array_equal(sent["compact"][1], coo_values)


def test_sparse_client_first_payload_must_be_dense_and_whole():
    client = ExchangerClient(linen_variables(), sparse_exchanger(), no_train)
    before = ref_flat(client.model)
    coo = [
        np.array([1.0], np.float32),
        np.array([[0]], np.int64),
        np.array([3], np.int64),
        np.array(["params/Dense_0/bias"]),
    ]
    for config in ({}, WHOLE):  # without the server's word, the first message must be the whole model too
        with pytest.raises(ValueError, match=r"whole model must hold every layer, whole; 8 missing or partial"):
            client.receive(coo, config)
    with pytest.raises(ValueError, match=r"whole model must hold every layer, whole; 7 missing or partial"):
        client.receive(packed({"params/Dense_0/bias": np.ones(3, np.float32)}), WHOLE)
    assert not client.initialized
    assert_layers(ref_flat(client.model), before)


BAD_COO = {
    "out-of-bounds": ([[0, 0], [4, 0]], [4, 3], ValueError, r"index \[4, 0\] is out of bounds for shape \(4, 3\)"),
    "repeated": ([[1, 1], [1, 1]], [4, 3], ValueError, "more than once"),
    "wrong-shape": ([[0, 0], [1, 1]], [3, 4], ValueError, r"expected shape \(4, 3\)"),
}


@pytest.mark.parametrize("case", list(BAD_COO))
def test_sparse_client_bad_payload_changes_nothing(case):
    indices, shape, error, match = BAD_COO[case]
    client = ExchangerClient(linen_variables(), sparse_exchanger(error_feedback=True), no_train)
    start = random_layers(LINEN_SHAPES, seed=71)
    client.receive(in_order(start, LINEN_NAMES), WHOLE)
    # error feedback keeps the values pulled: seeded whole from the first model
    assert_layers(client.state.exchange.reference, start)
    state = client.state
    bad = [
        np.array([9.0], np.float32),
        np.array([2.0, 3.0], np.float32),
        np.array([[0]], np.int64),
        np.array(indices, np.int64),
        np.array([3], np.int64),
        np.array(shape, np.int64),
        np.array(["params/Dense_0/bias", "params/Dense_0/kernel"]),
    ]
    with pytest.raises(error, match=match):
        client.receive(bad, UPDATE)
    assert_layers(ref_flat(client.model), start)
    assert client.state is state
    assert_layers(client.state.exchange.reference, start)


def run_sparse_federation(sparse_wire: str):
    """Two sparse clients and the sparse strategy, three rounds through configure_fit and
    aggregate_fit, then a fourth message received; checks each pull against numpy where
    the layout is fl4health's. Returns the clients and the strategy."""
    from jaxlayerx.flower import FedAvgSparseCooTensorStrategy

    strategy = FedAvgSparseCooTensorStrategy(
        random_layers(LINEN_SHAPES, seed=72),
        fraction_fit=1.0,
        min_fit_clients=2,
        min_available_clients=2,
        sparse_wire=sparse_wire,
    )
    cm = SimpleClientManager()
    for cid in ("0", "1"):
        assert cm.register(fake_proxy(cid))
    records: list = []
    clients = {
        cid: ExchangerClient(
            linen_variables(), sparse_exchanger(0.1), shifting_train_fn({name: d}, records), sparse_wire=sparse_wire
        )
        for cid, (name, d) in zip(("0", "1"), (("params/Dense_0/kernel", 1.0), ("params/Dense_1/kernel", -1.0)))
    }
    for server_round in (1, 2, 3):
        results = []
        for proxy, ins in strategy.configure_fit(server_round, strategy.initial_parameters, cm):
            client = clients[proxy.cid]
            before = ref_flat(client.model)
            payload = parameters_to_ndarrays(ins.parameters)
            if server_round == 1:
                assert ins.config[BASE_ROUND] == -1 and len(payload) == len(LINEN_NAMES)  # the whole model
            else:
                assert ins.config[BASE_ROUND] == server_round - 2 and ins.config[VERSION] == server_round - 1
            sent, n, metrics = client.fit(payload, ins.config)
            assert client.state.version == server_round - 1
            results.append((proxy, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(sent), n, metrics)))
            if sparse_wire == "coo":
                # the client pulled exactly what the server sent: the whole model first, then
                # the changed entries over its own (partly unsent) trained weights
                assert_layers(records[-1]["received"], ref_apply(before, payload))
        _, metrics = strategy.aggregate_fit(server_round, results, [])
        assert metrics["clients_rejected"] == 0 and metrics["clients_accepted"] == 2
        assert metrics["payload_bytes_received"] == sum(res.metrics["payload_bytes"] for _, res in results)
    for proxy, ins in strategy.configure_fit(4, strategy.initial_parameters, cm):
        client = clients[proxy.cid]
        before = ref_flat(client.model)
        payload = parameters_to_ndarrays(ins.parameters)
        client.receive(payload, ins.config)
        assert client.state.version == 3
        if sparse_wire == "coo":
            after = ref_flat(client.model)
            assert_layers(after, ref_apply(before, payload))
            # every weight the update carries now holds the global value
            for name, values in ref_coo_entries(payload).items():
                for index in values:
                    assert after[name][index] == strategy.global_layers[name][index]
    return clients, strategy


def test_sparse_client_against_the_sparse_strategy_catches_up_exactly():
    run_sparse_federation("coo")


def test_the_compact_sparse_wire_carries_exactly_what_coo_carries():
    coo_clients, coo_strategy = run_sparse_federation("coo")
    compact_clients, compact_strategy = run_sparse_federation("compact")
    assert_bits(compact_strategy.global_layers, coo_strategy.global_layers)
    for cid in coo_clients:
        assert_bits(ref_flat(compact_clients[cid].model), ref_flat(coo_clients[cid].model))


def ref_apply(model: dict[str, np.ndarray], payload: list[np.ndarray]) -> dict[str, np.ndarray]:
    """A server payload applied in numpy: dense unnamed (every layer, in order) or COO entries."""
    if payload[-1].dtype.kind != "U":
        return {name: np.array(value) for name, value in zip(model, payload)}
    out = {name: value.copy() for name, value in model.items()}
    for name, values in ref_coo_entries(payload).items():
        for index, value in values.items():
            out[name][index] = value
    return out


# ---------------------------------------------------------------------------------------
# 10. The client's saved state (context.state)
# ---------------------------------------------------------------------------------------


def test_save_state_and_load_state_restore_model_version_and_exchange_state():
    record: list = []
    client, start = initialized_linen_client(
        FullParameterExchanger(quantize="int8", error_feedback=True), shifting_train_fn(LINEN_DELTAS, record)
    )
    payload, _, _ = client.fit(packed({}), {BASE_ROUND: 0, VERSION: 1})
    saved = RecordDict()
    client.save_state(saved)
    # read back with Flower's own records: the layers, the version, the exchanger's state
    layers = {name: array.numpy() for name, array in saved.array_records["jaxlayerx.layers"].items()}
    assert_layers(layers, ref_flat(client.model))
    assert saved.config_records["jaxlayerx.version"]["version"] == 1
    exchange = {key: array.numpy() for key, array in saved.array_records["jaxlayerx.exchange"].items()}
    assert list(exchange) == [f"reference/{name}" for name in LINEN_NAMES] + [
        f"residual/{name}" for name in LINEN_NAMES
    ]
    assert_layers({key.removeprefix("reference/"): v for key, v in exchange.items() if "reference/" in key}, start)
    assert all(exchange[f"residual/{name}"].dtype == np.float32 for name in LINEN_NAMES)
    assert any(np.any(exchange[f"residual/{name}"] != 0) for name in LINEN_NAMES)  # int8 lost something

    fresh = ExchangerClient(
        linen_variables(),
        FullParameterExchanger(quantize="int8", error_feedback=True),
        shifting_train_fn(LINEN_DELTAS, record),
    )
    assert not fresh.initialized
    fresh.load_state(saved)
    assert fresh.initialized and fresh.state.version == 1
    assert_layers(ref_flat(fresh.model), ref_flat(client.model))
    assert isinstance(fresh.state, ClientState)
    assert_layers(fresh.state.exchange.reference, client.state.exchange.reference)
    assert_layers(fresh.state.exchange.residual, client.state.exchange.residual)
    # the restored client sends what the original would have
    update = {BASE_ROUND: 1, VERSION: 2}
    again, _, _ = client.fit(packed({}), update)
    restored, _, _ = fresh.fit(packed({}), update)
    assert len(again) == len(restored)
    for a, b in zip(again, restored):
        assert np.array_equal(a, b) and a.dtype == b.dtype


def test_load_state_of_an_empty_state_changes_nothing():
    client = ExchangerClient(linen_variables(), percentage_exchanger(0.5), no_train)
    before = ref_flat(client.model)
    client.load_state(RecordDict())
    assert not client.initialized and client.state == ClientState()
    assert_layers(ref_flat(client.model), before)
