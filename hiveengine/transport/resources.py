"""The resource manager: per-peer and whole-Peer budgets for what remote peers make us hold (after libp2p's).

Every inbound call, stream, posted receive and reserved byte is acquired here before it exists and released when
it ends (the handler returns, the call times out, the frames do not come in time, or the connection goes). A
budget that would be exceeded refuses with a ResourceLimitError naming the TransportLimits field. Nothing is
acquired for a connection before it is authenticated: the handshake holds only its fixed-size buffers.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from hiveengine.errors import ResourceLimitError
from hiveengine.transport.limits import TransportLimits

# resource -> (the whole Peer's limit, each remote peer's limit), both TransportLimits fields
LIMITS: dict[str, tuple[str, str]] = {
    "inbound_bytes": ("max_inbound_bytes", "max_inbound_bytes_per_peer"),
    "calls": ("max_calls_in_flight", "max_calls_in_flight_per_peer"),
    "streams": ("max_streams", "max_streams_per_peer"),
    "receives": ("max_posted_receives", "max_posted_receives_per_peer"),
}


@dataclass
class Usage:
    inbound_bytes: int = 0
    calls: int = 0
    streams: int = 0
    receives: int = 0

    def empty(self) -> bool:
        return not any(getattr(self, f.name) for f in fields(self))


class ResourceManager:
    """What remote peers hold of one Peer, in total and each."""

    def __init__(self, limits: TransportLimits):
        self.limits = limits
        self.total = Usage()
        self.peers: dict[object, Usage] = {}
        self.peak = Usage()  # the most held at once in all, and by any one peer (high-water marks)
        self.peak_per_peer = Usage()

    def acquire(self, peer, resource: str, amount: int = 1) -> None:
        """Take `amount` of `resource` for `peer`, or raise ResourceLimitError naming the limit it would pass."""
        usage = self.peers.get(peer) or Usage()
        whole, each = LIMITS[resource]
        for scope, name, held in ((f"from {peer}", each, usage), ("in all", whole, self.total)):
            limit = getattr(self.limits, name)
            now = getattr(held, resource)
            if now + amount > limit:
                raise ResourceLimitError(
                    f"{resource.replace('_', ' ')} {scope}: {now} held, {amount} more would pass "
                    f"TransportLimits.{name}={limit}; retry later",
                    limit=name,
                )
        self.peers[peer] = usage
        setattr(usage, resource, getattr(usage, resource) + amount)
        setattr(self.total, resource, getattr(self.total, resource) + amount)
        setattr(self.peak, resource, max(getattr(self.peak, resource), getattr(self.total, resource)))
        setattr(self.peak_per_peer, resource, max(getattr(self.peak_per_peer, resource), getattr(usage, resource)))

    def release(self, peer, resource: str, amount: int = 1) -> None:
        usage = self.peers.get(peer)
        if usage is None:
            return
        setattr(usage, resource, getattr(usage, resource) - amount)
        setattr(self.total, resource, getattr(self.total, resource) - amount)
        if usage.empty():
            del self.peers[peer]

    def held(self, peer=None) -> Usage:
        """What `peer` (or, without one, everyone) holds now."""
        if peer is None:
            return Usage(**{f.name: getattr(self.total, f.name) for f in fields(Usage)})
        return self.peers.get(peer) or Usage()
