"""Independent reference helpers shared by the tests (no jaxlayerx code)."""

import jax


def ref_name(path, sep="/"):
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
