"""A round's host-side record: accuracies, and the exact bytes of every message.

The bytes come from what each sampled client sent and pulled, through the codecs the
Flower routes encode with (:mod:`jaxlayerx.protocol.accounting`), so they are what a
deployment of the same federation carries.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxlayerx.base import FlatView
from jaxlayerx.protocol.accounting import LayerSpec, download_nbytes, upload_nbytes
from jaxlayerx.quantize import Quantize
from jaxlayerx.simulation.state import RoundOutput
from jaxlayerx.wire import Wire


class ByteAccounting:
    """The bytes of a simulated federation's messages, on one wire.

    Args:
      layers: the model's layers (name, shape, dtype), in model order.
      mask_shapes: each layer's send-mask shape: ``()`` (whole layers) or the layer's shape.
      quantize: the exchanger's ``quantize``.
      wire: the route whose bytes are counted.
    """

    def __init__(
        self, layers: Sequence[LayerSpec], mask_shapes: FlatView, quantize: Quantize | None, wire: Wire
    ) -> None:
        self.layers = list(layers)
        self.quantize: Quantize | None = quantize
        self.wire = wire
        self.entrywise = any(shape != () for shape in mask_shapes.values())
        self._scalar = np.array([shape == () for shape in mask_shapes.values()])
        self._sizes = np.array([math.prod(layer.shape) for layer in self.layers], np.int64)
        self._sizes_seen: dict[tuple[Any, ...], int] = {}

    def _sized(self, wire: Wire, direction: str, counts: tuple[int, ...], first: bool) -> int:
        """The bytes of one message of ``counts`` entries per layer (kept: rows repeat)."""
        key = (wire, direction, counts, first)
        if key not in self._sizes_seen:
            row = list(counts)
            if direction == "upload":
                size = upload_nbytes(wire, self.layers, row, sparse=self.entrywise, quantize=self.quantize)
            else:
                size = download_nbytes(wire, self.layers, row, sparse=self.entrywise, whole_model=first)
            self._sizes_seen[key] = size
        return self._sizes_seen[key]

    def entry_counts(self, counts: np.ndarray) -> np.ndarray:
        """``(clients, layers)`` entries from a round's send or pull counts, a layer-wise
        mask's flag (0 or 1) read as none or every entry of its layer."""
        counts = np.asarray(counts, np.int64)
        return np.where(self._scalar, counts * self._sizes, counts).astype(np.int64)

    def message_bytes(self, metrics: Mapping[str, Any], wire: Wire | None = None) -> tuple[list[int], list[int]]:
        """``(upload, download)``: the bytes of each sampled client's reply and of the message
        it was sent, in a round's ``metrics`` (:attr:`RoundOutput.metrics`), on ``wire``
        (default: the accounting's)."""
        wire = self.wire if wire is None else wire
        sent = self.entry_counts(np.asarray(metrics["send_counts"]))
        pulled = self.entry_counts(np.asarray(metrics["pull_counts"]))
        firsts = np.asarray(metrics["first_contact"]).tolist()
        upload = [self._sized(wire, "upload", tuple(row.tolist()), False) for row in sent]
        download = [
            self._sized(wire, "download", tuple(row.tolist()), bool(first)) for row, first in zip(pulled, firsts)
        ]
        return upload, download


def round_record(
    round_index: int, output: RoundOutput, accounting: ByteAccounting, n_test: np.ndarray
) -> dict[str, Any]:
    """The round's metrics (see :mod:`jaxlayerx.simulation.report`): the global loss and
    metrics, each sampled client's local ones (``None`` for a client without test
    examples) and their mean, the client updates' metrics, and the exact bytes of every
    message; ``n_test`` is each client's number of test examples."""
    metrics, clients = jax.device_get((output.metrics, output.clients))  # one fetch a round
    return metrics_record(round_index, metrics, np.asarray(clients), accounting, n_test)


def metrics_record(
    round_index: int,
    metrics: Mapping[str, np.ndarray],
    clients: np.ndarray,
    accounting: ByteAccounting,
    n_test: np.ndarray,
) -> dict[str, Any]:
    """:func:`round_record` of a round's metrics and sampled clients, fetched to the host."""
    upload, download = accounting.message_bytes(metrics)
    sent_entries = accounting.entry_counts(np.asarray(metrics["send_counts"]))
    has_test = n_test[clients] > 0
    record: dict[str, Any] = {"round": round_index, "clients": clients.tolist()}
    for key, value in metrics.items():
        if key.startswith("global_"):
            record[key] = float(value)
    for key, values in metrics.items():
        if key.startswith("local_"):
            local = [float(a) if tested else None for a, tested in zip(values, has_test)]
            record[f"{key}_mean"] = (
                float(np.mean([a for a in local if a is not None])) if any(has_test) else float("nan")
            )
            record[key] = local
        elif key.startswith("train_"):
            record[key] = [float(a) for a in values]
    record.update(
        {
            "upload_bytes": int(sum(upload)),
            "download_bytes": int(sum(download)),
            "client_upload_bytes": upload,
            "client_download_bytes": download,
            "layers_sent": [int(np.count_nonzero(row)) for row in sent_entries],
        }
    )
    return record
