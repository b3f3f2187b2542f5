"""Byzantine-tolerance benchmark: 8 peers train one small model, 1 and then 3 of them attack the averaging.

Each peer is a process (`python bench/byzantine.py --worker`). In every step each peer computes its gradient
on its own minibatch of a synthetic classification task (a fixed random teacher labels Gaussian inputs), the
group averages the gradients with one butterfly all-reduce (run_allreduce over UCX, int8 with error feedback,
the Optimizer's default codec), and every peer applies the aggregate with SGD. Byzantine peers send instead:
`scale` (gradient x1000), `sign` (gradient x-1), `noise` (Gaussian noise 100x the gradient's norm), `alie`
("a little is enough", Baruah et al. 2019: the honest mean minus one standard deviation per coordinate,
estimated from several of its own minibatches, as colluding attackers would), or, as `garbage`, send honest
gradients but claim the most bandwidth (so that they reduce the parts: the model is one part) and return
noise as the aggregate (tests/peers/byzantine_attacks.GarbageReducer).

Two configurations: a trusted swarm (`mean`, replies not verified) and an open one (`centered_clip` with
verified reducers: a reducer caught cheating costs its part for that step (not updated there, as the Optimizer
does: a peer that applied its own gradient instead would keep that difference from the others' model), and is left
out of the group from the next step on, as matchmaking would leave out peers that the others banned; and audited
senders: every peer's minibatch is public (a seed per peer and step), so the reducer recomputes the gradients of a
random tenth of its senders each step, hiveengine.averaging.audits, and stops averaging one that sent something
else). The model is one part, reduced by the member with the smallest peer id: `byzantine reducer` says whether
that is an attacker, which audits nobody and averages its colluders' copies (its own copy, too, goes unaudited).
The attackers are drawn from the members with the largest ids, so that reducer is honest; then each attack runs once
more in the open configuration with that member among the attackers (`byzantine reducer`: yes). The table gives the
held-out loss of an honest peer after STEPS steps (long enough that clean training is near its plateau, so that "within
5% of clean" means something), against the clean run of all 8 peers and against the honest peers training alone (the
`absent` rows: the Byzantine peers do nothing, so the difference is what their attack did, not the data they did not
bring), and the robust path's time overhead on a clean run (per averaging round; the median ratio of paired runs).
Writes bench/results/local/byzantine.json (see bench/common.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import format_table, kill_worker, read_prefixed, write_results

PEERS = 8
ATTACKS = ["scale", "sign", "noise", "alie", "garbage"]
BYZANTINE_COUNTS = [1, 3]
CONFIGURATIONS = {"mean": False, "centered_clip": True}  # aggregation -> verified reducers and audited senders
STEPS = 300  # a clean run's held-out loss is within ~10% of its plateau by then (0.23 at 300, 0.21 at 600)
BATCH = 32
LR = 0.5
FEATURES, HIDDEN, CLASSES = 32, 64, 8  # the model's sizes (--hidden: a wider model, 32 + 8 + 41 HIDDEN values)
HELDOUT = 4096
ALIE_BATCHES = 4  # minibatches an ALIE attacker uses to estimate the honest mean and spread
LINE_TIMEOUT = 300.0


def teacher_data(seed: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` inputs from stream `seed`, labelled by the fixed random teacher."""
    teacher = torch.randn(FEATURES, CLASSES, generator=torch.Generator().manual_seed(12345))
    x = torch.randn(count, FEATURES, generator=torch.Generator().manual_seed(seed))
    return x, (x @ teacher + 0.5 * torch.randn(count, CLASSES, generator=torch.Generator().manual_seed(-seed))).argmax(
        1
    )


def make_model(hidden: int = HIDDEN) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, CLASSES))


def gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def attacked(attack: str, model: nn.Module, rank: int, step: int, honest: torch.Tensor) -> torch.Tensor:
    """What a Byzantine peer sends in place of its honest gradient."""
    if attack == "scale":
        return honest * 1000
    if attack == "sign":
        return -honest
    if attack == "noise":
        noise = torch.randn(honest.numel(), generator=torch.Generator().manual_seed(rank * 100003 + step))
        return noise * (100 * honest.norm() / noise.norm())
    if attack == "garbage":  # its gradients are honest: it cheats as a reducer
        return honest
    if attack == "alie":
        samples = [honest]
        for k in range(1, ALIE_BATCHES):
            samples.append(gradient(model, *teacher_data(10**6 + rank * 10**4 + step * 10 + k, BATCH)))
        stacked = torch.stack(samples)
        return stacked.mean(0) - stacked.std(0)
    raise ValueError(f"unknown attack {attack!r}")


def auditor(model: nn.Module, rank_of: dict, step: int):
    """The audit function of one step: a sender's gradient on its public minibatch, at our model, which every honest
    peer shares. It reads the model without writing to it (autograd.grad, not .grad): the round waits for its audits
    before we step, and an audit still running past that is dropped."""
    parameters = list(model.parameters())

    def audit(sender):
        x, y = teacher_data(rank_of[sender] * 10**4 + step, BATCH)
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), parameters)
        return torch.cat([g.reshape(-1) for g in grads])

    return audit


def worker() -> None:
    from hiveengine.averaging import AllReduceService, GroupInfo, GroupMember, RoundOptions, run_allreduce
    from hiveengine.codec import Aggregation, get_codec
    from hiveengine.transport import Peer, PeerID
    from tests.peers.byzantine_attacks import GarbageReducer

    torch.set_num_threads(1)  # 8 workers share this host's cores
    peer = Peer()
    service = AllReduceService.of(peer)
    print("ADDRESS", peer.address, flush=True)
    for line in sys.stdin:
        plan = json.loads(line)
        greedy = plan["byzantine"] if plan["attack"] == "garbage" else []  # they claim 2x the bandwidth
        members = [
            GroupMember(PeerID.from_string(a.rsplit("/", 1)[1]), a, 2.0 if i in greedy else 1.0)
            for i, a in enumerate(plan["addresses"])
        ]
        rank, attack = plan["rank"], plan["attack"] if plan["rank"] in plan["byzantine"] else None
        rank_of = {m.peer_id: i for i, m in enumerate(members)}  # whose public minibatches an auditor recomputes
        if plan["attack"] == "absent":  # the reference: the honest peers train alone, the others do nothing
            members = [m for i, m in enumerate(members) if i not in plan["byzantine"]]
            if attack is not None:
                nothing = {"loss": None, "averaging_s": 0.0, "failed_steps": 0, "banned": 0, "reduced": 0}
                print("RESULT", json.dumps(nothing), flush=True)
                continue
        codec = GarbageReducer(get_codec("int8")) if attack == "garbage" else get_codec("int8")
        options = RoundOptions(timeout=30, aggregation=Aggregation(plan["aggregation"]), verify=plan["verify"])
        # A garbage peer waits for every honest copy in its first round (each honest peer gets its garbage back and
        # bans it; one that arrived after the grace window would get an error instead, ban nobody, and keep it in
        # its groups while the others leave it out); from then on the honest peers leave it out, and it does not wait.
        hasty = dataclasses.replace(options, sender_timeout=0.05, late_grace=0.05) if attack == "garbage" else options
        service.banned.clear()  # every run starts with no one banned
        # Groups leave out a garbage reducer once caught, as matchmaking would (every honest peer bans it at once: a
        # majority vote): the honest peers through their bans, the garbage peers by knowing that one caught is out.
        # A sender that failed an audit is banned by the reducer that audited it alone, which stops averaging it.
        excluded: set[PeerID] = set()
        cheats = {members[i].peer_id for i in greedy}
        model = make_model(plan["hidden"])
        residual = None
        averaging, failed, reduced_before = 0.0, 0, service.parts_reduced
        for step in range(plan["steps"]):
            x, y = teacher_data(rank * 10**4 + step, BATCH)
            flat = gradient(model, x, y)
            if attack is not None:
                flat = attacked(attack, model, rank, step, flat)
            # A diverged model's NaN/Inf gradient goes as zeros: every peer joins every round (no one waits for it).
            flat = torch.nan_to_num(flat, nan=0.0, posinf=0.0, neginf=0.0)
            residual = torch.zeros_like(flat) if residual is None else residual.nan_to_num_(0.0, 0.0, 0.0)
            group_id = hashlib.sha256(f"{plan['run']}/{step}".encode()).digest()[:16]
            group = GroupInfo(group_id, tuple(m for m in members if m.peer_id not in excluded))
            if group.member(peer.peer_id) is not None:  # a peer left out of the groups steps alone
                started = time.perf_counter()
                now = options if step == 0 else hasty
                if plan["audit"] and attack is None and not failed:  # a part failed for us: is our model still theirs?
                    now = dataclasses.replace(now, audit=auditor(model, rank_of, step))
                averaged = run_allreduce(service, group, flat, codec, residual=residual, options=now)
                result = peer.runtime.run(averaged, 60)
                averaging += time.perf_counter() - started
                failed += bool(result.failed_parts)
                for part in result.failed_parts:  # not updated this step, as the Optimizer does (zero_failed_parts):
                    flat[slice(*result.spans[part])] = 0  # our own gradient there would part our model from theirs
                if attack is not None and plan["verify"]:  # a garbage reducer was caught by every honest peer
                    caught = [r.peer_id for r, (s, e) in zip(group.reducers, result.spans, strict=True) if e > s]
                    excluded.update(p for p in caught if p in cheats)
                if attack is None:
                    excluded.update(p for p in service.banned if p in cheats)
            with torch.no_grad():
                offset = 0
                for p in model.parameters():
                    p -= LR * flat[offset : offset + p.numel()].view_as(p)
                    offset += p.numel()
        with torch.no_grad():
            x, y = teacher_data(-1, HELDOUT)
            loss = float(F.cross_entropy(model(x), y))
        outcome = {"loss": loss, "averaging_s": averaging, "failed_steps": failed, "banned": len(service.banned)}
        outcome["reduced"] = service.parts_reduced - reduced_before
        print("RESULT", json.dumps(outcome), flush=True)


def run(workers: list[subprocess.Popen], addresses: list[str], name: str, **plan) -> list[dict]:
    """One training run on every worker; each worker's result."""
    for rank, proc in enumerate(workers):
        proc.stdin.write(json.dumps({"run": name, "rank": rank, "addresses": addresses, **plan}) + "\n")
        proc.stdin.flush()
    return [json.loads(read_prefixed(proc, "RESULT", LINE_TIMEOUT)) for proc in workers]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--attacks", nargs="+", default=ATTACKS, choices=ATTACKS)
    parser.add_argument(
        "--byzantine", nargs="*", type=int, default=BYZANTINE_COUNTS, help="attacker counts (none: the overhead only)"
    )
    parser.add_argument("--steps", type=int, default=STEPS, help="SGD steps per run")
    parser.add_argument(
        "--hidden", type=int, default=HIDDEN, help=f"the model's hidden width (default {HIDDEN}: 2,632 values)"
    )
    parser.add_argument(
        "--clean-repeats", type=int, default=4, help="clean run pairs, mean and robust (for the overhead; default 4)"
    )
    args = parser.parse_args()
    if args.worker:
        worker()
        return
    from hiveengine.cli.launch import shared_host_defaults
    from hiveengine.transport import PeerID

    # The peers share this host's cores as `hiveengine launch` workers do (bench/rounds.py does the same): each its
    # share of threads and, with more peers than cores, no polling after network activity.
    env = {**shared_host_defaults(PEERS, os.environ), **os.environ}
    workers = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        for _ in range(PEERS)
    ]
    rows, clean, overhead, alone = [], {}, {}, {}

    def row(attack: str, byzantine: list[int], aggregation: str, name: str) -> dict:
        """One run's table row (the loss of the first honest peer)."""
        plan = {"attack": attack, "byzantine": byzantine, "aggregation": aggregation, "steps": args.steps}
        plan["hidden"] = args.hidden
        checked = CONFIGURATIONS[aggregation]
        results = run(workers, addresses, name, verify=checked, audit=checked, **plan)
        honest = [r for i, r in enumerate(results) if i not in byzantine]
        loss = honest[0]["loss"]
        versus = 100 * (loss / clean[aggregation] - 1) if aggregation in clean else 0.0
        reference = alone.get((aggregation, len(byzantine)))
        rows.append(
            {
                "attack": attack or "none",
                "byzantine": len(byzantine),
                "aggregation": aggregation + (" + verified + audited" if checked else ""),
                "loss": loss,
                "vs clean %": versus,
                "goal (5%)": "met" if versus <= 5 else "missed",
                "vs honest alone %": 100 * (loss / reference - 1) if reference is not None else None,
                "round ms": 1e3 * max(r["averaging_s"] for r in honest) / args.steps,
                "failed steps": honest[0]["failed_steps"],
                "banned": honest[0]["banned"],
                "byzantine reducer": any(results[i]["reduced"] for i in byzantine),
            }
        )
        print(format_table(rows[-1:], list(rows[-1])), flush=True)
        return rows[-1]

    try:
        addresses = [read_prefixed(proc, "ADDRESS", LINE_TIMEOUT) for proc in workers]
        plan = {"attack": None, "byzantine": [], "aggregation": "mean", "steps": 5, "verify": False, "audit": False}
        plan["hidden"] = args.hidden
        run(workers, addresses, "warm-up", **plan)  # connections and first-touch memory, not measured
        # With equal bandwidths the one part goes to the member with the smallest peer id: attackers are drawn from
        # the largest ids (an honest reducer), and then once more with that member among them (a Byzantine reducer).
        by_id = sorted(range(PEERS), key=lambda i: PeerID.from_string(addresses[i].rsplit("/", 1)[1]).raw)
        # Clean runs in pairs, A/B then B/A: the VM's speed drifts by more than the overhead within minutes, so the
        # overhead is the median of each pair's ratio, not a ratio of medians taken minutes apart.
        pairs = []
        for k in range(args.clean_repeats):
            order = list(CONFIGURATIONS)[:: 1 if k % 2 == 0 else -1]
            pairs.append({aggregation: row(None, [], aggregation, f"clean-{aggregation}-{k}") for aggregation in order})
        for aggregation in CONFIGURATIONS:
            clean[aggregation] = statistics.median(p[aggregation]["loss"] for p in pairs)
            overhead[aggregation] = statistics.median(p[aggregation]["round ms"] for p in pairs)
        ratio = statistics.median(p["centered_clip"]["round ms"] / p["mean"]["round ms"] for p in pairs)
        for count in args.byzantine:
            usual = sorted(by_id[PEERS - count :])
            for aggregation in CONFIGURATIONS:  # the honest peers alone: what an attack cannot be blamed for
                absent = row("absent", usual, aggregation, f"absent-{count}-{aggregation}")
                alone[aggregation, count] = absent["loss"]
            for attack in args.attacks:
                for aggregation in CONFIGURATIONS:
                    if attack == "garbage" and not CONFIGURATIONS[aggregation]:
                        continue  # unverified, the garbage is simply applied: the model diverges in 1 step (loss ~1e6)
                    row(attack, usual, aggregation, f"{attack}-{count}-{aggregation}")
            holding = sorted([by_id[0], *by_id[PEERS - count + 1 :]])
            for attack in (a for a in args.attacks if a != "garbage"):  # garbage peers take the part by design
                row(attack, holding, "centered_clip", f"{attack}-{count}-reducer")
    finally:
        for proc in workers:
            kill_worker(proc)
    robust_overhead = 100 * (ratio - 1)
    print()
    print(format_table(rows, list(rows[0])))
    print(
        f"robust path (CenteredClip, verified reducers, audits) overhead on a clean run: {robust_overhead:+.1f}% per "
        f"averaging round, median of {args.clean_repeats} paired runs ({overhead['mean']:.1f} -> "
        f"{overhead['centered_clip']:.1f} ms)"
    )
    payload = {"peers": PEERS, "steps": args.steps, "lr": LR, "codec": "int8", "hidden": args.hidden, "rows": rows}
    path = write_results("byzantine", {**payload, "robust_overhead_percent": robust_overhead})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
