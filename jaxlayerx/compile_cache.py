"""JAX's persistent compilation cache, for the ``jaxlayerx`` command and the Flower ClientApp.

A run's first round compiles the whole jitted round, and the model's initialisation compiles
too: most of a short run's time. With the cache on, a second run of the same federation
(the same shapes and settings), and each exchanger of a ``compare`` that compiles the same
program, loads the executables from disk instead. On Flower, where every message starts a
fresh ClientApp process, the ClientApp's steps compile once per node instead of once per
message (:func:`jaxlayerx.flower.clientapp.exchanger_client_app`).

The folder is ``$JAXLAYERX_CACHE`` if set, else ``$XDG_CACHE_HOME/jaxlayerx/xla`` (by default
``~/.cache/jaxlayerx/xla``). ``JAXLAYERX_CACHE=off`` (or ``0``, ``false``, ``no``, or the
command's ``--no-compile-cache``) turns it off. When JAX's own cache folder is already set
(``JAX_COMPILATION_CACHE_DIR`` or ``jax.config``), that one is used and nothing changes.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping

#: The environment variable naming the cache folder, or turning the cache off.
CACHE_VARIABLE = "JAXLAYERX_CACHE"

#: Values of :data:`CACHE_VARIABLE` that turn the cache off.
OFF = ("off", "0", "false", "no", "none")


def cache_dir(environ: Mapping[str, str] | None = None) -> pathlib.Path | None:
    """The cache folder the environment asks for; ``None`` when it turns the cache off."""
    environ = os.environ if environ is None else environ
    setting = environ.get(CACHE_VARIABLE, "").strip()
    if setting.lower() in OFF and setting:
        return None
    if setting:
        return pathlib.Path(setting).expanduser()
    base = environ.get("XDG_CACHE_HOME", "").strip()
    root = pathlib.Path(base).expanduser() if base else pathlib.Path.home() / ".cache"
    return root / "jaxlayerx" / "xla"


def enable_compile_cache(folder: pathlib.Path | None) -> pathlib.Path | None:
    """Points JAX's persistent compilation cache at ``folder`` (created if needed), caching
    every compiled program however fast it compiled; returns the folder in use.

    Call it before the first compilation of the process: JAX reads the setting once. Nothing
    changes when ``folder`` is ``None``, when JAX already has a cache folder (returned), or
    when the folder cannot be created (``None``: the run goes on without a cache).
    """
    import jax

    configured: object = getattr(jax.config, "jax_compilation_cache_dir", None)
    if configured:
        return pathlib.Path(str(configured))
    if folder is None:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))  # pyright: ignore[reportUnknownMemberType]
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # pyright: ignore[reportUnknownMemberType]
    return folder
