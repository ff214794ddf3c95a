"""The exchange protocol, written once and framework-free: what a client holds, what it is
sent, what a failure means, and when the version moves (:mod:`~jaxlayerx.protocol.ledger`);
the server side (:class:`ExchangeServer`); the client side (:func:`receive`, :func:`push`);
and the bytes of every message (:mod:`~jaxlayerx.protocol.accounting`). The Flower routes
and the simulation's byte accounting are thin shells over it.
"""

from jaxlayerx.protocol.client import UNVERSIONED, ClientState, VersionMismatchError, push, receive
from jaxlayerx.protocol.server import ExchangeServer, Reply, RoundChange, Update

__all__ = [
    "UNVERSIONED",
    "ClientState",
    "ExchangeServer",
    "Reply",
    "RoundChange",
    "Update",
    "VersionMismatchError",
    "push",
    "receive",
]
