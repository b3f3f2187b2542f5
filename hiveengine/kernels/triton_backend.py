"""The Triton kernels behind the common kernel interface, for CUDA tensors.

Under TRITON_INTERPRET=1 the same code runs on CPU tensors (that is how the tests exercise it). The
``launch_*`` functions enqueue a kernel and return its one-word NaN/Inf flag without waiting; the
interface functions (``quantize``, ...) read the flag, which synchronizes with the stream: a result must
be known finite before it goes on the wire.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl

from . import triton_kernels as tk
from .layout import QMAX, codes_numel, num_blocks
from .tuning import LaunchConfig, launch_config

_KIND = {torch.float32: tk.F32, torch.float16: tk.F16, torch.bfloat16: tk.BF16}
_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _options(config: LaunchConfig) -> dict:
    # No fused multiply-adds: they would round differently from the reference.
    return {"num_warps": config.num_warps, "num_stages": config.num_stages, "enable_fp_fusion": False}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _flag(device: torch.device) -> torch.Tensor:
    return torch.zeros(1, dtype=torch.int32, device=device)


def _on_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A few host values as a device tensor, without waiting: a plain copy from pageable memory would wait for the
    stream to drain, and leave the GPU idle while the next launch is prepared. Pinned, the copy is queued."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def _pointer_table(tensors: Sequence[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, bool]:
    """The tensors' addresses as a device table, and whether all start on a 16-byte boundary (wide loads)."""
    pointers = [t.data_ptr() for t in tensors]
    return _on_device(pointers, torch.int64, device), all(p % 16 == 0 for p in pointers)


def _blockwise_launch(kernel: str, bits: int, block: int, numel: int, device: torch.device, **extra):
    """(grid, constexpr arguments, launch options) of a kernel over whole quantization blocks."""
    config = launch_config(kernel, device, bits=bits, block=block, **extra)
    group = max(1, config.tile // block)
    grid = (triton.cdiv(num_blocks(numel, block), group),)
    meta = {"BLOCK": block, "GROUP": group, "LANES": 1 if bits == 8 else 2, "QMAX": float(QMAX[bits])}
    return grid, meta, _options(config)


def _elementwise_launch(kernel: str, numel: int, device: torch.device, **fields: object):
    config = launch_config(kernel, device, **fields)
    return (triton.cdiv(numel, config.tile),), config.tile, _options(config)


def launch_quantize(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    codes: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    block: int,
    key: int | None,
) -> torch.Tensor:
    """Quantize x (plus residual, whose new value is the quantization error) into codes and scales."""
    n, flag = x.numel(), _flag(x.device)
    grid, meta, options = _blockwise_launch("quantize", bits, block, n, x.device)
    tk.quantize_kernel[grid](
        x,
        x if residual is None else residual,
        codes,
        scales,
        flag,
        n,
        codes_numel(n, bits),
        scales.numel(),
        key or 0,
        HAS_RESIDUAL=residual is not None,
        STOCHASTIC=key is not None,
        **meta,
        **options,
    )
    return flag


def launch_dequantize(
    codes: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, bits: int, block: int
) -> torch.Tensor:
    """out = code * scale, written in out's dtype."""
    n, flag = out.numel(), _flag(out.device)
    grid, meta, options = _blockwise_launch("dequantize", bits, block, n, out.device)
    tk.dequantize_kernel[grid](
        codes, scales, out, flag, n, codes_numel(n, bits), scales.numel(), OUT_KIND=_KIND[out.dtype], **meta, **options
    )
    return flag


def launch_reduce(
    codes: Sequence[torch.Tensor],
    scales: Sequence[torch.Tensor],
    weights: Sequence[float],
    out: torch.Tensor,
    bits: int,
    block: int,
    out_codes: torch.Tensor | None,
    out_scales: torch.Tensor | None,
) -> torch.Tensor:
    """out = sum_k weights[k] * dequantize(codes[k]) in one pass; optionally quantize it again."""
    n, device, flag = out.numel(), out.device, _flag(out.device)
    requantize = out_codes is not None and out_scales is not None
    grid, meta, options = _blockwise_launch("reduce", bits, block, n, device, requantize=int(requantize))
    codes_table, aligned = _pointer_table(codes, device)
    tk.reduce_kernel[grid](
        codes_table,
        _pointer_table(scales, device)[0],
        _on_device(list(weights), torch.float32, device),
        out,
        out_codes if requantize else codes[0],
        out_scales if requantize else scales[0],
        flag,
        n,
        codes_numel(n, bits),
        num_blocks(n, block),
        len(codes),
        CODE_T=tl.int8 if bits == 8 else tl.uint8,
        REQUANTIZE=requantize,
        ALIGNED=aligned,
        **meta,
        **options,
    )
    return flag


def launch_weighted_mean(inputs: Sequence[torch.Tensor], weights: Sequence[float], out: torch.Tensor) -> torch.Tensor:
    """out = sum_k weights[k] * inputs[k] in fp32, in one pass."""
    n, device, flag = out.numel(), out.device, _flag(out.device)
    grid, tile, options = _elementwise_launch("weighted_mean", n, device, dtype=_name(inputs[0].dtype))
    table, aligned = _pointer_table(inputs, device)
    tk.weighted_mean_kernel[grid](
        table,
        _on_device(list(weights), torch.float32, device),
        out,
        flag,
        n,
        len(inputs),
        TILE=tile,
        IN_T=_TL_DTYPE[inputs[0].dtype],
        ALIGNED=aligned,
        **options,
    )
    return flag


def launch_cast(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = x converted to out's dtype (round half to even)."""
    n, flag = x.numel(), _flag(x.device)
    grid, tile, options = _elementwise_launch("cast", n, x.device, src=_name(x.dtype), dst=_name(out.dtype))
    tk.cast_kernel[grid](x, out, flag, n, TILE=tile, OUT_KIND=_KIND[out.dtype], **options)
    return flag


def launch_check_finite(x: torch.Tensor) -> torch.Tensor:
    """Flag NaN or Inf in x."""
    n, flag = x.numel(), _flag(x.device)
    grid, tile, options = _elementwise_launch("check_finite", n, x.device, dtype=_name(x.dtype))
    tk.check_finite_kernel[grid](x, flag, n, TILE=tile, **options)
    return flag


def _checked(launch: Callable[..., torch.Tensor]) -> Callable[..., bool]:
    @functools.wraps(launch)
    def run(*args) -> bool:
        return bool(launch(*args).item())

    run.__doc__ = f"{launch.__doc__} Waits for the kernel; returns whether it met NaN/Inf."
    return run


quantize = _checked(launch_quantize)
dequantize = _checked(launch_dequantize)
reduce = _checked(launch_reduce)
weighted_mean = _checked(launch_weighted_mean)
cast = _checked(launch_cast)
check_finite = _checked(launch_check_finite)
