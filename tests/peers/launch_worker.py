"""A worker script for `hiveengine launch` tests. Usage: launch_worker.py [--]MODE [ARGS...].

Prints "RANK <rank> <world size> <pid> <args after MODE>" first. Modes:
- train: three sync epochs of a tiny regression through hiveengine.init() and engine.optimizer(), each
  worker starting from its own random model (as an unseeded script would), then "DONE <epoch> <parameter digest>";
- wait: prints "READY <pid>" and blocks until signalled (a KeyboardInterrupt ends it with a traceback);
- quiet-wait: the same, but catches KeyboardInterrupt, prints "INTERRUPTED" and ends without shutting anything
  down itself (what is left is hiveengine's to close at exit);
- stubborn: ignores SIGINT and SIGTERM, prints "READY <pid>" and blocks (only SIGKILL ends it);
- fail: worker 1 exits with code 3, the others with 0;
- fail-fast: worker 1 exits with code 3, the others print "READY <pid>" and block;
- join KEY: prints "JOINED <value>" of KEY in the swarm's DHT (stored by the test before the launch);
- env: prints "ENV <OMP_NUM_THREADS> <HIVEENGINE_SPIN_US>" as the worker sees them ("-" where unset);
- exit: ends at once.
"""

import hashlib
import os
import signal
import sys
import threading

import torch

import hiveengine


def block() -> None:
    print("READY", os.getpid(), flush=True)
    threading.Event().wait()


def main() -> None:
    engine = hiveengine.init()
    mode = sys.argv[1].removeprefix("--")  # "--join" as well: an option-like first argument for `launch -m`
    print("RANK", engine.local_rank, engine.local_world_size, os.getpid(), *sys.argv[2:], flush=True)
    if mode == "exit":
        return
    if mode == "env":
        print("ENV", os.environ.get("OMP_NUM_THREADS", "-"), os.environ.get("HIVEENGINE_SPIN_US", "-"), flush=True)
        return
    if mode in ("fail", "fail-fast") and engine.local_rank == 1:
        sys.exit(3)
    if mode == "fail":
        sys.exit(0)
    if mode == "join":
        found = engine.dht.get(sys.argv[2], timeout=30)
        print("JOINED", found.value if found is not None else None, flush=True)
        return
    if mode == "stubborn":
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if mode == "quiet-wait":
        try:
            block()
        except KeyboardInterrupt:
            print("INTERRUPTED", flush=True)
        return
    if mode in ("wait", "stubborn", "fail-fast"):
        block()
    torch.manual_seed(engine.local_rank)
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
