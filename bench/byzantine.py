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

Two configurations: a trusted swarm (`mean`, replies not verified) and an open one (`centered_clip` with verified
reducers: a reducer caught cheating costs its part for that step (not updated there, as the Optimizer does: a peer
that applied its own gradient instead would keep that difference from the others' model), and is banned; and
audits: every peer's minibatch is public (a seed per peer and step), so the auditors recompute the gradient of a
sender with probability `--audit-rate` each step (the library's default, 2%; hiveengine.averaging.audits): the
reducer checks the copies it reduces, and the others the reducer's own copy, which its signed claims report.
One that convicts a sender bans it and tells the others, which audit it for sure and ban it on their own
recomputation (hiveengine.averaging.suspicions). Groups are formed as matchmaking forms them from its registrations'
votes: under attack the driver counts every peer's bans after each step, and a peer that a strict majority of the 8
banned is left out of the groups from the next step on (`outvoted at`); the members of the new groups then average
their models once (losslessly), as the Optimizer averages its group's states when they differ, since a peer that
banned its reducer before the vote skipped its updates meanwhile. A peer whose part failed does not audit until then
(is its model still the others'?). The model is one part, reduced by the member with the smallest peer id:
`byzantine reducer` says whether that is an attacker, which audits nobody and averages its colluders' copies. The
attackers are drawn from the members with the largest ids, so that reducer is honest; then each attack runs once
more in the open configuration with that member among the attackers (`byzantine reducer`: yes). The table gives the
held-out loss of an honest peer after STEPS steps (long enough that clean training is near its plateau, so that
"within 5% of clean" means something), against the clean run of all 8 peers and against the honest peers training
alone (the `absent` rows: the Byzantine peers do nothing, so the difference is what their attack did, not the data
they did not bring). The goal, 5%, is judged against the honest peers' clean run: all 8 for the clean rows, the
honest peers alone under attack (no defence brings back the data the attackers withhold: with 3 of 8 that alone is
5% to 8% of the loss).

The overhead: clean runs of the trusted swarm, of the open one, and of the open one without audits, in rotated
orders (the VM's speed drifts by more than the overhead within minutes: each overhead is the median of the repeats'
ratios), for this model (whose rounds of 2.6k values are all fixed cost) and for bench/train.py's byte-level
language model at its default sizes (2.5M values in 8 parts: a model whose step is mostly compute, as training is),
per training step (gradient, round and update) and per averaging round, with the CPU time per peer and step (8
peers share this host's cores, so the steps are CPU-bound and the time follows the CPU).
Writes bench/results/local/byzantine.json (see bench/common.py).
"""

from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import functools
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
from torch.nn.utils import parameters_to_vector, vector_to_parameters

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import format_table, kill_worker, read_prefixed, write_results
from bench.train import TinyLM, evaluate, lm_loss, sample_batch, split_corpus
from hiveengine.averaging.audits import DEFAULT_AUDIT_RATE

PEERS = 8
ATTACKS = ["scale", "sign", "noise", "alie", "garbage"]
BYZANTINE_COUNTS = [1, 3]
# name -> (aggregation, verified reducers, audited senders). The loss table compares the first two; the overhead is
# that of the open swarm's robust path, with its audits and without them (their cost is the audit rate times the
# compute, by design: hiveengine.averaging.audits).
CONFIGURATIONS = {
    "trusted": ("mean", False, False),
    "open": ("centered_clip", True, True),
    "open, no audits": ("centered_clip", True, False),
}
COMPARED = ["trusted", "open"]
STEPS = 300  # a clean run's held-out loss is within ~10% of its plateau by then (0.23 at 300, 0.21 at 600)
BATCH = 32
LR = 0.5
FEATURES, HIDDEN, CLASSES = 32, 64, 8  # the model's sizes (--hidden: a wider model, 32 + 8 + 41 HIDDEN values)
HELDOUT = 4096
ALIE_BATCHES = 4  # minibatches an ALIE attacker uses to estimate the honest mean and spread
LM_DIM, LM_LAYERS, LM_HEADS, LM_SEQ, LM_BATCH = 256, 3, 4, 64, 16  # bench/train.py's defaults
LM_LR = 0.1
LM_STEPS = 16  # steps per clean run of the language model (each about 1 s with 8 peers on 2 cores)
LINE_TIMEOUT = 300.0
VOTE_EVERY = 1  # steps between two counts of the bans (the votes that leave a peer out of the groups) under attack


class Teacher:
    """The loss table's task: a small MLP learns a fixed random teacher's labels of Gaussian inputs. Minibatch
    `seed` is public: anyone can draw it (the auditors do)."""

    lr = LR

    def __init__(self, hidden: int):
        self.hidden = hidden

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(FEATURES, self.hidden), nn.ReLU(), nn.Linear(self.hidden, CLASSES))

    def batch(self, seed: int, count: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
        """`count` inputs from stream `seed`, labelled by the fixed random teacher."""
        teacher = torch.randn(FEATURES, CLASSES, generator=torch.Generator().manual_seed(12345))
        x = torch.randn(count, FEATURES, generator=torch.Generator().manual_seed(seed))
        noise = 0.5 * torch.randn(count, CLASSES, generator=torch.Generator().manual_seed(-seed))
        return x, (x @ teacher + noise).argmax(1)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        return F.cross_entropy(model(batch[0]), batch[1])

    def heldout(self, model: nn.Module) -> float:
        return float(self.loss(model, self.batch(-1, HELDOUT)))


class Language:
    """The overhead's second task: bench/train.py's byte-level transformer (2.5M values) on Python's source, with
    its default sizes; minibatch `seed` is public as above."""

    lr = LM_LR

    def __init__(self):
        self.train, self.heldout_data = split_corpus()

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        return TinyLM(LM_DIM, LM_LAYERS, LM_HEADS, LM_SEQ)

    def batch(self, seed: int) -> torch.Tensor:
        return sample_batch(self.train, torch.Generator().manual_seed(seed), LM_BATCH, LM_SEQ)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        return lm_loss(model, batch)

    def heldout(self, model: nn.Module) -> float:
        return evaluate(model, self.heldout_data, LM_SEQ)


def gradient(task, model: nn.Module, seed: int) -> torch.Tensor:
    """The flat gradient of `model` on public minibatch `seed` (read-only: autograd.grad, not .grad)."""
    parameters = list(model.parameters())
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(task.loss(model, task.batch(seed)), parameters)])


def attacked(attack: str, task, model: nn.Module, rank: int, step: int, honest: torch.Tensor) -> torch.Tensor:
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
            samples.append(gradient(task, model, 10**6 + rank * 10**4 + step * 10 + k))
        stacked = torch.stack(samples)
        return stacked.mean(0) - stacked.std(0)
    raise ValueError(f"unknown attack {attack!r}")


def auditor(task, model: nn.Module, rank_of: dict, step: int):
    """The audit function of one step: it copies our model (which every honest peer shares) the first time the round
    draws a sender, and returns that sender's gradient on its public minibatch at the copy, recomputed later in a
    worker thread (no round waits for it, and we step meanwhile)."""
    copies: list[nn.Module] = []

    def audit(sender):
        if not copies:
            copies.append(copy.deepcopy(model))
        return functools.partial(gradient, task, copies[0], rank_of[sender] * 10**4 + step)

    return audit


def resync(peer, service, group, model: nn.Module, options) -> int:
    """Average `model`'s parameters with `group` (losslessly; the members of new groups, whose models parted where
    a part failed for some: as the Optimizer averages its group's states when they differ); 0 when every part was
    averaged (our model is theirs again, and our audits can resume), else 1."""
    from hiveengine.averaging import run_allreduce
    from hiveengine.codec import get_codec

    with torch.no_grad():
        flat = parameters_to_vector(model.parameters())
        result = peer.runtime.run(run_allreduce(service, group, flat, get_codec("none"), options=options), 60)
        vector_to_parameters(flat, model.parameters())
    return int(bool(result.failed_parts))


def worker() -> None:
    from hiveengine.averaging import AllReduceService, GroupInfo, GroupMember, RoundOptions, run_allreduce
    from hiveengine.codec import Aggregation, get_codec
    from hiveengine.transport import Peer, PeerID
    from tests.peers.byzantine_attacks import GarbageReducer

    torch.set_num_threads(1)  # 8 workers share this host's cores
    peer = Peer()
    service = AllReduceService.of(peer)
    print("ADDRESS", peer.address, flush=True)
    tasks, training = {}, {}  # the training run under way: its model, error feedback and counters
    for line in sys.stdin:
        plan = json.loads(line)
        key = (plan["model"], plan["hidden"])
        if key not in tasks:
            tasks[key] = Language() if plan["model"] == "lm" else Teacher(plan["hidden"])
        task = tasks[key]
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
                nothing = {
                    "loss": None,
                    "averaging_s": 0.0,
                    "step_s": 0.0,
                    "cpu_s": 0.0,
                    "failed_steps": 0,
                    "banned": [],
                    "reduced": 0,
                }
                print("RESULT", json.dumps(nothing), flush=True)
                continue
        codec = GarbageReducer(get_codec("int8")) if attack == "garbage" else get_codec("int8")
        options = RoundOptions(timeout=30, aggregation=Aggregation(plan["aggregation"]), verify=plan["verify"])
        # A garbage peer waits for every honest copy in its first round (each honest peer gets its garbage back and
        # bans it; one that arrived after the grace window would get an error instead, ban nobody, and keep it in
        # its groups while the others leave it out); from then on the honest peers leave it out, and it does not wait.
        hasty = dataclasses.replace(options, sender_timeout=0.05, late_grace=0.05) if attack == "garbage" else options
        if plan["first"] == 0:  # a new run: no one banned or suspected, audits at the plain rate
            service.banned.clear()
            service.audit_boost = 0
            service.suspicions.forget()
            training = {"model": task.model(), "residual": None, "averaging": 0.0, "stepping": 0.0, "cpu": 0.0}
            training.update(failed=0, reduced=service.parts_reduced)
        # The groups leave out the peers that a strict majority of the members banned, as matchmaking does with the
        # bans its registrations name (without_outvoted): the driver counts the votes between the runs' stretches.
        outvoted = {PeerID.from_string(p) for p in plan["outvoted"]}
        kept = tuple(m for m in members if m.peer_id not in outvoted)
        model, residual = training["model"], training["residual"]
        began, cpu = time.perf_counter(), time.process_time()
        if plan["resync"]:  # new groups: their members average their models, as the Optimizer averages states
            group = GroupInfo(hashlib.sha256(f"{plan['run']}/{plan['first']}/state".encode()).digest()[:16], kept)
            if group.member(peer.peer_id) is not None:
                training["failed"] = resync(peer, service, group, model, options)
        for step in range(plan["first"], plan["last"]):
            flat = gradient(task, model, rank * 10**4 + step)
            if attack is not None:
                flat = attacked(attack, task, model, rank, step, flat)
            # A diverged model's NaN/Inf gradient goes as zeros: every peer joins every round (no one waits for it).
            flat = torch.nan_to_num(flat, nan=0.0, posinf=0.0, neginf=0.0)
            residual = torch.zeros_like(flat) if residual is None else residual.nan_to_num_(0.0, 0.0, 0.0)
            group_id = hashlib.sha256(f"{plan['run']}/{step}".encode()).digest()[:16]
            group = GroupInfo(group_id, kept)
            if group.member(peer.peer_id) is not None:  # a peer left out of the groups steps alone
                started = time.perf_counter()
                now = options if step == 0 else hasty
                if plan["audit"] and attack is None and not training["failed"]:  # a part failed: is our model theirs?
                    now = dataclasses.replace(now, audit=auditor(task, model, rank_of, step), audit_rate=plan["rate"])
                averaged = run_allreduce(service, group, flat, codec, residual=residual, options=now)
                result = peer.runtime.run(averaged, 60)
                training["averaging"] += time.perf_counter() - started
                training["failed"] += bool(result.failed_parts)
                for part in result.failed_parts:  # not updated this step, as the Optimizer does (zero_failed_parts):
                    flat[slice(*result.spans[part])] = 0  # our own gradient there would part our model from theirs
            with torch.no_grad():
                offset = 0
                for p in model.parameters():
                    p -= task.lr * flat[offset : offset + p.numel()].view_as(p)
                    offset += p.numel()
        training["residual"] = residual
        training["stepping"] += time.perf_counter() - began
        training["cpu"] += time.process_time() - cpu
        outcome = {"banned": [str(p) for p in service.banned]}
        if plan["last"] == plan["steps"]:
            peer.runtime.run(service.audits_settled(), 60)  # the last rounds' audits: their bans, not the next run's
            with torch.no_grad():
                outcome["loss"] = task.heldout(model)
            outcome.update(averaging_s=training["averaging"], step_s=training["stepping"], cpu_s=training["cpu"])
            outcome.update(failed_steps=training["failed"], reduced=service.parts_reduced - training["reduced"])
        print("RESULT", json.dumps(outcome), flush=True)


def run(
    workers: list[subprocess.Popen], addresses: list[str], name: str, stretch: int = 0, **plan
) -> tuple[list[dict], dict[str, int]]:
    """One training run on every worker, in stretches of `stretch` steps (0: one), between which the bans are
    counted as matchmaking counts its registrations' votes (without_outvoted: a peer that a strict majority of the
    members banned is left out of the next stretch's groups); each worker's result, and the step from which each
    peer outvoted was left out."""
    ids = [a.rsplit("/", 1)[1] for a in addresses]
    outvoted: dict[str, int] = {}
    regrouped = False
    for first in range(0, plan["steps"], stretch or plan["steps"]):
        last = min(plan["steps"], first + (stretch or plan["steps"]))
        for rank, proc in enumerate(workers):
            stage = {"run": name, "rank": rank, "addresses": addresses, "first": first, "last": last}
            stage.update(outvoted=sorted(outvoted), resync=regrouped)
            proc.stdin.write(json.dumps({**stage, **plan}) + "\n")
            proc.stdin.flush()
        results = [json.loads(read_prefixed(proc, "RESULT", LINE_TIMEOUT)) for proc in workers]
        votes = collections.Counter(b for r, me in zip(results, ids, strict=True) for b in set(r["banned"]) if b != me)
        now = {p: outvoted.get(p, last) for p, count in votes.items() if count >= len(workers) // 2 + 1}
        regrouped, outvoted = now.keys() != outvoted.keys(), now
    return results, outvoted


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
        "--clean-repeats", type=int, default=4, help="clean runs of each configuration (for the overhead; default 4)"
    )
    parser.add_argument(
        "--audit-rate",
        type=float,
        default=DEFAULT_AUDIT_RATE,
        help=f"the chance that a sender is audited in a round (default {DEFAULT_AUDIT_RATE}, the library's)",
    )
    parser.add_argument(
        "--lm-repeats",
        type=int,
        default=6,
        help=f"clean runs of bench/train.py's language model per configuration, {LM_STEPS} steps (0: none; default 6)",
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
    rows, clean, alone = [], {}, {}

    def row(attack: str, byzantine: list[int], configuration: str, name: str, model: str = "mlp") -> dict:
        """One run's table row (the loss of the first honest peer)."""
        steps = LM_STEPS if model == "lm" else args.steps
        aggregation, verify, audit = CONFIGURATIONS[configuration]
        plan = {"attack": attack, "byzantine": byzantine, "aggregation": aggregation, "steps": steps}
        plan.update(model=model, hidden=args.hidden, verify=verify, audit=audit, rate=args.audit_rate)
        attacked_run = attack not in (None, "absent")  # its bans are counted as it goes (absent: nobody to ban)
        results, outvoted = run(workers, addresses, name, VOTE_EVERY if attacked_run else 0, **plan)
        honest = [r for i, r in enumerate(results) if i not in byzantine]
        loss = honest[0]["loss"]
        versus = 100 * (loss / clean[configuration] - 1) if configuration in clean and model == "mlp" else 0.0
        reference = alone.get((configuration, len(byzantine)))
        alone_by = 100 * (loss / reference - 1) if reference is not None else None
        rows.append(
            {
                "model": model,
                "attack": attack or "none",
                "byzantine": len(byzantine),
                "aggregation": aggregation + " + verified" * verify + " + audited" * audit,
                "loss": loss,
                "vs clean %": versus,
                "goal (5%)": "met" if (versus if alone_by is None else alone_by) <= 5 else "missed",
                "vs honest alone %": alone_by,
                "round ms": 1e3 * max(r["averaging_s"] for r in honest) / steps,
                "step ms": 1e3 * max(r["step_s"] for r in honest) / steps,
                "cpu ms": 1e3 * statistics.mean(r["cpu_s"] for r in honest) / steps,  # per peer and step
                "failed steps": honest[0]["failed_steps"],
                "banned": len(honest[0]["banned"]),
                "outvoted at": sorted(outvoted.values()),
                "byzantine reducer": any(results[i]["reduced"] for i in byzantine),
            }
        )
        print(format_table(rows[-1:], list(rows[-1])), flush=True)
        return rows[-1]

    def overhead(model: str, repeats: int) -> dict:
        """Clean runs of every configuration, `repeats` times in rotated orders: the VM's speed drifts by more
        than the overhead within minutes, so an overhead is the median of each repeat's ratio, not a ratio of
        medians taken minutes apart. {configuration: {"step ms" / "round ms": the ratio's median}}, and the
        clean runs' losses."""
        names, repeated = list(CONFIGURATIONS), []
        for k in range(repeats):
            order = names[k % len(names) :] + names[: k % len(names)]
            repeated.append({c: row(None, [], c, f"clean-{model}-{c}-{k}", model=model) for c in order})
        ratios = {
            c: {u: statistics.median(r[c][u] / r["trusted"][u] for r in repeated) for u in ("step ms", "round ms")}
            for c in names
        }
        ratios["ms"] = {c: statistics.median(r[c]["round ms"] for r in repeated) for c in names}
        for c in names:
            clean.setdefault(c, statistics.median(r[c]["loss"] for r in repeated))
        return ratios

    try:
        addresses = [read_prefixed(proc, "ADDRESS", LINE_TIMEOUT) for proc in workers]
        plan = {"attack": None, "byzantine": [], "aggregation": "mean", "steps": 5, "verify": False, "audit": False}
        plan.update(model="mlp", hidden=args.hidden, rate=args.audit_rate)
        run(workers, addresses, "warm-up", **plan)  # connections and first-touch memory, not measured
        # With equal bandwidths the one part goes to the member with the smallest peer id: attackers are drawn from
        # the largest ids (an honest reducer), and then once more with that member among them (a Byzantine reducer).
        by_id = sorted(range(PEERS), key=lambda i: PeerID.from_string(addresses[i].rsplit("/", 1)[1]).raw)
        overheads = {"mlp": overhead("mlp", args.clean_repeats)}
        if args.lm_repeats:
            for aggregation, verify, audit in CONFIGURATIONS.values():  # the corpus, the buffers: not measured
                plan.update(model="lm", steps=2, aggregation=aggregation, verify=verify, audit=audit)
                run(workers, addresses, f"warm-up-lm-{aggregation}-{verify}-{audit}", **plan)
            overheads["lm"] = overhead("lm", args.lm_repeats)
        for count in args.byzantine:
            usual = sorted(by_id[PEERS - count :])
            for configuration in COMPARED:  # the honest peers alone: what an attack cannot be blamed for
                absent = row("absent", usual, configuration, f"absent-{count}-{configuration}")
                alone[configuration, count] = absent["loss"]
            for attack in args.attacks:
                for configuration in COMPARED:
                    if attack == "garbage" and not CONFIGURATIONS[configuration][1]:
                        continue  # unverified, the garbage is simply applied: the model diverges in 1 step (loss ~1e6)
                    row(attack, usual, configuration, f"{attack}-{count}-{configuration}")
            holding = sorted([by_id[0], *by_id[PEERS - count + 1 :]])
            for attack in (a for a in args.attacks if a != "garbage"):  # garbage peers take the part by design
                row(attack, holding, "open", f"{attack}-{count}-reducer")
    finally:
        for proc in workers:
            kill_worker(proc)
    print()
    print(format_table(rows, list(rows[0])))
    percent = {
        model: {c: {u: round(100 * (r - 1), 1) for u, r in units.items()} for c, units in o.items() if c != "ms"}
        for model, o in overheads.items()
    }
    described = {"mlp": f"the {args.hidden}-wide MLP", "lm": "bench/train.py's language model (2.5M values)"}
    repeats = {"mlp": args.clean_repeats, "lm": args.lm_repeats}
    for model, o in percent.items():
        for c in ("open, no audits", "open"):
            path = "CenteredClip, verified reducers" + (", audits" if c == "open" else "")
            print(
                f"robust path ({path}) overhead on a clean run of {described[model]}: {o[c]['step ms']:+.1f}% per "
                f"training step, {o[c]['round ms']:+.1f}% per averaging round (median of {repeats[model]} repeats; "
                f"rounds of {overheads[model]['ms']['trusted']:.1f} -> {overheads[model]['ms'][c]:.1f} ms)"
            )
    payload = {"peers": PEERS, "steps": args.steps, "lr": LR, "codec": "int8", "hidden": args.hidden, "rows": rows}
    payload.update(audit_rate=args.audit_rate, lm_steps=LM_STEPS, lm_lr=LM_LR, overhead_percent=percent)
    path = write_results("byzantine", payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
