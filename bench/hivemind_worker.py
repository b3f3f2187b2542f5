"""One hivemind peer for bench/allreduce.py --compare hivemind (runs in hivemind's own venv, never ours).

Reads a JSON plan on stdin: {"initial_peers": [...], "numel", "peers", "rounds", "compression", "rank"}.
Prints "MADDRS <json list>" once its DHT is up and "RESULT <json>" with per-round step times.
"""

import json
import sys
import time

import hivemind
import torch
from hivemind.compression import Float16Compression, NoCompression, Uniform8BitQuantization

COMPRESSION = {"none": NoCompression, "fp16": Float16Compression, "int8": Uniform8BitQuantization}
MATCHMAKING_TIME = 1.0
REQUEST_TIMEOUT = 0.5  # hivemind warns that matchmaking can deadlock unless this is below MATCHMAKING_TIME


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
    sys.stdin.readline()  # everyone starts together
    times = []
    for _ in range(plan["rounds"] + 1):
        start = time.perf_counter()
        group = averager.step(timeout=600)
        times.append(time.perf_counter() - start)
        if group is None:
            raise SystemExit("hivemind formed no group")
    print("RESULT", json.dumps({"times": times[1:]}), flush=True)
    averager.shutdown()
    dht.shutdown()


if __name__ == "__main__":
    main()
