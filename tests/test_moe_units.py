"""Mixture-of-Experts pieces without a network: uids and patterns, the batching runtime, expert backends."""

from __future__ import annotations

import functools

import pytest
import torch

from hiveengine.dht import ValueWithExpiration, owner_marker
from hiveengine.errors import ConfigurationError, PeerBusyError, ProtocolError
from hiveengine.moe import (
    BatchingRuntime,
    ExpertBackend,
    InvalidExpertUIDError,
    NonFiniteRequestError,
    TensorSchema,
    UnknownExpertClassError,
    check_uid,
    expand_pattern,
    get_expert_class,
    is_grid_uid,
    split_uid,
    uids_from_pattern,
)
from hiveengine.moe.client.failures import FailedPeers
from hiveengine.moe.declarations import parse_declarations, parse_successors
from hiveengine.moe.server.backend import MAX_KEPT_FORWARDS
from hiveengine.moe.server.server import checkpoint_path
from hiveengine.moe.uids import uid_prefixes
from hiveengine.transport import Identity, PeerAddress

pytestmark = pytest.mark.timeout(60)
RESULT_TIMEOUT = 30


def test_uids_split_into_name_and_coordinates():
    assert split_uid("ffn.3.17") == ("ffn", (3, 17))
    assert split_uid("layer_2.mlp.0") == ("layer_2.mlp", (0,))
    assert split_uid("ffn.x.3") == ("ffn.x", (3,))
    assert uid_prefixes("ffn.3.17") == [("ffn.", 3), ("ffn.3.", 17)]
    for bad in ["", "ffn", "ffn.3.x", "ffn..3", "ffn.-1", "ffn.²", "a" * 300 + ".1"]:
        with pytest.raises(InvalidExpertUIDError):
            split_uid(bad)


def test_hivemind_uids_are_accepted():
    """hivemind's grid uids: any name without the delimiter, then integer coordinates; plain uids elsewhere."""
    assert split_uid("transformer::encoder.2") == ("transformer::encoder", (2,))
    assert split_uid("0.1.2") == ("0", (1, 2))
    assert split_uid("3.4") == ("3", (4,))
    assert split_uid("专家.3") == ("专家", (3,))
    assert split_uid("эксперт 1.0.12") == ("эксперт 1", (0, 12))
    assert uid_prefixes("0.1.2") == [("0.", 1), ("0.1.", 2)]
    assert expand_pattern("0.[0:2]") == ["0.0", "0.1"]
    for uid in ["transformer::encoder.2", "0.1.2", "专家.3", "ffn", "ffn.x", "ffn.-1", "my expert", "🙂"]:
        assert check_uid(uid) == uid
        ExpertBackend(uid, torch.nn.Linear(2, 2), [TensorSchema((2,))])
    assert [is_grid_uid(u) for u in ["0.1.2", "ffn.x", "ffn", "ffn.٣"]] == [True, False, False, False]


@pytest.mark.parametrize(
    ("uid", "problem"),
    [
        ("", "must not be empty"),
        ("a" * 257, "257 characters long; at most 256"),
        ("ffn\n.1", "control character .* position 3"),
        ("ffn.\x00", "control character"),
        ("ffn\u2028x", "line separator"),
        ("ffn.\ud800", "lone surrogate"),
        ("ffn.01", "leading zero; write 1"),
        ("ffn..3", "empty name part"),
        (".3", "empty name part"),
        ("ffn.3.", "uid prefix"),
        ("ffn.99999999999999999999", "exceeds"),
        (7, "must be a string"),
    ],
)
def test_invalid_uids_are_refused_with_the_reason(uid, problem):
    with pytest.raises(InvalidExpertUIDError, match=problem):
        check_uid(uid)
    with pytest.raises(InvalidExpertUIDError, match=problem):
        ExpertBackend(uid, torch.nn.Linear(2, 2), [TensorSchema((2,))])


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


def test_runtime_bounds_a_batch_in_bytes_too():
    batches: list[int] = []
    runtime = BatchingRuntime(max_batch_size=100, batch_wait=0.0, max_batch_bytes=3 * 8)  # three rows of 2 floats

    def double(tensors: list[torch.Tensor], keys: list, sizes: list[int]) -> list[torch.Tensor]:
        batches.append(tensors[0].shape[0])
        return [tensors[0] * 2]

    pool = runtime.add_pool("echo", double)
    futures = [runtime.submit(pool, [torch.ones(1, 2)], 1) for _ in range(5)]
    futures.append(runtime.submit(pool, [torch.ones(10, 2)], 10))  # larger than the bound: a batch by itself
    runtime.start()
    try:
        for future in futures:
            future.result(RESULT_TIMEOUT)
        assert batches == [3, 2, 10]
    finally:
        runtime.shutdown()
    with pytest.raises(ConfigurationError):
        BatchingRuntime(max_batch_bytes=0)


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


def test_runtime_fails_screened_requests_alone():
    batches: list[int] = []
    runtime = BatchingRuntime(batch_wait=0.0)

    def screen(requests):
        return [ValueError("negative") if bool((r[0] < 0).any()) else None for r in requests]

    pool = runtime.add_pool("echo", lambda t, keys, sizes: batches.append(len(sizes)) or [t[0]], screen=screen)
    inputs = [torch.ones(1, 2), -torch.ones(1, 2), torch.ones(2, 2)]
    futures = [runtime.submit(pool, [x], x.shape[0]) for x in inputs]
    runtime.start()
    try:
        with pytest.raises(ValueError, match="negative"):
            futures[1].result(RESULT_TIMEOUT)
        assert torch.equal(futures[2].result(RESULT_TIMEOUT)[0], inputs[2])
        assert torch.equal(futures[0].result(RESULT_TIMEOUT)[0], inputs[0])
        assert batches == [2]  # one batch, computed without the refused request
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


def step_backend(backend: ExpertBackend, rows: int = 4) -> None:
    backend.backward([torch.randn(rows, 8), torch.randn(rows, 8)])


def test_backend_steps_its_lr_scheduler_once_per_update():
    klass = get_expert_class("ffn")
    module = klass.build(8, seed=0)
    factory = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    backend = ExpertBackend(
        "ffn.0",
        module,
        klass.input_schema(8),
        torch.optim.SGD(module.parameters(), lr=1.0),
        scheduler=factory,
        accumulate_batches=2,
    )
    assert backend.learning_rates() == [1.0]
    step_backend(backend)
    assert backend.learning_rates() == [1.0] and backend.updates == 0  # no update yet: the schedule waits
    step_backend(backend)
    assert backend.learning_rates() == [0.5] and backend.updates == 1
    step_backend(backend)
    step_backend(backend)
    assert backend.learning_rates() == [0.25] and backend.updates == 2
    # An LRScheduler instance works too, and its state is part of the checkpoint.
    module2 = klass.build(8, seed=0)
    opt2 = torch.optim.SGD(module2.parameters(), lr=1.0)
    restored = ExpertBackend(
        "ffn.0", module2, klass.input_schema(8), opt2, scheduler=torch.optim.lr_scheduler.StepLR(opt2, 1, 0.5)
    )
    restored.load_state_dict(backend.state_dict())
    assert restored.scheduler.last_epoch == 2 and restored.learning_rates() == [0.25]
    step_backend(restored)
    assert restored.learning_rates() == [0.125]


def test_scheduler_options_are_checked():
    klass = get_expert_class("ffn")
    module = klass.build(8, seed=0)
    opt = torch.optim.SGD(module.parameters(), lr=1.0)
    other = torch.optim.SGD(klass.build(8).parameters(), lr=1.0)
    schema = klass.input_schema(8)
    cases = [
        ({"scheduler": torch.optim.lr_scheduler.StepLR(other, 1)}, opt, "another optimizer"),
        ({"scheduler": functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1)}, None, "needs an optimizer"),
        ({"scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau}, opt, "metric"),
        ({"scheduler": lambda o: 3}, opt, "returned int"),
        ({"scheduler": 3}, opt, "LRScheduler or a callable"),
        ({"clip_grad_norm": 0.0}, opt, "clip_grad_norm must be positive"),
    ]
    for kwargs, optimizer, message in cases:
        with pytest.raises(ConfigurationError, match=message):
            ExpertBackend("ffn.0", module, schema, optimizer, **kwargs)


def test_backend_clips_the_gradient_norm_before_each_update():
    klass = get_expert_class("ffn")
    x, g = torch.randn(16, 8), 100 * torch.randn(16, 8)

    def update_norm(clip: float | None) -> float:
        module = klass.build(8, seed=0)
        before = torch.cat([p.detach().flatten().clone() for p in module.parameters()])
        opt = torch.optim.SGD(module.parameters(), lr=1.0)
        ExpertBackend("ffn.0", module, klass.input_schema(8), opt, clip_grad_norm=clip).backward([x, g])
        after = torch.cat([p.detach().flatten() for p in module.parameters()])
        return float((after - before).norm())

    assert update_norm(None) > 1.0  # SGD with lr 1 moves by the gradient: its norm is large
    assert update_norm(0.01) == pytest.approx(0.01, rel=1e-3)  # clipped to 0.01 before the step


def test_failed_peers_are_left_out_until_their_mark_expires():
    now = [100.0]
    failed = FailedPeers(expiry=30.0, clock=lambda: now[0])
    failed.add("ucx://a")
    now[0] += 10.0
    failed.add("ucx://b")
    assert failed.addresses() == {"ucx://a", "ucx://b"} and "ucx://a" in failed
    now[0] += 25.0  # a's mark (35 s old) expired, b's (25 s old) did not
    assert failed.addresses() == {"ucx://b"} and len(failed) == 1
    failed.add("ucx://b")  # a new failure renews the mark
    now[0] += 29.0
    assert "ucx://b" in failed
    failed.discard("ucx://b")
    assert not failed


def test_checkpoint_file_names_stay_in_their_directory(tmp_path):
    assert checkpoint_path(tmp_path, "ffn.0.1") == tmp_path / "ffn.0.1.pt"
    names = ["../../evil.0", "a/b.1", "专家.3", "x" * 256, "%2F.1", "/.1"]
    paths = [checkpoint_path(tmp_path, uid) for uid in names]
    assert len(set(paths)) == len(names)
    assert all(p.parent == tmp_path and len(p.name) <= 255 and "/" not in p.name for p in paths)


@pytest.mark.parametrize("name", ["expert_uids", "optim_cls", "num_warmup_steps", "initial_peers"])
def test_hivemind_server_spellings_name_the_hiveengine_one(name):
    from hiveengine.errors import ConfigurationError
    from hiveengine.moe.server.server import HIVEMIND_SPELLINGS, Server

    with pytest.raises(ConfigurationError, match=f"{name}= is hivemind's; in hiveengine use"):
        Server.create("ffn", ["ffn.0"], 8, start=False, **{name: 1})
    assert HIVEMIND_SPELLINGS[name]


def test_backend_refuses_non_finite_requests_and_skips_non_finite_updates():
    klass = get_expert_class("ffn")
    module = klass.build(8, seed=0)
    backend = ExpertBackend("ffn.0", module, klass.input_schema(8), torch.optim.SGD(module.parameters(), lr=0.1))
    x, nan = torch.randn(3, 8), torch.full((3, 8), float("nan"))
    forward, backward = backend.screen("forward", [[nan], [x]]), backend.screen("backward", [[x, nan]])
    assert isinstance(forward[0], NonFiniteRequestError) and "NaN or Inf" in str(forward[0]) and forward[1] is None
    assert isinstance(backward[0], NonFiniteRequestError)
    before = [p.detach().clone() for p in module.parameters()]
    backend.backward([x * 1e6, torch.full_like(x, 3e38)])  # finite, but the parameters' gradients overflow
    assert backend.updates == 0 and backend.skipped_updates == 1
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))
    assert all(p.grad is None for p in module.parameters())  # nothing left to leak into the next update
    backend.backward([x, torch.randn(3, 8)])
    assert backend.updates == 1


def test_kept_activations_are_counted_in_bytes_and_bounded():
    klass = get_expert_class("ffn")
    x = torch.randn(32, 16)
    one = ExpertBackend("ffn.0", klass.build(16, seed=0), klass.input_schema(16))
    one.forward([x], keys=["a"])
    per_request = one.kept_bytes
    # inputs, the LayerNorm's output, both Linear outputs (4x wide) and the GELU's output, at least
    assert per_request >= 4 * x.numel() * (1 + 1 + 4 + 4 + 1) - 1
    bounded = ExpertBackend("ffn.0", klass.build(16, seed=0), klass.input_schema(16), max_kept_bytes=3 * per_request)
    for key in range(10):
        bounded.forward([x], keys=[key])
        assert bounded.kept_bytes <= 3 * per_request
    assert bounded.kept_requests == 3 and bounded.kept_bytes == 3 * per_request
    bounded.backward([x, torch.randn(32, 16)], keys=[9])  # the newest are kept: no recompute
    assert bounded.recomputed == 0
    nothing = ExpertBackend("ffn.0", klass.build(16, seed=0), klass.input_schema(16), max_kept_bytes=per_request - 1)
    nothing.forward([x], keys=["a"])  # larger than the whole bound: not kept
    assert nothing.kept_requests == 0 and nothing.kept_bytes == 0


def flooded_runtime_batches(honest_pool: str) -> list[tuple[str, list]]:
    """The batches (pool, keys) a runtime of max_batch_size 4 forms for 8 queued 1-row requests of a flooder in
    pool "flooded", then one of an honest sender in `honest_pool`."""
    batches: list[tuple[str, list]] = []
    runtime = BatchingRuntime(max_batch_size=4, batch_wait=0.0)
    pools = {
        name: runtime.add_pool(name, lambda t, keys, sizes, name=name: batches.append((name, keys)) or [t[0]])
        for name in ("flooded", "other")
    }
    one = [torch.ones(1, 2)]
    futures = [runtime.submit(pools["flooded"], one, 1, key=f"f{i}", sender="flooder") for i in range(8)]
    futures.append(runtime.submit(pools[honest_pool], one, 1, key="h", sender="honest"))
    runtime.start()
    try:
        for future in futures:
            future.result(RESULT_TIMEOUT)
    finally:
        runtime.shutdown()
    return batches


def test_a_flooding_client_evicts_its_own_kept_activations_not_the_others():
    klass = get_expert_class("ffn")
    x = torch.randn(32, 16)
    backend = ExpertBackend("ffn.0", klass.build(16, seed=0), klass.input_schema(16))
    backend.forward([x], keys=[("honest", 1)])
    backend.max_kept_bytes = 3 * backend.kept_bytes
    for fid in range(MAX_KEPT_FORWARDS + 4):  # over the byte bound, and the count bound
        backend.forward([x], keys=[("flooder", fid)])
    assert backend.kept_requests == 3
    backend.backward([x, torch.randn(32, 16)], keys=[("honest", 1)])  # still kept: no recompute
    assert backend.recomputed == 0


def test_runtime_serves_the_least_recently_served_sender_first_and_shares_batches():
    # Another pool: the honest request goes right after the batch in progress, not after the flooder's queue.
    assert flooded_runtime_batches("other") == [
        ("flooded", ["f0", "f1", "f2", "f3"]),
        ("other", ["h"]),
        ("flooded", ["f4", "f5", "f6", "f7"]),
    ]
    # The same pool: batches are shared round-robin between senders.
    assert flooded_runtime_batches("flooded") == [
        ("flooded", ["f0", "h", "f1", "f2"]),
        ("flooded", ["f3", "f4", "f5", "f6"]),
        ("flooded", ["f7"]),
    ]


def test_declarations_are_believed_only_when_signed_by_the_peer_their_address_names():
    server, attacker = Identity.generate(), Identity.generate()
    address = str(PeerAddress("127.0.0.1", 9, server.peer_id))
    at_attacker = str(PeerAddress("127.0.0.1", 9, attacker.peer_id))

    def entry(value, expiration=100.0):
        return ValueWithExpiration(value, expiration)

    server_marker, attacker_marker = owner_marker(server.public_key), owner_marker(attacker.public_key)
    uid_value = {
        server_marker: entry(address),
        attacker_marker: entry(address, 200.0),  # the attacker claims the server's address: ignored
        "plain": entry(at_attacker, 300.0),  # no owner: ignored
        owner_marker(attacker.public_key) + "x": entry("not an address", 400.0),
    }
    assert parse_declarations(entry(uid_value)) == address
    assert parse_declarations(entry(at_attacker)) is None  # a plain value
    assert parse_declarations(None) is None
    prefix_value = {
        (0, server_marker): entry(address),
        (1, attacker_marker): entry(address),  # a coordinate the server never declared: ignored
        (2, attacker_marker): entry(at_attacker),  # the attacker's own expert: believed (open swarm)
        3: entry(address),  # unsigned
        ("4", server_marker): entry(address),  # not a coordinate
    }
    assert parse_successors(entry(prefix_value)) == {0: address, 2: at_attacker}
