"""Triton kernels of the blockwise codecs and the fused all-reduce step (launched by triton_backend).

Conventions shared with the native and reference kernels (see layout.py):
- a program handles GROUP whole blocks as a [GROUP, BLOCK // LANES] tile; LANES is 1 for 8-bit codes
  and 2 for 4-bit codes, whose even and odd values are separate lanes (the low and high nibbles);
- rounding adds and subtracts 1.5 * 2^23 (round half to even without libdevice, which the CPU
  interpreter lacks); divisions use div_rn so that GPU results match the reference bit for bit;
- the absmax is an integer max over the values' bits without the sign, which also exposes NaN/Inf
  (bits >= 0x7F800000); a program that meets one sets flag_ptr[0] = 1 and the host raises.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Kinds of floating-point buffers, as constexpr codes.
F32, F16, BF16 = 0, 1, 2


@triton.jit
def _rint(v):
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _hash32(x):
    x ^= x >> 16
    x *= 0x21F0AAAD
    x ^= x >> 15
    x *= 0x735A2D97
    x ^= x >> 15
    return x


@triton.jit
def _bits(y):
    """The bits of |y| as int32: ordered like |y|, and >= 0x7F800000 exactly for NaN/Inf."""
    return y.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _raise_flag(flag_ptr, bad):
    """Set the non-finite flag if any element of bad (a 1-D tile) is set; racing writers store the same 1."""
    tl.store(flag_ptr + tl.zeros_like(bad.to(tl.int32)), 1, mask=bad)


@triton.jit
def _any_per_row(bad):
    return tl.max(bad.to(tl.int32), axis=1) > 0


@triton.jit
def _block_scale(amax_bits, QMAX: tl.constexpr):
    """(1 / scale, scale, non-finite) of each block from its absmax bits; tiny blocks get 0 and 0,
    non-finite ones 0 and NaN."""
    bad = amax_bits >= 0x7F800000
    absmax = amax_bits.to(tl.float32, bitcast=True)
    live = (absmax >= 7.52316384526264e-37) & ~bad  # 2^-120, layout.TINY
    safe = tl.where(live, absmax, 1.0)
    inv = tl.where(live, tl.math.div_rn(tl.full(safe.shape, QMAX, tl.float32), safe), 0.0)
    scale = tl.where(live, tl.math.div_rn(safe, tl.full(safe.shape, QMAX, tl.float32)), 0.0)
    return inv, tl.where(bad, float("nan"), scale), bad


@triton.jit
def _round_codes(v, index, key, QMAX: tl.constexpr, STOCHASTIC: tl.constexpr):
    """Round v to integers in [-QMAX, QMAX]: half to even, or down/up with odds given by the fraction."""
    if STOCHASTIC:
        u = (_hash32(index.to(tl.uint32) ^ key) >> 8).to(tl.int32).to(tl.float32) * 5.9604644775390625e-08
        w = v + u
        r = _rint(w)
        r = tl.where(r > w, r - 1.0, r)
    else:
        r = _rint(v)
    return tl.minimum(tl.maximum(r, -QMAX), QMAX)


@triton.jit
def _nibble(b):
    """Sign-extend the low 4 bits of b (int32) as fp32."""
    return (((b & 15) ^ 8) - 8).to(tl.float32)


@triton.jit
def _load_f32(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_as(ptr, offs, y, mask, KIND: tl.constexpr):
    """Store fp32 y as KIND (round half to even); return which stored values are NaN/Inf."""
    if KIND == 0:
        tl.store(ptr + offs, y, mask=mask)
        bad = _bits(y) >= 0x7F800000
    elif KIND == 1:
        h = y.to(tl.float16)
        tl.store(ptr + offs, h, mask=mask)
        bad = (h.to(tl.int16, bitcast=True) & 0x7C00) == 0x7C00
    else:
        # By hand: the CPU interpreter truncates fp32 -> bf16 instead of rounding.
        u = y.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        tl.store(ptr + offs, r.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
        bad = (r & 0x7F80) == 0x7F80
    return bad & mask


@triton.jit
def _store_codes(codes_ptr, q0, q1, offs, byte_offs, mask, LANES: tl.constexpr):
    if LANES == 1:
        tl.store(codes_ptr + offs, q0.to(tl.int32).to(tl.int8), mask=mask)
    else:
        b = (q0.to(tl.int32) & 15) | ((q1.to(tl.int32) & 15) << 4)
        tl.store(codes_ptr + byte_offs, b.to(tl.uint8), mask=mask)


@triton.jit
def quantize_kernel(
    x_ptr,
    res_ptr,
    codes_ptr,
    scales_ptr,
    flag_ptr,
    n,
    nblocks,
    key,
    BLOCK: tl.constexpr,
    GROUP: tl.constexpr,
    LANES: tl.constexpr,
    QMAX: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    STOCHASTIC: tl.constexpr,
):
    """codes, scales = quantize(x [+ residual]); residual = x + residual - dequantize (error feedback)."""
    rows = tl.program_id(0).to(tl.int64) * GROUP + tl.arange(0, GROUP)
    cols = tl.arange(0, BLOCK // LANES)
    offs = rows[:, None] * BLOCK + cols[None, :] * LANES
    byte_offs = rows[:, None] * (BLOCK // LANES) + cols[None, :]
    mask0 = offs < n
    y0 = _load_f32(x_ptr, offs, mask0)
    if HAS_RESIDUAL:
        y0 += _load_f32(res_ptr, offs, mask0)
    amax = tl.max(_bits(y0), axis=1)
    y1 = y0
    mask1 = mask0
    if LANES == 2:
        mask1 = offs + 1 < n
        y1 = _load_f32(x_ptr, offs + 1, mask1)
        if HAS_RESIDUAL:
            y1 += _load_f32(res_ptr, offs + 1, mask1)
        amax = tl.maximum(amax, tl.max(_bits(y1), axis=1))
    inv, scale, bad = _block_scale(amax, QMAX)
    q0 = _round_codes(y0 * inv[:, None], offs, key, QMAX, STOCHASTIC)
    q1 = q0
    if LANES == 2:
        q1 = _round_codes(y1 * inv[:, None], offs + 1, key, QMAX, STOCHASTIC)
    if HAS_RESIDUAL:
        ok = ~bad[:, None]
        tl.store(res_ptr + offs, y0 - q0 * scale[:, None], mask=mask0 & ok)
        if LANES == 2:
            tl.store(res_ptr + offs + 1, y1 - q1 * scale[:, None], mask=mask1 & ok)
    _store_codes(codes_ptr, q0, q1, offs, byte_offs, mask0, LANES)
    tl.store(scales_ptr + rows, scale, mask=rows < nblocks)
    _raise_flag(flag_ptr, bad)


@triton.jit
def dequantize_kernel(
    codes_ptr,
    scales_ptr,
    out_ptr,
    flag_ptr,
    n,
    nblocks,
    BLOCK: tl.constexpr,
    GROUP: tl.constexpr,
    LANES: tl.constexpr,
    QMAX: tl.constexpr,
    OUT_KIND: tl.constexpr,
):
    """out = code * scale of its block, stored as OUT_KIND."""
    rows = tl.program_id(0).to(tl.int64) * GROUP + tl.arange(0, GROUP)
    cols = tl.arange(0, BLOCK // LANES)
    offs = rows[:, None] * BLOCK + cols[None, :] * LANES
    mask0 = offs < n
    s = tl.load(scales_ptr + rows, mask=rows < nblocks, other=0.0)
    bad = _bits(s * QMAX) >= 0x7F800000
    if LANES == 1:
        c = tl.load(codes_ptr + offs, mask=mask0, other=0).to(tl.float32)
        bad |= _any_per_row(_store_as(out_ptr, offs, c * s[:, None], mask0, OUT_KIND))
    else:
        b = tl.load(codes_ptr + rows[:, None] * (BLOCK // 2) + cols[None, :], mask=mask0, other=0)
        b = b.to(tl.int32)
        mask1 = offs + 1 < n
        bad |= _any_per_row(_store_as(out_ptr, offs, _nibble(b) * s[:, None], mask0, OUT_KIND))
        bad |= _any_per_row(_store_as(out_ptr, offs + 1, _nibble(b >> 4) * s[:, None], mask1, OUT_KIND))
    _raise_flag(flag_ptr, bad)


@triton.jit
def reduce_kernel(
    codes_table,
    scales_table,
    w_ptr,
    out_ptr,
    rq_codes_ptr,
    rq_scales_ptr,
    flag_ptr,
    n,
    nblocks,
    K,
    BLOCK: tl.constexpr,
    GROUP: tl.constexpr,
    LANES: tl.constexpr,
    QMAX: tl.constexpr,
    CODE_T: tl.constexpr,
    REQUANTIZE: tl.constexpr,
):
    """out = sum_k w[k] * dequantize(codes[k], scales[k]) over K inputs found through pointer tables;
    with REQUANTIZE, also quantize out (same layout) for the return trip."""
    rows = tl.program_id(0).to(tl.int64) * GROUP + tl.arange(0, GROUP)
    row_ok = rows < nblocks
    cols = tl.arange(0, BLOCK // LANES)
    offs = rows[:, None] * BLOCK + cols[None, :] * LANES
    byte_offs = rows[:, None] * (BLOCK // LANES) + cols[None, :]
    mask0 = offs < n
    mask1 = offs + 1 < n
    acc0 = tl.zeros([GROUP, BLOCK // LANES], dtype=tl.float32)
    acc1 = tl.zeros([GROUP, BLOCK // LANES], dtype=tl.float32)
    bound = tl.zeros([GROUP], dtype=tl.float32)
    for k in range(K):
        codes_ptr = tl.load(codes_table + k).to(tl.pointer_type(CODE_T))
        scales_ptr = tl.load(scales_table + k).to(tl.pointer_type(tl.float32))
        f = tl.load(scales_ptr + rows, mask=row_ok, other=0.0) * tl.load(w_ptr + k)
        bound += tl.abs(f)
        if LANES == 1:
            acc0 += tl.load(codes_ptr + offs, mask=mask0, other=0).to(tl.float32) * f[:, None]
        else:
            b = tl.load(codes_ptr + byte_offs, mask=mask0, other=0).to(tl.int32)
            acc0 += _nibble(b) * f[:, None]
            acc1 += _nibble(b >> 4) * f[:, None]
    bad = _bits(bound * QMAX) >= 0x7F800000
    tl.store(out_ptr + offs, acc0, mask=mask0)
    amax = tl.max(_bits(acc0), axis=1)
    if LANES == 2:
        tl.store(out_ptr + offs + 1, acc1, mask=mask1)
        amax = tl.maximum(amax, tl.max(_bits(acc1), axis=1))
    if REQUANTIZE:
        inv, scale, bad_mean = _block_scale(amax, QMAX)
        bad |= bad_mean
        q0 = _round_codes(acc0 * inv[:, None], offs, 0, QMAX, False)
        q1 = _round_codes(acc1 * inv[:, None], offs, 0, QMAX, False)
        _store_codes(rq_codes_ptr, q0, q1, offs, byte_offs, mask0, LANES)
        tl.store(rq_scales_ptr + rows, scale, mask=row_ok)
    _raise_flag(flag_ptr, bad)


@triton.jit
def weighted_mean_kernel(in_table, w_ptr, out_ptr, flag_ptr, n, K, TILE: tl.constexpr, IN_T: tl.constexpr):
    """out = sum_k w[k] * inputs[k] in fp32 over K same-dtype inputs found through a pointer table."""
    offs = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
    mask = offs < n
    acc = tl.zeros([TILE], dtype=tl.float32)
    for k in range(K):
        in_ptr = tl.load(in_table + k).to(tl.pointer_type(IN_T))
        acc += _load_f32(in_ptr, offs, mask) * tl.load(w_ptr + k)
    tl.store(out_ptr + offs, acc, mask=mask)
    _raise_flag(flag_ptr, _bits(acc) >= 0x7F800000)


@triton.jit
def cast_kernel(x_ptr, out_ptr, flag_ptr, n, TILE: tl.constexpr, OUT_KIND: tl.constexpr):
    """out = x converted to OUT_KIND (round half to even)."""
    offs = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
    mask = offs < n
    _raise_flag(flag_ptr, _store_as(out_ptr, offs, _load_f32(x_ptr, offs, mask), mask, OUT_KIND))


@triton.jit
def check_finite_kernel(x_ptr, flag_ptr, n, TILE: tl.constexpr):
    """Set the flag if x holds NaN/Inf."""
    offs = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
    _raise_flag(flag_ptr, _bits(_load_f32(x_ptr, offs, offs < n)) >= 0x7F800000)
