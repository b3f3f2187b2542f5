"""Experts across the NAT rig: `serve INITIAL_PEER` joins with `hiveengine.init` (a home peer reserves a relay slot)
and serves ffn expert "nat.0" (hidden 16, seed 0), declared in the DHT at its own, relayed, address; prints
"ADDRESS <server address>". `call INITIAL_PEER` finds "nat.0" in the DHT, runs forward and backward through it and
prints "RESULT <json: address, whether outputs and input gradients equal a local copy's>"."""

import json
import sys

import torch

import hiveengine
from hiveengine.moe import Server, get_remote_experts
from hiveengine.moe.server.experts import get_expert_class

UID, HIDDEN = "nat.0", 16


def main() -> None:
    engine = hiveengine.init(initial_peers=sys.argv[2:3])
    if sys.argv[1] == "serve":
        server = Server.create("ffn", [UID], HIDDEN, seed=0, dht=engine.dht)
        print("ADDRESS", server.address, flush=True)
        sys.stdin.read()
        server.shutdown()
    else:
        (expert,) = get_remote_experts(engine.dht, [UID])
        local = get_expert_class("ffn").build(HIDDEN, 0)
        x = torch.randn(4, HIDDEN, requires_grad=True)
        x_local = x.detach().clone().requires_grad_()
        y, y_local = expert(x), local(x_local)
        y.square().sum().backward()
        y_local.square().sum().backward()
        result = {
            "address": expert.address,
            "forward": torch.allclose(y, y_local, atol=1e-5),
            "backward": torch.allclose(x.grad, x_local.grad, atol=1e-5),
        }
        print("RESULT", json.dumps(result), flush=True)
    engine.shutdown()


if __name__ == "__main__":
    main()
