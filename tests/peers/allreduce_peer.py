"""A raw all-reduce peer process for tests/test_allreduce.py: prints its address, reads its group (the
all-reduce plan) as JSON from stdin, averages its seeded data with the group through run_allreduce (no
DecentralizedAverager, no DHT: see decentralized_averager_peer.py for that), and saves the result for the test
to compare."""

import asyncio
import functools
import json
import sys
import time

import torch

from hiveengine.averaging import AllReduceService, GroupInfo, GroupMember, Mode, RoundOptions, run_allreduce
from hiveengine.averaging.allreduce import DEFAULT_MAX_LINK_ALLOWANCE
from hiveengine.codec import Aggregation, get_codec
from hiveengine.transport import Peer, PeerID
from tests.peers import byzantine_attacks


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
    # "weight_limits": {member index: the most weight its gathered metadata allows}, as the Optimizer's progress
    limits = {PeerID.from_string(plan["members"][int(i)]["id"]): v for i, v in plan.get("weight_limits", {}).items()}
    group = GroupInfo(bytes.fromhex(plan["group_id"]), members, 0, {p: {"limit": v} for p, v in limits.items()})
    seeds = {member.peer_id: i for i, member in enumerate(members)}
    if me.get("stall") or me.get("attack") == "silent":
        print("STALLED", flush=True)
        sys.stdin.read()  # never takes part (its service answers no call); the test kills us or lets us be
        return
    options = RoundOptions(
        timeout=plan["timeout"],
        chunk_elements=plan["chunk_elements"],
        sender_timeout=plan["sender_timeout"],
        late_grace=plan.get("late_grace", 2.0),
        max_link_allowance=plan.get("max_link_allowance", DEFAULT_MAX_LINK_ALLOWANCE),
        aggregation=Aggregation(plan.get("aggregation", "mean")),
        max_weight_ratio=plan.get("max_weight_ratio", 4.0),
        verify=me.get("verify", plan.get("verify", True)),
        weight_limit=lambda gathered: gathered["limit"] if gathered else None,
        # "audit_rate": audit with the public data: member i's contribution is seeded_data(i) (every test seeds so)
        audit=(lambda sender: functools.partial(seeded_data, seeds[sender], plan["numel"]))
        if "audit_rate" in plan
        else None,
        audit_rate=me.get("audit_rate", plan.get("audit_rate", 0.0)),
    )
    rounds = []
    for number in range(plan.get("rounds", 1)):  # each round averages the seeded data afresh
        flat = seeded_data(me["seed"], plan["numel"]).to(plan.get("device", "cpu"))
        codec, flat, weight = byzantine_attacks.apply(me.get("attack"), get_codec(plan["codec"]), flat, me["weight"])
        round_group = GroupInfo(group.group_id + bytes([number]), group.members, 0, group.gathered)
        started = time.monotonic()
        result = peer.runtime.run(
            run_allreduce(service, round_group, flat, codec, weight=weight, options=options),
            timeout=plan["timeout"] + 30,
        )
        rounds.append({"failed_parts": result.failed_parts, "s": time.monotonic() - started})
        peer.runtime.run(service.audits_settled(), timeout=plan["timeout"] + 30)  # its bans hold from the next round
        torch.save(flat.cpu(), f"{me['out']}.{number}")
    torch.save(flat.cpu(), me["out"])
    outcome = {**rounds[-1], "spans": result.spans, "device": flat.device.type, "rounds": rounds}
    outcome["banned"] = sorted(str(p) for p in service.banned)
    outcome["accused"] = sorted(str(PeerID(accused)) for accused, _ in service.accusations.published())
    print("RESULT", json.dumps(outcome), flush=True)
    sys.stdin.read()
    peer.shutdown()


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    main()
