"""SuperNodes killed under load: a sparse run that goes on while nodes die and come back.

    python -m benchmarks.soak [--nodes 12] [--rounds 10] [--seed S] [--kill-every SECONDS] [--json FILE]

The loopback federation of :mod:`benchmarks.deployment` (a ``flower-superlink``, ``--nodes``
``flower-supernode``s, ``flwr run --stream`` of the example app) runs ``--rounds`` rounds of
sparse exchange (``sparse-largest-magnitude-change``) with client sampling
(``fraction-train``), the ServerApp recording every round (``record-dir``). From the moment
the stream shows round 1, a controller seeded with ``--seed`` waits a uniform 0.5x to 1.5x
``--kill-every`` seconds, SIGKILLs a random SuperNode (its whole process group, the
SuperExec and any ClientApp in it, by PID) and starts it again with the same partition
and node config on a fresh ClientAppIo port, until the run ends. A restarted SuperNode
registers as a new node; the one killed stays "online" at the SuperLink until its
heartbeat expires, so a round that samples it waits ``round-timeout`` for its reply.

First a warm-up run (one round on every node, no kills) fills the ClientApps' compilation
cache with each partition's programs, as a deployment that has run before has it: without
it, the first rounds' ClientApps compile at once on a small machine and outlast
``round-timeout``.

A monitor reads the resident memory (``VmRSS``) of the SuperLink and of the ServerApp
(the ``flwr-serverapp`` process the SuperLink's SuperExec starts for the run) twice a
second: "after round 2" is the first reading once the stream shows round 3, "end" the last
one while the ServerApp was alive (and, for the SuperLink, one once ``flwr run`` ended).

Every process is started in its own session and stopped by its PID; at the end no
process may remain that carries this federation's ``FLWR_HOME`` in its environment
(whatever its parent). The JSON holds the kills (seconds after round 1, node, round),
each round's accepted, failed and missing nodes, the memory readings and the wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import pathlib
import random
import re
import signal
import subprocess
import tempfile
import threading
import time
from typing import Any

from benchmarks.deployment import STOP_TIMEOUT, TIMEOUT, MessageApiFederation, alive, descendants, in_sessions

#: The exchanger of the soak, the sparse strategy's.
EXCHANGER = "sparse-largest-magnitude-change"
#: Seconds a round waits for its replies (a sampled node that was killed never replies).
ROUND_TIMEOUT = 20.0
#: The share of the connected nodes sampled each round.
FRACTION_TRAIN = 0.5
#: The fewest nodes a round samples, and waits for.
MIN_NODES = 2
#: Mean seconds between two kills.
KILL_EVERY = 4.0
#: Seconds between two memory readings.
POLL = 0.5

_ROUND = re.compile(r"\[ROUND (\d+)/(\d+)\]")


@dataclasses.dataclass
class Kill:
    """One SuperNode killed: seconds after round 1 started, the node killed, the round the
    stream showed, the PIDs of its process group, and the name of the node started again."""

    seconds: float
    node: str
    round: int
    pids: list[int]
    restarted_as: str


def stream_round(text: str) -> int:
    """The last round the stream shows started (0 before round 1)."""
    rounds = _ROUND.findall(text)
    return int(rounds[-1][0]) if rounds else 0


def rss_kib(pid: int) -> int | None:
    """The resident memory of ``pid`` in KiB (``VmRSS``), ``None`` once it has exited."""
    with contextlib.suppress(OSError):
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def command_line(pid: int) -> list[str]:
    with contextlib.suppress(OSError):
        return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    return []


def with_environment(key: str, value: str) -> list[int]:
    """The live processes (of this user) whose environment sets ``key`` to ``value``."""
    marker = f"{key}={value}".encode()
    found = []
    for environ in pathlib.Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):
            if marker in environ.read_bytes().split(b"\0") and alive(int(environ.parent.name)):
                found.append(int(environ.parent.name))
    return sorted(found)


class SoakFederation(MessageApiFederation):
    """The loopback federation (``--insecure``), its ClientApps sharing one compilation
    cache in ``folder``, with SuperNodes killed and started again by slot."""

    def __init__(self, folder: pathlib.Path, nodes: int) -> None:
        super().__init__(
            folder,
            nodes,
            JAX_COMPILATION_CACHE_DIR=str(folder / "jax-cache"),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        )
        self.killed: dict[str, subprocess.Popen[bytes]] = {}
        self.slots = {slot: f"supernode{slot}" for slot in range(nodes)}
        self.restarts = dict.fromkeys(range(nodes), 0)

    def kill_and_restart(self, slot: int) -> tuple[str, list[int], str]:
        """SIGKILLs the SuperNode of ``slot`` with its process group, descendants and session,
        waits until every one has exited, then starts it again with the same partition (on a
        fresh ``--port``). Returns the name killed, the PIDs killed and the new name."""
        name = self.slots[slot]
        process = self.started.pop(name)
        group = sorted({process.pid} | descendants({process.pid}) | in_sessions({process.pid}))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        for pid in group:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait(timeout=STOP_TIMEOUT)
        self.killed[name] = process
        deadline = time.monotonic() + STOP_TIMEOUT
        while any(alive(pid) for pid in group):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: PIDs {[p for p in group if alive(p)]} alive after SIGKILL")
            time.sleep(0.05)
        self.restarts[slot] += 1
        restarted = f"supernode{slot}-{self.restarts[slot]}"
        self.start_supernode(restarted, self.partition_config(slot))
        self.slots[slot] = restarted
        return name, group, restarted

    def serverapp(self) -> int | None:
        """The PID of the ``flwr-serverapp`` process among the SuperLink's descendants."""
        for pid in sorted(descendants({self.started["superlink"].pid})):
            if any(pathlib.Path(arg).name == "flwr-serverapp" for arg in command_line(pid)):
                return pid
        return None


def _controller(
    federation: SoakFederation,
    log: pathlib.Path,
    rng: random.Random,
    kill_every: float,
    done: threading.Event,
    kills: list[Kill],
    errors: list[str],
) -> None:
    """From round 1 on, kills and restarts a random SuperNode every few seconds until ``done``
    (or until a kill fails, its error in ``errors``)."""
    while stream_round(_read(log)) < 1:
        if done.wait(0.1):
            return
    start = time.monotonic()
    while not done.wait(rng.uniform(0.5 * kill_every, 1.5 * kill_every)):
        text = _read(log)
        if "run: sent" in text:
            return
        slot = rng.randrange(federation.nodes)
        try:
            name, pids, restarted = federation.kill_and_restart(slot)
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as error:
            errors.append(f"{type(error).__name__}: {error}")
            return
        kills.append(Kill(time.monotonic() - start, name, stream_round(text), pids, restarted))


def _monitor(
    federation: SoakFederation, log: pathlib.Path, done: threading.Event, samples: list[dict[str, Any]]
) -> None:
    """Reads the SuperLink's and the ServerApp's memory every ``POLL`` seconds until ``done``."""
    link = federation.started["superlink"].pid
    app = None
    while not done.wait(POLL):
        app = app if app is not None and alive(app) else federation.serverapp()
        samples.append(
            {
                "round": stream_round(_read(log)),
                "superlink": rss_kib(link),
                "serverapp": None if app is None else rss_kib(app),
            }
        )


def _read(path: pathlib.Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def memory(samples: list[dict[str, Any]], process: str) -> dict[str, Any]:
    """``process``'s memory after round 2 (the first reading once round 3 started) and at the
    end (the last reading), in KiB, and their ratio."""
    readings = [(s["round"], s[process]) for s in samples if s[process] is not None]
    after = next((kib for r, kib in readings if r >= 3), None)
    end = readings[-1][1] if readings else None
    return {"after_round_2_kib": after, "end_kib": end, "ratio": None if not (after and end) else end / after}


def rounds_summary(record: pathlib.Path) -> list[dict[str, Any]]:
    """Each round's sampled, accepted, failed and missing nodes, from what the ServerApp recorded."""
    history = json.loads((record / "history.json").read_text()) if (record / "history.json").exists() else []
    summary = []
    for entry in history:
        sent_path = record / f"round{entry['server_round']}_sent.json"
        sent = json.loads(sent_path.read_text()) if sent_path.exists() else []
        summary.append(
            {
                "round": entry["server_round"],
                "sampled": len(sent),
                "whole_model": sum(message["base-round"] == -1 for message in sent),
                "accepted": len(entry["accepted"]),
                "rejected": len(entry["rejected"]),
                "failed": len(entry["failures"]),
                "missing": len(entry["missing"]),
            }
        )
    return summary


def _warm_up(federation: SoakFederation, nodes: int) -> float:
    """One round on every node, no kills: fills the compilation cache with each partition's
    programs. Returns its seconds, once its ServerApp has exited."""
    start = time.monotonic()
    config = {"num-server-rounds": 1, "num-partitions": nodes, "min-nodes": nodes, "round-timeout": TIMEOUT / 2}
    code, output = federation.run("warm-up", timeout=TIMEOUT, exchanger=EXCHANGER, **config)
    if code != 0 or "run: sent" not in output:
        raise RuntimeError(f"the warm-up run failed:\n{output[-4000:]}")
    deadline = time.monotonic() + STOP_TIMEOUT
    while federation.serverapp() is not None:
        if time.monotonic() > deadline:
            raise RuntimeError("the warm-up run's ServerApp did not exit")
        time.sleep(0.1)
    return time.monotonic() - start


def soak(
    folder: pathlib.Path,
    *,
    nodes: int = 12,
    rounds: int = 10,
    seed: int = 0,
    kill_every: float = KILL_EVERY,
    round_timeout: float = ROUND_TIMEOUT,
    fraction_train: float = FRACTION_TRAIN,
    min_nodes: int = MIN_NODES,
    warm_up: bool = True,
    timeout: float = TIMEOUT,
) -> dict[str, Any]:
    """Runs the soak in ``folder`` (its record in ``folder / "record"``); returns what happened.

    The result holds ``code`` and ``output`` (``flwr run``'s), ``kills`` (and ``errors``,
    a kill that failed), ``rounds`` (:func:`rounds_summary`), ``node_ids`` (each SuperNode
    process's node id, from its log), ``memory`` (:func:`memory` per process), ``left`` (PIDs
    alive after the federation's stop), ``left_anywhere`` (PIDs with this federation's
    ``FLWR_HOME``, whatever their parent), ``killed_alive`` (killed PIDs still alive),
    ``seconds`` (from the SuperLink's start to the end of the stop, the warm-up included)
    and ``warm_up_seconds``.
    """
    if nodes < 2 or rounds < 3:
        raise ValueError(f"a soak needs at least 2 nodes and 3 rounds, got {nodes} nodes and {rounds} rounds")
    record = folder / "record"
    federation = SoakFederation(folder, nodes)
    log = folder / "run.log"
    done = threading.Event()
    kills: list[Kill] = []
    errors: list[str] = []
    samples: list[dict[str, Any]] = []
    threads: list[threading.Thread] = []
    code, output = None, ""
    warm_up_seconds = None
    start = time.monotonic()
    try:
        federation.start_federation()
        if warm_up:
            warm_up_seconds = _warm_up(federation, nodes)
        threads = [
            threading.Thread(
                target=_controller,
                args=(federation, log, random.Random(seed), kill_every, done, kills, errors),
                daemon=True,
            ),
            threading.Thread(target=_monitor, args=(federation, log, done, samples), daemon=True),
        ]
        for thread in threads:
            thread.start()
        code, output = federation.run(
            "run",
            timeout=timeout,
            exchanger=EXCHANGER,
            **{
                "num-server-rounds": rounds,
                "num-partitions": nodes,
                "min-nodes": min_nodes,
                "fraction-train": fraction_train,
                "fraction-evaluate": 0.0,
                "round-timeout": round_timeout,
                "record-dir": str(record),
            },
        )
    finally:
        done.set()
        for thread in threads:
            thread.join(timeout=TIMEOUT)
        link = federation.started["superlink"].pid
        samples.append({"round": stream_round(_read(log)), "superlink": rss_kib(link), "serverapp": None})
        left = federation.stop()
    seconds = time.monotonic() - start
    node_ids = {}
    for name in [*federation.killed, *federation.started]:
        found = re.search(r"SuperNode ID: (\d+)", _read(folder / f"{name}.log"))
        if name.startswith("supernode") and found:
            node_ids[name] = int(found.group(1))
    killed = sorted({pid for kill in kills for pid in kill.pids})
    return {
        "nodes": nodes,
        "rounds_asked": rounds,
        "seed": seed,
        "code": code,
        "output": output,
        "record": str(record),
        "kills": [dataclasses.asdict(kill) for kill in kills],
        "errors": errors,
        "rounds": rounds_summary(record),
        "node_ids": node_ids,
        "memory": {process: memory(samples, process) for process in ("superlink", "serverapp")},
        "left": left,
        "left_anywhere": with_environment("FLWR_HOME", federation.env["FLWR_HOME"]),
        "killed_alive": [pid for pid in killed if alive(pid)],
        "stopped": sorted({process.pid for process in federation.started.values()}),
        "seconds": seconds,
        "warm_up_seconds": warm_up_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kill-every", type=float, default=KILL_EVERY, help="mean seconds between kills")
    parser.add_argument("--round-timeout", type=float, default=ROUND_TIMEOUT)
    parser.add_argument("--fraction-train", type=float, default=FRACTION_TRAIN)
    parser.add_argument("--min-nodes", type=int, default=MIN_NODES)
    parser.add_argument("--no-warm-up", action="store_true", help="start with an empty compilation cache")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="write the result here")
    parser.add_argument("--keep", type=pathlib.Path, default=None, help="run in this folder and keep it")
    args = parser.parse_args()
    options = dict(
        nodes=args.nodes,
        rounds=args.rounds,
        seed=args.seed,
        kill_every=args.kill_every,
        round_timeout=args.round_timeout,
        fraction_train=args.fraction_train,
        min_nodes=args.min_nodes,
        warm_up=not args.no_warm_up,
    )
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        result = soak(args.keep, **options)
    else:
        with tempfile.TemporaryDirectory() as folder:
            result = soak(pathlib.Path(folder), **options)
    output = result.pop("output")
    finished = result["code"] == 0 and f"[ROUND {args.rounds}/{args.rounds}]" in output and "run: sent" in output
    print(f"{args.nodes} nodes, {args.rounds} rounds, seed {args.seed}: {len(result['kills'])} kills, ", end="")
    warm = "" if result["warm_up_seconds"] is None else f" (warm-up {result['warm_up_seconds']:.0f} s)"
    print(f"run {'finished' if finished else 'FAILED'} in {result['seconds']:.0f} s{warm}")
    print("| round | sampled | whole model | accepted | failed | missing |")
    print("|---|---|---|---|---|---|")
    for entry in result["rounds"]:
        print(
            f"| {entry['round']} | {entry['sampled']} | {entry['whole_model']} | {entry['accepted']} "
            f"| {entry['failed']} | {entry['missing']} |"
        )
    print("| process | after round 2 (MiB) | end (MiB) | end / after round 2 |")
    print("|---|---|---|---|")
    for process, reading in result["memory"].items():
        after, end, ratio = reading["after_round_2_kib"], reading["end_kib"], reading["ratio"]
        if ratio is None:
            print(f"| {process} | {after} | {end} | - |")
        else:
            print(f"| {process} | {after / 1024:.1f} | {end / 1024:.1f} | {ratio:.3f} |")
    print(f"processes left: {result['left'] + result['left_anywhere'] + result['killed_alive']}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if not finished:
        print(output[-4000:])
        raise SystemExit(1)


if __name__ == "__main__":
    main()
