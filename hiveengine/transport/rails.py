"""Rails: extra TCP connections that carry a TCP wire's large frames side by side, so that a long, fat or lossy link
is not held to what one TCP connection's congestion window can carry (PCCL runs dozens per peer across Europe).

Only the peer that opened the wire opens its rails, as it opened the wire (it may sit behind a NAT); it opens them
once a frame of at least TransportLimits.tcp_rail_min_bytes crosses the wire in either direction, so links that carry
only small messages (most DHT traffic) never hold more than one socket. Control messages, and frames smaller than
that, stay on the wire's first socket; larger frames each go whole on the rail with the least left to send. A frame
is bound to its message and its position by its seal (session.py), not by the socket it travels on, so rails change
nothing in what the session guarantees. One rail failing closes the whole wire: a frame on it would be lost.

Joining (`cryptography` primitives only). The handshake derives, with the session keys, a 32-byte rail key and a
16-byte link id (handshake.py). To open rail i (1 <= i <= tcp_rails), the dialler connects to the listener's TCP
port and sends JOIN = RAIL_MAGIC | link id | i (u16, little-endian) | HMAC-SHA256(rail key, RAIL_DOMAIN | link id |
i); the listener looks up the wire with that link id, verifies the tag in constant time, refuses an index past its
own tcp_rails or one already joined, and answers JOINED (one byte) before it sends anything on the rail. The join
travels under the same cap on unauthenticated connections and handshake_timeout as a handshake. Someone on the path
who replays a join gets nothing it could not get by resetting the connection: the index is taken (or the wire is gone
when the replay arrives later), and bytes it sent down a rail would fail to open and close the wire.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.hmac import HMAC

from hiveengine.errors import HandshakeError

RAIL_MAGIC = b"HRAL"
RAIL_DOMAIN = b"hiveengine-rail-v1"
LINK_ID_BYTES = 16
_HEAD = struct.Struct(f"<4s{LINK_ID_BYTES}sH")
MAC_BYTES = 32
JOIN_BYTES = _HEAD.size + MAC_BYTES
JOINED = b"\x01"


def _mac(key: bytes, link_id: bytes, index: int) -> HMAC:
    mac = HMAC(key, hashes.SHA256())
    mac.update(RAIL_DOMAIN + link_id + index.to_bytes(2, "little"))
    return mac


def join_request(key: bytes, link_id: bytes, index: int) -> bytes:
    """The JOIN a dialler sends to open rail `index` of the wire with `link_id`."""
    return _HEAD.pack(RAIL_MAGIC, link_id, index) + _mac(key, link_id, index).finalize()


def parse_join(data: bytes) -> tuple[bytes, int, bytes]:
    """(link id, rail index, tag) of a JOIN of exactly JOIN_BYTES; HandshakeError if it is not one."""
    if len(data) != JOIN_BYTES:
        raise HandshakeError(f"a rail join of {len(data)} bytes (expected {JOIN_BYTES})")
    magic, link_id, index = _HEAD.unpack_from(data)
    if magic != RAIL_MAGIC:
        raise HandshakeError("a rail join without its magic")
    return link_id, index, data[_HEAD.size :]


def check_join(key: bytes, link_id: bytes, index: int, tag: bytes) -> None:
    """HandshakeError unless `tag` is the rail key's tag of (link id, index)."""
    try:
        _mac(key, link_id, index).verify(tag)
    except InvalidSignature:
        raise HandshakeError(f"a join for rail {index} whose tag does not verify") from None
