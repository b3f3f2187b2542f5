"""Every bound the transport enforces, as named defaults that a Peer can override."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
LOCAL_COPY_ENV = "HIVEENGINE_LOCAL_COPY"  # "0" turns the same-host direct copy off (e.g. to test a network)


@dataclass(frozen=True)
class TransportLimits:
    """Bounds on what one peer accepts and how long it waits."""

    # A control message (msgpack header, possibly zstd-compressed) must fit in this buffer.
    max_header_bytes: int = 64 * KiB
    # Tensor frames one message may carry, and how large each and all of them may be.
    max_frames: int = 256
    max_frame_bytes: int = 1 * GiB
    max_message_bytes: int = 2 * GiB
    # Bytes of inbound tensors held at once across all calls; past it calls are refused as busy.
    max_inbound_bytes: int = 4 * GiB
    # Host tensors totalling at most this many bytes travel inside the control message (one UCX message
    # instead of one per tensor: small calls are latency-bound).
    inline_tensor_bytes: int = 16 * KiB
    # Between processes on one host, host tensors totalling at least this many bytes are read by the
    # receiver straight from the sender's memory (one copy; see local_copy.py) instead of through UCX.
    local_copy: bool = field(default_factory=lambda: os.environ.get(LOCAL_COPY_ENV, "1") != "0")
    local_copy_min_bytes: int = 256 * KiB
    # User headers larger than this are zstd-compressed on the wire.
    compress_threshold_bytes: int = 4 * KiB
    # Streams: chunk size and how many chunks a sender keeps in flight.
    stream_chunk_bytes: int = 16 * MiB
    stream_window: int = 4
    # Open connections one peer keeps; past it the least recently used idle one is closed (each UCX
    # endpoint holds several sockets, and a process has a limited number of file descriptors).
    max_connections: int = 256
    # Deadlines (seconds).
    connect_timeout: float = 5.0
    handshake_timeout: float = 5.0
    default_call_timeout: float = 30.0
    # How long a handler may run when the caller gave no deadline.
    max_handler_seconds: float = 600.0


DEFAULT_LIMITS = TransportLimits()
