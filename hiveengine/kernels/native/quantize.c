/* Blockwise absmax quantization (int8, packed int4) with optional error feedback and stochastic
   rounding, and its inverse. */
#include "common.h"

typedef struct {
  const void *x;
  int dtype;
  float *residual;
  int64_t n;
  int64_t block;
  int bits;
  int stochastic;
  uint32_t key;
  uint8_t *codes;
  float *scales;
} quantize_args;

HE_HOT static int quantize_blocks(const void *args, int64_t b0, int64_t b1) {
  const quantize_args *a = args;
  float buf[HE_MAX_BLOCK];
  int8_t tmp[HE_MAX_BLOCK];
  int bad = 0;
  for (int64_t b = b0; b < b1; b++) {
    int64_t start = b * a->block;
    int64_t len = a->n - start < a->block ? a->n - start : a->block;
    float *res = a->residual ? a->residual + start : NULL;
    const float *y = buf;
    if (a->dtype == HE_F32 && !res) {
      y = (const float *)a->x + start;
    } else {
      he_load_f32(a->x, a->dtype, start, len, buf);
      if (res) {
        for (int64_t i = 0; i < len; i++) buf[i] += res[i];
      }
    }
    uint8_t *codes = a->codes + (a->bits == 8 ? start : start / 2);
    bad |= he_quantize_block(y, len, a->bits, a->stochastic, a->key, (uint32_t)start, tmp, codes,
                             a->scales + b, res);
  }
  return bad;
}

/* Quantizes x[0, n) (dtype HE_F32/HE_F16/HE_BF16) blockwise into codes and one fp32 scale per block.
   If residual is not NULL, quantizes x + residual and overwrites residual with the new quantization
   error (error feedback). Returns HE_OK, HE_NONFINITE (NaN/Inf met; those blocks are left unwritten)
   or HE_EINVAL. */
HE_EXPORT int he_quantize(const void *x, int dtype, float *residual, int64_t n, int64_t block, int bits,
                          int stochastic, uint32_t key, uint8_t *codes, float *scales, int threads) {
  if (!he_valid_layout(n, block, bits) || dtype < HE_F32 || dtype > HE_BF16) return HE_EINVAL;
  quantize_args a = {x, dtype, residual, n, block, bits, stochastic, key, codes, scales};
  return he_parallel(quantize_blocks, &a, (n + block - 1) / block, he_blocks_per_range(block), threads);
}

typedef struct {
  const uint8_t *codes;
  const float *scales;
  int64_t n;
  int64_t block;
  int bits;
  void *out;
  int dtype;
} dequantize_args;

HE_HOT static int dequantize_blocks(const void *args, int64_t b0, int64_t b1) {
  const dequantize_args *a = args;
  float buf[HE_MAX_BLOCK];
  int bad = 0;
  for (int64_t b = b0; b < b1; b++) {
    int64_t start = b * a->block;
    int64_t len = a->n - start < a->block ? a->n - start : a->block;
    float s = a->scales[b];
    bad |= he_scale_overflows(s, a->bits);
    const uint8_t *codes = a->codes + (a->bits == 8 ? start : start / 2);
    if (a->dtype == HE_F32) {
      he_decode_block(codes, len, a->bits, s, (float *)a->out + start);
    } else {
      he_decode_block(codes, len, a->bits, s, buf);
      bad |= he_store_from_f32(buf, a->out, a->dtype, start, len);
    }
  }
  return bad;
}

/* out[0, n) = code * scale of its block, written as dtype. Returns HE_OK, HE_NONFINITE (a scale is NaN/Inf
   or a value overflows the output dtype) or HE_EINVAL. */
HE_EXPORT int he_dequantize(const uint8_t *codes, const float *scales, int64_t n, int64_t block, int bits,
                            void *out, int dtype, int threads) {
  if (!he_valid_layout(n, block, bits) || dtype < HE_F32 || dtype > HE_BF16) return HE_EINVAL;
  dequantize_args a = {codes, scales, n, block, bits, out, dtype};
  return he_parallel(dequantize_blocks, &a, (n + block - 1) / block, he_blocks_per_range(block), threads);
}
