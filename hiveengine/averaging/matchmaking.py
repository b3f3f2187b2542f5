"""Matchmaking through the DHT: the peers that step at the same time gather, then split into grid groups
(GroupInfo: who takes part in one averaging round, and in what role).

Gatherings. Each peer registers (address, bandwidth, mode, registered_at, gather_until, round, gathered) as
its own subkey of `{prefix}.matchmaking.{key}`, signed by the transport key that will take part in the all-reduce
(records.py: the subkey is that key's owner marker, and every DHT node and reader checks the signature), so
nobody can register, rewrite or withdraw another peer; a registration's address must name its signer.
Registrations that are unsigned, malformed or expired (a deadline already past) are skipped, with a log line
naming the peer once per gathering, and never raise. A gathering is named by its deadline: a peer that sees a
registration whose deadline is still ahead joins the earliest such gathering; otherwise it opens one that ends
matchmaking_time from now, rounded up to a grid of GATHER_GRID_SECONDS (so peers that open one at once open the
same one), or at the caller's scheduled time. Two peers that opened different gatherings move to the earlier as
soon as they see it. At the deadline every member reads the same registrations and makes the same cut. When
the caller says how many peers to expect, the gathering closes as soon as that many registered. A peer that
gives up or is cancelled before the cut withdraws its registration, so nobody waits for it. A gathering that filled
up closes before its deadline, so its registrations still look open until then: its members ignore the registrations
their cut took and open their next gathering on the next grid point (a new registration for the old deadline, from a
newcomer, is news like any other).

How registrants learn of each other without waiting. A registration is written and the key read back in one
DHT lookup that asks every known node at once (DHTNode.store with `read`): each node stores it and answers with
what it holds, so of two peers that register at once at least one reads the other. A registrant also watches
its own DHT node (DHTNode.watch): another's write that reaches it tells it at once, with no message of its own.
When neither tells a peer (its DHT node stores no copy: a swarm larger than k, a client-mode node), the
registrant that read it rings it (a one-message call over the transport, the Bell), handing it its
registration and the registration's version (the expiration time of its DHT write; every write of a peer under
a key expires later than its last, so the newest wins, withdrawals included). A peer rings only once its write
is done, and not those whose DHT node took it, nor those that rang it, nor those whose write will find ours
(some node that took ours did not hold theirs yet). A ring is taken only for a gathering the peer has open,
only with the caller's own well-formed registration (its peer id is the authenticated caller's), and only when
newer than the one held; junk is dropped and wakes nothing. A gathering that hears nothing for
GATHER_POLL_SECONDS reads the DHT. So when all expected peers are present in a swarm of at most k DHT nodes,
a round's matchmaking costs each peer one DHT lookup (one round trip) and no other message.

A group that met rings ahead. Peers that averaged together usually step together again, so a registrant whose
gathering may close early (the caller expects a group's worth of peers) first rings the others of its last group
with its registration, and writes it to the DHT RING_AHEAD_WRITE_DELAY later (at once if it wrote under this key
before: that older registration may still look open). A ring needs no lookup and no signature to check (the
transport authenticates the caller), so the group closes one message after its last member registers. The reply to a
ring says whether the peer rung holds the registration: when every other member of the cut does, nobody in the group
needs the write, and it is skipped; otherwise it goes out, for a newcomer or a lost ring. A ring that comes before
its gathering opened here is kept, only from a peer of our recent groups and within bounds (EARLY_RINGS_PER_PEER,
MAX_EARLY_RINGS, while its deadline is ahead; once kept, only a withdrawal or its deadline drops it), and one who
gives up rings its withdrawal to those it rang ahead.

Bans. A registration also names the peers its registrant caught cheating as reducers (verified replies, see
allreduce.py; at most MAX_VOTED_BANS). A peer that a strict majority of a gathering's registrants name is left out
of the cut (`without_outvoted`): every member reads the same registrations, so every member leaves out the same
peers and the groups still agree, and a minority that names honest peers changes nothing. The votes are signed
(they are part of the registrations) but not proven: a majority is trusted to report what it saw. Proof comes with
accusations: a registration also names the evidence its registrant holds against reducers (at most MAX_ACCUSATIONS,
accusations.py), and every member that cuts the gathering fetches and checks the evidence against its registrants
(whom the groups may take in: accusations against anyone else, such as an attacker's throwaway identities, are not
fetched) itself, in the background, and bans (and so votes against) only the reducers whose own signed replies
convict them.

Relayed peers. A peer others reach only through a relay (behind a NAT) registers RELAYED_BANDWIDTH_SHARE of its
bandwidth, so the parts go to peers others dial directly while they can take them, and a relayed reducer (in a swarm
of home peers, say) gets a part its relay can carry. One that nobody can dial (unreachable, and no relay slot)
registers as a client, whatever it was made as.

The grid (Moshpit SGD, Ryabinin et al., 2021). The members, ranked by peer id, sit on a d-dimensional grid
whose side is at most target_group_size. Round r groups the peers that share every coordinate but coordinate
r mod d, where r is the largest round count among the members. With N = M^d peers and no failures, d
consecutive rounds give every peer the exact mean of all N.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import enum
import hashlib
import logging
import math
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

from hiveengine.averaging.accusations import Accusations
from hiveengine.averaging.records import record_signer, signed_record, store_signed
from hiveengine.dht.dht import DHT
from hiveengine.dht.node import ReadBack
from hiveengine.dht.protocol import MAX_KEY_BYTES
from hiveengine.dht.schemas import MAX_GATHERING_SECONDS, MAX_VOTED_BANS, registration_problem
from hiveengine.dht.serialization import pack, unpack
from hiveengine.dht.storage import Entry, Record, get_dht_time
from hiveengine.dht.validation import signer_of
from hiveengine.errors import ConfigurationError, HiveEngineError, ProtocolError
from hiveengine.transport import Identity, Peer, PeerID, Request

logger = logging.getLogger(__name__)

SETTLE_SECONDS = 0.3  # after the gathering deadline, wait this long for registrations to spread
EARLY_SETTLE_SECONDS = 0.05  # when more than the expected peers registered, wait this long for earlier ones
GATHER_POLL_SECONDS = 0.02  # while gathering, read the registrations when nobody rang for this long
GATHER_GRID_SECONDS = 0.1  # a gathering we open ends on this grid (or on a quarter of matchmaking_time)
RING_METHOD = "hiveengine.averaging.ring"
# A ring that takes longer than this, plus what its link adds (Peer.link_time), is dropped (the poll still finds the
# registration).
RING_TIMEOUT = 1.0
MAX_RING_RECORDS = 1024  # ringers one open gathering remembers (more are left to the DHT reads)
# A group that met rings ahead: each member rings (at most this many of) the others of its last group as it registers.
MAX_RING_AHEAD = 32
# A ring that comes before its gathering opened here is kept (acknowledged) only from a peer of our recent groups (the
# last MAX_RING_AHEAD), at most this many per peer and this many in all; more are refused, never evicted once kept.
EARLY_RINGS_PER_PEER = 4
MAX_EARLY_RINGS = 64
# A registrant that rang ahead writes its registration this much later, unless every other member of its cut has
# acknowledged its ring by then (then nobody in its group needs the write). The write is for those its rings did not
# reach (a newcomer, a lost ring); waiting keeps it (a signature, a DHT lookup, a check of the signature on every
# node) off the round's critical path.
RING_AHEAD_WRITE_DELAY = 0.01
REGISTRATION_SLACK = 30.0  # registrations outlive their deadline by this long (then expire everywhere)
VERSION_STEP = 1e-3  # each write of ours under one key expires at least this much later than the last
MAX_REMEMBERED_KEYS = 64  # keys whose last write's expiration (and last cut) we remember
MAX_GATHERED_BYTES = 4096  # the most metadata one peer may attach to its registration (msgpack bytes)
# A member's claimed bandwidth counts at most this many times the group's median (parts are sized by bandwidth,
# so a claim of 1e300 would otherwise hand one peer, maybe a hostile one, the whole buffer to reduce).
MAX_BANDWIDTH_RATIO = 8.0
# A peer reached through a relay registers this share of its bandwidth: what its part carries crosses the relay
# twice (in and out), over a link the relay caps and shares among its circuits. So parts go to peers others dial
# directly while they can take them (allreduce.balanced_shares), and a relayed reducer gets a smaller part.
RELAYED_BANDWIDTH_SHARE = 0.25


class Mode(enum.IntEnum):
    """NODE sends data and reduces a part; CLIENT sends but reduces nothing; AUX reduces but sends nothing."""

    NODE = 0
    CLIENT = 1
    AUX = 2


@dataclass(frozen=True)
class GroupMember:
    peer_id: PeerID
    address: str
    bandwidth: float = 1.0
    mode: Mode = Mode.NODE

    @property
    def reduces(self) -> bool:
        """Whether this member owns and averages a part (not a client, and has bandwidth)."""
        return self.mode != Mode.CLIENT and self.bandwidth > 0

    @property
    def contributes(self) -> bool:
        """Whether this member sends its own data (every mode but auxiliary)."""
        return self.mode != Mode.AUX


@dataclass(frozen=True)
class GroupInfo:
    """One round's group: the same members in the same order on every peer, the round's grid number, and
    the metadata each member attached to its registration (`gathered`, by peer id)."""

    group_id: bytes
    members: tuple[GroupMember, ...]
    round: int = 0
    gathered: dict[PeerID, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self):
        ordered = tuple(sorted(self.members, key=lambda m: m.peer_id.raw))
        object.__setattr__(self, "members", ordered)

    @property
    def reducers(self) -> list[GroupMember]:
        """The members that own a part, in the group's order (one part each)."""
        return [m for m in self.members if m.reduces]

    @property
    def senders(self) -> list[GroupMember]:
        """The members whose data is averaged."""
        return [m for m in self.members if m.contributes]

    def member(self, peer_id: PeerID) -> GroupMember | None:
        """The member with `peer_id`, or None if it is not in this group."""
        return next((m for m in self.members if m.peer_id == peer_id), None)


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
        if not (0 < self.matchmaking_time <= MAX_GATHERING_SECONDS):
            raise ConfigurationError(
                f"matchmaking_time must be a positive number of seconds up to {MAX_GATHERING_SECONDS:g}, "
                f"got {self.matchmaking_time}"
            )


@dataclass(frozen=True)
class Registration:
    member: GroupMember
    registered_at: float
    gather_until: float
    round: int = 0
    gathered: Any = None
    dht_node: bytes | None = None  # the peer id of the registrant's DHT node, if it stores records
    bans: tuple[bytes, ...] = ()  # the raw ids of the peers the registrant banned (caught cheating as reducers)
    accusations: tuple[tuple[bytes, bytes], ...] = ()  # (accused raw id, evidence digest): see accusations.py

    def record(self) -> list:
        m = self.member
        return [
            m.address,
            m.bandwidth,
            int(m.mode),
            self.registered_at,
            self.gather_until,
            self.round,
            self.gathered,
            self.dht_node,
            list(self.bans),
            [list(a) for a in self.accusations],
        ]


class _Listener:
    """What rings told one open gathering: each ringer's newest registration (None: withdrawn) with its version, and
    an event set whenever a ring brought something new."""

    __slots__ = ("event", "records")

    def __init__(self):
        self.event = asyncio.Event()
        self.records: dict[PeerID, tuple[float, Registration | None]] = {}

    def take(self, sender: PeerID, version: float, registration: Registration | None) -> bool:
        """Take `sender`'s registration (None: its withdrawal, which needs one to withdraw) if newer than the one
        held, and wake the gathering; whether we now hold this version of it or a newer one."""
        held = self.records.get(sender)
        if held is not None and version <= held[0]:
            return True
        if held is None and (registration is None or len(self.records) >= MAX_RING_RECORDS):
            return False
        self.records[sender] = (version, registration)
        self.event.set()
        return True


class Bell:
    """One per peer: a registrant rings the others it sees in its gathering, handing each its registration (or its
    withdrawal) and that registration's version (the expiration time of its DHT write), so the one rung needs no DHT
    read to learn of it. A ring is taken only for a gathering this peer has open, only with the caller's own
    well-formed registration (its peer id is the authenticated caller's), and only if it is newer than the one held:
    junk rings are dropped and wake nothing. The one exception: a ring from a peer of our recent groups (`remember`)
    that comes before we opened its gathering is kept (EARLY_RINGS_PER_PEER per peer, MAX_EARLY_RINGS in all, while
    its deadline is ahead) until we open it (`open`). The reply says whether we hold the registration."""

    _bells: ClassVar[weakref.WeakKeyDictionary[Peer, Bell]] = weakref.WeakKeyDictionary()

    def __init__(self, peer: Peer):
        self.peer = peer
        self.listeners: dict[str, _Listener] = {}
        self._background: set[asyncio.Task] = set()
        self._recent: collections.OrderedDict[PeerID, None] = collections.OrderedDict()  # peers of our recent groups
        # Rings that came before we opened their gathering: (sender, key) -> (version, registration).
        self._early: dict[tuple[PeerID, str], tuple[float, Registration]] = {}
        peer.register(RING_METHOD, self._on_ring)

    @classmethod
    def of(cls, peer: Peer) -> Bell:
        if peer not in cls._bells:
            cls._bells[peer] = cls(peer)
        return cls._bells[peer]

    def remember(self, peers: Iterable[PeerID]) -> None:
        """Keep rings that `peers` (who were just in our group) send before we open their gathering."""
        for peer_id in peers:
            self._recent[peer_id] = None
            self._recent.move_to_end(peer_id)
        while len(self._recent) > MAX_RING_AHEAD:
            self._recent.popitem(last=False)

    def open(self, key: str) -> _Listener:
        """The listener of our gathering under `key`, holding (and woken by) the rings that came before it opened."""
        listener = self.listeners.setdefault(key, _Listener())
        if not self._early:
            return listener
        self._drop_stale()
        for sender, ring_key in [k for k in self._early if k[1] == key]:
            listener.take(sender, *self._early.pop((sender, ring_key)))
        return listener

    async def _on_ring(self, request: Request) -> dict:
        header = request.header
        key, version, value = header.get("k"), header.get("e"), header.get("r")
        if not (isinstance(key, str) and _is_version(version)):
            return {}
        listener = self.listeners.get(key)
        if listener is None and request.sender not in self._recent:
            return {}  # nothing open for it, and not a peer whose early rings we keep: dropped before it is read
        registration = None if value is None else _registration(request.sender, value)
        if value is not None and registration is None:
            return {}
        if listener is None:
            held = self._keep_early(request.sender, key, float(version), registration)
        else:
            asleep = not listener.event.is_set()
            held = listener.take(request.sender, float(version), registration)
            if asleep and listener.event.is_set():
                await asyncio.sleep(0)  # the gathering we woke goes first (it may close): our reply can wait
        return {"t": True} if held and registration is not None else {}

    def _keep_early(self, sender: PeerID, key: str, version: float, registration: Registration | None) -> bool:
        """Keep a ring from a peer of our recent groups for a gathering we have not opened (yet) if its deadline is
        ahead and there is room (a newer withdrawal drops it); whether we hold it (or a newer one)."""
        if len(key.encode()) > MAX_KEY_BYTES:
            return False
        held = self._early.get((sender, key))
        if held is not None and version <= held[0]:
            return True
        if registration is None:
            self._early.pop((sender, key), None)
            return False
        if held is None and not self._room_for(sender):
            return False
        if registration.gather_until <= get_dht_time() or not _fits(registration):
            return False
        self._early[(sender, key)] = (version, registration)
        return True

    def _room_for(self, sender: PeerID) -> bool:
        """Whether one more early ring from `sender` fits (stale ones make room)."""

        def fits() -> bool:
            ours = sum(k[0] == sender for k in self._early)
            return len(self._early) < MAX_EARLY_RINGS and ours < EARLY_RINGS_PER_PEER

        if not fits():
            self._drop_stale()
        return fits()

    def _drop_stale(self) -> None:
        now = get_dht_time()
        for k in [k for k, (_, r) in self._early.items() if r.gather_until <= now]:
            del self._early[k]

    def ring(
        self,
        member: GroupMember,
        dht_key: str,
        registration: Registration | None,
        version: float,
        answered: Callable[[bool], None] | None = None,
    ) -> None:
        """Hand `member` our registration under `dht_key` (None: we withdrew it), in the background (a lost ring
        costs a poll); `answered(held)` runs when the call ends: whether `member` said it holds the registration."""
        header = {"k": dht_key, "r": None if registration is None else registration.record(), "e": version}
        timeout = self.ring_timeout(member.peer_id)
        task = asyncio.ensure_future(self.peer.call(member.address, RING_METHOD, header, timeout=timeout))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(lambda t: t.cancelled() or _log_ring_failure(t.exception()))
        if answered is not None:
            task.add_done_callback(lambda t: answered(_held(t)))

    def ring_timeout(self, peer_id: PeerID) -> float:
        """How long a ring to `peer_id` may take (RING_TIMEOUT plus what its link adds)."""
        return RING_TIMEOUT + self.peer.link_time(peer_id)


def _held(ring: asyncio.Task) -> bool:
    """Whether a ring's reply says the peer rung holds our registration."""
    return not ring.cancelled() and ring.exception() is None and ring.result()[0].get("t") is True


def _fits(registration: Registration) -> bool:
    """Whether a registration's gathered metadata is within MAX_GATHERED_BYTES (what an honest peer attaches)."""
    return len(msgpack.packb(registration.gathered, use_bin_type=True)) <= MAX_GATHERED_BYTES


def _is_version(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


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


@dataclass
class _Gathering:
    """One find_group call: our registration and its version (the expiration time of its DHT write, which
    grows with every write), the newest registration we know of each other peer (from DHT reads and rings;
    None: withdrawn), and whom we told about our registration."""

    key: str
    mine: Registration
    listener: _Listener
    version: float = 0.0
    known: dict[PeerID, tuple[float, Registration | None]] = field(default_factory=dict)
    told: set[PeerID] = field(default_factory=set)
    aware: set[PeerID] = field(default_factory=set)  # peers that will see our registration without a ring
    takers: set[int] = field(default_factory=set)  # the DHT nodes that stored our registration as they read
    skipped: set[PeerID] = field(default_factory=set)  # peers whose malformed or expired registration we logged
    spent: frozenset = frozenset()  # (peer id, registered_at, gather_until) of the registrations our last cut took
    writing: asyncio.Task | None = None  # our registration's write (and read), while under way
    ahead: tuple[GroupMember, ...] = ()  # whom we ring as we register (our last group, when it may close early)
    answers: dict[PeerID, bool] = field(default_factory=dict)  # whether each we rang ahead holds our registration
    cut: frozenset[PeerID] | None = None  # the others our cut took, once it is made
    made: asyncio.Event = field(default_factory=asyncio.Event)  # set once the cut is made
    decided: asyncio.Event = field(default_factory=asyncio.Event)  # and then once its members answered

    def answer(self, peer_id: PeerID, held: bool) -> None:
        self.answers[peer_id] = held
        self._decide()

    def make_cut(self, others: frozenset[PeerID]) -> None:
        self.cut = others
        self.made.set()
        self._decide()

    def _decide(self) -> None:
        """Set `decided` once the cut is made and we know whether its members hold our registration: each we rang
        ahead answered (a ring's call has a deadline, so each does), or one we did not ring (only a write tells it)."""
        if self.cut is None:
            return
        if not self.cut <= {m.peer_id for m in self.ahead} or self.cut <= self.answers.keys():
            self.decided.set()

    def settled(self) -> bool:
        """Whether every other member of our cut holds our registration (then nobody in our group needs our write)."""
        return self.cut is not None and all(self.answers.get(p, False) for p in self.cut)

    def learn_record(self, record: Record, peer_id: PeerID | None = None) -> bool:
        """Take a DHT record of the gathering's key (its value is decoded only if it is newer than what we
        hold); whether it was news."""
        try:
            if peer_id is None:
                peer_id = record_signer(record)
            if peer_id is None or peer_id == self.mine.member.peer_id:
                return False
            held = self.known.get(peer_id)
            if held is not None and held[0] >= record.expiration_time:
                return False
            value = unpack(record.value)
        except ProtocolError:
            return False
        registration = None if value is None else self.check(peer_id, value)
        if value is not None and registration is None:
            return False
        self.learn(peer_id, record.expiration_time, registration)
        return True

    def learn_readback(self, read: ReadBack) -> None:
        """Take what our write read back: the records, who will see ours without a ring (a taker did not hold
        theirs yet: their write reads ours there), and which nodes took ours."""
        self.takers = read.taker_ids
        if read.entry.plain is not None:
            return
        now = get_dht_time()
        for record in read.entry.subkeys.values():
            peer_id = record_signer(record)
            if peer_id is not None and record.expiration_time > now:
                if not read.everywhere(record):
                    self.aware.add(peer_id)
                self.learn_record(record, peer_id)

    def learn(self, peer_id: PeerID, version: float, registration: Registration | None) -> None:
        held = self.known.get(peer_id)
        if held is None or version > held[0]:
            self.known[peer_id] = (version, registration)

    def learn_read(self, subkeys) -> None:
        """Take what a DHT read found (a dict of subkeys; anything else finds nothing)."""
        if not isinstance(subkeys, dict):
            return
        for subkey, entry in subkeys.items():
            peer_id = signer_of(subkey)
            if peer_id is not None and peer_id != self.mine.member.peer_id and _is_version(entry.expiration_time):
                withdrawn = entry.value is None
                registration = None if withdrawn else self.check(peer_id, entry.value)
                if withdrawn or registration is not None:
                    self.learn(peer_id, float(entry.expiration_time), registration)

    def check(self, peer_id: PeerID, value) -> Registration | None:
        """`peer_id`'s registration from a signed record's value; None (logged once per peer) when malformed or
        for a gathering that ended already."""
        registration = _registration(peer_id, value)
        if (
            registration is not None
            and registration.gather_until >= self.mine.registered_at
            and not self.is_spent(peer_id, registration)
        ):
            return registration
        if peer_id not in self.skipped and len(self.skipped) < MAX_RING_RECORDS:
            self.skipped.add(peer_id)
            problem = "its gathering is over" if registration is not None else registration_problem(peer_id, value)
            logger.info("%s: skipping the registration of %s: %s", self.key, peer_id, problem)
        return None

    def registrations(self) -> list[Registration]:
        """Everyone's newest live registration (rings merged in), ours as it is now."""
        for peer_id, (version, registration) in self.listener.records.items():
            self.learn(peer_id, version, registration)
        me = self.mine.member.peer_id
        others = [
            r
            for peer_id, (_, r) in self.known.items()
            if r is not None and peer_id != me and not self.is_spent(peer_id, r)  # rings are not check()ed
        ]
        return [*others, self.mine]

    def is_spent(self, peer_id: PeerID, registration: Registration) -> bool:
        """Whether `registration` is one our last cut under this key took (that round is over for its peer)."""
        return (peer_id, registration.registered_at, registration.gather_until) in self.spent


def registered_bandwidth(bandwidth: float, relayed: bool) -> float:
    """The bandwidth a peer registers: its own, or RELAYED_BANDWIDTH_SHARE of it while others reach it through a
    relay."""
    return bandwidth * RELAYED_BANDWIDTH_SHARE if relayed else bandwidth


def bounded_bandwidths(members: tuple[GroupMember, ...]) -> tuple[GroupMember, ...]:
    """`members` with each reducer's bandwidth capped at MAX_BANDWIDTH_RATIO x the reducers' lower median,
    logged with the peer id (every member computes the same caps from the same registrations)."""
    claims = sorted(m.bandwidth for m in members if m.reduces)
    if not claims:
        return members
    cap = MAX_BANDWIDTH_RATIO * claims[(len(claims) - 1) // 2]
    bounded = []
    for m in members:
        if m.reduces and m.bandwidth > cap:
            logger.warning(
                "peer %s claims bandwidth %g; counted as %g (%gx the group median)",
                m.peer_id,
                m.bandwidth,
                cap,
                MAX_BANDWIDTH_RATIO,
            )
            m = dataclasses.replace(m, bandwidth=cap)
        bounded.append(m)
    return tuple(bounded)


class Matchmaker:
    """Finds this peer's group for one averaging round through the DHT."""

    def __init__(
        self,
        dht: DHT,
        prefix: str,
        me: GroupMember,
        config: MatchmakingConfig,
        peer: Peer,
        banned: Callable[[], Iterable[PeerID]] = tuple,
        accusations: Accusations | None = None,
    ):
        """`banned`: the peers we caught cheating, oldest first; our registrations name the newest MAX_VOTED_BANS,
        and a peer that a strict majority of a gathering's registrants name is left out of its groups.
        `accusations`: our registrations name the evidence it holds, and it checks what others' name."""
        self.dht, self.prefix, self.me, self.config = dht, prefix, me, config
        self.bandwidth, self.mode = me.bandwidth, me.mode  # as configured (what we register may differ: _member_now)
        self.peer, self.banned, self.accusations = peer, banned, accusations
        self.bell = Bell.of(peer)
        self.identity: Identity = peer.identity  # signs our registrations: the key that takes part in the round
        self._background: set[asyncio.Task] = set()
        self._versions: collections.OrderedDict[str, float] = collections.OrderedDict()
        # Each key's last cut: its deadline and the registrations it took. A gathering that filled up closes before
        # its deadline, so those registrations still look open: whoever saw them would join a gathering that is over.
        self._cuts: collections.OrderedDict[str, tuple[float, frozenset]] = collections.OrderedDict()
        self._last_group: tuple[GroupMember, ...] = ()  # the others of our last group: we ring them ahead
        self._delayed: set[asyncio.Task] = set()  # our writes that wait RING_AHEAD_WRITE_DELAY (or are under way)
        self._registered_as: tuple | None = None  # (address, bandwidth, mode) that self.me was last made for

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
        give_up_at = get_dht_time() + deadline - time.monotonic() - SETTLE_SECONDS  # wall clock, like gather_until
        now = get_dht_time()
        # Open a gathering of our own; _gather moves us to an earlier one as soon as it sees one.
        over, spent = self._cuts.get(dht_key, (None, frozenset()))
        if scheduled is not None and scheduled - now > MAX_GATHERING_SECONDS:
            raise ConfigurationError(
                f"a gathering may be scheduled at most MAX_GATHERING_SECONDS ({MAX_GATHERING_SECONDS:g}) ahead, "
                f"not {scheduled - now:.0f} s"
            )
        gather_until = scheduled if scheduled is not None else self._opening_deadline(now, give_up_at, over)
        full = self._early_close_at(expected)
        if gather_until > give_up_at and full is None:
            logger.info("a gathering for %s would end after our deadline", dht_key)
            return None
        listener = self.bell.open(dht_key)
        dht_node = None if self.dht.client_mode else self.dht.peer_id.raw  # a client-mode node stores nothing
        self.me = self._member_now()
        bans = tuple(p.raw for p in list(self.banned())[-MAX_VOTED_BANS:])
        accused = tuple(self.accusations.published()) if self.accusations is not None else ()
        mine = Registration(self.me, now, gather_until, round_number, gathered, dht_node, bans, accused)
        gathering = _Gathering(dht_key, mine, listener, spent=spent, ahead=self._last_group if full else ())

        def stored(record) -> None:  # another registrant's write reached our DHT node
            if gathering.learn_record(record):
                listener.event.set()

        unwatch = self.dht.node.watch(pack(dht_key, "key"), stored)
        try:
            self._register(gathering)
            registrations = await self._gather(gathering, full, give_up_at)
        except asyncio.CancelledError:
            self._withdraw_in_background(gathering)
            raise
        finally:
            unwatch()
            if self.bell.listeners.get(dht_key) is listener:
                del self.bell.listeners[dht_key]
            if gathering.writing is not None:  # closed before our write was done: let it finish for latecomers
                self._keep(gathering.writing)
        if registrations is None:
            self._withdraw_in_background(gathering)
            return None
        taken = frozenset((r.member.peer_id, r.registered_at, r.gather_until) for r in registrations)
        gathering.make_cut(frozenset(r.member.peer_id for r in registrations) - {self.me.peer_id})
        _remember(self._cuts, dht_key, (gathering.mine.gather_until, taken))
        if gathering.writing is not None:  # and then ring whoever still needs our registration
            gathering.writing.add_done_callback(lambda _: self._ring_after_write(gathering, registrations))
        group = self._our_group(dht_key, registrations)
        if group is not None:
            self._last_group = tuple(m for m in group.members if m.peer_id != self.me.peer_id)[:MAX_RING_AHEAD]
            self.bell.remember(m.peer_id for m in self._last_group)
        return group

    def close(self) -> None:
        """Cancel our delayed writes (RING_AHEAD_WRITE_DELAY) that have not finished: we step no more."""
        for task in list(self._delayed):
            task.cancel()

    def _member_now(self) -> GroupMember:
        """Who we register as now: at our address now (it changes when a peer behind a NAT moves to another relay, or
        is dialled direct), with RELAYED_BANDWIDTH_SHARE of our bandwidth while relayed, and as a client while nobody
        can dial us at all (unreachable with no relay slot: a part given to us would fail)."""
        address = self.peer.address
        relayed = address.relay is not None
        undialable = self.mode == Mode.NODE and self.peer.runtime.reachable is False and not relayed
        mode = Mode.CLIENT if undialable else self.mode
        bandwidth = registered_bandwidth(self.bandwidth, relayed)
        if (address, bandwidth, mode) == self._registered_as:  # as last time (no need to print the address again)
            return self.me
        self._registered_as = (address, bandwidth, mode)
        if (str(address), bandwidth, mode) == (self.me.address, self.me.bandwidth, self.me.mode):
            return self.me
        if undialable and self.me.mode != Mode.CLIENT:
            logger.info("nobody can dial %s (unreachable, no relay slot): registering as a client", address)
        return dataclasses.replace(self.me, address=str(address), bandwidth=bandwidth, mode=mode)

    def _opening_deadline(self, now: float, give_up_at: float, over: float | None) -> float:
        """The deadline of a gathering we open: matchmaking_time from now, rounded up to the grid (peers that
        open gatherings at once thus open the same one, and nobody has to move), unless that ends too late;
        never `over`, the deadline of our last cut under this key (a gathering that filled up early is over before
        its deadline; the peers cut with us open the next grid point, as we do)."""
        raw = now + self.config.matchmaking_time
        grid = min(GATHER_GRID_SECONDS, self.config.matchmaking_time / 4)
        aligned = math.ceil(raw / grid) * grid
        if over is not None and abs(aligned - over) < grid / 2:
            aligned = math.floor(over / grid + 1.5) * grid  # the grid point after `over`
        if aligned > min(give_up_at, now + MAX_GATHERING_SECONDS):  # nodes refuse a registration that waits longer
            return raw
        return aligned

    def _our_group(self, dht_key: str, registrations: list[Registration]) -> GroupInfo | None:
        cfg = self.config
        if self.accusations is not None:  # against the registrants alone: whom our group may take in
            registrants = {r.member.peer_id.raw for r in registrations}
            for r in registrations:
                for accused, digest in r.accusations:
                    if accused in registrants:
                        self.accusations.hear(r.member.peer_id, r.member.address, accused, digest)
        registrations = without_outvoted(registrations)
        if not any(r.member.peer_id == self.me.peer_id for r in registrations):
            logger.warning("%s: a majority of the registrants banned this peer from their groups", dht_key)
            return None
        round_number = max(r.round for r in registrations)
        members = [r.member for r in registrations]
        chosen = next(g for g in grid_groups(members, cfg.target_group_size, round_number) if self.me in g)
        if len(chosen) < cfg.min_group_size:
            logger.info("%s: only %d peer(s) in our group, below min_group_size", dht_key, len(chosen))
            return None
        chosen = bounded_bandwidths(chosen)
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

    async def _gather(self, g: _Gathering, full: int | None, give_up_at: float) -> list[Registration] | None:
        """The registrations of our gathering at its cut: everyone registered before its deadline, or the
        earliest `full` when that many registered sooner. None if we are not among them, or the gathering is
        still open at `give_up_at`. What we know comes from our registration's read, from rings, and from a
        DHT read whenever nobody rang for GATHER_POLL_SECONDS. The gathering may close before our own write is
        done: once rings brought everyone, they have all seen our registration already."""
        while True:
            if g.writing is not None and not g.writing.done() and not g.listener.event.is_set():
                # Nothing new to look at until our write reads back or a ring comes.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, min(g.mine.gather_until, give_up_at) - get_dht_time())):
                        await g.listener.event.wait()
            g.listener.event.clear()
            if g.writing is not None and g.writing.done():
                self._take_write(g)
            registrations = g.registrations()
            now = get_dht_time()
            earlier = [r.gather_until for r in registrations if now < r.gather_until < g.mine.gather_until]
            if earlier:  # someone opened a gathering just before us: join it
                g.mine = dataclasses.replace(g.mine, gather_until=min(earlier))
                if g.writing is not None:
                    self._keep(g.writing)  # superseded: what it reads is still news, but we wait for the new one
                self._register(g)
                continue
            on_time = _members_of(registrations, g.mine.gather_until)
            self._ring(g, on_time)
            if full is not None and len(on_time) >= full:
                if len(on_time) > full:  # unexpected peers: let every registration made before theirs show
                    await asyncio.sleep(EARLY_SETTLE_SECONDS)
                    await self._read(g)
                    on_time = _members_of(g.registrations(), g.mine.gather_until)
                    self._ring(g, on_time)
                first = sorted(on_time, key=lambda r: (r.registered_at, r.member.peer_id.raw))[:full]
                if all(r.member.peer_id != self.me.peer_id for r in first):
                    logger.info("the gathering filled up with %d earlier peers", full)
                    return None
                return first
            if now >= give_up_at:
                logger.info("the gathering is still open at our deadline (%d of %s peers)", len(on_time), full)
                return None
            if now >= g.mine.gather_until:
                break
            try:
                async with asyncio.timeout(min(GATHER_POLL_SECONDS, g.mine.gather_until - now, give_up_at - now)):
                    await g.listener.event.wait()
            except TimeoutError:
                if g.writing is None:
                    await self._read(g)  # nobody rang for a while: look for ourselves
        await asyncio.sleep(max(0.0, g.mine.gather_until + SETTLE_SECONDS - get_dht_time()))
        await self._read(g)
        return _members_of(g.registrations(), g.mine.gather_until)

    def _ring(self, g: _Gathering, on_time: list[Registration]) -> None:
        """Once our write is done, hand our registration to each registrant of our gathering that may not have
        it: all we have not told yet, but those whose DHT node stored it (their gathering watches that node),
        those that rang us from our gathering (they saw our registration to ring us), and those whose write
        will find ours (some node that took our write did not hold theirs yet)."""
        if g.writing is not None:
            return
        for r in on_time:
            peer_id = r.member.peer_id
            if peer_id == self.me.peer_id or peer_id in g.told or peer_id in g.aware:
                continue
            g.told.add(peer_id)
            if r.dht_node is not None and int.from_bytes(r.dht_node, "big") in g.takers:
                continue
            heard = g.listener.records.get(peer_id)
            if heard is None or heard[1] is None or heard[1].gather_until != g.mine.gather_until:
                self.bell.ring(r.member, g.key, g.mine, g.version)

    def _next_version(self, dht_key: str) -> float:
        """The expiration time of our next write under `dht_key`: each is later than the last (newer wins in the
        DHT and among rings), and a registration outlives its gathering by REGISTRATION_SLACK."""
        version = get_dht_time() + self.config.matchmaking_time + REGISTRATION_SLACK
        version = max(version, self._versions.get(dht_key, -math.inf) + VERSION_STEP)
        _remember(self._versions, dht_key, version)
        return version

    def _register(self, g: _Gathering) -> None:
        """Ring the peers of our last group (they probably step with us again: a ring reaches them with no DHT
        lookup and no signature to check), then start writing our registration and reading the others' (one DHT
        lookup; its end wakes the gathering); everyone else must hear of it anew. Having rung ahead, we write
        RING_AHEAD_WRITE_DELAY later, unless we wrote under this key before: our last registration there may still
        look open, and a newcomer must find the new one in its place at once."""
        delay = RING_AHEAD_WRITE_DELAY if g.ahead and g.key not in self._versions else 0.0
        g.version = version = self._next_version(g.key)
        g.told.clear()
        g.aware.clear()
        g.answers.clear()

        def answer(peer_id: PeerID) -> Callable[[bool], None]:
            return lambda held: g.version == version and g.answer(peer_id, held)

        for member in g.ahead:
            g.told.add(member.peer_id)
            self.bell.ring(member, g.key, g.mine, version, answer(member.peer_id))
        g.writing = asyncio.ensure_future(self._write(g, g.mine.record(), version, delay))
        if delay:
            self._delayed.add(g.writing)
            g.writing.add_done_callback(self._delayed.discard)
        g.writing.add_done_callback(lambda _: g.listener.event.set())

    async def _write(self, g: _Gathering, value: list, version: float, delay: float) -> ReadBack | None:
        """Our registration's write and read (_store_and_read). With `delay` (we rang ahead): `delay` seconds from
        now if the gathering is still open then; once it is cut, as soon as its members answered our rings, and
        skipped (None) if each holds our registration."""
        if delay:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await g.made.wait()
            if g.cut is not None:
                with contextlib.suppress(TimeoutError):  # each ring answers by its own deadline; this bounds it here
                    async with asyncio.timeout(self._rings_deadline(g)):
                        await g.decided.wait()
                if g.settled():
                    return None
        return await _store_and_read(self.dht, self.identity, g.key, value, version)

    def _rings_deadline(self, g: _Gathering) -> float:
        """The longest any of our rings ahead may take (Bell.ring's call timeout)."""
        return max((self.bell.ring_timeout(m.peer_id) for m in g.ahead), default=0.0)

    def _take_write(self, g: _Gathering) -> _Gathering:
        """Take in what our finished write read back (raising what it raised, if the gathering is open)."""
        task, g.writing = g.writing, None
        read = None if task.cancelled() else task.result()
        if read is None:
            logger.warning("could not register for matchmaking under %s", g.key)
        else:
            g.learn_readback(read)
        return g

    def _ring_after_write(self, g: _Gathering, cut: list[Registration]) -> None:
        if not g.writing.cancelled() and g.writing.exception() is None and g.writing.result() is not None:
            self._ring(self._take_write(g), cut)

    def _keep(self, task: asyncio.Task) -> None:
        """Let a background task run to its end (its outcome is not needed)."""
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _read(self, g: _Gathering) -> None:
        found = await self.dht.aget(g.key, latest=True)
        if found is not None:
            g.learn_read(found.value)

    def _withdraw_in_background(self, g: _Gathering) -> None:
        """Replace our registration with a tombstone, so peers still gathering do not count on us (and tell those we
        rang ahead, who may hold our ring for a gathering they have not opened yet)."""
        version = self._next_version(g.key)
        for member in g.ahead:
            self.bell.ring(member, g.key, None, version)
        self._keep(asyncio.ensure_future(store_signed(self.dht, self.identity, g.key, None, version)))


async def _store_and_read(dht: DHT, identity: Identity, key: str, value: Any, expiration: float) -> ReadBack | None:
    """Store `value` under `key`, signed by `identity` (records.py), and read the key back in the same lookup,
    which asks every known node at once (DHTNode.store with `read` and `wide`); None if no node accepted it."""
    record = signed_record(dht, identity, key, value, expiration)
    read = ReadBack(Entry(record.key))
    (accepted,) = await dht.node.store([record], read=read, wide=True)
    return read if accepted else None


def _remember(memory: collections.OrderedDict, key: str, value) -> None:
    """Note `value` for `key` in a per-key memory that keeps the MAX_REMEMBERED_KEYS most recent keys."""
    memory[key] = value
    memory.move_to_end(key)
    while len(memory) > MAX_REMEMBERED_KEYS:
        memory.popitem(last=False)


def _members_of(registrations: list[Registration], gather_until: float) -> list[Registration]:
    """The registrations a gathering's cut keeps: those for its deadline, made before it."""
    return [r for r in registrations if r.gather_until == gather_until and r.registered_at <= gather_until]


def _registration(peer_id: PeerID, value) -> Registration | None:
    """`peer_id`'s registration from a record (from the DHT or a ring); None when malformed (from buggy or
    hostile peers: see hiveengine.dht.schemas) or when its address names another peer."""
    if registration_problem(peer_id, value) is not None:
        return None
    address, bandwidth, mode, registered_at, gather_until, round_number, gathered, *rest = value
    member = GroupMember(peer_id, address, float(bandwidth), Mode(mode))
    dht_node = rest[0] if rest else None
    bans = tuple(rest[1]) if len(rest) > 1 else ()
    accusations = tuple((a[0], a[1]) for a in rest[2]) if len(rest) > 2 else ()
    times = float(registered_at), float(gather_until)
    return Registration(member, *times, round_number, gathered, dht_node, bans, accusations)


def without_outvoted(registrations: list[Registration]) -> list[Registration]:
    """The registrations whose peer no strict majority of the registrants bans. Every member cuts the same
    registrations, so every member leaves out the same peers; a minority of liars cannot push anyone out."""
    votes = collections.Counter(b for r in registrations for b in set(r.bans) if b != r.member.peer_id.raw)
    majority = len(registrations) // 2 + 1
    kept = []
    for r in registrations:
        against = votes[r.member.peer_id.raw]
        if against < majority:
            kept.append(r)
        else:
            logger.info("leaving out %s: %d of %d registrants banned it", r.member.peer_id, against, len(registrations))
    return kept
