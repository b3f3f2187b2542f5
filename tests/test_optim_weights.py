"""An Optimizer peer's gradient weight is bounded by its signed progress: a member that averages with far more
weight than the samples its own progress records report (real processes, tests/peers/optim_peer.py with
WEIGHT_FACTOR) is clipped to what they allow by the reducer, and no honest peer is ever clipped."""

from __future__ import annotations

import pytest

from hiveengine.optim.optimizer import WEIGHT_SLACK
from hiveengine.optim.progress import PeerProgress, ProgressTracker
from tests.test_optim import Swarm

EPOCHS = 4


def test_the_samples_a_report_allows_grow_at_the_plausible_rate_from_its_time():
    tracker = ProgressTracker(None, "run")  # only its rate is used here
    tracker.rate = 10.0
    report = PeerProgress("p", 3, 40, 1e9, time=100.0)  # its claimed speed is not what it is extrapolated with
    assert tracker.samples_by_now(report, now=102.5) == 65.0
    assert tracker.samples_by_now(report, now=90.0) == 40.0  # a report from the future allows only itself


@pytest.mark.timeout(240)
def test_an_inflated_weight_is_clipped_to_signed_progress_and_honest_ones_never_are():
    swarm = Swarm()
    try:
        # Steps of 50 ms (16 samples each): between heartbeats (50 ms) a report can fall behind by about one step,
        # so the bound is well under the median cap (4 times the median weight) that applies in any case.
        pace = {"STEP_SECONDS": "0.05"}
        honest = [swarm.add("sync", "none", seed, epochs=EPOCHS, env=pace) for seed in range(3)]
        inflater = swarm.add("sync", "none", 3, epochs=EPOCHS, env={**pace, "WEIGHT_FACTOR": str(4 * WEIGHT_SLACK)})
        swarm.go(*honest, inflater)
        results = [swarm.epochs(p) for p in [*honest, inflater]]
        attacker = results[-1][1]["me"]
        for _, done in results:
            assert done["epoch"] == EPOCHS and done["rounds"]["averaged"] >= EPOCHS - 1, done
        # The model is small: one member reduces it all (the attacker's own reducer, too, runs the honest code).
        assert set().union(*(done["clipped"] for _, done in results)) == {attacker}
        assert len({digests[EPOCHS] for digests, _ in results}) == 1
    finally:
        swarm.close()
