"""Suspicions (hiveengine.averaging.suspicions): a member whose audit convicted a peer tells the round's other
members, which audit it for sure in their next rounds and ban it on their own recomputation; what a suspicion
asks of us is bounded (from and about recent members only, one per accuser per interval, a few rounds each).
Real peer processes over UCX on 127.0.0.1, and real in-process peers for the bounds."""

from __future__ import annotations

import os

import pytest

from hiveengine.averaging import GroupInfo, GroupMember
from hiveengine.averaging.suspicions import (
    SUSPECT_METHOD,
    SUSPECT_ROUNDS,
    SUSPICION_BURST,
    SUSPICION_INTERVAL,
    Suspicions,
)
from hiveengine.errors import HiveEngineError
from hiveengine.transport import Peer, PeerID
from tests.test_allreduce import average_in_processes

pytestmark = pytest.mark.timeout(180)


def test_a_reducer_one_member_caught_is_audited_and_banned_by_the_others_that_it_told(tmp_path):
    # Only member 1 audits (at rate 1); members 2 and 3 never draw anyone, yet audit the liar for sure once member 1
    # told them, and ban it on their own recomputation of its copy (through its claims: it is the only reducer).
    specs = [
        {"attack": "sign"},
        {"mode": "CLIENT", "audit_rate": 1.0},
        {"mode": "CLIENT", "audit_rate": 0.0},
        {"mode": "CLIENT", "audit_rate": 0.0},
    ]
    options = dict(timeout=30, sender_timeout=10, aggregation="centered_clip", rounds=3, audit_rate=0.0)
    members, results = average_in_processes(tmp_path, specs, "int8", **options)
    for i in (1, 2, 3):
        assert results[i]["banned"] == [members[0]["id"]]
        assert results[i]["rounds"][0]["failed_parts"] == []
    assert results[1]["rounds"][1]["failed_parts"] == [0]  # member 1 banned it first, and sent it nothing since
    assert results[0]["banned"] == []


def test_suspicions_come_only_from_and_about_recent_members_and_each_accuser_has_a_bounded_credit():
    peers = [Peer() for _ in range(9)]
    us, accuser, stranger, outlaw = peers[:4]
    subjects = [p.peer_id for p in peers[4:]]
    suspicions = Suspicions(us, {outlaw.peer_id}.__contains__)  # we banned the outlaw
    members = [p for p in peers if p is not stranger]
    group = GroupInfo(os.urandom(8), tuple(GroupMember(p.peer_id, str(p.address), 1.0) for p in members))
    run = us.runtime.run

    def tell(by: Peer, about: PeerID) -> None:
        run(by.call(us.address, SUSPECT_METHOD, {"p": about.raw}, timeout=10), 20)

    def rounds(count: int) -> None:
        for _ in range(count):
            suspicions.joined(group)

    try:
        with pytest.raises(HiveEngineError, match="recent groups"):
            tell(accuser, subjects[0])  # we were in no group with them yet
        rounds(1)
        for by, about in [(stranger, subjects[0]), (accuser, stranger.peer_id), (accuser, us.peer_id)]:
            with pytest.raises(HiveEngineError, match="recent groups"):
                tell(by, about)
        with pytest.raises(HiveEngineError, match="peer id"):
            run(accuser.call(us.address, SUSPECT_METHOD, {"p": b"short"}, timeout=10), 20)
        tell(outlaw, subjects[0])
        assert suspicions.suspects == frozenset()  # not from a peer we banned
        tell(accuser, subjects[0])
        tell(accuser, subjects[1])  # a new accuser has one to tell
        assert suspicions.suspects == {subjects[0]}
        suspicions.confirmed(subjects[0])  # our own audit convicted it: the accuser gets that one back
        assert suspicions.suspects == frozenset()
        tell(accuser, subjects[1])
        for _ in range(SUSPECT_ROUNDS):  # audited for sure in that many of our rounds, then no more
            assert suspicions.pick(subjects) == [subjects[1]]
            suspicions.take([subjects[1]])
        assert suspicions.suspects == frozenset()
        tell(accuser, subjects[2])
        assert suspicions.suspects == frozenset()  # none left
        rounds(SUSPICION_INTERVAL)  # one more every SUSPICION_INTERVAL of our rounds
        tell(accuser, subjects[2])
        assert suspicions.suspects == {subjects[2]}
        rounds(100 * SUSPICION_INTERVAL)  # and no more than SUSPICION_BURST in hand, however long it waited
        for subject in subjects:
            tell(accuser, subject)
        assert len(suspicions.suspects) == 1 + SUSPICION_BURST
        assert suspicions.pick(subjects) == [subjects[2]]  # the oldest, and only one a round: the random draws go on
    finally:
        for p in peers:
            p.shutdown()
