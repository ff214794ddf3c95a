"""Legacy-route Flower client for the example: trains its digits partition, sends through an exchanger.

python examples/flower/legacy/client.py --address 127.0.0.1:8080 --client-id 0 --clients 3

Flower's original ``start_client`` (what fl4health clients speak). The client may start
before the server: it retries the connection with backoff until ``--connect-timeout``,
then says so and exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import socket
import sys
import time

import flwr
import grpc
import numpy as np
from flwr.common import ndarray_to_bytes

from jaxlayerx.flower import ExchangerClient, stateful_client_fn
from jaxlayerx.simulation import EXCHANGER_KINDS

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # the app's digits_app package
from digits_app import task  # noqa: E402


class RecordingClient(ExchangerClient):
    """Saves every payload it sends (for checking a run); otherwise an ExchangerClient."""

    def __init__(self, *args, record: pathlib.Path, client_id: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.record, self.client_id = record, client_id

    def fit(self, parameters, config):
        # what the server sent: its bytes as Flower serializes them, and the versions it names
        received = {
            "received_bytes": sum(len(ndarray_to_bytes(array)) for array in parameters),
            "received_arrays": len(parameters),
            "base_round": config.get("jaxlayerx.base-round"),
            "version": config.get("jaxlayerx.round"),
        }
        payload, num_examples, metrics = super().fit(parameters, config)
        stem = self.record / f"client{self.client_id}_round{config['current_server_round']}"
        np.savez(stem.with_suffix(".npz"), *payload)
        stem.with_suffix(".json").write_text(json.dumps({"num_examples": num_examples, **metrics, **received}))
        return payload, num_examples, metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default="127.0.0.1:8080", help="the server's host:port")
    parser.add_argument("--client-id", type=int, required=True, help="which partition of the data, from 0")
    parser.add_argument("--clients", type=int, default=3, help="how many partitions the data is split into")
    parser.add_argument("--exchanger", default="dynamic-percentage", choices=EXCHANGER_KINDS)
    parser.add_argument("--exchange-percentage", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    parser.add_argument("--fail-in-round", type=int, default=None, help="raise during fit in this round (fault test)")
    parser.add_argument("--record", type=pathlib.Path, default=None, help="folder for the payloads sent")
    parser.add_argument(
        "--connect-timeout", type=float, default=120.0, help="seconds to keep retrying to reach the server"
    )
    args = parser.parse_args()

    x_train, y_train, x_test, y_test = task.load_partition(args.client_id, args.clients)
    train = task.make_train_fn(x_train, y_train, epochs=args.epochs, seed=args.client_id)

    def train_fn(variables, config):
        if config.get("current_server_round") == args.fail_in_round:
            raise RuntimeError(f"client {args.client_id} fails in round {args.fail_in_round}, as asked")
        return train(variables, config)

    served = []  # set once the server has sent a first message

    def make_client(context):
        served.append(True)
        variables = task.init_variables()
        exchanger = task.make_exchanger(args.exchanger, variables, args.exchange_percentage)
        options = dict(evaluate_fn=task.make_evaluate_fn(x_test, y_test))
        if args.record is None:
            return ExchangerClient(variables, exchanger, train_fn, **options)
        args.record.mkdir(parents=True, exist_ok=True)
        return RecordingClient(variables, exchanger, train_fn, record=args.record, client_id=args.client_id, **options)

    deadline = time.monotonic() + args.connect_timeout
    reached = False  # the server listened at some point (it may have ended without this client)
    for wait in _backoff(deadline):
        if not _reachable(args.address, wait):
            continue
        reached = True
        try:
            flwr.client.start_client(
                server_address=args.address, client_fn=stateful_client_fn(make_client), insecure=True
            )
            return
        except grpc.RpcError as error:
            # Flower's legacy transport raises, without retrying, when the server is not
            # there yet; once the server has sent a message, a broken connection ends the client.
            if served or error.code() != grpc.StatusCode.UNAVAILABLE:
                raise
    if reached:
        print(
            f"client {args.client_id}: the server at {args.address} closed the connection before sending this "
            f"client any work, and no server took it back within {args.connect_timeout:g} s",
            file=sys.stderr,
        )
    else:
        print(
            f"client {args.client_id}: no server at {args.address} within {args.connect_timeout:g} s", file=sys.stderr
        )
    sys.exit(1)


def _backoff(deadline: float, first: float = 0.25, longest: float = 5.0):
    """Yields the seconds the next attempt may take, sleeping between attempts, until ``deadline``."""
    delay = first
    while (left := deadline - time.monotonic()) > 0:
        yield min(left, longest)
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(2 * delay, longest)


def _reachable(address: str, timeout: float) -> bool:
    """Whether something accepts TCP connections at ``host:port``."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except OSError:
        return False


if __name__ == "__main__":
    main()
