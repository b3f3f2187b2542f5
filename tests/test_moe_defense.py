"""Expert servers defend themselves (issue 17 item 5, issue 16's signed declarations): a hostile client process
(tests/peers/moe_hostile.py) attacks a real server process, and an honest client in this process checks that its
results and waits are unaffected."""

from __future__ import annotations

import contextlib
import time

import pytest
import torch

from hiveengine.moe import (
    MoEBeamSearcher,
    NonFiniteReplyError,
    RemoteExpert,
    RemoteMixtureOfExperts,
    expert_key,
    get_expert_class,
    get_experts,
)
from hiveengine.moe.client.failures import FailedPeers
from hiveengine.moe.protocol import DHT_TIMEOUT
from tests.procs import PeerProcess
from tests.test_moe import HIDDEN, SEED, ExpertServer, local_expert, servers

pytestmark = pytest.mark.timeout(180)

RESULT_TIMEOUT = 120.0  # seconds a hostile process may take to report its next result
SLOW_SECONDS = 0.1  # each batch of the slow expert sleeps this long: a deterministic compute cost
FLOOD_REQUESTS = 80  # concurrent flood requests, each one batch: about 8 s of work queued at once
LOADED_FACTOR = 10  # an honest call under the flood may take this many times its unloaded time (~0.1 s; FIFO: 80x)
SLOW_ENV = {"TEST_SLOW_EXPERT_SECONDS": str(SLOW_SECONDS)}


class Hostile:
    """A tests/peers/moe_hostile.py process; `result(name)` waits for its `RESULT name value` line."""

    def __init__(self, *args: str):
        self.proc = PeerProcess("moe_hostile.py", *args)

    def result(self, name: str) -> str:
        line = self.proc.expect("RESULT", timeout=RESULT_TIMEOUT)
        got, value = line.split(" ", 1)
        assert got == name, f"expected result {name}, got {line}"
        return value

    def results(self, *names: str) -> dict[str, str]:
        return {name: self.result(name) for name in names}

    def close(self) -> None:
        self.proc.close()


def hostile(*args: str) -> Hostile:
    return Hostile(*[str(a) for a in args])


@contextlib.contextmanager
def serving(*args: str, env: dict | None = None):
    """An ExpertServer process without a DHT, closed when the block exits."""
    started = ExpertServer(*args, "--no-dht", env=env)
    try:
        yield started
    finally:
        started.close()


def test_non_finite_inputs_and_gradients_are_refused_and_never_applied():
    with serving(*f"--expert-uids ffn.0 --optimizer sgd --lr 0.1 --seed {SEED}".split()) as server:
        expert = RemoteExpert("ffn.0", server.address)
        x = torch.randn(8, HIDDEN)
        with torch.no_grad():
            before = expert(x)
        attack = hostile("nonfinite", server.address, "ffn.0", HIDDEN)
        try:
            refused = attack.results("nan_forward", "nan_backward", "inf_backward", "overflow_backward")
        finally:
            attack.close()
        assert refused == {
            "nan_forward": "NonFiniteRequestError",
            "nan_backward": "NonFiniteRequestError",
            "inf_backward": "NonFiniteRequestError",
            "overflow_backward": "ok",  # finite, but the parameters' gradients overflow: the update is skipped
        }
        with torch.no_grad():
            after = expert(x)
        assert torch.isfinite(after).all() and torch.equal(after, before)
        info = expert.info()
        assert info["updates"] == 0 and info["skipped_updates"] == 1
        expert(x.requires_grad_()).sum().backward()  # honest training goes on
        assert expert.info()["updates"] == 1


MAX_SAMPLE = 64 << 10  # a sequence of 1024 positions of HIDDEN float32s


def test_a_sample_over_max_sample_bytes_is_refused():
    args = f"--expert-cls transformer --expert-uids tf.0 --optimizer none --seed {SEED} --max-sample-bytes {MAX_SAMPLE}"
    with serving(*args.split()) as server:
        attack = hostile("long", server.address, "tf.0", HIDDEN, "--rows", 16 * 1024)
        try:
            assert attack.result("long_forward") == "SampleTooLargeError"
        finally:
            attack.close()
        x = torch.randn(2, 1024, HIDDEN)  # at the limit: served
        with torch.no_grad():
            y = RemoteExpert("tf.0", server.address)(x)
            assert torch.allclose(y, get_expert_class("transformer").build(HIDDEN, SEED)(x), atol=1e-5)


CLIP = 0.01
SCALE = 1e6


def test_gradient_clipping_bounds_what_one_scaled_backward_call_moves():
    with serving(
        *f"--expert-uids ffn.0 --optimizer sgd --lr 1 --seed {SEED} --clip-grad-norm {CLIP}".split()
    ) as server:
        attack = hostile("scaled", server.address, "ffn.0", HIDDEN, "--scale", SCALE, "--seed", 7)
        try:
            assert attack.result("scaled_backward") == "ok"
        finally:
            attack.close()
        torch.manual_seed(7)  # the hostile's tensors, replayed: what the server must have done with them
        x_attack, g_attack = torch.randn(4, HIDDEN), torch.randn(4, HIDDEN) * SCALE
        replicas = {}
        for clip in (CLIP, None):
            module = local_expert(0)
            module(x_attack).backward(g_attack)
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
            torch.optim.SGD(module.parameters(), lr=1.0).step()
            replicas[clip] = module
        x = torch.randn(8, HIDDEN)
        with torch.no_grad():
            served, clipped, unclipped, untouched = (
                RemoteExpert("ffn.0", server.address)(x),
                replicas[CLIP](x),
                replicas[None](x),
                local_expert(0)(x),
            )
        assert torch.allclose(served, clipped, atol=1e-5)
        assert (served - untouched).norm() < 0.1 * untouched.norm() < (unclipped - untouched).norm()


def test_a_flooding_client_delays_an_honest_one_by_about_one_batch_and_huge_requests_are_refused():
    args = "--expert-cls slow --expert-uids slow.0 slow.1 --optimizer none --max-batch-size 8 --batch-wait 0"
    with serving(*args.split(), "--max-request-bytes", str(1 << 20), env=SLOW_ENV) as server:
        experts = [RemoteExpert(uid, server.address) for uid in ("slow.0", "slow.1")]
        x = torch.randn(1, HIDDEN)

        def timed_call(expert: RemoteExpert) -> float:
            start = time.monotonic()
            with torch.no_grad():
                expert(x)
            return time.monotonic() - start

        for expert in experts:
            timed_call(expert)  # the first call opens the connection (~0.6 s): not part of a call's normal time
        unloaded = max(timed_call(expert) for expert in experts * 2)
        attack = hostile("flood", server.address, "slow.0", HIDDEN, "--rows", 8, "--count", FLOOD_REQUESTS)
        try:
            assert attack.result("huge") == "ProtocolError"  # 16 MiB against a 1 MiB limit: refused unread
            attack.result("loaded")  # the flood's first reply is back: all of its requests reached the server
            loaded = [timed_call(expert) for expert in experts * 2]
            honest_done = time.time()
            assert int(attack.result("flood_ok")) == FLOOD_REQUESTS  # the attacker is served too, just not first
            flood_done = float(attack.result("flood_done"))
        finally:
            attack.close()
        # The flood held ~FLOOD_REQUESTS batches of work; in arrival order an honest call would wait for all of them.
        assert honest_done < flood_done
        assert max(loaded) < LOADED_FACTOR * unloaded, (loaded, unloaded)


BURST_REQUEST_BYTES = 256 << 10
MAX_CLIENT_BYTES = 1 << 20  # four burst requests


def test_one_client_holds_at_most_max_client_bytes_of_requests_at_once():
    rows = BURST_REQUEST_BYTES // (4 * HIDDEN)
    args = f"--expert-cls slow --expert-uids slow.0 --optimizer none --max-batch-size {rows} --batch-wait 0"
    limits = f"--max-request-bytes {2 * BURST_REQUEST_BYTES} --max-client-bytes {MAX_CLIENT_BYTES}"
    with serving(*args.split(), *limits.split(), env={"TEST_SLOW_EXPERT_SECONDS": "1"}) as server:
        attack = hostile("burst", server.address, "slow.0", HIDDEN, "--rows", rows, "--count", 12)
        try:
            served, refused = attack.results("burst_ok", "burst_refused").values()
        finally:
            attack.close()
        # Each request is one 1 s batch, and all 12 arrive within it: at most 4 fit in the client's bytes at once.
        assert 1 <= int(served) <= 8 and refused == "['ResourceLimitError']"
        with torch.no_grad():
            y = RemoteExpert("slow.0", server.address)(torch.randn(rows, HIDDEN))  # another client: served
        assert y.shape == (rows, HIDDEN)


KEEP_HIDDEN = 256
MAX_KEPT = 4 << 20


def test_kept_activations_stay_under_their_byte_bound():
    args = f"--expert-uids ffn.0 --hidden-dim {KEEP_HIDDEN} --optimizer none --seed {SEED} --max-kept-bytes {MAX_KEPT}"
    with serving(*args.split()) as server:
        attack = hostile("keep", server.address, "ffn.0", KEEP_HIDDEN, "--rows", 256, "--count", 16)
        try:
            assert attack.result("kept_sent") == "16"
        finally:
            attack.close()
        expert = RemoteExpert("ffn.0", server.address)
        info = expert.info()
        per_request = info["kept_bytes"] / info["kept_requests"]
        assert 0 < info["kept_bytes"] <= MAX_KEPT < 16 * per_request  # without the bound: 16 requests kept
        # An honest forward and backward still gets exact gradients (kept or recomputed).
        local = get_expert_class("ffn").build(KEEP_HIDDEN, SEED)
        x = torch.randn(64, KEEP_HIDDEN, requires_grad=True)
        x_local = x.detach().clone().requires_grad_()
        grad = torch.randn(64, KEEP_HIDDEN)
        expert(x).backward(grad)
        local(x_local).backward(grad)
        assert torch.allclose(x.grad, x_local.grad, atol=1e-5)
        assert expert.info()["kept_bytes"] <= MAX_KEPT


def test_forged_expert_declarations_are_refused_or_ignored():
    with servers(["--expert-uids", "ffn.0.0", "--optimizer", "none"]) as (started, dht):
        victim = started[0]
        searcher = MoEBeamSearcher(dht, "ffn.", (2, 2), cache_ttl=0.0)
        scores = [torch.tensor([[0.0, 10.0]]), torch.tensor([[0.0, 10.0]])]  # the forged coordinate 1 scores best

        def found() -> list[tuple[str, str]]:
            (experts,) = dht.peer.runtime.run(searcher.afind_best_experts(scores, 4), DHT_TIMEOUT)
            return [(e.uid, e.address) for e in experts]

        assert found() == [("ffn.0.0", victim.address)]
        forged = hostile_results(
            "forge",
            victim,
            "claims_victim_address",
            "prefix_claims_victim_address",
            "prefix_unsigned",
            "victim_marker",
            "prefix_victim",
        )
        # Every node refuses them all: a declaration's value must be the address of the peer its subkey names and
        # that signed it (hiveengine.dht.schemas), and a plain or unsigned value has no owner at all.
        assert set(forged.values()) == {"False"}, forged
        assert len(dht.get(expert_key("ffn.0.0"), latest=True).value) == 1  # the victim's declaration alone
        assert get_experts(dht, ["ffn.0.0"]) == {"ffn.0.0": victim.address}
        searcher._cache.clear()
        assert found() == [("ffn.0.0", victim.address)]
        # Plain values that would outlive the declarations (and win the DHT's merge, a later-expiring plain value
        # over a dictionary) are refused under the reserved keys.
        assert hostile_results("squat", victim, "plain", "prefix_plain") == {"plain": "False", "prefix_plain": "False"}
        assert get_experts(dht, ["ffn.0.0"]) == {"ffn.0.0": victim.address}
        searcher._cache.clear()
        assert found() == [("ffn.0.0", victim.address)]


def hostile_results(action: str, victim: ExpertServer, *names: str) -> dict[str, str]:
    """Run a forging hostile process against `victim`'s declarations; its results `names`."""
    attack = hostile(action, victim.address, "ffn.0.0", HIDDEN, "--dht", victim.dht_address)
    try:
        return attack.results(*names)
    finally:
        attack.close()


def test_a_server_answering_nan_is_dropped_and_left_out_by_clients():
    honest = ["--expert-uids", "ffn.0.0", "--optimizer", "none", "--seed", str(SEED)]
    poisoned = ["--expert-cls", "poisoned", "--expert-uids", "ffn.0.1", "--optimizer", "none"]
    poisoned_grad = ["--expert-cls", "poisoned_grad", "--expert-uids", "ffn.0.2", "--optimizer", "none"]
    with servers(honest, poisoned, poisoned_grad) as ((good, bad, bad_grad), dht):
        with pytest.raises(NonFiniteReplyError, match="NaN or Inf"), torch.no_grad():
            RemoteExpert("ffn.0.1", bad.address)(torch.randn(2, HIDDEN))
        failed = FailedPeers()
        moe = RemoteMixtureOfExperts(HIDDEN, (1, 2), k_best=2, k_min=1, dht=dht, failed_peers=failed)
        x = torch.randn(4, HIDDEN, requires_grad=True)
        out = moe(x)
        assert "NonFiniteReplyError" in moe.last_dispatch.failed["ffn.0.1"]
        assert bad.address in failed and good.address not in failed
        x_local = x.detach().clone().requires_grad_()
        expected = local_expert(0)(x_local)  # the only expert that answered: its gating weight is 1
        assert torch.allclose(out, expected, atol=1e-5)
        out.sum().backward()
        expected.sum().backward()
        assert torch.allclose(x.grad, x_local.grad, atol=1e-5)
        # Finite outputs but NaN input gradients: dropped in backward, and its server is left out as well.
        moe = RemoteMixtureOfExperts(HIDDEN, (1, 3), k_best=3, k_min=1, dht=dht, failed_peers=failed)
        x.grad = None
        moe(x).sum().backward()
        assert torch.isfinite(x.grad).all()
        assert moe.last_dispatch.responded == {"ffn.0.0", "ffn.0.2"}  # the NaN server stays left out
        assert "NonFiniteReplyError" in moe.last_dispatch.backward_failed["ffn.0.2"]
        assert bad_grad.address in failed
