"""A worker script for `hiveengine launch` tests. Usage: launch_worker.py train|wait|fail.

Prints "RANK <rank> <world size> <pid>" first. train: three sync epochs of a tiny regression through
hiveengine.init() and engine.optimizer(), then "DONE <epoch> <parameter digest>". wait: prints
"READY <pid>" and blocks until signalled. fail: worker 1 exits with code 3, the others with 0.
"""

import hashlib
import os
import sys
import threading

import torch

import hiveengine


def main() -> None:
    engine = hiveengine.init()
    print("RANK", engine.local_rank, engine.local_world_size, os.getpid(), flush=True)
    mode = sys.argv[1]
    if mode == "fail":
        sys.exit(3 if engine.local_rank == 1 else 0)
    if mode == "wait":
        print("READY", os.getpid(), flush=True)
        threading.Event().wait()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = engine.optimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        batch_size_per_step=8,
        target_batch_size=64,
        codec="none",
        matchmaking_time=1.0,
        progress_interval=0.05,
        expected_swarm_size=engine.local_world_size,
    )
    assert opt.wait_for_peers(engine.local_world_size, timeout=60) >= engine.local_world_size
    gen = torch.Generator().manual_seed(engine.local_rank)
    while opt.epoch < 3:
        x = torch.randn(8, 4, generator=gen)
        torch.nn.functional.mse_loss(model(x), x.sum(-1, keepdim=True)).backward()
        opt.step()
        opt.zero_grad()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    print("DONE", opt.epoch, hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:16], opt.rounds, flush=True)
    opt.shutdown()
    engine.shutdown()


if __name__ == "__main__":
    main()
