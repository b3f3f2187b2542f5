"""hiveengine.Optimizer end to end: training peers in separate processes meet through the DHT."""

from __future__ import annotations

import json

import pytest
import torch

from hiveengine.averaging import DecentralizedAverager
from hiveengine.dht import DHT
from hiveengine.errors import ConfigurationError
from hiveengine.optim import Optimizer, TrainingState
from tests.procs import PeerProcess

pytestmark = pytest.mark.timeout(240)


class Swarm:
    """Training peers (tests/peers/optim_peer.py) joined through the first one's DHT."""

    def __init__(self):
        self.procs: list[PeerProcess] = []
        self.bootstrap: str | None = None

    def add(self, mode: str, codec: str, data_seed: int, epochs: int, env: dict | None = None) -> PeerProcess:
        args = [mode, codec, str(data_seed), str(epochs)] + ([self.bootstrap] if self.bootstrap else [])
        proc = PeerProcess("optim_peer.py", *args, env=env)
        address = proc.expect("DHT")
        proc.expect("READY")
        self.bootstrap = self.bootstrap or address
        self.procs.append(proc)
        return proc

    @staticmethod
    def go(*procs: PeerProcess) -> None:
        for proc in procs:
            proc.proc.stdin.write("go\n")
            proc.proc.stdin.flush()

    @staticmethod
    def epochs(proc: PeerProcess) -> tuple[dict[int, str], dict]:
        """{epoch: parameter digest} until DONE, and the DONE summary."""
        digests = {}
        while True:
            line = proc.expect("")
            if line.startswith("EPOCH"):
                _, epoch, digest = line.split()
                digests[int(epoch)] = digest
            elif line.startswith("DONE"):
                return digests, json.loads(line.removeprefix("DONE"))

    def close(self) -> None:
        for proc in self.procs:
            proc.close()


@pytest.fixture
def swarm():
    s = Swarm()
    yield s
    s.close()


def train_in_step(swarm: Swarm, mode: str, peers: int, epochs: int) -> list[dict]:
    """Train `peers` processes for `epochs`; check they agree after every epoch; return their summaries."""
    procs = [swarm.add(mode, "int8", seed, epochs=epochs) for seed in range(peers)]
    swarm.go(*procs)
    results = [swarm.epochs(p) for p in procs]
    for epoch in range(1, epochs + 1):
        seen = {digests[epoch] for digests, _ in results if epoch in digests}
        assert len(seen) == 1, f"{mode} peers disagree after epoch {epoch}: {seen}"
    for _, done in results:
        assert done["epoch"] == epochs
        assert done["rounds"]["averaged"] >= epochs - 2, done["rounds"]
    return [done for _, done in results]


def test_sync_peers_take_identical_steps(swarm):
    train_in_step(swarm, "sync", peers=3, epochs=5)


def test_diloco_converges_and_outer_steps_agree(swarm):
    for done in train_in_step(swarm, "diloco", peers=2, epochs=6):
        assert sum(done["last_loss"]) < 0.2 * sum(done["first_loss"])


def test_late_joiner_loads_the_swarms_state(swarm):
    first = [swarm.add("sync", "none", seed, epochs=3) for seed in range(2)]
    swarm.go(*first)
    results = [swarm.epochs(p) for p in first]
    assert results[0][0][3] == results[1][0][3]
    late = swarm.add("sync", "none", 7, epochs=0)
    swarm.go(late)
    digests, done = swarm.epochs(late)
    assert done["rounds"]["caught_up"] == 1
    assert digests == {3: results[0][0][3]}


def test_training_goes_on_when_a_peer_is_killed(swarm):
    peers = [swarm.add("sync", "int8", seed, epochs=8) for seed in range(3)]
    swarm.go(*peers)
    for proc in peers:
        assert proc.expect("EPOCH 2")
    peers[2].kill()
    for proc in peers[:2]:
        _, done = swarm.epochs(proc)
        assert done["epoch"] == 8


def test_optimizer_state_is_shared_as_views_of_one_buffer():
    model = torch.nn.Linear(3, 2)
    inner = torch.optim.AdamW(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    state = TrainingState(inner)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))  # init changed nothing
    assert all(float(inner.state[p]["step"]) == 0 for p in model.parameters())
    flat = torch.cat([t.reshape(-1) for t in state.tensors]).clone()
    views = list(flat.split([t.numel() for t in state.tensors]))
    state.bind([v.view_as(t) for v, t in zip(views, state.tensors, strict=True)])
    model(torch.randn(5, 3)).sum().backward()
    inner.step()
    assert torch.equal(flat[: model.weight.numel()].view_as(model.weight), model.weight.detach())
    assert float(flat[-1]) == 1.0  # the last tensor is the bias's step counter, updated in place


def test_configuration_errors_are_clear():
    dht = DHT()
    try:
        params = list(torch.nn.Linear(2, 2).parameters())
        with pytest.raises(ConfigurationError, match="target_batch_size"):
            Optimizer(dht=dht, run_id="bad", optimizer=torch.optim.SGD(params, lr=0.1))
        with pytest.raises(ConfigurationError, match="mode"):
            Optimizer(dht=dht, run_id="bad", optimizer=torch.optim.SGD(params, lr=0.1), mode="async")
        with pytest.raises(ConfigurationError, match="params="):
            Optimizer(dht=dht, run_id="bad", optimizer=lambda p: torch.optim.SGD(p, lr=0.1), target_batch_size=8)
        # Its progress and averaging records would be judged as expert declarations, and refused by every node.
        with pytest.raises(ConfigurationError, match="reserved for expert declarations"):
            Optimizer(dht=dht, run_id="experts:run", optimizer=torch.optim.SGD(params, lr=0.1), target_batch_size=8)
        with pytest.raises(ConfigurationError, match="reserved for expert declarations"):
            DecentralizedAverager(params, dht, "experts:avg")
    finally:
        dht.shutdown()


def test_checkpoint_restores_parameters_optimizer_state_and_epoch(tmp_path):
    dht = DHT()
    opts = []
    try:
        models = [torch.nn.Linear(4, 2) for _ in range(2)]
        for i, model in enumerate(models):
            inner = torch.optim.Adam(model.parameters(), lr=0.05)
            opts.append(Optimizer(dht=dht, run_id=f"ckpt-{i}", optimizer=inner, target_batch_size=8, mode="sync"))
        first, second = opts
        x = torch.randn(32, 4)
        while first.epoch < 3:
            models[0](x).pow(2).mean().backward()
            first.step(batch_size=4)
            first.zero_grad()
        first.save(tmp_path / "ckpt.pt")
        second.load(tmp_path / "ckpt.pt")
        assert second.epoch == 3
        for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
            assert torch.equal(a, b)
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(first.inner.state[a][key], second.inner.state[b][key])
        with pytest.raises(ConfigurationError, match="not the same model"):
            second.load_state_dict({**first.state_dict(), "flat": torch.zeros(3)})
    finally:
        for opt in opts:
            opt.shutdown()
        dht.shutdown()
