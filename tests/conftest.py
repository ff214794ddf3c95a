"""Models and independent reference helpers shared by the tests (no jaxlayerx code).

Test files import them by name (``from conftest import LinenNet, ref_flat``); pytest puts
this folder on the path.
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def ref_name(path: tuple[Any, ...], sep: str = "/") -> str:
    """A ``jax.tree_util`` key path joined by ``sep``: the expected layer name."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        else:
            raise AssertionError(f"unexpected key type in a test tree: {key!r}")
    return sep.join(parts)


def ref_flat(model: Any) -> dict[str, np.ndarray]:
    """``name -> numpy copy`` of every array leaf, in JAX tree order (NNX: of ``nnx.state``)."""
    tree = nnx.state(model) if isinstance(model, nnx.Module) else model
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    out: dict[str, np.ndarray] = {}
    for path, leaf in leaves:
        if isinstance(leaf, nnx.Variable):
            leaf = leaf.get_value()
        name = ref_name(path)
        assert name not in out
        out[name] = np.array(leaf, copy=True)
    return out


def bits(array: Any) -> np.ndarray:
    """The raw bytes of ``array`` as uint8, for bit-exact comparisons (NaN-safe, -0.0-aware)."""
    return np.ascontiguousarray(np.asarray(array)).view(np.uint8)


class LinenNet(nn.Module):
    """Dense(3) -> BatchNorm -> Dense(2): ``params`` and ``batch_stats``."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.Dense(3)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(2)(x)


#: ``LinenNet``'s layers and their shapes, written by hand in JAX's sorted-dict-key order.
LINEN_SHAPES = {
    "batch_stats/BatchNorm_0/mean": (3,),
    "batch_stats/BatchNorm_0/var": (3,),
    "params/BatchNorm_0/bias": (3,),
    "params/BatchNorm_0/scale": (3,),
    "params/Dense_0/bias": (3,),
    "params/Dense_0/kernel": (4, 3),
    "params/Dense_1/bias": (2,),
    "params/Dense_1/kernel": (3, 2),
}


@functools.cache
class NnxDigitsNet(nnx.Module):
    """An NNX MLP for 64 digit features: Linear, BatchNorm, Linear (the simulation tests' NNX model)."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.linear1 = nnx.Linear(64, 16, rngs=rngs)
        self.bn = nnx.BatchNorm(16, rngs=rngs)
        self.linear2 = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x: Any) -> Any:
        return self.linear2(nnx.relu(self.bn(self.linear1(x))))


#: NnxDigitsNet's layers in flatten order, written by hand: all of them, and its Params.
NNX_DIGITS_LAYERS = [
    "bn/bias",
    "bn/mean",
    "bn/scale",
    "bn/var",
    "linear1/bias",
    "linear1/kernel",
    "linear2/bias",
    "linear2/kernel",
]
NNX_DIGITS_PARAMS = ["bn/bias", "bn/scale", "linear1/bias", "linear1/kernel", "linear2/bias", "linear2/kernel"]


def fake_proxy_class() -> type:
    """A Flower ``ClientProxy`` that is never called: tests drive a strategy directly."""
    from flwr.server.client_proxy import ClientProxy

    class FakeProxy(ClientProxy):
        def get_properties(self, ins, timeout, group_id):
            raise NotImplementedError

        def get_parameters(self, ins, timeout, group_id):
            raise NotImplementedError

        def fit(self, ins, timeout, group_id):
            raise NotImplementedError

        def evaluate(self, ins, timeout, group_id):
            raise NotImplementedError

        def reconnect(self, ins, timeout, group_id):
            raise NotImplementedError

    return FakeProxy


def fake_proxy(cid: str) -> Any:
    return fake_proxy_class()(cid)


@functools.cache
def fake_grid_class() -> type:
    """A Flower Message-API ``Grid`` whose nodes are functions ``(message) -> RecordDict``.

    ``FakeGrid(nodes)``: ``nodes`` maps node ids to the functions; ``available`` is what
    ``get_node_ids`` reports; ``sent`` keeps every message. ``send_and_receive`` calls the
    nodes in id order and turns an exception into an error reply, as Flower does.
    """
    from flwr.app import Error, Message
    from flwr.serverapp import Grid

    class FakeGrid(Grid):
        def __init__(self, nodes):
            self.nodes = nodes
            self.available = list(nodes)
            self.sent = []

        def set_run(self, run):
            pass

        @property
        def run(self):
            raise NotImplementedError

        def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
            raise NotImplementedError

        def get_node_ids(self):
            return list(self.available)

        def push_messages(self, messages):
            raise NotImplementedError

        def pull_messages(self, message_ids):
            raise NotImplementedError

        def send_and_receive(self, messages, *, timeout=None):
            replies = []
            for message in sorted(messages, key=lambda m: m.metadata.dst_node_id):
                self.sent.append(message)
                try:
                    content = self.nodes[message.metadata.dst_node_id](message)
                except Exception as error:  # noqa: BLE001 - a ClientApp exception becomes an error reply
                    replies.append(Message(Error(code=1, reason=str(error)), reply_to=message))
                else:
                    replies.append(Message(content, reply_to=message))
            return replies

    return FakeGrid


def flower_metadata(message_type: str = "train", src_node_id: int = 0, dst_node_id: int = 7) -> Any:
    """The ``Metadata`` of a hand-built Flower ``Message`` (run 1, group "1", an hour's ttl)."""
    from flwr.app import Metadata

    return Metadata(
        run_id=1,
        message_id="",
        src_node_id=src_node_id,
        dst_node_id=dst_node_id,
        reply_to_message_id="",
        group_id="1",
        created_at=0.0,
        ttl=3600.0,
        message_type=message_type,
    )


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def loopback_environment(**extra: str) -> dict[str, str]:
    """This process's environment for Flower processes talking over 127.0.0.1: no proxy
    variables, JAX on the CPU, unbuffered output, then ``extra``."""
    env = {key: value for key, value in os.environ.items() if "proxy" not in key.lower()}
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", no_proxy="127.0.0.1,localhost")
    env.update(extra)
    return env


def nest(flat: Mapping[str, Any], array: Callable[[Any], Any] = jnp.asarray) -> dict[str, Any]:
    """The nested dict whose layers are ``flat`` (``a/b/c -> {"a": {"b": {"c": ...}}}``),
    each value passed through ``array`` (JAX arrays by default; ``np.array`` for copies)."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = array(value)
    return tree
