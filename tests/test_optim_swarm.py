"""The Optimizer as a hivemind user writes it: a fast loop, peers that start from different models, clients."""

from __future__ import annotations

import json

import pytest

from tests.procs import PeerProcess

pytestmark = pytest.mark.timeout(300)

BATCH = 16


def start(plans: list[dict]) -> list[PeerProcess]:
    procs, bootstrap = [], None
    try:
        for plan in plans:
            proc = PeerProcess("regression_peer.py", json.dumps({**plan, "initial_peer": bootstrap}))
            address = proc.expect("DHT")
            bootstrap = bootstrap or address
            procs.append(proc)
        for proc in procs:
            proc.expect("READY")
    except BaseException:
        for proc in procs:
            proc.close()
        raise
    return procs


def train(plans: list[dict]) -> list[tuple[dict[int, tuple[str, int]], dict]]:
    """Run the peers to their epochs; per peer: {epoch: (digest, samples contributed to the epoch before)}
    and the DONE summary."""
    procs = start(plans)
    try:
        for proc in procs:
            proc.proc.stdin.write("go\n")
            proc.proc.stdin.flush()
        results = []
        for proc in procs:
            epochs = {}
            while True:
                line = proc.expect("")
                if line.startswith("EPOCH"):
                    _, epoch, digest, contributed = line.split()
                    epochs[int(epoch)] = (digest, int(contributed))
                elif line.startswith("DONE"):
                    results.append((epochs, json.loads(line.removeprefix("DONE"))))
                    break
        return results
    finally:
        for proc in procs:
            proc.close()


def check_swarm(results, target: int, contributors: int, epochs: int, first_agreed: int = 1) -> None:
    for epoch in range(first_agreed, epochs + 1):
        digests = {e[epoch][0] for e, _ in results if epoch in e}
        assert len(digests) == 1, f"peers differ after epoch {epoch}: {digests}"
    for epoch in range(1, epochs + 1):
        contributed = [e[epoch][1] for e, _ in results if epoch in e and e[epoch][1] > 0]
        # The swarm steps every target samples, overshooting by at most one local batch per peer.
        assert sum(contributed) <= target + BATCH * contributors, (epoch, contributed)
    for _, done in results:
        first, last = sum(done["first"]) / 10, sum(done["last"]) / 10
        assert last < 0.2 * first, f"the loss did not fall: {first:.3f} -> {last:.3f}"


@pytest.mark.parametrize("mode", ["sync", "diloco"])
def test_fast_loop_from_different_models_learns_and_ends_identical(mode):
    plans = [{"mode": mode, "target": 64, "epochs": 30, "init_seed": i, "data_seed": 10 + i} for i in range(2)]
    results = train(plans)
    check_swarm(results, target=64, contributors=2, epochs=30)
    for _, done in results:
        assert done["rounds"]["averaged"] >= 28, done["rounds"]
        assert done["rounds"]["state_averaged"] >= 1, "peers from different models must average their state"


def test_three_peers_step_every_target_without_overshoot():
    plans = [{"mode": "sync", "target": 48, "epochs": 20, "init_seed": 0, "data_seed": i} for i in range(3)]
    results = train(plans)
    check_swarm(results, target=48, contributors=3, epochs=20)
    totals = [sum(e[epoch][1] for e, _ in results if epoch in e) for epoch in range(2, 21)]
    assert sum(totals) / len(totals) <= 1.1 * 48, totals


def test_two_peers_and_a_client_train_together():
    plans = [
        {"mode": "sync", "target": 48, "epochs": 40, "init_seed": i, "data_seed": i, "client_mode": i == 2}
        for i in range(3)
    ]
    results = train(plans)
    check_swarm(results, target=48, contributors=3, epochs=40)
    assert all(done["rounds"]["averaged"] >= 38 for _, done in results), [d["rounds"] for _, d in results]


def test_an_auxiliary_peer_helps_average_and_stays_in_sync():
    plans = [
        {"mode": "sync", "target": 32, "epochs": 30, "init_seed": i, "data_seed": i, "auxiliary": i == 2}
        for i in range(3)
    ]
    results = train(plans)
    check_swarm(results[:2], target=32, contributors=2, epochs=30)  # an auxiliary peer keeps no model
    assert all(e[epoch][1] == 0 for epoch in range(1, 31) if epoch in (e := results[2][0]))
    assert results[2][1]["rounds"]["averaged"] >= 28
