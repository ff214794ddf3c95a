"""A real Flower deployment on 127.0.0.1: ``flower-superlink``, 3 ``flower-supernode``s and ``flwr run``.

The test starts the SuperLink and the SuperNodes as separate processes on free loopback
ports (``--insecure``), submits the example app (``examples/flower``) with ``flwr run``
against that SuperLink, and checks what the ServerApp recorded against an independent
numpy reading of the replies (each one compact ``ArrayRecord``, read with the independent
``conftest.ref_compact_decode``): every layer (or weight) some node sent is the
example-weighted mean of what was sent, everything else is bit-identical to the round
before, and the byte counts match the arrays. One deployment runs 3 rounds of dynamic
layer exchange, then 3 rounds of sparse exchange going on from its result; a second one
has a node whose ClientApp raises in round 2. HOME and FLWR_HOME point into the test's
temporary folder, every wait is bounded, and every process the test started (and those
they started) is stopped by PID at the end.
"""

from __future__ import annotations

import os
import time

import pytest

pytest.importorskip("flwr", reason="the deployment test needs Flower: pip install 'jaxlayerx[flower]'")
pytest.importorskip("sklearn", reason="the example's data (scikit-learn's digits) needs scikit-learn")

from deploy_support import (  # noqa: E402
    NODES,
    RUN_TIMEOUT,
    check_dynamic_then_sparse,
    check_run,
    deployment,
    replies_of,
    run_dynamic_then_sparse,
)


def test_dynamic_then_sparse_exchange_through_flwr_run(tmp_path):
    dense, sparse = tmp_path / "dynamic", tmp_path / "sparse"
    with deployment(tmp_path) as federation:
        outputs = run_dynamic_then_sparse(federation, dense, sparse)
    check_dynamic_then_sparse(dense, sparse, outputs)


def test_a_node_raising_in_round_two_does_not_stop_the_run(tmp_path):
    """Then a run asking for more SuperNodes than there are ends after its timeout, saying so."""
    record = tmp_path / "record"
    with deployment(tmp_path) as federation:
        output = federation.run(
            "run",
            exchanger="dynamic-percentage",
            **{"record-dir": str(record), "fail-partition": 2, "fail-round": 2, "fraction-evaluate": 0.0},
        )
        short = federation.run("run_short", check=False, **{"min-nodes": NODES + 1, "round-timeout": 5.0})
    assert f"{NODES} of the {NODES + 1} nodes needed connected within 5 s" in short, short
    check_run(record, sparse=False, senders_per_round={1: NODES, 2: NODES - 1, 3: NODES})
    errors = [entry["error"] for entry in replies_of(record, 2).values() if "error" in entry]
    assert len(errors) == 1 and "fails in round 2, as asked" in errors[0], (errors, output)


def test_a_supernode_killed_mid_run_is_named_by_its_own_id(tmp_path):
    """SIGKILL one SuperNode once round 2 has started: the run goes on with the others, and
    every line about the lost node names its id (read from its own log), whether its reply
    is missing or an error reply Flower makes for it."""
    import re
    import signal
    import threading

    with deployment(tmp_path) as federation:
        outputs: list[str] = []
        run = threading.Thread(
            target=lambda: outputs.append(federation.run("run", **{"min-nodes": NODES - 1, "round-timeout": 30.0}))
        )
        run.start()
        deadline = time.monotonic() + RUN_TIMEOUT
        log = tmp_path / "run.log"  # written by flwr run, once the thread has started it
        while "[ROUND 2/3]" not in (log.read_text(errors="replace") if log.exists() else ""):
            assert time.monotonic() < deadline and run.is_alive(), log.read_text() if log.exists() else "no run.log"
            time.sleep(0.2)
        time.sleep(1.0)
        os.kill(federation.started["supernode1"].pid, signal.SIGKILL)
        run.join(timeout=RUN_TIMEOUT)
        (output,) = outputs
    node_ids = {
        node: re.search(r"SuperNode ID: (\d+)", (tmp_path / f"supernode{node}.log").read_text()).group(1)
        for node in range(NODES)
    }
    about_nodes = re.findall(r"node (\d+) (never replied|replied with an error)", output)
    assert about_nodes, output
    assert {node for node, _ in about_nodes} == {node_ids[1]}, (about_nodes, node_ids)
    for server_round in (2, 3):
        (line,) = [text for text in output.splitlines() if f"round {server_round}: averaged" in text]
        assert f"from {NODES - 1} node(s)" in line and re.search(r"(1 failed|1 missing)", line), line
