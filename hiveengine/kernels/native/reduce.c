/* The reduction step of the butterfly all-reduce: the weighted mean of K peers' copies of one part,
   fused with dequantization (and optionally with quantizing the mean for the return trip), plus the
   same weighted mean for unquantized (fp32/fp16/bf16) parts. */
#include "common.h"

typedef struct {
  const uint8_t *const *codes;
  const float *const *scales;
  const float *weights;
  int k;
  int64_t n;
  int64_t block;
  int bits;
  float *out;
  uint8_t *out_codes;
  float *out_scales;
} reduce_args;

HE_HOT static int reduce_blocks(const void *args, int64_t b0, int64_t b1) {
  const reduce_args *a = args;
  float buf[HE_MAX_BLOCK];
  int8_t tmp[HE_MAX_BLOCK];
  float factor[HE_MAX_INPUTS];
  int bad = 0;
  for (int64_t b = b0; b < b1; b++) {
    int64_t start = b * a->block;
    int64_t len = a->n - start < a->block ? a->n - start : a->block;
    int64_t offset = a->bits == 8 ? start : start / 2;
    float bound = 0.0f;
    for (int k = 0; k < a->k; k++) {
      factor[k] = a->scales[k][b] * a->weights[k];
      bound += factor[k] < 0.0f ? -factor[k] : factor[k];
    }
    /* The sum of |factor| times the largest code bounds every partial sum of this block. */
    bad |= he_scale_overflows(bound, a->bits);
    float *acc = a->out + start;
    he_decode_block(a->codes[0] + offset, len, a->bits, factor[0], acc);
    for (int k = 1; k < a->k; k++) {
      he_decode_block(a->codes[k] + offset, len, a->bits, factor[k], buf);
      for (int64_t i = 0; i < len; i++) acc[i] += buf[i];
    }
    if (a->out_codes) {
      bad |= he_quantize_block(acc, len, a->bits, 0, 0, 0, tmp, a->out_codes + offset, a->out_scales + b,
                               NULL);
    }
  }
  return bad;
}

/* out[0, n) = sum_k weights[k] * dequantize(codes[k], scales[k]), accumulated in fp32 in input order;
   the caller passes weights already normalized to sum to one. If out_codes is not NULL, also quantizes
   out into out_codes/out_scales (same bits and block). Returns HE_OK, HE_NONFINITE (a scale is NaN/Inf
   or the sum overflows) or HE_EINVAL. */
HE_EXPORT int he_reduce(const uint8_t *const *codes, const float *const *scales, const float *weights, int k,
                        int64_t n, int64_t block, int bits, float *out, uint8_t *out_codes, float *out_scales,
                        int threads) {
  if (!he_valid_layout(n, block, bits) || k < 1 || k > HE_MAX_INPUTS) return HE_EINVAL;
  reduce_args a = {codes, scales, weights, k, n, block, bits, out, out_codes, out_scales};
  return he_parallel(reduce_blocks, &a, (n + block - 1) / block, he_blocks_per_range(block), threads);
}

typedef struct {
  const void *const *inputs;
  int dtype;
  const float *weights;
  int k;
  float *out;
} mean_args;

HE_HOT static int mean_range(const void *args, int64_t begin, int64_t end) {
  const mean_args *a = args;
  float buf[HE_MAX_BLOCK];
  int bad = 0;
  for (int64_t start = begin; start < end; start += HE_MAX_BLOCK) {
    int64_t len = end - start < HE_MAX_BLOCK ? end - start : HE_MAX_BLOCK;
    float *acc = a->out + start;
    for (int k = 0; k < a->k; k++) {
      const float *x = (const float *)a->inputs[k] + start;
      if (a->dtype != HE_F32) {
        he_load_f32(a->inputs[k], a->dtype, start, len, buf);
        x = buf;
      }
      float w = a->weights[k];
      if (k == 0) {
        for (int64_t i = 0; i < len; i++) acc[i] = x[i] * w;
      } else {
        for (int64_t i = 0; i < len; i++) acc[i] += x[i] * w;
      }
    }
    /* NaN/Inf in any input (or an overflowing sum) reaches the mean, so checking it catches all. */
    bad |= he_absmax_bits(acc, len) >= HE_INF_BITS;
  }
  return bad;
}

/* out[0, n) = sum_k weights[k] * inputs[k] in fp32 (inputs of one dtype), in input order. Returns HE_OK,
   HE_NONFINITE (the mean holds NaN/Inf) or HE_EINVAL. */
HE_EXPORT int he_weighted_mean(const void *const *inputs, int dtype, const float *weights, int k, int64_t n,
                               float *out, int threads) {
  if (n < 0 || k < 1 || dtype < HE_F32 || dtype > HE_BF16) return HE_EINVAL;
  mean_args a = {inputs, dtype, weights, k, out};
  return he_parallel(mean_range, &a, n, HE_CHUNK, threads);
}
