"""Verified reducers: a reducer whose reply is not the aggregate of the copies it was sent is caught by every
sender, its part fails for that round (the senders keep their values) and it is banned from later rounds; honest
rounds with every codec (lossy ones included, and CenteredClip clipping a hostile copy) are never accused.

Real peer processes over UCX on 127.0.0.1 (tests/peers/allreduce_peer.py, attacks in
tests/peers/byzantine_attacks.py), plus unit checks of the claim a reply carries.
"""

from __future__ import annotations

import pytest
import torch

from hiveengine.averaging.verification import (
    Claim,
    ReducerCheatedError,
    check_reply,
    probe,
    project_and_norm,
    reply_digest,
)
from hiveengine.codec import get_codec
from tests.peers.allreduce_peer import seeded_data
from tests.test_allreduce import NUMEL, TOLERANCE, average_in_processes, exact_mean
from tests.test_byzantine import HONEST, part_of

pytestmark = pytest.mark.timeout(180)


def _outside(part_span: list[int]) -> torch.Tensor:
    keep = torch.ones(NUMEL, dtype=torch.bool)
    keep[part_span[0] : part_span[1]] = False
    return keep


@pytest.mark.parametrize("codec", ["none", "int8"])
def test_a_garbage_reducer_is_caught_its_part_failed_and_it_is_banned_next_round(tmp_path, codec):
    specs = [{}, {}, {}, {"attack": "garbage_reducer"}]
    members, results = average_in_processes(
        tmp_path, specs, codec, timeout=30, sender_timeout=10, late_grace=5, aggregation="centered_clip", rounds=2
    )
    cheat = part_of(members, 3)
    everyone = exact_mean(members, [0, 1, 2, 3], [1.0] * 4)  # round 0: its copies are honest, its reply is not
    honest = exact_mean(members, HONEST, [1.0] * 3)  # round 1: banned, its copies are refused
    for i in HONEST:
        span = results[i]["spans"][cheat]
        keep = _outside(span)
        local = seeded_data(i, NUMEL)
        assert results[i]["banned"] == [members[3]["id"]]
        assert results[i]["accused"] == [members[3]["id"]]  # with signed evidence that others can check
        for number, expected in enumerate((everyone, honest)):
            outcome, tensor = results[i]["rounds"][number], torch.load(tmp_path / f"{i}.pt.{number}")
            assert outcome["failed_parts"] == [cheat], (number, outcome)
            assert torch.equal(tensor[span[0] : span[1]], local[span[0] : span[1]])  # kept, never the garbage
            assert float((tensor[keep] - expected[keep]).abs().max()) <= TOLERANCE[codec]
        # Round 1 waits for nobody: the banned peer is neither sent to nor waited for.
        assert results[i]["rounds"][1]["s"] < 4, results[i]["rounds"]
    assert results[3]["banned"] == results[3]["accused"] == []  # honest reducers pass its checks


@pytest.mark.parametrize(
    ("codec", "aggregation", "attack", "trusting"),
    [
        ("none", "mean", None, False),
        ("fp16", "centered_clip", "scale", False),
        ("bf16", "centered_clip", None, False),
        ("int8", "centered_clip", "scale", False),
        ("int8", "mean", None, True),
        ("int4", "mean", None, False),
        ("int4", "centered_clip", "scale", False),
    ],
)
def test_honest_reducers_are_never_accused(tmp_path, codec, aggregation, attack, trusting):
    # A x1000 sender makes CenteredClip clip (its reply is then a combination the reducer reports the
    # coefficients of); lossy codecs requantize the aggregate: neither may look like cheating. `trusting`: two
    # peers do not verify (a trusted configuration), yet answer the others' requests for claims.
    specs = [{"weight": 1.0, "verify": not trusting}, {"weight": 3.0, "verify": not trusting}, {"weight": 2.0}]
    specs.append({"attack": attack})
    _, results = average_in_processes(tmp_path, specs, codec, aggregation=aggregation, rounds=3)
    for r in results.values():
        assert r["banned"] == r["accused"] == []
        assert all(outcome["failed_parts"] == [] for outcome in r["rounds"]), r["rounds"]


def _honest_reply(codec_name: str, seed: int, senders: int = 4, numel: int = 5000):
    """Copies, the reply a reducer makes of them and its claim, as allreduce.py computes them."""
    codec = get_codec(codec_name)
    generator = torch.Generator().manual_seed(seed)
    copies = [codec.encode(torch.randn(numel, generator=generator)) for _ in range(senders)]
    coefficients: list[float] = []
    out = torch.empty(numel)
    reply = codec.reduce(copies, [1.0, 2.0, 1.0, 3.0][:senders], out, requantize=True, coefficients=coefficients)
    reply = [t.clone() for t in reply]
    r = probe(b"group", 0, 0, reply_digest(reply), numel)
    decoded = [codec.decode(c, torch.empty(numel)) for c in copies]
    claim = Claim(coefficients, [project_and_norm(x, r)[0] for x in decoded])
    return codec, copies, decoded, reply, claim, r


@pytest.mark.parametrize("codec_name", ["none", "fp16", "bf16", "int8", "int4"])
def test_the_check_passes_honest_replies_and_fails_tampered_ones(codec_name):
    caught = caught_garbage = 0
    for seed in range(40):
        codec, _, decoded, reply, claim, r = _honest_reply(codec_name, seed)
        aggregate = codec.decode(reply, torch.empty(decoded[0].numel()))
        mine = decoded[1]
        args = (project_and_norm(mine, r)[0], float(mine.norm()), aggregate, codec.error_bound(reply), r)
        check_reply(claim, 1, 2.0, *args)  # honest: never refused
        # A deviation 200x the codec's own error bound (a few quantization steps on every value at int4), or
        # 10% of the aggregate's norm where the codec is (nearly) exact: its projection falls inside the
        # tolerance with a chance of about 8 / 200 / 2.5 = 1.6% (the scheme's stated miss rate at that size).
        deviation = torch.randn(aggregate.numel(), generator=torch.Generator().manual_seed(-seed))
        size = max(200 * 8 * codec.error_bound(reply), 0.1 * float(aggregate.norm()))
        try:
            check_reply(claim, 1, 2.0, args[0], args[1], aggregate + deviation * (size / deviation.norm()), *args[3:])
        except ReducerCheatedError as e:
            assert "not the combination" in str(e)
            caught += 1
        # Garbage: its projection lands inside the band with a chance of about 8 * error / ||garbage||: ~1e-3 at int4
        # (whose error bound is a quarter of the aggregate's norm here), ~1e-5 and less for the others.
        garbage = torch.randn(aggregate.numel(), generator=torch.Generator().manual_seed(seed)) * 1000
        try:
            check_reply(claim, 1, 2.0, args[0], args[1], garbage, *args[3:])
        except ReducerCheatedError as e:
            assert "not the combination" in str(e)
            caught_garbage += 1
        lie = Claim(claim.coefficients, [*claim.projections[:1], claim.projections[1] + 1.0, *claim.projections[2:]])
        with pytest.raises(ReducerCheatedError, match="misreports our own copy"):
            check_reply(lie, 1, 2.0, *args)
        left_out = Claim([0.0, 0.0, 0.5, 0.5], claim.projections)
        with pytest.raises(ReducerCheatedError, match="includes our copy"):
            check_reply(left_out, 1, 2.0, *args)
    assert caught >= 37, caught
    assert caught_garbage >= 38, caught_garbage


@pytest.mark.parametrize(
    "header",
    [{}, {"k": [0.5, 0.5], "t": [1.0]}, {"k": [0.5, float("nan")], "t": [1.0, 2.0]}, {"k": ["a", 1], "t": [1, 2]}],
)
def test_a_malformed_claim_is_refused(header):
    with pytest.raises(ReducerCheatedError):
        Claim.parse(header, 2)
