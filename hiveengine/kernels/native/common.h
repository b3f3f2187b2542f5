/* Shared helpers of the native kernels: export and vectorization macros, dtype conversions, rounding,
   the counter-based hash behind stochastic rounding, and the block quantizer used by several kernels.
   Every helper is exact and branch-free where it sits in a hot loop, so the compiler vectorizes it and
   the results match the torch reference bit for bit. */
#ifndef HIVEENGINE_NATIVE_COMMON_H
#define HIVEENGINE_NATIVE_COMMON_H

#include <stdint.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#define HE_EXPORT __attribute__((visibility("default")))

/* Hot functions are compiled for AVX2-era x86-64 and for the baseline, and picked when the library loads
   (ifunc), so a portable build still runs 256-bit vector code on current CPUs. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HE_HOT __attribute__((target_clones("arch=x86-64-v3", "default"), noinline))
#else
#define HE_HOT __attribute__((noinline))
#endif

enum { HE_F32 = 0, HE_F16 = 1, HE_BF16 = 2 };

/* Return codes of the exported kernels. */
#define HE_OK 0
#define HE_NONFINITE 1
#define HE_EINVAL (-1)

#define HE_MIN_BLOCK 64
#define HE_MAX_BLOCK 4096
#define HE_MAX_INPUTS 1024
/* Elements per OpenMP work item: large enough to amortize scheduling, small enough to balance. */
#define HE_CHUNK 16384
/* Blocks whose absmax is below this quantize to zero: 127 / absmax would overflow fp32. */
#define HE_TINY 0x1p-120f
#define HE_INF_BITS 0x7f800000u

static inline uint32_t he_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}

static inline float he_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

/* A kernel's work on items [begin, end) (blocks or elements); returns nonzero if it met NaN/Inf. */
typedef int (*he_range_fn)(const void *args, int64_t begin, int64_t end);

/* Runs fn over [0, count) in contiguous ranges of `per` items on `threads` OpenMP threads (0: the
   OpenMP default) and returns HE_NONFINITE if any range reported NaN/Inf. */
static inline int he_parallel(he_range_fn fn, const void *args, int64_t count, int64_t per, int threads) {
  int64_t nranges = (count + per - 1) / per;
  int bad = 0;
#ifdef _OPENMP
  int nthreads = threads > 0 ? threads : omp_get_max_threads();
#pragma omp parallel for schedule(static) reduction(| : bad) num_threads(nthreads) if (nranges > 1)
#endif
  for (int64_t r = 0; r < nranges; r++) {
    int64_t end = (r + 1) * per < count ? (r + 1) * per : count;
    bad |= fn(args, r * per, end);
  }
  return bad ? HE_NONFINITE : HE_OK;
}

/* Quantization blocks per parallel range. */
static inline int64_t he_blocks_per_range(int64_t block) { return block >= HE_CHUNK ? 1 : HE_CHUNK / block; }

/* Round half to even, like torch.round, for |v| < 2^22 (adding 1.5 * 2^23 drops the fraction). */
static inline float he_rint(float v) { return (v + 12582912.0f) - 12582912.0f; }

/* Branch-free select through bit masks. A C conditional would let the compiler sink floating-point work
   into a branch, which it then may not vectorize back (-ftrapping-math is on by default). */
static inline uint32_t he_select(int cond, uint32_t a, uint32_t b) {
  uint32_t m = -(uint32_t)(cond != 0);
  return (a & m) | (b & ~m);
}

static inline float he_floor(float v) {
  float r = he_rint(v);
  return r - he_float(he_select(r > v, 0x3f800000u, 0));
}

/* 32-bit integer hash (two multiply-xorshift rounds); both multipliers are below 2^31 so the torch
   reference can compute it exactly in int64. */
static inline uint32_t he_hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21f0aaadu;
  x ^= x >> 15;
  x *= 0x735a2d97u;
  x ^= x >> 15;
  return x;
}

static inline float he_f16_to_f32(uint16_t h) {
  uint32_t em = h & 0x7fffu;
  uint32_t normal = (em << 13) + 0x38000000u;
  uint32_t special = (em << 13) | HE_INF_BITS;
  uint32_t subnormal = he_bits((float)(int32_t)em * 0x1p-24f);
  uint32_t r = he_select(em >= 0x7c00u, special, he_select(em < 0x0400u, subnormal, normal));
  return he_float(r | ((uint32_t)(h & 0x8000u) << 16));
}

/* fp32 -> fp16 with round-half-to-even; overflow gives Inf, tiny values become subnormals. */
static inline uint16_t he_f32_to_f16(float f) {
  uint32_t u = he_bits(f);
  uint32_t a = u & 0x7fffffffu;
  uint32_t normal = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;
  uint32_t subnormal = he_bits(he_float(a) + 0.5f) - 0x3f000000u;
  uint32_t special = he_select(a > HE_INF_BITS, 0x7e00u, 0x7c00u);
  uint32_t r = he_select(a >= 0x47800000u, special, he_select(a < 0x38800000u, subnormal, normal));
  return (uint16_t)(r | ((u >> 16) & 0x8000u));
}

static inline float he_bf16_to_f32(uint16_t h) { return he_float((uint32_t)h << 16); }

/* fp32 -> bf16 with round-half-to-even; NaN stays NaN. */
static inline uint16_t he_f32_to_bf16(float f) {
  uint32_t u = he_bits(f);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (uint16_t)he_select((u & 0x7fffffffu) > HE_INF_BITS, (u >> 16) | 0x40u, rounded);
}

/* Converts x[i0, i0 + len) of the given dtype to fp32 in buf. */
static inline void he_load_f32(const void *x, int dtype, int64_t i0, int64_t len, float *buf) {
  if (dtype == HE_F32) {
    memcpy(buf, (const float *)x + i0, (size_t)len * sizeof(float));
  } else if (dtype == HE_F16) {
    const uint16_t *h = (const uint16_t *)x + i0;
    for (int64_t i = 0; i < len; i++) buf[i] = he_f16_to_f32(h[i]);
  } else {
    const uint16_t *h = (const uint16_t *)x + i0;
    for (int64_t i = 0; i < len; i++) buf[i] = he_bf16_to_f32(h[i]);
  }
}

/* Largest |y[i]| as raw bits: the bit patterns of non-negative floats order like integers, so one
   integer max finds the absmax and flags NaN/Inf (bits >= HE_INF_BITS) in the same pass. */
static inline uint32_t he_absmax_bits(const float *y, int64_t len) {
  uint32_t m = 0;
  for (int64_t i = 0; i < len; i++) {
    uint32_t b = he_bits(y[i]) & 0x7fffffffu;
    m = b > m ? b : m;
  }
  return m;
}

/* Writes buf[0, len) to y[i0, i0 + len) in the given dtype; returns 1 if any written value is NaN/Inf. */
static inline int he_store_from_f32(const float *buf, void *y, int dtype, int64_t i0, int64_t len) {
  if (dtype == HE_F32) {
    memcpy((float *)y + i0, buf, (size_t)len * sizeof(float));
    return he_absmax_bits(buf, len) >= HE_INF_BITS;
  }
  uint16_t *h = (uint16_t *)y + i0;
  uint32_t worst = 0;
  if (dtype == HE_F16) {
    for (int64_t i = 0; i < len; i++) {
      uint16_t v = he_f32_to_f16(buf[i]);
      h[i] = v;
      uint32_t e = v & 0x7fffu;
      worst = e > worst ? e : worst;
    }
    return worst >= 0x7c00u;
  }
  for (int64_t i = 0; i < len; i++) {
    uint16_t v = he_f32_to_bf16(buf[i]);
    h[i] = v;
    uint32_t e = v & 0x7fffu;
    worst = e > worst ? e : worst;
  }
  return worst >= 0x7f80u;
}

/* Stochastic rounding: this element's uniform draw in [0, 1) from its global index and the key. */
static inline float he_uniform(uint32_t index, uint32_t key) {
  return (float)(int32_t)(he_hash32(index ^ key) >> 8) * 0x1p-24f;
}

/* Quantizes one finite-checked block y[0, len) to codes in [-qmax, qmax] and returns its scale.
   8-bit codes go to codes[0, len); 4-bit codes are packed two per byte, low nibble first, through tmp.
   With stochastic != 0, rounds down or up with probability given by the fraction (unbiased).
   If residual is not NULL, stores residual[i] = y[i] - code * scale (error feedback).
   Returns HE_NONFINITE (and writes nothing but a NaN scale) if y holds NaN or Inf. */
static inline int he_quantize_block(const float *y, int64_t len, int bits, int stochastic, uint32_t key,
                                    uint32_t index0, int8_t *tmp, uint8_t *codes, float *scale_out,
                                    float *residual) {
  uint32_t mb = he_absmax_bits(y, len);
  if (mb >= HE_INF_BITS) {
    *scale_out = he_float(0x7fc00000u);
    return HE_NONFINITE;
  }
  float absmax = he_float(mb);
  float qmax = bits == 8 ? 127.0f : 7.0f;
  float inv = 0.0f, scale = 0.0f;
  if (absmax >= HE_TINY) {
    inv = qmax / absmax;
    scale = absmax / qmax;
  }
  int8_t *q = bits == 8 ? (int8_t *)codes : tmp;
  if (stochastic) {
    for (int64_t i = 0; i < len; i++) {
      float v = he_floor(y[i] * inv + he_uniform(index0 + (uint32_t)i, key));
      v = v < qmax ? v : qmax;
      v = v > -qmax ? v : -qmax;
      q[i] = (int8_t)(int32_t)v;
    }
  } else {
    for (int64_t i = 0; i < len; i++) {
      float v = he_rint(y[i] * inv);
      v = v < qmax ? v : qmax;
      v = v > -qmax ? v : -qmax;
      q[i] = (int8_t)(int32_t)v;
    }
  }
  if (residual) {
    for (int64_t i = 0; i < len; i++) residual[i] = y[i] - (float)q[i] * scale;
  }
  if (bits == 4) {
    int64_t pairs = len / 2;
    for (int64_t j = 0; j < pairs; j++)
      codes[j] = (uint8_t)((q[2 * j] & 0x0f) | ((q[2 * j + 1] & 0x0f) << 4));
    if (len & 1) codes[pairs] = (uint8_t)(q[len - 1] & 0x0f);
  }
  *scale_out = scale;
  return HE_OK;
}

/* Sign-extends a 4-bit two's-complement code. */
static inline int32_t he_nibble(uint32_t c) { return (int32_t)((c & 0x0fu) ^ 8u) - 8; }

/* Whether codes times scale s can overflow fp32 (or s is NaN/Inf): |code * s| <= qmax * |s|. */
static inline int he_scale_overflows(float s, int bits) {
  return (he_bits(s * (bits == 8 ? 127.0f : 7.0f)) & 0x7fffffffu) >= HE_INF_BITS;
}

/* Decodes one block of codes to y[0, len) = code * s. */
static inline void he_decode_block(const uint8_t *codes, int64_t len, int bits, float s, float *y) {
  if (bits == 8) {
    const int8_t *c = (const int8_t *)codes;
    for (int64_t i = 0; i < len; i++) y[i] = (float)c[i] * s;
    return;
  }
  int64_t pairs = len / 2;
  for (int64_t j = 0; j < pairs; j++) {
    y[2 * j] = (float)he_nibble(codes[j]) * s;
    y[2 * j + 1] = (float)he_nibble((uint32_t)codes[j] >> 4) * s;
  }
  if (len & 1) y[len - 1] = (float)he_nibble(codes[pairs]) * s;
}

static inline int he_valid_layout(int64_t n, int64_t block, int bits) {
  return n >= 0 && block >= HE_MIN_BLOCK && block <= HE_MAX_BLOCK && (block & (block - 1)) == 0 &&
         (bits == 8 || bits == 4);
}

#endif
