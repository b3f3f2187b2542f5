"""DecentralizedAverager rounds as hivemind users run them: late starts, grids, cancellations, clients, options.

Every averager has its own DHT node and its own peer; they share the process's transport loop, so many peers
can step at once with asyncio.gather (real UCX connections over 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest
import torch

from hiveengine.averaging import DecentralizedAverager, GroupMember
from hiveengine.averaging.matchmaking import (
    GATHER_GRID_SECONDS,
    SETTLE_SECONDS,
    Registration,
    matchmaking_key,
    without_outvoted,
)
from hiveengine.averaging.records import record_signer
from hiveengine.dht import DHT, get_dht_time
from hiveengine.dht.validation import signer_of
from hiveengine.transport import Identity

pytestmark = pytest.mark.timeout(180)
WAIT_LIMIT = 30.0


@contextlib.contextmanager
def swarm(count: int, *, sizes=(1000, 7), seed: int = 0, **options):
    """`count` averagers of seeded random tensors, each with its own DHT node."""
    dhts = [DHT()]
    dhts += [DHT(initial_peers=[dhts[0].address]) for _ in range(count - 1)]
    gen = torch.Generator().manual_seed(seed)
    averagers = []
    try:
        for dht in dhts:
            tensors = [torch.randn(n, generator=gen) for n in sizes]
            averagers.append(DecentralizedAverager(tensors, dht, "rounds-test", **options))
        yield averagers
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in reversed(dhts):
            dht.shutdown()


def together(averagers, **step_options):
    """Step every averager at once; their results in order."""
    runtime = averagers[0].peer.runtime

    async def all_steps():
        return await asyncio.gather(*(a.astep(**step_options) for a in averagers))

    return runtime.run(all_steps(), WAIT_LIMIT + 10)


def snapshot(averagers) -> list[list[torch.Tensor]]:
    out = []
    for averager in averagers:
        with averager.get_tensors() as tensors:
            out.append([t.clone() for t in tensors])
    return out


def mean_of(states: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [sum(s[i] for s in states) / len(states) for i in range(len(states[0]))]


def wait_for(condition, what: str):
    deadline = time.monotonic() + WAIT_LIMIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def registrations(averager, key: str = "rounds") -> dict:
    """{raw peer id of the signer: registration} (signed registrations only)."""
    found = averager.dht.get(matchmaking_key(averager.prefix, key), latest=True)
    signed = {} if found is None else {signer_of(k): v.value for k, v in found.value.items()}
    return {peer_id.raw: value for peer_id, value in signed.items() if peer_id is not None}


def test_step_keeps_looking_until_its_timeout():
    """Two peers started after the first one's gathering closed still meet (hivemind keeps looking too)."""
    with swarm(2, matchmaking_time=1.0) as (first, second):
        results = {}
        thread = threading.Thread(target=lambda: results.setdefault("first", first.step(timeout=40)))
        thread.start()
        wait_for(lambda: registrations(first), "the first peer's registration")
        opened = next(iter(registrations(first).values()))[4]
        wait_for(lambda: time.time() > opened + SETTLE_SECONDS + 0.2, "the first gathering to close")
        results["second"] = second.step(timeout=40)
        thread.join(WAIT_LIMIT)
        assert results["first"] is not None and results["second"] is not None
        assert len(results["first"].group.members) == len(results["second"].group.members) == 2


def test_nine_peers_on_a_grid_reach_the_exact_mean_in_two_rounds():
    with swarm(9, target_group_size=3) as averagers:
        expected = mean_of(snapshot(averagers))
        first = together(averagers, expected_peers=9)
        assert sorted(len(r.group.members) for r in first) == [3] * 9
        second = together(averagers, expected_peers=9)
        assert all(r is not None and not r.failed_parts for r in second)
        for state in snapshot(averagers):
            for got, want in zip(state, expected, strict=True):
                assert torch.allclose(got, want, atol=1e-5, rtol=0)


def test_a_cancelled_step_withdraws_its_registration():
    with swarm(3, matchmaking_time=2.0) as (a, b, c):
        runtime = c.peer.runtime
        cancelled = runtime.submit(c.astep(timeout=30))
        wait_for(lambda: c.peer.peer_id.raw in registrations(c), "the registration of the peer to cancel")
        cancelled.cancel()
        wait_for(lambda: registrations(c).get(c.peer.peer_id.raw, "live") is None, "the withdrawal")
        results = together([a, b], timeout=30)
        assert all(len(r.group.members) == 2 and not r.failed_parts for r in results)


def test_a_group_of_clients_gets_no_round_and_no_error():
    with swarm(2, client_mode=True, matchmaking_time=1.0) as averagers:
        assert together(averagers, timeout=10, expected_peers=2) == [None, None]


def test_unlimited_groups_and_the_lossless_default_give_the_exact_mean():
    with swarm(3, target_group_size=None) as averagers:
        assert all(a.codec.name == "none" for a in averagers)
        expected = mean_of(snapshot(averagers))
        results = together(averagers, expected_peers=3)
        assert all(len(r.group.members) == 3 for r in results)
        states = snapshot(averagers)
        for state in states:
            for got, want, first in zip(state, expected, states[0], strict=True):
                assert torch.allclose(got, want, atol=1e-6, rtol=0)
                assert torch.equal(got, first)


def test_metadata_is_gathered_and_rounds_start_at_the_scheduled_time():
    with swarm(2, matchmaking_time=5.0) as averagers:
        scheduled = get_dht_time() + 1.0
        runtime = averagers[0].peer.runtime

        async def steps():
            return await asyncio.gather(
                *(a.astep(gather={"rank": i}, scheduled_time=scheduled) for i, a in enumerate(averagers))
            )

        results = runtime.run(steps(), WAIT_LIMIT)
        ids = [a.peer.peer_id for a in averagers]
        for result in results:
            assert result.group.gathered == {ids[0]: {"rank": 0}, ids[1]: {"rank": 1}}
        assert get_dht_time() >= scheduled  # the gathering closed at the scheduled time, not 5 s later


def test_state_sharing_is_switched_at_run_time():
    with swarm(2, share_state=False) as (source, newcomer):
        newcomer.allow_state_sharing = False
        assert newcomer.load_state_from_peers(timeout=5) is None
        source.allow_state_sharing = True
        assert newcomer.load_state_from_peers(timeout=20) is not None
        assert all(torch.equal(a, b) for a, b in zip(*snapshot([source, newcomer]), strict=True))


def test_an_averager_that_missed_rounds_meets_the_others_again():
    with swarm(3) as (a, b, late):
        assert all(r is not None for r in together([a, b], expected_peers=2))
        assert (a.local_epoch, late.local_epoch) == (1, 0)
        results = together([a, b, late], expected_peers=3)
        assert all(r is not None and len(r.group.members) == 3 for r in results)
        assert a.local_epoch == late.local_epoch == 2


def test_a_peer_is_left_out_only_when_a_strict_majority_of_the_registrants_bans_it():
    ids = [Identity.generate().peer_id for _ in range(5)]

    def registration(i: int, *bans: int) -> Registration:
        member = GroupMember(ids[i], f"ucx://127.0.0.1:9/{ids[i]}", 1.0)
        return Registration(member, 1.0, 2.0, bans=tuple(ids[b].raw for b in bans))

    liars = [registration(0, 4), registration(1, 4), registration(2), registration(3), registration(4, 4)]
    assert without_outvoted(liars) == liars  # 2 of 5 (its own vote does not count): not a majority
    honest = [registration(0, 4), registration(1, 4), registration(2, 4), registration(3), registration(4, 0, 1, 2)]
    assert [r.member.peer_id for r in without_outvoted(honest)] == ids[:4]


def test_an_accusation_in_a_registration_gets_the_accused_banned_by_peers_that_check_its_evidence():
    from tests.test_accusations import _signed

    with swarm(3) as (accuser, bystander, accused):
        # The accuser caught `accused` returning a reply that contradicts its signed claim (as in
        # test_verified_reducers); the bystander never sent it anything.
        evidence = _signed(accused.peer.identity, "int8", 0, garbage=True)
        accuser.service.accusations.keep(evidence)
        accuser.service.ban(accused.peer.peer_id, "caught in a round")
        results = together([accuser, bystander, accused], expected_peers=3, timeout=20, key="r1")
        assert all(r is not None for r in results)
        named = registrations(accuser, "r1")[accuser.peer.peer_id.raw]
        assert named[9] == [[accused.peer.peer_id.raw, evidence.digest]]
        wait_for(lambda: accused.peer.peer_id in bystander.service.banned, "the bystander's own check")
        assert "checked out here" in bystander.service.banned[accused.peer.peer_id]
        # Now two of three registrants ban it: it is left out of the next round's groups.
        results = together([accuser, bystander, accused], expected_peers=3, timeout=8, key="r2")
        assert [len(r.group.members) for r in results[:2]] == [2, 2]
        assert results[2] is None


def test_a_hostile_registration_is_skipped():
    with swarm(2) as (a, b):
        key = matchmaking_key(a.prefix, "rounds")
        a.dht.store(key, ["ucx://x:1/zz", 0.0, 0, float("nan"), 1e300, -1, None], get_dht_time() + 30, subkey=b"x")
        results = together([a, b], expected_peers=2, timeout=20)
        assert all(r is not None and len(r.group.members) == 2 for r in results)


def test_hostile_rings_are_dropped_and_wake_nothing():
    """A ring is taken only for an open gathering, with the caller's own well-formed registration, newer than
    the one held: junk, forged and stale rings change nothing and wake nobody (and a flood of them does not
    stop the next round)."""
    from hiveengine.averaging.matchmaking import RING_METHOD, Registration, _Listener
    from hiveengine.transport import Peer

    with swarm(2) as (a, b):
        stranger = Peer()
        key = matchmaking_key(a.prefix, "rung")
        listener = a.matchmaker.bell.listeners.setdefault(key, _Listener())
        now = get_dht_time()
        own = Registration(GroupMember(stranger.peer_id, str(stranger.address)), now, now + 5)
        forged = Registration(b.me, now, now + 5)  # b's registration, rung by the stranger
        try:

            async def ring(header, held: bool = False):
                reply = {"t": True} if held else {}
                assert await stranger.call(a.me.address, RING_METHOD, header, timeout=10) == (reply, [])

            async def junk():
                bad_records = [
                    None,
                    5,
                    [],
                    own.record()[:6],
                    {"a": 1},
                    [str(stranger.address), float("nan"), 0, now, now + 5, 0, None],
                    [str(stranger.address), 1.0, 0, now, float("inf"), 0, None],
                    [str(stranger.address), 1.0, 0, now, now + 5, -1, None],
                    [str(stranger.address), 1.0, 7, now, now + 5, 0, None],
                    ["ucx://x:1/zz", 1.0, 0, now, now + 5, 0, None],
                    [str(stranger.address), 1.0, 0, now, now + 5, 0, None, b"not a peer id"],
                    [*own.record(), None],
                    forged.record(),
                ]
                headers = [{}, {"k": 5}, {"k": [1]}, {"k": b"x" * 10_000}, {"k": key}, {"k": key, "e": 1.0}]
                headers += [{"k": key, "r": own.record(), "e": e} for e in (None, "1", True, float("nan"), [1])]
                headers += [{"k": key + "-closed", "r": own.record(), "e": 1.0}]
                headers += [{"k": key, "r": record, "e": 1.0} for record in bad_records]
                for _ in range(20):
                    for header in headers:
                        await ring(header)

            a.peer.runtime.run(junk(), WAIT_LIMIT)
            assert listener.records == {} and not listener.event.is_set()

            a.peer.runtime.run(ring({"k": key, "r": own.record(), "e": 2.0}, held=True), WAIT_LIMIT)
            assert listener.records == {stranger.peer_id: (2.0, own)} and listener.event.is_set()
            listener.event.clear()
            stale = Registration(own.member, now, now + 1)
            a.peer.runtime.run(ring({"k": key, "r": stale.record(), "e": 1.0}, held=True), WAIT_LIMIT)
            assert listener.records == {stranger.peer_id: (2.0, own)} and not listener.event.is_set()
            del a.matchmaker.bell.listeners[key]

            results = together([a, b], expected_peers=2, timeout=20)
            assert all(r is not None and len(r.group.members) == 2 for r in results)
        finally:
            stranger.shutdown()


def test_a_group_that_met_meets_again_by_ringing_ahead(monkeypatch):
    """Peers that averaged together ring each other as they register for the next round: the group forms from the
    rings alone, averages right, and, as each holds the other's registration, neither writes it to the DHT."""
    from hiveengine.averaging import matchmaking

    with swarm(2, sizes=(64,)) as (a, b):
        assert all(r is not None for r in together([a, b], expected_peers=2, key="first"))
        monkeypatch.setattr(matchmaking, "RING_AHEAD_WRITE_DELAY", 2.0)  # time for the rings' replies, on a busy host
        before = mean_of(snapshot([a, b]))
        results = together([a, b], expected_peers=2, key="second", timeout=20)
        assert [None if r is None else len(r.group.members) for r in results] == [2, 2]
        for state in snapshot([a, b]):
            torch.testing.assert_close(state, before)
        wait_for(lambda: not a.matchmaker._delayed and not b.matchmaker._delayed, "the delayed writes")
        assert registrations(a, "second") == {}


def test_a_newcomer_meets_a_peer_that_rang_its_last_group_ahead():
    """A peer rings the peers of its last group ahead; when one of them does not step and a newcomer does, the
    newcomer still meets it (through the DHT write that follows the rings), and the absent peer keeps nothing that
    a later round would count."""
    with swarm(3, sizes=(64,)) as (a, absent, newcomer):
        assert all(r is not None for r in together([a, absent], expected_peers=2, key="first"))
        results = together([a, newcomer], expected_peers=2, key="second", timeout=20)
        members = [{m.peer_id for m in r.group.members} for r in results]
        assert members == [{a.peer.peer_id, newcomer.peer.peer_id}] * 2
        results = together([a, absent], expected_peers=2, key="third", timeout=20)
        assert [None if r is None else len(r.group.members) for r in results] == [2, 2]


def test_rings_before_a_gathering_opens_are_kept_only_from_recent_peers_and_bounded():
    """A ring for a gathering not open yet is kept (and acknowledged) only from a peer of our recent groups: its
    newest one per key, while its deadline is ahead, dropped by its newer withdrawal. Strangers, junk, stale and
    older rings are not kept, and a flood of rings under many keys is refused past EARLY_RINGS_PER_PEER (what was
    kept stays)."""
    from hiveengine.averaging.matchmaking import EARLY_RINGS_PER_PEER, RING_METHOD
    from hiveengine.transport import Peer

    with swarm(2, sizes=(64,)) as (a, b):
        assert all(r is not None for r in together([a, b], expected_peers=2, key="first"))
        bell, stranger = a.matchmaker.bell, Peer()
        key = matchmaking_key(a.prefix, "later")
        now = get_dht_time()
        mine = Registration(b.me, now, now + 20)

        def ring(peer, header) -> bool:
            reply = peer.runtime.run(peer.call(a.me.address, RING_METHOD, header, timeout=10), WAIT_LIMIT)
            return reply[0].get("t") is True

        try:
            theirs = Registration(GroupMember(stranger.peer_id, str(stranger.address)), now, now + 20)
            assert not ring(stranger, {"k": key, "r": theirs.record(), "e": 5.0})
            assert not ring(b.peer, {"k": key, "r": Registration(b.me, now - 20, now - 1).record(), "e": 5.0})
            assert not ring(b.peer, {"k": key, "r": ["junk"], "e": 5.0})
            assert not ring(b.peer, {"k": "x" * 5000, "r": mine.record(), "e": 5.0})
            assert not ring(b.peer, {"k": key, "r": mine.record(), "e": float("inf")})
            bulky = Registration(b.me, now, now + 20, gathered=b"x" * 10_000)
            assert not ring(b.peer, {"k": key, "r": bulky.record(), "e": 5.0})
            assert bell._early == {}
            kept = [ring(b.peer, {"k": f"{key}-{i}", "r": mine.record(), "e": 5.0}) for i in range(50)]
            assert kept == [True] * EARLY_RINGS_PER_PEER + [False] * (50 - EARLY_RINGS_PER_PEER)
            assert set(bell._early) == {(b.peer.peer_id, f"{key}-{i}") for i in range(EARLY_RINGS_PER_PEER)}
            assert not ring(b.peer, {"k": key, "r": mine.record(), "e": 5.0})  # no room left for b
            assert not ring(b.peer, {"k": f"{key}-0", "r": None, "e": 6.0})  # a withdrawal makes room
            assert ring(b.peer, {"k": key, "r": mine.record(), "e": 5.0})
            older = Registration(b.me, now, now + 19)
            assert ring(b.peer, {"k": key, "r": older.record(), "e": 4.0})  # older: it holds a newer one
            assert bell._early[(b.peer.peer_id, key)] == (5.0, mine)
            listener = a.peer.runtime.run(_call(lambda: bell.open(key)), WAIT_LIMIT)
            assert listener.records == {b.peer.peer_id: (5.0, mine)} and listener.event.is_set()
            assert (b.peer.peer_id, key) not in bell._early
            del bell.listeners[key]
        finally:
            stranger.shutdown()


def test_a_cancelled_step_rings_its_withdrawal_to_the_peers_it_rang_ahead():
    """A peer that rang its last group ahead and then gives up tells them, so a ring they keep for a gathering they
    have not opened yet does not count it."""
    with swarm(2, sizes=(64,)) as (a, b):
        assert all(r is not None for r in together([a, b], expected_peers=2, key="first"))
        step = a.peer.runtime.submit(a.astep(expected_peers=2, key="second", timeout=20))
        held = b.matchmaker.bell._early
        ours = (a.peer.peer_id, matchmaking_key(a.prefix, "second"))
        wait_for(lambda: ours in held, "a's ring ahead")
        step.cancel()
        wait_for(lambda: ours not in held, "a's withdrawal")


def test_concurrent_store_and_reads_see_each_other():
    """Nodes that write-and-read one key at once (the matchmaking registration): of any two, at least one reads
    the other's record, and one whose record every node held before the other's came was not read by it."""
    from hiveengine.averaging.matchmaking import _store_and_read

    dhts = [DHT()]
    dhts += [DHT(initial_peers=[dhts[0].address]) for _ in range(3)]
    try:
        runtime = dhts[0].peer.runtime
        for attempt in range(20):
            key = f"concurrent-{attempt}"

            async def all_writes(key=key):
                writes = [_store_and_read(d, d.identity, key, [1], get_dht_time() + 30) for d in dhts]
                return await asyncio.gather(*writes)

            reads = [_summary(read) for read in runtime.run(all_writes(), WAIT_LIMIT)]
            ids = [d.peer_id.raw for d in dhts]
            nodes = {int.from_bytes(raw, "big") for raw in ids}
            for i, (found, before, takers) in enumerate(reads):
                assert ids[i] in found and takers == nodes
                for j in range(len(dhts)):
                    if j != i:
                        assert ids[j] in found or ids[i] in reads[j][0], "neither of two writers read the other"
                        if ids[j] in before:  # j wrote everywhere before i did: j read no i anywhere
                            assert ids[i] not in reads[j][0]
    finally:
        for dht in reversed(dhts):
            dht.shutdown()


def test_registrants_learn_of_each_other_from_their_dht_nodes_without_rings():
    """When every DHT node stores the gathering's key (a swarm of at most k nodes), a registrant learns of each
    other one as its write reaches the registrant's own node: nobody needs a ring."""
    from hiveengine.averaging.matchmaking import Bell

    rung = []
    with swarm(3) as averagers:
        original = Bell.ring
        Bell.ring = lambda self, *args: rung.append(args)
        try:
            results = together(averagers, expected_peers=3, key="watched")
        finally:
            Bell.ring = original
        assert all(r is not None and len(r.group.members) == 3 for r in results)
        assert rung == []


def test_a_dht_watch_sees_the_records_stored_on_its_node_until_unwatched():
    from hiveengine.dht.serialization import pack

    with swarm(2) as (a, b):
        seen = []
        key = "watched-key"
        unwatch = a.peer.runtime.run(_watch(a.dht, pack(key, "key"), seen), WAIT_LIMIT)
        assert b.dht.store(key, "first", get_dht_time() + 30, subkey="b")
        assert [r.subkey for r in seen] == [pack("b", "subkey")]
        a.peer.runtime.run(_call(unwatch), WAIT_LIMIT)
        assert b.dht.store(key, "second", get_dht_time() + 31, subkey="b")
        assert len(seen) == 1


async def _watch(dht, key: bytes, seen: list):
    return dht.node.watch(key, seen.append)


async def _call(function):
    return function()


def _summary(read) -> tuple[set, set, set]:
    """Who a write read back, whose record every node that took it held before, and which nodes took it."""
    records = read.entry.subkeys.values()
    found = {record_signer(r).raw for r in records}
    before = {record_signer(r).raw for r in records if read.everywhere(r)}
    return found, before, read.taker_ids


def test_a_withdrawn_registration_is_replaced_by_the_next_one():
    """Every write of a peer under one key expires later than its last one, so registering again right after a
    withdrawal replaces the tombstone (rather than being refused as older)."""
    with swarm(2) as (a, b):
        runtime = a.peer.runtime
        gave_up = runtime.run(a.matchmaker.find_group("again", 0, time.monotonic() + SETTLE_SECONDS, 2), WAIT_LIMIT)
        assert gave_up is None
        me = a.peer.peer_id.raw
        wait_for(lambda: me in registrations(a, "again") and registrations(a, "again")[me] is None, "the withdrawal")
        results = together([a, b], expected_peers=2, key="again", timeout=20)
        assert all(r is not None and len(r.group.members) == 2 for r in results)
        assert registrations(a, "again")[me] is not None


def test_peers_that_start_together_open_the_same_gathering():
    """Gathering deadlines are on a grid, so peers opening gatherings at once need not move to the earliest."""
    with swarm(3) as averagers:
        assert all(r is not None for r in together(averagers, expected_peers=3, key="grid"))
        deadlines = {record[4] for record in registrations(averagers[0], "grid").values()}
        assert len(deadlines) == 1
        (deadline,) = deadlines
        assert abs(deadline / GATHER_GRID_SECONDS - round(deadline / GATHER_GRID_SECONDS)) < 1e-6


def test_a_gathering_that_filled_up_is_over_for_its_members():
    """A gathering that fills up closes before its deadline, so its registrations still look open: a member that
    steps again must not make a group of the others' old registrations (they are not stepping), and members that
    step again together meet in a new gathering (not, each alone, in the one that is over)."""
    with swarm(3) as averagers:
        assert all(r is not None for r in together(averagers, expected_peers=3, key="filled"))
        a = averagers[0]
        alone = a.peer.runtime.run(a.matchmaker.find_group("filled", 1, time.monotonic() + 1.0, 3), WAIT_LIMIT)
        assert alone is None
        again = together(averagers, expected_peers=3, key="filled", timeout=20)
        assert [None if r is None else len(r.group.members) for r in again] == [3, 3, 3]


def test_small_buffers_are_cut_into_fewer_parts():
    """Below MIN_PART_BYTES per reducer, parts go to the fastest reducers (ties: in group order); the rest own
    empty parts. Every member computes the same spans."""
    from hiveengine.averaging.allreduce import _part_spans

    equal = ((1.0, True),) * 8
    assert _part_spans(equal, 8, 1024, 1, 4096) == [(0, 1024)] + [(1024, 1024)] * 7
    spans = _part_spans(equal, 8, 4 * 4096, 1, 4096)
    assert [e - s for s, e in spans] == [4096] * 4 + [0] * 4
    assert all(e - s == 8192 for s, e in _part_spans(equal, 8, 8 * 8192, 1, 4096))
    uneven = ((1.0, True), (2.0, True), (1.0, True))
    assert [e - s > 0 for s, e in _part_spans(uneven, 3, 1000, 1, 4096)] == [False, True, False]


@pytest.mark.parametrize("name", ["compression", "min_matchmaking_time", "initial_group_bits", "allow_state_sharing"])
def test_hivemind_spellings_name_the_hiveengine_one(name):
    from hiveengine.averaging.averager import HIVEMIND_SPELLINGS
    from hiveengine.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match=f"{name}= is hivemind's; in hiveengine use"):
        DecentralizedAverager([torch.zeros(3)], None, "x", **{name: 1})
    assert HIVEMIND_SPELLINGS[name]
