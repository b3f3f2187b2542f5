"""Matchmaking through the DHT: peers that call step() in the same time slot form groups.

Time is cut into slots of `matchmaking_time` seconds. In a slot, each peer registers itself (address,
bandwidth, mode) as a subkey of the key (prefix, slot, bucket). When the slot ends every peer reads the
same registrations and cuts them, sorted by peer id, into groups of at most `target_group_size`. The
bucket is re-drawn from a hash of (peer id, slot) every slot, so when the swarm holds several groups their
members change from round to round and averages spread through the whole swarm (as in Moshpit SGD).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from dataclasses import dataclass

from hiveengine.averaging.group import GroupInfo, GroupMember, Mode
from hiveengine.transport import PeerID

logger = logging.getLogger(__name__)

MIN_JOIN_MARGIN = 0.25  # join the next slot when less than this fraction of the current one is left
SETTLE_SECONDS = 0.3  # after a slot ends, wait this long for late registrations to land before reading
REGISTRATION_SLACK = 30.0  # registrations outlive their slot by this long (then expire everywhere)


@dataclass(frozen=True)
class MatchmakingConfig:
    target_group_size: int = 16
    min_group_size: int = 2
    matchmaking_time: float = 3.0
    expected_swarm_size: int | None = None  # how many peers average at once (sets the number of buckets)

    def buckets(self) -> int:
        peers = self.expected_swarm_size or self.target_group_size
        return max(1, math.ceil(peers / self.target_group_size))


def slot_key(prefix: str, slot: int, bucket: int) -> str:
    return f"{prefix}.matchmaking.{slot}.{bucket}"


def bucket_of(peer_id: PeerID, slot: int, buckets: int) -> int:
    digest = hashlib.sha256(peer_id.raw + slot.to_bytes(8, "big")).digest()
    return int.from_bytes(digest[:8], "big") % buckets


def choose_slot(now: float, matchmaking_time: float) -> int:
    """The slot to join: the current one, unless too little of it is left for others to see us."""
    slot = math.floor(now / matchmaking_time)
    left = (slot + 1) * matchmaking_time - now
    return slot + 1 if left < MIN_JOIN_MARGIN * matchmaking_time else slot


def form_groups(slot: int, members: list[GroupMember], target: int) -> list[GroupInfo]:
    """Cut the slot's registrations (the same list on every peer) into near-equal groups of ≤ target."""
    members = sorted(members, key=lambda m: m.peer_id.raw)
    count = math.ceil(len(members) / target) if members else 0
    groups = []
    for i in range(count):
        chosen = tuple(members[i::count])  # interleaved, so groups are near-equal in size
        digest = hashlib.sha256(slot.to_bytes(8, "big") + b"".join(m.peer_id.raw for m in chosen)).digest()
        groups.append(GroupInfo(digest[:16], chosen))
    return groups


class Matchmaker:
    """Finds this peer's group for one averaging round through the DHT."""

    def __init__(self, dht, prefix: str, me: GroupMember, config: MatchmakingConfig):
        self.dht, self.prefix, self.me, self.config = dht, prefix, me, config

    async def find_group(self, deadline: float) -> GroupInfo | None:
        """Register for a slot, wait for it to end, and return our group (None: too few peers, or no time)."""
        cfg = self.config
        now = time.time()
        slot = choose_slot(now, cfg.matchmaking_time)
        slot_end = (slot + 1) * cfg.matchmaking_time
        if time.monotonic() + (slot_end - now) + SETTLE_SECONDS >= deadline:
            logger.info("no time left to find a group before the deadline")
            return None
        key = slot_key(self.prefix, slot, bucket_of(self.me.peer_id, slot, cfg.buckets()))
        record = [self.me.address, self.me.bandwidth, int(self.me.mode)]
        stored = await self.dht.astore(key, record, slot_end + REGISTRATION_SLACK, subkey=self.me.peer_id.raw)
        if not stored:
            logger.warning("could not register for matchmaking slot %d", slot)
        await asyncio.sleep(max(0.0, slot_end - time.time()) + SETTLE_SECONDS)
        found = await self.dht.aget(key, latest=True)
        members = _parse_registrations(found.value if found is not None else {})
        if all(m.peer_id != self.me.peer_id for m in members):
            members.append(self.me)  # our own registration may not have reached the nodes we read from
        groups = form_groups(slot, members, cfg.target_group_size)
        group = next(g for g in groups if g.member(self.me.peer_id) is not None)
        if len(group.members) < cfg.min_group_size:
            logger.info("slot %d: only %d peer(s) in our group, below min_group_size", slot, len(group.members))
            return None
        return group


def _parse_registrations(subkeys) -> list[GroupMember]:
    """Registrations from the DHT; malformed ones (from buggy or hostile peers) are skipped."""
    members = []
    if not isinstance(subkeys, dict):
        return members
    for raw_id, entry in subkeys.items():
        try:
            address, bandwidth, mode = entry.value
            peer_id = PeerID(bytes(raw_id))
            if address.rsplit("/", 1)[1] != str(peer_id) or not (bandwidth >= 0 and math.isfinite(bandwidth)):
                continue
            members.append(GroupMember(peer_id, str(address), float(bandwidth), Mode(int(mode))))
        except (TypeError, ValueError, AttributeError, IndexError):
            continue
    return members
