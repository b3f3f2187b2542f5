"""An averaging peer for the NAT rig: joins with `hiveengine.init` (a home peer learns it cannot be dialled and
reserves a relay slot), then runs a DecentralizedAverager that is NOT a client: its own peer reserves with the same
relay, so others reach it as a reducer and as a state server through the relay.

Usage: nat_averager.py avg SEED ROUNDS OUT INITIAL_PEER: average a random tensor (SEED) ROUNDS times with
aggregation "mean" and codec none, print "STEP <json: size, failed parts>" per round, save the tensor to OUT, print
"SAVED", then serve its state until stdin closes. `client-avg`: the same, in client mode where the engine chose it
(a home peer then sends and receives over links it opens itself, and reduces nothing).
nat_averager.py load OUT INITIAL_PEER: load the state from peers, save it to OUT, print "LOADED <json: epoch>".
Both print "ADDRESS <averager's address>" first; `avg` and `client-avg` then wait for a line on stdin (the test
sends it once every peer is up, so that their first gatherings overlap). NAT_SWARM: how many averagers the swarm
holds (2); NAT_REPORT=senders adds each round's fewest senders averaged in a part to STEP.
"""

import json
import os
import sys

import torch

import hiveengine
from hiveengine.averaging import DecentralizedAverager

SIZE = 100_000
LATE_GRACE = 10.0  # relayed parts on a loaded 2-core test machine may trail the others by seconds


def main() -> None:
    mode = sys.argv[1]
    engine = hiveengine.init(initial_peers=sys.argv[-1:])
    averaging = mode in ("avg", "client-avg")
    seed = int(sys.argv[2]) if averaging else 0
    tensor = torch.randn(SIZE, generator=torch.Generator().manual_seed(seed)) if averaging else torch.zeros(SIZE)
    averager = DecentralizedAverager(
        [tensor],
        engine.dht,
        "nat-avg",
        target_group_size=4,
        expected_swarm_size=int(os.environ.get("NAT_SWARM", "2")),
        client_mode=mode == "client-avg" and engine.client_mode,
        aggregation="mean",
        matchmaking_time=2.0,
        late_grace=LATE_GRACE,
        share_state=averaging and not (mode == "client-avg" and engine.client_mode),
    )
    print("ADDRESS", averager.peer.address, flush=True)
    if averaging:
        sys.stdin.readline()
        for _ in range(int(sys.argv[3])):
            result = averager.step(timeout=40)
            summary = None if result is None else {"size": len(result.group.members), "failed": result.failed_parts}
            if summary is not None and "senders" in os.environ.get("NAT_REPORT", ""):
                summary["senders"] = result.senders_averaged
            print("STEP", json.dumps(summary), flush=True)
        with averager.get_tensors() as (averaged,):
            torch.save(averaged.clone(), sys.argv[4])
        print("SAVED", flush=True)
        sys.stdin.read()
    else:
        metadata = averager.load_state_from_peers(timeout=40)
        with averager.get_tensors() as (loaded,):
            torch.save(loaded.clone(), sys.argv[2])
        print("LOADED", json.dumps({"found": metadata is not None, "epoch": averager.local_epoch}), flush=True)
    averager.shutdown()
    engine.shutdown()


if __name__ == "__main__":
    main()
