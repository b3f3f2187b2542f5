"""Built-in services a peer can offer: a sink that lands a streamed tensor and answers with its checksum.

The sink is bounded like any handler: the tensor it allocates is reserved against the sender's and the whole
peer's inbound budgets (TransportLimits.max_inbound_bytes_per_peer, max_inbound_bytes) until it answers, and a
sender has at most max_streams_per_peer streams open."""

from __future__ import annotations

import torch

from hiveengine.errors import ProtocolError
from hiveengine.transport.dispatch import StreamRequest
from hiveengine.transport.peer import Peer

SINK_METHOD = "hiveengine.sink"
MAX_SINK_ELEMENTS = 1 << 30


async def _sink(request: StreamRequest) -> dict:
    dest: torch.Tensor | None = None
    async for chunk in request.chunks:
        total, offset = chunk.header.get("total"), chunk.header.get("offset")
        if not isinstance(total, int) or not isinstance(offset, int) or not 0 < total <= MAX_SINK_ELEMENTS:
            raise ProtocolError(f"sink chunks need integer 'total' (1..{MAX_SINK_ELEMENTS}) and 'offset'")
        if dest is None:
            request.reserve(total * chunk.spec.dtype.itemsize)  # counted against the sender's inbound budget
            dest = torch.empty(total, dtype=chunk.spec.dtype)
        if offset < 0 or offset + chunk.spec.numel > dest.numel() or chunk.spec.dtype != dest.dtype:
            raise ProtocolError(f"chunk at {offset} does not fit the {dest.numel()}-element {dest.dtype} tensor")
        await chunk.read(out=dest[offset : offset + chunk.spec.numel])
    if dest is None:
        return {"checksum": 0.0, "numel": 0}
    return {"checksum": float(dest.double().sum()), "numel": dest.numel()}


def serve_sink(peer: Peer) -> None:
    """Let `peer` receive tensors sent with `send_tensor(address, SINK_METHOD, x)`."""
    peer.register_stream(SINK_METHOD, _sink)
