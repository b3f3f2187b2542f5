"""Peer addresses: one copy-pasteable string `ucx://host:port/<peer-id>`."""

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

    @classmethod
    def parse(cls, text: str | PeerAddress) -> PeerAddress:
        return text if isinstance(text, PeerAddress) else _parse(text)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{SCHEME}://{host}:{self.port}/{self.peer_id}"


@functools.lru_cache(maxsize=PARSED_CACHE_SIZE)
def _parse(text: str) -> PeerAddress:
    """Parse an address string (cached: callers pass the same few strings on every call)."""
    parts = urlsplit(text.strip())
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != SCHEME or not parts.hostname or not port or not parts.path.strip("/"):
        raise ValueError(f"{text!r} is not a peer address; expected {SCHEME}://HOST:PORT/PEER_ID")
    return PeerAddress(parts.hostname, port, PeerID.from_string(parts.path.strip("/")))
