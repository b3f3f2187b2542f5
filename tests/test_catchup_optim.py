"""The issue's state hijack against hiveengine.Optimizer peers (real processes): a hostile peer claims epoch 10^9
and 10^9 samples in its progress and advertises its own training state (every parameter FOREIGN) under that
epoch. Honest peers train on undisturbed, and a late joiner loads the state the honest peers attest."""

from __future__ import annotations

import pytest

from tests.procs import PeerProcess
from tests.test_optim import Swarm

pytestmark = pytest.mark.timeout(240)
EPOCHS = 3


@pytest.fixture
def swarm():
    s = Swarm()
    yield s
    s.close()


def test_a_hijacker_with_a_huge_epoch_is_never_loaded(swarm):
    honest = [swarm.add("sync", "none", seed, epochs=EPOCHS) for seed in range(2)]
    hijacker = PeerProcess("forger_state.py", swarm.bootstrap, "test-train", "optim")
    try:
        hijacker.expect("ADVERTISED")
        swarm.go(*honest)
        results = [swarm.epochs(p) for p in honest]
        for _, done in results:
            assert done["epoch"] == EPOCHS and done["rounds"]["caught_up"] == 0, done
        assert results[0][0][EPOCHS] == results[1][0][EPOCHS]
        late = swarm.add("sync", "none", 7, epochs=0)
        swarm.go(late)
        digests, done = swarm.epochs(late)
        assert done["rounds"]["caught_up"] == 1
        assert digests == {EPOCHS: results[0][0][EPOCHS]}  # the honest parameters, bit for bit
    finally:
        hijacker.close()
