"""Training across the NAT rig: 2 public and 2 home peers, each joined with `hiveengine.init` (the home peers learn
they cannot be dialled, switch to client mode and reserve a relay slot by themselves), train one model with
hiveengine.Optimizer (sync and DiLoCo) and end with identical parameters (codec none: exactly)."""

import json
import os
import subprocess

import pytest

from tests.procs import PeerProcess
from tools.netns import NatRig, nat_available

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(not nat_available(), reason="needs root, ip, tc and iptables"),
]

PREFIX = f"ht{os.getpid() % 100000}"
EPOCHS = 4


@pytest.fixture(scope="module")
def rig():
    with NatRig(2, 2, prefix=PREFIX) as rig:
        yield rig
    assert PREFIX not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def _trainer(rig: NatRig, name: str, mode: str, *initial: str) -> PeerProcess:
    env = {"UCX_TLS": "tcp", "HIVEENGINE_LOCAL_COPY": "0", "HIVEENGINE_ANNOUNCE_HOST": rig.host(name)}
    if name == "pub0":
        env["HIVEENGINE_RELAY"] = "1"
    return PeerProcess("nat_trainer.py", mode, str(EPOCHS), *initial, env=env, wrap=rig.command(name, []))


@pytest.mark.parametrize("mode", ["sync", "diloco"])
def test_two_public_and_two_home_peers_train_one_model(rig, mode):
    bootstrap = _trainer(rig, "pub0", mode)
    procs = [bootstrap]
    try:
        address = bootstrap.expect("DHT")
        for name in ("pub1", "home0", "home1"):
            procs.append(_trainer(rig, name, mode, address))
        engines = [json.loads(proc.expect("ENGINE", 90)) for proc in procs]
        home = [{"client_mode": True, "relayed": True}] * 2
        assert engines == [{"client_mode": False, "relayed": False}] * 2 + home, engines
        for proc in procs:
            proc.expect("READY", 60)
        for proc in procs:
            proc.proc.stdin.write("go\n")
            proc.proc.stdin.flush()
        epochs, summaries = [], []
        for proc in procs:
            seen = {}
            while True:
                line = proc.expect("", 180)
                if line.startswith("EPOCH"):
                    _, epoch, digest = line.split()
                    seen[int(epoch)] = digest
                elif line.startswith("DONE"):
                    summaries.append(json.loads(line.removeprefix("DONE")))
                    break
            epochs.append(seen)
    finally:
        for proc in reversed(procs):  # the bootstrap last: the others keep stepping until they are closed
            proc.close()
    for epoch in range(1, EPOCHS + 1):
        digests = [seen.get(epoch) for seen in epochs]
        assert len(set(digests)) == 1, f"after epoch {epoch} the peers differ (pub0, pub1, home0, home1): {digests}"
    for summary in summaries:
        assert summary["rounds"]["averaged"] >= EPOCHS - 1, summary["rounds"]
        assert summary["loss_after"] < 0.7 * summary["loss_before"], summary
