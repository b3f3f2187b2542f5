"""Swarm-record attacks benchmark: how fast honest Optimizer peers train while a stranger attacks the DHT records.

Three honest peers (tests/peers/optim_peer.py: sync mode, the same model, their own data, STEP_SECONDS of emulated
compute per step) train to EPOCHS epochs through one DHT, once with nobody else (clean, at the start and again at
the end, to show the drift of the machine), and once under each attack of the swarm-records issue, run by real
hostile processes:
- hijack: progress claiming epoch 10^9 and 10^9 samples, plus the attacker's own state (every parameter foreign)
  advertised under that epoch (tests/peers/forger_state.py, mode optim);
- samples: a signed progress record at the swarm's epoch claiming 10^9 samples (tests/peers/swarm_attacker.py);
- registrations: forged, raw-id, expired, zero-bandwidth and junk matchmaking registrations and forged state
  advertisements at every epoch (tests/peers/swarm_attacker.py, reusing tests/peers/forger_records.py);
- overwrite: plain values with infinite or far-future expirations over the run's signed dictionaries;
- absurd: signed records with non-finite or absurd fields under the run's keys;
- flood: fresh identities, one after another for the whole run, each filling its quota of the bootstrap node's
  store with 4 KiB records (tests/peers/swarm_dht_flooder.py) over a FLOOD_MBIT uplink; flood-flat-out: the
  same as fast as loopback carries it (about 1 Gbit/s here), which costs the bootstrap node about 15 ms of CPU
  per MB it refuses or stores, on the cores the honest peers share.
(Key hiding is left to tests/test_dht_lookup.py: grinding ids next to a key at the default id difficulty costs
minutes per id by design, which is the defence.)

The table gives epochs per minute for each run (until every honest peer reached EPOCHS), its ratio to the mean of
the clean runs (the goal: within 20%), whether the honest peers ended with identical parameters, how many
times any of them loaded another peer's state (0 expected: they start together), and the CPU seconds the honest
peers and the attackers used (they share this machine's cores). Writes
bench/results/local/swarm_attacks.json (see bench/common.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import statistics
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import format_table, write_results
from tests.procs import PeerProcess

RUN_ID = "test-train"  # optim_peer.py's run
HONEST = 3
EPOCHS = 100
STEP_SECONDS = 0.05  # compute per step of a larger model: epochs of about 0.25 s, the clean pace (170 in 46 s)
RUN_TIMEOUT = 180.0  # seconds a run may take before its honest peers count as stalled
ATTACKER = "swarm_attacker.py"
FLOOD = ["--identities", "0", "--records", "20000", "--value-bytes", "4096"]
FLOOD_MBIT = 100  # a flooder's uplink: a fast home or cloud link
ATTACKS = {  # name -> [(script under tests/peers, its arguments after the bootstrap address, its ready line)]
    "hijack": [("forger_state.py", [RUN_ID, "optim"], "ADVERTISED")],
    "samples": [(ATTACKER, ["samples"], "READY")],
    "registrations": [(ATTACKER, ["registrations"], "READY")],
    "overwrite": [(ATTACKER, ["overwrite"], "READY")],
    "absurd": [(ATTACKER, ["absurd"], "READY")],
    "flood": [("swarm_dht_flooder.py", [*FLOOD, "--mbit", str(FLOOD_MBIT)], "READY")],
    "flood-flat-out": [("swarm_dht_flooder.py", FLOOD, "READY")],
}


def start_attacker(script: str, args: list[str], bootstrap: str) -> PeerProcess:
    """A hostile process joined through `bootstrap` (the attacker worker takes its mode before the address)."""
    if script == ATTACKER:
        return PeerProcess(ATTACKER, args[0], bootstrap, RUN_ID)
    return PeerProcess(script, bootstrap, *args)


def finish(peer: PeerProcess, epochs: int, deadline: float) -> tuple[int, str | None, dict | None]:
    """Read `peer`'s lines until DONE or `deadline`: (last epoch seen, digest at `epochs`, DONE's report)."""
    reached, digest = 0, None
    while True:
        try:
            line = peer.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return reached, digest, None
        if line is None:
            return reached, digest, None
        if line.startswith("EPOCH "):
            _, epoch, digest_now = line.split()
            reached = int(epoch)
            digest = digest_now if reached == epochs else digest
        elif line.startswith("DONE "):
            return reached, digest, json.loads(line[5:])


def cpu_seconds(procs: list[PeerProcess]) -> float:
    """CPU time (user + system) the processes used so far: on a shared 2-core machine, an attacker's own work
    slows the honest peers too, which a remote attacker's would not."""
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(proc.proc.pid).cpu_times()
            total += times.user + times.system
    return total


def run(name: str, epochs: int, step_seconds: float) -> dict:
    """One run of HONEST peers training to `epochs` under attack `name` ("clean": none)."""
    honest, attackers, bootstrap = [], [], []
    try:
        for seed in range(HONEST):
            args = ["sync", "none", str(seed), str(epochs), *bootstrap]
            honest.append(PeerProcess("optim_peer.py", *args, env={"STEP_SECONDS": str(step_seconds)}))
            bootstrap = bootstrap or [honest[-1].expect("DHT")]
            honest[-1].expect("READY")
        for script, args, ready in ATTACKS.get(name, []):
            attackers.append(start_attacker(script, args, bootstrap[0]))
            if ready:
                attackers[-1].expect(ready)
        started = time.monotonic()
        for peer in honest:
            peer.proc.stdin.write("go\n")
            peer.proc.stdin.flush()
        results = [finish(peer, epochs, started + RUN_TIMEOUT) for peer in honest]
        elapsed = time.monotonic() - started
        honest_cpu, attacker_cpu = cpu_seconds(honest), cpu_seconds(attackers)
    finally:
        for proc in attackers + honest:
            proc.close()
    reached = min(r[0] for r in results)
    digests = {r[1] for r in results}
    return {
        "attack": name,
        "epochs": reached,
        "seconds": round(elapsed, 2),
        "epochs_per_min": round(reached * 60 / elapsed, 1),
        "finished": all(r[2] is not None for r in results),
        "identical": len(digests) == 1 and None not in digests,
        "honest_cpu_s": round(honest_cpu, 1),
        "attacker_cpu_s": round(attacker_cpu, 1),
        "state_loads": sum(r[2]["rounds"]["caught_up"] for r in results if r[2] is not None),
        "averaged": [r[2]["rounds"]["averaged"] for r in results if r[2] is not None],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attacks", nargs="+", choices=list(ATTACKS), default=list(ATTACKS))
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--step-seconds", type=float, default=STEP_SECONDS, help="emulated compute per step")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    print(
        f"{HONEST} honest peers, {args.epochs} epochs per run, {args.step_seconds} s per step; load {load:.2f}",
        file=sys.stderr,
        flush=True,
    )
    rows = [run("clean", args.epochs, args.step_seconds)]
    for name in args.attacks:
        rows.append(run(name, args.epochs, args.step_seconds))
        print(f"  {name}: {rows[-1]['epochs_per_min']} epochs/min", file=sys.stderr, flush=True)
    rows.append(run("clean", args.epochs, args.step_seconds))
    clean = statistics.mean(r["epochs_per_min"] for r in rows if r["attack"] == "clean")
    for row in rows:
        row["vs_clean"] = round(row["epochs_per_min"] / clean, 3) if clean else None
        row["within_20pct"] = row["finished"] and row["vs_clean"] is not None and row["vs_clean"] >= 0.8
    columns = ["attack", "epochs", "seconds", "epochs_per_min", "vs_clean", "within_20pct", "identical"]
    columns += ["state_loads", "honest_cpu_s", "attacker_cpu_s"]
    print(format_table(rows, columns))
    setup = {"honest": HONEST, "epochs": args.epochs, "step_seconds": args.step_seconds, "load": load}
    path = write_results("swarm_attacks", {**setup, "rows": rows})
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
