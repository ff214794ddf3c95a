"""SuperNodes killed under load: the soak of benchmarks/soak.py, checked against numpy.

6 SuperNodes run 10 rounds of sparse exchange with client sampling (``fraction-train``
0.5) while a controller SIGKILLs a random SuperNode (its whole process group) every few
seconds and starts it again (a new node id, an empty node state), after a warm-up run
that fills the ClientApps' compilation cache. The test checks:

* the run finishes (``flwr run`` exits 0, the stream shows the last round and the run's
  totals), after at least 8 kills during its rounds;
* each round samples ``max(int(0.5 * connected), min-nodes)`` nodes, as Flower's FedAvg
  does, and each train message, reply, failure and missing node is accounted for;
* every round's global model is the example-weighted numpy mean of the replies the
  strategy accepted, weight by weight, and every weight nobody sent is bit-identical to
  the round before; the only failures are Flower's for nodes lost (no ClientApp raised,
  so none was sent a base version it does not hold);
* re-synchronization: each message's base version is the one the node is known to hold
  (-1, the whole model, for a node never heard from, a restarted one included, or one
  that failed or went missing), and the record sent on that base, applied to that base's
  global model, gives the current global model bit for bit; restarted nodes' replies are
  among those accepted;
* no process is left (stopped by PID, and none carries the federation's ``FLWR_HOME``);
* the SuperLink's and the ServerApp's memory at the end is within 20% of that after round 2.
"""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np
import pytest

pytest.importorskip("flwr", reason="the soak needs Flower: pip install 'jaxlayerx[flower]'")
pytest.importorskip("sklearn", reason="the example's data (scikit-learn's digits) needs scikit-learn")

from conftest import ref_apply, ref_compact_decode  # noqa: E402
from deploy_support import check_round_mean, global_model, replies_of, wire_bytes  # noqa: E402
from flwr.common.constant import ErrorCode  # noqa: E402

from benchmarks.soak import FRACTION_TRAIN, MIN_NODES, soak  # noqa: E402

pytestmark = pytest.mark.deploy

NODES = 6
ROUNDS = 10
#: Mean seconds between two kills.
KILL_EVERY = 6.0
#: Seconds ``flwr run`` may take.
SOAK_TIMEOUT = 540


def test_a_sparse_run_goes_on_while_supernodes_are_killed_and_restarted(tmp_path):
    result = soak(tmp_path, nodes=NODES, rounds=ROUNDS, seed=0, kill_every=KILL_EVERY, timeout=SOAK_TIMEOUT)
    output, record = result["output"], pathlib.Path(result["record"])
    lines = output.splitlines()
    assert result["code"] == 0, output[-4000:]
    assert f"[ROUND {ROUNDS}/{ROUNDS}]" in output and sum("run: sent " in line for line in lines) == 1, output
    assert result["seconds"] < 600, result["seconds"]

    # At least 8 kills during the rounds; the node ids of the SuperNodes started again.
    assert not result["errors"], result["errors"]
    kills = result["kills"]
    assert sum(1 <= kill["round"] <= ROUNDS for kill in kills) >= 8, kills
    node_ids = result["node_ids"]
    restarted = {node_ids[kill["restarted_as"]] for kill in kills if kill["restarted_as"] in node_ids}

    # No process left: the federation's stop, the killed groups, anything with its FLWR_HOME.
    assert result["left"] == [] and result["killed_alive"] == [] and result["left_anywhere"] == [], result

    # Memory at the end within 20% of that after round 2.
    for process in ("superlink", "serverapp"):
        reading = result["memory"][process]
        assert reading["ratio"] is not None and reading["ratio"] <= 1.2, (process, reading)

    check_record(record, output, restarted)


def check_record(record: pathlib.Path, output: str, restarted: set[int]) -> None:
    """Every round of the soak's record (sampling, accounting, re-synchronization, the
    global model) against numpy; ``restarted``: the node ids of restarted SuperNodes."""
    lines = output.splitlines()
    history = {entry["server_round"]: entry for entry in json.loads((record / "history.json").read_text())}
    assert sorted(history) == list(range(1, ROUNDS + 1))
    sampled = [tuple(map(int, found)) for found in re.findall(r"Sampled (\d+) nodes \(out of (\d+)\)", output)]
    assert len(sampled) == ROUNDS, sampled
    held: dict[int, int] = {}  # node -> the global version it is known to hold
    accepted_from_restarted = 0
    for server_round in range(1, ROUNDS + 1):
        before, after = global_model(record, server_round - 1), global_model(record, server_round)
        entry = history[server_round]
        sent = json.loads((record / f"round{server_round}_sent.json").read_text())
        replies = replies_of(record, server_round)
        nodes = [message["node"] for message in sent]

        # Flower's sampling over the nodes the strategy counted, and every message accounted for.
        count, connected = sampled[server_round - 1]
        assert len(nodes) == len(set(nodes)) == count < connected
        assert count == max(int(connected * FRACTION_TRAIN), MIN_NODES), (count, connected)
        accepted = {reply["node"] for reply in entry["accepted"]}
        failed = {node for node, _ in entry["failures"]}
        assert not entry["rejected"]
        assert accepted == {node for node, reply in replies.items() if "error" not in reply}
        assert failed == {node for node, reply in replies.items() if "error" in reply}
        assert set(entry["missing"]) == set(nodes) - set(replies) and set(replies) <= set(nodes)
        # Flower's errors for a node lost (no heartbeat, a reply never uploaded), never a
        # ClientApp's exception (as a base version the node does not hold would raise).
        codes = {replies[node]["error_code"] for node in failed}
        assert not codes & {ErrorCode.CLIENT_APP_RAISED_EXCEPTION, ErrorCode.LOAD_CLIENT_APP_EXCEPTION}, entry
        bases = {}
        for base in {message["base-round"] for message in sent}:
            with np.load(record / f"round{server_round}_base{base}.npz") as saved:
                bases[base] = {name: saved[name] for name in saved.files}
        # bytes as Flower counts the record sent on each base, by an independent count
        assert dict(entry["bytes_sent"]) == {
            message["node"]: wire_bytes({"arrays": bases[message["base-round"]]}) for message in sent
        }
        (shown,) = [line for line in lines if f"round {server_round}: averaged " in line]
        assert (
            f"from {len(accepted)} node(s); 0 rejected, {len(failed)} failed, {len(entry['missing'])} missing" in shown
        ), shown

        # Re-synchronization: the base each node holds, and the update over it exact.
        for message in sent:
            assert message["round"] == server_round - 1, message
            assert message["base-round"] == held.get(message["node"], -1), (server_round, message, held)
            if message["node"] in accepted:
                received = replies[message["node"]]["metrics"]["jaxlayerx.bytes-received"]
                assert received == dict(entry["bytes_sent"])[message["node"]]
        for base, arrays in bases.items():
            model = ref_apply({} if base == -1 else global_model(record, base), ref_compact_decode(arrays))
            assert sorted(model) == sorted(before), (base, sorted(model))
            for name in before:
                assert model[name].dtype == before[name].dtype, name
                np.testing.assert_array_equal(model[name], before[name], err_msg=f"round {server_round} base {base}")
        for node in accepted:
            held[node] = server_round - 1
        for node in failed | set(entry["missing"]):
            held.pop(node, None)
        accepted_from_restarted += len(accepted & restarted)

        # The global model: the example-weighted mean of the accepted replies, weight by weight.
        for reply in entry["accepted"]:
            assert reply["num_examples"] == replies[reply["node"]]["metrics"]["num-examples"]
        check_round_mean(before, after, [replies[node] for node in accepted], entry["aggregated_layers"], sparse=True)
    assert accepted_from_restarted > 0, "no restarted node's reply was accepted"
