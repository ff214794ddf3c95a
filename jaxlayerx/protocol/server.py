"""The server side of the exchange protocol, framework-free: both Flower routes are thin
shells over :class:`ExchangeServer`.

It holds the global layers, the version in which each layer (or entry) last changed, and
the version each client holds (:mod:`jaxlayerx.protocol.ledger`). It serves each client what
it lacks, confirms what a client received, forgets a client that failed, checks replies
against the global model, and aggregates and applies them with the same masked average the
simulation runs (:func:`jaxlayerx.masked_fedavg`, compiled), the clients in ascending order
of their keys: a deployed federation and a simulated one average bit for bit alike.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, cast

import jax
import numpy as np

from jaxlayerx._host import to_numpy
from jaxlayerx.aggregation import AVERAGE_OVER, compiled_masked_fedavg
from jaxlayerx.payload import Entries, Payload, dense_entries, sparse_entries
from jaxlayerx.protocol import ledger
from jaxlayerx.quantize import host_rebuild
from jaxlayerx.validation import check_finite, check_payload

#: A client's key: Flower node ids (int) on the Message API, client ids (str) on the legacy route.
Client = Hashable


@dataclasses.dataclass(frozen=True)
class Update:
    """What a client is sent.

    Attributes:
      payload: the global entries the client lacks (whole layers, or entries).
      base: the version the payload applies over; ``None`` when it is the whole model.
      version: the version the client holds once it has applied the payload.
    """

    payload: Payload
    base: int | None
    version: int

    @property
    def whole_model(self) -> bool:
        return self.base is None


@dataclasses.dataclass(frozen=True)
class Reply:
    """A client's checked reply: its weight and what it sent (plain values)."""

    client: Client
    num_examples: int
    payload: Payload


@dataclasses.dataclass(frozen=True)
class RoundChange:
    """What one aggregation did.

    Attributes:
      version: the global version after it.
      changed: the layers whose global value changed, sorted.
      entries: ``name -> entries changed`` for those layers.
    """

    version: int
    changed: tuple[str, ...]
    entries: Mapping[str, int]


class ExchangeServer:
    """The global model, its versions, and what each client holds.

    Args:
      global_layers: the initial global model, ``name -> array`` (copied).
      entrywise: versions and averages per entry (sparse exchange) rather than per layer.
      weighted: weight each reply by its example count (else uniformly).
      average_over: ``"senders"`` or ``"participants"`` (see :func:`jaxlayerx.masked_fedavg`).
      allow_nonfinite: accept NaN and infinite values instead of rejecting the reply.

    Attributes:
      global_layers: ``name -> numpy array``, in model order.
      version: the number of the last round aggregated (0: the initial model).
    """

    def __init__(
        self,
        global_layers: Mapping[str, Any],
        *,
        entrywise: bool,
        weighted: bool = True,
        average_over: str = "senders",
        allow_nonfinite: bool = False,
    ) -> None:
        if average_over not in AVERAGE_OVER:
            raise ValueError(f"average_over must be one of {', '.join(AVERAGE_OVER)}, got {average_over!r}")
        names = list(global_layers)
        self.global_layers: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict(
            (name, np.array(array, copy=True)) for name, array in zip(names, to_numpy(global_layers.values()))
        )
        self.entrywise = bool(entrywise)
        self.weighted = bool(weighted)
        self.average_over = average_over
        self.allow_nonfinite = bool(allow_nonfinite)
        self.version = 0
        self.updated_in: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict(
            (name, np.zeros(np.shape(layer) if self.entrywise else (), np.int64))
            for name, layer in self.global_layers.items()
        )
        self._held: dict[Client, int] = {}
        self._in_flight: dict[Client, int] = {}
        self._served: dict[int | None, Payload] = {}

    # --- what clients hold ----------------------------------------------------------------

    def holds(self, client: Client) -> int | None:
        """The version ``client`` is known to hold (``None``: nothing)."""
        return self._held.get(client)

    def serve(self, client: Client) -> Update:
        """What ``client`` lacks: the whole model on first contact, else the entries changed
        since the version it holds. The client is then in flight until confirmed."""
        base = self._held.get(client)
        if base not in self._served:
            self._served[base] = self.changed_since(base)
        self._in_flight[client] = self.version
        return Update(self._served[base], base, self.version)

    def changed_since(self, base: int | None) -> Payload:
        """The global entries changed after version ``base`` (every entry when ``None``)."""
        payload: Payload = collections.OrderedDict()
        held = ledger.NOTHING if base is None else base
        for name, layer in self.global_layers.items():
            changed = ledger.changed_since(self.updated_in[name], held)
            if not changed.any():
                continue
            payload[name] = sparse_entries(layer, changed) if changed.ndim else dense_entries(layer)
        return payload

    def confirm(self, client: Client) -> None:
        """``client`` answered: it holds the version it was last served."""
        if client in self._in_flight:
            self._held[client] = self._in_flight.pop(client)

    def forget(self, client: Client) -> None:
        """``client`` failed or did not answer: it gets the whole model next time."""
        self._held.pop(client, None)
        self._in_flight.pop(client, None)

    def clients(self) -> dict[Client, int]:
        """``client -> version held`` for every client known to hold one."""
        return dict(self._held)

    # --- replies --------------------------------------------------------------------------

    def accept(self, client: Client, num_examples: int, payload: Payload) -> Reply:
        """A reply checked whole against the global model, quantized updates rebuilt over it.

        Raises:
          KeyError, ValueError, TypeError: the reply is refused (the message says why).
        """
        checked = check_payload(payload, self.global_layers, allow_nonfinite=self.allow_nonfinite)
        rebuilt: Payload = collections.OrderedDict()
        for name, entries in checked.items():
            if not self.entrywise and not entries.dense:
                raise ValueError(
                    f"layer {name!r}: a layer exchange averages whole layers, got {entries.sent} of its "
                    f"{entries.size} entries"
                )
            rebuilt[name] = self._rebuilt(name, entries)
        return Reply(client, int(num_examples), rebuilt)

    def _rebuilt(self, name: str, entries: Entries) -> Entries:
        if entries.quantized is None:
            return entries
        base = self.global_layers[name].reshape(-1)
        if entries.indices is not None:
            base = base[entries.indices]
        values = np.asarray(host_rebuild(base, entries.values, entries.scale))
        if not self.allow_nonfinite:
            check_finite(name, values)
        return Entries(values, entries.indices, entries.shape)

    def aggregate(self, replies: Sequence[Reply], version: int) -> RoundChange:
        """Averages the accepted ``replies`` into the global model, which becomes ``version``.

        Each layer (entry) is averaged over the replies that hold it, or moved by the mean
        change over all of them (``average_over``); what nobody sent keeps its value.

        Raises:
          ValueError: ``version`` does not come after the current one.
        """
        if version <= self.version:
            raise ValueError(f"round {version} does not come after version {self.version}")
        ordered = sorted(replies, key=lambda reply: _order_key(reply.client))
        changed: dict[str, int] = {}
        if ordered:
            counts = np.asarray([reply.num_examples for reply in ordered], np.float32)
            stacked, masks = self._stacked(ordered)
            averages, sent = jax.device_get(
                compiled_masked_fedavg(
                    stacked, masks, counts, self.global_layers, weighted=self.weighted, over=self.average_over
                )
            )
            for name in self.global_layers:
                moved = np.asarray(sent[name])
                if not moved.any():
                    continue
                self.global_layers[name] = np.asarray(averages[name])
                self.updated_in[name] = np.asarray(ledger.mark_changed(self.updated_in[name], moved, version, np))
                changed[name] = int(np.count_nonzero(moved)) if moved.ndim else self.global_layers[name].size
        self.version = version
        self._served.clear()
        return RoundChange(version, tuple(sorted(changed)), changed)

    def _stacked(
        self, replies: list[Reply]
    ) -> tuple[collections.OrderedDict[str, np.ndarray], collections.OrderedDict[str, np.ndarray]]:
        """Every layer of every reply stacked on a leading axis, with what each sent."""
        stacked: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        masks: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        rows = len(replies)
        for name, layer in self.global_layers.items():
            values = np.zeros((rows, *layer.shape), layer.dtype)
            mask = np.zeros((rows, *layer.shape) if self.entrywise else (rows,), bool)
            # Flat views of the whole stack: a row of a 0-d layer would be a copy.
            flat_values, flat_mask = values.reshape(rows, -1), mask.reshape(rows, -1)
            for row, reply in enumerate(replies):
                entries = reply.payload.get(name)
                if entries is None:
                    continue
                index = slice(None) if entries.dense else entries.indices
                flat_values[row, index] = entries.values.astype(layer.dtype, copy=False)
                flat_mask[row, index if self.entrywise else slice(None)] = True
            stacked[name], masks[name] = values, mask
        return stacked, masks

    # --- checkpoints ----------------------------------------------------------------------

    def state(self) -> tuple[collections.OrderedDict[str, np.ndarray], dict[str, Any]]:
        """``(arrays, meta)``: the global layers (and per-entry versions), and the rest as JSON."""
        arrays = collections.OrderedDict(self.global_layers)
        meta: dict[str, Any] = {
            "version": self.version,
            "entrywise": self.entrywise,
            "held": [[client, version] for client, version in self._held.items()],
        }
        if self.entrywise:
            arrays.update((f"updated_in/{name}", rounds) for name, rounds in self.updated_in.items())
        else:
            meta["updated_in"] = {name: int(rounds) for name, rounds in self.updated_in.items()}
        return arrays, meta

    def restore(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        """Restores what :meth:`state` returned (layers checked against the current ones).

        Raises:
          ValueError: layers that differ (names or shapes), or a checkpoint of the other granularity.
        """
        layers = {name: array for name, array in arrays.items() if not name.startswith("updated_in/")}
        expected = {name: np.shape(layer) for name, layer in self.global_layers.items()}
        if {name: np.shape(layer) for name, layer in layers.items()} != expected:
            raise ValueError(f"the saved layers {sorted(layers)} differ (names or shapes) from the model's")
        if bool(meta["entrywise"]) != self.entrywise:
            raise ValueError("the saved state is of the other kind (per-entry or per-layer versions)")
        self.global_layers = collections.OrderedDict((name, np.array(layers[name])) for name in self.global_layers)
        if self.entrywise:
            self.updated_in = collections.OrderedDict(
                (name, np.asarray(arrays[f"updated_in/{name}"], np.int64)) for name in self.global_layers
            )
        else:
            saved = cast(Mapping[str, int], meta["updated_in"])
            self.updated_in = collections.OrderedDict(
                (name, np.asarray(int(saved[name]), np.int64)) for name in self.global_layers
            )
        self.version = int(meta["version"])
        self._held = {_client_key(client): int(version) for client, version in meta["held"]}
        self._in_flight.clear()
        self._served.clear()


def _order_key(client: Client) -> tuple[str, Any]:
    """Clients ordered by type name, then value: ints among ints, strings among strings."""
    return (type(client).__name__, client)


def _client_key(client: Any) -> Client:
    """A client key read back from JSON (a list for what was a tuple)."""
    return tuple(cast(list[Any], client)) if isinstance(client, list) else cast(Client, client)
