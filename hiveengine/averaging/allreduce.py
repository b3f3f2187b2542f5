"""Butterfly all-reduce: each reducer owns one part of the flat buffer and aggregates it for the group.

One round, as it runs (this file holds all of it: the partition, the buffers, the sender and the reducer):
1. Partition. The buffer is cut into one part per reducer, sized so that the slowest peer finishes first
   (`balanced_shares`), at multiples of the codec's `alignment`. A buffer too small to give every reducer
   MIN_PART_BYTES goes to fewer, the fastest, reducers (the others own empty parts): such a round is bound by
   the work per message, not by bytes. Parts are cut into chunks of `chunk_elements`.
2. Send. Every contributing peer encodes each chunk of part p (with error feedback) and sends it, with its
   weight, to p's reducer in one call (`_exchange_part`, at most `window` chunks in flight per reducer).
3. Reduce. The reducer collects the chunk's copies (`_ChunkReduction`) until all senders' copies are there, or
   the late ones are given up: once half of them arrived, the rest have a grace window (the larger of
   `late_grace` and the time the first half took), and never more than `sender_timeout` after the first copy;
   each of these waits adds what the missing senders' links take (link allowance, below).
   It then aggregates the copies in peer-id order (reproducible bit for bit): weights are bounded to
   `max_weight_ratio` times the median weight, a copy holding NaN/Inf (or, under a verified mean, over
   MAX_COPY_RATIO times the median copy's norm) is left out (its sender alone gets an
   error and keeps its local values), and the rest are averaged, or CenteredClipped (hiveengine.codec.robust)
   when the round's aggregation is robust. It encodes the result once and returns it to every sender, with the
   claim a sender verifies it by (`verify`: hiveengine.averaging.verification). A sender whose own data is not
   finite withdraws (one empty message per part), so that nobody waits for it. With `audit`, the reducer also
   checks the copies of a few senders, drawn at random, against what they should have sent, recomputed
   (hiveengine.averaging.audits), and bans one that sent something else: left out of the aggregate when its
   recomputation was done by the reduction, which never waits for one (else checked once it is, in the background).
4. Decode. Each sender checks each reply and decodes the aggregate in place. Once half of the parts are back, the
   other parts' reducers have the same grace window, and no reducer is waited for longer than `sender_timeout +
   late_grace` per call (what an honest one can take); a reducer that dies, stays silent or fails verification
   costs its part for this round only (senders keep their local values there and report the part as failed),
   never the whole deadline. One caught cheating is banned on this peer (`AllReduceService.banned`): we send it
   nothing more and average none of its copies. With `audit`, a sender keeps the claims of the reducers it audits
   about their own copies, and checks them once their recomputation is done.

Link allowance: over a long link the first copy of a part can trail a local one by many round trips (a dial, UCX
wiring up its data lanes, TCP's window growing to the part's size: about 10 s for 2 MB over a 600 ms round trip),
so every wait above adds `Peer.transfer_time` for the part's bytes, at the link's measured round trip, and a
reducer waits for a copy whose request arrived already for as long as the transport waits for its frames; never
more than `max_link_allowance` (a peer that drags out its handshake to look far away, or trickles its frames,
gains at most that). A timer reads these again when it runs out, as a link that opened during the wait has only
then measured its round trip.

Buffers are reused round after round (BufferCache): fresh memory costs a page fault per 4 KiB on first touch,
which is slower than the network here.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import itertools
import logging
import math
import time
import weakref
from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import torch

from hiveengine.averaging.accusations import Accusations, trim_learned_first
from hiveengine.averaging.audits import (
    AUDIT_BOOST,
    AUDIT_BOOST_ROUNDS,
    DEFAULT_AUDIT_RATE,
    DEFAULT_AUDIT_TIMEOUT,
    DEFAULT_AUDIT_TOLERANCE,
    Audit,
    Audits,
    ClaimedCopy,
)
from hiveengine.averaging.matchmaking import GroupInfo, GroupMember
from hiveengine.averaging.suspicions import Suspicions
from hiveengine.averaging.verification import (
    PROBES,
    Claim,
    Evidence,
    Probes,
    ReducerCheatedError,
    check_reply,
    claim_message,
    reply_digest,
)
from hiveengine.codec import Aggregation, Codec, squared_norms
from hiveengine.errors import ConfigurationError, HiveEngineError, NonFiniteError, ProtocolError, TransportError
from hiveengine.transport import Peer, PeerID, Request

logger = logging.getLogger(__name__)

CHUNK_METHOD = "hiveengine.allreduce.chunk"
DEFAULT_CHUNK_ELEMENTS = 1 << 20
DEFAULT_WINDOW = 4  # chunks in flight per reducer
DEFAULT_SENDER_TIMEOUT = 5.0  # the longest a reducer waits for a chunk's copies after the first arrived
DEFAULT_LATE_GRACE = 2.0  # once half the copies (or parts) are in, the rest get this long (or what the half took)
# The most a wait adds for what links take (a part over 600 ms: ~15 s): a member that fakes a long link (drags out its
# handshake) delays a round by at most this much more than a silent one.
DEFAULT_MAX_LINK_ALLOWANCE = 20.0
MAX_WEIGHT_RATIO = 4.0  # a contribution's weight is capped at this many times the median weight of its chunk
# A part this small costs more in per-message work (a few tens of us a message) than in bytes, so a smaller
# buffer is cut into fewer parts, owned by the fastest reducers; the other reducers own empty parts. Every
# member must agree on it: it is part of the protocol.
MIN_PART_BYTES = 16 * 1024
PRECISE_MEAN_RATIO = 1e3  # copies this many times the mean's norm: a verified mean is recomputed in float64
MAX_COPY_RATIO = 1e6  # a copy this many times the median copy's norm is left out of a verified mean (float64
# keeps the others' data exact to about 1e-10 of their norm under copies up to this size)
MAX_BANNED = 1024  # reducers caught cheating that a peer remembers (the oldest are forgotten first)
ROUND_WAIT_TIMEOUT = 10.0  # how long a reducer waits for its own runner to join a round it is called for
BALANCE_ITERATIONS = 60  # bisection steps on the round's makespan (2^-60 of the bracket: exact for floats)
MAX_LAYOUTS = 8  # distinct buffer layouts kept (a changing group size or tensor size makes new ones)
SEND_LAYOUTS = 2  # distinct send-buffer layouts kept (each holds buffers for the whole flat tensor)
MAX_PENDING_AUDITS = 2  # rounds whose audits a reducer may have under way at once (each holds the audit function's
# copies, of the model say, and the copies it holds until the recomputations end); later rounds audit nobody
GENERATIONS = 2  # alternate between two sets, so a late transfer of the previous round never sees new data


class AllReduceError(HiveEngineError):
    """A chunk could not be averaged (the reducer refused it, or reduced it without this sender)."""


@dataclass(frozen=True)
class RoundOptions:
    """How one all-reduce round runs (every member should use the same `chunk_elements`)."""

    timeout: float = 60.0
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
    window: int = DEFAULT_WINDOW
    sender_timeout: float = DEFAULT_SENDER_TIMEOUT
    late_grace: float = DEFAULT_LATE_GRACE
    max_link_allowance: float = DEFAULT_MAX_LINK_ALLOWANCE
    aggregation: Aggregation = field(default_factory=lambda: Aggregation("mean"))
    max_weight_ratio: float = MAX_WEIGHT_RATIO
    # The most a sender's weight can plausibly be, from the metadata it gathered (None: no bound but the median
    # cap). The Optimizer bounds it by the samples the sender's signed progress record says it has processed.
    weight_limit: Callable[[Any], float | None] | None = None
    # check each reducer's reply against its claim (hiveengine.averaging.verification); off by default: it sits on
    # the round's critical path (PROBES probes per chunk: a sender's check takes ~0.08 ms of one core at 2,632
    # values, ~1.0 ms at 315k; bench/byzantine.py's 8 peers sharing 2 cores, with CenteredClip: about +10% per
    # training step of bench/train.py's language model, +17% to +38% per round of its 2,632-value model)
    verify: bool = False
    # Contribution audits (hiveengine.averaging.audits): `audit(sender)`, called in a thread while the round runs
    # (before it returns), returns a function that recomputes the flat contribution a sender should send this
    # round (None: cannot tell), run later in a worker thread; each sender is audited with probability
    # `audit_rate` (by one of the reducers or more; with `verify`, a reducer's own copy by the senders of its part,
    # through its claims), and one whose copy is more than `audit_tolerance` (relative, plus the codec's rounding)
    # off is banned by the member that caught it, once the recomputation is done (the round does not wait for it),
    # at most `audit_timeout` seconds after the round started (later, unaudited).
    audit: Audit | None = None
    audit_rate: float = DEFAULT_AUDIT_RATE
    audit_tolerance: float = DEFAULT_AUDIT_TOLERANCE
    audit_timeout: float = DEFAULT_AUDIT_TIMEOUT

    def __post_init__(self):
        if not (isinstance(self.audit_rate, int | float) and 0 <= self.audit_rate <= 1):
            raise ConfigurationError(f"audit_rate is a probability in [0, 1], not {self.audit_rate}")
        if not (isinstance(self.audit_tolerance, int | float) and 0 <= self.audit_tolerance < math.inf):
            raise ConfigurationError(f"audit_tolerance must be a finite number >= 0, not {self.audit_tolerance}")
        if not (isinstance(self.audit_timeout, int | float) and 0 < self.audit_timeout < math.inf):
            raise ConfigurationError(f"audit_timeout must be a finite number of seconds > 0, not {self.audit_timeout}")


@dataclass
class AllReduceResult:
    """What one round did: which reducers' parts failed (kept local values there) and who was averaged."""

    group: GroupInfo
    failed_parts: list[int] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)
    senders_averaged: int = 0


def balanced_shares(bandwidths: Sequence[float], sends: Sequence[bool], senders: int) -> list[float]:
    """The fraction of the vector each reducer should own so that the slowest peer finishes first.

    Traffic model of one butterfly round, per direction, in units of the vector's size: reducer i owning a
    fraction x receives x from each of the other senders, and, if it sends itself (s = 1), the means of the
    (1 - x) it does not own. Its time is (s + x·(senders - 2s)) / bandwidth. The shares minimise the largest
    such time (a min-max problem solved exactly by bisection on the makespan). A proportional split is up to
    ~1.3x slower than this when bandwidths are uneven.
    """
    if not bandwidths or any(b <= 0 for b in bandwidths):
        raise ValueError("every reducer needs a positive bandwidth")

    def capacity(makespan: float) -> list[float]:
        """The largest fraction each reducer can own while finishing within `makespan`."""
        caps = []
        for bandwidth, sender in zip(bandwidths, sends, strict=True):
            fixed, slope = float(sender), float(senders - 2 * sender)
            if slope > 0:
                caps.append(min(1.0, max(0.0, (makespan * bandwidth - fixed) / slope)))
            else:  # owning more never costs this peer time: it can take all, if its fixed cost fits
                caps.append(1.0 if (fixed + min(slope, 0.0)) / bandwidth <= makespan else 0.0)
        return caps

    pairs = list(zip(bandwidths, sends, strict=True))
    # No split makes the round faster than its slowest peer's traffic at its best share.
    floor = max((s + min(senders - 2 * s, 0)) / b for b, s in pairs)
    low, high = floor, max((1.0 + abs(senders - 2 * s)) / b for b, s in pairs)
    for _ in range(BALANCE_ITERATIONS):
        middle = (low + high) / 2
        low, high = (low, middle) if sum(capacity(middle)) >= 1.0 else (middle, high)
    caps = capacity(high)
    # Within those caps, stay as close to a bandwidth-proportional split as possible (it decides the ties,
    # e.g. two peers, whose traffic does not depend on the split at all): x_i = min(cap_i, scale * b_i).
    low, high = 0.0, max(1.0 / b for b in bandwidths)
    for _ in range(BALANCE_ITERATIONS):
        middle = (low + high) / 2
        short = sum(min(c, middle * b) for c, b in zip(caps, bandwidths, strict=True)) < 1.0
        low, high = (middle, high) if short else (low, middle)
    shares = [min(c, high * b) for c, b in zip(caps, bandwidths, strict=True)]
    total = sum(shares)
    return [x / total for x in shares]


def part_spans(numel: int, shares: Sequence[float], align: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) spans, one per share, proportional to it and aligned to `align`."""
    if not shares or any(b < 0 for b in shares) or sum(shares) <= 0:
        raise ValueError("shares must be non-negative with a positive sum")
    total = float(sum(shares))
    bounds, acc = [0], 0.0
    for b in shares[:-1]:
        acc += b
        cut = round(numel * acc / total / align) * align
        bounds.append(min(max(cut, bounds[-1]), numel))
    bounds.append(numel)
    return list(itertools.pairwise(bounds))


def chunk_spans(start: int, end: int, chunk: int) -> list[tuple[int, int]]:
    """[start, end) cut into pieces of at most `chunk` elements (an empty part has no chunks)."""
    return [(s, min(s + chunk, end)) for s in range(start, end, chunk)]


class BufferCache:
    """Per-layout buffer sets, handed out alternately; the least recently used layouts are dropped."""

    def __init__(self, max_layouts: int = MAX_LAYOUTS):
        self.max_layouts = max_layouts
        self._sets: collections.OrderedDict[Hashable, list[Any]] = collections.OrderedDict()
        self._turn: dict[Hashable, int] = {}
        self.made = 0  # buffer sets made so far: none in a round like the ones before it

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """The next buffer set for `key`, created with `make()` the first GENERATIONS times."""
        sets = self._sets.setdefault(key, [])
        self._sets.move_to_end(key)
        turn = self._turn.get(key, 0)
        self._turn[key] = (turn + 1) % GENERATIONS
        if len(sets) <= turn:
            sets.append(make())
            self.made += 1
        while len(self._sets) > self.max_layouts:
            dropped, _ = self._sets.popitem(last=False)
            self._turn.pop(dropped, None)
        return sets[turn]


@dataclass(frozen=True)
class _Reduced:
    """One chunk's reduction: the encoded aggregate, how many copies it holds, and the claim a verifier checks."""

    aggregate: list[torch.Tensor]
    count: int
    claim: Claim | None


class _ChunkReduction:
    """Collects one chunk's copies and resolves, once, with the encoded aggregate and how many were in it;
    `excluded` names the senders whose copy was left out (non-finite), `absent` those that withdrew."""

    def __init__(
        self,
        expected: int,
        options: RoundOptions,
        absent: set[PeerID],
        deadline: Callable[[float, set[PeerID], float], float],
    ):
        self.expected, self.options = expected, options
        self.received: dict[PeerID, tuple[float, list[torch.Tensor]]] = {}
        self.excluded: set[PeerID] = set()
        self.absent = set(absent)
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()
        self._deadline = deadline  # when a wait due at `base` gives up the copies still missing (give_up_at)
        self._first_at: float | None = None
        self._graced = False
        self._timers: list[asyncio.TimerHandle] = []

    def add(self, sender: PeerID, weight: float, payload: list[torch.Tensor], reduce: Callable) -> None:
        """Take `sender`'s copy; aggregate with `reduce` once all are in, or when the late ones are given up."""
        if self.done.done():
            raise AllReduceError("this chunk was already averaged without you (you arrived after the grace window)")
        if sender in self.received or sender in self.absent:
            raise ProtocolError("duplicate contribution to one chunk (or a copy after withdrawing)")
        self.received[sender] = (weight, payload)
        self._arrived(reduce)

    def withdraw(self, sender: PeerID, reduce: Callable) -> None:
        """`sender` sends no copy of this chunk (its data is not finite, or it bans us): nobody waits for it."""
        if not self.done.done() and sender not in self.received and sender not in self.absent:
            self.absent.add(sender)
            self._arrived(reduce)

    def _arrived(self, reduce: Callable) -> None:
        settled = len(self.received) + len(self.absent)
        if settled >= self.expected:
            self._finish(reduce)
            return
        now = asyncio.get_running_loop().time()
        if self._first_at is None:
            self._first_at = now
            self._give_up_at(now + self.options.sender_timeout, reduce)
        if not self._graced and 2 * settled >= self.expected:
            self._graced = True
            self._give_up_at(now + max(self.options.late_grace, now - self._first_at), reduce)

    def _give_up_at(self, base: float, reduce: Callable) -> None:
        """Reduce without the missing copies at loop time `base` plus what their senders' links add."""
        self._timers.append(asyncio.get_running_loop().call_at(base, self._expire, base, reduce))

    def _expire(self, base: float, reduce: Callable) -> None:
        """Give the missing copies up, unless what their links take (read now, not when the wait began: a link
        that opened since has measured its round trip, a copy may be on its way) says they may still come; it is
        bounded, so this ends."""
        if self.done.done():
            return
        loop = asyncio.get_running_loop()
        until = self._deadline(base, self.received.keys() | self.absent, self._first_at)
        if loop.time() < until:
            self._timers.append(loop.call_at(until, self._expire, base, reduce))
        else:
            self._finish(reduce)

    def _finish(self, reduce: Callable) -> None:
        for timer in self._timers:
            timer.cancel()
        if self.done.done():
            return
        try:
            # Aggregate in peer-id order, not arrival order, so every round is reproducible bit for bit.
            ordered = [(sender, *self.received[sender]) for sender in sorted(self.received)]
            self.done.set_result(reduce(ordered, self.excluded))
        except Exception as e:
            self.done.set_exception(e)


@dataclass
class _ReducerArena:
    """Receive slots (one payload per sender per chunk), fp32 outputs for one part's chunks, and the rows that a
    robust aggregation decodes each copy into (`scratch`) or, where senders ask for claims, the decoded copies that
    the claim projects (`copies`; a robust aggregation then works on those, which it leaves as they are), one chunk
    at a time: chunks are reduced on the event loop."""

    slots: list[list[list[torch.Tensor]]]
    outputs: list[torch.Tensor]
    scratch: torch.Tensor | None
    copies: torch.Tensor | None

    @classmethod
    def create(cls, codec: Codec, chunks, senders: int, device, robust: bool, verify: bool) -> _ReducerArena:
        """Buffers for `senders` copies of each of `chunks` (and the decoded copies if `verify`, else the decoding
        rows if `robust`)."""
        slots = [[codec.empty_payload(e - s, device) for _ in range(senders)] for s, e in chunks]
        outputs = [torch.empty(e - s, dtype=torch.float32, device=device) for s, e in chunks]
        size = senders * max((e - s for s, e in chunks), default=0)
        scratch = torch.empty(size, dtype=torch.float32, device=device) if robust and not verify and size else None
        copies = torch.empty(size, dtype=torch.float32, device=device) if verify and size else None
        return cls(slots, outputs, scratch, copies)


class _ReducerRound:
    """This peer's part in one group's round: a _ChunkReduction per chunk, created on first contact."""

    def __init__(
        self,
        group: GroupInfo,
        part: int,
        chunks,
        codec: Codec,
        options: RoundOptions,
        arena: _ReducerArena,
        service: AllReduceService,
    ):
        self.group, self.part, self.codec, self.chunks, self.arena = group, part, codec, chunks, arena
        self.options, self.service, self.peer = options, service, service.peer
        self.part_bytes = codec.payload_nbytes(sum(end - start for start, end in chunks))
        self.order = [m.peer_id for m in group.senders]  # peer-id order: the order of a reply's claim
        self.position = {sender: i for i, sender in enumerate(self.order)}
        self.senders = set(self.order)
        self.reductions: dict[int, _ChunkReduction] = {}
        self.arriving: dict[int, dict[PeerID, float]] = {}  # chunk -> sender -> when its announced copy is due
        self.withdrawn: set[PeerID] = set()
        self.claims = options.verify  # whether replies carry claims (also when only a sender asks for them)
        self._next_slot = [0] * len(chunks)
        self._reported: set[tuple[str, PeerID]] = set()  # (what, who) already logged in this round
        self._limits: dict[PeerID, float | None] = {}  # each sender's weight limit this round
        self.audits: Audits | None = None

    def receive_slot(self, index) -> list[torch.Tensor] | None:
        """A free arena slot for one sender's copy of chunk `index` (None when out of range or used up)."""
        if not isinstance(index, int) or not 0 <= index < len(self.chunks):
            return None
        slot = self._next_slot[index]
        if slot >= len(self.arena.slots[index]):
            return None
        self._next_slot[index] += 1
        return self.arena.slots[index][slot]

    def reduction(self, index: int) -> _ChunkReduction:
        """Chunk `index`'s reduction (made on first contact)."""
        if index not in self.reductions:
            deadline = functools.partial(self.give_up_at, index)
            reduction = _ChunkReduction(len(self.senders), self.options, self.withdrawn, deadline)
            self.reductions[index] = reduction
        return self.reductions[index]

    def link_allowance(self, settled: Collection[PeerID], since: float) -> float:
        """Seconds the links of the senders not yet `settled` add to a wait for their copies that began at `since`
        (loop time: time.monotonic()): the most any adds to sending us the whole part (a chunk's copy may come after
        the part's earlier chunks), with its dial if its link opened during the wait."""
        waiting = self.senders.difference(settled, (self.peer.peer_id,))
        allowances = (self.peer.transfer_time(sender, self.part_bytes, since=since) for sender in waiting)
        return min(self.options.max_link_allowance, max(allowances, default=0.0))

    def give_up_at(self, index: int, base: float, settled: Collection[PeerID], since: float) -> float:
        """When chunk `index`'s copies not yet `settled` are given up, for a wait due at `base` that began at `since`
        (loop times): `base` plus what their links add (link_allowance), or later for a copy whose request arrived
        already, as long as the transport waits for its frames (on_its_way); at most max_link_allowance past `base`."""
        announced = self.arriving.get(index, {})
        due = [announced[sender] for sender in self.senders.difference(settled) if sender in announced]
        until = max([base + self.link_allowance(settled, since), *due])
        return min(until, base + self.options.max_link_allowance)

    def on_its_way(self, sender: PeerID, index: object, nbytes: int) -> None:
        """`sender`'s request with its copy of chunk `index` (`nbytes` of frames) arrived: the copy is due when the
        transport gives up on its frames (TransportLimits.frame_deadline at the link's round trip)."""
        if sender in self.senders and isinstance(index, int) and 0 <= index < len(self.chunks):
            rtt = self.peer.round_trip(sender) or 0.0
            due = asyncio.get_running_loop().time() + self.peer.limits.frame_deadline(nbytes, rtt)
            self.arriving.setdefault(index, {})[sender] = due

    def withdraw(self, sender: PeerID) -> None:
        """`sender` sends no more copies in this round: its chunks not yet sent are reduced without waiting for it."""
        self.withdrawn.add(sender)
        for index, reduction in self.reductions.items():
            reduction.withdraw(sender, functools.partial(self.reduce_chunk, index))

    def reduce_chunk(self, index: int, contributions: list, excluded: set[PeerID]) -> _Reduced:
        """Aggregate chunk `index`'s (sender, weight, payload) copies; a copy holding NaN/Inf is left out (its
        sender goes into `excluded`) and the others are aggregated without it, as is the copy of a sender that failed
        its audit (banned)."""
        if self.audits is not None:
            self._audit(index, contributions)
            excluded |= self.audits.failed.keys()
        while True:
            kept = [c for c in contributions if c[0] not in excluded]
            if not kept:
                raise AllReduceError(f"every copy of chunk {index} held NaN or Inf")
            weights = self._bounded_weights([(sender, weight) for sender, weight, _ in kept])
            coefficients: list[float] = []
            copies = self._copies(len(kept), self.arena.outputs[index]) if self.claims else None
            try:
                aggregate = self.codec.reduce(
                    [payload for _, _, payload in kept],
                    weights,
                    self.arena.outputs[index],
                    requantize=True,
                    name=f"chunk {index}",
                    aggregation=self.options.aggregation,
                    scratch=self.arena.scratch,
                    coefficients=coefficients,
                    copies=copies,
                )
                if copies is not None and not self.options.aggregation.robust:
                    squares = squared_norms(copies)  # one pass over the copies, for both checks
                    outsized = self._outsized(kept, squares)
                    if outsized:
                        excluded |= outsized
                        continue
                    aggregate = self._precise_mean(index, coefficients, aggregate, copies, squares)
                claim = self._claim(index, kept, coefficients, aggregate, copies) if copies is not None else None
                return _Reduced(aggregate, len(kept), claim)
            except NonFiniteError:
                culprits = {sender for sender, _, payload in kept if not self.codec.finite(payload)}
                if not culprits:
                    raise
                for sender in culprits:
                    self._report("nonfinite", sender, "peer %s sent NaN/Inf in group %s: its copies are left out")
                excluded |= culprits

    def _audit(self, index: int, contributions: list) -> None:
        """Check the audited senders' copies of chunk `index`; ban those that fail."""
        audited = [c for c in contributions if c[0] in self.audits.drawn and c[0] not in self.audits.failed]
        if not audited:
            return
        output = self.arena.outputs[index]
        row = torch.empty(output.numel(), device=output.device)
        for sender, _, payload in audited:
            why = self.audits.check(sender, payload, self.chunks[index], row)
            if why is not None:
                self.service.convict(sender, why, self.group)

    def _outsized(self, kept: list, squares: np.ndarray) -> set[PeerID]:
        """The senders of `kept` whose decoded copy (its squared norm in `squares`) is more than MAX_COPY_RATIO times
        the (lower) median copy's norm, left out of a verified mean: copies that cancel (+M v and -M v from two
        colluders) leave the mean exact only in exact arithmetic, and at M = 1e20 even float64 rounded the honest
        copies away, so every sender's check failed an honest reducer. None when the median copy is zero."""
        norms = np.sqrt(squares.astype(np.float64))
        median = float(np.sort(norms)[(len(norms) - 1) // 2])
        if not median > 0:
            return set()
        outsized = {
            sender for (sender, _, _), norm in zip(kept, norms, strict=True) if not norm <= MAX_COPY_RATIO * median
        }
        for sender in outsized:
            self._report(
                "outsized",
                sender,
                f"peer %s sent a copy over {MAX_COPY_RATIO:g}x the median's norm in group %s: left out",
            )
        return outsized

    def _precise_mean(
        self,
        index: int,
        coefficients: list[float],
        aggregate: list[torch.Tensor],
        copies: torch.Tensor,
        squares: np.ndarray,
    ) -> list[torch.Tensor]:
        """The reply for chunk `index`, with the mean recomputed in float64 from the decoded `copies` when their
        norms (`squares`: squared) span more than PRECISE_MEAN_RATIO times the mean's: the fused fp32 mean rounds
        each value to about 2^-24 of the largest copy, so copies that cancel (+M v and -M v from two colluders,
        M = 1e10) rounded the honest data away, and every sender's check then failed an honest reducer
        (CenteredClip clips such copies and needs none of this)."""
        output = self.arena.outputs[index]
        largest, (norm,) = float(squares.max()), squared_norms(output.view(1, -1))
        if not largest > PRECISE_MEAN_RATIO**2 * float(norm):
            return aggregate
        weights = torch.tensor(coefficients, dtype=torch.float64, device=copies.device)
        output.copy_(weights @ copies.double())
        return self.codec.encode(output, name=f"aggregate of chunk {index}")

    def _copies(self, count: int, output: torch.Tensor) -> torch.Tensor:
        """A count x n matrix for a chunk's decoded copies, in the arena: where only senders asked for claims (the
        arena was made without them), made once for all of this part's chunks (senders x its longest chunk), and
        kept for the rounds that reuse the arena, however often senders ask."""
        n = output.numel()
        if self.arena.copies is None:
            longest = max(o.numel() for o in self.arena.outputs)
            self.arena.copies = torch.empty(len(self.order) * longest, dtype=torch.float32, device=output.device)
        return self.arena.copies[: count * n].view(count, n)

    def _claim(
        self, index: int, kept: list, coefficients: list[float], aggregate: list[torch.Tensor], copies: torch.Tensor
    ) -> Claim:
        """What we computed chunk `index`'s aggregate from: each sender's coefficient, the projections of its decoded
        copy (a row of `copies`) on the reply's probes and that copy's norm (zeros for senders left out), signed
        with the reply (verification.claim_message)."""
        numel = self.arena.outputs[index].numel()
        digest = reply_digest(aggregate)
        rows = [self.position[sender] for sender, _, _ in kept]
        claim = Claim(np.zeros(len(self.order)), np.zeros((len(self.order), PROBES)), np.zeros(len(self.order)))
        claim.coefficients[rows] = coefficients
        probes = Probes(self.group.group_id, self.part, index, digest, numel, claim.coefficients)
        claim.projections[rows], claim.norms[rows] = probes.project(copies)
        message = claim_message(self.group.group_id, self.part, index, numel, self.codec.name, digest, claim)
        return replace(claim, signature=self.peer.identity.sign(message))

    def _bounded_weights(self, weighted: list[tuple[PeerID, float]]) -> list[float]:
        """The weights, each at most max_weight_ratio times the (lower) median of the positive ones and at most
        what options.weight_limit allows its sender."""
        positive = sorted(w for _, w in weighted if w > 0)
        if not positive:
            return [1.0] * len(weighted)
        cap = self.options.max_weight_ratio * positive[(len(positive) - 1) // 2]
        bounded = []
        for sender, w in weighted:
            limit = self._weight_limit(sender)
            bound = cap if limit is None else min(cap, limit)
            if w > bound:
                why = "the median cap" if bound == cap else "what its signed progress allows"
                self._report(
                    "weight", sender, f"peer %s claimed weight {w:.4g} in group %s: clipped to {bound:.4g} ({why})"
                )
            bounded.append(min(w, bound))
        if not any(bounded):  # every sender clipped to nothing: no one's claim is believed more than another's
            return [1.0] * len(weighted)
        return bounded

    def _weight_limit(self, sender: PeerID) -> float | None:
        """options.weight_limit for `sender`'s gathered metadata, asked once per round (a non-negative number)."""
        if self.options.weight_limit is None:
            return None
        if sender not in self._limits:
            limit = self.options.weight_limit(self.group.gathered.get(sender))
            self._limits[sender] = None if limit is None or not limit >= 0 else float(limit)
        return self._limits[sender]

    def _report(self, what: str, sender: PeerID, message: str) -> None:
        if (what, sender) not in self._reported:
            self._reported.add((what, sender))
            logger.warning(message, sender, self.group.group_id.hex()[:8])

    def check_payload(self, index: int, payload: list[torch.Tensor]) -> list[torch.Tensor]:
        """`payload` on the arena's device, if it has the codec's layout for chunk `index` (else ProtocolError)."""
        if not 0 <= index < len(self.chunks):
            raise ProtocolError(f"chunk {index} is out of range (this part has {len(self.chunks)})")
        expected = self.arena.slots[index][0]  # every slot of a chunk has the codec's payload layout
        if len(payload) != len(expected) or any(
            t.dtype != e.dtype or t.shape != e.shape for t, e in zip(payload, expected, strict=False)
        ):
            raise ProtocolError(f"chunk {index} payload does not match the {self.codec.name} codec's layout")
        return [t.to(self.arena.outputs[index].device) for t in payload]

    async def contribute(self, sender: PeerID, index: int, weight: float, payload) -> _Reduced:
        """Add `sender`'s copy of chunk `index` and wait for the chunk's aggregate (and how many were in it)."""
        reduction = self.reduction(index)
        reduction.add(sender, weight, payload, functools.partial(self.reduce_chunk, index))
        result = await reduction.done
        if self.audits is not None and sender in self.audits.failed:
            raise AllReduceError(
                f"your copy failed this reducer's audit, which banned you: {self.audits.failed[sender]}"
            )
        if sender in reduction.excluded:
            raise AllReduceError(
                f"your copy of chunk {index} held NaN or Inf (or, under a verified mean, was over {MAX_COPY_RATIO:g}x "
                "the median copy's norm): the group averaged without it"
            )
        return result


class AllReduceService:
    """Serves the reducer side of all-reduce rounds on a peer: one per peer (`AllReduceService.of(peer)`), which
    several averagers on that peer share."""

    _services: ClassVar[weakref.WeakKeyDictionary[Peer, AllReduceService]] = weakref.WeakKeyDictionary()

    def __init__(self, peer: Peer):
        self.peer = peer
        self.buffers = BufferCache()
        self._rounds: dict[bytes, _ReducerRound] = {}
        self._waiters: dict[bytes, asyncio.Future] = {}
        self.banned: dict[PeerID, str] = {}  # peers caught cheating (why), in the order they were caught
        self._caught_in: dict[PeerID, bytes | None] = {}  # the round each banned reducer was caught in
        self._learned: set[PeerID] = set()  # the banned whom another peer's evidence convicted
        self._background: set[asyncio.Task] = set()
        self.parts_reduced = 0  # rounds in which this peer reduced a (non-empty) part
        self.send_buffers = BufferCache(SEND_LAYOUTS)
        self.pending_audits: set[asyncio.Future] = set()  # rounds' audit recomputations not done yet
        self.audit_boost = 0  # rounds left in which we audit AUDIT_BOOST times the rate (since a conviction)
        self.auditing: asyncio.Task | None = None  # the newest round's audits, checked once their recomputation ends
        self._audit_worker: concurrent.futures.ThreadPoolExecutor | None = None
        # Evidence against the reducers we caught, served to others, and our checks of theirs (accusations.py).
        self.accusations = Accusations(peer, functools.partial(self.ban, learned=True), self.banned.__contains__)
        self.suspicions = Suspicions(peer, self.banned.__contains__)  # whom others' audits convicted, to audit too
        peer.register(CHUNK_METHOD, self._on_chunk, allocate=self._receive_buffers)
        self._services[peer] = self

    @classmethod
    def of(cls, peer: Peer) -> AllReduceService:
        """The peer's all-reduce service (made on first use)."""
        service = cls._services.get(peer)
        return service if service is not None else cls(peer)

    def _receive_buffers(self, header: dict, specs, sender: PeerID) -> list[torch.Tensor] | None:
        """Land a chunk in its round's arena when the round is open here already (else: fresh memory), and note that
        `sender`'s copy is on its way (its frames follow)."""
        reducer_round = self._rounds.get(header.get("g")) if isinstance(header.get("g"), bytes) else None
        if reducer_round is None:
            return None
        reducer_round.on_its_way(sender, header.get("c"), sum(s.numel * s.dtype.itemsize for s in specs))
        return reducer_round.receive_slot(header.get("c"))

    def open_round(self, group_id: bytes, reducer_round: _ReducerRound) -> None:
        """Start serving this peer's part of round `group_id` (and wake the calls that arrived before)."""
        self._rounds[group_id] = reducer_round
        waiter = self._waiters.pop(group_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(reducer_round)

    def ban(self, peer_id: PeerID, reason: str, caught_in: bytes | None = None, learned: bool = False) -> None:
        """Exclude `peer_id` (a reducer whose reply failed verification, or a sender whose copy failed an audit)
        from our later rounds: we neither send to it nor average its copies. The round it was caught in
        (`caught_in`, a group id) still takes the copies it sends us, so that their senders learn the outcome: a
        caught reducer's copies are averaged (whether one arrives before or after its bad reply is chance, and the
        senders of our part must all get the same aggregate), a caught sender's are left out. `learned`: another
        peer's evidence convicted it (such bans are forgotten first when MAX_BANNED is reached, so a flood of
        accusations cannot make us forget the cheats we caught ourselves)."""
        if peer_id not in self.banned:
            logger.warning("banning peer %s from our averaging rounds: %s", peer_id, reason)
        self.banned[peer_id] = reason
        self._caught_in[peer_id] = caught_in
        if learned:
            self._learned.add(peer_id)
        else:
            self._learned.discard(peer_id)
        for forgotten in trim_learned_first(self.banned, self._learned, MAX_BANNED):
            self._caught_in.pop(forgotten, None)
        for group_id, open_round in list(self._rounds.items()):  # refused from now on (_on_chunk): none waits for it
            if group_id != caught_in and peer_id in open_round.senders:
                open_round.withdraw(peer_id)

    def start_audits(
        self, group: GroupInfo, options: RoundOptions, codec: Codec, subjects: list[PeerID], auditors: int
    ) -> Audits | None:
        """Draw which of `subjects` we audit in round `group` (options.audit; we are one of `auditors` members who
        can check each; those suspected are audited for sure) and start recomputing what they should send, after
        earlier rounds' recomputations (one thread: the recomputations need not be safe to run twice at once); none
        while MAX_PENDING_AUDITS rounds' still run."""
        if len(self.pending_audits) >= MAX_PENDING_AUDITS:
            round_id = group.group_id.hex()[:8]
            logger.info("%d rounds' audits still run: round %s audits nobody", MAX_PENDING_AUDITS, round_id)
            return None
        subjects = [p for p in subjects if p not in self.banned]
        certain = self.suspicions.pick(subjects)
        rate, o = self.audit_rate(options.audit_rate), options
        audits = Audits(
            o.audit, rate, o.audit_tolerance, subjects, codec, o.audit_timeout, auditors, self.audit_worker(), certain
        )
        self.suspicions.take(certain)
        if audits.recomputation is not None:
            self.pending_audits.add(audits.recomputation)
            audits.recomputation.add_done_callback(self.pending_audits.discard)
        return audits

    async def close_audits(self, audits: Audits, group: GroupInfo, until: float) -> None:
        """Once the round of `group` is over, before it returns (its caller may then change what the audit function
        reads): wait, at most until time.monotonic() `until`, for the audit function to prepare the round's
        recomputations (if it has not, they convict nobody: Audits.abandon); then, in the background, check the
        copies and claims held until their recomputations were done, and convict the senders that fail
        (Audits.settle; their copies stayed in that round's aggregates). audits_settled waits for it, and for the
        telling of its convictions."""
        if audits.prepared is not None:
            await asyncio.wait([audits.prepared], timeout=max(0.0, until - time.monotonic()))
            audits.abandon()
        if audits.recomputation is not None:
            self.auditing = asyncio.ensure_future(self._settle(audits, group))
            self.in_background(self.auditing)

    async def _settle(self, audits: Audits, group: GroupInfo) -> None:
        try:
            failed = await audits.settle()
        except Exception:
            logger.exception("the audits of round %s could not be settled", group.group_id.hex()[:8])
            return
        await asyncio.gather(*(self.convict(sender, why, group) for sender, why in failed.items()))

    def convict(self, sender: PeerID, why: str, group: GroupInfo) -> asyncio.Task:
        """Ban `sender`, whose copy failed our audit in the round of `group`, audit harder for a while (a cheat
        rarely comes alone), and tell the round's other members (Suspicions.spread: the task that does)."""
        self.ban(sender, f"it failed an audit in round {group.group_id.hex()[:8]}: {why}", group.group_id)
        self.audit_boost = AUDIT_BOOST_ROUNDS
        self.suspicions.confirmed(sender)
        telling = asyncio.ensure_future(self.suspicions.spread(sender, group))
        self.in_background(telling)
        return telling

    def audit_rate(self, rate: float) -> float:
        """The audit rate of a round we audit in: AUDIT_BOOST times `rate` (at most 1) in the AUDIT_BOOST_ROUNDS
        rounds after one of our audits convicted a sender, else `rate`."""
        if self.audit_boost <= 0:
            return rate
        self.audit_boost -= 1
        return min(1.0, AUDIT_BOOST * rate)

    def audit_worker(self) -> concurrent.futures.ThreadPoolExecutor:
        """The one thread that runs our rounds' audit recomputations, one after another."""
        if self._audit_worker is None:
            self._audit_worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hiveengine-audits")
        return self._audit_worker

    def in_background(self, coro) -> None:
        """Run `coro` as a task nobody waits for (kept referenced until it ends)."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def audits_settled(self) -> None:
        """Wait until the audits of the newest round we audited in are over (and whom they convicted is banned):
        a round returns without waiting for them."""
        if self.auditing is not None:
            await asyncio.gather(asyncio.shield(self.auditing), return_exceptions=True)

    def close_round(self, group_id: bytes) -> None:
        """Stop serving round `group_id`."""
        self._rounds.pop(group_id, None)

    async def _round(self, group_id: bytes) -> _ReducerRound:
        if group_id in self._rounds:
            return self._rounds[group_id]
        waiter = self._waiters.setdefault(group_id, asyncio.get_running_loop().create_future())
        try:
            async with asyncio.timeout(ROUND_WAIT_TIMEOUT):
                return await asyncio.shield(waiter)
        except TimeoutError:
            self._waiters.pop(group_id, None)
            raise AllReduceError("this peer is not in that averaging group (or never started its round)") from None

    async def _on_chunk(self, request: Request):
        header = request.header
        group_id, index, weight = header.get("g"), header.get("c"), header.get("w")
        if request.sender in self.banned and self._caught_in.get(request.sender) != group_id:
            raise AllReduceError(f"this peer banned you from its rounds: {self.banned[request.sender]}")
        if header.get("x") is True and isinstance(group_id, bytes) and not request.tensors:
            reducer_round = await self._round(group_id)
            if request.sender not in reducer_round.senders:
                raise ProtocolError("the caller is not a contributing member of this group")
            reducer_round.withdraw(request.sender)
            return {"n": 0}
        if not isinstance(group_id, bytes) or not isinstance(index, int) or not isinstance(weight, int | float):
            raise ProtocolError("an all-reduce chunk needs bytes 'g', int 'c' and numeric 'w'")
        if not math.isfinite(weight) or weight < 0:
            raise ProtocolError(f"weight {weight} must be finite and non-negative")
        reducer_round = await self._round(group_id)
        if request.sender not in reducer_round.senders:
            raise ProtocolError("the caller is not a contributing member of this group")
        payload = reducer_round.check_payload(index, request.tensors)
        reducer_round.claims |= header.get("v") is True
        reduced = await reducer_round.contribute(request.sender, index, float(weight), payload)
        claim = {} if reduced.claim is None else reduced.claim.header()
        return {"n": reduced.count, **claim}, reduced.aggregate


@dataclass(frozen=True)
class _Exchange:
    """What sending one part to its reducer needs: the round, our data, and the reducer's part."""

    service: AllReduceService
    group: GroupInfo
    flat: torch.Tensor
    codec: Codec
    weight: float
    residual: torch.Tensor | None
    options: RoundOptions
    deadline: float  # monotonic
    reducer: GroupMember
    part: int
    span: tuple[int, int]
    local_round: _ReducerRound | None  # set when we reduce this part ourselves
    buffers: _SendBuffers | None  # where the copies we send and the replies we get are encoded (None: in `flat`)
    audits: Audits | None  # whom we audit this round (the reducer's own copy, too, as its claims report it)


@dataclass(frozen=True)
class _SendBuffers:
    """One part's buffers for a round, per chunk: our encoded copy, the reducer's encoded aggregate and, when its
    replies are verified, our copy and the aggregate decoded (2 x n)."""

    sends: list[list[torch.Tensor]]
    means: list[list[torch.Tensor]]
    checks: list[torch.Tensor]

    @classmethod
    def create(cls, codec: Codec, chunks: list[tuple[int, int]], device: torch.device, verify: bool) -> _SendBuffers:
        return cls(
            [codec.empty_payload(e - s, device) for s, e in chunks],
            [codec.empty_payload(e - s, device) for s, e in chunks],
            [torch.empty(2, e - s, dtype=torch.float32, device=device) for s, e in chunks] if verify else [],
        )


def _round_send_buffers(
    service: AllReduceService,
    codec: Codec,
    spans: list[tuple[int, int]],
    parts: list[int],
    chunk_elements: int,
    device: torch.device,
    verify: dict[int, bool],
) -> dict[int, _SendBuffers]:
    """Every part's send buffers for a round, as one layout of the buffer cache: a layout per part filled the cache
    with a group of 8 (8 parts and our reduction's arena, over its MAX_LAYOUTS), so each round dropped and made
    every buffer anew, and paid for it in page faults (about 8 ms of CPU per peer in a verified round of 2.5M
    values). None are needed for a lossless codec whose replies are not verified: its chunks go as they are and
    land in `flat`."""
    needed = [part for part in parts if verify[part] or not codec.lossless]
    if not needed:
        return {}
    layout = ("send", codec.name, tuple((part, spans[part], verify[part]) for part in needed), chunk_elements, device)
    return service.send_buffers.get(
        layout,
        lambda: {
            part: _SendBuffers.create(codec, chunk_spans(*spans[part], chunk_elements), device, verify[part])
            for part in needed
        },
    )


async def run_allreduce(
    service: AllReduceService,
    group: GroupInfo,
    flat: torch.Tensor,
    codec: Codec,
    *,
    weight: float = 1.0,
    residual: torch.Tensor | None = None,
    options: RoundOptions | None = None,
    **settings: Any,
) -> AllReduceResult:
    """Average `flat` (1-D, contiguous, float) with `group` in place; parts whose reducer failed stay local.
    `options` (or its fields as keywords: timeout, chunk_elements, sender_timeout, late_grace, aggregation,
    ...) say how the round runs."""
    options = RoundOptions(**settings) if options is None else options
    me = group.member(service.peer.peer_id)
    if me is None:
        raise ValueError("this peer is not a member of the group it was asked to average with")
    reducers = group.reducers
    if not reducers:
        raise AllReduceError("no member of this group can reduce (all are client-mode or have no bandwidth)")
    align = codec.alignment
    chunk_elements = max(align, options.chunk_elements // align * align)
    owners = tuple((r.bandwidth, r.contributes) for r in reducers)
    min_part = -(-MIN_PART_BYTES // flat.element_size())
    spans = list(_part_spans(owners, len(group.senders), flat.numel(), align, min_part))
    result = AllReduceResult(group, spans=spans, senders_averaged=len(group.senders))
    my_part = next((i for i, r in enumerate(reducers) if r.peer_id == me.peer_id), None)
    parts = [p for p, (start, end) in enumerate(spans) if end > start] if me.contributes else []
    verify = {part: options.verify and part != my_part for part in parts}  # our own part's reply is ours
    buffers = _round_send_buffers(service, codec, spans, parts, chunk_elements, flat.device, verify)
    audits = None
    service.suspicions.joined(group)
    if options.audit is not None:
        subjects, auditors = _audit_subjects(group, spans, my_part, any(verify.values()), me.peer_id)
        if subjects:
            audits = service.start_audits(group, options, codec, subjects, auditors)
    local_round = None
    if my_part is not None:
        chunks = chunk_spans(*spans[my_part], chunk_elements)
        senders, robust, verify = len(group.senders), options.aggregation.robust, options.verify
        layout = ("reduce", codec.name, tuple(chunks), senders, flat.device, robust, verify)
        arena = service.buffers.get(
            layout, lambda: _ReducerArena.create(codec, chunks, senders, flat.device, robust, verify)
        )
        local_round = _ReducerRound(group, my_part, chunks, codec, options, arena, service)
        service.parts_reduced += spans[my_part][1] > spans[my_part][0]
        local_round.withdrawn.update(service.banned.keys() & local_round.senders)
        local_round.audits = audits
        service.open_round(group.group_id, local_round)
    started = time.monotonic()
    deadline = started + options.timeout
    exchanges: dict[int, asyncio.Task] = {}
    outcomes: dict[int, int | BaseException] = {}  # per part: the fewest senders averaged, or what failed it
    plans = {
        part: _Exchange(
            service,
            group,
            flat,
            codec,
            weight,
            residual,
            options,
            deadline,
            reducers[part],
            part,
            spans[part],
            local_round if part == my_part else None,
            buffers.get(part),
            audits,
        )
        for part in parts
    }

    def allowance(pending: set[asyncio.Task]) -> float:
        return max(_link_allowance(plans[part], started) for part, task in exchanges.items() if task in pending)

    try:
        async with asyncio.timeout(options.timeout):
            if len(parts) == 1:  # a small buffer: one part to send, right now (a task would wait a loop turn)
                try:
                    outcomes[parts[0]] = await _exchange_part(plans[parts[0]], chunk_elements)
                except Exception as e:
                    outcomes[parts[0]] = e
            elif parts:
                exchanges = {part: asyncio.ensure_future(_exchange_part(plans[part], chunk_elements)) for part in parts}
                await _wait_with_grace(list(exchanges.values()), options.late_grace, allowance)
            if local_round is not None:
                await _serve_until_reduced(local_round)
    except TimeoutError:
        logger.warning("all-reduce round %s hit its %.1f s deadline", group.group_id.hex()[:8], options.timeout)
    finally:
        service.close_round(group.group_id)
        for task in exchanges.values():
            task.cancel()
    if audits is not None:  # also past the deadline: held copies are in the aggregates, so they get checked
        await service.close_audits(audits, group, deadline)
    for part, task in exchanges.items():
        if task.done() and not task.cancelled():
            outcomes[part] = task.exception() or task.result()
    for part in parts:
        outcome = outcomes.get(part, TimeoutError("no reply within the grace window after the other parts"))
        if isinstance(outcome, BaseException):
            result.failed_parts.append(part)
            logger.warning("part %d (reducer %s) failed: %s", part, reducers[part].peer_id, outcome)
        else:
            result.senders_averaged = min(result.senders_averaged, outcome)
    return result


async def _wait_with_grace(
    tasks: list[asyncio.Task], late_grace: float, allowance: Callable[[set[asyncio.Task]], float]
) -> None:
    """Wait for `tasks`; once half of them are done, the others get the larger of `late_grace` and the time the
    first half took, plus what their links add (`allowance(pending)`, read again when the grace runs out: a link
    that opened since has measured its round trip). Those still running then are left to be cancelled."""
    loop = asyncio.get_running_loop()
    started, pending, finished = loop.time(), set(tasks), 0
    grace_until = None
    while pending:
        timeout = None if grace_until is None else grace_until + allowance(pending) - loop.time()
        if timeout is not None and timeout <= 0:
            return
        done, pending = await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finished += len(done)
        if done and grace_until is None and 2 * finished >= len(tasks):
            now = loop.time()
            grace_until = now + max(late_grace, now - started)


def _audit_subjects(
    group: GroupInfo, spans: list[tuple[int, int]], my_part: int | None, claims: bool, me: PeerID
) -> tuple[list[PeerID], int]:
    """Whom we may audit in a round, and the number of reducers P, by which every auditor splits the rate (so that a
    sender is audited at about the rate by the reducers, whatever their number): as a reducer, every other sender,
    whose copies we check as we reduce them (and, where replies carry claims, the reducers' own copies that their
    claims report, which no reducer sees); else, where replies carry claims, the reducers, whose own copies every
    other contributing member can check through them (so at about rate (K - 1) / P: a reducer aggregates a
    part of the model for everyone). Nobody, when we neither reduce nor get claims."""
    reducers = {r.peer_id for r, (start, end) in zip(group.reducers, spans, strict=True) if end > start}
    others = [m.peer_id for m in group.senders if m.peer_id != me]
    if my_part is not None and spans[my_part][1] > spans[my_part][0]:
        return others, len(reducers)
    if claims:
        return [p for p in others if p in reducers], len(reducers)
    return [], 0


@functools.lru_cache(maxsize=64)
def _part_spans(reducers: tuple[tuple[float, bool], ...], senders: int, numel: int, align: int, min_part: int) -> list:
    """Each reducer's part of the buffer (the same on every member): balanced over the reducers, or over the
    fastest of them (ties: in group order) when the buffer has fewer than `min_part` elements per reducer.
    Cached, as the balancing takes ~0.3-0.7 ms, and a group and buffer size repeat round after round."""
    parts = max(1, min(len(reducers), numel // max(1, min_part)))
    owners = sorted(range(len(reducers)), key=lambda i: -reducers[i][0])[:parts]
    owned = balanced_shares([reducers[i][0] for i in owners], [reducers[i][1] for i in owners], senders)
    shares = [0.0] * len(reducers)
    for i, share in zip(owners, owned, strict=True):
        shares[i] = share
    return part_spans(numel, shares, align)


async def _serve_until_reduced(local_round: _ReducerRound) -> None:
    """Stay in the round until every chunk of our part has been averaged (or failed) for its senders."""
    for index in range(len(local_round.chunks)):
        reduction = local_round.reduction(index)
        if not local_round.senders:
            return
        await asyncio.gather(reduction.done, return_exceptions=True)


async def _exchange_part(plan: _Exchange, chunk_elements: int) -> int:
    """Send every chunk of one part to its reducer and decode the aggregates in place; return the fewest
    senders any chunk was averaged over. With `verify`, a remote reducer's replies are checked and decoded into
    `flat` only once every chunk passed (else the part fails, `flat` keeps our values and the reducer is banned)."""
    reducer = plan.reducer.peer_id
    if plan.local_round is None and reducer in plan.service.banned:
        plan.service.in_background(_withdraw(plan))  # so that it does not wait for us, if it is honest after all
        raise AllReduceError(f"we banned reducer {reducer}: {plan.service.banned[reducer]}")
    peer = plan.service.peer
    if plan.local_round is None and peer.connection_to(reducer) is None:
        # Open the link first, under the dial's own deadlines: its handshake measures the round trip that the reply
        # deadlines below adapt to.
        await peer.connect(plan.reducer.address)
    semaphore = asyncio.Semaphore(plan.options.window)
    fewest = len(plan.group.senders)
    chunks = chunk_spans(*plan.span, chunk_elements)
    codec, flat, part = plan.codec, plan.flat, plan.part
    lossless = codec.lossless  # the chunk goes as it is (and, unverified, the aggregate lands straight in `flat`)
    verify = plan.options.verify and plan.local_round is None
    buffers = plan.buffers
    me = next(i for i, m in enumerate(plan.group.senders) if m.peer_id == plan.service.peer.peer_id)
    withdrawn: list[asyncio.Future] = []

    async def one_chunk(index: int, start: int, end: int) -> None:
        nonlocal fewest
        async with semaphore:
            if withdrawn:
                raise AllReduceError(f"our data for part {part} is not finite: we withdrew from it")
            piece = flat[start:end]
            residual = None if plan.residual is None else plan.residual[start:end]
            try:
                out = None if lossless else buffers.sends[index]
                payload = codec.encode(piece, residual, out=out, name=f"part {part}")
            except NonFiniteError as e:
                withdrawn.append(asyncio.ensure_future(_withdraw(plan)))
                await withdrawn[0]
                raise AllReduceError(f"our data for part {part} is not finite: we withdrew from it ({e})") from None
            if plan.local_round is not None:
                reduced = await plan.local_round.contribute(plan.service.peer.peer_id, index, plan.weight, payload)
                codec.decode([t.to(flat.device) for t in reduced.aggregate], piece, name=f"mean of part {part}")
                count = reduced.count
            else:
                header = {"g": plan.group.group_id, "c": index, "w": plan.weight, "v": verify}
                out = buffers.means[index] if buffers is not None else [piece]
                reply, mean = await plan.service.peer.call(
                    plan.reducer.address, CHUNK_METHOD, header, payload, timeout=_reply_timeout(plan), out=out
                )
                if verify:
                    _verify_chunk(plan, (index, start, end), me, reply, payload, mean, buffers.checks[index])
                elif not lossless:
                    codec.decode(mean, piece, name=f"mean of part {part}")
                count = reply.get("n")
                senders = len(plan.group.senders)
                if not (isinstance(count, int) and not isinstance(count, bool) and 0 <= count <= senders):
                    raise AllReduceError(f"reducer {reducer} replied with a malformed copy count {count!r:.20}")
            fewest = min(fewest, count)

    if len(chunks) == 1:  # most rounds of small buffers: no task per chunk
        outcomes = [await _outcome(one_chunk(0, *chunks[0]))]
    else:
        sending = (one_chunk(i, s, e) for i, (s, e) in enumerate(chunks))
        outcomes = await asyncio.gather(*sending, return_exceptions=True)
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    cheated = next((e for e in errors if isinstance(e, ReducerCheatedError)), None)
    if cheated is not None:
        plan.service.ban(
            reducer,
            f"its reply in round {plan.group.group_id.hex()[:8]} failed verification: {cheated}",
            plan.group.group_id,
        )
        if cheated.evidence is not None:
            plan.service.accusations.keep(cheated.evidence)
        raise AllReduceError(f"reducer {reducer} of part {part} failed verification: {cheated}")
    if errors:
        if not all(isinstance(e, TransportError | AllReduceError | TimeoutError) for e in errors):
            raise errors[0]
        raise AllReduceError(f"{len(errors)} of {len(chunks)} chunks of part {part} failed: {errors[0]}")
    if verify:
        for (start, end), checked in zip(chunks, buffers.checks, strict=True):
            flat[start:end].copy_(checked[1])
    return fewest


def _verify_chunk(plan: _Exchange, chunk: tuple, me: int, reply: dict, sent, mean, decoded: torch.Tensor) -> None:
    """Check one chunk's reply against the reducer's claim (ReducerCheatedError if it does not add up), with our
    copy decoded into row 0 of `decoded` (2 x n) and the aggregate, which stays there, into row 1; `chunk`: its
    index and span. A claim that adds up is kept for our audit of the reducer, if we drew it (its own copy, as it
    reports it)."""
    codec, (index, start, end) = plan.codec, chunk
    claim = Claim.parse(reply, len(plan.group.senders))
    probes = Probes(plan.group.group_id, plan.part, index, reply_digest(mean), decoded.shape[1], claim.coefficients)
    codec.decode(sent, decoded[0], name=f"our copy of part {plan.part}")
    try:
        codec.decode(mean, decoded[1], name=f"mean of part {plan.part}")
    except NonFiniteError as e:
        error = ReducerCheatedError(f"its aggregate holds NaN or Inf: {e}")
        error.evidence = _evidence(plan, index, claim, mean, decoded.shape[1])
        raise error from None
    try:
        check_reply(claim, me, plan.weight, *probes.project(decoded), probes.norm_bound, codec.error_bound(mean))
    except ReducerCheatedError as e:
        e.evidence = _evidence(plan, index, claim, mean, decoded.shape[1])
        raise
    reducer = plan.reducer.peer_id
    if plan.audits is not None and reducer in plan.audits.drawn:
        row = next((j for j, m in enumerate(plan.group.senders) if m.peer_id == reducer), None)
        if row is not None and claim.coefficients[row] > 0:
            plan.audits.hold_claim(reducer, ClaimedCopy(probes, (start, end), claim.projections[row].copy()))


def _evidence(plan: _Exchange, index: int, claim: Claim, reply, numel: int) -> Evidence | None:
    """The reducer's signed reply for chunk `index` as evidence, if it alone shows the cheat (else None: an
    accusation must convince peers that cannot see what we sent)."""
    link = plan.service.peer.connection_to(plan.reducer.peer_id)
    if link is None or not claim.signature:
        return None
    copy = [t.detach().to("cpu", copy=True) for t in reply]  # the reply buffers are reused next round
    evidence = Evidence(link.public_key, plan.group.group_id, plan.part, index, numel, plan.codec.name, copy, claim)
    return evidence if evidence.cheat() is not None else None


def _reply_timeout(plan: _Exchange) -> float:
    """How long to wait for a reducer's reply to one call: an honest reducer answers within `sender_timeout` of
    the first copy it got, plus what the links add (ours, and its links to the other senders, taken to be like
    ours), so one silent past that (and the grace) is given up, well before the round's deadline."""
    started = plan.deadline - plan.options.timeout
    wait = plan.options.sender_timeout + plan.options.late_grace + _link_allowance(plan, started)
    return max(0.1, min(plan.deadline - time.monotonic(), wait))


def _link_allowance(plan: _Exchange, since: float) -> float:
    """Seconds the links add to a wait for one part that began at `since` (time.monotonic()): for a remote reducer,
    our link to it (the part sent there, its aggregate back, and the dial if the link opened since); for our own
    part, the links of the other senders (_ReducerRound.link_allowance)."""
    if plan.local_round is not None:
        return plan.local_round.link_allowance((), since)
    nbytes = plan.codec.payload_nbytes(plan.span[1] - plan.span[0])
    allowance = plan.service.peer.transfer_time(plan.reducer.peer_id, nbytes, nbytes, since)
    return min(plan.options.max_link_allowance, allowance)


async def _withdraw(plan: _Exchange) -> None:
    """Tell the part's reducer we send it nothing more this round, so it does not wait for us (never raises)."""
    me = plan.service.peer.peer_id
    if plan.local_round is not None:
        plan.local_round.withdraw(me)
        return
    header = {"g": plan.group.group_id, "x": True}
    try:
        await plan.service.peer.call(plan.reducer.address, CHUNK_METHOD, header, [], timeout=_reply_timeout(plan))
    except (HiveEngineError, TimeoutError) as e:
        logger.info("could not withdraw from part %d (reducer %s): %s", plan.part, plan.reducer.peer_id, e)


async def _outcome(coro) -> BaseException | None:
    """Await `coro`; its exception, if it raised one (as gather(return_exceptions=True) reports it)."""
    try:
        await coro
    except Exception as e:
        return e
    return None
