"""Sharing state between averagers: a newcomer downloads the newest tensors and metadata from a peer.

Each averager advertises (address, epoch) in the DHT. A downloader asks the peer with the newest epoch
for a snapshot (the server copies its tensors while no averaging round is writing them), then pulls it
in chunks, each encoded with the codec it asked for, straight into its own flat buffer.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import time
from dataclasses import dataclass

import torch

from hiveengine.codec import get_codec
from hiveengine.dht import DHT, get_dht_time
from hiveengine.errors import PeerBusyError, ProtocolError, TransportError
from hiveengine.transport import Peer, Request

logger = logging.getLogger(__name__)

META_METHOD = "hiveengine.averaging.state.meta"
CHUNK_METHOD = "hiveengine.averaging.state.chunk"
STATE_TTL = 120.0  # seconds an advertisement lives in the DHT unless renewed
STATE_CHUNK_ELEMENTS = 1 << 22
STATE_WINDOW = 4  # chunks in flight during a download
MAX_SNAPSHOTS = 2  # concurrent downloads a peer serves (each holds one copy of the tensors)
BUSY_RETRY_SECONDS = 0.2


def state_key(prefix: str) -> str:
    return f"{prefix}.state"


@dataclass
class Snapshot:
    tensor: torch.Tensor
    epoch: int
    metadata: dict


class StateServer:
    """Serves snapshots of one averager's flat buffer to peers that want to catch up."""

    def __init__(self, peer: Peer, averager):
        self.averager = averager
        self._snapshots: collections.OrderedDict[bytes, Snapshot] = collections.OrderedDict()
        peer.register(META_METHOD, self._on_meta)
        peer.register(CHUNK_METHOD, self._on_chunk)

    async def _on_meta(self, request: Request) -> dict:
        if not self.averager.allow_state_sharing:
            raise ProtocolError("this peer does not share its state now; ask another")
        lock = self.averager.tensors_lock
        if not lock.acquire(blocking=False):
            raise PeerBusyError("averaging right now; ask again in a moment")
        try:
            snapshot = Snapshot(self.averager.flat.clone(), self.averager.local_epoch, self.averager.state_metadata)
        finally:
            lock.release()
        session = os.urandom(8)
        self._snapshots[session] = snapshot
        while len(self._snapshots) > MAX_SNAPSHOTS:
            self._snapshots.popitem(last=False)
        return {
            "session": session,
            "epoch": snapshot.epoch,
            "numel": snapshot.tensor.numel(),
            "dtype": str(snapshot.tensor.dtype).removeprefix("torch."),
            "metadata": snapshot.metadata,
        }

    async def _on_chunk(self, request: Request):
        header = request.header
        snapshot = self._snapshots.get(header.get("session"))
        if snapshot is None:
            raise ProtocolError("unknown or expired snapshot session; request the metadata again")
        start, end, codec = header.get("start"), header.get("end"), header.get("codec")
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= snapshot.tensor.numel()):
            raise ProtocolError(f"chunk [{start}, {end}) is outside the {snapshot.tensor.numel()}-element state")
        payload = get_codec(str(codec)).encode(snapshot.tensor[start:end], name="state")
        return {}, payload


async def advertise(dht: DHT, prefix: str, address: str, peer_raw: bytes, epoch: int) -> None:
    """Tell the swarm this peer can serve its state at `epoch`."""
    await dht.astore(state_key(prefix), [address, epoch], get_dht_time() + STATE_TTL, subkey=peer_raw)


async def retract(dht: DHT, prefix: str, peer_raw: bytes) -> None:
    """Stop advertising this peer's state (a newer, empty entry replaces the advertisement)."""
    await dht.astore(state_key(prefix), None, get_dht_time() + STATE_TTL, subkey=peer_raw)


async def find_sources(dht: DHT, prefix: str, exclude: bytes) -> list[tuple[int, str]]:
    """(epoch, address) of peers advertising state, newest first."""
    found = await dht.aget(state_key(prefix), latest=True)
    sources = []
    for raw, entry in (found.value if found is not None and isinstance(found.value, dict) else {}).items():
        try:
            address, epoch = entry.value
            if raw != exclude and isinstance(address, str) and isinstance(epoch, int):
                sources.append((epoch, address))
        except (TypeError, ValueError, AttributeError):
            continue
    return sorted(sources, reverse=True)


async def download(peer: Peer, address: str, flat: torch.Tensor, codec_name: str, deadline: float) -> dict:
    """Pull a snapshot from `address` into `flat` (same size and dtype); return its epoch and metadata."""
    while True:
        try:
            meta, _ = await peer.call(address, META_METHOD, {}, timeout=_remaining(deadline))
            break
        except PeerBusyError:
            if _remaining(deadline) <= BUSY_RETRY_SECONDS:
                raise
            await asyncio.sleep(BUSY_RETRY_SECONDS)
    if meta.get("numel") != flat.numel() or meta.get("dtype") != str(flat.dtype).removeprefix("torch."):
        raise ProtocolError(
            f"{address} holds {meta.get('numel')} {meta.get('dtype')} values, this averager {flat.numel()} "
            f"{flat.dtype}: they do not average the same tensors"
        )
    codec = get_codec(codec_name)
    semaphore = asyncio.Semaphore(STATE_WINDOW)

    async def pull(start: int, end: int) -> None:
        async with semaphore:
            header = {"session": meta["session"], "start": start, "end": end, "codec": codec.name}
            piece = flat[start:end]
            if codec.name == "none" and flat.dtype == torch.float32:
                await peer.call(address, CHUNK_METHOD, header, timeout=_remaining(deadline), out=[piece])
            else:
                _, payload = await peer.call(address, CHUNK_METHOD, header, timeout=_remaining(deadline))
                codec.decode(payload, piece, name="downloaded state")

    spans = [(s, min(s + STATE_CHUNK_ELEMENTS, flat.numel())) for s in range(0, flat.numel(), STATE_CHUNK_ELEMENTS)]
    await asyncio.gather(*(pull(s, e) for s, e in spans))
    return {"epoch": meta.get("epoch", 0), "metadata": meta.get("metadata", {})}


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0 or not math.isfinite(left):
        raise TransportError("the state download ran out of time")
    return left
