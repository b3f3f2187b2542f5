"""A hostile state donor for tests/test_catchup.py: advertises and serves its own parameters (all FOREIGN).

Usage: forger_state.py INITIAL_PEER PREFIX MODE. It runs a real DecentralizedAverager whose tensors are all
FOREIGN and signs its advertisements with its own key (the one thing signatures cannot stop). MODE "epoch":
advertises its own state under a huge epoch (the issue's state hijack). MODE "copy": advertises the epoch and
digest that honest peers advertise (a lie) while serving its own tensors. MODE "optim": PREFIX is an Optimizer
run id (tests/peers/optim_peer.py's model and Adam, every parameter FOREIGN): it publishes progress at a huge
epoch and advertises its training state under that epoch (the issue's full state hijack). Prints "ADVERTISED",
then "SERVED <snapshots served>" for every line read on stdin; exits when stdin closes.
"""

import sys

import torch

from hiveengine.averaging import DecentralizedAverager
from hiveengine.averaging.state import META_METHOD, STATE_TTL_PERIODS, advertise, find_sources
from hiveengine.dht import DHT
from hiveengine.optim.progress import ProgressTracker
from hiveengine.optim.state import TrainingState

FOREIGN = 666.0
HUGE_EPOCH = 10**9
WAIT_SECONDS = 60.0
RENEW_SECONDS = 3600.0  # the liar's averager renews its own advertisement no sooner (it would undo the "copy" lie)


def main() -> None:
    initial, prefix, mode = sys.argv[1:4]
    dht = DHT(initial_peers=[initial])
    if mode == "optim":
        averager = hostile_trainer(dht, prefix)
    else:
        tensors = [torch.full((5000,), FOREIGN), torch.full((7, 3), FOREIGN)]
        averager = DecentralizedAverager(tensors, dht, prefix, declare_state_period=RENEW_SECONDS)
    served = 0
    serve = averager.state_server._on_meta

    async def counting(request):
        nonlocal served
        served += 1
        return await serve(request)

    averager.peer.register(META_METHOD, counting)
    if mode in ("epoch", "optim"):
        averager.publish_state(HUGE_EPOCH)
    else:  # the test starts it once honest peers advertise
        honest = averager.peer.runtime.run(find_sources(dht, prefix, averager.me.peer_id), WAIT_SECONDS)[0]
        identity, address = averager.peer.identity, averager.me.address
        lives = 2 * STATE_TTL_PERIODS * RENEW_SECONDS  # newer than our own advertisement: it replaces that
        lie = advertise(dht, identity, prefix, address, honest.epoch, honest.digest, lives)
        averager.peer.runtime.run(lie, WAIT_SECONDS)
    print("ADVERTISED", flush=True)
    for _ in sys.stdin:
        print("SERVED", served, flush=True)
    averager.shutdown()
    dht.shutdown()


def hostile_trainer(dht: DHT, run_id: str) -> DecentralizedAverager:
    """An Optimizer-shaped state of FOREIGN parameters, with progress claiming a huge epoch and 10^9 samples."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    for p in model.parameters():
        p.data.fill_(FOREIGN)
    state = TrainingState(torch.optim.Adam(model.parameters(), lr=0.01))
    averager = DecentralizedAverager(state.tensors, dht, f"{run_id}.state", codec="none")
    averager.state_metadata = {"optimizer": state.metadata(), "mode": "sync"}
    tracker = ProgressTracker(dht, run_id)
    averager.peer.runtime.run(tracker.report(HUGE_EPOCH, 10**9, None, 128), WAIT_SECONDS)
    return averager


if __name__ == "__main__":
    main()
