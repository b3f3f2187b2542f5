"""Suspicions: a member whose audit convicted a peer tells the round's other members, which audit that peer for
sure in their next rounds, each with its own recomputation.

An audit's ban is local (audits.py): it rests on a recomputation that only a member holding the round's model can
repeat, so it is no evidence that others could check later. Bans reach the groups through matchmaking's vote, which
leaves out a peer that a strict majority of the registrants banned; but at 2% per round each member convicts a
cheat on its own after about 50 rounds of its own, and a cheat that one member banned (a reducer, say) went on in
everyone else's rounds. BTARD (Gorbunov et al. 2022) answers an accusation with a recomputation by every peer. Here a
member that convicts sends the subject's id to the other members of that round (`spread`), and each one that takes
it audits the subject for sure in its next SUSPECT_ROUNDS rounds in which it can (`pick`, `take`): a cheat that goes
on is caught by every honest member within a round or two, and their votes leave it out. Nobody bans on another's
word (an audit convicts only on what the subject itself sent or signed), so a suspicion cannot frame an honest peer:
what a false one costs is recomputations. Bounds: one is taken only from a peer of our last RECENT_GROUPS groups
that we have not banned, about another such peer; a new accuser may tell us one, and earns one more every
SUSPICION_INTERVAL of our rounds (up to SUSPICION_BURST), and one back for each that our own audit confirmed
(`confirmed`: a cheat rarely comes alone, so an honest member may catch several in a row); at most MAX_SUSPECTS are
held (the oldest dropped), and a round audits at most SUSPECTS_PER_ROUND of them for sure, so a flood of suspicions
(from throwaway identities, say) costs at most that many recomputations per round, and the random draws go on.
The subject learns it is suspected if a colluder of it is among those told, and may then send honestly while it is
watched; it is still banned by the member that caught it, and caught again when it cheats again.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Iterable

from hiveengine.averaging.matchmaking import GroupInfo
from hiveengine.errors import ProtocolError
from hiveengine.transport import Peer, PeerID, Request

logger = logging.getLogger(__name__)

SUSPECT_METHOD = "hiveengine.averaging.suspect"
SUSPECT_ROUNDS = 2  # rounds in which a member that took a suspicion audits its subject for sure
SUSPECTS_PER_ROUND = 1  # suspects a round audits for sure, at most (the oldest first)
SUSPICION_BURST = 3  # suspicions an accuser may have in hand, at most
SUSPICION_INTERVAL = 20  # our rounds in which an accuser earns one more (a new one starts with one)
RECENT_GROUPS = 4  # the groups whose members may tell us a suspicion, about one another
MAX_SUSPECTS = 16  # suspicions held at once (the oldest dropped)
MAX_ACCUSERS = 256  # accusers whose credit we remember (the longest silent forgotten: it starts anew with one)
SUSPICION_TIMEOUT = 5.0  # seconds to tell one member


class Suspicions:
    """A peer's suspicions: those it was told (to audit for sure) and the telling of its own convictions."""

    def __init__(self, peer: Peer, banned: Callable[[PeerID], bool]):
        self.peer, self._banned = peer, banned
        self.rounds = 0  # our rounds so far (the clock of SUSPICION_INTERVAL)
        self._recent: collections.deque[frozenset[PeerID]] = collections.deque(maxlen=RECENT_GROUPS)
        # subject -> (the rounds left in which we audit it for sure, who told us), oldest first
        self._suspects: collections.OrderedDict[PeerID, tuple[int, PeerID]] = collections.OrderedDict()
        # accuser -> (the suspicions it may tell us, our round then)
        self._credit: collections.OrderedDict[PeerID, tuple[float, int]] = collections.OrderedDict()
        peer.register(SUSPECT_METHOD, self._on_suspect)

    def joined(self, group: GroupInfo) -> None:
        """We take part in a round of `group`: its members may tell us suspicions about one another."""
        self.rounds += 1
        self._recent.append(frozenset(m.peer_id for m in group.members))

    @property
    def suspects(self) -> frozenset[PeerID]:
        """The peers we audit for sure in our next rounds in which we can."""
        return frozenset(self._suspects)

    def pick(self, subjects: Iterable[PeerID]) -> list[PeerID]:
        """Which of a round's `subjects` it audits for sure: the oldest suspects among them, at most
        SUSPECTS_PER_ROUND; call `take` with those it did audit."""
        subjects = set(subjects)
        return [p for p in self._suspects if p in subjects][:SUSPECTS_PER_ROUND]

    def take(self, audited: Iterable[PeerID]) -> None:
        """A round of ours audits `audited` for sure: one round fewer is left of their suspicions."""
        for subject in audited:
            if subject not in self._suspects:
                continue
            left, accuser = self._suspects[subject]
            if left <= 1:
                del self._suspects[subject]
            else:
                self._suspects[subject] = (left - 1, accuser)

    def forget(self) -> None:
        """Drop the suspicions we were told (a new training run, say)."""
        self._suspects.clear()

    def confirmed(self, subject: PeerID) -> None:
        """Our own audit convicted `subject`: whoever told us of it, while we still held that, gets one back."""
        _, accuser = self._suspects.pop(subject, (0, None))
        if accuser is not None and accuser in self._credit:
            credit, at = self._credit[accuser]
            self._credit[accuser] = (min(SUSPICION_BURST, credit + 1), at)

    async def spread(self, subject: PeerID, group: GroupInfo) -> None:
        """Tell the other members of `group` that our audit convicted `subject` (never raises)."""
        me = self.peer.peer_id
        told = [m for m in group.members if m.peer_id not in (me, subject) and not self._banned(m.peer_id)]
        outcomes = await asyncio.gather(
            *(self.peer.call(m.address, SUSPECT_METHOD, {"p": subject.raw}, timeout=SUSPICION_TIMEOUT) for m in told),
            return_exceptions=True,
        )
        for member, outcome in zip(told, outcomes, strict=True):
            if isinstance(outcome, Exception):
                logger.info("could not tell %s that %s failed our audit: %r", member.peer_id, subject, outcome)

    async def _on_suspect(self, request: Request) -> dict:
        raw = request.header.get("p")
        if not isinstance(raw, bytes) or len(raw) != len(self.peer.peer_id.raw):
            raise ProtocolError("a suspicion names a peer id ('p': bytes)")
        subject, accuser = PeerID(raw), request.sender
        if not any(accuser in group and subject in group for group in self._recent) or subject == self.peer.peer_id:
            raise ProtocolError("we take suspicions only about and from the members of our recent groups")
        if self._banned(accuser) or self._banned(subject) or subject in self._suspects:
            return {}
        credit, at = self._credit.pop(accuser, (1.0, self.rounds))
        credit = min(SUSPICION_BURST, credit + (self.rounds - at) / SUSPICION_INTERVAL)
        self._credit[accuser] = (credit - 1 if credit >= 1 else credit, self.rounds)
        while len(self._credit) > MAX_ACCUSERS:
            self._credit.popitem(last=False)
        if credit < 1:
            return {}
        self._suspects[subject] = (SUSPECT_ROUNDS, accuser)
        while len(self._suspects) > MAX_SUSPECTS:
            self._suspects.popitem(last=False)
        logger.info("%s says %s failed its audit: we audit it in our next %d rounds", accuser, subject, SUSPECT_ROUNDS)
        return {}
