"""DecentralizedAverager end to end: peers in separate processes find each other through the DHT."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from hiveengine.averaging import DecentralizedAverager
from hiveengine.averaging.matchmaking import choose_slot, form_groups
from hiveengine.dht import DHT
from tests.procs import PeerProcess

pytestmark = pytest.mark.timeout(180)


def seeded(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(50_000, generator=gen), torch.randn(17, 3, generator=gen)]


def run_swarm(tmp_path, peers: int, rounds: int, codec: str) -> tuple[list[list], list[list[torch.Tensor]]]:
    first = PeerProcess("averager_peer.py", str(tmp_path / "0.pt"), "0", str(rounds), codec)
    procs = [first]
    try:
        bootstrap = first.expect("DHT")
        for i in range(1, peers):
            procs.append(
                PeerProcess("averager_peer.py", str(tmp_path / f"{i}.pt"), str(i), str(rounds), codec, bootstrap)
            )
        for proc in procs[1:]:
            proc.expect("DHT")
        for proc in procs:
            proc.proc.stdin.write("go\n")
            proc.proc.stdin.flush()
        steps = [[json.loads(proc.expect("STEP")) for _ in range(rounds)] for proc in procs]
        for proc in procs:
            proc.expect("SAVED")
        return steps, [torch.load(tmp_path / f"{i}.pt") for i in range(peers)]
    finally:
        for proc in procs:
            proc.close()


def test_three_processes_average_to_the_exact_mean(tmp_path):
    steps, results = run_swarm(tmp_path, peers=3, rounds=1, codec="none")
    assert all(s == [{"size": 3, "failed": []}] for s in steps)
    for i in range(2):
        expected = sum(seeded(p)[i] for p in range(3)) / 3
        for r in results:
            assert torch.allclose(r[i], expected, atol=1e-6, rtol=0)
            assert torch.equal(r[i], results[0][i])


def test_int8_rounds_converge_with_error_feedback(tmp_path):
    steps, results = run_swarm(tmp_path, peers=2, rounds=3, codec="int8")
    assert all(all(s == {"size": 2, "failed": []} for s in peer) for peer in steps)
    expected = (seeded(0)[0] + seeded(1)[0]) / 2
    spread = float(seeded(0)[0].sub(expected).abs().max())
    for r in results:
        assert float((r[0] - expected).abs().max()) < 0.03 * spread


def test_a_lone_peer_returns_none_before_its_deadline():
    dht = DHT()
    averager = DecentralizedAverager([torch.ones(10)], dht, "lonely", matchmaking_time=0.5)
    try:
        assert averager.step(timeout=5) is None
        with averager.get_tensors() as (t,):
            assert torch.equal(t, torch.ones(10))
    finally:
        averager.shutdown()
        dht.shutdown()


def test_groups_mix_across_rounds_so_everyone_converges():
    first = DHT()
    dhts = [first] + [DHT(initial_peers=[first.address]) for _ in range(5)]
    averagers = [
        DecentralizedAverager(
            [torch.full((100,), float(i))],
            d,
            "moshpit",
            target_group_size=2,
            codec="none",
            matchmaking_time=1.0,
            expected_swarm_size=6,
        )
        for i, d in enumerate(dhts)
    ]
    sizes = []
    try:
        for _ in range(6):
            threads = [threading.Thread(target=lambda a=a: sizes.append(a.step(timeout=20))) for a in averagers]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        values = []
        for a in averagers:
            with a.get_tensors() as (t,):
                values.append(float(t[0]))
        # Groups of two out of six peers: only changing groups spread information to everyone.
        assert max(values) - min(values) < 1.0  # started 5.0 apart
        assert sum(values) / len(values) == pytest.approx(2.5, abs=1e-4)  # the mean is preserved
        assert any(r is not None and len(r.group.members) < 6 for r in sizes)
    finally:
        for a in averagers:
            a.shutdown()
        for d in dhts:
            d.shutdown()


def test_groups_are_formed_identically_from_the_same_registrations():
    from hiveengine.averaging import GroupMember
    from hiveengine.transport import Identity

    members = [GroupMember(Identity.generate().peer_id, f"ucx://h:1/{i}") for i in range(7)]
    groups = form_groups(5, members, target=3)
    assert [len(g.members) for g in groups] == [3, 2, 2]
    assert form_groups(5, list(reversed(members)), target=3) == groups
    assert sorted(m.peer_id for g in groups for m in g.members) == sorted(m.peer_id for m in members)
    assert len({g.group_id for g in groups}) == 3
    assert choose_slot(10.1, 1.0) == 10 and choose_slot(10.9, 1.0) == 11
