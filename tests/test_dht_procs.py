"""The DHT across processes: churn (a quarter of 64 nodes killed) and the `hiveengine dht` command, open or in a
private swarm."""

from __future__ import annotations

import random
import signal
import subprocess
import sys

import pytest

from hiveengine.cli.dht import READY_PREFIX, STATUS_PREFIX
from hiveengine.dht import DHT, DHTConfig, get_dht_time
from hiveengine.errors import MembershipError
from hiveengine.transport import Identity, Peer, membership
from tests.procs import PeerProcess

PROCESSES, NODES_PER_PROCESS, KEYS = 4, 16, 100


def start_nodes(count: int, initial_peers: list[str], rpc_timeout: float = 1.5) -> PeerProcess:
    args = ["--nodes", str(count), "--rpc-timeout", str(rpc_timeout), "--initial-peers", *initial_peers]
    return PeerProcess("dht_nodes.py", *args)


@pytest.mark.timeout(240)
def test_keys_survive_killing_a_quarter_of_64_nodes():
    first = start_nodes(NODES_PER_PROCESS, [])
    procs = [first]
    try:
        seeds = [first.expect("ADDRESS")]
        first.expect("READY")
        procs += [start_nodes(NODES_PER_PROCESS, seeds) for _ in range(PROCESSES - 1)]
        for proc in procs[1:]:
            proc.expect("READY", timeout=120)
        client = DHT(initial_peers=seeds, client_mode=True, config=DHTConfig(rpc_timeout=1.5))
        try:
            expiration = get_dht_time() + 600
            stored = [f"churn-{i}" for i in range(KEYS) if client.store(f"churn-{i}", i, expiration, timeout=60)]
            assert len(stored) == KEYS
            random.Random(0).choice(procs[1:]).kill()  # SIGKILL: 16 of 64 nodes vanish without a word
            found = [
                key for key in stored if (v := client.get(key, latest=True, timeout=60)) and v.value == int(key[6:])
            ]
            assert len(found) >= 0.99 * len(stored), f"{len(found)} of {len(stored)} keys survived"
        finally:
            client.shutdown()
    finally:
        for proc in procs:
            proc.close()


@pytest.mark.timeout(120)
def test_dht_command_runs_a_bootstrap_node():
    proc = subprocess.Popen(
        [sys.executable, "-m", "hiveengine.cli", "dht", "--status-interval", "0.5"], stdout=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith(READY_PREFIX), line
        address = line[len(READY_PREFIX) :].strip()
        with DHT(initial_peers=[address]) as node:
            assert node.store("via-cli", "ok", get_dht_time() + 60, timeout=30)
            while not (line := proc.stdout.readline()).startswith(f"{STATUS_PREFIX} 1 peers known, 1 keys"):
                assert line, "the dht command exited early"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


@pytest.mark.timeout(120)
def test_dht_command_joins_a_private_swarm(tmp_path):
    key = tmp_path / "owner.key"
    key.write_bytes(membership.swarm_key_file(membership.generate_swarm_key()))
    bad = subprocess.run(
        [sys.executable, "-m", "hiveengine.cli", "dht", "--swarm", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0 and "missing" in bad.stderr
    proc = subprocess.Popen(
        [sys.executable, "-m", "hiveengine.cli", "dht", "--swarm", str(key), "--status-interval", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith(READY_PREFIX), line
        address = line[len(READY_PREFIX) :].strip()
        outsider = Peer(Identity.generate())
        try:
            with pytest.raises(MembershipError, match="private swarm"):
                outsider.call_sync(address, "dht.ping", {"s": None}, timeout=10)
        finally:
            outsider.runtime.run(outsider.aclose(), 30)
        membership.use(membership.load(key))
        try:
            with DHT(initial_peers=[address]) as member:
                assert member.store("members-only", "ok", get_dht_time() + 60, timeout=30)
                assert member.num_peers == 1
        finally:
            membership.use(None)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
