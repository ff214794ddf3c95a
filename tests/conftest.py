"""Models and independent reference helpers shared by the tests (no jaxlayerx code).

Test files import them by name (``from conftest import LinenNet, ref_flat``); pytest puts
this folder on the path.
"""

from __future__ import annotations

import functools
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


@functools.cache
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
