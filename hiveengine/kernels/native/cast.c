/* Conversions between fp32, fp16 and bf16 (round half to even) and finiteness checks, for the fp16 and
   bf16 codecs and for lossless payloads. */
#include "common.h"

typedef struct {
  const void *src;
  int src_dtype;
  void *dst;
  int dst_dtype;
} cast_args;

HE_HOT static int cast_range(const void *args, int64_t begin, int64_t end) {
  const cast_args *a = args;
  float buf[HE_MAX_BLOCK];
  int bad = 0;
  for (int64_t start = begin; start < end; start += HE_MAX_BLOCK) {
    int64_t len = end - start < HE_MAX_BLOCK ? end - start : HE_MAX_BLOCK;
    const float *x = buf;
    if (a->src_dtype == HE_F32) {
      x = (const float *)a->src + start;
    } else {
      he_load_f32(a->src, a->src_dtype, start, len, buf);
    }
    bad |= he_store_from_f32(x, a->dst, a->dst_dtype, start, len);
  }
  return bad;
}

/* dst[0, n) = src[0, n) converted between dtypes. Returns HE_OK, HE_NONFINITE (a converted value is
   NaN/Inf: the input held one or overflowed the output dtype) or HE_EINVAL. */
HE_EXPORT int he_cast(const void *src, int src_dtype, void *dst, int dst_dtype, int64_t n, int threads) {
  if (n < 0 || src_dtype < HE_F32 || src_dtype > HE_BF16 || dst_dtype < HE_F32 || dst_dtype > HE_BF16)
    return HE_EINVAL;
  cast_args a = {src, src_dtype, dst, dst_dtype};
  return he_parallel(cast_range, &a, n, HE_CHUNK, threads);
}

typedef struct {
  const void *x;
  int dtype;
} check_args;

HE_HOT static int check_range(const void *args, int64_t begin, int64_t end) {
  const check_args *a = args;
  if (a->dtype == HE_F32) return he_absmax_bits((const float *)a->x + begin, end - begin) >= HE_INF_BITS;
  const uint16_t *h = (const uint16_t *)a->x;
  uint32_t worst = 0;
  for (int64_t i = begin; i < end; i++) {
    uint32_t e = h[i] & 0x7fffu;
    worst = e > worst ? e : worst;
  }
  return worst >= (a->dtype == HE_F16 ? 0x7c00u : 0x7f80u);
}

/* Returns HE_OK if x[0, n) is all finite, HE_NONFINITE if it holds NaN/Inf, or HE_EINVAL. */
HE_EXPORT int he_check_finite(const void *x, int dtype, int64_t n, int threads) {
  if (n < 0 || dtype < HE_F32 || dtype > HE_BF16) return HE_EINVAL;
  check_args a = {x, dtype};
  return he_parallel(check_range, &a, n, HE_CHUNK, threads);
}
