"""Dead and slow expert servers are avoided: a failed server is left out of routing at once, and the samples whose
experts failed are retried on their next-best live experts in the same forward pass. Real server processes on
127.0.0.1; one is SIGKILLed."""

from __future__ import annotations

import pytest
import torch

from hiveengine.moe import RemoteMixtureOfExperts
from hiveengine.moe.client.failures import FailedPeers
from tests.test_moe import HIDDEN, SLOW_SECONDS, local_expert, servers

pytestmark = pytest.mark.timeout(240)

TIMEOUT = 20.0  # per forward / backward pass: far more than a call takes, so only a failure can end one early
BATCHES = 8


def favor(moe: RemoteMixtureOfExperts, bias: list[float]) -> None:
    """Route every sample by the gating bias alone: the same experts, best first, for any input."""
    with torch.no_grad():
        moe.proj.weight.zero_()
        moe.proj.bias.copy_(torch.tensor(bias))


def test_a_killed_servers_samples_go_to_live_experts_and_every_batch_succeeds():
    first = ["--expert-uids", "ffn.0.0", "ffn.0.1", "--seed", "0", "--optimizer", "none"]
    second = ["--expert-uids", "ffn.1.0", "ffn.1.1", "--seed", "2", "--optimizer", "none"]
    with servers(first, second) as (started, dht):
        failed = FailedPeers()  # this test's own record: no other test's failures leak in
        moe = RemoteMixtureOfExperts(
            HIDDEN, (2, 2), k_best=2, k_min=1, forward_timeout=TIMEOUT, backward_timeout=TIMEOUT, dht=dht,
            failed_peers=failed,
        )  # fmt: skip
        favor(moe, [5.0, 0.0, 0.0, 0.0])  # every sample's two best experts, ffn.0.0 and ffn.0.1, are on `first`
        x = torch.randn(8, HIDDEN, requires_grad=True)
        moe(x).sum().backward()
        assert moe.last_dispatch.responded == {"ffn.0.0", "ffn.0.1"} and not failed

        started[0].proc.kill()
        out = moe(x)  # both chosen experts fail: every sample is retried on the second server in this same call
        dispatch = moe.last_dispatch
        assert set(dispatch.failed) == {"ffn.0.0", "ffn.0.1"}
        assert dispatch.responded == {"ffn.1.0", "ffn.1.1"} and dispatch.retried == 2 * len(x)
        assert failed.addresses() == {started[0].address}
        # Both retried experts have the same gating logit (0 + 0): the output is their plain mean.
        expected = 0.5 * (local_expert(2)(x) + local_expert(3)(x))
        assert torch.allclose(out, expected, atol=1e-5)
        out.sum().backward()
        assert dispatch.backward_responded == {"ffn.1.0", "ffn.1.1"} and torch.isfinite(x.grad).all()

        # From now on the dead server is not even called: no failure, no retry, whatever the routing says.
        for _ in range(BATCHES):
            moe(torch.randn(16, HIDDEN, requires_grad=True)).sum().backward()
            assert set(moe.last_dispatch.experts) == {"ffn.1.0", "ffn.1.1"}
            assert not moe.last_dispatch.failed and moe.last_dispatch.retried == 0

        # A layer that never saw the failure (its own empty record) and routes at random also succeeds every batch:
        # its first calls to the dead server fail and those samples are retried at once.
        fresh = RemoteMixtureOfExperts(
            HIDDEN, (2, 2), k_best=2, k_min=1, forward_timeout=TIMEOUT, dht=dht, failed_peers=FailedPeers()
        )
        for step in range(BATCHES):
            batch = torch.randn(16, HIDDEN, requires_grad=True)
            fresh(batch).sum().backward()
            assert fresh.last_dispatch.responded <= {"ffn.1.0", "ffn.1.1"}
            assert bool(fresh.last_dispatch.mask(fresh.last_dispatch.responded).all())  # two answers per sample
            if step > 0:
                assert not fresh.last_dispatch.failed


def test_a_server_that_times_out_is_left_out_of_the_next_batch():
    env = {"TEST_SLOW_EXPERT_SECONDS": SLOW_SECONDS}
    fast = ["--expert-uids", "ffn.0", "ffn.1", "ffn.2"]
    slow = ["--expert-cls", "slow", "--expert-uids", "ffn.3"]
    with servers(fast, slow, env=env) as (started, dht):
        failed = FailedPeers()
        moe = RemoteMixtureOfExperts(HIDDEN, (4,), k_best=2, forward_timeout=1.5, dht=dht, failed_peers=failed)
        favor(moe, [4.0, 0.0, 0.0, 5.0])  # best: the slow ffn.3, then ffn.0
        x = torch.randn(4, HIDDEN)
        moe(x)
        assert "RPCTimeoutError" in moe.last_dispatch.failed["ffn.3"]
        assert moe.last_dispatch.responded == {"ffn.0"}  # the deadline is spent: no time to retry ffn.3's samples
        assert started[1].address in failed
        moe(x)  # the slow server is left out: the next-best experts answer, nobody waits for a timeout
        assert "ffn.3" not in moe.last_dispatch.experts and not moe.last_dispatch.failed
        assert len(moe.last_dispatch.responded) == 2 and "ffn.0" in moe.last_dispatch.responded
