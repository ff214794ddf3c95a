"""A real Flower deployment with TLS and SuperNode authentication, on 127.0.0.1.

The test makes a CA and a server certificate for 127.0.0.1 and localhost in its temporary
folder (``cryptography``), starts ``flower-superlink`` with them and
``--enable-supernode-auth``, registers 3 SuperNodes' public keys with ``flwr supernode
register`` and starts them with ``--root-certificates`` and their private keys. Beside
them, three nodes that must not get in: one with a key nobody registered, one with no key
(which asks to register itself), and one speaking plaintext (``--insecure``) to the TLS
port. The registered nodes then run 3 rounds of dynamic layer exchange and 3 rounds of
sparse exchange (``flwr run`` over TLS), checked as in test_flower_deploy.py against an
independent numpy reading of the recorded replies, and every reply comes from a
registered node. Every wait is bounded, and every process is stopped by PID at the end.
"""

from __future__ import annotations

import re
import time

import pytest

pytest.importorskip("flwr", reason="the deployment test needs Flower: pip install 'jaxlayerx[flower]'")
pytest.importorskip("sklearn", reason="the example's data (scikit-learn's digits) needs scikit-learn")

from deploy_support import NODES, ROUNDS, check_dynamic_then_sparse, deployment, replies_of, run_dynamic_then_sparse  # noqa: E402

from benchmarks.deployment import in_sessions, make_node_key  # noqa: E402

pytestmark = pytest.mark.deploy

#: Seconds a refused node may take from its start to its exit (process start included).
REFUSAL_BOUND = 60
#: ``--max-wait-time`` of the plaintext node: how long it retries before it gives up.
PLAINTEXT_WAIT = 5


def test_only_registered_nodes_join_a_tls_superlink(tmp_path):
    dense, sparse = tmp_path / "dynamic", tmp_path / "sparse"
    with deployment(tmp_path, tls=True) as federation:
        registered = {federation.node_ids[f"supernode{node}"] for node in range(NODES)}
        assert len(registered) == NODES, federation.node_ids
        unregistered_key, _ = make_node_key(tmp_path / "keys", "unregistered")
        config = f"partition-id=0 num-partitions={NODES}"
        refused = {
            "unregistered": federation.start_supernode("unregistered", config, key=unregistered_key),
            "keyless": federation.start_supernode("keyless", config),
            "plaintext": federation.start_supernode("plaintext", config, plaintext=True, max_wait_time=PLAINTEXT_WAIT),
        }
        deadline = time.monotonic() + REFUSAL_BOUND
        while any(process.poll() is None for process in refused.values()) and time.monotonic() < deadline:
            time.sleep(0.2)
        logs = {name: (tmp_path / f"{name}.log").read_text(errors="replace") for name in refused}
        for name, process in refused.items():
            assert process.returncode not in (None, 0), (name, process.returncode, logs[name])
            assert "Failed to initialize the connection to the SuperLink" in logs[name], logs[name]
            assert "SuperNode ID" not in logs[name], logs[name]
        assert "[code: 2004] Failed to activate SuperNode." in logs["unregistered"], logs["unregistered"]
        assert "SuperNode authentication is enabled" in logs["keyless"], logs["keyless"]
        # plaintext against TLS: the SuperLink drops the connection (Flower reports it as
        # "Server disconnected without sending a response" or "Connection reset by peer");
        # the node gives up once its --max-wait-time has passed
        gave_up = re.search(r"Giving up reconnection after ([\d.]+) seconds", logs["plaintext"])
        assert gave_up and float(gave_up.group(1)) >= PLAINTEXT_WAIT, logs["plaintext"]
        assert re.search(r"Server disconnected without sending a response|Connection reset by peer", logs["plaintext"])
        # Nothing they started is left behind (each SuperNode starts a SuperExec in its session).
        while any(in_sessions({process.pid}) for process in refused.values()) and time.monotonic() < deadline + 15:
            time.sleep(0.2)
        assert not any(in_sessions({process.pid}) for process in refused.values())

        outputs = run_dynamic_then_sparse(federation, dense, sparse)
    # Each registered node ran under the ID it was registered with; the SuperLink activated no other.
    for node in range(NODES):
        log = (tmp_path / f"supernode{node}.log").read_text(errors="replace")
        assert f"SuperNode ID: {federation.node_ids[f'supernode{node}']}" in log, log[-2000:]
    activated = re.findall(r"\[Fleet\.ActivateNode\] Activated node_id=(\d+)", (tmp_path / "superlink.log").read_text())
    assert {int(node) for node in activated} == registered, (activated, registered)
    for record in (dense, sparse):
        for server_round in range(1, ROUNDS + 1):
            assert set(replies_of(record, server_round)) == registered, (record, server_round)
    check_dynamic_then_sparse(dense, sparse, outputs)
