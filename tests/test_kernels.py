"""Every kernel implementation against the torch reference, plus the properties the reference guarantees.

Implementations under test: the native C kernels on CPU tensors, the Triton kernels on CPU tensors in the
Triton interpreter (TRITON_INTERPRET=1, set by conftest; sizes stay <= 64K values there), and the Triton
kernels compiled for CUDA tensors (marked `gpu`: with a GPU, the default run re-runs them in a subprocess
with TRITON_INTERPRET=0, since a process decides between interpreter and compiler once).
The native and interpreted Triton kernels reproduce the reference bit for bit: same codes (no
off-by-one at rounding ties: all round half to even), same scales, same residuals and same fp32 sums.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hiveengine.errors import ConfigurationError, KernelUnavailableError, NonFiniteError
from hiveengine.kernels import (
    backend_for,
    cast,
    check_finite,
    codes_dtype,
    codes_numel,
    dequantize_blockwise,
    quantize_blockwise,
    reduce_blockwise,
    weighted_mean,
)
from hiveengine.kernels.dispatch import triton_available
from hiveengine.kernels.layout import QMAX
from hiveengine.kernels.tuning import interpreting

BLOCKS = [64, 128, 256, 512, 1024, 2048, 4096]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The Triton interpreter computes with numpy, which warns about the NaN/Inf that some tests feed it.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

IMPLS = [
    pytest.param(("native", "cpu"), id="native"),
    pytest.param(("triton", "cpu"), id="triton-interpreter"),
    pytest.param(("triton", "cuda"), id="triton-cuda", marks=pytest.mark.gpu),
]


@pytest.fixture(params=IMPLS)
def impl(request):
    backend, device = request.param
    if backend == "triton" and not triton_available():
        pytest.skip("Triton is not installed (it comes with .[dev] and .[gpu])")
    if backend == "triton" and device == "cpu" and not interpreting():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    if device == "cuda" and interpreting():
        pytest.skip("compiled CUDA kernels run in test_compiled_gpu_kernels_in_a_subprocess")
    return backend, torch.device(device)


def randn(n: int, seed: int, dtype: torch.dtype = torch.float32, device="cpu") -> torch.Tensor:
    """Fresh normal data whose magnitude varies between blocks, as gradients' does."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp(2 * torch.randn(n // 64 + 1, generator=g)).repeat_interleave(64)[:n]
    return x.to(dtype).to(device)


def reference_quantize(x, bits, block, **kw):
    codes, scales = quantize_blockwise(x.cpu(), bits, block, backend="reference", **kw)
    return codes, scales


def scale_of_each(scales: torch.Tensor, block: int, n: int) -> torch.Tensor:
    return scales.repeat_interleave(block)[:n]


def odd_length(block: int) -> int:
    """A length with several full blocks and an odd partial one, within the interpreter's budget."""
    return min(3 * block, 60000 // block * block) + block // 2 + 1


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_matches_reference(impl, bits, block, dtype):
    backend, device = impl
    n = odd_length(block)
    x = randn(n, seed=block + bits, dtype=dtype, device=device)
    codes, scales = quantize_blockwise(x, bits, block, backend=backend)
    ref_codes, ref_scales = reference_quantize(x, bits, block)
    assert torch.equal(codes.cpu(), ref_codes)
    assert torch.equal(scales.cpu(), ref_scales)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("block", [64, 1024, 4096])
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_error_is_at_most_half_a_step(impl, bits, block, dtype):
    backend, device = impl
    n = odd_length(block)
    x = randn(n, seed=7 * block + bits, dtype=dtype, device=device)
    codes, scales = quantize_blockwise(x, bits, block, backend=backend)
    out = torch.empty(n, dtype=torch.float32, device=device)
    result = dequantize_blockwise(codes, scales, bits, block, out=out, backend=backend)
    assert result is out
    ref = dequantize_blockwise(codes.cpu(), scales.cpu(), bits, block, numel=n, backend="reference")
    assert torch.equal(out.cpu(), ref)
    err = (x.cpu().float() - ref).abs()
    step = scale_of_each(scales.cpu(), block, n)
    # Half a step, plus the fp32 rounding of x * (1 / scale) and of code * scale.
    assert bool((err <= step / 2 + 1e-6 * x.cpu().float().abs()).all())
    assert int(codes.cpu().view(torch.uint8).ne(0).sum()) > 0


def test_rounding_ties_go_to_even(impl):
    backend, device = impl
    # absmax 127 makes the scale exactly 1, so the values are the scaled values to round.
    x = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 126.5] + [0.0] * 55, device=device)
    codes, scales = quantize_blockwise(x, 8, 64, backend=backend)
    assert scales.cpu().tolist() == [1.0]
    assert codes.cpu()[:9].tolist() == [127, 0, 2, 2, 0, -2, -2, 4, 126]
    assert torch.equal(codes.cpu(), reference_quantize(x, 8, 64)[0])


@pytest.mark.parametrize("bits", [8, 4])
def test_all_zero_and_tiny_blocks_quantize_to_zero(impl, bits):
    backend, device = impl
    x = randn(64 * 4, seed=3, device=device)
    x[64:128] = 0
    x[128:192] = 1e-38  # 127 / 1e-38 would overflow fp32
    codes, scales = quantize_blockwise(x, bits, 64, backend=backend)
    assert scales.cpu()[1:3].tolist() == [0.0, 0.0]
    out = dequantize_blockwise(codes, scales, bits, 64, numel=x.numel(), backend=backend)
    assert bool((out[64:192] == 0).all())
    assert bool((out[:64] != 0).any())


def test_int4_layout_low_nibble_first(impl):
    backend, device = impl
    x = torch.zeros(65, device=device)
    x[:5] = torch.tensor([7.0, -7.0, 1.0, -1.0, 3.0])
    x[64] = 2.0  # odd length: the last byte holds one code
    codes, scales = quantize_blockwise(x, 4, 64, backend=backend)
    assert codes.dtype == torch.uint8 and codes.numel() == 33
    assert codes.cpu()[:3].tolist() == [0x7 | (0x9 << 4), 0x1 | (0xF << 4), 0x3]
    assert codes.cpu()[32].item() == 0x7
    assert torch.equal(scales.cpu(), torch.tensor([1.0, 2.0 / 7.0]))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_stochastic_rounding_matches_reference_and_stays_within_a_step(impl, bits, dtype):
    backend, device = impl
    n, block = 20001, 256
    x = randn(n, seed=11, dtype=dtype, device=device)
    codes, scales = quantize_blockwise(x, bits, block, stochastic=True, seed=1234, backend=backend)
    ref_codes, ref_scales = reference_quantize(x, bits, block, stochastic=True, seed=1234)
    assert torch.equal(codes.cpu(), ref_codes) and torch.equal(scales.cpu(), ref_scales)
    nearest, _ = reference_quantize(x, bits, block)
    assert not torch.equal(ref_codes, nearest)
    again, _ = quantize_blockwise(x, bits, block, stochastic=True, seed=1234, backend=backend)
    other, _ = quantize_blockwise(x, bits, block, stochastic=True, seed=4321, backend=backend)
    assert torch.equal(again, codes) and not torch.equal(other, codes)
    deq = dequantize_blockwise(codes, scales, bits, block, numel=n, backend=backend).cpu()
    assert bool(((x.cpu().float() - deq).abs() <= scale_of_each(scales.cpu(), block, n) * (1 + 1e-6)).all())


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_stochastic_rounding_is_unbiased(impl, fraction):
    backend, device = impl
    block, blocks = 1024, 63
    x = torch.full((blocks, block), 3.0 + fraction)
    x[:, 0] = 127.0  # scale exactly 1, so every other value is 3 + fraction code steps
    codes, scales = quantize_blockwise(x.view(-1).to(device), 8, block, stochastic=True, seed=99, backend=backend)
    assert bool((scales.cpu() == 1).all())
    rounded = codes.cpu().view(blocks, block)[:, 1:].double()
    assert set(rounded.unique().tolist()) == {3.0, 4.0}
    # Fixed seed, so deterministic; 5 standard deviations of the mean of ~64K Bernoulli draws.
    bound = 5 * (fraction * (1 - fraction) / rounded.numel()) ** 0.5
    assert abs(float(rounded.mean()) - (3.0 + fraction)) < bound


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_error_feedback_writes_new_residual_in_the_same_pass(impl, bits, dtype):
    backend, device = impl
    n, block = 5001, 512
    x = randn(n, seed=5, dtype=dtype, device=device)
    residual = 0.1 * randn(n, seed=6, device=device)
    ref_residual = residual.cpu().clone()
    codes, scales = quantize_blockwise(x, bits, block, residual=residual, backend=backend)
    ref_codes, ref_scales = reference_quantize(x, bits, block, residual=ref_residual)
    assert torch.equal(codes.cpu(), ref_codes) and torch.equal(scales.cpu(), ref_scales)
    assert torch.equal(residual.cpu(), ref_residual)
    deq = dequantize_blockwise(ref_codes, ref_scales, bits, block, numel=n, backend="reference")
    y = x.cpu().float() + 0.1 * randn(n, seed=6)
    assert torch.equal(ref_residual, y - deq)


@pytest.mark.parametrize("bits", [8, 4])
def test_error_feedback_keeps_running_sums_together(impl, bits):
    backend, device = impl
    n, block, steps = 4099, 256, 30
    # A persistent bias below half a step: rounding alone would drop it every time.
    bias = 0.3 * randn(n, seed=1, device=device).abs()
    residual = torch.zeros(n, device=device)
    sum_x = torch.zeros(n, dtype=torch.float64)
    sum_fed = torch.zeros(n, dtype=torch.float64)
    sum_plain = torch.zeros(n, dtype=torch.float64)
    max_scale = 0.0
    for t in range(steps):
        x = randn(n, seed=100 + t, device=device) + bias
        codes, scales = quantize_blockwise(x, bits, block, residual=residual, backend=backend)
        sum_fed += dequantize_blockwise(codes, scales, bits, block, numel=n, backend=backend).cpu().double()
        codes, scales = quantize_blockwise(x, bits, block, backend=backend)
        sum_plain += dequantize_blockwise(codes, scales, bits, block, numel=n, backend=backend).cpu().double()
        sum_x += x.cpu().double()
        max_scale = max(max_scale, float(scales.max()))
    drift_fed = float((sum_x - sum_fed).abs().max())
    drift_plain = float((sum_x - sum_plain).abs().max())
    # With feedback the running sums differ by the last residual only: at most half a step.
    assert drift_fed <= max_scale / 2 * (1 + 1e-4)
    assert drift_plain > 3 * drift_fed


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("bits", [8, 4])
def test_dequantize_into_any_float_dtype(impl, bits, out_dtype):
    backend, device = impl
    n, block = 3001, 128
    codes, scales = reference_quantize(randn(n, seed=21), bits, block)
    out = torch.empty(n, dtype=out_dtype, device=device)
    dequantize_blockwise(codes.to(device), scales.to(device), bits, block, out=out, backend=backend)
    ref = torch.empty(n, dtype=out_dtype)
    dequantize_blockwise(codes, scales, bits, block, out=ref, backend="reference")
    assert torch.equal(out.cpu(), ref)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("block", [64, 1024, 4096])
@pytest.mark.parametrize("k", [1, 4])
def test_fused_reduce_matches_reference_mean(impl, bits, block, k):
    backend, device = impl
    n = odd_length(block)
    parts = [reference_quantize(randn(n, seed=31 * i + block), bits, block) for i in range(k)]
    weights = torch.rand(k, generator=torch.Generator().manual_seed(k)).add(0.1).tolist()
    codes = [c.to(device) for c, _ in parts]
    scales = [s.to(device) for _, s in parts]
    out = torch.empty(n, device=device)
    result = reduce_blockwise(codes, scales, weights, bits, block, out=out, requantize=True, backend=backend)
    ref = reduce_blockwise([c for c, _ in parts], [s for _, s in parts], weights, bits, block, numel=n, requantize=True)
    assert result.mean is out
    assert torch.equal(out.cpu(), ref.mean)
    assert torch.equal(result.codes.cpu(), ref.codes) and torch.equal(result.scales.cpu(), ref.scales)
    requantized = reference_quantize(ref.mean, bits, block)
    assert torch.equal(ref.codes, requantized[0]) and torch.equal(ref.scales, requantized[1])
    # Against an fp64 weighted mean of the dequantized inputs: equal within fp32 rounding.
    values = [dequantize_blockwise(c, s, bits, block, numel=n, backend="reference").double() for c, s in parts]
    exact = sum(w * v for w, v in zip(weights, values, strict=True)) / sum(weights)
    magnitude = sum(abs(w) * v.abs() for w, v in zip(weights, values, strict=True)) / sum(weights)
    assert bool(((out.cpu().double() - exact).abs() <= (k + 1) * 2**-23 * magnitude + 1e-30).all())


def test_fused_reduce_without_requantize_returns_only_the_mean(impl):
    backend, device = impl
    parts = [reference_quantize(randn(1000, seed=i), 8, 64) for i in range(3)]
    result = reduce_blockwise(
        [c.to(device) for c, _ in parts], [s.to(device) for _, s in parts], [1, 2, 3], 8, 64, backend=backend
    )
    assert result.codes is None and result.scales is None
    ref = reduce_blockwise([c for c, _ in parts], [s for _, s in parts], [1, 2, 3], 8, 64, backend="reference")
    assert torch.equal(result.mean.cpu(), ref.mean)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 3])
def test_weighted_mean_matches_reference(impl, dtype, k):
    backend, device = impl
    n = 50001
    inputs = [randn(n, seed=41 + i, dtype=dtype) for i in range(k)]
    weights = [0.5 + i for i in range(k)]
    out = weighted_mean([t.to(device) for t in inputs], weights, backend=backend)
    ref = weighted_mean(inputs, weights, backend="reference")
    assert out.dtype == torch.float32 and torch.equal(out.cpu(), ref)
    exact = sum(w * t.double() for w, t in zip(weights, inputs, strict=True)) / sum(weights)
    magnitude = sum(w * t.double().abs() for w, t in zip(weights, inputs, strict=True)) / sum(weights)
    assert bool(((ref.double() - exact).abs() <= (k + 1) * 2**-23 * magnitude).all())


@pytest.mark.parametrize("src", DTYPES)
@pytest.mark.parametrize("dst", DTYPES)
def test_cast_matches_torch(impl, src, dst):
    backend, device = impl
    x = randn(40001, seed=51, dtype=src)
    if src == torch.float32 and dst != torch.float32:
        # Values at the edges of the 16-bit formats: subnormals, and exact ties in the last place.
        x[:4] = torch.tensor([5.9604645e-08, 3.0e-6, 1.0 + 2**-11, 1.0 + 3 * 2**-11])
        x[4:8] = torch.tensor([65504.0, -1e-40, 2**-126, 1.0 + 2**-8])
    out = cast(x.to(device), dst, backend=backend)
    assert out.dtype == dst and torch.equal(out.cpu(), x.to(dst))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("bits", [8, 4])
def test_nonfinite_input_raises_naming_the_tensor(impl, bad, bits):
    backend, device = impl
    x = randn(3000, seed=61, device=device)
    x[1234] = bad
    out = (torch.empty(codes_numel(3000, bits), dtype=codes_dtype(bits), device=device), torch.empty(12, device=device))
    with pytest.raises(NonFiniteError, match=r"layer3\.weight\.grad.*first at flat index 1234"):
        quantize_blockwise(x, bits, 256, out=out, name="layer3.weight.grad", backend=backend)
    # The block holding it gets a NaN scale: a payload sent anyway is refused by its receiver.
    assert torch.isnan(out[1][1234 // 256]).item() and torch.isfinite(out[1][:4]).all()
    residual = randn(3000, seed=62, device=device)
    residual[7] = bad
    x[1234] = 0
    original, expected = residual.cpu().clone(), residual.cpu().clone()
    with pytest.raises(NonFiniteError, match=r"g \+ its error-feedback residual"):
        quantize_blockwise(x, bits, 256, residual=residual, name="g", backend=backend)
    with pytest.raises(NonFiniteError):
        quantize_blockwise(x.cpu(), bits, 256, residual=expected, backend="reference")
    # The block holding the NaN/Inf keeps its residual; the other blocks were updated.
    torch.testing.assert_close(residual.cpu(), expected, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(residual.cpu()[:256], original[:256], rtol=0, atol=0, equal_nan=True)
    assert not torch.equal(residual.cpu()[256:], original[256:])
    with pytest.raises(NonFiniteError, match="w"):
        check_finite(residual, name="w", backend=backend)
    with pytest.raises(NonFiniteError, match="h"):
        cast(residual, torch.float16, name="h", backend=backend)


def test_fp16_overflow_raises(impl):
    backend, device = impl
    x = torch.tensor([1.0, 70000.0], device=device)
    with pytest.raises(NonFiniteError, match=r"overflows torch\.float16.*bf16"):
        cast(x, torch.float16, name="big", backend=backend)
    assert torch.equal(cast(x, torch.bfloat16, backend=backend).cpu(), x.cpu().to(torch.bfloat16))


@pytest.mark.parametrize("bits", [8, 4])
def test_nonfinite_scales_from_a_peer_raise(impl, bits):
    backend, device = impl
    parts = [reference_quantize(randn(2000, seed=i), bits, 128) for i in range(3)]
    codes = [c.to(device) for c, _ in parts]
    scales = [s.to(device) for _, s in parts]
    scales[2][5] = float("nan")
    with pytest.raises(NonFiniteError, match=r"scales of inputs \[2\] of part7"):
        reduce_blockwise(codes, scales, [1, 1, 1], bits, 128, numel=2000, name="part7", backend=backend)
    with pytest.raises(NonFiniteError, match=r"decoding part7 .*block 5 has scale nan"):
        dequantize_blockwise(codes[2], scales[2], bits, 128, numel=2000, name="part7", backend=backend)
    scales[2][5] = 3e38  # finite, but 127 * 3e38 overflows
    with pytest.raises(NonFiniteError):
        dequantize_blockwise(codes[2], scales[2], bits, 128, numel=2000, backend=backend)


def test_nonfinite_input_of_weighted_mean_names_the_peer(impl):
    backend, device = impl
    inputs = [randn(1000, seed=i, device=device) for i in range(4)]
    inputs[3][999] = float("nan")
    with pytest.raises(NonFiniteError, match=r"inputs \[3\] of grads"):
        weighted_mean(inputs, [1, 1, 1, 0], name="grads", backend=backend)


def test_empty_tensors(impl):
    backend, device = impl
    codes, scales = quantize_blockwise(torch.empty(0, device=device), 4, 64, backend=backend)
    assert codes.numel() == 0 and scales.numel() == 0
    assert dequantize_blockwise(codes, scales, 4, 64, numel=0, backend=backend).numel() == 0


def test_dispatcher_picks_native_for_cpu_tensors():
    assert backend_for(torch.device("cpu")).__name__ == "hiveengine.kernels.native_backend"
    assert backend_for(torch.device("meta")).__name__ == "hiveengine.kernels.reference"
    if not torch.cuda.is_available():
        return
    if not triton_available():
        with pytest.raises(KernelUnavailableError, match=r"pip install hiveengine\[gpu\]"):
            backend_for(torch.device("cuda"))
        return
    assert backend_for(torch.device("cuda")).__name__ == "hiveengine.kernels.triton_backend"


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelUnavailableError, match="CUDA"):
        backend_for(torch.device("cpu"), "triton")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": 3}, "bits must be 8 or 4"),
        ({"block": 100}, "power of two"),
        ({"block": 8192}, "power of two"),
        ({"out": (torch.empty(10, dtype=torch.int8), torch.empty(1))}, "codes must be"),
        ({"residual": torch.zeros(999, dtype=torch.float64)}, "residual must be"),
    ],
)
def test_bad_arguments_raise_configuration_errors(kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        quantize_blockwise(torch.randn(999), **kwargs)


def test_non_contiguous_input_is_refused():
    with pytest.raises(ConfigurationError, match="contiguous"):
        quantize_blockwise(torch.randn(64, 64).t())


def test_int4_decode_needs_the_length():
    codes, scales = quantize_blockwise(torch.randn(101), 4, 64)
    with pytest.raises(ConfigurationError, match="numel"):
        dequantize_blockwise(codes, scales, 4, 64)
    assert dequantize_blockwise(codes, scales, 4, 64, numel=101).numel() == 101


@pytest.mark.parametrize("weights", [[1.0, -1.0], [0.0, 0.0], [float("nan"), 1.0], [1.0]])
def test_bad_weights_are_refused(weights):
    parts = [quantize_blockwise(torch.randn(100), 8, 64) for _ in range(2)]
    with pytest.raises((ConfigurationError, NonFiniteError)):
        reduce_blockwise([c for c, _ in parts], [s for _, s in parts], weights, 8, 64)


def test_qmax_matches_documented_code_range():
    assert QMAX == {8: 127, 4: 7}
    codes, _ = quantize_blockwise(randn(100000, seed=71), 8, 64)
    assert int(codes.min()) == -127 and int(codes.max()) == 127


@pytest.mark.gpu
@pytest.mark.skipif(not interpreting(), reason="this process already runs the compiled kernels")
def test_compiled_gpu_kernels_in_a_subprocess():
    here = Path(__file__).resolve().parent
    tests = [str(here / "test_kernels.py"), str(here / "test_codec.py")]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *tests],
        env={**os.environ, "TRITON_INTERPRET": "0"},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
