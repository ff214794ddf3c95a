"""Partial type stubs for ``jaxlib._jax``, jaxlib's compiled extension, which ships none.

Without them every JAX signature that mentions one of its types (``jnp.asarray(...,
device=)``, ``jax.tree_util.tree_flatten``'s ``PyTreeDef``) is partially unknown to
pyright. What jaxlayerx uses is typed here; any other name is ``Any``. Type checking only:
nothing here exists at runtime.
"""

from typing import Any

from . import pytree as pytree

class Device:
    @property
    def id(self) -> int: ...
    @property
    def platform(self) -> str: ...
    @property
    def device_kind(self) -> str: ...

def __getattr__(name: str) -> Any: ...
