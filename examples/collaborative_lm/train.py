"""Collaborative training of a small byte-level language model on Python's own source code.

Every peer trains the same transformer on random windows of the standard library's .py files (no download:
the data is already on every machine with Python). The swarm takes one optimizer step per
`--target-batch-size` samples, whoever computed them, averaging gradients with the int8 codec.

    hiveengine launch --nproc 2 examples/collaborative_lm/train.py          # a swarm on this machine
    hiveengine launch --initial-peers ADDR examples/collaborative_lm/train.py  # join it from another one
"""

from __future__ import annotations

import argparse
import math
import os
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import hiveengine


def load_corpus(max_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The standard library's source as bytes, split 95/5 into training and held-out text."""
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


class Block(nn.Module):
    """A pre-norm transformer block: causal self-attention, then an MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class ByteLM(nn.Module):
    def __init__(self, dim: int, layers: int, heads: int, seq: int):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(256, dim), nn.Embedding(seq, dim)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(layers)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 256)

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        inputs, targets = batch[:, :-1], batch[:, 1:]
        x = self.tokens(inputs) + self.positions(torch.arange(inputs.shape[1]))
        logits = self.head(self.norm(self.blocks(x)))
        return F.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1))


def windows(data: torch.Tensor, count: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - seq - 1, (count,), generator=gen).tolist()
    return torch.stack([data[s : s + seq + 1] for s in starts])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64, help="bytes of context")
    parser.add_argument("--batch", type=int, default=16, help="sequences per local step")
    parser.add_argument("--target-batch-size", type=int, default=256, help="samples per swarm step")
    parser.add_argument("--epochs", type=int, default=200, help="swarm steps to train for")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--codec", default="int8", help="gradient codec: none, fp16, bf16, int8, int4")
    parser.add_argument("--corpus-mib", type=float, default=4.0, help="how much of the stdlib source to read")
    parser.add_argument("--wait-for-peers", type=int, default=None, help="peers to wait for (default: --nproc)")
    parser.add_argument("--checkpoint", default=None, help="resume from / save to this file")
    args = parser.parse_args()

    engine = hiveengine.init()  # the swarm `hiveengine launch` describes (a lone peer without a launcher)
    rank = engine.local_rank
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // engine.local_world_size))
    train, heldout = load_corpus(int(args.corpus_mib * 2**20))

    torch.manual_seed(0)  # not required (peers that start apart are made identical), but saves a state round
    model = ByteLM(args.dim, args.layers, args.heads, args.seq)
    opt = engine.optimizer(
        torch.optim.AdamW(model.parameters(), lr=args.lr),
        batch_size_per_step=args.batch,
        target_batch_size=args.target_batch_size,
        codec=args.codec,
    )
    if args.checkpoint and os.path.exists(args.checkpoint):
        opt.load(args.checkpoint)
        print(f"resumed from {args.checkpoint} at epoch {opt.epoch}", flush=True)
    opt.wait_for_peers(args.wait_for_peers or engine.local_world_size, timeout=120)

    eval_batch = windows(heldout, 64, args.seq, torch.Generator().manual_seed(1234))

    def heldout_loss() -> float:
        with torch.no_grad():
            return model.loss(eval_batch).item()

    start_loss, gen = heldout_loss(), torch.Generator().manual_seed(1000 + rank + 100 * os.getpid())
    last_epoch, started = opt.epoch, time.monotonic()
    while opt.epoch < args.epochs:
        loss = model.loss(windows(train, args.batch, args.seq, gen))
        loss.backward()
        opt.step(loss=loss)  # averages with the swarm once it reached the target batch size
        opt.zero_grad()
        if opt.epoch != last_epoch:
            last_epoch = opt.epoch
            speed = opt.swarm.samples_per_second
            print(f"epoch {opt.epoch}: loss {loss.item():.3f}, {opt.swarm.size} peer(s), {speed:.0f} samples/s")
    end_loss = heldout_loss()
    print(f"done in {time.monotonic() - started:.0f} s: held-out loss {start_loss:.3f} -> {end_loss:.3f}")
    print(f"(bits per byte {end_loss / math.log(2):.2f})", flush=True)
    if args.checkpoint and rank == 0:
        opt.save(args.checkpoint)
    engine.shutdown()


if __name__ == "__main__":
    main()
