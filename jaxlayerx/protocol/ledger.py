"""The version rules of the exchange protocol, as pure functions of arrays.

Written for any array namespace (``xp``: ``numpy`` on a server, ``jax.numpy`` inside the
simulation's jitted round), so that the server core and the simulation follow one rule:

* the global model has a *version*: the number of the last round aggregated (0: the
  initial model). It moves every round, whether or not anything changed;
* each layer (each entry, for a sparse exchange) records the version in which it last
  changed (``updated_in``, 0 for the initial model);
* a client holds some version ``v`` (``None``: nothing yet). It is sent the entries that
  changed after ``v``, or the whole model when it holds nothing;
* a client that answered a message holds the version that message brought it; a client
  that failed, or never answered, is forgotten, and gets the whole model next time.
"""

from __future__ import annotations

from typing import Any

#: The version of a client that holds nothing yet, in arrays (``None`` elsewhere).
NOTHING = -1


def changed_since(updated_in: Any, held: Any) -> Any:
    """Where the entries changed after version ``held`` (``NOTHING``: everywhere). Numpy
    and JAX arrays alike; ``held`` broadcasts (one version per client, on leading axes)."""
    return updated_in > held


def mark_changed(updated_in: Any, changed: Any, version: Any, xp: Any) -> Any:
    """``updated_in`` with the entries ``changed`` marks recorded as changed in ``version``."""
    return xp.where(changed, version, updated_in)


def held_after_round(version: Any) -> Any:
    """The version a client that took part in round ``version`` holds after it: the one it
    was sent at the round's start, ``version - 1`` (it trained on that, and has not yet
    received the round's averages)."""
    return version - 1
