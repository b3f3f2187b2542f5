"""A training peer for the NAT rig, joined the way a volunteer joins: `hiveengine.init` (reachability, client
mode and a relay slot chosen by the engine) and `engine.optimizer(...)`, fitting Linear(32, 1).

Usage: nat_trainer.py MODE EPOCHS [INITIAL_PEER]. Prints "DHT <address>", "ENGINE <json: client_mode, relayed,
averaging_client_mode>", "READY", waits for a line on stdin, trains until EPOCHS printing "EPOCH <n> <digest>" on each
new epoch and "DONE <json: rounds, held-out loss before and after, parts reduced, whether it shares state>" at the
end, then keeps stepping (so the others can finish) until stdin closes.
"""

import hashlib
import json
import sys
import threading

import torch

import hiveengine

BATCH = 16
FEATURES = 32


def digest(params) -> str:
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:16]


def main() -> None:
    mode, epochs = sys.argv[1], int(sys.argv[2])
    engine = hiveengine.init(initial_peers=sys.argv[3:4])
    print("DHT", engine.address, flush=True)
    found = {
        "client_mode": engine.client_mode,
        "relayed": bool(engine.dht.peer.relayed),
        "averaging_client_mode": engine.averaging_client_mode,
    }
    print("ENGINE", json.dumps(found), flush=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(FEATURES, 1)
    opt = engine.optimizer(
        torch.optim.SGD(model.parameters(), lr=0.05),
        batch_size_per_step=BATCH,
        target_batch_size=128,
        mode=mode,
        codec="none",
        inner_steps=8,
        matchmaking_time=2.0,
        progress_interval=0.2,
        averaging_timeout=20,
    )
    print("READY", flush=True)
    sys.stdin.readline()
    closed = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), closed.set()), daemon=True).start()
    gen = torch.Generator().manual_seed(10 + engine.dht.peer_id.raw[0])
    true_w = torch.linspace(-1, 1, FEATURES)
    held_out = torch.randn(256, FEATURES, generator=torch.Generator().manual_seed(999))

    def evaluate() -> float:
        with torch.no_grad():
            return torch.nn.functional.mse_loss(model(held_out).squeeze(-1), held_out @ true_w + 0.5).item()

    before, epoch, done = evaluate(), opt.epoch, False
    while not closed.is_set():
        x = torch.randn(BATCH, FEATURES, generator=gen)
        loss = torch.nn.functional.mse_loss(model(x).squeeze(-1), x @ true_w + 0.5)
        loss.backward()
        opt.step(loss=loss)
        opt.zero_grad()
        if opt.epoch != epoch:
            epoch = opt.epoch
            print("EPOCH", epoch, digest(model.parameters()), flush=True)
        if epoch >= epochs and not done:
            done = True
            summary = {
                "rounds": opt.rounds,
                "loss_before": before,
                "loss_after": evaluate(),
                "epoch": epoch,
                "parts_reduced": opt.grad_averager.service.parts_reduced,
                "shares_state": opt.state_averager.allow_state_sharing,
            }
            print("DONE", json.dumps(summary), flush=True)
    engine.shutdown()


if __name__ == "__main__":
    main()
