"""The native C kernels (OpenMP, vectorized) behind the common kernel interface, for CPU tensors.

They run on ``torch.get_num_threads()`` threads, so ``torch.set_num_threads`` governs them too.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch

from hiveengine.errors import ConfigurationError

from .native import load_native_library

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_NONFINITE, _EINVAL = 1, -1


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _pointer_array(tensors: Sequence[torch.Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*(t.data_ptr() for t in tensors))


def _float_array(values: Sequence[float]) -> ctypes.Array:
    return (ctypes.c_float * len(values))(*values)


def _result(rc: int, kernel: str) -> bool:
    if rc == _EINVAL:
        raise ConfigurationError(f"native kernel {kernel} rejected its arguments (a bug in hiveengine)")
    return rc == _NONFINITE


def quantize(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    codes: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    block: int,
    key: int | None,
) -> bool:
    """Quantize x (plus residual, whose new value is the quantization error) into codes and scales."""
    rc = load_native_library().he_quantize(
        x.data_ptr(),
        _DTYPE_CODES[x.dtype],
        _ptr(residual),
        x.numel(),
        block,
        bits,
        key is not None,
        key or 0,
        codes.data_ptr(),
        scales.data_ptr(),
        torch.get_num_threads(),
    )
    return _result(rc, "he_quantize")


def dequantize(codes: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, bits: int, block: int) -> bool:
    """out = code * scale, written in out's dtype."""
    rc = load_native_library().he_dequantize(
        codes.data_ptr(),
        scales.data_ptr(),
        out.numel(),
        block,
        bits,
        out.data_ptr(),
        _DTYPE_CODES[out.dtype],
        torch.get_num_threads(),
    )
    return _result(rc, "he_dequantize")


def reduce(
    codes: Sequence[torch.Tensor],
    scales: Sequence[torch.Tensor],
    weights: Sequence[float],
    out: torch.Tensor,
    bits: int,
    block: int,
    out_codes: torch.Tensor | None,
    out_scales: torch.Tensor | None,
) -> bool:
    """out = sum_k weights[k] * dequantize(codes[k]) in one pass; optionally quantize it again."""
    rc = load_native_library().he_reduce(
        _pointer_array(codes),
        _pointer_array(scales),
        _float_array(weights),
        len(codes),
        out.numel(),
        block,
        bits,
        out.data_ptr(),
        _ptr(out_codes),
        _ptr(out_scales),
        torch.get_num_threads(),
    )
    return _result(rc, "he_reduce")


def weighted_mean(inputs: Sequence[torch.Tensor], weights: Sequence[float], out: torch.Tensor) -> bool:
    """out = sum_k weights[k] * inputs[k] in fp32, in one pass."""
    rc = load_native_library().he_weighted_mean(
        _pointer_array(inputs),
        _DTYPE_CODES[inputs[0].dtype],
        _float_array(weights),
        len(inputs),
        out.numel(),
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return _result(rc, "he_weighted_mean")


def cast(x: torch.Tensor, out: torch.Tensor) -> bool:
    """out = x converted to out's dtype (round half to even)."""
    rc = load_native_library().he_cast(
        x.data_ptr(),
        _DTYPE_CODES[x.dtype],
        out.data_ptr(),
        _DTYPE_CODES[out.dtype],
        x.numel(),
        torch.get_num_threads(),
    )
    return _result(rc, "he_cast")


def check_finite(x: torch.Tensor) -> bool:
    """True if x holds NaN or Inf."""
    rc = load_native_library().he_check_finite(x.data_ptr(), _DTYPE_CODES[x.dtype], x.numel(), torch.get_num_threads())
    return _result(rc, "he_check_finite")


def probe_project(
    rows: torch.Tensor,
    words: torch.Tensor,
    step: float,
    projections: torch.Tensor,
    row_sq: torch.Tensor | None,
) -> bool:
    """projections = rows @ R^T in float64, where R^T = step * (w - 32767.5) for the unsigned 16-bit words (n x 8,
    value by value), never materialized, and row_sq (if given) each row's squared norm. Rows may be strided (each
    row contiguous)."""
    m, n = rows.shape
    rc = load_native_library().he_probe_project(
        rows.data_ptr(),
        m,
        n,
        rows.stride(0) if m > 1 else n,
        words.data_ptr(),
        words.shape[1],
        step,
        projections.data_ptr(),
        _ptr(row_sq),
    )
    return _result(rc, "he_probe_project")
