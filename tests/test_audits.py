"""Contribution audits (hiveengine.averaging.audits): a reducer that recomputes what a sender should have sent
catches a copy with the right norm but the wrong content (a flipped sign, an ALIE-style shift) and bans its sender
(left out of the round when its recomputation was done by the reduction, which never waits for one, else checked
once it is done, after the round returned); honest copies pass with every codec, error feedback included; a failing
or slow audit function convicts nobody.

Real peer processes over UCX on 127.0.0.1 (tests/peers/allreduce_peer.py, whose members' data is public: member i
averages seeded_data(i)), plus checks of one round's audits on fresh random data.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import os
import threading

import numpy as np
import pytest
import torch

from hiveengine.averaging import AllReduceService, GroupInfo, GroupMember, Mode, RoundOptions, run_allreduce
from hiveengine.averaging.allreduce import chunk_spans
from hiveengine.averaging.audits import AUDIT_BOOST, AUDIT_BOOST_ROUNDS, Audits, ClaimedCopy, auditor_rate
from hiveengine.averaging.verification import Probes
from hiveengine.codec import get_codec
from hiveengine.errors import ConfigurationError
from hiveengine.transport import Peer, PeerID
from tests.test_allreduce import TOLERANCE, average_in_processes, exact_mean, round_in_process
from tests.test_byzantine import HONEST, part_of

pytestmark = pytest.mark.timeout(180)
N = 4096


def _ids(count: int) -> list[PeerID]:
    return [PeerID(os.urandom(32)) for _ in range(count)]


def _recomputing(expected: dict):
    """An audit function whose recomputations return `expected[sender]` (None: cannot tell)."""
    return lambda sender: lambda: expected.get(sender)


def _held_back(truth: dict, release: threading.Event):
    """An audit function whose recomputations return `truth[sender]` once `release` is set."""

    def audit(sender):
        def recomputation():
            release.wait(30)
            return truth[sender]

        return recomputation

    return audit


def _check(codec_name: str, sent: dict, expected: dict, rate: float = 1.0, audit=None, timeout: float = 5.0):
    """One round's audits of `sent` (sender -> the flat tensor it encodes, with error feedback from a residual it
    carried over) against `expected` (what each should send): each sender's verdict. The recomputations run in a
    worker of their own, which the event loop does not wait for when it closes (a stalled one holds it)."""
    codec = get_codec(codec_name)
    worker = concurrent.futures.ThreadPoolExecutor(1)

    async def run() -> dict:
        audits = Audits(audit or _recomputing(expected), rate, 0.1, list(sent), codec, timeout, worker=worker)
        await audits.settle()  # nothing held yet: it only waits for the recomputations (up to `timeout`)
        row = torch.empty(N)
        verdicts = {}
        for sender, (flat, residual) in sent.items():
            payload = codec.encode(flat.clone(), residual if codec.supports_error_feedback else None, name="copy")
            verdicts[sender] = audits.check(sender, payload, (0, N), row)
        assert verdicts == {s: audits.failed.get(s) for s in sent}
        return verdicts

    return asyncio.run(run())


def _carried(codec_name: str, flat: torch.Tensor) -> torch.Tensor:
    """The residual that error feedback carries into this round after one round of data like `flat`."""
    codec = get_codec(codec_name)
    residual = torch.zeros_like(flat)
    if codec.supports_error_feedback:
        codec.encode(torch.randn_like(flat) * flat.norm() / math.sqrt(flat.numel()), residual, name="last round")
    return residual


@pytest.mark.parametrize("codec", ["none", "fp16", "bf16", "int8", "int4"])
def test_honest_copies_pass_and_lies_of_the_right_size_fail(codec):
    honest, flipped, shifted = _ids(3)
    expected = {p: torch.randn(N) for p in (honest, flipped, shifted)}
    # An ALIE copy: the mean minus about one standard deviation per coordinate (bench/byzantine.py's lay 1.04-1.2
    # times the gradient's norm away; int4's rounding alone, twice, is about 0.5 times the norm of such data).
    spread = 0.5 + torch.rand(N)
    sent = {
        honest: (expected[honest], _carried(codec, expected[honest])),
        flipped: (-expected[flipped], _carried(codec, expected[flipped])),
        shifted: (expected[shifted] - spread, _carried(codec, expected[shifted])),
    }
    verdicts = _check(codec, sent, expected)
    assert verdicts[honest] is None
    assert "from what it should have sent" in verdicts[flipped]
    assert verdicts[shifted] is not None


def _claimed_verdict(codec_name: str, expected: torch.Tensor, copy: torch.Tensor, chunks: int = 4) -> str | None:
    """The audit of a reducer whose own `copy` (encoded with error feedback) its claims report, chunk by chunk, on
    each chunk's own probes, against the `expected` contribution."""
    codec, (reducer,) = get_codec(codec_name), _ids(1)
    residual = _carried(codec_name, expected) if codec.supports_error_feedback else None
    decoded = codec.decode(codec.encode(copy.clone(), residual, name="copy"), torch.empty(N))

    async def run() -> str | None:
        audits = Audits(lambda _: lambda: expected, 1.0, 0.1, [reducer], codec, 5.0)
        for index, (start, end) in enumerate(chunk_spans(0, N, N // chunks)):
            probes = Probes(os.urandom(8), 0, index, os.urandom(32), end - start, np.array([0.5, 0.5]))
            (projections,), _ = probes.project(decoded[start:end].view(1, -1))
            audits.hold_claim(reducer, ClaimedCopy(probes, (start, end), projections))
        return (await audits.settle()).get(reducer)

    return asyncio.run(run())


@pytest.mark.parametrize("codec", ["none", "fp16", "bf16", "int8", "int4"])
def test_a_reducers_own_copy_seen_only_through_its_claims_passes_when_honest_and_fails_when_it_lies(codec):
    # The projections of a copy on a reply's probes tell a lie only beyond their chi-square band: about 10 times the
    # allowance (rounding and audit_tolerance), which an ALIE shift (about the contribution's norm) clears with int8
    # and finer; int4's rounding is up to a quarter of the norm, so there only a grosser lie shows.
    expected = torch.randn(N)
    assert _claimed_verdict(codec, expected, expected) is None
    lies = [-3 * expected] if codec == "int4" else [-expected, expected - (0.5 + torch.rand(N))]
    for lie in lies:
        assert "from what it should have sent on the reply's probes" in _claimed_verdict(codec, expected, lie)


@pytest.mark.parametrize(("codec_name", "drop"), [("int8", 30), ("int4", 10)])
def test_an_honest_chunk_whose_gradient_shrank_still_carries_last_rounds_rounding_and_passes(codec_name, drop):
    # The audited chunk (the second half of the contribution: an embedding row, say) had a full-size gradient last
    # round and `drop` times less this round; its copy carries last round's rounding, which convicted it (int8 at
    # 30x: distance 2.02, allowed 1.09). A lie of the chunk's former size still fails.
    codec, sender = get_codec(codec_name), _ids(1)[0]
    last, now = torch.randn(2 * N), torch.randn(2 * N)
    now[N:] /= drop
    carried = torch.zeros(2 * N)
    codec.encode(last.clone(), carried, name="last round")

    async def verdict(copy: torch.Tensor) -> str | None:
        audits = Audits(lambda _: lambda: now, 1.0, 0.1, [sender], codec, 5.0)
        await audits.settle()
        return audits.check(sender, codec.encode(copy), (N, 2 * N), torch.empty(N))

    assert asyncio.run(verdict(now[N:] + carried[N:])) is None  # what error feedback has it encode this round
    assert asyncio.run(verdict(now[N:] + last[N:])) is not None


def test_nobody_is_convicted_by_an_audit_that_fails_is_slow_or_cannot_tell():
    broken, unprepared, slow, unknown, odd, uncallable, nonfinite = _ids(7)
    release = threading.Event()

    def recompute(sender):
        if sender == broken:
            raise RuntimeError("the user's recomputation failed")
        if sender == odd:
            return [1.0, 2.0]  # not a tensor
        return torch.full((N,), math.nan)  # `nonfinite`

    def audit(sender):
        if sender == unprepared:
            raise RuntimeError("the user's audit function failed")
        if sender == uncallable:
            return torch.zeros(N)  # a contribution, not the function that recomputes it
        if sender == unknown:
            return None  # cannot tell
        return lambda: recompute(sender)

    lies = {
        p: (torch.randn(N) * 100, torch.zeros(N)) for p in (broken, unprepared, unknown, odd, uncallable, nonfinite)
    }
    assert _check("int8", lies, {}, audit=audit) == dict.fromkeys(lies)

    def stalled(sender):
        def recomputation():
            release.wait(30)
            return torch.zeros(N)

        return recomputation

    try:  # an audit still running when the round settles: its sender goes unaudited this round
        assert _check("int8", {slow: lies[broken]}, {}, audit=stalled, timeout=0.05) == {slow: None}
    finally:
        release.set()


def test_a_copy_reduced_before_its_audit_finished_is_convicted_when_the_round_settles():
    # The reduction never waits for a recomputation (a wait told a timing sender whether it was watched): the copy
    # is held, and checked once the recomputation is done.
    codec = get_codec("int8")
    liar, honest = _ids(2)
    truth = {p: torch.randn(N) for p in (liar, honest)}
    release = threading.Event()

    audit = _held_back(truth, release)

    async def run() -> tuple:
        audits = Audits(audit, 1.0, 0.1, [liar, honest], codec, 30.0)
        row = torch.empty(N)
        lie = [t.clone() for t in codec.encode(-truth[liar], name="lie")]
        now = [audits.check(liar, lie, (0, N), row), audits.check(honest, codec.encode(truth[honest]), (0, N), row)]
        for t in lie:  # the reducer's buffer, reused next round: the held copy is the reducer's own
            t.zero_()
        release.set()
        return now, await audits.settle(), audits.failed

    now, settled, failed = asyncio.run(run())
    assert now == [None, None]  # reduced at once, with the copies in
    assert set(settled) == {liar} and set(failed) == {liar} and "lies" in settled[liar]


def test_the_audit_function_prepares_before_the_round_returns_and_its_recomputation_runs_later():
    # The round does not wait for a recomputation, so the caller may step its model before it runs: the audit
    # function runs while the round does (run_allreduce waits for it before it returns: `prepared`), to take what
    # the recomputation will read, which then runs in the worker thread.
    codec, (sender,) = get_codec("int8"), _ids(1)
    model = torch.randn(N)  # what the sender used this round; the caller steps it once the round is over
    release, prepared, called_in = threading.Event(), [], []

    def audit(who):
        prepared.append((who, threading.current_thread()))
        snapshot = model.clone()

        def recomputation():
            called_in.append(threading.current_thread())
            release.wait(30)
            return snapshot

        return recomputation

    async def run() -> dict:
        audits = Audits(audit, 1.0, 0.1, [sender], codec, 30.0)
        assert audits.check(sender, [t.clone() for t in codec.encode(model)], (0, N), torch.empty(N)) is None
        await audits.prepared
        audits.abandon()  # what run_allreduce does then: nothing, as the audit function is done
        model.add_(1.0)  # the round returned and the caller stepped
        release.set()
        return await audits.settle()

    assert asyncio.run(run()) == {}  # the honest copy is judged by the model it was made from
    assert [who for who, _ in prepared] == [sender]
    assert {prepared[0][1], *called_in} & {threading.main_thread()} == set()  # neither ran on the event loop


def test_audits_whose_function_was_not_done_preparing_when_the_round_returned_convict_nobody():
    # What the audit function took after the round returned may be the caller's next model, not the sender's.
    codec, (liar,) = get_codec("int8"), _ids(1)
    truth, release = torch.randn(N), threading.Event()

    def audit(sender):
        release.wait(30)
        return lambda: truth

    async def run() -> tuple:
        audits = Audits(audit, 1.0, 0.1, [liar], codec, 30.0)
        lie = [t.clone() for t in codec.encode(-truth)]
        held = audits.check(liar, lie, (0, N), torch.empty(N))
        audits.abandon()  # the round's deadline came first
        release.set()
        await audits.recomputation
        return held, audits.check(liar, lie, (0, N), torch.empty(N)), await audits.settle()

    try:
        assert asyncio.run(run()) == (None, None, {})
    finally:
        release.set()


def test_a_sender_banned_while_a_round_is_open_is_not_waited_for():
    # A background audit can convict a sender of an earlier round while the next one is open: its copies are
    # refused from then on, so the round must not wait for them (with these waits, it would for 300 s).
    peers = [Peer() for _ in range(3)]
    services = [AllReduceService(p) for p in peers]
    codec, numel = get_codec("int8"), 2 * N
    flats = [torch.randn(numel, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    members = [GroupMember(p.peer_id, str(p.address)) for p in peers[:2]]
    members.append(GroupMember(peers[2].peer_id, str(peers[2].address), mode=Mode.CLIENT))  # it never sends
    group = GroupInfo(os.urandom(8), tuple(members))

    async def round_with_a_ban() -> list:
        rounds = [
            asyncio.ensure_future(
                run_allreduce(s, group, f.clone(), codec, timeout=600, sender_timeout=300, late_grace=300)
            )
            for s, f in zip(services[:2], flats, strict=True)
        ]
        for s in services[:2]:  # after both rounds opened (callbacks run in the order they were scheduled)
            asyncio.get_running_loop().call_soon(s.ban, peers[2].peer_id, "it failed an audit in an earlier round")
        return await asyncio.gather(*rounds)

    try:
        results = peers[0].runtime.run(round_with_a_ban(), 60)
        assert all(r.failed_parts == [] and r.senders_averaged == 2 for r in results)
    finally:
        for p in peers:
            p.shutdown()


def test_a_round_returns_before_its_audits_and_their_bans_and_a_harder_look_follow_once_they_end():
    # No round waits for a recomputation: one that did held every member's next step for a gradient's worth of
    # compute. Here every recomputation waits for the test, which lets them go once every round has returned.
    peers = [Peer() for _ in range(3)]
    services = [AllReduceService(p) for p in peers]
    codec, numel = get_codec("int8"), 3 * N  # three parts, so that every peer reduces one and audits the others
    flats = [torch.randn(numel, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    liar = peers[2].peer_id  # it sends its data, where it should have sent the opposite
    truth = {p.peer_id: -flats[i] if p.peer_id == liar else flats[i] for i, p in enumerate(peers)}
    release = threading.Event()

    audit = _held_back(truth, release)

    try:
        results = round_in_process(peers, services, flats, codec, timeout=30, audit=audit, audit_rate=1.0)
        assert all(r.failed_parts == [] for r in results)
        assert not any(s.banned for s in services)  # every recomputation still waits
        release.set()
        for s in services:
            peers[0].runtime.run(s.audits_settled(), 60)
        assert [list(s.banned) for s in services] == [[liar], [liar], []]
        # A cheat rarely comes alone: the reducers that caught one audit AUDIT_BOOST times harder for a while.
        assert [s.audit_boost for s in services] == [AUDIT_BOOST_ROUNDS, AUDIT_BOOST_ROUNDS, 0]
        rates = [services[0].audit_rate(0.02) for _ in range(AUDIT_BOOST_ROUNDS + 1)]
        assert rates == [AUDIT_BOOST * 0.02] * AUDIT_BOOST_ROUNDS + [0.02] and services[2].audit_rate(0.02) == 0.02
    finally:
        release.set()
        for p in peers:
            p.shutdown()


def test_a_non_finite_copy_from_an_audited_sender_is_left_to_the_reduction_without_a_ban():
    codec = get_codec("int8")
    (sender,) = _ids(1)
    payload = [t.clone() for t in codec.encode(torch.randn(N), name="copy")]
    payload[1][0] = math.nan  # a hostile scale: decoding it would raise NonFiniteError inside the reduction

    async def run() -> tuple:
        audits = Audits(lambda _: lambda: torch.randn(N), 1.0, 0.1, [sender], codec, 5.0)
        await audits.settle()
        return audits.check(sender, payload, (0, N), torch.empty(N)), audits.failed

    assert asyncio.run(run()) == (None, {})


def test_a_rate_of_zero_audits_nobody_and_one_audits_everyone():
    senders = _ids(8)
    called = []

    def audit(sender):
        called.append(sender)
        return lambda: torch.zeros(N)

    lies = {p: (torch.randn(N), torch.zeros(N)) for p in senders}
    assert _check("none", lies, {}, rate=0.0, audit=audit) == dict.fromkeys(senders)
    assert called == []
    assert all(_check("none", lies, {}, rate=1.0, audit=audit).values())
    assert sorted(called, key=str) == sorted(senders, key=str)  # once each


def test_the_reducers_split_the_draws_so_a_sender_is_audited_at_the_rate_at_any_group_size():
    senders, parts, rate = _ids(4000), 8, 0.1

    async def draws() -> list[frozenset]:
        rounds = [Audits(lambda _: None, rate, 0.1, senders, get_codec("none"), 5.0, parts) for _ in range(parts)]
        await asyncio.gather(*(a.settle() for a in rounds))
        return [a.drawn for a in rounds]

    drawn = asyncio.run(draws())
    audited = frozenset().union(*drawn)
    assert abs(len(audited) / len(senders) - rate) < 0.03  # 6 standard deviations
    per_reducer = auditor_rate(rate, parts)  # 1.3%: what each reducer recomputes, not 10% of its senders
    assert abs(1 - (1 - per_reducer) ** parts - rate) < 1e-12
    assert all(abs(len(d) / len(senders) - per_reducer) < 0.012 for d in drawn)
    assert auditor_rate(1.0, parts) == 1.0 and auditor_rate(0.0, parts) == 0.0 and auditor_rate(rate, 1) == rate


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("audit_rate", 1.5),
        ("audit_rate", -0.1),
        ("audit_rate", "half"),
        ("audit_tolerance", -1.0),
        ("audit_tolerance", math.nan),
        ("audit_tolerance", math.inf),
        ("audit_timeout", 0.0),
        ("audit_timeout", -1.0),
        ("audit_timeout", math.inf),
    ],
)
def test_round_options_refuse_audit_settings_out_of_range(field, value):
    with pytest.raises(ConfigurationError, match=field):
        RoundOptions(**{field: value})


@pytest.mark.parametrize("codec", ["int8", "none"])
def test_a_sender_that_flips_its_sign_is_banned_by_every_honest_reducer_and_then_left_out(tmp_path, codec):
    specs = [{}, {}, {}, {"attack": "sign"}]
    members, results = average_in_processes(
        tmp_path,
        specs,
        codec,
        timeout=30,
        sender_timeout=10,
        late_grace=5,
        aggregation="centered_clip",
        rounds=2,
        audit_rate=1.0,
    )
    liar = part_of(members, 3)
    honest = exact_mean(members, HONEST, [1.0] * 3)
    others = sorted(p for p in range(4) if p != liar)
    for i in HONEST:
        assert results[i]["banned"] == [members[3]["id"]]  # no honest peer is convicted
        # Round 0: the liar reduces its own part (its own copy is caught through its claims), and it is honest as a
        # reducer; its copies are caught when reduced or when the round settles (so they may have joined round 0's
        # aggregates).
        assert results[i]["rounds"][0]["failed_parts"] == []
        # Round 1: it is banned, so nobody sends to it and its part stays local, and the honest reducers averaged
        # the honest copies alone.
        assert results[i]["rounds"][1]["failed_parts"] == [liar]
        tensor = torch.load(tmp_path / f"{i}.pt.1")
        for part, (start, end) in enumerate(results[i]["spans"]):
            if part != liar:
                assert float((tensor[start:end] - honest[start:end]).abs().max()) <= TOLERANCE[codec], part
    # Every honest reducer refused the liar's copies in round 1.
    assert set(results[3]["rounds"][1]["failed_parts"]) >= set(others)
    assert results[3]["banned"] == []


def test_honest_rounds_with_every_sender_audited_ban_nobody(tmp_path):
    specs = [{}, {}, {}]
    members, results = average_in_processes(tmp_path, specs, "int4", aggregation="centered_clip", audit_rate=1.0)
    expected = exact_mean(members, [0, 1, 2], [1.0] * 3)
    for i in range(3):
        assert results[i]["banned"] == [] and results[i]["failed_parts"] == []
        tensor = torch.load(tmp_path / f"{i}.pt")
        assert float((tensor - expected).abs().max()) <= TOLERANCE["int4"]


def test_a_reducer_whose_own_copy_lies_is_banned_by_the_senders_that_audit_it_through_its_claims(tmp_path):
    # The only reducer flips the sign of its own copy: nobody else reduces, so only its signed claims, which report
    # the projections of every copy it averaged, its own included, show what it sent itself.
    specs = [{"attack": "sign"}, {"mode": "CLIENT"}, {"mode": "CLIENT"}, {"mode": "CLIENT"}]
    options = dict(timeout=30, sender_timeout=10, aggregation="centered_clip", rounds=2, audit_rate=1.0)
    members, results = average_in_processes(tmp_path, specs, "int8", **options)
    for i in (1, 2, 3):
        assert results[i]["banned"] == [members[0]["id"]]
        assert results[i]["rounds"][0]["failed_parts"] == []  # its reply adds up: the claim is true to its copy
        assert results[i]["rounds"][1]["failed_parts"] == [0]  # banned: its part stays local from then on
    assert results[0]["banned"] == []


def test_a_reducers_claim_about_another_senders_copy_convicts_nobody(tmp_path):
    # A claim's row about another sender's copy may be the reducer's lie (shown to the others, never to that
    # sender), not the sender's: only the reducer's row about its own copy convicts. Here the only reducer audits
    # nobody and averages a lying sender's copy; the others audit everyone they can, and ban no one.
    specs = [{"audit_rate": 0.0}, {"mode": "CLIENT"}, {"mode": "CLIENT"}, {"mode": "CLIENT", "attack": "sign"}]
    options = dict(timeout=30, sender_timeout=10, aggregation="centered_clip", audit_rate=1.0)
    _, results = average_in_processes(tmp_path, specs, "int8", **options)
    assert all(results[i]["banned"] == [] and results[i]["failed_parts"] == [] for i in range(4))
