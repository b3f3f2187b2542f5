"""The Optimizer's hivemind-facing API: schedulers, state loading, local updates, verbosity, spellings."""

from __future__ import annotations

import logging

import pytest
import torch

from hiveengine.dht import DHT
from hiveengine.errors import ConfigurationError
from hiveengine.optim import Optimizer
from hiveengine.optim.optimizer import HIVEMIND_SPELLINGS

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def dhts():
    made: list[DHT] = []

    def make() -> DHT:
        made.append(DHT(initial_peers=[made[0].address] if made else []))
        return made[-1]

    yield make
    for dht in reversed(made):
        dht.shutdown()


def train_alone(opt: Optimizer, model: torch.nn.Module, epochs: int) -> None:
    x = torch.randn(8, model.in_features)
    while opt.epoch < epochs:
        model(x).pow(2).mean().backward()
        opt.step(batch_size=8)
        opt.zero_grad()


def test_the_scheduler_steps_once_per_epoch(dhts):
    model = torch.nn.Linear(4, 1)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = Optimizer(
        dht=dhts(),
        run_id="sched",
        optimizer=inner,
        target_batch_size=8,
        scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
    )
    try:
        train_alone(opt, model, 3)
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
        assert opt.is_synchronized_with_peers()
    finally:
        opt.shutdown()


def test_load_state_from_peers_copies_parameters_optimizer_state_and_epoch(dhts):
    torch.manual_seed(0)
    models = [torch.nn.Linear(4, 2) for _ in range(2)]
    first = Optimizer(
        dht=dhts(), run_id="join", optimizer=torch.optim.Adam(models[0].parameters(), lr=0.01), target_batch_size=8
    )
    second = None
    try:
        train_alone(first, models[0], 2)
        second = Optimizer(
            dht=dhts(),
            run_id="join",
            optimizer=torch.optim.Adam(models[1].parameters(), lr=0.01),
            target_batch_size=8,
            load_state=False,
        )
        assert second.epoch == 0
        assert second.load_state_from_peers()
        assert second.epoch == 2
        for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
            assert torch.equal(a, b)
            assert torch.equal(first.inner.state[a]["exp_avg"], second.inner.state[b]["exp_avg"])
    finally:
        for opt in (second, first):
            if opt is not None:
                opt.shutdown()


def test_use_local_updates_is_diloco_with_plain_averaging(dhts):
    model = torch.nn.Linear(4, 1)
    opt = Optimizer(
        dht=dhts(),
        run_id="local",
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        target_batch_size=16,
        use_local_updates=True,
    )
    try:
        assert (opt.mode, opt.rule.outer_lr, opt.rule.outer_momentum) == ("diloco", 1.0, 0.0)
        before = model.weight.detach().clone()
        x = torch.randn(8, 4)
        model(x).pow(2).mean().backward()
        opt.step(batch_size=8)  # a local update at once, no epoch yet
        assert opt.epoch == 0 and not torch.equal(model.weight, before)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step(batch_size=8)
        assert opt.epoch == 1
    finally:
        opt.shutdown()


def test_verbose_reports_epochs(dhts, caplog):
    model = torch.nn.Linear(4, 1)
    opt = Optimizer(
        dht=dhts(),
        run_id="verbose",
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        target_batch_size=8,
        verbose=True,
    )
    try:
        with caplog.at_level(logging.INFO, logger="hiveengine.optim.optimizer"):
            train_alone(opt, model, 2)
        assert any("epoch 1" in r.getMessage() for r in caplog.records)
    finally:
        opt.shutdown()
        logging.getLogger("hiveengine.optim.optimizer").handlers.clear()


@pytest.mark.parametrize("name", sorted(HIVEMIND_SPELLINGS))
def test_hivemind_spellings_name_the_hiveengine_one(dhts, name):
    params = list(torch.nn.Linear(2, 2).parameters())
    with pytest.raises(ConfigurationError, match=f"{name}= is hivemind's; in hiveengine use"):
        Optimizer(dht=None, run_id="x", optimizer=torch.optim.SGD(params, lr=0.1), target_batch_size=8, **{name: 1})


def test_unknown_arguments_are_refused():
    params = list(torch.nn.Linear(2, 2).parameters())
    with pytest.raises(TypeError, match="no_such_option"):
        Optimizer(dht=None, run_id="x", optimizer=torch.optim.SGD(params, lr=0.1), no_such_option=1)


def test_progress_records_are_signed_and_cannot_be_overwritten_by_others(dhts):
    from hiveengine.dht import get_dht_time
    from hiveengine.optim.progress import ProgressTracker, progress_key

    honest_dht, attacker = dhts(), dhts()
    honest = ProgressTracker(honest_dht, "signed")
    runtime = honest_dht.peer.runtime
    runtime.run(honest.report(3, 16), 30)
    key, expiration = progress_key("signed"), get_dht_time() + 600
    forged = [10**9, 10**9, 1.0, get_dht_time(), None, False, 64, False, False]
    assert not attacker.store(key, forged, expiration, subkey=honest_dht.owner_marker, timeout=30)  # unsigned
    attacker.store(key, forged, expiration, subkey=honest_dht.peer_id.raw, timeout=30)  # the old, raw-id subkey
    swarm = runtime.run(honest.fetch(), 30)
    assert [(p.peer, p.epoch, p.samples) for p in swarm.peers] == [(honest_dht.peer_id.raw.hex(), 3, 16)]
    runtime.run(honest.report(4, 0), 30)  # the honest refresh still goes through
    assert runtime.run(honest.fetch(), 30).epoch == 4


def test_junk_metadata_from_a_group_member_neither_crashes_nor_counts():
    from hiveengine.optim.optimizer import states_disagree

    assert not states_disagree([{"fp": [1, 2]}, {"fp": [1, 2]}, {"fp": None}])  # an auxiliary peer has none
    assert states_disagree([{"fp": [1, 2]}, {"fp": [1, 3]}])
    assert not states_disagree([{"fp": [1, 2]}, "junk", 7, None, [1], {"fp": "x"}, {"other": 1}])
