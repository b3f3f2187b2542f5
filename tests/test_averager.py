"""DecentralizedAverager end to end: peers in separate processes find each other through the DHT."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from hiveengine.averaging import DecentralizedAverager
from hiveengine.averaging.matchmaking import grid_groups
from hiveengine.dht import DHT
from tests.procs import PeerProcess

pytestmark = pytest.mark.timeout(180)


def seeded(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(50_000, generator=gen), torch.randn(17, 3, generator=gen)]


def run_swarm(
    tmp_path, peers: int, rounds: int, codec: str, envs: list[dict] | None = None
) -> tuple[list[list], list[list[torch.Tensor]]]:
    """`peers` averager processes (each with its env from `envs`) step `rounds` times: their STEP summaries and
    saved tensors."""
    envs = envs or [{}] * peers
    first = PeerProcess("decentralized_averager_peer.py", str(tmp_path / "0.pt"), "0", str(rounds), codec, env=envs[0])
    procs = [first]
    try:
        bootstrap = first.expect("DHT")
        for i in range(1, peers):
            args = [str(tmp_path / f"{i}.pt"), str(i), str(rounds), codec, bootstrap]
            procs.append(PeerProcess("decentralized_averager_peer.py", *args, env=envs[i]))
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


def test_a_reducer_caught_cheating_is_left_out_of_every_later_group(tmp_path):
    # Peer 3 returns noise for the part it reduces. In round 1 every honest peer catches it (verified replies) and
    # that part fails for them; from round 2 on their registrations name it, a majority bans it, and every member
    # leaves it out of the cut: groups of the 3 honest peers, no failed part. The cheater finds no group.
    envs = [{"VERIFY": "1"}] * 3 + [{"VERIFY": "1", "ATTACK": "garbage_reducer"}]
    steps, results = run_swarm(tmp_path, peers=4, rounds=3, codec="none", envs=envs)
    for honest in steps[:3]:
        assert honest[0]["size"] == 4 and len(honest[0]["failed"]) == 1, honest
        assert honest[1:] == [{"size": 3, "failed": []}] * 2, honest
    assert steps[3][1:] == [None, None]
    assert all(torch.equal(r[0], results[0][0]) for r in results[:3])


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


def test_groups_change_every_round_and_preserve_the_mean():
    first = DHT()
    dhts = [first] + [DHT(initial_peers=[first.address]) for _ in range(5)]
    averagers = [
        DecentralizedAverager(
            [torch.full((100,), float(i))], d, "moshpit", target_group_size=2, codec="none", matchmaking_time=1.0
        )
        for i, d in enumerate(dhts)
    ]
    groupings = set()
    try:
        for _ in range(4):
            results = [None] * len(averagers)

            def step(i: int, results: list = results) -> None:
                results[i] = averagers[i].step(timeout=20)

            threads = [threading.Thread(target=step, args=(i,)) for i in range(len(averagers))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert all(r is not None and len(r.group.members) == 2 and not r.failed_parts for r in results)
            groupings.add(frozenset(frozenset(m.peer_id for m in r.group.members) for r in results))
        values = []
        for a in averagers:
            with a.get_tensors() as (t,):
                values.append(float(t[0]))
        assert len(groupings) > 1  # groups of two out of six: membership must change between rounds
        assert sum(values) / len(values) == pytest.approx(2.5, abs=1e-5)  # averaging preserves the mean
        assert max(values) - min(values) < 5.0
    finally:
        for a in averagers:
            a.shutdown()
        for d in dhts:
            d.shutdown()


def test_a_gathering_of_all_expected_peers_closes_without_waiting_out_matchmaking_time():
    first = DHT()
    dhts = [first] + [DHT(initial_peers=[first.address]) for _ in range(2)]
    # A 60 s gathering ends after the 20 s step deadline: only closing early can form the group.
    averagers = [
        DecentralizedAverager([torch.full((8,), float(i))], d, "early", codec="none", matchmaking_time=60.0)
        for i, d in enumerate(dhts)
    ]
    results = [None] * len(averagers)

    def step(i: int) -> None:
        results[i] = averagers[i].step(timeout=20, expected_peers=len(averagers))

    threads = [threading.Thread(target=step, args=(i,)) for i in range(len(averagers))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(r is not None and len(r.group.members) == 3 and not r.failed_parts for r in results)
        assert len({r.group.group_id for r in results}) == 1
        for a in averagers:
            with a.get_tensors() as (t,):
                assert torch.equal(t, torch.full((8,), 1.0))
    finally:
        for a in averagers:
            a.shutdown()
        for d in dhts:
            d.shutdown()


def test_grid_groups_cross_every_earlier_group_and_ignore_order():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from hiveengine.averaging import GroupMember
    from hiveengine.transport import Identity

    keys = [Ed25519PrivateKey.from_private_bytes(bytes([i + 1]) * 32) for i in range(9)]  # fixed: no chance
    members = [GroupMember(Identity(key).peer_id, f"ucx://h:1/{i}") for i, key in enumerate(keys)]
    first, second = grid_groups(members, 3, round_number=4), grid_groups(members, 3, round_number=5)
    assert grid_groups(list(reversed(members)), 3, round_number=4) == first
    assert sorted(len(g) for g in first) == sorted(len(g) for g in second) == [3, 3, 3]
    # Moshpit's property: each group of the next round holds exactly one member of each group of this one.
    assert all(len(set(a) & set(b)) == 1 for a in first for b in second)
    assert grid_groups(members, 3, round_number=6) == first  # a 3x3 grid: the axes alternate
    assert grid_groups(members, None, round_number=0) == [tuple(sorted(members, key=lambda m: m.peer_id.raw))]


def test_an_absurd_bandwidth_claim_is_capped_relative_to_the_group():
    from hiveengine.averaging import GroupMember, Mode, balanced_shares
    from hiveengine.averaging.matchmaking import MAX_BANDWIDTH_RATIO, bounded_bandwidths
    from hiveengine.transport import Identity

    members = tuple(
        GroupMember(Identity.generate().peer_id, f"ucx://h:1/{i}", bw) for i, bw in enumerate([1.0, 2.0, 1e300])
    )
    client = GroupMember(
        Identity.generate().peer_id, "ucx://h:1/c", 1e300, Mode.CLIENT
    )  # reduces nothing: not a reducer
    bounded = bounded_bandwidths((*members, client))
    assert [m.bandwidth for m in bounded[:2]] == [1.0, 2.0]  # honest claims untouched
    assert bounded[2].bandwidth == MAX_BANDWIDTH_RATIO * 2.0  # the lower median of (1, 2, 1e300) is 2
    assert bounded[2].peer_id == members[2].peer_id and bounded[3] == client
    shares = balanced_shares([m.bandwidth for m in bounded[:3]], [True] * 3, senders=3)
    assert max(shares) < 0.9  # the claimant no longer reduces (almost) the whole buffer


def test_a_peer_nobody_can_dial_registers_as_a_client_and_a_relayed_one_with_less_bandwidth():
    from hiveengine.averaging import Mode
    from hiveengine.averaging.matchmaking import RELAYED_BANDWIDTH_SHARE
    from hiveengine.transport import Identity, PeerAddress

    dht = DHT()
    averager = DecentralizedAverager([torch.ones(4)], dht, "roles", bandwidth=2.0, share_state=False)
    peer, runtime = averager.peer, averager.peer.runtime
    reachable = runtime.reachable
    try:
        me = averager.matchmaker._member_now()
        assert (me.mode, me.bandwidth, me.address) == (Mode.NODE, 2.0, str(peer.address))
        runtime.reachable = False  # as reachability.py finds behind a NAT
        assert averager.matchmaker._member_now().mode == Mode.CLIENT  # no relay slot: a part given to it would fail
        relay = Identity.generate().peer_id
        peer.relayed = PeerAddress("203.0.113.7", 41000, peer.peer_id, 41001, relay)  # as relay.reserve sets it
        me = averager.matchmaker._member_now()
        assert (me.mode, me.bandwidth) == (Mode.NODE, 2.0 * RELAYED_BANDWIDTH_SHARE)
        assert me.address == str(peer.relayed) and f"relay={relay}" in me.address
    finally:
        runtime.reachable, peer.relayed = reachable, None
        averager.shutdown()
        dht.shutdown()


def test_a_sharing_peer_stays_findable_between_rounds_far_apart_and_at_its_address_now():
    """A state advertisement lives four declare_state_periods; renewed every period, it outlives any gap between
    rounds (DiLoCo's can be minutes), and each renewal names the address the peer has then (a relay move)."""
    from hiveengine.averaging.state import STATE_TTL_PERIODS, state_key
    from hiveengine.transport import Identity, PeerAddress

    period = 0.5
    source_dht = DHT()
    newcomer_dht = DHT(initial_peers=[source_dht.address])
    source = DecentralizedAverager([torch.arange(10.0)], source_dht, "renew", declare_state_period=period)
    newcomer = DecentralizedAverager([torch.zeros(10)], newcomer_dht, "renew", share_state=False)
    peer = source.peer

    def advertised() -> list:
        found = newcomer_dht.get(state_key("renew"), latest=True)
        return [e.value for e in found.value.values() if e.value is not None] if found is not None else []

    try:
        source.publish_state(5, {"step": 5})
        time.sleep(2 * STATE_TTL_PERIODS * period)  # no round meanwhile: the first advertisement has lapsed
        assert newcomer.load_state_from_peers(timeout=30) == {"step": 5}
        with newcomer.get_tensors() as (got,):
            assert newcomer.local_epoch == 5 and torch.equal(got, torch.arange(10.0))
        peer.relayed = PeerAddress("203.0.113.7", 41000, peer.peer_id, 41001, Identity.generate().peer_id)
        deadline = time.monotonic() + 10 * period
        while advertised() != [[str(peer.relayed), 5, source._declared[1]]]:
            assert time.monotonic() < deadline, advertised()
            time.sleep(period / 5)
    finally:
        peer.relayed = None
        for averager in (source, newcomer):
            averager.shutdown()
        newcomer_dht.shutdown()
        source_dht.shutdown()


def test_state_download_matches_the_source_bit_for_bit():
    source_dht = DHT()
    newcomer_dht = DHT(initial_peers=[source_dht.address])
    gen = torch.Generator().manual_seed(7)
    source = DecentralizedAverager(
        [torch.randn(3_000_000, generator=gen), torch.randn(5, 5, generator=gen)], source_dht, "s"
    )
    newcomer = DecentralizedAverager([torch.zeros(3_000_000), torch.zeros(5, 5)], newcomer_dht, "s")
    lonely = DecentralizedAverager([torch.zeros(7)], newcomer_dht, "nobody-here")
    try:
        source.local_epoch, source.state_metadata = 12, {"optimizer_step": 12, "lr": 0.1}
        source.peer.runtime.run(source._advertise(), 10)
        assert newcomer.load_state_from_peers(timeout=30) == {"optimizer_step": 12, "lr": 0.1}
        assert newcomer.local_epoch == 12
        with source.get_tensors() as expected, newcomer.get_tensors() as got:
            assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
        with newcomer.get_tensors() as got:
            got[0].zero_()
        assert newcomer.load_state_from_peers(timeout=30, codec="int8") is not None  # smaller, lossy download
        with source.get_tensors() as expected, newcomer.get_tensors() as got:
            assert 0 < float((expected[0] - got[0]).abs().max()) < 0.05
        assert lonely.load_state_from_peers(timeout=5) is None
    finally:
        for averager in (source, newcomer, lonely):
            averager.shutdown()
        newcomer_dht.shutdown()
        source_dht.shutdown()
