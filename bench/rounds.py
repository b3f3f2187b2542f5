"""Round benchmark: the latency of one whole averaging round (matchmaking + all-reduce), what a training loop
pays per step, for hiveengine's DecentralizedAverager and (with --compare hivemind) hivemind 1.1.12's.

Each configuration runs N peer processes on this host, each with its own DHT node (rank 0 bootstraps the
others). Every round, the orchestrator waits until all peers are ready, then sends each one "go T" with a
common wall-clock start time T a moment ahead; each peer sleeps until T and calls step(). A round's time is
the slowest peer's step() return time minus T; the table shows the median over the measured rounds (after
the warm-up rounds). Ours: codec "none", expected_peers=N (the gathering closes once all N registered),
matchmaking_time 3.0 (the default; it only bounds a gathering that never fills). Each round steps under its
own key, as the Optimizer does with its epoch, and like the Optimizer's gradient averager the peers do not
share state. hivemind: DecentralizedAverager.step() with target_group_size = min_group_size = N and
min_matchmaking_time --hivemind-matchmaking-time (default 1.0 s, request_timeout 0.5 s: the settings
bench/allreduce.py found reliable); see bench/hivemind_round_worker.py.

Writes bench/results/local/rounds.json (rounds-vs-hivemind.json with --compare; see bench/common.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import format_table, hivemind_python, kill_worker, read_prefixed, write_results

KiB, MiB = 1 << 10, 1 << 20
PEERS = [2, 4, 8]
SIZES = [4 * KiB, 1 * MiB, 64 * MiB]  # bytes of fp32 (elements = bytes / 4)
ROUNDS = 10
WARMUP = 2
MATCHMAKING_TIME = 3.0  # ours: hiveengine's default
HIVEMIND_MATCHMAKING_TIME = 1.0
HIVEMIND_REQUEST_TIMEOUT = 0.5  # hivemind warns matchmaking can deadlock unless this is below its matchmaking time
STEP_TIMEOUT = 120.0  # one step's deadline (either system)
START_TIMEOUT = 300.0  # for a worker's first line (DHT up; hivemind's p2pd daemon can be slow to start)
GO_LEAD = 0.05  # seconds between sending "go T" and T
START_SPIN = 0.002  # the last seconds before T a worker spins instead of sleeping (see wait_for_go)
PREFIX = "bench-rounds"


# ---------------------------------------------------------------- hiveengine worker


def ours_worker() -> None:
    """One hiveengine peer: plan on stdin, "ADDRESSES", then per round "READY" / "go T" / step, then "RESULT"."""
    import torch

    from hiveengine.averaging import DecentralizedAverager
    from hiveengine.dht import DHT

    plan = json.loads(sys.stdin.readline())
    dht = DHT(initial_peers=plan["initial_peers"])
    print("ADDRESSES", json.dumps([str(dht.address)]), flush=True)
    tensor = torch.randn(plan["numel"], generator=torch.Generator().manual_seed(plan["rank"]))
    averager = DecentralizedAverager(
        [tensor],
        dht,
        PREFIX,
        target_group_size=plan["peers"],
        codec="none",
        matchmaking_time=plan["matchmaking_time"],
        share_state=False,
    )
    times, failures = [], []
    for r in range(plan["rounds"]):
        start_at = wait_for_go()
        result = averager.step(weight=1.0, timeout=plan["step_timeout"], expected_peers=plan["peers"], key=f"r{r}")
        times.append(time.time() - start_at)
        if result is None:
            failures.append({"round": r, "error": "no group formed"})
        elif len(result.group.members) != plan["peers"] or result.failed_parts:
            failures.append({"round": r, "group": len(result.group.members), "failed_parts": result.failed_parts})
    print("RESULT", json.dumps({"times": times, "failures": failures}), flush=True)
    averager.shutdown()
    dht.shutdown()


def wait_for_go() -> float:
    """Print READY, read "go T" and wait until wall-clock time T; return T. (Shared with the hivemind worker's
    protocol: bench/hivemind_round_worker.py has its own copy, as it runs in hivemind's venv.) The last
    START_SPIN seconds are spun, not slept: a sleep's wake-up comes 0.1-0.5 ms late on a busy VM, and that
    lateness would be counted in the round (the same for both systems, 10x more of ours)."""
    print("READY", flush=True)
    start_at = float(sys.stdin.readline().split()[1])
    time.sleep(max(0.0, start_at - START_SPIN - time.time()))
    while time.time() < start_at:
        pass
    return start_at


# ---------------------------------------------------------------- orchestration


def spawn_ours(peers: int) -> subprocess.Popen:
    # Peers on one host share its cores as `hiveengine launch` workers do (bench/allreduce.py does the same): each
    # gets its share (OMP_NUM_THREADS), and with more peers than cores, none polls UCX after activity
    # (HIVEENGINE_SPIN_US=0: a polling peer takes the core another needs, which on separate machines it would not).
    from hiveengine.cli.launch import shared_host_defaults

    env = {**shared_host_defaults(peers, os.environ), **os.environ}
    return subprocess.Popen(
        [sys.executable, __file__, "--role", "ours"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )


def spawn_hivemind(peers: int) -> subprocess.Popen:
    worker = str(Path(__file__).resolve().parent / "hivemind_round_worker.py")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // peers)),
        "HIVEMIND_LOGLEVEL": os.environ.get("HIVEMIND_LOGLEVEL", "WARNING"),
    }
    # Own session: hivemind starts an averager process and a p2pd daemon that must be killed with it.
    return subprocess.Popen(
        [hivemind_python(), worker],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )


def run_config(system: str, peers: int, numel: int, rounds: int, warmup: int, matchmaking_time: float) -> dict:
    """All peers of one configuration: rounds started together; the slowest peer's time per round."""
    spawn = spawn_hivemind if system == "hivemind" else spawn_ours
    total = warmup + rounds
    plan = {
        "numel": numel,
        "peers": peers,
        "rounds": total,
        "matchmaking_time": matchmaking_time,
        "request_timeout": HIVEMIND_REQUEST_TIMEOUT,
        "step_timeout": STEP_TIMEOUT,
    }
    procs: list[subprocess.Popen] = []
    try:
        procs.append(spawn(peers))
        send(procs[0], json.dumps({**plan, "rank": 0, "initial_peers": []}))
        initial = json.loads(read_prefixed(procs[0], "ADDRESSES", START_TIMEOUT))
        for rank in range(1, peers):  # the others bootstrap from rank 0, starting side by side
            procs.append(spawn(peers))
            send(procs[-1], json.dumps({**plan, "rank": rank, "initial_peers": initial}))
        for proc in procs[1:]:
            read_prefixed(proc, "ADDRESSES", START_TIMEOUT)
        for _ in range(total):
            for proc in procs:
                read_prefixed(proc, "READY", STEP_TIMEOUT + 60)
            start_at = time.time() + GO_LEAD
            for proc in procs:
                send(proc, f"go {start_at!r}")
        results = [json.loads(read_prefixed(p, "RESULT", STEP_TIMEOUT + 60)) for p in procs]
    finally:
        for proc in procs:
            kill_worker(proc)
            proc.wait()
    per_round = [max(r["times"][i] for r in results) for i in range(total)]
    failures = [{"rank": rank, **f} for rank, r in enumerate(results) for f in r["failures"]]
    failed_rounds = {f["round"] for f in failures}
    measured = [t for i, t in enumerate(per_round) if i >= warmup and i not in failed_rounds]
    return {
        "median_s": statistics.median(measured) if measured else None,
        "min_s": min(measured) if measured else None,
        "max_s": max(measured) if measured else None,
        "rounds_s": per_round[warmup:],
        "warmup_s": per_round[:warmup],
        "failed_rounds": sorted(r - warmup for r in failed_rounds if r >= warmup),
        "failures": failures,
    }


def send(proc: subprocess.Popen, line: str) -> None:
    proc.stdin.write(line + "\n")
    proc.stdin.flush()


def size_label(nbytes: int) -> str:
    for unit, scale in (("MB", MiB), ("KB", KiB)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale} {unit}"
    return f"{nbytes} B"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", choices=["ours"], help=argparse.SUPPRESS)
    parser.add_argument("--peers", type=int, nargs="+", default=PEERS)
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES, help="tensor bytes (fp32: elements = bytes/4)")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="measured rounds per configuration")
    parser.add_argument("--warmup", type=int, default=WARMUP, help="rounds run first and not measured")
    parser.add_argument("--compare", choices=["hivemind"], help="also run hivemind 1.1.12 (in its own venv)")
    parser.add_argument("--matchmaking-time", type=float, default=MATCHMAKING_TIME, help="ours")
    parser.add_argument("--hivemind-matchmaking-time", type=float, default=HIVEMIND_MATCHMAKING_TIME)
    args = parser.parse_args(argv)
    if args.role == "ours":
        ours_worker()
        return 0
    if min(args.peers) < 2 or args.rounds < 1 or args.warmup < 0 or min(args.sizes) < 4:
        parser.error("need peers >= 2, rounds >= 1, warmup >= 0 and sizes >= 4 bytes")

    rows, records = [], []
    for peers in args.peers:
        for nbytes in args.sizes:
            numel = nbytes // 4
            row = {"peers": peers, "size": size_label(numel * 4)}
            systems = [("ours", args.matchmaking_time)]
            if args.compare == "hivemind":
                systems.append(("hivemind", args.hivemind_matchmaking_time))
            for system, matchmaking_time in systems:
                print(f"measuring {system}, {peers} peers, {row['size']} ...", file=sys.stderr, flush=True)
                record = {"system": system, "peers": peers, "bytes": numel * 4, "matchmaking_time": matchmaking_time}
                try:
                    record.update(run_config(system, peers, numel, args.rounds, args.warmup, matchmaking_time))
                except (RuntimeError, ValueError) as e:  # a worker died or went silent (e.g. no group formed)
                    print(f"{system}, {peers} peers, {row['size']} did not finish: {e}", file=sys.stderr, flush=True)
                    record["error"] = str(e)
                records.append(record)
                row[f"{system} median s"] = record.get("median_s")
                if record.get("failed_rounds"):
                    print(
                        f"{system}, {peers} peers, {row['size']}: rounds {record['failed_rounds']} failed "
                        f"(left out of the median): {record['failures']}",
                        file=sys.stderr,
                        flush=True,
                    )
            if row.get("ours median s") and row.get("hivemind median s"):
                row["ratio hivemind/ours"] = row["hivemind median s"] / row["ours median s"]
            rows.append(row)

    columns = ["peers", "size", "ours median s"]
    if args.compare == "hivemind":
        columns += ["hivemind median s", "ratio hivemind/ours"]
    print(format_table(rows, columns))
    print(
        f"round = matchmaking + all-reduce, slowest peer, median of {args.rounds} after {args.warmup} warm-up; "
        f"ours: codec none, expected_peers=N, matchmaking_time {args.matchmaking_time} s"
        + (
            f"; hivemind: min_matchmaking_time {args.hivemind_matchmaking_time} s, no compression"
            if args.compare
            else ""
        )
    )
    config = {
        "rounds": args.rounds,
        "warmup": args.warmup,
        "go_lead_s": GO_LEAD,
        "step_timeout_s": STEP_TIMEOUT,
        "ours": {"codec": "none", "expected_peers": "N", "matchmaking_time": args.matchmaking_time},
    }
    if args.compare:
        config["hivemind"] = {
            "version": "1.1.12",
            "compression": "none",
            "target_group_size": "N",
            "min_group_size": "N",
            "min_matchmaking_time": args.hivemind_matchmaking_time,
            "request_timeout": HIVEMIND_REQUEST_TIMEOUT,
        }
    path = write_results("rounds-vs-hivemind" if args.compare else "rounds", {"config": config, "records": records})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
