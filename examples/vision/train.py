"""Several peers train a small convolutional network on scikit-learn's bundled handwritten digits.

`sklearn.datasets.load_digits` ships with scikit-learn (1,797 8x8 grayscale images of the digits 0-9), so
nothing is downloaded. Each peer trains on its own shard of the training images; the swarm steps once per
`--target-batch-size` images and every peer ends with the same model.

    pip install scikit-learn
    hiveengine launch --nproc 3 examples/vision/train.py
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from torch import nn

import hiveengine


def load_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, test images, test labels): the last 297 images are the test set."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("this example needs scikit-learn for its bundled data set: pip install scikit-learn") from None
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixels are 0..16
    labels = torch.tensor(digits.target)
    return images[:1500], labels[:1500], images[1500:], labels[1500:]


class DigitNet(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
        )
        self.classifier = nn.Linear(2 * width * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=32, help="channels of the first convolution")
    parser.add_argument("--batch", type=int, default=32, help="images per local step")
    parser.add_argument("--target-batch-size", type=int, default=256, help="images per swarm step")
    parser.add_argument("--epochs", type=int, default=60, help="swarm steps to train for")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--codec", default="int8", help="gradient codec: none, fp16, bf16, int8, int4")
    args = parser.parse_args()

    engine = hiveengine.init()
    rank, peers = engine.local_rank, engine.local_world_size
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // peers))
    train_x, train_y, test_x, test_y = load_data()
    shard = slice(rank, None, peers)  # each local worker its own images (peers on other machines overlap)
    train_x, train_y = train_x[shard], train_y[shard]

    torch.manual_seed(0)
    model = DigitNet(args.width)
    opt = engine.optimizer(
        torch.optim.Adam(model.parameters(), lr=args.lr),
        batch_size_per_step=args.batch,
        target_batch_size=args.target_batch_size,
        codec=args.codec,
    )
    opt.wait_for_peers(peers, timeout=120)

    def evaluate() -> tuple[float, float]:
        with torch.no_grad():
            logits = model(test_x)
            return F.cross_entropy(logits, test_y).item(), (logits.argmax(1) == test_y).float().mean().item()

    start_loss, _ = evaluate()
    gen = torch.Generator().manual_seed(rank)
    while opt.epoch < args.epochs:
        index = torch.randint(0, len(train_x), (args.batch,), generator=gen)
        loss = F.cross_entropy(model(train_x[index]), train_y[index])
        loss.backward()
        epoch = opt.epoch
        opt.step(loss=loss)
        opt.zero_grad()
        if opt.epoch != epoch and opt.epoch % 10 == 0:
            print(f"epoch {opt.epoch}: train loss {loss.item():.3f} ({opt.swarm.size} peers)", flush=True)
    end_loss, accuracy = evaluate()
    print(f"done: held-out loss {start_loss:.3f} -> {end_loss:.3f}, accuracy {100 * accuracy:.1f}%", flush=True)
    engine.shutdown()


if __name__ == "__main__":
    main()
