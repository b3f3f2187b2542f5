"""One hivemind peer for bench/rounds.py --compare hivemind (runs in hivemind's own venv, never ours).

Reads a JSON plan on stdin: {"initial_peers": [...], "numel", "peers", "rounds", "rank", "matchmaking_time",
"request_timeout", "step_timeout"}. Prints "ADDRESSES <json list>" once its DHT is up. Then, each round, it
prints "READY", reads "go T", sleeps until wall-clock time T and runs one whole DecentralizedAverager.step()
(matchmaking + all-reduce), timing it from T. Finally prints "RESULT <json>": {"times": [...], "failures":
[...]}, where a failure is a step that raised or formed a group smaller than "peers".
"""

import json
import sys
import time

import hivemind
import torch
from hivemind.compression import NoCompression

PREFIX = "bench-rounds"
START_SPIN = 0.002  # as bench/rounds.py


def wait_for_go() -> float:
    """Print READY, read "go T" and wait until wall-clock time T, spinning the last START_SPIN seconds; return T
    (bench/rounds.py's protocol)."""
    print("READY", flush=True)
    start_at = float(sys.stdin.readline().split()[1])
    time.sleep(max(0.0, start_at - START_SPIN - time.time()))
    while time.time() < start_at:
        pass
    return start_at


def main() -> None:
    plan = json.loads(sys.stdin.readline())
    dht = hivemind.DHT(initial_peers=plan["initial_peers"], start=True)
    print("ADDRESSES", json.dumps([str(a) for a in dht.get_visible_maddrs()]), flush=True)
    tensor = torch.randn(plan["numel"], generator=torch.Generator().manual_seed(plan["rank"]))
    averager = hivemind.averaging.DecentralizedAverager(
        averaged_tensors=[tensor],
        dht=dht,
        prefix=PREFIX,
        target_group_size=plan["peers"],
        min_group_size=plan["peers"],
        min_matchmaking_time=plan["matchmaking_time"],
        request_timeout=plan["request_timeout"],
        compression=NoCompression(),
        start=True,
    )
    times, failures = [], []
    for r in range(plan["rounds"]):
        start_at = wait_for_go()
        try:
            gathered = averager.step(weight=1.0, timeout=plan["step_timeout"])
        except Exception as e:  # hivemind raises when it finds no group or the all-reduce fails
            gathered, error = None, f"{type(e).__name__}: {e}"
        else:
            error = None if gathered is not None else "step returned None"
        times.append(time.time() - start_at)
        if error is not None:
            failures.append({"round": r, "error": error})
        elif len(gathered) != plan["peers"]:
            failures.append({"round": r, "group": len(gathered)})
    print("RESULT", json.dumps({"times": times, "failures": failures}), flush=True)
    averager.shutdown()
    dht.shutdown()


if __name__ == "__main__":
    main()
