"""Triton kernels of the blockwise codecs and the fused all-reduce step (launched by triton_backend).

Conventions shared with the native and reference kernels (see layout.py):
- a program handles GROUP whole blocks as a [GROUP, BLOCK] tile in value order; 4-bit codes (LANES = 2) pack
  each even value with the odd one after it, as the low and high nibbles of a byte (_lanes splits a tile so);
- every load and store runs over contiguous memory, with masks over the same index (value or byte) that it
  reads or writes: that lets the compiler move 16 bytes per instruction;
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
def _lanes(y, GROUP: tl.constexpr, BLOCK: tl.constexpr):
    """A [GROUP, BLOCK] tile's even and odd values, as two [GROUP, BLOCK // 2] tiles (the low and high nibbles)."""
    return tl.split(tl.reshape(y, [GROUP, BLOCK // 2, 2]))


@triton.jit
def _interleave(y0, y1, GROUP: tl.constexpr, BLOCK: tl.constexpr):
    """The inverse of _lanes: one [GROUP, BLOCK] tile in value order, stored in one contiguous pass."""
    return tl.reshape(tl.join(y0, y1), [GROUP, BLOCK])


@triton.jit
def _store_codes(codes_ptr, q, byte_offs, byte_mask, GROUP: tl.constexpr, BLOCK: tl.constexpr, LANES: tl.constexpr):
    """Store the integer-valued codes q ([GROUP, BLOCK], value order): a byte each, or two nibbles per byte."""
    if LANES == 1:
        tl.store(codes_ptr + byte_offs, q.to(tl.int32).to(tl.int8), mask=byte_mask)
    else:
        q0, q1 = _lanes(q, GROUP, BLOCK)
        b = (q0.to(tl.int32) & 15) | ((q1.to(tl.int32) & 15) << 4)
        tl.store(codes_ptr + byte_offs, b.to(tl.uint8), mask=byte_mask)


@triton.jit
def quantize_kernel(
    x_ptr,
    res_ptr,
    codes_ptr,
    scales_ptr,
    flag_ptr,
    n,
    nbytes,
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
    offs = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    mask = offs < n
    byte_offs = rows[:, None] * (BLOCK // LANES) + tl.arange(0, BLOCK // LANES)[None, :]
    y = _load_f32(x_ptr, offs, mask)
    if HAS_RESIDUAL:
        y += _load_f32(res_ptr, offs, mask)
    inv, scale, bad = _block_scale(tl.max(_bits(y), axis=1), QMAX)
    q = _round_codes(y * inv[:, None], offs, key, QMAX, STOCHASTIC)
    if HAS_RESIDUAL:
        tl.store(res_ptr + offs, y - q * scale[:, None], mask=mask & ~bad[:, None])
    _store_codes(codes_ptr, q, byte_offs, byte_offs < nbytes, GROUP, BLOCK, LANES)
    tl.store(scales_ptr + rows, scale, mask=rows < nblocks)
    _raise_flag(flag_ptr, bad)


@triton.jit
def dequantize_kernel(
    codes_ptr,
    scales_ptr,
    out_ptr,
    flag_ptr,
    n,
    nbytes,
    nblocks,
    BLOCK: tl.constexpr,
    GROUP: tl.constexpr,
    LANES: tl.constexpr,
    QMAX: tl.constexpr,
    OUT_KIND: tl.constexpr,
):
    """out = code * scale of its block, stored as OUT_KIND."""
    rows = tl.program_id(0).to(tl.int64) * GROUP + tl.arange(0, GROUP)
    offs = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    byte_offs = rows[:, None] * (BLOCK // LANES) + tl.arange(0, BLOCK // LANES)[None, :]
    s = tl.load(scales_ptr + rows, mask=rows < nblocks, other=0.0)
    bad = _bits(s * QMAX) >= 0x7F800000
    b = tl.load(codes_ptr + byte_offs, mask=byte_offs < nbytes, other=0)
    if LANES == 1:
        c = b.to(tl.float32)
    else:
        b = b.to(tl.int32)
        c = _interleave(_nibble(b), _nibble(b >> 4), GROUP, BLOCK)
    bad |= _any_per_row(_store_as(out_ptr, offs, c * s[:, None], offs < n, OUT_KIND))
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
    nbytes,
    nblocks,
    K,
    BLOCK: tl.constexpr,
    GROUP: tl.constexpr,
    LANES: tl.constexpr,
    QMAX: tl.constexpr,
    CODE_T: tl.constexpr,
    REQUANTIZE: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """out = sum_k w[k] * dequantize(codes[k], scales[k]) over K inputs found through pointer tables;
    with REQUANTIZE, also quantize out (same layout) for the return trip. ALIGNED: every code buffer starts on a
    16-byte boundary (the host checked), so codes load 16 bytes at a time."""
    rows = tl.program_id(0).to(tl.int64) * GROUP + tl.arange(0, GROUP)
    row_ok = rows < nblocks
    offs = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    mask = offs < n
    byte_offs = rows[:, None] * (BLOCK // LANES) + tl.arange(0, BLOCK // LANES)[None, :]
    byte_mask = byte_offs < nbytes
    acc0 = tl.zeros([GROUP, BLOCK // LANES], dtype=tl.float32)
    acc1 = tl.zeros([GROUP, BLOCK // LANES], dtype=tl.float32)
    bound = tl.zeros([GROUP], dtype=tl.float32)
    for k in range(K):
        codes_ptr = tl.load(codes_table + k).to(tl.pointer_type(CODE_T))
        if ALIGNED:
            codes_ptr = tl.multiple_of(codes_ptr, 16)
        scales_ptr = tl.load(scales_table + k).to(tl.pointer_type(tl.float32))
        f = tl.load(scales_ptr + rows, mask=row_ok, other=0.0) * tl.load(w_ptr + k)
        bound += tl.abs(f)
        b = tl.load(codes_ptr + byte_offs, mask=byte_mask, other=0)
        if LANES == 1:
            acc0 += b.to(tl.float32) * f[:, None]
        else:
            b = b.to(tl.int32)
            acc0 += _nibble(b) * f[:, None]
            acc1 += _nibble(b >> 4) * f[:, None]
    bad = _bits(bound * QMAX) >= 0x7F800000
    acc = acc0
    if LANES == 2:
        acc = _interleave(acc0, acc1, GROUP, BLOCK)
    tl.store(out_ptr + offs, acc, mask=mask)
    if REQUANTIZE:
        inv, scale, bad_mean = _block_scale(tl.max(_bits(acc), axis=1), QMAX)
        bad |= bad_mean
        q = _round_codes(acc * inv[:, None], offs, 0, QMAX, False)
        _store_codes(rq_codes_ptr, q, byte_offs, byte_mask, GROUP, BLOCK, LANES)
        tl.store(rq_scales_ptr + rows, scale, mask=row_ok)
    _raise_flag(flag_ptr, bad)


@triton.jit
def weighted_mean_kernel(
    in_table, w_ptr, out_ptr, flag_ptr, n, K, TILE: tl.constexpr, IN_T: tl.constexpr, ALIGNED: tl.constexpr
):
    """out = sum_k w[k] * inputs[k] in fp32 over K same-dtype inputs found through a pointer table (ALIGNED: each
    starts on a 16-byte boundary)."""
    offs = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
    mask = offs < n
    acc = tl.zeros([TILE], dtype=tl.float32)
    for k in range(K):
        in_ptr = tl.load(in_table + k).to(tl.pointer_type(IN_T))
        if ALIGNED:
            in_ptr = tl.multiple_of(in_ptr, 16)
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
