"""Mutual authentication, swarm membership and session keys when a connection opens.

Over the UCX stream API (protocol version 6):

1. the dialer sends HELLO: magic, version, flags, the tag base it receives on, the peer id it wants to reach, its
   Ed25519 public key, a 32-byte random nonce, a fresh ephemeral X25519 public key, the swarm it belongs to (the
   swarm key; zeros for an open swarm), the sizes of the segments its UCX TCP transport sends and receives, and how
   many membership certificates follow; then those certificates;
2. the listener answers with its own HELLO and certificates, and its Ed25519 signature of
   ``"listener" | transcript``;
3. the dialer checks the listener's signature and membership (membership.py: same swarm, a live chain from the
   swarm key to the listener's key), then answers with its signature of ``"dialer" | transcript``;
4. the listener checks the dialer's signature and membership. It sends ACCEPTED (one byte) once it is ready for the
   connection's messages, or REFUSED when the dialer is not a member (then waits, at most REFUSAL_LINGER, for the
   dialer to hang up, so that the refusal is read rather than lost in the close). Only after ACCEPTED does the
   dialer send messages, so the listener never holds any before authentication.

where transcript = TRANSCRIPT_DOMAIN | dialer's HELLO and certificates | listener's HELLO and certificates. The
role labels keep a signature made in one role from being reflected as the other. Each side checks the other's
signature against the key in its HELLO; the peer id is the SHA-256 of that key, and the dialer checks it is the id
its address names. The certificates are inside the transcript, so a chain cannot be moved to another session.
On a UCX link each side also checks that the segments either side sends fit what the other receives (a larger one
fails the link mid-message, see ucx_env.py), and gives up with an error that names both settings if not.

Session keys (``cryptography`` primitives only): shared = X25519(my ephemeral private key, their ephemeral public
key); 160 bytes = HKDF-SHA256(shared, salt=SHA-256(transcript), info=SESSION_INFO), split into the dialer->listener
key, the listener->dialer key (32 bytes each), two 32-byte values that bind the same-host direct copy to this
session (local_copy.py): one presented when the dialer reads the listener's memory, one for the other direction, and
the 32-byte key that proves a TCP wire's extra connections belong to this session (rails.py). The 128 bytes before
the rail key are what a 128-byte output gives: HKDF's output is a prefix of any longer one. The link id that names
the session to those extra connections is the first 16 bytes of SHA-256(LINK_ID_DOMAIN | transcript).
Ephemeral keys make the session keys forward-secret: a stolen identity key does not open recorded traffic.

Each side also times one clean round trip of the exchange, after the link's own setup: the dialer from sending its
signature to the verdict, the listener from sending its HELLO to the dialer's signature. `Authenticated.rtt` holds
it, so deadlines can adapt to long links (Connection.rtt).

A listener that hosts no peer with the requested id answers with the HELLO of the peer it does host, flagged
NOT_HERE and signed as usual, so the dialer can say which peer lives at that address (PeerIdMismatch).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import struct
import time
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from hiveengine.errors import HandshakeError, MembershipError, PeerIdMismatch
from hiveengine.transport import membership
from hiveengine.transport.identity import SIGNATURE_BYTES, Identity, PeerID, verify_signature
from hiveengine.transport.rails import LINK_ID_BYTES
from hiveengine.transport.ucx_env import segments_in_force

MAGIC = b"HIVE"
# 2: small tensors inline after the header; 3: same-host direct copy; 4: X25519 session keys, role-labelled
# signatures, NOT_HERE answers, direct copy proven over a Unix socket; 5: swarm membership certificates; 6: UCX TCP
# segment sizes.
PROTOCOL_VERSION = 6
# magic, version, flags, recv tag base, target id, identity key, nonce, ephemeral X25519 key, swarm key, UCX TCP
# send and receive segment bytes, certificates
HELLO = struct.Struct("<4sHHI32s32s32s32s32sIIH")
TRANSCRIPT_DOMAIN = b"hiveengine-handshake-v6"
SESSION_INFO = b"hiveengine-session-v6"
DIALER_ROLE, LISTENER_ROLE = b"dialer", b"listener"
NO_TARGET = bytes(32)
FLAG_NOT_HERE = 1  # the listener hosts no peer with the requested id; its HELLO names the peer it does host
KEY_BYTES = 32
SESSION_KEYS = 5  # both directions' AEAD keys, both direct-copy bindings, the rail key
LINK_ID_DOMAIN = b"hiveengine-link-id-v1"
ACCEPTED = b"\x01"
REFUSED = b"\x02"  # the dialer is not a member of the listener's swarm
REFUSAL_LINGER = 1.0  # seconds a listener waits for a refused dialer to hang up (so it reads the refusal)


@dataclass(frozen=True)
class Hello:
    recv_base: int
    target: bytes
    public_key: bytes
    nonce: bytes
    ephemeral: bytes
    flags: int = 0
    swarm: bytes = membership.OPEN
    chain: bytes = b""  # the packed certificates that follow the fixed part
    segments: tuple[int, int] = (0, 0)  # the bytes of the UCX TCP segments this peer sends, and the most it receives

    def pack(self) -> bytes:
        fields = (self.recv_base, self.target, self.public_key, self.nonce, self.ephemeral, self.swarm, *self.segments)
        count = len(self.chain) // membership.CERTIFICATE.size
        return HELLO.pack(MAGIC, PROTOCOL_VERSION, self.flags, *fields, count) + self.chain

    @classmethod
    def unpack(cls, data: bytes) -> tuple[Hello, int]:
        """The fixed part of a HELLO and how many certificate bytes follow it."""
        magic, version, flags, base, target, key, nonce, ephemeral, swarm, sends, receives, count = HELLO.unpack(data)
        if magic != MAGIC:
            raise HandshakeError("the remote end is not a hiveengine peer (bad handshake magic)")
        if version != PROTOCOL_VERSION:
            raise HandshakeError(f"protocol version {version} is not supported (this peer speaks {PROTOCOL_VERSION})")
        if count > membership.MAX_CHAIN:
            raise MembershipError(f"a HELLO announced {count} certificates; at most MAX_CHAIN = {membership.MAX_CHAIN}")
        hello = cls(base, target, key, nonce, ephemeral, flags, swarm, segments=(sends, receives))
        return hello, count * membership.CERTIFICATE.size


@dataclass(frozen=True)
class Authenticated:
    """The outcome of a handshake: who the remote peer is, which tag base it receives on, and the session's keys."""

    peer_id: PeerID
    public_key: bytes
    remote_recv_base: int
    local: Identity
    dialer: bool = False  # whether we opened the connection
    send_key: bytes = field(default=b"", repr=False)  # our direction's AEAD key
    recv_key: bytes = field(default=b"", repr=False)  # the remote's direction's AEAD key
    read_binding: bytes = field(default=b"", repr=False)  # we present it to read the remote's memory
    serve_binding: bytes = field(default=b"", repr=False)  # the remote presents it to read ours
    roles: int = 0  # what the remote's membership certificate grants (membership.ROLE_*; 0 in an open swarm)
    rtt: float = 0.0  # seconds of one round trip of the handshake (an upper bound: it includes the other's checks)
    rail_key: bytes = field(default=b"", repr=False)  # proves a TCP wire's extra connections are ours (rails.py)
    link_id: bytes = b""  # names this session to those extra connections


def _transcript(first: bytes, second: bytes) -> bytes:
    return TRANSCRIPT_DOMAIN + first + second


def _derive(ephemeral: X25519PrivateKey, their_public: bytes, transcript: bytes) -> tuple[bytes, ...]:
    try:
        shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(their_public))
    except ValueError as e:  # a low-order point gives an all-zero secret, which cryptography refuses
        raise HandshakeError(f"the remote peer's ephemeral key is unusable: {e}") from None
    okm = HKDF(
        algorithm=hashes.SHA256(),
        length=SESSION_KEYS * KEY_BYTES,
        salt=hashlib.sha256(transcript).digest(),
        info=SESSION_INFO,
    ).derive(shared)
    return tuple(okm[i : i + KEY_BYTES] for i in range(0, SESSION_KEYS * KEY_BYTES, KEY_BYTES))


def _link_id(transcript: bytes) -> bytes:
    return hashlib.sha256(LINK_ID_DOMAIN + transcript).digest()[:LINK_ID_BYTES]


def _ephemeral() -> tuple[X25519PrivateKey, bytes]:
    key = X25519PrivateKey.generate()
    return key, key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


async def _recv_exact(reactor, endpoint, nbytes: int) -> bytes:
    buf = np.empty(nbytes, dtype=np.uint8)
    await reactor.stream_recv(endpoint, buf)
    return buf.tobytes()


async def _recv_hello(reactor, endpoint) -> tuple[Hello, bytes]:
    """A HELLO with its certificates, and its bytes as the transcript holds them."""
    fixed = await _recv_exact(reactor, endpoint, HELLO.size)
    hello, chain_bytes = Hello.unpack(fixed)
    chain = await _recv_exact(reactor, endpoint, chain_bytes) if chain_bytes else b""
    return dataclasses.replace(hello, chain=chain), fixed + chain


def _my_hello(identity: Identity, recv_base: int, target: bytes, ephemeral: bytes, flags: int = 0) -> bytes:
    chain = membership.pack_chain(membership.chain_for(identity))
    key, swarm, segments = identity.public_key, membership.swarm_id(), segments_in_force()
    return Hello(recv_base, target, key, os.urandom(32), ephemeral, flags, swarm, chain, segments).pack()


def _check_segments(wire, theirs: Hello, who: str) -> None:
    """On a UCX link, raise HandshakeError unless the UCX TCP segments each side sends fit what the other receives."""
    if wire.kind != "ucx":
        return
    (sends, receives), (their_sends, their_receives) = segments_in_force(), theirs.segments
    if sends > their_receives or their_sends > receives:
        raise HandshakeError(
            f"{who} sends UCX TCP segments of {their_sends} bytes and takes at most {their_receives}; this peer sends "
            f"{sends} and takes at most {receives}: give every peer the same UCX_TCP_TX_SEG_SIZE and "
            "UCX_TCP_RX_SEG_SIZE (or leave both unset)"
        )


def _admit(hello: Hello) -> int:
    return membership.admit(hello.swarm, hello.public_key, membership.unpack_chain(hello.chain))


async def _send(reactor, endpoint, data: bytes) -> None:
    await reactor.stream_send(endpoint, np.frombuffer(data, dtype=np.uint8).copy())


def _verify(hello: Hello, signature: bytes, role: bytes, transcript: bytes) -> PeerID:
    if not verify_signature(hello.public_key, signature, role + transcript):
        raise HandshakeError("the remote peer's handshake signature is invalid (forged or corrupted identity)")
    return PeerID.from_public_key(hello.public_key)


async def connect_handshake(
    reactor,
    endpoint,
    identity: Identity,
    expected: PeerID | None,
    recv_base: int,
    timeout: float,
    dial_started: float | None = None,
) -> Authenticated:
    """Run the dialer's side within `timeout` seconds, stretched once the listener's HELLO is in (`stretch_deadline`:
    a long link needs more than a short one); raise PeerIdMismatch if the listener is not `expected`,
    HandshakeError if it cannot prove who it is. `dial_started`: when the dial began (the loop's clock), if the
    link's own setup came first."""
    loop = asyncio.get_running_loop()
    started = loop.time() if dial_started is None else dial_started

    async def run(scope: asyncio.Timeout) -> Authenticated:
        ephemeral, ephemeral_public = _ephemeral()
        target = expected.raw if expected else NO_TARGET
        my_bytes = _my_hello(identity, recv_base, target, ephemeral_public)
        await _send(reactor, endpoint, my_bytes)
        theirs, their_bytes = await _recv_hello(reactor, endpoint)
        scope.reschedule(stretch_deadline(scope.when(), started, loop.time()))
        signature = await _recv_exact(reactor, endpoint, SIGNATURE_BYTES)
        transcript = _transcript(my_bytes, their_bytes)
        peer_id = _verify(theirs, signature, LISTENER_ROLE, transcript)
        if theirs.flags & FLAG_NOT_HERE or (expected is not None and peer_id != expected):
            raise PeerIdMismatch(expected, peer_id)
        _check_segments(reactor, theirs, str(peer_id))
        roles = _admit(theirs)
        if roles & membership.ROLE_CLIENT_ONLY:
            raise MembershipError(
                f"{peer_id} is a client-only member of this swarm (its certificate's role): it calls others and "
                "serves nothing, so nobody dials it"
            )
        keys = _derive(ephemeral, theirs.ephemeral, transcript)
        sent = time.monotonic()  # before the send: the clock starts no later than the bytes leave
        await _send(reactor, endpoint, identity.sign(DIALER_ROLE + transcript))
        try:
            verdict = await _recv_exact(reactor, endpoint, len(ACCEPTED))
        except Exception as e:
            raise HandshakeError(
                f"{peer_id} refused our handshake ({type(e).__name__}); if its swarm is private, check that this "
                "process's membership file is current"
            ) from None
        if verdict == REFUSED:
            reason = membership.refusal_reason(identity)
            raise MembershipError(f"{peer_id} refused us: this process is not a member of its swarm ({reason})")
        if verdict != ACCEPTED:
            raise HandshakeError(f"{peer_id} sent a malformed handshake confirmation")
        rtt = time.monotonic() - sent
        *session, rail_key = keys
        return Authenticated(
            peer_id,
            theirs.public_key,
            theirs.recv_base,
            identity,
            True,
            *session,
            roles=roles,
            rtt=rtt,
            rail_key=rail_key,
            link_id=_link_id(transcript),
        )

    async with asyncio.timeout(timeout) as scope:
        return await run(scope)


def stretch_deadline(deadline: float, started: float, now: float) -> float:
    """The dialer's deadline once the listener's HELLO is in, `now`: what is left of the handshake (one round trip,
    and the first call's) may take as long as the dial took so far, a link's setup and one round trip. So a link
    with a round trip over a second, whose setup alone takes most of connect_timeout, still opens, and a listener
    that drags its HELLO out gains at most connect_timeout more."""
    return max(deadline, now + (now - started))


async def confirm_handshake(reactor, endpoint) -> None:
    """The listener's last step: tell the dialer its connection is in service (see step 4)."""
    await _send(reactor, endpoint, ACCEPTED)


async def accept_handshake(reactor, endpoint, find_identity, recv_base: int, timeout: float) -> Authenticated:
    """Run the listener's side; `find_identity(target_raw_or_None)` returns (the local peer that answers, whether
    it is the one asked for)."""

    async def run() -> Authenticated:
        theirs, their_bytes = await _recv_hello(reactor, endpoint)
        identity, found = find_identity(None if theirs.target == NO_TARGET else theirs.target)
        ephemeral, ephemeral_public = _ephemeral()
        flags = 0 if found else FLAG_NOT_HERE
        my_bytes = _my_hello(identity, recv_base, NO_TARGET, ephemeral_public, flags)
        transcript = _transcript(their_bytes, my_bytes)
        sent = time.monotonic()  # before the send: the clock starts no later than the bytes leave
        await _send(reactor, endpoint, my_bytes + identity.sign(LISTENER_ROLE + transcript))
        if not found:
            raise HandshakeError(f"a peer asked for {PeerID(theirs.target)}, which does not live here")
        _check_segments(reactor, theirs, "the dialer")  # after our HELLO: the dialer finds out why, too
        signature = await _recv_exact(reactor, endpoint, SIGNATURE_BYTES)
        rtt = time.monotonic() - sent
        peer_id = _verify(theirs, signature, DIALER_ROLE, transcript)
        try:
            roles = _admit(theirs)
        except MembershipError:
            await _send(reactor, endpoint, REFUSED)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(REFUSAL_LINGER):
                    await _recv_exact(reactor, endpoint, 1)  # returns when the dialer hangs up
            raise
        to_listener, to_dialer, dialer_reads, listener_reads, rail_key = _derive(
            ephemeral, theirs.ephemeral, transcript
        )
        return Authenticated(
            peer_id,
            theirs.public_key,
            theirs.recv_base,
            identity,
            False,
            to_dialer,
            to_listener,
            listener_reads,
            dialer_reads,
            roles=roles,
            rtt=rtt,
            rail_key=rail_key,
            link_id=_link_id(transcript),
        )

    async with asyncio.timeout(timeout):
        return await run()
