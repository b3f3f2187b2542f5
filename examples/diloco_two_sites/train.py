"""DiLoCo across two "sites": each site runs its own launch, and the two swarms join into one.

DiLoCo (Douillard et al., 2023) suits peers joined by slow links: every peer takes `--inner-steps` local
AdamW steps, then the swarm averages the change each peer made (the pseudo-gradient, int4-quantized here)
and applies it with an outer Nesterov step. Peers talk once per outer step instead of once per batch.

Site A (prints the address to join with):

    hiveengine launch --nproc 2 examples/diloco_two_sites/train.py --wait-for-peers 4

Site B, on another machine (or another terminal):

    hiveengine launch --nproc 2 --initial-peers ADDR examples/diloco_two_sites/train.py --wait-for-peers 4

The model predicts the next byte of Python's own source code from the previous `--context` bytes.
"""

from __future__ import annotations

import argparse
import os
import socket
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import hiveengine


def load_corpus(max_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The standard library's source as bytes (the same on every machine with this Python), split 95/5."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for path in sorted(stdlib.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        chunks.append(path.read_bytes())
        size += len(chunks[-1])
        if size >= max_bytes:
            break
    data = torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).long()
    cut = int(0.95 * len(data))
    return data[:cut], data[cut:]


class NextByte(nn.Module):
    """Embeds the last `context` bytes and predicts the next one with an MLP."""

    def __init__(self, context: int, dim: int, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(256, dim)
        self.mlp = nn.Sequential(nn.Linear(context * dim, hidden), nn.GELU(), nn.Linear(hidden, 256))

    def loss(self, windows: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.mlp(self.embed(windows[:, :-1]).flatten(1)), windows[:, -1])


def sample(data: torch.Tensor, count: int, context: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - context - 1, (count,), generator=gen)
    return data[starts[:, None] + torch.arange(context + 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=16, help="bytes the model sees")
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--inner-steps", type=int, default=100, help="local steps per outer step (H)")
    parser.add_argument("--outer-steps", type=int, default=20, help="outer steps to train for")
    parser.add_argument("--lr", type=float, default=3e-3, help="inner AdamW learning rate")
    parser.add_argument("--outer-lr", type=float, default=0.7)
    parser.add_argument("--codec", default="int4", help="pseudo-gradient codec: none, fp16, bf16, int8, int4")
    parser.add_argument("--corpus-mib", type=float, default=4.0)
    parser.add_argument("--wait-for-peers", type=int, default=None, help="peers of both sites to wait for")
    args = parser.parse_args()

    engine = hiveengine.init()
    site, rank = socket.gethostname(), engine.local_rank
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // engine.local_world_size))
    train, heldout = load_corpus(int(args.corpus_mib * 2**20))

    torch.manual_seed(0)
    model = NextByte(args.context, args.dim, args.hidden)
    opt = engine.optimizer(
        torch.optim.AdamW(model.parameters(), lr=args.lr),
        mode="diloco",
        inner_steps=args.inner_steps,  # an outer step when the swarm has done this many steps per peer on average
        outer_lr=args.outer_lr,
        batch_size_per_step=args.batch,
        codec=args.codec,
    )
    peers = opt.wait_for_peers(args.wait_for_peers or engine.local_world_size, timeout=300)
    print(f"{site} worker {rank}: training with {peers} peer(s)", flush=True)

    eval_windows = sample(heldout, 2048, args.context, torch.Generator().manual_seed(1234))

    def heldout_loss() -> float:
        with torch.no_grad():
            return model.loss(eval_windows).item()

    start_loss = heldout_loss()
    gen = torch.Generator().manual_seed(os.getpid())  # every peer reads its own windows
    while opt.epoch < args.outer_steps:
        epoch = opt.epoch
        loss = model.loss(sample(train, args.batch, args.context, gen))
        loss.backward()
        opt.step(loss=loss)  # an inner step; every inner_steps, the outer step with the swarm
        opt.zero_grad()
        if opt.epoch != epoch:
            print(f"outer step {opt.epoch}: held-out loss {heldout_loss():.3f}, {opt.swarm.size} peers", flush=True)
    end_loss = heldout_loss()
    megabytes = opt.bytes_averaged / 1e6
    print(f"done: held-out loss {start_loss:.3f} -> {end_loss:.3f}, {megabytes:.1f} MB averaged", flush=True)
    engine.shutdown()


if __name__ == "__main__":
    main()
