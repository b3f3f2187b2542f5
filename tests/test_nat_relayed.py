"""Services of home peers reached through a relay, in the NAT rig: two home peers average with each other when the
only public peer is a relay, a late joiner downloads their state through it, and a public client calls experts a
home peer hosts. Each home process reserves a slot once (hiveengine.init); its averager's and expert server's own
peers reserve with the same relay when they start."""

import json
import os
import subprocess

import pytest
import torch

from tests.procs import PeerProcess
from tools.netns import NatRig, nat_available

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(not nat_available(), reason="needs root, ip, tc and iptables"),
]

PREFIX = f"hv{os.getpid() % 100000}"
SIZE = 100_000


@pytest.fixture(scope="module")
def rig():
    with NatRig(3, 2, prefix=PREFIX) as rig:
        yield rig
    assert PREFIX not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def _peer(rig: NatRig, name: str, script: str, *args: str, **extra: str) -> PeerProcess:
    env = {"UCX_TLS": "tcp", "HIVEENGINE_LOCAL_COPY": "0", "HIVEENGINE_ANNOUNCE_HOST": rig.host(name), **extra}
    return PeerProcess(script, *args, env=env, wrap=rig.command(name, []))


def _go(peers: list[PeerProcess]) -> None:
    """Start the averagers' rounds together, once each has printed its address (tests/peers/nat_averager.py)."""
    for peer in peers:
        peer.proc.stdin.write("go\n")
        peer.proc.stdin.flush()


def test_two_home_peers_average_through_a_relay_and_a_late_joiner_loads_their_state(rig, tmp_path):
    relay = _peer(rig, "pub0", "nat_engine.py", "bootstrap", HIVEENGINE_RELAY="1")
    procs = [relay]
    try:
        bootstrap = relay.expect("ADDRESS")
        homes = [
            _peer(rig, name, "nat_averager.py", "avg", str(j), "2", str(tmp_path / f"home{j}.pt"), bootstrap)
            for j, name in enumerate(("home0", "home1"))
        ]
        procs += homes
        for home in homes:
            assert "/relay=" in home.expect("ADDRESS", 90)  # the averager's own peer reserved too
        _go(homes)
        for home in homes:
            steps = [json.loads(home.expect("STEP", 90)) for _ in range(2)]
            assert steps == [{"size": 2, "failed": []}] * 2, steps
            home.expect("SAVED", 30)
        seeds = [torch.randn(SIZE, generator=torch.Generator().manual_seed(j)) for j in range(2)]
        averaged = [torch.load(tmp_path / f"home{j}.pt") for j in range(2)]
        assert torch.equal(averaged[0], averaged[1])
        torch.testing.assert_close(averaged[0], (seeds[0] + seeds[1]) / 2)
        joiner = _peer(rig, "pub1", "nat_averager.py", "load", str(tmp_path / "joiner.pt"), bootstrap)
        procs.append(joiner)
        assert json.loads(joiner.expect("LOADED", 90)) == {"found": True, "epoch": 2}
        assert torch.equal(torch.load(tmp_path / "joiner.pt"), averaged[0])  # only the home peers share state
    finally:
        for proc in reversed(procs):
            proc.close()


def test_a_home_peer_hosts_experts_that_a_public_client_calls_through_a_relay(rig):
    relay = _peer(rig, "pub0", "nat_engine.py", "bootstrap", HIVEENGINE_RELAY="1")
    procs = [relay]
    try:
        bootstrap = relay.expect("ADDRESS")
        server = _peer(rig, "home0", "nat_experts.py", "serve", bootstrap)
        procs.append(server)
        served_at = server.expect("ADDRESS", 90)
        assert "/relay=" in served_at
        client = _peer(rig, "pub1", "nat_experts.py", "call", bootstrap)
        procs.append(client)
        assert json.loads(client.expect("RESULT", 90)) == {"address": served_at, "forward": True, "backward": True}
    finally:
        for proc in reversed(procs):
            proc.close()


def test_a_relay_killed_mid_training_costs_at_most_one_round(rig, tmp_path):
    """Home peers in client mode (the engine's choice) send over links they open themselves: the relay that carried
    their DHT slot dies after the first round, and every later round still completes with everyone."""
    relay = _peer(rig, "pub0", "nat_engine.py", "bootstrap", HIVEENGINE_RELAY="1")
    procs = [relay]
    rounds = 4
    try:
        bootstrap = relay.expect("ADDRESS")
        peers = [
            _peer(
                rig,
                name,
                "nat_averager.py",
                "client-avg",
                str(i),
                str(rounds),
                str(tmp_path / f"{name}.pt"),
                bootstrap,
                NAT_SWARM="3",
            )
            for i, name in enumerate(("pub1", "home0", "home1"))
        ]
        procs += peers
        for peer in peers:
            peer.expect("ADDRESS", 90)
        _go(peers)
        first = [json.loads(peer.expect("STEP", 90)) for peer in peers]
        assert first == [{"size": 3, "failed": []}] * 3, first
        relay.kill()
        later = [[json.loads(peer.expect("STEP", 90)) for _ in range(rounds - 1)] for peer in peers]
        for steps in later:
            assert all(step == {"size": 3, "failed": []} for step in steps[1:]), later  # the kill's round may fail
        for peer in peers:
            peer.expect("SAVED", 30)
        saved = [torch.load(tmp_path / f"{name}.pt") for name in ("pub1", "home0", "home1")]
        assert torch.equal(saved[0], saved[1]) and torch.equal(saved[0], saved[2])
        seeds = [torch.randn(SIZE, generator=torch.Generator().manual_seed(i)) for i in range(3)]
        torch.testing.assert_close(saved[0], sum(seeds) / 3)  # every round averaged all three: the mean stays
    finally:
        for proc in reversed(procs):
            proc.close()


def test_a_reducer_nobody_can_dial_never_yields_unreported_wrong_values(rig, tmp_path):
    """A home peer that reduces (not a client) with no relay in the swarm: public senders cannot dial it (unless it
    opened a link to them first). Whatever each peer ends with, a peer whose round reports no failed part and every
    sender averaged holds exactly the mean; any other outcome is reported (failed parts, fewer senders)."""
    bootstrap_proc = _peer(rig, "pub0", "nat_engine.py", "bootstrap")
    procs = [bootstrap_proc]
    names = ("pub1", "pub2", "home0")
    try:
        bootstrap = bootstrap_proc.expect("ADDRESS")
        peers = [
            _peer(
                rig,
                name,
                "nat_averager.py",
                "avg",
                str(i),
                "1",
                str(tmp_path / f"{name}.pt"),
                bootstrap,
                NAT_SWARM="3",
                NAT_REPORT="senders",
            )
            for i, name in enumerate(names)
        ]
        procs += peers
        for peer in peers[:2]:
            peer.expect("ADDRESS", 90)
        assert "/relay=" not in peers[2].expect("ADDRESS", 90)  # no relay: its private address is all it has
        _go(peers)
        steps = [json.loads(peer.expect("STEP", 120)) for peer in peers]
        for peer in peers:
            peer.expect("SAVED", 30)
    finally:
        for proc in reversed(procs):
            proc.close()
    mean = sum(torch.randn(SIZE, generator=torch.Generator().manual_seed(i)) for i in range(3)) / 3
    for name, step in zip(names, steps, strict=True):
        assert step is not None and step["size"] == 3, (name, steps)
        if step == {"size": 3, "failed": [], "senders": 3}:
            torch.testing.assert_close(torch.load(tmp_path / f"{name}.pt"), mean, msg=f"{name}: {steps}")
