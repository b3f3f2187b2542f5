"""A training peer written the obvious way: a fast loop fitting Linear(32, 1) with hiveengine.Optimizer.

Usage: regression_peer.py JSON, with keys mode, target, epochs, init_seed, data_seed and optionally codec,
client_mode, auxiliary, initial_peer. Prints "DHT <address>", "READY", waits for a line on stdin, then trains
with no delay until `epochs`, printing "EPOCH <n> <digest> <samples this peer contributed to epoch n-1>" on
each new epoch and "DONE <json>" at the end; then keeps stepping (so the others can finish) until stdin closes.
"""

import hashlib
import json
import logging
import os
import sys
import threading

import torch

from hiveengine.dht import DHT
from hiveengine.optim import Optimizer

BATCH = 16
FEATURES = 32


def digest(params) -> str:
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:16]


def main() -> None:
    plan = json.loads(sys.argv[1])
    if os.environ.get("PEER_LOG"):
        logging.basicConfig(level=os.environ["PEER_LOG"])
    dht = DHT(initial_peers=[plan["initial_peer"]] if plan.get("initial_peer") else [])
    print("DHT", dht.address, flush=True)
    torch.manual_seed(plan["init_seed"])
    model = torch.nn.Linear(FEATURES, 1)
    opt = Optimizer(
        dht=dht,
        run_id="regression",
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        batch_size_per_step=BATCH,
        target_batch_size=plan["target"],
        mode=plan["mode"],
        codec=plan.get("codec", "none"),
        client_mode=plan.get("client_mode", False),
        auxiliary=plan.get("auxiliary", False),
        matchmaking_time=2.0,
        progress_interval=0.2,
        averaging_timeout=20,
    )
    print("READY", flush=True)
    sys.stdin.readline()
    closed = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), closed.set()), daemon=True).start()
    gen = torch.Generator().manual_seed(plan["data_seed"])
    true_w = torch.linspace(-1, 1, FEATURES)
    losses, epoch, done = [], opt.epoch, False
    while not closed.is_set():
        x = torch.randn(BATCH, FEATURES, generator=gen)
        y = x @ true_w + 0.5
        loss = torch.nn.functional.mse_loss(model(x).squeeze(-1), y)
        loss.backward()
        before = opt.samples
        opt.step(loss=loss)
        opt.zero_grad()
        losses.append(loss.item())
        if opt.epoch != epoch:
            contributed = -1 if opt.epoch != epoch + 1 else 0 if opt.auxiliary else before + BATCH
            epoch = opt.epoch
            print("EPOCH", epoch, digest(model.parameters()), contributed, flush=True)
        if epoch >= plan["epochs"] and not done:
            done = True
            summary = {"rounds": opt.rounds, "first": losses[:10], "last": losses[-10:], "epoch": epoch}
            print("DONE", json.dumps(summary), flush=True)
    opt.shutdown()
    dht.shutdown()


if __name__ == "__main__":
    main()
