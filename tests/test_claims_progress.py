"""Progress claims are checked, not believed: an epoch nobody corroborates is left out, and claimed samples count
only as fast as a plausible rate allows."""

from __future__ import annotations

from types import SimpleNamespace

from hiveengine.optim.progress import PLAUSIBLE_SPEEDUP, PeerProgress, ProgressTracker, SwarmProgress, corroborated


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
