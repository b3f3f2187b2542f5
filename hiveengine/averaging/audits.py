"""Contribution audits: a reducer recomputes what a few random senders should have sent, and bans one that lied.

Verified reducers (verification.py) stop a reducer from lying about the aggregate, and CenteredClip bounds what one
copy can move it. Neither stops a sender whose copy is plausible but wrong: a flipped sign, or "a little is enough"
(ALIE: a shift of about one standard deviation per coordinate, inside any robust aggregator's radius), which
several colluding senders can repeat every round. BTARD's answer (Gorbunov et al. 2022) is recomputation: where a
peer's minibatch follows from public data (a seed per peer and step), anyone can recompute the gradient that peer
should have sent, and a peer that sent something else is caught. BTARD draws its validators with a multi-party
random number generator. Here each reducer draws on its own, from randomness no sender sees (`secrets`), which of
its part's senders it audits in a round: each of the round's P reducers with probability 1 - (1 - audit_rate)^(1/P)
(`auditor_rate`), so that a sender is audited, by one reducer or more, with probability `audit_rate` whatever the
group's size. A sender cannot tell which rounds are audited, before or during a round: no reduction waits for a
recomputation (below), so a reply comes as soon whether or not its reducer audits anyone (a reduction that waited
told a sender that sent its first chunk alone and timed the reply, which could then send the rest honestly only
where it was watched). So one that cheats on every part in every round is caught after about 1/audit_rate rounds
(one that cheats on a single part, moving 1/P of the model, after about P/audit_rate).
What it costs: a recomputation is of the whole contribution, however small the part it checks, so a rate per
reducer (each reducer auditing each sender with probability audit_rate) would cost every peer audit_rate x (K - 1)
recomputations per round in a group of K, 14% more compute at K = 8 and the default rate; this way it is about
audit_rate (K - 1) / P recomputations per peer and round, 1.75% more compute at K = P = 8. The default rate, 2%,
is set by that cost: at 2% audits added about 0.5% to a training step of bench/train.py's language model (8 peers
sharing 2 cores, bench/byzantine.py, on top of CenteredClip and verified reducers: the middle of 9 runs, each the
median of 6; 0% to 5% across runs). What it buys: an ALIE sender, which CenteredClip lets through, is caught after
about 1 / rate rounds (50; in three runs at rounds 16, 69 and 190, the last leaving the honest peers 9.6% worse at
the end). Raise it where compute is cheap next to the round, or attackers many. A cheat rarely comes alone, and
the first one caught shows it: a reducer whose audit convicted a sender audits AUDIT_BOOST times the rate for its
next AUDIT_BOOST_ROUNDS rounds (AllReduceService.audit_rate), which costs nothing in an honest swarm. At 2% alone,
3 ALIE colluders were caught at rounds 25, 78 and 156 in one run, and the honest peers ended 26% worse; with the
boost, at rounds 4, 7 and 8.

Reducers' own copies. A reducer's own copy reaches no other reducer, so no reducer audits it, and a reducer that
averaged a lie of its own every round moved the honest peers of bench/byzantine.py 100% to 300% away. But each
verified reply's claim (verification.py) reports the projections t_rk = <x_r, p_k> of every copy averaged, the
reducer's own included, on that reply's probes, signed, and the reply check binds the reply to them. So with
verified replies a member that reduces nothing audits too: it draws which of the reducers it audits, each with the
reducers' own probability, auditor_rate(audit_rate, P) (so a reducer's own copy, which the K - 1 other senders can
check, is audited at about audit_rate (K - 1) / P per round: more where few members reduce, and each of them
aggregates more of the model for everyone; at K = 8 and P = 1, 7 times the rate), and whoever audits a reducer, as a
reducer or not, checks, chunk by chunk, the claimed projections of the reducer's own copy against those of the
recomputed contribution (`ClaimedCopy`, in `settle`). Both vectors are fixed before the probes (they follow the
reply), so an honest copy's projections lie within verification.projection_band of the allowance below
(sqrt(PROBE_CHI2) times it: exceeded with chance 1.6e-15), and a copy d off passes a chunk's check with chance at
most 6^-4 (pi^4 / 24) (band / ||d||)^8 (verification.py's bound). For int8 the band is about 1.3 times the chunk's
norm, so an ALIE shift (about the norm) fails each chunk's check with chance about 99%, a sign flip for sure; int4's
rounding widens it to about 5 times the norm, where only a lie several times the norm shows. The band's rounding
term is bounded by the recomputation's norm, never by a norm the claim reports (one that reported a huge norm
widened the band at will). Only the reducer's row about its own copy convicts: a row about another sender's copy may
be the reducer's lie rather than the sender's, shown to the others and never to that sender (a red-team review's
finding: the reducer could then get an honest sender banned by everyone). Where every member reduces (K = P) this
adds no recomputation; where some do not, each of those recomputes about audit_rate contributions per round (a
reducer, about audit_rate (K - 1) / P). The reducer picks the reply and with it the probes, so one that knows what
it should have sent can try replies until its lie passes (about 100 tries for ALIE at int8: verification.py's
grinding).
A conviction is a local ban, resting on a recomputation that others can repeat only with the round's model. The
member that convicts tells the round's other members (suspicions.py), which audit the subject for sure in their
next rounds and ban it on their own recomputation: a cheat that goes on is banned by every honest member within a
round or two, and matchmaking's vote (a strict majority of the registrants' bans) leaves it out of the groups.
A Byzantine reducer's colluders' copies go unaudited while it reduces them (it audits nobody); once it is voted
out, the reducer that follows audits them.

What it needs: synchronous rounds in which the auditor holds the same model as the sender (gradient averaging, not
DiLoCo's local steps), and compute deterministic enough that an honest recomputation lands within the tolerance.
A peer whose model may have drifted from the others' (a part of an earlier round failed for it, so it stepped with
its own values there) should return None until it is in step again: else it would convict honest senders.
The default of 10% is loose: an honest int8 or int4 copy with error feedback measured at most 26% and 65% of the
allowance (bench/byzantine.py's model), while an ALIE copy lay 1.04-1.2 times the gradient's norm away. A
conviction rests on the auditor's own recomputation, which others can check only by repeating it with the copy in
hand, and copies are not signed: so it is a ban and a vote, not an accusation with evidence (accusations.py).
What an audit can see is bounded by the codec's rounding: with int4 a shift of up to about half the copy's norm
hides inside the allowance, with int8 about 4%.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import secrets
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from hiveengine.averaging.verification import Probes, projection_band
from hiveengine.codec import Codec
from hiveengine.errors import NonFiniteError
from hiveengine.transport import PeerID

logger = logging.getLogger(__name__)

DEFAULT_AUDIT_RATE = 0.02  # the chance that a sender is audited in a round (by one of the reducers or more)
AUDIT_BOOST = 5.0  # after one of its audits convicted a sender, a member audits this many times the rate (at most 1)
AUDIT_BOOST_ROUNDS = 50  # for this many of its rounds (about 1 / rate at the default: as long as a first catch takes)
DEFAULT_AUDIT_TIMEOUT = 60.0  # how long (from the round's start) a round's audits may take before they are dropped
DEFAULT_AUDIT_TOLERANCE = 0.1  # how far (relative to the expected contribution's norm) a copy may be off, on top
_DRAW = secrets.SystemRandom()

Recomputation = Callable[[], "torch.Tensor | None"]  # what a sender should send (None: cannot tell)
Audit = Callable[[PeerID], "Recomputation | None"]  # called during a round; its result, later, in a worker thread


def auditor_rate(rate: float, auditors: int) -> float:
    """The chance that each of `auditors` members audits a given sender, so that one or more of them does with
    probability `rate` (1 at rate 1: every auditor audits every sender)."""
    if rate >= 1 or auditors <= 1:
        return min(rate, 1.0)
    return 1.0 - (1.0 - rate) ** (1.0 / auditors)


@dataclass(frozen=True, eq=False)
class ClaimedCopy:
    """A reducer's signed claim about its own copy of one chunk: what its reply's probes (`probes`) projected that
    copy onto (`projections`, one per probe)."""

    probes: Probes
    span: tuple[int, int]  # the chunk's elements in the flat contribution
    projections: np.ndarray


class Audits:
    """One member's audits in a round: the contributions expected of the senders drawn, and those that failed."""

    def __init__(
        self,
        audit: Audit,
        rate: float,
        tolerance: float,
        senders: Iterable[PeerID],
        codec: Codec,
        timeout: float,
        auditors: int = 1,
        worker: concurrent.futures.Executor | None = None,
        certain: Collection[PeerID] = (),
    ):
        """Draw which of `senders` to audit (each with probability auditor_rate(rate, auditors): the rate split over
        `auditors`, the round's reducers), have `audit` prepare their recomputations in a
        thread of its own (the round goes on meanwhile: `prepared`), then run them in `worker` (one thread:
        recomputations never overlap; None: asyncio's default executor); `timeout`: how long from now `settle`
        waits for them; those of `certain` are drawn for sure (suspicions.py)."""
        loop = asyncio.get_running_loop()
        self.tolerance, self.codec, self._worker = tolerance, codec, worker
        chance = auditor_rate(rate, auditors)
        drawn = [sender for sender in senders if sender in certain or _DRAW.random() < chance]
        self.drawn = frozenset(drawn)
        self.failed: dict[PeerID, str] = {}  # sender -> why its copy failed
        self.prepared = asyncio.ensure_future(asyncio.to_thread(_prepare, audit, drawn)) if drawn else None
        # sender -> (its expected contribution, the codec's rounding of all of it), recomputed in `worker`
        self._expected = asyncio.ensure_future(self._recompute(worker)) if drawn else None
        self._deadline = loop.time() + timeout
        self._held: list[tuple[PeerID, list[torch.Tensor], tuple[int, int]]] = []  # copies reduced before their audit
        self._claimed: list[tuple[PeerID, ClaimedCopy]] = []  # the drawn reducers' claims about their own copies
        self._abandoned = False

    @property
    def recomputation(self) -> asyncio.Future | None:
        """The recomputation of the drawn senders' contributions (None: nobody drawn)."""
        return self._expected

    async def _recompute(self, worker: concurrent.futures.Executor | None) -> dict:
        recomputations = await self.prepared
        return await asyncio.get_running_loop().run_in_executor(worker, _recompute, recomputations, self.codec)

    def abandon(self) -> None:
        """The caller goes on before `audit` has prepared every recomputation (a round past its deadline): what it
        took may be the caller's next state, not the sender's, so nobody is convicted by these audits."""
        if self.prepared is not None and not self.prepared.done():
            logger.info(
                "the audit function had not prepared the audits of %d senders in time: unaudited", len(self.drawn)
            )
            self._abandoned = True

    def check(self, sender: PeerID, payload, span: tuple[int, int], row: torch.Tensor) -> str | None:
        """Why `sender`'s copy of flat[start:end] (`span`) fails its audit, decoded into `row` (None: it passes, or
        it is not audited, or its recomputation is not done: then a copy of it is held for `settle`); a copy that
        fails is remembered in `failed`."""
        if sender in self.failed:
            return self.failed[sender]
        if sender not in self.drawn or self._expected is None or self._expected.cancelled() or self._abandoned:
            return None
        if not self._expected.done():
            self._held.append((sender, [t.clone() for t in payload], span))
            return None
        if self._expected.exception() is not None:  # logged by settle
            return None
        return self._verdict(sender, payload, span, row)

    def hold_claim(self, reducer: PeerID, claimed: ClaimedCopy) -> None:
        """Keep `reducer`'s claim about its own copy of a chunk, if it is drawn: `settle` checks it against the
        recomputation (see the module docstring)."""
        if reducer in self.drawn and not self._abandoned:
            self._claimed.append((reducer, claimed))

    async def settle(self) -> dict[PeerID, str]:
        """Wait for the recomputations (up to the deadline) and check the copies held meanwhile and the claims
        about them: the senders whose held copy or claimed copy fails, and why (also remembered in `failed`)."""
        if self._expected is None:
            return {}
        left = max(0.0, self._deadline - asyncio.get_running_loop().time())
        await asyncio.wait([self._expected], timeout=left)
        held, self._held = self._held, []
        claimed, self._claimed = self._claimed, []
        if self._abandoned:
            return {}
        if not self._expected.done() or self._expected.cancelled():
            logger.info("the audits of %d senders took too long: their copies go unaudited", len(self.drawn))
            return {}
        if self._expected.exception() is not None:
            logger.error("the audits of %d senders failed: %r", len(self.drawn), self._expected.exception())
            return {}
        failed = {}
        for sender, payload, (start, end) in held:
            if sender not in self.failed and sender not in failed:
                row = torch.empty(end - start, device=payload[0].device)
                why = self._verdict(sender, payload, (start, end), row)
                if why is not None:
                    failed[sender] = why
        claimed = [(sender, c) for sender, c in claimed if sender not in self.failed and sender not in failed]
        if claimed:  # probes and encodes of whole chunks: off the event loop, after the recomputations
            loop = asyncio.get_running_loop()
            verdicts = await loop.run_in_executor(self._worker, self._claim_verdicts, claimed)
            for sender, why in verdicts.items():
                self.failed.setdefault(sender, why)
                failed.setdefault(sender, why)
        return failed

    def _claim_verdicts(self, claimed: list[tuple[PeerID, ClaimedCopy]]) -> dict[PeerID, str]:
        """Each reducer whose own copy, as its signed claim reports it, is not what it should have sent, and why."""
        verdicts: dict[PeerID, str] = {}
        recomputed = self._expected.result()
        for reducer, c in claimed:
            expected, rounding = recomputed.get(reducer) or (None, math.inf)
            if reducer in verdicts or expected is None or expected.numel() < c.span[1] or not math.isfinite(rounding):
                continue
            try:
                why = self._claim_verdict(reducer, c, expected, rounding)
            except Exception:  # a chunk the codec or the probes cannot take: unaudited, the other verdicts stand
                logger.exception("the audit of %s's claimed copy of elements %d-%d failed", reducer, *c.span)
                continue
            if why is not None:
                verdicts[reducer] = why
        return verdicts

    def _claim_verdict(self, reducer: PeerID, c: ClaimedCopy, expected: torch.Tensor, rounding: float) -> str | None:
        """Why the claimed projections of `reducer`'s own copy of a chunk lie too far from those of `expected`."""
        start, end = c.span
        want = expected[start:end]
        (projected,), (want_norm,) = c.probes.project(want.view(1, -1))
        try:
            own = self.codec.error_bound(self.codec.encode(want, name=f"{reducer}'s expected chunk"))
        except NonFiniteError:
            return None
        allowed = self._allowance(float(want_norm), own, rounding, c.span, expected.numel())
        off = math.hypot(*(c.projections - projected).tolist())  # no overflow, whatever numbers the claim holds
        # An honest copy's norm is at most want_norm + allowed: the dot products' rounding is bounded by what we
        # computed, never by a norm the claim reports (a reducer that reported a huge one widened the band at will).
        band = projection_band(allowed, float(want_norm) + allowed, c.probes.norm_bound)
        if off <= band:
            return None
        return (
            f"its own copy of elements {start}-{end}, as its signed claim reports it, projects {off:.4g} away from "
            f"what it should have sent on the reply's probes ({band:.4g} allowed: {allowed:.4g} off at most)"
        )

    def _allowance(self, want_norm: float, own: float, rounding: float, span: tuple[int, int], numel: int) -> float:
        """How far a copy of flat[start:end] (`span`) may honestly lie from what it should be (see the module
        docstring): the tolerance, the copy's own rounding (`own`), and what error feedback carries in, taken as
        the rounding of the whole `numel`-value contribution at the span's even share (inf when that is)."""
        carried = rounding * math.sqrt((span[1] - span[0]) / numel)
        return self.tolerance * want_norm + own + max(own, carried)

    def _verdict(self, sender: PeerID, payload, span: tuple[int, int], row: torch.Tensor) -> str | None:
        """check()'s verdict once the recomputations are done."""
        expected, rounding = self._expected.result().get(sender) or (None, math.inf)
        start, end = span
        if expected is None or expected.numel() < end or not self.codec.finite(payload):
            return None  # a non-finite copy is left out without a ban (the reduction's own check), never decoded
        got = self.codec.decode(payload, row[: end - start], name=f"{sender}'s copy")
        want = expected[start:end].to(got.device)
        want_norm = float(want.norm())
        if not math.isfinite(want_norm) or not bool(torch.isfinite(got).all()):
            return None
        allowed = self._allowance(want_norm, self.codec.error_bound(payload), rounding, span, expected.numel())
        if not math.isfinite(allowed):
            return None
        distance = float((got - want).norm())
        if distance <= allowed:
            return None
        self.failed[sender] = (
            f"its copy of elements {start}-{end} lies {distance:.4g} from what it should have sent "
            f"({allowed:.4g} allowed)"
        )
        return self.failed[sender]


def _prepare(audit: Audit, senders: list[PeerID]) -> dict[PeerID, Recomputation | None]:
    """Each sender's recomputation (_prepared), one after another."""
    return {sender: _prepared(audit, sender) for sender in senders}


def _prepared(audit: Audit, sender: PeerID) -> Recomputation | None:
    """`audit(sender)`: the recomputation of what `sender` should send, or None (also when the user's function
    fails or returns something else than a function: logged)."""
    try:
        recomputation = audit(sender)
    except Exception:
        logger.exception("the audit function failed for %s: its copies go unaudited this round", sender)
        return None
    if recomputation is not None and not callable(recomputation):
        logger.error("the audit function returned %s for %s, not a function", type(recomputation).__name__, sender)
        return None
    return recomputation


def _recompute(
    recomputations: dict[PeerID, Recomputation | None], codec: Codec
) -> dict[PeerID, tuple[torch.Tensor, float] | None]:
    """What each sender should send (_expected), one after another, with the codec's rounding of all of it (inf
    where it holds NaN/Inf): an encode of the whole contribution, kept off the event loop with the rest."""
    recomputed = {}
    for sender, recomputation in recomputations.items():
        expected = None if recomputation is None else _expected(recomputation, sender)
        if expected is None:
            recomputed[sender] = None
            continue
        try:
            rounding = codec.error_bound(codec.encode(expected, name=f"{sender}'s expected contribution"))
        except NonFiniteError:
            rounding = math.inf
        except Exception:  # a contribution the codec cannot take: unaudited, not a failed round
            logger.exception("the codec cannot encode %s's expected contribution: it goes unaudited", sender)
            recomputed[sender] = None
            continue
        recomputed[sender] = (expected, rounding)
    return recomputed


def _expected(recomputation: Recomputation, sender: PeerID) -> torch.Tensor | None:
    """A recomputation's result as a flat fp32 tensor, or None (also when it fails: logged)."""
    try:
        expected = recomputation()
    except Exception:
        logger.exception("the recomputation of %s's contribution failed: its copies go unaudited this round", sender)
        return None
    if expected is None:
        return None
    if not isinstance(expected, torch.Tensor) or not expected.is_floating_point():
        logger.error("the recomputation for %s returned %s, not a float tensor", sender, type(expected).__name__)
        return None
    return expected.detach().reshape(-1).float()
