"""Torch reference of every kernel: the ground truth that the native and Triton kernels must reproduce.

Each function computes into preallocated flat outputs (as the dispatcher passes them) and returns True if
it met NaN/Inf, exactly like the fast implementations, so all three are interchangeable.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .layout import QMAX, TINY, num_blocks


def hash32(x: torch.Tensor) -> torch.Tensor:
    """The kernels' 32-bit hash on int64 tensors holding uint32 values (products stay below 2^63)."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & 0xFFFFFFFF
    return x ^ (x >> 15)


def uniform(numel: int, key: int, device: torch.device) -> torch.Tensor:
    """Each value's stochastic-rounding draw in [0, 1), from its index (mod 2^32) and the key."""
    index = torch.arange(numel, dtype=torch.int64, device=device) & 0xFFFFFFFF
    return (hash32(index ^ key) >> 8).float() * 2.0**-24


def _blocks(y: torch.Tensor, block: int) -> torch.Tensor:
    """y zero-padded to whole blocks, as a (blocks, block) view."""
    return F.pad(y, (0, num_blocks(y.numel(), block) * block - y.numel())).view(-1, block)


def quantize_values(
    y: torch.Tensor, bits: int, block: int, key: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize fp32 y: (integer codes as fp32, scales, which blocks are finite)."""
    qmax = QMAX[bits]
    yb = _blocks(y, block)
    absmax = yb.abs().amax(dim=1)
    finite = torch.isfinite(absmax)
    live = absmax >= TINY
    inv = torch.where(live, torch.div(float(qmax), torch.where(live, absmax, 1.0)), 0.0)
    scales = torch.where(finite, torch.where(live, absmax / qmax, 0.0), float("nan"))
    v = yb * inv[:, None]
    q = torch.round(v) if key is None else torch.floor(v + uniform(yb.numel(), key, y.device).view_as(yb))
    return q.clamp(-qmax, qmax).view(-1)[: y.numel()], scales, finite


def pack4(q: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes (int values in [-8, 7]) two per byte, low nibble first."""
    nibbles = q.to(torch.int64) & 0x0F
    nibbles = F.pad(nibbles, (0, nibbles.numel() % 2)).view(-1, 2)
    return (nibbles[:, 0] | (nibbles[:, 1] << 4)).to(torch.uint8)


def unpack4(codes: torch.Tensor, numel: int) -> torch.Tensor:
    """Unpack bytes of two 4-bit two's-complement codes into int64 values."""
    b = codes.to(torch.int64)
    nibbles = torch.stack([b & 0x0F, b >> 4], dim=1).view(-1)[:numel]
    return (nibbles ^ 8) - 8


def decode(codes: torch.Tensor, scales: torch.Tensor, bits: int, block: int, numel: int) -> torch.Tensor:
    """fp32 values code * scale-of-its-block."""
    q = codes.float() if bits == 8 else unpack4(codes, numel).float()
    return (_blocks(q, block) * scales[:, None]).view(-1)[:numel]


def _store_codes(q: torch.Tensor, codes: torch.Tensor, bits: int) -> None:
    codes.copy_(q.to(torch.int8) if bits == 8 else pack4(q))


def quantize(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    codes: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    block: int,
    key: int | None,
) -> bool:
    """Quantize x (plus residual, whose new value is the quantization error) into codes and scales;
    blocks holding NaN/Inf keep their residual."""
    y = x.float() if residual is None else x.float() + residual
    q, s, finite = quantize_values(y, bits, block, key)
    _store_codes(q, codes, bits)
    scales.copy_(s)
    if residual is not None:
        error = y - (_blocks(q, block) * s[:, None]).view(-1)[: y.numel()]
        keep = finite.repeat_interleave(block)[: y.numel()]
        residual.copy_(torch.where(keep, error, residual))
    return not bool(finite.all())


def dequantize(codes: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, bits: int, block: int) -> bool:
    """out = code * scale (cast to out's dtype); flags scales that could overflow and overflowing casts."""
    out.copy_(decode(codes, scales, bits, block, out.numel()))
    overflow = not bool(torch.isfinite(scales * QMAX[bits]).all())
    return overflow or not bool(torch.isfinite(out).all())


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
    """out = sum_k weights[k] * dequantize(codes[k]) in input order; optionally quantize it again."""
    factors = [s * w for s, w in zip(scales, weights, strict=True)]
    bound = torch.zeros_like(factors[0])
    for f in factors:
        bound = bound + f.abs()
    bad = not bool(torch.isfinite(bound * QMAX[bits]).all())
    acc = decode(codes[0], factors[0], bits, block, out.numel())
    for c, f in zip(codes[1:], factors[1:], strict=True):
        acc = acc + decode(c, f, bits, block, out.numel())
    out.copy_(acc)
    if out_codes is not None and out_scales is not None:
        bad |= quantize(acc, None, out_codes, out_scales, bits, block, None)
    return bad


def weighted_mean(inputs: Sequence[torch.Tensor], weights: Sequence[float], out: torch.Tensor) -> bool:
    """out = sum_k weights[k] * inputs[k] in fp32, in input order; flags NaN/Inf in the result."""
    acc = inputs[0].float() * weights[0]
    for x, w in zip(inputs[1:], weights[1:], strict=True):
        acc = acc + x.float() * w
    out.copy_(acc)
    return not bool(torch.isfinite(acc).all())


def cast(x: torch.Tensor, out: torch.Tensor) -> bool:
    """out = x in out's dtype (round half to even); flags NaN/Inf in the result."""
    out.copy_(x)
    return not bool(torch.isfinite(out).all())


def check_finite(x: torch.Tensor) -> bool:
    """True if x holds NaN or Inf."""
    return not bool(torch.isfinite(x).all())


def probe_project(
    rows: torch.Tensor,
    words: torch.Tensor,
    step: float,
    projections: torch.Tensor,
    row_sq: torch.Tensor | None,
) -> bool:
    """projections = rows @ R^T in float64, where R^T = step * (w - 32767.5) for the unsigned 16-bit words (an int16
    tensor, n x p, value by value): exact half-integers times the fp32 rows, scaled once; and row_sq (if given)
    each row's squared norm."""
    r = ((words.to(torch.int32) & 0xFFFF) - 32768).double() + 0.5
    projections.copy_((rows.double() @ r) * step)
    if row_sq is not None:
        row_sq.copy_(rows.double().square().sum(1))
    return False
