"""A progress record at the swarm's own epoch from a peer that never averages (the issue's fake-samples attack,
tests/peers/swarm_attacker.py, real processes) must not hold every gathering open until its deadline: the honest
peers strike the liar and stop waiting for it, never strike each other, and keep averaging in step. (How fast they
train under this and the other record attacks, against a clean run, is bench/swarm_attacks.py.)"""

from __future__ import annotations

import pytest

from hiveengine.optim.attendance import PROGRESS_FIELD, UNPROVEN_SHIFT, Attendance
from hiveengine.optim.progress import PeerProgress
from tests.procs import PeerProcess
from tests.test_optim import Swarm

EPOCHS = 6


def at(peer: str, epoch: int) -> PeerProgress:
    return PeerProgress(peer, epoch, 10, 1.0, 0.0)


def came(*peers: str) -> list[dict]:
    return [{PROGRESS_FIELD: p} for p in peers]


def test_a_peer_that_never_comes_is_waited_for_at_exponentially_spaced_epochs_only():
    attendance = Attendance("me")
    waited = []
    for epoch in range(200):
        expected = attendance.expected([at("me", epoch), at("honest", epoch), at("liar", epoch)], epoch)
        waited += [epoch] if "liar" in {p.peer for p in expected} else []
        attendance.settle(expected, came("me", "honest"), epoch, ["me", "honest", "liar"])
    assert waited == [0, 16, 48, 112]  # left out 2^(k + UNPROVEN_SHIFT) - 1 epochs after its k-th miss
    assert UNPROVEN_SHIFT == 4 and attendance.suspects() == {"liar"}


def test_a_known_peer_is_forgiven_its_first_miss_and_a_peer_that_comes_is_cleared():
    attendance = Attendance("me")
    peers = [at("me", 0), at("slow", 0)]
    attendance.settle(attendance.expected(peers, 0), came("me", "slow"), 0, ["me", "slow"])
    attendance.settle(attendance.expected(peers, 1), came("me"), 1, ["me", "slow"])  # missed once
    assert [p.peer for p in attendance.expected(peers, 2)] == ["me", "slow"]  # still waited for
    attendance.settle(attendance.expected(peers, 2), came("me"), 2, ["me", "slow"])  # missed twice
    assert [p.peer for p in attendance.expected(peers, 3)] == ["me"]  # left out one epoch
    assert [p.peer for p in attendance.expected(peers, 4)] == ["me", "slow"]
    attendance.settle(attendance.expected(peers, 4), came("me", "slow"), 4, ["me", "slow"])
    assert attendance.suspects() == set()
    junk = [{PROGRESS_FIELD: ["unhashable"]}, "junk", {PROGRESS_FIELD: None}]
    attendance.settle(attendance.expected(peers, 5), [*came("me", "slow"), *junk], 5, ["me", "slow"])
    assert attendance.suspects() == set()  # a member's junk metadata names nobody


def test_nobody_is_struck_when_the_expected_peers_are_more_than_one_group():
    attendance = Attendance("me", group_limit=2)
    peers = [at("me", 0), at("a", 0), at("b", 0)]
    attendance.settle(attendance.expected(peers, 0), came("me", "a"), 0, ["me", "a", "b"])  # b: another group
    assert attendance.suspects() == set()
    attendance.settle(attendance.expected(peers[:2], 1), came("me"), 1, ["me", "a", "b"])  # one group: a missed
    assert attendance.suspects() == {"a"}


def test_gone_peers_are_forgotten():
    attendance = Attendance("me")
    attendance.settle([at("me", 0), at("gone", 0)], came("me"), 0, ["me", "gone"])
    assert attendance.suspects() == {"gone"}
    attendance.settle([at("me", 1)], came("me"), 1, ["me"])
    assert attendance.suspects() == set()


@pytest.mark.timeout(240)
def test_a_progress_liar_at_our_epoch_is_struck_and_the_honest_peers_average_every_epoch():
    swarm = Swarm()
    liar = None
    try:
        honest = [swarm.add("sync", "none", seed, epochs=EPOCHS) for seed in range(2)]
        liar = PeerProcess("swarm_attacker.py", "samples", swarm.bootstrap, "test-train")
        liar_id = liar.expect("READY")
        liar.expect("ATTACKING")  # its record at epoch 0 is stored: the first gathering expects it
        swarm.go(*honest)
        results = [swarm.epochs(p) for p in honest]
        for _, done in results:
            assert done["epoch"] == EPOCHS and done["rounds"]["averaged"] == EPOCHS, done
            assert done["suspects"] == [liar_id], done  # the liar, and never an honest peer
        assert results[0][0][EPOCHS] == results[1][0][EPOCHS]
    finally:
        if liar is not None:
            liar.close()
        swarm.close()
