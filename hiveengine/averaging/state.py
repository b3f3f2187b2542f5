"""Sharing state between averagers: a newcomer downloads tensors and metadata whose hash a quorum attests.

Each averager advertises (address, epoch, digest) in the DHT, signed by its transport key (records.py: the
subkey is its owner marker), where digest is the hash of the state it holds (`state_digest`, or the averager's
own function when only part of its state must agree between peers). Peers that averaged together hold the same
state, so an advertisement is also an attestation: "the state of epoch e hashes to d". A newcomer counts, for
each (epoch, digest), the distinct signed peers that advertise it, ignores those above the epoch it was told to
trust (the Optimizer passes the epoch its progress records corroborate), and takes only a state that at least
STATE_QUORUM peers attest (or all of them, when fewer advertise): the most attested first, the newer on a tie.
It downloads from any peer advertising that digest, into a scratch buffer, hashes what it received, and copies
it into its tensors only if the hash matches; on a mismatch it tries the next donor. So one peer advertising its
own state under a huge epoch, or serving other bytes than it advertised, never gets its tensors loaded.

Download: the donor copies its tensors into a snapshot while no averaging round is writing them; the newcomer
pulls it in chunks, each encoded with the codec it asked for. A lossy codec cannot reproduce the attested bytes:
such a download comes from a peer that attests the chosen state, but is not verified.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import math
import os
import time
from dataclasses import dataclass

import msgpack
import torch

from hiveengine.averaging.records import store_signed
from hiveengine.codec import get_codec
from hiveengine.dht import DHT, get_dht_time
from hiveengine.dht.schemas import state_ad_problem
from hiveengine.dht.validation import signer_of
from hiveengine.errors import PeerBusyError, ProtocolError, TransportError
from hiveengine.transport import Identity, Peer, PeerID, Request

logger = logging.getLogger(__name__)

META_METHOD = "hiveengine.averaging.state.meta"
CHUNK_METHOD = "hiveengine.averaging.state.chunk"
DECLARE_STATE_PERIOD = 30.0  # seconds between renewals of a sharing peer's advertisement (hivemind's default too)
STATE_TTL_PERIODS = 4  # an advertisement lives this many periods: renewals that fail now and then do not lose it
STATE_CHUNK_ELEMENTS = 1 << 22
STATE_WINDOW = 4  # chunks in flight during a download
MAX_SNAPSHOTS = 2  # concurrent downloads a peer serves (each holds one copy of the tensors)
BUSY_RETRY_SECONDS = 0.2
STATE_QUORUM = 2  # distinct signed peers that must attest a state's digest (all advertisers, when fewer)
DIGEST_DOMAIN = b"hiveengine-state-digest-v1"


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


@dataclass(frozen=True)
class Source:
    """One signed state advertisement: who serves which state (its epoch and digest), and where."""

    peer_id: PeerID
    address: str
    epoch: int
    digest: bytes


def state_digest(flat: torch.Tensor, metadata: dict) -> bytes:
    """SHA-256 of the whole state: DIGEST_DOMAIN, the metadata (msgpack) and the flat buffer's bytes."""
    digest = hashlib.sha256(DIGEST_DOMAIN)
    digest.update(msgpack.packb(metadata, use_bin_type=True))
    digest.update(flat.detach().contiguous().cpu().view(torch.uint8).numpy())
    return digest.digest()


async def advertise(
    dht: DHT, identity: Identity, prefix: str, address: str, epoch: int, digest: bytes, ttl: float
) -> bool:
    """Tell the swarm, for `ttl` seconds, that this peer serves the state of `epoch` whose hash is `digest` (signed
    by `identity`)."""
    return await store_signed(dht, identity, state_key(prefix), [address, epoch, digest], get_dht_time() + ttl)


async def retract(dht: DHT, identity: Identity, prefix: str, ttl: float) -> None:
    """Stop advertising this peer's state: a newer, empty entry replaces the advertisement (and outlives it: `ttl`)."""
    await store_signed(dht, identity, state_key(prefix), None, get_dht_time() + ttl)


async def find_sources(dht: DHT, prefix: str, exclude: PeerID) -> list[Source]:
    """The well-formed, signed state advertisements of `prefix` but `exclude`'s (others are skipped, logged)."""
    found = await dht.aget(state_key(prefix), latest=True)
    sources = []
    for subkey, entry in (found.value if found is not None and isinstance(found.value, dict) else {}).items():
        peer_id = signer_of(subkey)
        if peer_id is None or peer_id == exclude or entry.value is None:
            continue
        problem = state_ad_problem(peer_id, entry.value)
        if problem is not None:
            logger.info("skipping the state advertisement of %s: %s", peer_id, problem)
        else:
            sources.append(Source(peer_id, *entry.value))
    return sources


def corroborated(sources: list[Source], quorum: int = STATE_QUORUM, max_epoch: int | None = None) -> list[list[Source]]:
    """The states a newcomer may load, best first, each as the sources that serve it: (epoch, digest) pairs no
    newer than `max_epoch`, attested by at least `quorum` distinct peers (or by every advertiser, when fewer
    advertise); the most attested first, the newer epoch on a tie."""
    kept = [s for s in sources if max_epoch is None or s.epoch <= max_epoch]
    if len(kept) < len(sources):
        logger.info("ignoring %d state advertisement(s) above epoch %s", len(sources) - len(kept), max_epoch)
    states: dict[tuple[int, bytes], list[Source]] = {}
    for source in kept:
        states.setdefault((source.epoch, source.digest), []).append(source)
    needed = min(quorum, len({s.peer_id for s in kept}))
    candidates = [group for group in states.values() if len(group) >= needed]
    if len(candidates) < len(states):
        logger.info("ignoring %d state(s) attested by fewer than %d peers", len(states) - len(candidates), needed)
    return sorted(candidates, key=lambda group: (len(group), group[0].epoch), reverse=True)


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
    metadata = meta.get("metadata", {})
    if not isinstance(metadata, dict):
        raise ProtocolError(f"{address} sent state metadata that is not a dictionary")
    return {"epoch": meta.get("epoch", 0), "metadata": metadata}


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0 or not math.isfinite(left):
        raise TransportError("the state download ran out of time")
    return left
