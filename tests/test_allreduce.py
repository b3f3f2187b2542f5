"""Butterfly all-reduce between real peer processes: exact means, roles, bandwidth-sized parts, faults."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
from collections.abc import Callable

import psutil
import pytest
import torch

from hiveengine.averaging import AllReduceService, GroupInfo, GroupMember, Mode, part_spans, run_allreduce
from hiveengine.codec import get_codec
from hiveengine.kernels import weighted_mean
from hiveengine.transport import Peer, PeerID
from tests.peers.allreduce_peer import seeded_data
from tests.procs import PeerProcess

pytestmark = pytest.mark.timeout(120)
NUMEL = 100_003
# Worst-case distance from the exact mean: one quantization on the way in, one on the way back.
TOLERANCE = {"none": 0.0, "fp16": 4e-3, "bf16": 3e-2, "int8": 0.08, "int4": 1.6}


def average_in_processes(
    tmp_path,
    specs: list[dict],
    codec: str,
    timeout: float = 60,
    sender_timeout: float = 3,
    device: str = "cpu",
    numel: int = NUMEL,
    spawn: Callable[[int], PeerProcess] = lambda i: PeerProcess("allreduce_peer.py"),
    **options,
):
    """Run one round among real processes on `device` buffers; `specs` give each peer's weight, bandwidth,
    mode (and stall: killed once in the group; or an attack from tests/peers/byzantine_attacks.py);
    `options`: the round's late_grace, aggregation, max_weight_ratio (and `rounds`: how many rounds to run).
    `spawn(i)` starts peer i's allreduce_peer.py (in a network namespace, say)."""
    procs = [spawn(i) for i in range(len(specs))]
    try:
        addresses = [p.expect("ADDRESS") for p in procs]
        members = [
            {
                "id": a.rsplit("/", 1)[1],
                "address": a,
                "bandwidth": s.get("bandwidth", 1.0),
                "mode": s.get("mode", "NODE"),
            }
            for a, s in zip(addresses, specs, strict=True)
        ]
        plan = {
            "group_id": os.urandom(8).hex(),
            "members": members,
            "numel": numel,
            "codec": codec,
            "timeout": timeout,
            "chunk_elements": 1 << 14,
            "sender_timeout": sender_timeout,
            "device": device,
            **options,
        }
        for i, (proc, spec) in enumerate(zip(procs, specs, strict=True)):
            me = {"seed": i, "weight": spec.get("weight", 1.0), "out": str(tmp_path / f"{i}.pt"), **spec}
            proc.proc.stdin.write(json.dumps({**plan, "me": me}) + "\n")
            proc.proc.stdin.flush()
        for proc, spec in zip(procs, specs, strict=True):
            if spec.get("stall"):
                proc.expect("STALLED")
                proc.kill()  # SIGKILL after it joined the group, before it sent anything
        results = {}
        for i, (proc, spec) in enumerate(zip(procs, specs, strict=True)):
            if not spec.get("stall") and spec.get("attack") != "silent":
                results[i] = json.loads(proc.expect("RESULT", timeout=timeout + 30))
                results[i]["tensor"] = torch.load(tmp_path / f"{i}.pt")
        return members, results
    finally:
        for proc in procs:
            proc.close()


def exact_mean(members: list[dict], indices: list[int], weights: list[float], numel: int = NUMEL) -> torch.Tensor:
    """The weighted mean of the peers `indices`, summed in peer-id order as the reducers do."""
    order = sorted(range(len(indices)), key=lambda k: PeerID.from_string(members[indices[k]]["id"]).raw)
    inputs = [seeded_data(indices[k], numel) for k in order]
    return weighted_mean(inputs, [weights[k] for k in order], out=torch.empty(numel))


@pytest.mark.parametrize("n_peers", [2, 3, 4])
def test_every_peer_gets_the_exact_weighted_mean_with_none(tmp_path, n_peers):
    weights = [1.0 + i for i in range(n_peers)]
    members, results = average_in_processes(tmp_path, [{"weight": w} for w in weights], "none")
    expected = exact_mean(members, list(range(n_peers)), weights)
    for r in results.values():
        assert r["failed_parts"] == []
        assert torch.equal(r["tensor"], expected)


@pytest.mark.parametrize("codec", ["fp16", "bf16", "int8", "int4"])
def test_lossy_codecs_stay_within_their_quantization_error(tmp_path, codec):
    members, results = average_in_processes(tmp_path, [{"weight": 1.0}, {"weight": 3.0}, {"weight": 2.0}], codec)
    expected = exact_mean(members, [0, 1, 2], [1.0, 3.0, 2.0])
    tensors = [r["tensor"] for r in results.values()]
    assert all(torch.equal(tensors[0], t) for t in tensors)  # everyone decodes the same mean
    error = float((tensors[0] - expected).abs().max())
    assert 0 < error <= TOLERANCE[codec]


def test_uneven_bandwidths_give_uneven_parts(tmp_path):
    members, results = average_in_processes(tmp_path, [{"bandwidth": 1.0}, {"bandwidth": 3.0}], "none")
    group = GroupInfo(b"x", tuple(_member(m) for m in members))
    lengths = [e - s for s, e in results[0]["spans"]]
    for reducer, length in zip(group.reducers, lengths, strict=True):
        assert length == pytest.approx(NUMEL * reducer.bandwidth / 4, rel=0.01)
    assert torch.equal(results[0]["tensor"], results[1]["tensor"])


def test_client_and_auxiliary_peers(tmp_path):
    specs = [{"weight": 1.0}, {"weight": 2.0, "mode": "CLIENT"}, {"mode": "AUX"}]
    members, results = average_in_processes(tmp_path, specs, "none")
    expected = exact_mean(members, [0, 1], [1.0, 2.0])  # the auxiliary peer's data is not averaged in
    assert len(results[0]["spans"]) == 2  # the client reduces nothing
    for i in (0, 1):
        assert results[i]["failed_parts"] == []
        assert torch.equal(results[i]["tensor"], expected)


def test_peer_killed_mid_round_leaves_the_mean_of_survivors(tmp_path):
    specs = [{"weight": 1.0}, {"weight": 2.0}, {"weight": 1.0, "stall": True}, {"weight": 3.0}]
    members, results = average_in_processes(tmp_path, specs, "none", timeout=30, sender_timeout=2)
    group = GroupInfo(b"x", tuple(_member(m) for m in members))
    dead_id = members[2]["id"]
    dead_part = next(i for i, r in enumerate(group.reducers) if str(r.peer_id) == dead_id)
    survivors_mean = exact_mean(members, [0, 1, 3], [1.0, 2.0, 3.0])
    for i, r in results.items():
        assert r["failed_parts"] == [dead_part]
        start, end = r["spans"][dead_part]
        local = seeded_data(i, NUMEL)
        assert torch.equal(r["tensor"][start:end], local[start:end])  # the dead reducer's part stays local
        keep = torch.ones(NUMEL, dtype=torch.bool)
        keep[start:end] = False
        assert torch.equal(r["tensor"][keep], survivors_mean[keep])


def _member(m: dict) -> GroupMember:
    return GroupMember(PeerID.from_string(m["id"]), m["address"], m["bandwidth"], Mode[m["mode"]])


def test_fifty_rounds_without_memory_growth():
    peers = [Peer() for _ in range(3)]
    services = [AllReduceService(p) for p in peers]
    codec = get_codec("int8")
    flats = [torch.randn(50_000, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    residuals = [torch.zeros(50_000) for _ in range(3)]

    async def one_round():
        group = GroupInfo(os.urandom(8), tuple(GroupMember(p.peer_id, str(p.address)) for p in peers))
        return await asyncio.gather(
            *[
                run_allreduce(s, group, f, codec, residual=r, timeout=30)
                for s, f, r in zip(services, flats, residuals, strict=True)
            ]
        )

    try:
        for _ in range(5):
            peers[0].runtime.run(one_round(), 60)
        rss_before = psutil.Process().memory_info().rss
        for _ in range(50):
            results = peers[0].runtime.run(one_round(), 60)
            assert all(r.failed_parts == [] for r in results)
        growth = psutil.Process().memory_info().rss - rss_before
        assert growth < 32 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 50 rounds"
        assert all(not s._rounds and not s._waiters for s in services)
        assert all(torch.equal(flats[0], f) for f in flats)
    finally:
        for p in peers:
            p.shutdown()


def round_in_process(peers, services, flats, codec, timeout: float = 60.0, bandwidths=None, **options) -> list:
    """One run_allreduce round of in-process `peers` (every one a member, with `bandwidths`), each averaging a copy
    of its flat, on the first peer's runtime: every peer's result."""
    bandwidths = bandwidths or [1.0] * len(peers)
    members = tuple(GroupMember(p.peer_id, str(p.address), b) for p, b in zip(peers, bandwidths, strict=True))
    group = GroupInfo(os.urandom(8), members)

    async def one_round():
        return await asyncio.gather(
            *[
                run_allreduce(s, group, f.clone(), codec, timeout=timeout, **options)
                for s, f in zip(services, flats, strict=True)
            ]
        )

    return peers[0].runtime.run(one_round(), timeout + 60)


def test_a_verified_round_of_eight_reuses_every_buffer_it_made_in_the_rounds_before():
    # A layout per part (8 parts, plus our own part's and the reduction's) overflowed the cache: every round made
    # every buffer again, and paid for it in page faults (about 8 ms of CPU per peer in a verified round of 2.5M
    # values).
    peers = [Peer() for _ in range(8)]
    services = [AllReduceService(p) for p in peers]
    codec, numel = get_codec("int8"), 8 * 8192
    flats = [torch.randn(numel, generator=torch.Generator().manual_seed(i)) for i in range(8)]

    try:
        made = []
        for _ in range(4):
            results = round_in_process(peers, services, flats, codec, sender_timeout=30, verify=True)
            assert all(r.failed_parts == [] and len(r.spans) == 8 for r in results)
            made.append([s.buffers.made + s.send_buffers.made for s in services])
        assert made[2] == made[1] == made[3]  # two sets per layout (GENERATIONS), made in the first two rounds
    finally:
        for p in peers:
            p.shutdown()


def test_a_buffer_too_small_to_split_keeps_averaging_when_another_member_reduces_it():
    # One part, reduced by the fastest member: the same span, owned by another part index, once got the buffers
    # cached for the first one's index (none for its own), and failed.
    peers = [Peer() for _ in range(3)]
    services = [AllReduceService(p) for p in peers]
    codec, numel = get_codec("int8"), 1000
    flats = [torch.randn(numel, generator=torch.Generator().manual_seed(i)) for i in range(3)]

    try:
        for fastest in (0, 0, 1, 1, 2):
            bandwidths = [2.0 if i == fastest else 1.0 for i in range(3)]
            results = round_in_process(peers, services, flats, codec, timeout=30, bandwidths=bandwidths)
            assert all(r.failed_parts == [] for r in results)
            assert sum(end > start for start, end in results[0].spans) == 1
    finally:
        for p in peers:
            p.shutdown()


def test_part_spans_follow_bandwidth_and_alignment():
    spans = part_spans(1000, [1, 1, 2], align=64)
    assert spans[0][0] == 0 and spans[-1][1] == 1000
    assert all(s % 64 == 0 for s, _ in spans)
    assert [e - s for s, e in spans] == [256, 256, 488]
    assert part_spans(10, [1, 1, 1, 1], align=64) == [(0, 0), (0, 0), (0, 0), (0, 10)]


def _round_time(shares, bandwidths, senders):
    """The traffic model's slowest peer (every reducer also sends)."""
    return max((1 + x * (senders - 2)) / b for x, b in zip(shares, bandwidths, strict=True))


@pytest.mark.parametrize("bandwidths", [[1, 1, 1, 10], [1, 2, 4, 8], [0.5, 1, 1, 1, 5], [3, 3, 3]])
def test_balanced_shares_beat_a_proportional_split_when_bandwidths_are_uneven(bandwidths):
    from hiveengine.averaging import balanced_shares

    n = len(bandwidths)
    shares = balanced_shares(bandwidths, [True] * n, n)
    proportional = [b / sum(bandwidths) for b in bandwidths]
    assert sum(shares) == pytest.approx(1.0)
    assert _round_time(shares, bandwidths, n) <= _round_time(proportional, bandwidths, n) + 1e-9
    if len(set(bandwidths)) == 1:
        assert shares == pytest.approx(proportional)
    # No split does better (checked against a fine grid of alternatives for 3-4 peers).
    if n <= 4:
        grid = [i / 40 for i in range(41)]
        best = min(
            _round_time([*xs, 1 - sum(xs)], bandwidths, n)
            for xs in itertools.product(grid, repeat=n - 1)
            if sum(xs) <= 1
        )
        assert _round_time(shares, bandwidths, n) <= best + 1e-9
    assert balanced_shares([1, 1, 1, 10], [True] * 4, 4) == pytest.approx([0, 0, 0, 1])
