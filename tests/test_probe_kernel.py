"""The probe projection kernel behind verified reducers (kernels.probe_project) against its torch reference, on
fresh random data: the native C kernel for CPU rows, the reference on a CUDA device (marked `gpu`)."""

import numpy as np
import pytest
import torch

from hiveengine.averaging.verification import PROBE_LOW, PROBE_STEP, Probes
from hiveengine.errors import ConfigurationError
from hiveengine.kernels import PROBE_COUNT, probe_project

C = np.array([0.25, 0.75])  # the claimed coefficients the probes are keyed by


def _words(n: int, seed: int) -> torch.Tensor:
    return torch.randint(
        -(2**31), 2**31, (n, PROBE_COUNT), dtype=torch.int32, generator=torch.Generator().manual_seed(seed)
    )


@pytest.mark.parametrize("m", [1, 2, 9])
@pytest.mark.parametrize("n", [1, 3, 255, 256, 257, 1000, 20011])
def test_native_matches_the_reference(m, n):
    generator = torch.Generator().manual_seed(1000 * m + n)
    wide = torch.randn(m, n + 5, generator=generator) * torch.logspace(-3, 3, m).unsqueeze(1)
    rows = wide[:, 2 : 2 + n]  # strided: each row contiguous, rows n + 5 apart
    words = _words(n, n)
    got = probe_project(rows, words, PROBE_STEP, PROBE_LOW, row_norms=True, backend="native")
    want = probe_project(rows.contiguous(), words, PROBE_STEP, PROBE_LOW, row_norms=True, backend="reference")
    projections, probe_sq, row_sq = got
    scale = want[2].sqrt().unsqueeze(1) * want[1].sqrt().unsqueeze(0)  # ||x_j|| ||r_k||
    assert ((projections - want[0]).abs() <= 1e-13 * scale).all()
    assert torch.allclose(probe_sq, want[1], rtol=1e-13, atol=0) and torch.allclose(row_sq, want[2], rtol=1e-13)
    assert not torch.equal(projections, torch.zeros_like(projections))


def test_probe_values_are_the_documented_affine_map_of_the_words():
    n = 4096
    rows = torch.ones(1, n)
    for word, value in ((0, PROBE_LOW), (-1, PROBE_LOW + PROBE_STEP * (2**32 - 1))):  # int32 -1 is word 2^32 - 1
        words = torch.full((n, PROBE_COUNT), word, dtype=torch.int32)
        projections, probe_sq, _ = probe_project(rows, words, PROBE_STEP, PROBE_LOW, backend="native")
        assert torch.allclose(projections, torch.full_like(projections, n * value), rtol=1e-12)
        assert torch.allclose(probe_sq, torch.full_like(probe_sq, n * value * value), rtol=1e-12)
    assert abs(PROBE_LOW + 3**0.5) < 1e-9 and abs(PROBE_LOW + PROBE_STEP * (2**32 - 1) - 3**0.5) < 1e-9


def test_probes_are_uniform_with_unit_variance_and_shared_by_every_row_set():
    n = 200_000
    rows = torch.randn(5, n, generator=torch.Generator().manual_seed(3))
    probes = Probes(b"group", 1, 2, bytes(32), n, C)
    projections, norms, probe_norms = probes.project(rows)
    assert (abs(probe_norms**2 / n - 1) < 0.01).all()  # variance 1 (uniform: 1 +- 0.0045 at 3 sigma)
    assert abs(float(norms[3]) - float(rows[3].double().norm())) < 1e-9 * float(norms[3])
    # A sender's two rows and a reducer's K rows get the same bits for the same copy: its claim is checked exactly.
    two, _, _ = probes.project(rows[[3, 1]])
    assert (two == projections[[3, 1]]).all()
    other, _, _ = Probes(b"group", 1, 2, bytes(31) + b"\1", n, C).project(rows[[3, 1]])  # another reply
    assert (abs(other - two) > 1e-6).all()


@pytest.mark.parametrize(
    ("rows", "words", "match"),
    [
        (torch.randn(2, 10).double(), _words(10, 0), "fp32 rows"),
        (torch.randn(10), _words(10, 0), "fp32 rows"),
        (torch.randn(2, 10), _words(9, 0), "int32 words"),
        (torch.randn(2, 10), _words(10, 0).long(), "int32 words"),
        (torch.randn(10, 2).t(), _words(10, 0), "fp32 rows"),
    ],
)
def test_bad_arguments_are_refused(rows, words, match):
    with pytest.raises(ConfigurationError, match=match):
        probe_project(rows, words, PROBE_STEP, PROBE_LOW)


@pytest.mark.gpu
def test_cuda_rows_get_the_same_projections_as_the_host():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    rows, n = torch.randn(4, 100_003, generator=torch.Generator().manual_seed(9)), 100_003
    host = Probes(b"g", 0, 0, bytes(32), n, C).project(rows)
    device = Probes(b"g", 0, 0, bytes(32), n, C).project(rows.cuda())
    for a, b in zip(host, device, strict=True):
        assert abs(a - b).max() <= 1e-12 * abs(a).max()
