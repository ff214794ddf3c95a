"""The client side of the exchange protocol, framework-free: both Flower client routes are
thin shells over :func:`receive` and :func:`push`.

A client holds its model (the caller keeps it) and a :class:`ClientState`: the global
version it holds and its exchanger's state (:class:`jaxlayerx.ExchangeState`). It receives
the whole model, or an update over a version it must hold; it pushes through its exchanger;
and its state turns into arrays and a version and back (``context.state``, checkpoints).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from jaxlayerx.base import Exchanger
from jaxlayerx.payload import Payload
from jaxlayerx.state import ExchangeState

#: The version of a client that holds a model whose version nobody stated (an fl4health server's).
UNVERSIONED = -1


class VersionMismatchError(ValueError):
    """An update over a global version the client does not hold."""


class ClientState(NamedTuple):
    """What a client carries between messages besides its model.

    Attributes:
      version: the global version the client holds; ``None`` before its first model,
        :data:`UNVERSIONED` when the server never said.
      exchange: its exchanger's state.
    """

    version: int | None = None
    exchange: ExchangeState = ExchangeState()

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The exchanger's state as ``key -> array`` (see :meth:`ExchangeState.to_arrays`)."""
        return dict(self.exchange.to_arrays())

    @classmethod
    def from_arrays(cls, version: int | None, arrays: Mapping[str, Any]) -> ClientState:
        """The state of a client holding ``version``, its exchanger's state from ``arrays``."""
        return cls(version, ExchangeState.from_arrays(arrays))


def receive(
    exchanger: Exchanger,
    payload: Payload,
    model: Any,
    state: ClientState,
    *,
    layout: Mapping[str, Any],
    whole_model: bool,
    base: int | None = None,
    version: int | None = None,
) -> tuple[Any, ClientState]:
    """``model`` with a server's payload applied, and the client's state after it.

    Args:
      exchanger: the client's exchanger (it pulls, and keeps its state).
      payload: what the server sent, decoded and checked against ``model``.
      model: the client's model.
      state: the client's state.
      layout: the model's flat view (the layers a whole model must hold).
      whole_model: the payload is the whole global model (the first message, or a client
        the server forgot); else the entries changed since ``base``.
      base: the version an update applies over, when the server says; the client must hold
        it.
      version: the version the client holds once it has applied the payload, when the
        server says.

    Raises:
      VersionMismatchError: an update over a version the client does not hold.
      ValueError: a first message that is not the whole model, or a whole model that lacks
        layers of the client's model; and whatever the pull raises (nothing changes then).
    """
    if not whole_model:
        if state.version is None:
            raise ValueError("the first message must hold the whole model; got an update of some layers")
        if base is not None and state.version != base:
            raise VersionMismatchError(
                f"the update is over global version {base}, but the client holds "
                f"{'a model of unstated version' if state.version == UNVERSIONED else f'version {state.version}'}"
            )
    else:
        check_whole_model(payload, layout)
    first = state.version is None
    model, exchange = exchanger.pull(payload, model, state.exchange, first=first)
    return model, ClientState(UNVERSIONED if version is None else version, exchange)


def push(exchanger: Exchanger, model: Any, initial_model: Any, state: ClientState) -> tuple[Payload, ClientState]:
    """What the client sends for ``model`` (trained from ``initial_model``), and its state after."""
    payload, exchange = exchanger.push(model, state.exchange, initial_model)
    return payload, state._replace(exchange=exchange)


def check_whole_model(payload: Payload, layers: Mapping[str, Any]) -> None:
    """Raises ``ValueError`` unless ``payload`` holds every layer of ``layers``, whole."""
    missing = [name for name in layers if name not in payload or not payload[name].dense]
    if missing:
        raise ValueError(
            f"the whole model must hold every layer, whole; {len(missing)} missing or partial, for example {missing[:3]}"
        )
