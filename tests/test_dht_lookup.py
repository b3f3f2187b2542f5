"""Disjoint lookups (S/Kademlia) against adversaries placed among a key's closest nodes, in real processes.

Ten honest nodes run in one process; three adversaries (tests/peers/dht_adversary.py) in another pay the id proof
for ids next to the key, so they are among the key's closest nodes (a minority of its k = 8 closest). They accept
stores and keep nothing, and answer finds for the key with nothing, with only each other, with forged contacts and
records, or not at all (other finds get honest answers, so they stay in routing tables). A writer stores the key
and fresh readers, each joining through a different honest node, must still read it back within READ_SECONDS;
no forged contact is ever called. A reader that walks one path and lets a silent node hold its slot until
rpc_timeout (the lookup before disjoint paths) pays rpc_timeout per read under the stalling attack.
"""

import time

import pytest

from hiveengine.dht import DHT, DHTConfig, get_dht_time
from hiveengine.dht.protocol import proven_contact
from hiveengine.dht.routing import key_id
from hiveengine.dht.serialization import pack
from hiveengine.transport import PeerAddress
from tests.procs import PeerProcess

pytestmark = pytest.mark.timeout(240)

# DIFFICULTY is low because the stalling adversaries grind 2**(STALL_PREFIX_BITS + DIFFICULTY) tries each (~1.5 us a
# try): at 6 that was ~6 s each here and over the 60 s wait for all three on a loaded CI runner; at 2, ~0.4 s each.
K, DIFFICULTY, HONEST, ADVERSARIES = 8, 2, 10, 3
CONFIG = DHTConfig(k=K, id_difficulty=DIFFICULTY, rpc_timeout=3.0)
ONE_PATH = DHTConfig(k=K, id_difficulty=DIFFICULTY, rpc_timeout=3.0, disjoint_paths=1, stall_after=3.0)
# Bits the stalling adversaries' ids share with the key. With the default 8, about 1 honest id in 256 shares them
# too, and now and then one sat among the one-path reader's nearest and answered at once (CI-like run: 0.07 s).
STALL_PREFIX_BITS = 16
READ_SECONDS = 2.5  # a reader's get must end within this (stall_after is 0.5 s; rpc_timeout is 3 s)


@pytest.fixture(scope="module")
def honest():
    proc = PeerProcess("dht_nodes.py", "--nodes", str(HONEST), "--k", str(K), "--id-difficulty", str(DIFFICULTY))
    try:
        addresses = [proc.expect("ADDRESS") for _ in range(HONEST)]
        proc.expect("READY")
        yield addresses
    finally:
        proc.close()


@pytest.mark.parametrize("mode", ["empty", "sybil", "junk", "stall"])
def test_readers_find_a_key_whose_closest_nodes_include_adversaries(honest, mode):
    key = f"hidden-{mode}"
    args = ["--initial-peers", *honest[:2], "--key", key, "--mode", mode, "--k", str(K)]
    if mode == "stall":  # the one-path reader below must meet the silent nodes before any honest one: ids that share
        args += ["--prefix-bits", str(STALL_PREFIX_BITS)]  # 16 bits with the key are nearer than any honest id's
    adversary = PeerProcess("dht_adversary.py", *args, "--difficulty", str(DIFFICULTY), "--nodes", str(ADVERSARIES))
    writer = None
    readers = []
    try:
        announced = [adversary.expect("ADDRESS").split() for _ in range(ADVERSARIES)]
        adversary.expect("READY")
        hostile = [address for address, _ in announced]
        writer = DHT(initial_peers=[*honest[:1], *hostile], config=CONFIG)
        assert writer.store(key, "found anyway", get_dht_time() + 120, timeout=60)
        target = key_id(pack(key, "key"))
        adversaries = [proven_contact(PeerAddress.parse(a), int(n), DIFFICULTY).id ^ target for a, n in announced]
        honest_known = [c.id ^ target for c in writer.node.table.nearest(target, 64) if c.text not in hostile]
        closer = sum(distance < max(adversaries) for distance in honest_known)
        assert closer <= K - ADVERSARIES, "the adversaries must be among the key's k closest nodes"
        for i in range(3):
            readers.append(DHT(initial_peers=[honest[2 + i], *hostile], config=CONFIG))
            start = time.monotonic()
            found = readers[-1].get(key, timeout=30)
            seconds = time.monotonic() - start
            assert found is not None and found.value == "found anyway", f"reader {i} lost the key ({mode})"
            assert seconds < READ_SECONDS, f"reader {i} took {seconds:.1f} s ({mode})"
            latest = readers[-1].get(key, latest=True, timeout=30)
            assert latest is not None and latest.value == "found anyway"
        if mode == "stall":  # the attack is real: a one-path reader without stall_after waits for the silent nodes
            readers.append(DHT(initial_peers=[honest[5], *hostile], config=ONE_PATH))
            start = time.monotonic()
            assert readers[-1].get(key, timeout=30).value == "found anyway"
            assert time.monotonic() - start >= ONE_PATH.rpc_timeout
        adversary.proc.stdin.write("bait\n")
        adversary.proc.stdin.flush()
        assert adversary.expect("BAIT") == "0", "a contact with a forged id proof was called"
    finally:
        for node in [*readers, writer]:
            if node is not None:
                node.shutdown()
        adversary.close()
