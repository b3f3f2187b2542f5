"""Mixture-of-Experts pieces without a network: uids and patterns, the batching runtime, expert backends."""

from __future__ import annotations

import pytest
import torch

from hiveengine.errors import ConfigurationError, PeerBusyError, ProtocolError
from hiveengine.moe import (
    BatchingRuntime,
    ExpertBackend,
    InvalidExpertUIDError,
    UnknownExpertClassError,
    expand_pattern,
    get_expert_class,
    split_uid,
    uids_from_pattern,
)
from hiveengine.moe.server.backend import MAX_KEPT_FORWARDS
from hiveengine.moe.uids import uid_prefixes

pytestmark = pytest.mark.timeout(60)
RESULT_TIMEOUT = 30


def test_uids_split_into_name_and_coordinates():
    assert split_uid("ffn.3.17") == ("ffn", (3, 17))
    assert split_uid("layer_2.mlp.0") == ("layer_2.mlp", (0,))
    assert split_uid("ffn.x.3") == ("ffn.x", (3,))
    assert uid_prefixes("ffn.3.17") == [("ffn.", 3), ("ffn.3.", 17)]
    for bad in ["", "ffn", "3.4", "ffn.3.x", "ffn..3", "ffn.-1", "a" * 300 + ".1"]:
        with pytest.raises(InvalidExpertUIDError):
            split_uid(bad)


def test_patterns_expand_and_skip_taken_uids():
    assert expand_pattern("ffn.[0:2].[1:3]") == ["ffn.0.1", "ffn.0.2", "ffn.1.1", "ffn.1.2"]
    assert uids_from_pattern("ffn.[0:2].[0:2]", taken={"ffn.0.0"}) == ["ffn.0.1", "ffn.1.0", "ffn.1.1"]
    some = uids_from_pattern("ffn.[0:4].[0:4]", 5, taken={"ffn.0.0"}, seed=1)
    assert len(set(some)) == 5 and "ffn.0.0" not in some
    for bad in ["ffn", "ffn.[3:1]", "ffn.[0:2].x", "[0:2].ffn"]:
        with pytest.raises(InvalidExpertUIDError):
            expand_pattern(bad)
    with pytest.raises(InvalidExpertUIDError, match="free uids"):
        uids_from_pattern("ffn.[0:2]", 3)


def test_unknown_expert_class_is_a_clear_error():
    with pytest.raises(UnknownExpertClassError, match="ffn"):
        get_expert_class("nope")


def echo_runtime(max_batch_size: int, batches: list[int]) -> tuple[BatchingRuntime, object]:
    runtime = BatchingRuntime(max_batch_size=max_batch_size, batch_wait=0.0)

    def double(tensors: list[torch.Tensor], keys: list, sizes: list[int]) -> list[torch.Tensor]:
        batches.append(tensors[0].shape[0])
        return [tensors[0] * 2]

    return runtime, runtime.add_pool("echo", double)


def test_runtime_batches_queued_requests_up_to_the_limit_and_splits_results():
    batches: list[int] = []
    runtime, pool = echo_runtime(8, batches)
    inputs = [torch.full((rows, 2), float(i)) for i, rows in enumerate([3, 3, 1, 4, 2])]
    futures = [runtime.submit(pool, [x], x.shape[0]) for x in inputs]
    odd = runtime.submit(pool, [torch.ones(2, 5)], 2)  # other sample shape: never batched with the rest
    futures[1].cancel()  # its caller gave up while it queued: skipped
    runtime.start()
    try:
        for x, future in zip(inputs, futures, strict=True):
            if future is futures[1]:
                assert future.cancelled()
                continue
            assert torch.equal(future.result(RESULT_TIMEOUT)[0], x * 2)
        assert torch.equal(odd.result(RESULT_TIMEOUT)[0], torch.full((2, 5), 2.0))
        assert batches == [8, 2, 2]  # 3 + 1 + 4 fill the first batch; then 2 rows; then the odd shape
        with pytest.raises(ProtocolError, match="max_batch_size"):
            runtime.submit(pool, [torch.ones(9, 2)], 9)
    finally:
        runtime.shutdown()
    with pytest.raises(PeerBusyError):
        runtime.submit(pool, [torch.ones(1, 2)], 1)


NEVER = 1e6  # a batch_wait no test may sit through: only the active-sender rule can end the wait


def test_runtime_waits_to_fill_a_batch_only_for_other_active_senders():
    batches: list[int] = []
    runtime = BatchingRuntime(batch_wait=NEVER)
    pool = runtime.add_pool("echo", lambda tensors, keys, sizes: batches.append(len(sizes)) or [tensors[0]])
    runtime.start()
    try:
        # b is the only sender: nobody else could join its batch, so it is computed at once.
        runtime.submit(pool, [torch.ones(1, 2)], 1, sender="b").result(RESULT_TIMEOUT)
        # a's request waits for b, who is active and has nothing queued; b's request completes the batch.
        first = runtime.submit(pool, [torch.ones(1, 2)], 1, sender="a")
        second = runtime.submit(pool, [torch.ones(1, 2)], 1, sender="b")
        first.result(RESULT_TIMEOUT)
        second.result(RESULT_TIMEOUT)
        assert batches == [1, 2]
    finally:
        runtime.shutdown()


def test_runtime_reports_a_failing_batch_to_every_request():
    runtime = BatchingRuntime(batch_wait=0.0)

    def fail(tensors, keys, sizes):
        raise ValueError("expert exploded")

    pool = runtime.add_pool("bad", fail)
    futures = [runtime.submit(pool, [torch.ones(1, 1)], 1) for _ in range(2)]
    runtime.start()
    try:
        for future in futures:
            with pytest.raises(ValueError, match="exploded"):
                future.result(RESULT_TIMEOUT)
    finally:
        runtime.shutdown()


def test_runtime_options_are_checked():
    with pytest.raises(ConfigurationError):
        BatchingRuntime(max_batch_size=0)
    with pytest.raises(ConfigurationError):
        BatchingRuntime(batch_wait=-1)


def test_backend_steps_every_accumulate_batches():
    klass = get_expert_class("ffn")
    module = klass.build(8, seed=0)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    backend = ExpertBackend("ffn.0", module, klass.input_schema(8), opt, accumulate_batches=2)
    before = [p.detach().clone() for p in module.parameters()]
    x, g = torch.randn(3, 8), torch.randn(3, 8)
    grad = backend.backward([x, g])[0]
    assert grad.shape == x.shape and backend.updates == 0
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))
    backend.backward([x, g])
    assert backend.updates == 1
    assert not all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))
    with pytest.raises(ConfigurationError):
        ExpertBackend("ffn.0", module, klass.input_schema(8), accumulate_batches=-1)


def test_backward_reuses_a_kept_forward_unless_the_parameters_changed():
    klass = get_expert_class("ffn")
    module = klass.build(8, seed=0)
    backend = ExpertBackend("ffn.0", module, klass.input_schema(8), torch.optim.SGD(module.parameters(), lr=0.1))
    reference = ExpertBackend("ffn.1", klass.build(8, seed=0), klass.input_schema(8))
    x, g = torch.randn(3, 8), torch.randn(3, 8)
    out = backend.forward([x], keys=["a"])[0]
    assert torch.equal(out, reference.forward([x])[0]) and not out.requires_grad
    backend.forward([x], keys=["b"])
    assert torch.allclose(backend.backward([x, g], keys=["a"])[0], reference.backward([x, g])[0])
    assert backend.recomputed == 0
    backend.backward([x, g], keys=["b"])  # kept before the step above changed the weights: recomputed
    assert backend.recomputed == 1
    for i in range(MAX_KEPT_FORWARDS + 1):
        backend.forward([x], keys=[i])
    backend.backward([x, g], keys=[0])  # evicted: at most MAX_KEPT_FORWARDS wait
    assert backend.recomputed == 2
    backend.forward([torch.cat([x, x])], keys=["c"])
    backend.backward([x, g], keys=["c"])  # a kept forward of other shapes is not used
    assert backend.recomputed == 3


def test_a_batched_backward_mixes_kept_and_recomputed_requests():
    klass = get_expert_class("ffn")
    backend = ExpertBackend("ffn.0", klass.build(8, seed=0), klass.input_schema(8))
    reference = ExpertBackend("ffn.1", klass.build(8, seed=0), klass.input_schema(8))
    x, g = torch.randn(5, 8), torch.randn(5, 8)
    backend.forward([x[3:]], keys=["late"])  # kept; the first three rows come without a kept forward
    grads = backend.backward([x, g], keys=[None, "late"], sizes=[3, 2])
    assert backend.recomputed == 1
    assert torch.allclose(grads[0], reference.backward([x, g])[0], atol=1e-6)
    for p, q in zip(backend.module.parameters(), reference.module.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-5)


def test_a_batched_forward_is_reused_by_a_backward_batch_that_holds_all_its_requests():
    klass = get_expert_class("ffn")
    backend = ExpertBackend("ffn.0", klass.build(8, seed=0), klass.input_schema(8))
    reference = ExpertBackend("ffn.1", klass.build(8, seed=0), klass.input_schema(8))
    x, g = torch.randn(6, 8), torch.randn(6, 8)
    out = backend.forward([x], keys=["a", None, "b"], sizes=[2, 1, 3])[0]  # the unkeyed row gets no backward
    assert torch.allclose(out, reference.forward([x])[0])
    order = torch.tensor([3, 4, 5, 0, 1])  # b's rows, then a's: another order than the forward's
    grads = backend.backward([x[order], g[order]], keys=["b", "a"], sizes=[3, 2])[0]
    assert backend.recomputed == 0
    assert torch.allclose(grads, reference.backward([x[order], g[order]])[0], atol=1e-6)
    for p, q in zip(backend.module.parameters(), reference.module.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-5)
    backend.forward([x[:4]], keys=["c", "d"], sizes=[2, 2])
    backend.backward([x[:2], g[:2]], keys=["c"])  # without d's rows the kept batch cannot be used: recomputed
    assert backend.recomputed == 1


def test_keyed_requests_are_not_merged_when_the_pool_says_so():
    batches: list[int] = []
    runtime = BatchingRuntime(batch_wait=0.0)
    pool = runtime.add_pool("fwd", lambda t, keys, sizes: batches.append(len(keys)) or [t[0]], merge_keyed=False)
    futures = [runtime.submit(pool, [torch.ones(1, 2)], 1, key) for key in ["a", "b", None, None]]
    runtime.start()
    try:
        for future in futures:
            future.result(RESULT_TIMEOUT)
        assert batches == [1, 1, 2]
    finally:
        runtime.shutdown()
