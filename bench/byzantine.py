"""Byzantine-tolerance benchmark: 8 peers train one small model, 1 and then 3 of them attack the averaging.

Each peer is a process (`python bench/byzantine.py --worker`). In every step each peer computes its gradient
on its own minibatch of a synthetic classification task (a fixed random teacher labels Gaussian inputs), the
group averages the gradients with one butterfly all-reduce (run_allreduce over UCX, int8 with error feedback,
the Optimizer's default codec), and every peer applies the aggregate with SGD. Byzantine peers send instead:
`scale` (gradient x1000), `sign` (gradient x-1), `noise` (Gaussian noise 100x the gradient's norm), `alie`
("a little is enough", Baruah et al. 2019: the honest mean minus one standard deviation per coordinate,
estimated from several of its own minibatches, as colluding attackers would). The table gives the held-out
loss of an honest peer after the same steps, against the clean run with the same aggregation, and the
robust path's time overhead on a clean run (CenteredClip vs the plain mean, per averaging round).
Writes bench/results/local/byzantine.json (see bench/common.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
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
ATTACKS = ["scale", "sign", "noise", "alie"]
BYZANTINE_COUNTS = [1, 3]
STEPS = 40
BATCH = 32
LR = 0.2
FEATURES, HIDDEN, CLASSES = 32, 64, 8
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


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))


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
    if attack == "alie":
        samples = [honest]
        for k in range(1, ALIE_BATCHES):
            samples.append(gradient(model, *teacher_data(10**6 + rank * 10**4 + step * 10 + k, BATCH)))
        stacked = torch.stack(samples)
        return stacked.mean(0) - stacked.std(0)
    raise ValueError(f"unknown attack {attack!r}")


def worker() -> None:
    from hiveengine.averaging import AllReduceService, GroupInfo, GroupMember, RoundOptions, run_allreduce
    from hiveengine.codec import Aggregation, get_codec
    from hiveengine.transport import Peer, PeerID

    torch.set_num_threads(1)  # 8 workers share this host's cores
    peer = Peer()
    service = AllReduceService.of(peer)
    print("ADDRESS", peer.address, flush=True)
    for line in sys.stdin:
        plan = json.loads(line)
        members = tuple(GroupMember(PeerID.from_string(a.rsplit("/", 1)[1]), a) for a in plan["addresses"])
        rank, attack = plan["rank"], plan["attack"] if plan["rank"] in plan["byzantine"] else None
        codec = get_codec("int8")
        options = RoundOptions(timeout=30, aggregation=Aggregation(plan["aggregation"]))
        model = make_model()
        residual = None
        averaging = 0.0
        for step in range(STEPS):
            x, y = teacher_data(rank * 10**4 + step, BATCH)
            flat = gradient(model, x, y)
            if not bool(torch.isfinite(flat).all()):  # diverged: every peer applied the same aggregate, so all stop
                break
            if attack is not None:
                flat = attacked(attack, model, rank, step, flat)
            residual = torch.zeros_like(flat) if residual is None else residual
            group = GroupInfo(hashlib.sha256(f"{plan['run']}/{step}".encode()).digest()[:16], members)
            started = time.perf_counter()
            peer.runtime.run(run_allreduce(service, group, flat, codec, residual=residual, options=options), 60)
            averaging += time.perf_counter() - started
            with torch.no_grad():
                offset = 0
                for p in model.parameters():
                    p -= LR * flat[offset : offset + p.numel()].view_as(p)
                    offset += p.numel()
        with torch.no_grad():
            x, y = teacher_data(-1, HELDOUT)
            loss = float(F.cross_entropy(model(x), y))
        print("RESULT", json.dumps({"loss": loss, "averaging_s": averaging}), flush=True)


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
    parser.add_argument("--byzantine", nargs="+", type=int, default=BYZANTINE_COUNTS)
    parser.add_argument("--clean-repeats", type=int, default=2, help="clean runs per aggregation (for the overhead)")
    args = parser.parse_args()
    if args.worker:
        worker()
        return
    workers = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for _ in range(PEERS)
    ]
    try:
        addresses = [read_prefixed(proc, "ADDRESS", LINE_TIMEOUT) for proc in workers]
        rows, clean, overhead = [], {}, {}
        for aggregation in ("mean", "centered_clip"):
            times = []
            for repeat in range(args.clean_repeats):
                results = run(
                    workers,
                    addresses,
                    f"clean-{aggregation}-{repeat}",
                    attack=None,
                    byzantine=[],
                    aggregation=aggregation,
                )
                clean[aggregation] = results[0]["loss"]
                times.append(max(r["averaging_s"] for r in results) / STEPS)
            overhead[aggregation] = statistics.median(times)
            rows.append(
                {
                    "attack": "none",
                    "byzantine": 0,
                    "aggregation": aggregation,
                    "loss": clean[aggregation],
                    "vs clean %": 0.0,
                    "round ms": 1e3 * overhead[aggregation],
                }
            )
            print(format_table(rows[-1:], list(rows[-1])), flush=True)
        for count in args.byzantine:
            byzantine = list(range(PEERS - count, PEERS))
            for attack in args.attacks:
                for aggregation in ("mean", "centered_clip"):
                    results = run(
                        workers,
                        addresses,
                        f"{attack}-{count}-{aggregation}",
                        attack=attack,
                        byzantine=byzantine,
                        aggregation=aggregation,
                    )
                    loss = results[0]["loss"]
                    rows.append(
                        {
                            "attack": attack,
                            "byzantine": count,
                            "aggregation": aggregation,
                            "loss": loss,
                            "vs clean %": 100 * (loss / clean["mean"] - 1),
                            "round ms": 1e3 * max(r["averaging_s"] for r in results) / STEPS,
                        }
                    )
                    print(format_table(rows[-1:], list(rows[-1])), flush=True)
    finally:
        for proc in workers:
            kill_worker(proc)
    robust_overhead = 100 * (overhead["centered_clip"] / overhead["mean"] - 1)
    columns = ["attack", "byzantine", "aggregation", "loss", "vs clean %", "round ms"]
    print()
    print(format_table(rows, columns))
    print(
        f"robust path overhead on a clean run: {robust_overhead:+.1f}% per averaging round "
        f"({1e3 * overhead['mean']:.1f} -> {1e3 * overhead['centered_clip']:.1f} ms)"
    )
    path = write_results(
        "byzantine",
        {"peers": PEERS, "steps": STEPS, "codec": "int8", "rows": rows, "robust_overhead_percent": robust_overhead},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
