"""The public kernel API: one signature per operation, the implementation picked by the tensors' device.

CUDA tensors run the Triton kernels, CPU tensors the native C kernels, anything else (or a machine where
the native library is missing) the torch reference. ``backend=`` overrides the choice, for tests and
benchmarks only. Triton is an optional dependency (``pip install hiveengine[gpu]``): it is imported only
when a CUDA tensor (or ``backend="triton"``) needs it, so CPU peers never load it.
Every function raises NonFiniteError, naming the tensor, when its input holds NaN or Inf: a non-finite
value must never be averaged into everyone's model silently.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
from collections.abc import Sequence
from types import ModuleType
from typing import NamedTuple

import torch

from hiveengine.errors import ConfigurationError, KernelUnavailableError, NonFiniteError

from . import layout
from .layout import DEFAULT_BLOCK, FLOAT_DTYPES
from .native import load_native_library
from .tuning import interpreting

logger = logging.getLogger(__name__)

PROBE_COUNT = 8  # probes per probe_project call (the native kernel's vector width)

BACKENDS = ("reference", "native", "triton")
_MODULES = {
    "reference": ".reference",
    "native": ".native_backend",
    "triton": ".triton_backend",
}


TRITON_MISSING = (
    "Triton is not installed, and hiveengine's kernels for CUDA tensors are Triton kernels: "
    "install it with `pip install hiveengine[gpu]` (or `pip install triton`)"
)


def triton_available() -> bool:
    """Whether the optional Triton package is installed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _module(backend: str) -> ModuleType:
    if backend not in _MODULES:
        raise ConfigurationError(f"unknown kernel backend {backend!r}; choose one of {list(BACKENDS)}")
    if backend == "triton" and not triton_available():
        raise KernelUnavailableError(TRITON_MISSING)
    module = importlib.import_module(_MODULES[backend], __package__)
    if backend == "native":
        load_native_library()
    return module


@functools.cache
def _default_backend(device_type: str) -> ModuleType:
    preferred = {"cuda": "triton", "cpu": "native"}.get(device_type)
    if preferred is None:
        return _module("reference")
    if preferred == "triton" and not triton_available():
        raise KernelUnavailableError(TRITON_MISSING)  # rather than a slow fallback on the GPU
    try:
        return _module(preferred)
    except (ImportError, KernelUnavailableError) as e:
        logger.warning("%s kernels unavailable (%s); %s tensors use the torch reference", preferred, e, device_type)
        return _module("reference")


def backend_for(device: torch.device, backend: str | None = None) -> ModuleType:
    """The implementation module for tensors on `device` (or the one named by `backend`)."""
    if backend is None:
        return _default_backend(device.type)
    if backend == "triton" and device.type != "cuda" and not interpreting():
        raise KernelUnavailableError("Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)")
    return _module(backend)


def _nonfinite(name: str, values: torch.Tensor | None, action: str, hint: str = "") -> NonFiniteError:
    """The error for a NaN/Inf found by a kernel, with a count and first position when `values` has them."""
    detail = ""
    if values is not None:
        bad = ~torch.isfinite(values.reshape(-1))
        count = int(bad.sum())
        if count:
            first = int(bad.nonzero()[0, 0])
            detail = f" ({count} NaN/Inf value{'s' if count > 1 else ''}, first at flat index {first})"
    hint = hint or (
        "a non-finite value must never be averaged into the other peers' models; skip this step and fix "
        "its source (learning rate, loss scaling, gradient clipping)"
    )
    return NonFiniteError(f"{name} holds NaN or Inf{detail}; refusing to {action}: {hint}")


def quantize_blockwise(
    x: torch.Tensor,
    bits: int = 8,
    block: int = DEFAULT_BLOCK,
    *,
    stochastic: bool = False,
    seed: int | None = None,
    residual: torch.Tensor | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    name: str = "tensor",
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a contiguous fp32/fp16/bf16 tensor blockwise to (codes, scales) (layout: see layout.py).

    With ``residual`` (fp32, same size) it quantizes ``x + residual`` and stores the new quantization error
    back into ``residual`` in the same pass (error feedback). ``stochastic`` rounds up or down at random
    with the odds that make it unbiased; ``seed`` makes it reproducible (default: drawn from torch's RNG).
    ``out`` takes preallocated (codes, scales). On NonFiniteError, blocks holding NaN/Inf keep their old
    residual; the others have been updated.
    """
    layout.check_format(bits, block)
    xf = layout.flat(x, name)
    n, device = xf.numel(), xf.device
    res = None if residual is None else layout.check_buffer(residual, "residual", n, torch.float32, device)
    if out is None:
        codes = torch.empty(layout.codes_numel(n, bits), dtype=layout.codes_dtype(bits), device=device)
        scales = torch.empty(layout.num_blocks(n, block), dtype=torch.float32, device=device)
    else:
        codes = layout.check_buffer(out[0], "codes", layout.codes_numel(n, bits), layout.codes_dtype(bits), device)
        scales = layout.check_buffer(out[1], "scales", layout.num_blocks(n, block), torch.float32, device)
    key = None
    if stochastic:
        key = layout.stochastic_key(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
    if n and backend_for(device, backend).quantize(xf, res, codes, scales, bits, block, key):
        values = xf.float() if res is None else xf.float() + res
        raise _nonfinite(name if res is None else f"{name} + its error-feedback residual", values, "quantize it")
    return codes, scales


def _output_numel(codes: torch.Tensor, bits: int, numel: int | None, out: torch.Tensor | None) -> int:
    if out is not None:
        numel = out.numel() if numel is None else numel
    if numel is None:
        if bits == 4:
            raise ConfigurationError("4-bit codes pack two values per byte: pass numel= or out=")
        numel = codes.numel()
    if layout.codes_numel(numel, bits) != codes.numel():
        raise ConfigurationError(f"{codes.numel()} {bits}-bit codes cannot hold {numel} values")
    return numel


def dequantize_blockwise(
    codes: torch.Tensor,
    scales: torch.Tensor,
    bits: int = 8,
    block: int = DEFAULT_BLOCK,
    *,
    numel: int | None = None,
    out: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    name: str = "tensor",
    backend: str | None = None,
) -> torch.Tensor:
    """Decode (codes, scales) to values, into ``out`` (any shape and float dtype; in place) or a new 1-D
    tensor of ``dtype``. 4-bit codes need ``numel`` or ``out`` (a byte holds two values)."""
    layout.check_format(bits, block)
    n = _output_numel(codes, bits, numel, out)
    device = layout.check_same_device([codes, scales] + ([out] if out is not None else []), name)
    codes = layout.check_buffer(codes, "codes", layout.codes_numel(n, bits), layout.codes_dtype(bits), device)
    scales = layout.check_buffer(scales, "scales", layout.num_blocks(n, block), torch.float32, device)
    if out is None:
        out = torch.empty(n, dtype=dtype, device=device)
    target = layout.flat(out, "out")
    if n and backend_for(device, backend).dequantize(codes, scales, target, bits, block):
        bad = (~torch.isfinite(scales * layout.QMAX[bits])).nonzero()
        cause = f"block {int(bad[0, 0])} has scale {float(scales[bad[0, 0]])}" if len(bad) else f"overflows {out.dtype}"
        raise NonFiniteError(
            f"decoding {name} gives NaN or Inf ({cause}); refusing it: a corrupt or malicious payload?"
        )
    return out


class Reduced(NamedTuple):
    """Result of reduce_blockwise: the fp32 mean, and its (codes, scales) when requantized."""

    mean: torch.Tensor
    codes: torch.Tensor | None
    scales: torch.Tensor | None


def _inputs_error(name: str, tensors: Sequence[torch.Tensor], what: str) -> NonFiniteError:
    culprits = [i for i, t in enumerate(tensors) if not bool(torch.isfinite(t).all())]
    if culprits:
        return NonFiniteError(
            f"{what} {culprits} of {name} hold NaN or Inf (a peer sent a corrupt payload?); "
            "refusing to average them in: leave those peers out of this round"
        )
    return NonFiniteError(f"the weighted mean of {name} overflows fp32; refusing to average it")


def reduce_blockwise(
    codes: Sequence[torch.Tensor],
    scales: Sequence[torch.Tensor],
    weights: Sequence[float] | torch.Tensor,
    bits: int = 8,
    block: int = DEFAULT_BLOCK,
    *,
    numel: int | None = None,
    out: torch.Tensor | None = None,
    requantize: bool = False,
    requantize_out: tuple[torch.Tensor, torch.Tensor] | None = None,
    name: str = "tensor",
    backend: str | None = None,
) -> Reduced:
    """Weighted mean of K quantized copies of one part, dequantized and summed in fp32 in one pass.

    ``weights`` (K values >= 0) are normalized here to sum to one. The mean goes to ``out`` (fp32; any
    shape) or a new 1-D tensor. With ``requantize`` the same kernel also quantizes the mean (same bits and
    block) for the return trip, into ``requantize_out`` if given.
    """
    layout.check_format(bits, block)
    if not 1 <= len(codes) == len(scales) <= layout.MAX_INPUTS:
        raise ConfigurationError(
            f"{name}: need 1 to {layout.MAX_INPUTS} inputs with one scale tensor each, "
            f"got {len(codes)} code and {len(scales)} scale tensors"
        )
    w = layout.normalize_weights(weights, len(codes), name)
    n = _output_numel(codes[0], bits, numel, out)
    device = layout.check_same_device([*codes, *scales] + ([out] if out is not None else []), name)
    cdtype, ncodes, nblocks = layout.codes_dtype(bits), layout.codes_numel(n, bits), layout.num_blocks(n, block)
    codes = [layout.check_buffer(c, f"codes[{i}] of {name}", ncodes, cdtype, device) for i, c in enumerate(codes)]
    scales = [
        layout.check_buffer(s, f"scales[{i}] of {name}", nblocks, torch.float32, device) for i, s in enumerate(scales)
    ]
    if out is None:
        out = torch.empty(n, dtype=torch.float32, device=device)
    mean = layout.check_buffer(out, "out", n, torch.float32, device)
    rq_codes = rq_scales = None
    if requantize:
        if requantize_out is None:
            rq_codes = torch.empty(ncodes, dtype=cdtype, device=device)
            rq_scales = torch.empty(nblocks, dtype=torch.float32, device=device)
        else:
            rq_codes = layout.check_buffer(requantize_out[0], "requantized codes", ncodes, cdtype, device)
            rq_scales = layout.check_buffer(requantize_out[1], "requantized scales", nblocks, torch.float32, device)
    if n and backend_for(device, backend).reduce(codes, scales, w, mean, bits, block, rq_codes, rq_scales):
        raise _inputs_error(name, scales, "scales of inputs")
    return Reduced(out, rq_codes, rq_scales)


def weighted_mean(
    inputs: Sequence[torch.Tensor],
    weights: Sequence[float] | torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    name: str = "tensor",
    backend: str | None = None,
) -> torch.Tensor:
    """fp32 weighted mean of K same-dtype float tensors in one pass (weights normalized to sum to one)."""
    if not 1 <= len(inputs) <= layout.MAX_INPUTS:
        raise ConfigurationError(f"{name}: need 1 to {layout.MAX_INPUTS} inputs, got {len(inputs)}")
    w = layout.normalize_weights(weights, len(inputs), name)
    first = inputs[0]
    if first.dtype not in FLOAT_DTYPES:
        raise ConfigurationError(f"{name}: inputs have dtype {first.dtype}; expected one of {list(FLOAT_DTYPES)}")
    device = layout.check_same_device([*inputs] + ([out] if out is not None else []), name)
    flats = [
        layout.check_buffer(t, f"input {i} of {name}", first.numel(), first.dtype, device) for i, t in enumerate(inputs)
    ]
    if out is None:
        out = torch.empty(first.shape, dtype=torch.float32, device=device)
    mean = layout.check_buffer(out, "out", first.numel(), torch.float32, device)
    if first.numel() and backend_for(device, backend).weighted_mean(flats, w, mean):
        raise _inputs_error(name, flats, "inputs")
    return out


def probe_project(
    rows: torch.Tensor,
    words: torch.Tensor,
    step: float,
    *,
    row_norms: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The random projections behind verified reducers: (rows @ R^T, each row's squared norm if `row_norms`),
    float64, for fp32 `rows` (m x n, each row contiguous) and 8 probes R^T = step * (w - 32767.5), w the unsigned
    16-bit words of `words` (an int16 tensor, n x 8: value by value). CPU rows never materialize R (the native
    kernel reads the words); rows on another device use the torch reference there."""
    if rows.dim() != 2 or rows.dtype != torch.float32 or (rows.numel() and rows.stride(1) != 1):
        raise ConfigurationError(f"probe_project needs fp32 rows (m x n), got {rows.dtype} {tuple(rows.shape)}")
    if words.shape != (rows.shape[1], PROBE_COUNT) or words.dtype != torch.int16 or not words.is_contiguous():
        raise ConfigurationError(f"probe_project needs int16 words ({rows.shape[1]} x 8), got {tuple(words.shape)}")
    device = rows.device
    module = _module("reference") if backend is None and device.type != "cpu" else backend_for(device, backend)
    projections = torch.empty(rows.shape[0], PROBE_COUNT, dtype=torch.float64, device=device)
    row_sq = torch.empty(rows.shape[0], dtype=torch.float64, device=device) if row_norms else None
    module.probe_project(rows, words.to(device), step, projections, row_sq)
    return projections, row_sq


def cast(
    x: torch.Tensor,
    dtype: torch.dtype,
    *,
    out: torch.Tensor | None = None,
    name: str = "tensor",
    backend: str | None = None,
) -> torch.Tensor:
    """x converted between fp32, fp16 and bf16 (round half to even), into ``out`` or a new tensor; raises
    NonFiniteError if x holds NaN/Inf or a value overflows ``dtype`` (fp16 tops out at 65504)."""
    xf = layout.flat(x, name)
    if dtype not in FLOAT_DTYPES:
        raise ConfigurationError(f"cannot cast {name} to {dtype}; expected one of {list(FLOAT_DTYPES)}")
    if out is None:
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
    target = layout.check_buffer(out, "out", xf.numel(), dtype, xf.device)
    if xf.numel() and backend_for(xf.device, backend).cast(xf, target):
        if bool(torch.isfinite(xf).all()):
            raise NonFiniteError(
                f"{name} overflows {dtype} (largest |value| {float(xf.abs().max()):.4g}); "
                "use the bf16 codec or scale the values down"
            )
        raise _nonfinite(name, xf, f"convert it to {dtype}")
    return out


def check_finite(x: torch.Tensor, *, name: str = "tensor", backend: str | None = None) -> None:
    """Raise NonFiniteError naming `name` if the float tensor x holds NaN or Inf (one read-only pass)."""
    xf = layout.flat(x, name)
    if xf.numel() and backend_for(xf.device, backend).check_finite(xf):
        raise _nonfinite(name, xf, "send it")
