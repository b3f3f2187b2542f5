"""Mutual authentication when a connection opens: each side proves it holds the key of its peer id.

Over the UCX stream API: the connector sends HELLO (its key, a nonce, the id it wants to reach and
the tag base it receives on); the listener answers with its own HELLO and a signature of both
HELLOs; the connector answers with its signature. A peer that cannot sign for the key it shows
never gets a connection, and the connector checks the listener is the peer its address names.
"""

from __future__ import annotations

import asyncio
import os
import struct
from dataclasses import dataclass

import numpy as np

from hiveengine.errors import HandshakeError
from hiveengine.transport.identity import SIGNATURE_BYTES, Identity, PeerID, verify_signature

MAGIC = b"HIVE"
PROTOCOL_VERSION = 3  # 2: small tensors inline after the header; 3: same-host direct copy messages
HELLO = struct.Struct("<4sHHI32s32s32s")  # magic, version, flags, recv tag base, target id, key, nonce
TRANSCRIPT_DOMAIN = b"hiveengine-handshake-v1"
NO_TARGET = bytes(32)


@dataclass(frozen=True)
class Hello:
    recv_base: int
    target: bytes
    public_key: bytes
    nonce: bytes

    def pack(self) -> bytes:
        return HELLO.pack(MAGIC, PROTOCOL_VERSION, 0, self.recv_base, self.target, self.public_key, self.nonce)

    @classmethod
    def unpack(cls, data: bytes) -> Hello:
        magic, version, _flags, base, target, key, nonce = HELLO.unpack(data)
        if magic != MAGIC:
            raise HandshakeError("the remote end is not a hiveengine peer (bad handshake magic)")
        if version != PROTOCOL_VERSION:
            raise HandshakeError(f"protocol version {version} is not supported (this peer speaks {PROTOCOL_VERSION})")
        return cls(base, target, key, nonce)


@dataclass(frozen=True)
class Authenticated:
    """The outcome of a handshake: who the remote peer is and which tag base it receives on."""

    peer_id: PeerID
    public_key: bytes
    remote_recv_base: int
    local: Identity


def _transcript(first: bytes, second: bytes) -> bytes:
    return TRANSCRIPT_DOMAIN + first + second


async def _recv_exact(reactor, endpoint, nbytes: int) -> bytes:
    buf = np.empty(nbytes, dtype=np.uint8)
    await reactor.stream_recv(endpoint, buf)
    return buf.tobytes()


async def _send(reactor, endpoint, data: bytes) -> None:
    await reactor.stream_send(endpoint, np.frombuffer(data, dtype=np.uint8).copy())


def _verify(hello: Hello, signature: bytes, transcript: bytes) -> PeerID:
    if not verify_signature(hello.public_key, signature, transcript):
        raise HandshakeError("the remote peer's handshake signature is invalid (forged or corrupted identity)")
    return PeerID.from_public_key(hello.public_key)


async def connect_handshake(
    reactor, endpoint, identity: Identity, expected: PeerID | None, recv_base: int, timeout: float
) -> Authenticated:
    """Run the connector's side; raise HandshakeError if the listener is not `expected`."""

    async def run() -> Authenticated:
        mine = Hello(recv_base, expected.raw if expected else NO_TARGET, identity.public_key, os.urandom(32))
        my_bytes = mine.pack()
        await _send(reactor, endpoint, my_bytes)
        their_bytes = await _recv_exact(reactor, endpoint, HELLO.size)
        theirs = Hello.unpack(their_bytes)
        signature = await _recv_exact(reactor, endpoint, SIGNATURE_BYTES)
        transcript = _transcript(my_bytes, their_bytes)
        peer_id = _verify(theirs, signature, transcript)
        if expected is not None and peer_id != expected:
            raise HandshakeError(f"the peer at this address is {peer_id}, not {expected}")
        await _send(reactor, endpoint, identity.sign(transcript))
        return Authenticated(peer_id, theirs.public_key, theirs.recv_base, identity)

    async with asyncio.timeout(timeout):
        return await run()


async def accept_handshake(reactor, endpoint, find_identity, recv_base: int, timeout: float) -> Authenticated:
    """Run the listener's side; `find_identity(target_raw_or_None)` picks which local peer answers."""

    async def run() -> Authenticated:
        their_bytes = await _recv_exact(reactor, endpoint, HELLO.size)
        theirs = Hello.unpack(their_bytes)
        identity = find_identity(None if theirs.target == NO_TARGET else theirs.target)
        mine = Hello(recv_base, NO_TARGET, identity.public_key, os.urandom(32))
        my_bytes = mine.pack()
        transcript = _transcript(their_bytes, my_bytes)
        await _send(reactor, endpoint, my_bytes + identity.sign(transcript))
        signature = await _recv_exact(reactor, endpoint, SIGNATURE_BYTES)
        peer_id = _verify(theirs, signature, transcript)
        return Authenticated(peer_id, theirs.public_key, theirs.recv_base, identity)

    async with asyncio.timeout(timeout):
        return await run()
