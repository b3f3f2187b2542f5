"""hivemind's side of bench/moe.py --compare hivemind (runs in hivemind's own venv, never ours).

`server`: reads {"hidden", "uids", "threads", "update_period"} on stdin, starts hivemind.moe.Server with those ffn
experts, prints "MADDRS <json>" and serves until stdin closes. `client`: reads a plan (see bench/moe.py) on stdin and
runs `timed_steps`, which bench/moe.py's own clients share (so this module imports hivemind only inside functions).
"""

import json
import sys
import time
from collections.abc import Callable

NUM_HANDLERS = 4  # hivemind's default (8 per expert) starts 128 processes for 16 experts on this 2-core host
CALL_TIMEOUT = 300.0


def timed_steps(step: Callable[[], None], plan: dict) -> None:
    """Warm up (at least the plan's `warmup` steps and `warmup_seconds`, so buffers, connections and the server's
    batch shapes are in place), print READY, wait for a line on stdin (all clients start together), run `step`
    for the plan's duration and print "RESULT {samples, seconds}"."""
    start = time.perf_counter()
    steps = 0
    while steps < plan["warmup"] or time.perf_counter() - start < plan["warmup_seconds"]:
        step()
        steps += 1
    print("READY", flush=True)
    sys.stdin.readline()
    start = time.perf_counter()
    steps = 0
    while steps == 0 or time.perf_counter() - start < plan["duration"]:
        step()
        steps += 1
    elapsed = time.perf_counter() - start
    print("RESULT", json.dumps({"samples": steps * plan["batch"], "seconds": elapsed}), flush=True)


def server() -> None:
    import torch
    from hivemind.moe import Server

    plan = json.loads(sys.stdin.readline())
    torch.set_num_threads(plan["threads"])
    srv = Server.create(
        expert_uids=plan["uids"],
        expert_cls="ffn",
        hidden_dim=plan["hidden"],
        num_handlers=NUM_HANDLERS,
        device="cpu",
        update_period=plan["update_period"],
        start=True,
    )
    print("MADDRS", json.dumps([str(a) for a in srv.dht.get_visible_maddrs()]), flush=True)
    sys.stdin.read()
    srv.shutdown()


def client() -> None:
    import hivemind
    import torch
    from hivemind.moe import RemoteMixtureOfExperts, get_experts

    plan = json.loads(sys.stdin.readline())
    torch.set_num_threads(plan["threads"])
    dht = hivemind.DHT(initial_peers=plan["initial_peers"], client_mode=True, start=True)
    if plan["mode"] == "expert":
        (model,) = get_experts(dht, [plan["uid"]])
    else:
        model = RemoteMixtureOfExperts(
            in_features=plan["hidden"],
            grid_size=tuple(plan["grid"]),
            dht=dht,
            uid_prefix=plan["uid_prefix"],
            k_best=plan["k_best"],
            forward_timeout=CALL_TIMEOUT,
            backward_timeout=CALL_TIMEOUT,
        )
    x = torch.randn(plan["batch"], plan["hidden"], requires_grad=True)
    timed_steps(lambda: model(x).sum().backward(), plan)
    dht.shutdown()


if __name__ == "__main__":
    {"server": server, "client": client}[sys.argv[1]]()
