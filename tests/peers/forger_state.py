"""A hostile state donor for tests/test_catchup.py: advertises and serves its own parameters (all FOREIGN).

Usage: forger_state.py INITIAL_PEER PREFIX MODE. It runs a real DecentralizedAverager whose tensors are all
FOREIGN and signs its advertisements with its own key (the one thing signatures cannot stop). MODE "epoch":
advertises its own state under a huge epoch (the issue's state hijack). MODE "copy": advertises the epoch and
digest that honest peers advertise (a lie) while serving its own tensors. Prints "ADVERTISED",
then "SERVED <snapshots served>" for every line read on stdin; exits when stdin closes.
"""

import sys

import torch

from hiveengine.averaging import DecentralizedAverager
from hiveengine.averaging.state import META_METHOD, advertise, find_sources
from hiveengine.dht import DHT

FOREIGN = 666.0
HUGE_EPOCH = 10**9
WAIT_SECONDS = 60.0


def main() -> None:
    initial, prefix, mode = sys.argv[1:4]
    dht = DHT(initial_peers=[initial])
    averager = DecentralizedAverager([torch.full((5000,), FOREIGN), torch.full((7, 3), FOREIGN)], dht, prefix)
    served = 0
    serve = averager.state_server._on_meta

    async def counting(request):
        nonlocal served
        served += 1
        return await serve(request)

    averager.peer.register(META_METHOD, counting)
    if mode == "epoch":
        averager.publish_state(HUGE_EPOCH)
    else:  # the test starts it once honest peers advertise
        honest = averager.peer.runtime.run(find_sources(dht, prefix, averager.me.peer_id), WAIT_SECONDS)[0]
        lie = advertise(dht, averager.peer.identity, prefix, averager.me.address, honest.epoch, honest.digest)
        averager.peer.runtime.run(lie, WAIT_SECONDS)
    print("ADVERTISED", flush=True)
    for _ in sys.stdin:
        print("SERVED", served, flush=True)
    averager.shutdown()
    dht.shutdown()


if __name__ == "__main__":
    main()
