"""A model whose middle layer is a Mixture-of-Experts served by other machines (`hiveengine serve`).

The model keeps its input projection, the gating network and its output head locally; the experts live on
expert servers, found in the DHT by beam search. Each training step sends every chosen expert one batch of
rows, and the servers update their experts' weights on the backward pass, so every client that uses the same
experts trains them together. An expert that fails or times out is dropped from that step and the gating
weights of the others are renormalized.

Start an expert server (it prints the DHT address to join), then train against it:

    hiveengine serve --expert-cls ffn --expert-pattern "ffn.[0:4].[0:4]" --hidden-dim 256 --device cpu
    hiveengine launch --initial-peers ADDR examples/moe/train.py --grid 4 4 --hidden-dim 256

The task is synthetic (nothing to download): classify points by a fixed random "teacher" network.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
import torch.nn.functional as F
from torch import nn

import hiveengine
from hiveengine.moe import RemoteMixtureOfExperts, get_experts


class MoEClassifier(nn.Module):
    def __init__(self, features: int, hidden: int, classes: int, grid: list[int], dht: hiveengine.DHT, k_best: int):
        super().__init__()
        self.stem = nn.Linear(features, hidden)
        self.experts = RemoteMixtureOfExperts(
            hidden, grid_size=grid, uid_prefix="ffn.", k_best=k_best, forward_timeout=10, backward_timeout=10, dht=dht
        )
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        return self.head(h + self.experts(h))  # a residual around the remote layer


def wait_for_experts(dht: hiveengine.DHT, grid: list[int], timeout: float) -> int:
    """Wait until at least one expert of the grid is declared in the DHT; return how many are."""
    uids = ["ffn." + ".".join(map(str, c)) for c in itertools.product(*(range(n) for n in grid))]
    deadline = time.monotonic() + timeout
    while True:
        found = sum(address is not None for address in get_experts(dht, uids).values())
        if found or time.monotonic() > deadline:
            return found
        time.sleep(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden-dim", type=int, default=256, help="must match the servers' --hidden-dim")
    parser.add_argument("--grid", type=int, nargs="+", default=[4, 4], help="expert grid: 4 4 is ffn.[0:4].[0:4]")
    parser.add_argument("--k-best", type=int, default=4, help="experts per sample")
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3, help="of the local layers (the servers have their own)")
    args = parser.parse_args()

    engine = hiveengine.init()  # joins the DHT given by `hiveengine launch --initial-peers ADDR`
    found = wait_for_experts(engine.dht, args.grid, timeout=60)
    if not found:
        raise SystemExit("no expert of the grid is declared in the DHT: start `hiveengine serve` and pass its address")
    print(f"found {found} expert(s) in the DHT", flush=True)

    gen = torch.Generator().manual_seed(0)  # the teacher is the same for every client
    teacher = nn.Sequential(nn.Linear(args.features, 64), nn.Tanh(), nn.Linear(64, args.classes))
    for p in teacher.parameters():
        p.data = torch.randn(p.shape, generator=gen)
    test_x = torch.randn(512, args.features, generator=gen)
    with torch.no_grad():
        test_y = teacher(test_x).argmax(1)

    torch.manual_seed(engine.local_rank)
    model = MoEClassifier(args.features, args.hidden_dim, args.classes, args.grid, engine.dht, args.k_best)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)  # local layers only: experts train on their servers

    def evaluate() -> tuple[float, float]:
        with torch.no_grad():
            logits = model(test_x)
        return F.cross_entropy(logits, test_y).item(), (logits.argmax(1) == test_y).float().mean().item()

    start_loss, _ = evaluate()
    data = torch.Generator().manual_seed(100 + engine.local_rank)
    for step in range(1, args.steps + 1):
        x = torch.randn(args.batch, args.features, generator=data)
        with torch.no_grad():
            y = teacher(x).argmax(1)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()  # also sends the gradients to the experts, whose servers step their optimizers
        opt.step()
        if step % 50 == 0:
            print(f"step {step}: loss {loss.item():.3f}", flush=True)
    end_loss, accuracy = evaluate()
    print(f"done: held-out loss {start_loss:.3f} -> {end_loss:.3f}, accuracy {100 * accuracy:.1f}%", flush=True)
    engine.shutdown()


if __name__ == "__main__":
    main()
