"""What a hivemind user does with the MoE API: Server.create(..., start=True), background_server, hivemind's uid
grammar end to end, and a server-side LR schedule and gradient clipping. Servers run on 127.0.0.1."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from hiveengine.dht import DHT
from hiveengine.errors import TransportError
from hiveengine.moe import (
    InvalidExpertUIDError,
    RemoteExpert,
    RemoteMixtureOfExperts,
    Server,
    TensorSchema,
    UnknownExpertClassError,
    background_server,
    get_expert_class,
    get_remote_experts,
    register_expert_class,
)

pytestmark = pytest.mark.timeout(240)

HIDDEN = 16
CALL_TIMEOUT = 30.0


@register_expert_class("test_doubler", lambda hidden: [TensorSchema((hidden,))])
def make_doubler(hidden_dim: int) -> nn.Module:
    """A custom expert class defined in a test module: y = 2x (the background server must import this module)."""
    layer = nn.Linear(hidden_dim, hidden_dim, bias=False)
    with torch.no_grad():
        layer.weight.copy_(2 * torch.eye(hidden_dim))
    return layer


def test_server_create_with_start_true_serves():
    x = torch.randn(3, HIDDEN)
    with Server.create("ffn", ["ffn.0"], HIDDEN, seed=5, start=True) as server:
        expert = RemoteExpert("ffn.0", server.address, forward_timeout=CALL_TIMEOUT)
        assert torch.allclose(expert(x), get_expert_class("ffn").build(HIDDEN, 5)(x), atol=1e-6)
    deferred = Server.create("ffn", ["ffn.0"], HIDDEN, seed=5, start=False)
    try:
        assert deferred.peer is None
        with pytest.raises(RuntimeError, match="not started"):
            deferred.address  # noqa: B018
        deferred.start()
        assert RemoteExpert("ffn.0", deferred.address, forward_timeout=CALL_TIMEOUT).info()["updates"] == 0
    finally:
        deferred.shutdown()


HIVEMIND_UIDS = ["transformer::encoder.2", "0.1.2", "0.0.1", "专家.3"]


def test_hivemind_style_uids_are_served_declared_and_found():
    with background_server("ffn", HIVEMIND_UIDS, HIDDEN, seed=0) as info:
        assert info.uids == tuple(HIVEMIND_UIDS)
        dht = DHT(initial_peers=[info.dht_address])
        try:
            x = torch.randn(4, HIDDEN)
            experts = get_remote_experts(dht, [*HIVEMIND_UIDS, "0.9.9"], forward_timeout=CALL_TIMEOUT)
            assert experts[-1] is None
            for i, expert in enumerate(experts[:-1]):
                assert expert.address == info.address
                assert torch.allclose(expert(x), get_expert_class("ffn").build(HIDDEN, i)(x), atol=1e-6)
            # A beam search walks grid uids with a numeric name, as hivemind's does: 0.0.1 and 0.1.2 under "0.".
            moe = RemoteMixtureOfExperts(HIDDEN, (2, 3), uid_prefix="0.", k_best=4, dht=dht)
            moe(torch.randn(2, HIDDEN))
            assert set(moe.last_dispatch.responded) == {"0.0.1", "0.1.2"}
        finally:
            dht.shutdown()


def test_background_server_runs_a_custom_class_and_stops_on_exit():
    x = torch.randn(2, HIDDEN)
    with background_server("test_doubler", ["double.0"], HIDDEN, use_dht=False) as info:
        assert info.dht_address is None and info.uids == ("double.0",)
        expert = RemoteExpert("double.0", info.address, forward_timeout=CALL_TIMEOUT)
        assert torch.allclose(expert(x), 2 * x)
    with pytest.raises(TransportError):  # the child is gone: nobody answers at its address
        RemoteExpert("double.0", info.address, forward_timeout=CALL_TIMEOUT)(x)


def test_background_server_reports_why_it_could_not_start():
    unknown = background_server("no_such_class", ["ffn.0"], HIDDEN)
    with pytest.raises(UnknownExpertClassError, match="no expert class"), unknown:  # before a process starts
        pass
    malformed = background_server("ffn", ["ffn.01"], HIDDEN, use_dht=False)
    with pytest.raises(InvalidExpertUIDError, match="leading zero"), malformed:  # raised in the child, re-raised
        pass


def test_server_applies_its_lr_schedule_and_clips_gradients():
    sgd = functools.partial(torch.optim.SGD, lr=0.1)
    halve = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    kwargs = dict(seed=0, optimizer=sgd, scheduler=halve, clip_grad_norm=1e-3, use_dht=False)
    with background_server("ffn", ["ffn.0"], HIDDEN, **kwargs) as info:
        expert = RemoteExpert("ffn.0", info.address, forward_timeout=CALL_TIMEOUT, backward_timeout=CALL_TIMEOUT)
        assert expert.info()["lr"] == [pytest.approx(0.1)]
        x = torch.randn(8, HIDDEN)
        before = expert(x).detach()
        expert(x.clone().requires_grad_()).mul(1e3).sum().backward()  # a huge gradient: clipped to norm 1e-3
        assert expert.info()["updates"] == 1 and expert.info()["lr"] == [pytest.approx(0.05)]
        expert(x.clone().requires_grad_()).mul(1e3).sum().backward()
        assert expert.info()["lr"] == [pytest.approx(0.025)]
        # Two steps of at most lr * 1e-3 each leave the outputs almost unchanged; unclipped, they move a lot.
        assert (expert(x).detach() - before).abs().max() < 0.01
    local = get_expert_class("ffn").build(HIDDEN, 0)
    opt = sgd(local.parameters())
    for _ in range(2):
        opt.zero_grad()
        local(x).mul(1e3).sum().backward()
        opt.step()
    assert (local(x).detach() - before).abs().max() > 1.0
