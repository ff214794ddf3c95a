"""Which module owns each layer: module path -> module type.

* ``nnx.Module``: read off the object graph (``nnx.iter_graph``); a shared (tied) submodule
  is found once, at the path where its variables live in ``nnx.state``.
* Linen ``nn.Module``: the module is initialised abstractly (``jax.eval_shape``: shapes
  only, no FLOPs) on example inputs, with every module method call intercepted to record
  ``module.path -> type(module)``; a shared submodule is recorded at the path it is bound to.
* Any other pytree: the type of every internal node (for example equinox modules).

Paths are tuples of keys; the root (path ``()``) is included.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

import flax.linen as linen
import jax
from flax import nnx
from flax.linen.module import InterceptorContext

from jaxlayerx.tree import is_array_leaf, is_nnx_variable, key_part

ModulePath = tuple[Any, ...]


def nnx_module_types(module: nnx.Module) -> dict[ModulePath, type]:
    """``path -> type`` for every submodule of an NNX module (the root included)."""
    return {tuple(path): type(node) for path, node in nnx.iter_graph(module) if isinstance(node, nnx.Module)}


def linen_module_types(
    module: linen.Module, *example_args: Any, **example_kwargs: Any
) -> tuple[dict[ModulePath, type], Any]:
    """``path -> type`` for every Linen submodule that runs on the example inputs.

    Initialises ``module`` abstractly (``jax.eval_shape``) with a ``params`` PRNG key.

    Returns:
      The module types by path, and the abstract variables (``jax.ShapeDtypeStruct``
      leaves) the initialisation would create.
    """
    types: dict[ModulePath, type] = {}

    def record(
        next_fun: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], context: InterceptorContext
    ) -> Any:
        types.setdefault(tuple(context.module.path), type(context.module))
        return next_fun(*args, **kwargs)

    def init() -> Mapping[str, Any]:
        return module.init(jax.random.key(0), *example_args, **example_kwargs)  # pyright: ignore[reportUnknownMemberType]

    with linen.intercept_methods(record):
        variables = jax.eval_shape(init)  # pyright: ignore[reportUnknownMemberType]
    return types, variables


def pytree_node_types(tree: Any) -> dict[ModulePath, type]:
    """``path -> type`` for every internal node of a pytree (NNX variables are leaves)."""
    types: dict[ModulePath, type] = {}

    def visit(node: Any, path: ModulePath) -> None:
        if is_array_leaf(node) or is_nnx_variable(node) or node is None:
            return
        is_child: Callable[[Any], bool] = lambda x: x is not node
        children = cast(list[tuple[ModulePath, Any]], jax.tree_util.tree_flatten_with_path(node, is_leaf=is_child)[0])  # pyright: ignore[reportUnknownMemberType]
        if len(children) == 1 and children[0][0] == ():
            return  # a leaf that is not an array
        types[path] = type(node)
        for key_path, child in children:
            visit(child, path + tuple(key_part(key) for key in key_path))

    visit(tree, ())
    return types
