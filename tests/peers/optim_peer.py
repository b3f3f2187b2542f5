"""A real training peer for Optimizer tests: fits a small regression with hiveengine.Optimizer.

Usage: optim_peer.py MODE CODEC DATA_SEED EPOCHS [INITIAL_PEER]. Every peer builds the same model (seed 0)
and draws its own batches (DATA_SEED). Prints "DHT <address>", "READY" once its optimizer is up, then waits
for a line on stdin before training (so peers start together), prints "EPOCH <n> <sha256 of the parameters>"
on reaching each epoch, "DONE <json>" after EPOCHS, then serves its state until stdin closes.
EPOCHS=0: only load state and report. STEP_SECONDS (environment, default 0): seconds each step takes on top of
its computation, standing in for a larger model (bench/swarm_attacks.py). WEIGHT_FACTOR (environment): an
attacker's, its gradients' averaging weight is its samples times this (its progress reports stay true). DONE
gives "me" (its averager's peer id) and "clipped": the senders whose weight it clipped to their signed progress.
"""

import hashlib
import json
import logging
import os
import sys
import time

import torch

from hiveengine.dht import DHT
from hiveengine.optim import Optimizer

BATCH = 16
TRUE_WEIGHTS = torch.tensor([1.0, -2.0, 3.0, 0.5, 0.0, -1.0, 2.0, 1.5])


def digest(params) -> str:
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:16]


class Clipped(logging.Handler):
    """The senders whose weight this peer's reducer clipped to what their signed progress allows."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.senders: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        if "clipped" in record.msg and "signed progress" in record.msg:
            self.senders.add(str(record.args[0]))


def inflate(opt: Optimizer, factor: float) -> None:
    """Make `opt` average its gradients with `factor` times the weight its samples give (an attacker)."""
    step = opt.grad_averager.step
    opt.grad_averager.step = lambda weight, *args, **kwargs: step(weight * factor, *args, **kwargs)


def main() -> None:
    if os.environ.get("PEER_LOG"):
        logging.basicConfig(level=os.environ["PEER_LOG"])
    clipped = Clipped()
    logging.getLogger("hiveengine.averaging.allreduce").addHandler(clipped)
    mode, codec, data_seed, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    dht = DHT(initial_peers=sys.argv[5:6])
    print("DHT", dht.address, flush=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    inner = torch.optim.Adam(model.parameters(), lr=0.01)
    opt = Optimizer(
        dht=dht,
        run_id="test-train",
        optimizer=inner,
        batch_size_per_step=BATCH,
        target_batch_size=128 if mode == "sync" else None,
        mode=mode,
        codec=codec,
        inner_steps=20,
        outer_lr=float(os.environ.get("OUTER_LR", "0.7")),
        matchmaking_time=1.0,
        progress_interval=0.05,
        averaging_timeout=20,
    )
    if os.environ.get("WEIGHT_FACTOR"):
        inflate(opt, float(os.environ["WEIGHT_FACTOR"]))
    print("READY", flush=True)
    sys.stdin.readline()
    gen = torch.Generator().manual_seed(data_seed)
    seen, losses = opt.epoch, []
    step_seconds = float(os.environ.get("STEP_SECONDS", "0"))
    print("EPOCH", opt.epoch, digest(model.parameters()), flush=True)
    while opt.epoch < epochs:
        x = torch.randn(BATCH, 8, generator=gen)
        y = (x @ TRUE_WEIGHTS).tanh().unsqueeze(-1)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        time.sleep(step_seconds)  # the compute of a larger model
        opt.step(loss=loss)
        opt.zero_grad()
        losses.append(loss.item())
        if opt.epoch != seen:
            seen = opt.epoch
            print("EPOCH", seen, digest(model.parameters()), flush=True)
    done = {"rounds": opt.rounds, "first_loss": losses[:10], "last_loss": losses[-10:], "epoch": opt.epoch}
    done["suspects"] = sorted(opt.attendance.suspects())
    done["me"], done["clipped"] = str(opt.grad_averager.peer.peer_id), sorted(clipped.senders)
    print("DONE", json.dumps(done), flush=True)
    sys.stdin.read()
    opt.shutdown()
    dht.shutdown()


if __name__ == "__main__":
    main()
