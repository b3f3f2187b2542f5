"""One hivemind peer for bench/allreduce.py --compare hivemind (runs in hivemind's own venv, never ours).

Reads a JSON plan on stdin: {"initial_peers": [...], "numel", "peers", "rounds", "compression", "rank"}.
Prints "MADDRS <json list>" once its DHT is up and "RESULT <json>" with per-round times. A round times the
all-reduce alone, as the other systems' rounds do (their groups are formed beforehand): the peer forms
its group, prints "READY", and starts the all-reduce on the next "go" line, so all peers start together.
"""

import json
import sys
import time

import hivemind
import torch
from hivemind.averaging.control import AveragingStage
from hivemind.compression import Float16Compression, NoCompression, Uniform8BitQuantization

COMPRESSION = {"none": NoCompression, "fp16": Float16Compression, "int8": Uniform8BitQuantization}
MATCHMAKING_TIME = 1.0
REQUEST_TIMEOUT = 0.5  # hivemind warns that matchmaking can deadlock unless this is below MATCHMAKING_TIME
STAGE_POLL_SECONDS = 0.001  # how often a peer checks whether its group formed (outside the timed part)
STEP_TIMEOUT = 600.0


def allreduce_seconds(averager) -> float:
    """One step's all-reduce alone: form the group, report READY, wait for "go", then time the all-reduce."""
    control = averager.step(timeout=STEP_TIMEOUT, require_trigger=True, wait=False)
    deadline = time.monotonic() + STEP_TIMEOUT
    while control.stage in (AveragingStage.IDLE, AveragingStage.LOOKING_FOR_GROUP):
        if time.monotonic() > deadline:
            raise SystemExit(f"hivemind formed no group within {STEP_TIMEOUT} s")
        time.sleep(STAGE_POLL_SECONDS)
    if control.stage != AveragingStage.AWAITING_TRIGGER:
        raise SystemExit(f"hivemind formed no group ({control.stage})")
    print("READY", flush=True)
    sys.stdin.readline()
    start = time.perf_counter()
    control.allow_allreduce()
    if control.result(timeout=STEP_TIMEOUT) is None:
        raise SystemExit("hivemind's all-reduce failed")
    return time.perf_counter() - start


def main() -> None:
    plan = json.loads(sys.stdin.readline())
    dht = hivemind.DHT(initial_peers=plan["initial_peers"], start=True)
    print("MADDRS", json.dumps([str(a) for a in dht.get_visible_maddrs()]), flush=True)
    tensor = torch.randn(plan["numel"], generator=torch.Generator().manual_seed(plan["rank"]))
    averager = hivemind.averaging.DecentralizedAverager(
        averaged_tensors=[tensor],
        dht=dht,
        prefix="bench",
        target_group_size=plan["peers"],
        min_group_size=plan["peers"],
        min_matchmaking_time=MATCHMAKING_TIME,
        request_timeout=REQUEST_TIMEOUT,
        compression=COMPRESSION[plan["compression"]](),
        start=True,
    )
    times = [allreduce_seconds(averager) for _ in range(plan["rounds"] + 1)]
    print("RESULT", json.dumps({"times": times[1:]}), flush=True)
    averager.shutdown()
    dht.shutdown()


if __name__ == "__main__":
    main()
