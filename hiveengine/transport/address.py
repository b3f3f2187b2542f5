"""Peer addresses: one copy-pasteable string `ucx://host:port/<peer-id>`, or `ucx://host:port/tcp=PORT/<peer-id>`
where the peer also accepts TCP wires (tcp_wire.py: the links peers behind a NAT open). The peer id stays the
last path segment, so code that reads it off the string keeps working."""

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

    @classmethod
    def parse(cls, text: str | PeerAddress) -> PeerAddress:
        return text if isinstance(text, PeerAddress) else _parse(text)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        options = f"tcp={self.tcp_port}/" if self.tcp_port else ""
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
    tcp = options.pop("tcp", None)
    if options or (tcp is not None and not (tcp.isdigit() and 0 < int(tcp) < 1 << 16)):
        raise ValueError(f"{text!r}: unknown address options {segments[:-1]} (only tcp=PORT is known)")
    return PeerAddress(parts.hostname, port, PeerID.from_string(segments[-1]), int(tcp) if tcp else None)
