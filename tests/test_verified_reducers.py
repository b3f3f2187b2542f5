"""Verified reducers: a reducer whose reply is not the aggregate of the copies it was sent is caught by every
sender, its part fails for that round (the senders keep their values) and it is banned from later rounds; honest
rounds with every codec (lossy ones included, and CenteredClip clipping a hostile copy) are never accused.

Real peer processes over UCX on 127.0.0.1 (tests/peers/allreduce_peer.py, attacks in
tests/peers/byzantine_attacks.py), plus unit checks of the claim a reply carries.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hiveengine.averaging.verification import (
    PROBES,
    Claim,
    Probes,
    ReducerCheatedError,
    check_reply,
    misfit,
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


@pytest.mark.parametrize("codec", ["none", "int8"])
def test_copies_that_cancel_do_not_get_an_honest_mean_reducer_banned(tmp_path, codec):
    # Two colluders send +M v and -M v: at M = 1e10 the fused fp32 mean rounded the honest copies away (misfit 71,
    # tolerance 0.02), and at M = 1e20 so did its float64 recomputation (misfit 51, tolerance 0), and every honest
    # sender banned every honest reducer. Copies over MAX_COPY_RATIO times the median's norm are left out.
    specs = [{}, {"attack": "cancel_up"}, {}, {"attack": "cancel_down"}]
    members, results = average_in_processes(tmp_path, specs, codec, aggregation="mean", timeout=30)
    expected = exact_mean(members, [0, 2], [1.0, 1.0])  # the colluders' copies are left out
    for i in (1, 3):  # their copies are refused (they are told why), and a copy's size alone convicts no one
        assert results[i]["banned"] == [] and results[i]["failed_parts"] != []
    for i in (0, 2):
        assert results[i]["banned"] == [] and results[i]["failed_parts"] == [], results[i]
        error = (torch.load(tmp_path / f"{i}.pt") - expected).abs().max()
        assert float(error) <= (TOLERANCE[codec] if codec != "none" else 1e-5 * float(expected.abs().max()))


def test_coefficients_fitted_to_the_probes_of_a_wrong_reply_are_caught():
    # The probes are keyed by the claimed coefficients too. Keyed by the reply alone, a reducer could fit K > PROBES
    # coefficients to the probes of any reply after seeing them: this reply, 20 error bounds off the mean of 32
    # int8 copies, then passed every sender's check (a red-team script). Fitted to the probes a claim would have
    # had with honest coefficients, the claim now names other probes, and fails them.
    from scipy.optimize import nnls

    codec, senders, numel = get_codec("int8"), 32, 1 << 14
    generator = torch.Generator().manual_seed(7)
    base = torch.randn(numel, generator=generator)
    payloads = [codec.encode(base + torch.randn(numel, generator=generator)) for _ in range(senders)]
    copies = torch.stack([codec.decode(p, torch.empty(numel)) for p in payloads])
    mean = copies.mean(0)
    poison = torch.randn(numel, generator=generator)
    reply = [t.clone() for t in codec.encode(mean + poison * (0.1 * mean.norm() / poison.norm()))]
    replied = codec.decode(reply, torch.empty(numel))
    honest = np.full(senders, 1.0 / senders)
    projections, _ = _probes(reply, numel, honest).project(copies)
    got, _ = _probes(reply, numel, honest).project(replied.view(1, -1))
    floor = 1e-4  # every coefficient positive: every sender's own check wants its copy in
    fit, _ = nnls(
        np.vstack([projections.T, 1e4 * np.ones(senders)]),
        np.concatenate([got[0] - floor * projections.sum(0), [1e4 * (1 - senders * floor)]]),
        maxiter=2000,
    )
    fitted = fit + floor
    assert misfit(got[0], fitted, projections) < 0.1 * misfit(got[0], honest, projections)  # the fit worked there
    claim = Claim(fitted, _probes(reply, numel, fitted).project(copies)[0])  # honest projections on its own probes
    with pytest.raises(ReducerCheatedError, match="not the combination"):
        _check(claim, codec, copies[1], reply, replied)  # as sender 1


def test_a_claim_whose_residuals_square_past_floats_is_a_cheat_not_an_overflow():
    # Residuals of 1.2e154 (numbers under MAX_CLAIM_MAGNITUDE) squared past float64 in math.fsum: an OverflowError
    # failed the part with no ban, and an accusation holding them was never judged.
    codec, decoded, reply, claim = _honest_reply("int8", 3)
    coefficients = np.array(claim.coefficients)
    projections = np.array(claim.projections)
    projections[0, :2] = -1.2e154 / coefficients[0]  # another sender's projections: the checker cannot see them
    with pytest.raises(ReducerCheatedError, match="not the combination"):
        _check(Claim(coefficients, projections), codec, decoded[1], reply)
    assert misfit(np.zeros(PROBES), coefficients, projections) > 1e154


def _honest_reply(codec_name: str, seed: int, senders: int = 4, numel: int = 5000):
    """Copies, the reply a reducer makes of them and its claim, as allreduce.py computes them."""
    codec = get_codec(codec_name)
    generator = torch.Generator().manual_seed(seed)
    copies = [codec.encode(torch.randn(numel, generator=generator)) for _ in range(senders)]
    coefficients: list[float] = []
    out = torch.empty(numel)
    reply = codec.reduce(copies, [1.0, 2.0, 1.0, 3.0][:senders], out, requantize=True, coefficients=coefficients)
    reply = [t.clone() for t in reply]
    decoded = [codec.decode(c, torch.empty(numel)) for c in copies]
    projections, _ = _probes(reply, numel, coefficients).project(torch.stack(decoded))
    return codec, decoded, reply, Claim(coefficients, projections.tolist())


def _probes(reply: list[torch.Tensor], numel: int, coefficients) -> Probes:
    return Probes(b"group", 0, 0, reply_digest(reply), numel, np.asarray(coefficients, dtype=np.float64))


def _check(claim: Claim, codec, mine: torch.Tensor, reply: list[torch.Tensor], replied: torch.Tensor | None = None):
    """check_reply as a sender (index 1, weight 2) runs it on `reply`, decoded (or taken to decode to `replied`)."""
    replied = codec.decode(reply, torch.empty(mine.numel())) if replied is None else replied
    probes = _probes(reply, mine.numel(), claim.coefficients)
    projected = probes.project(torch.stack([mine, replied]))
    check_reply(claim, 1, 2.0, *projected, probes.norm_bound, codec.error_bound(reply))


@pytest.mark.parametrize("codec_name", ["none", "fp16", "bf16", "int8", "int4"])
def test_the_check_passes_honest_replies_and_fails_tampered_ones(codec_name):
    for seed in range(40):
        codec, decoded, reply, claim = _honest_reply(codec_name, seed)
        aggregate = codec.decode(reply, torch.empty(decoded[0].numel()))
        mine = decoded[1]
        _check(claim, codec, mine, reply)  # honest: never refused
        # A deviation 200x the codec's own error bound (a few quantization steps on every value at int4), or 10% of
        # the aggregate's norm where the codec is (nearly) exact, and garbage: far outside the band of all PROBES
        # probes at once (one probe let the deviation through 1.6% of the time, and int4's garbage 1e-3).
        deviation = torch.randn(aggregate.numel(), generator=torch.Generator().manual_seed(-seed))
        size = max(200 * codec.error_bound(reply), 0.1 * float(aggregate.norm()))
        garbage = torch.randn(aggregate.numel(), generator=torch.Generator().manual_seed(seed)) * 1000
        for wrong in (aggregate + deviation * (size / deviation.norm()), garbage):
            with pytest.raises(ReducerCheatedError, match="not the combination"):
                _check(claim, codec, mine, reply, wrong)
        rows = claim.projections
        lie = Claim(claim.coefficients, [rows[0], [rows[1][0] + 1.0, *rows[1][1:]], *rows[2:]])
        with pytest.raises(ReducerCheatedError, match="misreports our own copy"):
            _check(lie, codec, mine, reply)
        left_out = Claim([0.0, 0.0, 0.5, 0.5], claim.projections)
        with pytest.raises(ReducerCheatedError, match="includes our copy"):
            _check(left_out, codec, mine, reply)


@pytest.mark.parametrize(("codec_name", "caught_at_least"), [("int8", (100, 100)), ("int4", (95, 55))])
def test_forged_replies_that_widen_their_own_rounding_band_are_still_caught(codec_name, caught_at_least):
    # A cheat picks the reply, and so the band it is judged by (its rounding): a sign flip keeps the band, garbage
    # three times the aggregate's size widens it with itself. With one probe, 17 and 33 in 300 passed at int8, and
    # 208 and 290 at int4 (whose band is up to a quarter of the reply's norm). All PROBES probes at once: none at
    # int8 (about 1e-7 each); at int4 0 and 37 in 100 (the module docstring's stated limit).
    caught = [0, 0]
    for seed in range(100):
        codec, decoded, reply, claim = _honest_reply(codec_name, seed)
        aggregate = codec.decode(reply, torch.empty(decoded[0].numel()))
        noise = torch.randn(aggregate.numel(), generator=torch.Generator().manual_seed(1000 + seed))
        forged = (-aggregate, aggregate + noise * (3 * aggregate.norm() / noise.norm()))
        for kind, values in enumerate(forged):
            lie = codec.encode(values)  # with the honest claim for its probes: it fails on the misfit alone
            projections, _ = _probes(lie, aggregate.numel(), claim.coefficients).project(torch.stack(decoded))
            try:
                _check(Claim(claim.coefficients, projections.tolist()), codec, decoded[1], lie)
            except ReducerCheatedError as e:
                assert "not the combination" in str(e)
                caught[kind] += 1
    assert caught[0] >= caught_at_least[0] and caught[1] >= caught_at_least[1], caught


def _f8(*numbers) -> bytes:
    return np.array(numbers, dtype="<f8").tobytes()


ROW = [1.0] * PROBES


@pytest.mark.parametrize(
    "header",
    [
        {},
        {"k": _f8(0.5, 0.5), "t": _f8(*ROW)},
        {"k": _f8(0.5, float("nan")), "t": _f8(*ROW, *ROW)},
        {"k": [0.5, 0.5], "t": [ROW, ROW]},  # numbers, not their bytes
        {"k": _f8(0.5, 0.5), "t": _f8(*ROW, *ROW)[:-1]},
        {"k": _f8(0.5, 0.5), "t": _f8(*ROW, *ROW[1:], float("inf"))},
        # Finite, but their sum overflowed: an OverflowError failed the part without banning the reducer.
        {"k": _f8(0.5, 0.5), "t": _f8(*ROW, *ROW[1:], 1.79e308)},
        {"k": _f8(0.5, 0.5), "t": _f8(-1e301, *ROW[1:], *ROW)},
    ],
)
def test_a_malformed_claim_is_refused(header):
    with pytest.raises(ReducerCheatedError):
        Claim.parse(header, 2)
    oversized = Claim.parse({"k": _f8(0.5, 0.5), "t": _f8(*ROW, *ROW), "q": _f8(1.0, 1e301), "s": b"x" * 64}, 2)
    assert oversized.norms.size == 0 and oversized.signature == b""  # no evidence rests on it
