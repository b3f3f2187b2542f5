"""Matchmaking through the DHT: peers averaging the same epoch form groups.

Each peer registers (address, bandwidth, mode, registered_at, gather_until) as a subkey of the key
(prefix, epoch, bucket). The first registrant's `gather_until` (now + matchmaking_time) becomes everyone's
deadline: later registrants adopt the earliest one they see. At that deadline every peer reads the same
registrations, keeps those made before it, and cuts them into groups of at most `target_group_size`.
A gathering can close early: when the caller says how many peers to expect and they fit in one group,
every peer that sees that many registrations waits EARLY_SETTLE_SECONDS (for an earlier registration still
spreading) and forms the group from the earliest ones, instead of waiting out matchmaking_time.
The cut is shuffled by a hash of (epoch, peer id), and the bucket too is re-drawn every epoch, so group
membership changes from round to round and averages spread through the whole swarm (as in Moshpit SGD).
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

SETTLE_SECONDS = 0.3  # after the gathering deadline, wait this long for registrations to spread
EARLY_SETTLE_SECONDS = 0.1  # after a gathering filled up, wait this long for earlier registrations to show
GATHER_POLL_SECONDS = 0.05  # while gathering, how often to check whether the gathering filled up
REGISTRATION_SLACK = 30.0  # registrations outlive their deadline by this long (then expire everywhere)


@dataclass(frozen=True)
class MatchmakingConfig:
    target_group_size: int = 16
    min_group_size: int = 2
    matchmaking_time: float = 3.0
    expected_swarm_size: int | None = None  # how many peers average at once (sets the number of buckets)

    def buckets(self) -> int:
        peers = self.expected_swarm_size or self.target_group_size
        return max(1, math.ceil(peers / self.target_group_size))


@dataclass(frozen=True)
class Registration:
    member: GroupMember
    registered_at: float
    gather_until: float


def round_key(prefix: str, epoch: int, bucket: int) -> str:
    return f"{prefix}.matchmaking.{epoch}.{bucket}"


def _mix(peer_id: PeerID, epoch: int) -> bytes:
    return hashlib.sha256(peer_id.raw + epoch.to_bytes(8, "big", signed=True)).digest()


def bucket_of(peer_id: PeerID, epoch: int, buckets: int) -> int:
    return int.from_bytes(_mix(peer_id, epoch)[:8], "big") % buckets


def form_groups(epoch: int, members: list[GroupMember], target: int) -> list[GroupInfo]:
    """Cut one epoch's registrations (the same list on every peer) into near-equal groups of ≤ target."""
    members = sorted(members, key=lambda m: _mix(m.peer_id, epoch))
    count = math.ceil(len(members) / target) if members else 0
    groups = []
    for i in range(count):
        chosen = tuple(members[i::count])
        digest = hashlib.sha256(epoch.to_bytes(8, "big", signed=True) + b"".join(m.peer_id.raw for m in chosen))
        groups.append(GroupInfo(digest.digest()[:16], chosen))
    return groups


class Matchmaker:
    """Finds this peer's group for one averaging round through the DHT."""

    def __init__(self, dht, prefix: str, me: GroupMember, config: MatchmakingConfig):
        self.dht, self.prefix, self.me, self.config = dht, prefix, me, config

    async def find_group(self, epoch: int, deadline: float, expected: int | None = None) -> GroupInfo | None:
        """Register for `epoch`, wait for its gathering to end, return our group (None: too few peers, we came
        too late, or `deadline` (monotonic) would pass first). `expected`: how many peers should register in
        all; when that many have (and they fit in one group), the gathering ends without waiting out
        matchmaking_time."""
        cfg = self.config
        key = round_key(self.prefix, epoch, bucket_of(self.me.peer_id, epoch, cfg.buckets()))
        now = time.time()
        mine = Registration(self.me, now, now + cfg.matchmaking_time)
        record = [self.me.address, self.me.bandwidth, int(self.me.mode), mine.registered_at, mine.gather_until]
        expiration = mine.gather_until + REGISTRATION_SLACK
        if not await self.dht.astore(key, record, expiration, subkey=self.me.peer_id.raw):
            logger.warning("could not register for matchmaking of epoch %d", epoch)
        registrations = await self._registrations(key, mine)
        gather_until = min(r.gather_until for r in registrations)
        if mine.registered_at > gather_until:  # the cut keeps registrations made before the deadline only
            logger.info("epoch %d gathered without us (we came %.1f s late)", epoch, mine.registered_at - gather_until)
            return None
        full = self._early_close_at(expected)
        give_up_at = time.time() + deadline - time.monotonic() - SETTLE_SECONDS  # wall clock, like gather_until
        if gather_until > give_up_at and full is None:
            logger.info("the gathering for epoch %d ends after our deadline", epoch)
            return None
        members = await self._gather(key, mine, registrations, gather_until, full, give_up_at)
        if members is None:
            return None
        # We are among `members` (registered before the deadline, and added if the DHT lost our entry).
        group = next(g for g in form_groups(epoch, members, cfg.target_group_size) if g.member(self.me.peer_id))
        if len(group.members) < cfg.min_group_size:
            logger.info("epoch %d: only %d peer(s) in our group, below min_group_size", epoch, len(group.members))
            return None
        return group

    def _early_close_at(self, expected: int | None) -> int | None:
        """How many registrations end the gathering early: the expected peers, if they make one group
        (otherwise the cut must see everyone who registered, to split them evenly)."""
        cfg = self.config
        if expected is None or cfg.buckets() > 1 or expected > cfg.target_group_size:
            return None
        return max(cfg.min_group_size, expected)

    async def _gather(
        self,
        key: str,
        mine: Registration,
        registrations: list[Registration],
        gather_until: float,
        full: int | None,
        give_up_at: float,
    ) -> list[GroupMember] | None:
        """The members of this gathering: everyone registered before its deadline, or the earliest `full`
        when that many registered sooner. None if we are not among them, or the gathering is still open
        at `give_up_at`."""
        while True:
            on_time = _registered_by(registrations, gather_until)
            if full is not None and len(on_time) >= full:
                await asyncio.sleep(EARLY_SETTLE_SECONDS)
                on_time = _registered_by(await self._registrations(key, mine), gather_until)
                first = sorted(on_time, key=lambda r: (r.registered_at, r.member.peer_id.raw))[:full]
                if all(r.member.peer_id != self.me.peer_id for r in first):
                    logger.info("the gathering filled up with %d earlier peers", full)
                    return None
                return [r.member for r in first]
            now = time.time()
            if now >= give_up_at:
                logger.info("the gathering is still open at our deadline (%d of %s peers)", len(on_time), full)
                return None
            if now >= gather_until:
                break
            await asyncio.sleep(min(GATHER_POLL_SECONDS, gather_until - now, give_up_at - now))
            registrations = await self._registrations(key, mine)
        await asyncio.sleep(max(0.0, gather_until + SETTLE_SECONDS - time.time()))
        return [r.member for r in _registered_by(await self._registrations(key, mine), gather_until)]

    async def _registrations(self, key: str, mine: Registration) -> list[Registration]:
        found = await self.dht.aget(key, latest=True)
        registrations = _parse(found.value if found is not None else {})
        if all(r.member.peer_id != self.me.peer_id for r in registrations):
            registrations.append(mine)  # our own may not have reached the nodes we read from
        return registrations


def _registered_by(registrations: list[Registration], gather_until: float) -> list[Registration]:
    """The registrations the cut keeps: those made before the gathering's deadline."""
    return [r for r in registrations if r.registered_at <= gather_until]


def _parse(subkeys) -> list[Registration]:
    """Registrations from the DHT; malformed ones (from buggy or hostile peers) are skipped."""
    registrations = []
    if not isinstance(subkeys, dict):
        return registrations
    for raw_id, entry in subkeys.items():
        try:
            address, bandwidth, mode, registered_at, gather_until = entry.value
            peer_id = PeerID(bytes(raw_id))
            if address.rsplit("/", 1)[1] != str(peer_id) or not (bandwidth >= 0 and math.isfinite(bandwidth)):
                continue
            member = GroupMember(peer_id, str(address), float(bandwidth), Mode(int(mode)))
            registrations.append(Registration(member, float(registered_at), float(gather_until)))
        except (TypeError, ValueError, AttributeError, IndexError):
            continue
    return registrations
