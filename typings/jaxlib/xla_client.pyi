"""Partial type stub for ``jaxlib.xla_client`` (see ``_jax/__init__.pyi``).

Mostly aliases of ``jaxlib._jax`` names; giving ``Device`` here keeps JAX's device types
known however pyright reaches the module. Every other name is ``Any``.
"""

from typing import Any

from jaxlib._jax import Device as Device

def __getattr__(name: str) -> Any: ...
