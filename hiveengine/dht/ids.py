"""Costly DHT node ids bound to identity keys: why a node sits where it sits in the id space, provably.

A node's Kademlia id decides which keys it stores, so whoever chooses ids near a key can hide that key. A node id
was the peer id itself (the SHA-256 of the Ed25519 key), which costs one key generation per try: 20 ids close to
one key took ~16 s from one process. Now an id is the output of a proof of work on the node's key (a static
crypto puzzle as in S/Kademlia, built only from SHA-256 in hashlib):

    proof(peer_id, nonce) = SHA-256(PROOF_DOMAIN || peer_id || nonce as 8 bytes big-endian)
    valid                 iff proof has at least `difficulty` leading zero bits
    node id               = SHA-256(ID_DOMAIN || proof)     (256 bits, uniform: the zero bits are hashed away)

`peer_id` is the SHA-256 of the node's Ed25519 public key, which the transport authenticates at every handshake,
so an id is bound to that key: every node checks a contact's (peer id, nonce) before the contact enters its
routing table or a lookup asks it anything, and a contact whose proof fails is ignored. Checking costs two
SHA-256 calls (the last CHECKED_PROOFS results are remembered); finding a nonce costs 2**difficulty of them on
average (`solve` counts up from 0, so a key always gets the same id back after a restart).

Why the id is the hash of the proof and not H(key) with a separate nonce: each try yields one candidate id that
is valid with probability 2**-difficulty and lands in a chosen neighbourhood (m leading bits of a key) with
probability 2**-m, independently, so choosing an id costs 2**(m + difficulty) tries. With a puzzle beside a
fixed H(key) the costs would add (2**m key generations + 2**difficulty hashes), not multiply. Against the 2**m key
generations ids cost before (~72 us each here in Python, a try of the puzzle ~1 us), DEFAULT_DIFFICULTY = 16
makes a chosen id 2**16 * 1 / 72 ~ 900x costlier; `python bench/dht.py --id-cost` measured 790x, and an honest
node's start 89-161 ms on average (660 ms at most of 20) on this 2-core host at load 14-16. A native or GPU
attacker speeds up both hashing and key generation; the ratio stays in the hundreds. One key can prove several
ids (other nonces), each at the full price, so a routing table still holds one contact per peer id
(routing.RoutingTable).

Client-mode nodes are never put in routing tables, so they prove nothing and pay nothing.
"""

from __future__ import annotations

import functools
import hashlib

PROOF_DOMAIN = b"hiveengine/dht-id-proof/v1"
ID_DOMAIN = b"hiveengine/dht-id/v1"
DEFAULT_DIFFICULTY = 16  # leading zero bits of an id proof: ~0.1 s to start, ~800x the cost of choosing ids
MAX_DIFFICULTY = 40  # settings beyond this would take an honest node hours to start
NONCE_BYTES = 8
MAX_NONCE = (1 << (8 * NONCE_BYTES)) - 1
CHECKED_PROOFS = 8192  # proofs remembered per process: every lookup meets the same contacts again (~5 us each)


def proof_digest(peer_id: bytes, nonce: int) -> bytes:
    """SHA-256(PROOF_DOMAIN || peer_id || nonce): the digest whose leading zero bits are the work."""
    return hashlib.sha256(PROOF_DOMAIN + peer_id + nonce.to_bytes(NONCE_BYTES, "big")).digest()


def leading_zero_bits(digest: bytes) -> int:
    value = int.from_bytes(digest, "big")
    return 8 * len(digest) - value.bit_length()


def id_of_proof(digest: bytes) -> int:
    """The node id a valid proof digest stands for."""
    return int.from_bytes(hashlib.sha256(ID_DOMAIN + digest).digest(), "big")


def proven_id(peer_id: bytes, nonce, difficulty: int) -> int | None:
    """The node id that `nonce` proves for `peer_id` (the SHA-256 of the authenticated key), or None when the
    nonce is malformed or the proof has fewer than `difficulty` leading zero bits. Never raises on bad input."""
    if not isinstance(nonce, int) or isinstance(nonce, bool) or not 0 <= nonce <= MAX_NONCE:
        return None
    return _checked_id(peer_id, nonce, difficulty)


@functools.lru_cache(maxsize=CHECKED_PROOFS)
def _checked_id(peer_id: bytes, nonce: int, difficulty: int) -> int | None:
    digest = proof_digest(peer_id, nonce)
    if leading_zero_bits(digest) < difficulty:
        return None
    return id_of_proof(digest)


def solve(peer_id: bytes, difficulty: int) -> int:
    """The smallest nonce whose proof for `peer_id` has `difficulty` leading zero bits (2**difficulty SHA-256
    calls on average; deterministic, so a restarted node keeps its id)."""
    if not 0 <= difficulty <= MAX_DIFFICULTY:
        raise ValueError(f"DHTConfig.id_difficulty must be in [0, {MAX_DIFFICULTY}], got {difficulty}")
    prefix = hashlib.sha256(PROOF_DOMAIN + peer_id)
    limit = 1 << (256 - difficulty)  # a digest below this has >= difficulty leading zero bits
    nonce = 0
    while True:
        attempt = prefix.copy()
        attempt.update(nonce.to_bytes(NONCE_BYTES, "big"))
        if int.from_bytes(attempt.digest(), "big") < limit:
            return nonce
        nonce += 1
