"""Flat ``name -> array`` views of models, and the way back.

A *model* is any of: a Flax Linen variables dict (``{"params": ..., "batch_stats": ...}``),
an ``nnx.Module``, an ``nnx.State``, or any other pytree of arrays (nested dicts, lists,
dataclasses). A *layer* is one array leaf of it, named by its path parts joined with
``sep``: ``params/Dense_0/kernel``, ``batch_stats/BatchNorm_0/mean``, ``conv1/kernel``,
``layers/0/bias``.

Flat views are ``collections.OrderedDict`` instances in JAX tree-traversal order. The order
is part of the contract (it breaks ties in layer selection and orders a full exchange), and
an ``OrderedDict`` keeps it through ``jax.jit`` and ``jax.vmap``, which sort the keys of a
plain ``dict``.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeAlias, cast

import jax
import jax.core
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.tree_util import PyTreeDef

from jaxlayerx.base import FlatView, Model
from jaxlayerx.dtypes import conform_dtype
from jaxlayerx.errors import unknown_layer
from jaxlayerx.validation import check_shape

#: NNX variables that a flat view holds by default: everything ``nnx.state`` holds but
#: RNG state (keys and counters are not weights and must not be averaged).
DEFAULT_NNX_FILTER: nnx.filterlib.Filter = nnx.Not(nnx.RngState)

#: ``(key path, leaf)`` pairs as ``jax.tree_util.tree_flatten_with_path`` returns them (its
#: own annotation leaves the key type unknown to type checkers).
_PathLeaves: TypeAlias = list[tuple[tuple[Any, ...], Any]]


def flatten(
    model: Any, sep: str = "/", *, nnx_filter: nnx.filterlib.Filter = DEFAULT_NNX_FILTER
) -> collections.OrderedDict[str, jax.Array]:
    """Returns the layers of ``model`` as an ordered ``name -> array`` dict.

    Args:
      model: Linen variables, an ``nnx.Module``, an ``nnx.State`` or any pytree of arrays.
      sep: joins the parts of a leaf's path into its name.
      nnx_filter: which NNX variables to include (an NNX filter: a type such as
        ``nnx.Param``, ``nnx.Not(...)``, ``nnx.Any(...)``...). Default: all but RNG state.
        Leaves that are not NNX variables are always included.

    Returns:
      An ``OrderedDict`` in JAX tree-traversal order. Values are the leaves themselves
      (NNX variables are unwrapped to their arrays); nothing is copied.

    Raises:
      ValueError: a path part contains ``sep``, or two leaves get the same name.
      TypeError: a leaf is not an array.
    """
    _, _, names, values, _ = _walk(_as_tree(model), sep, nnx_filter)
    return collections.OrderedDict(zip(names, values))


def as_flat_view(model: Any, sep: str = "/", *, nnx_filter: nnx.filterlib.Filter = DEFAULT_NNX_FILTER) -> FlatView:
    """``model`` as a flat view: itself when it already is one, else :func:`flatten` of it.

    An ``OrderedDict`` whose values are all arrays is taken as a flat view in its own
    order; another mapping of arrays with string keys (not an ``nnx.State``) as one in
    sorted key order, the order JAX traverses a ``dict`` in. Their keys may contain
    ``sep`` (``params/Dense_0/kernel``). Anything else is flattened.
    """
    if isinstance(model, Mapping) and not isinstance(model, nnx.State):
        mapping = cast("Mapping[Any, Any]", model)
        if _all_array_leaves(mapping.values()):
            if isinstance(mapping, collections.OrderedDict):
                return mapping
            if all(isinstance(name, str) for name in mapping):
                return collections.OrderedDict(sorted(mapping.items()))
    return flatten(model, sep, nnx_filter=nnx_filter)


def check_snapshot(model: Any, initial_model: Any) -> None:
    """Checks that ``initial_model`` is a snapshot of ``model``, not ``model`` itself.

    Drift is measured from ``initial_model``: if it is the same object, or an NNX module or
    state holding the same variables (``nnx.state(model)`` does), updating ``model`` in place
    moves it too, and every drift is zero.

    Raises:
      ValueError: the same object, or shared NNX variables (naming one), with how to snapshot.
    """
    if initial_model is None:
        return
    advice = (
        "take a snapshot of the model at the start of the round, for example "
        "initial_model = nnx.clone(model), or jaxlayerx.unflatten(jaxlayerx.flatten(model), like=model)"
    )
    if initial_model is model:
        raise ValueError(f"initial_model is model itself, so every drift is zero: {advice}")
    theirs = {id(variable) for _, variable in _nnx_variables(initial_model)}
    for path, variable in _nnx_variables(model) if theirs else ():
        if id(variable) in theirs:
            name = "/".join(str(key_part(key)) for key in path)
            raise ValueError(
                f"initial_model shares the NNX variable of layer {name!r} with model, so an update "
                f"of model moves it too and every drift is zero: {advice}"
            )


def _nnx_variables(model: Any) -> list[tuple[Any, Any]]:
    """``(path, variable)`` of every NNX variable of an ``nnx.Module`` or ``nnx.State``, else none."""
    if not isinstance(model, (nnx.Module, nnx.State)):
        return []
    leaves = cast(_PathLeaves, jax.tree_util.tree_flatten_with_path(_as_tree(model), is_leaf=is_nnx_variable)[0])  # pyright: ignore[reportUnknownMemberType]
    return [(path, leaf) for path, leaf in leaves if is_nnx_variable(leaf)]


def check_matching_layers(current: Mapping[str, Any], initial: Mapping[str, Any]) -> None:
    """Checks that two flat views hold the same layer names with the same shapes.

    Raises:
      KeyError: a layer is in one view but not in the other (named, with close matches).
      ValueError: a layer's shapes differ.
    """
    for name in current:
        if name not in initial:
            raise unknown_layer(name, initial, what="the initial model")
    for name in initial:
        if name not in current:
            raise unknown_layer(name, current, what="the current model")
    for name, value in current.items():
        if np.shape(value) != np.shape(initial[name]):
            raise ValueError(
                f"layer {name!r}: current shape {np.shape(value)} differs from the initial "
                f"model's shape {np.shape(initial[name])}"
            )


def unflatten(
    flat: Mapping[str, Any],
    like: Model,
    sep: str = "/",
    *,
    nnx_filter: nnx.filterlib.Filter = DEFAULT_NNX_FILTER,
) -> Model:
    """Rebuilds a model of the same kind and structure as ``like`` from ``flat``.

    ``flat`` must hold exactly the layers of ``flatten(like, sep)``, each with the same
    shape; values are cast to ``like``'s dtypes when that is lossless (see
    :func:`conform_layer`). ``like`` is not modified: an ``nnx.Module`` comes back as a
    new module. ``unflatten(flatten(m), like=m)`` equals ``m``, dtypes included.

    Raises:
      KeyError: a layer of ``like`` is missing from ``flat``, or ``flat`` has a layer
        that ``like`` does not (the message lists the closest valid names).
      ValueError, TypeError: as :func:`conform_layer`.
    """
    current = flatten(like, sep, nnx_filter=nnx_filter)
    missing = [name for name in current if name not in flat]
    if missing:
        raise KeyError(f"{len(missing)} layer(s) of the model missing from the flat dict: {missing[:5]}")
    return _replace(like, flat, sep, nnx_filter, in_place=False)


def merge_layers(
    model: Model,
    layers: Mapping[str, Any],
    sep: str = "/",
    *,
    nnx_filter: nnx.filterlib.Filter = DEFAULT_NNX_FILTER,
) -> Model:
    """Returns ``model`` with the named ``layers`` replaced and every other layer kept.

    Every name, shape and dtype is checked before anything changes, so a bad update
    changes nothing. A pytree is never mutated (a new one is returned); an
    ``nnx.Module`` is updated in place, as NNX users expect, and returned.

    Raises:
      KeyError: a name is not a layer of ``model`` (lists the closest valid names).
      ValueError, TypeError: as :func:`conform_layer`.
    """
    return _replace(model, layers, sep, nnx_filter, in_place=True)


def conform_layer(name: str, value: Any, like: Any) -> Any:
    """Checks ``value`` against the model's layer ``like`` and converts it to its dtype.

    Rules: the shape must be equal; the dtype follows the policy of :mod:`jaxlayerx.dtypes`
    (floating values of any width into a floating layer, rounded; integers in range into an
    integer layer; ``|V2`` reinterpreted as bfloat16; a lossy change of kind refused).

    Returns:
      A new array (never an alias of ``value``), numpy if ``like`` is numpy, else a
      ``jax.Array`` on ``like``'s devices when ``like`` is committed to them.

    Raises:
      ValueError: shapes differ. TypeError: the layer does not accept the value's dtype.
    """
    check_shape(name, tuple(np.shape(value)), tuple(np.shape(like)))
    return _place_like(conform_dtype(name, value, np.dtype(like.dtype)), like)


def _place_like(value: Any, like: Any) -> Any:
    if isinstance(like, np.generic):
        return np.array(value, dtype=cast(np.generic, like).dtype)[()]  # a numpy scalar stays a numpy scalar
    if isinstance(like, np.ndarray):
        return np.array(value, dtype=cast(np.ndarray, like).dtype, copy=True)
    placed = jnp.array(value, dtype=like.dtype, copy=True)
    if isinstance(like, jax.Array) and not isinstance(like, jax.core.Tracer) and like.committed:
        placed = jax.device_put(placed, like.sharding)  # pyright: ignore[reportUnknownMemberType]
    return placed


def _replace(
    model: Model, layers: Mapping[str, Any], sep: str, nnx_filter: nnx.filterlib.Filter, *, in_place: bool
) -> Model:
    tree = _as_tree(model)
    leaves, treedef, names, _, positions = _walk(tree, sep, nnx_filter)
    index = dict(zip(names, positions))
    for name in layers:
        if name not in index:
            raise unknown_layer(name, index)
    # Validate and convert everything first: nothing changes unless all of it is valid.
    converted = {
        index[name]: conform_layer(name, value, _value_of(leaves[index[name]])) for name, value in layers.items()
    }
    new_leaves = [
        _with_value(leaf, converted[position]) if position in converted else _fresh(leaf)
        for position, leaf in enumerate(leaves)
    ]
    new_tree = treedef.unflatten(new_leaves)
    if not isinstance(model, nnx.Module):
        return new_tree
    if in_place:
        nnx.update(model, new_tree)  # pyright: ignore[reportUnknownMemberType]
        return model
    graphdef, _ = nnx.split(model)  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
    return nnx.merge(graphdef, new_tree)


def _as_tree(model: Any) -> Any:
    """The pytree to walk: the full state of an NNX module, else the model itself."""
    if isinstance(model, nnx.Module):
        return nnx.state(model)  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
    return model


def _walk(
    tree: Any, sep: object, nnx_filter: nnx.filterlib.Filter
) -> tuple[list[Any], PyTreeDef, Sequence[str], Sequence[Any], Sequence[int]]:
    """Flattens ``tree`` (NNX variables as leaves) and names the leaves in the view.

    Returns the leaves, the treedef, and the names, arrays and leaf positions of the
    leaves in the view (NNX variables rejected by ``nnx_filter`` are left out).
    """
    if not isinstance(sep, str) or not sep:
        raise ValueError(f"sep must be a non-empty string, got {sep!r}")
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    try:
        layout = _plain_layout(treedef, sep)
        if layout is None:  # NNX state: flatten again, stopping at the variables
            leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=is_nnx_variable)
            layout = _leaf_names(treedef, sep)
        paths, names, unique = layout
    except _NoSkeleton:  # a custom node that cannot hold integers: name the leaves directly
        path_leaves = cast(_PathLeaves, jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_nnx_variable)[0])  # pyright: ignore[reportUnknownMemberType]
        paths, names, unique = _names_of(tuple(path for path, _ in path_leaves), sep)
    if _all_of_array_types(leaves):  # plain arrays: nothing to unwrap
        if not unique:
            _check_unique(list(zip(names, paths)))
        return leaves, treedef, names, leaves, range(len(leaves))
    keep = nnx.filterlib.to_predicate(nnx_filter)
    kept_names: list[str] = []
    values: list[Any] = []
    positions: list[int] = []
    for position, leaf in enumerate(leaves):
        if is_nnx_variable(leaf) and not keep(paths[position], leaf):
            continue
        value = _value_of(leaf)
        if not is_array_leaf(value):
            raise TypeError(
                f"layer {names[position]!r} is a {type(value).__name__}, not an array; "
                "models must hold arrays (wrap scalars with jnp.asarray)"
            )
        kept_names.append(names[position])
        values.append(value)
        positions.append(position)
    if not unique:  # names can only clash among the leaves kept in the view
        _check_unique([(name, paths[position]) for name, position in zip(kept_names, positions)])
    return leaves, treedef, kept_names, values, positions


@functools.lru_cache(maxsize=256)
def _plain_layout(treedef: PyTreeDef, sep: str) -> tuple[tuple[tuple[Any, ...], ...], tuple[str, ...], bool] | None:
    """:func:`_leaf_names` of ``treedef``, or ``None`` when it holds NNX variables (whose
    leaves are named after a flatten that stops at the variables). Cached per structure in
    one lookup: comparing two treedefs walks their whole structure.

    Flattening without an ``is_leaf`` callback is about twice as fast, and only trees
    that hold variables (NNX state) need it.
    """
    if any(_is_variable_type(node_type) for node_type in _node_types(treedef)):
        return None
    return _leaf_names(treedef, sep)


def _node_types(treedef: PyTreeDef) -> Iterator[type]:
    """The types of every internal node of ``treedef``, depth first."""
    node = treedef.node_data()  # None for a leaf
    if node is not None:
        yield node[0]
    for child in treedef.children():
        yield from _node_types(child)


@functools.lru_cache(maxsize=256)
def _leaf_names(treedef: PyTreeDef, sep: str) -> tuple[tuple[tuple[Any, ...], ...], tuple[str, ...], bool]:
    """Path parts and names of every leaf of ``treedef``, and whether the names are all
    distinct; cached, as models keep their structure.

    The paths are read off a skeleton of the structure holding each leaf's position.
    """
    try:
        skeleton = treedef.unflatten(list(range(treedef.num_leaves)))
        path_leaves = cast(_PathLeaves, jax.tree_util.tree_flatten_with_path(skeleton)[0])  # pyright: ignore[reportUnknownMemberType]
    except Exception as error:
        raise _NoSkeleton from error
    if [position for _, position in path_leaves] != list(range(treedef.num_leaves)):
        raise _NoSkeleton
    return _names_of(tuple(path for path, _ in path_leaves), sep)


class _NoSkeleton(Exception):
    """The structure cannot be rebuilt with integer leaves to read its paths."""


def _names_of(key_paths: tuple[Any, ...], sep: str) -> tuple[tuple[tuple[Any, ...], ...], tuple[str, ...], bool]:
    paths = tuple(tuple(key_part(key) for key in path) for path in key_paths)
    names = tuple(_join(parts, sep) for parts in paths)
    return paths, names, len(set(names)) == len(names)


def _check_unique(named_paths: list[tuple[str, tuple[Any, ...]]]) -> None:
    seen: dict[str, tuple[Any, ...]] = {}
    for name, parts in named_paths:
        if name in seen:
            raise ValueError(f"two leaves get the same layer name {name!r}: paths {seen[name]} and {parts}")
        seen[name] = parts


def _join(parts: tuple[Any, ...], sep: str) -> str:
    for part in parts:
        if sep in str(part):
            raise ValueError(
                f"path part {str(part)!r} of leaf {parts} contains the separator {sep!r}; pass another sep="
            )
    return sep.join(str(part) for part in parts)


def key_part(key: Any) -> Any:
    if isinstance(key, jax.tree_util.DictKey):
        return key.key
    if isinstance(key, jax.tree_util.SequenceKey):
        return key.idx
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return key.key
    return str(key)


def is_nnx_variable(x: object) -> bool:
    return _is_variable_type(type(x))


@functools.cache
def _is_variable_type(cls: type) -> bool:
    # issubclass on the type, cached: isinstance goes through nnx's slow metaclass check.
    return issubclass(cls, nnx.Variable)


_ARRAY_TYPES = (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)


def is_array_leaf(x: Any) -> bool:
    """Arrays, numpy scalars, and ``jax.ShapeDtypeStruct`` (abstract models from ``eval_shape``)."""
    return isinstance(x, _ARRAY_TYPES)


def _all_of_array_types(values: Iterable[Any]) -> bool:
    """Whether every value's type is an array type (a tracer's is not: see :func:`_all_array_leaves`)."""
    return all(issubclass(kind, _ARRAY_TYPES) for kind in set(map(type, values)))


def _all_array_leaves(values: Collection[Any]) -> bool:
    """``all(map(is_array_leaf, values))``, checked once per type where it can be."""
    return _all_of_array_types(values) or all(map(is_array_leaf, values))


def _value_of(leaf: Any) -> Any:
    if not is_nnx_variable(leaf):
        return leaf
    return leaf.get_value() if hasattr(leaf, "get_value") else leaf.value


def _with_value(leaf: Any, value: Any) -> Any:
    return leaf.replace(value) if is_nnx_variable(leaf) else value


def _fresh(leaf: Any) -> Any:
    """A new NNX variable holding the same value (never share live variables); arrays as is."""
    return leaf.replace(_value_of(leaf)) if is_nnx_variable(leaf) else leaf
