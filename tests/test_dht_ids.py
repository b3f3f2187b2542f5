"""Costly node ids bound to keys (hiveengine/dht/ids.py): proofs verify, and a node whose claimed id is not
proven for its authenticated key never enters a routing table."""

import pytest

from hiveengine.dht import DHT, DHTConfig, protocol
from hiveengine.dht.ids import MAX_NONCE, leading_zero_bits, proof_digest, proven_id, solve
from hiveengine.errors import BootstrapError
from hiveengine.transport import Identity, Peer

pytestmark = pytest.mark.timeout(120)


def test_a_solved_nonce_proves_one_id_for_its_key_only():
    peer, other = Identity.generate().peer_id.raw, Identity.generate().peer_id.raw
    nonce = solve(peer, 10)
    assert solve(peer, 10) == nonce  # deterministic: a restarted node keeps its id
    assert leading_zero_bits(proof_digest(peer, nonce)) >= 10
    node = proven_id(peer, nonce, 10)
    assert node is not None and node != int.from_bytes(peer, "big")
    assert proven_id(peer, nonce, 9) == node  # more work than asked is fine
    assert proven_id(other, nonce, 10) is None  # a proof is bound to its key
    assert all(proven_id(peer, n, 10) is None for n in range(nonce))  # solve returns the first nonce
    for junk in (None, -1, MAX_NONCE + 1, 2**200, "7", 1.0, True, [nonce]):
        assert proven_id(peer, junk, 10) is None
    with pytest.raises(ValueError, match="id_difficulty"):
        solve(peer, 300)


def _unproven(peer: bytes, difficulty: int) -> int:
    """A nonce that proves nothing at `difficulty` but passes a weaker puzzle."""
    return next(n for n in range(1 << 20) if proven_id(peer, n, difficulty) is None and proven_id(peer, n, 0))


def test_a_peer_with_a_forged_or_unproven_id_is_not_admitted():
    config = DHTConfig(id_difficulty=12)
    target = DHT(config=config)
    honest = DHT(initial_peers=[target.address], config=config)
    raw = Peer(Identity.generate())
    try:
        me, address = raw.peer_id.raw, str(raw.address)
        forged = [
            {"s": address},  # no proof at all
            {"s": address, "n": _unproven(me, 12)},  # too little work
            {"s": address, "n": honest.node.nonce},  # another key's valid proof
            {"s": address, "n": "0"},
            {"s": str(honest.address), "n": honest.node.nonce},  # another node's address and proof
        ]
        for header in map(protocol.versioned, forged):
            reply = raw.call_sync(target.address, "dht.ping", header, timeout=10)[0]
            assert reply == protocol.versioned({"n": target.node.nonce})
            assert raw.call_sync(target.address, "dht.find", {**header, "id": bytes(32), "v": False}, timeout=10)
            assert not target.node.table.has_peer(me), header
        # the same peer with a valid proof is admitted, under the id it proved
        nonce = solve(me, 12)
        raw.call_sync(target.address, "dht.ping", protocol.versioned({"s": address, "n": nonce}), timeout=10)
        assert target.node.table.has_peer(me)
        assert target.node.table.get(proven_id(me, nonce, 12)).address.peer_id == raw.peer_id
        assert target.node.table.has_peer(honest.peer_id.raw)
    finally:
        raw.runtime.run(raw.aclose(), 30)
        honest.shutdown()
        target.shutdown()


def test_nodes_that_disagree_on_the_difficulty_do_not_mix():
    weak = DHT(config=DHTConfig(id_difficulty=2))
    while leading_zero_bits(proof_digest(weak.peer_id.raw, weak.node.nonce)) >= 12:
        weak.shutdown()  # its proof happens to be strong enough: draw another key
        weak = DHT(config=DHTConfig(id_difficulty=2))
    try:
        with pytest.raises(BootstrapError, match="id_difficulty"):
            DHT(initial_peers=[weak.address], config=DHTConfig(id_difficulty=12))
        strong = DHT(config=DHTConfig(id_difficulty=12))
        try:  # a weaker node may join a stronger one but is never admitted to its table
            joiner = DHT(initial_peers=[strong.address], config=DHTConfig(id_difficulty=2))
            assert not strong.node.table.has_peer(joiner.peer_id.raw)
            assert joiner.node.table.has_peer(strong.peer_id.raw)
            joiner.shutdown()
        finally:
            strong.shutdown()
    finally:
        weak.shutdown()
