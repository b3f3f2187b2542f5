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
        -(2**15), 2**15, (n, PROBE_COUNT), dtype=torch.int16, generator=torch.Generator().manual_seed(seed)
    )


@pytest.mark.parametrize("m", [1, 2, 9])
@pytest.mark.parametrize("n", [1, 3, 255, 256, 257, 1000, 20011])
def test_native_matches_the_reference(m, n):
    generator = torch.Generator().manual_seed(1000 * m + n)
    wide = torch.randn(m, n + 5, generator=generator) * torch.logspace(-3, 3, m).unsqueeze(1)
    rows = wide[:, 2 : 2 + n]  # strided: each row contiguous, rows n + 5 apart
    words = _words(n, n)
    got = probe_project(rows, words, PROBE_STEP, row_norms=True, backend="native")
    want = probe_project(rows.contiguous(), words, PROBE_STEP, row_norms=True, backend="reference")
    projections, row_sq = got
    scale = want[1].sqrt().unsqueeze(1) * (3 * n) ** 0.5  # ||x_j|| and the probes' norm bound
    assert ((projections - want[0]).abs() <= 1e-13 * scale).all()
    assert torch.allclose(row_sq, want[1], rtol=1e-13)
    assert not torch.equal(projections, torch.zeros_like(projections))


def test_probe_values_are_the_documented_affine_map_of_the_words():
    n = 4096
    rows = torch.ones(1, n)
    for word, value in ((0, PROBE_LOW), (-1, PROBE_LOW + PROBE_STEP * (2**16 - 1))):  # int16 -1 is word 2^16 - 1
        words = torch.full((n, PROBE_COUNT), word, dtype=torch.int16)
        projections, _ = probe_project(rows, words, PROBE_STEP, backend="native")
        assert torch.allclose(projections, torch.full_like(projections, n * value), rtol=1e-12)
    half_step = 3**0.5 * 2.0**-16  # the extreme values are the midpoints of the outermost of 2^16 cells
    assert (
        abs(PROBE_LOW + 3**0.5 - half_step) < 1e-12
        and abs(PROBE_LOW + PROBE_STEP * (2**16 - 1) - 3**0.5 + half_step) < 1e-12
    )


def test_probes_are_uniform_with_unit_variance_and_shared_by_every_row_set():
    n = 200_000
    rows = torch.randn(5, n, generator=torch.Generator().manual_seed(3))
    probes = Probes(b"group", 1, 2, bytes(32), n, C)
    projections, norms = probes.project(rows)
    # The probes themselves, value by value (rows of the identity pick them out), over a stretch of the stream:
    values = np.concatenate(
        [
            Probes(b"group", 1, 2, bytes(32), 4096, C).project(torch.eye(4096)[i : i + 512])[0]
            for i in range(0, 4096, 512)
        ]
    )
    assert abs(values.mean()) < 0.02 and abs((values**2).mean() - 1) < 0.02  # mean 0, variance 1 (3 sigma: 0.016)
    # 2^16 levels: 32768 draws are 78.7% distinct (birthday; 8-bit levels would give 256 values at most)
    assert np.abs(values).max() < 3**0.5 and len(np.unique(values)) > 0.77 * values.size
    counts = np.histogram(values, bins=16, range=(-(3**0.5), 3**0.5))[0]
    assert (abs(counts / values.size * 16 - 1) < 0.15).all()  # uniform: each sixteenth holds 1/16 (+- 0.09, 3 sigma)
    assert abs(float(norms[3]) - float(rows[3].double().norm())) < 1e-9 * float(norms[3])
    # A sender's two rows and a reducer's K rows get the same bits for the same copy: its claim is checked exactly.
    two, _ = probes.project(rows[[3, 1]])
    assert (two == projections[[3, 1]]).all()
    other, _ = Probes(b"group", 1, 2, bytes(31) + b"\1", n, C).project(rows[[3, 1]])  # another reply
    assert (abs(other - two) > 1e-6).all()


@pytest.mark.parametrize(
    ("rows", "words", "match"),
    [
        (torch.randn(2, 10).double(), _words(10, 0), "fp32 rows"),
        (torch.randn(10), _words(10, 0), "fp32 rows"),
        (torch.randn(2, 10), _words(9, 0), "int16 words"),
        (torch.randn(2, 10), _words(10, 0).int(), "int16 words"),
        (torch.randn(10, 2).t(), _words(10, 0), "fp32 rows"),
    ],
)
def test_bad_arguments_are_refused(rows, words, match):
    with pytest.raises(ConfigurationError, match=match):
        probe_project(rows, words, PROBE_STEP)


@pytest.mark.gpu
def test_cuda_rows_get_the_same_projections_as_the_host():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    rows, n = torch.randn(4, 100_003, generator=torch.Generator().manual_seed(9)), 100_003
    host = Probes(b"g", 0, 0, bytes(32), n, C).project(rows)
    device = Probes(b"g", 0, 0, bytes(32), n, C).project(rows.cuda())
    for a, b in zip(host, device, strict=True):
        assert abs(a - b).max() <= 1e-12 * abs(a).max()
