/* Weight-only int8 / int4 matrix products for a few rows (CPU decode), y = x W^T.
 *
 * Built at run time by spt_fast/model/cpu_quant.py with the system C compiler (-O3 -march=native
 * -fopenmp; linked to the libgomp torch already loaded, so one OpenMP pool serves both).
 *
 * Layouts (tiles of T = 32 output rows; N padded to a multiple of 32 with zero rows):
 *   int8: q[N/32][K][32] int8, one fp32 scale per output row:       w[n][k] = q * scale[n]
 *   int4: q[N/32][K/8][32] uint32 words, nibble i of word (t, b, j) is the weight of row 32 t + j,
 *         column 8 b + i; per group of G columns and row a scale and a low: w = q * scale + low
 * Each word (int4) or byte (int8) of a tile row belongs to one output lane, so a 16-lane vector of
 * them turns into 16 weights with a shift, a mask and one conversion: no shuffles across lanes.
 * x: [M][K] fp32, y: [M][N] fp32 (N the padded width). K a multiple of 8; G of 8. `threads`: torch's
 * thread count (OpenMP's per-thread default would be every core).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define T 32

/* ---- int8 ---- */

#if defined(__AVX512F__)
/* MR rows of x against one tile; four partial sums per lane (k mod 4) so that the FMA chains
 * overlap. */
static inline __attribute__((always_inline)) void int8_tile(const float* x, const int8_t* qt, const float* sc,
                                                           float* y, int64_t N, int64_t K, int MR) {
  __m512 acc[2][4][2];
  for (int m = 0; m < MR; m++)
    for (int p = 0; p < 4; p++) acc[m][p][0] = acc[m][p][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 4) {
    for (int p = 0; p < 4; p++) {
      const int8_t* row = qt + (k + p) * T;
      __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)row)));
      __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(row + 16))));
      for (int m = 0; m < MR; m++) {
        __m512 xv = _mm512_set1_ps(x[m * K + k + p]);
        acc[m][p][0] = _mm512_fmadd_ps(xv, w0, acc[m][p][0]);
        acc[m][p][1] = _mm512_fmadd_ps(xv, w1, acc[m][p][1]);
      }
    }
  }
  __m512 s0 = _mm512_loadu_ps(sc), s1 = _mm512_loadu_ps(sc + 16);
  for (int m = 0; m < MR; m++) {
    __m512 a0 = _mm512_add_ps(_mm512_add_ps(acc[m][0][0], acc[m][1][0]), _mm512_add_ps(acc[m][2][0], acc[m][3][0]));
    __m512 a1 = _mm512_add_ps(_mm512_add_ps(acc[m][0][1], acc[m][1][1]), _mm512_add_ps(acc[m][2][1], acc[m][3][1]));
    _mm512_storeu_ps(y + m * N, _mm512_mul_ps(a0, s0));
    _mm512_storeu_ps(y + m * N + 16, _mm512_mul_ps(a1, s1));
  }
}
#else
static inline void int8_tile(const float* x, const int8_t* qt, const float* sc, float* y, int64_t N, int64_t K,
                             int MR) {
  for (int m = 0; m < MR; m++) {
    float acc[T] = {0};
    for (int64_t k = 0; k < K; k++) {
      float xv = x[m * K + k];
      const int8_t* row = qt + k * T;
      for (int j = 0; j < T; j++) acc[j] += xv * (float)row[j];
    }
    for (int j = 0; j < T; j++) y[m * N + j] = acc[j] * sc[j];
  }
}
#endif

void spt_int8_mm(const float* x, const int8_t* q, const float* scale, float* y, int64_t M, int64_t N, int64_t K,
                 int threads) {
  int64_t tiles = N / T;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < tiles; t++) {
    const int8_t* qt = q + t * K * T;
    for (int64_t m = 0; m < M; m += 2) {
      if (M - m >= 2)
        int8_tile(x + m * K, qt, scale + t * T, y + m * N + t * T, N, K, 2);
      else
        int8_tile(x + m * K, qt, scale + t * T, y + m * N + t * T, N, K, 1);
    }
  }
}

/* ---- int4 ---- */

#if defined(__AVX512BF16__)
/* With AVX-512 BF16 a nibble pair becomes two bf16 numbers in one 32-bit lane by a shift and one
 * ternary logic op: (word >> 4i) & 0x000F000F | 0x43004300 is (128 + q_i, 128 + q_i+4), exact in
 * bf16. One dot instruction then multiplies both by x (bf16 pairs, xp) and adds them into fp32:
 * about half the instructions per weight of the fp32 path, which is what bounds it. The 128 that
 * rides along is taken off per group with the sum of the same bf16 activations (xb). */
#define INT4_BF16 1
static inline __attribute__((always_inline)) void int4_tile_bf16(const uint32_t* xp, const float* xb,
                                                                const uint32_t* qt, const float* sc,
                                                                const float* lo, float* y, int64_t N, int64_t K,
                                                                int64_t G, int MR) {
  const __m512i keep = _mm512_set1_epi32(0x000F000F), magic = _mm512_set1_epi32(0x43004300);
  const __m512 c128 = _mm512_set1_ps(128.f);
  __m512 r[2][2];
  for (int m = 0; m < MR; m++) r[m][0] = r[m][1] = _mm512_setzero_ps();
  for (int64_t g = 0; g < K / G; g++) {
    /* one partial sum per row, lane half and nibble pair: 8 (16) independent dot chains, which
     * the dot instruction's latency needs (4 were latency-bound: 13 instead of 21 GB/s) */
    __m512 a[2][4][2];
    for (int m = 0; m < MR; m++)
      for (int i = 0; i < 4; i++) a[m][i][0] = a[m][i][1] = _mm512_setzero_ps();
    for (int64_t b = g * (G / 8); b < (g + 1) * (G / 8); b++) {
      const uint32_t* row = qt + b * T;
      __m512i v0 = _mm512_loadu_si512(row), v1 = _mm512_loadu_si512(row + 16);
      for (int i = 0; i < 4; i++) {
        __m512i u0 = i ? _mm512_srli_epi32(v0, 4 * i) : v0, u1 = i ? _mm512_srli_epi32(v1, 4 * i) : v1;
        __m512bh w0 = (__m512bh)_mm512_ternarylogic_epi32(u0, keep, magic, 0xEA);  /* (u & keep) | magic */
        __m512bh w1 = (__m512bh)_mm512_ternarylogic_epi32(u1, keep, magic, 0xEA);
        for (int m = 0; m < MR; m++) {
          __m512bh xv = (__m512bh)_mm512_set1_epi32((int)xp[m * (K / 2) + b * 4 + i]);
          a[m][i][0] = _mm512_dpbf16_ps(a[m][i][0], w0, xv);
          a[m][i][1] = _mm512_dpbf16_ps(a[m][i][1], w1, xv);
        }
      }
    }
    __m512 s0 = _mm512_loadu_ps(sc + g * N), s1 = _mm512_loadu_ps(sc + g * N + 16);
    __m512 l0 = _mm512_loadu_ps(lo + g * N), l1 = _mm512_loadu_ps(lo + g * N + 16);
    for (int m = 0; m < MR; m++) {
      __m512 u = _mm512_set1_ps(xb[m * (K / G) + g]), off = _mm512_mul_ps(u, c128);
      __m512 d0 = _mm512_add_ps(_mm512_add_ps(a[m][0][0], a[m][1][0]), _mm512_add_ps(a[m][2][0], a[m][3][0]));
      __m512 d1 = _mm512_add_ps(_mm512_add_ps(a[m][0][1], a[m][1][1]), _mm512_add_ps(a[m][2][1], a[m][3][1]));
      r[m][0] = _mm512_fmadd_ps(u, l0, _mm512_fmadd_ps(_mm512_sub_ps(d0, off), s0, r[m][0]));
      r[m][1] = _mm512_fmadd_ps(u, l1, _mm512_fmadd_ps(_mm512_sub_ps(d1, off), s1, r[m][1]));
    }
  }
  for (int m = 0; m < MR; m++) {
    _mm512_storeu_ps(y + m * N, r[m][0]);
    _mm512_storeu_ps(y + m * N + 16, r[m][1]);
  }
}

static inline uint16_t to_bf16(float f) {  /* round to nearest even (activations: finite) */
  uint32_t u;
  memcpy(&u, &f, 4);
  return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}
static inline float from_bf16(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
#endif

#if defined(__AVX512F__)
/* MR rows of x against one tile. xs: x with column k scaled by 16^-(k mod 8) (see spt_int4_mm),
 * xsum: each group's sum of x. Nibble i is taken in place, (word & 15 << 4i), which converts
 * exactly to q * 16^i; the top nibble is shifted down instead (it would come out negative). */
#define NIBBLE(i, w0, w1)                                                                              \
  if (i < 7) {                                                                                         \
    __m512i m_ = _mm512_set1_epi32(0xF << (4 * i));                                                    \
    w0 = _mm512_cvtepi32_ps(_mm512_and_si512(v0, m_));                                                 \
    w1 = _mm512_cvtepi32_ps(_mm512_and_si512(v1, m_));                                                 \
  } else {                                                                                             \
    w0 = _mm512_cvtepi32_ps(_mm512_srli_epi32(v0, 28));                                                \
    w1 = _mm512_cvtepi32_ps(_mm512_srli_epi32(v1, 28));                                                \
  }
static inline __attribute__((always_inline)) void int4_tile(const float* xs, const float* xsum, const uint32_t* qt,
                                                           const float* sc, const float* lo, float* y, int64_t N,
                                                           int64_t K, int64_t G, int MR) {
  __m512 r00 = _mm512_setzero_ps(), r01 = r00, r10 = r00, r11 = r00;
  for (int64_t g = 0; g < K / G; g++) {
    /* two partial sums per row and lane (even / odd nibbles): independent FMA chains */
    __m512 a00 = _mm512_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;  /* row 0: even lo/hi, odd lo/hi */
    __m512 a10 = a00, a11 = a00, a12 = a00, a13 = a00;                  /* row 1 */
    for (int64_t b = g * (G / 8); b < (g + 1) * (G / 8); b++) {
      const uint32_t* row = qt + b * T;
      __m512i v0 = _mm512_loadu_si512(row), v1 = _mm512_loadu_si512(row + 16);
      const float* x0 = xs + b * 8;
      const float* x1 = xs + K + b * 8;
#define STEP(i)                                                                                        \
  {                                                                                                    \
    __m512 w0, w1;                                                                                     \
    NIBBLE(i, w0, w1)                                                                                  \
    __m512 p0 = _mm512_set1_ps(x0[i]);                                                                 \
    if (i & 1) { a02 = _mm512_fmadd_ps(p0, w0, a02); a03 = _mm512_fmadd_ps(p0, w1, a03); }             \
    else { a00 = _mm512_fmadd_ps(p0, w0, a00); a01 = _mm512_fmadd_ps(p0, w1, a01); }                   \
    if (MR > 1) {                                                                                      \
      __m512 p1 = _mm512_set1_ps(x1[i]);                                                               \
      if (i & 1) { a12 = _mm512_fmadd_ps(p1, w0, a12); a13 = _mm512_fmadd_ps(p1, w1, a13); }           \
      else { a10 = _mm512_fmadd_ps(p1, w0, a10); a11 = _mm512_fmadd_ps(p1, w1, a11); }                 \
    }                                                                                                  \
  }
      STEP(0) STEP(1) STEP(2) STEP(3) STEP(4) STEP(5) STEP(6) STEP(7)
#undef STEP
    }
    __m512 s0 = _mm512_loadu_ps(sc + g * N), s1 = _mm512_loadu_ps(sc + g * N + 16);
    __m512 l0 = _mm512_loadu_ps(lo + g * N), l1 = _mm512_loadu_ps(lo + g * N + 16);
    __m512 u0 = _mm512_set1_ps(xsum[g]);
    r00 = _mm512_fmadd_ps(u0, l0, _mm512_fmadd_ps(_mm512_add_ps(a00, a02), s0, r00));
    r01 = _mm512_fmadd_ps(u0, l1, _mm512_fmadd_ps(_mm512_add_ps(a01, a03), s1, r01));
    if (MR > 1) {
      __m512 u1 = _mm512_set1_ps(xsum[K / G + g]);
      r10 = _mm512_fmadd_ps(u1, l0, _mm512_fmadd_ps(_mm512_add_ps(a10, a12), s0, r10));
      r11 = _mm512_fmadd_ps(u1, l1, _mm512_fmadd_ps(_mm512_add_ps(a11, a13), s1, r11));
    }
  }
  _mm512_storeu_ps(y, r00);
  _mm512_storeu_ps(y + 16, r01);
  if (MR > 1) {
    _mm512_storeu_ps(y + N, r10);
    _mm512_storeu_ps(y + N + 16, r11);
  }
}
#undef NIBBLE
#else
static inline void int4_tile(const float* xs, const float* xsum, const uint32_t* qt, const float* sc,
                             const float* lo, float* y, int64_t N, int64_t K, int64_t G, int MR) {
  for (int m = 0; m < MR; m++) {
    float res[T] = {0};
    for (int64_t g = 0; g < K / G; g++) {
      float part[T] = {0};
      for (int64_t b = g * G / 8; b < (g + 1) * G / 8; b++) {
        const uint32_t* row = qt + b * T;
        for (int i = 0; i < 8; i++) {
          float xv = xs[m * K + b * 8 + i];
          uint32_t keep = i < 7 ? 15u << (4 * i) : 0u;
          for (int j = 0; j < T; j++)
            part[j] += xv * (i < 7 ? (float)(int32_t)(row[j] & keep) : (float)(row[j] >> 28));
        }
      }
      for (int j = 0; j < T; j++) res[j] += part[j] * sc[g * N + j] + xsum[m * (K / G) + g] * lo[g * N + j];
    }
    for (int j = 0; j < T; j++) y[m * N + j] = res[j];
  }
}
#endif

void spt_int4_mm(const float* x, const uint32_t* q, const float* scale, const float* low, float* y, int64_t M,
                 int64_t N, int64_t K, int64_t G, int threads) {
  int64_t tiles = N / T;
#ifdef INT4_BF16
  /* Once per call: x as bf16 pairs (x[8b+i], x[8b+i+4]) and each group's sum of those bf16 values. */
  uint32_t* xp = (uint32_t*)malloc(sizeof(uint32_t) * M * (K / 2) + sizeof(float) * M * (K / G));
  if (!xp) return;
  float* xb = (float*)(xp + M * (K / 2));
  for (int64_t m = 0; m < M; m++) {
    for (int64_t g = 0; g < K / G; g++) xb[m * (K / G) + g] = 0.f;
    for (int64_t b = 0; b < K / 8; b++)
      for (int i = 0; i < 4; i++) {
        uint16_t lo16 = to_bf16(x[m * K + 8 * b + i]), hi16 = to_bf16(x[m * K + 8 * b + i + 4]);
        xp[m * (K / 2) + 4 * b + i] = (uint32_t)lo16 | ((uint32_t)hi16 << 16);
        xb[m * (K / G) + (8 * b) / G] += from_bf16(lo16) + from_bf16(hi16);
      }
  }
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < tiles; t++) {
    const uint32_t* qt = q + t * (K / 8) * T;
    for (int64_t m = 0; m < M; m += 2) {
      if (M - m >= 2)
        int4_tile_bf16(xp + m * (K / 2), xb + m * (K / G), qt, scale + t * T, low + t * T, y + m * N + t * T, N,
                       K, G, 2);
      else
        int4_tile_bf16(xp + m * (K / 2), xb + m * (K / G), qt, scale + t * T, low + t * T, y + m * N + t * T, N,
                       K, G, 1);
    }
  }
  free(xp);
#else
  /* Once per call: x scaled per column for the in-place nibbles, and its sums per group. */
  float* xs = (float*)malloc(sizeof(float) * (M * K + M * (K / G)));
  if (!xs) return;
  float* xsum = xs + M * K;
  for (int64_t m = 0; m < M; m++) {
    for (int64_t k = 0; k < K; k++) xs[m * K + k] = x[m * K + k] * (k % 8 == 7 ? 1.f : 1.f / (float)(1u << (4 * (k % 8))));
    for (int64_t g = 0; g < K / G; g++) {
      float sum = 0.f;
      for (int64_t k = g * G; k < (g + 1) * G; k++) sum += x[m * K + k];
      xsum[m * (K / G) + g] = sum;
    }
  }
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < tiles; t++) {
    const uint32_t* qt = q + t * (K / 8) * T;
    for (int64_t m = 0; m < M; m += 2) {
      if (M - m >= 2)
        int4_tile(xs + m * K, xsum + m * (K / G), qt, scale + t * T, low + t * T, y + m * N + t * T, N, K, G, 2);
      else
        int4_tile(xs + m * K, xsum + m * (K / G), qt, scale + t * T, low + t * T, y + m * N + t * T, N, K, G, 1);
    }
  }
  free(xs);
#endif
}

/* The tile width the Python side packs for; whether int4 rounds the activations to bf16. */
int64_t spt_quant_tile(void) { return T; }
int spt_int4_bf16(void) {
#ifdef INT4_BF16
  return 1;
#else
  return 0;
#endif
}
