"""Progress claims are checked, not believed: an epoch nobody corroborates is left out, and claimed samples count
only as fast as a plausible rate allows."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from hiveengine.dht import DHT
from hiveengine.optim.progress import (
    PLAUSIBLE_SPEEDUP,
    PeerProgress,
    ProgressTracker,
    SwarmProgress,
    corroborated,
    progress_key,
)


def test_corroboration_keeps_a_peer_one_epoch_ahead_and_drops_a_lone_leap():
    def peer(name: str, epoch: int) -> PeerProgress:
        return PeerProgress(name, epoch, 10, 1.0, 0.0)

    peers = [peer("a", 7), peer("b", 8), peer("c", 7), peer("x", 10**9)]
    assert [p.peer for p in corroborated(peers)] == ["a", "b", "c"]
    assert SwarmProgress(8, 10, corroborated(peers)[:3]).epoch == 8
    assert [p.peer for p in corroborated([peer("a", 3), peer("x", 10**9)])] == ["a"]  # a lone pair: the lower


def test_claimed_samples_grow_no_faster_than_a_plausible_rate():
    me = bytes(32)
    tracker = ProgressTracker(SimpleNamespace(peer_id=SimpleNamespace(raw=me)), "run")
    honest = [PeerProgress(f"h{i}", 3, 64, 100.0, 0.0) for i in range(2)]
    liar = PeerProgress("liar", 3, 10**9, 1e9, 0.0)
    start = tracker._last_fetch
    swarm = tracker.plausible(SwarmProgress(3, 0, [*honest, liar]), now=start + 1.0)
    counted = {p.peer: p.samples for p in swarm.peers}
    assert counted["h0"] == counted["h1"] == 64  # honest claims within the bound count in full
    assert counted["liar"] <= PLAUSIBLE_SPEEDUP * max(64, 100.0 * 1.0)
    assert swarm.samples < 10**6


@pytest.mark.timeout(60)
def test_a_peer_whose_progress_store_fails_still_counts_its_own_progress(caplog):
    # A client-mode node that knows no other node stores nowhere: every report fails, as it does while the
    # nodes that hold the key are unreachable. The peer must still see its own samples: without them it would
    # wait for a target it already holds, or (finding nobody at its epoch) keep taking more.
    dht = DHT(client_mode=True)
    try:
        tracker = ProgressTracker(dht, "lonely")
        with caplog.at_level(logging.WARNING, "hiveengine.optim.progress"):
            dht.peer.runtime.run(tracker.report(epoch=2, samples=48, target=128, waiting=True), 30)
        assert "could not publish progress (epoch 2, 48 samples)" in caplog.text
        assert dht.get(progress_key("lonely"), latest=True, timeout=30) is None  # nowhere in the DHT
        swarm = dht.peer.runtime.run(tracker.fetch(), 30)
        assert [(p.peer, p.epoch, p.samples, p.waiting) for p in swarm.peers] == [(dht.peer_id.raw.hex(), 2, 48, True)]
        assert (swarm.epoch, swarm.samples) == (2, 48)
        dht.peer.runtime.run(tracker.retract(), 30)
        assert dht.peer.runtime.run(tracker.fetch(), 30).peers == []  # once retracted, not even to itself
    finally:
        dht.shutdown()
