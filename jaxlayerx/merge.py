"""Writing a payload's entries into a model: whole layers replaced, single entries written,
everything else kept, all of it checked before anything changes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlayerx.base import Model
from jaxlayerx.tree import DEFAULT_NNX_FILTER, flatten, merge_layers
from jaxlayerx.validation import check_payload

if TYPE_CHECKING:
    from jaxlayerx.payload import Payload


def merge_payload(model: Model, payload: Payload, *, nnx_filter: nnx.filterlib.Filter = DEFAULT_NNX_FILTER) -> Model:
    """``model`` with exactly the entries of ``payload`` written.

    A dense layer is replaced whole; a sparse one has its sent entries written and keeps
    every other weight. Names, shapes and dtypes are checked (:mod:`jaxlayerx.validation`)
    before anything changes. A pytree is never mutated; an ``nnx.Module`` is updated in
    place (see :func:`jaxlayerx.merge_layers`).

    Raises:
      KeyError: a layer the model does not have.
      ValueError: a shape differs, or the payload holds quantized updates (which only a
        server, knowing the base, rebuilds).
      TypeError: values the layer does not accept.
    """
    current = flatten(model, nnx_filter=nnx_filter)
    checked = check_payload(payload, current)
    for name, entries in checked.items():
        if entries.quantized is not None:
            raise ValueError(f"layer {name!r}: a quantized update is rebuilt by the server, not pulled into a model")
    updates = {
        name: entries.layer() if entries.dense else scatter(current[name], entries.indices, entries.values)
        for name, entries in checked.items()
    }
    return merge_layers(model, updates, nnx_filter=nnx_filter)


def scatter(like: Any, flat: Any, values: Any) -> Any:
    """A copy of the layer ``like`` with ``values`` written at row-major ``flat`` positions."""
    if isinstance(like, (np.ndarray, np.generic)):
        updated = np.array(cast("np.ndarray | np.generic[Any]", like), copy=True, order="C")
        updated.reshape(-1)[flat] = np.asarray(values).astype(updated.dtype, copy=False)
        return updated
    like = jnp.asarray(like)
    return like.reshape(-1).at[flat].set(jnp.asarray(values, like.dtype)).reshape(like.shape)
