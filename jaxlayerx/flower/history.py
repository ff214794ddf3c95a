"""What a strategy did in each round, the same record on both Flower routes.

A client is named by its key: the Flower node id (an ``int``) on the Message API, the
client proxy's ``cid`` (a ``str``) on the legacy route.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

ClientKey = int | str


@dataclasses.dataclass(frozen=True)
class NodeReply:
    """One client's accepted train reply.

    Attributes:
      node: the client's key.
      num_examples: its weight.
      layers: the layers it sent, in its order.
      entries: the entries it sent (the whole layer's for a layer sent whole).
      bytes_received: bytes of the arrays of its reply, as Flower counts them.
    """

    node: ClientKey
    num_examples: int
    layers: tuple[str, ...]
    entries: int
    bytes_received: int


@dataclasses.dataclass(frozen=True)
class RoundRecord:
    """What a strategy did in one round.

    Attributes:
      server_round: the round.
      accepted: the train replies that were averaged.
      rejected: ``(client, reason)`` for each train reply that failed validation.
      failures: ``(client, reason)`` for each client whose train reply was an error.
      missing: clients sent a train message that never replied.
      aggregated_layers: the layers whose global value changed, sorted.
      bytes_sent: ``(client, bytes)`` of the arrays each train message carried.
    """

    server_round: int
    accepted: tuple[NodeReply, ...]
    rejected: tuple[tuple[ClientKey, str], ...]
    failures: tuple[tuple[ClientKey, str], ...]
    missing: tuple[ClientKey, ...]
    aggregated_layers: tuple[str, ...]
    bytes_sent: tuple[tuple[ClientKey, int], ...]

    @property
    def total_bytes_sent(self) -> int:
        """Bytes of the arrays of every train message."""
        return sum(n for _, n in self.bytes_sent)

    @property
    def total_bytes_received(self) -> int:
        """Bytes of the arrays of every accepted train reply."""
        return sum(reply.bytes_received for reply in self.accepted)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RoundRecord:
        return cls(
            server_round=int(data["server_round"]),
            accepted=tuple(
                NodeReply(
                    a["node"], int(a["num_examples"]), tuple(a["layers"]), int(a["entries"]), int(a["bytes_received"])
                )
                for a in data["accepted"]
            ),
            rejected=tuple((node, str(reason)) for node, reason in data["rejected"]),
            failures=tuple((node, str(reason)) for node, reason in data["failures"]),
            missing=tuple(data["missing"]),
            aggregated_layers=tuple(data["aggregated_layers"]),
            bytes_sent=tuple((node, int(n)) for node, n in data["bytes_sent"]),
        )
