"""A raw all-reduce peer process for tests/test_allreduce.py: prints its address, reads its group (the
all-reduce plan) as JSON from stdin, averages its seeded data with the group through run_allreduce (no
DecentralizedAverager, no DHT: see decentralized_averager_peer.py for that), and saves the result for the test
to compare."""

import asyncio
import json
import sys

import torch

from hiveengine.averaging import AllReduceService, GroupInfo, GroupMember, Mode, run_allreduce
from hiveengine.codec import get_codec
from hiveengine.transport import Peer, PeerID


def seeded_data(seed: int, numel: int) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(seed))


def main() -> None:
    peer = Peer()
    service = AllReduceService(peer)
    print("ADDRESS", peer.address, flush=True)
    plan = json.loads(sys.stdin.readline())
    me = plan["me"]
    members = tuple(
        GroupMember(PeerID.from_string(m["id"]), m["address"], m["bandwidth"], Mode[m["mode"]]) for m in plan["members"]
    )
    group = GroupInfo(bytes.fromhex(plan["group_id"]), members)
    if me.get("stall"):
        print("STALLED", flush=True)
        sys.stdin.read()  # never takes part; the test kills us
        return
    flat = seeded_data(me["seed"], plan["numel"]).to(plan.get("device", "cpu"))
    result = peer.runtime.run(
        run_allreduce(
            service,
            group,
            flat,
            get_codec(plan["codec"]),
            weight=me["weight"],
            timeout=plan["timeout"],
            chunk_elements=plan["chunk_elements"],
            sender_timeout=plan["sender_timeout"],
        ),
        timeout=plan["timeout"] + 30,
    )
    torch.save(flat.cpu(), me["out"])
    outcome = {"failed_parts": result.failed_parts, "spans": result.spans, "device": flat.device.type}
    print("RESULT", json.dumps(outcome), flush=True)
    sys.stdin.read()
    peer.shutdown()


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    main()
