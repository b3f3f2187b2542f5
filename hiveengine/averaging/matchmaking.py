"""Matchmaking through the DHT: the peers that step at the same time gather, then split into grid groups.

Gatherings. Each peer registers (address, bandwidth, mode, registered_at, gather_until, round, gathered) as
its own subkey of `{prefix}.matchmaking.{key}`. A gathering is named by its deadline: a peer that sees a
registration whose deadline is still ahead joins the earliest such gathering; otherwise it opens one that ends
matchmaking_time from now (or at the caller's scheduled time). Two peers that opened gatherings at once move to
the earlier as soon as they see it. At the deadline every member reads the same registrations and makes the
same cut. When the caller says how many peers to expect, the gathering closes as soon as that many registered.
A peer that gives up or is cancelled before the cut withdraws its registration, so nobody waits for it.
Registrants do not just poll the DHT: each one rings the others it sees in its gathering (a one-message
wake-up over the transport, the Bell), so a gathering whose peers are all present closes within a few
round trips instead of a poll interval.

The grid (Moshpit SGD, Ryabinin et al., 2021). The members, ranked by peer id, sit on a d-dimensional grid
whose side is at most target_group_size. Round r groups the peers that share every coordinate but coordinate
r mod d, where r is the largest round count among the members. With N = M^d peers and no failures, d
consecutive rounds give every peer the exact mean of all N.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import math
import time
import weakref
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack

from hiveengine.averaging.group import GroupInfo, GroupMember, Mode
from hiveengine.errors import ConfigurationError, HiveEngineError
from hiveengine.transport import Peer, PeerID, Request

logger = logging.getLogger(__name__)

SETTLE_SECONDS = 0.3  # after the gathering deadline, wait this long for registrations to spread
EARLY_SETTLE_SECONDS = 0.05  # when more than the expected peers registered, wait this long for earlier ones
GATHER_POLL_SECONDS = 0.02  # while gathering, read the registrations at least this often (a ring reads at once)
RING_METHOD = "hiveengine.averaging.ring"
RING_TIMEOUT = 1.0  # a wake-up that takes longer than this is dropped (the poll still finds the registration)
REGISTRATION_SLACK = 30.0  # registrations outlive their deadline by this long (then expire everywhere)
MAX_GATHERED_BYTES = 4096  # the most metadata one peer may attach to its registration (msgpack bytes)


class NoReducerError(Exception):
    """The group formed, but none of its members can reduce a part (all are client-mode)."""


@dataclass(frozen=True)
class MatchmakingConfig:
    target_group_size: int | None = 16  # None: no limit
    min_group_size: int = 2
    matchmaking_time: float = 3.0
    expected_swarm_size: int | None = None  # how many peers step at once, if known (closes gatherings early)

    def __post_init__(self):
        if self.target_group_size is not None and self.target_group_size < 2:
            raise ConfigurationError(f"target_group_size must be ≥ 2 or None, got {self.target_group_size}")
        if self.min_group_size < 1:
            raise ConfigurationError(f"min_group_size must be ≥ 1, got {self.min_group_size}")
        if not (self.matchmaking_time > 0 and math.isfinite(self.matchmaking_time)):
            raise ConfigurationError(f"matchmaking_time must be a positive number, got {self.matchmaking_time}")


@dataclass(frozen=True)
class Registration:
    member: GroupMember
    registered_at: float
    gather_until: float
    round: int = 0
    gathered: Any = None

    def record(self) -> list:
        m = self.member
        return [m.address, m.bandwidth, int(m.mode), self.registered_at, self.gather_until, self.round, self.gathered]


class Bell:
    """One per peer: wakes the peer's open gatherings when another registrant rings (the ring carries only
    the gathering's DHT key, so a hostile ring costs at most one early DHT read)."""

    _bells: ClassVar[weakref.WeakKeyDictionary[Peer, Bell]] = weakref.WeakKeyDictionary()

    def __init__(self, peer: Peer):
        self.peer = peer
        self.listeners: dict[str, asyncio.Event] = {}
        self._background: set[asyncio.Task] = set()
        peer.register(RING_METHOD, self._on_ring)

    @classmethod
    def of(cls, peer: Peer) -> Bell:
        if peer not in cls._bells:
            cls._bells[peer] = cls(peer)
        return cls._bells[peer]

    async def _on_ring(self, request: Request) -> dict:
        event = self.listeners.get(request.header.get("k"))  # a non-str key finds nothing
        if event is not None:
            event.set()
        return {}

    def ring(self, address: str, dht_key: str) -> None:
        """Wake `address`'s gathering under `dht_key` (in the background; failures only cost a poll)."""
        task = asyncio.ensure_future(self.peer.call(address, RING_METHOD, {"k": dht_key}, timeout=RING_TIMEOUT))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(lambda t: t.cancelled() or _log_ring_failure(t.exception()))


def _log_ring_failure(error: BaseException | None) -> None:
    if error is not None and not isinstance(error, HiveEngineError | TimeoutError):
        logger.warning("ringing a registrant failed: %r", error)


def matchmaking_key(prefix: str, key: str) -> str:
    return f"{prefix}.matchmaking.{key}"


def grid_groups(members: list[GroupMember], target: int | None, round_number: int) -> list[tuple[GroupMember, ...]]:
    """Cut one gathering's members (the same list on every peer) into the groups of round `round_number`."""
    ranked = sorted(members, key=lambda m: m.peer_id.raw)
    n = len(ranked)
    if target is None or n <= target:
        return [tuple(ranked)] if ranked else []
    dims = 1
    while target**dims < n:
        dims += 1
    side = 2
    while side**dims < n:
        side += 1
    axis = round_number % dims
    cells: dict[tuple[int, ...], list[GroupMember]] = {}
    for rank, member in enumerate(ranked):
        coords = [(rank // side**k) % side for k in range(dims)]
        cells.setdefault(tuple(c for k, c in enumerate(coords) if k != axis), []).append(member)
    return [tuple(cell) for cell in cells.values()]


class Matchmaker:
    """Finds this peer's group for one averaging round through the DHT."""

    def __init__(self, dht, prefix: str, me: GroupMember, config: MatchmakingConfig, peer: Peer):
        self.dht, self.prefix, self.me, self.config = dht, prefix, me, config
        self.bell = Bell.of(peer)
        self._background: set[asyncio.Task] = set()

    async def find_group(
        self,
        key: str,
        round_number: int,
        deadline: float,
        expected: int | None = None,
        gathered: Any = None,
        scheduled: float | None = None,
    ) -> GroupInfo | None:
        """Gather under `key` and return our group (None: too few peers, or `deadline` (monotonic) would pass
        first). `expected`: how many peers should register in all (the gathering closes once they have);
        `gathered`: metadata every member of our group receives; `scheduled`: the gathering's deadline
        (DHT wall-clock time) if we open it. Raises NoReducerError if our group has nobody who can reduce."""
        if gathered is not None and len(msgpack.packb(gathered, use_bin_type=True)) > MAX_GATHERED_BYTES:
            raise ConfigurationError(f"gathered metadata is over MAX_GATHERED_BYTES ({MAX_GATHERED_BYTES})")
        dht_key = matchmaking_key(self.prefix, key)
        give_up_at = time.time() + deadline - time.monotonic() - SETTLE_SECONDS  # wall clock, like gather_until
        now = time.time()
        # Open a gathering of our own; _gather moves us to an earlier one as soon as it sees one.
        gather_until = scheduled if scheduled is not None else now + self.config.matchmaking_time
        full = self._early_close_at(expected)
        if gather_until > give_up_at and full is None:
            logger.info("a gathering for %s would end after our deadline", dht_key)
            return None
        mine = Registration(self.me, now, gather_until, round_number, gathered)
        woken = self.bell.listeners.setdefault(dht_key, asyncio.Event())
        try:
            await self._register(dht_key, mine)
            registrations = await self._gather(dht_key, mine, full, give_up_at, woken)
        except asyncio.CancelledError:
            self._withdraw_in_background(dht_key)
            raise
        finally:
            if self.bell.listeners.get(dht_key) is woken:
                del self.bell.listeners[dht_key]
        if registrations is None:
            self._withdraw_in_background(dht_key)
            return None
        return self._our_group(dht_key, registrations)

    def _our_group(self, dht_key: str, registrations: list[Registration]) -> GroupInfo | None:
        cfg = self.config
        round_number = max(r.round for r in registrations)
        members = [r.member for r in registrations]
        chosen = next(g for g in grid_groups(members, cfg.target_group_size, round_number) if self.me in g)
        if len(chosen) < cfg.min_group_size:
            logger.info("%s: only %d peer(s) in our group, below min_group_size", dht_key, len(chosen))
            return None
        ids = sorted(m.peer_id.raw for m in chosen)
        digest = hashlib.sha256(
            dht_key.encode() + repr(registrations[0].gather_until).encode() + round_number.to_bytes(8, "big")
        )
        for raw in ids:
            digest.update(raw)
        gathered = {r.member.peer_id: r.gathered for r in registrations if r.member in chosen}
        group = GroupInfo(digest.digest()[:16], chosen, round_number, gathered)
        if not group.reducers:
            raise NoReducerError(
                f"our group of {len(chosen)} has no peer that can reduce (all are client-mode): "
                "at least one peer must accept connections"
            )
        return group

    def _early_close_at(self, expected: int | None) -> int | None:
        """How many registrations end the gathering early: the expected peers, if they make one group
        (otherwise the cut must see everyone who registered, to place them on the grid)."""
        cfg = self.config
        expected = expected or cfg.expected_swarm_size
        if expected is None or (cfg.target_group_size is not None and expected > cfg.target_group_size):
            return None
        return max(cfg.min_group_size, expected)

    async def _gather(
        self, dht_key: str, mine: Registration, full: int | None, give_up_at: float, woken: asyncio.Event
    ) -> list[Registration] | None:
        """The registrations of our gathering at its cut: everyone registered before its deadline, or the
        earliest `full` when that many registered sooner. None if we are not among them, or the gathering is
        still open at `give_up_at`."""
        rung: set[PeerID] = set()
        while True:
            woken.clear()
            registrations = await self._registrations(dht_key, mine)
            now = time.time()
            earlier = [r.gather_until for r in registrations if now < r.gather_until < mine.gather_until]
            if earlier:  # someone opened a gathering just before us: join it
                mine = dataclasses.replace(mine, gather_until=min(earlier))
                await self._register(dht_key, mine)
                rung.clear()
                continue
            on_time = _members_of(registrations, mine.gather_until)
            for r in on_time:  # tell each registrant we saw that we are here, once per gathering
                if r.member.peer_id not in rung and r.member.peer_id != self.me.peer_id:
                    rung.add(r.member.peer_id)
                    self.bell.ring(r.member.address, dht_key)
            if full is not None and len(on_time) >= full:
                if len(on_time) > full:  # unexpected peers: let every registration made before theirs show
                    await asyncio.sleep(EARLY_SETTLE_SECONDS)
                    on_time = _members_of(await self._registrations(dht_key, mine), mine.gather_until)
                first = sorted(on_time, key=lambda r: (r.registered_at, r.member.peer_id.raw))[:full]
                if all(r.member.peer_id != self.me.peer_id for r in first):
                    logger.info("the gathering filled up with %d earlier peers", full)
                    return None
                return first
            if now >= give_up_at:
                logger.info("the gathering is still open at our deadline (%d of %s peers)", len(on_time), full)
                return None
            if now >= mine.gather_until:
                break
            with contextlib.suppress(TimeoutError):
                pause = min(GATHER_POLL_SECONDS, mine.gather_until - now, give_up_at - now)
                await asyncio.wait_for(woken.wait(), pause)
        await asyncio.sleep(max(0.0, mine.gather_until + SETTLE_SECONDS - time.time()))
        return _members_of(await self._registrations(dht_key, mine), mine.gather_until)

    async def _register(self, dht_key: str, mine: Registration) -> None:
        # Each write expires later than the last, so a re-registration (or withdrawal) always replaces it.
        expiration = time.time() + self.config.matchmaking_time + REGISTRATION_SLACK
        if not await self.dht.astore(dht_key, mine.record(), expiration, subkey=self.me.peer_id.raw):
            logger.warning("could not register for matchmaking under %s", dht_key)

    def _withdraw_in_background(self, dht_key: str) -> None:
        """Replace our registration with a tombstone, so peers still gathering do not count on us."""
        expiration = time.time() + self.config.matchmaking_time + REGISTRATION_SLACK + 1.0
        task = asyncio.ensure_future(self.dht.astore(dht_key, None, expiration, subkey=self.me.peer_id.raw))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _registrations(self, dht_key: str, mine: Registration | None = None) -> list[Registration]:
        found = await self.dht.aget(dht_key, latest=True)
        registrations = _parse(found.value if found is not None else {})
        if mine is not None:
            registrations = [r for r in registrations if r.member.peer_id != self.me.peer_id] + [mine]
        return registrations


def _members_of(registrations: list[Registration], gather_until: float) -> list[Registration]:
    """The registrations a gathering's cut keeps: those for its deadline, made before it."""
    return [r for r in registrations if r.gather_until == gather_until and r.registered_at <= gather_until]


def _parse(subkeys) -> list[Registration]:
    """Registrations from the DHT; malformed ones (from buggy or hostile peers) are skipped."""
    registrations = []
    if not isinstance(subkeys, dict):
        return registrations
    for raw_id, entry in subkeys.items():
        try:
            address, bandwidth, mode, registered_at, gather_until, round_number, gathered = entry.value
            peer_id = PeerID(bytes(raw_id))
            times = (float(registered_at), float(gather_until))
            if address.rsplit("/", 1)[1] != str(peer_id) or not (bandwidth >= 0 and math.isfinite(bandwidth)):
                continue
            if not all(math.isfinite(t) for t in times) or not (isinstance(round_number, int) and round_number >= 0):
                continue
            member = GroupMember(peer_id, str(address), float(bandwidth), Mode(int(mode)))
            registrations.append(Registration(member, *times, round_number, gathered))
        except (TypeError, ValueError, AttributeError, IndexError):
            continue
    return registrations
