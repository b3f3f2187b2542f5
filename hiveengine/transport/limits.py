"""Every bound the transport enforces, as named defaults that a Peer can override."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from hiveengine.errors import ConfigurationError

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
LOCAL_COPY_ENV = "HIVEENGINE_LOCAL_COPY"  # "0" turns the same-host direct copy off (e.g. to test a network)
ENCRYPT_ENV = "HIVEENGINE_ENCRYPT"  # "0": messages between hosts are authenticated but readable (trusted clusters)
LINK_ENV = "HIVEENGINE_LINK"  # which wire this peer dials with: "auto" (default), "ucx" or "tcp" (see pool.py)
LINKS = ("auto", "ucx", "tcp")
RAILS_ENV = "HIVEENGINE_TCP_RAILS"  # extra TCP connections a TCP wire opens for large frames (rails.py; default 4)
MAX_RAILS = 64  # the most rails a wire may have (PCCL uses about 64 TCP connections per peer across Europe)


@dataclass(frozen=True)
class TransportLimits:
    """Bounds on what one peer accepts and how long it waits."""

    # A control message (msgpack header, possibly zstd-compressed) must fit in this buffer.
    max_header_bytes: int = 64 * KiB
    # Tensor frames one message may carry, and how large each and all of them may be.
    max_frames: int = 256
    max_frame_bytes: int = 1 * GiB
    max_message_bytes: int = 2 * GiB
    # Resource limits (resources.py), for the whole Peer and for each remote peer: past one, a call is refused
    # with a ResourceLimitError naming it (a connection whose frames alone would pass one is closed instead).
    # Bytes of inbound tensors held at once (reserved when a request is admitted, until its handler returns).
    max_inbound_bytes: int = 4 * GiB
    max_inbound_bytes_per_peer: int = 1 * GiB
    # Inbound calls being received or handled (each is a task).
    max_calls_in_flight: int = 8192
    max_calls_in_flight_per_peer: int = 512
    # Inbound streams open at once.
    max_streams: int = 256
    max_streams_per_peer: int = 16
    # UCX receives posted for announced frames (including 1-byte receives that drop unwanted frames).
    max_posted_receives: int = 65536
    max_posted_receives_per_peer: int = 8192
    # Announced frames must have arrived within frame_timeout + their size / min_frame_bytes_per_second, plus the
    # round trips TCP's slow start needs for that size (of the link's measured round trip, counted up to
    # max_deadline_rtt), of being expected; otherwise the sender is broken or hostile, and the connection is
    # closed (which is also the only way to cancel UCX receives: their reservations go with it).
    frame_timeout: float = 10.0
    min_frame_bytes_per_second: float = 10e6
    max_deadline_rtt: float = 3.0
    # Connections accepted but not yet authenticated; more are closed at once (each holds sockets).
    max_unauthenticated: int = 64
    # Host tensors totalling at most this many bytes travel inside the control message (one UCX message
    # instead of one per tensor: small calls are latency-bound).
    inline_tensor_bytes: int = 16 * KiB
    # Between processes on one host, host tensors totalling at least this many bytes are read by the
    # receiver straight from the sender's memory (one copy; see local_copy.py) instead of through UCX.
    local_copy: bool = field(default_factory=lambda: os.environ.get(LOCAL_COPY_ENV, "1") != "0")
    local_copy_min_bytes: int = 256 * KiB
    # Encrypt what we send to other hosts (session.py); off, every message is still authenticated, but readable.
    encrypt: bool = field(default_factory=lambda: os.environ.get(ENCRYPT_ENV, "1") != "0")
    # Which wire this peer dials with: "ucx", "tcp" (a socket we open; works from behind a NAT, tcp_wire.py), or
    # "auto": TCP once this peer is known to be unreachable or a UCX dial to that peer failed, UCX otherwise.
    link: str = field(default_factory=lambda: os.environ.get(LINK_ENV, "auto"))
    # Ask a peer we reach through a relay to dial us directly, and use that link instead (upgrade.py).
    upgrade_relayed: bool = True
    # Frames a TCP wire holds for receives not yet posted, per wire and for the whole process (tcp_wire.py); past
    # either the wire stops reading until a receive is posted. Per wire: one full stream window of chunks.
    tcp_unexpected_bytes: int = 80 * MiB
    max_tcp_unexpected_bytes: int = 512 * MiB
    # Extra TCP connections (rails, rails.py) a TCP wire's dialler opens once a frame of at least tcp_rail_min_bytes
    # crosses it; larger frames then go side by side on them (a long, fat or lossy link carries more over several TCP
    # windows than over one). A listener takes at most its own tcp_rails per wire. 0: one socket per wire.
    tcp_rails: int = field(default_factory=lambda: _int_env(RAILS_ENV, 4))
    tcp_rail_min_bytes: int = 1 * MiB
    # User headers larger than this are zstd-compressed on the wire.
    compress_threshold_bytes: int = 4 * KiB
    # Streams: chunk size and how many chunks a sender keeps in flight.
    stream_chunk_bytes: int = 16 * MiB
    stream_window: int = 4
    # Open connections one peer keeps; past it the least recently used idle one is closed (each UCX
    # endpoint holds several sockets, and a process has a limited number of file descriptors).
    max_connections: int = 256
    # ... but never one opened less than this many seconds ago (libp2p's grace period): its first call may be
    # on its way. Past the grace period, eviction is tried again.
    connection_grace_seconds: float = 5.0
    # Deadlines (seconds).
    connect_timeout: float = 5.0
    handshake_timeout: float = 5.0
    default_call_timeout: float = 30.0
    # How long a handler may run: the caller's deadline, but never more than this (the server's cap).
    max_handler_seconds: float = 300.0

    def __post_init__(self):
        if self.link not in LINKS:
            raise ConfigurationError(f"{LINK_ENV} / TransportLimits.link={self.link!r}: expected one of {LINKS}")
        if not 0 <= self.tcp_rails <= MAX_RAILS:
            raise ConfigurationError(
                f"{RAILS_ENV} / TransportLimits.tcp_rails={self.tcp_rails}: expected 0 to {MAX_RAILS}"
            )

    def frame_deadline(self, nbytes: int, rtt: float = 0.0) -> float:
        """Seconds announced frames of `nbytes` in all may take to arrive over a link with round trip `rtt`: on a
        long link a fresh TCP window grows for several round trips before it carries that much (4 MiB over a
        1.5 s round trip: about 13 s), whatever the bandwidth. The handshake measures `rtt`, which a hostile peer
        can drag out, so at most max_deadline_rtt of it counts."""
        return self.frame_timeout + self.transfer_time(nbytes, rtt)

    def transfer_time(self, nbytes: int, rtt: float = 0.0) -> float:
        """Seconds `nbytes` may take to cross a fresh link with round trip `rtt` (at most max_deadline_rtt of it): at
        min_frame_bytes_per_second, plus the round trips TCP's slow start needs for that size."""
        rounds = slow_start_round_trips(nbytes)
        return nbytes / self.min_frame_bytes_per_second + min(rtt, self.max_deadline_rtt) * rounds


def _int_env(name: str, default: int) -> int:
    text = os.environ.get(name, "")
    try:
        return int(text) if text else default
    except ValueError:
        raise ConfigurationError(f"{name}={text!r}: expected a whole number") from None


INITIAL_WINDOW_BYTES = 10 * 1448  # TCP's initial congestion window (RFC 6928: 10 segments)


def slow_start_round_trips(nbytes: int) -> int:
    """Round trips a fresh TCP connection takes to deliver `nbytes`: its window starts at INITIAL_WINDOW_BYTES and
    doubles each round trip, plus one for the request that announced them."""
    return 1 + math.ceil(math.log2(1 + nbytes / INITIAL_WINDOW_BYTES))


DEFAULT_LIMITS = TransportLimits()
