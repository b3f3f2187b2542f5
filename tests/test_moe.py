"""Mixture-of-Experts end to end: expert servers in separate processes, called over UCX on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
import torch

from hiveengine.cli.serve import DHT_PREFIX, EXPERTS_PREFIX, READY_PREFIX, THROUGHPUT_PREFIX
from hiveengine.dht import DHT, get_dht_time
from hiveengine.errors import ProtocolError, RPCTimeoutError, UnknownMethodError
from hiveengine.moe import (
    MoEBeamSearcher,
    NotEnoughExpertsError,
    RemoteExpert,
    RemoteMixtureOfExperts,
    RemoteSwitchMixtureOfExperts,
    expert_key,
    get_expert_class,
    get_experts,
    get_remote_experts,
    split_uid,
)
from hiveengine.moe.declarations import adeclare_experts
from hiveengine.moe.protocol import BACKWARD, DHT_TIMEOUT, FORWARD
from hiveengine.transport import Identity, Peer, PeerAddress
from tests.procs import PeerProcess

pytestmark = pytest.mark.timeout(180)

HIDDEN = 16
SEED = 0
SLOW_SECONDS = "6"


class ExpertServer:
    """A `hiveengine serve` process (tests/peers/moe_server.py) and the addresses it printed."""

    def __init__(self, *args: str, env: dict | None = None):
        self.proc = PeerProcess("moe_server.py", "--hidden-dim", str(HIDDEN), "--stats-interval", "0", *args, env=env)
        try:
            self.address = self.proc.expect(READY_PREFIX)
            self.dht_address = None if "--no-dht" in args else self.proc.expect(DHT_PREFIX)
            self.uids = self.proc.expect(EXPERTS_PREFIX).split()
        except BaseException:
            self.proc.kill()
            raise

    def close(self) -> None:
        self.proc.close()


@contextlib.contextmanager
def servers(*arg_lists: list[str], env: dict | None = None):
    """Start servers one after another (each later one joins the first one's DHT); yield them and a client DHT."""
    started: list[ExpertServer] = []
    dht = None
    try:
        for args in arg_lists:
            join = ["--initial-peers", started[0].dht_address] if started else []
            started.append(ExpertServer(*args, *join, env=env))
        dht = DHT(initial_peers=[started[0].dht_address])
        yield started, dht
    finally:
        if dht is not None:
            dht.shutdown()
        for s in started:
            s.close()


def local_expert(index: int) -> torch.nn.Module:
    """The module a server started with --seed SEED builds for its index-th uid."""
    return get_expert_class("ffn").build(HIDDEN, SEED + index)


@pytest.fixture(scope="module")
def frozen():
    """One server with four ffn experts (ffn.0.0 .. ffn.1.1, no optimizer: weights stay as initialized)."""
    with servers(["--expert-pattern", "ffn.[0:2].[0:2]", "--seed", str(SEED), "--optimizer", "none"]) as (s, dht):
        yield s[0], dht


def test_remote_expert_matches_the_local_module(frozen):
    server, _ = frozen
    assert server.uids == ["ffn.0.0", "ffn.0.1", "ffn.1.0", "ffn.1.1"]
    remote, local = RemoteExpert("ffn.0.1", server.address), local_expert(1)
    x = torch.randn(5, HIDDEN, requires_grad=True)
    x_local = x.detach().clone().requires_grad_()
    y, y_local = remote(x), local(x_local)
    assert torch.allclose(y, y_local, atol=1e-6)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_local.backward(grad)
    assert torch.allclose(x.grad, x_local.grad, atol=1e-6)
    assert remote.info()["inputs"] == [["float32", [HIDDEN]]]


def test_experts_are_found_in_the_dht(frozen):
    server, dht = frozen
    assert get_experts(dht, ["ffn.1.0", "ffn.7.7"]) == {"ffn.1.0": server.address, "ffn.7.7": None}
    expert, missing = get_remote_experts(dht, ["ffn.1.0", "ffn.7.7"])
    assert missing is None
    x = torch.randn(3, HIDDEN)
    assert torch.allclose(expert(x), local_expert(2)(x), atol=1e-6)


def test_malformed_requests_get_error_replies_and_the_server_keeps_serving(frozen):
    server, _ = frozen
    peer = Peer()
    good = torch.randn(4, HIDDEN)
    bad_calls = [
        (FORWARD, {"uid": "ffn.9.9"}, [good], "no expert"),
        (FORWARD, {}, [good], "no expert"),
        (FORWARD, {"uid": "ffn.0.0"}, [torch.randn(4, HIDDEN + 1)], "shape"),
        (FORWARD, {"uid": "ffn.0.0"}, [good.double()], "float32"),
        (FORWARD, {"uid": "ffn.0.0"}, [good, good], "expected 1 tensors"),
        (BACKWARD, {"uid": "ffn.0.0"}, [good], "output gradients"),
        (BACKWARD, {"uid": "ffn.0.0"}, [good, torch.randn(4, 3)], "do not match"),
        (BACKWARD, {"uid": "ffn.0.0"}, [good, torch.randn(2, HIDDEN)], "4 rows"),
    ]
    try:
        for method, header, tensors, message in bad_calls:
            with pytest.raises(ProtocolError, match=message):
                peer.call_sync(server.address, method, header, tensors, timeout=30)
        with pytest.raises(UnknownMethodError):
            peer.call_sync(server.address, "moe.nonsense", {}, [], timeout=30)
        _, (y,) = peer.call_sync(server.address, FORWARD, {"uid": "ffn.0.0"}, [good], timeout=30)
        assert torch.allclose(y, local_expert(0)(good), atol=1e-6)
    finally:
        peer.shutdown()


def test_mixture_matches_a_local_mixture_of_the_same_experts(frozen):
    _, dht = frozen
    moe = RemoteMixtureOfExperts(HIDDEN, grid_size=(2, 2), uid_prefix="ffn.", k_best=4, dht=dht)
    experts = {f"ffn.{i // 2}.{i % 2}": local_expert(i) for i in range(4)}
    x = torch.randn(6, HIDDEN, requires_grad=True)
    out = moe(x)
    assert moe.last_dispatch.responded == set(experts)
    grad = torch.randn_like(out)
    out.backward(grad)

    x_local = x.detach().clone().requires_grad_()
    proj = torch.nn.Linear(HIDDEN, 4)
    proj.load_state_dict(moe.proj.state_dict())
    s0, s1 = proj(x_local).split([2, 2], dim=-1)
    uids = list(experts)
    logits = torch.stack([s0[:, int(u.split(".")[1])] + s1[:, int(u.split(".")[2])] for u in uids], dim=1)
    weights = torch.softmax(logits, dim=1)
    expected = sum(weights[:, j : j + 1] * experts[u](x_local) for j, u in enumerate(uids))
    expected.backward(grad)
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(x.grad, x_local.grad, atol=1e-5)
    assert torch.allclose(moe.proj.weight.grad, proj.weight.grad, atol=1e-5)


def test_switch_layer_routes_each_sample_to_one_expert_and_balances_load(frozen):
    _, dht = frozen
    switch = RemoteSwitchMixtureOfExperts(HIDDEN, grid_size=(2, 2), dht=dht)
    x = torch.randn(8, HIDDEN, requires_grad=True)
    out, balance = switch(x)
    dispatch = switch.last_dispatch
    probs = [torch.softmax(s, dim=-1) for s in switch.proj(x).split([2, 2], dim=-1)]
    for uid, rows in dispatch.rows.items():
        _, (i, j) = split_uid(uid)
        expected = (probs[0][rows, i] * probs[1][rows, j])[:, None] * local_expert(2 * i + j)(x[rows])
        assert torch.allclose(out[rows], expected, atol=1e-5)
    assert balance.dim() == 0 and 0 < balance.item() <= 2 * 2  # per dim: size * <routed fraction, mean prob>
    (out.square().sum() + balance).backward()
    assert switch.proj.weight.grad is not None and torch.isfinite(x.grad).all()


def test_mixture_of_sequences_uses_transformer_experts():
    with servers(["--expert-cls", "transformer", "--expert-pattern", "tf.[0:2]", "--seed", "1"]) as (_, dht):
        moe = RemoteMixtureOfExperts(HIDDEN, grid_size=(2,), uid_prefix="tf.", k_best=2, dht=dht)
        x = torch.randn(3, 5, HIDDEN, requires_grad=True)
        out = moe(x)
        assert out.shape == x.shape and moe.last_dispatch.responded == {"tf.0", "tf.1"}
        out.square().mean().backward()
        assert x.grad is not None and bool(x.grad.abs().sum() > 0)


def train(moe: RemoteMixtureOfExperts, steps: int, seed: int) -> list[float]:
    """Fit out = tanh(x @ W) with the mixture; return the loss of each step."""
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(HIDDEN, HIDDEN, generator=gen) / HIDDEN**0.5
    opt = torch.optim.Adam(moe.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        x = torch.randn(32, HIDDEN, generator=gen)
        loss = torch.nn.functional.mse_loss(moe(x), torch.tanh(x @ target))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_mixture_trains_a_small_model_end_to_end():
    args = ["--expert-pattern", "ffn.[0:2].[0:2]", "--num-experts", "2", "--optimizer", "adam", "--lr", "0.01"]
    with servers(args, args) as (started, dht):
        assert len({uid for s in started for uid in s.uids}) == 4  # the second server took the free uids
        moe = RemoteMixtureOfExperts(HIDDEN, grid_size=(2, 2), k_best=2, dht=dht)
        losses = train(moe, steps=40, seed=0)
        assert sum(losses[-5:]) < 0.5 * sum(losses[:5])


def test_a_killed_server_is_dropped_in_backward_and_forward():
    first = ["--expert-uids", "ffn.0.0", "ffn.0.1", "--optimizer", "sgd"]
    second = ["--expert-uids", "ffn.1.0", "ffn.1.1", "--optimizer", "sgd"]
    with servers(first, second) as (started, dht):
        moe = RemoteMixtureOfExperts(HIDDEN, (2, 2), k_best=4, forward_timeout=3, backward_timeout=3, dht=dht)
        train(moe, steps=2, seed=1)
        x = torch.randn(8, HIDDEN, requires_grad=True)
        out = moe(x)
        assert moe.last_dispatch.responded == {"ffn.0.0", "ffn.0.1", "ffn.1.0", "ffn.1.1"}
        started[0].proc.kill()  # SIGKILL between this step's forward and its backward
        out.square().sum().backward()
        assert set(moe.last_dispatch.backward_failed) == {"ffn.0.0", "ffn.0.1"}
        assert moe.last_dispatch.backward_responded == {"ffn.1.0", "ffn.1.1"}
        assert torch.isfinite(x.grad).all() and bool(x.grad.abs().sum() > 0)
        losses = train(moe, steps=2, seed=2)
        assert all(map(torch.isfinite, torch.tensor(losses)))
        # The backward's connection errors marked the dead server: it is left out of routing, not called and dropped.
        assert moe.last_dispatch.responded == {"ffn.1.0", "ffn.1.1"}
        assert set(moe.last_dispatch.experts) == {"ffn.1.0", "ffn.1.1"} and not moe.last_dispatch.failed
        assert started[0].address in moe.failed_peers


def test_survivors_weights_are_renormalized_in_backward():
    """With one of two experts gone in backward, the input gradient is the survivor's alone, at full weight."""
    with servers(["--expert-uids", "ffn.0", "--seed", "3", "--optimizer", "none"], ["--expert-uids", "ffn.1"]) as (
        started,
        dht,
    ):
        moe = RemoteMixtureOfExperts(HIDDEN, (2,), k_best=2, forward_timeout=3, backward_timeout=3, dht=dht)
        with torch.no_grad():
            moe.proj.weight.zero_()  # no gradient reaches x through the gating network: only the experts' path
        x = torch.randn(4, HIDDEN, requires_grad=True)
        out = moe(x)
        started[1].proc.kill()
        grad = torch.randn_like(out)
        out.backward(grad)
        assert moe.last_dispatch.backward_responded == {"ffn.0"}
        x_local = x.detach().clone().requires_grad_()
        get_expert_class("ffn").build(HIDDEN, 3)(x_local).backward(grad)
        assert torch.allclose(x.grad, x_local.grad, atol=1e-5)


@pytest.fixture(scope="module")
def straggler():
    """Fast experts ffn.0.0, ffn.0.1, ffn.1.0 and a slow ffn.1.1 (6 s per call) on another server."""
    env = {"TEST_SLOW_EXPERT_SECONDS": SLOW_SECONDS}
    fast = ["--expert-uids", "ffn.0.0", "ffn.0.1", "ffn.1.0"]
    slow = ["--expert-cls", "slow", "--expert-uids", "ffn.1.1"]
    with servers(fast, slow, env=env) as (started, dht):
        yield started, dht


def test_a_slow_expert_is_skipped_after_its_timeout(straggler):
    started, dht = straggler
    moe = RemoteMixtureOfExperts(HIDDEN, (2, 2), k_best=4, forward_timeout=1.5, dht=dht)
    x = torch.randn(4, HIDDEN, requires_grad=True)
    out = moe(x)
    assert moe.last_dispatch.responded == {"ffn.0.0", "ffn.0.1", "ffn.1.0"}
    assert "RPCTimeoutError" in moe.last_dispatch.failed["ffn.1.1"]
    out.sum().backward()
    assert moe.last_dispatch.backward_responded == {"ffn.0.0", "ffn.0.1", "ffn.1.0"}
    with pytest.raises(RPCTimeoutError):
        RemoteExpert("ffn.1.1", started[1].address, forward_timeout=0.5)(x)


def test_fewer_than_k_min_answers_raise_or_give_zeros(straggler):
    _, dht = straggler
    strict = RemoteMixtureOfExperts(HIDDEN, (2, 2), k_best=4, k_min=4, forward_timeout=1.5, dht=dht)
    with pytest.raises(NotEnoughExpertsError, match="k_min=4"):
        strict(torch.randn(2, HIDDEN))
    lenient = RemoteMixtureOfExperts(
        HIDDEN, (2, 2), k_best=4, k_min=4, forward_timeout=1.5, allow_zero_outputs=True, dht=dht
    )
    x = torch.randn(2, HIDDEN, requires_grad=True)
    out = lenient(x)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_checkpoints_survive_a_restart_and_declarations_expire(tmp_path):
    args = ["--expert-uids", "ffn.0", "--optimizer", "sgd", "--lr", "0.1", "--checkpoint-dir", str(tmp_path)]
    with servers([*args, "--update-period", "1", "--stats-interval", "0.2"]) as (started, dht):
        expert = RemoteExpert("ffn.0", started[0].address)
        x = torch.randn(4, HIDDEN)
        expert(x.requires_grad_()).sum().backward()
        assert expert.info()["updates"] == 1
        started[0].proc.expect(THROUGHPUT_PREFIX)
        trained = expert(x).detach()
        declared = dht.get(expert_key("ffn.0"), latest=True)
        assert [v.value for v in declared.value.values()] == [started[0].address]
        assert declared.expiration_time <= get_dht_time() + 2.5
        started[0].close()  # a clean exit saves the checkpoint
        closed = get_dht_time()
        assert (tmp_path / "ffn.0.pt").is_file()
        # Declarations live two update periods (2 s) past their last refresh, which came before the exit.
        time.sleep(max(0.0, closed + 2.0 - get_dht_time()))  # a deadline, not a synchronization
        assert dht.get(expert_key("ffn.0"), latest=True) is None and get_experts(dht, ["ffn.0"]) == {"ffn.0": None}
        restarted = ExpertServer(*args, "--no-dht")
        try:
            again = RemoteExpert("ffn.0", restarted.address)
            assert again.info()["updates"] == 1
            assert torch.allclose(again(x), trained, atol=1e-6)
        finally:
            restarted.close()


def test_beam_search_answers_from_its_cache_while_it_rereads_the_dht_in_the_background():
    dht = DHT()
    searcher = MoEBeamSearcher(dht, "ffn.", (2, 2), cache_ttl=0.0)  # every cached prefix is due for a re-read
    scores = [torch.zeros(1, 2), torch.zeros(1, 2)]

    def run(coro):
        return dht.peer.runtime.run(coro, DHT_TIMEOUT)

    identity = Identity.generate()
    address = str(PeerAddress("127.0.0.1", 1, identity.peer_id))  # never called: the search only reads the DHT

    def declare(uid: str) -> None:
        run(adeclare_experts(dht, [uid], address, get_dht_time() + DHT_TIMEOUT * 60, identity=identity))

    def found() -> list[str]:
        return sorted(e.uid for e in run(searcher.afind_best_experts(scores, 4))[0])

    async def rereads_done() -> None:
        await asyncio.gather(*list(searcher._refreshes))

    try:
        declare("ffn.0.0")
        assert found() == ["ffn.0.0"]  # nothing cached: read from the DHT before answering
        declare("ffn.1.1")
        assert found() == ["ffn.0.0"]  # answered from the cache; the re-reads run in the background
        run(rereads_done())
        assert found() == ["ffn.0.0", "ffn.1.1"]
    finally:
        dht.shutdown()
