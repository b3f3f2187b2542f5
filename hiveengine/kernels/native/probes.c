/* The random projections of verified reducers (hiveengine/averaging/verification.py): m fp32 rows of
   length n against HE_PROBES probes whose values are step * (w - 32767.5), w the unsigned 16-bit words of a
   keystream laid out value by value (value i of probe q is word i * HE_PROBES + q), without materializing the
   probes; also, when asked, each row's squared norm. Each product x * (w - 32767.5) is exact in float64 (24 + 17
   bits); the sums run in float64 in a fixed order (4 running sums per block of HE_PROBE_BLOCK values, then block
   by block) and are scaled by step once, so every machine gets the same bits and their rounding stays far below
   the verification's slack. */
#include "common.h"

#define HE_PROBES 8
#define HE_PROBE_BLOCK 256
#define HE_PROBE_UNROLL 4

/* 8 doubles, 8 int32 and 8 int16: GCC/Clang vector extensions, so the probe index is the vector lane on every
   target (AVX-512 does one operation where AVX2 does two and the baseline four, lane by lane: the same bits). */
typedef double he_v8d __attribute__((vector_size(64)));
typedef int32_t he_v8i __attribute__((vector_size(32)));
typedef int16_t he_v8s __attribute__((vector_size(16)));

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HE_PROBE_HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), noinline))
#else
#define HE_PROBE_HOT HE_HOT
#endif

HE_PROBE_HOT static void probe_block(const float *rows, int64_t m, int64_t ld, const uint16_t *words, int64_t len,
                                     double *sums, double *row_sq) {
  he_v8d r[HE_PROBE_BLOCK];
  he_v8d acc[HE_PROBE_UNROLL];
  const he_v8s flip = {INT16_MIN, INT16_MIN, INT16_MIN, INT16_MIN, INT16_MIN, INT16_MIN, INT16_MIN, INT16_MIN};
  for (int64_t i = 0; i < len; i++) {
    he_v8s w;
    memcpy(&w, words + i * HE_PROBES, sizeof w);
    w ^= flip; /* w - 32768 as a signed int16 */
    r[i] = __builtin_convertvector(__builtin_convertvector(w, he_v8i), he_v8d) + 0.5;
  }
  for (int64_t i = len; i < HE_PROBE_BLOCK; i++) r[i] = (he_v8d){0};
  for (int64_t j = 0; j < m; j++) {
    const float *row = rows + j * ld;
    double x[HE_PROBE_BLOCK];
    for (int64_t i = 0; i < len; i++) x[i] = (double)row[i];
    for (int64_t i = len; i < HE_PROBE_BLOCK; i++) x[i] = 0.0;
    double xs[HE_PROBE_UNROLL] = {0};
    for (int u = 0; u < HE_PROBE_UNROLL; u++) acc[u] = (he_v8d){0};
    for (int64_t i = 0; i < HE_PROBE_BLOCK; i += HE_PROBE_UNROLL)
      for (int u = 0; u < HE_PROBE_UNROLL; u++) {
        xs[u] += x[i + u] * x[i + u];
        acc[u] += x[i + u] * r[i + u];
      }
    he_v8d total = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for (int k = 0; k < HE_PROBES; k++) sums[j * HE_PROBES + k] += total[k];
    if (row_sq) row_sq[j] += (xs[0] + xs[1]) + (xs[2] + xs[3]);
  }
}

HE_EXPORT int he_probe_project(const float *rows, int64_t m, int64_t n, int64_t ld, const uint16_t *words,
                               int64_t p, double step, double *projections, double *row_sq) {
  if (m < 0 || n < 0 || ld < n || p != HE_PROBES || (m && n && !rows) || (n && !words) || !projections)
    return HE_EINVAL;
  for (int64_t k = 0; k < m * HE_PROBES; k++) projections[k] = 0.0;
  if (row_sq)
    for (int64_t j = 0; j < m; j++) row_sq[j] = 0.0;
  for (int64_t s = 0; s < n; s += HE_PROBE_BLOCK) {
    int64_t len = n - s < HE_PROBE_BLOCK ? n - s : HE_PROBE_BLOCK;
    probe_block(rows + s, m, ld, words + s * HE_PROBES, len, projections, row_sq);
  }
  for (int64_t k = 0; k < m * HE_PROBES; k++) projections[k] *= step;
  return HE_OK;
}
