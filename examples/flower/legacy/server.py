"""Legacy-route Flower server for the example: partial layer exchange on the digits.

python examples/flower/legacy/server.py --address 127.0.0.1:8080 --clients 3

Flower's original ``start_server`` (what fl4health servers speak). Every wait for clients
is bounded by ``--round-timeout``: when too few clients are connected in time, the server
says so and exits with status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pathlib
import sys

import flwr
import numpy as np

from jaxlayerx.flower import FedAvgDynamicLayerStrategy, FedAvgSparseCooTensorStrategy
from jaxlayerx.simulation import EXCHANGER_KINDS
from jaxlayerx.tree import unflatten

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # the app's digits_app package
from digits_app import task  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default="127.0.0.1:8080", help="host:port to listen on (default: loopback)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=3, help="clients to wait for before round 1")
    parser.add_argument(
        "--min-clients", type=int, default=None, help="fewest clients a round goes on with (default: all)"
    )
    parser.add_argument(
        "--round-timeout", type=float, default=120.0, help="seconds a round waits for clients, and for their results"
    )
    parser.add_argument(
        "--exchanger",
        default="dynamic-percentage",
        choices=EXCHANGER_KINDS,
        help="what the clients run: a sparse one needs the sparse strategy, any other the layer one",
    )
    parser.add_argument("--record", type=pathlib.Path, default=None, help="folder for the global model and history")
    args = parser.parse_args()
    _show_jaxlayerx_logs()

    variables = task.init_variables()
    x_test, y_test = task.global_test_set(args.clients)
    minimum = args.min_clients or args.clients
    strategy: FedAvgDynamicLayerStrategy
    strategy_class = _strategy_class(task.make_exchanger(args.exchanger, variables).payload_kind)

    def evaluate_global(server_round, arrays, config):
        model = unflatten(dict(zip(strategy.global_layers, arrays)), like=variables)
        loss, accuracy = task.evaluate(model, x_test, y_test)
        if args.record is not None:
            np.savez(args.record / f"global_round{server_round}.npz", **_npz_safe(strategy.global_layers))
        logging.getLogger("jaxlayerx.example").info("round %d: global accuracy %.3f", server_round, accuracy)
        return loss, {"accuracy": accuracy}

    strategy = strategy_class(
        variables,
        min_fit_clients=minimum,
        min_evaluate_clients=minimum,
        min_available_clients=minimum,
        evaluate_fn=evaluate_global,
        accept_failures=True,
    )
    if args.record is not None:
        args.record.mkdir(parents=True, exist_ok=True)
    try:
        flwr.server.start_server(
            server_address=args.address,
            client_manager=BoundedClientManager(args.clients, timeout=args.round_timeout),
            config=flwr.server.ServerConfig(num_rounds=args.rounds, round_timeout=args.round_timeout),
            strategy=strategy,
        )
    except NotEnoughClients as error:
        print(f"server: {error}; stopping", file=sys.stderr, flush=True)
        # start_server leaves its gRPC server running when the run raises, and its worker
        # threads would hold the connected clients' streams open at exit: end the process.
        os._exit(1)
    if args.record is not None:
        history = [dataclasses.asdict(record) for record in strategy.history]
        (args.record / "server_history.json").write_text(json.dumps(history, indent=1))


def _strategy_class(payload_kind: str) -> type[FedAvgDynamicLayerStrategy]:
    """The strategy that reads what the clients' exchanger sends."""
    return FedAvgSparseCooTensorStrategy if payload_kind == "sparse" else FedAvgDynamicLayerStrategy


class NotEnoughClients(RuntimeError):
    """Fewer clients than a round needs connected within the timeout."""


class BoundedClientManager(flwr.server.SimpleClientManager):
    """Starts the run once ``clients`` are connected; later rounds go on with the strategy's minimum.

    Every wait is bounded by ``timeout`` seconds (Flower's own ``sample`` waits up to a
    day): when it runs out, :class:`NotEnoughClients` says how many were there.
    """

    def __init__(self, clients: int, timeout: float) -> None:
        super().__init__()
        self.waiting_for, self.timeout = clients, timeout  # (``self.clients`` is Flower's registry)

    def sample(self, num_clients, min_num_clients=None, criterion=None):
        needed = max(num_clients if min_num_clients is None else min_num_clients, self.waiting_for)
        if not self.wait_for(needed, timeout=max(1, round(self.timeout))):
            raise NotEnoughClients(
                f"{self.num_available()} of the {needed} clients needed connected within {self.timeout:g} s"
            )
        if self.waiting_for:
            num_clients, self.waiting_for = max(num_clients, self.waiting_for), 0
        return super().sample(num_clients, min_num_clients, criterion)


def _npz_safe(layers):
    """npz keys cannot hold '/': the names go in their own array, in order."""
    return {"names": np.array(list(layers)), **{f"layer{i}": array for i, array in enumerate(layers.values())}}


def _show_jaxlayerx_logs() -> None:
    """Prints the strategy's log lines (accepted, rejected payloads) beside Flower's own."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("jaxlayerx")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


if __name__ == "__main__":
    main()
