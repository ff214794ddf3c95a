"""The Flower example on loopback, on the Message API and on the legacy route: wall times.

    python -m benchmarks.deployment [--rounds 3] [--nodes 3] [--json FILE]

The same federation both ways: the example app (``examples/flower``: the digits MLP,
``dynamic-percentage``, one local epoch, a partition per node) on ``--nodes`` nodes for
``--rounds`` rounds, on 127.0.0.1.

* Message API: ``flower-superlink``, ``--nodes`` ``flower-supernode``s and ``flwr run
  --stream``, timed from the SuperLink's start to the run's end (``total``) and from the
  submission to the run's end (``run``). Flower starts a fresh ClientApp process for every
  message; the ClientApp keeps JAX's compiled programs in a cache folder (here a new one
  per measurement, so the first round compiles). Two configurations: the example's
  default (the server evaluates the global model; no evaluate messages) and
  ``fraction-evaluate=1`` (every node also evaluates, one more message per node and round).
* Legacy route: ``examples/flower/legacy/server.py`` and its clients, timed from the
  server's start to the last process's exit.

Every process is started in its own session and stopped by its PID (and those of its
children), SIGTERM then SIGKILL. The ratio printed is the Message API's total over the
legacy route's.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence

ROOT = pathlib.Path(__file__).resolve().parent.parent
APP = ROOT / "examples" / "flower"
BIN = pathlib.Path(sys.executable).parent
#: Seconds any one wait may take before the benchmark gives up.
TIMEOUT = 600
#: Seconds a process may take to exit after SIGTERM (then SIGKILL).
STOP_TIMEOUT = 15


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def loopback_environment(**extra: str) -> dict[str, str]:
    """This environment for Flower processes on 127.0.0.1: no proxies, JAX on the CPU,
    unbuffered output, then ``extra``."""
    env = {key: value for key, value in os.environ.items() if "proxy" not in key.lower()}
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", no_proxy="127.0.0.1,localhost")
    env.update(extra)
    return env


def descendants(pids: set[int]) -> set[int]:
    """Every live descendant of ``pids`` (from /proc)."""
    parents: dict[int, int] = {}
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    frontier = set(pids)
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def in_sessions(leaders: set[int]) -> set[int]:
    """Every live process of the sessions ``leaders`` started (from /proc), their orphans
    included: a child whose parent exited is reparented, but keeps its session."""
    found: set[int] = set()
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[4]) in leaders and alive(int(stat.parent.name)):
                found.add(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):  # a zombie has exited
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


class Processes:
    """Processes started in their own sessions, logging into ``folder``, stopped by PID."""

    def __init__(self, folder: pathlib.Path, env: dict[str, str]) -> None:
        self.folder, self.env = folder, env
        self.started: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, command: Sequence[str], cwd: pathlib.Path | None = None) -> subprocess.Popen[bytes]:
        with (self.folder / f"{name}.log").open("w") as log:
            process = subprocess.Popen(
                list(command),
                cwd=cwd or self.folder,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started[name] = process
        return process

    def log(self, name: str, lines: int = 40) -> str:
        path = self.folder / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> list[int]:
        """SIGTERM to every process started, its descendants and the rest of its session, SIGKILL after
        ``STOP_TIMEOUT``; returns the PIDs still alive after that (none, normally)."""
        started = {process.pid for process in self.started.values()}
        everyone = started | descendants(started) | in_sessions(started)
        for pid in everyone:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for process in self.started.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
        while any(alive(pid) for pid in everyone) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in everyone:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for process in self.started.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=STOP_TIMEOUT)
        time.sleep(0.5)
        return [pid for pid in everyone if alive(pid)]


@dataclasses.dataclass(frozen=True)
class Tls:
    """PEM files of a SuperLink with TLS: the CA certificate that SuperNodes and ``flwr``
    trust, and the SuperLink's certificate and private key."""

    ca_cert: pathlib.Path
    server_cert: pathlib.Path
    server_key: pathlib.Path


def make_tls(folder: pathlib.Path) -> Tls:
    """A new CA, and a server certificate it signs for 127.0.0.1 and localhost (EC P-256
    keys, valid for a day), written to ``folder`` as ``ca.crt``, ``server.pem`` and
    ``server.key``."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jaxlayerx test CA")])
    ca_id = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())

    def signed(subject: x509.Name, key: ec.EllipticCurvePrivateKey, ca: bool) -> x509.Certificate:
        usage = dict.fromkeys(("content_commitment", "key_encipherment", "data_encipherment", "key_agreement"), False)
        builder = (
            x509.CertificateBuilder(
                subject_name=subject,
                issuer_name=ca_name,
                public_key=key.public_key(),
                serial_number=x509.random_serial_number(),
                not_valid_before=start,
                not_valid_after=start + datetime.timedelta(days=1),
            )
            .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=ca,
                    crl_sign=ca,
                    encipher_only=False,
                    decipher_only=False,
                    **usage,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_id), critical=False)
        )
        if not ca:
            names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        return builder.sign(ca_key, hashes.SHA256())

    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    tls = Tls(folder / "ca.crt", folder / "server.pem", folder / "server.key")
    tls.ca_cert.write_bytes(signed(ca_name, ca_key, ca=True).public_bytes(serialization.Encoding.PEM))
    tls.server_cert.write_bytes(signed(server_name, server_key, ca=False).public_bytes(serialization.Encoding.PEM))
    tls.server_key.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    tls.server_key.chmod(0o600)
    return tls


def make_node_key(folder: pathlib.Path, name: str) -> tuple[pathlib.Path, pathlib.Path]:
    """A SuperNode's authentication key pair, as ``ssh-keygen -t ecdsa -b 384 -N ""`` writes
    it: ``folder/name`` (the private key, OpenSSH format) and ``folder/name.pub``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    private.chmod(0o600)
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n"
    )
    return private, public


class MessageApiFederation(Processes):
    """A SuperLink and SuperNodes on 127.0.0.1 (``--insecure``), and ``flwr run`` against them.

    With ``tls``, the SuperLink, the SuperNodes and ``flwr`` use TLS instead; with
    ``supernode_auth`` too, the SuperLink admits only registered SuperNodes, and
    :meth:`start_federation` registers a new key for each of its SuperNodes."""

    def __init__(
        self, folder: pathlib.Path, nodes: int, *, tls: Tls | None = None, supernode_auth: bool = False, **env: str
    ) -> None:
        if supernode_auth and tls is None:
            raise ValueError("SuperNode authentication needs TLS: pass tls= as well")
        home = folder / "home"
        (home / ".flwr").mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        security = "insecure = true" if tls is None else f"root-certificates = {json.dumps(str(tls.ca_cert.resolve()))}"
        (home / ".flwr" / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{self.port}"\n{security}\n'
        )
        path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
        super().__init__(folder, loopback_environment(HOME=str(home), FLWR_HOME=str(home / ".flwr"), PATH=path, **env))
        self.nodes = nodes
        self.tls, self.supernode_auth = tls, supernode_auth
        #: The node ID each registered SuperNode (by name) was given.
        self.node_ids: dict[str, int] = {}

    def start_federation(self, node_config: str = "") -> None:
        """The SuperLink (the app runs in this environment: no dependency installation),
        then the SuperNodes, each with its partition (and, with ``supernode_auth``, a key
        registered first)."""
        if self.tls is None:
            security = ["--insecure"]
        else:
            security = ["--ssl-ca-certfile", str(self.tls.ca_cert), "--ssl-certfile", str(self.tls.server_cert)]
            security += ["--ssl-keyfile", str(self.tls.server_key)]
            security += ["--enable-supernode-auth"] if self.supernode_auth else []
        link = self.start(
            "superlink",
            [str(BIN / "flower-superlink"), *security, "--host", "127.0.0.1", "--port", str(self.port)]
            + ["--disable-runtime-dependency-installation"],
        )
        deadline = time.monotonic() + TIMEOUT
        while not listening(self.port):
            if link.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the SuperLink did not listen on {self.port}:\n{self.log('superlink')}")
            time.sleep(0.1)
        for node in range(self.nodes):
            name = f"supernode{node}"
            key = None
            if self.supernode_auth:
                key, public = make_node_key(self.folder / "keys", name)
                self.node_ids[name] = self.register(public)
            self.start_supernode(name, self.partition_config(node, node_config), key=key)

    def partition_config(self, node: int, extra: str = "") -> str:
        """The ``--node-config`` of the SuperNode of partition ``node``, then ``extra``."""
        return f"partition-id={node} num-partitions={self.nodes} {extra}".strip()

    def start_supernode(
        self,
        name: str,
        node_config: str,
        *,
        key: pathlib.Path | None = None,
        plaintext: bool = False,
        max_wait_time: float = 60,
    ) -> subprocess.Popen[bytes]:
        """A SuperNode of this SuperLink: over TLS where the SuperLink has it, unless
        ``plaintext`` (``--insecure``); authenticated with the private key ``key``, if any."""
        if self.tls is None or plaintext:
            security = ["--insecure"]
        else:
            security = ["--root-certificates", str(self.tls.ca_cert)]
        if key is not None:
            security += ["--auth-supernode-private-key", str(key)]
        return self.start(
            name,
            [str(BIN / "flower-supernode"), *security, "--superlink", f"127.0.0.1:{self.port}"]
            + ["--host", "127.0.0.1", "--port", str(free_port()), "--max-wait-time", f"{max_wait_time:g}"]
            + ["--node-config", node_config],
        )

    def register(self, public_key: pathlib.Path) -> int:
        """``flwr supernode register`` of a SuperNode's public key (OpenSSH format) through
        the SuperLink's Control API; returns the node ID the SuperLink gave it."""
        command = [str(BIN / "flwr"), "supernode", "register", str(public_key), "local", "--format", "json"]
        completed = subprocess.run(
            command, cwd=self.folder, env=self.env, capture_output=True, text=True, timeout=TIMEOUT, check=False
        )
        try:
            reply = json.loads(completed.stdout)
            if completed.returncode == 0 and reply.get("success"):
                return int(reply["node-id"])
        except (ValueError, KeyError, AttributeError):
            pass
        raise RuntimeError(
            f"flwr supernode register {public_key} failed ({completed.returncode}):\n{completed.stdout}{completed.stderr}"
        )

    def run(self, name: str, timeout: float = TIMEOUT, **run_config: object) -> tuple[int, str]:
        """``flwr run`` of the example app; ``(exit status, output)`` once it ended."""
        overrides = " ".join(f"{key}={json.dumps(value)}" for key, value in run_config.items())
        command = [str(BIN / "flwr"), "run", str(APP), "local", "--stream"]
        process = self.start(name, command + (["--run-config", overrides] if overrides else []))
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired as error:
            raise RuntimeError(f"flwr run did not end within {timeout} s:\n{self.log(name)}") from error
        return process.returncode, (self.folder / f"{name}.log").read_text(errors="replace")


@contextlib.contextmanager
def message_api(folder: pathlib.Path, nodes: int, **env: str) -> Iterator[MessageApiFederation]:
    federation = MessageApiFederation(folder, nodes, **env)
    try:
        federation.start_federation()
        yield federation
    finally:
        left = federation.stop()
        if left:
            raise RuntimeError(f"processes still running after SIGKILL: {left}")


def time_message_api(rounds: int, nodes: int, **run_config: object) -> dict[str, float]:
    """Seconds from the SuperLink's start to the run's end (``total``), and of the run alone."""
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        with message_api(pathlib.Path(folder), nodes) as federation:
            submitted = time.perf_counter()
            code, output = federation.run("run", **{"num-server-rounds": rounds, "min-nodes": nodes, **run_config})
            end = time.perf_counter()
        if code != 0 or f"[ROUND {rounds}/{rounds}]" not in output or "run: sent" not in output:
            raise RuntimeError(f"the Message-API run failed:\n{output[-4000:]}")
    return {"total": end - start, "run": end - submitted}


def time_legacy(rounds: int, nodes: int) -> dict[str, float]:
    """Seconds from the legacy server's start to the exit of the server and every client."""
    with tempfile.TemporaryDirectory() as name:
        folder = pathlib.Path(name)
        processes = Processes(folder, loopback_environment())
        address = f"127.0.0.1:{free_port()}"
        legacy = APP / "legacy"
        start = time.perf_counter()
        try:
            server = processes.start(
                "server",
                [sys.executable, str(legacy / "server.py"), "--address", address]
                + ["--rounds", str(rounds), "--clients", str(nodes)],
            )
            clients = [
                processes.start(
                    f"client{i}",
                    [sys.executable, str(legacy / "client.py"), "--address", address, "--client-id", str(i)]
                    + ["--clients", str(nodes)],
                )
                for i in range(nodes)
            ]
            for process in [server, *clients]:
                process.wait(timeout=TIMEOUT)
            end = time.perf_counter()
        finally:
            left = processes.stop()
        if left:
            raise RuntimeError(f"processes still running after SIGKILL: {left}")
        failed = [n for n, p in processes.started.items() if p.returncode != 0]
        if failed:
            raise RuntimeError(f"the legacy run failed ({failed}):\n{processes.log(failed[0])}")
    return {"total": end - start}


#: One message's work in a fresh process, as a ClientApp process does it, phase by phase.
PHASES = """
import json, pathlib, sys, time
marks = [("start", time.perf_counter())]
def mark(name):
    marks.append((name, time.perf_counter()))
import jax
mark("import jax")
import flax, flwr.app, flwr.clientapp
mark("import flax, flwr")
sys.path.insert(0, sys.argv[1])
from jaxlayerx.compile_cache import cache_dir, enable_compile_cache
enable_compile_cache(cache_dir())
from digits_app import task
import digits_app.clientapp
mark("import jaxlayerx, the app")
x, y, x_test, y_test = task.load_partition(0, 3)
mark("data")
variables = task.init_variables()
jax.block_until_ready(variables)
mark("model init")
exchanger = task.make_exchanger("dynamic-percentage", variables, 0.5)
trained, _, _ = task.make_train_fn(x, y, epochs=1, seed=0)(variables, {"current_server_round": 1})
jax.block_until_ready(trained)
mark("train (an epoch)")
exchanger.push(trained, exchanger.init_state(), variables)
mark("pick what to send")
task.evaluate(trained, x_test, y_test)
mark("evaluate")
print(json.dumps([(name, t - marks[i][1]) for i, (name, t) in enumerate(marks[1:])]))
"""


def clientapp_breakdown() -> dict[str, list[tuple[str, float]]]:
    """Seconds of each phase of one message's work in a fresh process (interpreter start
    not included): with an empty compilation cache, then with the cache it filled."""
    with tempfile.TemporaryDirectory() as cache:
        env = loopback_environment(JAXLAYERX_CACHE=cache)
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        phases: dict[str, list[tuple[str, float]]] = {}
        for state in ("empty cache", "cache filled"):
            completed = subprocess.run(
                [sys.executable, "-c", PHASES, str(APP)], env=env, capture_output=True, text=True, timeout=TIMEOUT
            )
            if completed.returncode != 0:
                raise RuntimeError(completed.stderr)
            phases[state] = [(name, seconds) for name, seconds in json.loads(completed.stdout.splitlines()[-1])]
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--json", type=pathlib.Path, default=None, help="write the times here")
    args = parser.parse_args()
    results = {
        "legacy": time_legacy(args.rounds, args.nodes),
        "message api": time_message_api(args.rounds, args.nodes),
        "message api, nodes evaluate": time_message_api(args.rounds, args.nodes, **{"fraction-evaluate": 1.0}),
    }
    breakdown = clientapp_breakdown()
    print("One message's work in a fresh ClientApp process:")
    print("| phase | " + " | ".join(f"{state} (s)" for state in breakdown) + " |")
    print("|---|" + "---|" * len(breakdown))
    for i, (phase, _) in enumerate(next(iter(breakdown.values()))):
        print(f"| {phase} | " + " | ".join(f"{times[i][1]:.2f}" for times in breakdown.values()) + " |")
    legacy = results["legacy"]["total"]
    print(f"{args.nodes} nodes, {args.rounds} rounds, on 127.0.0.1:")
    print("| route | total (s) | flwr run (s) | total / legacy |")
    print("|---|---|---|---|")
    for route, times in results.items():
        run = f"{times['run']:.1f}" if "run" in times else "-"
        print(f"| {route} | {times['total']:.1f} | {run} | {times['total'] / legacy:.2f}x |")
    if args.json is not None:
        args.json.write_text(json.dumps({**results, "clientapp phases": breakdown}, indent=2) + "\n")


if __name__ == "__main__":
    main()
