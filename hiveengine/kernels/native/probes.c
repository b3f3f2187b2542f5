/* The random projections of verified reducers (hiveengine/averaging/verification.py): m fp32 rows of
   length n against HE_PROBES probes whose values are low + step * w, w the 32-bit words of a keystream laid
   out value by value (value i of probe q is word i * HE_PROBES + q), without materializing the probes; also
   each probe's squared norm and, when asked, each row's. Sums run in float64, in a fixed order (4 running
   sums per block of HE_PROBE_BLOCK values, then block by block), so every machine gets the same bits and
   their rounding stays far below the verification's slack. */
#include "common.h"

#define HE_PROBES 8
#define HE_PROBE_BLOCK 256
#define HE_PROBE_UNROLL 4

/* 4 doubles, and 4 int32: GCC/Clang vector extensions, so the probe index is the vector lane on every target
   (the AVX2 clone does one 256-bit operation where the baseline does two 128-bit ones, with the same bits). */
typedef double he_v4d __attribute__((vector_size(32)));
typedef int32_t he_v4i __attribute__((vector_size(16)));
#define HE_HALVES (HE_PROBES / 4)

HE_HOT static void probe_block(const float *rows, int64_t m, int64_t ld, const uint32_t *words, int64_t len,
                               double step, double mid, double *projections, double *probe_sq, double *row_sq) {
  he_v4d r[HE_PROBE_BLOCK][HE_HALVES];
  he_v4d acc[HE_PROBE_UNROLL][HE_HALVES];
  const he_v4i flip = {INT32_MIN, INT32_MIN, INT32_MIN, INT32_MIN};
  for (int64_t i = 0; i < HE_PROBE_BLOCK; i++)
    for (int h = 0; h < HE_HALVES; h++) {
      he_v4i w = {0};
      if (i < len) {
        memcpy(&w, words + i * HE_PROBES + 4 * h, sizeof w);
        w ^= flip; /* w - 2^31 as a signed int, whose conversion vectorizes */
      }
      he_v4d d = __builtin_convertvector(w, he_v4d);
      r[i][h] = i < len ? mid + step * d : d - d;
    }
  for (int u = 0; u < HE_PROBE_UNROLL; u++)
    for (int h = 0; h < HE_HALVES; h++) acc[u][h] = (he_v4d){0};
  for (int64_t i = 0; i < HE_PROBE_BLOCK; i += HE_PROBE_UNROLL)
    for (int u = 0; u < HE_PROBE_UNROLL; u++)
      for (int h = 0; h < HE_HALVES; h++) acc[u][h] += r[i + u][h] * r[i + u][h];
  for (int h = 0; h < HE_HALVES; h++) {
    he_v4d total = (acc[0][h] + acc[1][h]) + (acc[2][h] + acc[3][h]);
    for (int k = 0; k < 4; k++) probe_sq[4 * h + k] += total[k];
  }
  for (int64_t j = 0; j < m; j++) {
    const float *row = rows + j * ld;
    double x[HE_PROBE_BLOCK];
    for (int64_t i = 0; i < HE_PROBE_BLOCK; i++) x[i] = i < len ? (double)row[i] : 0.0;
    double xs[HE_PROBE_UNROLL] = {0};
    for (int u = 0; u < HE_PROBE_UNROLL; u++)
      for (int h = 0; h < HE_HALVES; h++) acc[u][h] = (he_v4d){0};
    for (int64_t i = 0; i < HE_PROBE_BLOCK; i += HE_PROBE_UNROLL)
      for (int u = 0; u < HE_PROBE_UNROLL; u++) {
        xs[u] += x[i + u] * x[i + u];
        for (int h = 0; h < HE_HALVES; h++) acc[u][h] += x[i + u] * r[i + u][h];
      }
    for (int h = 0; h < HE_HALVES; h++) {
      he_v4d total = (acc[0][h] + acc[1][h]) + (acc[2][h] + acc[3][h]);
      for (int k = 0; k < 4; k++) projections[j * HE_PROBES + 4 * h + k] += total[k];
    }
    if (row_sq) row_sq[j] += (xs[0] + xs[1]) + (xs[2] + xs[3]);
  }
}

HE_EXPORT int he_probe_project(const float *rows, int64_t m, int64_t n, int64_t ld, const uint32_t *words,
                               int64_t p, double step, double low, double *projections, double *probe_sq,
                               double *row_sq) {
  if (m < 0 || n < 0 || ld < n || p != HE_PROBES || (m && n && !rows) || (n && !words) || !projections ||
      !probe_sq)
    return HE_EINVAL;
  double mid = low + step * 2147483648.0;
  for (int64_t k = 0; k < m * HE_PROBES; k++) projections[k] = 0.0;
  for (int q = 0; q < HE_PROBES; q++) probe_sq[q] = 0.0;
  if (row_sq)
    for (int64_t j = 0; j < m; j++) row_sq[j] = 0.0;
  for (int64_t s = 0; s < n; s += HE_PROBE_BLOCK) {
    int64_t len = n - s < HE_PROBE_BLOCK ? n - s : HE_PROBE_BLOCK;
    probe_block(rows + s, m, ld, words + s * HE_PROBES, len, step, mid, projections, probe_sq, row_sq);
  }
  return HE_OK;
}
