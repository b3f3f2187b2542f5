"""Peer addresses: one copy-pasteable string `ucx://host:port/<peer-id>`, or `ucx://host:port/tcp=PORT/<peer-id>`
where the peer also accepts TCP wires (tcp_wire.py: the links peers behind a NAT open), or
`ucx://HOST:PORT/tcp=PORT/relay=<relay-id>/<peer-id>` for a peer reached through the relay at HOST (relay.py).
The peer id stays the last path segment, so code that reads it off the string keeps working."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from urllib.parse import urlsplit

from hiveengine.transport.identity import PeerID

SCHEME = "ucx"
PARSED_CACHE_SIZE = 4096


@dataclass(frozen=True)
class PeerAddress:
    """Where a peer listens and who it must prove to be."""

    host: str
    port: int
    peer_id: PeerID
    tcp_port: int | None = None  # where the peer accepts TCP wires, if it does
    relay: PeerID | None = None  # reached through this relay, which listens at host, port and tcp_port (relay.py)

    @classmethod
    def parse(cls, text: str | PeerAddress) -> PeerAddress:
        return text if isinstance(text, PeerAddress) else _parse(text)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        options = f"tcp={self.tcp_port}/" if self.tcp_port else ""
        options += f"relay={self.relay}/" if self.relay else ""
        return f"{SCHEME}://{host}:{self.port}/{options}{self.peer_id}"


@functools.lru_cache(maxsize=PARSED_CACHE_SIZE)
def _parse(text: str) -> PeerAddress:
    """Parse an address string (cached: callers pass the same few strings on every call)."""
    parts = urlsplit(text.strip())
    try:
        port = parts.port
    except ValueError:
        port = None
    segments = parts.path.strip("/").split("/")
    if parts.scheme != SCHEME or not parts.hostname or not port or not segments[-1] or parts.query or parts.fragment:
        raise ValueError(f"{text!r} is not a peer address; expected {SCHEME}://HOST:PORT/PEER_ID")
    options = dict(segment.partition("=")[::2] for segment in segments[:-1])
    tcp, relay = options.pop("tcp", None), options.pop("relay", None)
    if options or (tcp is not None and not (tcp.isdigit() and 0 < int(tcp) < 1 << 16)) or (relay and not tcp):
        raise ValueError(f"{text!r}: bad address options {segments[:-1]} (known: tcp=PORT, relay=PEER_ID with tcp)")
    relay_id = PeerID.from_string(relay) if relay else None
    return PeerAddress(parts.hostname, port, PeerID.from_string(segments[-1]), int(tcp) if tcp else None, relay_id)
