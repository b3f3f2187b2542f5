"""Which peers of an epoch to wait for at its gathering: not those whose progress records never come to average.

A gathering closes early once every expected peer registered; otherwise it waits until its deadline
(matchmaking_time). The expected peers are those reporting progress at our epoch, and a progress record proves
only that its signer wrote it: a stranger's record at our epoch (or a peer that reports but never averages) would
hold every gathering open until its deadline. So a peer that was expected but is not in the group that formed
gets a strike, and is left out of the count for a number of epochs that doubles with each strike: a peer that
keeps away costs a slow gathering at exponentially spaced epochs only. A peer we have averaged with before is
forgiven its first miss (2^(strikes-1) - 1 epochs: 0, 1, 3, ...); one never seen in our groups is left out for
2^(strikes+3) - 1 epochs (15, 31, ...), so a lie from a fresh identity costs one slow gathering, then one more
only after UNPROVEN_SHIFT doublings. A peer seen in a group is forgiven. Members name their progress peer in their
registration's gathered metadata (PROGRESS_FIELD). Strikes are given only while the expected peers fit one group
(target_group_size): a larger swarm is cut into several groups.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from hiveengine.optim.progress import PeerProgress

logger = logging.getLogger(__name__)

PROGRESS_FIELD = "p"  # the gathered-metadata field naming the member's progress peer
UNPROVEN_SHIFT = 4  # doublings of the first exclusion for a peer never seen in our groups (2^4 - 1 = 15 epochs)


class Attendance:
    """Strikes for peers that were expected at a gathering and did not come."""

    def __init__(self, me: str, group_limit: int | None = None):
        """`group_limit`: the averager's target_group_size. Strikes are given only when the expected peers fit one
        group: a larger swarm's gathering never closes early (it is cut into grid groups at its deadline), so its
        count needs no protection, and the peers of the other groups did come."""
        self._me = me
        self._group_limit = group_limit
        self._strikes: dict[str, tuple[int, int]] = {}  # progress peer -> (strikes, epoch it is counted again)
        self._seen: set[str] = set()  # progress peers that were in one of our groups (and still report progress)

    def expected(self, here: Iterable[PeerProgress], epoch: int) -> list[PeerProgress]:
        """The peers of `here` (those at `epoch`) to wait for: ourselves, and those not serving a strike."""
        return [p for p in here if p.peer == self._me or self._strikes.get(p.peer, (0, 0))[1] <= epoch]

    def suspects(self) -> set[str]:
        """The peers that stayed out of a gathering they were expected at, since last seen in one of our groups."""
        return set(self._strikes)

    def settle(self, expected: list[PeerProgress], gathered: Iterable, epoch: int, alive: Iterable[str]) -> None:
        """After the round of `epoch`: strike each expected peer the group's `gathered` metadata does not name
        (when the expected peers fit one group), forgive those it names, and forget peers no longer `alive`
        (reporting progress)."""
        came = {meta[PROGRESS_FIELD] for meta in gathered if isinstance(meta, dict) and _named(meta)}
        if self._group_limit is not None and len(expected) > self._group_limit:
            expected = []  # several groups: who was not in ours may well have been in another
        alive = set(alive)
        for peer in came & alive:
            self._strikes.pop(peer, None)
            self._seen.add(peer)
        for p in expected:
            if p.peer not in came:
                strikes = self._strikes.get(p.peer, (0, 0))[0] + 1
                left_out = 2 ** (strikes - 1 + (0 if p.peer in self._seen else UNPROVEN_SHIFT)) - 1
                self._strikes[p.peer] = (strikes, epoch + left_out + 1)
                if left_out:
                    logger.info(
                        "epoch %d: peer %s reports progress but stayed out of %d gatherings: not waiting for it "
                        "for %d epochs",
                        epoch,
                        p.peer[:12],
                        strikes,
                        left_out,
                    )
        for peer in [peer for peer in self._strikes if peer not in alive]:
            del self._strikes[peer]
        self._seen &= alive


def _named(meta: dict) -> bool:
    """Whether a member's gathered metadata names a progress peer (it is the member's own, unchecked, word)."""
    return isinstance(meta.get(PROGRESS_FIELD), str)
