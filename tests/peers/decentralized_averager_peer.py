"""A DecentralizedAverager peer process for tests/test_averager.py: joins the DHT, steps `rounds` times
(matchmaking + all-reduce each), saves its tensors. (tests/peers/allreduce_peer.py instead runs one raw
all-reduce plan, without the averager or the DHT.)

Usage: decentralized_averager_peer.py OUT_FILE SEED ROUNDS CODEC [INITIAL_PEER]. Prints "DHT <address>" once its DHT
is up, waits for a line on stdin (so every peer starts together), then "STEP <json>" per round. Environment:
VERIFY=1 checks every reducer's replies; ATTACK=garbage_reducer makes this peer return noise for the part it
reduces (tests/peers/byzantine_attacks.py).
"""

import json
import os
import sys

import torch

from hiveengine.averaging import DecentralizedAverager
from hiveengine.dht import DHT
from tests.peers import byzantine_attacks

MATCHMAKING_TIME = 1.0


def main() -> None:
    out, seed, rounds, codec = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    dht = DHT(initial_peers=sys.argv[5:6])
    print("DHT", dht.address, flush=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(50_000, generator=gen), torch.randn(17, 3, generator=gen)]
    averager = DecentralizedAverager(
        tensors,
        dht,
        "test-run",
        target_group_size=4,
        codec=codec,
        matchmaking_time=MATCHMAKING_TIME,
        verify_reducers=os.environ.get("VERIFY") == "1",
    )
    if os.environ.get("ATTACK") == "garbage_reducer":
        averager.codec = byzantine_attacks.GarbageReducer(averager.codec)
    sys.stdin.readline()
    for _ in range(rounds):
        result = averager.step(timeout=30)
        summary = None if result is None else {"size": len(result.group.members), "failed": result.failed_parts}
        print("STEP", json.dumps(summary), flush=True)
    with averager.get_tensors() as averaged:
        torch.save([t.clone() for t in averaged], out)
    print("SAVED", flush=True)
    sys.stdin.read()
    averager.shutdown()
    dht.shutdown()


if __name__ == "__main__":
    main()
