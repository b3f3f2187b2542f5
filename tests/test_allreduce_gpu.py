"""The butterfly all-reduce on CUDA buffers between real processes (skipped without a GPU)."""

import pytest
import torch

from tests.test_allreduce import TOLERANCE, average_in_processes, exact_mean

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(180)]
GPU_TOLERANCE = {**TOLERANCE, "none": 1e-6}  # the GPU sums in the same order, rounding may differ from the C kernel


@pytest.mark.parametrize("codec", ["none", "int8", "int4"])
def test_cuda_buffers_average_to_the_weighted_mean(tmp_path, codec):
    weights = [1.0, 2.0, 3.0]
    members, results = average_in_processes(tmp_path, [{"weight": w} for w in weights], codec, device="cuda")
    expected = exact_mean(members, [0, 1, 2], weights)
    for r in results.values():
        assert r["failed_parts"] == [] and r["device"] == "cuda"
        assert float((r["tensor"] - expected).abs().max()) <= GPU_TOLERANCE[codec]
    assert torch.equal(results[0]["tensor"], results[1]["tensor"])
