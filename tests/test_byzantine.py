"""Hostile all-reduce members in real processes: NaN copies, silent members, scaled data, absurd weights.

Every test runs one round among real peer processes over UCX on 127.0.0.1 (tests/peers/allreduce_peer.py), with
the attacker's misbehaviour from tests/peers/byzantine_attacks.py, and checks what the honest peers end with.
"""

from __future__ import annotations

import pytest
import torch

from hiveengine.averaging import GroupInfo
from tests.peers.allreduce_peer import seeded_data
from tests.peers.byzantine_attacks import SCALE
from tests.test_allreduce import NUMEL, TOLERANCE, _member, average_in_processes, exact_mean

pytestmark = pytest.mark.timeout(180)
HONEST = [0, 1, 2]


def part_of(members: list[dict], peer: int) -> int:
    """The index of peer `peer`'s part (every member here reduces one)."""
    group = GroupInfo(b"x", tuple(_member(m) for m in members))
    return next(i for i, r in enumerate(group.reducers) if str(r.peer_id) == members[peer]["id"])


@pytest.mark.parametrize("codec", ["none", "int8"])
def test_a_nan_sender_excludes_only_itself(tmp_path, codec):
    specs = [{}, {}, {}, {"attack": "nan"}]
    members, results = average_in_processes(tmp_path, specs, codec, timeout=30, sender_timeout=20, late_grace=10)
    expected = exact_mean(members, HONEST, [1.0] * 3)
    for i in HONEST:
        assert results[i]["failed_parts"] == []
        assert results[i]["s"] < 5, f"the round took {results[i]['s']:.1f} s: it waited for the NaN sender"
        error = float((results[i]["tensor"] - expected).abs().max())
        assert error <= TOLERANCE[codec], error
    assert sorted(results[3]["failed_parts"]) == list(range(4))  # refused by every reducer, its own included
    assert torch.isfinite(results[3]["tensor"]).all()


def test_a_silent_member_is_left_out_within_the_grace_window(tmp_path):
    # The silent member joined the group and answers nothing: as a sender, as a reducer.
    specs = [{}, {}, {}, {"attack": "silent"}]
    members, results = average_in_processes(tmp_path, specs, "none", timeout=40, sender_timeout=30, late_grace=1.0)
    silent_part = part_of(members, 3)
    expected = exact_mean(members, HONEST, [1.0] * 3)
    for i in HONEST:
        assert results[i]["failed_parts"] == [silent_part]
        assert results[i]["s"] < 8, f"the round took {results[i]['s']:.1f} s (sender timeout 30 s, deadline 40 s)"
        start, end = results[i]["spans"][silent_part]
        keep = torch.ones(NUMEL, dtype=torch.bool)
        keep[start:end] = False
        assert torch.equal(results[i]["tensor"][keep], expected[keep])
        assert torch.equal(results[i]["tensor"][start:end], seeded_data(i, NUMEL)[start:end])


def test_centered_clip_bounds_a_scaled_peer_where_the_mean_follows_it(tmp_path):
    specs = [{}, {}, {}, {"attack": "scale"}]
    moved, honest_mean = {}, None
    for aggregation in ("mean", "centered_clip"):
        members, results = average_in_processes(tmp_path, specs, "none", aggregation=aggregation)
        honest_mean = exact_mean(members, HONEST, [1.0] * 3)
        moved[aggregation] = max(float((results[i]["tensor"] - honest_mean).norm()) for i in HONEST)
    assert honest_mean is not None
    spread = max(float((seeded_data(i, NUMEL) - honest_mean).norm()) for i in HONEST)
    # The mean follows the attacker (its x1000 copy has a quarter of the weight); CenteredClip stays within
    # the honest copies' own spread (its bound: a / (1 - a) * tau = tau / 3 here, tau = 1.5 median distances).
    assert moved["mean"] > 100 * spread, moved
    assert moved["centered_clip"] < spread, (moved, spread)
    assert moved["mean"] == pytest.approx(SCALE * float(seeded_data(3, NUMEL).norm()) / 4, rel=0.01)


@pytest.mark.parametrize("aggregation", ["mean", "centered_clip"])
def test_an_absurd_weight_is_capped_at_the_ratio_to_the_median(tmp_path, aggregation):
    specs = [{}, {}, {"attack": "weight"}]
    members, results = average_in_processes(tmp_path, specs, "none", aggregation=aggregation, max_weight_ratio=4.0)
    capped = exact_mean(members, [0, 1, 2], [1.0, 1.0, 4.0])
    for i in (0, 1, 2):
        assert results[i]["failed_parts"] == []
        assert torch.equal(results[i]["tensor"], capped)


def test_a_weight_above_what_its_sender_plausibly_processed_is_clipped_to_that(tmp_path):
    # The attacker's gathered metadata (in the Optimizer: its signed progress) allows it a weight of 2, under the
    # median cap of 4: every reducer clips its weight to 2; the honest peers' limits are above their weights.
    specs = [{}, {}, {"attack": "weight"}]
    limits = {"0": 1.5, "1": 1.5, "2": 2.0}
    members, results = average_in_processes(tmp_path, specs, "none", aggregation="mean", weight_limits=limits)
    clipped = exact_mean(members, [0, 1, 2], [1.0, 1.0, 2.0])
    for i in (0, 1, 2):
        assert results[i]["failed_parts"] == []
        assert torch.equal(results[i]["tensor"], clipped)


SMALL = 2048  # 8 KiB of fp32: under MIN_PART_BYTES per reducer, so one reducer owns the whole buffer


@pytest.mark.parametrize("nan_reduces", [True, False])
def test_a_peer_with_nan_data_withdraws_so_nobody_waits_for_it(tmp_path, nan_reduces):
    # The broken peer cannot encode its data: it tells the sole reducer (or itself, when it is the reducer) that
    # it sends nothing, and the honest copies are averaged at once instead of after the 10 s grace window.
    bandwidth = 4.0 if nan_reduces else 0.5
    specs = [{}, {}, {}, {"attack": "nan_data", "bandwidth": bandwidth}]
    members, results = average_in_processes(
        tmp_path, specs, "int8", timeout=30, sender_timeout=20, late_grace=10, numel=SMALL
    )
    lengths = [end - start for start, end in results[0]["spans"]]
    assert sum(1 for n in lengths if n) == 1 and bool(lengths[part_of(members, 3)]) == nan_reduces
    expected = exact_mean(members, HONEST, [1.0] * 3, numel=SMALL)
    for i in HONEST:
        assert results[i]["failed_parts"] == []
        assert results[i]["s"] < 4, f"the round took {results[i]['s']:.1f} s: it waited for the NaN peer"
        assert float((results[i]["tensor"] - expected).abs().max()) <= TOLERANCE["int8"]
    assert len(results[3]["failed_parts"]) == 1 and results[3]["s"] < 4


def test_a_silent_sole_reducer_costs_its_part_not_the_deadline(tmp_path):
    # The silent member owns the whole (small) buffer and answers nothing: each sender gives it up after
    # sender_timeout + late_grace (3 s), not after the round's 40 s deadline (nor the 10 s a peer that never
    # opens the round takes to refuse).
    specs = [{}, {}, {}, {"attack": "silent", "bandwidth": 4.0}]
    members, results = average_in_processes(
        tmp_path, specs, "none", timeout=40, sender_timeout=2, late_grace=1.0, numel=SMALL
    )
    silent_part = part_of(members, 3)
    for i in HONEST:
        assert results[i]["failed_parts"] == [silent_part]
        assert results[i]["s"] < 6, f"the round took {results[i]['s']:.1f} s (bound 3 s, deadline 40 s)"
        assert torch.equal(results[i]["tensor"], seeded_data(i, SMALL))
