"""Accusations: a reducer caught cheating is banned by peers that never saw it cheat, without their trusting the
peer that caught it.

A sender whose check of a reply fails (verification.py) keeps the reducer's signed reply as evidence when the
evidence alone shows the cheat (`Evidence.cheat`), and its matchmaking registrations, signed DHT records, name the
accused and the evidence's digest (at most MAX_HELD, the newest). A peer that reads such a registration fetches the
evidence from the registrant (EVIDENCE_METHOD), checks that it is what the accusation names, and checks it itself,
off the event loop: the signature must verify under the accused's key, and the signed claim must contradict the
signed reply. Only then does it ban the accused, and it keeps the evidence to serve in turn, so the ban spreads
from peer to peer. A digest is checked once; an accuser whose evidence is malformed or shows nothing (it lies, or
is wrong) is logged and its accusations are ignored from then on. What we caught ourselves outranks what we
learned: evidence we checked for others, and the bans it brought, go first when the bounds are reached (MAX_HELD
pieces, MAX_BANNED bans), so accusations an attacker makes against throwaway identities of its own, however many,
cannot push out our own evidence or bans. Bounds: MAX_CHECKING checks at once, MAX_CHECKED
digests and ignored accusers remembered, evidence of at most verification.MAX_EVIDENCE_NUMEL elements,
EVIDENCE_TIMEOUT per fetch. A fetch takes two calls: the header first, then the reply's frames into buffers of the
size that header names (at most MAX_EVIDENCE_NUMEL elements' payload), so an accuser cannot make us take in more
(frames that do not fit are refused, unread).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable

from hiveengine.averaging.verification import Evidence
from hiveengine.dht.schemas import MAX_ACCUSATIONS
from hiveengine.errors import HiveEngineError, ProtocolError
from hiveengine.transport import Peer, PeerID, Request

logger = logging.getLogger(__name__)
EVIDENCE_METHOD = "hiveengine.averaging.evidence"
MAX_HELD = MAX_ACCUSATIONS  # pieces of evidence a peer keeps to serve, and its registrations name (the newest)
MAX_CHECKED = 1024  # digests remembered as checked (each is checked once)
MAX_CHECKING = 2  # pieces of evidence fetched and checked at once
EVIDENCE_TIMEOUT = 30.0  # seconds to fetch one piece of evidence


def trim_learned_first(held: dict, learned: set, limit: int) -> list:
    """Forget the oldest of `held` (oldest first) down to `limit` entries, those in `learned` (what another peer's
    evidence brought) before any of our own; the keys forgotten (also gone from `learned`)."""
    forgotten = []
    while len(held) > limit:
        oldest = next((key for key in held if key in learned), next(iter(held)))
        held.pop(oldest)
        learned.discard(oldest)
        forgotten.append(oldest)
    return forgotten


class Accusations:
    """One peer's evidence against reducers, served to others, and its checks of theirs."""

    def __init__(self, peer: Peer, ban: Callable[[PeerID, str], None], banned: Callable[[PeerID], bool]):
        """`ban(peer_id, reason)` bans a peer whose evidence (another's) checked out; `banned(peer_id)`: whether it
        is already."""
        self.peer = peer
        self._ban, self._banned = ban, banned
        self._held: collections.OrderedDict[bytes, Evidence] = collections.OrderedDict()
        self._learned: set[bytes] = set()  # digests of held evidence that others caught (evicted first)
        self._checked: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._ignored: collections.OrderedDict[PeerID, None] = collections.OrderedDict()  # whose evidence failed
        self._checking = 0
        self._background: set[asyncio.Task] = set()
        self.confirmed = 0  # accusations whose evidence checked out here
        self.refuted = 0  # accusations whose evidence showed nothing
        peer.register(EVIDENCE_METHOD, self._on_request)

    def keep(self, evidence: Evidence, learned: bool = False) -> None:
        """Hold `evidence` (checked: it shows a cheat) to serve, and name it in our registrations; `learned`: another
        peer caught it (such evidence goes first when MAX_HELD is reached)."""
        digest = evidence.digest
        self._held[digest] = evidence
        self._held.move_to_end(digest)
        if learned:
            self._learned.add(digest)
        else:
            self._learned.discard(digest)
        trim_learned_first(self._held, self._learned, MAX_HELD)
        self._remember(digest)

    def published(self) -> list[tuple[bytes, bytes]]:
        """(the accused's raw peer id, the evidence's digest) of the evidence we hold, oldest first."""
        return [(evidence.accused.raw, digest) for digest, evidence in self._held.items()]

    def hear(self, accuser: PeerID, address: str, accused: bytes, digest: bytes) -> None:
        """`accuser` (reachable at `address`) names evidence `digest` against `accused`: check it in the
        background, unless it was checked already, names us or a peer we banned, or MAX_CHECKING run."""
        target = PeerID(accused)
        if digest in self._checked or target == self.peer.peer_id or self._banned(target):
            return
        if accuser == self.peer.peer_id or accuser in self._ignored or self._checking >= MAX_CHECKING:
            return
        self._remember(digest)
        self._checking += 1
        task = asyncio.ensure_future(self._check(accuser, address, target, digest))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _check(self, accuser: PeerID, address: str, accused: PeerID, digest: bytes) -> None:
        try:
            call = self.peer.call
            # The header alone: `out=[]` refuses (unread) any frame a hostile accuser sends along with it.
            ask = {"d": digest, "h": True}
            header, _ = await call(address, EVIDENCE_METHOD, ask, timeout=EVIDENCE_TIMEOUT, out=[])
            out = Evidence.buffers(header)
            _, reply = await call(address, EVIDENCE_METHOD, {"d": digest}, timeout=EVIDENCE_TIMEOUT, out=out)
            evidence = Evidence.parse(header, reply)
            if evidence.digest != digest or evidence.accused != accused:
                raise ValueError("the evidence is not what the accusation names")
            cheat = await asyncio.to_thread(evidence.cheat)  # a decode and a probe of up to 16M elements
        except (HiveEngineError, TimeoutError) as e:
            logger.info("could not fetch %s's evidence against %s: %s", accuser, accused, e)
            return
        except ValueError as e:
            self._ignore(accuser)
            logger.warning(
                "%s accused %s with malformed evidence (%s): its accusations are ignored", accuser, accused, e
            )
            return
        finally:
            self._checking -= 1
        if cheat is None:
            self.refuted += 1
            self._ignore(accuser)
            logger.warning(
                "%s accused %s with evidence that shows no cheat: its accusations are ignored", accuser, accused
            )
            return
        self.confirmed += 1
        self.keep(evidence, learned=True)
        self._ban(accused, f"{cheat} (accused by {accuser}; the signed evidence checked out here)")

    def _ignore(self, accuser: PeerID) -> None:
        self._ignored[accuser] = None
        while len(self._ignored) > MAX_CHECKED:
            self._ignored.popitem(last=False)

    def _remember(self, digest: bytes) -> None:
        self._checked[digest] = None
        while len(self._checked) > MAX_CHECKED:
            self._checked.popitem(last=False)

    async def _on_request(self, request: Request):
        digest = request.header.get("d")
        evidence = self._held.get(digest) if isinstance(digest, bytes) else None
        if evidence is None:
            raise ProtocolError("no evidence with that digest here")
        return evidence.header(), [] if request.header.get("h") is True else evidence.reply
